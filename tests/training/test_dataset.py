"""The IDZoom training dataset: aligned transforms, padding collate, Clone Face samples, bad rows named."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from magicid.config import load_params
from magicid.data.manifest import read_manifest
from magicid.errors import DataError
from magicid.training.dataset import EpochShuffleSampler, IDZoomDataset, Letterbox, collate_idzoom


def _params(*overrides: str):
    return load_params(None, ["model.resolution=64", *overrides])


def test_items_are_letterboxed_with_faces_aligned(idzoom_dir):
    dataset = IDZoomDataset(idzoom_dir, _params(), crop_size=32, clone_prob=0.0)
    images, faces = read_manifest(idzoom_dir)
    assert len(dataset) == len(images)
    for index in range(len(dataset)):
        item = dataset[index]
        row = images[images.image_id == item["image_id"]].iloc[0]
        face_rows = faces[faces.image_id == item["image_id"]].sort_values("person_idx")
        assert item["pixel_values"].shape == (3, 64, 64) and item["skeleton"].shape == (3, 64, 64)
        assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
        assert item["n_ids"] == len(face_rows) == item["id_masks"].shape[0]
        assert item["id_crops"].shape == (item["n_ids"], 3, 32, 32)
        assert torch.equal(item["face_mask"], item["id_masks"].amax(0))
        original = np.asarray(Image.open(idzoom_dir / row.path).convert("RGB")).astype(float)
        pixels = (item["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5
        for mask, (_, face) in zip(item["id_masks"].numpy(), face_rows.iterrows(), strict=True):
            # The mask's centre pixel shows the face's colour: boxes went through the image's transform.
            ys, xs = np.nonzero(mask)
            cy, cx = int(ys.mean()), int(xs.mean())
            x0, y0, x1, y1 = face.bbox
            colour = original[int((y0 + y1) / 2), int((x0 + x1) / 2)]
            assert np.abs(pixels[cy, cx] - colour).max() < 12
            # The box keeps its aspect and scale: mask side = box side * 64 / long image side (+-1 px).
            scale = 64 / max(row.width, row.height)
            assert abs((xs.max() + 1 - xs.min()) - (x1 - x0) * scale) <= 1.01
            assert abs((ys.max() + 1 - ys.min()) - (y1 - y0) * scale) <= 1.01
        # Letterbox bars are black in the image and empty in the condition maps.
        if row.width != row.height:
            assert item["pixel_values"][:, 0, 0].eq(-1).all() or item["pixel_values"][:, -1, -1].eq(-1).all()


def test_collate_pads_identities_with_a_valid_mask(idzoom_dir):
    dataset = IDZoomDataset(idzoom_dir, _params(), crop_size=32, clone_prob=0.0)
    items = [dataset[i] for i in range(len(dataset))]
    batch = collate_idzoom(items)
    n = [item["n_ids"] for item in items]
    assert len(set(n)) > 1, "fixture should mix face counts"
    assert batch["id_masks"].shape == (len(items), max(n), 64, 64)
    assert batch["id_valid"].sum(1).tolist() == n
    padded = ~batch["id_valid"]
    assert not batch["id_masks"][padded].any() and not batch["id_embeddings"][padded].any()
    for i, item in enumerate(items):
        assert torch.equal(batch["id_embeddings"][i, : n[i]], item["id_embeddings"])


def test_clone_samples_carry_one_identity_with_the_union_mask(idzoom_dir):
    params = _params("train.clone_face.k_min=2", "train.clone_face.k_max=4")
    dataset = IDZoomDataset(idzoom_dir, params, crop_size=32, clone_prob=1.0)
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["is_clone"] and item["n_ids"] == 1
        assert torch.equal(item["id_masks"][0], item["face_mask"])
        assert item["face_mask"].sum() > 0
        pasted = torch.zeros_like(item["face_mask"], dtype=torch.bool)
        for x0, y0, x1, y1 in item["clone_boxes"].tolist():
            pasted[y0:y1, x0:x1] = True
        # The masks are the clones' face boxes: inside the pasted crops, and smaller than them (the crop's margin).
        assert not item["face_mask"][~pasted].any() and item["face_mask"].sum() < pasted.sum()
        # Condition maps were pasted with the clones: nothing outside the pasted crops.
        assert not item["landmark"][:, ~pasted].any() and not item["skeleton"][:, ~pasted].any()
        embeddings = read_manifest(idzoom_dir)[1]
        own = np.stack(embeddings[embeddings.image_id == item["image_id"]].embedding.to_list())
        assert any(np.allclose(item["id_embeddings"][0].numpy(), e) for e in own)


def test_samples_are_a_function_of_seed_epoch_and_index(idzoom_dir):
    dataset = IDZoomDataset(idzoom_dir, _params(), crop_size=32, clone_prob=0.5)
    first = [dataset[i]["pixel_values"] for i in range(len(dataset))]
    dataset.set_epoch(3)
    other = [dataset[i]["pixel_values"] for i in range(len(dataset))]
    dataset.set_epoch(0)
    again = [dataset[i]["pixel_values"] for i in range(len(dataset))]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))
    sampler = EpochShuffleSampler(10, seed=0)
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[2] != orders[1] and sorted(orders[1]) == list(range(10))


def _rewrite_faces(root, edit):
    images, faces = read_manifest(root, arrays=False)
    faces = edit(faces.copy())
    faces.to_parquet(root / "faces.parquet", index=False)
    return faces


def test_missing_crop_names_the_face_and_file(idzoom_copy):
    faces = read_manifest(idzoom_copy)[1]
    victim = faces.iloc[1]
    (idzoom_copy / victim.crop_path).unlink()
    with pytest.raises(DataError) as error:
        IDZoomDataset(idzoom_copy, _params())
    assert victim.face_id in str(error.value) and victim.crop_path in str(error.value)


def test_missing_condition_map_names_the_image(idzoom_copy):
    image_id = read_manifest(idzoom_copy)[0].image_id.iloc[0]
    (idzoom_copy / f"conditions/{image_id}_landmark.png").unlink()
    with pytest.raises(DataError, match=f"image_id={image_id}.*{image_id}_landmark.png"):
        IDZoomDataset(idzoom_copy, _params())


def test_bad_embedding_shape_names_the_face(idzoom_copy):
    def truncate(faces: pd.DataFrame) -> pd.DataFrame:
        faces.at[2, "embedding"] = list(faces.at[2, "embedding"])[:64]
        return faces

    faces = _rewrite_faces(idzoom_copy, truncate)
    with pytest.raises(DataError, match=f"face_id={faces.face_id[2]}.*embedding.*\\(64,\\)"):
        IDZoomDataset(idzoom_copy, _params())


def test_box_outside_the_image_names_the_face(idzoom_copy):
    images = read_manifest(idzoom_copy)[0]

    def push_out(faces: pd.DataFrame) -> pd.DataFrame:
        width = int(images[images.image_id == faces.at[0, "image_id"]].width.iloc[0])
        box = list(faces.at[0, "bbox"])
        faces.at[0, "bbox"] = [box[0], box[1], width + 5.0, box[3]]
        return faces

    faces = _rewrite_faces(idzoom_copy, push_out)
    with pytest.raises(DataError, match=f"face_id={faces.face_id[0]}.*outside"):
        IDZoomDataset(idzoom_copy, _params())


def test_empty_split_and_missing_tables_are_data_errors(idzoom_dir, tmp_path):
    with pytest.raises(DataError, match="split='val'"):
        IDZoomDataset(idzoom_dir, _params(), split="val")
    with pytest.raises(DataError, match="images.parquet"):
        IDZoomDataset(tmp_path, _params())


@pytest.mark.slow
def test_reads_a_dataset_built_by_the_idzoom_builder(tmp_path):
    """Integration with `magicid build-data`'s output: real photos, real face analysis, flat array columns."""
    from magicid.data.builder import build_idzoom
    from magicid.data.sample import build_sample_set

    params = _params("data.workers=1")
    root = build_idzoom(
        build_sample_set(tmp_path / "raw", params), tmp_path / "idzoom", params, progress=False
    ).out_dir
    images, faces = read_manifest(root)
    dataset = IDZoomDataset(root, params, split=None, crop_size=32, clone_prob=0.0)
    assert len(dataset) == len(images)
    batch = collate_idzoom([dataset[i] for i in range(len(dataset))])
    assert int(batch["n_ids"].sum()) == len(faces)
    assert batch["id_embeddings"].shape[-1] == params.model.id_embed_dim
    norms = batch["id_embeddings"][batch["id_valid"]].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-4, rtol=0)
    # Every face mask is non-empty and lies inside the letterboxed image area (not in the black bars).
    for i in range(len(dataset)):
        masks = batch["id_masks"][i, : batch["n_ids"][i]]
        assert (masks.flatten(1).sum(1) > 0).all()
        row = images[images.image_id == batch["image_id"][i]].iloc[0]
        box = Letterbox.fit(int(row.width), int(row.height), 64)
        image_area = torch.zeros(64, 64, dtype=torch.bool)
        image_area[
            box.offset_y : box.offset_y + box.new_height, box.offset_x : box.offset_x + box.new_width
        ] = True
        assert not (batch["face_mask"][i].bool() & ~image_area).any()
