"""Prefect in tests: one ephemeral API per session under a private PREFECT_HOME, heartbeats off (platform facts).

Set before prefect is imported: a temporary PREFECT_HOME (its own database and result storage, so caches never
leak between sessions), analytics off, no PREFECT_API_URL (never a user's server).
"""

from __future__ import annotations

import os
import tempfile

import pytest

_HOME = tempfile.mkdtemp(prefix="magicid-prefect-home-")
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session", autouse=True)
def prefect_api():
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield


@pytest.fixture()
def prefect_home(tmp_path):
    """Kept for the older flow test: the session fixture above already isolates Prefect."""
    return tmp_path
