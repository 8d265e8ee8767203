"""``receipts receiver`` over real HTTP (uvicorn on loopback), on PostgreSQL and SQLite: the
documented answer to every kind of push, hostile ones included, and the token in no log line."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from tests.support.databases import Configure
from tests.support.factories import stored_receipts, stored_sessions, track
from tests.support.processes import wait_for
from tests.support.push_receiver import TOKEN, Running, report, running_receiver
from tests.support.servers import free_port
from worker import db
from worker.config import load_settings
from worker.errors import SettingsError
from worker.models import push_counts_table
from worker.receiver import create_app

P1 = "(852)55311111"


@pytest.fixture
def receiver(database: str, configure: Configure) -> Iterator[Running]:
    with running_receiver(database, configure) as running:
        yield running


def _counts() -> dict[tuple[str, str], float]:
    with db.session_scope() as session:
        rows = session.execute(sa.select(push_counts_table))
        return {(r.metric, r.label): r.value for r in rows}


OK = {"code": 0, "message": "ok"}


def test_a_push_is_answered_ok_once_committed_and_counted(receiver: Running) -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1]}, now=datetime.now(UTC))
    answer = receiver.post({"MsgType": 2, "Data": [report("S", "85255311111", "Success")]})
    assert (answer.status_code, answer.json()) == (200, OK)
    assert stored_sessions()["S"]["state"] == "resolved"
    assert stored_receipts()[("S", P1)]["source"] == "push"
    receiver.flush()
    counts = _counts()
    assert counts[("requests", "ok")] == 1 and counts[("receipts", "stored")] == 1
    assert counts[("latency_bucket", "+Inf")] == 1 and counts[("latency_count", "")] == 1
    assert abs(counts[("last_push", "")] - time.time()) < 30


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"MsgType": 2, "Data": [{"SessionNo": "S"', 400),  # truncated
        (b"[1, 2]", 400),
        (b'"a string"', 400),
        (b'{"Data": []}', 400),  # no MsgType
        (b'{"MsgType": "2", "Data": []}', 400),
        (b'{"MsgType": 2, "Data": {"S": []}}', 400),
        (b"\xff\xfe not utf-8", 400),
        (b'{"MsgType": 0, "Data": [{"Phone": "85255311111", "ReplyContent": "hi"}]}', 200),
        (b'{"MsgType": 7}', 200),
    ],
)
def test_a_body_that_is_not_a_push_gets_400_and_other_message_types_are_ignored(
    receiver: Running, body: bytes, status: int
) -> None:
    answer = receiver.post(body)
    assert answer.status_code == status, answer.text
    assert answer.json()["code"] == (0 if status == 200 else status)
    assert stored_receipts() == {}
    receiver.flush()
    outcome = "ignored" if status == 200 else "bad_request"
    assert _counts()[("requests", outcome)] == 1


def test_a_wrong_token_or_any_other_path_is_404(receiver: Running) -> None:
    body = json.dumps({"MsgType": 2, "Data": []}).encode()
    for url, method in (
        (receiver.url("tok-0123456789abcdefABCDEX"), "POST"),  # one character off
        (receiver.url(TOKEN[:-1]), "POST"),
        (receiver.url(TOKEN + "x"), "POST"),
        (receiver.url(TOKEN), "GET"),
        (f"{receiver.base}/uspeedo/callback/", "POST"),
        (f"{receiver.base}/uspeedo/callback/{TOKEN}/more", "POST"),
        (f"{receiver.base}/", "GET"),
        (f"{receiver.base}/metrics", "GET"),
    ):
        answer = requests.request(method, url, data=body, timeout=10)
        assert answer.status_code == 404, (url, method)
        assert answer.json() == {"code": 404, "message": "not found"}


def test_a_body_past_the_limit_is_413_and_stores_nothing(receiver: Running) -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1]}, now=datetime.now(UTC))
    big = {"MsgType": 2, "Data": [report("S", "85255311111", "Success", ReceiptDesc="x" * 500)]}
    big["Data"] *= 10_000  # about 6 MB
    assert receiver.post(big).status_code == 413
    # Without a Content-Length (chunked), refused as soon as the stream passes the limit.
    chunks = (b"x" * 65536 for _ in range(200))  # 13 MB
    answer = requests.post(receiver.url(), data=chunks, timeout=30)
    assert answer.status_code == 413
    assert stored_receipts() == {}


def test_ten_thousand_small_items_are_stored_and_malformed_ones_skipped(receiver: Running) -> None:
    now = datetime.now(UTC)
    track(*({"account_id": 1, "session_no": f"S{i:05d}"} for i in range(2000)), now=now)
    items: list[Any] = [
        {"SessionNo": f"S{i % 2000:05d}", "Phone": f"852{i:08d}", "ReceiptResult": "UNKNOWN"}
        for i in range(10_000)
    ]
    items[3] = {"SessionNo": "S00003", "Phone": "85200000003", "ReceiptResult": "Maybe"}
    items[4] = "not an object"
    items[5] = {"SessionNo": "S00005", "Phone": "no digits", "ReceiptResult": "Success"}
    items[6] = {
        "SessionNo": "S00006",
        "Phone": "85200000006",
        "ReceiptResult": "Success",
        "ReceiptTime": "1700000000",  # a number as a string
        "CostCount": "2",
        "ReceiptDesc": "nul\x00 and \ud800 lone surrogate",
    }
    body = json.dumps({"MsgType": 2, "Data": items}).encode()
    assert len(body) < 1024 * 1024, "under the default limit"
    answer = receiver.post(body)
    assert (answer.status_code, answer.json()) == (200, OK)
    stored = stored_receipts()
    assert len(stored) == 10_000 - 3
    six = stored[("S00006", "85200000006")]
    assert (six["result"], six["cost_count"]) == ("Success", 2)
    assert six["receipt_desc"] == "nul\ufffd and \ufffd lone surrogate"
    receiver.flush()
    assert _counts()[("receipts", "skipped")] == 3


def test_the_account_named_in_the_url_restricts_the_match(receiver: Running) -> None:
    now = datetime.now(UTC)
    track(
        {"account_id": 1, "session_no": "TWICE"}, {"account_id": 2, "session_no": "TWICE"}, now=now
    )
    assert receiver.post({"MsgType": 2, "Data": []}, query="?account_id=abc").status_code == 400
    push = {"MsgType": 2, "Data": [report("TWICE", "85255311111", "Success")]}
    assert receiver.post(push, query="?account_id=2").status_code == 200
    assert {row["account_id"] for row in stored_receipts().values()} == {2}


def test_healthz_answers_while_the_database_does(receiver: Running) -> None:
    answer = requests.get(f"{receiver.base}/healthz", timeout=10)
    assert (answer.status_code, answer.json()) == (200, OK)


def test_a_database_that_cannot_take_the_push_gets_503_so_uspeedo_retries(
    configure: Configure,
) -> None:
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/receipts"
    configure(RECEIPTS_DATABASE_URL=closed, RECEIPTS_CALLBACK_TOKEN=TOKEN)
    running = Running(create_app(load_settings()), free_port()).start()
    try:
        answer = running.post({"MsgType": 2, "Data": [report("S", "85255311111", "Success")]})
        assert answer.status_code == 503
        assert answer.json()["code"] != 0
        assert requests.get(f"{running.base}/healthz", timeout=10).status_code == 503
    finally:
        running.stop()


def test_the_token_is_in_no_log_line(receiver: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.post({"MsgType": 2, "Data": [report("NOT-TRACKED", "85255311111", "Success")]})
    receiver.post(b"{bad")
    receiver.post({"MsgType": 2, "Data": []}, token=TOKEN + "x")
    # urllib3's records are the test's own client (Uspeedo's side), which knows the token.
    text = "\n".join(
        record.getMessage() for record in caplog.records if not record.name.startswith("urllib3")
    )
    assert "/uspeedo/callback/<token>" in text, "the access log names the route"
    assert TOKEN not in text


@pytest.mark.parametrize(
    ("token", "problem"),
    [(None, "is not set"), ("short-token", "has 11 characters"), ("x" * 30 + "/", "letters")],
)
def test_the_receiver_refuses_to_start_without_a_good_token(
    configure: Configure, token: str | None, problem: str
) -> None:
    if token is not None:
        configure(RECEIPTS_CALLBACK_TOKEN=token)
    with pytest.raises(SettingsError, match=problem):
        create_app(load_settings())


def test_receipts_receiver_serves_with_several_processes_and_refuses_a_busy_port(
    pg: str, configure: Configure, tmp_path: Any
) -> None:
    configure(RECEIPTS_DATABASE_URL=pg)
    port = free_port()
    env = {
        "RECEIPTS_DATABASE_URL": pg,
        "RECEIPTS_CALLBACK_TOKEN": TOKEN,
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    command = [
        sys.executable,
        "-m",
        "worker.cli",
        "receiver",
        "--port",
        str(port),
        "--workers",
        "2",
    ]
    log = tmp_path / "receiver.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _listening(port), timeout=30, describe=log.read_text)
        track({"account_id": 1, "session_no": "S", "phones": [P1]}, now=datetime.now(UTC))
        body = {"MsgType": 2, "Data": [report("S", "85255311111", "Fail")]}
        answers = [
            requests.post(
                f"http://127.0.0.1:{port}/uspeedo/callback/{TOKEN}", json=body, timeout=10
            )
            for _ in range(4)
        ]
        assert [a.status_code for a in answers] == [200] * 4
        assert stored_sessions()["S"]["state"] == "resolved"
        busy = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=30, check=False
        )
        assert busy.returncode != 0
        assert "address already in use" in busy.stderr.lower()
        assert "Traceback" not in busy.stderr and len(busy.stderr.splitlines()) == 1
    finally:
        process.terminate()
        process.wait(20)
    text = log.read_text()
    assert TOKEN not in text
    assert "<token>" in text


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
