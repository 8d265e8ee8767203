"""Rules of the domain (README, "Tables") as pure functions: which results are
final, how phones match, which receipt version wins, when a session is resolved."""

from __future__ import annotations

import itertools
import re
import unicodedata
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.domain import (
    FINAL_RESULTS,
    RECEIPT_FACTS,
    ReceiptVersion,
    Result,
    is_final,
    is_repeat,
    is_resolved,
    normalize_result,
    phone_key,
    pick_latest,
    settled_by_answer,
    should_replace,
    unresolved_phones,
)

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)

# Spelled out here rather than taken from the module, so the test checks the contract itself.
DOCUMENTED_FINAL = frozenset({"Success", "Fail", "SubmitFail"})
ALL_RESULTS = ["Success", "Fail", "Unknow", "SubmitFail"]
FINALS = sorted(DOCUMENTED_FINAL)


# --- Result and is_final ---------------------------------------------------------------------


def test_result_values_are_uspeedo_spellings() -> None:
    assert sorted(r.value for r in Result) == sorted(ALL_RESULTS)
    assert {r.value for r in FINAL_RESULTS} == DOCUMENTED_FINAL


@pytest.mark.parametrize("result", ALL_RESULTS)
def test_is_final_follows_the_contract(result: str) -> None:
    assert is_final(result) is (result in DOCUMENTED_FINAL)
    assert is_final(Result(result)) is (result in DOCUMENTED_FINAL)


@pytest.mark.parametrize("raw", ["", "success", "unknown", "Delivered"])
def test_is_final_is_false_for_anything_but_normalized_final_spellings(raw: str) -> None:
    assert not is_final(raw)


# --- normalize_result ------------------------------------------------------------------------


@pytest.mark.parametrize("result", list(Result))
@pytest.mark.parametrize(
    "spell",
    [
        lambda v: v,
        str.lower,
        str.upper,
        str.swapcase,
        lambda v: f"  {v}\t",
        lambda v: f"\n{v.upper()} ",
    ],
    ids=["exact", "lower", "upper", "swapcase", "padded", "padded-upper"],
)
def test_normalize_result_accepts_uspeedo_spellings_in_any_case_and_padding(
    result: Result, spell: object
) -> None:
    assert callable(spell)
    normalized = normalize_result(spell(result.value))
    assert normalized is result
    assert normalized == result.value


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("发送成功", Result.SUCCESS),
        ("发送失败", Result.FAIL),
        ("状态未知", Result.UNKNOW),
        (" 发送成功 ", Result.SUCCESS),
        ("Unknown", Result.UNKNOW),
        ("UNKNOWN", Result.UNKNOW),
        ("submit_fail", Result.SUBMIT_FAIL),
        ("SUBMIT_FAIL", Result.SUBMIT_FAIL),
    ],
)
def test_normalize_result_accepts_aliases(raw: str, expected: Result) -> None:
    assert normalize_result(raw) is expected


@pytest.mark.parametrize(
    "raw", ["", "   ", "Succes", "Delivered", "Failed", "成功", "Success!", "Unk now", "None"]
)
def test_normalize_result_refuses_unknown_strings_naming_them(raw: str) -> None:
    with pytest.raises(ValueError, match="ReceiptResult") as info:
        normalize_result(raw)
    assert repr(raw) in str(info.value)


@given(st.text(max_size=20))
def test_normalize_result_either_maps_to_a_result_or_names_the_value(raw: str) -> None:
    known = {r.value.lower() for r in Result} | {"unknown", "submit_fail"}
    known |= {"发送成功", "发送失败", "状态未知", "提交失败"}
    if raw.strip().lower() not in known:
        with pytest.raises(ValueError, match="ReceiptResult") as info:
            normalize_result(raw)
        assert repr(raw) in str(info.value)
        return
    result = normalize_result(raw)
    assert isinstance(result, Result)
    # Idempotent: the normalized spelling normalizes to itself.
    assert normalize_result(result.value) is result


# --- phone_key -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling", ["(852)55311111", "+852 5531 1111", "0085255311111", "85255311111", "852-5531-1111"]
)
def test_phone_key_matches_phones_on_their_digits(spelling: str) -> None:
    assert phone_key(spelling) == "85255311111"


def test_phone_key_keeps_distinct_numbers_distinct() -> None:
    assert phone_key("(852)55311111") != phone_key("(852)55311112")
    assert phone_key("+1 555 0100") != phone_key("+44 555 0100")


