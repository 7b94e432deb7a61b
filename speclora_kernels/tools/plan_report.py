"""What the op launches on an H100, planned on "meta" tensors (no GPU, no interpreter):

    python -m speclora_kernels.tools.plan_report [--json PATH]

- **decode**: every Llama-3-8B / Mistral-7B and Qwen2.5-7B projection, M = 1 and 16, R = 16,
  48, 64, bf16 and NF4 bases: the forward's path, programs and waves on 132 SMs, the
  predicted time (``tools.gpu_model``, from ``plan.decode_launch`` as every tool predicts
  it: ``plan_us`` is the plan's own figure for its choice), the floor (W read once + one
  launch), and the plan before split-K (the fused kernel, one program per 256-wide column
  tile) under the same model;
- **NF4 decodes per call**: how many times a forward and a backward decode W, at M = 16,
  512 and 8192, and the call's transient memory (the dequantized W above
  ``plan.NF4_REGISTER_ROWS`` rows): the bytes of every tensor it allocates and does not
  return or keep, seen by a dispatch mode on the dry run's meta tensors, summed as if all
  were live at once (an upper bound of the peak), beside one dense bf16 copy of W;
- **factor gradients**: programs of the factor-gradient launch at M = 512 and 8192;
- **host time**: Python microseconds per call of the public op on CPU tensors with every
  launch in dry-run mode (argument checks, the cached launch recipe, output allocation:
  all but Triton's own launch), median of repeated calls, measured on this CPU.

Launches come from ``ops.tuning.record_launches(dry_run=True)``; configs are those an H100
runs under ``SPECLORA_TUNING=heuristic`` (``recorded.h100_config``), so the report is the
same on any machine. Every time in it but the host figures is a prediction.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import weakref

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops import fused_adapter_linear, launch, plan, tuning
from .floors import NF4_DECODE_TABLE_BYTES, nf4_weight_bytes
from .gpu_model import predict, weight_floor
from .recorded import h100_config, meta_inputs, meta_launches, recorded_launch

SHAPES = {"q_proj/o_proj 4096x4096": (4096, 4096), "k_proj/v_proj 4096->1024": (1024, 4096),
          "gate/up 4096->14336": (14336, 4096), "down 14336->4096": (4096, 14336),
          "qwen q/o 3584x3584": (3584, 3584), "qwen k/v 3584->512": (512, 3584),
          "qwen gate/up 3584->18944": (18944, 3584), "qwen down 18944->3584": (3584, 18944)}


def _programs(kernel, args) -> int:
    return kernel.programs(args, h100_config(kernel, args))


def decode_row(M: int, N: int, K: int, R: int, nf4: bool) -> dict:
    """One decode forward: the launch the op records, predicted from its shape and H100
    config (``recorded.recorded_launch``), beside the plan's own prediction of its choice
    (the same ``plan.decode_launch``, the config unknown) and the floor."""
    weight = nf4_weight_bytes(N, K) if nf4 else 2 * N * K
    (kernel, args), = meta_launches(M, N, K, R, nf4)
    pred = predict([recorded_launch(kernel, args)])
    p = plan.forward_plan(M, N, K, R, rank_cap=64, weight_bytes=weight, element_size=2,
                          nf4=nf4)
    own = predict([plan.decode_launch(M, N, K, R, weight, 2, nf4, p.block_n, p.splits)])
    floor = weight_floor(N, K, weight_bytes=weight + (NF4_DECODE_TABLE_BYTES if nf4 else 0))
    # the plan before split-K: the fused kernel's 16 x 256 tiles, one program per column tile
    before = plan.decode_launch(M, N, K, R, weight, 2, nf4, 256)
    return {"base": "nf4" if nf4 else "bf16", "M": M, "R": R, "kernel": kernel.name,
            "block_n": args["BLOCK_N"], "splits": args["n_splits"],
            "programs": _programs(kernel, args), "waves": _programs(kernel, args) / 132,
            "predicted_us": pred.us, "plan_us": own.us, "floor_us": floor.us,
            "vs_floor": pred.seconds / floor.seconds, "bound": pred.bound,
            "fused_programs": before.programs, "fused_predicted_us": predict([before]).us}


def decode_rows() -> list[dict]:
    return [{"shape": name, **decode_row(M, N, K, R, nf4)} for name, (N, K) in SHAPES.items()
            for nf4 in (False, True) for M in (1, 16) for R in (16, 48, 64)]


class _Transient(TorchDispatchMode):
    """Bytes of the tensors allocated inside the block and freed by the time ``total`` is
    read (the caller drops the launch records first: they hold every launch argument)."""

    def __init__(self):
        super().__init__()
        self.freed = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided,
                                   torch.ops.aten.empty_like, torch.ops.aten.new_empty,
                                   torch.ops.aten.zeros, torch.ops.aten.zeros_like,
                                   torch.ops.aten.new_zeros, torch.ops.aten.full):
            weakref.finalize(out, self._free, out.numel() * out.element_size())
        return out

    def _free(self, size):
        self.freed += size


def _transient_bytes(M, N, K, R, backward) -> int:
    x, w, b, d, s, u = meta_inputs(M, N, K, R, True)
    dy, t = torch.empty(M, N, device="meta", dtype=x.dtype), torch.empty(M, R, device="meta")
    with _Transient() as transient:
        with tuning.record_launches(dry_run=True) as launches:
            if backward:
                out = launch.adapter_backward(dy, x, w, d, s, u, t, None, 0.0, 0, R, True,
                                              True, True, True)
            else:
                out = launch.adapter_forward(x, w, b, d, s, u, None, 0.0, 0, True)
        del launches[:]
    freed = transient.freed
    del out  # the outputs are not transient
    return freed


def decodes_per_call(N=4096, K=4096, R=48) -> list[dict]:
    """Times W is decoded by one forward and one backward (dx) on an NF4 base, and the
    call's transient bytes (``_Transient``)."""
    rows = []
    for M in (16, 512, 8192):
        for backward in (False, True):
            count = 0.0
            for kernel, args in meta_launches(M, N, K, R, True, backward):
                cfg = h100_config(kernel, args)
                full = {**args, **cfg.kwargs}
                if kernel is tuning.DEQUANT:
                    count += 1
                elif full.get("NF4") and kernel in (tuning.FWD, tuning.DX):
                    count += triton.cdiv(M, full["BLOCK_M"])
                elif full.get("NF4") and kernel is tuning.SPLITK:
                    count += 1
            rows.append({"M": M, "pass": "backward (dx)" if backward else "forward",
                         "decodes": count,
                         "transient_MB": _transient_bytes(M, N, K, R, backward) / 2**20,
                         "dense_bf16_W_MB": 2 * N * K / 2**20})
    return rows


