"""Celery tasks: thin wrappers that parse arguments and call the plain functions (the process
resources they run with are in ``worker.runtime``)."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from celery.exceptions import Reject

from worker import events, intake, masking, poller, purge, runtime, store, webhooks
from worker.celery import (
    EMBEDDED_POLLS_PER_SECOND,
    app,
    embedded_claim_bound,
    queue_event_delivery,
)
from worker.config import Settings, get_settings
from worker.db import error_text, read_scope, session_scope
from worker.domain import EventDestination, ReceiptSource
from worker.errors import show
from worker.store import Claim
from worker.tracking import parse_request, track_requests

log = logging.getLogger(__name__)


@app.task(name="receipts.tick", ignore_result=True)
def tick() -> dict[str, int]:
    settings = get_settings()
    max_claims = embedded_claim_bound(settings)
    report = poller.tick(
        session_factory=session_scope,
        clock=runtime.utcnow,
        policy=settings.poll_policy(),
        dispatch=_dispatch,
        lease=settings.lease,
        tick_every=settings.tick,
        batch_size=settings.batch_size,
        max_sessions=settings.max_claim_per_tick,
        max_claims=max_claims,
        show_phones=settings.log_phones,
        outbox=settings.escalation_webhook_url is not None,
        reconcile=_dispatch_reconcile,
        inbox_max_rows=settings.inbox_max_rows,
        event_destinations=settings.event_destinations,
    )
    if report.bounded and max_claims is not None:
        _warn_embedded_behind(settings, now=runtime.utcnow())
    if report.webhooks_due:
        # Delivery runs as its own task so that a slow receiver never delays the clock.
        deliver_webhooks.apply_async()
    for destination in report.events_due:
        # One task per destination: a slow webhook never holds the Celery destination back.
        queue_event_delivery(destination, settings)
    if report.escalated or report.claims:
        log.info(
            "tick: escalated %d, dispatched %d poll(s) for %d session(s)",
            report.escalated,
            report.claims,
            report.sessions_claimed,
        )
    return {"escalated": report.escalated, "claims": report.claims}


@app.task(name="receipts.purge", ignore_result=True)
def purge_finished() -> dict[str, int]:
    """The daily purge (queued by the beat when RECEIPTS_RETENTION or
    RECEIPTS_MASK_PHONES_AFTER is set), bounded per run; then the masking of phones, after the
    purge so that it never masks what is about to go."""
    settings = get_settings()
    sessions = purge_old(settings)
    return {"sessions": sessions, "masked": mask_phones(settings)}


def purge_old(settings: Settings) -> int:
    """The daily purge (worker/purge.py), bounded per run; the sessions deleted."""
    if settings.retention is None:
        return 0
    report = purge.purge(
        session_scope,
        now=runtime.utcnow(),
        older_than=settings.retention,
        destinations=settings.event_destinations,
        max_sessions=purge.MAX_PER_RUN,
    )
    if report.sessions or report.bounded:
        log.info(
            "purge: %d session(s) older than %s deleted, %d receipt(s), %d history row(s)%s",
            report.sessions,
            settings.retention,
            report.receipts,
            report.history,
            " (bounded: the rest goes next run)" if report.bounded else "",
        )
    return report.sessions


def mask_phones(settings: Settings) -> int:
    """The daily masking (worker/masking.py), bounded per run; the sessions masked."""
    if settings.mask_phones_after is None or settings.phone_hash_key is None:
        return 0
    report = masking.mask(
        session_scope,
        now=runtime.utcnow(),
        older_than=settings.mask_phones_after,
        phone_hash=masking.PhoneHash.of(settings.phone_hash_key.get_secret_value()),
        max_sessions=masking.MAX_PER_RUN,
    )
    if report.sessions or report.bounded:
        log.info(
            "mask: phones of %d session(s) older than %s masked, %d receipt(s), %d history "
            "row(s)%s",
            report.sessions,
            settings.mask_phones_after,
            report.receipts,
            report.history,
            " (bounded: the rest goes next run)" if report.bounded else "",
        )
    return report.sessions


@app.task(name="receipts.deliver_webhooks", ignore_result=True)
def deliver_webhooks() -> dict[str, int]:
    settings = get_settings()
    if not settings.escalation_webhook_url:
        return {"delivered": 0, "failed": 0}
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
    report = webhooks.deliver_due(
        session_factory=session_scope,
        http=runtime.webhook_http(),
        url=settings.escalation_webhook_url,
        secret=secret,
        now=runtime.utcnow,
        lease=settings.webhook_lease,
        retry_base=settings.tick,
        retry_cap=max(settings.tick, timedelta(minutes=15)),
        timeout=settings.webhook_timeout.total_seconds(),
    )
    return {"delivered": report.delivered, "failed": report.failed}


@app.task(name="receipts.deliver_events", ignore_result=True)
def deliver_events(destination: Any) -> dict[str, int]:
    settings = get_settings()
    if destination not in settings.event_destinations:
        if destination not in tuple(EventDestination):
            raise Reject(f"unknown event destination {destination!r}", requeue=False)
        return {"delivered": 0, "failed": 0}  # no longer configured
    send: events.Sender
    if destination == EventDestination.WEBHOOK:
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
        send = events.webhook_sender(
            runtime.webhook_http(),
            settings.events_webhook_url or "",
            secret,
            timeout=settings.webhook_timeout.total_seconds(),
        )
    else:
        send = events.task_sender(app, settings.events_task or "", settings.events_queue)
    report = events.deliver(
        session_factory=session_scope,
        destination=destination,
        send=send,
        now=runtime.utcnow,
        types=settings.event_types,
        lease=settings.webhook_lease,
        batch_size=settings.events_batch_size,
        retry_base=settings.tick,
        retry_cap=max(settings.tick, timedelta(minutes=15)),
        window=settings.events_retry_window,
    )
    if report.more:
        # A full round, or events committed while it ran: go on now, not at the next tick.
        queue_event_delivery(destination, settings)
    return {"delivered": report.delivered, "failed": report.failed, "parked": report.parked}


# Monotonic time of this process's last warning that the embedded broker fell behind.
_behind_warned_at: float | None = None
BEHIND_WARNING_EVERY = 60.0


def _warn_embedded_behind(settings: Settings, *, now: datetime) -> None:
    """One WARNING a minute (per pool process) while ticks on the embedded broker leave due
    sessions unclaimed: they wait in the database for a later tick, and when that goes on
    they can reach their cutoff unpolled."""
    global _behind_warned_at  # noqa: PLW0603 - per-process rate limit of one log line
    since = time.monotonic()
    if _behind_warned_at is not None and since - _behind_warned_at < BEHIND_WARNING_EVERY:
        return
    with read_scope() as session:
        waiting = store.count_due(session, now=now, policy=settings.poll_policy())
    if not waiting:
        return
    _behind_warned_at = since
    log.warning(
        "the embedded broker is behind: %d due session(s) wait for a later tick (a tick "
        "queues no more than the worker starts within a claim lease, about %d polls/s); "
        "sessions falling due faster than they are polled can reach their cutoff unpolled: "
        "use PostgreSQL and Redis for this load (README: Embedded defaults)",
        waiting,
        EMBEDDED_POLLS_PER_SECOND,
    )


def _dispatch(claim: Claim) -> None:
    """Queue the poll of a claim that has just been committed.

    The task expires when the claim's lease ends: by then its sessions are due again and the
    next tick claims them with a new token, so the old task could only find its token gone.
    A worker drops an expired task as it receives it, without a pool process or a database
    transaction, so a queue that fell behind drains its dead claims at once instead of
    running them one by one ahead of the live ones. The expiry is read on the receiving
    host's clock: a host running fast drops a task early, which only delays its sessions to
    the re-claim; a late run is still refused by the token (``store.start_poll``).
    """
    poll.apply_async(
        kwargs={
            "account_id": claim.account_id,
            "session_ids": list(claim.session_ids),
            "token": claim.token,
        },
        expires=get_settings().lease.total_seconds(),
    )


@app.task(name="receipts.poll", ignore_result=True)
def poll(account_id: Any, session_ids: Any, token: Any) -> dict[str, int]:
    claim = _parse_claim(account_id, session_ids, token)
    settings = get_settings()
    report = poller.poll(
        claim,
        **runtime.poll_dependencies(settings),
        in_flight=settings.poll_in_flight,
        worker=runtime.worker_id(),
    )
    return {"polled": report.polled, "resolved": report.resolved, "failed": report.failed}


def _parse_claim(
    account_id: Any, session_ids: Any, token: Any, task: str = "receipts.poll"
) -> Claim:
    """A malformed message cannot be fixed by retrying: reject it (its sessions fall due again
    when the claim's lease ends)."""
    if (
        isinstance(account_id, bool)
        or not isinstance(account_id, int)
        or not isinstance(session_ids, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in session_ids)
        or not isinstance(token, str)
        or not token
    ):
        log.error("rejected a malformed %s message (account_id=%r)", task, account_id)
        raise Reject(f"malformed {task} arguments", requeue=False)
    return Claim(account_id=account_id, token=token, session_ids=tuple(session_ids))


def _dispatch_reconcile(account_id: int, session_ids: list[int]) -> None:
    reconcile.apply_async(kwargs={"account_id": account_id, "session_ids": session_ids})


@app.task(name="receipts.reconcile", ignore_result=True)
def reconcile(account_id: Any, session_ids: Any) -> dict[str, int]:
    """One poll of escalated sessions whose last poll was lost with its worker process: the
    answer that poll would have recorded may settle them (they then resolve late)."""
    claim = _parse_claim(account_id, session_ids, "reconcile", task="receipts.reconcile")
    settings = get_settings()
    report = poller.repoll_escalated(
        (),
        account_id=claim.account_id,
        ids=claim.session_ids,
        # Automatic, like the poll that was lost: not an operator's repoll.
        source=ReceiptSource.POLL,
        batch_size=settings.batch_size,
        **runtime.poll_dependencies(settings),
    )
    return {"polled": report.polled, "resolved": report.resolved, "failed": report.failed}


# Stands for an argument the message did not carry: None is a value a sender may send.
_ABSENT: Any = object()


@app.task(name="receipts.track", ignore_result=True, reject_on_worker_lost=True)
def track(
    session_no: Any = _ABSENT,
    account_id: Any = _ABSENT,
    phones: Any = None,
    sent_at: Any = None,
    user_ref: Any = None,
    *surplus: Any,
    **unknown: Any,
) -> dict[str, int]:
    """Track one session on behalf of a service that only shares the broker.

    Arguments that fail validation (a missing, misspelt or surplus one included, which Celery
    would otherwise refuse with a bare TypeError) are kept in ``rejected_tracks`` for an
    operator to resubmit once fixed (worker/intake.py), and the message is rejected: retrying
    cannot fix it."""
    settings = get_settings()
    now = runtime.utcnow()
    raw: dict[str, Any] = {}
    if session_no is not _ABSENT:
        raw["session_no"] = session_no
    if account_id is not _ABSENT:
        raw["account_id"] = account_id
    for name, value in (("phones", phones), ("sent_at", sent_at), ("user_ref", user_ref)):
        if value is not None:
            raw[name] = value
    if surplus:
        raw["*args"] = list(surplus)
    raw.update(unknown)
    try:
        request = parse_request(raw, now=now)
    except ValueError as exc:
        raise _rejected(raw, str(exc), now) from None
    with session_scope() as session:
        result = track_requests(session, [request], policy=settings.poll_policy(), now=now)
    return {"inserted": result.inserted, "updated": result.updated}


def _rejected(raw: dict[str, Any], reason: str, now: datetime) -> Reject:
    """Keep a refused ``receipts.track`` in its own transaction, log it once, and give the
    Reject to raise. If even that fails (the database is down or not migrated), the log line is
    all that remains of it, so it says so."""
    request = track.request
    named = f"session_no {show(raw['session_no'])}" if "session_no" in raw else "no session_no"
    where = f"receipts.track refused ({named})"
    try:
        with session_scope() as session:
            kept = intake.record_rejection(
                session,
                arguments=raw,
                reason=reason,
                now=now,
                task_id=request.id,
                origin=request.origin,
            )
    except sa.exc.SQLAlchemyError as exc:
        log.error(
            "%s and could not be kept in rejected_tracks (%s): %s; arguments %s",
            where,
            error_text(exc),
            reason,
            show(raw, limit=2000),
        )
        return Reject(reason, requeue=False)
    log.error("%s, kept as rejected track %d (see `receipts rejected`): %s", where, kept, reason)
    return Reject(f"{reason} (kept as rejected track {kept})", requeue=False)
