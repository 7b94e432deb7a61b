"""Mixed-adapter batches: each row of x through its own adapter, one fused launch per layer.

The op (``scale_index``: a per-row index into a table of per-rank scales) against the
float64 reference on every forward path, dense and NF4, fp32 and fp16, outputs poisoned with
NaN; its gradients; its argument checks. Then PEFT's ``adapter_names=`` (forward and
``generate``) on PEFT's LoRA under ``patch_peft`` and on our methods, covering the cases of
PEFT's own ``TestMixedAdapterBatches`` (our own tests, PEFT's file is not shipped): rows
alternating between ``"__base__"`` and two adapters, adapters on different or partly
overlapping layers, disabled adapters, merged adapters, wrong lengths, unknown names and
training mode refused; the launches per layer counted.
"""
import peft
import pytest
import torch
from _tiny_models import tiny_llama, token_ids
from torch import nn

import speclora_kernels
from speclora_kernels.ops import autograd, fused_adapter_linear, reference_adapter_linear, tuning
from speclora_kernels.peft import PiCaConfig, SpecLoraConfig, SpectralAdapterConfig, patch
from speclora_kernels.quant import NF4Weight

from conftest import OP_DTYPES, TOL, forced_path, kernel_launches, rel_err

needs_kernels = pytest.mark.skipif(not tuning.INTERPRET and not torch.cuda.is_available(),
                                   reason="needs TRITON_INTERPRET=1 (set by conftest) or a GPU")
PATHS = ["splitk", "fused", "split", "segmented", "auto"]
ROWS = {"splitk": 7, "fused": 37, "split": 37, "segmented": 37, "auto": 7}  # split-K: M <= 16


