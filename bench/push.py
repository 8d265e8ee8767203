"""Uspeedo's push through ``receipts receiver`` (``--workers 2``, as a production host of this
size would run it) on the benchmark database:

- ingestion: receipts committed per second with concurrent pushers each sending batches of 50
  reports, for sessions already tracked (each push resolves ten sessions of five phones), and
  the push-to-commit latency of every push at that load, measured by the pusher from sending to
  the receiver's 200 (which comes only after the commit); at several numbers of pushers, since
  the receiver commits the pushes that arrive together in one transaction
  (worker/push_writer.py);
- API calls saved: real worker and beat processes with the simulator pushing every report to
  the receiver before the first poll is due; the share of sessions never polled.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.env import (
    BenchDatabase,
    SessionSpec,
    copy_sessions,
    empty_redis,
    log,
    make_sessions,
    register,
    timings_env,
)
from tests.support.processes import Processes, wait_for
from tests.support.servers import free_port
from worker.check import is_check_session
from worker.domain import phone_key
from worker.simulator import Simulator
from worker.simulator.pusher import push_body

TOKEN = "bench-push-token-0123456789abcdef"  # noqa: S105 - a loopback benchmark's own token
BATCH = 50
# Concurrent pushers, each pushing its next batch as soon as the last was answered. How many
# connections Uspeedo pushes over at once is not published: the run measures a few levels, and
# the headline figure is taken at PUSHERS (a sender of some volume, whose reports Uspeedo
# forwards as they come from many operators at once).
PUSHER_LEVELS = (4, 16, 32)
PUSHERS = 16
RECEIVER_WORKERS = 2
# The saved-calls run: every report shows one simulator step (1 s) after sending and is pushed
# then; the first poll is due well after (a push that took longer would not count as saved).
FIRST_POLL_DELAY = 15


@contextmanager
def _receiver(database: BenchDatabase, sim: Simulator, broker_url: str, folder: Path) -> Iterator[
    tuple[Processes, int]
]:  # fmt: skip
    """``receipts receiver`` processes on a free loopback port, until the block ends."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **timings_env(database, sim, broker_url),
        "RECEIPTS_CALLBACK_TOKEN": TOKEN,
        "RECEIPTS_FIRST_POLL_DELAY": str(FIRST_POLL_DELAY),
    }
    group = Processes(env, folder, inherit=False)
    try:
        group.receiver(port=port, workers=RECEIVER_WORKERS)

        def listening() -> bool:
            group.check_alive()
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, timeout=60, describe=lambda: group.tail("receiver"))
        yield group, port
    finally:
        group.stop_all()


def _bodies(sessions: list[SessionSpec], receipt_time: int) -> list[tuple[bytes, int]]:
    """Push bodies of :data:`BATCH` reports (every phone of every session, final), serialized
    before the clock starts, with the number of reports in each."""
    reports = [
        {
            "SessionNo": s.session_no,
            "Phone": phone_key(phone),
            "CostCount": 1,
            "ReceiptTime": receipt_time,
            "ReceiptResult": "Success",
            "ReceiptCode": "DELIVRD",
            "ReceiptDesc": "Delivered",
            "UserId": "",
        }
        for s in sessions
        for phone in s.phones
    ]
    return [
        (push_body(reports[i : i + BATCH]), len(reports[i : i + BATCH]))
        for i in range(0, len(reports), BATCH)
    ]


