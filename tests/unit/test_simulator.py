"""The fake Uspeedo API, exercised over real HTTP on loopback with an injected clock."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from worker.domain import phone_key
from worker.signing import new_nonce, signature
from worker.simulator import SCENARIOS, Simulator

KEY_ID = "test-key"
SECRET = "test-secret"
T0 = 1_700_000_000.0  # a whole second, so ReceiptTime arithmetic below is easy to read
STEP = 0.2
ACCOUNT = 7
PHONES = ["(852)55311111", "8613800000000"]


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def at_step(self, steps: float, sent_at: float = T0) -> None:
        self.now = sent_at + steps * STEP


class Api:
    """Signs requests the way worker/signing.py describes, with the simulator's (fake) time."""

    def __init__(self, sim: Simulator, clock: FakeClock, http: requests.Session) -> None:
        self.sim = sim
        self.clock = clock
        self.http = http
        self.base = sim.url.removesuffix("/api")

    def post(
        self,
        body: dict[str, Any],
        *,
        key_id: str = KEY_ID,
        secret: str = SECRET,
        timestamp: int | None = None,
        nonce: str | None = None,
        sign: str | None = None,
    ) -> requests.Response:
        headers = {
            "Content-Type": "application/json",
            "X-Access-Key-Id": key_id,
            "X-Timestamp": str(int(self.clock.now) if timestamp is None else timestamp),
            "X-Nonce": new_nonce() if nonce is None else nonce,
            "X-Signature": signature(body, secret) if sign is None else sign,
        }
        return self.http.post(self.sim.url, data=json.dumps(body), headers=headers, timeout=5)

    def receipts(self, session_nos: list[str], account_id: int = ACCOUNT) -> dict[str, Any]:
        body = {
            "Action": "GetUSMSSendReceipt",
            "AccountId": account_id,
            "SessionNoSet": session_nos,
        }
        response = self.post(body)
        assert response.status_code == 200
        payload: dict[str, Any] = response.json()
        return payload

    def data(self, session_nos: list[str], account_id: int = ACCOUNT) -> dict[str, list[Any]]:
        """ReceiptSet by SessionNo, for a call expected to succeed."""
        payload = self.receipts(session_nos, account_id)
        assert payload["RetCode"] == 0, payload
        return {entry["SessionNo"]: entry["ReceiptSet"] for entry in payload["Data"]}

    def control(self, method: str, path: str, body: Any = None) -> requests.Response:
        return self.http.request(method, f"{self.base}{path}", json=body, timeout=5)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def sim(clock: FakeClock) -> Iterator[Simulator]:
    with Simulator(
        access_key_id=KEY_ID, access_key_secret=SECRET, step=STEP, seed=3, clock=clock
    ) as simulator:
        yield simulator


@pytest.fixture
def api(sim: Simulator, clock: FakeClock) -> Iterator[Api]:
    with requests.Session() as http:
        yield Api(sim, clock, http)


def register(sim: Simulator, session_no: str, scenario: str, **extra: Any) -> None:
    spec = {
        "account_id": ACCOUNT,
        "session_no": session_no,
        "phones": PHONES,
        "scenario": scenario,
        "sent_at": T0,
    }
    sim.register([{**spec, **extra}])


def get_body(session_nos: list[str]) -> dict[str, Any]:
    return {"Action": "GetUSMSSendReceipt", "AccountId": ACCOUNT, "SessionNoSet": session_nos}


# --- lifecycle ---------------------------------------------------------------------------------


def test_url_is_loopback_api_and_port_is_bound_before_start() -> None:
    simulator = Simulator()
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/api", simulator.url)
        assert not simulator.url.endswith(":0/api")
    finally:
        simulator.stop()
    simulator.stop()  # idempotent


def test_stop_ends_kept_alive_connections(clock: FakeClock) -> None:
    simulator = Simulator(access_key_id=KEY_ID, access_key_secret=SECRET, clock=clock).start()
    with requests.Session() as http:
        api = Api(simulator, clock, http)
        assert api.receipts(["x"])["RetCode"] == 0
        simulator.stop()
        with pytest.raises(requests.ConnectionError):
            api.receipts(["x"])


