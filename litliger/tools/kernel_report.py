"""What every Triton kernel costs on a real GPU, found without one.

Per kernel x specialisation (the published configs' launches, ``kernel_specs``) x architecture: registers per
thread, spilled bytes, shared memory, num_warps and the estimated occupancy, from ptxas' verbose log and the
compiled metadata (``aot``: Triton's compiler for sm_80/sm_90 on this CPU). Per memory-bound kernel and config:
the bytes it moves per call against the minimum (each input read once, each output written once), counted by
the Triton interpreter (``traffic``) at the config's sizes in bf16.

    python -m litliger.tools.kernel_report               # both tables, sm_80 and sm_90 (a few minutes on 2 cores)
    python -m litliger.tools.kernel_report --arch 90 --no-traffic --json report.json
    python -m litliger.tools.kernel_report --full        # every specialisation, not one summary row per kernel
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path


def traffic_rows(names: list[str] | None, rows: int) -> list[dict]:
    """Bytes moved per kernel launch of each config's training step (bf16, ``rows`` tokens); run interpreted."""
    import torch

    from litliger.model.config import Config
    from litliger.tools.kernel_specs import ce_calls, config_plans, mlp_calls, norm_calls, published_names, rope_calls
    from litliger.tools.traffic import plan_traffic

    seen: dict[tuple, dict] = {}
    for name in names or published_names():
        config = Config.from_name(name)
        # The fused loss launches the same cross-entropy kernel as ce_calls, on chunks of a (V, H) product that
        # would take gigabytes here; the standalone cross-entropy is measured instead.
        for plan in config_plans(config, torch.bfloat16, "cpu", rows, (norm_calls, rope_calls, mlp_calls, ce_calls)):
            sizes = tuple(a for a in plan.args if isinstance(a, int))
            key = (plan.name, tuple(plan.constexprs.items()), sizes)
            if key in seen:
                seen[key]["configs"].append(name)
                continue
            consts = ", ".join(f"{k}={v}" for k, v in plan.constexprs.items())
            seen[key] = {"kernel": plan.name, "spec": consts, "configs": [name], **plan_traffic(plan)}
    return list(seen.values())


def _run_traffic(names: list[str] | None, rows: int) -> list[dict]:
    """In a subprocess with TRITON_INTERPRET=1 (it must be set before triton is imported)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "traffic.json"
        argv = [sys.executable, "-m", "litliger.tools.kernel_report", "--traffic-worker", str(out), "--rows", str(rows)]
        if names:
            argv += ["--configs", *names]
        subprocess.run(argv, check=True, env={**os.environ, "TRITON_INTERPRET": "1"})
        return json.loads(out.read_text())


def _summary(builds: list[dict]) -> list[dict]:
    """One row per kernel and architecture: the worst case over its specialisations."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for b in builds:
        groups[(b["kernel"], b["arch"])].append(b)
    rows = []
    for (kernel, arch), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        worst = max(group, key=lambda b: b["registers"])
        rows.append(
            {
                "kernel": kernel,
                "arch": arch,
                "specs": len(group),
                "registers": f"{min(b['registers'] for b in group)}-{worst['registers']}",
                "spill_stores": max(b["spill_stores"] for b in group),
                "shared": max(b["shared"] for b in group),
                "warps": "/".join(str(w) for w in sorted({b["num_warps"] for b in group})),
                "occupancy": f"{min(b['occupancy'] for b in group):.0%}-{max(b['occupancy'] for b in group):.0%}",
                "most_registers": worst["spec"],
            }
        )
    return rows


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m litliger.tools.kernel_report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--configs", nargs="+", default=None, help="config names (default: every published one)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="one row per specialisation")
    parser.add_argument("--no-traffic", action="store_true", help="skip the bytes-moved table (interpreter)")
    parser.add_argument("--rows", type=int, default=16, help="tokens per traffic measurement")
    parser.add_argument("--json", default=None)
    parser.add_argument("--traffic-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.traffic_worker:
        Path(args.traffic_worker).write_text(json.dumps(traffic_rows(args.configs, args.rows)))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the compile needs Triton's real compiler")

    from litliger.tools.aot import SM_LIMITS, compile_all, error_summary, plan_jobs
    from litliger.tools.kernel_specs import published_plans

    builds = [asdict(b) for b in compile_all(plan_jobs(published_plans(args.configs), args.arch), args.workers)]
    failed = [b for b in builds if b["error"]]
    for b in failed:
        print(f"FAILED {b['kernel']}[{b['spec']}] sm_{b['arch']}: {error_summary(b['error'])}", file=sys.stderr)
    ok = [b for b in builds if not b["error"]]
    print(f"## Resources ({len(ok)} kernel specialisations compiled, {len(failed)} failed)\n")
    if args.full:
        cols = ["kernel", "spec", "arch", "num_warps", "registers", "spill_stores", "shared", "occupancy"]
        print(_table(sorted(ok, key=lambda b: (b["arch"], b["kernel"], b["spec"])), cols))
    else:
        cols = [
            "kernel",
            "arch",
            "specs",
            "warps",
            "registers",
            "spill_stores",
            "shared",
            "occupancy",
            "most_registers",
        ]
        print(_table(_summary(ok), cols))
    limits = ", ".join(f"sm_{a}: {SM_LIMITS[a].shared_per_block} B" for a in args.arch)
    print(f"\nshared: bytes of dynamic shared memory per block (limits {limits}); occupancy: resident warps / 64.")

    traffic = []
    if not args.no_traffic:
        traffic = _run_traffic(args.configs, args.rows)
        for t in traffic:
            t["ratio"] = f"{t['moved'] / max(1, t['minimum']):.3f}"
            t["ratio_activations"] = f"{t['moved_activations'] / max(1, t['minimum_activations']):.3f}"
            t["configs"] = ", ".join(t["configs"])
        print(f"\n## Bytes moved per call (bf16, {args.rows} tokens) against the minimum\n")
        cols = ["kernel", "spec", "moved", "minimum", "ratio", "ratio_activations", "configs"]
        print(_table(sorted(traffic, key=lambda t: (t["kernel"], t["spec"])), cols))
        print("\nratio_activations leaves out 1-D tensors (weights, biases: reloaded per program, L2-resident).")
    if args.json:
        Path(args.json).write_text(json.dumps({"builds": builds, "traffic": traffic}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
