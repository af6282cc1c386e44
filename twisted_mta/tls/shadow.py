"""
The shadow report: every would-be failure of a report-only ("shadow")
policy, one JSON object per line in C{<spool>/tls/shadow.jsonl}, and the
summary `twisted-mta tls shadow-report` prints from it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

REPORT = os.path.join("tls", "shadow.jsonl")


def report_path(spool: str) -> str:
    return os.path.join(spool, REPORT)


class ShadowLog:
    """
    Appends shadow verdicts (through the I/O pool; no fsync: a report, not
    mail).
    """

    def __init__(self, spool: str, run_blocking) -> None:
        self.path = report_path(spool)
        self.run_blocking = run_blocking

    def __call__(self, name: str, event: dict[str, Any]) -> None:
        if name != "tls.shadow":
            return
        line = json.dumps(event, sort_keys=True) + "\n"
        d = self.run_blocking(_append, self.path, line)
        d.addErrback(lambda f: None)


def _append(path: str, line: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def read(path: str) -> Iterable[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue  # a torn last line after a crash
    except FileNotFoundError:
        return


def summarize(events: Iterable[dict[str, Any]], since: float | None = None
              ) -> list[dict[str, Any]]:
    """
    One row per (domain, host, shadow policy, failure class): how often,
    first and last seen, and the reason in words.
    """
    rows: dict[tuple, dict[str, Any]] = {}
    for e in events:
        if since is not None and e.get("time", 0) < since:
            continue
        key = (e["domain"], e["host"], e["shadow"], e["kind"])
        row = rows.get(key)
        if row is None:
            row = rows[key] = {"domain": e["domain"], "host": e["host"],
                               "policy": e["policy"], "shadow": e["shadow"],
                               "kind": e["kind"], "detail": e.get("detail", ""),
                               "count": 0, "first": e["time"], "last": e["time"],
                               "reason": e.get("reason", "")}
        row["count"] += 1
        row["first"] = min(row["first"], e["time"])
        row["last"] = max(row["last"], e["time"])
        row["reason"] = e.get("reason", row["reason"])
    return sorted(rows.values(), key=lambda r: (-r["count"], r["domain"], r["host"]))