def test_serve_prints_one_line_without_the_secret() -> None:
    code = (
        "from worker.simulator import serve\n"
        "serve('127.0.0.1', 0, access_key_id='kid', access_key_secret='hush-hush', step=0.5,"
        " seed=1)\n"
    )
    root = Path(__file__).resolve().parents[2]
    with subprocess.Popen(
        [sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            url = re.escape("http://127.0.0.1:") + r"\d+/api"
            match = re.fullmatch(
                rf"Uspeedo simulator on ({url}) \(key id kid, scenario step 0\.5s\)\n", line
            )
            assert match, line
            assert "hush-hush" not in line
            calls = requests.get(match.group(1).removesuffix("/api") + "/_sim/calls", timeout=5)
            assert calls.json() == {"calls": []}
        finally:
            process.terminate()
            process.wait(timeout=5)


# --- authentication ----------------------------------------------------------------------------


def test_signed_request_is_accepted(api: Api) -> None:
    response = api.post(get_body(["nothing-here"]))
    assert response.status_code == 200
    assert response.json() == {"RetCode": 0, "Action": "GetUSMSSendReceiptResponse", "Data": []}
    assert re.fullmatch(r"[0-9a-f-]{36}", response.headers["X-Speedo-Request-Uuid"])


def test_contract_test_vector_signs_as_the_simulator_expects(clock: FakeClock) -> None:
    body = {"Action": "GetUSMSSendReceipt", "AccountId": 1, "SessionNoSet": ["a", "b"]}
    with (
        Simulator(access_key_id="id", access_key_secret="secret", clock=clock) as simulator,
        requests.Session() as http,
    ):
        api = Api(simulator, clock, http)
        response = api.post(body, key_id="id", sign="8038aa1907f0f47dde822123cbfae9a0a4585408")
    assert response.json()["RetCode"] == 0


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"sign": "0" * 40}, id="wrong-signature"),
        pytest.param({"secret": "not-the-secret"}, id="wrong-secret"),
        pytest.param({"key_id": "someone-else"}, id="wrong-key-id"),
        pytest.param({"timestamp": int(T0) - 301}, id="timestamp-too-old"),
        pytest.param({"timestamp": int(T0) + 301}, id="timestamp-in-future"),
        pytest.param({"nonce": "n" * 33}, id="nonce-too-long"),
        pytest.param({"nonce": ""}, id="nonce-empty"),
    ],
)
def test_bad_credentials_fail_to_parse_token(api: Api, overrides: dict[str, Any]) -> None:
    response = api.post(get_body(["s"]), **overrides)
    assert response.status_code == 200
    assert response.json() == {
        "RetCode": 215398,
        "Message": "Failed to parse token",
        "Action": "GetUSMSSendReceiptResponse",
    }
    assert "X-Speedo-Request-Uuid" in response.headers
    assert api.sim.calls()[-1]["outcome"] == "auth"


def test_timestamp_within_five_minutes_is_accepted(api: Api) -> None:
    assert api.post(get_body(["s"]), timestamp=int(T0) - 300).json()["RetCode"] == 0
    assert api.post(get_body(["s"]), timestamp=int(T0) + 300).json()["RetCode"] == 0


def test_every_answer_carries_a_date_by_the_simulators_clock(api: Api, clock: FakeClock) -> None:
    """``receipts check`` measures a host's clock offset from the API's Date header: the
    simulator's must come from the clock it judges X-Timestamp by (injected here), or a test
    of a skewed clock would measure nothing."""
    clock.now = T0 + 0.75  # Date has a resolution of one second: the fraction is dropped
    accepted = api.post(get_body(["s"]))
    refused = api.post(get_body(["s"]), secret="not-the-secret")
    for response in (accepted, refused):
        assert response.headers["Date"] == "Tue, 14 Nov 2023 22:13:20 GMT"
        assert parsedate_to_datetime(response.headers["Date"]).timestamp() == T0


def test_missing_auth_headers_fail(api: Api) -> None:
    response = api.http.post(
        api.sim.url, json=get_body(["s"]), headers={"Content-Type": "application/json"}, timeout=5
    )
    assert response.json()["RetCode"] == 215398


def test_header_names_are_case_insensitive(api: Api) -> None:
    body = get_body(["s"])
    headers = {
        "content-type": "application/json",
        "x-access-key-id": KEY_ID,
        "x-timestamp": str(int(T0)),
        "x-nonce": new_nonce(),
        "x-signature": signature(body, SECRET),
    }
    response = api.http.post(api.sim.url, data=json.dumps(body), headers=headers, timeout=5)
    assert response.json()["RetCode"] == 0


