"""Time every contender on identical inputs; print a table, write CSV/JSON/PNG.

For every case (layer shape x tokens M x adapter rank R) all contenders get the same
inputs (one :class:`~benchmarks.contenders.Problem`, cloned into a rotation pool), are
checked against the float64 reference, then timed in every mode: forward (inference),
backward, fwd_bwd, train_step. Each row records median and IQR of the time, peak memory
of one call, achieved TFLOP/s and GB/s against the op's compulsory work (its floor:
every operand read once, every result written once; ``speclora_kernels.tools.floors``),
the speed-up over the contender's baseline (PEFT LoRA; for NF4, bnb Linear4bit + PEFT),
the ratio to ``nn.Linear`` and the environment (GPU, driver, versions, commit, threads).

On CPU the run also collects the interpreter-counted figures and predicted H100 times
(``benchmarks.counted``, in a subprocess with ``TRITON_INTERPRET=1``); every run adds the
compile report (``speclora_kernels.tools.compile_report`` for sm_90). ``--no-counted``
and ``--compile none`` skip them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import report
from .contenders import ADAPTERS, BASELINE, CONTENDERS, Unavailable, check_gradients, check_output, make_problem
from .env import ROOT, environment
from .shapes import MODEL_SHAPES, MODES, PROFILES, SMOKE_SHAPE, Case, select
from .timing import (
    GRAPH_MAX_TOKENS,
    Rotation,
    cache_bytes,
    mode_callable,
    peak_memory,
    rotation_count,
    time_cuda,
    time_interleaved,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RESULTS = ROOT / "benchmarks" / "results"


def model_work(case: Case, problem, mode: str, adapter: bool, nf4: bool) -> tuple[int, int]:
    """(FLOPs, bytes) of the op's floor in ``mode`` (train_step: as fwd_bwd)."""
    from speclora_kernels.tools.floors import backward_floor, forward_floor, nf4_weight_bytes

    k_in, n_out = case.shape.in_features, case.shape.out_features
    rank = problem.rank if adapter else 0
    grads = problem.grad_rows if adapter else 0
    wbytes = nf4_weight_bytes(n_out, k_in) if nf4 else None
    kw = dict(dtype=problem.x.dtype, weight_bytes=wbytes)
    fwd = forward_floor(case.tokens, k_in, n_out, rank, bias=problem.bias is not None, **kw)
    bwd = backward_floor(case.tokens, k_in, n_out, rank, grad_down_rows=grads,
                         grad_up_cols=grads, **kw)
    cost = {"forward": fwd, "backward": bwd}.get(mode, fwd + bwd)
    return cost.flops, cost.bytes