def mixed_inputs(M, K, N, R, tables, dtype, device, nf4=False, grads=False):
    """Random op inputs and a table with zero rows (row 0: the base alone) and zero spans
    (a rank outside a row's adapter)."""
    w = torch.randn(N, K) / K ** 0.5
    weight = (NF4Weight.quantize(w, 64, True, backend="torch", dtype=dtype) if nf4
              else w.to(dtype))
    table = torch.rand(tables, R) + 0.5
    table[0] = 0
    table[1, R // 2:] = 0
    t = dict(x=torch.randn(M, K, dtype=dtype), weight=weight, bias=torch.randn(N).to(dtype),
             down=(torch.randn(R, K) / K ** 0.5).to(dtype), scale=table,
             up=torch.randn(N, R).to(dtype))
    t = {k: v.to(device) for k, v in t.items()}
    index = torch.randint(0, tables, (M,), dtype=torch.int32, device=device)
    if grads:
        for k in ("x", "bias", "down", "scale", "up"):
            t[k].requires_grad_()
    return t, index


def reference(t, index, **kw):
    w = t["weight"]
    w = w.dequantize(t["x"].dtype) if isinstance(w, NF4Weight) else w
    return reference_adapter_linear(
        t["x"].double(), w.double(), t["bias"].double(), t["down"].double(),
        t["scale"].double(), t["up"].double(), scale_index=index, **kw)


# ---------------------------------------------------------------- the op
@needs_kernels
@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("dtype", OP_DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_op_matches_float64_on_every_path(path, dtype, nf4, device):
    M = ROWS[path]
    t, index = mixed_inputs(M, 64 if nf4 else 45, 70, 12, 4, dtype, device, nf4)
    with forced_path(None if path == "auto" else path), kernel_launches() as names:
        y = fused_adapter_linear(**t, scale_index=index, training=False)
    assert rel_err(y, reference(t, index)) < TOL[dtype]
    # one forward launch for every row; split: t projected once first; NF4 above the
    # register rows: the base decoded once first (as without scale_index)
    forward = [n for n in names if n not in ("proj_kernel", "dequant_kernel")]
    # decode takes split-K, but fp32 on NF4 the fused kernel (that split-K tile spills with
    # the row scales)
    decode = "fwd_kernel" if nf4 and dtype == torch.float32 else "fwd_splitk_kernel"
    assert forward == [{"splitk": decode, "auto": decode}.get(path, "fwd_kernel")]
    assert names.count("proj_kernel") == (path == "split")


@needs_kernels
@pytest.mark.usefixtures("poison_outputs")
def test_op_takes_leading_dims_and_int64(device):
    t, _ = mixed_inputs(15, 33, 20, 6, 3, torch.float32, device)
    x = t.pop("x").reshape(3, 5, 33)
    index = torch.tensor([0, 1, 2], device=device)[:, None].expand(3, 5)  # per sample, int64
    y = fused_adapter_linear(x, **t, scale_index=index, training=False)
    want = reference_adapter_linear(x.double(), t["weight"].double(), t["bias"].double(),
                                    t["down"].double(), t["scale"].double(), t["up"].double(),
                                    scale_index=index)
    assert y.shape == (3, 5, 20) and rel_err(y, want) < TOL[torch.float32]
    # row i of a mixed call equals the plain op with scale row index[i]
    plain = fused_adapter_linear(x[1], **{**t, "scale": t["scale"][1]}, training=False)
    torch.testing.assert_close(y[1], plain, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("cpu_path", [False, True], ids=["kernels", "cpu-path"])
def test_op_gradients_match_float64(cpu_path, device):
    t, index = mixed_inputs(9, 24, 18, 8, 3, torch.float32, device, grads=True)
    dy = torch.randn(9, 18, device=device)
    with autograd.cpu_path() if cpu_path else torch.enable_grad():
        y = fused_adapter_linear(**t, grad_rows=5, scale_index=index, training=False)
    got = torch.autograd.grad(y, [t[k] for k in ("x", "bias", "down", "scale", "up")], dy)
    leaves = {k: v.detach().double().requires_grad_() for k, v in t.items() if k != "weight"}
    want_y = reference_adapter_linear(**leaves, weight=t["weight"].double(), grad_rows=5,
                                      scale_index=index)
    want = torch.autograd.grad(want_y, [leaves[k] for k in ("x", "bias", "down", "scale", "up")],
                               dy.double())
    assert rel_err(y, want_y) < TOL[torch.float32]
    for name, g, w in zip(("x", "bias", "down", "scale", "up"), got, want):
        assert rel_err(g, w) < TOL[torch.float32], name
    assert not got[2][5:].any() and not got[4][:, 5:].any()  # frozen rows: no gradient


def test_op_checks_its_mixed_arguments():
    t, index = mixed_inputs(6, 8, 5, 4, 3, torch.float32, "cpu")
    cases = [(dict(scale_index=index.float()), TypeError, "scale_index must be int32 or int64"),
             (dict(scale_index=index.to(torch.int16)), TypeError, "int32 or int64"),
             (dict(scale_index=index[:5]), ValueError, r"one table row per row of x: shape \(6,\)"),
             (dict(scale_index=index.reshape(2, 3)), ValueError, "one table row per row"),
             (dict(scale_index=torch.tensor([0, 1, 2, 3, 0, 1])), ValueError,
              r"values must be in \[0, 3\) \(rows of scale\), got values in \[0, 3\]"),
             (dict(scale_index=torch.tensor([0, -1, 2, 0, 0, 1])), ValueError, r"in \[-1, 2\]"),
             (dict(scale_index=index, scale=t["scale"][0]), ValueError,
              r"scale must be a \(tables x R=4\) table"),
             (dict(scale_index=index, scale=t["scale"][:, :3]), ValueError, "R=4"),
             (dict(scale_index=[0] * 6), TypeError, "scale_index must be a torch.Tensor"),
             (dict(scale_index=index, dropout_p=0.1), ValueError,
              r"scale_index \(a mixed-adapter batch\) is for inference")]
    for kw, error, message in cases:
        with pytest.raises(error, match=message):
            fused_adapter_linear(**{**t, **kw})
        if "dropout_p" not in kw:  # the reference checks the same way (dropout is its own)
            with pytest.raises(error, match=message):
                reference_adapter_linear(**{**t, **kw})
    # a checked index is not read again until it changes
    fused_adapter_linear(**t, scale_index=index, training=False)
    index[0] = 7
    with pytest.raises(ValueError, match=r"got values in \[0, 7\]"):
        fused_adapter_linear(**t, scale_index=index, training=False)


# ---------------------------------------------------------------- PEFT
class MLP(nn.Module):
    """PEFT's test MLP (integer inputs cast to float, two linear layers), with 8 outputs so
    that our spectral methods' ranks fit both layers."""

    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 8)

    def forward(self, X):
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(X.float()))), dim=-1)


@torch.no_grad()
def perturb_adapters(model, scale=0.3):
    """Move every adapter's tensors from their init (an added adapter is not trainable, so
    ``perturb`` would leave it equal to the base)."""
    gen = torch.Generator().manual_seed(3)
    for name, p in sorted(model.named_parameters()):
        if ".adapter0" in name or ".adapter1" in name:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def two_adapters(config0, config1):
    torch.manual_seed(0)
    model = peft.get_peft_model(MLP().eval(), config0, "adapter0")
    model.add_adapter("adapter1", config1)
    perturb_adapters(model)
    return model.eval()


