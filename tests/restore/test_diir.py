"""DIIR invariants: exact round trip with fixed-point inversion, untouched background, strength 0, no face,
Hungarian assignment, the bucket rule, and batching (grouping, unconverged-subset evaluation)."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from magicid.config import load_params
from magicid.faces.matching import hungarian_match
from magicid.imaging.crops import expand_box, zoom_crop
from magicid.restore.diir import DIIR
from magicid.restore.inversion import (
    ddim_invert,
    ddim_invert_plain,
    ddim_reconstruct,
    ddim_step,
    inverse_step_noise_coefficient,
    round_trip_error,
    strength_timesteps,
)
from magicid.restore.matching import ReferenceIdentity
from magicid.restore.noise import noise_function
from magicid.restore.plan import blend_alpha, choose_bucket, compose
from tests.restore.conftest import detected_face


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((256, 256), Image.BICUBIC))


@pytest.fixture(scope="module")
def text(tiny_backbone):
    ids = tiny_backbone.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return tiny_backbone.text_encoder(ids)[0]


def _latents(backbone, crops: list[np.ndarray]) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return backbone.vae.encode(batch).latent_dist.mean * backbone.vae.config.scaling_factor


def _params(**diir):
    return load_params(None, [f"diir.{k}={v}" for k, v in diir.items()])


def _diir(backbone, params, adapter=None) -> DIIR:
    return DIIR.from_backbone(backbone, adapter=adapter, params=params)


BOXES = [(40, 40, 68, 68), (150, 30, 190, 70), (100, 160, 124, 184)]  # 28, 40, 24 px faces


# -- DDIM inversion ---------------------------------------------------------------------------------------


def test_ddim_step_is_the_schedulers_denoising_step(tiny_backbone):
    scheduler = tiny_backbone.scheduler.__class__.from_config(tiny_backbone.scheduler.config)
    timesteps = strength_timesteps(scheduler, 10, 0.5)
    generator = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for t in timesteps:  # the last one lands on final_alpha_cumprod (set_alpha_to_one=False)
        prev = t - 1000 // 10
        alpha_prev = (
            scheduler.alphas_cumprod[prev] if prev >= 0 else torch.as_tensor(scheduler.final_alpha_cumprod)
        )
        ours = ddim_step(x, eps, scheduler.alphas_cumprod[t], alpha_prev)
        theirs = scheduler.step(eps, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert timesteps == [401, 301, 201, 101, 1]


def test_plain_inversion_is_the_fixed_point_one_without_refinement_and_exact_for_constant_eps(tiny_backbone):
    """`ddim_invert_plain` is `ddim_invert(max_iters=0)`, and where eps does not depend on x (the only case
    where start and end of a step predict alike) it round-trips exactly; where eps does, it does not."""
    scheduler = tiny_backbone.scheduler.__class__.from_config(tiny_backbone.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    weight = torch.randn(4, 4, generator=generator) * 0.5

    def depends_on_x(x, t, rows):  # a stand-in eps network: a channel mix scaled by the timestep
        return torch.einsum("oc,bchw->bohw", weight, x) * (1 + t / 1000)

    plain, timesteps = ddim_invert_plain(depends_on_x, scheduler, latents, 10, 0.5)
    refined = ddim_invert(depends_on_x, scheduler, latents, 10, 0.5, max_iters=0)
    assert timesteps == refined.timesteps == [401, 301, 201, 101, 1]
    torch.testing.assert_close(plain, refined.latents, rtol=0, atol=0)
    back = ddim_reconstruct(depends_on_x, scheduler, plain, timesteps)
    assert float(((back - latents) ** 2).mean()) > 1e-6  # plain inversion does not round-trip

    constant = torch.randn(2, 4, 8, 8, generator=generator)
    inverted, timesteps = ddim_invert_plain(lambda x, t, rows: constant, scheduler, latents, 10, 0.5)
    back = ddim_reconstruct(lambda x, t, rows: constant, scheduler, inverted, timesteps)
    torch.testing.assert_close(back, latents, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fixed_point_inversion_round_trips(tiny_backbone, text, astronaut, default_params):
    """Inversion then reconstruction at guidance 1: relative MSE <= 1e-5 (plain DDIM inversion: ~3e-3)."""
    cfg = default_params.diir
    crops = [zoom_crop(astronaut, box, 64, cfg.crop_margin)[0] for box in BOXES]  # the 64 px bucket
    latents = _latents(tiny_backbone, crops)
    cond = text.expand(len(crops), -1, -1)
    figures = {}
    for name, iters in (("plain", 0), ("fixed_point", cfg.inversion_iters)):
        noise_fn = noise_function(tiny_backbone.unet, tiny_backbone.scheduler, cond)
        figures[name], inverted = round_trip_error(noise_fn, tiny_backbone.scheduler, latents, 10, 0.5, iters,
                                                   cfg.inversion_tol)  # fmt: skip
        figures[f"{name}_evals"] = inverted.sample_evals / len(crops)
    print(f"inversion_mse_plain: {figures['plain']:.3g}  inversion_mse_fixed_point: {figures['fixed_point']:.3g}  "
          f"UNet evals per face: {figures['plain_evals']:.1f} vs {figures['fixed_point_evals']:.1f}")  # fmt: skip
    assert figures["fixed_point"] <= 1e-5
    assert figures["plain"] > 100 * figures["fixed_point"]  # the refinement is what makes it exact
    # The first inverse step (1 timestep from the clean end: noise coefficient ~0.01) is within tolerance
    # after its plain step; the later ones (coefficient ~0.2-0.3) are refined.
    assert inverted.iterations[0].eq(0).all() and inverted.iterations[1:].gt(0).all()


def test_noise_coefficient_is_the_steps_sensitivity_to_eps(tiny_backbone):
    scheduler = tiny_backbone.scheduler
    timesteps = strength_timesteps(scheduler, 10, 0.5)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    nudge = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    coefficients = []
    for t in reversed(timesteps):
        alpha_from = (
            scheduler.alphas_cumprod[t - 100] if t >= 100 else torch.as_tensor(scheduler.final_alpha_cumprod)
        )
        alpha_to = scheduler.alphas_cumprod[t]
        moved = ddim_step(x, eps + nudge, alpha_from, alpha_to) - ddim_step(x, eps, alpha_from, alpha_to)
        coefficient = inverse_step_noise_coefficient(alpha_from, alpha_to)
        torch.testing.assert_close(moved, coefficient * nudge, rtol=1e-4, atol=1e-6)
        coefficients.append(coefficient)
    assert coefficients[0] < 0.05 and min(coefficients[1:]) > 0.15


@pytest.mark.slow
def test_refinement_evaluates_only_unconverged_samples(tiny_backbone, text):
    """Per-sample stopping: later iterations run the UNet on a shrinking subset; the batch changes nothing."""
    generator = torch.Generator().manual_seed(0)
    # Samples of different scales converge at different speeds.
    latents = torch.randn(3, 4, 8, 8, generator=generator) * torch.tensor([0.05, 1.0, 1.0]).view(3, 1, 1, 1)
    cond = text.expand(3, -1, -1)
    unet, scheduler = tiny_backbone.unet, tiny_backbone.scheduler
    sizes: list[int] = []

    noise_fn = noise_function(unet, scheduler, cond)

    def counting(x, t, rows):
        sizes.append(x.shape[0])
        return noise_fn(x, t, rows)

    steps_done: list[int] = []
    batched = ddim_invert(counting, scheduler, latents, 10, 0.5, max_iters=4, tol=2e-3,
                          progress=steps_done.append)  # fmt: skip
    assert steps_done == [0, 1, 2, 3, 4]  # one progress call per inverse step, however many refinements
    assert sum(sizes) == batched.sample_evals and len(sizes) == batched.unet_calls
    assert batched.sample_evals < batched.unet_calls * 3  # converged samples stopped paying
    assert len(set(batched.iterations.sum(0).tolist())) > 1  # samples stopped at different iterations
    assert (batched.error_estimate[batched.iterations < 4] < 2e-3).all()  # stopped early only when converged
    for i in range(3):
        alone = ddim_invert(noise_function(unet, scheduler, cond[:1]), scheduler, latents[i : i + 1], 10, 0.5,
                            max_iters=4, tol=2e-3)  # fmt: skip
        torch.testing.assert_close(alone.latents, batched.latents[i : i + 1], rtol=1e-3, atol=1e-4)
        assert alone.iterations[:, 0].tolist() == batched.iterations[:, i].tolist()


# -- bucket rule, blending, matching ------------------------------------------------------------------------


def test_bucket_is_the_smallest_that_covers_the_zoomed_crop():
    buckets = [64, 128, 256, 512]
    # A 24 px face with margin 0.5 has a 48 px crop; at zoom 2 it needs 96 px: bucket 128, not 512.
    assert choose_bucket(48, buckets, 2.0) == 128
    assert choose_bucket(600, buckets, 2.0) == 512  # bigger than every bucket: the largest
    for side, zoom in itertools.product(range(4, 400, 7), (1.0, 1.5, 2.0, 3.0)):
        bucket = choose_bucket(side, buckets, zoom)
        need = side * zoom
        assert bucket >= need or bucket == buckets[-1]
        smaller = [b for b in buckets if b < bucket]
        assert all(b < need for b in smaller)  # never larger than the face needs


def test_compose_keeps_every_zero_alpha_byte():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    before = image.copy()
    alpha = blend_alpha((10, 10, 42, 42), (18, 18, 34, 34), 0.15, (64, 64))
    patch = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    compose(image, patch, alpha, (10, 10, 42, 42))
    region, original = image[10:42, 10:42], before[10:42, 10:42]
    assert np.array_equal(region[alpha == 0], original[alpha == 0])
    assert np.array_equal(region[alpha == 255], patch[alpha == 255])
    assert alpha[0].max() == alpha[-1].max() == alpha[:, 0].max() == alpha[:, -1].max() == 0  # no seam
    outside = np.ones((64, 64), bool)
    outside[10:42, 10:42] = False
    assert np.array_equal(image[outside], before[outside])


def test_hungarian_assignment_is_optimal_and_one_to_one():
    rng = np.random.default_rng(0)
    refs = rng.standard_normal((3, 16))
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    order = [2, 0, 1]
    faces = refs[order] + 0.05 * rng.standard_normal((3, 16))
    assert hungarian_match(faces, refs) == order
    # One more face than references: exactly one face is left without a reference.
    extra = np.vstack([faces, rng.standard_normal(16)])
    assigned = hungarian_match(extra, refs)
    assert sorted(a for a in assigned if a is not None) == [0, 1, 2] and assigned.count(None) == 1
    # Optimal against brute force where greedy matching would fail.
    sims_faces = rng.standard_normal((4, 8))
    sims_refs = rng.standard_normal((4, 8))
    got = hungarian_match(sims_faces, sims_refs)
    f = sims_faces / np.linalg.norm(sims_faces, axis=1, keepdims=True)
    r = sims_refs / np.linalg.norm(sims_refs, axis=1, keepdims=True)
    sim = f @ r.T
    best = max(itertools.permutations(range(4)), key=lambda p: sum(sim[i, p[i]] for i in range(4)))
    assert math.isclose(sum(sim[i, got[i]] for i in range(4)), sum(sim[i, best[i]] for i in range(4)))


# -- DIIR.restore ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_restore_changes_faces_and_nothing_outside_the_masks(tiny_backbone, astronaut):
    params = _params()
    result = _diir(tiny_backbone, params).restore(astronaut, boxes=BOXES, faces="all")
    out = np.asarray(result.image)
    assert out.shape == astronaut.shape
    assert np.array_equal(out[result.mask == 0], astronaut[result.mask == 0])
    assert (result.mask > 0).any() and not np.array_equal(out, astronaut)
    for face, box in zip(result.faces, BOXES, strict=True):
        x0, y0, x1, y1 = face.crop_box
        assert face.crop_box == expand_box(box, params.diir.crop_margin, 256, 256)
        assert face.bucket == choose_bucket(x1 - x0, params.diir.buckets, params.diir.zoom)
        assert face.identity is None
    assert "no adapter" in result.note


def test_strength_zero_returns_the_input_unchanged(tiny_backbone, astronaut):
    result = _diir(tiny_backbone, _params(strength=0)).restore(astronaut, boxes=BOXES, faces="all")
    assert np.array_equal(np.asarray(result.image), astronaut)
    assert result.faces == [] and "strength" in result.note and result.stats["unet_calls"] == 0


def test_no_face_found_returns_the_input_with_a_note(tiny_backbone):
    """The real (offline) face backend finds no face in a flat image: input returned, note says why."""
    blank = np.full((128, 128, 3), 127, np.uint8)
    result = _diir(tiny_backbone, _params()).restore(blank)
    assert np.array_equal(np.asarray(result.image), blank)
    assert result.faces == [] and "no face found" in result.note
    # Faces too large for "small": also unchanged, and the note says how to include them.
    big = _diir(tiny_backbone, _params()).restore(blank, boxes=[(10, 10, 110, 110)])
    assert np.array_equal(np.asarray(big.image), blank) and "faces='all'" in big.note


@pytest.mark.slow
def test_faces_are_grouped_by_bucket_and_chunked(tiny_backbone, astronaut):
    """Batch 2: buckets {128: 2 faces, 192: 1 face} -> 2 batches; batch 1 -> 3; same pixels either way.

    Default buckets [64, 128, 192, 256], margin 0.5, zoom 2: the 28 and 24 px faces need 112 and 96 px
    (bucket 128), the 40 px face 160 px (bucket 192, not 256). The progress bar counts 5 inverse + 5
    denoising steps per batch and ends full."""
    boxes = BOXES
    bars = {}
    results = {}
    for name, batch in (("batched", 2), ("sequential", 1)):
        diir = _diir(tiny_backbone, _params(batch=batch))
        bars[name] = io.StringIO()
        diir.set_progress_bar_config(file=bars[name], mininterval=0)
        results[name] = diir.restore(astronaut, boxes=boxes, faces="all")
    batched, sequential = results["batched"], results["sequential"]
    assert "DIIR: 100%" in bars["batched"].getvalue() and "20/20" in bars["batched"].getvalue()
    assert "30/30" in bars["sequential"].getvalue()
    buckets = [f.bucket for f in batched.faces]
    assert sorted(buckets) == [128, 128, 192]
    assert batched.stats["batches"] == 2 and sequential.stats["batches"] == 3
    assert batched.stats["unet_calls"] < sequential.stats["unet_calls"]
    diff = np.abs(np.asarray(batched.image, np.int16) - np.asarray(sequential.image, np.int16))
    assert diff.max() <= 2  # batching is an implementation detail (float summation order only)


def test_bad_inputs_are_named(tiny_backbone, astronaut):
    from magicid.errors import DataError, MagicIDError

    diir = _diir(tiny_backbone, _params())
    with pytest.raises(DataError, match="boxes\\[0\\]"):
        diir.restore(astronaut, boxes=[(50, 50, 40, 60)])
    with pytest.raises(MagicIDError, match="faces="):
        diir.restore(astronaut, boxes=BOXES, faces="tiny")
    with pytest.raises(MagicIDError, match="assignment has 1 entries for 3"):
        diir.restore(astronaut, boxes=BOXES, faces="all", identities=[ReferenceIdentity(np.ones(128))],
                     assignment=[0])  # fmt: skip
    with pytest.raises(DataError, match="uint8"):
        diir.restore(astronaut.astype(np.float32))


@pytest.fixture(scope="module")
def magicid_parts():
    """A tiny backbone of its own with a fresh MagicID adapter (MGMICA installed on its UNet)."""
    from magicid.models.adapter import MagicIDAdapter
    from magicid.models.tiny import build_tiny_backbone

    params = _params()
    backbone = build_tiny_backbone()
    return backbone, MagicIDAdapter.create(backbone, params), params


@pytest.mark.slow
def test_identity_goes_to_the_matched_face_only(magicid_parts, astronaut):
    """Hungarian matching assigns references; changing one reference changes only its face's blend mask."""
    backbone, adapter, params = magicid_parts
    image = np.asarray(Image.fromarray(astronaut).resize((160, 160), Image.BICUBIC))
    faces = [detected_face((20, 30, 40, 50), 1), detected_face((100, 90, 124, 114), 2)]
    rng = np.random.default_rng(0)
    refs = [ReferenceIdentity(faces[i].embedding + 0.05 * rng.standard_normal(128).astype(np.float32),
                              name=f"ref{i}") for i in (1, 0)]  # fmt: skip
    diir = _diir(backbone, params, adapter)
    first = diir.restore(image, identities=refs, boxes=faces, faces="all")
    assert [f.identity for f in first.faces] == [1, 0]
    # Each face got the reference made from its own embedding.
    assert [f.identity_name for f in first.faces] == ["ref0", "ref1"]
    assert all(f.similarity > 0.8 for f in first.faces)  # 0.05 noise per dim: cosine ~0.87
    out = np.asarray(first.image)
    assert np.array_equal(out[first.mask == 0], image[first.mask == 0])
    # Another identity for face 0 (reference 1): face 1's pixels and everything else stay as they were.
    other = rng.standard_normal(128).astype(np.float32)
    refs[1] = ReferenceIdentity(other / np.linalg.norm(other), name="other")
    second = diir.restore(image, identities=refs, boxes=faces, faces="all", assignment=[1, 0])
    changed = np.any(np.asarray(second.image) != out, axis=-1)
    face0 = np.zeros(changed.shape, bool)
    x0, y0, x1, y1 = first.faces[0].crop_box
    face0[y0:y1, x0:x1] = first.faces[0].alpha > 0
    assert changed.any() and not changed[~face0].any()


def test_from_pipe_uses_the_pipelines_components(tiny_backbone):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny_backbone.vae, text_encoder=tiny_backbone.text_encoder, tokenizer=tiny_backbone.tokenizer,
        unet=tiny_backbone.unet, scheduler=tiny_backbone.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    diir = DIIR.from_pipe(pipe, params=_params())
    assert diir._progress_bar_config == {"disable": True}  # restoring follows the pipeline's bar options
    assert diir.unet is pipe.unet and diir.vae is pipe.vae and diir.adapter is None
    assert diir.scheduler is not pipe.scheduler  # its own DDIM scheduler: the pipeline's is never mutated
    assert diir.scheduler.config.steps_offset == pipe.scheduler.config.steps_offset
