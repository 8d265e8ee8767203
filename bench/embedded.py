"""``python -m bench.embedded [--sessions N] [--accounts A] [--timings demo|long] [--broker URL]``

Drives ``receipts run`` on its embedded defaults (a fresh SQLite file and kombu's filesystem
broker folder in a temporary directory, or ``--broker`` for comparison) against the simulator
on loopback, with scaled timings: registers ``N`` resolvable sessions over ``A`` accounts,
tracks them with ``receipts track --csv``, waits until none is pending (bounded), and reports
what the embedded path promised and kept: API calls, poll tasks run and idle (their claim was
gone), tasks dropped as expired, sessions escalated (with 0 polls, and those the simulator says
were resolvable), broker folder size over time, and messages received per second.

Exit status 1 when a resolvable session was escalated or a session was left pending.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.check import is_check_session
from worker.domain import phone_key
from worker.simulator import Simulator

ROOT = Path(__file__).resolve().parents[1]
STEP = 2.0  # seconds per simulator step, as in the README Demo (`receipts simulate --step 2`)
# The README Demo's timings, and a longer variant (more room between polls).
TIMINGS: dict[str, dict[str, str]] = {
    "demo": {
        "RECEIPTS_FIRST_POLL_DELAY": "3",
        "RECEIPTS_POLL_INTERVAL_MIN": "3",
        "RECEIPTS_POLL_INTERVAL_MAX": "5",
        "RECEIPTS_CUTOFF": "40",
        "RECEIPTS_TICK": "1",
    },
    "long": {
        "RECEIPTS_FIRST_POLL_DELAY": "5",
        "RECEIPTS_POLL_INTERVAL_MIN": "5",
        "RECEIPTS_POLL_INTERVAL_MAX": "10",
        "RECEIPTS_CUTOFF": "60",
        "RECEIPTS_TICK": "2",
    },
}
# Scenarios whose final receipts the API shows well before any of these cutoffs (one and four
# steps after sending): a session of theirs that ends escalated could have been resolved.
RESOLVABLE = ("quick_success", "slow_final")
SAMPLE_EVERY = 0.5
# Bounds the delay between the worker deciding to poll and the simulator stamping the call.
LATENCY = 0.3
STOP_TIMEOUT = 20.0

_LOG_TIME = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[\w-]+\]"
_RECEIVED = re.compile(_LOG_TIME + r" Task (receipts\.\w+)\[[^\]]+\] received")
_POLL_DONE = re.compile(
    _LOG_TIME + r" Task receipts\.poll\[[^\]]+\] succeeded in [\d.e-]+s: \{'polled': (\d+)"
)
_DISCARDED = re.compile(r"Discarding revoked task: (receipts\.\w+)\[")


@dataclass(slots=True)
class Outcome:
    sessions: int
    accounts: int
    broker: str
    timings: dict[str, str]
    seconds: float = 0.0
    api_calls: int = 0
    sessions_asked: int = 0  # SessionNos named in those calls
    poll_tasks_run: int = 0
    poll_tasks_idle: int = 0  # ran and polled nothing: their claim had been re-issued
    poll_tasks_expired: int = 0  # dropped on receipt, their claim's lease over
    received: dict[str, int] = field(default_factory=dict)  # tasks received, by name
    received_per_second: float = 0.0  # every task, over the span from first to last
    # Poll tasks that polled, and sessions they polled, per second from the first to the last
    polls_per_second: float = 0.0
    sessions_polled_per_second: float = 0.0
    states: dict[str, int] = field(default_factory=dict)
    escalated_unpolled: int = 0
    escalated_resolvable: int = 0
    # Broken schedule rules seen in the simulator's call log: a session polled before its
    # first delay, after its cutoff, or twice inside the minimum interval (first few).
    rule_breaks: list[str] = field(default_factory=list)
    # Resolved sessions whose stored receipts differ from the simulator's final ones.
    wrongly_resolved: int = 0
    # `receipts run`'s exit status if it stopped by itself during the run (it must not).
    worker_exit: int | None = None
    poll_counts: dict[int, int] = field(default_factory=dict)  # sessions by poll_count
    broker_files: list[tuple[float, int]] = field(default_factory=list)  # (seconds, files)
    warnings: list[str] = field(default_factory=list)  # the worker's WARNING/ERROR lines (some)
    log: str = ""

    @property
    def pending(self) -> int:
        return self.states.get("pending", 0)

    def ok(self) -> bool:
        return (
            self.escalated_resolvable == 0
            and self.escalated_unpolled == 0
            and not self.pending
            and not self.rule_breaks
            and not self.wrongly_resolved
            and self.worker_exit is None
        )

    def summary(self) -> dict[str, Any]:
        files = [n for _, n in self.broker_files]
        data = asdict(self)
        data.pop("log")
        data.pop("broker_files")
        data["broker_files_first_last_max"] = [files[0], files[-1], max(files)] if files else []
        data["warnings"] = self.warnings[:10]
        return data


def _count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def _states(database: Path) -> dict[str, int]:
    if not database.exists():
        return {}
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as conn:
        try:
            rows = conn.execute("SELECT state, count(*) FROM sms_sessions GROUP BY state")
            return dict(rows)
        except sqlite3.OperationalError:  # not migrated yet
            return {}


def _ticked(database: Path) -> bool:
    if not database.exists():
        return False
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as conn:
        try:
            beats: int = conn.execute("SELECT count(*) FROM receipts_heartbeats").fetchone()[0]
            return beats > 0
        except sqlite3.OperationalError:
            return False


def _child_env(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any ``RECEIPTS_*`` of its own, plus ``env``, with
    the code under test importable whether installed or not."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECEIPTS_")}
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**clean, **env, "PYTHONPATH": path}


def _start(command: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path) -> Any:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *command],
            env=_child_env(env),
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: Any) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # pool children and beat left behind


def _write_csv(path: Path, plan: Sequence[dict[str, Any]], sent_at: datetime) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["account_id", "session_no", "phones", "sent_at"])
        for spec in plan:
            writer.writerow(
                [
                    spec["account_id"],
                    spec["session_no"],
                    ",".join(spec["phones"]),
                    sent_at.isoformat(),
                ]
            )


def make_plan(sessions: int, accounts: int, prefix: str = "emb") -> list[dict[str, Any]]:
    """``sessions`` sessions round-robin over accounts 1…``accounts``, alternating the
    resolvable scenarios, two phones each."""
    return [
        {
            "account_id": 1 + i % accounts,
            "session_no": f"{prefix}{i:07d}",
            "phones": [f"+8613{i:09d}0", f"+8613{i:09d}1"],
            "scenario": RESOLVABLE[i % len(RESOLVABLE)],
        }
        for i in range(sessions)
    ]


def run(
    *,
    sessions: int,
    accounts: int,
    timings: Mapping[str, str],
    folder: Path,
    broker_url: str | None = None,
    extra_env: Mapping[str, str] | None = None,
    worker_args: Sequence[str] = (),
    settle: float | None = None,
    progress: bool = False,
) -> Outcome:
    """One run in ``folder`` (fresh): start the simulator and ``receipts run``, track the
    sessions once the first tick has been processed, wait until none is pending (at most the
    cutoff plus ``settle`` seconds, by default the cutoff again), stop, and collect."""
    database = folder / "receipts.db"
    broker_dir = None if broker_url else folder / "receipts-broker"
    started = time.monotonic()

    def say(message: str) -> None:
        if progress:
            print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    sim = Simulator(step=STEP).start()
    env = {
        **timings,
        "RECEIPTS_DATABASE_URL": f"sqlite:///{database}",
        "RECEIPTS_API_URL": sim.url,
        "RECEIPTS_ACCESS_KEY_ID": "demo",
        "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
        **({"RECEIPTS_BROKER_URL": broker_url} if broker_url else {}),
        **({"RECEIPTS_BROKER_DIR": str(broker_dir)} if broker_dir else {}),
        **(extra_env or {}),
    }
    outcome = Outcome(
        sessions=sessions, accounts=accounts, broker=broker_url or "embedded", timings=dict(timings)
    )
    worker_log = folder / "run.log"
    process = _start(["run", "--loglevel", "INFO", *worker_args], env, folder, worker_log)
    try:
        _wait_ticking(process, database, worker_log)
        say("receipts run is ticking")
        _track(sim, make_plan(sessions, accounts), env, folder)
        say(f"tracked {sessions} sessions over {accounts} account(s)")
        cutoff = float(timings["RECEIPTS_CUTOFF"])
        limit = cutoff + (cutoff if settle is None else settle)
        _watch(outcome, process, database, broker_dir, limit, say)
    finally:
        _stop(process)
        sim.stop()
    _collect(outcome, database, sim, worker_log)
    return outcome


def _wait_ticking(process: Any, database: Path, worker_log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not _ticked(database):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"receipts run did not start:\n{worker_log.read_text()[-3000:]}")
        time.sleep(0.2)


def _track(
    sim: Simulator, plan: Sequence[dict[str, Any]], env: Mapping[str, str], folder: Path
) -> None:
    """Register the plan with the simulator and track it with ``receipts track --csv``, both
    with one ``sent_at``: now."""
    sent = datetime.now(UTC)
    sim.register({**spec, "sent_at": sent.timestamp()} for spec in plan)
    sessions_csv = folder / "sessions.csv"
    _write_csv(sessions_csv, plan, sent)
    track = subprocess.run(
        [sys.executable, "-m", "worker.cli", "track", "--csv", str(sessions_csv)],
        env=_child_env(env),
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if track.returncode != 0:
        raise RuntimeError(f"receipts track failed: {track.stderr[-2000:]}")


def _watch(
    outcome: Outcome,
    process: Any,
    database: Path,
    broker_dir: Path | None,
    limit: float,
    say: Callable[[str], None],
) -> None:
    """Sample states and the broker folder until no session is pending, ``limit`` seconds
    passed, or ``receipts run`` stopped."""
    tracked = time.monotonic()
    next_report = 0.0
    while (elapsed := time.monotonic() - tracked) < limit:
        files = _count_files(broker_dir) if broker_dir else 0
        outcome.broker_files.append((round(elapsed, 1), files))
        states = _states(database)
        if elapsed >= next_report:
            say(f"t={elapsed:5.1f}s states={states} broker files={files}")
            next_report += 5
        if states and not states.get("pending"):
            break
        if process.poll() is not None:
            outcome.worker_exit = process.returncode
            say(f"receipts run exited with status {process.returncode}")
            break
        time.sleep(SAMPLE_EVERY)
    outcome.seconds = round(time.monotonic() - tracked, 1)


def _collect(outcome: Outcome, database: Path, sim: Simulator, worker_log: Path) -> None:
    # The start's credentials check (receipts check) asks for a SessionNo of its own.
    calls = [
        c
        for c in sim.calls()
        if c["action"] == "GetUSMSSendReceipt" and not any(map(is_check_session, c["session_nos"]))
    ]
    outcome.api_calls = len(calls)
    outcome.sessions_asked = sum(len(c["session_nos"]) for c in calls)
    # Resolvable: every phone's final receipt is visible at the API at least one longest
    # interval before the cutoff, so the schedule alone gives it a poll that sees it.
    last_chance = float(outcome.timings["RECEIPTS_CUTOFF"]) - float(
        outcome.timings["RECEIPTS_POLL_INTERVAL_MAX"]
    )
    truth = sim.service.truth()["sessions"]
    resolvable = {
        no
        for no, t in truth.items()
        if t["phones"]
        and all(
            p["final_result"] is not None and p["final_after"] < last_chance
            for p in t["phones"].values()
        )
    }
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as conn:
        outcome.states = dict(conn.execute("SELECT state, count(*) FROM sms_sessions GROUP BY 1"))
        outcome.poll_counts = dict(
            conn.execute("SELECT poll_count, count(*) FROM sms_sessions GROUP BY 1 ORDER BY 1")
        )
        escalated = list(
            conn.execute("SELECT session_no, poll_count FROM sms_sessions WHERE state='escalated'")
        )
        resolved = conn.execute("SELECT session_no FROM sms_sessions WHERE state = 'resolved'")
        stored: dict[str, dict[str, str]] = {no: {} for (no,) in resolved}
        for session_no, key, result in conn.execute(
            "SELECT r.session_no, r.phone_key, r.result FROM sms_receipts r JOIN sms_sessions s"
            " USING (account_id, session_no) WHERE s.state = 'resolved'"
        ):
            stored.setdefault(session_no, {})[key] = result
    outcome.escalated_unpolled = sum(1 for _, count in escalated if count == 0)
    outcome.escalated_resolvable = sum(1 for no, _ in escalated if no in resolvable)
    outcome.rule_breaks = _rule_breaks(calls, truth, outcome.timings)
    outcome.wrongly_resolved = sum(
        1
        for session_no, results in stored.items()
        if results
        != {phone_key(p): t["final_result"] for p, t in truth[session_no]["phones"].items()}
    )
    text = worker_log.read_text(errors="replace")
    outcome.log = text
    received: Counter[str] = Counter()
    stamps: list[datetime] = []
    for match in _RECEIVED.finditer(text):
        received[match.group(2)] += 1
        stamps.append(_stamp(match.group(1)))
    outcome.received = dict(received)
    if len(stamps) > 1:
        span = (stamps[-1] - stamps[0]).total_seconds()
        outcome.received_per_second = round(len(stamps) / span, 1) if span > 0 else 0.0
    done = [(_stamp(m.group(1)), int(m.group(2))) for m in _POLL_DONE.finditer(text)]
    outcome.poll_tasks_run = len(done)
    outcome.poll_tasks_idle = sum(1 for _, n in done if n == 0)
    working = [(at, n) for at, n in done if n]
    if len(working) > 1:
        span = (working[-1][0] - working[0][0]).total_seconds()
        if span > 0:
            outcome.polls_per_second = round(len(working) / span, 1)
            outcome.sessions_polled_per_second = round(sum(n for _, n in working) / span)
    outcome.poll_tasks_expired = sum(
        1 for m in _DISCARDED.finditer(text) if m.group(1) == "receipts.poll"
    )
    outcome.warnings = [
        line
        for line in text.splitlines()
        if ("WARNING/" in line or "ERROR/" in line) and "escalated session" not in line
    ]


def _rule_breaks(
    calls: Sequence[Mapping[str, Any]],
    truth: Mapping[str, Mapping[str, Any]],
    timings: Mapping[str, str],
    limit: int = 20,
) -> list[str]:
    """The schedule's rules checked against when the simulator received each session's polls
    (it stamps a call on arrival, a moment after the worker decided: ``LATENCY``)."""
    first = float(timings["RECEIPTS_FIRST_POLL_DELAY"])
    cutoff = float(timings["RECEIPTS_CUTOFF"])
    interval_min = float(timings["RECEIPTS_POLL_INTERVAL_MIN"])
    polled: dict[str, list[float]] = {}
    for call in calls:
        if call["outcome"] == "ok":
            for session_no in call["session_nos"]:
                polled.setdefault(session_no, []).append(call["t"])
    breaks = []
    for session_no, times in sorted(polled.items()):
        sent = truth[session_no]["sent_at"]
        times.sort()
        if times[0] < sent + first:
            breaks.append(f"{session_no}: polled {times[0] - sent:.3f}s after sending")
        if times[-1] > sent + cutoff + LATENCY:
            breaks.append(f"{session_no}: polled {times[-1] - sent:.3f}s after sending")
        breaks.extend(
            f"{session_no}: polled twice {b - a:.3f}s apart"
            for a, b in itertools.pairwise(times)
            if b - a < interval_min - LATENCY
        )
    return breaks[:limit]


def _stamp(text: str) -> datetime:
    """A Celery log line's time (the worker's local time; only differences are used)."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f")  # noqa: DTZ007


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=3000)
    parser.add_argument("--accounts", type=int, default=1)
    parser.add_argument("--timings", choices=sorted(TIMINGS), default="demo")
    parser.add_argument("--broker", help="a broker URL instead of the embedded one")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="extra settings"
    )
    parser.add_argument(
        "--worker-arg", action="append", default=[], help="an option for `receipts run`"
    )
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    folder = Path(tempfile.mkdtemp(prefix="receipts-embedded-"))
    outcome = run(
        sessions=args.sessions,
        accounts=args.accounts,
        timings=TIMINGS[args.timings],
        folder=folder,
        broker_url=args.broker,
        extra_env=extra,
        worker_args=args.worker_arg,
        progress=True,
    )
    print(json.dumps(outcome.summary(), indent=2, default=str))
    if args.keep:
        print(f"run folder: {folder}", file=sys.stderr)
    else:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    sys.exit(0 if outcome.ok() else 1)


if __name__ == "__main__":
    main()
