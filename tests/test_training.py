"""Adapted models in the usual training and inference machinery: transformers.Trainer,
gradient checkpointing, torch.compile, model.generate."""
import copy

import pytest
import torch
from _tiny_models import VOCAB, logits, perturb, tiny_llama, token_ids  # noqa: F401

from speclora_kernels.integrations import adapter_layers, inject, merge_and_unload
from speclora_kernels.persistence import load_adapter, save_adapter

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")


def progressions(n, length=16, seed=0):
    """``a, a+d, a+2d, ... mod VOCAB``: learnable, and a random model is at ln(VOCAB)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    step = torch.randint(1, 4, (n, 1), generator=gen)
    return (start + step * torch.arange(length)) % VOCAB


def lm_loss(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_trainer_lowers_the_loss(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = inject(tiny_llama(), "speclora", "all-linear", r=8, k=4, alpha=16, verbose=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_ids, held_out = progressions(256), progressions(64, seed=1)
    before = lm_loss(model, held_out)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=60, learning_rate=1e-2,
                             per_device_train_batch_size=16, lr_scheduler_type="constant",
                             logging_steps=20, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    dataset = [{"input_ids": ids, "labels": ids} for ids in train_ids]
    result = Trainer(model=model, args=args, train_dataset=dataset).train()
    model.eval()
    after = lm_loss(model, held_out)
    assert before > 4.5 and after < before - 0.3, (before, after, result)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    speclora_m = [layer.adapter.m for layer in adapter_layers(model).values()]
    assert all(m.abs().sum() > 0 for m in speclora_m)  # the spectral masks trained too


@pytest.mark.parametrize("method", ["speclora", "pica"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    """Checkpointed blocks recompute their forward; the dropout seed is drawn from torch's
    CPU RNG, which checkpointing restores, so gradients are the same."""
    opts = {"r": 4, "k": 4, "dropout": 0.2} if method == "speclora" else {"r": 4}
    ids = progressions(4)
    grads = []
    for checkpointing in (False, True):
        model = inject(tiny_llama(), method, "all-linear", verbose=False, **opts)
        perturb(model)
        if checkpointing:  # transformers 5 renamed gradient_ to activation_checkpointing
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
        model.train()
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_torch_compile_matches_eager(tmp_path):
    ids = progressions(2, length=8)
    model = inject(tiny_llama(layers=1), "speclora", "all-linear", r=4, k=4, verbose=False)
    perturb(model)
    model.train()
    eager = model(input_ids=ids, labels=ids).loss
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, backend="inductor")
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for name, grad in want.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6)
    # The wrapper is transparent to the adapter tools: same names as the bare model.
    save_adapter(compiled, tmp_path)
    fresh = load_adapter(tiny_llama(layers=1), tmp_path)
    assert sorted(adapter_layers(fresh)) == sorted(adapter_layers(compiled))


def test_generate_matches_original_and_merged():
    prompt = progressions(2, length=5)
    base = tiny_llama()
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    model = inject(tiny_llama(), "speclora", "all-linear", r=4, k=4, verbose=False)
    assert torch.equal(model.generate(prompt, **kwargs), base.generate(prompt, **kwargs))
    perturb(model, scale=0.3)
    adapted = model.generate(prompt, **kwargs)
    assert not torch.equal(adapted, base.generate(prompt, **kwargs))
    merged = merge_and_unload(copy.deepcopy(model))
    assert torch.equal(merged.generate(prompt, **kwargs), adapted)
    torch.testing.assert_close(logits(merged, token_ids()), logits(model, token_ids()),
                               rtol=1e-5, atol=1e-5)
