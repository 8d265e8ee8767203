"""The Python API: ``worker.track`` and ``worker.track_many`` for senders, ``worker.status`` and
``worker.history`` to read a session back; acknowledging escalations and handling refused
``receipts.track`` tasks for operators."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from worker import events, intake, records, store
from worker.clock import database_now
from worker.config import get_settings
from worker.db import error_text, get_engine, read_scope, session_scope
from worker.errors import TrackError, TrackInterrupted
from worker.schedule import PollPolicy
from worker.tracking import (
    TrackRequest,
    TrackResult,
    parse_requests,
    parse_row,
    track_requests,
)

# Rows per transaction of a streamed import. On SQLite each transaction holds the one write
# lock of the whole file: 1,000 rows hold it for about a tenth of a second (a quarter under
# load; README "Handing SessionNos over"), so the worker's ticks and other writers interleave.
# PostgreSQL locks rows, not the file: larger chunks, fewer round trips.
STREAM_CHUNK_SQLITE = 1_000
STREAM_CHUNK_POSTGRESQL = 10_000
# Bad rows of a streamed import named one by one in its TrackError; the rest are counted, so
# that a file of a million bad rows costs no more memory than a good one.
MAX_NAMED_PROBLEMS = 1_000

NumberedRows = Callable[[], Iterable[tuple[int, Mapping[str, Any] | TrackRequest]]]
# Told how a streamed import goes: the phase ("validating", then "recording"), rows done, and
# the rows there are (None while validating: the input is read once before it is known).
Progress = Callable[[str, int, int | None], None]
# Rows validated between two calls of a Progress (a call per row would cost more than a row).
PROGRESS_EVERY = 1_000


def track(
    session_no: str,
    account_id: int,
    *,
    phones: Sequence[str] | str | None = None,
    sent_at: datetime | str | None = None,
    user_ref: str | None = None,
) -> TrackResult:
    """Record one session to poll. Tracking it again merges (phones are added), never
    duplicates. Raises :class:`worker.TrackError` naming the bad field."""
    return track_many(
        [
            {
                "session_no": session_no,
                "account_id": account_id,
                "phones": phones,
                "sent_at": sent_at,
                "user_ref": user_ref,
            }
        ],
        label="argument",
    )


def acknowledge(
    session_nos: Sequence[str], *, note: str | None = None, account_id: int | None = None
) -> list[tuple[int, str]]:
    """Mark escalations as handled; they stop counting as alerts. All or none: raises
    :class:`worker.AckError` naming each SessionNo that is unknown or not escalated."""
    with session_scope() as session:
        return store.acknowledge(
            session, list(session_nos), now=database_now(), note=note, account_id=account_id
        )


def status(session_no: str, *, account_id: int | None = None) -> records.SessionStatus:
    """A tracked session, where its polling stands and every phone's receipt, as a frozen
    :class:`worker.SessionStatus`. ``account_id`` is needed only when two accounts share the
    SessionNo. Raises :class:`worker.SessionNotFound` for a SessionNo that is not tracked (or is
    ambiguous without ``account_id``)."""
    with read_scope() as session:
        return records.read_status(session, session_no, account_id=account_id)


def history(session_no: str, *, account_id: int | None = None) -> records.SessionHistory:
    """Everything observed of a tracked session, oldest first, as a frozen
    :class:`worker.SessionHistory`: every change of its phones' receipts (applied or not) and
    its resolutions and escalations. ``account_id`` is needed only when two accounts share the
    SessionNo. Raises :class:`worker.SessionNotFound` as :func:`status` does."""
    with read_scope() as session:
        return records.read_history(session, session_no, account_id=account_id)


def track_many(
    sessions: Iterable[Mapping[str, Any] | TrackRequest],
    *,
    label: str = "row",
    first_number: int = 1,
) -> TrackResult:
    """Record many sessions at once: all of them, or none if any row is invalid (the error
    names every bad row and field)."""
    now = database_now()
    requests = parse_requests(sessions, now=now, label=label, first_number=first_number)
    with session_scope() as session:
        return track_requests(session, requests, policy=get_settings().poll_policy(), now=now)


def track_stream(
    rows: NumberedRows,
    *,
    label: str = "row",
    chunk_size: int | None = None,
    progress: Progress | None = None,
) -> TrackResult:
    """Record any number of sessions with flat memory and short transactions: what
    ``receipts track`` does with a CSV file or SessionNos on stdin.

    ``rows`` returns a fresh iterator of ``(number, row)`` each time it is called (a file read
    from its start): it is read twice, and no row is kept beyond its chunk.

    1. Every row is validated first, keeping only the problems. If any row is bad, nothing is
       recorded: :class:`worker.TrackError` names the bad rows by ``label`` and number (the
       first :data:`MAX_NAMED_PROBLEMS`, then a count).
    2. Then the rows are recorded in chunks of ``chunk_size`` (by default
       :data:`STREAM_CHUNK_SQLITE` or :data:`STREAM_CHUNK_POSTGRESQL`), each in its own
       transaction, so that none holds SQLite's write
       lock for more than a fraction of a second and the worker's ticks and other
       ``receipts track`` calls interleave with the import.

    ``progress``, if given, is told every :data:`PROGRESS_EVERY` rows validated and every
    chunk recorded (``receipts track`` draws a progress bar from it).

    If the database fails part way, the chunks recorded so far stay recorded and
    :class:`worker.TrackInterrupted` says how many rows they held; running the same import
    again completes it, since tracking is idempotent (a session tracked twice is merged, never
    duplicated). Counts are per chunk: a SessionNo repeated in rows that fall in two chunks
    counts twice (new, then merged or unchanged).
    """
    report = progress or _no_progress
    now = database_now()
    problems: list[str] = []
    bad = valid = 0
    for number, raw in rows():
        try:
            parse_row(raw, now=now, label=label, number=number)
        except ValueError as exc:
            bad += 1
            if len(problems) < MAX_NAMED_PROBLEMS:
                problems.append(str(exc))
        else:
            valid += 1
        if (bad + valid) % PROGRESS_EVERY == 0:
            report("validating", bad + valid, None)
    report("validating", bad + valid, bad + valid)
    if bad:
        raise TrackError(problems, valid_rows=valid, omitted=bad - len(problems))

    policy = get_settings().poll_policy()
    sqlite = get_engine().dialect.name == "sqlite"
    size = chunk_size or (STREAM_CHUNK_SQLITE if sqlite else STREAM_CHUNK_POSTGRESQL)
    result = TrackResult()
    recorded = 0  # rows, which may hold one session more than once
    chunk: list[TrackRequest] = []
    for number, raw in rows():
        try:
            # The same `now` as the first pass: a row without sent_at gets the same time.
            chunk.append(parse_row(raw, now=now, label=label, number=number))
        except ValueError as exc:
            raise TrackInterrupted(
                f"the input changed after it was validated: {exc}", recorded=recorded, total=valid
            ) from None
        if len(chunk) >= size:
            recorded += _record_chunk(chunk, result, policy=policy, recorded=recorded, total=valid)
            chunk = []
            report("recording", recorded, valid)
    if chunk:
        recorded += _record_chunk(chunk, result, policy=policy, recorded=recorded, total=valid)
        report("recording", recorded, valid)
    return result


def _no_progress(_phase: str, _done: int, _total: int | None) -> None:
    """No one to tell how an import goes."""


def _record_chunk(
    chunk: Sequence[TrackRequest],
    result: TrackResult,
    *,
    policy: PollPolicy,
    recorded: int,
    total: int,
) -> int:
    """Record one chunk of a streamed import in its own unit of work, adding to ``result``;
    returns its number of rows."""
    try:
        with session_scope() as session:
            done = track_requests(session, chunk, policy=policy, now=database_now())
    except sa.exc.SQLAlchemyError as exc:
        raise TrackInterrupted(
            f"could not record sessions: {error_text(exc)}", recorded=recorded, total=total
        ) from exc
    result.inserted += done.inserted
    result.updated += done.updated
    result.unchanged += done.unchanged
    return len(chunk)


# --- refused receipts.track tasks (worker/intake.py) -----------------------------------------


def rejected_tracks(*, include_closed: bool = False) -> list[intake.RejectedTrack]:
    """The ``receipts.track`` tasks refused by validation and still open (or all of them),
    oldest first, arguments as received."""
    with read_scope() as session:
        return intake.list_rejections(session, include_closed=include_closed)


def resubmit_rejected(
    ids: Sequence[int],
    *,
    corrections: Mapping[str, Any] | None = None,
    note: str | None = None,
) -> TrackResult:
    """Track refused tasks again, each with ``corrections`` applied to its stored arguments
    (a value replaces a field, ``None`` drops it), and mark them resubmitted, in one
    transaction. All or none: :class:`worker.RejectedTrackError` for an unknown or closed row,
    :class:`worker.TrackError` naming every row that is still invalid.

    Each row is validated as of when it was received: without a ``sent_at`` it was sent then,
    and a ``sent_at`` after it is in the future. A session resubmitted after its cutoff is
    escalated at the next tick, without a poll.
    """
    fixes = dict(corrections or {})
    now = database_now()
    with session_scope() as session:
        rows = intake.lock_open(session, ids)
        requests: list[TrackRequest] = []
        problems: list[str] = []
        for row in rows:
            arguments = intake.corrected(row.arguments, fixes)
            try:
                requests.append(
                    parse_row(arguments, now=row.received_at, label="rejected track", number=row.id)
                )
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise TrackError(problems, valid_rows=len(requests))
        result = track_requests(session, requests, policy=get_settings().poll_policy(), now=now)
        intake.close(
            session,
            [row.id for row in rows],
            state=intake.RejectionState.RESUBMITTED,
            now=now,
            corrections=fixes,
            note=note,
        )
    return result


def dismiss_rejected(ids: Sequence[int], *, note: str | None = None) -> list[int]:
    """Close refused tasks without tracking anything. All or none:
    :class:`worker.RejectedTrackError` names each unknown or closed row."""
    with session_scope() as session:
        rows = intake.lock_open(session, ids)
        closed = [row.id for row in rows]
        intake.close(
            session, closed, state=intake.RejectionState.DISMISSED, now=database_now(), note=note
        )
    return closed


# --- parked event batches (worker/events.py) -------------------------------------------------


def parked_event_batches(*, include_closed: bool = False) -> list[events.ParkedBatch]:
    """The event batches parked after failing for ``RECEIPTS_EVENTS_RETRY_WINDOW`` and still
    open (or all of them), oldest first."""
    with read_scope() as session:
        return events.parked_batches(session, include_closed=include_closed)


def replay_parked(ids: Sequence[int]) -> list[int]:
    """Have parked batches sent again by their destination's next delivery round (the tick
    queues one within a tick). All or none: :class:`worker.ParkedBatchError` names each
    unknown or closed batch."""
    with session_scope() as session:
        return events.mark_for_replay(session, ids)


def dismiss_parked(ids: Sequence[int]) -> list[int]:
    """Close parked batches without sending them. All or none: :class:`worker.ParkedBatchError`
    names each unknown or closed batch."""
    with session_scope() as session:
        return events.dismiss(session, ids, now=database_now())
