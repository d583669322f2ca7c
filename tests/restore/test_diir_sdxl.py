"""DIIR on SDXL (plug-and-play): the same invariants as on SD 1.x, on a tiny SDXL-shaped model built in code.

Untouched background, the round-trip bound of fixed-point inversion, SDXL's conditions exactly as its
pipeline computes them (two text encoders, `added_cond_kwargs`), `DIIR.from_pipe(StableDiffusionXLPipeline)`,
an SDXL folder saved and loaded as a backbone, and generation/training stopping on SDXL with a clear error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from magicid.config import load_params
from magicid.errors import ConfigError
from magicid.models.denoise import StepConditions
from magicid.models.tiny import TinySDXLConfig, build_tiny_sdxl_backbone
from magicid.restore.diir import DIIR
from magicid.restore.inversion import round_trip_error
from magicid.restore.matching import ReferenceIdentity
from magicid.restore.noise import has_mgmica, noise_function
from tests.restore.conftest import detected_face

BOXES = [(40, 40, 68, 68), (150, 30, 190, 70), (100, 160, 124, 184)]  # 28, 40, 24 px faces
CPU = torch.device("cpu")
SIZES = TinySDXLConfig()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((256, 256), Image.BICUBIC))


@pytest.fixture(scope="module")
def sdxl():
    """The tiny SDXL backbone without MGMICA (module-scoped: tests must not modify it)."""
    return build_tiny_sdxl_backbone()


@pytest.fixture(scope="module")
def sdxl_with_adapter():
    """A tiny SDXL backbone of its own with a fresh MagicID adapter (MGMICA on its UNet, ControlNet from it)."""
    from magicid.models.adapter import MagicIDAdapter

    params = _params()
    backbone = build_tiny_sdxl_backbone()
    return backbone, MagicIDAdapter.create(backbone, params), params


def _params(*overrides: str):
    return load_params(None, list(overrides))


def _spy(module: torch.nn.Module, monkeypatch) -> list[dict]:
    """Record every forward call's hidden states and added conditions of `module`."""
    calls: list[dict] = []
    forward = module.forward

    def recording(sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        calls.append({"rows": sample.shape[0], "text": encoder_hidden_states,
                      "added": kwargs.get("added_cond_kwargs")})  # fmt: skip
        return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(module, "forward", recording)
    return calls


def _unet_output(backbone, prompt: str = "a photo of a person") -> torch.Tensor:
    diir = DIIR.from_backbone(backbone, params=_params())
    text, added = diir.prompt_conditions(prompt, 1, 64, CPU, torch.float32)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return backbone.unet(latents, 500, text, added_cond_kwargs=added).sample


# -- the tiny SDXL backbone ---------------------------------------------------------------------------------


def test_tiny_sdxl_is_shaped_like_sdxl_and_seeded(sdxl):
    unet = sdxl.unet.config
    assert sdxl.is_sdxl and unet.addition_embed_type == "text_time"
    assert (
        unet.cross_attention_dim
        == sum(SIZES.text_widths)
        == (sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size)
    )
    # The added embedding takes the pooled text embedding + 6 time ids of addition_time_embed_dim each.
    assert sdxl.unet.add_embedding.linear_1.in_features == (
        sdxl.text_encoder_2.config.projection_dim + 6 * unet.addition_time_embed_dim
    )
    again = build_tiny_sdxl_backbone()
    for a, b in zip(sdxl.text_encoder_2.state_dict().values(), again.text_encoder_2.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    assert torch.equal(_unet_output(sdxl), _unet_output(again))
    assert not torch.equal(_unet_output(sdxl), _unet_output(build_tiny_sdxl_backbone(TinySDXLConfig(seed=1))))


# -- DIIR on SDXL -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sdxl_restore_changes_faces_and_nothing_outside_the_masks(sdxl_with_adapter, astronaut, monkeypatch):
    """With identity (MGMICA), landmarks (ControlNet) and CFG: the background is the input's, bit for bit;
    the UNet and the ControlNet get SDXL's added conditions on every call, shaped for the rows they run."""
    backbone, adapter, params = sdxl_with_adapter
    params = params.model_copy(update={"diir": params.diir.model_copy(update={"guidance_scale": 2.0})})
    diir = DIIR.from_backbone(backbone, adapter=adapter, params=params)
    diir.set_progress_bar_config(disable=True)
    unet_calls, controlnet_calls = _spy(backbone.unet, monkeypatch), _spy(adapter.controlnet, monkeypatch)
    faces = [detected_face(box, seed) for seed, box in enumerate(BOXES)]
    refs = [ReferenceIdentity(faces[0].embedding, name="first")]
    result = diir.restore(astronaut, identities=refs, prompt="a photo of a person", boxes=faces, faces="all")

    out = np.asarray(result.image)
    assert np.array_equal(out[result.mask == 0], astronaut[result.mask == 0])
    assert (result.mask > 0).any() and not np.array_equal(out, astronaut)
    assert [f.identity_name for f in result.faces] == ["first", "", ""]
    assert result.stats["controlnet_calls"] == result.stats["unet_calls"] == len(unet_calls) > 0
    assert len(controlnet_calls) == len(unet_calls)
    buckets = {f.bucket for f in result.faces}
    for call in unet_calls + controlnet_calls:
        rows, added = call["rows"], call["added"]
        assert call["text"].shape == (rows, 77, sum(SIZES.text_widths))
        assert added["text_embeds"].shape == (rows, SIZES.pooled_dim)
        assert added["time_ids"].shape == (rows, 6)
        bucket = int(added["time_ids"][0, 0])  # a crop is a whole image: original = target = bucket, no crop
        assert added["time_ids"].tolist() == [[bucket, bucket, 0, 0, bucket, bucket]] * rows
        assert bucket in buckets
    assert {int(c["added"]["time_ids"][0, 0]) for c in unet_calls} == buckets
    # CFG: the denoising calls run unconditional + conditional rows; the two halves' pooled embeddings differ.
    guided = [
        c for c in unet_calls if not torch.equal(c["added"]["text_embeds"][0], c["added"]["text_embeds"][-1])
    ]
    assert guided and all(c["rows"] % 2 == 0 for c in guided)


def test_sdxl_conditions_are_the_sdxl_pipelines(sdxl):
    """DIIR.from_pipe(StableDiffusionXLPipeline) shares its modules, and feeds the UNet exactly the text and
    added conditions the pipeline itself computes (`encode_prompt`, `_get_add_time_ids`)."""
    pipe = sdxl.stable_diffusion_xl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    diir = DIIR.from_pipe(pipe, params=_params())
    assert (
        diir.is_sdxl and diir.text_encoder_2 is pipe.text_encoder_2 and diir.tokenizer_2 is pipe.tokenizer_2
    )
    assert diir.unet is pipe.unet and diir.scheduler is not pipe.scheduler
    assert diir._progress_bar_config == {"disable": True}
    prompt, bucket = "a group photo of friends at the beach", 128
    text, added = diir.prompt_conditions(prompt, 3, bucket, CPU, torch.float32)
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=CPU, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)  # fmt: skip
    time_ids = pipe._get_add_time_ids((bucket, bucket), (0, 0), (bucket, bucket), torch.float32,
                                      text_encoder_projection_dim=SIZES.pooled_dim)  # fmt: skip
    assert torch.equal(text, embeds.expand(3, -1, -1))
    assert torch.equal(added["text_embeds"], pooled.expand(3, -1))
    assert torch.equal(added["time_ids"], time_ids.expand(3, -1))


def test_sdxl_needs_both_encoders_and_an_sdxl_unet(sdxl, tiny_backbone):
    from magicid.errors import MagicIDError

    parts = (sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.tokenizer, sdxl.scheduler)
    with pytest.raises(MagicIDError, match="text_encoder_2 and tokenizer_2"):
        DIIR(*parts)
    sd_parts = (tiny_backbone.unet, tiny_backbone.vae, tiny_backbone.text_encoder, tiny_backbone.tokenizer,
                tiny_backbone.scheduler)  # fmt: skip
    with pytest.raises(MagicIDError, match="not SDXL's"):
        DIIR(*sd_parts, text_encoder_2=sdxl.text_encoder_2, tokenizer_2=sdxl.tokenizer_2)


@pytest.mark.slow
def test_sdxl_fixed_point_inversion_round_trips(sdxl, astronaut, default_params):
    """As on SD 1.x (`test_diir.py`): relative MSE <= 1e-5 at guidance 1, plain DDIM inversion 100x worse."""
    from magicid.imaging.crops import zoom_crop

    cfg = default_params.diir
    crops = [zoom_crop(astronaut, box, 64, cfg.crop_margin)[0] for box in BOXES]  # the 64 px bucket
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = sdxl.vae.encode(batch).latent_dist.mean * sdxl.vae.config.scaling_factor
    text, added = DIIR.from_backbone(sdxl, params=_params()).prompt_conditions(
        "", len(crops), 64, CPU, torch.float32
    )
    cond = StepConditions(text=text, added_cond_kwargs=added)
    figures = {}
    for name, iters in (("plain", 0), ("fixed_point", cfg.inversion_iters)):
        noise_fn = noise_function(sdxl.unet, sdxl.scheduler, cond)
        figures[name], _ = round_trip_error(
            noise_fn, sdxl.scheduler, latents, 10, 0.5, iters, cfg.inversion_tol
        )
    print(
        f"sdxl_inversion_mse_plain: {figures['plain']:.3g}  sdxl_inversion_mse_fixed_point: {figures['fixed_point']:.3g}"
    )
    assert figures["fixed_point"] <= 1e-5
    assert figures["plain"] > 100 * figures["fixed_point"]


# -- an SDXL folder as the backbone -------------------------------------------------------------------------


def test_sdxl_folder_round_trip_loads_as_an_sdxl_backbone(sdxl, tmp_path):
    from magicid.models.backbone import load_backbone

    folder = sdxl.save_pretrained(tmp_path / "tiny-sdxl")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert (folder / "tokenizer_2" / "vocab.json").is_file() and (
        folder / "tokenizer_2" / "merges.txt"
    ).is_file()
    loaded = load_backbone(_params(f"model.backbone={folder}"))
    assert loaded.is_sdxl and loaded.source == str(folder)
    assert loaded.tokenizer_2.tokenize("a photo of a person") == sdxl.tokenizer_2.tokenize(
        "a photo of a person"
    )
    # Same weights (every tensor equal); the outputs agree to float rounding (kernels may sum in another order
    # over the loaded tensors' memory): measured 9e-7 at most.
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), sdxl.unet.state_dict().values(),
                                                 strict=True))  # fmt: skip
    torch.testing.assert_close(_unet_output(loaded), _unet_output(sdxl), rtol=1e-5, atol=1e-5)
    assert loaded.vae.config.scaling_factor == pytest.approx(sdxl.vae.config.scaling_factor)
    # A loaded backbone keeps its native size as the bucket floor (sample_size 32 x 8); the in-code one has none.
    assert DIIR.from_backbone(loaded).min_bucket == 256 and DIIR.from_backbone(sdxl).min_bucket == 0


