"""What may appear in logs: phones masked to their last four digits unless
``RECEIPTS_LOG_PHONES`` is set, so that logs shipped elsewhere carry no personal data."""

from __future__ import annotations

from worker.domain import phone_key


def mask_phone(phone: str, *, show: bool = False) -> str:
    if show:
        return phone
    digits = phone_key(phone)
    return "*" * max(len(digits) - 4, 0) + digits[-4:]
