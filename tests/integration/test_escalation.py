"""Escalation, end to end: the webhook queued with each escalation, its signed delivery to a
real HTTP receiver on loopback (at least once, never again after a 2xx), late receipts after
an escalation, the ``stale_sessions`` and ``session_summary`` views and the commands reading
them, and the beat's liveness as the views report it.

The first tests call the functions directly with an injected clock, on PostgreSQL and SQLite;
the last ones run real ``receipts worker`` and ``receipts beat`` processes on Redis and
PostgreSQL with timings scaled to seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import random
import shutil
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from click.testing import CliRunner
from click.testing import Result as CliResult

from tests.conftest import Configure
from tests.integration.harness import processes, wait_for
from tests.support.servers import PrivateRedis
from worker import db, poller, store, track_many, webhooks
from worker.cli import main
from worker.client import UspeedoClient
from worker.domain import Result
from worker.models import (
    UTCDateTime,
    heartbeats_table,
    outbox_table,
    receipts_table,
    sessions_table,
)
from worker.receipts import Receipt, ReceiptBatch
from worker.schedule import PollPolicy
from worker.simulator import Simulator
from worker.tracking import parse_requests, track_requests

# A fixed instant for the tests that no real clock sees. The views compare with the database's
# own clock: a test that reads them takes its T0 from _anchored() instead.
T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
POLICY = PollPolicy(
    first_delay=timedelta(minutes=5),
    interval_min=timedelta(minutes=5),
    interval_max=timedelta(minutes=10),
    cutoff=timedelta(hours=12),
)
CUTOFF_AT = T0 + POLICY.cutoff
LEASE = timedelta(minutes=5)
IN_FLIGHT = timedelta(minutes=7)
RETRY_BASE = timedelta(minutes=1)
RETRY_CAP = timedelta(minutes=30)
SECRET = "whsec-escalation-test"
P1, P2, P3 = "(852)55311111", "(852)55311112", "(852)55311113"
MICROSECOND = timedelta(microseconds=1)


# --- a webhook receiver on loopback -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hit:
    """One request the receiver got, and what it answered."""

    at: float  # unix time the body had arrived
    delivery_id: str | None
    event: str | None
    signature: str | None
    content_type: str | None
    user_agent: str | None  # tells the deliverers of one test apart
    body: bytes
    status: int

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def payload(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Receiver:
    """An escalation webhook receiver on a loopback port, recording every request.

    The port is bound when the receiver is built but only listens after ``listen()``: until
    then a connection is refused, as by a receiver that is down. It answers ``status``, or
    503 to requests arriving before ``up_at`` (unix time) when that is set, and can take
    ``delay`` seconds per request so that concurrent senders overlap.
    """

    def __init__(self, *, listening: bool = True, status: int = 200, delay: float = 0.0) -> None:
        self.status = status
        self.up_at: float | None = None
        self.delay = delay
        self.max_in_flight = 0
        self._in_flight = 0
        self._hits: list[Hit] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(
            ("127.0.0.1", 0), self._handler(), bind_and_activate=False
        )
        self._server.server_bind()
        self._thread: threading.Thread | None = None
        if listening:
            self.listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/hooks/escalations"

    def listen(self) -> None:
        self._server.server_activate()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="webhook-receiver",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def hits(self) -> list[Hit]:
        with self._lock:
            return list(self._hits)

    def _record(self, headers: Any, body: bytes) -> int:
        arrived = time.time()
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            status = 503 if self.up_at is not None and arrived < self.up_at else self.status
            hit = Hit(
                at=arrived,
                delivery_id=headers.get("X-Receipts-Delivery"),
                event=headers.get("X-Receipts-Event"),
                signature=headers.get("X-Receipts-Signature"),
                content_type=headers.get("Content-Type"),
                user_agent=headers.get("User-Agent"),
                body=body,
                status=status,
            )
            # Recorded before answering: once the sender has its answer, the hit is visible.
            with self._lock:
                self._hits.append(hit)
            return status
        finally:
            with self._lock:
                self._in_flight -= 1

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = receiver._record(self.headers, body)
                answer = b"thanks" if 200 <= status < 300 else b"receiver unavailable"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass  # keep pytest's output for failures

        return Handler


def expected_signature(body: bytes, secret: str = SECRET) -> str:
    """The signature computed here, independently of worker.webhooks.sign."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# --- helpers --------------------------------------------------------------------------------


