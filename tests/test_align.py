"""``litliger finetune --loss dpo|simpo|orpo|kd`` on CPU (litliger/recipes/align.py): the reference model of a LoRA
finetune (its adapters switched off), the metrics and checkpoints of a DPO run, exact resume, the precomputed and
cached reference table, SimPO and ORPO, the refusals, and distillation from a frozen teacher."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_finetune import (
    WORDS,
    cli,
    cli_args,
    keys,
    load_state_dict_file,
    losses,
    make_base,
    run,
    tiny_config,
    write_instructions,
)

import litliger.recipes.finetune as finetune_recipe
from litliger import GPT
from litliger.checkpoint import load_state_dict, parameter_state_dict, save_checkpoint
from litliger.checkpoint.checksums import write_checksums
from litliger.checkpoint.io import copy_tokenizer_files
from litliger.checkpoint.layout import FINETUNE_FILE, MODEL_FILE, TRAINABLE_FILE
from litliger.data import Instructions, Preferences, TextFiles, Tokenizer
from litliger.engine import EvalArgs
from litliger.model.lora import LoRAArgs, adapters_disabled, apply_lora, lora_parameter_names
from litliger.recipes.align import METRICS, DistillArgs, PreferenceArgs, reference_mode

TRAIN_METRICS = ["loss", *METRICS.values()]  # rewards/chosen ... logps/rejected


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("align")


@pytest.fixture(scope="module")
def base(root: Path) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LITLIGER_CACHE", str(root / "base-cache"))
        return make_base(root, tiny_config())


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_pairs(path: Path, n: int = 24, seed: int = 0) -> Path:
    """Pairs of the tiny vocabulary: repeat the words (chosen) or say them backwards and one more (rejected)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
            rejected = " ".join([*reversed(words), rng.choice(WORDS)])
            f.write(
                json.dumps({"prompt": "repeat " + " ".join(words), "chosen": " ".join(words), "rejected": rejected})
            )
            f.write("\n")
    return path


@pytest.fixture(scope="module")
def pairs(root: Path) -> Path:
    return write_pairs(root / "pairs.jsonl")


@pytest.fixture(scope="module")
def records(root: Path) -> Path:
    return write_instructions(root / "records.jsonl")


def preferences(pairs: Path) -> Preferences:
    return Preferences(json_path=pairs, val_split_fraction=0.2, seed=3)


def align(out: Path, base: Path, pairs: Path, *, steps: int, loss: str = "dpo", **kw) -> Path | None:
    """``run`` of test_finetune on the preference pairs with ``--loss loss``."""
    return run(out, base, None, steps=steps, loss=loss, data=kw.pop("data", None) or preferences(pairs), **kw)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def objective(folder: Path) -> dict:
    return yaml.safe_load((folder / FINETUNE_FILE).read_text())["objective"]


# ---------------------------------------------------------------- the reference of a LoRA finetune


def test_adapters_disabled_computes_the_base_model_exactly(base: Path) -> None:
    lora_model = GPT.from_checkpoint(base)
    names = apply_lora(lora_model, LoRAArgs(r=2, alpha=4, targets=("qkv", "proj", "mlp", "lm_head")))
    with torch.no_grad():
        for name in lora_parameter_names(lora_model):
            if name.endswith("lora_b"):
                lora_model.get_parameter(name).normal_(0, 0.5)  # nonzero: the adapters change the output
    lora_model.eval()
    plain = GPT.from_checkpoint(base).eval()
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        adapted = lora_model(idx)
        assert (adapted - plain(idx)).abs().max() > 1e-2
        with adapters_disabled(lora_model) as switched_off:
            assert switched_off == len(names) == 2 * 5 + 1  # qkv, proj, 3 MLP layers per block, the head
            assert torch.equal(lora_model(idx), plain(idx))  # bitwise: the base's computation, not a near copy
            hidden = lora_model(idx, head_fn=lambda x, w, b: (x, w))  # the head folds no adapter in either
            assert hidden[1].shape == plain.lm_head.weight.shape
        assert torch.equal(lora_model(idx), adapted)  # on again outside
    with pytest.raises(RuntimeError, match="inside"), adapters_disabled(lora_model):
        raise RuntimeError("inside")
    assert all(m.lora_enabled for m in lora_model.modules() if hasattr(m, "lora_enabled"))  # restored on error


