"""Property-based tests (hypothesis): the op never gives a wrong answer.

Random methods (every method in ``speclora_kernels.methods`` with random parameters, or
random factors with random ``dropout_rows`` / ``grad_rows``), shapes (M from 0, sizes not
multiples of any block, R from 1, 0-2 leading dims), dtypes, layouts (transposed,
sliced, broadcast leading dim via ``expand``, column-major W / D / U, strided s and
bias), dense or NF4 base, bias or not, dropout or not. Four implementations are checked against the float64
reference (output and the gradients of x, D, s, U, fed the kernels' own dropout mask),
the error measured against the size of the terms (the reference on absolute values), so
a sum that cancels is judged as rounding would affect it:

- the public op with the Triton kernels in the interpreter (fp32, fp16; the launcher's
  own path or forced fused / split / segmented; every kernel output starts as NaN).
  bf16 is not run there: the interpreter's bf16 ``tl.dot``
  multiplies raw bits (triton#11584), so its results say nothing about the kernels
  (bf16 is covered by compilation in tests/test_compile_report.py);
- the public op's PyTorch path (what CPU tensors run outside the interpreter);
- the C++ backend (``cpu.adapter_forward`` / ``adapter_backward``);
- the reference itself at low precision.

Bad arguments must raise ValueError / TypeError naming the argument.

Budget: examples per property are fixed (``derandomize=True``: the same cases on every run)
so the file runs in about a minute on 2 cores; ``CASES`` counts the examples that ran.
"""
import contextlib
import itertools
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speclora_kernels import cpu
from speclora_kernels.methods import METHODS
from speclora_kernels.ops import (
    autograd,
    dropout_keep_mask,
    dropout_seed,
    fused_adapter_linear,
    recipe,
    reference_adapter_linear,
)
from speclora_kernels.quant import NF4Weight, dequantize_nf4

from conftest import forced_path

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
CASES: Counter = Counter()


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------- inputs
LAYOUTS_X = ("contiguous", "transposed", "sliced", "expanded")


@st.composite
def problems(draw, dtypes):
    """One random problem: tensors in the op's layout, their dropout/grad rows, dropout."""
    dtype = draw(st.sampled_from(dtypes))
    method = draw(st.sampled_from(("random",) + tuple(METHODS)))
    lead = draw(st.lists(st.integers(0, 5), min_size=0, max_size=2))
    layout = draw(st.sampled_from(LAYOUTS_X if lead else ("contiguous", "expanded")))
    if layout == "transposed":
        lead = lead[:1]
    n_out, n_in = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    weight = randn(n_out, n_in, scale=n_in ** -0.5)
    if method == "random":
        rank = draw(st.integers(1, 20))
        down = randn(rank, n_in, scale=n_in ** -0.5)
        scale = randn(rank).abs() + 0.5
        up = randn(n_out, rank)
        rd, rg = draw(st.integers(0, rank)), draw(st.integers(0, rank))
        base = weight
    else:
        r_max = min(n_out, n_in)
        r = draw(st.integers(1, min(r_max, 8)))
        kwargs = {"k": draw(st.integers(1, r_max))} if method == "speclora" else {}
        m = METHODS[method](weight.float(), r=r, **kwargs)
        with torch.no_grad():
            for p in m.parameters():  # away from the (trivial) init
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        down, scale, up = (f.detach().double() for f in m.factors())
        rank, rd, rg = m.rank, m.dropout_rows, m.grad_rows
        base = m.base_weight(weight.float()).double()
    p = draw(st.sampled_from((0.0, 0.0, 0.3)))
    with_bias = draw(st.booleans())
    scale_dtype = draw(st.sampled_from((torch.float32, dtype)))

    # layouts: the op sees views; gradients are taken w.r.t. those views
    x_base = randn(*([1] if layout == "expanded" else []), *lead, n_in)
    if layout == "transposed":
        x_base = x_base.T.contiguous().T if lead else x_base
    elif layout == "sliced":
        x_base = torch.stack([x_base, x_base], -1).flatten(-2)[..., ::2]
    elif layout == "expanded":
        x_base = x_base.expand(draw(st.integers(0, 3)), *x_base.shape[1:])
    t = {"x": x_base, "weight": base, "bias": randn(n_out) if with_bias else None,
         "down": down, "scale": scale, "up": up}
    for name in ("weight", "down", "up"):
        if draw(st.booleans()):
            t[name] = t[name].T.contiguous().T  # column-major storage
    for name in ("scale", "bias"):  # every other element of a longer vector
        if t[name] is not None and draw(st.booleans()):
            t[name] = torch.stack([t[name], -t[name]], -1).flatten()[::2]
    casted = {k: _cast(v, scale_dtype if k == "scale" else dtype) for k, v in t.items()}
    dense = casted["weight"]
    if draw(st.booleans()):  # NF4 base (bitsandbytes layout, decoded to x's dtype)
        nf4 = NF4Weight.quantize(base.float(), 64, draw(st.booleans()), backend="torch",
                                 dtype=dtype)
        casted["weight"], dense = nf4, dequantize_nf4(nf4, dtype)
    return dict(t=casted, dense=dense, dtype=dtype, p=p, rd=rd, rg=rg, method=method,
                layout=layout)


