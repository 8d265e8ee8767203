"""Settings from RECEIPTS_* variables (README, "Settings"): defaults, durations, and errors
that name the variable and never show a secret. Each test starts from an environment without any
RECEIPTS_* variable (RECEIPTS_TEST_* excepted) and calls load_settings() directly."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from worker.config import (
    DEFAULT_API_URL,
    Settings,
    is_loopback_url,
    load_settings,
    parse_duration,
)
from worker.errors import SettingsError

DB_VAR, DB_ATTR = "RECEIPTS_DATABASE_URL", "database_url"
WEBHOOK_VAR, WEBHOOK_ATTR = "RECEIPTS_ESCALATION_WEBHOOK_URL", "escalation_webhook_url"
KEY_ID, KEY_SECRET = "RECEIPTS_ACCESS_KEY_ID", "RECEIPTS_ACCESS_KEY_SECRET"
SECRET = "s3cr3t-KEY-never-shown-4242"
WEBHOOK_SECRET = "hmac-S3CRET-never-shown-1717"


def _clear_receipts_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("RECEIPTS_") and not key.startswith("RECEIPTS_TEST_"):
            monkeypatch.delenv(key)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_receipts_env(monkeypatch)


def _env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for key, value in values.items():
        monkeypatch.setenv(key, value)


def _settings_error(monkeypatch: pytest.MonkeyPatch, **values: str) -> str:
    _env(monkeypatch, **values)
    with pytest.raises(SettingsError) as info:
        load_settings()
    return str(info.value)


# --- parse_duration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("300", 300),
        ("2.5", 2.5),
        ("5m", 300),
        ("12h", 43200),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("30s", 30),
        ("1d", 86400),
        ("1h 30m", 5400),
        (" 5M ", 300),
        ("0.5s", 0.5),
        ("1.5h", 5400),
        (300, 300),
        (2.5, 2.5),
        (timedelta(minutes=7), 420),
    ],
)
def test_parse_duration_accepts(value: Any, seconds: float) -> None:
    assert parse_duration(value) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "value",
    [
        *["", "   ", "abc", "5x", "-1", "0", "0.0", "0s", "-5m", "nan", "inf", "-inf", "m"],
        *["5m garbage", True, False, None, [300], b"300"],
    ],
)
def test_parse_duration_refuses_with_a_clear_message(value: Any) -> None:
    with pytest.raises(ValueError, match="duration") as info:
        parse_duration(value)
    if not isinstance(value, bool):
        assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", ["1e300", "1e15", "99999999999d", "86400000000000", 1e300])
def test_parse_duration_refuses_huge_values_with_value_error(value: Any) -> None:
    with pytest.raises(ValueError, match="duration") as info:
        parse_duration(value)
    assert repr(value) in str(info.value)


def test_parse_duration_refuses_a_huge_int_with_value_error() -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(10**400)


@pytest.mark.parametrize("value", ["0.0000001", "0.0001ms", 1e-7, "0.0000004"])
def test_parse_duration_refuses_less_than_a_microsecond(value: Any) -> None:
    with pytest.raises(ValueError, match="microsecond") as info:
        parse_duration(value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [timedelta(0), timedelta(seconds=-5)], ids=["zero", "negative"])
def test_parse_duration_refuses_a_non_positive_timedelta(value: timedelta) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


# --- defaults and every variable -------------------------------------------------------------


def test_defaults_match_the_contract() -> None:
    s = load_settings()
    assert s.database_url == "sqlite:///receipts.db"
    assert s.broker_url is None  # the embedded broker
    assert s.api_url == "https://api.uspeedo.com/api" == DEFAULT_API_URL
    assert s.access_key_id is None
    assert s.access_key_secret is None
    assert s.first_poll_delay == timedelta(seconds=300)
    assert s.poll_interval_min == timedelta(seconds=300)
    assert s.poll_interval_max == timedelta(seconds=600)
    assert s.cutoff == timedelta(seconds=43200)
    assert s.tick == timedelta(seconds=30)
    assert s.escalation_webhook_url is None
    assert s.webhook_secret is None
    assert s.exporter_totals_interval == timedelta(minutes=5)
    assert s.api_allow_http is False


def test_default_poll_policy() -> None:
    policy = load_settings().poll_policy()
    assert policy.first_delay == timedelta(seconds=300)
    assert policy.interval_min == timedelta(seconds=300)
    assert policy.interval_max == timedelta(seconds=600)
    assert policy.cutoff == timedelta(seconds=43200)


@pytest.mark.parametrize(
    ("variable", "value", "attribute", "expected"),
    [
        (DB_VAR, "postgresql://u@127.0.0.1:5432/r", DB_ATTR, "postgresql://u@127.0.0.1:5432/r"),
        (
            DB_VAR,
            "postgresql+psycopg://postgres@h/db",
            DB_ATTR,
            "postgresql+psycopg://postgres@h/db",
        ),
        (DB_VAR, "sqlite:////tmp/x.db", DB_ATTR, "sqlite:////tmp/x.db"),
        (
            "RECEIPTS_BROKER_URL",
            "redis://127.0.0.1:6379/0",
            "broker_url",
            "redis://127.0.0.1:6379/0",
        ),
        ("RECEIPTS_API_URL", "http://127.0.0.1:8080/api", "api_url", "http://127.0.0.1:8080/api"),
        ("RECEIPTS_ACCESS_KEY_ID", "AKID123", "access_key_id", "AKID123"),
        ("RECEIPTS_FIRST_POLL_DELAY", "2", "first_poll_delay", timedelta(seconds=2)),
        ("RECEIPTS_FIRST_POLL_DELAY", "10m", "first_poll_delay", timedelta(minutes=10)),
        ("RECEIPTS_POLL_INTERVAL_MIN", "1", "poll_interval_min", timedelta(seconds=1)),
        ("RECEIPTS_POLL_INTERVAL_MIN", "5m", "poll_interval_min", timedelta(minutes=5)),
        ("RECEIPTS_POLL_INTERVAL_MAX", "900", "poll_interval_max", timedelta(seconds=900)),
        ("RECEIPTS_POLL_INTERVAL_MAX", "1h", "poll_interval_max", timedelta(hours=1)),
        ("RECEIPTS_CUTOFF", "24h", "cutoff", timedelta(hours=24)),
        ("RECEIPTS_CUTOFF", "1h30m", "cutoff", timedelta(minutes=90)),
        ("RECEIPTS_TICK", "0.5", "tick", timedelta(seconds=0.5)),
        ("RECEIPTS_TICK", "500ms", "tick", timedelta(seconds=0.5)),
        ("RECEIPTS_TICK", "2m", "tick", timedelta(minutes=2)),
        (WEBHOOK_VAR, "https://hooks.example.com/x", WEBHOOK_ATTR, "https://hooks.example.com/x"),
        (WEBHOOK_VAR, "", WEBHOOK_ATTR, None),
        (
            "RECEIPTS_EXPORTER_TOTALS_INTERVAL",
            "1m",
            "exporter_totals_interval",
            timedelta(minutes=1),
        ),
        ("RECEIPTS_API_ALLOW_HTTP", "true", "api_allow_http", True),
    ],
)
def test_each_variable_is_read(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, attribute: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(load_settings(), attribute) == expected


def test_secrets_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(
        monkeypatch,
        RECEIPTS_ACCESS_KEY_SECRET=SECRET,
        RECEIPTS_WEBHOOK_SECRET=WEBHOOK_SECRET,
    )
    s = load_settings()
    assert s.access_key_secret is not None
    assert s.access_key_secret.get_secret_value() == SECRET
    assert s.webhook_secret is not None
    assert s.webhook_secret.get_secret_value() == WEBHOOK_SECRET


def test_seconds_scale_timings_for_demos(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(
        monkeypatch,
        RECEIPTS_FIRST_POLL_DELAY="1",
        RECEIPTS_POLL_INTERVAL_MIN="1",
        RECEIPTS_POLL_INTERVAL_MAX="2",
        RECEIPTS_CUTOFF="10",
        RECEIPTS_TICK="0.5",
    )
    policy = load_settings().poll_policy()
    assert (policy.first_delay, policy.interval_min, policy.interval_max, policy.cutoff) == (
        timedelta(seconds=1),
        timedelta(seconds=1),
        timedelta(seconds=2),
        timedelta(seconds=10),
    )


def test_equal_interval_min_and_max_are_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, RECEIPTS_POLL_INTERVAL_MIN="7m", RECEIPTS_POLL_INTERVAL_MAX="420")
    s = load_settings()
    assert s.poll_interval_min == s.poll_interval_max == timedelta(minutes=7)


def test_overrides_take_precedence_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECEIPTS_TICK", "10")
    assert load_settings(tick="5s").tick == timedelta(seconds=5)


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        s.tick = timedelta(seconds=1)


# --- lease -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "lease"),
    [
        ({}, timedelta(seconds=300)),  # max(interval_min 300, 4 * tick 30)
        ({"RECEIPTS_TICK": "200"}, timedelta(seconds=800)),
        ({"RECEIPTS_POLL_INTERVAL_MIN": "1", "RECEIPTS_TICK": "0.5"}, timedelta(seconds=2)),
        ({"RECEIPTS_CLAIM_LEASE": "1000"}, timedelta(seconds=1000)),
        ({"RECEIPTS_CLAIM_LEASE": "30", "RECEIPTS_TICK": "30"}, timedelta(seconds=30)),
    ],
)
def test_lease(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], lease: timedelta) -> None:
    _env(monkeypatch, **env)
    assert load_settings().lease == lease


def test_claim_lease_shorter_than_tick_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _settings_error(monkeypatch, RECEIPTS_CLAIM_LEASE="10", RECEIPTS_TICK="30")
    assert "RECEIPTS_CLAIM_LEASE" in message
    assert "RECEIPTS_TICK" in message


# --- errors name the variable ----------------------------------------------------------------


def test_interval_min_above_max_names_both(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _settings_error(
        monkeypatch, RECEIPTS_POLL_INTERVAL_MIN="700", RECEIPTS_POLL_INTERVAL_MAX="600"
    )
    assert "RECEIPTS_POLL_INTERVAL_MIN" in message
    assert "RECEIPTS_POLL_INTERVAL_MAX" in message
    assert "700" in message
    assert "600" in message


def test_interval_min_above_default_max(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _settings_error(monkeypatch, RECEIPTS_POLL_INTERVAL_MIN="11m")
    assert "RECEIPTS_POLL_INTERVAL_MIN" in message


@pytest.mark.parametrize("cutoff", ["300", "299", "1s"])
def test_cutoff_not_after_first_poll_is_refused(
    monkeypatch: pytest.MonkeyPatch, cutoff: str
) -> None:
    message = _settings_error(monkeypatch, RECEIPTS_CUTOFF=cutoff)
    assert "RECEIPTS_CUTOFF" in message
    assert "RECEIPTS_FIRST_POLL_DELAY" in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RECEIPTS_API_URL", "ftp://x"),
        ("RECEIPTS_API_URL", "not a url"),
        ("RECEIPTS_API_URL", "https://"),
        ("RECEIPTS_API_URL", "api.uspeedo.com/api"),
        ("RECEIPTS_API_URL", ""),
        ("RECEIPTS_ESCALATION_WEBHOOK_URL", "ftp://x"),
        ("RECEIPTS_ESCALATION_WEBHOOK_URL", "not a url"),
        ("RECEIPTS_ESCALATION_WEBHOOK_URL", "hooks.example.com/x"),
        ("RECEIPTS_ESCALATION_WEBHOOK_URL", "http://"),
        ("RECEIPTS_DATABASE_URL", "not a url"),
        ("RECEIPTS_DATABASE_URL", "receipts.db"),
        ("RECEIPTS_DATABASE_URL", ""),
        ("RECEIPTS_BROKER_URL", "redis"),
        ("RECEIPTS_BROKER_URL", "127.0.0.1:6379"),
        ("RECEIPTS_TICK", "5x"),
        ("RECEIPTS_TICK", "0"),
        ("RECEIPTS_TICK", "-30"),
        ("RECEIPTS_TICK", "abc"),
        ("RECEIPTS_TICK", "nan"),
        ("RECEIPTS_TICK", ""),
        ("RECEIPTS_FIRST_POLL_DELAY", "soon"),
        ("RECEIPTS_POLL_INTERVAL_MIN", "0"),
        ("RECEIPTS_POLL_INTERVAL_MAX", "inf"),
        ("RECEIPTS_CUTOFF", "12 hours"),
        ("RECEIPTS_CLAIM_LEASE", "-1"),
    ],
)
def test_settings_error_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    message = _settings_error(monkeypatch, **{variable: value})
    assert f"{variable}:" in message
    assert message.startswith("invalid settings")


def test_url_errors_show_the_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _settings_error(monkeypatch, RECEIPTS_API_URL="ftp://x")
    assert "'ftp://x'" in message
    assert "http" in message


def test_every_problem_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _settings_error(
        monkeypatch,
        RECEIPTS_TICK="5x",
        RECEIPTS_API_URL="ftp://x",
        RECEIPTS_DATABASE_URL="not a url",
        RECEIPTS_BROKER_URL="redis",
    )
    for variable in (
        "RECEIPTS_TICK",
        "RECEIPTS_API_URL",
        "RECEIPTS_DATABASE_URL",
        "RECEIPTS_BROKER_URL",
    ):
        assert variable in message
    assert len(message.splitlines()) == 5


def test_settings_error_is_not_a_pydantic_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECEIPTS_TICK", "5x")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_empty_broker_url_means_the_embedded_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECEIPTS_BROKER_URL", "")
    assert load_settings().broker_url is None


@pytest.mark.parametrize("value", ["1e300", "1e15", "99999999999d"])
def test_huge_duration_is_a_settings_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    assert "RECEIPTS_TICK:" in _settings_error(monkeypatch, RECEIPTS_TICK=value)


@pytest.mark.parametrize("variable", ["RECEIPTS_POLL_INTERVAL_MIN", "RECEIPTS_TICK"])
def test_sub_microsecond_duration_is_a_settings_error(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    # Not silently zero: a zero interval would only fail later, in poll_policy(), mid-run.
    assert f"{variable}:" in _settings_error(monkeypatch, **{variable: "0.0000001"})


_ENV_SAFE_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30
)
_DURATION_LIKE = st.from_regex(r"\A ?-?[0-9]{1,8}(\.[0-9]{1,3})? ?(ms|s|m|h|d|x)?\Z")


def _load_tick(text: str) -> str | None:
    """Load settings with RECEIPTS_TICK=text alone; the SettingsError message, or None."""
    with pytest.MonkeyPatch.context() as mp:
        _clear_receipts_env(mp)
        mp.setenv("RECEIPTS_TICK", text)
        try:
            loaded = load_settings()
        except SettingsError as exc:
            return str(exc)
    assert isinstance(loaded, Settings)
    assert loaded.tick > timedelta(0)
    return None


@settings(max_examples=150)
@given(text=_ENV_SAFE_TEXT | _DURATION_LIKE)
@example(text="5m")
@example(text="")
@example(text="nan")
@example(text="1h30m")
@example(text="99999999d")
@example(text="86400000000000")
@example(text="1e300")
@example(text="0.0000001")
@example(text="1_000")
def test_tick_from_arbitrary_text_loads_or_raises_settings_error(text: str) -> None:
    error = _load_tick(text)
    if error is not None:
        assert "RECEIPTS_TICK" in error


# --- credentials -----------------------------------------------------------------------------


def test_missing_credentials_for_the_real_api_names_both(monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_settings().missing_api_credentials()
    assert message is not None
    assert "RECEIPTS_ACCESS_KEY_ID" in message
    assert "RECEIPTS_ACCESS_KEY_SECRET" in message
    assert DEFAULT_API_URL in message
    assert "receipts simulate" in message


@pytest.mark.parametrize(
    ("env", "missing", "present"),
    [
        ({KEY_ID: "AKID"}, KEY_SECRET, KEY_ID),
        ({KEY_SECRET: SECRET}, KEY_ID, KEY_SECRET),
        ({KEY_ID: "AKID", KEY_SECRET: ""}, KEY_SECRET, KEY_ID),
        ({KEY_ID: "", KEY_SECRET: SECRET}, KEY_ID, KEY_SECRET),
    ],
)
def test_missing_credentials_names_only_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], missing: str, present: str
) -> None:
    _env(monkeypatch, **env)
    message = load_settings().missing_api_credentials()
    assert message is not None
    assert missing in message
    assert present not in message
    assert SECRET not in message


def test_no_missing_credentials_when_both_set(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, RECEIPTS_ACCESS_KEY_ID="AKID", RECEIPTS_ACCESS_KEY_SECRET=SECRET)
    assert load_settings().missing_api_credentials() is None


def test_missing_credentials_for_a_loopback_api_has_no_simulate_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECEIPTS_API_URL", "http://127.0.0.1:9000/api")
    message = load_settings().missing_api_credentials()
    assert message is not None
    assert "RECEIPTS_ACCESS_KEY_ID" in message
    assert "receipts simulate" not in message


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://localhost:8000/api", True),
        ("http://127.0.0.1:8000/api", True),
        ("http://127.8.9.10/api", True),
        ("http://[::1]:8000/api", True),
        ("https://api.uspeedo.com/api", False),
        ("http://10.0.0.1/api", False),
        ("http://localhost.example.com/api", False),
        ("http://[::2]/api", False),
        ("not a url", False),
        ("", False),
    ],
)
def test_is_loopback_url(url: str, loopback: bool) -> None:
    assert is_loopback_url(url) is loopback


# --- secrets never shown ---------------------------------------------------------------------


def test_secrets_never_appear_in_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(
        monkeypatch,
        RECEIPTS_ACCESS_KEY_ID="AKID",
        RECEIPTS_ACCESS_KEY_SECRET=SECRET,
        RECEIPTS_WEBHOOK_SECRET=WEBHOOK_SECRET,
    )
    s = load_settings()
    for text in (repr(s), str(s), repr(s.model_dump()), s.model_dump_json()):
        assert SECRET not in text
        assert WEBHOOK_SECRET not in text


@pytest.mark.parametrize(
    "bad",
    [
        {"RECEIPTS_TICK": "5x"},
        {"RECEIPTS_API_URL": "ftp://x"},
        {"RECEIPTS_POLL_INTERVAL_MIN": "700", "RECEIPTS_POLL_INTERVAL_MAX": "600"},
        {"RECEIPTS_API_MAX_ATTEMPTS": "zero"},
    ],
)
def test_secrets_never_appear_in_settings_errors(
    monkeypatch: pytest.MonkeyPatch, bad: dict[str, str]
) -> None:
    message = _settings_error(
        monkeypatch,
        RECEIPTS_ACCESS_KEY_SECRET=SECRET,
        RECEIPTS_WEBHOOK_SECRET=WEBHOOK_SECRET,
        **bad,
    )
    assert SECRET not in message
    assert WEBHOOK_SECRET not in message


# --- answer size and webhook lease ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("1048576", 1048576),
        ("64KiB", 65536),
        ("500KB", 500_000),
        ("32MiB", 32 * 1024 * 1024),
        (" 2 mb ", 2_000_000),
        ("1GiB", 1024**3),
    ],
)
def test_max_answer_bytes_forms(monkeypatch: pytest.MonkeyPatch, value: str, size: int) -> None:
    _env(monkeypatch, RECEIPTS_API_MAX_ANSWER_BYTES=value)
    assert load_settings().api_max_answer_bytes == size


def test_max_answer_bytes_default_is_32_mib() -> None:
    assert load_settings().api_max_answer_bytes == 32 * 1024 * 1024


@pytest.mark.parametrize("value", ["1000", "0", "-5", "32 megabytes", "1.5MiB", "MiB", ""])
def test_bad_max_answer_bytes_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    message = _settings_error(monkeypatch, RECEIPTS_API_MAX_ANSWER_BYTES=value)
    assert "RECEIPTS_API_MAX_ANSWER_BYTES" in message


@pytest.mark.parametrize(("timeout", "tick"), [("10", "30"), ("1", "0.5"), ("1m", "5")])
def test_webhook_lease_outlasts_a_whole_post(
    monkeypatch: pytest.MonkeyPatch, timeout: str, tick: str
) -> None:
    _env(monkeypatch, RECEIPTS_WEBHOOK_TIMEOUT=timeout, RECEIPTS_TICK=tick)
    s = load_settings()
    # Longer than one POST (bounded as a whole by the timeout), with room to record it.
    assert s.webhook_lease > s.webhook_timeout + s.tick


URL_TOKEN = "XXXXSECRETxxxx1234"
SLACK = f"https://hooks.slack.com/services/T000/B000/{URL_TOKEN}"
DB_PASSWORD = "hunter2-db-PW"
BROKER_PASSWORD = "brokerPW-9876"


# --- secrets inside URLs never shown (README "Settings") ----------------------------------


def test_repr_and_str_of_settings_show_no_url_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(
        monkeypatch,
        RECEIPTS_DATABASE_URL=f"postgresql://receipts:{DB_PASSWORD}@db.internal/receipts",
        RECEIPTS_BROKER_URL=f"redis://:{BROKER_PASSWORD}@redis.internal:6379/0",
        RECEIPTS_ESCALATION_WEBHOOK_URL=SLACK,
    )
    s = load_settings()
    for text in (repr(s), str(s), f"{s!r}", f"{s}"):
        assert DB_PASSWORD not in text
        assert BROKER_PASSWORD not in text
        assert URL_TOKEN not in text
        # Still useful for debugging: where it points.
        assert "db.internal" in text and "redis.internal" in text and "hooks.slack.com" in text
    # The values themselves are intact.
    assert s.database_url.endswith(f":{DB_PASSWORD}@db.internal/receipts")
    assert s.escalation_webhook_url == SLACK


@pytest.mark.parametrize(
    ("variable", "value", "secret"),
    [
        ("RECEIPTS_DATABASE_URL", f"postgresql//receipts:{DB_PASSWORD}@db/receipts", DB_PASSWORD),
        ("RECEIPTS_BROKER_URL", f"redis:/:{BROKER_PASSWORD}@redis", BROKER_PASSWORD),
        (
            "RECEIPTS_ESCALATION_WEBHOOK_URL",
            f"htps://hooks.slack.com/services/T/B/{URL_TOKEN}",
            URL_TOKEN,
        ),
        ("RECEIPTS_ESCALATION_WEBHOOK_URL", f"hooks.slack.com/services/T/B/{URL_TOKEN}", URL_TOKEN),
        ("RECEIPTS_API_URL", f"ftp://key:{URL_TOKEN}@api.uspeedo.com/api", URL_TOKEN),
    ],
)
def test_a_mistyped_url_is_refused_without_its_secret(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, secret: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert f"{variable}:" in message
    assert secret not in message


def test_pydantic_errors_do_not_echo_their_input() -> None:
    """Settings(...) called directly raises pydantic's own error, whose text would show every
    input value; with hide_input_in_errors it shows none."""
    with pytest.raises(ValueError, match="validation error") as info:
        Settings(
            database_url=f"postgresql//receipts:{DB_PASSWORD}@db/receipts",
            escalation_webhook_url=f"htps://hooks.slack.com/{URL_TOKEN}",
            tick="5x",
        )
    assert DB_PASSWORD not in str(info.value)
    assert URL_TOKEN not in str(info.value)


# --- settings that would pass and then fail or endanger (README "Settings") -------------------


def _one_line_naming(message: str, variable: str) -> str:
    """The one problem line of a settings error, which names ``variable``."""
    lines = message.splitlines()
    assert lines[0] == "invalid settings:"
    assert len(lines) == 2, message
    assert lines[1].startswith(f"  {variable}"), message
    return lines[1]


@pytest.mark.parametrize(
    ("variable", "too_long", "maximum"),
    [
        ("RECEIPTS_CUTOFF", "1000000d", "30d"),
        ("RECEIPTS_CUTOFF", "31d", "30d"),
        ("RECEIPTS_FIRST_POLL_DELAY", "99999d", "30d"),
        ("RECEIPTS_POLL_INTERVAL_MIN", "99999d", "30d"),
        ("RECEIPTS_POLL_INTERVAL_MAX", "99999d", "30d"),
        ("RECEIPTS_TICK", "2h", "1h"),
        ("RECEIPTS_CLAIM_LEASE", "2d", "1d"),
        ("RECEIPTS_WEBHOOK_TIMEOUT", "5m", "1m"),
        ("RECEIPTS_EXPORTER_TOTALS_INTERVAL", "2d", "1d"),
        ("RECEIPTS_API_CONNECT_TIMEOUT", "99999d", "4m"),
        ("RECEIPTS_API_READ_TIMEOUT", "99999d", "4m"),
        ("RECEIPTS_POLL_BUDGET", "99999d", "210s"),
    ],
)
def test_every_duration_has_a_maximum(
    monkeypatch: pytest.MonkeyPatch, variable: str, too_long: str, maximum: str
) -> None:
    line = _one_line_naming(_settings_error(monkeypatch, **{variable: too_long}), variable)
    assert maximum in line


def test_durations_at_their_maximum_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(
        monkeypatch,
        RECEIPTS_CUTOFF="30d",
        RECEIPTS_FIRST_POLL_DELAY="29d",
        RECEIPTS_POLL_INTERVAL_MIN="30d",
        RECEIPTS_POLL_INTERVAL_MAX="30d",
        RECEIPTS_TICK="1h",
        RECEIPTS_CLAIM_LEASE="1d",
        RECEIPTS_WEBHOOK_TIMEOUT="1m",
    )
    s = load_settings()
    assert s.cutoff == timedelta(days=30) and s.tick == timedelta(hours=1)


def test_the_datetime_arithmetic_of_a_tick_stays_in_range_at_every_maximum() -> None:
    """What a tick computes from the settings (store.escalate_due, claim_batch, start_poll,
    the schedule), with every duration at its documented maximum and a sent_at anywhere
    tracking accepts: no OverflowError, which is what RECEIPTS_CUTOFF=1000000d gave every tick."""
    from worker.config import MAX_CLAIM_LEASE, MAX_SCHEDULE, MAX_TICK

    s = load_settings(
        cutoff=MAX_SCHEDULE,
        first_poll_delay=MAX_SCHEDULE - timedelta(seconds=1),
        poll_interval_min=MAX_SCHEDULE,
        poll_interval_max=MAX_SCHEDULE,
        claim_lease=MAX_CLAIM_LEASE,
        tick=MAX_TICK,
    )
    policy = s.poll_policy()
    now = datetime(2026, 11, 30, tzinfo=UTC)
    for sent_at in (datetime.min.replace(tzinfo=UTC), now):
        assert policy.first_poll_at(sent_at) < policy.cutoff_at(sent_at)
        assert policy.next_poll_at(sent_at, now, random.Random(1)) <= policy.cutoff_at(sent_at)
        policy.may_poll(sent_at, now - s.poll_interval_min, now)
    assert now - s.cutoff < now + s.lease + s.poll_in_flight + 2 * s.tick


def test_a_huge_cutoff_is_refused_before_any_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    line = _one_line_naming(
        _settings_error(monkeypatch, RECEIPTS_CUTOFF="1000000d"), "RECEIPTS_CUTOFF"
    )
    assert "1000000d" in line and "30d" in line


@pytest.mark.parametrize(
    "url",
    ["http://api.uspeedo.com/api", "http://10.0.0.7:8700/api", "http://simulator:8700/api"],
)
def test_plain_http_to_another_host_is_refused(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    line = _one_line_naming(_settings_error(monkeypatch, RECEIPTS_API_URL=url), "RECEIPTS_API_URL")
    assert "https://" in line
    assert "RECEIPTS_API_ALLOW_HTTP" in line


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8700/api",
        "http://localhost:8700/api",
        "http://[::1]:8700/api",
        "https://api.uspeedo.com/api",
        "https://10.0.0.7/api",
    ],
)
def test_https_or_loopback_api_urls_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("RECEIPTS_API_URL", url)
    assert load_settings().api_url == url


def test_plain_http_to_another_host_is_an_explicit_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _env(monkeypatch, RECEIPTS_API_URL="http://simulator:8700/api", RECEIPTS_API_ALLOW_HTTP="true")
    assert load_settings().api_url == "http://simulator:8700/api"


@pytest.mark.parametrize("value", ["", "   ", "hush-7", "fifteen-chars15"])
def test_an_empty_or_short_webhook_secret_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    message = _settings_error(monkeypatch, RECEIPTS_WEBHOOK_SECRET=value)
    line = _one_line_naming(message, "RECEIPTS_WEBHOOK_SECRET")
    assert "16" in line
    if value.strip():
        assert value not in message


def test_a_webhook_secret_of_16_characters_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECEIPTS_WEBHOOK_SECRET", "sixteen-chars-16")
    secret = load_settings().webhook_secret
    assert secret is not None and secret.get_secret_value() == "sixteen-chars-16"


@pytest.mark.parametrize(
    "url",
    [
        "file:///var/lib/receipts.db",
        "mysql://root@127.0.0.1/receipts",
        "mariadb+pymysql://root@127.0.0.1/receipts",
        "oracle://u@h/db",
        "postgresql+asyncpg://u@h/db",
        f"mysql://receipts:{DB_PASSWORD}@db/receipts",
    ],
)
def test_a_database_url_of_another_backend_is_refused(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    message = _settings_error(monkeypatch, RECEIPTS_DATABASE_URL=url)
    line = _one_line_naming(message, "RECEIPTS_DATABASE_URL")
    assert "postgresql://" in line and "sqlite:///" in line
    assert DB_PASSWORD not in message


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///receipts.db",
        "sqlite:////tmp/x.db",
        "sqlite+pysqlite:///x.db",
        "sqlite://",
        "postgresql://u@h/db",
        "postgresql+psycopg://u@h/db",
        "postgres://u@h/db",
    ],
)
def test_postgresql_and_sqlite_urls_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("RECEIPTS_DATABASE_URL", url)
    assert load_settings().database_url == url


@pytest.mark.parametrize(
    "env",
    [
        {"RECEIPTS_POLL_BUDGET": "20m"},
        {"RECEIPTS_POLL_BUDGET": "200"},
        {"RECEIPTS_POLL_BUDGET": "3m", "RECEIPTS_API_READ_TIMEOUT": "1m"},
        {"RECEIPTS_API_READ_TIMEOUT": "210"},
    ],
)
def test_a_poll_that_cannot_finish_inside_the_task_time_limit_is_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    line = _one_line_naming(_settings_error(monkeypatch, **env), "RECEIPTS_POLL_BUDGET")
    assert "TASK_SOFT_TIME_LIMIT" in line
    assert "RECEIPTS_API_CONNECT_TIMEOUT" in line and "RECEIPTS_API_READ_TIMEOUT" in line


def test_a_poll_budget_that_leaves_room_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(monkeypatch, RECEIPTS_POLL_BUDGET="3m", RECEIPTS_API_READ_TIMEOUT="15")
    assert load_settings().poll_budget == timedelta(minutes=3)


def test_the_task_time_limits_are_the_celery_apps() -> None:
    from worker.celery import app
    from worker.config import TASK_SOFT_TIME_LIMIT, TASK_TIME_LIMIT

    assert app.conf.task_soft_time_limit == TASK_SOFT_TIME_LIMIT < TASK_TIME_LIMIT
    assert app.conf.task_time_limit == TASK_TIME_LIMIT


def test_several_cross_checks_are_reported_together(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _settings_error(
        monkeypatch,
        RECEIPTS_POLL_INTERVAL_MIN="700",
        RECEIPTS_POLL_INTERVAL_MAX="600",
        RECEIPTS_POLL_BUDGET="20m",
        RECEIPTS_API_URL="http://api.uspeedo.com/api",
    )
    lines = message.splitlines()[1:]
    assert [line.split()[0] for line in lines] == [
        "RECEIPTS_POLL_INTERVAL_MIN",
        "RECEIPTS_POLL_BUDGET",
        "RECEIPTS_API_URL",
    ], message
