"""Drive the real worker: ``receipts worker --concurrency 4`` and ``receipts beat`` subprocesses
on the benchmark database and Redis db, against the simulator on loopback, with a backlog of due
``quick_success`` sessions; measure until every session is resolved (or for a fixed window).

Peak RSS is the sum of ``VmHWM`` of the worker's main process and its pool children, read from
/proc just before the worker is stopped (and, as a cross-check, the largest sum of ``VmRSS``
seen by sampling every 0.25 s).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.env import (
    SEED_PREFIX,
    BenchDatabase,
    copy_sessions,
    empty_redis,
    log,
    make_sessions,
    register,
    timings_env,
)
from tests.support.processes import Processes, wait_for
from worker.check import is_check_session
from worker.simulator import Simulator

# As README "Production" runs it: a poll spends most of its time waiting on the API and the
# database, so a pool of one process per core leaves the cores idle (measured: 2 processes
# used 74% of this 2-core machine, 4 processes kept it busy).
CONCURRENCY = 4
SAMPLE_EVERY = 0.25


# --- /proc ---------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
                found.extend(int(p) for p in handle.read().split())
        except OSError:
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of one process in kB; zeros once it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


@dataclass(slots=True)
class MemoryProbe:
    pid: int
    peak_rss_sum_kb: int = 0
    hwm_by_pid: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)

    def sample(self) -> None:
        total = 0
        for pid in process_tree(self.pid):
            rss, hwm = memory_kb(pid)
            total += rss
            if hwm:
                self.hwm_by_pid[pid] = max(hwm, self.hwm_by_pid.get(pid, 0))
                self.names.setdefault(pid, _command(pid))
        self.peak_rss_sum_kb = max(self.peak_rss_sum_kb, total)

    @property
    def hwm_sum_kb(self) -> int:
        return sum(self.hwm_by_pid.values())

    def by_process_mb(self) -> list[dict[str, Any]]:
        return [
            {
                "pid": pid,
                "role": "main" if pid == self.pid else "child",
                "command": self.names.get(pid, ""),
                "peak_rss_mb": round(kb / 1024, 1),
            }
            for pid, kb in sorted(self.hwm_by_pid.items())
        ]


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds one process has used so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # Fields after the command: state is 0, utime 11, stime 12 (proc(5) numbers 14 and 15).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _role(pid: int, worker_tree: set[int]) -> str | None:
    if pid in worker_tree:
        return "worker (main + pool)"
    if pid == os.getpid():
        return "benchmark process (simulator threads)"
    try:
        with open(f"/proc/{pid}/comm", encoding="ascii") as handle:
            comm = handle.read().strip()
    except OSError:
        return None
    if comm.startswith("postgres"):
        return "postgresql"
    if comm.startswith("redis"):
        return "redis"
    if "beat" in _command(pid):
        return "beat"
    return None


@dataclass(slots=True)
class CpuProbe:
    """CPU seconds used per role between :meth:`start` and :meth:`stop`, to show where the
    machine's cores went: the worker shares them with PostgreSQL, Redis and the simulator."""

    worker_pid: int
    start_by_pid: dict[int, float] = field(default_factory=dict)
    last_by_pid: dict[int, float] = field(default_factory=dict)
    roles: dict[int, str] = field(default_factory=dict)
    started: float = 0.0
    seconds: float = 0.0

    def _read(self) -> dict[int, float]:
        tree = set(process_tree(self.worker_pid))
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            role = self.roles.get(pid) or _role(pid, tree)
            if role is not None:
                self.roles[pid] = role
                found[pid] = cpu_seconds(pid)
        return found

    def start(self) -> None:
        self.start_by_pid = self._read()
        self.started = time.monotonic()

    def sample(self) -> None:
        # Pool children and PostgreSQL backends come and go: keep their last reading.
        self.last_by_pid.update(self._read())

    def stop(self) -> None:
        self.sample()
        self.seconds = time.monotonic() - self.started

    def by_role(self) -> dict[str, Any]:
        used: dict[str, float] = defaultdict(float)
        for pid, value in self.last_by_pid.items():
            used[self.roles[pid]] += value - self.start_by_pid.get(pid, 0.0)
        ranked = sorted(used.items(), key=lambda item: item[1], reverse=True)
        cores = os.cpu_count() or 1
        return {
            "wall_s": round(self.seconds, 2),
            "cores": cores,
            "cpu_s": {role: round(value, 2) for role, value in ranked},
            "share_of_machine": {
                role: round(value / (self.seconds * cores), 3) for role, value in ranked
            }
            if self.seconds
            else {},
        }


