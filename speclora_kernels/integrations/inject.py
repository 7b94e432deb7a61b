"""Adapt a whole model: pick target layers as PEFT does, swap them for ``AdapterLinear``,
freeze the rest; undo with :func:`merge_and_unload`.

Targets are ``nn.Linear`` and ``bitsandbytes.nn.Linear4bit`` modules (the latter is an
``nn.Linear`` subclass and goes through ``AdapterLinear.from_linear`` the same way).
"""
from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable

import torch
from torch import nn

from ..methods import get_method
from ..methods.base import resolve_adapter_dtype
from ..modules import AdapterLinear

ALL_LINEAR = "all-linear"
# Evenly spaced elements of a base weight that its fingerprint hashes (see base_fingerprint).
FINGERPRINT_SAMPLES = 4096


# ---------------------------------------------------------------- model structure helpers
def unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` (``_orig_mod``) and DDP/DataParallel (``module``)
    wrappers, so module names are the ones of the bare model."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """Every ``AdapterLinear`` of ``model`` by its module name (wrappers removed)."""
    return {name: m for name, m in unwrap(model).named_modules() if isinstance(m, AdapterLinear)}


def is_linear4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a ``bitsandbytes.nn.Linear4bit`` (without importing bitsandbytes:
    if it was never imported, no module can be one)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


# ---------------------------------------------------------------- target matching
def _check_names(arg: str, value) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Iterable):
        names = tuple(value)
        if names and all(isinstance(n, str) for n in names):
            return names
    raise TypeError(f"{arg} must be a string (regex, full match) or a non-empty list of module "
                    f"names, got {value!r}")


def matches(name: str, patterns: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches a name
    equal to an entry or ending in ``"." + entry``."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(model: nn.Module, target_modules, exclude_modules=None) -> list[str]:
    """Names of the modules of ``model`` that ``inject`` would adapt, in model order.

    ``target_modules`` follows PEFT: a regex string (full match), a list of names or name
    suffixes, or ``"all-linear"`` (every linear layer but the output embeddings).
    ``exclude_modules`` (same forms) removes names. Raises ``ValueError`` if nothing
    matches, and ``TypeError`` for a matched module that is not a linear layer.
    """
    targets = _check_names("target_modules", target_modules)
    if targets is None:
        raise ValueError("target_modules is required: e.g. ['q_proj', 'v_proj'], a regex, "
                         "or 'all-linear'")
    exclude = _check_names("exclude_modules", exclude_modules)
    model = unwrap(model)
    modules = dict(model.named_modules())
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = [n for n, m in modules.items() if isinstance(m, nn.Linear) and m is not head]
    else:
        chosen = [n for n in modules if n and matches(n, targets)]
    if exclude is not None:
        chosen = [n for n in chosen if not matches(n, exclude)]
    for name in chosen:
        module = modules[name]
        if isinstance(module, AdapterLinear):
            raise ValueError(f"module {name!r} is already an AdapterLinear; inject each layer once")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; only "
                            f"torch.nn.Linear and bitsandbytes Linear4bit can be adapted "
                            f"(target_modules={target_modules!r})")
    if not chosen:
        linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"target_modules={target_modules!r} matched no module; linear layers "
                         f"of this model include {linear}")
    return chosen


def share_key(name: str) -> str:
    """PiCa sharing group of a layer: its name with layer indices replaced by ``*``
    (``model.layers.3.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``), so every
    ``q_proj`` shares one ``M`` but BERT's ``attention.output.dense`` and ``output.dense``
    do not."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", name)


# ---------------------------------------------------------------- fingerprints
def base_fingerprint(module: nn.Module) -> str:
    """sha256 of a linear layer's pre-trained weight: its kind, shape and dtype, and
    ``FINGERPRINT_SAMPLES`` evenly spaced elements (the packed NF4 codes for ``Linear4bit``,
    which stay put when bitsandbytes re-lays its absmax). Identifies the base an adapter
    belongs to without reading the whole weight; device independent."""
    if is_linear4bit(module):
        from ..quant import NF4Weight

        nf4 = NF4Weight.from_bnb(module)
        kind, data, shape, dtype = "nf4", nf4.packed, tuple(nf4.shape), nf4.dtype
    else:
        data = module.weight.detach()
        kind, shape, dtype = "dense", tuple(data.shape), data.dtype
    flat = data.reshape(-1)
    step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
    sample = flat[::step][:FINGERPRINT_SAMPLES].to("cpu").contiguous()
    digest = hashlib.sha256(f"{kind}|{shape}|{dtype}|{step}|".encode())
    digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- inject
def _build_layer(name: str, module: nn.Linear, spec: dict, shared, generator) -> AdapterLinear:
    """``AdapterLinear.from_linear`` for one layer; errors name the layer."""
    options = dict(spec.get("options") or {})
    if shared is not None:
        options["shared"] = shared
    try:
        return AdapterLinear.from_linear(module, spec["method"], dropout=spec.get("dropout", 0.0),
                                         adapter_dtype=spec.get("adapter_dtype"),
                                         quantize=spec.get("quantize"), generator=generator,
                                         **options)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from err


def _check_specs(modules: dict, specs: dict[str, dict]) -> None:
    """The per-layer checks ``from_linear`` would fail on mid-way (the method, its options
    against each layer's shape, PiCa groups' shapes), for every layer before any is
    replaced."""
    for name, spec in specs.items():
        module = modules[name]
        try:
            method = get_method(spec["method"])
            dtype = resolve_adapter_dtype(module.weight, spec.get("adapter_dtype"))
            method.resolve_options((module.out_features, module.in_features),
                                   spec.get("options") or {}, dtype=dtype,
                                   device=module.weight.device)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from err
        owner = spec.get("share_with")
        if owner is not None and modules[owner].out_features != module.out_features:
            raise ValueError(f"{name}: a PiCa layer shares M with {owner}, so both need the "
                             f"same out_features, got {module.out_features} and "
                             f"{modules[owner].out_features}")


def adapt_layers(model: nn.Module, specs: dict[str, dict], *, generator=None,
                 fingerprints: dict[str, str] | None = None, verbose: bool = False) -> nn.Module:
    """Replace each named linear module by an ``AdapterLinear`` built from its spec (keys:
    ``method``, ``options`` = the method's options as ``from_linear`` takes them, optional
    ``dropout``, ``adapter_dtype``, ``quantize``, ``share_with`` = name of an earlier PiCa
    layer whose ``M`` it shares), then freeze every parameter that is not an adapter's. The
    building block of :func:`inject`, ``load_adapter`` and ``load_peft_adapter``.

    Methods and options are checked for every layer before the first is replaced; layers
    are then replaced one at a time, so a ``spectral_*`` base (a new ``W_res``) never
    coexists with every original weight. ``verbose``: a tqdm bar while SVDs are computed.
    """
    model = unwrap(model)
    modules = dict(model.named_modules())
    names = list(specs)
    _check_specs(modules, specs)
    needs_svd = any("svd" in get_method(s["method"]).option_names() for s in specs.values())
    bar = _progress(len(names), f"SVD + inject ({len(names)} layers)", verbose and needs_svd)
    try:
        for name in names:
            spec, module = specs[name], modules.pop(name)
            fingerprint = (fingerprints or {}).get(name) or base_fingerprint(module)
            shared = None
            if spec.get("share_with") is not None:
                shared = modules[spec["share_with"]].adapter.M
            layer = _build_layer(name, module, spec, shared, generator)
            layer.train(module.training)  # a new module is in training mode; keep the model's
            layer.inject_meta = {"fingerprint": fingerprint, "source": type(module).__name__,
                                 "quantize": spec.get("quantize")}
            _set_submodule(model, name, layer)
            modules[name] = layer
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    freeze_non_adapter(model)
    return model


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return None
    return tqdm(total=total, desc=desc, unit="layer")


def freeze_non_adapter(model: nn.Module) -> None:
    """``requires_grad`` True for the parameters of every adapter, False for all others."""
    model = unwrap(model)
    trainable = {id(p) for layer in adapter_layers(model).values()
                 for p in layer.adapter.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def inject(model: nn.Module, method: str, target_modules, *, exclude_modules=None,
           dropout: float = 0.0, adapter_dtype: torch.dtype | None = None,
           quantize: str | None = None, generator: torch.Generator | None = None,
           verbose: bool = False, **options) -> nn.Module:
    """Replace the target linear layers of ``model`` by ``AdapterLinear`` (in place) and
    freeze every other parameter; returns ``model``.

    Args:
        method: a key of :data:`speclora_kernels.METHODS`.
        target_modules: as PEFT's ``LoraConfig.target_modules``: a list of module names or
            name suffixes (``["q_proj", "v_proj"]``), a regex string matched against the
            whole name, or ``"all-linear"``. ``exclude_modules`` takes the same forms.
        options: the method's options (``r``, ``k``, ``alpha``, ``svd``, ...), per layer,
            as in :meth:`AdapterLinear.from_linear` (options a method does not use raise).
        dropout, adapter_dtype, generator: per layer, as in ``from_linear``.
        quantize: passed to ``from_linear`` (``"nf4"`` quantizes a dense base) when given.
        verbose: show a tqdm bar while the layers' SVDs are computed and print the
            trainable-parameter summary; otherwise ``inject`` prints nothing.

    ``pica`` layers share one ``M`` per :func:`share_key` group (every ``q_proj`` of every
    block). ``inject`` may be called again for other targets (e.g. another method on the
    MLP); all adapters stay trainable.
    """
    get_method(method)
    names = find_targets(model, target_modules, exclude_modules)
    spec = {"method": method, "options": options, "dropout": dropout,
            "adapter_dtype": adapter_dtype, "quantize": quantize}
    specs, first_of_group = {}, {}
    for name in names:
        specs[name] = dict(spec)
        if method == "pica":
            first = first_of_group.setdefault(share_key(name), name)
            specs[name]["share_with"] = None if first == name else first
    adapt_layers(model, specs, generator=generator, verbose=verbose)
    if verbose:
        print(f"speclora_kernels: {method} on {len(names)} layers; {parameter_summary(model)}")
    return model


# ---------------------------------------------------------------- merge, summary
@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base and put back plain ``nn.Linear`` layers (in place);
    returns the bare model. The merged weights (``AdapterLinear.merged_weight``) keep the
    base dtype and stay frozen, as with PEFT's ``merge_and_unload``; an NF4 base becomes a
    dense layer of the dtype it dequantizes to (re-quantizing is left to the caller)."""
    model = unwrap(model)
    for name, layer in adapter_layers(model).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(layer.merged_weight(), requires_grad=False)
        if layer.bias is not None:
            linear.bias = layer.bias
        linear.train(layer.training)
        _set_submodule(model, name, linear)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, each tensor counted once (a PiCa ``M``
    shared by many layers counts once). A quantized base weight counts as its
    ``out x in`` elements, not its packed bytes, whether it is a parameter or not."""
    model = unwrap(model)
    params = {id(p): p for p in model.parameters()}
    logical, extra = {}, 0
    for module in model.modules():
        if isinstance(module, AdapterLinear) or is_linear4bit(module):
            n = module.in_features * module.out_features
            weight = getattr(module, "weight", None)
            if id(weight) in params:
                logical[id(weight)] = n
            else:
                extra += n
    trainable = sum(logical.get(i, p.numel()) for i, p in params.items() if p.requires_grad)
    total = sum(logical.get(i, p.numel()) for i, p in params.items()) + extra
    return trainable, total


def parameter_summary(model: nn.Module) -> str:
    """``trainable params: ... || all params: ... || trainable%: ...`` (PEFT's wording)."""
    trainable, total = count_parameters(model)
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
