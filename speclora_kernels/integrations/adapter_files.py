"""A model's adapter on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

The file names are PEFT's (a pickled ``adapter_model.bin`` is refused, never loaded); the
config says which format it is (``"format": "speclora_kernels.adapter"``, or PEFT's
``"peft_type"``, which :func:`load_adapter` hands to
:func:`~speclora_kernels.integrations.load_peft_adapter`). The weights file embeds the
config and a checksum and is the one committed atomically (see
:mod:`speclora_kernels.serialization`).

Saved per adapted layer (tensor names ``<module name>.<tensor>``): the trainable tensors
and the frozen spectral factors (``P``, ``sigma``, ``Q``): with them the adapter means the
same thing on any machine, whatever its SVD returns. Never the base weight: instead the
config holds each layer's options and a fingerprint of its pre-trained weight
(:func:`~speclora_kernels.integrations.inject.base_fingerprint`), so loading into another
model fails with the layer's name rather than silently producing a different network. A
PiCa ``M`` shared by several layers is stored once.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..modules import AdapterLinear
from ..serialization import (FORMAT, FORMAT_VERSION, HEADER_SCHEMA, MATCH_KEYS,
                             MODEL_LAYER_SCHEMA, AdapterFileError, _commit, check_layer_entry,
                             check_schema, encode_adapter, open_adapter, read_json_file,
                             read_verified, tensor_table)
from .inject import adapt_layers, adapter_layers, base_fingerprint, unwrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# Layer options, besides MATCH_KEYS, that rebuild a layer in a fresh model.
_SPEC_KEYS = ("method", "r", "k", "alpha", "dropout", "adapter_dtype")
MODEL_SCHEMA = {**HEADER_SCHEMA,
                "layers": (True, lambda v: isinstance(v, dict) and 0 < len(v) <= 100_000,
                           "a non-empty map of layer names to layer configs")}


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
    ``directory/adapter_config.json`` + ``directory/adapter_model.safetensors``; returns the
    directory. The model is not changed.

    Atomic: both files are written to temporary files and fsynced first, then renamed,
    weights first. The weights file embeds the config and a checksum, so it alone is a
    complete adapter: a crash at any point leaves the previous adapter or the new one.
    """
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
              "tensors": tensor_table(tensors)}
    blob, body = encode_adapter(tensors, config)
    _commit([(os.path.join(directory, WEIGHTS_NAME), blob),
             (os.path.join(directory, CONFIG_NAME), body)])
    return os.fspath(directory)


def read_config(directory: str | os.PathLike) -> dict:
    """``adapter_config.json`` of ``directory`` (ours or PEFT's), parsed as strict JSON
    (:func:`~speclora_kernels.serialization.parse_json`); not yet schema-checked."""
    path = os.path.join(directory, CONFIG_NAME)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(weights):  # a first save interrupted between its two renames
            return {"format": FORMAT}
        raise FileNotFoundError(f"{path} not found: not an adapter directory")
    if not os.path.isfile(weights) and os.path.isfile(os.path.join(directory, PICKLE_NAME)):
        raise AdapterFileError(f"{directory} holds {PICKLE_NAME}, a pickle file, which is never "
                               f"loaded (it can run code); save it with safetensors instead")
    return read_json_file(path)


def _expected_tensors(directory, layers: dict) -> dict:
    """Validate every layer entry; the tensors the file must hold, ``{name: (shape,
    dtype)}``, with a shared PiCa ``M`` only under its owner."""
    expected = {}
    for name, entry in layers.items():
        where = f"{directory}: layer {name!r}"
        if not isinstance(name, str) or not name:
            raise AdapterFileError(f"{directory}: invalid layer name {name!r}")
        own = check_layer_entry(entry, where, MODEL_LAYER_SCHEMA)
        owner = entry["share_with"]
        if owner is not None:
            first = layers.get(owner)
            if (entry["method"] != "pica" or not isinstance(first, dict)
                    or first.get("share_with") is not None
                    or any(first.get(k) != entry[k]
                           for k in ("method", "r", "out_features", "adapter_dtype"))):
                raise AdapterFileError(f"{where}: share_with={owner!r} must name a pica layer "
                                       f"of the file that owns an M of the same shape")
            own.pop("M")
        expected.update({f"{name}.{key}": spec for key, spec in own.items()})
    return expected


