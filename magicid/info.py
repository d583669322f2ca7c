"""What this installation can do: versions, config summary, usable backends, accelerator."""

from __future__ import annotations

import importlib.metadata
import platform

from magicid.config import Params
from magicid.faces import backend_status

_PACKAGES = [
    "magicid",
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "mediapipe",
    "dlib-bin",
    "insightface",
    "onnxruntime",
    "mlflow",
    "prefect",
    "dvc",
    "great_expectations",
]


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def model_backend_status(params: Params) -> str:
    if params.model.backbone == "tiny":
        return "tiny (built in code, offline)"
    from pathlib import Path

    from magicid.errors import BackboneError
    from magicid.models.backbone import check_sd_folder

    try:
        is_sdxl = check_sd_folder(Path(params.model.backbone).expanduser())
    except BackboneError as error:
        return f"unusable: {error}"
    if is_sdxl:
        return f"local SDXL folder {params.model.backbone} (DIIR restore only)"
    return f"local folder {params.model.backbone}"


def collect_info(params: Params) -> dict[str, str]:
    """A flat mapping printed by `magicid info`."""
    import torch

    info = {"python": platform.python_version()}
    info.update({f"version.{name}": _version(name) for name in _PACKAGES})
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    info["config.model.backbone"] = model_backend_status(params)
    info["config.model"] = (
        f"resolution={params.model.resolution} dtype={params.model.dtype} device={params.model.device}"
    )
    info["config.faces.backend"] = params.faces.backend
    info["config.tracking.uri"] = params.tracking.uri
    info["config.storage.root"] = params.storage.root
    for name, status in backend_status(params).items():
        info[f"faces.{name}"] = status
    return info
