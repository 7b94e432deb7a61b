"""A method added from outside the package: declared here, registered, and then every part
of the library knows it (from_linear, inject, layer and model files, merge) without any
package file changing. Plus the errors option declarations give for unknown options and
bad values."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from speclora_kernels import (
    METHODS,
    AdapterFileError,
    AdapterLinear,
    inject,
    load_adapter,
    load_layer_adapter,
    register_method,
    save_adapter,
    save_layer_adapter,
)
from speclora_kernels.demo import method_options
from speclora_kernels.integrations import adapter_layers
from speclora_kernels.methods import RANK, AdapterMethod, Option, get_method, unregister_method
from speclora_kernels.persistence.container import write_container
from speclora_kernels.persistence.schema import ADAPTER_FORMAT

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
NAME = "gain_lora"


def check_gain(value, context) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"gain must be a number, got {type(value).__name__}")
    if not 0 < value < 1e6:
        raise ValueError(f"gain must be in (0, 1e6), got {value}")
    return float(value)


class GainLoRA(AdapterMethod):
    """``W' = W0 + B diag(gain * g) A``: LoRA with a learnable per-rank gain ``g`` (ones at
    init) and a fixed overall ``gain`` (a saved option)."""

    name = NAME
    options = (RANK, Option("gain", check_gain, default=1.0, help="overall gain of the path"))

    def __init__(self, weight, *, generator=None, **options):
        super().__init__(weight, **options)
        self.A = self._new(self.r, self.in_features, like=weight)
        self.B = self._new(self.out_features, self.r, like=weight)
        self.g = self._new(self.r, like=weight)
        with torch.no_grad():
            nn.init.normal_(self.A, std=self.in_features ** -0.5, generator=generator)
            self.g.fill_(1.0)
        self.rank = self.grad_rows = self.r

    def factors(self):
        return self.A, self.gain * self.g, self.B


@pytest.fixture
def gain_method():
    register_method(GainLoRA)
    yield GainLoRA
    unregister_method(NAME)


def perturb(module, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


def weight64(w0, adapter, gain):
    """The formula, in float64, from the parameters by name."""
    a, b, g = (getattr(adapter, n).detach().double() for n in ("A", "B", "g"))
    return w0.double() + b @ torch.diag(gain * g) @ a


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.q_proj, self.up_proj = nn.Linear(24, 16), nn.Linear(16, 40, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x):
        return self.up_proj(self.q_proj(x))


def test_registered_everywhere(gain_method):
    assert METHODS[NAME] is gain_method and get_method(NAME) is gain_method
    assert method_options(NAME, r=8, k=16, dropout=0.1) == {"r": 8}  # the demo reads it too


def test_from_linear_merge_unmerge(gain_method):
    lin = nn.Linear(29, 19, dtype=torch.float64)
    w0, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    layer = AdapterLinear.from_linear(lin, NAME, r=3, gain=2.5)
    assert (layer.adapter.r, layer.adapter.gain, layer.rank) == (3, 2.5, 3)
    assert "method=gain_lora, r=3, gain=2.5, R=3" in repr(layer)
    x = torch.randn(5, 29, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ w0.T + b, rtol=1e-12, atol=1e-12)  # B = 0
    perturb(layer)
    w = weight64(w0, layer.adapter, 2.5)
    y = layer(x)
    torch.testing.assert_close(y, x @ w.T + b, rtol=1e-10, atol=1e-10)
    layer.merge()
    torch.testing.assert_close(layer.weight, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), y, rtol=1e-10, atol=1e-10)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-12)
    # gradients reach the new parameter
    layer(x).square().sum().backward()
    assert layer.adapter.g.grad is not None and layer.adapter.g.grad.abs().sum() > 0


def test_layer_files(gain_method, tmp_path):
    lin = nn.Linear(23, 17)
    src = AdapterLinear.from_linear(lin, NAME, r=3, gain=0.5)
    perturb(src)
    _, json_path = save_layer_adapter(src, tmp_path / "a")
    config = json.loads(open(json_path).read())
    assert (config["method"], config["r"], config["gain"], config["rank"]) == (NAME, 3, 0.5, 3)
    dst = AdapterLinear.from_linear(lin, NAME, r=3, gain=0.5)
    load_layer_adapter(dst, tmp_path / "a")
    x = torch.randn(4, 23)
    assert torch.equal(dst(x), src(x))
    other = AdapterLinear.from_linear(lin, NAME, r=3, gain=2.0)
    with pytest.raises(AdapterFileError, match="saved adapter has gain=0.5 but the layer has "
                                               "gain=2.0"):
        load_layer_adapter(other, tmp_path / "a")
    # the file's value is checked with the option's own check
    bad = {**src.adapter_config(), "gain": -1.0}
    write_container(tmp_path / "b", src.adapter_tensors(), bad, format=ADAPTER_FORMAT)
    with pytest.raises(AdapterFileError, match=r"b.safetensors .*gain must be in \(0, 1e6\), "
                                               r"got -1.0"):
        load_layer_adapter(dst, tmp_path / "b")
    missing = {k: v for k, v in src.adapter_config().items() if k != "gain"}
    write_container(tmp_path / "c", src.adapter_tensors(), missing, format=ADAPTER_FORMAT)
    with pytest.raises(AdapterFileError, match=r"needs \['gain', 'r'\]; missing \['gain'\]"):
        load_layer_adapter(dst, tmp_path / "c")


def test_inject_and_model_files(gain_method, tmp_path):
    x = torch.randn(6, 24)
    base = Tiny()
    model = inject(Tiny(), NAME, ["q_proj", "up_proj"], r=2, gain=0.5)
    torch.testing.assert_close(model(x), base(x), rtol=1e-6, atol=1e-6)
    perturb(model)
    layers = adapter_layers(model)
    assert set(layers) == {"q_proj", "up_proj"}
    q = weight64(base.q_proj.weight, layers["q_proj"].adapter, 0.5)
    up = weight64(base.up_proj.weight, layers["up_proj"].adapter, 0.5)
    want = ((x.double() @ q.T + base.q_proj.bias.double()) @ up.T)
    torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.adapter.{p}" for layer in layers for p in "ABg"}

    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {e["gain"] for e in config["layers"].values()} == {0.5}
    fresh = load_adapter(Tiny(), tmp_path)
    assert torch.equal(fresh(x), model(x))
    assert {layer.adapter.gain for layer in adapter_layers(fresh).values()} == {0.5}
    other = inject(Tiny(), NAME, ["q_proj", "up_proj"], r=2, gain=3.0)
    with pytest.raises(AdapterFileError, match="q_proj: the adapter has gain=0.5 but the "
                                               "model's layer has gain=3.0"):
        load_adapter(other, tmp_path)


def test_unregistered_method_is_gone(gain_method, tmp_path):
    layer = AdapterLinear.from_linear(nn.Linear(23, 17), NAME, r=2)
    save_layer_adapter(layer, tmp_path / "a")
    unregister_method(NAME)
    try:
        assert NAME not in METHODS
        with pytest.raises(ValueError, match="method must be one of"):
            AdapterLinear.from_linear(nn.Linear(23, 17), NAME, r=2)
        with pytest.raises(AdapterFileError, match="method='gain_lora' must be a registered"):
            load_layer_adapter(layer, tmp_path / "a")
    finally:
        register_method(GainLoRA)  # the fixture unregisters it


def test_register_rejects_bad_declarations(gain_method):
    with pytest.raises(ValueError, match="method 'gain_lora' is already registered"):
        register_method(GainLoRA)
    with pytest.raises(TypeError, match="cls must be an AdapterMethod subclass"):
        register_method(nn.Linear)

    class Clash(GainLoRA):
        name = "clash"
        options = (RANK, Option("dropout", check_gain))

    with pytest.raises(ValueError, match=r"names \['dropout'\] are duplicated, not "
                                         r"identifiers or reserved"):
        register_method(Clash)
    Clash.options = (RANK, RANK)
    with pytest.raises(ValueError, match=r"names \['r'\]"):
        register_method(Clash)
    assert "clash" not in METHODS
    with pytest.raises(ValueError, match="method 'nope' is not registered"):
        unregister_method("nope")


def test_unknown_option_names_the_option_and_the_method_options(gain_method):
    lin = nn.Linear(7, 5)
    with pytest.raises(ValueError, match=r"k is not used by method='gain_lora' \(it takes r, "
                                         r"gain\)"):
        AdapterLinear.from_linear(lin, NAME, r=2, k=3)
    with pytest.raises(ValueError, match=r"alpha is not used by method='pica' \(it takes r, "
                                         r"svd, shared\)"):
        AdapterLinear.from_linear(lin, "pica", r=2, alpha=3)
    with pytest.raises(ValueError, match="q_proj: gain_ is not used by method='gain_lora'"):
        inject(Tiny(), NAME, ["q_proj"], r=2, gain_=3)


@pytest.mark.parametrize("method,options,error,message", [
    (NAME, {"gain": -1.0}, ValueError, r"gain must be in \(0, 1e6\), got -1.0"),
    (NAME, {"gain": "2"}, TypeError, "gain must be a number, got str"),
    (NAME, {"r": 9}, ValueError, r"r must be in \[1, min\(out_features, in_features\)=5\], "
                                 r"got 9"),
    ("speclora", {"k": 0}, ValueError, r"k must be in \[1, .*got 0"),
    ("speclora", {"k": 2.0}, TypeError, "k must be an int, got float"),
    ("lora", {"alpha": "big"}, TypeError, "alpha must be a number, got str"),
    ("lora", {"alpha": 1e31}, ValueError, "alpha must be < 1e[+]?30, got 1e[+]?31"),
    ("pica", {"svd": "exact"}, ValueError, r"svd must be one of \('auto', 'full', "
                                           r"'randomized'\), got 'exact'"),
    ("pica", {"shared": torch.zeros(5, 2)}, TypeError, "shared must be the nn.Parameter M"),
])
def test_bad_option_value_names_the_option(gain_method, method, options, error, message):
    lin = nn.Linear(7, 5)
    with pytest.raises(error, match=message):
        AdapterLinear.from_linear(lin, method, **{"r": 2, **options})
    if "shared" not in options:  # inject: the same error, naming the layer, model unchanged
        model = nn.Module()
        model.q_proj = lin
        with pytest.raises(error, match=f"q_proj: {message}"):
            inject(model, method, ["q_proj"], **{"r": 2, **options})
        assert not adapter_layers(model)


def test_readme_example_runs():
    """The README's "Adding a method" example is this method, and it runs as written."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("## Adding a method", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope = {}
    try:
        exec(compile(block, "README.md", "exec"), scope)
        assert scope["layer"].adapter.gain == 0.5 and METHODS[NAME] is scope["GainLoRA"]
    finally:
        if NAME in METHODS:
            unregister_method(NAME)
