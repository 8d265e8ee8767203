"""The Celery-task destination: event batches sent with ``send_task`` reach a separate consumer
app that shares only the broker (this run's Redis db), as the sender's own workers would get
them, on both backends; a broker that does not take the task is a failed attempt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

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


CONSUMER = """
import json, os
from celery import Celery

app = Celery("shop", broker=os.environ["SHOP_BROKER"])


@app.task(name="shop.receipt_events")
def receipt_events(batch):
    with open(os.environ["SHOP_OUT"], "a") as out:
        out.write(json.dumps(batch) + "\\n")
"""


@pytest.mark.slow
@pytest.mark.usefixtures("database")
def test_batches_reach_a_consumer_app_that_shares_only_the_broker(
    redis_url: str, tmp_path: Path
) -> None:
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

    # The sender's application: its own app and task, nothing of this project, in a worker
    # process of its own that shares only the broker.
    (tmp_path / "shop.py").write_text(CONSUMER)
    received = tmp_path / "received.jsonl"
    producer = Celery("receipts-test", broker=redis_url)
    send = events.task_sender(producer, "shop.receipt_events", QUEUE)
    report = _round(send, T0 + POLICY.cutoff)
    assert report.delivered == 4 and report.batches == 2
    producer.close()

    env = {**os.environ, "SHOP_BROKER": redis_url, "SHOP_OUT": str(received)}
    consumer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "shop",
            "worker",
            "--pool",
            "solo",
            "-Q",
            QUEUE,
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "WARNING",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def got() -> list[dict[str, Any]]:
            if not received.exists():
                return []
            lines = received.read_text().splitlines()
            return [e for line in lines for e in json.loads(line)["events"]]

        wait_for(lambda: len(got()) == 4, timeout=30)
    finally:
        consumer.terminate()
        _, err = consumer.communicate(timeout=20)
    assert consumer.returncode is not None, err
    got_events = got()
    assert [e["type"] for e in got_events] == [
        "receipt.final",
        "receipt.final",
        "session.resolved",
        "session.escalated",
    ]
    assert got_events[0]["user_ref"] == "order-1"


@pytest.mark.usefixtures("database")
def test_a_broker_that_does_not_take_the_task_is_a_failed_attempt() -> None:
    track({"account_id": 1, "session_no": "S1", "phones": [P1]})
    poll(1, [receipt("S1", P1, Result.SUCCESS, FIRST)], FIRST)
    nowhere = Celery("receipts-test", broker="redis://127.0.0.1:9/0")
    nowhere.conf.broker_connection_timeout = 0.5
    report = _round(events.task_sender(nowhere, "shop.receipt_events", QUEUE), FIRST)
    assert (report.failed, report.delivered) == (1, 0)
    nowhere.close()
