"""Identity matching over all faces with a similarity threshold, and the native-size bucket floor."""

from __future__ import annotations

import numpy as np
import pytest

from magicid.config import load_params
from magicid.restore.matching import ReferenceIdentity, match_identities
from magicid.restore.plan import choose_bucket, effective_buckets, plan_faces


class _Face:
    def __init__(self, box, embedding):
        self.bbox = np.asarray(box, np.float32)
        self.landmarks = None
        self.embedding = embedding


def _unit(rng, dim=16):
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _near(v, rng, noise=0.02):
    w = v + noise * rng.standard_normal(v.shape).astype(np.float32)
    return w / np.linalg.norm(w)


def test_a_large_unselected_face_keeps_its_reference():
    """Two references, one of the large (unselected) person, one of a small face: the small face gets its own
    reference, never the large person's, even though a small-faces-only matching would force that on it."""
    rng = np.random.default_rng(0)
    big, small, other = _unit(rng), _unit(rng), _unit(rng)
    cfg = load_params(None).diir
    found = [(f.bbox, f) for f in (_Face((0, 0, 200, 200), big), _Face((300, 300, 320, 320), small),
                                   _Face((400, 300, 420, 320), other))]  # fmt: skip
    planned = plan_faces(found, (512, 512), "small", cfg)
    assert [p.selected for p in planned] == [False, True, True]
    refs = [
        ReferenceIdentity(_near(big, rng), name="big"),
        ReferenceIdentity(_near(small, rng), name="small"),
    ]
    notes = match_identities(planned, refs, None, cfg.min_match_similarity)
    assert planned[1].identity == 1 and planned[2].identity is None
    # The large person took part in the matching and holds its reference (selected-only matching would
    # leave it unmatched and offer that reference to face 2).
    assert planned[0].similarity > 0.9 and planned[0].identity is None
    assert any("unselected face 0" in n for n in notes)


def test_a_weak_match_is_not_forced_and_the_note_says_so():
    rng = np.random.default_rng(1)
    cfg = load_params(None).diir
    face = _unit(rng)
    found = [(np.array([10, 10, 30, 30], np.float32), _Face((10, 10, 30, 30), face))]
    planned = plan_faces(found, (256, 256), "all", cfg)
    stranger = ReferenceIdentity(_unit(rng), name="stranger")  # cosine ~0 with the face
    notes = match_identities(planned, [stranger], None, cfg.min_match_similarity)
    assert planned[0].identity is None and planned[0].similarity < cfg.min_match_similarity
    assert any("min_match_similarity" in n and "own embedding" in n for n in notes)
    # The same face against its own (slightly noisy) reference is matched.
    planned = plan_faces(found, (256, 256), "all", cfg)
    match_identities(planned, [ReferenceIdentity(_near(face, rng))], None, cfg.min_match_similarity)
    assert planned[0].identity == 0


def test_buckets_never_go_below_the_native_size():
    assert effective_buckets([64, 128, 192, 256], 512) == [512]
    assert effective_buckets([64, 128, 192, 256], 128) == [128, 192, 256]
    assert effective_buckets([64, 128, 192, 256], 0) == [64, 128, 192, 256]
    for side in range(8, 400, 9):
        assert choose_bucket(side, effective_buckets([64, 128, 256, 1024], 512), 2.0) >= 512


def test_floor_follows_the_unets_sample_size(tiny_backbone):
    from magicid.restore.diir import DIIR

    parts = (tiny_backbone.unet, tiny_backbone.vae, tiny_backbone.text_encoder, tiny_backbone.tokenizer,
             tiny_backbone.scheduler)  # fmt: skip
    # A loaded backbone (or any pipeline's components): UNet sample_size x VAE factor (SD 1.5: 64 x 8 = 512).
    assert DIIR(*parts).min_bucket == tiny_backbone.unet.config.sample_size * 8
    # The tiny backbone built in code was never trained at any size: it keeps diir.buckets.
    assert DIIR.from_backbone(tiny_backbone).min_bucket == 0


@pytest.mark.parametrize("floor", [7, 100])
def test_floor_must_be_a_multiple_of_8(floor):
    from magicid.errors import MagicIDError

    with pytest.raises(MagicIDError, match="multiple of 8"):
        effective_buckets([64], floor)
