"""A whole model's comparison: every target layer through :func:`.analysis.layer_spectrum`,
as one JSON-ready result (:data:`SCHEMA`, version :data:`SCHEMA_VERSION`), the console
table, and the suggested k as ready ``inject`` calls and a PEFT ``rank_pattern``."""
from __future__ import annotations

import json
import os
import sys

import torch

from ..integrations.inject import share_key
from .analysis import check_settings, layer_spectrum
from .load import Weights, adapter_changes, compile_targets, is_adapter_dir, select_layers

SCHEMA = "speclora_kernels.spectrum"
SCHEMA_VERSION = 1
JSON_NAME = "spectrum.json"


def kind_of(name: str) -> str:
    """A layer's kind: its name after the block index (``encoder.layer.3.attention.self.query``
    -> ``attention.self.query``), or the whole name outside numbered blocks."""
    return share_key(name).rpartition("*.")[2]


def _progress(names: list[str], enabled: bool):
    """Iterate ``names`` with a tqdm bar on stderr (a plain counter without tqdm)."""
    if not enabled:
        yield from names
        return
    try:
        from tqdm import tqdm
    except ImportError:
        for i, name in enumerate(names, 1):
            print(f"\rspectrum: layer {i}/{len(names)} {name}", end="", file=sys.stderr, flush=True)
            yield name
        print(file=sys.stderr)
        return
    yield from tqdm(names, desc="spectrum", unit="layer", file=sys.stderr)


def analyse(base, finetuned, *, top: int = 32, k: int | None = None, share: float = 0.9,
            measure: str = "two_sided", targets: str | None = None, svd: str = "auto",
            progress: bool = False) -> dict:
    """Compare the weights ``base`` (a safetensors file or folder) with ``finetuned`` (the
    same after full fine-tuning, or an adapter directory of ours or PEFT's), layer by layer.

    Arguments as in :func:`.analysis.layer_spectrum`; ``targets``: a regex the whole module
    name must match (default: every common 2-D weight but embeddings and norms, or every
    layer the adapter adapts). Raises ``FileNotFoundError`` / ``ValueError`` naming BASE,
    FINETUNED or the argument for missing files, other shapes, no common layers, bad values.
    """
    check_settings(top, k, share, measure, svd)
    pattern = compile_targets(targets)
    if is_adapter_dir(base):
        raise ValueError(f"BASE: {base} is an adapter directory; pass the model's weights as BASE and "
                         f"the adapter as FINETUNED")
    base_weights = Weights(base, "BASE")
    if is_adapter_dir(finetuned):
        changes = adapter_changes(base_weights, finetuned, verbose=progress)
        names = [n for n in changes if pattern is None or pattern.fullmatch(n)]
        skipped = {n: "not matched by --targets" for n in changes if n not in names}
        if not names:
            raise ValueError(f"targets={targets!r} matched none of the adapter's layers, e.g. "
                             f"{list(changes)[:5]}")
        kind = "adapter"

        def pair(name):
            return base_weights.load(f"{name}.weight"), changes[name].delta()
    else:
        tuned = Weights(finetuned, "FINETUNED")
        names, skipped = select_layers(base_weights, tuned, targets)
        kind = "weights"

        def pair(name):
            w0 = base_weights.load(f"{name}.weight").to(torch.float64)
            return w0, tuned.load(f"{name}.weight").to(torch.float64) - w0
    layers = {}
    for name in _progress(names, progress):
        weight, delta = pair(name)
        entry = layer_spectrum(weight, delta, top=top, k=k, share=share, measure=measure, svd=svd)
        extra = {"method": changes[name].method} if kind == "adapter" else {}
        layers[name] = {"kind": kind_of(name), **extra, **entry}
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "base": os.fspath(base), "finetuned": os.fspath(finetuned), "finetuned_kind": kind,
            "settings": {"top": top, "k": k, "share": share, "measure": measure, "svd": svd,
                         "targets": targets},
            "layers": layers, "skipped": skipped, "suggest": suggestion(layers)}


def suggestion(layers: dict) -> dict:
    """The suggested k of every changed layer: ``groups`` (k -> layer names, for one
    ``inject`` call each), ``rank_pattern`` (name -> k, PEFT's form), ``not_reached`` (layers
    whose curve never got to the share)."""
    groups: dict[int, list[str]] = {}
    pattern, missing = {}, []
    for name, entry in layers.items():
        k = entry["suggested_k"]
        if k is None:
            missing.append(name)
        elif k > 0:
            groups.setdefault(k, []).append(name)
            pattern[name] = k
    return {"groups": {str(k): groups[k] for k in sorted(groups)}, "rank_pattern": pattern,
            "not_reached": missing}


def write_json(result: dict, out: str | os.PathLike) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, JSON_NAME)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, allow_nan=False)
        f.write("\n")
    return path


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict) -> str:
    """One line per layer: shape, SVD used, sigma_1 ratio, |cos| of u_1 and v_1, the
    relative change, the suggested k."""
    settings = result["settings"]
    width = max([len(n) for n in result["layers"]] + [5])
    head = (f"{'layer':<{width}}  {'shape':>11}  {'svd':<10}  {'s1 ratio':>8}  {'|cos u1|':>8}  "
            f"{'|cos v1|':>8}  {'|dW|/|W0|':>9}  k@{settings['share']:g}")
    lines = [head]
    for name, e in result["layers"].items():
        k = "unchanged" if e["unchanged"] else (f">{e['curve_k']}" if e["suggested_k"] is None
                                                else str(e["suggested_k"]))
        shape = f"{e['shape'][0]}x{e['shape'][1]}"
        lines.append(f"{name:<{width}}  {shape:>11}  {e['svd']:<10}  {_fmt(e['ratio'][0], '8.4f')}  "
                     f"{_fmt(e['cos_u'][0], '8.4f')}  {_fmt(e['cos_v'][0], '8.4f')}  "
                     f"{_fmt(e['relative_change'], '9.2e')}  {k}")
    solvers = sorted({e["svd"] for e in result["layers"].values()})
    lines.append(f"{len(result['layers'])} layers; SVD: {', '.join(solvers)}; k: smallest k whose top-k "
                 f"singular directions of W0 hold >= {settings['share']:g} of ||dW||_F^2 "
                 f"({settings['measure']})")
    return "\n".join(lines)


def format_suggestion(result: dict) -> str:
    """The suggested k as Python ready to paste: ``inject`` calls (one per k) and a PEFT
    ``rank_pattern``."""
    s, settings = result["suggest"], result["settings"]
    lines = [f"# k per layer: smallest k whose top-k singular directions of W0 hold >= "
             f"{settings['share']:g} of ||dW||_F^2 ({settings['measure']})",
             "# speclora_kernels.inject, one call per k: SpecLoRA takes it as k (r=8 here is the "
             "LoRA rank: choose yours), spectral_additive / spectral_rotational as r"]
    for k, names in s["groups"].items():
        lines.append(f"inject(model, \"speclora\", {json.dumps(names)}, r=8, k={k})")
    lines.append("# PEFT: LoraConfig / SpectralAdapterConfig(rank_pattern=...), "
                 "SpecLoraConfig(k_pattern=...)")
    lines.append(f"rank_pattern = {json.dumps(s['rank_pattern'], indent=1)}")
    if s["not_reached"]:
        lines.append(f"# not reached within the energy curve (--k): {s['not_reached']}")
    return "\n".join(lines)
