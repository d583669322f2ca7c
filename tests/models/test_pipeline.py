"""MagicIDPipeline: base equivalence, identities + layouts, masks from maps, dtypes, adapter round trip."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from magicid.config import load_params
from magicid.errors import DataError, FaceBackendError, ModelInputError
from magicid.faces import Face
from magicid.imaging.boxes import box_masks
from magicid.imaging.layout import (
    FaceLayout,
    boxes_from_landmark_map,
    boxes_from_skeleton_map,
    render_box_landmarks,
)
from magicid.models.adapter import MagicIDAdapter
from magicid.models.backbone import load_backbone
from magicid.models.pipeline import MagicIDPipeline

SIZE, STEPS = 64, 2
BOXES = [(4.0, 6.0, 28.0, 30.0), (36.0, 20.0, 60.0, 44.0)]


def _embeddings(n: int, dim: int = 128, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    return list(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


def _pipe(backbone, dtype=torch.float32, params=None):
    params = params or load_params(None)
    backbone = backbone.to(dtype=dtype)
    adapter = MagicIDAdapter.create(backbone, params)
    pipe = MagicIDPipeline.from_backbone(backbone, adapter, params)
    pipe.set_progress_bar_config(disable=True)
    return pipe, backbone


def _run(pipe, **kwargs):
    kwargs.setdefault("height", SIZE)
    kwargs.setdefault("width", SIZE)
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe("a photo of a person", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)


def test_without_identities_it_is_stable_diffusion_and_id_scale_zero_is_the_base_model(fresh_backbone):
    pipe, backbone = _pipe(fresh_backbone)
    sd = backbone.stable_diffusion_pipeline()
    sd.set_progress_bar_config(disable=True)
    base = sd(
        "a photo of a person",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    plain = _run(pipe)
    assert np.array_equal(plain.images, base) and plain.face_masks.shape == (0, SIZE, SIZE)
    # Identities at scale 0 (and a fresh, zero-initialised ControlNet) leave the base model's image unchanged.
    scale0 = _run(pipe, identities=_embeddings(2), layout=BOXES, id_scale=0.0)
    assert np.array_equal(scale0.images, base)
    with_ids = _run(pipe, identities=_embeddings(2), layout=BOXES)
    assert not np.array_equal(with_ids.images, base)


def test_identity_masks_follow_the_boxes_and_each_identity_matters(fresh_backbone):
    pipe, _ = _pipe(fresh_backbone)
    out = _run(pipe, identities=_embeddings(2), layout=FaceLayout(boxes=BOXES))
    masks = out.face_masks
    assert masks.shape == (2, SIZE, SIZE) and masks.dtype == np.float32
    for mask, (x0, y0, x1, y1) in zip(masks, BOXES, strict=True):
        outside = np.ones_like(mask, dtype=bool)
        outside[int(y0) : int(y1), int(x0) : int(x1)] = False
        assert mask[outside].max() == 0 and mask.max() == 1
    swapped = _run(pipe, identities=_embeddings(2)[::-1], layout=BOXES)
    assert not np.array_equal(out.images, swapped.images)


def test_reference_images_go_through_the_face_analyzer_and_zoom_crop(fresh_backbone):
    pipe, _ = _pipe(fresh_backbone)
    embedding = _embeddings(1)[0]

    class OneFace:  # the FaceAnalyzer protocol, with a fixed face
        name, embedding_dim = "fixed", 128

        def __init__(self):
            self.seen = []

        def analyze(self, image):
            self.seen.append(image.shape)
            if not image.any():
                return []
            return [
                Face(
                    bbox=np.array([20, 20, 60, 60], np.float32),
                    det_score=0.99,
                    kps5=np.full((5, 2), 40, np.float32),
                    landmarks=np.full((478, 2), 40, np.float32),
                    embedding=embedding,
                )
            ]

    pipe.face_analyzer = OneFace()
    photo = np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    embeddings, crops = pipe.prepare_identities([photo, embedding])
    assert pipe.face_analyzer.seen == [(80, 96, 3)]
    assert torch.equal(embeddings[0], embeddings[1])
    size = pipe.config.id_crop_size
    assert crops.shape == (2, 3, size, size) and crops[0].abs().max() > 0 and not crops[1].any()
    assert crops.min() >= -1 and crops.max() <= 1
    with pytest.raises(DataError, match="no face found"):
        pipe.prepare_identities([np.zeros((32, 32, 3), np.uint8)])


def test_bad_identity_and_layout_inputs_raise_clear_errors(fresh_backbone):
    pipe, _ = _pipe(fresh_backbone)
    with pytest.raises(ModelInputError, match="2 faces but 3 identities"):
        _run(pipe, identities=_embeddings(3), layout=BOXES)
    with pytest.raises(FaceBackendError, match=r"expects \(128,\)"):
        _run(pipe, identities=_embeddings(1, dim=512), layout=BOXES[:1])
    with pytest.raises(ModelInputError, match="not inside"):
        _run(pipe, identities=_embeddings(1), layout=[(10, 10, 100, 40)])
    with pytest.raises(ModelInputError, match="L2-normalised"):
        _run(pipe, identities=[np.ones(128, np.float32)], layout=BOXES[:1])
    with pytest.raises(ModelInputError, match="multiples of 64"):
        _run(pipe, height=72)


def test_masks_from_landmark_and_skeleton_maps_are_one_per_face_left_to_right(fresh_backbone):
    from magicid.imaging.conditions import render_skeleton_map

    height, width = 128, 192
    landmark = render_box_landmarks(height, width, [(120, 30, 170, 80), (10, 40, 60, 90)])
    boxes = boxes_from_landmark_map(landmark)
    assert len(boxes) == 2 and boxes[0][0] < boxes[1][0]
    assert boxes[0][0] <= 10 <= boxes[0][2] and boxes[1][0] <= 120 <= boxes[1][2]

    def skeleton(cx, top):  # a standing person in MediaPipe's 33-point layout (face 0-10 at the top)
        face = [(0, 8), (-3, 5), (-4, 5), (-5, 5), (3, 5), (4, 5), (5, 5), (-7, 7), (7, 7), (-2, 12), (2, 12)]
        body = {
            11: (-10, 22),
            12: (10, 22),
            13: (-14, 38),
            14: (14, 38),
            15: (-16, 52),
            16: (16, 52),
            17: (-18, 56),
            18: (18, 56),
            19: (-16, 57),
            20: (16, 57),
            21: (-14, 55),
            22: (14, 55),
            23: (-7, 58),
            24: (7, 58),
            25: (-8, 80),
            26: (8, 80),
            27: (-8, 100),
            28: (8, 100),
            29: (-9, 104),
            30: (9, 104),
            31: (-5, 106),
            32: (5, 106),
        }
        offsets = face + [body[i] for i in range(11, 33)]
        return np.array([(cx + dx, top + dy) for dx, dy in offsets], np.float32)

    skeleton_map = render_skeleton_map(height, width, [skeleton(150, 10), skeleton(40, 20)])
    faces = boxes_from_skeleton_map(skeleton_map)
    assert len(faces) == 2
    for (x0, y0, x1, y1), (cx, cy) in zip(faces, [(40, 28), (150, 18)], strict=True):
        assert x0 <= cx <= x1 and y0 <= cy <= y1 and y1 - y0 < 30  # the head, not the whole body

    pipe, _ = _pipe(fresh_backbone)
    layout = FaceLayout(landmark=render_box_landmarks(SIZE, SIZE, BOXES))
    out = _run(pipe, identities=_embeddings(2), layout=layout)
    assert out.face_masks.shape == (2, SIZE, SIZE)
    assert out.face_masks[0, :, :32].sum() > 0 and out.face_masks[0, :, 40:].sum() == 0


def test_box_masks_are_feathered_inside_the_box_only():
    masks = box_masks([(8, 8, 40, 24)], 32, 48, feather=0.25)
    assert masks.shape == (1, 32, 48)
    assert masks[0, :8].max() == 0 and masks[0, 24:].max() == 0 and masks[0, :, 40:].max() == 0
    assert masks[0, 16, 24] == 1 and 0 < masks[0, 9, 24] < 1


def test_bfloat16_on_cpu_runs(fresh_backbone):
    pipe, _ = _pipe(fresh_backbone, dtype=torch.bfloat16)
    out = _run(pipe, identities=_embeddings(2), layout=BOXES)
    assert out.images.shape == (1, SIZE, SIZE, 3) and np.isfinite(out.images).all()


def test_adapter_save_load_round_trip_gives_the_same_image(tmp_path, tiny_backbone):
    params = load_params(None)
    pipe, _ = _pipe(copy.deepcopy(tiny_backbone), params=params)
    with torch.no_grad():
        for p in pipe.adapter.id_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    first = _run(pipe, identities=_embeddings(2), layout=BOXES)
    pipe.adapter.save(tmp_path / "adapter")
    backbone = copy.deepcopy(tiny_backbone)
    loaded = MagicIDAdapter.load(tmp_path / "adapter", backbone, params)
    pipe2 = MagicIDPipeline.from_backbone(backbone, loaded, params)
    pipe2.set_progress_bar_config(disable=True)
    assert np.array_equal(_run(pipe2, identities=_embeddings(2), layout=BOXES).images, first.images)


SD15 = os.environ.get("MAGICID_SD15_PATH")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or not SD15 or not Path(SD15 or "").is_dir(),
    reason="needs a CUDA GPU and MAGICID_SD15_PATH pointing at a local SD 1.5 folder",
)
def test_cuda_fp16_with_real_sd15_weights():
    params = load_params(
        None, [f"model.backbone={SD15}", "model.device=cuda", "model.dtype=float16", "model.id_embed_dim=128"]
    )
    backbone = load_backbone(params)
    adapter = MagicIDAdapter.create(backbone, params)
    pipe = MagicIDPipeline.from_backbone(backbone, adapter, params)
    out = pipe(
        "a photo of two people",
        identities=_embeddings(2),
        layout=[(64, 128, 192, 256), (320, 128, 448, 256)],
        height=512,
        width=512,
        num_inference_steps=10,
        generator=torch.Generator("cuda").manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (1, 512, 512, 3) and np.isfinite(out.images).all()
