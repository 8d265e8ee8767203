"""Event delivery (worker/events.py) to a webhook receiver on loopback (tests/support/receiver.py).

:func:`run`: throughput, events per second from the history tables, batch after batch, as the
delivery task sends them: claim and horizon, read a batch, POST it signed, move the cursor.
The events are ``receipt.final`` rows written straight into ``sms_receipt_events`` (one per
phone, five phones per session), after the destination's cursor, so that only them are sent.

:func:`under_load`: ingestion with history and events on against off, in one run, and the lag
of each event (from its history row's ``observed_at``/``occurred_at``, the poll's clock just
before its transaction, to the receiver having read the POST's body) while ingestion runs.
Whole polls (``worker.poller.poll`` over the simulator, as bench/history.py's ``polls``),
in blocks of claims taking turns ON, OFF, OFF, ON, ... (so that drift weighs on both alike):

- ON: history written (it cannot be turned off), ``RECEIPTS_EVENTS`` at its default, a webhook
  destination, and a deliverer sending to the receiver *while* the polls run: a separate
  process (as a Celery worker's delivery task is), which runs a round when the tick fires and,
  in the ``nudged`` mode, when the ingesting process's commits nudge it (worker/event_nudge.py,
  its thread putting the message a Celery ``apply_async`` would send on a queue), and again at
  once after a round that says there is more (``DeliveryReport.more``), as the task does;
- OFF: the poll path without the history (the receipts upsert alone, no session events:
  bench/history.py's ``_history_left_out``), hence no events, and the deliverer idle: before an
  OFF block the run nudges the deliverer and waits until it caught up. That wait is the ON
  block's, counted in its time (``ratio``): a deliverer that falls behind the polls has that
  much of the ON block's work still to do. ``ratio_catch_up_untimed`` leaves it out (how
  this figure was first measured, with blocks of 2 polls: it then favoured a slower
  deliverer, whose work fell more in the untimed wait).

The ``tick`` mode (no nudge: the only delivery rounds are the tick's, as before the nudge)
runs the same ingestion for the lag "before"; its OFF blocks do not wait for the deliverer, so
its ratio is not a figure. A third run is ``nudged`` with ``RECEIPTS_EVENTS_BATCH_SIZE=1000``:
the deliverer's cost is mostly per batch.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from bench import history
from bench.env import (
    ACCESS_KEY_ID,
    ACCESS_KEY_SECRET,
    BenchDatabase,
    configure_process,
    copy_sessions,
    log,
    make_sessions,
    register,
)
from tests.support.receiver import Receiver
from worker import bounded_http, event_nudge, events, poller
from worker.client import UspeedoClient
from worker.config import get_settings
from worker.db import session_scope
from worker.domain import DEFAULT_EVENT_TYPES
from worker.models import event_cursors_table
from worker.simulator import Simulator
from worker.store import Claim

SECRET = "bench-events-secret-0123456789"  # noqa: S105 - a loopback receiver's
_INSERT = sa.text(
    "INSERT INTO sms_receipt_events (account_id, session_no, phone, phone_key, result, "
    "receipt_code, receipt_desc, receipt_time, cost_count, user_id, source, observed_at, "
    "applied) SELECT 9, :prefix || (g / 5), '8525531' || (g % 5), '8525531' || (g % 5), "
    "'Success', 'DELIVRD', 'delivered', now(), 1, NULL, 'poll', now(), true "
    "FROM generate_series(0, :count - 1) AS g"
)


def run(database: BenchDatabase, *, count: int, batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    del database  # the process is configured for it (bench.env.configure_process)
    out: dict[str, Any] = {"events": count, "batches": {}}
    http = bounded_http.new_session()
    with Receiver(keep_alive=True) as receiver:
        send = events.webhook_sender(http, receiver.url, SECRET, timeout=10)
        for size in batch_sizes:
            with session_scope() as session:
                top = events.last_event_id(session)
                session.execute(sa.delete(event_cursors_table))
                session.execute(
                    sa.insert(event_cursors_table).values(
                        destination="webhook", delivered_id=top, safe_id=top
                    )
                )
                session.execute(_INSERT, {"prefix": f"EVB-{size}-", "count": count})
            before = len(receiver.hits())
            started = time.perf_counter()
            sent = 0
            while sent < count:
                report = events.deliver(
                    session_factory=session_scope,
                    destination="webhook",
                    send=send,
                    now=events_now,
                    types=DEFAULT_EVENT_TYPES,
                    lease=timedelta(minutes=1),
                    batch_size=size,
                    retry_base=timedelta(seconds=1),
                    retry_cap=timedelta(seconds=1),
                    window=timedelta(hours=1),
                    max_batches=10**9,
                )
                if report.failed or not report.delivered:
                    raise RuntimeError(f"event delivery stalled at {sent} of {count}: {report}")
                sent += report.delivered
            elapsed = time.perf_counter() - started
            posts = len(receiver.hits()) - before
            rate = round(count / elapsed)
            log(f"events: {count:,} in batches of {size}: {rate:,} events/s ({posts} POSTs)")
            out["batches"][str(size)] = {"events_per_s": rate, "posts": posts, "seconds": elapsed}
    http.close()
    return out


def events_now() -> Any:
    from worker.clock import database_now

    return database_now()


# --- under ingestion load -----------------------------------------------------------------

LOAD_TICK = 5.0  # the clock's period in this phase (the default RECEIPTS_TICK is 30 s)
# Claims (of 100 sessions) per ON or OFF block: long enough (about 2 s of ON ingestion) that
# each block's last events, delivered after it, are a small part of it; fewer in a run too
# short for ten blocks of that (--quick).
BLOCK_POLLS = 40
WARM_UP_BLOCKS = 2  # the first ON block and the first OFF block are not timed
CATCH_UP_TIMEOUT = 120.0
_PATTERN = (True, False, False, True)  # ON, OFF, OFF, ON, then again


def _deliverer(env: Mapping[str, str], inbox: Any, outbox: Any, tick: float) -> None:
    """The delivery side, in a process of its own: a round (the task's body) at each tick and
    at each message on ``inbox`` (a nudge), another at once while a round says there is more;
    then the arrivals the receiver saw, on ``outbox``."""
    configure_process(env)
    settings = get_settings()
    http = bounded_http.new_session()
    rounds = {"tick": 0, "nudge": 0, "more": 0}
    started = os.times()
    started_cpu = started.user + started.system
    with Receiver(keep_alive=True) as receiver:
        send = events.webhook_sender(http, receiver.url, SECRET, timeout=10)
        outbox.put("ready")
        next_tick = time.monotonic() + tick
        while True:
            try:
                cause = inbox.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                cause = "tick"
                while next_tick <= time.monotonic():
                    next_tick += tick
            if cause == "stop":
                break
            more = True
            while more:
                rounds[cause] += 1
                more = events.deliver(
                    session_factory=session_scope,
                    destination="webhook",
                    send=send,
                    now=events_now,
                    types=settings.event_types,
                    lease=settings.webhook_lease,
                    batch_size=settings.events_batch_size,
                    retry_base=timedelta(seconds=1),
                    retry_cap=timedelta(seconds=1),
                    window=timedelta(hours=1),
                ).more
                cause = "more"
        arrivals = [
            (event["id"], event["occurred_at"], hit.at)
            for hit in receiver.hits()
            if hit.ok
            for event in hit.payload["events"]
        ]
    http.close()
    used = os.times()  # the deliverer's and the receiver's CPU, not PostgreSQL's side
    cpu = used.user + used.system - started_cpu
    outbox.put({"arrivals": arrivals, "rounds": rounds, "cpu_s": cpu})


def _wait_caught_up(timeout: float) -> None:
    """Until the deliverer's cursor reached the last event (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            top = events.last_event_id(session)
            cursor = session.scalar(
                sa.select(event_cursors_table.c.delivered_id).where(
                    event_cursors_table.c.destination == "webhook"
                )
            )
        if (cursor or 0) >= top:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"events under load: the deliverer is at {cursor} of {top}")
        time.sleep(0.005)


