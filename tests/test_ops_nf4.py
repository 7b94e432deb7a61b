"""The fused op on an NF4 base (bitsandbytes layout) against the float64 reference on the
dequantized weight, in the Triton interpreter on CPU.

Every kernel output buffer is poisoned with NaN before the kernels run. The weight is
decoded tile by tile in registers: no launch receives, stores or saves a dense weight.
bf16 runs only on the PyTorch path here (the interpreter's bf16 dot is broken,
triton#11584); the bf16 kernels are covered by the compile report.
"""
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from speclora_kernels import AdapterLinear, reference  # noqa: E402
from speclora_kernels.ops import dropout_keep_mask, dropout_seed, fused_adapter_linear  # noqa: E402
from speclora_kernels.ops import autograd as op_autograd  # noqa: E402
from speclora_kernels.ops import fused_linear as fl  # noqa: E402
from speclora_kernels.quant import NF4Weight, dequantize_nf4  # noqa: E402

pytestmark = pytest.mark.skipif(not fl.INTERPRET and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by conftest) or a GPU")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
OUT_F = 37
# (in_features, blocksize, double_quant): K a multiple of the blocksize takes the row decoder
# (contiguous bytes, one scale per row and block), any other K the span decoder (rows that
# start mid-byte when K is odd, mid-block when K % blocksize != 0).
LAYOUTS = [(128, 64, True), (75, 64, False), (256, 128, False), (99, 128, True), (160, 128, True)]
# method -> (R, dropout_p, dropout_rows, grad_rows, inputs that need a gradient)
PATTERNS = {
    "lora": (6, 0.1, None, None, ("x", "down", "up")),
    "speclora": (9, 0.1, 6, 6, ("x", "down", "scale", "up")),
    "spectral_additive": (6, 0.0, 0, None, ("x", "down", "up")),
    "spectral_rotational": (6, 0.0, 0, None, ("x", "down", "scale", "up")),
    "spectral_on_linear4bit": (12, 0.0, 0, 6, ("x", "down", "up")),  # W0 base, -term rows
    "pica": (6, 0.0, 0, None, ("x", "up")),
}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(fl, "_empty", nan_empty)


def rel_err(got, want):
    assert torch.isfinite(got).all(), "non-finite values (an unwritten poisoned element?)"
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def make_inputs(M, layout, R, dtype, grads, bias=True, out_f=OUT_F):
    in_f, blocksize, double_quant = layout
    w = torch.randn(out_f, in_f) * in_f ** -0.5
    w[3] *= 40  # rows of very different range: the scales matter
    t = {
        "x": torch.randn(M, in_f, dtype=dtype),
        "weight": NF4Weight.quantize(w, blocksize, double_quant, backend="torch",
                                     dtype=torch.float32 if dtype == torch.float64 else dtype),
        "bias": torch.randn(out_f).to(dtype) if bias else None,
        "down": (torch.randn(R, in_f) * in_f ** -0.5).to(dtype),
        "scale": (torch.rand(R) + 0.5).to(torch.promote_types(dtype, torch.float32)),
        "up": torch.randn(out_f, R).to(dtype),
    }
    for name in grads:
        t[name].requires_grad_()
    return t


