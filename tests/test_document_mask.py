# ruff: noqa: F811 (pytest fixtures imported from sibling test modules are redefined as arguments)
"""Document masking in pretraining: every token-stream module hands out document ids from the EOS
boundaries, the tokens stay what they were, and a masked run resumes exactly."""

import pytest
import torch
from test_mixture import mixture, sources, tok  # noqa: F401 (fixture)
from test_pretrain import assert_same_weights, corpus, losses, run  # noqa: F401 (fixture)

from litliger.data import TextFiles
from litliger.data.base import eos_document_ids


def _expected_ids(tokens: torch.Tensor, eos: int) -> list[list[int]]:
    rows = []
    for row in tokens[:, :-1].tolist():
        doc, ids = 0, []
        for t in row:
            ids.append(doc)
            doc += t == eos  # the EOS closes its document: the next position starts another
        rows.append(ids)
    return rows


def test_eos_document_ids():
    blocks = torch.tensor([[5, 0, 7, 0, 0, 3], [0, 1, 2, 3, 4, 5]]).numpy()
    assert eos_document_ids(blocks, 0).tolist() == [[0, 0, 1, 1, 2], [0, 1, 1, 1, 1]]


def _text_files(corpus, document_mask):
    data = TextFiles(train_data_path=corpus, val_split_fraction=0.15, seed=3, document_mask=document_mask)
    tokenizer = data.train_tokenizer(320)
    data.connect(tokenizer, batch_size=2, max_seq_length=16)
    data.prepare_data()
    data.setup()
    return data, tokenizer


def test_text_files_give_document_ids_and_the_same_tokens(corpus):
    plain, tokenizer = _text_files(corpus, False)
    masked, _ = _text_files(corpus, True)
    for make in ("train_dataloader", "val_dataloader"):
        expected = list(getattr(plain, make)())
        got = list(getattr(masked, make)())
        assert len(got) == len(expected) > 0
        for a, b in zip(expected, got, strict=True):
            assert torch.equal(b["tokens"], a)
            assert b["document_ids"].tolist() == _expected_ids(a, tokenizer.eos_id)
    assert any(len(set(row)) > 1 for b in masked.train_dataloader() for row in b["document_ids"].tolist())


def test_a_mixture_gives_document_ids_and_the_same_tokens(tok, tmp_path):
    srcs = sources(tmp_path)
    plain = mixture(tok, srcs)
    masked = mixture(tok, srcs, document_mask=True)
    for a, b, _ in zip(plain.train_dataloader(), masked.train_dataloader(), range(6), strict=False):
        assert torch.equal(b["tokens"], a)
        assert b["document_ids"].tolist() == _expected_ids(a, tok.eos_id)
    for name, loader in masked.val_dataloader().items():
        batch = next(iter(loader))
        assert batch["document_ids"].tolist() == _expected_ids(batch["tokens"], tok.eos_id), name


def test_masked_pretraining_resumes_exactly_and_differs_from_unmasked(tmp_path, corpus):
    def data(mask=True):
        return TextFiles(train_data_path=corpus, val_split_fraction=0.15, seed=3, document_mask=mask)

    straight = tmp_path / "straight"
    run(straight, corpus, steps=8, save_interval=3, data=data())
    resumed = tmp_path / "resumed"
    run(resumed, corpus, steps=8, resume=straight / "step-00000003", data=data())
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(4, 9)) and all(a[s] == b[s] for s in b), (a, b)
    assert_same_weights(straight / "final", resumed / "final")
    unmasked = tmp_path / "unmasked"
    run(unmasked, corpus, steps=3, data=data(False))
    assert any(losses(unmasked)[s] != a[s] for s in (1, 2, 3))  # the same tokens: the mask reached the model


def test_flex_attention_cannot_train_on_cpu_and_says_so_before_training(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("LITLIGER_ATTENTION", "flex")
    data = TextFiles(train_data_path=corpus, val_split_fraction=0.15, seed=3, document_mask=True)
    with pytest.raises(ValueError, match="LITLIGER_ATTENTION=flex cannot train on cpu"):
        run(tmp_path / "out", corpus, steps=2, data=data)
    assert not (tmp_path / "out" / "final").exists()
