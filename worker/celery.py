"""The Celery app, importable as ``worker.celery:app`` so that ``celery -A worker.celery`` works.

Every setting below is chosen on purpose:

- ``task_acks_late``: a message is acknowledged after its task ran, so a worker that dies
  mid-task leaves the message to be delivered again instead of losing it.
- ``task_reject_on_worker_lost`` stays off for polls: a lost poll is recovered by its claim's
  lease in the database, and re-running a task that kills its child would loop. ``track`` turns
  it on for itself, since it is idempotent and its data exists nowhere else yet.
- ``worker_prefetch_multiplier = 1``: a worker holds one message per process, so a busy or
  killed worker strands as little as possible and work spreads across workers.
- ``visibility_timeout`` (Redis) is longer than the longest task (``task_time_limit``), so a
  slow task is never handed to a second worker while the first still runs it.
- No result backend: nothing reads task results; the database holds every outcome.
- Ticks go to their own queue so a backlog of polls cannot delay the clock, and they expire
  after one tick: ticks missed while no worker ran are dropped, not replayed in a burst.
  Poll tasks expire when their claim's lease ends (``worker/tasks.py``).
- The embedded broker (no ``RECEIPTS_BROKER_URL``) is kombu's filesystem transport writing
  each message whole (``worker/embedded_broker.py``), its folder polled every 0.1 s, and a
  tick on it queues no more polls than the worker starts within a claim lease.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    beat_init,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)
from kombu.connection import Connection

# The task time limits are defined with the settings, which check that a poll fits inside them.
from worker.config import TASK_SOFT_TIME_LIMIT, TASK_TIME_LIMIT, Settings, get_settings

POLL_QUEUE = "receipts"
CLOCK_QUEUE = "receipts-clock"
# Celery's default queue: where `send_task("receipts.track", ...)` from another codebase's
# app lands when it names no queue, so workers consume it too.
FOREIGN_QUEUE = "celery"
QUEUES = (POLL_QUEUE, CLOCK_QUEUE, FOREIGN_QUEUE)
# Tasks that run every tick whatever there is to do: Celery's lines about them are DEBUG lines
# (worker/logs.py: RoutineTasks); the tick logs at INFO when it escalated or dispatched.
ROUTINE_TASKS = ("receipts.tick",)


# How long the embedded broker's consumer sleeps when every queue is empty or the worker holds
# as many messages as it may. kombu's default, 1 s, capped a worker at about 2 messages/s;
# 0.1 s costs an idle worker 0.3% of a core (0.02 s: 1.3%) and a message at most 0.1 s of
# a tick, and a smaller value did not move the throughput (measured: bench/embedded.py).
EMBEDDED_POLLING_INTERVAL = 0.1
# Poll tasks `receipts run` starts per second on the embedded defaults (SQLite and the folder
# broker, two pool processes), at the low end of what bench/embedded.py measured on 2 cores
# with the simulator when saturated (8 to 18). A tick on the embedded broker queues no more
# than this many per claim lease (less those still queued), so that what it queues starts
# before its lease ends: the queue does not fill with claims that expire while their
# sessions wait. It bounds the queue, not the rate: a faster worker drains it sooner and the
# next tick refills it. See README "Embedded defaults".
EMBEDDED_POLLS_PER_SECOND = 8

# The embedded broker's subfolders inside RECEIPTS_BROKER_DIR: messages, processed messages, and
# kombu's exchange tables (which it would otherwise write to ./control).
BROKER_SUBFOLDERS = ("queue", "processed", "control")
EMBEDDED_BROKER_URL = "filesystem://localhost/"


def broker_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The broker URL and transport options; no URL means the embedded filesystem broker.

    Creates nothing: importing the app must not leave folders behind (see
    :func:`make_broker_folders`, run when a worker or beat starts).
    """
    if settings.broker_url:
        return settings.broker_url, {"visibility_timeout": 3600}
    folder = Path(settings.broker_dir).resolve()
    # A host, which the folders make meaningless, so that kombu does not warn "No hostname
    # was supplied. Reverting to default 'localhost'" in every process that connects.
    return EMBEDDED_BROKER_URL, {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
        "polling_interval": EMBEDDED_POLLING_INTERVAL,
    }


# The embedded broker's kombu transport: the filesystem one, writing each message whole.
EMBEDDED_TRANSPORT = "worker.embedded_broker:Transport"


def broker_transport(settings: Settings) -> str | None:
    """The kombu transport class to use: ours for the embedded broker, else the URL's."""
    return None if settings.broker_url else EMBEDDED_TRANSPORT


def broker_connection(settings: Settings) -> Any:
    """A kombu connection to the configured broker (not connected until used)."""
    url, transport_options = broker_options(settings)
    # kombu's Connection and its channels carry no annotations.
    return Connection(  # type: ignore[no-untyped-call]
        url, transport=broker_transport(settings), transport_options=transport_options
    )


def make_broker_folders(settings: Settings) -> None:
    """Create the embedded broker's folders (nothing to do for a real broker)."""
    if settings.broker_url:
        return
    folder = Path(settings.broker_dir).resolve()
    for sub in BROKER_SUBFOLDERS:
        (folder / sub).mkdir(parents=True, exist_ok=True)


