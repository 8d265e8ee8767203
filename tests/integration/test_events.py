"""Events to the sender's application, at function level with an injected clock, on PostgreSQL
and SQLite: which events a history yields and in what order, batches of bounded size, retries
with backoff, parking after the retry window (and the stream going on after it), and the
webhook destination against a real receiver on loopback."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from tests.support.clock import POLICY, T0
from tests.support.factories import P1, P2, escalate, poll, receipt, track
from tests.support.receiver import SECRET, Receiver
from worker import db, events
from worker.domain import DEFAULT_EVENT_TYPES, EventType, Result
from worker.models import event_cursors_table, parked_batches_table

pytestmark = pytest.mark.usefixtures("database")

FIRST = T0 + POLICY.first_delay
SECOND = FIRST + POLICY.interval_max
WINDOW = timedelta(hours=1)
BASE = timedelta(seconds=30)


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


class Recorder:
    """A sender that records the batches it acknowledges; ``fail`` makes it refuse them."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.fail: str | None = None
        self.attempts = 0

    def __call__(self, payload: dict[str, Any], _at: datetime) -> str | None:
        self.attempts += 1
        if self.fail:
            return self.fail
        self.batches.append(payload["events"])
        return None

    @property
    def events(self) -> list[dict[str, Any]]:
        return [event for batch in self.batches for event in batch]


def deliver(
    send: Callable[[dict[str, Any], datetime], str | None],
    now: datetime,
    *,
    types: frozenset[EventType] = DEFAULT_EVENT_TYPES,
    batch_size: int = 100,
) -> events.DeliveryReport:
    with db.session_scope() as session:
        events.sync_destinations(session, ["webhook"])
    return events.deliver(
        session_factory=db.session_scope,
        destination="webhook",
        send=send,
        now=Clock(now),
        types=types,
        lease=timedelta(minutes=1),
        batch_size=batch_size,
        retry_base=BASE,
        retry_cap=timedelta(minutes=15),
        window=WINDOW,
    )


def history() -> None:
    """S1: P1 Unknow then Success, P2 Fail (resolved at the second poll); S2: escalated."""
    track(
        {"account_id": 1, "session_no": "S1", "phones": [P1, P2], "user_ref": "order-1"},
        {"account_id": 1, "session_no": "S2", "phones": [P1]},
    )
    poll(1, [receipt("S1", P1, Result.UNKNOW, FIRST), receipt("S1", P2, Result.FAIL, FIRST)], FIRST)
    poll(1, [receipt("S1", P1, Result.SUCCESS, SECOND)], SECOND)
    escalate(T0 + POLICY.cutoff)


def cursor() -> dict[str, Any]:
    with db.session_scope() as session:
        return dict(session.execute(sa.select(event_cursors_table)).mappings().one())


def parked() -> list[dict[str, Any]]:
    with db.session_scope() as session:
        return [dict(r) for r in session.execute(sa.select(parked_batches_table)).mappings()]


