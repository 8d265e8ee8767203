"""escalation outbox, acknowledgement, heartbeats, api call counts, views

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

The views are part of the public SQL surface (README, "Views"); they are written per dialect
because time arithmetic differs between PostgreSQL and SQLite.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

FINAL = "('Success', 'Fail', 'SubmitFail')"
# Used by the views until the first tick has recorded the real timing.
DEFAULT_INTERVAL_MAX = 600


def _views(dialect: str) -> tuple[str, str]:
    if dialect == "postgresql":
        ago = "now() - make_interval(secs => {})"
        json_length = "jsonb_array_length({})"
    else:
        # SQLite stores timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' UTC text, which compares
        # correctly as text with strftime's output.
        ago = "strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ({}) || ' seconds')"
        json_length = "json_array_length({})"
    interval_max = (
        "coalesce((SELECT poll_interval_max_seconds FROM receipts_heartbeats WHERE name = 'tick'), "
        f"{DEFAULT_INTERVAL_MAX})"
    )
    columns = (
        "account_id, session_no, state, sent_at, next_poll_at, escalated_at, poll_count, "
        "last_error, escalation_detail"
    )
    stale = f"""
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
"""
    summary = f"""
CREATE VIEW session_summary AS
SELECT s.account_id, s.session_no, s.state, s.sent_at, s.resolved_at, s.escalated_at,
       s.acknowledged_at, s.poll_count,
       {json_length.format("s.phones")} AS phones_tracked,
       count(r.id) AS phones_reported,
       count(r.id) FILTER (WHERE r.result IN {FINAL}) AS phones_final,
       count(r.id) FILTER (WHERE r.result = 'Success') AS phones_successful,
       coalesce(sum(r.cost_count), 0) AS cost,
       (s.state = 'resolved' AND s.escalated_at IS NOT NULL) AS resolved_late
  FROM sms_sessions s
  LEFT JOIN sms_receipts r ON r.account_id = s.account_id AND r.session_no = s.session_no
 GROUP BY s.id
"""
    return stale, summary


def upgrade() -> None:
    op.create_table(
        "api_call_counts",
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("ret_code", sa.Integer(), nullable=False),
        sa.Column("calls", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("outcome", "ret_code", name=op.f("api_call_counts_pkey")),
    )
    op.create_table(
        "escalation_outbox",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.Text(), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("session_no", sa.Text(), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", TIMESTAMPTZ, nullable=True),
        sa.Column("delivered_at", TIMESTAMPTZ, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at", TIMESTAMPTZ, server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("escalation_outbox_pkey")),
        sa.UniqueConstraint("delivery_id", name=op.f("escalation_outbox_delivery_id_key")),
    )
    op.create_index(
        "ix_escalation_outbox_due",
        "escalation_outbox",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("delivered_at IS NULL"),
        sqlite_where=sa.text("delivered_at IS NULL"),
    )
    op.create_table(
        "receipts_heartbeats",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("beat_at", TIMESTAMPTZ, nullable=False),
        sa.Column("tick_seconds", sa.Float(), nullable=False),
        sa.Column("poll_interval_max_seconds", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("receipts_heartbeats_pkey")),
    )
    op.add_column("sms_sessions", sa.Column("acknowledged_at", TIMESTAMPTZ, nullable=True))
    op.add_column("sms_sessions", sa.Column("ack_note", sa.Text(), nullable=True))
    for view in _views(op.get_bind().dialect.name):
        op.execute(view)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS session_summary")
    op.execute("DROP VIEW IF EXISTS stale_sessions")
    op.drop_column("sms_sessions", "ack_note")
    op.drop_column("sms_sessions", "acknowledged_at")
    op.drop_table("receipts_heartbeats")
    op.drop_index(
        "ix_escalation_outbox_due",
        table_name="escalation_outbox",
        postgresql_where=sa.text("delivered_at IS NULL"),
        sqlite_where=sa.text("delivered_at IS NULL"),
    )
    op.drop_table("escalation_outbox")
    op.drop_table("api_call_counts")
