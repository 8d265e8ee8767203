"""Scripted delivery scenarios: what each phone of a session reports, when, and what it ends as.

A session's receipts are built once, at registration, as one timeline of versions per phone; the
service shows the latest version visible at the time of each call, and the truth says what the
worker should end up storing. Time is measured in ``step`` seconds after the session's ``sent_at``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from worker.domain import is_final, normalize_result, phone_key
from worker.simulator.wire import dumps

SCENARIOS: tuple[str, ...] = (
    "quick_success",
    "slow_final",
    "late_failure",
    "unknow_forever",
    "never",
    "submit_fail",
    "silent_phone",
    "respelled",
    "stale_unknow",
    "chinese",
    "poison",
)
# A poison session breaks every call that asks for it; demos sending at random must not create one.
DRAWABLE_SCENARIOS = tuple(s for s in SCENARIOS if s != "poison")

# (ReceiptResult, ReceiptCode, ReceiptDesc) as the API spells them.
Outcome = tuple[str, str, str]
SUCCESS: Outcome = ("Success", "DELIVRD", "Delivered")
_UNKNOW: Outcome = ("Unknow", "UNKNOWN", "Status not yet reported")
_FAIL: Outcome = ("Fail", "UNDELIV", "Undeliverable")
_SUBMIT_FAIL: Outcome = ("SubmitFail", "SUBMITFAIL", "Rejected by the carrier on submit")
_CHINESE_SUCCESS: Outcome = ("发送成功", "DELIVRD", "发送成功")


@dataclass(frozen=True, slots=True)
class _Step:
    after: float  # in scenario steps after sent_at
    outcome: Outcome
    # Report a ReceiptTime older than the previous version's (stale_unknow), not the visible time.
    backdated: bool = False


_PLANS: dict[str, tuple[_Step, ...]] = {
    "quick_success": (_Step(1, SUCCESS),),
    "slow_final": (_Step(1, _UNKNOW), _Step(4, SUCCESS)),
    "late_failure": (_Step(1, _UNKNOW), _Step(6, _FAIL)),
    "unknow_forever": (_Step(1, _UNKNOW),),
    "never": (),
    "submit_fail": (_Step(1, _SUBMIT_FAIL),),
    "silent_phone": (_Step(1, SUCCESS),),  # the last phone gets () instead
    "respelled": (_Step(1, SUCCESS),),
    "stale_unknow": (_Step(1, SUCCESS), _Step(3, _UNKNOW, backdated=True)),
    "chinese": (_Step(1, _CHINESE_SUCCESS),),
    "poison": (),
}

# Dialling codes the respelling and the CountryCode/BrevityCode fields know by name. Codes absent
# here are assumed to be three digits long, which is the ITU rule for everything outside zones 1/7
# and the two-digit codes below.
_COUNTRIES: dict[str, str] = {
    "1": "US", "7": "RU", "20": "EG", "27": "ZA", "30": "GR", "31": "NL", "32": "BE", "33": "FR",
    "34": "ES", "36": "HU", "39": "IT", "40": "RO", "41": "CH", "43": "AT", "44": "GB", "45": "DK",
    "46": "SE", "47": "NO", "48": "PL", "49": "DE", "51": "PE", "52": "MX", "53": "CU", "54": "AR",
    "55": "BR", "56": "CL", "57": "CO", "58": "VE", "60": "MY", "61": "AU", "62": "ID", "63": "PH",
    "64": "NZ", "65": "SG", "66": "TH", "81": "JP", "82": "KR", "84": "VN", "86": "CN", "90": "TR",
    "91": "IN", "92": "PK", "93": "AF", "94": "LK", "95": "MM", "98": "IR", "234": "NG",
    "254": "KE", "852": "HK", "853": "MO", "855": "KH", "856": "LA", "880": "BD", "886": "TW",
    "966": "SA", "971": "AE",
}  # fmt: skip
_EXPLICIT_CODE = re.compile(r"\s*(?:\(\+?(\d{1,4})\)|\+(\d{1,4})[\s-])")


def _country_code(phone: str, digits: str) -> str:
    match = _EXPLICIT_CODE.match(phone)
    if match:
        return match.group(1) or match.group(2)
    for length in (1, 2):
        if digits[:length] in _COUNTRIES:
            return digits[:length]
    return digits[:3]


def _respell(phone: str) -> str:
    """The same number written another way (same digits), as the real API sometimes reports it."""
    digits = phone_key(phone)
    code = _country_code(phone, digits)
    rest = digits[len(code) :]
    grouped = " ".join(rest[i : i + 4] for i in range(0, len(rest), 4))
    international = f"+{code} {grouped}".strip()
    bracketed = f"({code}){rest}"
    preferred = (bracketed, international) if phone.isdigit() else (international, bracketed)
    for candidate in (*preferred, f"+{digits}", f"00{digits}"):
        if candidate != phone and phone_key(candidate) == digits:
            return candidate
    return f" {phone}"  # no digits at all: any other spelling keeps "the same digits"


class Version(NamedTuple):
    """One version of a phone's receipt, shared between calls: copy ``receipt`` to change it."""

    visible_at: float
    receipt: dict[str, Any]
    # Serialized once at registration: encoding receipts per call was most of a call's cost.
    text: str


