"""Rules of the domain, as pure functions: what is final, how phones match, which receipt wins,
when a session is resolved. No I/O and no clock here; callers pass everything in.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar


class Result(enum.StrEnum):
    """Receipt results, spelled exactly as Uspeedo spells them (``Unknow`` included)."""

    SUCCESS = "Success"
    FAIL = "Fail"
    UNKNOW = "Unknow"
    SUBMIT_FAIL = "SubmitFail"


FINAL_RESULTS = frozenset({Result.SUCCESS, Result.FAIL, Result.SUBMIT_FAIL})

# UCloud's twin of this API sometimes answers in Chinese; the meaning is the same.
_RESULT_ALIASES: dict[str, Result] = {
    **{r.value.lower(): r for r in Result},
    "unknown": Result.UNKNOW,
    "submit_fail": Result.SUBMIT_FAIL,
    "发送成功": Result.SUCCESS,
    "发送失败": Result.FAIL,
    "状态未知": Result.UNKNOW,
    "提交失败": Result.SUBMIT_FAIL,
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Bounds shared by what senders track and what the API reports: a SessionNo or a phone beyond
# them cannot be one we track, and would not fit the unique index of sms_receipts.
MAX_SESSION_NO_LENGTH = 128
# What a SessionNo is made of: printable ASCII, no spaces. A SessionNo with anything else is
# none that can be tracked, so none that a receipt can be for.
SESSION_NO_CHARACTERS = re.compile(r"[\x21-\x7e]+")
MIN_PHONE_DIGITS, MAX_PHONE_DIGITS = 5, 20
T = TypeVar("T")


class ReceiptSource(enum.StrEnum):
    """Where a stored receipt came from (``sms_receipts.source``)."""

    POLL = "poll"  # an automatic poll of GetUSMSSendReceipt
    PUSH = "push"  # Uspeedo's status report push (``receipts receiver``)
    REPOLL = "repoll"  # an operator's ``receipts repoll``


class SessionState(enum.StrEnum):
    PENDING = "pending"
    RESOLVED = "resolved"
    ESCALATED = "escalated"


class SessionEventType(enum.StrEnum):
    """What happened to a session (``sms_session_events.type``), named as the events are."""

    RESOLVED = "session.resolved"
    ESCALATED = "session.escalated"


class EventType(enum.StrEnum):
    """The events told to the sender's application (README "Events"), selected by
    ``RECEIPTS_EVENTS``."""

    RECEIPT_FINAL = "receipt.final"  # a phone's receipt became final (once per phone)
    RECEIPT_UPDATED = "receipt.updated"  # any other change of a phone's stored receipt
    SESSION_RESOLVED = "session.resolved"
    SESSION_ESCALATED = "session.escalated"


DEFAULT_EVENT_TYPES = frozenset(
    {EventType.RECEIPT_FINAL, EventType.SESSION_RESOLVED, EventType.SESSION_ESCALATED}
)


class EventDestination(enum.StrEnum):
    """Where events go, each with its own cursor (``receipts_event_cursors``): a webhook
    (``RECEIPTS_EVENTS_WEBHOOK_URL``) and a Celery task (``RECEIPTS_EVENTS_TASK``)."""

    WEBHOOK = "webhook"
    TASK = "task"


def normalize_result(raw: str) -> Result:
    """Map a result as received to Uspeedo's spelling; ValueError names what was not understood."""
    result = _RESULT_ALIASES.get(raw.strip().lower())
    if result is None:
        raise ValueError(f"unknown ReceiptResult {raw!r}")
    return result


def is_final(result: str) -> bool:
    return result in FINAL_RESULTS


_NON_DIGITS = re.compile(r"\D")


def phone_key(phone: str) -> str:
    """The digits of a phone number, in ASCII, which is what identifies it.

    Uspeedo takes ``(852)55311111`` and may report ``85255311111`` or ``+852 5531 1111``; an
    international ``00`` prefix is the same number as ``+``. Every Unicode decimal digit counts
    as the ASCII digit of the same value: ``85255311111`` in full-width digits (U+FF10 to
    U+FF19, as CJK input methods type them) is the same phone, and must match it.
    """
    # Most phones arrive as bare ASCII digits or +digits: skip the regex for them (it was a
    # visible share of a poll, with three phone keys per receipt).
    if phone.isascii() and phone.isdecimal():
        digits = phone
    elif phone[:1] == "+" and phone.isascii() and phone[1:].isdecimal():
        digits = phone[1:]
    else:
        # \D keeps exactly the characters of category Nd, each of which has a decimal value.
        digits = _NON_DIGITS.sub("", phone)
        if not digits.isascii():
            digits = "".join(str(unicodedata.decimal(digit)) for digit in digits)
    if digits.startswith("00"):
        digits = digits[2:]
    return digits


