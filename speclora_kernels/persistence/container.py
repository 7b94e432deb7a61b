"""The checked safetensors container every speclora_kernels file uses: tensors in
safetensors (never pickle), a JSON config embedded in its header, written atomically, read
with every byte checked before it is trusted.

A container is ``<stem>.safetensors``, optionally with ``<stem>.json`` beside it (a readable
copy of the config). The safetensors header embeds the config and a sha256 of config +
tensor bytes, and the file is committed by one atomic rename: a crash between the renames
of a save leaves a complete file (the new one, with a stale ``.json`` that the reader
reports and ignores), and any changed byte is detected. Reading parses the header with
bounds checks (:class:`TensorFile`), validates the config against the caller's schema,
compares every tensor's name, shape and dtype with the config's table, and only then reads
tensor data. Every rejection is an :class:`AdapterFileError` naming the file.

The config's ``format`` says what the file holds (an adapter, a trainer state, ...);
:func:`write_container` / :func:`read_container` handle any format, :func:`commit_files`
is the atomic multi-file commit they share with the PEFT exporter.
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

from .._version import __version__
from .schema import (
    DTYPE_NAMES,
    SAFETENSORS_DTYPES,
    AdapterFileError,
    check_header,
    header_schema,
    is_int,
    is_name,
    is_shape,
    short,
)

# safetensors metadata keys of our files: the config as committed, and its checksum.
CONFIG_KEY = "speclora_kernels.config"
SHA_KEY = "speclora_kernels.sha256"
MAX_HEADER_BYTES = 16 << 20  # a header (tensor table + embedded config) never needs more
MAX_CONFIG_BYTES = 16 << 20


# ---------------------------------------------------------------- writing
def container_paths(path: str | os.PathLike) -> tuple[str, str]:
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


def commit_files(files: list[tuple[str, bytes]]) -> None:
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


def encode_container(tensors: dict[str, torch.Tensor], config: dict) -> tuple[bytes, bytes]:
    """``(safetensors bytes, JSON bytes)``: the safetensors header embeds ``config`` and the
    sha256 of config + tensor data (see :func:`open_container`)."""
    text = _config_text(config)
    plain = _save_bytes(tensors)
    data = plain[8 + int.from_bytes(plain[:8], "little"):]
    meta = {"format": "pt", CONFIG_KEY: text, SHA_KEY: config_digest(text, data)}
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


def config_digest(config_text: str, data: bytes | memoryview) -> str:
    """The checksum a container stores: sha256 of the config text, a zero byte, the data."""
    h = hashlib.sha256(config_text.encode())
    h.update(b"\0")
    h.update(data)
    return h.hexdigest()


def tensor_table(tensors: dict[str, torch.Tensor]) -> dict:
    """``{name: {"shape": [...], "dtype": "float32"}}``: the config's list of tensors.
    Raises ``TypeError`` for a dtype the readers refuse (see ``SAFETENSORS_DTYPES``)."""
    bad = {name: t.dtype for name, t in tensors.items() if t.dtype not in DTYPE_NAMES}
    if bad:
        raise TypeError(f"tensors must have one of the dtypes {sorted(DTYPE_NAMES.values())}; "
                        f"got {bad}")
    return {name: {"shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype]}
            for name, t in tensors.items()}


def write_container(path, tensors: dict[str, torch.Tensor], config: dict, *, format: str,
                    version: int = 1) -> tuple[str, str]:
    """Write ``tensors`` (safetensors) and ``config`` (JSON, plus ``format``, ``version``,
    the library version and a shape/dtype entry per tensor) to ``<stem>.safetensors`` +
    ``<stem>.json`` (see :func:`container_paths`), atomically; return both paths."""
    bad = [name for name, t in tensors.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise TypeError(f"tensors must map names to torch.Tensor; not tensors: {bad}")
    st_path, json_path = container_paths(path)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta = {"format": format, "format_version": version, "library_version": __version__,
            **config, "tensors": tensor_table(cpu)}
    blob, body = encode_container(cpu, meta)
    commit_files([(st_path, blob), (json_path, body)])  # the safetensors file commits
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

    def fail(self, message: str):
        """Raise :class:`AdapterFileError` with ``message``, naming this file."""
        raise AdapterFileError(f"{self.path}: {message}")

    def _parse(self, max_header: int) -> None:
        f = self._file
        self.size = size = os.fstat(f.fileno()).st_size
        if size < 8:
            self.fail(f"truncated: {size} bytes, not even the 8-byte header length")
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            self.fail(f"header length {n} runs past the end of the file ({size} bytes)")
        if n > max_header:
            self.fail(f"header length {n} exceeds the {max_header}-byte limit")
        header = parse_json(f.read(n), f"{self.path} (safetensors header)")
        if not isinstance(header, dict):
            self.fail("the header is not a JSON object")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            self.fail("__metadata__ must map strings to strings")
        self.metadata = meta
        spans, self.entries, self._offsets = [], {}, {}
        for name, entry in header.items():
            where = f"tensor {short(name)}"
            if not is_name(name):
                self.fail(f"invalid {where}")
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                self.fail(f"{where}: entry must have exactly dtype, shape, data_offsets")
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
                self.fail(f"{where}: unsupported dtype {short(dtype)}")
            if not is_shape(shape):
                self.fail(f"{where}: invalid shape {short(shape)}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))
                    and 0 <= offsets[0] <= offsets[1]):
                self.fail(f"{where}: invalid data_offsets {short(offsets)}")
            nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
            if offsets[1] - offsets[0] != nbytes:
                self.fail(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} "
                          f"bytes, but {dtype} {shape} needs {nbytes}")
            self.entries[name] = (tuple(shape), SAFETENSORS_DTYPES[dtype])
            self._offsets[name] = tuple(offsets)
            spans.append((offsets[0], offsets[1], name))
        end = 0
        for begin, stop, name in sorted(spans):
            if begin != end:
                self.fail(f"tensor {short(name)} starts at byte {begin} of the data, expected "
                          f"{end} (gap or overlap)")
            end = stop
        self.data_start, self.data_size = 8 + n, end
        if 8 + n + end != size:
            kind = "truncated" if size < 8 + n + end else "trailing bytes"
            self.fail(f"{kind}: the file has {size} bytes, its header describes {8 + n + end}")

    def check(self, expected: dict[str, tuple[tuple[int, ...], torch.dtype]], what: str) -> None:
        """Raise unless the file holds exactly ``expected`` (``{name: (shape, dtype)}``);
        ``what`` says where the expectation comes from."""
        missing = sorted(set(expected) - set(self.entries))
        unexpected = sorted(set(self.entries) - set(expected))
        if missing or unexpected:
            self.fail(f"tensors do not match {what}: missing {missing[:5]}, unexpected "
                      f"{[short(u) for u in unexpected[:5]]}")
        for name, (shape, dtype) in expected.items():
            got = self.entries[name]
            if got != (tuple(shape), dtype):
                self.fail(f"tensor {name!r} is {got[1]} {list(got[0])}, expected {dtype} "
                          f"{list(shape)} (from {what})")

    def read(self, verify: str | None = None) -> dict[str, torch.Tensor]:
        """Every tensor, on CPU, each in its own memory. ``verify``: the config text whose
        sha256 together with the data must equal ``metadata[SHA_KEY]``."""
        f = self._file
        f.seek(self.data_start)
        data = bytearray(self.data_size)
        if f.readinto(data) != self.data_size:
            self.fail("truncated while reading (the file changed under us?)")
        if verify is not None and config_digest(verify, data) != self.metadata.get(SHA_KEY):
            self.fail("checksum mismatch: the tensor data or the embedded config was "
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
                self.fail(f"tensor {name!r}: bool bytes other than 0 and 1")
            tensors[name] = t
        return tensors


def open_container(st_path: str, json_path: str | None, *, format: str, version: int = 1,
                   fields: dict | None = None, extra: bool) -> tuple[TensorFile, dict]:
    """Open a file written by :func:`encode_container`: ``(file, config)`` with the config
    taken from the safetensors header (committed with the data), checked against the
    header of ``format`` (up to ``version``) plus ``fields`` and against the file's tensor
    table. No tensor data is read yet; call :func:`read_verified` after your own checks.

    ``json_path`` is the readable copy, checked by :func:`read_verified` once the checksum
    holds: if it is not valid JSON it is refused; if it differs from the committed config
    (a save interrupted between its two renames, or a hand edit) a warning says so and the
    committed config is used. ``extra``: allow keys besides the schema's at the top level.
    """
    file = TensorFile(st_path)
    try:
        text = file.metadata.get(CONFIG_KEY)
        if text is None or SHA_KEY not in file.metadata:
            file.fail(f"no embedded {format} config: not written by speclora_kernels "
                      f"(format in metadata: {file.metadata.get('format')!r})")
        # The checksum covers config + data; the rest of the metadata is fixed.
        other = {k: v for k, v in file.metadata.items() if k not in (CONFIG_KEY, SHA_KEY)}
        if other != {"format": "pt"}:
            file.fail(f"unexpected safetensors metadata {short(other)}")
        if len(text) > MAX_CONFIG_BYTES:
            file.fail("embedded config too large")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            file.fail("embedded config is not valid Unicode (lone surrogate)")
        config = parse_json(text, f"{st_path} (embedded config)")
        check_header(config, f"{st_path} (embedded config)", extra=extra,
                     schema={**header_schema(format, version), **(fields or {})})
        table = {n: (tuple(e["shape"]), getattr(torch, e["dtype"]))
                 for n, e in config["tensors"].items()}
        file.check(table, "its config's tensor list")
        file.config_text, file.config, file.json_path = text, config, json_path
        return file, config
    except BaseException:
        file.__exit__()
        raise


def read_verified(file: TensorFile, device="cpu") -> dict[str, torch.Tensor]:
    """The tensors of an :func:`open_container` file, checksum verified, on ``device``;
    then the ``.json`` copy is compared with the committed config (see there)."""
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


def read_container(path, *, format: str, version: int = 1,
                   device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read what :func:`write_container` wrote: ``(tensors, config)``.

    Raises :class:`AdapterFileError` (a ``ValueError``) naming the file if it is not
    ``format`` (up to ``version``), is truncated, oversized or corrupted, or its tensors
    disagree with its config; never executes code from the file.
    """
    st_path, json_path = container_paths(path)
    file, config = open_container(st_path, json_path, format=format, version=version,
                                  extra=True)
    with file:
        return read_verified(file, device), config
