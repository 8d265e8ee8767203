"""A worker process logs the API's refusals of its credentials as one ERROR line with the
hint at most once a minute, however many polls are refused, and says how many it kept quiet
about."""

from __future__ import annotations

import logging

import pytest

from worker.credentials import RefusalLog
from worker.errors import CredentialsError, api_error


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _refusal(uuid: str) -> CredentialsError:
    error = api_error(215398, "Failed to parse token", uuid, action="GetUSMSSendReceipt")
    assert isinstance(error, CredentialsError)
    return error


def test_one_error_line_a_minute_counting_the_quiet_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="worker.credentials")
    clock = Monotonic()
    refusals = RefusalLog(monotonic=clock)
    logged = []
    for second in range(0, 150, 5):  # a refused poll every 5 s for two and a half minutes
        clock.now = 1000.0 + second
        logged.append(refusals.refused(_refusal(f"u-{second}")))
    assert [i * 5 for i, done in enumerate(logged) if done] == [0, 60, 120]
    lines = [r.getMessage() for r in caplog.records]
    assert [r.levelno for r in caplog.records] == [logging.ERROR] * 3
    assert lines[0] == (
        "Uspeedo refused the credentials (GetUSMSSendReceipt: RetCode 215398 'Failed to parse "
        "token'; request uuid u-0): the AccessKey id/secret is wrong or expired: check "
        "RECEIPTS_ACCESS_KEY_ID and RECEIPTS_ACCESS_KEY_SECRET, or this host's clock is more "
        "than 5 minutes off (`receipts check` tells which); the sessions stay scheduled and "
        "resolve once the API accepts the credentials again"
    )
    assert "request uuid u-60" in lines[1]
    assert lines[1].endswith("; 11 more refusal(s) since the last such line, not logged")
    assert lines[2].endswith("; 11 more refusal(s) since the last such line, not logged")
