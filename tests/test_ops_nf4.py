"""The fused op on an NF4 base (bitsandbytes layout) against the float64 reference on the
dequantized weight: on the GPU when there is one, else in the Triton interpreter on CPU.

Every kernel output buffer is poisoned with NaN before the kernels run. The weight is
decoded tile by tile in registers: no launch receives, stores or saves a dense weight.
Without a GPU, bf16 runs only on the CPU backend here (the interpreter's bf16 dot is
broken, triton#11584); the bf16 kernels are covered by the compile report.
"""
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from speclora_kernels import AdapterLinear  # noqa: E402
from speclora_kernels.ops import (  # noqa: E402  # noqa: E402
    autograd,
    dropout_keep_mask,
    dropout_seed,
    fused_adapter_linear,
    reference_adapter_linear,
    tuning,
)
from speclora_kernels.quant import NF4Weight, dequantize_nf4  # noqa: E402

from conftest import OP_DTYPES, TOL, forced_path, rel_err  # noqa: E402

pytestmark = [pytest.mark.skipif(not tuning.INTERPRET and not torch.cuda.is_available(),
                                 reason="needs TRITON_INTERPRET=1 (set by conftest) or a GPU"),
              pytest.mark.usefixtures("poison_outputs")]
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


def make_inputs(M, layout, R, dtype, grads, bias=True, out_f=OUT_F, device="cpu"):
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
    t = {n: v.to(device) if v is not None else None for n, v in t.items()}
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
    mask = dropout_keep_mask(dropout_seed(t["x"].device), t["x"].shape, p) if p else None
    return y, dy, grads, mask


