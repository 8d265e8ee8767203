"""With a real ``receipts worker`` and no clock at all (no beat, and a tick of ten minutes), the
events of a poll reach the webhook receiver: the poll task's commit nudged delivery
(worker/event_nudge.py), which needed no tick."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery import Celery

from tests.support.databases import Configure
from tests.support.processes import processes, wait_for
from tests.support.receiver import SECRET, Receiver
from tests.support.views import tick_heartbeat
from worker import db, events, store, track_many
from worker.celery import POLL_QUEUE
from worker.clock import database_now
from worker.config import get_settings
from worker.simulator import Simulator

SESSIONS = [f"NUDGE-{i}" for i in range(5)]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_a_polls_events_arrive_with_no_tick(
    configure: Configure, pg: str, broker: str, tmp_path: Path
) -> None:
    with Receiver() as receiver, Simulator(step=0.1, seed=3) as sim:
        env = {
            "RECEIPTS_TICK": "10m",
            "RECEIPTS_CLAIM_LEASE": "10m",
            "RECEIPTS_FIRST_POLL_DELAY": "1",
            "RECEIPTS_CUTOFF": "1h",
            "RECEIPTS_DATABASE_URL": pg,
            "RECEIPTS_BROKER_URL": broker,
            "RECEIPTS_API_URL": sim.url,
            "RECEIPTS_ACCESS_KEY_ID": "demo",
            "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
            "RECEIPTS_EVENTS_WEBHOOK_URL": receiver.url,
            "RECEIPTS_WEBHOOK_SECRET": SECRET,
        }
        configure(**env)
        sent = time.time() - 10
        phones = {no: [f"+8525531{n:03d}1"] for n, no in enumerate(SESSIONS)}
        sim.register(
            {
                "account_id": 1,
                "session_no": no,
                "phones": phones[no],
                "scenario": "quick_success",
                "sent_at": sent,
            }
            for no in SESSIONS
        )
        track_many(
            {
                "account_id": 1,
                "session_no": no,
                "phones": phones[no],
                "sent_at": datetime.fromtimestamp(sent, UTC),
            }
            for no in SESSIONS
        )
        settings = get_settings()
        with db.session_scope() as session:
            # The cursor the first tick would have made (when the beat starts).
            events.sync_destinations(session, settings.event_destinations)
            now = database_now()
            claim = store.claim_batch(
                session,
                account_id=1,
                now=now,
                policy=settings.poll_policy(),
                lease_until=now + timedelta(minutes=10),
                limit=100,
            )
        assert claim is not None and len(claim.session_ids) == len(SESSIONS)
        sender = Celery("test-dispatch", broker=broker)
        with processes(env, tmp_path) as group:
            group.worker()
            # The poll the tick would have dispatched: the only task this test sends.
            sender.send_task(
                "receipts.poll",
                kwargs={
                    "account_id": claim.account_id,
                    "session_ids": list(claim.session_ids),
                    "token": claim.token,
                },
                queue=POLL_QUEUE,
            )

            def received() -> set[tuple[str, str]]:
                return {
                    (event["type"], event["session_no"])
                    for hit in receiver.hits()
                    if hit.ok
                    for event in hit.payload["events"]
                }

            expected = {("receipt.final", no) for no in SESSIONS} | {
                ("session.resolved", no) for no in SESSIONS
            }
            # Bounded well below the ten-minute tick, which never comes anyway.
            wait_for(
                lambda: received() >= expected,
                timeout=60,
                describe=lambda: f"got {sorted(received())}\n{group.logs()}",
            )
        assert tick_heartbeat() is None, "no tick ran: the poll's commit queued the delivery"
        assert all(hit.signed() for hit in receiver.hits())