# --- the run -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    label: str
    sessions: int
    phones: int
    accounts: int
    timeout: float  # bound on the whole run once the worker is started
    window: float | None = None  # stop this long after the first claim instead of at the end
    profile_to: Path | None = None  # py-spy raw output of the worker during the window
    profile_seconds: float = 20.0


def _pending(database: BenchDatabase) -> int:
    with database.connect() as conn:
        row = conn.execute("SELECT count(*) FROM sms_sessions WHERE state = 'pending'").fetchone()
    return int(row[0]) if row else -1


def _claimed(database: BenchDatabase) -> bool:
    with database.connect() as conn:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM sms_sessions WHERE claimed_at IS NOT NULL)"
        ).fetchone()
    return bool(row and row[0])


def _start_profiler(pid: int, config: RunConfig) -> subprocess.Popen[bytes] | None:
    py_spy = shutil.which("py-spy")
    if config.profile_to is None or py_spy is None:
        return None
    return subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--nonblocking",
            "--rate",
            "100",
            "--format",
            "raw",
            "--duration",
            str(int(config.profile_seconds)),
            "--output",
            str(config.profile_to),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _stop_profiler(profiler: subprocess.Popen[bytes] | None, config: RunConfig) -> None:
    if profiler is None:
        return
    try:
        profiler.wait(config.profile_seconds + 15)
    except subprocess.TimeoutExpired:
        os.killpg(profiler.pid, signal.SIGINT)
        try:
            profiler.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(profiler.pid, signal.SIGKILL)
            profiler.wait(5)
    if profiler.returncode and profiler.stderr is not None:
        log(f"py-spy exited {profiler.returncode}: {profiler.stderr.read().decode()[-500:]}")


def run(
    database: BenchDatabase, sim: Simulator, broker_url: str, config: RunConfig, folder: Path
) -> dict[str, Any]:
    database.reset()
    empty_redis(broker_url)
    sim.reset()
    folder.mkdir(parents=True, exist_ok=True)
    sessions = make_sessions(
        config.sessions, phones=config.phones, accounts=config.accounts, prefix=f"{config.label}-"
    )
    sent_at = time.time() - 60
    register(sim, sessions, sent_at=sent_at)
    copy_sessions(database, sessions, sent_at=datetime.fromtimestamp(sent_at, UTC))
    log(f"{config.label}: {config.sessions:,} due sessions x {config.phones} phones loaded")

    group = Processes(timings_env(database, sim, broker_url), folder, inherit=False)
    profiler: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        worker = group.start(
            "worker",
            "worker",
            "--concurrency",
            str(CONCURRENCY),
            "--hostname",
            f"bench-{config.label}@%h",
        )
        group.start("beat", "beat", "--schedule", str(folder / "beat-schedule"))
        probe = MemoryProbe(worker.pid)

        def claimed() -> bool:
            group.check_alive()
            probe.sample()
            return _claimed(database)

        wait_for(
            claimed, timeout=60, interval=0.1, describe=lambda: f"{config.label}: a first claim"
        )
        first_claim_wall = time.monotonic()
        cpu = CpuProbe(worker.pid)
        cpu.start()
        profiler = _start_profiler(worker.pid, config)

        def finished() -> bool:
            group.check_alive()
            probe.sample()
            cpu.sample()
            if config.window is not None:
                return time.monotonic() - first_claim_wall >= config.window
            return _pending(database) == 0

        wait_for(
            finished,
            timeout=config.timeout,
            interval=SAMPLE_EVERY,
            describe=lambda: f"{config.label}: the backlog to drain",
        )
        ended = time.monotonic()
        cpu.stop()
        probe.sample()  # VmHWM just before stopping
        _stop_profiler(profiler, config)
        profiler = None
    except BaseException:
        log(f"{config.label} failed; worker log tail:\n{group.tail('worker')}")
        raise
    finally:
        if profiler is not None and profiler.poll() is None:
            os.killpg(profiler.pid, signal.SIGKILL)
            profiler.wait(5)
        group.stop_all()
    result = _collect(database, sim, config)
    result.update(
        startup_to_first_claim_s=round(first_claim_wall - started, 2),
        wall_s=round(ended - started, 2),
        peak_rss_mb=round(probe.hwm_sum_kb / 1024, 1),
        peak_rss_by_process=probe.by_process_mb(),
        peak_rss_sampled_mb=round(probe.peak_rss_sum_kb / 1024, 1),
        processes=len(probe.hwm_by_pid),
        window_s=config.window,
        cpu_by_role=cpu.by_role(),
    )
    return result


