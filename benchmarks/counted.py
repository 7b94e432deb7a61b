"""Counted figures of our fused op vs PEFT's op sequence, with predicted H100 times.

``python -m benchmarks.counted`` runs the fused op's Triton kernels in the interpreter
(``TRITON_INTERPRET=1``, set here before triton is imported) under
``speclora_kernels.tools.counter.count_triton``: bytes requested by every load/store,
distinct bytes touched, ``tl.dot`` FLOPs as issued, kernel launches. Those are measured.
PEFT's unfused LoRA is the op sequence it runs (``tools.floors.peft_lora_forward_ops``,
bytes counted per op). ``base floor`` is the base matmul alone (``nn.Linear``; for NF4 rows
an NF4 base) and ``op floor`` the whole op, each at its floor (every operand read once,
result written once, one launch).

Every time in this table is *predicted* for an H100 by ``speclora_kernels.tools.gpu_model``
(the only predictor; ``tools/gpu_model.py`` states every figure and its source), none
measured. The split-K decode forward is predicted from its shape (``ops.plan.
decode_launch``), as the plan's own choice and ``tools.plan_report`` predict it; other
launches from their counts (``model_launches``). PEFT's ops and the floors are cuBLAS /
bitsandbytes / PyTorch launches that choose their own grids: modelled as filling the GPU
at the efficiencies ``gpu_model`` states, cuBLAS's tile re-reads from L2 like ours
(``contenders.peft_launches``).

The interpreter runs the configs an H100 runs (``recorded.h100_config``: the heuristic
choice of ``SPECLORA_TUNING=heuristic`` on 132 SMs, under ``tuning.restricted_configs``),
not its own fewest-programs choice, so the counted re-reads are the GPU's.

Where the interpreter cannot afford the real shape (M*N*K above ``REAL_SHAPE_MAX_MACS``:
the LLM shapes from M = 512 on), the op runs at reduced K (``--k-run``) and, beyond the
largest ``--m-run``, reduced M. With a fixed tile config every count is linear in each
(tile counts times per-tile work), so counts are extrapolated through the corners of
the two smallest values per axis; the count at the third value must match exactly and a
dry run must pick the same tile configs as at the real shape, or the row reports the
reduced shape as counted, marked ``not extrapolated``. The forward's and the backward's
plans depend on M (the segmented forward and dx only from M where they fill the GPU), so
the real shape's plan is forced at the reduced points
(``ops.plan.forced_plan``) and checked there like the tile configs.

Activations run in fp16 (bytes identical to bf16; the interpreter's bf16 ``tl.dot`` is
wrong, triton#11584, though counts would not change).
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402
from fractions import Fraction  # noqa: E402
from itertools import product  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402

from .shapes import MODEL_SHAPES, RANKS, Shape  # noqa: E402

FIELDS = ("launches", "programs", "load_bytes", "store_bytes", "unique_load_bytes",
          "unique_store_bytes", "dot_flops")
DTYPE = torch.float16
REAL_SHAPE_MAX_MACS = 1.2e9
"""Largest M*N*K the interpreter runs at the real shape (~15 s); beyond, reduced K."""


def _inputs(shape: Shape, tokens: int, k_in: int, rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_out = shape.out_features

    def randn(*s, std=1.0):
        return (torch.randn(*s, generator=g) * std).to(DTYPE)

    return dict(x=randn(tokens, k_in), weight=randn(n_out, k_in, std=k_in ** -0.5),
                bias=randn(n_out, std=0.1) if shape.bias else None,
                down=randn(rank, k_in, std=k_in ** -0.5), scale=torch.full((rank,), 2.0),
                up=randn(n_out, rank, std=rank ** -0.5), dy=randn(tokens, n_out))


def _as_nf4(weight: torch.Tensor):
    """Our NF4Weight of ``weight`` via bitsandbytes' own quantizer (as the contenders do)."""
    import bitsandbytes as bnb

    from speclora_kernels.quant import NF4Weight

    q = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                          quant_type="nf4", blocksize=64).to("cpu")
    return NF4Weight.from_bnb(q)


