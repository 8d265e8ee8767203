"""The embedded broker's transport (worker/embedded_broker.py): a reader never takes a message
half written, every message written by several processes at once is read exactly once, in
the order written, and a file that cannot be decoded is set aside instead of stopping the
worker."""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from kombu.connection import Connection

from worker.celery import EMBEDDED_BROKER_URL, EMBEDDED_TRANSPORT

QUEUE = "receipts"


def _connection(folder: Path, transport: str | None = EMBEDDED_TRANSPORT) -> Any:
    """A connection to the broker folder with the embedded transport (None: kombu's own)."""
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return Connection(
        EMBEDDED_BROKER_URL,
        transport=transport,
        transport_options={
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
        },
    )


class _SlowToEncode:
    """A value whose JSON encoding waits until released: the writer is then mid-message."""

    def __init__(self) -> None:
        self.encoding = threading.Event()
        self.release = threading.Event()

    def __json__(self) -> str:
        self.encoding.set()
        self.release.wait(10)
        return "whole"


def test_a_reader_never_takes_a_message_being_written(tmp_path: Path) -> None:
    """kombu's own transport creates the file first and writes it after: a reader in between
    got an empty file, and the worker stopped on "Unrecoverable error: JSONDecodeError"."""
    slow = _SlowToEncode()
    with _connection(tmp_path) as writing, _connection(tmp_path) as reading:
        writer = threading.Thread(
            target=writing.default_channel._put, args=(QUEUE, {"body": slow}), daemon=True
        )
        writer.start()
        assert slow.encoding.wait(10)
        try:
            with pytest.raises(Empty):
                reading.default_channel._get(QUEUE)
        finally:
            slow.release.set()
            writer.join(10)
        assert reading.default_channel._get(QUEUE) == {"body": "whole"}
    assert list((tmp_path / "processed").iterdir()) == []


def test_a_message_that_kombus_own_writer_is_still_writing_is_read_once_written(
    tmp_path: Path,
) -> None:
    """Another codebase may send ``receipts.track`` into the folder with kombu's transport,
    which creates the file before it writes it: the reader waits for it."""
    slow = _SlowToEncode()
    got: list[Any] = []
    with _connection(tmp_path, transport=None) as writing, _connection(tmp_path) as reading:
        writer = threading.Thread(
            target=writing.default_channel._put, args=(QUEUE, {"body": slow}), daemon=True
        )
        writer.start()
        assert slow.encoding.wait(10)
        reader = threading.Thread(
            target=lambda: got.append(reading.default_channel._get(QUEUE)), daemon=True
        )
        reader.start()
        # Released once the reader has taken the file that is still being written.
        deadline = time.monotonic() + 10
        while not list((tmp_path / "processed").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.001)
        slow.release.set()
        writer.join(10)
        reader.join(10)
    assert got == [{"body": "whole"}]


def _write(folder: Path, writer: int, count: int) -> None:
    with _connection(folder) as connection:
        for n in range(count):
            connection.default_channel._put(QUEUE, {"writer": writer, "n": n})


def test_messages_from_several_processes_are_read_once_each_in_the_order_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writers, count = 4, 400
    fork = multiprocessing.get_context("fork")
    processes = [fork.Process(target=_write, args=(tmp_path, w, count)) for w in range(writers)]
    got: list[tuple[int, int]] = []
    with caplog.at_level(logging.ERROR), _connection(tmp_path) as reading:
        for process in processes:
            process.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # Writers all done before this read began: it sees every message left.
            done = not any(p.is_alive() for p in processes)
            try:
                message = reading.default_channel._get(QUEUE)
            except Empty:
                if done:
                    break
                continue
            got.append((message["writer"], message["n"]))
        for process in processes:
            process.join(30)
    assert sorted(got) == [(w, n) for w in range(writers) for n in range(count)]
    for w in range(writers):
        assert [n for writer, n in got if writer == w] == list(range(count)), "in order"
    assert caplog.records == []


def test_a_message_named_on_another_machines_clock_is_still_read(tmp_path: Path) -> None:
    """Names carry this machine's monotonic clock; one far ahead (written on a machine up for
    longer, sharing the folder) is not held back until this clock catches up."""
    ahead = time.monotonic_ns() + 86_400 * 1_000_000_000
    name = f"{ahead:020d}_elsewhere.{QUEUE}.msg"
    (tmp_path / "queue").mkdir(parents=True)
    (tmp_path / "queue" / name).write_bytes(b'{"n": 2}')
    with _connection(tmp_path) as connection:
        assert connection.default_channel._get(QUEUE) == {"n": 2}


def test_an_unreadable_file_is_set_aside_and_the_next_message_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _connection(tmp_path) as connection:
        channel = connection.default_channel
        (tmp_path / "queue" / f"{0:020d}_broken.{QUEUE}.msg").write_bytes(b'{"trunc')
        channel._put(QUEUE, {"n": 1})
        with caplog.at_level(logging.ERROR, logger="worker.embedded_broker"):
            assert channel._get(QUEUE) == {"n": 1}
        with pytest.raises(Empty):
            channel._get(QUEUE)
    aside = tmp_path / "processed" / f"{0:020d}_broken.{QUEUE}.msg.unreadable"
    assert aside.read_bytes() == b'{"trunc'
    assert "set aside an unreadable broker message" in caplog.text
