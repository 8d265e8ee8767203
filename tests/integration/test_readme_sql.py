"""The README's SQL, run on both backends so that the docs cannot drift from the schema: every
```sql block (each marked with the dialect it is written for) runs against a small database of
known content and returns what it says it does, and every column of the README's "Tables"
has the type the README gives it, on PostgreSQL and on SQLite."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa

from tests.support.clock import db_now
from worker import db
from worker.models import receipts_table, sessions_table

README = Path(__file__).resolve().parents[2] / "README.md"
DIALECTS = {"postgresql": "PostgreSQL", "sqlite": "SQLite"}
P1, P2, P3, P4 = "(852)55311111", "(852)55311112", "(852)55311113", "(852)55311114"
HOUR = timedelta(hours=1)


class Block(NamedTuple):
    dialects: frozenset[str]
    name: str
    sql: str


_MARKER = re.compile(r"--\s*(PostgreSQL and SQLite|PostgreSQL|SQLite):\s*(?P<name>.+)")


def sql_blocks(text: str) -> list[Block]:
    """Every ```sql block: its first line says which dialect it is for and names it."""
    blocks = []
    for body in re.findall(r"^```sql\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        first = body.splitlines()[0]
        marker = _MARKER.fullmatch(first.strip())
        assert marker, f"a README sql block does not start with '-- <dialect>: <name>': {first!r}"
        dialects = {key for key, label in DIALECTS.items() if label in marker.group(1)}
        blocks.append(Block(frozenset(dialects), marker.group("name").strip(), body))
    return blocks


def test_every_readme_query_is_given_for_both_backends() -> None:
    blocks = sql_blocks(README.read_text())
    assert blocks, "the README has no sql block"
    by_name: dict[str, set[str]] = {}
    for block in blocks:
        assert block.name in EXPECTED, f"no expected result for the README query {block.name!r}"
        for dialect in block.dialects:
            assert dialect not in by_name.get(block.name, set()), f"{block.name!r} twice"
            by_name.setdefault(block.name, set()).add(dialect)
    assert {name: sorted(d) for name, d in by_name.items()} == {
        name: sorted(DIALECTS) for name in EXPECTED
    }


# --- the database the queries run on --------------------------------------------------------


def _week_start(now: datetime) -> datetime:
    """Monday 00:00 UTC of ``now``'s week: PostgreSQL's date_trunc('week', …) in UTC."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


def _at(day: int, hour: int) -> datetime:
    return datetime(2026, 11, day, hour, tzinfo=UTC)


class Fixture(NamedTuple):
    now: datetime
    this_week: datetime  # an instant inside this week, before now
    last_week: datetime


def _fill() -> Fixture:
    now = db_now()
    week = _week_start(now)
    this_week, last_week = week + (now - week) / 2, week - timedelta(hours=2)
    pending_for_an_hour = {"state": "pending", "phones": [P1]}
    sessions: dict[str, dict[str, Any]] = {
        # sent 20 Nov: 3 phones tracked, one never reported; escalated last week, acknowledged
        "A": {
            "sent_at": _at(20, 10),
            "state": "escalated",
            "phones": [P1, P2, P3],
            "escalated_at": last_week,
            "acknowledged_at": last_week,
        },
        # tracked without phones: the phone Uspeedo reported is what counts
        "B": {"sent_at": _at(20, 11), "state": "resolved", "resolved_at": _at(20, 12)},
        # sent 21 Nov: not reported yet, its poll not due yet
        "C": {**pending_for_an_hour, "sent_at": _at(21, 10), "next_poll_at": now + HOUR},
        "D": {
            "sent_at": _at(21, 11),
            "state": "resolved",
            "phones": [P1, P2],
            "resolved_at": _at(21, 12),
        },
        # sent 22 Nov: escalated this week and not acknowledged
        "E1": {
            "sent_at": _at(22, 10),
            "state": "escalated",
            "phones": [P1],
            "escalated_at": this_week,
            "poll_count": 3,
            "escalation_detail": {
                "phones": [{"phone": P1, "last_result": None}],
                "poll_count": 3,
                "last_error": None,
            },
        },
        # pending, its poll an hour late
        "O1": {**pending_for_an_hour, "sent_at": _at(22, 11), "next_poll_at": now - HOUR},
        # resolved after their escalation, this week and last week
        "R1": {
            "sent_at": _at(22, 12),
            "state": "resolved",
            "phones": [P1],
            "escalated_at": this_week - timedelta(minutes=1),
            "resolved_at": this_week,
        },
        "R2": {
            "sent_at": _at(22, 13),
            "state": "resolved",
            "phones": [P1],
            "escalated_at": last_week - HOUR,
            "resolved_at": last_week,
        },
    }
    receipts = [
        ("A", P1, "Success", 1),
        ("A", P2, "Fail", 1),
        ("B", P4, "Success", 2),
        ("D", P1, "Success", 1),
        ("D", P2, "SubmitFail", 0),
        ("R1", P1, "Success", 1),
        ("R2", P1, "Success", 1),
    ]
    with db.session_scope() as session:
        # One row at a time: an absent column stays SQL NULL (a JSON column given None
        # would hold JSON null).
        for name, values in sessions.items():
            row = {"phones": [], "poll_count": 1, "created_at": now, "updated_at": now, **values}
            session.execute(sa.insert(sessions_table).values(account_id=1, session_no=name, **row))
        session.execute(
            sa.insert(receipts_table),
            [
                {
                    "account_id": 1,
                    "session_no": name,
                    "phone": phone,
                    "phone_key": re.sub(r"\D", "", phone),
                    "result": result,
                    "cost_count": cost,
                    "first_seen_at": now,
                    "updated_at": now,
                }
                for name, phone, result, cost in receipts
            ],
        )
    return Fixture(now, this_week, last_week)


def _expected(fixture: Fixture) -> dict[str, list[tuple[Any, ...]]]:
    unresolved = [{"phone": P1, "last_result": None}]
    detail = {"phones": unresolved, "poll_count": 3, "last_error": None}
    return {
        "delivery rate per day": [
            # day, phones, delivered, failed, delivery_rate, segments
            ("2026-11-20", 4, 2, 1, 0.5, 4),
            ("2026-11-21", 3, 1, 1, 0.3333, 1),
            ("2026-11-22", 4, 2, 0, 0.5, 2),
        ],
        "escalated this week": [
            (1, "E1", _at(22, 10), fixture.this_week, 3, None, unresolved),
        ],
        "overdue pending sessions": [(1,)],
        "page when not empty": [
            ("escalated", 1, "E1", _at(22, 10), detail),
            ("overdue", 1, "O1", _at(22, 11), None),
        ],
        "resolved late this week": [
            (1, "R1", fixture.this_week - timedelta(minutes=1), fixture.this_week),
        ],
    }


EXPECTED = {
    "delivery rate per day",
    "escalated this week",
    "overdue pending sessions",
    "page when not empty",
    "resolved late this week",
}

_SQLITE_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?")


def _plain(value: Any) -> Any:
    """A value as both backends can agree on: JSON parsed, numbers as int or float, times as
    UTC datetimes (SQLite gives its stored UTC text back), days as ISO text, booleans as 0/1."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    if hasattr(value, "isoformat"):  # a date
        return value.isoformat()
    if isinstance(value, str):
        if _SQLITE_TIME.fullmatch(value):
            return datetime.fromisoformat(value).replace(tzinfo=UTC)
        if value[:1] in "[{":
            return json.loads(value)
    return value


