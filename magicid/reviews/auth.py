"""Reviewers and sign-in: scrypt password hashes, the reviewers file, and the sign-in throttle.

A reviewers file is YAML `name: scrypt$...` (written by `add_reviewer`); `SignInThrottle.sign_in` limits attempts per
reviewer name and per client, with a lock-out, and an unknown name costs the same time as a wrong password.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import yaml

from magicid.errors import ReviewError
from magicid.utils import atomic_write_text

_REVIEWER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
MIN_PASSWORD_LENGTH = 8
# scrypt cost: n=2**14, r=8, p=1 takes ~0.07 s and 16 MiB here: slow for guessing, fine for a sign-in.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


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
        check_reviewer_name(str(name), source=str(path))
        if str(name) != replacing:
            parse_password_hash(encoded, f"{path}: the entry of reviewer {str(name)!r}", reviewer=str(name))
    return {str(k): v for k, v in reviewers.items()}


def add_reviewer(path: str | Path, name: str, password: str) -> Path:
    """Add a reviewer (or set a new password) in the reviewers file, storing only the scrypt hash.

    The file is rewritten atomically; it is created if missing.
    """
    check_reviewer_name(name, source="reviewer name")
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


def check_reviewer_name(name: str, source: str) -> None:
    if not _REVIEWER_NAME.match(name):
        raise ReviewError(
            f"{source}: reviewer name {name!r} must be 1-64 lower-case letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
