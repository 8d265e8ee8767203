"""Every HTTP attempt is bounded as a whole, however slowly the other side answers.

``requests``' timeouts bound each socket read, not the exchange: a peer that sends one byte
well inside the read timeout, again and again, keeps a call alive for as long as it likes.
These tests trickle answers from real loopback servers (``slow_http``) at the API client, at
``receipts repoll`` and at the webhook deliverers, and check that each attempt ends at its
bound, that a deliverer outlived by its lease records nothing, and that no webhook is ever
being delivered twice at once.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from click.testing import CliRunner

from tests.support.databases import Configure
from tests.support.processes import wait_for
from tests.support.slow_http import SlowServer
from worker import bounded_http, db, poller, runtime, track_many, webhooks
from worker.cli import main
from worker.client import UspeedoClient
from worker.config import get_settings
from worker.errors import TransportError
from worker.models import outbox_table, sessions_table

# Scheduling noise on a loaded two-core machine, on top of each bound.
SLACK = 0.3


@pytest.fixture(autouse=True)
def _fresh_runtime() -> Iterator[None]:
    """The process's API client and webhook session are built from the settings of each test."""
    runtime.reset()
    yield
    runtime.reset()


def _client(url: str, **options: Any) -> UspeedoClient:
    return UspeedoClient(
        api_url=url, access_key_id="demo", access_key_secret="demo-secret", **options
    )


# --- the API client -------------------------------------------------------------------------


@pytest.mark.parametrize("trickle", ["status", "body"])
def test_an_api_attempt_ends_at_its_bound_however_slowly_the_answer_trickles(
    trickle: str,
) -> None:
    # A byte every ~50 ms: no read ever waits near the 1.5 s read timeout; the answer takes 8 s.
    with (
        SlowServer(trickle=trickle, over=8.0) as api,
        _client(api.url, connect_timeout=0.5, read_timeout=1.5, max_attempts=1) as client,
    ):
        started = time.monotonic()
        error: TransportError | None = None
        try:
            client.get_send_receipts(1, ["s1"])
        except TransportError as exc:
            error = exc
        elapsed = time.monotonic() - started
    # The attempt's bound is its connect and read timeouts together: 2 s.
    assert elapsed <= 2.0 + SLACK, f"the attempt ran {elapsed:.2f}s"
    assert error is not None and error.retryable
    assert "2s" in str(error), str(error)


def test_an_api_attempt_ends_at_the_polls_deadline() -> None:
    with (
        SlowServer(trickle="body", over=8.0) as api,
        _client(
            api.url, connect_timeout=0.5, read_timeout=1.5, max_attempts=3, backoff_base=0.1
        ) as client,
    ):
        started = time.monotonic()
        error: TransportError | None = None
        try:
            client.get_send_receipts(1, ["s1"], deadline=time.time() + 1.0)
        except TransportError as exc:
            error = exc
        elapsed = time.monotonic() - started
        exchanges = api.exchanges()
    assert error is not None or elapsed > 1.0 + SLACK
    assert elapsed <= 1.0 + SLACK, f"the call ran {elapsed:.2f}s past a 1 s deadline"
    assert all(e.started - started < 1.0 for e in exchanges), "an attempt started too late"


def _bounded_post(url: str, within: float) -> float:
    """Seconds one bounded POST to ``url`` took (it must time out)."""
    started = time.monotonic()
    with bounded_http.new_session() as session, pytest.raises(bounded_http.AttemptTimedOut):
        bounded_http.post(
            session,
            url,
            data=b"{}",
            headers={},
            within=within,
            connect_timeout=within,
            read_timeout=within,
            limit=1 << 20,
        )
    return time.monotonic() - started


