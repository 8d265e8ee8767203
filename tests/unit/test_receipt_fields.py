"""Every field of a receipt from the API is bounded, and every receipt we cannot use is named.

One oversized or meaningless value costs its own receipt (named in ``problems`` and in its
session's ``session_problems``, which becomes the session's ``last_error``), or is shortened
where refusing would lose a receipt for a description; it never costs the whole answer. See
``worker/receipts.py`` for the bound of each field and why it is refused or shortened.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import responses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.client import UspeedoClient
from worker.domain import phone_key
from worker.receipts import (
    MAX_COUNTRY_CODE_LENGTH,
    MAX_PHONE_LENGTH,
    MAX_PROBLEMS_PER_SESSION,
    MAX_RECEIPT_CODE_LENGTH,
    MAX_RECEIPT_DESC_LENGTH,
    MAX_USER_ID_LENGTH,
    RECEIPT_TIME_TOLERANCE,
    ReceiptBatch,
    parse_receipts,
)
from worker.tracking import MAX_PHONE_DIGITS, MAX_SESSION_NO_LENGTH

RECEIVED = datetime(2023, 11, 15, 12, 0, tzinfo=UTC)
URL = "https://api.test.invalid/api"


def receipt(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "Phone": "(852)55311111",
        "CostCount": 1,
        "ReceiptResult": "Success",
        "ReceiptCode": "DELIVRD",
        "ReceiptDesc": "delivered",
        "ReceiptTime": int(RECEIVED.timestamp()) - 60,
        "UserId": "order-1",
    }
    entry.update(overrides)
    return entry


def parse(*entries: tuple[str, dict[str, Any]], asked: tuple[str, ...] = ("s1", "s2")) -> Any:
    """Each entry is (SessionNo, receipt); the neighbour "s2" always carries a good receipt."""
    data = [{"SessionNo": s, "ReceiptSet": [r]} for s, r in entries]
    data.append({"SessionNo": "s2", "ReceiptSet": [receipt(Phone="85255310002")]})
    return parse_receipts({"Data": data}, asked, "u-1", received_at=RECEIVED)


def only_problem(batch: ReceiptBatch, session_no: str = "s1") -> str:
    """The batch's one problem, which must also be its session's."""
    assert len(batch.problems) == 1, batch.problems
    assert batch.session_problems == ((session_no, batch.problems[0]),)
    assert len(batch.problems[0]) < 400
    return batch.problems[0]


def kept(batch: ReceiptBatch) -> list[str]:
    return [r.session_no for r in batch.receipts]


# --- Phone -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "phone",
    [
        "1" * 3000,  # made PostgreSQL refuse the index row, and with it the whole answer
        "+" + "9" * (MAX_PHONE_DIGITS + 1),
        10**3000,
        10**5000,  # beyond what int() may even print
        "(852)" + "5" * 18,
    ],
    ids=["3000-digits", "21-digits", "int-3001-digits", "int-5001-digits", "852-and-18-digits"],
)
def test_a_phone_with_too_many_digits_costs_its_own_receipt_only(phone: Any) -> None:
    batch = parse(("s1", receipt(Phone=phone)))
    assert kept(batch) == ["s2"]
    problem = only_problem(batch)
    assert "ReceiptSet[0]: Phone" in problem
    assert f"at most {MAX_PHONE_DIGITS}" in problem
    assert "'s1'" in problem


def test_a_phone_of_the_most_digits_is_kept() -> None:
    phone = "+" + "9" * MAX_PHONE_DIGITS
    batch = parse(("s1", receipt(Phone=phone)))
    assert batch.problems == ()
    assert [r.phone for r in batch.receipts] == [phone, "85255310002"]


def test_a_phone_spelled_at_unbounded_length_is_refused() -> None:
    phone = "(852)" + " " * MAX_PHONE_LENGTH + "55311111"
    problem = only_problem(parse(("s1", receipt(Phone=phone))))
    assert "Phone" in problem
    assert f"at most {MAX_PHONE_LENGTH}" in problem


@pytest.mark.parametrize("phone", ["QbPtKJPa", "()", "+", "-- --", "\u2460\u2461\u2462"])
def test_a_phone_with_no_digits_is_refused_not_dropped_silently(phone: str) -> None:
    """No digits, no phone_key: such a receipt used to vanish between parser and store."""
    batch = parse(("s1", receipt(Phone=phone)))
    assert kept(batch) == ["s2"]
    assert "Phone: no digits" in only_problem(batch)


def test_a_phone_in_full_width_digits_is_kept_and_keyed_in_ascii() -> None:
    phone = "".join(chr(0xFF10 + int(d)) for d in "85255311111")
    batch = parse(("s1", receipt(Phone=phone)))
    assert batch.problems == ()
    assert phone_key(batch.receipts[0].phone) == "85255311111"


# --- SessionNo -------------------------------------------------------------------------------


def test_an_oversized_session_no_is_named_by_its_length_not_echoed() -> None:
    session_no = "S" * 5000
    batch = parse((session_no, receipt()))
    assert kept(batch) == ["s2"]
    (problem,) = batch.problems
    assert f"at most {MAX_SESSION_NO_LENGTH}" in problem
    assert "SessionNo" in problem
    assert len(problem) < 400
    # Not asked for, so it is no session's problem.
    assert batch.session_problems == ()


def test_a_session_no_of_the_most_characters_is_matched_as_asked() -> None:
    session_no = "S" * MAX_SESSION_NO_LENGTH
    batch = parse((session_no, receipt()), asked=(session_no, "s2"))
    assert batch.problems == ()
    assert kept(batch) == [session_no, "s2"]


# --- descriptive text: shortened, the receipt kept ---------------------------------------------


@pytest.mark.parametrize(
    ("field", "attribute", "limit"),
    [
        ("ReceiptDesc", "receipt_desc", MAX_RECEIPT_DESC_LENGTH),
        ("ReceiptCode", "receipt_code", MAX_RECEIPT_CODE_LENGTH),
    ],
)
def test_oversized_descriptive_text_is_shortened_visibly_and_named(
    field: str, attribute: str, limit: int
) -> None:
    batch = parse(("s1", receipt(**{field: "x" * 5000})))
    assert kept(batch) == ["s1", "s2"]
    value = getattr(batch.receipts[0], attribute)
    assert len(value) == limit
    assert value == "x" * (limit - 1) + "\u2026"
    problem = only_problem(batch)
    assert field in problem
    assert "5000 characters" in problem
    assert "receipt kept" in problem


@pytest.mark.parametrize(
    ("field", "attribute", "limit"),
    [
        ("ReceiptDesc", "receipt_desc", MAX_RECEIPT_DESC_LENGTH),
        ("ReceiptCode", "receipt_code", MAX_RECEIPT_CODE_LENGTH),
        ("UserId", "user_id", MAX_USER_ID_LENGTH),
        ("CountryCode", "country_code", MAX_COUNTRY_CODE_LENGTH),
    ],
)
def test_text_at_its_bound_is_kept_whole(field: str, attribute: str, limit: int) -> None:
    batch = parse(("s1", receipt(**{field: "7" * limit})))
    assert batch.problems == ()
    assert getattr(batch.receipts[0], attribute) == "7" * limit


def test_a_huge_number_as_receipt_code_is_shortened_too() -> None:
    batch = parse(("s1", receipt(ReceiptCode=10**1000)))
    assert len(batch.receipts[0].receipt_code) == MAX_RECEIPT_CODE_LENGTH
    assert "ReceiptCode" in only_problem(batch)


# --- identifiers: dropped, the receipt kept ---------------------------------------------------


@pytest.mark.parametrize(
    ("field", "attribute", "limit"),
    [("UserId", "user_id", MAX_USER_ID_LENGTH), ("CountryCode", "country_code", 16)],
)
def test_an_oversized_identifier_is_not_stored_and_named(
    field: str, attribute: str, limit: int
) -> None:
    """A cut identifier would be a different identifier, which a sender could join on."""
    batch = parse(("s1", receipt(**{field: "9" * (limit + 1)})))
    assert kept(batch) == ["s1", "s2"]
    assert getattr(batch.receipts[0], attribute) is None
    problem = only_problem(batch)
    assert field in problem
    assert "not stored" in problem


# --- ReceiptTime in the future ----------------------------------------------------------------


@pytest.mark.parametrize(
    "seconds",
    [
        253_402_300_799,  # 9999-12-31: would block every later receipt of the phone
        int((RECEIVED + RECEIPT_TIME_TOLERANCE).timestamp()) + 1,
        str(int((RECEIVED + timedelta(days=400)).timestamp())),
    ],
    ids=["year-9999", "just-past-the-tolerance", "a-year-ahead-as-a-string"],
)
def test_a_receipt_time_too_far_after_the_answer_is_refused(seconds: Any) -> None:
    batch = parse(("s1", receipt(ReceiptTime=seconds)))
    assert kept(batch) == ["s2"]
    problem = only_problem(batch)
    assert "ReceiptTime" in problem
    assert "after the answer was received" in problem


def test_a_receipt_time_within_the_tolerance_is_kept() -> None:
    at = RECEIVED + RECEIPT_TIME_TOLERANCE
    batch = parse(("s1", receipt(ReceiptTime=int(at.timestamp()))))
    assert batch.problems == ()
    assert batch.receipts[0].receipt_time == at


@pytest.mark.parametrize(("hours", "kept_too"), [(23, True), (25, False)])
def test_the_documented_tolerance_is_a_day(hours: int, kept_too: bool) -> None:
    # README: clocks and time zones may be off by hours, never by days.
    at = RECEIVED + timedelta(hours=hours)
    batch = parse(("s1", receipt(ReceiptTime=int(at.timestamp()))))
    assert ("s1" in kept(batch)) is kept_too


@responses.activate
def test_the_client_checks_receipt_times_against_when_the_answer_arrived() -> None:
    received = RECEIVED.timestamp() + 7 * 86_400  # the client's clock when it gets the answer
    late = int(RECEIVED.timestamp()) + 3 * 86_400  # 4 days before it: fine
    future = int(received) + 2 * 86_400
    responses.post(
        URL,
        json={
            "RetCode": 0,
            "Data": [
                {"SessionNo": "s1", "ReceiptSet": [receipt(ReceiptTime=late)]},
                {"SessionNo": "s2", "ReceiptSet": [receipt(ReceiptTime=future)]},
            ],
        },
    )
    client = UspeedoClient(
        api_url=URL, access_key_id="id", access_key_secret="secret", clock=lambda: received
    )
    batch = client.get_send_receipts(1, ["s1", "s2"])
    assert kept(batch) == ["s1"]
    assert batch.session_problems[0][0] == "s2"
    assert "ReceiptTime" in batch.session_problems[0][1]


# --- whatever the API sends -------------------------------------------------------------------

_long_text = st.integers(0, 6000).map(lambda n: "9" * n) | st.text(max_size=40)
_values = _long_text | st.integers() | st.integers(0, 10**40) | st.none()
_entries = st.fixed_dictionaries(
    {},
    optional=dict.fromkeys(
        ("Phone", "ReceiptCode", "ReceiptDesc", "UserId", "CountryCode", "CostCount"), _values
    ),
).map(lambda extra: {**receipt(), **extra})


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["s1", "s2", "S" * 3000]) | _long_text, _entries)))
def test_every_kept_receipt_is_within_every_bound(
    entries: list[tuple[str, dict[str, Any]]],
) -> None:
    batch = parse(*entries)
    for kept_receipt in batch.receipts:
        assert 1 <= len(phone_key(kept_receipt.phone)) <= MAX_PHONE_DIGITS
        assert len(kept_receipt.phone) <= MAX_PHONE_LENGTH
        assert len(kept_receipt.session_no) <= MAX_SESSION_NO_LENGTH
        assert len(kept_receipt.receipt_code) <= MAX_RECEIPT_CODE_LENGTH
        assert len(kept_receipt.receipt_desc) <= MAX_RECEIPT_DESC_LENGTH
        assert len(kept_receipt.user_id or "") <= MAX_USER_ID_LENGTH
        assert len(kept_receipt.country_code or "") <= MAX_COUNTRY_CODE_LENGTH
    assert all(len(problem) < 400 for problem in batch.problems)
    # The good neighbour always survives.
    assert "s2" in kept(batch)


def test_a_session_with_many_odd_receipts_names_the_first_few_and_counts_the_rest() -> None:
    """The session's problems become its last_error: one line each would grow without bound."""
    odd = [receipt(Phone=f"phone {chr(65 + i)}") for i in range(MAX_PROBLEMS_PER_SESSION + 3)]
    payload = {"Data": [{"SessionNo": "s1", "ReceiptSet": odd}]}
    batch = parse_receipts(payload, ["s1"], received_at=RECEIVED)
    assert len(batch.problems) == MAX_PROBLEMS_PER_SESSION + 3
    lines = [problem for session_no, problem in batch.session_problems if session_no == "s1"]
    assert lines[:-1] == list(batch.problems[:MAX_PROBLEMS_PER_SESSION])
    assert lines[-1] == "and 3 more problem(s)"
