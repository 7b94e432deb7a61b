"""``python -m speclora_kernels.tools.gpu_check --out DIR [--budget SECONDS]``

Proves on a CUDA GPU what the CPU cannot (see the package docstring): plans its work within
``--budget`` seconds from a cold Triton cache (``budget.make_plan``), runs the correctness
and runtime jobs in a pool of worker processes, then the wall-clock checks, the op test
files and the timings alone, and writes ``DIR/report.json`` and ``DIR/report.md`` (also
after each stage, so a run stopped from outside still leaves one). Exit status: 0 if every
check that ran passed, 1 otherwise, 2 without a CUDA GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time

GRACE_S = 60   # past the budget, a stuck check is abandoned and the report written
_START = time.monotonic()  # the budget counts from here (the package imports just before)
PROG = "python -m speclora_kernels.tools.gpu_check"
NEEDS_CUDA = (f"{PROG} needs a CUDA GPU: torch.cuda.is_available() is False on this machine")


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1])
    p.add_argument("--out", required=True, help="folder for report.json and report.md")
    p.add_argument("--budget", type=float, default=300.0,
                   help="seconds the whole run may take, from a cold Triton cache (300)")
    p.add_argument("--seed", type=int, help="seed of every random input (default: drawn, "
                                            "and written in the report)")
    p.add_argument("--workers", type=int, help="pool processes (default min(cores, 8))")
    p.add_argument("--costs", help="JSON file of cost-table overrides (budget.DEFAULT_COSTS "
                                   "keys, seconds)")
    p.add_argument("--plan-only", action="store_true",
                   help="print the plan for this budget and exit (no GPU needed; --cores and "
                        "--gpus describe the machine)")
    p.add_argument("--cores", type=int, help="with --plan-only: the host's cores (default: "
                                             "this one's)")
    p.add_argument("--gpus", type=int, default=1, help="with --plan-only: GPUs (1)")
    return p.parse_args(argv)


def make_plan(args, cores: int, gpus: int):
    """The run's plan (``budget.make_plan`` over the registered checks), and the forced-
    config jobs it trims."""
    from . import budget, cases, correctness, runtime, timings

    costs = {**budget.DEFAULT_COSTS, **(json.load(open(args.costs)) if args.costs else {})}
    forced = correctness.forced_config_jobs()
    plan = budget.make_plan(
        args.budget, cores, gpus, costs,
        cover_cases=len(cases.covering_design()), max_cases=cases.product_size(),
        layer_jobs=len(correctness.LAYER_METHODS) * len(correctness.LAYER_DTYPES),
        forced_configs=len(forced), timing_items=timings.planner_items(),
        pytest_skip=runtime.pytest_skip())
    return plan, costs, forced


def point_labels() -> dict:
    """Each timing pair's points, in the order the plan takes them."""
    from . import timings

    return {name: [p.label for p in pair.points] for name, pair in timings.REGISTRY.items()}


class BudgetExceeded(Exception):
    pass


def _alarm(signum, frame):
    raise BudgetExceeded("the run outlasted its budget by more than the grace period")


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "?"
    except Exception:  # noqa: BLE001 - a fact for the report, not a requirement
        return "?"