def _push_all(
    port: int, bodies: list[tuple[bytes, int]], pushers: int
) -> tuple[list[float], Counter[int], float]:
    """Send every body with ``pushers`` concurrent pushers (a kept-alive connection each); the
    latency of each push (seconds), the answers by status, and the wall time."""
    path = f"/uspeedo/callback/{TOKEN}"
    headers = {"Content-Type": "application/json; charset=utf-8"}
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    todo = iter(bodies)

    def pusher() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine: list[float] = []
        answers: Counter[int] = Counter()
        try:
            while True:
                with lock:
                    item = next(todo, None)
                if item is None:
                    break
                started = time.perf_counter()
                connection.request("POST", path, body=item[0], headers=headers)
                answer = connection.getresponse()
                text = answer.read()
                mine.append(time.perf_counter() - started)
                ok = answer.status == 200 and json.loads(text).get("code") == 0
                answers[answer.status if ok or answer.status != 200 else 0] += 1
        finally:
            connection.close()
            with lock:
                latencies.extend(mine)
                statuses.update(answers)

    threads = [threading.Thread(target=pusher, name=f"pusher-{n}") for n in range(pushers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, statuses, time.perf_counter() - started


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def ingestion(
    database: BenchDatabase,
    sim: Simulator,
    broker_url: str,
    *,
    sessions: int,
    phones: int,
    folder: Path,
) -> dict[str, Any]:
    """:func:`ingestion_at` each of :data:`PUSHER_LEVELS`, on one receiver; the headline
    figures are those at :data:`PUSHERS`."""
    database.reset()
    sent_at = datetime.now(UTC) - timedelta(minutes=1)
    # A few pushes first, not measured: each receiver process's first requests compile its
    # statements and fill its connection pool.
    warm = make_sessions(PUSHERS * RECEIVER_WORKERS * 4, phones=phones, accounts=4, prefix="w-")
    copy_sessions(database, warm, sent_at=sent_at, first_delay=timedelta(hours=1))
    levels: list[dict[str, Any]] = []
    with _receiver(database, sim, broker_url, folder) as (_group, port):
        _push_all(port, _bodies(warm, int(sent_at.timestamp()) + 1), PUSHERS)
        for level, pushers in enumerate(PUSHER_LEVELS):
            levels.append(
                _ingestion_at(
                    database,
                    port,
                    pushers=pushers,
                    sessions=sessions,
                    phones=phones,
                    prefix=f"push{level}-",
                    sent_at=sent_at,
                )
            )
    headline = next(result for result in levels if result["pushers"] == PUSHERS)
    return {**headline, "receiver_workers": RECEIVER_WORKERS, "levels": levels}


def _ingestion_at(
    database: BenchDatabase,
    port: int,
    *,
    pushers: int,
    sessions: int,
    phones: int,
    prefix: str,
    sent_at: datetime,
) -> dict[str, Any]:
    """Every final receipt of ``sessions`` tracked sessions pushed in batches of :data:`BATCH`
    by ``pushers`` concurrent pushers; checked stored and resolved afterwards."""
    specs = make_sessions(sessions, phones=phones, accounts=4, prefix=prefix)
    # Due in an hour: no poll competes (no worker runs anyway); the push resolves them.
    copy_sessions(database, specs, sent_at=sent_at, first_delay=timedelta(hours=1))
    bodies = _bodies(specs, int(sent_at.timestamp()) + 1)
    receipts = sum(count for _, count in bodies)
    log(f"push: {len(bodies):,} pushes of {BATCH} ({receipts:,} receipts), {pushers} pushers")
    latencies, statuses, seconds = _push_all(port, bodies, pushers)
    with database.connect() as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM sms_receipts WHERE session_no LIKE %(p)s"
            "        AND source = 'push'),"
            "       (SELECT count(*) FROM sms_sessions WHERE session_no LIKE %(p)s"
            "        AND state = 'resolved')",
            {"p": f"{prefix}%"},
        ).fetchone()
    stored, resolved = (int(row[0]), int(row[1])) if row else (0, 0)
    if statuses.get(200, 0) != len(bodies) or stored != receipts or resolved != sessions:
        raise RuntimeError(
            f"push: answers {dict(statuses)}, {stored:,} of {receipts:,} receipts stored, "
            f"{resolved:,} of {sessions:,} sessions resolved"
        )
    result = {
        "sessions": sessions,
        "phones_per_session": phones,
        "receipts": receipts,
        "pushes": len(bodies),
        "batch": BATCH,
        "pushers": pushers,
        "seconds": round(seconds, 3),
        "receipts_per_s": round(receipts / seconds),
        "latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "latency_p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
        "latency_max_ms": round(max(latencies) * 1000, 1),
    }
    log(
        f"push: {pushers} pushers: {result['receipts_per_s']:,} receipts/s, latency p50 "
        f"{result['latency_p50_ms']} ms, p99 {result['latency_p99_ms']} ms"
    )
    return result


def saved_calls(
    database: BenchDatabase, sim: Simulator, broker_url: str, *, sessions: int, folder: Path
) -> dict[str, Any]:
    """Every report pushed (none lost) a step after sending, the first poll due later: the share
    of sessions the worker never polled, and the API calls it made."""
    database.reset()
    empty_redis(broker_url)
    sim.reset()
    specs = make_sessions(sessions, phones=2, accounts=4, prefix="saved-")
    with _receiver(database, sim, broker_url, folder) as (group, port):
        group.start("worker", "worker", "--concurrency", "4", "--hostname", "bench-saved@%h")
        group.start("beat", "beat", "--schedule", str(folder / "beat-schedule"))

        def ticked() -> bool:
            group.check_alive()
            with database.connect() as conn:
                row = conn.execute(
                    "SELECT count(*) FROM receipts_heartbeats WHERE name = 'tick'"
                ).fetchone()
            return bool(row and row[0])

        wait_for(ticked, timeout=90, describe=lambda: group.tail("worker"))
        callback = f"http://127.0.0.1:{port}/uspeedo/callback/{TOKEN}"
        sim.configure_push(url=callback, enabled=True, loss=0.0, batch=100)
        try:
            sent_at = time.time()
            # Tracked before the simulator plays them, so that no push waits in the inbox.
            copy_sessions(
                database,
                specs,
                sent_at=datetime.fromtimestamp(sent_at, UTC),
                first_delay=timedelta(seconds=FIRST_POLL_DELAY),
            )
            register(sim, specs, sent_at=sent_at)

            def drained() -> bool:
                group.check_alive()
                with database.connect() as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM sms_sessions WHERE state = 'pending'"
                    ).fetchone()
                return bool(row and row[0] == 0)

            wait_for(drained, timeout=120, describe=lambda: group.tail("worker"))
            elapsed = time.time() - sent_at
        finally:
            sim.configure_push(enabled=False)
    numbers = {s.session_no for s in specs}
    calls = [
        call
        for call in sim.calls()
        if call["action"] == "GetUSMSSendReceipt"
        and not any(map(is_check_session, call["session_nos"]))
    ]
    polled = {no for call in calls for no in call["session_nos"]} & numbers
    fates = Counter(fate["fate"] for fate in sim.pushes())
    result = {
        "sessions": sessions,
        "reports_delivered": fates.get("delivered", 0),
        "sessions_polled": len(polled),
        "api_calls": len(calls),
        "api_calls_without_push": sum(
            -(-sum(1 for s in specs if s.account_id == a) // 100) for a in range(1, 5)
        ),
        "never_polled_pct": round(100 * (1 - len(polled) / sessions), 1),
        "sent_to_all_resolved_s": round(elapsed, 2),
    }
    log(
        f"push saved: {result['never_polled_pct']}% of {sessions:,} sessions never polled "
        f"({len(calls)} API calls)"
    )
    return result
