"""What may appear in logs and error texts.

- Phone numbers are masked to their last four digits unless ``RECEIPTS_LOG_PHONES`` is set, so
  that logs shipped elsewhere carry no personal data.
- Secrets carried inside URLs never appear: a Slack-style webhook URL's path is its token
  (``/services/T…/B…/<token>``), a database or broker URL may carry a password. Whatever
  builds an error text from a request to such a URL passes it through :func:`redact_url_in`;
  settings errors and ``repr(settings)`` show :func:`redact_url` or :func:`mask_password`;
  and the workers' log handlers redact the configured ones from every record
  (:class:`ScrubbingFilter`, attached in ``worker/celery.py``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from worker.domain import phone_key

# A phone as it may appear in a message: 7-20 digits, optionally led by + and broken by
# spaces or parentheses, not part of a longer token (hex ids, ISO dates with dashes, times).
_PHONE_IN_TEXT = re.compile(r"(?<![\w.:/-])\+?(?:\(?\d[\d ()]{5,24}\d)(?![\w.:/-])")
_MIN_DIGITS = 7

# What replaces a secret part of a URL.
REDACTED = "<redacted>"
HIDDEN = "***"
# Query parameters that carry credentials in database and broker URLs (libpq's ``password``,
# kombu's and others' spellings).
_SECRET_QUERY = re.compile(
    r"(?i)([?&;](?:password|passwd|pwd|pass|secret|token|access_key|api_key)=)[^&;#\s'\"]*"
)


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


# --- URLs -------------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, followed by a marker when the URL had a path, query,
    fragment or user info (any of which may be its secret); the marker alone when ``url`` has no
    recognisable host."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return REDACTED
    host = parts.netloc.rpartition("@")[2]
    if not parts.scheme or not host:
        return REDACTED
    if "@" in parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"{parts.scheme}://{host}/{REDACTED}"
    return url.strip()


def _prepared(url: str) -> str | None:
    """``url`` as ``requests`` sends it (percent-encoded, dot segments removed), or None."""
    from requests import PreparedRequest, RequestException

    request = PreparedRequest()
    try:
        request.prepare_url(url, None)
    except (RequestException, ValueError, UnicodeError):
        return None
    return request.url


def _secret_parts(url: str) -> list[tuple[str, str]]:
    """The spellings under which ``url``'s secrets can show up in an error text, each with its
    replacement: the URL itself, raw and as ``requests`` prepares it, and its user info, path
    and query alone (urllib3 names the path and query in "Max retries exceeded with url: …",
    an error page may echo them). Longest first, so that a URL is replaced before its path."""
    url = url.strip()
    shown = redact_url(url)
    found: dict[str, str] = {}
    for spelling in filter(None, (url, _prepared(url))):
        found[spelling] = shown
        try:
            parts = urlsplit(spelling)
        except ValueError:
            continue
        userinfo = parts.netloc.rpartition("@")[0]
        path_query = parts.path + (f"?{parts.query}" if parts.query else "")
        for part in (userinfo, parts.path, path_query, parts.query):
            if part and part != "/":
                found.setdefault(part, REDACTED)
    return sorted(found.items(), key=lambda item: len(item[0]), reverse=True)


def redact_url_in(text: str, url: str) -> str:
    """``text`` without any secret part of ``url`` (see :func:`redact_url`)."""
    if not url.strip():
        return text
    for part, replacement in _secret_parts(url):
        text = text.replace(part, replacement)
    return text


def mask_password(url: str) -> str:
    """``url`` with its password replaced by ``***``; the rest (scheme, user, host, database)
    stays readable. Works on mistyped URLs too (``postgresql//u:pw@h/db``), where a parser
    would fail: the password is whatever follows the first ``:`` of the user info, which ends
    at the last ``@``. Password-like query parameters are masked as well."""
    head, at, tail = url.rpartition("@")
    if at:
        if "//" in head:
            start = head.index("//") + 2
        elif ":" in head:
            start = head.index(":") + 1
        else:
            start = 0
        user, colon, _password = head[start:].partition(":")
        if colon:
            head = f"{head[:start]}{user}:{HIDDEN}"
        url = f"{head}@{tail}"
    return _SECRET_QUERY.sub(rf"\g<1>{HIDDEN}", url)


# --- log records ------------------------------------------------------------------------------


class ScrubbingFilter(logging.Filter):
    """Cleans every record that passes the handler it is attached to, whoever logged it (our
    code, Celery, urllib3): the secret parts of ``secret_urls`` and the ``secret_values`` are
    redacted, and with ``phones`` phone numbers are masked."""

    def __init__(
        self,
        *,
        phones: bool = True,
        secret_urls: Iterable[str] = (),
        secret_values: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.phones = phones
        self.secret_urls = [u for u in secret_urls if u]
        self.secret_values = sorted((v for v in secret_values if v), key=len, reverse=True)

    def clean(self, text: str) -> str:
        for url in self.secret_urls:
            text = redact_url_in(text, url)
        for value in self.secret_values:
            text = text.replace(value, REDACTED)
        return scrub(text) if self.phones else text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.clean(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def scrub_logs(
    logger: logging.Logger | None = None,
    *,
    phones: bool = True,
    secret_urls: Iterable[str] = (),
    secret_values: Iterable[str] = (),
) -> None:
    """Attach a :class:`ScrubbingFilter` to every handler of ``logger`` (default: the root
    logger) that has none yet."""
    urls, values = list(secret_urls), list(secret_values)
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, ScrubbingFilter) for f in handler.filters):
            handler.addFilter(
                ScrubbingFilter(phones=phones, secret_urls=urls, secret_values=values)
            )
