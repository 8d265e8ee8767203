"""Credentials the API refuses while the worker runs (RetCode 215398): each refused poll is
recorded in ``receipts_credentials``, and until an answer comes through again the refusal
shows everywhere an operator looks: an ERROR line with the hint (at most once a minute per
process), ``receipts_credentials_failing 1``, and a ``credentials`` row in the
``stale_sessions`` view and in ``receipts stale``. The sessions keep their schedule, and
resolve once the API accepts the credentials again.

On both backends, with real polls against the simulator; the rule "failing while the last
refusal is newer than the last acceptance" is checked in Python, in the view and in the
metric over every ordering.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.cli import invoke, ok
from tests.support.databases import Configure
from tests.support.factories import stored_sessions
from tests.support.views import credentials_refused, gauge
from worker import credentials, db, poller, track_many
from worker.client import UspeedoClient
from worker.config import get_settings
from worker.models import credentials_table
from worker.simulator import Simulator
from worker.store import Claim

HINT = (
    "the AccessKey id/secret is wrong or expired: check RECEIPTS_ACCESS_KEY_ID and "
    "RECEIPTS_ACCESS_KEY_SECRET"
)


@pytest.fixture(autouse=True)
def fresh_refusal_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with a process that has logged no refusal yet."""
    monkeypatch.setattr(credentials, "REFUSALS", credentials.RefusalLog())


@pytest.fixture
def sim(configure: Configure) -> Iterator[Simulator]:
    with Simulator(access_key_id="demo", access_key_secret=RIGHT, step=0.1) as simulator:
        configure(RECEIPTS_API_URL=simulator.url)
        yield simulator


RIGHT = "demo-secret"
WRONG = "not-the-secret"


def _client(sim: Simulator, secret: str = RIGHT, **options: Any) -> UspeedoClient:
    return UspeedoClient(api_url=sim.url, access_key_id="demo", access_key_secret=secret, **options)


def _track(sim: Simulator, *numbers: str) -> None:
    sent = time.time() - 2  # due now (the first delay is 1 s), receipts visible
    sim.register(
        {
            "account_id": 1,
            "session_no": number,
            "phones": ["(852)55311111"],
            "scenario": "quick_success",
            "sent_at": sent,
        }
        for number in numbers
    )
    track_many(
        {
            "account_id": 1,
            "session_no": number,
            "phones": ["(852)55311111"],
            "sent_at": datetime.fromtimestamp(sent, UTC),
        }
        for number in numbers
    )


def _poll_due(client: UspeedoClient, *, ahead: timedelta = timedelta(0)) -> poller.PollReport:
    """One tick at now + ``ahead`` and the poll of what it claims."""
    settings = get_settings()
    claims: list[Claim] = []
    clock = lambda: datetime.now(UTC) + ahead  # noqa: E731
    poller.tick(
        session_factory=db.session_scope,
        clock=clock,
        policy=settings.poll_policy(),
        dispatch=claims.append,
        lease=settings.lease,
        tick_every=settings.tick,
    )
    [claim] = claims
    with client:
        return poller.poll(
            claim,
            session_factory=db.session_scope,
            client=client,
            clock=clock,
            policy=settings.poll_policy(),
            rng=random.Random(1),
            budget=timedelta(seconds=20),
            in_flight=timedelta(seconds=3),
        )


def _failing_gauge() -> float:
    return gauge("receipts_credentials_failing")


