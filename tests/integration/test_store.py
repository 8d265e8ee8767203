"""The poll cycle's database operations on real PostgreSQL and SQLite (every test runs on
both), with an injected clock."""

from __future__ import annotations

import itertools
import json
import random
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.clock import LEASE, POLICY, T0
from tests.support.factories import (
    answer,
    claim_due,
    receipt,
    start,
    stored_receipts,
    stored_sessions,
    track,
)
from worker import db, store
from worker.domain import FINAL_RESULTS, ReceiptVersion, Result, is_repeat, should_replace
from worker.errors import TrackError
from worker.models import receipt_events_table, sessions_table
from worker.receipts import Receipt, parse_receipts
from worker.tracking import TrackRequest, parse_requests, track_requests

pytestmark = pytest.mark.usefixtures("database")


# --- tracking ---------------------------------------------------------------------------


def test_tracking_twice_merges_and_never_duplicates() -> None:
    track({"account_id": 1, "session_no": "s1", "phones": ["(852)55311111"], "user_ref": "a"})
    track({"account_id": 1, "session_no": "s1", "phones": ["85255311111", "(852)55311112"]})
    track({"account_id": 2, "session_no": "s1"})
    with db.session_scope() as session:
        rows = (
            session.execute(sa.select(sessions_table).order_by(sessions_table.c.id))
            .mappings()
            .all()
        )
    assert [(r["account_id"], r["session_no"]) for r in rows] == [(1, "s1"), (2, "s1")]
    assert rows[0]["phones"] == ["(852)55311111", "(852)55311112"]
    assert rows[0]["user_ref"] == "a"
    assert rows[0]["next_poll_at"] == T0 + POLICY.first_delay
    assert rows[0]["state"] == "pending"


def test_bulk_track_with_a_bad_row_records_nothing() -> None:
    track({"account_id": 1, "session_no": "kept"})
    with pytest.raises(TrackError) as excinfo:
        parse_requests(
            [{"account_id": 1, "session_no": "new"}, {"account_id": 0, "session_no": "bad"}],
            now=T0,
        )
    assert "row 2" in str(excinfo.value)
    assert "account_id" in str(excinfo.value)
    assert "nothing was recorded" in str(excinfo.value)
    assert set(stored_sessions()) == {"kept"}


