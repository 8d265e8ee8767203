"""HTTP servers on loopback that answer badly on purpose: slowly (a byte at a time, each byte
well inside any read timeout, the whole answer far beyond it) or hugely (hundreds of megabytes
as fast as the socket takes them). Written on raw sockets so that nothing buffers the trickle.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

# One receipt as the API spells it; a huge answer repeats it.
RECEIPT = (
    b'{"Phone":"(852)55311111","CostCount":1,"ReceiptResult":"Success",'
    b'"ReceiptCode":"DELIVRD","ReceiptDesc":"delivered","ReceiptTime":1700000000,"UserId":""}'
)
EMPTY_ANSWER = b'{"RetCode":0,"Action":"GetUSMSSendReceiptResponse","Data":[]}'


def receipts_answer(size: int) -> tuple[int, Callable[[], Iterator[bytes]]]:
    """A valid receipt answer of about ``size`` bytes (one session, many receipts): its exact
    length and a generator of its bytes, so that the server never holds it whole."""
    head = b'{"RetCode":0,"Action":"GetUSMSSendReceiptResponse","Data":[{"SessionNo":"s1",'
    head += b'"ReceiptSet":['
    tail = b"]}]}"
    count = max(1, (size - len(head) - len(tail)) // (len(RECEIPT) + 1))
    length = len(head) + count * len(RECEIPT) + (count - 1) + len(tail)

    def chunks() -> Iterator[bytes]:
        yield head
        block = b",".join([RECEIPT] * 256)
        left = count
        while left >= 256:
            yield block
            left -= 256
            if left:
                yield b","
        if left:
            yield b",".join([RECEIPT] * left)
        yield tail

    return length, chunks


@dataclass(slots=True)
class Exchange:
    """One request the server got: when, what it asked, and how its answer ended."""

    started: float  # monotonic, once the whole request had arrived
    delivery_id: str | None
    ended: float | None = None  # monotonic, once the answer was sent or the client left
    completed: bool = False  # the whole answer was written


class SlowServer:
    """Answers every request with ``status`` and ``body``.

    ``trickle`` spreads the answer over ``over`` seconds, a byte at a time: ``"status"`` from
    its very first byte (the status line never arrives in time), ``"body"`` after the headers.
    ``stream`` (a length and a chunk generator) serves a body of any size at full speed;
    ``undeclared`` leaves its length out, so the body simply runs until the connection closes.
    ``first`` (a status and a body), when given, answers the first request instead, at once:
    a warm-up that leaves the next request alone to measure.
    """

    def __init__(
        self,
        *,
        status: int = 200,
        body: bytes = EMPTY_ANSWER,
        trickle: str | None = None,
        over: float = 0.0,
        stream: tuple[int, Callable[[], Iterator[bytes]]] | None = None,
        content_type: str = "application/json",
        first: tuple[int, bytes] | None = None,
        undeclared: bool = False,
    ) -> None:
        if trickle not in (None, "status", "body"):
            raise ValueError(f"unknown trickle {trickle!r}")
        self.status = status
        self.body = body
        self.trickle = trickle
        self.over = over
        self.stream = stream
        self.content_type = content_type
        self._first = first
        self.undeclared = undeclared
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []
        self._in_flight: dict[str | None, int] = {}
        self.max_in_flight = 0  # most requests answered at once
        self.max_in_flight_per_delivery = 0  # most answers at once to one webhook delivery
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/api"

    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return list(self._exchanges)

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> SlowServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _head(self, length: int | None, status: int | None = None) -> bytes:
        declared = "" if length is None else f"Content-Length: {length}\r\n"
        return (
            f"HTTP/1.1 {status or self.status} Whatever\r\nContent-Type: {self.content_type}\r\n"
            f"{declared}Connection: close\r\n\r\n"
        ).encode()

    def _answer(self, connection: socket.socket, *, first: bool) -> None:
        if first and self._first is not None:
            status, body = self._first
            connection.sendall(self._head(len(body), status) + body)
            return
        if self.stream is not None:
            length, chunks = self.stream
            connection.sendall(self._head(None if self.undeclared else length))
            for chunk in chunks():
                connection.sendall(chunk)
            return
        head, body = self._head(len(self.body)), self.body
        if self.trickle is None:
            connection.sendall(head + body)
            return
        slow = head + body if self.trickle == "status" else body
        if self.trickle == "body":
            connection.sendall(head)
        pause = self.over / len(slow)
        for i in range(len(slow)):
            connection.sendall(slow[i : i + 1])
            time.sleep(pause)

    def _serve(self, connection: socket.socket) -> None:
        request = _read_request(connection)
        if request is None:
            return
        delivery_id = request.get("x-receipts-delivery")
        exchange = Exchange(started=time.monotonic(), delivery_id=delivery_id)
        key = exchange.delivery_id
        with self._lock:
            first = not self._exchanges
            self._exchanges.append(exchange)
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
            self.max_in_flight = max(self.max_in_flight, sum(self._in_flight.values()))
            if key is not None:
                self.max_in_flight_per_delivery = max(
                    self.max_in_flight_per_delivery, self._in_flight[key]
                )
        try:
            self._answer(connection, first=first)
            exchange.completed = True
        except OSError:
            pass  # the client gave up: what the tests are about
        finally:
            with self._lock:
                exchange.ended = time.monotonic()
                self._in_flight[key] -= 1

    def _handler(self) -> type[socketserver.BaseRequestHandler]:
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(30)
                server._serve(self.request)

        return Handler


def _read_request(connection: socket.socket) -> dict[str, str] | None:
    """Read one request (headers and a Content-Length body); its headers, lowercase names."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    left = int(headers.get("content-length", "0")) - len(body)
    while left > 0:
        chunk = connection.recv(min(left, 65536))
        if not chunk:
            return None
        left -= len(chunk)
    return headers
