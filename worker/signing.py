"""The two signatures the worker computes: Uspeedo's on our API requests, ours on our webhooks.

Uspeedo requests: the signature is the lowercase hex SHA-1 of the body's canonical string
followed by the AccessKeySecret. The canonical string writes the body's keys in ascending ASCII
order, each as key then value with no separators; arrays are their elements' canonical strings
concatenated; nested objects are their own sorted key+value strings; booleans are
``true``/``false``; numbers are plain decimals (a float with a zero fraction drops it).

Webhooks (escalations and events): ``X-Receipts-Signature: t=<unix seconds>,v1=<hex>``, the
HMAC-SHA256 with ``RECEIPTS_WEBHOOK_SECRET`` of ``"<t>.<raw body>"``. The timestamp is signed
with the body, so a receiver that refuses a ``t`` too far from its own clock (the README's
snippet allows 300 s) refuses a captured request replayed later, and no one can move ``t``
without the secret. Each attempt is signed afresh: a retry carries its own ``t``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

NONCE_LENGTH = 32


def canonical(value: Any) -> str:
    """Canonical string of one JSON value, as Uspeedo's servers rebuild it."""
    if isinstance(value, Mapping):
        return "".join(f"{key}{canonical(value[key])}" for key in sorted(value, key=str))
    if isinstance(value, list | tuple):
        return "".join(canonical(item) for item in value)
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if value is None:
        # JSON null has no documented form; the official SDKs drop null fields before signing,
        # so we never send one (see client.py) and refuse to guess here.
        raise ValueError("cannot sign a null value; drop the field instead")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot sign a non-finite number: {value!r}")
        if value.is_integer():
            return str(int(value))
        # Decimal(repr()) keeps the shortest round-trip form and never uses exponent notation.
        return format(Decimal(repr(value)), "f")
    if isinstance(value, str):
        return value
    raise TypeError(f"cannot sign a value of type {type(value).__name__}")


def signature(body: Mapping[str, Any], secret: str) -> str:
    """X-Signature for a request body."""
    digest = hashlib.sha1((canonical(body) + secret).encode("utf-8"), usedforsecurity=False)
    return digest.hexdigest()


def new_nonce() -> str:
    """A fresh random nonce (at most 32 characters, as the API requires)."""
    return secrets.token_hex(NONCE_LENGTH // 2)


WEBHOOK_SIGNATURE_HEADER = "X-Receipts-Signature"


def webhook_signature(body: bytes, secret: str, *, timestamp: int) -> str:
    """The ``X-Receipts-Signature`` value of a webhook whose raw body is ``body``, signed at
    ``timestamp`` (unix seconds, from the caller's clock: signing reads none)."""
    signed = f"{timestamp}.".encode() + body
    return f"t={timestamp},v1={hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()}"
