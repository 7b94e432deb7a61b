"""Fused Triton kernels for spectral and low-rank adapter layers.

One op serves every method: ``y = x @ W.T + bias + ((x @ D.T) * s) @ U.T``.
"""
import logging
import sys

from ._import_hook import when_imported
from ._version import __version__
from .integrations import inject, merge_and_unload, parameter_summary
from .integrations.fusion import fuse_adapters
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
           "fuse_adapters", "parameter_summary", "save_adapter", "load_adapter", "save_layer_adapter",
           "load_layer_adapter", "save_checkpoint", "load_checkpoint", "export_peft_adapter",
           "load_peft_adapter", "AdapterFileError", "METHODS", "register_method",
           "__version__"]


def _register_peft_types() -> None:
    """Make our adapter types known to PEFT (``PeftModel.from_pretrained`` of a saved
    SpecLoRA, Spectral Adapter or PiCa adapter) without ``import speclora_kernels.peft``;
    runs when peft is imported, before or after us, and never imports peft itself."""
    if "speclora_kernels.peft" in sys.modules:
        return  # imported or being imported: it registers them itself
    try:
        import speclora_kernels.peft  # noqa: F401  (registers on import)
    except Exception as err:  # e.g. a peft too old: never break the user's `import peft`
        logging.getLogger(__name__).warning("speclora_kernels: adapter types not registered with "
                                            "PEFT: %s", err)


when_imported("peft", _register_peft_types)
