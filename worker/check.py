"""``receipts check``: one harmless signed call, and one line saying whether Uspeedo accepts
this host's credentials and clock, or exactly why not. The start of ``receipts worker`` and
``receipts run`` makes the same check (worker/cli.py).

The call is GetUSMSSendReceipt for one SessionNo that cannot exist (``ReceiptsCheck`` and 16
random hex digits) under one AccountId: it reads nothing that exists and changes nothing at
Uspeedo. The AccountId is ``--account-id``, else ``RECEIPTS_CHECK_ACCOUNT_ID``, else
``PLACEHOLDER_ACCOUNT_ID``, the AccountId of Uspeedo's own request example (the credentials
are judged before the AccountId, so any AccountId shows whether they are accepted; an API
that also refuses the placeholder says so, and the line asks for the real one).

Uspeedo answers RetCode 215398 both to wrong credentials and to an X-Timestamp more than five
minutes off its clock. The check tells the two apart by the answer's ``Date`` header: when this
host's clock is that far from it, the clock is named as the cause.

Exit codes (the verdict's ``exit_code``): 0 the credentials were accepted; 1 the API said no
(credentials, clock, an AccountId or another parameter, an unknown RetCode, an HTTP error that
is not the API's, an answer that is not its JSON); 3 no answer to judge by (DNS, connection,
TLS, timeout, HTTP 429 or 5xx, RetCode 215400): try again later. Usage and settings errors
exit 2 before any call (worker/cli.py).
"""

from __future__ import annotations

import math
import secrets
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Final
from urllib.parse import urlsplit

import requests

from worker.client import Probe, UspeedoClient
from worker.config import Settings
from worker.errors import (
    CREDENTIALS_HINT,
    AnswerTooLarge,
    ApiError,
    CredentialsError,
    MalformedResponse,
    ParameterError,
    ServerError,
    UspeedoError,
)
from worker.logs import mask_password

# The AccountId of the request example in Uspeedo's GetUSMSSendReceipt documentation.
PLACEHOLDER_ACCOUNT_ID: Final = 1
CHECK_SESSION_PREFIX: Final = "ReceiptsCheck"
# Uspeedo refuses an X-Timestamp more than this many seconds off its clock.
CLOCK_TOLERANCE: Final = 300
# A measured offset within this of the tolerance explains a refusal too: the Date header
# counts whole seconds and the call takes its round trip.
CLOCK_MARGIN: Final = 5

CLOCK_CAVEAT: Final = "or this host's clock is more than 5 minutes off, which Uspeedo refuses too"

# The start of a worker waits at most this long for the check: an API that answers slowly
# (or not at all) must not hold a worker up for a poll's whole timeouts.
START_CHECK_WITHIN: Final = 5.0

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREACHABLE: Final = 3


class Verdict(Enum):
    OK = "ok"
    CREDENTIALS = "credentials"  # RetCode 215398 with this host's clock in time
    CLOCK = "clock"  # RetCode 215398 with this host's clock more than 5 minutes off
    REFUSED = "refused"  # any other refusal, or an answer that is not the API's
    FAILING = "failing"  # HTTP 429 or 5xx, RetCode 215400: the API is there but failing
    UNREACHABLE = "unreachable"  # no HTTP answer at all

    @property
    def exit_code(self) -> int:
        if self is Verdict.OK:
            return EXIT_OK
        if self in (Verdict.FAILING, Verdict.UNREACHABLE):
            return EXIT_UNREACHABLE
        return EXIT_REFUSED


@dataclass(frozen=True, slots=True)
class CheckResult:
    verdict: Verdict
    line: str  # one line, for a person and a log

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code

    @property
    def refuses_start(self) -> bool:
        """Whether a worker must not start: every poll would be refused as well."""
        return self.verdict in (Verdict.CREDENTIALS, Verdict.CLOCK)


def new_check_session() -> str:
    return f"{CHECK_SESSION_PREFIX}{secrets.token_hex(8)}"


def is_check_session(session_no: str) -> bool:
    """Whether a SessionNo is one the check asked for (to tell its calls from polls)."""
    return session_no.startswith(CHECK_SESSION_PREFIX)


