"""The public schema: ``sms_sessions``, ``sms_receipts`` and the tables around them. Users query
these tables in SQL, so names and meanings here are a contract (see README "Tables")."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from worker.domain import (
    EventDestination,
    ReceiptSource,
    Result,
    SessionEventType,
    SessionState,
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "%(table_name)s_%(column_0_N_name)s_key",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "%(table_name)s_%(column_0_N_name)s_fkey",
    "pk": "%(table_name)s_pkey",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware timestamps on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so values are stored as UTC and
    given back tz-aware. Naive datetimes are refused: they are always a bug here.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: timestamps must carry a time zone")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _partial_index(name: str, *columns: str, where: str) -> sa.Index:
    """An index of the rows matching ``where`` alone, on both backends (the same SQL)."""
    return sa.Index(name, *columns, postgresql_where=sa.text(where), sqlite_where=sa.text(where))


JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments INTEGER PRIMARY KEY, PostgreSQL ids should be bigint.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

timestamp = Annotated[datetime, mapped_column(UTCDateTime())]
timestamp_now = Annotated[
    datetime, mapped_column(UTCDateTime(), server_default=sa.func.current_timestamp())
]


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
    }


def _in(
    column: str,
    values: type[Result]
    | type[SessionState]
    | type[ReceiptSource]
    | type[SessionEventType]
    | type[EventDestination],
) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class SmsSession(Base):
    """One SessionNo handed to us, and where its poll series stands."""

    __tablename__ = "sms_sessions"
    __table_args__ = (
        sa.UniqueConstraint("account_id", "session_no"),
        sa.CheckConstraint(_in("state", SessionState), name="state"),
        sa.CheckConstraint("account_id > 0", name="account_id_positive"),
        # The claim's hot path: due pending sessions of one account, oldest first. Partial, so
        # its size follows the pending work and not the history of resolved sessions.
        _partial_index(
            "ix_sms_sessions_due",
            "account_id",
            "next_poll_at",
            where="state = 'pending'",
        ),
        # Escalation looks for pending sessions sent before the cutoff.
        _partial_index(
            "ix_sms_sessions_pending_sent_at",
            "sent_at",
            where="state = 'pending'",
        ),
        # Each tick looks for sessions held by a process that stopped heartbeating: only the
        # polls in flight are in this index.
        _partial_index(
            "ix_sms_sessions_held_by",
            "held_by",
            where="held_by IS NOT NULL",
        ),
        # A push names no account: its SessionNos are matched across accounts
        # (worker/push.py), which the unique key, account first, cannot serve (a scan of every
        # session per push: 47 ms at 200k sessions, 0.3 ms with this index).
        sa.Index("ix_sms_sessions_session_no", "session_no"),
        # The purge (worker/purge.py) walks finished sessions oldest first. Partial: a pending
        # session's updates (claim, poll, answer) never touch it.
        _partial_index(
            "ix_sms_sessions_finished_sent_at",
            "sent_at",
            "id",
            where="state IN ('resolved', 'escalated')",
        ),
        # The escalations still waiting for someone: counted by every metrics scrape and
        # listed by the stale_sessions view, whatever the size of the history.
        _partial_index(
            "ix_sms_sessions_unacknowledged",
            "escalated_at",
            where="state = 'escalated' AND acknowledged_at IS NULL",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(sa.BigInteger)
    session_no: Mapped[str] = mapped_column(sa.Text)
    state: Mapped[str] = mapped_column(sa.Text, server_default=SessionState.PENDING.value)
    # Phones as the sender tracked them (their spelling); empty when unknown.
    phones: Mapped[list[str]] = mapped_column(JSONType, server_default=sa.text("'[]'"))
    user_ref: Mapped[str | None] = mapped_column(sa.Text)
    sent_at: Mapped[timestamp]
    next_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_polled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    escalated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    poll_count: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    # What support needs for an escalated session: the phones without a final receipt and
    # their last known result, as JSON (see README).
    escalation_detail: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # An operator marked the escalation handled (``receipts ack``); it stops alerting.
    acknowledged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ack_note: Mapped[str | None] = mapped_column(sa.Text)
    # The claim: which tick's token may poll this session. Kept while the poll is in flight,
    # so that only that poll may record its answer's schedule; cleared when it is recorded.
    claim_token: Mapped[str | None] = mapped_column(sa.Text)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The worker process (receipts_workers.id) whose poll of this session is in flight: when
    # that process stops heartbeating, its holds are released at once instead of at the end
    # of the in-flight window.
    held_by: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[timestamp_now]
    updated_at: Mapped[timestamp_now]
    # When its phone numbers were masked (RECEIPTS_MASK_PHONES_AFTER, worker/masking.py): from
    # then on ``phones`` holds masked forms and every phone_key of it is a keyed hash.
    phones_masked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Of a masked session only: the keyed hashes of the tracked phones, in the order of
    # ``phones``, which matching and resolution read instead of the masked forms' digits.
    masked_phone_keys: Mapped[list[str] | None] = mapped_column(JSONType)


class SmsReceipt(Base):
    """The latest known receipt of one phone of one session."""

    __tablename__ = "sms_receipts"
    __table_args__ = (
        # Phones are identified by their digits: Uspeedo may spell the same phone differently
        # from one answer to the next, and that must not create a second row.
        sa.UniqueConstraint("account_id", "session_no", "phone_key"),
        sa.ForeignKeyConstraint(
            ["account_id", "session_no"],
            ["sms_sessions.account_id", "sms_sessions.session_no"],
            ondelete="CASCADE",
        ),
        sa.CheckConstraint(_in("result", Result), name="result"),
        sa.CheckConstraint(_in("source", ReceiptSource), name="source"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(sa.BigInteger)
    session_no: Mapped[str] = mapped_column(sa.Text)
    # As tracked when the receipt matches a tracked phone, else as Uspeedo spelled it.
    phone: Mapped[str] = mapped_column(sa.Text)
    phone_key: Mapped[str] = mapped_column(sa.Text)
    result: Mapped[str] = mapped_column(sa.Text)
    receipt_code: Mapped[str | None] = mapped_column(sa.Text)
    receipt_desc: Mapped[str | None] = mapped_column(sa.Text)
    receipt_time: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cost_count: Mapped[int | None] = mapped_column(sa.Integer)
    user_id: Mapped[str | None] = mapped_column(sa.Text)
    country_code: Mapped[str | None] = mapped_column(sa.Text)
    # Where the stored receipt came from: poll, push or repoll (worker.domain.ReceiptSource).
    source: Mapped[str] = mapped_column(sa.Text, server_default=ReceiptSource.POLL.value)
    first_seen_at: Mapped[timestamp_now]
    updated_at: Mapped[timestamp_now]


class ReceiptInbox(Base):
    """Pushed receipts that could not be matched to one tracked session (not tracked yet, or
    the same SessionNo in several accounts): applied when the session is tracked, within the
    cutoff, then removed. One row per (SessionNo, account, phone), the winning version."""

    __tablename__ = "sms_receipt_inbox"
    __table_args__ = (
        sa.UniqueConstraint("session_no", "account_id", "phone_key"),
        sa.CheckConstraint(_in("result", Result), name="result"),
        # Expiry and the bound walk the oldest first.
        sa.Index("ix_sms_receipt_inbox_received_at", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    session_no: Mapped[str] = mapped_column(sa.Text)
    # The account the push URL named (?account_id=), or 0 when it named none.
    account_id: Mapped[int] = mapped_column(sa.BigInteger)
    phone: Mapped[str] = mapped_column(sa.Text)
    phone_key: Mapped[str] = mapped_column(sa.Text)
    result: Mapped[str] = mapped_column(sa.Text)
    receipt_code: Mapped[str | None] = mapped_column(sa.Text)
    receipt_desc: Mapped[str | None] = mapped_column(sa.Text)
    receipt_time: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cost_count: Mapped[int | None] = mapped_column(sa.Integer)
    user_id: Mapped[str | None] = mapped_column(sa.Text)
    country_code: Mapped[str | None] = mapped_column(sa.Text)
    # "untracked" or "ambiguous" (the SessionNo exists in several accounts)
    reason: Mapped[str] = mapped_column(sa.Text)
    received_at: Mapped[timestamp]


class PushCount(Base):
    """What the receiver processes counted (requests by outcome, push-to-commit latency
    buckets, the time of the last push), added to by each process every second, so that one
    exporter reports for all of them (worker/receiver.py)."""

    __tablename__ = "receipts_push_counts"

    metric: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    label: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    value: Mapped[float] = mapped_column(sa.Float, server_default=sa.text("0"))


# --- history: every observed change, in one order -----------------------------------------

# One increasing id for every event, receipt changes and session events alike, so that one
# cursor per destination can later read them all in order (README "Tables").
#
# PostgreSQL draws them from this sequence. The trap a reader of the stream must know: ids are
# handed out when a row is written, not when its transaction commits, so a transaction that
# took id 7 may commit after one that took id 8. A reader that saw 8 and remembers "after 8"
# never sees 7. Reading "id > cursor" is safe only up to ids no open transaction can still
# hold: having seen ids up to M, the reader may deliver the ids up to M, and move its cursor
# to M, only once every transaction in progress in that snapshot
# (``pg_snapshot_xip(pg_current_snapshot())``) has ended (``pg_xact_status``); every id up to M
# is then committed or gone for good. (``pg_snapshot_xmin`` reaching that snapshot's xmax says
# the same, but is held back by any long transaction on the server, other databases' too.)
# That holds because each writer has its
# transaction id before it takes an event id: it locks the sessions' rows first
# (store.lock_sessions, or the UPDATE of store.escalate_due). Within one session ids commit in
# order, since its writers hold its row lock until they commit.
#
# SQLite has one writer at a time (every unit of work begins with the write lock, worker/db.py):
# there ids are taken from ``receipts_event_ids`` inside the writing transaction and commit in
# their order.
EVENT_IDS = sa.Sequence("receipts_event_id_seq", metadata=metadata)


def _event_id() -> Any:
    """The id column of an event table: on PostgreSQL its default is ``nextval`` of
    :data:`EVENT_IDS` (migration 0008); on SQLite the writer gives every id (worker/event_log.py).
    Declared as a server-side default of no particular text, so that one model fits both."""
    return mapped_column(
        BigId,
        primary_key=True,
        autoincrement=False,
        server_default=sa.FetchedValue(),
    )


class SmsReceiptEvent(Base):
    """Append-only: one row per observed change of a phone's receipt (a repeat of the stored
    receipt adds nothing), whether or not it became the stored one (``applied``)."""

    __tablename__ = "sms_receipt_events"
    __table_args__ = (
        sa.CheckConstraint(_in("result", Result), name="result"),
        sa.CheckConstraint(_in("source", ReceiptSource), name="source"),
        # A session's timeline, and the receipts of one phone that lost (the upsert looks them
        # up so that a repeated losing receipt is recorded once).
        sa.Index("ix_sms_receipt_events_session", "account_id", "session_no", "phone_key"),
    )

    # No foreign key to sms_sessions: the check would cost every history row a trigger and a
    # lookup on the hot path of ingestion, and the rows' only writer is the upsert of receipts
    # of sessions it has just locked. Deleting a session's history is the purge's job.
    id: Mapped[int] = _event_id()
    account_id: Mapped[int] = mapped_column(sa.BigInteger)
    session_no: Mapped[str] = mapped_column(sa.Text)
    phone: Mapped[str] = mapped_column(sa.Text)
    phone_key: Mapped[str] = mapped_column(sa.Text)
    result: Mapped[str] = mapped_column(sa.Text)
    receipt_code: Mapped[str | None] = mapped_column(sa.Text)
    receipt_desc: Mapped[str | None] = mapped_column(sa.Text)
    receipt_time: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cost_count: Mapped[int | None] = mapped_column(sa.Integer)
    user_id: Mapped[str | None] = mapped_column(sa.Text)
    source: Mapped[str] = mapped_column(sa.Text)
    observed_at: Mapped[timestamp]
    # Whether it became the stored receipt (sms_receipts); false when the stored one won (it
    # was final and this one not, or this one was older).
    applied: Mapped[bool] = mapped_column(sa.Boolean)


class SmsSessionEvent(Base):
    """Append-only: a session became resolved or escalated, in the transaction that changed
    its state, numbered from the same ids as receipt changes."""

    __tablename__ = "sms_session_events"
    __table_args__ = (
        sa.CheckConstraint(_in("type", SessionEventType), name="type"),
        sa.CheckConstraint(_in("source", ReceiptSource), name="source"),
        sa.Index("ix_sms_session_events_session", "account_id", "session_no"),
    )

    id: Mapped[int] = _event_id()
    account_id: Mapped[int] = mapped_column(sa.BigInteger)
    session_no: Mapped[str] = mapped_column(sa.Text)
    type: Mapped[str] = mapped_column(sa.Text)
    # What resolved it (poll, push, repoll); NULL for an escalation.
    source: Mapped[str | None] = mapped_column(sa.Text)
    occurred_at: Mapped[timestamp]


class EventIdCounter(Base):
    """SQLite only: the last event id handed out (PostgreSQL uses ``receipts_event_id_seq``
    and leaves this table as the migration made it). One row."""

    __tablename__ = "receipts_event_ids"
    __table_args__ = (sa.CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    last_id: Mapped[int] = mapped_column(sa.BigInteger)


sessions_table: sa.Table = SmsSession.__table__  # type: ignore[assignment]
receipts_table: sa.Table = SmsReceipt.__table__  # type: ignore[assignment]
receipt_events_table: sa.Table = SmsReceiptEvent.__table__  # type: ignore[assignment]
session_events_table: sa.Table = SmsSessionEvent.__table__  # type: ignore[assignment]
event_ids_table: sa.Table = EventIdCounter.__table__  # type: ignore[assignment]


class EscalationOutbox(Base):
    """Webhook deliveries of escalations, written in the same transaction as the escalation
    so that none is lost, and delivered at least once by the workers."""

    __tablename__ = "escalation_outbox"
    __table_args__ = (
        _partial_index(
            "ix_escalation_outbox_due",
            "next_attempt_at",
            where="delivered_at IS NULL",
        ),
        # The purge looks a session's webhooks up, to keep the session while one is
        # undelivered and to delete them with it (worker/purge.py).
        sa.Index("ix_escalation_outbox_session", "account_id", "session_no"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # A stable id receivers can deduplicate on (sent as X-Receipts-Delivery header too).
    delivery_id: Mapped[str] = mapped_column(sa.Text, unique=True)
    event: Mapped[str] = mapped_column(sa.Text)
    account_id: Mapped[int] = mapped_column(sa.BigInteger)
    session_no: Mapped[str] = mapped_column(sa.Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    attempts: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[timestamp_now]
    # The deliverer holding this row's lease: its result is recorded only while it still holds
    # it, so a deliverer outlived by its lease cannot overwrite the next one's outcome.
    claim_token: Mapped[str | None] = mapped_column(sa.Text)


class EventCursor(Base):
    """Where the event stream of one destination stands (worker/events.py): every event up
    to ``delivered_id`` was delivered (or parked), and the batch after it is held by at most
    one deliverer at a time (``claim_token`` until ``leased_until``)."""

    __tablename__ = "receipts_event_cursors"
    __table_args__ = (sa.CheckConstraint(_in("destination", EventDestination), name="destination"),)

    destination: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    # Whether the destination was configured at the last tick: the exporter reports only
    # these, so that one configured once and removed does not look ever later.
    active: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.true())
    delivered_id: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    # Every event id up to safe_id has committed or never will (worker/events.py: the
    # horizon); pending_id is the next such bound, waiting for the transactions that were in
    # progress in pending_snapshot (PostgreSQL's text form of a pg_snapshot) to end.
    safe_id: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    pending_id: Mapped[int | None] = mapped_column(sa.BigInteger)
    pending_snapshot: Mapped[str | None] = mapped_column(sa.Text)
    claim_token: Mapped[str | None] = mapped_column(sa.Text)
    leased_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The batch after delivered_id: failed attempts, the first of them, when to try again.
    attempts: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
    first_failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    delivered_events: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ParkedEventBatch(Base):
    """A batch of events that failed every attempt for ``RECEIPTS_EVENTS_RETRY_WINDOW``: the
    destination's cursor went past it so that later events still flow, and it is kept here,
    counted and alerted on, until an operator replays or dismisses it. The events are those
    of the history with ``after_id < id <= through_id`` of the types selected."""

    __tablename__ = "receipts_parked_event_batches"
    __table_args__ = (
        sa.CheckConstraint(_in("destination", EventDestination), name="destination"),
        # parked; replay: an operator asked for it to be sent again (``receipts events
        # replay``), which the next delivery round does before the stream; then replayed; or
        # dismissed (``receipts events dismiss``).
        sa.CheckConstraint("state IN ('parked', 'replay', 'replayed', 'dismissed')", name="state"),
        # What the exporter counts and the deliverer looks for: the batches still open.
        _partial_index(
            "ix_receipts_parked_event_batches_open",
            "destination",
            "state",
            where="state IN ('parked', 'replay')",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    destination: Mapped[str] = mapped_column(sa.Text)
    after_id: Mapped[int] = mapped_column(sa.BigInteger)
    through_id: Mapped[int] = mapped_column(sa.BigInteger)
    events: Mapped[int] = mapped_column(sa.Integer)
    attempts: Mapped[int] = mapped_column(sa.Integer)
    first_failed_at: Mapped[timestamp]
    parked_at: Mapped[timestamp]
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    state: Mapped[str] = mapped_column(sa.Text, server_default="parked")
    # When it was replayed or dismissed (``receipts events``).
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Heartbeat(Base):
    """When each periodic job last ran, and the timings it ran with (so that SQL views and
    the exporter can judge staleness without reading the workers' environment)."""

    __tablename__ = "receipts_heartbeats"

    name: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    beat_at: Mapped[timestamp]
    tick_seconds: Mapped[float] = mapped_column(sa.Float)
    poll_interval_max_seconds: Mapped[float] = mapped_column(sa.Float)


class WorkerProcess(Base):
    """A worker process that may hold sessions while its polls are in flight, and when it last
    showed it is alive (so that the holds of a killed process are released within two ticks)."""

    __tablename__ = "receipts_workers"

    # hostname:pid:random, unique per process start
    id: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    hostname: Mapped[str] = mapped_column(sa.Text)
    pid: Mapped[int] = mapped_column(sa.Integer)
    started_at: Mapped[timestamp]
    beat_at: Mapped[timestamp]


class ApiCallCount(Base):
    """Counters of API calls by outcome, kept in the database so that the exporter reports
    the same totals however many workers run."""

    __tablename__ = "api_call_counts"

    # "ok", "retcode" (with ret_code), "http" (with ret_code = HTTP status), "transport",
    # "malformed", "deadline".
    outcome: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    ret_code: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    calls: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))


