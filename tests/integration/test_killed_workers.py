"""A worker killed while its polls wait on a slow API: its holds are released within about two
ticks of the next worker's tick (it stops heartbeating), so the sessions are polled again well
before their cutoff instead of at the end of the poll's whole in-flight window; sessions whose
cutoff passed while their poll was lost get one reconciliation poll and resolve late. Real
worker and beat processes on PostgreSQL and a private Redis, timings scaled to seconds."""

from __future__ import annotations

import itertools
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.databases import Configure
from tests.support.processes import processes, wait_for
from worker import db, track_many
from worker.models import sessions_table
from worker.simulator import Simulator

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

TICK = 0.5
INTERVAL_MIN = 1.0
CUTOFF = 20.0
LATENCY = 0.3
TIMINGS = {
    "RECEIPTS_TICK": str(TICK),
    "RECEIPTS_FIRST_POLL_DELAY": "1",
    "RECEIPTS_POLL_INTERVAL_MIN": str(INTERVAL_MIN),
    "RECEIPTS_POLL_INTERVAL_MAX": "2",
    "RECEIPTS_CUTOFF": str(CUTOFF),
    # A poll may be in flight for budget + timeouts + interval_min = 42 s: longer than the
    # cutoff, as minutes are with the production defaults; and no attempt of the doomed worker
    # gives up before it is killed, however slowly the machine starts the survivor.
    "RECEIPTS_POLL_BUDGET": "20",
    "RECEIPTS_API_CONNECT_TIMEOUT": "1",
    "RECEIPTS_API_READ_TIMEOUT": "20",
}
KILL_AFTER = 2.5  # seconds after sending: both groups' polls wait on the API
ENDING_AFTER = 4.0  # the ending sessions' cutoff, seconds after sending


def test_a_killed_worker_s_polls_are_taken_over_and_reconciled(
    configure: Configure, pg: str, broker: str, tmp_path: Path
) -> None:
    with Simulator(step=0.5, seed=31) as sim:
        env = {
            **TIMINGS,
            "RECEIPTS_DATABASE_URL": pg,
            "RECEIPTS_BROKER_URL": broker,
            "RECEIPTS_API_URL": sim.url,
            "RECEIPTS_ACCESS_KEY_ID": "demo",
            "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
        }
        configure(**env)
        with processes(env, tmp_path) as group:
            doomed = group.worker("doomed")
            group.beat()
            wait_for(_ticked, timeout=60, describe=group.logs)
            # Every answer takes longer than the read timeout until the doomed worker is gone.
            sim.set_faults(slow=1.0, slow_seconds=60)
            now = time.time()
            fresh = {f"FRESH-{i:02d}": now for i in range(20)}
            # Their cutoff passes after the doomed worker dies and before another worker runs a
            # tick: escalated while their poll was lost.
            ending = {f"ENDING-{i:02d}": now - CUTOFF + ENDING_AFTER for i in range(20)}
            sent = {**fresh, **ending}
            sim.register(
                {
                    "account_id": 1,
                    "session_no": number,
                    "phones": [f"(852)5531{i:04d}"],
                    "scenario": "quick_success",
                    "sent_at": sent_at,
                }
                for i, (number, sent_at) in enumerate(sent.items())
            )
            track_many(
                {
                    "account_id": 1,
                    "session_no": number,
                    "phones": [f"(852)5531{i:04d}"],
                    "sent_at": datetime.fromtimestamp(sent_at, UTC),
                }
                for i, (number, sent_at) in enumerate(sent.items())
            )
            wait_for(
                lambda: _held() == len(sent),
                timeout=KILL_AFTER,
                describe=lambda: f"{_held()} held\n{group.logs()}",
            )
            wait_for(lambda: time.time() >= now + KILL_AFTER, timeout=KILL_AFTER + 1)
            os.killpg(doomed.pid, signal.SIGKILL)
            doomed.wait(10)
            assert time.time() < now + ENDING_AFTER, "killed before the ending sessions' cutoff"
            sim.set_faults()
            group.worker("survivor")
            # Ready: its pool is up and consuming (the dead worker's rows are still there).
            survivor_log = tmp_path / "survivor.log"
            wait_for(lambda: " ready." in survivor_log.read_text(), timeout=60, describe=group.logs)
            survivor_up = time.time()
            wait_for(
                lambda: _pending() == 0 and _held() == 0,
                timeout=CUTOFF + 20,
                describe=lambda: f"{_pending()} pending, {_held()} held\n{group.logs()}",
            )
        calls = sim.calls()
    rows = _sessions()
    problems: list[str] = []
    for number, sent_at in sent.items():
        row = rows[number]
        times = sorted(c["t"] for c in calls if number in c["session_nos"])
        answered = sorted(
            c["t"] for c in calls if number in c["session_nos"] and c["outcome"] == "ok"
        )
        for a, b in itertools.pairwise(times):
            if b - a < INTERVAL_MIN - LATENCY:
                problems.append(f"{number}: polled twice {b - a:.2f}s apart")
        if not answered:
            problems.append(f"{number}: never answered")
            continue
        if number in fresh:
            # Taken over well before the cutoff: the hold ended within about two ticks of the
            # death (and interval_min after the lost poll), not 16 s after that poll started.
            if row["state"] != "resolved" or row["escalated_at"] is not None:
                problems.append(f"{number}: {row['state']}, escalated_at {row['escalated_at']}")
            # (No tick runs between the death and the survivor's start.)
            if answered[0] > survivor_up + 4 * TICK + INTERVAL_MIN + LATENCY:
                late = answered[0] - survivor_up
                problems.append(f"{number}: polled again {late:.2f}s after the survivor started")
        else:
            # Escalated while its poll was lost, then one reconciliation poll: resolved late.
            if row["state"] != "resolved" or row["escalated_at"] is None:
                problems.append(f"{number}: {row['state']}, escalated_at {row['escalated_at']}")
            if len(answered) != 1 or answered[0] < sent_at + CUTOFF:
                problems.append(
                    f"{number}: answered at {[round(t - sent_at, 2) for t in answered]}"
                )
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:40])


def _ticked() -> bool:
    with db.session_scope() as session:
        return bool(
            session.scalar(sa.text("SELECT count(*) FROM receipts_heartbeats WHERE name = 'tick'"))
        )


def _sessions() -> dict[str, dict[str, Any]]:
    with db.session_scope() as session:
        rows = session.execute(sa.select(sessions_table)).mappings()
        return {row["session_no"]: dict(row) for row in rows}


def _pending() -> int:
    return sum(1 for row in _sessions().values() if row["state"] == "pending")


def _held() -> int:
    return sum(1 for row in _sessions().values() if row["held_by"] is not None)
