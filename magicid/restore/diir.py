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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from magicid.errors import DataError, MagicIDError
from magicid.imaging.crops import zoom_crop
from magicid.models.denoise import StepConditions
from magicid.restore.inversion import ddim_invert, ddim_reconstruct
from magicid.restore.matching import ReferenceIdentity, match_identities
from magicid.restore.noise import encode_prompt, has_mgmica, noise_function
from magicid.restore.plan import (
    FaceSelection,
    PlannedFace,
    as_uint8_image,
    blend_alpha,
    compose,
    face_mask_in_crop,
    landmark_map_in_crop,
    plan_faces,
    resize_square,
    to_tensor,
    to_uint8,
)

if TYPE_CHECKING:
    pass


@dataclasses.dataclass
class RestoredFace:
    """One face that DIIR restored.

    Attributes:
        bbox: (4,) float32 face box `x0, y0, x1, y1` in input pixels.
        crop_box: `(x0, y0, x1, y1)` the square crop that was restored and blended back.
        bucket: the crop resolution it went through the UNet at.
        identity: index of the reference identity assigned, or None (restored with its own embedding,
            or without identity features when there is no adapter).
        identity_name: the reference's name ("" if none).
        similarity: cosine similarity to its best-matching reference (None if not matched by embedding);
            below `diir.min_match_similarity` the match was not applied (identity None).
        alpha: uint8 (side, side) blend mask over `crop_box` (0 = input kept exactly).
        inversion_iterations: fixed-point refinements spent, per inverse step.
    """

    bbox: np.ndarray
    crop_box: tuple[int, int, int, int]
    bucket: int
    identity: int | None
    identity_name: str
    similarity: float | None
    alpha: np.ndarray
    inversion_iterations: list[int]


@dataclasses.dataclass
class RestoreResult:
    """What `DIIR.restore` returns.

    Attributes:
        image: the restored image (PIL RGB, the input's size).
        faces: the restored faces, in input order (left to right when detected).
        mask: uint8 (H, W) union of the faces' blend masks; where it is 0 the output equals the input byte
            for byte.
        note: what happened, in words ("" when every selected face was restored normally).
        stats: counts: `faces_detected`, `faces_restored`, `batches`, `unet_calls`, `unet_sample_evals`,
            `controlnet_calls`, `controlnet_sample_evals`, `inversion_sample_evals`.
    """

    image: Image.Image
    faces: list[RestoredFace]
    mask: np.ndarray
    note: str = ""
    stats: dict[str, int] = dataclasses.field(default_factory=dict)


