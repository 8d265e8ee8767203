"""Receipts from the API to the tables, through the real client, parser, poller and store: an
oversized or meaningless receipt costs only itself, is named in its session's ``last_error``,
and never blocks the receipts that come after it."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import responses
import sqlalchemy as sa

from worker import db, poller, store
from worker.client import UspeedoClient
from worker.models import receipts_table, sessions_table
from worker.schedule import PollPolicy
from worker.tracking import parse_requests, track_requests

# A fixed instant: these tests compare nothing with the database's clock.
T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
POLICY = PollPolicy(
    first_delay=timedelta(minutes=5),
    interval_min=timedelta(minutes=5),
    interval_max=timedelta(minutes=10),
    cutoff=timedelta(hours=12),
)
URL = "https://api.test.invalid/api"
P1, P2 = "(852)55311111", "(852)55311112"
SENT = int(T0.timestamp()) + 60  # a ReceiptTime shortly after the send


@pytest.fixture
def api() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock() as mock:
        yield mock


def _track(*rows: dict[str, Any]) -> None:
    requests = parse_requests([{"account_id": 1, "sent_at": T0, **row} for row in rows], now=T0)
    with db.session_scope() as session:
        track_requests(session, requests, policy=POLICY, now=T0)


def _receipt(phone: Any, result: str = "Success", at: Any = SENT, **extra: Any) -> dict[str, Any]:
    return {"Phone": phone, "ReceiptResult": result, "ReceiptTime": at, **extra}


def _poll(
    api: responses.RequestsMock, answer: dict[str, list[dict[str, Any]]], now: datetime
) -> poller.PollReport:
    """Make every session due at ``now``, and poll them with the API giving ``answer``
    (receipts per SessionNo)."""
    with db.session_scope() as session:
        session.execute(
            sa.update(sessions_table)
            .where(sessions_table.c.state == "pending")
            .values(next_poll_at=now, last_polled_at=None)
        )
    api.post(
        URL,
        json={
            "RetCode": 0,
            "Data": [{"SessionNo": s, "ReceiptSet": r} for s, r in answer.items()],
        },
    )
    with db.session_scope() as session:
        claim = store.claim_batch(
            session,
            account_id=1,
            now=now,
            policy=POLICY,
            lease_until=now + timedelta(minutes=5),
            limit=100,
        )
    assert claim is not None
    client = UspeedoClient(
        api_url=URL,
        access_key_id="id",
        access_key_secret="secret",
        max_attempts=1,
        clock=now.timestamp,
    )
    return poller.poll(
        claim,
        session_factory=db.session_scope,
        client=client,
        clock=lambda: now,
        policy=POLICY,
        rng=random.Random(1),
        budget=timedelta(seconds=60),
        in_flight=timedelta(minutes=7),
    )


def _sessions() -> dict[str, dict[str, Any]]:
    with db.session_scope() as session:
        rows = session.execute(sa.select(sessions_table)).mappings()
        return {row["session_no"]: dict(row) for row in rows}


def _receipts() -> dict[tuple[str, str], dict[str, Any]]:
    with db.session_scope() as session:
        rows = session.execute(sa.select(receipts_table)).mappings()
        return {(row["session_no"], row["phone_key"]): dict(row) for row in rows}


@pytest.mark.postgres
@pytest.mark.usefixtures("pg")
def test_a_phone_of_3000_digits_costs_the_other_sessions_of_its_batch_nothing(
    api: responses.RequestsMock,
) -> None:
    """PostgreSQL refuses an index row that large: the receipt is refused by the parser
    instead, so its own session keeps its good receipt and the write is never bisected."""
    _track(*({"session_no": f"S{i:02d}", "phones": [P1]} for i in range(100)))
    answer = {f"S{i:02d}": [_receipt(P1)] for i in range(100)}
    # Random digits: a run of one digit compresses below the index's limit.
    digits = "".join(random.Random(3).choices("0123456789", k=3000))
    answer["S07"].append(_receipt(digits))
    now = T0 + POLICY.first_delay

    report = _poll(api, answer, now)

    assert report.api_calls == 1
    assert report.failed == 0
    assert report.resolved == 100
    assert report.receipts_written == 100
    sessions = _sessions()
    assert all(row["state"] == "resolved" for row in sessions.values())
    error = sessions["S07"]["last_error"]
    assert "ReceiptSet[1]: Phone" in error and "at most 20" in error
    assert "database" not in error
    assert digits[:100] not in error
    assert all(sessions[f"S{i:02d}"]["last_error"] is None for i in range(100) if i != 7)
    assert len(_receipts()) == 100


@pytest.mark.usefixtures("database")
def test_a_receipt_whose_phone_has_no_digits_is_named_in_last_error(
    api: responses.RequestsMock,
) -> None:
    _track({"session_no": "S1"})
    report = _poll(api, {"S1": [_receipt("QbPtKJPa")]}, T0 + POLICY.first_delay)
    assert report.receipts_written == 0
    row = _sessions()["S1"]
    assert row["state"] == "pending"
    assert "Phone: no digits" in row["last_error"]


@pytest.mark.usefixtures("database")
def test_a_receipt_time_in_year_9999_is_refused_and_later_receipts_still_land(
    api: responses.RequestsMock,
) -> None:
    """Stored, a receipt of year 9999 would be newer than anything that can follow it."""
    _track({"session_no": "S1", "phones": [P1, P2]})
    now = T0 + POLICY.first_delay
    _poll(api, {"S1": [_receipt(P1, "Unknow", 253_402_300_799), _receipt(P2)]}, now)
    assert "ReceiptTime" in _sessions()["S1"]["last_error"]
    assert ("S1", "85255311111") not in _receipts()

    later = now + POLICY.interval_max
    _poll(api, {"S1": [_receipt(P1, "Unknow", SENT + 600, ReceiptDesc="queued")]}, later)
    stored = _receipts()[("S1", "85255311111")]
    assert stored["receipt_desc"] == "queued"
    assert stored["receipt_time"] == datetime.fromtimestamp(SENT + 600, UTC)
    assert _sessions()["S1"]["last_error"] is None


@pytest.mark.usefixtures("database")
def test_a_receipt_in_full_width_digits_resolves_the_tracked_phone(
    api: responses.RequestsMock,
) -> None:
    _track({"session_no": "S1", "phones": [P1]})
    wide = "".join(chr(0xFF10 + int(d)) for d in "85255311111")
    report = _poll(api, {"S1": [_receipt(wide)]}, T0 + POLICY.first_delay)
    assert report.resolved == 1
    assert _sessions()["S1"]["state"] == "resolved"
    stored = _receipts()[("S1", "85255311111")]
    assert stored["phone"] == P1, "stored under the tracked spelling"


@pytest.mark.usefixtures("database")
def test_a_receipt_without_a_time_does_not_replace_a_timed_one_of_the_same_kind(
    api: responses.RequestsMock,
) -> None:
    _track({"session_no": "S1", "phones": [P1, P2]})
    now = T0 + POLICY.first_delay
    _poll(api, {"S1": [_receipt(P1, "Success", SENT)]}, now)
    _poll(api, {"S1": [_receipt(P1, "Fail", 0)]}, now + POLICY.interval_max)
    stored = _receipts()[("S1", "85255311111")]
    assert stored["result"] == "Success"
    assert stored["receipt_time"] == datetime.fromtimestamp(SENT, UTC)
