"""The alignment losses' fused LM heads against their naive form: fused_linear_preference (dpo, simpo, orpo) and
fused_linear_distillation (jsd, forward_kl, reverse_kl) against the same loss on materialised logits (``x @ W.T``, then
``torch.log_softmax``), forward + backward: peak memory and time, fused/naive ratios.

Peak memory: :func:`benchmarks.flce_memory.peak_memory_mib` (CPU: a fresh process per variant, peak RSS over its
inputs; CUDA: the caching allocator's peak), all measured before any timing. Time: in this process, the fastest
of ``--repeat`` runs after one warm-up. The preference losses are measured on both walks: the default (one pass
over chunks of whole pairs) and the two-pass token walk (``chunk_size`` below one pair). The fused op runs the
default backend ("auto": the chunked PyTorch twin
on CPU, Triton on CUDA). The preference inputs are 2B sequences (B chosen, then B rejected) whose first quarter is
prompt (ignore_index); the distillation teacher has the student's sizes and is frozen. The last column is the
fused loss's relative difference from the naive one (a sanity check: the two compute the same loss).

    python -m benchmarks.alignment [--device cpu|cuda] [--losses dpo simpo orpo jsd forward_kl reverse_kl]
                                   [--seqs 8] [--seq-len 512] [--hidden 256] [--vocab 65536] [--repeat 2]
                                   [--out bench_alignment.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from benchmarks import argv_as_run
from benchmarks.flce_memory import peak_memory_mib

PREFERENCE = ("dpo", "simpo", "orpo")
DISTILLATION = ("jsd", "forward_kl", "reverse_kl")
BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1, "jsd": 0.5, "forward_kl": 0.5, "reverse_kl": 0.5}
IGNORE = -100


def make_inputs(loss: str, seqs: int, seq_len: int, hidden: int, vocab: int, device: str, variant: str):
    """Inputs allocated in place (no temporaries that would raise the RSS high-water mark before the call)."""
    torch.manual_seed(0)
    x = torch.randn(seqs, seq_len, hidden, device=device).requires_grad_()
    w = torch.randn(vocab, hidden, device=device).mul_(hidden**-0.5).requires_grad_()
    t = torch.randint(0, vocab, (seqs, seq_len), device=device)
    t[:, : seq_len // 4] = IGNORE  # the prompt
    extra: dict[str, torch.Tensor] = {}
    if loss == "dpo":
        extra["ref_logps"] = torch.randn(seqs, device=device).mul_(5).sub_(3 * seq_len * math.log(vocab) / 4)
    elif loss in DISTILLATION:
        extra["xt"] = torch.randn(seqs, seq_len, hidden, device=device)
        extra["wt"] = torch.randn(vocab, hidden, device=device).mul_(hidden**-0.5)
    return loss, variant, x, w, t, extra


def naive_preference(loss: str, x, w, t, ref_logps) -> torch.Tensor:
    """Summed response log-probs from the full (2B, T, V) log-softmax, then the module's own formulas."""
    from litliger.kernels.preference import preference_from_logps

    live = t != IGNORE
    logp = torch.log_softmax(x @ w.T, dim=-1)
    tok = logp.gather(-1, torch.where(live, t, 0).unsqueeze(-1)).squeeze(-1) * live
    counts = live.sum(-1)
    nll = None
    if loss == "orpo":
        half = x.shape[0] // 2
        nll = -tok[:half].sum() / counts[:half].sum()
    return preference_from_logps(tok.sum(-1), counts, loss=loss, beta=BETA[loss], ref_logps=ref_logps, nll=nll)[0]


def naive_distillation(loss: str, x, w, xt, wt, t) -> torch.Tensor:
    """Both heads' full (tokens, V) logits; the per-token divergence of the distillation module's docstring."""
    lps = torch.log_softmax(x @ w.T, dim=-1)
    with torch.no_grad():
        lpt = torch.log_softmax(xt @ wt.T, dim=-1)
    if loss == "jsd":
        beta = BETA[loss]
        lm = torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta))
        row = (beta * lpt.exp() * (lpt - lm)).sum(-1) + ((1 - beta) * lps.exp() * (lps - lm)).sum(-1)
    elif loss == "forward_kl":
        row = (lpt.exp() * (lpt - lps)).sum(-1)
    else:
        row = (lps.exp() * (lps - lpt)).sum(-1)
    live = t != IGNORE
    return (row * live).sum() / live.sum()


def forward(inputs) -> torch.Tensor:
    from litliger.kernels import fused_linear_distillation, fused_linear_preference

    loss, variant, x, w, t, extra = inputs
    if loss in PREFERENCE:
        if variant == "naive":
            return naive_preference(loss, x, w, t, extra.get("ref_logps"))
        # the default walk (one pass over chunks of whole pairs), or the two-pass token walk that chunk_size below
        # one pair (2T rows) forces: memory bounded by the chunk alone, one more matmul per row
        chunk = x.shape[1] if variant == "two-pass" else None
        return fused_linear_preference(
            x, w, t, loss=loss, beta=BETA[loss], ref_logps=extra.get("ref_logps"), chunk_size=chunk
        )[0]
    if variant == "naive":
        return naive_distillation(loss, x, w, extra["xt"], extra["wt"], t)
    return fused_linear_distillation(x, w, extra["xt"], extra["wt"], t, loss=loss, beta=BETA[loss])


