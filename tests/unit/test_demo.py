"""The parts of `receipts run --demo` that need no process: its sessions, its settings, its
table, its folder and its handling of stop signals (tests/integration/test_demo.py runs it)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from rich.console import Console

from worker.demo import (
    STORIES,
    Folder,
    Row,
    StopRequest,
    demo_environment,
    demo_sessions,
    render_table,
)
from worker.simulator import SCENARIOS


def test_the_demo_plays_every_scenario_once_and_tells_each_story() -> None:
    sessions = demo_sessions()
    assert [s.scenario for s in sessions] == list(SCENARIOS)
    assert set(STORIES) == set(SCENARIOS)
    phones = [phone for s in sessions for phone in s.phones]
    assert len(set(phones)) == len(phones)
    assert all(len(s.phones) == 2 for s in sessions)  # silent_phone needs a second phone


def test_the_demo_ignores_the_users_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECEIPTS_DATABASE_URL", "postgresql://prod/receipts")
    monkeypatch.setenv("RECEIPTS_BROKER_URL", "redis://prod:6379/0")
    monkeypatch.setenv("RECEIPTS_ESCALATION_WEBHOOK_URL", "https://hooks.example/secret")
    folder = Folder(tmp_path / "receipts-demo")
    env = demo_environment(folder, "http://127.0.0.1:1234/api")
    settings = {k: v for k, v in env.items() if k.startswith("RECEIPTS_")}
    assert settings["RECEIPTS_DATABASE_URL"] == f"sqlite:///{folder.database}"
    assert settings["RECEIPTS_BROKER_DIR"] == str(folder.broker)
    assert settings["RECEIPTS_API_URL"] == "http://127.0.0.1:1234/api"
    assert "RECEIPTS_BROKER_URL" not in settings  # the embedded broker, in the demo's folder
    assert "RECEIPTS_ESCALATION_WEBHOOK_URL" not in settings
    assert env["PATH"] == os.environ["PATH"]


def _row(session_no: str, results: tuple[str | None, ...], state: str) -> Row:
    settled = None if state == "pending" else 31.0
    return Row(session_no, STORIES["stale_unknow"], results, state, 12, settled)


def test_at_100_columns_every_row_of_the_table_fits_on_one_line() -> None:
    rows = [
        Row(f"demo-{s.scenario}", STORIES[s.scenario], ("SubmitFail",) * 2, "escalated", 12, 31.0)
        for s in demo_sessions()
    ]
    console = Console(width=100, record=True)
    console.print(render_table(rows, elapsed=31.0))
    lines = console.export_text().splitlines()
    for row in rows:
        (line,) = [line for line in lines if row.session_no in line]
        assert "SubmitFail SubmitFail" in line
        assert "escalated 31s" in line


def test_session_numbers_are_shown_as_written_never_as_markup() -> None:
    console = Console(width=120, record=True)
    console.print(render_table([_row("[bold]x[/]", (None, "Unknow"), "pending")], elapsed=None))
    text = console.export_text()
    assert "[bold]x[/]" in text
    assert "· Unknow" in text


def test_a_second_demo_cannot_take_a_folder_in_use(tmp_path: Path) -> None:
    folder = Folder(tmp_path / "receipts-demo")
    with folder.owned() as first:
        assert first
        with Folder(tmp_path / "receipts-demo").owned() as second:
            assert not second
    with folder.owned() as again:
        assert again


def test_a_new_demo_starts_from_an_empty_database_and_queue_and_keeps_other_files(
    tmp_path: Path,
) -> None:
    folder = Folder(tmp_path / "receipts-demo")
    folder.broker.joinpath("queue").mkdir(parents=True)
    leftovers = [folder.database, folder.log, folder.root / "beat-schedule.dat"]
    for path in leftovers:
        path.write_text("old")
    mine = folder.root / "notes.txt"
    mine.write_text("mine")
    folder.reset()
    assert not any(path.exists() for path in leftovers)
    assert not folder.broker.exists()
    assert mine.read_text() == "mine"


def test_a_stop_signal_is_noted_and_a_second_one_insists() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest().installed() as stop:
        assert not stop.wait(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
        assert not stop.insisted.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.insisted.wait(5)
    assert signal.getsignal(signal.SIGTERM) is before
