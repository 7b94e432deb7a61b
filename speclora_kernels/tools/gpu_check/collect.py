"""Job results -> report entries (``report.CheckResult``): statuses, summaries, numbers and
tables, one function per check. Pure Python over the result dicts the jobs return, so the
CPU tests can feed it fake results."""
from __future__ import annotations

from .cases import AXES, case_label, pair_coverage
from .report import CheckResult

RAN = ("pass", "fail", "error", "skipped")   # a job that ran (skipped: it decided not to)
NOT_RUN = ("not run", "timed out", "crashed")


def _status(results: list[dict], left_out: int = 0) -> str:
    statuses = [r.get("status") for r in results]
    if any(s in ("fail",) for s in statuses):
        return "fail"
    if any(s in ("error", "crashed") for s in statuses):
        return "error"
    if not any(s == "pass" for s in statuses):
        return "skipped" if all(s == "skipped" for s in statuses) and statuses else "error"
    if left_out or any(s in ("not run", "timed out") for s in statuses):
        return "partial"
    return "pass"


def _worst(results) -> float:
    return max((r.get("worst_over_tol", 0.0) for r in results if "worst_over_tol" in r),
               default=0.0)


def _problems(result: dict) -> str:
    text = "; ".join(result.get("problems") or [])
    return text or result.get("error", "") or result.get("reason", "")


def _group(rows: list[dict], key: str) -> list[dict]:
    out = {}
    for r in rows:
        g = out.setdefault(r[key], {key: r[key], "cases": 0, "failed": 0, "worst_err/tol": 0.0})
        g["cases"] += 1
        g["failed"] += r["status"] != "pass"
        g["worst_err/tol"] = max(g["worst_err/tol"], r.get("worst_err/tol", 0.0))
    return list(out.values())


def cases_check(cases: list[dict], results: dict, seconds: float, estimate: float,
                planned_out: int = 0) -> CheckResult:
    """``results``: case id -> job result. ``planned_out``: cases the plan left out."""
    rows, done = [], []
    for case in cases:
        r = results.get(case["id"], {"status": "not run"})
        row = {"id": case["id"], "case": case_label(case), "status": r.get("status"),
               "worst_err/tol": r.get("worst_over_tol", 0.0), "s": r.get("seconds", 0.0)}
        for k in ("dtype", "path", "base", "method"):
            row[k] = case[k]
        row["errors"] = r.get("errors", {})
        row["problems"] = _problems(r)
        rows.append(row)
        if r.get("status") in RAN:
            done.append(case)
    ran = [row for row in rows if row["status"] in RAN]
    passed = sum(row["status"] == "pass" for row in rows)
    covered, pairs = pair_coverage(done, AXES)
    worst = max(ran, key=lambda row: row["worst_err/tol"], default=None)
    not_run = len(rows) - len(ran)
    status = _status([results.get(c["id"], {"status": "not run"}) for c in cases])
    summary = (f"{passed}/{len(rows)} cases passed; pairs covered {covered}/{pairs}"
               + (f"; worst err/tol {worst['worst_err/tol']:.3g} ({worst['case']})"
                  if worst else "")
               + (f"; {not_run} not run (time)" if not_run else ""))
    failures = [{"case": r["case"], "status": r["status"], "problems": r["problems"],
                 "errors": ", ".join(f"{k} {v:.2g}" for k, v in r["errors"].items())}
                for r in rows if r["status"] != "pass"]
    tables = {"by dtype": _group(ran, "dtype"), "by path": _group(ran, "path"),
              "by base": _group(ran, "base"), "by method": _group(ran, "method")}
    if failures:
        tables["failures"] = failures
    return CheckResult("correctness.cases", status, seconds, estimate, summary,
                       {"cases": len(rows), "passed": passed, "not_run": not_run,
                        "left_out_by_plan": planned_out, "pairs_covered": covered,
                        "pairs": pairs}, tables, data={"cases": rows})


