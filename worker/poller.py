"""The poll cycle as plain functions: a tick (escalate, claim, dispatch) and a poll (start,
ask the API, record). Celery tasks call these; tests call them directly."""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from worker import credentials, db, events, push, store, webhooks, workers
from worker.client import MAX_SESSIONS_PER_CALL, UspeedoClient
from worker.domain import ReceiptSource
from worker.errors import (
    AnswerTooLarge,
    ApiError,
    CredentialsError,
    MalformedResponse,
    ParameterError,
    PollWindowClosed,
    UspeedoError,
)
from worker.logs import mask_phone
from worker.receipts import Receipt, ReceiptBatch
from worker.schedule import PollPolicy
from worker.store import Claim, PollTarget

log = logging.getLogger(__name__)

T = TypeVar("T")
# Waits between attempts to record an answer while the database is unreachable (~10 s).
DB_WRITE_DELAYS = (0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0)

SessionFactory = Callable[[], AbstractContextManager[Session]]
Clock = Callable[[], datetime]

# Extra calls one poll may spend halving a batch the API refuses as a whole: enough to
# isolate two bad SessionNos among 100 (two calls per halving, ceil(log2 100) = 7 halvings
# to reach each of them).
BISECTION_CALLS: Final = 4 * math.ceil(math.log2(MAX_SESSIONS_PER_CALL))


@dataclass(frozen=True, kw_only=True, slots=True)
class TickReport:
    escalated: int
    claims: int
    sessions_claimed: int
    webhooks_due: bool = False  # with an outbox: some delivery is waiting for an attempt
    # The tick reached its bound (max_sessions or max_claims) with sessions possibly still due.
    bounded: bool = False
    # The event destinations with events waiting for them (worker/events.py).
    events_due: tuple[str, ...] = ()


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
    tick_every: timedelta,
    batch_size: int = 100,
    max_sessions: int = 200_000,
    max_claims: int | None = None,
    show_phones: bool = False,
    outbox: bool = False,
    reconcile: Callable[[int, list[int]], None] | None = None,
    inbox_max_rows: int = 1_000_000,
    event_destinations: Sequence[str] = (),
) -> TickReport:
    """Record the heartbeat, release the polls of worker processes that stopped heartbeating,
    escalate what passed its cutoff (queuing webhooks with ``outbox``), hand the sessions whose
    cutoff passed while their poll was lost to ``reconcile``, then claim due sessions in
    batches of at most ``batch_size`` of one account and hand each batch to ``dispatch``: at
    most ``max_sessions`` sessions in at most ``max_claims`` batches, the accounts whose
    sessions fell due first first. Sessions left unclaimed stay due for the next tick.

    Each claim commits on its own before it is dispatched, so a poll task never runs ahead
    of the claim it carries, and transactions stay short.
    """
    with session_factory() as session:
        store.record_heartbeat(
            session, name="tick", now=clock(), tick=tick_every, interval_max=policy.interval_max
        )
    with session_factory() as session:
        released = workers.release_dead(session, now=clock(), tick=tick_every, policy=policy)
    with session_factory() as session:
        push.expire_inbox(session, now=clock(), cutoff=policy.cutoff, max_rows=inbox_max_rows)
    if released.workers or released.pending:
        log.warning(
            "released the polls of %d stopped worker process(es): %d pending session(s) due "
            "again, %d escalated session(s) to reconcile",
            len(released.workers),
            released.pending,
            sum(len(ids) for ids in released.reconcile.values()),
        )
    escalated = 0
    while True:
        with session_factory() as session:
            now = clock()
            escalations = store.escalate_due(session, now=now, policy=policy)
            if outbox:
                webhooks.queue_escalations(session, escalations, now=now)
        for escalation in escalations:
            log_escalation(escalation, show_phones=show_phones)
        escalated += len(escalations)
        if len(escalations) < store.ESCALATION_BATCH:
            break

    # After the escalations: a session whose cutoff passed while its poll was lost is escalated
    # by now, and its reconciliation poll is a repoll of an escalated session.
    if reconcile is not None:
        for account_id, ids in released.reconcile.items():
            reconcile(account_id, ids)

    claims, claimed, bounded = _claim_due(
        session_factory=session_factory,
        clock=clock,
        policy=policy,
        dispatch=dispatch,
        lease=lease,
        batch_size=batch_size,
        max_sessions=max_sessions,
        max_claims=max_claims,
    )
    webhooks_due = False
    if outbox:
        with session_factory() as session:
            webhooks_due = webhooks.deliveries_due(session, now=clock())
    # Every tick, so that a destination configured or removed is known within one.
    with session_factory() as session:
        events.sync_destinations(session, event_destinations)
    events_due: list[str] = []
    if event_destinations:
        with session_factory() as session:
            events_due = events.waiting(session, event_destinations, now=clock())
    return TickReport(
        escalated=escalated,
        claims=claims,
        sessions_claimed=claimed,
        webhooks_due=webhooks_due,
        bounded=bounded,
        events_due=tuple(events_due),
    )


