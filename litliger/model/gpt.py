"""The GPT model, composed from litliger.nn layers (which call litliger.kernels).

One file for every family: the differences between Llama, Mistral, Qwen2/3, Gemma, GPT-NeoX and GPT-2
are fields of ``Config`` (norm, MLP, rotary fraction, biases, qk-norm, parallel residual, tied or learned
embeddings, embedding scale), never the model's name.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fused_linear_cross_entropy
from ..nn import Embedding, GeGLUMLP, GeluMLP, LayerNorm, Linear, RMSNorm, RotaryEmbedding, SwiGLUMLP, init
from ..nn.recompute import recomputed
from .checkpointing import run_checkpointed
from .config import Config
from .documents import attend, check_document_ids, document_step
from .kv_cache import KVCache, Step, cached_step

# What GPT.forward's head_fn takes: the final hidden states (B, T, C'), the head's weight (V, C') and bias (V,).
HeadFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], Any]


def build_norm(config: Config, size: int) -> RMSNorm | LayerNorm:
    if config.norm_class == "RMSNorm":
        return RMSNorm(size, config.norm_eps, config.norm_offset)
    return LayerNorm(size, config.norm_eps, bias=True)


def build_mlp(config: Config) -> nn.Module:
    args = (config.n_embd, config.intermediate_size, config.bias)
    if config.mlp_class == "SwiGLUMLP":
        return SwiGLUMLP(*args)
    if config.mlp_class == "GeGLUMLP":
        return GeGLUMLP(*args, approximate=config.gelu_approximate)
    return GeluMLP(*args, approximate=config.gelu_approximate)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        c = config
        self.n_head, self.n_kv, self.head_size = c.n_head, c.n_query_groups, c.head_size
        self.rotary = c.rope_n_elem > 0
        self.sliding_window = c.sliding_window
        # one projection for [q | k | v]: n_head query heads, then n_query_groups key and value heads
        self.qkv = Linear(c.n_embd, c.qkv_size, bias=c.bias or c.attn_bias, role="linear")
        self.proj = Linear(c.n_head * c.head_size, c.n_embd, bias=c.bias, role="out_proj")
        if c.norm_qk:
            self.q_norm = RMSNorm(c.head_size, c.norm_eps, c.norm_offset)
            self.k_norm = RMSNorm(c.head_size, c.norm_eps, c.norm_offset)
        else:
            self.q_norm = self.k_norm = None
        self.kv_cache: KVCache | None = None  # set for decoding by GPT.set_kv_cache

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding | None, step: Step | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        hs = self.head_size
        q, k, v = self.qkv(x).split((self.n_head * hs, self.n_kv * hs, self.n_kv * hs), dim=-1)
        q = q.view(B, T, self.n_head, hs)  # (B, T, nh, hs)
        k = k.view(B, T, self.n_kv, hs)  # (B, T, n_kv, hs)
        v = v.view(B, T, self.n_kv, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh | n_kv, T, hs)
        if step is None:
            if rope is not None and self.rotary:
                q, k = rope(q, k)
                # q and k are new tensors now; a view of v would keep the whole qkv output alive for backward
                v = v.contiguous()
            mask = self._mask(T, q.device)
            y = F.scaled_dot_product_attention(
                q, k, v, **mask, scale=1.0 / math.sqrt(hs), enable_gqa=self.n_kv != self.n_head
            )  # (B, nh, T, hs)
            return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * hs))
        # this step's positions: per document (document masking), or cache slots (decoding)
        if step.cos is not None and self.rotary:
            q, k = step.rotate(q, k)
            v = v.contiguous() if step.start is None else v  # as above
        if step.start is not None:  # decoding: attend to every cached slot so far
            k, v = self.kv_cache.update(step.start, k, v)  # (B, n_kv, start + T, hs)
        y = attend(q, k, v, step.mask, 1.0 / math.sqrt(hs))  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * hs))

    def _mask(self, T: int, device: torch.device) -> dict:
        if self.sliding_window is None or T <= self.sliding_window:
            return {"is_causal": True}
        # query i sees keys j with i - sliding_window < j <= i (Mistral's sliding window)
        i = torch.arange(T, device=device)
        distance = i[:, None] - i[None, :]
        return {"attn_mask": (distance >= 0) & (distance < self.sliding_window)}


class Block(nn.Module):
    """Pre-norm transformer block: sequential (Llama) or parallel (GPT-NeoX) residual.

    ``checkpoint`` ("full", "op" or None) is its activation checkpointing mode (model/checkpointing.py): a
    plain attribute, so parameter names never change with it.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.norm_1 = build_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = build_norm(config, config.n_embd)
        self.mlp = build_mlp(config)
        self.checkpoint: str | None = None

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding | None, step: Step | None = None) -> torch.Tensor:
        training = self.training and torch.is_grad_enabled() and (step is None or step.start is None)
        if self.checkpoint is None or not training:
            return self._forward(x, rope, step, True)
        # the checkpoint rebuilds the norm outputs itself: no second recompute inside it
        return run_checkpointed(self.checkpoint, self._forward, x, rope, step, False)

    def _forward(
        self, x: torch.Tensor, rope: RotaryEmbedding | None, step: Step | None, recompute_norms: bool
    ) -> torch.Tensor:
        # Each norm's output is rebuilt from its input in backward, not held (litliger/nn/recompute.py).
        keep = recomputed if recompute_norms else _nothing
        h = self.norm_1(x)
        with keep(h, self.norm_1.recompute_fn(x)):
            a = self.attn(h, rope, step)  # (B, T, C)
        if self.parallel_residual:
            h = self.norm_2(x)
            with keep(h, self.norm_2.recompute_fn(x)):
                return x + a + self.mlp(h)
        # x <- x + a and h = norm_2(x) in one fused pass; the sum keeps x's dtype (fp32 under autocast)
        h, x = self.norm_2(x, residual=a)
        with keep(h, self.norm_2.recompute_fn(x)):
            m = self.mlp(h)
        return x + m


