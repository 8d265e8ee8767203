"""The embedded defaults under load: the real `receipts run` on a SQLite file and kombu's
filesystem broker polls thousands of sessions over tens of accounts before their cutoff, with
timings scaled to seconds (driven by bench/embedded.py); a tick on the embedded broker queues
no more than the worker starts within a claim lease, longest-waiting accounts first, and says
so when due sessions are left waiting; a poll task expires with its claim's lease."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kombu import Queue
from kombu.connection import Connection

from bench import embedded
from tests.support.databases import Configure
from worker import db, poller, store, tasks
from worker.celery import (
    EMBEDDED_POLLS_PER_SECOND,
    POLL_QUEUE,
    broker_options,
    embedded_claim_bound,
    make_broker_folders,
    queued,
)
from worker.config import get_settings
from worker.schedule import PollPolicy
from worker.tracking import parse_requests, track_requests

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
POLICY = PollPolicy(
    first_delay=timedelta(minutes=5),
    interval_min=timedelta(minutes=5),
    interval_max=timedelta(minutes=10),
    cutoff=timedelta(hours=12),
)
LEASE = timedelta(minutes=5)


def _track(account_id: int, count: int, *, sent_at: datetime, prefix: str) -> None:
    rows = [
        {"account_id": account_id, "session_no": f"{prefix}{i}", "sent_at": sent_at}
        for i in range(count)
    ]
    with db.session_scope() as session:
        track_requests(session, parse_requests(rows, now=sent_at), policy=POLICY, now=sent_at)


def _tick(now: datetime, max_claims: int | None) -> tuple[poller.TickReport, list[store.Claim]]:
    claims: list[store.Claim] = []
    report = poller.tick(
        session_factory=db.session_scope,
        clock=lambda: now,
        policy=POLICY,
        dispatch=claims.append,
        lease=LEASE,
        tick_every=timedelta(seconds=30),
        max_claims=max_claims,
    )
    return report, claims


def _due(now: datetime) -> int:
    with db.read_scope() as session:
        return store.count_due(session, now=now, policy=POLICY)


@pytest.mark.usefixtures("database")
def test_a_bounded_tick_serves_the_longest_waiting_accounts_first_and_leaves_the_rest_due() -> None:
    # Account 3's sessions fell due a minute before those of accounts 1 and 2.
    _track(3, 150, sent_at=T0 - timedelta(minutes=1), prefix="c")
    _track(1, 120, sent_at=T0, prefix="a")
    _track(2, 10, sent_at=T0, prefix="b")
    now = T0 + POLICY.first_delay
    report, claims = _tick(now, max_claims=3)
    assert [(c.account_id, len(c.session_ids)) for c in claims] == [(3, 100), (3, 50), (1, 100)]
    assert report.bounded and report.claims == 3 and report.sessions_claimed == 250
    assert _due(now) == 30, "what the bound left stays due, in the database"

    # The next tick goes on where the bound stopped.
    report, claims = _tick(now, max_claims=3)
    assert [(c.account_id, len(c.session_ids)) for c in claims] == [(1, 20), (2, 10)]
    assert not report.bounded and _due(now) == 0


@pytest.mark.usefixtures("database")
def test_a_bound_of_nothing_claims_nothing_and_an_unbounded_tick_claims_every_due_session() -> None:
    _track(1, 230, sent_at=T0, prefix="a")
    now = T0 + POLICY.first_delay
    report, claims = _tick(now, max_claims=0)
    assert claims == [] and report.bounded and _due(now) == 230
    report, claims = _tick(now, max_claims=None)
    assert [len(c.session_ids) for c in claims] == [100, 100, 30]
    assert not report.bounded and _due(now) == 0


# --- the embedded broker's bound ---------------------------------------------------------


@pytest.fixture
def folder_broker(configure: Configure, tmp_path: Path) -> Path:
    """The embedded broker in a folder of this test's own."""
    configure(RECEIPTS_BROKER_DIR=str(tmp_path / "broker"), RECEIPTS_CLAIM_LEASE="3")
    make_broker_folders(get_settings())
    return tmp_path / "broker"


