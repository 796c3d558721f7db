"""The VM tests reuse the integration tests' process helpers and fixtures."""

from test.integration.conftest import (  # noqa: F401  (fixtures and hooks)
    market, processes, pytest_runtest_makereport,
)
