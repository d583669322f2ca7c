"""Checks of `train()` in a mixed precision, shared by the CPU test (bf16) and the GPU tests (bf16 and fp16 on CUDA):
the loss falls when overfitting two samples, and a resumed run repeats the straight one bit for bit."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from magicid.training.trainer import train


def check_loss_falls(tiny_train_params, root: Path, device: str, dtype: str, steps: int = 40) -> list[float]:
    """Overfit two samples for `steps` steps in `dtype`'s mixed precision on `device`; the losses of the run."""
    params = tiny_train_params(
        f"model.device={device}", f"model.dtype={dtype}", f"train.steps={steps}", "train.lr=3e-3",
        "train.checkpoint_every=1000", "train.clone_face.prob=0", "train.eval_every=0", out=f"fall-{dtype}",
    )  # fmt: skip
    result = train(params, root, progress=False, track=False)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses
    tenth = max(1, steps // 4)
    assert sum(losses[-tenth:]) < 0.9 * sum(losses[:tenth]), (
        f"{dtype} on {device}: the loss did not fall: {losses}"
    )
    weights = load_file(str(result.adapter_dir / "adapter.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}, "the trained adapter is saved in float32"
    return losses


def check_resume_exact(
    tiny_train_params, root: Path, device: str, dtype: str, extra: tuple[str, ...] = ()
) -> None:
    """4 steps straight vs 2 steps, then --resume to 4: the same losses and the same adapter, bit for bit. `extra`:
    further overrides of both runs (the throughput levers)."""
    common = (
        f"model.device={device}", f"model.dtype={dtype}", "train.steps=4", "train.checkpoint_every=2",
        "train.lr=1e-3", "train.eval_every=0", "train.clone_face.prob=0.5", *extra,
    )  # fmt: skip
    straight = train(tiny_train_params(*common, out=f"straight-{dtype}"), root, progress=False, track=False)
    resumed_params = tiny_train_params(*common, out=f"resumed-{dtype}")
    train(resumed_params, root, steps=2, progress=False, track=False)
    resumed = train(resumed_params, root, steps=4, resume=True, progress=False, track=False)
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == straight.losses[step], (
            step,
            resumed.losses[step],
            straight.losses[step],
        )
    a = load_file(str(straight.adapter_dir / "adapter.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
