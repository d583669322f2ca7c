"""DIIR: DDIM-Inversion ID Restoration (DESIGN §4).

`inversion` (fixed-point DDIM inversion over a noise function), `noise` (the noise function: ControlNet,
MGMICA, UNet, CFG), `conditions` (text for SD 1.x and SDXL, landmarks, identity per batch of crops), `plan`
(face selection, crop boxes, buckets, blending), `matching` (identity assignment), `result` (what DIIR
returns), `diir` (the orchestrator).
"""

from magicid.faces.matching import hungarian_match
from magicid.restore.diir import DIIR
from magicid.restore.inversion import InversionResult, ddim_invert, ddim_reconstruct
from magicid.restore.matching import ReferenceIdentity
from magicid.restore.noise import noise_function
from magicid.restore.plan import choose_bucket, effective_buckets
from magicid.restore.result import RestoredFace, RestoreResult

__all__ = [
    "DIIR",
    "InversionResult",
    "ReferenceIdentity",
    "RestoreResult",
    "RestoredFace",
    "choose_bucket",
    "ddim_invert",
    "ddim_reconstruct",
    "effective_buckets",
    "hungarian_match",
    "noise_function",
]
