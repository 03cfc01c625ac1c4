# ruff: noqa: F811 (pytest fixtures imported from sibling test modules are redefined as arguments)
"""Activation checkpointing (gradients equal, names unchanged), offload, and the memory planner against
measured peaks."""

import json

import pytest
import torch
from test_model import FAMILIES, tiny_config
from test_pretrain import corpus, losses, run  # noqa: F401 (fixture)

from litliger import GPT, Config
from litliger.cli import main as cli_main
from litliger.engine import OptimizerArgs, PlanArgs, TrainArgs, build_optimizer
from litliger.engine.live_bytes import LiveBytes, storage_bytes
from litliger.engine.memory_plan import largest_batch, per_device, refine_batch, trace_step
from litliger.kernels import use_backend
from litliger.model.checkpointing import apply_activation_checkpointing, parse_checkpointing
from litliger.model.lora import LoRAArgs, apply_lora
from litliger.nn.recompute import offloaded_activations

MODES = ("none", "full", "selective", "selective:op")


def _grads(model, idx, mode, backend="torch", **kw):
    apply_activation_checkpointing(model, mode)
    model.zero_grad()
    torch.manual_seed(1)  # LoRA dropout: the same masks in every mode (and again when recomputed)
    with use_backend(backend):
        model(idx, targets=idx.roll(-1, 1), **kw).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_gives_bitwise_the_gradients_of_none(family):
    torch.manual_seed(0)
    model = GPT(tiny_config(family))
    idx = torch.randint(0, 96, (2, 16))
    reference = _grads(model, idx, "none")
    for mode in MODES[1:]:
        grads = _grads(model, idx, mode)
        assert grads.keys() == reference.keys()
        assert all(torch.equal(grads[n], reference[n]) for n in grads), (family, mode)


def test_checkpointing_with_lora_dropout_documents_and_the_triton_kernels():
    torch.manual_seed(0)
    model = GPT(tiny_config("qwen3"))
    apply_lora(model, LoRAArgs(r=4, alpha=8, dropout=0.2, targets=("qkv", "proj", "mlp")))
    idx = torch.randint(0, 96, (2, 16))
    ids = torch.tensor([[0] * 9 + [1] * 7, [0] * 16])
    for backend, modes in (("torch", ("full", "selective:op")), ("triton", ("full", "selective:2"))):
        reference = _grads(model, idx, "none", backend, document_ids=ids)
        assert any(".lora_" in n for n in reference)
        for mode in modes:
            grads = _grads(model, idx, mode, backend, document_ids=ids)
            assert all(torch.equal(grads[n], reference[n]) for n in reference), (backend, mode)
    with pytest.raises(ValueError, match="selective:op checkpointing cannot replay Triton kernels run by the CPU"):
        _grads(model, idx, "selective:op", "triton")


def test_checkpointing_keeps_parameter_names_and_stays_out_of_inference():
    model = GPT(tiny_config("llama"))
    names = list(model.state_dict())
    plan = apply_activation_checkpointing(model, "selective:2")
    assert list(model.state_dict()) == names
    assert [b.checkpoint for b in model.transformer.h] == [None, "full"]
    assert plan.describe(2) == "activation checkpointing: selective:2 (1 of 2 blocks full, the rest none)"
    idx = torch.randint(0, 96, (1, 8))
    with torch.no_grad():  # no checkpoint machinery without gradients (validation, sampling, KV cache)
        torch.testing.assert_close(model(idx), GPT.forward(model, idx))


@pytest.mark.parametrize("bad", ["selective:0", "partial", "selective:x"])
def test_an_unknown_checkpointing_mode_is_one_line(bad):
    with pytest.raises(ValueError, match=rf"activation checkpointing '{bad}' is not a mode, in --train"):
        TrainArgs(activation_checkpointing=bad)
    assert parse_checkpointing("selective") == parse_checkpointing("selective:2")


