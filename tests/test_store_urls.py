"""Store URLs in params: the schemes config accepts are ones MLflow and SQLAlchemy serve, and the checks a
command runs before it opens a store (driver installed, SQLite file in a folder, HTTP server answers)."""

from __future__ import annotations

import http.server
import importlib.util
import os
import socket
import threading
import time

import pytest

from magicid.errors import StoreError
from magicid.store_urls import (
    ARTIFACT_SCHEMES,
    REVIEW_DB_SCHEMES,
    TRACKING_SCHEMES,
    check_database_server,
    check_database_url,
    check_http_server,
    scheme_problem,
    url_scheme,
)


def test_accepted_schemes_are_served_by_mlflow_and_sqlalchemy():
    from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    from sqlalchemy.engine import make_url

    assert set(TRACKING_SCHEMES) <= set(_tracking_store_registry._registry)
    assert set(ARTIFACT_SCHEMES) <= set(_artifact_repository_registry._registry)
    for scheme in REVIEW_DB_SCHEMES:
        assert make_url(f"{scheme}://").get_dialect() is not None


@pytest.mark.parametrize(
    ("value", "scheme", "ok"),
    [
        ("sqlite:///mlruns.db", "sqlite", True),
        ("postgresql+psycopg2://u@h/db", "postgresql", True),
        ("http://127.0.0.1:5000", "http", True),
        ("mlruns", "", True),
        ("./a:b", "", True),
        ("file:/tmp/mlruns", "file", True),
        ("foo://x", "foo", False),
        ("http://", "http", False),
        ("sqlite:mlruns.db", "sqlite", False),
    ],
)
def test_tracking_uri_schemes(value, scheme, ok):
    assert url_scheme(value) == scheme
    assert (scheme_problem(value, TRACKING_SCHEMES, "sqlite:///mlruns.db") is None) == ok


def test_database_url_checks_parse_dialect_driver_and_sqlite_file(tmp_path):
    check_database_url(f"sqlite:///{tmp_path / 'new.db'}", "review.db_url")  # absent: created on first use
    with pytest.raises(StoreError, match="review.db_url.*no dialect or driver"):
        check_database_url("postgresql+nosuchdriver://u@h/db", "review.db_url")
    with pytest.raises(StoreError, match="not a database URL"):
        check_database_url("postgresql://u@h:notaport/db", "review.db_url")
    with pytest.raises(StoreError, match="is a folder, not a database file"):
        check_database_url(f"sqlite:///{tmp_path}", "review.db_url")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        check_database_url(f"sqlite:///{tmp_path / 'file.txt' / 'x.db'}", "tracking.uri")
    os.mkfifo(tmp_path / "fifo.db")
    with pytest.raises(StoreError, match="FIFO, socket or device"):
        check_database_url(f"sqlite:///{tmp_path / 'fifo.db'}", "tracking.uri")


@pytest.mark.skipif(importlib.util.find_spec("pymysql") is not None, reason="pymysql is installed here")
def test_missing_driver_names_the_key_and_the_package():
    with pytest.raises(
        StoreError, match=r"tracking.uri=.*driver 'pymysql' is not installed: pip install pymysql"
    ):
        check_database_url("mysql+pymysql://u@127.0.0.1/db", "tracking.uri")


def test_http_server_must_answer_within_the_timeout():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed = probe.getsockname()[1]
    probe.close()
    with pytest.raises(StoreError, match="does not answer.*refused"):
        check_http_server(f"http://127.0.0.1:{closed}", "tracking.uri", timeout_s=2)

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # accepts into the backlog, never answers
    started = time.perf_counter()
    with pytest.raises(StoreError, match="no answer within 0.5 s"):
        check_http_server(f"http://127.0.0.1:{silent.getsockname()[1]}", "tracking.uri", timeout_s=0.5)
    assert time.perf_counter() - started < 5
    silent.close()


def test_http_server_that_answers_any_status_passes():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_http_server(f"http://127.0.0.1:{server.server_address[1]}", "tracking.uri", timeout_s=5)
    finally:
        server.shutdown()


def test_a_database_server_that_refuses_is_one_error_at_once_and_one_that_listens_passes():
    """MLflow would retry creating its engine with back-off for minutes; the probe answers in a connect."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        port = listening.getsockname()[1]
        check_database_server(f"postgresql://u:pw@127.0.0.1:{port}/db", "tracking.uri", 2.0)
    started = time.perf_counter()
    with pytest.raises(StoreError, match=r"tracking.uri=.*u:\*\*\*@127.0.0.1.*does not answer") as raised:
        check_database_server(f"postgresql://u:pw@127.0.0.1:{port}/db", "tracking.uri", 2.0)
    assert "pw" not in str(raised.value) and time.perf_counter() - started < 2.0
    check_database_server("sqlite:///x.db", "review.db_url", 2.0)  # files and unix sockets: nothing to reach
    check_database_server("postgresql://u@/db?host=/run/postgresql", "review.db_url", 2.0)
