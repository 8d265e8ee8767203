"""Server commands and the scripts around them: a busy port is refused with one line and a
non-zero exit, never a traceback, and `receipts wait-for` tells a script when a server it
started in the background listens.

A second `receipts simulate` (or one left behind by an earlier try) used to end in 36 lines of
traceback ending `OSError: [Errno 98] Address already in use`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import invoke

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another program is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def _receipts(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIPTS_")}
    env["RECEIPTS_CALLBACK_TOKEN"] = "a-callback-token-of-30-chars-x"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["RECEIPTS_DATABASE_URL"] = f"sqlite:///{folder / 'receipts.db'}"
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", ["simulate", "exporter", "receiver"])
def test_a_server_command_refuses_a_busy_port_in_one_line(
    command: str, busy_port: int, tmp_path: Path
) -> None:
    done = _receipts(tmp_path, command, "--port", str(busy_port))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{busy_port}: "
        f"address already in use (another receipts {command}?)"
    ]


def test_an_address_that_is_not_this_machines_is_named_in_one_line(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never assigned to a host.
    done = _receipts(tmp_path, "simulate", "--host", "192.0.2.1", "--port", "8700")
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        "error: cannot listen on 192.0.2.1:8700: this machine has no such address"
    ]


def test_wait_for_returns_once_a_server_listens() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    # Listening only after wait-for has started trying: until then, connections are refused.
    later = threading.Timer(0.5, server.listen)
    later.start()
    try:
        result = invoke("wait-for", f"127.0.0.1:{port}", "--timeout", "30")
    finally:
        later.cancel()
        server.close()
    assert result.exit_code == 0, result.output
    assert result.output == f"127.0.0.1:{port} is listening\n"


def test_wait_for_gives_up_after_its_timeout_in_one_line() -> None:
    with socket.socket() as bound:  # bound, never listening: every connection is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        result = invoke("wait-for", f"http://127.0.0.1:{port}/api", "--timeout", "0.3")
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"error: nothing listens on 127.0.0.1:{port} after 0.3 s"]


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.1:port", "http://example.org"])
def test_wait_for_needs_an_address_with_a_port(address: str) -> None:
    result = invoke("wait-for", address)
    assert result.exit_code == 2
    assert "give HOST:PORT or a URL with a port" in result.output
