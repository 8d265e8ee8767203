"""``python -m bench [--quick] [--json] [--sessions N] [--no-profile] [--only PHASE,...]``

Runs every phase in one process against a fresh ``receipts_bench_<random>`` database (dropped at
the end), a Redis db of its own (``BENCH_REDIS_URL``, else an empty db taken for the run; emptied
key by key before and after) and the simulator on loopback; prints a table
of every figure with its target, writes ``bench/results/latest.json``, and with ``--json``
prints that JSON on stdout (the table then goes to stderr). Exit status 1 if a phase failed or
a target was missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from sqlalchemy import exc as sa_exc

from bench import claims, events, history, inproc, push, raw, report, track, worker_run
from bench import purge as purging
from bench.env import (
    bench_database,
    configure_process,
    cpu_busy,
    log,
    machine_info,
    scratch_redis,
    seed_history,
    timings_env,
    wait_for_database,
)
from bench.profiles import summarize
from worker.simulator import Simulator

BUSY_WARNING = 0.15


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Scale:
    raw_rows: int
    track_sessions: int
    track_repeat: bool
    track_breakdown: int
    seed_sessions: int
    inproc_sessions: int
    worker_sessions: int
    worker_accounts: int
    phones: int
    memory_small: int
    memory_large: int
    memory_phones: int
    memory_window: float
    profile_seconds: float
    claim_pending: int
    claim_history: tuple[int, ...]
    claim_rounds: int
    push_sessions: int
    push_phones: int
    push_saved_sessions: int
    history_sessions: int
    events_count: int
    events_load_sessions: int
    purge_sessions: int
    purge_poll_history: int
    purge_poll_cycles: int


FULL = Scale(
    raw_rows=100_000,
    track_sessions=100_000,
    track_repeat=True,
    track_breakdown=20_000,
    seed_sessions=200_000,
    inproc_sessions=4_000,
    worker_sessions=50_000,
    worker_accounts=4,
    phones=5,
    memory_small=2_000,
    memory_large=200_000,
    memory_phones=1,
    memory_window=25.0,
    profile_seconds=20.0,
    claim_pending=20_000,
    claim_history=(100_000, 2_000_000),
    # The best of five rounds: a round's mean moves by about 0.1 ms from run to run (measured),
    # which is 6% of a 1.7 ms claim.
    claim_rounds=5,
    push_sessions=10_000,
    push_phones=5,
    push_saved_sessions=1_000,
    history_sessions=4_000,
    events_count=50_000,
    events_load_sessions=40_000,
    purge_sessions=1_000_000,
    # A million, as the purge rate's: at 8,000 sessions/s a purge of 300,000 lasted 30 s, about
    # 150 timed cycles, whose p99 was their second-worst.
    purge_poll_history=1_000_000,
    purge_poll_cycles=400,
)
QUICK = Scale(
    raw_rows=20_000,
    track_sessions=10_000,
    track_repeat=True,
    track_breakdown=5_000,
    seed_sessions=10_000,
    inproc_sessions=1_000,
    worker_sessions=2_000,
    worker_accounts=4,
    phones=5,
    memory_small=500,
    memory_large=20_000,
    memory_phones=1,
    memory_window=8.0,
    profile_seconds=6.0,
    claim_pending=2_000,
    claim_history=(20_000, 100_000),
    claim_rounds=5,
    push_sessions=2_000,
    push_phones=5,
    push_saved_sessions=400,
    history_sessions=1_000,
    events_count=10_000,
    events_load_sessions=2_000,
    purge_sessions=100_000,
    purge_poll_history=50_000,
    purge_poll_cycles=150,
)
PHASES = (
    "raw",
    "track",
    "seed",
    "history",
    "history_polls",
    "inproc",
    "worker",
    "memory_small",
    "memory_large",
    "claims",
    "push",
    "push_saved",
    "events",
    "events_load",
    "purge",
    "purge_polls",
)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="scaled down: a < 60 s smoke test")
    parser.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    parser.add_argument("--sessions", type=int, help="backlog of the main real-worker run")
    parser.add_argument("--no-profile", action="store_true", help="skip py-spy on the worker")
    parser.add_argument(
        "--only",
        metavar="PHASE,...",
        help=f"run only these phases (of {', '.join(PHASES)}); the others' figures show '-'",
    )
    args = parser.parse_args(argv)
    if args.sessions is not None and args.sessions < 1:
        parser.error("--sessions must be positive")
    if args.only is not None:
        args.only = {name.strip() for name in args.only.split(",") if name.strip()}
        unknown = sorted(args.only - set(PHASES))
        if unknown or not args.only:
            parser.error(
                f"--only: unknown phase(s) {', '.join(unknown)} (known: {', '.join(PHASES)})"
            )
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: processes, database, Redis


def _short_error(exc: BaseException) -> str:
    """One readable line: SQLAlchemy's messages carry the whole statement and its parameters."""
    original = getattr(exc, "orig", None) or exc
    first = str(original).strip().splitlines()[0] if str(original).strip() else ""
    return f"{type(original).__name__}: {first[:300]}"


