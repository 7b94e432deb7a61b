"""PEFT LoRA adapters both ways: a directory saved by peft runs in our fused layers with
PEFT's outputs; any of our methods exports to a directory peft loads with our outputs."""
import json

import pytest
import torch
from _tiny_models import logits, options, perturb, tiny_llama, token_ids  # noqa: F401
from safetensors.torch import load_file, save_file

from speclora_kernels import METHODS
from speclora_kernels.integrations import adapter_layers, inject
from speclora_kernels.persistence import export_peft_adapter, load_adapter, load_peft_adapter

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
TOL = {"rtol": 1e-5, "atol": 1e-5}


def peft_lora(directory, seed=3, **config):
    """A PEFT LoRA model on the tiny Llama with random A and B, saved to ``directory``."""
    import peft

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_load_peft_adapter_matches_peft(tmp_path, rslora):
    ids = token_ids()
    peft_model = peft_lora(tmp_path, r=4, lora_alpha=8, use_rslora=rslora, lora_dropout=0.1,
                           target_modules=["q_proj", "v_proj", "down_proj"],
                           rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    want = logits(peft_model, ids)
    assert (want - logits(tiny_llama(), ids)).abs().max() > 1e-2  # the adapter does something
    model = load_peft_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(model, ids), want, **TOL)
    layers = adapter_layers(model)
    assert len(layers) == 6
    v, down = layers["model.layers.0.self_attn.v_proj"], layers["model.layers.1.mlp.down_proj"]
    root = (lambda r: r ** 0.5) if rslora else (lambda r: r)
    assert v.adapter.r == 2 and v.adapter.alpha / 2 == pytest.approx(8 / root(2))
    assert down.adapter.r == 4 and down.adapter.alpha / 4 == pytest.approx(3 / root(4))
    assert v.dropout == 0.1 and v.adapter.name == "lora"
    # load_adapter recognises a PEFT directory too.
    torch.testing.assert_close(logits(load_adapter(tiny_llama(), tmp_path), ids), want, **TOL)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_export_loads_in_peft_with_our_outputs(tmp_path, method):
    import peft

    ids = token_ids()
    model = inject(tiny_llama(), method, "all-linear", verbose=False, **options(method))
    perturb(model)
    want = logits(model, ids)
    export_peft_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), want, **TOL)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layer = adapter_layers(model)["model.layers.0.mlp.up_proj"]
    a = tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]
    rank = {"lora": 4, "speclora": 8, "pica": 4, "spectral_additive": 8,
            "spectral_rotational": 8}[method]  # spectral_*: 2r, W_res folded in
    assert a.shape == (rank, 64) and b.shape == (128, rank) and config["r"] == rank
    if method == "lora":
        assert torch.equal(a, layer.adapter.A) and torch.equal(b, layer.adapter.B)
        assert config["lora_alpha"] == 6
    else:
        assert config["lora_alpha"] == rank  # scaling 1
    # Independent check of the exported delta: W0 + B A == the layer's adapted weight.
    w0 = tiny_llama().get_submodule("model.layers.0.mlp.up_proj").weight.double()
    scaling = config["lora_alpha"] / config["r"]
    torch.testing.assert_close(w0 + scaling * b.double() @ a.double(),
                               layer.merged_weight().double(), rtol=0, atol=2e-6)


def test_export_mixed_methods_uses_rank_and_alpha_patterns(tmp_path):
    import peft

    ids = token_ids()
    model = inject(tiny_llama(), "lora", ["q_proj"], r=2, alpha=5, verbose=False)
    inject(model, "spectral_additive", ["v_proj"], r=3, verbose=False)
    inject(model, "speclora", ["gate_proj", "up_proj", "down_proj"], r=4, k=4, verbose=False)
    perturb(model)
    export_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 8)  # 6 SpecLoRA layers: R = r + k
    assert config["rank_pattern"] == {**{f"model.layers.{i}.self_attn.q_proj": 2 for i in (0, 1)},
                                      **{f"model.layers.{i}.self_attn.v_proj": 6 for i in (0, 1)}}
    assert config["alpha_pattern"] == {**{f"model.layers.{i}.self_attn.q_proj": 5 for i in (0, 1)},
                                       **{f"model.layers.{i}.self_attn.v_proj": 6 for i in (0, 1)}}
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), **TOL)


