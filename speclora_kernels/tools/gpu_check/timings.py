"""Timings: the device's ceilings, a streaming scan, and registered timing pairs.

- ``ceilings``: device-to-device copy bandwidth (bytes read + written) and the bf16 matmul
  rate (8192^3, random data), measured once;
- ``stream_scan``: a Triton kernel that reads a 1 GiB buffer with 1, 2, 4, ..., 128, SMs and
  2 x SMs programs (grid-stride, 16 KB per program and step): GB/s per program count, the
  per-SM bandwidth ceiling the performance model uses;
- timing pairs, from ``REGISTRY``: each names its points (shape, M, mode) and builds, per
  point, the contenders (zero-argument callables over rotated input sets) and their
  errors against float64. Every contender is timed both ways, side by side: CUDA-graph
  replay (``triton.testing.do_bench`` median of a graph holding one call per input set)
  and eager wall-clock per call (host clock around back-to-back calls, synchronized).

To add a pair (say patched vs unpatched PEFT), ``register(TimingPair(...))`` here or in a
module imported before the plan is made: the planner sees it through ``planner_items``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

from ...ops import fused_adapter_linear, tuning
from .correctness import TOL, rel_err

RANK = 48
SCALING = 2.0
MAX_SETS = 8


# ------------------------------------------------------------------ ceilings
def _bench(fn, rep=100) -> float:
    """Median milliseconds (events, L2 flushed before each call)."""
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def _copy_ms(device) -> float:
    src = torch.randn(1 << 29, dtype=torch.bfloat16, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    return _bench(lambda: dst.copy_(src))


def ceilings(device="cuda") -> dict:
    copy_ms = _copy_ms(device)
    torch.cuda.empty_cache()
    n = 8192
    x, y = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    mm_ms = _bench(lambda: x @ y)
    return {"status": "pass", "copy_GBps": 2 * (1 << 30) / (copy_ms * 1e-3) / 1e9,
            "copy_ms": copy_ms, "bf16_matmul_TFLOPs": 2 * n ** 3 / (mm_ms * 1e-3) / 1e12,
            "matmul_ms": mm_ms}


@triton.jit
def _stream_sum(x_ptr, out_ptr, n_blocks, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(pid, n_blocks, tl.num_programs(0)):
        acc += tl.load(x_ptr + b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK))
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def stream_scan(device="cuda", sms: int | None = None, block: int = 4096) -> dict:
    """GB/s of ``_stream_sum`` per program count; each count's sum is checked first."""
    sms = sms or torch.cuda.get_device_properties(device).multi_processor_count
    n_blocks = (1 << 28) // block
    x = torch.rand(n_blocks * block, device=device)  # 1 GiB of fp32
    want = float(x.double().sum())
    rows, problems = [], []
    for programs in sorted({1, 2, 4, 8, 16, 32, 64, 128, sms, 2 * sms}):
        out = torch.empty(programs, device=device)

        def run(programs=programs, out=out):
            _stream_sum[(programs,)](x, out, n_blocks, BLOCK=block, num_warps=8)

        run()
        err = abs(float(out.double().sum()) - want) / want
        if err > 1e-4:
            problems.append(f"{programs} programs: sum off by {err:.2g}")
        ms = _bench(run, rep=60)
        gbps = x.nbytes / (ms * 1e-3) / 1e9
        rows.append({"programs": programs, "ms": ms, "GBps": gbps,
                     "GBps_per_program": gbps / programs})
    return {"status": "pass" if not problems else "fail", "problems": problems,
            "rows": rows, "bytes": x.nbytes}


# ------------------------------------------------------------------ timing pairs
@dataclasses.dataclass(frozen=True)
class Point:
    model: str
    in_f: int
    out_f: int
    M: int
    mode: str   # "fwd" (inference, no grad) | "fwd+bwd" (training forward + backward)

    @property
    def label(self) -> str:
        return f"{self.model} {self.in_f}->{self.out_f} M{self.M} {self.mode}"


