"""Escalation webhooks: the ``escalation_outbox`` table this module owns (queued in the
transaction that escalates), the payload, its signature, and at-least-once delivery.

Payload (``Content-Type: application/json``)::

    {"event": "session.escalated", "delivery_id": "...", "account_id": 1, "session_no": "...",
     "sent_at": "...", "escalated_at": "...", "poll_count": 24, "last_error": null,
     "unresolved_phones": [{"phone": "(852)55311111", "last_result": "Unknow"}],
     "text": "Uspeedo session ... of account 1 has no final receipt ..."}

``text`` makes the message readable in Slack-compatible chats. Headers:
``X-Receipts-Delivery`` (the delivery id, stable across retries, for deduplication),
``X-Receipts-Event``, and with ``RECEIPTS_WEBHOOK_SECRET`` set,
``X-Receipts-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">``
(worker/signing.py), signed afresh for each attempt with the time the attempt was claimed.

A POST follows no redirect (a 3xx is a failed attempt, retried like any other): a redirect
could carry the signed body and its headers to a host nobody configured. TLS certificates are
always verified (``requests``' default, which nothing here turns off; a private CA is trusted
through ``REQUESTS_CA_BUNDLE``).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import requests
import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker import bounded_http
from worker.logs import redact_url_in
from worker.models import outbox_table
from worker.signing import WEBHOOK_SIGNATURE_HEADER, webhook_signature

if TYPE_CHECKING:
    from worker.store import Escalation

log = logging.getLogger(__name__)

OUTBOX = outbox_table
# Of a receiver's answer only its status counts, and the start of a failure's body is kept in
# last_error (EXCERPT_CHARS): reading more would only cost memory.
EXCERPT_BYTES = 1024
EXCERPT_CHARS = 200


def escalation_payload(escalation: Escalation) -> dict[str, Any]:
    phones = [{"phone": phone, "last_result": result} for phone, result in escalation.unresolved]
    listing = ", ".join(f"{p['phone']} ({p['last_result'] or 'no receipt'})" for p in phones)
    text = (
        f"Uspeedo session {escalation.session_no} of account {escalation.account_id}, sent "
        f"{escalation.sent_at.isoformat(timespec='seconds')}, has no final receipt after "
        f"{escalation.poll_count} poll(s): {listing or 'no receipt for any phone'}. "
        "Contact Uspeedo support with this SessionNo."
    )
    if escalation.last_error:
        text += f" Last error: {escalation.last_error}"
    return {
        "event": "session.escalated",
        "delivery_id": f"escalation-{escalation.account_id}-{escalation.session_no}",
        "account_id": escalation.account_id,
        "session_no": escalation.session_no,
        "sent_at": escalation.sent_at.isoformat(),
        "escalated_at": escalation.escalated_at.isoformat(),
        "poll_count": escalation.poll_count,
        "last_error": escalation.last_error,
        "unresolved_phones": phones,
        "text": text,
    }


def queue_escalations(
    session: Session, escalations: Sequence[Escalation], *, now: datetime
) -> None:
    """Queue one webhook delivery per escalation in the caller's transaction (the one that
    escalated them), due at once."""
    if not escalations:
        return
    payloads = [escalation_payload(e) for e in escalations]
    # A session escalated a second time gets a delivery id of its own: receivers deduplicate
    # on it, and the unique id must not fail the tick (stopping every poll).
    taken = set(
        session.scalars(
            sa.select(OUTBOX.c.delivery_id).where(
                OUTBOX.c.delivery_id.in_([p["delivery_id"] for p in payloads])
            )
        )
    )
    for payload in payloads:
        if payload["delivery_id"] in taken:
            payload["delivery_id"] += f"-{now.astimezone(UTC):%Y%m%dT%H%M%S%fZ}"
    session.connection().execute(
        sa.insert(OUTBOX),
        [
            {
                "delivery_id": payload["delivery_id"],
                "event": "session.escalated",
                "account_id": e.account_id,
                "session_no": e.session_no,
                "payload": payload,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for e, payload in zip(escalations, payloads, strict=True)
        ],
    )


def backoff(attempts: int, *, base: timedelta, cap: timedelta) -> timedelta:
    """Delay before the next attempt after ``attempts`` failures: ``base * 2**(attempts-1)``,
    capped, so a receiver that is down for hours is not hammered."""
    return min(cap, base * int(2 ** max(attempts - 1, 0)))


@dataclass(frozen=True, kw_only=True, slots=True)
class DeliveryReport:
    delivered: int
    failed: int
    # POSTs whose row another deliverer took over meanwhile (their outcome is not recorded).
    lost: int = 0


SessionFactory = Callable[[], AbstractContextManager[Session]]


def deliver_due(
    *,
    session_factory: SessionFactory,
    http: requests.Session,
    url: str,
    secret: str | None,
    now: Callable[[], datetime],
    lease: timedelta,
    retry_base: timedelta,
    retry_cap: timedelta,
    timeout: float = 10.0,
    limit: int = 100,
) -> DeliveryReport:
    """Deliver due webhooks, each at least once and never again after a success.

    Rows are claimed one at a time with ``FOR UPDATE SKIP LOCKED`` under a fresh claim token
    and pushed ``lease`` ahead before the POST, which is bounded as a whole by ``timeout``
    (see :func:`post_once`). With a lease longer than that
    (``Settings.webhook_lease``), concurrent deliverers (two beats, many workers) never send
    the same row at the same time, and a deliverer that dies mid-way leaves only that row,
    retried after its lease. Whatever the lease, an outcome is recorded only while the
    deliverer still holds the row's token: one that was outlived by its lease (its row taken
    over by another) records nothing, so its result can neither mark the row delivered nor
    overwrite the next one's. ``attempts`` counts POSTs, counted when each is claimed. The
    round stops at the first failure: a receiver that is down is tried once per round, not
    once per waiting row.
    """
    delivered = failed = lost = 0
    while delivered + failed + lost < limit and not failed:
        token = secrets.token_hex(16)
        claimed_at = now()
        row = _claim_one(session_factory, claimed_at, lease, token)
        if row is None:
            break
        body = json.dumps(row.payload, sort_keys=True).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Receipts-Delivery": row.delivery_id,
            "X-Receipts-Event": row.event,
        }
        if secret:
            # The claim's instant, from the injected clock (the database's in production):
            # an instant just before the POST, with no clock read of its own.
            headers[WEBHOOK_SIGNATURE_HEADER] = webhook_signature(
                body, secret, timestamp=int(claimed_at.timestamp())
            )
        error = post_once(http, url, body, headers, timeout)
        finished = now()
        if error is None:
            values: dict[str, Any] = {"delivered_at": finished, "last_error": None}
        else:
            retry_at = finished + backoff(row.attempts, base=retry_base, cap=retry_cap)
            values = {"next_attempt_at": retry_at, "last_error": error}
        finish = (
            sa.update(OUTBOX)
            .where(OUTBOX.c.id == row.id, OUTBOX.c.claim_token == token)
            .values(claim_token=None, **values)
        )
        with session_factory() as session:
            held = session.connection().execute(finish).rowcount
        if not held:
            log.warning(
                "webhook %s: another deliverer took the row over during this POST (attempt "
                "%d outlived its lease of %.3gs); its outcome is left to that deliverer: %s",
                row.delivery_id,
                row.attempts,
                lease.total_seconds(),
                error or "delivered",
            )
            lost += 1
        elif error is None:
            delivered += 1
        else:
            log.warning(
                "webhook %s failed (attempt %d, next at %s): %s",
                row.delivery_id,
                row.attempts,
                values["next_attempt_at"].isoformat(timespec="seconds"),
                error,
            )
            failed += 1
    return DeliveryReport(delivered=delivered, failed=failed, lost=lost)


def deliveries_due(session: Session, *, now: datetime) -> bool:
    """Whether any webhook waits for a delivery attempt (one probe of the outbox's partial
    index), so that the clock queues a delivery task only when there is work for it."""
    due = sa.select(OUTBOX.c.id).where(
        OUTBOX.c.delivered_at.is_(None), OUTBOX.c.next_attempt_at <= now
    )
    return bool(session.execute(sa.select(due.exists())).scalar())


def _claim_one(session_factory: SessionFactory, now: datetime, lease: timedelta, token: str) -> Any:
    with session_factory() as session:
        due = (
            sa.select(OUTBOX.c.id)
            .where(OUTBOX.c.delivered_at.is_(None), OUTBOX.c.next_attempt_at <= now)
            .order_by(OUTBOX.c.next_attempt_at, OUTBOX.c.id)
            .limit(1)
        )
        if session.get_bind().dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        return session.execute(
            sa.update(OUTBOX)
            .where(OUTBOX.c.id.in_(due.scalar_subquery()))
            .values(next_attempt_at=now + lease, claim_token=token, attempts=OUTBOX.c.attempts + 1)
            .returning(
                OUTBOX.c.id,
                OUTBOX.c.delivery_id,
                OUTBOX.c.event,
                OUTBOX.c.payload,
                OUTBOX.c.attempts,
            )
        ).first()


def post_once(
    http: requests.Session, url: str, body: bytes, headers: dict[str, str], timeout: float
) -> str | None:
    """POST once, within ``timeout`` as a whole; the error text, or None on a 2xx answer.

    The status is the receiver's verdict: a 2xx acknowledges the delivery however much body
    follows it or however slowly. Of any body only ``EXCERPT_BYTES`` are read (the start of
    a failure's body goes to last_error), so a huge answer costs no memory. The text never
    shows the URL's path, query or user info (a Slack-style webhook URL's path is its token):
    it is stored in ``escalation_outbox.last_error`` (or an event cursor's) and logged.
    """
    try:
        answer = bounded_http.post(
            http,
            url,
            data=body,
            headers=headers,
            within=timeout,
            connect_timeout=timeout,
            read_timeout=timeout,
            limit=EXCERPT_BYTES,
            excerpt=True,
        )
    except requests.RequestException as exc:
        return redact_url_in(f"{type(exc).__name__}: {exc}", url)
    if 200 <= answer.status < 300:
        return None
    if 300 <= answer.status < 400:
        # Its Location is not shown: like the URL, it may carry a token.
        return (
            f"HTTP {answer.status}: a redirect, not followed (webhooks follow none): "
            "set the webhook URL to the address that answers"
        )
    # Redacted before it is cut short, so that no cut leaves part of a token behind.
    text = answer.body.decode("utf-8", errors="replace")
    return f"HTTP {answer.status}: {redact_url_in(text, url)[:EXCERPT_CHARS]}"
