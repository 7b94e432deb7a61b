"""Argument checks of the op, done once in its public entry points (fused and reference),
so kernels and backends can trust their inputs.
"""
from __future__ import annotations

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
                         grad_rows=None, weight_shape=None) -> tuple[int, int]:
    """Validate the op's arguments; return ``(dropout_rows, grad_rows)`` resolved to ints.

    ``weight_shape`` is given when ``weight`` is not a dense (out x in) tensor (NF4). Runs on
    every call: each check is the cheapest that catches its error (host time counts at
    decode).
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
    if scale.dim() != 1 or scale.shape[0] != rank:
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


def _rows(name: str, value, rank: int) -> int:
    if not (0 <= int(value) <= rank):
        raise ValueError(f"{name} must be in [0, R={rank}], got {value}")
    return int(value)
