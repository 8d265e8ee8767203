"""The pure rules of masking (worker/masking.py): the masked form of a phone, the keyed hash of
its digits, the masking of escalation detail and free text; and the settings that turn it on."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.config import load_settings
from worker.domain import phone_key
from worker.errors import SettingsError
from worker.masking import HASH_PREFIX, PhoneHash, is_hashed, masked_detail, masked_phone

KEY = "k" * 32


def wide(digits: str) -> str:
    """``digits`` in full-width digits (U+FF10 to U+FF19), as CJK input methods type them."""
    return digits.translate({ord(d): 0xFF10 + int(d) for d in "0123456789"})


HASH = PhoneHash.of(KEY)


@pytest.mark.parametrize(
    ("phone", "masked"),
    [
        ("(852)55311111", "*******1111"),
        ("+852 5531 1112", "*******1112"),
        ("0085255311113", "*******1113"),
        ("85255311114", "*******1114"),
        # Full-width digits are the same phone (domain.phone_key).
        (wide("85255311115"), "*******1115"),
        # Always a star: a masked form is recognisable, and masking it again keeps it.
        ("1234", "*1234"),
        ("00123", "*123"),
    ],
)
def test_masked_phone_keeps_the_last_four_digits(phone: str, masked: str) -> None:
    assert masked_phone(phone) == masked


@given(st.from_regex(r"\+?[0-9 ()\-]{5,30}", fullmatch=True))
def test_masking_twice_changes_nothing(phone: str) -> None:
    once = masked_phone(phone)
    assert masked_phone(once) == once
    digits = phone_key(phone)
    assert once.endswith(digits[-4:])
    # No more than the last four digits survive.
    assert sum(ch.isdigit() for ch in once) == min(len(digits), 4)


def test_the_hash_is_hmac_sha256_of_the_digits_prefixed_with_the_key_id() -> None:
    expected = hmac.new(KEY.encode(), b"85255311111", hashlib.sha256).hexdigest()
    key_id = hmac.new(KEY.encode(), b"uspeedo-receipts key id", hashlib.sha256).hexdigest()[:8]
    assert HASH("85255311111") == f"{HASH_PREFIX}{key_id}:{expected}"
    assert is_hashed(HASH("85255311111"))
    assert not is_hashed("85255311111")
    assert HASH.made(HASH("85255311111"))
    assert not PhoneHash.of("o" * 32).made(HASH("85255311111"))


def test_the_hash_matches_every_spelling_of_a_phone_and_only_it() -> None:
    spellings = ("(852)55311111", "+852 5531 1111", "0085255311111", wide("85255311111"))
    assert len({HASH(phone_key(p)) for p in spellings}) == 1
    assert HASH(phone_key("(852)55311112")) != HASH(phone_key("(852)55311111"))


def test_the_hash_depends_on_the_key_and_is_never_hashed_twice() -> None:
    other = PhoneHash.of("o" * 32)
    assert other("85255311111") != HASH("85255311111")
    hashed = HASH("85255311111")
    assert HASH(hashed) == hashed
    assert KEY not in repr(HASH)
    assert KEY not in str(HASH)


@given(st.text(alphabet="0123456789", min_size=5, max_size=20))
def test_a_hashed_key_is_never_digits(digits: str) -> None:
    hashed = HASH(digits)
    assert not hashed.isdecimal()
    assert hashed != digits


def test_escalation_detail_and_payload_lose_their_phones() -> None:
    detail = {
        "phones": [
            {"phone": "(852)55311111", "last_result": "Unknow"},
            {"phone": "85255311112", "last_result": None},
        ],
        "poll_count": 3,
        "last_error": "phone (852)55311111 refused",
    }
    assert masked_detail(detail, ()) == {
        "phones": [
            {"phone": "*******1111", "last_result": "Unknow"},
            {"phone": "*******1112", "last_result": None},
        ],
        "poll_count": 3,
        "last_error": "phone *******1111 refused",
    }
    payload = {
        "session_no": "S-85255311111",
        "unresolved_phones": [{"phone": "(852)55311111", "last_result": "Unknow"}],
        "text": "Uspeedo session S of account 1: (852)55311111 (Unknow), +852 5531 1113 (x).",
    }
    masked = masked_detail(payload, {"+852 5531 1113"})
    assert masked["unresolved_phones"] == [{"phone": "*******1111", "last_result": "Unknow"}]
    assert (
        masked["text"] == "Uspeedo session S of account 1: *******1111 (Unknow), *******1113 (x)."
    )
    # Only phones are touched: a SessionNo that looks like one is an identifier.
    assert masked["session_no"] == "S-85255311111"
    assert masked_detail(masked, ()) == masked
    assert masked_detail(None, ()) is None


# --- settings ------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("RECEIPTS_") and not key.startswith("RECEIPTS_TEST_"):
            monkeypatch.delenv(key)
    return monkeypatch


def _error(monkeypatch: pytest.MonkeyPatch, **values: str) -> str:
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    return str(info.value)


def test_masking_is_off_by_default(clean_env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.mask_phones_after is None
    assert settings.phone_hash_key is None


def test_masking_needs_the_hash_key(clean_env: pytest.MonkeyPatch) -> None:
    error = _error(clean_env, RECEIPTS_MASK_PHONES_AFTER="30d")
    assert "RECEIPTS_MASK_PHONES_AFTER needs RECEIPTS_PHONE_HASH_KEY" in error
    # One problem, one line under the heading.
    assert len(error.splitlines()) == 2


def test_a_short_hash_key_is_refused_and_never_shown(clean_env: pytest.MonkeyPatch) -> None:
    error = _error(clean_env, RECEIPTS_PHONE_HASH_KEY="short-s3cret-9876")
    assert "RECEIPTS_PHONE_HASH_KEY" in error
    assert "at least 32 characters" in error
    assert "short-s3cret-9876" not in error


def test_the_masking_age_must_pass_the_cutoff(clean_env: pytest.MonkeyPatch) -> None:
    error = _error(
        clean_env,
        RECEIPTS_MASK_PHONES_AFTER="12h",
        RECEIPTS_CUTOFF="12h",
        RECEIPTS_PHONE_HASH_KEY=KEY,
    )
    assert "must be longer than RECEIPTS_CUTOFF" in error


def test_masking_settings_are_read(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("RECEIPTS_MASK_PHONES_AFTER", "30d")
    clean_env.setenv("RECEIPTS_PHONE_HASH_KEY", KEY)
    settings = load_settings()
    assert settings.mask_phones_after is not None
    assert settings.mask_phones_after.days == 30
    assert settings.phone_hash_key is not None
    assert settings.phone_hash_key.get_secret_value() == KEY
    # Never in a log line, never in a repr.
    assert KEY in settings.secret_values()
    assert KEY not in repr(settings)
