"""Hostile pushes at ``receipts receiver``, on PostgreSQL and SQLite: NUL and lone surrogates in
every text field, numbers as strings, a 10 MiB body, and hostile pushes racing good ones. Each
gets its documented answer and costs nothing else: the good reports of the same body, and the
good pushes sent meanwhile, are all stored."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from tests.support.databases import Configure
from tests.support.factories import stored_receipts, stored_sessions, track
from tests.support.push_receiver import TOKEN, Running, report, running_receiver
from worker.domain import phone_key

OK = {"code": 0, "message": "ok"}
# What a database column can hold: no NUL, no lone surrogate.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
GOOD = "85255312222"


@pytest.fixture
def receiver(database: str, configure: Configure) -> Iterator[Running]:
    with running_receiver(database, configure) as running:
        yield running


def _body(*items: Any) -> bytes:
    # json.dumps writes a lone surrogate as its \ud800 escape, as a hostile sender would.
    return json.dumps({"MsgType": 2, "Data": list(items)}).encode()


@pytest.mark.parametrize(
    "bad",
    ["\x00", chr(0xD800), chr(0xDFFF), "\x00" + chr(0xDC00)],
    ids=["nul", "high-surrogate", "low-surrogate", "both"],
)
@pytest.mark.parametrize(
    ("field", "fate"),
    [
        ("SessionNo", "skipped"),  # no tracked SessionNo holds one: it matches nothing
        ("Phone", "stored"),  # the digits are the phone
        ("ReceiptResult", "skipped"),  # not a result
        ("ReceiptCode", "stored"),
        ("ReceiptDesc", "stored"),
        ("UserId", "stored"),
    ],
)
def test_nul_and_lone_surrogates_in_any_field_cost_nothing_else(
    receiver: Running, field: str, fate: str, bad: str
) -> None:
    track({"account_id": 1, "session_no": "S"}, now=datetime.now(UTC))
    hostile = report("S", "85255311111", "Success")
    hostile[field] = hostile[field][:3] + bad + hostile[field][3:]
    answer = receiver.post(_body(hostile, report("S", GOOD, "Success")))
    assert (answer.status_code, answer.json()) == (200, OK)
    stored = stored_receipts()
    assert ("S", GOOD) in stored
    keys = {phone_key(phone) for _, phone in stored}
    assert ("85255311111" in keys) == (fate == "stored")
    for row in stored.values():
        for value in row.values():
            assert not (isinstance(value, str) and UNSTORABLE.search(value)), row
    assert stored_sessions()["S"]["state"] == "resolved"


@pytest.mark.parametrize(
    ("fields", "stored"),
    [
        ({"ReceiptTime": "1700000000", "CostCount": "2"}, (1_700_000_000, 2)),
        ({"ReceiptTime": " 1700000000 ", "CostCount": "2.0"}, (1_700_000_000, 2)),
        ({"ReceiptTime": "1700000000.0", "CostCount": 3.0}, (1_700_000_000, 3)),
        ({"ReceiptTime": "", "CostCount": ""}, (None, None)),
        ({"ReceiptTime": "soon"}, None),  # skipped, named in the log and the counts
        ({"CostCount": "1.5"}, None),
        ({"ReceiptTime": "1700000000000"}, None),  # milliseconds: refused, not guessed
        ({"SessionNo": 12345}, None),
    ],
)
def test_numbers_as_strings_are_read_and_what_is_no_number_is_skipped(
    receiver: Running, fields: dict[str, Any], stored: tuple[Any, Any] | None
) -> None:
    track({"account_id": 1, "session_no": "S"}, now=datetime.now(UTC))
    item = {**report("S", "85255311111", "Success"), **fields}
    answer = receiver.post(_body(item, report("S", GOOD, "Success")))
    assert (answer.status_code, answer.json()) == (200, OK)
    rows = stored_receipts()
    assert ("S", GOOD) in rows
    if stored is None:
        assert ("S", "85255311111") not in rows
        return
    row = rows[("S", "85255311111")]
    when = row["receipt_time"]
    assert (when.timestamp() if when else None, row["cost_count"]) == stored


def test_a_ten_mib_body_is_refused_and_the_next_push_is_taken(receiver: Running) -> None:
    track({"account_id": 1, "session_no": "S"}, now=datetime.now(UTC))
    items = [report("S", f"852{i:08d}", "Success", ReceiptDesc="x" * 400) for i in range(23_000)]
    body = _body(*items)
    assert len(body) >= 10 * 1024 * 1024
    answer = receiver.post(body)
    assert answer.status_code == 413 and answer.json()["code"] == 413
    assert stored_receipts() == {}
    assert receiver.post(_body(report("S", GOOD, "Success"))).status_code == 200
    assert list(stored_receipts()) == [("S", GOOD)]


def test_hostile_pushes_racing_good_ones_lose_none_of_them(receiver: Running) -> None:
    sessions = [f"S{i:03d}" for i in range(40)]
    track(*({"account_id": 1, "session_no": s} for s in sessions), now=datetime.now(UTC))
    unknown = [
        {"SessionNo": "S000", "Phone": f"852{i:08d}", "ReceiptResult": "Maybe"}
        for i in range(10_000)
    ]
    hostile: list[tuple[bytes, str, int]] = [
        (b'{"MsgType": 2, "Data": [{"SessionNo": "S0', TOKEN, 400),  # truncated
        (_body(report("S001", GOOD, "Success")), TOKEN[:-1] + "x", 404),  # wrong token
        (b"[" * 10_000 + b"]" * 10_000, TOKEN, 400),  # nested past the recursion limit
        (_body(*unknown), TOKEN, 200),  # 10,000 unknown results: all skipped
        (b'{"MsgType": 2, "Data": [' + b'"x",' * 300_000 + b'"x"]}', TOKEN, 413),
    ]
    good = [(_body(report(s, GOOD, "Success")), TOKEN, 200) for s in sessions]
    jobs = [job for pair in zip(good, hostile * 8, strict=True) for job in pair]

    def send(job: tuple[bytes, str, int]) -> tuple[int, int]:
        body, token, _ = job
        answer = requests.post(
            receiver.url(token), data=body, headers={"Content-Type": "application/json"}, timeout=60
        )
        return answer.status_code, job[2]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, jobs))
    assert [got for got, _ in answers] == [want for _, want in answers]
    assert set(stored_receipts()) == {(s, GOOD) for s in sessions}
    assert {row["state"] for row in stored_sessions().values()} == {"resolved"}
