"""The README's Demo section works when pasted: its shell block, extracted from README.md
itself (the fenced ``sh`` block under "## Demo"), runs with bash in an empty folder, so the
README and the product cannot drift apart.

Two changes are made to the block, both checked to apply:

- Its first line, ``python -m pip install .``, is not run. The code under test is importable
  already: ``receipts`` on the block's PATH runs this interpreter on this checkout. Running
  the install would replace the developer's own installation and need the network.
- Port 8700 becomes a free port, so that a simulator left running elsewhere on this machine,
  or a concurrent run of this test, cannot fail it.

Before this test, the block failed as written: ``receipts track`` raced ``receipts run &``'s
migration (``no such table: sms_sessions``) and ``curl -s`` reached the simulator before it
listened, failing without a word.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import port_is_free, processes_in, wait_for

ROOT = Path(__file__).resolve().parents[2]
INSTALL = "python -m pip install ."
PORT = "8700"
# The block sleeps 40 s in all (its cutoff is 30 s); the rest is process start-up.
TIMEOUT = 240


def demo_block() -> str:
    """The one ``sh`` block of the README's "## Demo" section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Demo\b[^\n]*\n(.*?)(?=^## )", readme, re.DOTALL | re.MULTILINE)
    assert section is not None, 'README.md has no "## Demo" section'
    blocks = re.findall(r"^```sh\n(.*?)^```", section.group(1), re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, f"the Demo section has {len(blocks)} sh blocks, not one"
    return str(blocks[0])


def runnable(block: str, port: int) -> str:
    first, _, rest = block.partition("\n")
    assert first == INSTALL, f"the Demo block starts with {first!r}, not the install"
    assert f"--port {PORT}" in rest, "the Demo's simulator is no longer on port 8700"
    return rest.replace(PORT, str(port))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="the Demo block uses curl")
def test_the_readme_demo_works_when_pasted(tmp_path: Path) -> None:
    port = _free_port()
    script = runnable(demo_block(), port)
    folder = tmp_path / "fresh"
    folder.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    receipts = bin_dir / "receipts"
    receipts.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m worker.cli "$@"\n')
    receipts.chmod(0o755)
    # A shell as a newcomer has it: none of this run's RECEIPTS_* settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIPTS_")}
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    output_file = tmp_path / "output.txt"
    with output_file.open("wb") as out:
        shell = subprocess.Popen(
            ["bash", "-e", "-c", script],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = shell.wait(TIMEOUT)
            # The block's last line stopped the worker; its warm shutdown takes a moment.
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not processes_in(folder), timeout=30)
            left = processes_in(folder)
        finally:
            if shell.poll() is None:
                shell.kill()
                shell.wait(5)
            for pid in processes_in(folder):  # whatever the block left behind
                os.kill(pid, signal.SIGKILL)
    output = output_file.read_text(encoding="utf-8", errors="replace")
    worker_log = folder / "worker.log"
    log = worker_log.read_text(errors="replace") if worker_log.exists() else ""

    assert code == 0, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.strip().lower().startswith("error")]
    assert not errors, output
    # `receipts status demo-ok`: resolved, with its receipts; `receipts stale`: demo-never
    # escalated (a narrow table may cut its SessionNo short).
    assert re.search(r"\bSuccess\b", output), output
    assert re.search(r"state\s+resolved", output), output
    assert re.search(r"^.*escalated.*demo-n.*$", output, re.MULTILINE), output
    assert "Traceback" not in log, log[-3000:]
    assert not left, f"the block left processes running: {left}"
    assert port_is_free(port)
