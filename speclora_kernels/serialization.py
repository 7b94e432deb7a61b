"""Adapter files: tensors in safetensors (never pickle), config in JSON, written atomically,
read with every byte checked before it is trusted.

``<stem>.safetensors`` + ``<stem>.json``; a directory ``d`` means the stem ``d/adapter``.
:func:`write_adapter_files` / :func:`read_adapter_files` are the reusable pieces (a model
level saver writes many layers' tensors under prefixed names into one pair of files);
:func:`save_layer_adapter` / :func:`load_layer_adapter` handle one :class:`AdapterLinear`.

The safetensors file is the adapter: its header embeds the config (the same JSON as the
``.json`` file) and a sha256 of config + tensor bytes, and it is committed by one atomic
rename. So a crash between the two renames of a save leaves a complete adapter (the new
one, with a stale ``.json`` that the loader reports and ignores), and any changed byte in
the file is detected. Reading parses the header with bounds checks
(:class:`TensorFile`), validates the config against an explicit schema, compares every
tensor's name, shape and dtype with what the config and the layer expect, and only then
reads tensor data. Every rejection is an :class:`AdapterFileError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings

import torch
from safetensors.torch import save as _save_bytes

FORMAT = "speclora_kernels.adapter"
FORMAT_VERSION = 1
# Config keys a saved layer adapter must share with the layer it is loaded into.
MATCH_KEYS = ("method", "r", "k", "alpha", "rank", "in_features", "out_features",
              "adapter_dtype")
# safetensors metadata keys of our files: the config as committed, and its checksum.
CONFIG_KEY = "speclora_kernels.config"
SHA_KEY = "speclora_kernels.sha256"
MAX_HEADER_BYTES = 16 << 20  # a header (tensor table + embedded config) never needs more
MAX_CONFIG_BYTES = 16 << 20
# safetensors dtype codes this library reads (adapters are float; PEFT may save fp16/bf16).
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_DTYPE_NAMES = {_dtype: str(_dtype).removeprefix("torch.") for _dtype in DTYPES.values()}
FLOAT_NAMES = ("float64", "float32", "float16", "bfloat16")


class AdapterFileError(ValueError):
    """An adapter file that is malformed, corrupted, of another format or version, or that
    does not fit the model it is loaded into. The message names the file."""


# ---------------------------------------------------------------- writing
def adapter_paths(path: str | os.PathLike) -> tuple[str, str]:
    """``(<stem>.safetensors, <stem>.json)`` for a stem, or for ``dir/adapter`` if ``path``
    is an existing directory. A ``.safetensors``/``.json`` suffix on ``path`` is dropped."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "adapter")
    for suffix in (".safetensors", ".json"):
        path = path.removesuffix(suffix)
    return path + ".safetensors", path + ".json"


