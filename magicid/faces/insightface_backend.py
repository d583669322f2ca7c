"""The `insightface` face backend: ArcFace (512-D) with SCRFD detection, from a local model folder only.

insightface ships no models and its model-zoo download is unreachable offline, so the models must already be
on disk: `<faces.insightface_root>/models/<faces.insightface_model>/*.onnx` (or the folder itself). The
folder is handed to `FaceAnalysis` as a path, which never downloads. Licenses: the insightface code is MIT;
its pretrained models (buffalo_l, antelopev2) are for non-commercial research use only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from magicid.config import FacesParams
from magicid.errors import FaceBackendError
from magicid.faces.types import Face, check_image, l2_normalise, sort_left_to_right

EXPECTED_FILES = {
    "buffalo_l": ["det_10g.onnx", "w600k_r50.onnx", "2d106det.onnx"],
    "antelopev2": ["scrfd_10g_bnkps.onnx", "glintr100.onnx", "2d106det.onnx"],
}
LANDMARK_COUNT = 106


def model_dir(params: FacesParams) -> Path:
    """The folder holding the model's .onnx files.

    Raises:
        FaceBackendError: no root configured, or the folder or its detection/recognition models are missing;
            the message names the path and the files expected there.
    """
    expected = EXPECTED_FILES.get(params.insightface_model, ["a detection and a recognition .onnx"])
    if not params.insightface_root:
        raise FaceBackendError(
            "faces.insightface_root is not set: put the insightface model folder at "
            f"<root>/models/{params.insightface_model}/ ({', '.join(expected)}) and set "
            "faces.insightface_root=<root> (nothing is downloaded)"
        )
    root = Path(params.insightface_root).expanduser()
    candidates = [root / "models" / params.insightface_model, root / params.insightface_model, root]
    for folder in candidates:
        if folder.is_dir() and any(folder.glob("*.onnx")):
            missing = [
                name
                for name in EXPECTED_FILES.get(params.insightface_model, [])
                if not (folder / name).is_file()
            ]
            if missing:
                raise FaceBackendError(
                    f"{folder}: insightface model {params.insightface_model!r} is incomplete, missing "
                    f"{', '.join(missing)} (copy the whole model folder there)"
                )
            return folder
    raise FaceBackendError(
        f"{candidates[0]}: insightface model folder not found (looked in {', '.join(str(c) for c in candidates)}); "
        f"put {', '.join(expected)} there (nothing is downloaded)"
    )


class InsightFaceAnalyzer:
    """insightface `FaceAnalysis` (detection, 106 landmarks, ArcFace) on CPU via onnxruntime."""

    name = "insightface"
    landmark_count = LANDMARK_COUNT

    def __init__(self, params: FacesParams):
        folder = model_dir(params)
        try:
            from insightface.app import FaceAnalysis
        except ImportError as error:  # pragma: no cover - environment problem
            raise FaceBackendError(
                f"insightface is not installed: {error} (install with `make install`)"
            ) from error
        self._app = FaceAnalysis(
            name=str(folder),
            allowed_modules=["detection", "recognition", "landmark_2d_106"],
            providers=["CPUExecutionProvider"],
        )
        for task in ("detection", "recognition", "landmark_2d_106"):
            if task not in self._app.models:
                raise FaceBackendError(f"{folder}: no {task} model among its .onnx files")
        self._app.prepare(
            ctx_id=-1, det_thresh=params.det_threshold, det_size=(params.det_size, params.det_size)
        )
        self.embedding_dim = int(self._app.models["recognition"].output_shape[-1])

    def analyze(self, image: np.ndarray) -> list[Face]:
        """Faces of a uint8 (H, W, 3) RGB image, left to right (insightface works in BGR internally)."""
        image = check_image(image)
        height, width = image.shape[:2]
        faces = []
        for found in self._app.get(np.ascontiguousarray(image[:, :, ::-1])):
            bbox = np.asarray(found.bbox, np.float32).copy()
            kps5 = np.asarray(found.kps, np.float32).copy()
            kps5[:, 0] = kps5[:, 0].clip(0, width)
            kps5[:, 1] = kps5[:, 1].clip(0, height)
            bbox[[0, 2]] = np.clip([min(bbox[0], kps5[:, 0].min()), max(bbox[2], kps5[:, 0].max())], 0, width)
            bbox[[1, 3]] = np.clip(
                [min(bbox[1], kps5[:, 1].min()), max(bbox[3], kps5[:, 1].max())], 0, height
            )
            faces.append(
                Face(
                    bbox=bbox,
                    det_score=float(found.det_score),
                    kps5=kps5,
                    landmarks=np.asarray(found.landmark_2d_106, np.float32),
                    embedding=l2_normalise(found.embedding),
                )
            )
        return sort_left_to_right(faces)

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        """(D,) float32 L2-normalised ArcFace embedding of `face`, aligned by its 5 keypoints."""
        from insightface.utils import face_align

        image = check_image(image)
        recognizer = self._app.models["recognition"]
        aligned = face_align.norm_crop(
            np.ascontiguousarray(image[:, :, ::-1]), landmark=face.kps5, image_size=recognizer.input_size[0]
        )
        return l2_normalise(recognizer.get_feat(aligned))