def test_a_shorter_attempt_started_later_ends_at_its_own_bound() -> None:
    # One watchdog thread serves every attempt of the process: a new, nearer deadline must
    # wake it from waiting for a farther one.
    with SlowServer(trickle="body", over=8.0) as api:
        long_one: list[float] = []
        first = threading.Thread(target=lambda: long_one.append(_bounded_post(api.url, 3.0)))
        first.start()
        wait_for(lambda: len(api.exchanges()) == 1, timeout=5, interval=0.02)
        short = _bounded_post(api.url, 1.0)
        first.join(timeout=10)
    assert short <= 1.0 + SLACK, f"the 1 s attempt ran {short:.2f}s"
    assert long_one and 3.0 - SLACK <= long_one[0] <= 3.0 + SLACK, long_one


def _post_in_child(url: str, answer: Any) -> None:
    answer.put(_bounded_post(url, 1.0))


def test_an_attempt_in_a_forked_process_is_bounded_too() -> None:
    # A Celery pool process is forked from a parent whose watchdog thread it does not have.
    with SlowServer(trickle="body", over=8.0) as api:
        assert _bounded_post(api.url, 0.5) <= 0.5 + SLACK  # the parent's watchdog is running
        context = multiprocessing.get_context("fork")
        answer = context.Queue()
        child = context.Process(target=_post_in_child, args=(api.url, answer))
        child.start()
        try:
            took = answer.get(timeout=10)
        finally:
            child.join(timeout=10)
    assert took <= 1.0 + SLACK, f"the forked process's attempt ran {took:.2f}s"
    assert child.exitcode == 0


@pytest.mark.usefixtures("database")
def test_repoll_ends_within_its_budget_when_the_api_trickles(configure: Configure) -> None:
    budget, bound = 2.0, 1.5
    with SlowServer(trickle="body", over=6.0) as api:
        configure(
            RECEIPTS_API_URL=api.url,
            RECEIPTS_ACCESS_KEY_ID="demo",
            RECEIPTS_ACCESS_KEY_SECRET="demo-secret",
            RECEIPTS_POLL_BUDGET=str(budget),
            RECEIPTS_API_CONNECT_TIMEOUT="0.5",
            RECEIPTS_API_READ_TIMEOUT="1",
        )
        settings = get_settings()
        sent = datetime.now(UTC) - timedelta(seconds=60)  # past the 10 s cutoff
        track_many(
            {"account_id": account, "session_no": f"R{account}", "sent_at": sent}
            for account in (1, 2, 3)
        )
        escalated = poller.tick(
            session_factory=db.session_scope,
            clock=lambda: datetime.now(UTC),
            policy=settings.poll_policy(),
            dispatch=lambda claim: None,
            lease=settings.lease,
            tick_every=settings.tick,
        ).escalated
        assert escalated == 3
        started = time.monotonic()
        # One API call per account, each trickling for 6 s.
        result = CliRunner().invoke(main, ["repoll", "R1", "R2", "R3"])
        elapsed = time.monotonic() - started
        exchanges = api.exchanges()
    assert elapsed <= budget + bound + SLACK, f"repoll ran {elapsed:.2f}s on a {budget:g}s budget"
    assert result.exit_code == 1, result.output  # some sessions got no answer
    assert "3 failed" in result.output
    # The repoll's budget starts once the command is running, a little after `started`.
    assert exchanges and all(e.started - started < budget + SLACK for e in exchanges)
    with db.session_scope() as session:
        errors = session.scalars(sa.select(sessions_table.c.last_error)).all()
    assert all(error for error in errors), errors


# --- webhook deliveries -----------------------------------------------------------------------


