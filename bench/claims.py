"""Claim time per batch: ``worker.store.claim_batch`` (100 sessions, one transaction each, as
a tick does) timed directly against PostgreSQL, with no history and then with a large history
of resolved and escalated sessions in the same table (the claim must not slow down with it).

Each condition runs several rounds; a round loads ``pending`` due sessions of account 1 (the
history spreads over accounts 1…20, so the claimed account has history too), VACUUM ANALYZEs
as autovacuum would, and claims until nothing is due. The figure per condition is the best
round's mean (rounds differ by noise only). The history grows in steps (e.g. 100k, then 2M):
PostgreSQL's plan for the claim changes with the table's statistics, so each step records the
plan the claim actually ran with (EXPLAIN ANALYZE of the exact statement).
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from bench.env import BenchDatabase, log
from worker import store
from worker.db import create_engine
from worker.schedule import PollPolicy

ACCOUNT = 1
BATCH = 100
POLICY = PollPolicy(
    first_delay=timedelta(minutes=5),
    interval_min=timedelta(minutes=5),
    interval_max=timedelta(minutes=10),
    cutoff=timedelta(hours=12),
)

PENDING_SQL = """
INSERT INTO sms_sessions (account_id, session_no, state, phones, sent_at, next_poll_at,
                          poll_count, created_at, updated_at)
SELECT %(account)s, 'due-' || g, 'pending', '["+8613800000000"]'::jsonb,
       now() - interval '10 minutes', now() - interval '10 minutes' + g * interval '1 ms',
       0, now(), now()
FROM generate_series(1, %(n)s::bigint) AS g
"""

HISTORY_SQL = """
INSERT INTO sms_sessions (account_id, session_no, state, phones, sent_at, next_poll_at,
                          resolved_at, escalated_at, poll_count, last_polled_at,
                          created_at, updated_at)
SELECT 1 + g %% 20, 'hist-' || g,
       CASE WHEN g %% 10 = 0 THEN 'escalated' ELSE 'resolved' END,
       '["+8613800000000", "+8613800000001"]'::jsonb,
       now() - interval '13 hours' - g * interval '50 ms', NULL,
       CASE WHEN g %% 10 = 0 THEN NULL ELSE now() - interval '12 hours' END,
       CASE WHEN g %% 10 = 0 THEN now() - interval '1 hour' END,
       3, now() - interval '12 hours', now(), now()
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
"""


def claim_round(factory: sessionmaker[Any], *, pending: int) -> list[float]:
    """Seconds per claim of ``BATCH`` sessions, until the account has nothing due."""
    durations: list[float] = []
    for _ in range(pending // BATCH + 2):  # bounded: one empty claim ends the round
        started = time.perf_counter()
        with factory() as session, session.begin():
            now = datetime.now(UTC)
            claim = store.claim_batch(
                session,
                account_id=ACCOUNT,
                now=now,
                policy=POLICY,
                lease_until=now + timedelta(minutes=15),
                limit=BATCH,
            )
        elapsed = time.perf_counter() - started
        if claim is None:
            return durations
        durations.append(elapsed)
    raise RuntimeError("claim round did not end")


def _reload_pending(database: BenchDatabase, pending: int) -> None:
    with database.connect() as conn:
        conn.execute("DELETE FROM sms_sessions WHERE state = 'pending'")
        conn.execute(PENDING_SQL, {"account": ACCOUNT, "n": pending})
    database.vacuum_analyze()


_COST = re.compile(r"\s*\(cost=[^)]*\)")


def explain_claim(engine: Engine, factory: sessionmaker[Any]) -> list[str]:
    """The plan PostgreSQL runs the claim with (EXPLAIN ANALYZE of the exact statement and
    parameters ``claim_batch`` sends, captured, then rolled back), as its scan/sort/join lines."""
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE") and "claim_token" in statement:
            captured.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with factory() as session:
            now = datetime.now(UTC)
            store.claim_batch(
                session,
                account_id=ACCOUNT,
                now=now,
                policy=POLICY,
                lease_until=now + timedelta(minutes=15),
                limit=BATCH,
            )
            session.rollback()
            if not captured:
                return []
            statement, parameters = captured[0]
            rows = session.connection().exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters
            )
            lines = [str(row[0]) for row in rows]
            session.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    keep = ("Scan", "Sort", "Join", "Nested Loop", "Hash", "Execution Time")
    return [_COST.sub("", line).rstrip() for line in lines if any(k in line for k in keep)]


def _condition(
    database: BenchDatabase,
    engine: Engine,
    factory: sessionmaker[Any],
    *,
    pending: int,
    rounds: int,
) -> dict[str, Any]:
    means: list[float] = []
    all_durations: list[float] = []
    for _ in range(rounds):
        _reload_pending(database, pending)
        durations = claim_round(factory, pending=pending)
        if len(durations) != pending // BATCH:
            raise RuntimeError(f"claimed {len(durations)} batches, expected {pending // BATCH}")
        means.append(statistics.fmean(durations))
        all_durations.extend(durations)
    all_durations.sort()
    _reload_pending(database, pending)
    return {
        "batches_per_round": pending // BATCH,
        "rounds": rounds,
        "round_mean_ms": [round(m * 1000, 3) for m in means],
        "best_mean_ms": round(min(means) * 1000, 3),
        "p50_ms": round(statistics.median(all_durations) * 1000, 3),
        "p95_ms": round(all_durations[int(len(all_durations) * 0.95)] * 1000, 3),
        "sessions_per_s_one_process": round(BATCH / min(means)),
        "plan": explain_claim(engine, factory),
    }


def run(
    database: BenchDatabase, *, pending: int, history: Sequence[int], rounds: int
) -> dict[str, Any]:
    """Claim rounds with no history, then with the history grown to each size in ``history``
    (ascending); the ratio of each to the first is reported."""
    database.truncate()
    engine = create_engine(database.url)
    factory = sessionmaker(engine, expire_on_commit=False)
    out: dict[str, Any] = {"batch": BATCH, "pending": pending, "history": []}
    try:
        # Warm-up: connect, and compile the claim statement into SQLAlchemy's cache.
        with factory() as session, session.begin():
            now = datetime.now(UTC)
            store.claim_batch(
                session, account_id=999_999, now=now, policy=POLICY, lease_until=now, limit=BATCH
            )
        empty = _condition(database, engine, factory, pending=pending, rounds=rounds)
        out["no_history"] = empty
        log(f"claim_batch, no history: {empty['best_mean_ms']:.2f} ms per batch of {BATCH}")
        loaded = 0
        for size in history:
            started = time.perf_counter()
            with database.connect() as conn:
                conn.execute("DELETE FROM sms_sessions WHERE state = 'pending'")
                conn.execute(HISTORY_SQL, {"first": loaded + 1, "last": size})
            load_seconds = time.perf_counter() - started
            loaded = size
            log(f"history now {size:,} resolved/escalated sessions (+{load_seconds:.1f}s)")
            measured = _condition(database, engine, factory, pending=pending, rounds=rounds)
            ratio = measured["best_mean_ms"] / empty["best_mean_ms"]
            out["history"].append(
                {
                    "rows": size,
                    "load_seconds": round(load_seconds, 2),
                    "ratio": round(ratio, 3),
                    **measured,
                }
            )
            log(
                f"claim_batch, {size:,} history: {measured['best_mean_ms']:.2f} ms per batch "
                f"({ratio:.2f}x)"
            )
    finally:
        engine.dispose()
        database.truncate()
    return out
