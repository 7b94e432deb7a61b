"""Autograd and ``torch.library`` registration of the fused adapter linear.

One autograd Function and one pair of custom ops serve a dense base and an NF4 base. The
custom ops, opaque to ``torch.compile`` (so ``fullgraph=True`` traces through them), take the
base as tensors: ``weight`` (dense W, or the packed NF4 codes) plus the NF4 scales and
sizes when quantized (``nf4 = [blocksize, nested_blocksize, out_features]``, empty when
dense):

- ``speclora_kernels::adapter_linear_fwd(x, weight, absmax, absmax2, code2, offset, nf4,
  bias, D, s, U, seed, p, dropout_rows, save_t) -> (y, t)``
- ``speclora_kernels::adapter_linear_bwd(dy, x, weight, absmax, absmax2, code2, offset, nf4,
  D, s, U, t, seed, p, dropout_rows, grad_rows, needs...) -> (dx, dD, ds, dU)``

Eagerly the Function calls the implementations directly with the base as it is (a tensor
or the caller's ``NF4Weight``): custom-op dispatch costs ~40 µs a call on CPU, and nothing
needs rebuilding. Only while torch.compile traces do the calls go through the custom ops
(``_eager``). Each call dispatches on its tensors: CUDA tensors run the Triton kernels
(``launch``); CPU tensors run the C++ backend (``speclora_kernels.cpu``; its PyTorch fallback
when it cannot be built), except under ``TRITON_INTERPRET=1``, where they run the Triton
kernels in the interpreter (``cpu_path()`` sends them to the CPU backend anyway); float64
always runs the PyTorch path. Every path draws the same dropout mask (``dropout.py``).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .. import cpu
from ..cpu import fallback
from ..quant import NF4Weight, decode_dtype

try:
    from . import launch, tuning
    from .tuning import INTERPRET
except ImportError:  # no triton on this platform: the PyTorch path serves every call
    launch, tuning, INTERPRET = None, None, False

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_cpu_path = False


@contextlib.contextmanager
def cpu_path():
    """CPU tensors run the CPU backend (C++, or its PyTorch fallback) even under
    ``TRITON_INTERPRET=1``: model-level tests run at PyTorch speed, while the kernels
    themselves are proven in the op tests."""
    global _cpu_path
    previous, _cpu_path = _cpu_path, True
    try:
        yield
    finally:
        _cpu_path = previous


def _use_triton(x: Tensor, rank: int) -> bool:
    """CUDA tensors run the kernels, CPU tensors too in the interpreter; in a dry run
    (``tuning.record_launches(dry_run=True)``) tensors of any device plan them."""
    if launch is None or x.dtype not in _TRITON_DTYPES or x.numel() == 0 or rank == 0:
        return False
    return x.is_cuda or (INTERPRET and not _cpu_path) or tuning.dry_running()


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


# ------------------------------------------------------------------ implementations
def forward_impl(x: Tensor, weight, bias: Optional[Tensor], down: Tensor, scale: Tensor,
                 up: Tensor, seed: Optional[Tensor], dropout_p: float, dropout_rows: int,
                 save_t: bool, scale_index: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(y, t) for 2-D x and a dense or ``NF4Weight`` base; D and U in any float dtype
    (rounded to x's); dropout is active iff ``seed`` is given (and dropout_rows > 0).
    ``scale_index`` (M,): a mixed-adapter batch (``scale`` a table; no dropout): the
    kernels, else the PyTorch fallback (the C++ backend has no mixed path)."""
    if _use_triton(x, down.shape[0]):
        active = seed is not None
        return launch.adapter_forward(x, weight, bias, down, scale, up, seed,
                                      dropout_p if active else 0.0,
                                      dropout_rows if active else 0, save_t, scale_index)
    if scale_index is not None:
        return fallback.forward(x, weight, bias, down.to(x.dtype), scale, up.to(x.dtype), None,
                                0.0, 0, save_t, decode_dtype(x.dtype), scale_index)
    return cpu.forward(x, weight, bias, down.to(x.dtype), scale, up.to(x.dtype), seed,
                       dropout_p, dropout_rows, save_t)


