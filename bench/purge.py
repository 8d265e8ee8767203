"""Retention (worker/purge.py): how fast a purge deletes, and what it costs the polls running
beside it.

``run``: the purge rate, sessions per second, of ``purge.purge`` (as ``receipts purge`` and the
daily task call it: batches of ``purge.BATCH_SIZE``, each its own transaction) over a history
of finished sessions past the retention, seeded with set-based SQL shaped as ingestion writes
them (:func:`seed`): per session two phones, their receipts, one history row per receipt
change (a fifth of the sessions saw ``Unknow`` before their final receipt), the session's
``session.resolved`` or ``session.escalated`` event, and for escalations (one in twenty,
acknowledged) the escalation detail and the delivered webhook. Beside them, sessions the
purge must keep: unacknowledged escalations, an acknowledged one whose webhook is still
undelivered, and finished sessions inside the retention. The tables are VACUUM ANALYZEd
first, as autovacuum would have them in a service in use. No event destination is
configured (the default): the history rules then have nothing to hold back.

``polls``: claim and record time while a real ``receipts purge`` process runs, against the
same without it. Each poll cycle claims 100 due sessions of one account
(``store.claim_batch``, one transaction, as a tick does), starts the poll
(``store.start_poll``) and records an answer of final receipts (``store.record_answer``,
which upserts the receipts, writes their history and resolves the sessions), each timed
around its own transaction, as a worker runs them; no API call (its time is not the
database's). The baseline runs first on the same database, the old history in place; then
the purge starts and only cycles after its first batch committed are timed, until it ends.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import sessionmaker

from bench.env import BenchDatabase, log
from worker import purge, store
from worker.db import create_engine, session_scope
from worker.domain import Result
from worker.receipts import Receipt
from worker.schedule import PollPolicy

RETENTION = timedelta(days=90)
PHONES = 2
BATCH = 100
ACCOUNTS = 4
POLICY = PollPolicy(
    first_delay=timedelta(minutes=5),
    interval_min=timedelta(minutes=5),
    interval_max=timedelta(minutes=10),
    cutoff=timedelta(hours=12),
)

# One row per session to seed: ``kind`` says what it is and whether the purge takes it.
_STAGE_SQL = f"""
CREATE UNLOGGED TABLE bench_purge_seed AS
SELECT g, 1 + (g / 3) %% {ACCOUNTS} AS account_id, md5(%(prefix)s || g) AS session_no,
       CASE WHEN g %% 20 = 0 THEN 'acked' ELSE 'resolved' END AS kind,
       now() - %(retention)s - interval '1 hour' - (g::float8 / %(n)s) * interval '90 days'
           AS sent_at
FROM generate_series(1, %(n)s::bigint) AS g
UNION ALL
SELECT %(n)s + g, 1 + g %% {ACCOUNTS}, md5(%(prefix)s || 'keep-' || g),
       CASE g %% 4 WHEN 0 THEN 'unacked' WHEN 1 THEN 'undelivered' ELSE 'recent' END,
       CASE WHEN g %% 4 >= 2 THEN now() - interval '1 day' - g * interval '1 second'
            ELSE now() - %(retention)s - interval '1 day' - g * interval '1 second' END
FROM generate_series(1, %(keep)s::bigint) AS g
"""

_PHONE = f"'+8613' || lpad((s.g * {PHONES} + k)::text, 9, '0')"
_FINAL = "(s.kind IN ('resolved', 'recent') OR k = 0)"

_SEED_SQL = (
    # The sessions as the worker leaves them: resolved, or escalated (and acknowledged).
    f"""
INSERT INTO sms_sessions (account_id, session_no, state, phones, sent_at, next_poll_at,
                          last_polled_at, resolved_at, escalated_at, poll_count,
                          escalation_detail, acknowledged_at, ack_note, created_at, updated_at)