def _publish(count: int) -> None:
    url, options = broker_options(get_settings())
    with Connection(url, transport_options=options) as connection:
        producer = connection.Producer()
        for n in range(count):
            producer.publish({"n": n}, routing_key=POLL_QUEUE, declare=[Queue(POLL_QUEUE)])


def test_the_embedded_bound_is_what_starts_within_a_lease_less_what_is_still_queued(
    folder_broker: Path,
) -> None:
    settings = get_settings()
    can_start = int(EMBEDDED_POLLS_PER_SECOND * 3)
    assert embedded_claim_bound(settings) == can_start
    _publish(5)
    assert queued(settings, POLL_QUEUE) == 5
    assert embedded_claim_bound(settings) == can_start - 5
    _publish(can_start)
    assert embedded_claim_bound(settings) == 0


def test_a_real_broker_has_no_bound(configure: Configure) -> None:
    # Its workers can be any number: the tick claims as before (no broker is contacted).
    configure(RECEIPTS_BROKER_URL="redis://127.0.0.1:1/0")
    assert embedded_claim_bound(get_settings()) is None


@pytest.mark.usefixtures("database")
def test_ticks_left_behind_on_the_embedded_broker_warn_once_a_minute(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks, "_behind_warned_at", None)
    settings = get_settings()
    policy = settings.poll_policy()
    sent = T0 - policy.first_delay
    with caplog.at_level(logging.WARNING, logger="worker.tasks"):
        tasks._warn_embedded_behind(settings, now=T0)
        assert caplog.records == [], "nothing due, nothing to say"
        rows = [{"account_id": 1, "session_no": f"s{i}", "sent_at": sent} for i in range(7)]
        with db.session_scope() as session:
            track_requests(session, parse_requests(rows, now=sent), policy=policy, now=sent)
        tasks._warn_embedded_behind(settings, now=T0)
        tasks._warn_embedded_behind(settings, now=T0)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "embedded broker is behind: 7 due session(s)" in message
    assert f"about {EMBEDDED_POLLS_PER_SECOND} polls/s" in message
    assert "PostgreSQL and Redis" in message


def test_a_poll_task_expires_when_its_claims_lease_ends(
    configure: Configure, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(RECEIPTS_CLAIM_LEASE="7")
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(tasks.poll, "apply_async", lambda **options: sent.append(options))
    tasks._dispatch(store.Claim(account_id=4, token="t", session_ids=(1, 2)))
    [options] = sent
    assert options["kwargs"] == {"account_id": 4, "session_ids": [1, 2], "token": "t"}
    assert options["expires"] == 7.0


# --- the whole path ------------------------------------------------------------------------


@pytest.mark.slow
def test_receipts_run_on_the_embedded_defaults_polls_thousands_of_sessions_in_time(
    tmp_path: Path,
) -> None:
    """3,000 resolvable sessions over 30 accounts, the README Demo's timings (cutoff 40 s):
    before the fix the worker took 2 messages/s, re-issued claims while their tasks waited, and
    escalated most sessions without a single poll."""
    outcome = embedded.run(
        sessions=3000,
        accounts=30,
        timings=embedded.TIMINGS["demo"],
        folder=tmp_path,
        settle=10,
    )
    summary = outcome.summary()
    assert outcome.worker_exit is None, outcome.log[-3000:]
    assert outcome.escalated_unpolled == 0, summary
    assert outcome.escalated_resolvable == 0, summary
    assert outcome.states == {"resolved": 3000}, summary
    assert outcome.rule_breaks == [], summary
    assert outcome.wrongly_resolved == 0, summary
    # Every session was asked for at least once, and each call named one account's sessions.
    assert outcome.sessions_asked >= 3000 and outcome.api_calls >= 30, summary
