"""Phones never reach the logs whole; other numbers stay readable."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from datetime import UTC

import pytest
import sqlalchemy as sa
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from worker.logs import ScrubbingFilter, mask_phone, scrub


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("phone (852)55311111", "phone *******1111"),
        ("+852 5531 1112 failed", "*******1112 failed"),
        ("85255311113=Unknow", "*******1113=Unknow"),
        ("RetCode 215392", "RetCode 215392"),
        ("uuid 022a127a-a5d9-4709-8087-3ff126f01055", "uuid 022a127a-a5d9-4709-8087-3ff126f01055"),
        ("at 2026-11-27T09:20:34.632448+00:00", "at 2026-11-27T09:20:34.632448+00:00"),
        ("session abc1234567", "session abc1234567"),
    ],
)
def test_scrub_masks_phones_and_leaves_other_numbers(text: str, expected: str) -> None:
    assert scrub(text) == expected


def test_mask_phone_shows_the_last_four_digits_unless_told() -> None:
    assert mask_phone("(852)55311111") == "*******1111"
    assert mask_phone("(852)55311111", show=True) == "(852)55311111"


@given(st.from_regex(r"\+?[1-9][0-9]{6,14}", fullmatch=True), st.sampled_from([" ", ": ", "="]))
def test_no_phone_survives_scrubbing(phone: str, sep: str) -> None:
    digits = phone.lstrip("+")
    masked = scrub(f"phone{sep}{phone} done")
    assert digits not in masked
    assert masked.endswith(f"{digits[-4:]} done")


def test_the_filter_rewrites_records_with_arguments(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.logs")
    scrubber = ScrubbingFilter()
    # pytest reuses its capture handler across tests: the filter must not outlive this one.
    caplog.handler.addFilter(scrubber)
    with caplog.at_level(logging.WARNING, logger="test.logs"):
        logger.warning("phones %s and %s", "(852)55311111", "8613800000000")
    caplog.handler.removeFilter(scrubber)
    assert caplog.records[0].getMessage() == "phones *******1111 and *********0000"


# --- every spelling of a phone, nothing else --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("phone 852-5531-1111 failed", "phone *******1111 failed"),
        ("phone +852-5531-1112 failed", "phone *******1112 failed"),
        ("phone +852 5531-1113.", "phone *******1113."),
        ("phone (852) 5531-1114, next", "phone *******1114, next"),
        ("phone +1 (415) 555-0123", "phone *******0123"),
        ("phone 85255310001.0 is not a string", "phone *******0001 is not a string"),
        ("phones [85255310002.0, 85255310003.0]", "phones [*******0002, *******0003]"),
        ("phone:85255311115", "phone:*******1115"),
        ("{'phone': '852-5531-1116'}", "{'phone': '*******1116'}"),
        ("ends with 85255311117.", "ends with *******1117."),
    ],
)
def test_scrub_masks_dashed_and_float_phones(text: str, expected: str) -> None:
    assert scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "at 2026-11-30",
        "at 2026-11-30 09:20:34",
        "at 2026-11-30 09:20:34.632448+00:00 next",
        "next at 2026-11-27T12:01:00+00:00",
        "on 2026-11-30 5 sessions",
        "time 09:20:34 and 23:59:59.999999",
        "request 022a127a-a5d9-4709-8087-3ff126f01055",
        "request 12345678-1234-4234-8234-123456789012 done",
        "delivery escalation-1-S1-20261127T120100000000Z",
        "id 3ff126f01055abc and 0x1234567890",
        "celery 5.7.0, python 3.11.7, psycopg 3.3.9, version 10.11.1234",
        "connect 127.0.0.1:5432 and 10.123.45.67",
        "took 1764487234.632448 s",
        "RetCode 215392",
    ],
)
def test_scrub_leaves_dates_times_ids_and_versions_alone(text: str) -> None:
    assert scrub(text) == text


def _spelled(digits: str, style: int) -> str:
    """One of the ways a phone shows up in logs and API payloads."""
    cut = [digits[:3], digits[3:7], digits[7:]]
    groups = [g for g in cut if g]
    return [
        digits,
        f"+{digits}",
        "-".join(groups),
        "+" + "-".join(groups),
        " ".join(groups),
        "+" + " ".join(groups),
        f"({digits[:3]}){digits[3:]}",
        f"({digits[:3]}) {'-'.join(groups[1:])}",
        f"{digits}.0",
    ][style]


_WORDS = st.text(st.sampled_from("abc XYZ:=,;'\"[]{}()/é-_.0123456789"), max_size=25)
_NEIGHBOURS = st.sampled_from([" ", ": ", "=", "'", '"', "(", "[", ", ", "\n"])


@settings(max_examples=300)
@given(
    digits=st.from_regex(r"[1-9][0-9]{6,19}", fullmatch=True),
    style=st.integers(0, 8),
    before=_WORDS,
    after=_WORDS,
    left=_NEIGHBOURS,
    right=st.sampled_from([" ", ", ", ".", "'", '"', ")", "]", "\n", ";"]),
)
def test_any_spelling_of_a_phone_in_any_text_is_masked(
    digits: str, style: int, before: str, after: str, left: str, right: str
) -> None:
    assume(style != 8 or len(digits) <= 15)  # a float holds 15 digits exactly
    phone = _spelled(digits, style)
    # Words around it, set apart as a log line would (a digit right after a full stop would
    # make a decimal number, which is not a phone).
    text = f"{before} {left}{phone}{right} {after}"
    masked = scrub(text)
    assert phone not in masked

    def only_digits(s: str) -> str:
        return "".join(ch for ch in s if ch.isdigit())

    # The number cannot be read back, in any spelling, unless the words around it and the
    # four digits left visible spell it by themselves.
    assume(digits not in only_digits(before) + digits[-4:] + only_digits(after))
    assert digits not in only_digits(masked)


@given(
    value=st.one_of(
        st.dates().map(lambda d: d.isoformat()),
        st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
        st.times().map(lambda t: t.isoformat()),
        st.uuids().map(str),
        st.tuples(st.integers(0, 99), st.integers(0, 99), st.integers(0, 9999)).map(
            lambda v: ".".join(map(str, v))
        ),
    ),
    before=st.sampled_from(["", "at ", "id=", "(", "'"]),
    after=st.sampled_from(["", " done", ")", "'", ", 3 sessions"]),
)
def test_dates_times_uuids_and_versions_survive(value: str, before: str, after: str) -> None:
    text = f"{before}{value}{after}"
    assert scrub(text) == text


# --- exception text and stack traces ----------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose one handler formats like a worker's and carries the filter."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(ScrubbingFilter())
    logger = logging.getLogger("test.logs.captured")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_exception_text_is_masked(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    try:
        raise ValueError("phone 852-5531-1111 is not tracked")
    except ValueError:
        logger.exception("could not track")
    text = stream.getvalue()
    assert "Traceback (most recent call last)" in text
    assert "5531-1111" not in text
    assert "ValueError: phone *******1111 is not tracked" in text


def test_an_integrity_error_with_its_parameters_is_masked(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    try:
        try:
            raise RuntimeError("UNIQUE constraint failed: sms_receipts.phone_key")
        except RuntimeError as orig:
            raise sa.exc.IntegrityError(
                "INSERT INTO sms_receipts (phone, phone_key) VALUES (?, ?)",
                ("+852 5531 1112", "85255311112"),
                orig,
            ) from orig
    except sa.exc.IntegrityError:
        logger.error("write failed", exc_info=True)
    text = stream.getvalue()
    assert "[parameters:" in text
    assert "85255311112" not in text and "5531 1112" not in text
    assert "*******1112" in text


def test_celery_formatter_and_exception_info_are_masked() -> None:
    """Celery logs a task failure with its own formatter and billiard's ExceptionInfo."""
    from billiard.einfo import ExceptionInfo
    from celery.exceptions import Reject
    from celery.utils.log import ColorFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ColorFormatter("%(levelname)s %(message)s", use_color=False))
    handler.addFilter(ScrubbingFilter())
    logger = logging.getLogger("test.logs.celery")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise Reject("phone 85255310001.0 is not a string", requeue=False)
        except Reject as exc:
            einfo = ExceptionInfo()
            logger.log(
                logging.WARNING,
                "Task %(name)s[%(id)s] %(exc)s",
                {"name": "receipts.track", "id": "022a127a", "exc": repr(exc)},
                exc_info=einfo.exc_info,
            )
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    text = stream.getvalue()
    assert "Traceback" in text and "celery.exceptions.Reject" in text
    assert "85255310001" not in text
    assert "celery.exceptions.Reject: ('phone *******0001 is not a string', False)" in text
    assert "reject requeue=False: phone *******0001 is not a string" in text


def test_stack_info_is_masked(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.warning("look", stack_info=True)  # a caller's line: phone 852-5531-1119
    text = stream.getvalue()
    assert "Stack (most recent call last)" in text
    assert "5531-1119" not in text and "*******1119" in text


def test_a_record_that_cannot_be_formatted_is_left_to_the_handler(
    captured: tuple[logging.Logger, io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger, _ = captured
    reported: list[logging.LogRecord] = []
    handler = logger.handlers[0]
    monkeypatch.setattr(handler, "handleError", reported.append)
    logger.warning("two %s %s", "args")  # noqa: PLE1206 - a bug in the caller, not the filter
    assert len(reported) == 1
