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


def test_the_readme_lists_every_rule() -> None:
    """README "Metrics" names every rule, so that an operator finds them all from there."""
    readme = (RULES.parents[1] / "README.md").read_text()
    section = readme.split("### Metrics", 1)[1].split("\n### ", 1)[0]
    rules = re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), flags=re.MULTILINE)
    assert "ReceiptsPurgeBehind" in rules
    assert [rule for rule in rules if f"`{rule}`" not in section] == []
