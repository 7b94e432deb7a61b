"""An NF4 weight as one ``torch.Tensor``: what FSDP2 shards.

:class:`NF4Tensor` is a wrapper tensor subclass of logical shape ``(rows, in_features)`` and
dtype ``uint8`` (one 4-bit code per element, logically) that carries the state of an
:class:`~speclora_kernels.quant.NF4Weight` as inner tensors, in bitsandbytes' layout,
unchanged:

- ``packed`` (uint8, two codes a byte) and ``absmax`` (one scale per block): per row, so a
  slice of rows is a slice of each (rows start on block boundaries when ``in_features`` is
  a multiple of the blocksize);
- with double quant, ``absmax2``, ``code2``, ``offset``: the whole weight's, shared by every
  slice (``absmax2`` has one fp32 entry per 256 blocks, ``code2`` 256 entries: a few bytes
  beside the codes, so they are replicated rather than sharded).

It supports exactly what ``nn.Module`` (``to``, ``state_dict``/``load_state_dict`` copies,
``deepcopy``) and FSDP2's ``fully_shard`` do to a frozen parameter: ``torch.chunk``/``split``,
``narrow`` and ``new_zeros`` on dim 0 (sharding, padding), ``copy_``, ``view``/``as_strided``
to its own size or flat, ``detach``, ``clone``, moves between devices, and ``torch.equal``.
Anything else (arithmetic, a dtype conversion) raises ``NotImplementedError``: the op reads
the weight through :meth:`NF4Tensor.nf4_weight`, as an ``NF4Weight``.

FSDP2's all-gather extension (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``): each
rank's shard sends its ``packed`` and ``absmax`` rows; the gathered tensors are the whole
weight's, and the replicated double-quant tensors come along as metadata.

DDP's start-up broadcast (``_broadcast_coalesced``: flat views of every parameter, ``cat``
into buckets, ``c10d.broadcast_``, slices copied back) works on it too: ``cat`` of flat
tensors gives a :class:`_FlatGroup` that stands for its members without copying them, and
``broadcast_`` of a flat NF4Tensor or a group sends each inner tensor in place.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .nf4 import NF4Weight

__all__ = ["NF4Tensor", "NF4Meta", "local_nf4", "nf4_weight_of", "nf4_state_dict_hook",
           "load_nf4_state_dict_hook"]

aten = torch.ops.aten
_ROWWISE = ("packed", "absmax")
_SHARED = ("absmax2", "code2", "offset")


class NF4Meta(NamedTuple):
    """What an :class:`NF4Tensor` holds besides tensors (hashable: compile guards on it)."""

    dtype: torch.dtype  # what the weight dequantizes to
    blocksize: int
    nested_blocksize: int
    quant_storage: torch.dtype
    cols: int  # in_features


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(tuple(shape)):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


class NF4Tensor(torch.Tensor):
    """A frozen NF4 weight (or a slice of its rows) as a tensor; see the module docstring.

    Build it with :meth:`from_weight`; read it with :meth:`nf4_weight` (whole weights
    only: a shard is gathered by FSDP2 first)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, packed, absmax, shape, meta, absmax2=None, code2=None, offset=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, tuple(shape), strides=_contiguous_strides(shape), dtype=torch.uint8,
            device=packed.device, requires_grad=False)

    def __init__(self, packed, absmax, shape, meta, absmax2=None, code2=None, offset=None):
        self.packed, self.absmax = packed, absmax
        self.absmax2, self.code2, self.offset = absmax2, code2, offset
        self.meta = meta
        self._weight = None  # the NF4Weight view, built on first use

    # ---- construction and reading -------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: NF4Weight) -> "NF4Tensor":
        """The tensor form of ``weight`` over its own tensors (no copy)."""
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        meta = NF4Meta(weight.dtype, weight.blocksize, weight.nested_blocksize,
                       weight.quant_storage, weight.in_features)
        return cls(weight.packed, weight.absmax, weight.shape, meta, weight.absmax2,
                   weight.code2, weight.offset)

    def nf4_weight(self) -> NF4Weight:
        """This weight as an :class:`NF4Weight` over the same tensors (no copy; cached)."""
        return nf4_weight_of(self)

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def inner_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors it holds by ``NF4Weight`` field name (double-quant ones if any)."""
        names = _ROWWISE + (_SHARED if self.double_quant else ())
        return {name: getattr(self, name) for name in names}

    def storage_bytes(self) -> dict[str, int]:
        """Bytes of each inner tensor's storage as allocated now (0 once FSDP2 has freed a
        gathered weight)."""
        return {name: t.untyped_storage().nbytes() for name, t in self.inner_tensors().items()}

    def _like(self, shape=None, **tensors) -> "NF4Tensor":
        """A tensor of this kind with some inner tensors and/or its shape replaced."""
        t = {**self.inner_tensors(), **tensors}
        return NF4Tensor(t.pop("packed"), t.pop("absmax"), self.shape if shape is None else shape,
                         self.meta, **t)

    def __repr__(self, *, tensor_contents=None):
        m = self.meta
        dq = ", double_quant" if self.double_quant else ""
        return (f"NF4Tensor(shape={tuple(self.shape)}, dequantizes_to={m.dtype}, "
                f"blocksize={m.blocksize}{dq}, device={self.device})")

    # ---- torch.compile / swap_tensors ---------------------------------------------------
    def __tensor_flatten__(self):
        return list(self.inner_tensors()), self.meta

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return NF4Tensor(inner["packed"], inner["absmax"], outer_size, meta,
                         inner.get("absmax2"), inner.get("code2"), inner.get("offset"))

    # ---- aten ---------------------------------------------------------------------------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        handler = _HANDLERS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"NF4Tensor does not support {func}: it is a frozen 4-bit weight, read by "
                f"the fused op through nf4_weight() (dequantize it for anything else)")
        return handler(*args, **(kwargs or {}))

    # ---- FSDP2 all-gather extension -----------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """This shard's codes and block scales; the double-quant tensors ride as metadata."""
        ranks = mesh.size(mesh.ndim - 1)  # the shard dim (HSDP: the last)
        if outer_size[0] % ranks:
            raise ValueError(
                f"an NF4 base of {outer_size[0]} x {outer_size[1]} cannot be sharded by rows "
                f"over {ranks} ranks: FSDP2 needs out_features divisible by the world size "
                f"(give it to fully_shard's ignored_params to keep it whole on every rank)")
        shared = {name: getattr(self, name) for name in _SHARED}
        return (self.packed, self.absmax), (tuple(outer_size), self.meta, shared)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """The whole weight over the gathered tensors (mixed precision does not apply: the
        op decodes the codes into the input's dtype)."""
        packed, absmax = all_gather_outputs
        shape, meta, shared = metadata
        if out is not None:  # later iterations: FSDP2 gathered into out's own storage again
            if (out.packed.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr()
                    or out.absmax.untyped_storage().data_ptr()
                    != absmax.untyped_storage().data_ptr()):
                raise AssertionError("FSDP2 gathered an NF4Tensor into new storage")
            return None
        whole = NF4Tensor(packed.view(-1), absmax.view(-1), shape, meta, **shared)
        return whole, (packed, absmax)


