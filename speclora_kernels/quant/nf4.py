"""NF4 weights in bitsandbytes' layout, a pure-PyTorch dequantizer and quantizer.

Layout (bitsandbytes 0.49-0.50, ``quant_type="nf4"``): the weight is flattened row-major;
element ``i`` is a 4-bit index into the 16 NF4 values, two per byte, the even element in
the HIGH nibble; element ``i`` is scaled by ``absmax[i // blocksize]``. With double
quantization (``compress_statistics=True``) ``absmax`` is stored as uint8 indices into a
256-entry dynamic map ``code2``, scaled per 256 blocks by ``absmax2`` and shifted by the
scalar ``offset``::

    scale[b] = code2[absmax[b]] * absmax2[b // 256] + offset      (two fp32 roundings)
    W[i]     = NF4[nibble(i)] * scale[i // blocksize]              (fp32, then cast)

Every rounding step follows bitsandbytes' CPU backend, so ``dequantize_nf4`` is bit-identical
to ``bitsandbytes.functional.dequantize_4bit`` and ``NF4Weight.quantize(..., backend="torch")``
writes the same bytes as ``bitsandbytes.functional.quantize_4bit`` on CPU.
bitsandbytes itself is optional and only imported when asked for.
"""
from __future__ import annotations

import copy
import functools
import json

import torch

__all__ = [
    "NF4_VALUES",
    "BLOCKSIZES",
    "NF4Weight",
    "dequantize_nf4",
    "nf4_code",
    "dynamic_code",
    "quantize_residual",
    "decode_dtype",
    "nf4_level_pairs",
]

# The 16 NF4 levels (QLoRA), as bitsandbytes lists them; rounded to fp32 they are its table.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes double-quantizes absmax in blocks of 256
_SOURCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_QSTATE_KEY = "quant_state.bitsandbytes__nf4"


