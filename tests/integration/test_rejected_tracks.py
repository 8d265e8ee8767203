"""Nothing refused is lost: a ``receipts.track`` task refused by validation is recorded in
``rejected_tracks`` with its arguments and reason (and still rejected, never retried), counted
by the exporter, listed by ``receipts rejected`` with phones masked, and resubmitted once fixed
or dismissed, all or none. On PostgreSQL and SQLite; the real worker is in
test_rejected_tracks_processes.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from celery.exceptions import Reject

from tests.support.cli import invoke, ok
from tests.support.databases import Configure
from worker import db
from worker.models import sessions_table

P1, P2 = "(852)55311111", "(852)55311112"
pytestmark = pytest.mark.usefixtures("database")


def _reject(*args: Any, **kwargs: Any) -> str:
    """Run the task's body as a worker would, expecting it to refuse the message."""
    from worker.tasks import track as track_task

    with pytest.raises(Reject) as caught:
        track_task.run(*args, **kwargs)
    assert caught.value.requeue is False, "a refused message must never come back"
    return str(caught.value.reason)


def _rejected() -> list[dict[str, Any]]:
    """``rejected_tracks`` as a user's SQL reads it, oldest first."""
    with db.session_scope() as session:
        found = session.execute(sa.text("SELECT * FROM rejected_tracks ORDER BY id"))
        rows = [dict(r) for r in found.mappings()]
    for row in rows:
        for key in ("arguments", "corrections"):
            if isinstance(row[key], str):  # SQLite hands JSON back as its text
                row[key] = json.loads(row[key])
    return rows


def _sessions() -> dict[tuple[int, str], dict[str, Any]]:
    with db.session_scope() as session:
        rows = session.execute(sa.select(sessions_table)).mappings()
        return {(r["account_id"], r["session_no"]): dict(r) for r in rows}


