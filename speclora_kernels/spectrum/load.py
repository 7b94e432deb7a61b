"""What the analysis reads: a model's weights (a safetensors file or a folder of them) and,
for an adapter directory, each adapted layer's exact change ``dW`` to its base weight.

Only safetensors are read (a pickle is refused), lazily, tensor by tensor. An adapter
directory (``adapter_config.json`` + ``adapter_model.safetensors``: written by
:func:`~speclora_kernels.save_adapter`, or by PEFT's ``save_pretrained`` for LoRA or one of
our PEFT types) is loaded by the library itself, :func:`~speclora_kernels.load_adapter`, into
a stand-in model made of the base weights, with every check it makes (shapes, options, base
fingerprints); each layer's ``dW`` is then the rank-R product of
:func:`~speclora_kernels.persistence.peft_factors`, the same one ``export_peft_adapter``
writes: ``W' = W0 + (alpha / R) lora_B @ lora_A`` (for the spectral methods it includes
``- P diag(sigma) Q.T``, the top-r term they take out of ``W0``), computed in float64.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..integrations.inject import adapter_layers
from ..persistence import load_adapter, peft_factors
from ..persistence.directory import CONFIG_NAME, WEIGHTS_NAME

FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# Default rule: a layer is skipped when a component of its name looks like an embedding or a
# norm (embed_tokens, word_embeddings, wte/wpe, LayerNorm, ln_f, ...): lookup tables and
# scales, not the linear maps the adapters tune. --targets replaces the rule.
SKIPPED_COMPONENT = re.compile(r"(?i).*(embed|norm).*|wte|wpe|ln_.*")


def natural_key(name: str) -> tuple:
    """Sort key putting ``layers.2`` before ``layers.10`` (and a parent before its children)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def is_skipped(name: str) -> bool:
    """Whether the default rule leaves layer ``name`` out (see :data:`SKIPPED_COMPONENT`)."""
    return any(SKIPPED_COMPONENT.fullmatch(part) for part in name.split("."))


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A directory with PEFT's file names (``load_adapter`` reads one without its JSON too)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name))
                                       for name in (CONFIG_NAME, WEIGHTS_NAME))


class Weights:
    """The tensors of a safetensors file, or of every ``*.safetensors`` file in a folder (a
    sharded model), by name; headers read at once, data on :meth:`load`."""

    def __init__(self, path: str | os.PathLike, arg: str = "weights"):
        self.path = os.fspath(path)
        if os.path.isdir(path):
            files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
                why = f" (only pickle files, never loaded: {pickles[:3]})" if pickles else ""
                raise FileNotFoundError(f"{arg}: {path} holds no .safetensors file{why}")
        elif os.path.isfile(path):
            if not self.path.endswith(".safetensors"):
                raise ValueError(f"{arg}: {path} is not a .safetensors file (only safetensors are read, "
                                 f"never pickles)")
            files = [self.path]
        else:
            raise FileNotFoundError(f"{arg}: {path} does not exist")
        self.file_of: dict[str, str] = {}
        self.header: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in files:
            try:
                with safe_open(file, "pt") as f:
                    for key in f.keys():
                        if key in self.file_of:
                            raise ValueError(f"{arg}: tensor {key!r} is in both {self.file_of[key]} and {file}")
                        part = f.get_slice(key)
                        self.file_of[key] = file
                        self.header[key] = (tuple(part.get_shape()), part.get_dtype())
            except SafetensorError as e:  # a damaged or foreign file
                raise ValueError(f"{arg}: {file} is not a readable safetensors file: {e}") from None

    def load(self, key: str) -> torch.Tensor:
        with safe_open(self.file_of[key], "pt") as f:
            return f.get_tensor(key)

    def linear_weights(self) -> dict[str, tuple[int, ...]]:
        """``{module name: shape}`` of every 2-D floating ``<module>.weight``, in natural order."""
        found = {key.removesuffix(".weight"): shape for key, (shape, dtype) in self.header.items()
                 if key.endswith(".weight") and len(shape) == 2 and dtype in FLOAT_DTYPES}
        return dict(sorted(found.items(), key=lambda item: natural_key(item[0])))


