"""Prometheus metrics computed from the database (``receipts exporter``).

Every number is read from the tables instead of being counted in process memory, so that one
exporter reports the truth however many workers run, and restarting any process loses nothing.
Metric names are a contract (README "Metrics", deploy/prometheus-alerts.yml).

A scrape stays cheap as the tables grow:

- The work in progress (pending sessions, unacknowledged escalations, undelivered webhooks,
  open refused tasks) is read on every scrape, through partial indexes whose size follows that
  work, not the history.
- The totals that grow with history (resolved and escalated sessions, receipts by result,
  closed refused tasks, the receipt latency histogram) need whole-table counts (seconds at 1M
  sessions): they are counted at most every ``RECEIPTS_EXPORTER_TOTALS_INTERVAL``, in the
  background, one count at a time, and served from a cache whose age is exported as
  ``receipts_totals_age_seconds``.

A scrape that cannot read the database does not crash the exporter: it reports
``receipts_scrape_error 1`` and nothing else, so that no stale or zero value passes for health.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from types import FrameType
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from worker import credentials
from worker.clock import database_now
from worker.db import error_text, read_scope
from worker.domain import FINAL_RESULTS, ReceiptSource, Result, SessionState
from worker.intake import RejectionState
from worker.masking import MASKED_TABLES
from worker.models import (
    api_calls_table,
    event_cursors_table,
    heartbeats_table,
    inbox_table,
    outbox_table,
    parked_batches_table,
    purge_counts_table,
    push_counts_table,
    receipt_events_table,
    receipts_table,
    rejected_table,
    session_events_table,
    sessions_table,
)
from worker.purge import PURGED_TABLES

log = logging.getLogger(__name__)

DEFAULT_PORT = 9464  # the port Prometheus' exporter registry suggests for ad-hoc exporters
# Until the first tick records the real setting; the same default as the stale_sessions view.
DEFAULT_INTERVAL_MAX_SECONDS = 600.0
# A scrape must never pile up queries on a struggling database: Prometheus gives up after its
# scrape_timeout (10 s by default) anyway.
STATEMENT_TIMEOUT_MS = 5000
# The history totals are counted off the scrape path, one count at a time, at most once per
# interval: they may take longer, but not forever.
TOTALS_STATEMENT_TIMEOUT_MS = 60_000
DEFAULT_TOTALS_INTERVAL = timedelta(minutes=5)
# How long the first scrape waits for the first totals before it answers without them.
FIRST_TOTALS_WAIT_SECONDS = 5.0

Now = Callable[[], datetime]

# Upper bounds (seconds) of receipts_receipt_latency_seconds: from a handset that answers at
# once to the default RECEIPTS_CUTOFF (12 h), past which a receipt is late (+Inf).
LATENCY_BUCKETS: tuple[float, ...] = (
    1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 21600, 43200,
)  # fmt: skip
# In a fixed order, so that the exposition's series are always the same ones.
LATENCY_RESULTS = tuple(r for r in Result if r in FINAL_RESULTS)


@dataclass(frozen=True)
class Latency:
    """The latency histogram of one result's final receipts: cumulative counts per bucket of
    LATENCY_BUCKETS (then +Inf, which is ``count``), and the sum of the latencies."""

    buckets: tuple[int, ...]
    count: int
    seconds: float


@dataclass
class Snapshot:
    """The work in progress, read by every scrape."""

    pending: int = 0
    unacknowledged: int = 0
    oldest_pending_sent_at: datetime | None = None
    overdue: int = 0
    last_tick_at: datetime | None = None
    api_calls: list[tuple[str, int, int]] = field(default_factory=list)
    webhooks_pending: int = 0
    webhook_failures: int = 0
    rejected_open: int = 0
    # What the receiver processes counted: (metric, label) -> value (worker/receiver.py).
    push: dict[tuple[str, str], float] = field(default_factory=dict)
    oldest_parked_at: datetime | None = None
    credentials_failing: bool = False
    # Per configured event destination (worker/events.py).
    events: list[EventStream] = field(default_factory=list)
    # Rows the purge deleted, by table (worker/purge.py).
    purged: dict[str, int] = field(default_factory=dict)
    # Rows whose phones the masking replaced, by table (worker/masking.py).
    masked: dict[str, int] = field(default_factory=dict)
    # RECEIPTS_RETENTION as this process has it, in seconds; 0 when unset (keep everything).
    retention_seconds: float = 0.0


@dataclass(frozen=True)
class EventStream:
    """Where one destination's event stream stands."""

    destination: str
    oldest_undelivered_at: datetime | None
    undelivered: int
    delivered: int
    failed_attempts: int
    parked_batches: int
    parked_events: int


