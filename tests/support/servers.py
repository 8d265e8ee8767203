"""Private PostgreSQL and Redis servers for the tests that restart, stop or empty a server.

The PostgreSQL on 5432 and the Redis on 6379 are shared with whoever else uses the machine, so a
test that kills or flushes a server does it to one of its own: started here in a temporary folder
on a free port of 127.0.0.1, and stopped and removed when the test ends, however it ends. Every
wait is bounded; a server that does not answer in time is an error, never a hang.

Both are context managers::

    with PrivatePostgres() as pg, PrivateRedis() as broker:
        upgrade(pg.url())
        ...
        pg.restart()        # pg_ctl restart -m fast: every connection breaks
        broker.flushall()   # only this server's keys
        broker.restart()    # same port, data gone (no persistence)
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import psycopg
import redis

POSTGRES_ROOT = Path("/usr/lib/postgresql")
# The port a server is given is free when chosen but may be taken by another process before the
# server binds it; starting again on a new port is the only remedy.
START_ATTEMPTS = 3
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
# PostgreSQL refuses to run as root; as root, its commands run as this (Debian's) account.
POSTGRES_ACCOUNT = "postgres"


class ServerError(RuntimeError):
    """A private server could not be started or stopped in time."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(condition: Callable[[], bool], *, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def postgres_bin(root: Path = POSTGRES_ROOT) -> Path:
    """The ``bin`` folder of the newest PostgreSQL installed (Debian keeps one folder per
    major version under /usr/lib/postgresql), else the folder of ``initdb`` on the PATH."""
    versions: list[tuple[tuple[int, ...], Path]] = []
    for initdb in root.glob("*/bin/initdb"):
        version = initdb.parents[1].name
        with contextlib.suppress(ValueError):
            versions.append((tuple(int(part) for part in version.split(".")), initdb.parent))
    if versions:
        return max(versions)[1]
    found = shutil.which("initdb")
    if found is None:
        raise ServerError(f"no PostgreSQL server binaries (initdb) under {root} or on the PATH")
    return Path(found).resolve().parent


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