def _nothing(t: torch.Tensor, fn: object) -> contextlib.nullcontext:
    return contextlib.nullcontext()


class GPT(nn.Module):
    """A decoder-only transformer. ``model(idx)`` -> logits (B, T, padded_vocab_size);
    ``model(idx, targets=t)`` -> mean cross-entropy over targets != -100, through the fused linear
    cross-entropy (no (B*T, vocab) logits are ever held).

    Decoding: ``set_kv_cache(batch_size, max_seq_length)``, then ``model(prompt, input_pos=0)`` (the prefill)
    and ``model(token, input_pos=n)`` per new token; ``clear_kv_cache()`` frees it (litliger/model/kv_cache.py).

    Built on a real device, the model is initialised by the init policy (seeded from the global RNG).
    Built under ``torch.device("meta")`` it is left empty for the engine to shard, materialise and
    initialise (``litliger.init.init_weights``) or load.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = c = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=Embedding(c.padded_vocab_size, c.n_embd, role="embedding"),
                h=nn.ModuleList(Block(c) for _ in range(c.n_layer)),
                ln_f=build_norm(c, c.n_embd),
            )
        )
        if c.learned_pos_embeddings:
            self.transformer["wpe"] = Embedding(c.block_size, c.n_embd, role="pos_embedding")
        self.lm_head = None
        if not c.tie_embeddings:
            self.lm_head = Linear(c.n_embd, c.padded_vocab_size, c.lm_head_bias, role="lm_head")
        self.rope = None
        if c.rope_n_elem:
            self.rope = RotaryEmbedding(c.rope_n_elem, c.block_size, c.rope_base, c.rope_scaling)
        if not self.transformer.wte.weight.is_meta:
            init.init_weights(self, seed=int(torch.randint(0, 2**62, ())))

    @property
    def max_seq_length(self) -> int:
        """Longest sequence ``forward`` accepts; setting it resizes the rotary tables (default block_size)."""
        return self.rope.length if self.rope is not None else self.config.block_size

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if value > self.config.block_size:
            raise ValueError(
                f"max_seq_length={value} exceeds the model's block_size={self.config.block_size} ({self.config.name})"
            )
        if self.rope is not None and value != self.rope.length:
            self.rope.resize(value)

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's base (weight, bias); the token embedding when embeddings are tied. A LoRA adapter on
        ``lm_head`` is not part of it: :meth:`forward` folds one in (``Linear.fold_lora``)."""
        if self.lm_head is None:
            return self.transformer.wte.weight, None
        return self.lm_head.weight, self.lm_head.bias

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Allocate a KV cache of ``max_seq_length`` slots for ``batch_size`` rows in every layer (default:
        the model's device and dtype); it replaces any previous one. The rotary tables grow to cover it."""
        if batch_size < 1 or max_seq_length < 1:
            raise ValueError(f"a KV cache needs batch_size, max_seq_length >= 1, got {batch_size}, {max_seq_length}")
        if max_seq_length > self.max_seq_length:
            self.max_seq_length = max_seq_length  # refuses more than block_size
        weight = self.transformer.wte.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        self.clear_kv_cache()  # free the old cache before allocating the new one
        for block in self.transformer.h:
            attn = block.attn
            attn.kv_cache = KVCache(batch_size, attn.n_kv, max_seq_length, attn.head_size, device=device, dtype=dtype)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    @property
    def kv_cache_length(self) -> int | None:
        """Slots of the KV cache (None: no cache)."""
        cache = self.transformer.h[0].attn.kv_cache
        return None if cache is None else cache.max_seq_length

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        input_pos: int | None = None,
        left_pad: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) for token ids ``idx`` (B, T); with ``input_pos`` (and, for
        left-padded rows, ``left_pad`` (B,)) through the KV cache, with ``document_ids`` document-masked: see
        :meth:`forward`."""
        B, T = idx.shape
        if document_ids is not None and input_pos is not None:
            raise ValueError(
                "document_ids are for training forwards; a KV-cache forward (input_pos) decodes one sequence per "
                "row: leave document_ids out"
            )
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.scale_embeddings:
            # Gemma scales by sqrt(C) rounded to the activation dtype
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        if input_pos is None and T > self.max_seq_length:
            raise ValueError(f"sequence length {T} exceeds max_seq_length={self.max_seq_length}")
        if input_pos is None and document_ids is None:
            if "wpe" in self.transformer:
                x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
            for block in self.transformer.h:
                x = block(x, self.rope)
            return self.transformer.ln_f(x)
        if document_ids is not None:
            check_document_ids(document_ids, idx)
            tables = (self.rope.cos, self.rope.sin) if self.rope is not None else None
            step = document_step(document_ids, sliding_window=self.config.sliding_window, rope_tables=tables)
        else:
            step = self._cached_step(B, T, input_pos, left_pad, idx.device)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(step.positions)
        for block in self.transformer.h:
            x = block(x, self.rope, step)
        return self.transformer.ln_f(x)

    def _cached_step(self, B: int, T: int, input_pos: int, left_pad: torch.Tensor | None, device: torch.device) -> Step:
        cache = self.transformer.h[0].attn.kv_cache
        if cache is None:
            raise ValueError("input_pos needs a KV cache: call set_kv_cache(batch_size, max_seq_length) first")
        if input_pos < 0 or input_pos + T > cache.max_seq_length or B != cache.k.shape[0]:
            raise ValueError(
                f"{B} rows of {T} tokens at input_pos={input_pos} do not fit the KV cache of "
                f"{cache.k.shape[0]} rows x {cache.max_seq_length} slots; set a larger cache with set_kv_cache"
            )
        tables = (self.rope.cos, self.rope.sin) if self.rope is not None else None
        window = self.config.sliding_window
        return cached_step(input_pos, T, left_pad=left_pad, sliding_window=window, rope_tables=tables, device=device)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        reduction: str = "mean",
        *,
        input_pos: int | None = None,
        left_pad: torch.Tensor | None = None,
        last_only: bool = False,
        document_ids: torch.Tensor | None = None,
        head_fn: HeadFn | None = None,
    ) -> Any:
        """Logits (B, T, padded_vocab), or with ``targets`` the cross-entropy over targets != -100
        (``reduction`` "mean", "sum" or "none", as in ``fused_linear_cross_entropy``). ``last_only``: the
        logits of the last position only, (B, 1, padded_vocab): what decoding needs (a prompt's prefill then
        skips T - 1 rows of the head).

        With ``input_pos`` (an int) the T tokens are the cache slots input_pos..input_pos+T-1: their keys and
        values are stored, and they attend to every earlier slot (the prompt in one forward, then one token
        per call). ``left_pad`` (B,) is the number of padding slots at the start of each row.

        ``document_ids`` (B, T), integers non-decreasing along each row: several documents per row (packed
        examples, or a pretraining block across EOS boundaries). A position attends only to earlier positions
        of its own document, and positions restart at 0 at each document start (litliger/model/documents.py).
        Without them the forward is exactly the plain causal one.

        ``head_fn(hidden, weight, bias)``: what the LM head computes instead of the logits or the cross-entropy,
        with this model's (hidden, weight, bias) as the fused ops take them (a LoRA adapter on the head folded
        in): the preference and distillation losses, or the hidden states of a teacher. It runs inside the
        forward, so wrappers (DDP, FSDP2's unsharded root parameters) see one ordinary forward.
        """
        x = self.hidden_states(idx, input_pos=input_pos, left_pad=left_pad, document_ids=document_ids)
        if last_only and targets is None:
            x = x[:, -1:]
        weight, bias = self.head()
        if self.lm_head is not None and self.lm_head.adapted:
            x, weight = self.lm_head.fold_lora(x)  # (B, T, C + r), (V, C + r): logits and loss include LoRA
        if head_fn is not None:
            return head_fn(x, weight, bias)
        if targets is None:
            return F.linear(x, weight, bias)  # (B, T, padded_vocab_size)
        return fused_linear_cross_entropy(x, weight, targets, bias, reduction=reduction)

    # GPT.from_checkpoint(dir, device, dtype) is litliger.checkpoint.load.load_model, attached by the package
    # root: the model knows nothing of folder formats (full checkpoints, finetuning step folders).