def test_nonce_replay_is_refused_for_ten_minutes(api: Api, clock: FakeClock) -> None:
    nonce = "same-nonce"
    assert api.post(get_body(["s"]), nonce=nonce).json()["RetCode"] == 0
    assert api.post(get_body(["s"]), nonce=nonce).json()["RetCode"] == 215398
    clock.now += 599
    assert api.post(get_body(["s"]), nonce=nonce).json()["RetCode"] == 215398
    clock.now += 2
    assert api.post(get_body(["s"]), nonce=nonce).json()["RetCode"] == 0


def test_forged_request_does_not_burn_the_nonce(api: Api) -> None:
    assert api.post(get_body(["s"]), nonce="n1", sign="0" * 40).json()["RetCode"] == 215398
    assert api.post(get_body(["s"]), nonce="n1").json()["RetCode"] == 0


# --- parameters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "ret_code", "message"),
    [
        pytest.param(
            {"Action": "GetUSMSSendReceipt", "SessionNoSet": ["s"]},
            215397,
            "Missing parameter AccountId",
            id="no-account",
        ),
        pytest.param(
            {"Action": "GetUSMSSendReceipt", "AccountId": 7},
            215397,
            "Missing parameter SessionNoSet",
            id="no-session-set",
        ),
        *[
            pytest.param(
                {"Action": "GetUSMSSendReceipt", "AccountId": bad, "SessionNoSet": ["s"]},
                215392,
                "Invalid parameter AccountId",
                id=f"account-{bad!r}",
            )
            for bad in (0, -1, "7", 7.5, True)
        ],
        *[
            pytest.param(
                {"Action": "GetUSMSSendReceipt", "AccountId": 7, "SessionNoSet": bad},
                215392,
                "Invalid parameter SessionNoSet",
                id=f"session-set-{str(bad)[:12]}",
            )
            for bad in ("s", [], [""], [1], [["s"]], {"s": 1}, [f"s{i}" for i in range(101)])
        ],
        pytest.param(
            {"Action": "DeleteEverything", "AccountId": 7},
            215392,
            "Invalid parameter Action",
            id="unknown-action",
        ),
    ],
)
def test_invalid_parameters(api: Api, body: dict[str, Any], ret_code: int, message: str) -> None:
    payload = api.post(body).json()
    assert payload["RetCode"] == ret_code
    assert payload["Message"] == message
    assert payload["Action"] == f"{body['Action']}Response"
    assert api.sim.calls()[-1]["outcome"] == "invalid"


def test_one_hundred_session_nos_is_allowed(api: Api, sim: Simulator, clock: FakeClock) -> None:
    register(sim, "s42", "quick_success")
    clock.at_step(2)
    data = api.data([f"s{i}" for i in range(100)])
    assert list(data) == ["s42"]


@pytest.mark.parametrize(
    ("content_type", "raw"),
    [
        pytest.param("application/json", b"{not json", id="not-json"),
        pytest.param("application/json", b'["a list"]', id="not-an-object"),
        pytest.param("text/plain", None, id="wrong-content-type"),
    ],
)
def test_unparseable_requests_are_invalid(api: Api, content_type: str, raw: bytes | None) -> None:
    body = get_body(["s"])
    data = json.dumps(body).encode() if raw is None else raw
    headers = {
        "Content-Type": content_type,
        "X-Access-Key-Id": KEY_ID,
        "X-Timestamp": str(int(T0)),
        "X-Nonce": new_nonce(),
        "X-Signature": signature(body, SECRET),
    }
    response = api.http.post(api.sim.url, data=data, headers=headers, timeout=5)
    assert response.status_code == 200
    assert response.json()["RetCode"] == 215392
    assert api.sim.calls()[-1]["outcome"] == "invalid"


# --- scenarios ---------------------------------------------------------------------------------

S, U, F, SF, CN = "Success", "Unknow", "Fail", "SubmitFail", "发送成功"
CHECKPOINTS = (0.5, 1.5, 3.5, 4.5, 6.5, 1000)
# What each of the two phones shows at each checkpoint (in steps after sent_at); None: absent.
EXPECTED: dict[str, list[tuple[str | None, str | None]]] = {
    "quick_success": [(None, None), (S, S), (S, S), (S, S), (S, S), (S, S)],
    "slow_final": [(None, None), (U, U), (U, U), (S, S), (S, S), (S, S)],
    "late_failure": [(None, None), (U, U), (U, U), (U, U), (F, F), (F, F)],
    "unknow_forever": [(None, None), (U, U), (U, U), (U, U), (U, U), (U, U)],
    "never": [(None, None)] * 6,
    "submit_fail": [(None, None), (SF, SF), (SF, SF), (SF, SF), (SF, SF), (SF, SF)],
    "silent_phone": [(None, None), (S, None), (S, None), (S, None), (S, None), (S, None)],
    "respelled": [(None, None), (S, S), (S, S), (S, S), (S, S), (S, S)],
    "stale_unknow": [(None, None), (S, S), (U, U), (U, U), (U, U), (U, U)],
    "chinese": [(None, None), (CN, CN), (CN, CN), (CN, CN), (CN, CN), (CN, CN)],
}


