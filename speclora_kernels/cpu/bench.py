"""CPU forward latency of the C++ op against bitsandbytes / nn.Linear + PEFT LoRA, in one run.

    python -m speclora_kernels.cpu.bench [--threads 2] [--rounds 40]

Two tables (4096 x 4096 base, rank R = 48, fp32 activations, bias, no dropout, no_grad):

1. NF4 base (bitsandbytes layout, double quant, blocksize 64), M in {1, 8}: the C++ op
   (``speclora_kernels.cpu.adapter_forward``) vs ``bnb.nn.Linear4bit`` + PEFT LoRA in train
   mode (bitsandbytes' CPU path dequantizes the whole weight every call) and in eval mode
   (on AVX512-BF16 CPUs bitsandbytes repacks the weight on the first eval call and runs an
   inference-only kernel on bf16-rounded activations and scales; the C++ op stays exact
   fp32 and differentiable), with a dense fp32 ``nn.Linear`` for scale.
2. Dense fp32 base, M in {1, 64, 512}: the C++ op vs ``nn.Linear`` + PEFT LoRA; the ratio
   should be <= 1.05.

Method: ``torch.utils.benchmark.Timer`` with ``num_threads`` threads; the candidates of a
row are measured interleaved, ``--rounds`` samples each (every sample the mean of a fixed
number of calls sized to ~5 ms), so load from other processes hits all candidates alike.
Each cell is ``best (median)`` over the samples; ratios use the best samples, the least
disturbed estimate on a shared machine. Outputs are checked against each other first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import warnings

import torch
from torch.utils import benchmark

from ..quant.nf4 import NF4Weight
from . import adapter_forward, isa, load

SIZE, RANK = 4096, 48


def _peft(base: torch.nn.Module, rank: int) -> torch.nn.Module:
    """``base`` wrapped by PEFT LoRA (r = rank, alpha = 2r, no dropout); lora_B made nonzero."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

    model = get_peft_model(Net(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"],
                                             lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    return layer


def _factors(layer) -> tuple:
    """(D, s, U) of a PEFT LoRA layer: D = lora_A, s = scaling, U = lora_B."""
    down = layer.lora_A["default"].weight.detach()
    up = layer.lora_B["default"].weight.detach()
    scale = torch.full((down.shape[0],), float(layer.scaling["default"]))
    return down, scale, up


def _measure(candidates: dict, threads: int, rounds: int) -> dict:
    """(best, median) seconds per call of each candidate, sampled interleaved."""
    number = {}
    for name, fn in candidates.items():
        fn()
        t = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads).timeit(3).mean
        number[name] = max(1, int(0.005 / max(t, 1e-6)))
    samples = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads)
            samples[name].append(timer.timeit(number[name]).mean)
    return {name: (min(s), statistics.median(s)) for name, s in samples.items()}


def _cell(t: tuple) -> str:
    return f"{t[0] * 1e3:.3f} ({t[1] * 1e3:.2f})"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def nf4_table(threads: int, rounds: int) -> list[str]:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Linear(SIZE, SIZE)

    def quantized():
        layer = bnb.nn.Linear4bit(SIZE, SIZE, bias=True, compute_dtype=torch.float32,
                                  quant_type="nf4", compress_statistics=True)
        layer.load_state_dict(dense.state_dict())
        return layer.to("cpu")  # quantizes

    train_layer, eval_layer = _peft(quantized(), RANK), _peft(quantized(), RANK)
    with torch.no_grad():
        eval_layer.lora_B["default"].weight.copy_(train_layer.lora_B["default"].weight)
        eval_layer.lora_A["default"].weight.copy_(train_layer.lora_A["default"].weight)
    train_layer.train()
    eval_layer.eval()
    weight = NF4Weight.from_bnb(train_layer.base_layer)
    bias = train_layer.base_layer.bias.detach()
    down, scale, up = _factors(train_layer)
    rows = ["| M | C++ op | bnb Linear4bit + PEFT, train | bnb Linear4bit + PEFT, eval "
            "| nn.Linear fp32, no adapter | speed-up vs train | speed-up vs eval |",
            "|---|---|---|---|---|---|---|"]
    for m in (1, 8):
        x = torch.randn(m, SIZE)
        with torch.no_grad():
            ours = adapter_forward(x, weight, bias, down, scale, up, save_t=False)[0]
            err = _rel(ours, train_layer(x))
            assert err < 1e-4, f"C++ op and bnb + PEFT disagree at M={m}: {err:.1e}"
            t = _measure({
                "ours": lambda: adapter_forward(x, weight, bias, down, scale, up, save_t=False),
                "train": lambda: train_layer(x),
                "eval": lambda: eval_layer(x),
                "linear": lambda: dense(x),
            }, threads, rounds)
        rows.append(f"| {m} | {_cell(t['ours'])} | {_cell(t['train'])} | {_cell(t['eval'])} "
                    f"| {_cell(t['linear'])} | {t['train'][0] / t['ours'][0]:.1f}x "
                    f"| {t['eval'][0] / t['ours'][0]:.2f}x |")
    return rows


def dense_table(threads: int, rounds: int) -> list[str]:
    torch.manual_seed(0)
    layer = _peft(torch.nn.Linear(SIZE, SIZE), RANK).eval()
    weight, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    down, scale, up = _factors(layer)
    rows = ["| M | C++ op | nn.Linear + PEFT LoRA | ratio (C++ / PEFT) |",
            "|---|---|---|---|"]
    for m in (1, 64, 512):
        x = torch.randn(m, SIZE)
        with torch.no_grad():
            err = _rel(adapter_forward(x, weight, bias, down, scale, up, save_t=False)[0], layer(x))
            assert err < 1e-5, f"C++ op and nn.Linear + PEFT disagree at M={m}: {err:.1e}"
            t = _measure({
                "ours": lambda: adapter_forward(x, weight, bias, down, scale, up, save_t=False),
                "peft": lambda: layer(x),
            }, threads, rounds)
        rows.append(f"| {m} | {_cell(t['ours'])} | {_cell(t['peft'])} | {t['ours'][0] / t['peft'][0]:.3f} |")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m speclora_kernels.cpu.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if not load():
        raise SystemExit("the C++ backend is not available (see the warning); nothing to measure")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, kernels: {isa()}, {args.rounds} "
          f"interleaved samples per cell: best (median) ms, ratios of the best; "
          f"load average at start {os.getloadavg()[0]:.2f}\n")
    print(f"NF4 base {SIZE}x{SIZE} (double quant, blocksize 64), R = {RANK}, fp32 x, forward:\n")
    print("\n".join(nf4_table(args.threads, args.rounds)))
    print(f"\nDense fp32 base {SIZE}x{SIZE}, R = {RANK}, forward:\n")
    print("\n".join(dense_table(args.threads, args.rounds)))
    print("\nload average (1, 5, 15 min) at the end: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
