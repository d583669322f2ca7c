"""DIIR: DDIM-Inversion ID Restoration (MagicID's training-free face restoration, DESIGN §4): the orchestrator.

Small faces in a generated group photo come out with weak identity. DIIR restores them without touching
anything else:

1. detect faces (or take given boxes); select those whose box covers less than `diir.max_face_ratio` of
   the image (or all of them) (`plan.plan_faces`);
2. match the reference identities to ALL detected faces (Hungarian, on embedding similarity), so that a
   large unselected person keeps its own reference; a best match below `diir.min_match_similarity` is not
   forced: that face is restored with its own embedding and the note says so;
3. crop each selected face with a margin (square), zoom it to a resolution bucket (`plan.choose_bucket`;
   never below the backbone's native size), encode with the VAE and DDIM-invert to `diir.strength` with
   landmark conditioning (`inversion.ddim_invert`: fixed-point refinement with an a-posteriori stop);
4. denoise from there with the identity's global (face-recognition embedding) + local (face crop)
   features through MGMICA, masked to the face, plus the landmark conditioning;
5. decode, resize back, and blend into the image with a feathered face mask, in uint8, so that every
   pixel outside the mask is the input's, bit for bit (`plan.blend_alpha`, `plan.compose`).

Selected faces go through the UNet batched: grouped by bucket, chunked by `diir.batch`.

Plug-and-play: `DIIR.from_pipe(pipe)` takes the components of a diffusers Stable Diffusion 1.x pipeline
(MagicID's included) or a `StableDiffusionXLPipeline` (two text encoders, `added_cond_kwargs`); without an
adapter DIIR runs the same inversion/regeneration without identity features or landmark conditioning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from magicid.errors import MagicIDError
from magicid.imaging.crops import zoom_crop
from magicid.imaging.images import as_uint8_image
from magicid.models.backbone import TINY_SOURCES
from magicid.models.compilation import compile_denoiser
from magicid.models.denoise import StepConditions
from magicid.restore.conditions import (
    PromptConditions,
    identity_conditions,
    landmark_condition,
    reference_from_photo,
)
from magicid.restore.inversion import ddim_invert, ddim_reconstruct
from magicid.restore.matching import ReferenceIdentity, embed_bare_boxes, match_identities
from magicid.restore.noise import has_mgmica, noise_function
from magicid.restore.plan import (
    FaceSelection,
    PlannedFace,
    batches,
    blend_back,
    given_faces,
    landmark_map_in_crop,
    plan_faces,
    to_tensor,
    to_uint8,
)
from magicid.restore.result import RestoredFace, RestoreResult, count_batch, zero_stats

__all__ = ["DIIR", "ReferenceIdentity", "RestoreResult", "RestoredFace"]


class DIIR:
    """DDIM-Inversion ID Restoration over the components of a diffusers SD 1.x or SDXL pipeline.

    Args:
        unet: `UNet2DConditionModel` (4 input channels). With an adapter it must carry MGMICA
            (`MagicIDAdapter.create/load` installs it). An SDXL UNet (`addition_embed_type="text_time"`)
            needs `text_encoder_2` and `tokenizer_2`.
        vae: `AutoencoderKL`.
        text_encoder, tokenizer: the pipeline's (first) CLIP text encoder and tokenizer.
        scheduler: any diffusers scheduler; DIIR runs a `DDIMScheduler` built from its config (with SD's
            clean-end convention kept), never mutating the given one.
        adapter: a `MagicIDAdapter` (ID encoder, MGMICA projections, ControlNet) or None: then faces are
            inverted and regenerated without identity features or landmark conditioning.
        analyzer: a `FaceAnalyzer` (detection, landmarks, embeddings); default `get_analyzer(params.faces)`,
            built only when needed.
        params: `Params` (reads `diir`, `faces`, `data.crop_margin`, `model.id_crop_size`, `model.id_scale`).
        text_encoder_2, tokenizer_2: SDXL's second text encoder (with projection) and its tokenizer.
        min_bucket: no face is restored below this resolution. None: the backbone's native size, the UNet's
            `sample_size` x the VAE factor (SD 1.5: 512, SDXL: 1024). `DIIR.from_backbone` passes 0 for the
            tiny backbone built in code (never trained at any size).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        scheduler: Any,
        adapter: torch.nn.Module | None = None,
        analyzer: Any | None = None,
        params: Any | None = None,
        text_encoder_2: torch.nn.Module | None = None,
        tokenizer_2: Any | None = None,
        min_bucket: int | None = None,
    ) -> None:
        from diffusers import DDIMScheduler

        from magicid.config import Params

        self.params = params if params is not None else Params()
        if not isinstance(self.params, Params):
            raise MagicIDError(
                f"DIIR params: expected magicid.config.Params, got {type(self.params).__name__}"
            )
        if getattr(unet.config, "in_channels", 4) != 4:
            raise MagicIDError(
                f"DIIR needs a 4-channel (text-to-image) UNet; got in_channels={unet.config.in_channels} "
                "(an inpainting UNet): pass the base model's UNet"
            )
        if adapter is not None and not has_mgmica(unet):
            raise MagicIDError(
                "DIIR: the adapter's MGMICA processors are not on this UNet; build the adapter with "
                "MagicIDAdapter.create/load on the same backbone whose unet you pass"
            )
        self.is_sdxl = getattr(unet.config, "addition_embed_type", None) == "text_time"
        if self.is_sdxl and (text_encoder_2 is None or tokenizer_2 is None):
            raise MagicIDError(
                "DIIR: an SDXL UNet (addition_embed_type='text_time') needs text_encoder_2 and tokenizer_2; "
                "use DIIR.from_pipe(StableDiffusionXLPipeline)"
            )
        if not self.is_sdxl and text_encoder_2 is not None:
            raise MagicIDError(
                "DIIR: text_encoder_2 given but the UNet is not SDXL's (no addition_embed_type='text_time'); "
                "pass the UNet of the same SDXL pipeline, or no text_encoder_2 for SD 1.x"
            )
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.scheduler = DDIMScheduler.from_config(scheduler.config)
        self.adapter = adapter
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if min_bucket is None:
            sample_size = unet.config.sample_size
            sample_size = min(sample_size) if isinstance(sample_size, list | tuple) else sample_size
            min_bucket = int(sample_size) * self.vae_scale_factor
        self.min_bucket = int(min_bucket)
        self._analyzer = analyzer
        self.prompt_conditions = PromptConditions(tokenizer, text_encoder, tokenizer_2, text_encoder_2)
        self._progress_bar_config: dict[str, Any] = {}

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for `restore`'s progress bar (as diffusers pipelines: `disable=True` hides it)."""
        self._progress_bar_config = dict(kwargs)

    @classmethod
    def from_pipe(cls, pipe: Any, adapter: torch.nn.Module | None = None, analyzer: Any | None = None,
                  params: Any | None = None, min_bucket: int | None = None) -> DIIR:  # fmt: skip
        """DIIR over a pipeline's components (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
        `MagicIDPipeline`, ...).

        Reuses the pipeline's modules (no copy); a pipeline that carries an `adapter` attribute lends it
        unless one is given. `params.model.compile` compiles them in place as `from_backbone` does.
        """
        missing = [
            n
            for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
            if getattr(pipe, n, None) is None
        ]
        if missing:
            raise MagicIDError(
                f"DIIR.from_pipe: {type(pipe).__name__} lacks {', '.join(missing)} (an SD pipeline is needed)"
            )
        adapter = adapter if adapter is not None else getattr(pipe, "adapter", None)
        if params is not None:
            controlnet = getattr(adapter, "controlnet", None)
            compile_denoiser(params.model.compile, "model.compile", pipe.unet, controlnet, pipe.vae)
        diir = cls(
            pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, adapter, analyzer, params,
            text_encoder_2=getattr(pipe, "text_encoder_2", None), tokenizer_2=getattr(pipe, "tokenizer_2", None),
            min_bucket=min_bucket,
        )  # fmt: skip
        # A diffusers pipeline keeps its progress-bar options here; restoring follows them.
        diir.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        return diir

    @classmethod
    def from_backbone(cls, backbone: Any, adapter: torch.nn.Module | None = None, analyzer: Any | None = None,
                      params: Any | None = None) -> DIIR:  # fmt: skip
        """DIIR over a `magicid.models.backbone.Backbone` (SD 1.x or SDXL: its second encoder passed on). The
        tiny backbones built in code (`TINY_SOURCES`) have no native size, so they keep `diir.buckets` as they
        are; a loaded one keeps its floor. `params.model.compile` compiles the UNet, the adapter's ControlNet and
        (`all`) the VAE in place (`magicid.models.compilation`)."""
        if params is not None:
            controlnet = getattr(adapter, "controlnet", None)
            compile_denoiser(params.model.compile, "model.compile", backbone.unet, controlnet, backbone.vae)
        return cls(
            backbone.unet, backbone.vae, backbone.text_encoder, backbone.tokenizer, backbone.scheduler, adapter,
            analyzer, params, text_encoder_2=backbone.text_encoder_2, tokenizer_2=backbone.tokenizer_2,
            min_bucket=0 if backbone.source in TINY_SOURCES else None,
        )  # fmt: skip

    @property
    def analyzer(self) -> Any:
        if self._analyzer is None:
            from magicid.faces import get_analyzer

            self._analyzer = get_analyzer(self.params.faces)
        return self._analyzer

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def diir_params(self):
        return self.params.diir

    # -- inputs ------------------------------------------------------------------------------------------

    def reference_from_image(self, image: Image.Image | np.ndarray, name: str = "") -> ReferenceIdentity:
        """A reference identity from a photo: its largest face's embedding and identity crop.

        Raises:
            DataError: no face found in the photo (the message names it).
        """
        pixels = as_uint8_image(image, f"reference {name or ''}".strip(), copy=True)
        return reference_from_photo(self.analyzer, pixels, name, self.params)

    def _faces(self, image: np.ndarray, boxes: Sequence[Any] | None) -> list[tuple[np.ndarray, Any | None]]:
        """(bbox, Face or None) for every face: detected, or the given boxes / Face objects."""
        if boxes is None:
            return [(np.asarray(f.bbox, np.float32), f) for f in self.analyzer.analyze(image)]
        return given_faces(boxes, image.shape[1], image.shape[0])

    # -- the mechanism -----------------------------------------------------------------------------------

    @torch.inference_mode()  # lighter than no_grad per op; nothing here needs autograd
    def restore(
        self,
        image: Image.Image | np.ndarray,
        identities: Sequence[ReferenceIdentity | Image.Image | np.ndarray] | None = None,
        prompt: str = "",
        faces: FaceSelection = "small",
        boxes: Sequence[Any] | None = None,
        assignment: Sequence[int | None] | None = None,
    ) -> RestoreResult:
        """Restore the identity of the (small) faces of `image`; everything outside the blend masks is kept.

        Args:
            image: PIL image or uint8 (H, W, 3) RGB array.
            identities: reference identities (`ReferenceIdentity`, or photos: their largest face), or None
                (each face restored with its own embedding).
            prompt: the prompt the image was generated with ("" works).
            faces: "small" (faces whose box covers < `diir.max_face_ratio` of the image) or "all".
            boxes: skip detection: every face's box `(x0, y0, x1, y1)` px, or `Face` objects (landmarks and
                embeddings then used). Unselected faces still take part in identity matching.
            assignment: per selected face the index into `identities` (or None: own embedding); default
                Hungarian matching over all faces on embedding similarity.

        Returns:
            A `RestoreResult`.

        Raises:
            DataError: bad image, boxes or reference photos; MagicIDError: inconsistent assignment.
        """
        cfg = self.diir_params
        # 1. check inputs
        if faces not in ("small", "all"):
            raise MagicIDError(f"faces={faces!r}: use 'small' (below diir.max_face_ratio) or 'all'")
        pixels = as_uint8_image(image, copy=True)
        height, width = pixels.shape[:2]

        def unchanged(note: str, n_detected: int = 0) -> RestoreResult:
            stats = zero_stats(faces_detected=n_detected)
            return RestoreResult(
                Image.fromarray(pixels), [], np.zeros((height, width), np.uint8), note, stats
            )

        n_steps = int(cfg.num_inference_steps * cfg.strength)  # the denoising steps strength runs
        if n_steps == 0:
            return unchanged(
                f"diir.strength={cfg.strength} runs no denoising step of {cfg.num_inference_steps}: input returned unchanged"
            )
        # 2. faces: detect (or take the given boxes); plan all, select some
        found = self._faces(pixels, boxes)
        if not found:
            return unchanged("no face found: input returned unchanged")
        planned = plan_faces(found, (width, height), faces, cfg, self.min_bucket)
        jobs = [p for p in planned if p.selected]
        if not jobs:
            return unchanged(
                f"{len(found)} face(s) found, none covers less than diir.max_face_ratio={cfg.max_face_ratio} "
                "of the image: input returned unchanged (use faces='all' to restore them)",
                len(found),
            )
        # 3. identities, matched over all faces
        notes: list[str] = []
        refs = [r if isinstance(r, ReferenceIdentity) else self.reference_from_image(r, f"identities[{k}]")
                for k, r in enumerate(identities or [])]  # fmt: skip
        self._assign(pixels, planned, refs, assignment, notes)
        if self.adapter is None:
            notes.append("no adapter: faces regenerated from their inversion without identity features")
        elif any(j.landmarks is None for j in jobs):
            notes.append(
                "some faces have no landmarks (given as bare boxes): their landmark condition is empty"
            )
        # 4-5. restore batched: group by bucket, chunk by diir.batch; blend back
        return self._restore_jobs(pixels, jobs, refs, prompt, n_steps, len(found), notes)

    def _restore_jobs(self, pixels, jobs, refs, prompt, n_steps: int, n_found: int, notes) -> RestoreResult:
        from tqdm.auto import tqdm

        cfg = self.diir_params
        height, width = pixels.shape[:2]
        out = pixels.copy()
        mask = np.zeros((height, width), np.uint8)
        stats = zero_stats(faces_detected=n_found, faces_restored=len(jobs))
        restored: dict[int, RestoredFace] = {}
        chunks = batches(jobs, cfg.batch)
        # Each chunk runs its inverse steps, then as many denoising steps: a fixed total, whatever the
        # number of fixed-point refinements.
        bar = tqdm(total=2 * n_steps * len(chunks), desc="DIIR", unit="step", **self._progress_bar_config)
        with bar:
            for chunk in chunks:
                bucket = chunk[0].bucket
                bar.set_postfix_str(f"{len(chunk)} face(s) at {bucket} px")
                patches, iterations = self._restore_chunk(pixels, chunk, refs, prompt, stats, bar.update)
                for job, patch, iters in zip(chunk, patches, iterations, strict=True):
                    alpha = blend_back(out, mask, patch, job, cfg.feather)
                    name = refs[job.identity].name if job.identity is not None else ""
                    restored[job.index] = RestoredFace(job.bbox, job.crop_box, bucket, job.identity, name,
                                                       job.similarity, alpha, iters)  # fmt: skip
        # Outside every blend mask the output is the input (compose keeps bytes where alpha = 0).
        assert np.array_equal(out[mask == 0], pixels[mask == 0]), (
            "DIIR changed a pixel outside the blend masks"
        )
        faces_out = [restored[j.index] for j in sorted(jobs, key=lambda j: j.index)]
        return RestoreResult(Image.fromarray(out), faces_out, mask, "; ".join(notes), stats)

    def _assign(self, pixels, planned: list[PlannedFace], refs: list[ReferenceIdentity], assignment,
                notes: list[str]) -> None:  # fmt: skip
        """Embed bare boxes where references need matching, then `match_identities` over all faces."""
        if assignment is None and refs:
            embed_bare_boxes(self.analyzer, pixels, planned)
        notes += match_identities(planned, refs, assignment, self.diir_params.min_match_similarity)

    def _restore_chunk(self, pixels, chunk: list[PlannedFace], refs, prompt: str, stats: dict[str, int],
                       step_done: Callable[[], Any]):  # fmt: skip
        """Crop, encode, invert, denoise with identity, decode one batch of same-bucket faces.

        `step_done` is called after each inverse and each denoising step.

        Returns:
            (patches uint8 (bucket, bucket, 3) per face, fixed-point iterations per inverse step per face).
        """
        cfg = self.diir_params
        bucket = chunk[0].bucket
        device, dtype = self.device, self.dtype
        crops = [zoom_crop(pixels, job.bbox, bucket, cfg.crop_margin)[0] for job in chunk]
        # Encode (posterior mean: deterministic).
        vae_config = self.vae.config
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        images = to_tensor(crops, device, self.vae.dtype)
        latents = (self.vae.encode(images).latent_dist.mean - shift) * vae_config.scaling_factor
        # (n, 4, bucket/8, bucket/8) in float32 whatever the model's dtype: the inversion's own arithmetic (DDIM
        # steps, fixed-point updates, tolerance) in float32 with a bfloat16 UNet round-trips 6x closer than in
        # bfloat16 with fewer UNet evaluations (README "On a GPU"); a no-op for a float32 model.
        latents = latents.float()
        n = len(chunk)
        text, added = self.prompt_conditions(prompt, n, bucket, device, dtype)
        controlnet = control = None
        if self.adapter is not None and any(j.landmarks is not None for j in chunk):
            from magicid.models.conditioning import embed_condition

            controlnet = self.adapter.controlnet
            landmark = np.stack([landmark_map_in_crop(job) for job in chunk])
            # Embedded once for the whole run: the embedding depends on the map only, not on x_t or t.
            control = embed_condition(controlnet, landmark_condition(landmark, device, dtype))
        # Invert with landmark conditioning, no identity, no CFG.
        cond = StepConditions(text=text, added_cond_kwargs=added, controlnet=controlnet, control=control)
        inversion = ddim_invert(
            noise_function(self.unet, self.scheduler, cond), self.scheduler, latents, cfg.num_inference_steps,
            cfg.strength, max_iters=cfg.inversion_iters, tol=cfg.inversion_tol, progress=lambda _: step_done(),
        )  # fmt: skip
        # Denoise with identity (MGMICA, masked to the face) + landmarks, CFG by the one rule of
        # `magicid.models.denoise` (unconditional = empty prompt + null identity).
        use_cfg = cfg.guidance_scale > 1.0
        uncond_text, uncond_added = (
            self.prompt_conditions("", n, bucket, device, dtype) if use_cfg else (None, None)
        )
        identity = None
        if self.adapter is not None:
            identity = identity_conditions(
                self.adapter, self.params, pixels, chunk, refs, use_cfg, device, dtype
            )
        denoise_cond = dataclasses.replace(
            cond, guidance_scale=cfg.guidance_scale, uncond_text=uncond_text,
            uncond_added_cond_kwargs=uncond_added, identity=identity,
            control_branches=self.params.model.controlnet_cfg,
        )  # fmt: skip
        clean = ddim_reconstruct(
            noise_function(self.unet, self.scheduler, denoise_cond), self.scheduler, inversion.latents,
            inversion.timesteps, progress=lambda _: step_done(),
        )  # fmt: skip
        decoded = self.vae.decode((clean.to(self.vae.dtype) / vae_config.scaling_factor) + shift).sample
        count_batch(stats, inversion, n, denoise_cond.use_cfg, controlnet is not None)
        return list(to_uint8(decoded)), inversion.iterations.T.tolist()  # iterations (n, steps)