def check_api(
    settings: Settings, *, account_id: int | None = None, within: float | None = None
) -> CheckResult:
    """The check with the configured API, credentials and timeouts, under ``account_id``,
    else ``RECEIPTS_CHECK_ACCOUNT_ID``, else the placeholder; ``within`` bounds the whole
    call more tightly than the timeouts do (the start of a worker, START_CHECK_WITHIN)."""
    chosen = account_id or settings.check_account_id
    connect = settings.api_connect_timeout.total_seconds()
    read = settings.api_read_timeout.total_seconds()
    if within is not None:
        connect, read = min(connect, within), min(read, within)
    with UspeedoClient(
        api_url=settings.api_url,
        access_key_id=settings.access_key_id or "",
        access_key_secret=(
            settings.access_key_secret.get_secret_value() if settings.access_key_secret else ""
        ),
        connect_timeout=connect,
        read_timeout=read,
        attempt_timeout=min(connect + read, within or math.inf),
        max_attempts=1,
        max_answer_bytes=settings.api_max_answer_bytes,
    ) as client:
        return run_check(
            client,
            account_id=chosen or PLACEHOLDER_ACCOUNT_ID,
            placeholder=not chosen,
            timeouts_named=within is None,
        )


def run_check(
    client: UspeedoClient,
    *,
    account_id: int,
    placeholder: bool = False,
    timeouts_named: bool = True,
) -> CheckResult:
    """One probe by ``client`` (whose clock signs X-Timestamp) and its verdict;
    ``timeouts_named``: the client's timeouts are the RECEIPTS_API_* settings."""
    probe = client.probe(account_id, new_check_session())
    return _Judge(
        client,
        probe,
        account_id=account_id,
        placeholder=placeholder,
        timeouts_named=timeouts_named,
    ).verdict()


