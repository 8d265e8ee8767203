"""Read-only views of the tables for people: ``receipts status``, ``receipts history``,
``receipts stale`` and ``receipts rejected``.

Every value from the database reaches rich as a ``Text``, never as a ``str``: rich reads
``[...]`` in a string as markup (``[/]`` in a SessionNo or an API error text raised
``MarkupError``; ``[bold]`` changed what was shown) and ``:name:`` as an emoji code.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

import sqlalchemy as sa

from worker.db import read_scope
from worker.models import stale_sessions_view

if TYPE_CHECKING:
    from rich.text import Text

    from worker.intake import RejectedTrack
    from worker.records import SessionHistory


def session_status(session_no: str, *, account_id: int | None = None) -> dict[str, Any]:
    """What ``receipts status`` shows: the record ``worker.status()`` returns, as plain data."""
    from worker.api import status

    return status(session_no, account_id=account_id).as_dict()


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


def history_rows(found: SessionHistory, *, show_phones: bool) -> dict[str, Any]:
    """What ``receipts history`` shows: the session's timeline as plain data, phones masked to
    their last four digits unless ``show_phones`` (as the log and ``receipts rejected``)."""
    from worker.logs import mask_phone

    shown = found.as_dict()
    for entry in shown["timeline"]:
        if entry["type"] == "receipt":
            entry["phone"] = mask_phone(entry["phone"], show=show_phones)
            entry["phone_key"] = mask_phone(entry["phone_key"], show=show_phones)
    return shown


HISTORY_COLUMNS = (
    "id",
    "at",
    "event",
    "phone",
    "result",
    "code",
    "receipt_time",
    "source",
    "applied",
)


def print_history(shown: dict[str, Any]) -> None:
    """The timeline, one line per change, oldest first; a receipt that lost to the stored one
    is marked ``no`` under ``applied``."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    timeline = shown["timeline"]
    table = Table(
        title=f"{shown['session_no']} (account {shown['account_id']}): "
        f"{len(timeline)} change(s), oldest first"
    )
    for column in HISTORY_COLUMNS:
        table.add_column(column)
    for entry in timeline:
        receipt = entry["type"] == "receipt"
        table.add_row(
            _cell(entry["id"]),
            _cell(entry["observed_at"] if receipt else entry["occurred_at"]),
            _cell(entry["type"]),
            _cell(entry.get("phone")),
            _cell(entry.get("result")),
            _cell(entry.get("receipt_code")),
            _cell(entry.get("receipt_time")),
            _cell(entry["source"]),
            _cell(("yes" if entry["applied"] else "no") if receipt else None),
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


# --- refused receipts.track tasks ---------------------------------------------------------------


def rejected_rows(rows: Sequence[RejectedTrack], *, show_phones: bool) -> list[dict[str, Any]]:
    """Rows of ``rejected_tracks`` as ``receipts rejected`` shows them (phones masked unless
    ``show_phones``, see :func:`worker.intake.for_display`)."""
    from worker.intake import for_display

    return [for_display(row, show_phones=show_phones) for row in rows]


def print_rejected(rows: list[dict[str, Any]], *, closed_too: bool) -> None:
    """One block of plain lines per row, never cut however narrow the terminal or whatever
    reads the pipe: an operator needs all of the arguments and the reason to fix them. Values
    are shown as JSON, so that ``"7"`` (a string) and ``7`` (a number) differ as they did in
    the message."""
    import json

    import click

    if not rows:
        click.echo("no rejected tracks" if closed_too else "no open rejected tracks")
        return
    noun = "rejected" if closed_too else "open rejected"
    click.echo(f"{len(rows)} {noun} receipts.track task(s):")
    for row in rows:
        sender = f" from {row['origin']}" if row["origin"] else ""
        click.echo(f"\n{row['id']}  received {_text(row['received_at'])}{sender}: {row['state']}")
        values = " ".join(
            f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in row["arguments"].items()
        )
        click.echo(f"    arguments: {values or '(none)'}")
        click.echo(f"    refused:   {row['reason']}")
        if row["resolved_at"] is not None:
            fixes = json.dumps(row["corrections"], ensure_ascii=False) if row["corrections"] else ""
            done = f"    {row['state']} {_text(row['resolved_at'])}"
            click.echo(
                done
                + (f" with {fixes}" if fixes else "")
                + (f": {row['note']}" if row["note"] else "")
            )