class PurgeCount(Base):
    """Rows the purge deleted (worker/purge.py), by table, summed over every run, so that the
    exporter reports the same totals whichever process purged."""

    __tablename__ = "receipts_purge_counts"

    # A table's name: sms_sessions, sms_receipts, sms_receipt_events, ...
    table_name: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    purged: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    last_purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Rows whose phone numbers the masking replaced (worker/masking.py), by table.
    masked: Mapped[int] = mapped_column(sa.BigInteger, server_default=sa.text("0"))
    last_masked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class RejectedTrack(Base):
    """A ``receipts.track`` task refused by validation, kept so that nothing a sender handed
    over is lost: the arguments as received, why they were refused, and what became of the
    row (``receipts rejected``; README "Refused tasks")."""

    __tablename__ = "rejected_tracks"
    __table_args__ = (
        sa.CheckConstraint("state IN ('open', 'resubmitted', 'dismissed')", name="state"),
        # The ones still waiting for someone: counted by every metrics scrape and listed by
        # `receipts rejected`, whatever the history holds.
        _partial_index(
            "ix_rejected_tracks_open",
            "received_at",
            where="state = 'open'",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    received_at: Mapped[timestamp]
    # The Celery task id: a message delivered twice (a worker lost mid-task, Redis'
    # visibility timeout) is recorded once.
    task_id: Mapped[str | None] = mapped_column(sa.Text, unique=True)
    # The sending Celery app's node name (the message's ``origin`` header), e.g. gen42@host.
    origin: Mapped[str | None] = mapped_column(sa.Text)
    # The task's arguments as received, phones in clear (like sms_sessions.phones), so that
    # the row can be resubmitted; commands show them masked.
    arguments: Mapped[dict[str, Any]] = mapped_column(JSONType)
    reason: Mapped[str] = mapped_column(sa.Text)
    state: Mapped[str] = mapped_column(sa.Text, server_default="open")
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # What an operator changed to resubmit it: {field: new value, or null to drop it}.
    corrections: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    note: Mapped[str | None] = mapped_column(sa.Text)


class CredentialsStatus(Base):
    """The API's latest word on the credentials, written by every worker's polls so that one
    exporter and one view report for all of them (worker/credentials.py). One row, ``api``,
    once the API has refused the credentials."""

    __tablename__ = "receipts_credentials"

    name: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    # When a poll last got RetCode 215398, and that answer (RetCode, message, request uuid).
    refused_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    refusal: Mapped[str | None] = mapped_column(sa.Text)
    # When an answer next came through after that refusal. Not rewritten by every poll: a
    # healthy fleet never writes this row.
    accepted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


outbox_table: sa.Table = EscalationOutbox.__table__  # type: ignore[assignment]
event_cursors_table: sa.Table = EventCursor.__table__  # type: ignore[assignment]
parked_batches_table: sa.Table = ParkedEventBatch.__table__  # type: ignore[assignment]
heartbeats_table: sa.Table = Heartbeat.__table__  # type: ignore[assignment]
api_calls_table: sa.Table = ApiCallCount.__table__  # type: ignore[assignment]
workers_table: sa.Table = WorkerProcess.__table__  # type: ignore[assignment]
inbox_table: sa.Table = ReceiptInbox.__table__  # type: ignore[assignment]
push_counts_table: sa.Table = PushCount.__table__  # type: ignore[assignment]
rejected_table: sa.Table = RejectedTrack.__table__  # type: ignore[assignment]
credentials_table: sa.Table = CredentialsStatus.__table__  # type: ignore[assignment]
purge_counts_table: sa.Table = PurgeCount.__table__  # type: ignore[assignment]


# The views (created by migration 0002; stale_sessions recreated by 0005), described for
# reading only: their own metadata keeps Alembic's autogenerate from trying to create them as
# tables.
views_metadata = sa.MetaData()

stale_sessions_view = sa.Table(
    "stale_sessions",
    views_metadata,
    sa.Column("kind", sa.Text),  # escalated | overdue | clock_stopped | credentials
    sa.Column("account_id", sa.BigInteger),
    sa.Column("session_no", sa.Text),
    sa.Column("state", sa.Text),
    sa.Column("sent_at", UTCDateTime()),
    sa.Column("next_poll_at", UTCDateTime()),
    sa.Column("escalated_at", UTCDateTime()),
    sa.Column("poll_count", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("escalation_detail", JSONType),
)

session_summary_view = sa.Table(
    "session_summary",
    views_metadata,
    sa.Column("account_id", sa.BigInteger),
    sa.Column("session_no", sa.Text),
    sa.Column("state", sa.Text),
    sa.Column("sent_at", UTCDateTime()),
    sa.Column("resolved_at", UTCDateTime()),
    sa.Column("escalated_at", UTCDateTime()),
    sa.Column("acknowledged_at", UTCDateTime()),
    sa.Column("poll_count", sa.Integer),
    sa.Column("phones_tracked", sa.Integer),
    sa.Column("phones_reported", sa.Integer),
    sa.Column("phones_final", sa.Integer),
    sa.Column("phones_successful", sa.Integer),
    sa.Column("cost", sa.Integer),
    sa.Column("resolved_late", sa.Boolean),
)