@given(st.text(alphabet="0123456789+()- ", max_size=25))
def test_phone_key_is_the_digits_without_an_international_00(phone: str) -> None:
    digits = "".join(ch for ch in phone if ch.isdigit())
    expected = digits[2:] if digits.startswith("00") else digits
    assert phone_key(phone) == expected
    assert phone_key("+" + expected) == phone_key("00" + expected) == expected


@given(st.text(max_size=25) | st.from_regex(r"\+?[0-9\u0660-\u0669\u00b2]{0,20}", fullmatch=True))
def test_phone_key_fast_paths_agree_with_the_regex(phone: str) -> None:
    """Bare digits and +digits skip the regex; any text gives what the regex alone gives, with
    every Unicode decimal digit (category Nd, what ``\\d`` matches) written in ASCII."""
    digits = "".join(str(unicodedata.decimal(ch)) for ch in re.findall(r"\d", phone))
    assert phone_key(phone) == (digits[2:] if digits.startswith("00") else digits)


# --- should_replace: every (old, new, time order) --------------------------------------------

ORDERS = ["older", "equal", "newer", "new_unknown", "old_unknown", "both_unknown"]


def _times(order: str) -> tuple[datetime | None, datetime | None]:
    return {
        "older": (T0, T0 - SECOND),
        "equal": (T0, T0),
        "newer": (T0, T0 + SECOND),
        "new_unknown": (T0, None),
        "old_unknown": (None, T0),
        "both_unknown": (None, None),
    }[order]


def _contract_says_replace(old: str, new: str, order: str) -> bool:
    """The documented rule: a final receipt is never overwritten by a non-final one, nor by an
    older one. Beyond it, the module's documented choices: a final receipt replaces a non-final
    one whatever their times; between two of the same kind, a receipt without a time never
    replaces one with a time, a timed one replaces a timeless one, and otherwise anything not
    known to be older (equal times, or both unknown) is the later observation and wins."""
    old_final, new_final = old in DOCUMENTED_FINAL, new in DOCUMENTED_FINAL
    if old_final != new_final:
        return new_final
    return order not in ("older", "new_unknown")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("new", ALL_RESULTS)
@pytest.mark.parametrize("old", ALL_RESULTS)
def test_should_replace_every_pair_and_time_order(old: str, new: str, order: str) -> None:
    old_time, new_time = _times(order)
    old_version = ReceiptVersion(result=old, receipt_time=old_time)
    new_version = ReceiptVersion(result=new, receipt_time=new_time)
    assert should_replace(old_version, new_version) is _contract_says_replace(old, new, order)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("old", FINALS)
def test_a_final_receipt_is_never_overwritten_by_a_non_final_one(old: str, order: str) -> None:
    old_time, new_time = _times(order)
    stored = ReceiptVersion(result=old, receipt_time=old_time)
    assert not should_replace(stored, ReceiptVersion(result="Unknow", receipt_time=new_time))


@pytest.mark.parametrize("new", ALL_RESULTS)
@pytest.mark.parametrize("old", FINALS)
def test_a_final_receipt_is_never_overwritten_by_an_older_one(old: str, new: str) -> None:
    stored = ReceiptVersion(result=old, receipt_time=T0)
    assert not should_replace(stored, ReceiptVersion(result=new, receipt_time=T0 - SECOND))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("new", ALL_RESULTS)
def test_anything_replaces_nothing(new: str, order: str) -> None:
    _, new_time = _times(order)
    assert should_replace(None, ReceiptVersion(result=new, receipt_time=new_time))


@pytest.mark.parametrize("result", ALL_RESULTS)
def test_the_same_answer_twice_is_a_no_op_in_effect(result: str) -> None:
    version = ReceiptVersion(result=result, receipt_time=T0)
    assert should_replace(version, version)
    assert pick_latest([version, version]) == version


# --- pick_latest -----------------------------------------------------------------------------


def test_pick_latest_needs_at_least_one_version() -> None:
    with pytest.raises(ValueError, match="at least one"):
        pick_latest([])


def test_pick_latest_single_version() -> None:
    version = ReceiptVersion(result="Unknow", receipt_time=None)
    assert pick_latest(iter([version])) is version


