"""Parameters that share one of the op's factors are views of one buffer (SpecLoRA's A in D
and m in s, Spectral rotational's X_U and X_V in one stack): training concatenates nothing.
Whatever moves, copies, saves or loads parameters keeps working, and training equals the
same layer with its parameters concatenated on every call (the fallback)."""
import copy
import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from speclora_kernels import METHODS, AdapterLinear, inject, ops, save_adapter, save_layer_adapter

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
ALL = sorted(METHODS)
OPTIONS = {"speclora": {"k": 4}}
R, K = 3, 4


def build(method, seed=0, **kw):
    torch.manual_seed(seed)
    layer = AdapterLinear.from_linear(nn.Linear(24, 20), method, r=R,
                                      **OPTIONS.get(method, {}), **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(layer.adapter.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer


def unpacked(layer):
    """A copy whose parameters have storages of their own (concatenated on every call)."""
    twin = copy.deepcopy(layer)
    for name, p in list(twin.adapter.named_parameters()):
        setattr(twin.adapter, name, nn.Parameter(p.detach().clone()))
    return twin


def follows(a, b, elements):
    """``b``'s data starts ``elements`` elements after ``a``'s, in the same storage."""
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.data_ptr() - a.data_ptr() == elements * a.element_size())


PACKED = {"speclora": ("A", "m"), "spectral_rotational": ("X_U", "X_V")}


def is_packed(layer) -> bool:
    """Every parameter the method packs is a view of one of this layer's own buffers."""
    assembly = layer._factor_assembly
    packable = assembly.plan(layer).packable
    return all(i in assembly._packs and assembly._packs[i].intact()
               for i in range(len(packable)))


@pytest.fixture
def x():
    return torch.randn(6, 24, generator=torch.Generator().manual_seed(9))


def test_parameters_are_views_of_the_buffers_the_op_reads(monkeypatch, x):
    layer = build("speclora")
    seen, real = [], ops.fused_adapter_linear

    def spy(x, weight, bias, down, scale, up, *args, **kwargs):
        seen.append((down, scale))
        return real(x, weight, bias, down, scale, up, *args, **kwargs)

    monkeypatch.setattr(ops, "fused_adapter_linear", spy)
    layer(x).sum().backward()
    (down, scale), = seen
    a = layer.adapter
    assert down.shape == (R + K, 24) and follows(down, a.A, 0) and follows(scale, a.m, R)
    assert torch.equal(down[R:], a.Q.T) and torch.equal(scale[:R], a.lora_scale)
    assert a.A.grad.shape == a.A.shape and a.m.grad.shape == a.m.shape
    rot = build("spectral_rotational").adapter
    assert follows(rot.X_U, rot.X_V, R * R)
    assert all(p.is_contiguous() for p in (a.A, a.m, rot.X_U, rot.X_V))


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
}


@pytest.mark.parametrize("method,opt", [(m, "adamw") for m in ALL]
                         + [("speclora", o) for o in OPTIMIZERS if o != "adamw"]
                         + [("spectral_rotational", "adamw-foreach")])
def test_training_equals_concatenated(method, opt, x):
    dropout = 0.2 if method == "speclora" else 0.0
    packed = build(method, dropout=dropout)
    plain = unpacked(packed)
    assert is_packed(packed) and (method not in ("speclora", "spectral_rotational")
                                  or not is_packed(plain))
    runs = []
    for layer in (packed, plain):
        optimizer = OPTIMIZERS[opt]([p for p in layer.parameters() if p.requires_grad])
        torch.manual_seed(4)
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = layer.train()(x).square().mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        with torch.no_grad():
            losses.append(layer.eval()(x))
        runs.append((losses, dict(layer.adapter.named_parameters())))
    assert is_packed(packed)
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    for name, p in runs[0][1].items():
        assert torch.equal(p, runs[1][1][name]), name


@pytest.mark.parametrize("method", ALL)
def test_state_dict_and_saved_files_unchanged(method, tmp_path):
    packed = build(method)
    plain = unpacked(packed)
    sd, want = packed.state_dict(), plain.state_dict()
    assert list(sd) == list(want) == ["weight", "bias"] + [
        f"adapter.{n}" for n, _ in packed.adapter.named_parameters()] + [
        f"adapter.{n}" for n, _ in packed.adapter.named_buffers(remove_duplicate=False)
        if n not in packed.adapter._non_persistent_buffers_set]
    for name, t in sd.items():
        assert torch.equal(t, want[name]) and t.is_contiguous(), name
    files = {}
    for tag, layer in (("packed", packed), ("plain", plain)):
        save_layer_adapter(layer, tmp_path / tag)
        files[tag] = [(tmp_path / f"{tag}{ext}").read_bytes() for ext in (".safetensors", ".json")]
    assert files["packed"] == files["plain"]
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    assert all(torch.equal(loaded[n], t) for n, t in sd.items())