def check(t, p, rd, rg, y, dy, grads, mask):
    """float64 reference on the dequantized weight (bit-identical to bitsandbytes' decode,
    rounded to x's dtype as the kernels round their tiles)."""
    tol = TOL[t["x"].dtype]
    ref = {n: v.detach().double().requires_grad_(v.requires_grad)
           for n, v in t.items() if isinstance(v, torch.Tensor)}
    w = dequantize_nf4(t["weight"], t["x"].dtype).double()
    y_ref = reference_adapter_linear(ref["x"], w, ref.get("bias"), ref["down"],
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
def test_fused_decoders_bit_identical(shape, blocksize, double_quant, device):
    """The kernels' tile decoders (row and span) give bitsandbytes' values, rounded to each
    activation dtype, for tiles narrower and wider than a block."""
    from speclora_kernels.ops.launch import dequantize_nf4_triton

    w = NF4Weight.quantize(torch.randn(shape) * 3, blocksize, double_quant, backend="torch")
    on_device = w.to(device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for block_k in (32, 256):
            out = torch.full(shape, float("nan"), dtype=dtype, device=device)
            dequantize_nf4_triton(on_device, dtype, out=out, block_n=16, block_k=block_k)
            assert torch.equal(out.cpu(), dequantize_nf4(w, dtype)), (dtype, block_k)


@pytest.mark.parametrize("M", [1, 5, 64])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("method", list(PATTERNS))
def test_method_patterns(method, dtype, M, device):
    R, p, rd, rg, grads = PATTERNS[method]
    i = list(PATTERNS).index(method)
    layout = LAYOUTS[(i + M + (dtype == torch.float16)) % len(LAYOUTS)]
    torch.manual_seed(100 * i + M)
    t = make_inputs(M, layout, R, dtype, grads, bias=i % 2 == 0, device=device)
    y, dy, got, mask = run(t, p, rd, rg)
    check(t, p, rd, rg, y, dy, got, mask)
    if rg is not None and rg < R:  # frozen rows get exact zeros
        assert not got["down"][rg:].any()


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda c: "K{}-bs{}-{}".format(c[0], c[1], "dq" if c[2] else "nodq"))
def test_layouts_both_paths(layout, path, device):
    """Every layout (row decoder and span decoder, blocksize 64/128, double quant on and
    off) through the fused and the split kernels, forward and dx."""
    torch.manual_seed(layout[0])
    t = make_inputs(7, layout, 5, torch.float32, ("x", "down", "scale", "up"), device=device)
    with forced_path(path):
        check(t, 0.2, 3, None, *run(t, 0.2, 3, None))


@pytest.mark.parametrize("layout", [LAYOUTS[2], LAYOUTS[4]], ids=["rows", "span"])
def test_segmented_path(layout, device):
    """The large-M forward and dx kernels (segments of column tiles, t and g computed once
    per segment) on an NF4 base, forced at a small shape with 64-wide output tiles and 2
    segments: y 2 + 1 tiles, dx 2 + 2 (rows) or 2 + 1 (span); the decoders run inside the
    segment loops."""
    torch.manual_seed(layout[0] + 1)
    t = make_inputs(7, layout, 5, torch.float16, ("x", "down", "scale", "up"), out_f=150,
                    device=device)
    with forced_path("segmented", 2), tuning.record_launches() as launches:
        y, dy, grads, mask = run(t, 0.2, 3, None)
        for kernel, args in launches[:2]:
            assert args["SEGMENTED"] and args["NF4"]
            assert any(kernel.fits(c, args) for c in kernel.configs)  # not the fallback
            assert args["NF4_ROWS"] == (layout[0] % layout[1] == 0)
    check(t, 0.2, 3, None, y, dy, grads, mask)
    assert [kernel for kernel, _ in launches] == [tuning.FWD, tuning.DX, tuning.FACTOR]


def dense_weight_tensors(tensors, n_elements):
    return [tuple(v.shape) for v in tensors
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() >= n_elements]


def test_weight_never_materialised(device):
    """No launch gets a dense weight-sized float tensor, none is saved for backward, and the
    PyTorch fallback's dequantizer is never called."""
    layout = (256, 64, True)
    t = make_inputs(16, layout, 8, torch.float16, ("x", "down", "scale", "up"), device=device)
    n = OUT_F * layout[0]  # > every activation-sized tensor here (16 x 256)
    saved = []

    def pack(v):
        saved.append(v)
        return v

    calls = []
    real = NF4Weight.dequantize
    NF4Weight.dequantize = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        with tuning.record_launches() as launches, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            y, dy, grads, mask = run(t, 0.1, 8, None)
    finally:
        NF4Weight.dequantize = real
    check(t, 0.1, 8, None, y, dy, grads, mask)
    names = [kernel.name for kernel, _ in launches]
    assert "fwd_splitk_kernel" in names and "dx_kernel" in names  # decode: the split-K forward
    for kernel, args in launches:  # (its fp32 partials, part_ptr, are no weight)
        assert not dense_weight_tensors([v for k, v in args.items() if k != "part_ptr"], n), \
            kernel.name
        if kernel.name in ("fwd_splitk_kernel", "dx_kernel"):
            assert args["NF4"] and args["w_ptr"] is t["weight"].packed
    assert not dense_weight_tensors(saved, n) and calls == []
    assert any(v is t["weight"].packed for v in saved)  # a reference, not a copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_backend(dtype):
    """The CPU backend (float64 always runs the PyTorch path) matches the reference."""
    torch.manual_seed(3)
    t = make_inputs(6, (99, 128, True), 7, dtype, ("x", "down", "scale", "up"))
    with autograd.cpu_path():
        check(t, 0.25, 4, 5, *run(t, 0.25, 4, 5))


@pytest.mark.skipif(not tuning.INTERPRET, reason="compares interpreted kernels on CPU tensors")
def test_kernels_and_cpu_backend_agree():
    torch.manual_seed(4)
    t = make_inputs(5, (128, 64, True), 6, torch.float32, ("x", "down", "up"))
    y_kernel, _, g_kernel, _ = run(t, 0.3, 6, None)
    with autograd.cpu_path():
        y_torch, _, g_torch, _ = run(t, 0.3, 6, None)
    assert rel_err(y_kernel, y_torch) < 1e-5
    for name in g_kernel:
        assert rel_err(g_kernel[name], g_torch[name]) < 1e-5, name


def test_layer_from_linear4bit_through_kernels():
    """End to end: AdapterLinear built from bitsandbytes' Linear4bit runs the NF4 kernels and
    equals the Linear4bit at init (fp32), and trains."""
    bnb = pytest.importorskip("bitsandbytes")  # optional: absent from the oldest-versions job

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


@pytest.mark.slow
def test_nf4_report_command(tmp_path):
    """``python -m speclora_kernels.tools.nf4_report`` (small shape): the decode forward on
    NF4 touches no more unique bytes than its floor, and bitsandbytes + PEFT keeps more for
    backward than the fused layer (the 4096 x 4096 numbers are in the README)."""
    import json
    import subprocess

    out = tmp_path / "nf4.json"
    import sys

    from _interpreter_compat import child_env

    proc = subprocess.run([sys.executable, "-m", "speclora_kernels.tools.nf4_report", "--shape",
                           "96x256", "--rank", "8", "--tokens", "32", "--json", str(out)],
                          env=child_env(), capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    count, rows = report["decode_bytes"], report["saved_for_backward"]["rows"]
    assert count["nf4"]["launches"] == 1 and 0.9 < count["nf4_vs_floor"] <= 1.05
    assert count["nf4_vs_bf16"] < 0.5
    peft, ours = rows["bnb Linear4bit + PEFT LoRA"], rows["AdapterLinear lora (NF4)"]
    assert ours["x_saved"] and ours["activation_bytes"] < peft["activation_bytes"]
    assert "fused NF4 forward, unique bytes" in proc.stdout


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[2]], ids=["bs64-dq", "bs128"])
def test_splitk_decode_on_nf4(layout, device):
    """The split-K decode launch decoding NF4 tiles in its K slices (row decoder)."""
    from speclora_kernels.ops import plan

    torch.manual_seed(layout[0] + 5)
    t = make_inputs(3, layout, 7, torch.float16, ("x", "down", "scale", "up"), device=device)
    with plan.forced_plan("splitk", splits=2, block_n=32), tuning.record_launches() as launches:
        y, dy, grads, mask = run(t, 0.2, 4, None)
    assert launches[0][0] is tuning.SPLITK and launches[0][1]["NF4"]
    check(t, 0.2, 4, None, y, dy, grads, mask)


