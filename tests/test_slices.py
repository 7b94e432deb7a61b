"""Spectral slices: the ``offset`` option of spectral_additive / spectral_rotational (triplets
offset..offset+r-1 of W0), exact at init, saved and checked by adapter files and PEFT configs."""
import json
import os

import pytest
import torch
from _tiny_models import TwoLayers
from torch import nn

from speclora_kernels import (
    AdapterFileError,
    AdapterLinear,
    inject,
    load_adapter,
    load_layer_adapter,
    save_adapter,
    save_layer_adapter,
)
from speclora_kernels.methods import METHODS
from speclora_kernels.methods.base import deferred_svd
from speclora_kernels.persistence.container import write_container
from speclora_kernels.persistence.schema import ADAPTER_FORMAT, FORMAT_VERSION

SPECTRAL = ["spectral_additive", "spectral_rotational"]


def _linear(out=19, inp=23, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Linear(inp, out).to(dtype)


def two_layers(seed=0):
    torch.manual_seed(seed)
    return TwoLayers().double()


@pytest.mark.parametrize("method", SPECTRAL)
@pytest.mark.parametrize("offset,r", [(0, 4), (3, 5), (14, 5), (18, 1)])
def test_slice_is_exact_at_init(method, offset, r):
    linear = _linear()
    w0 = linear.weight.detach().clone()
    layer = AdapterLinear.from_linear(linear, method, r=r, offset=offset)
    sigma = torch.linalg.svdvals(w0)
    a = layer.adapter
    assert a.offset == offset and a.P.shape == (19, r) and a.Q.shape == (23, r)
    torch.testing.assert_close(a.sigma, sigma[offset:offset + r], rtol=1e-12, atol=0)
    # base + slice = W0, and the slice really is those triplets: W0 Q = P diag(sigma)
    torch.testing.assert_close(layer.weight + a.frozen_term(), w0, rtol=0, atol=1e-13)
    torch.testing.assert_close(w0 @ a.Q, a.P * a.sigma, rtol=0, atol=1e-12)
    x = torch.randn(5, 23, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", SPECTRAL)
def test_deferred_svd_takes_the_same_slice(method):
    w0 = _linear().weight.detach()
    direct = METHODS[method](w0, r=3, offset=5)
    with deferred_svd():
        lazy = METHODS[method](w0, r=3, offset=5)
    assert torch.isnan(lazy.P).all()
    lazy.compute_svd(w0)
    for name in ("P", "sigma", "Q"):
        assert torch.equal(getattr(lazy, name), getattr(direct, name))


def test_offset_refused_clearly():
    linear = _linear()
    with pytest.raises(ValueError, match=r"offset \+ r <= min\(out_features, in_features\)=19, "
                                         r"got offset=15, r=5"):
        AdapterLinear.from_linear(linear, "spectral_additive", r=5, offset=15)
    with pytest.raises(ValueError, match="offset=-1"):
        AdapterLinear.from_linear(linear, "spectral_rotational", r=2, offset=-1)
    for bad in (True, 1.0, "1"):
        with pytest.raises(TypeError, match="offset must be an int"):
            AdapterLinear.from_linear(linear, "spectral_additive", r=2, offset=bad)
    # SpecLoRA's mask stays on the top-k values; LoRA and PiCa have no slice
    for method in ("lora", "speclora", "pica"):
        with pytest.raises(ValueError, match="offset is not used"):
            AdapterLinear.from_linear(linear, method, r=2, offset=1)


@pytest.mark.parametrize("method", SPECTRAL)
def test_layer_file_saves_and_checks_offset(tmp_path, method):
    layer = AdapterLinear.from_linear(_linear(), method, r=3, offset=4)
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_layer_adapter(layer, tmp_path / "a")
    assert json.loads((tmp_path / "a.json").read_text())["offset"] == 4
    same = AdapterLinear.from_linear(_linear(), method, r=3, offset=4)
    load_layer_adapter(same, tmp_path / "a")
    x = torch.randn(3, 23, dtype=torch.float64)
    assert torch.equal(same(x), layer(x))
    other = AdapterLinear.from_linear(_linear(), method, r=3, offset=0)
    with pytest.raises(AdapterFileError, match="offset=4 but the layer has offset=0"):
        load_layer_adapter(other, tmp_path / "a")


def test_file_without_offset_means_zero(tmp_path):
    """Files written before the option existed lack the key: they are top-r adapters."""
    layer = AdapterLinear.from_linear(_linear(), "spectral_additive", r=3)
    config = {k: v for k, v in layer.adapter_config().items() if k != "offset"}
    write_container(tmp_path / "old", layer.adapter_tensors(), config, format=ADAPTER_FORMAT,
                    version=FORMAT_VERSION)
    load_layer_adapter(AdapterLinear.from_linear(_linear(), "spectral_additive", r=3),
                       tmp_path / "old")
    sliced = AdapterLinear.from_linear(_linear(), "spectral_additive", r=3, offset=2)
    with pytest.raises(AdapterFileError, match="offset=0 but the layer has offset=2"):
        load_layer_adapter(sliced, tmp_path / "old")


def test_model_directory_restores_offsets(tmp_path, torch_cpu_path):
    model = two_layers()
    inject(model, "spectral_rotational", ["q"], r=2, offset=3)
    inject(model, "spectral_rotational", ["v"], r=2, offset=5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["offset"] in (3, 5) and len(config["offset_pattern"]) == 1
    fresh = load_adapter(two_layers(), tmp_path)
    assert (fresh.q.adapter.offset, fresh.v.adapter.offset) == (3, 5)
    x = torch.randn(4, 13, dtype=torch.float64)
    assert torch.equal(fresh(x), model(x))
    adapted = two_layers()
    inject(adapted, "spectral_rotational", ["q", "v"], r=2, offset=3)
    with pytest.raises(AdapterFileError, match="v: the adapter has offset=5 but the model's "
                                               "layer has offset=3"):
        load_adapter(adapted, tmp_path)


def test_peft_config_offset_and_pattern(tmp_path, torch_cpu_path):
    peft = pytest.importorskip("peft")
    from speclora_kernels.peft import SpectralAdapterConfig

    config = SpectralAdapterConfig(r=2, offset=1, offset_pattern={"v": 4},
                                   target_modules=["q", "v"])
    model = peft.get_peft_model(two_layers(), config)
    x = torch.randn(4, 13, dtype=torch.float64)
    # at init: W0 minus the slice (frozen rows) plus the slice again
    torch.testing.assert_close(model(x), two_layers()(x), rtol=0, atol=1e-12)
    q, v = model.base_model.model.q, model.base_model.model.v
    assert (q.spectral_adapter["default"].offset, v.spectral_adapter["default"].offset) == (1, 4)
    sigma = torch.linalg.svdvals(two_layers().v.weight.detach())
    torch.testing.assert_close(v.spectral_adapter["default"].sigma, sigma[4:6], rtol=1e-12,
                               atol=0)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["offset"] == 1 and saved["offset_pattern"] == {"v": 4}
    again = peft.PeftModel.from_pretrained(two_layers(), tmp_path)
    assert again.peft_config["default"].offset_pattern == {"v": 4}
    assert torch.equal(again(x), model(x))
    # our loader reads PEFT's files with the same per-layer offsets
    ours = load_adapter(two_layers(), tmp_path)
    assert (ours.q.adapter.offset, ours.v.adapter.offset) == (1, 4)
    # a config written before offset existed: the top r
    for key in ("offset", "offset_pattern"):
        saved.pop(key)
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    old = peft.PeftModel.from_pretrained(two_layers(), tmp_path)
    assert old.peft_config["default"].offset == 0
    assert load_adapter(two_layers(), tmp_path).v.adapter.offset == 0
    for bad in ({"offset": -1}, {"offset": 1.5}, {"offset_pattern": {"v": -2}}):
        with pytest.raises(ValueError, match="offset"):
            SpectralAdapterConfig(r=2, target_modules=["q"], **bad)
    too_far = SpectralAdapterConfig(r=2, offset=10, target_modules=["v"])
    with pytest.raises(ValueError, match="offset=10, r=2"):
        peft.get_peft_model(two_layers(), too_far)
    assert os.path.exists(tmp_path / "adapter_model.safetensors")
