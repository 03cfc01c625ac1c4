"""torch.compile through litliger's fused ops: the custom ops (litliger/kernels/_custom_ops.py) and the twins.

- every custom op passes ``torch.library.opcheck``: its fake implementation gives the shapes, strides and dtypes
  of the real one (the Triton kernels, on the interpreter here), its schema and autograd registration are sound;
- a compiled training step (torch backend, ``fullgraph=True``) gives eager's loss and gradients;
- the Triton path traces with ``fullgraph=True``: forward on fake CUDA tensors (no GPU needed), and forward +
  backward on meta tensors, each op one ``litliger::`` node of the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._subclasses.fake_tensor import FakeTensorMode

from litliger.kernels import use_backend
from litliger.kernels._custom_ops import OPS
from litliger.model.config import Config
from litliger.model.gpt import GPT

ops = torch.ops.litliger


def _rand(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _samples() -> dict[str, list[tuple]]:
    """Arguments per op: small and awkward (non-contiguous, half precision), forward ops with inputs that require
    grad (opcheck then checks their autograd registration), backward ops from their forward's saved tensors."""
    torch.manual_seed(0)
    x, r, w = _rand(3, 5, 16, grad=True), _rand(3, 5, 16, grad=True), _rand(16, grad=True)
    xh = _rand(4, 24, dtype=torch.bfloat16, grad=True)
    y, s, rstd = ops.rms_norm(x.detach(), r.detach(), w.detach(), 1e-6, 1.0)
    _, ln_mean, ln_rstd = ops.layer_norm(x.detach(), w.detach(), w.detach(), 1e-5)
    q = _rand(2, 8, 4, 16).transpose(1, 2).requires_grad_()  # (B, nh, T, hs) as a view of (B, T, nh, hs)
    k = _rand(2, 8, 2, 16).transpose(1, 2).requires_grad_()
    cos, sin = _rand(8, 12), _rand(8, 12)
    gate, up = _rand(3, 5, 24, grad=True), _rand(3, 5, 24, grad=True)
    logits, targets = _rand(6, 50, grad=True), torch.tensor([3, -100, 49, 0, 7, 1])
    _, lse = ops.cross_entropy(logits.detach(), targets, -100, 0.1, 1e-4)
    hidden, head, bias = _rand(2, 3, 16, grad=True), _rand(50, 16, grad=True), _rand(50, grad=True)
    t2 = targets.view(2, 3)
    flce_none = ops.fused_linear_cross_entropy(
        hidden.detach(), head.detach(), t2, None, -100, "none", 0, 0, 4, 0, 0, 0, 1
    )
    rows = hidden.detach().reshape(-1, 16)
    pairs = _rand(4, 3, 16, grad=True)  # 2 pairs of 3 tokens: chosen rows first
    pair_targets = torch.tensor([[-100, 3, 7], [-100, -100, 49], [-100, 0, 1], [-100, 5, 5]])
    ref = torch.tensor([-9.0, -11.0, -10.0, -8.5])
    kd, teacher_bias = (_rand(2, 3, 12), _rand(50, 12)), _rand(50)  # the teacher's hidden and head; its bias
    return {
        "rms_norm": [
            (x, None, w, 1e-6, 0.0),
            (x, r, w, 1e-6, 1.0),
            (xh, None, _rand(24, dtype=torch.bfloat16), 1e-6, 0.0),
        ],
        "rms_norm_bwd": [
            (torch.randn_like(y), s, w.detach(), rstd, 1.0, torch.randn_like(s), c) for c in (True, False)
        ],
        "layer_norm": [(x, w, w, 1e-5), (xh, _rand(24, dtype=torch.bfloat16), None, 1e-5)],
        "layer_norm_bwd": [
            (torch.randn_like(y), x.detach(), w.detach(), w.detach(), ln_mean, ln_rstd, c, c) for c in (True, False)
        ],
        "rope": [(q, k, cos, sin, False), (q.detach(), k.detach(), cos, sin, True)],
        "glu": [(gate, up, a) for a in (0, 1, 2)] + [(xh, xh.detach().clone().requires_grad_(), 0)],
        "glu_bwd": [(torch.randn_like(gate), gate.detach(), up.detach(), a) for a in (0, 1, 2)],
        "cross_entropy": [(logits, targets, -100, 0.0, 0.0), (logits, targets, -100, 0.1, 1e-4)],
        "cross_entropy_bwd": [(logits.detach(), targets, lse, torch.rand(6), -100, 0.1, 1e-4)],
        "fused_linear_cross_entropy": [
            (hidden, head, t2, bias, -100, reduction, 0.1, 1e-4, 4, True, True, True, triton)
            for reduction in ("mean", "sum", "none")
            for triton in (True, False)
        ],
        "fused_linear_cross_entropy_bwd": [
            (rows, head.detach(), targets, None, flce_none[1], torch.rand(6), -100, 0.0, 0.0, 4, True, True, False, tr)
            for tr in (True, False)
        ],
        # (hs, ws, bs, ht, wt, bt, targets, kind, beta, temperature, hard_weight, ignore_index, chunk_size,
        #  need_hidden, need_weight, need_bias, triton_path): the need flags as the public op sets them
        "fused_linear_distillation": [
            (hidden, head, bias, *kd, teacher_bias, t2, "jsd", 0.3, 1.5, 0.5, -100, 4, True, True, True, tr)
            for tr in (True, False)
        ]
        + [
            (hidden, head.detach(), None, *kd, None, t2, kind, 0.5, 1.0, 0.0, -100, None, True, False, False, tr)
            for kind, tr in (("forward_kl", True), ("reverse_kl", False))
        ],
        # (x, weight, targets, bias, ref_logps, loss, beta, loss_type, label_smoothing, gamma, ignore_index,
        #  pairs per chunk, need_hidden, need_weight, need_bias, triton): the one-pass walk over chunks of pairs
        "fused_linear_preference": [
            (pairs, head, pair_targets, bias, ref, "dpo", 0.1, "sigmoid", 0.1, 1.0, -100, 1, True, True, True, tr)
            for tr in (True, False)
        ]
        + [
            (
                pairs,
                head.detach(),
                pair_targets,
                None,
                None,
                loss,
                2.0,
                "sigmoid",
                0.0,
                0.5,
                -100,
                2,
                True,
                False,
                False,
                tr,
            )
            for loss, tr in (("simpo", True), ("orpo", False))
        ],
    }


