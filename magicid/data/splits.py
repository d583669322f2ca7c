"""Train/val/test assignment: by identity where identities are known, else by image; deterministic.

Images that share an identity must share a split (no identity leaks from train into test), and a group
photo ties all its people together: identities are grouped into connected components (union-find over
co-occurrence in images) and each component is assigned by a hash of its smallest identity name and the seed.
Unlabelled images are assigned by a hash of their image id. Hash-based, so adding images never moves others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from magicid.config import SplitParams


def _bucket(key: str, seed: int, split: SplitParams) -> str:
    value = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / float(1 << 48)
    if value < split.train:
        return "train"
    if value < split.train + split.val:
        return "val"
    return "test"


def assign_splits(
    images: Iterable[tuple[str, Iterable[str]]], split: SplitParams, seed: int
) -> dict[str, str]:
    """Split name per image.

    Args:
        images: `(image_id, identities known in that image)` pairs.
        split: the fractions.
        seed: part of the hash (a different seed gives a different, equally deterministic split).

    Returns:
        `{image_id: "train" | "val" | "test"}`.
    """
    items = [(image_id, sorted(set(ids))) for image_id, ids in images]
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, ids in items:
        for other in ids[1:]:
            a, b = find(ids[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
        if ids:
            find(ids[0])
    component_key: dict[str, str] = {}
    for identity in sorted(parent):
        root = find(identity)
        component_key.setdefault(root, identity)  # sorted: the first seen is the smallest name
    result = {}
    for image_id, ids in items:
        key = f"identity:{component_key[find(ids[0])]}" if ids else f"image:{image_id}"
        result[image_id] = _bucket(key, seed, split)
    return result
