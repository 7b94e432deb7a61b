"""The C++ backend's semantics in plain PyTorch: what runs when the library is not built.

The one PyTorch implementation of the op's CPU path (``ops.autograd`` calls it with the
keep-mask regenerated from the seed). Accepts an ``NF4Weight`` base, dequantized whole here;
only the kernels avoid that.
"""
from __future__ import annotations

import torch

from ..quant.nf4 import NF4Weight


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _dense(weight, x: torch.Tensor, nf4_dtype) -> torch.Tensor:
    """The base in x's accumulation dtype; NF4 decoded and rounded to ``nf4_dtype`` (None:
    the weight's own dtype) first."""
    if isinstance(weight, NF4Weight):
        weight = weight.dequantize(nf4_dtype)
    return weight.to(_acc(x))


def forward(x, weight, bias, down, scale, up, keep, dropout_p, dropout_rows, save_t,
            nf4_dtype=None, scale_index=None):
    """``(y, t)``; dropout on the first ``dropout_rows`` rows of ``down`` iff ``keep`` is given.
    ``scale_index`` (M,): a mixed-adapter batch, ``scale`` a table and row i scaled by its
    row ``scale_index[i]`` (the C++ backend has no such path: the op sends these here)."""
    acc = _acc(x)
    xa, d = x.to(acc), down.to(acc)
    t = xa @ d.T
    if keep is not None and dropout_rows > 0:
        t[:, :dropout_rows] = (xa * keep) @ d[:dropout_rows].T / (1.0 - dropout_p)
    s = scale.to(acc) if scale_index is None else scale.to(acc)[scale_index]
    y = xa @ _dense(weight, x, nf4_dtype).T + (t * s) @ up.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), (t if save_t else t.new_empty((0, t.shape[1])))


def backward(dy, x, weight, down, scale, up, t, keep, dropout_p, dropout_rows, grad_rows,
             need_dx, need_ddown, need_dscale, need_dup, nf4_dtype=None):
    """``(dx, d_down, d_scale, d_up)``, empty tensors for the gradients not asked for."""
    acc = _acc(x)
    dya, s, d = dy.to(acc), scale.to(acc), down.to(acc)
    if keep is None:
        dropout_rows = 0
    g = dya @ up.to(acc) if (need_dx or need_ddown or need_dscale) else None
    # distinct empties for gradients not asked for: a custom op's outputs may not alias
    dx, d_down, d_scale, d_up = (x.new_empty(0) for _ in range(4))
    if need_dx:
        gs = g * s
        dx = dya @ _dense(weight, x, nf4_dtype) + gs[:, dropout_rows:] @ d[dropout_rows:]
        if dropout_rows:
            dx = dx + keep * (gs[:, :dropout_rows] @ d[:dropout_rows]) / (1.0 - dropout_p)
        dx = dx.to(x.dtype)
    if need_ddown:
        xa = x.to(acc)
        gs = g[:, :grad_rows] * s[:grad_rows]
        d_down = torch.zeros_like(down)
        d_down[:grad_rows] = (gs.T @ xa).to(down.dtype)
        cut = min(dropout_rows, grad_rows)
        if cut:
            d_down[:cut] = (gs[:, :cut].T @ (xa * keep) / (1.0 - dropout_p)).to(down.dtype)
    if need_dscale:
        d_scale = (g * t.to(acc)).sum(0).to(scale.dtype)
    if need_dup:
        d_up = torch.zeros_like(up)
        d_up[:, :grad_rows] = (dya.T @ (t[:, :grad_rows].to(acc) * s[:grad_rows])).to(up.dtype)
    return dx, d_down, d_scale, d_up
