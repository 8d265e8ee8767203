"""Tracking through the public entry points, on both backends: ``track_many`` validates
``TrackRequest`` instances like dicts, and ``receipts track`` streams big inputs in short
transactions after validating them whole."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

import worker
from worker import db
from worker.errors import TrackError
from worker.models import sessions_table
from worker.tracking import TrackRequest

SENT_AT = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def _sessions() -> dict[tuple[int, str], dict[str, Any]]:
    with db.session_scope() as session:
        rows = session.execute(sa.select(sessions_table)).mappings()
        return {(row["account_id"], row["session_no"]): dict(row) for row in rows}


# --- track_many and TrackRequest instances (issue 13, item 14) ---------------------------------


@pytest.mark.usefixtures("database")
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"session_no": "S 1"}, "session_no"),
        ({"phones": ("not a phone",)}, "phones"),
        ({"sent_at": SENT_AT.replace(tzinfo=None)}, "sent_at"),
        ({"user_ref": "r" * 5000}, "user_ref"),
    ],
    ids=["session-no-with-space", "non-phone", "naive-sent-at", "5000-char-user-ref"],
)
def test_track_many_refuses_an_invalid_track_request_and_records_nothing(
    overrides: dict[str, Any], field: str
) -> None:
    good = TrackRequest(account_id=1, session_no="GOOD", sent_at=SENT_AT)
    bad = TrackRequest(**{"account_id": 1, "session_no": "BAD", "sent_at": SENT_AT, **overrides})
    with pytest.raises(TrackError) as info:
        worker.track_many([good, bad])
    message = str(info.value)
    assert message.startswith("1 problem: row 2")
    assert f": {field}" in message
    assert "nothing was recorded" in message
    assert _sessions() == {}


@pytest.mark.usefixtures("database")
def test_track_many_stores_a_valid_track_request_normalized() -> None:
    request = TrackRequest(
        account_id=1,
        session_no="S1",
        phones=("(852)55311111", "+852 5531 1111"),
        sent_at=SENT_AT.astimezone(timezone(timedelta(hours=8))),
    )
    assert worker.track_many([request]).inserted == 1
    row = _sessions()[(1, "S1")]
    assert row["phones"] == ["(852)55311111"], "the same phone spelled twice is one phone"
    assert row["sent_at"] == SENT_AT
    assert row["sent_at"].utcoffset() == timedelta(0)