def test_every_scenario_but_poison_has_an_expectation() -> None:
    assert set(EXPECTED) | {"poison"} == set(SCENARIOS)


@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_scenario_timeline(api: Api, sim: Simulator, clock: FakeClock, scenario: str) -> None:
    register(sim, "s1", scenario, user_id="order-9")
    for at, expected in zip(CHECKPOINTS, EXPECTED[scenario], strict=True):
        clock.at_step(at)
        data = api.data(["s1"])
        by_digits = {phone_key(r["Phone"]): r for r in data.get("s1", [])}
        shown = tuple(
            by_digits[phone_key(p)]["ReceiptResult"] if phone_key(p) in by_digits else None
            for p in PHONES
        )
        assert shown == expected, f"{scenario} at step {at}"
        if expected == (None, None):
            assert "s1" not in data  # no visible receipt: no entry at all
        for receipt in by_digits.values():
            assert receipt["CostCount"] == 1
            assert receipt["UserId"] == "order-9"
            assert receipt["AccountId"] == ACCOUNT
            assert isinstance(receipt["ReceiptTime"], int)
            assert receipt["ReceiptTime"] <= clock.now


def test_receipt_fields_and_times(clock: FakeClock) -> None:
    sent_at = T0 + 0.5
    with (
        Simulator(access_key_id=KEY_ID, access_key_secret=SECRET, step=10, clock=clock) as sim,
        requests.Session() as http,
    ):
        api = Api(sim, clock, http)
        sim.register(
            [{"account_id": 1, "session_no": "s", "phones": ["(852)55311111"],
              "scenario": "slow_final", "sent_at": sent_at}]
        )  # fmt: skip
        clock.now = sent_at + 15
        (unknow,) = api.data(["s"], account_id=1)["s"]
        clock.now = sent_at + 45
        (success,) = api.data(["s"], account_id=1)["s"]
    assert unknow["ReceiptTime"] == math.floor(sent_at + 10)
    assert success == {
        "Phone": "(852)55311111",
        "CostCount": 1,
        "ReceiptResult": "Success",
        "ReceiptCode": "DELIVRD",
        "ReceiptDesc": success["ReceiptDesc"],
        "ReceiptTime": math.floor(sent_at + 40),
        "UserId": "",
        "AccountId": 1,
        "CountryCode": "852",
        "BrevityCode": "HK",
    }


def test_late_failure_is_undeliv(api: Api, sim: Simulator, clock: FakeClock) -> None:
    register(sim, "s", "late_failure")
    clock.at_step(7)
    assert {r["ReceiptCode"] for r in api.data(["s"])["s"]} == {"UNDELIV"}


@pytest.mark.parametrize("step", [0.2, 10.0])
def test_stale_unknow_is_older_than_the_success(clock: FakeClock, step: float) -> None:
    with (
        Simulator(access_key_id=KEY_ID, access_key_secret=SECRET, step=step, clock=clock) as sim,
        requests.Session() as http,
    ):
        api = Api(sim, clock, http)
        sim.register(
            [{"account_id": 1, "session_no": "s", "phones": ["1"], "scenario": "stale_unknow",
              "sent_at": T0}]
        )  # fmt: skip
        clock.now = T0 + 2 * step
        (success,) = api.data(["s"], account_id=1)["s"]
        clock.now = T0 + 3 * step
        (stale,) = api.data(["s"], account_id=1)["s"]
    assert success["ReceiptResult"] == "Success"
    assert success["ReceiptTime"] == math.floor(T0 + step)
    assert stale["ReceiptResult"] == "Unknow"
    assert stale["ReceiptTime"] < success["ReceiptTime"]
    assert stale["ReceiptTime"] <= T0