@dataclass(frozen=True)
class Totals:
    """What grows with history, counted over whole tables: the slow part, cached."""

    sessions: dict[str, int]  # resolved and escalated (pending is work in progress)
    receipts: dict[str, int]
    computed_at: datetime
    rejected: dict[str, int] = field(default_factory=dict)  # resubmitted and dismissed
    by_source: dict[str, int] = field(default_factory=dict)  # receipts by where they came from
    parked: int = 0  # receipts waiting in the inbox
    latency: dict[str, Latency] = field(default_factory=dict)  # final receipts by result
    oldest_sent_at: datetime | None = None  # of every stored session: what retention bounds


def read_snapshot(session: Session, now: datetime) -> Snapshot:
    """The work in progress, in one transaction. Each query matches a partial index, so its
    cost follows the pending work and the open escalations, not the history."""
    sessions, outbox = sessions_table.c, outbox_table.c
    snap = Snapshot()

    heartbeat = session.execute(
        sa.select(heartbeats_table.c.beat_at, heartbeats_table.c.poll_interval_max_seconds).where(
            heartbeats_table.c.name == "tick"
        )
    ).first()
    interval_max = DEFAULT_INTERVAL_MAX_SECONDS
    if heartbeat is not None:
        snap.last_tick_at = heartbeat.beat_at
        interval_max = heartbeat.poll_interval_max_seconds

    # state = 'pending' is the predicate of the partial indexes ix_sms_sessions_due and
    # ix_sms_sessions_pending_sent_at. Two statements, so that each reads one index alone:
    # the counts need only next_poll_at (in ix_sms_sessions_due: an index-only scan where
    # the table is vacuumed), the oldest sent_at is the first entry of the other. "Overdue" is
    # the stale_sessions view's rule: a poll missed by more than two of the longest intervals.
    pending = sessions.state == SessionState.PENDING.value
    overdue_before = now - timedelta(seconds=2 * interval_max)
    snap.pending, snap.overdue = session.execute(
        sa.select(
            sa.func.count(), sa.func.count().filter(sessions.next_poll_at < overdue_before)
        ).where(pending)
    ).one()
    snap.oldest_pending_sent_at = session.execute(
        sa.select(sa.func.min(sessions.sent_at)).where(pending)
    ).scalar_one()

    # ix_sms_sessions_unacknowledged holds exactly these rows.
    snap.unacknowledged = session.execute(
        sa.select(sa.func.count()).where(
            sessions.state == SessionState.ESCALATED.value, sessions.acknowledged_at.is_(None)
        )
    ).scalar_one()

    # A few rows at most: one per (outcome, RetCode) ever seen.
    calls = api_calls_table.c
    snap.api_calls = [
        (outcome, ret_code, count)
        for outcome, ret_code, count in session.execute(
            sa.select(calls.outcome, calls.ret_code, calls.calls)
        )
    ]

    # Undelivered webhooks: the partial index ix_escalation_outbox_due covers exactly these.
    undelivered = session.execute(
        sa.select(sa.func.count(), sa.func.count().filter(outbox.attempts > 0)).where(
            outbox.delivered_at.is_(None)
        )
    ).one()
    snap.webhooks_pending, snap.webhook_failures = undelivered[0], undelivered[1]

    # Refused receipts.track tasks nobody has handled: the partial index ix_rejected_tracks_open.
    snap.rejected_open = session.execute(
        sa.select(sa.func.count()).where(rejected_table.c.state == RejectionState.OPEN.value)
    ).scalar_one()

    # A few dozen rows at most (outcomes, fates, latency buckets), and the first entry of the
    # inbox's received_at index.
    counts = push_counts_table.c
    snap.push = {
        (metric, label): value
        for metric, label, value in session.execute(
            sa.select(counts.metric, counts.label, counts.value)
        )
    }
    snap.oldest_parked_at = session.execute(
        sa.select(sa.func.min(inbox_table.c.received_at))
    ).scalar_one()
    # One row at most, written by every worker's polls (worker/credentials.py).
    snap.credentials_failing = credentials.failing(session)
    snap.events = read_event_streams(session)
    # One row per table the purge ever deleted from or the masking masked in.
    purged = purge_counts_table.c
    tallies = session.execute(sa.select(purged.table_name, purged.purged, purged.masked)).all()
    snap.purged = {str(row.table_name): int(row.purged) for row in tallies}
    snap.masked = {str(row.table_name): int(row.masked) for row in tallies}
    return snap


