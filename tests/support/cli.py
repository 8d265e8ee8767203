"""Running the ``receipts`` command in-process, as a user would type it."""

from __future__ import annotations

from click.testing import CliRunner, Result

from worker.cli import main


def invoke(*args: str, stdin: str | None = None) -> Result:
    # Wide enough that rich never wraps or elides a table cell.
    return CliRunner().invoke(main, list(args), input=stdin, env={"COLUMNS": "250"})


def ok(result: Result) -> Result:
    """``result``, after checking the command succeeded (the output explains a failure)."""
    assert result.exit_code == 0, (result.output, result.exception)
    return result