def backward_impl(dy: Tensor, x: Tensor, weight, down: Tensor, scale: Tensor, up: Tensor,
                  t: Tensor, seed: Optional[Tensor], dropout_p: float, dropout_rows: int,
                  grad_rows: int, need_dx: bool, need_ddown: bool, need_dscale: bool,
                  need_dup: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dD, ds, dU); a gradient not asked for is an empty tensor and costs nothing."""
    if _use_triton(x, down.shape[0]):
        active = seed is not None
        return launch.adapter_backward(dy, x, weight, down, scale, up, t, seed,
                                       dropout_p if active else 0.0,
                                       dropout_rows if active else 0, grad_rows,
                                       need_dx, need_ddown, need_dscale, need_dup)
    dx, d_down, d_scale, d_up = cpu.backward(
        dy, x, weight, down.to(x.dtype), scale, up.to(x.dtype), t, seed, dropout_p,
        dropout_rows, grad_rows, need_dx, need_ddown, need_dscale, need_dup)
    # the kernels' gradients come in each factor's own dtype: so do these
    return dx, d_down.to(down.dtype), d_scale, d_up.to(up.dtype)


# ------------------------------------------------------------------ custom ops
def _base_tensors(weight) -> tuple:
    """The custom ops' base arguments: (weight, absmax, absmax2, code2, offset, nf4)."""
    if isinstance(weight, NF4Weight):
        return (weight.packed, weight.absmax, weight.absmax2, weight.code2, weight.offset,
                [weight.blocksize, weight.nested_blocksize, weight.shape[0]])
    return weight, None, None, None, None, []


def _base(weight: Tensor, absmax, absmax2, code2, offset, nf4: list[int], in_features: int,
          dtype: torch.dtype):
    """The base a custom op's arguments describe (an ``NF4Weight`` rebuilt when quantized:
    only while torch.compile traces, eager calls pass the caller's own)."""
    if not nf4:
        return weight
    blocksize, nested, out_features = nf4
    return NF4Weight(weight, absmax, (out_features, in_features), decode_dtype(dtype),
                     blocksize, absmax2=absmax2, code2=code2, offset=offset,
                     nested_blocksize=nested)


