"""Settings: one typed object read from ``RECEIPTS_*`` environment variables and validated at
start-up, so that a mistake is reported once, clearly, instead of surfacing mid-poll."""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from functools import lru_cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.domain import DEFAULT_EVENT_TYPES, EventDestination, EventType
from worker.errors import SettingsError
from worker.logs import mask_password, redact_url
from worker.receipts import DEFAULT_MAX_ANSWER_BYTES
from worker.schedule import PollPolicy

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> timedelta:
    """Plain seconds (``300``, ``2.5``) or unit forms (``5m``, ``12h``, ``1h30m``, ``500ms``)."""
    if isinstance(value, timedelta):
        if value <= timedelta(0):
            raise ValueError(f"{value!r}: a duration must be positive")
        return value
    seconds = _seconds(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if seconds <= 0:
        raise ValueError(f"{value!r}: a duration must be positive")
    try:
        duration = timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"{value!r} is too long a duration") from None
    if duration <= timedelta(0):
        raise ValueError(f"{value!r} is shorter than a microsecond")
    return duration


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{value!r} is not a duration: use seconds (300) or a form like 5m, 12h")
    if not isinstance(value, str):
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"{value!r} is too long a duration") from None
    text = value.strip().lower()
    try:
        return float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or _DURATION_PART.sub("", text).strip():
            raise ValueError(
                f"{value!r} is not a duration: use seconds (300) or a form like 5m, 12h, 1h30m"
            ) from None
        return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _shown(duration: timedelta) -> str:
    """A duration as a person would write it: ``30d``, ``1h``, ``4m``, ``3.05s``."""
    seconds = duration.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.15g}s"


def _at_most(maximum: timedelta) -> AfterValidator:
    def check(value: timedelta) -> timedelta:
        if value > maximum:
            raise ValueError(f"{_shown(value)} is longer than the maximum, {_shown(maximum)}")
        return value

    return AfterValidator(check)


# Celery's limits for every task (worker/celery.py applies them): a poll must record its answer
# before the soft limit interrupts it.
TASK_TIME_LIMIT = 300
TASK_SOFT_TIME_LIMIT = 240
# What a poll needs after its last API attempt to record the answer (its database retries last
# about ten seconds), inside TASK_SOFT_TIME_LIMIT.
ANSWER_ROOM = timedelta(seconds=30)

# Every duration has a maximum (README "Settings"), so that the datetime arithmetic the worker
# does with it stays in range: RECEIPTS_CUTOFF=1000000d once passed and then every tick died
# with OverflowError. The schedule is bounded by a month, which nobody needs to exceed for an
# SMS receipt; the clock must tick at least hourly for escalations to be timely; one HTTP
# attempt must fit in the task's time limit (and a poll as a whole: see _consistent).
MAX_SCHEDULE = timedelta(days=30)
MAX_TICK = timedelta(hours=1)
MAX_CLAIM_LEASE = timedelta(days=1)
MAX_HTTP = timedelta(seconds=TASK_SOFT_TIME_LIMIT)
MAX_WEBHOOK_TIMEOUT = timedelta(minutes=1)
MAX_EXPORTER_TOTALS_INTERVAL = timedelta(days=1)
# Retention beyond a century is keeping everything: unset it.
MAX_RETENTION = timedelta(days=36500)

Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
ScheduleDuration = Annotated[timedelta, BeforeValidator(parse_duration), _at_most(MAX_SCHEDULE)]
TickDuration = Annotated[timedelta, BeforeValidator(parse_duration), _at_most(MAX_TICK)]
LeaseDuration = Annotated[timedelta, BeforeValidator(parse_duration), _at_most(MAX_CLAIM_LEASE)]
HttpDuration = Annotated[timedelta, BeforeValidator(parse_duration), _at_most(MAX_HTTP)]
WebhookDuration = Annotated[
    timedelta, BeforeValidator(parse_duration), _at_most(MAX_WEBHOOK_TIMEOUT)
]
RetentionDuration = Annotated[timedelta, BeforeValidator(parse_duration), _at_most(MAX_RETENTION)]
TotalsDuration = Annotated[
    timedelta, BeforeValidator(parse_duration), _at_most(MAX_EXPORTER_TOTALS_INTERVAL)
]