def run(inputs) -> None:
    forward(inputs).backward()


def time_variant(setup_args: tuple, repeat: int, device: str) -> tuple[float, float]:
    """In this process, after a warm-up: (the fastest of ``repeat`` forward + backward runs in seconds, the loss)."""
    inputs = make_inputs(*setup_args)
    x, w = inputs[2], inputs[3]
    times, value = [], math.nan
    for i in range(repeat + 1):
        x.grad = w.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = forward(inputs)
        out.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
        value = float(out.detach())
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.alignment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    default_losses = [*PREFERENCE, *DISTILLATION]
    parser.add_argument("--losses", nargs="+", choices=PREFERENCE + DISTILLATION, default=default_losses)
    parser.add_argument("--seqs", type=int, default=8, help="sequences (2B: B chosen, B rejected for preference)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per variant after a warm-up (the fastest)")
    parser.add_argument("--out", default="bench_alignment.json")
    args = parser.parse_args()
    if args.seqs % 2 or args.seqs < 2:
        parser.error("--seqs must be even (B chosen, then B rejected)")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    # Memory first, while this process is small: a spawned child starts with its parent's RSS high-water mark
    # (Linux carries it across exec), so measuring after the in-process timings below would read their peak.
    results = []
    for loss in args.losses:
        for variant in ("fused", "two-pass") if loss in PREFERENCE else ("fused",):
            shape = {"seqs": args.seqs, "seq_len": args.seq_len, "hidden": args.hidden, "vocab": args.vocab}
            results.append({"loss": loss, "walk": variant, **shape})
    naive: dict[str, dict] = {}
    for row in results:  # the naive loss once per loss
        for variant in (row["walk"], "naive") if row["loss"] not in naive else (row["walk"],):
            setup_args = (row["loss"], args.seqs, args.seq_len, args.hidden, args.vocab, args.device, variant)
            r = peak_memory_mib(make_inputs, run, *setup_args, device=args.device)
            if variant == "naive":
                naive[row["loss"]] = {"naive_peak_mib": r["peak_mib"], "naive_peak_exact": r["exact"]}
            else:
                row["fused_peak_mib"], row["fused_peak_exact"] = r["peak_mib"], r["exact"]
    for row in results:
        row.update(naive[row["loss"]])
        setup_args = (row["loss"], args.seqs, args.seq_len, args.hidden, args.vocab, args.device, row["walk"])
        row["fused_seconds"], row["fused_loss"] = time_variant(setup_args, args.repeat, args.device)
        if "naive_seconds" not in naive[row["loss"]]:
            naive_args = (*setup_args[:-1], "naive")
            naive[row["loss"]]["naive_seconds"], naive[row["loss"]]["naive_loss"] = time_variant(
                naive_args, args.repeat, args.device
            )
        row["naive_seconds"], row["naive_loss"] = naive[row["loss"]]["naive_seconds"], naive[row["loss"]]["naive_loss"]
        row["memory_ratio"] = row["fused_peak_mib"] / row["naive_peak_mib"]
        row["time_ratio"] = row["fused_seconds"] / row["naive_seconds"]
        row["loss_rel_diff"] = abs(row["fused_loss"] - row["naive_loss"]) / max(abs(row["naive_loss"]), 1e-30)

    versions = f"torch={torch.__version__} python={platform.python_version()} threads={torch.get_num_threads()}"
    print(f"device={args.device} {versions}")
    print(f"tokens = {args.seqs} x {args.seq_len}, hidden {args.hidden}, vocab {args.vocab}, fp32, forward + backward")
    header = ("loss", "walk", "fused MiB", "naive MiB", "mem ratio", "fused s", "naive s", "time ratio", "|dloss|/loss")
    print("{:<10} {:<8} {:>10} {:>10} {:>9} {:>8} {:>8} {:>10} {:>12}".format(*header))
    for r in results:
        print(
            f"{r['loss']:<10} {r['walk'] if r['walk'] != 'fused' else 'default':<8} "
            f"{r['fused_peak_mib']:>10.1f} {r['naive_peak_mib']:>10.1f} {r['memory_ratio']:>9.1%} "
            f"{r['fused_seconds']:>8.3f} {r['naive_seconds']:>8.3f} {r['time_ratio']:>10.2f} "
            f"{r['loss_rel_diff']:>12.1e}{'' if r['fused_peak_exact'] and r['naive_peak_exact'] else '  (upper bound)'}"
        )
    meta = {"device": args.device, "torch": torch.__version__, "command": " ".join(argv_as_run("benchmarks.alignment"))}
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    with open(args.out, "w") as f:
        json.dump({**meta, "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
