"""Fused Triton kernels for spectral and low-rank adapter layers.

One op serves every method: ``y = x @ W.T + bias + ((x @ D.T) * s) @ U.T``.
"""
from ._version import __version__
from .integrations import inject, merge_and_unload, parameter_summary
from .methods import METHODS, register_method
from .modules import AdapterLinear
from .ops import fused_adapter_linear
from .persistence import (
    AdapterFileError,
    export_peft_adapter,
    load_adapter,
    load_checkpoint,
    load_layer_adapter,
    load_peft_adapter,
    save_adapter,
    save_checkpoint,
    save_layer_adapter,
)


def patch_peft(model=None) -> int:
    """Run PEFT's own LoRA ``Linear`` and bitsandbytes 4-bit LoRA layers on the fused op,
    for models built before and after the call (``model``: only that model's layers);
    see :func:`speclora_kernels.peft.patch.patch_peft`. Needs peft >= 0.21."""
    from .peft.patch import patch_peft as patch

    return patch(model)


def unpatch_peft(model=None) -> int:
    """Undo :func:`patch_peft`."""
    from .peft.patch import unpatch_peft as unpatch

    return unpatch(model)


__all__ = ["AdapterLinear", "patch_peft", "unpatch_peft", "fused_adapter_linear", "inject", "merge_and_unload",
           "parameter_summary", "save_adapter", "load_adapter", "save_layer_adapter",
           "load_layer_adapter", "save_checkpoint", "load_checkpoint", "export_peft_adapter",
           "load_peft_adapter", "AdapterFileError", "METHODS", "register_method",
           "__version__"]
