"""The simulator's push of status reports, as Uspeedo's "Callback API" pushes them.

Each receipt version of a registered session is a report, due when it becomes visible. When
pushing is on, due reports are POSTed to the configured callback URL in batches
(``{"MsgType": 2, "Data": [...]}``: phones as digits, ``UNKNOWN`` for a pending result, no
AccountId); a batch not answered ``{"code": 0, ...}`` is retried every second three times and
then dropped for good, as Uspeedo does. A share of the reports (``loss``) is lost before it is
ever sent, as a lossy push loses them. When pushing is off, due reports are not pushed at all
(no callback URL registered), not even when it is switched on again later.

Every report's fate is recorded (``delivered`` with its time, ``lost``, ``dropped`` or ``off``),
so that a test can tell exactly what the receiver was given and when.

The scheduling is transport-free and driven by :meth:`Pusher.run_due` with the simulator's
clock; :meth:`Pusher.start` runs it on a thread that sends over HTTP.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

import requests

from worker.domain import Result, normalize_result, phone_key
from worker.simulator.scenarios import Session
from worker.simulator.wire import dumps, is_number

RETRY_EVERY: Final = 1.0  # seconds between attempts, as Uspeedo retries
RETRIES: Final = 3  # after the first attempt; then the batch is dropped for good
DEFAULT_BATCH: Final = 100
MAX_BATCH: Final = 10_000
# What a push attempt waits for an answer before counting it as failed.
ATTEMPT_TIMEOUT: Final = 3.0
# Benchmarks push hundreds of thousands of reports; keep the most recent fates only.
FATE_LOG_LIMIT: Final = 500_000
FATES: Final = ("delivered", "lost", "dropped", "off")
# How Uspeedo's push spells a result: English only, ``UNKNOWN`` for a pending one, and a submit
# failure as a failure (its ReceiptCode tells which).
_PUSHED_RESULT: Final = {
    Result.SUCCESS: "Success",
    Result.FAIL: "Fail",
    Result.SUBMIT_FAIL: "Fail",
    Result.UNKNOW: "UNKNOWN",
}

# Sends one push body to a URL; True when the answer was {"code": 0, ...}.
Post = Callable[[str, bytes], bool]


@dataclass(frozen=True, slots=True)
class PushConfig:
    url: str | None = None
    enabled: bool = False
    loss: float = 0.0  # share of reports lost before they are sent
    batch: int = DEFAULT_BATCH  # reports per push, at most

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "enabled": self.enabled, "loss": self.loss, "batch": self.batch}


def checked_config(current: PushConfig, changes: Mapping[str, Any]) -> PushConfig:
    """``current`` with ``changes`` (url, enabled, loss, batch) applied; ValueError names a
    bad one. Switching on needs a URL."""
    known = ("url", "enabled", "loss", "batch")
    for key, value in changes.items():
        if key not in known:
            raise ValueError(f"unknown push setting {key!r} (known: {', '.join(known)})")
        if key == "url" and value is not None and not _is_http_url(value):
            raise ValueError(f"push url must be an http(s) URL, not {value!r}")
        if key == "enabled" and not isinstance(value, bool):
            raise ValueError(f"push enabled must be true or false, not {value!r}")
        if key == "loss" and not (is_number(value) and 0 <= value <= 1):
            raise ValueError(f"push loss is a probability and must be within [0, 1], not {value!r}")
        if key == "batch" and not (
            isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_BATCH
        ):
            raise ValueError(f"push batch must be an integer within [1, {MAX_BATCH}]")
    config = replace(current, **changes)
    if "loss" in changes:
        config = replace(config, loss=float(config.loss))
    if config.enabled and not config.url:
        raise ValueError("pushing needs a url to push to")
    return config


def _is_http_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://")) and len(value) > 8


def report(session: Session, receipt: Mapping[str, Any]) -> dict[str, Any]:
    """One report of a push body, from a receipt version as the poll's answer shows it."""
    result = normalize_result(receipt["ReceiptResult"])
    return {
        "SessionNo": session.session_no,
        "Phone": phone_key(receipt["Phone"]),
        "CostCount": receipt["CostCount"],
        "ReceiptTime": receipt["ReceiptTime"],
        "ReceiptResult": _PUSHED_RESULT[result],
        "ReceiptCode": receipt["ReceiptCode"],
        "ReceiptDesc": receipt["ReceiptDesc"],
        "UserId": receipt["UserId"],
    }


