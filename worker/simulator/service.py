"""The fake Uspeedo API without its transport: sessions, checks, actions, faults, calls, truth.

The HTTP layer (``worker.simulator.http``) hands each request's content type, headers and body to
this service and sends back the reply it returns.
"""

from __future__ import annotations

import hmac
import json
import random
import re
import string
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker.signing import signature
from worker.simulator.faults import (
    DEFAULT_SLOW_SECONDS,
    EARLY_FAULTS,
    RECEIPT_FAULTS,
    checked_faults,
    corrupt,
    draw_fault,
    early_fault,
)
from worker.simulator.scenarios import (
    DRAWABLE_SCENARIOS,
    SCENARIOS,
    Session,
    Version,
    build_session,
)
from worker.simulator.wire import (
    GET_RECEIPT,
    RET_AUTH,
    RET_INVALID,
    RET_MISSING,
    RET_OK,
    SEND_BATCH,
    Reply,
    dumps,
    error,
    is_number,
)

MAX_SESSIONS_PER_CALL = 100
TIMESTAMP_TOLERANCE = 300.0
NONCE_TTL = 600.0
# The replay window is bounded by time; this cap bounds memory even under extreme call rates
# (past it the oldest nonces are forgotten early, which only narrows the replay window).
NONCE_LIMIT = 500_000
# Benchmarks make hundreds of thousands of calls; keep the most recent ones only.
CALL_LOG_LIMIT = 200_000
_SESSION_NO_ALPHABET = string.ascii_letters + string.digits
_TIMESTAMP = re.compile(r"[0-9]{1,12}")

# --- request parsing helpers -------------------------------------------------------------------


def _account_id(action: str, body: Mapping[str, Any]) -> int | _Answer:
    """The request's AccountId, or the error answer both actions give for a bad one."""
    if "AccountId" not in body:
        return _Answer(error(action, RET_MISSING, "Missing parameter AccountId"), "invalid")
    account_id = _positive_int(body["AccountId"])
    if account_id is None:
        return _Answer(error(action, RET_INVALID, "Invalid parameter AccountId"), "invalid")
    return account_id


def _positive_int(value: Any) -> int | None:
    # bool is an int subclass, and `true` is no account id.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


@dataclass(slots=True)
class _Answer:
    """The normal answer to one API call, and the outcome to log."""

    payload: dict[str, Any]
    outcome: str
    # A successful receipt query keeps its Data here, as what each session shows, until rendered.
    found: list[tuple[Session, list[Version]]] | None = None

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
            return dumps(self.payload)
        entries = ",".join(
            f'{{"SessionNo":{session.session_no_json},"ReceiptSet":[{receipts}]}}'
            for session, shown in self.found
            for receipts in [",".join(version.text for version in shown)]
        )
        return f'{dumps(self.payload)[:-1]},"Data":[{entries}]}}'


# --- the service ----------------------------------------------------------------------------


