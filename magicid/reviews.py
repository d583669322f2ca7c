"""Human review of generations: reviewers, ratings, blind pairwise judgements, and their aggregates.

Reviewers rate single generations (identity fidelity and overall quality on a 1-5 scale, artifact flags, a
comment) and judge blind pairs (champion vs challenger for the same prompt, identities and seed). The
aggregates per model version are exported to MLflow as model-version tags, which the promotion gate reads
(DESIGN.md section 5). The Streamlit app (`dashboards/review.py`) is a thin view over this module.

Two contracts with the rest of the platform:

1. Generation manifest (written by evaluation, read here). Every file named `manifest.jsonl` under
   `review.generations_dir` (any depth) holds one JSON object per line:

   ```
   {"generation_id": "v3-0007",              # unique and stable across runs (a rating refers to it)
    "model_version": "3",                    # the MLflow registered-model version that made it
    "prompt": "a photo of two friends",
    "seed": 7,
    "reference_paths": ["references/ada.png"],  # one reference face image per identity, in identity order
    "boxes": [[x0, y0, x1, y1]],              # face boxes (pixels of image_path), one per identity
    "image_path": "0007.png",                 # the generation shown to reviewers (after DIIR where it ran)
    "pre_diir_path": "0007_before.png",       # the same generation before DIIR, or null
    "case_id": null}                          # optional; see below
   ```

   The path rule (one rule for every path in the file: `image_path`, `pre_diir_path`, `reference_paths`):
   a path is relative to the folder that holds that `manifest.jsonl`, written with `/`, and stays inside that
   folder. Absolute paths, `..` segments, backslashes and empty paths are refused, and so is a path that
   resolves (through a symlink) outside the folder; every path must name a regular file. So a generations
   folder is self-contained: evaluation copies the reference crops it used next to the generations
   (`references/<face_id>.png`), and the folder can be moved, copied or served with nothing outside it.
   `write_generation_manifest` refuses to write a record that breaks the rule, `read_generation_manifest`
   refuses to read one (an error naming the manifest, the line and the field), and the review app shows
   no image outside `review.generations_dir` (`load_review_image`).

   Other keys are allowed and ignored (evaluation may add metrics). A *case* is one (prompt, seed,
   identities) combination: two model versions' generations with the same case are a blind pair. `case_id`
   defaults to a hash of the prompt, the seed and the sorted reference paths as written, so evaluation
   should write the same reference path strings for every model version (or set `case_id`).

2. MLflow model-version tags (written by `export_review_tags`, read by the promotion gate): the `TAG_*`
   constants below. Values are strings (MLflow tags are strings): counts as integers, means and rates as
   `repr(float)`. Interval tags are set only where the interval exists (2+ ratings; 1+ pairs); the
   win-rate tags are removed when there are no pairs against the named champion.

What the app may trust (README "Security"): nothing it reads from a manifest. It shows text from manifests,
prompts and comments (and errors quoting them) with `st.text` or, inside its own messages, through
`plain_markdown`; it hands Streamlit only image bytes that `load_review_image` checked and decoded; sign-in
goes through `SignInThrottle.sign_in` (attempts limited per reviewer name and per client, with a lock-out).

Storage: a SQLAlchemy database (`review.db_url`; SQLite file by default, any SQL URL). On SQLite the store
uses WAL, a busy timeout and `BEGIN IMMEDIATE` for writes, and every write is retried on a lock error, so
several processes writing at once lose nothing (tested with processes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column, relationship

from magicid.errors import ReviewError
from magicid.safety import file_kind_problem, pixel_problem
from magicid.utils import atomic_write_text

MANIFEST_NAME = "manifest.jsonl"

SCORE_MIN, SCORE_MAX = 1, 5
# Artifact flags a reviewer can tick; a fixed vocabulary so that counts aggregate across reviewers.
ARTIFACT_FLAGS = (
    "distorted_face",
    "wrong_identity",
    "identity_swap",
    "extra_or_missing_face",
    "bad_hands_or_body",
    "blur_or_noise",
    "visible_seam",
    "other",
)
Choice = Literal["left", "right", "tie"]
CHOICES: tuple[str, ...] = ("left", "right", "tie")

# MLflow model-version tags (contract with the promotion gate, magicid/registry.py).
TAG_N_RATINGS = "review.n_ratings"  # ratings of this version's generations (int)
TAG_N_REVIEWERS = "review.n_reviewers"  # distinct reviewers who rated it (int)
TAG_N_RATED_GENERATIONS = "review.n_rated_generations"  # generations with at least one rating (int)
TAG_MEAN_OVERALL = "review.mean_overall"  # mean overall score, 1-5 (float)
TAG_MEAN_OVERALL_LO = "review.mean_overall_lo"  # 95% t interval of that mean
TAG_MEAN_OVERALL_HI = "review.mean_overall_hi"
TAG_MEAN_IDENTITY = "review.mean_identity"  # mean identity-fidelity score, 1-5 (float)
TAG_MEAN_IDENTITY_LO = "review.mean_identity_lo"
TAG_MEAN_IDENTITY_HI = "review.mean_identity_hi"
TAG_WIN_RATE = "review.win_rate_vs_champion"  # (wins + ties/2) / pairs against the champion (float)
TAG_WIN_RATE_LO = "review.win_rate_lo"  # 95% Wilson interval of that rate
TAG_WIN_RATE_HI = "review.win_rate_hi"
TAG_N_PAIRS = "review.n_pairs"  # blind pairs judged against the champion (int)
TAG_CHAMPION_VERSION = "review.champion_version"  # the champion version the win rate is against
TAG_EXPORTED_AT = "review.exported_at"  # UTC ISO time of the export
WIN_RATE_TAGS = (TAG_WIN_RATE, TAG_WIN_RATE_LO, TAG_WIN_RATE_HI, TAG_CHAMPION_VERSION)

Z_95 = 1.959963984540054  # standard normal 97.5% quantile

_REVIEWER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MIN_PASSWORD_LENGTH = 8
# scrypt cost: n=2**14, r=8, p=1 takes ~0.07 s and 16 MiB here: slow for guessing, fine for a sign-in.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(moment: datetime) -> datetime:
    # SQLite keeps no time zone: times are written in UTC, so a naive one read back is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------------------------
# Passwords and the reviewers file
# ---------------------------------------------------------------------------------------------------------


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """Hash a password with scrypt and a random 16-byte salt.

    Returns:
        `scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>`: everything `verify_password` needs.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ReviewError(
            f"password too short ({len(password)} characters): use at least {MIN_PASSWORD_LENGTH}"
        )
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


