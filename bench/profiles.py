"""Summaries of a py-spy ``--format raw`` profile (collapsed stacks, one ``frame;frame;… count``
line per distinct stack; ``process PID:"cmd"`` frames lead, one per level of the process tree).

py-spy leaves idle threads out by default, so the percentages are shares of on-CPU samples.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

ENTRY_POINT_SHARE = 0.9
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame(text: str) -> tuple[str, str]:
    """(function, file) of one frame, without its line number."""
    match = _FRAME.match(text)
    if match is None:
        return text, ""
    return match["function"], match["file"]


def _package(file: str) -> str:
    if not file:
        return "?"
    head = file.split("/", 1)[0]
    return head.removesuffix(".py") if "/" not in file else head


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    roles: Counter[str] = Counter()
    worker_inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        depth = sum(1 for f in frames if f.startswith("process "))
        roles["worker main process" if depth <= 1 else "pool children"] += count
        code = [_frame(f) for f in frames if not f.startswith("process ")]
        if not code:
            continue
        total += count
        function, file = code[-1]
        self_time[f"{function} ({file})"] += count
        packages[_package(file)] += count
        seen = {f"{fn} ({fl})" for fn, fl in code}
        for key in seen:
            if "(worker/" in key:
                worker_inclusive[key] += count

    def ranked(counter: Counter[str]) -> list[dict[str, Any]]:
        # Entry points (runpy, click, Celery's bootsteps, the CLI) sit under every sample of
        # the main process and say nothing; leave out frames under more than 90% of samples.
        kept = [(key, n) for key, n in counter.most_common() if n <= ENTRY_POINT_SHARE * total]
        return [{"function": key, "pct": round(n / total * 100, 1)} for key, n in kept[:top]]

    return {
        "samples": total,
        "by_process": {k: round(v / total * 100, 1) for k, v in roles.items()} if total else {},
        "by_package_self_pct": {k: round(v / total * 100, 1) for k, v in packages.most_common(12)}
        if total
        else {},
        "top_self": ranked(self_time) if total else [],
        "worker_functions_inclusive": ranked(worker_inclusive) if total else [],
    }
