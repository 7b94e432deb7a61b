"""The op: ``y = x @ W.T + bias + ((x' @ D.T) * s) @ U.T``, fused.

- ``fused_adapter_linear``: the one entry point (``AdapterLinear`` calls it), validated here
  once; semantics are those of ``reference_adapter_linear`` (``naive.py``, plain PyTorch,
  the ground truth of every test);
- ``autograd``: the autograd Function and custom ops, dispatching to the Triton kernels or
  the CPU backend;
- ``plan`` (which kernels, why), ``tuning`` (configs, pruning), ``launch`` (launchers) and
  ``kernels/`` (the ``@triton.jit`` code);
The in-kernel Philox dropout mask, shared with the CPU backend, lives in
``speclora_kernels.dropout`` (``dropout_keep_mask`` rebuilds it).
"""
from __future__ import annotations

import torch

from ..dropout import dropout_keep_mask, dropout_seed
from ..quant import NF4Weight
from .autograd import AdapterLinearFunction, MixedAdapterFunction, run_forward
from .naive import fused_adapter_linear as reference_adapter_linear
from .validate import check_adapter_inputs


def fused_adapter_linear(x, weight, bias, down, scale, up, dropout_p=0.0, dropout_rows=None,
                         grad_rows=None, training=True, scale_index=None):
    """``x @ W.T + bias + ((x' @ D.T) * s) @ U.T``, differentiable, over any leading dims.

    Args:
        x: (..., in) input, float16 / bfloat16 / float32 (float64 runs in PyTorch).
        weight: (out, in) dense base weight in x's dtype (never copied), or a frozen
            ``NF4Weight`` (bitsandbytes' layout), decoded to x's dtype: tile by tile inside
            the kernels while one row tile covers M (decode, short prompts), else once per
            call into a transient dense copy, freed on return and never saved.
        bias: (out,) or None.
        down: (R, in) ``D``; up: (out, R) ``U``; any float dtype (e.g. float32 parameters):
            rounded to x's dtype as the kernels load them, gradients in their own dtype.
        scale: (R,) ``s``, float32 or x's dtype.
        dropout_p: LoRA dropout probability, active only when ``training``; it applies to the
            input of the first ``dropout_rows`` rows of D (default: all).
        grad_rows: only the first ``grad_rows`` rows of D / columns of U get gradient
            (default: all); the rest get zeros, with no work spent on them.
        scale_index: a mixed-adapter batch (int32 / int64, shaped ``(M,)`` or
            ``x.shape[:-1]``): ``scale`` is then a (tables x R) table and row i of x takes
            its per-rank scale from ``scale[scale_index[i]]`` (several adapters' factors
            stacked along R, each table row zero outside its adapter's ranks; a zero row
            gives the base alone). Same launches as without, one fused forward; no dropout.

    The dropout seed is drawn per call from the generator of x's device
    (``dropout_seed(x.device)``, a device tensor the kernels read: CUDA-graph replays draw
    new masks), so ``torch.manual_seed`` makes runs reproducible;
    ``dropout_keep_mask(seed, x.shape, p)`` regenerates the mask the kernels used.
    """
    nf4 = isinstance(weight, NF4Weight)
    dropout_rows, grad_rows = check_adapter_inputs(
        x, weight, bias, down, scale, up, dropout_p, dropout_rows, grad_rows,
        weight_shape=tuple(weight.shape) if nf4 else None, scale_index=scale_index)
    if not nf4 and weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype} (it is never copied), "
                        f"got {weight.dtype}")
    if scale.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"scale must be float32 or x's dtype {x.dtype}, got {scale.dtype}")
    # the kernels index the vectors densely (s_ptr + r): a strided s or bias would read wrong
    scale = scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    active = bool(training) and float(dropout_p) > 0 and dropout_rows > 0
    if scale_index is not None and active:
        raise ValueError(f"scale_index (a mixed-adapter batch) is for inference: dropout must "
                         f"be inactive (training=False or dropout_p=0), got dropout_p={dropout_p}")
    seed = dropout_seed(x.device) if active else None
    p, rows = (float(dropout_p), dropout_rows) if active else (0.0, 0)
    flat = x.dim() == 2  # a reshape costs microseconds of host time even when a no-op
    x2d = x if flat else x.reshape(-1, x.shape[-1])
    record = torch.is_grad_enabled() and (
        x.requires_grad or down.requires_grad or scale.requires_grad or up.requires_grad
        or (bias is not None and bias.requires_grad) or (not nf4 and weight.requires_grad))
    if scale_index is not None:
        index = scale_index.reshape(-1).contiguous()
        if record:
            y = MixedAdapterFunction.apply(x2d, weight, bias, down, scale, up, index, grad_rows)
        else:
            y = run_forward(x2d, weight, bias, down, scale, up, None, 0.0, 0, False, index)[0]
    elif record:
        y = AdapterLinearFunction.apply(x2d, weight, bias, down, scale, up, seed, p, rows,
                                        grad_rows)
    else:  # autograd.Function's bookkeeping costs more than a small layer's forward on CPU
        y = run_forward(x2d, weight, bias, down, scale, up, seed, p, rows, False)[0]
    return y if flat else y.reshape(*x.shape[:-1], weight.shape[0])


__all__ = ["fused_adapter_linear", "reference_adapter_linear", "AdapterLinearFunction",
           "dropout_keep_mask", "dropout_seed"]