def _db_now() -> datetime:
    """The database's clock, the one the ``stale_sessions`` view compares with."""
    with db.session_scope() as session:
        now = session.scalar(sa.select(sa.func.current_timestamp(type_=UTCDateTime())))
    assert now is not None
    return now


def _anchored(now_at: timedelta) -> datetime:
    """A T0 for a test whose instants meet the views: T0 + ``now_at`` is the database's time
    now (to the second), so the test's "now" is the view's now whatever today's date."""
    return _db_now().replace(microsecond=0) - now_at


def _track(*rows: dict[str, Any], now: datetime = T0, policy: PollPolicy = POLICY) -> None:
    requests_ = parse_requests([{"sent_at": T0, **row} for row in rows], now=now)
    with db.session_scope() as session:
        track_requests(session, requests_, policy=policy, now=now)


def _receipt(session_no: str, phone: str, result: Result, at: datetime, cost: int = 1) -> Receipt:
    return Receipt(
        session_no=session_no,
        phone=phone,
        result=result,
        receipt_code="c",
        receipt_desc="d",
        receipt_time=at,
        cost_count=cost,
        user_id=None,
        country_code=None,
    )


def _poll(
    account_id: int, receipts: list[Receipt], now: datetime, policy: PollPolicy = POLICY
) -> store.PollOutcome:
    """One whole poll of the account's due sessions at ``now``, answered with ``receipts``."""
    with db.session_scope() as session:
        claim = store.claim_batch(
            session,
            account_id=account_id,
            now=now,
            policy=policy,
            lease_until=now + LEASE,
            limit=100,
        )
    assert claim is not None
    with db.session_scope() as session:
        targets = store.start_poll(
            session, claim=claim, now=now, policy=policy, busy_until=now + IN_FLIGHT
        )
    with db.session_scope() as session:
        return store.record_answer(
            session,
            targets=targets,
            receipts=receipts,
            problems={},
            now=now,
            policy=policy,
            rng=random.Random(1),
        )


def _escalate(now: datetime, policy: PollPolicy = POLICY) -> list[store.Escalation]:
    with db.session_scope() as session:
        escalations = store.escalate_due(session, now=now, policy=policy)
        webhooks.queue_escalations(session, escalations, now=now)
        return escalations


def _sessions() -> dict[str, dict[str, Any]]:
    with db.session_scope() as session:
        rows = session.execute(sa.select(sessions_table)).mappings()
        return {row["session_no"]: dict(row) for row in rows}


def _outbox() -> dict[str, dict[str, Any]]:
    with db.session_scope() as session:
        rows = session.execute(sa.select(outbox_table).order_by(outbox_table.c.id)).mappings()
        return {row["delivery_id"]: dict(row) for row in rows}


def _stale() -> list[tuple[str, int | None, str | None]]:
    """The ``stale_sessions`` view as users query it, in plain SQL."""
    with db.session_scope() as session:
        rows = session.execute(
            sa.text(
                "SELECT kind, account_id, session_no FROM stale_sessions ORDER BY kind, session_no"
            )
        )
        return [(r.kind, r.account_id, r.session_no) for r in rows]


def _clock_stopped() -> list[dict[str, Any]]:
    with db.session_scope() as session:
        rows = session.execute(
            sa.text("SELECT * FROM stale_sessions WHERE kind = 'clock_stopped'")
        ).mappings()
        return [dict(r) for r in rows]


SUMMARY_COLUMNS = (
    "phones_tracked",
    "phones_reported",
    "phones_final",
    "phones_successful",
    "cost",
    "resolved_late",
)


def _summary() -> dict[str, tuple[int, ...]]:
    """``session_summary`` in plain SQL; SQLite's booleans are 0/1, hence the int()."""
    with db.session_scope() as session:
        rows = session.execute(
            sa.text(f"SELECT session_no, {', '.join(SUMMARY_COLUMNS)} FROM session_summary")
        ).mappings()
        return {r["session_no"]: tuple(int(r[c]) for c in SUMMARY_COLUMNS) for r in rows}


