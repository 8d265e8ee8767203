"""Fault injection on the real processes: workers killed mid-batch, Redis emptied and
restarted, PostgreSQL restarted, two beats with several workers. After each run, every session
must have ended in the right state with the right receipts (compared with what the simulator
answered), no rule of the poll schedule broken, and no webhook delivered twice.

Each case is bounded (the run waits at most 90 s). The servers the faults hit are the suite's
own (tests/support/servers.py): a PostgreSQL cluster for the module, a redis-server per test,
on free ports of 127.0.0.1. The machine's shared servers are never touched.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.databases import Configure, truncate
from tests.support.e2e import check, run_plan
from tests.support.processes import Processes
from tests.support.receiver import Receiver
from tests.support.scenarios import Planned, plan
from tests.support.servers import PrivatePostgres, PrivateRedis
from worker import db
from worker.migrate import upgrade
from worker.models import sessions_table
from worker.simulator import Simulator

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

STEP = 1.0
# A longer cutoff than the plain end-to-end run: every fault below happens early enough that
# a poll lost to it (held for poll budget + timeouts + interval = 6 s) is retried in time.
TIMINGS = {"RECEIPTS_CUTOFF": "16"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of the module's own, migrated to head (initdb takes a second or
    two, so the tests share it and each starts from emptied tables)."""
    with PrivatePostgres() as server:
        upgrade(server.url())
        yield server


@pytest.fixture
def private_pg(configure: Configure, private_postgres: PrivatePostgres) -> Iterator[str]:
    """The private cluster's database, emptied; the test process reads it too."""
    url = private_postgres.url()
    truncate(url)
    configure(RECEIPTS_DATABASE_URL=url)
    yield url
    db.reset_engine()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A redis-server of the test's own: the broker its workers and beats use."""
    with PrivateRedis() as server:
        yield server


def _durable_plan(count: int, seed: int) -> list[Planned]:
    """Every kind except ``stale_unknow``: its Success is visible for two steps only, so a
    poll that saw it and was then killed cannot be made good by a later poll; the API itself
    no longer says it. Every other scenario keeps answering what it answered."""
    return [p for p in plan(count, accounts=3, seed=seed) if p.scenario != "stale_unknow"]


def _run_and_check(
    configure: Configure,
    pg: str,
    broker: PrivateRedis,
    tmp_path: Path,
    receiver: Receiver,
    planned: list[Planned],
    during: Any,
    *,
    workers: int = 2,
    beats: int = 1,
) -> tuple[Simulator, dict[str, dict[str, Any]]]:
    env = {**TIMINGS, "RECEIPTS_ESCALATION_WEBHOOK_URL": receiver.url}

    def delivered() -> bool:
        """Every escalation so far has reached the receiver (checked while workers run)."""
        with db.session_scope() as session:
            escalated = set(
                session.scalars(
                    sa.select(sessions_table.c.session_no).where(
                        sessions_table.c.state == "escalated"
                    )
                )
            )
        return {h.payload["session_no"] for h in receiver.hits()} >= escalated

    with Simulator(step=STEP, seed=5) as sim:
        sessions, receipts = run_plan(
            configure,
            pg,
            broker.url(),
            tmp_path,
            sim,
            planned,
            workers=workers,
            beats=beats,
            env_extra=env,
            during=during,
            settled=delivered,
            timeout=90,
        )
        check(planned, sim, sessions, receipts, env_extra=env)
        escalated = {n for n, row in sessions.items() if row["state"] == "escalated"}
        counts = Counter(h.delivery_id for h in receiver.hits())
        assert max(counts.values(), default=1) == 1, [k for k, v in counts.items() if v > 1]
        assert {h.payload["session_no"] for h in receiver.hits()} == escalated
    return sim, sessions


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def test_workers_killed_mid_batch_repeatedly(
    configure: Configure,
    private_pg: str,
    private_redis: PrivateRedis,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    """SIGKILL a whole worker (main process and pool children, mid-batch) every 1.5 s for the
    first 7 s, starting a fresh one each time; then let the run finish."""
    rng = random.Random(1)
    kills: list[float] = []

    def during(group: Processes, elapsed: float) -> None:
        if elapsed < 7 and elapsed > 1.5 * (len(kills) + 1):
            workers = [(n, p) for n, p in group.running if n.startswith("w") and p.poll() is None]
            _name, victim = rng.choice(workers)
            _kill_group(victim)
            kills.append(elapsed)
            group.worker(f"w-replacement-{len(kills)}")

    _run_and_check(
        configure,
        private_pg,
        private_redis,
        tmp_path,
        receiver,
        _durable_plan(150, seed=7),
        during,
    )
    assert len(kills) >= 3


def test_redis_emptied_and_restarted_mid_run(
    configure: Configure,
    private_pg: str,
    private_redis: PrivateRedis,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    """FLUSHALL at 2 s (every queued poll and tick vanishes), then a restart of Redis with its
    data gone at 4 s, on the same port. The database holds the schedule, so claims come back
    after their lease."""
    done: list[str] = []
    run_ids: list[str] = []

    def during(group: Processes, elapsed: float) -> None:
        if elapsed > 2 and "flush" not in done:
            private_redis.flushall()
            done.append("flush")
        if elapsed > 4 and "restart" not in done:
            run_ids.append(_run_id(private_redis))
            private_redis.restart()
            run_ids.append(_run_id(private_redis))
            done.append("restart")

    _run_and_check(
        configure,
        private_pg,
        private_redis,
        tmp_path,
        receiver,
        _durable_plan(150, seed=8),
        during,
    )
    assert done == ["flush", "restart"]
    assert run_ids[0] != run_ids[1], "the private Redis was really restarted"


def _run_id(server: PrivateRedis) -> str:
    client = server.client()
    try:
        return str(client.info("server")["run_id"])
    finally:
        client.close()


def _started_at(url: str) -> datetime:
    engine = db.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            started: datetime = connection.scalar(sa.text("SELECT pg_postmaster_start_time()"))
            return started
    finally:
        engine.dispose()


def test_postgres_restarted_mid_run(
    configure: Configure,
    private_pg: str,
    private_postgres: PrivatePostgres,
    private_redis: PrivateRedis,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    """A fast restart of PostgreSQL at 3 s: every pooled connection breaks. Workers must
    reconnect on their own; answers in hand are written once the database is back."""
    done: list[float] = []
    before = _started_at(private_pg)

    def during(group: Processes, elapsed: float) -> None:
        if elapsed > 3 and not done:
            started = time.monotonic()
            private_postgres.restart()
            done.append(time.monotonic() - started)

    _run_and_check(
        configure,
        private_pg,
        private_redis,
        tmp_path,
        receiver,
        _durable_plan(150, seed=9),
        during,
    )
    assert done
    assert _started_at(private_pg) != before, "the private PostgreSQL was really restarted"


def test_two_beats_and_four_workers(
    configure: Configure,
    private_pg: str,
    private_redis: PrivateRedis,
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    """A second beat started by mistake doubles every tick; four workers claim side by side.
    Still no session polled twice inside the interval and no webhook sent twice."""
    _run_and_check(
        configure,
        private_pg,
        private_redis,
        tmp_path,
        receiver,
        plan(200, accounts=3, seed=10),
        None,
        workers=4,
        beats=2,
    )