@dataclasses.dataclass
class TimingPair:
    """``build(point, device, seed) -> (contenders, errors)``: contenders maps a name to a
    callable taking one input set, plus ``"sets"`` (the input sets); errors maps names to
    relative errors vs float64. The first contender is ours; ratios are against it.

    The first ``key`` points are the ones the project's claims rest on (decode, a training
    step): the planner fits them before anything but start-up, the rest only with time left.
    """

    name: str
    description: str
    points: list
    build: Callable
    per_point_s: float = 3.0
    requires: Callable = lambda: None   # None if it can run, else why it is skipped
    key: int = 0
    caveat: Callable = lambda: None     # None, or which contenders are left out and why

    def prewarm_points(self, n_points: int | None = None) -> list:
        """One point per (M, mode) among the first ``n_points`` points (default all), at
        the first shape where that (M, mode) occurs: compiling their configs in the pool
        warms the Triton cache for every shape (shapes don't change the kernels'
        specialization here: all are multiples of 16)."""
        seen, warm = set(), []
        for p in self.points[:n_points]:
            if (p.M, p.mode) not in seen:
                seen.add((p.M, p.mode))
                warm.append(p)
        return warm


REGISTRY: dict = {}


def register(pair: TimingPair) -> TimingPair:
    REGISTRY[pair.name] = pair
    return pair


def planner_items() -> list:
    """What the planner needs of each registered pair: (name, points, seconds per point,
    prewarm jobs, skip reason or None, key points, prewarm jobs of the key points)."""
    return [(p.name, len(p.points), p.per_point_s, len(p.prewarm_points()), p.requires(),
             p.key, len(p.prewarm_points(p.key))) for p in REGISTRY.values()]


SHAPES = {"llama3-8b": [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)],
          "qwen2.5-7b": [(3584, 3584), (3584, 512), (3584, 18944), (18944, 3584)]}
MODES = ("fwd", "fwd+bwd")


def points(rows, modes=MODES, key=()) -> list:
    """``key`` points first, then every shape x M x mode not among them."""
    rest = [Point(model, k, n, M, mode) for model, shapes in SHAPES.items()
            for k, n in shapes for M in rows for mode in modes]
    return list(key) + [p for p in rest if p not in key]


# The timings the project's claims rest on: decode (M = 1, 16) on a square and a narrow
# (k/v) projection, and a training step at M = 4096, all Llama-3-8B shapes.
KEY_DECODE = [Point("llama3-8b", 4096, n, M, "fwd") for n in (4096, 1024) for M in (1, 16)]
KEY_DENSE = KEY_DECODE + [Point("llama3-8b", 4096, 4096, 4096, "fwd+bwd")]


