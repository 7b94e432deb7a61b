"""One layer's adapter to safetensors + JSON and back: bit-exact, checked, atomic."""
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import speclora_kernels.persistence.container as container
from speclora_kernels import METHODS, AdapterFileError, AdapterLinear, load_layer_adapter, save_layer_adapter
from speclora_kernels.persistence.container import read_container, write_container
from speclora_kernels.persistence.schema import ADAPTER_FORMAT

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


@pytest.mark.parametrize("method", ["speclora", "spectral_additive"])
def test_file_without_svd_loads(method, tmp_path):
    """Layer files written before svd was a saved option have no svd key: it is the one
    option that need not match (it only chose how the saved factors were computed), so
    the default is used."""
    src = build(method, torch.nn.Linear(23, 17), svd="full")
    perturb(src)
    config = src.adapter_config()
    assert config["svd"] == "full"
    del config["svd"]
    write_container(tmp_path / "a", src.adapter_tensors(), config, format=ADAPTER_FORMAT)
    dst = build(method, torch.nn.Linear(23, 17), svd="randomized")
    load_layer_adapter(dst, tmp_path / "a")
    for name, t in src.adapter_tensors().items():
        assert torch.equal(bits(dst.adapter_tensors()[name]), bits(t)), name


def test_json_copy_edit_warns_and_committed_config_wins(tmp_path):
    """The .json is a readable copy: an edit (or a save interrupted between its two
    renames) is reported and ignored; the config committed with the tensors is used."""
    layer = build("lora", torch.nn.Linear(23, 17))
    perturb(layer)
    _, json_path = save_layer_adapter(layer, tmp_path / "a")
    cfg = json.loads(open(json_path).read())
    cfg["tensors"]["A"]["shape"] = [3, 22]
    cfg["format"] = "pickle"
    open(json_path, "w").write(json.dumps(cfg))
    dst = build("lora", torch.nn.Linear(23, 17))
    with pytest.warns(RuntimeWarning, match="differs from the config committed with"):
        load_layer_adapter(dst, tmp_path / "a")
    assert torch.equal(dst.adapter.A, layer.adapter.A)
    open(json_path, "wb").write(b"\xff not json")
    with pytest.raises(AdapterFileError, match=r"a.json: not UTF-8"):
        load_layer_adapter(dst, tmp_path / "a")


def test_embedded_config_edit_fails_checksum(tmp_path):
    layer = build("lora", torch.nn.Linear(23, 17))
    st_path, _ = save_layer_adapter(layer, tmp_path / "a")
    blob = open(st_path, "rb").read()
    assert blob.count(b'\\"alpha\\": 6.0') == 1  # inside the embedded config string
    open(st_path, "wb").write(blob.replace(b'\\"alpha\\": 6.0', b'\\"alpha\\": 7.0'))
    with pytest.raises(AdapterFileError, match="a.safetensors: checksum mismatch"):
        read_container(tmp_path / "a", format=ADAPTER_FORMAT)
    with pytest.raises(AdapterFileError, match="saved adapter has alpha=7.0"):
        load_layer_adapter(layer, tmp_path / "a")  # caught earlier, by the layer's config


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(method="dora"), "method='dora' must be a registered method name"),
    (lambda c: c.update(format_version=2), "format_version=2 must be an int in"),
    (lambda c: c.update(format_version=True), "format_version=True must be"),
    (lambda c: c.pop("rank"), r"missing keys \['rank'\]"),
    (lambda c: c.update(rank=5), "rank=5 but method 'lora' with these options has rank 3"),
    (lambda c: c.update(r=40), r"r must be in \[1, min"),
    (lambda c: c.update(k=2), r"not its own \['k'\]"),
    (lambda c: c.update(dropout=1.5), r"dropout=1.5 must be a number in \[0, 1\)"),
    (lambda c: c.update(code="__import__('os')"), r"unknown keys \['code'\]"),
])
def test_layer_config_schema(edit, message, tmp_path):
    """Configs are validated against the schema before any tensor data is read; the layer
    is untouched."""
    layer = build("lora", torch.nn.Linear(23, 17))
    config = layer.adapter_config()
    edit(config)
    write_container(tmp_path / "a", layer.adapter_tensors(), config, format=ADAPTER_FORMAT)
    before = layer.adapter.A.clone()
    with pytest.raises(AdapterFileError, match=message):
        load_layer_adapter(build("lora", torch.nn.Linear(23, 17)), tmp_path / "a")
    assert torch.equal(layer.adapter.A, before)


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
    write_container(tmp_path / "a", t, src.adapter_config(), format=ADAPTER_FORMAT)

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
    write_container(tmp_path / "x.safetensors", tensors, {"note": "any config"}, format="test")
    got, cfg = read_container(tmp_path / "x", format="test")
    assert cfg["note"] == "any config"
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(bits(got[name]), bits(t))
    with pytest.raises(TypeError, match=r"not tensors: \['x'\]"):
        write_container(tmp_path / "y", {"x": [1.0]}, {}, format="test")


