"""history: sms_receipt_events, sms_session_events and the event ids they share

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30

Every observed change of a phone's receipt is kept in ``sms_receipt_events`` (append-only,
written by the receipts upsert in the same statement on PostgreSQL, the same transaction on
SQLite), and every resolution and escalation of a session in ``sms_session_events``, in the
transaction that changed the session's state. Both take their ids from one increasing series
(``receipts_event_id_seq`` on PostgreSQL, the one row of ``receipts_event_ids`` on SQLite), so
that the events can be read in order with one cursor (worker/models.py says what such a
reader must beware of).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
RESULTS = "('Success', 'Fail', 'Unknow', 'SubmitFail')"
SOURCES = "('poll', 'push', 'repoll')"
SESSION_EVENTS = "('session.resolved', 'session.escalated')"


def _event_id(is_pg: bool) -> sa.Column[int]:
    default = sa.text("nextval('receipts_event_id_seq')") if is_pg else None
    return sa.Column("id", BIG_ID, server_default=default, autoincrement=False, nullable=False)


def upgrade() -> None:
    is_pg = op.get_bind().dialect.name == "postgresql"
    if is_pg:
        op.execute(sa.schema.CreateSequence(sa.Sequence("receipts_event_id_seq")))
    op.create_table(
        "sms_receipt_events",
        _event_id(is_pg),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("session_no", sa.Text(), nullable=False),
        sa.Column("phone", sa.Text(), nullable=False),
        sa.Column("phone_key", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("receipt_code", sa.Text(), nullable=True),
        sa.Column("receipt_desc", sa.Text(), nullable=True),
        sa.Column("receipt_time", TIMESTAMPTZ, nullable=True),
        sa.Column("cost_count", sa.Integer(), nullable=True),
        sa.Column("user_id", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("observed_at", TIMESTAMPTZ, nullable=False),
        sa.Column("applied", sa.Boolean(), nullable=False),
        sa.CheckConstraint(f"result IN {RESULTS}", name=op.f("ck_sms_receipt_events_result")),
        sa.CheckConstraint(f"source IN {SOURCES}", name=op.f("ck_sms_receipt_events_source")),
        sa.PrimaryKeyConstraint("id", name=op.f("sms_receipt_events_pkey")),
    )
    op.create_index(
        "ix_sms_receipt_events_session",
        "sms_receipt_events",
        ["account_id", "session_no", "phone_key"],
    )
    op.create_table(
        "sms_session_events",
        _event_id(is_pg),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("session_no", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("occurred_at", TIMESTAMPTZ, nullable=False),
        sa.CheckConstraint(f"type IN {SESSION_EVENTS}", name=op.f("ck_sms_session_events_type")),
        sa.CheckConstraint(f"source IN {SOURCES}", name=op.f("ck_sms_session_events_source")),
        sa.PrimaryKeyConstraint("id", name=op.f("sms_session_events_pkey")),
    )
    op.create_index(
        "ix_sms_session_events_session", "sms_session_events", ["account_id", "session_no"]
    )
    op.create_table(
        "receipts_event_ids",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_receipts_event_ids_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("receipts_event_ids_pkey")),
    )
    op.execute("INSERT INTO receipts_event_ids (id, last_id) VALUES (1, 0)")


def downgrade() -> None:
    op.drop_table("receipts_event_ids")
    op.drop_index("ix_sms_session_events_session", table_name="sms_session_events")
    op.drop_table("sms_session_events")
    op.drop_index("ix_sms_receipt_events_session", table_name="sms_receipt_events")
    op.drop_table("sms_receipt_events")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.schema.DropSequence(sa.Sequence("receipts_event_id_seq")))
