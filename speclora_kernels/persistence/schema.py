"""What a speclora_kernels file may contain, checked before anything in it is trusted.

The bottom of :mod:`speclora_kernels.persistence`: the error type, the JSON value
predicates, :func:`check_schema`, the safetensors dtypes the readers accept, the header
every container file has, and the adapter schemas (a layer's config and a model's), whose
method options come from each method's declaration (``AdapterMethod.options``).

A schema maps a key to ``(required, check, what it must be)``.
"""
from __future__ import annotations

import torch

from ..methods import METHODS, OptionContext

ADAPTER_FORMAT = "speclora_kernels.adapter"
FORMAT_VERSION = 1
# safetensors dtype codes this library reads (adapters are float; PEFT may save fp16/bf16).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in SAFETENSORS_DTYPES.values()}
FLOAT_NAMES = ("float64", "float32", "float16", "bfloat16")
_HEX64 = set("0123456789abcdef")


class AdapterFileError(ValueError):
    """A file that is malformed, corrupted, of another format or version, or that does not
    fit the model it is loaded into. The message names the file."""


# ---------------------------------------------------------------- predicates
def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_name(v) -> bool:
    """A printable, non-empty string of at most 512 characters (tensor and layer names)."""
    return isinstance(v, str) and 0 < len(v) <= 512 and v.isprintable()


def is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and set(v) <= _HEX64


def is_shape(v) -> bool:
    return isinstance(v, list) and len(v) <= 8 and all(is_int(d) and 0 <= d < 2 ** 40 for d in v)


def short(value) -> str:
    """``repr(value)``, cut to 80 characters for error messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_schema(obj, schema: dict, where: str, *, extra: bool = False) -> None:
    """Raise :class:`AdapterFileError` unless ``obj`` is a dict with every required key of
    ``schema``, each value passing its check, and (unless ``extra``) no other keys."""
    if not isinstance(obj, dict):
        raise AdapterFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k, (required, _, _) in schema.items() if required and k not in obj]
    if missing:
        raise AdapterFileError(f"{where}: missing keys {missing}")
    unknown = sorted(set(obj) - set(schema))
    if unknown and not extra:
        raise AdapterFileError(f"{where}: unknown keys {unknown[:5]}")
    for key, (_, check, what) in schema.items():
        if key in obj and not check(obj[key]):
            raise AdapterFileError(f"{where}: {key}={short(obj[key])} must be {what}")


# ---------------------------------------------------------------- every container file
TENSOR_SCHEMA = {
    "shape": (True, is_shape, "a list of up to 8 sizes"),
    "dtype": (True, lambda v: v in DTYPE_NAMES.values(), f"one of {sorted(DTYPE_NAMES.values())}"),
}


def header_schema(format: str, version: int = 1) -> dict:
    """The keys every container file's config has: its ``format``, a ``format_version`` up
    to ``version``, the writing library's version and the table of its tensors."""
    return {
        "format": (True, lambda v: v == format, repr(format)),
        "format_version": (True, lambda v: is_int(v) and 1 <= v <= version,
                           f"an int in [1, {version}] (newer files need a newer library)"),
        "library_version": (True, is_name, "a version string"),
        "tensors": (True, lambda v: isinstance(v, dict) and len(v) <= 1_000_000,
                    "a map of tensor names to shape and dtype"),
    }


def check_header(config, where: str, *, schema: dict, extra: bool) -> None:
    """``config`` against ``schema`` (a :func:`header_schema` and any more keys), and every
    entry of its tensor table."""
    check_schema(config, schema, where, extra=extra)
    for name, entry in config["tensors"].items():
        if not is_name(name):
            raise AdapterFileError(f"{where}: invalid tensor name {short(name)}")
        check_schema(entry, TENSOR_SCHEMA, f"{where}: tensors[{name!r}]")