def test_pick_latest_final_beats_later_non_final() -> None:
    final = ReceiptVersion(result="Success", receipt_time=T0)
    later_unknown = ReceiptVersion(result="Unknow", receipt_time=T0 + SECOND)
    assert pick_latest([final, later_unknown]) == final


def test_pick_latest_unknow_and_newer_final_in_any_order() -> None:
    unknown = ReceiptVersion(result="Unknow", receipt_time=T0)
    final = ReceiptVersion(result="Fail", receipt_time=T0 + SECOND)
    assert pick_latest([unknown, final]) == final
    assert pick_latest([final, unknown]) == final


@st.composite
def _distinct_final_versions(draw: st.DrawFn) -> list[ReceiptVersion]:
    offsets = draw(st.lists(st.integers(-(10**9), 10**9), min_size=1, max_size=8, unique=True))
    return [
        ReceiptVersion(
            result=draw(st.sampled_from(FINALS)), receipt_time=T0 + timedelta(microseconds=offset)
        )
        for offset in offsets
    ]


@given(st.data())
def test_pick_latest_final_receipts_with_known_distinct_times_is_order_independent(
    data: st.DataObject,
) -> None:
    versions = data.draw(_distinct_final_versions())
    shuffled = data.draw(st.permutations(versions))
    latest = max(versions, key=lambda v: v.receipt_time or T0)
    assert pick_latest(versions) == latest
    assert pick_latest(shuffled) == latest


@given(st.data())
def test_pick_latest_same_final_result_is_order_independent_whatever_the_times(
    data: st.DataObject,
) -> None:
    # Duplicates of one final result (times equal, unknown or different): the result never depends
    # on the order in which a response lists them.
    result = data.draw(st.sampled_from(FINALS))
    times = data.draw(
        st.lists(
            st.none() | st.integers(-5, 5).map(lambda s: T0 + s * SECOND), min_size=1, max_size=6
        )
    )
    versions = [ReceiptVersion(result=result, receipt_time=t) for t in times]
    shuffled = data.draw(st.permutations(versions))
    assert pick_latest(versions).result == pick_latest(shuffled).result == result


_ANY_TIME = st.none() | st.integers(-3, 3).map(lambda s: T0 + s * SECOND)


@given(st.data())
def test_pick_latest_final_receipts_order_independent_whatever_the_times(
    data: st.DataObject,
) -> None:
    # Contradicting finals with tied or unknown times: the same winner in every order.
    versions = data.draw(
        st.lists(
            st.builds(ReceiptVersion, result=st.sampled_from(FINALS), receipt_time=_ANY_TIME),
            min_size=1,
            max_size=6,
        )
    )
    shuffled = data.draw(st.permutations(versions))
    assert pick_latest(shuffled) == pick_latest(versions)


@given(st.data())
def test_pick_latest_any_receipts_order_independent(data: st.DataObject) -> None:
    versions = data.draw(
        st.lists(
            st.builds(ReceiptVersion, result=st.sampled_from(ALL_RESULTS), receipt_time=_ANY_TIME),
            min_size=1,
            max_size=6,
        )
    )
    shuffled = data.draw(st.permutations(versions))
    winner = pick_latest(versions)
    assert pick_latest(shuffled) == winner
    # The winner is final exactly when some answer was final.
    assert is_final(winner.result) is any(is_final(v.result) for v in versions)


@pytest.mark.parametrize(
    "times",
    [(T0, T0), (None, T0), (T0, None), (None, None)],
    ids=["tie", "none-first", "none-second", "both-none"],
)
def test_pick_latest_contradicting_finals_with_tied_or_unknown_times(
    times: tuple[datetime | None, datetime | None],
) -> None:
    success = ReceiptVersion(result="Success", receipt_time=times[0])
    fail = ReceiptVersion(result="Fail", receipt_time=times[1])
    outcomes = {pick_latest(list(p)) for p in itertools.permutations([success, fail])}
    assert len(outcomes) == 1


@given(st.data())
def test_pick_latest_final_wins_over_unknow_in_any_order(data: st.DataObject) -> None:
    # One response may list an interim Unknow stamped later than the final outcome.
    final = ReceiptVersion(result=data.draw(st.sampled_from(FINALS)), receipt_time=T0)
    unknowns = [
        ReceiptVersion(result="Unknow", receipt_time=t)
        for t in data.draw(st.lists(st.none() | st.integers(-5, 5).map(lambda s: T0 + s * SECOND)))
    ]
    shuffled = data.draw(st.permutations([final, *unknowns]))
    assert pick_latest(shuffled) == final


