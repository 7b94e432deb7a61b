"""Autograd and ``torch.library`` registration of the fused adapter linear.

Two custom ops, opaque to ``torch.compile`` (so ``fullgraph=True`` traces through them):

- ``speclora_kernels::adapter_linear_fwd(x, W, bias, D, s, U, seed, p, rd, save_t) -> (y, t)``
- ``speclora_kernels::adapter_linear_bwd(dy, x, W, D, s, U, t, seed, p, rd, rg, needs...)``
  ``-> (dx, dD, ds, dU)``

The autograd Functions call them through the dispatcher only while torch.compile traces;
eagerly they call the same Python functions directly (``_eager``: custom-op dispatch costs
~40 µs a call on CPU). Each dispatches per call: CUDA tensors run the Triton kernels
(``fused_linear``); CPU tensors run the C++ backend (``speclora_kernels.cpu``, built on first use; its PyTorch
fallback when it cannot be built), except under ``TRITON_INTERPRET=1``, where they run the
Triton kernels in the interpreter; float64 always runs the PyTorch path. Every path draws
the same dropout mask (``dropout.py``), so a seed means the same thing everywhere.

An NF4 base has its own pair, ``adapter_linear_nf4_fwd`` / ``adapter_linear_nf4_bwd``: the
bitsandbytes tensors (packed codes, absmax, and absmax2, code2, offset with double quant)
and the block sizes replace ``W``. The kernels decode tiles in registers, the C++ backend
block by block; only the PyTorch fallback dequantizes the whole weight (to x's dtype, as
the kernels round their tiles).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import cpu as _cpu
from ..quant import NF4Weight

try:
    from . import fused_linear as _triton
except ImportError:  # no triton on this platform: the PyTorch path serves every call
    _triton = None

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _use_triton(x: Tensor, rank: int) -> bool:
    if _triton is None or x.dtype not in _TRITON_DTYPES or x.numel() == 0 or rank == 0:
        return False
    return x.is_cuda or _triton.INTERPRET


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


# ------------------------------------------------------------------ custom ops
# Without Triton, ``speclora_kernels.cpu`` serves the call: the C++ backend for CPU tensors
# it supports, the PyTorch path (``cpu.fallback``) for the rest (no compiler, float64, other
# devices); both regenerate the kernels' keep-mask from the seed.
def _fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], down: Tensor,
         scale: Tensor, up: Tensor, seed: Optional[Tensor], dropout_p: float,
         drop_rows: int, save_t: bool) -> tuple[Tensor, Tensor]:
    """(y, t) for 2-D x; dropout is active iff ``seed`` is given (and drop_rows > 0)."""
    if _use_triton(x, down.shape[0]):
        return _triton.adapter_forward(x, weight, bias, down, scale, up,
                                       int(seed) if seed is not None else 0,
                                       dropout_p if seed is not None else 0.0,
                                       drop_rows if seed is not None else 0, save_t)
    return _cpu.forward(x, weight, bias, down, scale, up, seed, dropout_p, drop_rows, save_t)


adapter_linear_fwd = torch.library.custom_op("speclora_kernels::adapter_linear_fwd", _fwd,
                                             mutates_args=())


@adapter_linear_fwd.register_fake
def _(x, weight, bias, down, scale, up, seed, dropout_p, drop_rows, save_t):
    rows = x.shape[0] if save_t else 0
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((rows, down.shape[0]), dtype=_acc_dtype(x)))


def _bwd(dy: Tensor, x: Tensor, weight: Tensor, down: Tensor, scale: Tensor,
         up: Tensor, t: Tensor, seed: Optional[Tensor], dropout_p: float,
         drop_rows: int, grad_rows: int, need_dx: bool, need_ddown: bool,
         need_dscale: bool, need_dup: bool
         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dD, ds, dU); a gradient not asked for is an empty tensor and costs nothing."""
    if _use_triton(x, down.shape[0]):
        return _triton.adapter_backward(dy, x, weight, down, scale, up, t,
                                        int(seed) if seed is not None else 0,
                                        dropout_p if seed is not None else 0.0,
                                        drop_rows if seed is not None else 0, grad_rows,
                                        need_dx, need_ddown, need_dscale, need_dup)
    return _cpu.backward(dy, x, weight, down, scale, up, t, seed, dropout_p, drop_rows,
                         grad_rows, need_dx, need_ddown, need_dscale, need_dup)