def nf4_weight_of(t: NF4Tensor) -> NF4Weight:
    """``t.nf4_weight()`` as a function, which torch.compile traces (it reads the inner
    tensors as attributes; the cache is eager-only)."""
    compiling = torch.compiler.is_compiling()
    if not compiling and t._weight is not None:
        return t._weight
    if t.dim() != 2:
        raise RuntimeError(f"a flat view of an NF4Tensor {tuple(t.shape)} is not a weight")
    m = t.meta
    # NF4Weight checks that the tensors describe a whole weight (a shard does not)
    weight = NF4Weight(t.packed, t.absmax, t.shape, m.dtype, m.blocksize, absmax2=t.absmax2,
                       code2=t.code2, offset=t.offset, nested_blocksize=m.nested_blocksize,
                       quant_storage=m.quant_storage)
    if not compiling:
        t._weight = weight
    return weight


def local_nf4(t) -> NF4Tensor | None:
    """The :class:`NF4Tensor` held by ``t``: ``t`` itself, or the local shard of a DTensor
    over one (FSDP2's sharded parameter); None for anything else."""
    t = getattr(t, "_local_tensor", t)
    return t if isinstance(t, NF4Tensor) else None


# -------------------------------------------------------------------- state dicts
# A layer holding its NF4 base as an NF4Tensor parameter keeps the state dict of one holding
# it as buffers (``names``: NF4Weight field -> key, e.g. "absmax" -> "weight_absmax"). Under
# FSDP2 the row-wise tensors are DTensors sharded as the parameter is (a sharded state dict,
# which torch.distributed.checkpoint saves, gathers or distributes as any other), the
# double-quant ones are plain tensors, the same on every rank.
def nf4_state_dict_hook(module, state_dict, prefix, local_metadata, *, names):
    """``register_state_dict_post_hook``: the NF4Tensor entry becomes the buffers' entries."""
    key = prefix + names["packed"]
    held = state_dict.get(key)
    local = local_nf4(held)
    if local is None:
        return
    tensors = local.inner_tensors()
    if local is not held:  # a DTensor shard: the row-wise tensors as DTensors
        from torch.distributed.tensor import DTensor

        n = held.shape[0] * local.meta.cols
        totals = {"packed": math.ceil(n / 2), "absmax": math.ceil(n / local.meta.blocksize)}
        for name, total in totals.items():
            tensors[name] = DTensor.from_local(tensors[name], held.device_mesh, held.placements,
                                               run_check=False, shape=(total,), stride=(1,))
    # in the buffers' place: right after ``weight``, before this layer's submodules' entries
    after = []
    for k in reversed(state_dict):
        if k == key:
            break
        after.append(k)
    moved = [(k, state_dict.pop(k)) for k in reversed(after)]
    for name, t in tensors.items():
        state_dict[prefix + names[name]] = t
    state_dict.update(moved)