def _heartbeat() -> datetime | None:
    with db.session_scope() as session:
        return session.scalar(
            sa.select(heartbeats_table.c.beat_at).where(heartbeats_table.c.name == "tick")
        )


def _invoke(*args: str) -> CliResult:
    # Wide enough that rich never wraps or elides a table cell.
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "250"})


def _ok(result: CliResult) -> CliResult:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


# --- the outbox and delivery, with an injected clock (both backends) ----------------------


@pytest.mark.usefixtures("database")
def test_an_escalation_queues_exactly_one_webhook_with_what_support_needs() -> None:
    _track(
        {"account_id": 1, "session_no": "ESC-1", "phones": [P1, P2, P3]},
        {"account_id": 2, "session_no": "ESC-2"},
        {"account_id": 1, "session_no": "DONE", "phones": [P1]},
    )
    # Sent an hour later: not past its cutoff when the others are.
    later = T0 + timedelta(hours=1)
    _track({"account_id": 1, "session_no": "LATER", "sent_at": later}, now=later)
    polled = T0 + POLICY.first_delay
    _poll(
        1,
        [
            _receipt("ESC-1", P1, Result.SUCCESS, polled),
            _receipt("ESC-1", P2, Result.UNKNOW, polled),
            _receipt("DONE", P1, Result.SUCCESS, polled),
        ],
        polled,
    )

    assert _escalate(CUTOFF_AT - MICROSECOND) == []
    assert _outbox() == {}
    escalated = _escalate(CUTOFF_AT)
    assert sorted(e.session_no for e in escalated) == ["ESC-1", "ESC-2"]

    outbox = _outbox()
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
    assert _escalate(CUTOFF_AT + timedelta(minutes=30)) == []
    assert _outbox() == outbox
    assert [e.session_no for e in _escalate(CUTOFF_AT + timedelta(hours=1))] == ["LATER"]
    assert _escalate(CUTOFF_AT + timedelta(days=30)) == []
    assert set(_outbox()) == {"escalation-1-ESC-1", "escalation-2-ESC-2", "escalation-1-LATER"}


@pytest.mark.usefixtures("database")
def test_a_session_escalated_a_second_time_is_a_new_alert_with_its_own_webhook() -> None:
    """Resolved by late receipts, then reopened by a phone tracked afterwards, a session is
    escalated again at the next tick. That escalation must not break the tick (it would stop
    every poll), and it is a new alert: unacknowledged, with its own delivery id, since
    receivers deduplicate on the delivery id."""
    # The second escalation happens now, for the view: its tick's heartbeat is fresh.
    t0 = _anchored(POLICY.cutoff + timedelta(hours=1))
    cutoff_at = t0 + POLICY.cutoff
    _track({"account_id": 1, "session_no": "AGAIN", "phones": [P1], "sent_at": t0}, now=t0)
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
    assert len(_escalate(cutoff_at)) == 1
    with db.session_scope() as session:
        store.acknowledge(session, ["AGAIN"], now=cutoff_at, note="first")
    answered = cutoff_at + timedelta(seconds=1)
    with db.session_scope() as session:
        store.record_answer(
            session,
            targets=targets,
            receipts=[_receipt("AGAIN", P1, Result.SUCCESS, polled)],
            problems={},
            now=answered,
            policy=POLICY,
            rng=random.Random(1),
        )
    assert _sessions()["AGAIN"]["state"] == "resolved"
    first = _outbox()

    later = cutoff_at + timedelta(hours=1)
    _track({"account_id": 1, "session_no": "AGAIN", "phones": [P2], "sent_at": t0}, now=later)
    assert _sessions()["AGAIN"]["state"] == "pending"
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

    row = _sessions()["AGAIN"]
    assert row["state"] == "escalated" and row["escalated_at"] == later
    assert (row["acknowledged_at"], row["ack_note"]) == (None, None)
    assert _stale() == [("escalated", 1, "AGAIN")]
    outbox = _outbox()
    assert outbox["escalation-1-AGAIN"] == first["escalation-1-AGAIN"], "the first one stays"
    (again,) = (r for i, r in outbox.items() if i != "escalation-1-AGAIN")
    assert again["delivery_id"].startswith("escalation-1-AGAIN-")
    assert again["payload"]["delivery_id"] == again["delivery_id"]
    assert again["payload"]["escalated_at"] == later.isoformat()
    assert again["payload"]["unresolved_phones"] == [{"phone": P2, "last_result": None}]
    assert again["delivered_at"] is None and again["next_attempt_at"] == later


