"""Our methods as PEFT methods (speclora_kernels.peft): get_peft_model, save_pretrained /
PeftModel.from_pretrained (in a fresh process too), merge_and_unload, disable_adapter,
several named adapters, Trainer and gradient checkpointing, dense and bnb 4-bit bases; the
directory format shared with save_adapter / load_adapter."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
from _tiny_models import logits, perturb, tiny_llama, token_ids  # noqa: F401
from safetensors.torch import load_file, save_file

import speclora_kernels.methods.base as method_base
from speclora_kernels.integrations import adapter_layers, count_parameters, inject
from speclora_kernels.integrations.bnb import quantize_nf4
from speclora_kernels.peft import PiCaConfig, SpecLoraConfig, SpectralAdapterConfig, _compat
from speclora_kernels.persistence import load_adapter, save_adapter
from speclora_kernels.persistence.peft_methods import CONFIG_FIELDS

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
TOL = {"rtol": 1e-5, "atol": 1e-5}
ROOT = Path(__file__).resolve().parents[1]
# (config, the same adapter through inject: method and options)
CASES = {
    "speclora": (lambda **kw: SpecLoraConfig(r=4, k=4, lora_alpha=6, **kw),
                 ("speclora", {"r": 4, "k": 4, "alpha": 6})),
    "spectral_additive": (lambda **kw: SpectralAdapterConfig(r=4, **kw),
                          ("spectral_additive", {"r": 4})),
    "spectral_rotational": (lambda **kw: SpectralAdapterConfig(r=4, variant="rotational", **kw),
                            ("spectral_rotational", {"r": 4})),
    "pica": (lambda **kw: PiCaConfig(r=4, **kw), ("pica", {"r": 4})),
}


def peft_model(case, base=None, targets="all-linear", **kw):
    model = peft.get_peft_model(base if base is not None else tiny_llama(),
                                CASES[case][0](target_modules=targets, **kw))
    perturb(model)
    return model.eval()


def frozen_factors(model) -> dict:
    return {n: b.detach().clone() for n, b in model.named_buffers()
            if n.rsplit(".", 1)[-1] in ("P", "sigma", "Q")}


class CountSVD:
    """Counts the SVDs the methods compute (none may run when an adapter is loaded)."""

    def __init__(self, monkeypatch):
        self.calls, real = 0, method_base.top_singular

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(method_base, "top_singular", counting)


# ---------------------------------------------------------------- configs and registration
def test_configs_are_registered_and_checked():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    for cls in (SpecLoraConfig, SpectralAdapterConfig, PiCaConfig):
        config = cls(target_modules=["q_proj"])
        assert PEFT_TYPE_TO_CONFIG_MAPPING[config.peft_type] is cls
        assert config.peft_type in PEFT_TYPE_TO_TUNER_MAPPING
        own = {f for f in config.to_dict()} - set(peft.PeftConfig().to_dict())
        assert own == set(CONFIG_FIELDS[config.peft_type])  # one description of the format
        again = peft.PeftConfig.from_peft_type(**config.to_dict())
        assert type(again) is cls and again.to_dict() == config.to_dict()
    for make, message in [
        (lambda: SpecLoraConfig(r=0), r"SpecLoraConfig: r must be an int >= 1, got 0"),
        (lambda: SpecLoraConfig(k=2.5), r"SpecLoraConfig: k must be an int >= 1, got 2.5"),
        (lambda: SpecLoraConfig(lora_alpha=-1), r"lora_alpha must be None \(= r\) or a number"),
        (lambda: SpecLoraConfig(lora_dropout=1.0), r"lora_dropout must be a number in \[0, 1\)"),
        (lambda: SpecLoraConfig(svd="qr"), r"svd must be one of \('auto', 'full', 'randomized'\)"),
        (lambda: SpecLoraConfig(rank_pattern={"q_proj": 0}), r"rank_pattern must map module"),
        (lambda: SpectralAdapterConfig(variant="mult"), r"variant must be one of \['additive', "
                                                        r"'rotational'\], got 'mult'"),
        (lambda: SpectralAdapterConfig(lora_dropout=0.1), r"SpectralAdapterConfig: lora_dropout "
                                                          r"must be 0.0, got 0.1"),
        (lambda: PiCaConfig(lora_dropout=0.1), r"PiCaConfig: lora_dropout must be 0.0"),
        (lambda: PiCaConfig(target_modules=3), r"target_modules must be None, a regex"),
    ]:
        with pytest.raises((TypeError, ValueError), match=message):
            make()


def test_old_or_changed_peft_fails_with_its_version():
    assert _compat.require_peft() == peft.__version__ and _compat.missing_extension_points() == []
    with pytest.raises(ImportError, match=r"needs peft >= 0.21; the installed peft is 0.14.0"):
        _compat.require_peft("0.14.0")
    with pytest.raises(ImportError, match=r"extension points peft.mapping.X, which the "
                                          r"installed peft 0.22.0 lacks"):
        _compat.require_peft("0.22.0", missing=["peft.mapping.X"])
    assert _compat.missing_extension_points([("peft.mapping", "nope"),
                                             ("peft.nowhere", "x")]) == ["peft.mapping.nope",
                                                                         "peft.nowhere.x"]


# ---------------------------------------------------------------- get_peft_model
@pytest.mark.parametrize("case", sorted(CASES))
def test_get_peft_model_starts_at_the_base_and_trains(case, capsys):
    ids = token_ids()
    want = logits(tiny_llama(), ids)
    model = peft.get_peft_model(tiny_llama(), CASES[case][0](target_modules="all-linear"))
    torch.testing.assert_close(logits(model, ids), want, **TOL)
    method, options = CASES[case][1]
    ours = inject(tiny_llama(), method, "all-linear", verbose=False, **options)
    model.print_trainable_parameters()
    trainable, total = count_parameters(ours)
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert type(layer).__name__.endswith("Layer") and layer.adapters["default"].name == method
    perturb(model)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        assert p.requires_grad == (f".{layer.attr}." in name), name


def test_errors_name_the_module_and_the_feature():
    with pytest.raises(TypeError, match=r"model.embed_tokens: the target is a Embedding; only "
                                        r"torch.nn.Linear"):
        peft.get_peft_model(tiny_llama(), SpecLoraConfig(target_modules=["embed_tokens"]))
    model = peft.get_peft_model(tiny_llama(), SpecLoraConfig(r=2, k=2, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(TypeError, match="takes only the input tensor and adapter_names; got 0 "
                                        r"more positional arguments and keywords \['scale'\]"):
        layer(torch.randn(2, 64), scale=2.0)
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        model.add_adapter("other", PiCaConfig(target_modules=["q_proj"]))


# ---------------------------------------------------------------- save and load
@pytest.mark.parametrize("case", sorted(CASES))
def test_save_pretrained_round_trips_the_frozen_factors(case, tmp_path, monkeypatch):
    ids = token_ids()
    model = peft_model(case)
    want, factors = logits(model, ids), frozen_factors(model)
    model.save_pretrained(tmp_path / "peft")
    svd = CountSVD(monkeypatch)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert torch.equal(logits(loaded, ids), want)
    assert svd.calls == 0  # the saved factors, never an SVD at load
    assert {n: torch.equal(b, factors[n]) for n, b in frozen_factors(loaded).items()} == \
        {n: True for n in factors}
    # load_adapter reads what save_pretrained wrote; save_adapter writes what PEFT reads.
    ours = load_adapter(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(ours, ids), want, **TOL)
    save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(logits(again, ids), want, **TOL)
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(theirs) == set(mine) and all(torch.equal(theirs[k], mine[k]) for k in theirs)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert type(peft.PeftConfig.from_peft_type(**config)) is type(model.peft_config["default"])
    if case == "pica":  # one M per target name (7), shared again after loading
        assert sum(k.endswith(".M") for k in theirs) == 7
        layers = loaded.base_model.model.model.layers
        assert layers[0].mlp.up_proj.pica_adapter["default"].M is \
            layers[1].mlp.up_proj.pica_adapter["default"].M


def test_exclude_modules_and_modules_to_save(tmp_path):
    ids = token_ids()
    model = peft_model("pica", targets=["q_proj", "v_proj"], exclude_modules=["v_proj"],
                       modules_to_save=["lm_head"])
    layers = model.base_model.model.model.layers
    assert type(layers[0].self_attn.v_proj) is torch.nn.Linear
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    want = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert any("lm_head" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path),
                                      ids), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"unsupported PEFT feature modules_to_save=\['lm_head'\]"
                                         r" \(load it with peft.PeftModel.from_pretrained\)"):
        load_adapter(tiny_llama(), tmp_path)


@pytest.mark.slow  # ~12 s: a fresh interpreter imports torch, transformers and peft
def test_from_pretrained_in_a_fresh_process(tmp_path):
    """The directory get_peft_model(..., SpecLoraConfig(...)).save_pretrained wrote loads
    with PeftModel.from_pretrained in another process, with this process's outputs (and
    importing speclora_kernels there imports none of peft, transformers, bitsandbytes)."""
    ids = token_ids()
    model = peft_model("speclora", targets=["q_proj", "v_proj", "down_proj"])
    want = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    script = f"""
