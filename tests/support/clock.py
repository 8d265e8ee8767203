"""Instants for tests. A fixed ``T0`` where no real clock is compared with it (everything is
injected); where the database's own clock is (the views, heartbeats), instants anchored on it
with :func:`anchored`, so that no test depends on today's date."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from worker import db
from worker.models import UTCDateTime
from worker.schedule import PollPolicy

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
# The production timings, for function-level tests with an injected clock.
POLICY = PollPolicy(
    first_delay=timedelta(minutes=5),
    interval_min=timedelta(minutes=5),
    interval_max=timedelta(minutes=10),
    cutoff=timedelta(hours=12),
)
LEASE = timedelta(minutes=5)
IN_FLIGHT = timedelta(minutes=7)
MICROSECOND = timedelta(microseconds=1)


def db_now() -> datetime:
    """The database's clock, the one the ``stale_sessions`` view compares with."""
    with db.session_scope() as session:
        now: datetime | None = session.scalar(
            sa.select(sa.func.current_timestamp(type_=UTCDateTime()))
        )
    if now is None:  # pragma: no cover - CURRENT_TIMESTAMP is never NULL
        raise RuntimeError("the database has no time")
    return now


def anchored(now_at: timedelta) -> datetime:
    """A T0 for a test whose instants meet the views: T0 + ``now_at`` is the database's time
    now (to the second), so the test's "now" is the view's now whatever today's date."""
    return db_now().replace(microsecond=0) - now_at