def test_every_custom_op_is_sampled() -> None:
    registered = {name for name in dir(ops) if isinstance(getattr(ops, name), torch._ops.OpOverloadPacket)}
    assert set(OPS) == registered == set(_samples())


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name: str) -> None:
    """Fake vs real outputs (shape, strides, dtype), schema, autograd registration, AOT dispatch."""
    op = getattr(ops, name)
    with use_backend("triton"):
        for args in _samples()[name]:
            torch.library.opcheck(op, args)


def _grads(model: torch.nn.Module, fn: Callable, idx: torch.Tensor, targets: torch.Tensor) -> tuple:
    model.zero_grad(set_to_none=True)
    loss = fn(idx, targets=targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["debug-llama", "debug-pythia", "debug-gpt2"])
def test_compiled_training_step_matches_eager(name: str) -> None:
    """Torch backend (the CPU path), fullgraph: a graph break or a wrong trace fails here."""
    torch.manual_seed(0)
    config = Config.from_name(name, n_layer=2)
    model = GPT(config)
    idx, targets = torch.randint(0, config.vocab_size, (2, 2, 48))
    targets[0, :5] = -100
    torch._dynamo.reset()
    with use_backend("torch"):
        loss, grads = _grads(model, model, idx, targets)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        c_loss, c_grads = _grads(model, compiled, idx, targets)
    torch.testing.assert_close(c_loss, loss, atol=1e-5, rtol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(c_grads[n], g, atol=1e-5, rtol=1e-5, msg=n)


def _graph_recorder() -> tuple[Callable, list[torch.fx.GraphModule]]:
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, _inputs: list) -> Callable:
        graphs.append(gm)
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep), graphs


