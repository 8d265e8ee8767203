"""``receipts run --demo``: the real worker and beat, watched on a live table.

With nothing configured, a newcomer sees the product work in under a minute. This process
starts the project's fake Uspeedo API (``worker/simulator``) on a free loopback port, starts
``receipts run`` as a child process pointed at it with timings in seconds, tracks one session
of every scenario the simulator plays, and shows each session's receipts turning from
``Unknow`` to final and the escalation of those Uspeedo never finishes at the cutoff. Then
the worker keeps running, as ``receipts run`` does, until Ctrl+C (SIGINT) or SIGTERM, which
stop everything it started: the worker (warm shutdown, then its whole process group), its
embedded beat and pool, and the simulator's port.

Everything lives in one folder of its own (:data:`DEMO_FOLDER`): a SQLite database, the
embedded broker's folder, the beat's schedule and the worker's log, replaced at each demo.
The user's ``RECEIPTS_*`` settings are not used, so the demo never touches their database,
broker or webhooks.

The worker runs in a child process, not in this one, so that its log goes to a file instead
of over the table, and so that one process group holds all of it for the stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from worker.simulator import Simulator

DEMO_FOLDER = Path("receipts-demo")
ACCOUNT_ID = 1
# Seconds per step of the scenarios' timelines (worker/simulator/scenarios.py): slow_final
# turns Success at step 4 (8 s after sending), late_failure turns Fail at step 6 (12 s).
STEP = 2.0
CUTOFF_SECONDS = 30
# The poll schedule in seconds: every receipt that will turn final does so long before the
# cutoff, and the whole story, worker start included, plays in well under a minute.
TIMINGS = {
    "RECEIPTS_FIRST_POLL_DELAY": "3",
    "RECEIPTS_POLL_INTERVAL_MIN": "3",
    "RECEIPTS_POLL_INTERVAL_MAX": "5",
    "RECEIPTS_CUTOFF": str(CUTOFF_SECONDS),
    "RECEIPTS_TICK": "1",
}
# The simulator's own defaults: a well-known credential of a loopback fake, not a secret.
ACCESS_KEY_ID = "demo"
ACCESS_KEY_SECRET = "demo-secret"  # noqa: S105

# What each scenario makes Uspeedo report, as the table says it. One session per scenario;
# `poison` is among them because it shows isolation: the API refuses every call naming it,
# and the other sessions are polled and resolved all the same.
STORIES: dict[str, str] = {
    "quick_success": "Success at once",
    "slow_final": "Unknow, then Success",
    "late_failure": "Unknow, then Fail",
    "unknow_forever": "Unknow, never final",
    "never": "nothing, ever",
    "submit_fail": "SubmitFail",
    "silent_phone": "nothing for phone 2",
    "respelled": "phones respelled",
    "stale_unknow": "Success, older Unknow",
    "chinese": "Success as 发送成功",
    "poison": "refuses calls naming it",
}
# Until the worker has ticked, the story has not started; a loaded machine may take a while.
WORKER_START_TIMEOUT = 120.0
# Celery's warm shutdown lets running polls finish (each bounded by the API timeouts).
STOP_TIMEOUT = 20.0
REFRESH_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class Folder:
    """Where the demo keeps everything, all in one folder."""

    root: Path

    @property
    def database(self) -> Path:
        return self.root / "receipts.db"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def schedule(self) -> Path:
        return self.root / "beat-schedule"

    @property
    def log(self) -> Path:
        return self.root / "worker.log"

    def shown(self, path: Path) -> str:
        """``path`` as the user can type it from where they are."""
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)

    @contextmanager
    def owned(self) -> Iterator[bool]:
        """Whether this demo has the folder to itself (False while another one runs in it),
        held until the end of the block."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True

    def reset(self) -> None:
        """A fresh demo: the previous demo's database, queue, schedule and log go."""
        import shutil

        for name in ("receipts.db", "receipts.db-wal", "receipts.db-shm", "worker.log"):
            (self.root / name).unlink(missing_ok=True)
        for schedule in self.root.glob("beat-schedule*"):
            schedule.unlink()
        shutil.rmtree(self.broker, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class DemoSession:
    session_no: str
    scenario: str
    phones: tuple[str, ...]


def demo_sessions() -> list[DemoSession]:
    """One session of two phones per scenario the simulator plays."""
    from worker.simulator import SCENARIOS

    return [
        DemoSession(
            session_no=f"demo-{scenario}",
            scenario=scenario,
            phones=(f"(852)5531{2 * index:04d}", f"(852)5531{2 * index + 1:04d}"),
        )
        for index, scenario in enumerate(SCENARIOS)
    ]


def demo_environment(folder: Folder, api_url: str) -> dict[str, str]:
    """This process's environment with the demo's settings instead of any ``RECEIPTS_*``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIPTS_")}
    env.update(
        RECEIPTS_DATABASE_URL=f"sqlite:///{folder.database}",
        RECEIPTS_BROKER_DIR=str(folder.broker),
        RECEIPTS_API_URL=api_url,
        RECEIPTS_ACCESS_KEY_ID=ACCESS_KEY_ID,
        RECEIPTS_ACCESS_KEY_SECRET=ACCESS_KEY_SECRET,
        **TIMINGS,
    )
    return env


# --- stopping -------------------------------------------------------------------------------


class StopRequest:
    """SIGINT, SIGTERM and SIGHUP, turned into a flag the demo checks between steps, so that
    a stop never interrupts a database write or leaves a child behind; a second signal asks
    for a stop without waiting."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.insisted = threading.Event()

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        if self.requested.is_set():
            self.insisted.set()
        self.requested.set()

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def wait(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless a stop is requested first; True when it is."""
        return self.requested.wait(seconds)


class WorkerProcess:
    """``receipts run`` in a child process of its own group, its output in the demo's log."""

    def __init__(self, folder: Folder, env: Mapping[str, str], args: Sequence[str]) -> None:
        self.folder = folder
        command = [
            sys.executable,
            "-m",
            "worker.cli",
            "run",
            "--schedule",
            str(folder.schedule),
            *args,
        ]
        with folder.log.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - this interpreter, our own module
                command,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own group: Ctrl+C reaches this process only, which then stops the worker
                # in order, and the group's kill reaches the pool and beat processes too.
                start_new_session=True,
            )

    def exited(self) -> int | None:
        return self.process.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.folder.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, stop: StopRequest) -> None:
        """Warm shutdown (SIGTERM: running polls finish), then the whole group is killed,
        whatever is left of it; a second Ctrl+C skips the wait."""
        if self.process.poll() is None:
            with suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while self.process.poll() is None and time.monotonic() < deadline:
                if stop.insisted.wait(0.1):
                    break
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        # Pool children and the beat may outlive their parent by a moment after the kill.
        deadline = time.monotonic() + 5
        while _group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- what the table shows -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    session_no: str
    story: str
    results: tuple[str | None, ...]  # per tracked phone: its receipt's result, None before any
    state: str
    polls: int
    settled_after: float | None  # seconds from sending to resolved or escalated

    @property
    def change(self) -> tuple[tuple[str | None, ...], str]:
        return self.results, self.state