# Past this many, the events waiting for a destination are counted as this many: a count that
# follows a long outage's backlog row by row would make every scrape slower as it grows.
UNDELIVERED_CAP = 100_000


def read_event_streams(session: Session) -> list[EventStream]:
    """Each configured destination's stream: the history rows past its cursor (the oldest of
    them, through the primary keys; their count, capped), what it delivered, and its parked
    batches (the partial index of the open ones)."""
    cursors, events, changes = event_cursors_table.c, session_events_table.c, receipt_events_table.c
    parked_c = parked_batches_table.c
    parked = {
        destination: (int(batches), int(total or 0))
        for destination, batches, total in session.execute(
            sa.select(parked_c.destination, sa.func.count(), sa.func.sum(parked_c.events))
            .where(parked_c.state.in_(("parked", "replay")))
            .group_by(parked_c.destination)
        )
    }
    streams = []
    rows = session.execute(
        sa.select(
            cursors.destination, cursors.delivered_id, cursors.delivered_events, cursors.attempts
        )
        .where(cursors.active.is_(True))
        .order_by(cursors.destination)
    ).all()
    for row in rows:
        after = row.delivered_id
        first_change = (
            sa.select(changes.observed_at).where(changes.id > after).order_by(changes.id).limit(1)
        )
        first_event = (
            sa.select(events.occurred_at).where(events.id > after).order_by(events.id).limit(1)
        )
        oldest = [
            t
            for t in (
                session.execute(first_change).scalar(),
                session.execute(first_event).scalar(),
            )
            if t is not None
        ]
        waiting = 0
        for table, extra in ((changes, changes.applied.is_(True)), (events, sa.true())):
            capped = (
                sa.select(table.id).where(table.id > after, extra).limit(UNDELIVERED_CAP).subquery()
            )
            waiting += session.execute(sa.select(sa.func.count()).select_from(capped)).scalar_one()
        batches, total = parked.get(row.destination, (0, 0))
        streams.append(
            EventStream(
                destination=row.destination,
                oldest_undelivered_at=min(oldest) if oldest else None,
                undelivered=min(waiting, UNDELIVERED_CAP),
                delivered=int(row.delivered_events),
                failed_attempts=int(row.attempts),
                parked_batches=batches,
                parked_events=total,
            )
        )
    return streams


def read_totals(session: Session, now: datetime) -> Totals:
    """Resolved and escalated sessions, and receipts by result: whole-table counts, since no
    index narrows a count over the history (it is the history). Exact, not estimated from
    pg_class.reltuples: an estimate that drifts would read as a change."""
    sessions, receipts = sessions_table.c, receipts_table.c
    by_state = (
        sa.select(sessions.state, sa.func.count())
        .where(sessions.state != SessionState.PENDING.value)
        .group_by(sessions.state)
    )
    by_result = sa.select(receipts.result, sa.func.count()).group_by(receipts.result)
    rejected = rejected_table.c
    closed = (
        sa.select(rejected.state, sa.func.count())
        .where(rejected.state != RejectionState.OPEN.value)
        .group_by(rejected.state)
    )
    by_source = sa.select(receipts.source, sa.func.count()).group_by(receipts.source)
    return Totals(
        sessions=dict(session.execute(by_state).all()),
        receipts=dict(session.execute(by_result).all()),
        computed_at=now,
        rejected=dict(session.execute(closed).all()),
        by_source=dict(session.execute(by_source).all()),
        parked=session.execute(sa.select(sa.func.count()).select_from(inbox_table)).scalar_one(),
        latency=read_latency(session),
        # No index on sent_at over every state: a whole-table read, like the counts above.
        oldest_sent_at=session.execute(sa.select(sa.func.min(sessions.sent_at))).scalar_one(),
    )


