"""index of escalation_outbox by session

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30

The purge (worker/purge.py) keeps a session while its escalation webhook is undelivered and
deletes its webhooks with it, both looked up by (account_id, session_no), which no index
served: each batch's pick joined every session with every undelivered webhook (4 s per batch
of 2,000 with 2,500 undelivered, measured by ``python -m bench --only purge``), and each
batch's delete read the whole outbox.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_escalation_outbox_session",
        "escalation_outbox",
        ["account_id", "session_no"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_escalation_outbox_session", table_name="escalation_outbox")
