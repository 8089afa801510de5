"""Test selection and the run's PostgreSQL.

Every test is `slow` unless its module is listed in FAST_MODULES: fast modules start no
PostgreSQL, no chatterd process, no nginx and no model, and run in seconds together
(`scripts/test -m "not slow"`).  The full run (`scripts/test`) is what CI runs.
"""

import pytest

from tests.support import database_url

FAST_MODULES = frozenset({
    "test_chunked", "test_coarse_timers", "test_layers", "test_message_shape", "test_redact",
    "test_reply_text", "test_settings",
    "test_upstream_client", "test_upstream_http",
})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: starts PostgreSQL, a server process, nginx or a model (deselect with "
        "-m 'not slow')")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is None or item.module.__name__.rsplit(".", 1)[-1] not in FAST_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def test_database(request: pytest.FixtureRequest) -> str | None:
    """Start the run's PostgreSQL before any test's IOLoop is running (none for a fast run)."""
    if not any(item.get_closest_marker("slow") for item in request.session.items):
        return None
    return database_url()