def test_bulk_track_is_one_transaction(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """A failure in the middle of writing (here: the database refusing the second chunk)
    leaves nothing of the call behind."""
    from worker import tracking

    monkeypatch.setattr(tracking, "CHUNK", 2)
    monkeypatch.setattr(tracking, "PG_CHUNK", 2)
    requests = [TrackRequest(account_id=1, session_no=f"s{i}", sent_at=T0) for i in range(5)]
    calls = {"n": 0}

    def refuse_second_insert(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().startswith("INSERT INTO sms_sessions"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("database went away")

    engine = db.get_engine()
    sa.event.listen(engine, "before_cursor_execute", refuse_second_insert)
    request.addfinalizer(
        lambda: sa.event.remove(engine, "before_cursor_execute", refuse_second_insert)
    )
    with pytest.raises(RuntimeError), db.session_scope() as session:
        track_requests(session, requests, policy=POLICY, now=T0)
    assert calls["n"] == 2, "the second chunk was refused"
    assert stored_sessions() == {}


def test_retracking_a_resolved_session_with_a_new_phone_reopens_it() -> None:
    track({"account_id": 1, "session_no": "s", "phones": ["85255311111"]})
    now = T0 + POLICY.first_delay
    claim = claim_due(1, now)
    assert claim is not None
    targets = start(claim, now)
    answer(targets, [receipt("s", "85255311111", Result.SUCCESS, now)], now)
    assert stored_sessions()["s"]["state"] == "resolved"
    later = now + timedelta(minutes=1)
    track({"account_id": 1, "session_no": "s", "phones": ["85255311112"]}, now=later)
    row = stored_sessions()["s"]
    assert row["state"] == "pending"
    assert row["next_poll_at"] == later
    assert row["resolved_at"] is None


# --- claiming ---------------------------------------------------------------------------


def test_claim_takes_only_due_sessions_of_one_account_in_batches() -> None:
    track(*({"account_id": 1, "session_no": f"a{i}"} for i in range(150)))
    track(*({"account_id": 2, "session_no": f"b{i}"} for i in range(3)))
    early = T0 + POLICY.first_delay - timedelta(seconds=1)
    assert claim_due(1, early) is None, "nothing is due before the first delay"
    now = T0 + POLICY.first_delay
    with db.session_scope() as session:
        assert store.due_accounts(session, now=now, policy=POLICY) == [1, 2]
    first = claim_due(1, now)
    second = claim_due(1, now)
    third = claim_due(1, now)
    assert first is not None and second is not None
    assert len(first.session_ids) == 100 and len(second.session_ids) == 50
    assert third is None, "claimed sessions are not due again until their lease ends"
    assert not set(first.session_ids) & set(second.session_ids)
    sessions = stored_sessions()
    by_id = {row["id"]: row for row in sessions.values()}
    assert {by_id[i]["account_id"] for i in first.session_ids + second.session_ids} == {1}


def test_a_lost_claim_comes_back_after_its_lease_and_the_stale_token_polls_nothing() -> None:
    track({"account_id": 1, "session_no": "s"})
    now = T0 + POLICY.first_delay
    lost = claim_due(1, now)
    assert lost is not None
    assert claim_due(1, now + LEASE - timedelta(seconds=1)) is None
    again = claim_due(1, now + LEASE)
    assert again is not None and again.session_ids == lost.session_ids
    assert start(lost, now + LEASE) == [], "the old poll task lost its claim"
    assert [t.session_no for t in start(again, now + LEASE)] == ["s"]
    assert start(again, now + LEASE) == [], "a duplicate of the same task polls nothing"


def test_never_polled_twice_inside_the_minimum_interval() -> None:
    track({"account_id": 1, "session_no": "s"})
    now = T0 + POLICY.first_delay
    claim = claim_due(1, now)
    assert claim is not None
    targets = start(claim, now)
    answer(targets, [], now)
    row = stored_sessions()["s"]
    assert now + POLICY.interval_min <= row["next_poll_at"] <= now + POLICY.interval_max
    # Force the session due early (as a bug or a manual edit might): start_poll still refuses.
    with db.session_scope() as session:
        session.execute(sa.update(sessions_table).values(next_poll_at=now))
    soon = now + POLICY.interval_min - timedelta(seconds=1)
    claim = claim_due(1, soon)
    assert claim is not None
    assert start(claim, soon) == []


def test_no_poll_at_or_after_the_cutoff() -> None:
    """A claim may still pick up a session past its cutoff (the tick escalates it first),
    but the poll never starts: start_poll is where the rule is kept."""
    track({"account_id": 1, "session_no": "s"})
    cutoff = T0 + POLICY.cutoff
    late = claim_due(1, cutoff)
    assert late is not None
    assert start(late, cutoff) == []
    with db.session_scope() as session:
        session.execute(sa.update(sessions_table).values(next_poll_at=T0, claim_token=None))
    claim = claim_due(1, cutoff - timedelta(seconds=1))
    assert claim is not None
    assert start(claim, cutoff) == []
    with db.session_scope() as session:
        assert [e.session_no for e in store.escalate_due(session, now=cutoff, policy=POLICY)] == [
            "s"
        ]


# --- recording ----------------------------------------------------------------------------


def _poll_with(session_no: str, receipts: list[Receipt], now: datetime) -> store.PollOutcome:
    with db.session_scope() as session:
        session.execute(
            sa.update(sessions_table)
            .where(sessions_table.c.session_no == session_no)
            .values(next_poll_at=now, last_polled_at=None)
        )
    claim = claim_due(1, now)
    assert claim is not None
    return answer(start(claim, now), receipts, now)


def test_an_answer_with_text_no_column_can_hold_is_written_whole() -> None:
    """NUL and lone surrogates from a hostile API are replaced by the parser, so the other
    receipts of the answer are not lost with the odd one (PostgreSQL refuses both in text)."""
    track(
        {"account_id": 1, "session_no": "odd", "phones": ["85255311111"]},
        {"account_id": 1, "session_no": "fine", "phones": ["85255311112"]},
    )
    now = T0 + POLICY.first_delay
    payload = json.loads(
        '{"Data": ['
        '{"SessionNo": "odd", "ReceiptSet": [{"Phone": "85255311111", "ReceiptResult": "Fail",'
        ' "ReceiptDesc": "bad\\u0000byte \\ud800", "UserId": "\\udfff"}]},'
        '{"SessionNo": "fine", "ReceiptSet": [{"Phone": "85255311112",'
        ' "ReceiptResult": "Success"}]}]}'
    )
    batch = parse_receipts(payload, ["odd", "fine"], received_at=now)
    claim = claim_due(1, now)
    assert claim is not None
    outcome = answer(start(claim, now), list(batch.receipts), now)
    assert sorted(outcome.resolved) == ["fine", "odd"]
    receipts = stored_receipts()
    assert receipts[("odd", "85255311111")]["receipt_desc"] == "bad\ufffdbyte \ufffd"
    assert receipts[("odd", "85255311111")]["user_id"] == "\ufffd"
    assert receipts[("fine", "85255311112")]["result"] == "Success"


def test_resolution_with_tracked_phones_matches_on_digits() -> None:
    track({"account_id": 1, "session_no": "s", "phones": ["(852)55311111", "(852)55311112"]})
    now = T0 + POLICY.first_delay
    outcome = _poll_with("s", [receipt("s", "+852 5531 1111", Result.SUCCESS, now)], now)
    assert outcome.resolved == ()
    assert stored_sessions()["s"]["state"] == "pending"
    later = now + POLICY.interval_max
    outcome = _poll_with(
        "s",
        [
            receipt("s", "85255311112", Result.FAIL, later),
            receipt("s", "99999999", Result.UNKNOW, later),  # not tracked: does not block
        ],
        later,
    )
    assert outcome.resolved == ("s",)
    row = stored_sessions()["s"]
    assert row["state"] == "resolved" and row["resolved_at"] == later
    assert row["next_poll_at"] is None
    receipts = stored_receipts()
    assert receipts[("s", "(852)55311111")]["result"] == "Success", "stored as tracked"
    assert receipts[("s", "(852)55311112")]["result"] == "Fail"
    assert ("s", "99999999") in receipts


def test_resolution_without_tracked_phones() -> None:
    track({"account_id": 1, "session_no": "s"})
    now = T0 + POLICY.first_delay
    assert _poll_with("s", [], now).resolved == (), "no receipt at all is not resolved"
    now += POLICY.interval_max
    assert _poll_with("s", [receipt("s", "1234567", Result.UNKNOW, now)], now).resolved == ()
    now += POLICY.interval_max
    assert _poll_with("s", [receipt("s", "1234567", Result.SUCCESS, now)], now).resolved == ("s",)


def test_final_receipt_is_never_replaced_by_a_stale_unknow() -> None:
    track({"account_id": 1, "session_no": "s", "phones": ["1234567", "7654321"]})
    now = T0 + POLICY.first_delay
    _poll_with("s", [receipt("s", "1234567", Result.SUCCESS, now)], now)
    later = now + POLICY.interval_max
    _poll_with("s", [receipt("s", "1234567", Result.UNKNOW, now - timedelta(seconds=5))], later)
    _poll_with("s", [receipt("s", "1234567", Result.UNKNOW, later)], later + POLICY.interval_max)
    assert stored_receipts()[("s", "1234567")]["result"] == "Success"


def test_duplicate_phones_in_one_answer_keep_the_winner() -> None:
    track({"account_id": 1, "session_no": "s", "phones": ["1234567"]})
    now = T0 + POLICY.first_delay
    _poll_with(
        "s",
        [
            receipt("s", "1234567", Result.UNKNOW, now),
            receipt("s", "+1234567", Result.FAIL, now - timedelta(seconds=1)),
            receipt("s", "1234567", Result.UNKNOW, now + timedelta(seconds=1)),
        ],
        now,
    )
    assert stored_receipts()[("s", "1234567")]["result"] == "Fail"


_TIMES = {"older": -60, "same": 0, "newer": 60, "unknown": None}


@pytest.mark.parametrize(
    ("old", "new", "when", "old_timed"),
    list(itertools.product(list(Result), list(Result), list(_TIMES), [True, False])),
)
def test_sql_upsert_guard_agrees_with_the_pure_rule(
    old: Result, new: Result, when: str, old_timed: bool
) -> None:
    """The WHERE clause of the bulk upsert is the SQL twin of domain.should_replace, for a
    stored receipt with a time and one without."""
    track({"account_id": 1, "session_no": "s", "phones": ["1234567"]})
    base = T0 + timedelta(hours=1)
    offset = _TIMES[when]
    new_time = None if offset is None else base + timedelta(seconds=offset)
    old_time = base if old_timed else None
    targets = [
        store.PollTarget(
            id=0, account_id=1, session_no="s", phones=("1234567",), sent_at=T0, polled_at=base
        )
    ]
    old_rows = store.receipt_rows(targets, [receipt("s", "1234567", old, old_time)])
    new_rows = store.receipt_rows(targets, [receipt("s", "1234567", new, new_time)])
    with db.session_scope() as session:
        store.upsert_receipts(session, old_rows, account_id=1, now=base)
    with db.session_scope() as session:
        store.upsert_receipts(session, new_rows, account_id=1, now=base)
    expected_replaced = should_replace(
        ReceiptVersion(result=old, receipt_time=old_time),
        ReceiptVersion(result=new, receipt_time=new_time),
    )
    # The history agrees too: the second receipt is kept unless it repeats the first
    # (domain.is_repeat, whose SQL twin decides on PostgreSQL), applied as the guard decided.
    events = receipt_events_table
    with db.session_scope() as session:
        kept = session.execute(
            sa.select(events.c.result, events.c.receipt_time, events.c.applied).order_by(
                events.c.id
            )
        ).all()
    assert [tuple(row) for row in kept] == [(old.value, old_time, True)] + (
        [] if is_repeat(old_rows[0], new_rows[0]) else [(new.value, new_time, expected_replaced)]
    )
    stored = stored_receipts()[("s", "1234567")]
    expected = new if expected_replaced else old
    assert stored["result"] == expected.value
    assert stored["receipt_time"] == (new_time if expected_replaced else old_time)
    if old in FINAL_RESULTS and new not in FINAL_RESULTS:
        assert stored["result"] == old.value


def test_a_failed_poll_keeps_the_error_and_reschedules() -> None:
    track({"account_id": 1, "session_no": "s"})
    now = T0 + POLICY.first_delay
    claim = claim_due(1, now)
    assert claim is not None
    targets = start(claim, now)
    with db.session_scope() as session:
        store.record_failure(
            session, targets=targets, error="HTTP 500", now=now, policy=POLICY, rng=random.Random(2)
        )
    row = stored_sessions()["s"]
    assert row["last_error"] == "HTTP 500"
    assert row["state"] == "pending" and row["poll_count"] == 1
    assert now + POLICY.interval_min <= row["next_poll_at"] <= now + POLICY.interval_max
    # The next good answer clears it.
    later = row["next_poll_at"]
    claim = claim_due(1, later)
    assert claim is not None
    answer(start(claim, later), [], later)
    assert stored_sessions()["s"]["last_error"] is None


# --- escalation -----------------------------------------------------------------------------


def test_escalation_happens_once_with_what_support_needs() -> None:
    track({"account_id": 1, "session_no": "s", "phones": ["1234567", "7654321"]})
    track({"account_id": 1, "session_no": "fresh"}, now=T0)
    now = T0 + POLICY.first_delay
    _poll_with(
        "s",
        [
            receipt("s", "1234567", Result.UNKNOW, now),
            receipt("s", "7654321", Result.SUCCESS, now),
        ],
        now,
    )
    cutoff = T0 + POLICY.cutoff
    with db.session_scope() as session:
        assert store.escalate_due(session, now=cutoff - timedelta(seconds=1), policy=POLICY) == []
    with db.session_scope() as session:
        escalated = store.escalate_due(session, now=cutoff, policy=POLICY)
    with db.session_scope() as session:
        assert store.escalate_due(session, now=cutoff + timedelta(hours=1), policy=POLICY) == []
    assert [e.session_no for e in escalated] == ["s", "fresh"]
    row = stored_sessions()["s"]
    assert row["state"] == "escalated" and row["escalated_at"] == cutoff
    assert row["next_poll_at"] is None
    assert row["escalation_detail"] == {
        "phones": [{"phone": "1234567", "last_result": "Unknow"}],
        "poll_count": 1,
        "last_error": None,
    }


def test_a_late_answer_resolves_an_escalated_session_and_keeps_escalated_at() -> None:
    track({"account_id": 1, "session_no": "s", "phones": ["1234567"]})
    now = T0 + POLICY.cutoff - timedelta(seconds=1)
    claim = claim_due(1, now)
    assert claim is not None
    targets = start(claim, now)
    cutoff = T0 + POLICY.cutoff
    with db.session_scope() as session:
        store.escalate_due(session, now=cutoff, policy=POLICY)
    answer(targets, [receipt("s", "1234567", Result.SUCCESS, now)], cutoff + timedelta(seconds=1))
    row = stored_sessions()["s"]
    assert row["state"] == "resolved"
    assert row["escalated_at"] == cutoff
    assert row["resolved_at"] == cutoff + timedelta(seconds=1)


def test_tracking_thousands_again_merges_them_all() -> None:
    """Re-tracking more sessions than one lookup takes (2,000) finds every one of them."""
    rows = [{"account_id": 1 + i % 3, "session_no": f"bulk{i}"} for i in range(4500)]
    requests = parse_requests([{"sent_at": T0, **row} for row in rows], now=T0)
    with db.session_scope() as session:
        first = track_requests(session, requests, policy=POLICY, now=T0)
    with db.session_scope() as session:
        again = track_requests(session, requests, policy=POLICY, now=T0)
    assert (first.inserted, again.inserted, again.unchanged) == (4500, 0, 4500)