# RECEIPTS_WEBHOOK_SECRET: a key shorter than this is guessable from signed requests.
MIN_WEBHOOK_SECRET = 16
# RECEIPTS_PHONE_HASH_KEY: 32 characters, e.g. 16 random bytes in hex, or more.
MIN_PHONE_HASH_KEY = 32
# RECEIPTS_CALLBACK_TOKEN: the push is unsigned, so its URL's secret is all that keeps a
# stranger from pushing receipts; 24 characters of a random token are not guessable.
MIN_CALLBACK_TOKEN = 24
# What the worker's SQL is written for (ON CONFLICT, JSON functions, psycopg 3).
SUPPORTED_DATABASES = ("postgresql", "postgres", "postgresql+psycopg", "sqlite", "sqlite+pysqlite")

_SIZE = re.compile(r"(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?")
_UNIT_BYTES = {
    None: 1,
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_size(value: Any) -> int:
    """Plain bytes (``1048576``) or unit forms (``500KB``, ``32MiB``, ``1GiB``)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a size: use bytes (1048576) or a form like 32MiB")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value.strip().lower())
        if match is None:
            raise ValueError(f"{value!r} is not a size: use bytes (1048576) or a form like 32MiB")
        size = int(match.group(1)) * _UNIT_BYTES[match.group(2)]
    if size < 1:
        raise ValueError(f"{value!r}: a size must be positive")
    return size


Size = Annotated[int, BeforeValidator(parse_size)]

DEFAULT_API_URL = "https://api.uspeedo.com/api"


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_http_url(name: str, value: str, *, shown: Callable[[str], str]) -> str:
    """``value`` if it is an http(s) URL with a host; the error shows it through ``shown``
    (which hides its secrets)."""
    try:
        parts = urlsplit(value)
        scheme, host = parts.scheme, parts.hostname
    except ValueError:
        scheme, host = "", None
    if scheme not in ("http", "https") or not host:
        raise ValueError(f"{name} must be an http(s) URL with a host, got {shown(value)!r}")
    return value


# How each URL setting is shown in errors and in repr(settings): a database, broker or API URL
# may carry a password; the whole path and query of a webhook URL can be its secret.
_URL_SHOWN: dict[str, Callable[[str], str]] = {
    "database_url": mask_password,
    "broker_url": mask_password,
    "api_url": mask_password,
    "escalation_webhook_url": redact_url,
    "events_webhook_url": redact_url,
}


MIN_SQLITE = (3, 35, 0)


class Settings(BaseSettings):
    """Every setting of README "Settings"; durations accept seconds or forms like ``5m``."""

    # hide_input_in_errors: pydantic's own error text would echo every input value (a database
    # password, a webhook token) when Settings(...) is called directly.
    model_config = SettingsConfigDict(
        env_prefix="RECEIPTS_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    # --- storage and transport
    database_url: str = "sqlite:///receipts.db"
    # None means the embedded broker: kombu's filesystem transport, no server needed.
    broker_url: str | None = None
    broker_dir: str = "receipts-broker"

    # --- the Uspeedo API
    api_url: str = DEFAULT_API_URL
    # Plain http:// is refused for any host but this machine's (the simulator), unless this
    # says the network in between is trusted (the docker-compose demo's simulator).
    api_allow_http: bool = False
    access_key_id: str | None = None
    access_key_secret: SecretStr | None = None
    api_connect_timeout: HttpDuration = timedelta(seconds=3.05)
    api_read_timeout: HttpDuration = timedelta(seconds=10)
    api_max_attempts: int = Field(default=3, ge=1, le=10)
    # The AccountId (project id) `receipts check` and the start of a worker ask under; unset,
    # the check uses a placeholder (worker/check.py).
    check_account_id: int | None = Field(default=None, ge=1)
    # Past this an answer is refused unread (worker/receipts.py: what an answer weighs);
    # at least 64 KiB, so that a single session's answer always fits.
    api_max_answer_bytes: Size = Field(default=DEFAULT_MAX_ANSWER_BYTES, ge=64 * 1024)
    # One poll stops retrying the API after this; with the timeouts it bounds how long a
    # poll can be in flight, which is how long its sessions are held against a second poll.
    # Bounded with the timeouts by the task's time limit (see _consistent).
    poll_budget: Duration = timedelta(seconds=60)

    # --- the poll schedule
    first_poll_delay: ScheduleDuration = timedelta(seconds=300)
    poll_interval_min: ScheduleDuration = timedelta(seconds=300)
    poll_interval_max: ScheduleDuration = timedelta(seconds=600)
    cutoff: ScheduleDuration = timedelta(hours=12)
    tick: TickDuration = timedelta(seconds=30)
    # A claimed session whose poll task never ran (worker killed, broker emptied) becomes due
    # again after this; the default leaves room for a queue backlog without polling anything twice.
    claim_lease: LeaseDuration | None = None
    batch_size: int = Field(default=100, ge=1, le=100)
    # Upper bound of sessions one tick claims, so one tick never floods the queue.
    max_claim_per_tick: int = Field(default=200_000, ge=1)

    # --- Uspeedo's push (receipts receiver)
    # The secret path segment of the push URL (README "Receiving Uspeedo's push").
    callback_token: SecretStr | None = None
    # A push body larger than this is refused (413) unread.
    receiver_max_body: Size = Field(default=1024 * 1024, ge=1024)
    # Pushed receipts waiting for their SessionNo to be tracked; past this the oldest go.
    inbox_max_rows: int = Field(default=1_000_000, ge=1)

    # --- escalation
    escalation_webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_timeout: WebhookDuration = timedelta(seconds=10)

    # --- events to the sender's application (README "Events"; worker/events.py)
    events_webhook_url: str | None = None
    # A Celery task name the sender's own workers run, sent with send_task on events_queue.
    events_task: str | None = None
    events_queue: str = "celery"
    # Which types are sent, comma-separated; kept in this canonical text (see event_types).
    events: str = ",".join(sorted(DEFAULT_EVENT_TYPES))
    events_batch_size: int = Field(default=100, ge=1, le=1000)
    # A batch failing for this long is parked (kept, counted, alerted on) and the stream goes
    # on after it.
    events_retry_window: ScheduleDuration = timedelta(hours=24)

    # --- logs and errors
    log_phones: bool = False
    # ``json``: every log line of the worker, beat, exporter and receiver is one JSON object
    # (worker/logs.py: JsonFormatter), masked and redacted as the text lines are.
    log_format: Annotated[
        Literal["text", "json"],
        BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v),
    ] = "text"
    # Commands print the traceback of an error instead of its one line (worker/problems.py).
    # The command line reads it as --debug's variable before the settings, so that a settings
    # error can show its traceback too; it is here to be validated, documented and known.
    debug: bool = False

    # --- metrics (receipts exporter)
    # The totals that grow with history are recounted (whole tables) at most this often.
    exporter_totals_interval: TotalsDuration = timedelta(minutes=5)
    # Finished sessions sent longer ago than this are purged daily (worker/purge.py); None
    # keeps everything.
    retention: RetentionDuration | None = None
    # Finished sessions sent longer ago than this have their phone numbers masked daily
    # (worker/masking.py; irreversible); None masks nothing. Needs phone_hash_key.
    mask_phones_after: RetentionDuration | None = None
    # The HMAC key of masked sessions' phone_key, so that late receipts still match them.
    phone_hash_key: SecretStr | None = None

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(f"not a SQLAlchemy URL: {mask_password(value)!r}") from None
        if url.drivername not in SUPPORTED_DATABASES:
            raise ValueError(
                f"{url.drivername!r} databases are not supported: use a PostgreSQL URL "
                "(postgresql://user@host/db, psycopg 3) or a SQLite one (sqlite:///path/file.db)"
            )
        if url.get_backend_name() == "sqlite":
            import sqlite3

            # The receipts upsert reads back what it wrote (RETURNING, SQLite 3.35, 2021).
            if sqlite3.sqlite_version_info < MIN_SQLITE:
                raise ValueError(
                    f"this Python's SQLite is {sqlite3.sqlite_version}; "
                    f"{'.'.join(map(str, MIN_SQLITE))} or newer is needed: use PostgreSQL, "
                    "or a Python built with a newer SQLite"
                )
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if not value:
            return None  # unset or empty: the embedded broker
        if "://" not in value:
            raise ValueError(
                f"not a broker URL (e.g. redis://127.0.0.1:6379/0): {mask_password(value)!r}"
            )
        return value

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str) -> str:
        return _check_http_url("RECEIPTS_API_URL", value, shown=mask_password)

    @field_validator("escalation_webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        return _check_http_url("RECEIPTS_ESCALATION_WEBHOOK_URL", value, shown=redact_url)

    @field_validator("events_webhook_url")
    @classmethod
    def _events_webhook_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        return _check_http_url("RECEIPTS_EVENTS_WEBHOOK_URL", value, shown=redact_url)

    @field_validator("events_task", "events_queue")
    @classmethod
    def _celery_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value:
            return None
        if any(c.isspace() for c in value) or not value.isprintable():
            raise ValueError(f"{value!r} is not a Celery task or queue name (no spaces)")
        return value

    @field_validator("events")
    @classmethod
    def _events(cls, value: str) -> str:
        names = {name.strip().lower() for name in value.split(",") if name.strip()}
        known = {t.value for t in EventType}
        unknown = sorted(names - known)
        if unknown:
            raise ValueError(
                f"unknown event type(s) {', '.join(unknown)}: use a comma-separated list of "
                f"{', '.join(sorted(known))}"
            )
        if not names:
            raise ValueError(
                "names no event type: unset it for the default, or name some of "
                f"{', '.join(sorted(known))} (unset both destinations to send none)"
            )
        return ",".join(sorted(names))

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # Set but empty used to turn signing off without a word (docker-compose.yml set it so).
        if value is not None and len(value.get_secret_value().strip()) < MIN_WEBHOOK_SECRET:
            state = "is empty" if not value.get_secret_value().strip() else "is too short"
            raise ValueError(
                f"{state}: use at least {MIN_WEBHOOK_SECRET} characters (e.g. the output of "
                "`openssl rand -hex 32`), or unset it to send webhooks unsigned"
            )
        return value

    @field_validator("phone_hash_key")
    @classmethod
    def _phone_hash_key(cls, value: SecretStr | None) -> SecretStr | None:
        # A short key would let whoever reads the database try every phone number against
        # the hashes: phone numbers are few enough to enumerate, the key is the protection.
        if value is not None and len(value.get_secret_value().strip()) < MIN_PHONE_HASH_KEY:
            raise ValueError(
                f"use at least {MIN_PHONE_HASH_KEY} characters (e.g. the output of "
                "`openssl rand -hex 32`)"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Rules between settings, all reported at once, one line each naming the variable."""
        problems = []
        if self.poll_interval_min > self.poll_interval_max:
            problems.append(
                "RECEIPTS_POLL_INTERVAL_MIN "
                f"({self.poll_interval_min.total_seconds():g}s) must not exceed "
                f"RECEIPTS_POLL_INTERVAL_MAX ({self.poll_interval_max.total_seconds():g}s)"
            )
        if self.cutoff <= self.first_poll_delay:
            problems.append("RECEIPTS_CUTOFF must be longer than RECEIPTS_FIRST_POLL_DELAY")
        if self.claim_lease is not None and self.claim_lease < self.tick:
            problems.append("RECEIPTS_CLAIM_LEASE must be at least RECEIPTS_TICK")
        attempt_ends = self.poll_budget + self.api_connect_timeout + self.api_read_timeout
        room = timedelta(seconds=TASK_SOFT_TIME_LIMIT) - ANSWER_ROOM
        if attempt_ends > room:
            problems.append(
                f"RECEIPTS_POLL_BUDGET ({_shown(self.poll_budget)}) + "
                f"RECEIPTS_API_CONNECT_TIMEOUT ({_shown(self.api_connect_timeout)}) + "
                f"RECEIPTS_API_READ_TIMEOUT ({_shown(self.api_read_timeout)}) must stay within "
                f"{_shown(room)}: the poll task's soft time limit (TASK_SOFT_TIME_LIMIT, "
                f"{TASK_SOFT_TIME_LIMIT}s, in worker/config.py) less {_shown(ANSWER_ROOM)} to "
                "record the answer"
            )
        if (
            urlsplit(self.api_url).scheme == "http"
            and not is_loopback_url(self.api_url)
            and not self.api_allow_http
        ):
            problems.append(
                "RECEIPTS_API_URL must use https:// unless it points at this machine: plain "
                "http:// would carry every receipt and the access key id unencrypted (on a "
                "network you trust, e.g. a compose demo, set RECEIPTS_API_ALLOW_HTTP=true)"
            )
        if self.mask_phones_after is not None:
            if self.phone_hash_key is None:
                problems.append(
                    "RECEIPTS_MASK_PHONES_AFTER needs RECEIPTS_PHONE_HASH_KEY: the key of the "
                    "hashed phone_key that lets late receipts match masked sessions (e.g. the "
                    "output of `openssl rand -hex 32`; keep it for as long as masked rows exist)"
                )
            if self.mask_phones_after <= self.cutoff:
                problems.append(
                    f"RECEIPTS_MASK_PHONES_AFTER ({_shown(self.mask_phones_after)}) must be "
                    f"longer than RECEIPTS_CUTOFF ({_shown(self.cutoff)}): a session is masked "
                    "only once it is past its cutoff"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        """repr() and str() show where each URL points, never its password or token."""
        for name, value in super().__repr_args__():
            shown = _URL_SHOWN.get(name or "")
            yield name, shown(value) if shown is not None and isinstance(value, str) else value

    def secret_urls(self) -> list[str]:
        """URLs whose path, query and user info are secrets, redacted from every log line."""
        return [url for url in (self.escalation_webhook_url, self.events_webhook_url) if url]

    def secret_values(self) -> list[str]:
        """Secrets that must never appear in a log line, were anything to print them."""
        return [
            secret.get_secret_value()
            for secret in (
                self.access_key_secret,
                self.webhook_secret,
                self.callback_token,
                self.phone_hash_key,
            )
            if secret is not None and secret.get_secret_value()
        ]

    @property
    def lease(self) -> timedelta:
        return self.claim_lease or max(self.poll_interval_min, self.tick * 4)

    @property
    def event_types(self) -> frozenset[EventType]:
        """The event types ``RECEIPTS_EVENTS`` selects."""
        return frozenset(EventType(name) for name in self.events.split(","))

    @property
    def event_destinations(self) -> tuple[EventDestination, ...]:
        """Where events go: none unless a webhook URL or a task name is set."""
        return tuple(
            destination
            for destination, configured in (
                (EventDestination.WEBHOOK, self.events_webhook_url),
                (EventDestination.TASK, self.events_task),
            )
            if configured
        )

    @property
    def webhook_lease(self) -> timedelta:
        """How long a webhook delivery holds its row: longer than one whole POST (which
        ``webhook_timeout`` bounds as a whole), with that again and a tick to spare for
        claiming and recording it, so no second deliverer takes a row over while its POST
        may still be running (see worker/webhooks.py)."""
        return self.webhook_timeout * 2 + self.tick

    @property
    def poll_in_flight(self) -> timedelta:
        """How long a started poll holds its sessions: its last attempt starts within the
        budget and ends within the timeouts; a crashed poll's sessions come back after it,
        still ``interval_min`` after anything the lost poll may have sent."""
        return (
            self.poll_budget
            + self.api_connect_timeout
            + self.api_read_timeout
            + self.poll_interval_min
        )

    def receiver_problem(self) -> str | None:
        """Why ``receipts receiver`` cannot start with these settings, or None."""
        token = self.callback_token.get_secret_value() if self.callback_token else ""
        if len(token) < MIN_CALLBACK_TOKEN:
            state = "is not set" if not token else f"has {len(token)} characters"
            return (
                f"RECEIPTS_CALLBACK_TOKEN {state}: the push URL's secret needs at least "
                f"{MIN_CALLBACK_TOKEN} characters (e.g. the output of `openssl rand -hex 24`)"
            )
        if not token.isascii() or not all(c.isalnum() or c in "-_" for c in token):
            return (
                "RECEIPTS_CALLBACK_TOKEN must be letters, digits, '-' or '_' (it is a path "
                "segment of the push URL)"
            )
        return None

    def missing_api_credentials(self) -> str | None:
        """Why this configuration cannot poll, or None. Checked when a worker starts, not by
        commands such as ``track`` that never call the API."""
        missing = [
            name
            for name, value in (
                ("RECEIPTS_ACCESS_KEY_ID", self.access_key_id),
                ("RECEIPTS_ACCESS_KEY_SECRET", self.access_key_secret),
            )
            if not value
        ]
        if not missing:
            return None
        hint = (
            ""
            if is_loopback_url(self.api_url)
            else " (or point RECEIPTS_API_URL at `receipts simulate` for a demo)"
        )
        return f"{' and '.join(missing)} must be set to poll {self.api_url}{hint}"

    def poll_policy(self) -> PollPolicy:
        return PollPolicy(
            first_delay=self.first_poll_delay,
            interval_min=self.poll_interval_min,
            interval_max=self.poll_interval_max,
            cutoff=self.cutoff,
        )


# Variables with the settings' prefix that are not settings: the test suite's own (README "The
# two commands"), which a misspelt-variable warning must not name.
NOT_SETTINGS_PREFIXES = ("RECEIPTS_TEST_",)


def known_variables() -> list[str]:
    """Every ``RECEIPTS_*`` variable the settings read."""
    return sorted(f"RECEIPTS_{name.upper()}" for name in Settings.model_fields)


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``RECEIPTS_*`` variables of ``environ`` that no setting reads (a misspelling is
    otherwise ignored without a word: the setting keeps its default), each with the closest
    known name, or None when none is close."""
    known = known_variables()
    unknown = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("RECEIPTS_") or upper.startswith(NOT_SETTINGS_PREFIXES):
            continue
        if upper in known:
            continue
        # Compared without the prefix, which every name shares and which would make any
        # name look close to some setting.
        close = difflib.get_close_matches(
            upper.removeprefix("RECEIPTS_"), [k.removeprefix("RECEIPTS_") for k in known], n=1
        )
        unknown.append((name, f"RECEIPTS_{close[0]}" if close else None))
    return unknown


def unknown_variables_warning(environ: Mapping[str, str]) -> str | None:
    """One line naming the unknown ``RECEIPTS_*`` variables of ``environ``, or None."""
    unknown = unknown_variables(environ)
    if not unknown:
        return None
    named = ", ".join(
        f"{name} (did you mean {close}?)" if close else name for name, close in unknown
    )
    noun = "variable" if len(unknown) == 1 else "variables"
    return f"warning: ignoring unknown {noun} {named}"


def load_settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            if field:
                lines.append(f"RECEIPTS_{field.upper()}: {message}")
            else:  # rules between settings: each line names its variables already
                lines.extend(message.splitlines())
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (tests call ``get_settings.cache_clear()`` after changing env)."""
    return load_settings()
