"""PiCa ("Parameter-Efficient Fine-Tuning with Column Space Projection"):

    W' = W0 + M Q_r.T

in PyTorch's out x in layout: each layer projects its input onto its own top-r right
singular vectors ``Q_r`` (frozen), and one trainable ``M`` (out x r) is shared by all
layers of the same target name (e.g. every ``q_proj``), so they must agree on
``out_features`` and ``r``.
"""
from __future__ import annotations

import torch
from torch import nn

from .assembly import Frozen, OpSpec, Param, transpose
from .base import AdapterMethod, SpectralBuffers
from .options import RANK, SVD, Option, OptionContext


def check_shared(shared, context: OptionContext) -> nn.Parameter | None:
    """PiCa's ``shared``: None (a new ``M``) or the ``M`` of another PiCa layer, which must
    have this layer's adapter dtype, shape ``(out_features, r)`` and device."""
    if shared is None:
        return None
    if not isinstance(shared, nn.Parameter):
        raise TypeError(f"shared must be the nn.Parameter M of another pica layer, "
                        f"got {type(shared).__name__}")
    if shared.dtype != context.dtype:
        raise TypeError(f"shared must have the adapter dtype {context.dtype}, got {shared.dtype}")
    expected = (context.out_features, context.values["r"])
    if tuple(shared.shape) != expected:
        raise ValueError(f"shared must have shape (out_features, r)={expected}, "
                         f"got {tuple(shared.shape)}")
    if shared.device != context.device:
        raise ValueError(f"shared is on {shared.device} but the weight is on "
                         f"{context.device}; they must share one device")
    return shared


SHARED = Option("shared", check_shared, saved=False,
                help="the adapter.M of another pica layer to share (runtime only: files "
                     "record the sharing as share_with)")


class PiCa(SpectralBuffers, AdapterMethod):
    """``D = Q_r.T`` (frozen), ``s = 1_r``, ``U = M``; base ``W0``.

    Pass ``shared=<the M of another PiCa layer>`` to share it; otherwise a new zero ``M``
    is created. ``M`` then receives the sum of the gradients of all layers holding it.
    """

    name = "pica"
    options = (RANK, SVD, SHARED)

    def __init__(self, weight: torch.Tensor, *, generator=None, **options):
        super().__init__(weight, **options)
        r, shared = self.r, self.runtime_options.pop("shared")
        self.M = self._new(self.out_features, r, like=weight) if shared is None else shared
        self._register_svd(weight, r, self.svd, generator, keep=("Q",))
        self.register_buffer("ones", torch.ones(r, dtype=self._dtype, device=weight.device),
                             persistent=False)
        self.rank = self.grad_rows = r
        self.dropout_rows = 0

    def factors(self):
        return self.Q.T, self.ones, self.M

    def op_spec(self):
        return OpSpec(rows=((Frozen("Q", build=transpose), Frozen("ones"), Param("M")),))