def check_mixed(model, inputs):
    """Rows 0, 3, 6 through the base, 1, 4, 7 adapter0, 2, 5, 8 adapter1: each equal to the
    whole batch through that adapter alone (PEFT's own check, at fp32 tolerance)."""
    with model.disable_adapter():
        base = model(**inputs)
    singles = []
    for name in ("adapter0", "adapter1"):
        model.set_adapter(name)
        singles.append(model(**inputs))
        assert not torch.allclose(singles[-1], base)
    names = [["__base__", "adapter0", "adapter1"][i % 3] for i in range(len(inputs["X"]))]
    mixed = model(**inputs, adapter_names=names)
    # fp32 at the outputs' scale: the mixed path (PyTorch on CPU) and the plain one (C++)
    # round differently, and log-softmax outputs near 0 are differences of values near 50
    for want, got in ((base[::3], mixed[::3]), (singles[0][1::3], mixed[1::3]),
                      (singles[1][2::3], mixed[2::3])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def lora(targets, r=8):
    return peft.LoraConfig(target_modules=targets, r=r, init_lora_weights=False)


OURS = {
    "speclora": lambda targets, r=4: SpecLoraConfig(r=r, k=4, lora_alpha=6,
                                                    target_modules=targets),
    "spectral_additive": lambda targets, r=4: SpectralAdapterConfig(r=r, target_modules=targets),
    "spectral_rotational": lambda targets, r=4: SpectralAdapterConfig(
        r=r, variant="rotational", target_modules=targets),
    "pica": lambda targets, r=4: PiCaConfig(r=r, target_modules=targets),
}
CONFIGS = {"lora": lora, **OURS}
LAYOUTS = {"same": (["lin0"], ["lin0"]), "different": (["lin0"], ["lin1"]),
           "overlapping": (["lin0"], ["lin0", "lin1"])}


@pytest.fixture
def patched(monkeypatch):
    """PEFT's LoRA patched; the mixed fused calls made, counted."""
    from speclora_kernels.peft import _fused

    calls = []
    real = _fused.mixed_forward
    monkeypatch.setattr(patch, "mixed_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    speclora_kernels.patch_peft()
    yield calls
    speclora_kernels.unpatch_peft()


@pytest.fixture
def mixed_calls(monkeypatch):
    """The mixed fused calls our method layers make."""
    from speclora_kernels.peft import _fused, layer

    calls = []
    real = _fused.mixed_forward
    monkeypatch.setattr(layer, "mixed_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.usefixtures("torch_cpu_path", "single_thread")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", CONFIGS)
def test_rows_take_their_adapter(method, layout, patched, mixed_calls):
    first, second = LAYOUTS[layout]
    make = CONFIGS[method]
    model = two_adapters(make(first), make(second, r=6 if method != "lora" else 16))
    check_mixed(model, {"X": torch.arange(90).view(-1, 10)})
    calls = patched if method == "lora" else mixed_calls
    assert len(calls) == {"same": 1, "different": 2, "overlapping": 2}[layout]


@pytest.mark.usefixtures("torch_cpu_path", "single_thread")
@pytest.mark.parametrize("method", CONFIGS)
def test_disabled_merged_lengths_names_training(method, patched):
    model = two_adapters(CONFIGS[method](["lin0"]), CONFIGS[method](["lin0"]))
    x = torch.arange(90).view(-1, 10)
    names = [["__base__", "adapter0", "adapter1"][i % 3] for i in range(9)]
    with model.disable_adapter():  # disabled adapters win over adapter_names
        torch.testing.assert_close(model(X=x, adapter_names=names), model(X=x))
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the "
                                         "number of inputs, but got 5 and 9 respectively"):
        model(X=x, adapter_names=["__base__"] * 5)
    with pytest.raises(ValueError, match=r"non-existing adapter\(s\): does-not-exist, nope"):
        model(X=x, adapter_names=["does-not-exist"] * 5 + ["nope"] * 4)
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in "
                                         "training mode"):
        model(X=x, adapter_names=names)
    model.eval()
    model.merge_adapter(["adapter0"])
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged "
                                         "adapters, please call `unmerge_adapter` first"):
        model(X=x, adapter_names=names)
    model.unmerge_adapter()
    model(X=x, adapter_names=names)