def decode_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the op rounds decoded NF4 values to for inputs of ``dtype``, as the kernels
    round their tiles: the input's own (float32 for float64: the decode itself is fp32)."""
    return torch.float32 if dtype == torch.float64 else dtype


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values as fp32, in index order."""
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _dynamic_code_cpu() -> torch.Tensor:
    # bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True, 7, 8)): for
    # decade e = -6..0, 2**(e+6) linear fractions in (0.1, 1] scaled by 10**e, both signs,
    # plus 0 and 1. Built with the same fp32 ops so every entry has the same bits.
    values = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _level_pairs(device: torch.device) -> torch.Tensor:
    levels = nf4_code().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    byte = torch.arange(256)
    return ((levels[byte >> 4] << 32) | levels[byte & 0xF]).to(device)


def nf4_level_pairs(device=None) -> torch.Tensor:
    """The kernels' decode table: for each byte value, the fp32 bits of its two NF4 levels
    as one int64 (high nibble's level in the upper 32 bits). One shared, read-only tensor per
    device (built once, so that no host-to-device copy happens later, e.g. inside a CUDA
    graph capture)."""
    return _level_pairs(torch.device(device if device is not None else "cpu"))


def dynamic_code(device=None) -> torch.Tensor:
    """bitsandbytes' 256-entry signed dynamic map (the double-quant ``code2``), fp32."""
    return _dynamic_code_cpu().to(device, copy=True)


def _check_positive_blocksize(name, value, allowed=None):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if allowed is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {allowed} (the sizes bitsandbytes supports), got {value}")


class NF4Weight:
    """A frozen (out x in) weight stored as NF4 exactly as bitsandbytes stores it.

    Attributes (all on one device):
        packed: uint8 (ceil(n/2),), two 4-bit indices per byte, even element high nibble.
            A view of bitsandbytes' storage whatever its ``quant_storage`` dtype was.
        absmax: per-block scales, fp32 (n_blocks,); uint8 (n_blocks,) with double quant.
        absmax2, code2, offset: double-quant pieces (fp32 (ceil(n_blocks/256),), fp32 (256,),
            fp32 0-d tensor), ``None`` without double quant.
        blocksize, nested_blocksize: elements per absmax, absmax entries per absmax2.
        shape: torch.Size (out_features, in_features).  dtype: dtype of the dequantized weight.
        quant_storage: dtype bitsandbytes used to hold ``packed`` (kept for ``to_bnb``).
        code: the 16 NF4 values (fp32), a property.
        level_pairs: the kernels' decode table (:func:`nf4_level_pairs`), shared per device.

    Build it with ``from_bnb`` (reads ``Params4bit``/``QuantState`` as they are, no copy),
    ``from_bnb_state_dict`` (a bitsandbytes checkpoint, without bitsandbytes installed) or
    ``quantize`` (a full-precision weight).
    """

    def __init__(self, packed, absmax, shape, dtype, blocksize=64, *, absmax2=None, code2=None,
                 offset=None, nested_blocksize=NESTED_BLOCKSIZE, quant_storage=torch.uint8):
        shape = torch.Size(shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape must be (out_features, in_features) with both >= 1, got {tuple(shape)}")
        if dtype not in _SOURCE_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        _check_positive_blocksize("blocksize", blocksize, BLOCKSIZES)
        n = shape.numel()
        n_blocks = -(-n // blocksize)
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
            raise TypeError(f"packed must be a 1-D uint8 tensor, got {getattr(packed, 'dtype', type(packed))} "
                            f"with shape {tuple(getattr(packed, 'shape', ()))}")
        if packed.numel() != -(-n // 2):
            raise ValueError(f"packed must hold ceil({n}/2) = {-(-n // 2)} bytes for shape {tuple(shape)}, "
                             f"got {packed.numel()}")
        double_quant = absmax2 is not None
        if double_quant != (code2 is not None) or double_quant != (offset is not None):
            raise ValueError("absmax2, code2 and offset must be given together (double quant) or not at all")
        want = torch.uint8 if double_quant else torch.float32
        if not isinstance(absmax, torch.Tensor) or absmax.dtype != want or absmax.shape != (n_blocks,):
            raise ValueError(f"absmax must be {want} of shape ({n_blocks},) for {n} elements in blocks of "
                             f"{blocksize}{' with double quant' if double_quant else ''}, got "
                             f"{getattr(absmax, 'dtype', type(absmax))} {tuple(getattr(absmax, 'shape', ()))}")
        tensors = [("packed", packed), ("absmax", absmax)]
        if double_quant:
            for name, t in (("absmax2", absmax2), ("code2", code2), ("offset", offset)):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            _check_positive_blocksize("nested_blocksize", nested_blocksize)
            n_blocks2 = -(-n_blocks // nested_blocksize)
            if absmax2.dtype != torch.float32 or absmax2.shape != (n_blocks2,):
                raise ValueError(f"absmax2 must be float32 of shape ({n_blocks2},), got {absmax2.dtype} "
                                 f"{tuple(absmax2.shape)}")
            if code2.dtype != torch.float32 or code2.shape != (256,):
                raise ValueError(f"code2 must be float32 of shape (256,), got {code2.dtype} {tuple(code2.shape)}")
            if offset.dtype != torch.float32 or offset.numel() != 1:
                raise ValueError(f"offset must be a one-element float32 tensor, got {offset.dtype} "
                                 f"{tuple(offset.shape)}")
            offset = offset.reshape(())
            tensors += [("absmax2", absmax2), ("code2", code2), ("offset", offset)]
        for name, t in tensors:
            if t.device != packed.device:
                raise ValueError(f"{name} is on {t.device} but packed is on {packed.device}")
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous (kernels index it as a flat array)")
        if not isinstance(quant_storage, torch.dtype):
            raise TypeError(f"quant_storage must be a torch.dtype, got {type(quant_storage).__name__}")
        if (-(-n // 2)) % quant_storage.itemsize:
            raise ValueError(f"{-(-n // 2)} packed bytes cannot be viewed as quant_storage={quant_storage}")
        self.packed, self.absmax = packed, absmax
        self.absmax2, self.code2, self.offset = absmax2, code2, offset
        self.blocksize, self.nested_blocksize = blocksize, nested_blocksize
        self.shape, self.dtype, self.quant_storage = shape, dtype, quant_storage
        self.level_pairs = nf4_level_pairs(packed.device)

    # ---- properties AdapterLinear and the kernels need -------------------------------------
    @property
    def code(self) -> torch.Tensor:
        """The 16 NF4 values (fp32) on this weight's device."""
        return nf4_code(self.device)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def numel(self) -> int:
        """Elements of the dense weight (like ``Tensor.numel``)."""
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        return self.absmax.numel()

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def nbytes(self) -> int:
        """Bytes of quantized state (packed codes and scales)."""
        parts = [self.packed, self.absmax] + ([self.absmax2, self.code2, self.offset] if self.double_quant else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def __repr__(self):
        dq = f", double_quant (nested_blocksize={self.nested_blocksize})" if self.double_quant else ""
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}{dq}, "
                f"device={self.device})")

    def _tensors(self) -> dict:
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            out.update(absmax2=self.absmax2, code2=self.code2, offset=self.offset)
        return out

    def _replace(self, **tensors) -> "NF4Weight":
        t = {**self._tensors(), **tensors}
        return NF4Weight(t.pop("packed"), t.pop("absmax"), self.shape, self.dtype, self.blocksize,
                         nested_blocksize=self.nested_blocksize, quant_storage=self.quant_storage, **t)

    def with_tensors(self, packed, absmax, absmax2=None, code2=None, offset=None) -> "NF4Weight":
        """This weight over other tensors of the same shapes and dtypes (as autograd hands
        back saved tensors): ``self`` when they are the ones it holds, else a shallow copy,
        unchecked (cheap: for the op's backward, not for user input)."""
        tensors = (packed, absmax, absmax2, code2, offset)
        if all(a is b for a, b in zip(tensors, (self.packed, self.absmax, self.absmax2,
                                                self.code2, self.offset))):
            return self
        out = copy.copy(self)
        out.packed, out.absmax, out.absmax2, out.code2, out.offset = tensors
        return out

    def to(self, device, non_blocking: bool = False) -> "NF4Weight":
        """Copy of the quantized state on ``device`` (no copy if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return self._replace(**{k: v.to(device, non_blocking=non_blocking) for k, v in self._tensors().items()})

    def block_scales(self) -> torch.Tensor:
        """fp32 scale of every block: ``absmax``, or its double-quant decode (as bitsandbytes)."""
        if not self.double_quant:
            return self.absmax
        nb, nb2 = self.n_blocks, self.nested_blocksize
        codes = self.code2[self.absmax.long()]
        codes = torch.nn.functional.pad(codes, (0, self.absmax2.numel() * nb2 - nb))
        # Two roundings like bitsandbytes: the product (its dequantize_blockwise), then the add.
        return (codes.view(-1, nb2) * self.absmax2[:, None]).view(-1)[:nb] + self.offset

    def dequantize(self, dtype=None) -> torch.Tensor:
        """Dense (out x in) weight; see :func:`dequantize_nf4`."""
        return dequantize_nf4(self, dtype)

    # ---- bitsandbytes interop ---------------------------------------------------------------
    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> "NF4Weight":
        """Wrap bitsandbytes' NF4 state as it is (no re-quantization, no copy of the codes).

        ``weight``: a ``bnb.nn.Linear4bit``, its ``Params4bit``, or the packed tensor returned by
        ``bnb.functional.quantize_4bit`` together with its ``quant_state``. Any ``quant_storage``
        dtype, blocksize, with or without double quant. A weight that bitsandbytes repacked for
        its CPU AVX512-BF16 kernel (``quant_state.packing_format_for_cpu``, done on the first
        eval-mode CPU forward) is read back into the standard layout; bitsandbytes had already
        rounded its absmax to bf16 then, and those values are used as they are.
        """
        if quant_state is None:
            if hasattr(weight, "weight") and hasattr(weight.weight, "quant_state"):
                weight = weight.weight  # Linear4bit
            quant_state = getattr(weight, "quant_state", None)
            if quant_state is None:
                raise ValueError("weight has no quant_state: pass a quantized Linear4bit/Params4bit (bitsandbytes "
                                 "quantizes a Params4bit when it is moved to a device), or the packed tensor and "
                                 "its QuantState")
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a Linear4bit, Params4bit or tensor, got {type(weight).__name__}")
        qs = quant_state
        if qs.quant_type != "nf4":
            raise ValueError(f"only quant_type='nf4' is supported, got {qs.quant_type!r}")
        storage = weight.dtype
        data = weight.detach().as_subclass(torch.Tensor)
        if getattr(qs, "packing_format_for_cpu", False):
            return cls._from_bnb_cpu_format(data, qs)
        packed = data.view(torch.uint8).reshape(-1)
        if qs.state2 is None:
            return cls(packed, qs.absmax, qs.shape, qs.dtype, qs.blocksize, quant_storage=storage)
        offset = qs.offset if isinstance(qs.offset, torch.Tensor) else torch.tensor(float(qs.offset))
        return cls(packed, qs.absmax, qs.shape, qs.dtype, qs.blocksize, absmax2=qs.state2.absmax,
                   code2=qs.state2.code, offset=offset.to(packed.device, torch.float32),
                   nested_blocksize=qs.state2.blocksize, quant_storage=storage)

    @classmethod
    def _from_bnb_cpu_format(cls, data, qs):
        # bitsandbytes' CPU inference layout: each run of 32 bytes holds a (32 rows x 2 columns)
        # tile in row-major order, its first 32 codes in the low nibbles and the last 32 in the
        # high nibbles; absmax is bf16 and transposed to (K/blocksize, N).
        n_out, n_in = qs.shape
        rb = 32
        nib = data.view(torch.uint8).reshape(-1, rb)
        nib = torch.cat([nib & 0xF, nib >> 4], dim=-1)  # per tile: 64 nibbles in (row, col) order
        nib = nib.reshape(n_out // rb, n_in // 2, rb, 2).transpose(1, 2).reshape(-1)
        packed = (nib[0::2] << 4) | nib[1::2]
        absmax = qs.absmax.T.reshape(-1).float()
        dtype = getattr(qs, "original_dtype", qs.dtype)
        storage = getattr(qs, "original_storage_type", torch.uint8)
        return cls(packed, absmax, qs.shape, dtype, qs.blocksize, quant_storage=storage)

    def to_bnb(self):
        """A bitsandbytes ``Params4bit`` sharing this weight's tensors (needs bitsandbytes)."""
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.nested_blocksize,
                                dtype=torch.float32)
        qs = QuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
                        quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=state2)
        return bnb.nn.Params4bit(self._storage(), requires_grad=False, quant_state=qs, blocksize=self.blocksize,
                                 compress_statistics=self.double_quant, quant_type="nf4",
                                 quant_storage=self.quant_storage, bnb_quantized=True)

    def _storage(self) -> torch.Tensor:
        return self.packed.view(self.quant_storage).unsqueeze(1)

    def bnb_state_dict(self, prefix: str = "weight") -> dict:
        """The weight's entries of a bitsandbytes ``Linear4bit`` state dict, built without bitsandbytes.

        Same keys, tensors and serialized quant-state blob as ``Linear4bit.state_dict()``, so a
        checkpoint written from it loads in transformers/bitsandbytes and vice versa.
        """
        sd = {prefix: self._storage(), f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": str(self.dtype).removeprefix("torch."),
                "shape": list(self.shape)}
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.absmax2
            sd[f"{prefix}.nested_quant_map"] = self.code2.clone()
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=self.offset.item())
        sd[f"{prefix}.{_QSTATE_KEY}"] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict, prefix: str = "weight", device=None) -> "NF4Weight":
        """Read a bitsandbytes NF4 checkpoint entry (e.g. a ``*-bnb-4bit`` model) without bitsandbytes."""
        key = f"{prefix}.{_QSTATE_KEY}"
        if key not in state_dict:
            raise ValueError(f"state_dict has no {key!r}: not a bitsandbytes NF4 entry for prefix {prefix!r}")
        meta = json.loads(bytes(state_dict[key].cpu().tolist()).decode("utf-8"))
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"only quant_type='nf4' is supported, got {meta.get('quant_type')!r}")
        data = state_dict[prefix]
        device = data.device if device is None else torch.device(device)
        packed = data.to(device).contiguous().view(torch.uint8).reshape(-1)
        kw = {}
        if "nested_blocksize" in meta:
            kw = dict(absmax2=state_dict[f"{prefix}.nested_absmax"].to(device),
                      code2=state_dict[f"{prefix}.nested_quant_map"].to(device),
                      offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=device),
                      nested_blocksize=meta["nested_blocksize"])
        return cls(packed, state_dict[f"{prefix}.absmax"].to(device), meta["shape"], getattr(torch, meta["dtype"]),
                   meta["blocksize"], quant_storage=data.dtype, **kw)

    # ---- quantization -------------------------------------------------------------------------
    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 quant_storage: torch.dtype = torch.uint8, dtype=None, backend: str = "auto") -> "NF4Weight":
        """Quantize a full-precision (out x in) weight to NF4.

        ``backend``: ``"bnb"`` calls ``bitsandbytes.functional.quantize_4bit``; ``"torch"`` runs our
        pure-PyTorch quantizer, which writes the bytes bitsandbytes' CPU backend writes (packed
        codes, absmax, double-quant codes/absmax2/offset); ``"auto"`` uses bitsandbytes if it
        can be imported. ``dtype``: dtype of the dequantized weight (default ``weight.dtype``).
        """
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dtype not in _SOURCE_DTYPES:
            raise TypeError(f"weight must be float16, bfloat16 or float32, got {weight.dtype}")
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out_features x in_features), got shape {tuple(weight.shape)}")
        _check_positive_blocksize("blocksize", blocksize, BLOCKSIZES)
        if backend not in ("auto", "bnb", "torch"):
            raise ValueError(f"backend must be 'auto', 'bnb' or 'torch', got {backend!r}")
        dtype = weight.dtype if dtype is None else dtype
        w = weight.detach().contiguous()
        if backend == "auto":
            backend = "bnb" if _bnb_available() else "torch"
        if backend == "bnb":
            from bitsandbytes.functional import quantize_4bit

            n_bytes = -(-w.numel() // 2)
            if n_bytes % quant_storage.itemsize:
                raise ValueError(f"{n_bytes} packed bytes cannot be viewed as quant_storage={quant_storage}")
            packed, qs = quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type="nf4", quant_storage=quant_storage)
            qs.dtype = dtype
            return cls.from_bnb(packed, qs)
        packed, absmax = _quantize_4bit(w, blocksize)
        kw = {}
        if double_quant:
            absmax, absmax2, offset = _double_quantize(absmax)
            kw = dict(absmax2=absmax2, code2=dynamic_code(w.device), offset=offset)
        return cls(packed, absmax, w.shape, dtype, blocksize, quant_storage=quant_storage, **kw)


