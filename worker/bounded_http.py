"""HTTP attempts bounded as a whole, and answers bounded in size.

``requests``' timeouts bound each socket operation, not the exchange: a peer that sends one
byte well inside the read timeout, again and again, keeps a call alive for as long as it
likes (one attempt was measured running 21 s on a 2 s read timeout), and a peer that sends
200 MB has them all read into memory. An attempt made through :func:`post` ends by its
deadline whatever the peer does, and reads no more of the answer than its cap:

- its socket timeouts are never longer than the time the attempt has;
- the answer is streamed and counted against the cap, the deadline checked between chunks;
- a watchdog (one thread per process) shuts the attempt's socket down when the deadline
  passes, which ends any read or write blocked on it (a trickled status line or body
  included).

The watchdog needs the attempt's connection, which ``requests`` keeps to itself: sessions from
:func:`new_session` (or mounting :class:`BoundedAdapter`) use connection classes that enrol
themselves with the attempt running in their thread. Through any other session an attempt is
still bounded between reads, but a peer trickling its headers can outlast the deadline.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import requests
from requests.adapters import HTTPAdapter
from urllib3 import ProxyManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.response import HTTPResponse

# Big enough to read a legitimate answer in few round trips, small enough that the deadline
# is checked often while a slow peer sends it.
CHUNK_BYTES: Final = 64 * 1024


class AttemptTimedOut(requests.Timeout):
    """The attempt as a whole (connection, request and answer) outlasted its bound."""


class BodyTooLarge(requests.RequestException):
    """The answer's body is longer than the cap (what was read of it is dropped)."""

    def __init__(self, limit: int, status: int, headers: Mapping[str, str]) -> None:
        super().__init__(f"answer larger than {limit} bytes")
        self.limit = limit
        self.status = status
        self.headers = headers


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer read within its attempt's bounds."""

    status: int
    headers: Mapping[str, str]  # case-insensitive, as requests gives them
    body: bytes
    # False when only the first bytes of the body were read (an excerpt, see :func:`post`).
    complete: bool = True


def post(
    session: requests.Session,
    url: str,
    *,
    data: bytes,
    headers: Mapping[str, str],
    within: float,
    connect_timeout: float,
    read_timeout: float,
    limit: int,
    excerpt: bool = False,
    monotonic: Callable[[], float] = time.monotonic,
) -> Answer:
    """POST ``data`` once, ending within ``within`` seconds whatever the peer does.

    The body must arrive whole within the bound and within ``limit`` bytes, or the attempt
    raises :class:`AttemptTimedOut` or :class:`BodyTooLarge`. With ``excerpt`` the body is only
    wanted for what it says first: at most ``limit`` bytes of it are read, for as long as the
    bound allows, and returned as they are (``complete`` False when there was more, or it
    stopped coming). Transport failures raise what ``requests`` raises; redirects are not
    followed.
    """
    if within <= 0:
        raise AttemptTimedOut("no time was left for the attempt")
    ends_at = monotonic() + within
    watch = _Watch()
    enrolled = _attempt.set(watch)
    _watchdog().expire_at(time.monotonic() + within, watch)
    try:
        try:
            response = session.post(
                url,
                data=data,
                headers=dict(headers),
                timeout=(min(connect_timeout, within), min(read_timeout, within)),
                allow_redirects=False,
                stream=True,
            )
        except requests.RequestException as exc:
            if watch.expired or monotonic() >= ends_at:
                raise AttemptTimedOut(_late(within)) from exc
            raise
        if watch.expired:
            # Cut while the headers were read: they may end early, so nothing of them counts.
            response.close()
            raise AttemptTimedOut(_late(within))
        try:
            return _read(response, ends_at, within, limit, excerpt, watch, monotonic)
        finally:
            # A body read to its end gives the connection back to the pool; anything else
            # closes it (no unread answer may be left on a connection that is used again).
            response.close()
    finally:
        watch.close()  # the watchdog's later expire() of a closed watch does nothing
        _attempt.reset(enrolled)


def _read(
    response: requests.Response,
    ends_at: float,
    within: float,
    limit: int,
    excerpt: bool,
    watch: _Watch,
    monotonic: Callable[[], float],
) -> Answer:
    status, headers = response.status_code, response.headers
    declared = headers.get("Content-Length", "")
    if not excerpt and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit, status, headers)
    chunks: list[bytes] = []
    size = 0
    complete = True
    try:
        for chunk in response.iter_content(CHUNK_BYTES):
            if size + len(chunk) > limit:
                if not excerpt:
                    raise BodyTooLarge(limit, status, headers)
                chunks.append(chunk[: limit - size])
                complete = False
                break
            chunks.append(chunk)
            size += len(chunk)
            if monotonic() >= ends_at:
                if not excerpt:
                    raise AttemptTimedOut(_late(within))
                complete = False
                break
    except (requests.RequestException, OSError) as exc:
        if isinstance(exc, BodyTooLarge | AttemptTimedOut):
            raise
        if excerpt:
            complete = False
        elif watch.expired or monotonic() >= ends_at:
            raise AttemptTimedOut(_late(within)) from exc
        else:
            raise
    if watch.expired and not excerpt:
        # The watchdog's cut can look like the end of a body of unknown length.
        raise AttemptTimedOut(_late(within))
    return Answer(status=status, headers=headers, body=b"".join(chunks), complete=complete)