@pytest.mark.usefixtures("database")
def test_a_webhook_is_retried_with_backoff_until_a_2xx_and_never_sent_again() -> None:
    _track({"account_id": 1, "session_no": "ESC-1", "phones": [P1]})
    _escalate(CUTOFF_AT)
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
        row = _outbox()[delivery_id]
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
        row = _outbox()[delivery_id]
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
        row = _outbox()[delivery_id]
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
        for hit in hits:
            assert hit.delivery_id == delivery_id
            assert hit.event == "session.escalated"
            assert hit.content_type == "application/json"
            assert hit.signature == expected_signature(hit.body)
            assert hit.payload == row["payload"]
        # A retry sends the very same bytes, so a receiver can deduplicate on them too.
        assert hits[0].body == hits[1].body

        # Without a secret, no signature header is sent.
        later = T0 + timedelta(hours=1)
        _track({"account_id": 1, "session_no": "UNSIGNED", "sent_at": later}, now=later)
        later_cutoff = later + POLICY.cutoff
        _escalate(later_cutoff)
        assert deliver(later_cutoff, secret=None).delivered == 1
        unsigned = receiver.hits()[-1]
        assert unsigned.delivery_id == "escalation-1-UNSIGNED"
        assert unsigned.signature is None
    assert len(receiver.hits()) == 3


