"""The public op: ``y = x @ W.T + bias + ((x' @ D.T) * s) @ U.T`` with fused Triton kernels.

``fused_adapter_linear`` is the one entry point (``AdapterLinear`` calls it). Semantics are
those of ``speclora_kernels.reference.fused_adapter_linear``; the dropout mask is drawn
in-kernel from a seed (see ``dropout_keep_mask`` to regenerate it).
"""
from __future__ import annotations

import torch

from .._validate import check_adapter_inputs
from ..quant import NF4Weight
from .autograd import FusedAdapterLinearFunction, NF4AdapterLinearFunction, inference_forward
from .dropout import dropout_keep_mask, dropout_seed


def fused_adapter_linear(x, weight, bias, down, scale, up, dropout_p=0.0, dropout_rows=None,
                         grad_rows=None, training=True):
    """``x @ W.T + bias + ((x' @ D.T) * s) @ U.T``, differentiable, over any leading dims.

    Args:
        x: (..., in) input, float16 / bfloat16 / float32 (float64 runs in PyTorch).
        weight: (out, in) dense base weight in x's dtype (never copied), or a frozen
            ``NF4Weight`` (bitsandbytes' layout), decoded tile by tile to x's dtype inside
            the kernels, never materialised (the CPU fallback dequantizes).
        bias: (out,) or None.
        down: (R, in) ``D``; up: (out, R) ``U``; cast to x's dtype if they differ.
        scale: (R,) ``s``, float32 or x's dtype.
        dropout_p: LoRA dropout probability, active only when ``training``; it applies to the
            input of the first ``dropout_rows`` rows of D (default: all).
        grad_rows: only the first ``grad_rows`` rows of D / columns of U get gradient
            (default: all); the rest get zeros, with no work spent on them.

    The dropout seed is drawn from torch's CPU generator (``dropout_seed``), so
    ``torch.manual_seed`` makes runs reproducible; ``dropout_keep_mask(seed, x.shape, p)``
    regenerates the mask the kernels used.
    """
    nf4 = isinstance(weight, NF4Weight)
    rd, rg = check_adapter_inputs(x, weight, bias, down, scale, up, dropout_p, dropout_rows,
                                  grad_rows, weight_shape=tuple(weight.shape) if nf4 else None)
    if not nf4 and weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype} (it is never copied), "
                        f"got {weight.dtype}")
    if scale.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"scale must be float32 or x's dtype {x.dtype}, got {scale.dtype}")
    down, up = down.to(x.dtype), up.to(x.dtype)
    # the kernels index the vectors densely (s_ptr + r): a strided s or bias would read wrong
    scale = scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    active = bool(training) and float(dropout_p) > 0 and rd > 0
    seed = dropout_seed() if active else None
    x2d = x.reshape(-1, x.shape[-1])
    drop = (float(dropout_p) if active else 0.0, rd if active else 0, rg)
    record = torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in (x, weight, bias, down, scale, up))
    if not record:
        y = inference_forward(x2d, weight, bias, down, scale, up, seed, *drop[:2])
    elif nf4:
        y = NF4AdapterLinearFunction.apply(x2d, weight.packed, weight.absmax, weight.absmax2,
                                           weight.code2, weight.offset, weight.blocksize,
                                           weight.nested_blocksize, bias, down, scale, up, seed,
                                           *drop)
    else:
        y = FusedAdapterLinearFunction.apply(x2d, weight, bias, down, scale, up, seed, *drop)
    return y.reshape(*x.shape[:-1], weight.shape[0])


__all__ = ["fused_adapter_linear", "FusedAdapterLinearFunction", "NF4AdapterLinearFunction",
           "dropout_keep_mask", "dropout_seed"]
