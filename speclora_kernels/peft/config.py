"""The PEFT configs of our methods: ``SpecLoraConfig``, ``SpectralAdapterConfig`` (variant
``"additive"`` or ``"rotational"``) and ``PiCaConfig``.

PEFT-style fields (``r``, ``target_modules``, ``exclude_modules``, ``lora_alpha``,
``lora_dropout``, ``modules_to_save``, ``rank_pattern``, ...) plus each method's own
(``k``, ``variant``, ``svd``); their names and defaults come from
:data:`speclora_kernels.persistence.peft_methods.CONFIG_FIELDS`, the one description of the
format ``save_pretrained`` and ``save_adapter`` both write. Every value is checked when the
config is built; errors name the config, the field and what was expected.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Union

from peft import PeftConfig

from ..methods.svd import SVD_SOLVERS
from ..persistence.peft_methods import CONFIG_FIELDS, PEFT_METHODS

SPECLORA = "SPECLORA_KERNELS_SPECLORA"
SPECTRAL = "SPECLORA_KERNELS_SPECTRAL"
PICA = "SPECLORA_KERNELS_PICA"


def _field(peft_type: str, name: str, help: str):
    default = CONFIG_FIELDS[peft_type][name]
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _names(config, name: str):
    value = getattr(config, name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return set(value)  # as PEFT's LoraConfig does; saved as a list
    raise TypeError(f"{type(config).__name__}: {name} must be None, a regex string or a list of "
                    f"module names, got {value!r}")


def _check(config) -> None:
    """Normalise and check the fields every one of our configs has."""
    cls = type(config).__name__
    if not _is_int(config.r) or config.r < 1:
        raise ValueError(f"{cls}: r must be an int >= 1, got {config.r!r}")
    if config.svd not in SVD_SOLVERS:
        raise ValueError(f"{cls}: svd must be one of {SVD_SOLVERS}, got {config.svd!r}")
    if not _is_number(config.lora_dropout) or not 0 <= config.lora_dropout < 1:
        raise ValueError(f"{cls}: lora_dropout must be a number in [0, 1), got "
                         f"{config.lora_dropout!r}")
    config.target_modules = _names(config, "target_modules")
    config.exclude_modules = _names(config, "exclude_modules")
    if config.modules_to_save is not None and not (
            isinstance(config.modules_to_save, (list, tuple, set))
            and all(isinstance(v, str) for v in config.modules_to_save)):
        raise TypeError(f"{cls}: modules_to_save must be None or a list of module names, got "
                        f"{config.modules_to_save!r}")
    _pattern(config, "rank_pattern", lambda v: _is_int(v) and v >= 1, "ints >= 1")


def _pattern(config, name: str, ok, what: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, dict) or not all(isinstance(k, str) and ok(v)
                                              for k, v in value.items()):
        raise ValueError(f"{type(config).__name__}: {name} must map module names (regex "
                         f"suffixes, as in PEFT) to {what}, got {value!r}")


def _no_dropout(config, why: str) -> None:
    if config.lora_dropout:
        raise ValueError(f"{type(config).__name__}: lora_dropout must be 0.0, got "
                         f"{config.lora_dropout}: {why}")


_TARGETS = ("module names to adapt (exact names or '.name' suffixes), a regex matched against "
            "the whole name, or 'all-linear'; nn.Linear and bitsandbytes NF4 Linear4bit")


@dataclass
class SpecLoraConfig(PeftConfig):
    """SpecLoRA: LoRA plus a learnable mask on the top-k singular values of each target
    weight (``W0 + (lora_alpha / r) B A + P_k diag(sigma_k * m) Q_k.T``), one fused op.

    ``lora_alpha`` defaults to ``r`` (scaling 1; PEFT's ``LoraConfig`` defaults to 8).
    The top-k factors are computed on first use and saved with the adapter, never
    recomputed when it is loaded."""

    r: int = _field(SPECLORA, "r", "LoRA rank")
    k: int = _field(SPECLORA, "k", "number of top singular values with a learnable mask")
    lora_alpha: Optional[float] = _field(SPECLORA, "lora_alpha",
                                         "LoRA scaling numerator (alpha / r); None means r")
    lora_dropout: float = _field(SPECLORA, "lora_dropout",
                                 "dropout on the LoRA rows' input, in-kernel")
    target_modules: Optional[Union[list[str], str]] = _field(SPECLORA, "target_modules",
                                                             _TARGETS)
    exclude_modules: Optional[Union[list[str], str]] = _field(SPECLORA, "exclude_modules",
                                                              "modules not to adapt")
    modules_to_save: Optional[list[str]] = _field(SPECLORA, "modules_to_save",
                                                  "modules trained in full and saved")
    svd: str = _field(SPECLORA, "svd", "SVD solver: 'auto', 'full' or 'randomized'")
    rank_pattern: dict = _field(SPECLORA, "rank_pattern", "per-module r")
    k_pattern: dict = _field(SPECLORA, "k_pattern", "per-module k")
    alpha_pattern: dict = _field(SPECLORA, "alpha_pattern", "per-module lora_alpha")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SPECLORA
        _check(self)
        if not _is_int(self.k) or self.k < 1:
            raise ValueError(f"SpecLoraConfig: k must be an int >= 1, got {self.k!r}")
        if self.lora_alpha is not None and (not _is_number(self.lora_alpha)
                                            or not self.lora_alpha > 0):
            raise ValueError(f"SpecLoraConfig: lora_alpha must be None (= r) or a number > 0, "
                             f"got {self.lora_alpha!r}")
        _pattern(self, "k_pattern", lambda v: _is_int(v) and v >= 1, "ints >= 1")
        _pattern(self, "alpha_pattern", lambda v: _is_number(v) and v > 0, "numbers > 0")


@dataclass
class SpectralAdapterConfig(PeftConfig):
    """Spectral Adapter (Zhang & Pilanci): fine-tune r singular vectors of each target
    weight, the triplets ``offset .. offset+r-1`` (``offset_pattern``: per module; 0: the
    top r), ``variant="additive"`` (``P_r + B``, ``Q_r + A``) or ``"rotational"``
    (Cayley rotations of ``P_r``, ``Q_r`` and a scale on ``sigma_r``). The base stays the
    pre-trained weight, so several adapters and ``disable_adapter()`` work as with LoRA;
    the layer takes the top-r term out through frozen rows (R = 2r in the op)."""

    r: int = _field(SPECTRAL, "r", "number of singular directions adapted")
    variant: str = _field(SPECTRAL, "variant", "'additive' or 'rotational'")
    offset: int = _field(SPECTRAL, "offset", "first singular index tuned (0: the top r)")
    lora_dropout: float = _field(SPECTRAL, "lora_dropout",
                                 "must be 0.0 (no separate trainable down path)")
    target_modules: Optional[Union[list[str], str]] = _field(SPECTRAL, "target_modules",
                                                             _TARGETS)
    exclude_modules: Optional[Union[list[str], str]] = _field(SPECTRAL, "exclude_modules",
                                                              "modules not to adapt")
    modules_to_save: Optional[list[str]] = _field(SPECTRAL, "modules_to_save",
                                                  "modules trained in full and saved")
    svd: str = _field(SPECTRAL, "svd", "SVD solver: 'auto', 'full' or 'randomized'")
    rank_pattern: dict = _field(SPECTRAL, "rank_pattern", "per-module r")
    offset_pattern: dict = _field(SPECTRAL, "offset_pattern", "per-module offset")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SPECTRAL
        _check(self)
        if not _is_int(self.offset) or self.offset < 0:
            raise ValueError(f"SpectralAdapterConfig: offset must be an int >= 0, got "
                             f"{self.offset!r}")
        _pattern(self, "offset_pattern", lambda v: _is_int(v) and v >= 0, "ints >= 0")
        variants = sorted(k for k in PEFT_METHODS[SPECTRAL].methods)
        if self.variant not in variants:
            raise ValueError(f"SpectralAdapterConfig: variant must be one of {variants}, got "
                             f"{self.variant!r}")
        _no_dropout(self, "the Spectral Adapter has no separate trainable down path for "
                          "LoRA-style dropout to act on")


@dataclass
class PiCaConfig(PeftConfig):
    """PiCa: ``W0 + M Q_r.T``, the input projected onto each layer's own top-r right
    singular vectors (frozen, saved with the adapter) and one trainable ``M`` shared by
    every layer of the same target name (``model.layers.*.self_attn.q_proj``), saved once."""

    r: int = _field(PICA, "r", "number of top right singular vectors projected onto")
    lora_dropout: float = _field(PICA, "lora_dropout",
                                 "must be 0.0 (no separate trainable down path)")
    target_modules: Optional[Union[list[str], str]] = _field(PICA, "target_modules", _TARGETS)
    exclude_modules: Optional[Union[list[str], str]] = _field(PICA, "exclude_modules",
                                                              "modules not to adapt")
    modules_to_save: Optional[list[str]] = _field(PICA, "modules_to_save",
                                                  "modules trained in full and saved")
    svd: str = _field(PICA, "svd", "SVD solver: 'auto', 'full' or 'randomized'")
    rank_pattern: dict = _field(PICA, "rank_pattern", "per-module r")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PICA
        _check(self)
        _no_dropout(self, "PiCa has no separate trainable down path for LoRA-style dropout "
                          "to act on")


CONFIGS = {SPECLORA: SpecLoraConfig, SPECTRAL: SpectralAdapterConfig, PICA: PiCaConfig}
