"""The Celery-task destination: event batches sent with ``send_task`` reach a separate consumer
app that shares only the broker (this run's Redis db), as the sender's own workers would get
them, on both backends; a broker that does not take the task is a failed attempt."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from tests.support.clock import POLICY, T0
from tests.support.factories import P1, P2, escalate, poll, receipt, track
from tests.support.processes import wait_for
from worker import db, events
from worker.domain import DEFAULT_EVENT_TYPES, Result

FIRST = T0 + POLICY.first_delay
QUEUE = "shop-events"


def _round(send: events.Sender, now: datetime) -> events.DeliveryReport:
    with db.session_scope() as session:
        events.sync_destinations(session, ["task"])
    return events.deliver(
        session_factory=db.session_scope,
        destination="task",
        send=send,
        now=lambda: now,
        types=DEFAULT_EVENT_TYPES,
        lease=timedelta(minutes=1),
        batch_size=2,
        retry_base=timedelta(seconds=30),
        retry_cap=timedelta(minutes=15),
        window=timedelta(hours=1),
    )


@pytest.mark.usefixtures("database")
def test_batches_reach_a_consumer_app_that_shares_only_the_broker(redis_url: str) -> None:
    track(
        {"account_id": 1, "session_no": "S1", "phones": [P1, P2], "user_ref": "order-1"},
        {"account_id": 1, "session_no": "S2", "phones": [P1]},
    )
    poll(
        1,
        [receipt("S1", P1, Result.SUCCESS, FIRST), receipt("S1", P2, Result.FAIL, FIRST)],
        FIRST,
    )
    escalate(T0 + POLICY.cutoff)

    # The sender's application: its own app and task, nothing of this project.
    consumer = Celery("shop", broker=redis_url)
    consumer.conf.task_default_queue = QUEUE
    got: list[dict[str, Any]] = []
    lock = threading.Lock()

    @consumer.task(name="shop.receipt_events", shared=False)
    def receipt_events(batch: dict[str, Any]) -> None:
        with lock:
            got.extend(batch["events"])

    producer = Celery("receipts-test", broker=redis_url)
    send = events.task_sender(producer, "shop.receipt_events", QUEUE)
    report = _round(send, T0 + POLICY.cutoff)
    assert report.delivered == 4 and report.batches == 2

    with start_worker(consumer, pool="solo", perform_ping_check=False, queues=[QUEUE]):
        wait_for(lambda: len(got) == 4, timeout=20)
    assert [e["type"] for e in got] == [
        "receipt.final",
        "receipt.final",
        "session.resolved",
        "session.escalated",
    ]
    assert got[0]["user_ref"] == "order-1"
    producer.close()
    consumer.close()


@pytest.mark.usefixtures("database")
def test_a_broker_that_does_not_take_the_task_is_a_failed_attempt() -> None:
    track({"account_id": 1, "session_no": "S1", "phones": [P1]})
    poll(1, [receipt("S1", P1, Result.SUCCESS, FIRST)], FIRST)
    nowhere = Celery("receipts-test", broker="redis://127.0.0.1:9/0")
    nowhere.conf.broker_connection_timeout = 0.5
    report = _round(events.task_sender(nowhere, "shop.receipt_events", QUEUE), FIRST)
    assert (report.failed, report.delivered) == (1, 0)
    nowhere.close()
