"""The event cursor never skips an id that commits late (PostgreSQL, whose sequence ids commit
out of order): two concurrent writers, the first held open while the second commits and a
delivery round runs; once the first commits, its event is delivered, before the second's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from worker import db, events
from worker.domain import DEFAULT_EVENT_TYPES

pytestmark = pytest.mark.usefixtures("pg")

INSERT = sa.text(
    "INSERT INTO sms_session_events (account_id, session_no, type, occurred_at) "
    "VALUES (1, :no, 'session.resolved', now()) RETURNING id"
)
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def _round(sent: list[dict[str, Any]]) -> events.DeliveryReport:
    def send(payload: dict[str, Any], _at: datetime) -> str | None:
        sent.extend(payload["events"])
        return None

    return events.deliver(
        session_factory=db.session_scope,
        destination="webhook",
        send=send,
        now=lambda: NOW,
        types=DEFAULT_EVENT_TYPES,
        lease=timedelta(minutes=1),
        batch_size=100,
        retry_base=timedelta(seconds=1),
        retry_cap=timedelta(seconds=10),
        window=timedelta(hours=1),
        horizon_wait=0.05,
    )


def test_an_event_whose_transaction_commits_late_is_still_delivered_in_order() -> None:
    with db.session_scope() as session:
        events.sync_destinations(session, ["webhook"])
    sent: list[dict[str, Any]] = []
    engine = db.get_engine()
    with engine.connect() as first, engine.connect() as second:
        first.begin()
        # As every writer does (it locks the session's row first): a transaction id, then
        # an event id.
        first.execute(sa.text("SELECT pg_current_xact_id()"))
        early = first.execute(INSERT, {"no": "early"}).scalar_one()
        with second.begin():
            late = second.execute(INSERT, {"no": "late"}).scalar_one()
        assert early < late

        _round(sent)
        assert sent == [], "the later id is visible, but a cursor past it would skip `early`"
        with db.session_scope() as session:
            state = events.claim(
                session, "webhook", now=NOW, lease=timedelta(seconds=1), token="look"
            )
            assert state is not None and state.waiting and state.safe_id < early
            session.rollback()

        first.commit()
    _round(sent)
    assert [(e["id"], e["session_no"]) for e in sent] == [(early, "early"), (late, "late")]

    # And nothing again.
    _round(sent)
    assert len(sent) == 2


def test_a_round_with_no_writer_running_delivers_at_once() -> None:
    with db.session_scope() as session:
        events.sync_destinations(session, ["webhook"])
    with db.get_engine().begin() as connection:
        connection.execute(INSERT, {"no": "alone"})
    sent: list[dict[str, Any]] = []
    _round(sent)
    assert [e["session_no"] for e in sent] == ["alone"]
