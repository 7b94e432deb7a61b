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


def _dense(weight, acc: torch.dtype) -> torch.Tensor:
    return (weight.dequantize() if isinstance(weight, NF4Weight) else weight).to(acc)


def forward(x, weight, bias, down, scale, up, keep, dropout_p, drop_rows, save_t):
    """``(y, t)``; dropout on the first ``drop_rows`` rows of ``down`` iff ``keep`` is given."""
    acc = _acc(x)
    xa, d = x.to(acc), down.to(acc)
    t = xa @ d.T
    if keep is not None and drop_rows > 0:
        t[:, :drop_rows] = (xa * keep) @ d[:drop_rows].T / (1.0 - dropout_p)
    y = xa @ _dense(weight, acc).T + (t * scale.to(acc)) @ up.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), (t if save_t else t.new_empty((0, t.shape[1])))


def backward(dy, x, weight, down, scale, up, t, keep, dropout_p, drop_rows, grad_rows,
             need_dx, need_ddown, need_dscale, need_dup):
    """``(dx, d_down, d_scale, d_up)``, empty tensors for the gradients not asked for."""
    acc = _acc(x)
    dya, s, d = dy.to(acc), scale.to(acc), down.to(acc)
    rd, rg = (drop_rows if keep is not None else 0), grad_rows
    g = dya @ up.to(acc) if (need_dx or need_ddown or need_dscale) else None
    # distinct empties for gradients not asked for: a custom op's outputs may not alias
    dx, d_down, d_scale, d_up = (x.new_empty(0) for _ in range(4))
    if need_dx:
        gs = g * s
        dx = dya @ _dense(weight, acc) + gs[:, rd:] @ d[rd:]
        if rd:
            dx = dx + keep * (gs[:, :rd] @ d[:rd]) / (1.0 - dropout_p)
        dx = dx.to(x.dtype)
    if need_ddown:
        xa = x.to(acc)
        gs = g[:, :rg] * s[:rg]
        d_down = torch.zeros_like(down)
        d_down[:rg] = (gs.T @ xa).to(down.dtype)
        cut = min(rd, rg)
        if cut:
            d_down[:cut] = (gs[:, :cut].T @ (xa * keep) / (1.0 - dropout_p)).to(down.dtype)
    if need_dscale:
        d_scale = (g * t.to(acc)).sum(0).to(scale.dtype)
    if need_dup:
        d_up = torch.zeros_like(up)
        d_up[:, :rg] = (dya.T @ (t[:, :rg].to(acc) * s[:rg])).to(up.dtype)
    return dx, d_down, d_scale, d_up
