"""NF4 base: bytes the fused forward touches, and memory kept for backward, measured on CPU.

    python -m speclora_kernels.tools.nf4_report [--shape 4096x4096] [--rank 16]
                                                [--tokens 2048] [--dropout 0.1] [--json PATH]

Each part runs in a child process (the interpreter switch is read when triton is imported).

1. Decode forward (M = 1, bf16 activations, no bias, LoRA rank ``--rank``): the fused
   kernels run in the Triton interpreter under :func:`~speclora_kernels.tools.counter.count_triton`
   (``TRITON_INTERPRET=1``), once on the NF4 base (bitsandbytes
   layout, blocks of 64, double quant) and once on the dense bf16 base. Their unique bytes
   are compared with the floor ``forward_floor(weight_bytes=nf4_weight_bytes(...))`` (packed
   codes + scales + the kernels' 2 KB decode table + x + D, s, U + y, plus the split-K
   kernel's fp32 partials written and read back) and with each other.
2. Memory kept for backward by one layer in training (``--tokens`` rows of bf16 input,
   LoRA dropout ``--dropout``): every tensor autograd saves is recorded with
   ``torch.autograd.graph.saved_tensors_hooks`` (PyTorch CPU path, which saves what the
   kernels' autograd saves); distinct storages are summed, split into
   the layer's own parameters/buffers (held anyway) and the rest (kept only for backward).
   Contenders: bitsandbytes ``Linear4bit`` + PEFT LoRA (PEFT's bnb 4-bit layer, fp32
   adapter weights, its default), and ``AdapterLinear`` from that ``Linear4bit``
   (``lora`` and ``speclora``). On CPU, PEFT's dropout keeps an fp32 mask; a GPU keeps a
   bool mask (1 byte per element instead of 4), noted in the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from torch import nn

BF16 = torch.bfloat16


# ---------------------------------------------------------------- 1. decode bytes
def count_forward(out_f: int, in_f: int, rank: int) -> dict:
    """Unique/requested bytes of the fused forward at M = 1 on NF4 and bf16 bases (needs
    ``TRITON_INTERPRET=1`` set before triton is imported)."""
    from ..ops import fused_adapter_linear, plan
    from ..quant import NF4Weight
    from .counter import count_triton
    from .floors import NF4_DECODE_TABLE_BYTES, forward_floor, nf4_weight_bytes

    g = torch.Generator().manual_seed(0)
    dense = (torch.randn(out_f, in_f, generator=g) * in_f ** -0.5).to(BF16)
    nf4 = NF4Weight.quantize(dense, blocksize=64, double_quant=True, backend="torch")
    x = torch.randn(1, in_f, generator=g).to(BF16)
    down = (torch.randn(rank, in_f, generator=g) * in_f ** -0.5).to(BF16)
    scale = torch.ones(rank)
    up = (torch.randn(out_f, rank, generator=g) * rank ** -0.5).to(BF16)
    result = {"shape": [out_f, in_f], "rank": rank, "M": 1}
    for name, weight in (("nf4", nf4), ("bf16", dense)):
        with torch.no_grad(), count_triton() as c:
            fused_adapter_linear(x, weight, None, down, scale, up)
        total = c.total()
        result[name] = {"unique_bytes": total.unique_bytes, "requested_bytes": total.bytes,
                        "launches": total.launches,
                        "kernels": {k: v.unique_bytes for k, v in c.per_kernel().items()}}
    # D, U bf16; s fp32 (4 bytes per rank): the factor bytes the op reads; the kernels also
    # read their 2 KB decode table
    weight_bytes = nf4_weight_bytes(out_f, in_f) + NF4_DECODE_TABLE_BYTES
    floor = forward_floor(1, in_f, out_f, rank, dtype=BF16, bias=False,
                          weight_bytes=weight_bytes)
    # the split-K decode kernel also writes, then reads back, its fp32 partials (the one
    # row of y and t per tile and slice of K): part of its floor
    p = plan.forward_plan(1, out_f, in_f, rank, rank_cap=64, weight_bytes=weight_bytes,
                          element_size=2, nf4=True)
    workspace = 0
    if p.path == "splitk":
        tiles, splits = plan.cdiv(out_f, p.block_n), plan.cdiv(in_f, plan.split_slice(in_f,
                                                                                     p.splits))
        workspace = 2 * tiles * splits * (p.block_n + plan.rank_block(rank, 64)) * 4
    result["splitk_workspace_bytes"] = workspace
    result["floor_bytes"] = floor.bytes_read + floor.bytes_written + 2 * rank + workspace
    result["nf4_weight_bytes"] = nf4.nbytes
    result["nf4_vs_floor"] = result["nf4"]["unique_bytes"] / result["floor_bytes"]
    result["nf4_vs_bf16"] = result["nf4"]["unique_bytes"] / result["bf16"]["unique_bytes"]
    return result


# ---------------------------------------------------------------- 2. saved for backward
def saved_bytes(module: nn.Module, x: torch.Tensor) -> dict:
    """Distinct storages autograd saves during ``module(x)``: bytes held by the module's own
    parameters/buffers and bytes of everything else (kept alive only for backward)."""
    from ..quant import NF4Tensor

    held = list(module.parameters()) + list(module.buffers())
    # an NF4 base is a wrapper tensor (NF4Tensor) with no storage of its own: its inner ones
    plain = [inner for t in held
             for inner in (t.inner_tensors().values() if isinstance(t, NF4Tensor) else (t,))]
    own = {t.untyped_storage().data_ptr() for t in plain}
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = (st.nbytes(), tuple(t.shape), str(t.dtype).removeprefix("torch."))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).float().sum().backward()
    kept = {p: v for p, v in storages.items() if p not in own}
    return {"activation_bytes": sum(v[0] for v in kept.values()),
            "parameter_bytes": sum(v[0] for p, v in storages.items() if p in own),
            "x_saved": x.untyped_storage().data_ptr() in kept,
            "tensors": sorted(([list(s), d, n] for n, s, d in kept.values()), key=lambda e: -e[2])}


def _linear4bit(out_f: int, in_f: int):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=BF16, quant_type="nf4")
    weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * in_f ** -0.5
    layer.weight = bnb.nn.Params4bit(weight.to(BF16), requires_grad=False, quant_type="nf4",
                                     blocksize=64, compress_statistics=True, module=layer)
    return layer.to("cpu")


class _Holder(nn.Module):
    """One target module, flagged as 4-bit so that PEFT picks its bitsandbytes LoRA layer."""

    is_loaded_in_4bit = True

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def measure_saved(out_f: int, in_f: int, rank: int, tokens: int, dropout: float) -> dict:
    from peft import LoraConfig, get_peft_model

    from ..modules import AdapterLinear

    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, in_f, generator=g).to(BF16).requires_grad_()
    rows = {}
    peft_model = get_peft_model(_Holder(_linear4bit(out_f, in_f)),
                                LoraConfig(target_modules=["proj"], r=rank, lora_alpha=rank,
                                           lora_dropout=dropout))
    peft_model.train()
    rows["bnb Linear4bit + PEFT LoRA"] = saved_bytes(peft_model, x)
    for method, opts in (("lora", {}), ("speclora", {"k": rank})):
        layer = AdapterLinear.from_linear(_linear4bit(out_f, in_f), method, r=rank,
                                          dropout=dropout, **opts).train()
        rows[f"AdapterLinear {method} (NF4)"] = saved_bytes(layer, x)
    return {"shape": [out_f, in_f], "rank": rank, "tokens": tokens, "dropout": dropout,
            "rows": rows}


# ---------------------------------------------------------------- report
def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_report(count: dict, saved: dict) -> str:
    out_f, in_f = count["shape"]
    lines = [f"Decode forward, M = 1, {out_f}x{in_f}, LoRA rank {count['rank']}, bf16 "
             f"activations, no bias (Triton interpreter, count_triton):",
             f"  floor (NF4 codes + scales + x + D, s, U + y): {count['floor_bytes']:,} B",
             f"  fused NF4 forward, unique bytes:  {count['nf4']['unique_bytes']:,} B = "
             f"{count['nf4_vs_floor']:.4f} x floor ({count['nf4']['launches']} launch(es); "
             f"requested {count['nf4']['requested_bytes']:,} B)",
             f"  fused bf16 forward, unique bytes: {count['bf16']['unique_bytes']:,} B",
             f"  NF4 / bf16: {count['nf4_vs_bf16']:.4f}", ""]
    lines.append(f"Kept for backward, one {saved['shape'][0]}x{saved['shape'][1]} layer, "
                 f"{saved['tokens']} tokens of bf16 input, rank {saved['rank']}, dropout "
                 f"{saved['dropout']} (saved_tensors_hooks, distinct storages, CPU):")
    for name, row in saved["rows"].items():
        parts = ", ".join(f"{d}{s}" for s, d, _ in row["tensors"])
        lines.append(f"  {name:<34} {_mb(row['activation_bytes']):>10} "
                     f"(x itself: {'yes' if row['x_saved'] else 'no'}; {parts})")
    return "\n".join(lines)


def _child(part: str, opts, interpret: bool) -> dict:
    """Run one part in a fresh process: the interpreter switch is read when triton is imported."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    args = [sys.executable, "-m", __spec__.name, "--part", part, "--shape", opts.shape,
            "--rank", str(opts.rank), "--tokens", str(opts.tokens), "--dropout", str(opts.dropout)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"nf4_report --part {part} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x4096", help="out x in features")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of x for the memory part")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--json", help="also write the numbers as JSON to this path")
    parser.add_argument("--part", choices=("count", "saved"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    out_f, in_f = (int(v) for v in opts.shape.lower().split("x"))

    if opts.part == "count":  # child, TRITON_INTERPRET=1
        print(json.dumps(count_forward(out_f, in_f, opts.rank)))
        return 0
    if opts.part == "saved":  # child, PyTorch path (saves the same tensors as the kernels)
        print(json.dumps(measure_saved(out_f, in_f, opts.rank, opts.tokens, opts.dropout)))
        return 0
    count = _child("count", opts, interpret=True)
    saved = _child("saved", opts, interpret=False)
    print(format_report(count, saved))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"decode_bytes": count, "saved_for_backward": saved}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
