"""MagicIDPipeline: text-to-image with several identities placed by a face layout (DESIGN §3).

A diffusers `DiffusionPipeline` over an SD-style backbone plus the `MagicIDAdapter`:
- identities: reference face images (analysed with `magicid.faces`: embedding + IDZoom crop) or embeddings,
  encoded to ID tokens by the adapter's `IDEncoder`;
- layout: face boxes, a skeleton map or a landmark map; one face mask per identity is derived from it (boxes:
  feathered rectangles; maps: one region per face, ordered left to right like the face analyser's output);
- MGMICA puts identity i's tokens into the cross-attention at mask i only; the multi-mode ControlNet follows
  the skeleton and/or landmark map (from boxes alone: the face-mesh template drawn in the boxes).

With no identities and no layout it is plain Stable Diffusion: the same latents, prompt embeddings and
scheduler steps as diffusers' `StableDiffusionPipeline`, so the same seed gives the same image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from magicid.errors import ConfigError, DataError, FaceBackendError, ModelInputError
from magicid.imaging.boxes import Box, box_masks, default_boxes
from magicid.imaging.images import as_uint8_image
from magicid.imaging.layout import (
    FaceLayout,
    boxes_from_landmark_map,
    boxes_from_skeleton_map,
    render_box_landmarks,
)
from magicid.models.adapter import MagicIDAdapter
from magicid.models.compilation import compile_denoiser
from magicid.models.conditioning import embed_condition, make_condition
from magicid.models.denoise import StepConditions, guided_prediction
from magicid.models.text import encode_prompts

IdentityInput = PIL.Image.Image | np.ndarray


@dataclass
class MagicIDPipelineOutput(BaseOutput):
    """Output of `MagicIDPipeline`.

    Args:
        images: B PIL images, or an array (B, H, W, 3) float in [0, 1] (`output_type="np"`), or a tensor
            (B, 3, H, W) in [0, 1] (`"pt"`), or latents (B, 4, H/8, W/8) (`"latent"`).
        face_masks: (n_ids, H, W) float32 in [0, 1], the mask of each identity (empty without identities).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    face_masks: np.ndarray


