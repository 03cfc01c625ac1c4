"""Test-wide setup.

Without a GPU, Triton kernels run on CPU tensors through the Triton interpreter. The interpreter is
chosen when a kernel is decorated, so TRITON_INTERPRET is set here, before any test imports litliger.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests pick their backend explicitly; a stray environment setting must not change what they test.
os.environ.pop("LITLIGER_KERNELS", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU (through the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
