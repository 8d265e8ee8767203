"""The Uspeedo API client: signed requests and bounded retries (errors are in ``worker.errors``,
receipt parsing in ``worker.receipts``).

Retrying happens here, one level above urllib3: Uspeedo rejects a replayed nonce and a stale
timestamp, so every attempt must be signed afresh, which urllib3's ``Retry`` cannot do (it
re-sends the same headers). The session's adapter is therefore mounted with ``max_retries=0``.

Backoff between attempts is "full jitter": ``min(backoff_max, backoff_base * 2**n) * U(0, 1)``
for the n-th retry (n from 0), raised to the server's ``Retry-After`` on 429/503 when that is
longer (but never beyond ``4 * backoff_max``, so a hostile header cannot park a worker).

Each attempt is bounded as a whole (``worker.bounded_http``): it ends within its own bound
(by default the connect and read timeouts together) and by the caller's deadline, however
slowly the answer comes, and reads at most ``max_answer_bytes`` of it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, NoReturn, Self, TypeVar

import requests

from worker import bounded_http
from worker.bounded_http import Answer
from worker.errors import (
    AnswerTooLarge,
    ApiError,
    MalformedResponse,
    PollWindowClosed,
    TransportError,
    UspeedoError,
    api_error,
    describe,
    show,
)
from worker.receipts import (
    DEFAULT_MAX_ANSWER_BYTES,
    RECEIPT_ACTION,
    ReceiptBatch,
    parse_receipts,
)
from worker.signing import new_nonce, signature

log = logging.getLogger(__name__)

MAX_SESSIONS_PER_CALL: Final = 100
REQUEST_UUID_HEADER: Final = "X-Speedo-Request-Uuid"

# One worker child polls with a handful of threads at most; a pool this size keeps their
# connections alive without letting one process open an unbounded number of sockets.
POOL_SIZE: Final = 10

_RETRY_AFTER_STATUSES: Final = frozenset({429, 503})


class _Secret:
    """Holds the AccessKeySecret so that no repr, vars() dump or debugger view prints it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # A pickled client would carry the secret into a result backend or a log of arguments.
        raise TypeError("the Uspeedo secret is not picklable")


_T = TypeVar("_T")

# Enough of an answer that is not the API's JSON to recognize what answered instead (an HTML
# error page's title, the start of a cut JSON text).
PROBE_EXCERPT_BYTES: Final = 80


@dataclass(frozen=True, kw_only=True, slots=True)
class Probe:
    """One attempt made by :meth:`UspeedoClient.probe` and what came back."""

    # None when the answer was the API's RetCode-0 JSON.
    error: UspeedoError | None
    request_uuid: str | None
    # By the client's clock, the one that signs X-Timestamp: when the attempt was signed and,
    # when an answer came, when it had been read.
    started_at: float
    answered_at: float | None
    # The answer's Date header in Unix seconds (a whole second), when it had a valid one.
    server_date: float | None
    status: int | None = None
    content_type: str = ""
    excerpt: bytes = b""  # the answer's first PROBE_EXCERPT_BYTES
    size: int = 0  # the answer's length in bytes


