"""PNG figures of a :func:`.report.analyse` result, one per layer kind, in the style of the
SpecLoRA paper's Figs. 1-2: per singular index, the ratio sigma'_i / sigma_i and the
|cos| between the singular vectors before and after; and the energy share of dW held by the
top-k directions of W0. One line per layer (darker: deeper), or the mean and the min-max
band when a kind has more than :data:`MAX_LINES` layers. matplotlib is needed only here
and imported on use (it is not a dependency of the library)."""
from __future__ import annotations

import os
import re

MAX_LINES = 12


def require_matplotlib():
    """matplotlib with a file-only backend, or ``ImportError`` saying what to do."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the plots need matplotlib (pip install matplotlib), or pass --no-plots "
                          "for the JSON only") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(ax, entries: list[dict], key, label_of) -> None:
    import numpy as np

    rows = [[np.nan if v is None else v for v in key(e)] for e in entries]
    if not rows or not rows[0]:
        return
    width = max(len(r) for r in rows)
    data = np.array([r + [np.nan] * (width - len(r)) for r in rows])
    x = np.arange(1, width + 1)
    if len(entries) > MAX_LINES:
        ax.fill_between(x, np.nanmin(data, 0), np.nanmax(data, 0), alpha=0.25, color="C0",
                        label="min-max")
        ax.plot(x, np.nanmean(data, 0), color="C0", label=f"mean of {len(entries)}")
        return
    import matplotlib

    colors = matplotlib.colormaps["viridis_r"](np.linspace(0.15, 0.95, len(entries)))
    for row, entry, color in zip(data, entries, colors):
        ax.plot(x, row, color=color, lw=1.2, label=label_of(entry))


def _block_label(name: str) -> str:
    index = re.findall(r"(?<=\.)\d+(?=\.)", name)
    return f"block {index[0]}" if index else name


def plot_kind(kind: str, entries: dict[str, dict], path: str, measure: str) -> str:
    """One figure for the layers ``entries`` (name -> layer result) of one kind; returns ``path``."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.1))
    items = list(entries.items())
    values = [e for _, e in items]
    labels = {id(e): _block_label(n) for n, e in items}
    label_of = lambda e: labels[id(e)]
    panels = [
        (lambda e: e["ratio"], "σ'ᵢ / σᵢ", "singular value ratio"),
        (lambda e: e["cos_u"], "|⟨uᵢ, u'ᵢ⟩|", "left singular vectors"),
        (lambda e: e["cos_v"], "|⟨vᵢ, v'ᵢ⟩|", "right singular vectors"),
        (lambda e: e["energy"].get(measure, []), f"share of ‖ΔW‖² ({measure})", "top-k of W0 holds"),
    ]
    for i, (ax, (key, ylabel, title)) in enumerate(zip(axes, panels)):
        _series(ax, values, key, label_of)
        ax.set_xlabel("k" if i == len(panels) - 1 else "singular index i")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    best = [e["energy"].get("best_rank_k", []) for e in values]
    for curve in best if len(values) <= MAX_LINES else []:
        axes[3].plot(range(1, len(curve) + 1), curve, color="grey", lw=0.8, ls="--")
    if any(best) and len(values) <= MAX_LINES:
        handle, = axes[3].plot([], [], color="grey", lw=0.8, ls="--")
        axes[3].legend([handle], ["best rank k (ΔW's own SVD)"], fontsize=7, loc="lower right")
    if all(e["unchanged"] for e in values):
        axes[3].text(0.5, 0.5, "unchanged (ΔW = 0)", ha="center", va="center", transform=axes[3].transAxes)
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    for ax in axes[1:]:
        ax.set_ylim(-0.02, 1.02)
    if len(values) <= MAX_LINES:
        axes[0].legend(fontsize=7, ncol=2)
    shapes = sorted({"x".join(map(str, e["shape"])) for e in values})
    solvers = sorted({e["svd"] for e in values})
    count = f"{len(values)} layer{'s' if len(values) > 1 else ''}"
    fig.suptitle(f"{kind}  ({count}, {', '.join(shapes)}, SVD: {', '.join(solvers)})",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def file_stem(kind: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", kind).strip("_") or "layer"


def plot_result(result: dict, out: str | os.PathLike, prefix: str = "spectrum_") -> list[str]:
    """One PNG per layer kind under ``out`` (``<prefix><kind>.png``); returns their paths."""
    by_kind: dict[str, dict] = {}
    for name, entry in result["layers"].items():
        by_kind.setdefault(entry["kind"], {})[name] = entry
    os.makedirs(out, exist_ok=True)
    measure = result["settings"]["measure"]
    return [plot_kind(kind, entries, os.path.join(out, f"{prefix}{file_stem(kind)}.png"), measure)
            for kind, entries in by_kind.items()]
