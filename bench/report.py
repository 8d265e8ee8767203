"""The figures of a run, each with its target and verdict, as a table and as JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

RESULTS_DIR = Path(__file__).resolve().parent / "results"

TRACK_TARGET = 20_000  # sessions/s
HISTORY_RATIO_TARGET = 1.2
MEMORY_RATIO_TARGET = 1.2
INGEST_RATIO_TARGET = 0.5  # of the raw executemany limit
PUSH_RATIO_TARGET = 0.5  # push ingestion, of the raw executemany limit
PUSH_P99_TARGET_MS = 250
HISTORY_COST_TARGET = 0.8  # ingestion with the history, of the upsert alone
PURGE_POLLS_RATIO_TARGET = 1.5  # claim and record p99 during a purge, of without


@dataclass(frozen=True, kw_only=True, slots=True)
class Figure:
    key: str
    label: str
    value: float | int | str | None
    unit: str = ""
    target: str = ""
    ok: bool | None = None  # None: informational, no target
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "n/a"
        return {True: "pass", False: "MISS", None: "info"}[self.ok]


def _get(results: dict[str, Any], path: str) -> Any:
    value: Any = results
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return round(a / b, 3)
    return None


def _cpu_figures(r: dict[str, Any], w: str) -> list[Figure]:
    """Where the cores went during the worker run: CPU per poll by role, and how busy the
    machine was (the worker shares it with PostgreSQL, Redis and the simulator)."""
    out: list[Figure] = []
    polls = _get(r, f"{w}.api_calls")
    cpu = _get(r, f"{w}.cpu_by_role.cpu_s") or {}
    for role, seconds in cpu.items():
        if polls and seconds >= 0.01:
            out.append(
                Figure(
                    key=f"worker_cpu_{role.split()[0]}",
                    label=f"2. … CPU per poll of 100 sessions: {role}",
                    value=round(seconds / polls * 1000, 2),
                    unit="ms",
                )
            )
    busy = sum((_get(r, f"{w}.cpu_by_role.share_of_machine") or {}).values())
    if busy:
        out.append(
            Figure(
                key="worker_machine_busy",
                label="2. … share of the machine's CPU in use during the run",
                value=round(busy, 2),
                unit="x",
            )
        )
    return out


def _history_figures(r: dict[str, Any]) -> list[Figure]:
    """What the history costs ingestion: the upsert with its history rows against the upsert
    alone (bench/history.py)."""
    receipts = _get(r, "history.receipts_per_pass")
    scope = f" ({receipts:,} receipts per pass)" if receipts else ""
    ratio = _get(r, "history.changes_ratio")
    out = [
        Figure(
            key="history_receipts_per_s",
            label=f"9. upsert with history, insert+update passes{scope}",
            value=_get(r, "history.changes_history_receipts_per_s"),
            unit="receipts/s",
        ),
        Figure(
            key="history_baseline_receipts_per_s",
            label="9. … the upsert alone, same receipts",
            value=_get(r, "history.changes_baseline_receipts_per_s"),
            unit="receipts/s",
        ),
        Figure(
            key="history_ratio",
            label="9. … ratio, with history vs upsert alone",
            value=ratio,
            unit="x",
            target=f">= {HISTORY_COST_TARGET}",
            ok=ratio >= HISTORY_COST_TARGET if ratio is not None else None,
            note="every receipt a change: the worst case",
        ),
    ]
    polls = _get(r, "history_polls.ratio")
    out.append(
        Figure(
            key="history_polls_ratio",
            label="9. … ratio on whole polls (API call, locks, sessions, commit)",
            value=polls,
            unit="x",
            target=f">= {HISTORY_COST_TARGET}",
            ok=polls >= HISTORY_COST_TARGET if polls is not None else None,
            note=f"{_get(r, 'history_polls.history_receipts_per_s')} vs "
            f"{_get(r, 'history_polls.baseline_receipts_per_s')} receipts/s",
        )
    )
    for name in ("insert", "update", "repeat", "stale"):
        out.append(
            Figure(
                key=f"history_ratio_{name}",
                label=f"9. … ratio, {name} pass alone",
                value=_get(r, f"history.passes.{name}.ratio"),
                unit="x",
            )
        )
    return out


def _events_load_figures(r: dict[str, Any]) -> list[Figure]:
    """Ingestion with history and events on against off, and the events' lag, while the
    deliverer runs (bench/events.py: under_load)."""
    ratio = _get(r, "events_load.nudged.ratio")
    out = [
        Figure(
            key="events_load_ratio",
            label="10. ingestion, history + events on (delivering) vs off, whole polls",
            value=ratio,
            unit="x",
            target=f">= {HISTORY_COST_TARGET}",
            ok=ratio >= HISTORY_COST_TARGET if ratio is not None else None,
            note=f"{_get(r, 'events_load.nudged.on_receipts_per_s')} vs "
            f"{_get(r, 'events_load.nudged.off_receipts_per_s')} receipts/s; off = no "
            "history, no events (history cannot be turned off: the upsert alone); on "
            "includes the wait for the deliverer to catch up after each ON block "
            f"({_get(r, 'events_load.nudged.catch_up_s')} s)",
        ),
        Figure(
            key="events_load_ratio_catch_up_untimed",
            label="10. … the same without the catch-up waits (delivery overlapping ON only)",
            value=_get(r, "events_load.nudged.ratio_catch_up_untimed"),
            unit="x",
        ),
    ]
    big = _get(r, "events_load.nudged_1000.ratio")
    out.append(
        Figure(
            key="events_load_ratio_1000",
            label="10. … the same, RECEIPTS_EVENTS_BATCH_SIZE=1000",
            value=big,
            unit="x",
            note=f"{_get(r, 'events_load.nudged_1000.on_receipts_per_s')} vs "
            f"{_get(r, 'events_load.nudged_1000.off_receipts_per_s')} receipts/s",
        )
    )
    for mode, label in (
        ("nudged", "10. event lag under ingestion load, nudged by commits"),
        ("tick", "10. … the same with the tick alone (before the nudge)"),
        ("nudged_1000", "10. … nudged, RECEIPTS_EVENTS_BATCH_SIZE=1000"),
    ):
        tick = _get(r, f"events_load.{mode}.tick_s")
        for q in ("p50", "p99"):
            out.append(
                Figure(
                    key=f"events_lag_{q}_{mode}",
                    label=f"{label}, {q}",
                    value=_get(r, f"events_load.{mode}.lag_{q}_s"),
                    unit="s",
                    note=f"tick {tick} s; {_get(r, f'events_load.{mode}.events')} events, "
                    "observed_at -> body read by the receiver",
                )
            )
    return out


def _push_figures(r: dict[str, Any]) -> list[Figure]:
    """Uspeedo's push through the receiver (bench/push.py)."""
    out: list[Figure] = []

    def add(key: str, label: str, path: str, unit: str = "", **kw: Any) -> None:
        out.append(Figure(key=key, label=label, value=_get(r, path), unit=unit, **kw))

    def check(
        key: str, label: str, value: Any, unit: str, target: str, ok: Callable[[Any], bool]
    ) -> None:
        verdict = ok(value) if value is not None else None
        out.append(Figure(key=key, label=label, value=value, unit=unit, target=target, ok=verdict))

    p = "push"
    pushers, batch = _get(r, f"{p}.pushers"), _get(r, f"{p}.batch")
    receipts = _get(r, f"{p}.receipts")
    add(
        "push_receipts_per_s",
        f"8. push ingestion through the receiver ({receipts:,} receipts, {pushers} pushers "
        f"x batches of {batch})"
        if receipts
        else "8. push ingestion through the receiver",
        f"{p}.receipts_per_s",
        "receipts/s",
        note="first push sent -> last 200 (after its commit)",
    )
    check(
        "push_ratio_to_raw",
        "8. … ratio to raw executemany limit",
        _ratio(_get(r, f"{p}.receipts_per_s"), _get(r, "raw.executemany.insert_rows_per_s")),
        "x",
        f">= {PUSH_RATIO_TARGET}",
        lambda value: value >= PUSH_RATIO_TARGET,
    )
    add(
        "push_latency_p50",
        "8. push-to-commit latency p50, at that load",
        f"{p}.latency_p50_ms",
        "ms",
    )
    check(
        "push_latency_p99",
        "8. push-to-commit latency p99, at that load",
        _get(r, f"{p}.latency_p99_ms"),
        "ms",
        f"< {PUSH_P99_TARGET_MS}",
        lambda value: value < PUSH_P99_TARGET_MS,
    )
    raw = _get(r, "raw.executemany.insert_rows_per_s")
    for level in _get(r, f"{p}.levels") or []:
        rate, p50, p99 = level["receipts_per_s"], level["latency_p50_ms"], level["latency_p99_ms"]
        out.append(
            Figure(
                key=f"push_receipts_per_s_{level['pushers']}",
                label=f"8. … with {level['pushers']} pushers",
                value=rate,
                unit="receipts/s",
                note=f"{_ratio(rate, raw)}x raw; latency p50 {p50} ms, p99 {p99} ms",
            )
        )
    saved = _get(r, "push_saved.sessions")
    add(
        "push_never_polled",
        f"8. API calls saved: share of {saved:,} sessions never polled, every report pushed"
        if saved
        else "8. API calls saved: share of sessions never polled, every report pushed",
        "push_saved.never_polled_pct",
        "%",
    )
    without = _get(r, "push_saved.api_calls_without_push")
    add(
        "push_api_calls",
        f"8. … API calls made (polling alone: {without})" if without else "8. … API calls made",
        "push_saved.api_calls",
        "calls",
    )
    return out