def read_rows(stories: Mapping[str, str]) -> list[Row]:
    """Every session of the demo database with its receipts by tracked phone: the demo's
    own in the order of ``stories``, then any other, oldest first."""
    from worker.db import read_scope
    from worker.domain import phone_key
    from worker.models import receipts_table as R
    from worker.models import sessions_table as S

    with read_scope() as session:
        sessions = session.execute(
            sa.select(
                S.c.session_no,
                S.c.state,
                S.c.phones,
                S.c.poll_count,
                S.c.sent_at,
                S.c.resolved_at,
                S.c.escalated_at,
            ).order_by(S.c.id)
        ).all()
        receipts = session.execute(sa.select(R.c.session_no, R.c.phone_key, R.c.result)).all()
    by_session: dict[str, dict[str, str]] = {}
    for session_no, key, result in receipts:
        by_session.setdefault(session_no, {})[key] = result
    rows = []
    for s in sessions:
        found = by_session.get(s.session_no, {})
        phones = list(s.phones or [])
        results = (
            tuple(found.get(phone_key(p)) for p in phones) if phones else tuple(found.values())
        )
        settled_at: datetime | None = s.resolved_at or s.escalated_at
        rows.append(
            Row(
                session_no=s.session_no,
                story=stories.get(s.session_no, "(tracked by you)"),
                results=results,
                state=s.state,
                polls=s.poll_count,
                settled_after=(settled_at - s.sent_at).total_seconds() if settled_at else None,
            )
        )
    order = {session_no: index for index, session_no in enumerate(stories)}
    rows.sort(key=lambda row: order.get(row.session_no, len(order)))
    return rows


_RESULT_STYLES = {"Success": "green", "Fail": "red", "SubmitFail": "red", "Unknow": "yellow"}
_STATE_STYLES = {"pending": "yellow", "resolved": "green", "escalated": "bold red"}


