"""``receipts receiver``: the HTTP endpoint for Uspeedo's push of status reports.

Routes (nothing else answers but 404):

- ``POST /uspeedo/callback/<RECEIPTS_CALLBACK_TOKEN>[?account_id=N]``: a push body
  (worker/push.py). ``200 {"code": 0, "message": "ok"}`` only once its receipts are committed
  (or parked in the inbox), by this process's one writer together with the pushes that arrived
  meanwhile (worker/push_writer.py); ``503`` with a non-zero code while the database cannot
  take them (every push of a transaction that failed), so that Uspeedo retries; ``404`` for a
  wrong token, as for any other path (compared in constant time); ``400`` for a body that is
  not a push; ``413`` past ``RECEIPTS_RECEIVER_MAX_BODY``. A ``MsgType`` other than 2 is
  answered ok, ignored and counted; malformed items inside a good body are skipped and
  counted, the rest stored.
- ``GET /healthz``: 200 while the database answers, else 503.

Served by uvicorn (an ASGI server; Starlette routes the two paths): production-grade, run as
any number of processes (``--workers``) behind a reverse proxy that terminates TLS. The token
is a secret (the push is not signed): it never appears in a log line, the access log
included, which this module writes itself with the token replaced.

What the processes count (requests by outcome, receipts by fate, push-to-commit latency, the
last push) is added to ``receipts_push_counts`` every second, so that ``receipts exporter``
reports for all of them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import orjson
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import db, push
from worker.config import Settings, get_settings
from worker.db import upsert_insert
from worker.errors import SettingsError
from worker.models import push_counts_table
from worker.push_writer import PushWriter

log = logging.getLogger(__name__)
access_log = logging.getLogger("worker.receiver.access")

CALLBACK_PREFIX: Final = "/uspeedo/callback/"
# Push-to-commit latency buckets, seconds (the target is a p99 under 0.25 s).
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FLUSH_EVERY: Final = 1.0

SessionFactory = Callable[[], AbstractContextManager[Session]]
Clock = Callable[[], datetime]


def _answer(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


OK = 0
NOT_FOUND = _answer(404, 404, "not found")


# --- what the processes count -------------------------------------------------------------


@dataclass
class PushCounts:
    """Counts of this process since its last flush: requests by outcome, receipts by fate,
    commit latency buckets, and the last push's time (unix seconds)."""

    requests: Counter[str] = field(default_factory=Counter)
    receipts: Counter[str] = field(default_factory=Counter)
    latency: Counter[str] = field(default_factory=Counter)
    latency_sum: float = 0.0
    latency_count: int = 0
    last_push: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, outcome: str, receipts: Counter[str], seconds: float | None) -> None:
        with self.lock:
            self.requests[outcome] += 1
            self.receipts.update(receipts)
            if seconds is not None:
                for bucket in LATENCY_BUCKETS:
                    if seconds <= bucket:
                        self.latency[repr(bucket)] += 1
                self.latency["+Inf"] += 1
                self.latency_sum += seconds
                self.latency_count += 1
            self.last_push = max(self.last_push, time.time())

    def take(self) -> list[dict[str, Any]]:
        """The rows to add to ``receipts_push_counts``, and start counting afresh."""
        with self.lock:
            rows = [
                *({"metric": "requests", "label": k, "value": v} for k, v in self.requests.items()),
                *({"metric": "receipts", "label": k, "value": v} for k, v in self.receipts.items()),
                *(
                    {"metric": "latency_bucket", "label": k, "value": v}
                    for k, v in self.latency.items()
                ),
            ]
            if self.latency_count:
                rows.append({"metric": "latency_sum", "label": "", "value": self.latency_sum})
                rows.append({"metric": "latency_count", "label": "", "value": self.latency_count})
            if self.last_push:
                rows.append({"metric": "last_push", "label": "", "value": self.last_push})
            self.requests.clear()
            self.receipts.clear()
            self.latency.clear()
            self.latency_sum = 0.0
            self.latency_count = 0
            self.last_push = 0.0
        return rows

    def put_back(self, rows: Sequence[dict[str, Any]]) -> None:
        """Rows a flush could not write are counted again at the next one."""
        with self.lock:
            for row in rows:
                metric, label, value = row["metric"], row["label"], row["value"]
                if metric == "requests":
                    self.requests[label] += int(value)
                elif metric == "receipts":
                    self.receipts[label] += int(value)
                elif metric == "latency_bucket":
                    self.latency[label] += int(value)
                elif metric == "latency_sum":
                    self.latency_sum += value
                elif metric == "latency_count":
                    self.latency_count += int(value)
                elif metric == "last_push":
                    self.last_push = max(self.last_push, value)


