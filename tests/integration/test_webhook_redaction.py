"""A webhook URL's path is its secret (Slack-style: ``/services/T…/B…/<token>``): a failed
delivery records and logs what went wrong without it, on PostgreSQL and SQLite."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import sqlalchemy as sa

from worker import db, webhooks
from worker.models import outbox_table

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
TOKEN = "XXXXSECRETxxxx5678"
PATH = f"/services/T000/B000/{TOKEN}"


def _queue_one() -> None:
    with db.session_scope() as session:
        session.execute(
            sa.insert(outbox_table).values(
                delivery_id="escalation-1-S1",
                event="session.escalated",
                account_id=1,
                session_no="S1",
                payload={"session_no": "S1"},
                attempts=0,
                next_attempt_at=NOW,
                created_at=NOW,
            )
        )


def _last_error() -> str:
    with db.session_scope() as session:
        return str(session.execute(sa.select(outbox_table.c.last_error)).scalar_one())


def _deliver(url: str) -> webhooks.DeliveryReport:
    with requests.Session() as http:
        return webhooks.deliver_due(
            session_factory=db.session_scope,
            http=http,
            url=url,
            secret=None,
            now=lambda: NOW,
            lease=timedelta(minutes=1),
            retry_base=timedelta(minutes=1),
            retry_cap=timedelta(minutes=15),
            timeout=5,
        )


class _EchoingNotFound(BaseHTTPRequestHandler):
    """A proxy's error page that names the path it could not route."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = f"Cannot POST {self.path} (no route to http://hooks.internal{self.path})".encode()
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@contextmanager
def _echoing_receiver() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingNotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _refused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again: connecting is refused


@contextmanager
def _receiver(kind: str) -> Iterator[str]:
    if kind == "refused":
        yield f"http://127.0.0.1:{_refused_port()}"
    else:
        with _echoing_receiver() as base:
            yield base


@pytest.mark.usefixtures("database")
@pytest.mark.parametrize("receiver", ["refused", "echoing 404"])
def test_a_failed_delivery_keeps_the_webhook_token_out_of_the_outbox_and_the_log(
    receiver: str, caplog: pytest.LogCaptureFixture
) -> None:
    _queue_one()
    with (
        caplog.at_level(logging.WARNING, logger="worker.webhooks"),
        _receiver(receiver) as base,
    ):
        url = f"{base}{PATH}?token={TOKEN}"
        assert _deliver(url) == webhooks.DeliveryReport(delivered=0, failed=1)
    error = _last_error()
    assert TOKEN not in error
    assert TOKEN not in caplog.text
    # Still says what happened and where.
    assert "127.0.0.1" in error or "HTTP 404" in error
    assert ("ConnectionError" if receiver == "refused" else "HTTP 404") in error
    assert "webhook escalation-1-S1 failed" in caplog.text
