"""``litliger evaluate``: loss and perplexity over a validation split equal a direct computation, are
deterministic, reach stdout and --out_file, and mask instruction prompts; the lm_eval scoring functions."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_finetune import make_base, tiny_config, write_instructions

from litliger import GPT
from litliger.cli import main as cli_main
from litliger.data import Instructions, TextFiles, Tokenizer
from litliger.eval.evaluate import main as evaluate
from litliger.eval.scoring import continuation_logprob, rolling_logprob


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("evaluate"), tiny_config())


def text_data(base: Path) -> TextFiles:
    return TextFiles(train_data_path=base.parents[1] / "corpus", val_split_fraction=0.2)


def test_loss_and_perplexity_of_the_validation_split(base, tmp_path, capsys):
    argv = ["evaluate", str(base), "--data", "litliger.data.TextFiles", "--data.train_data_path",
            str(base.parents[1] / "corpus"), "--data.val_split_fraction", "0.2", "--max_seq_length", "16",
            "--batch_size", "3", "--device", "cpu", "--out_file", str(tmp_path / "eval.json")]  # fmt: skip
    cli_main(argv)
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "eval.json").read_text()) == printed
    assert printed["perplexity"] == pytest.approx(math.exp(printed["loss"]))
    # the same number computed directly: every token of every validation block after its first
    model, data = GPT.from_checkpoint(base).eval(), text_data(base)
    data.connect(Tokenizer.from_dir(base), batch_size=3, max_seq_length=16)
    data.prepare_data()
    data.setup()
    losses = []
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = model(batch[:, :-1])
            losses.append(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none"))
    losses = torch.cat(losses)
    assert printed["tokens"] == losses.numel() > 0
    assert printed["loss"] == pytest.approx(losses.double().mean().item(), rel=1e-6)
    cli_main(argv)  # deterministic: a second run gives the same figures
    again = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in printed.items() if k != "seconds"}


def test_instruction_data_counts_only_the_responses(base, tmp_path):
    records = write_instructions(tmp_path / "records.jsonl", n=20)
    masked = evaluate(base, data=Instructions(json_path=records, val_split_fraction=0.3), max_seq_length=60,
                      device="cpu")  # fmt: skip
    whole = evaluate(base, data=Instructions(json_path=records, val_split_fraction=0.3, mask_prompt=False),
                     max_seq_length=60, device="cpu")  # fmt: skip
    assert 0 < masked["tokens"] < whole["tokens"]
    assert masked["loss"] != whole["loss"] and math.isfinite(masked["loss"])


def test_continuation_and_rolling_log_probabilities():
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=16)).eval()
    ids = torch.randint(0, 300, (12,)).tolist()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
    expected = logprobs[4:].gather(1, torch.tensor(ids[5:])[:, None]).sum().item()
    score, greedy = continuation_logprob(model, ids[:5], ids[5:])
    assert score == pytest.approx(expected, rel=1e-5)
    assert greedy == (logprobs[4:].argmax(-1) == torch.tensor(ids[5:])).all().item()
    # a text is scored after `first` in windows of max_seq_length tokens (lm_eval's rolling windows): the
    # first window's inputs are `first` and the text, each later one the 16 tokens before its predictions
    text = torch.randint(0, 300, (40,)).tolist()
    tokens = torch.tensor([0, *text])

    def window(inputs: slice, predicted: slice) -> float:
        with torch.no_grad():
            lp = torch.log_softmax(model(tokens[None, inputs])[0], dim=-1)
        targets = tokens[predicted]
        return lp[-len(targets) :].gather(1, targets[:, None]).sum().item()

    expected = (
        window(slice(0, 16), slice(1, 17)) + window(slice(16, 32), slice(17, 33)) + window(slice(24, 40), slice(33, 41))
    )
    assert rolling_logprob(model, text, first=0) == pytest.approx(expected, rel=1e-5)


def test_lm_eval_model(base):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from litliger.eval.lm_eval import LitligerLM

    lm = LitligerLM(checkpoint_dir=base, device="cpu")
    request = lambda kind, args: Instance(request_type=kind, doc={}, arguments=args, idx=0)
    [(score, _)] = lm.loglikelihood([request("loglikelihood", ("alpha beta", " gamma"))])
    assert score < 0
    [rolling] = lm.loglikelihood_rolling([request("loglikelihood_rolling", ("alpha beta gamma",))])
    assert rolling < score
    [text] = lm.generate_until([request("generate_until", ("alpha", {"until": ["\n"], "max_gen_toks": 5}))])
    assert "\n" not in text


TINY_DOCS = [
    {"question": "alpha beta", "choices": ["gamma", "delta"], "label": 0},
    {"question": "beta gamma", "choices": ["delta", "alpha"], "label": 0},
    {"question": "gamma delta", "choices": ["alpha", "epsilon"], "label": 1},
    {"question": "delta epsilon", "choices": ["zeta", "beta", "eta"], "label": 2},
]


def write_tiny_task(tmp_path, monkeypatch) -> tuple[list[dict], Path]:
    """A multiple-choice lm_eval task ``litliger_tiny`` on local JSON lines (nothing downloaded): (docs, its YAML)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in TINY_DOCS))
    (tmp_path / "tiny.yaml").write_text(
        "task: litliger_tiny\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'tiny.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
        "    aggregation: mean\n    higher_is_better: true\n"
    )
    return TINY_DOCS, tmp_path / "tiny.yaml"


