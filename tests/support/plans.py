"""Reading PostgreSQL's plans in tests: which tables a statement reads whole."""

from __future__ import annotations

from typing import Any


def seq_scans(plan: Any) -> list[str]:
    """Relations read by a Seq Scan anywhere in an ``EXPLAIN (FORMAT JSON)`` plan."""
    found = []
    if isinstance(plan, dict):
        if plan.get("Node Type") == "Seq Scan":
            found.append(plan.get("Relation Name", "?"))
        for value in plan.values():
            found += seq_scans(value)
    elif isinstance(plan, list):
        for item in plan:
            found += seq_scans(item)
    return found
