"""Identity matching for DIIR (DESIGN §4): which reference identity each face gets.

References are matched one-to-one to ALL detected faces, selected for restoring or not, by the Hungarian
algorithm on cosine similarity of face-recognition embeddings (`magicid.faces.matching`, as evaluation scores): so a reference that belongs to a large,
unselected person stays with that person instead of being pushed onto a small face. A selected face's best
match below a similarity threshold (`diir.min_match_similarity`) is not forced: that face keeps its own
embedding, and the note says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from magicid.errors import MagicIDError
from magicid.faces.matching import cosine_matrix, hungarian_match
from magicid.restore.plan import PlannedFace


@dataclasses.dataclass
class ReferenceIdentity:
    """A reference identity: its face-recognition embedding (global) and a zoomed face crop (local).

    Attributes:
        embedding: (D,) float32, L2-normalised.
        crop: uint8 (S, S, 3) identity crop (margin `data.crop_margin`), or None (the restored face's own
            identity crop is used then).
        name: a label for results and logs.
    """

    embedding: np.ndarray
    crop: np.ndarray | None = None
    name: str = ""


def match_identities(
    planned: list[PlannedFace],
    refs: Sequence[ReferenceIdentity],
    assignment: Sequence[int | None] | None,
    min_similarity: float,
) -> list[str]:
    """Set each selected face's `identity` (reference index or None) and every matched face's `similarity`.

    Args:
        planned: every detected face (`selected` or not), embeddings filled where they could be.
        refs: the reference identities.
        assignment: per selected face a reference index or None (then no matching), or None (match).
        min_similarity: a selected face's match below this cosine is not applied.

    Returns:
        Notes, in words, on what was not done as a plain match (dropped weak matches, references kept by
        unselected faces, faces left without a reference).

    Raises:
        MagicIDError: an assignment of the wrong length or index, or a selected face without an embedding.
    """
    jobs = [p for p in planned if p.selected]
    if assignment is not None:
        if len(assignment) != len(jobs):
            raise MagicIDError(
                f"assignment has {len(assignment)} entries for {len(jobs)} selected faces; give one per face "
                "(a reference index or None)"
            )
        for job, ref in zip(jobs, assignment, strict=True):
            if ref is not None and not 0 <= int(ref) < len(refs):
                raise MagicIDError(
                    f"assignment {ref} for face {job.index}: only {len(refs)} identities given"
                )
            job.identity = None if ref is None else int(ref)
        return []
    if not refs:
        return []
    missing = [j.index for j in jobs if j.embedding is None]
    if missing:
        raise MagicIDError(
            f"faces {missing} have no embedding (bare boxes and no analyzer could embed them): pass "
            "assignment= to say which identity each face gets"
        )
    notes = []
    unembedded = [p.index for p in planned if p.embedding is None]
    if unembedded:
        notes.append(f"unselected face(s) {unembedded} could not be embedded: left out of identity matching")
    candidates = [p for p in planned if p.embedding is not None]
    faces = np.stack([c.embedding for c in candidates])
    ref_embeddings = np.stack([r.embedding for r in refs])
    similarity = cosine_matrix(faces, ref_embeddings)
    for row, (face, ref) in enumerate(zip(candidates, hungarian_match(faces, ref_embeddings), strict=True)):
        if ref is None:
            continue
        face.similarity = float(similarity[row, ref])
        name = refs[ref].name or str(ref)
        if not face.selected:
            notes.append(f"reference {name} matched unselected face {face.index} (kept there, not restored)")
        elif face.similarity < min_similarity:
            notes.append(
                f"face {face.index}: best reference {name} at similarity {face.similarity:.2f} < "
                f"diir.min_match_similarity={min_similarity}: restored with its own embedding"
            )
        else:
            face.identity = ref
    unmatched = [j.index for j in jobs if j.similarity is None]
    if unmatched:
        notes.append(f"face(s) {unmatched} had no reference left: restored with their own embedding")
    return notes


def embed_bare_boxes(analyzer: Any, pixels: np.ndarray, planned: list[PlannedFace]) -> None:
    """Fill in the embedding of each bare box: the analyzer's largest face inside its crop (None: none found)."""
    for face in planned:
        if face.embedding is not None:
            continue
        x0, y0, x1, y1 = face.crop_box
        found = analyzer.analyze(np.ascontiguousarray(pixels[y0:y1, x0:x1]))
        if found:
            face.embedding = np.asarray(max(found, key=lambda f: f.width * f.height).embedding, np.float32)