def _litliger_nodes(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target).split(".")[1] for n in gm.graph.nodes if str(n.target).startswith("litliger.")}


LLAMA_FWD = {"rms_norm", "rope", "glu", "fused_linear_cross_entropy"}


@pytest.mark.parametrize(("name", "fwd_ops"), [("debug-llama", LLAMA_FWD), ("debug-pythia", {"layer_norm", "rope"})])
def test_triton_path_traces_forward_on_fake_cuda_tensors(name: str, fwd_ops: set[str]) -> None:
    """As on a GPU (backend auto, CUDA tensors), with no GPU: fake CUDA tensors. PyTorch's autograd engine needs
    a real device for a CUDA backward, so the backward is traced on meta tensors (next test)."""
    with torch.device("meta"):
        model = GPT(Config.from_name(name, n_layer=2))
    backend, graphs = _graph_recorder()
    torch._dynamo.reset()
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        model.to_empty(device="cuda")
        idx = torch.randint(0, 100, (2, 32), device="cuda")
        loss = torch.compile(model, fullgraph=True, backend=backend)(idx, targets=idx)
    assert loss.device.type == "cuda" and loss.shape == ()
    assert fwd_ops <= _litliger_nodes(graphs[0])


def test_triton_path_traces_forward_and_backward_on_meta_tensors() -> None:
    with torch.device("meta"):
        model = GPT(Config.from_name("debug-llama", n_layer=2))
    idx = torch.randint(0, 100, (2, 32), device="meta")
    backend, graphs = _graph_recorder()
    torch._dynamo.reset()
    with use_backend("triton"):
        loss = torch.compile(model, fullgraph=True, backend=backend)(idx, targets=idx)
        loss.backward()
    assert model.transformer.wte.weight.grad.shape == model.transformer.wte.weight.shape
    fwd, bwd = graphs
    assert LLAMA_FWD <= _litliger_nodes(fwd)
    assert {"rms_norm_bwd", "rope", "glu_bwd"} <= _litliger_nodes(bwd)


def test_setup_model_compiles_in_place() -> None:
    """``--compile``: the engine compiles the model in place, so parameter names (checkpoints) do not change, and
    a training step (forward + backward, inductor as the engine uses it) gives eager's loss and gradients."""
    from torch._dynamo.utils import counters

    from litliger.engine import make_fabric, setup_model, unwrap

    fabric = make_fabric(accelerator="cpu")
    config = Config.from_name("debug-llama", n_layer=1)
    torch._dynamo.reset()
    counters.clear()
    model = setup_model(fabric, lambda: GPT(config), seed=0, resuming=False, compile=True)
    assert unwrap(model)._compiled_call_impl is not None
    assert next(iter(unwrap(model).state_dict())) == "transformer.wte.weight"
    plain = setup_model(fabric, lambda: GPT(config), seed=0, resuming=False)
    assert unwrap(plain)._compiled_call_impl is None
    for (n, p), (n2, p2) in zip(unwrap(model).named_parameters(), unwrap(plain).named_parameters(), strict=True):
        assert n == n2 and torch.equal(p, p2), n
    idx, targets = torch.randint(0, config.vocab_size, (2, 2, 32), generator=torch.Generator().manual_seed(0))
    targets[0, :5] = -100
    loss, grads = _grads(plain, plain, idx, targets)
    c_loss, c_grads = _grads(model, model, idx, targets)
    assert counters["frames"]["ok"] >= 1 and counters["stats"]["unique_graphs"] == 1  # it ran compiled, in one graph
    torch.testing.assert_close(c_loss, loss, atol=1e-5, rtol=1e-5)
    assert c_grads.keys() == grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(c_grads[n], g, atol=1e-5, rtol=1e-5, msg=n)
