"""credentials refused by the API: receipts_credentials, and a credentials row in stale_sessions

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

Every worker's polls record the API's refusals of the credentials (RetCode 215398) in
``receipts_credentials``, and the first answer that comes through after one
(worker/credentials.py). While the last refusal is the newer, ``stale_sessions`` shows one
``credentials`` row (its columns unchanged) and ``receipts exporter`` reports
``receipts_credentials_failing 1``: without them, sessions waited twelve hours to be escalated
as if Uspeedo had never answered.

The view is recreated whole, per dialect; the downgrade puts back the view of 0002.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)
# Used by the view until the first tick has recorded the real timing (as in 0002).
DEFAULT_INTERVAL_MAX = 600

# The rule of worker/credentials.py is_failing(), in SQL.
FAILING = "refused_at IS NOT NULL AND (accepted_at IS NULL OR accepted_at < refused_at)"
CREDENTIALS_ROW = f"""
UNION ALL
SELECT 'credentials' AS kind, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       'Uspeedo refused the credentials at ' || refused_at || ': '
       || coalesce(refusal, 'RetCode 215398')
       || '; the AccessKey id/secret is wrong or expired: check RECEIPTS_ACCESS_KEY_ID and '
       || 'RECEIPTS_ACCESS_KEY_SECRET, or this host''s clock (`receipts check` tells which)',
       NULL
  FROM receipts_credentials
 WHERE name = 'api' AND {FAILING}
"""


def _stale_view(dialect: str, *, credentials: bool) -> str:
    if dialect == "postgresql":
        ago = "now() - make_interval(secs => {})"
    else:
        # SQLite stores timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' UTC text, which compares
        # correctly as text with strftime's output.
        ago = "strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ({}) || ' seconds')"
    interval_max = (
        "coalesce((SELECT poll_interval_max_seconds FROM receipts_heartbeats WHERE name = 'tick'), "
        f"{DEFAULT_INTERVAL_MAX})"
    )
    columns = (
        "account_id, session_no, state, sent_at, next_poll_at, escalated_at, poll_count, "
        "last_error, escalation_detail"
    )
    return f"""
CREATE VIEW stale_sessions AS
SELECT 'escalated' AS kind, {columns}
  FROM sms_sessions
 WHERE state = 'escalated' AND acknowledged_at IS NULL
UNION ALL
SELECT 'overdue' AS kind, {columns}
  FROM sms_sessions
 WHERE state = 'pending' AND next_poll_at < {ago.format("2 * " + interval_max)}
UNION ALL
SELECT 'clock_stopped' AS kind, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       'no tick processed since ' || beat_at, NULL
  FROM receipts_heartbeats
 WHERE name = 'tick' AND beat_at < {ago.format("1.5 * tick_seconds")}
{CREDENTIALS_ROW if credentials else ""}"""


def upgrade() -> None:
    op.create_table(
        "receipts_credentials",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("refused_at", TIMESTAMPTZ, nullable=True),
        sa.Column("refusal", sa.Text(), nullable=True),
        sa.Column("accepted_at", TIMESTAMPTZ, nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("receipts_credentials_pkey")),
    )
    op.execute("DROP VIEW stale_sessions")
    op.execute(_stale_view(op.get_bind().dialect.name, credentials=True))


def downgrade() -> None:
    op.execute("DROP VIEW stale_sessions")
    op.execute(_stale_view(op.get_bind().dialect.name, credentials=False))
    op.drop_table("receipts_credentials")