def _claim_due(
    *,
    session_factory: SessionFactory,
    clock: Clock,
    policy: PollPolicy,
    dispatch: Callable[[Claim], None],
    lease: timedelta,
    batch_size: int,
    max_sessions: int,
    max_claims: int | None,
) -> tuple[int, int, bool]:
    """Claim and dispatch due sessions account by account, within the bounds: (claims,
    sessions claimed, whether a bound stopped the tick)."""
    with session_factory() as session:
        accounts = store.due_accounts(session, now=clock(), policy=policy)
    claims = claimed = 0
    for account_id in accounts:
        full = True
        while full:
            if claimed >= max_sessions or (max_claims is not None and claims >= max_claims):
                return claims, claimed, True
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
            full = len(claim.session_ids) == batch_size
    return claims, claimed, False


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
    worker: str | None = None,
) -> PollReport:
    """Poll one claimed batch: start it (the single place that enforces the timing rules),
    ask the API, record the answer or the failure. The API call runs outside any transaction.

    The poll stops retrying ``budget`` after it started; its sessions are held for
    ``in_flight`` so that no other poll overtakes it, or until ``worker`` (the process running
    it, which heartbeats) is found dead.
    """
    started = clock()
    with session_factory() as session:
        targets = store.start_poll(
            session,
            claim=claim,
            now=started,
            policy=policy,
            busy_until=started + in_flight,
            worker=worker,
        )
    run = _PollRun(
        session_factory=session_factory,
        client=client,
        clock=clock,
        policy=policy,
        rng=rng,
        give_up_at=started + budget,
    )
    if targets:
        run.poll(targets)
    return run.report(len(targets))


def repoll_escalated(
    session_nos: Sequence[str],
    *,
    account_id: int | None,
    session_factory: SessionFactory,
    client: UspeedoClient,
    clock: Clock,
    policy: PollPolicy,
    rng: random.Random,
    budget: timedelta,
    batch_size: int = 100,
    ids: Sequence[int] = (),
    source: ReceiptSource = ReceiptSource.REPOLL,
) -> PollReport:
    """Poll escalated sessions once more, named by SessionNo at an operator's request (e.g.
    after Uspeedo support fixed something), or by id for a reconciliation (their last poll was
    lost with its worker). Late receipts are recorded and a session that now qualifies becomes
    resolved, keeping ``escalated_at``. Pending sessions are left to the schedule. No API call
    starts after ``budget``."""
    started = clock()
    with session_factory() as session:
        targets = store.escalated_targets(
            session, session_nos, account_id=account_id, now=started, ids=ids
        )
    run = _PollRun(
        session_factory=session_factory,
        client=client,
        clock=clock,
        policy=policy,
        rng=rng,
        give_up_at=started + budget,
        respect_cutoff=False,
        source=source,
    )
    by_account: dict[int, list[PollTarget]] = {}
    for target in targets:
        by_account.setdefault(target.account_id, []).append(target)
    for account_targets in by_account.values():
        for start in range(0, len(account_targets), batch_size):
            run.poll(account_targets[start : start + batch_size])
    return run.report(len(targets))