def _fsync_dir(folder: str) -> None:
    """Make renames in ``folder`` durable (not possible on every OS / filesystem)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(files: list[tuple[str, bytes]]) -> None:
    """Write every ``(path, data)`` to a temporary file next to it and fsync it, then rename
    them into place in order and fsync the folders. An exception before a rename removes
    every temporary file and leaves the old files untouched; a killed process leaves at most
    hidden ``.tmp-*`` files, never a partial file under a real name."""
    staged = []
    try:
        for path, data in files:
            folder = os.path.dirname(os.path.abspath(path))
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
            staged.append(tmp)
            # mkstemp makes the file private (0600); keep the mode a replaced file had.
            os.chmod(tmp, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for i, (path, _) in enumerate(files):
            os.replace(staged[i], path)
            staged[i] = None
    finally:
        for tmp in staged:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p, _ in files):
        _fsync_dir(folder)


def _config_text(config: dict) -> str:
    try:
        return json.dumps(config, sort_keys=True, allow_nan=False)
    except ValueError as e:  # NaN / Inf in the config
        raise ValueError(f"config must be JSON with finite numbers: {e}") from None


def encode_adapter(tensors: dict[str, torch.Tensor], config: dict) -> tuple[bytes, bytes]:
    """``(safetensors bytes, JSON bytes)`` of an adapter: the safetensors header embeds
    ``config`` and the sha256 of config + tensor data (see :func:`open_adapter`)."""
    text = _config_text(config)
    plain = _save_bytes(tensors)
    data = plain[8 + int.from_bytes(plain[:8], "little"):]
    meta = {"format": "pt", CONFIG_KEY: text, SHA_KEY: _digest(text, data)}
    blob = canonical_header(_save_bytes(tensors, metadata=meta))
    if not blob.endswith(data):  # the layout does not depend on the metadata
        raise RuntimeError("safetensors laid out the tensor data differently the second time")
    body = json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    return blob, body.encode()


def canonical_header(blob: bytes) -> bytes:
    """The same safetensors file with its header's keys sorted (padded to 8 bytes like
    safetensors does): saves are byte-reproducible, which safetensors alone is not (it
    writes the metadata map in hash order)."""
    n = int.from_bytes(blob[:8], "little")
    raw = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + blob[8 + n:]


def _digest(config_text: str, data: bytes | memoryview) -> str:
    h = hashlib.sha256(config_text.encode())
    h.update(b"\0")
    h.update(data)
    return h.hexdigest()


def tensor_table(tensors: dict[str, torch.Tensor]) -> dict:
    """``{name: {"shape": [...], "dtype": "float32"}}``: the config's list of tensors.
    Raises ``TypeError`` for a dtype the readers refuse (see :data:`DTYPES`)."""
    bad = {name: t.dtype for name, t in tensors.items() if t.dtype not in _DTYPE_NAMES}
    if bad:
        raise TypeError(f"tensors must have one of the dtypes {sorted(_DTYPE_NAMES.values())}; "
                        f"got {bad}")
    return {name: {"shape": list(t.shape), "dtype": _DTYPE_NAMES[t.dtype]}
            for name, t in tensors.items()}


def write_adapter_files(path, tensors: dict[str, torch.Tensor], config: dict) -> tuple[str, str]:
    """Write ``tensors`` (safetensors) and ``config`` (JSON, plus format, version and a
    shape/dtype entry per tensor) next to each other, atomically; return both paths."""
    from . import __version__

    bad = [name for name, t in tensors.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise TypeError(f"tensors must map names to torch.Tensor; not tensors: {bad}")
    st_path, json_path = adapter_paths(path)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
            **config, "tensors": tensor_table(cpu)}
    blob, body = encode_adapter(cpu, meta)
    _commit([(st_path, blob), (json_path, body)])  # the safetensors file commits the adapter
    return st_path, json_path


# ---------------------------------------------------------------- strict JSON
def parse_json(raw: bytes | str, where: str):
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity (nor numbers that overflow
    to them), no absurd nesting. Raises :class:`AdapterFileError` naming ``where``."""
    def pairs(items):
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise AdapterFileError(f"{where}: duplicate JSON keys {dup[:5]}")
        return dict(items)

    def constant(name):
        raise AdapterFileError(f"{where}: {name} is not valid JSON")

    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except UnicodeDecodeError as e:
        raise AdapterFileError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise AdapterFileError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an int with too many digits
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(f"{where}: invalid JSON ({e})") from None
    _check_finite(value, where)
    return value


