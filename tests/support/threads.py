"""Running the same work in several threads at once, for tests of two runs racing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

START_TIMEOUT = 10.0
JOIN_TIMEOUT = 60.0


def at_once(*calls: Callable[[], T]) -> list[T]:
    """Each of ``calls`` in a thread of its own, all let go together; their results (in the
    order they finished). An error in any of them is raised here, once all have ended."""
    start = threading.Barrier(len(calls))
    results: list[T] = []
    errors: list[BaseException] = []

    def one(call: Callable[[], T]) -> None:
        try:
            start.wait(timeout=START_TIMEOUT)
            results.append(call())
        except BaseException as exc:  # raised by at_once, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a thread did not end"
    if errors:
        raise errors[0]
    return results
