"""patch_peft(): PEFT's own LoRA layers on the fused op. Outputs and every gradient equal
unpatched PEFT's; merge/unmerge, adapter switching, disabling, save/load and .to() behave as
before; what the op does not cover falls back to PEFT's forward with one log line."""
import copy
import logging

import peft
import pytest
import torch
from _tiny_models import llama_config, logits, perturb, tiny_llama, token_ids  # noqa: F401

import speclora_kernels
from speclora_kernels.dropout import dropout_keep_mask, dropout_seed
from speclora_kernels.integrations.bnb import quantize_nf4
from speclora_kernels.peft import is_patched, patch

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture
def fused_calls(monkeypatch):
    """How many forwards ran the fused op; the classes are unpatched afterwards."""
    calls = []
    real = patch.fused_forward
    monkeypatch.setattr(patch, "fused_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    patch._LOGGED.clear()
    yield calls
    speclora_kernels.unpatch_peft()


def lora(base=None, adapter="default", **config) -> peft.PeftModel:
    model = peft.get_peft_model(base if base is not None else tiny_llama(),
                                peft.LoraConfig(**{"target_modules": "all-linear", **config}),
                                adapter_name=adapter)
    perturb(model)
    return model


def outputs_and_grads(model, ids, autocast=None):
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()  # outside autocast, as torch.autocast's documentation asks
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return out.logits.detach(), grads


def assert_same(a, b, tol=TOL):
    torch.testing.assert_close(a[0], b[0], **tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **tol, msg=name)


def biased_llama():
    from transformers import LlamaForCausalLM

    config = llama_config()
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8),
    dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2},
         alpha_pattern={"down_proj": 3}),
    dict(r=4, lora_bias=True, target_modules=["q_proj", "down_proj"], base="biased"),
    dict(r=2, lora_dropout=0.3, mode="eval", base="biased"),
], ids=["plain", "rslora-patterns", "lora_bias", "dropout-eval"])
def test_outputs_and_gradients_equal_unpatched_peft(config, fused_calls):
    ids = token_ids()
    base = biased_llama() if config.pop("base", None) else tiny_llama()
    eval_mode = config.pop("mode", "train") == "eval"
    model = lora(base, **config).train(not eval_mode)
    if eval_mode:  # gradients still flow; dropout is off
        for p in model.parameters():
            p.requires_grad_(p.requires_grad)
    want = outputs_and_grads(model, ids)
    assert speclora_kernels.patch_peft() == 2 and is_patched()  # Linear and bnb's Linear4bit
    assert_same(outputs_and_grads(model, ids), want)
    layers = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    assert len(fused_calls) == layers  # every adapted projection ran the fused op
    assert speclora_kernels.unpatch_peft() == 2 and not is_patched()
    calls = len(fused_calls)
    assert_same(outputs_and_grads(model, ids), want)
    assert len(fused_calls) == calls


def test_several_active_adapters_concatenated_along_r(fused_calls):
    ids = token_ids()
    model = lora(r=4, lora_alpha=8, lora_dropout=0.1)
    model.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=5, lora_dropout=0.2,
                                           target_modules=["q_proj", "v_proj"]))
    model.base_model.set_adapter(["default", "b"])
    perturb(model, seed=3)
    model.eval()  # two dropout probabilities: compare without dropout
    want = outputs_and_grads(model, ids)
    speclora_kernels.patch_peft(model)
    assert_same(outputs_and_grads(model, ids), want)
    assert fused_calls
    # Different probabilities in training: the second group is added in plain PyTorch.
    model.train()
    torch.manual_seed(4)
    out = model(input_ids=ids).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, want[0])


def test_dropout_runs_in_kernel_with_its_mask(fused_calls):
    model = lora(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj"]).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, 64, requires_grad=True)
    speclora_kernels.patch_peft()
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    keep = dropout_keep_mask(dropout_seed(), x.shape, 0.3)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = x @ layer.base_layer.weight.T + (x * keep / 0.7) @ a.T @ b.T * layer.scaling["default"]
    torch.testing.assert_close(y, want, **TOL)
    (gy,) = torch.autograd.grad(y.sum(), a)
    (gw,) = torch.autograd.grad(want.sum(), a)
    torch.testing.assert_close(gy, gw, **TOL)
    assert 0.6 < keep.float().mean() < 0.8


def test_linear4bit_layers(fused_calls):
    """bitsandbytes 4-bit bases (training mode: bitsandbytes' CPU path dequantizes exactly)."""
    from peft.tuners.lora.bnb import Linear4bit

    ids = token_ids()
    base = quantize_nf4(tiny_llama())
    base.is_loaded_in_4bit = True  # what transformers sets; PEFT picks its bnb layer then
    model = lora(base, r=4, lora_alpha=8).train()
    assert isinstance(model.base_model.model.model.layers[0].mlp.up_proj, Linear4bit)
    want = outputs_and_grads(model, ids)
    speclora_kernels.patch_peft()
    assert_same(outputs_and_grads(model, ids), want)
    assert len(fused_calls) >= 14


def test_mixed_dtypes_and_autocast(fused_calls):
    ids = token_ids()
    tol = {"rtol": 3e-2, "atol": 3e-2}
    model = lora(tiny_llama().to(torch.bfloat16), r=4, lora_alpha=8).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # autocast_adapter_dtype
    want = outputs_and_grads(model, ids)
    speclora_kernels.patch_peft()
    got = outputs_and_grads(model, ids)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].float(), want[0].float(), **tol)
    for name in want[1]:
        scale = want[1][name].abs().max()
        torch.testing.assert_close(got[1][name] / scale, want[1][name] / scale, **tol)
    speclora_kernels.unpatch_peft()
    model = lora(r=4, lora_alpha=8).train()
    want = outputs_and_grads(model, ids, autocast=torch.bfloat16)
    speclora_kernels.patch_peft()
    got = outputs_and_grads(model, ids, autocast=torch.bfloat16)
    torch.testing.assert_close(got[0].float(), want[0].float(), **tol)
    for name in want[1]:
        scale = want[1][name].abs().max()
        torch.testing.assert_close(got[1][name] / scale, want[1][name] / scale, **tol)


