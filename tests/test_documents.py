"""Document masking in the model: a document inside a packed row computes what it computes alone."""

import pytest
import torch
from test_model import FAMILIES, tiny_config

from litliger import GPT
from litliger.kernels import use_backend
from litliger.model.documents import dense_mask, document_positions

LENGTHS = (5, 8, 3)  # three documents in a row of 16 (mistral's window is 6: the long one crosses it)


def _packed_row(config, generator):
    docs = [torch.randint(0, config.vocab_size, (n + 1,), generator=generator) for n in LENGTHS]
    idx = torch.cat([d[:-1] for d in docs])[None]  # (1, 16)
    targets = torch.cat([d[1:] for d in docs])[None]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])[None]
    return docs, idx, targets, ids


@pytest.mark.parametrize("family", FAMILIES)
def test_a_document_in_a_packed_row_has_its_loss_alone(family):
    torch.manual_seed(0)
    config = tiny_config(family)
    model = GPT(config)
    docs, idx, targets, ids = _packed_row(config, torch.Generator().manual_seed(1))
    with use_backend("torch"), torch.no_grad():
        packed = model(idx, targets=targets, reduction="none", document_ids=ids)[0]  # (16,)
        start = 0
        for doc in docs:
            n = len(doc) - 1
            alone = model(doc[None, :-1], targets=doc[None, 1:], reduction="none")[0]
            torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=0)
            start += n
        # without the mask the later documents see the earlier ones: the test can tell the difference
        unmasked = model(idx, targets=targets, reduction="none")[0]
        assert (unmasked[LENGTHS[0] :] - packed[LENGTHS[0] :]).abs().max() > 1e-3


def test_the_triton_kernels_agree_on_a_packed_row():
    """The kernel path (rotary at restarted per-row positions through the fused kernel) as the twin path."""
    torch.manual_seed(0)
    config = tiny_config("qwen3")
    model = GPT(config)
    _, idx, targets, ids = _packed_row(config, torch.Generator().manual_seed(2))
    idx, targets, ids = idx.repeat(2, 1), targets.repeat(2, 1), ids.repeat(2, 1)
    ids[1] = torch.tensor([0] * 10 + [1] * 6)  # another split in the second row
    losses = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with use_backend(backend):
            loss = model(idx, targets=targets, document_ids=ids)
            loss.backward()
        losses[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(losses["triton"][0], losses["torch"][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(losses["triton"][1], losses["torch"][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_one_document_per_row_is_the_plain_causal_forward():
    torch.manual_seed(0)
    config = tiny_config("mistral")  # sliding window: the window alone, no document boundary
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    with use_backend("torch"), torch.no_grad():
        plain = model(idx)
        one = model(idx, document_ids=torch.zeros_like(idx))
    torch.testing.assert_close(one, plain, atol=1e-5, rtol=1e-5)


def test_flex_attention_matches_the_dense_mask(monkeypatch):
    """The CUDA path's block mask (FlexAttention's unfused reference on CPU, forward only) against SDPA's."""
    torch.manual_seed(0)
    config = tiny_config("mistral")  # grouped queries and a sliding window combined with the documents
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    ids = torch.tensor([[0] * 9 + [1] * 7, [0] * 3 + [1] * 3 + [2] * 10])
    results = {}
    for path in ("sdpa", "flex"):
        monkeypatch.setenv("LITLIGER_ATTENTION", path)
        with use_backend("torch"), torch.no_grad():
            results[path] = model(idx, document_ids=ids)
    torch.testing.assert_close(results["flex"], results["sdpa"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="FlexAttention has no backward"):
        model(idx, targets=idx, document_ids=ids)  # flex, with gradients, on CPU


def test_positions_and_mask_follow_the_documents():
    ids = torch.tensor([[0, 0, 0, 3, 3, 7]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = dense_mask(ids, sliding_window=2)[0, 0].int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],  # the window of 2 drops position 0
        [0, 0, 0, 1, 0, 0],  # a new document sees only itself
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (torch.tensor([[0, 0, 1, 0]]), r"non-decreasing .* row 0 goes from 1 to 0 at position 3"),
        (torch.tensor([[0, 0, 1]]), r"shaped like the tokens \(1, 4\)"),
        (torch.tensor([[0.0, 0.0, 1.0, 1.0]]), "must be integers"),
    ],
)
def test_bad_document_ids_are_refused(ids, match):
    config = tiny_config("llama")
    model = GPT(config)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(1, 4, dtype=torch.long), document_ids=ids)


def test_document_ids_are_refused_with_the_kv_cache():
    model = GPT(tiny_config("llama"))
    model.set_kv_cache(1, 8)
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="leave document_ids out"):
        model(idx, input_pos=0, document_ids=torch.zeros_like(idx))
