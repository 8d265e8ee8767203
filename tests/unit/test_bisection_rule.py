"""Which parameter errors are worth halving a batch for: the API's message decides."""

from __future__ import annotations

import pytest

from worker.poller import may_be_a_sessions_fault


@pytest.mark.parametrize(
    "message",
    [
        "Invalid parameter SessionNoSet",
        "Missing parameter SessionNoSet",
        "Invalid parameter SessionNo",
        "invalid parameter: sessionNoSet.3",
        "Params [SessionNoSet.0] not available",
        "SessionNo abc123 does not exist",
        "参数错误 SessionNoSet",
        # Naming nothing, the message may still be about one session.
        "Invalid parameter",
        "Invalid parameter value",
        "",
        "参数错误",
        "HTTP parameter error",
        "UCloud: invalid parameter",
        # Naming a session parameter beside another still may be one session's fault.
        "Invalid parameter AccountId or SessionNoSet",
    ],
)
def test_a_message_that_may_blame_one_session(message: str) -> None:
    assert may_be_a_sessions_fault(message)


@pytest.mark.parametrize(
    "message",
    [
        "Invalid parameter AccountId",
        "Missing parameter AccountId",
        "Missing parameter Action",
        "Invalid parameter Action",
        "Missing params [Region]",
        "parameter: ProjectId is required",
        "AccountId must be a positive integer",
        "INVALID PARAMETER AccountId",
    ],
)
def test_a_message_that_blames_the_whole_call(message: str) -> None:
    assert not may_be_a_sessions_fault(message)
