"""The URLs in params that name stores (`tracking.uri`, `tracking.artifact_root`, `review.db_url`,
`storage.root`, `storage.s3_endpoint_url`): which schemes each accepts, and the checks a command runs before
it opens one.

Two stages, so that a wrong value never reaches MLflow or SQLAlchemy as a traceback:
- `scheme_problem` is pure string work: `magicid/config.py` calls it when params load, so `tracking.uri=foo://x`
  is a `ConfigError` for every command.
- `check_stores` runs where a command is about to use a store (`magicid/cli.py` names which command uses
  which): the SQLAlchemy dialect and its driver must import (`postgresql://` needs psycopg), a SQLite file must
  be a file in a folder, and an HTTP tracking server must answer within `timeout_s` (MLflow's own client retries
  a refused connection for minutes). Nothing here runs at import.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path
from urllib.parse import urlsplit

from magicid.errors import StoreError

# MLflow's tracking and model-registry stores (mlflow.tracking._tracking_service.utils._tracking_store_registry);
# a folder path (no scheme) is its file store. tests/test_store_urls.py checks this list against MLflow's.
TRACKING_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
TRACKING_SCHEMES = ("", "file", "http", "https", "databricks", "databricks-uc", "uc", *TRACKING_DB_SCHEMES)
# MLflow's artifact repositories (mlflow.store.artifact.artifact_repository_registry), same test.
ARTIFACT_SCHEMES = (
    "", "file", "s3", "gs", "wasbs", "abfss", "hdfs", "viewfs", "sftp", "ftp", "http", "https",
    "mlflow-artifacts", "dbfs", "b2", "r2",
)  # fmt: skip
# The dialects SQLAlchemy itself ships (review.db_url is any SQLAlchemy URL); a driver may follow: `+psycopg2`.
REVIEW_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mariadb", "mssql", "oracle")
STORAGE_ROOT_SCHEMES = ("", "s3")
ENDPOINT_SCHEMES = ("http", "https")
# How to install the driver a dialect loads by default, for the error message.
_DRIVER_HINTS = {
    "psycopg": "pip install 'psycopg[binary]' (or name another driver: postgresql+psycopg2://...)",
    "psycopg2": "pip install psycopg2-binary",
    "MySQLdb": "pip install mysqlclient (or name another driver: mysql+pymysql://... with pip install pymysql)",
    "pymysql": "pip install pymysql",
    "pyodbc": "pip install pyodbc (and an ODBC driver for SQL Server)",
    "oracledb": "pip install oracledb",
}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def url_scheme(value: str) -> str:
    """The scheme of `value` in lower case without a `+driver` suffix; "" for a plain path."""
    match = _SCHEME.match(value)
    return match.group(1).lower().split("+", 1)[0] if match else ""


def scheme_problem(value: str, schemes: tuple[str, ...], example: str) -> str | None:
    """Why `value` is not a URL (or path) with one of `schemes`, or None. `example` goes into the message."""
    scheme = url_scheme(value)
    if scheme not in schemes:
        named = ", ".join(f"{s}://" for s in schemes if s) + (" or a local path" if "" in schemes else "")
        return (
            f"unsupported scheme {scheme + '://' if scheme else value[:40]!r}: use {named} (e.g. {example})"
        )
    if scheme and scheme != "file" and not value[len(scheme) :].split(":", 1)[-1].startswith("//"):
        return f"expected {scheme}://..., e.g. {example}"
    if scheme in ("http", "https", "s3") and not urlsplit(value).netloc:
        return f"{scheme}:// needs a host (or bucket), e.g. {example}"
    return None


def check_database_url(url: str, key: str) -> None:
    """A SQLAlchemy URL that can be opened here: it parses, its dialect exists, its driver imports, and a SQLite
    file is a regular file (or absent) inside a folder. Connects to nothing.

    Raises:
        StoreError: naming `key`, the URL and what to do.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except NoSuchModuleError as error:
        raise StoreError(
            f"{key}={url!r}: SQLAlchemy has no dialect or driver {parsed.drivername!r}; "
            "use e.g. sqlite:///file.db or postgresql://user@host/db"
        ) from error
    except (ArgumentError, ValueError) as error:
        raise StoreError(f"{key}={url!r}: not a database URL ({error}); e.g. sqlite:///file.db") from error
    try:
        dialect.import_dbapi()
    except ImportError as error:
        module = getattr(error, "name", None) or str(error)
        hint = _DRIVER_HINTS.get(module, f"pip install the {module} package")
        raise StoreError(
            f"{key}={url!r}: the database driver {module!r} is not installed: {hint}; or use sqlite:///file.db"
        ) from error
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        _check_sqlite_file(Path(parsed.database), key, url)


