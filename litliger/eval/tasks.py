"""``litliger evaluate --tasks``: lm-evaluation-harness tasks on a checkpoint, through ``LitligerLM``.

Tasks are lm_eval's registered names (``hellaswag``, ``arc_easy``, ...) or local task definitions: a task YAML
file or a folder of them (lm_eval's ``include_path``), named in the same list. lm_eval downloads a registered
task's dataset through ``datasets`` when it runs; a local task reads its own files. The results are lm_eval's own
JSON (``results``, ``configs``, ``versions``, ``n-shot``, ...; the per-sample log is not kept) and its table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..util.files import check_out_file, write_atomically


class MissingEvalExtra(ValueError):
    """lm-evaluation-harness is not installed: one line saying how to install it (cli.py), not a traceback."""


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table
    except ImportError as e:
        raise MissingEvalExtra(
            "litliger evaluate --tasks runs lm-evaluation-harness, which is not installed, in the installation; "
            "pip install 'litliger[eval]'"
        ) from e
    return lm_eval, TaskManager, handle_non_serializable, make_table


def local_task_names(path: Path) -> list[str]:
    """The ``task:`` names a task YAML file, or every YAML file under a folder, defines."""
    files = [path] if path.is_file() else sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")])
    names = []
    for f in files:
        match = re.search(r"^task:\s*['\"]?([^'\"\s#]+)", f.read_text(encoding="utf-8"), flags=re.MULTILINE)
        if match:
            names.append(match.group(1))
    if not names:
        raise ValueError(f"{path} defines no lm_eval task (no 'task:' line), in --tasks; give a task YAML or folder")
    return names


def run_tasks(
    checkpoint_dir: Path,
    tasks: list[str],
    *,
    out_file: Path,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> dict[str, Any]:
    """Run ``tasks`` on the checkpoint, print lm_eval's table, write its results JSON to ``out_file``; return it."""
    lm_eval, TaskManager, handle_non_serializable, make_table = _lm_eval()
    from .lm_eval import LitligerLM

    if not tasks:
        raise ValueError("--tasks is empty; name lm_eval tasks (e.g. hellaswag) or local task YAML files / folders")
    check_out_file(Path(out_file), "give the path of a file to write the results JSON to")
    include, names = [], []
    for task in tasks:
        path = Path(task)
        if path.suffix in (".yaml", ".yml") or path.is_dir():
            if not path.exists():
                raise FileNotFoundError(f"task file {path} does not exist, in --tasks; give an existing YAML file")
            include.append(str(path.parent if path.is_file() else path))
            names += local_task_names(path)
        else:
            names.append(task)
    manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise ValueError(
            f"unknown lm_eval task {', '.join(repr(u) for u in unknown)}, in --tasks; `lm_eval --tasks list` names "
            "the installed ones, or give a local task YAML file or folder"
        )
    model = LitligerLM(checkpoint_dir, device=device, precision=precision)
    results = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, batch_size=batch_size, log_samples=False)  # fmt: skip
    results["config"] = {**results.get("config", {}), "model": "litliger", "checkpoint_dir": str(checkpoint_dir)}
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    write_atomically(Path(out_file), json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    print(f"wrote {out_file}")
    return results
