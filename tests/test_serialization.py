"""One layer's adapter to safetensors + JSON and back: bit-exact, checked, atomic."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import speclora_kernels.serialization as ser
from speclora_kernels import (METHODS, AdapterLinear, load_layer_adapter, read_adapter_files,
                              save_layer_adapter, write_adapter_files)

ALL = sorted(METHODS)
OPTIONS = {"lora": {"alpha": 6}, "speclora": {"k": 4, "alpha": 6}}


def build(method, lin, **kw):
    return AdapterLinear.from_linear(lin, method, r=3, **{**OPTIONS.get(method, {}), **kw})


def perturb(layer):
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.copy_(torch.randn_like(p))


def bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.float64])
def test_round_trip_bit_exact(method, adapter_dtype, tmp_path):
    lin = torch.nn.Linear(23, 17, dtype=adapter_dtype)
    src = build(method, lin, adapter_dtype=adapter_dtype)
    perturb(src)
    st_path, json_path = save_layer_adapter(src, tmp_path / "layer0")
    assert (st_path, json_path) == (str(tmp_path / "layer0.safetensors"), str(tmp_path / "layer0.json"))
    assert sorted(os.listdir(tmp_path)) == ["layer0.json", "layer0.safetensors"]  # no temp files

    dst = build(method, lin, adapter_dtype=adapter_dtype)
    load_layer_adapter(dst, tmp_path / "layer0")
    saved, loaded = src.adapter.state_dict(), dst.adapter.state_dict()
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert saved[name].dtype == loaded[name].dtype
        assert torch.equal(bits(saved[name]), bits(loaded[name])), name
    assert torch.equal(bits(src.weight), bits(dst.weight))
    x = torch.randn(4, 23, dtype=adapter_dtype)
    assert torch.equal(src(x), dst(x))


def test_files_are_safetensors_and_json(tmp_path):
    layer = build("speclora", torch.nn.Linear(23, 17))
    st_path, json_path = save_layer_adapter(layer, tmp_path)  # a directory: dir/adapter.*
    assert os.path.basename(st_path) == "adapter.safetensors"
    tensors = load_file(st_path)
    assert sorted(tensors) == ["A", "B", "P", "Q", "m", "sigma"]
    cfg = json.loads(open(json_path).read())
    assert cfg["format"] == "speclora_kernels.adapter" and cfg["library_version"] == "0.1.0"
    assert (cfg["method"], cfg["r"], cfg["k"], cfg["alpha"], cfg["rank"]) == ("speclora", 3, 4, 6.0, 7)
    assert (cfg["in_features"], cfg["out_features"], cfg["adapter_dtype"]) == (23, 17, "float32")
    assert cfg["tensors"]["P"] == {"shape": [17, 4], "dtype": "float32"}


@pytest.mark.parametrize("other,field", [
    (dict(method="lora"), "method"),
    (dict(r=2), "r"),
    (dict(k=5), "k"),
    (dict(alpha=7), "alpha"),
    (dict(in_f=22), "in_features"),
    (dict(adapter_dtype=torch.float64), "adapter_dtype"),
])
def test_load_mismatch_names_the_field(other, field, tmp_path):
    save_layer_adapter(build("speclora", torch.nn.Linear(23, 17)), tmp_path / "a")
    method = other.pop("method", "speclora")
    lin = torch.nn.Linear(other.pop("in_f", 23), 17)
    opts = {**OPTIONS.get(method, {}), **other}
    dst = AdapterLinear.from_linear(lin, method, r=opts.pop("r", 3), **opts)
    with pytest.raises(ValueError, match=f"saved adapter has {field}="):
        load_layer_adapter(dst, tmp_path / "a")


def test_tampered_files_are_rejected(tmp_path):
    layer = build("lora", torch.nn.Linear(23, 17))
    _, json_path = save_layer_adapter(layer, tmp_path / "a")
    cfg = json.loads(open(json_path).read())
    cfg["tensors"]["A"]["shape"] = [3, 22]
    open(json_path, "w").write(json.dumps(cfg))
    with pytest.raises(ValueError, match="tensor 'A' is .* but .* lists"):
        load_layer_adapter(layer, tmp_path / "a")
    cfg["format"] = "pickle"
    open(json_path, "w").write(json.dumps(cfg))
    with pytest.raises(ValueError, match="is not a speclora_kernels.adapter config"):
        read_adapter_files(tmp_path / "a")


def test_load_checks_tensor_names_and_shapes():
    layer = build("lora", torch.nn.Linear(23, 17))
    good = {n: t.clone() for n, t in layer.adapter_tensors().items()}
    with pytest.raises(ValueError, match=r"missing \['B'\], unexpected \['C'\]"):
        layer.load_adapter_tensors({"A": good["A"], "C": good["B"]})
    with pytest.raises(ValueError, match=r"adapter tensor 'B' must be torch.float32 \(17, 3\), got torch.float64"):
        layer.load_adapter_tensors({**good, "B": good["B"].double()})


def test_load_into_merged_layer_refused(tmp_path):
    layer = build("lora", torch.nn.Linear(23, 17))
    save_layer_adapter(layer, tmp_path / "a")
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        load_layer_adapter(layer, tmp_path / "a")


@pytest.mark.parametrize("method", ["spectral_additive", "spectral_rotational"])
def test_load_other_factors_rebases_residual(method, tmp_path):
    """Factors from a different SVD (another device/solver) re-derive W_res, so the layer
    is still W0 + the loaded adapter."""
    lin = torch.nn.Linear(23, 17, dtype=torch.float64)
    w0 = lin.weight.detach().clone()
    src = build(method, lin)
    p, s, vh = torch.linalg.svd(w0, full_matrices=False)
    t = {n: v.clone() for n, v in src.adapter_tensors().items()}
    # a different (still orthonormal) frame: singular directions 4..6 instead of 1..3
    t["P"], t["sigma"], t["Q"] = p[:, 3:6].contiguous(), s[3:6].clone(), vh[3:6].T.contiguous()
    for name in t:
        if name not in ("P", "sigma", "Q"):
            t[name] = torch.randn_like(t[name])
    write_adapter_files(tmp_path / "a", t, src.adapter_config())

    dst = build(method, lin)
    load_layer_adapter(dst, tmp_path / "a")
    expected_res = w0 - t["P"] @ torch.diag(t["sigma"]) @ t["Q"].T
    torch.testing.assert_close(dst.weight, expected_res, rtol=0, atol=1e-12)


def test_pica_load_updates_the_shared_m(tmp_path):
    lin0, lin1 = torch.nn.Linear(23, 17), torch.nn.Linear(19, 17)
    first = build("pica", lin0)
    second = build("pica", lin1, shared=first.adapter.M)
    src = build("pica", lin0)
    perturb(src)
    save_layer_adapter(src, tmp_path / "a")
    load_layer_adapter(first, tmp_path / "a")
    assert torch.equal(second.adapter.M, src.adapter.M)


def test_write_read_generic_bit_exact(tmp_path):
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 3.0])
    tensors = {
        "bf16": torch.cat([specials, torch.randn(9)]).to(torch.bfloat16),
        "f16": torch.randn(4, 5).to(torch.float16),
        "f64": torch.randn(3, dtype=torch.float64),
        "codes": torch.randint(0, 255, (7,), dtype=torch.uint8),
    }
    write_adapter_files(tmp_path / "x.safetensors", tensors, {"note": "any config"})
    got, cfg = read_adapter_files(tmp_path / "x")
    assert cfg["note"] == "any config"
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(bits(got[name]), bits(t))
    with pytest.raises(TypeError, match=r"not tensors: \['x'\]"):
        write_adapter_files(tmp_path / "y", {"x": [1.0]}, {})


def test_failed_write_keeps_old_files(tmp_path, monkeypatch):
    layer = build("lora", torch.nn.Linear(23, 17))
    st_path, _ = save_layer_adapter(layer, tmp_path / "a")
    before = open(st_path, "rb").read()
    perturb(layer)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ser.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_layer_adapter(layer, tmp_path / "a")
    assert open(st_path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.safetensors"]
