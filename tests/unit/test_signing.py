"""Signatures: Uspeedo's request signing (the published test vector and the canonical-string
rules around it), and our webhooks' timestamped HMAC."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.signing import NONCE_LENGTH, canonical, new_nonce, signature, webhook_signature

VECTOR_BODY = {"Action": "GetUSMSSendReceipt", "AccountId": 1, "SessionNoSet": ["a", "b"]}
VECTOR_CANONICAL = "AccountId1ActionGetUSMSSendReceiptSessionNoSetab"
VECTOR_SIGNATURE = "8038aa1907f0f47dde822123cbfae9a0a4585408"


def test_contract_test_vector() -> None:
    assert canonical(VECTOR_BODY) == VECTOR_CANONICAL
    assert (
        canonical(VECTOR_BODY) + "secret"
        == "AccountId1ActionGetUSMSSendReceiptSessionNoSetabsecret"
    )
    assert signature(VECTOR_BODY, "secret") == VECTOR_SIGNATURE


def test_signature_is_lowercase_hex_sha1_of_canonical_plus_secret() -> None:
    body = {"Action": "X", "AccountId": 7}
    expected = hashlib.sha1(b"AccountId7ActionXk3y", usedforsecurity=False).hexdigest()
    assert signature(body, "k3y") == expected
    assert expected == expected.lower()


def test_signature_survives_a_json_round_trip() -> None:
    # The server signs what it decodes, so the signature must not depend on our dict's origin.
    wire = json.dumps(VECTOR_BODY, separators=(",", ":"))
    assert signature(json.loads(wire), "secret") == VECTOR_SIGNATURE


def test_keys_sorted_by_ascii_not_by_case() -> None:
    # Uppercase sorts before lowercase in ASCII.
    assert canonical({"b": 1, "B": 2, "a": 3, "A": 4}) == "A4B2a3b1"


def test_nested_objects_are_sorted_and_have_no_separators() -> None:
    body = {"Z": {"y": 1, "x": {"b": "2", "a": "1"}}, "A": [{"k2": "v2", "k1": "v1"}, "s"]}
    assert canonical(body) == "Ak1v1k2v2sZxa1b2y1"


def test_arrays_concatenate_elements_without_indices() -> None:
    assert canonical({"L": ["a", 1, True, [2, 3]]}) == "La1true23"
    assert canonical({"L": []}) == "L"


def test_booleans_are_lowercase() -> None:
    assert canonical({"T": True, "F": False}) == "FfalseTtrue"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, "1"),
        (-2.0, "-2"),
        (0.0, "0"),
        (1.5, "1.5"),
        (0.1, "0.1"),
        (1e-7, "0.0000001"),
        (123456789.125, "123456789.125"),
        (1e20, "100000000000000000000"),
        (10, "10"),
        (-3, "-3"),
    ],
)
def test_numbers_in_plain_decimal(value: float, expected: str) -> None:
    assert canonical(value) == expected
    assert "e" not in canonical(value).lower()


def test_strings_are_not_escaped() -> None:
    assert canonical({"M": 'a"b\\c\n你好'}) == 'Ma"b\\c\n你好'


@pytest.mark.parametrize("bad", [None, {"A": None}, [1, None]])
def test_null_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="null"):
        canonical(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        canonical({"X": bad})


def test_unknown_types_are_refused() -> None:
    with pytest.raises(TypeError):
        canonical({"X": object()})


_json_scalars = (
    st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=6), _json_values, max_size=8), st.randoms())
def test_canonical_ignores_insertion_order(body: dict[str, Any], rnd: random.Random) -> None:
    items = list(body.items())
    rnd.shuffle(items)
    assert canonical(dict(items)) == canonical(body)
    assert signature(dict(items), "s") == signature(body, "s")


def test_nonce_is_short_random_and_unique() -> None:
    nonces = [new_nonce() for _ in range(2000)]
    assert all(0 < len(n) <= 32 for n in nonces)
    assert NONCE_LENGTH <= 32
    assert len(set(nonces)) == len(nonces)
    # Header-safe: nothing that would need quoting.
    assert all(n.isascii() and n.isalnum() for n in nonces)


# --- webhook signatures ---------------------------------------------------------------------

WEBHOOK_BODY = b'{"event":"session.escalated"}'
WEBHOOK_SECRET = "whsec-test-vector-0123"
WEBHOOK_T = 1764504000
# Computed apart from Python: printf '1764504000.{"event":"session.escalated"}' |
#   openssl dgst -sha256 -hmac whsec-test-vector-0123
WEBHOOK_HMAC = "c46d8161f1fbff994b7e51f4d88db798231464e411ddc40b767339433b7db9e8"


def test_webhook_signature_vector_computed_by_openssl() -> None:
    assert webhook_signature(WEBHOOK_BODY, WEBHOOK_SECRET, timestamp=WEBHOOK_T) == (
        f"t={WEBHOOK_T},v1={WEBHOOK_HMAC}"
    )


def test_webhook_signature_covers_the_timestamp_the_body_and_the_secret() -> None:
    base = webhook_signature(WEBHOOK_BODY, WEBHOOK_SECRET, timestamp=WEBHOOK_T)
    variants = [
        # A replay with a fresh t needs a new HMAC, which takes the secret.
        webhook_signature(WEBHOOK_BODY, WEBHOOK_SECRET, timestamp=WEBHOOK_T + 1),
        webhook_signature(WEBHOOK_BODY + b" ", WEBHOOK_SECRET, timestamp=WEBHOOK_T),
        webhook_signature(WEBHOOK_BODY, WEBHOOK_SECRET + "x", timestamp=WEBHOOK_T),
    ]
    macs = {v.partition(",v1=")[2] for v in [base, *variants]}
    assert len(macs) == 4


@given(st.binary(max_size=64), st.integers(min_value=0, max_value=2**40))
def test_webhook_signature_is_t_then_v1_lowercase_hex(body: bytes, timestamp: int) -> None:
    header = webhook_signature(body, "s" * 16, timestamp=timestamp)
    t_field, v1_field = header.split(",")
    assert t_field == f"t={timestamp}"
    mac = v1_field.removeprefix("v1=")
    assert len(mac) == 64 and mac == mac.lower() and int(mac, 16) >= 0
