"""Data shown by ``receipts status`` and ``receipts stale`` is printed as it is stored: rich
must not read a SessionNo, an API error text or a receipt description as markup (``[/]``
crashed both commands, ``[bold]`` silently changed what was shown) nor ``:warning:`` as an
emoji. Both backends."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from worker import db
from worker.cli import main
from worker.models import receipts_table, sessions_table

# Printable ASCII without spaces: every one is a valid SessionNo.
SESSION_NOS = ("S[/]1", "S[bold]2[/bold]", "S[red]3", "S[link=http://x]4")
ERROR = "RetCode 215400: server [/] error [bold]busy[/bold] \\[x] :warning:"
DESC = "[green]delivered[/green] [/]"
PHONE = "[i](852)55311111"


def _invoke(*args: str) -> Result:
    # Wide enough that rich never wraps or elides a table cell.
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "400"})


def _track_with_markup() -> None:
    result = _invoke("track", "--account-id", "7", "--phones", "(852)55311111", *SESSION_NOS)
    assert result.exit_code == 0, result.output
    now = datetime.now(UTC)
    with db.session_scope() as session:
        session.execute(sa.update(sessions_table).values(last_error=ERROR))
        session.execute(
            sa.insert(receipts_table),
            [
                {
                    "account_id": 7,
                    "session_no": session_no,
                    "phone": PHONE,
                    "phone_key": "85255311111",
                    "result": "Unknow",
                    "receipt_code": "[/]",
                    "receipt_desc": DESC,
                    "first_seen_at": now,
                    "updated_at": now,
                }
                for session_no in SESSION_NOS
            ],
        )


@pytest.mark.usefixtures("database")
@pytest.mark.parametrize("session_no", SESSION_NOS)
def test_status_prints_markup_characters_as_they_are(session_no: str) -> None:
    _track_with_markup()
    result = _invoke("status", session_no)
    assert result.exit_code == 0, (result.output, result.exception)
    for shown in (session_no, ERROR, DESC, PHONE, "[/]"):
        assert shown in result.output


@pytest.mark.usefixtures("database")
def test_stale_prints_markup_characters_as_they_are() -> None:
    _track_with_markup()
    with db.session_scope() as session:
        session.execute(
            sa.update(sessions_table).values(
                state="escalated",
                escalated_at=datetime.now(UTC),
                next_poll_at=None,
                escalation_detail={
                    "phones": [{"phone": PHONE, "last_result": "[/]"}],
                    "poll_count": 1,
                    "last_error": ERROR,
                },
            )
        )
    result = _invoke("stale")
    assert result.exit_code == 0, (result.output, result.exception)
    for shown in (*SESSION_NOS, ERROR, f"{PHONE}=[/]"):
        assert shown in result.output
    assert f"{len(SESSION_NOS)} stale session(s)" in result.output
