"""A model's adapter on disk: ``adapter_config.json`` + ``adapter_model.safetensors``, in
PEFT's format (:mod:`.peft_methods`): ``PeftModel.from_pretrained`` loads it (after
``import speclora_kernels.peft``; ``lora`` adapters need nothing of ours).

What PEFT's format cannot carry goes into the safetensors metadata, where PEFT ignores it:
our full config (format version 2: every layer's method, options, share_with, base
fingerprint, the tensor table, and a copy of ``adapter_config.json``) and a sha256 of that
config and the tensor data. The weights file is committed first (atomically, see
:mod:`speclora_kernels.persistence.container`), so it alone is a complete adapter.
Directories of format version 1 (``adapter_config.json`` our own config, tensors named
``<module>.<tensor>``, written before PEFT's format was adopted) still load, with a
warning; directories PEFT itself wrote load too (:func:`load_adapter`).

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
import warnings

import torch
from torch import nn

from .._version import __version__
from ..integrations.fsdp import gather_adapter_tensors, is_sharded, place_like, writer_rank_only
from ..integrations.inject import adapt_layers, adapter_layers, base_fingerprint, unwrap
from ..methods import get_method
from ..modules import AdapterLinear
from .container import (
    CONFIG_KEY,
    SHA_KEY,
    TensorFile,
    commit_files,
    encode_container,
    open_container,
    read_json_file,
    read_verified,
    tensor_table,
)
from .directory import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, read_config
from .peft_format import load_peft_adapter
from .peft_methods import METHOD_TYPES, PEFT_METHODS, NotExpressible, load_peft_method_adapter, peft_key, peft_layout
from .schema import (
    ADAPTER_FORMAT,
    MODEL_LAYER_SCHEMA,
    MODEL_SCHEMA,
    AdapterFileError,
    check_layer_entry,
    check_schema,
    header_schema,
    match_values,
)

# 1: our own config in adapter_config.json, tensors "<module>.<tensor>"; 2: PEFT's format.
MODEL_FORMAT_VERSION = 2
_MODEL_SCHEMA_V2 = {**MODEL_SCHEMA, **header_schema(ADAPTER_FORMAT, MODEL_FORMAT_VERSION),
                    "peft_config": (False, lambda v: isinstance(v, dict), "a PEFT config object")}

__all__ = ["save_adapter", "load_adapter", "read_config", "CONFIG_NAME", "WEIGHTS_NAME",
           "PICKLE_NAME"]


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
    ``directory/adapter_config.json`` + ``directory/adapter_model.safetensors`` in PEFT's
    format; returns the directory. The model is not changed.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` loads it: ``lora`` as PEFT
    LoRA; the other methods as our PEFT types (``import speclora_kernels.peft`` first),
    their frozen spectral factors included. What PEFT's format cannot carry is in the
    safetensors metadata, which PEFT ignores: every layer's options, the base weights'
    fingerprints, NF4 quantization done by :func:`inject` (PEFT loads onto whatever base it
    is given) and a sha256 of all of it and the tensor data, which :func:`load_adapter`
    verifies. A model one PEFT config cannot describe (two methods, layers with different
    dropouts, PiCa layers sharing M otherwise than per target name) is written in format
    version 1, ours only, with a warning saying why.

    Atomic: both files are written to temporary files and fsynced first, then renamed,
    weights first. The weights file embeds the config and a checksum, so it alone is a
    complete adapter: a crash at any point leaves the previous adapter or the new one.

    Under FSDP2 (sharded parameters) every rank calls it: the tensors are gathered whole,
    rank 0 writes the same files as one process would, and every rank returns once they
    are written (or raises if rank 0 failed).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no AdapterLinear layers; call inject() first")
    owners = _shared_owner(layers)
    whole = gather_adapter_tensors(layers)  # whole, on the CPU (gathered under FSDP2)
    tensors, config_layers = {}, {}
    for name, layer in layers.items():
        meta = getattr(layer, "inject_meta", {})
        entry = {**layer.adapter_config(), "share_with": owners.get(name),
                 "quantize": meta.get("quantize"), "source": meta.get("source"),
                 "base_fingerprint": meta.get("fingerprint")}
        config_layers[name] = entry
        for field, t in whole[name].items():
            if field == "M" and name in owners:
                continue  # stored once, under the layer that owns it
            tensors[(name, field)] = t.detach().to("cpu").contiguous()
    try:
        peft_config, key = peft_layout(config_layers)
        version = MODEL_FORMAT_VERSION
    except NotExpressible as why:
        warnings.warn(f"save_adapter: {directory} is written in speclora_kernels' own format "
                      f"(version 1), which PEFT cannot load: {why}", RuntimeWarning,
                      stacklevel=2)
        peft_config, version = None, 1
        key = _legacy_key
    tensors = {key(name, t): v for (name, t), v in tensors.items()}
    config = {"format": ADAPTER_FORMAT, "format_version": version,
              "library_version": __version__, "layers": config_layers,
              "tensors": tensor_table(tensors)}
    if peft_config is not None:
        bare = unwrap(model)
        name_or_path = getattr(getattr(bare, "config", None), "_name_or_path", None)
        peft_config["base_model_name_or_path"] = name_or_path or None
        config["peft_config"] = peft_config

    def write():
        os.makedirs(directory, exist_ok=True)
        blob, body = encode_container(tensors, config)
        if peft_config is not None:  # PEFT reads adapter_config.json as its own config
            body = (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode()
        commit_files([(os.path.join(directory, WEIGHTS_NAME), blob),
                      (os.path.join(directory, CONFIG_NAME), body)])

    writer_rank_only(is_sharded(model), write)
    return os.fspath(directory)


def _legacy_key(name: str, tensor: str) -> str:
    return f"{name}.{tensor}"


def _expected_tensors(directory, layers: dict, key=_legacy_key) -> dict:
    """Validate every layer entry; the tensors the file must hold, ``{name: (shape,
    dtype)}`` (names ``key(layer, tensor)``), with a shared PiCa ``M`` only under its
    owner."""
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
        expected.update({key(name, t): spec for t, spec in own.items()})
    return expected


def check_layer(name: str, entry: dict, module) -> None:
    """Raise ``AdapterFileError`` if the saved layer ``entry`` cannot belong to ``module``."""
    if module is None:
        raise AdapterFileError(f"the adapter has layer {name!r}, which the model lacks")
    if isinstance(module, AdapterLinear):
        own = module.adapter_config()
        for key, saved in match_values(entry, type(module.adapter)).items():
            if saved != own.get(key):
                raise AdapterFileError(f"{name}: the adapter has {key}={saved!r} but "
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


def check_fingerprint(name: str, entry: dict, fingerprint: str | None) -> None:
    want = entry.get("base_fingerprint")
    if want and fingerprint and want != fingerprint:
        raise AdapterFileError(
            f"{name}: the adapter belongs to a different pre-trained weight (base fingerprint "
            f"{want[:12]}..., model's {fingerprint[:12]}...); load it into the model it was "
            f"trained on, or pass check_base=False")


def read_adapter(directory) -> tuple[dict, dict]:
    """``(layers, tensors)`` of a directory :func:`save_adapter` wrote, checked as
    :func:`load_adapter` checks it (schema, tensor table, checksum), without a model:
    ``layers`` the per-layer configs, ``tensors[layer][tensor]`` (a shared PiCa ``M`` under
    every layer holding it). For callers that combine saved adapters (``fuse_adapters``)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory (an adapter directory written "
                                f"by save_adapter)")
    if not _has_embedded_config(directory):
        raise AdapterFileError(f"{directory}: not written by save_adapter, whose files carry "
                               f"every layer's options and base fingerprint (load PEFT's with "
                               f"load_adapter and save_adapter it)")
    file, config = open_container(os.path.join(directory, WEIGHTS_NAME), None,
                                  format=ADAPTER_FORMAT, version=MODEL_FORMAT_VERSION, extra=True)
    with file:
        check_schema(config, _MODEL_SCHEMA_V2, f"{file.path} (embedded config)")
        layers = config["layers"]
        key = _legacy_key if config["format_version"] == 1 else _peft_key_of(layers)
        file.check(_expected_tensors(file.path, layers, key), "the layers in its config")
        flat = read_verified(file)
    tensors = {}
    for name, entry in layers.items():
        names = check_layer_entry(entry, f"{directory}: layer {name!r}", MODEL_LAYER_SCHEMA)
        owner = entry["share_with"]
        tensors[name] = {t: flat[key(owner if t == "M" and owner else name, t)] for t in names}
    return layers, tensors


