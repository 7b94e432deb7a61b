"""The op's factors cached for inference: reused while nothing they are built from changes,
rebuilt after anything that changes a parameter or buffer (never stale). "Fresh" is a deep
copy of the layer, whose cache starts empty; each event must also change the output, so a
stale cache could not pass."""
import copy

import pytest
import torch

from speclora_kernels import (
    METHODS,
    AdapterLinear,
    inject,
    load_adapter,
    load_layer_adapter,
    ops,
    save_adapter,
    save_layer_adapter,
)

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
ALL = sorted(METHODS)
OPTIONS = {"speclora": {"k": 4}}


def build(method, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    layer = AdapterLinear.from_linear(torch.nn.Linear(24, 20, dtype=dtype), method, r=3,
                                      **OPTIONS.get(method, {}), **kw)
    perturb(layer, seed)
    return layer


def perturb(module, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def infer(layer, x):
    with torch.no_grad():
        return layer(x)


def fresh(layer, x):
    """What the layer computes with nothing cached."""
    return infer(copy.deepcopy(layer), x)


def cached_factors(layer):
    entry = layer._factor_assembly._inference
    return None if entry is None else entry.factors


def check_rebuilt(layer, x, stale):
    """The next inference call equals a fresh recomputation and differs from ``stale``."""
    y = infer(layer, x)
    assert torch.equal(y, fresh(layer, x))
    assert not torch.equal(y, stale)
    return y


@pytest.fixture
def x():
    return torch.randn(5, 24, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("method", ALL)
def test_cached_until_something_changes(method, x):
    layer = build(method)
    y = infer(layer, x)
    factors = cached_factors(layer)
    assert factors is not None
    for _ in range(2):  # reused: the very same tensors
        assert torch.equal(infer(layer, x), y)
        assert all(a is b for a, b in zip(cached_factors(layer), factors))
    assert torch.equal(y, fresh(layer, x))
    down, scale, up = factors
    d, s, u = (t.double() for t in layer.factors())
    torch.testing.assert_close((up.double() * scale.double()) @ down.double(), (u * s) @ d)


@pytest.mark.parametrize("method", ALL)
def test_optimizer_step_invalidates(method, x):
    layer = build(method)
    opt = torch.optim.AdamW(p for p in layer.parameters() if p.requires_grad)
    stale = infer(layer, x)
    layer(x).square().mean().backward()
    opt.step()
    stale = check_rebuilt(layer, x, stale)
    layer(x).square().mean().backward()  # and again: a second step, a second rebuild
    opt.step()
    check_rebuilt(layer, x, stale)


@pytest.mark.parametrize("method", ALL)
def test_in_place_edit_of_each_tensor_invalidates(method, x):
    """Every parameter and buffer of the method, edited in place under no_grad."""
    layer = build(method)
    for name, t in list(layer.adapter.named_parameters()) + list(layer.adapter.named_buffers()):
        stale = infer(layer, x)
        with torch.no_grad():
            t.mul_(1.5) if name != "ones" else t.add_(0.5)
        check_rebuilt(layer, x, stale)


@pytest.mark.parametrize("method", ALL)
def test_load_adapter_tensors_and_layer_files_invalidate(method, x, tmp_path):
    layer, other = build(method), build(method, seed=1)
    perturb(other, seed=5)
    stale = infer(layer, x)
    layer.load_adapter_tensors(other.adapter_tensors())
    stale = check_rebuilt(layer, x, stale)
    perturb(other, seed=6)
    save_layer_adapter(other, tmp_path / "a")
    load_layer_adapter(layer, tmp_path / "a")
    check_rebuilt(layer, x, stale)
    for name, t in layer.adapter_tensors().items():
        assert torch.equal(t, other.adapter_tensors()[name]), name


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.q_proj, self.k_proj = torch.nn.Linear(24, 20), torch.nn.Linear(24, 20)

    def forward(self, x):
        return self.q_proj(x) + self.k_proj(x)


@pytest.mark.parametrize("method", ALL)
def test_load_adapter_and_load_state_dict_invalidate(method, x, tmp_path):
    opts = {"r": 3, **OPTIONS.get(method, {})}
    model = inject(Net(), method, ["q_proj", "k_proj"], **opts)
    other = inject(Net(), method, ["q_proj", "k_proj"], **opts)
    perturb(other, seed=4)
    save_adapter(other, tmp_path)
    stale = infer(model, x)
    load_adapter(model, tmp_path)
    y = infer(model, x)
    assert torch.equal(y, infer(other, x)) and not torch.equal(y, stale)
    for assign in (False, True):
        perturb(other, seed=7 + assign)
        model.load_state_dict(other.state_dict(), assign=assign)
        y, stale = infer(model, x), y
        assert torch.equal(y, infer(copy.deepcopy(other), x)) and not torch.equal(y, stale)


@pytest.mark.parametrize("method", ALL)
def test_merge_unmerge(method, x):
    """merge() and unmerge() write the base; the factors' cache stays right around them."""
    layer = build(method)
    stale = infer(layer, x)
    layer.merge()
    torch.testing.assert_close(infer(layer, x), stale, rtol=1e-5, atol=1e-5)  # base only
    layer.unmerge()
    assert torch.equal(infer(layer, x), fresh(layer, x))
    perturb(layer, seed=3)
    stale = check_rebuilt(layer, x, stale)
    layer.merge()
    merged = infer(layer, x)
    layer.unmerge()
    y = infer(layer, x)
    assert torch.equal(y, fresh(layer, x))
    torch.testing.assert_close(y, merged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, stale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ALL)
def test_module_casts_invalidate(method, x):
    layer = build(method)
    y32 = infer(layer, x)
    layer.to(torch.float64)
    y64 = infer(layer, x.double())
    assert y64.dtype == torch.float64 and torch.equal(y64, fresh(layer, x.double()))
    assert all(t.dtype == torch.float64 for t in cached_factors(layer))
    torch.testing.assert_close(y64.float(), y32, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.adapter.get_parameter(next(iter(dict(layer.adapter.named_parameters())))).mul_(2)
    layer.half()
    y16 = infer(layer, x.half())
    assert y16.dtype == torch.float16 and torch.equal(y16, fresh(layer, x.half()))
    layer.float()
    check_rebuilt(layer, x, y32)


@pytest.mark.parametrize("method", ALL)
def test_device_move_invalidates(method, x):
    layer = build(method)
    infer(layer, x)
    with torch.no_grad():
        meta = copy.deepcopy(layer).to("meta")._op_factors(torch.float32)
    assert all(t.device.type == "meta" for t in meta)
    if not torch.cuda.is_available():
        return
    stale = infer(layer, x)
    layer.cuda()
    y = infer(layer, x.cuda())
    assert all(t.is_cuda for t in cached_factors(layer))
    torch.testing.assert_close(y.cpu(), stale, rtol=1e-4, atol=1e-4)
    layer.cpu()
    assert torch.equal(infer(layer, x), fresh(layer, x))


def test_pica_shared_m_updated_through_another_layer(x):
    first = build("pica")
    torch.manual_seed(1)
    second = AdapterLinear.from_linear(torch.nn.Linear(24, 20), "pica", r=3,
                                       shared=first.adapter.M)
    stale = infer(second, x)
    opt = torch.optim.SGD([first.adapter.M], lr=0.1)
    first(x).square().mean().backward()
    opt.step()
    check_rebuilt(second, x, stale)
    stale = infer(second, x)
    with torch.no_grad():
        first.adapter.M.add_(1.0)
    check_rebuilt(second, x, stale)


@pytest.mark.parametrize("method", ALL)
def test_inference_mode_and_frozen_adapter(method, x):
    layer = build(method)
    with torch.inference_mode():
        y = layer(x)
        stale = layer(x)
        with torch.no_grad():
            next(layer.adapter.parameters()).mul_(2)  # a normal tensor: its version moves
        assert not torch.equal(layer(x), stale)
    # built in inference mode, now needed for a backward through x only: rebuilt, usable
    layer.requires_grad_(False)
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    assert xg.grad is not None and not torch.equal(y, infer(layer, x))


@pytest.mark.parametrize("method", ALL)
def test_writes_through_data_need_clear_factor_cache(method, x):
    """``tensor.data`` has its own version counter (autograd does not see such writes
    either): after them, ``clear_factor_cache()``."""
    layer = build(method)
    stale = infer(layer, x)
    for _, t in layer.adapter.named_buffers():
        t.data.mul_(1.25)
    layer.clear_factor_cache()
    check_rebuilt(layer, x, stale)


def test_the_op_sees_the_cached_tensors(monkeypatch, x):
    """Under no_grad the op receives the cached tensors themselves, in x's dtype."""
    layer = build("speclora")
    seen, real = [], ops.fused_adapter_linear

    def spy(x, weight, bias, down, scale, up, *args, **kwargs):
        seen.append((down, scale, up))
        return real(x, weight, bias, down, scale, up, *args, **kwargs)

    monkeypatch.setattr(ops, "fused_adapter_linear", spy)
    infer(layer, x)
    infer(layer, x)
    assert all(a is b for a, b in zip(*seen))
    assert seen[0][0].dtype == seen[0][2].dtype == x.dtype


class _Double(torch.nn.Module):
    def forward(self, t):
        return 2 * t


@pytest.mark.parametrize("method", ["speclora", "spectral_rotational"])
def test_parametrized_parameters_use_plain_ops(method, x):
    """A parametrization turns a parameter into a computed property: the layer then builds
    its factors with plain ops on every call (nothing to cache or pack by name)."""
    from torch.nn.utils import parametrize

    layer = build(method)
    name = {"speclora": "A", "spectral_rotational": "X_V"}[method]
    want = copy.deepcopy(layer)
    with torch.no_grad():
        getattr(want.adapter, name).mul_(2)
    parametrize.register_parametrization(layer.adapter, name, _Double())
    torch.testing.assert_close(infer(layer, x), infer(want, x), rtol=1e-5, atol=1e-5)
    y = layer(x)
    y.square().sum().backward()
    assert layer.adapter.parametrizations[name].original.grad is not None
    with torch.no_grad():
        layer.adapter.parametrizations[name].original.mul_(0.5)
        getattr(want.adapter, name).mul_(0.5)
    torch.testing.assert_close(infer(layer, x), infer(want, x), rtol=1e-5, atol=1e-5)
