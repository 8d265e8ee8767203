"""``receipts check``: one harmless signed call, and one line saying whether Uspeedo accepts
the credentials and this host's clock, or exactly why not, with an exit code a script can
branch on (0 ok, 1 the API said no, 2 usage or settings, 3 unreachable).

Against the project's simulator on loopback for everything it models (right and wrong
credentials, a clock off by more than five minutes, HTTP faults, an answer cut in half), and
against a mocked endpoint for answers it never gives (an AccountId refused, no Date header).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import responses

from tests.support.cli import invoke
from tests.support.databases import Configure
from tests.support.servers import free_port
from worker.check import (
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    PLACEHOLDER_ACCOUNT_ID,
    CheckResult,
    Verdict,
    is_check_session,
    run_check,
)
from worker.client import UspeedoClient
from worker.simulator import Simulator

KEY_ID = "demo"
SECRET = "demo-secret"
WRONG_SECRET = "Wrong-Secret-never-printed"
T0 = 1_700_000_000.0
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
HINT = (
    "the AccessKey id/secret is wrong or expired: check RECEIPTS_ACCESS_KEY_ID and "
    "RECEIPTS_ACCESS_KEY_SECRET"
)
MOCK_URL = "https://api.check.invalid/api"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(access_key_id=KEY_ID, access_key_secret=SECRET, seed=5) as simulator:
        yield simulator


def _host(sim: Simulator) -> str:
    return sim.url.removeprefix("http://").removesuffix("/api")


def _settings(configure: Configure, url: str, **extra: str) -> None:
    configure(
        RECEIPTS_API_URL=url,
        RECEIPTS_ACCESS_KEY_ID=extra.pop("key_id", KEY_ID),
        RECEIPTS_ACCESS_KEY_SECRET=extra.pop("secret", SECRET),
        **extra,
    )


def _one_line(text: str) -> str:
    assert text.endswith("\n") and text.count("\n") == 1, f"not one line: {text!r}"
    assert "Traceback" not in text
    return text.removesuffix("\n")


# --- the simulator: what the check sees -------------------------------------------------


def test_right_credentials_are_accepted_in_one_line(configure: Configure, sim: Simulator) -> None:
    _settings(configure, sim.url)
    result = invoke("check")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    line = _one_line(result.stdout)
    assert re.fullmatch(
        rf"ok: credentials accepted by {re.escape(_host(sim))} "
        rf"\(request uuid {UUID}, clock offset [+-][01]s\)",
        line,
    ), line
    # One call, reading nothing that exists and changing nothing.
    [call] = sim.calls()
    assert call["action"] == "GetUSMSSendReceipt" and call["outcome"] == "ok"
    assert call["account_id"] == PLACEHOLDER_ACCOUNT_ID == 1
    [session_no] = call["session_nos"]
    assert is_check_session(session_no)
    assert sim.truth()["sessions"] == {}


def test_the_account_id_comes_from_the_option_then_the_setting(
    configure: Configure, sim: Simulator
) -> None:
    _settings(configure, sim.url, RECEIPTS_CHECK_ACCOUNT_ID="43")
    assert invoke("check").exit_code == 0
    assert invoke("check", "--account-id", "42").exit_code == 0
    assert [c["account_id"] for c in sim.calls()] == [43, 42]


@pytest.mark.parametrize("account_id", ["0", "-3", "x"])
def test_an_impossible_account_id_is_a_usage_error(
    configure: Configure, sim: Simulator, account_id: str
) -> None:
    _settings(configure, sim.url)
    result = invoke("check", "--account-id", account_id)
    assert result.exit_code == 2
    assert sim.calls() == []


@pytest.mark.parametrize("account_id", ["0", "x"])
def test_an_impossible_account_id_setting_is_a_settings_error(
    configure: Configure, sim: Simulator, account_id: str
) -> None:
    _settings(configure, sim.url, RECEIPTS_CHECK_ACCOUNT_ID=account_id)
    result = invoke("check")
    assert result.exit_code == 2
    assert "RECEIPTS_CHECK_ACCOUNT_ID" in result.stderr
    assert sim.calls() == []


def test_missing_credentials_are_a_settings_error(configure: Configure, sim: Simulator) -> None:
    configure(RECEIPTS_API_URL=sim.url, RECEIPTS_ACCESS_KEY_ID=KEY_ID)
    result = invoke("check")
    assert result.exit_code == 2
    assert _one_line(result.stderr) == (
        f"error: RECEIPTS_ACCESS_KEY_SECRET must be set to poll {sim.url}"
    )
    assert sim.calls() == []


@pytest.mark.parametrize(
    "wrong", [pytest.param({"secret": WRONG_SECRET}, id="secret"), {"key_id": "someone-else"}]
)
def test_wrong_credentials_are_named_with_the_variables_to_check(
    configure: Configure, sim: Simulator, wrong: dict[str, str]
) -> None:
    _settings(configure, sim.url, **wrong)
    result = invoke("check")
    assert result.exit_code == EXIT_REFUSED == 1
    assert result.stdout == ""
    line = _one_line(result.stderr)
    assert re.fullmatch(
        rf"error: {re.escape(_host(sim))} refused the credentials \(RetCode 215398 "
        rf"'Failed to parse token', request uuid {UUID}, clock offset [+-][01]s\): "
        + re.escape(HINT),
        line,
    ), line
    assert WRONG_SECRET not in result.output
    assert [c["outcome"] for c in sim.calls()] == ["auth"], "one call, not retried"


def _fixed_clock_check(offset: float) -> tuple[CheckResult, str]:
    """The check of a client whose clock reads ``offset`` seconds off the simulator's (both
    fixed, so that the measured offset is exact), and the simulator's host."""
    with (
        Simulator(access_key_id=KEY_ID, access_key_secret=SECRET, clock=lambda: T0) as simulator,
        UspeedoClient(
            api_url=simulator.url,
            access_key_id=KEY_ID,
            access_key_secret=SECRET,
            max_attempts=1,
            clock=lambda: T0 + offset,
        ) as client,
    ):
        return run_check(client, account_id=7), _host(simulator)


