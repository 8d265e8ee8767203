"""The databases tests run on: scaled timings, the settings seam (``configure``), and emptying a
database of the run's own between tests."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from tests.support.shared import PG_ADMIN_URL
from worker import db

# Timings scaled to seconds, as the contract allows; tests override what they need.
FAST_TIMINGS = {
    "RECEIPTS_FIRST_POLL_DELAY": "1",
    "RECEIPTS_POLL_INTERVAL_MIN": "1",
    "RECEIPTS_POLL_INTERVAL_MAX": "2",
    "RECEIPTS_CUTOFF": "10",
    "RECEIPTS_TICK": "0.5",
}

# ``configure(RECEIPTS_X="...")``: the fixture of tests/conftest.py that sets variables for one
# test and rebuilds the settings and the engine from them.
Configure = Callable[..., None]

# Every table a test may fill, children first.
TABLES = (
    "sms_receipt_events",
    "sms_session_events",
    "sms_receipts",
    "sms_sessions",
    "escalation_outbox",
    "receipts_heartbeats",
    "api_call_counts",
    "receipts_workers",
    "sms_receipt_inbox",
    "receipts_push_counts",
    "rejected_tracks",
    "receipts_credentials",
    "receipts_event_cursors",
    "receipts_parked_event_batches",
    "receipts_purge_counts",
)


def pg_url(database: str) -> str:
    """The URL of ``database`` on the shared PostgreSQL."""
    return sa.engine.make_url(PG_ADMIN_URL).set(database=database).render_as_string(False)


def truncate(url: str) -> None:
    """Empty every table of a database of the run's own (never a shared one)."""
    engine = db.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
        else:
            for table in TABLES:
                connection.execute(sa.text(f"DELETE FROM {table}"))
    engine.dispose()
