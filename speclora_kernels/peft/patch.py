"""``patch_peft()``: PEFT's own LoRA layers run the fused op, with no other change to the
user's code (in the spirit of Liger Kernel's ``apply_liger_kernel_to_*``).

``patch_peft()`` replaces the ``forward`` of PEFT's LoRA ``Linear`` and bitsandbytes
``Linear4bit`` layer classes, so models built before and after the call run the fused op;
``patch_peft(model)`` patches only that model's layers (their instances). Everything but the
forward stays PEFT's: configs, ``merge``/``unmerge``, adapter switching, saving, loading,
``.to()``. The fused forward computes what PEFT's does, ``base(x) + sum over active adapters
of scaling * lora_B(lora_A(dropout(x)))`` (``lora_bias`` included): the active adapters'
factors are concatenated along R (exact), ``s = scaling`` per row (``use_rslora``, rank and
alpha patterns are already in PEFT's ``scaling``), dropout runs in the kernel (the op's
``dropout_p``; one mask per call, shared by the adapters with that probability).

Whatever it does not cover runs PEFT's own forward, and one log line (logger
``speclora_kernels.peft``, once per layer class and reason) names why: LoRA variants
(DoRA, aLoRA, ...), ``fan_in_fan_out`` (transformers ``Conv1D``), ``lora_bias`` or active
dropout in a mixed-adapter batch, other base layers (8-bit, GPTQ, ...), a base layer with forward
hooks (accelerate offloading), lora modules that are not plain ``nn.Linear``, devices other
than CPU and CUDA; embedding and convolution LoRA layers are never fused. Disabled and
merged layers run PEFT's forward too (there is nothing to fuse), without a log line.

Mixed-adapter batches (``adapter_names=``, one adapter or ``"__base__"`` per sample) run as
one fused call per layer (``_fused.mixed_forward``) after PEFT's own checks of the layer
(``_check_forward_args``: lengths, DoRA).

Not seen by the patch: modules whose ``forward`` was replaced on the instance before (e.g.
accelerate's hooks wrap the bound method they found), and models ``torch.compile`` traced
before the call (they run the graph they compiled).
"""
from __future__ import annotations

import importlib.util
import logging
import types

import torch
from torch import nn

from ._fused import Block, base_kind, fused_forward, mixed_forward

logger = logging.getLogger("speclora_kernels.peft")
_ORIGINAL: dict[type, object] = {}  # class -> its forward before patch_peft()
_FALLBACK: dict[type, object] = {}  # class -> the forward a patched layer falls back to
_LOGGED: set[tuple[str, str]] = set()
_DEVICES = ("cpu", "cuda")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fused_classes() -> list[type]:
    from peft.tuners.lora.layer import Linear

    classes = [Linear]
    if importlib.util.find_spec("bitsandbytes") is not None:
        from peft.tuners.lora import bnb

        if hasattr(bnb, "Linear4bit"):
            classes.append(bnb.Linear4bit)
    return classes


def _unfused_classes() -> dict[type, str]:
    """PEFT LoRA layer classes that are never fused, with the reason logged."""
    from peft.tuners.lora import layer

    reasons = {"Embedding": "embedding LoRA is a gather, not a GEMM",
               "Conv1d": "convolution bases are not covered",
               "Conv2d": "convolution bases are not covered",
               "Conv3d": "convolution bases are not covered",
               "MultiheadAttention": "nn.MultiheadAttention bases are not covered"}
    found = {getattr(layer, name): why for name, why in reasons.items() if hasattr(layer, name)}
    if importlib.util.find_spec("bitsandbytes") is not None:
        from peft.tuners.lora import bnb

        if hasattr(bnb, "Linear8bitLt"):
            found[bnb.Linear8bitLt] = "8-bit bitsandbytes bases are not covered"
    return found


def _log_once(cls: type, reason: str) -> None:
    if (cls.__name__, reason) not in _LOGGED:
        _LOGGED.add((cls.__name__, reason))
        logger.warning("speclora_kernels.patch_peft: %s runs PEFT's own forward: %s",
                       cls.__name__, reason)


