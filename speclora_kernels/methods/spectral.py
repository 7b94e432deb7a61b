"""Spectral Adapter (Zhang & Pilanci, NeurIPS 2024): fine-tune the top-r singular vectors.

Both variants move ``P_r diag(sigma_r) Q_r.T`` out of the base (``W_res``) into the
adapter, so the adapted layer equals ``W0`` at init up to rounding.

- additive:   ``W' = W_res + (P_r + B) diag(sigma_r) (Q_r + A.T).T``
- rotational: ``W' = W_res + (P_r R_U) diag(sigma_r ⊙ c) (Q_r R_V).T`` with Cayley
  rotations ``R = (I - K)(I + K)^-1``, ``K = (X - X.T) / 2``.

Neither has a separate trainable down path, so LoRA-style dropout does not apply.
"""
from __future__ import annotations

import torch

from .base import AdapterMethod, SpectralBuffers


def cayley(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``(I - K)(I + K)^-1`` of the skew part ``K = (X - X.T)/2`` of ``x`` (r x r).

    ``I + K`` is invertible for every real ``X`` (K's eigenvalues are imaginary), and
    ``(I - K)`` commutes with ``(I + K)^-1``, so one solve gives ``R``.
    """
    skew = (x - x.T) / 2
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(eye + skew, eye - skew)


class _Spectral(SpectralBuffers, AdapterMethod):
    replaces_base = True
    options = ("r", "svd")

    def __init__(self, weight, r, svd, adapter_dtype, generator):
        super().__init__(weight, r, adapter_dtype)
        self._register_svd(weight, r, svd, generator)
        self.rank = self.grad_rows = r
        self.dropout_rows = 0

    def frozen_term(self) -> torch.Tensor:
        """``P_r diag(sigma_r) Q_r.T``, in float32 or better."""
        acc = torch.promote_types(self.P.dtype, torch.float32)
        return (self.P.to(acc) * self.sigma.to(acc)) @ self.Q.to(acc).T


class SpectralAdditive(_Spectral):
    """``D = Q_r.T + A``, ``s = sigma_r``, ``U = P_r + B``; base ``W_res``.

    Trainable ``A`` (r x in), ``B`` (out x r), both zero at init.
    """

    name = "spectral_additive"

    def __init__(self, weight: torch.Tensor, *, r: int, svd: str = "auto", adapter_dtype=None,
                 generator=None):
        super().__init__(weight, r, svd, adapter_dtype, generator)
        self.A = self._new(r, self.in_features, like=weight)
        self.B = self._new(self.out_features, r, like=weight)

    def factors(self):
        return self.Q.T + self.A, self.sigma, self.P + self.B


class SpectralRotational(_Spectral):
    """``D = (Q_r R_V).T``, ``s = sigma_r ⊙ c``, ``U = P_r R_U``; base ``W_res``.

    Trainable ``X_U``, ``X_V`` (r x r, zero at init so ``R = I``) and ``c`` (r, ones).
    """

    name = "spectral_rotational"

    def __init__(self, weight: torch.Tensor, *, r: int, svd: str = "auto", adapter_dtype=None,
                 generator=None):
        super().__init__(weight, r, svd, adapter_dtype, generator)
        self.X_U = self._new(r, r, like=weight)
        self.X_V = self._new(r, r, like=weight)
        self.c = self._new(r, like=weight)
        with torch.no_grad():
            self.c.fill_(1.0)

    def factors(self):
        down = cayley(self.X_V).T @ self.Q.T
        return down, self.sigma * self.c, self.P @ cayley(self.X_U)
