"""Validation of every way a session reaches the tracker (Python call, Celery task, CLI, CSV):
the pure parse_* functions only; nothing here touches a database. ``now`` is always injected."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.errors import TrackError
from worker.tracking import (
    MAX_SESSION_NO_LENGTH,
    MAX_USER_REF_LENGTH,
    TrackRequest,
    parse_account_id,
    parse_phones,
    parse_request,
    parse_requests,
    parse_sent_at,
    parse_session_no,
    parse_user_ref,
)

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
FIELDS = ("account_id", "session_no", "phones", "sent_at", "user_ref")


# --- account_id ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1), (12, 12), ("12", 12), (" 12 ", 12), ("007", 7), (2**63 - 1, 2**63 - 1)],
)
def test_account_id_accepted(value: Any, expected: int) -> None:
    assert parse_account_id(value) == expected


@pytest.mark.parametrize(
    "value", [0, -1, "0", "-1", "abc", "", "1.5", 1.5, 1.0, True, False, None, 2**63, [1], "1e3"]
)
def test_account_id_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(ValueError, match="account_id"):
        parse_account_id(value)


# --- session_no ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc-123", "abc-123"),
        ("  padded\t", "padded"),
        ("x" * MAX_SESSION_NO_LENGTH, "x" * MAX_SESSION_NO_LENGTH),
        ("a!~#{}", "a!~#{}"),
    ],
)
def test_session_no_accepted(value: str, expected: str) -> None:
    assert parse_session_no(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "\t\n",
        "x" * (MAX_SESSION_NO_LENGTH + 1),
        "with space",
        "tab\tinside",
        "café",
        "line\nbreak",
        None,
        123,
        b"abc",
        ["abc"],
    ],
    ids=[
        "empty",
        "spaces",
        "whitespace",
        "too-long",
        "space",
        "tab",
        "non-ascii",
        "newline",
        "none",
        "int",
        "bytes",
        "list",
    ],
)
def test_session_no_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(ValueError, match="session_no"):
        parse_session_no(value)


def test_session_no_too_long_says_how_long() -> None:
    with pytest.raises(ValueError, match=r"129 characters long \(at most 128\)"):
        parse_session_no("x" * 129)


# --- phones ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ()),
        ("", ()),
        ([], ()),
        ("(852)55311111", ("(852)55311111",)),
        ("(852)55311111, +852 5531 1112", ("(852)55311111", "+852 5531 1112")),
        (["(852)55311111", " +1-555-0100 "], ("(852)55311111", "+1-555-0100")),
        (("85255311111",), ("85255311111",)),
        (["12345"], ("12345",)),
        (["1" * 20], ("1" * 20,)),
    ],
)
def test_phones_accepted(value: Any, expected: tuple[str, ...]) -> None:
    assert parse_phones(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "(852)55311111,+852 5531 1111,0085255311111,85255311111",
        ["(852)55311111", "+852 5531 1111", "0085255311111", "85255311111"],
    ],
)
def test_phones_duplicates_by_digits_dropped_keeping_the_first(value: Any) -> None:
    assert parse_phones(value) == ("(852)55311111",)


def test_phones_keep_order() -> None:
    assert parse_phones("+3 3333333, +1 1111111, +2 2222222, +1 111 1111") == (
        "+3 3333333",
        "+1 1111111",
        "+2 2222222",
    )


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "12",
        "+1 (555) 01x",
        ["abc"],
        ["(852)55311111", "12"],
        "1234",
        "1" * 21,
        "(852)55311111,,+85255311112",
        "(852)55311111,",
        "+",
        "\uff15\uff15\uff15\uff10",  # full-width digits, but only four of them
        "\u2460\u2461\u2462\u2463\u2464",  # circled digits are not decimal digits
        "+1.555.0100",
    ],
)
def test_phones_malformed_refused_naming_the_phone(value: Any) -> None:
    with pytest.raises(ValueError, match="phone"):
        parse_phones(value)


@pytest.mark.parametrize("value", [12345678, 1.5, True, {"a": "12345"}, b"12345678", [12345678]])
def test_phones_of_the_wrong_type_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="phone"):
        parse_phones(value)


def test_phones_malformed_message_names_the_bad_one() -> None:
    with pytest.raises(ValueError, match=re.escape("'+1 (555) 01x'")):
        parse_phones(["(852)55311111", "+1 (555) 01x"])


# --- sent_at ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, ""])
def test_sent_at_missing_is_now(value: Any) -> None:
    assert parse_sent_at(value, now=NOW) == NOW


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-06-01T10:00:00+00:00", datetime(2024, 6, 1, 10, tzinfo=UTC)),
        ("2024-06-01T10:00:00Z", datetime(2024, 6, 1, 10, tzinfo=UTC)),
        ("2024-06-01T18:00:00+08:00", datetime(2024, 6, 1, 10, tzinfo=UTC)),
        ("2024-06-01T05:30:00-04:30", datetime(2024, 6, 1, 10, tzinfo=UTC)),
        (" 2024-06-01 10:00:00.250+00:00 ", datetime(2024, 6, 1, 10, 0, 0, 250000, tzinfo=UTC)),
        (datetime(2024, 6, 1, 19, tzinfo=timezone(timedelta(hours=9))), NOW - 2 * HOUR),
        ("2020-01-01T00:00:00+00:00", datetime(2020, 1, 1, tzinfo=UTC)),
    ],
)  # fmt: skip
def test_sent_at_with_offset_accepted_and_converted_to_utc(value: Any, expected: datetime) -> None:
    parsed = parse_sent_at(value, now=NOW)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "delta", [timedelta(0), timedelta(minutes=5), timedelta(minutes=4, seconds=59)]
)
def test_sent_at_slightly_in_the_future_is_tolerated(delta: timedelta) -> None:
    assert parse_sent_at((NOW + delta).isoformat(), now=NOW) == NOW + delta


@pytest.mark.parametrize(
    "value",
    [
        (NOW + timedelta(minutes=5, microseconds=1)).isoformat(),
        (NOW + timedelta(hours=1)).isoformat(),
        NOW + timedelta(days=1),
        "2024-06-01T20:06:00+08:00",  # 12:06 UTC
    ],
)
def test_sent_at_in_the_future_by_more_than_5_minutes_refused(value: Any) -> None:
    with pytest.raises(ValueError, match=r"sent_at .* is in the future"):
        parse_sent_at(value, now=NOW)


@pytest.mark.parametrize(
    "value", ["2024-06-01T10:00:00", "2024-06-01", NOW.replace(tzinfo=None)], ids=str
)
def test_sent_at_naive_refused(value: Any) -> None:
    with pytest.raises(ValueError, match=r"sent_at .* has no UTC offset"):
        parse_sent_at(value, now=NOW)


@pytest.mark.parametrize(
    "value",
    ["yesterday", "01/06/2024 10:00", "2024-13-01T00:00:00+00:00", "1717236000", "   x"],
)
def test_sent_at_non_iso_refused(value: str) -> None:
    with pytest.raises(ValueError, match=r"sent_at .* is not an ISO 8601 timestamp"):
        parse_sent_at(value, now=NOW)


@pytest.mark.parametrize("value", [1717236000, 1.5, ["2024-06-01T10:00:00+00:00"], True])
def test_sent_at_of_the_wrong_type_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="sent_at must be an ISO 8601 string or a datetime"):
        parse_sent_at(value, now=NOW)


@pytest.mark.parametrize(
    "value",
    [
        "0001-01-01T00:00:00+01:00",
        datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))),
        "9999-12-31T23:59:59-01:00",
    ],
    ids=str,
)
def test_sent_at_out_of_range_in_utc_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="sent_at"):
        parse_sent_at(value, now=NOW)


# --- user_ref --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("order-42", "order-42"), ("é" * 256, "é" * 256)],
)
def test_user_ref_accepted(value: Any, expected: str | None) -> None:
    assert parse_user_ref(value) == expected


@pytest.mark.parametrize(
    "value",
    # NUL and a lone surrogate: no database column can hold them.
    ["x" * (MAX_USER_REF_LENGTH + 1), 42, ["ref"], True, "order\x001", "order-\ud800"],
)
def test_user_ref_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(ValueError, match="user_ref"):
        parse_user_ref(value)


# --- parse_request ---------------------------------------------------------------------------


def test_parse_request_full() -> None:
    request = parse_request(
        {
            "account_id": "7",
            "session_no": " s-1 ",
            "phones": "(852)55311111,+852 5531 1112",
            "sent_at": "2024-06-01T18:00:00+08:00",
            "user_ref": "order-1",
        },
        now=NOW,
    )
    assert request == TrackRequest(
        account_id=7,
        session_no="s-1",
        phones=("(852)55311111", "+852 5531 1112"),
        sent_at=datetime(2024, 6, 1, 10, tzinfo=UTC),
        user_ref="order-1",
    )


def test_parse_request_minimal() -> None:
    request = parse_request({"account_id": 1, "session_no": "s"}, now=NOW)
    assert request == TrackRequest(account_id=1, session_no="s", sent_at=NOW)
    assert request.phones == ()
    assert request.user_ref is None


@pytest.mark.parametrize(
    "field", ["sessionNo", "AccountId", "phone", "extra"], ids=lambda f: f"unknown-{f}"
)
def test_parse_request_unknown_field_refused(field: str) -> None:
    with pytest.raises(ValueError, match=f"unknown field\\(s\\) {field}"):
        parse_request({"account_id": 1, "session_no": "s", field: "x"}, now=NOW)


def test_parse_request_lists_every_unknown_field() -> None:
    with pytest.raises(ValueError, match="unknown field\\(s\\) a, b"):
        parse_request({"account_id": 1, "session_no": "s", "b": 1, "a": 2}, now=NOW)


@pytest.mark.parametrize("field", ["account_id", "session_no"])
def test_parse_request_required_field_missing(field: str) -> None:
    raw = {"account_id": 1, "session_no": "s"}
    del raw[field]
    with pytest.raises(ValueError, match=f"{field} is missing"):
        parse_request(raw, now=NOW)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("account_id", 0),
        ("account_id", None),
        ("session_no", "has space"),
        ("session_no", None),
        ("phones", "abc"),
        ("sent_at", "2024-06-01T10:00:00"),
        ("sent_at", (NOW + timedelta(hours=1)).isoformat()),
        ("user_ref", "x" * 300),
    ],
)
def test_parse_request_prefixes_the_field(field: str, value: Any) -> None:
    raw: dict[str, Any] = {"account_id": 1, "session_no": "s", field: value}
    with pytest.raises(ValueError, match=f"^{field}: "):
        parse_request(raw, now=NOW)


# --- parse_requests --------------------------------------------------------------------------


def test_parse_requests_all_valid_keeps_order_and_passes_track_requests_through() -> None:
    ready = TrackRequest(account_id=9, session_no="ready", sent_at=NOW - timedelta(hours=1))
    requests = parse_requests(
        [{"account_id": 1, "session_no": "a"}, ready, {"account_id": "2", "session_no": "b"}],
        now=NOW,
    )
    assert [r.session_no for r in requests] == ["a", "ready", "b"]
    assert requests[1] == ready


def test_parse_requests_empty() -> None:
    assert parse_requests([], now=NOW) == []


def test_parse_requests_several_bad_rows_one_error_listing_each() -> None:
    rows: list[dict[str, Any]] = [
        {"account_id": 1, "session_no": "ok-1"},  # line 2
        {"account_id": 0, "session_no": "bad-account"},  # line 3
        {"account_id": 1, "session_no": "ok-2"},  # line 4
        {"account_id": 1, "session_no": ""},  # line 5
        {"account_id": 1, "session_no": "bad-field", "color": "red"},  # line 6
        {"account_id": 1, "session_no": "bad-phone", "phones": "12"},  # line 7
        {"account_id": 1, "session_no": "ok-3"},  # line 8
    ]
    with pytest.raises(TrackError) as info:
        parse_requests(rows, now=NOW, label="line", first_number=2)
    error = info.value
    message = str(error)
    assert isinstance(error, ValueError)
    assert error.valid_rows == 3
    assert len(error.problems) == 4
    assert message.startswith("4 problems: ")
    for number in (3, 5, 6, 7):
        assert re.search(rf"\bline {number}\b", message), number
    for number in (1, 2, 4, 8):
        assert not re.search(rf"\bline {number}\b", message), number
    assert "line 3 (session_no 'bad-account'): account_id" in message
    assert "line 5: session_no" in message
    assert "line 6 (session_no 'bad-field'): unknown field(s) color" in message
    assert "line 7 (session_no 'bad-phone'): phones" in message
    assert "nothing was recorded" in message
    assert "the 3 valid row(s) were not recorded either" in message
    assert "row " not in message  # the label replaces the default


def test_parse_requests_default_label_and_numbering() -> None:
    with pytest.raises(TrackError, match=r"^1 problem: row 2: session_no is missing") as info:
        parse_requests([{"account_id": 1, "session_no": "a"}, {"account_id": 1}], now=NOW)
    assert info.value.valid_rows == 1
    assert "the 1 valid row(s) were not recorded either" in str(info.value)


def test_parse_requests_only_bad_rows_says_nothing_was_recorded() -> None:
    with pytest.raises(TrackError) as info:
        parse_requests([{"account_id": -1, "session_no": "a"}], now=NOW)
    message = str(info.value)
    assert message.startswith("1 problem: row 1 (session_no 'a'): account_id")
    assert message.endswith("; nothing was recorded")
    assert info.value.valid_rows == 0


def test_parse_requests_accepts_a_generator() -> None:
    rows = ({"account_id": 1, "session_no": f"s{i}"} for i in range(3))
    assert len(parse_requests(rows, now=NOW)) == 3


def test_track_error_message_grammar() -> None:
    assert str(TrackError(["a"])) == "1 problem: a; nothing was recorded"
    assert str(TrackError(["a", "b"], valid_rows=2)) == (
        "2 problems: a; b; nothing was recorded (the 2 valid row(s) were not recorded either)"
    )


def test_parse_requests_out_of_range_sent_at_is_a_track_error() -> None:
    rows = [{"account_id": 1, "session_no": "s", "sent_at": "0001-01-01T00:00:00+01:00"}]
    with pytest.raises(TrackError, match=r"row 1 .*sent_at"):
        parse_requests(rows, now=NOW)


_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.integers(-(2**64), 2**64).map(str)
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
_OFFSETS = st.integers(-1439, 1439).map(lambda minutes: timezone(timedelta(minutes=minutes)))
_TIMESTAMPS = st.datetimes(
    timezones=st.none() | st.just(UTC) | _OFFSETS,
).map(lambda d: d.isoformat())
_PHONES = st.lists(st.from_regex(r"\A\+?[0-9()\- ]{0,22}\Z"), max_size=3)
_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "account_id": _JSON | st.integers(1, 2**63 - 1),
    "session_no": _JSON | st.from_regex(r"\A[\x21-\x7e]{1,130}\Z"),
    "phones": _JSON | _PHONES | _PHONES.map(",".join),
    "sent_at": _JSON | _TIMESTAMPS,
    "user_ref": _JSON,
}


@st.composite
def _raw_rows(draw: st.DrawFn) -> dict[str, Any]:
    row: dict[str, Any] = {
        name: draw(strategy) for name, strategy in _FIELD_VALUES.items() if draw(st.booleans())
    }
    if draw(st.integers(0, 3)) == 0:
        row.update(draw(st.dictionaries(st.text(max_size=8), _JSON, max_size=2)))
    return row


_VALID_PHONE = st.from_regex(r"\A\+?\(?[0-9]{3}\)?[0-9]{5,12}\Z")
_VALID_ROWS = st.fixed_dictionaries(
    {
        "account_id": st.integers(1, 2**63 - 1) | st.integers(1, 2**63 - 1).map(str),
        "session_no": st.from_regex(r"\A[\x21-\x7e]{1,128}\Z"),
    },
    optional={
        "phones": st.lists(_VALID_PHONE, max_size=3) | st.lists(_VALID_PHONE).map(",".join),
        "sent_at": st.none()
        | st.datetimes(
            min_value=datetime(1900, 1, 1, tzinfo=UTC).replace(tzinfo=None),
            max_value=NOW.replace(tzinfo=None),
            timezones=st.just(UTC) | _OFFSETS,
        ).map(lambda d: d.isoformat()),
        "user_ref": st.none() | st.text(max_size=MAX_USER_REF_LENGTH),
    },
)


@given(rows=st.lists(_VALID_ROWS | _raw_rows(), max_size=4), first_number=st.integers(0, 10**6))
def test_parse_requests_on_arbitrary_json_raises_only_track_error(
    rows: list[dict[str, Any]], first_number: int
) -> None:
    try:
        requests = parse_requests(rows, now=NOW, label="item", first_number=first_number)
    except TrackError as exc:
        problems, valid = exc.problems, exc.valid_rows
    else:
        assert len(requests) == len(rows)
        for request in requests:
            assert isinstance(request, TrackRequest)
            assert 0 < request.account_id < 2**63
            assert request.sent_at.utcoffset() == timedelta(0)
            assert request.sent_at <= NOW + timedelta(minutes=5)
        return
    assert 1 <= len(problems) <= len(rows)
    assert valid == len(rows) - len(problems)
    numbers = [int(re.match(r"item (\d+)", p).group(1)) for p in problems]  # type: ignore[union-attr]
    assert numbers == sorted(set(numbers))
    assert all(first_number <= n < first_number + len(rows) for n in numbers)


# --- phones in any decimal digits (issue 13, item 15) ------------------------------------------


def _digits(ascii_digits: str, zero: int) -> str:
    """``ascii_digits`` written in the decimal digits whose zero is code point ``zero``."""
    return "".join(chr(zero + int(d)) if d.isdigit() else d for d in ascii_digits)


FULL_WIDTH, ARABIC_INDIC = 0xFF10, 0x0660


@pytest.mark.parametrize(
    "phone",
    [
        _digits("85255311111", FULL_WIDTH),  # as CJK input methods type them
        # Full-width plus, hyphen and ideographic space.
        "\uff0b" + _digits("852\u30005531\uff0d1111", FULL_WIDTH),
        "\uff08" + _digits("852", FULL_WIDTH) + "\uff09" + _digits("55311111", FULL_WIDTH),
        _digits("85255311111", ARABIC_INDIC),
    ],
)
def test_phones_in_any_decimal_digits_are_accepted_and_match_ascii(phone: str) -> None:
    """Receipts spelling a phone in full-width digits match the tracked phone on its digits;
    tracking takes the same spellings, and they are the same phone as the ASCII one."""
    assert parse_phones([phone]) == (phone,)
    assert parse_phones([phone, "(852)55311111"]) == (phone,)
    assert parse_phones(["85255311111", phone]) == ("85255311111",)


def test_phones_digit_count_is_the_ascii_key_length() -> None:
    with pytest.raises(ValueError, match="5 to 20 digits"):
        parse_phones([_digits("8" * 21, FULL_WIDTH)])
    assert parse_phones([_digits("8" * 20, FULL_WIDTH)]) == (_digits("8" * 20, FULL_WIDTH),)


# --- TrackRequest instances are validated like dicts (issue 13, item 14) -----------------------


def _request(**overrides: Any) -> TrackRequest:
    fields: dict[str, Any] = {"account_id": 1, "session_no": "S1", "sent_at": NOW - HOUR}
    fields.update(overrides)
    return TrackRequest(**fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"session_no": "S 1"}, "(session_no 'S 1'): session_no"),
        ({"session_no": ""}, "row 1: session_no: session_no is empty"),
        ({"session_no": "X" * 200}, "session_no is 200 characters long"),
        ({"phones": ("call me",)}, "phones: phone 'call me' is malformed"),
        ({"phones": ("12",)}, "phones: phone '12' is malformed"),
        ({"sent_at": NOW.replace(tzinfo=None)}, "sent_at: sent_at 2024-06-01T12:00:00 has no"),
        ({"sent_at": NOW + 2 * HOUR}, "is in the future"),
        ({"user_ref": "r" * 5000}, "user_ref: user_ref is longer than 256"),
        ({"user_ref": "a\x00b"}, "user_ref: user_ref contains a NUL"),
        ({"account_id": 0}, "account_id: account_id must be a positive 64-bit integer"),
        ({"account_id": True}, "account_id: account_id must be a positive integer"),
    ],
    ids=[
        "session-no-with-space",
        "empty-session-no",
        "long-session-no",
        "non-phone",
        "too-few-digits",
        "naive-sent-at",
        "future-sent-at",
        "5000-char-user-ref",
        "nul-in-user-ref",
        "account-id-zero",
        "account-id-bool",
    ],
)
def test_a_track_request_instance_is_validated_like_a_dict(
    overrides: dict[str, Any], message: str
) -> None:
    """TrackRequest instances used to be stored as they came, whatever they held."""
    bad = _request(**overrides)
    with pytest.raises(TrackError) as info:
        parse_requests([bad], now=NOW)
    assert message in str(info.value)
    assert str(info.value).startswith("1 problem: row 1")
    # The same rules, the same message, as the dict with the same fields.
    as_dict = {name: getattr(bad, name) for name in FIELDS}
    with pytest.raises(TrackError) as from_dict:
        parse_requests([as_dict], now=NOW)
    assert str(from_dict.value) == str(info.value)


def test_track_request_instances_are_numbered_among_dict_rows() -> None:
    rows: list[Any] = [
        {"account_id": 1, "session_no": "a"},
        _request(session_no="b c"),
        _request(session_no="ok"),
        _request(phones=("+852 5531 1111", "nope")),
    ]
    with pytest.raises(TrackError) as info:
        parse_requests(rows, now=NOW, label="item", first_number=5)
    assert [p.split(":")[0] for p in info.value.problems] == [
        "item 6 (session_no 'b c')",
        "item 8 (session_no 'S1')",
    ]
    assert info.value.valid_rows == 2


def test_a_valid_track_request_comes_back_normalized() -> None:
    in_hong_kong = timezone(timedelta(hours=8))
    request = _request(
        session_no=" S1 ",
        phones=["(852)55311111", "+852 5531 1111"],  # type: ignore[arg-type]
        sent_at=datetime(2024, 6, 1, 19, 0, tzinfo=in_hong_kong),
        account_id="7",  # type: ignore[arg-type]
    )
    (parsed,) = parse_requests([request], now=NOW)
    assert parsed == TrackRequest(
        account_id=7,
        session_no="S1",
        phones=("(852)55311111",),
        sent_at=datetime(2024, 6, 1, 11, 0, tzinfo=UTC),
    )
    assert parsed.sent_at.tzinfo is UTC
