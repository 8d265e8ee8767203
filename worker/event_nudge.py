"""Delivery of events started as soon as their history commits, not at the next tick.

The clock (``receipts.tick``) queues a delivery task for each destination with events waiting,
so without more an event waits up to a tick (30 s by default) before it is sent. Here, a
process that writes history (a poll task, the push receiver's writer, an escalating tick)
asks for a delivery as soon as its transaction commits:

- the history's writers (worker/event_log.py, worker/store.py) mark the unit of work
  (:func:`mark_written`); a listener on every SQLAlchemy ``Session`` sees the mark when the
  transaction commits (never when it rolls back) and calls :meth:`Nudger.nudge`, which only
  sets a flag: no I/O on the committing thread, and no broker round trip per commit;
- one thread per process (:class:`Nudger`) sends the delivery tasks when the flag is set, at
  most once per ``every`` seconds: the first commit after a quiet spell is sent at once, the
  commits of the next ``every`` seconds together once at its end. So at most one message per
  destination per ``every`` seconds per process, however many polls or pushes commit, and
  every commit is followed by a delivery task within ``every`` seconds.

A nudged task finding the cursor held by another deliverer does nothing: that deliverer looks
for events committed meanwhile once it released the cursor, and queues itself again
(worker/events.py, ``DeliveryReport.more``). The tick still queues deliveries: it is the
backstop for a nudge lost with its broker message or its process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from sqlalchemy import event
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

# At most one delivery task per destination per this many seconds from each process: a lag
# of a fraction of a second, and a handful of small messages per second under any load.
NUDGE_EVERY = 0.2
_WRITTEN = "receipts.history_written"


def mark_written(session: Session) -> None:
    """Note that this unit of work wrote history: its commit will nudge delivery."""
    session.info[_WRITTEN] = True


class Nudger:
    """Calls ``send`` (queue a delivery round for every destination) from its own thread, at
    most once per ``every`` seconds, after each :meth:`nudge`."""

    def __init__(self, send: Callable[[], None], *, every: float = NUDGE_EVERY) -> None:
        self._send = send
        self._every = every
        self._wanted = False
        self._stopping = False
        self._cond = threading.Condition()
        self.sent = 0  # sends attempted (for tests and the bench)
        self._thread = threading.Thread(target=self._run, name="event-nudge", daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        with self._cond:
            self._wanted = True
            self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._wanted or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    return
                self._wanted = False
            try:
                self._send()
            except Exception:  # a broker down: the tick queues the delivery instead
                log.warning("could not queue an event delivery; the next tick will", exc_info=True)
            self.sent += 1
            with self._cond:
                # The commits of the next `every` seconds wait for one send at its end.
                self._cond.wait_for(lambda: self._stopping, timeout=self._every)


_nudger: Nudger | None = None
_nudger_pid: int | None = None


def install(nudger: Nudger | None) -> None:
    """Make ``nudger`` the one this process's commits of history call (None: none), stopping
    the one before it."""
    global _nudger, _nudger_pid
    previous = _nudger if _nudger_pid == os.getpid() else None
    _nudger, _nudger_pid = nudger, os.getpid()
    if previous is not None and previous is not nudger:
        previous.stop()


def installed() -> Nudger | None:
    """This process's nudger (one inherited through fork has no thread here: none)."""
    return _nudger if _nudger_pid == os.getpid() else None


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.info.pop(_WRITTEN, False):
        nudger = installed()
        if nudger is not None:
            nudger.nudge()


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_WRITTEN, None)
