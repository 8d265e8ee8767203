"""Pushed receipts on PostgreSQL and SQLite, with an injected clock: the same rules as polled
ones (final never downgraded, older never wins, phones matched on digits, ``UNKNOWN`` is
``Unknow``), a session a push resolves is never polled again and one it leaves unresolved keeps
its schedule, and a push for a SessionNo not tracked yet waits in the inbox until it is."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.clock import POLICY, T0
from tests.support.factories import (
    P1,
    P2,
    answer,
    claim_due,
    receipt,
    started,
    stored_receipts,
    stored_sessions,
    track,
)
from worker import db, push, store
from worker.domain import ReceiptSource, Result
from worker.models import inbox_table
from worker.receipts import Receipt

pytestmark = pytest.mark.usefixtures("database")

POLLED = T0 + POLICY.first_delay
PUSHED = T0 + timedelta(seconds=20)


def _push(*receipts: Receipt, at: Any = PUSHED, account_id: int | None = None) -> push.PushOutcome:
    with db.session_scope() as session:
        return push.record_push(session, list(receipts), now=at, account_id=account_id)


def _inbox() -> list[dict[str, Any]]:
    with db.session_scope() as session:
        rows = session.execute(sa.select(inbox_table).order_by(inbox_table.c.id)).mappings()
        return [dict(row) for row in rows]


def _pushed(payload: dict[str, Any], at: Any = PUSHED) -> tuple[Receipt, ...]:
    batch = push.parse_push({"MsgType": 2, "Data": [payload]}, received_at=at)
    assert batch.skipped == ()
    return batch.receipts


def test_a_push_that_settles_a_session_resolves_it_and_it_is_never_polled_again() -> None:
    track({"account_id": 1, "session_no": "S", "phones": ["(852)55311111"]})
    # As Uspeedo pushes it: the phone as digits, the time as Unix seconds.
    receipts = _pushed(
        {
            "SessionNo": "S",
            "Phone": "85255311111",
            "ReceiptResult": "Success",
            "ReceiptTime": int(PUSHED.timestamp()),
            "ReceiptCode": "DELIVRD",
            "CostCount": 1,
        }
    )

    outcome = _push(*receipts)

    assert (outcome.applied, outcome.parked, outcome.resolved) == (1, 0, ("S",))
    row = stored_sessions()["S"]
    assert row["state"] == "resolved" and row["resolved_at"] == PUSHED
    assert row["next_poll_at"] is None
    assert (row["poll_count"], row["last_polled_at"]) == (0, None), "no poll happened"
    stored = stored_receipts()[("S", "(852)55311111")]
    assert (stored["result"], stored["source"]) == ("Success", "push")
    assert claim_due(1, POLLED) is None, "resolved: never claimed for a poll"


def test_a_push_that_leaves_a_session_unresolved_keeps_its_schedule() -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1, P2]})
    before = stored_sessions()["S"]

    _push(*_pushed({"SessionNo": "S", "Phone": "85255311111", "ReceiptResult": "UNKNOWN"}))
    _push(receipt("S", P2, Result.SUCCESS, PUSHED))

    after = stored_sessions()["S"]
    assert after["state"] == "pending"
    for column in ("next_poll_at", "last_polled_at", "poll_count", "last_error", "claim_token"):
        assert after[column] == before[column], column
    results = {k: (v["result"], v["source"]) for k, v in stored_receipts().items()}
    assert results == {("S", P1): ("Unknow", "push"), ("S", P2): ("Success", "push")}


def test_a_push_never_downgrades_a_final_receipt_nor_replaces_a_newer_one() -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1, P2]})
    targets = started(1, POLLED)
    answer(
        targets,
        [
            receipt("S", P1, Result.SUCCESS, POLLED),
            receipt("S", P2, Result.UNKNOW, POLLED),
        ],
        POLLED,
    )

    _push(
        receipt("S", P1, Result.UNKNOW, POLLED + timedelta(minutes=1)),  # non-final after final
        receipt("S", P2, Result.UNKNOW, POLLED - timedelta(minutes=1)),  # older
    )

    stored = stored_receipts()
    assert (stored[("S", P1)]["result"], stored[("S", P1)]["source"]) == ("Success", "poll")
    assert stored[("S", P2)]["receipt_time"] == POLLED
    assert stored[("S", P2)]["source"] == "poll"


def test_a_push_racing_the_poll_of_its_session_loses_nothing() -> None:
    """The push resolves the session while its poll is in flight; the poll's answer (an
    older Unknow) is stored nowhere over it, and does not reschedule a resolved session."""
    track({"account_id": 1, "session_no": "S", "phones": [P1]})
    in_flight = started(1, POLLED)

    _push(receipt("S", P1, Result.FAIL, POLLED + timedelta(seconds=1)))
    later = POLLED + timedelta(seconds=2)
    outcome = answer(in_flight, [receipt("S", P1, Result.UNKNOW, POLLED)], later)

    assert outcome.rescheduled == 0
    row = stored_sessions()["S"]
    assert row["state"] == "resolved" and row["next_poll_at"] is None
    assert row["claim_token"] is None
    stored = stored_receipts()[("S", P1)]
    assert (stored["result"], stored["source"]) == ("Fail", "push")


def test_chinese_and_odd_spellings_of_a_pushed_result_are_understood() -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1, P2]})
    receipts = _pushed({"SessionNo": "S", "Phone": "85255311111", "ReceiptResult": "发送成功"})
    receipts += _pushed({"SessionNo": "S", "Phone": "0085255311112", "ReceiptResult": "fail"})
    assert _push(*receipts).resolved == ("S",)
    results = {k[1]: v["result"] for k, v in stored_receipts().items()}
    assert results == {P1: "Success", P2: "Fail"}


def test_a_push_before_tracking_waits_in_the_inbox_and_resolves_the_session_when_tracked() -> None:
    outcome = _push(receipt("LATER", "85255311111", Result.SUCCESS, PUSHED))
    assert (outcome.applied, outcome.parked) == (0, 1)
    (parked,) = _inbox()
    assert (parked["session_no"], parked["account_id"], parked["reason"]) == (
        "LATER",
        0,
        "untracked",
    )
    # Uspeedo retries a push it got no answer to: the inbox keeps one row per phone.
    _push(receipt("LATER", "85255311111", Result.SUCCESS, PUSHED))
    assert len(_inbox()) == 1

    track(
        {"account_id": 5, "session_no": "LATER", "phones": [P1]},
        now=PUSHED + timedelta(seconds=3),
    )

    row = stored_sessions()["LATER"]
    assert row["state"] == "resolved" and row["poll_count"] == 0
    stored = stored_receipts()[("LATER", P1)]
    assert (stored["result"], stored["source"]) == ("Success", "push")
    assert _inbox() == []


def test_one_push_spanning_accounts_stores_each_receipt_under_its_own_account() -> None:
    track(
        {"account_id": 1, "session_no": "A1", "phones": [P1]},
        {"account_id": 2, "session_no": "A2", "phones": [P1, P2]},
        {"account_id": 3, "session_no": "A3", "phones": [P1]},
    )
    outcome = _push(
        receipt("A1", P1, Result.SUCCESS, PUSHED),
        receipt("A2", P1, Result.FAIL, PUSHED),
        receipt("A2", P2, Result.UNKNOW, PUSHED),  # A2 stays pending: read back, not settled
        receipt("A3", P1, Result.SUBMIT_FAIL, PUSHED),
    )
    assert (outcome.applied, outcome.parked) == (4, 0)
    assert sorted(outcome.resolved) == ["A1", "A3"]
    stored = {
        (r["account_id"], r["session_no"], r["phone"]): r["result"]
        for r in stored_receipts().values()
    }
    assert stored == {
        (1, "A1", P1): "Success",
        (2, "A2", P1): "Fail",
        (2, "A2", P2): "Unknow",
        (3, "A3", P1): "SubmitFail",
    }
    assert {no: row["state"] for no, row in stored_sessions().items()} == {
        "A1": "resolved",
        "A2": "pending",
        "A3": "resolved",
    }


def test_recording_sessions_of_several_accounts_that_share_a_session_no_is_refused() -> None:
    # Receipts name no account: they could not be told apart.
    track({"account_id": 1, "session_no": "TWICE"}, {"account_id": 2, "session_no": "TWICE"})
    with db.session_scope() as session:
        targets = push._tracked(session, ["TWICE"], None)["TWICE"]
        with pytest.raises(ValueError, match="distinct SessionNos"):
            store.record_receipts(
                session,
                targets=targets,
                receipts=[receipt("TWICE", P1, Result.SUCCESS, PUSHED)],
                now=PUSHED,
                source=ReceiptSource.PUSH,
            )


def test_a_session_no_in_two_accounts_waits_unless_the_push_names_its_account() -> None:
    track({"account_id": 1, "session_no": "TWICE"}, {"account_id": 2, "session_no": "TWICE"})

    assert _push(receipt("TWICE", P1, Result.SUCCESS, PUSHED)).parked == 1
    assert [r["reason"] for r in _inbox()] == ["ambiguous"]
    assert stored_receipts() == {}

    outcome = _push(receipt("TWICE", P2, Result.SUCCESS, PUSHED), account_id=2)

    assert (outcome.applied, outcome.parked) == (1, 0)
    assert {(r["account_id"], r["phone"]) for r in stored_receipts().values()} == {(2, P2)}


def test_a_parked_receipt_for_another_account_or_past_the_cutoff_is_not_applied() -> None:
    _push(receipt("S", P1, Result.SUCCESS, PUSHED), account_id=9)
    _push(receipt("OLD", P1, Result.SUCCESS, PUSHED))
    track({"account_id": 1, "session_no": "S", "phones": [P1]})
    # Sent so long before the push that the push came after its cutoff.
    early = PUSHED - POLICY.cutoff - timedelta(seconds=1)
    track({"account_id": 1, "session_no": "OLD", "phones": [P1], "sent_at": early})

    assert stored_receipts() == {}
    assert {r["session_no"] for r in _inbox()} == {"S", "OLD"}


def test_the_inbox_expires_after_the_cutoff_and_stays_under_its_bound() -> None:
    for i in range(5):
        _push(receipt(f"N{i}", P1, Result.SUCCESS, PUSHED), at=PUSHED + timedelta(seconds=i))
    with db.session_scope() as session:
        later = PUSHED + POLICY.cutoff + timedelta(seconds=1.5)
        gone = push.expire_inbox(session, now=later, cutoff=POLICY.cutoff, max_rows=100)
    assert gone == 2
    assert [r["session_no"] for r in _inbox()] == ["N2", "N3", "N4"]
    with db.session_scope() as session:
        gone = push.expire_inbox(session, now=PUSHED, cutoff=POLICY.cutoff, max_rows=2)
    assert gone == 1
    assert [r["session_no"] for r in _inbox()] == ["N3", "N4"]


def test_a_parked_receipt_matches_the_tracked_phone_on_its_digits() -> None:
    """Parked rows keep the phone as pushed; applied, the tracked spelling is stored."""
    _push(receipt("S", "+852 5531-1111", Result.UNKNOW, PUSHED))
    track({"account_id": 1, "session_no": "S", "phones": ["(852)55311111"]})
    stored = stored_receipts()
    assert stored[("S", "(852)55311111")]["result"] == "Unknow", "tracked spelling kept"
    assert stored_sessions()["S"]["state"] == "pending"
