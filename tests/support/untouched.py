"""Proof, on every run, that the suite left the shared servers alone (a pytest plugin).

Before the first test: the shared PostgreSQL's ``pg_postmaster_start_time()``, the shared Redis's
``run_id`` and a canary key in its db 15 (set if absent, never deleted: another run may be
reading it). After the last: the same three again. A restart changes the first two; FLUSHALL,
or FLUSHDB of db 15, removes the canary. Any change fails the session (exit status 1, a banner in
the summary). A server that does not answer when the run starts is not watched: the unit tests
run with no server at all.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import psycopg
import pytest
import redis
import sqlalchemy as sa

from tests.support.redis_db import with_db
from tests.support.shared import PG_ADMIN_URL, REDIS_SERVER_URL

CANARY = "receipts-tests:canary"
CANARY_DB = 15


@dataclass(frozen=True, slots=True)
class Snapshot:
    postgres_started: str | None  # pg_postmaster_start_time(); None: did not answer
    redis_run_id: str | None  # INFO server's run_id; None: did not answer
    canary: str | None  # the canary key's value in db 15


def _libpq_url(url: str) -> str:
    """A SQLAlchemy URL (maybe ``postgresql+psycopg://``) as libpq takes it."""
    parsed = sa.engine.make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def postgres_started(url: str) -> str | None:
    try:
        with psycopg.connect(_libpq_url(url), connect_timeout=2) as connection:
            row = connection.execute("SELECT pg_postmaster_start_time()::text").fetchone()
    except psycopg.Error:
        return None
    return None if row is None else str(row[0])


def redis_state(url: str, *, plant: bool) -> tuple[str | None, str | None]:
    """(run_id, canary) of the Redis server at ``url``; ``plant`` sets the canary if absent."""
    client = redis.Redis.from_url(
        with_db(url, CANARY_DB), socket_connect_timeout=2, socket_timeout=5, decode_responses=True
    )
    try:
        run_id = str(client.info("server")["run_id"])
        if plant:
            client.set(CANARY, secrets.token_hex(16), nx=True)
        canary = client.get(CANARY)
    except redis.RedisError:
        return None, None
    finally:
        client.close()
    return run_id, None if canary is None else str(canary)


def snapshot(pg_url: str, redis_url: str, *, plant: bool = False) -> Snapshot:
    run_id, canary = redis_state(redis_url, plant=plant)
    return Snapshot(postgres_started(pg_url), run_id, canary)


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    """What changed between two snapshots, for the servers that answered the first."""
    found = []
    if before.postgres_started is not None and after.postgres_started != before.postgres_started:
        found.append(
            f"the shared PostgreSQL was restarted or stopped: started at "
            f"{before.postgres_started} before the run, {after.postgres_started} after it"
        )
    if before.redis_run_id is not None:
        if after.redis_run_id != before.redis_run_id:
            found.append(
                f"the shared Redis was restarted or stopped: run_id {before.redis_run_id} "
                f"before the run, {after.redis_run_id} after it"
            )
        if after.canary != before.canary:
            found.append(
                f"the shared Redis lost or changed {CANARY!r} in db {CANARY_DB} "
                f"({before.canary!r} -> {after.canary!r}): FLUSHALL or FLUSHDB of db {CANARY_DB}"
            )
    return found


_BEFORE = pytest.StashKey[Snapshot]()
_PROBLEMS = pytest.StashKey[list[str]]()


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = snapshot(PG_ADMIN_URL, REDIS_SERVER_URL, plant=True)


def pytest_sessionfinish(session: pytest.Session) -> None:
    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    problems = differences(before, snapshot(PG_ADMIN_URL, REDIS_SERVER_URL))
    session.config.stash[_PROBLEMS] = problems
    if problems:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    problems = terminalreporter.config.stash.get(_PROBLEMS, [])
    if problems:
        terminalreporter.write_sep("!", "the test run touched the shared servers", red=True)
        for problem in problems:
            terminalreporter.write_line(problem, red=True)
