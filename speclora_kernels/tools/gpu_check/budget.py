"""The plan: which checks run within ``--budget`` seconds, from a table of estimated costs.

``make_plan`` is a pure function of the budget, the host's cores, the GPU count and a cost
table, so it is tested on CPU. Order of priority, each item planned only if the estimated
total still fits:

1. the timings the project's claims rest on: the device ceilings and each timing pair's
   key points (decode at M = 1 and 16, a training step at M = 4096, NF4 against dense, ours
   against PEFT-style LoRA), trimmed from their tail only when even they do not fit;
2. correctness: the op cases (the covering design at least, trimmed from its tail when
   even it does not fit; more cases with more budget: ``CORRECTNESS_SHARE`` of it), the
   dropout mask, the layer checks, every autotune config forced once (trimmable);
3. runtime behaviour: the CUDA-graph training step, two devices, the tuning checks,
   ``torch.compile``, then the op test files under pytest (trimmable down to a minimum);
4. the rest of the timings: the streaming scan, then each pair's other points (trimmable,
   point by point).

The key timings cost a few tens of seconds and nothing else can tell whether the kernels
are fast, so they come before the rest of correctness; correctness is never dropped for
the other timings. Pool items run in the worker pool (``min(cores, 8)`` processes,
compile-bound: their cost is CPU-seconds, divided among the workers); serial items run alone
in the main process (wall-clock measurements, and the devices). The estimates are seconds
on a cold Triton cache; ``DEFAULT_COSTS`` says where each comes from. The report lists every
item's estimate beside its measured seconds, so the table can be corrected from a real run
(``--costs FILE``); ``describe`` prints a plan before the run starts.
"""
from __future__ import annotations

import dataclasses
import math

CORRECTNESS_SHARE = 0.25   # of the usable budget, for op cases, once the cover fits
MIN_CASES = 8              # never fewer, whatever the budget
MAX_WORKERS = 8

# Estimated seconds (cold Triton cache, H100/H200-class host). CPU-seconds for pool items.
DEFAULT_COSTS = {
    "startup": 10.0,          # main process: torch + triton import, CUDA init, device facts
    "report": 2.0,            # writing report.json / report.md
    "pool_start": 15.0,       # spawn the workers: each imports torch + the library, inits CUDA
    "case": 6.0,              # one op case: ~3 kernel compiles (1-3 s each) + fp64 reference
    "layer": 8.0,             # one AdapterLinear check: SVD, fwd + bwd compiles, fp64 recompute
    "forced_config": 3.0,     # one autotune config forced: one new compile + one fwd/bwd
    "dropout_mask": 15.0,     # fused / split / segmented fwd + dx at fp32, masks recovered
    "graph_step": 30.0,       # AdapterLinear step: compiles, warm-up, capture, 2 replays
    "compile_step": 120.0,    # torch.compile(mode="reduce-overhead"): Inductor, cold
    "tuning_first_call": 45.0,  # 4096^2 bf16: compile + time every candidate once
    "tuning_threads": 15.0,   # a second bucket, two threads
    "tuning_processes": 25.0,  # two fresh processes in parallel, heuristic choices only
    "devices": 20.0,          # op + NF4 dequantizer on cuda:1, the two-device error
    "pytest": 180.0,          # test_ops, test_ops_nf4, test_tuning on CUDA, -n workers
    "pytest_min": 60.0,       # below this the test files are not worth starting
    "ceilings": 6.0,          # device copy bandwidth, bf16 matmul rate
    "stream_scan": 15.0,      # streaming kernel at 1 .. 2 x SMs programs
    "prewarm_point": 20.0,    # CPU-seconds: compile a timing point's configs in the pool
}

# (name, check it reports under, stage, cost key, needs two GPUs)
FIXED_ITEMS = [
    ("dropout_mask", "dropout_mask", "pool", "dropout_mask", False),
    ("layers", "correctness.layers", "pool", "layer", False),
    ("forced_configs", "correctness.forced_configs", "pool", "forced_config", False),
    ("graph_step", "graph_step", "pool", "graph_step", False),
    ("devices", "devices", "pool", "devices", True),
    ("tuning_first_call", "tuning.first_call", "serial", "tuning_first_call", False),
    ("tuning_threads", "tuning.threads", "serial", "tuning_threads", False),
    ("tuning_processes", "tuning.processes", "serial", "tuning_processes", False),
    ("compile_step", "compile_step", "pool", "compile_step", False),
]
TRIMMABLE = {"layers", "forced_configs"}


