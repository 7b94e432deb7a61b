"""PEFT LoRA adapters in and out.

- :func:`load_peft_adapter`: a directory written by ``peft`` (``save_pretrained`` of a LoRA
  model) becomes ``lora`` ``AdapterLinear`` layers running the fused op:
  ``A = lora_A.weight``, ``B = lora_B.weight``, ``alpha / r`` = PEFT's scaling (``rank_pattern``,
  ``alpha_pattern`` and ``use_rslora`` honoured). Features that are not a low-rank addition
  to a linear layer are refused by name.
- :func:`export_peft_adapter`: any of our methods as a standard PEFT LoRA directory that
  ``peft.PeftModel.from_pretrained(base_model, directory)`` loads onto the *original*
  pre-trained model. ``lora`` exports ``A``, ``B`` and ``alpha`` as they are; the other
  methods export rank ``R`` factors ``lora_A = D``, ``lora_B = U diag(s)`` with scaling 1.
  The ``spectral_*`` methods replace the base by ``W_res = W0 - P diag(sigma) Q.T``, so their
  export folds that difference in: ``lora_A = [D; Q.T]``, ``lora_B = [U diag(s), -P diag(sigma)]``
  (rank 2r). On a ``Linear4bit`` base the layer keeps the NF4 ``W0`` and those frozen rows
  are its own, exported as they are. Only a ``W_res`` quantized on its own
  (``inject(..., quantize="nf4")``) has no LoRA form: its difference to the original
  weight is full-rank, and the export is refused.

Neither function needs ``peft`` installed: both read and write its file format.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter

import torch
from safetensors.torch import save as _save_bytes
from torch import nn

from .._version import __version__
from ..integrations.inject import adapt_layers, adapter_layers, unwrap
from ..modules import AdapterLinear
from .container import TensorFile, commit_files
from .directory import CONFIG_NAME, WEIGHTS_NAME, read_config
from .schema import FLOAT_NAMES, AdapterFileError, check_schema, is_int, is_number

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<name>.+)\.lora_(?P<part>[AB])\.weight")
# PEFT config fields whose non-default values change the model beyond ``W0 + s * B A`` on
# linear layers, with why we refuse them.
_UNSUPPORTED = {
    "use_dora": "DoRA rescales each column of W0 + s*B A by a learned magnitude; that is not "
                "a low-rank addition the fused op computes",
    "fan_in_fan_out": "fan_in_fan_out=True targets transformers Conv1D layers (GPT-2), not "
                      "nn.Linear",
    "lora_bias": "lora_bias=True adds a trainable bias to lora_B",
    "modules_to_save": "modules_to_save stores fully fine-tuned copies of whole modules",
    "layer_replication": "layer_replication duplicates decoder layers",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "target_parameters": "target_parameters adapts raw nn.Parameters, not linear layers",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) switches the adapter "
                               "on per token",
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
}


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's ``get_pattern_key``: the first key that matches the end of ``name``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _is_regex(key) -> bool:
    if not isinstance(key, str) or len(key) > 512:
        return False
    try:
        re.compile(key)
    except re.error:
        return False
    return True


def _is_pattern(value_ok):
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: regex keys (matched like PEFT does)."""
    return lambda v: v is None or (isinstance(v, dict) and all(
        _is_regex(k) and value_ok(x) for k, x in v.items()))


