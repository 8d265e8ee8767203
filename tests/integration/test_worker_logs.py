"""A real ``receipts worker``'s log, as an operator ships it: Celery's own lines for a rejected
and a failed task, with their tracebacks, show no whole phone number and no webhook token.

The failures are real: a ``receipts.track`` message whose phone is a float (the task rejects
it, naming the value), and a valid one against a database whose ``sms_sessions`` table is gone
(SQLAlchemy's error carries the statement's parameters, phones included).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from celery import Celery

from tests.support.databases import FAST_TIMINGS
from tests.support.processes import processes, wait_for
from worker.migrate import upgrade

pytestmark = [pytest.mark.slow, pytest.mark.redis]

TOKEN = "XXXXSECRETxxxx4321"


def test_celery_task_failures_are_logged_without_phones(tmp_path: Path, broker: str) -> None:
    database = tmp_path / "receipts.db"
    upgrade(f"sqlite:///{database}")
    with sqlite3.connect(database) as connection:
        connection.execute("DROP TABLE sms_sessions")
    env = {
        **FAST_TIMINGS,
        # Its sessions table dropped: every write fails with "no such table", parameters
        # attached (a worker does not start on a database that was never migrated).
        "RECEIPTS_DATABASE_URL": f"sqlite:///{database}",
        "RECEIPTS_BROKER_URL": broker,
        "RECEIPTS_API_URL": "http://127.0.0.1:9/api",
        "RECEIPTS_ACCESS_KEY_ID": "demo",
        "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
        "RECEIPTS_ESCALATION_WEBHOOK_URL": f"https://hooks.example.com/services/T/B/{TOKEN}",
        "RECEIPTS_FIRST_POLL_DELAY": "1h",
        "RECEIPTS_CUTOFF": "12h",
    }
    sender = Celery("someone-else", broker=broker)
    with processes(env, tmp_path) as group:
        group.worker(concurrency=1)
        sender.send_task(
            "receipts.track",
            kwargs={"session_no": "S1", "account_id": 1, "phones": [85255310001.0]},
        )
        sender.send_task(
            "receipts.track",
            kwargs={
                "session_no": "S2",
                "account_id": 1,
                "phones": ["+852-5531-1112"],
                # Where a sender's code names the webhook (here: in a free-text field).
                "user_ref": f"see https://hooks.example.com/services/T/B/{TOKEN}",
            },
        )

        def both_logged() -> bool:
            text = (tmp_path / "worker.log").read_text(errors="replace")
            return "receipts.track" in text and "raised unexpected" in text and "Reject" in text

        wait_for(both_logged, timeout=60, describe=group.logs)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    # Both failures were logged by Celery with their tracebacks...
    assert "Traceback (most recent call last)" in log
    assert "celery.exceptions.Reject" in log
    assert "OperationalError" in log and "[parameters:" in log
    # ...and no phone survives in any spelling, nor the webhook token.
    for whole in ("85255310001", "5531-1112", "55311112", TOKEN):
        assert whole not in log, f"{whole} in the worker's log:\n{log[-6000:]}"
    assert "*******0001" in log and "*******1112" in log
    assert "https://hooks.example.com/<redacted>" in log