def simple_check(name: str, jobs: list[tuple[dict, dict]], seconds: float, estimate: float,
                 columns: tuple, left_out: int = 0, extra: str = "",
                 group_by: str | None = None) -> CheckResult:
    """A check made of a few jobs: (job payload, result) pairs, one table row each (with
    ``group_by``, report.md gets one row per value of that column plus the rows that did
    not pass; report.json every row)."""
    rows = []
    for payload, r in jobs:
        row = {c: payload.get(c, r.get(c, "")) for c in columns}
        row.update({"status": r.get("status"), "worst_err/tol": r.get("worst_over_tol",
                                                                      r.get("worst", 0.0)),
                    "problems": _problems(r)})
        rows.append(row)
    status = _status([r for _, r in jobs], left_out)
    passed = sum(r.get("status") == "pass" for _, r in jobs)
    skipped_ = sum(r.get("status") == "skipped" for _, r in jobs)
    summary = (f"{passed}/{len(jobs)} passed" + (f", {skipped_} skipped" if skipped_ else "")
               + (f", {left_out} left out (time)" if left_out else "")
               + (f"; worst err/tol {_worst([r for _, r in jobs]):.3g}" if jobs else "")
               + (f"; {extra}" if extra else ""))
    numbers = {"jobs": len(jobs), "passed": passed, "skipped": skipped_, "left_out": left_out}
    if group_by is None:
        return CheckResult(name, status, seconds, estimate, summary, numbers, {"jobs": rows})
    groups = {}
    for row in rows:
        g = groups.setdefault(row[group_by], {group_by: row[group_by], "jobs": 0, "passed": 0,
                                              "skipped": 0, "worst_err/tol": 0.0})
        g["jobs"] += 1
        g["passed"] += row["status"] == "pass"
        g["skipped"] += row["status"] == "skipped"
        g["worst_err/tol"] = max(g["worst_err/tol"], row["worst_err/tol"] or 0.0)
    tables = {f"by {group_by}": list(groups.values())}
    others = [row for row in rows if row["status"] != "pass"]
    if others:
        tables["not passed"] = others
    return CheckResult(name, status, seconds, estimate, summary, numbers, tables,
                       data={"jobs": rows})


def single_check(name: str, result: dict, seconds: float, estimate: float, summary: str,
                 numbers: dict | None = None, tables: dict | None = None) -> CheckResult:
    status = result.get("status", "error")
    # timed out: still running at the pool's deadline, nothing found wrong (yet)
    status = {"crashed": "error", "timed out": "partial", "not run": "skipped"}.get(status,
                                                                                      status)
    reason = _problems(result) if status != "pass" else ""
    if status == "skipped":
        return CheckResult(name, "skipped", seconds, estimate, reason or summary,
                           reason=reason or summary)
    return CheckResult(name, status, seconds, estimate,
                       summary + (f"; {reason}" if reason else ""), numbers or {},
                       tables or {}, reason)


def dropout_check(result: dict, seconds: float, estimate: float) -> CheckResult:
    rows = result.get("rows", [])
    mism = sum(r.get("fwd_mismatches", 0) + r.get("dx_mismatches", 0) for r in rows)
    summary = (f"mask read back from fwd and dx on {len(rows)} paths: {mism} elements differ "
               f"from dropout_keep_mask; factor grads worst err {result.get('worst', 0):.2g}")
    return single_check("dropout_mask", result, seconds, estimate, summary,
                        {k: result[k] for k in ("M", "K", "p") if k in result},
                        {"paths": rows})


def graph_check(result: dict, seconds: float, estimate: float) -> CheckResult:
    rows = result.get("rows", [])
    seeds = [r["seed"] for r in rows]
    summary = (f"2 replays, seeds {seeds}, worst err {result.get('worst', 0):.2g} "
               f"(tol {result.get('tol', 0):.0e}) vs eager fp64 with each replay's mask")
    numbers = {k: v for k, v in (result.get("errors") or {}).items()}
    numbers["seed_source"] = result.get("seed_source", "")
    return single_check("graph_step", result, seconds, estimate, summary, numbers,
                        {"replays": rows})


def compile_check(result: dict, seconds: float, estimate: float) -> CheckResult:
    losses = result.get("losses", [])
    summary = (f"{len(losses)} steps, losses finite, outputs differ step to step"
               if result.get("status") == "pass" else f"{len(losses)} steps")
    if result.get("cudagraph_skips"):
        summary += f" (Inductor skipped CUDA graphs {result['cudagraph_skips']} times)"
    return single_check("compile_step", result, seconds, estimate, summary,
                        {"losses": losses, "step_seconds": result.get("step_seconds", []),
                         "cudagraph_skips": result.get("cudagraph_skips"),
                         "graph_breaks": result.get("graph_breaks")})


