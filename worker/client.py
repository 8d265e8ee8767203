"""The Uspeedo API client: signed requests, bounded retries, typed errors and receipt parsing.

Retrying happens here, one level above urllib3: Uspeedo rejects a replayed nonce and a stale
timestamp, so every attempt must be signed afresh, which urllib3's ``Retry`` cannot do (it
re-sends the same headers). The session's adapter is therefore mounted with ``max_retries=0``.

Backoff between attempts is "full jitter": ``min(backoff_max, backoff_base * 2**n) * U(0, 1)``
for the n-th retry (n from 0), raised to the server's ``Retry-After`` on 429/503 when that is
longer (but never beyond ``4 * backoff_max``, so a hostile header cannot park a worker).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, NoReturn, Self, TypeVar

import requests
from requests.adapters import HTTPAdapter

from worker.domain import Result, normalize_result
from worker.signing import new_nonce, signature

log = logging.getLogger(__name__)

RECEIPT_ACTION: Final = "GetUSMSSendReceipt"
MAX_SESSIONS_PER_CALL: Final = 100
REQUEST_UUID_HEADER: Final = "X-Speedo-Request-Uuid"

RET_INVALID_PARAMETER: Final = 215392
RET_MISSING_PARAMETER: Final = 215397
RET_BAD_CREDENTIALS: Final = 215398
RET_SERVER_ERROR: Final = 215400

# One worker child polls with a handful of threads at most; a pool this size keeps their
# connections alive without letting one process open an unbounded number of sockets.
POOL_SIZE: Final = 10

# 9999-12-31T23:59:59Z: the last instant ``datetime`` can hold.
_MAX_TIMESTAMP: Final = 253_402_300_799

# The largest sms_receipts.cost_count can hold (a PostgreSQL integer).
_MAX_COST_COUNT: Final = 2**31 - 1

_RETRY_AFTER_STATUSES: Final = frozenset({429, 503})


# --------------------------------------------------------------------------------------------
# Errors


class UspeedoError(Exception):
    """Base of every error the client raises.

    ``retryable`` tells the caller whether polling again later may succeed; the client has
    already spent its own attempts by the time it raises.
    """

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        request_uuid: str | None = None,
        retryable: bool | None = None,
        action: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.request_uuid = request_uuid
        self.action = action
        self.http_status = http_status
        if retryable is not None:
            self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:
        # The keyword-only attributes would be lost by Exception's default pickling (which
        # replays only ``args``); Celery pickles exceptions that escape a task.
        return (_rebuild_error, (type(self), self.args, dict(self.__dict__)))


def _rebuild_error(
    cls: type[UspeedoError], args: tuple[Any, ...], state: dict[str, Any]
) -> UspeedoError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class TransportError(UspeedoError):
    """The request did not produce a usable HTTP answer: connection error, timeout, HTTP error."""

    retryable = True


class MalformedResponse(UspeedoError):
    """The answer was not the JSON object the API documents."""

    retryable = True


class PollWindowClosed(UspeedoError):
    """The deadline passed before any attempt could start."""

    retryable = False


class ApiError(UspeedoError):
    """The API answered with a non-zero RetCode."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        ret_code: int = 0,
        api_message: str = "",
        request_uuid: str | None = None,
        retryable: bool | None = None,
        action: str | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(
            message,
            request_uuid=request_uuid,
            retryable=retryable,
            action=action,
            http_status=http_status,
        )
        self.ret_code = ret_code
        self.api_message = api_message


class CredentialsError(ApiError):
    """Invalid or expired AccessKey (or a clock skewed beyond five minutes)."""

    retryable = False


class ParameterError(ApiError):
    """The request itself is wrong; sending it again cannot help."""

    retryable = False


class ServerError(ApiError):
    """Uspeedo's own failure; worth another try."""

    retryable = True


_API_ERRORS: Final[dict[int, type[ApiError]]] = {
    RET_BAD_CREDENTIALS: CredentialsError,
    RET_INVALID_PARAMETER: ParameterError,
    RET_MISSING_PARAMETER: ParameterError,
    RET_SERVER_ERROR: ServerError,
}