@pytest.mark.parametrize("old_time", [T0, None])
@pytest.mark.parametrize("new", FINALS)
def test_a_final_receipt_replaces_a_later_stamped_unknow(
    new: str, old_time: datetime | None
) -> None:
    stored = ReceiptVersion(result="Unknow", receipt_time=old_time)
    assert should_replace(stored, ReceiptVersion(result=new, receipt_time=T0 - SECOND))


# --- is_resolved -----------------------------------------------------------------------------

A, B, C = "(852)55311111", "(852)55311112", "(852)55311113"


def _keys(*phones: str) -> list[str]:
    return [phone_key(p) for p in phones]


def test_without_phones_no_receipts_is_not_resolved() -> None:
    assert not is_resolved([], {})


@pytest.mark.parametrize("results", [["Success"], ["Fail", "SubmitFail"], FINALS])
def test_without_phones_all_final_is_resolved(results: list[str]) -> None:
    receipts = {phone_key(f"+852 5531 11{i:02d}"): r for i, r in enumerate(results)}
    assert is_resolved([], receipts)


@pytest.mark.parametrize("results", [["Unknow"], ["Success", "Unknow"], ["Unknow", "Fail"]])
def test_without_phones_any_unknow_is_not_resolved(results: list[str]) -> None:
    receipts = {phone_key(f"+852 5531 11{i:02d}"): r for i, r in enumerate(results)}
    assert not is_resolved([], receipts)


def test_with_phones_no_receipts_is_not_resolved() -> None:
    assert not is_resolved(_keys(A, B), {})


@pytest.mark.parametrize("final", FINALS)
def test_with_phones_all_final_is_resolved(final: str) -> None:
    assert is_resolved(_keys(A, B), {phone_key(A): final, phone_key(B): "Success"})


def test_with_phones_some_unknow_is_not_resolved() -> None:
    assert not is_resolved(_keys(A, B), {phone_key(A): "Success", phone_key(B): "Unknow"})


def test_with_phones_a_missing_phone_is_not_resolved() -> None:
    assert not is_resolved(_keys(A, B), {phone_key(A): "Success"})


def test_receipts_for_untracked_phones_do_not_resolve_a_tracked_one() -> None:
    assert not is_resolved(_keys(A), {phone_key(B): "Success", phone_key(C): "Fail"})


def test_receipts_for_untracked_phones_are_ignored() -> None:
    # An untracked phone still Unknow does not hold the session open.
    assert is_resolved(_keys(A), {phone_key(A): "Fail", phone_key(B): "Unknow"})


def test_phone_spelled_differently_in_the_receipt_still_matches() -> None:
    receipts = {phone_key("+852 5531 1111"): "Success", phone_key("0085255311112"): "Fail"}
    assert is_resolved(_keys(A, B), receipts)


def test_duplicate_tracked_phone_keys_count_once() -> None:
    assert is_resolved(_keys(A, "+852 5531 1111"), {phone_key(A): "Success"})


@given(
    st.dictionaries(st.sampled_from(_keys(A, B, C)), st.sampled_from(ALL_RESULTS), max_size=3),
    st.lists(st.sampled_from(_keys(A, B, C)), max_size=3),
)
def test_is_resolved_matches_the_contract_rule(results: dict[str, str], tracked: list[str]) -> None:
    if tracked:
        expected = all(results.get(k) in DOCUMENTED_FINAL for k in tracked)
    else:
        expected = bool(results) and all(r in DOCUMENTED_FINAL for r in results.values())
    assert is_resolved(tracked, results) is expected
    # Consistent with unresolved_phones: resolved exactly when nothing is unresolved (with phones).
    if tracked:
        assert expected is (unresolved_phones(tracked, results) == [])


# --- settled_by_answer -----------------------------------------------------------------------


def test_an_answer_with_every_tracked_phone_final_settles_the_session() -> None:
    assert settled_by_answer(_keys(A, B), {phone_key(A): "Fail", phone_key(B): "Success"})


def test_an_answer_missing_a_tracked_phone_does_not_settle_it() -> None:
    assert not settled_by_answer(_keys(A, B), {phone_key(A): "Success"})


def test_an_answer_with_a_tracked_phone_unknow_does_not_settle_it() -> None:
    assert not settled_by_answer(_keys(A, B), {phone_key(A): "Success", phone_key(B): "Unknow"})