def read_latency(session: Session) -> dict[str, Latency]:
    """Receipt time minus sent time of every final receipt that has a receipt time, by result,
    bucketed in SQL: one pass over the receipts, hash-joined to their sessions for sent_at,
    returning three rows whatever the history's size (the dearest of the totals: about 3 s
    at 1M receipts, measured with ``python -m bench.scrape``).
    A receipt time before the session's sent_at (a sent_at given late, a skewed clock) counts
    as 0 s, not as a negative latency."""
    statement = _latency_statement(session.get_bind().dialect.name)
    latency = {}
    for row in session.execute(statement):
        result, count, seconds, *buckets = row
        latency[result] = Latency(
            buckets=tuple(int(b) for b in buckets), count=int(count), seconds=float(seconds or 0)
        )
    return latency


def latency_of(seconds: Iterable[float]) -> Latency:
    """The histogram of some latencies (seconds): the rule :func:`read_latency` applies in
    SQL, in Python (tests check that the two agree)."""
    values = [max(value, 0.0) for value in seconds]
    return Latency(
        buckets=tuple(sum(1 for value in values if value <= bound) for bound in LATENCY_BUCKETS),
        count=len(values),
        seconds=float(sum(values)),
    )


@cache
def _latency_statement(dialect: str) -> sa.Select[Any]:
    receipts, sessions = receipts_table.c, sessions_table.c
    if dialect == "postgresql":
        # date_part is double precision, where extract() is numeric: numeric comparisons,
        # one per bucket and row, made the count about twice as slow at 1M receipts. An
        # interval counts whole microseconds, so a boundary value still lands in its bucket.
        elapsed: sa.ColumnElement[Any] = sa.func.date_part(
            "epoch", receipts.receipt_time - sessions.sent_at
        )
    else:
        # SQLite stores UTC text; julianday's double carries about 20 microseconds of error,
        # rounded away to the millisecond so that a boundary value lands in its bucket.
        elapsed = sa.func.round(
            (sa.func.julianday(receipts.receipt_time) - sa.func.julianday(sessions.sent_at))
            * 86400.0,
            3,
        )
    latencies = (
        sa.select(receipts.result, elapsed.label("seconds"))
        .join(
            sessions_table,
            sa.and_(
                sessions.account_id == receipts.account_id,
                sessions.session_no == receipts.session_no,
            ),
        )
        .where(
            receipts.result.in_([r.value for r in LATENCY_RESULTS]),
            receipts.receipt_time.is_not(None),
        )
        .subquery()
    )
    seconds = sa.case((latencies.c.seconds < 0, 0), else_=latencies.c.seconds)
    return sa.select(
        latencies.c.result,
        sa.func.count(),
        sa.func.sum(seconds),
        *(sa.func.count().filter(latencies.c.seconds <= bound) for bound in LATENCY_BUCKETS),
    ).group_by(latencies.c.result)


@contextmanager
def _read_scope_with_timeout(milliseconds: int) -> Iterator[Session]:
    with read_scope() as session:
        if session.get_bind().dialect.name == "postgresql":
            # LOCAL: ends with this transaction, so the pooled connection is unchanged.
            session.execute(sa.text(f"SET LOCAL statement_timeout = {int(milliseconds)}"))
        yield session