def factor_rows(R=48) -> list[dict]:
    rows = []
    for name, (N, K) in list(SHAPES.items())[:4]:
        for M in (512, 8192):
            (kernel, args), = [(k, a) for k, a in meta_launches(M, N, K, R, False, True)
                               if k is tuning.FACTOR]
            programs = _programs(kernel, args)
            rows.append({"shape": name, "M": M, "splits": args["n_msplits"],
                         "programs": programs, "waves": programs / 132})
    return rows


def host_us(M=1, N=4096, K=4096, R=48, batches=40, calls=100) -> dict:
    """Python microseconds per call of the public op on CPU tensors, every launch a dry run
    (a repeated call: its launch recipe is cached). Timed in the calling thread's CPU time
    (``time.thread_time``: time the thread is descheduled by other processes is not
    counted), the median over ``batches`` batches of ``calls`` calls."""
    out = {}
    for grad in (False, True):
        x, w, b, d, s, u = (torch.empty_like(v, device="cpu") if v is not None else None
                            for v in meta_inputs(M, N, K, R, False))
        if grad:
            d.requires_grad_()
            u.requires_grad_()
        times = []
        with tuning.record_launches(dry_run=True) as launches, torch.set_grad_enabled(grad):
            for _ in range(batches + 5):
                start = time.thread_time()
                for _ in range(calls):
                    fused_adapter_linear(x, w, b, d, s, u)
                    launches.clear()
                times.append((time.thread_time() - start) / calls)
        out["forward, training" if grad else "forward, inference"] = \
            statistics.median(times[5:]) * 1e6
    return out


def _table(rows: list[dict], keys: list[str]) -> str:
    fmt = {float: lambda v: f"{v:.2f}"}
    body = [[fmt.get(type(r[k]), str)(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(b[i]) for b in body)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write every row as JSON to this path")
    opts = parser.parse_args(argv)
    # plans, not interpreted runs (Triton reads the variable live; an importer keeps its own)
    os.environ.pop("TRITON_INTERPRET", None)
    with tuning.tuning("heuristic"):
        report = {"decode": decode_rows(), "nf4_decodes": decodes_per_call(),
                  "factor_gradients": factor_rows(), "host_us": host_us()}
    print("Decode forward, predicted by tools.gpu_model (plan_us: the plan's own prediction of "
          "its choice); fused_*: the plan before split-K (one program per 256-wide column "
          "tile):")
    print(_table(report["decode"], ["shape", "base", "M", "R", "kernel", "block_n", "splits",
                                    "programs", "waves", "predicted_us", "plan_us", "floor_us",
                                    "vs_floor", "bound", "fused_programs",
                                    "fused_predicted_us"]))
    print("\nNF4 decodes of W per call (4096x4096, R = 48):")
    print(_table(report["nf4_decodes"], ["M", "pass", "decodes", "transient_MB",
                                         "dense_bf16_W_MB"]))
    print("\nFactor-gradient launch (R = 48):")
    print(_table(report["factor_gradients"], ["shape", "M", "splits", "programs", "waves"]))
    print("\nHost time per call, measured here (dry-run launches, 4096x4096, M = 1, R = 48):")
    for what, us in report["host_us"].items():
        print(f"  {what}: {us:.1f} us")
    worst = max(report["decode"], key=lambda r: r["vs_floor"])
    print(f"\nworst decode vs floor: {worst['vs_floor']:.3f} ({worst['shape']}, {worst['base']}, "
          f"M = {worst['M']}, R = {worst['R']}); fewest programs: "
          f"{min(r['programs'] for r in report['decode'])}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