def expected_accuracy(base, lm, docs: list[dict]) -> float:
    """The accuracy the model's own log-likelihoods give (lm_eval's default delimiter: a space before a choice)."""
    model = GPT.from_checkpoint(base).eval()
    scores = lambda d: [continuation_logprob(model, *lm.split(d["question"], " " + c))[0] for c in d["choices"]]
    best = [max(range(len(d["choices"])), key=scores(d).__getitem__) for d in docs]
    return sum(b == d["label"] for b, d in zip(best, docs, strict=True)) / len(docs)


def test_lm_eval_runs_a_local_task(base, tmp_path, monkeypatch):
    """``lm_eval.simple_evaluate`` on a multiple-choice task written here (local JSON, nothing downloaded):
    its accuracy is the one the model's own log-likelihoods give."""
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from litliger.eval.lm_eval import LitligerLM

    docs, _ = write_tiny_task(tmp_path, monkeypatch)
    lm = LitligerLM(checkpoint_dir=base, device="cpu")
    tasks = TaskManager(include_path=str(tmp_path))
    results = lm_eval.simple_evaluate(model=lm, tasks=["litliger_tiny"], task_manager=tasks, log_samples=True)
    model = GPT.from_checkpoint(base).eval()

    def scores(doc: dict) -> list[float]:  # log P(" " + choice | question): lm_eval's default delimiter
        return [continuation_logprob(model, *lm.llm.split(doc["question"], " " + c))[0] for c in doc["choices"]]

    for sample in results["samples"]["litliger_tiny"]:  # every request lm_eval made, scored as the model does
        assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx(scores(docs[sample["doc_id"]]), rel=1e-5)
    assert results["results"]["litliger_tiny"]["acc,none"] == pytest.approx(expected_accuracy(base, lm.llm, docs))


def test_evaluate_tasks_writes_lm_evals_results_and_prints_its_table(base, tmp_path, monkeypatch, capsys):
    """``litliger evaluate CHECKPOINT --tasks tiny.yaml``: lm_eval's JSON and table, the same accuracy."""
    pytest.importorskip("lm_eval")
    from litliger.inference.llm import LLM

    docs, task = write_tiny_task(tmp_path, monkeypatch)
    out = tmp_path / "results" / "tiny.json"
    evaluate(base, tasks=[str(task)], limit=3, out_file=out, device="cpu")
    written = json.loads(out.read_text())
    assert written["results"]["litliger_tiny"]["acc,none"] == pytest.approx(
        expected_accuracy(base, LLM.load(base, device="cpu"), docs[:3])
    )
    assert written["config"]["checkpoint_dir"] == str(base) and written["n-samples"]["litliger_tiny"]["effective"] == 3
    table = capsys.readouterr().out
    assert "litliger_tiny" in table and "|acc" in table.replace(" ", "") and f"wrote {out}" in table
    with pytest.raises(ValueError, match="unknown lm_eval task 'no_such_task_xyz', in --tasks"):
        evaluate(base, tasks=["no_such_task_xyz"], out_file=tmp_path / "x.json", device="cpu")
    with pytest.raises(ValueError, match="--limit and --num_fewshot are for lm_eval tasks"):
        evaluate(base, limit=3, device="cpu")
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'litliger\[eval\]'"):
        evaluate(base, tasks=[str(task)], out_file=tmp_path / "y.json", device="cpu")