@pytest.mark.parametrize("M", [65, 130])
def test_large_m_decodes_once_into_a_transient_copy(M, device):
    """Above 64 rows the forward and dx kernels get a dense copy of W decoded once per call
    (one dequantize launch each), freed before the call returns and never saved for
    backward; the result matches the reference on the decoded weight."""
    import weakref

    layout = (128, 64, True)
    torch.manual_seed(M)
    t = make_inputs(M, layout, 6, torch.float16, ("x", "down", "scale", "up"), device=device)
    saved, copies = [], []

    def pack(v):
        saved.append(v)
        return v

    with tuning.record_launches() as launches, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        y, dy, grads, mask = run(t, 0.1, 4, None)
        for kernel, args in launches:
            if kernel is tuning.DEQUANT:
                copies.append(weakref.ref(args["out_ptr"]))
    names = [kernel.name for kernel, _ in launches]
    assert names.count("dequant_kernel") == 2, names  # forward, dx: once each
    dense = [args for kernel, args in launches if kernel.name in ("fwd_kernel", "dx_kernel")]
    assert dense and all(not args["NF4"] for args in dense)
    del launches, dense
    assert all(ref() is None for ref in copies)  # transient: nothing holds the copies
    assert not any(v.shape == (OUT_F, layout[0]) and v.is_floating_point() for v in saved)
    check(t, 0.1, 4, None, y, dy, grads, mask)
