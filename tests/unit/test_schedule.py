"""PollPolicy: when a session's polls may and will happen. Time and randomness are injected."""

from __future__ import annotations

import random
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.schedule import PollPolicy

SENT = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
S = timedelta(seconds=1)

# The contract's defaults.
DEFAULT = PollPolicy(
    first_delay=timedelta(seconds=300),
    interval_min=timedelta(seconds=300),
    interval_max=timedelta(seconds=600),
    cutoff=timedelta(seconds=43200),
)
FIRST = SENT + DEFAULT.first_delay
CUTOFF = SENT + DEFAULT.cutoff


def test_first_poll_and_cutoff_are_relative_to_sent_at() -> None:
    assert DEFAULT.first_poll_at(SENT) == SENT + timedelta(minutes=5)
    assert DEFAULT.cutoff_at(SENT) == SENT + timedelta(hours=12)


@pytest.mark.parametrize("first_delay", [timedelta(0), US, 2 * S, timedelta(days=3)])
def test_first_poll_at_is_sent_at_plus_first_delay(first_delay: timedelta) -> None:
    policy = PollPolicy(
        first_delay=first_delay, interval_min=S, interval_max=S, cutoff=first_delay + S
    )
    assert policy.first_poll_at(SENT) == SENT + first_delay


def test_seconds_scale_policy_works_the_same() -> None:
    # The contract allows every timing to be a few seconds for demos and tests.
    policy = PollPolicy(first_delay=S, interval_min=S, interval_max=2 * S, cutoff=10 * S)
    rng = random.Random(1)
    at = policy.first_poll_at(SENT)
    polls = [at]
    while (at := policy.next_poll_at(SENT, at, rng)) < policy.cutoff_at(SENT):
        assert policy.may_poll(SENT, polls[-1], at)
        polls.append(at)
    assert at == policy.cutoff_at(SENT)
    assert 4 <= len(polls) <= 9


# --- may_poll at every boundary --------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (SENT - S, False),
        (SENT, False),
        (FIRST - US, False),
        (FIRST, True),
        (FIRST + US, True),
        (CUTOFF - US, True),
        (CUTOFF, False),
        (CUTOFF + US, False),
        (CUTOFF + timedelta(days=1), False),
    ],
    ids=[
        "before-sent",
        "at-sent",
        "just-before-first",
        "at-first",
        "just-after-first",
        "just-before-cutoff",
        "at-cutoff",
        "just-after-cutoff",
        "long-after-cutoff",
    ],
)
def test_may_poll_never_polled(now: datetime, expected: bool) -> None:
    assert DEFAULT.may_poll(SENT, None, now) is expected


@pytest.mark.parametrize(
    ("since_last", "expected"),
    [
        (timedelta(0), False),
        (DEFAULT.interval_min - US, False),
        (DEFAULT.interval_min, True),
        (DEFAULT.interval_min + US, True),
        (DEFAULT.interval_max, True),
        (DEFAULT.interval_max + timedelta(hours=1), True),
    ],
    ids=["same-instant", "min-minus-1us", "min-exactly", "min-plus-1us", "max", "long-after"],
)
def test_may_poll_after_a_previous_poll(since_last: timedelta, expected: bool) -> None:
    last = FIRST + timedelta(minutes=30)
    assert DEFAULT.may_poll(SENT, last, last + since_last) is expected


def test_may_poll_interval_does_not_override_cutoff() -> None:
    last = CUTOFF - DEFAULT.interval_max
    assert DEFAULT.may_poll(SENT, last, CUTOFF - US)
    assert not DEFAULT.may_poll(SENT, last, CUTOFF)


def test_may_poll_interval_does_not_override_first_delay() -> None:
    # A previous poll long ago does not let a poll happen before the first delay has passed.
    assert not DEFAULT.may_poll(SENT, SENT - timedelta(days=1), FIRST - US)


def test_may_poll_with_a_clock_that_went_backwards() -> None:
    last = FIRST + timedelta(hours=1)
    assert not DEFAULT.may_poll(SENT, last, last - S)


def test_may_poll_works_in_any_timezone() -> None:
    plus8 = timezone(timedelta(hours=8))
    assert DEFAULT.may_poll(SENT.astimezone(plus8), None, FIRST)
    assert not DEFAULT.may_poll(SENT, None, (FIRST - US).astimezone(plus8))


# --- next_poll_at ----------------------------------------------------------------------------


def test_next_poll_at_default_window() -> None:
    polled = FIRST
    rng = random.Random(0)
    for _ in range(200):
        at = DEFAULT.next_poll_at(SENT, polled, rng)
        assert polled + DEFAULT.interval_min <= at <= polled + DEFAULT.interval_max


def test_next_poll_at_jitters() -> None:
    rng = random.Random(42)
    seen = {DEFAULT.next_poll_at(SENT, FIRST, rng) for _ in range(50)}
    assert len(seen) > 40


def test_next_poll_at_is_deterministic_for_a_seed() -> None:
    rng_a, rng_b = random.Random(7), random.Random(7)
    a = [DEFAULT.next_poll_at(SENT, FIRST, rng_a) for _ in range(5)]
    b = [DEFAULT.next_poll_at(SENT, FIRST, rng_b) for _ in range(5)]
    assert a == b