def count_once(shape: Shape, tokens: int, k_in: int, rank: int, direction: str,
               nf4: bool) -> dict:
    """Counted figures of one forward or backward call of the fused op, per kernel."""
    from speclora_kernels.ops import fused_adapter_linear
    from speclora_kernels.tools.counter import count_triton

    a = _inputs(shape, tokens, k_in, rank)
    weight = _as_nf4(a["weight"]) if nf4 else a["weight"]
    if direction == "forward":
        with count_triton() as c:
            fused_adapter_linear(a["x"], weight, a["bias"], a["down"], a["scale"], a["up"],
                                 training=False)
    else:  # LoRA backward: dx, dD, dU; the forward runs outside the count
        x = a["x"].requires_grad_(True)
        down, up = a["down"].requires_grad_(True), a["up"].requires_grad_(True)
        y = fused_adapter_linear(x, weight, a["bias"], down, a["scale"], up, training=True)
        with count_triton() as c:
            y.backward(a["dy"])
    return {name: {f: getattr(k, f) for f in FIELDS} for name, k in c.per_kernel().items()}


def totals(per_kernel: dict) -> dict:
    """Sum of every field over kernels."""
    return {f: sum(k[f] for k in per_kernel.values()) for f in FIELDS}


GRADS = (True, True, False, True)
"""Gradients the counted backward needs (dx, dD, ds, dU): s is frozen."""


def recorded(tokens: int, n_out: int, k_in: int, rank: int, direction: str, bias: bool,
             nf4: bool) -> list:
    """(TunedKernel, args) of every launch of one call, planned on meta tensors."""
    from speclora_kernels.tools.recorded import meta_launches

    return meta_launches(tokens, n_out, k_in, rank, nf4, direction == "backward", bias, DTYPE,
                         GRADS)


def launch_configs(tokens: int, n_out: int, k_in: int, rank: int, direction: str,
                   bias: bool, nf4: bool = False):
    """(kernel, chosen config) of every launch, from a dry run on meta tensors.
    Extrapolation is exact only if these agree between the reduced and the real shape."""
    from speclora_kernels.tools.recorded import h100_config

    return [(k.name, h100_config(k, a).kwargs, a.get("SEGMENTED"), a.get("n_segments"))
            for k, a in recorded(tokens, n_out, k_in, rank, direction, bias, nf4)]


def segments_at(tokens: int, n_out: int, k_in: int, rank: int, direction: str,
                bias: bool) -> tuple[int, int]:
    """(column segments, output tile width) of the segmented forward or dx launch at this
    shape, (0, 0) if none, from a dry run on meta tensors."""
    plan = launch_configs(tokens, n_out, k_in, rank, direction, bias)
    return next(((n, cfg.get("BLOCK_N" if name == "fwd_kernel" else "BLOCK_K"))
                 for name, cfg, seg, n in plan if seg), (0, 0))


def pinned_plan(segments: int):
    """The real shape's plan at every point: ``segments`` column segments, or (0) the
    launcher's own choice with the segmented kernels off."""
    from speclora_kernels.ops import plan

    if segments:
        return plan.forced_plan("segmented", segments)
    return mock.patch.dict(os.environ, {plan.SEGMENTED_ENV: "0"})


def _multilinear(values: dict, axes: list, at: tuple) -> Fraction:
    """Value at ``at`` of the function multilinear in each axis through the corner
    ``values`` (keyed by coordinates; ``axes`` holds each axis' two corner values)."""
    total = Fraction(0)
    for corner in product((0, 1), repeat=len(axes)):
        weight = Fraction(1)
        for (a, b), z, side in zip(axes, at, corner):
            weight *= Fraction(z - a, b - a) if side else Fraction(b - z, b - a)
        total += weight * values[tuple(ax[side] for ax, side in zip(axes, corner))]
    return total