def _connection_lost(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.OperationalError | sa_exc.OperationalError)


def _phase(results: dict[str, Any], name: str, work: Callable[[], dict[str, Any]]) -> None:
    """Run one phase; a failure is recorded and the other phases still run. A phase cut short by
    a lost database connection (PostgreSQL restarted by someone else) is retried once. A phase
    left out by ``--only`` is skipped."""
    only = results.get("only")
    if only is not None and name not in only:
        return
    started = time.monotonic()
    for attempt in (1, 2):
        log(f"--- {name}" + (" (retry)" if attempt > 1 else ""))
        try:
            results[name] = work()
        except Exception as exc:
            frames = "".join(traceback.format_tb(exc.__traceback__)[-4:])
            log(f"phase {name} failed: {_short_error(exc)}\n{frames}")
            results[name] = {"error": _short_error(exc)}
            if attempt == 1 and _connection_lost(exc):
                results.setdefault("retried_phases", []).append(name)
                wait_for_database()
                continue
        break
    results.setdefault("phase_seconds", {})[name] = round(time.monotonic() - started, 1)


def run(scale: Scale, *, profile: bool, mode: str, only: set[str] | None = None) -> dict[str, Any]:
    started = time.monotonic()
    results: dict[str, Any] = {
        "only": sorted(only) if only is not None else None,
        "mode": mode,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "scale": dataclasses.asdict(scale),
        "notes": [],
    }
    profile_path = None
    py_spy = shutil.which("py-spy") if profile else None
    with (
        tempfile.TemporaryDirectory(prefix="receipts-bench-") as tmp,
        bench_database() as database,
        scratch_redis() as broker_url,
        Simulator(step=1.0, seed=1) as sim,
    ):
        folder = Path(tmp)
        log(f"database {database.name}, simulator {sim.url}, logs in {folder}")
        configure_process(timings_env(database, sim, broker_url))
        results["machine"] = machine_info(database)
        results["machine"]["cpu_busy_before"] = cpu_busy()

        _phase(results, "raw", lambda: raw.run(database, rows=scale.raw_rows))
        _phase(
            results,
            "track",
            lambda: track.run(
                database,
                sessions=scale.track_sessions,
                phones=scale.phones,
                repeat=scale.track_repeat,
                breakdown=scale.track_breakdown,
            ),
        )
        _phase(results, "seed", lambda: seed_history(database, scale.seed_sessions))
        _phase(
            results,
            "history",
            lambda: history.run(database, sessions=scale.history_sessions, phones=scale.phones),
        )
        _phase(
            results,
            "history_polls",
            lambda: history.polls(
                database, sim, sessions=scale.inproc_sessions, phones=scale.phones
            ),
        )
        _phase(
            results,
            "inproc",
            lambda: inproc.run(database, sim, sessions=scale.inproc_sessions, phones=scale.phones),
        )

        main_config = worker_run.RunConfig(
            label="main",
            sessions=scale.worker_sessions,
            phones=scale.phones,
            accounts=scale.worker_accounts,
            timeout=max(90.0, scale.worker_sessions / 100),
        )
        _phase(
            results,
            "worker",
            lambda: worker_run.run(database, sim, broker_url, main_config, folder / "main"),
        )

        small = worker_run.RunConfig(
            label="small",
            sessions=scale.memory_small,
            phones=scale.memory_phones,
            accounts=1,
            timeout=90,
        )
        _phase(
            results,
            "memory_small",
            lambda: worker_run.run(database, sim, broker_url, small, folder / "small"),
        )
        if py_spy:
            profile_path = folder / "large" / "py-spy.txt"
        large = worker_run.RunConfig(
            label="large",
            sessions=scale.memory_large,
            phones=scale.memory_phones,
            accounts=1,
            timeout=scale.memory_window + 60,
            window=scale.memory_window,
            profile_to=profile_path,
            profile_seconds=scale.profile_seconds,
        )
        _phase(
            results,
            "memory_large",
            lambda: worker_run.run(database, sim, broker_url, large, folder / "large"),
        )
        if profile_path is not None and profile_path.exists():
            results["profile"] = {
                "tool": "py-spy record --subprocesses --nonblocking --rate 100 (idle excluded)",
                "during": f"first {scale.profile_seconds:g}s of the {scale.memory_large:,} run",
                **summarize(profile_path),
            }
        elif profile and py_spy is None:
            results["notes"].append("py-spy not installed (pip install py-spy): no worker profile")
        elif profile:
            results["notes"].append("py-spy produced no profile (see the log above)")

        _phase(
            results,
            "claims",
            lambda: claims.run(
                database,
                pending=scale.claim_pending,
                history=scale.claim_history,
                rounds=scale.claim_rounds,
            ),
        )
        _phase(
            results,
            "push",
            lambda: push.ingestion(
                database,
                sim,
                broker_url,
                sessions=scale.push_sessions,
                phones=scale.push_phones,
                folder=folder / "push",
            ),
        )
        _phase(
            results,
            "push_saved",
            lambda: push.saved_calls(
                database,
                sim,
                broker_url,
                sessions=scale.push_saved_sessions,
                folder=folder / "push_saved",
            ),
        )
        _phase(
            results,
            "events",
            lambda: events.run(database, count=scale.events_count, batch_sizes=(100, 1000)),
        )
        _phase(
            results,
            "events_load",
            lambda: {
                name: events.under_load(
                    database,
                    sim,
                    sessions=scale.events_load_sessions,
                    phones=scale.phones,
                    mode=mode,
                    batch_size=size,
                )
                for name, mode, size in (
                    ("nudged", "nudged", None),
                    ("tick", "tick", None),
                    ("nudged_1000", "nudged", 1000),
                )
            },
        )
        # Last: they empty the database, the seeded history of the phases above included.
        _phase(results, "purge", lambda: purging.run(database, sessions=scale.purge_sessions))
        _phase(
            results,
            "purge_polls",
            lambda: purging.polls(
                database,
                history=scale.purge_poll_history,
                baseline_cycles=scale.purge_poll_cycles,
                folder=folder / "purge_polls",
            ),
        )

    results["machine"]["cpu_busy_after"] = cpu_busy()
    busy = max(results["machine"].get("cpu_busy_before", 0), results["machine"]["cpu_busy_after"])
    if busy > BUSY_WARNING:
        results["notes"].append(
            f"WARNING: other processes kept {busy:.0%} of the CPUs busy before or after the "
            "run; the figures are probably low."
        )
    results["notes"].append(
        f"memory: the {scale.memory_large:,}-session backlog is measured over the first "
        f"{scale.memory_window:g}s after its first claim (draining it would not fit the time "
        f"budget), the {scale.memory_small:,} one over its whole run; both use "
        f"{scale.memory_phones} phone(s) per session. Peak RSS = sum of VmHWM of the worker's "
        "main process and its pool children (shared copy-on-write pages count in each)."
    )
    results["notes"].append(
        f"the in-process and real-worker runs start from {scale.seed_sessions:,} resolved "
        f"sessions with {scale.seed_sessions * 5:,} receipts already stored and analyzed (a "
        "service in use, not a fresh database, whose small unanalyzed tables get other plans)."
    )
    results["notes"].append(
        "raw limits use a scratch table shaped like sms_receipts (same columns, unique key, "
        "check and conflict guard; no foreign key to sms_sessions, which the worker's writes "
        "also pay for)."
    )
    results["duration_s"] = round(time.monotonic() - started, 1)
    return results


