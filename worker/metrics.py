"""Prometheus metrics computed from the database (``receipts exporter``).

Every number is read from the tables on each scrape instead of being counted in process memory,
so that one exporter reports the truth however many workers run, and restarting any process
loses nothing. Metric names are a contract (README "Metrics", deploy/prometheus-alerts.yml).

A scrape that cannot read the database does not crash the exporter: it reports
``receipts_scrape_error 1`` and nothing else, so that no stale or zero value passes for health.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import FrameType

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session

from worker.clock import database_now
from worker.db import read_scope
from worker.domain import Result, SessionState
from worker.models import (
    api_calls_table,
    heartbeats_table,
    outbox_table,
    receipts_table,
    sessions_table,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 9464  # the port Prometheus' exporter registry suggests for ad-hoc exporters
# Until the first tick records the real setting; the same default as the stale_sessions view.
DEFAULT_INTERVAL_MAX_SECONDS = 600.0
# A scrape must never pile up queries on a struggling database: Prometheus gives up after its
# scrape_timeout (10 s by default) anyway.
STATEMENT_TIMEOUT_MS = 5000

Now = Callable[[], datetime]


@dataclass
class Snapshot:
    """What one scrape read from the database."""

    sessions: dict[str, int] = field(default_factory=dict)
    unacknowledged: int = 0
    oldest_pending_sent_at: datetime | None = None
    overdue: int = 0
    last_tick_at: datetime | None = None
    api_calls: list[tuple[str, int, int]] = field(default_factory=list)
    webhooks_pending: int = 0
    webhook_failures: int = 0
    receipts: dict[str, int] = field(default_factory=dict)


def read_snapshot(session: Session, now: datetime) -> Snapshot:
    """All the metrics' numbers, read in one transaction with a handful of cheap queries."""
    sessions, receipts, outbox = sessions_table.c, receipts_table.c, outbox_table.c
    snap = Snapshot()

    # One pass over sms_sessions for both the per-state counts and the unacknowledged
    # escalations. No index helps a GROUP BY over every state (resolved sessions are the whole
    # history), so this is a full scan whose cost grows with the table: acceptable at scrape
    # intervals of 15-60 s. Exact counts are the point (alerts fire on 1); should the table
    # outgrow that, prune resolved history rather than estimate from pg_class.reltuples.
    by_state = sa.select(
        sessions.state,
        sa.func.count(),
        sa.func.count().filter(sessions.acknowledged_at.is_(None)),
    ).group_by(sessions.state)
    for state, count, unacknowledged in session.execute(by_state):
        snap.sessions[state] = count
        if state == SessionState.ESCALATED:
            snap.unacknowledged = unacknowledged

    heartbeat = session.execute(
        sa.select(heartbeats_table.c.beat_at, heartbeats_table.c.poll_interval_max_seconds).where(
            heartbeats_table.c.name == "tick"
        )
    ).first()
    interval_max = DEFAULT_INTERVAL_MAX_SECONDS
    if heartbeat is not None:
        snap.last_tick_at = heartbeat.beat_at
        interval_max = heartbeat.poll_interval_max_seconds

    # Pending sessions only: the state = 'pending' predicate matches the partial indexes
    # (ix_sms_sessions_pending_sent_at, ix_sms_sessions_due), so the cost follows the pending
    # work, not the history. "Overdue" is the stale_sessions view's rule: a poll missed by
    # more than two of the longest intervals.
    overdue_before = now - timedelta(seconds=2 * interval_max)
    pending_row = session.execute(
        sa.select(
            sa.func.min(sessions.sent_at),
            sa.func.count().filter(sessions.next_poll_at < overdue_before),
        ).where(sessions.state == SessionState.PENDING.value)
    ).one()
    snap.oldest_pending_sent_at, snap.overdue = pending_row[0], pending_row[1]

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

    # Like the sessions, a full scan of sms_receipts (one row per phone): the same trade-off.
    by_result = sa.select(receipts.result, sa.func.count()).group_by(receipts.result)
    snap.receipts = dict(session.execute(by_result).all())
    return snap


def _seconds_since(then: datetime | None, now: datetime) -> float | None:
    return None if then is None else (now - then).total_seconds()


class ReceiptsCollector(Collector):
    """Reads the database on each ``collect()``; ``now`` is injectable for tests."""

    def __init__(self, now: Now = database_now) -> None:
        self._now = now

    def collect(self) -> Iterable[Metric]:
        now = self._now()
        try:
            with read_scope() as session:
                if session.get_bind().dialect.name == "postgresql":
                    # LOCAL: ends with this transaction, so the pooled connection is unchanged.
                    timeout = f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"
                    session.execute(sa.text(timeout))
                snap = read_snapshot(session, now)
        except Exception as exc:  # any failure, settings included: report it, keep serving
            # One line, not a traceback: a broken database fails every scrape, every 15 s.
            log.error("metrics scrape failed: %s: %s", type(exc).__name__, exc)
            yield _scrape_error(1)
            return
        yield from _metrics(snap, now)
        yield _scrape_error(0)


def _scrape_error(value: int) -> GaugeMetricFamily:
    return _gauge(
        "receipts_scrape_error", "1 when this scrape could not read the database, else 0.", value
    )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _metrics(snap: Snapshot, now: datetime) -> Iterator[Metric]:
    sessions = GaugeMetricFamily(
        "receipts_sessions", "Tracked sessions by state.", labels=["state"]
    )
    # Every state always, 0 when none: a missing series would read as "unknown", not "none".
    for state in SessionState:
        sessions.add_metric([state.value], snap.sessions.get(state.value, 0))
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

    receipts = GaugeMetricFamily(
        "receipts_receipts", "Latest known receipts (one per phone) by result.", labels=["result"]
    )
    for result in Result:
        receipts.add_metric([result.value], snap.receipts.get(result.value, 0))
    yield receipts


def make_registry(now: Now = database_now) -> CollectorRegistry:
    """A fresh registry holding only our collector: the exporter exposes the database's
    numbers, not the exporter process's own (those would differ per replica)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReceiptsCollector(now))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition a scrape would get."""
    return generate_latest(registry)


def metrics_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/metrics"


def serve(port: int, host: str, *, announce: Callable[[str], None] | None = None) -> None:
    """Serve ``/metrics`` until Ctrl-C or SIGTERM. ``announce`` gets the URL once listening
    (with the real port when ``port`` is 0)."""
    registry = make_registry()
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