def _cast(v, dtype):
    """``v.to(dtype)`` keeping its layout (expand / strides) as a view."""
    if v is None:
        return None
    if v.stride() and 0 in v.stride():  # expanded: cast the one stored row, expand again
        return v[:1].to(dtype).expand(v.shape)
    out = torch.empty_strided(v.shape, v.stride(), dtype=dtype) if v.numel() else \
        torch.empty(v.shape, dtype=dtype)
    return out.copy_(v) if v.numel() else out


# ----------------------------------------------------------------------------- checks
def _close(got, want, size, tol, what):
    """``|got - want| <= tol * max(size)``, ``size`` the result on absolute values (so a
    sum that cancels is judged against the size of its terms, as rounding errors are)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not want.numel():
        return
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten output?)"
    err = (got.double() - want).abs().max() / size.abs().max().clamp_min(1e-30)
    assert err < tol, f"{what}: error {err:.3g} of the terms' size > {tol}"


GRADS = ("x", "down", "scale", "up")


def _reference(case, mask):
    """float64 reference: output, the dy used, gradients; each as (value, size), the size
    being the same computation on the inputs' (and dy's) absolute values."""
    dy = None
    out = []
    for size in (False, True):
        args = {**case["t"], "weight": case["dense"]}
        ref = {k: (None if v is None else v.detach().double().abs() if size else
                   v.detach().double()) for k, v in args.items()}
        for k in GRADS:
            ref[k].requires_grad_()
        y = reference_adapter_linear(ref["x"], ref["weight"], ref["bias"], ref["down"],
                                     ref["scale"], ref["up"], case["p"], case["rd"],
                                     case["rg"], mask=mask)
        if dy is None:
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7),
                             dtype=torch.float64)
        grads = torch.autograd.grad(y, [ref[k] for k in GRADS], dy.abs() if size else dy)
        out.append((y.detach(), dict(zip(GRADS, grads))))
    (y, grads), (y_size, grad_sizes) = out
    return (y, y_size), dy, {k: (grads[k], grad_sizes[k]) for k in GRADS}


def _compare(case, y, grads, y_ref, g_ref):
    tol = TOL[case["dtype"]]
    assert y.dtype == case["dtype"]
    _close(y, *y_ref, tol, "y")
    for name in GRADS:
        _close(grads[name], *g_ref[name], tol, f"d{name}")
        assert grads[name].dtype == case["t"][name].dtype, name


def _public_op(case, seed=1234):
    """The public op: output, gradients w.r.t. the op's arguments, the mask it drew."""
    t = {k: (v.detach().requires_grad_(k in GRADS) if k in GRADS else v)
         for k, v in case["t"].items()}
    torch.manual_seed(seed)
    y = fused_adapter_linear(t["x"], t["weight"], t["bias"], t["down"], t["scale"], t["up"],
                             case["p"], case["rd"], case["rg"])
    mask = None
    if case["p"] > 0 and case["rd"] > 0:
        torch.manual_seed(seed)
        mask = dropout_keep_mask(dropout_seed(), t["x"].shape, case["p"])
    y_ref, dy, g_ref = _reference(case, mask)
    grads = torch.autograd.grad(y, [t[k] for k in GRADS], dy.to(y.dtype))
    _compare(case, y, dict(zip(GRADS, grads)), y_ref, g_ref)


