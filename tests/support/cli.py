"""Running the ``receipts`` command as a user would type it: in-process (``invoke``), or in a
process of its own (``receipts``, ``receipts_all``) when what matters is what the process
leaves on the screen and on disk (one line per error, no traceback, no file created)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from click.testing import CliRunner, Result

from worker.cli import main

ROOT = Path(__file__).resolve().parents[2]


def invoke(*args: str, stdin: str | None = None, env: Mapping[str, str] | None = None) -> Result:
    # Wide enough that rich never wraps or elides a table cell.
    return CliRunner().invoke(main, list(args), input=stdin, env={"COLUMNS": "250", **(env or {})})


def ok(result: Result) -> Result:
    """``result``, after checking the command succeeded (the output explains a failure)."""
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _env(env: Mapping[str, str] | None) -> dict[str, str]:
    """This environment without its RECEIPTS_* settings (the code under test importable,
    installed or not), plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RECEIPTS_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**base, **(env or {})}


def receipts_all(
    folder: Path,
    commands: Sequence[Sequence[str]],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> list[subprocess.CompletedProcess[str]]:
    """Run each of ``commands`` (``receipts`` arguments) in ``folder``, all at once (each
    process spends most of its second importing), and return how each ended."""
    running = [
        (
            list(args),
            subprocess.Popen(
                [sys.executable, "-m", "worker.cli", *args],
                env=_env(env),
                cwd=folder,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
            ),
        )
        for args in commands
    ]
    done = []
    for args, process in running:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        done.append(subprocess.CompletedProcess(args, process.returncode, out, err))
    return done


def receipts(
    folder: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``receipts <args>`` in ``folder``, in a process of its own."""
    return receipts_all(folder, [args], env=env, timeout=timeout)[0]
