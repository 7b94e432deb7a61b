"""Argument checks of the op, done once in its public entry points (fused and reference),
so kernels and backends can trust their inputs.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )


def check_adapter_inputs(x, weight, bias, down, scale, up, dropout_p=0.0, dropout_rows=None,
                         grad_rows=None, weight_shape=None, scale_index=None) -> tuple[int, int]:
    """Validate the op's arguments; return ``(dropout_rows, grad_rows)`` resolved to ints.

    ``weight_shape`` is given when ``weight`` is not a dense (out x in) tensor (NF4);
    ``scale_index`` (a mixed-adapter batch) makes ``scale`` a (tables x R) table, checked by
    :func:`check_scale_index`. Runs on every call: each check is the cheapest that catches
    its error (host time counts at decode).
    """
    _check_float("x", x)
    _check_float("down", down)
    _check_float("scale", scale)
    _check_float("up", up)
    if weight_shape is None:
        _check_float("weight", weight)
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features x in_features), got shape {tuple(weight.shape)}")
        weight_shape = weight.shape
    out_f, in_f = weight_shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x must have last dimension in_features={in_f}, got shape {tuple(x.shape)}")
    if down.dim() != 2 or down.shape[1] != in_f:
        raise ValueError(f"down must be (R x in_features={in_f}), got shape {tuple(down.shape)}")
    rank = down.shape[0]
    if scale_index is not None:
        check_scale_index(x, scale, scale_index, rank)
    elif scale.dim() != 1 or scale.shape[0] != rank:
        raise ValueError(f"scale must be ({rank},) to match down's rank, got shape {tuple(scale.shape)}")
    if up.dim() != 2 or up.shape[0] != out_f or up.shape[1] != rank:
        raise ValueError(f"up must be (out_features={out_f} x R={rank}), got shape {tuple(up.shape)}")
    if bias is not None:
        _check_float("bias", bias)
        if bias.dim() != 1 or bias.shape[0] != out_f:
            raise ValueError(f"bias must be ({out_f},), got shape {tuple(bias.shape)}")
    dev = x.device
    for name, t in (("weight", weight), ("bias", bias), ("down", down), ("scale", scale),
                    ("up", up)):  # weight may be an NF4Weight: it has a device too
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but x is on {dev}; all tensors must share one device")
    if dropout_p != 0.0 and not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    dropout_rows = rank if dropout_rows is None else _rows("dropout_rows", dropout_rows, rank)
    grad_rows = rank if grad_rows is None else _rows("grad_rows", grad_rows, rank)
    return dropout_rows, grad_rows


def check_scale_index(x, scale, scale_index, rank: int) -> None:
    """A mixed-adapter batch: ``scale`` is a (tables x R) table and ``scale_index`` gives each
    row of x (its M rows, flat or shaped ``x.shape[:-1]``) the
    table row its ranks are scaled by. Checking the values reads them on the host (a GPU
    synchronisation), so an index that passed is marked as checked until it is modified
    in place: a model's layers reuse one index tensor and synchronise once."""
    if not isinstance(scale_index, torch.Tensor):
        raise TypeError(f"scale_index must be a torch.Tensor, got {type(scale_index).__name__}")
    if scale_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"scale_index must be int32 or int64, got {scale_index.dtype}")
    rows = math.prod(x.shape[:-1])
    if scale_index.numel() != rows or scale_index.dim() not in (1, x.dim() - 1):
        raise ValueError(f"scale_index must hold one table row per row of x: shape ({rows},) "
                         f"or {tuple(x.shape[:-1])}, got {tuple(scale_index.shape)}")
    if scale_index.dim() == x.dim() - 1 and scale_index.shape != x.shape[:-1]:
        raise ValueError(f"scale_index must have shape {tuple(x.shape[:-1])} (x's leading "
                         f"dims) or ({rows},), got {tuple(scale_index.shape)}")
    if scale.dim() != 2 or scale.shape[1] != rank or scale.shape[0] == 0:
        raise ValueError(f"scale must be a (tables x R={rank}) table with scale_index, got "
                         f"shape {tuple(scale.shape)}")
    if scale.numel() >= 2**31:  # the kernels index the table in int32
        raise ValueError(f"scale must have fewer than 2**31 elements, got {tuple(scale.shape)}")
    if scale_index.device != x.device:
        raise ValueError(f"scale_index is on {scale_index.device} but x is on {x.device}")
    if rows == 0:
        return
    tables = scale.shape[0]
    if getattr(scale_index, "_speclora_checked", None) == (scale_index._version, tables):
        return
    low, high = int(scale_index.min()), int(scale_index.max())
    if low < 0 or high >= tables:
        raise ValueError(f"scale_index values must be in [0, {tables}) (rows of scale), "
                         f"got values in [{low}, {high}]")
    scale_index._speclora_checked = (scale_index._version, tables)


def _rows(name: str, value, rank: int) -> int:
    if not (0 <= int(value) <= rank):
        raise ValueError(f"{name} must be in [0, R={rank}], got {value}")
    return int(value)
