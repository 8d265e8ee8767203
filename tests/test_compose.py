"""docker-compose.yml as its comments tell people to run it: the settings every receipts service
gets are valid (an empty RECEIPTS_WEBHOOK_SECRET once turned signing off without a word), and
the exporter says where it listens. Read with PyYAML and compose's own interpolation rules for
``${NAME}`` and ``${NAME:-default}``, so that no docker is needed (test_project.py validates
the file with docker-compose where it is installed)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.config import load_settings

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}")


def _services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def _environment(service: str, host: Mapping[str, str]) -> dict[str, str]:
    """What a container of ``service`` gets when compose runs with ``host``'s variables: a
    variable given no value passes the host's through, or is left unset without one."""
    declared = _services()[service].get("environment") or {}
    resolved = {}
    for name, value in declared.items():
        if value is None:
            if name in host:
                resolved[name] = host[name]
            continue
        resolved[name] = _VARIABLE.sub(
            lambda m: host.get(m["name"]) or (m["default"] or ""), str(value)
        )
    return resolved


@pytest.fixture
def container_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    def apply(service: str, host: Mapping[str, str]) -> dict[str, str]:
        for key in list(os.environ):
            if key.startswith("RECEIPTS_") and not key.startswith("RECEIPTS_TEST_"):
                monkeypatch.delenv(key)
        env = _environment(service, host)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return env

    return apply


PRODUCTION = {"RECEIPTS_ACCESS_KEY_ID": "AKID", "RECEIPTS_ACCESS_KEY_SECRET": "secret-of-uspeedo"}
DEMO = {
    "RECEIPTS_API_URL": "http://simulator:8700/api",
    "RECEIPTS_API_ALLOW_HTTP": "true",
    "RECEIPTS_ACCESS_KEY_ID": "demo",
    "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
}


@pytest.mark.parametrize("service", ["migrate", "worker", "beat", "exporter"])
@pytest.mark.parametrize("host", [PRODUCTION, DEMO, {}], ids=["production", "demo", "nothing"])
def test_every_service_gets_valid_settings(
    container_env: Any, service: str, host: Mapping[str, str]
) -> None:
    env = container_env(service, host)
    settings = load_settings()
    assert settings.webhook_secret is None, "no secret set on the host: webhooks go unsigned"
    assert "RECEIPTS_WEBHOOK_SECRET" not in env


def test_a_webhook_secret_set_on_the_host_reaches_the_workers(container_env: Any) -> None:
    container_env("worker", {**PRODUCTION, "RECEIPTS_WEBHOOK_SECRET": "x" * 32})
    secret = load_settings().webhook_secret
    assert secret is not None and secret.get_secret_value() == "x" * 32


def test_the_exporter_names_the_address_it_listens_on() -> None:
    """`receipts exporter` listens on loopback unless told otherwise: inside a container that
    would be unreachable, so the service passes --host and publishes the port."""
    exporter = _services()["exporter"]
    command = exporter["command"]
    assert "--host" in command
    assert command[command.index("--host") + 1] == "0.0.0.0"  # noqa: S104 - the container's
    # Published on the host's loopback only: the metrics have no authentication.
    assert all(str(port).startswith("127.0.0.1:") for port in exporter["ports"])
