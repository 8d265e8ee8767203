"""deploy/prometheus-alerts.yml names only metrics the exporter serves: a rule on a renamed or
missing metric would never fire, silently."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import make_registry, render

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus-alerts.yml"


@pytest.mark.usefixtures("database")
def test_every_metric_the_alert_rules_name_is_served() -> None:
    named = set(re.findall(r"\breceipts_[a-z_]+\b", RULES.read_text()))
    assert "receipts_rejected_tracks" in named
    text = render(make_registry(lambda: datetime.now(UTC))).decode()
    served = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }
    # A counter with no sample yet (no API call made) still declares itself.
    served |= {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert named <= served, f"not served: {sorted(named - served)}"
