"""``deploy/grafana-dashboard.json`` shows only what the exporter serves: every PromQL query
of every panel names metrics (with their ``_bucket``/``_sum``/``_count``/``_total`` suffixes)
and labels that a real exporter registry, collected against a test database, exposes. A query
naming a metric that does not exist would draw an empty panel, silently."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from worker import db
from worker.metrics import make_registry, render
from worker.models import api_calls_table, event_cursors_table, receipts_table, sessions_table

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)

# PromQL words that are not metric names: aggregations (which may be followed by by/without
# before their parenthesis), their modifiers, and the binary operators spelled as words.
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
WORDS = {"and", "or", "unless", "bool", "offset", "atan2"}
TOKEN = re.compile(
    r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\''  # a string (only inside matchers here)
    r"|\{[^}]*\}|\[[^\]]*\]"  # label matchers, a range
    r"|[0-9][0-9A-Za-z.]*"  # a number or a duration (5m, 1h30m, 1e3)
    r"|[A-Za-z_:][A-Za-z0-9_:]*|\S"
)
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*,?')


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """Every (metric name, label names it is matched on) of a PromQL expression."""
    tokens = TOKEN.findall(expr)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token in LABEL_LISTS and following == "(":
            i = tokens.index(")", i)  # a list of label names, not metrics
        elif not re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", token):
            pass
        elif token in AGGREGATIONS or token in WORDS or following == "(":
            pass  # a function or an operator
        else:
            labels: set[str] = set()
            if following.startswith("{"):
                inside = following[1:-1]
                labels = set(MATCHER.findall(inside))
                assert MATCHER.sub("", inside).strip() == "", f"unparsed matchers in {expr}"
            yield token, labels
        i += 1


def test_the_promql_reader_finds_metrics_and_their_labels() -> None:
    expr = (
        'histogram_quantile(0.9, max by (le) (rate(a_bucket{result="S", x=~"1|2"}[1h]))) '
        "/ on (le) group_left (y) sum without (z) (b) > bool 0 and c offset 5m"
    )
    assert list(selectors(expr)) == [("a_bucket", {"result", "x"}), ("b", set()), ("c", set())]


def _populate() -> None:
    """A little of everything, so that every family has samples (and labels) to compare."""
    sent_at = NOW - timedelta(hours=1)
    with db.session_scope() as session:
        session.execute(
            sa.insert(sessions_table),
            [
                {
                    "account_id": 1,
                    "session_no": "D1",
                    "state": "resolved",
                    "phones": ["85255311111"],
                    "sent_at": sent_at,
                    "poll_count": 1,
                    "created_at": sent_at,
                    "updated_at": sent_at,
                }
            ],
        )
        session.execute(
            sa.insert(receipts_table),
            [
                {
                    "account_id": 1,
                    "session_no": "D1",
                    "phone": "85255311111",
                    "phone_key": "85255311111",
                    "result": "Success",
                    "receipt_time": sent_at + timedelta(seconds=20),
                    "first_seen_at": NOW,
                    "updated_at": NOW,
                }
            ],
        )
        session.execute(
            sa.insert(api_calls_table), [{"outcome": "retcode", "ret_code": 215398, "calls": 2}]
        )
        # A configured event destination, so that the event families have their series.
        session.execute(sa.insert(event_cursors_table), [{"destination": "webhook"}])


def served() -> dict[str, set[str]]:
    """Every sample name a scrape of a real exporter registry exposes, with its label names."""
    names: dict[str, set[str]] = {}
    text = render(make_registry(lambda: NOW)).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def queries() -> Iterator[tuple[str, str]]:
    for panel in _panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


@pytest.mark.usefixtures("database")
def test_every_query_names_only_metrics_and_labels_the_exporter_serves() -> None:
    _populate()
    exposed = served()
    # The suffixed names are what PromQL sees, and what the registry really gives.
    assert {"receipts_api_calls_total", "receipts_receipt_latency_seconds_bucket"} <= set(exposed)
    named: set[str] = set()
    for title, expr in queries():
        found = list(selectors(expr))
        assert found, f"{title}: no metric in {expr}"
        for metric, labels in found:
            assert metric in exposed, f"{title}: {metric} is not served by the exporter"
            assert labels <= exposed[metric], f"{title}: {metric} has no label {labels}"
            named.add(metric)
    # The families the dashboard is for (issue: sessions by state, backlog age, delivery
    # rate, receipt latency, API outcomes, push outcomes, escalations).
    assert {
        "receipts_sessions",
        "receipts_oldest_pending_age_seconds",
        "receipts_receipt_latency_seconds_bucket",
        "receipts_receipt_latency_seconds_count",
        "receipts_api_calls_total",
        "receipts_push_requests_total",
        "receipts_escalations_unacknowledged",
        "receipts_events_lag_seconds",
        "receipts_events_parked",
    } <= named


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "uspeedo-receipts"
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
    panels = list(_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[x, y]}"
                taken[x, y] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            depth = 0
            for char in target["expr"]:
                depth += {"(": 1, ")": -1}.get(char, 0)
                assert depth >= 0, target["expr"]
            assert depth == 0, target["expr"]
        assert panel.get("description"), f"{panel['title']} says what it shows"


def test_the_readme_lists_every_panel() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### The Grafana dashboard", 1)[1].split("\n## ", 1)[0]
    section = " ".join(section.split())  # titles may be wrapped
    panels = list(_panels(dashboard()["panels"]))
    missing = [
        p["title"] for p in panels if p["type"] != "row" and f"**{p['title']}**" not in section
    ]
    missing += [
        p["title"] for p in panels if p["type"] == "row" and f"- {p['title']}:" not in section
    ]
    assert missing == []
