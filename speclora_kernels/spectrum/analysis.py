"""The spectral comparison of one weight before and after fine-tuning (float64).

``W0 = P diag(sigma) Q.T`` before, ``W' = W0 + dW = P' diag(sigma') Q'.T`` after, singular
values descending, ``u_i``/``v_i`` the columns of ``P``/``Q``. Per index ``i <= top``:

- ``ratio[i] = sigma'_i / sigma_i`` (the SpecLoRA paper's Fig. 1: fine-tuning amplifies the
  top singular values);
- ``cos_u[i] = |<u_i, u'_i>|`` and ``cos_v[i] = |<v_i, v'_i>|`` (its Fig. 2: the top
  singular vectors rotate). Absolute values: singular vectors are defined up to sign.

How much of the change the top-k singular directions of ``W0`` hold, for ``k = 1..K``, as a
share of ``||dW||_F^2`` (``P_k``, ``Q_k``: the first k columns):

- ``two_sided(k) = ||P_k P_k.T dW Q_k Q_k.T||_F^2 / ||dW||_F^2``: the part of ``dW`` inside
  the top-k block ``span(P_k) x span(Q_k)``, the only part a change of the form
  ``P_k X Q_k.T`` (Spectral Adapter rotational, SpecLoRA's mask on ``sigma_k``) can make.
  This is the measure the suggested k uses by default.
- ``left(k) = ||P_k P_k.T dW||^2 / ||dW||^2`` and ``right(k) = ||dW Q_k Q_k.T||^2 / ||dW||^2``:
  the one-sided projections onto the top-k left (column) and right (row) directions.
- ``either(k) = 1 - ||(I - P_k P_k.T) dW (I - Q_k Q_k.T)||^2 / ||dW||^2 = left + right -
  two_sided``: the part that touches a top-k direction on either side, what tuning the top-k
  columns of ``P`` and ``Q`` additively (Spectral Adapter additive) reaches to first order.

All four rise with k to at most 1 (less where ``dW`` leaves the column or row space of
``W0``). For reference, ``best_rank_k(k) = (s_1^2 + ... + s_k^2) / ||dW||_F^2`` with ``s_i``
the singular values of ``dW`` itself: the most any rank-k change holds (Eckart-Young), so
``two_sided(k) <= best_rank_k(k)``; a low ``best_rank_k`` means ``dW`` is not low-rank at
all, a low ``two_sided`` under a high ``best_rank_k`` that it is, but off W0's top directions.

The suggested k is the smallest k with ``measure(k) >= share`` (one of the first four), None
if no k up to K reaches it (the curve's last value says how close it got), 0 for an
unchanged weight.
"""
from __future__ import annotations

import math

import torch

from ..methods.svd import FULL_SVD_MAX_DIM, top_singular

MEASURES = ("two_sided", "either", "left", "right")
SOLVERS = ("auto", "full", "randomized")
# Energy-curve length when --k is not given and the SVD is randomized (a full SVD gives every
# direction for free, so there the curve covers all of them).
RANDOMIZED_CURVE = 64


def solver_for(shape: tuple[int, int], svd: str = "auto") -> str:
    """The SVD used for a weight of ``shape``: ``svd`` itself unless it is ``"auto"``, then
    full up to ``min(out, in) = 1024`` and the library's randomized SVD above."""
    if svd not in SOLVERS:
        raise ValueError(f"svd must be one of {SOLVERS}, got {svd!r}")
    if svd != "auto":
        return svd
    return "full" if min(shape) <= FULL_SVD_MAX_DIM else "randomized"