def run(t, p, rd, rg, seed=1234):
    """Output, dy, gradients of every input that requires one, the kernels' keep-mask."""
    torch.manual_seed(seed)
    y = fused_adapter_linear(t["x"], t["weight"], t["bias"], t["down"], t["scale"], t["up"],
                             p, rd, rg)
    torch.manual_seed(seed + 1)
    dy = torch.randn_like(y)
    names = [n for n, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = dict(zip(names, torch.autograd.grad(y, [t[n] for n in names], dy)))
    torch.manual_seed(seed)
    mask = dropout_keep_mask(dropout_seed(), t["x"].shape, p) if p else None
    return y, dy, grads, mask


def check(t, p, rd, rg, y, dy, grads, mask):
    """float64 reference on the dequantized weight (bit-identical to bitsandbytes' decode,
    rounded to x's dtype as the kernels round their tiles)."""
    tol = TOL[t["x"].dtype]
    ref = {n: v.detach().double().requires_grad_(v.requires_grad)
           for n, v in t.items() if isinstance(v, torch.Tensor)}
    w = dequantize_nf4(t["weight"], t["x"].dtype).double()
    y_ref = reference.fused_adapter_linear(ref["x"], w, ref.get("bias"), ref["down"],
                                           ref["scale"], ref["up"], p, rd, rg, mask=mask)
    assert y.dtype == t["x"].dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < tol
    want = torch.autograd.grad(y_ref, [ref[n] for n in grads], dy.double())
    for (name, got), w_grad in zip(grads.items(), want):
        assert got.dtype == t[name].dtype and got.shape == t[name].shape, name
        assert rel_err(got, w_grad) < tol, name


@pytest.mark.parametrize("shape,blocksize,double_quant", [
    ((37, 128), 64, True), ((20, 256), 128, False), ((300, 64), 32, True),  # row decoder
    ((37, 75), 64, True), ((20, 99), 128, False), ((9, 160), 128, True),    # span decoder
    ((5, 2047), 1024, False), ((3, 1), 64, True)])
def test_fused_decoders_bit_identical(shape, blocksize, double_quant):
    """The kernels' tile decoders (row and span) give bitsandbytes' values, rounded to each
    activation dtype, for tiles narrower and wider than a block."""
    from speclora_kernels.quant.triton_nf4 import dequantize_nf4_triton

    w = NF4Weight.quantize(torch.randn(shape) * 3, blocksize, double_quant, backend="torch")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for block_k in (32, 256):
            out = torch.full(shape, float("nan"), dtype=dtype)
            dequantize_nf4_triton(w, dtype, out=out, block_n=16, block_k=block_k, rows=True)
            assert torch.equal(out, dequantize_nf4(w, dtype)), (dtype, block_k)


@pytest.mark.parametrize("M", [1, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("method", list(PATTERNS))
def test_method_patterns(method, dtype, M):
    R, p, rd, rg, grads = PATTERNS[method]
    i = list(PATTERNS).index(method)
    layout = LAYOUTS[(i + M + (dtype == torch.float16)) % len(LAYOUTS)]
    torch.manual_seed(100 * i + M)
    t = make_inputs(M, layout, R, dtype, grads, bias=i % 2 == 0)
    y, dy, got, mask = run(t, p, rd, rg)
    check(t, p, rd, rg, y, dy, got, mask)
    if rg is not None and rg < R:  # frozen rows get exact zeros
        assert not got["down"][rg:].any()


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda c: "K{}-bs{}-{}".format(c[0], c[1], "dq" if c[2] else "nodq"))
def test_layouts_both_paths(layout, path, monkeypatch):
    """Every layout (row decoder and span decoder, blocksize 64/128, double quant on and
    off) through the fused and the split kernels, forward and dx."""
    monkeypatch.setattr(fl, "use_fused_path", lambda *shape, dropout=False: path == "fused")
    torch.manual_seed(layout[0])
    t = make_inputs(7, layout, 5, torch.float32, ("x", "down", "scale", "up"))
    check(t, 0.2, 3, None, *run(t, 0.2, 3, None))


@pytest.mark.parametrize("layout", [LAYOUTS[2], LAYOUTS[4]], ids=["rows", "span"])
def test_segmented_path(layout, monkeypatch):
    """The large-M forward and dx kernels (segments of column tiles, t and g computed once
    per segment) on an NF4 base, forced at a small shape with 64-wide output tiles and 2
    segments: y 2 + 1 tiles, dx 2 + 2 (rows) or 2 + 1 (span); the decoders run inside the
    segment loops."""
    monkeypatch.setattr(fl, "use_fused_path", lambda *shape, dropout=False: False)
    monkeypatch.setattr(fl.FWD, "configs",  # 64-wide tiles at the 8 warps segments need
                        [triton.Config(c.kwargs, num_warps=8, num_stages=c.num_stages)
                         for c in fl.FWD.configs if c.kwargs["BLOCK_N"] == 64])
    monkeypatch.setattr(fl.DX, "configs",
                        [triton.Config(c.kwargs, num_warps=8, num_stages=c.num_stages)
                         for c in fl.DX.configs if c.kwargs["BLOCK_K"] == 64])
    torch.manual_seed(layout[0] + 1)
    t = make_inputs(7, layout, 5, torch.float16, ("x", "down", "scale", "up"), out_f=150)
    with fl.pinned_segments(2), fl.record_launches() as launches:
        y, dy, grads, mask = run(t, 0.2, 3, None)
    check(t, 0.2, 3, None, y, dy, grads, mask)
    assert [kernel for kernel, _ in launches] == [fl.FWD, fl.DX, fl.FACTOR]
    for kernel, args in launches[:2]:
        assert args["SEGMENTED"] and args["NF4"]
        assert any(kernel.fits(c, args) for c in kernel.configs)  # not the fallback config
        assert args["NF4_ROWS"] == (layout[0] % layout[1] == 0)


def dense_weight_tensors(tensors, n_elements):
    return [tuple(v.shape) for v in tensors
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() >= n_elements]


def test_weight_never_materialised():
    """No launch gets a dense weight-sized float tensor, none is saved for backward, and the
    PyTorch fallback's dequantizer is never called."""
    layout = (256, 64, True)
    t = make_inputs(16, layout, 8, torch.float16, ("x", "down", "scale", "up"))
    n = OUT_F * layout[0]  # > every activation-sized tensor here (16 x 256)
    saved = []

    def pack(v):
        saved.append(v)
        return v

    calls = []
    real = NF4Weight.dequantize
    NF4Weight.dequantize = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        with fl.record_launches() as launches, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            y, dy, grads, mask = run(t, 0.1, 8, None)
    finally:
        NF4Weight.dequantize = real
    check(t, 0.1, 8, None, y, dy, grads, mask)
    names = [kernel.name for kernel, _ in launches]
    assert "_fwd_kernel" in names and "_dx_kernel" in names
    for kernel, args in launches:
        assert not dense_weight_tensors(args.values(), n), kernel.name
        if kernel.name in ("_fwd_kernel", "_dx_kernel"):
            assert args["NF4"] and args["w_ptr"] is t["weight"].packed
    assert not dense_weight_tensors(saved, n) and calls == []
    assert any(v is t["weight"].packed for v in saved)  # a reference, not a copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pytorch_path(monkeypatch, dtype):
    """CPU without Triton (float64 always): the fallback dequantizes (only there) and
    matches the reference."""
    if dtype != torch.float64:
        monkeypatch.setattr(op_autograd, "_use_triton", lambda x, rank: False)
    torch.manual_seed(3)
    t = make_inputs(6, (99, 128, True), 7, dtype, ("x", "down", "scale", "up"))
    check(t, 0.25, 4, 5, *run(t, 0.25, 4, 5))


def test_kernels_and_pytorch_path_agree(monkeypatch):
    torch.manual_seed(4)
    t = make_inputs(5, (128, 64, True), 6, torch.float32, ("x", "down", "up"))
    y_kernel, _, g_kernel, _ = run(t, 0.3, 6, None)
    monkeypatch.setattr(op_autograd, "_use_triton", lambda x, rank: False)
    y_torch, _, g_torch, _ = run(t, 0.3, 6, None)
    assert rel_err(y_kernel, y_torch) < 1e-5
    for name in g_kernel:
        assert rel_err(g_kernel[name], g_torch[name]) < 1e-5, name


def test_layer_from_linear4bit_through_kernels():
    """End to end: AdapterLinear built from bitsandbytes' Linear4bit runs the NF4 kernels and
    equals the Linear4bit at init (fp32), and trains."""
    import bitsandbytes as bnb

    torch.manual_seed(5)
    q = bnb.nn.Linear4bit(128, OUT_F, quant_type="nf4").to("cpu").train()
    layer = AdapterLinear.from_linear(q, "spectral_additive", r=4)
    x = torch.randn(3, 128)
    assert rel_err(layer(x), q(x)) < 1e-5
    with torch.no_grad():
        layer.adapter.A.normal_()
        layer.adapter.B.normal_()
    layer(x).square().sum().backward()
    assert layer.adapter.A.grad.abs().sum() > 0 and layer.adapter.B.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph():
    """The NF4 op compiles with fullgraph=True (inductor, CPU) and matches eager."""
    torch.manual_seed(6)
    w = NF4Weight.quantize(torch.randn(OUT_F, 64), 64, True, backend="torch")
    a = torch.nn.Parameter(torch.randn(4, 64) / 8)
    b = torch.nn.Parameter(torch.randn(OUT_F, 4))
    scale = torch.full((4,), 0.5)

    def f(x):
        return fused_adapter_linear(torch.relu(x), w, None, a, scale, b)

    x = torch.randn(3, 64, requires_grad=True)
    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        y = fn(x)
        results.append((y, torch.autograd.grad(y.square().sum(), [x, a, b])))
    (y0, g0), (y1, g1) = results
    assert rel_err(y1, y0) < 1e-6
    for u, v in zip(g1, g0):
        assert rel_err(u, v) < 1e-6


def test_rejects_bad_arguments():
    t = make_inputs(2, (64, 64, True), 4, torch.float32, ())
    args = [t["x"], t["weight"], t["bias"], t["down"], t["scale"], t["up"]]
    with pytest.raises(ValueError, match="x must have last dimension in_features=64"):
        fused_adapter_linear(torch.randn(2, 63), *args[1:])
    with pytest.raises(ValueError, match="up must be"):
        fused_adapter_linear(*args[:5], torch.randn(OUT_F + 1, 4))
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        fused_adapter_linear(args[0], NF4Weight(*(v.to("meta") for v in (t["weight"].packed, t["weight"].absmax)),
                                                (OUT_F, 64), torch.float32, 64,
                                                absmax2=t["weight"].absmax2.to("meta"),
                                                code2=t["weight"].code2.to("meta"),
                                                offset=t["weight"].offset.to("meta")), *args[2:])


def test_nf4_report_command(tmp_path):
    """``python -m speclora_kernels.tools.nf4_report`` (small shape): the decode forward on
    NF4 touches no more unique bytes than its floor, and bitsandbytes + PEFT keeps more for
    backward than the fused layer (the 4096 x 4096 numbers are in the README)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "nf4.json"
    proc = subprocess.run([sys.executable, "-m", "speclora_kernels.tools.nf4_report", "--shape",
                           "96x256", "--rank", "8", "--tokens", "32", "--json", str(out)],
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    count, rows = report["decode_bytes"], report["saved_for_backward"]["rows"]
    assert count["nf4"]["launches"] == 1 and 0.9 < count["nf4_vs_floor"] <= 1.05
    assert count["nf4_vs_bf16"] < 0.5
    peft, ours = rows["bnb Linear4bit + PEFT LoRA"], rows["AdapterLinear lora (NF4)"]
    assert ours["x_saved"] and ours["activation_bytes"] < peft["activation_bytes"]
    assert "fused NF4 forward, unique bytes" in proc.stdout
