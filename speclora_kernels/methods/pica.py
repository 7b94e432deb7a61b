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

from .base import AdapterMethod, SpectralBuffers


class PiCa(SpectralBuffers, AdapterMethod):
    """``D = Q_r.T`` (frozen), ``s = 1_r``, ``U = M``; base ``W0``.

    Pass ``shared=<the M of another PiCa layer>`` to share it; otherwise a new zero ``M``
    is created. ``M`` then receives the sum of the gradients of all layers holding it.
    """

    name = "pica"
    options = ("r", "svd", "shared")

    def __init__(self, weight: torch.Tensor, *, r: int, svd: str = "auto",
                 shared: nn.Parameter | None = None, adapter_dtype=None, generator=None):
        super().__init__(weight, r, adapter_dtype)
        if shared is None:
            self.M = self._new(self.out_features, r, like=weight)
        else:
            self.M = self._check_shared(shared, weight)
        self._register_svd(weight, r, svd, generator, keep=("Q",))
        self.register_buffer("ones", torch.ones(r, dtype=self._dtype, device=weight.device),
                             persistent=False)
        self.rank = self.grad_rows = r
        self.dropout_rows = 0

    def _check_shared(self, shared, weight: torch.Tensor) -> nn.Parameter:
        if not isinstance(shared, nn.Parameter):
            raise TypeError(f"shared must be the nn.Parameter M of another pica layer, "
                            f"got {type(shared).__name__}")
        if shared.dtype != self._dtype:
            raise TypeError(f"shared must have the adapter dtype {self._dtype}, got {shared.dtype}")
        expected = (self.out_features, self.r)
        if tuple(shared.shape) != expected:
            raise ValueError(f"shared must have shape (out_features, r)={expected}, "
                             f"got {tuple(shared.shape)}")
        if shared.device != weight.device:
            raise ValueError(f"shared is on {shared.device} but the weight is on "
                             f"{weight.device}; they must share one device")
        return shared

    def factors(self):
        return self.Q.T, self.ones, self.M