def _check_sqlite_file(database: Path, key: str, url: str) -> None:
    try:
        mode = database.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None  # absent (SQLite creates it), or under a file (the folder check below says so)
    except OSError as error:
        raise StoreError(
            f"{key}={url!r}: {database} cannot be inspected ({error.strerror}); check its permissions"
        ) from error
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
        raise StoreError(f"{key}={url!r}: {database} is {kind}, not a database file; name a file")
    existing = database.parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise StoreError(f"{key}={url!r}: {existing} is a file, not a folder; put the database in a folder")


# Default ports of the database servers a SQLAlchemy URL may name without one.
DEFAULT_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433, "oracle": 1521}


def check_database_server(url: str, key: str, timeout_s: float) -> None:
    """A database server named by host (not a file, not a unix socket) accepts a TCP connection within
    `timeout_s`. Without this, MLflow retries creating its engine with back-off for minutes before it fails.

    Raises:
        StoreError: refused, unresolvable or silent, naming `key` and the URL.
    """
    import socket

    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite" or not parsed.host or "host" in parsed.query:
        return  # a file, or a unix socket: nothing to reach over TCP
    port = parsed.port or DEFAULT_DB_PORTS.get(backend)
    if port is None:
        return
    try:
        with socket.create_connection((parsed.host, port), timeout=timeout_s):
            pass
    except OSError as error:
        reason = (
            f"no answer within {timeout_s:g} s"
            if isinstance(error, TimeoutError)
            else error.strerror or error
        )
        raise StoreError(
            f"{key}={parsed.render_as_string(hide_password=True)!r}: the database server at {parsed.host}:{port} "
            f"does not answer ({reason}); start it or point {key} at a reachable server (or sqlite:///file.db)"
        ) from error


def check_http_server(url: str, key: str, timeout_s: float) -> None:
    """An HTTP(S) tracking server answers within `timeout_s` (any HTTP status counts: it is there).

    Raises:
        StoreError: refused, unresolvable or silent, naming `key` and the URL.
    """
    import socket
    import urllib.error
    import urllib.request

    probe = url.rstrip("/") + "/health"  # the MLflow server's liveness route
    try:
        with urllib.request.urlopen(probe, timeout=timeout_s):  # noqa: S310 - scheme checked: http(s) only
            pass
    except urllib.error.HTTPError:
        return  # it answered (401/403/404 from a proxy or an older server): the server is there
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, socket.timeout | TimeoutError):
            reason = f"no answer within {timeout_s:g} s"
        raise StoreError(
            f"{key}={url!r}: the tracking server does not answer ({reason}); start it (mlflow server ...) "
            "or set tracking.uri to a reachable server or sqlite:///mlruns.db"
        ) from error


def check_stores(params, stores: tuple[str, ...], timeout_s: float = 5.0) -> None:
    """Check the stores a command is about to use: "tracking" (`tracking.uri`) and/or "review"
    (`review.db_url`). Schemes were checked when params loaded; this checks drivers, files and servers.

    Raises:
        StoreError: the first store that cannot be used, naming its key.
    """
    if "tracking" in stores:
        uri = params.tracking.uri
        scheme = url_scheme(uri)
        if scheme in TRACKING_DB_SCHEMES:
            check_database_url(uri, "tracking.uri")
            check_database_server(uri, "tracking.uri", timeout_s)
        elif scheme in ("http", "https"):
            check_http_server(uri, "tracking.uri", timeout_s)
    if "review" in stores:
        check_database_url(params.review.db_url, "review.db_url")
        check_database_server(params.review.db_url, "review.db_url", timeout_s)
