"""`litliger plot`: the PNG, the series drawn, the text summary, and bad input in one line."""

import builtins
import json
import math
from pathlib import Path

import pytest

from litliger.cli import join_list_positional, main
from litliger.tools import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(out_dir: Path, steps: int = 12, sources: tuple[str, ...] = (), scale: float = 1.0) -> Path:
    """A metrics.jsonl as the loop writes it: a train line per step, a val line every 4 steps and at the end
    (a mixture's with val_loss/<name>, its train lines with tokens/<name>), and a line cut short by a kill."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        tokens = step * 64
        train = {"step": step, "tokens": tokens, "loss": scale * (6 - 3 * step / steps), "lr": 1e-3 * min(1, step / 3)}
        train.update({f"tokens/{s}": tokens * (i + 1) // (len(sources) + 1) for i, s in enumerate(sources)})
        lines.append(train)
        if step % 4 == 0 or step == steps:
            val = {"step": step, "val_loss": scale * (5.5 - 2 * step / steps), "tokens": tokens}
            val.update({f"val_loss/{s}": scale * (5.0 + i - step / steps) for i, s in enumerate(sources)})
            lines.append(val)
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 13, "lo'
    (out_dir / "metrics.jsonl").write_text(text)
    return out_dir


def labels(fig) -> list[str]:
    return [line.get_label() for ax in fig.axes for line in ax.get_lines()]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_plot_writes_a_png_and_prints_a_summary(tmp_path, capsys):
    run = write_metrics(tmp_path / "run-a", sources=("web", "code"))
    path = plot.main([run])
    assert path == run / "loss.png"
    assert_png(path)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # written atomically: no temporary file left
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"wrote {path}"
    assert out[0].startswith("run-a: steps 1-12 (12 logged, 768 tokens); train loss first 5.7500, last 3.0000")
    assert "val_loss 3.5000 (step 12, val_loss/web 4.0000, val_loss/code 5.0000)" in out[0]


def test_the_figure_holds_every_series(tmp_path):
    runs = plot.read_runs([write_metrics(tmp_path / "mix", sources=("web", "code"))])
    assert [len(runs[0].train), len(runs[0].val), runs[0].sources] == [12, 3, ["web", "code"]]
    fig = plot.figure(runs, "steps", 0.9)
    assert sorted(labels(fig)) == sorted(
        [
            "mix train loss",
            "mix train loss (EMA)",
            "mix val_loss",
            "mix val_loss/web",
            "mix val_loss/code",
            "mix lr",
            "mix tokens/web",
            "mix tokens/code",
        ]
    )
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert list(lines["mix val_loss"].get_xdata()) == [4, 8, 12]
    assert lines["mix val_loss/web"].get_linestyle() == "--"
    assert lines["mix train loss (EMA)"].get_linewidth() > lines["mix train loss"].get_linewidth()
    # smoothing: the average starts at the first point and lags behind a falling loss
    raw, smoothed = lines["mix train loss"].get_ydata(), lines["mix train loss (EMA)"].get_ydata()
    assert smoothed[0] == pytest.approx(raw[0]) and all(s > r for s, r in zip(smoothed[1:], raw[1:], strict=True))
    # --x tokens: the same series against tokens
    fig = plot.figure(runs, "tokens", 0.0)
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert list(lines["mix val_loss"].get_xdata()) == [256, 512, 768]
    assert list(lines["mix train loss (EMA)"].get_ydata()) == list(lines["mix train loss"].get_ydata())
    assert [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()] == ["tokens"]  # under the lowest panel


def test_two_runs_give_two_sets_of_curves_in_two_colors(tmp_path, capsys):
    a, b = write_metrics(tmp_path / "a"), write_metrics(tmp_path / "b", steps=8, scale=0.8)
    out_file = tmp_path / "plots" / "both.png"
    main(["plot", str(a), str(b), "--out_file", str(out_file), "--x", "tokens"])  # the command line, as typed
    assert_png(out_file)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:2]] == ["a", "b"] and out[2] == f"wrote {out_file}"
    fig = plot.figure(plot.read_runs([a, b]), "steps", 0.9)
    names = labels(fig)
    for run in ("a", "b"):
        assert {f"{run} train loss", f"{run} train loss (EMA)", f"{run} val_loss", f"{run} lr"} <= set(names)
    assert len(fig.axes) == 2  # the loss axis and its lr twin: no tokens panel without a mixture
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert lines["a val_loss"].get_color() != lines["b val_loss"].get_color()
    # two folders of one name are told apart by their paths
    (tmp_path / "x").mkdir()
    same = [write_metrics(tmp_path / "x" / "run"), write_metrics(tmp_path / "run")]
    assert [r.name for r in plot.read_runs(same)] == [str(same[0]), str(same[1])]


def test_command_line_words_become_one_list():
    assert join_list_positional(["plot", "a", "--x", "tokens", "b"]) == ["plot", '["a", "b"]', "--x", "tokens"]
    assert join_list_positional(["plot", '["a"]', "--smooth=0"]) == ["plot", '["a"]', "--smooth=0"]
    assert join_list_positional(["plot", "--help"]) == ["plot", "--help"]
    assert join_list_positional(["pretrain", "a", "b"]) == ["pretrain", "a", "b"]


def test_ema():
    assert plot.ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull towards zero
    assert plot.ema([2.0, 0.0], 0.5) == pytest.approx([2.0, 2 / 3])
    assert plot.ema([3.0, 1.0], 0.0) == [3.0, 1.0]


def one_error_line(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("litliger: error: "), err
    assert exit_info.value.code in (1, 2)
    return err[0].removeprefix("litliger: error: ")


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    run = write_metrics(tmp_path / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert one_error_line(["plot", str(empty)], capsys).startswith(f"{empty} holds no metrics.jsonl, in OUT_DIRS; ")
    missing = tmp_path / "missing"
    assert one_error_line(["plot", str(run), str(missing)], capsys).startswith(f"{missing} does not exist, in OUT_DIRS")
    assert one_error_line(["plot", str(run), "--smooth", "1.5"], capsys).startswith("smooth=1.5 must be in [0.0, 1.0)")
    assert one_error_line(["plot", str(run), "--out_file", str(empty)], capsys).startswith(
        f"{empty} is a folder, in --out_file; "
    )
    assert "in --x" in one_error_line(["plot", str(run), "--x", "epochs"], capsys)
    (empty / "metrics.jsonl").write_text('{"step": 1, "lo')  # killed while writing its first line
    assert "holds no logged step yet" in one_error_line(["plot", str(empty)], capsys)
    assert not (run / "loss.png").exists() and not (empty / "loss.png").exists()

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    line = one_error_line(["plot", str(run)], capsys)
    assert line == "litliger plot needs matplotlib, in the installation; pip install 'litliger[plot]'"


def test_summary_of_a_run_without_validation(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lines = [{"step": 1, "tokens": 64, "loss": 5.0, "lr": 0.1}, {"step": 2, "tokens": 128, "loss": math.inf, "lr": 0.1}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    text = plot.summary(plot.read_run(out))
    expected = "run: steps 1-2 (2 logged, 128 tokens); train loss first 5.0000, last inf, min 5.0000 (step 1); "
    assert text == expected + "no validation"
