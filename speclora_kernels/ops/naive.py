"""The one op in plain PyTorch: the ground truth every kernel is proven against.

    y = x @ W.T + bias + ((x' @ D.T) * s) @ U.T

``x'`` is ``x`` with LoRA-style dropout applied to the first ``dropout_rows`` rows of
``D`` only (the trainable down rows); the remaining (frozen, spectral) rows see the clean
input. With ``scale_index`` (a mixed-adapter batch) ``s`` is a table and row ``i`` of x
is scaled by ``s[scale_index[i]]``. Only the first ``grad_rows`` rows of ``D`` and columns of ``U`` receive gradient
(the rest are frozen spectral factors, treated as constants). Computed with float32
accumulation (float64 when any input is float64) and returned in ``x``'s dtype.
Differentiable by autograd; runs on any device.
"""
from __future__ import annotations

import torch

from .validate import check_adapter_inputs


def dropout_mask(shape, p: float, *, device=None, generator=None) -> torch.Tensor:
    """Boolean keep-mask (True = kept) with keep probability ``1 - p``."""
    return torch.rand(shape, device=device, generator=generator) >= p


def fused_adapter_linear(x, weight, bias, down, scale, up, dropout_p: float = 0.0,
                         dropout_rows: int | None = None, grad_rows: int | None = None,
                         mask: torch.Tensor | None = None,
                         training: bool = True, generator: torch.Generator | None = None,
                         scale_index: torch.Tensor | None = None):
    """Reference ``x @ W.T + bias + ((x @ D.T) * s) @ U.T``.

    Args:
        x: (..., in) input.
        weight: (out, in) dense base weight.
        bias: (out,) or None.
        down: (R, in) down-projection ``D``.
        scale: (R,) per-rank scale ``s``.
        up: (out, R) up-projection ``U``.
        dropout_p: LoRA dropout probability, active only when ``training``.
        dropout_rows: leading rows of ``D`` that see the dropped-out input (default: all).
        grad_rows: leading rows of ``D`` / columns of ``U`` that get gradient (default: all).
        mask: optional boolean keep-mask shaped like ``x``; when given it is used instead
            of drawing one (lets a test feed the mask a kernel generated).
        generator: RNG for the mask when ``mask`` is None.
        scale_index: a mixed-adapter batch: ``scale`` is a (tables x R) table, and each row
            of x (``scale_index`` shaped ``(M,)`` or ``x.shape[:-1]``) takes its scale from
            row ``scale_index[i]`` (a zero row: the base alone).
    """
    dropout_rows, grad_rows = check_adapter_inputs(x, weight, bias, down, scale, up, dropout_p,
                                                   dropout_rows, grad_rows,
                                                   scale_index=scale_index)
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    base = xa @ weight.to(acc).T
    if bias is not None:
        base = base + bias.to(acc)
    d = down.to(acc)
    u = up.to(acc)
    if grad_rows < d.shape[0]:
        d = torch.cat([d[:grad_rows], d[grad_rows:].detach()])
        u = torch.cat([u[:, :grad_rows], u[:, grad_rows:].detach()], dim=1)
    if training and dropout_p > 0 and dropout_rows > 0:
        if mask is None:
            mask = dropout_mask(x.shape, dropout_p, device=x.device, generator=generator)
        elif mask.shape != x.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor shaped like x {tuple(x.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        xd = xa * mask.to(acc) / (1.0 - dropout_p)
        t = torch.cat([xd @ d[:dropout_rows].T, xa @ d[dropout_rows:].T], dim=-1)
    else:
        t = xa @ d.T
    if scale_index is None:
        t = t * scale.to(acc)
    else:
        t = t * scale.to(acc)[scale_index.reshape(x.shape[:-1])]
    return (base + t @ u.T).to(x.dtype)