@pytest.mark.parametrize(
    ("registered", "expected"),
    [
        ("(852)55311111", "+852 5531 1111"),
        ("8613800000000", "(86)13800000000"),
        ("+852 5531 1111", "(852)55311111"),
        ("0085255311111", "(852)55311111"),
        ("14155550100", "(1)4155550100"),
    ],
)
def test_respelled_keeps_the_digits(
    api: Api, sim: Simulator, clock: FakeClock, registered: str, expected: str
) -> None:
    register(sim, "s", "respelled", phones=[registered])
    clock.at_step(2)
    (receipt,) = api.data(["s"])["s"]
    assert receipt["Phone"] == expected
    assert receipt["Phone"] != registered
    assert phone_key(receipt["Phone"]) == phone_key(registered)


def test_silent_phone_with_one_phone_never_reports(
    api: Api, sim: Simulator, clock: FakeClock
) -> None:
    register(sim, "s", "silent_phone", phones=["(852)55311111"])
    clock.at_step(100)
    assert api.data(["s"]) == {}


def test_sessions_default_to_sent_now(api: Api, sim: Simulator, clock: FakeClock) -> None:
    clock.now = T0 + 50
    sim.register([{"account_id": ACCOUNT, "session_no": "s", "scenario": "quick_success",
                   "phones": ["1"]}])  # fmt: skip
    assert api.data(["s"]) == {}
    clock.now += 1.5 * STEP
    assert list(api.data(["s"])) == ["s"]
    assert sim.truth()["sessions"]["s"]["sent_at"] == T0 + 50


def test_unknown_and_foreign_sessions_are_absent(
    api: Api, sim: Simulator, clock: FakeClock
) -> None:
    register(sim, "mine", "quick_success")
    register(sim, "theirs", "quick_success", account_id=ACCOUNT + 1)
    clock.at_step(2)
    assert list(api.data(["mine", "theirs", "unknown"])) == ["mine"]
    assert list(api.data(["mine", "theirs"], account_id=ACCOUNT + 1)) == ["theirs"]


def test_duplicate_session_nos_are_answered_once(
    api: Api, sim: Simulator, clock: FakeClock
) -> None:
    register(sim, "s", "quick_success")
    clock.at_step(2)
    assert [e["SessionNo"] for e in api.receipts(["s", "s"])["Data"]] == ["s"]


def test_reregistering_replaces(api: Api, sim: Simulator, clock: FakeClock) -> None:
    register(sim, "s", "quick_success")
    register(sim, "s", "never")
    clock.at_step(2)
    assert api.data(["s"]) == {}
    assert sim.truth()["sessions"]["s"]["scenario"] == "never"


def test_poison_refuses_the_whole_call(api: Api, sim: Simulator, clock: FakeClock) -> None:
    register(sim, "good", "quick_success")
    register(sim, "bad", "poison")
    clock.at_step(2)
    payload = api.receipts(["good", "bad"])
    assert payload == {
        "RetCode": 215392,
        "Message": "Invalid parameter SessionNoSet",
        "Action": "GetUSMSSendReceiptResponse",
    }
    assert sim.calls()[-1]["outcome"] == "poison"
    assert list(api.data(["good"])) == ["good"]


# --- SendBatchUSMSMessage ----------------------------------------------------------------------


def send_body(template: str, targets: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "Action": "SendBatchUSMSMessage",
        "AccountId": ACCOUNT,
        "TaskContent": [{"TemplateId": template, "SenderId": "ACME", "Target": targets}],
    }


def test_send_batch_creates_a_session(api: Api, sim: Simulator, clock: FakeClock) -> None:
    targets = [
        {"Phone": "(852)55311111", "TemplateParams": ["1234"], "UserId": "u1"},
        {"Phone": "(852)55311112", "TemplateParams": ["5678"]},
    ]
    payload = api.post(send_body("slow_final", targets)).json()
    assert payload["RetCode"] == 0
    assert payload["Action"] == "SendBatchUSMSMessageResponse"
    assert payload["FailContent"] == []
    session_no = payload["SessionNo"]
    assert re.fullmatch(r"[A-Za-z0-9]{16}", session_no)
    truth = sim.truth()["sessions"][session_no]
    assert truth["scenario"] == "slow_final"
    assert truth["sent_at"] == T0
    assert truth["account_id"] == ACCOUNT
    assert set(truth["phones"]) == {"(852)55311111", "(852)55311112"}
    assert sim.calls()[-1]["session_nos"] == [session_no]

    clock.at_step(5)
    receipts = api.data([session_no])[session_no]
    assert {(r["Phone"], r["UserId"], r["ReceiptResult"]) for r in receipts} == {
        ("(852)55311111", "u1", "Success"),
        ("(852)55311112", "", "Success"),
    }


