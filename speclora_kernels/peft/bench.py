"""Patched vs unpatched PEFT LoRA on one layer at one shape: :func:`timing_pair`.

For a quick check on any machine (the GPU check tool calls it; ``python -m
speclora_kernels.peft.bench`` prints it). The full grid, with every contender checked
against float64, is ``python -m benchmarks.run`` (contenders ``peft`` / ``peft_patched``,
``bnb_peft`` / ``bnb_peft_patched``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time

import torch
from torch import nn


class _One(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj
        self.is_loaded_in_4bit = type(proj) is not nn.Linear  # PEFT then picks its bnb layer

    def forward(self, x):
        return self.proj(x)


def _base(in_features, out_features, dtype, device, quantized, generator):
    weight = torch.randn(out_features, in_features, generator=generator) * in_features ** -0.5
    if not quantized:
        lin = nn.Linear(in_features, out_features, bias=False)
        lin.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        return lin.to(device)
    import bitsandbytes as bnb

    from ..quant import NF4Weight

    q = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype,
                          quant_type="nf4", device="meta")
    q.weight = NF4Weight.quantize(weight.to(device, dtype), blocksize=64).to_bnb()
    return q


def _timer(device):
    if torch.device(device).type == "cuda":
        def clock():
            torch.cuda.synchronize()
            return time.perf_counter()
        return clock
    return time.perf_counter


def _median_us(fns: dict, clock, repeats: int, warmup: int) -> dict:
    """Median µs of each callable, interleaved (a, b, a, b, ...) so drift hits both."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            samples[name].append((clock() - t0) * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


@contextlib.contextmanager
def _exact_base(model: nn.Module):
    """Training mode with dropout off: bitsandbytes' CPU inference path for ``Linear4bit``
    is approximate (2.8e-3 relative off the float64 result at 128 x 64, measured), its
    training path dequantizes exactly; the accuracy check compares against the exact one."""
    was = model.training
    model.train()
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    for m in drops:
        m.eval()
    try:
        yield
    finally:
        model.train(was)


def timing_pair(in_features: int = 4096, out_features: int = 4096, r: int = 16,
                tokens: int = 16, *, dtype: torch.dtype | None = None, device=None,
                quantized: bool = False, dropout: float = 0.0, repeats: int = 30,
                warmup: int = 5, seed: int = 0) -> dict:
    """Time one PEFT LoRA layer (``get_peft_model`` on an ``nn.Linear``, or a bitsandbytes
    NF4 ``Linear4bit`` with ``quantized``) against the same layer after
    ``patch_peft(model)``: an inference forward (eval, no grad) and a training step
    (forward, backward of a fixed ``dy``, AdamW step on the LoRA weights), median of
    ``repeats`` interleaved runs after ``warmup``.

    Defaults: bf16 on CUDA, fp32 on CPU; ``device`` defaults to CUDA when available.
    Returns a JSON-able dict: the case, ``forward_us`` / ``train_step_us`` as
    ``{"peft": ..., "patched": ...}``, ``ratio`` (patched / peft per mode; below 1 is
    faster) and ``max_rel_err`` (patched vs PEFT's output, inference, same inputs).
    """
    import peft

    from .patch import patch_peft

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    gen = torch.Generator().manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                             lora_dropout=dropout)
    ref = peft.get_peft_model(_One(_base(in_features, out_features, dtype, device, quantized,
                                         gen)), config)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    fused = copy.deepcopy(ref)
    if patch_peft(fused) != 1:
        raise RuntimeError("patch_peft found no PEFT LoRA layer to patch")
    x = torch.randn(tokens, in_features, generator=gen).to(device, dtype)
    dy = torch.randn(tokens, out_features, generator=gen).to(device, dtype)
    with torch.no_grad(), _exact_base(ref), _exact_base(fused):
        want, got = ref(x), fused(x)
    err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))

    def forward(model):
        def run():
            with torch.no_grad():
                model(x)
        return run

    def train_step(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run():
            model(x).backward(dy)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    clock = _timer(device)
    ref.eval(), fused.eval()
    fwd = _median_us({"peft": forward(ref), "patched": forward(fused)}, clock, repeats, warmup)
    ref.train(), fused.train()
    step = _median_us({"peft": train_step(ref), "patched": train_step(fused)}, clock, repeats,
                      warmup)
    return {"in_features": in_features, "out_features": out_features, "r": r,
            "tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "quantized": quantized, "dropout": dropout, "threads": torch.get_num_threads(),
            "forward_us": fwd, "train_step_us": step,
            "ratio": {"forward": fwd["patched"] / fwd["peft"],
                      "train_step": step["patched"] / step["peft"]},
            "max_rel_err": err}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m speclora_kernels.peft.bench",
                                 description=timing_pair.__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=2, default=(4096, 4096), metavar=("IN", "OUT"))
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--nf4", action="store_true", help="bitsandbytes NF4 Linear4bit base")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
             None: None}[args.dtype]
    print(json.dumps(timing_pair(*args.shape, r=args.r, tokens=args.tokens, dtype=dtype,
                                 device=args.device, quantized=args.nf4, dropout=args.dropout,
                                 repeats=args.repeats), indent=2))


if __name__ == "__main__":
    main()
