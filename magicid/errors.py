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