# The PEFT config fields we read (PEFT writes many more, version-dependent: those pass).
PEFT_SCHEMA = {
    "peft_type": (True, lambda v: isinstance(v, str), "a string"),
    "r": (False, lambda v: is_int(v) and v >= 1, "an int >= 1"),
    "lora_alpha": (False, lambda v: is_number(v) and v > 0, "a number > 0"),
    "lora_dropout": (False, lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (False, lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (False, _is_pattern(lambda x: is_int(x) and x >= 1),
                     "a map of module names to ranks >= 1"),
    "alpha_pattern": (False, _is_pattern(lambda x: is_number(x) and x > 0),
                      "a map of module names to alphas > 0"),
}
_FLOATS = tuple(getattr(torch, name) for name in FLOAT_NAMES)


def _check_peft_config(config: dict, directory) -> None:
    check_schema(config, PEFT_SCHEMA, f"{directory}/{CONFIG_NAME}", extra=True)
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{directory}: only PEFT LoRA adapters can be loaded, got "
                               f"peft_type={config.get('peft_type')!r}")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterFileError(f"{directory}: unsupported PEFT feature {key}="
                                   f"{config[key]!r}: {why}")
    if config.get("bias", "none") != "none":
        raise AdapterFileError(f"{directory}: unsupported PEFT feature bias={config['bias']!r}: "
                               f"it trains the base layers' biases, which AdapterLinear keeps "
                               f"frozen")


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike, *,
                      adapter_dtype: torch.dtype | None = None,
                      verbose: bool = False) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model`` (a plain pre-trained model, in
    place) as ``lora`` ``AdapterLinear`` layers; returns ``model``.

    The adapted model's outputs equal those of ``PeftModel.from_pretrained(model, directory)``
    up to fp32 rounding; its adapters are trainable and can be saved with ``save_adapter``
    or exported back with :func:`export_peft_adapter`. Raises ``ValueError``
    (:class:`~speclora_kernels.AdapterFileError` for the files) for other PEFT
    methods, unsupported LoRA features (DoRA, biases, modules_to_save, ...), tensors other
    than float ``lora_A``/``lora_B``, missing modules, or shapes that do not fit, all found
    from the config and the safetensors header before tensor data is read and before the
    model changes. A pickled ``adapter_model.bin`` is refused. PEFT's files carry no
    checksum: a tensor whose bytes changed on disk loads as those bytes.
    """
    config = read_config(directory)
    _check_peft_config(config, directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    with TensorFile(path) as file:
        factors: dict[str, dict[str, str]] = {}
        for key in file.entries:
            match = _LORA_KEY.fullmatch(key)
            if match is None:
                raise AdapterFileError(
                    f"{path}: unsupported tensor {key!r}; only '<module>.lora_A.weight' and "
                    f"'<module>.lora_B.weight' are understood (no embedding/conv LoRA, DoRA "
                    f"magnitudes, biases)")
            name = match["name"].removeprefix(PEFT_PREFIX)
            factors.setdefault(name, {})[match["part"]] = key
        bare = unwrap(model)
        modules = dict(bare.named_modules())
        r0, alpha0 = config.get("r", 8), config.get("lora_alpha", 8)
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        specs, keys = {}, {}
        for name, pair in factors.items():
            if set(pair) != {"A", "B"}:
                raise AdapterFileError(f"{path}: {name} has lora_{''.join(pair)} but not both "
                                       f"lora_A and lora_B")
            module = modules.get(name)
            if module is None:
                raise AdapterFileError(f"{path}: the adapter has layer {name!r}, which the "
                                       f"model lacks")
            if isinstance(module, AdapterLinear) or not isinstance(module, nn.Linear):
                raise AdapterFileError(f"{name}: expected a plain nn.Linear or Linear4bit to "
                                       f"adapt, got {type(module).__name__}")
            shape_a, dtype_a = file.entries[pair["A"]]
            shape_b, dtype_b = file.entries[pair["B"]]
            r = _pattern_value(rank_pattern, name, r0)
            want_a, want_b = (r, module.in_features), (module.out_features, r)
            if shape_a != want_a or shape_b != want_b:
                raise AdapterFileError(
                    f"{path}: {name}: lora_A {shape_a} / lora_B {shape_b} do not fit rank {r} "
                    f"on a {module.out_features}x{module.in_features} layer (expected "
                    f"{want_a} / {want_b})")
            if dtype_a not in _FLOATS or dtype_b not in _FLOATS:
                raise AdapterFileError(f"{path}: {name}: lora_A/lora_B must be floating point, "
                                       f"got {dtype_a} / {dtype_b}")
            lora_alpha = _pattern_value(alpha_pattern, name, alpha0)
            scaling = lora_alpha / r ** 0.5 if config.get("use_rslora") else lora_alpha / r
            specs[name] = {"method": "lora", "options": {"r": r, "alpha": scaling * r},
                           "dropout": float(config.get("lora_dropout", 0.0)),
                           "adapter_dtype": adapter_dtype}
            keys[name] = pair
        if not specs:
            raise AdapterFileError(f"{path}: the adapter holds no LoRA weights")
        tensors = file.read()
    adapt_layers(bare, specs, verbose=verbose)
    layers = adapter_layers(bare)
    for name, pair in keys.items():
        own = layers[name].adapter_tensors()
        layers[name].load_adapter_tensors(
            {part: tensors[key].to(own[part].device, own[part].dtype)
             for part, key in pair.items()})
    return model


@torch.no_grad()
def peft_factors(layer: AdapterLinear) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(lora_A, lora_B, lora_alpha)`` of one layer such that
    ``W0 + (lora_alpha / R) lora_B @ lora_A`` is the layer's adapted weight, ``W0`` the
    pre-trained weight (see the module docstring); in the adapter dtype."""
    adapter = layer.adapter
    if adapter.name == "lora":
        return adapter.A.detach().clone(), adapter.B.detach().clone(), adapter.alpha
    # The layer's own factors include the frozen rows that take P diag(sigma) Q.T out of an
    # NF4 W0 base (spectral methods on a Linear4bit): those are exact already.
    own = getattr(layer, "factors", None)
    down, scale, up = own() if callable(own) else adapter.factors()
    dtype = down.dtype
    acc = torch.promote_types(dtype, torch.float32)
    lora_a, lora_b = down.detach(), (up.to(acc) * scale.to(acc)).to(dtype)
    if adapter.replaces_base and getattr(layer, "residual_base", True):
        if getattr(layer, "quant_type", None) is not None:
            raise ValueError(
                f"{adapter.name} with an NF4 W_res base (inject(quantize='nf4')) cannot be "
                f"exported as a LoRA adapter: W_res was quantized on its own, and its "
                f"difference to the original weight, dense or NF4, is full-rank. Merge it "
                f"(merge_and_unload), or adapt a Linear4bit or dense base instead")
        lora_a = torch.cat([lora_a, adapter.Q.T])
        lora_b = torch.cat([lora_b, -(adapter.P.to(acc) * adapter.sigma.to(acc)).to(dtype)], 1)
    return lora_a.contiguous(), lora_b.contiguous(), float(lora_a.shape[0])