def test_without_tracked_phones_only_the_stored_rows_can_settle_a_session() -> None:
    # A phone stored Unknow by an earlier poll and absent from this answer holds it open.
    assert not settled_by_answer([], {phone_key(A): "Success"})


_VERSIONS = st.builds(
    ReceiptVersion,
    result=st.sampled_from(ALL_RESULTS),
    receipt_time=st.one_of(st.none(), st.sampled_from([T0 - SECOND, T0, T0 + SECOND])),
)


@given(
    st.dictionaries(st.sampled_from(_keys(A, B, C)), _VERSIONS, max_size=3),
    st.dictionaries(st.sampled_from(_keys(A, B, C)), _VERSIONS, max_size=3),
    st.lists(st.sampled_from(_keys(A, B, C)), max_size=3),
)
def test_a_settling_answer_leaves_the_session_resolved_whatever_was_stored(
    stored: dict[str, ReceiptVersion],
    answer: dict[str, ReceiptVersion],
    tracked: list[str],
) -> None:
    """The poller skips reading back the sessions an answer settles: that is only sound if,
    after the answer is merged under ``should_replace``, the stored rows say resolved too."""
    merged = dict(stored)
    for key, incoming in answer.items():
        if key not in merged or should_replace(merged[key], incoming):
            merged[key] = incoming
    answered = {key: version.result for key, version in answer.items()}
    if settled_by_answer(tracked, answered):
        assert is_resolved(tracked, {key: v.result for key, v in merged.items()})


# --- unresolved_phones -----------------------------------------------------------------------


def test_unresolved_phones_with_tracked_phones_keeps_their_spelling_and_order() -> None:
    receipts = {phone_key("+852 5531 1112"): "Unknow", phone_key(A): "Success"}
    assert unresolved_phones([C, B, A], receipts) == [(C, None), (B, "Unknow")]


def test_unresolved_phones_all_final_is_empty() -> None:
    assert unresolved_phones([A, B], {phone_key(A): "Fail", phone_key(B): "SubmitFail"}) == []


def test_unresolved_phones_ignores_untracked_receipts() -> None:
    assert unresolved_phones([A], {phone_key(A): "Success", phone_key(B): "Unknow"}) == []


def test_unresolved_phones_without_tracked_phones_lists_non_final_receipts() -> None:
    receipts = {phone_key(A): "Success", phone_key(B): "Unknow", phone_key(C): "Fail"}
    assert unresolved_phones([], receipts) == [(phone_key(B), "Unknow")]


def test_unresolved_phones_without_anything_is_empty() -> None:
    # Not resolved either (no receipt came back), but there is no phone to name.
    assert unresolved_phones([], {}) == []
    assert not is_resolved([], {})


def test_unresolved_phones_accepts_iterators() -> None:
    assert unresolved_phones(iter([A]), {}) == [(A, None)]
    assert not is_resolved(iter(_keys(A)), {})


# --- receipts without a time, Unicode digits (issue 13, item 15) ------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [("Success", "Fail"), ("Fail", "Success"), ("Unknow", "Unknow"), ("SubmitFail", "Success")],
)
def test_a_receipt_without_a_time_never_replaces_one_of_the_same_kind_with_a_time(
    old: str, new: str
) -> None:
    """``Success@t`` then ``Fail`` with no time used to end ``Fail`` with no time: the report
    that says less (no time) overwrote the one that said more."""
    stored = ReceiptVersion(result=old, receipt_time=T0)
    assert not should_replace(stored, ReceiptVersion(result=new, receipt_time=None))
    # The other way round, the timed one wins, whatever the order they arrive in.
    timeless = ReceiptVersion(result=new, receipt_time=None)
    assert should_replace(timeless, stored)
    assert pick_latest([stored, timeless]) == pick_latest([timeless, stored]) == stored


def test_a_final_receipt_without_a_time_still_replaces_a_timed_non_final_one() -> None:
    assert should_replace(
        ReceiptVersion(result="Unknow", receipt_time=T0),
        ReceiptVersion(result="Fail", receipt_time=None),
    )


def test_two_timeless_receipts_of_the_same_kind_the_later_observation_wins() -> None:
    first = ReceiptVersion(result="Success", receipt_time=None)
    assert should_replace(first, ReceiptVersion(result="Fail", receipt_time=None))


