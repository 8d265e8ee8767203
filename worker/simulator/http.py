"""The simulator over real HTTP: a threading server with kept-alive connections, and ``serve``.

:class:`Simulator` binds a port and serves a :class:`FakeUspeedo` on it; its control methods are
the service's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from worker.simulator.pusher import DEFAULT_BATCH, Pusher
from worker.simulator.service import FakeUspeedo
from worker.simulator.wire import Reply, json_reply

MAX_BODY_BYTES = 8 * 1024 * 1024
# Shutdown latency of the serve loop; the default 0.5 s would dominate a short test.
_POLL_INTERVAL = 0.05


class _Server(ThreadingHTTPServer):
    # Benchmarks open many connections at once; the default backlog of 5 drops them.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], service: FakeUspeedo, pusher: Pusher) -> None:
        self.service = service
        self.pusher = pusher
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS round trip we do not need.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        """End kept-alive connections, whose threads would otherwise keep serving after stop."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the peer
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping connections (timeouts, stop()) are routine, not worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive: a new TCP connection per call would cap throughput well below what we need.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the second waits for the client's
    # delayed ACK, adding ~40 ms to every kept-alive call.
    disable_nagle_algorithm = True
    server_version = "UspeedoSimulator/1.0"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def version_string(self) -> str:
        return self.server_version

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The Date header by the service's clock, the one X-Timestamp is judged by: clients
        (``receipts check``) measure their clock's offset from it, and a test that moves the
        simulator's clock moves its Date too."""
        return formatdate(
            self.server.service.now() if timestamp is None else timestamp, usegmt=True
        )

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: one stderr line per request would drown test and benchmark output."""

    def do_POST(self) -> None:
        raw = self._read_body()
        if raw is None:
            return
        path = self.path.split("?", 1)[0]
        service = self.server.service
        if path == "/api":
            # Header names are case-insensitive; lowercase them once for plain dict lookups.
            headers = {name.lower(): value for name, value in self.headers.items()}
            content_type = headers.get("content-type", "")
            self._send(service.handle_api(content_type, headers, raw))
        else:
            self._send(_control(self.server, "POST", path, raw, self.client_address[0]))

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/api":
            self._send(json_reply(405, {"error": "the API takes POST"}))
            return
        self._send(_control(self.server, "GET", path, b"", self.client_address[0]))

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send(json_reply(411, {"error": "send a Content-Length"}))
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            # The unread body would be taken for the next request: drop the connection instead.
            self.close_connection = True
            self._send(json_reply(413, {"error": "bad or oversized Content-Length"}))
            return None
        return self.rfile.read(length) if length else b""

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)


# --- control endpoints: each calls one public method of the service or the pusher

_ControlAction = Callable[[_Server, bytes], Any]


def _register(server: _Server, raw: bytes) -> dict[str, Any]:
    sessions = _control_body(raw).get("sessions")
    if not isinstance(sessions, list):
        raise ValueError('body must be {"sessions": [...]}')
    server.service.register(sessions)
    return {"registered": len(sessions)}


def _set_faults(server: _Server, raw: bytes) -> dict[str, Any]:
    server.service.set_faults(**_control_body(raw))
    return {"faults": server.service.faults()}


def _set_push(server: _Server, raw: bytes) -> dict[str, Any]:
    return {"push": server.pusher.configure(**_control_body(raw)).to_dict()}


def _pushes(server: _Server, _raw: bytes) -> dict[str, Any]:
    return {"push": server.pusher.config().to_dict(), "reports": server.pusher.fates()}


def _reset(server: _Server, _raw: bytes) -> dict[str, Any]:
    server.service.reset()
    server.pusher.reset()
    return {"reset": True}


_CONTROL_ROUTES: dict[str, tuple[str, _ControlAction]] = {
    "/_sim/sessions": ("POST", _register),
    "/_sim/faults": ("POST", _set_faults),
    "/_sim/push": ("POST", _set_push),
    "/_sim/pushes": ("GET", _pushes),
    "/_sim/calls": ("GET", lambda server, _: {"calls": server.service.calls()}),
    "/_sim/truth": ("GET", lambda server, _: server.service.truth()),
    "/_sim/reset": ("POST", _reset),
}


def _control(server: _Server, method: str, path: str, raw: bytes, client_host: str) -> Reply:
    if not _is_loopback(client_host):
        return json_reply(403, {"error": "control endpoints answer loopback clients only"})
    route = _CONTROL_ROUTES.get(path)
    if route is None:
        return json_reply(404, {"error": f"no such path: {path}"})
    allowed, action = route
    if method != allowed:
        return json_reply(405, {"error": f"{path} takes {allowed}"})
    try:
        return json_reply(200, action(server, raw))
    except ValueError as exc:
        return json_reply(400, {"error": str(exc)})


def _control_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


# --- the simulator a test or the CLI runs


class Simulator:
    """The fake Uspeedo API on loopback HTTP.

    It binds its port when built, so ``url`` is known before ``start``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        access_key_id: str = "demo",
        # A well-known demo credential for a loopback fake, not a secret.
        access_key_secret: str = "demo-secret",  # noqa: S107
        step: float = 1.0,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Its own RNG (seeded apart), so that losses drawn leave the service's draws as they were.
        self.pusher = Pusher(clock=clock, seed=None if seed is None else seed + 1)
        self.service = FakeUspeedo(
            access_key_id=access_key_id,
            access_key_secret=access_key_secret,
            step=step,
            seed=seed,
            clock=clock,
            on_session=self.pusher.add,
        )
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), self.service, self.pusher)
        self._thread: threading.Thread | None = None
        self._serving = False
        self._stopped = False

    # lifecycle

    @property
    def url(self) -> str:
        host, port = self._server.server_name, self._server.server_port
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/api"

    def start(self) -> Simulator:
        if self._thread is not None or self._stopped:
            raise RuntimeError("a Simulator can be started once")
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name="uspeedo-simulator",
            daemon=True,
        )
        self._thread.start()
        self.pusher.start()
        return self

    def serve_forever(self) -> None:
        self._serving = True
        self.pusher.start()
        try:
            self._server.serve_forever(poll_interval=_POLL_INTERVAL)
        finally:
            self._serving = False

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.pusher.stop()
        # shutdown() waits for a running serve loop and would wait forever without one.
        if self._thread is not None or self._serving:
            self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # control, in process: the service's own methods

    def register(self, sessions: Iterable[Mapping[str, Any]]) -> None:
        self.service.register(sessions)

    def set_faults(self, **faults: float) -> None:
        self.service.set_faults(**faults)

    def calls(self) -> list[dict[str, Any]]:
        return self.service.calls()

    def truth(self) -> dict[str, Any]:
        return self.service.truth()

    def configure_push(self, **changes: Any) -> dict[str, Any]:
        """Change the push settings (``url``, ``enabled``, ``loss``, ``batch``)."""
        return self.pusher.configure(**changes).to_dict()

    def pushes(self) -> list[dict[str, Any]]:
        """Every report's fate so far: ``delivered`` (``t``: when its push was sent,
        ``answered``: when the receiver answered ok), ``lost``, ``dropped`` or ``off``."""
        return self.pusher.fates()

    def reset(self) -> None:
        self.service.reset()
        self.pusher.reset()


def serve(
    host: str,
    port: int,
    *,
    access_key_id: str,
    access_key_secret: str,
    step: float,
    seed: int | None,
    push_url: str | None = None,
    push_loss: float = 0.0,
    push_batch: int = DEFAULT_BATCH,
) -> None:
    """Run the simulator in the foreground until interrupted (the ``receipts simulate`` command);
    with ``push_url``, it pushes every report there as Uspeedo's Callback API does."""
    simulator = Simulator(
        host=host,
        port=port,
        access_key_id=access_key_id,
        access_key_secret=access_key_secret,
        step=step,
        seed=seed,
    )
    pushing = ""
    if push_url is not None:
        simulator.configure_push(url=push_url, enabled=True, loss=push_loss, batch=push_batch)
        pushing = f", pushing to {push_url} with {push_loss:.0%} of reports lost"
    print(
        f"Uspeedo simulator on {simulator.url} (key id {access_key_id}, scenario step {step:g}s"
        f"{pushing})",
        flush=True,
    )
    try:
        simulator.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        simulator.stop()
