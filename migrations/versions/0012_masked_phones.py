"""masking: phones_masked_at and the hashed tracked phone keys of sms_sessions, masked counts

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30

With ``RECEIPTS_MASK_PHONES_AFTER`` set, the daily purge task (worker/masking.py) masks the
phone numbers of finished sessions past that age: ``sms_sessions.phones_masked_at`` marks them,
``sms_sessions.masked_phone_keys`` keeps the keyed hashes of their tracked phones, and
``receipts_purge_counts.masked`` counts the rows masked, by table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")
TIMESTAMPTZ = sa.DateTime(timezone=True)


# Plain ADD and DROP COLUMN (SQLite 3.35+): a batch rebuild of sms_sessions would break the
# views that read it.
def upgrade() -> None:
    op.add_column("sms_sessions", sa.Column("phones_masked_at", TIMESTAMPTZ, nullable=True))
    op.add_column("sms_sessions", sa.Column("masked_phone_keys", JSON, nullable=True))
    op.add_column(
        "receipts_purge_counts",
        sa.Column("masked", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column("receipts_purge_counts", sa.Column("last_masked_at", TIMESTAMPTZ, nullable=True))


def downgrade() -> None:
    op.drop_column("receipts_purge_counts", "last_masked_at")
    op.drop_column("receipts_purge_counts", "masked")
    op.drop_column("sms_sessions", "masked_phone_keys")
    op.drop_column("sms_sessions", "phones_masked_at")