def test_round_trip_peft_to_ours_to_peft_is_exact(tmp_path):
    peft_lora(tmp_path / "peft", r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"])
    model = load_peft_adapter(tiny_llama(), tmp_path / "peft")
    export_peft_adapter(model, tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 8, {})


def rewrite_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_unsupported_peft_adapters_are_refused(tmp_path):
    import peft

    dora = peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    peft.get_peft_model(tiny_llama(), dora).save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="unsupported PEFT feature use_dora=True: DoRA"):
        load_peft_adapter(tiny_llama(), tmp_path / "dora")
    ia3 = peft.IA3Config(target_modules=["v_proj"], feedforward_modules=[])
    peft.get_peft_model(tiny_llama(), ia3).save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="only PEFT LoRA adapters can be loaded, got peft_type='IA3'"):
        load_peft_adapter(tiny_llama(), tmp_path / "ia3")

    peft_lora(tmp_path / "lora", r=2, target_modules=["q_proj"])
    rewrite_config(tmp_path / "lora", bias="all")
    with pytest.raises(ValueError, match="bias='all'"):
        load_peft_adapter(tiny_llama(), tmp_path / "lora")
    rewrite_config(tmp_path / "lora", bias="none", modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="modules_to_save"):
        load_peft_adapter(tiny_llama(), tmp_path / "lora")
    rewrite_config(tmp_path / "lora", modules_to_save=None)
    path = tmp_path / "lora" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({**tensors, "base_model.model.model.embed_tokens.lora_embedding_A":
               torch.zeros(2, 128)}, path)
    with pytest.raises(ValueError, match="unsupported tensor .*lora_embedding_A"):
        load_peft_adapter(tiny_llama(), tmp_path / "lora")
    save_file(tensors, path)
    rewrite_config(tmp_path / "lora", r=3)
    with pytest.raises(ValueError, match=r"q_proj: lora_A \(2, 64\) / lora_B \(64, 2\) do not fit"):
        load_peft_adapter(tiny_llama(), tmp_path / "lora")
    rewrite_config(tmp_path / "lora", r=2)
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError, match="'model.layers.1.self_attn.q_proj', which the model lacks"):
        load_peft_adapter(model, tmp_path / "lora")
    assert not adapter_layers(model)


def test_export_from_linear4bit_base_matches_peft_on_the_quantized_model(tmp_path):
    """On a Linear4bit base the spectral methods keep the NF4 W0 and take the spectral term
    out through frozen rows of their own: the export is exact against the same NF4 model."""
    import peft

    from speclora_kernels.integrations.bnb import quantize_nf4

    ids = token_ids()
    model = inject(quantize_nf4(tiny_llama()), "spectral_additive", ["q_proj", "up_proj"], r=4,
                   verbose=False)
    inject(model, "speclora", ["v_proj"], r=2, k=2, verbose=False)
    perturb(model)
    # Training mode: the Linear4bit layers left as they are dequantize exactly (bitsandbytes'
    # CPU eval path rounds block scales to bf16, see test_inject); nothing here drops out.
    want = logits(model.train(), ids)
    export_peft_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(quantize_nf4(tiny_llama()), tmp_path).train()
    torch.testing.assert_close(logits(peft_model, ids), want, **TOL)


def test_export_of_separately_quantized_residual_is_refused(tmp_path):
    model = inject(tiny_llama(), "spectral_additive", ["q_proj"], r=4, quantize="nf4",
                   verbose=False)
    with pytest.raises(ValueError, match="spectral_additive with an NF4 W_res base"):
        export_peft_adapter(model, tmp_path)