@pytest.mark.parametrize(
    ("offset", "way"), [(400, "ahead of"), (-400, "behind"), (301, "ahead of")]
)
def test_a_clock_beyond_five_minutes_is_named_as_the_cause(offset: int, way: str) -> None:
    result, host = _fixed_clock_check(offset)
    assert result.verdict is Verdict.CLOCK
    assert result.exit_code == 1
    assert result.refuses_start
    # The Date header has whole seconds: 301 s off reads as 300.5 s, shown rounded (even).
    shown = {400: 400, -400: 400, 301: 300}[offset]
    assert re.fullmatch(
        rf"{re.escape(host)} refused the request's time \(RetCode 215398 'Failed to parse "
        rf"token', request uuid {UUID}\): this host's clock is {shown} s off \({way} "
        rf"{re.escape(host)}'s Date header\); Uspeedo refuses requests more than 5 minutes "
        r"off: set this host's clock right \(e\.g\. with NTP\)",
        result.line,
    ), result.line


def test_a_clock_off_within_the_tolerance_is_accepted_and_shown() -> None:
    result, host = _fixed_clock_check(-200)
    assert result.verdict is Verdict.OK and result.exit_code == 0
    assert not result.refuses_start
    assert re.fullmatch(
        rf"ok: credentials accepted by {re.escape(host)} \(request uuid {UUID}, "
        r"clock offset -200s, more than half of the 5 minutes Uspeedo tolerates\)",
        result.line,
    ), result.line