def select_layers(base: Weights, tuned: Weights, targets: str | None) -> tuple[list[str], dict[str, str]]:
    """The layers a full fine-tuning comparison analyses, and ``{name: why}`` for those left out.

    Candidates are the 2-D floating weights present in both; ``targets`` (a regex matched
    against the whole module name, as ``inject``'s string targets) picks among them, else
    the default rule (:func:`is_skipped`). A chosen layer whose shapes differ raises."""
    before, after = base.linear_weights(), tuned.linear_weights()
    common = [n for n in before if n in after]
    skipped = {n: "only in BASE" for n in before if n not in after}
    skipped.update({n: "only in FINETUNED" for n in after if n not in before})
    pattern = compile_targets(targets)
    chosen = []
    for name in common:
        if pattern is not None and not pattern.fullmatch(name):
            skipped[name] = "not matched by --targets"
        elif pattern is None and is_skipped(name):
            skipped[name] = "embedding or norm (default rule; --targets to include it)"
        elif before[name] != after[name]:
            raise ValueError(f"{name}: the weight is {before[name][0]}x{before[name][1]} in BASE but "
                             f"{after[name][0]}x{after[name][1]} in FINETUNED; compare weights of one "
                             f"architecture, or leave it out with --targets")
        else:
            chosen.append(name)
    if not chosen:
        raise ValueError(_nothing_to_compare(common, before, after, targets))
    return chosen, skipped


def compile_targets(targets: str | None) -> re.Pattern | None:
    if targets is None:
        return None
    try:
        return re.compile(targets)
    except re.error as e:
        raise ValueError(f"targets must be a regular expression, got {targets!r}: {e}") from None


def _nothing_to_compare(common: list, before: dict, after: dict, targets) -> str:
    if not common:
        return (f"no common layers: BASE and FINETUNED share no 2-D weight name (BASE has e.g. "
                f"{list(before)[:3]}, FINETUNED {list(after)[:3]})")
    if targets is not None:
        return f"targets={targets!r} matched none of the common layers, e.g. {common[:5]}"
    return f"every common layer is an embedding or norm ({common[:5]}); choose some with --targets"


def _stand_in(base: Weights) -> nn.Module:
    """A module tree of ``nn.Linear`` layers holding the base weights (and biases), named as
    in the file: what ``load_adapter`` adapts."""
    root = nn.Module()
    for name, (out_f, in_f) in base.linear_weights().items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        bias_key = f"{name}.bias"
        has_bias = base.header.get(bias_key, ((), ""))[0] == (out_f,)
        linear = nn.Linear(in_f, out_f, bias=has_bias, device="meta")
        linear.weight = nn.Parameter(base.load(f"{name}.weight"), requires_grad=False)
        if has_bias:
            linear.bias = nn.Parameter(base.load(bias_key), requires_grad=False)
        parent.add_module(leaf, linear)  # natural order: before any child it has
    return root


@dataclass
class AdapterChange:
    """One adapted layer's change ``dW = scale * up @ down`` (rank R, kept factored until
    :meth:`delta`: a whole model's dense ``dW`` at once would not fit)."""

    method: str
    down: torch.Tensor   # R x in (lora_A)
    up: torch.Tensor     # out x R (lora_B)
    scale: float         # lora_alpha / R

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.to(torch.float64) @ self.down.to(torch.float64))


@torch.no_grad()
def adapter_changes(base: Weights, directory: str | os.PathLike, *,
                    verbose: bool = False) -> dict[str, AdapterChange]:
    """The change of every layer the adapter in ``directory`` adapts on the base ``base``
    (module docstring). The adapter's own checks raise ``ValueError`` (``AdapterFileError``)
    naming the directory and layer before any is computed."""
    model = _stand_in(base)
    load_adapter(model, directory, verbose=verbose)
    changes = {}
    for name, layer in adapter_layers(model).items():
        lora_a, lora_b, alpha = peft_factors(layer)
        changes[name] = AdapterChange(layer.adapter.name, lora_a.clone(), lora_b.clone(),
                                      alpha / lora_a.shape[0])
    return changes