def _poisoned_outputs():
    """Every buffer a Triton kernel writes starts as NaN."""
    return recipe.filled_outputs(float("nan"))


@contextlib.contextmanager
def _triton_path(path):
    """The launcher's own choice ("auto") or a forced fused / split / segmented path
    (segmented: the large-M one-launch kernels, 2 segments at these shapes, the
    interpreter's tile as wide as the output)."""
    if path == "auto":
        yield
        return
    with forced_path(path, 2):
        yield


def _torch_path():
    return autograd.cpu_path()


# ----------------------------------------------------------------------------- properties
@_settings(200)
@given(problems((torch.float32, torch.float16)),
       st.sampled_from(("auto", "fused", "split", "segmented")))
def _triton_property(case, path):
    CASES["triton"] += 1
    with _poisoned_outputs(), _triton_path(path):
        _public_op(case)


@_settings(800)
@given(problems((torch.float32, torch.float16, torch.bfloat16)))
def _torch_property(case):
    CASES["torch"] += 1
    with _torch_path():
        _public_op(case)


@_settings(800)
@given(problems((torch.float32, torch.float16, torch.bfloat16)))
def _cpp_property(case):
    CASES["cpp"] += 1
    t = {k: (v.detach() if k in GRADS else v) for k, v in case["t"].items()}
    x2d = t["x"].reshape(-1, t["x"].shape[-1])
    active = case["p"] > 0 and case["rd"] > 0
    keep = cpu.keep_mask(99, x2d.shape, case["p"]) if active else None
    y, saved = cpu.adapter_forward(x2d, t["weight"], t["bias"], t["down"], t["scale"], t["up"],
                                   keep, case["p"], case["rd"] if active else 0)
    y_ref, dy, g_ref = _reference(case, keep.reshape(t["x"].shape) if active else None)
    dy2d = dy.to(y.dtype).reshape(y.shape)
    dx, dd, ds, du = cpu.adapter_backward(dy2d, x2d, t["weight"], t["down"], t["scale"],
                                          t["up"], saved, keep, case["p"],
                                          case["rd"] if active else 0, case["rg"])
    grads = {"x": dx.reshape(t["x"].shape), "down": dd, "scale": ds, "up": du}
    _compare(case, y.reshape(y_ref[0].shape), grads, y_ref, g_ref)


@_settings(400)
@given(problems((torch.float32, torch.float16, torch.bfloat16)))
def _reference_property(case):
    CASES["reference"] += 1
    t = {k: (v.detach().requires_grad_(k in GRADS) if k in GRADS else v)
         for k, v in {**case["t"], "weight": case["dense"]}.items()}
    mask = None
    if case["p"] > 0 and case["rd"] > 0:
        mask = torch.rand(t["x"].shape, generator=torch.Generator().manual_seed(3)) >= case["p"]
    y = reference_adapter_linear(t["x"], t["weight"], t["bias"], t["down"], t["scale"],
                                 t["up"], case["p"], case["rd"], case["rg"], mask=mask)
    y_ref, dy, g_ref = _reference(case, mask)
    grads = torch.autograd.grad(y, [t[k] for k in GRADS], dy.to(y.dtype))
    _compare(case, y, dict(zip(GRADS, grads)), y_ref, g_ref)


def _run(prop, name, at_least):
    CASES[name] = 0
    prop()
    assert CASES[name] >= at_least, f"only {CASES[name]} {name} cases ran"
    print(f"\n{name}: {CASES[name]} property cases")


@pytest.mark.slow
def test_triton_interpreter_matches_reference():
    _run(_triton_property, "triton", 190)


def test_torch_path_matches_reference():
    _run(_torch_property, "torch", 750)


def test_cpp_backend_matches_reference():
    assert cpu.load(), "the C++ backend failed to build/load"
    _run(_cpp_property, "cpp", 750)


def test_reference_low_precision_matches_float64():
    _run(_reference_property, "reference", 380)


