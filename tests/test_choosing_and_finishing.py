"""Choosing a model size (``--model.FIELD`` over a named config, ``litliger models``), loading in the stored
dtype, a finished run run again (a no-op that says so), a full finetune's final/ storing its weights once, and the
messages of a corrupt state.json and a changed finetune base."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_finetune import make_base, write_instructions
from test_finetune import run as finetune_run
from test_finetune import tiny_config as finetune_config
from test_pretrain import run as pretrain_run
from test_pretrain import tiny_config, write_corpus

from litliger import GPT, Config
from litliger.checkpoint import load_state_dict
from litliger.checkpoint.finetuned import check_same_finetune, load_finetuned
from litliger.checkpoint.io import parameter_state_dict, save_checkpoint
from litliger.checkpoint.layout import FINETUNE_FILE, MODEL_FILE, TRAINABLE_FILE
from litliger.cli import main
from litliger.engine import find_resume_checkpoint
from litliger.model.config import list_models, num_parameters
from litliger.model.registry import CONFIGS
from litliger.recipes.pretrain import resolve_config


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LITLIGER_CACHE", str(root / "cache"))
        return make_base(root, finetune_config())


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return write_instructions(tmp_path_factory.mktemp("data") / "records.jsonl")


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LITLIGER_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path / "corpus")


# --- the stored dtype -----------------------------------------------------------------------------------------


def test_from_checkpoint_loads_the_stored_dtype_unless_one_is_asked_for(tmp_path):
    model = GPT(tiny_config())
    weights = parameter_state_dict(model)
    save_checkpoint(tmp_path / "bf16", {k: v.detach().to(torch.bfloat16) for k, v in weights.items()}, model.config)
    assert {p.dtype for p in GPT.from_checkpoint(tmp_path / "bf16").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in GPT.from_checkpoint(tmp_path / "bf16", dtype=torch.float32).parameters()} == {
        torch.float32
    }
    loaded = GPT.from_checkpoint(tmp_path / "bf16")
    assert all(torch.equal(p, weights[n].detach().to(torch.bfloat16)) for n, p in loaded.named_parameters())
    save_checkpoint(tmp_path / "fp32", weights, model.config)
    assert {p.dtype for p in GPT.from_checkpoint(tmp_path / "fp32").parameters()} == {torch.float32}
    mixed = {k: v.detach().to(torch.bfloat16) if "lm_head" in k else v for k, v in weights.items()}
    save_checkpoint(tmp_path / "mixed", mixed, model.config)  # mixed dtypes: fp32 holds each without loss
    assert {p.dtype for p in GPT.from_checkpoint(tmp_path / "mixed").parameters()} == {torch.float32}


# --- a finished run, run again ---------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    files = (p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def test_a_finished_run_run_again_trains_and_writes_nothing_and_says_so(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    pretrain_run(out, corpus, steps=4, save_interval=2)
    # as a run stopped during its final validation and then resumed leaves it: step-4 and final/ at the same step
    shutil.copytree(out / "final", out / "step-00000004")
    before = snapshot(out / "final")
    capsys.readouterr()
    expected = f"{out} is finished (final/ at step 4); nothing to train. Raise --train.max_steps to continue"
    for steps, resume in [(4, "auto"), (4, out / "step-00000002"), (3, "auto")]:
        assert pretrain_run(out, corpus, steps=steps, save_interval=2, resume=resume) == out / "final"
        printed = capsys.readouterr().out
        message = expected if steps == 4 else expected.replace("step 4)", "step 4; this run asks for 3 steps)")
        assert message in printed, printed
        assert "saved" not in printed
        assert snapshot(out / "final") == before  # not even rewritten with the same bytes
    assert pretrain_run(out, corpus, steps=5, resume="auto") == out / "final"  # more steps: it continues
    assert "saved" in capsys.readouterr().out


# --- finetuning: final/ of a full finetune, the parameter counts, the base check --------------------------------


def test_full_finetune_final_stores_the_weights_once_and_loads_resumes_and_generates(tmp_path, base, records, capsys):
    out = tmp_path / "full"
    final = finetune_run(out, base, records, steps=2, save_interval=1, method="full")
    assert (final / MODEL_FILE).is_file() and not (final / TRAINABLE_FILE).exists()
    assert (final / FINETUNE_FILE).is_file()
    step = out / "step-00000001"
    assert (step / TRAINABLE_FILE).is_file() and not (step / MODEL_FILE).exists()  # one copy there too
    n_all = sum(p.numel() for p in GPT.from_checkpoint(base).parameters())
    assert (
        f"full finetune of {base}: {n_all:,} of {n_all:,} parameters train (100.00%), 2 steps"
        in capsys.readouterr().out
    )
    trained = load_state_dict(final)
    assert set(trained) == {n for n, _ in GPT.from_checkpoint(final).named_parameters()}
    from_step = load_finetuned(step)  # a step folder: base + the trained tensors
    assert {p.dtype for p in from_step.parameters()} == {torch.float32}
    main(["generate", str(final), "--max_new_tokens", "2", "--prompt", "alpha"])  # raises SystemExit on an error
    finetune_run(out, base, records, steps=2, save_interval=1, method="full", resume="auto")
    assert f"{out} is finished (final/ at step 2); nothing to train" in capsys.readouterr().out
    # a resume from final/ reads the trained tensors from model.safetensors and continues exactly
    straight = tmp_path / "straight"
    finetune_run(straight, base, records, steps=3, method="full")
    assert finetune_run(out, base, records, steps=3, method="full", resume="auto") == out / "final"
    a, b = load_state_dict(straight / "final"), load_state_dict(out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_final_keeps_its_adapters_beside_the_merged_model(tmp_path, base, records):
    final = finetune_run(tmp_path / "lora", base, records, steps=1)
    assert (final / MODEL_FILE).is_file() and (final / TRAINABLE_FILE).is_file()


def test_a_changed_base_names_the_digests_recorded_and_found():
    saved = {
        "method": "lora",
        "lora": None,
        "trainable": ["a"],
        "base": {"checkpoint_dir": "/b", "tensors_sha256": "1" * 64},
    }
    current = {**saved, "base": {"checkpoint_dir": "/b", "tensors_sha256": "2" * 64}}
    with pytest.raises(ValueError) as info:
        check_same_finetune(saved, current, Path("/run/step-00000001"))
    message = str(info.value)
    assert "base weights in /b (tensor digest recorded 111111111111..., found 222222222222...)" in message
    assert "/b -> /b" not in message


# --- a corrupt state.json under --resume auto --------------------------------------------------------------------


def test_a_corrupt_state_json_is_named_as_corrupt_not_missing(tmp_path, corpus):
    out = tmp_path / "out"
    pretrain_run(out, corpus, steps=1)
    (out / "final" / "training_state" / "state.json").write_text('{"step": ')
    with pytest.raises(ValueError) as info:
        find_resume_checkpoint(out)
    message = str(info.value)
    assert "final (training_state/state.json is corrupt: not the size it was written with)" in message
    assert "missing" not in message
    (out / "final" / "training_state" / "state.json").unlink()
    with pytest.raises(ValueError, match=r"final \(training_state/state\.json is missing\)"):
        find_resume_checkpoint(out)


# --- choosing a size -----------------------------------------------------------------------------------------------


def test_model_fields_override_a_named_config():
    config = resolve_config("debug-llama", None, None, {"n_layer": 2, "block_size": 64})
    assert config == Config.from_name("debug-llama", n_layer=2, block_size=64)
    assert config.norm_class == "RMSNorm" and config.mlp_class == "SwiGLUMLP" and not config.bias
    with pytest.raises(ValueError, match=r"^unknown model field n_layr, in --model; did you mean n_layer\? the fields"):
        resolve_config("debug-llama", None, None, {"n_layr": 2})
    with pytest.raises(ValueError, match=r"none is named, in --model\.n_layer; add --model_name NAME"):
        resolve_config(None, None, None, {"n_layer": 2})
    with pytest.raises(ValueError, match=r"must be an integer >= 1, in --model\.n_layer; "):
        resolve_config("debug-llama", None, None, {"n_layer": 0})


def test_every_registry_count_is_the_models_and_litliger_models_lists_them(capsys):
    for name in CONFIGS:
        config = Config.from_name(name)
        with torch.device("meta"):
            model = GPT(config)
        assert num_parameters(config) == sum(p.numel() for p in model.parameters()), name
    list_models()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "parameters", "layers", "n_embd", "heads", "kv", "heads", "block_size"]
    assert {line.split()[0] for line in lines[1:]} == set(CONFIGS)
    main(["models", "--name", "debug-l"])
    assert capsys.readouterr().out.splitlines()[1].split() == ["debug-llama", "1.31M", "4", "128", "4", "2", "512"]


def test_model_config_fields_without_a_named_base_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrain", "--model_config.n_layer", "2"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "\n" not in err
    assert "name a base config and change its fields: --model_name debug-llama --model.n_layer VALUE" in err
