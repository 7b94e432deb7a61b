"""A model's adapter on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

The file names are PEFT's; the config says which format it is (``"format":
"speclora_kernels.adapter"``, or PEFT's ``"peft_type"``, which :func:`load_adapter` hands
to :func:`~speclora_kernels.integrations.load_peft_adapter`).

Saved per adapted layer (tensor names ``<module name>.<tensor>``): the trainable tensors
and the frozen spectral factors (``P``, ``sigma``, ``Q``): with them the adapter means the
same thing on any machine, whatever its SVD returns. Never the base weight: instead the
config holds each layer's options and a fingerprint of its pre-trained weight
(:func:`~speclora_kernels.integrations.inject.base_fingerprint`), so loading into another
model fails with the layer's name rather than silently producing a different network. A
PiCa ``M`` shared by several layers is stored once.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load as _load_bytes
from safetensors.torch import save as _save_bytes
from torch import nn

from ..modules import AdapterLinear
from ..serialization import FORMAT, FORMAT_VERSION, MATCH_KEYS, _atomic_write
from .inject import adapt_layers, adapter_layers, base_fingerprint, unwrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Layer options, besides MATCH_KEYS, that rebuild a layer in a fresh model.
_SPEC_KEYS = ("method", "r", "k", "alpha", "dropout", "adapter_dtype")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shared_owner(layers: dict[str, AdapterLinear]) -> dict[str, str]:
    """PiCa layers whose ``M`` is held by an earlier layer -> that layer's name."""
    owners, owner_of = {}, {}
    for name, layer in layers.items():
        m = getattr(layer.adapter, "M", None)
        if layer.adapter.name != "pica" or m is None:
            continue
        first = owner_of.setdefault(id(m), name)
        if first != name:
            owners[name] = first
    return owners


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> str:
    """Write the adapters of ``model`` (injected by :func:`inject` or loaded) to
    ``directory/adapter_config.json`` + ``directory/adapter_model.safetensors``, each
    atomically; returns the directory. The model is not changed."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no AdapterLinear layers; call inject() first")
    os.makedirs(directory, exist_ok=True)
    owners = _shared_owner(layers)
    tensors, config_layers = {}, {}
    for name, layer in layers.items():
        meta = getattr(layer, "inject_meta", {})
        entry = {**layer.adapter_config(), "share_with": owners.get(name),
                 "svd": meta.get("svd"), "quantize": meta.get("quantize"),
                 "source": meta.get("source"), "base_fingerprint": meta.get("fingerprint")}
        config_layers[name] = entry
        for key, t in layer.adapter_tensors().items():
            if key == "M" and name in owners:
                continue  # stored once, under the layer that owns it
            tensors[f"{name}.{key}"] = t.detach().to("cpu").contiguous()
    from .. import __version__

    config = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "library_version": __version__, "layers": config_layers,
              "tensors": {n: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
                          for n, t in tensors.items()}}
    _atomic_write(os.path.join(directory, WEIGHTS_NAME),
                  _save_bytes(tensors, metadata={"format": "pt", "library": FORMAT}))
    _atomic_write(os.path.join(directory, CONFIG_NAME),
                  (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return os.fspath(directory)


def read_config(directory: str | os.PathLike) -> dict:
    """``adapter_config.json`` of ``directory`` (ours or PEFT's)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not an adapter directory")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    with open(os.path.join(directory, WEIGHTS_NAME), "rb") as f:
        return _load_bytes(f.read())


def _read(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    config = read_config(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if config.get("format") != FORMAT:
        raise ValueError(f"{directory} holds neither a speclora_kernels adapter nor a PEFT one "
                         f"(format={config.get('format')!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory} has format_version {config['format_version']}; this "
                         f"library reads up to {FORMAT_VERSION}")
    tensors = read_tensors(directory)
    listed = config.get("tensors", {})
    for name, t in tensors.items():
        got = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
        if listed.get(name) != got:
            raise ValueError(f"{path}: tensor {name!r} is {got}, but {CONFIG_NAME} lists "
                             f"{listed.get(name)}")
    if set(listed) != set(tensors):
        raise ValueError(f"{path} holds {sorted(tensors)} but {CONFIG_NAME} lists "
                         f"{sorted(listed)}")
    return config, tensors


def _check_layer(name: str, entry: dict, module) -> None:
    """Raise ``ValueError`` if the saved layer ``entry`` cannot belong to ``module``."""
    if module is None:
        raise ValueError(f"the adapter has layer {name!r}, which the model lacks")
    if isinstance(module, AdapterLinear):
        own = module.adapter_config()
        for key in MATCH_KEYS:
            if entry.get(key) != own.get(key):
                raise ValueError(f"{name}: the adapter has {key}={entry.get(key)!r} but the "
                                 f"model's layer has {key}={own.get(key)!r}")
    elif not isinstance(module, nn.Linear):
        raise ValueError(f"{name}: the adapter adapts a linear layer, but the model's module is "
                         f"a {type(module).__name__}")
    else:
        shape = (module.out_features, module.in_features)
        if shape != (entry["out_features"], entry["in_features"]):
            raise ValueError(f"{name}: the adapter is for a {entry['out_features']}x"
                             f"{entry['in_features']} weight, the model's is {shape[0]}x{shape[1]}")
        if entry.get("source") and entry["source"] != type(module).__name__:
            raise ValueError(f"{name}: the adapter was trained on a {entry['source']} base, the "
                             f"model's layer is a {type(module).__name__}")


def _check_fingerprint(name: str, entry: dict, fingerprint: str | None) -> None:
    want = entry.get("base_fingerprint")
    if want and fingerprint and want != fingerprint:
        raise ValueError(f"{name}: the adapter belongs to a different pre-trained weight (base "
                         f"fingerprint {want[:12]}..., model's {fingerprint[:12]}...); load it "
                         f"into the model it was trained on, or pass check_base=False")


def load_adapter(model: nn.Module, directory: str | os.PathLike, *,
                 check_base: bool = True, verbose: bool = False) -> nn.Module:
    """Load what :func:`save_adapter` wrote into ``model`` (bit-exact); returns ``model``.

    ``model`` may be a fresh pre-trained model (its layers are adapted first, with the saved
    options) or one already adapted the same way. Every layer is checked before anything
    changes: a missing module, another method, rank, shape or dtype, or a base weight with
    another fingerprint (unless ``check_base=False``) raises ``ValueError`` naming the layer.
    A PEFT LoRA directory is loaded with ``load_peft_adapter``.
    """
    config = read_config(directory)
    if "peft_type" in config:
        from .peft_interop import load_peft_adapter

        return load_peft_adapter(model, directory, verbose=verbose)
    config, tensors = _read(directory)
    bare = unwrap(model)
    modules = dict(bare.named_modules())
    existing = adapter_layers(bare)
    extra = sorted(set(existing) - set(config["layers"]))
    if extra:
        raise ValueError(f"the model has adapter layers the file lacks: {extra[:5]}")
    # Structure first (missing layers, shapes, options), then the bases' fingerprints.
    for name, entry in config["layers"].items():
        _check_layer(name, entry, modules.get(name))
    # Model order, so that a PiCa layer's M owner is adapted before the layers sharing it.
    order = {name: i for i, name in enumerate(modules)}
    entries = dict(sorted(config["layers"].items(), key=lambda item: order[item[0]]))
    fingerprints = {}
    for name, entry in entries.items():
        module = modules[name]
        if isinstance(module, AdapterLinear):
            fingerprint = getattr(module, "inject_meta", {}).get("fingerprint")
        else:
            fingerprint = fingerprints[name] = base_fingerprint(module)
        if check_base:
            _check_fingerprint(name, entry, fingerprint)
    owners = _shared_owner(existing)
    for name in existing:
        saved = entries[name].get("share_with")
        if owners.get(name) != saved:
            raise ValueError(f"{name}: the adapter shares M with {saved!r} but the model's "
                             f"layer shares it with {owners.get(name)!r}")
    fresh = {name: _spec(entry) for name, entry in entries.items()
             if not isinstance(modules[name], AdapterLinear)}
    if fresh:
        adapt_layers(bare, fresh, fingerprints=fingerprints, verbose=verbose)
    layers = adapter_layers(bare)
    device_tensors = {}
    for name, entry in entries.items():
        layer = layers[name]
        own = layer.adapter_tensors()
        loaded = {}
        for key in own:
            source = entry["share_with"] if key == "M" and entry.get("share_with") else name
            full = f"{source}.{key}"
            if full not in tensors:
                raise ValueError(f"{name}: {WEIGHTS_NAME} lacks tensor {full!r}")
            if full not in device_tensors:
                device_tensors[full] = tensors[full].to(own[key].device)
            loaded[key] = device_tensors[full]
        layer.load_adapter_tensors(loaded)
    return model


def _spec(entry: dict) -> dict:
    spec = {key: entry.get(key) for key in _SPEC_KEYS}
    spec["adapter_dtype"] = getattr(torch, entry["adapter_dtype"])
    spec["svd"], spec["quantize"] = entry.get("svd"), entry.get("quantize")
    spec["share_with"] = entry.get("share_with")
    return spec