@dataclasses.dataclass
class Item:
    """One planned piece of work: ``units`` of it (cases, configs, points, or seconds for
    pytest), its stage, and its estimated seconds (wall-clock it adds to the run)."""

    name: str
    check: str
    stage: str
    units: int
    estimate: float


@dataclasses.dataclass
class Plan:
    budget: float
    cores: int
    gpus: int
    workers: int
    cover_cases: int
    items: list
    skipped: list           # (name, check, reason)
    estimate: float         # estimated wall-clock of the whole run

    def get(self, name: str):
        return next((i for i in self.items if i.name == name), None)

    def units(self, name: str) -> int:
        item = self.get(name)
        return item.units if item else 0

    def order(self) -> list[str]:
        return [i.name for i in self.items]

    def to_dict(self) -> dict:
        return {"budget_s": self.budget, "cores": self.cores, "gpus": self.gpus,
                "workers": self.workers, "cover_cases": self.cover_cases,
                "estimate_s": round(self.estimate, 1),
                "items": [dataclasses.asdict(i) for i in self.items],
                "skipped": [{"name": n, "check": c, "reason": r} for n, c, r in self.skipped]}


class _Pool:
    """Wall-clock of the pool stage: start-up, then the jobs spread over the workers, never
    less than its longest job."""

    def __init__(self, workers: int, start: float):
        self.workers, self.start, self.total, self.longest = workers, start, 0.0, 0.0

    def wall(self, extra: float = 0.0, longest: float = 0.0) -> float:
        total = self.total + extra
        if total == 0:
            return 0.0
        return self.start + max(total / self.workers, self.longest, longest)

    def add(self, cpu_seconds: float, longest: float) -> None:
        self.total += cpu_seconds
        self.longest = max(self.longest, longest)


def workers_for(cores: int) -> int:
    return max(1, min(int(cores), MAX_WORKERS))


