"""inject / merge_and_unload on real models: PEFT's target rules, identity at init, frozen
base, PiCa sharing, progress bar and summary, NF4 Linear4bit layers."""
import copy

import pytest
import torch
from _tiny_models import logits, minilm, minilm_path, options, perturb, tiny_llama, token_ids  # noqa: F401

from speclora_kernels import METHODS, AdapterLinear
from speclora_kernels.integrations import count_parameters, find_targets, inject, merge_and_unload, parameter_summary
from speclora_kernels.integrations.inject import share_key

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
ALL = sorted(METHODS)


def adapters(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


@pytest.mark.parametrize("targets", [
    ["q_proj", "v_proj"], ["self_attn.o_proj"], ("model.layers.1.mlp.up_proj",),
    r".*\.layers\.0\..*_proj", r"q_proj", "all-linear", {"gate_proj", "lm_head"},
])
def test_targets_match_peft(targets):
    """The modules we adapt are the modules PEFT's LoRA adapts for the same config."""
    import peft

    try:
        ours = sorted(find_targets(tiny_llama(), targets))
    except ValueError:
        ours = None
    try:
        peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=targets))
    except ValueError:
        theirs = None  # a bare regex "q_proj" must match whole names: nothing matches
    else:
        theirs = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                        if isinstance(m, peft.tuners.lora.LoraLayer))
    assert ours == theirs
    assert (ours is None) == (targets == "q_proj")


def test_target_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="target_modules is required"):
        find_targets(model, None)
    with pytest.raises(ValueError, match="matched no module"):
        find_targets(model, ["nonexistent"])
    with pytest.raises(TypeError, match="target module 'model.layers.0.self_attn' is a"):
        find_targets(model, ["self_attn"])
    with pytest.raises(TypeError, match="target_modules must be"):
        find_targets(model, 3)
    assert find_targets(model, ["q_proj", "k_proj"], exclude_modules=["layers.0.self_attn.k_proj"]) \
        == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.k_proj"]
    inject(model, "lora", ["q_proj"], r=2, verbose=False)
    with pytest.raises(ValueError, match="already an AdapterLinear"):
        inject(model, "lora", ["q_proj"], r=2, verbose=False)


@pytest.mark.parametrize("method", ALL)
def test_llama_identical_at_init_and_frozen(method):
    base = tiny_llama()
    ids = token_ids()
    want = logits(base, ids)
    model = inject(tiny_llama(), method, "all-linear", verbose=False, **options(method))
    got = logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layers = adapters(model)
    assert sorted(layers) == sorted(find_targets(base, "all-linear"))
    assert not any(layer.training for layer in layers.values())  # the model's eval mode kept
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, AdapterLinear)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for layer in layers.values() for p in layer.adapter.parameters()}
    # The frozen base is the pre-trained one (W_res for the spectral methods).
    for name, layer in layers.items():
        w0 = base.get_submodule(name).weight
        if METHODS[method].replaces_base:
            torch.testing.assert_close(layer.weight + layer.adapter.frozen_term(), w0,
                                       rtol=0, atol=1e-6)
        else:
            assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("method", ["speclora", "pica"])
def test_minilm_identical_at_init(method):
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(minilm_path())(
        ["the movie was not good.", "a short sentence"], padding=True, return_tensors="pt")
    base = minilm()
    with torch.no_grad():
        want = base(**enc).last_hidden_state
        model = inject(minilm(), method, "all-linear", r=8, verbose=False)
        got = model(**enc).last_hidden_state
    assert len(adapters(model)) == 37  # 6 blocks x 6 linear layers + pooler
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_pica_shares_one_M_per_target_name():
    model = inject(tiny_llama(), "pica", ["q_proj", "k_proj"], r=4, verbose=False)
    layers = adapters(model)
    q0, q1 = (layers[f"model.layers.{i}.self_attn.q_proj"].adapter.M for i in (0, 1))
    k0, k1 = (layers[f"model.layers.{i}.self_attn.k_proj"].adapter.M for i in (0, 1))
    assert q0 is q1 and k0 is k1 and q0 is not k0
    assert count_parameters(model)[0] == q0.numel() + k0.numel()
    assert share_key("encoder.layer.11.output.dense") == "encoder.layer.*.output.dense"
    assert share_key("0.fc") == "*.fc" and share_key("layers.10") == "layers.*"


