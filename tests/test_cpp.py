"""The C++ CPU backend (csrc/, speclora_kernels.cpu) against the float64 reference.

Every method's (D, s, U), dense and NF4 bases, forward and all gradients, fp32 and bf16, odd
shapes, M = 0 and M = 1, and M above the register-kernel limit (the tiled GEMM path); the
in-product NF4 decode is checked bit for bit against ``dequantize_nf4`` on every
instruction set this CPU runs; the fallback runs when the build is disabled or impossible.
The first test builds the library (cold: tens of seconds; cached afterwards).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from speclora_kernels import cpu
from speclora_kernels.dropout import dropout_keep_mask
from speclora_kernels.methods import METHODS
from speclora_kernels.ops import reference_adapter_linear
from speclora_kernels.quant import NF4Weight

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SMALL_M = 16  # rows handled by the register kernels (kSmallM in csrc/ops.cpp); above: tiles + GEMM


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu.load(), "the C++ backend failed to build/load (see the warning)"


@pytest.fixture(autouse=True)
def restore_isa(built):
    before = cpu.isa()
    yield
    cpu.isa(before)


def test_builds_and_registers_ops():
    assert cpu.isa() in ("avx512", "avx2", "portable")
    for op in ("dense_fwd", "dense_bwd", "nf4_fwd", "nf4_bwd", "keep_mask", "isa"):
        assert hasattr(torch.ops.speclora_cpu, op)


def _isas():
    """Instruction sets this CPU runs (always at least 'portable')."""
    current, found = cpu.isa(), []
    for name in ("avx512", "avx2", "portable"):
        try:
            cpu.isa(name)
            found.append(name)
        except (ValueError, RuntimeError):
            pass
    cpu.isa(current)
    assert "portable" in found
    return found


def _close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    a, e = actual.double(), expected.double()
    scale = e.norm()
    if scale == 0:
        assert a.numel() == 0 or a.abs().max() == 0, f"{what}: expected zeros"
        return
    err = ((a - e).norm() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def _randomize(method):
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.3)


def _method(name, weight):
    kw = {"r": 4, "k": 3} if name == "speclora" else {"r": 4}
    m = METHODS[name](weight, **kw)
    _randomize(m)
    return m


def _check_against_reference(x, base, bias, down, scale, up, p, rd, rg, tol):
    """Run the C++ forward + backward and compare every output with the float64 reference."""
    M, K = x.shape
    keep = dropout_keep_mask(1234, (M, K), p) if p > 0 and rd > 0 else None
    y, t = cpu.adapter_forward(x, base, bias, down, scale, up, keep, p, rd, True)
    dy = torch.randn_like(y)
    dx, d_down, d_scale, d_up = cpu.adapter_backward(dy, x, base, down, scale, up, t, keep, p, rd, rg)

    dense = base.dequantize() if isinstance(base, NF4Weight) else base
    x64, d64, s64, u64 = (v.detach().double().requires_grad_() for v in (x, down, scale, up))
    y64 = reference_adapter_linear(
        x64, dense.double(), None if bias is None else bias.double(), d64, s64, u64,
        dropout_p=p, dropout_rows=rd, grad_rows=rg,
        mask=keep, training=keep is not None)
    y64.backward(dy.double())
    _close(y, y64, tol, "y")
    assert y.dtype == x.dtype and dx.dtype == x.dtype and d_down.dtype == down.dtype
    assert d_scale.dtype == scale.dtype and d_up.dtype == up.dtype
    _close(dx, x64.grad, tol, "dx")
    _close(d_down, d64.grad, tol, "d_down")
    _close(d_scale, s64.grad, tol, "d_scale")
    _close(d_up, u64.grad, tol, "d_up")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("base_kind", ["dense", "nf4"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_matches_float64_reference(name, base_kind, dtype):
    out_f, in_f = 37, 96  # odd N; K a multiple of 32, not of 64: NF4 blocks straddle rows
    w0 = torch.randn(out_f, in_f) / in_f**0.5
    method = _method(name, w0)
    base = method.base_weight(w0)
    with torch.no_grad():
        down, scale, up = (f.detach() for f in method.factors())
    if base_kind == "nf4":
        base = NF4Weight.quantize(base, blocksize=64, double_quant=True, dtype=dtype, backend="torch")
    else:
        base = base.to(dtype)
    bias = torch.randn(out_f).to(dtype)
    p = 0.3 if method.dropout_rows else 0.0
    for M in (0, 1, 5, SMALL_M + 3):
        x = torch.randn(M, in_f).to(dtype)
        _check_against_reference(x, base, bias, down.to(dtype), scale.float(), up.to(dtype), p,
                                 method.dropout_rows, method.grad_rows, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_odd_shapes_all_paths_all_isas(dtype):
    """NF4 (every rounding, with/without double quant, blocksizes 32/128, in_features odd or not
    a multiple of 16) and a half-precision dense base, on every instruction set."""
    # in_features 33, 40, 7: rows straddle bytes/chunks (scalar decode); 80: 16-column
    # chunks; 64: 32-column pairs with whole blocks per row.
    cases = [(9, 33, 32, True), (23, 40, 128, False), (11, 80, 32, True), (16, 64, 64, True),
             (5, 7, 32, False)]
    for isa in _isas():
        cpu.isa(isa)
        for out_f, in_f, bs, dq in cases:
            w = torch.randn(out_f, in_f)
            r = 3
            down, up = torch.randn(r, in_f).to(dtype), torch.randn(out_f, r).to(dtype)
            scale = torch.randn(r)
            bases = [NF4Weight.quantize(w, blocksize=bs, double_quant=dq, dtype=dtype, backend="torch")]
            if dtype == torch.bfloat16:
                bases.append(w.to(dtype))
            for base in bases:
                for M in (1, 2, SMALL_M + 1):
                    x = torch.randn(M, in_f).to(dtype)
                    _check_against_reference(x, base, None, down, scale, up, 0.25, 2, 2, TOL[dtype])


def _decoded_by_op(base, rows_at_once):
    """The weight as the op multiplies it: y = I @ W.T through the forward (rows of I fed
    `rows_at_once` at a time: <= SMALL_M runs the register kernel, more the tile kernel)."""
    n, k = base.shape
    zeros_d, zeros_u, s = torch.zeros(1, k), torch.zeros(n, 1), torch.zeros(1)
    eye = torch.eye(k)
    parts = [cpu.adapter_forward(eye[i:i + rows_at_once], base, None, zeros_d, s, zeros_u)[0]
             for i in range(0, k, rows_at_once)]
    return torch.cat(parts).T


def _decoded_by_backward(base, rows_at_once):
    """dx = I @ W through the backward's base product (register kernel or tiles)."""
    n, k = base.shape
    eye = torch.eye(n)
    out = []
    for i in range(0, n, rows_at_once):
        dy = eye[i:i + rows_at_once]
        x = torch.zeros(dy.shape[0], k)
        dx, *_ = cpu.adapter_backward(dy, x, base, torch.zeros(1, k), torch.zeros(1), torch.zeros(n, 1),
                                      torch.zeros(dy.shape[0], 1), need_ddown=False,
                                      need_dscale=False, need_dup=False)
        out.append(dx)
    return torch.cat(out)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_nf4_decode_in_product_is_bit_identical(wdtype):
    for isa in _isas():
        cpu.isa(isa)
        for out_f, in_f, bs, dq in [(20, 48, 64, True), (17, 40, 32, False), (9, 33, 64, True),
                                    (12, 96, 64, True), (7, 64, 128, False), (6, 128, 32, True)]:
            w = NF4Weight.quantize(torch.randn(out_f, in_f) * 3, blocksize=bs, double_quant=dq,
                                   dtype=wdtype, backend="torch")
            want = w.dequantize().float()  # rounded to w.dtype, as the reference multiplies it
            for rows in (7, SMALL_M, in_f):  # 7: a partial register tile; in_f: tiles + GEMM
                assert torch.equal(_decoded_by_op(w, rows), want), (isa, out_f, in_f, bs, dq, rows)
            for rows in (3, out_f):
                assert torch.equal(_decoded_by_backward(w, rows), want), (isa, out_f, in_f, bs, dq, rows)


