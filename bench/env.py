"""Scratch resources shared by the benchmark phases: a fresh PostgreSQL database (created,
migrated, dropped), a Redis db of its own (taken empty, emptied between runs, given back),
in-process settings, bulk session loading, logging."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any

import psycopg

from tests.support import redis_db
from tests.support.databases import TABLES
from tests.support.processes import wait_for
from worker import db
from worker.config import get_settings
from worker.migrate import upgrade
from worker.simulator import Simulator

ADMIN_CONNINFO = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
# A Redis db to use as the benchmark's own; unset, an empty db of this server is taken for the
# run, as the tests do (tests/support/redis_db.py), so neither ever empties the other's.
REDIS_URL_GIVEN = os.environ.get("BENCH_REDIS_URL") or None
REDIS_SERVER_URL = "redis://127.0.0.1:6379/0"
# Every statement the benchmark itself sends is bounded (the 2M-row history insert is the longest).
STATEMENT_TIMEOUT_MS = 180_000
LOCK_TIMEOUT_MS = 15_000
ACCESS_KEY_ID = "demo"
ACCESS_KEY_SECRET = "demo-secret"  # noqa: S105 - the simulator's well-known demo credential

_T0 = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr, stamped with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class BenchDatabase:
    name: str

    @property
    def conninfo(self) -> str:
        return _with_database(ADMIN_CONNINFO, self.name)

    @property
    def url(self) -> str:
        """The SQLAlchemy URL (psycopg 3), as the worker is configured with."""
        return self.conninfo.replace("postgresql://", "postgresql+psycopg://", 1)

    def connect(self, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.conninfo,
            autocommit=autocommit,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS} "
            f"-c lock_timeout={LOCK_TIMEOUT_MS}",
            connect_timeout=10,
        )

    def truncate(self) -> None:
        with self.connect() as conn:
            conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")

    def vacuum_analyze(self, *tables: str) -> None:
        with self.connect() as conn:
            for table in tables or ("sms_sessions", "sms_receipts", "sms_receipt_events"):
                conn.execute(f"VACUUM ANALYZE {table}")

    def reset(self) -> None:
        """Empty the tables for a run, keeping the seeded history (see :func:`seed_history`)."""
        with self.connect() as conn:
            conn.execute(f"DELETE FROM sms_sessions WHERE session_no NOT LIKE '{SEED_PREFIX}%'")
            conn.execute(
                "TRUNCATE escalation_outbox, receipts_heartbeats, api_call_counts, "
                "sms_receipt_events, sms_session_events"
            )
        self.vacuum_analyze()


def _with_database(conninfo: str, name: str) -> str:
    base, _, _ = conninfo.rpartition("/")
    return f"{base}/{name}"


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(ADMIN_CONNINFO, autocommit=True, connect_timeout=10)


def wait_for_database(timeout: float = 60) -> None:
    """Until PostgreSQL accepts connections again (after a restart by someone else)."""

    def up() -> bool:
        try:
            with _admin() as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    wait_for(up, timeout=timeout, interval=1.0, describe=lambda: "PostgreSQL to accept connections")
    db.reset_engine()


@contextlib.contextmanager
def bench_database() -> Iterator[BenchDatabase]:
    """A fresh ``receipts_bench_<random>`` database migrated to head, dropped however we leave."""
    database = BenchDatabase(f"receipts_bench_{secrets.token_hex(4)}")
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{database.name}"')
    try:
        upgrade(database.url)
        yield database
    finally:
        db.reset_engine()
        try:
            _drop(database.name)
        except psycopg.OperationalError:
            wait_for_database()
            _drop(database.name)
        log(f"dropped database {database.name}")


def _drop(name: str) -> None:
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def scratch_redis() -> Iterator[str]:
    """The URL of the Redis db the worker runs use: ``BENCH_REDIS_URL``, else an empty db taken
    for the benchmark. Emptied (its own keys only, never FLUSHDB) before and after."""
    if REDIS_URL_GIVEN is not None:
        taken = redis_db.Claim(REDIS_URL_GIVEN, token=None)
    else:
        taken = redis_db.claim(REDIS_SERVER_URL)
    try:
        taken.empty()
        log(f"Redis db {taken.url}")
        yield taken.url
    finally:
        taken.release()


def empty_redis(url: str) -> None:
    """Delete the keys of the benchmark's own Redis db (between worker runs)."""
    redis_db.empty(url)


# --- history ---------------------------------------------------------------------------------

SEED_PREFIX = "seed-"
SEED_SESSIONS_SQL = f"""
INSERT INTO sms_sessions (account_id, session_no, state, phones, sent_at, resolved_at,
                          last_polled_at, poll_count, created_at, updated_at)
SELECT 1 + g %% 4, '{SEED_PREFIX}' || g, 'resolved',
       '["+8613800000000", "+8613800000001", "+8613800000002", "+8613800000003",
         "+8613800000004"]'::jsonb,
       now() - interval '2 days', now() - interval '2 days', now() - interval '2 days', 1,
       now() - interval '2 days', now() - interval '2 days'
FROM generate_series(1, %(n)s::bigint) AS g
"""
SEED_RECEIPTS_SQL = f"""
INSERT INTO sms_receipts (account_id, session_no, phone, phone_key, result, receipt_code,
                          receipt_desc, receipt_time, cost_count, user_id, country_code,
                          first_seen_at, updated_at)
SELECT 1 + g %% 4, '{SEED_PREFIX}' || g, '+861380000000' || k, '861380000000' || k, 'Success',
       'DELIVRD', 'Delivered', now() - interval '2 days', 1, '', '86',
       now() - interval '2 days', now() - interval '2 days'
FROM generate_series(1, %(n)s::bigint) AS g, generate_series(0, 4) AS k
"""