def _purge_figures(r: dict[str, Any]) -> list[Figure]:
    """Retention: the purge rate, and the polls beside a purge (bench/purge.py)."""
    sessions = _get(r, "purge.sessions")
    phones = _get(r, "purge.phones_per_session")
    out = [
        Figure(
            key="purge_sessions_per_s",
            label=f"11. purge of {sessions:,} finished sessions ({phones} phones, receipts, "
            "history)"
            if sessions
            else "11. purge of finished sessions",
            value=_get(r, "purge.sessions_per_s"),
            unit="sessions/s",
            note=f"{_get(r, 'purge.rows_per_s')} rows/s, {_get(r, 'purge.seconds')} s"
            if sessions
            else "",
        )
    ]
    history = _get(r, "purge_polls.history_sessions")
    during = f"during a purge of {history:,}" if history else "during a purge"
    for step in ("claim", "record"):
        base = _get(r, f"purge_polls.baseline.{step}_p99_ms")
        busy = _get(r, f"purge_polls.during_purge.{step}_p99_ms")
        ratio = _get(r, f"purge_polls.{step}_p99_ratio")
        out.append(
            Figure(
                key=f"purge_polls_{step}_p99",
                label=f"11. {step} p99 of 100 sessions, {during}",
                value=busy,
                unit="ms",
                note=f"without: {base} ms" if base is not None else "",
            )
        )
        out.append(
            Figure(
                key=f"purge_polls_{step}_ratio",
                label=f"11. … {step} p99 ratio, during a purge vs without",
                value=ratio,
                unit="x",
                target=f"<= {PURGE_POLLS_RATIO_TARGET}",
                ok=ratio <= PURGE_POLLS_RATIO_TARGET if ratio is not None else None,
            )
        )
    return out


