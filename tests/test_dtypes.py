"""Every method after the module casts a user makes (``.to(bfloat16)``, ``.to(float16)``,
``.half()``): forward and backward against float64 recomputed from the cast layer's own
parameters. The Cayley rotation (``spectral_rotational``) solves in float32 whatever the
parameter dtype (linear solvers have no 16-bit kernels)."""
import copy

import pytest
import torch

from speclora_kernels import METHODS, AdapterLinear

from conftest import rel_err

pytestmark = pytest.mark.usefixtures("torch_cpu_path")
CASTS = {"to-bf16": lambda m: m.to(torch.bfloat16), "to-fp16": lambda m: m.to(torch.float16),
         "half": lambda m: m.half()}
OPTIONS = {"speclora": {"k": 3}}


def layer_for(method, device):
    torch.manual_seed(sorted(METHODS).index(method))
    linear = torch.nn.Linear(48, 40).to(device)
    layer = AdapterLinear.from_linear(linear, method, r=4, **OPTIONS.get(method, {}))
    with torch.no_grad():  # away from init, so every factor matters
        for p in layer.adapter.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def float64_forward(layer, x):
    """y from the layer's formula in float64: base + U diag(s) D from its own factors."""
    down, scale, up = layer.factors()
    w = layer.weight.double() + (up.double() * scale.double()) @ down.double()
    return x.double() @ w.T + layer.bias.double()


@pytest.mark.parametrize("cast", list(CASTS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_after_cast(method, cast, device):
    layer = CASTS[cast](layer_for(method, device))
    dtype = layer.weight.dtype
    assert all(p.dtype == dtype for p in layer.adapter.parameters())
    x = torch.randn(5, 48, device=device).to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    dy = torch.randn_like(y)
    params = [p for p in layer.adapter.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x, *params], dy)

    ref = copy.deepcopy(layer).double()
    x64 = x.detach().double().requires_grad_()
    y64 = float64_forward(ref, x64)
    want = torch.autograd.grad(y64, [x64, *[p for p in ref.adapter.parameters()
                                            if p.requires_grad]], dy.double())
    tol = 3e-2  # 16-bit activations, parameters and factors
    assert rel_err(y, y64) < tol
    for got, w in zip(grads, want):
        assert got.dtype == dtype
        assert rel_err(got, w) < tol
