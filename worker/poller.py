"""The poll cycle as plain functions: a tick (escalate, claim, dispatch) and a poll (start,
ask the API, record). Celery tasks call these; tests call them directly."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from worker import store
from worker.client import ParameterError, ReceiptBatch, UspeedoClient, UspeedoError
from worker.logs import mask_phone
from worker.schedule import PollPolicy
from worker.store import Claim, PollTarget

log = logging.getLogger(__name__)

SessionFactory = Callable[[], AbstractContextManager[Session]]
Clock = Callable[[], datetime]


@dataclass(frozen=True, kw_only=True, slots=True)
class TickReport:
    escalated: int
    claims: int
    sessions_claimed: int


@dataclass(frozen=True, kw_only=True, slots=True)
class PollReport:
    polled: int
    api_calls: int
    receipts_written: int
    resolved: int
    failed: int


def tick(
    *,
    session_factory: SessionFactory,
    clock: Clock,
    policy: PollPolicy,
    dispatch: Callable[[Claim], None],
    lease: timedelta,
    batch_size: int = 100,
    max_sessions: int = 200_000,
    show_phones: bool = False,
) -> TickReport:
    """Escalate what passed its cutoff, then claim due sessions in batches of at most
    ``batch_size`` of one account and hand each batch to ``dispatch``.

    Each claim commits on its own before it is dispatched, so a poll task never runs ahead
    of the claim it carries, and transactions stay short.
    """
    escalated = 0
    while True:
        with session_factory() as session:
            escalations = store.escalate_due(session, now=clock(), policy=policy)
        for escalation in escalations:
            log_escalation(escalation, show_phones=show_phones)
        escalated += len(escalations)
        if len(escalations) < 1000:
            break

    now = clock()
    with session_factory() as session:
        accounts = store.due_accounts(session, now=now, policy=policy)
    claims = claimed = 0
    for account_id in accounts:
        while claimed < max_sessions:
            now = clock()
            with session_factory() as session:
                claim = store.claim_batch(
                    session,
                    account_id=account_id,
                    now=now,
                    policy=policy,
                    lease_until=now + lease,
                    limit=min(batch_size, max_sessions - claimed),
                )
            if claim is None:
                break
            dispatch(claim)
            claims += 1
            claimed += len(claim.session_ids)
            if len(claim.session_ids) < batch_size:
                break
    return TickReport(escalated=escalated, claims=claims, sessions_claimed=claimed)


def log_escalation(escalation: store.Escalation, *, show_phones: bool = False) -> None:
    phones = ", ".join(
        f"{mask_phone(phone, show=show_phones)}={result or 'no receipt'}"
        for phone, result in escalation.unresolved
    )
    log.warning(
        "escalated session %s of account %s, sent %s: no final receipt after %d poll(s) "
        "[%s]; last error: %s",
        escalation.session_no,
        escalation.account_id,
        escalation.sent_at.isoformat(),
        escalation.poll_count,
        phones or "no receipt for any phone",
        escalation.last_error or "none",
    )


def poll(
    claim: Claim,
    *,
    session_factory: SessionFactory,
    client: UspeedoClient,
    clock: Clock,
    policy: PollPolicy,
    rng: random.Random,
    budget: timedelta,
    in_flight: timedelta,
) -> PollReport:
    """Poll one claimed batch: start it (the single place that enforces the timing rules),
    ask the API, record the answer or the failure. The API call runs outside any transaction."""
    started = clock()
    with session_factory() as session:
        targets = store.start_poll(
            session, claim=claim, now=started, policy=policy, busy_until=started + in_flight
        )
    if not targets:
        return PollReport(polled=0, api_calls=0, receipts_written=0, resolved=0, failed=0)
    counts = {"api_calls": 0, "receipts_written": 0, "resolved": 0, "failed": 0}
    _poll_targets(
        targets,
        counts,
        session_factory=session_factory,
        client=client,
        clock=clock,
        policy=policy,
        rng=rng,
        give_up_at=started + budget,
    )
    return PollReport(polled=len(targets), **counts)


def _poll_targets(
    targets: Sequence[PollTarget],
    counts: dict[str, int],
    *,
    session_factory: SessionFactory,
    client: UspeedoClient,
    clock: Clock,
    policy: PollPolicy,
    rng: random.Random,
    give_up_at: datetime,
) -> None:
    account_id = targets[0].account_id
    # No attempt may start once the poll's budget is spent or the earliest cutoff in the
    # batch has passed.
    deadline = min(give_up_at, *(policy.cutoff_at(t.sent_at) for t in targets)).timestamp()
    counts["api_calls"] += 1
    try:
        batch = client.get_send_receipts(
            account_id, [t.session_no for t in targets], deadline=deadline
        )
    except ParameterError as exc:
        if len(targets) > 1:
            # One bad SessionNo makes the API refuse the whole call; halve the batch until it
            # is isolated, so the other sessions keep being polled.
            middle = len(targets) // 2
            for half in (targets[:middle], targets[middle:]):
                _poll_targets(
                    half,
                    counts,
                    session_factory=session_factory,
                    client=client,
                    clock=clock,
                    policy=policy,
                    rng=rng,
                    give_up_at=give_up_at,
                )
            return
        _record_failure(targets, f"refused by the API: {exc}", counts, session_factory, clock, policy, rng)
        return
    except UspeedoError as exc:
        _record_failure(targets, str(exc), counts, session_factory, clock, policy, rng)
        return
    problems = _problems_by_session(batch)
    with session_factory() as session:
        outcome = store.record_answer(
            session,
            targets=targets,
            receipts=batch.receipts,
            problems=problems,
            now=clock(),
            policy=policy,
            rng=rng,
        )
    counts["receipts_written"] += outcome.receipts_written
    counts["resolved"] += len(outcome.resolved)


def _problems_by_session(batch: ReceiptBatch) -> dict[str, str]:
    """Problems of an answer that concern one session, joined per session (its last_error)."""
    by_session: dict[str, list[str]] = {}
    for session_no, problem in batch.session_problems:
        by_session.setdefault(session_no, []).append(problem)
    return {session_no: "; ".join(problems) for session_no, problems in by_session.items()}


def _record_failure(
    targets: Sequence[PollTarget],
    error: str,
    counts: dict[str, int],
    session_factory: SessionFactory,
    clock: Clock,
    policy: PollPolicy,
    rng: random.Random,
) -> None:
    log.warning(
        "poll of %d session(s) of account %s failed: %s", len(targets), targets[0].account_id, error
    )
    with session_factory() as session:
        store.record_failure(
            session, targets=targets, error=error, now=clock(), policy=policy, rng=rng
        )
    counts["failed"] += len(targets)
