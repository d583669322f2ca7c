"""A throw-away PostgreSQL cluster on loopback, from Debian's server binaries (`make postgres` installs them).

`PostgresCluster.start()` runs `initdb` into a fresh temporary folder, starts `postgres` listening on 127.0.0.1 at
a free port with its unix socket inside that folder, and `stop()` shuts it down (`pg_ctl stop -m fast`) and removes
the folder. PostgreSQL refuses to run as root, so under root (CI containers) the server runs as Debian's `postgres`
system user through `runuser`; the tests connect over TCP as the cluster's superuser `postgres` (trust auth on
loopback only: nothing outside the machine can reach it).

Used by tests/conftest.py (one cluster per test session) and benchmarks/bench_scale.py.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

SUPERUSER = "postgres"


def server_bin_dir() -> Path | None:
    """The folder holding `initdb`, `pg_ctl` and `postgres` (Debian: /usr/lib/postgresql/<major>/bin), or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresCluster:
    """One PostgreSQL server on 127.0.0.1:`port`; `url(db)` is a SQLAlchemy URL (psycopg 3 driver)."""

    def __init__(self, *, durable: bool = False):
        # durable=False turns fsync off: a test cluster is thrown away, and its commits need not survive a power
        # cut. The benchmark keeps PostgreSQL's defaults (durable=True) so its figures are a real server's.
        self.durable = durable
        self.bin_dir = server_bin_dir()
        self.root: Path | None = None
        self.port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def _as_server_user(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def start(self) -> PostgresCluster:
        if self.bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries (initdb) are missing: run `make postgres`")
        # Not under pytest's tmp folder: that one is private to the current user (0700), and under root the
        # server runs as `postgres`, which must reach its data folder and socket.
        self.root = Path(tempfile.mkdtemp(prefix="magicid-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres", group="postgres")
        data = self.root / "data"
        subprocess.run(
            self._as_server_user(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "--username",
                    SUPERUSER,
                    "--auth",
                    "trust",
                    "--encoding",
                    "UTF8",
                    "--locale",
                    "C",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
            text=True,
        )
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.root}",
            "-c max_connections=200",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        last_error = ""
        for _attempt in range(3):  # a free port can be taken between the probe and the server's bind
            self.port = _free_port()
            result = subprocess.run(
                self._as_server_user(
                    [
                        str(self.bin_dir / "pg_ctl"),
                        "-D",
                        str(data),
                        "-l",
                        str(self.root / "server.log"),
                        "-o",
                        " ".join([f"-p {self.port}", *options]),
                        "-w",
                        "-t",
                        "60",
                        "start",
                    ]
                ),
                capture_output=True,
                text=True,
            )
            if result.returncode == 0:
                return self
            last_error = result.stderr + (self.root / "server.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"PostgreSQL did not start in {self.root}: {last_error}")

    def stop(self) -> None:
        if self.root is None:
            return
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            subprocess.run(
                self._as_server_user(
                    [str(self.bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
                ),
                capture_output=True,
                check=False,
            )
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- databases ---------------------------------------------------------------------------------------------

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        deadline = time.monotonic() + 10
        while True:
            try:
                with psycopg.connect(
                    host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres", autocommit=True
                ) as connection:
                    connection.execute(f'CREATE DATABASE "{name}"')
                return self.url(name)
            except psycopg.OperationalError:
                # CREATE DATABASE copies template1 and fails if another session is connected to it at that moment.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
