"""The ``stale_sessions`` and ``session_summary`` views, and the commands that read them
(``receipts stale``, ``receipts ack``), agree with each other on both backends. The views
compare with the database's own clock, so these tests run on the real one."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.support.cli import invoke, ok
from tests.support.factories import (
    P1,
    P2,
    P3,
    escalate,
    poll,
    receipt,
    stored_sessions,
    track,
)
from tests.support.views import clock_stopped, stale, summaries
from worker import db, store
from worker.domain import Result
from worker.models import heartbeats_table, sessions_table
from worker.schedule import PollPolicy

# --- the views and the commands ---------------------------------------------------------


@pytest.mark.usefixtures("database")
def test_the_stale_view_and_the_commands_agree() -> None:
    # The views compare with the database's own clock, so this test runs on the real one.
    now = datetime.now(UTC)
    tick = timedelta(seconds=30)
    interval_max = timedelta(seconds=60)
    policy = PollPolicy(
        first_delay=timedelta(seconds=30),
        interval_min=timedelta(seconds=30),
        interval_max=interval_max,
        cutoff=timedelta(minutes=30),
    )
    long_ago, recently = now - timedelta(hours=1), now - timedelta(minutes=10)
    track(
        {"account_id": 7, "session_no": "ESC-OPEN", "phones": [P1, P2], "sent_at": long_ago},
        {"account_id": 7, "session_no": "ESC-ACKED", "sent_at": long_ago},
        {"account_id": 7, "session_no": "OVERDUE", "sent_at": recently},
        {"account_id": 7, "session_no": "FRESH", "phones": [P1, P2, P3], "sent_at": recently},
        now=now,
        policy=policy,
    )
    # FRESH gets two receipts (one final) and its next poll a little ahead.
    poll(
        7,
        [
            receipt("FRESH", P1, Result.SUCCESS, now, cost=2),
            receipt("FRESH", P2, Result.UNKNOW, now, cost=1),
        ],
        now,
        policy,
    )
    assert {e.session_no for e in escalate(now, policy)} == {"ESC-OPEN", "ESC-ACKED"}
    with db.session_scope() as session:
        store.acknowledge(session, ["ESC-ACKED"], now=now, note="handled")
        # Overdue by 5 minutes: more than 2 x 60 s, the heartbeat's interval, but less than
        # 2 x 600 s, the view's default when no tick has recorded the real timing yet.
        session.execute(
            sa.update(sessions_table)
            .where(sessions_table.c.session_no == "OVERDUE")
            .values(next_poll_at=now - timedelta(minutes=5))
        )
    assert stale() == [("escalated", 7, "ESC-OPEN")], "no heartbeat yet: the default applies"
    with db.session_scope() as session:
        store.record_heartbeat(session, name="tick", now=now, tick=tick, interval_max=interval_max)

    expected = [("escalated", 7, "ESC-OPEN"), ("overdue", 7, "OVERDUE")]
    assert stale() == expected
    listed = json.loads(ok(invoke("stale", "--json")).stdout)
    assert sorted((r["kind"], r["account_id"], r["session_no"]) for r in listed) == expected
    by_no = {r["session_no"]: r for r in listed}
    assert by_no["ESC-OPEN"]["phones"] == [
        {"phone": P1, "last_result": None},
        {"phone": P2, "last_result": None},
    ]
    assert by_no["OVERDUE"]["state"] == "pending"
    assert invoke("stale", "--fail").exit_code == 1

    # Refused acknowledgements change nothing, all or none.
    before = stored_sessions()
    for args, problem in (
        (("NOPE",), "'NOPE' is not tracked"),
        (("FRESH",), "'FRESH' is pending, not escalated"),
        (("ESC-OPEN", "NOPE"), "'NOPE' is not tracked"),
        (("ESC-OPEN", "OVERDUE", "--note", "x"), "'OVERDUE' is pending, not escalated"),
    ):
        result = invoke("ack", *args)
        assert result.exit_code == 1, (args, result.output)
        assert "nothing was acknowledged" in result.stderr
        assert problem in result.stderr
        assert stored_sessions() == before, args
    assert stale() == expected

    result = ok(invoke("ack", "ESC-OPEN", "--note", "ticket 42"))
    assert "acknowledged 1 escalation(s)" in result.output
    row = stored_sessions()["ESC-OPEN"]
    assert row["ack_note"] == "ticket 42"
    assert row["acknowledged_at"] is not None
    assert abs(row["acknowledged_at"] - datetime.now(UTC)) < timedelta(minutes=1)
    assert row["state"] == "escalated", "acknowledged, still escalated"
    assert stale() == [("overdue", 7, "OVERDUE")]
    assert [r["session_no"] for r in json.loads(ok(invoke("stale", "--json")).stdout)] == [
        "OVERDUE"
    ]
    ok(invoke("stale", "--fail"))
    # Acknowledging twice keeps the first acknowledgement.
    acked = stored_sessions()["ESC-ACKED"]
    ok(invoke("ack", "ESC-ACKED", "--note", "again"))
    again = stored_sessions()["ESC-ACKED"]
    assert (again["acknowledged_at"], again["ack_note"]) == (acked["acknowledged_at"], "handled")

    # The clock: stopped when the last tick is older than 1.5 ticks.
    def beat_at(ago: timedelta) -> None:
        with db.session_scope() as session:
            session.execute(
                sa.update(heartbeats_table)
                .where(heartbeats_table.c.name == "tick")
                .values(beat_at=datetime.now(UTC) - ago)
            )

    beat_at(tick * 1.4)
    assert clock_stopped() == []
    beat_at(tick * 1.6)
    stopped = clock_stopped()
    assert len(stopped) == 1
    assert stopped[0]["session_no"] is None and stopped[0]["account_id"] is None
    assert stopped[0]["last_error"].startswith("no tick processed since")
    kinds = sorted(r["kind"] for r in json.loads(ok(invoke("stale", "--json")).stdout))
    assert kinds == ["clock_stopped", "overdue"]
    with db.session_scope() as session:
        store.record_heartbeat(
            session, name="tick", now=datetime.now(UTC), tick=tick, interval_max=interval_max
        )
    assert clock_stopped() == []
    assert stale() == [("overdue", 7, "OVERDUE")]

    # session_summary counts exactly: tracked, reported, final, successful, cost, late.
    summary = summaries()
    assert summary["FRESH"] == (3, 2, 1, 1, 3, 0)
    assert summary["ESC-OPEN"] == (2, 0, 0, 0, 0, 0)
    assert summary["OVERDUE"] == (0, 0, 0, 0, 0, 0)