def api_error(
    ret_code: int,
    message: str,
    request_uuid: str | None,
    *,
    action: str | None = None,
    http_status: int | None = None,
) -> ApiError:
    """The ApiError subclass for a RetCode; unknown codes give a plain, non-retryable ApiError."""
    cls = _API_ERRORS.get(ret_code, ApiError)
    return cls(
        _describe(action, f"RetCode {ret_code} {message!r}", request_uuid, http_status),
        ret_code=ret_code,
        api_message=message,
        request_uuid=request_uuid,
        action=action,
        http_status=http_status,
    )


def _describe(
    action: str | None, reason: str, request_uuid: str | None, http_status: int | None = None
) -> str:
    parts = [f"{action or 'Uspeedo call'}: {reason}"]
    if http_status is not None and f"HTTP {http_status}" not in reason:
        parts.append(f"HTTP {http_status}")
    parts.append(f"request uuid {request_uuid}" if request_uuid else "no request uuid")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Receipts


@dataclass(frozen=True, kw_only=True, slots=True)
class Receipt:
    """One phone's receipt as reported by GetUSMSSendReceipt."""

    session_no: str  # the SessionNo the receipt was reported under
    phone: str  # as Uspeedo spelled it, stripped; match on domain.phone_key()
    result: Result  # normalized to Uspeedo's spelling (Chinese aliases mapped)
    receipt_code: str  # operator status code; "" when absent
    receipt_desc: str  # human description of the code; "" when absent
    receipt_time: datetime | None  # UTC; None when absent or 0 (not yet reported)
    cost_count: int | None  # billed message parts
    user_id: str | None  # the sender's own reference, when it gave one
    country_code: str | None  # carried by some responses only

    @classmethod
    def from_payload(cls, session_no: str, entry: Mapping[str, Any]) -> Receipt:
        """Parse one ``ReceiptSet`` element; ValueError names the field that is wrong."""
        if not isinstance(entry, Mapping):
            raise ValueError(f"receipt is not an object: {_show(entry)}")
        raw_result = entry.get("ReceiptResult")
        if not isinstance(raw_result, str):
            raise ValueError(f"ReceiptResult: expected a string, got {_show(raw_result)}")
        try:
            result = normalize_result(raw_result)
        except ValueError as exc:
            raise ValueError(f"ReceiptResult: {exc}") from None
        return cls(
            session_no=session_no,
            phone=_phone(entry.get("Phone")),
            result=result,
            receipt_code=_text(entry, "ReceiptCode") or "",
            receipt_desc=_text(entry, "ReceiptDesc") or "",
            receipt_time=_timestamp(entry.get("ReceiptTime")),
            cost_count=_count(entry.get("CostCount")),
            user_id=_text(entry, "UserId") or None,
            country_code=_text(entry, "CountryCode") or None,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceiptBatch:
    """The receipts of one call, and what had to be skipped to get them."""

    receipts: tuple[Receipt, ...]
    problems: tuple[str, ...]  # one line per skipped entry or receipt, naming where it was
    request_uuid: str | None
    # The problems that belong to an asked session, as (SessionNo, problem): kept on that
    # session's row as its last_error.
    session_problems: tuple[tuple[str, str], ...] = ()


def parse_receipts(
    payload: Any, asked: Collection[str], request_uuid: str | None = None
) -> ReceiptBatch:
    """Receipts from the decoded body of a RetCode-0 GetUSMSSendReceipt response.

    Only the overall shape is fatal (``MalformedResponse``): the body not an object or ``Data``
    not a list. One bad entry or receipt is skipped and described in ``problems`` so that one
    odd phone cannot hold back the receipts of the other 99 sessions.
    """
    if not isinstance(payload, Mapping):
        raise MalformedResponse(
            _describe(RECEIPT_ACTION, f"body is not an object: {_show(payload)}", request_uuid),
            request_uuid=request_uuid,
            action=RECEIPT_ACTION,
        )
    data = payload.get("Data")
    if data is None:
        # Nothing known yet for any of the sessions; the API may omit the field then.
        return ReceiptBatch(receipts=(), problems=(), request_uuid=request_uuid)
    if not isinstance(data, list):
        raise MalformedResponse(
            _describe(RECEIPT_ACTION, f"Data is not a list: {_show(data)}", request_uuid),
            request_uuid=request_uuid,
            action=RECEIPT_ACTION,
        )

    wanted = frozenset(asked)
    receipts: list[Receipt] = []
    problems: list[str] = []
    session_problems: list[tuple[str, str]] = []
    for index, entry in enumerate(data):
        where = f"Data[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: not an object: {_show(entry)}")
            continue
        session_no = entry.get("SessionNo")
        if not isinstance(session_no, str) or not session_no:
            problems.append(f"{where}: SessionNo: expected a string, got {_show(session_no)}")
            continue
        where = f"{where} (SessionNo {session_no!r})"
        if session_no not in wanted:
            # Never attribute receipts to a session we did not ask about: it may belong to
            # another account, and storing it would invent a session.
            problems.append(f"{where}: SessionNo was not asked for")
            continue
        receipt_set = entry.get("ReceiptSet")
        if receipt_set is None:
            # Go's omitempty drops empty arrays: no receipt yet.
            continue
        if not isinstance(receipt_set, list):
            problem = f"{where}: ReceiptSet: expected a list, got {_show(receipt_set)}"
            problems.append(problem)
            session_problems.append((session_no, problem))
            continue
        for position, raw in enumerate(receipt_set):
            try:
                receipts.append(Receipt.from_payload(session_no, raw))
            except ValueError as exc:
                problem = f"{where} ReceiptSet[{position}]: {exc}"
                problems.append(problem)
                session_problems.append((session_no, problem))
    return ReceiptBatch(
        receipts=tuple(receipts),
        problems=tuple(problems),
        request_uuid=request_uuid,
        session_problems=tuple(session_problems),
    )