SELECT s.account_id, s.session_no,
       CASE WHEN s.kind IN ('resolved', 'recent') THEN 'resolved' ELSE 'escalated' END,
       jsonb_build_array({_PHONE.replace("k)", "0)")}, {_PHONE.replace("k)", "1)")}),
       s.sent_at, NULL, s.sent_at + interval '5 minutes',
       CASE WHEN s.kind IN ('resolved', 'recent') THEN s.sent_at + interval '5 minutes' END,
       CASE WHEN s.kind IN ('resolved', 'recent') THEN NULL ELSE s.sent_at + interval '12 hours'
       END,
       CASE WHEN s.kind IN ('resolved', 'recent') THEN 1 ELSE 40 END,
       CASE WHEN s.kind IN ('resolved', 'recent') THEN NULL ELSE jsonb_build_object(
           'phones', jsonb_build_array(jsonb_build_object(
               'phone', {_PHONE.replace("k)", "1)")}, 'last_result', 'Unknow')),
           'poll_count', 40, 'last_error', NULL) END,
       CASE WHEN s.kind IN ('acked', 'undelivered') THEN s.sent_at + interval '13 hours' END,
       CASE WHEN s.kind IN ('acked', 'undelivered') THEN 'carrier confirmed' END,
       s.sent_at, s.sent_at + interval '13 hours'
FROM bench_purge_seed AS s
""",
    # Their receipts: both phones final, except the escalated sessions' second phone.
    f"""
INSERT INTO sms_receipts (account_id, session_no, phone, phone_key, result, receipt_code,
                          receipt_desc, receipt_time, cost_count, user_id, country_code,
                          source, first_seen_at, updated_at)
SELECT s.account_id, s.session_no, {_PHONE}, ltrim({_PHONE}, '+'),
       CASE WHEN {_FINAL} THEN 'Success' ELSE 'Unknow' END,
       CASE WHEN {_FINAL} THEN 'DELIVRD' ELSE '' END,
       CASE WHEN {_FINAL} THEN 'Delivered' ELSE '' END,
       s.sent_at + interval '20 seconds', 1, NULL, '86', 'poll',
       s.sent_at + interval '5 minutes', s.sent_at + interval '5 minutes'
FROM bench_purge_seed AS s, generate_series(0, {PHONES - 1}) AS k
""",
    # Their history: an Unknow first for a fifth of the sessions, then what was stored.
    f"""
INSERT INTO sms_receipt_events (account_id, session_no, phone, phone_key, result,
                                receipt_code, receipt_desc, receipt_time, cost_count, user_id,
                                source, observed_at, applied)
SELECT s.account_id, s.session_no, {_PHONE}, ltrim({_PHONE}, '+'), 'Unknow', '', '',
       NULL, 1, NULL, 'poll', s.sent_at + interval '5 minutes', true
FROM bench_purge_seed AS s, generate_series(0, {PHONES - 1}) AS k
WHERE s.g %% 5 = 0 AND {_FINAL}
UNION ALL
SELECT s.account_id, s.session_no, {_PHONE}, ltrim({_PHONE}, '+'),
       CASE WHEN {_FINAL} THEN 'Success' ELSE 'Unknow' END,
       CASE WHEN {_FINAL} THEN 'DELIVRD' ELSE '' END,
       CASE WHEN {_FINAL} THEN 'Delivered' ELSE '' END,
       s.sent_at + interval '20 seconds', 1, NULL, 'poll',
       s.sent_at + interval '10 minutes', true
FROM bench_purge_seed AS s, generate_series(0, {PHONES - 1}) AS k
""",
    """
INSERT INTO sms_session_events (account_id, session_no, type, source, occurred_at)
SELECT s.account_id, s.session_no,
       CASE WHEN s.kind IN ('resolved', 'recent') THEN 'session.resolved'
            ELSE 'session.escalated' END,
       CASE WHEN s.kind IN ('resolved', 'recent') THEN 'poll' END,
       s.sent_at + interval '10 minutes'
FROM bench_purge_seed AS s
""",
    # Every escalation's webhook, delivered except the one kind kept for it.
    """
INSERT INTO escalation_outbox (delivery_id, event, account_id, session_no, payload, attempts,
                               next_attempt_at, delivered_at, created_at)
