"""Training checkpoints without pickle: the adapter, the optimizer state and the RNG states,
so that a resumed run continues bit-exactly where the saved one was.

``save_checkpoint(directory, model, optimizer, step=...)`` writes

- ``adapter_config.json`` + ``adapter_model.safetensors``: :func:`.model.save_adapter`;
- ``trainer_state.safetensors``: the optimizer's state tensors (``exp_avg``, ``step``, ...),
  the torch CPU / CUDA RNG states and numpy's as tensors; its header embeds (as JSON) the
  param groups, scalar state, Python's RNG state, the step, the trainable parameters' names
  in optimizer order, your ``extra`` dict, and the checksum of the adapter file it belongs
  to. Written last, it is the checkpoint's commit record: if a save dies after the adapter
  but before it, loading reports that the two do not belong together.

``load_checkpoint(directory, model, optimizer)`` checks everything (schema, shapes, parameter
names, checksums) before it changes anything, then loads the adapter into ``model`` (already
adapted, e.g. by :func:`inject` with the same options or by :func:`load_adapter`), the state
into ``optimizer`` (built over ``model``'s trainable parameters, like the saved one) and
restores the RNG states. Returns ``{"step": ..., "extra": ...}``. Where your data loader is
(epoch, sample order) is yours to put into ``extra``.

For a run that must survive a crash mid-save, save to a new directory per checkpoint (like
``checkpoint-1000/``) and delete the old one after: every file is atomic on its own.
"""
from __future__ import annotations

import os
import random
import sys
import warnings

import torch
from torch import nn

from .._version import __version__
from ..integrations.fsdp import is_sharded, place_like, ranks_agree, to_cpu_whole, writer_rank_only
from .container import SHA_KEY, TensorFile, commit_files, encode_container, open_container, read_verified, tensor_table
from .directory import WEIGHTS_NAME
from .model import load_adapter, save_adapter
from .schema import AdapterFileError, is_int

STATE_NAME = "trainer_state.safetensors"
STATE_FORMAT = "speclora_kernels.trainer_state"
STATE_VERSION = 1
# The trainer state's keys besides the container header's.
_STATE_FIELDS = {
    "step": (True, lambda v: is_int(v) and v >= 0, "an int >= 0"),
    "adapter_sha256": (True, lambda v: isinstance(v, str) and len(v) == 64, "a sha256"),
    "param_names": (True, lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
                    "a list of parameter names"),
    "param_groups": (True, lambda v: isinstance(v, list) and all(isinstance(g, dict) for g in v),
                     "a list of objects"),
    "tuple_keys": (True, lambda v: isinstance(v, list) and all(
        isinstance(keys, list) and all(isinstance(k, str) for k in keys) for keys in v),
        "a list of key lists"),
    "state": (True, lambda v: isinstance(v, dict), "an object"),
    "python_rng": (True, lambda v: isinstance(v, list) and len(v) == 3, "[version, state, gauss]"),
    "numpy_rng": (True, lambda v: v is None or (isinstance(v, list) and len(v) == 4),
                  "null or [name, pos, has_gauss, cached_gaussian]"),
    "cuda_devices": (True, lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
    "extra": (True, lambda v: isinstance(v, dict), "an object"),
}


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"optimizer parameters {missing[:5]} (in optimizer order) are not "
                         f"parameters of the model")
    return [names[id(p)] for p in params]


