"""Turning a bound contender into timed callables, and timing them.

CPU: contenders of one (case, mode) run interleaved in one process, A B C, B C A, ...,
each sample being enough back-to-back calls to last ``sample_s``; median and IQR over
samples. CUDA: ``triton.testing.do_bench`` medians (it flushes L2 before every call)
after a warm-up that runs autotuning, or for M <= 16 (launch-bound) a CUDA graph of one
call per rotated input set, replayed. Rotated inputs: enough copies of every operand
that the pool is at least twice the L2 (the GPU's; on CPU the per-core one, up to
``--max-sets`` copies), so small shapes are not timed out of a warm cache.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .contenders import Bound, Problem

GRAPH_MAX_TOKENS = 16
"""M at or below which CUDA timing replays a CUDA graph (launch overhead dominates)."""


@dataclass
class Timing:
    """Per-call seconds of each sample, and how they were taken."""

    samples: list[float]
    timer: str

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        q = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q[2] - q[0]


# ---------------------------------------------------------------- mode callables
def mode_callable(bound: Bound, p: Problem, mode: str) -> Callable[[], None]:
    """A no-argument callable doing one ``mode`` step of ``bound`` on ``p``'s inputs.

    forward: inference under ``no_grad``. backward: ``y.backward(dy, retain_graph=True)``
    of one training forward built here (the Triton tutorials' way to time a backward).
    fwd_bwd: training forward + backward, ``x`` requiring grad as inside a network.
    train_step: fwd_bwd + AdamW step + zero_grad (no step for a contender with no
    trainable tensors, e.g. the frozen base matmul).
    """
    bound.set_training(mode != "forward")
    if mode == "forward":
        def forward():
            with torch.no_grad():
                bound.run(p.x)
        return forward

    x = p.x.detach().clone().requires_grad_(True)
    leaves = [x, *bound.params.values()]

    def clear():
        for t in leaves:
            t.grad = None

    if mode == "backward":
        y = bound.run(x)

        def backward():
            clear()
            y.backward(p.dy, retain_graph=True)
        return backward
    if mode == "fwd_bwd":
        def fwd_bwd():
            clear()
            bound.run(x).backward(p.dy)
        return fwd_bwd
    if mode == "train_step":
        params = list(bound.params.values())
        opt = (torch.optim.AdamW(params, lr=1e-4, capturable=x.is_cuda) if params else None)

        def train_step():
            x.grad = None
            bound.run(x).backward(p.dy)
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return train_step
    raise ValueError(f"unknown mode {mode!r}")


class Rotation:
    """Calls ``fns`` in turn, one per call, so consecutive calls touch different memory."""

    def __init__(self, fns: Sequence[Callable[[], None]]):
        if not fns:
            raise ValueError("Rotation needs at least one callable")
        self.fns = list(fns)
        self.calls = 0

    def __call__(self) -> None:
        fn = self.fns[self.calls % len(self.fns)]
        self.calls += 1
        fn()

    def __len__(self) -> int:
        return len(self.fns)


def cache_bytes(device) -> int:
    """The cache the rotation pool must overflow: a GPU's L2; on CPU the per-core L2
    (sysfs), since a server's shared L3 (hundreds of MB) cannot be outrun with sane
    memory and is shared with other tenants anyway."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "2":
                continue
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            return int(digits) * unit
    return 2 << 20


def rotation_count(set_bytes: int, cache: int, limit: int = 64) -> int:
    """Input sets needed for a pool at least twice ``cache`` (at least 1, at most ``limit``)."""
    if set_bytes <= 0:
        raise ValueError(f"set_bytes must be positive, got {set_bytes}")
    return max(1, min(limit, math.ceil(2 * cache / set_bytes)))


# ---------------------------------------------------------------- CPU timing
def time_interleaved(fns: dict[str, Callable[[], None]], *, min_rounds: int = 5,
                     max_rounds: int = 50, budget_s: float = 1.0, sample_s: float = 0.01,
                     clock=time.perf_counter) -> dict[str, Timing]:
    """Interleaved wall-clock timing of every callable in ``fns``.

    Each callable is warmed up, then timed once to size its sample (enough calls to last
    ``sample_s``). Rounds rotate the order so no contender always follows the same one.
    Stops after ``max_rounds``, or once ``min_rounds`` are done and ``budget_s`` spent.
    """
    names = list(fns)
    inner = {}
    for name in names:
        fns[name]()
        t0 = clock()
        fns[name]()
        single = max(clock() - t0, 1e-9)
        inner[name] = max(1, min(1000, math.ceil(sample_s / single)))
    samples = {name: [] for name in names}
    start = clock()
    for rnd in range(max_rounds):
        if rnd >= min_rounds and clock() - start > budget_s:
            break
        for i in range(len(names)):
            name = names[(rnd + i) % len(names)]
            fn, n = fns[name], inner[name]
            t0 = clock()
            for _ in range(n):
                fn()
            samples[name].append((clock() - t0) / n)
    return {name: Timing(samples[name], f"cpu-interleaved x{inner[name]}") for name in names}


# ---------------------------------------------------------------- CUDA timing
def _graph_of(fn: Rotation) -> torch.cuda.CUDAGraph:
    """Capture one call of every rotated input set into a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2 * len(fn)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(len(fn)):
            fn()
    return graph


def time_cuda_graph(fn: Rotation, replays: int = 50) -> Timing:
    """Per-call time from replaying a graph of ``len(fn)`` calls on distinct inputs."""
    graph = _graph_of(fn)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3 / len(fn))
    return Timing(samples, f"cuda-graph x{len(fn)} sets")


def time_do_bench(fn: Rotation, rep_ms: int = 100) -> Timing:
    """``triton.testing.do_bench`` (L2 flushed before each call), all samples kept."""
    from triton.testing import do_bench

    for _ in range(len(fn)):  # autotune and lazy init happen here, outside the timing
        fn()
    torch.cuda.synchronize()
    ms = do_bench(fn, warmup=25, rep=rep_ms, return_mode="all")
    return Timing([t * 1e-3 for t in ms], f"do_bench x{len(fn)} sets")


def time_cuda(fn: Rotation, tokens: int, rep_ms: int = 100) -> Timing:
    """CUDA graph for M <= 16 (falls back to do_bench if capture fails), else do_bench."""
    if tokens <= GRAPH_MAX_TOKENS:
        try:
            return time_cuda_graph(fn)
        except RuntimeError as err:  # e.g. a host sync inside a contender
            torch.cuda.synchronize()
            timing = time_do_bench(fn, rep_ms)
            timing.timer += f" (graph capture failed: {str(err).splitlines()[0][:60]})"
            return timing
    return time_do_bench(fn, rep_ms)


# ---------------------------------------------------------------- peak memory
def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Kineto writes two lines to fd 2 on every profiler start/stop; keep them out."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes held by the CPU allocator during one call of ``fn``, beyond what was
    live before it: every allocation and free the profiler records (inside custom ops and
    C++ extensions too), summed in time order."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                            profile_memory=True) as prof:
        fn()
    events = sorted((n.start_time_ns, n.extra_fields.alloc_size)
                    for n in _walk(prof.profiler.kineto_results.experimental_event_tree())
                    if n.tag == _EventType.Allocation)
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def peak_memory(fn: Callable[[], None], device) -> tuple[int, str]:
    """Peak bytes allocated by one call of ``fn`` beyond what was live before it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated"
    return cpu_peak_bytes(fn), "cpu allocator (profiler)"