@dataclass(frozen=True, slots=True)
class _Judge:
    client: UspeedoClient
    probe: Probe
    account_id: int
    placeholder: bool
    timeouts_named: bool

    def verdict(self) -> CheckResult:
        error = self.probe.error
        if error is None:
            return CheckResult(Verdict.OK, self._ok())
        if isinstance(error, CredentialsError):
            return self._credentials(error)
        if isinstance(error, ServerError):
            return CheckResult(
                Verdict.FAILING,
                f"{self.host} failed ({self._retcode(error)}, {self.uuid}): Uspeedo's own "
                "error; try again later",
            )
        if isinstance(error, ParameterError) and "accountid" in error.api_message.lower():
            placeholder = f"{self.account_id} is a placeholder: " if self.placeholder else ""
            return CheckResult(
                Verdict.REFUSED,
                f"{self.host} refused AccountId {self.account_id} ({self._retcode(error)}, "
                f"{self.uuid}): {placeholder}give your Uspeedo AccountId (project id) with "
                "--account-id N or RECEIPTS_CHECK_ACCOUNT_ID",
            )
        if isinstance(error, ApiError):
            return CheckResult(
                Verdict.REFUSED,
                f"{self.host} refused the check ({self._retcode(error)}, {self.uuid})",
            )
        if isinstance(error, MalformedResponse):
            return CheckResult(Verdict.REFUSED, self._malformed(error))
        return self._transport(error)

    # -- what is said of the answer ----------------------------------------------------------

    @property
    def host(self) -> str:
        """The API's host as its URL names it (with the port only when the URL has one)."""
        parts = urlsplit(self.client.api_url)
        return parts.netloc.rpartition("@")[2]

    @property
    def host_port(self) -> str:
        parts = urlsplit(self.client.api_url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def url(self) -> str:
        return mask_password(self.client.api_url)

    @property
    def uuid(self) -> str:
        uuid = self.probe.request_uuid
        return f"request uuid {uuid}" if uuid else "no request uuid"

    @property
    def offset(self) -> int | None:
        """This host's clock minus the API's, in whole seconds, from the Date header."""
        probe = self.probe
        if probe.server_date is None or probe.answered_at is None:
            return None
        # The Date header drops the fraction of its second: on average the API's clock read
        # half a second more. The host's reading is taken halfway through the round trip.
        here = (probe.started_at + probe.answered_at) / 2
        return round(here - (probe.server_date + 0.5))

    def _offset_text(self) -> str:
        offset = self.offset
        if offset is None:
            return "clock offset unknown: no Date header"
        text = f"clock offset {offset:+d}s"
        if abs(offset) > CLOCK_TOLERANCE / 2:
            text += ", more than half of the 5 minutes Uspeedo tolerates"
        return text

    @staticmethod
    def _retcode(error: ApiError) -> str:
        return f"RetCode {error.ret_code} {error.api_message!r}"

    def _ok(self) -> str:
        return f"ok: credentials accepted by {self.host} ({self.uuid}, {self._offset_text()})"

    def _credentials(self, error: CredentialsError) -> CheckResult:
        offset = self.offset
        if offset is not None and abs(offset) >= CLOCK_TOLERANCE - CLOCK_MARGIN:
            way = "ahead of" if offset > 0 else "behind"
            return CheckResult(
                Verdict.CLOCK,
                f"{self.host} refused the request's time ({self._retcode(error)}, {self.uuid}): "
                f"this host's clock is {abs(offset)} s off ({way} {self.host}'s Date header); "
                "Uspeedo refuses requests more than 5 minutes off: set this host's clock "
                "right (e.g. with NTP)",
            )
        caveat = f"; {CLOCK_CAVEAT}" if offset is None else ""
        return CheckResult(
            Verdict.CREDENTIALS,
            f"{self.host} refused the credentials ({self._retcode(error)}, {self.uuid}, "
            f"{self._offset_text()}): {CREDENTIALS_HINT}{caveat}",
        )

    def _malformed(self, error: MalformedResponse) -> str:
        probe = self.probe
        if isinstance(error, AnswerTooLarge):
            what = f"HTTP {probe.status}, more than {error.limit} bytes"
        else:
            excerpt = repr(probe.excerpt.decode("utf-8", "replace"))
            if probe.size > len(probe.excerpt):
                excerpt += "..."
            content_type = probe.content_type or "no Content-Type"
            what = f"HTTP {probe.status}, {content_type}, {probe.size} bytes: {excerpt}"
        return (
            f"{self.host} answered something that is not the Uspeedo API's JSON ({what}, "
            f"{self.uuid}): is RECEIPTS_API_URL ({self.url}) right?"
        )

    def _transport(self, error: UspeedoError) -> CheckResult:
        status = error.http_status
        if status is not None and (status == 429 or status >= 500):
            return CheckResult(
                Verdict.FAILING,
                f"{self.host} answered HTTP {status} ({self.uuid}): the API is failing or "
                "overloaded; try again later",
            )
        if status is not None:
            return CheckResult(
                Verdict.REFUSED,
                f"{self.host} answered HTTP {status} without a RetCode ({self.uuid}): is "
                f"RECEIPTS_API_URL ({self.url}) the Uspeedo API?",
            )
        return CheckResult(
            Verdict.UNREACHABLE,
            f"cannot reach {self.host_port}: {self._unreachable(error)} "
            f"(RECEIPTS_API_URL is {self.url})",
        )

    def _unreachable(self, error: UspeedoError) -> str:
        """Why no HTTP answer came, from what the request raised (DNS, TCP, TLS, time)."""
        causes = list(_causes(error))
        for cause in causes:
            if isinstance(cause, ssl.SSLCertVerificationError):
                return f"TLS certificate refused ({cause.verify_message})"
            if isinstance(cause, ssl.SSLError):
                return f"TLS handshake failed ({cause.reason or cause})"
        connect = self.client.timeout[0]
        named = self.timeouts_named
        for cause in causes:
            if isinstance(cause, socket.gaierror):
                return f"the name does not resolve (DNS: {cause.strerror or cause})"
            if isinstance(cause, requests.ConnectTimeout):
                setting = " (RECEIPTS_API_CONNECT_TIMEOUT)" if named else ""
                return f"no connection within {connect:g} s{setting}"
            if isinstance(cause, requests.Timeout | TimeoutError):
                settings = (
                    " (RECEIPTS_API_CONNECT_TIMEOUT + RECEIPTS_API_READ_TIMEOUT)" if named else ""
                )
                return f"no answer within {self.client.attempt_timeout:g} s{settings}"
            if isinstance(cause, ConnectionRefusedError):
                return "connection refused"
            if isinstance(cause, ConnectionResetError):
                return "connection reset"
        for cause in reversed(causes):
            if isinstance(cause, OSError) and cause.strerror:
                return cause.strerror
        return str(error)


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it was raised from, outermost first: requests wraps urllib3's
    errors (``reason``), which wrap the socket's."""
    seen: set[int] = set()
    queue: list[BaseException] = [error]
    while queue and len(seen) < 20:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None)]
        linked.extend(current.args)
        queue.extend(item for item in linked if isinstance(item, BaseException))