def render_table(rows: Sequence[Row], *, elapsed: float | None) -> RenderableType:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    since = f"sent {elapsed:.0f} s ago" if elapsed is not None else "not sent yet"
    table = Table(
        title=f"{len(rows)} sessions, {since}; the cutoff (escalation) is {CUTOFF_SECONDS} s",
        box=box.SIMPLE_HEAD,
        title_justify="left",
    )
    # At 100 columns nothing wraps; narrower, the story and the receipts do.
    table.add_column("SessionNo", no_wrap=True)
    table.add_column("Uspeedo reports")
    table.add_column("receipts")
    table.add_column("state", no_wrap=True, min_width=len("escalated 31s"))
    table.add_column("polls", justify="right", no_wrap=True)
    for row in rows:
        receipts = Text(" ").join(
            Text(result or "·", style=_RESULT_STYLES.get(result or "", "dim"))
            for result in row.results
        )
        state = Text(row.state, style=_STATE_STYLES.get(row.state, ""))
        if row.settled_after is not None:
            state.append(f" {row.settled_after:.0f}s", style="dim")
        # Data from the database reaches rich as Text, never as markup (worker/reports.py).
        table.add_row(
            Text(row.session_no),
            Text(row.story),
            receipts,
            state,
            str(row.polls),
        )
    return table


def summary(rows: Sequence[Row]) -> str:
    counts = {state: sum(r.state == state for r in rows) for state in _STATE_STYLES}
    return ", ".join(f"{n} {state}" for state, n in counts.items() if n)


def _line(row: Row, elapsed: float) -> str:
    results = " ".join(result or "·" for result in row.results)
    return f"{elapsed:5.1f} s  {row.session_no:<22} {results:<22} {row.state}"


# --- the demo -------------------------------------------------------------------------------


