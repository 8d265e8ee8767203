"""A webhook receiver on loopback that records every request: escalation and event webhooks
reach it as they would reach a sender's application."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

# The webhook secret the tests configure.
SECRET = "whsec-escalation-test"


def expected_signature(body: bytes, secret: str = SECRET) -> str:
    """The signature computed here, independently of worker.webhooks.sign."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Hit:
    """One request the receiver got, and what it answered."""

    at: float  # unix time the body had arrived
    delivery_id: str | None
    event: str | None
    signature: str | None
    content_type: str | None
    user_agent: str | None  # tells the deliverers of one test apart
    body: bytes
    status: int

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def payload(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Receiver:
    """An escalation webhook receiver on a loopback port, recording every request.

    The port is bound when the receiver is built but only listens after ``listen()``: until
    then a connection is refused, as by a receiver that is down. It answers ``status``, or
    503 to requests arriving before ``up_at`` (unix time) when that is set, and can take
    ``delay`` seconds per request so that concurrent senders overlap.
    """

    def __init__(self, *, listening: bool = True, status: int = 200, delay: float = 0.0) -> None:
        self.status = status
        self.up_at: float | None = None
        self.delay = delay
        self.max_in_flight = 0
        self._in_flight = 0
        self._hits: list[Hit] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(
            ("127.0.0.1", 0), self._handler(), bind_and_activate=False
        )
        self._server.server_bind()
        self._thread: threading.Thread | None = None
        if listening:
            self.listen()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/hooks/escalations"

    def listen(self) -> None:
        self._server.server_activate()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="webhook-receiver",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def hits(self) -> list[Hit]:
        with self._lock:
            return list(self._hits)

    def _record(self, headers: Any, body: bytes) -> int:
        arrived = time.time()
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            status = 503 if self.up_at is not None and arrived < self.up_at else self.status
            hit = Hit(
                at=arrived,
                delivery_id=headers.get("X-Receipts-Delivery"),
                event=headers.get("X-Receipts-Event"),
                signature=headers.get("X-Receipts-Signature"),
                content_type=headers.get("Content-Type"),
                user_agent=headers.get("User-Agent"),
                body=body,
                status=status,
            )
            # Recorded before answering: once the sender has its answer, the hit is visible.
            with self._lock:
                self._hits.append(hit)
            return status
        finally:
            with self._lock:
                self._in_flight -= 1

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = receiver._record(self.headers, body)
                answer = b"thanks" if 200 <= status < 300 else b"receiver unavailable"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass  # keep pytest's output for failures

        return Handler
