"""Per-shape launch plans, cached: a repeated call goes straight to the compiled kernels.

The first call of a shape runs the launchers' builders (``launch.py``), which name every
tensor they pass on a ``Call`` (inputs, the outputs and workspace they allocate) and return
their launches; ``Recipe`` keeps, per launch, the arguments the shape fixes, which kernel
argument takes which named tensor or per-call scalar, and the config the kernel chose. A
later call with the same key (shapes, strides, dtypes, device, flags, plan and tuning
state: ``key``) allocates the same outputs and launches: no plan, no config pruning, no
argument building.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from . import plan, tuning

# arguments that change from call to call at a fixed shape: never part of a recipe
PER_CALL = ("dropout_p", "dropout_rows", "grad_rows")


_fill: Optional[float] = None


@contextlib.contextmanager
def filled_outputs(value: float = float("nan")):
    """Every output the launchers allocate in the block starts filled with ``value`` (tests
    poison outputs with NaN, so an element a kernel forgot to write cannot pass)."""
    global _fill
    previous, _fill = _fill, float(value)
    try:
        yield
    finally:
        _fill = previous


def empty_output(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here."""
    if _fill is not None:
        return torch.full(shape, _fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_counters: dict = {}
_retired: list = []


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for a split reduction on ``device``'s current stream
    (one buffer per stream: launches on one stream run in order, and each leaves its
    counters at zero again). Grown, never freed: a CUDA graph that captured a smaller
    buffer keeps pointing at live memory."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    counters = _counters.get((device, stream))
    if counters is None or counters.numel() < n:
        if counters is not None:
            _retired.append(counters)
        counters = _counters[device, stream] = torch.zeros(max(n, 1024), dtype=torch.int32,
                                                            device=device)
    return counters


@dataclasses.dataclass
class Step:
    """One launch of a recipe (also the memo ``TunedKernel.run`` keeps its config in)."""

    kernel: tuning.TunedKernel
    static: dict
    slots: tuple                # (kernel argument, name of a tensor or scalar of the call)
    config: Optional[object] = None
    grid: Optional[tuple] = None


class Call:
    """The named tensors and scalars of one call, and what it allocated (to replay)."""

    def __init__(self, device: torch.device, **values):
        self.device, self.values, self.allocations = device, dict(values), []

    def output(self, name: str, shape, dtype) -> torch.Tensor:
        """A kernel output (``empty_output``: NaN-poisoned in tests)."""
        self.allocations.append(("output", name, tuple(shape), dtype))
        tensor = self.values[name] = empty_output(shape, dtype, self.device)
        return tensor

    def workspace(self, name: str, numel: int) -> torch.Tensor:
        """fp32 scratch the kernels write before they read it."""
        self.allocations.append(("workspace", name, numel, torch.float32))
        tensor = self.values[name] = torch.empty(numel, dtype=torch.float32, device=self.device)
        return tensor

    def counters(self, name: str, n: int) -> torch.Tensor:
        """Zeroed arrival counters of this stream (``arrival_counters``)."""
        self.allocations.append(("counters", name, n, None))
        tensor = self.values[name] = arrival_counters(self.device, n)
        return tensor


class Recipe:
    """The launches of a call shape, replayable with other tensors of that shape."""

    def __init__(self, call: Call, launches: list, results: tuple):
        names = {}
        for name, value in call.values.items():  # the first name a tensor got wins
            if isinstance(value, torch.Tensor):
                names.setdefault(id(value), name)
        self.allocations, self.results, self.steps = call.allocations, results, []
        for kernel, args in launches:
            static, slots = {}, []
            for arg, value in args.items():
                if arg in PER_CALL:
                    slots.append((arg, arg))
                elif isinstance(value, torch.Tensor):
                    slots.append((arg, names[id(value)]))
                else:
                    static[arg] = value
            self.steps.append(Step(kernel, static, tuple(slots)))

    def run(self, call: Call) -> tuple:
        """Launch every step with ``call``'s tensors (allocating outputs as the first call
        did, unless ``call`` already holds them) and return the result tensors."""
        values = call.values
        for kind, name, size, dtype in self.allocations:
            if name not in values:
                if kind == "output":
                    call.output(name, size, dtype)
                elif kind == "workspace":
                    call.workspace(name, size)
                else:
                    call.counters(name, size)
        for step in self.steps:
            args = step.static.copy()
            for arg, name in step.slots:
                args[arg] = values[name]
            step.kernel.run(args, step)
        return tuple([values[name] for name in self.results])


_recipes: dict = {}


def key(rows: int, *parts) -> tuple:
    """A recipe key: the call's shape parts plus what else decides its launches (the forced
    plan, the tuning state, and at compute-bound ``rows`` the opt-in segmented kernels)."""
    return (parts, plan.forced_state(), tuning.state(), plan.segmented_opt_in(rows))


def cached(recipe_key: tuple, build, call: Call) -> tuple:
    """Run the recipe of ``recipe_key``, building it with ``build(call) -> (launches,
    result names)`` on first use. Not kept while a CUDA graph is captured (configs chosen
    then are the untimed heuristic's)."""
    recipe = _recipes.get(recipe_key)
    if recipe is None:
        launches, results = build(call)
        recipe = Recipe(call, launches, results)
        if not tuning.stream_capturing():
            _recipes[recipe_key] = recipe
    return recipe.run(call)