def test_send_batch_with_other_template_draws_a_harmless_scenario(api: Api, sim: Simulator) -> None:
    target = [{"Phone": "(852)55311111", "TemplateParams": []}]
    session_nos = [api.post(send_body("tmpl-42", target)).json()["SessionNo"] for _ in range(30)]
    scenarios = {sim.truth()["sessions"][s]["scenario"] for s in session_nos}
    assert "poison" not in scenarios
    assert len(scenarios) > 3
    assert scenarios <= set(SCENARIOS)


@pytest.mark.parametrize(
    ("tasks", "ret_code"),
    [
        (None, 215397),
        ([], 215392),
        ([{"TemplateId": "t"}], 215392),
        ([{"TemplateId": "t", "Target": []}], 215392),
        ([{"TemplateId": "t", "Target": [{"UserId": "u"}]}], 215392),
    ],
)
def test_send_batch_validates(api: Api, tasks: Any, ret_code: int) -> None:
    body: dict[str, Any] = {"Action": "SendBatchUSMSMessage", "AccountId": ACCOUNT}
    if tasks is not None:
        body["TaskContent"] = tasks
    assert api.post(body).json()["RetCode"] == ret_code


# --- faults ------------------------------------------------------------------------------------


@pytest.fixture
def visible(api: Api, sim: Simulator, clock: FakeClock) -> Api:
    """A session with receipts visible now, for faults that corrupt them."""
    register(sim, "s", "quick_success")
    clock.at_step(2)
    return api


def test_fault_http_500(visible: Api) -> None:
    visible.sim.set_faults(http_500=1.0)
    response = visible.post(get_body(["s"]))
    assert response.status_code == 500
    assert response.headers["Content-Type"].startswith("text/html")
    assert "500" in response.text
    assert "X-Speedo-Request-Uuid" in response.headers
    assert_logged(visible.sim, "http_500", None, 500)


def test_fault_http_429(visible: Api) -> None:
    visible.sim.set_faults(http_429=1.0)
    response = visible.post(get_body(["s"]))
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    assert_logged(visible.sim, "http_429", None, 429)


@pytest.mark.parametrize(
    ("fault", "ret_code", "message"),
    [("retcode_server", 215400, "server error"), ("retcode_unknown", 299999, "something new")],
)
def test_fault_retcodes(visible: Api, fault: str, ret_code: int, message: str) -> None:
    visible.sim.set_faults(**{fault: 1.0})
    response = visible.post(get_body(["s"]))
    assert response.status_code == 200
    assert response.json() == {
        "RetCode": ret_code,
        "Message": message,
        "Action": "GetUSMSSendReceiptResponse",
    }
    assert_logged(visible.sim, fault, ret_code, 200)


def test_fault_truncated(visible: Api) -> None:
    visible.sim.set_faults(truncated=1.0)
    response = visible.post(get_body(["s"]))
    assert response.status_code == 200
    assert response.text.startswith('{"RetCode":0')
    with pytest.raises(ValueError, match=r".*"):
        response.json()
    assert_logged(visible.sim, "truncated", 0, 200)


def test_fault_wrong_types_varies(visible: Api) -> None:
    visible.sim.set_faults(wrong_types=1.0)
    kinds = set()
    for _ in range(40):
        payload = visible.receipts(["s"])
        assert payload["RetCode"] == 0
        data = payload["Data"]
        if isinstance(data, dict):
            kinds.add("data_dict")
            continue
        receipts = [r for entry in data for r in entry["ReceiptSet"]]
        if any(r.get("ReceiptTime") == "abc" for r in receipts):
            kinds.add("receipt_time")
        elif any(r.get("CostCount") == "x" for r in receipts):
            kinds.add("cost_count")
        elif any("Phone" not in r for r in receipts):
            kinds.add("missing_phone")
        else:
            pytest.fail(f"nothing wrong in {payload}")
    assert kinds == {"data_dict", "receipt_time", "cost_count", "missing_phone"}
    assert_logged(visible.sim, "wrong_types", 0, 200)
    # The stored receipt was not corrupted for later calls.
    visible.sim.set_faults()
    (receipt,) = visible.data(["s"])["s"][:1]
    assert isinstance(receipt["ReceiptTime"], int)
    assert receipt["CostCount"] == 1


def test_fault_wrong_types_without_receipts_sends_a_dict(api: Api) -> None:
    api.sim.set_faults(wrong_types=1.0)
    assert api.receipts(["unknown"])["Data"] == {}


