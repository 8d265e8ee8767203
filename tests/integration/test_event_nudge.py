"""Events sent when their history commits, not a tick later (worker/event_nudge.py), on
PostgreSQL and SQLite: a unit of work that wrote history nudges delivery once it committed, never
when it rolled back or wrote none; a delivery round says when there is more for it at once
(``DeliveryReport.more``): its last batch was full, or events committed while it held the
cursor (their nudges found it held)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.integration.test_events import FIRST, Clock, Recorder, history
from tests.support.clock import POLICY, T0
from tests.support.factories import P1, P2, escalate, poll, receipt, track
from worker import db, event_log, event_nudge, events
from worker.domain import DEFAULT_EVENT_TYPES, Result, SessionEventType
from worker.push_writer import PushWriter

pytestmark = pytest.mark.usefixtures("database")


class Counted(event_nudge.Nudger):
    """A nudger that only counts its nudges (its thread never sends)."""

    def __init__(self) -> None:
        super().__init__(lambda: None)
        self.nudges = 0

    def nudge(self) -> None:
        self.nudges += 1


@pytest.fixture
def nudger() -> Iterator[Counted]:
    counted = Counted()
    event_nudge.install(counted)
    try:
        yield counted
    finally:
        event_nudge.install(None)  # stops it


def test_a_commit_that_wrote_history_nudges_delivery(nudger: Counted) -> None:
    track({"account_id": 1, "session_no": "S1", "phones": [P1, P2]})
    assert nudger.nudges == 0, "tracking writes no history"
    poll(1, [receipt("S1", P1, Result.UNKNOW, FIRST)], FIRST)
    assert nudger.nudges == 1, "one poll, one commit, one nudge"
    escalate(T0 + POLICY.cutoff)  # a session event alone
    assert nudger.nudges == 2


def test_a_rolled_back_history_nudges_nothing(nudger: Counted) -> None:
    track({"account_id": 1, "session_no": "S1", "phones": [P1]})

    def fails_after_writing_history() -> None:
        with db.session_scope() as session:
            event_log.record_session_events(
                session,
                [event_log.session_event(1, "S1", SessionEventType.ESCALATED)],
                now=T0 + POLICY.cutoff,
            )
            raise RuntimeError("the unit of work fails after writing history")

    with pytest.raises(RuntimeError):
        fails_after_writing_history()
    assert nudger.nudges == 0


def test_a_push_writers_commit_nudges_and_a_parked_push_does_not(nudger: Counted) -> None:
    track({"account_id": 1, "session_no": "S1", "phones": [P1]})
    writer = PushWriter(session_factory=db.session_scope, clock=Clock(FIRST))
    try:
        # Untracked: kept in the inbox, no history.
        parked = writer.submit([receipt("UNTRACKED", P1, Result.SUCCESS, FIRST)], account_id=1)
        assert parked.result(timeout=30)["parked"] == 1
        assert nudger.nudges == 0
        stored = writer.submit([receipt("S1", P1, Result.SUCCESS, FIRST)], account_id=1)
        assert stored.result(timeout=30)["stored"] == 1
    finally:
        writer.stop()
    assert nudger.nudges == 1


def _round(send: Any, *, batch_size: int, max_batches: int = 50) -> events.DeliveryReport:
    with db.session_scope() as session:
        events.sync_destinations(session, ["webhook"])
    return events.deliver(
        session_factory=db.session_scope,
        destination="webhook",
        send=send,
        now=Clock(T0 + POLICY.cutoff),
        types=DEFAULT_EVENT_TYPES,
        lease=timedelta(minutes=1),
        batch_size=batch_size,
        retry_base=timedelta(seconds=30),
        retry_cap=timedelta(minutes=15),
        window=timedelta(hours=1),
        max_batches=max_batches,
    )


def test_a_round_that_filled_its_batches_asks_for_more() -> None:
    history()  # four events
    sent = Recorder()
    first = _round(sent, batch_size=1, max_batches=3)
    assert (first.delivered, first.more) == (3, True)
    last = _round(sent, batch_size=1, max_batches=3)
    assert (last.delivered, last.more) == (1, False), "caught up, nothing new: no more"
    assert len({e["id"] for e in sent.events}) == 4


def test_events_committed_while_a_round_held_the_cursor_make_it_ask_for_more() -> None:
    history()
    track({"account_id": 1, "session_no": "S3", "phones": [P1]})
    later = T0 + POLICY.cutoff - timedelta(seconds=1)

    class CommitsMeanwhile(Recorder):
        """Acknowledges the batch after another writer committed a final receipt."""

        def __call__(self, payload: dict[str, Any], at: datetime) -> str | None:
            if not self.batches:
                poll(1, [receipt("S3", P1, Result.SUCCESS, later)], later)
            return super().__call__(payload, at)

    sent = CommitsMeanwhile()
    first = _round(sent, batch_size=100)
    assert (first.delivered, first.more) == (4, True)
    second = _round(sent, batch_size=100)
    # S3's final receipt and its resolution.
    assert [(e["type"], e["session_no"]) for e in sent.batches[-1]] == [
        ("receipt.final", "S3"),
        ("session.resolved", "S3"),
    ]
    assert second.more is False


def test_a_round_that_delivered_nothing_does_not_ask_again() -> None:
    sent = Recorder()
    report = _round(sent, batch_size=100)
    assert (report.delivered, report.more) == (0, False)
    assert sent.attempts == 0