class Runner:
    def __init__(self, args, torch, t0: float | None = None):
        self.args, self.torch = args, torch
        self.t0 = time.monotonic() if t0 is None else t0
        self.deadline = self.t0 + args.budget
        self.seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4),
                                                                           "little") % 2**31
        self.cores = args.workers or os.cpu_count() or 1
        self.plan, self.costs, self.forced = make_plan(args, self.cores,
                                                       torch.cuda.device_count())
        props = torch.cuda.get_device_properties(0)
        import triton

        self.meta = {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                     "sms": props.multi_processor_count,
                     "memory_GiB": round(props.total_memory / 2**30, 1),
                     "gpus": torch.cuda.device_count(), "driver": _driver(),
                     "cuda": torch.version.cuda, "torch": torch.__version__,
                     "triton": triton.__version__, "python": platform.python_version(),
                     "cores": os.cpu_count(), "workers": self.plan.workers,
                     "seed": self.seed, "budget_s": args.budget}
        self.results = []

    # ------------------------------------------------------------ bookkeeping
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self):
        from . import report

        self.meta["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        done = {r.name for r in self.results}
        planned_out = [report.skipped(check, reason) for name, check, reason in self.plan.skipped
                       if check not in done]
        return report.write(self.args.out, self.meta, self.plan.to_dict(),
                            self.results + planned_out)

    def estimate(self, name) -> float:
        item = self.plan.get(name)
        return item.estimate if item else 0.0

    def fits(self, name, minimum: float | None = None) -> bool:
        """Planned, and (stages before it may have run long) still time for most of it, or
        for ``minimum`` seconds of it."""
        item = self.plan.get(name)
        if item is None:
            return False
        if self.left() >= (0.75 * item.estimate if minimum is None else minimum) + 2:
            return True
        from . import report

        self.results.append(report.skipped(item.check, f"out of time: {self.left():.0f} s "
                                                       f"left, needs ~{item.estimate:.0f} s "
                                                       f"(earlier stages ran long)",
                                           item.estimate))
        return False

    def guarded(self, check: str, estimate: float, fn):
        """Run ``fn() -> CheckResult``; a check that raises is an error entry."""
        from . import report

        t0 = time.monotonic()
        try:
            result = fn()
        except BudgetExceeded:
            raise
        except Exception as e:  # noqa: BLE001 - a broken check is reported, the run goes on
            import traceback

            result = report.CheckResult(check, "error", time.monotonic() - t0, estimate,
                                        f"{type(e).__name__}: {str(e)[:200]}",
                                        reason=traceback.format_exc()[-2000:])
        self.results.append(result)
        self.save()
        return result

    # ------------------------------------------------------------ stages
    def pool_jobs(self) -> list:
        from . import cases, correctness, timings

        jobs, plan = [], self.plan

        def add(kind, jid, **payload):
            jobs.append({"id": jid, "kind": kind,
                         "payload": {**payload, "seed": (self.seed + 7919 * len(jobs)) % 2**31}})

        for name in ("compile_step", "graph_step", "devices", "dropout_mask"):
            if plan.get(name):
                add(name, name)
        self.cases = cases.correctness_cases(plan.units("cases"))
        for case in self.cases:
            add("case", case["id"], case=case)
        layers = [{"method": m, "dtype": d} for m in correctness.LAYER_METHODS
                  for d in correctness.LAYER_DTYPES]
        self.n_layers, self.layers = len(layers), layers[:plan.units("layers")]
        for i, layer in enumerate(self.layers):
            add("layer", f"layer{i}", **layer)
        by_kernel = {}
        for job in self.forced:   # round-robin over kernels, so trimming keeps a spread
            by_kernel.setdefault(job["kernel"], []).append(job)
        spread = [j for group in zip(*[g + [None] * (max(map(len, by_kernel.values())) - len(g))
                                       for g in by_kernel.values()]) for j in group if j]
        self.forced_run = spread[:plan.units("forced_configs")]
        for i, job in enumerate(self.forced_run):
            add("forced_config", f"forced{i}", **job)
        for pair in timings.REGISTRY.values():
            if plan.get(pair.name):
                for i, point in enumerate(pair.prewarm_points(plan.units(pair.name))):
                    add("prewarm", f"prewarm.{pair.name}{i}", pair=pair.name,
                        point=dataclasses.asdict(point))
        return jobs

    def pool_stage(self):
        from . import collect
        from .pool import Pool

        jobs = self.pool_jobs()
        estimate = sum(i.estimate for i in self.plan.items if i.stage == "pool")
        estimate += self.costs["pool_start"] if jobs else 0.0
        deadline = min(self.deadline - 5, time.monotonic() + max(1.5 * estimate, estimate + 30))
        pool = Pool(self.plan.workers)
        t0 = time.monotonic()
        done = {}

        def progress(job, result):
            done[job["id"]] = result
            if len(done) % 20 == 0:
                print(f"  pool: {len(done)}/{len(jobs)} jobs done", flush=True)

        print(f"pool: {len(jobs)} jobs on {self.plan.workers} workers "
              f"(estimated {estimate:.0f} s)", flush=True)
        out = pool.run(jobs, deadline, progress) if jobs else {}
        wall = time.monotonic() - t0
        self.meta["pool_s"] = round(wall, 1)
        self.meta["pool_start_s"] = round(pool.start_seconds or 0.0, 1)
        w = self.plan.workers

        def share(ids):
            return sum(out[i].get("seconds", 0.0) for i in ids) / w

        if self.plan.get("cases"):
            ids = [c["id"] for c in self.cases]
            self.results.append(collect.cases_check(
                self.cases, out, share(ids), self.estimate("cases"),
                planned_out=max(0, self.plan.cover_cases - len(self.cases))))
        single = {"dropout_mask": collect.dropout_check, "graph_step": collect.graph_check,
                  "compile_step": collect.compile_check, "devices": collect.devices_check}
        for name in ("dropout_mask", "graph_step", "devices", "compile_step"):
            if name in out:
                self.results.append(single[name](out[name], out[name].get("seconds", 0.0),
                                                 self.estimate(name)))
        if self.layers:
            pairs = [(layer, out[f"layer{i}"]) for i, layer in enumerate(self.layers)]
            self.results.append(collect.simple_check(
                "correctness.layers", pairs, share(f"layer{i}" for i in range(len(self.layers))),
                self.estimate("layers"), ("method", "dtype", "base", "rank"),
                left_out=self.n_layers - len(self.layers)))
        if self.forced_run:
            pairs = [(job, out[f"forced{i}"]) for i, job in enumerate(self.forced_run)]
            skipped_smem = sum(r.get("status") == "skipped" for _, r in pairs)
            self.results.append(collect.simple_check(
                "correctness.forced_configs", pairs,
                share(f"forced{i}" for i in range(len(self.forced_run))),
                self.estimate("forced_configs"), ("kernel", "config", "fits_shape"),
                left_out=len(self.forced) - len(self.forced_run),
                extra=f"forced {len(self.forced_run) - skipped_smem} of {len(self.forced)} "
                      f"configs ({skipped_smem} skipped: shared memory, "
                      f"{len(self.forced) - len(self.forced_run)} left out for time); the "
                      f"offline compile report covers every config's build",
                group_by="kernel"))
        prewarm = {k: v for k, v in out.items() if k.startswith("prewarm.")}
        self.meta["prewarm"] = {k: v.get("status") for k, v in prewarm.items()}
        self.save()

    def serial_stage(self):
        from . import collect
        from . import tuning_checks as tc

        stages = [("tuning_first_call", "tuning.first_call", tc.first_call_cost,
                   collect.tuning_first_call_check),
                  ("tuning_threads", "tuning.threads", tc.threads_on_cold_cache,
                   collect.tuning_threads_check),
                  ("tuning_processes", "tuning.processes", None,
                   collect.tuning_processes_check)]
        for name, check, fn, wrap in stages:
            if not self.fits(name):
                continue
            est = self.estimate(name)
            print(f"{check} (estimated {est:.0f} s)", flush=True)

            def run(fn=fn, wrap=wrap, est=est):
                t0 = time.monotonic()
                res = fn(self.seed) if fn else tc.choices_in_two_processes(
                    timeout=max(30.0, min(3 * est, self.left() - 5)))
                return wrap(res, time.monotonic() - t0, est)

            self.guarded(check, est, run)

    def pytest_stage(self):
        from . import collect, runtime

        if not self.fits("pytest", minimum=self.costs["pytest_min"] / 2):
            return
        limit = min(self.plan.units("pytest"), self.left() - 5)
        print(f"pytest (limit {limit:.0f} s)", flush=True)
        self.guarded("pytest", self.estimate("pytest"), lambda: collect.pytest_check(
            runtime.run_pytest(limit, self.plan.workers), self.estimate("pytest")))

    def timing_stage(self):
        from . import collect, timings

        sms = self.meta["sms"]
        simple = [("ceilings", timings.ceilings, collect.ceilings_check),
                  ("stream_scan", lambda: timings.stream_scan(sms=sms), collect.scan_check)]
        for name, fn, wrap in simple:
            if not self.fits(name):
                continue
            print(f"timings.{name}", flush=True)

            def run(fn=fn, wrap=wrap, name=name):
                t0 = time.monotonic()
                return wrap(fn(), time.monotonic() - t0, self.estimate(name))

            self.guarded(f"timings.{name}", self.estimate(name), run)
        for pair in timings.REGISTRY.values():
            item = self.plan.get(pair.name)
            if item is None or not self.fits(pair.name, minimum=pair.per_point_s + 5):
                continue
            print(f"timings.{pair.name}: {item.units} points", flush=True)

            def run(pair=pair, item=item):
                t0 = time.monotonic()
                until = min(self.deadline - 3, time.monotonic() + 1.3 * item.estimate + 10)
                res = timings.run_pair(pair, item.units, until, "cuda", self.seed)
                caveat = pair.caveat()
                return collect.timing_check(f"timings.{pair.name}", res,
                                            time.monotonic() - t0, item.estimate,
                                            pair.description + (f" ({caveat}: its "
                                                                "contenders left out)"
                                                                if caveat else ""))

            self.guarded(f"timings.{pair.name}", item.estimate, run)

    def run(self) -> int:
        from . import report
        from .budget import describe

        print(f"gpu_check on {self.meta['gpu']}: budget {self.args.budget:.0f} s, seed "
              f"{self.seed}", flush=True)
        print(describe(self.plan, point_labels()), flush=True)
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(max(0.0, self.left()) + GRACE_S))
        try:
            self.pool_stage()
            self.serial_stage()
            self.pytest_stage()
            self.timing_stage()
        except BudgetExceeded as e:
            self.results.append(report.CheckResult("budget", "error", 0.0, 0.0, str(e)))
        finally:
            signal.alarm(0)
        json_path, md_path = self.save()
        with open(md_path) as f:
            text = f.read()
        print(text.split("\n## ")[0])
        print(f"wrote {json_path} and {md_path}")
        return report.exit_status(self.results)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.plan_only:
        from .budget import describe

        print(describe(make_plan(args, args.cores or os.cpu_count() or 1, args.gpus)[0],
                       point_labels()))
        return 0
    import torch

    if not torch.cuda.is_available():
        print(NEEDS_CUDA, file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET"):
        # the package (imported before this module) read it: start again without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", __package__, *argv], env)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile-worker pools
    return Runner(args, torch, t0=_START).run()


if __name__ == "__main__":
    sys.exit(main())