def n_sets(bytes_per_set: int, device) -> int:
    """Input sets to rotate through so that they are at least twice the L2."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(MAX_SETS, math.ceil(2 * l2 / max(bytes_per_set, 1))))


def _inputs(point, g, device, bf):
    """x, A, B, dy of one input set; x, A, B are leaves that require grad for "fwd+bwd"
    (made once: a timed call never copies them)."""
    K, N, M = point.in_f, point.out_f, point.M
    x = torch.randn(M, K, generator=g).to(bf).to(device)
    a = (torch.randn(RANK, K, generator=g) * K ** -0.5).to(bf).to(device)
    b = (torch.randn(N, RANK, generator=g) * 0.1).to(bf).to(device)
    dy = torch.randn(M, N, generator=g).to(bf).to(device)
    if point.mode != "fwd":
        for t in (x, a, b):
            t.requires_grad_()
    return x, a, b, dy


def _step(point, fn, inputs, dy):
    """One call of ``fn()``: inference, or forward + backward wrt ``inputs``."""
    if point.mode == "fwd":
        with torch.no_grad():
            return fn()
    return torch.autograd.grad(fn(), inputs, dy)


def _ref(x, w64, a, b):
    x, a, b = (t.detach().double() for t in (x, a, b))
    return x @ w64.T + SCALING * (x @ a.T) @ b.T


def build_dense(point: Point, device, seed: int):
    """Our op vs ``F.linear`` alone vs PEFT's unfused LoRA forward (base GEMM, then
    ``x @ A.T``, ``@ B.T``, scale, add), bf16, R = 48, dense base."""
    g, bf = torch.Generator().manual_seed(seed), torch.bfloat16
    K, N, M = point.in_f, point.out_f, point.M
    sets = []
    for _ in range(n_sets(2 * (N * K + M * K + M * N + RANK * (K + N)), device)):
        w = (torch.randn(N, K, generator=g) * K ** -0.5).to(bf).to(device)
        sets.append((w, *_inputs(point, g, device, bf)))
    scale = torch.full((RANK,), SCALING, device=device)

    def ours(s):
        w, x, a, b, dy = s
        return _step(point, lambda: fused_adapter_linear(x, w, None, a, scale, b), (x, a, b),
                     dy)

    def linear(s):
        w, x, _, _, dy = s
        return _step(point, lambda: F.linear(x, w), (x,), dy)

    def peft(s):
        w, x, a, b, dy = s
        return _step(point, lambda: F.linear(x, w) + F.linear(F.linear(x, a), b) * SCALING,
                     (x, a, b), dy)

    w, x, a, b, _ = sets[0]
    ref = _ref(x, w.double(), a, b)
    with torch.no_grad():
        errors = {"fused": rel_err(fused_adapter_linear(x, w, None, a, scale, b), ref),
                  "peft": rel_err(F.linear(x, w) + F.linear(F.linear(x, a), b) * SCALING,
                                  ref)}
    return {"fused": ours, "linear": linear, "peft": peft, "sets": sets}, errors


def _bnb_reason():
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: skip, with the reason
        return f"bitsandbytes not importable ({type(e).__name__}: {e})"[:200]
    return None


def build_nf4(point: Point, device, seed: int):
    """Our op on an NF4 base vs our op on the same weight dense (bf16, what NF4 saves) vs
    ``F.linear`` on it, and, where bitsandbytes imports, ``Linear4bit`` alone and with the
    same LoRA, PEFT-style. With bitsandbytes the NF4 bytes are the ones it wrote; without,
    our quantizer writes the same bytes bitsandbytes' CPU backend would."""
    from ...quant import NF4Weight, dequantize_nf4

    bnb = None
    if _bnb_reason() is None:
        import bitsandbytes as bnb
    g, bf = torch.Generator().manual_seed(seed), torch.bfloat16
    K, N, M = point.in_f, point.out_f, point.M
    sets = []
    for _ in range(n_sets(N * K // 2 + 2 * (M * K + M * N), device)):
        w = (torch.randn(N, K, generator=g) * K ** -0.5).to(bf)
        if bnb is None:
            lin, nf4 = None, NF4Weight.quantize(w, backend="torch").to(device)
        else:
            lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=bf, quant_type="nf4")
            lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
            lin = lin.to(device)
            nf4 = NF4Weight.from_bnb(lin)
        sets.append((lin, nf4, dequantize_nf4(nf4, bf), *_inputs(point, g, device, bf)))
    scale = torch.full((RANK,), SCALING, device=device)

    def ours(s):
        _, w, _, x, a, b, dy = s
        return _step(point, lambda: fused_adapter_linear(x, w, None, a, scale, b), (x, a, b),
                     dy)

    def dense(s):
        _, _, w, x, a, b, dy = s
        return _step(point, lambda: fused_adapter_linear(x, w, None, a, scale, b), (x, a, b),
                     dy)

    def linear(s):
        _, _, w, x, _, _, dy = s
        return _step(point, lambda: F.linear(x, w), (x,), dy)

    def linear4bit(s):
        lin, _, _, x, _, _, dy = s
        return _step(point, lambda: lin(x), (x,), dy)

    def linear4bit_lora(s):
        lin, _, _, x, a, b, dy = s
        return _step(point, lambda: lin(x) + F.linear(F.linear(x, a), b) * SCALING,
                     (x, a, b), dy)

    lin, w, wd, x, a, b, _ = sets[0]
    ref = _ref(x, wd.double(), a, b)
    contenders = {"fused_nf4": ours, "fused_dense": dense, "linear": linear}
    with torch.no_grad():
        errors = {"fused_nf4": rel_err(fused_adapter_linear(x, w, None, a, scale, b), ref)}
        if lin is not None:
            contenders.update(linear4bit=linear4bit, linear4bit_lora=linear4bit_lora)
            errors["linear4bit_lora"] = rel_err(
                lin(x) + F.linear(F.linear(x, a), b) * SCALING, ref)
    return {**contenders, "sets": sets}, errors


register(TimingPair("dense", "fused op vs F.linear vs PEFT-style LoRA (bf16, R = 48)",
                    points((1, 16, 512, 8192), key=KEY_DENSE), build_dense, per_point_s=3.0,
                    key=len(KEY_DENSE)))
register(TimingPair("nf4", "fused op on NF4 vs the same op dense vs F.linear, and bitsandbytes "
                           "Linear4bit (+ LoRA) where it imports, bf16",
                    points((1, 16), key=KEY_DECODE), build_nf4, per_point_s=3.0,
                    key=len(KEY_DECODE), caveat=_bnb_reason))


# ------------------------------------------------------------------ measuring
def eager_per_call(calls: list, samples: int = 5, sample_s: float = 0.02) -> float:
    """Median seconds per call of back-to-back ``calls`` (cycled), host clock, synced."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for c in calls:
        c()
    torch.cuda.synchronize()
    per = (time.perf_counter() - t0) / len(calls)
    n = max(len(calls), math.ceil(sample_s / max(per, 1e-7) / len(calls)) * len(calls))
    times = []
    for _ in range(samples):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            calls[i % len(calls)]()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def graph_per_call(calls: list) -> float:
    """Median seconds per call of a CUDA graph holding one call per input set."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    try:
        return _bench(graph.replay, rep=50) * 1e-3 / len(calls)
    finally:
        del graph


def measure_point(pair: TimingPair, point: Point, device, seed: int) -> dict:
    """Both timings of every contender of ``pair`` at ``point`` (autotune mode: warm-up
    tunes), and its errors."""
    with tuning.tuning("autotune"):
        contenders, errors = pair.build(point, device, seed)
        sets = contenders.pop("sets")
        row = {"point": point.label}
        for name, fn in contenders.items():
            calls = [functools.partial(fn, s) for s in sets]
            for c in calls:  # warm-up: compiles, tunes
                c()
            row[f"{name}_eager_us"] = eager_per_call(calls) * 1e6
            try:
                row[f"{name}_graph_us"] = graph_per_call(calls) * 1e6
            except Exception as e:  # noqa: BLE001 - a contender that cannot be captured
                row[f"{name}_graph_us"] = math.nan
                row[f"{name}_graph_error"] = f"{type(e).__name__}: {str(e)[:80]}"
                torch.cuda.synchronize()
        ours = next(iter(contenders))
        for name in list(contenders)[1:]:
            for how in ("graph", "eager"):
                row[f"{name}/{ours}_{how}"] = row[f"{name}_{how}_us"] / row[f"{ours}_{how}_us"]
        row.update({f"err_{k}": v for k, v in errors.items()})
        row["sets"] = len(sets)
    del contenders, sets
    torch.cuda.empty_cache()
    return row


def run_pair(pair: TimingPair, n_points: int, deadline: float, device, seed: int) -> dict:
    """The first ``n_points`` points of ``pair`` while time is left (``deadline`` is a
    ``time.monotonic()`` value); errors over the bf16 tolerance fail the pair."""
    rows, problems, left_out = [], [], 0
    for point in pair.points[:n_points]:
        if time.monotonic() + pair.per_point_s > deadline:
            left_out += 1
            continue
        try:
            row = measure_point(pair, point, device, seed)
        except Exception as e:  # noqa: BLE001 - one point's failure is reported, not fatal
            problems.append(f"{point.label}: {type(e).__name__}: {str(e)[:200]}")
            continue
        bad = [k for k, v in row.items() if k.startswith("err_") and not v < TOL["bf16"]]
        if bad:
            problems.append(f"{point.label}: {bad} over the bf16 tolerance")
        rows.append(row)
    status = "fail" if problems else ("partial" if left_out else "pass")
    return {"status": status, "problems": problems, "rows": rows,
            "left_out": left_out + len(pair.points) - min(n_points, len(pair.points))}


def run_prewarm(payload: dict) -> dict:
    """Pool job: run every contender of one point once in autotune mode, so its kernels'
    configs are compiled (into the Triton cache the main process reads) before timing."""
    pair = REGISTRY[payload["pair"]]
    point = Point(**payload["point"])
    device = payload.get("device", "cuda")
    with tuning.tuning("autotune"):
        contenders, _ = pair.build(point, device, int(payload["seed"]))
        sets = contenders.pop("sets")
        for fn in contenders.values():
            fn(sets[0])
        torch.cuda.synchronize()
    return {"status": "pass", "point": point.label}
