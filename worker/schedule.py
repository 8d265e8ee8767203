"""When to poll: pure functions of the settings, the send time and an injected clock and RNG."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, kw_only=True, slots=True)
class PollPolicy:
    """Timing of a session's poll series.

    The first poll is at ``sent_at + first_delay``; each later one lands uniformly in
    ``[previous + interval_min, previous + interval_max]``; nothing is polled at or after
    ``sent_at + cutoff``, when an unresolved session is escalated instead.
    """

    first_delay: timedelta
    interval_min: timedelta
    interval_max: timedelta
    cutoff: timedelta

    def __post_init__(self) -> None:
        if self.interval_min <= timedelta(0):
            raise ValueError("interval_min must be positive")
        if self.interval_min > self.interval_max:
            raise ValueError("interval_min must not exceed interval_max")
        if self.first_delay < timedelta(0):
            raise ValueError("first_delay must not be negative")
        if self.cutoff <= self.first_delay:
            raise ValueError("cutoff must be longer than first_delay")

    def cutoff_at(self, sent_at: datetime) -> datetime:
        return sent_at + self.cutoff

    def first_poll_at(self, sent_at: datetime) -> datetime:
        return sent_at + self.first_delay

    def next_poll_at(self, sent_at: datetime, polled_at: datetime, rng: random.Random) -> datetime:
        """Next poll after one at ``polled_at``, jittered so that sessions sent together spread
        out; capped at the cutoff, where the session is due for escalation instead."""
        span = (self.interval_max - self.interval_min).total_seconds()
        jittered = polled_at + self.interval_min + timedelta(seconds=rng.uniform(0.0, span))
        return min(jittered, self.cutoff_at(sent_at))

    def may_poll(self, sent_at: datetime, last_polled_at: datetime | None, now: datetime) -> bool:
        """Whether a poll sent ``now`` keeps every rule: not before the first delay, not at or
        after the cutoff, not closer than ``interval_min`` to the previous poll."""
        if now < self.first_poll_at(sent_at) or now >= self.cutoff_at(sent_at):
            return False
        return last_polled_at is None or now - last_polled_at >= self.interval_min