def load_nf4_state_dict_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                             unexpected_keys, error_msgs, *, names):
    """``register_load_state_dict_pre_hook``: the buffers' entries (whole tensors, or
    DTensor shards from :func:`nf4_state_dict_hook`) become one NF4Tensor entry that
    ``load_state_dict`` copies into the parameter, shard into shard."""
    held = module._parameters.get(names["packed"])
    target = local_nf4(held)
    fields = () if target is None else target.inner_tensors()
    keys = {name: prefix + names[name] for name in fields}
    if target is None or not all(k in state_dict for k in keys.values()) or local_nf4(
            state_dict[keys["packed"]]) is not None:
        return  # not ours, already an NF4Tensor, or incomplete: load_state_dict reports it
    given = {name: state_dict.pop(k) for name, k in keys.items()}
    if target is held:  # a whole weight
        given = {n: t.full_tensor() if hasattr(t, "full_tensor") else t for n, t in given.items()}
        state_dict[keys["packed"]] = held._like(**given)
        return
    from torch.distributed.tensor import DTensor, Shard

    dims = [i for i, p in enumerate(held.placements) if isinstance(p, Shard)]
    if len(dims) != 1 or held.placements[dims[0]].dim != 0:
        raise NotImplementedError(f"{prefix}weight: an NF4 base sharded as "
                                  f"{held.placements}; only Shard(0) on one mesh dim")
    size, rank = held.device_mesh.size(dims[0]), held.device_mesh.get_coordinate()[dims[0]]
    step = math.ceil(held.shape[0] / size)
    rows = (rank * step, min((rank + 1) * step, held.shape[0]))
    per_row = {"packed": 2, "absmax": target.meta.blocksize}  # elements per entry
    local = {}
    for name, t in given.items():
        if isinstance(t, DTensor):  # a shard (row-wise) or replicated (double quant)
            local[name] = t._local_tensor if name in per_row else t.full_tensor()
        elif name in per_row:  # a whole tensor: this rank's rows, as FSDP2 sharded them
            n = target.meta.cols // per_row[name]
            local[name] = t[rows[0] * n:rows[1] * n]
        else:
            local[name] = t
    local = target._like(**local)
    state_dict[keys["packed"]] = DTensor.from_local(
        local, held.device_mesh, held.placements, run_check=False, shape=held.shape,
        stride=held.stride())


