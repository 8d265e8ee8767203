"""Shared fixtures: real PostgreSQL and SQLite databases built by the real migrations, a Redis
db of the run's own, settings from the environment, and the project's own simulator.

Every fixture that reaches a server connects only when a test asks for it, so the unit tests run
with no server at all. The shared servers are used only through databases and a Redis db this
run makes or takes for itself; tests/support/untouched.py proves after each run that they were
neither restarted nor flushed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import redis_db
from tests.support.databases import FAST_TIMINGS, Configure, pg_url, truncate
from tests.support.servers import PrivateRedis
from tests.support.shared import PG_ADMIN_URL, REDIS_SERVER_URL, REDIS_URL_GIVEN
from worker import db
from worker.config import get_settings
from worker.migrate import upgrade
from worker.simulator import Simulator

pytest_plugins = ["tests.support.untouched"]

# The suite runs in three pytest-xdist processes (pyproject.toml). Tests that start real worker
# and beat processes check timing rules on scaled-down clocks: they run one after another in
# one group, so they never compete with each other for the cores; the demos and the start
# check, which mostly wait, form a second group; everything else is spread over the rest.
_WAITING_MODULES = {"test_demo", "test_readme_demo", "test_credentials_start"}


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A command run in-process (CliRunner) sets up logging as its process would: filters and
    formatters on the root logger's handlers, which are pytest's own and outlive the test.
    Put them back, so that no test's logging depends on which tests ran before it."""
    import logging

    root = logging.getLogger()
    saved = [(h, list(h.filters), h.formatter) for h in root.handlers]
    level = root.level
    yield
    for handler, filters, formatter in saved:
        handler.filters[:] = filters
        handler.setFormatter(formatter)
    root.setLevel(level)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") is None:
            continue
        module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
        group = "waiting" if module in _WAITING_MODULES else "processes"
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, migrated to head, dropped afterwards."""
    name = f"receipts_test_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = pg_url(name)
    upgrade(url)
    yield url
    db.reset_engine()
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'receipts.db'}"
    upgrade(url)
    return url


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """``configure(RECEIPTS_X="...")`` sets variables for this test; settings and the engine
    are rebuilt from them. Starts from scaled timings and nothing else."""
    for key in list(os.environ):
        if key.startswith("RECEIPTS_") and not key.startswith("RECEIPTS_TEST_"):
            monkeypatch.delenv(key)

    def apply(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        db.reset_engine()

    apply(**FAST_TIMINGS)
    yield apply
    get_settings.cache_clear()
    db.reset_engine()


@pytest.fixture(params=["postgres", "sqlite"])
def database(request: pytest.FixtureRequest, configure: Configure) -> Iterator[str]:
    """Each test using this runs on both backends, on an emptied, migrated database."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_database")
    else:
        url = request.getfixturevalue("sqlite_database")
    truncate(url)
    configure(RECEIPTS_DATABASE_URL=url)
    yield url
    db.reset_engine()


@pytest.fixture
def pg(configure: Configure, pg_database: str) -> Iterator[str]:
    """PostgreSQL only (for what SQLite cannot show: SKIP LOCKED, many processes)."""
    truncate(pg_database)
    configure(RECEIPTS_DATABASE_URL=pg_database)
    yield pg_database
    db.reset_engine()


@pytest.fixture(scope="session")
def redis_claim() -> Iterator[redis_db.Claim]:
    """This run's own db on the shared Redis: an empty one taken for the run (never 0 or 15),
    or the one ``RECEIPTS_TEST_REDIS_URL`` names. Given back empty at the end."""
    if REDIS_URL_GIVEN is not None:
        claim = redis_db.Claim(REDIS_URL_GIVEN, token=None)
    else:
        claim = redis_db.claim(REDIS_SERVER_URL)
    try:
        yield claim
    finally:
        claim.release()


@pytest.fixture
def redis_url(redis_claim: redis_db.Claim) -> Iterator[str]:
    """The URL of this run's Redis db, emptied (only its own keys) before and after the test."""
    redis_claim.empty()
    yield redis_claim.url
    redis_claim.empty()


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[str]:
    """A Redis server of this test's own (tests/support/servers.py), so that no other run's
    workers take this test's tasks nor its beats tick this test's worker. Falls back to this
    run's db of the shared server when no redis-server binary is installed."""
    if shutil.which("redis-server") is None:
        yield request.getfixturevalue("redis_url")
        return
    with PrivateRedis() as server:
        yield server.url()


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with Simulator(step=0.5, seed=7) as sim:
        yield sim


@pytest.fixture
def tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path
