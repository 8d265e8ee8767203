"""Event delivery throughput (worker/events.py): events per second from the history tables to
a webhook receiver on loopback (tests/support/receiver.py), batch after batch, as the delivery
task sends them: claim and horizon, read a batch, POST it signed, move the cursor.

The events are ``receipt.final`` rows written straight into ``sms_receipt_events`` (one per
phone, five phones per session), after the destination's cursor, so that only them are sent.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from bench.env import BenchDatabase, log
from tests.support.receiver import Receiver
from worker import bounded_http, events
from worker.db import session_scope
from worker.domain import DEFAULT_EVENT_TYPES
from worker.models import event_cursors_table

SECRET = "bench-events-secret-0123456789"  # noqa: S105 - a loopback receiver's
_INSERT = sa.text(
    "INSERT INTO sms_receipt_events (account_id, session_no, phone, phone_key, result, "
    "receipt_code, receipt_desc, receipt_time, cost_count, user_id, source, observed_at, "
    "applied) SELECT 9, :prefix || (g / 5), '8525531' || (g % 5), '8525531' || (g % 5), "
    "'Success', 'DELIVRD', 'delivered', now(), 1, NULL, 'poll', now(), true "
    "FROM generate_series(0, :count - 1) AS g"
)


def run(database: BenchDatabase, *, count: int, batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    del database  # the process is configured for it (bench.env.configure_process)
    out: dict[str, Any] = {"events": count, "batches": {}}
    http = bounded_http.new_session()
    with Receiver() as receiver:
        send = events.webhook_sender(http, receiver.url, SECRET, timeout=10)
        for size in batch_sizes:
            with session_scope() as session:
                top = events.last_event_id(session)
                session.execute(sa.delete(event_cursors_table))
                session.execute(
                    sa.insert(event_cursors_table).values(
                        destination="webhook", delivered_id=top, safe_id=top
                    )
                )
                session.execute(_INSERT, {"prefix": f"EVB-{size}-", "count": count})
            before = len(receiver.hits())
            started = time.perf_counter()
            sent = 0
            while sent < count:
                report = events.deliver(
                    session_factory=session_scope,
                    destination="webhook",
                    send=send,
                    now=events_now,
                    types=DEFAULT_EVENT_TYPES,
                    lease=timedelta(minutes=1),
                    batch_size=size,
                    retry_base=timedelta(seconds=1),
                    retry_cap=timedelta(seconds=1),
                    window=timedelta(hours=1),
                    max_batches=10**9,
                )
                if report.failed or not report.delivered:
                    raise RuntimeError(f"event delivery stalled at {sent} of {count}: {report}")
                sent += report.delivered
            elapsed = time.perf_counter() - started
            posts = len(receiver.hits()) - before
            rate = round(count / elapsed)
            log(f"events: {count:,} in batches of {size}: {rate:,} events/s ({posts} POSTs)")
            out["batches"][str(size)] = {"events_per_s": rate, "posts": posts, "seconds": elapsed}
    http.close()
    return out


def events_now() -> Any:
    from worker.clock import database_now

    return database_now()
