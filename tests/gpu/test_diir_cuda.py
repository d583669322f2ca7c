"""DIIR on CUDA: the background is the input's exactly in every dtype; the inversion round trip in float32 meets
the CPU target (relative MSE <= 1e-5). What bf16 gives is measured by `benchmarks/bench_diir.py --device cuda`
(README "On a GPU")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from magicid.config import load_params
from tests.gpu.conftest import DTYPES, GPU_MARKS
from tests.restore.conftest import detected_face

pytestmark = GPU_MARKS
BOXES = [(40, 40, 68, 68), (150, 30, 190, 70), (100, 160, 124, 184)]


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((256, 256), Image.BICUBIC))


@pytest.mark.parametrize(("dtype_name", "dtype"), DTYPES)
def test_background_is_exact_in_each_dtype(astronaut, dtype_name, dtype):
    from magicid.models.adapter import MagicIDAdapter
    from magicid.models.backbone import load_backbone
    from magicid.restore.diir import DIIR

    params = load_params(
        None, ["model.device=cuda", f"model.dtype={dtype_name}", "diir.num_inference_steps=6"]
    )
    backbone = load_backbone(params)
    adapter = MagicIDAdapter.create(backbone, params)
    diir = DIIR.from_backbone(backbone, adapter=adapter, params=params)
    diir.set_progress_bar_config(disable=True)
    faces = [detected_face(box, seed) for seed, box in enumerate(BOXES)]
    result = diir.restore(astronaut, boxes=faces, faces="all")
    out = np.asarray(result.image)
    assert diir.device.type == "cuda" and diir.dtype == dtype
    assert np.array_equal(out[result.mask == 0], astronaut[result.mask == 0]), (
        f"{dtype_name}: background moved"
    )
    assert (result.mask > 0).any() and not np.array_equal(out, astronaut)


def test_inversion_round_trip_in_float32(astronaut):
    from magicid.imaging.crops import zoom_crop
    from magicid.models.backbone import load_backbone
    from magicid.restore.inversion import round_trip_error
    from magicid.restore.noise import noise_function
    from magicid.restore.plan import to_tensor

    params = load_params(None, ["model.device=cuda"])
    backbone = load_backbone(params)
    cfg = params.diir
    crops = [zoom_crop(astronaut, box, 64, cfg.crop_margin)[0] for box in BOXES]
    with torch.no_grad():
        latents = backbone.vae.encode(to_tensor(crops, "cuda", torch.float32)).latent_dist.mean
        latents = latents * backbone.vae.config.scaling_factor
        ids = backbone.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = backbone.text_encoder(ids.to("cuda"))[0].expand(len(crops), -1, -1)
        noise_fn = noise_function(backbone.unet, backbone.scheduler, text)
        error, _ = round_trip_error(noise_fn, backbone.scheduler, latents, 10, 0.5, cfg.inversion_iters,
                                    cfg.inversion_tol)  # fmt: skip
    print(f"gpu_inversion_mse_fixed_point_tiny_fp32: {error:.3g}")
    assert error <= 1e-5