@dataclass(kw_only=True, slots=True)
class _PollRun:
    """One poll's dependencies and running counts."""

    session_factory: SessionFactory
    client: UspeedoClient
    clock: Clock
    policy: PollPolicy
    rng: random.Random
    give_up_at: datetime
    # Automatic polls never reach past the cutoff; an operator's repoll of an escalated
    # session does, on purpose.
    respect_cutoff: bool = True
    # What the stored receipts say they came from (sms_receipts.source).
    source: ReceiptSource = ReceiptSource.POLL
    api_calls: int = 0
    receipts_written: int = 0
    resolved: int = 0
    failed: int = 0
    # API calls by (outcome, code), written with the call's result for the exporter.
    outcomes: Counter[tuple[str, int]] = field(default_factory=Counter)
    # The API's last word on the credentials, written with the call's result too: a refusal's
    # text, or an answer that came through (worker/credentials.py).
    refusal: str | None = None
    accepted: bool = False
    refusals: credentials.RefusalLog = field(default_factory=lambda: credentials.REFUSALS)
    sleep: Callable[[float], None] = time.sleep
    # Extra calls the batch being polled may still spend on halving (see BISECTION_CALLS).
    bisection_left: int = BISECTION_CALLS

    def report(self, polled: int) -> PollReport:
        return PollReport(
            polled=polled,
            api_calls=self.api_calls,
            receipts_written=self.receipts_written,
            resolved=self.resolved,
            failed=self.failed,
        )

    def poll(self, targets: Sequence[PollTarget]) -> None:
        """Ask the API for one batch and record what it says, halving the batch (within
        ``BISECTION_CALLS`` extra calls) while the API refuses it for one of its sessions."""
        self.bisection_left = BISECTION_CALLS
        self.ask(targets)

    def ask(self, targets: Sequence[PollTarget]) -> None:
        # No attempt may start once the poll's budget is spent or the earliest cutoff in the
        # batch has passed, and none runs past that.
        deadline = self.give_up_at
        if self.respect_cutoff:
            deadline = min(deadline, *(self.policy.cutoff_at(t.sent_at) for t in targets))
        self.api_calls += 1
        try:
            batch = self.client.get_send_receipts(
                targets[0].account_id,
                [t.session_no for t in targets],
                deadline=self.client.deadline_in((deadline - self.clock()).total_seconds()),
            )
        except UspeedoError as exc:
            self.outcomes[call_outcome(exc)] += 1
            if isinstance(exc, CredentialsError):
                self.refusal, self.accepted = str(exc), False
                self.refusals.refused(exc)
            self.handle_error(targets, exc)
            return
        self.outcomes[("ok", 0)] += 1
        self.refusal, self.accepted = None, True
        self.store_answer(targets, batch.receipts, _problems_by_session(batch))

    def store_answer(
        self, targets: Sequence[PollTarget], receipts: Sequence[Receipt], problems: dict[str, str]
    ) -> None:
        """Record an answer; when the database refuses it for good (not for want of a
        connection), halve the batch until the session it refuses for is isolated, so that
        one bad row cannot cost the other sessions their receipts."""
        try:
            outcome = self.write(
                lambda session: store.record_answer(
                    session,
                    source=self.source,
                    targets=targets,
                    receipts=receipts,
                    problems=problems,
                    now=self.clock(),
                    policy=self.policy,
                    rng=self.rng,
                )
            )
        except sa_exc.DBAPIError as exc:
            if db.is_transient(exc):
                raise
            if len(targets) > 1:
                middle = len(targets) // 2
                self.store_answer(targets[:middle], receipts, problems)
                self.store_answer(targets[middle:], receipts, problems)
                return
            self.record_failure(
                targets, f"the database refused this session's receipts: {db.error_text(exc)}"
            )
            return
        self.receipts_written += outcome.receipts_written
        self.resolved += len(outcome.resolved)

    def handle_error(self, targets: Sequence[PollTarget], exc: UspeedoError) -> None:
        error = f"refused by the API: {exc}" if isinstance(exc, ParameterError) else str(exc)
        if isinstance(exc, CredentialsError):
            # Logged as one ERROR line a minute by self.refusals, not once per poll.
            self.record_failure(targets, f"credentials refused by the API: {exc}", logging.DEBUG)
            return
        if len(targets) > 1 and _one_session_may_cause(exc):
            if self.bisection_left >= 2:
                # One bad SessionNo makes the API refuse the whole call (one huge session
                # makes the answer too large): halve the batch until it is isolated, so the
                # other sessions keep being polled.
                self.bisection_left -= 2
                middle = len(targets) // 2
                self.ask(targets[:middle])
                self.ask(targets[middle:])
                return
            error += (
                f" (not isolated: this poll spent its {BISECTION_CALLS} extra calls on halving)"
            )
        self.record_failure(targets, error)

    def write(self, work: Callable[[Session], T]) -> T:
        """Record what the API said in one unit of work (with the call counters), retrying
        while the database is unreachable or busy: the answer exists nowhere else, and a
        PostgreSQL restart takes seconds. Bounded: after ``DB_WRITE_DELAYS`` the error
        propagates and the sessions come back when their hold ends. An error that retrying
        cannot fix (:func:`worker.db.is_transient`) propagates at once."""
        for delay in (*DB_WRITE_DELAYS, None):
            try:
                with self.session_factory() as session:
                    result = work(session)
                    store.count_api_calls(session, self.outcomes)
                    credentials.record(
                        session, refusal=self.refusal, accepted=self.accepted, now=self.clock()
                    )
            except sa_exc.DBAPIError as exc:
                if delay is None or not db.is_transient(exc):
                    raise
                log.warning(
                    "database unavailable, retrying in %.2fs: %s", delay, db.error_text(exc)
                )
                self.sleep(delay)
                continue
            self.outcomes.clear()
            self.refusal, self.accepted = None, False
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def record_failure(
        self, targets: Sequence[PollTarget], error: str, level: int = logging.WARNING
    ) -> None:
        log.log(
            level,
            "poll of %d session(s) of account %s failed: %s",
            len(targets),
            targets[0].account_id,
            error,
        )
        try:
            self.write(
                lambda session: store.record_failure(
                    session,
                    targets=targets,
                    error=error,
                    now=self.clock(),
                    policy=self.policy,
                    rng=self.rng,
                )
            )
        except sa_exc.DBAPIError as exc:
            if db.is_transient(exc):
                raise
            # The sessions keep their hold and come back when it ends.
            log.error("could not record a failed poll: %s", db.error_text(exc))
        self.failed += len(targets)


