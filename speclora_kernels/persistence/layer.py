"""One :class:`~speclora_kernels.AdapterLinear`'s adapter in a container file pair:
``<stem>.safetensors`` + ``<stem>.json`` (a directory ``d`` means the stem ``d/adapter``).

Saved: the method's trainable parameters and frozen spectral factors, never the base
weight, with the layer's config (method, options, shapes, dtypes). Loading checks the
config against the method's declared options and the layer before any tensor data is read.
"""
from __future__ import annotations

from .container import container_paths, open_container, read_verified, write_container
from .schema import ADAPTER_FORMAT, ADAPTER_HEADER, FORMAT_VERSION, check_layer_entry, match_values


def save_layer_adapter(layer, path) -> tuple[str, str]:
    """Save one :class:`~speclora_kernels.AdapterLinear`'s adapter (trainable parameters
    and frozen spectral factors, not the base weight) to ``<path>.safetensors`` +
    ``<path>.json``; return both paths."""
    return write_container(path, layer.adapter_tensors(), layer.adapter_config(),
                           format=ADAPTER_FORMAT, version=FORMAT_VERSION)


def load_layer_adapter(layer, path) -> dict:
    """Load an adapter saved by :func:`save_layer_adapter` into ``layer``, bit-exact.

    The config is validated against the layer schema and the method's declared options,
    its method, options (those that must match: ``r``, ``k``, ``alpha``, ...), rank,
    shapes and adapter dtype must equal the layer's, and every tensor's name, shape and dtype must be the
    layer's, all before tensor data is read; mismatches raise
    :class:`~speclora_kernels.AdapterFileError` naming the file and the field. For a PiCa
    layer sharing ``M``, every layer sharing it sees the loaded ``M``. Returns the file's
    config.
    """
    st_path, json_path = container_paths(path)
    if layer.merged:
        raise RuntimeError("cannot load into a merged AdapterLinear; call unmerge() first")
    file, config = open_container(st_path, json_path, format=ADAPTER_FORMAT,
                                  version=FORMAT_VERSION, extra=True)
    with file:
        entry = {k: v for k, v in config.items() if k not in ADAPTER_HEADER}
        check_layer_entry(entry, f"{st_path} (embedded config)")
        own = layer.adapter_config()
        for key, saved in match_values(entry, type(layer.adapter)).items():
            if saved != own.get(key):
                file.fail(f"saved adapter has {key}={saved!r} but the layer has "
                          f"{key}={own.get(key)!r}")
        file.check({n: (tuple(t.shape), t.dtype) for n, t in layer.adapter_tensors().items()},
                   "the layer")
        tensors = read_verified(file, layer.weight.device)
    layer.load_adapter_tensors(tensors)
    return config
