"""MagicIDAdapter: the trainable part of MagicID (ID encoder, MGMICA ID projections, MMF ControlNet) as one module.

The backbone (UNet, VAE, text encoder) stays frozen; the adapter adds
- `id_encoder`: `IDEncoder`, (embedding, zoomed crop) -> ID tokens,
- `id_projections`: the `MGMICAAttnProcessor`s installed on the UNet's cross-attention layers (`to_k_id`,
  `to_v_id`), an `nn.ModuleDict` keyed by layer name,
- `controlnet`: the 6-channel multi-mode ControlNet.

Saved as one `adapter.safetensors` plus `adapter_config.json` (sizes and a fingerprint of the UNet it was
built for); loading checks that fingerprint, so weights never load silently into the wrong backbone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file, save_file
from torch import nn

from magicid.config import Params
from magicid.errors import BackboneError, ModelInputError
from magicid.models.backbone import Backbone
from magicid.models.conditioning import build_controlnet
from magicid.models.denoise import IdentityConditions, null_identity
from magicid.models.id_encoder import CLIPImageEncoder, IDEncoder, build_image_encoder
from magicid.models.mgmica import (
    MGMICAContext,
    attach_mgmica,
    check_mgmica,
    install_mgmica,
    mgmica_processors,
)
from magicid.utils import atomic_write, atomic_write_text

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1
# The sizes an adapter is built with (`model.*`), saved in its config.
SIZE_KEYS = ("n_id_tokens", "id_embed_dim", "id_image_encoder", "id_scale")


def unet_fingerprint(unet: nn.Module) -> dict[str, Any]:
    """The UNet properties the adapter's shapes depend on."""
    config = unet.config
    return {
        "block_out_channels": list(config.block_out_channels),
        "cross_attention_dim": int(config.cross_attention_dim),
        "down_block_types": list(config.down_block_types),
        "up_block_types": list(config.up_block_types),
        "layers_per_block": config.layers_per_block,
        "mid_block_type": config.mid_block_type,
    }