def _check_layer(name: str, entry: dict, module) -> None:
    """Raise ``AdapterFileError`` if the saved layer ``entry`` cannot belong to ``module``."""
    if module is None:
        raise AdapterFileError(f"the adapter has layer {name!r}, which the model lacks")
    if isinstance(module, AdapterLinear):
        own = module.adapter_config()
        for key in MATCH_KEYS:
            if entry.get(key) != own.get(key):
                raise AdapterFileError(f"{name}: the adapter has {key}={entry.get(key)!r} but "
                                       f"the model's layer has {key}={own.get(key)!r}")
    elif not isinstance(module, nn.Linear):
        raise AdapterFileError(f"{name}: the adapter adapts a linear layer, but the model's "
                               f"module is a {type(module).__name__}")
    else:
        shape = (module.out_features, module.in_features)
        if shape != (entry["out_features"], entry["in_features"]):
            raise AdapterFileError(f"{name}: the adapter is for a {entry['out_features']}x"
                                   f"{entry['in_features']} weight, the model's is "
                                   f"{shape[0]}x{shape[1]}")
        if entry["bias"] != (module.bias is not None):
            raise AdapterFileError(f"{name}: the adapter is for a layer "
                                   f"{'with' if entry['bias'] else 'without'} a bias, the "
                                   f"model's layer is the opposite")
        if entry.get("source") and entry["source"] != type(module).__name__:
            raise AdapterFileError(f"{name}: the adapter was trained on a {entry['source']} "
                                   f"base, the model's layer is a {type(module).__name__}")


def _check_fingerprint(name: str, entry: dict, fingerprint: str | None) -> None:
    want = entry.get("base_fingerprint")
    if want and fingerprint and want != fingerprint:
        raise AdapterFileError(
            f"{name}: the adapter belongs to a different pre-trained weight (base fingerprint "
            f"{want[:12]}..., model's {fingerprint[:12]}...); load it into the model it was "
            f"trained on, or pass check_base=False")


def load_adapter(model: nn.Module, directory: str | os.PathLike, *,
                 check_base: bool = True, verbose: bool = False) -> nn.Module:
    """Load what :func:`save_adapter` wrote into ``model`` (bit-exact); returns ``model``.

    ``model`` may be a fresh pre-trained model (its layers are adapted first, with the saved
    options) or one already adapted the same way. Everything is checked before the model
    changes: the safetensors header (bounds, offsets, sizes), the config against its schema,
    every tensor's name, shape and dtype against the layers' methods, the checksum of the
    data, and the model: a missing module, another method, rank, shape or dtype, or a base
    weight with another fingerprint (unless ``check_base=False``). Any of these raises
    :class:`~speclora_kernels.serialization.AdapterFileError` (a ``ValueError``) naming the
    directory and the layer. Nothing from the files is executed. A PEFT LoRA directory is
    loaded with ``load_peft_adapter``.
    """
    config = read_config(directory)
    if "peft_type" in config:
        from .peft_interop import load_peft_adapter

        return load_peft_adapter(model, directory, verbose=verbose)
    if config.get("format") != FORMAT:
        raise AdapterFileError(f"{directory} holds neither a speclora_kernels adapter nor a "
                               f"PEFT one (format={config.get('format')!r})")
    try:
        return _load(model, directory, check_base, verbose)
    except AdapterFileError as e:
        if str(e).startswith(os.fspath(directory)):
            raise
        raise AdapterFileError(f"{directory}: {e}") from None


def _load(model, directory, check_base: bool, verbose: bool) -> nn.Module:
    file, config = open_adapter(os.path.join(directory, WEIGHTS_NAME),
                                os.path.join(directory, CONFIG_NAME), extra=True)
    with file:
        check_schema(config, MODEL_SCHEMA, f"{file.path} (embedded config)")
        file.check(_expected_tensors(file.path, config["layers"]),
                   "the layers in its config")
        bare = unwrap(model)
        modules = dict(bare.named_modules())
        existing = adapter_layers(bare)
        extra = sorted(set(existing) - set(config["layers"]))
        if extra:
            raise AdapterFileError(f"the model has adapter layers the file lacks: {extra[:5]}")
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
                raise AdapterFileError(f"{name}: the adapter shares M with {saved!r} but the "
                                       f"model's layer shares it with {owners.get(name)!r}")
        tensors = read_verified(file)  # checksum verified; the model is still unchanged
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