# What a reviewers-file entry may ask of scrypt: the cost stays bounded (a hand-edited p=10**6 would make every
# sign-in run for hours) and within what OpenSSL accepts (n a power of 2; memory 128*n*r under its 32 MiB).
_SCRYPT_MAX_N, _SCRYPT_MAX_R, _SCRYPT_MAX_P = 2**15, 16, 4


def verify_password(password: str, encoded: str) -> bool:
    """Check `password` against a `hash_password` string in constant time (`hmac.compare_digest`).

    Raises:
        ReviewError: `encoded` is not a valid `scrypt$n$r$p$salt$hash` string (a hand-edited reviewers file).
    """
    n, r, p, salt, expected = parse_password_hash(encoded)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(expected))
    return hmac.compare_digest(digest, expected)


def parse_password_hash(
    encoded: str, source: str = "reviewer password entry", reviewer: str = "NAME"
) -> tuple[int, int, int, bytes, bytes]:
    """`(n, r, p, salt, hash)` of a `hash_password` string, checked so that scrypt accepts it within its
    default 32 MiB (a hand-edited entry would otherwise stop a sign-in with a ValueError from hashlib).

    Raises:
        ReviewError: not `scrypt$n$r$p$salt$hash` with n a power of two up to 2**15, 128*n*r <= 32 MiB, r <= 16, p <= 4,
            base64 salt and a hash of 16-64 bytes (bounds: `_SCRYPT_MAX_*`); the message starts with `source`.
    """
    fix = f"set it again with `magicid review-add-reviewer {reviewer}`"
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ReviewError(f"{source} is not a scrypt hash (expected scrypt$n$r$p$salt$hash): {fix}")
    try:
        n, r, p = (int(v) for v in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        expected = base64.b64decode(parts[5], validate=True)
    except ValueError as exc:  # int() and binascii.Error (a ValueError)
        raise ReviewError(f"{source}: a scrypt field is not a number or not base64 ({exc}): {fix}") from exc
    bounded = n <= _SCRYPT_MAX_N and 1 <= r <= _SCRYPT_MAX_R and 1 <= p <= _SCRYPT_MAX_P
    if n < 2 or n & (n - 1) or not bounded or 128 * n * r > 32 * 2**20:
        raise ReviewError(f"{source}: scrypt cost n={n} r={r} p={p} is not one this program makes: {fix}")
    if not salt or not 16 <= len(expected) <= 64:
        raise ReviewError(f"{source}: scrypt salt or hash has the wrong length: {fix}")
    return n, r, p, salt, expected


# Unknown names are checked against this so a wrong name costs the same time as a wrong password.
_DUMMY_HASH = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + base64.b64encode(bytes(32)).decode()


def load_reviewers(path: str | Path, *, replacing: str | None = None) -> dict[str, str]:
    """Read the reviewers file: YAML `reviewers: {name: scrypt-hash, ...}`.

    Args:
        replacing: a reviewer whose entry is about to be replaced, so a damaged one of theirs is no error.

    Raises:
        ReviewError: missing file, not that shape, a bad name, or an entry that is not a valid scrypt hash.
    """
    path = Path(path)
    if not path.is_file():
        raise ReviewError(
            f"{path}: reviewers file not found: add a reviewer with "
            f"`magicid review-add-reviewer NAME --reviewers {path}`"
        )
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ReviewError(f"{path}: not a valid YAML text file: {str(exc)[:300]}") from exc
    reviewers = loaded.get("reviewers") if isinstance(loaded, dict) else None
    if not isinstance(reviewers, dict) or not all(isinstance(v, str) for v in reviewers.values()):
        raise ReviewError(
            f"{path}: expected `reviewers: {{name: scrypt-hash}}` (use magicid review-add-reviewer)"
        )
    for name, encoded in reviewers.items():
        _check_reviewer_name(str(name), source=str(path))
        if str(name) != replacing:
            parse_password_hash(encoded, f"{path}: the entry of reviewer {str(name)!r}", reviewer=str(name))
    return {str(k): v for k, v in reviewers.items()}


def add_reviewer(path: str | Path, name: str, password: str) -> Path:
    """Add a reviewer (or set a new password) in the reviewers file, storing only the scrypt hash.

    The file is rewritten atomically; it is created if missing.
    """
    _check_reviewer_name(name, source="reviewer name")
    path = Path(path)
    reviewers = load_reviewers(path, replacing=name) if path.is_file() else {}
    reviewers[name] = hash_password(password)
    text = (
        "# Review dashboard sign-in: reviewer name -> scrypt password hash (magicid review-add-reviewer).\n"
    )
    return atomic_write_text(path, text + yaml.safe_dump({"reviewers": reviewers}, sort_keys=True))


def authenticate(reviewers: dict[str, str], name: str, password: str) -> bool:
    """True if `name` is a configured reviewer and `password` is theirs; same cost for unknown names."""
    encoded = reviewers.get(name)
    ok = verify_password(password, encoded if encoded is not None else _DUMMY_HASH)
    return ok and encoded is not None


class SignInLocked(ReviewError):
    """Too many failed sign-ins for a reviewer name or from a client; `seconds_left` until it may try again."""

    def __init__(self, seconds_left: float):
        minutes = max(1, math.ceil(seconds_left / 60))
        super().__init__(
            f"too many failed sign-ins for this reviewer name or from this address: try again in {minutes} "
            f"minute{'s' if minutes != 1 else ''}"
        )
        self.seconds_left = seconds_left


class SignInThrottle:
    """Failed sign-ins counted per reviewer name and per client address, with a lock-out.

    A key (a name as typed, or a client) with `max_failures` failed attempts within the last `lockout_s`
    seconds is locked out: further attempts are refused without checking the password until the oldest of
    those failures is `lockout_s` old. A success clears the name's failures, not the client's (a client
    with one valid account must not reset its guessing budget for the others). Each attempt is counted as a
    failure before the password is checked and uncounted on success, so parallel attempts cannot overrun the
    limit. State is in memory, shared by every session of one app process (`st.cache_resource`); a
    restart clears it.

    Trade-off: anyone can lock a reviewer name out for `lockout_s` by failing on purpose (the price of a
    per-name limit); behind a reverse proxy every client has the proxy's address, so the per-client limit
    then counts all clients together.
    """

    def __init__(
        self,
        max_failures_per_name: int,
        max_failures_per_client: int,
        lockout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_failures_per_name < 1 or max_failures_per_client < 1 or not lockout_s > 0:
            raise ReviewError(
                "sign-in limits must be >= 1 failure and a lock-out > 0 s, got "
                f"{max_failures_per_name}, {max_failures_per_client}, {lockout_s}"
            )
        self.limits = {"name": max_failures_per_name, "client": max_failures_per_client}
        self.lockout_s = float(lockout_s)
        self._clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _keys(self, name: str, client: str) -> tuple[tuple[str, str], tuple[str, str]]:
        # A name longer than any valid one is still counted, under its first characters (bounded memory).
        return ("name", name[:80]), ("client", client[:80])

    def _prune(self, now: float) -> None:
        horizon = now - self.lockout_s
        for key in list(self._failures):
            times = self._failures[key]
            while times and times[0] <= horizon:
                times.popleft()
            if not times:
                del self._failures[key]

    def seconds_locked(self, name: str, client: str) -> float:
        """Seconds until `name` from `client` may try again (0.0: it may now)."""
        with self._lock:
            return self._seconds_locked(self._keys(name, client), self._clock())

    def _seconds_locked(self, keys, now: float) -> float:
        self._prune(now)
        left = 0.0
        for key in keys:
            times, limit = self._failures.get(key, ()), self.limits[key[0]]
            if len(times) >= limit:
                left = max(left, times[len(times) - limit] + self.lockout_s - now)
        return left

    def sign_in(self, reviewers: dict[str, str], name: str, password: str, client: str) -> bool:
        """`authenticate` under the limits: True for the right password, False for a wrong one (counted).

        Raises:
            SignInLocked: the name or the client is locked out; the password was not checked.
        """
        keys = self._keys(name, client)
        with self._lock:
            now = self._clock()
            left = self._seconds_locked(keys, now)
            if left > 0:
                raise SignInLocked(left)
            for key in keys:
                self._failures.setdefault(key, deque()).append(now)
        ok = authenticate(reviewers, name, password)
        if ok:
            with self._lock:
                name_key, client_key = keys
                self._failures.pop(name_key, None)
                client_times = self._failures.get(client_key)
                if client_times is not None and now in client_times:
                    client_times.remove(now)
        return ok


def _check_reviewer_name(name: str, source: str) -> None:
    if not _REVIEWER_NAME.match(name):
        raise ReviewError(
            f"{source}: reviewer name {name!r} must be 1-64 lower-case letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )


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
    "paths in a manifest are relative to its folder and stay inside it (magicid/reviews.py, contract 1); "
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


# Markdown's inline syntax (emphasis, code, links, images, HTML, autolinks, strikethrough, Streamlit's
# `:directives:` and `$math$`) and its block markers at a line's start (#, +, >, "1." or "1)").
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+.!|<>~:$&])")


def plain_markdown(text: str) -> str:
    """`text` escaped so that a Markdown renderer (Streamlit's GitHub-flavoured one, with its `:directives:`
    and `$math$`) shows it as the characters it is: no link, image, emphasis, heading, HTML or directive.

    Every ASCII punctuation character that Markdown gives a meaning gets a backslash (CommonMark renders a
    backslash-escaped punctuation character as itself); line breaks become spaces and leading blanks are
    dropped, so a text cannot start a block of its own. For text from manifests, prompts, comments and
    error messages quoting them, shown inside the app's own messages; text shown on its own goes through
    `st.text`, which renders nothing.
    """
    # Leading blanks would indent: 4 make a code block, fewer let a "-" start a list item.
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()).lstrip())
    # "-" and "=" mean something only at the start of a line (a list item, a rule): escaped there only, so
    # ids like v2-case0 stay readable in the Markdown source.
    return "\\" + escaped if escaped[:1] in ("-", "=") else escaped


