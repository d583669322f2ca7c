"""GPU checks (issue 25): run with `make test-gpu` or `pytest -m gpu tests/gpu` on a machine with CUDA.

Every test here is marked `gpu` (`pytestmark` in each module) and skips with its reason where
`torch.cuda.is_available()` is false, so the default `make test` collects and skips them on a CPU machine.
Deterministic cuBLAS needs its workspace setting before CUDA starts: set here, at collection, for the exact-resume
checks (nothing else reads it).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

NO_CUDA = (
    "needs a CUDA device: torch.cuda.is_available() is False here (run `make test-gpu` on a GPU machine)"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
GPU_MARKS = [pytest.mark.gpu, requires_cuda]

# (model.dtype, torch dtype) of every dtype the platform offers on CUDA.
DTYPES = [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]


@pytest.fixture()
def deterministic():
    """Deterministic CUDA kernels for the duration of a test (cuDNN, cuBLAS, scatter-adds); restored after."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)  # fmt: skip
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
