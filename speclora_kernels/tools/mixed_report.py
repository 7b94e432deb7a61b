"""Bytes of one mixed-adapter batch through a PEFT LoRA layer: fused (``patch_peft``, one
launch) against PEFT's own per-adapter loop, no GPU needed.

    python -m speclora_kernels.tools.mixed_report [--rows 8] [--size 1024] [--adapters 3]
                                                  [--r 16] [--dtype float16]

One ``nn.Linear(size, size)`` under PEFT LoRA with ``--adapters`` adapters of rank ``--r``;
the batch's rows cycle through ``"__base__"`` and every adapter (``adapter_names=``).

- fused: the Triton kernels run in the interpreter and ``tools.counter`` counts the bytes
  they request and the distinct bytes they touch (what device memory must serve at least);
  the aten ops around the op are counted as below, on a second call (the first stacks the
  adapters' factors and the scale table, kept while the adapters are unchanged; printed
  apart).
- one adapter, unmixed: the same batch through the fused op with one adapter (the kernels'
  own traffic at this shape: at decode the split-K partials, written and read once).
- PEFT's loop (unpatched): every aten compute op PEFT runs (base GEMM, then per adapter the
  sub-batch gather, ``lora_A``, ``lora_B``, the scaling, the indexed add) counted by the
  bytes of its tensors, inputs and outputs, each once: what the op must move at least.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .. import ops
from ..ops import tuning
from .aten_ops import is_compute


class _AtenBytes(TorchDispatchMode):
    """aten compute ops and the bytes of their distinct tensors, outside the op only."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes, self.paused = 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and is_compute(func):
            tensors = {id(t): t for t in tree_leaves((args, kwargs, out))
                       if isinstance(t, torch.Tensor)}
            self.ops += 1
            self.bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        return out


@contextlib.contextmanager
def aten_bytes():
    """Count the aten ops of the block by bytes, the fused op's own work excluded."""
    recorder, real = _AtenBytes(), ops.fused_adapter_linear

    def paused(*args, **kwargs):
        recorder.paused += 1
        try:
            return real(*args, **kwargs)
        finally:
            recorder.paused -= 1

    ops.fused_adapter_linear = paused
    try:
        with recorder:
            yield recorder
    finally:
        ops.fused_adapter_linear = real


def lora_layer(size: int, adapters: int, r: int, dtype: torch.dtype):
    import peft

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(size, size).to(dtype))
    config = dict(target_modules=["0"], r=r, init_lora_weights=False)
    model = peft.get_peft_model(base, peft.LoraConfig(**config), "adapter0")
    for i in range(1, adapters):
        model.add_adapter(f"adapter{i}", peft.LoraConfig(**config))
    return model.eval()


def measure(rows: int = 8, size: int = 1024, adapters: int = 3, r: int = 16,
            dtype: torch.dtype = torch.float16) -> dict:
    """Bytes and launches of one mixed batch, fused and through PEFT's loop."""
    from ..peft import patch_peft, unpatch_peft
    from .counter import count_triton

    model = lora_layer(size, adapters, r, dtype)
    names = [(["__base__"] + [f"adapter{i}" for i in range(adapters)])[i % (adapters + 1)]
             for i in range(rows)]
    x = torch.randn(rows, size, dtype=dtype)
    with torch.no_grad():
        with aten_bytes() as loop:
            want = model(x, adapter_names=names)
        patch_peft()
        try:
            with aten_bytes() as first:  # stacks the factors, kept for the calls after it
                model(x, adapter_names=names)
            with aten_bytes() as around, count_triton() as kernels:
                got = model(x, adapter_names=names)
            with count_triton() as single:  # the same batch through one adapter, unmixed
                model(x)
        finally:
            unpatch_peft()
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
    total = kernels.total()
    return {"rows": rows, "size": size, "adapters": adapters, "r": r, "dtype": str(dtype),
            "weight_bytes": size * size * torch.finfo(dtype).bits // 8,
            "fused_launches": total.launches, "fused_unique_bytes": total.unique_bytes,
            "fused_requested_bytes": total.bytes, "fused_aten_ops": around.ops,
            "first_call_aten_ops": first.ops, "first_call_aten_bytes": first.bytes,
            "kernels": {k: v.unique_bytes for k, v in kernels.per_kernel().items()},
            "single_unique_bytes": single.total().unique_bytes,
            "fused_aten_bytes": around.bytes, "peft_aten_ops": loop.ops,
            "peft_bytes": loop.bytes, "rel_err": err}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="rows of the batch (tokens)")
    parser.add_argument("--size", type=int, default=1024, help="in = out features")
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    opts = parser.parse_args(argv)
    if not tuning.INTERPRET:  # the package imported triton already: run again interpreted
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        args = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *args], env)
    m = measure(opts.rows, opts.size, opts.adapters, opts.r, getattr(torch, opts.dtype))
    fused = m["fused_unique_bytes"] + m["fused_aten_bytes"]
    print(f"{m['rows']} rows, {m['size']}x{m['size']} {opts.dtype}, {m['adapters']} adapters of "
          f"rank {m['r']} + __base__ (W: {m['weight_bytes'] / 1e6:.2f} MB)")
    print(f"fused:       {m['fused_launches']} launch, {m['fused_unique_bytes'] / 1e6:.3f} MB "
          f"distinct ({m['fused_requested_bytes'] / 1e6:.3f} MB requested) + "
          f"{m['fused_aten_ops']} aten ops around it, {m['fused_aten_bytes'] / 1e6:.3f} MB")
    print(f"  first call: {m['first_call_aten_ops']} aten ops around the op, "
          f"{m['first_call_aten_bytes'] / 1e6:.3f} MB (stacking the factors)")
    print(f"PEFT's loop: {m['peft_aten_ops']} aten ops, {m['peft_bytes'] / 1e6:.3f} MB")
    print(f"one adapter, unmixed, fused: {m['single_unique_bytes'] / 1e6:.3f} MB distinct "
          f"(kernels of the mixed call: "
          + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in m["kernels"].items()) + ")")
    print(f"fused / PEFT bytes: {fused / m['peft_bytes']:.2f}; max relative difference of the "
          f"outputs {m['rel_err']:.1e}")


if __name__ == "__main__":
    main()
