"""Our methods in PEFT's adapter format, readable and writable without ``peft``.

``speclora_kernels.peft`` registers three PEFT method types; their layers hold, per adapter
name, the method module (``AdapterMethod``) under ``<prefix>adapter``, so PEFT's
``save_pretrained`` writes tensors named

    base_model.model.<module>.<prefix>adapter.<tensor>      (tensor: A, B, m, P, sigma, Q, ...)

and an ``adapter_config.json`` of the fields below. ``save_adapter`` writes the same files
(:func:`peft_layout` maps its layers onto them; ``lora`` layers become PEFT LoRA, ``lora_A``
/ ``lora_B``), so one directory loads with ``PeftModel.from_pretrained`` and with
``load_adapter``. A PiCa ``M`` shared by a group of layers (:func:`share_key`) is stored once,
under the group's first layer in model order, by both writers.

This module is the single description of that format: the PEFT types and prefixes, each
config's fields and defaults (the config classes of ``speclora_kernels.peft`` are built from
:data:`CONFIG_FIELDS`), how a config resolves to each layer's method and options
(:func:`layer_settings`), and the loader of directories that PEFT itself wrote
(:func:`load_peft_method_adapter`: no checksum or base fingerprint, which only our own files
carry, in the safetensors metadata).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ..integrations.inject import adapt_layers, adapter_layers, share_key, unwrap
from ..methods import get_method
from ..modules import AdapterLinear
from .container import TensorFile
from .directory import WEIGHTS_NAME
from .peft_format import PEFT_PREFIX, _pattern_value
from .schema import FLOAT_NAMES, AdapterFileError


class NotExpressible(ValueError):
    """A model whose adapters one PEFT config cannot describe (e.g. two methods)."""


@dataclass(frozen=True)
class PeftMethod:
    """One PEFT method type of ours: its ``peft_type``, PEFT prefix, config class name and
    the library methods it covers (by ``variant``; None when it has no variant)."""

    peft_type: str
    prefix: str
    config_class: str
    methods: dict

    @property
    def attr(self) -> str:
        """The layers' attribute holding one method module per adapter name."""
        return self.prefix + "adapter"


PEFT_METHODS = {m.peft_type: m for m in (
    PeftMethod("SPECLORA_KERNELS_SPECLORA", "speclora_", "SpecLoraConfig", {None: "speclora"}),
    PeftMethod("SPECLORA_KERNELS_SPECTRAL", "spectral_", "SpectralAdapterConfig",
               {"additive": "spectral_additive", "rotational": "spectral_rotational"}),
    PeftMethod("SPECLORA_KERNELS_PICA", "pica_", "PiCaConfig", {None: "pica"}),
)}
# library method -> (PEFT type, variant)
METHOD_TYPES = {name: (m.peft_type, variant) for m in PEFT_METHODS.values()
                for variant, name in m.methods.items()}

# PeftConfig's own fields, as PEFT writes them.
_BASE_FIELDS = {"task_type": None, "peft_type": None, "auto_mapping": None, "peft_version": None,
                "base_model_name_or_path": None, "revision": None, "inference_mode": False}
_COMMON = {"r": 8, "target_modules": None, "exclude_modules": None, "modules_to_save": None,
           "lora_dropout": 0.0, "svd": "auto", "rank_pattern": {}}
# Each config's own fields and their defaults (mutable defaults are copied per instance).
CONFIG_FIELDS = {
    "SPECLORA_KERNELS_SPECLORA": {**_COMMON, "k": 16, "lora_alpha": None, "k_pattern": {},
                                  "alpha_pattern": {}},
    "SPECLORA_KERNELS_SPECTRAL": {**_COMMON, "variant": "additive", "offset": 0,
                                  "offset_pattern": {}},
    "SPECLORA_KERNELS_PICA": dict(_COMMON),
}


def peft_key(name: str, method: str, tensor: str) -> str:
    """The PEFT checkpoint key of ``tensor`` of layer ``name`` adapted with ``method``."""
    if method == "lora":
        return f"{PEFT_PREFIX}{name}.lora_{tensor}.weight"
    return f"{PEFT_PREFIX}{name}.{PEFT_METHODS[METHOD_TYPES[method][0]].attr}.{tensor}"