def test_fault_extra_sessions(visible: Api) -> None:
    visible.sim.set_faults(extra_sessions=1.0)
    data = visible.data(["s"])
    assert "s" in data
    assert len(data) == 2
    (extra,) = set(data) - {"s"}
    assert data[extra][0]["ReceiptResult"] == "Success"
    assert_logged(visible.sim, "extra_sessions", 0, 200)


def test_fault_string_receipt_time(visible: Api) -> None:
    visible.sim.set_faults(string_receipt_time=1.0)
    receipts = visible.data(["s"])["s"]
    assert {r["ReceiptTime"] for r in receipts} == {str(math.floor(T0 + STEP))}
    assert_logged(visible.sim, "string_receipt_time", 0, 200)


def test_fault_slow(visible: Api) -> None:
    visible.sim.set_faults(slow=1.0, slow_seconds=0.1)
    started = time.monotonic()
    assert list(visible.data(["s"])) == ["s"]
    assert time.monotonic() - started >= 0.1
    assert_logged(visible.sim, "slow", 0, 200)


def test_faults_do_not_corrupt_errors(visible: Api) -> None:
    visible.sim.set_faults(extra_sessions=1.0)
    assert visible.post(get_body(["s"]), sign="0" * 40).json()["RetCode"] == 215398
    assert visible.sim.calls()[-1]["outcome"] == "auth"


def test_faults_are_drawn_per_call(visible: Api) -> None:
    visible.sim.set_faults(http_500=0.5)
    statuses = [visible.post(get_body(["s"])).status_code for _ in range(40)]
    assert 5 < statuses.count(500) < 35
    assert set(statuses) == {200, 500}


def test_empty_faults_clear(visible: Api) -> None:
    response = visible.control("POST", "/_sim/faults", {"http_500": 1.0})
    assert response.json() == {"faults": {"http_500": 1.0}}
    assert visible.post(get_body(["s"])).status_code == 500
    assert visible.control("POST", "/_sim/faults", {}).status_code == 200
    assert visible.post(get_body(["s"])).status_code == 200


@pytest.mark.parametrize(
    "faults",
    [
        {"http_501": 0.1},
        {"http_500": 1.5},
        {"http_500": -0.1},
        {"http_500": "often"},
        {"http_500": 0.6, "http_429": 0.6},
        {"slow_seconds": -1},
    ],
)
def test_bad_faults_are_refused(api: Api, faults: dict[str, Any]) -> None:
    response = api.control("POST", "/_sim/faults", faults)
    assert response.status_code == 400
    assert response.json()["error"]
    with pytest.raises(ValueError, match=r".+"):
        api.sim.set_faults(**faults)


def assert_logged(sim: Simulator, outcome: str, ret_code: int | None, status: int) -> None:
    call = sim.calls()[-1]
    assert call["outcome"] == outcome
    assert call["ret_code"] == ret_code
    assert call["http_status"] == status


# --- control endpoints -------------------------------------------------------------------------


def test_calls_log_every_api_request_in_order(api: Api, sim: Simulator, clock: FakeClock) -> None:
    api.receipts(["a", "b"])
    clock.now += 1
    api.post(get_body(["c"]), sign="0" * 40)
    calls = api.control("GET", "/_sim/calls").json()["calls"]
    assert calls == [
        {
            "t": T0,
            "action": "GetUSMSSendReceipt",
            "account_id": ACCOUNT,
            "session_nos": ["a", "b"],
            "outcome": "ok",
            "ret_code": 0,
            "http_status": 200,
        },
        {
            "t": T0 + 1,
            "action": "GetUSMSSendReceipt",
            "account_id": ACCOUNT,
            "session_nos": ["c"],
            "outcome": "auth",
            "ret_code": 215398,
            "http_status": 200,
        },
    ]
    assert sim.calls() == calls