def test_a_closed_port_is_unreachable(configure: Configure) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    _settings(configure, url)
    result = invoke("check")
    assert result.exit_code == EXIT_UNREACHABLE == 3
    assert _one_line(result.stderr) == (
        f"error: cannot reach 127.0.0.1:{port}: connection refused (RECEIPTS_API_URL is {url})"
    )


def test_a_name_that_does_not_resolve_is_unreachable(
    configure: Configure, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "api.check.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    _settings(configure, MOCK_URL)
    result = invoke("check")
    assert result.exit_code == 3
    assert _one_line(result.stderr) == (
        "error: cannot reach api.check.invalid:443: the name does not resolve (DNS: Name or "
        f"service not known) (RECEIPTS_API_URL is {MOCK_URL})"
    )


def test_a_failed_tls_handshake_is_unreachable(configure: Configure, sim: Simulator) -> None:
    url = sim.url.replace("http://", "https://")
    _settings(configure, url)
    result = invoke("check")
    assert result.exit_code == 3
    line = _one_line(result.stderr)
    assert line.startswith(f"error: cannot reach {_host(sim)}: TLS handshake failed (")
    assert "WRONG_VERSION_NUMBER" in line and line.endswith(f"(RECEIPTS_API_URL is {url})")


def test_no_answer_within_the_timeouts_is_unreachable(configure: Configure) -> None:
    with socket.socket() as silent:  # accepts connections (in its backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        _settings(
            configure,
            url,
            RECEIPTS_API_CONNECT_TIMEOUT="0.25",
            RECEIPTS_API_READ_TIMEOUT="0.25",
        )
        result = invoke("check")
    assert result.exit_code == 3
    assert _one_line(result.stderr) == (
        f"error: cannot reach {url.removeprefix('http://').removesuffix('/api')}: no answer "
        "within 0.5 s (RECEIPTS_API_CONNECT_TIMEOUT + RECEIPTS_API_READ_TIMEOUT) "
        f"(RECEIPTS_API_URL is {url})"
    )


def test_an_answer_that_is_not_json_is_named(configure: Configure, sim: Simulator) -> None:
    sim.set_faults(truncated=1.0)
    _settings(configure, sim.url)
    result = invoke("check")
    assert result.exit_code == 1
    line = _one_line(result.stderr)
    assert re.fullmatch(
        rf"error: {re.escape(_host(sim))} answered something that is not the Uspeedo API's "
        rf"JSON \(HTTP 200, application/json; charset=utf-8, \d+ bytes: '\{{\"RetCode\":0,"
        rf".*', request uuid {UUID}\): is RECEIPTS_API_URL \({re.escape(sim.url)}\) right\?",
        line,
    ), line


@pytest.mark.parametrize(("fault", "status"), [("http_500", 500), ("http_429", 429)])
def test_an_overloaded_or_failing_api_is_unreachable_for_now(
    configure: Configure, sim: Simulator, fault: str, status: int
) -> None:
    sim.set_faults(**{fault: 1.0})
    _settings(configure, sim.url)
    result = invoke("check")
    assert result.exit_code == 3
    line = _one_line(result.stderr)
    assert re.fullmatch(
        rf"error: {re.escape(_host(sim))} answered HTTP {status} \(request uuid {UUID}\): "
        r"the API is failing or overloaded; try again later",
        line,
    ), line
    assert len(sim.calls()) == 1, "one call: the check does not retry"


def test_a_server_retcode_is_unreachable_for_now(configure: Configure, sim: Simulator) -> None:
    sim.set_faults(retcode_server=1.0)
    _settings(configure, sim.url)
    result = invoke("check")
    assert result.exit_code == 3
    assert re.fullmatch(
        rf"error: {re.escape(_host(sim))} failed \(RetCode 215400 'server error', request uuid "
        rf"{UUID}\): Uspeedo's own error; try again later",
        _one_line(result.stderr),
    )


