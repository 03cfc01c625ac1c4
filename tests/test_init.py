"""The init policy: complete coverage, per-role values, determinism, and the same weights on 1 process,
under DDP and under FSDP2 sharding (2 and 3 CPU processes on gloo)."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_model import FAMILIES, tiny_config
from torch import nn

from litliger import GPT, Config
from litliger.nn import Embedding, LayerNorm, Linear, RMSNorm
from litliger.nn.init import InitPolicy, assert_replicas_identical, init_parameter, init_weights


def build_on_meta(config: Config) -> GPT:
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_initialised_by_the_policy(family):
    model = build_on_meta(tiny_config(family))
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.fill_(float("nan"))  # whatever init_weights leaves alone stays NaN
    init_weights(model, seed=1)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.isfinite(t).all(), f"{name} was not initialised"


def _expected_std(policy: InitPolicy, role: str) -> float:
    return policy.std(role)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["normal", "small_wang"])
def test_per_role_values_match_the_scheme(family, scheme):
    config = tiny_config(family, init_scheme=scheme, n_embd=128, intermediate_size=256)
    model = build_on_meta(config)
    init_weights(model, seed=3)
    policy = InitPolicy.from_config(config)
    checked = set()
    for name, module in model.named_modules():
        if isinstance(module, (Linear, Embedding)):
            std = module.weight.double().std().item()
            target = policy.std(module.role)
            assert abs(std / target - 1) < 0.05, f"{name} ({module.role}): std {std:.5f} vs {target:.5f}"
            assert abs(module.weight.double().mean().item()) < 4 * target / math.sqrt(module.weight.numel())
            if isinstance(module, Linear) and module.bias is not None:
                assert torch.count_nonzero(module.bias) == 0
            checked.add(module.role)
        elif isinstance(module, RMSNorm):
            assert torch.all(module.weight == 1.0 - module.offset), name
            checked.add("norm")
        elif isinstance(module, LayerNorm):
            assert torch.all(module.weight == 1.0) and torch.count_nonzero(module.bias) == 0, name
            checked.add("norm")
    assert {"embedding", "linear", "out_proj", "norm"} <= checked
    assert ("lm_head" in checked) != config.tie_embeddings


def test_scheme_formulas():
    normal = InitPolicy("normal", n_layer=12, n_embd=768, base_std=0.02)
    assert normal.std("linear") == 0.02 and math.isclose(normal.std("out_proj"), 0.02 / math.sqrt(24))
    wang = InitPolicy("small_wang", n_layer=12, n_embd=768)
    assert math.isclose(wang.std("embedding"), math.sqrt(2 / (5 * 768)))
    assert math.isclose(wang.std("out_proj"), 2 / (12 * math.sqrt(768)))
    assert normal.constant("norm_weight", norm_offset=1.0) == 0.0 and normal.constant("linear") is None


def test_seeded_and_independent_of_build_path():
    config = tiny_config("llama")
    a, b, c = build_on_meta(config), build_on_meta(config), build_on_meta(config)
    init_weights(a, seed=7)
    init_weights(b, seed=7)
    init_weights(c, seed=8)
    eager = GPT(config)  # built on the CPU directly (seeded from the global RNG), then re-initialised
    init_weights(eager, seed=7)
    for (name, pa), pb, pc, pe in zip(
        a.named_parameters(), b.parameters(), c.parameters(), eager.parameters(), strict=True
    ):
        assert torch.equal(pa, pb) and torch.equal(pa, pe), name
        if pa.std() > 0:
            assert not torch.equal(pa, pc), name
    # different layers of the same shape get different values (names seed the generators)
    assert not torch.equal(a.transformer.h[0].attn.qkv.weight, a.transformer.h[1].attn.qkv.weight)


def test_resuming_rebuilds_buffers_only():
    model = build_on_meta(tiny_config("qwen3"))
    init_weights(model, seed=0)
    params = {k: v.clone() for k, v in model.named_parameters()}
    cos = model.rope.cos.clone()
    with torch.no_grad():
        model.rope.cos.zero_()
    init_weights(model, seed=123, resuming=True)
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())
    assert torch.equal(model.rope.cos, cos)


def test_modules_outside_the_policy_are_refused():
    model = build_on_meta(tiny_config("llama"))
    model.extra = nn.Linear(4, 4)  # resets itself with PyTorch's defaults, not the policy
    with pytest.raises(RuntimeError, match=r"outside the init policy: \['extra.bias', 'extra.weight'\]"):
        init_weights(model, seed=0)

    class Raw(nn.Module):  # a raw parameter and no reset_parameters at all
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.empty(3))

    model = build_on_meta(tiny_config("llama"))
    model.raw = Raw()
    with pytest.raises(RuntimeError, match=r"module raw \(Raw\) owns parameters or buffers but has no reset_param"):
        init_weights(model, seed=0)

    class Scaled(Raw):  # a raw parameter initialised through the policy is fine
        def reset_parameters(self):
            init_parameter(self, "scale", "norm_weight")

    model = build_on_meta(tiny_config("llama"))
    model.raw = Scaled()
    init_weights(model, seed=0)
    assert torch.equal(model.raw.scale, torch.ones(3))


def test_meta_parameters_are_refused():
    with torch.device("meta"):
        model = GPT(tiny_config("llama"))
    with pytest.raises(RuntimeError, match="on the meta device. Materialise the model first"):
        init_weights(model, seed=0)


# --- distributed -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _fsdp_worker(rank: int, world: int, port: int, config: Config, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _setup(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    with torch.device("meta"):
        model = GPT(config)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")  # each rank allocates only its shards
    init_weights(model, seed=11)
    local = {n: p.to_local().clone() for n, p in model.named_parameters()}
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    torch.save(
        {"local": local, "full": full, "rows": {n: p.to_local().shape[0] for n, p in model.named_parameters()}},
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_sharded_init_is_bitwise_equal_to_one_process(tmp_path, world):
    # vocab 97 and n_embd 64 do not divide by 2 or 3: shards are uneven
    config = tiny_config("pythia", vocab_size=97, padding_multiple=1, n_embd=64, intermediate_size=100)
    mp.spawn(_fsdp_worker, args=(world, _free_port(), config, str(tmp_path)), nprocs=world, join=True)
    reference = build_on_meta(config)
    init_weights(reference, seed=11)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    offset = {n: 0 for n, _ in reference.named_parameters()}
    for r, res in enumerate(results):
        for name, p in reference.named_parameters():
            assert torch.equal(res["full"][name], p), f"rank {r}: full {name} differs from the 1-process init"
            local = res["local"][name]
            assert torch.equal(local, p[offset[name] : offset[name] + local.shape[0]]), f"rank {r}: shard of {name}"
            offset[name] += local.shape[0]
    assert all(offset[n] == p.shape[0] for n, p in reference.named_parameters())  # the shards tile every tensor
    wte = [res["local"]["transformer.wte.weight"] for res in results]
    assert wte[0].shape[0] != wte[-1].shape[0] or not torch.equal(wte[0], wte[-1])


def _ddp_worker(rank: int, world: int, port: int, config: Config, out: str) -> None:
    _setup(rank, world, port)
    outcome = []
    model = build_on_meta(config)
    init_weights(model, seed=5)
    assert_replicas_identical(model)  # identical: passes on every rank
    outcome.append("identical ok")
    torch.manual_seed(rank)  # a model drawn from each rank's own global RNG differs across ranks
    divergent = GPT(config)
    try:
        assert_replicas_identical(divergent)
        outcome.append("divergent passed")
    except RuntimeError as e:
        outcome.append(str(e))
    torch.save({"outcome": outcome, "sd": dict(model.named_parameters())}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_initialise_identically_and_differences_are_caught(tmp_path):
    config = tiny_config("llama")
    mp.spawn(_ddp_worker, args=(2, _free_port(), config, str(tmp_path)), nprocs=2, join=True)
    reference = build_on_meta(config)
    init_weights(reference, seed=5)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["outcome"][0] == "identical ok"
        assert "rank 1 and rank 0 initialised different weights" in res["outcome"][1]
        assert all(torch.equal(res["sd"][n], p) for n, p in reference.named_parameters())
