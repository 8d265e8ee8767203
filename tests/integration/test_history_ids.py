"""Event ids on PostgreSQL: they come from one sequence and may commit out of order, and the
horizon worker/models.py gives (EVENT_IDS) says when a reader's cursor may pass an id."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from worker import db

pytestmark = pytest.mark.usefixtures("pg")

INSERT = sa.text(
    "INSERT INTO sms_session_events (account_id, session_no, type, occurred_at) "
    "VALUES (1, :no, 'session.resolved', now()) RETURNING id"
)
# The transactions in progress when the reader looked (the server is shared: other runs' too).
IN_PROGRESS = sa.text("SELECT pg_snapshot_xip(pg_current_snapshot())::text")


def test_a_later_id_can_commit_first_and_the_horizon_holds_the_cursor_back() -> None:
    engine = db.get_engine()
    with engine.connect() as first, engine.connect() as second, engine.connect() as reader:
        first.begin()
        # As every writer does, by locking a session's row first: its transaction id is
        # taken before its event id.
        xid = first.execute(sa.text("SELECT pg_current_xact_id()::text")).scalar_one()
        early = first.execute(INSERT, {"no": "early"}).scalar_one()
        with second.begin():
            late = second.execute(INSERT, {"no": "late"}).scalar_one()
        assert early < late

        seen = reader.execute(sa.text("SELECT id FROM sms_session_events ORDER BY id")).scalars()
        assert list(seen) == [late], "the later id is visible, the earlier not yet"
        running = set(reader.execute(IN_PROGRESS).scalars())
        reader.commit()
        # The writer of `early` was running when `late` was seen: a cursor may not pass `late`
        # until it has ended.
        assert xid in running

        first.commit()
        status = reader.execute(
            sa.text("SELECT pg_xact_status(CAST(:xid AS xid8))"), {"xid": xid}
        ).scalar_one()
        assert status == "committed"
        seen = reader.execute(sa.text("SELECT id FROM sms_session_events ORDER BY id")).scalars()
        assert list(seen) == [early, late], "now every id up to `late` is there to read"
        reader.commit()
