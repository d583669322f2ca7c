"""The generation manifest contract (package docstring, contract 1): `manifest.jsonl` records, the path rule,
reading and writing them, and the one checked way to load a manifest's image for display."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from magicid.errors import ReviewError
from magicid.safety import file_kind_problem, pixel_problem
from magicid.utils import atomic_write_text

MANIFEST_NAME = "manifest.jsonl"


# ---------------------------------------------------------------------------------------------------------
# Generation manifest
# ---------------------------------------------------------------------------------------------------------


class GenerationRecord(BaseModel):
    """One line of a generation manifest (module docstring, contract 1). Paths here are absolute."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    generation_id: str = Field(min_length=1, max_length=200)
    model_version: str = Field(min_length=1, max_length=64)
    prompt: str
    seed: int
    reference_paths: list[str] = []
    boxes: list[tuple[float, float, float, float]] = []
    image_path: str
    pre_diir_path: str | None = None
    case_id: str | None = None

    @field_validator("model_version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        # MLflow versions are integers in the registry but strings in its API; accept both.
        return str(value) if isinstance(value, int) else value

    @field_validator("boxes")
    @classmethod
    def _boxes_ordered(cls, value: list[tuple[float, float, float, float]]):
        for box in value:
            if not (box[0] < box[2] and box[1] < box[3]):
                raise ValueError(f"box {list(box)} must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
        return value

    def resolved_case_id(self) -> str:
        if self.case_id:
            return self.case_id
        key = json.dumps([self.prompt, self.seed, sorted(self.reference_paths)], ensure_ascii=False)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def manifest_path_problem(value: str) -> str | None:
    """Why `value` breaks the manifest path rule (contract 1) on its face, or None. Never touches the disk.

    A path must be relative, use `/`, have no `..` segment and name something below the manifest's folder.
    """
    if not isinstance(value, str) or not value.strip():
        return "is empty"
    if "\x00" in value:
        return "contains a NUL character"
    if "\\" in value:
        return "contains a backslash (write paths with '/')"
    pure = PurePosixPath(value)
    if pure.is_absolute() or PureWindowsPath(value).drive:
        return "is absolute"
    if ".." in pure.parts:
        return "has a '..' segment"
    if not pure.parts:
        return "names the manifest's folder itself, not a file"
    return None


def resolve_manifest_path(folder: str | Path, value: str) -> Path:
    """The file a manifest path names, resolved, after the whole path rule (contract 1).

    Args:
        folder: the folder holding the manifest.
        value: the path as written in the manifest.

    Returns:
        The absolute path, symlinks resolved.

    Raises:
        ReviewError: `value` breaks the rule on its face, resolves outside `folder` (a symlink pointing out),
            or does not name a readable regular file (missing, a folder, a FIFO: opening one would hang).
    """
    problem = manifest_path_problem(value)
    if problem is not None:
        raise ReviewError(f"{value} {problem}")
    base = Path(folder).resolve()
    resolved = (base / value).resolve()
    if not resolved.is_relative_to(base):
        raise ReviewError(f"{value} resolves outside the manifest's folder (a symlink pointing out)")
    if not resolved.exists():
        raise ReviewError(f"{value} does not exist")
    problem = file_kind_problem(resolved)
    if problem is not None:
        raise ReviewError(f"{value} {problem}")
    return resolved


_PATH_RULE = (
    "paths in a manifest are relative to its folder and stay inside it (magicid/reviews, contract 1); "
    "`magicid evaluate` writes such manifests: run it again for a folder written otherwise"
)


def _resolve_record_paths(record: GenerationRecord, folder: Path, where: str) -> dict[str, Any]:
    """The record's paths resolved under the path rule, as a `model_copy` update; errors name `where`."""

    def resolve(field_name: str, value: str) -> str:
        try:
            return str(resolve_manifest_path(folder, value))
        except ReviewError as exc:
            raise ReviewError(f"{where}: {field_name} {exc}: {_PATH_RULE}") from None

    return {
        "image_path": resolve("image_path", record.image_path),
        "pre_diir_path": resolve("pre_diir_path", record.pre_diir_path) if record.pre_diir_path else None,
        "reference_paths": [
            resolve(f"reference_paths[{k}]", p) for k, p in enumerate(record.reference_paths)
        ],
    }


def read_generation_manifest(generations_dir: str | Path) -> list[GenerationRecord]:
    """Read every `manifest.jsonl` under `generations_dir` (any depth, not through symlinked folders, which
    `Path.rglob` does not enter); paths are resolved (absolute).

    Returns:
        The records, in manifest path order then line order.

    Raises:
        ReviewError: no manifest, a line that is not valid JSON or misses a required field, a duplicate
            `generation_id`, or a path that breaks the path rule (absolute, `..`, outside the manifest's
            folder, not an existing regular file). Each message names the file and line.
    """
    root = Path(generations_dir)
    manifests = sorted(root.rglob(MANIFEST_NAME)) if root.is_dir() else []
    if not manifests:
        raise ReviewError(
            f"{root}: no {MANIFEST_NAME} found (run `magicid evaluate`, which writes generations and their "
            "manifest there, or point review.generations_dir at them)"
        )
    records: list[GenerationRecord] = []
    seen: dict[str, str] = {}
    for manifest in manifests:
        for number, line in enumerate(manifest.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{manifest}:{number}"
            try:
                raw = json.loads(line)
                record = GenerationRecord.model_validate(raw)
            except (json.JSONDecodeError, ValidationError) as exc:
                raise ReviewError(f"{where}: not a valid generation record: {exc}") from exc
            if record.generation_id in seen:
                raise ReviewError(
                    f"{where}: generation_id {record.generation_id!r} already used at "
                    f"{seen[record.generation_id]}: ids must be unique"
                )
            seen[record.generation_id] = where
            # Case ids come from the paths as written, before they are resolved.
            update = {
                **_resolve_record_paths(record, manifest.parent, where),
                "case_id": record.resolved_case_id(),
            }
            records.append(record.model_copy(update=update))
    return records


def write_generation_manifest(generations_dir: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write `records` (dicts in the manifest format) as `generations_dir/manifest.jsonl`, atomically.

    Each record is validated first, paths included (the path rule: the files must already be in
    `generations_dir`), so a writer cannot produce a manifest the dashboard refuses.

    Raises:
        ReviewError: a record that is not valid or breaks the path rule; nothing is written then.
    """
    folder = Path(generations_dir)
    lines = []
    for raw in records:
        where = f"generation record {raw.get('generation_id')!r}"
        try:
            record = GenerationRecord.model_validate(raw)
        except ValidationError as exc:
            raise ReviewError(f"{where}: {exc}") from exc
        _resolve_record_paths(record, folder, where)
        lines.append(json.dumps(raw, ensure_ascii=False))
    return atomic_write_text(folder / MANIFEST_NAME, "\n".join(lines) + "\n")


def load_review_image(path: str | Path, generations_dir: str | Path, max_pixels: int):
    """Open one image for the review app, after the checks that make showing (and serving) it safe.

    The app hands Streamlit only what this returns, so no media URL can serve a file refused here.

    Args:
        path: the image (a resolved manifest path from the store).
        generations_dir: `review.generations_dir`: nothing outside it is shown.
        max_pixels: the decompression-bomb limit (`data.max_pixels`, one limit for every untrusted image).

    Returns:
        The decoded image as an RGB `PIL.Image.Image`.

    Raises:
        ReviewError: one line naming the file relative to `generations_dir` (never a server path): outside
            the folder, missing or not a regular file, over the pixel limit, or not an image Pillow decodes.
    """
    from PIL import Image

    root = Path(generations_dir).resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root):
        raise ReviewError(
            f"image {Path(path).name!r} is outside the generations folder (review.generations_dir): refused"
        )
    shown = resolved.relative_to(root).as_posix()
    problem = file_kind_problem(resolved)
    if problem is not None:
        raise ReviewError(f"{shown}: {problem}")
    try:
        with Image.open(resolved) as image:
            problem = pixel_problem(image.width, image.height, max_pixels)
            if problem is not None:
                raise ReviewError(f"{shown}: too large to show ({problem})")
            return image.convert("RGB")
    except ReviewError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise OSError, SyntaxError, ValueError, ...
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        detail = detail.replace(str(resolved), shown).replace(str(path), shown).replace(str(root), "")
        raise ReviewError(f"{shown}: not an image that can be shown ({detail[:160]})") from None
