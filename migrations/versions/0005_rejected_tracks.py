"""rejected receipts.track tasks

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

A ``receipts.track`` task refused by validation used to be logged and dropped: the sender never
learnt, and nothing kept it. ``rejected_tracks`` keeps each one (arguments as received, the
reason) until an operator resubmits it with corrections or dismisses it (``receipts rejected``).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
OPEN = "state = 'open'"


def upgrade() -> None:
    op.create_table(
        "rejected_tracks",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("received_at", TIMESTAMPTZ, nullable=False),
        sa.Column("task_id", sa.Text(), nullable=True),
        sa.Column("origin", sa.Text(), nullable=True),
        sa.Column("arguments", JSON, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="open", nullable=False),
        sa.Column("resolved_at", TIMESTAMPTZ, nullable=True),
        sa.Column("corrections", JSON, nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state IN ('open', 'resubmitted', 'dismissed')", name=op.f("ck_rejected_tracks_state")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("rejected_tracks_pkey")),
        sa.UniqueConstraint("task_id", name=op.f("rejected_tracks_task_id_key")),
    )
    op.create_index(
        "ix_rejected_tracks_open",
        "rejected_tracks",
        ["received_at"],
        unique=False,
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )


def downgrade() -> None:
    op.drop_index("ix_rejected_tracks_open", table_name="rejected_tracks")
    op.drop_table("rejected_tracks")
