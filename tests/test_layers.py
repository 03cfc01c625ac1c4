"""The package's shape, read from the code: imports only point down the layers, no import circle (imports
inside functions included), the root holds only the entry points, no file over 500 lines, and inference
never loads the training engine.

    python tests/test_layers.py     prints the figures (files, layers, circles, upward imports, longest file)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "litliger"

# Lowest first. A module may import its own layer's modules and those of lower layers, never a higher one.
LAYERS = [
    ("util",),
    ("kernels",),
    ("nn",),
    ("model",),
    ("checkpoint",),
    ("data",),
    ("convert", "inference"),
    ("eval", "engine", "serve"),
    ("recipes",),
    ("tools",),
    ("cli", "__main__", "__init__"),
]
ROOT_FILES = {"__init__.py", "__main__.py", "cli.py"}
MAX_LINES = 500


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The absolute names an ``ImportFrom`` brings in (``from . import x`` names the module ``x``)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    return [target, *(f"{target}.{alias.name}" for alias in node.names)]


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in the file (functions too; ``if TYPE_CHECKING``
    blocks are skipped: they never run)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body
            for n in ast.walk(stmt)
        }
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                targets.update(_resolve(name, path.name == "__init__.py", node))
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def layer_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if key in names:
            return i
    raise AssertionError(f"{module} belongs to no layer: add its subpackage to LAYERS in tests/test_layers.py")


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted.

    A package's ``__init__`` that re-exports its modules is not an edge back into them: importing a
    submodule imports its package first anyway, so ``pkg.mod -> pkg`` edges are left out."""
    edges = {a: {b for b in bs if not a.startswith(b + ".")} for a, bs in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def longest_files(root: Path = PACKAGE, n: int = 3) -> list[tuple[int, str]]:
    sizes = [
        (len(p.read_text(encoding="utf-8").splitlines()), str(p.relative_to(root.parent))) for p in root.rglob("*.py")
    ]
    return sorted(sizes, reverse=True)[:n]


def test_imports_point_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_root_holds_only_the_entry_points():
    assert {p.name for p in PACKAGE.iterdir() if p.suffix == ".py"} == ROOT_FILES
    for package in (p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        init = package / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), (
            f"{package} needs an __init__ docstring"
        )


def test_no_file_over_500_lines():
    assert [f for f in longest_files(n=10_000) if f[0] > MAX_LINES] == []


def test_inference_does_not_load_the_training_engine():
    code = (
        "import sys, litliger.inference.generate, litliger.inference.chat, litliger.eval.scoring\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'lightning_fabric')"
        " or m.startswith(('litliger.engine', 'torch.distributed.checkpoint'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"  # (tqdm is loaded by torch itself, through torch.hub)


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE
    graph = import_graph(root)
    print(f"files: {len(graph)}, in the root: {sum(1 for p in root.iterdir() if p.suffix == '.py')}")
    print(f"import circles: {circles(graph)}")
    try:
        print(f"upward imports: {upward_imports(graph)}")
    except AssertionError as e:
        print(f"(layers not defined for this tree: {e})")
    print(f"longest files: {longest_files(root)}")
