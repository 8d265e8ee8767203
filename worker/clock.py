"""The clock every timing rule is checked against: the database's, which all workers share.

A host whose clock runs two minutes fast would otherwise poll three minutes after another
host's poll (the minimum is five), and one running slow would poll after the cutoff. So the
rules never read the host's wall clock: :class:`DatabaseClock` asks PostgreSQL for
``clock_timestamp()`` now and then and advances that reading with the host's monotonic clock
in between (which an NTP step or a wrong time zone cannot move), so a reading costs no round
trip. On SQLite the database lives on this host and its clock is this host's.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

# How long a reading of the database's clock is advanced by the monotonic clock before it is
# read again: the two drift apart by well under a millisecond in that time.
RESYNC_SECONDS = 60.0


def host_now() -> datetime:
    """This host's wall clock (what the rules must not depend on, except on SQLite)."""
    return datetime.now(UTC)


class DatabaseClock:
    """``clock()`` is now, by the database's clock, in UTC."""

    def __init__(
        self,
        engine: Callable[[], Engine],
        *,
        resync: float = RESYNC_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._resync = resync
        self._monotonic = monotonic
        self._base: datetime | None = None  # the database's time at ...
        self._base_monotonic = 0.0  # ... this monotonic reading
        self._pid = os.getpid()

    def __call__(self) -> datetime:
        engine = self._engine()
        if engine.dialect.name != "postgresql":
            return host_now()
        base = self._base
        stale = self._monotonic() - self._base_monotonic > self._resync
        if base is None or stale or self._pid != os.getpid():
            base = self._sync(engine)
        return base + timedelta(seconds=self._monotonic() - self._base_monotonic)

    def _sync(self, engine: Engine) -> datetime:
        try:
            with engine.connect() as connection:
                before = self._monotonic()
                database_now = connection.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
                after = self._monotonic()
        except sa.exc.DBAPIError:
            if self._base is None or self._pid != os.getpid():
                raise
            # Keep advancing the last reading: a database that is away a moment must not
            # stop the clock (whatever needed the database fails on its own).
            log.warning("could not read the database's clock; advancing the last reading")
            return self._base
        # The reading was taken somewhere in the round trip: its middle is the best guess.
        self._base = database_now.astimezone(UTC)
        self._base_monotonic = (before + after) / 2
        self._pid = os.getpid()
        return self._base


_process_clock: DatabaseClock | None = None


def database_now() -> datetime:
    """Now by the database's clock, for this process (see :class:`DatabaseClock`)."""
    global _process_clock  # noqa: PLW0603 - one per process; it notices a fork itself
    if _process_clock is None:
        from worker.db import get_engine

        _process_clock = DatabaseClock(get_engine)
    return _process_clock()