@pytest.mark.postgres
@pytest.mark.usefixtures("pg")
def test_two_deliverers_at_once_never_post_the_same_webhook_twice() -> None:
    count = 40
    _track(*({"account_id": 1 + i % 3, "session_no": f"C{i:03d}"} for i in range(count)))
    assert len(_escalate(CUTOFF_AT)) == count
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
    assert all(h.ok and h.signature == expected_signature(h.body) for h in hits)
    assert sum(delivered.values()) == count
    # Both really worked, at the same time.
    assert min(delivered.values()) > 0, delivered
    assert receiver.max_in_flight == 2
    rows = _outbox().values()
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
    _track(
        *({"account_id": 1, "session_no": f"S{i}", "sent_at": sent} for i in range(count)),
        now=now,
    )
    assert len(_escalate(now)) == count
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
        return all(r["delivered_at"] is not None for r in _outbox().values())

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
    t0 = _anchored(POLICY.cutoff)
    cutoff_at = t0 + POLICY.cutoff
    _track({"account_id": 1, "session_no": "LATE", "phones": [P1, P2], "sent_at": t0}, now=t0)
    clock = Clock(cutoff_at - timedelta(seconds=1))
    escalated: list[store.Escalation] = []
    stale_in_flight: list[tuple[str, int | None, str | None]] = []

    def tick_meanwhile() -> None:
        # A tick escalates the session while its poll is in flight; the answer is recorded
        # one second after the cutoff.
        escalated.extend(_escalate(cutoff_at))
        stale_in_flight.extend(_stale())
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
    row = _sessions()["LATE"]
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
    assert _summary()["LATE"][:4] == (2, 2, 2, 2)
    assert _stale() == [], "a resolved session is no longer stale"


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
    _track(
        {"account_id": 7, "session_no": "ESC-OPEN", "phones": [P1, P2], "sent_at": long_ago},
        {"account_id": 7, "session_no": "ESC-ACKED", "sent_at": long_ago},
        {"account_id": 7, "session_no": "OVERDUE", "sent_at": recently},
        {"account_id": 7, "session_no": "FRESH", "phones": [P1, P2, P3], "sent_at": recently},
        now=now,
        policy=policy,
    )
    # FRESH gets two receipts (one final) and its next poll a little ahead.
    _poll(
        7,
        [
            _receipt("FRESH", P1, Result.SUCCESS, now, cost=2),
            _receipt("FRESH", P2, Result.UNKNOW, now, cost=1),
        ],
        now,
        policy,
    )
    assert {e.session_no for e in _escalate(now, policy)} == {"ESC-OPEN", "ESC-ACKED"}
    with db.session_scope() as session:
        store.acknowledge(session, ["ESC-ACKED"], now=now, note="handled")
        # Overdue by 5 minutes: more than 2 x 60 s, the heartbeat's interval, but less than
        # 2 x 600 s, the view's default when no tick has recorded the real timing yet.
        session.execute(
            sa.update(sessions_table)
            .where(sessions_table.c.session_no == "OVERDUE")
            .values(next_poll_at=now - timedelta(minutes=5))
        )
    assert _stale() == [("escalated", 7, "ESC-OPEN")], "no heartbeat yet: the default applies"
    with db.session_scope() as session:
        store.record_heartbeat(session, name="tick", now=now, tick=tick, interval_max=interval_max)

    expected = [("escalated", 7, "ESC-OPEN"), ("overdue", 7, "OVERDUE")]
    assert _stale() == expected
    listed = json.loads(_ok(_invoke("stale", "--json")).stdout)
    assert sorted((r["kind"], r["account_id"], r["session_no"]) for r in listed) == expected
    by_no = {r["session_no"]: r for r in listed}
    assert by_no["ESC-OPEN"]["phones"] == [
        {"phone": P1, "last_result": None},
        {"phone": P2, "last_result": None},
    ]
    assert by_no["OVERDUE"]["state"] == "pending"
    assert _invoke("stale", "--fail").exit_code == 1

    # Refused acknowledgements change nothing, all or none.
    before = _sessions()
    for args, problem in (
        (("NOPE",), "'NOPE' is not tracked"),
        (("FRESH",), "'FRESH' is pending, not escalated"),
        (("ESC-OPEN", "NOPE"), "'NOPE' is not tracked"),
        (("ESC-OPEN", "OVERDUE", "--note", "x"), "'OVERDUE' is pending, not escalated"),
    ):
        result = _invoke("ack", *args)
        assert result.exit_code == 1, (args, result.output)
        assert "nothing was acknowledged" in result.stderr
        assert problem in result.stderr
        assert _sessions() == before, args
    assert _stale() == expected

    result = _ok(_invoke("ack", "ESC-OPEN", "--note", "ticket 42"))
    assert "acknowledged 1 escalation(s)" in result.output
    row = _sessions()["ESC-OPEN"]
    assert row["ack_note"] == "ticket 42"
    assert row["acknowledged_at"] is not None
    assert abs(row["acknowledged_at"] - datetime.now(UTC)) < timedelta(minutes=1)
    assert row["state"] == "escalated", "acknowledged, still escalated"
    assert _stale() == [("overdue", 7, "OVERDUE")]
    assert [r["session_no"] for r in json.loads(_ok(_invoke("stale", "--json")).stdout)] == [
        "OVERDUE"
    ]
    _ok(_invoke("stale", "--fail"))
    # Acknowledging twice keeps the first acknowledgement.
    acked = _sessions()["ESC-ACKED"]
    _ok(_invoke("ack", "ESC-ACKED", "--note", "again"))
    again = _sessions()["ESC-ACKED"]
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
    assert _clock_stopped() == []
    beat_at(tick * 1.6)
    stopped = _clock_stopped()
    assert len(stopped) == 1
    assert stopped[0]["session_no"] is None and stopped[0]["account_id"] is None
    assert stopped[0]["last_error"].startswith("no tick processed since")
    kinds = sorted(r["kind"] for r in json.loads(_ok(_invoke("stale", "--json")).stdout))
    assert kinds == ["clock_stopped", "overdue"]
    with db.session_scope() as session:
        store.record_heartbeat(
            session, name="tick", now=datetime.now(UTC), tick=tick, interval_max=interval_max
        )
    assert _clock_stopped() == []
    assert _stale() == [("overdue", 7, "OVERDUE")]

    # session_summary counts exactly: tracked, reported, final, successful, cost, late.
    summary = _summary()
    assert summary["FRESH"] == (3, 2, 1, 1, 3, 0)
    assert summary["ESC-OPEN"] == (2, 0, 0, 0, 0, 0)
    assert summary["OVERDUE"] == (0, 0, 0, 0, 0, 0)