def measure_case(case: Case, *, modes, names, device, dtype, adapter, dropout, budget,
                 max_sets, seed=0, log=print) -> list[dict]:
    """Check then time every contender in ``names`` on ``case``; one row per (mode, name)."""
    problem = make_problem(case, dtype=dtype, device=device, adapter=adapter,
                           dropout_p=dropout, seed=seed)
    # do_bench flushes L2 before every call, so on CUDA only graph replays need a pool.
    graphs = torch.device(device).type != "cuda" or case.tokens <= GRAPH_MAX_TOKENS
    sets = rotation_count(problem.nbytes(), cache_bytes(device), max_sets) if graphs else 1
    problems = [problem] + [problem.clone() for _ in range(sets - 1)]
    common = {"case": case.label, "shape": case.shape.name, "models": "/".join(case.shape.models),
              "in_features": case.shape.in_features, "out_features": case.shape.out_features,
              "bias": case.shape.bias, "tokens": case.tokens, "target_tokens": case.target_tokens,
              "rank": case.rank.total, "r": case.rank.r, "k": case.rank.k, "adapter": adapter,
              "dtype": str(dtype).removeprefix("torch."), "dropout": dropout, "sets": sets}
    rows, errors = [], {}
    for name in names:
        try:
            build = CONTENDERS[name]
            errors[name] = max(check_output(name, problem, build(problem)),
                               check_gradients(name, problem, build))
        except Unavailable as err:
            log(f"  {name}: unavailable ({err})")
            rows.extend({**common, "mode": m, "contender": name, "status": f"unavailable: {err}"}
                        for m in modes)
    for mode in modes:
        # Fresh contenders per mode: no state (optimizer moments, bnb's in-place CPU
        # repacking on an eval call) carries from one mode into the next.
        bounds = {name: [CONTENDERS[name](q) for q in problems] for name in errors}
        fns = {name: Rotation([mode_callable(b, q, mode) for b, q in zip(bs, problems)])
               for name, bs in bounds.items()}
        if torch.device(device).type == "cuda":
            timings = {name: time_cuda(fn, case.tokens) for name, fn in fns.items()}
        else:
            timings = time_interleaved(fns, **budget)
        for name, fn in fns.items():
            bound = bounds[name][0]
            mem, mem_how = peak_memory(fn, device)
            flops, nbytes = model_work(case, problem, mode, bound.adapter, bound.nf4)
            t = timings[name]
            rows.append({**common, "mode": mode, "contender": name, "status": "ok",
                         "median_s": t.median, "iqr_s": t.iqr, "samples": len(t.samples),
                         "median_us": t.median * 1e6, "iqr_us": t.iqr * 1e6, "timer": t.timer,
                         "peak_mem_bytes": mem, "peak_mem_mb": mem / 1e6, "mem_method": mem_how,
                         "floor_flops": flops, "floor_bytes": nbytes,
                         "tflops": flops / t.median / 1e12, "gbps": nbytes / t.median / 1e9,
                         "max_rel_err": errors[name]})
    return rows


def _subprocess(args: list[str], interpret: bool, log=print) -> tuple[int, str]:
    """Run ``python -m ...`` in a fresh interpreter (TRITON_INTERPRET must be set, or
    unset, before triton is imported); echo and return its exit status and stdout."""
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    log(f"$ python {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, text=True,
                          capture_output=True)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        log(f"exit status {done.returncode}:\n{done.stderr[-2000:]}")
    return done.returncode, done.stdout


def counted(out: Path, log=print) -> dict | None:
    """Interpreter-counted figures and predicted H100 times (``benchmarks.counted``)."""
    rc, _ = _subprocess(["-m", "benchmarks.counted", "--json", str(out / "counted.json"),
                         "--markdown", str(out / "counted.md")], True, log)
    return json.loads((out / "counted.json").read_text()) if rc == 0 else None


