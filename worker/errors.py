"""Every error the package raises to its callers, in one tree.

::

    ReceiptsError                       anything this package raises on purpose
    ├── SettingsError                   invalid RECEIPTS_* settings, one line per variable
    ├── DatabaseMissing                 the SQLite file of RECEIPTS_DATABASE_URL does not exist:
    │   (sqlite3.OperationalError)      only migrations create it (``receipts migrate``)
    ├── TrackError (ValueError)         sessions that cannot be tracked; names every bad row
    ├── TrackInterrupted                a streamed import stopped by the database part way;
    │                                   ``recorded`` rows are in, running it again completes it
    ├── AckError (LookupError)          escalations that cannot be acknowledged; all or none
    ├── SessionNotFound (LookupError)   ``receipts status`` of a SessionNo that is not tracked
    ├── RejectedTrackError              refused receipts.track tasks that cannot be resubmitted
    │   (LookupError)                   or dismissed (unknown, or closed already); all or none
    ├── ParkedBatchError                parked event batches that cannot be replayed or
    │   (LookupError)                   dismissed (unknown, or closed already); all or none
    └── UspeedoError                    a call to the Uspeedo API failed; ``retryable`` says
        │                               whether polling again later may succeed
        ├── TransportError              no usable HTTP answer (connection, timeout, HTTP error)
        ├── MalformedResponse           the answer is not the JSON the API documents
        │   └── AnswerTooLarge          longer than the cap (``limit``); not read further
        ├── PollWindowClosed            the deadline passed before any attempt could start
        └── ApiError                    a non-zero RetCode (``ret_code``, ``api_message``)
            ├── CredentialsError        215398: invalid or expired AccessKey, or clock skew
            ├── ParameterError          215392/215397: the request itself is wrong
            └── ServerError             215400: Uspeedo's own failure, worth another try

All are importable from ``worker`` too (``from worker import TrackError``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Final

RET_INVALID_PARAMETER: Final = 215392
RET_MISSING_PARAMETER: Final = 215397
RET_BAD_CREDENTIALS: Final = 215398
RET_SERVER_ERROR: Final = 215400


class ReceiptsError(Exception):
    """Base of every error this package raises on purpose."""


class SettingsError(ReceiptsError):
    """Invalid settings, with one line per problem naming the environment variable."""


class DatabaseMissing(ReceiptsError, sqlite3.OperationalError):
    """The SQLite file of ``RECEIPTS_DATABASE_URL`` does not exist. Only the migrations create
    it: a command that reads (``receipts status``) or a worker started before ``receipts
    migrate`` would otherwise leave an empty file behind and fail on its missing tables.

    A DBAPI error, so that SQLAlchemy wraps it as any failed connection and every caller that
    handles database errors handles this one; not one that retrying fixes."""

    # SQLITE_CANTOPEN, which worker.db.is_transient does not retry.
    sqlite_errorcode = 14

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"unable to open database file: {path} does not exist")


class TrackError(ReceiptsError, ValueError):
    """Input that cannot be tracked; the message names every bad row and field, and says that
    nothing was recorded."""

    def __init__(self, problems: Sequence[str], *, valid_rows: int = 0, omitted: int = 0) -> None:
        self.problems = list(problems)
        self.valid_rows = valid_rows
        # Bad rows counted but not named, past the cap of a streamed import.
        self.omitted = omitted
        total = len(problems) + omitted
        noun = "problem" if total == 1 else "problems"
        more = f"; and {omitted} more bad row(s)" if omitted else ""
        tail = (
            f"; nothing was recorded (the {valid_rows} valid row(s) were not recorded either)"
            if valid_rows
            else "; nothing was recorded"
        )
        super().__init__(f"{total} {noun}: " + "; ".join(self.problems) + more + tail)


class TrackInterrupted(ReceiptsError):
    """A streamed import (``receipts track``) that the database stopped part way: the first
    ``recorded`` of ``total`` valid rows were recorded, each chunk in its own transaction.
    Tracking is idempotent, so running the same import again completes it."""

    def __init__(self, cause: str, *, recorded: int, total: int) -> None:
        self.recorded = recorded
        self.total = total
        super().__init__(
            f"{cause}; {recorded} of {total} row(s) were recorded before it, and stay recorded; "
            "running the same command again completes the import (tracking is idempotent)"
        )


class AckError(ReceiptsError, LookupError):
    """Sessions that cannot be acknowledged; the message names each and why."""


class SessionNotFound(ReceiptsError, LookupError):
    """A SessionNo that is not tracked (or is ambiguous across accounts without an account)."""


class RejectedTrackError(ReceiptsError, LookupError):
    """Rejected ``receipts.track`` tasks (``rejected_tracks`` rows) that cannot be resubmitted
    or dismissed: unknown ids, or rows already resubmitted or dismissed. The message names each;
    nothing was changed."""


class ParkedBatchError(ReceiptsError, LookupError):
    """Parked event batches (``receipts_parked_event_batches`` rows) that cannot be replayed
    or dismissed: unknown ids, or batches already replayed or dismissed. The message names
    each; nothing was changed."""


class UspeedoError(ReceiptsError):
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


class AnswerTooLarge(MalformedResponse):
    """The answer is longer than the client's cap (``limit`` bytes); no more of it was read.
    Asking again for the same sessions would get the same answer, so it is not retried; a
    smaller batch may fit."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        limit: int = 0,
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
        self.limit = limit


class PollWindowClosed(UspeedoError):
    """The deadline passed before any attempt could start."""

    retryable = False


class ApiError(UspeedoError):
    """The API answered with a non-zero RetCode."""

    retryable = False

    def __init__(
        self, message: str, *, ret_code: int = 0, api_message: str = "", **context: Any
    ) -> None:
        # ``context``: UspeedoError's request_uuid, retryable, action and http_status.
        super().__init__(message, **context)
        self.ret_code = ret_code
        self.api_message = api_message


class CredentialsError(ApiError):
    """Invalid or expired AccessKey (or a clock skewed beyond five minutes)."""

    retryable = False


# What to do about a CredentialsError, in every message that reports one.
CREDENTIALS_HINT: Final = (
    "the AccessKey id/secret is wrong or expired: check RECEIPTS_ACCESS_KEY_ID and "
    "RECEIPTS_ACCESS_KEY_SECRET"
)


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
        describe(action, f"RetCode {ret_code} {message!r}", request_uuid, http_status),
        ret_code=ret_code,
        api_message=message,
        request_uuid=request_uuid,
        action=action,
        http_status=http_status,
    )


def describe(
    action: str | None, reason: str, request_uuid: str | None, http_status: int | None = None
) -> str:
    """An API error's message: the action, the reason, the HTTP status when it adds anything,
    and Uspeedo's request uuid (what its support asks for)."""
    parts = [f"{action or 'Uspeedo call'}: {reason}"]
    if http_status is not None and f"HTTP {http_status}" not in reason:
        parts.append(f"HTTP {http_status}")
    parts.append(f"request uuid {request_uuid}" if request_uuid else "no request uuid")
    return "; ".join(parts)


def show(value: Any, limit: int = 80) -> str:
    """A short repr for error messages: payload values can be arbitrarily large."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits()
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