def _prepare(
    database: BenchDatabase, sim: Simulator, *, sessions: int, phones: int, prefix: str
) -> tuple[int, list[Claim]]:
    """Due sessions whose final receipts the simulator has, claimed (one tick) in batches of
    100, and the webhook's cursor at the last event: (that event's id, the claims)."""
    database.reset()
    sim.reset()
    specs = make_sessions(sessions, phones=phones, accounts=1, prefix=prefix)
    sent_at = time.time() - 60
    register(sim, specs, sent_at=sent_at)
    copy_sessions(database, specs, sent_at=datetime.fromtimestamp(sent_at, UTC))
    with session_scope() as session:
        top = events.last_event_id(session)
        session.execute(sa.delete(event_cursors_table))
        session.execute(
            sa.insert(event_cursors_table).values(
                destination="webhook", delivered_id=top, safe_id=top
            )
        )
    settings = get_settings()
    claims: list[Claim] = []
    poller.tick(
        session_factory=session_scope,
        clock=lambda: datetime.now(UTC),
        policy=settings.poll_policy(),
        dispatch=claims.append,
        lease=settings.lease,
        tick_every=settings.tick,
    )
    return top, claims


def _ingest(
    claims: list[Claim], *, wait_between: bool, flush: Callable[[], None]
) -> dict[str, float]:
    """Poll every claim, ON and OFF blocks taking turns: seconds and receipts of each side
    (warm-up blocks left out), and the whole run's seconds."""
    settings = get_settings()
    client = UspeedoClient(
        api_url=settings.api_url, access_key_id=ACCESS_KEY_ID, access_key_secret=ACCESS_KEY_SECRET
    )
    rng = random.Random(1)
    out = {
        "on_s": 0.0,
        "off_s": 0.0,
        "catch_up_s": 0.0,
        "on_receipts": 0,
        "off_receipts": 0,
        "ingest_s": 0.0,
    }
    history._warm_up()
    per_block = max(1, min(BLOCK_POLLS, len(claims) // 10))
    started = time.perf_counter()
    try:
        for index, claim in enumerate(claims):
            block = index // per_block
            side = "on" if _PATTERN[block % len(_PATTERN)] else "off"
            if side == "off" and index % per_block == 0 and wait_between:
                # OFF is measured with the deliverer idle; the wait for it is the ON side's
                # cost: the delivery its polls caused that did not overlap them.
                began = time.perf_counter()
                flush()
                _wait_caught_up(CATCH_UP_TIMEOUT)
                if block - 1 >= WARM_UP_BLOCKS and _PATTERN[(block - 1) % len(_PATTERN)]:
                    out["catch_up_s"] += time.perf_counter() - began
            with history._history_left_out() if side == "off" else contextlib.nullcontext():
                began = time.perf_counter()
                report = poller.poll(
                    claim,
                    session_factory=session_scope,
                    client=client,
                    clock=lambda: datetime.now(UTC),
                    policy=settings.poll_policy(),
                    rng=rng,
                    budget=settings.poll_budget,
                    in_flight=settings.poll_in_flight,
                )
                took = time.perf_counter() - began
            if block >= WARM_UP_BLOCKS:
                out[f"{side}_s"] += took
                out[f"{side}_receipts"] += report.receipts_written
    finally:
        client.close()
    out["ingest_s"] = time.perf_counter() - started
    return out


def _lags(arrivals: list[tuple[int, str, float]], *, since: int) -> list[float]:
    """Each event's lag (its first arrival: a retried batch may bring it twice), checked
    against the events the history holds after ``since``: every one, no other."""
    lags: dict[int, float] = {}
    for event_id, occurred_at, arrived in arrivals:
        lag = arrived - datetime.fromisoformat(occurred_at).timestamp()
        lags[event_id] = min(lag, lags.get(event_id, lag))
    with session_scope() as session:
        expected = session.execute(
            sa.text(
                "SELECT (SELECT count(*) FROM sms_receipt_events WHERE id > :top "
                "AND result IN ('Success', 'Fail', 'SubmitFail')) "
                "+ (SELECT count(*) FROM sms_session_events WHERE id > :top)"
            ),
            {"top": since},
        ).scalar_one()
    if len(lags) != expected or min(lags, default=since + 1) <= since:
        raise RuntimeError(f"events under load: {len(lags)} distinct ids arrived of {expected}")
    return list(lags.values())


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def under_load(
    database: BenchDatabase,
    sim: Simulator,
    *,
    sessions: int,
    phones: int,
    mode: str,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """One run of ``sessions`` (``mode``: ``nudged`` or ``tick``, see the module docstring),
    the deliverer sending batches of ``batch_size`` (RECEIPTS_EVENTS_BATCH_SIZE, default 100).
    Needs :func:`bench.env.configure_process` done with the simulator's URL."""
    nudged = mode == "nudged"
    top, claims = _prepare(database, sim, sessions=sessions, phones=phones, prefix=f"el{mode}-")
    context = multiprocessing.get_context("spawn")
    inbox, outbox = context.Queue(), context.Queue()
    env = {k: v for k, v in os.environ.items() if k.startswith("RECEIPTS_")}
    if batch_size is not None:
        env["RECEIPTS_EVENTS_BATCH_SIZE"] = str(batch_size)
    child = context.Process(target=_deliverer, args=(env, inbox, outbox, LOAD_TICK))
    child.start()
    # The nudge's message goes on the deliverer's queue, as apply_async would to the broker.
    nudger = event_nudge.Nudger(lambda: inbox.put("nudge")) if nudged else None
    try:
        if outbox.get(timeout=60) != "ready":
            raise RuntimeError("the deliverer did not start")
        event_nudge.install(nudger)  # OFF writes no history: its commits nudge nothing
        timed = _ingest(claims, wait_between=nudged, flush=lambda: inbox.put("nudge"))
        _wait_caught_up(LOAD_TICK * 2 + CATCH_UP_TIMEOUT)
        inbox.put("stop")
        delivered = outbox.get(timeout=60)
    finally:
        event_nudge.install(None)
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    lags = _lags(delivered["arrivals"], since=top)
    database.reset()
    on = timed["on_receipts"] / (timed["on_s"] + timed["catch_up_s"])
    overlapped = timed["on_receipts"] / timed["on_s"]
    off = timed["off_receipts"] / timed["off_s"]
    out: dict[str, Any] = {
        "mode": mode,
        "batch_size": int(env.get("RECEIPTS_EVENTS_BATCH_SIZE", "100")),
        "tick_s": LOAD_TICK,
        "sessions": sessions,
        "events": len(lags),
        "ingest_s": round(timed["ingest_s"], 2),
        "lag_p50_s": _percentile(lags, 0.50),
        "lag_p99_s": _percentile(lags, 0.99),
        "lag_max_s": _percentile(lags, 1.0),
        "rounds": delivered["rounds"],
        "deliverer_cpu_s": round(delivered["cpu_s"], 2),
        "nudges_sent": nudger.sent if nudger is not None else 0,
        "on_receipts_per_s": round(on),
        "off_receipts_per_s": round(off),
        "ratio": round(on / off, 3),
        "catch_up_s": round(timed["catch_up_s"], 3),
        "ratio_catch_up_untimed": round(overlapped / off, 3),
    }
    log(
        f"events under load ({mode}, batches of {out['batch_size']}): "
        f"on {out['on_receipts_per_s']:,} vs off "
        f"{out['off_receipts_per_s']:,} receipts/s ({out['ratio']}x; "
        f"catch-up {out['catch_up_s']} s, "
        f"{out['ratio_catch_up_untimed']}x without it); {out['events']:,} events, "
        f"lag p50 {out['lag_p50_s']} s, p99 {out['lag_p99_s']} s, max {out['lag_max_s']} s; "
        f"rounds {out['rounds']}, deliverer CPU {out['deliverer_cpu_s']} s"
    )
    return out
