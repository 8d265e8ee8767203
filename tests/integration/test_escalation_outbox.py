"""Escalation webhooks at function level, with an injected clock, on PostgreSQL and SQLite: the
delivery queued with each escalation (exactly once, with what support needs), a second
escalation's own delivery, retries with backoff until a 2xx and never again after it, concurrent
deliverers, and late receipts that resolve an escalated session while keeping its escalation.
Deliveries go to a real HTTP receiver on loopback."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from tests.support.clock import IN_FLIGHT, LEASE, MICROSECOND, POLICY, T0, anchored
from tests.support.factories import (
    P1,
    P2,
    P3,
    escalate,
    poll,
    queued_webhooks,
    receipt,
    stored_sessions,
    track,
)
from tests.support.processes import wait_for
from tests.support.receiver import SECRET, Receiver, expected_signature
from tests.support.views import stale, summaries
from worker import db, poller, store, webhooks
from worker.client import UspeedoClient
from worker.domain import Result
from worker.models import receipts_table
from worker.receipts import ReceiptBatch
from worker.simulator import Simulator

CUTOFF_AT = T0 + POLICY.cutoff
RETRY_BASE = timedelta(minutes=1)
RETRY_CAP = timedelta(minutes=30)
# --- the outbox and delivery, with an injected clock (both backends) ----------------------


@pytest.mark.usefixtures("database")
def test_an_escalation_queues_exactly_one_webhook_with_what_support_needs() -> None:
    track(
        {"account_id": 1, "session_no": "ESC-1", "phones": [P1, P2, P3]},
        {"account_id": 2, "session_no": "ESC-2"},
        {"account_id": 1, "session_no": "DONE", "phones": [P1]},
    )
    # Sent an hour later: not past its cutoff when the others are.
    later = T0 + timedelta(hours=1)
    track({"account_id": 1, "session_no": "LATER", "sent_at": later}, now=later)
    polled = T0 + POLICY.first_delay
    poll(
        1,
        [
            receipt("ESC-1", P1, Result.SUCCESS, polled),
            receipt("ESC-1", P2, Result.UNKNOW, polled),
            receipt("DONE", P1, Result.SUCCESS, polled),
        ],
        polled,
    )

    assert escalate(CUTOFF_AT - MICROSECOND) == []
    assert queued_webhooks() == {}
    escalated = escalate(CUTOFF_AT)
    assert sorted(e.session_no for e in escalated) == ["ESC-1", "ESC-2"]

    outbox = queued_webhooks()
    assert set(outbox) == {"escalation-1-ESC-1", "escalation-2-ESC-2"}
    row = outbox["escalation-1-ESC-1"]
    assert (row["event"], row["account_id"], row["session_no"]) == ("session.escalated", 1, "ESC-1")
    assert row["attempts"] == 0
    assert row["next_attempt_at"] == CUTOFF_AT, "due at once"
    assert row["delivered_at"] is None and row["last_error"] is None
    payload = dict(row["payload"])
    text = payload.pop("text")
    assert payload == {
        "event": "session.escalated",
        "delivery_id": "escalation-1-ESC-1",
        "account_id": 1,
        "session_no": "ESC-1",
        "sent_at": T0.isoformat(),
        "escalated_at": CUTOFF_AT.isoformat(),
        "poll_count": 1,
        "last_error": None,
        # P1 has its final receipt: only the other two are support's business.
        "unresolved_phones": [
            {"phone": P2, "last_result": "Unknow"},
            {"phone": P3, "last_result": None},
        ],
    }
    # Readable in a chat: the SessionNo to quote to Uspeedo support and the phones at stake.
    assert "ESC-1" in text and "account 1" in text
    assert P2 in text and P3 in text and P1 not in text

    other = outbox["escalation-2-ESC-2"]["payload"]
    assert other["session_no"] == "ESC-2" and other["account_id"] == 2
    assert other["unresolved_phones"] == []
    assert "ESC-2" in other["text"]

    # Escalating again, even much later, queues nothing more (LATER's own cutoff aside).
    assert escalate(CUTOFF_AT + timedelta(minutes=30)) == []
    assert queued_webhooks() == outbox
    assert [e.session_no for e in escalate(CUTOFF_AT + timedelta(hours=1))] == ["LATER"]
    assert escalate(CUTOFF_AT + timedelta(days=30)) == []
    assert set(queued_webhooks()) == {
        "escalation-1-ESC-1",
        "escalation-2-ESC-2",
        "escalation-1-LATER",
    }


@pytest.mark.usefixtures("database")
def test_a_session_escalated_a_second_time_is_a_new_alert_with_its_own_webhook() -> None:
    """Resolved by late receipts, then reopened by a phone tracked afterwards, a session is
    escalated again at the next tick. That escalation must not break the tick (it would stop
    every poll), and it is a new alert: unacknowledged, with its own delivery id, since
    receivers deduplicate on the delivery id."""
    # The second escalation happens now, for the view: its tick's heartbeat is fresh.
    t0 = anchored(POLICY.cutoff + timedelta(hours=1))
    cutoff_at = t0 + POLICY.cutoff
    track({"account_id": 1, "session_no": "AGAIN", "phones": [P1], "sent_at": t0}, now=t0)
    polled = cutoff_at - timedelta(seconds=1)
    with db.session_scope() as session:
        claim = store.claim_batch(
            session, account_id=1, now=polled, policy=POLICY, lease_until=polled + LEASE, limit=1
        )
    assert claim is not None
    with db.session_scope() as session:
        targets = store.start_poll(
            session, claim=claim, now=polled, policy=POLICY, busy_until=polled + IN_FLIGHT
        )
    assert len(escalate(cutoff_at)) == 1
    with db.session_scope() as session:
        store.acknowledge(session, ["AGAIN"], now=cutoff_at, note="first")
    answered = cutoff_at + timedelta(seconds=1)
    with db.session_scope() as session:
        store.record_answer(
            session,
            targets=targets,
            receipts=[receipt("AGAIN", P1, Result.SUCCESS, polled)],
            problems={},
            now=answered,
            policy=POLICY,
            rng=random.Random(1),
        )
    assert stored_sessions()["AGAIN"]["state"] == "resolved"
    first = queued_webhooks()

    later = cutoff_at + timedelta(hours=1)
    track({"account_id": 1, "session_no": "AGAIN", "phones": [P2], "sent_at": t0}, now=later)
    assert stored_sessions()["AGAIN"]["state"] == "pending"
    claims: list[store.Claim] = []
    report = poller.tick(
        session_factory=db.session_scope,
        clock=lambda: later,
        policy=POLICY,
        dispatch=claims.append,
        lease=LEASE,
        tick_every=timedelta(seconds=30),
        outbox=True,
    )
    assert report.escalated == 1 and claims == []

    row = stored_sessions()["AGAIN"]
    assert row["state"] == "escalated" and row["escalated_at"] == later
    assert (row["acknowledged_at"], row["ack_note"]) == (None, None)
    assert stale() == [("escalated", 1, "AGAIN")]
    outbox = queued_webhooks()
    assert outbox["escalation-1-AGAIN"] == first["escalation-1-AGAIN"], "the first one stays"
    (again,) = (r for i, r in outbox.items() if i != "escalation-1-AGAIN")
    assert again["delivery_id"].startswith("escalation-1-AGAIN-")
    assert again["payload"]["delivery_id"] == again["delivery_id"]
    assert again["payload"]["escalated_at"] == later.isoformat()
    assert again["payload"]["unresolved_phones"] == [{"phone": P2, "last_result": None}]
    assert again["delivered_at"] is None and again["next_attempt_at"] == later


@pytest.mark.usefixtures("database")
def test_a_webhook_is_retried_with_backoff_until_a_2xx_and_never_sent_again() -> None:
    track({"account_id": 1, "session_no": "ESC-1", "phones": [P1]})
    escalate(CUTOFF_AT)
    delivery_id = "escalation-1-ESC-1"

    with Receiver(listening=False) as receiver, requests.Session() as http:

        def deliver(at: datetime, secret: str | None = SECRET) -> webhooks.DeliveryReport:
            return webhooks.deliver_due(
                session_factory=db.session_scope,
                http=http,
                url=receiver.url,
                secret=secret,
                now=lambda: at,
                lease=LEASE,
                retry_base=RETRY_BASE,
                retry_cap=RETRY_CAP,
                timeout=5,
            )

        def due(at: datetime) -> bool:
            """What the clock asks before it queues a delivery task."""
            with db.session_scope() as session:
                return webhooks.deliveries_due(session, now=at)

        assert not due(CUTOFF_AT - MICROSECOND) and due(CUTOFF_AT)

        # 1. The receiver is down (its port refuses connections).
        assert deliver(CUTOFF_AT) == webhooks.DeliveryReport(delivered=0, failed=1)
        row = queued_webhooks()[delivery_id]
        assert row["delivered_at"] is None
        assert row["attempts"] == 1
        assert "ConnectionError" in row["last_error"]
        assert row["next_attempt_at"] == CUTOFF_AT + RETRY_BASE
        # Not tried again before the backoff has passed.
        assert not due(CUTOFF_AT + RETRY_BASE - MICROSECOND)
        assert due(CUTOFF_AT + RETRY_BASE)
        assert deliver(CUTOFF_AT + RETRY_BASE - MICROSECOND).failed == 0
        assert receiver.hits() == []

        # 2. The receiver is up but failing.
        receiver.status = 500
        receiver.listen()
        second = CUTOFF_AT + RETRY_BASE
        assert deliver(second) == webhooks.DeliveryReport(delivered=0, failed=1)
        row = queued_webhooks()[delivery_id]
        assert row["delivered_at"] is None
        assert row["attempts"] == 2
        assert row["last_error"].startswith("HTTP 500")
        # The backoff doubles.
        assert row["next_attempt_at"] == second + 2 * RETRY_BASE
        assert deliver(second + 2 * RETRY_BASE - MICROSECOND).failed == 0

        # 3. The receiver accepts it.
        receiver.status = 200
        third = second + 2 * RETRY_BASE
        assert deliver(third) == webhooks.DeliveryReport(delivered=1, failed=0)
        row = queued_webhooks()[delivery_id]
        assert row["delivered_at"] == third
        assert row["attempts"] == 3
        assert row["last_error"] is None

        # 4. Delivered means done, however late the next deliverer runs.
        for later in (third, third + RETRY_CAP, third + timedelta(days=365)):
            assert not due(later)
            assert deliver(later) == webhooks.DeliveryReport(delivered=0, failed=0)

        hits = receiver.hits()
        assert [h.status for h in hits] == [500, 200]
        assert [h.delivery_id for h in hits if h.ok] == [delivery_id]
        for hit, at in zip(hits, (second, third), strict=True):
            assert hit.delivery_id == delivery_id
            assert hit.event == "session.escalated"
            assert hit.content_type == "application/json"
            # Signed at the attempt's instant by the injected clock.
            assert hit.signature == expected_signature(hit.body, int(at.timestamp()))
            assert hit.payload == row["payload"]
        # A retry sends the very same bytes, so a receiver can deduplicate on them too, but
        # signed afresh: a receiver that refuses old signatures still takes a late retry.
        assert hits[0].body == hits[1].body
        assert hits[0].signed_at != hits[1].signed_at

        # Without a secret, no signature header is sent.
        later = T0 + timedelta(hours=1)
        track({"account_id": 1, "session_no": "UNSIGNED", "sent_at": later}, now=later)
        later_cutoff = later + POLICY.cutoff
        escalate(later_cutoff)
        assert deliver(later_cutoff, secret=None).delivered == 1
        unsigned = receiver.hits()[-1]
        assert unsigned.delivery_id == "escalation-1-UNSIGNED"
        assert unsigned.signature is None
    assert len(receiver.hits()) == 3


@pytest.mark.postgres
@pytest.mark.usefixtures("pg")
def test_two_deliverers_at_once_never_post_the_same_webhook_twice() -> None:
    count = 40
    track(*({"account_id": 1 + i % 3, "session_no": f"C{i:03d}"} for i in range(count)))
    assert len(escalate(CUTOFF_AT)) == count
    # A fixed clock: each row is due once, and its lease then keeps it from being due again,
    # so only the claim (FOR UPDATE SKIP LOCKED) stands between two deliverers.
    at = CUTOFF_AT + timedelta(minutes=1)
    start = threading.Barrier(2)
    delivered: dict[str, int] = {}
    errors: list[BaseException] = []

    def deliverer(name: str) -> None:
        total = 0
        try:
            with requests.Session() as http:
                start.wait(timeout=10)
                while True:
                    report = webhooks.deliver_due(
                        session_factory=db.session_scope,
                        http=http,
                        url=receiver.url,
                        secret=SECRET,
                        now=lambda: at,
                        lease=LEASE,
                        retry_base=RETRY_BASE,
                        retry_cap=RETRY_CAP,
                        timeout=5,
                        limit=4,  # small batches, so that the two interleave many times
                    )
                    total += report.delivered
                    assert report.failed == 0
                    if not report.delivered:
                        break
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        delivered[name] = total

    # A slow receiver, so that one deliverer's POSTs overlap the other's claims and POSTs.
    with Receiver(delay=0.05) as receiver:
        threads = [threading.Thread(target=deliverer, args=(n,)) for n in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
        assert not any(t.is_alive() for t in threads), "a deliverer hung"
    assert not errors, errors
    hits = receiver.hits()
    per_id = Counter(h.delivery_id for h in hits)
    assert len(per_id) == count
    assert [i for i, n in per_id.items() if n > 1] == [], "a webhook was POSTed twice"
    signature_at = int(at.timestamp())
    assert all(h.ok and h.signature == expected_signature(h.body, signature_at) for h in hits)
    assert sum(delivered.values()) == count
    # Both really worked, at the same time.
    assert min(delivered.values()) > 0, delivered
    assert receiver.max_in_flight == 2
    rows = queued_webhooks().values()
    assert all(r["delivered_at"] == at and r["attempts"] == 1 for r in rows)


@pytest.mark.postgres
@pytest.mark.usefixtures("pg")
def test_a_batch_outlasting_its_lease_is_not_posted_again_by_the_next_deliverer() -> None:
    """A deliverer claims its batch for one lease, then POSTs it row after row. When a slow
    receiver makes the batch outlast the lease, the next deliverer (the next tick's task)
    claims the rows not sent yet: from then on each row must be POSTed by one of them only."""
    count = 6
    now = datetime.now(UTC)
    sent = now - POLICY.cutoff - timedelta(minutes=1)
    track(
        *({"account_id": 1, "session_no": f"S{i}", "sent_at": sent} for i in range(count)),
        now=now,
    )
    assert len(escalate(now)) == count
    first_done = threading.Event()

    def deliver(http: requests.Session) -> webhooks.DeliveryReport:
        return webhooks.deliver_due(
            session_factory=db.session_scope,
            http=http,
            url=receiver.url,
            secret=SECRET,
            now=lambda: datetime.now(UTC),
            lease=timedelta(seconds=0.5),  # shorter than the batch takes: 6 x 0.3 s
            retry_base=RETRY_BASE,
            retry_cap=RETRY_CAP,
            timeout=5,
        )

    def first() -> None:
        with requests.Session() as http:
            http.headers["User-Agent"] = "first"
            deliver(http)
        first_done.set()

    def all_delivered() -> bool:
        return all(r["delivered_at"] is not None for r in queued_webhooks().values())

    with Receiver(delay=0.3) as receiver:
        thread = threading.Thread(target=first)
        thread.start()
        # The first deliverer has claimed the whole batch once its first POST arrives.
        wait_for(lambda: len(receiver.hits()) > 0, timeout=5, interval=0.01)
        # The next deliverers, one after the other, until nothing is left to deliver.
        with requests.Session() as http:
            http.headers["User-Agent"] = "next"
            deadline = time.monotonic() + 15
            while not (first_done.is_set() and all_delivered()):
                assert time.monotonic() < deadline, "the webhooks were not all delivered"
                deliver(http)
                time.sleep(0.05)  # the pace of ticks, much faster than real ones
        thread.join(timeout=10)
    hits = receiver.hits()
    per_id = Counter(h.delivery_id for h in hits)
    assert len(per_id) == count and all(h.ok for h in hits)
    assert {i: n for i, n in per_id.items() if n > 1} == {}, "a webhook was POSTed twice"
    # The situation really arose: both deliverers POSTed part of the batch.
    assert {h.user_agent for h in hits} == {"first", "next"}


# --- late receipts ----------------------------------------------------------------------


class Clock:
    """An injected clock, shared by the worker's functions, the API client and the simulator."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def unix(self) -> float:
        return self.at.timestamp()


class AnswerArrivesLate(UspeedoClient):
    """The real client; once the API has answered, and before the poller records the answer,
    ``meanwhile`` runs: what happens while a poll is in flight."""

    def __init__(self, *, meanwhile: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._meanwhile = meanwhile

    def get_send_receipts(
        self, account_id: int, session_nos: Sequence[str], *, deadline: float | None = None
    ) -> ReceiptBatch:
        batch = super().get_send_receipts(account_id, session_nos, deadline=deadline)
        self._meanwhile()
        return batch


@pytest.mark.usefixtures("database")
def test_late_receipts_resolve_an_escalated_session_and_keep_its_escalation() -> None:
    # Escalated now, for the view (it is read while the poll is in flight, and after).
    t0 = anchored(POLICY.cutoff)
    cutoff_at = t0 + POLICY.cutoff
    track({"account_id": 1, "session_no": "LATE", "phones": [P1, P2], "sent_at": t0}, now=t0)
    clock = Clock(cutoff_at - timedelta(seconds=1))
    escalated: list[store.Escalation] = []
    stale_in_flight: list[tuple[str, int | None, str | None]] = []

    def tick_meanwhile() -> None:
        # A tick escalates the session while its poll is in flight; the answer is recorded
        # one second after the cutoff.
        escalated.extend(escalate(cutoff_at))
        stale_in_flight.extend(stale())
        clock.at = cutoff_at + timedelta(seconds=1)

    with Simulator(step=1.0, clock=clock.unix) as sim:
        sim.register(
            [
                {
                    "account_id": 1,
                    "session_no": "LATE",
                    "phones": [P1, P2],
                    "scenario": "quick_success",
                    "sent_at": t0.timestamp(),
                }
            ]
        )
        with db.session_scope() as session:
            claim = store.claim_batch(
                session,
                account_id=1,
                now=clock(),
                policy=POLICY,
                lease_until=clock() + LEASE,
                limit=100,
            )
        assert claim is not None
        client = AnswerArrivesLate(
            meanwhile=tick_meanwhile,
            api_url=sim.url,
            access_key_id="demo",
            access_key_secret="demo-secret",
            clock=clock.unix,
            max_attempts=1,
        )
        with client:
            report = poller.poll(
                claim,
                session_factory=db.session_scope,
                client=client,
                clock=clock,
                policy=POLICY,
                rng=random.Random(1),
                budget=timedelta(seconds=60),
                in_flight=IN_FLIGHT,
            )
        assert len(sim.calls()) == 1, "polled once, just before the cutoff"

    assert [e.session_no for e in escalated] == ["LATE"]
    assert stale_in_flight == [("escalated", 1, "LATE")]
    assert report.polled == 1 and report.resolved == 1
    row = stored_sessions()["LATE"]
    assert row["state"] == "resolved"
    assert row["escalated_at"] == cutoff_at, "the escalation stays on record"
    assert row["resolved_at"] == cutoff_at + timedelta(seconds=1)
    assert row["next_poll_at"] is None
    assert row["poll_count"] == 1
    with db.session_scope() as session:
        results = dict(
            session.execute(sa.select(receipts_table.c.phone, receipts_table.c.result)).all()
        )
    assert results == {P1: "Success", P2: "Success"}
    with db.session_scope() as session:
        late = session.scalar(
            sa.text("SELECT resolved_late FROM session_summary WHERE session_no = 'LATE'")
        )
    assert bool(late) is True
    assert summaries()["LATE"][:4] == (2, 2, 2, 2)
    assert stale() == [], "a resolved session is no longer stale"
