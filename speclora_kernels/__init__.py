"""Fused Triton kernels for spectral and low-rank adapter layers.

One op serves every method: ``y = x @ W.T + bias + ((x @ D.T) * s) @ U.T``.
"""
from .integrations import (export_peft_adapter, inject, load_adapter, load_peft_adapter,
                           merge_and_unload, parameter_summary, save_adapter)
from .methods import METHODS
from .modules import AdapterLinear
from .reference import fused_adapter_linear as reference_adapter_linear
from .serialization import (load_layer_adapter, read_adapter_files, save_layer_adapter,
                            write_adapter_files)

__version__ = "0.1.0"

__all__ = ["reference_adapter_linear", "__version__", "METHODS", "AdapterLinear",
           "save_layer_adapter", "load_layer_adapter", "write_adapter_files",
           "read_adapter_files", "inject", "merge_and_unload", "parameter_summary",
           "save_adapter", "load_adapter", "export_peft_adapter", "load_peft_adapter"]
from .serialization import AdapterFileError  # noqa: E402

__all__ += ["AdapterFileError"]
from .integrations import load_checkpoint, save_checkpoint  # noqa: E402

__all__ += ["save_checkpoint", "load_checkpoint"]
