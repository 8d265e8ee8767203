"""A fake of the Uspeedo SMS API, served over real HTTP on loopback for tests, demos and benchmarks.

It speaks ``POST /api`` as CONTRACT.md describes the real service (signed requests, nonce replay
protection, ``GetUSMSSendReceipt`` and ``SendBatchUSMSMessage``), plays scripted delivery
*scenarios* for registered sessions, injects faults on demand, records every call, and tells the
truth about what each session will eventually report, so that a test can compare what the worker
stored with what it should have stored.

Control endpoints (no auth, loopback clients only): ``POST /_sim/sessions``, ``POST /_sim/faults``,
``GET /_sim/calls``, ``GET /_sim/truth``, ``POST /_sim/reset``; each has a direct method on
:class:`Simulator` for in-process use.

Time is measured in ``step`` seconds after a session's ``sent_at``; the clock is injectable so tests
can move time without sleeping.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import math
import random
import re
import socket
import socketserver
import string
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple

from worker.domain import is_final, normalize_result, phone_key
from worker.signing import signature

__all__ = ["SCENARIOS", "Simulator", "serve"]

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
_DRAWABLE_SCENARIOS = tuple(s for s in SCENARIOS if s != "poison")

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
_FAULT_PARAMETERS = ("slow_seconds",)
DEFAULT_SLOW_SECONDS = 3.0
# These replace the answer outright, so they are decided before the request is even authenticated,
# as a failing load balancer or an overloaded backend would.
_EARLY_FAULTS = frozenset({"http_500", "http_429", "retcode_server", "retcode_unknown"})
# These only make sense on top of a successful receipt query.
_RECEIPT_FAULTS = frozenset({"wrong_types", "extra_sessions", "string_receipt_time"})
_WRONG_TYPE_VARIANTS = ("data_dict", "receipt_time", "cost_count", "missing_phone")

RET_OK = 0
RET_INVALID = 215392
RET_MISSING = 215397
RET_AUTH = 215398
RET_SERVER = 215400
RET_UNKNOWN = 299999

GET_RECEIPT = "GetUSMSSendReceipt"
SEND_BATCH = "SendBatchUSMSMessage"
MAX_SESSIONS_PER_CALL = 100
TIMESTAMP_TOLERANCE = 300.0
NONCE_TTL = 600.0
# The replay window is bounded by time; this cap bounds memory even under extreme call rates
# (past it the oldest nonces are forgotten early, which only narrows the replay window).
NONCE_LIMIT = 500_000
# Benchmarks make hundreds of thousands of calls; keep the most recent ones only.
CALL_LOG_LIMIT = 200_000
MAX_BODY_BYTES = 8 * 1024 * 1024
_SESSION_NO_ALPHABET = string.ascii_letters + string.digits
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_JSON = "application/json; charset=utf-8"
# Shutdown latency of the serve loop; the default 0.5 s would dominate a short test.
_POLL_INTERVAL = 0.05

# --- scenarios --------------------------------------------------------------------------------

# (ReceiptResult, ReceiptCode, ReceiptDesc) as the API spells them.
_Outcome = tuple[str, str, str]
_SUCCESS: _Outcome = ("Success", "DELIVRD", "Delivered")
_UNKNOW: _Outcome = ("Unknow", "UNKNOWN", "Status not yet reported")
_FAIL: _Outcome = ("Fail", "UNDELIV", "Undeliverable")
_SUBMIT_FAIL: _Outcome = ("SubmitFail", "SUBMITFAIL", "Rejected by the carrier on submit")
_CHINESE_SUCCESS: _Outcome = ("发送成功", "DELIVRD", "发送成功")


@dataclass(frozen=True, slots=True)
class _Step:
    after: float  # in scenario steps after sent_at
    outcome: _Outcome
    # Report a ReceiptTime older than the previous version's (stale_unknow), not the visible time.
    backdated: bool = False


_PLANS: dict[str, tuple[_Step, ...]] = {
    "quick_success": (_Step(1, _SUCCESS),),
    "slow_final": (_Step(1, _UNKNOW), _Step(4, _SUCCESS)),
    "late_failure": (_Step(1, _UNKNOW), _Step(6, _FAIL)),
    "unknow_forever": (_Step(1, _UNKNOW),),
    "never": (),
    "submit_fail": (_Step(1, _SUBMIT_FAIL),),
    "silent_phone": (_Step(1, _SUCCESS),),  # the last phone gets () instead
    "respelled": (_Step(1, _SUCCESS),),
    "stale_unknow": (_Step(1, _SUCCESS), _Step(3, _UNKNOW, backdated=True)),
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


class _Version(NamedTuple):
    """One version of a phone's receipt, shared between calls: copy ``receipt`` to change it."""

    visible_at: float
    receipt: dict[str, Any]
    # Serialized once at registration: encoding receipts per call was most of a call's cost.
    text: str