def test_reference_mode_follows_the_method_and_the_trainable_set() -> None:
    auto = PreferenceArgs()
    assert reference_mode("dpo", "lora", (), auto) == "adapters"
    assert reference_mode("dpo", "lora", ("transformer.ln_f.weight",), auto) == "precomputed"
    assert reference_mode("dpo", "full", (), auto) == "precomputed"
    assert reference_mode("dpo", "lora", (), PreferenceArgs(reference="precomputed")) == "precomputed"
    assert reference_mode("simpo", "lora", (), auto) is None and reference_mode("orpo", "full", (), auto) is None
    assert reference_mode("sft", "lora", (), auto) is None and reference_mode("kd", "full", (), auto) is None


# ---------------------------------------------------------------- DPO with LoRA


@pytest.fixture(scope="module")
def dpo_lora(root: Path, base: Path, pairs: Path) -> Path:
    """A 4-step DPO-LoRA run: validation at steps 0 and 2, checkpoints at 2 and 4 (final)."""
    out = root / "dpo-lora"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LITLIGER_CACHE", str(root / "dpo-cache"))
        align(out, base, pairs, steps=4, save_interval=2, eval=dpo_eval())
    return out


def dpo_eval() -> EvalArgs:
    return EvalArgs(interval=2, max_iters=2, initial_validation=True, final_validation=False)


