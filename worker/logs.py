"""What may appear in logs and error texts.

- Phone numbers are masked to their last four digits unless ``RECEIPTS_LOG_PHONES`` is set, so
  that logs shipped elsewhere carry no personal data.
- Secrets carried inside URLs never appear: a Slack-style webhook URL's path is its token
  (``/services/T…/B…/<token>``), a database or broker URL may carry a password. Whatever
  builds an error text from a request to such a URL passes it through :func:`redact_url_in`;
  settings errors and ``repr(settings)`` show :func:`redact_url` or :func:`mask_password`;
  and the workers' log handlers redact the configured ones from every record
  (:class:`ScrubbingFilter`, attached in ``worker/celery.py``).

How the lines look is decided here too: ``RECEIPTS_LOG_FORMAT=json`` makes each one JSON object
(:class:`JsonFormatter`), cleaned by the same filter; and Celery's INFO lines about every tick
(beat sending it, the worker receiving it, its success) are DEBUG lines
(:class:`RoutineTasks`), so that at INFO a tick shows only when it did something.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from worker.domain import phone_key

# A phone as it may appear in a message, in any spelling Uspeedo, senders or Python use:
# 7-20 digits, optionally led by + and broken by spaces, dashes or parentheses
# (``+852 5531-1111``, ``(852)55311111``, ``852-5531-1111``), or a number the API sent as a
# float (``85255310001.0``). Not part of a longer token (hex ids, hostnames, paths, decimal
# numbers, IP addresses), and never an ISO date (``2026-11-30``) or a UUID, whose digits and
# dashes would otherwise read as a phone.
_DATE = r"\d{4}-\d\d-\d\d(?!\d)"
_UUID = r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}(?![0-9a-fA-F])"
_PHONE_IN_TEXT = re.compile(
    rf"""
    (?<![\w./-]) (?<!\d:)               # starts a token (a time's minutes do not)
    \+? \(? (?!{_DATE}) (?!{_UUID}) \d
    (?: [\ ()-]{{0,3}} (?!{_DATE}) \d )+  # digits, at most three separators apart
    (?P<float> \.0+ (?!\d) )?             # 85255310001.0
    (?![\w/-]) (?![.:]\w)                # and ends it (a sentence's full stop may follow)
    """,
    re.VERBOSE,
)
_NOT_DIGITS = re.compile(r"\D")
_MIN_DIGITS, _MAX_DIGITS = 7, 20

# What replaces a secret part of a URL.
REDACTED = "<redacted>"
HIDDEN = "***"
# Query parameters that carry credentials in database and broker URLs (libpq's ``password``,
# kombu's and others' spellings).
_SECRET_QUERY = re.compile(
    r"(?i)([?&;](?:password|passwd|pwd|pass|secret|token|access_key|api_key)=)[^&;#\s'\"]*"
)


def mask_phone(phone: str, *, show: bool = False) -> str:
    # Of a masked session (worker/masking.py) the phone is masked already and the key a
    # keyed hash: shown as stored, not reduced to the digits they happen to contain.
    if show or phone.startswith(("*", "h:")):
        return phone
    digits = phone_key(phone)
    return "*" * max(len(digits) - 4, 0) + digits[-4:]


def _mask_match(match: re.Match[str]) -> str:
    found = match.group(0)
    digits = _NOT_DIGITS.sub(
        "", found[: match.start("float") - match.start()] if match.group("float") else found
    )
    if len(digits) < _MIN_DIGITS:
        return found
    # Longer than any phone: an id written in one piece is left alone, but separated groups
    # may be a phone with numbers around it ("85255311111 2 times"), so they are masked.
    if len(digits) > _MAX_DIGITS and digits == found:
        return found
    return "*" * (len(digits) - 4) + digits[-4:]


def scrub(text: str) -> str:
    """``text`` with every phone-like number masked to its last four digits."""
    return _PHONE_IN_TEXT.sub(_mask_match, text)


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
        # Worked out once: a filter sees every record its handler emits.
        self._replacements = [
            *(pair for url in secret_urls if url.strip() for pair in _secret_parts(url)),
            *((value, REDACTED) for value in sorted(secret_values, key=len, reverse=True) if value),
        ]

    def clean(self, text: str) -> str:
        for secret, replacement in self._replacements:
            if secret in text:
                text = text.replace(secret, replacement)
        return scrub(text) if self.phones else text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a format bug of the caller: the handler reports it
            return True
        cleaned = self.clean(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        # The traceback is formatted by the handler's Formatter after every filter has run, and
        # carries exception messages (a Reject's reason, SQL parameters): format it here, clean
        # it, and leave it where every Formatter looks first (record.exc_text).
        if record.exc_info and not record.exc_text:
            record.exc_text = _format_exception(record.exc_info)
        if record.exc_text:
            record.exc_text = self.clean(record.exc_text)
        if record.stack_info:
            record.stack_info = self.clean(record.stack_info)
        return True


_PLAIN = logging.Formatter()


def _format_exception(exc_info: object) -> str | None:
    """The traceback text a Formatter would print for a record's ``exc_info`` (a tuple, or
    any true value meaning "the exception being handled", as Celery's formatter reads it)."""
    if not isinstance(exc_info, tuple):
        exc_info = sys.exc_info()
    if exc_info[0] is None:
        return None
    return _PLAIN.formatException(exc_info)


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


# --- how lines look ---------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """Each record as one JSON object on one line (``RECEIPTS_LOG_FORMAT=json``): ``time``
    (UTC, ISO 8601), ``level``, ``logger``, ``process``, ``message``, and ``exception`` /
    ``stack`` when the record has them, ``task`` and ``task_id`` inside a Celery task.

    It formats what the handler's :class:`ScrubbingFilter` has cleaned: the message, and the
    traceback the filter formatted and cleaned into ``record.exc_text``. A record's other
    attributes (Celery attaches a task's arguments) are never written."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        task = _current_task()
        if task is not None:
            entry["task"], entry["task_id"] = task
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _current_task() -> tuple[str, str] | None:
    """The Celery task running in this process, as (name, id), or None."""
    celery_state = sys.modules.get("celery._state")
    if celery_state is None:
        return None
    task = celery_state.get_current_task()
    request = getattr(task, "request", None)
    task_id = getattr(request, "id", None)
    if task is None or task_id is None:
        return None
    return str(task.name), str(task_id)


def json_line(message: str, *, level: int = logging.INFO, logger: str = "receipts") -> str:
    """``message`` as :class:`JsonFormatter` writes a log record: for the lines a command
    prints itself before its process logs (a check at start), in a JSON log stream."""
    record = logging.LogRecord(logger, level, "", 0, message, None, None)
    return JsonFormatter().format(record)


class LogSettings(Protocol):
    """What :func:`setup` reads of ``worker.config.Settings`` (which imports this module)."""

    @property
    def log_phones(self) -> bool: ...

    @property
    def log_format(self) -> str: ...

    def secret_urls(self) -> list[str]: ...

    def secret_values(self) -> list[str]: ...


def setup(logger: logging.Logger | None, settings: LogSettings) -> None:
    """Every handler of ``logger`` (default: the root logger) cleans its records as the
    settings say (phones, secrets: :func:`scrub_logs`) and writes them in the settings' format
    (``RECEIPTS_LOG_FORMAT``)."""
    logger = logger or logging.getLogger()
    scrub_logs(
        logger,
        phones=not settings.log_phones,
        secret_urls=settings.secret_urls(),
        secret_values=settings.secret_values(),
    )
    if settings.log_format == "json":
        for handler in logger.handlers:
            if not isinstance(handler.formatter, JsonFormatter):
                handler.setFormatter(JsonFormatter())


# Celery's loggers of a task's routine: beat sending it, the worker receiving it, its success.
ROUTINE_LOGGERS = ("celery.beat", "celery.worker.strategy", "celery.app.trace")


class RoutineTasks(logging.Filter):
    """Moves Celery's INFO lines about ``tasks`` to DEBUG: sent, received and succeeded, three
    lines every tick that said nothing (``{'escalated': 0, 'claims': 0}``). The task logs one
    INFO line itself when it did something; its failures stay ERROR."""

    def __init__(self, tasks: Collection[str]) -> None:
        super().__init__()
        self.tasks = frozenset(tasks)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not self._routine(record.args):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        # The logger let the record through at INFO; at DEBUG it may not.
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)

    def _routine(self, args: Any) -> bool:
        if isinstance(args, Mapping):  # the worker's received and succeeded: a context dict
            return args.get("name") in self.tasks
        # beat's "Sending due task %s (%s)": the entry's name, then the task's
        return isinstance(args, tuple) and len(args) == 2 and args[1] in self.tasks


def quiet_routine_tasks(tasks: Collection[str]) -> None:
    """Attach :class:`RoutineTasks` for ``tasks`` to Celery's loggers, once."""
    for name in ROUTINE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RoutineTasks) for f in logger.filters):
            logger.addFilter(RoutineTasks(tasks))