def make_plan(budget: float, cores: int, gpus: int, costs: dict | None = None, *,
              cover_cases: int, max_cases: int, layer_jobs: int, forced_configs: int,
              timing_items: list = (), pytest_skip: str | None = None) -> Plan:
    """The checks that fit ``budget`` seconds, in priority order (see the module docstring).

    ``timing_items``: ``(name, points, seconds per point, prewarm jobs, skip reason or
    None, key points, prewarm jobs of the key points)`` per registered timing pair, in the
    order they should be measured (``timings.planner_items``). ``pytest_skip``: why the
    pytest stage cannot run here (``runtime.pytest_skip``), or None.
    """
    c = {**DEFAULT_COSTS, **(costs or {})}
    workers = workers_for(cores)
    usable = max(0.0, budget - c["startup"] - c["report"])
    pool = _Pool(workers, c["pool_start"])
    items, skipped = [], []
    serial = 0.0      # wall-clock of everything outside the pool

    def spent(extra_pool=0.0, longest=0.0, extra_serial=0.0):
        return pool.wall(extra_pool, longest) + serial + extra_serial

    def left():
        return max(0.0, usable - spent())

    def timing_points(first, last, per_point, prewarm_jobs, reserve=0.0):
        """How many of points ``first+1 .. last`` fit (their prewarm jobs come with them),
        leaving ``reserve`` CPU-seconds of pool work room."""
        nonlocal serial
        warm = prewarm_jobs * c["prewarm_point"]
        fit = last - first
        while fit and spent(warm + reserve, c["prewarm_point"] if warm else 0.0,
                            fit * per_point) > usable:
            fit -= 1
        if fit:
            pool.add(warm, c["prewarm_point"] if warm else 0.0)
            serial += fit * per_point
        return fit

    def serial_timing(name):
        nonlocal serial
        if spent(extra_serial=c[name]) <= usable:
            serial += c[name]
            items.append(Item(name, f"timings.{name}", "timing", 1, c[name]))
        else:
            skipped.append((name, f"timings.{name}",
                            f"budget: needs ~{c[name]:.0f} s, {left():.0f} s left"))

    # 1. the key timings, leaving room for the fewest op cases ever run
    min_cases = MIN_CASES * c["case"]
    serial_timing("ceilings")
    pairs = {}
    for name, points, per_point, prewarm, reason, key, key_prewarm in timing_items:
        check = f"timings.{name}"
        if reason:
            skipped.append((name, check, reason))
            continue
        before = spent()
        fit = timing_points(0, min(key, points), per_point, key_prewarm, min_cases) if key else 0
        item = Item(name, check, "timing", fit, spent() - before)
        pairs[name] = (item, points, per_point, prewarm, key_prewarm if fit else 0)
        if fit:
            items.append(item)

    # 2. op cases: the cover if the budget left allows it, and at least CORRECTNESS_SHARE
    per_case = c["case"]
    room = left()
    cover_wall = c["pool_start"] + cover_cases * per_case / workers
    target = max(CORRECTNESS_SHARE * room, min(cover_wall, room))
    n_cases = math.floor((target - c["pool_start"]) * workers / per_case)
    n_cases = max(MIN_CASES, min(max_cases, n_cases))
    pool.add(n_cases * per_case, per_case)
    items.append(Item("cases", "correctness.cases", "pool", n_cases,
                      n_cases * per_case / workers))

    # 2, 3. the rest of correctness, runtime behaviour
    for name, check, stage, key, two_gpus in FIXED_ITEMS:
        if two_gpus and gpus < 2:
            skipped.append((name, check, "skipped: one GPU"))
            continue
        units = {"layers": layer_jobs, "forced_configs": forced_configs}.get(name, 1)
        cost = c[key]
        if stage == "pool":
            fit = units
            if name in TRIMMABLE:
                while fit and spent(fit * cost, cost) > usable:
                    fit -= 1
            if fit and spent(fit * cost, cost) <= usable:
                before = pool.wall()
                pool.add(fit * cost, cost)
                items.append(Item(name, check, stage, fit, pool.wall() - before))
                if fit < units:
                    skipped.append((name, check, f"budget: {units - fit} of {units} left out "
                                                 f"(~{cost:.0f} CPU-s each)"))
                continue
        elif spent(extra_serial=cost) <= usable:
            serial += cost
            items.append(Item(name, check, stage, 1, cost))
            continue
        needs = units * cost / workers if stage == "pool" else cost
        skipped.append((name, check, f"budget: needs ~{needs:.0f} s, {left():.0f} s left"))

    if pytest_skip:
        skipped.append(("pytest", "pytest", pytest_skip))
    elif left() >= c["pytest_min"]:
        seconds = min(c["pytest"], left())
        serial += seconds
        items.append(Item("pytest", "pytest", "pytest", int(seconds), seconds))
    else:
        skipped.append(("pytest", "pytest", f"budget: needs >= {c['pytest_min']:.0f} s, "
                                            f"{left():.0f} s left"))

    # 4. the rest of the timings, with what is left
    serial_timing("stream_scan")
    for name, (item, points, per_point, prewarm, warmed) in pairs.items():
        before = spent()
        more = timing_points(item.units, points, per_point, prewarm - warmed)
        if more and not item.units:
            items.append(item)
        item.units += more
        item.estimate += spent() - before
        if not item.units:
            skipped.append((name, item.check, f"budget: needs ~{per_point + c['prewarm_point'] / workers:.0f} s "
                                              f"for one point, {left():.0f} s left"))
        elif item.units < points:
            skipped.append((name, item.check, f"budget: {points - item.units} of {points} points "
                                              f"left out (~{per_point:.0f} s each)"))
    return Plan(budget, cores, gpus, workers, cover_cases, items, skipped,
                c["startup"] + c["report"] + spent())


def describe(plan: Plan, point_labels: dict | None = None) -> str:
    """The plan as text, printed before a run starts: what runs, in priority order, with
    its estimate (and, given each timing pair's point labels, the points it times), and
    what is left out and why."""
    lines = [f"plan for {plan.budget:.0f} s on {plan.cores} cores, {plan.gpus} GPU(s), "
             f"{plan.workers} workers: ~{plan.estimate:.0f} s estimated"]
    for i in plan.items:
        lines.append(f"  run   {i.check:<28} {i.units:>5} {_unit(i):<7} ~{i.estimate:5.1f} s")
        labels = (point_labels or {}).get(i.name, [])[:i.units]
        lines += [f"          {label}" for label in labels]
    lines += [f"  leave {check:<28} {reason}" for _, check, reason in plan.skipped]
    return "\n".join(lines)


def _unit(item: Item) -> str:
    if item.stage == "timing":
        return "points" if item.units > 1 or item.name not in ("ceilings", "stream_scan") else ""
    return {"cases": "cases", "layers": "layers", "forced_configs": "configs",
            "pytest": "s"}.get(item.name, "")
