"""The API's word on the credentials while the workers run, shared through the database.

A poll refused with RetCode 215398 (a wrong or expired AccessKey, or this host's clock more
than five minutes off Uspeedo's) records the refusal in ``receipts_credentials``; the first
answer that comes through after it records that. The credentials are failing while the last
refusal is the newer: :func:`is_failing` is the rule, :func:`failing_clause` its SQL twin (read
by ``receipts exporter`` as ``receipts_credentials_failing``), and the ``credentials`` row of
the ``stale_sessions`` view (migration 0005) the other; a test checks that the three agree.

An acceptance is written only when it ends a refusal, so a healthy fleet never writes the
row. Each process logs a refusal as one ERROR line with the hint at most once a minute
(:class:`RefusalLog`), not once per poll: the refused sessions keep their schedule and are
polled again, so that they resolve once the credentials are fixed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Final

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.db import upsert_insert
from worker.errors import CREDENTIALS_HINT, CredentialsError
from worker.models import credentials_table

log = logging.getLogger(__name__)

# The one row's name.
STATUS: Final = "api"
# At most one ERROR line per process in this many seconds.
LOG_EVERY: Final = 60.0


def is_failing(refused_at: datetime | None, accepted_at: datetime | None) -> bool:
    """Whether the credentials are failing: refused, and not accepted since."""
    return refused_at is not None and (accepted_at is None or accepted_at < refused_at)


def failing_clause() -> sa.ColumnElement[bool]:
    """:func:`is_failing` of the status row, in SQL."""
    c = credentials_table.c
    return sa.and_(
        c.name == STATUS,
        c.refused_at.is_not(None),
        sa.or_(c.accepted_at.is_(None), c.accepted_at < c.refused_at),
    )


def record(session: Session, *, refusal: str | None, accepted: bool, now: datetime) -> None:
    """Record the API's last word in a poll: a refusal (its text), or an answer that came
    through (``accepted``), or nothing when it said neither (a transport error, a server
    error: those tell nothing of the credentials)."""
    if refusal is not None:
        statement = upsert_insert(session, credentials_table).values(
            name=STATUS, refused_at=now, refusal=refusal
        )
        session.execute(
            statement.on_conflict_do_update(
                index_elements=["name"],
                set_={
                    "refused_at": statement.excluded.refused_at,
                    "refusal": statement.excluded.refusal,
                },
            )
        )
    elif accepted:
        # Matches no row while nothing is failing: no write, no row lock.
        session.execute(
            sa.update(credentials_table).where(failing_clause()).values(accepted_at=now)
        )


def failing(session: Session) -> bool:
    return bool(session.scalar(sa.select(sa.exists().where(failing_clause()))))


class RefusalLog:
    """Logs a refusal as one ERROR line with the hint, at most once every ``every`` seconds
    in a process, counting the refusals it kept quiet about in between."""

    def __init__(
        self, every: float = LOG_EVERY, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.every = every
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._logged_at: float | None = None
        self._quiet = 0

    def refused(self, error: CredentialsError) -> bool:
        """Log ``error`` unless a line was logged less than ``every`` ago; True if logged."""
        now = self._monotonic()
        with self._lock:
            if self._logged_at is not None and now - self._logged_at < self.every:
                self._quiet += 1
                return False
            quiet, self._quiet, self._logged_at = self._quiet, 0, now
        since = f"; {quiet} more refusal(s) since the last such line, not logged" if quiet else ""
        log.error(
            "Uspeedo refused the credentials (%s): %s, or this host's clock is more than 5 "
            "minutes off (`receipts check` tells which); the sessions stay scheduled and "
            "resolve once the API accepts the credentials again%s",
            error,
            CREDENTIALS_HINT,
            since,
        )
        return True


# This process's log of refusals (a pool child inherits it before its first poll).
REFUSALS = RefusalLog()
