"""``NF4Tensor`` (an NF4 base as one frozen parameter, what FSDP2 shards and DDP broadcasts)
and ``AdapterLinear``'s holding of it, in one process; the multi-process runs are in
tests/test_fsdp.py."""
import copy
import types

import pytest
import torch
from _tiny_models import tiny_llama

from speclora_kernels import AdapterLinear
from speclora_kernels.integrations import adapter_layers, inject
from speclora_kernels.integrations.fsdp import prepare_fsdp, prepare_zero3
from speclora_kernels.quant import NF4Tensor, NF4Weight

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")


@pytest.fixture
def nf4_layer():
    torch.manual_seed(0)
    return AdapterLinear.from_linear(torch.nn.Linear(128, 32), "speclora", r=4, k=4,
                                     quantize="nf4")


def test_nf4_tensor_rows(nf4_layer):
    w = nf4_layer.nf4_weight()
    t = NF4Tensor.from_weight(w)
    assert t.shape == w.shape and t.dtype == torch.uint8 and t.nf4_weight().packed is w.packed
    halves = torch.chunk(t, 2)
    assert [h.shape for h in halves] == [(16, 128)] * 2
    assert torch.equal(torch.cat([h.packed for h in halves]), w.packed)
    assert torch.equal(torch.cat([h.absmax for h in halves]), w.absmax)
    assert halves[1].absmax2 is w.absmax2
    padded = t.new_zeros((16, 128))
    padded.narrow(0, 0, 16).copy_(halves[1])
    assert torch.equal(padded.packed, halves[1].packed) and padded.view(-1).shape == (2048,)
    assert torch.equal(torch.as_strided(t, (32, 128), (128, 1)).packed, w.packed)
    assert torch.equal(t.to("cpu").nf4_weight().dequantize(), w.dequantize())
    assert torch.equal(copy.deepcopy(t).packed, w.packed)
    for bad in (lambda: t + 1, lambda: t.float(), lambda: t.to(torch.float16),
                lambda: torch.chunk(t, 2, dim=1)):
        with pytest.raises(NotImplementedError):
            bad()


def test_nf4_tensor_ddp_bucket_and_row_checks(nf4_layer):
    """What DDP's coalesced broadcast does before sending: flat views, cat into a bucket,
    slices back at each member; and the clear error FSDP2 meets on rows that do not split."""
    t, plain = nf4_layer.weight, torch.arange(7, dtype=torch.uint8)
    bucket = torch.cat([t.view(-1), plain, t.view(-1)])
    assert bucket.shape == (2 * t.numel() + 7,)
    first, second = bucket.narrow(0, 0, t.numel()), bucket.narrow(0, t.numel(), 7)
    assert isinstance(first, NF4Tensor) and first.packed is t.packed
    assert torch.equal(first.view(t.shape), t) and torch.equal(second, plain)
    t.copy_(first.view(t.shape))  # DDP's copy back: onto itself
    assert torch.equal(t.nf4_weight().dequantize(), nf4_layer.nf4_weight().dequantize())
    for bad in (lambda: bucket.narrow(0, 1, 7), lambda: bucket + 1, lambda: torch.cat([t, t]),
                lambda: torch.cat([t.view(-1), plain.float()])):
        with pytest.raises(NotImplementedError):
            bad()
    mesh = types.SimpleNamespace(ndim=1, size=lambda dim=0: 3)
    with pytest.raises(ValueError, match=r"NF4 base of 32 x 128 .* over 3 ranks"):
        t.fsdp_pre_all_gather(mesh, t.shape, t.stride(), None, None)
    assert t.fsdp_pre_all_gather(types.SimpleNamespace(ndim=1, size=lambda dim=0: 2), t.shape,
                                 t.stride(), None, None)[0] == (t.packed, t.absmax)


def test_hold_nf4_as_buffers(nf4_layer):
    import bitsandbytes as bnb  # noqa: F401

    from speclora_kernels.ops import autograd

    layer = nf4_layer  # from construction: one frozen NF4Tensor parameter
    assert isinstance(layer.weight, NF4Tensor) and not layer.weight.requires_grad
    assert [n for n, _ in layer.named_parameters()][:2] == ["weight", "bias"]
    assert not any(n.startswith("weight") for n, _ in layer.named_buffers())
    buffers = copy.deepcopy(layer)
    tensors = buffers.nf4_weight()
    buffers.hold_nf4_as_buffers()  # the same tensors, no copy
    assert buffers.weight is tensors.packed and buffers.weight_absmax2 is tensors.absmax2
    assert "weight" not in dict(buffers.named_parameters())
    assert "double_quant" in repr(layer) and "double_quant" in repr(buffers)
    want, got = buffers.state_dict(), layer.state_dict()
    assert sorted(got) == sorted(want)  # the parameter's entries come first, the buffers' last
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    x = torch.randn(5, 128)
    with autograd.cpu_path():
        assert torch.equal(layer(x), buffers(x))
        copied = copy.deepcopy(layer).to(torch.float64).half().float()  # adapter: rounded
        assert torch.equal(copied.weight, layer.weight)
        assert copied.weight.absmax2.dtype == torch.float32
        fresh = copy.deepcopy(layer)
        fresh.weight.packed.zero_()
        assert not torch.equal(fresh(x), buffers(x))
        fresh.load_state_dict(buffers.state_dict())  # buffer keys into the parameter form
        assert torch.equal(fresh(x), buffers(x))
        buffers.weight.zero_()
        buffers.load_state_dict(layer.state_dict())  # and back
        assert torch.equal(buffers(x), layer(x))
        buffers.hold_nf4_as_parameter()
        assert isinstance(buffers.weight, NF4Tensor) and torch.equal(buffers(x), layer(x))
        back = layer.nf4_weight().to_bnb()  # bitsandbytes interop unchanged
        assert torch.equal(NF4Weight.from_bnb(back, back.quant_state).dequantize(),
                           buffers.nf4_weight().dequantize())


def test_prepare_fsdp_refuses_rows_that_do_not_split():
    model = inject(tiny_llama(), "speclora", ["k_proj"], r=4, k=4, quantize="nf4")
    with pytest.raises(ValueError, match=r"k_proj: an NF4 base of 32 x 64 .* over 3 ranks"):
        prepare_fsdp(model, world_size=3)
    layers = adapter_layers(model).values()
    prepare_zero3(model)
    assert not any(isinstance(m.weight, NF4Tensor) or "weight" in m._parameters for m in layers)
    prepare_fsdp(model, world_size=2)  # back to parameters
    assert all(isinstance(m.weight, NF4Tensor) for m in layers)
