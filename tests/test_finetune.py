"""``litliger finetune`` on CPU: trainable-only checkpoints, merge, exact resume, the loss normalisation,
raw parameters selected by name, bad input, and 2-process DDP/FSDP runs."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from litliger import GPT, Config
from litliger.checkpoint import load_state_dict
from litliger.checkpoint.checksums import write_checksums
from litliger.checkpoint.finetuned import load_finetuned, merge_lora_checkpoint
from litliger.checkpoint.layout import FINETUNE_FILE, MODEL_FILE, TRAINABLE_FILE
from litliger.data import Instructions, TextFiles
from litliger.engine import EvalArgs, OptimizerArgs, TrainArgs
from litliger.inference.sampling import SampleArgs
from litliger.model.lora import LoRAArgs
from litliger.recipes.finetune import FinetuneTrainArgs, build_finetune_model
from litliger.recipes.finetune import setup as finetune
from litliger.recipes.pretrain import setup as pretrain

REPO = Path(__file__).resolve().parents[1]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()  # noqa: SIM905


def tiny_config(**overrides) -> Config:
    values = dict(
        name="tiny",
        block_size=64,
        vocab_size=320,
        padding_multiple=64,
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_query_groups=1,
        intermediate_size=64,
        norm_class="RMSNorm",
        mlp_class="SwiGLUMLP",
        bias=False,
    )
    return Config(**{**values, **overrides})


def gpt2_config() -> Config:
    return tiny_config(
        name="tiny-gpt2",
        norm_class="LayerNorm",
        mlp_class="GeluMLP",
        bias=True,
        n_query_groups=2,
        rotary_fraction=0.0,
        learned_pos_embeddings=True,
        tie_embeddings=True,
    )


def make_base(root: Path, config: Config) -> Path:
    """A pretrained-looking base: a seed checkpoint with a BPE tokenizer trained on a tiny corpus."""
    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(80)) + "\n")
    train = TrainArgs(global_batch_size=2, micro_batch_size=2, max_seq_length=16, max_steps=0)
    final = pretrain(
        model_config=config,
        out_dir=root / "base",
        accelerator="cpu",
        data=TextFiles(train_data_path=corpus, val_split_fraction=0.2),
        train=train,
        eval=EvalArgs(interval=None, final_validation=False),
    )
    # a short chat template, so that prompts fit the tiny block size (and the template path is what trains)
    tokenizer_config = final / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text()) if tokenizer_config.exists() else {}
    settings["chat_template"] = CHAT_TEMPLATE
    tokenizer_config.write_text(json.dumps(settings))
    write_checksums(final)  # a deliberate edit, recorded (an unrecorded one is refused: tests/test_trust.py)
    return final


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role[0] }}: {{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}"
    "\n{% endfor %}{% if add_generation_prompt %}a: {% endif %}"
)


def write_instructions(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 6))]
            record = {"instruction": f"repeat {' '.join(words)}", "output": " ".join(words * rng.randint(1, 3))}
            if i % 3 == 0:
                record["input"] = rng.choice(WORDS)
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    os.environ["LITLIGER_CACHE"] = str(root / "cache")
    return make_base(root, tiny_config())


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return write_instructions(tmp_path_factory.mktemp("data") / "records.jsonl")


def run(out: Path, base: Path, records: Path, *, steps: int | None, **kw) -> Path | None:
    train = FinetuneTrainArgs(
        global_batch_size=4,
        micro_batch_size=2,
        max_seq_length=60,
        max_steps=steps,
        epochs=kw.pop("epochs", None),
        lr_warmup_steps=1,
        save_interval=kw.pop("save_interval", None),
        trainable=kw.pop("trainable", ()),
        max_norm=kw.pop("max_norm", 1.0),
    )
    return finetune(
        checkpoint_dir=base,
        out_dir=out,
        accelerator="cpu",
        data=kw.pop("data", None) or Instructions(json_path=records, val_split_fraction=0.1, seed=3),
        train=train,
        eval=kw.pop("eval", EvalArgs(interval=None, max_iters=2, final_validation=False)),
        optimizer=kw.pop("optimizer", OptimizerArgs(lr=1e-2, weight_decay=0.0)),
        lora=kw.pop("lora", LoRAArgs(r=4, alpha=8, dropout=0.1)),
        seed=1,
        **kw,
    )


def losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return sorted(f.keys())


def test_lora_checkpoints_hold_only_the_adapters_and_final_the_merged_model(tmp_path, base, records):
    out = tmp_path / "out"
    final = run(out, base, records, steps=4, save_interval=2, sample=SampleArgs(max_new_tokens=5))
    step = out / "step-00000002"
    assert not (step / MODEL_FILE).exists()  # the frozen base is never stored again
    lora_names = sorted(n for n, _ in load_finetuned(step).named_parameters() if ".lora_" in n)
    assert keys(step / TRAINABLE_FILE) == lora_names and len(lora_names) == 2 * 2 * 5  # qkv, proj, 3 MLP layers
    assert {"tokenizer.json", FINETUNE_FILE, "model_config.yaml", "training_state"} <= {p.name for p in step.iterdir()}
    base_size = (base / MODEL_FILE).stat().st_size
    assert (step / TRAINABLE_FILE).stat().st_size < base_size / 3
    # the optimizer state is the adapters' only
    from litliger.engine.state_codec import load_state

    state_keys = list(load_state(step / "training_state" / "rank00000")["optimizer"]["state"])
    assert state_keys and all(".lora_" in k for k in state_keys), state_keys[:4]
    # final/: the adapters plus the merged model, loadable by every command as a plain checkpoint
    assert final == out / "final" and keys(final / MODEL_FILE) == keys(base / MODEL_FILE)
    unmerged = load_finetuned(final).eval()
    merged = GPT.from_checkpoint(final).eval()
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), unmerged(idx), atol=1e-5, rtol=0)
        assert (merged(idx) - GPT.from_checkpoint(base)(idx)).abs().max() > 1e-3  # training changed something
    # merge_lora on a step folder gives a complete folder equal to loading the step unmerged
    merged_step = merge_lora_checkpoint(step, tmp_path / "merged")
    with torch.no_grad():
        from_step = GPT.from_checkpoint(step).eval()(idx)
        torch.testing.assert_close(GPT.from_checkpoint(merged_step)(idx), from_step, atol=1e-5, rtol=0)


def test_zero_steps_merges_to_the_base(tmp_path, base, records):
    final = run(tmp_path / "out", base, records, steps=0)
    merged, original = load_state_dict(final), load_state_dict(base)
    assert merged.keys() == original.keys() and all(torch.equal(merged[k], original[k]) for k in merged)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_exact_resume_across_an_epoch_boundary(tmp_path, base, records, method):
    # 36 training records / (2 x 2 per step) = 9 steps an epoch: the cut at 7 resumes before the boundary at 9
    straight = tmp_path / "straight"
    run(straight, base, records, steps=12, save_interval=7, method=method)
    resumed = tmp_path / "resumed"
    run(resumed, base, records, steps=12, resume=straight / "step-00000007", method=method)
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(8, 13)) and all(a[s] == b[s] for s in b), (a, b)
    trained = TRAINABLE_FILE if method == "lora" else MODEL_FILE  # a full finetune's final/ stores the weights once
    ta = load_state_dict_file(straight / "final" / trained)
    tb = load_state_dict_file(resumed / "final" / trained)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_step_loss_is_normalised_by_the_response_tokens_of_the_whole_step(tmp_path, base, records):
    """One full-finetune SGD step over two micro-batches with different numbers of response tokens equals
    a step on (sum of token losses) / (all response tokens), not the mean of the micro-batch means."""
    data = Instructions(json_path=records, val_split_fraction=0.1, seed=3)
    final = run(
        tmp_path / "out",
        base,
        records,
        steps=1,
        method="full",
        max_norm=None,
        optimizer=OptimizerArgs(name="SGD", lr=0.5, weight_decay=0.0, momentum=0.0),
    )
    from litliger.data import Tokenizer

    data.connect(Tokenizer.from_dir(base), batch_size=2, max_seq_length=60)
    data.select_prompt_style(base)
    data.setup()
    loader = iter(data.train_dataloader())
    batches = [next(loader), next(loader)]
    counts = [int((b["targets"] != -100).sum()) for b in batches]
    assert counts[0] != counts[1]

    def step(normalise) -> dict[str, torch.Tensor]:
        model = GPT.from_checkpoint(base)
        model.max_seq_length = 60
        sums = [model(b["input_ids"], targets=b["targets"], reduction="sum") for b in batches]
        normalise(sums).backward()
        with torch.no_grad():
            return {n: p - 0.5 * p.grad for n, p in model.named_parameters()}

    expected = step(lambda s: (s[0] + s[1]) / sum(counts))
    per_micro = step(lambda s: (s[0] / counts[0] + s[1] / counts[1]) / 2)
    trained = load_state_dict(final)
    name = "transformer.h.0.attn.qkv.weight"
    torch.testing.assert_close(trained[name], expected[name], atol=1e-6, rtol=0)
    assert (per_micro[name] - expected[name]).abs().max() > 1e-4  # the test can tell the two apart


def test_learned_positions_and_raw_parameters_are_trainable_by_name(tmp_path, records):
    from torch import nn

    from litliger.engine import make_fabric
    from litliger.engine.training_state import _gathered_parameters
    from litliger.nn import init

    class Gain(nn.Module):
        """A module owning a bare nn.Parameter (not a layer's weight), initialised by the policy."""

        def __init__(self, size: int) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.empty(size))

        def reset_parameters(self) -> None:
            init.init_parameter(self, "gain", "norm_weight")

    with torch.device("meta"):
        model, trainable = build_finetune_model(gpt2_config(), "lora", LoRAArgs(r=2), ("transformer.wpe.weight",))
    assert "transformer.wpe.weight" in trainable
    model = GPT(gpt2_config())
    model.transformer["gain"] = Gain(32)
    from litliger.model.lora import select_trainable

    names = select_trainable(model, "lora", ("transformer.gain.gain", "transformer.wpe.weight"))
    assert names == ["transformer.wpe.weight", "transformer.gain.gain"]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    gathered = _gathered_parameters(make_fabric(accelerator="cpu"), model, trainable_only=True)
    assert sorted(gathered) == sorted(names)  # what trains is what the checkpoint gets