@pytest.mark.parametrize("name", ["scale", "bias"])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_strided_scale_and_bias(name, path):
    """A 1-D ``scale`` / ``bias`` that is every other element of a longer vector (found by
    the property above): the kernels must read it through its stride, not as contiguous."""
    g = torch.Generator().manual_seed(0)
    t = {"x": torch.randn(3, 8, generator=g), "weight": torch.randn(4, 8, generator=g),
         "bias": torch.randn(4, generator=g), "down": torch.randn(2, 8, generator=g),
         "scale": torch.tensor([1.0, 2.0]), "up": torch.randn(4, 2, generator=g)}
    t[name] = torch.stack([t[name], 10 * t[name] + 1], -1).flatten()[::2]
    assert not t[name].is_contiguous()
    case = dict(t=t, dense=t["weight"], dtype=torch.float32, p=0.0, rd=None, rg=None)
    with _poisoned_outputs(), _torch_path() if path == "torch" else contextlib.nullcontext():
        _public_op(case)


# ----------------------------------------------------------------------------- bad input
def _good(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(3, 6, generator=g).to(dtype),
            "weight": torch.randn(5, 6, generator=g).to(dtype),
            "bias": torch.randn(5, generator=g).to(dtype),
            "down": torch.randn(2, 6, generator=g).to(dtype),
            "scale": torch.rand(2, generator=g), "up": torch.randn(5, 2, generator=g).to(dtype),
            "dropout_p": 0.1, "dropout_rows": None, "grad_rows": None}


# (argument, bad value builder, exception): each must be named in the message
MUTATIONS = [
    ("x", lambda t: t["x"][:, :5], ValueError),
    ("x", lambda t: t["x"].tolist(), TypeError),
    ("x", lambda t: t["x"].to(torch.int32), TypeError),
    ("weight", lambda t: t["weight"][0], ValueError),
    ("weight", lambda t: t["weight"].to(torch.int64), TypeError),
    ("bias", lambda t: t["bias"][:4], ValueError),
    ("bias", lambda t: t["bias"].to(torch.int32), TypeError),
    ("down", lambda t: t["down"][:, :5], ValueError),
    ("down", lambda t: t["down"][0], ValueError),
    ("down", lambda t: t["down"].to(torch.uint8), TypeError),
    ("scale", lambda t: t["scale"][:1], ValueError),
    ("scale", lambda t: t["scale"][None], ValueError),
    ("up", lambda t: t["up"][:, :1], ValueError),
    ("up", lambda t: t["up"].T, ValueError),
    ("up", lambda t: t["up"].tolist(), TypeError),
    ("dropout_p", lambda t: 1.0, ValueError),
    ("dropout_p", lambda t: -0.1, ValueError),
    ("dropout_p", lambda t: float("nan"), ValueError),
    ("dropout_rows", lambda t: 3, ValueError),
    ("dropout_rows", lambda t: -1, ValueError),
    ("grad_rows", lambda t: 3, ValueError),
    ("grad_rows", lambda t: -1, ValueError),
]
# the public op: factors/weight in x's dtype are never silently copied
OP_ONLY = [
    ("weight", lambda t: t["weight"].double(), TypeError),
    ("scale", lambda t: t["scale"].double(), TypeError),
]


def test_bad_input_raises_naming_the_argument():
    """Every mutation, through the reference, the public op (Triton) and its PyTorch path,
    for fp32 and fp16 inputs: a ValueError / TypeError whose message starts with the name."""
    count = 0
    for (name, bad, exc), entry, dtype in itertools.product(
            MUTATIONS + OP_ONLY, ("reference", "op", "op-torch"), (torch.float32, torch.float16)):
        if (name, bad, exc) in OP_ONLY and entry == "reference":
            continue
        t = _good(dtype)
        t[name] = bad(t)
        fn = reference_adapter_linear if entry == "reference" else fused_adapter_linear
        with _torch_path() if entry == "op-torch" else contextlib.nullcontext():
            with pytest.raises(exc, match=rf"^{name}\b"):
                fn(**t)
        count += 1
    CASES["bad input"] = count
    print(f"\nbad input: {count} cases")


@pytest.mark.parametrize("name,bad,exc", [m for m in MUTATIONS if m[0] in
                                          ("x", "weight", "bias", "down", "scale", "up")
                                          and m[2] is ValueError])
def test_cpp_bad_shapes_raise_naming_the_argument(name, bad, exc):
    assert cpu.load()
    t = _good()
    t[name] = bad(t)
    args = {k: t[k] for k in ("x", "weight", "bias", "down", "scale", "up")}
    with pytest.raises(exc, match=name):
        cpu.adapter_forward(**args)