def _check_finite(value, where: str) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise AdapterFileError(f"{where}: non-finite number {v} in JSON")
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def read_json_file(path: str, limit: int = MAX_CONFIG_BYTES):
    """A JSON file read with :func:`parse_json`, refused if larger than ``limit`` bytes."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise AdapterFileError(f"{path}: {size} bytes, more than the {limit} a config may have")
        return parse_json(f.read(limit + 1), path)


# ---------------------------------------------------------------- schema
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_name(v) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 512 and v.isprintable()


# A schema maps a key to ``(required, check, what it must be)``.
TENSOR_SCHEMA = {
    "shape": (True, lambda v: isinstance(v, list) and len(v) <= 8
              and all(_is_int(d) and 0 <= d < 2 ** 40 for d in v), "a list of up to 8 sizes"),
    "dtype": (True, lambda v: v in _DTYPE_NAMES.values(),
              f"one of {sorted(_DTYPE_NAMES.values())}"),
}
_HEX64 = set("0123456789abcdef")
LAYER_SCHEMA = {
    "method": (True, lambda v: isinstance(v, str) and v in _methods(), "a registered method name"),
    "r": (True, lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "rank": (True, lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "k": (False, lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "alpha": (False, lambda v: _is_number(v) and 0 < v < 1e30, "a number > 0"),
    "in_features": (True, lambda v: _is_int(v) and 1 <= v < 2 ** 31, "an int >= 1"),
    "out_features": (True, lambda v: _is_int(v) and 1 <= v < 2 ** 31, "an int >= 1"),
    "bias": (True, lambda v: isinstance(v, bool), "true or false"),
    "dropout": (True, lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "adapter_dtype": (True, lambda v: v in ("float32", "float64"), "'float32' or 'float64'"),
    "base_dtype": (True, lambda v: v in FLOAT_NAMES, f"one of {FLOAT_NAMES}"),
    "base_quant": (False, lambda v: v == "nf4", "'nf4'"),
}
# Extra per-layer keys of a model's adapter (save_adapter).
MODEL_LAYER_SCHEMA = {
    **LAYER_SCHEMA,
    "share_with": (True, lambda v: v is None or _is_name(v), "null or a layer name"),
    "svd": (True, lambda v: v is None or v in ("auto", "full", "randomized"),
            "null, 'auto', 'full' or 'randomized'"),
    "quantize": (True, lambda v: v is None or v == "nf4", "null or 'nf4'"),
    "source": (True, lambda v: v is None or (_is_name(v) and v.isidentifier()),
               "null or a class name"),
    "base_fingerprint": (True, lambda v: v is None or (isinstance(v, str) and len(v) == 64
                                                       and set(v) <= _HEX64),
                         "null or a sha256 hex digest"),
}
HEADER_SCHEMA = {
    "format": (True, lambda v: v == FORMAT, repr(FORMAT)),
    "format_version": (True, lambda v: _is_int(v) and 1 <= v <= FORMAT_VERSION,
                       f"an int in [1, {FORMAT_VERSION}] (newer files need a newer library)"),
    "library_version": (True, lambda v: _is_name(v), "a version string"),
    "tensors": (True, lambda v: isinstance(v, dict) and len(v) <= 1_000_000,
                "a map of tensor names to shape and dtype"),
}


def _methods():
    from .methods import METHODS

    return METHODS


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
            raise AdapterFileError(f"{where}: {key}={_short(obj[key])} must be {what}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_header_config(config, where: str, *, extra: bool, schema=HEADER_SCHEMA) -> None:
    """The keys every adapter config has (format, version, tensor table)."""
    check_schema(config, schema, where, extra=extra)
    for name, entry in config["tensors"].items():
        if not _is_name(name):
            raise AdapterFileError(f"{where}: invalid tensor name {_short(name)}")
        check_schema(entry, TENSOR_SCHEMA, f"{where}: tensors[{name!r}]")


def check_layer_entry(entry, where: str, schema: dict = LAYER_SCHEMA, *,
                      extra: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Validate one layer's config; return the tensors its method holds,
    ``{name: (shape, dtype)}``, found by building the method on a ``meta`` weight (no
    memory, no SVD): the file must hold exactly these."""
    check_schema(entry, schema, where, extra=extra)
    cls = _methods()[entry["method"]]
    wanted = {"k", "alpha"} & set(cls.options)
    missing = sorted(wanted - set(entry))
    stray = sorted({"k", "alpha"} - wanted & set(entry))
    if missing or stray:
        raise AdapterFileError(f"{where}: method {entry['method']!r} needs {sorted(wanted)}; "
                               f"missing {missing}, not its own {stray}")
    weight = torch.empty(entry["out_features"], entry["in_features"], device="meta")
    try:
        adapter = cls(weight, r=entry["r"], adapter_dtype=getattr(torch, entry["adapter_dtype"]),
                      **{k: entry[k] for k in wanted})
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{where}: {e}") from None
    if adapter.rank != entry["rank"]:
        raise AdapterFileError(f"{where}: rank={entry['rank']} but method {entry['method']!r} "
                               f"with these options has rank {adapter.rank}")
    return {name: (tuple(t.shape), t.dtype) for name, t in adapter.state_dict().items()}


