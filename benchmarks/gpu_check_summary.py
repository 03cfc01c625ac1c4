"""Gather the outputs of benchmarks/gpu_check.sh into one JSON and one markdown table.

    python -m benchmarks.gpu_check_summary OUT_DIR --mode gpu|cpu --pytest-rc N

Reads OUT_DIR/pytest_gpu.xml, bench_kernels.json and bench_pretrain.json (whichever exist) and writes
OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md. Kernel bandwidth is the benchmark's minimum traffic of forward +
backward (benchmarks.kernels.min_bytes) over its time, against the device's peak where the device is known.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# Peak DRAM bandwidth, GB/s (vendor data sheets), matched against torch.cuda.get_device_name().
PEAK_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
             "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300}  # fmt: skip
KERNEL_VARIANTS = ("triton", "triton_compiled", "eager", "compiled", "liger")


def peak_gbps(device: str) -> float | None:
    return next((v for k, v in PEAK_GBPS.items() if k in device), None)


def pytest_summary(path: Path, rc: int) -> dict[str, Any]:
    if not path.exists():
        return {"returncode": rc, "error": "no junit xml"}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"returncode": rc, **counts}


def kernel_rows(bench: dict[str, Any]) -> list[dict[str, Any]]:
    peak = peak_gbps(bench.get("device", ""))
    rows = []
    for r in bench.get("kernels", []) + bench.get("interpreter", []):
        row = {"kernel": r["kernel"], "shape": r["shape"], "dtype": r["dtype"]}
        for v in KERNEL_VARIANTS:
            ms = (r.get(v) or {}).get("ms")
            row[f"{v}_ms"] = ms
            if ms and r.get("min_bytes"):
                gbps = r["min_bytes"] / ms / 1e6
                row[f"{v}_gbps"] = round(gbps, 1)
                row[f"{v}_peak_pct"] = round(100 * gbps / peak, 1) if peak else None
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# GPU check ({summary['mode']}): {summary['device']}", ""]
    p = summary["pytest_gpu"]
    lines += [f"pytest -m gpu: {p}", "", "## Kernels (forward + backward)", ""]
    cols = ["kernel", "dtype"] + [f"{v}_ms" for v in KERNEL_VARIANTS] + ["triton_gbps", "triton_peak_pct"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in summary["kernels"]]
    if summary["flce_memory"]:
        lines += [
            "",
            "## Fused linear cross-entropy memory",
            "",
            "| variant | tokens | vocab | peak MiB |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {m['variant']} | {m['tokens']} | {m['vocab']} | {_fmt(m.get('peak_mib'))} |"
            for m in summary["flce_memory"]
        ]
    lines += ["", "## Pretrain", "", "| backend | tokens/s | MFU | peak MiB |", "|---|---|---|---|"]
    for r in summary["pretrain"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        lines.append(f"| {r['backend']} | {r['tokens_per_sec']:.0f} | {mfu} | {r['peak_mem_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check_summary", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    parser.add_argument("--pytest-rc", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out_dir
    load = lambda name: json.loads((out / name).read_text()) if (out / name).exists() else {}  # noqa: E731
    kernels, pretrain = load("bench_kernels.json"), load("bench_pretrain.json")
    summary = {
        "mode": args.mode,
        "device": kernels.get("device") or pretrain.get("device") or "unknown",
        "versions": {k: kernels.get(k) for k in ("torch", "triton", "liger_kernel")},
        "pytest_gpu": pytest_summary(out / "pytest_gpu.xml", args.pytest_rc),
        "kernels": kernel_rows(kernels),
        "flce_memory": kernels.get("flce_memory", []),
        "criteria": kernels.get("criteria", {}),
        "pretrain": pretrain.get("rows", []),
    }
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    (out / "gpu_check.md").write_text(markdown(summary))
    print(markdown(summary))
    complete = bool(summary["kernels"]) and bool(summary["pretrain"])
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