adapter_linear_bwd = torch.library.custom_op("speclora_kernels::adapter_linear_bwd", _bwd,
                                             mutates_args=())


@adapter_linear_bwd.register_fake
def _(dy, x, weight, down, scale, up, t, seed, dropout_p, drop_rows, grad_rows, need_dx,
      need_ddown, need_dscale, need_dup):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(down) if need_ddown else x.new_empty(0),
            torch.empty_like(scale) if need_dscale else x.new_empty(0),
            torch.empty_like(up) if need_dup else x.new_empty(0))


def _eager(op, impl):
    """The custom op while torch.compile traces (opaque to it, so fullgraph works); the
    plain function in eager mode, which skips the custom-op dispatch (~40 µs per call on
    CPU, measured: more than a small layer's whole forward)."""
    return op if torch.compiler.is_compiling() else impl


class FusedAdapterLinearFunction(torch.autograd.Function):
    r"""``y = x @ W.T + b + ((x' @ D.T) * s) @ U.T`` on 2-D ``x`` (M, K).

    ``x'`` equals ``x`` on the first ``rd`` rows of D (``keep / (1 - p) * x``; keep is
    regenerated from the seed, never stored) and on the others the clean ``x``. With
    ``t = x' @ D.T`` (M, R; saved, fp32), ``g = dy @ U`` (M, R), ``gs = g * s``:

    .. math::

        dx &= dy\,W + \tfrac{keep}{1-p} \odot (gs_{:,<rd} D_{<rd}) + gs_{:,\ge rd} D_{\ge rd} \\
        dD_{r} &= gs_{:, r}^T\, x'_r  \quad (r < rg;\ \text{rows} \ge rg \text{ get } 0) \\
        dU_{:, r} &= dy^T\, (t_{:, r}\, s_r)  \quad (r < rg) \\
        ds &= \textstyle\sum_m g \odot t \\
        db &= \textstyle\sum_m dy, \qquad dW = dy^T x \ \text{(if W is trainable; plain matmul)}

    Only the gradients in ``ctx.needs_input_grad`` are computed. Saved: x, t, and
    references to W, D, s, U (no copies).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, scale, up, seed, dropout_p, drop_rows, grad_rows):
        save_t = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        fwd = _eager(adapter_linear_fwd, _fwd)
        y, t = fwd(x, weight, bias, down, scale, up, seed, dropout_p, drop_rows, save_t)
        ctx.save_for_backward(x, weight, down, scale, up, t, seed)
        ctx.dropout_p, ctx.drop_rows, ctx.grad_rows = dropout_p, drop_rows, grad_rows
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, down, scale, up, t, seed = ctx.saved_tensors
        need_x, need_w, need_b, need_d, need_s, need_u = ctx.needs_input_grad[:6]
        dx, d_down, d_scale, d_up = _eager(adapter_linear_bwd, _bwd)(
            dy, x, weight, down, scale, up, t, seed, ctx.dropout_p, ctx.drop_rows,
            ctx.grad_rows, need_x, need_d, need_s, need_u)
        acc = _acc_dtype(x)
        d_weight = (dy.T.to(acc) @ x.to(acc)).to(weight.dtype) if need_w else None
        d_bias = dy.sum(0, dtype=acc).to(ctx.bias_dtype) if need_b else None
        return (dx if need_x else None, d_weight, d_bias, d_down if need_d else None,
                d_scale if need_s else None, d_up if need_u else None, None, None, None, None)


# ------------------------------------------------------------------ NF4 base
def _nf4_base(packed, absmax, absmax2, code2, offset, shape, blocksize, nested_blocksize):
    return _triton.NF4Base(packed, absmax, absmax2, code2, offset, tuple(shape), blocksize,
                           nested_blocksize)


def _nf4_weight(packed, absmax, absmax2, code2, offset, shape, blocksize, nested_blocksize, dtype):
    """The CPU path's base: decoded as bitsandbytes does, rounded to ``dtype`` (x's, as the
    kernels round their tiles); block by block in C++, whole in the PyTorch fallback."""
    dtype = torch.float32 if dtype == torch.float64 else dtype  # the decode is fp32 anyway
    return NF4Weight(packed, absmax, shape, dtype, blocksize, absmax2=absmax2, code2=code2,
                     offset=offset, nested_blocksize=nested_blocksize)


def _nf4_fwd(x: Tensor, packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor],
             code2: Optional[Tensor], offset: Optional[Tensor], blocksize: int,
             nested_blocksize: int, bias: Optional[Tensor], down: Tensor,
             scale: Tensor, up: Tensor, seed: Optional[Tensor], dropout_p: float,
             drop_rows: int, save_t: bool) -> tuple[Tensor, Tensor]:
    """``adapter_linear_fwd`` with an NF4 base of shape (up.shape[0], x.shape[1])."""
    shape = (up.shape[0], x.shape[1])
    nf4 = (packed, absmax, absmax2, code2, offset, shape, blocksize, nested_blocksize)
    if _use_triton(x, down.shape[0]):
        return _triton.adapter_forward(x, _nf4_base(*nf4), bias, down, scale, up,
                                       int(seed) if seed is not None else 0,
                                       dropout_p if seed is not None else 0.0,
                                       drop_rows if seed is not None else 0, save_t)
    return _cpu.forward(x, _nf4_weight(*nf4, x.dtype), bias, down, scale, up, seed, dropout_p,
                        drop_rows, save_t)


adapter_linear_nf4_fwd = torch.library.custom_op("speclora_kernels::adapter_linear_nf4_fwd",
                                                 _nf4_fwd, mutates_args=())


@adapter_linear_nf4_fwd.register_fake
def _(x, packed, absmax, absmax2, code2, offset, blocksize, nested_blocksize, bias, down, scale,
      up, seed, dropout_p, drop_rows, save_t):
    rows = x.shape[0] if save_t else 0
    return (x.new_empty((x.shape[0], up.shape[0])),
            x.new_empty((rows, down.shape[0]), dtype=_acc_dtype(x)))


def _nf4_bwd(dy: Tensor, x: Tensor, packed: Tensor, absmax: Tensor,
             absmax2: Optional[Tensor], code2: Optional[Tensor],
             offset: Optional[Tensor], blocksize: int, nested_blocksize: int,
             down: Tensor, scale: Tensor, up: Tensor, t: Tensor,
             seed: Optional[Tensor], dropout_p: float, drop_rows: int,
             grad_rows: int, need_dx: bool, need_ddown: bool, need_dscale: bool,
             need_dup: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``adapter_linear_bwd`` with an NF4 base."""
    shape = (up.shape[0], x.shape[1])
    nf4 = (packed, absmax, absmax2, code2, offset, shape, blocksize, nested_blocksize)
    if _use_triton(x, down.shape[0]):
        return _triton.adapter_backward(dy, x, _nf4_base(*nf4), down, scale, up, t,
                                        int(seed) if seed is not None else 0,
                                        dropout_p if seed is not None else 0.0,
                                        drop_rows if seed is not None else 0, grad_rows,
                                        need_dx, need_ddown, need_dscale, need_dup)
    return _cpu.backward(dy, x, _nf4_weight(*nf4, x.dtype), down, scale, up, t, seed,
                         dropout_p, drop_rows, grad_rows, need_dx, need_ddown, need_dscale,
                         need_dup)


