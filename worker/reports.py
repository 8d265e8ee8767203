"""Read-only views of the tables for people: ``receipts status`` and ``receipts stale``.

Every value from the database reaches rich as a ``Text``, never as a ``str``: rich reads
``[...]`` in a string as markup (``[/]`` in a SessionNo or an API error text raised
``MarkupError``; ``[bold]`` changed what was shown) and ``:name:`` as an emoji code.
"""

from __future__ import annotations

import csv
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

import sqlalchemy as sa

from worker.db import read_scope
from worker.errors import SessionNotFound
from worker.models import receipts_table, sessions_table, stale_sessions_view

if TYPE_CHECKING:
    from rich.text import Text

S = sessions_table
R = receipts_table


def session_status(session_no: str, *, account_id: int | None = None) -> dict[str, Any]:
    query = sa.select(S).where(S.c.session_no == session_no)
    if account_id is not None:
        query = query.where(S.c.account_id == account_id)
    with read_scope() as session:
        rows = list(session.execute(query).mappings())
        if not rows:
            raise SessionNotFound(f"session {session_no!r} is not tracked")
        if len(rows) > 1:
            accounts = ", ".join(str(r["account_id"]) for r in rows)
            raise SessionNotFound(
                f"session {session_no!r} exists in accounts {accounts}: add --account-id"
            )
        found = dict(rows[0])
        receipts = session.execute(
            sa.select(R)
            .where(R.c.account_id == found["account_id"], R.c.session_no == session_no)
            .order_by(R.c.phone)
        ).mappings()
        found["receipts"] = [dict(r) for r in receipts]
    for private in ("id", "claim_token", "claimed_at"):
        found.pop(private, None)
    for receipt in found["receipts"]:
        receipt.pop("id", None)
    return found


def print_status(found: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(show_header=False, box=None)
    for key in (
        "account_id",
        "session_no",
        "state",
        "phones",
        "sent_at",
        "next_poll_at",
        "last_polled_at",
        "resolved_at",
        "escalated_at",
        "poll_count",
        "last_error",
    ):
        summary.add_row(key, _cell(found.get(key)))
    console.print(summary)
    table = Table(title="receipts")
    for column in ("phone", "result", "receipt_code", "receipt_desc", "receipt_time", "cost_count"):
        table.add_column(column)
    for receipt in found["receipts"]:
        table.add_row(
            *(
                _cell(receipt.get(c))
                for c in (
                    "phone",
                    "result",
                    "receipt_code",
                    "receipt_desc",
                    "receipt_time",
                    "cost_count",
                )
            )
        )
    console.print(table)


def _cell(value: Any) -> Text:
    """A value as rich shows it: exactly its text (see the module's docstring)."""
    from rich.text import Text

    return Text(_text(value))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def stale_sessions() -> list[dict[str, Any]]:
    """The ``stale_sessions`` view, so that the command and SQL alerts always agree:
    unacknowledged escalations, pending sessions overdue by more than two intervals, a
    ``clock_stopped`` row when no tick has been processed for one and a half ticks, and a
    ``credentials`` row while the API's last word on the credentials was a refusal."""
    view = stale_sessions_view
    query = sa.select(view).order_by(view.c.kind, view.c.sent_at, view.c.session_no)
    rows = []
    with read_scope() as session:
        for row in session.execute(query).mappings():
            item = dict(row)
            detail = item.pop("escalation_detail") or {}
            item["phones"] = detail.get("phones", [])
            rows.append(item)
    return rows


STALE_CSV_COLUMNS = (
    "kind",
    "account_id",
    "session_no",
    "sent_at",
    "escalated_at",
    "poll_count",
    "last_error",
    "phone",
    "last_result",
)


def write_stale_csv(rows: list[dict[str, Any]], out: TextIO) -> None:
    writer = csv.writer(out)
    writer.writerow(STALE_CSV_COLUMNS)
    for row in rows:
        base = [_text(row.get(c)) for c in STALE_CSV_COLUMNS[:7]]
        for phone in row["phones"] or [{"phone": "", "last_result": None}]:
            writer.writerow([*base, phone["phone"], phone["last_result"] or ""])


def print_stale(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not rows:
        console.print("no stale sessions")
        return
    table = Table(title=f"{len(rows)} stale session(s)")
    for column in ("kind", "account_id", "session_no", "sent_at", "polls", "phones", "last_error"):
        table.add_column(column)
    for row in rows:
        phones = ", ".join(f"{p['phone']}={p['last_result'] or 'none'}" for p in row["phones"])
        table.add_row(
            _cell(row["kind"]),
            _cell(row["account_id"]),
            _cell(row["session_no"]),
            _cell(row["sent_at"]),
            _cell(row["poll_count"]),
            _cell(phones),
            _cell(row["last_error"]),
        )
    console.print(table)