# "Invalid parameter AccountId", "Missing params [Region]": the word after the keyword, when it
# is a name (capitalized), is the parameter the API blames.
_BLAMED = re.compile(r"\bparam(?:eter)?s?\b\W*([A-Z][A-Za-z0-9_]*)", re.IGNORECASE)
# A camel-case word anywhere ("AccountId is invalid", "sessionNoSet[3]") names a parameter too;
# "HTTP" or "UCloud" do not.
_CAMEL_CASE = re.compile(r"\b(?:[A-Z][a-z0-9]+|[a-z]+)(?:[A-Z][a-z0-9]*)+\b")
_SESSION_PARAMETERS = frozenset({"sessionnoset", "sessionno"})


def may_be_a_sessions_fault(message: str) -> bool:
    """Whether the API's message for a parameter error leaves room for one SessionNo being
    its cause: it names SessionNoSet or SessionNo, or no parameter at all. A message naming
    another parameter (``Invalid parameter AccountId``, ``Missing parameter Action``) blames
    the whole call, which halving the batch would only repeat (199 calls for 100 sessions)."""
    named = {word.lower() for word in _CAMEL_CASE.findall(message)}
    named.update(
        match.group(1).lower() for match in _BLAMED.finditer(message) if match.group(1)[0].isupper()
    )
    return not named or not named.isdisjoint(_SESSION_PARAMETERS)


def _one_session_may_cause(exc: UspeedoError) -> bool:
    """Whether a failed call of many sessions may be one session's doing: an answer too large
    (one session may weigh it all), or a parameter error the message does not pin on the
    call itself."""
    if isinstance(exc, AnswerTooLarge):
        return True
    return isinstance(exc, ParameterError) and may_be_a_sessions_fault(exc.api_message)


def call_outcome(exc: UspeedoError) -> tuple[str, int]:
    """How a failed API call is counted: by RetCode, by HTTP status, or by kind."""
    if isinstance(exc, ApiError):
        return ("retcode", exc.ret_code)
    if isinstance(exc, PollWindowClosed):
        return ("deadline", 0)
    if isinstance(exc, MalformedResponse):
        return ("malformed", 0)
    if exc.http_status is not None:
        return ("http", exc.http_status)
    return ("transport", 0)


def _problems_by_session(batch: ReceiptBatch) -> dict[str, str]:
    """Problems of an answer that concern one session, joined per session (its last_error)."""
    by_session: dict[str, list[str]] = {}
    for session_no, problem in batch.session_problems:
        by_session.setdefault(session_no, []).append(problem)
    return {session_no: "; ".join(problems) for session_no, problems in by_session.items()}
