"""Receipts as the Uspeedo API reports them: the frozen ``Receipt`` record and the parsing of a
``GetUSMSSendReceipt`` answer, field by field, defensively (hostile or odd values are refused
per receipt, never for the whole answer)."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from worker.domain import (
    MAX_PHONE_DIGITS,
    MAX_SESSION_NO_LENGTH,
    Result,
    normalize_result,
    phone_key,
)
from worker.errors import MalformedResponse, describe, show

RECEIPT_ACTION: Final = "GetUSMSSendReceipt"

# What an answer weighs: a receipt with all its fields is about 250 bytes of JSON, so 100
# sessions of 1,000 phones each make some 25 MB. Past the cap the client refuses an answer
# unread (worker/client.py) and the poller halves the batch (worker/poller.py), so only a
# session heavier than the cap on its own cannot be polled; memory stays near the cap
# whatever a server sends. RECEIPTS_API_MAX_ANSWER_BYTES overrides it.
DEFAULT_MAX_ANSWER_BYTES: Final = 32 * 1024 * 1024

# 9999-12-31T23:59:59Z: the last instant ``datetime`` can hold.
_MAX_TIMESTAMP: Final = 253_402_300_799

# The largest sms_receipts.cost_count can hold (a PostgreSQL integer).
_MAX_COST_COUNT: Final = 2**31 - 1

# Every field is bounded, so that one absurd value costs at most its own receipt (a 3,000-digit
# phone made PostgreSQL refuse the unique index row, and with it the whole answer). What happens
# past a bound follows from what the field is for:
# - Phone and SessionNo say whose receipt it is: past their bounds (domain.MAX_PHONE_DIGITS
#   digits or MAX_PHONE_LENGTH characters; domain.MAX_SESSION_NO_LENGTH) the receipt is refused,
#   since a shortened phone would be someone else's.
# - ReceiptCode and ReceiptDesc only explain the result: they are shortened to their bound,
#   ending in an ellipsis, and the receipt is kept; refusing it would lose the result itself.
# - UserId and CountryCode are identifiers: past their bound they are not stored (NULL) and the
#   receipt is kept, since a shortened identifier is another identifier a sender could join on.
# Each refusal, shortening or omission is named in the batch's problems, and so in the
# session's last_error.
MAX_PHONE_LENGTH: Final = 64  # as spelled, separators included
MAX_RECEIPT_CODE_LENGTH: Final = 64
MAX_RECEIPT_DESC_LENGTH: Final = 512
MAX_USER_ID_LENGTH: Final = 256  # as long as a tracked user_ref
MAX_COUNTRY_CODE_LENGTH: Final = 16
# A ReceiptTime later than this after the answer was received is refused, with its receipt:
# clocks and time-zone mistakes are off by minutes or hours, and a time in the far future
# would outrank (domain.should_replace) every receipt that comes after it for that phone.
RECEIPT_TIME_TOLERANCE: Final = timedelta(days=1)
# Problems kept per session as its last_error; an answer can carry many receipts per session.
MAX_PROBLEMS_PER_SESSION: Final = 5


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
    def from_payload(
        cls,
        session_no: str,
        entry: Mapping[str, Any],
        *,
        received_at: datetime,
        notes: list[str] | None = None,
    ) -> Receipt:
        """Parse one ``ReceiptSet`` element of an answer received at ``received_at``.

        ValueError names the field that makes the receipt unusable. A value kept shortened, or
        left out, is described in ``notes`` (when given), one line per field.
        """
        if not isinstance(entry, Mapping):
            raise ValueError(f"receipt is not an object: {show(entry)}")
        raw_result = entry.get("ReceiptResult")
        if not isinstance(raw_result, str):
            raise ValueError(f"ReceiptResult: expected a string, got {show(raw_result)}")
        try:
            result = normalize_result(raw_result)
        except ValueError as exc:
            raise ValueError(f"ReceiptResult: {exc}") from None
        kept = notes if notes is not None else []
        return cls(
            session_no=session_no,
            phone=_phone(entry.get("Phone")),
            result=result,
            receipt_code=_shortened(entry, "ReceiptCode", MAX_RECEIPT_CODE_LENGTH, kept) or "",
            receipt_desc=_shortened(entry, "ReceiptDesc", MAX_RECEIPT_DESC_LENGTH, kept) or "",
            receipt_time=_timestamp(entry.get("ReceiptTime"), received_at),
            cost_count=_count(entry.get("CostCount")),
            user_id=_identifier(entry, "UserId", MAX_USER_ID_LENGTH, kept),
            country_code=_identifier(entry, "CountryCode", MAX_COUNTRY_CODE_LENGTH, kept),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceiptBatch:
    """The receipts of one call, and what had to be skipped to get them."""

    receipts: tuple[Receipt, ...]
    # One line per skipped entry or receipt, or per field shortened or left out, naming where.
    problems: tuple[str, ...]
    request_uuid: str | None
    # The problems that belong to an asked session, as (SessionNo, problem): kept on that
    # session's row as its last_error (at most MAX_PROBLEMS_PER_SESSION, then a count).
    session_problems: tuple[tuple[str, str], ...] = ()


def parse_receipts(
    payload: Any,
    asked: Collection[str],
    request_uuid: str | None = None,
    *,
    received_at: datetime,
) -> ReceiptBatch:
    """Receipts from the decoded body of a RetCode-0 GetUSMSSendReceipt response, received at
    ``received_at`` (the reference for refusing receipt times in the future).

    Only the overall shape is fatal (``MalformedResponse``): the body not an object or ``Data``
    not a list. One bad entry or receipt is skipped and described in ``problems`` so that one
    odd phone cannot hold back the receipts of the other 99 sessions; a field past its bound
    costs at most its own receipt (see the bounds above).
    """
    if not isinstance(payload, Mapping):
        raise MalformedResponse(
            describe(RECEIPT_ACTION, f"body is not an object: {show(payload)}", request_uuid),
            request_uuid=request_uuid,
            action=RECEIPT_ACTION,
        )
    data = payload.get("Data")
    if data is None:
        # Nothing known yet for any of the sessions; the API may omit the field then.
        return ReceiptBatch(receipts=(), problems=(), request_uuid=request_uuid)
    if not isinstance(data, list):
        raise MalformedResponse(
            describe(RECEIPT_ACTION, f"Data is not a list: {show(data)}", request_uuid),
            request_uuid=request_uuid,
            action=RECEIPT_ACTION,
        )

    wanted = frozenset(asked)
    receipts: list[Receipt] = []
    problems: list[str] = []
    per_session = _SessionProblems()
    for index, entry in enumerate(data):
        session_no, where = _asked_session(index, entry, wanted)
        if session_no is None:
            problems.append(where)
            continue
        receipt_set = entry.get("ReceiptSet")
        if receipt_set is None:
            # Go's omitempty drops empty arrays: no receipt yet.
            continue
        if not isinstance(receipt_set, list):
            problem = f"{where}: ReceiptSet: expected a list, got {show(receipt_set)}"
            problems.append(problem)
            per_session.add(session_no, problem)
            continue
        for position, raw in enumerate(receipt_set):
            notes: list[str] = []
            try:
                receipts.append(
                    Receipt.from_payload(session_no, raw, received_at=received_at, notes=notes)
                )
            except ValueError as exc:
                notes = [str(exc)]
            for note in notes:
                problem = f"{where} ReceiptSet[{position}]: {note}"
                problems.append(problem)
                per_session.add(session_no, problem)
    return ReceiptBatch(
        receipts=tuple(receipts),
        problems=tuple(problems),
        request_uuid=request_uuid,
        session_problems=per_session.lines(),
    )


def _asked_session(index: int, entry: Any, wanted: frozenset[str]) -> tuple[str | None, str]:
    """The SessionNo of ``Data[index]`` and where it is, or None and what is wrong with it."""
    where = f"Data[{index}]"
    if not isinstance(entry, Mapping):
        return None, f"{where}: not an object: {show(entry)}"
    session_no = entry.get("SessionNo")
    if not isinstance(session_no, str) or not session_no:
        return None, f"{where}: SessionNo: expected a string, got {show(session_no)}"
    if len(session_no) > MAX_SESSION_NO_LENGTH:
        return None, (
            f"{where}: SessionNo: {len(session_no)} characters long "
            f"(at most {MAX_SESSION_NO_LENGTH}), so not one that was asked for"
        )
    where = f"{where} (SessionNo {show(session_no, MAX_SESSION_NO_LENGTH + 2)})"
    if session_no not in wanted:
        # Never attribute receipts to a session we did not ask about: it may belong to
        # another account, and storing it would invent a session.
        return None, f"{where}: SessionNo was not asked for"
    return session_no, where


class _SessionProblems:
    """The problems of each session, the first few named and the rest counted: the lines
    become one ``last_error``, and one session may carry hundreds of odd receipts."""

    def __init__(self) -> None:
        self._named: list[tuple[str, str]] = []
        self._counts: dict[str, int] = {}

    def add(self, session_no: str, problem: str) -> None:
        count = self._counts.get(session_no, 0) + 1
        self._counts[session_no] = count
        if count <= MAX_PROBLEMS_PER_SESSION:
            self._named.append((session_no, problem))

    def lines(self) -> tuple[tuple[str, str], ...]:
        more = [
            (session_no, f"and {count - MAX_PROBLEMS_PER_SESSION} more problem(s)")
            for session_no, count in self._counts.items()
            if count > MAX_PROBLEMS_PER_SESSION
        ]
        return (*self._named, *more)


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
        if value >= 10**MAX_PHONE_DIGITS:  # compared, not printed: str() fails past 4,300 digits
            raise ValueError(
                f"Phone: a number of more than {MAX_PHONE_DIGITS} digits "
                f"(at most {MAX_PHONE_DIGITS})"
            )
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"Phone: expected a string, got {show(value)}")
    phone = _storable(value.strip())
    if not phone:
        raise ValueError("Phone: empty")
    # Without digits there is no phone_key to store or match it under.
    digits = len(phone_key(phone))
    if not digits:
        raise ValueError(f"Phone: no digits in {show(phone)}")
    if digits > MAX_PHONE_DIGITS:
        raise ValueError(f"Phone: {digits} digits (at most {MAX_PHONE_DIGITS})")
    if len(phone) > MAX_PHONE_LENGTH:
        raise ValueError(f"Phone: {len(phone)} characters long (at most {MAX_PHONE_LENGTH})")
    return phone


def _shortened(entry: Mapping[str, Any], field: str, limit: int, notes: list[str]) -> str | None:
    """An optional descriptive text, cut to ``limit`` characters (the last an ellipsis, so
    that it reads as cut) when longer; the cut is noted."""
    text = _text(entry, field)
    if text is None or len(text) <= limit:
        return text
    notes.append(f"{field}: {len(text)} characters, shortened to {limit} (receipt kept)")
    return text[: limit - 1] + "\u2026"


def _identifier(entry: Mapping[str, Any], field: str, limit: int, notes: list[str]) -> str | None:
    """An optional identifier, left out (None) when longer than ``limit``; the omission is
    noted."""
    text = _text(entry, field) or None
    if text is None or len(text) <= limit:
        return text
    notes.append(f"{field}: {len(text)} characters (at most {limit}), not stored (receipt kept)")
    return None


def _text(entry: Mapping[str, Any], field: str) -> str | None:
    """An optional string field; numbers are accepted (ReceiptCode is sometimes sent as 0)."""
    value = entry.get(field)
    if value is None:
        return None
    if isinstance(value, str):
        return _storable(value.strip())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _number_text(value, field)
    raise ValueError(f"{field}: expected a string, got {show(value)}")


def _number_text(value: float, field: str) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{field}: expected a string, got {show(value)}")
        if value.is_integer():
            value = int(value)
    try:
        return str(value)
    except ValueError:  # too many digits to print
        raise ValueError(f"{field}: number too large: {show(value)}") from None


def _number(value: Any, field: str) -> int | float:
    """A JSON number, or a string holding one (some Uspeedo products quote numbers)."""
    if isinstance(value, bool):  # bool is an int subclass, and never a count or a time
        raise ValueError(f"{field}: expected a number, got {show(value)}")
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
                raise ValueError(f"{field}: not a number: {show(value)}") from None
    else:
        raise ValueError(f"{field}: expected a number, got {show(value)}")
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"{field}: not a finite number: {show(value)}")
    return number


def _timestamp(value: Any, received_at: datetime) -> datetime | None:
    if value is None or value == "":
        return None
    seconds = _number(value, "ReceiptTime")
    if seconds == 0:  # the API's "not reported yet"
        return None
    if seconds < 0:
        raise ValueError(f"ReceiptTime: negative: {show(value)}")
    if seconds > _MAX_TIMESTAMP:
        # Most likely milliseconds; refusing is safer than guessing the unit.
        raise ValueError(f"ReceiptTime: out of range: {show(value)}")
    try:
        when = datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"ReceiptTime: out of range: {show(value)}") from None
    # Compared in seconds: received_at plus the tolerance may not be a representable datetime.
    if seconds - received_at.timestamp() > RECEIPT_TIME_TOLERANCE.total_seconds():
        raise ValueError(
            f"ReceiptTime: {when.isoformat()} is more than "
            f"{RECEIPT_TIME_TOLERANCE.total_seconds() / 3600:g} h after the answer was received "
            f"({received_at.astimezone(UTC).isoformat(timespec='seconds')})"
        )
    return when


def _count(value: Any) -> int | None:
    if value is None or value == "":
        return None
    number = _number(value, "CostCount")
    if isinstance(number, float):
        if not number.is_integer():
            raise ValueError(f"CostCount: not a whole number: {show(value)}")
        number = int(number)
    if number < 0:
        raise ValueError(f"CostCount: negative: {show(value)}")
    if number > _MAX_COST_COUNT:
        # The column is a 32-bit integer: a larger count would make the whole answer unwritable.
        raise ValueError(f"CostCount: out of range: {show(value)}")
    return number