class PrivatePostgres:
    """A PostgreSQL cluster of its own: ``initdb`` into a temporary folder, ``pg_ctl`` to start,
    stop and restart it, listening on 127.0.0.1 only (and a socket inside the folder), trust
    authentication, user ``postgres``. Durability is off (``fsync``, ``synchronous_commit``,
    ``full_page_writes``): the data lives as long as the test."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir or postgres_bin()
        self.account = pwd.getpwnam(POSTGRES_ACCOUNT) if os.geteuid() == 0 else None
        self.folder = Path(tempfile.mkdtemp(prefix="receipts-pg-"))
        if self.account is not None:
            os.chown(self.folder, self.account.pw_uid, self.account.pw_gid)
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = 0

    def url(self, database: str = "postgres") -> str:
        if not self.port:
            raise ServerError("the private PostgreSQL has not been started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _command(self, program: str, *args: str) -> list[str]:
        argv = [str(self.bin_dir / program), *args]
        if self.account is None:
            return argv
        runuser = shutil.which("runuser")
        if runuser is not None:
            return [runuser, "-u", self.account.pw_name, "--", *argv]
        su = shutil.which("su")
        if su is None:
            raise ServerError("running as root, but neither runuser nor su is installed")
        return [su, "-s", "/bin/sh", self.account.pw_name, "-c", shlex.join(argv)]

    def _run(self, program: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        # The folder as working directory: the postgres account may not enter the caller's.
        return subprocess.run(
            self._command(program, *args),
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _pg_ctl(self, action: str, *args: str) -> subprocess.CompletedProcess[str]:
        wait = ("-w", "-t", str(int(START_TIMEOUT)))
        return self._run(
            "pg_ctl",
            action,
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            *wait,
            *args,
            timeout=START_TIMEOUT + 15,
        )

    def _initdb(self) -> None:
        result = self._run(
            "initdb",
            *("-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"),
            *("--locale=C", "--no-sync", "--no-instructions"),
            timeout=120,
        )
        if result.returncode != 0:
            raise ServerError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.folder}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "'32MB'",
        }
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# tests/support/servers.py: a private, throw-away test server\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def answers(self) -> bool:
        try:
            with psycopg.connect(self.url(), connect_timeout=2) as connection:
                connection.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def start(self) -> None:
        """Start the server: on a free port the first time, on the same port afterwards."""
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        pinned = bool(self.port)
        failures = []
        for _ in range(START_ATTEMPTS):
            port = self.port if pinned else free_port()
            result = self._pg_ctl("start", "-o", f"-p {port}")
            if result.returncode == 0:
                self.port = port
                return
            failures.append(f"port {port}: {result.stdout}{result.stderr}")
            time.sleep(0.2)
        raise ServerError(
            f"could not start the private PostgreSQL:\n{''.join(failures)}\n{_tail(self.log)}"
        )

    def restart(self) -> None:
        """A fast restart (``pg_ctl restart -m fast``) on the same port: every open connection
        is cut, as when an operator restarts the database under running workers."""
        result = self._pg_ctl("restart", "-m", "fast", "-o", f"-p {self.port}")
        if result.returncode != 0:
            raise ServerError(
                f"pg_ctl restart failed:\n{result.stdout}{result.stderr}\n{_tail(self.log)}"
            )

    def _postmaster(self) -> int | None:
        """The postmaster's pid while it lives (its pid file outlives a killed server)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def running(self) -> bool:
        return self._postmaster() is not None

    def stop(self) -> None:
        """Stop the server: fast, else immediate, else SIGKILL of the postmaster."""
        for mode in ("fast", "immediate"):
            if not self.running():
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._pg_ctl("stop", "-m", mode)
        pid = self._postmaster()
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            if not wait_until(lambda: not self.running(), timeout=STOP_TIMEOUT):
                raise ServerError(f"the private PostgreSQL (pid {pid}) would not stop")

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class PrivateRedis:
    """A ``redis-server`` of its own on a free port of 127.0.0.1, with no persistence: a restart
    comes back empty, on the same port, so that clients reconnect to it."""

    def __init__(self, binary: str | None = None) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise ServerError("no redis-server binary on the PATH")
        self.binary = found
        self.folder = Path(tempfile.mkdtemp(prefix="receipts-redis-"))
        self.log = self.folder / "redis.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        if not self.port:
            raise ServerError("the private Redis has not been started")
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis.from_url(self.url(db), socket_connect_timeout=1, socket_timeout=5)

    def answers(self) -> bool:
        client = redis.Redis.from_url(self.url(), socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                self.binary,
                *("--bind", "127.0.0.1", "--port", str(port)),
                *("--save", "", "--appendonly", "no"),
                *("--dir", str(self.folder), "--logfile", str(self.log)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _settled(self, process: subprocess.Popen[bytes]) -> bool:
        """Answering, or exited (e.g. its port was taken)."""
        return process.poll() is not None or self.answers()

    def start(self) -> None:
        """Start the server: on a free port the first time, on the same port afterwards."""
        pinned = bool(self.port)
        for _ in range(START_ATTEMPTS):
            self.port = self.port if pinned else free_port()
            process = self._spawn(self.port)
            up = wait_until(functools.partial(self._settled, process), timeout=START_TIMEOUT)
            if up and process.poll() is None:
                self.process = process
                return
            process.kill()
            process.wait(10)
            time.sleep(0.2)
        raise ServerError(f"could not start a private redis-server:\n{_tail(self.log)}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()  # Redis exits at once; with no persistence it writes nothing
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def restart(self) -> None:
        """Stop and start again on the same port, every key gone."""
        self.stop()
        self.start()

    def flushall(self) -> None:
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PrivateRedis:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