def save_checkpoint(directory: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer, *, step: int,
                    extra: dict | None = None) -> str:
    """Save the adapter, ``optimizer``'s state and the RNG states to ``directory`` (see the
    module docstring); consumes no random numbers. Returns the directory.

    Under FSDP2 every rank calls it: adapter and optimizer state are gathered whole and
    rank 0 writes the files one process would, with its RNG states (it warns if another
    rank's differ: seed every rank alike for a bitwise resume)."""
    directory = os.fspath(directory)
    names = _param_names(model, optimizer)
    sharded = is_sharded(model)
    save_adapter(model, directory)
    saved = optimizer.state_dict()
    tensors, state = {}, {}
    for index, entries in saved["state"].items():
        state[str(index)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):  # whole (gathered under FSDP2)
                tensors[f"state.{index}.{key}"] = to_cpu_whole(value)
            else:
                state[str(index)][key] = value
    groups, tuple_keys = [], []
    for g, group in enumerate(saved["param_groups"]):
        entry = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):  # e.g. a tensor learning rate
                tensors[f"group.{g}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                entry[key] = list(value) if isinstance(value, tuple) else value
        groups.append(entry)
        tuple_keys.append(sorted(k for k, v in group.items() if isinstance(v, tuple)))
    tensors["rng.torch"] = torch.get_rng_state()
    cuda = torch.cuda.device_count() if torch.cuda.is_initialized() else 0
    for i, rng in enumerate(torch.cuda.get_rng_state_all() if cuda else []):
        tensors[f"rng.cuda.{i}"] = rng
    numpy_rng = None
    if "numpy" in sys.modules:
        name, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(keys.astype("int64"))
        numpy_rng = [name, int(pos), int(has_gauss), float(cached)]
    version, py_state, gauss = random.getstate()
    if sharded and not ranks_agree([tensors[k] for k in tensors if k.startswith("rng.")],
                                   [py_state, numpy_rng]):
        warnings.warn("save_checkpoint under FSDP2: the ranks' RNG states differ and the "
                      "checkpoint holds rank 0's, which load_checkpoint restores on every "
                      "rank; a resumed run is bitwise the uninterrupted one only when every "
                      "rank is seeded alike", stacklevel=2)
    config = {"format": STATE_FORMAT, "format_version": STATE_VERSION,
              "library_version": __version__,
              "step": step, "adapter_sha256": None, "param_names": names,
              "param_groups": groups, "tuple_keys": tuple_keys, "state": state,
              "python_rng": [version, list(py_state), gauss], "numpy_rng": numpy_rng,
              "cuda_devices": cuda, "extra": dict(extra or {}), "tensors": tensor_table(tensors)}

    def write():
        with TensorFile(os.path.join(directory, WEIGHTS_NAME)) as adapter:
            config["adapter_sha256"] = adapter.metadata[SHA_KEY]
        blob, _ = encode_container(tensors, config)
        commit_files([(os.path.join(directory, STATE_NAME), blob)])

    writer_rank_only(sharded, write)
    return directory


def load_checkpoint(directory: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer, *, check_base: bool = True) -> dict:
    """Resume from :func:`save_checkpoint`: adapter into ``model``, state into
    ``optimizer``, RNG states restored. Raises ``AdapterFileError`` (a ``ValueError``)
    naming the file if anything does not fit, before changing anything.
    Returns ``{"step": ..., "extra": ...}``."""
    directory = os.fspath(directory)
    path = os.path.join(directory, STATE_NAME)
    file, config = open_container(path, None, format=STATE_FORMAT, version=STATE_VERSION,
                                  fields=_STATE_FIELDS, extra=False)
    with file:
        tensors = read_verified(file)
    with TensorFile(os.path.join(directory, WEIGHTS_NAME)) as adapter:
        if adapter.metadata.get(SHA_KEY) != config["adapter_sha256"]:
            raise AdapterFileError(f"{path} belongs to another adapter than {adapter.path} "
                                   f"(a checkpoint save interrupted between the two?)")
    names = _param_names(model, optimizer)
    if names != config["param_names"]:
        raise AdapterFileError(f"{path}: the optimizer's parameters are {names[:3]}..., the "
                               f"checkpoint's {config['param_names'][:3]}... (same model, "
                               f"adapter options and parameter order needed)")
    groups = optimizer.param_groups
    saved_ids = [g.get("params") for g in config["param_groups"]]
    if ([len(g["params"]) for g in groups] != [len(i) if isinstance(i, list) else -1
                                               for i in saved_ids]
            or sum(saved_ids, []) != list(range(len(names)))):
        raise AdapterFileError(f"{path}: the optimizer's param groups differ from the "
                               f"checkpoint's")
    params = [p for g in groups for p in g["params"]]
    state = {}
    for index, scalars in config["state"].items():
        if not index.isdigit() or int(index) >= len(params):
            raise AdapterFileError(f"{path}: state for parameter {index!r}, which the "
                                   f"optimizer does not have")
        state[int(index)] = dict(scalars)
    for name, t in tensors.items():
        kind, _, rest = name.partition(".")
        if kind == "state":
            index, _, key = rest.partition(".")
            if index not in config["state"] or not key:
                raise AdapterFileError(f"{path}: tensor {name!r} without a state entry")
            param = params[int(index)]
            if t.dim() > 0 and t.shape != param.shape:
                raise AdapterFileError(f"{path}: {name} is {list(t.shape)}, its parameter "
                                       f"{names[int(index)]} is {list(param.shape)}")
            state[int(index)][key] = place_like(t, param) if t.dim() > 0 else t  # FSDP2: a shard
    param_groups = []
    if len(config["tuple_keys"]) != len(config["param_groups"]):
        raise AdapterFileError(f"{path}: tuple_keys must list one group per param group")
    for g, group in enumerate(config["param_groups"]):
        tuples = config["tuple_keys"][g]
        entry = {k: tuple(v) if k in tuples and isinstance(v, list) else v
                 for k, v in group.items()}
        for name, t in tensors.items():
            if name.startswith(f"group.{g}."):
                entry[name.removeprefix(f"group.{g}.")] = t
        param_groups.append(entry)
    rngs = _check_rngs(path, config, tensors)
    load_adapter(model, directory, check_base=check_base)
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    torch.set_rng_state(tensors["rng.torch"])
    if rngs["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rngs["cuda"])
    random.setstate(rngs["python"])
    if rngs["numpy"] is not None:
        sys.modules["numpy"].random.set_state(rngs["numpy"])
    return {"step": config["step"], "extra": config["extra"]}


def _check_rngs(path: str, config: dict, tensors: dict) -> dict:
    """The saved RNG states, each tried on a scratch generator first, so that a bad one
    raises before anything changes."""
    try:
        torch.Generator().set_state(tensors["rng.torch"])
        cuda = [tensors[f"rng.cuda.{i}"] for i in range(config["cuda_devices"])]
        version, py_state, gauss = config["python_rng"]
        python = (version, tuple(py_state), gauss)
        random.Random().setstate(python)
        numpy = None
        if config["numpy_rng"] is not None:
            import numpy as np

            name, pos, has_gauss, cached = config["numpy_rng"]
            numpy = (name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss,
                     cached)
            np.random.RandomState().set_state(numpy)
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise AdapterFileError(f"{path}: invalid RNG state ({type(e).__name__}: {e})") from None
    return {"cuda": cuda, "python": python, "numpy": numpy}