def _fallback(layer) -> object:
    """The forward PEFT's class defines for ``layer`` (what runs when the patch steps aside)."""
    cls = type(layer)
    found = _FALLBACK.get(cls)
    if found is None:
        for klass in cls.__mro__:
            if klass in _ORIGINAL:
                found = _ORIGINAL[klass]
                break
            f = klass.__dict__.get("forward")
            if f is not None and f is not lora_forward:
                found = f
                break
        _FALLBACK[cls] = found
    return found


def _plan(self, x, args, kwargs):
    """``(kind, blocks, extra_bias)`` when the fused op computes this call (a mixed-adapter
    batch: ``(kind, {name: block}, adapter_names)``); else a string:
    ``""`` when there is nothing to fuse (disabled, merged, no active adapter, an input
    PEFT itself refuses), otherwise the reason. Runs on every call, so it reads the
    modules' dicts directly (``nn.Module.__getattr__`` costs a microsecond a lookup)."""
    d = self.__dict__
    if d["_disable_adapters"] or d["merged_adapters"]:
        return ""
    if args:
        return "positional arguments besides the input"
    names = None
    for key, value in kwargs.items():
        if value is not None:
            if key != "adapter_names":
                return f"the keyword argument {key!r}"
            names = value
    if type(x) is not torch.Tensor or x.dtype not in _FLOATS:
        return ""
    mods = d["_modules"]
    lora_as, lora_bs, drops = mods["lora_A"]._modules, mods["lora_B"]._modules, \
        mods["lora_dropout"]._modules
    if names is None:
        active = d["_active_adapter"]
        active = [active] if isinstance(active, str) else active
    else:
        active = list(dict.fromkeys(names))
    variants = d["lora_variant"]
    blocks, extra_bias = [], None
    for a in active:
        lora_a = lora_as.get(a)
        if lora_a is None:
            continue
        if a in variants:
            return f"the LoRA variant {type(variants[a]).__name__} (DoRA, aLoRA, ... are not fused)"
        lora_b, drop = lora_bs[a], drops[a]
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
            return "lora_A / lora_B are not plain nn.Linear modules"
        if type(drop) is nn.Dropout:
            p = drop.p if drop.training else 0.0
        elif type(drop) is nn.Identity:
            p = 0.0
        else:
            return f"the dropout module is a {type(drop).__name__}"
        if names is not None and p > 0:
            return "dropout is active (training mode) in a mixed-adapter batch"
        for m in (lora_a, lora_b, drop):
            if m._forward_hooks or m._forward_pre_hooks:
                return "a lora module has forward hooks"
        pa, pb = lora_a._parameters, lora_b._parameters
        wa, wb = pa["weight"], pb["weight"]
        if type(wa) is not nn.Parameter or type(wb) is not nn.Parameter or pa["bias"] is not None:
            return "lora weights are not plain parameters (or lora_A has a bias)"
        scaling = d["scaling"][a]
        if type(scaling) not in (float, int):
            return f"scaling is a {type(scaling).__name__}, not a number"
        r = wa.shape[0]
        blocks.append(Block(wa, _scale(self, a, r, scaling, x.device), wb, p, r, r))
        bias = pb["bias"]
        if bias is not None:
            if names is not None:
                return "lora_bias in a mixed-adapter batch (a per-row bias is not fused)"
            term = bias * scaling
            extra_bias = term if extra_bias is None else extra_bias + term
    if not blocks:
        return ""
    if d.get("fan_in_fan_out", False):
        return "fan_in_fan_out=True (a transformers Conv1D base)"
    if not d.get("cast_input_dtype_enabled", True):
        return "input dtype casting is disabled (peft.helpers.disable_input_dtype_casting)"
    base = mods["base_layer"]
    kind = base_kind(base)
    if kind is None:
        return f"the base layer is a {type(base).__name__}"
    if base._forward_hooks or base._forward_pre_hooks:
        return "the base layer has forward hooks (e.g. accelerate offloading)"
    device = x.device
    if device.type not in _DEVICES:
        return f"inputs on {device.type} (the op runs on CPU and CUDA)"
    weight = base._parameters["weight"]
    if x.shape[-1] != d["in_features"] or weight.device != device:
        return ""  # PEFT raises its own error
    if kind == "dense" and x.dtype != weight.dtype and not torch.is_autocast_enabled(device.type):
        return ""
    if names is not None:
        return kind, dict(zip((a for a in active if a in lora_as), blocks)), names
    return kind, blocks, extra_bias