def test_offloaded_activations_give_the_same_gradients():
    """The offload hooks (CPU -> CPU here) with the norm recompute stepping aside: gradients unchanged."""
    torch.manual_seed(0)
    model = GPT(tiny_config("gemma"))
    idx = torch.randint(0, 96, (2, 16))
    reference = _grads(model, idx, "none")
    model.zero_grad()
    with use_backend("torch"), offloaded_activations(pin_memory=False):
        model(idx, targets=idx.roll(-1, 1)).backward()
    assert all(torch.equal(p.grad, reference[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(("offload", "match"), [("activations", "nothing to offload to"), ("params", "nothing")])
def test_offload_is_refused_without_a_gpu(tmp_path, corpus, offload, match):
    train = TrainArgs(global_batch_size=2, micro_batch_size=2, max_seq_length=16, max_steps=1, offload=offload)
    with pytest.raises(ValueError, match=match):
        run(tmp_path / "out", corpus, steps=1, train=train)
    assert not (tmp_path / "out" / "final").exists()


def test_compile_with_checkpointing_is_refused_before_any_work(tmp_path, corpus):
    train = TrainArgs(global_batch_size=2, micro_batch_size=2, max_seq_length=16, max_steps=1,
                      activation_checkpointing="full")  # fmt: skip
    with pytest.raises(ValueError, match="--compile cannot be combined with train.activation_checkpointing='full'"):
        run(tmp_path / "out", corpus, steps=1, train=train, compile=True)
    assert not (tmp_path / "out" / "final").exists()


def test_checkpointed_pretraining_resumes_exactly(tmp_path, corpus):
    def train():
        return TrainArgs(global_batch_size=4, micro_batch_size=2, max_seq_length=16, max_steps=6, lr_warmup_steps=2,
                         min_lr=1e-4, save_interval=3, log_interval=1, activation_checkpointing="full")  # fmt: skip

    straight = tmp_path / "straight"
    run(straight, corpus, steps=6, train=train())
    plain = tmp_path / "plain"
    run(plain, corpus, steps=6, train=TrainArgs(**{**vars(train()), "activation_checkpointing": "none"}))
    assert losses(straight) == losses(plain)  # checkpointing changes no number
    resumed = tmp_path / "resumed"
    run(resumed, corpus, steps=6, train=train(), resume=straight / "step-00000003")
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s] for s in b)


# --- the planner ------------------------------------------------------------------------------------------------

MODEL_25M = dict(name="plan-25m", block_size=256, vocab_size=8192, padding_multiple=64, n_layer=6, n_embd=512,
                 n_head=8, n_query_groups=4, intermediate_size=1408, norm_class="RMSNorm", mlp_class="SwiGLUMLP",
                 bias=False)  # fmt: skip


def measured_peak(config: Config, mode: str, batch: int, seq: int, lora: bool = False) -> int:
    """Peak live tensor bytes of one real training step (after a first step made the optimizer state)."""
    torch.manual_seed(0)
    model = GPT(config)
    if lora:
        apply_lora(model, LoRAArgs(r=8, alpha=16, dropout=0.05, targets=("qkv", "proj", "mlp")))
        for n, p in model.named_parameters():
            p.requires_grad = ".lora_" in n
    model.max_seq_length = seq
    apply_activation_checkpointing(model, mode)
    opt = build_optimizer(model, OptimizerArgs())
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    with use_backend("torch"):
        for measure in (False, True):
            held = [*model.parameters(), *model.buffers()]
            held += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
            with LiveBytes(storage_bytes(held), held) if measure else torch.enable_grad() as live:
                model(idx, targets=idx, reduction="sum").backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
    return live.peak


@pytest.mark.parametrize("model", ["debug-llama", "25m", "debug-llama-lora"])
def test_the_planned_peak_is_within_15_percent_of_the_measured_one(model):
    config = Config(**MODEL_25M) if model == "25m" else Config.from_name("debug-llama")
    lora = model.endswith("lora")

    def build():
        m = GPT(config)
        if lora:
            apply_lora(m, LoRAArgs(r=8, alpha=16, dropout=0.05, targets=("qkv", "proj", "mlp")))
            for n, p in m.named_parameters():
                p.requires_grad = ".lora_" in n
        return m

    for mode in ("none", "selective", "full"):
        planned = trace_step(build, micro_batch_size=2, seq_len=128, vocab_size=config.padded_vocab_size,
                             checkpointing=mode).peak  # fmt: skip
        real = measured_peak(config, mode, 2, 128, lora)
        assert abs(planned - real) <= 0.15 * real, (model, mode, planned, real)


def test_the_largest_micro_batch_fits_and_one_more_does_not():
    config = Config.from_name("debug-llama")

    def peak(m):
        trace = trace_step(lambda: GPT(config), micro_batch_size=m, seq_len=128, vocab_size=config.padded_vocab_size,
                           checkpointing="none")  # fmt: skip
        return per_device(trace, strategy="ddp", world_size=1)

    memory = 60 * 2**20
    guess = largest_batch(peak(1)[1], peak(2)[1], memory)  # from micro-batches 1 and 2, phase by phase
    m = refine_batch(guess, lambda m: peak(m)[0]["peak"] <= memory)  # checked by tracing
    assert 2 < m < 64 and abs(m - guess) <= 2
    assert peak(m)[0]["peak"] <= memory < peak(m + 1)[0]["peak"]


def test_litliger_plan_prints_json_and_strict_refuses(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name: debug-llama\ndata: {class_path: litliger.data.PythonStdlib}\n"
                   "train: {micro_batch_size: 4, max_seq_length: 64, activation_checkpointing: full}\n")  # fmt: skip
    cli_main(["plan", "--config", str(cfg), "--json", "--plan.device_memory", "40MB"])
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(plan["per_device"]) >= {"parameters", "gradients", "optimizer", "activations", "loss_chunk", "peak"}
    assert plan["fits"] is True and plan["settings"]["activation_checkpointing"] == "full"
    sizes = plan["max_micro_batch_size"]
    assert sizes["full"] > sizes["selective"] > sizes["none"] > 4
    with pytest.raises(SystemExit) as exit_:
        cli_main(["plan", "--config", str(cfg), "--plan.device_memory", "10MB", "--plan.strict", "true"])
    assert exit_.value.code == 1
    assert "the memory plan does not fit: a peak of" in capsys.readouterr().err


def test_a_run_that_does_not_fit_warns_or_with_strict_stops(tmp_path, corpus, capsys):
    run(tmp_path / "warned", corpus, steps=1, plan=PlanArgs(device_memory="100KB"))
    out = capsys.readouterr().out
    assert "warning: the memory plan does not fit" in out and "activation checkpointing: none" in out
    with pytest.raises(ValueError, match="does not fit.*in --plan.strict"):
        run(tmp_path / "strict", corpus, steps=1, plan=PlanArgs(device_memory="100KB", strict=True))
    assert not (tmp_path / "strict" / "final").exists()