adapter_linear_nf4_bwd = torch.library.custom_op("speclora_kernels::adapter_linear_nf4_bwd",
                                                 _nf4_bwd, mutates_args=())


@adapter_linear_nf4_bwd.register_fake
def _(dy, x, packed, absmax, absmax2, code2, offset, blocksize, nested_blocksize, down, scale, up,
      t, seed, dropout_p, drop_rows, grad_rows, need_dx, need_ddown, need_dscale, need_dup):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(down) if need_ddown else x.new_empty(0),
            torch.empty_like(scale) if need_dscale else x.new_empty(0),
            torch.empty_like(up) if need_dup else x.new_empty(0))


class NF4AdapterLinearFunction(torch.autograd.Function):
    """:class:`FusedAdapterLinearFunction` on a frozen NF4 base: the same gradients (none
    for the base). Saved: x, t, and references to the NF4 tensors, D, s, U; the dense
    weight is never formed (the kernels decode it again, tile by tile, for dx)."""

    @staticmethod
    def forward(ctx, x, packed, absmax, absmax2, code2, offset, blocksize, nested_blocksize,
                bias, down, scale, up, seed, dropout_p, drop_rows, grad_rows):
        save_t = ctx.needs_input_grad[10] or ctx.needs_input_grad[11]
        fwd = _eager(adapter_linear_nf4_fwd, _nf4_fwd)
        y, t = fwd(x, packed, absmax, absmax2, code2, offset, blocksize, nested_blocksize, bias,
                   down, scale, up, seed, dropout_p, drop_rows, save_t)
        ctx.save_for_backward(x, packed, absmax, absmax2, code2, offset, down, scale, up, t,
                              seed)
        ctx.blocks = (blocksize, nested_blocksize)
        ctx.dropout_p, ctx.drop_rows, ctx.grad_rows = dropout_p, drop_rows, grad_rows
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, packed, absmax, absmax2, code2, offset, down, scale, up, t, seed = ctx.saved_tensors
        need_x, need_b, need_d, need_s, need_u = (ctx.needs_input_grad[i]
                                                  for i in (0, 8, 9, 10, 11))
        dx, d_down, d_scale, d_up = _eager(adapter_linear_nf4_bwd, _nf4_bwd)(
            dy, x, packed, absmax, absmax2, code2, offset, *ctx.blocks, down, scale, up, t, seed,
            ctx.dropout_p, ctx.drop_rows, ctx.grad_rows, need_x, need_d, need_s, need_u)
        d_bias = dy.sum(0, dtype=_acc_dtype(x)).to(ctx.bias_dtype) if need_b else None
        return (dx if need_x else None, None, None, None, None, None, None, None, d_bias,
                d_down if need_d else None, d_scale if need_s else None,
                d_up if need_u else None, None, None, None, None)


# ------------------------------------------------------------------ no gradient
def inference_forward(x, weight, bias, down, scale, up, seed, dropout_p, drop_rows) -> Tensor:
    """y alone, recorded for no gradient: what the public op runs when nothing needs one
    (autograd.Function's bookkeeping costs more than a small layer's forward on CPU).
    ``weight``: dense, or an ``NF4Weight``."""
    if isinstance(weight, NF4Weight):
        fwd = _eager(adapter_linear_nf4_fwd, _nf4_fwd)
        return fwd(x, weight.packed, weight.absmax, weight.absmax2, weight.code2, weight.offset,
                   weight.blocksize, weight.nested_blocksize, bias, down, scale, up, seed,
                   dropout_p, drop_rows, False)[0]
    fwd = _eager(adapter_linear_fwd, _fwd)
    return fwd(x, weight, bias, down, scale, up, seed, dropout_p, drop_rows, False)[0]
