"""poll holds by worker process, worker heartbeats, webhook delivery claim tokens

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

A poll in flight keeps its claim token and names the worker process that holds it
(``sms_sessions.held_by``); each worker process heartbeats in ``receipts_workers`` so that a
killed one's holds are released within two ticks. A webhook delivery records its outcome only
while its deliverer still holds the row (``escalation_outbox.claim_token``).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("sms_sessions", sa.Column("held_by", sa.Text(), nullable=True))
    op.create_index(
        "ix_sms_sessions_held_by",
        "sms_sessions",
        ["held_by"],
        unique=False,
        postgresql_where=sa.text("held_by IS NOT NULL"),
        sqlite_where=sa.text("held_by IS NOT NULL"),
    )
    op.add_column("escalation_outbox", sa.Column("claim_token", sa.Text(), nullable=True))
    op.create_table(
        "receipts_workers",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", TIMESTAMPTZ, nullable=False),
        sa.Column("beat_at", TIMESTAMPTZ, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("receipts_workers_pkey")),
    )


def downgrade() -> None:
    op.drop_table("receipts_workers")
    # Plain DROP COLUMN (SQLite 3.35+): a batch rebuild of sms_sessions would break the views
    # that read it.
    op.drop_column("escalation_outbox", "claim_token")
    op.drop_index("ix_sms_sessions_held_by", table_name="sms_sessions")
    op.drop_column("sms_sessions", "held_by")