def load_adapter(model: nn.Module, directory: str | os.PathLike, *,
                 check_base: bool = True, verbose: bool = False) -> nn.Module:
    """Load what :func:`save_adapter` wrote into ``model`` (bit-exact); returns ``model``.

    ``model`` may be a fresh pre-trained model (its layers are adapted first, with the saved
    options) or one already adapted the same way. Everything is checked before the model
    changes: the safetensors header (bounds, offsets, sizes), the config against its schema,
    every tensor's name, shape and dtype against the layers' methods, the checksum of the
    data, and the model: a missing module, another method, rank, shape or dtype, or a base
    weight with another fingerprint (unless ``check_base=False``). Any of these raises
    :class:`~speclora_kernels.AdapterFileError` (a ``ValueError``) naming the
    directory and the layer. Nothing from the files is executed; a pickled
    ``adapter_model.bin`` is refused.

    Also loaded: directories of format version 1 (a ``FutureWarning`` says to save them
    again), and directories PEFT itself wrote (no checksum, no fingerprints: PEFT's format
    has neither), a PEFT LoRA with ``load_peft_adapter``, one of our PEFT types
    (``speclora_kernels.peft``) with ``load_peft_method_adapter``.
    """
    if not _has_embedded_config(directory):
        config = read_config(directory)
        if "peft_type" in config:  # written by PEFT itself
            if config["peft_type"] in PEFT_METHODS:
                return load_peft_method_adapter(model, directory, config, verbose=verbose)
            return load_peft_adapter(model, directory, verbose=verbose)
        if config.get("format") != ADAPTER_FORMAT:
            raise AdapterFileError(f"{directory} holds neither a speclora_kernels adapter nor "
                                   f"a PEFT one (format={config.get('format')!r})")
    try:
        return _load(model, directory, check_base, verbose)
    except AdapterFileError as e:
        if str(e).startswith(os.fspath(directory)):
            raise
        raise AdapterFileError(f"{directory}: {e}") from None