def test_next_poll_at_without_jitter_window() -> None:
    policy = PollPolicy(
        first_delay=S, interval_min=5 * S, interval_max=5 * S, cutoff=timedelta(hours=1)
    )
    assert policy.next_poll_at(SENT, SENT + S, random.Random(3)) == SENT + 6 * S


def test_next_poll_at_capped_at_cutoff() -> None:
    assert DEFAULT.next_poll_at(SENT, CUTOFF - S, random.Random(0)) == CUTOFF


class _Extremes(random.Random):
    """An RNG that returns the ends of the range, to check both bounds are reachable and kept."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


@pytest.mark.parametrize("high", [False, True])
def test_next_poll_at_extreme_draws_stay_in_window(high: bool) -> None:
    at = DEFAULT.next_poll_at(SENT, FIRST, _Extremes(high))
    assert at == FIRST + (DEFAULT.interval_max if high else DEFAULT.interval_min)


_MICROS_DAY = 86_400 * 10**6


@st.composite
def _policies(draw: st.DrawFn) -> PollPolicy:
    first_delay = timedelta(microseconds=draw(st.integers(0, 10 * _MICROS_DAY)))
    interval_min = timedelta(microseconds=draw(st.integers(1, _MICROS_DAY)))
    interval_max = interval_min + timedelta(microseconds=draw(st.integers(0, _MICROS_DAY)))
    cutoff = first_delay + timedelta(microseconds=draw(st.integers(1, 20 * _MICROS_DAY)))
    return PollPolicy(
        first_delay=first_delay, interval_min=interval_min, interval_max=interval_max, cutoff=cutoff
    )


@given(
    policy=_policies(),
    fraction=st.floats(0, 1),
    seed=st.integers(0, 2**64),
    sent_offset=st.integers(-(10**12), 10**12),
)
def test_next_poll_at_is_in_window_and_never_past_cutoff(
    policy: PollPolicy, fraction: float, seed: int, sent_offset: int
) -> None:
    sent = SENT + timedelta(microseconds=sent_offset)
    # Any previous poll between the first poll and the cutoff.
    first, cutoff = policy.first_poll_at(sent), policy.cutoff_at(sent)
    polled = min(first + (cutoff - first) * fraction, cutoff - US)
    at = policy.next_poll_at(sent, polled, random.Random(seed))
    assert at <= cutoff
    assert at > polled
    if at < cutoff:
        assert polled + policy.interval_min <= at <= polled + policy.interval_max
        assert policy.may_poll(sent, polled, at)
    else:
        # Capped: the uncapped draw would have been at or past the cutoff.
        assert polled + policy.interval_max >= cutoff
        assert not policy.may_poll(sent, polled, at)
    assert at == policy.next_poll_at(sent, polled, random.Random(seed))


@given(policy=_policies(), seed=st.integers(0, 2**32))
def test_a_whole_poll_series_keeps_every_rule(policy: PollPolicy, seed: int) -> None:
    rng = random.Random(seed)
    cutoff = policy.cutoff_at(SENT)
    at, last = policy.first_poll_at(SENT), None
    for _ in range(50):
        if at >= cutoff:
            break
        assert policy.may_poll(SENT, last, at)
        at, last = policy.next_poll_at(SENT, at, rng), at
    assert at <= cutoff


# --- constructor refusals --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval_min": 601 * S}, "interval_min must not exceed interval_max"),
        ({"interval_min": 600 * S + US}, "interval_min must not exceed interval_max"),
        ({"interval_min": timedelta(0)}, "interval_min must be positive"),
        ({"interval_min": -S}, "interval_min must be positive"),
        (
            {"interval_min": timedelta(0), "interval_max": timedelta(0)},
            "interval_min must be positive",
        ),
        ({"cutoff": 300 * S}, "cutoff must be longer than first_delay"),
        ({"cutoff": 300 * S - US}, "cutoff must be longer than first_delay"),
        ({"cutoff": timedelta(0)}, "cutoff must be longer than first_delay"),
        ({"first_delay": -US}, "first_delay must not be negative"),
    ],
    ids=[
        "min>max",
        "min>max-by-1us",
        "min-zero",
        "min-negative",
        "min-max-zero",
        "cutoff=first",
        "cutoff<first",
        "cutoff-zero",
        "first-negative",
    ],
)
def test_constructor_refuses(kwargs: dict[str, timedelta], message: str) -> None:
    values = {
        "first_delay": DEFAULT.first_delay,
        "interval_min": DEFAULT.interval_min,
        "interval_max": DEFAULT.interval_max,
        "cutoff": DEFAULT.cutoff,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        PollPolicy(**values)


def test_constructor_accepts_boundaries() -> None:
    policy = PollPolicy(first_delay=timedelta(0), interval_min=US, interval_max=US, cutoff=US)
    assert policy.may_poll(SENT, None, SENT)
    assert not policy.may_poll(SENT, None, SENT + US)


def test_policy_is_immutable() -> None:
    with pytest.raises(FrozenInstanceError):
        DEFAULT.cutoff = S  # type: ignore[misc]