def test_progress_bar_and_summary(capsys):
    inject(tiny_llama(), "speclora", ["q_proj", "down_proj"], r=4, k=4)
    assert capsys.readouterr() == ("", "")  # silent unless verbose=True
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    inject(model, "speclora", ["q_proj", "down_proj"], r=4, k=4, verbose=True)
    out, err = capsys.readouterr()
    # A: r x in, B: out x r, m: k per layer; q_proj 64->64, down_proj 128->64.
    expected = 2 * (4 * (64 + 64) + 4) + 2 * (4 * (128 + 64) + 4)
    assert f"trainable params: {expected:,} || all params: {total + expected:,}" in out
    assert "SVD + inject (4 layers)" in err and "4/4" in err
    assert parameter_summary(model) in out
    inject(tiny_llama(), "lora", ["q_proj"], r=2, verbose=True)
    out, err = capsys.readouterr()
    assert "SVD" not in err and "trainable params" in out  # LoRA computes no SVD


def test_second_inject_keeps_first_adapters_trainable():
    model = inject(tiny_llama(), "pica", ["q_proj", "v_proj"], r=4, verbose=False)
    inject(model, "speclora", ["gate_proj", "up_proj", "down_proj"], r=2, k=2, verbose=False)
    names = {layer.adapter.name for layer in adapters(model).values()}
    assert names == {"pica", "speclora"}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for layer in adapters(model).values()
                         for p in layer.adapter.parameters()}


def test_bad_options_leave_model_unchanged():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: k is not used"):
        inject(model, "lora", ["q_proj"], r=2, k=3, verbose=False)
    with pytest.raises(ValueError, match="r must be in"):
        inject(model, "speclora", ["q_proj", "v_proj"], r=40, k=2, verbose=False)  # v_proj: 32 out
    with pytest.raises(ValueError, match="method must be one of"):
        inject(model, "dora", ["q_proj"], verbose=False)
    assert not adapters(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def delta64(method, layer, w0):
    """The adapted weight in float64 from the method's parameters (the README's "Methods"
    table)."""
    a = layer.adapter
    if method == "lora":
        return w0.double() + a.alpha / a.r * a.B.double() @ a.A.double()
    if method == "speclora":
        spec = (a.P.double() * (a.sigma.double() * a.m.double())) @ a.Q.double().T
        return w0.double() + a.alpha / a.r * a.B.double() @ a.A.double() + spec
    if method == "pica":
        return w0.double() + a.M.double() @ a.Q.double().T
    if method == "spectral_additive":
        w_res = w0.double() - (a.P.double() * a.sigma.double()) @ a.Q.double().T
        return w_res + ((a.P + a.B).double() * a.sigma.double()) @ (a.Q + a.A.T).double().T
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["lora", "speclora", "pica", "spectral_additive"])
def test_merge_and_unload(method):
    base = tiny_llama()
    ids = token_ids()
    model = inject(tiny_llama(), method, "all-linear", verbose=False, **options(method))
    perturb(model)
    want = logits(model, ids)
    expected = {name: delta64(method, layer, base.get_submodule(name).weight.detach())
                for name, layer in adapters(model).items()}
    merged = merge_and_unload(model)
    assert merged is model and not adapters(model)
    for name, w in expected.items():
        linear = model.get_submodule(name)
        assert type(linear) is torch.nn.Linear and not linear.weight.requires_grad
        torch.testing.assert_close(linear.weight.double(), w, rtol=0, atol=2e-6)
    torch.testing.assert_close(logits(model, ids), want, rtol=1e-5, atol=1e-5)
    assert count_parameters(model) == (0, sum(p.numel() for p in base.parameters()))


def test_linear4bit_layers_are_adapted():
    """NF4 bases: bitsandbytes Linear4bit layers go through AdapterLinear.from_linear; at init
    the model computes what the quantized model computes."""
    from speclora_kernels.integrations.bnb import quantize_nf4

    ids = token_ids()
    # bitsandbytes' CPU eval path repacks the weight with bf16 block scales; its training
    # path dequantizes exactly (no dropout in this model), so it is the reference.
    quantized = quantize_nf4(tiny_llama()).train()
    want = logits(quantized, ids)
    assert (want - logits(tiny_llama(), ids)).abs().max() > 1e-3  # NF4 really differs
    model = inject(quantize_nf4(tiny_llama()), "speclora", "all-linear", r=4, k=4, verbose=False)
    layers = adapters(model)
    assert len(layers) == 14
    assert all(layer.inject_meta["source"] == "Linear4bit" for layer in layers.values())
    torch.testing.assert_close(logits(model, ids), want, rtol=1e-5, atol=1e-5)
    total = sum(p.numel() for p in tiny_llama().parameters())
    assert count_parameters(model)[1] == total + count_parameters(model)[0]
    perturb(model)
    adapted = logits(model, ids)
    merge_and_unload(model)  # NF4 + delta -> dense nn.Linear
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in layers)
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)
