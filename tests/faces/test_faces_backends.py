"""Backend selection, the insightface model-folder contract, and detection geometry helpers."""

from __future__ import annotations

import numpy as np
import pytest

from magicid.config import FacesParams
from magicid.errors import FaceBackendError
from magicid.faces.geometry import nms, tile_grid
from magicid.imaging.boxes import box_overlaps


def test_insightface_without_root_names_the_setting():
    from magicid.faces.insightface_backend import model_dir

    with pytest.raises(FaceBackendError, match="insightface_root"):
        model_dir(FacesParams(backend="insightface"))


def test_insightface_missing_folder_names_path_and_files(tmp_path):
    from magicid.faces import get_analyzer

    params = FacesParams(backend="insightface", insightface_root=str(tmp_path))
    with pytest.raises(FaceBackendError) as info:
        get_analyzer(params)
    message = str(info.value)
    assert str(tmp_path / "models" / "buffalo_l") in message
    assert "det_10g.onnx" in message and "w600k_r50.onnx" in message


def test_insightface_incomplete_folder_lists_missing_files(tmp_path):
    from magicid.faces.insightface_backend import model_dir

    folder = tmp_path / "models" / "buffalo_l"
    folder.mkdir(parents=True)
    (folder / "det_10g.onnx").write_bytes(b"x")
    with pytest.raises(FaceBackendError, match="w600k_r50.onnx"):
        model_dir(FacesParams(backend="insightface", insightface_root=str(tmp_path)))


@pytest.mark.parametrize("shape,grid", [((886, 1280), (2, 3)), ((100, 37), (3, 2)), ((50, 50), (1, 1))])
def test_tiles_cover_every_pixel(shape, grid):
    height, width = shape
    covered = np.zeros(shape, bool)
    tiles = tile_grid(height, width, *grid, overlap=0.2)
    assert len(tiles) == grid[0] * grid[1]
    for x0, y0, x1, y1 in tiles:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        covered[y0:y1, x0:x1] = True
    assert covered.all()


def test_nms_keeps_best_and_drops_contained_partial_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 5, 10], [50, 50, 60, 60]], float)
    scores = np.array([0.9, 0.8, 0.95, 0.5])
    keep = nms(boxes, scores, iou=0.4)
    # Box 2 wins on score; box 0 overlaps it with IoU 0.5 > 0.4, box 1 has 72 % of box 2 inside it.
    assert keep == [2, 3]
    iou, smaller = box_overlaps(boxes[:1], boxes)
    assert iou[0, 0] == pytest.approx(1.0) and smaller[0, 2] == pytest.approx(1.0)
