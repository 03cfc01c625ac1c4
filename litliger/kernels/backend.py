"""Which implementation an op runs: the Triton kernel or its plain-PyTorch twin.

``LITLIGER_KERNELS`` (read on every call) or :func:`use_backend` (a context manager, which wins)
pick one of:

- ``auto``   (default): Triton for CUDA tensors, the twin for everything else.
- ``triton``: always the Triton kernel. CPU tensors need ``TRITON_INTERPRET=1`` set before
  ``litliger.kernels`` is imported; that is how the kernels are tested without a GPU.
- ``torch``: always the twin (the baseline benchmarks compare against).

Every public op ends in :func:`dispatch`, the one place that choice (and ``torch.compile``'s custom-op path) is
made.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import torch

BACKENDS = ("auto", "triton", "torch")
_T = TypeVar("_T")
_override: ContextVar[str | None] = ContextVar("litliger_kernels_backend", default=None)


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}={name!r} is not a kernel backend; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The backend in force: the innermost :func:`use_backend`, else ``LITLIGER_KERNELS``, else ``auto``."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get("LITLIGER_KERNELS", "auto").strip().lower() or "auto", "LITLIGER_KERNELS")


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed ops on backend ``name`` (``auto``, ``triton`` or ``torch``)."""
    token = _override.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on ``x`` should launch its Triton kernel under the current backend."""
    backend = get_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda
    if x.is_cuda or x.is_meta or interpreting():  # meta: launch plans only (litliger.tools.aot)
        return True
    raise RuntimeError(
        f"kernel backend 'triton' got a tensor on {x.device}; Triton needs CUDA tensors, or "
        "TRITON_INTERPRET=1 set before importing litliger to run the kernels on the CPU interpreter"
    )


def dispatch(
    args: tuple[Any, ...],
    *,
    triton: Callable[..., _T],
    compiled: Callable[..., _T],
    twin: Callable[..., _T],
    compiled_twin: Callable[..., _T] | None = None,
) -> _T:
    """Run a public op on the path the backend picks, called with the op's own (validated) ``args``.

    ``use_triton(args[0])`` (the first argument is the op's main input) decides between the Triton path and the
    plain-PyTorch twin; ``torch.compiler.is_compiling()`` between the two forms of the Triton path:

    - ``compiled(*args)``: while ``torch.compile`` traces, the op's custom ops (``litliger/kernels/_custom_ops.py``),
      so that ``fullgraph=True`` sees one opaque node per op;
    - ``triton(*args)``: in eager, the op's autograd Function (no custom-op dispatcher on the hot path);
    - ``twin(*args)``: the twin, in eager and under ``torch.compile`` alike (dynamo traces plain PyTorch), unless
      ``compiled_twin`` is given for a twin that dynamo cannot trace: then that runs while compiling.
    """
    if use_triton(args[0]):
        return (compiled if torch.compiler.is_compiling() else triton)(*args)
    if compiled_twin is not None and torch.compiler.is_compiling():
        return compiled_twin(*args)
    return twin(*args)
