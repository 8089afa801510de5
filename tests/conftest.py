import pytest

from tests.support import database_url


@pytest.fixture(scope="session", autouse=True)
def test_database() -> str:
    """Start the run's PostgreSQL before any test's IOLoop is running."""
    return database_url()