@pytest.mark.slow
def test_magicid_restore_runs_on_an_sdxl_folder(sdxl, astronaut, tmp_path):
    """`magicid --set model.backbone=SDXL_DIR restore ...`: the loader takes the folder, DIIR restores with it."""
    from typer.testing import CliRunner

    from magicid.cli import app

    folder = sdxl.save_pretrained(tmp_path / "tiny-sdxl")
    Image.fromarray(astronaut).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    result = CliRunner().invoke(
        app, ["--set", f"model.backbone={folder}", "--set", "model.adapter_path=null", "restore", str(tmp_path / "in.png"), "--out", str(out),
              "--faces", "all", "--untrained-adapter", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "bucket 256" in result.output  # the loaded folder's native size (32 x 8) is the bucket floor
    restored = np.asarray(Image.open(out))
    assert restored.shape == astronaut.shape and not np.array_equal(restored, astronaut)


def test_generation_and_training_stop_on_sdxl_with_what_to_do(sdxl, tmp_path):
    from magicid.generate import generate_image
    from magicid.models.pipeline import MagicIDPipeline
    from magicid.training.trainer import train

    params = _params(f"train.out_dir={tmp_path / 'train'}")
    message = "SDXL, which MagicID supports for DIIR restoration only.*magicid restore.*model.backbone=tiny"
    with pytest.raises(ConfigError, match=message):
        MagicIDPipeline.from_backbone(sdxl, None, params)
    with pytest.raises(ConfigError, match="generation.*" + message):
        generate_image(params, "a photo of a person", 0, backbone=sdxl, identities=[np.ones(128, np.float32)])
    assert not has_mgmica(sdxl.unet)  # stopped before an adapter was put on its UNet
    with pytest.raises(ConfigError, match="training.*" + message):
        train(params, tmp_path / "no-dataset-needed", steps=1, backbone=sdxl, progress=False, track=False)
    with pytest.raises(ConfigError, match="SDXL's.*DIIR"):
        MagicIDPipeline(vae=sdxl.vae, text_encoder=sdxl.text_encoder, tokenizer=sdxl.tokenizer, unet=sdxl.unet,
                        scheduler=sdxl.scheduler)  # fmt: skip
