"""How log lines look: RECEIPTS_LOG_FORMAT=json writes one JSON object per line, masked and
redacted as the text lines are; Celery's lines about every tick are DEBUG lines, so that at
INFO a tick shows only when it did something; the embedded broker connects without kombu's
"No hostname was supplied" warning."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker import logs
from worker.config import Settings

TOKEN = "T0KEN-abcdef-123456"
WEBHOOK = f"https://hooks.example.com/services/T1/B2/{TOKEN}"
SECRET = "an-access-key-secret-of-some-length"


@pytest.fixture
def json_logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose handler is set up as a worker's is with RECEIPTS_LOG_FORMAT=json."""
    logger = logging.getLogger("test.json_logs")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    stream = io.StringIO()
    logger.handlers = [logging.StreamHandler(stream)]
    settings = Settings(log_format="json", escalation_webhook_url=WEBHOOK, access_key_secret=SECRET)
    logs.setup(logger, settings)
    yield logger, stream
    logger.handlers = []


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_mask_phones_and_redact_secrets(
    json_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_logger
    logger.warning("poll of %s failed posting to %s with %s", "(852)55311111", WEBHOOK, SECRET)
    try:
        raise ValueError("bad phone +852 5531 1112")
    except ValueError:
        logger.exception("could not track")
    first, second = _lines(stream)
    assert first["level"] == "WARNING"
    assert first["logger"] == "test.json_logs"
    assert first["message"] == (
        "poll of *******1111 failed posting to https://hooks.example.com/<redacted> with <redacted>"
    )
    assert str(first["time"]).endswith("+00:00")
    assert second["level"] == "ERROR"
    assert second["message"] == "could not track"
    assert "Traceback (most recent call last)" in str(second["exception"])
    assert "*******1112" in str(second["exception"])
    text = stream.getvalue()
    for hidden in ("55311111", "5531 1112", TOKEN, SECRET):
        assert hidden not in text


def test_the_setting_accepts_text_and_json_only() -> None:
    assert Settings(log_format="JSON").log_format == "json"
    assert Settings().log_format == "text"
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")


def test_json_line_for_what_a_command_prints() -> None:
    line = json.loads(logs.json_line("starting", level=logging.WARNING))
    assert (line["level"], line["logger"], line["message"]) == ("WARNING", "receipts", "starting")


@pytest.fixture
def routine() -> Iterator[tuple[logging.Logger, list[logging.LogRecord]]]:
    """A logger like Celery's, with the filter the worker attaches."""
    logger = logging.getLogger("test.routine")
    logger.propagate = False
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger.handlers = [Keep()]
    logger.filters = [logs.RoutineTasks(["receipts.tick"])]
    yield logger, records
    logger.handlers, logger.filters = [], []


def test_celery_lines_about_the_tick_are_debug_lines(
    routine: tuple[logging.Logger, list[logging.LogRecord]],
) -> None:
    logger, records = routine
    logger.setLevel(logging.INFO)
    tick = {"name": "receipts.tick", "id": "1", "return_value": "{'escalated': 0, 'claims': 0}"}
    logger.info("Task %(name)s[%(id)s] received", tick)
    logger.info("Task %(name)s[%(id)s] succeeded: %(return_value)s", tick)
    logger.info("Scheduler: Sending due task %s (%s)", "receipts-tick", "receipts.tick")
    logger.info("Task %(name)s[%(id)s] received", {"name": "receipts.poll", "id": "2"})
    logger.error("Task %(name)s[%(id)s] raised", tick)
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("INFO", "Task receipts.poll[2] received"),
        ("ERROR", "Task receipts.tick[1] raised"),
    ]
    records.clear()
    logger.setLevel(logging.DEBUG)
    logger.info("Task %(name)s[%(id)s] received", tick)
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("DEBUG", "Task receipts.tick[1] received")
    ]


def test_the_embedded_broker_names_a_host(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from worker.celery import broker_connection, make_broker_folders

    settings = Settings(broker_dir=str(tmp_path / "broker"))
    make_broker_folders(settings)
    with caplog.at_level(logging.WARNING), broker_connection(settings) as connection:
        connection.info()
        connection.default_channel.queue_declare(queue="receipts", passive=True)
    assert "No hostname was supplied" not in caplog.text
