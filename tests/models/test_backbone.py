import json
from pathlib import Path

import pytest
import torch

from magicid.config import load_params
from magicid.errors import BackboneError
from magicid.models.backbone import SD_SCHEDULER_KWARGS, VAE_SCALE_FACTOR, load_backbone, load_sd_folder
from magicid.models.tiny import TinyBackboneConfig, build_tiny_backbone, fit_vae_scaling_factor


def _unet_output(backbone, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 32, 32, generator=generator)
    ids = backbone.tokenizer(
        "a photo of a person", padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        text = backbone.text_encoder(ids)[0]
        return backbone.unet(latents, 500, text).sample


def test_same_seed_gives_identical_weights_and_outputs(tiny_backbone):
    again = build_tiny_backbone(TinyBackboneConfig(seed=0))
    for a, b in zip(tiny_backbone.unet.state_dict().values(), again.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(_unet_output(tiny_backbone), _unet_output(again))
    assert again.vae.config.scaling_factor == tiny_backbone.vae.config.scaling_factor


def test_different_seed_gives_different_weights(tiny_backbone):
    other = build_tiny_backbone(TinyBackboneConfig(seed=1))
    assert not torch.equal(_unet_output(tiny_backbone), _unet_output(other))


def test_building_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_backbone()
    assert torch.equal(torch.rand(3), expected)


def test_scheduler_has_sd_settings(tiny_backbone):
    config = tiny_backbone.scheduler.config
    assert config.beta_schedule == "scaled_linear"
    assert config.beta_start == pytest.approx(0.00085) and config.beta_end == pytest.approx(0.012)
    assert config.clip_sample is False and config.set_alpha_to_one is False and config.steps_offset == 1
    assert SD_SCHEDULER_KWARGS["prediction_type"] == config.prediction_type == "epsilon"


def test_vae_downsamples_by_8_and_latents_have_unit_variance(tiny_backbone):
    vae = tiny_backbone.vae
    image = torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.mean
    assert latents.shape == (1, 4, 128 // VAE_SCALE_FACTOR, 192 // VAE_SCALE_FACTOR)
    # The fitted factor makes the calibration latents unit-variance; refitting on fresh images agrees.
    refit = fit_vae_scaling_factor(vae, seed=5)
    assert refit == pytest.approx(vae.config.scaling_factor, rel=0.1)
    assert vae.config.scaling_factor != 0.18215


def test_no_attention_at_highest_resolution(tiny_backbone):
    unet = tiny_backbone.unet
    assert not hasattr(unet.down_blocks[0], "attentions")
    assert not hasattr(unet.up_blocks[-1], "attentions")
    cross = [name for name in unet.attn_processors if "attn2" in name]
    assert cross, "the UNet needs cross-attention layers for identity attention"


def test_tokenizer_is_clip_bpe_with_full_vocabulary(tiny_backbone):
    tokenizer = tiny_backbone.tokenizer
    assert tokenizer.model_max_length == 77
    # transformers 5 can silently build a 3-token tokenizer: the vocabulary must be the one we learnt.
    assert len(tokenizer) > 500
    tokens = tokenizer.tokenize("a photo of a person smiling")
    assert tokens == ["a</w>", "photo</w>", "of</w>", "a</w>", "person</w>", "smiling</w>"]
    ids = tokenizer("an unseen wordzz", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids[1:4]  # byte-level fallback: no unknown tokens


def test_save_and_load_round_trip_as_diffusers_folder(tiny_backbone, tmp_path):
    folder = tiny_backbone.save_pretrained(tmp_path / "tiny-sd")
    assert json.loads((folder / "model_index.json").read_text())["unet"][1] == "UNet2DConditionModel"
    loaded = load_sd_folder(folder)
    assert torch.equal(_unet_output(tiny_backbone), _unet_output(loaded))
    assert loaded.tokenizer.tokenize("a photo") == tiny_backbone.tokenizer.tokenize("a photo")
    assert loaded.vae.config.scaling_factor == pytest.approx(tiny_backbone.vae.config.scaling_factor)
    assert loaded.scheduler.config.steps_offset == 1
    params = load_params(None, [f"model.backbone={folder}"])
    assert load_backbone(params).source == str(folder)


def test_missing_folder_is_a_clear_error(tmp_path):
    params = load_params(None, [f"model.backbone={tmp_path / 'absent'}"])
    with pytest.raises(BackboneError, match="folder not found.*model_index.json"):
        load_backbone(params)


def test_incomplete_folder_names_missing_files(tiny_backbone, tmp_path):
    folder = tiny_backbone.save_pretrained(tmp_path / "tiny-sd")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(BackboneError) as info:
        load_sd_folder(folder)
    message = str(info.value)
    assert "unet weights" in message and "tokenizer merges" in message and "vae" not in message


def test_float16_on_cpu_is_refused():
    params = load_params(None, ["model.dtype=float16"])
    with pytest.raises(BackboneError, match="float16 needs CUDA"):
        load_backbone(params)


def test_bfloat16_backbone_runs_on_cpu():
    params = load_params(None, ["model.dtype=bfloat16"])
    backbone = load_backbone(params)
    assert backbone.dtype == torch.bfloat16
    latents = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        out = backbone.unet(
            latents, 10, torch.zeros(1, 77, backbone.cross_attention_dim, dtype=torch.bfloat16)
        )
    assert out.sample.dtype == torch.bfloat16 and torch.isfinite(out.sample.float()).all()


def test_tokenizer_loads_from_vocab_and_merges_alone(tiny_backbone, tmp_path):
    """An SD 1.5 tokenizer folder has vocab.json + merges.txt and no tokenizer.json: the count must survive."""
    from transformers import CLIPTokenizer

    folder = tiny_backbone.save_pretrained(tmp_path / "tiny-sd") / "tokenizer"
    (folder / "tokenizer.json").unlink()
    loaded = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert len(loaded) == len(tiny_backbone.tokenizer)
    assert loaded.tokenize("a photo of a person") == tiny_backbone.tokenizer.tokenize("a photo of a person")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    from magicid.models.tiny import build_tiny_sdxl_backbone

    return build_tiny_sdxl_backbone().save_pretrained(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def test_sdxl_folder_is_checked_for_its_second_encoder(sdxl_folder, tmp_path):
    import shutil

    from magicid.info import model_backend_status
    from magicid.models.backbone import check_sd_folder

    assert check_sd_folder(sdxl_folder) is True
    status = model_backend_status(load_params(None, [f"model.backbone={sdxl_folder}"]))
    assert status == f"local SDXL folder {sdxl_folder} (DIIR restore only)"
    broken = Path(shutil.copytree(sdxl_folder, tmp_path / "broken"))
    (broken / "text_encoder_2" / "model.safetensors").unlink()
    (broken / "tokenizer_2" / "merges.txt").unlink()
    with pytest.raises(BackboneError) as info:
        load_sd_folder(broken)
    message = str(info.value)
    assert "complete diffusers SDXL folder" in message
    assert "text encoder 2 weights" in message and "tokenizer 2 merges" in message and "unet" not in message


def test_float16_sdxl_needs_the_fp16_fix_vae(sdxl_folder):
    from magicid.errors import ConfigError
    from magicid.models.backbone import check_sdxl_vae_dtype

    # SDXL's original VAE (force_upcast true, or unset: diffusers' default) overflows in float16.
    assert json.loads((sdxl_folder / "vae" / "config.json").read_text())["force_upcast"] is True
    with pytest.raises(ConfigError, match="model.dtype=float32.*madebyollin/sdxl-vae-fp16-fix.*vae"):
        load_sd_folder(sdxl_folder, torch_dtype=torch.float16)
    check_sdxl_vae_dtype(sdxl_folder, torch.float32)
    check_sdxl_vae_dtype(sdxl_folder, torch.bfloat16)  # float32's range: no overflow


def test_fp16_fix_vae_is_accepted_in_float16(sdxl_folder, tmp_path):
    import shutil

    from magicid.models.backbone import check_sdxl_vae_dtype

    fixed = Path(shutil.copytree(sdxl_folder, tmp_path / "fixed"))
    config_path = fixed / "vae" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"force_upcast": False}))
    check_sdxl_vae_dtype(fixed, torch.float16)


def test_backbone_parts_must_agree_on_sdxl(tiny_backbone):
    import dataclasses

    from magicid.models.tiny import build_tiny_sdxl_backbone

    sdxl = build_tiny_sdxl_backbone()
    with pytest.raises(BackboneError, match="text_time"):
        dataclasses.replace(sdxl, text_encoder_2=None, tokenizer_2=None)
    with pytest.raises(BackboneError, match="come together"):
        dataclasses.replace(sdxl, tokenizer_2=None)
    with pytest.raises(BackboneError, match="text_time"):
        dataclasses.replace(tiny_backbone, text_encoder_2=sdxl.text_encoder_2, tokenizer_2=sdxl.tokenizer_2)
    tiny_backbone.require_sd1("anything")  # SD 1.x: no error


def test_save_pretrained_leaves_an_attached_adapters_weights_out(tmp_path):
    """MGMICA's processors are submodules of the UNet: its saved weights hold none of them, and they run again after."""
    from safetensors.torch import load_file

    from magicid.config import load_params
    from magicid.models.adapter import MagicIDAdapter
    from magicid.models.mgmica import mgmica_processors
    from magicid.models.tiny import build_tiny_backbone

    backbone = build_tiny_backbone()
    stock_keys = set(backbone.unet.state_dict())
    adapter = MagicIDAdapter.create(backbone, load_params(None))
    assert (
        set(backbone.unet.state_dict()) > stock_keys
    )  # the processors' weights are in the UNet's state dict
    backbone.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(saved) == stock_keys
    adapter.check(backbone.unet)  # the adapter's processors are back on the UNet
    assert len(mgmica_processors(backbone.unet)) == len(adapter.id_projections)
