"""Secrets carried inside URLs never reach an error text, a log line or a repr: a Slack-style
webhook URL's path is its token, a database or broker URL may carry a password.

``redact_url`` keeps ``scheme://host[:port]`` and hides path, query and user info;
``redact_url_in`` removes a known URL from a text however the HTTP stack spelled it;
``mask_password`` keeps a URL readable but hides its password, even when the URL is mistyped.
"""

from __future__ import annotations

import io
import logging
import os

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from worker.logs import (
    REDACTED,
    ScrubbingFilter,
    mask_password,
    redact_url,
    redact_url_in,
)

TOKEN = "XXXXSECRETxxxx1234"
SLACK = f"https://hooks.slack.com/services/T000/B000/{TOKEN}"
DB_PASSWORD = "hunter2-db-PW"
BROKER_PASSWORD = "brokerPW-9876"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("RECEIPTS_") and not key.startswith("RECEIPTS_TEST_"):
            monkeypatch.delenv(key)


# --- redact_url ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (SLACK, f"https://hooks.slack.com/{REDACTED}"),
        (
            f"https://user:{TOKEN}@hooks.example.com:8443/x?t=1",
            f"https://hooks.example.com:8443/{REDACTED}",
        ),
        (f"http://[::1]:8080/hook/{TOKEN}", f"http://[::1]:8080/{REDACTED}"),
        (f"https://hooks.example.com/?token={TOKEN}", f"https://hooks.example.com/{REDACTED}"),
        (f"https://hooks.example.com#{TOKEN}", f"https://hooks.example.com/{REDACTED}"),
        ("https://hooks.example.com", "https://hooks.example.com"),
        ("https://hooks.example.com/", "https://hooks.example.com/"),
        (f"htps://hooks.slack.com/services/{TOKEN}", f"htps://hooks.slack.com/{REDACTED}"),
        (f"hooks.slack.com/services/{TOKEN}", REDACTED),
    ],
)
def test_redact_url_keeps_scheme_host_and_port_only(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def _request_error(url: str) -> str:
    """The text `requests` really gives for a refused connection to ``url``."""
    with requests.Session() as http:
        try:
            http.post(url, data=b"{}", timeout=2, allow_redirects=False)
        except requests.RequestException as exc:
            return f"{type(exc).__name__}: {exc}"
    raise AssertionError("port 9 accepted a connection")


@pytest.mark.parametrize(
    "path",
    [
        f"/services/T000/B000/{TOKEN}",
        f"/services/T000/B000/{TOKEN}?x=1&token={TOKEN}",
        f"/hook/ä {TOKEN}",  # requests percent-encodes it before urllib3 names it
    ],
)
def test_a_refused_connection_names_the_host_but_not_the_token(path: str) -> None:
    url = f"http://user:pw-{TOKEN}@127.0.0.1:9{path}"
    text = _request_error(url)
    assert "TOKEN" not in text and (TOKEN in text or "%20" in text), "the raw text leaks it"
    redacted = redact_url_in(text, url)
    assert TOKEN not in redacted
    assert "pw-" not in redacted
    assert "127.0.0.1" in redacted and "ConnectionError" in redacted


def test_redact_url_in_an_echoing_error_page() -> None:
    text = f"HTTP 404: Cannot POST /services/T000/B000/{TOKEN} (see {SLACK})"
    redacted = redact_url_in(text, SLACK)
    assert TOKEN not in redacted
    assert redacted.startswith("HTTP 404: Cannot POST ")


_TOKEN_CHARS = st.sampled_from("abcXYZ0189-_.~ä ")


@given(st.text(_TOKEN_CHARS, min_size=8, max_size=40))
def test_no_token_survives_redaction_however_it_is_spelled(token: str) -> None:
    url = f"https://hooks.example.com/services/T000/{token}"
    prepared = requests.Request("POST", url).prepare()
    assert prepared.url is not None
    encoded = prepared.path_url.rpartition("/")[2]
    texts = (
        f"error with {url} here",
        f"error with {prepared.url} here",
        # urllib3's text for a failed connection names the path as sent.
        f"HTTPSConnectionPool(host='hooks.example.com', port=443): Max retries exceeded "
        f"with url: {prepared.path_url} (Caused by ...)",
        f"HTTP 404: Cannot POST /services/T000/{token}",
    )
    for text in texts:
        redacted = redact_url_in(text, url)
        for secret in {token, token.strip(), encoded} - {""}:
            assert secret not in redacted, (text, redacted)


# --- mask_password ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgresql://u:{DB_PASSWORD}@h/db", "postgresql://u:***@h/db"),
        (f"postgresql//u:{DB_PASSWORD}@h/db", "postgresql//u:***@h/db"),
        (
            f"postgresql://u:{DB_PASSWORD}@h:5432/db?sslmode=require",
            "postgresql://u:***@h:5432/db?sslmode=require",
        ),
        (f"postgres:u:{DB_PASSWORD}@h/db", "postgres:u:***@h/db"),
        (f"redis://:{BROKER_PASSWORD}@h:6379/0", "redis://:***@h:6379/0"),
        (f"redis:/:{BROKER_PASSWORD}@h", "redis:/:***@h"),
        (f"postgresql://u:{DB_PASSWORD}/x@y@h/db", "postgresql://u:***@h/db"),
        (f"postgresql://h/db?password={DB_PASSWORD}&x=1", "postgresql://h/db?password=***&x=1"),
        ("sqlite:///receipts.db", "sqlite:///receipts.db"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("postgresql://user@h/db", "postgresql://user@h/db"),
    ],
)
def test_mask_password(url: str, shown: str) -> None:
    assert mask_password(url) == shown


# --- the log filter ---------------------------------------------------------------------------


def test_the_log_filter_redacts_configured_urls_and_secrets() -> None:
    # A logger and handler of this test's own: a filter on a handler rewrites the record in
    # place, so one left on a shared handler (pytest's, the root logger's) would show here.
    logger = logging.getLogger("test.redaction")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(
        ScrubbingFilter(phones=False, secret_urls=[SLACK], secret_values=["shhh-webhook-secret"])
    )
    logger.handlers = [handler]
    try:
        # What urllib3 logs at DEBUG for each request.
        logger.debug(
            '%s://%s:%s "%s %s %s" %s %s',
            "https",
            "hooks.slack.com",
            443,
            "POST",
            f"/services/T000/B000/{TOKEN}",
            "HTTP/1.1",
            200,
            None,
        )
        logger.warning("secret shhh-webhook-secret leaked, phone 85255311111")
    finally:
        logger.handlers = []
    text = stream.getvalue()
    assert TOKEN not in text
    assert "shhh-webhook-secret" not in text
    assert "hooks.slack.com" in text
    assert "85255311111" in text, "phones=False leaves phones alone"