def _queue_one_webhook() -> None:
    now = runtime.utcnow()
    with db.session_scope() as session:
        session.execute(
            sa.insert(outbox_table).values(
                delivery_id="escalation-1-SLOW",
                event="session.escalated",
                account_id=1,
                session_no="SLOW",
                payload={"event": "session.escalated", "session_no": "SLOW"},
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )


def _outbox_row() -> dict[str, Any]:
    with db.session_scope() as session:
        return dict(session.execute(sa.select(outbox_table)).mappings().one())


@pytest.mark.parametrize("trickle", ["status", "body"])
@pytest.mark.usefixtures("database")
def test_a_receiver_trickling_its_200_never_gets_two_deliveries_at_once(
    configure: Configure, trickle: str
) -> None:
    """Two deliverers (two ticks' tasks) keep running while the receiver takes 4 s to answer;
    the timeout is 1 s, the settings' lease 2.5 s."""
    timeout = 1.0
    answer = b"thanks, we got it " * 6
    with SlowServer(body=answer, trickle=trickle, over=4.0, content_type="text/plain") as receiver:
        configure(
            RECEIPTS_ESCALATION_WEBHOOK_URL=receiver.url,
            RECEIPTS_WEBHOOK_TIMEOUT=str(timeout),
            RECEIPTS_TICK="0.5",
        )
        from worker.tasks import deliver_webhooks

        _queue_one_webhook()
        stop = time.monotonic() + 5.5
        errors: list[BaseException] = []

        def deliverer() -> None:
            try:
                while time.monotonic() < stop:
                    deliver_webhooks.run()
                    time.sleep(0.1)  # the pace of ticks, faster than real ones
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=deliverer) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
        assert not any(t.is_alive() for t in threads), "a deliverer hung"
        wait_for(
            lambda: all(e.ended is not None for e in receiver.exchanges()),
            timeout=10,
            interval=0.05,
        )
        exchanges = receiver.exchanges()
        most_at_once = receiver.max_in_flight_per_delivery
    assert not errors, errors
    row = _outbox_row()
    assert most_at_once == 1, "the same webhook was being delivered twice at once"
    assert row["attempts"] == len(exchanges), "every POST is counted, and only POSTs are"
    for exchange in exchanges:
        assert exchange.ended is not None
        lasted = exchange.ended - exchange.started
        assert lasted <= timeout + SLACK, f"a POST lasted {lasted:.2f}s"
    if trickle == "status":
        # The 200 never arrives within the timeout: every attempt failed, and was retried.
        assert len(exchanges) >= 2
        assert row["delivered_at"] is None
        assert "1s" in row["last_error"], row["last_error"]
    else:
        # The 200 arrived at once: acknowledged, however slowly the rest of the body came.
        assert len(exchanges) == 1
        assert row["delivered_at"] is not None and row["last_error"] is None


@pytest.mark.usefixtures("database")
def test_a_deliverer_that_lost_its_lease_records_nothing() -> None:
    """Deliverer A's POST outlives its (deliberately short) lease; B takes the row over and
    POSTs too. Only B, which holds the row, may record the outcome."""
    _queue_one_webhook()
    reports: dict[str, webhooks.DeliveryReport] = {}

    def deliver(name: str, shift: timedelta) -> None:
        with requests.Session() as http:
            reports[name] = webhooks.deliver_due(
                session_factory=db.session_scope,
                http=http,
                url=receiver.url,
                secret=None,
                now=lambda: datetime.now(UTC) + shift,
                lease=timedelta(seconds=0.3),
                retry_base=timedelta(seconds=30),
                retry_cap=timedelta(minutes=5),
                timeout=5,
            )

    # Each answer takes 1 s to arrive whole, a byte at a time.
    with SlowServer(body=b"ok", trickle="status", over=1.0) as receiver:
        first = threading.Thread(target=deliver, args=("a", timedelta(0)))
        first.start()
        wait_for(lambda: len(receiver.exchanges()) == 1, timeout=5, interval=0.01)
        # B runs while A's POST is in flight, on a clock past A's lease.
        deliver("b", timedelta(seconds=1))
        first.join(timeout=10)
        # The server marks an exchange complete after its last byte is sent, which can be
        # just after the client has read it.
        wait_for(lambda: all(e.completed for e in receiver.exchanges()), timeout=5, interval=0.01)
        exchanges = receiver.exchanges()
    assert not first.is_alive()
    assert len(exchanges) == 2 and all(e.completed for e in exchanges)
    assert reports["a"].delivered == 0, "A recorded a delivery after losing its lease"
    assert reports["a"].lost == 1
    assert reports["b"].delivered == 1
    row = _outbox_row()
    assert row["delivered_at"] is not None
    assert row["attempts"] == 2
    assert row["claim_token"] is None