def test_every_other_behaviour_stays_peft(tmp_path, fused_calls):
    ids = token_ids()
    model = lora(r=4, lora_alpha=8).eval()
    reference = copy.deepcopy(model)  # unpatched PEFT, run before patching
    want, base = logits(reference, ids), logits(tiny_llama(), ids)
    reference.merge_adapter()
    merged = logits(reference, ids)
    speclora_kernels.patch_peft()
    torch.testing.assert_close(logits(model, ids), want, **TOL)
    model.merge_adapter()  # PEFT's merge; merged layers run PEFT's forward
    torch.testing.assert_close(logits(model, ids), merged, rtol=0, atol=0)
    model.unmerge_adapter()
    with model.disable_adapter():  # (unmerging rounds: PEFT's own tolerance)
        torch.testing.assert_close(logits(model, ids), base, **TOL)
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter("other")
    torch.testing.assert_close(logits(model, ids), base, **TOL)  # B = 0 at init
    model.set_adapter("default")
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), want, **TOL)
    model.to(torch.float64)
    reference.unmerge_adapter()
    torch.testing.assert_close(logits(model, ids), logits(reference.to(torch.float64), ids),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits(model.merge_and_unload(), ids),
                               logits(reference.merge_and_unload(), ids), rtol=1e-10, atol=1e-10)


def test_models_built_later_and_single_models(fused_calls):
    from peft.tuners.lora.layer import Linear

    original = Linear.forward
    speclora_kernels.patch_peft()
    assert Linear.forward is patch.lora_forward
    ids = token_ids()
    logits(lora(r=2), ids)  # built after the patch
    assert len(fused_calls) == 14
    speclora_kernels.unpatch_peft()
    assert Linear.forward is original
    one, other = lora(r=2), lora(r=2)
    assert speclora_kernels.patch_peft(one) == 14
    logits(other, ids)
    assert len(fused_calls) == 14
    logits(one, ids)
    assert len(fused_calls) == 28
    assert speclora_kernels.unpatch_peft(one) == 14
    logits(one, ids)
    assert len(fused_calls) == 28


def test_what_is_not_covered_falls_back_with_one_log_line(fused_calls, caplog):
    from transformers.pytorch_utils import Conv1D

    ids = token_ids()
    caplog.set_level(logging.WARNING, logger="speclora_kernels.peft")
    cases = [(lora(r=2, use_dora=True, target_modules=["q_proj"]), {},
              "Linear runs PEFT's own forward: the LoRA variant DoraLinearVariant"),
             (lora(r=2, target_modules=["embed_tokens"]), {},
              "Embedding runs PEFT's own forward: embedding LoRA is a gather"),
             (lora(r=2, target_modules=["q_proj"], lora_bias=True).eval(),
              {"adapter_names": ["default", "__base__"]}, "lora_bias in a mixed-adapter batch")]
    wants = [model(input_ids=ids, **kw).logits for model, kw, _ in cases]
    speclora_kernels.patch_peft()
    for (model, kw, message), want in zip(cases, wants):
        caplog.clear()
        for _ in range(2):
            torch.testing.assert_close(model(input_ids=ids, **kw).logits, want, **TOL)
        assert [r.getMessage() for r in caplog.records] == [
            r.getMessage() for r in caplog.records if message in r.getMessage()]
        assert len(caplog.records) == 1, caplog.records
    assert not fused_calls

    class GPT2ish(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(12, 8)

        def forward(self, x):
            return self.c_attn(x)

    model = peft.get_peft_model(GPT2ish(), peft.LoraConfig(r=2, target_modules=["c_attn"],
                                                           fan_in_fan_out=True))
    caplog.clear()
    model(torch.randn(3, 8))
    assert "fan_in_fan_out=True (a transformers Conv1D base)" in caplog.text


@pytest.mark.parametrize("quantized", [False, True], ids=["dense", "nf4"])
def test_timing_pair_reports_both(quantized):
    from speclora_kernels.peft.bench import timing_pair

    out = timing_pair(128, 64, r=4, tokens=3, quantized=quantized, repeats=2, warmup=1)
    assert out["max_rel_err"] < 1e-5 and out["quantized"] == quantized
    for mode in ("forward_us", "train_step_us"):
        assert set(out[mode]) == {"peft", "patched"} and min(out[mode].values()) > 0
    assert out["ratio"]["forward"] == pytest.approx(out["forward_us"]["patched"]
                                                    / out["forward_us"]["peft"])
    assert not is_patched()  # it patches its own model only
