"""``worker.db.json_rows``: rows sent to PostgreSQL as one JSON document come back as they went,
whatever their values (the receipts upsert, the session updates and bulk track rely on it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from worker import db
from worker.models import UTCDateTime

TYPES: dict[str, Any] = {
    "id": sa.BigInteger(),
    "text": sa.Text(),
    "at": UTCDateTime(),
    "count": sa.Integer(),
    "doc": JSONB(),
}


@pytest.mark.postgres
@pytest.mark.usefixtures("pg")
def test_rows_round_trip_through_one_json_document() -> None:
    at = datetime(2026, 11, 27, 10, 0, 0, 5, tzinfo=UTC)
    rows = [
        {
            "id": 2**63 - 1,
            "text": '送达 "quoted" \\ back\nslash \u2028 and \U0001f4f1',
            "at": at,
            "count": None,
            "doc": {"phones": ["(852)55311111"], "n": 1},
        },
        {
            "id": 1,
            "text": None,
            "at": at.astimezone(timezone(timedelta(hours=8))),  # the same instant, elsewhere
            "count": 2**31 - 1,
            "doc": None,
        },
        # Naive: taken as UTC, never as the server's time zone.
        {"id": 2, "text": "", "at": at.replace(tzinfo=None), "count": 0, "doc": []},
        {"id": 3, "text": "x", "at": None, "count": -1, "doc": "text"},
    ]
    with db.session_scope() as session:
        session.execute(sa.text("SET LOCAL TIME ZONE 'America/New_York'"))
        result = session.execute(db.json_rows(TYPES), db.json_document(rows))
        found = [dict(row._mapping) for row in result]
    expected = [{**row, "at": at if row["at"] is not None else None} for row in rows]
    assert found == expected


@pytest.mark.postgres
@pytest.mark.usefixtures("pg")
def test_no_rows_select_nothing() -> None:
    with db.session_scope() as session:
        assert session.execute(db.json_rows(TYPES), db.json_document([])).all() == []


@pytest.mark.postgres
@pytest.mark.usefixtures("pg")
def test_a_unit_of_work_without_ping_fails_once_as_transient_on_a_lost_connection() -> None:
    """The push writer's units of work (``retried_scope``) skip the ping: a connection the
    server dropped fails the next transaction, as transient (answered 503, retried by
    Uspeedo), and the one after runs on a new connection."""
    with db.retried_scope() as session:
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    with db.session_scope() as session:
        session.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    with pytest.raises(sa.exc.DBAPIError) as failed, db.retried_scope() as session:
        session.execute(sa.text("SELECT 1"))
    assert db.is_transient(failed.value)
    with db.retried_scope() as session:
        assert session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() != pid