# -------------------------------------------------------------------- aten handlers
def _row_slice(t: NF4Tensor, start: int, stop: int) -> NF4Tensor:
    rows, (cols, bs) = t.shape[0], (t.meta.cols, t.meta.blocksize)
    if start == 0 and stop >= rows:
        return t._like()
    if t.dim() != 2:
        raise NotImplementedError("only a 2-D NF4Tensor can be sliced (by rows)")
    if cols % bs:
        raise NotImplementedError(
            f"rows of this NF4 weight do not start on a block boundary (in_features={cols} "
            f"is not a multiple of blocksize={bs}), so it cannot be split by rows (to keep "
            f"it whole under FSDP2, give it to fully_shard's ignored_params)")
    n0, n1 = start * cols, stop * cols
    return t._like((stop - start, cols), packed=t.packed[n0 // 2:n1 // 2],
                   absmax=t.absmax[n0 // bs:n1 // bs])


def _check_dim0(dim: int, ndim: int, what: str) -> None:
    if dim not in (0, -ndim):
        raise NotImplementedError(f"NF4Tensor {what} on dim {dim}: only dim 0 (rows)")


def _split(t, split_size, dim=0):
    _check_dim0(dim, t.dim(), "split")
    sizes = [min(split_size, t.shape[0] - s) for s in range(0, t.shape[0], split_size)]
    return _split_with_sizes(t, sizes, dim)


def _split_with_sizes(t, split_sizes, dim=0):
    _check_dim0(dim, t.dim(), "split")
    out, start = [], 0
    for size in split_sizes:
        out.append(_row_slice(t, start, start + size))
        start += size
    return out


def _slice(t, dim=0, start=None, end=None, step=1):
    _check_dim0(dim, t.dim(), "slice")
    if step != 1:
        raise NotImplementedError("NF4Tensor slices need step 1")
    rows = t.shape[0]
    start, end = start or 0, rows if end is None else min(end, rows)
    start, end = (start + rows if start < 0 else start), (end + rows if end < 0 else end)
    return _row_slice(t, start, max(start, end))


def _check_dtype(dtype, what: str) -> None:
    if dtype not in (None, torch.uint8):
        raise NotImplementedError(f"NF4Tensor {what} to {dtype}: the quantized state is never "
                                  f"converted (dequantize it with nf4_weight().dequantize())")


def _new_zeros(t, size, dtype=None, layout=None, device=None, pin_memory=None):
    _check_dtype(dtype, "new_zeros")
    size = tuple(size)
    if len(size) != 2 or size[1] != t.meta.cols or t.meta.cols % t.meta.blocksize:
        raise NotImplementedError(f"NF4Tensor.new_zeros{size}: only whole rows of "
                                  f"{t.meta.cols} block-aligned columns")
    n = size[0] * size[1]
    zeros = {name: torch.zeros(math.ceil(n / (2 if name == "packed" else t.meta.blocksize)),
                               dtype=getattr(t, name).dtype, device=device or t.device)
             for name in _ROWWISE}
    shared = {name: torch.zeros_like(v, device=device or t.device)
              for name, v in t.inner_tensors().items() if name in _SHARED}
    return t._like(size, **zeros, **shared)


def _copy_(dst, src, non_blocking=False):
    if not isinstance(src, NF4Tensor) or not isinstance(dst, NF4Tensor):
        raise NotImplementedError("NF4Tensor.copy_ needs NF4Tensors on both sides (the "
                                  "quantized state is never re-quantized)")
    if dst.shape != src.shape or dst.meta != src.meta or dst.double_quant != src.double_quant:
        raise RuntimeError(f"NF4Tensor.copy_: {src!r} does not fit {dst!r}")
    for name, target in dst.inner_tensors().items():
        target.copy_(getattr(src, name), non_blocking=non_blocking)
    return dst


def _view(t, size):
    size = tuple(size)
    numel = t.numel()
    if size in ((-1,), (numel,)):
        return t._like((numel,))
    if len(size) == 2 and size[1] == t.meta.cols and size[0] * size[1] == numel:
        return t._like(size)
    raise NotImplementedError(f"NF4Tensor.view{size} of {tuple(t.shape)}: only its own "
                              f"(rows, {t.meta.cols}) or flat")


def _as_strided(t, size, stride, storage_offset=None):
    if tuple(stride) != _contiguous_strides(size) or storage_offset not in (None, 0):
        raise NotImplementedError("NF4Tensor.as_strided: contiguous, offset 0 only")
    return _view(t, size)


def _to_copy(t, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None):
    _check_dtype(dtype, "conversion")
    moved = {name: v.to(device=device, non_blocking=non_blocking, copy=True)
             for name, v in t.inner_tensors().items()}
    return t._like(**moved)


def _clone(t, memory_format=None):
    return t._like(**{name: v.clone() for name, v in t.inner_tensors().items()})


def _alias(t):
    return t._like()


def _equal(a, b) -> bool:
    """The same weight: same shape and format, every inner tensor equal."""
    if not (isinstance(a, NF4Tensor) and isinstance(b, NF4Tensor)) or a.shape != b.shape \
            or a.meta != b.meta or a.double_quant != b.double_quant:
        return False
    return all(torch.equal(t, getattr(b, name)) for name, t in a.inner_tensors().items())


# -------------------------------------------------------------------- DDP's broadcast
class _FlatGroup(torch.Tensor):
    """``torch.cat`` of flat tensors (NF4Tensors among them), as DDP's coalesced broadcast
    builds a bucket: a flat uint8 tensor that stands for its members, never copying them.
    ``c10d.broadcast_`` sends each member's tensors in place, and the slice at a member's
    offset is that member, so DDP's copy back is a copy onto itself. Nothing else."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, members):
        n = sum(m.numel() for m in members)
        return torch.Tensor._make_wrapper_subclass(cls, (n,), dtype=torch.uint8,
                                                   device=members[0].device)

    def __init__(self, members):
        self.members = members

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.c10d.broadcast_.default:
            return _broadcast_(*args, **(kwargs or {}))
        if func is aten.slice.Tensor:
            return _group_slice(*args, **(kwargs or {}))
        if func in (aten.detach.default, aten.alias.default):
            return _FlatGroup(args[0].members)  # a new tensor over the same members
        raise NotImplementedError(f"a group of flat NF4Tensors (DDP's broadcast bucket) does "
                                  f"not support {func}")


def _cat(tensors, dim=0):
    if dim != 0 or any(t.dim() != 1 or t.dtype != torch.uint8 for t in tensors):
        raise NotImplementedError("NF4Tensor cat: only flat views, as DDP's broadcast "
                                  "buckets them (read the weight through nf4_weight())")
    return _FlatGroup(list(tensors))


def _group_slice(group, dim=0, start=None, end=None, step=1):
    offset = 0
    for m in group.members:
        if (dim, start or 0, end, step) == (0, offset, offset + m.numel(), 1):
            return aten.alias.default(m)  # a new tensor (autograd makes it a view)
        offset += m.numel()
    raise NotImplementedError("a group of flat NF4Tensors can only be sliced at its members")


def _parts(t) -> list[torch.Tensor]:
    """The plain tensors a broadcast sends for ``t``."""
    if isinstance(t, _FlatGroup):
        return [p for m in t.members for p in _parts(m)]
    if isinstance(t, NF4Tensor):
        return list(t.inner_tensors().values())
    return [t]


def _broadcast_(tensors, *args, **kwargs):
    works = [torch.ops.c10d.broadcast_.default([p], *args, **kwargs)[1]
             for t in tensors for p in _parts(t)]
    for work in works[:-1]:
        work.wait()
    return tensors, works[-1]


_HANDLERS: dict[Any, Any] = {
    aten.detach.default: _alias,
    aten.alias.default: _alias,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split_with_sizes,
    aten.slice.Tensor: _slice,
    aten.new_zeros.default: _new_zeros,
    aten.copy_.default: _copy_,
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.as_strided.default: _as_strided,
    aten._to_copy.default: _to_copy,
    aten.clone.default: _clone,
    aten.equal.default: _equal,
    aten.cat.default: _cat,
    torch.ops.c10d.broadcast_.default: _broadcast_,
}