def count_extrapolated(shape: Shape, tokens: int, rank: int, direction: str, nf4: bool,
                       k_run: tuple[int, int, int], m_run: tuple[int, int, int]) -> dict:
    """Counts at reduced K (and reduced M when ``tokens`` exceeds ``m_run``), extrapolated.

    With a fixed tile config every count is linear in K and in M (tile counts times
    per-tile work), so it is fitted through the corners of the two smallest values per
    reduced axis and must reproduce the count at the third value of every axis exactly;
    the dry-run configs at all points and at the real shape must match as well.
    Otherwise the row reports the largest point as is, marked not extrapolated. A segmented
    dx (output width K) runs at K = 1, 2, 3 times a whole number of segments of output
    tiles instead of ``k_run``, so that every point has the real shape's segment count.
    """
    segments, tile = segments_at(tokens, shape.out_features, shape.in_features, rank,
                                 direction, shape.bias)
    if segments and direction == "backward":
        # dx's output width is K: every reduced K must hold `segments` full segments (and
        # be >= 256, the widest K tile of the other kernels)
        unit = segments * tile * -(-256 // (segments * tile))
        k_run = (unit, 2 * unit, 3 * unit)
    axes_runs = [k_run] + ([m_run] if tokens > m_run[-1] else [])
    real = (shape.in_features, tokens)[:len(axes_runs)]
    corners = list(product(*[run[:2] for run in axes_runs]))
    check = tuple(run[2] for run in axes_runs)

    def at(point):
        k_in, m = point[0], point[1] if len(point) > 1 else tokens
        return count_once(shape, m, k_in, rank, direction, nf4)

    with pinned_plan(segments):  # the real shape's plan, also at the reduced points
        counts = {pt: at(pt) for pt in corners + [check]}
    axes = [run[:2] for run in axes_runs]
    names = ("K", "M")
    where = " x ".join(f"{n} in {{{r[0]},{r[1]}}}" for n, r in zip(names, axes_runs))
    label = (f"{where}, checked at {'/'.join(map(str, check))} -> "
             f"{'/'.join(map(str, real))}")
    names_seen = {tuple(c) for c in counts.values()}
    problems = [] if len(names_seen) == 1 else ["kernels differ"]
    out = {}
    for kernel in counts[check] if not problems else ():
        out[kernel] = {}
        for f in FIELDS:
            vals = {pt: c[kernel][f] for pt, c in counts.items()}
            value = _multilinear(vals, axes, real)
            if _multilinear(vals, axes, check) != vals[check] or value.denominator != 1:
                problems.append(f"{kernel} {f} not linear")
            out[kernel][f] = int(value)

    def plan_at(pt):
        return launch_configs(pt[1] if len(pt) > 1 else tokens, shape.out_features, pt[0],
                              rank, direction, shape.bias, nf4)

    with pinned_plan(segments):
        configs = {pt: plan_at(pt) for pt in corners + [check]}
    configs[real] = plan_at(real)
    if len({repr(c) for c in configs.values()}) != 1:
        problems.append("tile configs differ from the real shape's")
    if problems:
        k_in, m = check[0], check[1] if len(check) > 1 else tokens
        return {"per_kernel": counts[check], "k_in": k_in, "tokens": m,
                "counted_k": f"reduced to K={k_in}, M={m}, not extrapolated: "
                             + "; ".join(problems[:2])}
    return {"per_kernel": out, "k_in": shape.in_features, "tokens": tokens, "counted_k": label}


DECODING_KERNELS = ("dequant_kernel", "fwd_kernel", "fwd_splitk_kernel", "dx_kernel")
"""Kernels that decode an NF4 base: the dequantize launch where a call has one (it decodes
W once for the GEMMs after it), else the GEMM kernel (one row tile: each element once)."""


def model_launches(per_kernel: dict, launches: list, nf4: bool, n_out: int, k_in: int) -> list:
    """``tools.gpu_model`` launches of one call whose recorded ``launches`` (TunedKernel,
    args) were counted into ``per_kernel``. A launch ``plan.decode_launch`` describes (the
    split-K decode forward) is predicted from its shape and H100 config, exactly as the plan
    and ``tools.plan_report`` predict it; any other from its counts
    (``gpu_model.counted_launch``): programs, distinct bytes, bytes requested beyond them,
    dot FLOPs; on an NF4 base the kernel that decodes W decodes ``n_out * k_in`` elements
    (with their level-table gathers); a factor-gradient launch's split partials
    (``recorded.split_scratch``) stay in L2."""
    from speclora_kernels.tools import gpu_model as gm
    from speclora_kernels.tools import recorded as rec

    decoder = next((name for name in DECODING_KERNELS if name in per_kernel), None) if nf4 \
        else None
    out = []
    for name, k in per_kernel.items():
        calls = [(kernel, args) for kernel, args in launches if kernel.name == name]
        shaped = [rec.recorded_launch(kernel, args) for kernel, args in calls]
        if len(shaped) == k["launches"] and all(shaped):
            out += shaped
            continue
        n = k["launches"]
        decoded = n_out * k_in if name == decoder else 0.0
        rows = calls[0][1].get("NF4_ROWS", True) if calls else True
        scratch, serial = rec.split_scratch(*calls[0]) if calls else (0, 0)
        unique = k["unique_load_bytes"] + k["unique_store_bytes"]
        requested = k["load_bytes"] + k["store_bytes"]
        out += [gm.counted_launch(name, k["programs"] // n, unique / n, requested / n,
                                  k["dot_flops"] / n, decoded, gm.nf4_gathers(decoded, rows),
                                  scratch, serial)] * n
    return out


def rows_for(shape: Shape, tokens: int, rank: int, direction: str, nf4: bool,
             k_run: tuple[int, int, int] = (256, 512, 768),
             m_run: tuple[int, int, int] = (512, 1024, 1536)) -> list[dict]:
    """Fused (counted), PEFT / bnb+PEFT (op sequence), nn.Linear and op floors."""
    from speclora_kernels.ops.tuning import restricted_configs
    from speclora_kernels.tools import floors
    from speclora_kernels.tools.gpu_model import contender, predict
    from speclora_kernels.tools.recorded import h100_configs

    from .contenders import peft_launches

    n_out, k_in = shape.out_features, shape.in_features
    common = {"shape": shape.name, "models": "/".join(shape.models), "in_features": k_in,
              "out_features": n_out, "tokens": tokens, "rank": rank, "direction": direction,
              "weight": "nf4" if nf4 else "fp16/bf16"}
    t0 = time.perf_counter()
    launches = recorded(tokens, n_out, k_in, rank, direction, shape.bias, nf4)
    with restricted_configs(h100_configs(launches)):  # the configs an H100 runs
        if tokens * n_out * k_in <= REAL_SHAPE_MAX_MACS:
            c = {"per_kernel": count_once(shape, tokens, k_in, rank, direction, nf4),
                 "counted_k": str(k_in)}
        else:
            c = count_extrapolated(shape, tokens, rank, direction, nf4, k_run, m_run)
    if (c.get("tokens", tokens), c.get("k_in", k_in)) != (tokens, k_in):
        # Not extrapolated: every row of this group describes the reduced shape run.
        tokens, k_in = c["tokens"], c["k_in"]
        common.update(tokens=tokens, in_features=k_in)
        launches = recorded(tokens, n_out, k_in, rank, direction, shape.bias, nf4)
    wbytes = floors.nf4_weight_bytes(n_out, k_in) if nf4 else None
    per = c["per_kernel"]
    t = totals(per)
    # kernels run one after another: each is bound by its own terms
    pred = predict(model_launches(per, launches, nf4, n_out, k_in))
    fused = {**common, "contender": "fused_nf4" if nf4 else "fused", "method": "counted",
             "counted_k": c["counted_k"], "kernels": "+".join(per), "launches": t["launches"],
             "programs": t["programs"], "bytes_requested": t["load_bytes"] + t["store_bytes"],
             "unique_bytes": t["unique_load_bytes"] + t["unique_store_bytes"],
             "flops": t["dot_flops"], "pred_us": pred.us, "bound": pred.bound,
             "interpreter_s": time.perf_counter() - t0}
    out = [fused]
    kw = dict(dtype=DTYPE, weight_bytes=wbytes)
    if direction == "forward":
        lin = floors.forward_floor(tokens, k_in, n_out, 0, bias=shape.bias, **kw)
        op = floors.forward_floor(tokens, k_in, n_out, rank, bias=shape.bias, **kw)
        for path in _bnb_paths(tokens) if nf4 else ("dense",):
            ops = floors.peft_lora_forward_ops(
                tokens, k_in, n_out, rank, dtype=DTYPE, bias=shape.bias, training=False,
                weight="nf4" if nf4 else "dense", **({"bnb_path": path} if nf4 else {}))
            cost = floors.total_cost(ops)
            pred = predict(peft_launches(ops, tokens, k_in, n_out, rank, DTYPE.itemsize))
            out.append({**common, "contender": f"bnb_peft ({path})" if nf4 else "peft",
                        "method": "op sequence", "kernels": " | ".join(o.name for o in ops),
                        "launches": cost.launches, "bytes_requested": cost.bytes,
                        "unique_bytes": cost.bytes, "flops": cost.flops, "pred_us": pred.us,
                        "bound": pred.bound, "ops": [asdict(o) for o in ops]})
    else:
        lin = floors.backward_floor(tokens, k_in, n_out, 0, **kw)
        op = floors.backward_floor(tokens, k_in, n_out, rank, grad_down_rows=rank,
                                   grad_up_cols=rank, **kw)
    for name, cost in (("base floor", lin), ("op floor", op)):
        # every operand once at the ceilings, one launch filling the GPU
        floor = predict([contender(name, cost.bytes, cost.flops)])
        out.append({**common, "contender": name, "method": "floor", "launches": cost.launches,
                    "bytes_requested": cost.bytes, "unique_bytes": cost.bytes,
                    "flops": cost.flops, "pred_us": floor.us, "bound": floor.bound})
    peft = [r for r in out if r["method"] == "op sequence"]
    if peft:  # against bnb's faster path where bnb's choice depends on the GPU
        best = min(r["pred_us"] for r in peft)
        fused["pred_speedup_vs_peft"] = best / fused["pred_us"]
    fused["pred_vs_base"] = fused["pred_us"] / out[-2]["pred_us"]
    return out


def _bnb_paths(tokens: int) -> tuple[str, ...]:
    """bnb 0.50's NF4 path: fused kernel for M <= 4, dequantize + GEMM beyond 512, either
    in between depending on the GPU (both are listed; the faster one is compared)."""
    if tokens <= 4:
        return ("fused",)
    return ("dequant",) if tokens > 512 else ("fused", "dequant")


def predicted_targets(rows: list[dict]) -> list[dict]:
    """The GPU targets, evaluated on predicted H100 times (labelled predicted)."""
    from .report import _check

    where = lambda r: f"{r['shape']} M={r['tokens']} R={r['rank']}"
    fused = {(r["shape"], r["tokens"], r["rank"], r["direction"]): r
             for r in rows if r["contender"] == "fused"}
    fwd = [r for r in fused.values() if r["direction"] == "forward"]
    nf4 = [r for r in rows if r["contender"] == "fused_nf4" and r["direction"] == "forward"]
    linear = {(r["shape"], r["tokens"], r["rank"], r["direction"]): r["pred_us"]
              for r in rows if r["contender"] == "base floor"}
    train = []
    for (shape, m, rank, direction), r in fused.items():
        back = fused.get((shape, m, rank, "backward"))
        if direction == "forward" and back and m == 8192:
            base = linear[(shape, m, rank, "forward")] + linear[(shape, m, rank, "backward")]
            train.append((where(r), (r["pred_us"] + back["pred_us"]) / base))
    scope = "predicted H100"
    return [
        _check("fused forward / nn.Linear <= 1.10 at M <= 16",
               ((where(r), r["pred_vs_base"]) for r in fwd if r["tokens"] <= 16),
               1.10, True, scope),
        _check("fused fwd+bwd / nn.Linear fwd+dx <= 1.15 at M = 8192", train, 1.15, True,
               scope),
        _check("PEFT LoRA / fused forward >= 1.3 at every shape",
               ((where(r), r["pred_speedup_vs_peft"]) for r in fwd), 1.3, False, scope),
        _check("bnb Linear4bit+PEFT / fused NF4 forward >= 2.5 at M = 1",
               ((where(r), r["pred_speedup_vs_peft"]) for r in nf4 if r["tokens"] == 1),
               2.5, False, scope),
    ]


def brief(rows: list[dict]) -> list[dict]:
    """One line per (shape, M, R, direction, weight): the fused kernels' counted figures
    and the predicted times of fused, PEFT (its faster path) and the base floor."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (r["shape"], r["tokens"], r["rank"], r["direction"], r["weight"])
        g = groups.setdefault(key, {"shape": f"{r['shape']} {r['in_features']}x"
                                             f"{r['out_features']}",
                                    "M": r["tokens"], "R": r["rank"], "dir": r["direction"],
                                    "weight": r["weight"]})
        if r["method"] == "counted":
            g.update({"counted at K": r["counted_k"], "launches": r["launches"],
                      "MB distinct": r["unique_bytes"] / 1e6,
                      "MB requested": r["bytes_requested"] / 1e6, "GFLOP": r["flops"] / 1e9,
                      "fused µs": r["pred_us"],
                      "PEFT/fused": r.get("pred_speedup_vs_peft"),
                      "fused/base": r["pred_vs_base"]})
        elif r["method"] == "op sequence":
            g["PEFT µs"] = min(g.get("PEFT µs", float("inf")), r["pred_us"])
        elif r["contender"] == "base floor":
            g["base floor µs"] = r["pred_us"]
    return list(groups.values())


BRIEF_COLUMNS = ("shape", "M", "R", "dir", "weight", "counted at K", "launches", "MB distinct",
                 "MB requested", "GFLOP", "fused µs", "PEFT µs",
                 "base floor µs", "PEFT/fused",
                 "fused/base")

COLUMNS = ("shape", "tokens", "rank", "direction", "contender", "method", "counted_k",
           "launches", "programs", "bytes_requested", "unique_bytes", "flops", "pred_us", "bound",
           "pred_speedup_vs_peft", "pred_vs_base")


DEFAULT_PLAN = (
    # decode: real shapes, dense and NF4 forward
    (("llama.q_o", "llama.k_v", "llama.gate_up", "llama.down", "minilm.qkvo",
      "minilm.inter", "minilm.out"), (1, 16), ("forward",), ("dense", "nf4")),
    # training: one Llama projection, forward and backward, reduced and extrapolated
    # (M = 8192 costs ~10 min in the interpreter: ask for it with --tokens 8192)
    (("llama.q_o",), (512,), ("forward", "backward"), ("dense",)),
)
"""(shapes, M values, directions, weights) groups run by default, R = 48 (r=16, k=32)."""


def plan_from(args) -> list[tuple[str, int, str, str]]:
    """(shape, M, direction, weight) items: the default plan, or the grid of the options
    given (unset options take every value the default plan uses)."""
    if not any((args.shapes, args.tokens, args.directions, args.weights)):
        return [item for shapes, tokens, dirs, weights in DEFAULT_PLAN
                for item in product(shapes, tokens, dirs, weights)]
    return list(product(args.shapes or DEFAULT_PLAN[0][0], args.tokens or (1, 16),
                        args.directions or ("forward",), args.weights or ("dense", "nf4")))


def main(argv=None) -> int:
    from . import report
    from .env import environment

    ap = argparse.ArgumentParser(prog="python -m benchmarks.counted", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=[s.name for s in MODEL_SHAPES])
    ap.add_argument("--tokens", nargs="+", type=int)
    ap.add_argument("--directions", nargs="+", choices=("forward", "backward"))
    ap.add_argument("--weights", nargs="+", choices=("dense", "nf4"))
    ap.add_argument("--ranks", nargs="+", type=int, default=[48],
                    choices=[r.total for r in RANKS])
    ap.add_argument("--k-run", nargs=3, type=int, default=[256, 512, 768],
                    help="reduced K values where the real shape is too slow (at least the "
                    "widest K tile, 256, so tile configs match the real shape's)")
    ap.add_argument("--m-run", nargs=3, type=int, default=[512, 1024, 1536],
                    help="reduced M values for larger M")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)

    shapes = {s.name: s for s in MODEL_SHAPES}
    rows, skipped = [], []
    for name, tokens, direction, weight in plan_from(args):
        for rank in args.ranks:
            label = f"{name} M={tokens} R={rank} {direction} {weight}"
            t0 = time.perf_counter()
            try:
                rows += rows_for(shapes[name], tokens, rank, direction, weight == "nf4",
                                 tuple(args.k_run), tuple(args.m_run))
            except _unsupported() as err:
                skipped.append(f"{label}: {type(err).__name__}: {err}")
                print(f"skipped {skipped[-1]}", file=sys.stderr)
                continue
            print(f"counted {label} in {time.perf_counter() - t0:.0f} s", flush=True)
    goals = predicted_targets(rows)
    table = report.markdown_table(rows, COLUMNS)
    short = report.markdown_table(brief(rows), BRIEF_COLUMNS)
    goals_md = report.markdown_table(goals, report.TARGET_COLUMNS)
    command = " ".join(["python -m benchmarks.counted", *(sys.argv[1:] if argv is None else argv)])
    print(short, goals_md, sep="\n\n")
    for line in skipped:
        print(f"skipped {line}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"`{command}` (every time is predicted for an H100, none "
                                 f"measured)\n\n{short}\n\n{goals_md}\n\nAll rows:\n\n"
                                 f"{table}\n")
    if args.json:
        report.write_json({"command": command, "env": environment("cpu"), "rows": rows,
                           "targets": goals, "skipped": skipped}, args.json)
    return 0


def _unsupported():
    """Errors that mean 'this combination is not implemented yet', not 'wrong'."""
    from .contenders import Unavailable

    return (Unavailable, NotImplementedError)


if __name__ == "__main__":
    sys.exit(main())
