"""DIIR: DDIM-Inversion ID Restoration (DESIGN §4)."""

from magicid.restore.diir import (
    DIIR,
    Conditioning,
    InversionResult,
    ReferenceIdentity,
    RestoredFace,
    RestoreResult,
    choose_bucket,
    ddim_invert,
    ddim_reconstruct,
    hungarian_assign,
)

__all__ = [
    "DIIR",
    "Conditioning",
    "InversionResult",
    "ReferenceIdentity",
    "RestoreResult",
    "RestoredFace",
    "choose_bucket",
    "ddim_invert",
    "ddim_reconstruct",
    "hungarian_assign",
]