def figures(results: dict[str, Any]) -> list[Figure]:
    r = results
    out: list[Figure] = []

    def add(key: str, label: str, path: str, unit: str = "", **kw: Any) -> None:
        out.append(Figure(key=key, label=label, value=_get(r, path), unit=unit, **kw))

    def check(
        key: str,
        label: str,
        value: Any,
        unit: str,
        target: str,
        ok: Callable[[Any], bool],
        note: str = "",
    ) -> None:
        verdict = ok(value) if value is not None else None
        out.append(
            Figure(
                key=key, label=label, value=value, unit=unit, target=target, ok=verdict, note=note
            )
        )

    rows = _get(r, "raw.rows")
    add(
        "raw_executemany",
        f"1. raw upsert, executemany pipeline ({rows:,} rows, insert)"
        if rows
        else "1. raw upsert, executemany pipeline",
        "raw.executemany.insert_rows_per_s",
        "rows/s",
        target="seen elsewhere: 95-135k",
    )
    add(
        "raw_executemany_update",
        "   … update pass (every row conflicts)",
        "raw.executemany.update_rows_per_s",
        "rows/s",
    )
    add(
        "raw_copy",
        "1. raw upsert, COPY + INSERT…SELECT (insert)",
        "raw.copy.insert_rows_per_s",
        "rows/s",
        target="seen elsewhere: 165-220k",
    )
    add("raw_copy_update", "   … update pass", "raw.copy.update_rows_per_s", "rows/s")

    w = "worker"
    sessions = _get(r, f"{w}.sessions")
    phones = _get(r, f"{w}.phones_per_session")
    scope = f" ({sessions:,} sessions x {phones})" if sessions else ""
    add(
        "worker_receipts_per_s",
        f"2. real worker, receipts ingested{scope}",
        f"{w}.receipts_per_s",
        "receipts/s",
        note="first claim -> last resolution",
    )
    check(
        "worker_ratio_to_raw",
        "2. … ratio to raw executemany limit",
        _ratio(_get(r, f"{w}.receipts_per_s"), _get(r, "raw.executemany.insert_rows_per_s")),
        "x",
        f">= {INGEST_RATIO_TARGET}",
        lambda value: value >= INGEST_RATIO_TARGET,
    )
    add(
        "worker_seconds",
        "2. … first claim to last resolution",
        f"{w}.first_claim_to_last_resolution_s",
        "s",
    )
    add(
        "worker_calls_per_session",
        "2. API calls per session polled",
        f"{w}.api_calls_per_session",
        "calls",
        target="min 0.01",
    )
    calls = _get(r, f"{w}.api_calls")
    allowed = _get(r, f"{w}.api_calls_allowed")
    minimum = _get(r, f"{w}.api_calls_minimum")
    check(
        "worker_calls_vs_minimum",
        "2. API calls in the round vs minimum",
        f"{calls} (min {minimum})" if calls is not None else None,
        "calls",
        f"<= min + 1/account ({allowed})",
        lambda _: bool(_get(r, f"{w}.api_calls_within_minimum_plus_one")),
    )
    out.extend(_cpu_figures(r, w))
    add("worker_peak_rss", "2. worker peak RSS (main + pool children)", f"{w}.peak_rss_mb", "MB")

    add("claim_ms", "3. claim_batch(100), no history", "claims.no_history.best_mean_ms", "ms/batch")
    for step in _get(r, "claims.history") or []:
        rows = step["rows"]
        out.append(
            Figure(
                key=f"claim_ms_{rows}",
                label=f"3. claim_batch(100), {rows:,} history",
                value=step["best_mean_ms"],
                unit="ms/batch",
            )
        )
        check(
            f"claim_ratio_{rows}",
            f"3. … ratio, {rows:,} resolved/escalated vs none",
            step["ratio"],
            "x",
            f"<= {HISTORY_RATIO_TARGET}",
            lambda v: v <= HISTORY_RATIO_TARGET,
        )

    tracked = _get(r, "track.sessions")
    check(
        "track_per_s",
        f"4. track_many, {tracked:,} new sessions" if tracked else "4. track_many",
        _get(r, "track.track_many_sessions_per_s"),
        "sessions/s",
        f">= {TRACK_TARGET:,}",
        lambda v: v >= TRACK_TARGET,
    )
    add("track_parse", "   … parse_requests alone", "track.parse_sessions_per_s", "sessions/s")
    add("track_write", "   … track_requests alone", "track.write_sessions_per_s", "sessions/s")
    add(
        "track_repeat",
        "   … track_many again (all exist: merge path)",
        "track.repeat_sessions_per_s",
        "sessions/s",
    )

    small, large = _get(r, "memory_small.peak_rss_mb"), _get(r, "memory_large.peak_rss_mb")
    n_small, n_large = _get(r, "memory_small.sessions"), _get(r, "memory_large.sessions")
    window = _get(r, "memory_large.window_s")
    add(
        "memory_small",
        f"5. worker peak RSS, {n_small:,} backlog (whole run)"
        if n_small
        else "5. worker peak RSS, small backlog",
        "memory_small.peak_rss_mb",
        "MB",
    )
    add(
        "memory_large",
        f"5. worker peak RSS, {n_large:,} backlog (first {window:g}s)"
        if n_large and window
        else "5. worker peak RSS, large backlog",
        "memory_large.peak_rss_mb",
        "MB",
    )
    check(
        "memory_ratio",
        "5. peak RSS ratio, large vs small backlog",
        _ratio(large, small),
        "x",
        f"<= {MEMORY_RATIO_TARGET}",
        lambda v: v <= MEMORY_RATIO_TARGET,
    )
    add(
        "memory_claimed",
        "5. … sessions claimed by ticks in that window",
        "memory_large.sessions_claimed",
        "sessions",
    )
    add(
        "memory_resolved",
        "5. … sessions resolved in that window",
        "memory_large.resolved",
        "sessions",
    )

    out.extend(_push_figures(r))
    out.extend(_history_figures(r))
    for size in ("100", "1000"):
        out.append(
            Figure(
                key=f"events_per_s_{size}",
                label=f"10. event delivery to a local webhook receiver, batches of {size}",
                value=_get(r, f"events.batches.{size}.events_per_s"),
                unit="events/s",
            )
        )

    out.extend(_events_load_figures(r))
    out.extend(_purge_figures(r))

    add(
        "inproc_ms_per_poll",
        "7. in-process poll() of 100 sessions (no Celery)",
        "inproc.ms_per_poll",
        "ms",
    )
    add(
        "inproc_receipts_per_s",
        "7. … receipts/s in one process",
        "inproc.receipts_per_s_one_process",
        "receipts/s",
    )
    return out


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def render(results: dict[str, Any], figs: list[Figure], stream: TextIO) -> None:
    machine = results.get("machine", {})
    print("", file=stream)
    print(
        f"uspeedo-receipts benchmark ({results.get('mode')}), "
        f"{results.get('duration_s', 0):.0f}s total",
        file=stream,
    )
    if machine:
        print(
            f"machine: {machine.get('nproc')} CPU(s) {machine.get('cpu', '')}, "
            f"{machine.get('memory_gb')} GB RAM; PostgreSQL {machine.get('postgresql')} "
            f"(shared_buffers {machine.get('shared_buffers')}); Python {machine.get('python')}; "
            + ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items()),
            file=stream,
        )
        print(
            f"other load on the machine: {machine.get('cpu_busy_before', 0):.0%} of CPU busy "
            f"before the run, {machine.get('cpu_busy_after', 0):.0%} after",
            file=stream,
        )
    width = max(len(f.label) for f in figs)
    header = f"{'figure':<{width}}  {'value':>14}  {'unit':<11} {'target':<24} result"
    print(header, file=stream)
    print("-" * len(header), file=stream)
    for f in figs:
        print(
            f"{f.label:<{width}}  {_show(f.value):>14}  {f.unit:<11} {f.target:<24} "
            f"{f.verdict}{'  (' + f.note + ')' if f.note else ''}",
            file=stream,
        )
    for phase, detail in results.items():
        if isinstance(detail, dict) and "error" in detail:
            print(f"phase {phase} FAILED: {detail['error']}", file=stream)
    notes = results.get("notes", [])
    if notes:
        print("", file=stream)
        for note in notes:
            print(f"note: {note}", file=stream)


def document(results: dict[str, Any], figs: list[Figure]) -> dict[str, Any]:
    return {
        "figures": [{**asdict(f), "verdict": f.verdict} for f in figs],
        **results,
    }


def write(doc: dict[str, Any], path: Path = RESULTS_DIR / "latest.json") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path