def dequantize_nf4(w: NF4Weight, dtype=None) -> torch.Tensor:
    """Dense weight from NF4, bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

    Computes ``NF4[nibble] * scale`` in fp32 (one rounding), then casts to ``dtype``
    (default ``w.dtype``) with round-to-nearest-even, as bitsandbytes does.
    """
    if not isinstance(w, NF4Weight):
        raise TypeError(f"w must be an NF4Weight, got {type(w).__name__}")
    dtype = w.dtype if dtype is None else dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    n, bs = w.numel(), w.blocksize
    # One gather per byte: (hi value, lo value) pairs for all 256 byte values.
    byte = torch.arange(256, device=w.device)
    pairs = w.code[torch.stack((byte >> 4, byte & 0xF), dim=1)]
    values = pairs[w.packed.long()].view(-1)
    values = torch.nn.functional.pad(values, (0, w.n_blocks * bs - values.numel()))
    out = (values.view(-1, bs) * w.block_scales()[:, None]).view(-1)[:n]
    return out.view(w.shape).to(dtype)


def quantize_residual(weight: torch.Tensor, up: torch.Tensor, scale: torch.Tensor, down: torch.Tensor,
                      **quantize_kwargs) -> NF4Weight:
    """NF4 of ``W_res = W - up @ diag(scale) @ down`` (spectral_additive/rotational bases).

    With ``up = P_r``, ``scale = sigma_r``, ``down = Q_r.T`` the top-r spectrum stays exact in
    the adapter path and only the residual, whose blocks have a smaller dynamic range, is
    quantized. The residual is formed in fp32 and quantized from fp32; the dequantized dtype
    defaults to ``weight.dtype``. Other arguments go to :meth:`NF4Weight.quantize`.
    """
    for name, t in (("weight", weight), ("up", up), ("scale", scale), ("down", down)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(t, 'dtype', type(t))}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features x in_features), got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    rank = scale.numel()
    if scale.shape != (rank,) or up.shape != (out_f, rank) or down.shape != (rank, in_f):
        raise ValueError(f"need up ({out_f} x R), scale (R,), down (R x {in_f}); got up {tuple(up.shape)}, "
                         f"scale {tuple(scale.shape)}, down {tuple(down.shape)}")
    residual = weight.detach().float() - (up.detach().float() * scale.detach().float()) @ down.detach().float()
    quantize_kwargs.setdefault("dtype", weight.dtype)
    return NF4Weight.quantize(residual, **quantize_kwargs)


