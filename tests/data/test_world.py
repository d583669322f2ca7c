"""The composite training world (issue 23, item 1): ingredients in the IDZoom version, deterministic scenes with
exact geometry, training items the trainer takes unchanged, Clone Face scenes, validation of the ingredients."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from magicid.data import manifest as mf
from magicid.data import world_ingredients as wi
from magicid.data.world import CompositeWorld
from magicid.errors import DataError
from magicid.training.world_dataset import WorldDataset

RES = 128
N_SCENES = 60


@pytest.fixture(scope="module")
def world_params():
    from magicid.config import load_params

    return load_params(None, ["model.resolution=128", "model.id_crop_size=32", "data.crop_size=128"])


@pytest.fixture(scope="module")
def world(sample_world_dir, world_params) -> CompositeWorld:
    return CompositeWorld(sample_world_dir, world_params, RES, seed=5)


@pytest.fixture(scope="module")
def scenes(world):
    return [world.sample(i) for i in range(N_SCENES)]


def _cutouts(root: Path) -> dict[str, dict]:
    return {row["face_id"]: row for row in pq.read_table(root / wi.CUTOUTS).to_pylist()}


def test_ingredients_are_written_into_the_dataset_version(sample_world_dir):
    images, faces = mf.read_manifest(sample_world_dir)
    cutouts = _cutouts(sample_world_dir)
    labelled = faces.dropna(subset=["identity"])
    assert set(cutouts) == set(labelled["face_id"]) and len(set(labelled["identity"])) == 10
    for row in cutouts.values():
        assert (sample_world_dir / row["mask_path"]).is_file()
    backgrounds = pq.read_table(sample_world_dir / wi.BACKGROUNDS).to_pylist()
    kinds = {row["kind"] for row in backgrounds}
    assert kinds == {"package", "photo_region"}
    assert {row["background_id"] for row in backgrounds if row["kind"] == "package"} == {
        "skimage_coffee", "skimage_chelsea", "skimage_rocket", "skimage_moon", "skimage_clock",
    }  # fmt: skip
    # A photo region is clear of every person of its photo (face box and the body below it).
    by_path = images.set_index("path")
    for row in backgrounds:
        if row["kind"] != "photo_region":
            continue
        image_id = by_path.loc[row["path"], "image_id"]
        assert min(row["region"][2] - row["region"][0], row["region"][3] - row["region"][1]) >= 64
        for face in faces[faces["image_id"] == image_id].itertuples():
            person = wi.person_extent(face.bbox, int(by_path.loc[row["path"], "height"]))
            from magicid.imaging.composite import boxes_overlap

            assert not boxes_overlap(row["region"], person), (row["background_id"], face.face_id)


def test_scenes_are_a_pure_function_of_seed_and_index(sample_world_dir, world_params, world, scenes):
    again = CompositeWorld(sample_world_dir, world_params, RES, seed=5)  # a fresh instance, same inputs
    fields = ("image", "boxes", "identity_index", "embeddings", "crops", "landmarks", "kps5", "skeleton_map",
              "landmark_map", "masks", "paste_boxes")  # fmt: skip
    for index in (0, 7, 31):
        a, b = scenes[index], again.sample(index)
        for name in fields:
            assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), (index, name)
        assert a.identities == b.identities and a.caption == b.caption
    assert world.sample(10**9).image.shape == (RES, RES, 3)  # unbounded
    assert scenes[0].image.tobytes() != scenes[1].image.tobytes()
    other = CompositeWorld(sample_world_dir, world_params, RES, seed=6)
    assert other.sample(0).image.tobytes() != scenes[0].image.tobytes()
    with pytest.raises(ValueError, match=">= 0"):
        world.sample(-1)


def test_one_to_four_distinct_people_of_the_known_ten(world, scenes):
    assert len(world.identities) == 10 and world.identities == sorted(world.identities)
    counts = [len(s.identities) for s in scenes]
    assert set(counts) == {1, 2, 3, 4}
    for s in scenes:
        assert len(set(s.identities)) == len(s.identities)  # distinct people in a scene
        assert [world.identities[i] for i in s.identity_index] == s.identities
        assert s.caption == {1: "a photo of a person", 2: "a photo of two people", 3: "a photo of three people",
                             4: "a photo of four people"}[len(s.identities)]  # fmt: skip
        centres = (s.boxes[:, 0] + s.boxes[:, 2]) / 2
        assert (np.diff(centres) >= 0).all()  # left to right, as the pipeline matches identities


def test_boxes_are_exact_inside_the_image_and_sized_as_asked(sample_world_dir, world, scenes):
    from magicid.imaging.mesh_template import KPS5_MIRROR, MESH_MIRROR

    cutouts = _cutouts(sample_world_dir)
    mirrored = 0
    for s in scenes:
        n = len(s.identities)
        assert s.boxes.shape == (n, 4) and s.boxes.dtype == np.float32
        assert (s.boxes >= -1e-3).all() and (s.boxes <= RES + 1e-3).all()
        sides = (s.boxes[:, 2:] - s.boxes[:, :2]).max(axis=1)
        assert ((sides >= 0.10 * RES - 1e-3) & (sides <= 0.45 * RES + 1e-3)).all(), sides / RES
        for k, face_id in enumerate(s.face_ids):
            row = cutouts[face_id]
            face_box = np.asarray(row["face_box"])
            source = np.asarray(row["landmarks"]).reshape(-1, 2)
            source_kps = np.asarray(row["kps5"]).reshape(5, 2)
            box, side = s.boxes[k], float(s.boxes[k, 2] - s.boxes[k, 0])
            # Landmarks and keypoints sit where they sat relative to the face box in the source crop (mirrored
            # and relabelled where the face was flipped): the geometry moved with the pixels, exactly.
            relative = (s.landmarks[k] - box[:2]) / (box[2:] - box[:2])
            expected = (source - face_box[:2]) / (face_box[2:] - face_box[:2])
            expected_kps = (source_kps - face_box[:2]) / (face_box[2:] - face_box[:2])
            flipped = not np.allclose(relative, expected, atol=1e-3)
            if flipped:
                mirrored += 1
                expected = np.stack([1 - expected[:, 0], expected[:, 1]], 1)[list(MESH_MIRROR)]
                expected_kps = np.stack([1 - expected_kps[:, 0], expected_kps[:, 1]], 1)[list(KPS5_MIRROR)]
            np.testing.assert_allclose(relative, expected, atol=1e-3)
            np.testing.assert_allclose((s.kps5[k] - box[:2]) / (box[2:] - box[:2]), expected_kps, atol=1e-3)
            # The 5 keypoints lie in the box; the dense mesh within a fifth of its side (the detector's box spans
            # brows to chin, the mesh's forehead reaches above it, as in the source photo).
            assert ((s.kps5[k] >= box[:2] - 0.5) & (s.kps5[k] <= box[2:] + 0.5)).all()
            # Labels keep their meaning on flipped faces too: the image-left eye and mouth corner are on the
            # left (keypoints 0 and 3; mesh iris centres 468 and 473: the subject's right eye is image-left).
            assert s.kps5[k, 0, 0] < s.kps5[k, 1, 0] and s.kps5[k, 3, 0] < s.kps5[k, 4, 0]
            assert s.landmarks[k, 468, 0] < s.landmarks[k, 473, 0]
            assert ((s.landmarks[k] >= box[:2] - 0.2 * side) & (s.landmarks[k] <= box[2:] + 0.2 * side)).all()
    assert mirrored > 0 and mirrored < sum(len(s.identities) for s in scenes)  # flips happen, not always


def test_masks_and_condition_maps_align_with_the_boxes(scenes):
    from magicid.imaging.boxes import box_mask

    for s in scenes:
        n = len(s.identities)
        assert s.masks.shape == (n, RES, RES) and s.masks.dtype == np.float32
        for mask, box in zip(s.masks, s.boxes, strict=True):
            np.testing.assert_array_equal(mask, box_mask(box, RES))
            ys, xs = np.nonzero(mask)
            assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1
            assert abs(ys.min() - box[1]) <= 1 and abs(ys.max() + 1 - box[3]) <= 1
        # The maps draw the faces and nothing else: every drawn pixel is near one of the boxes.
        near = np.zeros((RES, RES), bool)
        for x0, y0, x1, y1 in s.boxes:
            grow = 0.3 * (x1 - x0) + 2
            near[max(0, int(y0 - grow)) : int(y1 + grow) + 1, max(0, int(x0 - grow)) : int(x1 + grow) + 1] = (
                True
            )
        for drawn in (s.landmark_map, s.skeleton_map):
            assert drawn.dtype == np.uint8 and drawn.shape == (RES, RES, 3)
            assert drawn.any() and not (drawn.max(axis=2) > 0)[~near].any()


def test_head_skeletons_are_face_figures_without_bodies(scenes):
    """A pasted face's skeleton is a pose's face figure (points 0-10, white and grey edges: what a real pose map
    draws for a head), in every face's box, with no coloured limb edge: no body is invented."""
    for s in scenes:
        drawn = s.skeleton_map.max(axis=2) > 0
        coloured = (s.skeleton_map.max(axis=2).astype(np.int16) - s.skeleton_map.min(axis=2)) > 60
        assert coloured.sum() <= 0.02 * drawn.sum()
        for x0, y0, x1, y1 in s.boxes:
            assert drawn[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))].sum() >= 4


