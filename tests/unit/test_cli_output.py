"""What the command line shows people and scripts, without a database: --version, the warning
about a misspelt RECEIPTS_* variable, options that exclude each other, and tables that never
cut a value, piped or on a narrow terminal."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

import pytest
from rich.console import Console

from tests.support.cli import invoke
from worker import reports
from worker.config import known_variables, unknown_variables_warning

LONG_SESSION_NO = "SESSION-" + "0123456789" * 5
PHONE = "(852)55311112"
SENT_AT = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.startswith("receipts, version ")


def test_help_documents_the_exit_codes() -> None:
    text = " ".join(invoke("--help").output.split())
    assert "Exit codes: 0 done; 1 done, and the answer is no" in text
    assert "70 unexpected" in text
    assert "--debug" in text


def test_a_misspelt_variable_is_warned_about_with_the_closest_name() -> None:
    result = invoke("stale", "--json", "--csv", env={"RECEIPTS_DATABSE_URL": "sqlite:///x.db"})
    assert result.stderr.splitlines()[0] == (
        "warning: ignoring unknown variable RECEIPTS_DATABSE_URL (did you mean "
        "RECEIPTS_DATABASE_URL?)"
    )


@pytest.mark.parametrize(
    ("environ", "line"),
    [
        ({"RECEIPTS_TICK": "1", "RECEIPTS_TEST_PG_URL": "x", "PATH": "/bin"}, None),
        ({"receipts_tick": "1"}, None),  # read case-insensitively, like every setting
        (
            {"RECEIPTS_LOG_PHONE": "1", "RECEIPTS_NONSENSE": "1"},
            "warning: ignoring unknown variables RECEIPTS_LOG_PHONE (did you mean "
            "RECEIPTS_LOG_PHONES?), RECEIPTS_NONSENSE",
        ),
    ],
)
def test_unknown_variables(environ: dict[str, str], line: str | None) -> None:
    assert unknown_variables_warning(environ) == line


def test_every_setting_is_a_known_variable_and_documented() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    settings = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    for name in known_variables():
        parts = name.split("_")
        # `RECEIPTS_API_CONNECT_TIMEOUT` / `_READ_TIMEOUT` names two variables in one row.
        tails = ("_".join(parts[i:]) for i in range(2, len(parts)))
        assert name in settings or any(f"`_{tail}`" in settings for tail in tails), name
    assert "RECEIPTS_LOG_FORMAT" in known_variables()
    assert "RECEIPTS_DEBUG" in known_variables()


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("stale", "--json", "--csv"), None, "give --json or --csv, not both"),
        (
            ("track", "--csv", "-", "--account-id", "1", "--phones", "1"),
            "account_id,session_no\n1,S1\n",
            "--csv takes every field from the file: drop --account-id, --phones",
        ),
    ],
)
def test_options_that_exclude_each_other_are_refused(
    args: tuple[str, ...], stdin: str | None, message: str
) -> None:
    result = invoke(*args, stdin=stdin)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


# --- tables -------------------------------------------------------------------------------------


def _stale_rows() -> list[dict[str, Any]]:
    return [
        {
            "kind": "escalated",
            "account_id": 1234567,
            "session_no": LONG_SESSION_NO,
            "sent_at": SENT_AT,
            "poll_count": 3,
            "phones": [{"phone": PHONE, "last_result": "Unknow"}],
            "last_error": "HTTP 503 from api.uspeedo.com; request uuid 4ff6baea",
        }
    ]


def test_stale_piped_is_plain_columns_with_every_value_whole() -> None:
    out = io.StringIO()
    reports.print_stale(_stale_rows(), Console(file=out, width=40))
    lines = out.getvalue().splitlines()
    assert lines[0] == "1 stale session(s)"
    assert lines[1].split() == list(reports.STALE_COLUMNS)
    assert lines[2].split()[:6] == [
        "escalated",
        "1234567",
        LONG_SESSION_NO,
        "2026-11-27T10:00:00+00:00",
        "3",
        f"{PHONE}=Unknow",
    ]
    assert lines[2].endswith("HTTP 503 from api.uspeedo.com; request uuid 4ff6baea")
    assert "…" not in out.getvalue()


def test_a_narrow_terminal_folds_cells_instead_of_cutting_them() -> None:
    out = io.StringIO()
    console = Console(file=out, width=40, force_terminal=True, color_system=None)
    reports.show_table(("session_no",), [[LONG_SESSION_NO]], console=console)
    shown = "".join(
        line.strip("│┃ ") for line in out.getvalue().splitlines() if line.startswith("│")
    )
    assert shown == LONG_SESSION_NO
    out = io.StringIO()
    reports.print_stale(
        _stale_rows(), Console(file=out, width=50, force_terminal=True, color_system=None)
    )
    assert "…" not in out.getvalue()


def test_status_shows_the_escalation_and_its_acknowledgement() -> None:
    found = {
        "account_id": 1,
        "session_no": "S1",
        "state": "escalated",
        "phones": [PHONE],
        "sent_at": SENT_AT,
        "escalated_at": SENT_AT,
        "poll_count": 3,
        "escalation_detail": {
            "phones": [{"phone": PHONE, "last_result": None}],
            "poll_count": 3,
            "last_error": "timeout",
        },
        "acknowledged_at": SENT_AT,
        "ack_note": "asked Uspeedo support, ticket 42",
        "receipts": [],
    }
    out = io.StringIO()
    reports.print_status(found, Console(file=out))
    fields = {
        line.split()[0]: line.split(None, 1)[1] if len(line.split()) > 1 else ""
        for line in out.getvalue().splitlines()
    }
    assert fields["unresolved_at_cutoff"] == f"{PHONE}=none"
    assert fields["polls_by_cutoff"] == "3"
    assert fields["error_by_cutoff"] == "timeout"
    assert fields["acknowledged_at"] == "2026-11-27T10:00:00+00:00"
    assert fields["ack_note"] == "asked Uspeedo support, ticket 42"
    found["acknowledged_at"] = found["ack_note"] = None
    out = io.StringIO()
    reports.print_status(found, Console(file=out))
    assert "acknowledged_at       not acknowledged" in out.getvalue()