def energy_curves(p: torch.Tensor, q: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The four shares of module docstring for ``k = 1..K`` (``p``: out x K, ``q``: in x K,
    orthonormal columns); None when ``delta`` is zero (no change to share out)."""
    total = delta.square().sum()
    if total == 0:
        return None
    left = p.T @ delta                    # K x in: P_k.T dW, one row per direction
    right = delta @ q                     # out x K
    block = (left @ q).square()           # K x K: (P.T dW Q)_ij^2
    two_sided = block.cumsum(0).cumsum(1).diagonal()
    rows = left.square().sum(1).cumsum(0)
    cols = right.square().sum(0).cumsum(0)
    curves = {"two_sided": two_sided, "left": rows, "right": cols, "either": rows + cols - two_sided}
    return {name: (c / total).clamp(0, 1) for name, c in curves.items()}


def suggested_k(curve: torch.Tensor | None, share: float) -> int | None:
    """Smallest k with ``curve[k - 1] >= share``; 0 for no change (``curve`` None), None if
    the curve never gets there."""
    if curve is None:
        return 0
    hits = (curve >= share - 1e-12).nonzero()
    return int(hits[0]) + 1 if len(hits) else None


def _floats(t: torch.Tensor) -> list:
    """A list for strict JSON: non-finite values (a ratio over sigma = 0) become None."""
    return [x if math.isfinite(x) else None for x in t.tolist()]


def check_settings(top: int, k: int | None, share: float, measure: str, svd: str = "auto") -> None:
    """Raise ``ValueError`` naming the argument for a bad ``top``, ``k``, ``share``,
    ``measure`` or ``svd``."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an int >= 1, got {top!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be an int >= 1 (or None: every direction), got {k!r}")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"share must be a number in (0, 1], got {share!r}")
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    solver_for((1, 1), svd)


@torch.no_grad()
def layer_spectrum(weight: torch.Tensor, delta: torch.Tensor, *, top: int = 32, k: int | None = None,
                   share: float = 0.9, measure: str = "two_sided", svd: str = "auto") -> dict:
    """The comparison of the module docstring for the weight ``weight`` (``W0``, out x in) and
    its change ``delta`` (``dW``, same shape), in float64, as a JSON-ready dict.

    ``top``: singular values/vectors compared (capped at ``min(out, in)``); ``k``: energy
    curve length K (default: every direction for a full SVD, 64 for a randomized one;
    capped at ``min(out, in)``); ``share``/``measure``: the suggested k's rule; ``svd``:
    ``"auto"`` (:func:`solver_for`), ``"full"`` or ``"randomized"``
    (:func:`speclora_kernels.methods.svd.top_singular`, fixed seed).
    """
    check_settings(top, k, share, measure, svd)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating tensor, got {weight.dim()}-D {weight.dtype}")
    if delta.shape != weight.shape:
        raise ValueError(f"delta must have the weight's shape {tuple(weight.shape)}, got {tuple(delta.shape)}")
    w0, dw = weight.detach().to(torch.float64), delta.detach().to(torch.float64)
    solver = solver_for(tuple(w0.shape), svd)
    small = min(w0.shape)
    n_top = min(top, small)
    n_curve = min(k or (small if solver == "full" else RANDOMIZED_CURVE), small)
    # Both sides with the same count: the randomized solver's accuracy grows with it.
    count = max(n_top, n_curve)
    p, sigma, q = top_singular(w0, count, svd=solver, dtype=torch.float64)
    p1, sigma1, q1 = (t[..., :n_top] for t in top_singular(w0 + dw, count, svd=solver, dtype=torch.float64))
    curves = energy_curves(p[:, :n_curve], q[:, :n_curve], dw)
    if curves is not None:
        own = (torch.linalg.svdvals(dw)[:n_curve] if solver == "full"  # no vectors needed
               else top_singular(dw, n_curve, svd=solver, dtype=torch.float64)[1])
        curves["best_rank_k"] = (own.square().cumsum(0) / dw.square().sum()).clamp(0, 1)
    base_norm, delta_norm = w0.norm().item(), dw.norm().item()
    return {
        "shape": list(w0.shape), "svd": solver, "top": n_top, "curve_k": n_curve,
        "sigma_before": _floats(sigma[:n_top]), "sigma_after": _floats(sigma1),
        "ratio": _floats(sigma1 / sigma[:n_top]),
        "cos_u": _floats((p[:, :n_top] * p1).sum(0).abs().clamp(max=1)),
        "cos_v": _floats((q[:, :n_top] * q1).sum(0).abs().clamp(max=1)),
        "base_norm": base_norm, "delta_norm": delta_norm,
        "relative_change": delta_norm / base_norm if base_norm else None,
        "unchanged": curves is None,
        "energy": {} if curves is None else {name: _floats(c) for name, c in curves.items()},
        "suggested_k": suggested_k(None if curves is None else curves[measure], share),
    }
