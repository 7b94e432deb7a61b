"""Extreme values: NaN / Inf inputs, fp16 overflow, huge and tiny scales.

Every path of the op: the Triton kernels (interpreter; fp32, fp16: the interpreter's bf16
dot is wrong, triton#11584), the public op's PyTorch path (fp32, fp16, bf16) and the C++
backend (fp32, fp16, bf16). The float64 reference, fed the same (rounded) inputs, says
what the answer is:

- a NaN or +-Inf in x, W, bias, D, s or U gives NaN exactly where the reference has NaN,
  +-Inf exactly where it has +-Inf (same sign), and the reference's values elsewhere, in
  the output and in the gradients of x, D, s, U;
- fp16 outputs beyond the fp16 range are +-Inf where ``F.linear`` gives +-Inf;
- a huge scale with a small U (or a tiny scale with a large U) whose product is moderate
  gives the reference's finite answer: no Inf from an intermediate that overflowed, no
  zeros from one that underflowed.
"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from speclora_kernels import cpu
from speclora_kernels.ops import autograd, fused_adapter_linear, reference_adapter_linear

PATHS = [("triton", torch.float32), ("triton", torch.float16), ("torch", torch.float32),
         ("torch", torch.float16), ("torch", torch.bfloat16), ("cpp", torch.float32),
         ("cpp", torch.float16), ("cpp", torch.bfloat16)]
PATH_IDS = [f"{p}-{str(d)[6:]}" for p, d in PATHS]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GRADS = ("x", "down", "scale", "up")
M, N, K, R = 5, 7, 12, 3


# Every buffer a Triton kernel writes starts as NaN (so NaN checks mean something, the
# tests below also compare every non-NaN position).
pytestmark = pytest.mark.usefixtures("poison_outputs")


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(M, K, generator=g).to(dtype),
            "weight": (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype),
            "bias": torch.randn(N, generator=g).to(dtype),
            "down": (torch.randn(R, K, generator=g) / K ** 0.5).to(dtype),
            "scale": torch.rand(R, generator=g) + 0.5,
            "up": torch.randn(N, R, generator=g).to(dtype)}


def _run(path, t, dy):
    """(y, {name: gradient}) from one path of the op."""
    if path == "cpp":
        assert cpu.load()
        y, saved = cpu.adapter_forward(t["x"], t["weight"], t["bias"], t["down"], t["scale"],
                                       t["up"])
        grads = cpu.adapter_backward(dy.to(y.dtype), t["x"], t["weight"], t["down"],
                                     t["scale"], t["up"], saved)
        return y, dict(zip(GRADS, grads))
    leaves = {k: (v.detach().requires_grad_(k in GRADS) if v is not None else None)
              for k, v in t.items()}
    with autograd.cpu_path() if path == "torch" else contextlib.nullcontext():
        y = fused_adapter_linear(leaves["x"], leaves["weight"], leaves["bias"],
                                 leaves["down"], leaves["scale"], leaves["up"])
        grads = torch.autograd.grad(y, [leaves[k] for k in GRADS], dy.to(y.dtype))
    return y, dict(zip(GRADS, grads))


def _reference(t, dy, size=False):
    ref = {k: (None if v is None else v.detach().double().abs() if size else
               v.detach().double()) for k, v in t.items()}
    for k in GRADS:
        ref[k].requires_grad_()
    y = reference_adapter_linear(ref["x"], ref["weight"], ref["bias"], ref["down"],
                                 ref["scale"], ref["up"])
    grads = torch.autograd.grad(y, [ref[k] for k in GRADS], dy.abs() if size else dy)
    return y.detach(), dict(zip(GRADS, grads))


def _same_values(got, want, size, tol, what):
    """NaN where ``want`` (rounded to got's dtype: beyond its range, Inf is the answer) is
    NaN, the same +-Inf where it is infinite, and within ``tol`` of the size of the terms
    elsewhere."""
    want = want.to(got.dtype).double()
    got = got.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), \
        f"{what}: NaN at {torch.isnan(got).nonzero().tolist()}, reference " \
        f"{torch.isnan(want).nonzero().tolist()}"
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf), \
        f"{what}: Inf at {torch.isinf(got).nonzero().tolist()}, reference {inf.nonzero().tolist()}"
    assert torch.equal(got[inf], want[inf]), f"{what}: Inf of the wrong sign"
    finite = torch.isfinite(want)
    if finite.any():
        scale = size[finite].abs().max().clamp_min(1e-30)
        err = (got[finite] - want[finite]).abs().max() / scale
        assert err < tol, f"{what}: error {err:.3g} of the terms' size > {tol}"


def _check(path, dtype, t):
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dy = dy.to(dtype).double()
    y, grads = _run(path, t, dy)
    want, want_grads = _reference(t, dy)
    size, size_grads = _reference({k: (v.nan_to_num(0.0, 0.0, 0.0) if v is not None else None)
                                   for k, v in t.items()}, dy, size=True)
    assert y.dtype == dtype
    _same_values(y, want, size, TOL[dtype], "y")
    for name in GRADS:
        _same_values(grads[name], want_grads[name], size_grads[name], TOL[dtype], f"d{name}")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["x", "weight", "bias", "down", "scale", "up"])
@pytest.mark.parametrize("path,dtype", PATHS, ids=PATH_IDS)
def test_nonfinite_inputs_propagate_like_the_reference(path, dtype, name, value):
    t = _inputs(dtype)
    flat = t[name].view(-1)
    flat[(7 * flat.numel()) // 11] = value  # one element, not the first or last
    _check(path, dtype, t)


@pytest.mark.parametrize("path", ["triton", "torch", "cpp"])
def test_fp16_overflow_like_f_linear(path):
    """Rows of x scaled so that some outputs pass 65504: Inf exactly where F.linear (the
    base product alone) has Inf, with a zero adapter so both compute the same thing."""
    t = _inputs(torch.float16)
    t["x"] = t["x"] * torch.tensor([1.0, 2e4, 1.0, 1e3, 300.0], dtype=torch.float16)[:, None]
    t["weight"] = t["weight"] * 30
    t["up"] = torch.zeros_like(t["up"])
    base = F.linear(t["x"], t["weight"], t["bias"])
    assert torch.isinf(base).any() and torch.isfinite(base).any()
    dy = torch.ones(M, N, dtype=torch.float64)
    y, _ = _run(path, t, dy)
    assert torch.equal(torch.isinf(y), torch.isinf(base))
    assert torch.equal(y[torch.isinf(y)], base[torch.isinf(base)])
    finite = torch.isfinite(base)
    assert torch.allclose(y[finite].float(), base[finite].float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("scale,up", [(1e5, 1e-4), (1e-8, 3e4)], ids=["huge-s", "tiny-s"])
@pytest.mark.parametrize("path,dtype", PATHS, ids=PATH_IDS)
def test_extreme_scale_with_compensating_up(path, dtype, scale, up):
    """``s`` far outside the activations' range and ``U`` the other way, ``s * U``
    moderate (a spectral method's large singular values; a near-zero mask): the answer is
    the reference's. An fp16 ``t * s`` overflows (Inf, then NaN) or underflows (the
    adapter silently contributes zero); both are wrong answers."""
    t = _inputs(dtype)
    t["weight"] = torch.zeros_like(t["weight"])  # the adapter alone decides y
    t["bias"] = None
    t["scale"] = torch.full((R,), scale)
    t["up"] = (t["up"].float() * up).to(dtype)
    _check(path, dtype, t)
