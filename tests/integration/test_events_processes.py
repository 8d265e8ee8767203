"""Events end to end with real ``receipts worker`` and ``receipts beat`` processes, the simulator
and a webhook receiver that first refuses connections, then answers 500, then dies mid-batch,
is down, and comes back: every final receipt yields exactly one ``receipt.final`` id at the
receiver (an id may come twice, none is missing or extra), every resolved and escalated
session its event."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.databases import Configure
from tests.support.processes import processes, wait_for
from tests.support.receiver import DIE, SECRET, Receiver
from tests.support.views import tick_heartbeat
from worker import db, track_many
from worker.models import (
    event_cursors_table,
    receipts_table,
    session_events_table,
    sessions_table,
)
from worker.simulator import Simulator

SCENARIOS = ("quick_success", "slow_final", "late_failure", "never", "submit_fail", "stale_unknow")
FINALS = ("Success", "Fail", "SubmitFail")


def _pending() -> int:
    with db.session_scope() as session:
        query = sa.select(sa.func.count()).where(sessions_table.c.state == "pending")
        return session.scalar(query) or 0


def _attempts() -> int:
    """Failed attempts of the batch the webhook destination is retrying (0 when none)."""
    with db.session_scope() as session:
        return session.scalar(sa.select(event_cursors_table.c.attempts)) or 0


def _answered(receiver: Receiver, status: int) -> bool:
    return any(hit.status == status for hit in receiver.hits())


def _truth() -> tuple[set[tuple[str, str]], set[tuple[int, str, str]]]:
    with db.session_scope() as session:
        finals = {
            (row.session_no, row.phone)
            for row in session.execute(
                sa.select(receipts_table.c.session_no, receipts_table.c.phone).where(
                    receipts_table.c.result.in_(FINALS)
                )
            )
        }
        session_events = {
            (int(row.id), row.type, row.session_no)
            for row in session.execute(
                sa.select(
                    session_events_table.c.id,
                    session_events_table.c.type,
                    session_events_table.c.session_no,
                )
            )
        }
    return finals, session_events


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_every_final_receipt_and_session_event_reaches_a_receiver_that_fails_and_dies(
    configure: Configure, pg: str, broker: str, tmp_path: Path
) -> None:
    first = Receiver(listening=False)  # refuses connections until it listens
    port = int(first.url.split(":")[2].split("/")[0])
    receivers = [first]
    env = {
        "RECEIPTS_TICK": "1",
        "RECEIPTS_FIRST_POLL_DELAY": "1",
        "RECEIPTS_POLL_INTERVAL_MIN": "1",
        "RECEIPTS_POLL_INTERVAL_MAX": "2",
        "RECEIPTS_CUTOFF": "6",
        "RECEIPTS_POLL_BUDGET": "2",
        "RECEIPTS_WEBHOOK_TIMEOUT": "1",
        "RECEIPTS_DATABASE_URL": pg,
        "RECEIPTS_BROKER_URL": broker,
        "RECEIPTS_ACCESS_KEY_ID": "demo",
        "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
        "RECEIPTS_EVENTS_WEBHOOK_URL": first.url,
        "RECEIPTS_WEBHOOK_SECRET": SECRET,
        "RECEIPTS_EVENTS_BATCH_SIZE": "4",
    }
    try:
        with Simulator(step=0.5, seed=11) as sim:
            env["RECEIPTS_API_URL"] = sim.url
            configure(**env)
            with processes(env, tmp_path) as group:
                group.worker()
                group.beat()
                wait_for(lambda: tick_heartbeat() is not None, timeout=20, describe=group.logs)
                sent = time.time()
                sessions = {
                    f"{scenario[:6].upper()}-{i}": scenario
                    for scenario in SCENARIOS
                    for i in range(3)
                }
                phones = {
                    no: [f"+8525531{n:03d}{k}" for k in range(2)] for n, no in enumerate(sessions)
                }
                sim.register(
                    {
                        "account_id": 1,
                        "session_no": no,
                        "phones": phones[no],
                        "scenario": scenario,
                        "sent_at": sent,
                    }
                    for no, scenario in sessions.items()
                )
                track_many(
                    {
                        "account_id": 1,
                        "session_no": no,
                        "phones": phones[no],
                        "sent_at": datetime.fromtimestamp(sent, UTC),
                        "user_ref": f"ref-{no}",
                    }
                    for no in sessions
                )

                # Each failure is waited for, not timed: delivery starts when the first
                # receipts commit (worker/event_nudge.py), and the attempts that follow are
                # spaced by the backoff, so a failure mode held for a fixed while could fall
                # between two attempts.
                wait_for(lambda: _attempts() >= 1, timeout=20, describe=group.logs)
                first.status = 500
                first.listen()
                wait_for(lambda: _answered(first, 500), timeout=20, describe=group.logs)
                first.status = DIE  # reads a batch, then dies without answering
                wait_for(lambda: _answered(first, DIE), timeout=20, describe=group.logs)
                first.close()  # killed: connections refused again
                down = time.monotonic()
                wait_for(lambda: time.monotonic() >= down + 1, timeout=5, interval=0.05)
                second = Receiver(port=port)
                receivers.append(second)

                def received() -> dict[int, dict[str, Any]]:
                    got: dict[int, dict[str, Any]] = {}
                    for receiver in receivers:
                        for hit in receiver.hits():
                            if hit.ok:
                                got.update((e["id"], e) for e in hit.payload["events"])
                    return got

                def complete() -> bool:
                    if _pending():
                        return False
                    finals, session_events = _truth()
                    got = received().values()
                    return {
                        (e["session_no"], e["phone"]) for e in got if e["type"] == "receipt.final"
                    } == finals and {
                        (e["id"], e["type"], e["session_no"])
                        for e in got
                        if e["type"].startswith("session.")
                    } == session_events

                wait_for(
                    complete,
                    timeout=35,
                    describe=lambda: f"{_pending()} pending, got {len(received())}\n{group.logs()}",
                )
    finally:
        for receiver in receivers:
            receiver.close()

    finals, session_events = _truth()
    hits = [hit for receiver in receivers for hit in receiver.hits()]
    assert {h.status for h in hits} >= {500, DIE, 200}, "the receiver failed in every way"
    assert all(h.signed() for h in hits)
    ids_by_receipt: dict[tuple[str, str], set[int]] = defaultdict(set)
    for hit in hits:
        if not hit.ok:
            continue
        for event in hit.payload["events"]:
            if event["type"] == "receipt.final":
                ids_by_receipt[event["session_no"], event["phone"]].add(event["id"])
                assert event["user_ref"] == f"ref-{event['session_no']}"
    assert set(ids_by_receipt) == finals
    assert all(len(ids) == 1 for ids in ids_by_receipt.values()), "one id per final receipt"
    resolved = {no for _, kind, no in session_events if kind == "session.resolved"}
    escalated = {no for _, kind, no in session_events if kind == "session.escalated"}
    assert escalated >= {no for no, s in sessions.items() if s == "never"}
    assert resolved >= {no for no, s in sessions.items() if s == "quick_success"}