def _fwd_op(x: Tensor, weight: Tensor, absmax: Optional[Tensor], absmax2: Optional[Tensor],
            code2: Optional[Tensor], offset: Optional[Tensor], nf4: list[int],
            bias: Optional[Tensor], down: Tensor, scale: Tensor, up: Tensor,
            seed: Optional[Tensor], dropout_p: float, dropout_rows: int,
            save_t: bool, scale_index: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    base = _base(weight, absmax, absmax2, code2, offset, nf4, x.shape[1], x.dtype)
    return forward_impl(x, base, bias, down, scale, up, seed, dropout_p, dropout_rows, save_t,
                        scale_index)


adapter_linear_fwd = torch.library.custom_op("speclora_kernels::adapter_linear_fwd", _fwd_op,
                                             mutates_args=())


@adapter_linear_fwd.register_fake
def _(x, weight, absmax, absmax2, code2, offset, nf4, bias, down, scale, up, seed, dropout_p,
      dropout_rows, save_t, scale_index=None):
    rows = x.shape[0] if save_t else 0
    out_features = nf4[2] if nf4 else weight.shape[0]
    return (x.new_empty((x.shape[0], out_features)),
            x.new_empty((rows, down.shape[0]), dtype=_acc_dtype(x)))


def _bwd_op(dy: Tensor, x: Tensor, weight: Tensor, absmax: Optional[Tensor],
            absmax2: Optional[Tensor], code2: Optional[Tensor], offset: Optional[Tensor],
            nf4: list[int], down: Tensor, scale: Tensor, up: Tensor, t: Tensor,
            seed: Optional[Tensor], dropout_p: float, dropout_rows: int, grad_rows: int,
            need_dx: bool, need_ddown: bool, need_dscale: bool,
            need_dup: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    base = _base(weight, absmax, absmax2, code2, offset, nf4, x.shape[1], x.dtype)
    return backward_impl(dy, x, base, down, scale, up, t, seed, dropout_p, dropout_rows,
                         grad_rows, need_dx, need_ddown, need_dscale, need_dup)


adapter_linear_bwd = torch.library.custom_op("speclora_kernels::adapter_linear_bwd", _bwd_op,
                                             mutates_args=())


@adapter_linear_bwd.register_fake
def _(dy, x, weight, absmax, absmax2, code2, offset, nf4, down, scale, up, t, seed, dropout_p,
      dropout_rows, grad_rows, need_dx, need_ddown, need_dscale, need_dup):
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(down) if need_ddown else x.new_empty(0),
            torch.empty_like(scale) if need_dscale else x.new_empty(0),
            torch.empty_like(up) if need_dup else x.new_empty(0))


def run_forward(x, weight, bias, down, scale, up, seed, dropout_p, dropout_rows, save_t,
                scale_index=None):
    """``forward_impl``, through the custom op while torch.compile traces (opaque to it, so
    fullgraph works), directly in eager mode (skips the custom-op dispatch, ~40 µs per call
    on CPU, measured: more than a small layer's whole forward)."""
    if torch.compiler.is_compiling():
        return adapter_linear_fwd(x, *_base_tensors(weight), bias, down, scale, up, seed,
                                  dropout_p, dropout_rows, save_t, scale_index)
    return forward_impl(x, weight, bias, down, scale, up, seed, dropout_p, dropout_rows,
                        save_t, scale_index)


def run_backward(dy, x, weight, down, scale, up, t, seed, dropout_p, dropout_rows, grad_rows,
                 need_dx, need_ddown, need_dscale, need_dup):
    """``backward_impl``, through the custom op only while torch.compile traces."""
    args = (down, scale, up, t, seed, dropout_p, dropout_rows, grad_rows, need_dx,
            need_ddown, need_dscale, need_dup)
    if torch.compiler.is_compiling():
        return adapter_linear_bwd(dy, x, *_base_tensors(weight), *args)
    return backward_impl(dy, x, weight, *args)


# ------------------------------------------------------------------ autograd
def _no_autocast(x: Tensor):
    """The op computes in its inputs' dtypes: a backward run inside ``torch.autocast`` (or a
    direct call under it) must not let autocast recast the matmuls of the CPU backend."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


_INPUTS = ("x", "weight", "bias", "down", "scale", "up", "seed", "dropout_p", "dropout_rows",
           "grad_rows")


class AdapterLinearFunction(torch.autograd.Function):
    r"""``y = x @ W.T + b + ((x' @ D.T) * s) @ U.T`` on 2-D ``x`` (M, K); ``W`` a dense tensor
    or a frozen ``NF4Weight``.

    ``x'`` equals ``x`` on the first ``rd = dropout_rows`` rows of D (``keep / (1 - p) * x``;
    keep is regenerated from the seed, never stored) and on the others the clean ``x``.
    With ``t = x' @ D.T`` (M, R; saved, fp32), ``g = dy @ U`` (M, R), ``gs = g * s`` and
    ``rg = grad_rows``:

    .. math::

        dx &= dy\,W + \tfrac{keep}{1-p} \odot (gs_{:,<rd} D_{<rd}) + gs_{:,\ge rd} D_{\ge rd} \\
        dD_{r} &= gs_{:, r}^T\, x'_r  \quad (r < rg;\ \text{rows} \ge rg \text{ get } 0) \\
        dU_{:, r} &= dy^T\, (t_{:, r}\, s_r)  \quad (r < rg) \\
        ds &= \textstyle\sum_m g \odot t \\
        db &= \textstyle\sum_m dy, \qquad dW = dy^T x \ \text{(dense W that requires grad;
        plain matmul)}

    An NF4 base gets no gradient. Only the gradients in ``ctx.needs_input_grad`` are
    computed. Saved: x, t, and references to W (or the NF4 tensors), D, s, U; the dense
    weight is never formed from NF4 (the kernels decode it again, tile by tile, for dx).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, scale, up, seed, dropout_p, dropout_rows,
                grad_rows):
        need = dict(zip(_INPUTS, ctx.needs_input_grad))
        save_t = need["scale"] or need["up"]
        with _no_autocast(x):
            y, t = run_forward(x, weight, bias, down, scale, up, seed, dropout_p,
                               dropout_rows, save_t)
        # the base through save_for_backward too (as references), so that saved-tensor
        # hooks (offloading, checkpointing) see every tensor backward reads
        quantized = isinstance(weight, NF4Weight)
        base = _base_tensors(weight)[:5] if quantized else (weight,)
        ctx.save_for_backward(x, down, scale, up, t, seed, *base)
        ctx.nf4 = weight if quantized else None
        ctx.dropout_p, ctx.dropout_rows, ctx.grad_rows = dropout_p, dropout_rows, grad_rows
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, down, scale, up, t, seed, *base = ctx.saved_tensors
        weight = base[0] if ctx.nf4 is None else ctx.nf4.with_tensors(*base)
        need = dict(zip(_INPUTS, ctx.needs_input_grad))
        with _no_autocast(x):
            dx, d_down, d_scale, d_up = run_backward(
                dy, x, weight, down, scale, up, t, seed, ctx.dropout_p, ctx.dropout_rows,
                ctx.grad_rows, need["x"], need["down"], need["scale"], need["up"])
            acc = _acc_dtype(x)
            d_weight = (dy.T.to(acc) @ x.to(acc)).to(weight.dtype) if need["weight"] else None
            d_bias = dy.sum(0, dtype=acc).to(ctx.bias_dtype) if need["bias"] else None
        grads = dict(x=dx, weight=d_weight, bias=d_bias, down=d_down, scale=d_scale, up=d_up)
        return tuple(grads[name] if need[name] and name in grads else None
                     for name in _INPUTS)


class MixedAdapterFunction(torch.autograd.Function):
    r"""A mixed-adapter batch, ``y = x @ W.T + b + ((x @ D.T) * S[idx]) @ U.T`` (no dropout),
    differentiable: the forward is the fused one; the backward (rare: PEFT runs mixed
    batches in eval mode, mostly without gradients) runs in PyTorch, with ``rows =
    S[idx]``, ``g = dy @ U``: ``dx = dy W + (g * rows) D``, ``dD = (g * rows)^T x``,
    ``dU = dy^T (t * rows)``, ``dS[a] = sum over the rows of table a of g * t``; frozen rows
    (from ``grad_rows``) get zeros."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, scale, up, scale_index, grad_rows):
        with _no_autocast(x):
            y = run_forward(x, weight, bias, down, scale, up, None, 0.0, 0, False, scale_index)[0]
        quantized = isinstance(weight, NF4Weight)
        base = _base_tensors(weight)[:5] if quantized else (weight,)
        ctx.save_for_backward(x, down, scale, up, scale_index, *base)
        ctx.nf4 = weight if quantized else None
        ctx.grad_rows = grad_rows
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, down, scale, up, index, *base = ctx.saved_tensors
        need = dict(zip(_INPUTS[:6], ctx.needs_input_grad))
        acc, cut = _acc_dtype(x), ctx.grad_rows
        with _no_autocast(x):
            dya, xa = dy.to(acc), x.to(acc)
            d, u = down.to(x.dtype).to(acc), up.to(x.dtype).to(acc)
            rows = scale.to(acc)[index]
            g = dya @ u
            t = xa @ d.T if need["up"] or need["scale"] else None  # only their gradients read t
            grads = {}
            if need["x"]:
                w = (base[0] if ctx.nf4 is None else
                     ctx.nf4.with_tensors(*base).dequantize(decode_dtype(x.dtype)))
                grads["x"] = (dya @ w.to(acc) + (g * rows) @ d).to(x.dtype)
            if need["weight"]:
                grads["weight"] = (dya.T @ xa).to(base[0].dtype)
            if need["bias"]:
                grads["bias"] = dya.sum(0).to(ctx.bias_dtype)
            if need["down"]:
                grads["down"] = ((g * rows).T @ xa).to(down.dtype)
                grads["down"][cut:] = 0
            if need["up"]:
                grads["up"] = (dya.T @ (t * rows)).to(up.dtype)
                grads["up"][:, cut:] = 0
            if need["scale"]:
                grads["scale"] = torch.zeros(scale.shape, dtype=acc, device=x.device).index_add_(
                    0, index, g * t).to(scale.dtype)
        return tuple(grads.get(name) for name in _INPUTS[:6]) + (None, None)
