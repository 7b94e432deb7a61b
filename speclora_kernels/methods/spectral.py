"""Spectral Adapter (Zhang & Pilanci, NeurIPS 2024): fine-tune r singular vectors of W0.

``P_r``, ``sigma_r``, ``Q_r`` are the singular triplets ``offset .. offset+r-1`` of ``W0``
(``offset = 0``: the top r). Both variants move ``P_r diag(sigma_r) Q_r.T`` out of the base
(``W_res``) into the adapter, so the adapted layer equals ``W0`` at init up to rounding.
Adapters on disjoint slices (offsets 0, r, 2r, ...) change disjoint parts of the spectrum:
the paper's multi-adapter fusion (``speclora_kernels.fuse_adapters``).

- additive:   ``W' = W_res + (P_r + B) diag(sigma_r) (Q_r + A.T).T``
- rotational: ``W' = W_res + (P_r R_U) diag(sigma_r ⊙ c) (Q_r R_V).T`` with Cayley
  rotations ``R = (I - K)(I + K)^-1``, ``K = (X - X.T) / 2``.

Neither has a separate trainable down path, so LoRA-style dropout does not apply.
"""
from __future__ import annotations

import torch

from .assembly import Computed, Frozen, OpSpec, Param, acc_dtype, transpose
from .base import AdapterMethod, SpectralBuffers
from .options import OFFSET, RANK, SVD


def cayley(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``(I - K)(I + K)^-1`` of the skew part ``K = (X - X.T)/2`` of ``x`` (r x r),
    in ``x``'s dtype.

    ``I + K`` is invertible for every real ``X`` (K's eigenvalues are imaginary), and
    ``(I - K)`` commutes with ``(I + K)^-1``, so one solve gives ``R``. The solve runs in
    float32 at least (linear solvers have no float16 / bfloat16 kernels, and 8 bits of
    mantissa would lose orthogonality) and without its error check (``solve_ex``), which
    would synchronise the GPU on every forward: ``I + K`` cannot be singular.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    skew = (xa - xa.T) / 2
    eye = torch.eye(x.shape[0], dtype=acc, device=x.device)
    return torch.linalg.solve_ex(eye + skew, eye - skew, check_errors=False).result.to(x.dtype)


class _Spectral(SpectralBuffers, AdapterMethod):
    replaces_base = True
    options = (RANK, OFFSET, SVD)

    def __init__(self, weight, *, generator=None, **options):
        super().__init__(weight, **options)
        self._register_svd(weight, self.r, self.svd, generator, offset=self.offset)
        self.rank = self.grad_rows = self.r
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

    def __init__(self, weight: torch.Tensor, **options):
        super().__init__(weight, **options)
        self.A = self._new(self.r, self.in_features, like=weight)
        self.B = self._new(self.out_features, self.r, like=weight)

    def factors(self):
        return self.Q.T + self.A, self.sigma, self.P + self.B

    def op_spec(self):
        return OpSpec(rows=((Computed("D"), Frozen("sigma"), Computed("U")),),
                      frozen={"QT": Frozen("Q", build=transpose)})

    def op_computed(self, tensors):
        return {"D": tensors["QT"] + self.A, "U": self.P + self.B}  # two adds


class SpectralRotational(_Spectral):
    """``D = (Q_r R_V).T``, ``s = sigma_r ⊙ c``, ``U = P_r R_U``; base ``W_res``.

    Trainable ``X_U``, ``X_V`` (r x r, zero at init so ``R = I``) and ``c`` (r, ones).
    """

    name = "spectral_rotational"

    def __init__(self, weight: torch.Tensor, **options):
        super().__init__(weight, **options)
        r = self.r
        self.X_U = self._new(r, r, like=weight)
        self.X_V = self._new(r, r, like=weight)
        self.c = self._new(r, like=weight)
        with torch.no_grad():
            self.c.fill_(1.0)

    def factors(self):
        down = cayley(self.X_V).T @ self.Q.T
        return down, self.sigma * self.c, self.P @ cayley(self.X_U)

    def op_spec(self):
        # Both rotations from one batched solve on X = [X_U, X_V] (one stored buffer), and
        # sigma moved from s into D, so s = c: U diag(c) D with D = diag(sigma) R_V.T Q.T.
        return OpSpec(rows=((Computed("D"), Param("c"), Computed("U")),),
                      stacks={"X": ("X_U", "X_V")},
                      frozen={"two_eyes": Frozen("sigma", build=_two_eyes),
                              "rhs": Frozen("sigma", build=_solve_rhs),
                              "P": Frozen("P", build=_acc),
                              "QT": Frozen("Q", build=_acc_transpose),
                              "sigma_QT": Frozen("Q", "sigma", build=_scaled_rows)})

    def op_computed(self, tensors):
        """Five ops (sub, add, solve, two addmm): with ``A = 2I + X - X.T = 2(I + K)``,
        ``R = (I - K)(I + K)^-1 = 4 A^-1 - I``, so one solve ``A Y = [4I, 4 diag(sigma)]``
        gives ``U = P R_U = P Y_U - P`` and ``diag(sigma) R_V.T Q.T = Y_V.T Q.T -
        diag(sigma) Q.T``. In float32 at least, as :func:`cayley`."""
        x, two_eyes = tensors["X"], tensors["two_eyes"]
        if x.dtype != two_eyes.dtype:
            x = x.to(two_eyes.dtype)
        y = torch.linalg.solve_ex(torch.add(two_eyes, x - x.mT), tensors["rhs"],
                                  check_errors=False).result
        y_u, y_v = y.unbind()
        up = torch.addmm(tensors["P"], tensors["P"], y_u, beta=-1)
        down = torch.addmm(tensors["sigma_QT"], y_v.mT, tensors["QT"], beta=-1)
        return {"D": down, "U": up}


def _eye(sigma: torch.Tensor) -> torch.Tensor:
    return torch.eye(sigma.shape[0], dtype=acc_dtype(sigma), device=sigma.device)


def _two_eyes(sigma):
    return torch.stack([2 * _eye(sigma)] * 2)


def _solve_rhs(sigma):
    return torch.stack([4 * _eye(sigma), torch.diag(4 * sigma.to(acc_dtype(sigma)))])


def _acc(t):
    return t.to(acc_dtype(t)).contiguous()


def _acc_transpose(q):
    return transpose(q.to(acc_dtype(q)))


def _scaled_rows(q, sigma):
    acc = acc_dtype(q)
    return (sigma.to(acc)[:, None] * q.to(acc).T).contiguous()