def add_counts(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Add a process's counts to ``receipts_push_counts`` (the last push: the latest wins)."""
    if not rows:
        return
    table = push_counts_table
    statement = upsert_insert(session, table)
    incoming = statement.excluded.value
    # PostgreSQL's greatest() is SQLite's two-argument max().
    later = (
        sa.func.greatest(table.c.value, incoming)
        if session.get_bind().dialect.name == "postgresql"
        else sa.func.max(table.c.value, incoming)
    )
    value = sa.case(
        (statement.excluded.metric == "last_push", later), else_=table.c.value + incoming
    )
    statement = statement.on_conflict_do_update(
        index_elements=["metric", "label"], set_={"value": value}
    )
    # Sorted: two processes flushing at once lock the same rows in the same order.
    session.connection().execute(statement, sorted(rows, key=lambda r: (r["metric"], r["label"])))


class Flusher:
    """Adds this process's counts to the database every second, and once more on stop."""

    def __init__(self, counts: PushCounts, session_factory: SessionFactory) -> None:
        self.counts = counts
        self._session_factory = session_factory
        self._stop = threading.Event()
        # One flush at a time: a flush (a test's, or the last one on stop) returns only once
        # the counts taken by a flush under way are written too.
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="receipts-push-counts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=FLUSH_EVERY + 5)
        self.flush()

    def flush(self) -> None:
        with self._lock:
            rows = self.counts.take()
            if not rows:
                return
            try:
                with self._session_factory() as session:
                    add_counts(session, rows)
            except sa_exc.DBAPIError as exc:
                self.counts.put_back(rows)
                log.warning("could not record the push counts: %s", db.error_text(exc))

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_EVERY):
            self.flush()


# --- the application ----------------------------------------------------------------------


@dataclass(kw_only=True)
class Receiver:
    """The two routes, with what they share: the token, the body limit, the database, the
    clock and this process's counts."""

    token: bytes
    max_body: int
    session_factory: SessionFactory
    clock: Clock
    counts: PushCounts = field(default_factory=PushCounts)
    # Where the writer's transactions come from (None: session_factory).
    writer_session_factory: SessionFactory | None = None
    # This process's one writer: concurrent pushes committed together (worker/push_writer.py).
    writer: PushWriter = field(init=False)

    def __post_init__(self) -> None:
        self.writer = PushWriter(
            session_factory=self.writer_session_factory or self.session_factory,
            clock=self.clock,
        )

    async def callback(self, request: Request) -> Response:
        started = time.monotonic()
        if not hmac.compare_digest(request.path_params["token"].encode(), self.token):
            return NOT_FOUND
        account_id = _account_id(request.query_params.get("account_id"))
        if account_id is False:
            return self.finish("bad_request", started, 400, "account_id must be a positive integer")
        raw = await _read_body(request, self.max_body)
        if raw is None:
            limit = f"a push body is at most {self.max_body} bytes"
            return self.finish("too_large", started, 413, limit)
        try:
            batch = push.parse_push(_decode(raw), received_at=self.clock())
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, NotAPush, bad UTF-8
            message = str(exc) if isinstance(exc, push.NotAPush) else "the body is not JSON"
            return self.finish("bad_request", started, 400, message)
        if batch.msg_type != push.RECEIPT_MSG_TYPE:
            return self.finish("ignored", started, 200, "ok")
        fates: Counter[str] = Counter(skipped=len(batch.skipped))
        if batch.skipped:
            log.warning(
                "a push skipped %d malformed item(s): %s",
                len(batch.skipped),
                "; ".join(batch.skipped[:3]) + ("; ..." if len(batch.skipped) > 3 else ""),
            )
        if batch.receipts:
            # Answered once the writer's transaction holding these receipts committed.
            pending = self.writer.submit(batch.receipts, account_id=account_id or None)
            try:
                stored: Counter[str] = await asyncio.wrap_future(pending)
            except sa_exc.DBAPIError as exc:
                log.warning("a push could not be stored now: %s", db.error_text(exc))
                retry = "the receipts could not be stored now; retry"
                return self.finish("unavailable", started, 503, retry, fates)
            fates.update(stored)
        return self.finish("ok", started, 200, "ok", fates)

    def probe(self) -> None:
        with self.session_factory() as session:
            session.execute(sa.text("SELECT 1"))

    def warm_up(self) -> None:
        """Connect to the database and read its clock before serving: otherwise the first push
        after a (re)start pays for both, several hundred milliseconds, while Uspeedo's retries
        come a second apart. A database that does not answer yet is no reason not to start."""
        try:
            self.probe()
            self.clock()
        except sa_exc.DBAPIError as exc:
            log.warning("the database does not answer yet: %s", db.error_text(exc))

    async def healthz(self, _request: Request) -> Response:
        try:
            await run_in_threadpool(self.probe)
        except sa_exc.DBAPIError as exc:
            return _answer(503, 503, f"the database does not answer: {db.error_text(exc)}")
        return _answer(200, OK, "ok")

    def finish(
        self,
        outcome: str,
        started: float,
        status: int,
        message: str,
        fates: Counter[str] | None = None,
    ) -> Response:
        """The answer, counted: by outcome, with the receipts' fates and (for a commit) the
        push-to-commit latency."""
        committed = outcome == "ok"
        seconds = time.monotonic() - started if committed else None
        self.counts.observe(outcome, fates or Counter(), seconds)
        return _answer(status, OK if status == 200 else status, message)


