"""Local folders and `s3://bucket/prefix` URIs behind one small interface: list, read, write (atomic), exists,
delete.

S3 goes through boto3 with the usual credential chain (environment, shared config/credentials files, instance
metadata), `storage.s3_endpoint_url` for S3-compatible servers, and botocore's standard retry mode
(`storage.s3_max_attempts` attempts with exponential back-off on 5xx, throttling and connection errors). A PUT
is atomic on S3 (an object is never visible half-written); a local write goes through `atomic_write_bytes`.
A request that still fails after its retries raises `StorageError` naming the URI.

Keys are relative posix paths under the root; absolute keys, `..` and empty segments are refused, in both
directions (a key listed from S3 is untrusted and must not escape a local staging folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from magicid.errors import MagicIDError
from magicid.utils import atomic_write_bytes


class StorageError(MagicIDError):
    """A storage location cannot be reached or read/written as asked; the message names the URI."""


def is_s3(location: str | Path) -> bool:
    return str(location).startswith("s3://")


def check_key(key: str, where: str = "") -> str:
    """`key` if it is a safe relative posix path (no absolute path, `..`, backslash or empty segment)."""
    pure = PurePosixPath(key)
    if (
        not key
        or pure.is_absolute()
        or "\\" in key
        or any(part in ("", "..", ".") for part in key.split("/"))
    ):
        raise StorageError(f"{where}{key!r}: not a safe relative key (absolute, '..', '.' or empty segment)")
    return key


class Storage(Protocol):
    """What the code that stores things needs; `uri` names the root in messages."""

    uri: str

    def list(self, prefix: str = "") -> list[str]: ...
    def read(self, key: str) -> bytes: ...
    def write(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...


@dataclass
class LocalStorage:
    """A local folder; keys are paths relative to it."""

    root: Path

    @property
    def uri(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key, f"{self.root}: ")

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for folder, _, names in os.walk(base):  # does not follow symlinked folders
            for name in names:
                path = Path(folder) / name
                if path.is_file() and not path.is_symlink():
                    keys.append(path.relative_to(self.root).as_posix())
        return sorted(keys)

    def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as error:
            raise StorageError(f"{self._path(key)}: cannot be read ({error.strerror})") from error

    def write(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self._path(key), data)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Storage:
    """`s3://bucket/prefix`: keys are object names relative to the prefix."""

    def __init__(self, uri: str, endpoint_url: str | None = None, max_attempts: int = 5, client=None) -> None:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise StorageError(f"{uri!r}: expected s3://bucket/prefix")
        self.uri, self.bucket, self.prefix = uri.rstrip("/"), bucket, prefix.strip("/")
        if client is None:
            import boto3
            from botocore.config import Config

            # Checksums only where S3 requires them: S3-compatible servers (MinIO, Ceph, moto) differ in
            # support for the newer default (aws-chunked CRC trailers); integrity is MD5/ETag as before.
            config = Config(
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=10,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self.client = client

    def _name(self, key: str) -> str:
        check_key(key, f"{self.uri}: ")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, key: str, method, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(Bucket=self.bucket, **kwargs)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "?")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            attempts = error.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
            raise StorageError(
                f"{self.uri}/{key}: S3 {what} failed ({code}, HTTP {status}, after {attempts} retries); "
                "check the bucket, credentials and storage.s3_endpoint_url, then rerun"
            ) from error
        except BotoCoreError as error:
            raise StorageError(
                f"{self.uri}/{key}: S3 {what} failed ({error}); check storage.s3_endpoint_url and the network"
            ) from error

    def list(self, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        keys, token = [], None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call("list", prefix, self.client.list_objects_v2, Prefix=base + prefix, **extra)
            keys += [item["Key"][len(base) :] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(k for k in keys if k and not k.endswith("/"))
            token = page["NextContinuationToken"]

    def read(self, key: str) -> bytes:
        body = self._call("read", key, self.client.get_object, Key=self._name(key))["Body"]
        return body.read()

    def write(self, key: str, data: bytes) -> None:
        self._call("write", key, self.client.put_object, Key=self._name(key), Body=data)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._name(key))
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"{self.uri}/{key}: S3 head failed ({error})") from error

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Key=self._name(key))


def open_storage(location: str | Path, storage_params=None) -> Storage:
    """A `Storage` for a local folder or an `s3://bucket/prefix` URI (`storage_params`: params.storage)."""
    if is_s3(location):
        endpoint = getattr(storage_params, "s3_endpoint_url", None)
        attempts = getattr(storage_params, "s3_max_attempts", 5)
        return S3Storage(str(location), endpoint_url=endpoint, max_attempts=attempts)
    return LocalStorage(Path(location))


def download_tree(storage: Storage, folder: Path) -> list[str]:
    """Mirror `storage` into `folder` (a staging folder this program owns): every object is copied (keys
    checked, so nothing lands outside `folder`), and files in `folder` that are not objects are removed.

    Returns:
        The keys.
    """
    keys = storage.list()
    for key in keys:
        check_key(key, f"{storage.uri}: object ")
        data = storage.read(key)
        target = folder / key
        if not target.is_file() or target.read_bytes() != data:
            atomic_write_bytes(target, data)
    wanted = set(keys)
    for key in LocalStorage(folder).list():
        if key not in wanted:
            (folder / key).unlink()
    return keys


def upload_tree(folder: Path, storage: Storage, last: tuple[str, ...] = ()) -> list[str]:
    """Copy every regular file under `folder` to `storage`; the keys in `last` go after all others, so a
    reader that trusts those (the manifests) never sees them before the files they refer to."""
    local = LocalStorage(folder)
    keys = [k for k in local.list() if not k.split("/")[0].startswith(".")]
    ordered = [k for k in keys if k not in last] + [k for k in last if k in keys]
    for key in ordered:
        storage.write(key, local.read(key))
    return ordered