class UspeedoClient:
    """A signed, retrying client for one Uspeedo endpoint and key pair.

    Thread-safe as far as ``requests.Session`` is; create one per process after fork.
    """

    def __init__(
        self,
        *,
        api_url: str,
        access_key_id: str,
        access_key_secret: str,
        connect_timeout: float = 3.05,
        read_timeout: float = 10.0,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        attempt_timeout: float | None = None,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if attempt_timeout is not None and not attempt_timeout > 0:
            raise ValueError("attempt_timeout must be positive")
        if max_answer_bytes < 1:
            raise ValueError("max_answer_bytes must be positive")
        if backoff_base < 0 or backoff_max < 0:
            raise ValueError("backoff must not be negative")
        if not access_key_id or not access_key_secret:
            raise ValueError("access_key_id and access_key_secret are required")
        self.api_url = api_url
        self.access_key_id = access_key_id
        self._secret = _Secret(access_key_secret)
        self.timeout = (connect_timeout, read_timeout)
        # One attempt as a whole: connecting, sending, and the whole answer.
        self.attempt_timeout = attempt_timeout or connect_timeout + read_timeout
        self.max_answer_bytes = max_answer_bytes
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        self._monotonic = monotonic
        self._owns_session = session is None
        if session is None:
            session = bounded_http.new_session(pool_maxsize=POOL_SIZE)
        self._session = session

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(api_url={self.api_url!r}, "
            f"access_key_id={self.access_key_id!r}, access_key_secret='***')"
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool, unless the session was lent by the caller."""
        if self._owns_session:
            self._session.close()

    def deadline_in(self, seconds: float) -> float:
        """The ``deadline`` argument for "``seconds`` from now" by this client's own clock
        (the host's, which signs X-Timestamp): a caller's deadline comes from the database's
        clock, and a host whose clock is off must not take it as already passed."""
        return self._clock() + seconds

    # -- public calls ------------------------------------------------------------------------

    def call(
        self, action: str, params: Mapping[str, Any], *, deadline: float | None = None
    ) -> dict[str, Any]:
        """Call ``action`` and return the decoded body of its RetCode-0 answer. No attempt
        starts after ``deadline`` (Unix seconds by the client's ``clock``), and none runs
        past it."""
        return self._call(action, params, deadline, lambda body, _uuid: body)

    def get_send_receipts(
        self, account_id: int, session_nos: Sequence[str], *, deadline: float | None = None
    ) -> ReceiptBatch:
        """Receipts for up to 100 SessionNos of one account."""
        if isinstance(session_nos, str):
            raise TypeError("session_nos must be a sequence of strings, not a string")
        asked = list(session_nos)
        if not 1 <= len(asked) <= MAX_SESSIONS_PER_CALL:
            raise ValueError(
                f"GetUSMSSendReceipt takes 1 to {MAX_SESSIONS_PER_CALL} SessionNos, "
                f"got {len(asked)}"
            )
        # Parsing inside the retry loop: a Data of the wrong shape is retried like any other
        # malformed answer.
        batch = self._call(
            RECEIPT_ACTION,
            {"AccountId": account_id, "SessionNoSet": asked},
            deadline,
            lambda body, uuid: parse_receipts(
                body, asked, uuid, received_at=datetime.fromtimestamp(self._clock(), UTC)
            ),
        )
        if batch.problems:
            log.warning(
                "%s skipped %d entries or receipts (request uuid %s): %s",
                RECEIPT_ACTION,
                len(batch.problems),
                batch.request_uuid,
                "; ".join(batch.problems[:5]) + ("; ..." if len(batch.problems) > 5 else ""),
            )
        return batch

    def probe(self, account_id: int, session_no: str) -> Probe:
        """One attempt of GetUSMSSendReceipt for ``session_no``, never retried nor logged, and
        what came back, failures included, instead of raising: what ``receipts check`` judges
        (worker/check.py)."""
        body, payload = _encode(
            RECEIPT_ACTION, {"AccountId": account_id, "SessionNoSet": [session_no]}
        )
        signed = signature(body, self._secret.reveal())
        started = self._clock()
        try:
            answer = self._post(RECEIPT_ACTION, payload, signed, self.attempt_timeout)
        except UspeedoError as exc:
            error = _redacted(exc, signed)
            return Probe(
                error=error,
                request_uuid=error.request_uuid,
                started_at=started,
                answered_at=None,
                server_date=None,
                status=error.http_status,
            )
        answered = self._clock()
        uuid = _request_uuid(answer.headers)
        failure: UspeedoError | None = None
        try:
            decoded = self._decode(RECEIPT_ACTION, answer)
            parse_receipts(
                decoded, [session_no], uuid, received_at=datetime.fromtimestamp(answered, UTC)
            )
        except UspeedoError as exc:
            failure = _redacted(exc, signed)
        return Probe(
            error=failure,
            request_uuid=uuid,
            started_at=started,
            answered_at=answered,
            server_date=_http_date(answer.headers.get("Date")),
            status=answer.status,
            content_type=answer.headers.get("Content-Type", ""),
            excerpt=answer.body[:PROBE_EXCERPT_BYTES],
            size=len(answer.body),
        )

    # -- machinery ---------------------------------------------------------------------------

    def _call(
        self,
        action: str,
        params: Mapping[str, Any],
        deadline: float | None,
        parse: Callable[[dict[str, Any], str | None], _T],
    ) -> _T:
        body, payload = _encode(action, params)
        last_error: UspeedoError | None = None
        for attempt in range(1, self.max_attempts + 1):
            within = self.attempt_timeout
            if deadline is not None:
                within = min(within, deadline - self._clock())
                if within <= 0:
                    if last_error is None:
                        raise PollWindowClosed(
                            describe(action, "deadline passed before the first attempt", None),
                            action=action,
                        )
                    raise last_error
            retry_after: float | None = None
            signed = signature(body, self._secret.reveal())
            try:
                answer = self._post(action, payload, signed, within)
                retry_after = self._retry_after(answer)
                return parse(self._decode(action, answer), _request_uuid(answer.headers))
            except UspeedoError as error:
                last_error = _redacted(error, signed)
            log.warning(
                "%s attempt %d/%d failed: %s",
                action,
                attempt,
                self.max_attempts,
                last_error,
                extra={
                    "uspeedo_action": action,
                    "attempt": attempt,
                    "request_uuid": last_error.request_uuid,
                },
            )
            if not last_error.retryable or attempt == self.max_attempts:
                raise last_error
            delay = self._backoff(attempt - 1, retry_after)
            if deadline is not None and self._clock() + delay >= deadline:
                # The next attempt could not start in time: waiting would only delay the news.
                raise last_error
            self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _post(self, action: str, payload: bytes, signed: str, within: float) -> Answer:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "X-Access-Key-Id": self.access_key_id,
            "X-Timestamp": str(int(self._clock())),
            "X-Nonce": new_nonce(),
            "X-Signature": signed,
        }
        try:
            # Redirects are not followed: a redirected POST turns into a GET, and a moved
            # endpoint is a configuration error.
            return bounded_http.post(
                self._session,
                self.api_url,
                data=payload,
                headers=headers,
                within=within,
                connect_timeout=self.timeout[0],
                read_timeout=self.timeout[1],
                limit=self.max_answer_bytes,
                monotonic=self._monotonic,
            )
        except bounded_http.BodyTooLarge as exc:
            uuid = _request_uuid(exc.headers)
            raise AnswerTooLarge(
                describe(
                    action,
                    f"answer larger than {exc.limit} bytes (RECEIPTS_API_MAX_ANSWER_BYTES)",
                    uuid,
                    exc.status,
                ),
                limit=exc.limit,
                request_uuid=uuid,
                action=action,
                http_status=exc.status,
            ) from None
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError,
        ) as exc:
            raise TransportError(
                describe(action, f"{type(exc).__name__}: {_exception_text(exc)}", None),
                action=action,
            ) from exc
        except requests.RequestException as exc:
            # Invalid URL, schema and the like: no later attempt will fix them.
            raise TransportError(
                describe(action, f"{type(exc).__name__}: {_exception_text(exc)}", None),
                action=action,
                retryable=False,
            ) from exc

    def _decode(self, action: str, answer: Answer) -> dict[str, Any]:
        status = answer.status
        uuid = _request_uuid(answer.headers)
        if status == 429 or status >= 500:
            raise TransportError(
                describe(action, f"HTTP {status}", uuid),
                request_uuid=uuid,
                action=action,
                http_status=status,
            )
        body = _json_object(answer.body)
        if not 200 <= status < 300:
            ret_code = body.get("RetCode") if body is not None else None
            if isinstance(ret_code, int) and not isinstance(ret_code, bool) and ret_code != 0:
                # An HTTP error that still explains itself in the API's terms (e.g. a 401 with
                # 215398) is better reported as that, so callers can tell bad keys apart.
                self._raise_api_error(action, body or {}, ret_code, uuid, status)
            raise TransportError(
                describe(action, f"HTTP {status}", uuid),
                request_uuid=uuid,
                action=action,
                http_status=status,
                retryable=False,
            )
        if body is None:
            raise MalformedResponse(
                describe(
                    action,
                    f"body is not a JSON object ({len(answer.body)} bytes)",
                    uuid,
                    status,
                ),
                request_uuid=uuid,
                action=action,
                http_status=status,
            )
        ret_code = body.get("RetCode")
        if not isinstance(ret_code, int) or isinstance(ret_code, bool):
            raise MalformedResponse(
                describe(action, f"RetCode missing or not an integer: {show(ret_code)}", uuid),
                request_uuid=uuid,
                action=action,
                http_status=status,
            )
        if ret_code != 0:
            self._raise_api_error(action, body, ret_code, uuid, None)
        return body

    def _raise_api_error(
        self,
        action: str,
        body: Mapping[str, Any],
        ret_code: int,
        uuid: str | None,
        status: int | None,
    ) -> NoReturn:
        message = body.get("Message")
        text = message if isinstance(message, str) else ("" if message is None else show(message))
        raise api_error(ret_code, text[:500], uuid, action=action, http_status=status)

    def _retry_after(self, answer: Answer) -> float | None:
        if answer.status not in _RETRY_AFTER_STATUSES:
            return None
        value = answer.headers.get("Retry-After")
        if not value:
            return None
        value = value.strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            if when.tzinfo is None:  # RFC 9110 dates are GMT
                when = when.replace(tzinfo=UTC)
            seconds = when.timestamp() - self._clock()
        if not math.isfinite(seconds):
            return None
        return max(0.0, seconds)

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        # Exponent capped so that 2**n cannot overflow on absurd max_attempts.
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** min(retry, 62))
        delay = ceiling * self._rng()
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max * 4))
        return delay


def _redacted(error: UspeedoError, signed: str) -> UspeedoError:
    """The error with this attempt's signature masked, should the server have echoed it."""
    if signed in str(error):
        error.args = tuple(
            arg.replace(signed, "<signature>") if isinstance(arg, str) else arg
            for arg in error.args
        )
    if isinstance(error, ApiError) and signed in error.api_message:
        error.api_message = error.api_message.replace(signed, "<signature>")
    return error


def _encode(action: str, params: Mapping[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The request's body, as signed and as sent."""
    body = {"Action": action, **{k: v for k, v in params.items() if v is not None}}
    # allow_nan=False: the signature refuses NaN too, and the API would not parse it.
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return body, data.encode("utf-8")


def _http_date(value: str | None) -> float | None:
    """An HTTP ``Date`` header in Unix seconds, or None when absent or unreadable."""
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _request_uuid(headers: Mapping[str, str]) -> str | None:
    value = headers.get(REQUEST_UUID_HEADER)
    return value.strip() or None if value else None


def _json_object(content: bytes) -> dict[str, Any] | None:
    try:
        decoded = json.loads(content)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are both here
        return None
    return decoded if isinstance(decoded, dict) else None


def _exception_text(exc: BaseException) -> str:
    # requests' messages name the URL and the underlying urllib3 reason, never the headers.
    return str(exc)[:300] or "no detail"
