"""The read of an event batch walks the history's primary key from the cursor whatever the
table's statistics say (worker/events.py, ``_windowed``).

The shared PostgreSQL of a test run, like a new installation before autovacuum's first
ANALYZE, can hold statistics of an empty history while the table has grown: with the filter of
events inside the walk, PostgreSQL then read and sorted the whole table for each batch (52 ms
for a batch of 100 among 120,000 rows, growing with the table).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.plans import seq_scans
from worker import db, events
from worker.domain import DEFAULT_EVENT_TYPES, EventType

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("pg")]

ROWS = 20_000
HISTORY = ("sms_receipt_events", "sms_session_events")


def _grown_behind_stale_statistics() -> None:
    engine = db.get_engine().execution_options(isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("ANALYZE sms_receipt_events, sms_session_events")  # empty
        conn.exec_driver_sql(
            "INSERT INTO sms_receipt_events (account_id, session_no, phone, phone_key, result, "
            "receipt_code, receipt_desc, receipt_time, cost_count, source, observed_at, applied) "
            "SELECT 1, 'S' || (g / 5), '8525531' || (g %% 5), '8525531' || (g %% 5), 'Success', "
            "'DELIVRD', 'd', now(), 1, 'poll', now(), true FROM generate_series(1, %(n)s) AS g",
            {"n": ROWS},
        )
        conn.exec_driver_sql(
            "INSERT INTO sms_session_events (account_id, session_no, type, occurred_at) "
            "SELECT 1, 'S' || g, 'session.resolved', now() "
            "FROM generate_series(1, %(n)s) AS g",
            {"n": ROWS // 5},
        )


@pytest.mark.parametrize(
    "types",
    [DEFAULT_EVENT_TYPES, frozenset(DEFAULT_EVENT_TYPES | {EventType.RECEIPT_UPDATED})],
    ids=["default", "with-updated"],
)
def test_a_batch_is_read_along_the_key_however_stale_the_statistics(
    types: frozenset[EventType],
) -> None:
    _grown_behind_stale_statistics()
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "scanned_rows" in statement:
            sent.append((statement, parameters))

    engine = db.get_engine()
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        with db.session_scope() as session:
            batch = events.read_batch(session, after=0, upto=10**9, limit=100, types=types)
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    ids = [event["id"] for event in batch.events]
    assert len(ids) == 100 and ids == sorted(ids)
    assert len(sent) == 2, "one read of each history table"
    with engine.connect() as conn:
        for statement, parameters in sent:
            plan = conn.exec_driver_sql(
                f"EXPLAIN (FORMAT JSON) {statement}", parameters
            ).scalar_one()
            plan = json.loads(plan) if isinstance(plan, str) else plan
            scanned = {r for r in seq_scans(plan) if r in HISTORY}
            assert not scanned, f"a batch's read scans {scanned} whole"