def draw_face_boxes(image, boxes: Sequence[Sequence[float]], color=(0, 255, 0), width: int | None = None):
    """A copy of a PIL image with each face box outlined (x0, y0, x1, y1 in pixels; RGB result)."""
    from PIL import ImageDraw

    out = image.convert("RGB")
    line = width if width is not None else max(2, round(min(out.size) / 128))
    draw = ImageDraw.Draw(out)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0, y0, x1, y1], outline=color, width=line)
    return out


# ---------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------


class _Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True)}


class ReviewerRow(_Base):
    __tablename__ = "reviewers"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(default=_now)


class GenerationRow(_Base):
    __tablename__ = "generations"
    generation_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    case_id: Mapped[str] = mapped_column(String(64), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(Integer)
    image_path: Mapped[str] = mapped_column(Text)
    pre_diir_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    reference_paths: Mapped[list] = mapped_column(JSON)
    boxes: Mapped[list] = mapped_column(JSON)


class RatingRow(_Base):
    __tablename__ = "ratings"
    __table_args__ = (
        UniqueConstraint("reviewer", "generation_id", name="one_rating_per_reviewer_and_generation"),
        # Covering indexes: the per-version aggregates read only these columns, in this order.
        Index("ratings_by_version", "model_version", "generation_id", "overall_score", "identity_score"),
        Index("ratings_by_version_reviewer", "model_version", "reviewer"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    reviewer: Mapped[str] = mapped_column(ForeignKey("reviewers.name"))
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.generation_id"))
    # Copied from the generation so the per-version aggregates need no join.
    model_version: Mapped[str] = mapped_column(String(64))
    identity_score: Mapped[int] = mapped_column(Integer)
    overall_score: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now)
    flags: Mapped[list[RatingFlagRow]] = relationship(cascade="all, delete-orphan", lazy="selectin")


class RatingFlagRow(_Base):
    __tablename__ = "rating_flags"
    __table_args__ = (Index("flags_by_version", "model_version", "flag"),)
    rating_id: Mapped[int] = mapped_column(ForeignKey("ratings.id", ondelete="CASCADE"), primary_key=True)
    flag: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Copied from the rating so flag counts per version need no join.
    model_version: Mapped[str] = mapped_column(String(64))


class JudgementRow(_Base):
    __tablename__ = "judgements"
    __table_args__ = (
        UniqueConstraint("reviewer", "pair_key", name="one_judgement_per_reviewer_and_pair"),
        Index("judgements_by_versions", "left_version", "right_version"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    reviewer: Mapped[str] = mapped_column(ForeignKey("reviewers.name"))
    # The two generation ids sorted and joined: the pair regardless of which side it was shown on.
    pair_key: Mapped[str] = mapped_column(String(401))
    case_id: Mapped[str] = mapped_column(String(64))
    prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(Integer)
    left_generation_id: Mapped[str] = mapped_column(ForeignKey("generations.generation_id"))
    right_generation_id: Mapped[str] = mapped_column(ForeignKey("generations.generation_id"))
    left_version: Mapped[str] = mapped_column(String(64))
    right_version: Mapped[str] = mapped_column(String(64))
    choice: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now)


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rating:
    reviewer: str
    generation_id: str
    model_version: str
    identity_score: int
    overall_score: int
    flags: tuple[str, ...]
    comment: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Judgement:
    reviewer: str
    case_id: str
    prompt: str
    seed: int
    left_generation_id: str
    right_generation_id: str
    left_version: str
    right_version: str
    choice: str
    updated_at: datetime


@dataclass(frozen=True)
class BlindPair:
    """Two versions' generations of one case (same prompt, seed, identities), not yet in a display order."""

    case_id: str
    first: GenerationRecord
    second: GenerationRecord


@dataclass(frozen=True)
class ScoreSummary:
    """Mean of n scores with a 95% t interval (lo, hi are None below 2 scores)."""

    n: int
    mean: float | None
    lo: float | None
    hi: float | None


@dataclass(frozen=True)
class WinRate:
    """Blind judgements of `version` against `opponent`: ties count half a win; 95% Wilson interval."""

    version: str
    opponent: str
    wins: int
    losses: int
    ties: int
    rate: float
    lo: float
    hi: float

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties


@dataclass(frozen=True)
class VersionAggregate:
    model_version: str
    n_generations: int
    n_rated_generations: int
    n_ratings: int
    n_reviewers: int
    overall: ScoreSummary
    identity: ScoreSummary
    flag_counts: dict[str, int] = field(default_factory=dict)
    win_vs_champion: WinRate | None = None


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion `successes / n` (successes may be fractional: ties).

    Raises:
        ReviewError: n < 1 or successes outside [0, n].
    """
    if n < 1 or not 0 <= successes <= n:
        raise ReviewError(f"Wilson interval needs n >= 1 and 0 <= successes <= n, got {successes}/{n}")
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(n: int, total: float, total_sq: float) -> ScoreSummary:
    """Mean and 95% t interval from the count, sum and sum of squares of scores."""
    if n == 0:
        return ScoreSummary(0, None, None, None)
    mean = total / n
    if n < 2:
        return ScoreSummary(n, mean, None, None)
    from scipy.stats import t

    variance = max(0.0, (total_sq - n * mean * mean) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * math.sqrt(variance / n)
    return ScoreSummary(n, mean, mean - half, mean + half)


# ---------------------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------------------

_T = TypeVar("_T")


class ReviewStore:
    """Ratings and pairwise judgements in a SQL database (any SQLAlchemy URL; SQLite file by default).

    Writes are transactions retried on lock errors (SQLite: `BEGIN IMMEDIATE` under a busy timeout, WAL so
    readers never block the writer), so concurrent writers in several processes lose nothing. Creating a
    store creates the tables if missing.
    """

    def __init__(self, url: str, *, busy_timeout_s: float = 30.0, max_retries: int = 20):
        self.url = url
        self.max_retries = max_retries
        self._sqlite = url.startswith("sqlite")
        if self._sqlite:
            database = url.split("///", 1)[1] if "///" in url else ""
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(
            url, connect_args={"timeout": busy_timeout_s} if self._sqlite else {}
        )
        if self._sqlite:
            self._configure_sqlite(busy_timeout_s)
        self._write(lambda session: _Base.metadata.create_all(session.connection()))

    def _configure_sqlite(self, busy_timeout_s: float) -> None:
        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_connection, _record):
            # pysqlite's own transaction handling would BEGIN (deferred) behind SQLAlchemy's back; turn it
            # off and let the "begin" hook below say which kind of transaction starts.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @event.listens_for(self.engine, "begin")
        def _on_begin(connection):
            # A deferred transaction that reads and then writes can fail with SQLITE_BUSY without waiting
            # (another writer got in between); IMMEDIATE takes the write lock first, under the busy timeout.
            immediate = connection.get_execution_options().get("magicid_write", False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions ----------------------------------------------------------------------------------

    def _write(self, work: Callable[[Session], _T]) -> _T:
        delay = 0.01
        for attempt in range(self.max_retries + 1):
            try:
                with self.engine.connect() as connection:
                    connection = connection.execution_options(magicid_write=True)
                    with Session(bind=connection) as session, session.begin():
                        return work(session)
            except OperationalError as exc:
                if attempt == self.max_retries or not _is_lock_error(exc):
                    raise
            except IntegrityError:
                # Two writers inserted the same (reviewer, item) at once on a non-SQLite database: the
                # retry finds the row the other wrote and updates it.
                if attempt == self.max_retries:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        raise AssertionError("unreachable")

    def _read(self, work: Callable[[Session], _T]) -> _T:
        with Session(self.engine) as session:
            return work(session)

    # -- reviewers and generations ---------------------------------------------------------------------

    def ensure_reviewer(self, name: str) -> None:
        """Record a reviewer (idempotent); ratings and judgements must name a recorded reviewer."""
        _check_reviewer_name(name, source="reviewer")

        def work(session: Session) -> None:
            if session.get(ReviewerRow, name) is None:
                session.add(ReviewerRow(name=name))

        self._write(work)

    def reviewers(self) -> list[str]:
        return self._read(lambda s: list(s.scalars(select(ReviewerRow.name).order_by(ReviewerRow.name))))

    def register_generations(self, records: Iterable[GenerationRecord]) -> int:
        """Insert or update generations from a manifest (idempotent). Returns how many were new.

        Raises:
            ReviewError: an already registered generation id now names another model version (its ratings
                would move to the wrong version).
        """
        records = list(records)

        def work(session: Session) -> int:
            existing = {
                row.generation_id: row
                for row in session.scalars(
                    select(GenerationRow).where(
                        GenerationRow.generation_id.in_([r.generation_id for r in records])
                    )
                )
            }
            new = 0
            for record in records:
                values = {
                    "model_version": record.model_version,
                    "case_id": record.resolved_case_id(),
                    "prompt": record.prompt,
                    "seed": record.seed,
                    "image_path": record.image_path,
                    "pre_diir_path": record.pre_diir_path,
                    "reference_paths": list(record.reference_paths),
                    "boxes": [list(b) for b in record.boxes],
                }
                row = existing.get(record.generation_id)
                if row is None:
                    session.add(GenerationRow(generation_id=record.generation_id, **values))
                    new += 1
                    continue
                if row.model_version != record.model_version:
                    raise ReviewError(
                        f"generation {record.generation_id!r} is registered for model version "
                        f"{row.model_version!r} but the manifest now says {record.model_version!r}: "
                        "generation ids must be stable; give the new generation a new id"
                    )
                for key, value in values.items():
                    setattr(row, key, value)
            return new

        return self._write(work)

    def generation(self, generation_id: str) -> GenerationRecord:
        row = self._read(lambda s: s.get(GenerationRow, generation_id))
        if row is None:
            raise ReviewError(f"unknown generation {generation_id!r}: register the manifest that lists it")
        return _record(row)

    def model_versions(self) -> list[str]:
        """Model versions with registered generations, numerically sorted where they are numbers."""
        versions = self._read(lambda s: list(s.scalars(select(GenerationRow.model_version).distinct())))
        return sorted(versions, key=_version_sort_key)

    def queue(
        self, reviewer: str, model_version: str, *, include_rated: bool = False, limit: int | None = None
    ) -> list[GenerationRecord]:
        """Generations of `model_version` that `reviewer` has not rated yet (all of them with include_rated),
        ordered by generation id."""
        g = GenerationRow
        # Plain columns, not ORM objects: the queue of a large evaluation set is read on every page view.
        query = select(*_GENERATION_COLUMNS).where(g.model_version == model_version)
        if not include_rated:
            rated = select(RatingRow.id).where(
                RatingRow.reviewer == reviewer, RatingRow.generation_id == g.generation_id
            )
            query = query.where(~rated.exists())
        query = query.order_by(g.generation_id).limit(limit)
        return self._read(lambda s: [_record_from_columns(row) for row in s.execute(query)])

    # -- ratings -----------------------------------------------------------------------------------------

    def rate(
        self,
        reviewer: str,
        generation_id: str,
        *,
        identity_score: int,
        overall_score: int,
        flags: Sequence[str] = (),
        comment: str = "",
    ) -> Rating:
        """Save `reviewer`'s rating of a generation; a second rating by the same reviewer replaces the first.

        Raises:
            ReviewError: unknown reviewer or generation, a score outside 1-5, an unknown flag.
        """
        for label, score in (("identity_score", identity_score), ("overall_score", overall_score)):
            if not (isinstance(score, int) and SCORE_MIN <= score <= SCORE_MAX):
                raise ReviewError(f"{label} must be an integer {SCORE_MIN}-{SCORE_MAX}, got {score!r}")
        unknown = sorted(set(flags) - set(ARTIFACT_FLAGS))
        if unknown:
            raise ReviewError(f"unknown artifact flags {unknown}: use some of {list(ARTIFACT_FLAGS)}")
        flags = tuple(sorted(set(flags)))

        def work(session: Session) -> Rating:
            self._require_reviewer(session, reviewer)
            generation = session.get(GenerationRow, generation_id)
            if generation is None:
                raise ReviewError(
                    f"unknown generation {generation_id!r}: register the manifest that lists it"
                )
            row = session.scalars(
                select(RatingRow).where(
                    RatingRow.reviewer == reviewer, RatingRow.generation_id == generation_id
                )
            ).one_or_none()
            now = _now()
            if row is None:
                row = RatingRow(
                    reviewer=reviewer,
                    generation_id=generation_id,
                    model_version=generation.model_version,
                    created_at=now,
                )
                session.add(row)
            row.identity_score = identity_score
            row.overall_score = overall_score
            row.comment = comment
            row.updated_at = now
            row.flags = [RatingFlagRow(flag=flag, model_version=generation.model_version) for flag in flags]
            session.flush()
            return _rating(row)

        return self._write(work)

    def rating(self, reviewer: str, generation_id: str) -> Rating | None:
        query = select(RatingRow).where(
            RatingRow.reviewer == reviewer, RatingRow.generation_id == generation_id
        )
        return self._read(lambda s: next((_rating(r) for r in s.scalars(query)), None))

    def history(self, reviewer: str) -> tuple[list[Rating], list[Judgement]]:
        """`reviewer`'s own ratings and judgements, newest first."""

        def work(session: Session):
            ratings = session.scalars(
                select(RatingRow).where(RatingRow.reviewer == reviewer).order_by(RatingRow.updated_at.desc())
            )
            judgements = session.scalars(
                select(JudgementRow)
                .where(JudgementRow.reviewer == reviewer)
                .order_by(JudgementRow.updated_at.desc())
            )
            return [_rating(r) for r in ratings], [_judgement(j) for j in judgements]

        return self._read(work)

    # -- blind pairs ------------------------------------------------------------------------------------

    def pairs(self, version_a: str, version_b: str) -> list[BlindPair]:
        """Cases that both versions generated (same case id), ordered by case id."""
        if version_a == version_b:
            raise ReviewError(f"a blind pair needs two different model versions, got {version_a!r} twice")
        a, b = aliased(GenerationRow), aliased(GenerationRow)
        query = (
            select(a, b)
            .join(b, a.case_id == b.case_id)
            .where(a.model_version == version_a, b.model_version == version_b)
            .order_by(a.case_id, a.generation_id, b.generation_id)
        )
        return self._read(
            lambda s: [BlindPair(ra.case_id, _record(ra), _record(rb)) for ra, rb in s.execute(query)]
        )

    def unjudged_pairs(self, reviewer: str, version_a: str, version_b: str) -> list[BlindPair]:
        """`pairs(version_a, version_b)` that `reviewer` has not judged yet."""
        judged = set(
            self._read(
                lambda s: list(
                    s.scalars(select(JudgementRow.pair_key).where(JudgementRow.reviewer == reviewer))
                )
            )
        )
        return [
            p
            for p in self.pairs(version_a, version_b)
            if pair_key(p.first.generation_id, p.second.generation_id) not in judged
        ]

    def judge(
        self, reviewer: str, left_generation_id: str, right_generation_id: str, choice: str
    ) -> Judgement:
        """Save `reviewer`'s blind choice between two generations of one case, shown left and right.

        A second judgement of the same pair by the same reviewer replaces the first.

        Raises:
            ReviewError: unknown reviewer or generation, a choice other than left/right/tie, the two
                generations from the same version or from different cases.
        """
        if choice not in CHOICES:
            raise ReviewError(f"choice must be one of {list(CHOICES)}, got {choice!r}")

        def work(session: Session) -> Judgement:
            self._require_reviewer(session, reviewer)
            left = session.get(GenerationRow, left_generation_id)
            right = session.get(GenerationRow, right_generation_id)
            for generation_id, row in ((left_generation_id, left), (right_generation_id, right)):
                if row is None:
                    raise ReviewError(
                        f"unknown generation {generation_id!r}: register the manifest that lists it"
                    )
            if left.model_version == right.model_version:
                raise ReviewError(
                    f"generations {left_generation_id!r} and {right_generation_id!r} are both model version "
                    f"{left.model_version!r}: a blind pair compares two versions"
                )
            if left.case_id != right.case_id:
                raise ReviewError(
                    f"generations {left_generation_id!r} and {right_generation_id!r} are different cases "
                    "(prompt, seed or identities differ): a blind pair compares the same case"
                )
            key = pair_key(left_generation_id, right_generation_id)
            row = session.scalars(
                select(JudgementRow).where(JudgementRow.reviewer == reviewer, JudgementRow.pair_key == key)
            ).one_or_none()
            now = _now()
            if row is None:
                row = JudgementRow(reviewer=reviewer, pair_key=key, created_at=now)
                session.add(row)
            row.case_id = left.case_id
            row.prompt = left.prompt
            row.seed = left.seed
            row.left_generation_id, row.right_generation_id = left_generation_id, right_generation_id
            row.left_version, row.right_version = left.model_version, right.model_version
            row.choice = choice
            row.updated_at = now
            session.flush()
            return _judgement(row)

        return self._write(work)

    # -- aggregates -------------------------------------------------------------------------------------

    def win_rate(self, version: str, opponent: str) -> WinRate | None:
        """`version`'s blind win rate against `opponent` over all reviewers (None without judgements)."""
        j = JudgementRow
        query = (
            select(j.left_version, j.choice, func.count())
            .where(
                ((j.left_version == version) & (j.right_version == opponent))
                | ((j.left_version == opponent) & (j.right_version == version))
            )
            .group_by(j.left_version, j.choice)
        )
        wins = losses = ties = 0
        for left_version, choice, count in self._read(lambda s: list(s.execute(query))):
            if choice == "tie":
                ties += count
            elif (choice == "left") == (left_version == version):
                wins += count
            else:
                losses += count
        return _win_rate(version, opponent, wins, losses, ties) if wins + losses + ties else None

    def aggregates(self, champion: str | None = None) -> dict[str, VersionAggregate]:
        """Per model version: counts, mean scores with 95% intervals, flag counts, and, when `champion` is
        given, the blind win rate against it (None for the champion itself and without judgements)."""
        r, f, j = RatingRow, RatingFlagRow, JudgementRow

        def work(session: Session):
            generations = dict(
                session.execute(
                    select(GenerationRow.model_version, func.count()).group_by(GenerationRow.model_version)
                ).all()
            )
            scores = session.execute(
                select(
                    r.model_version,
                    func.count(),
                    func.count(r.generation_id.distinct()),
                    func.sum(r.overall_score),
                    func.sum(r.overall_score * r.overall_score),
                    func.sum(r.identity_score),
                    func.sum(r.identity_score * r.identity_score),
                ).group_by(r.model_version)
            ).all()
            # A separate query so that each distinct count walks its own covering index in order.
            reviewer_counts = dict(
                session.execute(
                    select(r.model_version, func.count(r.reviewer.distinct())).group_by(r.model_version)
                ).all()
            )
            flags = session.execute(
                select(f.model_version, f.flag, func.count()).group_by(f.model_version, f.flag)
            )
            judged = []
            if champion is not None:
                judged = session.execute(
                    select(j.left_version, j.right_version, j.choice, func.count())
                    .where((j.left_version == champion) | (j.right_version == champion))
                    .group_by(j.left_version, j.right_version, j.choice)
                ).all()
            return generations, scores, reviewer_counts, flags.all(), judged

        generations, scores, reviewer_counts, flags, judged = self._read(work)
        by_version = {row[0]: row[1:] for row in scores}
        flag_counts: dict[str, dict[str, int]] = {}
        for version, flag, count in flags:
            flag_counts.setdefault(version, {})[flag] = count
        outcomes: dict[str, list[int]] = {}  # challenger version -> [wins, losses, ties] against the champion
        for left_version, right_version, choice, count in judged:
            version = right_version if left_version == champion else left_version
            if version == champion:
                continue
            tally = outcomes.setdefault(version, [0, 0, 0])
            if choice == "tie":
                tally[2] += count
            elif (choice == "left") == (left_version == version):
                tally[0] += count
            else:
                tally[1] += count
        out = {}
        for version in sorted(set(generations) | set(by_version), key=_version_sort_key):
            n, n_gen, s_o, ss_o, s_i, ss_i = by_version.get(version, (0, 0, 0, 0, 0, 0))
            tally = outcomes.get(version)
            out[version] = VersionAggregate(
                model_version=version,
                n_generations=generations.get(version, 0),
                n_rated_generations=n_gen,
                n_ratings=n,
                n_reviewers=reviewer_counts.get(version, 0),
                overall=mean_interval(n, s_o or 0, ss_o or 0),
                identity=mean_interval(n, s_i or 0, ss_i or 0),
                flag_counts=flag_counts.get(version, {}),
                win_vs_champion=_win_rate(version, champion, *tally) if tally else None,
            )
        return out

    def _require_reviewer(self, session: Session, reviewer: str) -> None:
        if session.get(ReviewerRow, reviewer) is None:
            raise ReviewError(f"unknown reviewer {reviewer!r}: sign in (which records the reviewer) first")


def _win_rate(version: str, opponent: str, wins: int, losses: int, ties: int) -> WinRate:
    n = wins + losses + ties
    lo, hi = wilson_interval(wins + 0.5 * ties, n)
    return WinRate(version, opponent, wins, losses, ties, (wins + 0.5 * ties) / n, lo, hi)


def _is_lock_error(exc: OperationalError) -> bool:
    text = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
    return "locked" in text or "busy" in text or "deadlock" in text


def pair_key(generation_a: str, generation_b: str) -> str:
    """The key of a blind pair: its two generation ids sorted and joined (independent of display order)."""
    return "|".join(sorted((generation_a, generation_b)))


def _version_sort_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


_GENERATION_COLUMNS = (
    GenerationRow.generation_id,
    GenerationRow.model_version,
    GenerationRow.prompt,
    GenerationRow.seed,
    GenerationRow.reference_paths,
    GenerationRow.boxes,
    GenerationRow.image_path,
    GenerationRow.pre_diir_path,
    GenerationRow.case_id,
)


def _record_from_columns(row) -> GenerationRecord:
    # Rows were validated when registered: construct without validating again (fast for long queues).
    return GenerationRecord.model_construct(
        generation_id=row[0],
        model_version=row[1],
        prompt=row[2],
        seed=row[3],
        reference_paths=list(row[4]),
        boxes=[tuple(b) for b in row[5]],
        image_path=row[6],
        pre_diir_path=row[7],
        case_id=row[8],
    )


def _record(row: GenerationRow) -> GenerationRecord:
    return GenerationRecord(
        generation_id=row.generation_id,
        model_version=row.model_version,
        prompt=row.prompt,
        seed=row.seed,
        reference_paths=list(row.reference_paths),
        boxes=[tuple(b) for b in row.boxes],
        image_path=row.image_path,
        pre_diir_path=row.pre_diir_path,
        case_id=row.case_id,
    )


def _rating(row: RatingRow) -> Rating:
    return Rating(
        reviewer=row.reviewer,
        generation_id=row.generation_id,
        model_version=row.model_version,
        identity_score=row.identity_score,
        overall_score=row.overall_score,
        flags=tuple(sorted(f.flag for f in row.flags)),
        comment=row.comment,
        created_at=_utc(row.created_at),
        updated_at=_utc(row.updated_at),
    )


def _judgement(row: JudgementRow) -> Judgement:
    return Judgement(
        reviewer=row.reviewer,
        case_id=row.case_id,
        prompt=row.prompt,
        seed=row.seed,
        left_generation_id=row.left_generation_id,
        right_generation_id=row.right_generation_id,
        left_version=row.left_version,
        right_version=row.right_version,
        choice=row.choice,
        updated_at=_utc(row.updated_at),
    )


# ---------------------------------------------------------------------------------------------------------
# MLflow: tags the promotion gate reads; roles and metrics the leaderboard shows
# ---------------------------------------------------------------------------------------------------------


def review_tags(aggregate: VersionAggregate, champion: str | None) -> dict[str, str]:
    """The `TAG_*` values for one version's aggregate (intervals only where they exist)."""
    tags = {
        TAG_N_RATINGS: str(aggregate.n_ratings),
        TAG_N_REVIEWERS: str(aggregate.n_reviewers),
        TAG_N_RATED_GENERATIONS: str(aggregate.n_rated_generations),
    }
    for summary, (mean_tag, lo_tag, hi_tag) in (
        (aggregate.overall, (TAG_MEAN_OVERALL, TAG_MEAN_OVERALL_LO, TAG_MEAN_OVERALL_HI)),
        (aggregate.identity, (TAG_MEAN_IDENTITY, TAG_MEAN_IDENTITY_LO, TAG_MEAN_IDENTITY_HI)),
    ):
        if summary.mean is not None:
            tags[mean_tag] = repr(summary.mean)
        if summary.lo is not None:
            tags[lo_tag], tags[hi_tag] = repr(summary.lo), repr(summary.hi)
    win = aggregate.win_vs_champion
    tags[TAG_N_PAIRS] = str(win.n if win is not None else 0)
    if win is not None and champion is not None:
        tags[TAG_WIN_RATE] = repr(win.rate)
        tags[TAG_WIN_RATE_LO], tags[TAG_WIN_RATE_HI] = repr(win.lo), repr(win.hi)
        tags[TAG_CHAMPION_VERSION] = champion
    return tags


def export_review_tags(
    store: ReviewStore,
    model_name: str,
    versions: Sequence[str] | None = None,
    *,
    champion: str | None = None,
    client: Any = None,
) -> dict[str, dict[str, str]]:
    """Write each version's review aggregates as MLflow model-version tags (`TAG_*`).

    Args:
        store: the review store.
        model_name: the registered model (params `promotion.model_name`).
        versions: which versions (default: every version with registered generations).
        champion: the version win rates are against (default: the model's `champion` alias, if set).
        client: an `mlflow.MlflowClient` (default: one for the current tracking URI).

    Returns:
        version -> the tags written. Tags of a statistic that no longer exists (a win rate without pairs,
        an interval below 2 ratings) are deleted, so a stale value never reaches the gate.

    Raises:
        ReviewError: the registered model or one of the versions does not exist in the registry.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = client if client is not None else mlflow.MlflowClient()
    if champion is None:
        champion = registry_roles(client, model_name).get("champion")
    aggregates = store.aggregates(champion=champion)
    versions = list(versions) if versions is not None else list(aggregates)
    all_tags = (
        TAG_N_RATINGS,
        TAG_N_REVIEWERS,
        TAG_N_RATED_GENERATIONS,
        TAG_MEAN_OVERALL,
        TAG_MEAN_OVERALL_LO,
        TAG_MEAN_OVERALL_HI,
        TAG_MEAN_IDENTITY,
        TAG_MEAN_IDENTITY_LO,
        TAG_MEAN_IDENTITY_HI,
        TAG_N_PAIRS,
        *WIN_RATE_TAGS,
    )
    written = {}
    for version in versions:
        try:
            current = client.get_model_version(model_name, version).tags
        except MlflowException as exc:
            raise ReviewError(
                f"model {model_name!r} version {version!r} is not in the MLflow registry: register it "
                "(magicid train/evaluate) or export other versions"
            ) from exc
        aggregate = aggregates.get(version) or VersionAggregate(
            version, 0, 0, 0, 0, ScoreSummary(0, None, None, None), ScoreSummary(0, None, None, None)
        )
        tags = review_tags(aggregate, champion)
        tags[TAG_EXPORTED_AT] = _now().isoformat()
        for key, value in tags.items():
            client.set_model_version_tag(model_name, version, key, value)
        for key in all_tags:
            if key not in tags and key in current:
                client.delete_model_version_tag(model_name, version, key)
        written[version] = tags
    return written


def parse_review_tags(tags: dict[str, str]) -> dict[str, float | int | str]:
    """The review tags of a model version (`ModelVersion.tags`), typed: counts int, statistics float,
    the champion version str. Missing tags are absent (the gate decides what absence means)."""
    ints = {TAG_N_RATINGS, TAG_N_REVIEWERS, TAG_N_RATED_GENERATIONS, TAG_N_PAIRS}
    out: dict[str, float | int | str] = {}
    for key, value in tags.items():
        if not key.startswith("review.") or key == TAG_EXPORTED_AT:
            continue
        out[key] = int(value) if key in ints else value if key == TAG_CHAMPION_VERSION else float(value)
    return out


def mlflow_client(tracking_uri: str) -> Any:
    """An `mlflow.MlflowClient` for tracking and registry at `tracking_uri`.

    Raises:
        ReviewError: a `sqlite:///` URI whose file does not exist (opening it would create an empty
            registry instead of reading the real one).
    """
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///"))
        if not database.is_file():
            raise ReviewError(
                f"{tracking_uri}: no MLflow tracking database there yet (train and register a model first, "
                "or set tracking.uri)"
            )
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def registry_roles(client: Any, model_name: str) -> dict[str, str]:
    """Aliases of the registered model (`champion`, `challenger`, ...) -> version; {} if the model does not
    exist yet (nothing trained), which the leaderboard states."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(model_name)
    except MlflowException:
        return {}
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def version_metrics(client: Any, model_name: str, version: str) -> dict[str, float]:
    """Metrics of a registered version: its logged model's metrics, else its run's ({} if neither)."""
    from mlflow.exceptions import MlflowException

    try:
        model_version = client.get_model_version(model_name, version)
    except MlflowException:
        return {}
    metrics: dict[str, float] = {}
    model_id = getattr(model_version, "model_id", None)
    if model_id:
        try:
            for metric in client.get_logged_model(model_id).metrics or []:
                metrics[metric.key] = metric.value
        except MlflowException:
            pass
    if not metrics and model_version.run_id:
        try:
            metrics = dict(client.get_run(model_version.run_id).data.metrics)
        except MlflowException:
            pass
    return metrics
