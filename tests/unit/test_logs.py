"""Phones never reach the logs whole; other numbers stay readable."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
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