class MagicIDPipeline(DiffusionPipeline):
    """Multi-identity text-to-image: SD backbone + MagicID adapter (ID encoder, MGMICA, MMF ControlNet).

    Args:
        vae, text_encoder, tokenizer, unet, scheduler: the SD backbone (`magicid.models.backbone.Backbone`).
        controlnet: the 6-channel MMF ControlNet (usually `adapter.controlnet`); None = no layout conditioning.
        adapter: `MagicIDAdapter` whose MGMICA processors are installed on `unet`; None = no identities.
        id_crop_size: side of the zoomed reference crop fed to the ID encoder.
        crop_margin: margin of that crop around the face box (fraction of the face side).
        mask_feather: feathering of box masks (fraction of the box side).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["controlnet", "adapter"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        controlnet: ControlNetModel | None = None,
        adapter: MagicIDAdapter | None = None,
        id_crop_size: int = 128,
        crop_margin: float = 0.4,
        mask_feather: float = 0.1,
        controlnet_cfg: str = "both",
    ) -> None:
        super().__init__()
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            raise ConfigError(
                "MagicIDPipeline needs an SD 1.x UNet; this one is SDXL's (addition_embed_type='text_time'), which "
                "MagicID supports for DIIR restoration only (DIIR.from_pipe / `magicid restore`)"
            )
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            controlnet=controlnet,
            adapter=adapter,
        )
        self.register_to_config(
            id_crop_size=id_crop_size,
            crop_margin=crop_margin,
            mask_feather=mask_feather,
            controlnet_cfg=controlnet_cfg,  # `StepConditions.control_branches` (model.controlnet_cfg)
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.face_analyzer = None  # set by `from_backbone` or by hand; needed for reference images only

    @classmethod
    def from_backbone(cls, backbone, adapter: MagicIDAdapter | None, params) -> MagicIDPipeline:
        """Build from a `Backbone`, an adapter (or None) and `Params` (crop, feather and face-backend settings).

        `model.compile` compiles the backbone's UNet and the adapter's ControlNet (`all`: also the VAE) in place
        (`magicid.models.compilation`); the first generation then pays the compilation.

        Raises:
            ConfigError: an SDXL backbone (MagicIDPipeline is SD 1.x; SDXL is supported for DIIR only).
            CompileUnsupportedError: `model.compile` where inductor cannot run (no C++ compiler / Triton).
        """
        backbone.require_sd1("MagicIDPipeline (generation)")
        controlnet = adapter.controlnet if adapter is not None else None
        compile_denoiser(params.model.compile, "model.compile", backbone.unet, controlnet, backbone.vae)
        pipe = cls(
            vae=backbone.vae,
            text_encoder=backbone.text_encoder,
            tokenizer=backbone.tokenizer,
            unet=backbone.unet,
            scheduler=backbone.scheduler,
            controlnet=controlnet,
            adapter=adapter,
            id_crop_size=params.model.id_crop_size,
            crop_margin=params.data.crop_margin,
            mask_feather=params.model.mask_feather,
            controlnet_cfg=params.model.controlnet_cfg,
        )
        pipe._faces_params = params.faces
        return pipe

    # ----------------------------------------------------------------------------------------------- inputs
    def check_inputs(
        self, prompt, identities, layout, height, width, num_inference_steps, guidance_scale, id_scale
    ):
        if not isinstance(prompt, str) and not (
            isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
        ):
            raise ModelInputError(
                f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}"
            )
        if height % (self.vae_scale_factor * 8) or width % (self.vae_scale_factor * 8):
            raise ModelInputError(
                f"height and width must be multiples of {self.vae_scale_factor * 8} (VAE x UNet downsampling), "
                f"got {height}x{width}"
            )
        if num_inference_steps < 1:
            raise ModelInputError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0 or (id_scale is not None and id_scale < 0):
            raise ModelInputError(
                f"guidance_scale and id_scale must be >= 0, got {guidance_scale}, {id_scale}"
            )
        if identities and self.adapter is None:
            raise ModelInputError("identities need a MagicIDAdapter: build the pipeline with adapter=...")
        if identities:
            self.adapter.check(self.unet)  # MGMICAMissingError if the processors were replaced
        if layout is not None and self.controlnet is None:
            raise ModelInputError("a layout needs the MMF ControlNet: build the pipeline with controlnet=...")
        if layout is not None and not isinstance(layout, FaceLayout | list | tuple):
            raise ModelInputError(
                f"layout must be a FaceLayout or a list of (x0, y0, x1, y1) boxes, got {type(layout).__name__}"
            )

    def _analyzer(self):
        if self.face_analyzer is None:
            from magicid.config import FacesParams
            from magicid.faces import get_analyzer

            self.face_analyzer = get_analyzer(getattr(self, "_faces_params", None) or FacesParams())
        return self.face_analyzer

    def prepare_identities(self, identities: Sequence[IdentityInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference images / embeddings -> embeddings (n, D) float32 and crops (n, 3, S, S) in [-1, 1].

        An image is analysed; its largest face gives the embedding and the zoomed crop. An embedding (1-D float
        array, L2-normalised) gets a blank crop (zeros: its local features carry no appearance).
        """
        from magicid.imaging.crops import zoom_crop

        size, dim = self.config.id_crop_size, self.adapter.embed_dim
        embeddings, crops = [], []
        for i, item in enumerate(identities):
            if isinstance(item, np.ndarray) and item.ndim == 1:
                embedding = item.astype(np.float32)
                if not np.isfinite(embedding).all() or abs(float(np.linalg.norm(embedding)) - 1) > 1e-2:
                    raise ModelInputError(
                        f"identity {i}: an embedding must be finite and L2-normalised (norm "
                        f"{float(np.linalg.norm(embedding)):.3f}); use the face backend's embedding as is"
                    )
                crop = np.zeros((3, size, size), np.float32)
            else:
                image = as_uint8_image(item, f"identity {i}")
                faces = self._analyzer().analyze(image)
                if not faces:
                    raise DataError(
                        f"identity {i}: no face found in the reference image ({image.shape[1]}x{image.shape[0]}); "
                        "give a photo where the face is visible, or pass its embedding"
                    )
                face = max(faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
                embedding = np.asarray(face.embedding, np.float32)
                pixels, _ = zoom_crop(image, face.bbox, size, self.config.crop_margin)
                crop = pixels.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
            if embedding.shape != (dim,):
                raise FaceBackendError(
                    f"identity {i}: embedding has shape {embedding.shape}, the adapter expects ({dim},); use the face "
                    "backend the adapter was trained with (model.id_embed_dim)"
                )
            embeddings.append(embedding)
            crops.append(crop)
        return torch.from_numpy(np.stack(embeddings)), torch.from_numpy(np.stack(crops))

    def prepare_layout(
        self, layout: FaceLayout | Sequence[Box] | None, n_ids: int, height: int, width: int
    ) -> tuple[np.ndarray, torch.Tensor | None, str | None]:
        """Face masks (n_ids, H, W) float32, the ControlNet condition (1, 6, H, W) in [0, 1] or None, its mode."""
        if layout is None:
            if n_ids == 0:
                return np.zeros((0, height, width), np.float32), None, None
            layout = FaceLayout(boxes=default_boxes(n_ids, height, width))
        elif not isinstance(layout, FaceLayout):
            layout = FaceLayout(boxes=list(layout))
        maps = {}
        for name in ("skeleton", "landmark"):
            value = getattr(layout, name)
            if value is not None:
                array = as_uint8_image(value, f"layout.{name}")
                if array.shape[:2] != (height, width):
                    raise ModelInputError(
                        f"layout.{name} is {array.shape[1]}x{array.shape[0]}, the image {width}x{height}; render "
                        "the map at the output size"
                    )
                maps[name] = array
        if layout.boxes is not None:
            boxes = list(layout.boxes)
        elif "landmark" in maps:
            boxes = boxes_from_landmark_map(maps["landmark"])
        elif "skeleton" in maps:
            boxes = boxes_from_skeleton_map(maps["skeleton"])
        else:
            raise ModelInputError("layout: give boxes, a skeleton map or a landmark map")
        if n_ids and len(boxes) != n_ids:
            raise ModelInputError(
                f"layout has {len(boxes)} faces but {n_ids} identities were given; give one face per identity "
                "(faces are matched to identities left to right)"
            )
        masks = (
            box_masks(boxes, height, width, self.config.mask_feather)
            if n_ids
            else np.zeros((0, height, width))
        )
        if not maps:
            maps["landmark"] = render_box_landmarks(height, width, boxes)

        def to_tensor(array):
            return None if array is None else torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0

        mode = "fused" if len(maps) == 2 else next(iter(maps))
        condition = make_condition(to_tensor(maps.get("skeleton")), to_tensor(maps.get("landmark")), mode)
        return masks.astype(np.float32), condition, mode

    def encode_prompt(self, prompts: list[str], negative: list[str] | None) -> torch.Tensor:
        """Text embeddings (B, 77, C), or (2B, 77, C) as [negative; positive] when `negative` is given."""

        def encode(texts):  # the one prompt encoder: training and DIIR tokenise alike
            return encode_prompts([(self.tokenizer, self.text_encoder)], texts)[0]

        embeds = encode(prompts)
        if negative is not None:
            embeds = torch.cat([encode(negative), embeds])
        return embeds.to(dtype=self.unet.dtype, device=self.unet.device)

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        identities: Sequence[IdentityInput] | None = None,
        layout: FaceLayout | Sequence[Box] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        id_scale: float | None = None,
        controlnet_conditioning_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> MagicIDPipelineOutput | tuple:
        """Generate images with the given identities at the given layout.

        Args:
            prompt: text prompt(s); B = number of prompts.
            identities: n reference faces, each a PIL image / uint8 (H, W, 3) array (analysed) or a (D,) float
                embedding; the same identities go into every image.
            layout: a `FaceLayout` or a list of n boxes (x0, y0, x1, y1 px); None with identities = n boxes in a
                row; None without identities = plain text-to-image (no ControlNet).
            height, width: output size (px), multiples of 64 (default: the UNet's sample size x 8).
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance; > 1 runs the CFG batch (the unconditional half gets the
                negative prompt and the null identity's tokens, `magicid.models.denoise`).
            negative_prompt: defaults to "".
            id_scale: MGMICA identity scale (default: the adapter's; 0 = the base model).
            controlnet_conditioning_scale: weight of the ControlNet residuals.
            generator: explicit `torch.Generator`(s) for the initial latents.
            latents: (B, 4, H/8, W/8) initial noise instead of sampling it.
            output_type: "pil", "np", "pt" or "latent".
            return_dict: a `MagicIDPipelineOutput` (True) or a tuple (images, face_masks).

        Returns:
            `MagicIDPipelineOutput(images, face_masks)`; face_masks (n, H, W) float32 in [0, 1].
        """
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        identities = list(identities or [])

        # 1. Check inputs
        self.check_inputs(
            prompt, identities, layout, height, width, num_inference_steps, guidance_scale, id_scale
        )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        do_cfg = guidance_scale > 1.0
        device, dtype = self._execution_device, self.unet.dtype

        # 2. Encode the prompt: (B, 77, C), or (2B, 77, C) = [negative; positive] with CFG
        negative = None
        if do_cfg:
            negative = (
                [negative_prompt or ""] * batch if not isinstance(negative_prompt, list) else negative_prompt
            )
            if len(negative) != batch:
                raise ModelInputError(f"negative_prompt has {len(negative)} entries for {batch} prompts")
        prompt_embeds = self.encode_prompt(prompts, negative)

        # 3. Identities -> ID tokens (1, n, T, C); with CFG also the null identity's (the one-CFG-rule: the
        #    unconditional branch = negative prompt + null identity, what training's condition dropout feeds).
        n_ids = len(identities)
        face_masks, condition, _ = self.prepare_layout(layout, n_ids, height, width)
        identity = None
        if n_ids:
            embeddings, crops = self.prepare_identities(identities)
            masks_tensor = torch.from_numpy(face_masks)[None].to(device)  # (1, n, H, W)
            found = self.adapter.identity_conditions(
                embeddings[None], crops[None], masks_tensor, guidance=do_cfg, scale=id_scale
            )
            identity = dataclasses.replace(
                found,
                tokens=found.tokens.to(device=device, dtype=dtype),
                uncond_tokens=None if found.uncond_tokens is None else found.uncond_tokens.to(device, dtype),
            )

        # 4. Layout -> the ControlNet condition (1, 6, H, W), embedded once for every step (B rows)
        control = None
        if condition is not None:
            condition = condition.to(device=device, dtype=self.controlnet.dtype).expand(batch, -1, -1, -1)
            control = embed_condition(self.controlnet, condition)
        conditions = StepConditions(
            text=prompt_embeds[-batch:],
            uncond_text=prompt_embeds[:batch] if do_cfg else None,
            guidance_scale=guidance_scale,
            controlnet=self.controlnet if control is not None else None,
            control=control,
            control_scale=controlnet_conditioning_scale,
            identity=identity,
            control_branches=self.config.controlnet_cfg,
        )

        # 5. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 6. Initial latents (B, 4, H/8, W/8)
        shape = (
            batch,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        elif tuple(latents.shape) != shape:
            raise ModelInputError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=prompt_embeds.dtype) * self.scheduler.init_noise_sigma

        # 7. Denoising loop: the one step of `magicid.models.denoise` (ControlNet -> MGMICA -> UNet -> CFG)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for t in timesteps:
                latent_input = self.scheduler.scale_model_input(latents, t)
                noise_pred = guided_prediction(self.unet, latent_input, t, conditions)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                progress_bar.update()

        # 8. Decode
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(
                decoded, output_type=output_type, do_denormalize=[True] * decoded.shape[0]
            )
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, face_masks
        return MagicIDPipelineOutput(images=images, face_masks=face_masks)
