"""Direction only, at small settings: the fitted backbone beats the random one (its targets were those of the removed
benchmarks/bench_fitted.py; the offline world's targets are benchmarks/bench_world.py's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def fitted_on_sample(tmp_path_factory):
    """The sample set (real photos) as an IDZoom version, and the backbone fitted to it at small settings."""
    from magicid.config import load_params
    from magicid.data.builder import build_idzoom
    from magicid.data.sample import build_sample_set
    from magicid.models.backbone import load_sd_folder
    from magicid.training.fit import fit_backbone

    root = tmp_path_factory.mktemp("fitdir")
    params = load_params(
        None,
        [
            "data.sample_scales=[1.0, 0.3]",
            "data.workers=1",
            "fit.resolution=128",
            "fit.vae_steps=60",
            "fit.unet_steps=40",
            "fit.vae_batch=4",
            "fit.unet_batch=4",
            "fit.checkpoint_every=1000",
        ],
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than two contending threads on a shared host
    try:
        data = build_idzoom(
            build_sample_set(root / "raw", params), root / "idzoom", params, progress=False
        ).out_dir
        fit_backbone(params, data, root / "fitted", progress=False, track=False)
        yield params, data, load_sd_folder(root / "fitted")
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _face_psnr(backbone, data) -> float:
    from PIL import Image

    from magicid.data.manifest import read_manifest
    from magicid.evaluation.metrics import reconstruction_psnr

    data = Path(data)
    _, faces = read_manifest(data)
    crops = np.stack(
        [np.asarray(Image.open(data / p).convert("RGB").resize((128, 128))) for p in faces["crop_path"]]
    )
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    out = backbone.vae.decode(backbone.vae.encode(x).latent_dist.mean).sample
    rec = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return reconstruction_psnr(crops, rec)["psnr"]


@pytest.mark.slow
def test_fitted_vae_reconstructs_faces_better_than_random(fitted_on_sample):
    from magicid.models.tiny import build_tiny_backbone

    _, data, fitted = fitted_on_sample
    assert _face_psnr(fitted, data) > _face_psnr(build_tiny_backbone(), data)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured (issue 13): the default fit (1000 VAE + 2000 UNet steps) now generates detectable faces in "
    "6/16 seeds at guidance 5 (bench_fitted), but this test's 40-step fit at 128 px draws none, and the "
    "detector's false positives on the random backbone's noise give it 0-1/4; strict, so the day a fit this "
    "small gets there this test reports XPASS and the marker must go",
)
def test_fitted_generations_show_faces_more_often_than_random(fitted_on_sample):
    from magicid.evaluation.metrics import any_face_rate
    from magicid.faces import get_analyzer
    from magicid.models.tiny import build_tiny_backbone

    params, _, fitted = fitted_on_sample
    analyzer = get_analyzer(params.faces)

    def rate(backbone) -> float:
        pipe = backbone.stable_diffusion_pipeline()
        pipe.set_progress_bar_config(disable=True)
        counts = []
        for seed in range(4):
            image = pipe(
                "a photo of a person",
                num_inference_steps=10,
                height=128,
                width=128,
                generator=torch.Generator().manual_seed(1000 + seed),
                output_type="np",
            ).images[0]
            counts.append(len(analyzer.analyze((np.clip(image, 0, 1) * 255).round().astype(np.uint8))))
        return any_face_rate(counts)["any_face_rate"]

    assert rate(fitted) > rate(build_tiny_backbone())
