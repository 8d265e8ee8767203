"""Processes on a host whose wall clock is wrong: tests/support/clock_shift.c, built with the
machine's C compiler and preloaded, moves a process's wall clock (and nothing else) by whole
seconds, for Python, psycopg and Celery alike."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("clock_shift.c")


def build(folder: Path) -> Path | None:
    """The shared library built into ``folder``, or None when no C compiler is installed."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    library = folder / "clock_shift.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(SOURCE), "-ldl"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return library


def shifted(library: Path, seconds: int) -> dict[str, str]:
    """The environment of a process whose wall clock runs ``seconds`` ahead (behind if < 0)."""
    return {"LD_PRELOAD": str(library), "RECEIPTS_TEST_CLOCK_SHIFT": str(seconds)}
