"""index of finished sessions by sent_at

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30

The purge (worker/purge.py) walked every session in (account_id, session_no) order and kept
those past the retention: a daily run read the whole history to find one day's worth, and
deleted rows scattered over every page of every table (a SessionNo's order is not the order
rows were written in), dirtying and logging a page per row. It now walks finished sessions
oldest first on this index, which holds finished sessions only: a pending session's many
updates (claim, poll, answer) never touch it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINISHED = sa.text("state IN ('resolved', 'escalated')")


def upgrade() -> None:
    op.create_index(
        "ix_sms_sessions_finished_sent_at",
        "sms_sessions",
        ["sent_at", "id"],
        unique=False,
        postgresql_where=FINISHED,
        sqlite_where=FINISHED,
    )


def downgrade() -> None:
    op.drop_index("ix_sms_sessions_finished_sent_at", table_name="sms_sessions")