def celery_config(settings: Settings) -> dict[str, Any]:
    broker_url, transport_options = broker_options(settings)
    return {
        "broker_url": broker_url,
        "broker_transport": broker_transport(settings),
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,
        "task_time_limit": TASK_TIME_LIMIT,
        "task_soft_time_limit": TASK_SOFT_TIME_LIMIT,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": POLL_QUEUE,
        "task_routes": {"receipts.tick": {"queue": CLOCK_QUEUE}},
        "beat_schedule": beat_schedule(settings),
        "worker_hijack_root_logger": True,
        "enable_utc": True,
        "timezone": "UTC",
    }


# How often the beat queues a purge when RECEIPTS_RETENTION (or RECEIPTS_MASK_PHONES_AFTER,
# whose masking runs in the same task) is set.
PURGE_EVERY = 86400.0


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The clock's tick; and, with RECEIPTS_RETENTION or RECEIPTS_MASK_PHONES_AFTER set, a
    daily purge (and masking). The purge goes to the polls' queue, not the clock's: a long
    purge must never delay a tick."""
    tick = settings.tick.total_seconds()
    schedule: dict[str, dict[str, Any]] = {
        "receipts-tick": {
            "task": "receipts.tick",
            "schedule": tick,
            "options": {"queue": CLOCK_QUEUE, "expires": tick},
        }
    }
    if settings.retention is not None or settings.mask_phones_after is not None:
        schedule["receipts-purge"] = {
            "task": "receipts.purge",
            "schedule": PURGE_EVERY,
            "options": {"queue": POLL_QUEUE, "expires": PURGE_EVERY},
        }
    return schedule


def embedded_claim_bound(settings: Settings) -> int | None:
    """On the embedded broker, how many polls a tick may queue: those the worker starts
    within one claim lease, less those still waiting. None (no bound) on a real broker, whose
    workers can be any number."""
    if settings.broker_url:
        return None
    can_start = int(EMBEDDED_POLLS_PER_SECOND * settings.lease.total_seconds())
    return max(0, can_start - queued(settings, POLL_QUEUE))


def queued(settings: Settings, queue: str) -> int:
    """Messages waiting in ``queue`` (received ones excluded): one look at the broker."""
    with broker_connection(settings) as connection:
        declared = connection.default_channel.queue_declare(queue=queue, passive=True)
        count: int = declared.message_count
        return count


def make_app(settings: Settings | None = None) -> Celery:
    celery_app = Celery("receipts", include=["worker.tasks"])
    celery_app.conf.update(celery_config(settings or get_settings()))
    return celery_app


app = make_app()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _scrub_logs(logger: logging.Logger, **_: Any) -> None:
    """Worker and beat logs never show a secret URL's token, show phones masked unless
    RECEIPTS_LOG_PHONES is set, are JSON lines with RECEIPTS_LOG_FORMAT=json, and show a tick
    that did nothing only at DEBUG (worker/logs.py)."""
    from worker import logs

    logs.setup(logger, get_settings())
    logs.quiet_routine_tasks(ROUTINE_TASKS)


def queue_event_delivery(destination: str, settings: Settings) -> None:
    """Queue a delivery round of events for ``destination`` (``receipts.deliver_events``):
    from the tick, a round that found more, or a commit of history (worker/event_nudge.py).
    It expires with a few ticks: by then the tick has queued another if events still wait."""
    app.send_task(
        "receipts.deliver_events", args=[destination], expires=settings.tick.total_seconds() * 4
    )


def start_event_nudge(settings: Settings) -> None:
    """Make this process's commits of history queue event deliveries at once (at most one task
    per destination per ``event_nudge.NUDGE_EVERY``; worker/event_nudge.py), when events have
    a destination: in each worker pool process, and in each ``receipts receiver`` process."""
    from worker import event_nudge

    destinations = settings.event_destinations
    if not destinations:
        event_nudge.install(None)
        return

    def send() -> None:
        for destination in destinations:
            queue_event_delivery(destination, settings)

    event_nudge.install(event_nudge.Nudger(send))


def stop_event_nudge() -> None:
    from worker import event_nudge

    event_nudge.install(None)


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """Each pool child builds its own engine and HTTP session (pooled connections must never
    be shared across fork), starts heartbeating as a worker process, and nudges event
    delivery when it commits history."""
    from worker import db, runtime

    db.reset_engine()
    runtime.reset()
    runtime.start_heartbeat(get_settings())
    start_event_nudge(get_settings())


@worker_process_shutdown.connect
def _before_exit(**_: Any) -> None:
    from worker import runtime

    runtime.stop_heartbeat()
    stop_event_nudge()


@worker_init.connect
@beat_init.connect
def _broker_folders(**_: Any) -> None:
    """The embedded broker's folders, made when a worker or beat starts (however started:
    ``receipts run``, ``receipts worker``, ``celery -A worker.celery worker``)."""
    make_broker_folders(get_settings())