def push_body(reports: list[dict[str, Any]]) -> bytes:
    """A push request's body, as Uspeedo sends it (UTF-8 JSON)."""
    return dumps({"MsgType": 2, "Data": reports}).encode("utf-8")


def post_over_http(timeout: float = ATTEMPT_TIMEOUT) -> Post:
    """A :data:`Post` over HTTP with a kept-alive connection (one sending thread uses it)."""
    http = requests.Session()

    def post(url: str, body: bytes) -> bool:
        try:
            answer = http.post(
                url,
                data=body,
                headers={"Content-Type": "application/json; charset=utf-8"},
                timeout=timeout,
            )
            return answer.status_code == 200 and answer.json().get("code") == 0
        except (requests.RequestException, ValueError, AttributeError):
            # No answer, or not {"code": 0}: Uspeedo counts both as a failure.
            return False

    return post


@dataclass(order=True)
class _Due:
    """A queue entry: a session's reports not pushed yet (``versions`` from ``next``), or a
    batch waiting for its retry (``reports``, after ``attempts`` failed attempts)."""

    at: float
    order: int
    session: Session | None = field(default=None, compare=False)
    versions: list[tuple[float, dict[str, Any]]] = field(default_factory=list, compare=False)
    next: int = field(default=0, compare=False)
    reports: list[dict[str, Any]] = field(default_factory=list, compare=False)
    attempts: int = field(default=0, compare=False)