def _scale(self, adapter: str, r: int, scaling, device) -> torch.Tensor:
    """``scaling * ones(r)`` in float32, cached on the layer per adapter."""
    cache = self.__dict__.setdefault("_speclora_scale", {})
    key = (r, scaling, device)
    entry = cache.get(adapter)
    if entry is None or entry[0] != key:
        entry = cache[adapter] = (key, torch.full((r,), float(scaling), dtype=torch.float32,
                                                  device=device))
    return entry[1]


def lora_forward(self, x, *args, **kwargs):
    """The forward of PEFT's LoRA ``Linear`` / ``Linear4bit`` under :func:`patch_peft`."""
    if kwargs.get("adapter_names") is not None:
        self._check_forward_args(x, *args, **kwargs)  # PEFT's own checks (lengths, DoRA)
    plan = _plan(self, x, args, kwargs)
    if type(plan) is str:
        if plan:
            _log_once(type(self), plan)
        return _fallback(self)(self, x, *args, **kwargs)
    kind, blocks, extra = plan
    if type(blocks) is dict:  # a mixed-adapter batch; extra: the names
        return mixed_forward(self, self.__dict__["_modules"]["base_layer"], x, extra, blocks,
                             kind=kind)
    return fused_forward(self, self.__dict__["_modules"]["base_layer"], x, blocks, extra,
                         kind=kind)


def _logging_forward(original, reason: str):
    def forward(self, *args, **kwargs):
        _log_once(type(self), reason)
        return original(self, *args, **kwargs)

    forward._speclora_original = original
    return forward


def patch_peft(model: nn.Module | None = None) -> int:
    """Run PEFT's LoRA ``Linear`` and bitsandbytes 4-bit LoRA layers on the fused op.

    ``model=None``: patch the layer classes (every model, built before or after; undo with
    :func:`unpatch_peft`); returns the number of classes patched now. ``model``: patch that
    model's LoRA layers only; returns how many. Idempotent.
    """
    if model is not None:
        count, classes = 0, tuple(_fused_classes())
        for module in model.modules():
            if isinstance(module, classes):
                if getattr(module.__dict__.get("forward"), "__func__", None) is not lora_forward:
                    module.forward = types.MethodType(lora_forward, module)
                count += 1
        return count
    patched = 0
    for cls in _fused_classes():
        if cls not in _ORIGINAL:
            _ORIGINAL[cls] = cls.__dict__["forward"]
            cls.forward = lora_forward
            patched += 1
    for cls, why in _unfused_classes().items():
        if cls not in _ORIGINAL and "forward" in cls.__dict__:
            _ORIGINAL[cls] = cls.__dict__["forward"]
            cls.forward = _logging_forward(_ORIGINAL[cls], why)
    _FALLBACK.clear()
    return patched


def unpatch_peft(model: nn.Module | None = None) -> int:
    """Undo :func:`patch_peft` (of the classes, or of ``model``'s layers); returns how many
    classes or layers were restored."""
    if model is not None:
        count = 0
        for module in model.modules():
            bound = module.__dict__.get("forward")
            if getattr(bound, "__func__", None) is lora_forward:
                del module.forward
                count += 1
        return count
    fused = set(_fused_classes())
    restored = 0
    for cls, forward in list(_ORIGINAL.items()):
        cls.forward = forward
        del _ORIGINAL[cls]
        restored += cls in fused
    _FALLBACK.clear()
    return restored


def is_patched() -> bool:
    """Whether :func:`patch_peft` patched PEFT's LoRA classes (and they are not unpatched)."""
    return any(cls in _ORIGINAL for cls in _fused_classes())