class FakeUspeedo:
    """The fake Uspeedo API, safe to call from many threads; it knows nothing of sockets."""

    def __init__(
        self,
        *,
        access_key_id: str,
        access_key_secret: str,
        step: float,
        seed: int | None,
        clock: Callable[[], float],
        on_session: Callable[[Session], None] | None = None,
    ) -> None:
        if not step > 0:
            raise ValueError("step must be positive")
        self._access_key_id = access_key_id.encode("utf-8")
        self._secret = access_key_secret
        self._step = step
        self._clock = clock
        # Told of every session registered or sent (the push schedules its reports), outside
        # the lock.
        self._on_session = on_session
        # One lock guards everything below; each request holds it only for O(batch) work.
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._sessions: dict[str, Session] = {}
        self._faults: dict[str, float] = {}
        self._calls: deque[dict[str, Any]] = deque(maxlen=CALL_LOG_LIMIT)
        # Insertion order is arrival order, so expired nonces are always at the front.
        self._nonces: OrderedDict[str, float] = OrderedDict()

    def now(self) -> float:
        """The service's clock: what X-Timestamp is judged by and the Date of its answers."""
        return self._clock()

    # control

    def register(self, sessions: Iterable[Mapping[str, Any]]) -> None:
        """Register sessions to play (all or none: the batch is validated first)."""
        if isinstance(sessions, str | bytes) or not isinstance(sessions, Iterable):
            raise ValueError("sessions must be a list of objects")
        built = [self._parse_registration(spec) for spec in sessions]
        with self._lock:
            for session in built:
                self._sessions[session.session_no] = session
        if self._on_session is not None:
            for session in built:
                self._on_session(session)

    def set_faults(self, **faults: float) -> None:
        """Replace the fault probabilities (per API call); no arguments clears them."""
        clean = checked_faults(faults)
        with self._lock:
            self._faults = clean

    def faults(self) -> dict[str, float]:
        """The fault probabilities and parameters in force."""
        with self._lock:
            return dict(self._faults)

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

    def _parse_registration(self, spec: Any) -> Session:
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
        elif not is_number(sent_at):
            raise ValueError(f"sent_at of {session_no!r} must be unix seconds")
        user_id = spec.get("user_id", "")
        if not isinstance(user_id, str):
            raise ValueError(f"user_id of {session_no!r} must be a string")
        return build_session(
            account_id=account_id,
            session_no=session_no,
            scenario=scenario,
            sent_at=float(sent_at),
            phones=[(phone, user_id) for phone in phones],
            step=self._step,
        )

    # the API

    def handle_api(self, content_type: str, headers: Mapping[str, str], raw: bytes) -> Reply:
        """The reply to one ``POST /api``; ``headers`` has lowercase names."""
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
            fault = draw_fault(self._faults, self._rng)
            slow_seconds = self._faults.get("slow_seconds", DEFAULT_SLOW_SECONDS)
        if fault == "slow":
            time.sleep(slow_seconds)  # outside the lock: a slow call must not stall the others

        if fault in EARLY_FAULTS:
            reply, ret_code = early_fault(fault, action)
            outcome: str = fault
        else:
            answer = self._answer(body, parse_error, headers, action, received)
            outcome = answer.outcome
            if action == SEND_BATCH and outcome == "ok":
                call["session_nos"] = [answer.payload["SessionNo"]]
            if fault in RECEIPT_FAULTS and action == GET_RECEIPT and outcome == "ok":
                answer.materialize()
                asked_nos: list[str] = call["session_nos"]
                with self._lock:
                    corrupt(
                        fault,
                        answer.payload,
                        account_id=call["account_id"],
                        rng=self._rng,
                        clock=self._clock,
                        new_session_no=lambda: self._new_session_no(exclude=asked_nos),
                    )
                outcome = fault
            elif fault == "slow":
                outcome = fault
            text = answer.text()
            if fault == "truncated":
                text = text[: len(text) // 2]
                outcome = fault
            reply = Reply(200, text.encode("utf-8"))
            ret_code = answer.payload["RetCode"]

        reply = Reply(
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
            return _Answer(error(action, RET_INVALID, parse_error), "invalid")
        if not self._authentic(body, headers, now):
            return _Answer(error(action, RET_AUTH, "Failed to parse token"), "auth")
        if "Action" not in body:
            return _Answer(error(action, RET_MISSING, "Missing parameter Action"), "invalid")
        if action == GET_RECEIPT:
            return self._get_receipts(body, now)
        if action == SEND_BATCH:
            return self._send_batch(body, now)
        return _Answer(error(action, RET_INVALID, "Invalid parameter Action"), "invalid")

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
                error(GET_RECEIPT, RET_MISSING, "Missing parameter SessionNoSet"), "invalid"
            )
        asked = body["SessionNoSet"]
        if (
            not isinstance(asked, list)
            or not 1 <= len(asked) <= MAX_SESSIONS_PER_CALL
            or not all(isinstance(s, str) and s for s in asked)
        ):
            return _Answer(
                error(GET_RECEIPT, RET_INVALID, "Invalid parameter SessionNoSet"), "invalid"
            )
        unique: list[str] = list(dict.fromkeys(asked))
        with self._lock:
            found = [self._sessions.get(session_no) for session_no in unique]
        # Sessions are immutable once built, so the receipts can be assembled outside the lock.
        if any(s is not None and s.scenario == "poison" for s in found):
            return _Answer(
                error(GET_RECEIPT, RET_INVALID, "Invalid parameter SessionNoSet"), "poison"
            )
        shown: list[tuple[Session, list[Version]]] = []
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
                error(SEND_BATCH, RET_MISSING, "Missing parameter TaskContent"), "invalid"
            )
        phones = _targets(body["TaskContent"])
        if phones is None:
            return _Answer(
                error(SEND_BATCH, RET_INVALID, "Invalid parameter TaskContent"), "invalid"
            )
        template = body["TaskContent"][0].get("TemplateId")
        with self._lock:
            scenario = template if template in SCENARIOS else self._rng.choice(DRAWABLE_SCENARIOS)
            session_no = self._new_session_no()
            sent = build_session(
                account_id=account_id,
                session_no=session_no,
                scenario=scenario,
                sent_at=now,
                phones=phones,
                step=self._step,
            )
            self._sessions[session_no] = sent
        if self._on_session is not None:
            self._on_session(sent)
        response = {
            "RetCode": RET_OK,
            "Action": f"{SEND_BATCH}Response",
            "SessionNo": session_no,
            "FailContent": [],
        }
        return _Answer(response, "ok")

    # session numbers (under the lock: they use the shared RNG)

    def _new_session_no(self, exclude: Sequence[str] = ()) -> str:
        while True:
            session_no = "".join(self._rng.choices(_SESSION_NO_ALPHABET, k=16))
            if session_no not in self._sessions and session_no not in exclude:
                return session_no


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