_EMPTY_STATS = ("faces_detected", "faces_restored", "batches", "unet_calls", "unet_sample_evals",
                "controlnet_calls", "controlnet_sample_evals", "inversion_sample_evals")  # fmt: skip


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
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
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
        unless one is given.
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
        """DIIR over a `magicid.models.backbone.Backbone`. The tiny backbone built in code (`source="tiny"`)
        has no native size, so it keeps `diir.buckets` as they are; a loaded one keeps its floor."""
        return cls(
            backbone.unet, backbone.vae, backbone.text_encoder, backbone.tokenizer, backbone.scheduler, adapter,
            analyzer, params, text_encoder_2=getattr(backbone, "text_encoder_2", None),
            tokenizer_2=getattr(backbone, "tokenizer_2", None),
            min_bucket=0 if backbone.source == "tiny" else None,
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

    def identity_crop(self, pixels: np.ndarray, bbox: np.ndarray) -> np.ndarray:
        """uint8 (S, S, 3) identity crop (`model.id_crop_size`) with the one identity-crop margin
        (`data.crop_margin`: IDZoom's crops that training sees, the pipeline's reference crops)."""
        return zoom_crop(pixels, bbox, self.params.model.id_crop_size, self.params.data.crop_margin)[0]

    def reference_from_image(self, image: Image.Image | np.ndarray, name: str = "") -> ReferenceIdentity:
        """A reference identity from a photo: its largest face's embedding and identity crop.

        Raises:
            DataError: no face found in the photo (the message names it).
        """
        pixels = as_uint8_image(image, f"reference {name or ''}".strip())
        faces = self.analyzer.analyze(pixels)
        if not faces:
            raise DataError(
                f"reference {name or '(image)'}: no face found; give a photo where the face is visible"
            )
        face = max(faces, key=lambda f: f.width * f.height)
        return ReferenceIdentity(
            np.asarray(face.embedding, np.float32), self.identity_crop(pixels, face.bbox), name
        )

    def _encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings (1, L, C) and, for SDXL, the pooled embedding (1, C_pool); cached per prompt."""
        if prompt not in self._prompt_cache:
            encoders = [(self.tokenizer, self.text_encoder)]
            if self.is_sdxl:
                encoders.append((self.tokenizer_2, self.text_encoder_2))
            hidden, pooled = encode_prompt(encoders, prompt, self.is_sdxl, self.device)
            self._prompt_cache[prompt] = (
                hidden.to(self.dtype),
                None if pooled is None else pooled.to(self.dtype),
            )
        return self._prompt_cache[prompt]

    def _text_conditioning(self, prompt: str, n: int, bucket: int) -> tuple[torch.Tensor, dict | None]:
        """(n, L, C) text embeddings and SDXL's added conditions for n crops at `bucket` px (None: SD 1.x)."""
        hidden, pooled = self._encode_prompt(prompt)
        if not self.is_sdxl:
            return hidden.expand(n, -1, -1), None
        # SDXL's micro-conditioning: original size, crop top-left, target size (the crop, uncropped).
        time_ids = torch.tensor(
            [[bucket, bucket, 0, 0, bucket, bucket]], device=self.device, dtype=self.dtype
        )
        return hidden.expand(n, -1, -1), {
            "text_embeds": pooled.expand(n, -1),
            "time_ids": time_ids.expand(n, -1),
        }

    def _faces(self, image: np.ndarray, boxes: Sequence[Any] | None) -> list[tuple[np.ndarray, Any | None]]:
        """(bbox, Face or None) for every face: detected, or the given boxes / Face objects."""
        if boxes is None:
            return [(np.asarray(f.bbox, np.float32), f) for f in self.analyzer.analyze(image)]
        height, width = image.shape[:2]
        out = []
        for i, box in enumerate(boxes):
            face = box if hasattr(box, "bbox") else None
            bbox = np.asarray(face.bbox if face is not None else box, dtype=np.float32).reshape(-1)
            if (
                bbox.shape != (4,)
                or not np.isfinite(bbox).all()
                or not (0 <= bbox[0] < bbox[2] <= width and 0 <= bbox[1] < bbox[3] <= height)
            ):
                raise DataError(
                    f"boxes[{i}]={bbox.tolist()}: expected x0 < x1, y0 < y1 inside the {width}x{height} image"
                )
            out.append((bbox, face))
        return out

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
        pixels = as_uint8_image(image)
        height, width = pixels.shape[:2]

        def unchanged(note: str, n_detected: int = 0) -> RestoreResult:
            stats = dict.fromkeys(_EMPTY_STATS, 0) | {"faces_detected": n_detected}
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
        stats = dict.fromkeys(_EMPTY_STATS, 0) | {"faces_detected": n_found, "faces_restored": len(jobs)}
        restored: dict[int, RestoredFace] = {}
        chunks = []
        for bucket in sorted({j.bucket for j in jobs}):
            group = [j for j in jobs if j.bucket == bucket]
            chunks += [group[start : start + cfg.batch] for start in range(0, len(group), cfg.batch)]
        # Each chunk runs its inverse steps, then as many denoising steps: a fixed total, whatever the
        # number of fixed-point refinements.
        bar = tqdm(total=2 * n_steps * len(chunks), desc="DIIR", unit="step", **self._progress_bar_config)
        with bar:
            for chunk in chunks:
                bucket = chunk[0].bucket
                bar.set_postfix_str(f"{len(chunk)} face(s) at {bucket} px")
                patches, iterations = self._restore_chunk(pixels, chunk, refs, prompt, stats, bar.update)
                for job, patch, iters in zip(chunk, patches, iterations, strict=True):
                    side = job.crop_box[2] - job.crop_box[0]
                    alpha = blend_alpha(job.crop_box, job.bbox, cfg.feather, (width, height))
                    compose(out, resize_square(patch, side), alpha, job.crop_box)
                    x0, y0, x1, y1 = job.crop_box
                    mask[y0:y1, x0:x1] = np.maximum(mask[y0:y1, x0:x1], alpha)
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
            for face in planned:
                if face.embedding is None:
                    face.embedding = self._embed_box(pixels, face)
        notes += match_identities(planned, refs, assignment, self.diir_params.min_match_similarity)

    def _embed_box(self, pixels: np.ndarray, face: PlannedFace) -> np.ndarray | None:
        """Embedding of a bare box: the analyzer's face inside the box's crop (None if it finds none)."""
        x0, y0, x1, y1 = face.crop_box
        found = self.analyzer.analyze(np.ascontiguousarray(pixels[y0:y1, x0:x1]))
        if not found:
            return None
        return np.asarray(max(found, key=lambda f: f.width * f.height).embedding, np.float32)

    def _restore_chunk(self, pixels, chunk: list[PlannedFace], refs, prompt: str, stats: dict[str, int],
                       step_done: Callable[[], Any]):  # fmt: skip
        """Crop, encode, invert, denoise with identity, decode one batch of same-bucket faces.

        `step_done` is called after each inverse and each denoising step.

        Returns:
            (patches uint8 (bucket, bucket, 3) per face, fixed-point iterations per inverse step per face).
        """
        cfg = self.diir_params
        bucket = chunk[0].bucket
        crops = [zoom_crop(pixels, job.bbox, bucket, cfg.crop_margin)[0] for job in chunk]
        # Encode (posterior mean: deterministic).
        vae_config = self.vae.config
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        images = to_tensor(crops, self.device, self.vae.dtype)
        latents = (self.vae.encode(images).latent_dist.mean - shift) * vae_config.scaling_factor
        latents = latents.to(self.dtype)  # (n, 4, bucket/8, bucket/8)
        n = len(chunk)
        text, added = self._text_conditioning(prompt, n, bucket)
        controlnet = control = None
        if self.adapter is not None and any(j.landmarks is not None for j in chunk):
            from magicid.models.conditioning import embed_condition

            controlnet = self.adapter.controlnet
            landmark = np.stack([landmark_map_in_crop(job) for job in chunk])
            # Embedded once for the whole run: the embedding depends on the map only, not on x_t or t.
            control = embed_condition(controlnet, self._condition_tensor(landmark))
        # Invert with landmark conditioning, no identity, no CFG.
        cond = StepConditions(text=text, added_cond_kwargs=added, controlnet=controlnet, control=control)
        inversion = ddim_invert(
            noise_function(self.unet, self.scheduler, cond), self.scheduler, latents, cfg.num_inference_steps,
            cfg.strength, max_iters=cfg.inversion_iters, tol=cfg.inversion_tol, progress=lambda _: step_done(),
        )  # fmt: skip
        # Denoise with identity (MGMICA, masked to the face) + landmarks, CFG by the one rule of
        # `magicid.models.denoise` (unconditional = empty prompt + null identity).
        use_cfg = cfg.guidance_scale > 1.0
        uncond_text, uncond_added = self._text_conditioning("", n, bucket) if use_cfg else (None, None)
        identity = (
            self._identity_conditions(pixels, chunk, refs, use_cfg) if self.adapter is not None else None
        )
        denoise_cond = dataclasses.replace(
            cond, guidance_scale=cfg.guidance_scale, uncond_text=uncond_text,
            uncond_added_cond_kwargs=uncond_added, identity=identity,
        )  # fmt: skip
        clean = ddim_reconstruct(
            noise_function(self.unet, self.scheduler, denoise_cond), self.scheduler, inversion.latents,
            inversion.timesteps, progress=lambda _: step_done(),
        )  # fmt: skip
        decoded = self.vae.decode((clean.to(self.vae.dtype) / vae_config.scaling_factor) + shift).sample
        # Every noise evaluation runs the UNet and, with landmarks, the ControlNet on the same rows; CFG
        # doubles the denoising rows.
        per_row = 2 if denoise_cond.use_cfg else 1
        steps = len(inversion.timesteps)
        calls, rows = inversion.unet_calls + steps, inversion.sample_evals + per_row * n * steps
        stats["batches"] += 1
        stats["unet_calls"] += calls
        stats["unet_sample_evals"] += rows
        if controlnet is not None:
            stats["controlnet_calls"] += calls
            stats["controlnet_sample_evals"] += rows
        stats["inversion_sample_evals"] += inversion.sample_evals
        return list(to_uint8(decoded)), inversion.iterations.T.tolist()  # iterations (n, steps)

    def _condition_tensor(self, landmark: np.ndarray) -> torch.Tensor:
        """ControlNet condition (n, 6, H, W) in [0, 1] from landmark maps uint8 (n, H, W, 3)."""
        from magicid.models.conditioning import make_condition

        maps = torch.from_numpy(landmark).permute(0, 3, 1, 2).float() / 255.0
        return make_condition(None, maps.to(self.device), "landmark").to(self.dtype)

    def _identity_conditions(self, pixels: np.ndarray, chunk: list[PlannedFace], refs: list[ReferenceIdentity],
                             guidance: bool):  # fmt: skip
        """`IdentityConditions`: tokens (n, 1, T, C) from global + local features (and the null identity's for
        CFG), face masks (n, 1, bucket, bucket), scale `model.id_scale`."""
        embeddings, id_crops, masks = [], [], []
        for job in chunk:
            ref = refs[job.identity] if job.identity is not None else None
            embedding = ref.embedding if ref is not None else job.embedding
            local = (
                ref.crop if ref is not None and ref.crop is not None else self.identity_crop(pixels, job.bbox)
            )
            if embedding is not None:
                mask = face_mask_in_crop(job)  # MGMICA writes identity only inside the face box
            else:  # no embedding at all (bare box, no reference): no identity for this face
                embedding = np.zeros(self.adapter.embed_dim, np.float32)
                mask = np.zeros((job.bucket, job.bucket), np.float32)
            if embedding.shape != (self.adapter.embed_dim,):
                raise MagicIDError(
                    f"identity embedding has {embedding.shape[0]} dims, the adapter expects {self.adapter.embed_dim} "
                    "(model.id_embed_dim must match the face backend)"
                )
            embeddings.append(embedding)
            id_crops.append(resize_square(local, self.params.model.id_crop_size))
            masks.append(mask)
        device = self.device
        emb = torch.from_numpy(np.stack(embeddings)).float().to(device).unsqueeze(1)  # (n, 1, D)
        crops_t = to_tensor(id_crops, device, torch.float32).unsqueeze(1)  # (n, 1, 3, S, S)
        id_masks = torch.from_numpy(np.stack(masks)).to(device).unsqueeze(1)  # (n, 1, bucket, bucket)
        identity = self.adapter.identity_conditions(
            emb, crops_t, id_masks, guidance, self.params.model.id_scale
        )
        return dataclasses.replace(
            identity,
            tokens=identity.tokens.to(self.dtype),
            uncond_tokens=None if identity.uncond_tokens is None else identity.uncond_tokens.to(self.dtype),
        )