@dataclass(frozen=True, slots=True)
class Session:
    account_id: int
    session_no: str
    session_no_json: str
    scenario: str
    sent_at: float
    # Per phone, the receipt versions in the order they become visible.
    timelines: tuple[tuple[Version, ...], ...]
    truth: dict[str, dict[str, Any]]

    def visible(self, now: float) -> list[Version]:
        shown: list[Version] = []
        for timeline in self.timelines:
            latest: Version | None = None
            for version in timeline:
                if version.visible_at > now:
                    break
                latest = version
            if latest is not None:
                shown.append(latest)
        return shown


def build_session(
    *,
    account_id: int,
    session_no: str,
    scenario: str,
    sent_at: float,
    phones: Sequence[tuple[str, str]],
    step: float,
) -> Session:
    timelines: list[tuple[Version, ...]] = []
    truth: dict[str, dict[str, Any]] = {}
    for index, (phone, user_id) in enumerate(phones):
        plan = _PLANS[scenario]
        if scenario == "silent_phone" and index == len(phones) - 1:
            plan = ()
        shown_phone = _respell(phone) if scenario == "respelled" else phone
        code = _country_code(phone, phone_key(phone))
        events: list[Version] = []
        previous_time: int | None = None
        for plan_step in plan:
            visible_at = sent_at + plan_step.after * step
            receipt_time = math.floor(visible_at)
            if plan_step.backdated and previous_time is not None:
                receipt_time = min(math.floor(sent_at), previous_time - 1)
            result, receipt_code, desc = plan_step.outcome
            receipt = {
                "Phone": shown_phone,
                "CostCount": 1,
                "ReceiptResult": result,
                "ReceiptCode": receipt_code,
                "ReceiptDesc": desc,
                "ReceiptTime": receipt_time,
                "UserId": user_id,
                "AccountId": account_id,
                "CountryCode": code,
                "BrevityCode": _COUNTRIES.get(code, ""),
            }
            events.append(Version(visible_at, receipt, dumps(receipt)))
            previous_time = receipt_time
        timelines.append(tuple(events))
        truth[phone] = _phone_truth(plan, step)
    return Session(
        account_id=account_id,
        session_no=session_no,
        session_no_json=dumps(session_no),
        scenario=scenario,
        sent_at=sent_at,
        timelines=tuple(timelines),
        truth=truth,
    )


def _phone_truth(plan: Sequence[_Step], step: float) -> dict[str, Any]:
    final = next((s for s in plan if is_final(normalize_result(s.outcome[0]))), None)
    non_final = next((s for s in plan if not is_final(normalize_result(s.outcome[0]))), None)
    return {
        "final_result": normalize_result(final.outcome[0]).value if final else None,
        "final_after": final.after * step if final else None,
        "last_result": normalize_result(non_final.outcome[0]).value if non_final else None,
    }