SELECT 'escalation-' || s.account_id || '-' || s.session_no, 'session.escalated',
       s.account_id, s.session_no,
       jsonb_build_object('event', 'session.escalated', 'account_id', s.account_id,
                          'session_no', s.session_no, 'poll_count', 40),
       CASE WHEN s.kind = 'undelivered' THEN 3 ELSE 1 END,
       CASE WHEN s.kind = 'undelivered' THEN now() + interval '1 hour' END,
       CASE WHEN s.kind = 'undelivered' THEN NULL ELSE s.sent_at + interval '12 hours' END,
       s.sent_at + interval '12 hours'
FROM bench_purge_seed AS s
WHERE s.kind IN ('acked', 'unacked', 'undelivered')
""",
)
_TABLES = (
    "sms_sessions",
    "sms_receipts",
    "sms_receipt_events",
    "sms_session_events",
    "escalation_outbox",
)


def _keep(sessions: int) -> int:
    """Sessions the purge must leave, about 1% of those it takes."""
    return max(40, sessions // 100)


def seed(database: BenchDatabase, sessions: int, *, prefix: str = "old-") -> dict[str, Any]:
    """``sessions`` finished sessions past :data:`RETENTION` (and ``_keep(sessions)`` that
    must stay), with everything ingestion leaves of them; then VACUUM ANALYZE."""
    started = time.perf_counter()
    params = {"n": sessions, "keep": _keep(sessions), "prefix": prefix, "retention": RETENTION}
    rows: dict[str, int] = {}
    with database.connect() as conn:
        conn.execute("DROP TABLE IF EXISTS bench_purge_seed")
        conn.execute(_STAGE_SQL, params)
        try:
            for statement, table in zip(_SEED_SQL, _TABLES, strict=True):
                rows[table] = conn.execute(statement, params).rowcount
        finally:
            conn.execute("DROP TABLE IF EXISTS bench_purge_seed")
    database.vacuum_analyze(*_TABLES)
    seconds = time.perf_counter() - started
    log(f"purge: seeded {rows} in {seconds:.1f}s")
    return {"rows": rows, "seconds": round(seconds, 1)}


def _count(conn: Any, query: str) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row is not None else 0


def _counts(database: BenchDatabase) -> dict[str, int]:
    with database.connect() as conn:
        return {table: _count(conn, f"SELECT count(*) FROM {table}") for table in _TABLES}


def _orphans(database: BenchDatabase) -> int:
    """History, receipts and webhooks left without their session: none, if the purge is whole."""
    with database.connect() as conn:
        return sum(
            _count(
                conn,
                f"SELECT count(*) FROM {table} AS t WHERE NOT EXISTS (SELECT 1 FROM "
                "sms_sessions AS s WHERE s.account_id = t.account_id "
                "AND s.session_no = t.session_no)",
            )
            for table in _TABLES[1:]
        )


def run(database: BenchDatabase, *, sessions: int) -> dict[str, Any]:
    """Needs :func:`bench.env.configure_process` done (the worker's engine)."""
    database.truncate()
    seeded = seed(database, sessions)
    before = _counts(database)
    started = time.perf_counter()
    report = purge.purge(
        session_scope, now=datetime.now(UTC), older_than=RETENTION, destinations=()
    )
    seconds = time.perf_counter() - started
    after = _counts(database)
    keep = _keep(sessions)
    orphans = _orphans(database)
    database.truncate()
    if report.sessions != sessions or after["sms_sessions"] != keep or orphans:
        raise RuntimeError(
            f"purge bench: purged {report.sessions} of {sessions}, {after['sms_sessions']} "
            f"left (expected {keep}), {orphans} orphan rows"
        )
    rows = sum(before.values()) - sum(after.values())
    result = {
        "sessions": sessions,
        "phones_per_session": PHONES,
        "seeded_rows": seeded["rows"],
        "seed_seconds": seeded["seconds"],
        "kept_sessions": keep,
        "batch_size": purge.BATCH_SIZE,
        "batches": report.batches,
        "seconds": round(seconds, 1),
        "sessions_per_s": round(report.sessions / seconds),
        "rows_per_s": round(rows / seconds),
        "rows_deleted": rows,
    }
    log(
        f"purge: {report.sessions:,} sessions ({rows:,} rows) in {seconds:.1f}s: "
        f"{result['sessions_per_s']:,} sessions/s"
    )
    return result


# --- polls during a purge ------------------------------------------------------------------

_PENDING_SQL = f"""
INSERT INTO sms_sessions (account_id, session_no, state, phones, sent_at, next_poll_at,
                          poll_count, created_at, updated_at)
SELECT 1 + g %% {ACCOUNTS}, 'due-' || g, 'pending',
       jsonb_build_array('+8615' || lpad((g * 2)::text, 9, '0'),
                         '+8615' || lpad((g * 2 + 1)::text, 9, '0')),
       now() - interval '10 minutes', now() - interval '10 minutes' + g * interval '1 ms',
       0, now(), now()
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
"""
# Due sessions added at a time, untimed, whenever the cycles have claimed them all.
PENDING_CHUNK = 20_000
# One poll cycle started every PACE seconds at most, with or without a purge: a steady load of
# 500 sessions/s, not the cores' limit (a busy CPU would be measured, not the purge).
PACE = 0.2


def _answer(targets: list[store.PollTarget], at: datetime) -> list[Receipt]:
    return [
        Receipt(
            session_no=t.session_no,
            phone=phone,
            result=Result.SUCCESS,
            receipt_code="DELIVRD",
            receipt_desc="Delivered",
            receipt_time=at,
            cost_count=1,
            user_id=None,
            country_code="86",
        )
        for t in targets
        for phone in t.phones
    ]


class _Cycles:
    """Poll cycles of 100 sessions, account after account, each step timed alone, one
    started every :data:`PACE` seconds at most."""

    def __init__(self, database: BenchDatabase, factory: sessionmaker[Any]) -> None:
        self.database = database
        self.factory = factory
        self.account = 0
        self.rng = random.Random(1)
        self.loaded = 0
        self.next_at = 0.0
        self.times: dict[str, list[float]] = {"claim": [], "start": [], "record": []}

    def load(self, count: int) -> None:
        """``count`` more due sessions (untimed)."""
        with self.database.connect() as conn:
            conn.execute(_PENDING_SQL, {"first": self.loaded + 1, "last": self.loaded + count})
        self.loaded += count

    def one(self, *, timed: bool) -> None:
        wait = self.next_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        self.next_at = time.perf_counter() + PACE
        claim = None
        for _ in range(ACCOUNTS + 1):
            self.account = self.account % ACCOUNTS + 1
            spent: dict[str, float] = {}
            started = time.perf_counter()
            with self.factory() as session, session.begin():
                now = datetime.now(UTC)
                claim = store.claim_batch(
                    session,
                    account_id=self.account,
                    now=now,
                    policy=POLICY,
                    lease_until=now + timedelta(minutes=15),
                    limit=BATCH,
                )
            spent["claim"] = time.perf_counter() - started
            if claim is not None:
                break
            self.load(PENDING_CHUNK)  # every account's due sessions were claimed
        if claim is None:
            raise RuntimeError("purge polls: nothing to claim after loading due sessions")
        started = time.perf_counter()
        with self.factory() as session, session.begin():
            now = datetime.now(UTC)
            targets = store.start_poll(
                session, claim=claim, now=now, policy=POLICY, busy_until=now + timedelta(minutes=2)
            )
        spent["start"] = time.perf_counter() - started
        if len(targets) != len(claim.session_ids):
            raise RuntimeError(
                f"purge polls: {len(targets)} of a claim of {len(claim.session_ids)}"
            )
        receipts = _answer(targets, now)
        started = time.perf_counter()
        with self.factory() as session, session.begin():
            store.record_answer(
                session,
                targets=targets,
                receipts=receipts,
                problems={},
                now=datetime.now(UTC),
                policy=POLICY,
                rng=self.rng,
            )
        spent["record"] = time.perf_counter() - started
        if timed:
            for name, seconds in spent.items():
                self.times[name].append(seconds)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 2)


