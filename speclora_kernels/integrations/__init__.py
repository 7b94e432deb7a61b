"""Whole-model integration: inject adapters into a model, save/load them, PEFT interop.

Needs only torch; transformers, peft, bitsandbytes and tqdm are used when present.
"""
from .adapter_files import load_adapter, save_adapter
from .checkpoint import load_checkpoint, save_checkpoint
from .inject import (adapter_layers, count_parameters, find_targets, inject, merge_and_unload,
                     parameter_summary)
from .peft_interop import export_peft_adapter, load_peft_adapter

__all__ = ["inject", "merge_and_unload", "find_targets", "adapter_layers", "count_parameters",
           "parameter_summary", "save_adapter", "load_adapter", "export_peft_adapter",
           "load_peft_adapter"]
__all__ += ["save_checkpoint", "load_checkpoint"]