import sys
import speclora_kernels
assert not {{'peft', 'transformers', 'bitsandbytes'}} & set(sys.modules), sys.modules.keys()
sys.path.insert(0, {str(ROOT / 'tests')!r})
import peft, torch
torch.set_num_threads(1)  # as this process (single_thread): the same sums, bit for bit
import speclora_kernels.methods.base as base
import speclora_kernels.peft  # registers our PEFT types
from safetensors.torch import save_file
from _tiny_models import logits, tiny_llama, token_ids
calls = []
real = base.top_singular
base.top_singular = lambda *a, **k: calls.append(1) or real(*a, **k)
model = peft.PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / 'adapter')!r})
save_file({{"logits": logits(model, token_ids()), "svd": torch.tensor(len(calls))}},
          {str(tmp_path / 'out.safetensors')!r})
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU backend,
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True,  # as torch_cpu_path
                   capture_output=True, timeout=300, env={**env, "PYTHONPATH": str(ROOT)})
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["logits"], want) and int(out["svd"]) == 0


def test_save_adapter_keeps_the_checked_container_where_peft_allows(tmp_path):
    model = inject(tiny_llama(), "speclora", ["q_proj"], r=2, k=2, verbose=False)
    perturb(model)
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x10  # PEFT would load this; ours verifies the checksum in the metadata
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_adapter(tiny_llama(), tmp_path)
    save_adapter(model, tmp_path)
    tensors = load_file(path)
    os.rename(path, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="a pickle file, which is never loaded"):
        load_adapter(tiny_llama(), tmp_path)
    # What PEFT itself wrote (no metadata of ours) loads, checked against the config.
    save_file(tensors, path)
    ids = token_ids()
    torch.testing.assert_close(logits(load_adapter(tiny_llama(), tmp_path), ids),
                               logits(model, ids), **TOL)