# ---- the quantizer (bitsandbytes CPU backend, step by step) ------------------------------------
def _bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _nf4_bounds_cpu() -> torch.Tensor:
    code = nf4_code()
    return (code[:-1] + code[1:]) / 2


def _quantize_4bit(w: torch.Tensor, blocksize: int):
    """bitsandbytes' NF4 quantizer (its default/CPU kernel): nearest level, ties to the lower."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).view(-1)
    if full < n:
        # The partial last block divides (not multiplies by the reciprocal) and stores the
        # clamped absmax, exactly as bitsandbytes does.
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    scaled = torch.nn.functional.pad(scaled, (0, n % 2))
    idx = torch.bucketize(scaled, _nf4_bounds_cpu().to(w.device), out_int32=True).to(torch.uint8)
    return (idx[0::2] << 4) | idx[1::2], absmax


@functools.lru_cache(maxsize=None)
def _dynamic_lut_cpu() -> torch.Tensor:
    # bitsandbytes' CPU 8-bit quantizer does not search the code: it maps [-1, 1] onto 65536
    # bins and reads the code index of each bin's left edge from a table.
    code = _dynamic_code_cpu()
    mids = 0.5 * (code[:-1] + code[1:])
    edges = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(mids, edges, side="left").to(torch.uint8)


def _quantize_8bit_cpu(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """bitsandbytes' CPU ``quantize_blockwise`` of fp32 ``x`` with the dynamic map: (codes, absmax)."""
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # all-zero blocks get code 0
    val = torch.clamp(blocks * inv[:, None], -1, 1)
    bins = ((val + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)  # truncation, as the C cast
    codes = _dynamic_lut_cpu()[bins]
    codes[absmax == 0] = 0
    return codes.view(-1)[:n], absmax


def _double_quantize(absmax: torch.Tensor):
    """bitsandbytes' double quant of fp32 absmax: subtract the mean, then 8-bit blockwise (256).

    Runs on CPU like bitsandbytes' CPU backend (the mean's summation order is part of the bytes).
    """
    x = absmax.cpu()
    offset = x.mean()
    codes, absmax2 = _quantize_8bit_cpu(x - offset)
    dev = absmax.device
    return codes.to(dev), absmax2.to(dev), offset.to(dev)
