"""The test machinery that keeps the shared servers safe, checked on servers of its own: private
PostgreSQL and Redis (tests/support/servers.py), the Redis db a run takes for itself
(tests/support/redis_db.py) and the end-of-run proof (tests/support/untouched.py)."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support import redis_db, servers, untouched
from tests.support.servers import PrivatePostgres, PrivateRedis

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as server:
        yield server


@pytest.fixture
def broker() -> Iterator[PrivateRedis]:
    with PrivateRedis() as server:
        yield server


def _query(url: str, sql: str) -> object:
    with psycopg.connect(url, connect_timeout=5) as connection:
        row = connection.execute(sql).fetchone()
    assert row is not None
    return row[0]


def test_private_postgres_is_local_throwaway_and_restarts_on_its_port(
    postgres: PrivatePostgres,
) -> None:
    url = postgres.url()
    assert _query(url, "SELECT current_setting('listen_addresses')") == "127.0.0.1"
    assert _query(url, "SELECT current_setting('fsync')") == "off"
    assert postgres.folder.is_relative_to(tempfile.gettempdir())
    if os.geteuid() == 0:  # PostgreSQL refuses root: its files belong to the postgres account
        assert postgres.data.stat().st_uid == pwd.getpwnam("postgres").pw_uid
    started = _query(url, "SELECT pg_postmaster_start_time()")
    postgres.restart()
    assert postgres.url() == url
    assert _query(url, "SELECT pg_postmaster_start_time()") != started
    postgres.stop()
    assert not postgres.answers()
    postgres.start()
    assert postgres.url() == url and postgres.answers()


def test_a_port_taken_before_the_server_binds_it_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        offered = [busy, busy]
        real = servers.free_port
        monkeypatch.setattr(servers, "free_port", lambda: offered.pop() if offered else real())
        with PrivateRedis() as broker:
            assert broker.port != busy and broker.answers()
        with PrivatePostgres() as postgres:
            assert postgres.port != busy and postgres.answers()
    assert offered == []


def test_private_servers_are_removed_when_the_block_fails() -> None:
    with pytest.raises(RuntimeError), PrivateRedis() as broker:  # noqa: PT012
        folder = broker.folder
        process = broker.process
        raise RuntimeError("a failing test")
    assert not folder.exists()
    assert process is not None and process.poll() is not None


def test_private_redis_restart_keeps_the_port_and_loses_the_data(broker: PrivateRedis) -> None:
    client = broker.client()
    client.set("k", "v")
    url = broker.url()
    broker.restart()
    assert broker.url() == url
    assert client.get("k") is None  # the same client reconnects to the new server
    client.close()


def test_a_run_takes_an_empty_db_and_empties_only_its_own(broker: PrivateRedis) -> None:
    server = broker.url()
    others = {db: broker.client(db) for db in (0, 1, 3, 15)}
    for db, client in others.items():
        client.set(f"someone-else:{db}", "keep")
    first = redis_db.claim(server)
    second = redis_db.claim(server)
    assert (first.db, second.db) == (2, 4), "dbs holding keys are never taken"
    mine = broker.client(first.db)
    mine.set("celery", "queued")
    first.empty()
    assert mine.keys() == [redis_db.MARK.encode()], "the mark stays while the db is in use"
    first.release()
    assert mine.dbsize() == 0, "given back empty"
    second.release()
    for db, client in others.items():
        assert client.get(f"someone-else:{db}") == b"keep"
        client.close()
    mine.close()


def test_a_claim_whose_mark_vanished_fails_loudly(broker: PrivateRedis) -> None:
    taken = redis_db.claim(broker.url())
    broker.flushall()
    with pytest.raises(redis_db.ClaimError, match="gone or changed"):
        taken.empty()
    client = broker.client(taken.db)
    client.set("k", "v")
    taken.release()  # no longer ours: left alone
    assert client.get("k") == b"v"
    client.close()


def test_no_empty_db_is_an_error_not_a_shared_db(broker: PrivateRedis) -> None:
    for db in redis_db.CANDIDATES:
        client = broker.client(db)
        client.set("busy", "1")
        client.close()
    with pytest.raises(redis_db.ClaimError, match="no empty Redis db"):
        redis_db.claim(broker.url())


def test_snapshots_see_restarts_and_flushes(
    postgres: PrivatePostgres, broker: PrivateRedis
) -> None:
    def shot(plant: bool = False) -> untouched.Snapshot:
        return untouched.snapshot(postgres.url(), broker.url(), plant=plant)

    before = shot(plant=True)
    assert None not in (before.postgres_started, before.redis_run_id, before.canary)
    assert untouched.differences(before, shot(plant=True)) == []
    canary_db = broker.client(untouched.CANARY_DB)
    canary_db.flushdb()
    canary_db.close()
    found = untouched.differences(before, shot())
    assert len(found) == 1 and "lost or changed 'receipts-tests:canary'" in found[0]
    postgres.restart()
    broker.restart()
    found = untouched.differences(before, shot())
    assert len(found) == 3 and "PostgreSQL was restarted" in found[0]
    assert "Redis was restarted" in found[1]


def test_servers_that_do_not_answer_are_not_watched() -> None:
    closed = untouched.snapshot(
        "postgresql://postgres@127.0.0.1:1/postgres", "redis://127.0.0.1:1/0"
    )
    assert closed == untouched.Snapshot(None, None, None)
    assert untouched.differences(closed, closed) == []


@pytest.mark.parametrize("flush", [False, True])
def test_a_run_that_flushes_the_shared_redis_fails(
    postgres: PrivatePostgres, broker: PrivateRedis, tmp_path: Path, flush: bool
) -> None:
    """The plugin in a real pytest run, with the private servers standing in for the shared
    ones: a run that empties Redis exits 1 with the banner; one that does not, exits 0."""
    body = "redis.Redis.from_url(os.environ['RECEIPTS_TEST_REDIS_URL']).flushall()"
    sample = tmp_path / "test_sample.py"
    sample.write_text(
        f"import os\nimport redis\n\n\ndef test_sample():\n    {body if flush else 'pass'}\n"
    )
    env = {
        **os.environ,
        "RECEIPTS_TEST_PG_URL": postgres.url(),
        "RECEIPTS_TEST_REDIS_URL": broker.url(),
        "PYTHONPATH": str(ROOT),
    }
    plugins = ("-p", "tests.support.untouched", "-p", "no:cacheprovider")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *plugins, "-q", str(sample)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert "1 passed" in output, output
    if flush:
        assert result.returncode == 1, output
        assert "the test run touched the shared servers" in output
        assert "lost or changed 'receipts-tests:canary' in db 15" in output
    else:
        assert result.returncode == 0, output
        canary_db = broker.client(untouched.CANARY_DB)
        assert canary_db.get(untouched.CANARY) is not None, "planted, and left in place"
        canary_db.close()
