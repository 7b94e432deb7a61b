"""The correctness cases: their axes, an all-pairs covering design over them, and extras.

Pure Python (no torch, no GPU): the planner and the CPU tests use it as it is.

The full product of the axes below has 8,640 cases. A covering design (every pair of values
of any two axes appears together in at least one case) needs a few dozen: any single wrong
interaction of two axes (bf16 with the segmented path, NF4 without double quant at M = 1,
...) shows up in some case. The design is greedy and deterministic; its rows come out in
the order they were built, each covering as many new pairs as it could, so trimming the
tail loses the fewest pairs. With budget to spare, ``extra_cases`` adds a fixed
pseudo-random sample of the remaining product.
"""
from __future__ import annotations

import itertools
import math
import random

# method pattern -> (R, dropout_rows, grad_rows, inputs that need a gradient), as each method
# drives the op (tests/test_ops_nf4.py, PATTERNS). dropout_rows None: every row; 0: the
# method has no trainable down path (dropout is then inactive whatever p is).
PATTERNS = {
    "lora": (6, None, None, ("x", "down", "up")),
    "speclora": (9, 6, 6, ("x", "down", "scale", "up")),
    "spectral_additive": (6, 0, None, ("x", "down", "up")),
    "spectral_rotational": (6, 0, None, ("x", "down", "scale", "up")),
    "spectral_on_linear4bit": (12, 0, 6, ("x", "down", "up")),  # W0 base, frozen -term rows
    "pica": (6, 0, None, ("x", "up")),
}
# "fp32": fp32-accurate dots (torch's default precision; the kernels run tf32x3); "tf32":
# fp32 with torch.backends.cuda.matmul.fp32_precision="tf32"
DTYPES = ("fp32", "tf32", "fp16", "bf16")
PATHS = ("fused", "split", "segmented", "splitk")  # splitk: the decode forward (M <= 16)
BASES = ("dense", "nf4_dq", "nf4_nodq")
DROPOUTS = (0.0, 0.3)
ROWS = (1, 16, 17, 130, 512)
# shape -> (in_features, out_features, NF4 blocksize)
SHAPES = {
    "wide": (256, 200, 64),   # K a multiple of the block (NF4 row decoder); 4 column tiles
    "n1": (256, 1, 64),       # one output column
    "k75": (75, 96, 64),      # odd in_features: NF4 rows start mid-byte (span decoder)
    "k160": (160, 136, 128),  # even, not a multiple of the 128 block: rows start mid-block
}
AXES = {
    "method": tuple(PATTERNS),
    "dtype": DTYPES,
    "path": PATHS,
    "base": BASES,
    "dropout": DROPOUTS,
    "M": ROWS,
    "shape": tuple(SHAPES),
}


def product_size(axes: dict = AXES) -> int:
    return math.prod(len(v) for v in axes.values())


def all_pairs(axes: dict) -> set:
    """Every pair of values of two different axes, as ((axis i, value index), (axis j, value
    index)) with i < j."""
    names = list(axes)
    return {((i, a), (j, b))
            for i, j in itertools.combinations(range(len(names)), 2)
            for a in range(len(axes[names[i]])) for b in range(len(axes[names[j]]))}


def pairs_of(row: tuple) -> set:
    """The pairs a row (one value index per axis) covers."""
    return {((i, row[i]), (j, row[j])) for i, j in itertools.combinations(range(len(row)), 2)}


def covering_design(axes: dict = AXES) -> list[dict]:
    """Rows (one value per axis) such that every pair of values of two axes is in some row.

    Greedy and deterministic: each row starts from the smallest pair nobody covers yet and
    gives every other axis, in axis order, the value that covers the most still-uncovered
    pairs with the values chosen so far (ties: the earlier value)."""
    names = list(axes)
    todo = all_pairs(axes)
    rows = []
    while todo:
        (i, a), (j, b) = min(todo)
        row = {i: a, j: b}
        for k in range(len(names)):
            if k in row:
                continue

            def gain(v, k=k):
                return sum((((m, row[m]), (k, v)) if m < k else ((k, v), (m, row[m]))) in todo
                           for m in row)

            row[k] = max(range(len(axes[names[k]])), key=lambda v: (gain(v), -v))
        full = tuple(row[k] for k in range(len(names)))
        todo -= pairs_of(full)
        rows.append(full)
    return [_named(axes, r) for r in rows]


def _named(axes: dict, row: tuple) -> dict:
    return {name: axes[name][v] for name, v in zip(axes, row)}


def _indices(axes: dict, case: dict) -> tuple:
    return tuple(axes[name].index(case[name]) for name in axes)


def pair_coverage(cases: list[dict], axes: dict = AXES) -> tuple[int, int]:
    """(pairs the cases cover, pairs there are)."""
    want = all_pairs(axes)
    seen = set()
    for case in cases:
        seen |= pairs_of(_indices(axes, case))
    return len(seen & want), len(want)


def extra_cases(n: int, exclude: list[dict], axes: dict = AXES, seed: int = 0) -> list[dict]:
    """``n`` more cases drawn without replacement from the rest of the full product, in a
    fixed pseudo-random order (the same every run)."""
    sizes = [len(v) for v in axes.values()]
    taken = {_indices(axes, c) for c in exclude}
    total = math.prod(sizes)
    n = max(0, min(n, total - len(taken)))
    rng = random.Random(seed)
    out = []
    for flat in rng.sample(range(total), min(total, n + len(taken))):
        row = []
        for size in reversed(sizes):
            flat, v = divmod(flat, size)
            row.append(v)
        row = tuple(reversed(row))
        if row in taken:
            continue
        taken.add(row)
        out.append(_named(axes, row))
        if len(out) == n:
            break
    return out


def correctness_cases(n: int, axes: dict = AXES) -> list[dict]:
    """The first ``n`` cases: the covering design (trimmed from its tail if ``n`` is
    smaller), then extras. Each case gets an ``id``."""
    cover = covering_design(axes)
    cases = cover[:n] + extra_cases(n - len(cover), cover, axes) if n > len(cover) else cover[:n]
    return [{"id": f"c{i:03d}", **case} for i, case in enumerate(cases)]


def case_label(case: dict) -> str:
    """A short readable name: ``speclora bf16 fused nf4_dq p0.3 M17 k75``."""
    return (f"{case['method']} {case['dtype']} {case['path']} {case['base']} "
            f"p{case['dropout']:g} M{case['M']} {case['shape']}")