def _summary(times: dict[str, list[float]]) -> dict[str, Any]:
    return {
        "cycles": len(times["claim"]),
        **{
            f"{name}_{label}_ms": value
            for name, values in times.items()
            for label, value in (
                ("p50", _p(values, 0.5)),
                ("p99", _p(values, 0.99)),
                ("mean", round(statistics.fmean(values) * 1000, 2)),
            )
        },
    }


def _purge_started(database: BenchDatabase) -> bool:
    with database.connect() as conn:
        return conn.execute("SELECT 1 FROM receipts_purge_counts LIMIT 1").fetchone() is not None


def _purge_process(database: BenchDatabase, folder: Path) -> subprocess.Popen[bytes]:
    """``receipts purge`` as an operator (or the daily task's worker) runs it: a process of
    its own, on the benchmark's database."""
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIPTS_")}
    env.update(
        RECEIPTS_DATABASE_URL=database.url,
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    )
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "purge.log").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "purge", "--older-than", f"{RETENTION.days}d"],
            env=env,
            cwd=folder,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def polls(
    database: BenchDatabase, *, history: int, baseline_cycles: int, folder: Path
) -> dict[str, Any]:
    """Claim, start and record times of poll cycles without, then with, a purge of
    ``history`` finished sessions running in another process."""
    database.truncate()
    seed(database, history)
    engine = create_engine(database.url)
    factory = sessionmaker(engine, expire_on_commit=False)
    cycles = _Cycles(database, factory)
    cycles.load((baseline_cycles + 20) * BATCH + PENDING_CHUNK)
    database.vacuum_analyze("sms_sessions")
    process: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(20):  # warm-up: connections, compiled and prepared statements
            cycles.one(timed=False)
        for _ in range(baseline_cycles):
            cycles.one(timed=True)
        baseline = _summary(cycles.times)
        log(
            f"purge polls, no purge: claim p99 {baseline['claim_p99_ms']} ms, record p99 "
            f"{baseline['record_p99_ms']} ms ({baseline['cycles']} cycles)"
        )
        cycles.times = {name: [] for name in cycles.times}
        process = _purge_process(database, folder)
        started = time.perf_counter()
        deadline = started + 900
        while not _purge_started(database):
            if process.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"purge polls: the purge ended before a batch ({folder})")
            cycles.one(timed=False)
        purge_started = time.perf_counter()
        while process.poll() is None:
            if time.perf_counter() > deadline:
                raise RuntimeError("purge polls: the purge took over 900 s")
            cycles.one(timed=True)
        purge_seconds = time.perf_counter() - purge_started
        if process.returncode != 0:
            raise RuntimeError(f"purge polls: receipts purge exited {process.returncode}")
        during = _summary(cycles.times)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)
        engine.dispose()
    with database.connect() as conn:
        left = conn.execute(
            "SELECT count(*) FROM sms_sessions WHERE session_no NOT LIKE 'due-%'"
        ).fetchone()
    database.truncate()
    if left is None or left[0] != _keep(history):
        raise RuntimeError(f"purge polls: {left} old sessions left, expected {_keep(history)}")
    result: dict[str, Any] = {
        "history_sessions": history,
        "pace_s": PACE,
        "purge_seconds": round(purge_seconds, 1),
        "baseline": baseline,
        "during_purge": during,
        "claim_p99_ratio": round(during["claim_p99_ms"] / baseline["claim_p99_ms"], 3),
        "record_p99_ratio": round(during["record_p99_ms"] / baseline["record_p99_ms"], 3),
        "start_p99_ratio": round(during["start_p99_ms"] / baseline["start_p99_ms"], 3),
    }
    log(
        f"purge polls, during a purge of {history:,} ({purge_seconds:.1f}s, "
        f"{during['cycles']} cycles): claim p99 {during['claim_p99_ms']} ms "
        f"({result['claim_p99_ratio']}x), record p99 {during['record_p99_ms']} ms "
        f"({result['record_p99_ratio']}x)"
    )
    return result