def _show(value: Any, limit: int = 80) -> str:
    """A short repr for error messages: payload values can be arbitrarily large."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits()
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(text: str) -> str:
    """``text`` with what no database column can hold replaced by U+FFFD: NUL (PostgreSQL
    refuses it in text) and lone surrogates (a JSON ``\\ud800`` escape decodes to one, and it
    has no UTF-8 form). One such character must not make a whole answer unwritable."""
    if text.isascii() and "\x00" not in text:
        return text
    return _UNSTORABLE.sub("\ufffd", text)


def _phone(value: Any) -> str:
    # Some products send numbers without a prefix as JSON numbers; the digits are what count.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"Phone: expected a string, got {_show(value)}")
    phone = _storable(value.strip())
    if not phone:
        raise ValueError("Phone: empty")
    return phone


def _text(entry: Mapping[str, Any], field: str) -> str | None:
    """An optional string field; numbers are accepted (ReceiptCode is sometimes sent as 0)."""
    value = entry.get(field)
    if value is None:
        return None
    if isinstance(value, str):
        return _storable(value.strip())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _number_text(value, field)
    raise ValueError(f"{field}: expected a string, got {_show(value)}")


def _number_text(value: float, field: str) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{field}: expected a string, got {_show(value)}")
        if value.is_integer():
            value = int(value)
    try:
        return str(value)
    except ValueError:  # too many digits to print
        raise ValueError(f"{field}: number too large: {_show(value)}") from None


def _number(value: Any, field: str) -> int | float:
    """A JSON number, or a string holding one (some Uspeedo products quote numbers)."""
    if isinstance(value, bool):  # bool is an int subclass, and never a count or a time
        raise ValueError(f"{field}: expected a number, got {_show(value)}")
    if isinstance(value, int | float):
        number: int | float = value
    elif isinstance(value, str):
        text = value.strip()
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise ValueError(f"{field}: not a number: {_show(value)}") from None
    else:
        raise ValueError(f"{field}: expected a number, got {_show(value)}")
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"{field}: not a finite number: {_show(value)}")
    return number


def _timestamp(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    seconds = _number(value, "ReceiptTime")
    if seconds == 0:  # the API's "not reported yet"
        return None
    if seconds < 0:
        raise ValueError(f"ReceiptTime: negative: {_show(value)}")
    if seconds > _MAX_TIMESTAMP:
        # Most likely milliseconds; refusing is safer than guessing the unit.
        raise ValueError(f"ReceiptTime: out of range: {_show(value)}")
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"ReceiptTime: out of range: {_show(value)}") from None


def _count(value: Any) -> int | None:
    if value is None or value == "":
        return None
    number = _number(value, "CostCount")
    if isinstance(number, float):
        if not number.is_integer():
            raise ValueError(f"CostCount: not a whole number: {_show(value)}")
        number = int(number)
    if number < 0:
        raise ValueError(f"CostCount: negative: {_show(value)}")
    if number > _MAX_COST_COUNT:
        # The column is a 32-bit integer: a larger count would make the whole answer unwritable.
        raise ValueError(f"CostCount: out of range: {_show(value)}")
    return number


# --------------------------------------------------------------------------------------------
# The client


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
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if backoff_base < 0 or backoff_max < 0:
            raise ValueError("backoff must not be negative")
        if not access_key_id or not access_key_secret:
            raise ValueError("access_key_id and access_key_secret are required")
        self.api_url = api_url
        self.access_key_id = access_key_id
        self._secret = _Secret(access_key_secret)
        self.timeout = (connect_timeout, read_timeout)
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=POOL_SIZE, max_retries=0)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
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

    # -- public calls ------------------------------------------------------------------------

    def call(
        self, action: str, params: Mapping[str, Any], *, deadline: float | None = None
    ) -> dict[str, Any]:
        """Call ``action`` and return the decoded body of its RetCode-0 answer."""
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
            lambda body, uuid: parse_receipts(body, asked, uuid),
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

    # -- machinery ---------------------------------------------------------------------------

    def _call(
        self,
        action: str,
        params: Mapping[str, Any],
        deadline: float | None,
        parse: Callable[[dict[str, Any], str | None], _T],
    ) -> _T:
        body = {"Action": action, **{k: v for k, v in params.items() if v is not None}}
        # allow_nan=False: the signature refuses NaN too, and the API would not parse it.
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        payload = data.encode("utf-8")
        last_error: UspeedoError | None = None
        for attempt in range(1, self.max_attempts + 1):
            if deadline is not None and self._clock() >= deadline:
                if last_error is None:
                    raise PollWindowClosed(
                        _describe(action, "deadline passed before the first attempt", None),
                        action=action,
                    )
                raise last_error
            retry_after: float | None = None
            signed = signature(body, self._secret.reveal())
            try:
                response = self._post(action, payload, signed)
                retry_after = self._retry_after(response)
                return parse(self._decode(action, response), _request_uuid(response))
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

    def _post(self, action: str, payload: bytes, signed: str) -> requests.Response:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "X-Access-Key-Id": self.access_key_id,
            "X-Timestamp": str(int(self._clock())),
            "X-Nonce": new_nonce(),
            "X-Signature": signed,
        }
        try:
            return self._session.post(
                self.api_url,
                data=payload,
                headers=headers,
                timeout=self.timeout,
                # A redirected POST turns into a GET; a moved endpoint is a configuration error.
                allow_redirects=False,
            )
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError,
        ) as exc:
            raise TransportError(
                _describe(action, f"{type(exc).__name__}: {_exception_text(exc)}", None),
                action=action,
            ) from exc
        except requests.RequestException as exc:
            # Invalid URL, schema and the like: no later attempt will fix them.
            raise TransportError(
                _describe(action, f"{type(exc).__name__}: {_exception_text(exc)}", None),
                action=action,
                retryable=False,
            ) from exc

    def _decode(self, action: str, response: requests.Response) -> dict[str, Any]:
        status = response.status_code
        uuid = _request_uuid(response)
        if status == 429 or status >= 500:
            raise TransportError(
                _describe(action, f"HTTP {status}", uuid),
                request_uuid=uuid,
                action=action,
                http_status=status,
            )
        body = _json_object(response.content)
        if not 200 <= status < 300:
            ret_code = body.get("RetCode") if body is not None else None
            if isinstance(ret_code, int) and not isinstance(ret_code, bool) and ret_code != 0:
                # An HTTP error that still explains itself in the API's terms (e.g. a 401 with
                # 215398) is better reported as that, so callers can tell bad keys apart.
                self._raise_api_error(action, body or {}, ret_code, uuid, status)
            raise TransportError(
                _describe(action, f"HTTP {status}", uuid),
                request_uuid=uuid,
                action=action,
                http_status=status,
                retryable=False,
            )
        if body is None:
            raise MalformedResponse(
                _describe(
                    action,
                    f"body is not a JSON object ({len(response.content)} bytes)",
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
                _describe(action, f"RetCode missing or not an integer: {_show(ret_code)}", uuid),
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
        text = message if isinstance(message, str) else ("" if message is None else _show(message))
        raise api_error(ret_code, text[:500], uuid, action=action, http_status=status)

    def _retry_after(self, response: requests.Response) -> float | None:
        if response.status_code not in _RETRY_AFTER_STATUSES:
            return None
        value = response.headers.get("Retry-After")
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


def _request_uuid(response: requests.Response) -> str | None:
    value = response.headers.get(REQUEST_UUID_HEADER)
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