def test_dpo_lora_logs_rewards_and_stores_only_the_adapters(dpo_lora: Path) -> None:
    lines = metrics(dpo_lora)
    train = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    for m in train:
        assert all(math.isfinite(m[k]) for k in TRAIN_METRICS), m
        assert 0 <= m["rewards/accuracy"] <= 1 and m["logps/chosen"] < 0 and m["logps/rejected"] < 0
        assert m["rewards/margin"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-6)
    # the first step's policy is the reference (lora_b = 0): every reward is 0 and the loss log 2
    assert abs(train[0]["loss"] - math.log(2)) < 1e-6 and train[0]["rewards/margin"] == 0
    val = {m["step"]: m for m in lines if "val_loss" in m}
    assert sorted(val) == [0, 2]
    first = val[0]
    assert first["val_rewards/accuracy"] == 0.5 and abs(first["val_loss"] - math.log(2)) < 1e-6
    assert first["val_rewards/chosen"] == first["val_rewards/rejected"] == first["val_rewards/margin"] == 0
    assert all(f"val_{k}" in val[2] for k in METRICS.values()) and val[2]["val_loss"] != val[0]["val_loss"]

    step = dpo_lora / "step-00000002"
    assert not (step / MODEL_FILE).exists()  # as supervised LoRA: the frozen base is never stored again
    stored = keys(step / TRAINABLE_FILE)
    assert stored and all(".lora_" in k for k in stored) and len(stored) == 2 * 2 * 5
    assert keys(dpo_lora / "final" / TRAINABLE_FILE) == stored
    expected = {"loss": "dpo", "beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "reference": "adapters"}
    assert objective(step) == objective(dpo_lora / "final") == expected


def test_dpo_lora_resumes_exactly(tmp_path: Path, base: Path, pairs: Path, dpo_lora: Path) -> None:
    resumed = tmp_path / "resumed"
    align(resumed, base, pairs, steps=4, resume=dpo_lora / "step-00000002", eval=dpo_eval())
    a = {m["step"]: m for m in metrics(dpo_lora) if "loss" in m}
    b = {m["step"]: m for m in metrics(resumed) if "loss" in m}
    assert sorted(b) == [3, 4]
    for s in b:
        assert all(a[s][k] == b[s][k] for k in TRAIN_METRICS), (s, a[s], b[s])
    ta = load_state_dict_file(dpo_lora / "final" / TRAINABLE_FILE)
    tb = load_state_dict_file(resumed / "final" / TRAINABLE_FILE)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_dpo_checkpoint_does_not_resume_with_another_objective(tmp_path: Path, base, pairs, dpo_lora) -> None:
    with pytest.raises(ValueError, match=r"objective \{'loss': 'dpo', .*\} -> \{'loss': 'simpo', "):
        align(tmp_path / "out", base, pairs, steps=4, loss="simpo", resume=dpo_lora / "step-00000002")
    with pytest.raises(
        ValueError, match=r"objective \{'loss': 'dpo', 'beta': 0\.1, .*\} -> \{'loss': 'dpo', 'beta': 0\.2"
    ):
        align(tmp_path / "out2", base, pairs, steps=4, pref=PreferenceArgs(beta=0.2), resume=dpo_lora / "step-00000002")


# ---------------------------------------------------------------- DPO with the precomputed reference


def direct_logps(model: GPT, data: Preferences, split: str) -> np.ndarray:
    """(pairs, 2) summed log-probs of each side's targets: the model's logits, log_softmax, gather."""
    examples = data.examples(split)
    out = np.zeros((len(examples) // 2, 2))
    with torch.no_grad():
        for i, e in enumerate(examples):
            ids = torch.from_numpy(e.ids.astype(np.int64))
            logprobs = torch.log_softmax(model(ids[None, :-1])[0].double(), dim=-1)
            picked = logprobs.gather(1, ids[1:, None])[:, 0]
            out[i // 2, i % 2] = picked[torch.from_numpy(e.trained[1:])].sum().item()
    return out


def test_dpo_full_precomputes_the_reference_once_and_keys_it_by_the_base(
    tmp_path: Path, base: Path, pairs: Path, _private_cache: Path, capsys
) -> None:
    first = tmp_path / "first"
    align(first, base, pairs, steps=2, method="full")
    printed = capsys.readouterr().out
    entries = sorted((_private_cache / "reference").iterdir())
    assert len(entries) == 1
    entry = entries[0]
    assert {p.name for p in entry.iterdir()} == {"train.npy", "val.npy", "meta.json"}
    assert f"reference log-probs: computed for 24 pairs -> {entry}" in printed
    assert "DPO reference: precomputed" in printed
    assert objective(first / "final")["reference"] == "precomputed"

    assert abs(losses(first)[1] - math.log(2)) < 1e-6  # the table is the policy's own start: rewards 0

    second = tmp_path / "second"
    align(second, base, pairs, steps=2, method="full")
    assert f"reference log-probs: read from {entry}" in capsys.readouterr().out
    assert losses(first) == losses(second)  # the table read back is the table computed

    # the table is the base model's summed log-probs of each side's targets, chosen then rejected
    data = preferences(pairs)
    data.connect(Tokenizer.from_dir(base), batch_size=2, max_seq_length=60)
    data.select_prompt_style(base)
    data.setup()
    model = GPT.from_checkpoint(base).eval()
    for split in ("train", "val"):
        table = np.load(entry / f"{split}.npy")
        assert table.shape == (data.stats[split]["pairs"], 2) and table.dtype == np.float64
        np.testing.assert_allclose(table, direct_logps(model, data, split), rtol=0, atol=1e-5)
    assert json.loads((entry / "meta.json").read_text())["pairs"] == {"train": 19, "val": 5}

    # other base weights: another key, a table of its own
    moved = tmp_path / "other-base"
    shutil.copytree(base, moved)
    weights = load_state_dict(moved)
    weights["transformer.ln_f.weight"] += 0.5
    from safetensors.torch import save_file

    save_file(weights, str(moved / MODEL_FILE))
    write_checksums(moved)
    align(tmp_path / "third", moved, pairs, steps=0, method="full")
    assert "reference log-probs: computed for 24 pairs" in capsys.readouterr().out
    others = sorted(set((_private_cache / "reference").iterdir()) - {entry})
    assert len(others) == 1 and not np.array_equal(np.load(others[0] / "train.npy"), np.load(entry / "train.npy"))


def test_dpo_lora_with_trainable_extras_uses_the_precomputed_reference(tmp_path: Path, base, pairs, capsys) -> None:
    out = tmp_path / "out"
    final = align(out, base, pairs, steps=2, trainable=("transformer.ln_f.weight",))
    assert "DPO reference: precomputed" in capsys.readouterr().out
    assert objective(final)["reference"] == "precomputed"
    assert abs(losses(out)[1] - math.log(2)) < 1e-6  # LoRA starts as its base (lora_b = 0): the reference
    assert "transformer.ln_f.weight" in keys(out / "final" / TRAINABLE_FILE)


# ---------------------------------------------------------------- SimPO and ORPO


@pytest.mark.parametrize(("loss", "expected"), [("simpo", {"beta": 2.0, "gamma": 1.0}), ("orpo", {"beta": 0.1})])
def test_simpo_and_orpo_train_and_log_the_rewards(tmp_path: Path, base: Path, pairs: Path, loss, expected) -> None:
    out = tmp_path / loss
    final = align(out, base, pairs, steps=2, loss=loss, eval=EvalArgs(interval=None, max_iters=1))
    train = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in train] == [1, 2]
    assert all(math.isfinite(m[k]) for m in train for k in TRAIN_METRICS), train
    (val,) = [m for m in metrics(out) if "val_loss" in m]  # the final validation
    assert all(math.isfinite(val[f"val_{k}"]) for k in METRICS.values()) and math.isfinite(val["val_loss"])
    assert objective(final) == {"loss": loss, **expected, "reference": None}


# ---------------------------------------------------------------- refusals


def teacher_checkpoint(folder: Path, base: Path, *, edit_tokenizer: bool = False, **overrides) -> Path:
    """A larger tiny model with the base's tokenizer files (``edit_tokenizer``: another tokenizer.json)."""
    config = tiny_config(name="tiny-teacher", n_embd=64, n_head=4, intermediate_size=128, **overrides)
    torch.manual_seed(7)
    weights = parameter_state_dict(GPT(config))

    def tokenizer_files(target: Path) -> None:
        copy_tokenizer_files(base, target)
        if edit_tokenizer:  # the same vocabulary size, other ids: two entries swapped
            settings = json.loads((target / "tokenizer.json").read_text())
            vocab = settings["model"]["vocab"]
            a, b = sorted(vocab, key=vocab.get)[100:102]
            vocab[a], vocab[b] = vocab[b], vocab[a]
            (target / "tokenizer.json").write_text(json.dumps(settings))

    return save_checkpoint(folder, weights, config, save_tokenizer=tokenizer_files)


@pytest.fixture(scope="module")
def teacher(root: Path, base: Path) -> Path:
    return teacher_checkpoint(root / "teacher", base)


def test_refusals(tmp_path: Path, base: Path, pairs: Path, records: Path, teacher: Path) -> None:
    def refused(match: str, error: type = ValueError, **kw) -> None:
        with pytest.raises(error, match=match) as info:
            run(tmp_path / "out", base, records, steps=1, **kw)
        assert "\n" not in str(info.value)
        out = tmp_path / "out"
        assert not out.exists() or not any(p.name.startswith("step-") for p in out.iterdir())

    prefs = preferences(pairs)
    dpo = {"data": prefs, "loss": "dpo"}
    kd = {"loss": "kd", "method": "full"}
    adapters = PreferenceArgs(reference="adapters")
    refused(r"^--loss dpo trains on preference pairs, got Instructions, in --data; ", loss="dpo")
    refused(r"^Preferences holds preference pairs, which --loss sft does not train on, in --data; ", data=prefs)
    refused(
        r"^Preferences holds preference pairs, which --loss kd does not train on", data=prefs, **kd, teacher_dir=teacher
    )
    refused(r"^pref\.reference='adapters' switches LoRA adapters off, but --method full has none, in --pref\.reference",
            **dpo, method="full", pref=adapters)  # fmt: skip
    extras = ("transformer.ln_f.weight",)
    refused(r"^pref\.reference='adapters' cannot form the reference with train\.trainable="
            r"\['transformer\.ln_f\.weight'\]: ", **dpo, trainable=extras, pref=adapters)  # fmt: skip
    refused(r"^--loss kd needs a teacher, in --teacher_dir; ", **kd)
    refused(r"^--teacher_dir is for --loss kd, but this run's loss is sft; drop --teacher_dir", teacher_dir=teacher)
    refused(r"^--teacher_dir is for --loss kd, but this run's loss is dpo", **dpo, teacher_dir=teacher)
    refused(r"/nope is not a checkpoint folder \(model\.safetensors missing\), in --teacher_dir", FileNotFoundError,
            **kd, teacher_dir=tmp_path / "nope")  # fmt: skip
    other_vocab = teacher_checkpoint(tmp_path / "other-vocab", base, vocab_size=384)
    refused(r"^the teacher .*/other-vocab has vocab_size 384, the student 320: .*, in --teacher_dir; use a teacher",
            **kd, teacher_dir=other_vocab)  # fmt: skip
    other_tokenizer = teacher_checkpoint(tmp_path / "other-tokenizer", base, edit_tokenizer=True)
    refused(r"^the teacher .*/other-tokenizer has another tokenizer than the student \(fingerprint \w+ vs \w+\), in "
            r"--teacher_dir", **kd, teacher_dir=other_tokenizer)  # fmt: skip
    short = teacher_checkpoint(tmp_path / "short", base, block_size=32)
    refused(r"^the teacher's block_size 32 is shorter than the training sequences \(60\), in --teacher_dir; ",
            **kd, teacher_dir=short)  # fmt: skip


# ---------------------------------------------------------------- distillation


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_text_file(path: Path, lines: int = 40, seed: int = 1) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(30)) + "\n" for _ in range(lines)))
    return path


