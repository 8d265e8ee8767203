"""A real ``receipts worker`` refusing a ``receipts.track`` that another codebase sent through the
broker, sharing nothing else: the refusal is kept in ``rejected_tracks`` (with the sender's task
id and node name), counted by the exporter, listed by ``receipts rejected`` with phones masked,
and resubmitted with a fix, which records the session."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cli import invoke, ok
from tests.support.databases import FAST_TIMINGS, Configure
from tests.support.processes import processes, wait_for
from worker import db
from worker.api import rejected_tracks
from worker.clock import database_now
from worker.metrics import make_registry, render
from worker.models import sessions_table

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

PHONE = "(852)55311111"


def _refused_counts() -> dict[str, float]:
    text = render(make_registry(database_now)).decode()
    return {
        sample.labels["state"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "receipts_rejected_tracks"
        for sample in family.samples
    }


def test_a_task_refused_from_another_codebase_is_kept_counted_listed_and_resubmitted(
    configure: Configure, pg: str, broker: str, tmp_path: Path
) -> None:
    env = {
        **FAST_TIMINGS,
        "RECEIPTS_DATABASE_URL": pg,
        "RECEIPTS_BROKER_URL": broker,
        "RECEIPTS_API_URL": "http://127.0.0.1:9/api",
        "RECEIPTS_ACCESS_KEY_ID": "demo",
        "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
        # Nothing here is due during the test: keep the clock out of the way.
        "RECEIPTS_FIRST_POLL_DELAY": "1h",
        "RECEIPTS_CUTOFF": "12h",
    }
    configure(**env)
    sender = Celery("someone-else", broker=broker)
    with processes(env, tmp_path) as group:
        group.worker(concurrency=1)
        sent = sender.send_task(
            "receipts.track",
            kwargs={"session_no": "S1", "account_id": 42, "phones": [PHONE], "sent_at": "today"},
        )
        wait_for(lambda: len(rejected_tracks()) == 1, timeout=30, describe=group.logs)
        log = (tmp_path / "worker.log").read_text(errors="replace")

    [row] = rejected_tracks()
    assert row.task_id == sent.id
    assert row.origin is not None and "@" in row.origin, "the sender's Celery node name"
    assert dict(row.arguments) == {
        "session_no": "S1",
        "account_id": 42,
        "phones": [PHONE],
        "sent_at": "today",
    }
    assert row.reason == "sent_at: sent_at 'today' is not an ISO 8601 timestamp"
    assert f"kept as rejected track {row.id} (see `receipts rejected`)" in log
    assert "55311111" not in log
    with db.session_scope() as session:
        assert session.execute(sa.select(sa.func.count()).select_from(sessions_table)).scalar() == 0

    assert _refused_counts() == {"open": 1, "resubmitted": 0, "dismissed": 0}

    shown = ok(invoke("rejected")).output
    assert "S1" in shown and "*******1111" in shown and "today" in shown
    assert "55311111" not in shown

    done = ok(invoke("rejected", "resubmit", str(row.id), "--set", "sent_at="))
    assert "1 new" in done.output
    with db.session_scope() as session:
        recorded = session.execute(sa.select(sessions_table)).mappings().one()
    assert (recorded["account_id"], recorded["session_no"]) == (42, "S1")
    assert recorded["phones"] == [PHONE]
    assert recorded["sent_at"] == row.received_at
    assert _refused_counts() == {"open": 0, "resubmitted": 1, "dismissed": 0}
