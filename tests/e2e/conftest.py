"""End-to-end journeys use the flows' Prefect harness (private PREFECT_HOME, ephemeral API) and the dashboards'
Chromium page."""

from tests.dashboards.conftest import chromium_page  # noqa: F401
from tests.flows.conftest import prefect_api  # noqa: F401