class TotalsCache:
    """The history totals, recounted in a background thread when a scrape finds them
    ``interval`` old, one count at a time: however often Prometheus scrapes (and however many
    Prometheus servers do), the tables are counted whole at most once per interval. A failed
    count keeps the last totals (their age keeps growing, which is what an alert watches) and
    is tried again an interval later. The first scrape waits a little for the first count."""

    def __init__(self, interval: timedelta, *, first_wait: float = FIRST_TOTALS_WAIT_SECONDS):
        self.interval = interval
        self.first_wait = first_wait
        self._lock = threading.Lock()
        self._totals: Totals | None = None
        self._attempted_at: datetime | None = None
        self._counting: threading.Thread | None = None

    def get(self, now: datetime) -> Totals | None:
        with self._lock:
            due = self._counting is None and (
                self._attempted_at is None
                or now - self._attempted_at >= self.interval
                or now < self._attempted_at  # the clock went back: count again
            )
            if due:
                self._attempted_at = now
                self._counting = threading.Thread(
                    target=self._count, args=(now,), name="receipts-totals", daemon=True
                )
                self._counting.start()
            counting, totals = self._counting, self._totals
        if totals is None and counting is not None:
            counting.join(self.first_wait)
            with self._lock:
                totals = self._totals
        return totals

    def _count(self, now: datetime) -> None:
        try:
            with _read_scope_with_timeout(TOTALS_STATEMENT_TIMEOUT_MS) as session:
                totals = read_totals(session, now)
        except Exception as exc:  # any failure: keep the last totals, try again later
            log.error("metrics totals count failed: %s", error_text(exc))
            totals = None
        with self._lock:
            if totals is not None:
                self._totals = totals
            self._counting = None


def _seconds_since(then: datetime | None, now: datetime) -> float | None:
    return None if then is None else (now - then).total_seconds()


class ReceiptsCollector(Collector):
    """Reads the work in progress on each ``collect()`` and the history totals from its cache;
    ``now`` is injectable for tests."""

    def __init__(
        self, now: Now = database_now, *, totals_interval: timedelta = DEFAULT_TOTALS_INTERVAL
    ) -> None:
        self._now = now
        self._totals = TotalsCache(totals_interval)

    def collect(self) -> Iterable[Metric]:
        try:
            now = self._now()
            with _read_scope_with_timeout(STATEMENT_TIMEOUT_MS) as session:
                snap = read_snapshot(session, now)
            snap.retention_seconds = _retention_seconds()
        except Exception as exc:  # any failure, settings included: report it, keep serving
            # One line, not a traceback: a broken database fails every scrape, every 15 s.
            # What to do about it when it is a known problem of the setup (worker/problems.py).
            log.error("metrics scrape failed: %s", _scrape_problem(exc))
            yield _scrape_error(1)
            return
        yield from _metrics(snap, self._totals.get(now), now)
        yield _scrape_error(0)


def _retention_seconds() -> float:
    from worker.config import get_settings

    retention = get_settings().retention
    return retention.total_seconds() if retention is not None else 0.0


def _scrape_problem(exc: BaseException) -> str:
    """A failed scrape's cause in one line: the setup's problem with what to do (run receipts
    migrate, a server that does not answer), else the database's error text."""
    from worker.config import get_settings
    from worker.problems import EXIT_BUG, explain

    try:
        url: str | None = get_settings().database_url
    except Exception:  # the settings themselves failed: their error says it
        url = None
    problem = explain(exc, database_url=url)
    return error_text(exc) if problem.exit_code == EXIT_BUG else problem.line