@dataclass(frozen=True, kw_only=True, slots=True)
class ReceiptVersion:
    """The parts of a receipt that decide which of two versions is kept."""

    result: str
    receipt_time: datetime | None


def should_replace(old: ReceiptVersion | None, new: ReceiptVersion) -> bool:
    """Whether ``new`` replaces the stored ``old`` receipt of the same phone.

    A final receipt is never overwritten by a non-final one, nor by an older one. A final
    receipt always replaces a non-final one, whatever their times: the outcome is what the
    sender needs, and an ``Unknow`` stamped later is an interim report, not news. Between two
    of the same kind (both final or both not):

    - a receipt without a time never replaces one with a time: it cannot be shown to be newer,
      and it says less (``Success`` at t then ``Fail`` with no time keeps ``Success`` at t);
    - a receipt with a time replaces one without;
    - of two with times the newer wins; equal times, or two without a time, let the later
      observation win (re-reading the same answer is a no-op in effect).

    So versions are ordered by (final, has a time, time), and ``new`` replaces ``old`` when it
    is not below it: :func:`pick_latest_by` and the SQL guard in ``worker.store`` follow the
    same order.
    """
    if old is None:
        return True
    old_final, new_final = is_final(old.result), is_final(new.result)
    if old_final != new_final:
        return new_final
    if new.receipt_time is None:
        return old.receipt_time is None
    return old.receipt_time is None or new.receipt_time >= old.receipt_time


# What a receipt says. One whose every fact equals the stored receipt's is a repeat: it changes
# nothing and adds nothing to the history (the phone's spelling and where it came from do not
# count; the upsert's SQL twin compares the same columns, worker/store.py).
RECEIPT_FACTS = ("result", "receipt_code", "receipt_desc", "receipt_time", "cost_count", "user_id")


def is_repeat(stored: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether ``new`` says exactly what ``stored`` says (None: nothing stored yet)."""
    return stored is not None and all(stored[fact] == new[fact] for fact in RECEIPT_FACTS)


def pick_latest(versions: Iterable[ReceiptVersion]) -> ReceiptVersion:
    """The version that wins among several answers for one phone (e.g. repeats in one answer)."""
    return pick_latest_by(versions, lambda version: version)


def pick_latest_by(items: Iterable[T], version: Callable[[T], ReceiptVersion]) -> T:
    """The item whose receipt version wins under :func:`should_replace`.

    :func:`should_replace` orders versions by (final, has a time, time), so folding them with
    it picks a greatest one. Items are folded in a canonical order (timeless first, then by
    time, then result), so that a tie between two contradicting answers (same kind, same time
    or both without one) is decided the same way whatever order they arrived in.
    """

    def order(item: T) -> tuple[bool, datetime, str]:
        v = version(item)
        return (v.receipt_time is not None, v.receipt_time or _EPOCH, v.result)

    winner: T | None = None
    for item in sorted(items, key=order):
        if winner is None or should_replace(version(winner), version(item)):
            winner = item
    if winner is None:
        raise ValueError("pick_latest needs at least one version")
    return winner


def is_resolved(tracked_phone_keys: Iterable[str], results_by_phone_key: Mapping[str, str]) -> bool:
    """Whether a session is resolved, given the latest result per phone key.

    Tracked with phones: every tracked phone has a final receipt (receipts for phones that
    were not tracked do not count). Tracked without phones: at least one receipt came back and
    every receipt that came back is final.
    """
    tracked = set(tracked_phone_keys)
    if tracked:
        return all(is_final(results_by_phone_key.get(key, "")) for key in tracked)
    return bool(results_by_phone_key) and all(map(is_final, results_by_phone_key.values()))


def settled_by_answer(
    tracked_phone_keys: Iterable[str], answered_by_phone_key: Mapping[str, str]
) -> bool:
    """Whether an answer alone proves a session resolved, whatever is stored already.

    A final receipt is stored final whatever was there before (final beats non-final, and of
    two finals one is kept), so a session whose every tracked phone is final in the answer is
    resolved. Without tracked phones, a non-final receipt stored earlier for a phone this answer
    left out would still hold the session open: only the stored rows can tell.
    """
    tracked = set(tracked_phone_keys)
    return bool(tracked) and is_resolved(tracked, answered_by_phone_key)


def unresolved_phones(
    tracked_phones: Iterable[str], results_by_phone_key: Mapping[str, str]
) -> list[tuple[str, str | None]]:
    """Phones still without a final receipt, with their last known result (None: never seen).

    Without tracked phones, the phones that reported a non-final result.
    """
    tracked = list(tracked_phones)
    if tracked:
        return [
            (phone, results_by_phone_key.get(phone_key(phone)))
            for phone in tracked
            if not is_final(results_by_phone_key.get(phone_key(phone), ""))
        ]
    return [(key, result) for key, result in results_by_phone_key.items() if not is_final(result)]
