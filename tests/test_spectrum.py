"""speclora_kernels.spectrum: the spectral analysis of fine-tuning. Its math on matrices built
with a known answer (amplified top singular values, Givens rotations of the top singular
vectors, changes inside the top-k subspace), the exact dW of adapter directories (ours and
PEFT's) against merging, the CLI end to end (JSON, PNG, --suggest), and every error."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_models import perturb, tiny_llama
from safetensors.torch import save_file

from speclora_kernels import METHODS, AdapterFileError
from speclora_kernels.integrations import adapter_layers, inject
from speclora_kernels.persistence import save_adapter
from speclora_kernels.spectrum import analyse, energy_curves, layer_spectrum, suggested_k
from speclora_kernels.spectrum.__main__ import main
from speclora_kernels.spectrum.analysis import solver_for
from speclora_kernels.spectrum.load import Weights, adapter_changes, is_skipped
from speclora_kernels.spectrum.report import kind_of

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
OPTIONS = {"lora": {"r": 4, "alpha": 6}, "speclora": {"r": 2, "k": 4, "alpha": 6},
           "spectral_additive": {"r": 4}, "spectral_rotational": {"r": 4}, "pica": {"r": 4}}


def orthonormal(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, dtype=F64, generator=gen)).Q


def built(out=48, inp=36, seed=0):
    """``W0 = P diag(sigma) Q.T`` with distinct, well separated singular values."""
    p, q = orthonormal(out, inp, seed), orthonormal(inp, inp, seed + 1)
    sigma = torch.linspace(12.0, 1.0, inp, dtype=F64)
    return p, sigma, q


def givens(n, i, j, theta):
    g = torch.eye(n, dtype=F64)
    g[i, i] = g[j, j] = math.cos(theta)
    g[i, j], g[j, i] = -math.sin(theta), math.sin(theta)
    return g


# ---------------------------------------------------------------- the math, known answers
def test_amplified_top_values_give_their_factors_and_unmoved_vectors():
    p, sigma, q = built()
    factors = torch.ones_like(sigma)
    factors[:4] = torch.tensor([2.5, 1.75, 1.3, 1.1], dtype=F64)
    w0 = p @ torch.diag(sigma) @ q.T
    w1 = p @ torch.diag(sigma * factors) @ q.T
    r = layer_spectrum(w0, w1 - w0, top=8)
    torch.testing.assert_close(torch.tensor(r["ratio"], dtype=F64), factors[:8], rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(r["sigma_before"], dtype=F64), sigma[:8], rtol=1e-12, atol=0)
    assert min(r["cos_u"]) > 1 - 1e-12 and min(r["cos_v"]) > 1 - 1e-12
    assert r["svd"] == "full" and r["shape"] == [48, 36] and r["top"] == 8
    # dW = P diag(sigma (f - 1)) Q.T is diagonal in the top block: all four shares agree
    energy = (sigma * (factors - 1)).square()
    want = energy.cumsum(0) / energy.sum()
    for measure in ("two_sided", "left", "right", "either"):
        torch.testing.assert_close(torch.tensor(r["energy"][measure], dtype=F64), want, rtol=1e-10, atol=1e-12)
    assert r["suggested_k"] == int((want >= 0.9).nonzero()[0]) + 1 == 2
    # dW's own singular values are sigma (f - 1), sorted: its best rank-k share is their cumsum
    own = energy.sort(descending=True).values
    torch.testing.assert_close(torch.tensor(r["energy"]["best_rank_k"], dtype=F64), own.cumsum(0) / own.sum(),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("theta", [0.2, 0.7, 2.0])
@pytest.mark.parametrize("side", ["left", "right"])
def test_givens_rotation_of_the_top_vectors_gives_cos_theta(theta, side):
    p, sigma, q = built(seed=3)
    w0 = p @ torch.diag(sigma) @ q.T
    g = givens(sigma.numel(), 0, 1, theta)
    w1 = (p @ g) @ torch.diag(sigma) @ q.T if side == "left" else p @ torch.diag(sigma) @ (q @ g).T
    r = layer_spectrum(w0, w1 - w0, top=6)
    moved, still = (r["cos_u"], r["cos_v"]) if side == "left" else (r["cos_v"], r["cos_u"])
    assert moved[0] == pytest.approx(abs(math.cos(theta)), abs=1e-10)
    assert moved[1] == pytest.approx(abs(math.cos(theta)), abs=1e-10)
    assert min(moved[2:]) > 1 - 1e-10 and min(still) > 1 - 1e-10
    assert max(abs(x - 1) for x in r["ratio"]) < 1e-10  # a rotation keeps the values
    # the change lives in the top 2 directions on one side: one-sided share 1 at k = 2
    assert r["energy"][side][1] == pytest.approx(1.0, abs=1e-10)
    assert r["energy"]["either"][1] == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_change_inside_the_top_k_block_has_share_one_at_k(rank):
    p, sigma, q = built(seed=5)
    w0 = p @ torch.diag(sigma) @ q.T
    x = torch.randn(rank, rank, dtype=F64, generator=torch.Generator().manual_seed(rank))
    x[-1, -1] += 3.0  # the last direction carries a real share: k = rank - 1 is not enough
    delta = p[:, :rank] @ x @ q[:, :rank].T
    r = layer_spectrum(w0, delta, top=4, share=0.99)
    curve = r["energy"]["two_sided"]
    assert r["energy"]["best_rank_k"][rank - 1] == pytest.approx(1.0, abs=1e-12)
    assert all(a <= b + 1e-12 for a, b in zip(curve, r["energy"]["best_rank_k"]))  # Eckart-Young
    assert curve[rank - 1] == pytest.approx(1.0, abs=1e-12)
    assert rank == 1 or curve[rank - 2] < 0.99
    assert r["suggested_k"] == rank
    assert r["curve_k"] == 36 and len(curve) == 36


def test_energy_curves_equal_the_projections_they_define():
    p, _, q = built(out=30, inp=20, seed=7)
    delta = torch.randn(30, 20, dtype=F64, generator=torch.Generator().manual_seed(8))
    curves = energy_curves(p, q, delta)
    total = delta.square().sum()
    for k in (1, 4, 13, 20):
        pk, qk = p[:, :k] @ p[:, :k].T, q[:, :k] @ q[:, :k].T
        want = {"two_sided": pk @ delta @ qk, "left": pk @ delta, "right": delta @ qk}
        for name, part in want.items():
            assert curves[name][k - 1] == pytest.approx((part.square().sum() / total).item(), rel=1e-12)
        rest = (torch.eye(30, dtype=F64) - pk) @ delta @ (torch.eye(20, dtype=F64) - qk)
        assert curves["either"][k - 1] == pytest.approx(1 - (rest.square().sum() / total).item(), rel=1e-12)
    # out > in: the part of dW outside W0's column space is never held, whatever k
    assert curves["left"][-1] < 0.99 and curves["right"][-1] == pytest.approx(1.0)
    assert suggested_k(curves["two_sided"], 1.0) is None
    assert energy_curves(p, q, torch.zeros(30, 20, dtype=F64)) is None


def test_unchanged_weight_and_rank_deficient_base():
    p, sigma, q = built(out=12, inp=10, seed=9)
    sigma[6:] = 0  # W0 of rank 6: ratios over sigma = 0 are not numbers
    w0 = p @ torch.diag(sigma) @ q.T
    r = layer_spectrum(w0, torch.zeros_like(w0), top=10)
    assert r["unchanged"] and r["suggested_k"] == 0 and r["energy"] == {} and r["delta_norm"] == 0
    json.dumps(r, allow_nan=False)  # strict JSON: no NaN or inf
    r = layer_spectrum(w0, 0.1 * p[:, :1] @ q[:, :1].T, top=10)
    assert r["ratio"][0] == pytest.approx((sigma[0].item() + 0.1) / sigma[0].item(), rel=1e-12)
    json.dumps(r, allow_nan=False)


def test_randomized_svd_above_1024_and_on_request():
    assert solver_for((1024, 4000)) == "full" and solver_for((1025, 1030)) == "randomized"
    assert solver_for((2048, 2048), "full") == "full"
    p, sigma, q = built(out=300, inp=200, seed=11)
    sigma = torch.linspace(20.0, 0.1, 200, dtype=F64) ** 2 / 20
    w0 = p @ torch.diag(sigma) @ q.T
    factors = torch.ones_like(sigma)
    factors[:3] = torch.tensor([1.8, 1.4, 1.2], dtype=F64)
    w1 = p @ torch.diag(sigma * factors) @ q.T
    full = layer_spectrum(w0, w1 - w0, top=5, k=10, svd="full")
    rand = layer_spectrum(w0, w1 - w0, top=5, k=10, svd="randomized")
    assert rand["svd"] == "randomized" and full["svd"] == "full" and rand["curve_k"] == 10
    for key in ("ratio", "sigma_after", "cos_u", "cos_v"):
        torch.testing.assert_close(torch.tensor(rand[key]), torch.tensor(full[key]), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(torch.tensor(rand["ratio"][:3], dtype=F64), factors[:3], rtol=1e-8, atol=0)


def test_settings_and_inputs_are_checked():
    w = torch.randn(6, 5, dtype=F64)
    for kwargs, word in [({"top": 0}, "top"), ({"top": 2.5}, "top"), ({"k": 0}, "k"),
                         ({"share": 0}, "share"), ({"share": 1.5}, "share"),
                         ({"measure": "both"}, "measure"), ({"svd": "exact"}, "svd")]:
        with pytest.raises(ValueError, match=word):
            layer_spectrum(w, w, **kwargs)
    with pytest.raises(ValueError, match=r"delta must have the weight's shape \(6, 5\)"):
        layer_spectrum(w, w.T)
    with pytest.raises(ValueError, match="weight must be a 2-D floating"):
        layer_spectrum(torch.ones(6, dtype=F64), torch.ones(6, dtype=F64))


def test_layer_kinds_and_the_default_rule():
    assert kind_of("encoder.layer.3.attention.self.query") == "attention.self.query"
    assert kind_of("model.layers.10.mlp.up_proj") == "mlp.up_proj"
    assert kind_of("pooler.dense") == "pooler.dense"
    skipped = ["embeddings.word_embeddings", "model.embed_tokens", "transformer.wte",
               "encoder.layer.0.attention.output.LayerNorm", "model.norm", "transformer.ln_f"]
    kept = ["lm_head", "model.layers.0.self_attn.q_proj", "encoder.layer.0.output.dense"]
    assert all(is_skipped(n) for n in skipped) and not any(is_skipped(n) for n in kept)


# ---------------------------------------------------------------- adapter directories
def _base_file(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.mark.parametrize("method", sorted(METHODS))
def test_adapter_directory_gives_the_merged_change(method, tmp_path):
    model = tiny_llama()
    base = _base_file(model, tmp_path / "base.safetensors")
    originals = {k.removesuffix(".weight"): v.clone() for k, v in model.state_dict().items()}
    inject(model, method, ["q_proj", "up_proj", "o_proj"], **OPTIONS[method])
    perturb(model, scale=0.05)
    save_adapter(model, tmp_path / "adapter")
    changes = adapter_changes(Weights(base, "BASE"), tmp_path / "adapter")
    layers = adapter_layers(model)
    assert sorted(changes) == sorted(layers) and len(layers) == 6
    for name, layer in layers.items():
        merged = layer.merged_weight().to(F64) - originals[name].to(F64)
        delta = changes[name].delta()
        assert changes[name].method == method and delta.dtype == F64
        assert delta.abs().max() > 1e-3  # a real change, not zero on both sides
        torch.testing.assert_close(delta, merged, rtol=0, atol=2e-6 * originals[name].abs().max().item())
    result = analyse(base, tmp_path / "adapter", top=4)
    assert result["finetuned_kind"] == "adapter" and sorted(result["layers"]) == sorted(layers)
    name = "model.layers.1.mlp.up_proj"
    entry = result["layers"][name]
    want = layer_spectrum(originals[name], changes[name].delta(), top=4)
    assert entry["method"] == method and entry["kind"] == "mlp.up_proj"
    torch.testing.assert_close(torch.tensor(entry["ratio"]), torch.tensor(want["ratio"]), rtol=1e-12, atol=0)


def test_peft_written_directories(tmp_path):
    import peft

    from speclora_kernels.peft import SpectralAdapterConfig

    base_model = tiny_llama()
    base = _base_file(base_model, tmp_path / "base.safetensors")
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["v_proj"]))
    perturb(lora, scale=0.05)
    lora.save_pretrained(tmp_path / "lora")
    changes = adapter_changes(Weights(base), tmp_path / "lora")
    assert sorted(changes) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    layer = lora.base_model.model.model.layers[1].self_attn.v_proj
    want = 3.0 * layer.lora_B["default"].weight.to(F64) @ layer.lora_A["default"].weight.to(F64)
    torch.testing.assert_close(changes["model.layers.1.self_attn.v_proj"].delta(), want, rtol=1e-12, atol=1e-15)

    spectral = peft.get_peft_model(tiny_llama(), SpectralAdapterConfig(r=3, target_modules=["k_proj"]))
    perturb(spectral, scale=0.05)
    spectral.save_pretrained(tmp_path / "spectral")
    changes = adapter_changes(Weights(base), tmp_path / "spectral")
    merged = spectral.merge_and_unload().model.layers[0].self_attn.k_proj.weight.to(F64)
    w0 = base_model.model.layers[0].self_attn.k_proj.weight.to(F64)
    assert changes["model.layers.0.self_attn.k_proj"].method == "spectral_additive"
    torch.testing.assert_close(changes["model.layers.0.self_attn.k_proj"].delta(), merged - w0,
                               rtol=0, atol=2e-6 * w0.abs().max().item())


def test_adapter_of_another_base_is_refused(tmp_path):
    model = inject(tiny_llama(seed=0), "lora", ["q_proj"], r=2)
    save_adapter(model, tmp_path / "adapter")
    other = _base_file(tiny_llama(seed=1), tmp_path / "other.safetensors")
    with pytest.raises(AdapterFileError, match="different pre-trained weight"):
        analyse(other, tmp_path / "adapter")
    with pytest.raises(ValueError, match="BASE: .* is an adapter directory"):
        analyse(tmp_path / "adapter", other)
    with pytest.raises(ValueError, match="matched none of the adapter's layers"):
        analyse(_base_file(tiny_llama(), tmp_path / "base.safetensors"), tmp_path / "adapter",
                targets=".*v_proj")


# ---------------------------------------------------------------- full fine-tuning files, CLI
def tiny_weights(seed=0, amplify=None):
    """A small model's weights: two blocks of (q 24x16, up 40x16), an embedding and a norm;
    with ``amplify``, the top singular values of every q scaled by it."""
    gen = torch.Generator().manual_seed(seed)
    weights = {"embed.weight": torch.randn(50, 16, generator=gen), "norm.weight": torch.ones(16)}
    for block in range(2):
        for name, shape in (("attn.q", (24, 16)), ("mlp.up", (40, 16))):
            weights[f"layers.{block}.{name}.weight"] = torch.randn(*shape, generator=gen)
            weights[f"layers.{block}.{name}.bias"] = torch.randn(shape[0], generator=gen)
    if amplify is not None:
        for block in range(2):
            key = f"layers.{block}.attn.q.weight"
            u, s, vh = torch.linalg.svd(weights[key].double(), full_matrices=False)
            factors = torch.ones_like(s)
            factors[:len(amplify)] = torch.tensor(amplify, dtype=F64)
            weights[key] = (u * (s * factors)) @ vh
    return {k: v.to(torch.float64) for k, v in weights.items()}


def test_cli_end_to_end_writes_json_and_png(tmp_path, capsys):
    base, tuned = tiny_weights(), tiny_weights(amplify=[3.0, 2.0])
    tuned["layers.1.mlp.up.weight"] = tuned["layers.1.mlp.up.weight"] + 0.01
    save_file(base, tmp_path / "base.safetensors")
    shards = tmp_path / "tuned"
    shards.mkdir()  # a sharded folder: two files
    keys = sorted(tuned)
    save_file({k: tuned[k] for k in keys[:4]}, shards / "model-00001-of-00002.safetensors")
    save_file({k: tuned[k] for k in keys[4:]}, shards / "model-00002-of-00002.safetensors")
    out = tmp_path / "out"
    assert main([str(tmp_path / "base.safetensors"), str(shards), "--out", str(out), "--top", "4",
                 "--share", "0.95", "--suggest", "--quiet"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "spectrum.json").read_text())
    assert result["schema"] == "speclora_kernels.spectrum" and result["schema_version"] == 1
    assert result["finetuned_kind"] == "weights"
    assert list(result["layers"]) == ["layers.0.attn.q", "layers.0.mlp.up", "layers.1.attn.q", "layers.1.mlp.up"]
    assert result["skipped"] == {"embed": "embedding or norm (default rule; --targets to include it)"}
    q = result["layers"]["layers.0.attn.q"]
    assert q["ratio"][:2] == pytest.approx([3.0, 2.0], rel=1e-12) and q["ratio"][2] == pytest.approx(1.0)
    assert min(q["cos_u"]) > 1 - 1e-9 and q["svd"] == "full" and q["kind"] == "attn.q"
    # dW = P diag(2 s1, s2) Q.T: k = 1 holds 4 s1^2 / (4 s1^2 + s2^2) < 0.95, k = 2 all of it
    assert q["suggested_k"] == 2 and q["energy"]["two_sided"][1] == pytest.approx(1.0)
    assert result["layers"]["layers.0.mlp.up"]["unchanged"]
    # a constant shift of a 40x16 weight leaves its 16-dim column space: never held two-sided
    up = result["layers"]["layers.1.mlp.up"]
    assert up["suggested_k"] is None and up["energy"]["two_sided"][-1] < 0.95
    assert up["energy"]["right"][-1] == pytest.approx(1.0) and result["suggest"]["not_reached"] == ["layers.1.mlp.up"]
    assert result["suggest"]["rank_pattern"]["layers.1.attn.q"] == 2
    assert result["suggest"]["groups"]["2"] == ["layers.0.attn.q", "layers.1.attn.q"]
    assert 'inject(model, "speclora", ["layers.0.attn.q", "layers.1.attn.q"], r=8, k=2)' in printed
    assert '"layers.0.attn.q": 2' in printed and "svd" in printed
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["spectrum_attn_q.png", "spectrum_mlp_up.png"]
    for png in pngs:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000
    # --targets replaces the rule: the embedding is compared too (unchanged here)
    assert main([str(tmp_path / "base.safetensors"), str(shards), "--out", str(out), "--targets",
                 r"embed|layers\.0\..*", "--no-plots", "--quiet"]) == 0
    assert list(json.loads((out / "spectrum.json").read_text())["layers"]) == \
        ["embed", "layers.0.attn.q", "layers.0.mlp.up"]


def test_module_entry_point(tmp_path):
    save_file(tiny_weights(), tmp_path / "a.safetensors")
    save_file(tiny_weights(amplify=[1.5]), tmp_path / "b.safetensors")
    run = subprocess.run([sys.executable, "-m", "speclora_kernels.spectrum", str(tmp_path / "a.safetensors"),
                          str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "out"), "--no-plots"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "layers.1.attn.q" in run.stdout and "1.5000" in run.stdout and "SVD: full" in run.stdout
    assert "spectrum" in run.stderr  # the progress bar (or counter)


def _run_error(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tiny_weights(), a)
    save_file(tiny_weights(amplify=[2.0]), b)
    out = str(tmp_path / "out")
    code, err = _run_error(capsys, [str(tmp_path / "nope.safetensors"), str(b), "--out", out])
    assert code == 2 and "BASE:" in err and "does not exist" in err
    code, err = _run_error(capsys, [str(a), str(tmp_path / "nope"), "--out", out])
    assert code == 2 and "FINETUNED:" in err and "does not exist" in err
    wide = tiny_weights(amplify=[2.0])
    wide["layers.0.mlp.up.weight"] = torch.zeros(40, 17, dtype=F64)
    save_file(wide, tmp_path / "wide.safetensors")
    code, err = _run_error(capsys, [str(a), str(tmp_path / "wide.safetensors"), "--out", out])
    assert code == 2 and "layers.0.mlp.up: the weight is 40x16 in BASE but 40x17 in FINETUNED" in err
    save_file({"other.weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    code, err = _run_error(capsys, [str(a), str(tmp_path / "other.safetensors"), "--out", out])
    assert code == 2 and "no common layers" in err
    save_file({"embed.weight": torch.zeros(50, 16, dtype=F64)}, tmp_path / "embed.safetensors")
    code, err = _run_error(capsys, [str(a), str(tmp_path / "embed.safetensors"), "--out", out])
    assert code == 2 and "every common layer is an embedding or norm" in err
    code, err = _run_error(capsys, [str(a), str(b), "--out", out, "--targets", "nothing"])
    assert code == 2 and "targets='nothing' matched none of the common layers" in err
    code, err = _run_error(capsys, [str(a), str(b), "--out", out, "--targets", "(["])
    assert code == 2 and "targets must be a regular expression" in err
    (tmp_path / "model.bin").write_bytes(b"pickle")
    code, err = _run_error(capsys, [str(a), str(tmp_path / "model.bin"), "--out", out])
    assert code == 2 and "not a .safetensors file" in err
    (tmp_path / "pickles").mkdir()
    (tmp_path / "pickles" / "pytorch_model.bin").write_bytes(b"pickle")
    code, err = _run_error(capsys, [str(a), str(tmp_path / "pickles"), "--out", out])
    assert code == 2 and "holds no .safetensors file (only pickle files" in err
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    code, err = _run_error(capsys, [str(a), str(tmp_path / "bad.safetensors"), "--out", out])
    assert code == 2 and "not a readable safetensors file" in err
    dup = tmp_path / "dup"
    dup.mkdir()
    save_file({"x.weight": torch.zeros(2, 2)}, dup / "1.safetensors")
    save_file({"x.weight": torch.zeros(2, 2)}, dup / "2.safetensors")
    code, err = _run_error(capsys, [str(a), str(dup), "--out", out])
    assert code == 2 and "tensor 'x.weight' is in both" in err
    for flag, value, word in [("--top", "0", "--top"), ("--k", "x", "--k"), ("--share", "1.5", "--share"),
                              ("--measure", "both", "--measure"), ("--svd", "exact", "--svd")]:
        with pytest.raises(SystemExit) as exit_info:
            main([str(a), str(b), "--out", out, flag, value])
        assert exit_info.value.code == 2 and word in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(a), str(b), "--out", str(a)])
    assert exit_info.value.code == 2 and "exists and is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(a), str(b)])
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written by a failed run


@pytest.mark.parametrize("with_tqdm", [True, False])
def test_progress_on_stderr(with_tqdm, tmp_path, monkeypatch, capsys):
    save_file(tiny_weights(), tmp_path / "a.safetensors")
    save_file(tiny_weights(amplify=[1.5]), tmp_path / "b.safetensors")
    if not with_tqdm:
        monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    result = analyse(tmp_path / "a.safetensors", tmp_path / "b.safetensors", progress=True)
    err = capsys.readouterr().err
    assert len(result["layers"]) == 4
    if with_tqdm:
        assert "spectrum: 100%" in err and "4/4" in err
    else:
        assert "spectrum: layer 4/4 layers.1.mlp.up" in err