def layer_settings(config, name: str) -> tuple[str, dict, float]:
    """``(method, options, dropout)`` of layer ``name`` under ``config`` (one of our PEFT
    configs, as an object or a dict): ``rank_pattern`` / ``k_pattern`` / ``alpha_pattern`` /
    ``offset_pattern`` entries win over ``r`` / ``k`` / ``lora_alpha`` / ``offset`` (PEFT's
    pattern rule: a key matches the end of the name); ``lora_alpha=None`` means ``r``
    (scaling 1); a config without ``offset`` (written before it existed) means 0."""
    get = config.get if isinstance(config, dict) else (lambda key, d=None: getattr(config, key, d))
    peft_type = get("peft_type")
    if peft_type not in PEFT_METHODS:
        raise ValueError(f"peft_type must be one of {sorted(PEFT_METHODS)}, got {peft_type!r}")
    methods = PEFT_METHODS[peft_type].methods
    variant = get("variant") if None not in methods else None
    if variant not in methods:
        raise ValueError(f"variant must be one of {sorted(methods)}, got {variant!r}")
    fields = CONFIG_FIELDS[peft_type]
    r = _pattern_value(get("rank_pattern") or {}, name, get("r", fields["r"]))
    options = {"r": r, "svd": get("svd", "auto")}
    if peft_type == "SPECLORA_KERNELS_SPECLORA":
        options["k"] = _pattern_value(get("k_pattern") or {}, name, get("k", fields["k"]))
        options["alpha"] = _pattern_value(get("alpha_pattern") or {}, name, get("lora_alpha"))
    if peft_type == "SPECLORA_KERNELS_SPECTRAL":
        options["offset"] = _pattern_value(get("offset_pattern") or {}, name,
                                           get("offset", fields["offset"]))
    return methods[variant], options, float(get("lora_dropout", 0.0) or 0.0)


# ---------------------------------------------------------------- writing (save_adapter)
def _mode(values):
    return Counter(values).most_common(1)[0][0]


def _pattern(values: dict, default) -> dict:
    return {name: v for name, v in values.items() if v != default}


def peft_layout(entries: dict[str, dict]) -> tuple[dict, dict[str, str]]:
    """The PEFT config and tensor names of a model's adapters: ``entries`` are
    ``save_adapter``'s per-layer configs (method, options, dropout, share_with) in model
    order. Returns ``(config, key)`` with ``key(name, tensor)`` the PEFT name of a tensor.
    Raises :class:`NotExpressible` (naming why) for what one PEFT config cannot say: two
    methods, layers with different dropout, PiCa sharing other than by :func:`share_key`."""
    methods = sorted({e["method"] for e in entries.values()})
    if len(methods) > 1:
        raise NotExpressible(f"the model mixes methods {methods}; a PEFT adapter has one")
    method = methods[0]
    if method != "lora" and method not in METHOD_TYPES:
        raise NotExpressible(f"method {method!r} has no PEFT type (ours: "
                             f"{sorted(METHOD_TYPES)}, and PEFT's LoRA)")
    dropouts = sorted({e["dropout"] for e in entries.values()})
    if len(dropouts) > 1:
        raise NotExpressible(f"the layers have different dropouts {dropouts}; a PEFT adapter "
                             f"has one lora_dropout")
    names = list(entries)
    ranks = {n: e["r"] for n, e in entries.items()}
    r = _mode(ranks.values())
    config = {"r": r, "target_modules": names, "lora_dropout": dropouts[0],
              "rank_pattern": _pattern(ranks, r), "inference_mode": True}
    if method == "lora":
        alphas = {n: e["alpha"] for n, e in entries.items()}
        alpha = _mode(alphas.values())
        config.update(peft_type="LORA", lora_alpha=alpha, alpha_pattern=_pattern(alphas, alpha),
                      bias="none", use_rslora=False, use_dora=False, fan_in_fan_out=False,
                      init_lora_weights=True, modules_to_save=None)
        return config, lambda name, tensor: peft_key(name, "lora", tensor)
    peft_type, variant = METHOD_TYPES[method]
    config = {**_BASE_FIELDS, **CONFIG_FIELDS[peft_type], **config, "peft_type": peft_type}
    config["svd"] = _mode(e.get("svd") or "auto" for e in entries.values())
    if variant is not None:
        config["variant"] = variant
    if method == "speclora":
        ks = {n: e["k"] for n, e in entries.items()}
        alphas = {n: e["alpha"] for n, e in entries.items()}
        config["k"], config["lora_alpha"] = _mode(ks.values()), _mode(alphas.values())
        config["k_pattern"] = _pattern(ks, config["k"])
        config["alpha_pattern"] = _pattern(alphas, config["lora_alpha"])
    if variant in ("additive", "rotational"):
        offsets = {n: e.get("offset") or 0 for n, e in entries.items()}
        config["offset"] = _mode(offsets.values())
        config["offset_pattern"] = _pattern(offsets, config["offset"])
    if method == "pica":
        expected = pica_owners(names)
        got = {n: e.get("share_with") for n, e in entries.items()}
        if got != expected:
            raise NotExpressible("its PiCa layers share M other than one M per target name "
                                 "(speclora_kernels.integrations.inject.share_key), which is "
                                 "how PEFT's PiCa layers share it")
    return config, lambda name, tensor: peft_key(name, method, tensor)


