"""Adapter files: tensors in safetensors (never pickle), config in JSON, written atomically.

``<stem>.safetensors`` + ``<stem>.json``; a directory ``d`` means the stem ``d/adapter``.
:func:`write_adapter_files` / :func:`read_adapter_files` are the reusable pieces (a model
level saver writes many layers' tensors under prefixed names into one pair of files);
:func:`save_layer_adapter` / :func:`load_layer_adapter` handle one :class:`AdapterLinear`.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors.torch import load as _load_bytes
from safetensors.torch import save as _save_bytes

FORMAT = "speclora_kernels.adapter"
FORMAT_VERSION = 1
# Config keys a saved layer adapter must share with the layer it is loaded into.
MATCH_KEYS = ("method", "r", "k", "alpha", "rank", "in_features", "out_features",
              "adapter_dtype")


def adapter_paths(path: str | os.PathLike) -> tuple[str, str]:
    """``(<stem>.safetensors, <stem>.json)`` for a stem, or for ``dir/adapter`` if ``path``
    is an existing directory. A ``.safetensors``/``.json`` suffix on ``path`` is dropped."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "adapter")
    for suffix in (".safetensors", ".json"):
        path = path.removesuffix(suffix)
    return path + ".safetensors", path + ".json"


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (not possible on every OS / filesystem)
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_adapter_files(path, tensors: dict[str, torch.Tensor], config: dict) -> tuple[str, str]:
    """Write ``tensors`` (safetensors) and ``config`` (JSON, plus format, version and a
    shape/dtype entry per tensor) next to each other; return both paths."""
    from . import __version__

    bad = [name for name, t in tensors.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise TypeError(f"tensors must map names to torch.Tensor; not tensors: {bad}")
    st_path, json_path = adapter_paths(path)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
            **config,
            "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                        for name, t in cpu.items()}}
    _atomic_write(st_path, _save_bytes(cpu, metadata={"format": "pt"}))
    _atomic_write(json_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return st_path, json_path


def read_adapter_files(path, device: str | torch.device = "cpu"):
    """Read what :func:`write_adapter_files` wrote: ``(tensors, config)``.

    Raises ``ValueError`` if the JSON is not this format or disagrees with the tensors.
    """
    st_path, json_path = adapter_paths(path)
    with open(json_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not a {FORMAT} config (format={config.get('format')!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{json_path} has format_version {config['format_version']}; this "
                         f"library reads up to {FORMAT_VERSION}")
    with open(st_path, "rb") as f:
        tensors = _load_bytes(f.read())
    listed = config.get("tensors", {})
    for name, t in tensors.items():
        want = listed.get(name)
        got = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if want != got:
            raise ValueError(f"{st_path}: tensor {name!r} is {got}, but {json_path} lists {want}")
    if set(listed) != set(tensors):
        raise ValueError(f"{st_path} holds {sorted(tensors)} but {json_path} lists "
                         f"{sorted(listed)}")
    return {name: t.to(device) for name, t in tensors.items()}, config


def save_layer_adapter(layer, path) -> tuple[str, str]:
    """Save one :class:`~speclora_kernels.AdapterLinear`'s adapter (trainable parameters
    and frozen spectral factors, not the base weight) to ``<path>.safetensors`` +
    ``<path>.json``; return both paths."""
    return write_adapter_files(path, layer.adapter_tensors(), layer.adapter_config())


def load_layer_adapter(layer, path) -> dict:
    """Load an adapter saved by :func:`save_layer_adapter` into ``layer``, bit-exact.

    Raises ``ValueError`` naming the field if method, ranks, alpha, shapes or dtypes differ
    from the layer's. For a PiCa layer sharing ``M``, every layer sharing it sees the
    loaded ``M``. Returns the file's config.
    """
    tensors, config = read_adapter_files(path, device=layer.weight.device)
    own = layer.adapter_config()
    for key in MATCH_KEYS:
        if config.get(key) != own.get(key):
            raise ValueError(f"saved adapter has {key}={config.get(key)!r} but the layer has "
                             f"{key}={own.get(key)!r}")
    layer.load_adapter_tensors(tensors)
    return config
