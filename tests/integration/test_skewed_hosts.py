"""Hosts whose clocks are wrong: two real workers, one with its wall clock two seconds fast and
one two seconds slow (and a beat on the fast host), poll the same sessions. The timing rules
are checked against the database's clock, so the simulator's log and the test's own
observations, both kept by the real clock, show no session polled before its first delay or
inside the minimum interval, none polled after its cutoff and none escalated before it.
Timings are scaled so that two seconds here are two minutes in production: more than half the
minimum interval."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import skew
from tests.support.databases import Configure
from tests.support.processes import processes, wait_for
from worker import db, track_many
from worker.models import sessions_table
from worker.simulator import Simulator

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

SKEW = 2  # seconds; the shim moves the wall clock by whole seconds
FIRST_POLL_DELAY = 1.0
INTERVAL_MIN = 3.0
CUTOFF = 12.0
LATENCY = 0.3  # between the worker deciding to poll and the simulator logging the call
TIMINGS = {
    "RECEIPTS_FIRST_POLL_DELAY": str(FIRST_POLL_DELAY),
    "RECEIPTS_POLL_INTERVAL_MIN": str(INTERVAL_MIN),
    "RECEIPTS_POLL_INTERVAL_MAX": "4",
    "RECEIPTS_CUTOFF": str(CUTOFF),
    "RECEIPTS_TICK": "0.5",
    "RECEIPTS_POLL_BUDGET": "2",
    "RECEIPTS_API_CONNECT_TIMEOUT": "1",
    "RECEIPTS_API_READ_TIMEOUT": "1",
}


def test_workers_with_wrong_clocks_keep_every_timing_rule(
    configure: Configure, pg: str, broker: str, tmp_path: Path
) -> None:
    library = skew.build(tmp_path)
    if library is None:
        pytest.skip("no C compiler to build the clock shim")
    with Simulator(step=1.0, seed=21) as sim:
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
            group.worker("fast", env=skew.shifted(library, SKEW))
            group.worker("slow", env=skew.shifted(library, -SKEW))
            group.beat("beat", env=skew.shifted(library, SKEW))
            wait_for(_ticked, timeout=60, describe=group.logs)
            sent_at = time.time()
            # Sessions that never resolve: polled every interval until their cutoff.
            numbers = [f"SKEW-{i:03d}" for i in range(40)]
            sim.register(
                {
                    "account_id": 1 + i % 2,
                    "session_no": number,
                    "phones": [f"(852)5531{i:04d}"],
                    "scenario": "unknow_forever",
                    "sent_at": sent_at,
                }
                for i, number in enumerate(numbers)
            )
            track_many(
                {
                    "account_id": 1 + i % 2,
                    "session_no": number,
                    "phones": [f"(852)5531{i:04d}"],
                    "sent_at": datetime.fromtimestamp(sent_at, UTC),
                }
                for i, number in enumerate(numbers)
            )
            # When each session is seen escalated, by the real clock (the row's escalated_at is
            # written by whichever clock escalated it).
            seen_escalated: dict[str, float] = {}

            def settled() -> bool:
                for number in _escalated():
                    seen_escalated.setdefault(number, time.time())
                return len(seen_escalated) == len(numbers)

            wait_for(
                settled,
                timeout=CUTOFF + 30,
                interval=0.05,
                describe=lambda: f"{len(seen_escalated)} escalated\n{group.logs()}",
            )
        calls = sim.calls()
    problems: list[str] = []
    polls = {n: [c["t"] for c in calls if n in c["session_nos"]] for n in numbers}
    for number, times in polls.items():
        for a, b in itertools.pairwise(sorted(times)):
            if b - a < INTERVAL_MIN - LATENCY:
                problems.append(f"{number}: polled {b - a:.2f}s after the previous poll")
        if times and min(times) < sent_at + FIRST_POLL_DELAY - LATENCY:
            problems.append(f"{number}: first polled {min(times) - sent_at:.2f}s after sending")
        if times and max(times) > sent_at + CUTOFF + LATENCY:
            problems.append(f"{number}: polled {max(times) - sent_at:.2f}s after sending")
        if seen_escalated[number] < sent_at + CUTOFF - LATENCY:
            early = sent_at + CUTOFF - seen_escalated[number]
            problems.append(f"{number}: escalated {early:.2f}s before its cutoff")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:30])
    # Not vacuous: the interval rule was exercised (three polls fit in the cutoff; a busy
    # machine, the suite running beside it, makes some sessions get only one or two).
    assert sum(len(times) >= 2 for times in polls.values()) >= 20, "half polled repeatedly"


def _ticked() -> bool:
    with db.session_scope() as session:
        return bool(
            session.scalar(sa.text("SELECT count(*) FROM receipts_heartbeats WHERE name = 'tick'"))
        )


def _escalated() -> list[str]:
    with db.session_scope() as session:
        return list(
            session.scalars(
                sa.select(sessions_table.c.session_no).where(sessions_table.c.state == "escalated")
            )
        )
