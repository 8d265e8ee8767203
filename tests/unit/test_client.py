"""UspeedoClient against a mocked endpoint, and receipt parsing against every odd payload.

No test sleeps: the client gets a fake clock whose ``sleep`` only records and advances time.
Every test is also a leak test: the ``no_leaks`` fixture fails any test whose log output, or
any exception it checked, shows the secret or a signature that was sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest
import requests
import responses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.client import UspeedoClient
from worker.domain import Result
from worker.errors import (
    AnswerTooLarge,
    ApiError,
    CredentialsError,
    MalformedResponse,
    ParameterError,
    PollWindowClosed,
    ServerError,
    TransportError,
    UspeedoError,
    api_error,
)
from worker.receipts import Receipt, parse_receipts
from worker.signing import canonical

URL = "https://api.test.invalid/api"
KEY_ID = "AKID-test"
SECRET = "s3cr3t-Never-Show-Me"
UUID = "6f1c2d3e-0000-4000-8000-00000000abcd"
T0 = 1_700_000_000.25
RECEIVED = datetime.fromtimestamp(T0, UTC)  # when parsed answers were received
ACTION = "GetUSMSSendReceipt"

OK_BODY: dict[str, Any] = {"RetCode": 0, "Action": "GetUSMSSendReceiptResponse", "Data": []}


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@dataclass
class FakeClock:
    now: float = T0
    sleeps: list[float] = field(default_factory=list)

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


_checked_texts: list[str] = []


def _leak_free(text: str) -> None:
    _checked_texts.append(text)
    assert SECRET not in text


@pytest.fixture(autouse=True)
def no_leaks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    _checked_texts.clear()
    with responses.mock:
        yield
        sent_signatures = {call.request.headers["X-Signature"] for call in responses.calls}
    # At teardown caplog.text already shows only the teardown phase: read the test's records.
    formatter = logging.Formatter("%(levelname)s %(name)s %(message)s")
    records = [*caplog.get_records("setup"), *caplog.get_records("call")]
    texts = [formatter.format(record) for record in records] + _checked_texts
    for text in texts:
        assert SECRET not in text
        for sent in sent_signatures:
            assert sent not in text


def check_error(error: BaseException) -> None:
    """Every rendering of an error (and of what it was raised from) must be leak-free."""
    seen: BaseException | None = error
    while seen is not None:
        _leak_free(str(seen))
        _leak_free(repr(seen))
        _leak_free(repr(vars(seen)) if hasattr(seen, "__dict__") else "")
        seen = seen.__cause__ or seen.__context__


def make_client(clock: FakeClock, **overrides: Any) -> UspeedoClient:
    options: dict[str, Any] = {
        "api_url": URL,
        "access_key_id": KEY_ID,
        "access_key_secret": SECRET,
        "sleep": clock.sleep,
        "clock": clock.time,
        "rng": lambda: 1.0,  # the full backoff ceiling, so delays are predictable
    }
    options.update(overrides)
    return UspeedoClient(**options)


@pytest.fixture
def client(clock: FakeClock) -> Iterator[UspeedoClient]:
    with make_client(clock) as c:
        yield c


def reply(
    body: Any = None,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    raw: str | bytes | Exception | None = None,
) -> None:
    """Queue one answer; queued answers are served in order, the last one repeats."""
    all_headers = {"X-Speedo-Request-Uuid": UUID, **(headers or {})}
    if raw is not None:
        responses.post(URL, body=raw, status=status, headers=all_headers)
    else:
        responses.post(
            URL, json=OK_BODY if body is None else body, status=status, headers=all_headers
        )


def raw_body(call: Any) -> bytes:
    body = call.request.body
    assert isinstance(body, bytes)
    return body


def timeout_of(call: Any) -> Any:
    # responses records the keyword arguments of send() on the request it hands back.
    return call.request.req_kwargs["timeout"]


def sent_bodies() -> list[dict[str, Any]]:
    return [json.loads(raw_body(call)) for call in responses.calls]


def sent_headers() -> list[Any]:
    return [call.request.headers for call in responses.calls]


def expected_signature(body_bytes: bytes) -> str:
    decoded = json.loads(body_bytes)
    return hashlib.sha1((canonical(decoded) + SECRET).encode(), usedforsecurity=False).hexdigest()


# --------------------------------------------------------------------------------------------
# Requests: body, headers, signature


def test_request_is_signed_json_with_all_headers(client: UspeedoClient, clock: FakeClock) -> None:
    reply()
    result = client.call(ACTION, {"AccountId": 1, "SessionNoSet": ["a", "b"], "Skip": None})

    assert result == OK_BODY
    (call,) = responses.calls
    request = call.request
    assert request.method == "POST"
    assert request.url == URL
    assert json.loads(raw_body(call)) == {
        "Action": ACTION,
        "AccountId": 1,
        "SessionNoSet": ["a", "b"],
    }
    headers = request.headers
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Access-Key-Id"] == KEY_ID
    assert headers["X-Timestamp"] == str(int(T0))
    assert 0 < len(headers["X-Nonce"]) <= 32
    assert headers["X-Signature"] == expected_signature(raw_body(call))
    assert SECRET.encode() not in raw_body(call)
    assert not any(SECRET in value for value in headers.values())
    assert timeout_of(call) == (3.05, 10.0)


def test_non_ascii_params_are_sent_as_utf8_and_signed_as_sent(client: UspeedoClient) -> None:
    reply()
    client.call("SendBatchUSMSMessage", {"AccountId": 1, "Note": '你好 "quoted"'})
    (call,) = responses.calls
    assert call.request.headers["X-Signature"] == expected_signature(raw_body(call))
    assert json.loads(raw_body(call))["Note"] == '你好 "quoted"'


def test_timeouts_are_configurable(clock: FakeClock) -> None:
    reply()
    make_client(clock, connect_timeout=1.5, read_timeout=4.0).call(ACTION, {"AccountId": 1})
    assert timeout_of(responses.calls[0]) == (1.5, 4.0)


def test_every_retry_is_signed_afresh(client: UspeedoClient, clock: FakeClock) -> None:
    reply(status=500)
    reply(status=503)
    reply({"RetCode": 215400, "Message": "busy"})
    reply()
    client.call(ACTION, {"AccountId": 1, "SessionNoSet": ["a"]})

    headers = sent_headers()
    assert len(headers) == 4
    nonces = [h["X-Nonce"] for h in headers]
    assert len(set(nonces)) == 4
    for call in responses.calls:
        assert call.request.headers["X-Signature"] == expected_signature(raw_body(call))
    # Each attempt carries the time it was sent at, not the time of the first attempt.
    sent_at = [T0, T0 + 0.5, T0 + 1.5, T0 + 3.5]
    assert [h["X-Timestamp"] for h in headers] == [str(int(t)) for t in sent_at]
    assert clock.sleeps == [0.5, 1.0, 2.0]


def test_own_session_retries_nothing_itself(client: UspeedoClient) -> None:
    # urllib3 would resend the same nonce; the client must be the only one retrying.
    adapter = client._session.get_adapter(URL)
    assert isinstance(adapter, requests.adapters.HTTPAdapter)
    assert adapter.max_retries.total == 0
    assert adapter._pool_maxsize >= 4  # type: ignore[attr-defined]


def test_lent_session_is_used_and_not_closed(clock: FakeClock) -> None:
    closed: list[bool] = []

    class Spy(requests.Session):
        def close(self) -> None:
            closed.append(True)
            super().close()

    session = Spy()
    reply()
    with make_client(clock, session=session) as c:
        c.call(ACTION, {"AccountId": 1})
    assert closed == []
    session.close()


def test_repr_hides_the_secret(client: UspeedoClient) -> None:
    _leak_free(repr(client))
    _leak_free(str(client))
    _leak_free(repr(vars(client)) if hasattr(client, "__dict__") else "")
    assert KEY_ID in repr(client)
    with pytest.raises(TypeError):
        pickle.dumps(client)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_attempts": 0},
        {"connect_timeout": 0},
        {"read_timeout": -1},
        {"backoff_base": -0.1},
        {"access_key_secret": ""},
        {"access_key_id": ""},
    ],
)
def test_constructor_rejects_nonsense(clock: FakeClock, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"must|required") as info:
        make_client(clock, **bad)
    check_error(info.value)


def test_null_free_body_is_required_for_signing(client: UspeedoClient) -> None:
    with pytest.raises(ValueError, match=r"(?i)float|finite") as info:
        client.call(ACTION, {"AccountId": float("nan")})
    check_error(info.value)
    assert len(responses.calls) == 0


# --------------------------------------------------------------------------------------------
# Retries


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_retries_on_throttling_and_server_errors(
    client: UspeedoClient, clock: FakeClock, status: int
) -> None:
    reply(status=status, raw="<html>Bad gateway</html>")
    reply()
    assert client.call(ACTION, {"AccountId": 1}) == OK_BODY
    assert len(responses.calls) == 2
    assert clock.sleeps == [0.5]


@pytest.mark.parametrize(
    "failure",
    [
        requests.ConnectionError("connection refused"),
        requests.ConnectTimeout("connect timed out"),
        requests.ReadTimeout("read timed out"),
        requests.exceptions.ChunkedEncodingError("connection broken"),
    ],
    ids=["connection", "connect-timeout", "read-timeout", "chunked"],
)
def test_retries_on_transport_failures(
    client: UspeedoClient, clock: FakeClock, failure: Exception
) -> None:
    reply(raw=failure)
    reply()
    assert client.call(ACTION, {"AccountId": 1}) == OK_BODY
    assert len(responses.calls) == 2


@pytest.mark.parametrize(
    "raw",
    [
        '{"RetCode": 0, "Da',  # truncated
        "",
        "<html>maintenance</html>",
        "[1, 2]",
        '"RetCode"',
        "null",
        b"\xff\xfe\x00garbage",
        '{"Action": "X"}',  # no RetCode
        '{"RetCode": "0"}',
        '{"RetCode": true}',
        '{"RetCode": 0.0}',
        '{"RetCode": null}',
    ],
)
def test_retries_on_malformed_answers(
    client: UspeedoClient, clock: FakeClock, raw: str | bytes
) -> None:
    reply(raw=raw)
    reply()
    assert client.call(ACTION, {"AccountId": 1}) == OK_BODY
    assert len(responses.calls) == 2


def test_malformed_every_time_raises_malformed(client: UspeedoClient) -> None:
    reply(raw='{"RetCode": 0, "Da')
    with pytest.raises(MalformedResponse) as info:
        client.call(ACTION, {"AccountId": 1})
    check_error(info.value)
    assert info.value.retryable
    assert info.value.request_uuid == UUID
    assert UUID in str(info.value)
    assert ACTION in str(info.value)
    assert len(responses.calls) == 4


def test_server_error_retcode_is_retried_then_raised(client: UspeedoClient) -> None:
    reply({"RetCode": 215400, "Message": "internal error", "Action": "X"})
    with pytest.raises(ServerError) as info:
        client.call(ACTION, {"AccountId": 1})
    check_error(info.value)
    error = info.value
    assert error.retryable
    assert error.ret_code == 215400
    assert error.api_message == "internal error"
    assert len(responses.calls) == 4


def test_attempts_are_bounded(client: UspeedoClient, clock: FakeClock) -> None:
    reply(status=502)
    with pytest.raises(TransportError) as info:
        client.call(ACTION, {"AccountId": 1})
    check_error(info.value)
    assert len(responses.calls) == 4
    assert clock.sleeps == [0.5, 1.0, 2.0]
    assert info.value.retryable
    assert info.value.http_status == 502
    message = str(info.value)
    assert ACTION in message
    assert "HTTP 502" in message
    assert UUID in message


def test_single_attempt_means_no_retry(clock: FakeClock) -> None:
    reply(status=500)
    with pytest.raises(TransportError) as info:
        make_client(clock, max_attempts=1).call(ACTION, {"AccountId": 1})
    check_error(info.value)
    assert len(responses.calls) == 1
    assert clock.sleeps == []


def test_backoff_is_capped(clock: FakeClock) -> None:
    reply(status=500)
    c = make_client(clock, max_attempts=8, backoff_base=1.0, backoff_max=5.0)
    with pytest.raises(TransportError) as info:
        c.call(ACTION, {"AccountId": 1})
    check_error(info.value)
    assert clock.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]


def test_backoff_is_fully_jittered(clock: FakeClock) -> None:
    draws = iter([0.0, 0.25, 0.5])
    reply(status=500)
    c = make_client(clock, rng=lambda: next(draws))
    with pytest.raises(TransportError) as info:
        c.call(ACTION, {"AccountId": 1})
    check_error(info.value)
    assert clock.sleeps == [0.0, 0.25, 1.0]


@pytest.mark.parametrize(
    ("status", "retry_after", "rng", "expected"),
    [
        (429, "3", 0.0, 3.0),  # longer than the jittered backoff: honoured
        (503, "3", 0.0, 3.0),
        (429, "2.5", 0.0, 2.5),
        (429, "0.1", 1.0, 0.5),  # shorter than the backoff: backoff wins
        (429, "100", 0.0, 32.0),  # capped at 4 * backoff_max
        (503, "-5", 0.0, 0.0),
        (429, "soon", 0.0, 0.0),  # unparseable: ignored
        (500, "30", 0.0, 0.0),  # only 429 and 503 carry a meaningful Retry-After
    ],
)
def test_retry_after_is_honoured(
    clock: FakeClock, status: int, retry_after: str, rng: float, expected: float
) -> None:
    reply(status=status, headers={"Retry-After": retry_after}, raw="")
    reply()
    make_client(clock, rng=lambda: rng).call(ACTION, {"AccountId": 1})
    assert clock.sleeps == [expected]


def test_retry_after_as_http_date(clock: FakeClock) -> None:
    when = datetime.fromtimestamp(int(T0) + 6, tz=UTC)
    reply(status=503, headers={"Retry-After": format_datetime(when, usegmt=True)}, raw="")
    reply()
    make_client(clock, rng=lambda: 0.0).call(ACTION, {"AccountId": 1})
    assert clock.sleeps == [pytest.approx(6 - (T0 - int(T0)))]


# --------------------------------------------------------------------------------------------
# Errors that are not retried


@pytest.mark.parametrize(
    ("ret_code", "error_type"),
    [
        (215398, CredentialsError),
        (215392, ParameterError),
        (215397, ParameterError),
        (123456, ApiError),
        (-1, ApiError),
    ],
)
def test_api_errors_that_are_not_retried(
    client: UspeedoClient, clock: FakeClock, ret_code: int, error_type: type[ApiError]
) -> None:
    reply({"RetCode": ret_code, "Message": "Failed to parse token", "Action": "X"})
    with pytest.raises(ApiError) as info:
        client.call(ACTION, {"AccountId": 1})
    check_error(info.value)
    error = info.value
    assert type(error) is error_type
    assert not error.retryable
    assert error.ret_code == ret_code
    assert error.api_message == "Failed to parse token"
    assert error.request_uuid == UUID
    for part in (ACTION, str(ret_code), "Failed to parse token", UUID):
        assert part in str(error)
    assert len(responses.calls) == 1
    assert clock.sleeps == []


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 413])
def test_other_http_client_errors_are_not_retried(client: UspeedoClient, status: int) -> None:
    reply(status=status, raw="nope")
    with pytest.raises(TransportError) as info:
        client.call(ACTION, {"AccountId": 1})
    check_error(info.value)
    assert not info.value.retryable
    assert info.value.http_status == status
    assert f"HTTP {status}" in str(info.value)
    assert UUID in str(info.value)
    assert len(responses.calls) == 1


def test_http_error_carrying_a_retcode_reports_the_retcode(client: UspeedoClient) -> None:
    reply({"RetCode": 215398, "Message": "Failed to parse token"}, status=401)
    with pytest.raises(CredentialsError) as info:
        client.call(ACTION, {"AccountId": 1})
    check_error(info.value)
    assert info.value.http_status == 401
    assert "HTTP 401" in str(info.value)
    assert len(responses.calls) == 1


def test_redirect_is_not_followed(client: UspeedoClient) -> None:
    reply(status=302, headers={"Location": "https://elsewhere.invalid/"}, raw="")
    with pytest.raises(TransportError) as info:
        client.call(ACTION, {"AccountId": 1})
    check_error(info.value)
    assert not info.value.retryable
    assert len(responses.calls) == 1


def test_invalid_url_is_not_retried(clock: FakeClock) -> None:
    c = make_client(clock, api_url="not a url")
    with pytest.raises(TransportError) as info:
        c.call(ACTION, {"AccountId": 1})
    check_error(info.value)
    assert not info.value.retryable
    assert clock.sleeps == []


def test_error_without_request_uuid_says_so(client: UspeedoClient) -> None:
    responses.post(URL, status=500, body="")
    with pytest.raises(TransportError) as info:
        client.call(ACTION, {"AccountId": 1})
    check_error(info.value)
    assert info.value.request_uuid is None
    assert "no request uuid" in str(info.value)


def test_echoed_signature_is_masked(client: UspeedoClient) -> None:
    def echo(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        sig = request.headers["X-Signature"]
        body = {"RetCode": 215398, "Message": f"signature {sig} does not match"}
        return 200, {"X-Speedo-Request-Uuid": UUID}, json.dumps(body)

    responses.add_callback(responses.POST, URL, callback=echo)
    with pytest.raises(CredentialsError) as info:
        client.call(ACTION, {"AccountId": 1})
    check_error(info.value)
    assert "<signature>" in str(info.value)
    assert "<signature>" in info.value.api_message


# --------------------------------------------------------------------------------------------
# Deadline


def test_deadline_already_passed(client: UspeedoClient) -> None:
    reply()
    with pytest.raises(PollWindowClosed) as info:
        client.call(ACTION, {"AccountId": 1}, deadline=T0)
    check_error(info.value)
    assert not info.value.retryable
    assert ACTION in str(info.value)
    assert len(responses.calls) == 0


def test_deadline_stops_retries_and_raises_the_last_error(
    client: UspeedoClient, clock: FakeClock
) -> None:
    reply(status=500)
    # Attempt 1 at T0, sleep 0.5, attempt 2 at T0+0.5; the next would start at T0+1.5.
    with pytest.raises(TransportError) as info:
        client.call(ACTION, {"AccountId": 1}, deadline=T0 + 1.4)
    check_error(info.value)
    assert len(responses.calls) == 2
    assert clock.sleeps == [0.5]


def test_deadline_passing_during_a_slow_attempt(client: UspeedoClient, clock: FakeClock) -> None:
    def slow(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        clock.now += 60
        return 503, {"X-Speedo-Request-Uuid": UUID}, ""

    responses.add_callback(responses.POST, URL, callback=slow)
    with pytest.raises(TransportError) as info:
        client.call(ACTION, {"AccountId": 1}, deadline=T0 + 30)
    check_error(info.value)
    assert len(responses.calls) == 1
    assert clock.sleeps == []


def test_deadline_far_away_changes_nothing(client: UspeedoClient) -> None:
    reply(status=500)
    reply()
    assert client.call(ACTION, {"AccountId": 1}, deadline=T0 + 3600) == OK_BODY


# --------------------------------------------------------------------------------------------
# Logging


def test_each_failed_attempt_is_logged(
    client: UspeedoClient, caplog: pytest.LogCaptureFixture
) -> None:
    reply(status=503)
    reply({"RetCode": 215400, "Message": "busy"})
    reply()
    client.call(ACTION, {"AccountId": 1})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "attempt 1/4" in warnings[0].getMessage()
    assert "HTTP 503" in warnings[0].getMessage()
    assert "attempt 2/4" in warnings[1].getMessage()
    assert "215400" in warnings[1].getMessage()
    for record in warnings:
        assert record.name == "worker.client"
        assert ACTION in record.getMessage()
        assert UUID in record.getMessage()


# --------------------------------------------------------------------------------------------
# Error types


def test_api_error_factory() -> None:
    assert type(api_error(215398, "m", None)) is CredentialsError
    assert type(api_error(215392, "m", None)) is ParameterError
    assert type(api_error(215397, "m", None)) is ParameterError
    assert type(api_error(215400, "m", None)) is ServerError
    unknown = api_error(42, "odd", "u-1", action="Foo")
    assert type(unknown) is ApiError
    assert not unknown.retryable
    assert (unknown.ret_code, unknown.api_message, unknown.request_uuid) == (42, "odd", "u-1")
    assert "Foo" in str(unknown)
    assert "RetCode 42" in str(unknown)
    assert "u-1" in str(unknown)
    assert all(issubclass(t, UspeedoError) for t in (TransportError, PollWindowClosed))


def test_errors_survive_pickling() -> None:
    # Celery pickles exceptions that escape a task; the attributes must come back.
    error = api_error(215400, "busy", "u-9", action="A", http_status=200)
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert type(copy) is ServerError
    assert (copy.ret_code, copy.api_message, copy.request_uuid) == (215400, "busy", "u-9")
    assert copy.retryable
    assert str(copy) == str(error)
    transport = TransportError("x", retryable=False, http_status=404)
    copy2 = pickle.loads(pickle.dumps(transport))  # noqa: S301 - our own bytes
    assert not copy2.retryable
    assert copy2.http_status == 404


def test_error_classes_accept_a_bare_message() -> None:
    # Celery's JSON result serializer rebuilds exceptions from their message alone.
    for cls in (UspeedoError, TransportError, ApiError, CredentialsError, ServerError):
        assert str(cls("message")) == "message"


# --------------------------------------------------------------------------------------------
# get_send_receipts


def receipt_json(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "Phone": "(852)55311111",
        "CostCount": 1,
        "ReceiptResult": "Success",
        "ReceiptCode": "DELIVRD",
        "ReceiptDesc": "delivered",
        "ReceiptTime": 1_700_000_000,
        "UserId": "order-1",
    }
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not _ABSENT}


_ABSENT: Any = object()


def test_get_send_receipts(client: UspeedoClient) -> None:
    reply(
        {
            "RetCode": 0,
            "Data": [
                {"SessionNo": "s1", "ReceiptSet": [receipt_json()]},
                {"SessionNo": "s2", "ReceiptSet": [receipt_json(ReceiptResult="Unknow")]},
            ],
        }
    )
    batch = client.get_send_receipts(7, ("s1", "s2"))
    assert sent_bodies() == [
        {"Action": "GetUSMSSendReceipt", "AccountId": 7, "SessionNoSet": ["s1", "s2"]}
    ]
    assert [(r.session_no, r.result) for r in batch.receipts] == [
        ("s1", Result.SUCCESS),
        ("s2", Result.UNKNOW),
    ]
    assert batch.problems == ()
    assert batch.request_uuid == UUID


@pytest.mark.parametrize("count", [0, 101])
def test_get_send_receipts_size_limits(client: UspeedoClient, count: int) -> None:
    with pytest.raises(ValueError, match="1 to 100") as info:
        client.get_send_receipts(1, [f"s{i}" for i in range(count)])
    check_error(info.value)
    assert len(responses.calls) == 0


def test_get_send_receipts_accepts_exactly_100(client: UspeedoClient) -> None:
    reply()
    client.get_send_receipts(1, [f"s{i}" for i in range(100)])
    assert len(sent_bodies()[0]["SessionNoSet"]) == 100


def test_get_send_receipts_refuses_a_bare_string(client: UspeedoClient) -> None:
    with pytest.raises(TypeError):
        client.get_send_receipts(1, "s1")


def test_get_send_receipts_retries_a_badly_shaped_data(client: UspeedoClient) -> None:
    reply({"RetCode": 0, "Data": {"SessionNo": "s1"}})
    reply({"RetCode": 0, "Data": [{"SessionNo": "s1", "ReceiptSet": [receipt_json()]}]})
    batch = client.get_send_receipts(1, ["s1"])
    assert len(batch.receipts) == 1
    assert len(responses.calls) == 2


def test_get_send_receipts_data_always_bad(client: UspeedoClient) -> None:
    reply({"RetCode": 0, "Data": "nothing"})
    with pytest.raises(MalformedResponse) as info:
        client.get_send_receipts(1, ["s1"])
    check_error(info.value)
    assert "Data" in str(info.value)
    assert UUID in str(info.value)
    assert len(responses.calls) == 4


def test_get_send_receipts_logs_problems(
    client: UspeedoClient, caplog: pytest.LogCaptureFixture
) -> None:
    reply({"RetCode": 0, "Data": [{"SessionNo": "other", "ReceiptSet": []}]})
    batch = client.get_send_receipts(1, ["s1"])
    assert batch.receipts == ()
    assert len(batch.problems) == 1
    assert "other" in caplog.text
    assert "not asked" in caplog.text


def test_get_send_receipts_credentials_error(client: UspeedoClient) -> None:
    reply({"RetCode": 215398, "Message": "Failed to parse token"})
    with pytest.raises(CredentialsError) as info:
        client.get_send_receipts(1, ["s1"])
    check_error(info.value)
    assert len(responses.calls) == 1


# --------------------------------------------------------------------------------------------
# Receipt.from_payload


def parse_one(**overrides: Any) -> Receipt:
    return Receipt.from_payload("s1", receipt_json(**overrides), received_at=RECEIVED)


_DOCUMENTED_RECEIPT = {
    "CostCount": 6,
    "ReceiptTime": 6,
    "UserId": "1213",
    "ReceiptCode": "0",
    "Phone": "QbPtKJPa",
    "ReceiptResult": "Success",
    "ReceiptDesc": "DxMRsuET",
}


def test_receipt_from_the_documented_example() -> None:
    # The documentation's Phone is a placeholder without digits: no phone_key to store it
    # under, so it is refused by name (it used to vanish silently in the store).
    with pytest.raises(ValueError, match="Phone: no digits"):
        Receipt.from_payload("BmThtoRB", _DOCUMENTED_RECEIPT, received_at=RECEIVED)
    receipt = Receipt.from_payload(
        "BmThtoRB", {**_DOCUMENTED_RECEIPT, "Phone": "85255311111"}, received_at=RECEIVED
    )
    assert receipt == Receipt(
        session_no="BmThtoRB",
        phone="85255311111",
        result=Result.SUCCESS,
        receipt_code="0",
        receipt_desc="DxMRsuET",
        receipt_time=datetime(1970, 1, 1, 0, 0, 6, tzinfo=UTC),
        cost_count=6,
        user_id="1213",
        country_code=None,
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1_700_000_000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("1700000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        (" 1700000000 ", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        (1_700_000_000.5, datetime(2023, 11, 14, 22, 13, 20, 500_000, tzinfo=UTC)),
        ("1700000000.5", datetime(2023, 11, 14, 22, 13, 20, 500_000, tzinfo=UTC)),
        (1_700_000_000.0, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        (0, None),
        (0.0, None),
        ("0", None),
        ("", None),
        (None, None),
        (_ABSENT, None),
    ],
)
def test_receipt_time_forms(raw: Any, expected: datetime | None) -> None:
    receipt = parse_one(ReceiptTime=raw)
    assert receipt.receipt_time == expected
    if receipt.receipt_time is not None:
        assert receipt.receipt_time.tzinfo is UTC


@pytest.mark.parametrize(
    "raw",
    [
        "abc",
        "12abc",
        -1,
        "-5",
        -0.5,
        10**13,  # milliseconds, most likely: refused rather than guessed
        1e300,
        "1e400",
        "nan",
        "inf",
        pytest.param(10**5000, id="int-of-5001-digits"),
        True,
        [],
        {},
    ],
)
def test_bad_receipt_time_names_the_field(raw: Any) -> None:
    with pytest.raises(ValueError, match="ReceiptTime") as info:
        parse_one(ReceiptTime=raw)
    check_error(info.value)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (3, 3),
        ("3", 3),
        (3.0, 3),
        (0, 0),
        (None, None),
        (_ABSENT, None),
        ("", None),
        (2**31 - 1, 2**31 - 1),
    ],
)
def test_cost_count_forms(raw: Any, expected: int | None) -> None:
    assert parse_one(CostCount=raw).cost_count == expected


@pytest.mark.parametrize(
    # Beyond 2**31 - 1 the database column could not hold it, and the answer would not write.
    "raw",
    ["x", 2.5, -1, True, [1], "1.5", float("nan"), 2**31, 10**30, "1e12"],
)
def test_bad_cost_count_names_the_field(raw: Any) -> None:
    with pytest.raises(ValueError, match="CostCount"):
        parse_one(CostCount=raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("(852)55311111", "(852)55311111"),
        ("  +852 5531 1111\t", "+852 5531 1111"),
        (85255311111, "85255311111"),
    ],
)
def test_phone_forms(raw: Any, expected: str) -> None:
    assert parse_one(Phone=raw).phone == expected


@pytest.mark.parametrize("raw", [_ABSENT, None, "", "   ", True, 0, -5, ["1"], 1.5])
def test_bad_phone_names_the_field(raw: Any) -> None:
    with pytest.raises(ValueError, match="Phone"):
        parse_one(Phone=raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Success", Result.SUCCESS),
        ("Fail", Result.FAIL),
        ("Unknow", Result.UNKNOW),
        ("SubmitFail", Result.SUBMIT_FAIL),
        (" success ", Result.SUCCESS),
        ("发送成功", Result.SUCCESS),
        ("发送失败", Result.FAIL),
        ("状态未知", Result.UNKNOW),
    ],
)
def test_result_forms(raw: str, expected: Result) -> None:
    assert parse_one(ReceiptResult=raw).result is expected


@pytest.mark.parametrize("raw", ["Delivered", "", _ABSENT, None, 1, True, ["Success"]])
def test_bad_result_names_the_field(raw: Any) -> None:
    with pytest.raises(ValueError, match="ReceiptResult"):
        parse_one(ReceiptResult=raw)


def test_optional_text_fields() -> None:
    bare = parse_one(ReceiptCode=_ABSENT, ReceiptDesc=None, UserId=_ABSENT, CostCount=_ABSENT)
    assert (bare.receipt_code, bare.receipt_desc, bare.user_id, bare.cost_count) == (
        "",
        "",
        None,
        None,
    )
    numeric = parse_one(ReceiptCode=0, UserId=1213, ReceiptDesc=" ok ")
    assert (numeric.receipt_code, numeric.user_id, numeric.receipt_desc) == ("0", "1213", "ok")
    assert parse_one(UserId="").user_id is None


@pytest.mark.parametrize("field_name", ["ReceiptCode", "ReceiptDesc", "UserId", "CountryCode"])
@pytest.mark.parametrize("raw", [{}, ["x"], True, float("inf")])
def test_bad_text_field_names_the_field(field_name: str, raw: Any) -> None:
    with pytest.raises(ValueError, match=field_name):
        parse_one(**{field_name: raw})


def test_extra_fields_are_kept_where_useful_and_ignored_otherwise() -> None:
    receipt = parse_one(AccountId=99, CountryCode="HK", BrevityCode="852", Surprise={"a": [1]})
    assert receipt.country_code == "HK"
    assert receipt.result is Result.SUCCESS


def test_from_payload_refuses_a_non_object() -> None:
    with pytest.raises(ValueError, match="not an object"):
        Receipt.from_payload("s1", ["Phone"], received_at=RECEIVED)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# parse_receipts


@pytest.mark.parametrize(
    "payload",
    [None, [], "x", 1, {"Data": {}}, {"Data": "x"}, {"Data": 1}, {"Data": True}],
)
def test_parse_receipts_fatal_shapes(payload: Any) -> None:
    with pytest.raises(MalformedResponse) as info:
        parse_receipts(payload, ["s1"], "u-1", received_at=RECEIVED)
    check_error(info.value)
    assert info.value.retryable
    assert info.value.request_uuid == "u-1"
    assert "u-1" in str(info.value)


@pytest.mark.parametrize("payload", [{"RetCode": 0}, {"Data": None}, {"Data": []}])
def test_parse_receipts_nothing_yet(payload: Any) -> None:
    batch = parse_receipts(payload, ["s1"], "u-1", received_at=RECEIVED)
    assert batch.receipts == ()
    assert batch.problems == ()
    assert batch.request_uuid == "u-1"


def test_parse_receipts_skips_bad_entries_and_keeps_the_rest() -> None:
    good = receipt_json()
    payload = {
        "Data": [
            "not an object",
            None,
            [good],
            {"ReceiptSet": [good]},  # SessionNo missing
            {"SessionNo": 5, "ReceiptSet": [good]},
            {"SessionNo": "", "ReceiptSet": [good]},
            {"SessionNo": "stranger", "ReceiptSet": [good]},
            {"SessionNo": "s1", "ReceiptSet": {"Phone": "1"}},
            {"SessionNo": "s1", "ReceiptSet": "x"},
            {"SessionNo": "s1"},  # ReceiptSet omitted: nothing yet
            {"SessionNo": "s1", "ReceiptSet": None},
            {
                "SessionNo": "s2",
                "ReceiptSet": [
                    good,
                    "not an object",
                    receipt_json(Phone=""),
                    receipt_json(ReceiptResult="Delivered"),
                    receipt_json(ReceiptTime="abc"),
                    receipt_json(CostCount="x"),
                    receipt_json(
                        Phone="(852)2", ReceiptResult="发送失败", ReceiptTime="1700000001"
                    ),
                ],
            },
        ]
    }
    batch = parse_receipts(payload, {"s1", "s2"}, "u-1", received_at=RECEIVED)

    assert [(r.session_no, r.phone, r.result) for r in batch.receipts] == [
        ("s2", "(852)55311111", Result.SUCCESS),
        ("s2", "(852)2", Result.FAIL),
    ]
    problems = batch.problems
    assert len(problems) == 14
    assert problems[0].startswith("Data[0]")
    assert "Data[3]" in problems[3]
    assert "SessionNo" in problems[3]
    assert "'stranger'" in problems[6]
    assert "not asked" in problems[6]
    assert "ReceiptSet" in problems[7]
    assert "'s1'" in problems[7]
    s2_problems = problems[9:]
    assert ["ReceiptSet[1]" in p for p in s2_problems] == [True, False, False, False, False]
    for position, name in zip(
        (2, 3, 4, 5), ("Phone", "ReceiptResult", "ReceiptTime", "CostCount"), strict=True
    ):
        (matching,) = [p for p in s2_problems if f"ReceiptSet[{position}]" in p]
        assert name in matching
        assert "'s2'" in matching


def test_parse_receipts_keeps_duplicates_for_the_domain_to_pick() -> None:
    payload = {
        "Data": [
            {"SessionNo": "s1", "ReceiptSet": [receipt_json(ReceiptResult="Unknow")]},
            {"SessionNo": "s1", "ReceiptSet": [receipt_json()]},
        ]
    }
    batch = parse_receipts(payload, ["s1"], received_at=RECEIVED)
    assert [r.result for r in batch.receipts] == [Result.UNKNOW, Result.SUCCESS]
    assert batch.request_uuid is None


def test_parse_receipts_accepts_the_documented_example() -> None:
    payload = {
        "Action": "GetUSMSSendReceiptResponse",
        "Message": "OnVhSPcD",
        "Data": [{"SessionNo": "BmThtoRB", "ReceiptSet": [_DOCUMENTED_RECEIPT]}],
        "RetCode": 0,
    }
    batch = parse_receipts(payload, ["BmThtoRB"], received_at=RECEIVED)
    # Its placeholder Phone has no digits: named, as a problem of its session.
    assert batch.receipts == ()
    assert batch.session_problems == (
        (
            "BmThtoRB",
            "Data[0] (SessionNo 'BmThtoRB') ReceiptSet[0]: Phone: no digits in 'QbPtKJPa'",
        ),
    )
    payload["Data"] = [
        {"SessionNo": "BmThtoRB", "ReceiptSet": [{**_DOCUMENTED_RECEIPT, "Phone": "852553111"}]}
    ]
    batch = parse_receipts(payload, ["BmThtoRB"], received_at=RECEIVED)
    assert len(batch.receipts) == 1
    assert batch.problems == ()


_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["Success", "发送成功", "1700000000", "0", "", "nan", "-1", "1e999"])
    # What no database column can hold: NUL, and the lone surrogates a JSON escape decodes to.
    | st.sampled_from(["a\x00b", "\x00", "\ud800", "x\udfffy", "+852\x005531"])
)
_json = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)
_FIELDS = ["Phone", "CostCount", "ReceiptResult", "ReceiptCode", "ReceiptDesc", "ReceiptTime"]
_receipts = (
    st.dictionaries(
        st.sampled_from([*_FIELDS, "UserId", "CountryCode", "AccountId"]), _json, max_size=9
    )
    | _json
)
_entries = (
    st.fixed_dictionaries(
        {
            "SessionNo": st.sampled_from(["s1", "s2", "zz"]) | _json,
            "ReceiptSet": st.lists(_receipts, max_size=4) | _json,
        }
    )
    | _json
)
_payloads = st.fixed_dictionaries({"Data": st.lists(_entries, max_size=4) | _json}) | _json


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_payloads)
def test_parse_receipts_only_ever_raises_malformed(payload: Any) -> None:
    try:
        batch = parse_receipts(payload, ["s1", "s2"], received_at=RECEIVED)
    except MalformedResponse:
        return
    for receipt in batch.receipts:
        assert receipt.session_no in {"s1", "s2"}
        assert receipt.phone
        assert receipt.result in set(Result)
        assert receipt.receipt_time is None or receipt.receipt_time.tzinfo is UTC
        assert receipt.cost_count is None or 0 <= receipt.cost_count < 2**31
        for text in (receipt.phone, receipt.receipt_code, receipt.receipt_desc):
            assert _storable_in_postgresql(text)
        for optional in (receipt.user_id, receipt.country_code):
            assert optional is None or _storable_in_postgresql(optional)
    assert all(isinstance(p, str) and len(p) < 400 for p in batch.problems)


def _storable_in_postgresql(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("Delivered\x00", "Delivered\ufffd"),
        ("bad \ud800 half", "bad \ufffd half"),
        ("\udfff", "\ufffd"),
        ("送达", "送达"),
        ("plain", "plain"),
    ],
)
def test_text_no_database_can_hold_is_replaced_not_refused(raw: str, stored: str) -> None:
    """One odd character from the API must not make a whole answer unwritable."""
    entry = {"Phone": "85255311111", "ReceiptResult": "Success", "ReceiptDesc": raw}
    batch = parse_receipts(
        {"Data": [{"SessionNo": "s1", "ReceiptSet": [entry]}]}, ["s1"], received_at=RECEIVED
    )
    assert [r.receipt_desc for r in batch.receipts] == [stored]
    assert batch.problems == ()


# --------------------------------------------------------------------------------------------
# Answer size


def _padded(size: int) -> bytes:
    """OK_BODY as JSON, padded with whitespace to exactly ``size`` bytes."""
    text = json.dumps(OK_BODY).encode()
    return text[:-1] + b" " * (size - len(text)) + b"}"


def test_an_answer_past_the_cap_is_refused_naming_it(clock: FakeClock) -> None:
    reply(raw=_padded(1001))
    with make_client(clock, max_answer_bytes=1000) as c, pytest.raises(AnswerTooLarge) as info:
        c.call(ACTION, {"AccountId": 1})
    check_error(info.value)
    assert isinstance(info.value, MalformedResponse)
    assert "answer larger than 1000 bytes" in str(info.value)
    assert "RECEIPTS_API_MAX_ANSWER_BYTES" in str(info.value)
    assert info.value.limit == 1000
    assert info.value.request_uuid == UUID
    # The same sessions would get the same answer: not retried (the poller halves the batch).
    assert not info.value.retryable
    assert len(responses.calls) == 1
    assert clock.sleeps == []


def test_an_answer_of_exactly_the_cap_is_read(clock: FakeClock) -> None:
    reply(raw=_padded(1000))
    with make_client(clock, max_answer_bytes=1000) as c:
        assert c.call(ACTION, {"AccountId": 1}) == OK_BODY


def test_the_attempt_bound_defaults_to_both_timeouts(clock: FakeClock) -> None:
    with make_client(clock, connect_timeout=1.5, read_timeout=4.0) as c:
        assert c.attempt_timeout == 5.5
    with make_client(clock, attempt_timeout=2.0) as c:
        assert c.attempt_timeout == 2.0


def test_socket_timeouts_never_exceed_the_time_left(clock: FakeClock) -> None:
    reply()
    make_client(clock, connect_timeout=3.0, read_timeout=10.0).call(
        ACTION, {"AccountId": 1}, deadline=T0 + 2.5
    )
    assert timeout_of(responses.calls[0]) == (2.5, 2.5)


@pytest.mark.parametrize("bad", [{"attempt_timeout": 0.0}, {"max_answer_bytes": 0}])
def test_constructor_rejects_nonsense_bounds(clock: FakeClock, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        make_client(clock, **bad)
