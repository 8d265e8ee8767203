"""A webhook receiver on loopback that records every request: escalation and event webhooks
reach it as they would reach a sender's application."""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

# A ``status`` that answers nothing: the receiver dies mid-request, after reading the body.
DIE = 0

# The webhook secret the tests configure.
SECRET = "whsec-escalation-test"


def expected_signature(body: bytes, timestamp: int, secret: str = SECRET) -> str:
    """The signature computed here, independently of worker.signing.webhook_signature."""
    signed = f"{timestamp}.".encode() + body
    return f"t={timestamp},v1={hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()}"


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
    def signed_at(self) -> int | None:
        """The signature's ``t`` (None when unsigned or when it has none)."""
        for field in (self.signature or "").split(","):
            key, _, value = field.partition("=")
            if key == "t" and value.isdigit():
                return int(value)
        return None

    def signed(self, secret: str = SECRET) -> bool:
        """Whether the signature is ours for this body, at the ``t`` it names."""
        at = self.signed_at
        return at is not None and self.signature == expected_signature(self.body, at, secret)

    @property
    def payload(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Receiver:
    """An escalation webhook receiver on a loopback port, recording every request.

    The port is bound when the receiver is built but only listens after ``listen()``: until
    then a connection is refused, as by a receiver that is down. It answers ``status``, or
    503 to requests arriving before ``up_at`` (unix time) when that is set, and can take
    ``delay`` seconds per request so that concurrent senders overlap. With ``location`` every
    answer carries that Location header (a redirect, with a 3xx ``status``); with ``tls`` it
    speaks HTTPS with that server context. ``port`` binds a given port (a receiver restarted
    where the previous one listened). With ``keep_alive`` it speaks HTTP/1.1 and keeps each
    connection open for the next request, as a production server does (the benchmarks);
    without, each request has its connection, closed once answered, so that a receiver
    closed or killed is gone for its senders at once (the tests).
    """

    def __init__(
        self,
        *,
        listening: bool = True,
        status: int = 200,
        delay: float = 0.0,
        location: str | None = None,
        tls: ssl.SSLContext | None = None,
        port: int = 0,
        keep_alive: bool = False,
    ) -> None:
        self.status = status
        self._keep_alive = keep_alive
        # Sent as the Location header of every answer (with a 3xx status: a redirect).
        self.location = location
        self._scheme = "https" if tls is not None else "http"
        self.up_at: float | None = None
        self.delay = delay
        self.max_in_flight = 0
        self._in_flight = 0
        self._hits: list[Hit] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(
            ("127.0.0.1", port), self._handler(), bind_and_activate=False
        )
        self._server.server_bind()
        if tls is not None:
            # Each accepted connection shakes hands first: a client that refuses the
            # certificate never gets to send its request (and no hit is recorded).
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._thread: threading.Thread | None = None
        if listening:
            self.listen()

    @property
    def url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self._server.server_port}/hooks/escalations"

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
            protocol_version = "HTTP/1.1" if receiver._keep_alive else "HTTP/1.0"
            # The headers and the body are two writes: on a kept-alive connection, Nagle's
            # algorithm holds the body for the client's delayed ACK (40 ms an answer).
            disable_nagle_algorithm = receiver._keep_alive

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = receiver._record(self.headers, body)
                if status == DIE:
                    # Killed after reading the body: the sender gets no answer at all.
                    self.close_connection = True
                    return
                answer = b"thanks" if 200 <= status < 300 else b"receiver unavailable"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                if receiver.location is not None:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass  # keep pytest's output for failures

        return Handler