# ---------------------------------------------------------------- safetensors reading
class TensorFile:
    """A safetensors file opened for checked reading: the 8-byte header length, the header
    JSON (strict), every entry (known dtype, shape, offsets matching dtype x shape, tiling
    the data region with no gap or overlap) and the file size (exactly header + data) are
    validated on open, before any tensor memory is allocated. :meth:`check` compares the
    tensors with what the caller expects; :meth:`read` then reads the data.

    ``entries`` maps each name to ``(shape, dtype)``; ``metadata`` is the header's
    ``__metadata__`` (str -> str). Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, max_header: int = MAX_HEADER_BYTES):
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        try:
            self._parse(max_header)
        except BaseException:
            self._file.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def _fail(self, message: str):
        raise AdapterFileError(f"{self.path}: {message}")

    def _parse(self, max_header: int) -> None:
        f = self._file
        self.size = size = os.fstat(f.fileno()).st_size
        if size < 8:
            self._fail(f"truncated: {size} bytes, not even the 8-byte header length")
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            self._fail(f"header length {n} runs past the end of the file ({size} bytes)")
        if n > max_header:
            self._fail(f"header length {n} exceeds the {max_header}-byte limit")
        header = parse_json(f.read(n), f"{self.path} (safetensors header)")
        if not isinstance(header, dict):
            self._fail("the header is not a JSON object")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            self._fail("__metadata__ must map strings to strings")
        self.metadata = meta
        spans, self.entries, self._offsets = [], {}, {}
        for name, entry in header.items():
            where = f"tensor {_short(name)}"
            if not _is_name(name):
                self._fail(f"invalid {where}")
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                self._fail(f"{where}: entry must have exactly dtype, shape, data_offsets")
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(dtype, str) or dtype not in DTYPES:
                self._fail(f"{where}: unsupported dtype {_short(dtype)}")
            if not TENSOR_SCHEMA["shape"][1](shape):
                self._fail(f"{where}: invalid shape {_short(shape)}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
                    and 0 <= offsets[0] <= offsets[1]):
                self._fail(f"{where}: invalid data_offsets {_short(offsets)}")
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            if offsets[1] - offsets[0] != nbytes:
                self._fail(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} "
                           f"bytes, but {dtype} {shape} needs {nbytes}")
            self.entries[name] = (tuple(shape), DTYPES[dtype])
            self._offsets[name] = tuple(offsets)
            spans.append((offsets[0], offsets[1], name))
        end = 0
        for begin, stop, name in sorted(spans):
            if begin != end:
                self._fail(f"tensor {_short(name)} starts at byte {begin} of the data, expected "
                           f"{end} (gap or overlap)")
            end = stop
        self.data_start, self.data_size = 8 + n, end
        if 8 + n + end != size:
            kind = "truncated" if size < 8 + n + end else "trailing bytes"
            self._fail(f"{kind}: the file has {size} bytes, its header describes {8 + n + end}")

    def check(self, expected: dict[str, tuple[tuple[int, ...], torch.dtype]], what: str) -> None:
        """Raise unless the file holds exactly ``expected`` (``{name: (shape, dtype)}``);
        ``what`` says where the expectation comes from."""
        missing = sorted(set(expected) - set(self.entries))
        unexpected = sorted(set(self.entries) - set(expected))
        if missing or unexpected:
            self._fail(f"tensors do not match {what}: missing {missing[:5]}, unexpected "
                       f"{[_short(u) for u in unexpected[:5]]}")
        for name, (shape, dtype) in expected.items():
            got = self.entries[name]
            if got != (tuple(shape), dtype):
                self._fail(f"tensor {name!r} is {got[1]} {list(got[0])}, expected {dtype} "
                           f"{list(shape)} (from {what})")

    def read(self, verify: str | None = None) -> dict[str, torch.Tensor]:
        """Every tensor, on CPU, each in its own memory. ``verify``: the config text whose
        sha256 together with the data must equal ``metadata[SHA_KEY]``."""
        f = self._file
        f.seek(self.data_start)
        data = bytearray(self.data_size)
        if f.readinto(data) != self.data_size:
            self._fail("truncated while reading (the file changed under us?)")
        if verify is not None and _digest(verify, data) != self.metadata.get(SHA_KEY):
            self._fail("checksum mismatch: the tensor data or the embedded config was "
                       "changed after saving (corrupted file)")
        tensors = {}
        for name, (shape, dtype) in self.entries.items():
            begin, end = self._offsets[name]
            if begin == end:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            t = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin)
            t = t.clone().view(dtype).reshape(shape)
            if dtype == torch.bool and bool((t.view(torch.uint8) > 1).any()):
                self._fail(f"tensor {name!r}: bool bytes other than 0 and 1")
            tensors[name] = t
        return tensors


def open_adapter(st_path: str, json_path: str | None, *, extra: bool,
                 schema: dict = HEADER_SCHEMA) -> tuple[TensorFile, dict]:
    """Open an adapter written by :func:`encode_adapter`: ``(file, config)`` with the config
    taken from the safetensors header (committed with the data), checked against the
    schema and against the file's tensor table. No tensor data is read yet; call
    ``file.read(verify=config_text)`` (:func:`read_verified`) after your own checks.

    ``json_path`` is the readable copy, checked by :func:`read_verified` once the checksum
    holds: if it is not valid JSON it is refused; if it differs from the committed config
    (a save interrupted between its two renames, or a hand edit) a warning says so and the
    committed config is used. ``extra``: allow keys besides the reserved ones at the top
    level of the config. ``schema``: the reserved keys (another ``format`` for files that
    are not adapters, e.g. a trainer state).
    """
    file = TensorFile(st_path)
    try:
        text = file.metadata.get(CONFIG_KEY)
        if text is None or SHA_KEY not in file.metadata:
            file._fail(f"no embedded {FORMAT} config: not written by speclora_kernels "
                       f"(format in metadata: {file.metadata.get('format')!r})")
        # The checksum covers config + data; the rest of the metadata is fixed.
        other = {k: v for k, v in file.metadata.items() if k not in (CONFIG_KEY, SHA_KEY)}
        if other != {"format": "pt"}:
            file._fail(f"unexpected safetensors metadata {_short(other)}")
        if len(text) > MAX_CONFIG_BYTES:
            file._fail("embedded config too large")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            file._fail("embedded config is not valid Unicode (lone surrogate)")
        config = parse_json(text, f"{st_path} (embedded config)")
        check_header_config(config, f"{st_path} (embedded config)", extra=extra, schema=schema)
        table = {n: (tuple(e["shape"]), getattr(torch, e["dtype"]))
                 for n, e in config["tensors"].items()}
        file.check(table, "its config's tensor list")
        file.config_text, file.config, file.json_path = text, config, json_path
        return file, config
    except BaseException:
        file.__exit__()
        raise


def read_verified(file: TensorFile, device="cpu") -> dict[str, torch.Tensor]:
    """The tensors of an :func:`open_adapter` file, checksum verified, on ``device``; then
    the ``.json`` copy is compared with the committed config (see :func:`open_adapter`)."""
    tensors = file.read(verify=file.config_text)
    if file.json_path is None:
        pass
    elif os.path.exists(file.json_path):
        if read_json_file(file.json_path) != file.config:
            warnings.warn(f"{file.json_path} differs from the config committed with "
                          f"{file.path} (a save interrupted between its two renames, or an "
                          f"edit); using the committed config", RuntimeWarning, stacklevel=3)
    else:
        warnings.warn(f"{file.json_path} is missing; using the config committed with "
                      f"{file.path}", RuntimeWarning, stacklevel=3)
    return {name: t.to(device) for name, t in tensors.items()}


def read_adapter_files(path, device: str | torch.device = "cpu"):
    """Read what :func:`write_adapter_files` wrote: ``(tensors, config)``.

    Raises :class:`AdapterFileError` (a ``ValueError``) naming the file if it is not this
    format or version, is truncated, oversized or corrupted, or its tensors disagree with
    its config; never executes code from the file.
    """
    st_path, json_path = adapter_paths(path)
    file, config = open_adapter(st_path, json_path, extra=True)
    with file:
        return read_verified(file, device), config


def save_layer_adapter(layer, path) -> tuple[str, str]:
    """Save one :class:`~speclora_kernels.AdapterLinear`'s adapter (trainable parameters
    and frozen spectral factors, not the base weight) to ``<path>.safetensors`` +
    ``<path>.json``; return both paths."""
    return write_adapter_files(path, layer.adapter_tensors(), layer.adapter_config())


def load_layer_adapter(layer, path) -> dict:
    """Load an adapter saved by :func:`save_layer_adapter` into ``layer``, bit-exact.

    The config is validated against :data:`LAYER_SCHEMA`, its method, ranks, alpha, shapes
    and dtypes must equal the layer's, and every tensor's name, shape and dtype must be the
    layer's, all before tensor data is read; mismatches raise :class:`AdapterFileError`
    naming the file and the field. For a PiCa layer sharing ``M``, every layer sharing it
    sees the loaded ``M``. Returns the file's config.
    """
    st_path, json_path = adapter_paths(path)
    if layer.merged:
        raise RuntimeError("cannot load into a merged AdapterLinear; call unmerge() first")
    file, config = open_adapter(st_path, json_path, extra=True)
    with file:
        entry = {k: v for k, v in config.items() if k not in HEADER_SCHEMA}
        check_layer_entry(entry, f"{st_path} (embedded config)")
        own = layer.adapter_config()
        for key in MATCH_KEYS:
            if config.get(key) != own.get(key):
                file._fail(f"saved adapter has {key}={config.get(key)!r} but the layer has "
                           f"{key}={own.get(key)!r}")
        file.check({n: (tuple(t.shape), t.dtype) for n, t in layer.adapter_tensors().items()},
                   "the layer")
        tensors = read_verified(file, layer.weight.device)
    layer.load_adapter_tensors(tensors)
    return config
