"""Everything speclora_kernels writes to disk, and reads back checked.

- :mod:`.container`: the checked safetensors container (atomic commit, strict JSON,
  checksummed embedded config) every file below uses;
- :mod:`.schema`: what the files may contain (predicates, :func:`check_schema`, the
  adapter schemas);
- :mod:`.layer`: one layer's adapter; :mod:`.model`: a model's adapters in PEFT's format
  (:mod:`.directory`; :mod:`.peft_methods` describes our PEFT types' configs and tensor
  names); :mod:`.checkpoint`: adapter + optimizer + RNG states; :mod:`.peft_format`: PEFT
  LoRA directories in and out.
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .container import TensorFile, commit_files, read_container, write_container
from .directory import read_config
from .layer import load_layer_adapter, save_layer_adapter
from .model import load_adapter, save_adapter
from .peft_format import export_peft_adapter, load_peft_adapter, peft_factors
from .schema import AdapterFileError

__all__ = ["save_adapter", "load_adapter", "read_config", "save_layer_adapter",
           "load_layer_adapter", "save_checkpoint", "load_checkpoint", "export_peft_adapter",
           "load_peft_adapter", "peft_factors", "AdapterFileError", "TensorFile",
           "commit_files", "write_container", "read_container"]