def _stale_kinds() -> list[str]:
    return sorted(r["kind"] for r in json.loads(ok(invoke("stale", "--json")).stdout))


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.usefixtures("database")
def test_refused_credentials_show_everywhere_until_an_answer_comes_through(
    sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _track(sim, "S1")
    assert credentials_refused() == [] and _failing_gauge() == 0

    report = _poll_due(_client(sim, secret=WRONG))
    assert (report.api_calls, report.failed) == (1, 1)
    assert [c["outcome"] for c in sim.calls()] == ["auth"], "not retried within the poll"

    # One ERROR line, with the hint.
    [error] = _errors(caplog)
    assert "RetCode 215398 'Failed to parse token'" in error and HINT in error
    assert "receipts check" in error
    assert WRONG not in caplog.text
    # The view, the command and the metric.
    [row] = credentials_refused()
    assert row["account_id"] is None and row["session_no"] is None
    assert row["last_error"].startswith("Uspeedo refused the credentials at ")
    assert "RetCode 215398 'Failed to parse token'" in row["last_error"]
    assert "RECEIPTS_ACCESS_KEY_ID" in row["last_error"]
    assert _stale_kinds() == ["credentials"]
    table = ok(invoke("stale")).stdout
    assert "credentials" in table and "Uspeedo refused the credentials" in table
    assert _failing_gauge() == 1
    # The session keeps its schedule: polled again after the interval, until the cutoff.
    session = stored_sessions()["S1"]
    assert session["state"] == "pending" and session["poll_count"] == 1
    assert session["next_poll_at"] > datetime.now(UTC)
    assert session["last_error"].startswith("credentials refused by the API: ")

    # A second refusal within the minute: recorded, not logged again.
    caplog.clear()
    _poll_due(_client(sim, secret=WRONG), ahead=timedelta(seconds=3))
    assert _errors(caplog) == []
    assert _failing_gauge() == 1
    assert stored_sessions()["S1"]["poll_count"] == 2

    # The credentials are fixed: the next answer resolves the session and clears the refusal.
    report = _poll_due(_client(sim), ahead=timedelta(seconds=6))
    assert (report.api_calls, report.resolved) == (1, 1)
    assert stored_sessions()["S1"]["state"] == "resolved"
    assert credentials_refused() == []
    assert _stale_kinds() == []
    assert _failing_gauge() == 0


@pytest.mark.usefixtures("database")
def test_other_failures_neither_raise_nor_clear_the_refusal(
    sim: Simulator, configure: Configure
) -> None:
    configure(RECEIPTS_CUTOFF="60")
    _track(sim, "S1")
    once = {"max_attempts": 1}
    sim.set_faults(http_500=1.0)
    _poll_due(_client(sim, **once))
    assert credentials_refused() == [] and _failing_gauge() == 0, "HTTP 500 is not a refusal"

    sim.set_faults()
    _poll_due(_client(sim, secret=WRONG), ahead=timedelta(seconds=3))
    assert _failing_gauge() == 1
    for later, fault in enumerate(("http_500", "retcode_server", "retcode_unknown"), start=2):
        sim.set_faults(**{fault: 1.0})
        _poll_due(_client(sim, **once), ahead=timedelta(seconds=3 * later))
        assert _failing_gauge() == 1, f"{fault} is not an acceptance"
        assert len(credentials_refused()) == 1
    assert stored_sessions()["S1"]["poll_count"] == 5


# The rule, and its two SQL twins (the view's WHERE and the metric's query), on every order.
REFUSED_AT = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
INSTANTS = (None, REFUSED_AT - timedelta(minutes=1), REFUSED_AT, REFUSED_AT + timedelta(minutes=1))


@pytest.mark.usefixtures("database")
def test_the_rule_agrees_in_python_the_view_and_the_metric() -> None:
    checked = 0
    for refused_at in (None, REFUSED_AT):
        for accepted_at in INSTANTS:
            with db.session_scope() as session:
                session.execute(sa.delete(credentials_table))
                session.execute(
                    sa.insert(credentials_table).values(
                        name="api",
                        refused_at=refused_at,
                        refusal="RetCode 215398 'Failed to parse token'" if refused_at else None,
                        accepted_at=accepted_at,
                    )
                )
            failing = credentials.is_failing(refused_at, accepted_at)
            assert failing == (
                refused_at is not None and (accepted_at is None or accepted_at < refused_at)
            )
            case = (refused_at, accepted_at)
            assert len(credentials_refused()) == int(failing), case
            assert _failing_gauge() == int(failing), case
            checked += 1
    assert checked == 8
