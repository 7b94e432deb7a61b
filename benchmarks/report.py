"""Tables, CSV/JSON files, PNG plots and the target check of a run's rows.

A row is a flat dict (see ``run.measure_case``); every writer here works on a list of
them, so they are unit-tested without running anything.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Iterable, Sequence

TARGET_COLUMNS = ("target", "scope", "status", "worst", "median", "where", "n")

TABLE_COLUMNS = ("case", "mode", "contender", "median_us", "iqr_us", "speedup", "vs_linear",
                 "peak_mem_mb", "tflops", "gbps")
"""Columns of the printed table; the CSV/JSON keep every field."""


def _fmt(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value == 0:
            return "0"
        mag = abs(value)
        if mag >= 100:
            return f"{value:.0f}"
        if mag >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """GitHub-markdown table of ``columns`` (missing fields print as ``-``)."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells]
    return "\n".join(out)


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    """All fields of all rows; the header is the union of keys in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keys), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def write_json(doc: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str, allow_nan=False) + "\n")
    return path


def add_ratios(rows: list[dict], baseline: dict[str, str | None]) -> None:
    """Fill ``speedup`` (baseline median / own median, same case and mode) and
    ``vs_linear`` (own median / nn.Linear's: the adapter's overhead over the base matmul)."""
    index = {(r["case"], r["mode"], r["contender"]): r for r in rows if r.get("median_s")}
    for r in rows:
        if not r.get("median_s"):
            continue
        base = baseline.get(r["contender"])
        ref = index.get((r["case"], r["mode"], base)) if base else None
        r["speedup"] = ref["median_s"] / r["median_s"] if ref else None
        lin = index.get((r["case"], r["mode"], "linear"))
        r["vs_linear"] = r["median_s"] / lin["median_s"] if lin else None


def pivot(rows: Sequence[dict], names: Sequence[str]) -> tuple[list[dict], list[str]]:
    """One row per (case, mode): each contender's median (µs, with IQR) and the ratios the
    targets are about. Returns the rows and their column names."""
    out: dict[tuple, dict] = {}
    for r in rows:
        if not r.get("median_s"):
            continue
        row = out.setdefault((r["case"], r["mode"]), {"case": r["case"], "mode": r["mode"]})
        row[r["contender"]] = f"{_fmt(r['median_us'])} ±{_fmt(r['iqr_us'] / 2)}"
        row["_" + r["contender"]] = r["median_s"]
    ratios = (("fused/peft", "fused", "peft"), ("nf4/bnb", "fused_nf4", "bnb_peft"),
              ("fused/linear", "fused", "linear"), ("patched/peft", "peft_patched", "peft"),
              ("patched/bnb", "bnb_peft_patched", "bnb_peft"))
    for row in out.values():
        for label, num, den in ratios:
            if "_" + num in row and "_" + den in row:
                row[label] = row["_" + num] / row["_" + den]
    present = [n for n in names if any(n in row for row in out.values())]
    columns = ["case", "mode", *present,
               *(label for label, num, den in ratios if num in present and den in present)]
    return list(out.values()), columns


def summary(rows: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """One row per case: PEFT and fused medians (µs) in forward and train_step, their
    ratio, and NF4 vs bnb in forward: the figures the targets are about."""
    med = {(r["case"], r["mode"], r["contender"]): r["median_us"]
           for r in rows if r.get("median_s")}
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        row = {"case": case}
        for mode, tag in (("forward", "fwd"), ("train_step", "train")):
            peft, fused = med.get((case, mode, "peft")), med.get((case, mode, "fused"))
            row[f"{tag} peft µs"], row[f"{tag} fused µs"] = peft, fused
            row[f"{tag} fused/peft"] = fused / peft if peft and fused else None
            patched = med.get((case, mode, "peft_patched"))
            row[f"{tag} patched/peft"] = patched / peft if peft and patched else None
        bnb, nf4 = med.get((case, "forward", "bnb_peft")), med.get((case, "forward", "fused_nf4"))
        row["fwd nf4/bnb"] = nf4 / bnb if bnb and nf4 else None
        out.append(row)
    return out, list(out[0]) if out else ["case"]


# ---------------------------------------------------------------- targets
def _check(name, ratios: Iterable[tuple[str, float]], limit: float, below: bool, scope: str):
    ratios = list(ratios)
    if not ratios:
        return {"target": name, "scope": scope, "status": "not run", "worst": None,
                "median": None, "where": "", "n": 0}
    worst_case, worst = (max if below else min)(ratios, key=lambda cr: cr[1])
    ok = worst <= limit if below else worst >= limit
    return {"target": name, "scope": scope, "status": "met" if ok else "MISSED", "worst": worst,
            "median": statistics.median(r for _, r in ratios), "where": worst_case,
            "n": len(ratios)}


def _ratios(rows, num, den, mode, keep=lambda r: True):
    index = {(r["case"], r["mode"], r["contender"]): r for r in rows if r.get("median_s")}
    for (case, m, name), r in index.items():
        if name == num and m == mode and keep(r):
            other = index.get((case, m, den))
            if other:
                yield case, r["median_s"] / other["median_s"]


def targets(rows: Sequence[dict], device: str) -> list[dict]:
    """The issue's targets, each with its worst ratio over the rows that apply.

    On CPU only the CPU target is measured; the GPU targets are reported as 'not run'
    here (their predicted counterparts are in the counted table)."""
    if device == "cpu":
        return [_check(f"CPU fused {mode} / PEFT LoRA <= 1.05",
                       _ratios(rows, "fused", "peft", mode), 1.05, True, "measured here")
                for mode in ("forward", "train_step")] + [
                _check(f"CPU patched PEFT {mode} / PEFT LoRA <= 1.0",
                       _ratios(rows, "peft_patched", "peft", mode), 1.0, True, "measured here")
                for mode in ("forward", "train_step")]
    full = lambda r: r.get("tokens") == r.get("target_tokens")
    out = [
        _check("fused forward / nn.Linear <= 1.10 at M <= 16",
               _ratios(rows, "fused", "linear", "forward", lambda r: r["tokens"] <= 16),
               1.10, True, device),
        _check("fused fwd+bwd / nn.Linear fwd+dx <= 1.15 at M = 8192",
               _ratios(rows, "fused", "linear", "fwd_bwd",
                       lambda r: r["tokens"] == 8192 and full(r)), 1.15, True, device),
    ]
    for mode in ("forward", "fwd_bwd", "train_step"):
        out.append(_check(f"PEFT LoRA / fused {mode} >= 1.3 at every shape",
                          ((c, 1 / v) for c, v in _ratios(rows, "fused", "peft", mode)),
                          1.3, False, device))
    out.append(_check("bnb Linear4bit+PEFT / fused NF4 forward >= 2.5 at M = 1",
                      ((c, 1 / v) for c, v in _ratios(rows, "fused_nf4", "bnb_peft", "forward",
                                                      lambda r: r["tokens"] == 1)),
                      2.5, False, device))
    return out


# ---------------------------------------------------------------- plots
def _short(case: str) -> str:
    return case.replace(" (r=", "\n(r=").replace(" M=", "\nM=")


def plot(rows: Sequence[dict], out_dir: Path) -> list[Path]:
    """``speedup_<mode>.png`` (vs each contender's baseline) and ``memory_<mode>.png``
    (peak bytes per contender), one bar group per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    cases = list(dict.fromkeys(r["case"] for r in rows))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        sel = [r for r in rows if r["mode"] == mode and r.get("median_s")]
        for metric, ylabel, fname, log in (
                ("speedup", "speed-up vs baseline (PEFT; NF4: bnb+PEFT)", "speedup", False),
                ("peak_mem_mb", "peak memory of one call (MB)", "memory", True)):
            names = list(dict.fromkeys(r["contender"] for r in sel if r.get(metric)))
            if not names:
                continue
            fig, ax = plt.subplots(figsize=(min(18.0, max(8.0, 0.6 * len(cases))), 5.5))
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                vals = {r["case"]: r[metric] for r in sel if r["contender"] == name}
                xs = [j + i * width for j, c in enumerate(cases) if vals.get(c)]
                ax.bar(xs, [vals[c] for c in cases if vals.get(c)], width, label=name)
            if metric == "speedup":
                ax.axhline(1.0, color="black", linewidth=0.8)
            if log:
                ax.set_yscale("log")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
            ax.set_xticklabels([_short(c) for c in cases], rotation=90, fontsize=6)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode} ({sel[0].get('device', '')}, {sel[0].get('dtype', '')})")
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{fname}_{mode}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
