"""The first command a newcomer runs: `receipts run --demo` shows the real worker at work, and
`receipts run` without credentials says what to set.

The demo runs as a real process, as a user starts it: receipts turn from Unknow to final, the
sessions Uspeedo never finishes are escalated at the cutoff, and Ctrl+C (or SIGTERM) leaves no
process behind and the simulator's port free, so that a second demo right after works.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import invoke
from tests.support.databases import Configure
from tests.support.processes import Processes, port_is_free, processes, processes_in, wait_for
from worker.demo import ACCESS_KEY_ID, ACCESS_KEY_SECRET, STEP, demo_sessions
from worker.simulator import FakeUspeedo

# Long enough for a loaded 2-core machine: the story itself lasts the cutoff (30 s).
SETTLED_TIMEOUT = 150
STOP_TIMEOUT = 40
SIMULATOR_URL = re.compile(r"http://127\.0\.0\.1:(\d+)/api")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_run_without_credentials_names_what_to_set_and_the_demo(
    configure: Configure, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    configure()
    result = invoke("run")
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "error: set RECEIPTS_ACCESS_KEY_ID and RECEIPTS_ACCESS_KEY_SECRET (your Uspeedo API "
        "key) to poll https://api.uspeedo.com/api",
        "or watch it work first, with nothing set: receipts run --demo",
    ]
    configure(RECEIPTS_ACCESS_KEY_ID="id")
    assert invoke("run").output.splitlines()[0] == (
        "error: set RECEIPTS_ACCESS_KEY_SECRET (your Uspeedo API key) to poll "
        "https://api.uspeedo.com/api"
    )
    assert not (tmp_path / "receipts.db").exists()


def _expected_states() -> dict[str, str]:
    """What each demo session must end as, from the simulator's own truth: resolved when every
    phone gets a final receipt, else escalated."""
    fake = FakeUspeedo(
        access_key_id=ACCESS_KEY_ID,
        access_key_secret=ACCESS_KEY_SECRET,
        step=STEP,
        seed=None,
        clock=lambda: 0.0,
    )
    fake.register(
        {
            "account_id": 1,
            "session_no": s.session_no,
            "phones": list(s.phones),
            "scenario": s.scenario,
        }
        for s in demo_sessions()
    )
    return {
        session_no: (
            "resolved"
            if all(phone["final_result"] for phone in truth["phones"].values())
            else "escalated"
        )
        for session_no, truth in fake.truth()["sessions"].items()
    }


def _changes(output: str, session_no: str) -> list[list[str]]:
    """The receipts and state of each line the demo printed for ``session_no`` without a
    terminal (``  5.0 s  demo-x  Unknow Unknow  pending``)."""
    line = re.compile(rf"^\s*\d+\.\d s  {re.escape(session_no)} +(.*)$", re.MULTILINE)
    return [found.split() for found in line.findall(output)]


def _states(database: Path) -> dict[str, str]:
    with sqlite3.connect(database) as connection:
        return dict(connection.execute("SELECT session_no, state FROM sms_sessions"))


def _stop(
    group: Processes, demo: subprocess.Popen[bytes], signum: signal.Signals, folder: Path
) -> None:
    """Stop the demo as a user would, and check it left nothing running and its port free."""
    name = next(name for name, process in group.running if process is demo)
    port = int(SIMULATOR_URL.findall(ANSI.sub("", group.tail(name, 100_000)))[0])
    demo.send_signal(signum)
    code = demo.wait(STOP_TIMEOUT)
    assert code == 0, group.tail(name)
    wait_for(
        lambda: not processes_in(folder),
        timeout=10,
        describe=lambda: f"processes left in {folder}: {processes_in(folder)}",
    )
    assert port_is_free(port), f"the simulator's port {port} is still held"


@pytest.mark.slow
def test_the_demo_shows_the_story_then_stops_everything_and_runs_again(tmp_path: Path) -> None:
    expected = _expected_states()
    assert set(expected.values()) == {"resolved", "escalated"}
    database = tmp_path / "receipts-demo" / "receipts.db"
    # A user's own settings, which the demo must leave alone.
    mine = {
        "RECEIPTS_DATABASE_URL": f"sqlite:///{tmp_path / 'mine.db'}",
        "RECEIPTS_BROKER_DIR": str(tmp_path / "my-broker"),
    }
    with processes(mine, tmp_path) as group:
        first = group.start("demo", "run", "--demo")

        def settled() -> bool:
            assert first.poll() is None, group.tail("demo")
            return "The demo's sessions are settled" in group.tail("demo", 100_000)

        # Meanwhile a second demo in the same folder would wipe the first one's database.
        wait_for(database.exists, timeout=60, describe=lambda: group.tail("demo"))
        second = group.start("second", "run", "--demo")
        assert second.wait(30) == 2
        assert "another receipts run --demo is using receipts-demo" in group.tail("second")

        wait_for(settled, timeout=SETTLED_TIMEOUT, describe=lambda: group.tail("demo"))
        _stop(group, first, signal.SIGINT, tmp_path)
        output = group.tail("demo", 100_000)

        assert "The demo ignores your RECEIPTS_* settings" in output
        assert not (tmp_path / "mine.db").exists()
        assert not (tmp_path / "my-broker").exists()
        assert _states(database) == expected, output
        # Each session's changes, one line each (no terminal): Unknow first, then final.
        slow = _changes(output, "demo-slow_final")
        assert ["Unknow", "Unknow", "pending"] in slow, output
        assert slow[-1] == ["Success", "Success", "resolved"], output
        assert _changes(output, "demo-late_failure")[-1] == ["Fail", "Fail", "resolved"], output
        assert _changes(output, "demo-never")[-1] == ["·", "·", "escalated"], output
        # The table, once settled, and the stop.
        table = output[output.index("the cutoff (escalation) is 30 s") :]
        for session_no, state in expected.items():
            assert re.search(rf"{session_no}\s.*\s{state} \d+s", table), table
        assert "The worker keeps running, as `receipts run` does" in output
        assert "Stopped: worker, beat and fake Uspeedo." in output
        assert "Traceback" not in output

        # Right after, in a terminal this time (a live table), stopped by SIGTERM.
        again = group.start("again", "run", "--demo", env={"TTY_COMPATIBLE": "1", "COLUMNS": "100"})
        wait_for(
            lambda: "Success Success" in ANSI.sub("", group.tail("again", 100_000)),
            timeout=SETTLED_TIMEOUT,
            describe=lambda: group.tail("again"),
        )
        _stop(group, again, signal.SIGTERM, tmp_path)
        live = ANSI.sub("", group.tail("again", 100_000))
        assert "SessionNo" in live
        assert "Stopped: worker, beat and fake Uspeedo." in live
        assert "Traceback" not in live
        # A fresh database: stopped early, some sessions are still pending.
        assert "pending" in _states(database).values(), live
