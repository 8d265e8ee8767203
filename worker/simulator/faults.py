"""Faults the fake API injects on demand, one at most per call, drawn with the configured odds.

Early faults replace the answer outright, before the request is authenticated; receipt faults
corrupt a successful receipt query's Data; ``slow`` delays any answer and ``truncated`` cuts any
answer's text in half (both applied by the service).
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Mapping
from typing import Any

from worker.simulator.scenarios import SUCCESS
from worker.simulator.wire import RET_SERVER, RET_UNKNOWN, Reply, error, is_number, json_reply

FAULT_KINDS: tuple[str, ...] = (
    "http_500",
    "http_429",
    "retcode_server",
    "retcode_unknown",
    "truncated",
    "wrong_types",
    "slow",
    "extra_sessions",
    "string_receipt_time",
)
FAULT_PARAMETERS = ("slow_seconds",)
DEFAULT_SLOW_SECONDS = 3.0
# These replace the answer outright, so they are decided before the request is even authenticated,
# as a failing load balancer or an overloaded backend would.
EARLY_FAULTS = frozenset({"http_500", "http_429", "retcode_server", "retcode_unknown"})
# These only make sense on top of a successful receipt query.
RECEIPT_FAULTS = frozenset({"wrong_types", "extra_sessions", "string_receipt_time"})
_WRONG_TYPE_VARIANTS = ("data_dict", "receipt_time", "cost_count", "missing_phone")

_HTML_500 = (
    b"<html>\r\n<head><title>500 Internal Server Error</title></head>\r\n<body>\r\n"
    b"<center><h1>500 Internal Server Error</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
_HTML_429 = (
    b"<html>\r\n<head><title>429 Too Many Requests</title></head>\r\n<body>\r\n"
    b"<center><h1>429 Too Many Requests</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


def checked_faults(faults: Mapping[str, Any]) -> dict[str, float]:
    """Fault probabilities (per API call) and parameters, validated; ValueError names a bad one."""
    clean: dict[str, float] = {}
    for key, value in faults.items():
        if key not in FAULT_KINDS and key not in FAULT_PARAMETERS:
            known = ", ".join((*FAULT_KINDS, *FAULT_PARAMETERS))
            raise ValueError(f"unknown fault {key!r} (known: {known})")
        if not is_number(value):
            raise ValueError(f"fault {key!r} must be a number, not {value!r}")
        if key in FAULT_PARAMETERS:
            if value < 0:
                raise ValueError(f"{key} must not be negative")
        elif not 0 <= value <= 1:
            raise ValueError(f"fault {key!r} is a probability and must be within [0, 1]")
        clean[key] = float(value)
    if sum(clean.get(kind, 0.0) for kind in FAULT_KINDS) > 1 + 1e-9:
        raise ValueError("fault probabilities add up to more than 1 (one fault per call)")
    return clean


def draw_fault(faults: Mapping[str, float], rng: random.Random) -> str | None:
    """The fault for one call, or None; the caller holds the lock that guards ``rng``."""
    if not any(faults.get(kind, 0.0) > 0 for kind in FAULT_KINDS):
        return None  # keep the seeded RNG's sequence for scenario draws when no fault is set
    roll = rng.random()
    threshold = 0.0
    for kind in FAULT_KINDS:
        threshold += faults.get(kind, 0.0)
        if roll < threshold:
            return kind
    return None


def early_fault(fault: str, action: str) -> tuple[Reply, int | None]:
    """The reply that replaces the answer, and its RetCode (None when the body is not the API's)."""
    if fault == "http_500":
        return Reply(500, _HTML_500, "text/html"), None
    if fault == "http_429":
        return Reply(429, _HTML_429, "text/html", (("Retry-After", "1"),)), None
    if fault == "retcode_server":
        return json_reply(200, error(action, RET_SERVER, "server error")), RET_SERVER
    return json_reply(200, error(action, RET_UNKNOWN, "something new")), RET_UNKNOWN


def corrupt(
    fault: str,
    payload: dict[str, Any],
    *,
    account_id: int,
    rng: random.Random,
    clock: Callable[[], float],
    new_session_no: Callable[[], str],
) -> None:
    """Apply a receipt fault to a successful receipt query's payload, whose Data is materialized.

    The caller holds the lock that guards ``rng``; ``new_session_no`` names a session that neither
    exists nor was asked for.
    """
    data: list[dict[str, Any]] = payload["Data"]
    if fault == "string_receipt_time":
        for entry in data:
            for receipt in entry["ReceiptSet"]:
                receipt["ReceiptTime"] = str(receipt["ReceiptTime"])
    elif fault == "extra_sessions":
        receipt_time = math.floor(clock())
        phone = "(852)5" + "".join(rng.choices(string.digits, k=7))
        extra = {
            "Phone": phone,
            "CostCount": 1,
            "ReceiptResult": SUCCESS[0],
            "ReceiptCode": SUCCESS[1],
            "ReceiptDesc": SUCCESS[2],
            "ReceiptTime": receipt_time,
            "UserId": "",
            "AccountId": account_id,
            "CountryCode": "852",
            "BrevityCode": "HK",
        }
        data.append({"SessionNo": new_session_no(), "ReceiptSet": [extra]})
    elif fault == "wrong_types":
        receipts = [receipt for entry in data for receipt in entry["ReceiptSet"]]
        variant = rng.choice(_WRONG_TYPE_VARIANTS) if receipts else "data_dict"
        if variant == "data_dict":
            payload["Data"] = {entry["SessionNo"]: entry["ReceiptSet"] for entry in data}
        elif variant == "receipt_time":
            receipts[0]["ReceiptTime"] = "abc"
        elif variant == "cost_count":
            receipts[0]["CostCount"] = "x"
        else:
            del receipts[0]["Phone"]