def _late(within: float) -> str:
    return f"no whole answer within {within:.3g}s"


# --- the watchdog -------------------------------------------------------------------------


class _Watch:
    """What one attempt reads and writes through, shut down when its deadline passes: its
    connection (whose socket appears once connected) and the socket its answer is read from
    (which the connection forgets when the answer says ``Connection: close``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: list[HTTPConnection] = []
        self._sockets: list[socket.socket] = []
        self._open = True
        self.expired = False

    def enrol(self, connection: HTTPConnection) -> None:
        with self._lock:
            if not self._open:
                return
            if connection not in self._connections:
                self._connections.append(connection)
            if self.expired:
                _shut(connection.sock)
            elif connection.sock is not None and connection.sock not in self._sockets:
                self._sockets.append(connection.sock)

    def expire(self) -> None:
        # Under the lock: once the attempt is over (close), its connection may be serving the
        # next attempt and must not be touched.
        with self._lock:
            if not self._open:
                return
            self.expired = True
            for connection in self._connections:
                _shut(connection.sock)
            for sock in self._sockets:
                _shut(sock)

    def close(self) -> None:
        with self._lock:
            self._open = False
            self._connections.clear()
            self._sockets.clear()


class _Watchdog:
    """One thread per process that expires each attempt's watch at its deadline: a thread per
    attempt (a ``threading.Timer``) cost a thread's start and end on every POST, a good part
    of an event batch's CPU. An attempt that ended closes its watch and leaves its entry to
    pass its deadline unheeded: at most the attempts of the last longest bound are held."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, _Watch]] = []
        self._order = itertools.count()  # ties of deadlines never compare the watches
        threading.Thread(target=self._run, name="http-watchdog", daemon=True).start()

    def expire_at(self, deadline: float, watch: _Watch) -> None:
        with self._cond:
            heapq.heappush(self._due, (deadline, next(self._order), watch))
            if self._due[0][2] is watch:
                self._cond.notify()  # sooner than what the thread waits for

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._cond.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, _, watch = heapq.heappop(self._due)
            watch.expire()


class _ThisProcess:
    watchdog: _Watchdog | None = None
    lock = threading.Lock()


def _watchdog() -> _Watchdog:
    """This process's watchdog, started by its first attempt."""
    if _ThisProcess.watchdog is None:
        with _ThisProcess.lock:
            if _ThisProcess.watchdog is None:
                _ThisProcess.watchdog = _Watchdog()
    return _ThisProcess.watchdog


def _forget_watchdog() -> None:
    # A forked child (a Celery pool process) has none of its parent's threads, and maybe a
    # lock its parent held: it starts its own watchdog.
    _ThisProcess.watchdog, _ThisProcess.lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_watchdog)


_attempt: ContextVar[_Watch | None] = ContextVar("bounded_http_attempt", default=None)


def _shut(sock: socket.socket | None) -> None:
    if sock is not None:
        # socket.socket's own shutdown, also for a TLS socket: it only needs the descriptor,
        # and ends a read or write blocked on it in another thread at once.
        with suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _enrol(connection: HTTPConnection) -> None:
    watch = _attempt.get()
    if watch is not None:
        watch.enrol(connection)


# Enrolled when connecting, when sending on a kept-alive connection (which does not connect
# again), and when the answer is about to be read (the socket then exists).


class _Watched(HTTPConnection):
    """The enrolment points of both connection classes (HTTPS derives from HTTP in urllib3)."""

    def connect(self) -> None:
        _enrol(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _enrol(self)
        super().request(*args, **kwargs)

    # urllib3's own override returns its HTTPResponse, not http.client's (and says so the same way).
    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        _enrol(self)
        return super().getresponse()


class _WatchedHTTPConnection(_Watched):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS: Final = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class BoundedAdapter(HTTPAdapter):
    """An adapter whose connections the watchdog of :func:`post` can shut down (HTTP and
    HTTPS, directly or through an HTTP proxy; a SOCKS proxy keeps its own connections)."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if type(manager) is ProxyManager:
            manager.pool_classes_by_scheme = dict(_POOLS)
        return manager


def new_session(*, pool_maxsize: int = 10) -> requests.Session:
    """A session whose attempts :func:`post` bounds as a whole. It retries nothing itself:
    callers that retry re-sign or re-decide each attempt."""
    session = requests.Session()
    adapter = BoundedAdapter(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session
