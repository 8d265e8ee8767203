"""Unit tests run with no server at all (check it, stopping nothing, by pointing the settings
at closed ports: ``RECEIPTS_TEST_PG_URL=postgresql://postgres@127.0.0.1:1/postgres
RECEIPTS_TEST_REDIS_URL=redis://127.0.0.1:1/0 python -m pytest tests/unit``). A unit test that
asks for a fixture reaching a server, or carries a server's marker, fails before any fixture
runs, naming it: such a test belongs in tests/integration."""

from __future__ import annotations

import pytest

SERVER_FIXTURES = frozenset({"pg_database", "pg", "database", "redis_claim", "redis_url"})
SERVER_MARKERS = frozenset({"postgres", "redis", "slow"})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    fixtures = SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    markers = SERVER_MARKERS.intersection(m.name for m in item.iter_markers())
    if fixtures or markers:
        pytest.fail(
            f"a unit test must not need a server: fixtures {sorted(fixtures)}, "
            f"markers {sorted(markers)}; move it to tests/integration",
            pytrace=False,
        )
