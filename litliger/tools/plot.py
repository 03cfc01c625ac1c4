"""``litliger plot OUT_DIR [OUT_DIR ...]``: the loss curves of training runs, from their ``metrics.jsonl``.

One PNG (matplotlib, the optional ``plot`` extra; drawn with the non-interactive Agg backend): per run, in its own
colour, the training loss as logged (thin) and smoothed by an exponential moving average (thick), the validation
loss (markers), a mixture's per-source validation losses (dashed) and the learning rate (dotted, on a second y
axis), against steps or tokens; a mixture's tokens per source in a second panel. A text summary goes to stdout,
so a terminal-only session reads the run too.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..util.checks import check_between, check_choice
from ..util.files import check_out_file, write_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"  # engine/metrics.py: MetricsLog writes one JSON object per logged step
X_AXES = ("steps", "tokens")
MARKERS = ("s", "^", "v", "D", "P", "X", "*")  # per source of a mixture


class MissingPlotExtra(ValueError):
    """matplotlib is not installed: a one-line user error (cli.py), not a traceback."""


@dataclass
class Run:
    """The lines of one run's metrics.jsonl, by kind: training lines (``loss``) and validation lines (``val_loss``)."""

    name: str
    out_dir: Path
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        """A mixture's sources, by their ``val_loss/<name>`` or ``tokens/<name>`` keys, in first-seen order."""
        names: dict[str, None] = {}
        for line in self.val + self.train:
            for key in line:
                if key.startswith(("val_loss/", "tokens/")):
                    names[key.split("/", 1)[1]] = None
        return list(names)


def read_run(out_dir: Path, name: str | None = None) -> Run:
    """Read ``out_dir/metrics.jsonl``; a line cut short by a kill (not JSON) is skipped, as the loop does."""
    out_dir = Path(out_dir)
    fix = "give the out_dir of a training run (the folder that holds metrics.jsonl)"
    if not out_dir.exists():
        raise ValueError(f"{out_dir} does not exist, in OUT_DIRS; {fix}")
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} is not a folder, in OUT_DIRS; {fix}")
    path = out_dir / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{out_dir} holds no {METRICS_FILE}, in OUT_DIRS; {fix}")
    run = Run(name or out_dir.resolve().name or str(out_dir), out_dir)  # a name for "." too
    for raw in path.read_bytes().split(b"\n"):
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(line, dict) or not isinstance(line.get("step"), int):
            continue
        if _number(line.get("loss")) is not None:
            run.train.append(line)
        if _number(line.get("val_loss")) is not None:
            run.val.append(line)
    if not run.train and not run.val:
        raise ValueError(f"{path} holds no logged step yet, in OUT_DIRS; plot it once the run has logged a step")
    run.train.sort(key=lambda line: line["step"])
    run.val.sort(key=lambda line: line["step"])
    return run


def read_runs(out_dirs: list[Path]) -> list[Run]:
    """Every run, named by its folder (by the path as given where two folders share a name)."""
    if not out_dirs:
        raise ValueError("no run, in OUT_DIRS; give the out_dir of at least one training run")
    names = [Path(d).resolve().name or str(d) for d in out_dirs]
    names = [str(d) if names.count(n) > 1 else n for d, n in zip(out_dirs, names, strict=True)]
    names = [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]  # the same folder twice
    return [read_run(d, n) for d, n in zip(out_dirs, names, strict=True)]