def pica_owners(names) -> dict[str, str | None]:
    """For PiCa layer names in model order: each layer's M owner (the first layer of its
    :func:`share_key` group), None for the owners themselves."""
    first, owners = {}, {}
    for name in names:
        owner = first.setdefault(share_key(name), name)
        owners[name] = None if owner == name else owner
    return owners


# ---------------------------------------------------------------- reading what PEFT wrote
def load_peft_method_adapter(model: nn.Module, directory: str | os.PathLike, config: dict, *,
                             verbose: bool = False) -> nn.Module:
    """Load a directory that PEFT's ``save_pretrained`` wrote for one of our PEFT types into
    ``model`` (a plain pre-trained model) as ``AdapterLinear`` layers; returns ``model``.

    The layers are the modules the file has tensors for, each adapted with the method and
    options :func:`layer_settings` gives; every tensor's name, shape and dtype is checked
    against what that method holds, before anything is read or the model changes. PEFT's
    files carry no checksum or base fingerprint: their tensors load as the bytes on disk,
    onto whatever base ``model`` has. Frozen spectral factors are the saved ones.
    """
    peft_type = config.get("peft_type")
    for key in ("modules_to_save", "layers_to_transform", "trainable_token_indices"):
        if config.get(key):
            raise AdapterFileError(f"{directory}: unsupported PEFT feature {key}={config[key]!r}"
                                   f" (load it with peft.PeftModel.from_pretrained)")
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    attr = PEFT_METHODS[peft_type].attr
    bare = unwrap(model)
    modules = dict(bare.named_modules())
    with TensorFile(path) as file:
        found: dict[str, set] = {}
        for key in file.entries:
            head, sep, tensor = key.removeprefix(PEFT_PREFIX).rpartition(f".{attr}.")
            if not sep or not key.startswith(PEFT_PREFIX) or "." in tensor:
                raise AdapterFileError(f"{path}: unsupported tensor {key!r}; expected "
                                       f"'{PEFT_PREFIX}<module>.{attr}.<tensor>'")
            found.setdefault(head, set()).add(tensor)
        order = {name: i for i, name in enumerate(modules)}
        missing = sorted(n for n in found if n not in order)
        if missing:
            raise AdapterFileError(f"{path}: the adapter has layer {missing[0]!r}, which the "
                                   f"model lacks")
        names = sorted(found, key=order.__getitem__)
        owners = pica_owners(names) if PEFT_METHODS[peft_type].methods.get(None) == "pica" else {}
        specs, expected = {}, {}
        for name in names:
            module = modules[name]
            if not isinstance(module, nn.Linear) or isinstance(module, AdapterLinear):
                raise AdapterFileError(f"{name}: expected a plain nn.Linear or Linear4bit to "
                                       f"adapt, got {type(module).__name__}")
            dtypes = {file.entries[f"{PEFT_PREFIX}{name}.{attr}.{t}"][1] for t in found[name]}
            adapter_dtype = torch.float64 if dtypes == {torch.float64} else torch.float32
            try:
                method, options, dropout = layer_settings(config, name)
                cls = get_method(method)
                if dropout > 0 and not cls.takes_dropout:
                    raise ValueError(f"lora_dropout must be 0.0 for method={method!r}, got "
                                     f"{dropout}")
                weight = torch.empty(module.out_features, module.in_features, device="meta")
                adapter = cls(weight, adapter_dtype=adapter_dtype, **options)
            except (TypeError, ValueError) as e:
                raise AdapterFileError(f"{path}: {name}: {e}") from None
            own = {t: (tuple(v.shape), v.dtype) for t, v in adapter.state_dict().items()}
            if owners.get(name):
                own.pop("M")
            # PEFT may have saved the adapter in another float dtype: compare shapes only
            expected.update({f"{PEFT_PREFIX}{name}.{attr}.{t}":
                             (shape, file.entries.get(f"{PEFT_PREFIX}{name}.{attr}.{t}",
                                                      (None, dtype))[1])
                             for t, (shape, dtype) in own.items()})
            specs[name] = {"method": method, "options": options, "dropout": dropout,
                           "adapter_dtype": adapter_dtype, "share_with": owners.get(name)}
        file.check(expected, f"the {PEFT_METHODS[peft_type].config_class} in its config")
        bad = sorted(k for k, (_, dtype) in file.entries.items() if str(dtype)[6:] not in FLOAT_NAMES)
        if bad:
            raise AdapterFileError(f"{path}: tensors {bad[:3]} are not floating point")
        tensors = file.read()
    adapt_layers(bare, specs, verbose=verbose)
    layers = adapter_layers(bare)
    for name in names:
        own = layers[name].adapter_tensors()
        source = {t: (owners.get(name) or name) if t == "M" else name for t in own}
        layers[name].load_adapter_tensors(
            {t: tensors[f"{PEFT_PREFIX}{source[t]}.{attr}.{t}"].to(own[t].device, own[t].dtype)
             for t in own})
    return model