def _mode(values):
    return Counter(values).most_common(1)[0][0]


def export_peft_adapter(model: nn.Module, directory: str | os.PathLike, *,
                        task_type: str | None = None,
                        base_model_name_or_path: str | None = None) -> str:
    """Write the adapters of ``model`` as a PEFT LoRA adapter directory
    (``adapter_config.json`` + ``adapter_model.safetensors``); returns the directory.

    ``peft.PeftModel.from_pretrained(original_model, directory)`` then computes this model's
    outputs (up to fp32 rounding). Ranks that differ between layers go into ``rank_pattern``
    / ``alpha_pattern`` under each layer's full name. ``lora_dropout`` is the ``lora`` layers'
    dropout; other methods export 0.0 (PEFT would drop the input of every exported row,
    frozen spectral rows included). Raises ``ValueError`` where an exact export does not
    exist (``spectral_*`` on a ``W_res`` quantized on its own).
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no AdapterLinear layers to export")
    tensors, ranks, alphas, dropouts = {}, {}, {}, []
    for name, layer in layers.items():
        lora_a, lora_b, alpha = peft_factors(layer)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_a.to("cpu")
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_b.to("cpu")
        ranks[name], alphas[name] = lora_a.shape[0], alpha
        dropouts.append(layer.dropout if layer.adapter.name == "lora" else 0.0)
    r, lora_alpha = _mode(ranks.values()), _mode(alphas.values())
    bare = unwrap(model)
    if base_model_name_or_path is None:
        name_or_path = getattr(getattr(bare, "config", None), "_name_or_path", None)
        base_model_name_or_path = name_or_path or None
    config = {
        "peft_type": "LORA", "task_type": task_type, "r": r, "lora_alpha": lora_alpha,
        "target_modules": sorted(layers),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != lora_alpha},
        "lora_dropout": max(dropouts), "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
    }
    os.makedirs(directory, exist_ok=True)
    meta = {"format": "pt", "exported_by": f"speclora_kernels {__version__}",
            "methods": ",".join(sorted({layer.adapter.name for layer in layers.values()}))}
    # both staged and fsynced before either is renamed: a failed write changes neither file
    commit_files([(os.path.join(directory, WEIGHTS_NAME), _save_bytes(tensors, metadata=meta)),
             (os.path.join(directory, CONFIG_NAME),
              (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())])
    return os.fspath(directory)