def create_app(
    settings: Settings | None = None,
    *,
    session_factory: SessionFactory = db.session_scope,
    writer_session_factory: SessionFactory | None = None,
    clock: Clock | None = None,
) -> ASGIApp:
    """The receiver's ASGI application. Refuses settings it cannot serve safely. The pushes
    are written through ``writer_session_factory`` (by default ``session_factory``)."""
    from worker.clock import database_now

    settings = settings or get_settings()
    problem = settings.receiver_problem()
    if problem or settings.callback_token is None:
        raise SettingsError(problem or "RECEIPTS_CALLBACK_TOKEN is not set")
    receiver = Receiver(
        token=settings.callback_token.get_secret_value().encode(),
        max_body=settings.receiver_max_body,
        session_factory=session_factory,
        writer_session_factory=writer_session_factory or session_factory,
        clock=clock or database_now,
    )
    flusher = Flusher(receiver.counts, session_factory)

    async def not_found(_request: Request, _exc: Exception) -> Response:
        return NOT_FOUND

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(receiver.warm_up)
        receiver.writer.start()
        flusher.start()
        try:
            yield
        finally:
            # The pushes handed over are written (and counted) before the last flush.
            await run_in_threadpool(receiver.writer.stop)
            await run_in_threadpool(flusher.stop)

    app = Starlette(
        routes=[
            Route(CALLBACK_PREFIX + "{token}", receiver.callback, methods=["POST"]),
            Route("/healthz", receiver.healthz, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: not_found},
        lifespan=lifespan,
    )
    app.state.receiver = receiver
    app.state.flusher = flusher
    return AccessLog(app)


def process_app() -> ASGIApp:
    """The application of one ``receipts receiver`` process (uvicorn's factory): this process's
    logging configured, then :func:`create_app`. Kept apart from ``create_app`` because logging
    is global to a process: an application built inside another program (a test) must not
    attach filters to that program's handlers."""
    settings = get_settings()
    configure_logging(settings)
    from worker.celery import start_event_nudge

    start_event_nudge(settings)  # pushes' history nudges event delivery
    # A push whose transaction fails is answered 503 and sent again by Uspeedo: the writer's
    # connection need not be pinged before each one.
    return create_app(settings, writer_session_factory=db.retried_scope)


def configure_logging(settings: Settings) -> None:
    """Log to stderr, phones masked and secrets (the token included) redacted, as text or JSON
    lines (RECEIPTS_LOG_FORMAT), in this process (each uvicorn worker process builds its own
    application, and its own logging)."""
    from worker import logs

    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
    logs.setup(root, settings)


def serve(host: str, port: int, *, workers: int) -> None:
    """Run the receiver under uvicorn until interrupted (the ``receipts receiver`` command);
    each of ``workers`` processes builds its application from the settings."""
    import uvicorn

    uvicorn.run(
        "worker.receiver:process_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        # uvicorn's access log would print the token; AccessLog writes one without it.
        access_log=False,
        log_config=None,
        timeout_keep_alive=5,
        server_header=False,
    )


def _account_id(value: str | None) -> int | bool | None:
    """The ``?account_id=`` of a push URL: None when absent, False when malformed."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or not 0 < int(text) < 2**63:
        return False
    return int(text)


def _decode(raw: bytes) -> Any:
    """The push's JSON: orjson (in C) for a well-formed body, the standard library for what
    orjson refuses and it takes (a lone surrogate escaped in a text, NaN, an integer past 64
    bits), so that such a push is answered as before: its odd item skipped, the rest stored."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None past ``limit`` bytes (refused before reading when the client says so
    in Content-Length, else as soon as the stream exceeds it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class AccessLog:
    """ASGI middleware writing one access log line per request with the push URL's token
    replaced (uvicorn's own access log, which would print it, is turned off)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            access_log.info(
                '%s "%s %s" %d %.1fms',
                _client(scope),
                scope.get("method", ""),
                shown_path(scope.get("path", "")),
                status,
                (time.monotonic() - started) * 1000,
            )


def shown_path(path: str) -> str:
    """A request path as it may be logged: the push URL's token replaced."""
    if path.startswith(CALLBACK_PREFIX):
        return CALLBACK_PREFIX + "<token>"
    return path


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"