class MagicIDAdapter(nn.Module):
    """ID encoder + MGMICA ID projections + ControlNet. Build with `create`, persist with `save` / `load`."""

    def __init__(
        self, id_encoder: IDEncoder, id_projections: nn.ModuleDict, controlnet: ControlNetModel, config: dict
    ) -> None:
        super().__init__()
        self.id_encoder = id_encoder
        self.id_projections = id_projections
        self.controlnet = controlnet
        self.config = config

    @classmethod
    def create(cls, backbone: Backbone, params: Params) -> MagicIDAdapter:
        """A freshly initialised adapter for `backbone` (seeded by `params.seed`); installs MGMICA on its UNet.

        The ControlNet is copied from the UNet (zero output convs) and the ID projections from the text
        K/V projections, so a fresh adapter with the ControlNet residuals added changes nothing until identities
        are set. Parts follow the UNet's device and dtype.
        """
        unet = backbone.unet
        model = params.model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            controlnet = build_controlnet(unet)  # before MGMICA: copies the UNet's encoder weights
            projections = install_mgmica(
                unet, scale=model.id_scale, path=model.mgmica_path, dense_above=model.mgmica_dense_above
            )
            id_encoder = IDEncoder(
                embed_dim=model.id_embed_dim,
                cross_attention_dim=backbone.cross_attention_dim,
                n_tokens=model.n_id_tokens,
                image_encoder=build_image_encoder(model.id_image_encoder),
            )
        param = next(unet.parameters())
        id_encoder.to(device=param.device, dtype=param.dtype)
        if model.channels_last:
            controlnet.to(memory_format=torch.channels_last)
        config = {
            "format_version": FORMAT_VERSION,
            "id_embed_dim": model.id_embed_dim,
            "n_id_tokens": model.n_id_tokens,
            "id_image_encoder": model.id_image_encoder,
            "id_scale": model.id_scale,
            "cross_attention_dim": backbone.cross_attention_dim,
            "unet": unet_fingerprint(unet),
            "layers": sorted(projections.keys()),
        }
        return cls(id_encoder, projections, controlnet, config)

    @property
    def device(self) -> torch.device:
        return next(self.id_encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.id_encoder.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        return self.id_encoder.embed_dim

    @property
    def n_tokens(self) -> int:
        return self.id_encoder.n_tokens

    @property
    def mgmica_context(self) -> MGMICAContext:
        """The identity state shared by this adapter's MGMICA processors (what `IdentityConditions` names)."""
        return next(iter(self.id_projections.values())).context

    def attach(self, unet: nn.Module) -> None:
        """Put this adapter's MGMICA processors (back) on `unet`, e.g. after `unet.set_attn_processor(...)` replaced them."""
        attach_mgmica(unet, self.id_projections)

    def check(self, unet: nn.Module) -> None:
        """Raise `MGMICAMissingError` unless `unet`'s cross-attention layers run this adapter's processors."""
        check_mgmica(unet, self.mgmica_context)

    def identity_conditions(
        self,
        embeddings: torch.Tensor,
        crops: torch.Tensor,
        masks: torch.Tensor,
        guidance: bool,
        scale: float | None = None,
    ) -> IdentityConditions:
        """Identities for `magicid.models.denoise.guided_prediction`.

        Args:
            embeddings: (B, n, D) L2-normalised embeddings; crops: (B, n, 3, S, S) in [-1, 1].
            masks: (B or 1, n, H, W) in [0, 1].
            guidance: also encode the null identity (`null_identity`) for CFG's unconditional branch.
            scale: MGMICA scale during the steps (None: the processors' own).
        """
        tokens = self.encode_identities(embeddings, crops)
        uncond = self.encode_identities(*null_identity(embeddings[:1], crops[:1])) if guidance else None
        return IdentityConditions(self.mgmica_context, tokens, masks, uncond, scale)

    def set_scale(self, scale: float) -> None:
        """Identity-branch scale of every MGMICA layer (0 = base model)."""
        for proc in self.id_projections.values():
            proc.scale = float(scale)

    def encode_identities(self, embeddings: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        """ID tokens for every identity of every sample.

        Args:
            embeddings: (B, n_ids, D) float, L2-normalised face-recognition embeddings.
            crops: (B, n_ids, 3, S, S) float in [-1, 1], zoomed face crops.

        Returns:
            (B, n_ids, T, C) ID tokens (T = n_id_tokens, C = cross_attention_dim), in the encoder's dtype.
        """
        if embeddings.ndim != 3 or crops.ndim != 5 or crops.shape[:2] != embeddings.shape[:2]:
            raise ModelInputError(
                f"encode_identities: embeddings (B, n_ids, D) and crops (B, n_ids, 3, S, S) must agree on B and "
                f"n_ids; got {tuple(embeddings.shape)} and {tuple(crops.shape)}"
            )
        batch, n_ids = embeddings.shape[:2]
        param = next(self.id_encoder.parameters())
        tokens = self.id_encoder(
            embeddings.reshape(batch * n_ids, -1).to(param.device), crops.flatten(0, 1).to(param.device)
        )
        return tokens.view(batch, n_ids, self.n_tokens, -1)

    def _saved_state(self) -> dict[str, torch.Tensor]:
        state = self.state_dict()
        if isinstance(self.id_encoder.image_encoder, CLIPImageEncoder):
            # A frozen, external CLIP encoder is referenced by its folder, not copied.
            state = {k: v for k, v in state.items() if not k.startswith("id_encoder.image_encoder.model.")}
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def save(self, directory: str | Path) -> Path:
        """Write `adapter.safetensors` and `adapter_config.json` into `directory` (atomically, file by file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self._saved_state()
        atomic_write(
            directory / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"})
        )
        atomic_write_text(directory / CONFIG_NAME, json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        return directory

    @staticmethod
    def _read_saved(directory: Path, backbone: Backbone) -> tuple[dict, Path]:
        """The saved config and weights file of `directory`, checked: files present, checksums (where the folder
        ships with them), valid JSON, built for this backbone's UNet."""
        from magicid.models.checksums import verify_model_folder

        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise BackboneError(
                    f"model.adapter_path={str(directory)!r}: {path.name} not found; point it at a folder written "
                    "by MagicIDAdapter.save (or `magicid train`), or set model.adapter_path=null"
                )
        verify_model_folder(directory)  # the offline world's adapter: against the world's checksums.sha256
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise BackboneError(f"{config_path}: not valid JSON ({exc}); re-save the adapter") from exc
        expected = unet_fingerprint(backbone.unet)
        if config.get("unet") != expected:
            raise BackboneError(
                f"{config_path}: adapter was built for a UNet {config.get('unet')}, the backbone "
                f"{backbone.source!r} has {expected}; load it with the backbone it was trained on"
            )
        return config, weights_path

    def _load_saved_state(self, weights_path: Path) -> None:
        state = load_file(str(weights_path))
        missing, unexpected = self.load_state_dict(state, strict=False)
        if isinstance(self.id_encoder.image_encoder, CLIPImageEncoder):
            missing = [k for k in missing if not k.startswith("id_encoder.image_encoder.model.")]
        if missing or unexpected:
            raise BackboneError(
                f"{weights_path}: weights do not match the adapter; missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )

    @classmethod
    def load(cls, directory: str | Path, backbone: Backbone, params: Params) -> MagicIDAdapter:
        """Load an adapter saved by `save` onto `backbone` (installs MGMICA on its UNet).

        Sizes (`n_id_tokens`, `id_embed_dim`, `id_image_encoder`, `id_scale`) come from the saved config; the
        rest of `params` (seed) is used to build the structure before the weights are loaded.

        Raises:
            BackboneError: missing files, a UNet that differs from the one the adapter was trained for, or
                missing/unexpected weights (named); ChecksumError (a BackboneError): a file that differs from
                the checksums of the folder it ships in.
        """
        directory = Path(directory).expanduser()
        config, weights_path = cls._read_saved(directory, backbone)
        model = params.model.model_copy(update={key: config[key] for key in SIZE_KEYS})
        adapter = cls.create(backbone, params.model_copy(update={"model": model}))
        adapter._load_saved_state(weights_path)
        assert set(mgmica_processors(backbone.unet)) and len(adapter.id_projections) == len(config["layers"])
        return adapter

    def load_weights(self, directory: str | Path, backbone: Backbone) -> None:
        """Load the weights an adapter of the same sizes saved in `directory` into this one (the starting point of
        a fine-tune: `train.init_from`).

        Raises:
            BackboneError: as `load`, and when the saved sizes differ from this adapter's (each named with the
                `model.` setting that would match).
        """
        directory = Path(directory).expanduser()
        config, weights_path = self._read_saved(directory, backbone)
        differing = [key for key in SIZE_KEYS if config.get(key) != self.config[key]]
        if differing:
            raise BackboneError(
                f"{directory}: the saved adapter has "
                + ", ".join(f"{key}={config.get(key)!r}" for key in differing)
                + ", the adapter to train has "
                + ", ".join(f"model.{key}={self.config[key]!r}" for key in differing)
                + "; set those model.* values to the saved ones to start from it"
            )
        self._load_saved_state(weights_path)