# ---------------------------------------------------------------- adapters
ADAPTER_HEADER = header_schema(ADAPTER_FORMAT, FORMAT_VERSION)
# A layer's keys besides its method's options (which come from the method's declaration,
# see check_layer_entry).
LAYER_SCHEMA = {
    "method": (True, lambda v: isinstance(v, str) and v in METHODS, "a registered method name"),
    "rank": (True, lambda v: is_int(v) and v >= 1, "an int >= 1"),
    "in_features": (True, lambda v: is_int(v) and 1 <= v < 2 ** 31, "an int >= 1"),
    "out_features": (True, lambda v: is_int(v) and 1 <= v < 2 ** 31, "an int >= 1"),
    "bias": (True, lambda v: isinstance(v, bool), "true or false"),
    "dropout": (True, lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "adapter_dtype": (True, lambda v: v in ("float32", "float64"), "'float32' or 'float64'"),
    "base_dtype": (True, lambda v: v in FLOAT_NAMES, f"one of {FLOAT_NAMES}"),
    "base_quant": (False, lambda v: v == "nf4", "'nf4'"),
}
# Extra per-layer keys of a model's adapter (save_adapter).
MODEL_LAYER_SCHEMA = {
    **LAYER_SCHEMA,
    "share_with": (True, lambda v: v is None or is_name(v), "null or a layer name"),
    "quantize": (True, lambda v: v is None or v == "nf4", "null or 'nf4'"),
    "source": (True, lambda v: v is None or (is_name(v) and v.isidentifier()),
               "null or a class name"),
    "base_fingerprint": (True, lambda v: v is None or is_sha256(v),
                         "null or a sha256 hex digest"),
}
MODEL_SCHEMA = {**ADAPTER_HEADER,
                "layers": (True, lambda v: isinstance(v, dict) and 0 < len(v) <= 100_000,
                           "a non-empty map of layer names to layer configs")}


def match_keys(method) -> tuple[str, ...]:
    """The config keys a saved layer adapter must share with a layer of ``method`` (a
    method class) to load into it: the method, its saved options that must match (``r``,
    ``k``, ``alpha``, ...), the rank, the shapes and the adapter dtype."""
    return ("method", *(o.name for o in method.saved_options() if o.must_match), "rank",
            "in_features", "out_features", "adapter_dtype")


def match_values(entry: dict, method) -> dict:
    """The :func:`match_keys` values of a saved layer ``entry`` (already checked), an option
    that older files lack (``Option.in_every_file`` False) taking its default there."""
    values = {key: entry.get(key) for key in match_keys(method)}
    for option in method.saved_options():
        if option.must_match and not option.in_every_file and values[option.name] is None:
            context = OptionContext(entry["out_features"], entry["in_features"])
            values[option.name] = option.default_for(context)
    return values


def _options(entry: dict, where: str, schema: dict, extra: bool) -> dict:
    """The options of the entry's method, each checked with the method's own check:
    options that must match must be present; the others (``svd``) take their default
    when missing or null (older files). Keys that are another method's saved option are
    refused, unless null (older files wrote ``svd: null`` on every layer)."""
    cls = METHODS[entry["method"]]
    saved = cls.saved_options()
    own = {o.name for o in saved}
    anyone = {o.name for m in METHODS.values() for o in m.saved_options()}
    rest = set(entry) - set(schema)
    unknown = sorted(rest - anyone)
    if unknown and not extra:
        raise AdapterFileError(f"{where}: unknown keys {unknown[:5]}")
    needed = sorted(o.name for o in saved if o.must_match and o.in_every_file)
    missing = sorted(set(needed) - set(entry))
    stray = sorted(k for k in (rest & anyone) - own if entry[k] is not None)
    if missing or stray:
        raise AdapterFileError(f"{where}: method {entry['method']!r} needs {needed}; "
                               f"missing {missing}, not its own {stray}")
    values = {}
    try:
        for option in cls.options:
            context = OptionContext(entry["out_features"], entry["in_features"],
                                    getattr(torch, entry["adapter_dtype"]),
                                    torch.device("meta"), dict(values))
            if not option.saved:
                values[option.name] = option.resolve(None, context)
            elif option.must_match and option.in_every_file:
                values[option.name] = option.check(entry[option.name], context)
            else:
                values[option.name] = option.resolve(entry.get(option.name), context)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{where}: {e}") from None
    return {o.name: values[o.name] for o in saved}


def check_layer_entry(entry, where: str, schema: dict = LAYER_SCHEMA, *,
                      extra: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Validate one layer's config: its keys against ``schema``, its method's options
    against the method's declaration; return the tensors its method holds,
    ``{name: (shape, dtype)}``, found by building the method on a ``meta`` weight (no
    memory, no SVD): the file must hold exactly these."""
    check_schema(entry, schema, where, extra=True)  # the options are checked next
    options = _options(entry, where, schema, extra)
    cls = METHODS[entry["method"]]
    weight = torch.empty(entry["out_features"], entry["in_features"], device="meta")
    try:
        adapter = cls(weight, adapter_dtype=getattr(torch, entry["adapter_dtype"]), **options)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{where}: {e}") from None
    if adapter.rank != entry["rank"]:
        raise AdapterFileError(f"{where}: rank={entry['rank']} but method {entry['method']!r} "
                               f"with these options has rank {adapter.rank}")
    return {name: (tuple(t.shape), t.dtype) for name, t in adapter.state_dict().items()}
