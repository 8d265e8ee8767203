"""partial index of unacknowledged escalations

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

``receipts exporter`` counts unacknowledged escalations on every scrape, and the
``stale_sessions`` view lists them: with this index both read only the escalations still
waiting for someone, however many sessions the table holds (without it, a scrape scanned the
whole table: 0.8 s at 1M sessions).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNACKNOWLEDGED = "state = 'escalated' AND acknowledged_at IS NULL"


def upgrade() -> None:
    op.create_index(
        "ix_sms_sessions_unacknowledged",
        "sms_sessions",
        ["escalated_at"],
        unique=False,
        postgresql_where=sa.text(UNACKNOWLEDGED),
        sqlite_where=sa.text(UNACKNOWLEDGED),
    )


def downgrade() -> None:
    op.drop_index("ix_sms_sessions_unacknowledged", table_name="sms_sessions")