@dataclass(frozen=True, slots=True)
class _Session:
    account_id: int
    session_no: str
    session_no_json: str
    scenario: str
    sent_at: float
    # Per phone, the receipt versions in the order they become visible.
    timelines: tuple[tuple[_Version, ...], ...]
    truth: dict[str, dict[str, Any]]

    def visible(self, now: float) -> list[_Version]:
        shown: list[_Version] = []
        for timeline in self.timelines:
            latest: _Version | None = None
            for version in timeline:
                if version.visible_at > now:
                    break
                latest = version
            if latest is not None:
                shown.append(latest)
        return shown


def _build_session(
    *,
    account_id: int,
    session_no: str,
    scenario: str,
    sent_at: float,
    phones: Sequence[tuple[str, str]],
    step: float,
) -> _Session:
    timelines: list[tuple[_Version, ...]] = []
    truth: dict[str, dict[str, Any]] = {}
    for index, (phone, user_id) in enumerate(phones):
        plan = _PLANS[scenario]
        if scenario == "silent_phone" and index == len(phones) - 1:
            plan = ()
        shown_phone = _respell(phone) if scenario == "respelled" else phone
        code = _country_code(phone, phone_key(phone))
        events: list[_Version] = []
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
            events.append(_Version(visible_at, receipt, _dumps(receipt)))
            previous_time = receipt_time
        timelines.append(tuple(events))
        truth[phone] = _phone_truth(plan, step)
    return _Session(
        account_id=account_id,
        session_no=session_no,
        session_no_json=_dumps(session_no),
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


# --- request parsing helpers -------------------------------------------------------------------


def _account_id(action: str, body: Mapping[str, Any]) -> int | _Answer:
    """The request's AccountId, or the error answer both actions give for a bad one."""
    if "AccountId" not in body:
        return _Answer(_error(action, RET_MISSING, "Missing parameter AccountId"), "invalid")
    account_id = _positive_int(body["AccountId"])
    if account_id is None:
        return _Answer(_error(action, RET_INVALID, "Invalid parameter AccountId"), "invalid")
    return account_id


def _positive_int(value: Any) -> int | None:
    # bool is an int subclass, and `true` is no account id.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = _JSON
    headers: tuple[tuple[str, str], ...] = ()


def _json_reply(status: int, payload: Any) -> _Reply:
    return _Reply(status, _dumps(payload).encode("utf-8"))


def _error(action: str, ret_code: int, message: str) -> dict[str, Any]:
    return {"RetCode": ret_code, "Message": message, "Action": f"{action}Response"}


@dataclass(slots=True)
class _Answer:
    """The normal answer to one API call, and the outcome to log."""

    payload: dict[str, Any]
    outcome: str
    # A successful receipt query keeps its Data here, as what each session shows, until rendered.
    found: list[tuple[_Session, list[_Version]]] | None = None

    def materialize(self) -> None:
        """Put Data into the payload as fresh dicts, which faults may then change."""
        if self.found is not None:
            self.payload["Data"] = [
                {"SessionNo": session.session_no, "ReceiptSet": [dict(v.receipt) for v in shown]}
                for session, shown in self.found
            ]
            self.found = None

    def text(self) -> str:
        if self.found is None:
            return _dumps(self.payload)
        entries = ",".join(
            f'{{"SessionNo":{session.session_no_json},"ReceiptSet":[{receipts}]}}'
            for session, shown in self.found
            for receipts in [",".join(version.text for version in shown)]
        )
        return f'{_dumps(self.payload)[:-1]},"Data":[{entries}]}}'


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


# --- the simulator ----------------------------------------------------------------------------


class Simulator:
    """The fake Uspeedo API. It binds its port when built, so ``url`` is known before ``start``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        access_key_id: str = "demo",
        # A well-known demo credential for a loopback fake, not a secret.
        access_key_secret: str = "demo-secret",  # noqa: S107
        step: float = 1.0,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not step > 0:
            raise ValueError("step must be positive")
        self._access_key_id = access_key_id.encode("utf-8")
        self._secret = access_key_secret
        self._step = step
        self._clock = clock
        # One lock guards everything below; each request holds it only for O(batch) work.
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._sessions: dict[str, _Session] = {}
        self._faults: dict[str, float] = {}
        self._calls: deque[dict[str, Any]] = deque(maxlen=CALL_LOG_LIMIT)
        # Insertion order is arrival order, so expired nonces are always at the front.
        self._nonces: OrderedDict[str, float] = OrderedDict()
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), self)
        self._thread: threading.Thread | None = None
        self._serving = False
        self._stopped = False

    # lifecycle

    @property
    def url(self) -> str:
        host, port = self._server.server_name, self._server.server_port
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/api"

    def start(self) -> Simulator:
        if self._thread is not None or self._stopped:
            raise RuntimeError("a Simulator can be started once")
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name="uspeedo-simulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._serving = True
        try:
            self._server.serve_forever(poll_interval=_POLL_INTERVAL)
        finally:
            self._serving = False

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        # shutdown() waits for a running serve loop and would wait forever without one.
        if self._thread is not None or self._serving:
            self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # control

    def register(self, sessions: Iterable[Mapping[str, Any]]) -> None:
        """Register sessions to play (all or none: the batch is validated first)."""
        if isinstance(sessions, str | bytes) or not isinstance(sessions, Iterable):
            raise ValueError("sessions must be a list of objects")
        built = [self._parse_registration(spec) for spec in sessions]
        with self._lock:
            for session in built:
                self._sessions[session.session_no] = session

    def set_faults(self, **faults: float) -> None:
        """Replace the fault probabilities (per API call); no arguments clears them."""
        clean: dict[str, float] = {}
        for key, value in faults.items():
            if key not in FAULT_KINDS and key not in _FAULT_PARAMETERS:
                known = ", ".join((*FAULT_KINDS, *_FAULT_PARAMETERS))
                raise ValueError(f"unknown fault {key!r} (known: {known})")
            if not _is_number(value):
                raise ValueError(f"fault {key!r} must be a number, not {value!r}")
            if key in _FAULT_PARAMETERS:
                if value < 0:
                    raise ValueError(f"{key} must not be negative")
            elif not 0 <= value <= 1:
                raise ValueError(f"fault {key!r} is a probability and must be within [0, 1]")
            clean[key] = float(value)
        if sum(clean.get(kind, 0.0) for kind in FAULT_KINDS) > 1 + 1e-9:
            raise ValueError("fault probabilities add up to more than 1 (one fault per call)")
        with self._lock:
            self._faults = clean

    def calls(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{**call, "session_nos": list(call["session_nos"])} for call in self._calls]

    def truth(self) -> dict[str, Any]:
        with self._lock:
            sessions = list(self._sessions.values())
        return {
            "sessions": {
                session.session_no: {
                    "account_id": session.account_id,
                    "scenario": session.scenario,
                    "sent_at": session.sent_at,
                    "phones": {phone: dict(t) for phone, t in session.truth.items()},
                }
                for session in sessions
            }
        }

    def reset(self) -> None:
        # Nonces survive: replay protection belongs to the server, not to a test's scenario.
        with self._lock:
            self._sessions.clear()
            self._calls.clear()
            self._faults = {}

    def _parse_registration(self, spec: Any) -> _Session:
        if not isinstance(spec, Mapping):
            raise ValueError(f"each session must be an object, not {spec!r}")
        account_id = _positive_int(spec.get("account_id"))
        if account_id is None:
            raise ValueError(f"account_id must be a positive integer in {dict(spec)!r}")
        session_no = spec.get("session_no")
        if not isinstance(session_no, str) or not session_no:
            raise ValueError(f"session_no must be a non-empty string in {dict(spec)!r}")
        phones = spec.get("phones", [])
        if not isinstance(phones, list) or not all(isinstance(p, str) and p for p in phones):
            raise ValueError(f"phones of {session_no!r} must be a list of non-empty strings")
        scenario = spec.get("scenario")
        if scenario not in SCENARIOS:
            raise ValueError(
                f"unknown scenario {scenario!r} for {session_no!r} (known: {', '.join(SCENARIOS)})"
            )
        sent_at = spec.get("sent_at")
        if sent_at is None:
            sent_at = self._clock()
        elif not _is_number(sent_at):
            raise ValueError(f"sent_at of {session_no!r} must be unix seconds")
        user_id = spec.get("user_id", "")
        if not isinstance(user_id, str):
            raise ValueError(f"user_id of {session_no!r} must be a string")
        return _build_session(
            account_id=account_id,
            session_no=session_no,
            scenario=scenario,
            sent_at=float(sent_at),
            phones=[(phone, user_id) for phone in phones],
            step=self._step,
        )

    # the API

    def _handle_api(self, content_type: str, headers: Mapping[str, str], raw: bytes) -> _Reply:
        received = self._clock()
        body, parse_error = _parse_body(content_type, raw)
        raw_action = body.get("Action") if body is not None else None
        action = raw_action if isinstance(raw_action, str) else ""
        asked = body.get("SessionNoSet") if body is not None and action == GET_RECEIPT else None
        call: dict[str, Any] = {
            "t": received,
            "action": action,
            "account_id": _positive_int(body.get("AccountId")) if body is not None else None,
            "session_nos": _strings(asked),
        }
        with self._lock:
            fault = self._draw_fault()
            slow_seconds = self._faults.get("slow_seconds", DEFAULT_SLOW_SECONDS)
        if fault == "slow":
            time.sleep(slow_seconds)  # outside the lock: a slow call must not stall the others

        if fault in _EARLY_FAULTS:
            reply, ret_code = _early_fault(fault, action)
            outcome: str = fault
        else:
            answer = self._answer(body, parse_error, headers, action, received)
            outcome = answer.outcome
            if action == SEND_BATCH and outcome == "ok":
                call["session_nos"] = [answer.payload["SessionNo"]]
            if fault in _RECEIPT_FAULTS and action == GET_RECEIPT and outcome == "ok":
                answer.materialize()
                with self._lock:
                    self._corrupt(fault, answer.payload, call["session_nos"], call["account_id"])
                outcome = fault
            elif fault == "slow":
                outcome = fault
            text = answer.text()
            if fault == "truncated":
                text = text[: len(text) // 2]
                outcome = fault
            reply = _Reply(200, text.encode("utf-8"))
            ret_code = answer.payload["RetCode"]

        reply = _Reply(
            reply.status,
            reply.body,
            reply.content_type,
            (*reply.headers, ("X-Speedo-Request-Uuid", str(uuid.uuid4()))),
        )
        call.update(outcome=outcome, ret_code=ret_code, http_status=reply.status)
        with self._lock:
            self._calls.append(call)
        return reply

    def _answer(
        self,
        body: dict[str, Any] | None,
        parse_error: str,
        headers: Mapping[str, str],
        action: str,
        now: float,
    ) -> _Answer:
        # ``now`` is the time the call is logged with, so a test can tell exactly what each
        # logged call could see.
        if body is None:
            return _Answer(_error(action, RET_INVALID, parse_error), "invalid")
        if not self._authentic(body, headers, now):
            return _Answer(_error(action, RET_AUTH, "Failed to parse token"), "auth")
        if "Action" not in body:
            return _Answer(_error(action, RET_MISSING, "Missing parameter Action"), "invalid")
        if action == GET_RECEIPT:
            return self._get_receipts(body, now)
        if action == SEND_BATCH:
            return self._send_batch(body, now)
        return _Answer(_error(action, RET_INVALID, "Invalid parameter Action"), "invalid")

    def _authentic(self, body: dict[str, Any], headers: Mapping[str, str], now: float) -> bool:
        """Whether the four auth headers are right; ``headers`` has lowercase names."""
        key_id = headers.get("x-access-key-id", "")
        timestamp = headers.get("x-timestamp", "")
        nonce = headers.get("x-nonce", "")
        if not (
            hmac.compare_digest(key_id.encode("utf-8"), self._access_key_id)
            and _TIMESTAMP.fullmatch(timestamp)
            and abs(now - int(timestamp)) <= TIMESTAMP_TOLERANCE
            and 1 <= len(nonce) <= 32
            and _signed(body, self._secret, headers.get("x-signature", ""))
        ):
            return False
        # Last, so that a forged request cannot burn a legitimate client's nonce.
        with self._lock:
            return self._remember_nonce(nonce, now)

    def _remember_nonce(self, nonce: str, now: float) -> bool:
        horizon = now - NONCE_TTL
        nonces = self._nonces
        while nonces:
            oldest_seen = next(iter(nonces.values()))
            if oldest_seen >= horizon and len(nonces) < NONCE_LIMIT:
                break
            nonces.popitem(last=False)
        seen = nonces.get(nonce)
        if seen is not None and seen >= horizon:
            return False
        nonces[nonce] = now
        nonces.move_to_end(nonce)
        return True

    def _get_receipts(self, body: dict[str, Any], now: float) -> _Answer:
        account_id = _account_id(GET_RECEIPT, body)
        if isinstance(account_id, _Answer):
            return account_id
        if "SessionNoSet" not in body:
            return _Answer(
                _error(GET_RECEIPT, RET_MISSING, "Missing parameter SessionNoSet"), "invalid"
            )
        asked = body["SessionNoSet"]
        if (
            not isinstance(asked, list)
            or not 1 <= len(asked) <= MAX_SESSIONS_PER_CALL
            or not all(isinstance(s, str) and s for s in asked)
        ):
            return _Answer(
                _error(GET_RECEIPT, RET_INVALID, "Invalid parameter SessionNoSet"), "invalid"
            )
        unique: list[str] = list(dict.fromkeys(asked))
        with self._lock:
            found = [self._sessions.get(session_no) for session_no in unique]
        # Sessions are immutable once built, so the receipts can be assembled outside the lock.
        if any(s is not None and s.scenario == "poison" for s in found):
            return _Answer(
                _error(GET_RECEIPT, RET_INVALID, "Invalid parameter SessionNoSet"), "poison"
            )
        shown: list[tuple[_Session, list[_Version]]] = []
        for session in found:
            if session is None or session.account_id != account_id:
                continue
            versions = session.visible(now)
            if versions:
                shown.append((session, versions))
        payload = {"RetCode": RET_OK, "Action": f"{GET_RECEIPT}Response"}
        return _Answer(payload, "ok", shown)

    def _send_batch(self, body: dict[str, Any], now: float) -> _Answer:
        account_id = _account_id(SEND_BATCH, body)
        if isinstance(account_id, _Answer):
            return account_id
        if "TaskContent" not in body:
            return _Answer(
                _error(SEND_BATCH, RET_MISSING, "Missing parameter TaskContent"), "invalid"
            )
        phones = _targets(body["TaskContent"])
        if phones is None:
            return _Answer(
                _error(SEND_BATCH, RET_INVALID, "Invalid parameter TaskContent"), "invalid"
            )
        template = body["TaskContent"][0].get("TemplateId")
        with self._lock:
            scenario = template if template in SCENARIOS else self._rng.choice(_DRAWABLE_SCENARIOS)
            session_no = self._new_session_no()
            self._sessions[session_no] = _build_session(
                account_id=account_id,
                session_no=session_no,
                scenario=scenario,
                sent_at=now,
                phones=phones,
                step=self._step,
            )
        response = {
            "RetCode": RET_OK,
            "Action": f"{SEND_BATCH}Response",
            "SessionNo": session_no,
            "FailContent": [],
        }
        return _Answer(response, "ok")

    # faults (the helpers below run under the lock: they use the shared RNG)

    def _draw_fault(self) -> str | None:
        faults = self._faults
        if not any(faults.get(kind, 0.0) > 0 for kind in FAULT_KINDS):
            return None  # keep the seeded RNG's sequence for scenario draws when no fault is set
        roll = self._rng.random()
        threshold = 0.0
        for kind in FAULT_KINDS:
            threshold += faults.get(kind, 0.0)
            if roll < threshold:
                return kind
        return None

    def _corrupt(
        self, fault: str, payload: dict[str, Any], asked: Sequence[str], account_id: int
    ) -> None:
        data: list[dict[str, Any]] = payload["Data"]
        if fault == "string_receipt_time":
            for entry in data:
                for receipt in entry["ReceiptSet"]:
                    receipt["ReceiptTime"] = str(receipt["ReceiptTime"])
        elif fault == "extra_sessions":
            receipt_time = math.floor(self._clock())
            phone = "(852)5" + "".join(self._rng.choices(string.digits, k=7))
            extra = {
                "Phone": phone,
                "CostCount": 1,
                "ReceiptResult": _SUCCESS[0],
                "ReceiptCode": _SUCCESS[1],
                "ReceiptDesc": _SUCCESS[2],
                "ReceiptTime": receipt_time,
                "UserId": "",
                "AccountId": account_id,
                "CountryCode": "852",
                "BrevityCode": "HK",
            }
            data.append({"SessionNo": self._new_session_no(exclude=asked), "ReceiptSet": [extra]})
        elif fault == "wrong_types":
            receipts = [receipt for entry in data for receipt in entry["ReceiptSet"]]
            variant = self._rng.choice(_WRONG_TYPE_VARIANTS) if receipts else "data_dict"
            if variant == "data_dict":
                payload["Data"] = {entry["SessionNo"]: entry["ReceiptSet"] for entry in data}
            elif variant == "receipt_time":
                receipts[0]["ReceiptTime"] = "abc"
            elif variant == "cost_count":
                receipts[0]["CostCount"] = "x"
            else:
                del receipts[0]["Phone"]

    def _new_session_no(self, exclude: Sequence[str] = ()) -> str:
        while True:
            session_no = "".join(self._rng.choices(_SESSION_NO_ALPHABET, k=16))
            if session_no not in self._sessions and session_no not in exclude:
                return session_no

    # control over HTTP

    def _handle_control(self, method: str, path: str, raw: bytes, client_host: str) -> _Reply:
        if not _is_loopback(client_host):
            return _json_reply(403, {"error": "control endpoints answer loopback clients only"})
        routes: dict[str, tuple[str, Callable[[bytes], Any]]] = {
            "/_sim/sessions": ("POST", self._control_sessions),
            "/_sim/faults": ("POST", self._control_faults),
            "/_sim/calls": ("GET", lambda _: {"calls": self.calls()}),
            "/_sim/truth": ("GET", lambda _: self.truth()),
            "/_sim/reset": ("POST", self._control_reset),
        }
        route = routes.get(path)
        if route is None:
            return _json_reply(404, {"error": f"no such path: {path}"})
        allowed, handler = route
        if method != allowed:
            return _json_reply(405, {"error": f"{path} takes {allowed}"})
        try:
            return _json_reply(200, handler(raw))
        except ValueError as exc:
            return _json_reply(400, {"error": str(exc)})

    def _control_sessions(self, raw: bytes) -> dict[str, Any]:
        sessions = _control_body(raw).get("sessions")
        if not isinstance(sessions, list):
            raise ValueError('body must be {"sessions": [...]}')
        self.register(sessions)
        return {"registered": len(sessions)}

    def _control_faults(self, raw: bytes) -> dict[str, Any]:
        faults = _control_body(raw)
        self.set_faults(**faults)
        with self._lock:
            return {"faults": dict(self._faults)}

    def _control_reset(self, _raw: bytes) -> dict[str, Any]:
        self.reset()
        return {"reset": True}


def _signed(body: Mapping[str, Any], secret: str, sent: str) -> bool:
    try:
        expected = signature(body, secret)
    except (TypeError, ValueError):  # e.g. a null value, which has no canonical form
        return False
    return hmac.compare_digest(sent.encode("utf-8"), expected.encode("utf-8"))


def _strings(value: Any) -> list[str]:
    """The strings of what should be a list of strings, for the call log."""
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def _parse_body(content_type: str, raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """The request body as a JSON object, or None and the error message to answer with."""
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        return None, "Invalid parameter Content-Type: expected application/json"
    try:
        body = json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both
        return None, "Invalid parameter: body is not JSON"
    if not isinstance(body, dict):
        return None, "Invalid parameter: body is not a JSON object"
    return body, ""


def _control_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


def _targets(tasks: Any) -> list[tuple[str, str]] | None:
    """(phone, user_id) of every target of a SendBatchUSMSMessage, or None when malformed."""
    if not isinstance(tasks, list) or not tasks:
        return None
    phones: list[tuple[str, str]] = []
    for task in tasks:
        targets = task.get("Target") if isinstance(task, dict) else None
        if not isinstance(targets, list) or not targets:
            return None
        for target in targets:
            phone = target.get("Phone") if isinstance(target, dict) else None
            if not isinstance(phone, str) or not phone:
                return None
            user_id = target.get("UserId", "")
            phones.append((phone, user_id if isinstance(user_id, str) else ""))
    return phones


def _early_fault(fault: str, action: str) -> tuple[_Reply, int | None]:
    if fault == "http_500":
        return _Reply(500, _HTML_500, "text/html"), None
    if fault == "http_429":
        return _Reply(429, _HTML_429, "text/html", (("Retry-After", "1"),)), None
    if fault == "retcode_server":
        return _json_reply(200, _error(action, RET_SERVER, "server error")), RET_SERVER
    return _json_reply(200, _error(action, RET_UNKNOWN, "something new")), RET_UNKNOWN


# --- HTTP plumbing -----------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    # Benchmarks open many connections at once; the default backlog of 5 drops them.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], simulator: Simulator) -> None:
        self.simulator = simulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS round trip we do not need.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        """End kept-alive connections, whose threads would otherwise keep serving after stop."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the peer
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients dropping connections (timeouts, stop()) are routine, not worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive: a new TCP connection per call would cap throughput well below what we need.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the second waits for the client's
    # delayed ACK, adding ~40 ms to every kept-alive call.
    disable_nagle_algorithm = True
    server_version = "UspeedoSimulator/1.0"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: one stderr line per request would drown test and benchmark output."""

    def do_POST(self) -> None:
        raw = self._read_body()
        if raw is None:
            return
        path = self.path.split("?", 1)[0]
        simulator = self.server.simulator
        if path == "/api":
            # Header names are case-insensitive; lowercase them once for plain dict lookups.
            headers = {name.lower(): value for name, value in self.headers.items()}
            content_type = headers.get("content-type", "")
            self._send(simulator._handle_api(content_type, headers, raw))
        else:
            self._send(simulator._handle_control("POST", path, raw, self.client_address[0]))

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/api":
            self._send(_json_reply(405, {"error": "the API takes POST"}))
            return
        self._send(self.server.simulator._handle_control("GET", path, b"", self.client_address[0]))

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send(_json_reply(411, {"error": "send a Content-Length"}))
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            # The unread body would be taken for the next request: drop the connection instead.
            self.close_connection = True
            self._send(_json_reply(413, {"error": "bad or oversized Content-Length"}))
            return None
        return self.rfile.read(length) if length else b""

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)


def serve(
    host: str,
    port: int,
    *,
    access_key_id: str,
    access_key_secret: str,
    step: float,
    seed: int | None,
) -> None:
    """Run the simulator in the foreground until interrupted (the ``receipts simulate`` command)."""
    simulator = Simulator(
        host=host,
        port=port,
        access_key_id=access_key_id,
        access_key_secret=access_key_secret,
        step=step,
        seed=seed,
    )
    print(
        f"Uspeedo simulator on {simulator.url} (key id {access_key_id}, scenario step {step:g}s)",
        flush=True,
    )
    try:
        simulator.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        simulator.stop()
