"""The resources one worker process holds: the Uspeedo API client, the webhook HTTP session, the
random source of poll jitter and the clock.

Each is built lazily, once per process, and built again in a child after ``fork()`` (Celery's
prefork pool): pooled connections must never be shared between processes. Celery tasks and the
``receipts repoll`` command take them from here; tests pass their own to the plain functions.
"""

from __future__ import annotations

import os
import random
from datetime import datetime
from typing import Any

import requests

from worker import bounded_http
from worker.client import UspeedoClient
from worker.clock import database_now
from worker.config import Settings, get_settings
from worker.db import session_scope
from worker.workers import Heartbeat, new_worker_id

_heartbeat: Heartbeat | None = None
_client: UspeedoClient | None = None
_client_pid: int | None = None
_http: requests.Session | None = None
_http_pid: int | None = None
# Poll jitter only (not cryptography); one per process is enough.
rng = random.Random()


def utcnow() -> datetime:
    """Now by the database's clock, which every worker shares (see worker/clock.py)."""
    return database_now()


def api_client() -> UspeedoClient:
    """The process's API client (one pooled HTTP session per process, built after fork)."""
    global _client, _client_pid  # noqa: PLW0603 - the per-process singleton
    if _client is None or _client_pid != os.getpid():
        settings = get_settings()
        problem = settings.missing_api_credentials()
        if problem:
            raise RuntimeError(problem)
        _client = UspeedoClient(
            api_url=settings.api_url,
            access_key_id=settings.access_key_id or "",
            access_key_secret=(
                settings.access_key_secret.get_secret_value() if settings.access_key_secret else ""
            ),
            connect_timeout=settings.api_connect_timeout.total_seconds(),
            read_timeout=settings.api_read_timeout.total_seconds(),
            max_attempts=settings.api_max_attempts,
            max_answer_bytes=settings.api_max_answer_bytes,
        )
        _client_pid = os.getpid()
    return _client


def webhook_http() -> requests.Session:
    """The process's HTTP session for webhook deliveries (each POST bounded as a whole)."""
    global _http, _http_pid
    if _http is None or _http_pid != os.getpid():
        _http, _http_pid = bounded_http.new_session(), os.getpid()
    return _http


def reset() -> None:
    """Forget the process's HTTP resources (in a child after fork, or when settings change)."""
    global _client, _client_pid, _http, _http_pid  # noqa: PLW0603
    _client = _client_pid = _http = _http_pid = None


def start_heartbeat(settings: Settings) -> None:
    """Make this process a known worker: its polls name it, and it beats every half tick so
    that its holds are released soon after it dies (see worker/workers.py)."""
    global _heartbeat  # noqa: PLW0603 - the per-process singleton
    _heartbeat = Heartbeat(
        worker_id=new_worker_id(), session_factory=session_scope, clock=utcnow, tick=settings.tick
    )
    _heartbeat.start()


def stop_heartbeat() -> None:
    global _heartbeat  # noqa: PLW0603
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None


def worker_id() -> str | None:
    """This process's worker id while it heartbeats (None elsewhere: its polls then hold their
    sessions for the whole in-flight window)."""
    return _heartbeat.worker_id if _heartbeat is not None else None


def poll_dependencies(settings: Settings) -> dict[str, Any]:
    """What every poll runs with in this process (see :func:`worker.poller.poll`)."""
    return {
        "session_factory": session_scope,
        "client": api_client(),
        "clock": utcnow,
        "policy": settings.poll_policy(),
        "rng": rng,
        "budget": settings.poll_budget,
    }