def _collect(database: BenchDatabase, sim: Simulator, config: RunConfig) -> dict[str, Any]:
    with database.connect() as conn:
        s = conn.execute(
            """SELECT count(*) FILTER (WHERE state = 'resolved'),
                      count(*) FILTER (WHERE state = 'escalated'),
                      min(claimed_at), max(resolved_at), sum(poll_count),
                      count(claimed_at)
               FROM sms_sessions WHERE session_no NOT LIKE %s""",
            (f"{SEED_PREFIX}%",),
        ).fetchone()
        r = conn.execute(
            "SELECT count(*), min(first_seen_at), max(first_seen_at) FROM sms_receipts "
            "WHERE session_no NOT LIKE %s",
            (f"{SEED_PREFIX}%",),
        ).fetchone()
    if s is None or r is None:
        raise RuntimeError("no statistics")
    resolved, escalated, first_claim, last_resolved, polls, claimed = s
    receipts, first_seen, last_seen = r
    span = (last_resolved - first_claim).total_seconds() if last_resolved and first_claim else 0.0
    seen_span = (last_seen - first_seen).total_seconds() if last_seen and first_seen else 0.0
    calls = _calls(sim)
    out: dict[str, Any] = {
        "sessions": config.sessions,
        "phones_per_session": config.phones,
        "accounts": config.accounts,
        "resolved": resolved,
        "escalated": escalated,
        "receipts": receipts,
        "receipts_expected": config.sessions * config.phones if config.window is None else None,
        "first_claim_to_last_resolution_s": round(span, 3),
        "receipts_per_s": round(receipts / span) if span else None,
        "receipts_per_s_first_seen_span": round(receipts / seen_span) if seen_span else None,
        "sessions_per_s": round(resolved / span) if span else None,
        "session_polls": int(polls or 0),
        "sessions_claimed": claimed,
        **calls,
    }
    if config.window is None and (
        resolved != config.sessions or receipts != config.sessions * config.phones
    ):
        raise RuntimeError(f"{config.label}: incomplete run: {out}")
    return out


def _calls(sim: Simulator) -> dict[str, Any]:
    # Not the credentials check each worker makes as it starts (worker/check.py).
    calls = [
        c
        for c in sim.calls()
        if c["action"] == "GetUSMSSendReceipt" and not any(map(is_check_session, c["session_nos"]))
    ]
    per_account: Counter[int] = Counter()
    polled: dict[int, set[str]] = defaultdict(set)
    outcomes: Counter[str] = Counter()
    for call in calls:
        per_account[call["account_id"]] += 1
        polled[call["account_id"]].update(call["session_nos"])
        outcomes[call["outcome"]] += 1
    accounts = {}
    for account, count in sorted(per_account.items()):
        minimum = math.ceil(len(polled[account]) / 100)
        accounts[str(account)] = {
            "calls": count,
            "sessions_polled": len(polled[account]),
            "minimum_calls": minimum,
            "allowed_calls": minimum + 1,
        }
    sessions_polled = sum(len(v) for v in polled.values())
    return {
        "api_calls": len(calls),
        "api_outcomes": dict(outcomes),
        "sessions_polled": sessions_polled,
        "api_calls_per_session": (
            round(len(calls) / sessions_polled, 5) if sessions_polled else None
        ),
        "api_calls_minimum": sum(a["minimum_calls"] for a in accounts.values()),
        "api_calls_allowed": sum(a["allowed_calls"] for a in accounts.values()),
        "api_calls_within_minimum_plus_one": all(
            a["calls"] <= a["allowed_calls"] for a in accounts.values()
        ),
        "api_calls_by_account": accounts,
    }
