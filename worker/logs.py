"""What may appear in logs: phone numbers are masked to their last four digits unless
``RECEIPTS_LOG_PHONES`` is set, so that logs shipped elsewhere carry no personal data."""

from __future__ import annotations

import logging
import re

from worker.domain import phone_key

# A phone as it may appear in a message: 7-20 digits, optionally led by + and broken by
# spaces or parentheses, not part of a longer token (hex ids, ISO dates with dashes, times).
_PHONE_IN_TEXT = re.compile(r"(?<![\w.:/-])\+?(?:\(?\d[\d ()]{5,24}\d)(?![\w.:/-])")
_MIN_DIGITS = 7


def mask_phone(phone: str, *, show: bool = False) -> str:
    if show:
        return phone
    digits = phone_key(phone)
    return "*" * max(len(digits) - 4, 0) + digits[-4:]


def scrub(text: str) -> str:
    """``text`` with every phone-like number masked to its last four digits."""

    def mask(match: re.Match[str]) -> str:
        found = match.group(0)
        return mask_phone(found) if len(phone_key(found)) >= _MIN_DIGITS else found

    return _PHONE_IN_TEXT.sub(mask, text)


class PhoneMaskingFilter(logging.Filter):
    """Masks phone numbers in every record that passes the handler it is attached to,
    whoever logged it (our code, Celery, urllib3)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = scrub(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def mask_phones_in_logs(logger: logging.Logger | None = None) -> None:
    """Attach the filter to every handler of ``logger`` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, PhoneMaskingFilter) for f in handler.filters):
            handler.addFilter(PhoneMaskingFilter())