def test_register_over_http_and_truth(api: Api, sim: Simulator) -> None:
    sessions = [
        {"account_id": ACCOUNT, "session_no": f"s-{scenario}", "phones": ["1", "2"],
         "scenario": scenario, "sent_at": T0}
        for scenario in SCENARIOS
    ]  # fmt: skip
    response = api.control("POST", "/_sim/sessions", {"sessions": sessions})
    assert response.json() == {"registered": len(SCENARIOS)}
    truth = api.control("GET", "/_sim/truth").json()["sessions"]
    assert truth == sim.truth()["sessions"]

    def phone(scenario: str, number: str = "1") -> dict[str, Any]:
        entry = truth[f"s-{scenario}"]
        assert entry["account_id"] == ACCOUNT
        assert entry["scenario"] == scenario
        assert entry["sent_at"] == T0
        result: dict[str, Any] = entry["phones"][number]
        return result

    def final(result: str | None, after: Any, last: str | None) -> dict[str, Any]:
        return {"final_result": result, "final_after": after, "last_result": last}

    assert phone("quick_success") == final("Success", pytest.approx(STEP), None)
    assert phone("slow_final") == final("Success", pytest.approx(4 * STEP), "Unknow")
    assert phone("late_failure") == final("Fail", pytest.approx(6 * STEP), "Unknow")
    assert phone("unknow_forever") == final(None, None, "Unknow")
    assert phone("never") == final(None, None, None)
    assert phone("submit_fail") == final("SubmitFail", pytest.approx(STEP), None)
    assert phone("silent_phone", "1") == final("Success", pytest.approx(STEP), None)
    assert phone("silent_phone", "2") == final(None, None, None)
    assert phone("respelled") == final("Success", pytest.approx(STEP), None)
    assert phone("stale_unknow") == final("Success", pytest.approx(STEP), "Unknow")
    assert phone("chinese") == final("Success", pytest.approx(STEP), None)
    assert phone("poison") == final(None, None, None)


def test_unknown_scenario_is_refused_by_name(api: Api, sim: Simulator) -> None:
    sessions = [
        {"account_id": 1, "session_no": "ok", "phones": [], "scenario": "never"},
        {"account_id": 1, "session_no": "bad", "phones": [], "scenario": "teleport"},
    ]
    response = api.control("POST", "/_sim/sessions", {"sessions": sessions})
    assert response.status_code == 400
    assert "teleport" in response.json()["error"]
    assert sim.truth() == {"sessions": {}}  # all or nothing


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"sessions": "s"},
        {"sessions": ["s"]},
        {"sessions": [{"account_id": 0, "session_no": "s", "scenario": "never"}]},
        {"sessions": [{"account_id": 1, "session_no": "", "scenario": "never"}]},
        {"sessions": [{"account_id": 1, "session_no": "s", "scenario": "never", "phones": "1"}]},
        {"sessions": [{"account_id": 1, "session_no": "s", "scenario": "never", "sent_at": "x"}]},
        {"sessions": [{"account_id": 1, "session_no": "s", "scenario": "never", "user_id": 5}]},
        [],
    ],
)
def test_bad_registrations_are_refused(api: Api, body: Any) -> None:
    response = api.control("POST", "/_sim/sessions", body)
    assert response.status_code == 400
    assert response.json()["error"]


def test_control_body_must_be_json(api: Api) -> None:
    response = api.http.post(f"{api.base}/_sim/sessions", data=b"{oops", timeout=5)
    assert response.status_code == 400


def test_unknown_paths_and_methods(api: Api) -> None:
    response = api.control("GET", "/nowhere")
    assert response.status_code == 404
    assert response.json()["error"]
    assert api.control("POST", "/_sim/unknown", {}).status_code == 404
    assert api.control("GET", "/_sim/sessions").status_code == 405
    assert api.control("POST", "/_sim/calls", {}).status_code == 405
    assert api.http.get(api.sim.url, timeout=5).status_code == 405


def test_reset_clears_sessions_calls_and_faults(api: Api, sim: Simulator) -> None:
    register(sim, "s", "quick_success")
    sim.set_faults(http_500=1.0)
    api.post(get_body(["s"]))
    assert api.control("POST", "/_sim/reset").json() == {"reset": True}
    assert sim.truth() == {"sessions": {}}
    assert sim.calls() == []
    assert api.post(get_body(["s"])).status_code == 200


def test_direct_register_validates(sim: Simulator) -> None:
    with pytest.raises(ValueError, match="teleport"):
        sim.register([{"account_id": 1, "session_no": "s", "scenario": "teleport"}])


# --- concurrency -------------------------------------------------------------------------------


def test_concurrent_calls_are_all_answered_and_logged(sim: Simulator, clock: FakeClock) -> None:
    sim.register(
        [{"account_id": ACCOUNT, "session_no": f"s{i}", "phones": ["1"],
          "scenario": "quick_success", "sent_at": T0} for i in range(100)]
    )  # fmt: skip
    clock.at_step(2)
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with requests.Session() as http:
                api = Api(sim, clock, http)
                for _ in range(20):
                    assert len(api.data([f"s{i}" for i in range(100)])) == 100
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(sim.calls()) == 120
