"""``worker.status()``: what an application reads back about a session it handed over, as a
typed, frozen record with its receipts, on PostgreSQL and SQLite; ``receipts status`` reads
the same record."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from datetime import UTC, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

import worker
from tests.support import factories
from tests.support.cli import invoke, ok
from tests.support.clock import POLICY, T0
from tests.support.factories import P1, P2, P3, receipt
from worker import db
from worker.domain import Result, SessionState
from worker.models import sessions_table

ROOT = Path(__file__).resolve().parents[2]


def _poll_and_escalate() -> None:
    """S1: P1 Success, P2 Unknow, P3 never reported, then escalated at the cutoff."""
    factories.track(
        {"account_id": 7, "session_no": "S1", "phones": [P1, P2, P3], "user_ref": "order-1"}
    )
    first = T0 + POLICY.first_delay
    factories.poll(
        7,
        [
            receipt("S1", P1, Result.SUCCESS, first - timedelta(seconds=30), cost=2),
            receipt("S1", "+852 5531 1112", Result.UNKNOW, None),
        ],
        first,
    )
    factories.escalate(T0 + POLICY.cutoff)


@pytest.mark.usefixtures("database")
def test_status_is_a_typed_record_with_the_session_and_its_receipts() -> None:
    _poll_and_escalate()
    found = worker.status("S1")
    assert isinstance(found, worker.SessionStatus)
    assert found.account_id == 7 and found.session_no == "S1"
    assert found.state is SessionState.ESCALATED
    assert found.phones == (P1, P2, P3)
    assert found.user_ref == "order-1"
    assert found.sent_at == T0
    assert found.escalated_at == T0 + POLICY.cutoff
    assert found.next_poll_at is None and found.resolved_at is None
    assert found.poll_count == 1
    assert found.acknowledged_at is None and found.ack_note is None

    # Ordered by phone; the receipt spelled differently is stored under the tracked spelling.
    success, unknow = found.receipts
    assert isinstance(success, worker.PhoneReceipt)
    assert (success.phone, success.phone_key, success.result) == (P1, "85255311111", Result.SUCCESS)
    assert success.result is Result.SUCCESS and success.final
    assert success.receipt_time == T0 + POLICY.first_delay - timedelta(seconds=30)
    assert success.cost_count == 2
    assert (success.account_id, success.session_no) == (7, "S1")
    assert (unknow.phone, unknow.result, unknow.final) == (P2, Result.UNKNOW, False)
    assert unknow.receipt_time is None

    # What support needs, typed: the phones without a final receipt and their last result.
    assert found.escalation_detail is not None
    assert [(p.phone, p.last_result) for p in found.escalation_detail.phones] == [
        (P2, Result.UNKNOW),
        (P3, None),
    ]
    assert found.escalation_detail.poll_count == 1

    # A phone's receipt, found by its digits whatever the spelling asked with.
    assert found.receipt_for("+852 5531-1111") == success
    assert found.receipt_for(P3) is None


@pytest.mark.usefixtures("database")
def test_records_are_frozen_slotted_and_their_times_timezone_aware() -> None:
    _poll_and_escalate()
    worker.acknowledge(["S1"], note="ticket 42")
    found = worker.status("S1", account_id=7)
    assert found.acknowledged_at is not None and found.ack_note == "ticket 42"
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.state = SessionState.RESOLVED  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        found.receipts[0].result = Result.FAIL  # type: ignore[misc]
    assert not hasattr(found, "__dict__") and not hasattr(found.receipts[0], "__dict__")
    times = [
        getattr(record, f.name)
        for record in (found, *found.receipts)
        for f in dataclasses.fields(record)
        if f.name.endswith("_at") or f.name == "receipt_time"
    ]
    stamped = [t for t in times if t is not None]
    assert len(stamped) >= 8
    assert all(t.tzinfo is not None and t.utcoffset() == timedelta(0) for t in stamped)
    # Every field is documented where it is declared (the records module's docstrings).
    for record in (worker.SessionStatus, worker.PhoneReceipt):
        assert record.__doc__ and all(f.name in record.__doc__ for f in dataclasses.fields(record))


@pytest.mark.usefixtures("database")
def test_status_of_an_unknown_or_ambiguous_session_no_raises_session_not_found() -> None:
    factories.track({"account_id": 7, "session_no": "S1"}, {"account_id": 8, "session_no": "S1"})
    with pytest.raises(worker.SessionNotFound, match="'NOPE' is not tracked"):
        worker.status("NOPE")
    with pytest.raises(worker.SessionNotFound, match="accounts 7, 8"):
        worker.status("S1")
    with pytest.raises(worker.SessionNotFound, match="not tracked"):
        worker.status("S1", account_id=9)
    assert worker.status("S1", account_id=8).account_id == 8
    assert worker.status("S1", account_id=8).receipts == ()
    assert worker.status("S1", account_id=8).escalation_detail is None


@pytest.mark.usefixtures("database")
def test_receipts_status_shows_what_worker_status_returns() -> None:
    _poll_and_escalate()
    found = worker.status("S1")
    shown = json.loads(ok(invoke("status", "S1", "--json")).stdout)
    assert shown["state"] == found.state == "escalated"
    assert shown["phones"] == list(found.phones)
    assert shown["escalation_detail"] == {
        "phones": [
            {"phone": P2, "last_result": "Unknow"},
            {"phone": P3, "last_result": None},
        ],
        "poll_count": 1,
        "last_error": None,
    }
    assert [r["phone"] for r in shown["receipts"]] == [r.phone for r in found.receipts]
    assert shown["receipts"][0]["receipt_time"] == found.receipts[0].receipt_time.isoformat()
    for internal in ("id", "claim_token", "claimed_at", "held_by"):
        assert internal not in shown


@pytest.mark.usefixtures("database")
def test_a_session_tracked_without_phones_reads_back_with_none() -> None:
    factories.track({"account_id": 7, "session_no": "S9"})
    with db.session_scope() as session:
        stored = session.execute(
            sa.select(sessions_table.c.sent_at).where(sessions_table.c.session_no == "S9")
        ).scalar_one()
    found = worker.status("S9")
    assert found.phones == () and found.receipts == ()
    assert found.state is SessionState.PENDING
    assert found.sent_at == stored and found.sent_at.tzinfo == UTC


def test_importing_worker_stays_cheap_and_the_read_api_is_exported_lazily() -> None:
    code = (
        "import sys, worker\n"
        "assert 'sqlalchemy' not in sys.modules, 'import worker pulled SQLAlchemy'\n"
        "assert {'status', 'SessionStatus', 'PhoneReceipt'} <= set(worker.__all__)\n"
        "print(worker.status.__module__, worker.SessionStatus.__module__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["worker.api", "worker.records"]
