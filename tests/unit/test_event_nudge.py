"""The nudger's thread (worker/event_nudge.py): a nudge is sent at once after a quiet spell,
the nudges that follow within ``every`` are coalesced into one later send, and a nudge costs
the committing thread no I/O."""

from __future__ import annotations

import threading

from tests.support.processes import wait_for
from worker.event_nudge import Nudger


class Sends:
    def __init__(self) -> None:
        self.count = 0
        self.sent = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        self.sent.set()


def test_a_nudge_after_a_quiet_spell_is_sent_at_once() -> None:
    sends = Sends()
    nudger = Nudger(sends, every=3600)  # no second send within the test, whatever happens
    try:
        assert sends.count == 0, "nothing is sent before a nudge"
        nudger.nudge()
        assert sends.sent.wait(10)
    finally:
        nudger.stop()
    assert sends.count == 1


def test_nudges_within_the_interval_wait_for_one_send_at_its_end() -> None:
    sends = Sends()
    nudger = Nudger(sends, every=0.3)
    try:
        nudger.nudge()
        assert sends.sent.wait(10)
        for _ in range(1000):  # a burst of commits
            nudger.nudge()
        wait_for(lambda: nudger.sent >= 2, timeout=10, interval=0.01)
        # The burst is one send: with no nudge since, nothing more is sent. Each send is
        # followed by an interval, so a third one could only come from a new nudge.
        assert nudger.sent == sends.count == 2
    finally:
        nudger.stop()


def test_a_failing_send_is_logged_and_the_thread_goes_on() -> None:
    calls: list[int] = []

    def send() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("broker down")

    nudger = Nudger(send, every=0)
    try:
        nudger.nudge()
        wait_for(lambda: len(calls) == 1, timeout=10, interval=0.01)
        nudger.nudge()
        wait_for(lambda: len(calls) == 2, timeout=10, interval=0.01)
    finally:
        nudger.stop()


def test_stop_ends_the_thread() -> None:
    nudger = Nudger(lambda: None)
    nudger.stop()
    assert not nudger._thread.is_alive()
