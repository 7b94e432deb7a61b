"""SpecLoRA ("Weight Spectra Induced Efficient Model Adaptation"): LoRA plus a learnable
mask ``m`` on the top-k singular values of ``W0``:

    W' = W0 + (alpha / r) B A + P_k diag(sigma_k ⊙ m) Q_k.T

i.e. the top-k singular values become ``sigma_k ⊙ (1 + m)``. The paper's exact equation
was not available; this is the reading its public descriptions support. The mask's form
lives in :func:`spectral_scale` only, so it can change in one place.
"""
from __future__ import annotations

import torch

from .assembly import Frozen, OpSpec, Param, transpose
from .base import AdapterMethod, SpectralBuffers
from .lora import lora_init
from .options import ALPHA, RANK, SVD, Option, rank_check

K = Option("k", rank_check("k"), default=16,
           help="number of top singular values that get a learnable mask")


def spectral_scale(sigma: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-rank scale of the k frozen spectral rows: ``sigma_k ⊙ m`` (zero at ``m = 0``).

    ``SpecLoRA.op_spec`` relies on this form (linear in ``m``): it hands the op ``m`` as the
    scale and ``P_k diag(sigma_k)`` as the frozen columns of ``U``."""
    return sigma * m


def _scaled_columns(p: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return p * sigma


class SpecLoRA(SpectralBuffers, AdapterMethod):
    """``D = [A; Q_k.T]``, ``s = [(alpha/r) 1_r; sigma_k ⊙ m]``, ``U = [B, P_k]``; base ``W0``.

    Trainable ``A`` (r x in), ``B`` (out x r), ``m`` (k); frozen buffers ``P`` (out x k),
    ``sigma`` (k), ``Q`` (in x k). Only the r LoRA rows see dropout and get ``D``/``U``
    gradient; ``m`` gets its gradient through ``s``.
    """

    name = "speclora"
    options = (RANK, K, ALPHA, SVD)
    takes_dropout = True

    def __init__(self, weight: torch.Tensor, *, generator=None, **options):
        super().__init__(weight, **options)
        r, k = self.r, self.k
        self.A = self._new(r, self.in_features, like=weight)
        self.B = self._new(self.out_features, r, like=weight)
        self.m = self._new(k, like=weight)
        self.register_buffer("lora_scale", torch.full((r,), self.alpha / r, dtype=self._dtype,
                                                      device=weight.device), persistent=False)
        self._register_svd(weight, k, self.svd, generator)
        self.rank = r + k
        self.dropout_rows = self.grad_rows = r
        self.reset_parameters(generator)

    def reset_parameters(self, generator=None) -> None:
        lora_init(self.A, self.B, generator)
        with torch.no_grad():
            self.m.zero_()

    def factors(self):
        down = torch.cat([self.A, self.Q.T])
        scale = torch.cat([self.lora_scale, spectral_scale(self.sigma, self.m)])
        up = torch.cat([self.B, self.P], dim=1)
        return down, scale, up

    def op_spec(self):
        # The same U diag(s) D with sigma_k moved from s into U's frozen columns: the
        # scale's spectral entries are m itself, so D = [A; Q_k.T] and s = [(alpha/r) 1; m]
        # are parameters and frozen rows only (one stored buffer each, no op); U = [B,
        # P_k diag(sigma_k)] is one concatenation (B cannot be a view of a larger U).
        return OpSpec(rows=((Param("A"), Frozen("lora_scale"), Param("B")),
                            (Frozen("Q", build=transpose), Param("m"),
                             Frozen("P", "sigma", build=_scaled_columns))))