def _run(sql: str) -> list[tuple[Any, ...]]:
    with db.session_scope() as session:
        if session.get_bind().dialect.name == "postgresql":
            # The README's week starts are the session time zone's; the expectations are UTC.
            session.execute(sa.text("SET LOCAL TIME ZONE 'UTC'"))
        rows = session.execute(sa.text(sql)).all()
    return [tuple(_plain(v) for v in row) for row in rows]


def test_every_readme_query_runs_and_returns_what_it_says(database: str) -> None:
    dialect = sa.engine.make_url(database).get_backend_name()
    expected = _expected(_fill())
    blocks = [b for b in sql_blocks(README.read_text()) if dialect in b.dialects]
    assert {b.name for b in blocks} == EXPECTED
    for block in blocks:
        assert _run(block.sql) == expected[block.name], block.name


# --- the Tables section ---------------------------------------------------------------------

_TABLE_HEADING = re.compile(r"^### `(?P<table>\w+)`", re.MULTILINE)
_HEADER = "| column | PostgreSQL | SQLite | meaning |"


def documented_columns() -> dict[str, dict[str, tuple[str, str]]]:
    """``{table: {column: (PostgreSQL type, SQLite type)}}`` from the first table under each
    ``### `table` `` heading of README "Tables"; a row may name several columns, with one type
    for all or one each, in the same order."""
    text = README.read_text()
    section = text[text.index("\n## Tables\n") :]
    section = section[: section.index("\n## ", 1)]
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for part in section.split("\n### ")[1:]:
        heading = _TABLE_HEADING.match("### " + part)
        if heading is None:  # Example queries
            continue
        lines = part.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("|"))
        end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), None)
        table = lines[start:end]
        assert table[0] == _HEADER, f"{heading['table']}: table header {table[0]!r}"
        columns: dict[str, tuple[str, str]] = {}
        for line in table[2:]:
            names, pg, lite = (cell.strip() for cell in line.split("|")[1:4])
            name_list = re.findall(r"`(\w+)`", names)
            pg_types = re.findall(r"`([^`]+)`", pg)
            lite_types = re.findall(r"`([^`]+)`", lite)
            if len(pg_types) == 1:
                pg_types *= len(name_list)
            if len(lite_types) == 1:
                lite_types *= len(name_list)
            assert len(pg_types) == len(lite_types) == len(name_list), line
            columns.update(zip(name_list, zip(pg_types, lite_types, strict=True), strict=True))
        found[heading["table"]] = columns
    return found


def _actual_columns(url: str) -> dict[str, dict[str, str]]:
    engine = db.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            rows = connection.execute(
                sa.text(
                    "SELECT table_name, column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND table_name IN "
                    "(SELECT table_name FROM information_schema.tables "
                    " WHERE table_schema = 'public' AND table_type = 'BASE TABLE')"
                )
            ).all()
        else:
            tables = connection.execute(
                sa.text("SELECT name FROM sqlite_master WHERE type = 'table'")
            ).scalars()
            rows = [
                (table, column.name, column.type)
                for table in list(tables)
                for column in connection.execute(sa.text(f"PRAGMA table_info('{table}')"))
            ]
    engine.dispose()
    found: dict[str, dict[str, str]] = {}
    for table, column, type_ in rows:
        if table != "alembic_version":
            found.setdefault(table, {})[column] = type_.lower()
    return found


_SPELLED = {"timestamptz": "timestamp with time zone"}


def test_every_table_column_is_documented_with_its_type_on_each_backend(database: str) -> None:
    dialect = sa.engine.make_url(database).get_backend_name()
    documented = {
        table: {
            column: _SPELLED.get(types[0].lower(), types[0].lower())
            if dialect == "postgresql"
            else types[1].lower()
            for column, types in columns.items()
        }
        for table, columns in documented_columns().items()
    }
    assert documented == _actual_columns(database)
