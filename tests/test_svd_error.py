"""The SVD error tool measures what it claims: zero-ish on an easy spectrum, and it notices
a wrong solver."""
import torch

from speclora_kernels.tools import svd_error


def _decaying(n_out, n_in, gen):
    p = torch.linalg.qr(torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)).Q
    q = torch.linalg.qr(torch.randn(n_in, n_in, generator=gen, dtype=torch.float64)).Q
    return (p * 0.8 ** torch.arange(n_in, dtype=torch.float64)) @ q.T


def test_randomized_svd_error_small_on_decaying_spectrum():
    w = _decaying(300, 120, torch.Generator().manual_seed(0)).float()
    e = svd_error.svd_errors(w, 8)
    assert e["sigma_rel"] < 1e-5 and e["angle_deg"] < 0.1 and abs(e["resid_over_opt"]) < 1e-4


def test_svd_error_detects_a_wrong_subspace(monkeypatch):
    w = _decaying(300, 120, torch.Generator().manual_seed(1)).float()

    def shifted(weight, k, **kw):  # triplets 2..k+1 instead of 1..k
        p, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return p[:, 1:k + 1], s[1:k + 1], vh[1:k + 1].T

    monkeypatch.setattr(svd_error, "top_singular", shifted)
    e = svd_error.svd_errors(w, 8)
    assert e["sigma_rel"] > 0.1 and e["angle_deg"] > 45