def _has_embedded_config(directory) -> bool:
    """Whether the weights file carries our config (then it, not adapter_config.json, says
    what the adapter is: the weights are committed first)."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        return False
    with TensorFile(path) as file:
        # either key: a file of ours with one of them damaged must not pass for PEFT's
        return CONFIG_KEY in file.metadata or SHA_KEY in file.metadata


def _load(model, directory, check_base: bool, verbose: bool) -> nn.Module:
    file, config = open_container(os.path.join(directory, WEIGHTS_NAME), None,
                                  format=ADAPTER_FORMAT, version=MODEL_FORMAT_VERSION,
                                  extra=True)
    with file:
        check_schema(config, _MODEL_SCHEMA_V2, f"{file.path} (embedded config)")
        json_path = os.path.join(directory, CONFIG_NAME)
        if config["format_version"] == 1:
            key = _legacy_key
            file.json_path = json_path  # read_verified compares the readable copy
            warnings.warn(f"{directory} is an adapter of format version 1, which PEFT cannot "
                          f"load; save_adapter writes PEFT's format now: load it and save it "
                          f"again to convert it", FutureWarning, stacklevel=3)
        else:
            key = _peft_key_of(config["layers"])
            _check_peft_copy(json_path, config.get("peft_config"), file.path)
        file.check(_expected_tensors(file.path, config["layers"], key),
                   "the layers in its config")
        bare = unwrap(model)
        modules = dict(bare.named_modules())
        existing = adapter_layers(bare)
        extra = sorted(set(existing) - set(config["layers"]))
        if extra:
            raise AdapterFileError(f"the model has adapter layers the file lacks: {extra[:5]}")
        # Structure first (missing layers, shapes, options), then the bases' fingerprints.
        for name, entry in config["layers"].items():
            check_layer(name, entry, modules.get(name))
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
                check_fingerprint(name, entry, fingerprint)
        owners = _shared_owner(existing)
        for name in existing:
            saved = entries[name].get("share_with")
            if owners.get(name) != saved:
                raise AdapterFileError(f"{name}: the adapter shares M with {saved!r} but the "
                                       f"model's layer shares it with {owners.get(name)!r}")
        tensors = read_verified(file)  # checksum verified; the model is still unchanged
    fresh = {name: layer_spec(entry) for name, entry in entries.items()
             if not isinstance(modules[name], AdapterLinear)}
    if fresh and is_sharded(bare):
        raise ValueError(f"{sorted(fresh)[:3]}...: the model is sharded (FSDP2) but not adapted; "
                         f"load_adapter (or inject) before fully_shard")
    if fresh:
        adapt_layers(bare, fresh, fingerprints=fingerprints, verbose=verbose)
    layers = adapter_layers(bare)
    device_tensors = {}
    for name, entry in entries.items():
        layer = layers[name]
        own = layer.adapter_tensors()
        loaded = {}
        for t in own:
            source = entry["share_with"] if t == "M" and entry.get("share_with") else name
            full = key(source, t)
            if full not in device_tensors:
                device_tensors[full] = place_like(tensors[full], own[t])  # FSDP2: a shard
            loaded[t] = device_tensors[full]
        layer.load_adapter_tensors(loaded)
    return model


def _peft_key_of(entries: dict):
    """``key(layer, tensor)``: the PEFT tensor name in a format-2 file."""
    def key(name: str, tensor: str) -> str:
        method = entries[name]["method"]
        if method != "lora" and method not in METHOD_TYPES:
            raise AdapterFileError(f"layer {name!r}: method {method!r} has no PEFT format, "
                                   f"but the file is of format version 2")
        return peft_key(name, method, tensor)
    return key


def _check_peft_copy(json_path: str, committed: dict | None, st_path: str) -> None:
    """Warn when ``adapter_config.json`` is not the PEFT config committed with the weights
    (a save interrupted between its two renames, or an edit): the committed one is used."""
    if not os.path.exists(json_path):
        warnings.warn(f"{json_path} is missing; using the config committed with {st_path}",
                      RuntimeWarning, stacklevel=4)
    elif read_json_file(json_path) != committed:
        warnings.warn(f"{json_path} differs from the config committed with {st_path} (a save "
                      f"interrupted between its two renames, or an edit); using the committed "
                      f"config", RuntimeWarning, stacklevel=4)


def layer_spec(entry: dict) -> dict:
    """The ``adapt_layers`` spec that rebuilds a saved layer: its method with every saved
    option (one missing from an older file, or null, takes its default)."""
    method = get_method(entry["method"])
    return {"method": entry["method"], "dropout": entry["dropout"],
            "options": {o.name: entry.get(o.name) for o in method.saved_options()},
            "adapter_dtype": getattr(torch, entry["adapter_dtype"]),
            "quantize": entry.get("quantize"), "share_with": entry.get("share_with")}