def _scrape_error(value: int) -> GaugeMetricFamily:
    return _gauge(
        "receipts_scrape_error", "1 when this scrape could not read the database, else 0.", value
    )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _metrics(snap: Snapshot, totals: Totals | None, now: datetime) -> Iterator[Metric]:
    sessions = GaugeMetricFamily(
        "receipts_sessions",
        "Tracked sessions by state: pending on every scrape; resolved and escalated as of "
        "receipts_totals_age_seconds ago.",
        labels=["state"],
    )
    # Every state always, 0 when none: a missing series would read as "unknown", not "none";
    # without totals yet, resolved and escalated are unknown, so they are left out.
    for state in SessionState:
        if state == SessionState.PENDING:
            sessions.add_metric([state.value], snap.pending)
        elif totals is not None:
            sessions.add_metric([state.value], totals.sessions.get(state.value, 0))
    yield sessions

    yield _gauge(
        "receipts_escalations_unacknowledged",
        "Escalated sessions nobody has acknowledged yet (receipts stale; receipts ack).",
        snap.unacknowledged,
    )
    oldest = _seconds_since(snap.oldest_pending_sent_at, now)
    yield _gauge(
        "receipts_oldest_pending_age_seconds",
        "Seconds since the oldest pending session was sent; 0 when none is pending.",
        # A sender may track a session with a sent_at slightly in the future: not an age.
        max(oldest, 0.0) if oldest is not None else 0.0,
    )
    tick_age = _seconds_since(snap.last_tick_at, now)
    yield _gauge(
        "receipts_last_tick_age_seconds",
        "Seconds since beat's last tick was processed; NaN when no tick was ever recorded "
        "(alert on NaN and on absence too, not only on a large value).",
        # NaN, not 0: "never ticked" must not look like "just ticked".
        tick_age if tick_age is not None else math.nan,
    )
    yield _gauge(
        "receipts_overdue_sessions",
        "Pending sessions whose next poll is late by more than two maximum poll intervals.",
        snap.overdue,
    )

    api_calls = CounterMetricFamily(
        "receipts_api_calls",
        "Uspeedo API calls by outcome (ok, retcode, http, transport, malformed, deadline) and "
        "RetCode or HTTP status (0 when none).",
        labels=["outcome", "ret_code"],
    )
    for outcome, ret_code, calls in sorted(snap.api_calls):
        api_calls.add_metric([outcome, str(ret_code)], calls)
    yield api_calls

    yield _gauge(
        "receipts_webhooks_pending",
        "Escalation webhooks not delivered yet.",
        snap.webhooks_pending,
    )
    yield _gauge(
        "receipts_webhook_delivery_failures",
        "Undelivered escalation webhooks that have failed at least one attempt.",
        snap.webhook_failures,
    )

    yield _gauge(
        "receipts_credentials_failing",
        "1 while the API's last word on the credentials was a refusal (RetCode 215398: a wrong "
        "or expired AccessKey, or a clock more than 5 minutes off), else 0.",
        int(snap.credentials_failing),
    )

    receipts = GaugeMetricFamily(
        "receipts_receipts",
        "Latest known receipts (one per phone) by result, as of receipts_totals_age_seconds ago.",
        labels=["result"],
    )
    if totals is not None:
        for result in Result:
            receipts.add_metric([result.value], totals.receipts.get(result.value, 0))
    yield receipts

    rejected = GaugeMetricFamily(
        "receipts_rejected_tracks",
        "receipts.track tasks refused by validation (receipts rejected): open on every scrape; "
        "resubmitted and dismissed as of receipts_totals_age_seconds ago.",
        labels=["state"],
    )
    rejected.add_metric([RejectionState.OPEN.value], snap.rejected_open)
    if totals is not None:
        for closed in (RejectionState.RESUBMITTED, RejectionState.DISMISSED):
            rejected.add_metric([closed.value], totals.rejected.get(closed.value, 0))
    yield rejected

    yield from _push_metrics(snap, totals, now)
    yield from _event_metrics(snap, now)
    yield from _purge_metrics(snap, totals)

    if totals is not None:
        yield _latency_histogram(totals.latency)

    yield _gauge(
        "receipts_totals_age_seconds",
        "Seconds since the totals that grow with history (resolved and escalated sessions, "
        "receipts by result) were counted; NaN before the first count.",
        (now - totals.computed_at).total_seconds() if totals is not None else math.nan,
    )


def _purge_metrics(snap: Snapshot, totals: Totals | None) -> Iterator[Metric]:
    purged = CounterMetricFamily(
        "receipts_purged_rows",
        "Rows deleted by the purge of finished sessions past retention (receipts purge, "
        "RECEIPTS_RETENTION), by table.",
        labels=["table"],
    )
    for table in PURGED_TABLES:
        purged.add_metric([table], snap.purged.get(table, 0))
    yield purged
    masked = CounterMetricFamily(
        "receipts_masked_rows",
        "Rows whose phone numbers were masked (receipts mask, RECEIPTS_MASK_PHONES_AFTER), by "
        "table.",
        labels=["table"],
    )
    for table in MASKED_TABLES:
        masked.add_metric([table], snap.masked.get(table, 0))
    yield masked
    # So that an alert can compare the oldest session with the retention the purge keeps to
    # (deploy/prometheus-alerts.yml, ReceiptsPurgeBehind): the exporter is given the same
    # settings as the beat that queues the purge.
    yield _gauge(
        "receipts_retention_seconds",
        "RECEIPTS_RETENTION in seconds, as the exporter was configured; 0 when unset (nothing "
        "is purged).",
        snap.retention_seconds,
    )
    if totals is not None:
        oldest = _seconds_since(totals.oldest_sent_at, totals.computed_at)
        yield _gauge(
            "receipts_oldest_session_age_seconds",
            "Seconds since the oldest stored session (any state) was sent, as of "
            "receipts_totals_age_seconds ago; 0 when none. With RECEIPTS_RETENTION set it stays "
            "near the retention plus a day, unless sessions are held back (pending, "
            "unacknowledged, undelivered).",
            max(oldest, 0.0) if oldest is not None else 0.0,
        )


