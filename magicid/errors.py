"""The `MagicIDError` family: every error a user can cause names the input and says what to do."""

from __future__ import annotations


class MagicIDError(Exception):
    """Base class of errors caused by input (files, config, arguments), not by bugs."""


class ConfigError(MagicIDError):
    """params.yaml (or an override) is missing, malformed, or has an unknown key or a wrong type."""


class BackboneError(MagicIDError):
    """A model folder is missing or incomplete."""


class FaceBackendError(MagicIDError):
    """A face-analysis backend cannot be used (missing models, missing package)."""


class DataError(MagicIDError):
    """An input file or dataset row is invalid."""


class ValidationFailed(MagicIDError):
    """A data validation suite failed."""


class ModelInputError(MagicIDError, ValueError):
    """A tensor, image or argument given to a model or pipeline has the wrong shape, range or combination."""


class InputRejected(DataError):
    """An input file cannot enter the dataset; `reason` is its quarantine reason (corrupt, too_large, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ReviewError(MagicIDError):
    """A review request cannot be done: bad sign-in file, unknown reviewer or generation, bad score or choice."""


class OutputLocked(MagicIDError):
    """Another process is writing the same output folder (`magicid.locks`); the message names it and its pid."""


class StoreError(MagicIDError):
    """A tracking store, database or server named in params cannot be used as given: an unknown URL scheme, a
    database driver that is not installed, a server that does not answer."""


class ImageInputError(ModelInputError, DataError):
    """An image argument that is not a PIL image or a uint8 (H, W, 3) RGB array (`imaging.images.as_uint8_image`):
    a model input (pipeline) and a data input (DIIR) at once, so either family catches it."""
