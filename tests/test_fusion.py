"""fuse_adapters and the PEFT tuners' add_weighted_adapter: several adapters of one base in
one model, by the rules of speclora_kernels.methods.combine, exact where they say so, and
every refusal."""
import json
import math

import pytest
import torch
from _tiny_models import TwoLayers

from speclora_kernels import AdapterFileError, fuse_adapters, inject, load_adapter, merge_and_unload, ops, save_adapter
from speclora_kernels.integrations.inject import adapter_layers

NAMES = ("q", "v")


def base(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return TwoLayers().to(dtype)


@torch.no_grad()
def trained(method, seed, targets=NAMES, base_seed=0, dtype=torch.float64, **options):
    """An adapter moved away from its init, reproducibly (a stand-in for training)."""
    model = base(base_seed, dtype)
    inject(model, method, list(targets), **options)
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return model


def saved(tmp_path, name, model):
    save_adapter(model, tmp_path / name)
    return tmp_path / name


def deltas(model):
    return {n: layer.merged_weight() - getattr(base(), n).weight.detach()
            for n, layer in adapter_layers(model).items()}


def expected_model(models, weights):
    """The base with W0 + sum_i w_i delta_i in each adapted layer."""
    want = base()
    with torch.no_grad():
        for model, w in zip(models, weights):
            for n, d in deltas(model).items():
                getattr(want, n).weight.add_(w * d)
    return want


CASES = {
    "spectral_additive": ("spectral_additive", dict(r=3, offset=0), dict(r=4, offset=3)),
    "spectral_rotational": ("spectral_rotational", dict(r=3, offset=0), dict(r=2, offset=3)),
    "spectral_three": ("spectral_additive", dict(r=2, offset=2), dict(r=2, offset=0)),
    "lora": ("lora", dict(r=3, alpha=5), dict(r=5, alpha=2)),
    "speclora": ("speclora", dict(r=3, k=4, alpha=6), dict(r=2, k=4)),
    "pica": ("pica", dict(r=3), dict(r=3)),
}
WEIGHTS = {"lora": [0.7, -0.3], "speclora": [1.5, 0.5], "pica": [0.25, 2.0]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_forward_is_base_plus_the_deltas(case, tmp_path, torch_cpu_path):
    method, opts_a, opts_b = CASES[case]
    models = [trained(method, 1, **opts_a), trained(method, 2, **opts_b)]
    weights = WEIGHTS.get(case, [1.0, 1.0])
    dirs = [saved(tmp_path, f"a{i}", m) for i, m in enumerate(models)]
    fused = fuse_adapters(base(), dirs, weights)
    x = torch.randn(6, 13, dtype=torch.float64)
    want = expected_model(models, weights)
    torch.testing.assert_close(fused(x), want(x), rtol=1e-12, atol=1e-12)
    r_sum = opts_a["r"] + opts_b["r"]
    rank = {"speclora": r_sum + 4, "pica": 3}.get(method, r_sum)
    assert [(getattr(fused, n).adapter.name, getattr(fused, n).rank) for n in NAMES] == \
        [(method, rank)] * 2
    # training the fused adapter: every parameter gets a gradient
    fused(x).sum().backward()
    assert all(p.grad is not None for p in fused.parameters() if p.requires_grad)


def test_spectral_fusion_keeps_each_adapters_factors(tmp_path, torch_cpu_path):
    a = trained("spectral_additive", 1, r=3, offset=0)
    b = trained("spectral_additive", 2, r=4, offset=3)
    fused = fuse_adapters(base(), [saved(tmp_path, "b", b), saved(tmp_path, "a", a)])
    f = fused.q.adapter
    assert (f.r, f.offset) == (7, 0)
    assert torch.equal(f.A[:3], a.q.adapter.A) and torch.equal(f.A[3:], b.q.adapter.A)
    assert torch.equal(f.P[:, 3:], b.q.adapter.P) and torch.equal(f.sigma[:3], a.q.adapter.sigma)
    # the base is W0 minus both slices
    w0 = base().q.weight
    torch.testing.assert_close(fused.q.weight + f.frozen_term(), w0, rtol=0, atol=1e-13)


@pytest.mark.parametrize("case", ["spectral_additive", "spectral_rotational", "lora"])
def test_fused_forward_in_the_triton_interpreter(case, tmp_path, poison_outputs):
    """fp32, the kernels themselves (no cpu_path): the fused model against float64."""
    method, opts_a, opts_b = CASES[case]
    dirs = [saved(tmp_path, f"a{i}", trained(method, i + 1, targets=["q"],
                                             dtype=torch.float32, **o))
            for i, o in enumerate((opts_a, opts_b))]
    fused = fuse_adapters(base(dtype=torch.float32), dirs)
    x = torch.randn(5, 13)
    layer = fused.q
    ref = x.double() @ layer.merged_weight().double().T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_one_op_call_per_layer(tmp_path, torch_cpu_path, monkeypatch):
    dirs = [saved(tmp_path, "a", trained("spectral_additive", 1, r=3)),
            saved(tmp_path, "b", trained("spectral_additive", 2, r=2, offset=3))]
    fused = fuse_adapters(base(), dirs)
    calls = []
    real = ops.fused_adapter_linear

    def counting(x, weight, bias, down, *args, **kwargs):
        calls.append(down.shape[0])
        return real(x, weight, bias, down, *args, **kwargs)

    monkeypatch.setattr(ops, "fused_adapter_linear", counting)
    fused(torch.randn(4, 13, dtype=torch.float64))
    assert calls == [5, 5]  # one call per layer, both slices' rows in it


def test_merge_is_exact(tmp_path, torch_cpu_path):
    models = [trained("spectral_rotational", 1, r=3), trained("spectral_rotational", 2, r=3,
                                                               offset=3)]
    fused = fuse_adapters(base(), [saved(tmp_path, f"a{i}", m) for i, m in enumerate(models)])
    want = expected_model(models, [1, 1])
    x = torch.randn(4, 13, dtype=torch.float64)
    unmerged = fused(x)
    for n in NAMES:
        getattr(fused, n).merge()
        torch.testing.assert_close(getattr(fused, n).weight, getattr(want, n).weight,
                                   rtol=0, atol=1e-13)
    torch.testing.assert_close(fused(x), unmerged, rtol=0, atol=1e-12)
    for n in NAMES:
        getattr(fused, n).unmerge()
    plain = merge_and_unload(fused)
    torch.testing.assert_close(plain(x), want(x), rtol=0, atol=1e-12)


def test_fused_model_saves_as_an_ordinary_adapter(tmp_path, torch_cpu_path):
    dirs = [saved(tmp_path, "a", trained("spectral_additive", 1, r=3)),
            saved(tmp_path, "b", trained("spectral_additive", 2, r=2, offset=3))]
    fused = fuse_adapters(base(), dirs)
    save_adapter(fused, tmp_path / "fused")
    config = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    assert (config["r"], config["offset"]) == (5, 0)
    again = load_adapter(base(), tmp_path / "fused")
    x = torch.randn(3, 13, dtype=torch.float64)
    assert torch.equal(again(x), fused(x))


def test_linear_is_peft_linear_and_only_approximate(tmp_path, torch_cpu_path):
    models = [trained("lora", 1, r=3, alpha=6), trained("lora", 2, r=3, alpha=3)]
    weights = [0.6, 0.9]
    dirs = [saved(tmp_path, f"a{i}", m) for i, m in enumerate(models)]
    fused = fuse_adapters(base(), dirs, weights, combination="linear")
    roots = [math.sqrt(w * m.q.adapter.alpha / m.q.adapter.r) for m, w in zip(models, weights)]
    a = sum(c * m.q.adapter.A for m, c in zip(models, roots))
    b = sum(c * m.q.adapter.B for m, c in zip(models, roots))
    assert fused.q.adapter.r == 3
    torch.testing.assert_close(fused.q.merged_weight(), base().q.weight + b @ a, rtol=0,
                               atol=1e-13)
    exact = expected_model(models, weights).q.weight
    assert (fused.q.merged_weight() - exact).abs().max() > 1e-3  # cross terms: approximate


# ---------------------------------------------------------------- refusals
def _pair(tmp_path, a, b):
    return [saved(tmp_path, "a", a), saved(tmp_path, "b", b)]


def test_refuses_another_base(tmp_path, torch_cpu_path):
    dirs = _pair(tmp_path, trained("lora", 1, r=2), trained("lora", 2, r=2, base_seed=5))
    with pytest.raises(AdapterFileError, match=r"b: q: the adapter belongs to a different "
                                               r"pre-trained weight"):
        fuse_adapters(base(), dirs)
    with pytest.raises(AdapterFileError, match=r"a: q: the adapter belongs to a different"):
        fuse_adapters(base(5), dirs)


@pytest.mark.parametrize("a,b,match", [
    (("spectral_additive", {}), ("lora", {}), "no rule combines methods"),
    (("lora", {}), ("speclora", {"k": 2}), "no rule combines methods"),
    (("spectral_additive", {}), ("spectral_rotational", {"offset": 2}),
     "do not fuse into one adapter"),
    (("spectral_additive", {"offset": 0}), ("spectral_additive", {"offset": 1}),
     r"overlap: singular indices \[0, 2\) and \[1, 3\)"),
    (("spectral_rotational", {"offset": 0}), ("spectral_rotational", {"offset": 3}),
     r"gap: \[0, 2\) then \[3, 5\)"),
    (("speclora", {"k": 2}), ("speclora", {"k": 3}), "frozen P differ"),
    (("pica", {}), ("pica", {"r": 3}), "frozen Q differ"),
    (("lora", {"dropout": 0.1}), ("lora", {}), "differ in dropout"),
])
def test_refuses_what_no_rule_combines(tmp_path, torch_cpu_path, a, b, match):
    (ma, oa), (mb, ob) = a, b
    dirs = _pair(tmp_path, trained(ma, 1, **{"r": 2, **oa}), trained(mb, 2, **{"r": 2, **ob}))
    with pytest.raises(ValueError, match=match):
        fuse_adapters(base(), dirs)


def test_refuses_mismatched_layers(tmp_path, torch_cpu_path):
    dirs = _pair(tmp_path, trained("lora", 1, r=2), trained("lora", 2, targets=["q"], r=2))
    with pytest.raises(ValueError, match=r"adapt different layers \(only in the first: \['v'\]"):
        fuse_adapters(base(), dirs)


@pytest.mark.parametrize("weights,error,match", [
    ([1.0], ValueError, "weights must be 2 finite numbers"),
    ([1.0, float("nan")], ValueError, "weights must be 2 finite numbers"),
    ([True, 1.0], ValueError, "weights must be 2 finite numbers"),
    ("11", TypeError, "weights must be None or a list"),
])
def test_refuses_bad_weights(tmp_path, torch_cpu_path, weights, error, match):
    dirs = _pair(tmp_path, trained("lora", 1, r=2), trained("lora", 2, r=2))
    with pytest.raises(error, match=match):
        fuse_adapters(base(), dirs, weights)


def test_refuses_what_a_rule_does_not_take(tmp_path, torch_cpu_path):
    spectral = _pair(tmp_path, trained("spectral_additive", 1, r=2),
                     trained("spectral_additive", 2, r=2, offset=2))
    with pytest.raises(ValueError, match="spectral slices fuse with weights 1 only"):
        fuse_adapters(base(), spectral, [1.0, 0.5])
    with pytest.raises(ValueError, match="by concatenation only"):
        fuse_adapters(base(), spectral, combination="linear")
    with pytest.raises(ValueError, match="combination must be one of"):
        fuse_adapters(base(), spectral, combination="svd")
    ranks = [saved(tmp_path, "c", trained("lora", 1, r=2)),
             saved(tmp_path, "d", trained("lora", 2, r=3))]
    with pytest.raises(ValueError, match="needs adapters of one rank, got ranks \\[2, 3\\]"):
        fuse_adapters(base(), ranks, combination="linear")
    same = [saved(tmp_path, "e", trained("lora", 1, r=2)), ranks[0]]
    with pytest.raises(ValueError, match="weights must be >= 0"):
        fuse_adapters(base(), same, [1.0, -1.0], combination="linear")


def test_refuses_bad_inputs(tmp_path, torch_cpu_path):
    one = saved(tmp_path, "a", trained("lora", 1, r=2))
    with pytest.raises(ValueError, match="at least 2 adapter directories"):
        fuse_adapters(base(), [one])
    with pytest.raises(ValueError, match="at least 2 adapter directories"):
        fuse_adapters(base(), str(one))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        fuse_adapters(base(), [one, tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFileError, match="not written by save_adapter"):
        fuse_adapters(base(), [one, tmp_path / "empty"])
    adapted = base()
    inject(adapted, "lora", ["q"], r=2)
    with pytest.raises(ValueError, match="already has adapter layers"):
        fuse_adapters(adapted, [one, one])


# ---------------------------------------------------------------- PEFT's add_weighted_adapter
def _peft_pair(config_a, config_b):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(base(), config_a)
    model.add_adapter("b", config_b)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "_adapter." in n:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return model


def test_peft_add_weighted_adapter(tmp_path, torch_cpu_path):
    peft = pytest.importorskip("peft")
    from speclora_kernels.peft import SpecLoraConfig, SpectralAdapterConfig

    x = torch.randn(4, 13, dtype=torch.float64)
    for config_a, config_b, weights in [
            (SpectralAdapterConfig(r=3, target_modules=list(NAMES)),
             SpectralAdapterConfig(r=2, offset=3, target_modules=list(NAMES)), [1, 1]),
            (SpecLoraConfig(r=3, k=4, target_modules=list(NAMES)),
             SpecLoraConfig(r=2, k=4, lora_alpha=5, target_modules=list(NAMES)), [0.5, 2])]:
        model = _peft_pair(config_a, config_b)
        model.add_weighted_adapter(["default", "b"], weights, "ab")
        for n in NAMES:
            layer = getattr(model.base_model.model, n)
            want = sum(w * layer.get_delta_weight(a) for a, w in zip(["default", "b"], weights))
            torch.testing.assert_close(layer.get_delta_weight("ab"), want, rtol=0, atol=1e-13)
        model.set_adapter("ab")
        y = model(x)
        model.save_pretrained(tmp_path / "p", selected_adapters=["ab"])
        again = peft.PeftModel.from_pretrained(base(), tmp_path / "p" / "ab")
        assert torch.equal(again(x), y)


def test_peft_add_weighted_adapter_refusals(torch_cpu_path):
    pytest.importorskip("peft")
    from speclora_kernels.peft import SpectralAdapterConfig

    model = _peft_pair(SpectralAdapterConfig(r=3, target_modules=list(NAMES)),
                       SpectralAdapterConfig(r=2, offset=2, target_modules=list(NAMES)))
    with pytest.raises(ValueError, match=r"q \(adapters \['default', 'b'\]\): the slices "
                                         r"overlap"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "ab")
    with pytest.raises(ValueError, match="exists already"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "b")
    with pytest.raises(ValueError, match=r"adapters \['c'\] do not exist"):
        model.add_weighted_adapter(["default", "c"], [1, 1], "ab")
    with pytest.raises(ValueError, match="supports combination_type in"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "ab", combination_type="svd")
    with pytest.raises(ValueError, match=r"no \['svd_rank'\] arguments"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "ab", svd_rank=4)
    model.add_adapter("third", SpectralAdapterConfig(r=2, offset=3, target_modules=["q"]))
    with pytest.raises(ValueError, match=r"v: adapted by \['default'\] but not by \['third'\]"):
        model.add_weighted_adapter(["default", "third"], [1, 1], "ac")
    assert "ab" not in model.peft_config and "ac" not in model.peft_config


@pytest.mark.slow
def test_evidence_script_runs(tmp_path, torch_cpu_path):
    """benchmarks/fusion_evidence.py end to end, a few steps: every row, finite losses."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import fusion_evidence

    losses = fusion_evidence.run(steps=2, rank=2, lr=1e-3, workdir=str(tmp_path), log=lambda s: None)
    text = fusion_evidence.table(losses)
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses.values())
    assert text.count("\n") == 2 + len(fusion_evidence.ROWS) - 1