class Demo:
    """One demo run: the simulator, the worker, the sessions and what the screen shows."""

    def __init__(self, folder: Folder, console: Console, errors: Console) -> None:
        self.folder = folder
        self.console = console
        self.errors = errors
        self.simulator: Simulator | None = None
        self.worker: WorkerProcess | None = None
        self.stories: dict[str, str] = {}
        self.sent_clock: float | None = None  # time.monotonic() when the sessions were sent

    def elapsed(self) -> float | None:
        return None if self.sent_clock is None else time.monotonic() - self.sent_clock

    def play(self, stop: StopRequest, *, loglevel: str, celery_args: Sequence[str]) -> int:
        from worker.config import get_settings
        from worker.db import reset_engine
        from worker.migrate import upgrade
        from worker.simulator import Simulator

        say = self.console.print
        if any(k.startswith("RECEIPTS_") for k in os.environ):
            say("The demo ignores your RECEIPTS_* settings: it uses only its own folder.")
        self.folder.reset()
        simulator = self.simulator = Simulator(
            access_key_id=ACCESS_KEY_ID, access_key_secret=ACCESS_KEY_SECRET, step=STEP
        ).start()
        env = demo_environment(self.folder, simulator.url)
        os.environ.clear()
        os.environ.update(env)  # this process reads the demo database too
        get_settings.cache_clear()
        reset_engine()
        upgrade(env["RECEIPTS_DATABASE_URL"])

        shown = self.folder.shown
        say(
            f"Demo: the worker and its beat (receipts run) poll a fake Uspeedo API at "
            f"{simulator.url}, with timings in seconds."
        )
        say(
            f"Database {shown(self.folder.database)}, worker log {shown(self.folder.log)} "
            "(both replaced at the next --demo). Ctrl+C stops everything."
        )
        worker = self.worker = WorkerProcess(
            self.folder, env, ["--loglevel", loglevel, *celery_args]
        )
        started = time.monotonic()
        with self.console.status("starting the worker…"):
            while not _ticked():
                if worker.exited() is not None:
                    return self._worker_died(worker)
                if time.monotonic() - started > WORKER_START_TIMEOUT:
                    self.errors.print(
                        f"error: the worker did not start in {WORKER_START_TIMEOUT:.0f} s; "
                        f"the end of {shown(self.folder.log)}:"
                    )
                    self.errors.print(worker.log_tail(), markup=False, highlight=False)
                    return 1
                if stop.wait(0.2):
                    return 0
        say(f"Worker started in {time.monotonic() - started:.1f} s. Sending the sessions now.")
        self._send(simulator)
        watch = self._watch_live if self.console.is_interactive else self._watch_lines
        return watch(worker, stop)

    def _worker_died(self, worker: WorkerProcess) -> int:
        self.errors.print(
            f"error: the worker stopped (exit code {worker.exited()}); the end of "
            f"{self.folder.shown(self.folder.log)}:"
        )
        self.errors.print(worker.log_tail(), markup=False, highlight=False)
        return 1

    def _send(self, simulator: Simulator) -> None:
        """Register the sessions with the fake Uspeedo (a real send would come from Uspeedo)
        and hand them to the worker, as an application would, sent at the same instant."""
        from worker.api import track_many
        from worker.clock import database_now

        sessions = demo_sessions()
        sent_at = database_now()
        simulator.register(
            {
                "account_id": ACCOUNT_ID,
                "session_no": s.session_no,
                "phones": list(s.phones),
                "scenario": s.scenario,
                "sent_at": sent_at.timestamp(),
            }
            for s in sessions
        )
        self.stories = {s.session_no: STORIES[s.scenario] for s in sessions}
        track_many(
            {
                "session_no": s.session_no,
                "account_id": ACCOUNT_ID,
                "phones": list(s.phones),
                "sent_at": sent_at,
            }
            for s in sessions
        )
        self.sent_clock = time.monotonic()

    def _settled(self, rows: Sequence[Row]) -> bool:
        return not any(r.state == "pending" for r in rows if r.session_no in self.stories)

    def _status(self, rows: Sequence[Row]) -> str:
        if not self._settled(rows):
            return f"Polling: {summary(rows)}."
        database = self.folder.shown(self.folder.database)
        return (
            f"The demo's sessions are settled: {summary(rows)}. The worker keeps running, as "
            "`receipts run` does; Ctrl+C stops it.\n"
            "Hand it a session of your own as an application would (the fake Uspeedo reports "
            "nothing for it, so it is escalated at the cutoff):\n"
            f"  RECEIPTS_DATABASE_URL=sqlite:///{database} receipts track --account-id 1 MY-SESSION"
        )

    def _watch_live(self, worker: WorkerProcess, stop: StopRequest) -> int:
        from rich.console import Group
        from rich.live import Live
        from rich.text import Text

        def frame() -> RenderableType:
            rows = read_rows(self.stories)
            return Group(render_table(rows, elapsed=self.elapsed()), Text(self._status(rows)))

        with Live(frame(), console=self.console, auto_refresh=False) as live:
            while not stop.wait(REFRESH_SECONDS):
                live.update(frame(), refresh=True)
                if worker.exited() is not None:
                    break
        return 0 if worker.exited() is None else self._worker_died(worker)

    def _watch_lines(self, worker: WorkerProcess, stop: StopRequest) -> int:
        """Without a terminal (piped, logged): one line per change, the table once settled."""
        seen: dict[str, tuple[tuple[str | None, ...], str]] = {}
        settled_shown = False
        while True:
            rows = read_rows(self.stories)
            elapsed = self.elapsed() or 0.0
            for row in rows:
                if seen.get(row.session_no) != row.change:
                    seen[row.session_no] = row.change
                    self.console.print(_line(row, elapsed), markup=False, highlight=False)
            if self._settled(rows) and not settled_shown:
                settled_shown = True
                self.console.print(render_table(rows, elapsed=elapsed))
                self.console.print(self._status(rows), markup=False, highlight=False)
            if worker.exited() is not None:
                return self._worker_died(worker)
            if stop.wait(REFRESH_SECONDS):
                return 0

    def shutdown(self, stop: StopRequest) -> None:
        """Stop whatever was started, worker first (its polls may still be calling the
        simulator), whatever happened before."""
        if self.worker is not None and self.worker.exited() is None:
            self.console.print("Stopping the worker (warm shutdown; Ctrl+C again to skip it)…")
        if self.worker is not None:
            self.worker.stop(stop)
        if self.simulator is not None:
            self.simulator.stop()
        if self.worker is not None or self.simulator is not None:
            self.console.print(
                "Stopped: worker, beat and fake Uspeedo. The demo database stays at "
                f"{self.folder.shown(self.folder.database)}."
            )


def _ticked() -> bool:
    """Whether the worker's beat has ticked: the demo database was empty, so it is up."""
    from worker.db import read_scope
    from worker.models import heartbeats_table as H

    with read_scope() as session:
        return session.execute(sa.select(H.c.name).where(H.c.name == "tick")).first() is not None


def run_demo(
    folder: Path = DEMO_FOLDER, *, loglevel: str = "INFO", celery_args: Sequence[str] = ()
) -> int:
    """``receipts run --demo``; returns the exit code."""
    from rich.console import Console

    # Errors are single lines, whatever the width: never folded in the middle of a path.
    console, errors = Console(), Console(stderr=True, soft_wrap=True)
    if not console.is_terminal:
        # Piped or logged: no screen to fit, so lines are never folded.
        console = Console(width=max(console.width, 120), soft_wrap=True)
    place = Folder(folder.resolve())
    with place.owned() as owned, StopRequest().installed() as stop:
        if not owned:
            errors.print(
                f"error: another receipts run --demo is using {place.shown(place.root)}; "
                "stop it first (Ctrl+C in its terminal)",
                markup=False,
                highlight=False,
            )
            return 2
        demo = Demo(place, console, errors)
        try:
            return demo.play(stop, loglevel=loglevel, celery_args=celery_args)
        finally:
            demo.shutdown(stop)