@needs_kernels
@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize("method", CONFIGS)
def test_one_launch_per_layer_and_shared_spectral_rows(method, patched):
    """In the kernels: every adapted layer runs one forward launch for the whole mixed
    batch; SpecLoRA's and the spectral adapters' frozen rows (Q.T, P of the same base) are
    stacked once for both adapters."""
    model = two_adapters(CONFIGS[method](["lin0", "lin1"], r=2),
                         CONFIGS[method](["lin0", "lin1"], r=2))
    x = torch.arange(60).view(-1, 10)
    names = ["adapter1", "__base__", "adapter0", "adapter0", "adapter1", "__base__"]
    with torch.no_grad(), tuning.record_launches() as launches:
        got = model(X=x, adapter_names=names)
    assert [k.name for k, _ in launches] == ["fwd_splitk_kernel"] * 2  # 6 rows: decode
    assert all(a["ROW_SCALE"] for _, a in launches)
    # frozen rows, once for both adapters: SpecLoRA's k = 4, the spectral adapters' r = 2
    frozen = {"speclora": 4, "spectral_additive": 2, "spectral_rotational": 2}.get(method, 0)
    assert [a["R"] for _, a in launches] == [2 + 2 + frozen] * 2
    with autograd.cpu_path(), torch.no_grad():
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    want = model(X=x[i:i + 1])
            else:
                model.set_adapter(name)
                want = model(X=x[i:i + 1])
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("torch_cpu_path", "single_thread")
@pytest.mark.parametrize("method", ["lora", "speclora", "pica"])
def test_generate_with_adapter_names(method, patched, mixed_calls):
    make = {"lora": lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False),
            **{m: lambda m=m: OURS[m](["q_proj", "v_proj"]) for m in OURS}}[method]
    model = peft.get_peft_model(tiny_llama(), make(), "adapter0")
    model.add_adapter("adapter1", make())
    perturb_adapters(model)
    model.eval()
    ids = token_ids(batch=3, length=5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    names = ["adapter1", "__base__", "adapter0"]
    got = model.generate(input_ids=ids, adapter_names=names, **kw)
    assert (patched if method == "lora" else mixed_calls)  # the fused mixed path ran
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                want = model.generate(input_ids=ids[i:i + 1], **kw)
        else:
            model.set_adapter(name)
            want = model.generate(input_ids=ids[i:i + 1], **kw)
        assert torch.equal(got[i:i + 1], want), (i, name)
    assert not torch.equal(got[0], got[2])  # the adapters differ


def test_stack_shares_equal_frozen_rows_only():
    from speclora_kernels.peft._fused import Block, stack

    q, p = torch.randn(3, 8), torch.randn(6, 3)
    a = Block(torch.cat([torch.randn(2, 8), q]), torch.rand(5), torch.cat([torch.randn(6, 2), p], 1),
              0.0, 2, 2)
    b = Block(torch.cat([torch.randn(4, 8), q]), torch.rand(7), torch.cat([torch.randn(6, 4), p], 1),
              0.0, 4, 4)
    for shared, width in ((lambda x, y: True, 2 + 4 + 3), (None, 2 + 4 + 3 + 3)):
        down, up, table, grad_rows = stack({"a": a, "b": b}, shared)
        assert down.shape == (width, 8) and up.shape == (6, width) and grad_rows == 6
        assert not table[0].any()
        x = torch.randn(5, 8)
        for row, blk in ((1, a), (2, b)):  # each table row reproduces its block exactly
            want = ((x @ blk.down.T) * blk.scale) @ blk.up.T
            torch.testing.assert_close(((x @ down.T) * table[row]) @ up.T, want)


@pytest.mark.usefixtures("torch_cpu_path", "single_thread")
@pytest.mark.parametrize("method", ["lora", "speclora"])
def test_nf4_bases(method, patched, mixed_calls):
    """bitsandbytes 4-bit bases: the mixed rows equal PEFT's own per-adapter results."""
    from speclora_kernels.integrations.bnb import quantize_nf4

    base = quantize_nf4(tiny_llama())
    base.is_loaded_in_4bit = True  # what transformers sets; PEFT picks its bnb layer then
    make = (lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"],
                                    init_lora_weights=False)) if method == "lora" else \
        (lambda: OURS["speclora"](["q_proj", "up_proj"]))
    model = peft.get_peft_model(base, make(), "adapter0")
    model.add_adapter("adapter1", make())
    perturb_adapters(model)
    model.eval()
    ids = token_ids(batch=3, length=5)
    names = ["adapter0", "__base__", "adapter1"]
    with torch.no_grad():
        got = model(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    want = model(input_ids=ids[i:i + 1]).logits
            else:
                model.set_adapter(name)
                want = model(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)
    assert (patched if method == "lora" else mixed_calls)
