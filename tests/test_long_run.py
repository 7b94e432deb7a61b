"""A long run: 2,000 AdamW steps on a small adapted Llama (speclora, dropout 0.1) on CPU,
loss and a parameter checksum recorded every 50 steps, checkpointed at step 1,000 with
save_checkpoint (adapter + optimizer + RNG states, safetensors/JSON, no pickle), resumed in
a fresh model after the global RNG was scrambled: every recorded loss and checksum equals
the uninterrupted run's, bitwise. 14-21 s on this shared box (~5.5 ms per step, 3,050 steps).
"""
import hashlib
import os

import pytest
import torch
from _tiny_models import VOCAB, llama_config

from speclora_kernels import AdapterFileError
from speclora_kernels.integrations import inject
from speclora_kernels.persistence import load_checkpoint, save_checkpoint
from speclora_kernels.persistence.checkpoint import STATE_NAME

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
STEPS, RESUME_AT, EVERY = 2000, 1000, 50


def base_model():
    """One Llama layer at half the width of _tiny_models' (2,076 trainable parameters with
    speclora r=4, k=4 on every linear layer)."""
    from transformers import LlamaForCausalLM

    config = llama_config(1)
    config.hidden_size, config.intermediate_size, config.head_dim = 32, 64, 16
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def adapted(seed):
    torch.manual_seed(seed)  # the adapter's init, overwritten by a resumed checkpoint
    model = inject(base_model(), "speclora", "all-linear", r=4, k=4, alpha=6, dropout=0.1,
                   verbose=False)
    return model.train()


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3,
                             weight_decay=0.01)


# Eight fixed sequences the model can learn; step t trains on two of them.
POOL = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(5))


def batch(step):
    return POOL[[step % 8, (3 * step + 1) % 8]]


def checksum(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(model, opt, start, stop, checkpoint=None):
    """Steps ``start`` .. ``stop - 1``; ``{step: (loss, checksum)}`` every EVERY steps."""
    record = {}
    for step in range(start, stop):
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done % EVERY == 0:
            record[done] = (loss.item().hex(), checksum(model))  # fp32 -> float is exact
        if checkpoint is not None and done == RESUME_AT:
            save_checkpoint(checkpoint, model, opt, step=done, extra={"note": "mid-run"})
    return record


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    model = adapted(seed=1)
    opt = optimizer(model)
    full = train(model, opt, 0, STEPS, checkpoint=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors",
                                            STATE_NAME]
    first, last = (float.fromhex(full[s][0]) for s in (EVERY, STEPS))
    assert last < first - 0.1, (first, last)  # it learns (4.69 -> 4.43): not a constant run

    torch.manual_seed(12345)  # a different RNG state than at the checkpoint
    fresh = adapted(seed=2)
    assert checksum(fresh) != full[RESUME_AT][1]
    opt2 = optimizer(fresh)
    info = load_checkpoint(tmp_path, fresh, opt2)
    assert info == {"step": RESUME_AT, "extra": {"note": "mid-run"}}
    assert checksum(fresh) == full[RESUME_AT][1]
    resumed = train(fresh, opt2, RESUME_AT, STEPS)
    assert len(resumed) == (STEPS - RESUME_AT) // EVERY == 20
    drift = [s for s in resumed if resumed[s] != full[s]]
    assert not drift, f"resumed run drifts from step {drift[0]}"


def test_resume_without_rng_state_drifts(tmp_path):
    """Control: the RNG state matters (dropout), so a resume that skipped it would differ;
    and a trainer state that belongs to another adapter is refused."""
    model = adapted(seed=1)
    opt = optimizer(model)
    save_checkpoint(tmp_path, model, opt, step=0)
    want = train(model, opt, 0, EVERY)
    fresh = adapted(seed=1)
    opt2 = optimizer(fresh)
    load_checkpoint(tmp_path, fresh, opt2)
    torch.manual_seed(999)  # undo the restored RNG state
    got = train(fresh, opt2, 0, EVERY)
    assert got[EVERY] != want[EVERY]

    state = (tmp_path / STATE_NAME).read_bytes()
    save_checkpoint(tmp_path, model, opt, step=EVERY)  # newer adapter ...
    (tmp_path / STATE_NAME).write_bytes(state)  # ... with the older trainer state
    with pytest.raises(AdapterFileError, match="belongs to another adapter"):
        load_checkpoint(tmp_path, fresh, opt2)
