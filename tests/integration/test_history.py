"""The history on PostgreSQL and SQLite, with an injected clock: every observed change of a
phone's receipt is kept, from polls, pushes and repolls alike, applied or not; a repeat of the
stored receipt adds nothing; resolutions and escalations are kept as session events; every
event takes an id from one increasing series."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

import worker
from tests.support.cli import invoke, ok
from tests.support.clock import POLICY, T0
from tests.support.databases import Configure
from tests.support.factories import P1, P2, escalate, poll, receipt, track
from worker import db, push, store
from worker.domain import ReceiptSource, Result
from worker.models import receipt_events_table, session_events_table
from worker.receipts import Receipt

pytestmark = pytest.mark.usefixtures("database")

FIRST = T0 + POLICY.first_delay
SECOND = FIRST + POLICY.interval_max
THIRD = SECOND + POLICY.interval_max
T1, T2 = T0 + timedelta(seconds=30), T0 + timedelta(seconds=90)


def _push(*receipts: Receipt, at: Any) -> push.PushOutcome:
    with db.session_scope() as session:
        return push.record_push(session, list(receipts), now=at)


def _changes() -> list[tuple[str, str, str, bool]]:
    """``sms_receipt_events`` as (phone, result, source, applied), in id order."""
    e = receipt_events_table
    with db.session_scope() as session:
        rows = session.execute(
            sa.select(e.c.phone, e.c.result, e.c.source, e.c.applied).order_by(e.c.id)
        )
        return [(r.phone, r.result, r.source, bool(r.applied)) for r in rows]


def _session_events() -> list[tuple[str, str, str | None]]:
    se = session_events_table
    with db.session_scope() as session:
        rows = session.execute(sa.select(se.c.session_no, se.c.type, se.c.source).order_by(se.c.id))
        return [(r.session_no, r.type, r.source) for r in rows]


def _all_ids() -> list[tuple[int, str, Any]]:
    """Every event of both tables as (id, kind, when), in id order."""
    e, se = receipt_events_table, session_events_table
    with db.session_scope() as session:
        ids = [(r.id, "receipt", r.observed_at) for r in session.execute(sa.select(e))]
        ids += [(r.id, "session", r.occurred_at) for r in session.execute(sa.select(se))]
    return sorted(ids)


def test_unknow_then_success_then_a_stale_unknow_keeps_all_three_the_last_not_applied() -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1, P2]})
    poll(1, [receipt("S", P1, Result.UNKNOW, T1), receipt("S", P2, Result.UNKNOW, T1)], FIRST)
    # P2 repeats its stored receipt: nothing new to keep.
    poll(1, [receipt("S", P1, Result.SUCCESS, T2), receipt("S", P2, Result.UNKNOW, T1)], SECOND)
    # The API serves P1's older report again: observed, kept, not applied.
    poll(1, [receipt("S", P1, Result.UNKNOW, T1), receipt("S", P2, Result.FAIL, T2)], THIRD)

    # Within one answer, the receipts it applied come first, then those that lost.
    assert _changes() == [
        (P1, "Unknow", "poll", True),
        (P2, "Unknow", "poll", True),
        (P1, "Success", "poll", True),
        (P2, "Fail", "poll", True),
        (P1, "Unknow", "poll", False),
    ]
    assert _session_events() == [("S", "session.resolved", "poll")]

    found = worker.history("S")
    assert [(c.result, c.applied) for c in found.for_phone("+852 5531 1111")] == [
        (Result.UNKNOW, True),
        (Result.SUCCESS, True),
        (Result.UNKNOW, False),
    ]
    timeline = found.timeline
    assert [c.id for c in timeline] == sorted(c.id for c in timeline)
    assert isinstance(timeline[-1], worker.SessionChange)
    assert timeline[-1].type == "session.resolved" and timeline[-1].at == THIRD
    assert timeline[0].at == FIRST and isinstance(timeline[0], worker.ReceiptChange)
    assert timeline[0].receipt_time == T1 and timeline[0].receipt_code == "c"


def test_a_repeat_of_the_stored_receipt_adds_nothing_whoever_brings_it() -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1, P2]})
    poll(1, [receipt("S", P1, Result.UNKNOW, T1)], FIRST)
    poll(1, [receipt("S", P1, Result.UNKNOW, T1)], SECOND)
    _push(receipt("S", "85255311111", Result.UNKNOW, T1), at=SECOND + timedelta(seconds=1))

    assert _changes() == [(P1, "Unknow", "poll", True)]


def test_a_losing_receipt_is_kept_once_however_often_it_is_repeated() -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1, P2]})
    poll(1, [receipt("S", P1, Result.SUCCESS, T2)], FIRST)
    stale = receipt("S", P1, Result.FAIL, T1)  # final too, but older
    for second in (1, 2, 3):
        _push(stale, at=FIRST + timedelta(seconds=second))

    assert _changes() == [(P1, "Success", "poll", True), (P1, "Fail", "push", False)]
    assert worker.status("S").receipts[0].result == "Success"


def test_push_and_poll_both_write_history_and_the_push_that_resolves_says_so() -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1]})
    poll(1, [receipt("S", P1, Result.UNKNOW, T1)], FIRST)
    _push(receipt("S", "85255311111", Result.SUCCESS, T2), at=FIRST + timedelta(seconds=5))

    assert _changes() == [(P1, "Unknow", "poll", True), (P1, "Success", "push", True)]
    assert _session_events() == [("S", "session.resolved", "push")]


def test_a_push_waiting_in_the_inbox_enters_the_history_when_it_is_applied() -> None:
    _push(receipt("S", "85255311111", Result.SUCCESS, T1), at=T0 + timedelta(seconds=5))
    assert _changes() == [], "parked, not observed of a tracked session yet"

    track({"account_id": 1, "session_no": "S", "phones": [P1]}, now=T0 + timedelta(seconds=9))

    assert _changes() == [(P1, "Success", "push", True)]
    assert _session_events() == [("S", "session.resolved", "push")]


def test_escalation_and_a_repoll_that_resolves_late_are_kept_in_order() -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1]})
    poll(1, [receipt("S", P1, Result.UNKNOW, T1)], FIRST)
    late = T0 + POLICY.cutoff + timedelta(minutes=1)
    assert [e.session_no for e in escalate(late)] == ["S"]
    with db.session_scope() as session:
        targets = store.escalated_targets(session, ["S"], account_id=None, now=late)
        store.record_answer(
            session,
            targets=targets,
            receipts=[receipt("S", P1, Result.SUCCESS, T2)],
            problems={},
            now=late,
            policy=POLICY,
            rng=random.Random(1),
            source=ReceiptSource.REPOLL,
        )

    assert _changes() == [(P1, "Unknow", "poll", True), (P1, "Success", "repoll", True)]
    assert _session_events() == [
        ("S", "session.escalated", None),
        ("S", "session.resolved", "repoll"),
    ]
    assert [kind for _, kind, _ in _all_ids()] == ["receipt", "session", "receipt", "session"]


def test_event_ids_increase_across_both_tables_and_transactions() -> None:
    track(
        {"account_id": 1, "session_no": "A", "phones": [P1]},
        {"account_id": 1, "session_no": "B", "phones": [P1, P2]},
    )
    poll(
        1,
        [receipt("A", P1, Result.SUCCESS, T1), receipt("B", P1, Result.UNKNOW, T1)],
        FIRST,
    )
    poll(1, [receipt("B", P1, Result.SUCCESS, T2), receipt("B", P2, Result.FAIL, T2)], SECOND)

    ids = _all_ids()
    assert len({i for i, _, _ in ids}) == len(ids) == 6, "unique across both tables"
    # One transaction per poll: its receipt changes first, then the sessions they resolved,
    # and every id of the second poll above every id of the first.
    assert [(kind, at) for _, kind, at in ids] == [
        ("receipt", FIRST),
        ("receipt", FIRST),
        ("session", FIRST),
        ("receipt", SECOND),
        ("receipt", SECOND),
        ("session", SECOND),
    ]


def test_history_of_an_untracked_session_is_refused_like_its_status() -> None:
    with pytest.raises(worker.SessionNotFound, match="not tracked"):
        worker.history("nope")


def test_the_history_command_shows_the_timeline_phones_masked(configure: Configure) -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1]})
    poll(1, [receipt("S", P1, Result.UNKNOW, T1)], FIRST)
    poll(1, [receipt("S", P1, Result.SUCCESS, T2)], SECOND)
    _push(receipt("S", "85255311111", Result.UNKNOW, T1), at=SECOND + timedelta(seconds=1))

    lines = ok(invoke("history", "S")).output.splitlines()
    rows = [line for line in lines if "Unknow" in line or "Success" in line or "session." in line]
    assert len(rows) == 4
    assert "Unknow" in rows[0] and "poll" in rows[0] and rows[0].rstrip(" │").endswith("yes")
    assert "Success" in rows[1] and rows[1].rstrip(" │").endswith("yes")
    assert "session.resolved" in rows[2]
    assert "Unknow" in rows[3] and "push" in rows[3] and rows[3].rstrip(" │").endswith("no")
    assert "*******1111" in rows[0] and "55311111" not in "\n".join(lines)

    shown = json.loads(ok(invoke("history", "S", "--json")).output)
    assert (shown["account_id"], shown["session_no"]) == (1, "S")
    assert [
        (e["type"], e.get("result"), e["source"], e.get("applied")) for e in shown["timeline"]
    ] == [
        ("receipt", "Unknow", "poll", True),
        ("receipt", "Success", "poll", True),
        ("session.resolved", None, "poll", None),
        ("receipt", "Unknow", "push", False),
    ]
    first = shown["timeline"][0]
    assert (first["phone"], first["phone_key"]) == ("*******1111", "*******1111")
    assert first["observed_at"] == FIRST.isoformat(timespec="seconds")
    assert first["receipt_time"] == T1.isoformat(timespec="seconds")

    configure(RECEIPTS_LOG_PHONES="true")
    shown = json.loads(ok(invoke("history", "S", "--json")).output)
    assert shown["timeline"][0]["phone"] == P1


def test_the_history_command_refuses_an_untracked_session_in_one_line() -> None:
    result = invoke("history", "nope")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["error: session 'nope' is not tracked"]
