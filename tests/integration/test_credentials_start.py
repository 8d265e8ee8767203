"""The start of real ``receipts worker`` and ``receipts run`` processes makes the same check as
``receipts check``: wrong credentials or a clock beyond Uspeedo's five minutes refuse the start
with that one line (and exit 1, creating nothing), an API that cannot be reached is a warning
and the worker starts anyway (the API may come back; polls retry).

On the embedded defaults (a SQLite file and the filesystem broker in the test's folder), so
that nothing here needs a server; the clocks are moved with tests/support/skew.py."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import skew
from tests.support.databases import FAST_TIMINGS
from tests.support.processes import Processes, processes, wait_for
from tests.support.servers import free_port
from worker.migrate import upgrade
from worker.simulator import Simulator

pytestmark = [pytest.mark.slow]

UUID = r"[0-9a-f-]{36}"
HINT = (
    "the AccessKey id/secret is wrong or expired: check RECEIPTS_ACCESS_KEY_ID and "
    "RECEIPTS_ACCESS_KEY_SECRET"
)
START = {"worker": ("worker", "--concurrency", "1"), "run": ("run", "--concurrency", "1")}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(access_key_id="demo", access_key_secret="demo-secret", seed=3) as simulator:
        yield simulator


def _env(api_url: str, **extra: str) -> dict[str, str]:
    return {
        **FAST_TIMINGS,
        "RECEIPTS_API_URL": api_url,
        "RECEIPTS_ACCESS_KEY_ID": "demo",
        "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
        **extra,
    }


def _migrated(folder: Path) -> Path:
    """``folder``, with the embedded default database migrated: a worker starts only on the
    newest schema (`receipts run` migrates; `receipts worker` does not)."""
    upgrade(f"sqlite:///{folder / 'receipts.db'}")
    return folder


def _exits(group: Processes, name: str, process: subprocess.Popen[bytes]) -> str:
    """The log of a process that must stop by itself, once it has."""
    wait_for(lambda: process.poll() is not None, timeout=60, describe=lambda: group.tail(name))
    return group.tail(name, chars=20_000)


def _host(sim: Simulator) -> str:
    return re.escape(sim.url.removeprefix("http://").removesuffix("/api"))


@pytest.mark.parametrize("command", sorted(START))
def test_wrong_credentials_refuse_the_start_in_one_line(
    sim: Simulator, tmp_path: Path, command: str
) -> None:
    with processes(_env(sim.url, RECEIPTS_ACCESS_KEY_SECRET="not-the-secret"), tmp_path) as group:
        process = group.start(command, *START[command])
        log = _exits(group, command, process)
    assert process.returncode == 1, log
    assert re.fullmatch(
        rf"error: not starting: {_host(sim)} refused the credentials \(RetCode 215398 'Failed "
        rf"to parse token', request uuid {UUID}, clock offset [+-][01]s\): {re.escape(HINT)}\n",
        log,
    ), log
    assert "not-the-secret" not in log
    # Refused before anything was created: no database file, no broker folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{command}.log"]


def test_a_clock_beyond_five_minutes_refuses_the_start(sim: Simulator, tmp_path: Path) -> None:
    library = skew.build(tmp_path / "..")
    if library is None:
        pytest.skip("no C compiler to build the clock shim")
    with processes({**_env(sim.url), **skew.shifted(library, -400)}, tmp_path) as group:
        process = group.start("worker", *START["worker"])
        log = _exits(group, "worker", process)
        checked = subprocess.run(
            [sys.executable, "-m", "worker.cli", "check"],
            env=group.env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    clock = (
        rf"{_host(sim)} refused the request's time \(RetCode 215398 'Failed to parse token', "
        rf"request uuid {UUID}\): this host's clock is (399|400|401) s off \(behind "
        rf"{_host(sim)}'s Date header\); Uspeedo refuses requests more than 5 minutes off: set "
        r"this host's clock right \(e\.g\. with NTP\)\n"
    )
    assert process.returncode == 1, log
    assert re.fullmatch(rf"error: not starting: {clock}", log), log
    # `receipts check` on that host says the same, and exits 1.
    assert checked.returncode == 1, checked
    assert checked.stdout == ""
    assert re.fullmatch(rf"error: {clock}", checked.stderr), checked.stderr


def test_an_unreachable_api_is_a_warning_and_the_worker_starts(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    with processes(_env(url), _migrated(tmp_path)) as group:
        group.start("worker", *START["worker"])
        wait_for(
            lambda: " ready." in group.tail("worker"),
            timeout=60,
            describe=lambda: group.tail("worker"),
        )
        group.check_alive()
        log = group.tail("worker", chars=50_000)
    first = log.splitlines()[0]
    assert first == (
        f"warning: could not check the credentials, starting anyway: cannot reach "
        f"127.0.0.1:{port}: connection refused (RECEIPTS_API_URL is {url})"
    )


def test_a_silent_api_holds_the_start_for_five_seconds_at_most(tmp_path: Path) -> None:
    """A poll waits the whole API timeouts (13 s by default); the start does not."""
    with socket.socket() as silent:  # accepts connections (in its backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        url = f"http://{host}/api"
        with processes(_env(url, RECEIPTS_API_READ_TIMEOUT="30"), _migrated(tmp_path)) as group:
            group.start("worker", *START["worker"])
            wait_for(
                lambda: " ready." in group.tail("worker"),
                timeout=60,
                describe=lambda: group.tail("worker"),
            )
            log = group.tail("worker", chars=50_000)
    assert log.splitlines()[0] == (
        f"warning: could not check the credentials, starting anyway: cannot reach {host}: no "
        f"answer within 5 s (RECEIPTS_API_URL is {url})"
    )


def test_accepted_credentials_are_said_once_at_the_start(sim: Simulator, tmp_path: Path) -> None:
    with processes(_env(sim.url), _migrated(tmp_path)) as group:
        group.start("worker", *START["worker"])
        wait_for(
            lambda: " ready." in group.tail("worker"),
            timeout=60,
            describe=lambda: group.tail("worker"),
        )
        log = group.tail("worker", chars=50_000)
    assert re.fullmatch(
        rf"ok: credentials accepted by {_host(sim)} \(request uuid {UUID}, clock offset "
        r"[+-][01]s\)",
        log.splitlines()[0],
    ), log
    [call] = [c for c in sim.calls() if c["action"] == "GetUSMSSendReceipt"]
    assert call["outcome"] == "ok"