def test_nf4_from_bitsandbytes_layout():
    import bitsandbytes.functional as bnb_f
    w = torch.randn(24, 64)
    packed, qs = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    nf4 = NF4Weight.from_bnb(packed, qs)
    want = bnb_f.dequantize_4bit(packed, qs)
    assert torch.equal(_decoded_by_op(nf4, 8), want)
    assert torch.equal(_decoded_by_op(nf4, 64), want)


def test_keep_mask_is_the_kernels_mask():
    for shape, p in [((37, 91), 0.25), ((1, 5), 0.5), ((3, 8), 0.1), ((0, 4), 0.2), ((4, 17), 0.9999)]:
        for seed in (0, 12345, 2**31 - 2):
            assert torch.equal(cpu.keep_mask(seed, shape, p), dropout_keep_mask(seed, shape, p))


@pytest.mark.parametrize("nf4", [False, True])
def test_op_cpu_calls_run_the_cpp_backend(monkeypatch, torch_cpu_path, nf4):
    """The public op on CPU tensors (outside the interpreter) is served by the C++ ops, never
    the PyTorch fallback, and matches float64 with the same dropout mask; seeds mean the
    same mask as in the kernels."""
    from speclora_kernels import ops

    def refuse(*args, **kwargs):
        raise AssertionError("the PyTorch fallback ran although the C++ backend is built")

    monkeypatch.setattr(cpu.fallback, "forward", refuse)
    monkeypatch.setattr(cpu.fallback, "backward", refuse)
    M, K, N, R, rd, rg, p = 6, 40, 19, 5, 3, 4, 0.2
    w = torch.randn(N, K)
    base = NF4Weight.quantize(w, blocksize=64) if nf4 else w
    dense = base.dequantize(torch.float32) if nf4 else w
    x = torch.randn(M, K, requires_grad=True)
    b = torch.randn(N)
    d, s, u = (torch.randn(*shape, requires_grad=True) for shape in ((R, K), (R,), (N, R)))
    torch.manual_seed(7)
    seed = ops.dropout_seed()
    torch.manual_seed(7)
    y = ops.fused_adapter_linear(x, base, b, d, s, u, dropout_p=p, dropout_rows=rd, grad_rows=rg)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [v.detach().double().requires_grad_() for v in (x, d, s, u)]
    mask = dropout_keep_mask(seed, (M, K), p)
    y64 = reference_adapter_linear(leaves[0], dense.double(), b.double(), *leaves[1:],
                                   dropout_p=p, dropout_rows=rd, grad_rows=rg, mask=mask)
    y64.backward(dy.double())
    _close(y, y64, 1e-5, "y")
    for v, v64, what in zip((x, d, s, u), leaves, ("dx", "d_down", "d_scale", "d_up")):
        _close(v.grad, v64.grad, 1e-5, what)


