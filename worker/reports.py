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
    from rich.console import Console

    from worker.intake import RejectedTrack
    from worker.records import SessionHistory


def session_status(session_no: str, *, account_id: int | None = None) -> dict[str, Any]:
    """What ``receipts status`` shows: the record ``worker.status()`` returns, as plain data."""
    from worker.api import status

    return status(session_no, account_id=account_id).as_dict()


STATUS_FIELDS = (
    "account_id",
    "session_no",
    "state",
    "phones",
    "user_ref",
    "sent_at",
    "next_poll_at",
    "last_polled_at",
    "resolved_at",
    "escalated_at",
    "poll_count",
    "last_error",
)
RECEIPT_COLUMNS = ("phone", "result", "receipt_code", "receipt_desc", "receipt_time", "cost_count")


def print_status(found: dict[str, Any], console: Console | None = None) -> None:
    """The session's fields, its escalation (what support needs, and its acknowledgement)
    when it was escalated, then one row per phone's receipt."""
    summary = [(key, _text(found.get(key))) for key in STATUS_FIELDS]
    detail = found.get("escalation_detail")
    if found.get("escalated_at") is not None or detail is not None:
        detail = detail or {}
        unresolved = ", ".join(
            f"{p['phone']}={p.get('last_result') or 'none'}" for p in detail.get("phones", ())
        )
        summary += [
            ("unresolved_at_cutoff", unresolved),
            ("polls_by_cutoff", _text(detail.get("poll_count"))),
            ("error_by_cutoff", _text(detail.get("last_error"))),
            ("acknowledged_at", _text(found.get("acknowledged_at")) or "not acknowledged"),
            ("ack_note", _text(found.get("ack_note"))),
        ]
    show_table(("field", "value"), summary, header=False, console=console)
    rows = [[_text(receipt.get(c)) for c in RECEIPT_COLUMNS] for receipt in found["receipts"]]
    show_table(RECEIPT_COLUMNS, rows, title="receipts", console=console)


def show_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    header: bool = True,
    console: Console | None = None,
) -> None:
    """A table that never cuts a value. On a terminal, rich draws it and folds a cell that
    does not fit the width (its default cut SessionNos, dates and phones to "…" at 80
    columns); anywhere else (a pipe, cron's mail, a file) it is plain columns as wide as
    their values, with no width to fit, for people and for ``grep``/``awk`` alike."""
    from rich.console import Console

    console = console or Console()
    if console.is_terminal:
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title, show_header=header)
        if not header:
            table.box = None  # a list of fields, not a grid
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(Text(value) for value in row))
        console.print(table)
        return
    lines = [list(columns)] if header else []
    lines += [[" ".join(value.split()) for value in row] for row in rows]
    widths = [max((len(line[i]) for line in lines), default=0) for i in range(len(columns))]
    out = console.file
    if title:
        out.write(f"{title}\n")
    for line in lines:
        cells = [value.ljust(width) for value, width in zip(line[:-1], widths, strict=False)]
        out.write("  ".join([*cells, line[-1]]).rstrip() + "\n")
    out.flush()


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


def print_history(shown: dict[str, Any], console: Console | None = None) -> None:
    """The timeline, one line per change, oldest first; a receipt that lost to the stored one
    is marked ``no`` under ``applied``."""
    timeline = shown["timeline"]
    rows = []
    for entry in timeline:
        receipt = entry["type"] == "receipt"
        rows.append(
            [
                _text(entry["id"]),
                _text(entry["observed_at"] if receipt else entry["occurred_at"]),
                _text(entry["type"]),
                _text(entry.get("phone")),
                _text(entry.get("result")),
                _text(entry.get("receipt_code")),
                _text(entry.get("receipt_time")),
                _text(entry["source"]),
                _text(("yes" if entry["applied"] else "no") if receipt else None),
            ]
        )
    title = (
        f"{shown['session_no']} (account {shown['account_id']}): "
        f"{len(timeline)} change(s), oldest first"
    )
    show_table(HISTORY_COLUMNS, rows, title=title, console=console)


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


STALE_COLUMNS = ("kind", "account_id", "session_no", "sent_at", "polls", "phones", "last_error")


def print_stale(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    from rich.console import Console

    console = console or Console()
    if not rows:
        console.file.write("no stale sessions\n")
        return
    lines = []
    for row in rows:
        phones = ", ".join(f"{p['phone']}={p['last_result'] or 'none'}" for p in row["phones"])
        lines.append(
            [
                _text(row[key])
                for key in ("kind", "account_id", "session_no", "sent_at", "poll_count")
            ]
            + [phones, _text(row["last_error"])]
        )
    show_table(STALE_COLUMNS, lines, title=f"{len(rows)} stale session(s)", console=console)


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


def print_parked(rows: list[dict[str, Any]], *, closed_too: bool) -> None:
    """One block of plain lines per parked event batch, never cut: its id range, why it
    failed, and where it stands."""
    import click

    if not rows:
        click.echo("no parked event batches" if closed_too else "no open parked event batches")
        return
    noun = "parked" if closed_too else "open parked"
    click.echo(f"{len(rows)} {noun} event batch(es):")
    for row in rows:
        click.echo(
            f"\n{row['id']}  {row['destination']}: {row['events']} event(s), ids "
            f"{row['after_id'] + 1}..{row['through_id']}: {row['state']}"
        )
        click.echo(
            f"    failed {_text(row['first_failed_at'])} .. parked {_text(row['parked_at'])}, "
            f"{row['attempts']} attempt(s)"
        )
        click.echo(f"    last error: {row['last_error'] or '-'}")
        if row["closed_at"] is not None:
            click.echo(f"    {row['state']} {_text(row['closed_at'])}")