def compile_report(out: Path, quick: bool, log=print) -> dict:
    """``speclora_kernels.tools.compile_report`` for sm_90: registers, spills, shared
    memory and HGMMA use of every kernel config (exit status 1 = a failing row)."""
    args = ["-m", "speclora_kernels.tools.compile_report", "--archs", "90",
            "--json", str(out / "compile.json")] + (["--quick"] if quick else [])
    rc, stdout = _subprocess(args, False, log)
    (out / "compile.txt").write_text(f"$ python {' '.join(args)}\n\n{stdout}")
    path = out / "compile.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    return {"command": "python " + " ".join(args), "exit_status": rc, "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="gpu" if cuda else "cpu",
                    help="case grid (default: gpu on CUDA, cpu otherwise): "
                    + "; ".join(f"{p.name}: {p.description}" for p in PROFILES.values()))
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32",
                    help="activation/weight dtype (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--shapes", nargs="+", metavar="SHAPE",
                    choices=[s.name for s in MODEL_SHAPES] + [SMOKE_SHAPE.name],
                    help="shape names to keep: " + ", ".join(s.label for s in MODEL_SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, help="M values to keep (run or target)")
    ap.add_argument("--ranks", nargs="+", type=int, help="R totals to keep (24, 32, 40, 48)")
    ap.add_argument("--modes", nargs="+", choices=MODES, help="modes to run")
    ap.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    ap.add_argument("--adapter", choices=ADAPTERS, default="lora",
                    help="lora: all R rows trainable (exactly PEFT's rank-R LoRA); speclora: "
                    "ours trains r rows and keeps k spectral rows frozen, PEFT still rank R")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout in training modes")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (recorded)")
    ap.add_argument("--max-sets", type=int, default=None,
                    help="cap on rotated input sets (default 64 on CUDA, 4 on CPU)")
    ap.add_argument("--budget", type=float, default=None,
                    help="CPU seconds per (case, mode) after the minimum rounds")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results/<profile>-<device>-<time>)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-counted", action="store_true",
                    help="skip the interpreter-counted figures and predicted H100 times")
    ap.add_argument("--compile", choices=("quick", "full", "none"), default="quick",
                    help="compile report for sm_90 (default quick: decode + train scenarios)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    profile = select(PROFILES[args.profile], args.shapes, args.tokens, args.ranks, args.modes)
    cuda = device.type == "cuda"
    budget = dict(min_rounds=profile.min_rounds, max_rounds=profile.max_rounds,
                  budget_s=args.budget if args.budget is not None else profile.budget_s,
                  sample_s=profile.sample_s)
    out = args.out or RESULTS / f"{profile.name}-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    command = " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    print(f"# {command}\n# profile {profile.name}: {profile.description}")
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    if not cuda and env["triton_interpret"] == "1":
        print("# TRITON_INTERPRET=1: the fused rows time the Triton interpreter, not the CPU "
              "path; unset it for meaningful CPU times")

    rows, t0 = [], time.perf_counter()
    for i, case in enumerate(profile.cases):
        print(f"[{i + 1}/{len(profile.cases)}] {case.label}", flush=True)
        rows += measure_case(case, modes=profile.modes, names=args.contenders, device=device,
                             dtype=dtype, adapter=args.adapter, dropout=args.dropout,
                             budget=budget, max_sets=args.max_sets or (64 if cuda else 4),
                             seed=args.seed)
    rows = [{**env, **r} for r in rows]
    report.add_ratios(rows, BASELINE)
    goals = report.targets(rows, device.type)
    elapsed = time.perf_counter() - t0

    doc = {"command": command, "profile": profile.name, "description": profile.description,
           "env": env, "elapsed_s": elapsed, "targets": goals, "rows": rows}
    if not cuda and not args.no_counted:
        doc["counted"] = counted(out)
    if args.compile != "none":
        doc["compile"] = compile_report(out, args.compile == "quick")
    report.write_csv(rows, out / "results.csv")
    report.write_json(doc, out / "results.json")
    plots = [] if args.no_plots else report.plot(rows, out)

    timed = [r for r in rows if r.get("status") == "ok"]
    wide, columns = report.pivot(timed, list(CONTENDERS))
    table = report.markdown_table(wide, columns)
    goals_md = report.markdown_table(goals, report.TARGET_COLUMNS)
    (out / "table.md").write_text(f"`{command}`\n\nMedian µs ± half the IQR; ratios of "
                                  f"medians.\n\n{table}\n\n{goals_md}\n")
    (out / "rows.md").write_text(report.markdown_table(timed, report.TABLE_COLUMNS) + "\n")
    brief = report.markdown_table(*report.summary(timed))
    (out / "summary.md").write_text(f"`{command}`\n\n{brief}\n\n{goals_md}\n")
    print(table, brief, goals_md, sep="\n\n")
    skipped = sorted({(r["contender"], r["status"]) for r in rows if r.get("status") != "ok"})
    for name, why in skipped:
        print(f"skipped {name}: {why}")
    print(f"\n{len(timed)} rows in {elapsed:.0f} s -> {out}/ (results.csv, results.json, "
          f"table.md, summary.md, rows.md{', ' + str(len(plots)) + ' plots' if plots else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