def test_references_come_from_another_photo_of_the_person(sample_world_dir, scenes):
    images, faces = mf.read_manifest(sample_world_dir)
    faces = faces.set_index("face_id")
    photos_of = faces.groupby("identity")["image_id"].nunique()
    for s in scenes:
        norms = np.linalg.norm(s.embeddings, axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
        assert s.crops.shape == (len(s.identities), 32, 32, 3) and s.crops.dtype == np.uint8
        for k, (face_id, ref_id) in enumerate(zip(s.face_ids, s.reference_ids, strict=True)):
            assert faces.loc[ref_id, "identity"] == s.identities[k]
            np.testing.assert_allclose(s.embeddings[k], faces.loc[ref_id, "embedding"], atol=1e-6)
            if photos_of[s.identities[k]] > 1:
                assert faces.loc[ref_id, "image_id"] != faces.loc[face_id, "image_id"]
            else:
                assert ref_id == face_id


def test_world_dataset_items_are_idzoom_items(sample_world_dir, world_params, world):
    from magicid.training.dataset import IDZoomDataset, collate_idzoom

    real = IDZoomDataset(sample_world_dir, world_params, split=None, crop_size=32, clone_prob=0.0)[0]
    clone_params = world_params.train.clone_face.model_copy(update={"prob": 0.5})
    items = WorldDataset(world, 16, clone_params=clone_params)
    drawn = [items[i] for i in range(16)]
    assert {d["is_clone"] for d in drawn} == {True, False}
    for item in drawn:
        assert set(item) - {"clone_boxes"} == set(real) and set(item) >= set(real)
        assert ("clone_boxes" in item) == item["is_clone"]
        n = item["n_ids"]
        for key in (
            "pixel_values",
            "skeleton",
            "landmark",
            "id_embeddings",
            "id_crops",
            "id_masks",
            "face_mask",
        ):
            assert item[key].dtype == real[key].dtype, key
            assert item[key].ndim == real[key].ndim, key
        assert item["pixel_values"].shape == (3, RES, RES)
        assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
        for key in ("skeleton", "landmark"):
            assert item[key].shape == (3, RES, RES) and 0 <= item[key].min() and item[key].max() <= 1
        assert item["id_embeddings"].shape == (n, real["id_embeddings"].shape[1])
        assert item["id_crops"].shape == (n, 3, 32, 32) and item["id_crops"].abs().max() <= 1
        assert item["id_masks"].shape == (n, RES, RES) and set(item["id_masks"].unique().tolist()) <= {
            0.0,
            1.0,
        }
        torch.testing.assert_close(item["face_mask"], item["id_masks"].amax(dim=0))
        assert isinstance(item["caption"], str) and isinstance(item["image_id"], str)
    batch = collate_idzoom(drawn + [real])
    assert batch["pixel_values"].shape == (17, 3, RES, RES)
    assert batch["id_valid"].sum() == sum(d["n_ids"] for d in drawn) + real["n_ids"]
    # Epochs draw new scenes; the same epoch draws the same ones.
    items.set_epoch(1)
    assert not torch.equal(items[0]["pixel_values"], drawn[0]["pixel_values"])
    items.set_epoch(0)
    assert torch.equal(items[0]["pixel_values"], drawn[0]["pixel_values"])


def test_clone_scenes_from_the_world(world, world_params):
    from magicid.imaging.composite import boxes_overlap

    clone = world_params.train.clone_face
    ks = set()
    for index in range(12):
        s = world.clone_sample(index, clone)
        k = len(s.identities)
        ks.add(k)
        assert clone.k_min <= k <= clone.k_max and len(set(s.identities)) == 1
        assert len(set(s.reference_ids)) == 1 and np.allclose(s.embeddings, s.embeddings[0])
        squares = s.paste_boxes
        assert ((squares >= 0) & (squares <= RES)).all()  # inside their grid cells, inside the image
        sides = squares[:, 2] - squares[:, 0]
        assert ((sides >= round(clone.scale_min * RES)) & (sides <= round(clone.scale_max * RES))).all()
        for a in range(k):
            assert ((s.boxes[a, :2] >= squares[a, :2]) & (s.boxes[a, 2:] <= squares[a, 2:])).all()
            for b in range(a + 1, k):
                assert not boxes_overlap(squares[a], squares[b])
        again = world.clone_sample(index, clone)
        assert again.image.tobytes() == s.image.tobytes()
    assert ks == {2, 3, 4}


def test_a_broken_ingredient_is_a_clear_error(sample_world_dir, world_params, tmp_path):
    broken = Path(shutil.copytree(sample_world_dir, tmp_path / "idzoom"))
    first = sorted(_cutouts(broken).values(), key=lambda row: row["face_id"])[0]
    (broken / first["mask_path"]).unlink()
    with pytest.raises(DataError, match=f"{first['face_id']}.*cut-out mask.*missing"):
        CompositeWorld(broken, world_params, RES, seed=0)
    (broken / wi.CUTOUTS).unlink()
    with pytest.raises(DataError, match="build-data"):
        CompositeWorld(broken, world_params, RES, seed=0)


def test_flips_need_the_mirror_order_of_the_landmarks(sample_world_dir, world_params, tmp_path):
    edited = Path(shutil.copytree(sample_world_dir, tmp_path / "idzoom"))
    rows = pq.read_table(edited / wi.CUTOUTS).to_pylist()
    for row in rows:
        row["landmarks"] = row["landmarks"][: 68 * 2]  # a 68-point backend's faces
    mf.write_table(rows, wi.CUTOUTS_SCHEMA, edited / wi.CUTOUTS)
    with pytest.raises(DataError, match="flip_prob"):
        CompositeWorld(edited, world_params, RES, seed=0)
    no_flip = world_params.model_copy(
        update={
            "data": world_params.data.model_copy(
                update={"world": world_params.data.world.model_copy(update={"flip_prob": 0.0})}
            )
        }  # fmt: skip
    )
    assert CompositeWorld(edited, no_flip, RES, seed=0).sample(0).landmarks.shape[1] == 68


@pytest.mark.slow
def test_forget_removes_a_person_from_the_world(sample_world_dir, world_params, tmp_path):
    from magicid.forget import forget

    copy = Path(shutil.copytree(sample_world_dir, tmp_path / "idzoom"))
    params = world_params.model_copy(
        update={
            "tracking": world_params.tracking.model_copy(update={"uri": f"sqlite:///{tmp_path / 'ml.db'}"})
        }
    )
    theirs = [row for row in _cutouts(copy).values() if row["identity"] == "tom_hanks"]
    assert theirs
    forget(copy, params, identity="tom_hanks", dvc=False)
    left = _cutouts(copy).values()
    assert left and all(row["identity"] != "tom_hanks" for row in left)
    assert not any((copy / row["mask_path"]).exists() for row in theirs)
    assert all((copy / row["mask_path"]).is_file() for row in left)  # the others' masks are kept
    images = set(pq.read_table(copy / mf.IMAGES).column("path").to_pylist())
    for row in pq.read_table(copy / wi.BACKGROUNDS).to_pylist():
        assert row["kind"] == "package" or row["path"] in images
    assert "tom_hanks" not in CompositeWorld(copy, world_params, RES, seed=0).identities


@pytest.mark.slow
def test_validation_passes_the_world_and_catches_broken_ingredients(sample_world_dir, tmp_path):
    from magicid.data.validation import validate_idzoom
    from magicid.errors import ValidationFailed

    assert validate_idzoom(sample_world_dir, tmp_path / "ok").success
    broken = Path(shutil.copytree(sample_world_dir, tmp_path / "idzoom"))
    rows = pq.read_table(broken / wi.CUTOUTS).to_pylist()
    (broken / rows[0]["mask_path"]).unlink()  # a missing cut-out
    rows[1]["face_box"] = [
        v + 5.0 for v in rows[1]["face_box"]
    ]  # geometry that no longer matches faces.parquet
    mf.write_table(rows, wi.CUTOUTS_SCHEMA, broken / wi.CUTOUTS)
    backgrounds = pq.read_table(broken / wi.BACKGROUNDS).to_pylist()
    backgrounds[0]["region"] = [0.0, 0.0, backgrounds[0]["width"] + 10.0, 5.0]  # past its image
    mf.write_table(backgrounds, wi.BACKGROUNDS_SCHEMA, broken / wi.BACKGROUNDS)
    with pytest.raises(ValidationFailed) as info:
        validate_idzoom(broken, tmp_path / "broken")
    message = str(info.value)
    for expected in ("mask_matches_size", "geometry_matches_faces", "region_inside_image"):
        assert expected in message, expected


@pytest.mark.slow
def test_package_backgrounds_show_no_face():
    """The default backgrounds are photos without people: the offline analyzer finds no face in any of them."""
    from magicid.config import FacesParams, load_params
    from magicid.faces import get_analyzer

    analyzer = get_analyzer(FacesParams())
    for name in load_params(None).data.world.backgrounds:
        assert analyzer.analyze(wi.package_background(name)) == [], name
    with pytest.raises(DataError, match="person"):
        wi.package_background("astronaut")
    for name in ("no_such_photo", "download_all"):  # not a shipped photo: refused before anything is called
        with pytest.raises(DataError, match="scikit-image"):
            wi.package_background(name)
