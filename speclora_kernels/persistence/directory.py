"""An adapter directory: PEFT's file names, and its config read as strict JSON.

Both our adapters (:mod:`.model`) and PEFT's (:mod:`.peft_format`) live in
``adapter_config.json`` + ``adapter_model.safetensors``; a pickled ``adapter_model.bin`` is
refused, never loaded.
"""
from __future__ import annotations

import os

from .container import read_json_file
from .schema import ADAPTER_FORMAT, AdapterFileError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def read_config(directory: str | os.PathLike) -> dict:
    """``adapter_config.json`` of ``directory`` (ours or PEFT's), parsed as strict JSON
    (:func:`~speclora_kernels.persistence.container.parse_json`); not yet schema-checked."""
    path = os.path.join(directory, CONFIG_NAME)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(weights):  # a first save interrupted between its two renames
            return {"format": ADAPTER_FORMAT}
        raise FileNotFoundError(f"{path} not found: not an adapter directory")
    if not os.path.isfile(weights) and os.path.isfile(os.path.join(directory, PICKLE_NAME)):
        raise AdapterFileError(f"{directory} holds {PICKLE_NAME}, a pickle file, which is never "
                               f"loaded (it can run code); save it with safetensors instead")
    return read_json_file(path)
