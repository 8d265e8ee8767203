"""Real worker and beat processes, started as an operator would: for the end-to-end tests and
for the benchmark (bench/worker_run.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


class Processes:
    """Subprocesses of ``python -m worker.cli ...`` sharing one environment and log folder."""

    def __init__(self, env: Mapping[str, str], folder: Path, *, inherit: bool = True) -> None:
        # The processes import the code under test, installed or not.
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        # Without ``inherit``, none of this process's RECEIPTS_* settings leak into theirs.
        base = {k: v for k, v in os.environ.items() if inherit or not k.startswith("RECEIPTS_")}
        self.env = {**base, **env, "PYTHONPATH": path}
        self.folder = folder
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, *args: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``receipts <args>`` as ``name``; ``env`` adds to the group's environment."""
        with (self.folder / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", *args],
                env={**self.env, **(env or {})},
                cwd=self.folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so that a kill reaches the pool children too
            )
        self.running.append((name, process))
        return process

    def worker(
        self, name: str = "worker", concurrency: int = 2, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self.start(
            name, "worker", "--concurrency", str(concurrency), "--hostname", f"{name}@%h", env=env
        )

    def beat(
        self, name: str = "beat", env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self.start(
            name, "beat", "--schedule", str(self.folder / f"{name}-schedule"), env=env
        )

    def receiver(
        self, name: str = "receiver", port: int = 8720, workers: int = 1
    ) -> subprocess.Popen[bytes]:
        """``receipts receiver`` on loopback (RECEIPTS_CALLBACK_TOKEN in the group's env)."""
        return self.start(name, "receiver", "--port", str(port), "--workers", str(workers))

    def stop(
        self, process: subprocess.Popen[bytes], *, kill: bool = False, timeout: float = 15
    ) -> None:
        if process.poll() is None:
            if kill:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                # Only the main process: Celery's warm shutdown lets running tasks finish.
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever the group left behind

    def stop_all(self) -> None:
        for _, process in self.running:
            self.stop(process)

    def check_alive(self) -> None:
        """Raise when a process started here has exited (with the end of its log)."""
        for name, process in self.running:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def logs(self) -> str:
        parts = []
        for path in sorted(self.folder.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"===== {path.name} (last 4000 chars)\n{text[-4000:]}")
        return "\n".join(parts)


@contextmanager
def processes(env: Mapping[str, str], folder: Path) -> Iterator[Processes]:
    group = Processes(env, folder)
    try:
        yield group
    finally:
        group.stop_all()


def wait_for(
    condition: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.25,
    describe: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``condition`` until true; fail with ``describe()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s: {describe()}")


def processes_in(folder: Path) -> list[int]:
    """The live processes working in ``folder`` (Linux ``/proc``): whatever a command started
    there, children included, however they were grouped or re-parented. Zombies have no
    working directory, and hold nothing."""
    folder = folder.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:  # gone, a zombie, or not ours to read
            continue
        if cwd == folder:
            found.append(int(entry.name))
    return found


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``host:port`` now."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True
