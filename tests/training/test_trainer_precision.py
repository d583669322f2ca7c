"""`train()` honours `model.dtype` (issue 25): the run's mixed precision comes from `train.mixed_precision` or
`model.dtype`, conflicts and fp16 on a CPU are errors (they used to fall back to float32 silently), and bf16 runs
on a CPU: the loss falls and resume is exact (the same checks run on CUDA in tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from magicid.config import load_params
from magicid.errors import ConfigError
from magicid.training.trainer import resolve_mixed_precision

from .precision_checks import check_loss_falls, check_resume_exact

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("dtype", "mixed", "device", "expected"),
    [
        ("float32", "no", CPU, "no"),
        ("bfloat16", "no", CPU, "bf16"),
        ("float32", "bf16", CPU, "bf16"),
        ("bfloat16", "bf16", CPU, "bf16"),
        ("float16", "no", CUDA, "fp16"),
        ("float32", "fp16", CUDA, "fp16"),
    ],
)
def test_mixed_precision_comes_from_train_or_model_dtype(dtype, mixed, device, expected):
    params = load_params(None, [f"model.dtype={dtype}", f"train.mixed_precision='{mixed}'"])
    assert resolve_mixed_precision(params, device) == expected


def test_conflicting_precisions_and_fp16_on_cpu_are_errors():
    params = load_params(None, ["model.dtype=bfloat16", "train.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="train.mixed_precision=fp16 but model.dtype=bfloat16"):
        resolve_mixed_precision(params, CUDA)
    params = load_params(None, ["train.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="fp16 mixed precision .* needs CUDA"):
        resolve_mixed_precision(params, CPU)


@pytest.mark.slow
def test_bf16_on_cpu_loss_falls_and_resume_is_exact(tmp_path, tiny_train_params):
    from magicid.training.synthetic import write_synthetic_idzoom

    root = write_synthetic_idzoom(tmp_path / "two", n_images=2, crop_size=64, seed=1)
    check_loss_falls(tiny_train_params, root, "cpu", "bfloat16", steps=40)
    check_resume_exact(tiny_train_params, root, "cpu", "bfloat16")