def test_gpt2_finetune_trains_learned_positions(tmp_path, records):
    root = tmp_path / "g"
    base = make_base(root, gpt2_config())
    out = tmp_path / "out"
    run(out, base, records, steps=2, save_interval=1, trainable=("transformer.wpe.weight",))
    stored = load_state_dict_file(out / "step-00000001" / TRAINABLE_FILE)
    assert "transformer.wpe.weight" in stored
    assert not torch.equal(stored["transformer.wpe.weight"], load_state_dict(base)["transformer.wpe.weight"])
    loaded = GPT.from_checkpoint(out / "step-00000001")
    assert torch.equal(loaded.transformer.wpe.weight, stored["transformer.wpe.weight"])


def test_bad_input_is_named_and_nothing_is_overwritten(tmp_path, base, records):
    with pytest.raises(FileNotFoundError, match="is not a checkpoint folder"):
        run(tmp_path / "a", tmp_path / "nope", records, steps=1)
    with pytest.raises(ValueError, match="pattern 'nothing.*' matches no parameter"):
        run(tmp_path / "b", base, records, steps=1, trainable=("nothing.*",))
    out = tmp_path / "out"
    run(out, base, records, steps=2, save_interval=1)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run(out, base, records, steps=2)
    with pytest.raises(ValueError, match="lora.r 4 -> 8"):
        run(out, base, records, steps=3, resume="auto", lora=LoRAArgs(r=8, alpha=8, dropout=0.1))
    # a base that changed since the checkpoint: loading the step folder and resuming both refuse
    moved = tmp_path / "base-copy"
    shutil.copytree(base, moved)
    run(tmp_path / "c", moved, records, steps=2, save_interval=1)
    weights = load_state_dict(moved)
    weights["transformer.ln_f.weight"] += 1
    from safetensors.torch import save_file

    save_file(weights, str(moved / MODEL_FILE))
    write_checksums(moved)  # recorded, so the base check (not the checksums) must catch it
    with pytest.raises(ValueError, match="changed since"):
        GPT.from_checkpoint(tmp_path / "c" / "step-00000001")
    with pytest.raises(ValueError, match="base weights"):
        run(tmp_path / "c", moved, records, steps=2, resume="auto")
    assert keys(out / "step-00000001" / TRAINABLE_FILE)  # the earlier run's checkpoints are intact