def test_failed_write_keeps_old_files(tmp_path, monkeypatch):
    layer = build("lora", torch.nn.Linear(23, 17))
    st_path, _ = save_layer_adapter(layer, tmp_path / "a")
    before = open(st_path, "rb").read()
    perturb(layer)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(container.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_layer_adapter(layer, tmp_path / "a")
    assert open(st_path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.safetensors"]


def test_write_failing_after_partial_bytes_keeps_old_files(tmp_path, monkeypatch):
    """A write that dies half-way (disk full, I/O error) leaves the previous adapter loadable
    and no temporary file behind."""
    layer = build("lora", torch.nn.Linear(23, 17))
    perturb(layer)
    st_path, json_path = save_layer_adapter(layer, tmp_path / "a")
    before = (open(st_path, "rb").read(), open(json_path, "rb").read())
    saved_a = layer.adapter.A.clone()
    perturb(layer)
    fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError("No space left on device")

    monkeypatch.setattr(container.os, "fdopen", lambda fd, mode: HalfWriter(fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        save_layer_adapter(layer, tmp_path / "a")
    assert (open(st_path, "rb").read(), open(json_path, "rb").read()) == before
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.safetensors"]
    monkeypatch.undo()
    dst = build("lora", torch.nn.Linear(23, 17))
    load_layer_adapter(dst, tmp_path / "a")
    assert torch.equal(dst.adapter.A, saved_a)


def test_crash_between_the_two_renames_loads_the_new_adapter(tmp_path, monkeypatch):
    """The safetensors file is renamed first and carries the config: if the .json rename
    never happens, the new adapter loads (with a warning about the stale copy)."""
    layer = build("speclora", torch.nn.Linear(23, 17))
    save_layer_adapter(layer, tmp_path / "a")
    perturb(layer)
    replace = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("killed")
        replace(src, dst)

    monkeypatch.setattr(container.os, "replace", second_fails)
    with pytest.raises(OSError, match="killed"):
        save_layer_adapter(layer, tmp_path / "a")
    assert calls[0].endswith("a.safetensors") and calls[1].endswith("a.json")
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.safetensors"]
    dst = build("speclora", torch.nn.Linear(23, 17))
    os.remove(tmp_path / "a.json")  # also a first save killed between the renames
    with pytest.warns(RuntimeWarning, match="a.json is missing"):
        load_layer_adapter(dst, tmp_path / "a")
    for name, t in layer.adapter_tensors().items():
        assert torch.equal(bits(dst.adapter_tensors()[name]), bits(t)), name


_SAVER = """
import sys, torch
from speclora_kernels.persistence import write_container
path = sys.argv[1]
for version in range(1, 10**6):
    tensors = {f"t{i}": torch.full((256, 1024), float(version)) for i in range(8)}  # 8 MiB
    write_container(path, tensors, {"version": version}, format="test")
    print(version, flush=True)
"""


def test_killed_mid_save_keeps_a_complete_adapter(tmp_path):
    """SIGKILL a process at random points while it saves 8 MiB adapters over and over:
    the files on disk always load, as the last announced version or the one after it.
    A kill can leave a hidden .tmp-* file (nothing can remove it); never a partial file
    under the real name. ~6 s (one interpreter start)."""
    import random
    import signal
    import subprocess
    import sys
    import time

    rng = random.Random(0)
    path = str(tmp_path / "a")
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, path], stdout=subprocess.PIPE,
                            text=True)
    try:
        int(proc.stdout.readline())
        start = time.perf_counter()
        announced = int(proc.stdout.readline())
        time.sleep(rng.uniform(0.0, time.perf_counter() - start))  # somewhere in a save
        proc.send_signal(signal.SIGKILL)
        for line in proc.stdout:
            announced = int(line)
    finally:
        proc.kill()
        proc.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the .json copy may be stale
        tensors, config = read_container(path, format="test")
    assert config["version"] in (announced, announced + 1)
    assert all(bool((t == config["version"]).all()) for t in tensors.values())
    junk = set(os.listdir(tmp_path)) - {"a.json", "a.safetensors"}
    assert all(name.startswith(".tmp-") for name in junk), junk


def test_saves_are_byte_reproducible(tmp_path):
    """safetensors writes its metadata in hash order; ours sorts the header."""
    layer = build("speclora", torch.nn.Linear(23, 17))
    blobs = {open(save_layer_adapter(layer, tmp_path / f"a{i}")[0], "rb").read() for i in range(8)}
    assert len(blobs) == 1
    blob = blobs.pop()
    n = int.from_bytes(blob[:8], "little")
    assert n % 8 == 0 and json.loads(blob[8:8 + n])  # aligned data, plain JSON header


def test_round_trip_randomized_svd_layer(tmp_path):
    """A layer large enough for the randomized SVD (min(out, in) > 1024): the loader builds
    the method on a meta weight to learn its tensors, which must not need a real RNG."""
    lin = torch.nn.Linear(1100, 1040, bias=False)
    src = AdapterLinear.from_linear(lin, "spectral_additive", r=2, svd="randomized")
    perturb(src)
    save_layer_adapter(src, tmp_path / "big")
    dst = AdapterLinear.from_linear(lin, "spectral_additive", r=2, svd="randomized")
    load_layer_adapter(dst, tmp_path / "big")
    for name, t in src.adapter_tensors().items():
        assert torch.equal(bits(dst.adapter_tensors()[name]), bits(t)), name