def _aware(value: Any) -> datetime:
    """A timestamp read with plain SQL (SQLite gives its UTC text back)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# --- the task records what it refuses -----------------------------------------------------


def test_a_refused_track_task_is_recorded_with_its_arguments_and_reason() -> None:
    reason = _reject(session_no="S1", account_id="seven", phones=[P1, P2], user_ref="order-7")
    assert "account_id must be a positive integer, got 'seven'" in reason
    [row] = _rejected()
    # Stored as received, phones in clear: the row must be resubmittable as it stands.
    assert row["arguments"] == {
        "session_no": "S1",
        "account_id": "seven",
        "phones": [P1, P2],
        "user_ref": "order-7",
    }
    assert "account_id must be a positive integer, got 'seven'" in row["reason"]
    assert row["state"] == "open"
    assert row["resolved_at"] is None and row["corrections"] is None
    assert abs(_aware(row["received_at"]) - datetime.now(UTC)) < timedelta(minutes=1)
    assert _sessions() == {}, "a refused task records no session"


def test_misspelt_missing_and_surplus_arguments_are_refused_and_recorded_too() -> None:
    # A sender's typo (phone= for phones=) would otherwise fail inside Celery and vanish.
    assert "unknown field(s) phone" in _reject(session_no="S2", account_id=7, phone=P1)
    assert "session_no is missing" in _reject(account_id=7, phones=[P1])
    assert "unknown field(s) *args" in _reject("S3", 7, None, None, None, "surplus")
    arguments = [row["arguments"] for row in _rejected()]
    assert arguments == [
        {"session_no": "S2", "account_id": 7, "phone": P1},
        {"account_id": 7, "phones": [P1]},
        {"session_no": "S3", "account_id": 7, "*args": ["surplus"]},
    ]
    assert _sessions() == {}


def test_a_redelivered_message_is_recorded_once() -> None:
    from worker.tasks import track as track_task

    for task_id in ("task-1", "task-1", "task-2"):
        result = track_task.apply(kwargs={"session_no": "S1", "account_id": 0}, task_id=task_id)
        assert result.state == "REJECTED"
    assert [row["task_id"] for row in _rejected()] == ["task-1", "task-2"]


def test_values_no_database_can_store_are_kept_readable() -> None:
    """PostgreSQL's jsonb refuses NUL characters and NaN; such values are invalid anyway, so
    they are stored spelled out rather than losing the whole row."""
    _reject(session_no="S\x00", account_id=float("nan"), phones=[P1], user_ref="a\x00b")
    [row] = _rejected()
    assert row["arguments"] == {
        "session_no": "S\ufffd",
        "account_id": "nan",
        "phones": [P1],
        "user_ref": "a\ufffdb",
    }


def test_a_valid_task_records_no_rejection() -> None:
    from worker.tasks import track as track_task

    track_task.run(session_no="S1", account_id=7, phones=[P1])
    assert _rejected() == []
    assert set(_sessions()) == {(7, "S1")}


# --- resubmitting and dismissing ----------------------------------------------------------


def test_resubmitting_with_a_correction_records_the_session_and_closes_the_row() -> None:
    from worker.api import resubmit_rejected

    _reject(session_no="S1", account_id="seven", phones=[P1, P2], user_ref="order-7")
    [row] = _rejected()
    result = resubmit_rejected([row["id"]], corrections={"account_id": "7"}, note="fixed")
    assert (result.inserted, result.updated, result.unchanged) == (1, 0, 0)
    session = _sessions()[7, "S1"]
    assert session["phones"] == [P1, P2] and session["user_ref"] == "order-7"
    # Sent when the task was received (it carried no sent_at), not when it was resubmitted.
    assert session["sent_at"] == _aware(row["received_at"])
    [closed] = _rejected()
    assert closed["state"] == "resubmitted"
    assert closed["corrections"] == {"account_id": "7"}
    assert closed["note"] == "fixed"
    assert closed["resolved_at"] is not None
    # The arguments stay as received: the row tells what was sent and what was changed.
    assert closed["arguments"]["account_id"] == "seven"


def test_a_correction_can_drop_a_field() -> None:
    from worker.api import resubmit_rejected

    _reject(session_no="S2", account_id=7, phone=P1, sent_at="yesterday")
    [row] = _rejected()
    resubmit_rejected([row["id"]], corrections={"phone": None, "sent_at": None, "phones": P1})
    assert _sessions()[7, "S2"]["phones"] == [P1]


def test_resubmitting_is_all_or_none() -> None:
    from worker.api import resubmit_rejected
    from worker.errors import RejectedTrackError, TrackError

    _reject(session_no="S1", account_id="seven")
    _reject(session_no="S2", account_id=7, phones=["not a phone"])
    first, second = (row["id"] for row in _rejected())
    with pytest.raises(TrackError) as caught:
        resubmit_rejected([first, second], corrections={"account_id": "7"})
    message = str(caught.value)
    assert f"rejected track {second} (session_no 'S2'): phones:" in message
    assert f"rejected track {first}" not in message
    assert "nothing was recorded" in message
    assert _sessions() == {}
    assert [row["state"] for row in _rejected()] == ["open", "open"]

    with pytest.raises(RejectedTrackError) as unknown:
        resubmit_rejected([first, 999], corrections={"account_id": "7"})
    assert "999 does not exist" in str(unknown.value)
    assert _sessions() == {}

    resubmit_rejected([first], corrections={"account_id": "7"})
    with pytest.raises(RejectedTrackError) as again:
        resubmit_rejected([first])
    assert f"{first} was resubmitted at" in str(again.value)


def test_dismissing_closes_rows_all_or_none() -> None:
    from worker.api import dismiss_rejected, resubmit_rejected
    from worker.errors import RejectedTrackError

    _reject(session_no="S1", account_id="seven")
    _reject(session_no="S2", account_id="eight")
    first, _second = (row["id"] for row in _rejected())
    with pytest.raises(RejectedTrackError):
        dismiss_rejected([first, 999])
    assert [row["state"] for row in _rejected()] == ["open", "open"]
    assert dismiss_rejected([first], note="test message") == [first]
    rows = _rejected()
    assert [(r["state"], r["note"]) for r in rows] == [
        ("dismissed", "test message"),
        ("open", None),
    ]
    with pytest.raises(RejectedTrackError) as caught:
        resubmit_rejected([first], corrections={"account_id": "7"})
    assert f"{first} was dismissed at" in str(caught.value)


# --- seen by operators ---------------------------------------------------------------------


def test_the_exporter_counts_rejected_tracks_by_state() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from worker.api import dismiss_rejected
    from worker.metrics import make_registry, render

    def counts() -> dict[str, float]:
        text = render(make_registry(lambda: datetime.now(UTC))).decode()
        return {
            sample.labels["state"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "receipts_rejected_tracks"
            for sample in family.samples
        }

    assert counts() == {"open": 0, "resubmitted": 0, "dismissed": 0}
    _reject(session_no="S1", account_id="seven")
    _reject(session_no="S2", account_id="eight")
    assert counts() == {"open": 2, "resubmitted": 0, "dismissed": 0}
    dismiss_rejected([_rejected()[0]["id"]])
    assert counts() == {"open": 1, "resubmitted": 0, "dismissed": 1}


def test_receipts_rejected_lists_open_rows_with_phones_masked(configure: Configure) -> None:
    _reject(session_no="S1", account_id="seven", phones=[P1, "+852 5531 1112"])
    [row] = _rejected()
    shown = ok(invoke("rejected")).output
    assert "S1" in shown and "seven" in shown and str(row["id"]) in shown
    assert "*******1111" in shown and "*******1112" in shown
    assert "55311111" not in shown and "5531 1112" not in shown

    [listed] = json.loads(ok(invoke("rejected", "--json")).stdout)
    assert listed["id"] == row["id"] and listed["state"] == "open"
    assert listed["arguments"] == {
        "session_no": "S1",
        "account_id": "seven",
        "phones": ["*******1111", "*******1112"],
    }
    assert "55311111" not in json.dumps(listed)

    configure(RECEIPTS_LOG_PHONES="true")
    [whole] = json.loads(ok(invoke("rejected", "--json")).stdout)
    assert whole["arguments"]["phones"] == [P1, "+852 5531 1112"]


def test_receipts_rejected_resubmit_and_dismiss() -> None:
    _reject(session_no="S1", account_id="seven", phones=[P1])
    _reject(session_no="S2", account_id="eight")
    first, second = (row["id"] for row in _rejected())

    refused = invoke("rejected", "resubmit", str(first))
    assert refused.exit_code == 1
    assert "account_id must be a positive integer" in refused.stderr

    done = ok(invoke("rejected", "resubmit", str(first), "--set", "account_id=7"))
    assert "resubmitted 1 rejected track(s): 1 new, 0 merged, 0 unchanged" in done.output
    assert set(_sessions()) == {(7, "S1")}

    assert (
        "dismissed 1 rejected track(s)"
        in ok(invoke("rejected", "dismiss", str(second), "--note", "a test message")).output
    )
    assert "no open rejected tracks" in ok(invoke("rejected")).output
    everything = json.loads(ok(invoke("rejected", "--all", "--json")).stdout)
    assert [(r["id"], r["state"]) for r in everything] == [
        (first, "resubmitted"),
        (second, "dismissed"),
    ]

    again = invoke("rejected", "dismiss", str(first))
    assert again.exit_code == 1
    assert f"{first} was resubmitted at" in again.stderr


def test_receipts_rejected_refuses_a_malformed_correction() -> None:
    _reject(session_no="S1", account_id="seven")
    [row] = _rejected()
    result = invoke("rejected", "resubmit", str(row["id"]), "--set", "account_id")
    assert result.exit_code == 2
    assert "FIELD=VALUE" in result.output
    result = invoke("rejected", "resubmit", str(row["id"]), "--set", "acount_id=7")
    assert result.exit_code == 1
    assert "acount_id" in result.stderr and "unknown field" in result.stderr
    assert _sessions() == {}