# --- the command line, 2 processes -------------------------------------------------------------------------


def cli(args: list[str], env_extra: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "litliger", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO
    )


def cli_args(base: Path, records: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "finetune",
        "--checkpoint_dir", str(base),
        "--out_dir", str(out),
        "--accelerator", "cpu",
        "--data", "litliger.data.Instructions",
        "--data.json_path", str(records),
        "--data.val_split_fraction", "0.1",
        "--lora.r", "4",
        "--lora.dropout", "0.1",
        "--train.global_batch_size", "4",
        "--train.micro_batch_size", "2",
        "--train.max_seq_length", "60",
        "--train.max_steps", str(steps),
        "--train.log_interval", "1",
        "--eval.interval", "null",
        "--eval.max_iters", "2",
        "--optimizer.lr", "0.01",
        "--seed", "1",
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp"])  # DDP's two-process resume: test_pretrain (same engine path)
def test_cli_two_processes_adapter_layout_and_exact_resume(tmp_path, base, records, strategy):
    env = {"LITLIGER_CACHE": os.environ["LITLIGER_CACHE"]}
    two = ["--devices", "2", "--strategy", strategy, "--train.activation_checkpointing", "selective"]  # with LoRA
    one = cli([*cli_args(base, records, tmp_path / "one", 2), "--train.save_interval", "2"], env)
    assert one.returncode == 0, one.stderr
    straight = cli([*cli_args(base, records, tmp_path / "s", 4), *two, "--train.save_interval", "2"], env)
    assert straight.returncode == 0, straight.stderr
    step = tmp_path / "s" / "step-00000002"
    assert not (step / MODEL_FILE).exists()
    a = load_state_dict_file(tmp_path / "one" / "final" / TRAINABLE_FILE)
    b = load_state_dict_file(step / TRAINABLE_FILE)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # the same adapter layout
    resumed = cli([*cli_args(base, records, tmp_path / "r", 4), *two, "--resume", str(step)], env)
    assert resumed.returncode == 0, resumed.stderr
    la, lb = losses(tmp_path / "s"), losses(tmp_path / "r")
    assert sorted(lb) == [3, 4] and all(la[s] == lb[s] for s in lb), (la, lb)
    fa = load_state_dict_file(tmp_path / "s" / "final" / TRAINABLE_FILE)
    fb = load_state_dict_file(tmp_path / "r" / "final" / TRAINABLE_FILE)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
