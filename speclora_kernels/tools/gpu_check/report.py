"""Check results, ``report.json`` and ``report.md``, and the exit status.

Pure Python. Every check is a ``CheckResult``: a name, a status, its seconds (and the
planner's estimate), a one-line summary, its numbers, and tables. ``report.json`` holds all
of it; ``report.md`` holds every check's line, its numbers and its tables (long tables
aggregated or cut, with the cut said), short enough to paste into a note.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

# pass: it ran and passed; partial: it ran out of time, and all it ran passed; fail: a
# check failed; error: the check itself broke; skipped: not run (reason says why).
STATUSES = ("pass", "partial", "fail", "error", "skipped")
FAILING = ("fail", "error")
MD_ROWS = 70   # rows of one table in report.md (all of them are in report.json)


@dataclasses.dataclass
class CheckResult:
    name: str
    status: str
    seconds: float = 0.0
    estimate: float = 0.0
    summary: str = ""
    numbers: dict = dataclasses.field(default_factory=dict)
    tables: dict = dataclasses.field(default_factory=dict)   # title -> list of row dicts
    reason: str = ""
    data: dict = dataclasses.field(default_factory=dict)     # report.json only

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def skipped(name: str, reason: str, estimate: float = 0.0) -> CheckResult:
    return CheckResult(name, "skipped", estimate=estimate, summary=reason, reason=reason)


def exit_status(results: list[CheckResult]) -> int:
    """0 only if every check that ran passed (skipped checks do not count against it, and
    at least one check ran); else 1."""
    ran = [r for r in results if r.status != "skipped"]
    return 0 if ran and not any(r.status in FAILING for r in ran) else 1


def overall(results: list[CheckResult]) -> str:
    return "PASS" if exit_status(results) == 0 else "FAIL"


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def to_json(meta: dict, plan: dict, results: list[CheckResult]) -> dict:
    return _jsonable({
        "result": overall(results),
        "exit_status": exit_status(results),
        "meta": meta,
        "plan": plan,
        "checks": [dataclasses.asdict(r) for r in results],
    })


def fmt(value) -> str:
    """Numbers as a reader wants them: 3 significant digits, integers as they are."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) >= 1000 or abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def md_table(rows: list[dict], limit: int = MD_ROWS) -> list[str]:
    if not rows:
        return []
    head = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows[:limit]:
        lines.append("| " + " | ".join(fmt(row.get(k, "")).replace("|", "/") for k in head)
                     + " |")
    if len(rows) > limit:
        lines.append(f"\n({len(rows) - limit} more rows in report.json)")
    return lines


def to_markdown(meta: dict, plan: dict, results: list[CheckResult]) -> str:
    ran = [r for r in results if r.status != "skipped"]
    lines = [f"# gpu_check: {overall(results)}", ""]
    facts = ", ".join(f"{k} {fmt(v)}" for k, v in meta.items() if not isinstance(v, (dict, list)))
    lines += [facts, ""]
    lines += [f"Plan: budget {fmt(plan.get('budget_s'))} s, estimated "
              f"{fmt(plan.get('estimate_s'))} s, {plan.get('workers')} workers; "
              f"{len(ran)} checks ran, {len(results) - len(ran)} skipped.", ""]
    lines += ["| check | status | s (est.) | result |", "|---|---|---|---|"]
    for r in results:
        secs = f"{r.seconds:.0f} ({r.estimate:.0f})" if r.status != "skipped" else \
            f"- ({r.estimate:.0f})"
        lines.append(f"| {r.name} | {r.status} | {secs} | {r.summary.replace('|', '/')} |")
    lines.append("")
    for r in ran:
        if not (r.numbers or r.tables or r.reason):
            continue
        lines += [f"## {r.name}", ""]
        if r.reason:
            lines += [r.reason, ""]
        if r.numbers:
            lines += ["; ".join(f"{k} {fmt(v)}" for k, v in r.numbers.items()), ""]
        for title, rows in r.tables.items():
            lines += [f"{title}:", ""] + md_table(rows) + [""]
    skipped_ = [r for r in results if r.status == "skipped"]
    if skipped_:
        lines += ["## Skipped", ""] + [f"- {r.name}: {r.reason}" for r in skipped_] + [""]
    return "\n".join(lines)


def write(out_dir: str, meta: dict, plan: dict, results: list[CheckResult]) -> tuple[str, str]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")
    for path, text in zip(paths, (json.dumps(to_json(meta, plan, results), indent=1),
                                  to_markdown(meta, plan, results))):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    return paths
