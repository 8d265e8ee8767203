"""Building blocks of function-level tests on a real database: tracking sessions, polling them
one step at a time with an injected clock, and reading the tables back."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from tests.support.clock import IN_FLIGHT, LEASE, POLICY, T0
from worker import db, store, webhooks
from worker.domain import Result
from worker.models import outbox_table, receipts_table, sessions_table
from worker.receipts import Receipt
from worker.schedule import PollPolicy
from worker.tracking import TrackResult, parse_requests, track_requests

P1, P2, P3 = "(852)55311111", "(852)55311112", "(852)55311113"


def receipt(
    session_no: str, phone: str, result: Result, at: datetime | None, *, cost: int = 1
) -> Receipt:
    """A receipt as the API would report it (code ``c``, description ``d``)."""
    return Receipt(
        session_no=session_no,
        phone=phone,
        result=result,
        receipt_code="c",
        receipt_desc="d",
        receipt_time=at,
        cost_count=cost,
        user_id=None,
        country_code=None,
    )


def track(*rows: Mapping[str, Any], now: datetime = T0, policy: PollPolicy = POLICY) -> TrackResult:
    """Track ``rows`` (sent at ``T0`` unless they say otherwise) at ``now``."""
    requests = parse_requests([{"sent_at": T0, **row} for row in rows], now=now)
    with db.session_scope() as session:
        return track_requests(session, requests, policy=policy, now=now)


def claim_due(
    account_id: int, now: datetime, *, policy: PollPolicy = POLICY, limit: int = 100
) -> store.Claim | None:
    with db.session_scope() as session:
        return store.claim_batch(
            session,
            account_id=account_id,
            now=now,
            policy=policy,
            lease_until=now + LEASE,
            limit=limit,
        )


def start(
    claimed: store.Claim,
    now: datetime,
    *,
    policy: PollPolicy = POLICY,
    worker: str | None = None,
) -> list[store.PollTarget]:
    with db.session_scope() as session:
        return store.start_poll(
            session,
            claim=claimed,
            now=now,
            policy=policy,
            busy_until=now + IN_FLIGHT,
            worker=worker,
        )


def answer(
    targets: Sequence[store.PollTarget],
    receipts: Sequence[Receipt],
    now: datetime,
    *,
    policy: PollPolicy = POLICY,
    problems: Mapping[str, str] | None = None,
) -> store.PollOutcome:
    with db.session_scope() as session:
        return store.record_answer(
            session,
            targets=targets,
            receipts=receipts,
            problems=problems or {},
            now=now,
            policy=policy,
            rng=random.Random(1),
        )


def started(
    account_id: int, now: datetime, *, policy: PollPolicy = POLICY, worker: str | None = None
) -> list[store.PollTarget]:
    """Claim the account's due sessions at ``now`` and start their poll (by ``worker``)."""
    claimed = claim_due(account_id, now, policy=policy)
    if claimed is None:
        raise AssertionError(f"nothing of account {account_id} is due at {now}")
    return start(claimed, now, policy=policy, worker=worker)


def poll(
    account_id: int,
    receipts: Sequence[Receipt],
    now: datetime,
    policy: PollPolicy = POLICY,
) -> store.PollOutcome:
    """One whole poll of the account's due sessions at ``now``, answered with ``receipts``."""
    return answer(started(account_id, now, policy=policy), receipts, now, policy=policy)


def escalate(now: datetime, policy: PollPolicy = POLICY) -> list[store.Escalation]:
    """Escalate what is due at ``now``, queuing the webhooks as the tick does."""
    with db.session_scope() as session:
        escalations = store.escalate_due(session, now=now, policy=policy)
        webhooks.queue_escalations(session, escalations, now=now)
        return escalations


def stored_sessions() -> dict[str, dict[str, Any]]:
    """``sms_sessions`` by SessionNo."""
    with db.session_scope() as session:
        rows = session.execute(sa.select(sessions_table)).mappings()
        return {row["session_no"]: dict(row) for row in rows}


def stored_receipts() -> dict[tuple[str, str], dict[str, Any]]:
    """``sms_receipts`` by (SessionNo, phone)."""
    with db.session_scope() as session:
        rows = session.execute(sa.select(receipts_table)).mappings()
        return {(row["session_no"], row["phone"]): dict(row) for row in rows}


def queued_webhooks() -> dict[str, dict[str, Any]]:
    """``escalation_outbox`` by delivery id, in the order the rows were queued."""
    with db.session_scope() as session:
        rows = session.execute(sa.select(outbox_table).order_by(outbox_table.c.id)).mappings()
        return {row["delivery_id"]: dict(row) for row in rows}
