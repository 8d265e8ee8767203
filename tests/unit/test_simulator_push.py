"""The simulator pushes as Uspeedo's Callback API does: batches of reports to a callback URL,
phones as digits, ``UNKNOWN``, no AccountId, retried every second three times then dropped for
good, a share of reports lost, an on/off switch. Driven by an injected clock and transport,
then once over real HTTP on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from tests.support.cli import invoke
from tests.support.processes import wait_for
from worker.push import parse_push
from worker.simulator import Simulator
from worker.simulator.pusher import RETRIES, Pusher, push_body
from worker.simulator.scenarios import build_session

T0 = 1_700_000_000.0
STEP = 1.0
URL = "http://127.0.0.1:9/uspeedo/callback/token"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Receiver:
    """A transport that records every push body and answers as told (True: ``code`` 0)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.up = True

    def __call__(self, url: str, body: bytes) -> bool:
        assert url == URL
        self.bodies.append(json.loads(body))
        return self.up

    @property
    def reports(self) -> list[dict[str, Any]]:
        return [item for body in self.bodies for item in body["Data"]]


def session(session_no: str, scenario: str, phones: list[str], account_id: int = 3) -> Any:
    return build_session(
        account_id=account_id,
        session_no=session_no,
        scenario=scenario,
        sent_at=T0,
        phones=[(phone, "user-1") for phone in phones],
        step=STEP,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def receiver() -> Receiver:
    return Receiver()


@pytest.fixture
def pusher(clock: Clock, receiver: Receiver) -> Pusher:
    pusher = Pusher(clock=clock, seed=1, post=receiver)
    pusher.configure(url=URL, enabled=True)
    return pusher


def test_reports_are_pushed_when_they_show_as_uspeedo_spells_them(
    pusher: Pusher, clock: Clock, receiver: Receiver
) -> None:
    pusher.add(session("S1", "slow_final", ["(852)55311111", "+86 138 0000 0000"]))
    pusher.add(session("S2", "chinese", ["(852)55312222"]))
    pusher.add(session("S3", "submit_fail", ["(852)55313333"]))
    assert pusher.run_due() == 0 and receiver.bodies == []
    clock.now = T0 + STEP
    assert pusher.run_due() == 1  # everything due at once goes in one batch
    (body,) = receiver.bodies
    assert set(body) == {"MsgType", "Data"} and body["MsgType"] == 2
    first = body["Data"][0]
    assert first == {
        "SessionNo": "S1",
        "Phone": "85255311111",  # digits: no +, no parentheses
        "CostCount": 1,
        "ReceiptTime": int(T0 + STEP),
        "ReceiptResult": "UNKNOWN",
        "ReceiptCode": "UNKNOWN",
        "ReceiptDesc": "Status not yet reported",
        "UserId": "user-1",
    }
    assert "AccountId" not in json.dumps(body)
    results = {(r["SessionNo"], r["Phone"]): r["ReceiptResult"] for r in body["Data"]}
    assert results == {
        ("S1", "85255311111"): "UNKNOWN",
        ("S1", "8613800000000"): "UNKNOWN",
        ("S2", "85255312222"): "Success",  # English, whatever the poll's answer says
        ("S3", "85255313333"): "Fail",  # a submit failure, told apart by its ReceiptCode
    }
    clock.now = T0 + 4 * STEP
    pusher.run_due()
    assert {r["ReceiptResult"] for r in receiver.bodies[1]["Data"]} == {"Success"}
    clock.now = T0 + 100 * STEP
    assert pusher.run_due() == 0 and pusher.next_due() is None
    fates = pusher.fates()
    assert len(fates) == 6 and {f["fate"] for f in fates} == {"delivered"}
    assert all(f["attempts"] == 1 and f["t"] <= f["answered"] for f in fates)


def test_what_the_simulator_pushes_is_a_push_the_receiver_parses(
    pusher: Pusher, clock: Clock, receiver: Receiver
) -> None:
    from datetime import UTC, datetime

    for scenario in ("quick_success", "submit_fail", "respelled", "stale_unknow", "chinese"):
        pusher.add(session(f"S-{scenario}", scenario, ["(852)55311111", "8613800000000"]))
    clock.now = T0 + 10 * STEP
    pusher.run_due()
    for body in receiver.bodies:
        raw = push_body(body["Data"])
        batch = parse_push(json.loads(raw), received_at=datetime.fromtimestamp(clock.now, UTC))
        assert batch.skipped == () and len(batch.receipts) == len(body["Data"])


def test_batches_are_cut_at_the_configured_size(
    pusher: Pusher, clock: Clock, receiver: Receiver
) -> None:
    pusher.configure(batch=3)
    for i in range(4):
        pusher.add(session(f"S{i}", "quick_success", ["(852)55311111", "(852)55312222"]))
    clock.now = T0 + STEP
    assert pusher.run_due() == 3
    assert [len(body["Data"]) for body in receiver.bodies] == [3, 3, 2]


def test_a_failed_push_is_retried_every_second_three_times_then_dropped_for_good(
    pusher: Pusher, clock: Clock, receiver: Receiver
) -> None:
    pusher.add(session("S1", "quick_success", ["(852)55311111"]))
    receiver.up = False
    clock.now = T0 + STEP
    pusher.run_due()
    for retry in range(1, RETRIES + 1):
        clock.now = T0 + STEP + retry - 0.01
        assert pusher.run_due() == 0, "not before a second has passed"
        clock.now = T0 + STEP + retry
        assert pusher.run_due() == 1
    assert len(receiver.bodies) == 1 + RETRIES
    assert pusher.next_due() is None  # nothing waits: dropped for good
    ((fate),) = pusher.fates()
    assert (fate["fate"], fate["attempts"]) == ("dropped", 4)
    receiver.up = True
    clock.now += 100
    assert pusher.run_due() == 0


def test_a_retry_that_gets_through_delivers(
    pusher: Pusher, clock: Clock, receiver: Receiver
) -> None:
    pusher.add(session("S1", "quick_success", ["(852)55311111"]))
    receiver.up = False
    clock.now = T0 + STEP
    pusher.run_due()
    receiver.up = True
    clock.now += 2  # both retries due by now: the first one delivers
    pusher.run_due()
    ((fate),) = pusher.fates()
    assert (fate["fate"], fate["attempts"]) == ("delivered", 2)


def test_a_share_of_reports_is_lost_before_it_is_sent(
    pusher: Pusher, clock: Clock, receiver: Receiver
) -> None:
    pusher.configure(loss=0.2)
    for i in range(500):
        pusher.add(session(f"S{i:03d}", "quick_success", ["(852)55311111", "(852)55312222"]))
    clock.now = T0 + STEP
    pusher.run_due()
    fates = pusher.fates()
    lost = {(f["session_no"], f["phone"]) for f in fates if f["fate"] == "lost"}
    delivered = {(f["session_no"], f["phone"]) for f in fates if f["fate"] == "delivered"}
    assert 150 < len(lost) < 250  # about 20% of 1,000
    assert {(r["SessionNo"], r["Phone"]) for r in receiver.reports} == delivered
    assert not lost & delivered and len(lost | delivered) == 1000


def test_the_switch_turns_pushing_off_and_on(
    pusher: Pusher, clock: Clock, receiver: Receiver
) -> None:
    pusher.add(session("ON", "slow_final", ["(852)55311111"]))
    pusher.configure(enabled=False)
    pusher.add(session("OFF", "quick_success", ["(852)55312222"]))  # never scheduled
    clock.now = T0 + STEP
    pusher.run_due()  # ON's first report is due while off: not pushed, ever
    pusher.configure(enabled=True)
    clock.now = T0 + 4 * STEP
    pusher.run_due()
    assert [(r["SessionNo"], r["ReceiptResult"]) for r in receiver.reports] == [("ON", "Success")]
    assert [f["fate"] for f in pusher.fates()] == ["off", "delivered"]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"loss": 1.5}, "within"),
        ({"loss": "0.2"}, "within"),
        ({"batch": 0}, "batch"),
        ({"batch": True}, "batch"),
        ({"enabled": "yes"}, "true or false"),
        ({"url": "ftp://x/y"}, "http"),
        ({"speed": 1}, "unknown push setting"),
        ({"url": None}, "needs a url"),
    ],
)
def test_bad_push_settings_are_refused_by_name(
    pusher: Pusher, changes: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        pusher.configure(**changes)
    assert pusher.config().url == URL


# --- over HTTP --------------------------------------------------------------------------------


class _Callback(BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]]
    answers: list[tuple[int, bytes]]

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.bodies.append(
            {
                "path": self.path,
                "type": self.headers["Content-Type"],
                "body": json.loads(self.rfile.read(length)),
            }
        )
        status, answer = self.answers.pop(0) if self.answers else (200, b'{"code":0}')
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def callback() -> Iterator[tuple[str, type[_Callback]]]:
    handler = type("Handler", (_Callback,), {"bodies": [], "answers": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/uspeedo/callback/tok", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_the_running_simulator_pushes_over_http_and_is_switched_by_its_control_api(
    callback: tuple[str, type[_Callback]],
) -> None:
    url, handler = callback
    # Not ok (a 200 without code 0, then a 503): retried a second later each time.
    handler.answers += [(200, b'{"code": 1, "message": "no"}'), (503, b"{}")]
    with Simulator(step=0.05, seed=1) as sim, requests.Session() as http:
        base = sim.url.removesuffix("/api")
        answer = http.post(f"{base}/_sim/push", json={"url": url, "enabled": True}, timeout=5)
        assert answer.json() == {"push": {"url": url, "enabled": True, "loss": 0.0, "batch": 100}}
        bad = http.post(f"{base}/_sim/push", json={"loss": 2}, timeout=5)
        assert bad.status_code == 400 and "loss" in bad.json()["error"]
        sim.register(
            [{"account_id": 1, "session_no": "S", "phones": ["(852)55311111"],
              "scenario": "quick_success"}]
        )  # fmt: skip
        wait_for(lambda: bool(sim.pushes()), timeout=10, interval=0.05)
        pushes = http.get(f"{base}/_sim/pushes", timeout=5).json()
        assert [(r["fate"], r["attempts"]) for r in pushes["reports"]] == [("delivered", 3)]
        assert pushes["push"]["enabled"] is True
        http.post(f"{base}/_sim/push", json={"enabled": False}, timeout=5)
        assert sim.configure_push()["enabled"] is False
        http.post(f"{base}/_sim/reset", json={}, timeout=5)
        assert sim.pushes() == []
    assert len(handler.bodies) == 3
    assert {b["path"] for b in handler.bodies} == {"/uspeedo/callback/tok"}
    assert handler.bodies[0]["type"].startswith("application/json")
    assert handler.bodies[0]["body"]["Data"][0]["Phone"] == "85255311111"


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--push-url", "ftp://127.0.0.1/x"], "http:// or https://"),
        (["--push-url", "http://127.0.0.1:9/x", "--push-loss", "1.5"], "--push-loss"),
        (["--push-url", "http://127.0.0.1:9/x", "--push-batch", "0"], "--push-batch"),
    ],
)
def test_receipts_simulate_refuses_bad_push_options_in_one_line(
    args: list[str], problem: str
) -> None:
    result = invoke("simulate", "--port", "0", *args)
    assert result.exit_code == 2
    assert problem in result.output and "Traceback" not in result.output