def test_an_unknown_retcode_is_a_refusal(configure: Configure, sim: Simulator) -> None:
    sim.set_faults(retcode_unknown=1.0)
    _settings(configure, sim.url)
    result = invoke("check")
    assert result.exit_code == 1
    assert re.fullmatch(
        rf"error: {re.escape(_host(sim))} refused the check \(RetCode 299999 'something new', "
        rf"request uuid {UUID}\)",
        _one_line(result.stderr),
    )


def test_a_url_that_is_not_the_api_is_named(configure: Configure, sim: Simulator) -> None:
    url = sim.url.removesuffix("/api") + "/not-the-api"
    _settings(configure, url)
    result = invoke("check")
    assert result.exit_code == 1
    assert _one_line(result.stderr) == (
        f"error: {_host(sim)} answered HTTP 404 without a RetCode (no request uuid): is "
        f"RECEIPTS_API_URL ({url}) the Uspeedo API?"
    )


# --- answers the simulator never gives ----------------------------------------------------


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock() as mock:
        yield mock


def _answer(mock: responses.RequestsMock, body: dict[str, Any], **headers: str) -> None:
    mock.add(
        responses.POST, MOCK_URL, json=body, headers={"X-Speedo-Request-Uuid": "u-1", **headers}
    )


def test_a_refused_account_id_is_named(
    configure: Configure, mocked: responses.RequestsMock
) -> None:
    _answer(mocked, {"RetCode": 215392, "Message": "Invalid parameter AccountId"})
    _settings(configure, MOCK_URL, RECEIPTS_CHECK_ACCOUNT_ID="123")
    result = invoke("check")
    assert result.exit_code == 1
    assert _one_line(result.stderr) == (
        "error: api.check.invalid refused AccountId 123 (RetCode 215392 'Invalid parameter "
        "AccountId', request uuid u-1): give your Uspeedo AccountId (project id) with "
        "--account-id N or RECEIPTS_CHECK_ACCOUNT_ID"
    )


def test_a_refused_placeholder_account_id_says_it_was_a_placeholder(
    configure: Configure, mocked: responses.RequestsMock
) -> None:
    _answer(mocked, {"RetCode": 215392, "Message": "Invalid parameter AccountId"})
    _settings(configure, MOCK_URL)
    result = invoke("check")
    assert result.exit_code == 1
    assert _one_line(result.stderr) == (
        "error: api.check.invalid refused AccountId 1 (RetCode 215392 'Invalid parameter "
        "AccountId', request uuid u-1): 1 is a placeholder: give your Uspeedo AccountId "
        "(project id) with --account-id N or RECEIPTS_CHECK_ACCOUNT_ID"
    )


def test_a_refusal_without_a_date_header_names_the_clock_too(
    configure: Configure, mocked: responses.RequestsMock
) -> None:
    _answer(mocked, {"RetCode": 215398, "Message": "Failed to parse token"})
    _settings(configure, MOCK_URL)
    result = invoke("check")
    assert result.exit_code == 1
    assert _one_line(result.stderr) == (
        "error: api.check.invalid refused the credentials (RetCode 215398 'Failed to parse "
        "token', request uuid u-1, clock offset unknown: no Date header): "
        f"{HINT}; or this host's clock is more than 5 minutes off, which Uspeedo refuses too"
    )


def test_an_html_page_is_not_the_api(configure: Configure, mocked: responses.RequestsMock) -> None:
    mocked.add(
        responses.POST,
        MOCK_URL,
        body="<html><head><title>Welcome to nginx!</title></head></html>",
        content_type="text/html",
    )
    _settings(configure, MOCK_URL)
    result = invoke("check")
    assert result.exit_code == 1
    assert _one_line(result.stderr) == (
        "error: api.check.invalid answered something that is not the Uspeedo API's JSON "
        "(HTTP 200, text/html, 58 bytes: '<html><head><title>Welcome to nginx!</title></head>"
        f"</html>', no request uuid): is RECEIPTS_API_URL ({MOCK_URL}) right?"
    )