_SOME_VERSIONS = st.lists(
    st.builds(ReceiptVersion, result=st.sampled_from(ALL_RESULTS), receipt_time=_ANY_TIME),
    min_size=1,
    max_size=6,
)


@given(_SOME_VERSIONS)
def test_no_version_replaces_the_one_pick_latest_chose_unless_they_tie(
    versions: list[ReceiptVersion],
) -> None:
    """pick_latest agrees with should_replace: whatever a later poll brings among the same
    versions, the stored winner gives way only to a version that it would replace in turn
    (an equal under the rule: same kind, and same time or both without one)."""
    winner = pick_latest(versions)
    for version in versions:
        if should_replace(winner, version):
            assert should_replace(version, winner)


@given(
    st.lists(
        st.builds(ReceiptVersion, result=st.sampled_from(ALL_RESULTS), receipt_time=_ANY_TIME),
        min_size=1,
        max_size=6,
    )
)
def test_storing_versions_one_by_one_ends_on_an_equal_of_pick_latest(
    versions: list[ReceiptVersion],
) -> None:
    """Observed poll after poll (each under should_replace, as the upsert guard does) or all
    in one answer (pick_latest), the same versions end on the same result and time, up to a
    tie between contradicting reports."""
    stored = versions[0]
    for version in versions[1:]:
        if should_replace(stored, version):
            stored = version
    winner = pick_latest(versions)
    assert should_replace(stored, winner) and should_replace(winner, stored)


def _digits(ascii_digits: str, zero: int) -> str:
    """``ascii_digits`` written in the decimal digits whose zero is code point ``zero``."""
    return "".join(chr(zero + int(d)) if d.isdigit() else d for d in ascii_digits)


FULL_WIDTH, ARABIC_INDIC, MATH_BOLD = 0xFF10, 0x0660, 0x1D7CE


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        # Full-width, as CJK input methods type them.
        (_digits("85255311111", FULL_WIDTH), "85255311111"),
        ("\uff0b" + _digits("852 5531 1111", FULL_WIDTH), "85255311111"),
        ("(" + _digits("852", FULL_WIDTH) + ")55311111", "85255311111"),
        (_digits("0085255311111", FULL_WIDTH), "85255311111"),
        (_digits("85255311111", ARABIC_INDIC), "85255311111"),
        (_digits("85255311111", MATH_BOLD), "85255311111"),  # outside the BMP
    ],
)
def test_phone_key_writes_every_decimal_digit_in_ascii(spelling: str, expected: str) -> None:
    """A receipt spelling the tracked phone in full-width digits must match it."""
    assert phone_key(spelling) == expected


@given(st.text(alphabet=st.characters(categories=["Nd"]), max_size=20))
def test_phone_key_of_any_decimal_digits_is_ascii(phone: str) -> None:
    key = phone_key(phone)
    assert key.isascii() and key == key.strip() and (key == "" or key.isdigit())
    assert len(key) in (len(phone), len(phone) - 2)


# --- is_repeat: what the history leaves out ------------------------------------------------

_RECEIPT = {
    "result": "Unknow",
    "receipt_code": "UNKNOWN",
    "receipt_desc": "pending",
    "receipt_time": T0,
    "cost_count": 1,
    "user_id": None,
    "phone": "(852)55311111",
    "source": "poll",
}


def test_a_receipt_saying_what_the_stored_one_says_is_a_repeat() -> None:
    same = {**_RECEIPT, "phone": "85255311111", "source": "push"}  # spelling and origin aside
    assert is_repeat(_RECEIPT, same)
    assert is_repeat(_RECEIPT, {**_RECEIPT, "receipt_time": T0.astimezone(timezone(SECOND * 3600))})


@pytest.mark.parametrize(
    ("fact", "other"),
    [
        ("result", "Success"),
        ("receipt_code", "DELIVRD"),
        ("receipt_desc", None),
        ("receipt_time", T0 + SECOND),
        ("receipt_time", None),
        ("cost_count", 2),
        ("user_id", "u1"),
    ],
)
def test_any_other_fact_makes_it_a_change(fact: str, other: object) -> None:
    assert set(RECEIPT_FACTS) >= {fact}
    assert not is_repeat(_RECEIPT, {**_RECEIPT, fact: other})


def test_nothing_stored_means_no_repeat() -> None:
    assert not is_repeat(None, _RECEIPT)