def _print_profile(results: dict[str, Any], stream: Any) -> None:
    prof = results.get("profile")
    if prof:
        print(
            f"\nworker profile ({prof['during']}, {prof['samples']:,} on-CPU samples): "
            f"{prof['by_process']}",
            file=stream,
        )
        print(
            "  self time by package: "
            + ", ".join(f"{k} {v}%" for k, v in prof["by_package_self_pct"].items()),
            file=stream,
        )
        print("  worker functions (inclusive):", file=stream)
        for item in prof["worker_functions_inclusive"][:10]:
            print(f"    {item['pct']:5.1f}%  {item['function']}", file=stream)
        print("  top self:", file=stream)
        for item in prof["top_self"][:10]:
            print(f"    {item['pct']:5.1f}%  {item['function']}", file=stream)
    cl = results.get("claims", {})
    if "no_history" in cl:
        print("\nclaim plans (EXPLAIN ANALYZE of claim_batch's statement):", file=stream)
        for name, step in [("no history", cl["no_history"])] + [
            (f"{h['rows']:,} history", h) for h in cl.get("history", [])
        ]:
            print(f"  {name}:", file=stream)
            for line in step.get("plan", []):
                print(f"    {line}", file=stream)
    ip = results.get("inproc", {})
    if "breakdown_ms_per_poll" in ip:
        print(
            "\nin-process poll() of 100 sessions, share of the poll (cProfile, which inflates "
            "Python time ~3x):",
            file=stream,
        )
        for label, step in ip["breakdown_ms_per_poll"].items():
            print(f"    {step['pct']:5.1f}%  {step['ms']:8.2f} ms  {label}", file=stream)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    signal.signal(signal.SIGTERM, _terminate)
    scale = QUICK if args.quick else FULL
    if args.sessions:
        scale = dataclasses.replace(scale, worker_sessions=args.sessions)
    results = run(
        scale,
        profile=not args.no_profile,
        mode="quick" if args.quick else "full",
        only=args.only,
    )
    figs = report.figures(results)
    doc = report.document(results, figs)
    path = report.write(doc)
    human = sys.stderr if args.json else sys.stdout
    report.render(results, figs, human)
    _print_profile(results, human)
    print(f"\nJSON written to {path}", file=human)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    failed = any(isinstance(v, dict) and "error" in v for v in results.values())
    missed = any(f.ok is False for f in figs)
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