def test_models_peft_cannot_describe_are_saved_in_format_1(tmp_path):
    ids = token_ids()
    model = inject(tiny_llama(), "speclora", ["q_proj"], r=2, k=2, verbose=False)
    inject(model, "pica", ["v_proj"], r=2, verbose=False)
    perturb(model)
    with pytest.warns(RuntimeWarning, match=r"own format \(version 1\), which PEFT cannot load: "
                                            r"the model mixes methods \['pica', 'speclora'\]"):
        save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["format_version"] == 1
    with pytest.warns(FutureWarning, match="format version 1"):
        fresh = load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(logits(fresh, ids), logits(model, ids))


# ---------------------------------------------------------------- merge, disable, adapters
@pytest.mark.parametrize("case", ["speclora", "spectral_rotational", "pica"])
def test_merge_and_unload_and_disable_adapter(case):
    ids = token_ids()
    base = logits(tiny_llama(), ids)
    model = peft_model(case)
    want = logits(model, ids)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids), want, rtol=0, atol=0)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), want, **TOL)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, ids), want, **TOL)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)
                   for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(merged, ids), want, **TOL)


def test_several_named_adapters():
    ids = token_ids()
    model = peft_model("speclora", targets=["q_proj", "v_proj"])
    first = logits(model, ids)
    model.add_adapter("second", SpecLoraConfig(r=2, k=3, lora_alpha=4, lora_dropout=0.2,
                                               target_modules=["v_proj", "up_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    assert sorted(layer.adapters) == ["default", "second"]
    assert not any(p.requires_grad for p in layer.adapters["second"].parameters())
    torch.testing.assert_close(logits(model, ids), first, rtol=0, atol=0)  # not active yet
    model.set_adapter("second")
    assert all(p.requires_grad for p in layer.adapters["second"].parameters())
    assert not any(p.requires_grad for p in layer.adapters["default"].parameters())
    perturb(model, seed=7)  # the trainable tensors: the second adapter's
    second = logits(model, ids)
    # Both active: one fused call with the factors concatenated along R.
    model.base_model.set_adapter(["default", "second"])
    both = logits(model, ids)
    model.base_model.set_adapter("default")
    assert not torch.allclose(second, both) and not torch.allclose(logits(model, ids), both)
    model.base_model.merge_adapter(["default", "second"])
    torch.testing.assert_close(logits(model, ids), both, **TOL)  # = W0 + both deltas
    model.base_model.unmerge_adapter()
    model.delete_adapter("second")
    assert sorted(layer.adapters) == ["default"]
    torch.testing.assert_close(logits(model, ids), first, **TOL)


# ---------------------------------------------------------------- NF4, dropout, training
def test_linear4bit_base_round_trips(tmp_path):
    """bitsandbytes NF4 bases (compared in training mode, where bitsandbytes' CPU path
    dequantizes exactly, see test_inject)."""
    ids = token_ids()
    want = logits(quantize_nf4(tiny_llama()).train(), ids)
    model = peft.get_peft_model(quantize_nf4(tiny_llama()),
                                SpecLoraConfig(r=4, k=4, target_modules="all-linear"))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
    torch.testing.assert_close(logits(model.train(), ids), want, **TOL)
    perturb(model)
    adapted = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(quantize_nf4(tiny_llama()), tmp_path).train()
    assert torch.equal(logits(loaded, ids), adapted)
    torch.testing.assert_close(logits(load_adapter(quantize_nf4(tiny_llama()), tmp_path).train(),
                                      ids), adapted, **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "quantizes it again"
        merged = loaded.merge_and_unload()
    assert type(merged.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    torch.testing.assert_close(logits(merged.train(), ids), adapted, rtol=0.1, atol=0.1)


def test_dropout_runs_in_kernel_and_follows_the_seed():
    ids = token_ids()
    model = peft_model("speclora", lora_dropout=0.3)
    evaluated = logits(model.eval(), ids)
    model.train()
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(logits(model, ids))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert not torch.allclose(runs[0], evaluated)
    assert torch.equal(logits(model.eval(), ids), evaluated)


@pytest.mark.parametrize("case", ["speclora", "pica"])
def test_gradient_checkpointing_gives_the_same_gradients(case):
    ids = token_ids(batch=4, length=9)
    grads = []
    for checkpointing in (False, True):
        base = tiny_llama()
        if checkpointing:
            base.gradient_checkpointing_enable()
        model = peft_model(case, base=base, **({"lora_dropout": 0.2} if case == "speclora"
                                               else {})).train()
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_trainer_lowers_the_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(0)
    start, step = torch.randint(0, 128, (64, 1), generator=gen), torch.randint(1, 4, (64, 1),
                                                                              generator=gen)
    data = (start + step * torch.arange(16)) % 128
    model = peft.get_peft_model(tiny_llama(), SpecLoraConfig(r=8, k=4, lora_alpha=16,
                                                             target_modules="all-linear"))

    def loss():
        with torch.no_grad():
            return model(input_ids=data, labels=data).loss.item()

    before = loss()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=25, learning_rate=1e-2,
                             per_device_train_batch_size=16, lr_scheduler_type="constant",
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             logging_steps=50, dataloader_num_workers=0, seed=0)
    Trainer(model=model, args=args,
            train_dataset=[{"input_ids": x, "labels": x} for x in data]).train()
    model.eval()
    assert loss() < before - 0.2
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_deferred_svd_matches_the_eager_one():
    from speclora_kernels.methods import SpecLoRA

    weight = torch.randn(24, 16)
    eager = SpecLoRA(weight, r=2, k=3)
    with method_base.deferred_svd():
        lazy = SpecLoRA(weight, r=2, k=3)
    assert lazy.svd_pending is not None and torch.isnan(lazy.P).all()
    lazy.compute_svd(weight)
    assert lazy.svd_pending is None
    assert all(torch.equal(getattr(lazy, n), getattr(eager, n)) for n in ("P", "sigma", "Q"))
    assert adapter_layers(tiny_llama()) == {}