def test_model_adapter_files_unchanged(tmp_path):
    def model():
        torch.manual_seed(3)
        net = nn.Sequential(nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 24))
        inject(net, "speclora", ["0"], r=R, k=K)
        return inject(net, "spectral_rotational", ["2"], r=R)

    packed = model()
    with torch.no_grad():
        for p in packed.parameters():
            if p.requires_grad:
                p.add_(0.1)
    plain = copy.deepcopy(packed)
    for layer in (plain[0], plain[2]):
        for name, p in list(layer.adapter.named_parameters()):
            setattr(layer.adapter, name, nn.Parameter(p.detach().clone()))
    assert is_packed(packed[0]) and is_packed(packed[2]) and not is_packed(plain[0])
    save_adapter(packed, tmp_path / "packed")
    save_adapter(plain, tmp_path / "plain")
    for name in os.listdir(tmp_path / "packed"):
        assert (tmp_path / "packed" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


@pytest.mark.parametrize("method", ["speclora", "spectral_rotational"])
@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_keeps_or_restores_the_packing(method, assign, x):
    layer, other = build(method), build(method, seed=5)
    storages = [p.untyped_storage().data_ptr() for p in layer.adapter.parameters()]
    layer.load_state_dict(other.state_dict(), assign=assign)
    assert is_packed(layer)
    if not assign:  # copied in place: the same buffers
        assert storages == [p.untyped_storage().data_ptr() for p in layer.adapter.parameters()]
    for name, t in other.state_dict().items():
        assert torch.equal(layer.state_dict()[name], t)
    assert torch.equal(layer(x), other(x))
    for name in PACKED[method]:
        p, q = layer.adapter.get_parameter(name), other.adapter.get_parameter(name)
        assert p.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()


@pytest.mark.parametrize("method", ALL)
def test_module_to_keeps_parameters_and_optimizer(method, x):
    layer = build(method)
    params = list(layer.adapter.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    y = layer(x)
    layer.to(torch.float64)
    assert all(a is b for a, b in zip(params, layer.adapter.parameters()))
    assert is_packed(layer) and all(p.dtype == torch.float64 for p in params)
    y64 = layer(x.double())
    torch.testing.assert_close(y64.float(), y, rtol=1e-5, atol=1e-5)
    y64.square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.equal(layer(x.double()), y64)
    layer.float()
    assert is_packed(layer) and all(p.dtype == torch.float32 for p in params)


@pytest.mark.parametrize("method", ALL)
def test_deepcopy_and_pickle_are_independent(method, x):
    layer = build(method)
    y = layer(x).detach()
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):
        assert is_packed(twin) and torch.equal(twin(x), y)
        assert not any(p.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
                       for p in twin.parameters() for q in layer.parameters())
        with torch.no_grad():
            for p in twin.adapter.parameters():
                p.mul_(2)
        assert torch.equal(layer(x), y) and not torch.equal(twin(x), y)


@pytest.mark.parametrize("method", ALL)
def test_torch_compile_fullgraph(method, x):
    layer = build(method)
    want = layer(x)
    want.square().sum().backward()
    grads = [p.grad.clone() for p in layer.adapter.parameters()]
    layer.zero_grad()
    torch._dynamo.reset()  # every method compiles AdapterLinear.forward: one budget each
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    got.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip((p.grad for p in layer.adapter.parameters()), grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)


# -- DDP: packed parameters get the same gradients on both ranks as in one process ---------
WORLD = 2


def _ddp_model():
    torch.manual_seed(11)
    net = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                        nn.Linear(24, 16))
    inject(net, "speclora", ["0"], r=R, k=K)
    inject(net, "spectral_rotational", ["2"], r=R)
    inject(net, "spectral_additive", ["4"], r=R)
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


def _ddp_batch(rank):
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(rank))


def _ddp_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        with ops.autograd.cpu_path():
            model = _ddp_model()
            ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
            ddp(_ddp_batch(rank)).square().mean().backward()
        torch.save({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 7-35 s: the not-slow loop stays short
def test_ddp_gradients_of_packed_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=WORLD,
                       start_method="spawn")
    grads = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model = _ddp_model()
    assert is_packed(model[0]) and is_packed(model[2])
    (sum(model(_ddp_batch(r)).square().mean() for r in range(WORLD)) / WORLD).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads[0]) == set(want) and "0.adapter.m" in want and "2.adapter.X_V" in want
    for name, g in want.items():
        assert torch.equal(grads[0][name], grads[1][name]), name
        torch.testing.assert_close(grads[0][name], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("base", ["dense", "nf4", "linear4bit"])
@pytest.mark.parametrize("method", ALL)
def test_op_factors_are_the_methods(method, base):
    """The factors the op gets (declared by op_spec, with the layer's correction rows) give
    the same U diag(s) D as factors(), in training and cached for inference."""
    from speclora_kernels.tools.aten_ops import build_layer

    layer = build_layer(method, size=32, r=R, dtype=torch.float32, base=base)
    d, s, u = (t.detach().double() for t in layer.factors())
    want = (u * s) @ d
    trained = layer._op_factors(torch.float32)
    with torch.no_grad():
        cached = layer._op_factors(torch.float16)
    for down, scale, up in (trained, cached):
        assert down.shape == d.shape and scale.shape == s.shape and up.shape == u.shape
        got = (up.detach().double() * scale.detach().double()) @ down.detach().double()
        tol = 1e-5 if down.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert cached[0].dtype == cached[2].dtype == torch.float16
    assert cached[1].dtype == torch.float32
