"""Determinism: the same inputs (and dropout seed) give the same bits, run after run.

No path reduces with atomics or in a run-dependent order: the Triton kernels give each
output tile to one program that loops over its reduction, or (split-K decode) sum their
partials in slice order in whichever program arrives last (the arrival counter is the only
atomic, checked below on the sources); the C++ backend hands whole output tiles to threads (its
only atomic is the work-item counter, which decides who computes a tile, not how);
the PyTorch path is ATen GEMMs and a ``sum``. So no separate deterministic mode is
needed, and under ``torch.use_deterministic_algorithms(True)`` every path runs (nothing
raises) and gives the same bits as without it.
"""
import contextlib
import inspect
import re

import pytest
import torch

from speclora_kernels import cpu
from speclora_kernels.ops import autograd, fused_adapter_linear
from speclora_kernels.ops.kernels import backward, common, forward
from speclora_kernels.quant import NF4Weight, triton_nf4

from conftest import forced_path

GRADS = ("x", "down", "scale", "up")


def _inputs(m, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, k, r = 40, 36, 6
    return {"x": torch.randn(m, k, generator=g).to(dtype),
            "weight": (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype),
            "bias": torch.randn(n, generator=g).to(dtype),
            "down": (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype),
            "scale": torch.rand(r, generator=g) + 0.5,
            "up": torch.randn(n, r, generator=g).to(dtype)}


def _op(t, dropout_p, path):
    """Output and gradients (x, D, s, U) of the public op, dropout seed fixed."""
    leaves = {k: (v.clone().requires_grad_(k in GRADS) if k != "weight" else v)
              for k, v in t.items()}
    torch.manual_seed(123)
    with autograd.cpu_path() if path == "torch" else contextlib.nullcontext():
        y = fused_adapter_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["down"],
                                 leaves["scale"], leaves["up"], dropout_p, 3)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
        grads = torch.autograd.grad(y, [leaves[k] for k in GRADS], dy)
    return [y, *grads]


def _cpp(t, dropout_p):
    keep = cpu.keep_mask(77, t["x"].shape, dropout_p) if dropout_p else None
    y, saved = cpu.adapter_forward(t["x"], t["weight"], t["bias"], t["down"], t["scale"],
                                   t["up"], keep, dropout_p, 3 if dropout_p else 0)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
    grads = cpu.adapter_backward(dy, t["x"], t["weight"], t["down"], t["scale"], t["up"],
                                 saved, keep, dropout_p, 3 if dropout_p else 0)
    return [y, *grads]


def _bitwise_equal(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert torch.equal(u.view(-1).view(torch.uint8) if u.numel() else u,
                           v.view(-1).view(torch.uint8) if v.numel() else v), \
            f"output {i} differs between runs"


def _three_runs(run):
    """Run once plainly and twice under use_deterministic_algorithms: same bits, no error."""
    first = run()
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        second, third = run(), run()
    finally:
        torch.use_deterministic_algorithms(before)
    _bitwise_equal(first, second)
    _bitwise_equal(second, third)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("path", ["fused", "split", "segmented", "splitk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_bitwise_reproducible(dtype, path, dropout_p):
    t = _inputs(9 if path == "splitk" else 20, dtype)  # split-K serves decode (M <= 16)
    with forced_path(path, 2):
        _three_runs(lambda: _op(t, dropout_p, "triton"))


@pytest.mark.parametrize("path", ["triton", "torch"])
def test_nf4_base_bitwise_reproducible(path):
    """An NF4 base (double quant, in_features 36: the span decoder) through the op."""
    t = _inputs(20, torch.float32)
    t["weight"] = NF4Weight.quantize(t["weight"], 64, True, backend="torch")
    _three_runs(lambda: _op(t, 0.25, path))


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_bitwise_reproducible(dtype, dropout_p, single_thread):
    t = _inputs(70, dtype)
    _three_runs(lambda: _op(t, dropout_p, "torch"))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [2, 9, 70], ids=["register-bwd", "register-fwd", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpp_bitwise_reproducible(dtype, m, threads):
    """Register kernels (M <= 16 forward, <= 2 dx) and the tiled-GEMM path, 1 and 2
    threads (2 threads race for the work items: which thread takes a tile varies)."""
    assert cpu.load()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = _inputs(m, dtype)
        _three_runs(lambda: _cpp(t, 0.25))
    finally:
        torch.set_num_threads(before)


def test_atomics_only_count_arrivals():
    """No kernel reduces with atomics: the one atomic use is the split-K decode's arrival
    counter (``count_ptr``), which decides which program sums the partials, never the order
    of the sum. A future atomic reduction must come with a deterministic mode selected by
    ``torch.are_deterministic_algorithms_enabled()``; this guard makes that visible."""
    for module in (common, forward, backward, triton_nf4):
        for call in re.findall(r"\batomic_\w+\([^,]*", inspect.getsource(module)):
            assert "count_ptr" in call, (module.__name__, call)
