"""events: a cursor per destination over the history, and the batches parked

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30

Events to the sender's application are read from the history tables (``sms_receipt_events``,
``sms_session_events``), not written a second time: each destination (a webhook, a Celery
task) has a cursor in ``receipts_event_cursors``, and a batch that failed every attempt for the
retry window is kept in ``receipts_parked_event_batches`` (worker/events.py).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
DESTINATIONS = "('webhook', 'task')"
OPEN = "state IN ('parked', 'replay')"


def upgrade() -> None:
    op.create_table(
        "receipts_event_cursors",
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("delivered_id", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("safe_id", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("pending_id", sa.BigInteger(), nullable=True),
        sa.Column("pending_snapshot", sa.Text(), nullable=True),
        sa.Column("claim_token", sa.Text(), nullable=True),
        sa.Column("leased_until", TIMESTAMPTZ, nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("first_failed_at", TIMESTAMPTZ, nullable=True),
        sa.Column("next_attempt_at", TIMESTAMPTZ, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_events", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("delivered_at", TIMESTAMPTZ, nullable=True),
        sa.CheckConstraint(
            f"destination IN {DESTINATIONS}",
            name=op.f("ck_receipts_event_cursors_destination"),
        ),
        sa.PrimaryKeyConstraint("destination", name=op.f("receipts_event_cursors_pkey")),
    )
    op.create_table(
        "receipts_parked_event_batches",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("after_id", sa.BigInteger(), nullable=False),
        sa.Column("through_id", sa.BigInteger(), nullable=False),
        sa.Column("events", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_failed_at", TIMESTAMPTZ, nullable=False),
        sa.Column("parked_at", TIMESTAMPTZ, nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("state", sa.Text(), server_default="parked", nullable=False),
        sa.Column("closed_at", TIMESTAMPTZ, nullable=True),
        sa.CheckConstraint(
            f"destination IN {DESTINATIONS}",
            name=op.f("ck_receipts_parked_event_batches_destination"),
        ),
        sa.CheckConstraint(
            "state IN ('parked', 'replay', 'replayed', 'dismissed')",
            name=op.f("ck_receipts_parked_event_batches_state"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("receipts_parked_event_batches_pkey")),
    )
    op.create_index(
        "ix_receipts_parked_event_batches_open",
        "receipts_parked_event_batches",
        ["destination", "state"],
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_receipts_parked_event_batches_open", table_name="receipts_parked_event_batches"
    )
    op.drop_table("receipts_parked_event_batches")
    op.drop_table("receipts_event_cursors")