def seed_history(database: BenchDatabase, sessions: int) -> dict[str, Any]:
    """Resolved sessions with five receipts each, analyzed: the worker runs then meet tables
    whose size and statistics look like a service in use, not a freshly created database
    (where PostgreSQL's plans for small, unanalyzed tables differ)."""
    started = time.perf_counter()
    database.truncate()
    with database.connect() as conn:
        conn.execute(SEED_SESSIONS_SQL, {"n": sessions})
        conn.execute(SEED_RECEIPTS_SQL, {"n": sessions})
    database.vacuum_analyze()
    seconds = time.perf_counter() - started
    log(f"seeded {sessions:,} resolved sessions and {sessions * 5:,} receipts in {seconds:.1f}s")
    return {"sessions": sessions, "receipts": sessions * 5, "seconds": round(seconds, 1)}


# --- settings ------------------------------------------------------------------------------


def timings_env(database: BenchDatabase, sim: Simulator, broker_url: str) -> dict[str, str]:
    """Settings for the worker, beat and in-process runs: scaled timings, loopback simulator.

    Every session resolves on its first poll (quick_success), so the intervals only matter
    through the claim lease, which is set far beyond the longest run so that nothing is claimed
    twice while the queue drains; the cutoff is far away so that nothing escalates.
    """
    return {
        "RECEIPTS_DATABASE_URL": database.url,
        "RECEIPTS_BROKER_URL": broker_url,
        "RECEIPTS_API_URL": sim.url,
        "RECEIPTS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "RECEIPTS_ACCESS_KEY_SECRET": ACCESS_KEY_SECRET,
        "RECEIPTS_FIRST_POLL_DELAY": "1",
        "RECEIPTS_POLL_INTERVAL_MIN": "60",
        "RECEIPTS_POLL_INTERVAL_MAX": "120",
        "RECEIPTS_CUTOFF": "1h",
        "RECEIPTS_TICK": "0.5",
        "RECEIPTS_CLAIM_LEASE": "15m",
    }


def configure_process(env: Mapping[str, str]) -> None:
    """Point this process's worker code (settings, engine) at ``env`` alone."""
    for key in [k for k in os.environ if k.startswith("RECEIPTS_")]:
        del os.environ[key]
    os.environ.update(env)
    get_settings.cache_clear()
    db.reset_engine()


# --- sessions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionSpec:
    account_id: int
    session_no: str
    phones: tuple[str, ...]


def make_sessions(count: int, *, phones: int, accounts: int, prefix: str) -> list[SessionSpec]:
    """``count`` sessions spread round-robin over ``accounts`` accounts (ids 1…accounts)."""
    return [
        SessionSpec(
            account_id=1 + i % accounts,
            session_no=f"{prefix}{i:08d}",
            phones=tuple(f"+8613{i:09d}{k}" for k in range(phones)),
        )
        for i in range(count)
    ]


def register(sim: Simulator, sessions: Sequence[SessionSpec], *, sent_at: float) -> None:
    """Play every session as ``quick_success`` (its final receipts visible one step after
    ``sent_at``)."""
    chunk = 20_000
    for start in range(0, len(sessions), chunk):
        sim.register(
            {
                "account_id": s.account_id,
                "session_no": s.session_no,
                "phones": list(s.phones),
                "scenario": "quick_success",
                "sent_at": sent_at,
            }
            for s in sessions[start : start + chunk]
        )


def copy_sessions(
    database: BenchDatabase,
    sessions: Sequence[SessionSpec],
    *,
    sent_at: datetime,
    first_delay: timedelta = timedelta(seconds=1),
) -> None:
    """Insert pending sessions due at ``sent_at + first_delay`` with COPY, then ANALYZE (a
    production table has statistics; a freshly filled one would get a plan chosen blind)."""
    now = datetime.now(UTC)
    due = sent_at + first_delay
    columns = (
        "account_id, session_no, state, phones, sent_at, next_poll_at, poll_count, "
        "created_at, updated_at"
    )
    with database.connect(autocommit=False) as conn:
        with conn.cursor() as cur, cur.copy(f"COPY sms_sessions ({columns}) FROM STDIN") as copy:
            for s in sessions:
                copy.write_row(
                    (
                        s.account_id,
                        s.session_no,
                        "pending",
                        json.dumps(list(s.phones)),
                        sent_at,
                        due,
                        0,
                        now,
                        now,
                    )
                )
        conn.commit()
    database.vacuum_analyze("sms_sessions")


# --- machine -------------------------------------------------------------------------------


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields), idle


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over ``seconds`` (run while the benchmark itself is idle, it
    tells whether something else on the machine competes with the figures)."""
    total_a, idle_a = _cpu_times()
    time.sleep(seconds)
    total_b, idle_b = _cpu_times()
    elapsed = total_b - total_a
    return round(1 - (idle_b - idle_a) / elapsed, 3) if elapsed else 0.0


def machine_info(database: BenchDatabase) -> dict[str, Any]:
    mem_kb = 0
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), ""
        )
    with database.connect() as conn:
        row = conn.execute("SELECT current_setting('server_version'), version()").fetchone()
        shared_buffers = conn.execute("SHOW shared_buffers").fetchone()
    packages = {}
    for name in ("celery", "kombu", "sqlalchemy", "psycopg", "redis", "requests"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "postgresql": row[0] if row else "?",
        "postgresql_full": row[1] if row else "?",
        "shared_buffers": shared_buffers[0] if shared_buffers else "?",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
    }