class Pusher:
    """Reports waiting to be pushed, the push settings, and every report's fate."""

    def __init__(
        self, *, clock: Callable[[], float], seed: int | None, post: Post | None = None
    ) -> None:
        self._clock = clock
        self._post = post or post_over_http()
        self._rng = random.Random(seed)
        self._config = PushConfig()
        # One lock guards everything below; sending happens outside it.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # One entry per session (its next report's time), not per report: benchmarks register
        # hundreds of thousands of sessions.
        self._queue: list[_Due] = []
        self._order = itertools.count()
        self._fates: deque[dict[str, Any]] = deque(maxlen=FATE_LOG_LIMIT)
        self._sending = 0  # attempts under way
        self._thread: threading.Thread | None = None
        self._stopping = False

    # settings and records

    def configure(self, **changes: Any) -> PushConfig:
        with self._wake:
            self._config = checked_config(self._config, changes)
            self._wake.notify_all()
            return self._config

    def config(self) -> PushConfig:
        with self._lock:
            return self._config

    def fates(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(fate) for fate in self._fates]

    def reset(self) -> None:
        """Forget waiting reports and recorded fates (the settings stay)."""
        with self._lock:
            self._queue.clear()
            self._fates.clear()

    # scheduling

    def add(self, session: Session) -> None:
        """Schedule every receipt version of ``session`` as a report due when it shows. A
        session registered while pushing is off is not pushed (and costs nothing)."""
        versions = sorted(
            ((version.visible_at, version.receipt) for timeline in session.timelines
             for version in timeline),
            key=lambda item: item[0],
        )  # fmt: skip
        with self._wake:
            if not self._config.enabled or not versions:
                return
            entry = _Due(versions[0][0], next(self._order), session=session, versions=versions)
            heapq.heappush(self._queue, entry)
            self._wake.notify_all()

    def next_due(self) -> float | None:
        """When the next report shows or the next retry is due, by the simulator's clock."""
        with self._lock:
            return self._queue[0].at if self._queue else None

    def unsettled(self) -> int:
        """Batches whose fate is not known yet: being sent, or waiting for a retry (a test
        that kills the receiver waits for none, so that no push is cut off mid-commit)."""
        with self._lock:
            return self._sending + sum(1 for due in self._queue if due.session is None)

    def run_due(self, now: float | None = None) -> int:
        """Push what is due at ``now`` (the simulator's clock by default): new reports in
        batches, failed batches again. Returns the number of push attempts made."""
        now = self._clock() if now is None else now
        with self._lock:
            config = self._config
            retries, fresh = self._take_due(config, now)
        size = config.batch
        batches = [_Due(now, 0, reports=fresh[i : i + size]) for i in range(0, len(fresh), size)]
        for due in [*retries, *batches]:
            self._attempt(due, config.url, now)
        return len(retries) + len(batches)

    def _take_due(self, config: PushConfig, now: float) -> tuple[list[_Due], list[dict[str, Any]]]:
        """The retries due, and the reports that show by ``now`` and are not lost; the caller
        holds the lock."""
        fresh: list[dict[str, Any]] = []
        retries: list[_Due] = []
        while self._queue and self._queue[0].at <= now:
            due = heapq.heappop(self._queue)
            if due.session is None:
                retries.append(due)
                continue
            while due.next < len(due.versions) and due.versions[due.next][0] <= now:
                item = report(due.session, due.versions[due.next][1])
                due.next += 1
                if not config.enabled or config.url is None:
                    self._record(item, "off", now, 0)
                elif config.loss and self._rng.random() < config.loss:
                    self._record(item, "lost", now, 0)
                else:
                    fresh.append(item)
            if due.next < len(due.versions):
                due.at = due.versions[due.next][0]
                heapq.heappush(self._queue, due)
        return retries, fresh

    def _attempt(self, due: _Due, url: str | None, now: float) -> None:
        """One attempt at pushing a batch: delivered, retried a second later, or dropped."""
        tried = due.attempts + 1
        if url is None:  # the URL was cleared while a retry waited
            with self._lock:
                for item in due.reports:
                    self._record(item, "dropped", now, due.attempts)
            return
        with self._lock:
            self._sending += 1
        started = self._clock()
        try:
            delivered = self._post(url, push_body(due.reports))
        except BaseException:
            with self._lock:
                self._sending -= 1
            raise
        with self._wake:
            # In the same hold as the retry is queued: the batch is never seen as settled.
            self._sending -= 1
            if delivered:
                answered = self._clock()
                for item in due.reports:
                    self._record(item, "delivered", started, tried, answered=answered)
            elif tried <= RETRIES:
                at = started + RETRY_EVERY
                retry = _Due(at, next(self._order), reports=due.reports, attempts=tried)
                heapq.heappush(self._queue, retry)
            else:
                for item in due.reports:
                    self._record(item, "dropped", self._clock(), tried)

    def _record(
        self, item: Mapping[str, Any], fate: str, at: float, attempts: int, **extra: float
    ) -> None:
        # The caller holds the lock.
        self._fates.append(
            {
                "session_no": item["SessionNo"],
                "phone": item["Phone"],
                "result": item["ReceiptResult"],
                "receipt_time": item["ReceiptTime"],
                "fate": fate,
                "t": at,
                "attempts": attempts,
                **extra,
            }
        )

    # the thread that pushes in real time

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name="uspeedo-simulator-push", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=ATTEMPT_TIMEOUT * 2)

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
                wait = _wait(self._queue[0].at - self._clock() if self._queue else None)
                if wait > 0:
                    # Woken early by a new session, new settings, or stop.
                    self._wake.wait(wait)
                    continue
            self.run_due()


def _wait(seconds: float | None) -> float:
    # Wake at least every second: the clock may be moved by a test without notice.
    if seconds is None or math.isnan(seconds):
        return 1.0
    return min(max(seconds, 0.0), 1.0)
