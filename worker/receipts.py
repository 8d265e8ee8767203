"""Receipts as the Uspeedo API reports them: the frozen ``Receipt`` record and the parsing of a
``GetUSMSSendReceipt`` answer, field by field, defensively (hostile or odd values are refused
per receipt, never for the whole answer)."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from worker.domain import Result, normalize_result
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
            raise ValueError(f"receipt is not an object: {show(entry)}")
        raw_result = entry.get("ReceiptResult")
        if not isinstance(raw_result, str):
            raise ValueError(f"ReceiptResult: expected a string, got {show(raw_result)}")
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
    session_problems: list[tuple[str, str]] = []
    for index, entry in enumerate(data):
        where = f"Data[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: not an object: {show(entry)}")
            continue
        session_no = entry.get("SessionNo")
        if not isinstance(session_no, str) or not session_no:
            problems.append(f"{where}: SessionNo: expected a string, got {show(session_no)}")
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
            problem = f"{where}: ReceiptSet: expected a list, got {show(receipt_set)}"
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
        raise ValueError(f"Phone: expected a string, got {show(value)}")
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


def _timestamp(value: Any) -> datetime | None:
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
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"ReceiptTime: out of range: {show(value)}") from None


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