def _event_metrics(snap: Snapshot, now: datetime) -> Iterator[Metric]:
    """The event streams to the sender's application, one series per configured destination."""
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        "lag": GaugeMetricFamily(
            "receipts_events_lag_seconds",
            "Seconds since the oldest change not yet delivered to the destination occurred; 0 "
            "when it is caught up.",
            labels=["destination"],
        ),
        "undelivered": GaugeMetricFamily(
            "receipts_events_undelivered",
            "Changes of the history past the destination's cursor (events waiting, and rows "
            f"of types not selected that it will pass over), counted up to {UNDELIVERED_CAP}.",
            labels=["destination"],
        ),
        "delivered": CounterMetricFamily(
            "receipts_events_delivered",
            "Events the destination acknowledged (a 2xx, or the broker took the task).",
            labels=["destination"],
        ),
        "failing": GaugeMetricFamily(
            "receipts_events_failed_attempts",
            "Failed attempts of the batch the destination is retrying; 0 when it is not.",
            labels=["destination"],
        ),
        "parked": GaugeMetricFamily(
            "receipts_events_parked",
            "Events in batches parked after failing for RECEIPTS_EVENTS_RETRY_WINDOW, not "
            "replayed or dismissed (receipts_parked_event_batches).",
            labels=["destination"],
        ),
        "parked_batches": GaugeMetricFamily(
            "receipts_events_parked_batches",
            "Batches parked after failing for RECEIPTS_EVENTS_RETRY_WINDOW, not replayed or "
            "dismissed.",
            labels=["destination"],
        ),
    }
    for stream in snap.events:
        label = [stream.destination]
        lag = _seconds_since(stream.oldest_undelivered_at, now)
        families["lag"].add_metric(label, max(lag, 0.0) if lag is not None else 0.0)
        families["undelivered"].add_metric(label, stream.undelivered)
        families["delivered"].add_metric(label, stream.delivered)
        families["failing"].add_metric(label, stream.failed_attempts)
        families["parked"].add_metric(label, stream.parked_events)
        families["parked_batches"].add_metric(label, stream.parked_batches)
    yield from families.values()


def _latency_histogram(latency: dict[str, Latency]) -> HistogramMetricFamily:
    histogram = HistogramMetricFamily(
        "receipts_receipt_latency_seconds",
        "Seconds from a session's sent_at to the receipt_time of its phones' final receipts "
        "(the latest one of each phone), by result, as of receipts_totals_age_seconds ago. "
        "Grows by each final receipt recorded; purging sessions lowers it (read as a reset).",
        labels=["result"],
    )
    empty = Latency(buckets=(0,) * len(LATENCY_BUCKETS), count=0, seconds=0.0)
    # Every final result always, 0 when none (a missing series reads as "unknown").
    for result in LATENCY_RESULTS:
        counts = latency.get(result.value, empty)
        buckets = [
            (_bucket_label(bound), count)
            for bound, count in zip(LATENCY_BUCKETS, counts.buckets, strict=True)
        ]
        buckets.append(("+Inf", counts.count))
        histogram.add_metric([result.value], buckets, sum_value=counts.seconds)
    return histogram


def _bucket_label(bound: float) -> str:
    # Prometheus' own spelling of a bound (1.0, 43200.0), as prometheus_client writes it.
    return repr(float(bound))


# What worker/receiver.py counts (its outcomes, and its receipts' fates).
PUSH_OUTCOMES = ("ok", "ignored", "bad_request", "too_large", "unavailable")
PUSH_FATES = ("stored", "parked", "skipped", "refused")