# --- real processes ---------------------------------------------------------------------

TICK = 1.0
CUTOFF = 5.0
SLACK = 1.0  # scheduling and network latency on loopback
RECEIVER_DOWN_FOR = 3.0  # seconds after the cutoff
PROCESS_TIMINGS = {
    "RECEIPTS_TICK": "1",
    "RECEIPTS_FIRST_POLL_DELAY": "1",
    "RECEIPTS_POLL_INTERVAL_MIN": "1",
    "RECEIPTS_POLL_INTERVAL_MAX": "2",
    "RECEIPTS_CUTOFF": "5",
    "RECEIPTS_POLL_BUDGET": "2",
    "RECEIPTS_WEBHOOK_TIMEOUT": "1",
}


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> Iterator[str]:
    """A Redis server of this test's own (tests/support/servers.py), so that no other run's
    workers take this test's tasks nor its beats tick this test's worker. Falls back to this
    run's db of the shared server when no redis-server binary is installed."""
    if shutil.which("redis-server") is None:
        yield request.getfixturevalue("redis_url")
        return
    with PrivateRedis() as server:
        yield server.url()


def _process_env(pg: str, broker: str, api_url: str, **extra: str) -> dict[str, str]:
    return {
        **PROCESS_TIMINGS,
        "RECEIPTS_DATABASE_URL": pg,
        "RECEIPTS_BROKER_URL": broker,
        "RECEIPTS_API_URL": api_url,
        "RECEIPTS_ACCESS_KEY_ID": "demo",
        "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
        **extra,
    }


def _count_pending() -> int:
    with db.session_scope() as session:
        query = sa.select(sa.func.count()).where(sessions_table.c.state == "pending")
        return session.scalar(query) or 0


@contextmanager
def _clock_running(configure: Configure, env: dict[str, str], folder: Path) -> Iterator[Any]:
    """One worker and one beat, yielded once the first tick has been processed."""
    configure(**env)
    with processes(env, folder) as group:
        group.worker()
        group.beat()
        wait_for(lambda: _heartbeat() is not None, timeout=20, describe=group.logs)
        yield group


