"""Several saved adapters of one base fused into one model: :func:`fuse_adapters`.

Each layer's adapters become one adapter of their method by the rules of
:mod:`speclora_kernels.methods.combine` (spectral slices on disjoint singular indices:
exact, one block of rows each; LoRA / SpecLoRA / PiCa: PEFT's ``cat`` or ``linear``), so the
fused layer is an ordinary ``AdapterLinear``: one fused op call per layer, ``merge`` /
``merge_and_unload`` / ``save_adapter`` as for any adapter.

Not exported from ``speclora_kernels.integrations`` (it reads files, and
``speclora_kernels.persistence`` builds on ``integrations``): import it from
``speclora_kernels`` or from here.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from ..methods import get_method
from ..methods.combine import COMBINATIONS, CombineError, check_weights, combine_adapters
from ..modules import AdapterLinear
from ..persistence.model import check_fingerprint, check_layer, layer_spec, read_adapter
from ..persistence.schema import AdapterFileError
from .inject import _set_submodule, adapter_layers, base_fingerprint, freeze_non_adapter, is_linear4bit, unwrap

# Keys of a saved layer that every adapter fused into it must share.
_SAME = ("dropout", "adapter_dtype", "share_with", "source", "in_features", "out_features",
         "bias")


def _part(entry: dict, tensors: dict):
    """The saved adapter of one layer as a method module holding the file's tensors."""
    spec = layer_spec(entry)
    cls = get_method(entry["method"])
    weight = torch.empty(entry["out_features"], entry["in_features"], device="meta")
    part = cls(weight, adapter_dtype=spec["adapter_dtype"], **spec["options"])
    part.load_state_dict(tensors, assign=True)
    return part


def _check_layer_group(name: str, dirs: list, entries: list[dict], module,
                       check_base: bool) -> None:
    for directory, entry in zip(dirs, entries):
        try:
            check_layer(name, entry, module)
            if check_base:
                check_fingerprint(name, entry, base_fingerprint(module))
        except AdapterFileError as e:
            raise AdapterFileError(f"{directory}: {e}") from None
        if entry.get("quantize") or entry.get("base_quant") or is_linear4bit(module):
            raise ValueError(f"{directory}: {name}: fuse_adapters fuses adapters of dense "
                             f"bases; this one is NF4 (quantize the fused, merged model "
                             f"instead)")
    for key in _SAME:
        values = [e.get(key) for e in entries]
        if len(set(map(repr, values))) > 1:
            raise ValueError(f"{name}: the adapters differ in {key} ({values}, in the order "
                             f"of {dirs}); fused adapters must agree on it")


def fuse_adapters(model: nn.Module, directories: Sequence[str | os.PathLike],
                  weights: Sequence[float] | None = None, *, combination: str = "cat",
                  check_base: bool = True) -> nn.Module:
    """Load several adapters that :func:`~speclora_kernels.save_adapter` wrote for one
    base into ``model`` (a plain pre-trained model, not adapted yet), one fused adapter
    per layer; returns ``model``.

    Args:
        directories: two or more adapter directories, adapting the same layers.
        weights: one number per directory scaling that adapter's delta (None: all 1).
            Spectral slices take 1 only (see :mod:`speclora_kernels.methods.combine`).
        combination: the LoRA-family rule, PEFT's ``add_weighted_adapter`` semantics:
            ``"cat"`` (ranks concatenated, exactly the weighted sum of the deltas) or
            ``"linear"`` (one rank, PEFT's approximation). Spectral slices fuse by
            concatenation (``"cat"``) only.
        check_base: refuse adapters whose base fingerprint is not the model's weight's.

    Every file and rule is checked before the model changes; refused, with the directory
    and layer named: a file not written by ``save_adapter``, adapters of another base
    (fingerprint), different target layers, methods no rule combines, overlapping or
    gapped spectral slices, weights a rule does not take, NF4 bases, adapters differing in
    dropout, dtype or PiCa sharing.
    """
    dirs = [os.fspath(d) for d in directories] if not isinstance(directories, (str, bytes)) \
        else None
    if not dirs or len(dirs) < 2:
        raise ValueError(f"directories must be a list of at least 2 adapter directories, got "
                         f"{directories!r}")
    weights = check_weights(weights, len(dirs))
    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
    bare = unwrap(model)
    if adapter_layers(bare):
        raise ValueError("model already has adapter layers; fuse_adapters loads into the plain "
                         "pre-trained model")
    saved = [read_adapter(d) for d in dirs]
    names = list(saved[0][0])
    for directory, (layers, _) in zip(dirs[1:], saved[1:]):
        if set(layers) != set(names):
            only_a = sorted(set(names) - set(layers))[:3]
            only_b = sorted(set(layers) - set(names))[:3]
            raise ValueError(f"{dirs[0]} and {directory} adapt different layers (only in the "
                             f"first: {only_a}, only in the second: {only_b}); fused adapters "
                             f"must target the same layers")
    modules = dict(bare.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    names.sort(key=lambda n: order.get(n, -1))
    for name in names:
        _check_layer_group(name, dirs, [s[0][name] for s in saved], modules.get(name),
                           check_base)
    fused = {}
    for name in names:  # model order: a PiCa M's owner before the layers sharing it
        entry = saved[0][0][name]
        owner = entry.get("share_with")
        parts = [_part(layers[name], tensors[name]) for layers, tensors in saved]
        try:
            fused[name] = combine_adapters(parts, weights, combination,
                                           shared=fused[owner].M if owner else None)
        except CombineError as e:
            raise ValueError(f"{name} (adapters {dirs}): {e}") from None
    for name in names:  # one layer at a time, as adapt_layers (a new W_res each)
        module, adapter = modules[name], fused[name]
        weight = module.weight.detach()
        adapter.to(weight.device)
        layer = AdapterLinear(adapter.base_weight(weight),
                              None if module.bias is None else module.bias.detach(), adapter,
                              saved[0][0][name]["dropout"])
        layer.train(module.training)
        layer.inject_meta = {"fingerprint": base_fingerprint(module),
                             "source": type(module).__name__, "quantize": None}
        _set_submodule(bare, name, layer)
    freeze_non_adapter(bare)
    return model


__all__ = ["fuse_adapters"]
