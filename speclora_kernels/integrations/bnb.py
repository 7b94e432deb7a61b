"""Quantize a model's linear layers to bitsandbytes NF4 ``Linear4bit`` (QLoRA's base).

bitsandbytes quantizes a ``Params4bit`` only when it is moved to a device; this builds the
quantized parameter directly from :meth:`NF4Weight.quantize` (bitsandbytes' own quantizer
when importable), so it works the same on CPU and GPU.
"""
from __future__ import annotations

import torch
from torch import nn

from .inject import _set_submodule, find_targets, unwrap


@torch.no_grad()
def quantize_nf4(model: nn.Module, target_modules="all-linear", *, exclude_modules=None,
                 blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the target ``nn.Linear`` layers of ``model`` (PEFT-style names, default every
    linear layer but the output embeddings) by frozen ``bitsandbytes.nn.Linear4bit`` NF4
    layers, in place; returns ``model``. ``compute_dtype`` defaults to each weight's dtype."""
    import bitsandbytes as bnb

    from ..quant import NF4Weight

    bare = unwrap(model)
    for name in find_targets(bare, target_modules, exclude_modules):
        linear = bare.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise TypeError(f"{name}: only plain nn.Linear layers can be quantized, got "
                            f"{type(linear).__name__}")
        weight = linear.weight.detach()
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                                  bias=linear.bias is not None,
                                  compute_dtype=compute_dtype or weight.dtype,
                                  quant_type="nf4", device="meta")
        layer.weight = NF4Weight.quantize(weight, blocksize=blocksize,
                                          double_quant=double_quant).to_bnb()
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        layer.train(linear.training)
        _set_submodule(bare, name, layer)
    return model