def test_bad_inputs_name_the_argument():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    d, s, u = torch.randn(3, 8), torch.randn(3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="up must be"):
        torch.ops.speclora_cpu.dense_fwd(x, w, None, d, s, u[:, :2], None, 0.0, 0, False)
    with pytest.raises(ValueError, match="keep must be"):
        torch.ops.speclora_cpu.dense_fwd(x, w, None, d, s, u, torch.ones(2, 8), 0.1, 3, False)
    nf4 = NF4Weight.quantize(w, blocksize=32, double_quant=False, backend="torch")
    with pytest.raises(TypeError, match="packed must be"):
        torch.ops.speclora_cpu.nf4_fwd(x, nf4.packed.float(), nf4.absmax, None, None, None, 32, 256,
                                       4, torch.float32, None, d, s, u, None, 0.0, 0, False)
    with pytest.raises(ValueError, match="blocksize must be"):
        torch.ops.speclora_cpu.nf4_fwd(x, nf4.packed, nf4.absmax, None, None, None, 48, 256,
                                       4, torch.float32, None, d, s, u, None, 0.0, 0, False)


def test_disabled_build_falls_back_silently(monkeypatch, recwarn):
    monkeypatch.setenv("SPECLORA_DISABLE_CPP", "1")
    monkeypatch.setitem(cpu._state, "loaded", None)
    assert cpu.load() is False and cpu.is_available() is False and cpu.isa() is None
    assert not [w for w in recwarn if "C++" in str(w.message)]
    w = NF4Weight.quantize(torch.randn(11, 24), blocksize=32, backend="torch")
    _check_against_reference(torch.randn(3, 24), w, torch.randn(11), torch.randn(2, 24),
                             torch.randn(2), torch.randn(11, 2), 0.2, 1, 2, 1e-5)
    assert torch.equal(cpu.keep_mask(5, (3, 9), 0.5), dropout_keep_mask(5, (3, 9), 0.5))


def test_failed_build_warns_one_line_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "/bin/false")  # a "compiler" that exists and always fails
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("SPECLORA_DISABLE_CPP", raising=False)
    monkeypatch.setitem(cpu._state, "loaded", None)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU backend unavailable \\(build failed") as caught:
        assert cpu.load() is False
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    x, w = torch.randn(2, 16), torch.randn(3, 16)
    d, s, u = torch.randn(1, 16), torch.ones(1), torch.randn(3, 1)
    torch.testing.assert_close(cpu.adapter_forward(x, w, None, d, s, u)[0],
                               reference_adapter_linear(x, w, None, d, s, u))


def test_no_compiler_warns_once_and_falls_back(tmp_path):
    """A fresh process with no compiler and an empty cache: one warning line, correct results."""
    code = textwrap.dedent("""
        import warnings, torch
        from speclora_kernels import cpu
        from speclora_kernels.ops import reference_adapter_linear
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = [cpu.load(), cpu.is_available(), cpu.load()]
        msgs = [str(w.message) for w in caught if "C++" in str(w.message)]
        assert ok == [False, False, False], ok
        assert len(msgs) == 1 and "\\n" not in msgs[0] and "no C++ compiler" in msgs[0], msgs
        x, w, b = torch.randn(4, 16), torch.randn(6, 16), torch.randn(6)
        d, s, u = torch.randn(2, 16), torch.randn(2), torch.randn(6, 2)
        y, t = cpu.adapter_forward(x, w, b, d, s, u)
        torch.testing.assert_close(y, reference_adapter_linear(x, w, b, d, s, u))
        dx, dd, ds, du = cpu.adapter_backward(torch.ones(4, 6), x, w, d, s, u, t)
        assert dx.shape == x.shape and dd.shape == d.shape
        print("fallback ok")
    """)
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache")}
    env.pop("SPECLORA_DISABLE_CPP", None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "fallback ok" in run.stdout
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))