def _push_metrics(snap: Snapshot, totals: Totals | None, now: datetime) -> Iterator[Metric]:
    """Uspeedo's push as the receivers saw it (worker/receiver.py), and the inbox."""
    push = snap.push
    requests = CounterMetricFamily(
        "receipts_push_requests",
        "Push requests received, by outcome (ok, ignored: a MsgType other than 2, bad_request, "
        "too_large, unavailable: the database could not take them).",
        labels=["outcome"],
    )
    receipts = CounterMetricFamily(
        "receipts_push_receipts",
        "Pushed receipts by fate (stored, parked in the inbox, skipped as malformed, refused "
        "by the database).",
        labels=["fate"],
    )
    # Every outcome and fate always, 0 when none (a missing series reads as "unknown").
    counted: dict[str, dict[str, float]] = {
        "requests": dict.fromkeys(PUSH_OUTCOMES, 0.0),
        "receipts": dict.fromkeys(PUSH_FATES, 0.0),
    }
    buckets: list[tuple[str, float]] = []
    for (metric, label), value in sorted(push.items()):
        if metric in counted:
            counted[metric][label] = value
        elif metric == "latency_bucket" and label != "+Inf":
            buckets.append((label, value))
    for label, value in sorted(counted["requests"].items()):
        requests.add_metric([label], value)
    for label, value in sorted(counted["receipts"].items()):
        receipts.add_metric([label], value)
    yield requests
    yield receipts
    buckets.sort(key=lambda bucket: float(bucket[0]))
    buckets.append(("+Inf", push.get(("latency_bucket", "+Inf"), 0.0)))
    yield HistogramMetricFamily(
        "receipts_push_commit_seconds",
        "Seconds from a push's arrival to its receipts' commit (answered 200).",
        buckets=buckets,
        sum_value=push.get(("latency_sum", ""), 0.0),
    )
    last = push.get(("last_push", ""))
    yield _gauge(
        "receipts_push_last_seen_age_seconds",
        "Seconds since a receiver last got a push; NaN when none ever did (alert when it grows "
        "while polls still find receipts: the push has gone quiet).",
        now.timestamp() - last if last else math.nan,
    )
    oldest = _seconds_since(snap.oldest_parked_at, now)
    yield _gauge(
        "receipts_inbox_oldest_age_seconds",
        "Seconds since the oldest pushed receipt waiting for its SessionNo to be tracked was "
        "received; 0 when the inbox is empty.",
        max(oldest, 0.0) if oldest is not None else 0.0,
    )
    inbox = GaugeMetricFamily(
        "receipts_inbox_receipts",
        "Pushed receipts waiting for their SessionNo to be tracked, as of "
        "receipts_totals_age_seconds ago.",
    )
    by_source = GaugeMetricFamily(
        "receipts_receipts_by_source",
        "Latest known receipts by where they came from (poll, push, repoll), as of "
        "receipts_totals_age_seconds ago.",
        labels=["source"],
    )
    if totals is not None:
        inbox.add_metric([], totals.parked)
        for source in ReceiptSource:
            by_source.add_metric([source.value], totals.by_source.get(source.value, 0))
    yield inbox
    yield by_source


def make_registry(
    now: Now = database_now, *, totals_interval: timedelta = DEFAULT_TOTALS_INTERVAL
) -> CollectorRegistry:
    """A fresh registry holding only our collector: the exporter exposes the database's
    numbers, not the exporter process's own (those would differ per replica)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReceiptsCollector(now, totals_interval=totals_interval))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition a scrape would get."""
    return generate_latest(registry)


def metrics_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/metrics"


def serve(
    port: int,
    host: str,
    *,
    totals_interval: timedelta = DEFAULT_TOTALS_INTERVAL,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve ``/metrics`` until Ctrl-C or SIGTERM. ``announce`` gets the URL once listening
    (with the real port when ``port`` is 0)."""
    registry = make_registry(totals_interval=totals_interval)
    server, thread = start_http_server(port, addr=host, registry=registry)
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        # SIGTERM too: as a container's PID 1, a process without a handler ignores it and
        # `docker stop` has to wait for SIGKILL.
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
    if announce is not None:
        announce(metrics_url(host, server.server_address[1]))
    try:
        # Wakes up now and then so that a signal is acted on promptly on every platform.
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:  # when not in the main thread, Ctrl-C still arrives this way
        pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