def _number(value: object) -> float | None:
    """A finite or infinite float, or None for anything else (a bool, a string, a missing key)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def ema(values: list[float], smooth: float) -> list[float]:
    """Exponential moving average with weight ``smooth`` on the past, debiased (TensorBoard's smoothing): the
    first value is the first point, not a pull towards zero. ``smooth`` 0 returns the values."""
    out, avg = [], 0.0
    for i, value in enumerate(values, start=1):
        avg = smooth * avg + (1 - smooth) * value
        out.append(avg / (1 - smooth**i) if smooth else value)
    return out


def series(lines: list[dict], x: str, key: str) -> tuple[list[float], list[float]]:
    """(x values, ``key`` values) of the lines that hold both; ``x`` is ``steps`` or ``tokens``."""
    xkey = "step" if x == "steps" else "tokens"
    pairs = [(_number(line.get(xkey)), _number(line.get(key))) for line in lines]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    return [a for a, _ in pairs], [b for _, b in pairs]


def figure(runs: list[Run], x: Literal["steps", "tokens"] = "steps", smooth: float = 0.9) -> Figure:
    """The matplotlib Figure (Agg): the loss panel (its lr on a twin y axis) and, when a run is a mixture, a
    panel of tokens per source. Every line is labelled ``<run> <series>``: ``train loss``, ``train loss (EMA)``,
    ``val_loss``, ``val_loss/<source>``, ``lr`` and ``tokens/<source>``."""
    from matplotlib.figure import Figure

    mixture = any(key.startswith("tokens/") for run in runs for line in run.train for key in line)
    fig = Figure(figsize=(12, 8.5 if mixture else 5.5), layout="constrained")
    axes = fig.subplots(2 if mixture else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    lr_ax = ax.twinx()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors, strict=True):
        xs, loss = series(run.train, x, "loss")
        if xs:
            ax.plot(xs, loss, color=color, linewidth=0.8, alpha=0.35, label=f"{run.name} train loss")
            ax.plot(xs, ema(loss, smooth), color=color, linewidth=2.2, label=f"{run.name} train loss (EMA)")
        xs, val = series(run.val, x, "val_loss")
        if xs:
            ax.plot(xs, val, color=color, linestyle="none", marker="o", markersize=6, label=f"{run.name} val_loss")
        for i, source in enumerate(run.sources):
            xs, val = series(run.val, x, f"val_loss/{source}")
            if xs:
                label = f"{run.name} val_loss/{source}"
                marker = MARKERS[i % len(MARKERS)]
                ax.plot(xs, val, color=color, linestyle="--", marker=marker, markersize=4, label=label)
        xs, lr = series(run.train, x, "lr")
        if xs:
            lr_ax.plot(xs, lr, color=color, linestyle=":", linewidth=1.2, label=f"{run.name} lr")
    ax.set_ylabel("loss")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_ylim(bottom=0)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(True, alpha=0.3)
    ax.set_title(", ".join(run.name for run in runs))
    handles = ax.get_legend_handles_labels()
    lr_handles = lr_ax.get_legend_handles_labels()
    legend = {"fontsize": "small", "loc": "upper left", "bbox_to_anchor": (1.1, 1.0)}  # right of the lr axis
    ax.legend(handles[0] + lr_handles[0], handles[1] + lr_handles[1], **legend)
    if mixture:
        tokens_ax = axes[1]
        for run, color in zip(runs, colors, strict=True):
            for i, source in enumerate(run.sources):
                xs, tokens = series(run.train, x, f"tokens/{source}")
                if xs:
                    label = f"{run.name} tokens/{source}"
                    style = ("-", "--", "-.", ":")[i % 4]
                    tokens_ax.plot(xs, tokens, color=color, linestyle=style, label=label)
        tokens_ax.set_ylabel("tokens per source")
        tokens_ax.grid(True, alpha=0.3)
        tokens_ax.legend(**legend)
    axes[-1].set_xlabel("step" if x == "steps" else "tokens")
    return fig


def summary(run: Run) -> str:
    """One line about a run: steps, tokens, first/last/min training loss, last validation loss (per source)."""
    parts = [f"{run.name}:"]
    if run.train:
        first, last = run.train[0], run.train[-1]
        best = min(run.train, key=lambda line: line["loss"] if math.isfinite(line["loss"]) else math.inf)
        tokens = f", {last['tokens']:,} tokens" if isinstance(last.get("tokens"), int) else ""
        parts.append(f"steps {first['step']}-{last['step']} ({len(run.train)} logged{tokens});")
        parts.append(
            f"train loss first {first['loss']:.4f}, last {last['loss']:.4f}, "
            f"min {best['loss']:.4f} (step {best['step']});"
        )
    else:
        parts.append("no training line;")
    if run.val:
        last = run.val[-1]
        per_source = {k: v for k, v in last.items() if k.startswith("val_loss/") and _number(v) is not None}
        sources = "".join(f", {k} {v:.4f}" for k, v in per_source.items())
        parts.append(f"val_loss {last['val_loss']:.4f} (step {last['step']}{sources})")
    else:
        parts.append("no validation")
    return " ".join(parts)


def _agg() -> None:
    """Load matplotlib with the Agg backend (no display needed), or say in one line how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        message = "litliger plot needs matplotlib, in the installation; pip install 'litliger[plot]'"
        raise MissingPlotExtra(message) from e
    matplotlib.use("Agg")


def main(
    out_dirs: list[Path],
    out_file: Path | None = None,
    x: Literal["steps", "tokens"] = "steps",
    smooth: float = 0.9,
) -> Path:
    """Plot the loss curves of training runs (their metrics.jsonl) to a PNG, and print a summary of each run.

    Args:
        out_dirs: the out_dir of one or more training runs (each holds metrics.jsonl); several runs share the
            figure, one colour each, named by their folders.
        out_file: the PNG to write (default: loss.png in the first out_dir).
        x: the x axis: optimizer ``steps`` or training ``tokens``.
        smooth: weight of the past in the moving average drawn over the training loss, in [0, 1) (0: none).
    """
    check_between("smooth", smooth, 0.0, 1.0, "use a weight in [0, 1), e.g. 0.9; 0 draws no average", high_open=True)
    check_choice("x", x, X_AXES)
    out_dirs = [Path(d) for d in ([out_dirs] if isinstance(out_dirs, (str, Path)) else out_dirs)]
    out_file = Path(out_file) if out_file is not None else (out_dirs[0] / "loss.png" if out_dirs else None)
    if out_file is not None:
        check_out_file(out_file, "give the path of the PNG file to write")
    runs = read_runs(out_dirs)
    _agg()
    fig = figure(runs, x, smooth)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    write_atomically(out_file, png.getvalue())
    for run in runs:
        print(summary(run))
    print(f"wrote {out_file}")
    return out_file
