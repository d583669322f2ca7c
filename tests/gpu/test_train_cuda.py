"""`train()` on CUDA in bf16 and fp16 mixed precision: the loss falls when overfitting two samples, and a resumed run
repeats the straight one bit for bit (deterministic kernels on)."""

from __future__ import annotations

import pytest

from tests.gpu.conftest import GPU_MARKS
from tests.training.precision_checks import check_loss_falls, check_resume_exact

pytestmark = GPU_MARKS


@pytest.fixture
def tiny_train_params(tmp_path):
    from magicid.config import load_params

    def build(*overrides: str, out: str = "run"):
        base = ["model.resolution=64", "train.batch_size=2", "model.id_crop_size=32", f"train.out_dir={tmp_path / out}",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_root={tmp_path / 'art'}"]  # fmt: skip
        return load_params(None, base + list(overrides))

    return build


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_loss_falls_and_resume_is_exact(tmp_path, tiny_train_params, deterministic, dtype):
    from magicid.training.synthetic import write_synthetic_idzoom

    root = write_synthetic_idzoom(tmp_path / "two", n_images=2, crop_size=64, seed=1)
    losses = check_loss_falls(tiny_train_params, root, "cuda", dtype, steps=40)
    print(f"{dtype}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    check_resume_exact(tiny_train_params, root, "cuda", dtype)


def test_resume_is_exact_with_the_throughput_levers_on(tmp_path, tiny_train_params, deterministic):
    """Cached latents, fused AdamW (`auto` on CUDA in bf16), persistent loader workers with pinned batches copied
    without blocking: a resumed run (its latent cache refilled) still repeats the straight one bit for bit."""
    from magicid.training.synthetic import write_synthetic_idzoom
    from magicid.training.trainer import train

    root = write_synthetic_idzoom(tmp_path / "two", n_images=2, crop_size=64, seed=1)
    levers = ("train.cache_latents=true", "train.loader_workers=2", "train.optimizer_impl=auto")
    check_resume_exact(tiny_train_params, root, "cuda", "bfloat16", extra=levers)
    result = train(
        tiny_train_params("model.device=cuda", "model.dtype=bfloat16", "train.steps=4", "train.eval_every=0",
                          "train.checkpoint_every=100", *levers, out="counts"),
        root, progress=False, track=False,
    )  # fmt: skip
    assert result.optimizer_impl == "fused"
    assert result.latent_cache_hits > 0 and result.vae_encoded + result.latent_cache_hits == 4 * 2