@pytest.mark.parametrize("data_kind", ["instructions", "tokens"])
def test_kd_trains_the_student_and_leaves_the_teacher(
    tmp_path: Path, base: Path, records: Path, teacher: Path, data_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    teachers = []
    real_setup_teacher = finetune_recipe.setup_teacher

    def keep(*args, **kwargs):
        teachers.append(real_setup_teacher(*args, **kwargs))
        return teachers[-1]

    monkeypatch.setattr(finetune_recipe, "setup_teacher", keep)
    before = digest(teacher / MODEL_FILE)
    if data_kind == "instructions":
        data = Instructions(json_path=records, val_split_fraction=0.1, seed=3)
    else:
        data = TextFiles(train_data_path=write_text_file(tmp_path / "text.txt"), val_split_fraction=0.2, seed=3)
    out = tmp_path / "kd"
    kd = DistillArgs(loss="jsd", beta=0.5, temperature=2.0, hard_weight=0.1)
    final = run(out, base, records, steps=2, method="full", loss="kd", kd=kd, teacher_dir=teacher, data=data,
                eval=EvalArgs(interval=None, max_iters=2))  # fmt: skip
    train = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in train] == [1, 2] and all(math.isfinite(m["loss"]) for m in train)
    (val,) = [m for m in metrics(out) if "val_loss" in m]
    assert val["step"] == 2 and math.isfinite(val["val_loss"])
    recorded = objective(final)
    assert recorded["loss"] == "kd" and recorded["teacher_dir"] == str(teacher.resolve())
    assert {k: recorded["kd"][k] for k in ("beta", "temperature", "hard_weight")} == {
        "beta": 0.5, "temperature": 2.0, "hard_weight": 0.1
    }  # fmt: skip
    trained = load_state_dict(final)
    assert any(not torch.equal(trained[k], v) for k, v in load_state_dict(base).items())  # the student learned

    # the teacher: frozen, unchanged in memory and on disk
    (used,) = teachers
    assert not any(p.requires_grad for p in used.model.parameters()) and not used.model.training
    stored = load_state_dict(teacher)
    assert all(torch.equal(p, stored[n]) for n, p in used.model.named_parameters())
    assert digest(teacher / MODEL_FILE) == before

    if data_kind == "instructions":  # val_loss is the student's own next-token loss, not the distillation loss
        data = Instructions(json_path=records, val_split_fraction=0.1, seed=3)
        data.connect(Tokenizer.from_dir(base), batch_size=2, max_seq_length=60)
        data.select_prompt_style(base)
        data.setup()
        student = GPT.from_checkpoint(final).eval()
        total = count = 0.0
        with torch.no_grad():
            for batch in islice(data.val_dataloader(), 2):
                total += student(batch["input_ids"], targets=batch["targets"], reduction="sum").item()
                count += int((batch["targets"] != -100).sum())
        assert val["val_loss"] == pytest.approx(total / count, rel=1e-5)