def _ticks_after(mark: datetime, ticks: int) -> Callable[[], bool]:
    def passed() -> bool:
        beat = _heartbeat()
        return beat is not None and beat >= mark + timedelta(seconds=ticks * TICK)

    return passed


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("receiver_down_first", [True, False], ids=["receiver-down", "receiver-up"])
def test_escalations_reach_a_real_receiver_once_each(
    configure: Configure, pg: str, broker: str, tmp_path: Path, receiver_down_first: bool
) -> None:
    with Simulator(step=0.5, seed=5) as sim, Receiver() as receiver:
        env = _process_env(
            pg,
            broker,
            sim.url,
            RECEIPTS_ESCALATION_WEBHOOK_URL=receiver.url,
            RECEIPTS_WEBHOOK_SECRET=SECRET,
        )
        with _clock_running(configure, env, tmp_path) as group:
            # Sent once the clock runs, so that every time below is measured from the cutoff.
            sent = time.time()
            cutoff = sent + CUTOFF
            up_at = cutoff + RECEIVER_DOWN_FOR if receiver_down_first else sent
            receiver.up_at = up_at
            sessions = {f"NEVER-{i:02d}": "never" for i in range(10)}
            sessions |= {f"QUICK-{i:02d}": "quick_success" for i in range(10)}
            phones = {no: [f"+8525531{i:04d}"] for i, no in enumerate(sessions)}
            sim.register(
                {
                    "account_id": 1,
                    "session_no": no,
                    "phones": phones[no],
                    "scenario": scenario,
                    "sent_at": sent,
                }
                for no, scenario in sessions.items()
            )
            track_many(
                {
                    "account_id": 1,
                    "session_no": no,
                    "phones": phones[no],
                    "sent_at": datetime.fromtimestamp(sent, UTC),
                }
                for no in sessions
            )
            never = {f"escalation-1-{no}" for no, s in sessions.items() if s == "never"}

            def delivered() -> set[str | None]:
                return {h.delivery_id for h in receiver.hits() if h.ok}

            wait_for(
                lambda: _count_pending() == 0 and delivered() >= never,
                timeout=25,
                describe=lambda: (
                    f"{_count_pending()} pending, delivered {sorted(map(str, delivered()))}\n"
                    f"{group.logs()}"
                ),
            )
            # Two more ticks, each followed by a delivery run: time for a duplicate to show.
            mark = _heartbeat()
            assert mark is not None
            wait_for(_ticks_after(mark, 2), timeout=10, describe=group.logs)

    states = {no: row["state"] for no, row in _sessions().items()}
    assert states == {
        no: ("escalated" if s == "never" else "resolved") for no, s in sessions.items()
    }
    hits = receiver.hits()
    by_id: dict[str, list[Hit]] = defaultdict(list)
    for hit in hits:
        assert hit.signature == expected_signature(hit.body), hit
        assert hit.event == "session.escalated"
        assert hit.payload["delivery_id"] == hit.delivery_id
        by_id[str(hit.delivery_id)].append(hit)
    assert set(by_id) == never, "one delivery per escalated session, none for resolved ones"
    outbox = _outbox()
    for delivery_id, attempts in by_id.items():
        assert [h.ok for h in attempts].count(True) == 1, (delivery_id, attempts)
        assert attempts[-1].ok, "nothing is sent after the 2xx"
        row = outbox[delivery_id]
        assert row["delivered_at"] is not None
        assert row["attempts"] == len(attempts)
        assert attempts[0].at >= cutoff, "not before the cutoff"
        failures = attempts[:-1]
        success = attempts[-1]
        if not receiver_down_first:
            assert failures == []
            assert success.at <= cutoff + 2 * TICK + SLACK, (delivery_id, success.at - cutoff)
            continue
        # Attempts made while the receiver was down failed; each retry waited out its backoff
        # (one tick, doubling: worker.tasks gives it the tick as its base). Once the receiver
        # is up, the delivery comes with the first round the backoff allows: within two
        # ticks of the receiver coming up for a webhook that was not in backoff then.
        assert all(h.at < up_at for h in failures) and success.at >= up_at
        for n, (before, after) in enumerate(itertools.pairwise(attempts), 1):
            backoff = TICK * 2 ** (n - 1)
            assert after.at - before.at >= backoff - 0.01, (delivery_id, n, after.at - before.at)
        next_allowed = failures[-1].at + TICK * 2 ** (len(failures) - 1) if failures else up_at
        latest = max(up_at, next_allowed) + 2 * TICK + SLACK
        assert success.at <= latest, (delivery_id, success.at - up_at, len(failures))
    if receiver_down_first:
        assert any(len(a) > 1 for a in by_id.values()), "the receiver was really down for some"


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_a_stopped_beat_shows_in_the_stale_view_within_two_ticks(
    configure: Configure, pg: str, broker: str, tmp_path: Path
) -> None:
    # Nothing is tracked: the API is never called.
    env = _process_env(pg, broker, "http://127.0.0.1:9/api")
    with _clock_running(configure, env, tmp_path) as group:
        first = _heartbeat()
        assert first is not None
        ticked = _ticks_after(first, 2)

        def running_and_never_reported_stopped() -> bool:
            assert _clock_stopped() == [], group.logs()
            return ticked()

        wait_for(running_and_never_reported_stopped, timeout=10, interval=0.1, describe=group.logs)

        beat = next(p for name, p in group.running if name == "beat")
        killed = time.monotonic()
        group.stop(beat, kill=True)
        deadline = killed + 2 * TICK + SLACK
        # Polled a little past the bound, so that a miss reports how late it was.
        wait_for(lambda: _clock_stopped() != [], timeout=2 * TICK + SLACK + 3, interval=0.05)
        noticed = time.monotonic()
        assert noticed <= deadline, f"clock_stopped after {noticed - killed:.2f}s"
        stopped = _clock_stopped()
        assert len(stopped) == 1
        assert stopped[0]["last_error"].startswith("no tick processed since")