def devices_check(result: dict, seconds: float, estimate: float) -> CheckResult:
    summary = (f"{result.get('gpus')} GPUs: op and NF4 dequantizer on cuda:1 with cuda:0 "
               f"current; two-device error names both")
    return single_check("devices", result, seconds, estimate, summary,
                        {**result.get("errors", {}),
                         "error_message": result.get("error_message", "")})


def pytest_check(result: dict, estimate: float) -> CheckResult:
    counts = result.get("counts", {})
    text = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no tests counted"
    if result.get("timed_out"):
        text += f"; stopped at its {result.get('limit_s', 0):.0f} s limit"
    numbers = {**counts, "returncode": result.get("returncode"),
               "command": result.get("command", "")}
    tables = {}
    if result.get("deselected"):
        tables["deselected"] = [{"test": n, "why": why} for n, why in result["deselected"]]
    if result.get("failed"):
        tables["failed"] = [{"test": line} for line in result["failed"]]
    out = single_check("pytest", result, result.get("seconds", 0.0), estimate, text, numbers,
                       tables)
    if out.status not in ("pass", "partial", "skipped") and result.get("tail"):
        out.reason = (out.reason + "\n\n```\n" + result["tail"][-1500:] + "\n```").strip()
    return out


def tuning_first_call_check(result: dict, seconds: float, estimate: float) -> CheckResult:
    summary = (f"first call {result.get('first_call_s', 0):.2f} s "
               f"({result.get('configs_timed', 0)} configs timed), the other 9: median "
               f"{1e3 * result.get('others_median_s', 0):.2f} ms, max "
               f"{1e3 * result.get('others_max_s', 0):.2f} ms, no re-tuning")
    numbers = {k: result[k] for k in ("first_call_s", "others_median_s", "others_max_s",
                                      "configs_timed") if k in result}
    numbers.update({f"chosen {k}": v for k, v in (result.get("chosen") or {}).items()})
    return single_check("tuning.first_call", result, seconds, estimate, summary, numbers,
                        {"calls": result.get("rows", [])})


def tuning_threads_check(result: dict, seconds: float, estimate: float) -> CheckResult:
    summary = (f"2 threads on a cold cache: {result.get('configs_timed', 0)} configs timed "
               f"(one tuning: {result.get('expected', 0)}), outputs right and equal")
    return single_check("tuning.threads", result, seconds, estimate, summary,
                        {k: result[k] for k in ("configs_timed", "expected") if k in result})


def tuning_processes_check(result: dict, seconds: float, estimate: float) -> CheckResult:
    rows = result.get("rows", [])
    summary = f"{len(rows)} launch choices identical in two fresh deterministic processes"
    out = single_check("tuning.processes", result, seconds, estimate, summary)
    out.data["choices"] = rows
    return out


def timing_check(name: str, result: dict, seconds: float, estimate: float,
                 description: str = "") -> CheckResult:
    rows = result.get("rows", [])
    summary = f"{len(rows)} points" + (f", {result['left_out']} left out (time)"
                                       if result.get("left_out") else "")
    if description:
        summary += f": {description}"
    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float))
               and not isinstance(v, bool)}
    out = single_check(name, result, seconds, estimate, summary, numbers, {"points": rows})
    if result.get("status") == "partial":
        out.status = "partial"
    return out


def ceilings_check(result: dict, seconds: float, estimate: float) -> CheckResult:
    summary = (f"device copy {result.get('copy_GBps', 0):.0f} GB/s (read + written), bf16 "
               f"matmul 8192^3 {result.get('bf16_matmul_TFLOPs', 0):.0f} TFLOP/s")
    return single_check("timings.ceilings", result, seconds, estimate, summary,
                        {k: v for k, v in result.items() if k != "status"})


def scan_check(result: dict, seconds: float, estimate: float) -> CheckResult:
    rows = result.get("rows", [])
    ends = [r for r in rows if r["programs"] in (1, rows[-1]["programs"])] if rows else []
    summary = ", ".join(f"{r['programs']} programs {r['GBps']:.0f} GB/s" for r in ends)
    return single_check("timings.stream_scan", result, seconds, estimate,
                        f"streaming 1 GiB: {summary}", {"bytes": result.get("bytes", 0)},
                        {"GB/s per program count": rows})