# ---------------------------------------------------------------- distillation, 2 processes


@pytest.mark.slow
def test_cli_kd_with_fsdp_shards_the_teacher_and_matches_one_process(tmp_path: Path, base, records, teacher) -> None:
    """The teacher sharded like the student (FSDP2, 2 CPU processes): the losses of one process, to rounding."""
    kd = ["--method", "full", "--loss", "kd", "--teacher_dir", str(teacher), "--kd.loss", "forward_kl",
          "--kd.hard_weight", "0.5", "--eval.max_iters", "2"]  # fmt: skip
    env = {"LITLIGER_CACHE": os.environ["LITLIGER_CACHE"]}
    one = cli([*cli_args(base, records, tmp_path / "one", 2), *kd], env)
    assert one.returncode == 0, one.stderr
    two = cli([*cli_args(base, records, tmp_path / "two", 2), *kd, "--devices", "2", "--strategy", "fsdp"], env)
    assert two.returncode == 0, two.stderr
    la, lb = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(la) == sorted(lb) == [1, 2]
    assert all(abs(la[s] - lb[s]) < 1e-4 * max(1.0, abs(la[s])) for s in la), (la, lb)
    (va,) = [m["val_loss"] for m in metrics(tmp_path / "one") if "val_loss" in m]
    (vb,) = [m["val_loss"] for m in metrics(tmp_path / "two") if "val_loss" in m]
    assert va == pytest.approx(vb, rel=1e-4)
    final = load_state_dict(tmp_path / "two" / "final")
    assert all(torch.allclose(final[k], v, atol=1e-4) for k, v in load_state_dict(tmp_path / "one" / "final").items())
