"""Whole-model integration: inject adapters into a model, merge them back, count parameters.

Needs only torch; transformers, bitsandbytes and tqdm are used when present. Saving and
loading adapters is :mod:`speclora_kernels.persistence`; FSDP2 sharding is :mod:`.fsdp`.
"""
from .fsdp import fully_shard_model, prepare_fsdp
from .inject import adapter_layers, count_parameters, find_targets, inject, merge_and_unload, parameter_summary

__all__ = ["inject", "merge_and_unload", "find_targets", "adapter_layers", "count_parameters",
           "parameter_summary", "fully_shard_model", "prepare_fsdp"]
