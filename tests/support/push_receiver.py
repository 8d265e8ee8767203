"""The push receiver (worker/receiver.py) served by uvicorn in a thread of the test process,
and push reports as Uspeedo sends them: for the receiver's tests and the benchmark."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import requests
import uvicorn

from tests.support.databases import Configure
from tests.support.processes import wait_for
from tests.support.servers import free_port
from worker.config import load_settings
from worker.receiver import create_app

TOKEN = "tok-0123456789abcdefABCDEF"


class Running:
    """A receiver served by uvicorn in a thread of this process."""

    def __init__(self, app: Any, port: int) -> None:
        self.app = app
        self.base = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, access_log=False, log_config=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def url(self, token: str = TOKEN, query: str = "") -> str:
        return f"{self.base}/uspeedo/callback/{token}{query}"

    def post(self, body: Any, *, token: str = TOKEN, query: str = "") -> requests.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return requests.post(
            self.url(token, query),
            data=data,
            headers={"Content-Type": "application/json"},
            timeout=30,
        )

    def flush(self) -> None:
        self.app.state.flusher.flush()

    def start(self) -> Running:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=10)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextmanager
def running_receiver(database: str, configure: Configure) -> Iterator[Running]:
    """A receiver on ``database`` (migrated), with the token :data:`TOKEN`."""
    configure(RECEIPTS_DATABASE_URL=database, RECEIPTS_CALLBACK_TOKEN=TOKEN)
    running = Running(create_app(load_settings()), free_port()).start()
    try:
        yield running
    finally:
        running.stop()


def report(session_no: str, phone: str, result: str, **extra: Any) -> dict[str, Any]:
    """One report of a push body, received now."""
    return {
        "SessionNo": session_no,
        "Phone": phone,
        "ReceiptResult": result,
        "ReceiptTime": int(datetime.now(UTC).timestamp()),
        "ReceiptCode": "DELIVRD",
        "ReceiptDesc": "ok",
        "CostCount": 1,
        "UserId": "",
        **extra,
    }