def test_the_default_events_of_a_history_in_order_each_with_its_facts() -> None:
    history()
    sent = Recorder()
    report = deliver(sent, T0 + POLICY.cutoff)
    got = [(e["type"], e["session_no"], e.get("phone"), e.get("result")) for e in sent.events]
    assert got == [
        ("receipt.final", "S1", P2, "Fail"),
        ("receipt.final", "S1", P1, "Success"),
        ("session.resolved", "S1", None, None),
        ("session.escalated", "S2", None, None),
    ]
    ids = [e["id"] for e in sent.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    final = sent.events[1]
    assert final["user_ref"] == "order-1"
    assert final["source"] == "poll"
    assert final["account_id"] == 1
    assert datetime.fromisoformat(final["receipt_time"]) == SECOND
    assert datetime.fromisoformat(final["occurred_at"]) == SECOND
    assert {"receipt_code", "receipt_desc", "cost_count", "user_id"} <= set(final)
    assert sent.events[2]["source"] == "poll" and sent.events[3]["source"] is None
    assert report.delivered == 4 and cursor()["delivered_events"] == 4

    # Nothing twice: a second round finds the cursor past them all.
    again = Recorder()
    deliver(again, T0 + POLICY.cutoff)
    assert again.events == []


def test_receipt_updated_adds_every_change_and_final_stays_once_per_phone() -> None:
    history()
    sent = Recorder()
    deliver(sent, T0 + POLICY.cutoff, types=frozenset(EventType))
    got = [(e["type"], e.get("phone"), e.get("result")) for e in sent.events[:3]]
    # The history writes the applied rows of one upsert in the order of their keys.
    assert sorted(got) == sorted(
        [
            ("receipt.updated", P1, "Unknow"),
            ("receipt.final", P2, "Fail"),
            ("receipt.final", P1, "Success"),
        ]
    )
    assert [e["type"] for e in sent.events].count("receipt.final") == 2


def test_batches_are_bounded_and_keep_the_order() -> None:
    history()
    sent = Recorder()
    report = deliver(sent, T0 + POLICY.cutoff, batch_size=1)
    assert [len(b) for b in sent.batches] == [1, 1, 1, 1]
    assert [e["id"] for e in sent.events] == sorted(e["id"] for e in sent.events)
    assert report.batches == 4


def test_a_run_of_rows_that_are_no_events_longer_than_a_batch_scans_is_passed_over() -> None:
    # Twelve receipts not final (history rows, no events by default) before the first final
    # one: a batch of 2 scans 4 rows (events.SCAN_FACTOR), so the first batches find none.
    phones = [f"(852)553100{i:02d}" for i in range(12)]
    track({"account_id": 1, "session_no": "S1", "phones": phones})
    poll(1, [receipt("S1", p, Result.UNKNOW, FIRST) for p in phones], FIRST)
    poll(1, [receipt("S1", p, Result.SUCCESS, SECOND) for p in phones[:3]], SECOND)
    sent = Recorder()
    report = deliver(sent, SECOND, batch_size=2)
    assert [(e["type"], e["phone"]) for e in sent.events] == [
        ("receipt.final", p) for p in phones[:3]
    ]
    assert [len(b) for b in sent.batches] == [2, 1]
    assert report.delivered == 3
    with db.session_scope() as session:
        assert cursor()["delivered_id"] == events.last_event_id(session)


def test_a_failed_batch_backs_off_then_is_retried_until_acknowledged() -> None:
    history()
    sent = Recorder()
    sent.fail = "HTTP 500: down"
    at = T0 + POLICY.cutoff
    report = deliver(sent, at)
    assert (report.failed, report.delivered, sent.attempts) == (1, 0, 1)
    state = cursor()
    assert state["attempts"] == 1 and state["last_error"] == "HTTP 500: down"
    assert state["next_attempt_at"] == at + BASE and state["delivered_id"] == 0

    deliver(sent, at + BASE - timedelta(seconds=1))
    assert sent.attempts == 1, "backing off: not tried before its time"
    deliver(sent, at + BASE)
    assert cursor()["next_attempt_at"] == at + BASE + 2 * BASE, "exponential"

    sent.fail = None
    report = deliver(sent, at + 3 * BASE)
    assert report.delivered == 4 and len(sent.batches) == 1
    state = cursor()
    assert (state["attempts"], state["last_error"], state["next_attempt_at"]) == (0, None, None)


def test_a_batch_failing_for_the_window_is_parked_and_the_stream_goes_on() -> None:
    history()
    sent = Recorder()
    sent.fail = "HTTP 500: down"
    at = T0 + POLICY.cutoff
    deliver(sent, at, batch_size=2)
    deliver(sent, at + WINDOW - timedelta(seconds=1), batch_size=2)
    assert parked() == []
    sent.fail = "HTTP 500: still down"
    # Past the window, and past the backoff of the second attempt.
    late = at + WINDOW + 2 * BASE
    report = deliver(sent, late, batch_size=2)
    assert report.parked == 1
    [batch] = parked()
    assert (batch["events"], batch["state"], batch["attempts"]) == (2, "parked", 3)
    assert batch["first_failed_at"] == at and batch["last_error"] == "HTTP 500: still down"
    assert cursor()["delivered_id"] == batch["through_id"]

    # The round went on with the next batch, which starts its own retries afresh.
    state = cursor()
    assert (state["attempts"], state["next_attempt_at"]) == (1, late + BASE)
    sent.fail = None
    deliver(sent, late + BASE, batch_size=2)
    assert [e["type"] for e in sent.events] == ["session.resolved", "session.escalated"]
    assert all(e["id"] > batch["through_id"] for e in sent.events)


def test_a_held_cursor_is_not_taken_by_a_second_deliverer() -> None:
    history()
    with db.session_scope() as session:
        events.sync_destinations(session, ["webhook"])
    with db.session_scope() as session:
        first = events.claim(session, "webhook", now=T0, lease=timedelta(minutes=1), token="first")
    assert first is not None
    with db.session_scope() as session:
        assert (
            events.claim(session, "webhook", now=T0, lease=timedelta(minutes=1), token="x") is None
        )
    # Once its lease has run out it is free again, and the first holder's outcome is refused.
    with db.session_scope() as session:
        later = events.claim(
            session,
            "webhook",
            now=T0 + timedelta(minutes=1),
            lease=timedelta(minutes=1),
            token="second",
        )
    assert later is not None
    batch = events.Batch(after_id=0, through_id=first.safe_id, events=[])
    with db.session_scope() as session:
        assert not events.record_delivered(session, first, batch, now=T0)


def test_a_round_keeps_the_cursor_between_its_batches_and_renews_its_lease() -> None:
    """One claim for a round's batches: between them the cursor stays held (no second
    deliverer takes it), its lease renewed at each batch; batches that each take 40 s of a
    one-minute lease would otherwise lose it at the third."""
    history()
    with db.session_scope() as session:
        events.sync_destinations(session, ["webhook"])
    clock = Clock(T0 + POLICY.cutoff)
    taken: list[bool] = []
    tokens: set[str] = set()

    def send(payload: dict[str, Any], _at: datetime) -> str | None:
        tokens.add(cursor()["claim_token"])
        with db.session_scope() as session:
            other = events.claim(
                session, "webhook", now=clock(), lease=timedelta(minutes=1), token="other"
            )
        taken.append(other is not None)
        clock.at += timedelta(seconds=40)
        return None

    report = events.deliver(
        session_factory=db.session_scope,
        destination="webhook",
        send=send,
        now=clock,
        types=DEFAULT_EVENT_TYPES,
        lease=timedelta(minutes=1),
        batch_size=1,
        retry_base=BASE,
        retry_cap=timedelta(minutes=15),
        window=WINDOW,
    )
    assert (report.batches, report.lost) == (4, 0)
    assert len(tokens) == 1  # one claim for the round
    assert taken == [False] * 4
    assert cursor()["claim_token"] is None  # released at the end of the round


def test_the_clock_knows_which_destinations_wait() -> None:
    with db.session_scope() as session:
        events.sync_destinations(session, ["webhook", "task"])
        assert events.waiting(session, ["webhook", "task"], now=T0) == []
    history()
    with db.session_scope() as session:
        assert events.waiting(session, ["webhook", "task"], now=T0) == ["task", "webhook"]
    with db.session_scope() as session:
        events.sync_destinations(session, ["task"])
        rows = session.execute(
            sa.select(event_cursors_table.c.destination, event_cursors_table.c.active)
        )
        assert dict(rows.all()) == {"webhook": False, "task": True}


def test_the_webhook_destination_posts_signed_batches_to_a_real_receiver() -> None:
    history()
    with Receiver(status=500) as receiver:
        http = requests.Session()
        send = events.webhook_sender(http, receiver.url, SECRET, timeout=5)
        at = T0 + POLICY.cutoff
        assert deliver(send, at).failed == 1
        assert cursor()["last_error"].startswith("HTTP 500")
        receiver.status = 200
        assert deliver(send, at + BASE).delivered == 4
        hits = receiver.hits()
        assert [h.status for h in hits] == [500, 200]
        assert hits[0].payload == hits[1].payload, "the same batch, the same ids"
        assert all(h.signed() for h in hits)
        assert hits[1].content_type == "application/json"
        assert [e["type"] for e in hits[1].payload["events"]][-1] == "session.escalated"


def test_the_exporter_reports_lag_waiting_delivered_and_parked_events() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from worker.metrics import make_registry, render

    def scrape(now: datetime) -> dict[str, float]:
        text = render(make_registry(lambda: now)).decode()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.startswith("receipts_events_")
            and sample.labels.get("destination") == "webhook"
        }

    history()
    sent = Recorder()
    sent.fail = "HTTP 500: down"
    at = T0 + POLICY.cutoff
    deliver(sent, at, batch_size=2)
    seen = scrape(at + timedelta(seconds=10))
    # The oldest change not delivered is the first poll's (FIRST).
    assert seen["receipts_events_lag_seconds"] == (at + timedelta(seconds=10) - FIRST).seconds
    assert seen["receipts_events_undelivered"] >= 4
    assert seen["receipts_events_failed_attempts"] == 1
    assert seen["receipts_events_parked"] == 0

    late = at + WINDOW + 2 * BASE
    deliver(sent, at + BASE, batch_size=2)
    sent.fail = None
    deliver(sent, late, batch_size=2)  # parks nothing: the receiver is back
    deliver(sent, late + BASE, batch_size=2)
    seen = scrape(late + BASE)
    assert seen["receipts_events_lag_seconds"] == 0
    assert seen["receipts_events_undelivered"] == 0
    assert seen["receipts_events_delivered_total"] == 4


def test_parked_batches_are_counted_by_the_exporter() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from worker.metrics import make_registry, render

    history()
    sent = Recorder()
    sent.fail = "HTTP 500: down"
    at = T0 + POLICY.cutoff
    deliver(sent, at, batch_size=2)
    deliver(sent, at + WINDOW, batch_size=2)
    text = render(make_registry(lambda: at + WINDOW)).decode()
    values = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("receipts_events_parked")
    }
    assert values == {"receipts_events_parked": 2, "receipts_events_parked_batches": 1}
