"""Count what Triton kernels do by running them in the interpreter.

With ``TRITON_INTERPRET=1`` every ``tl.load``, ``tl.store`` and ``tl.dot`` of a kernel
runs as a call on Triton's ``InterpreterBuilder`` with the raw addresses of the CPU
tensors it touches. During a counting session this module wraps those calls (and the
launch itself, ``GridExecutor.__call__``) and restores them afterwards::

    with count_triton() as c:
        y = my_op(x, w)
    print(c.table())
    c.per_kernel()["my_kernel"].unique_load_bytes

Per kernel name it counts:

- ``launches`` and ``programs`` (the grid size, summed over launches);
- ``load_bytes`` / ``store_bytes``: bytes requested, only elements whose mask is true,
  at the pointee dtype's size (tensor-descriptor loads count their in-bounds elements);
- ``unique_load_bytes`` / ``unique_store_bytes``: each distinct byte address once per
  session and kernel: what device memory must serve when re-read tiles hit in cache;
- ``dot_flops``: ``2*m*n*k`` of every ``tl.dot`` tile as issued (masks don't reduce it),
  and ``dots``, the number of dot calls;
- ``atomics``: atomic read-modify-write calls, whose elements count as both load and store.

Unique bytes are tracked with one bool per byte over the storages of the tensors passed
to the launches (lazily, per kernel and direction), so a 4096x14336 bf16 weight costs
117 MB of bitmap. ``total()`` sums the kernels; its unique bytes are the sum of the
per-kernel unique bytes (no cache survives between kernels).

Anything the counter cannot account for raises :class:`CountingError` instead of being
silently missed: a compiled (non-interpreted) launch, ``tl.dot_scaled``, or an access
outside every tensor passed to the session's launches. Triton 3.9 has no block pointers
(``tl.make_block_ptr`` raises); tensor descriptors route through the masked load/store
calls and are counted.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np


class CountingError(RuntimeError):
    """The counter met something it cannot count; raised rather than undercounting."""


@dataclasses.dataclass
class KernelCounts:
    """What one kernel (all its launches in a session) did. Bytes and FLOPs are exact."""

    name: str
    launches: int = 0
    programs: int = 0
    load_bytes: int = 0
    store_bytes: int = 0
    unique_load_bytes: int = 0
    unique_store_bytes: int = 0
    dot_flops: int = 0
    dots: int = 0
    atomics: int = 0

    @property
    def bytes(self) -> int:
        """Bytes requested by loads and stores."""
        return self.load_bytes + self.store_bytes

    @property
    def unique_bytes(self) -> int:
        """Distinct bytes loaded plus distinct bytes stored."""
        return self.unique_load_bytes + self.unique_store_bytes

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def predicted_h100(self, **kwargs):
        """Predicted H100 time from unique bytes, dot FLOPs and launches; see ``floors.predict_h100``."""
        from .floors import predict_h100

        return predict_h100(self.unique_bytes, self.dot_flops, self.launches, **kwargs)


class _Region:
    """One contiguous address range (a tensor storage) with per-(kernel, direction) byte bitmaps."""

    __slots__ = ("start", "end", "maps")

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self.maps: Dict[Tuple[str, str], np.ndarray] = {}

    def bitmap(self, key: Tuple[str, str]) -> np.ndarray:
        bm = self.maps.get(key)
        if bm is None:
            bm = self.maps[key] = np.zeros(self.end - self.start, dtype=bool)
        return bm


class _AddressSpace:
    """Sorted, non-overlapping regions; a storage overlapping known ones is merged with them."""

    def __init__(self):
        self.starts: List[int] = []
        self.regions: List[_Region] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect.bisect_right(self.starts, start) - 1
        if i >= 0 and end <= self.regions[i].end:
            return  # already covered (the usual case: same storage, another launch)
        lo = max(i, 0)
        if i >= 0 and self.regions[i].end <= start:
            lo = i + 1
        hi = bisect.bisect_left(self.starts, end)
        old = self.regions[lo:hi]
        merged = _Region(min([start] + [r.start for r in old]), max([end] + [r.end for r in old]))
        for r in old:  # a freed storage's address range reused by a larger one
            for key, bm in r.maps.items():
                merged.bitmap(key)[r.start - merged.start:r.end - merged.start] |= bm
        self.regions[lo:hi] = [merged]
        self.starts[lo:hi] = [merged.start]

    def mark(self, key: Tuple[str, str], addrs: np.ndarray, size: int) -> None:
        lo, hi = int(addrs.min()), int(addrs.max()) + size
        i = bisect.bisect_right(self.starts, lo) - 1
        if i >= 0 and hi <= self.regions[i].end:
            self._set(self.regions[i], key, addrs, size)
            return
        idx = np.searchsorted(np.asarray(self.starts, dtype=np.uint64), addrs, side="right").astype(np.int64) - 1
        for j in np.unique(idx):
            sub = addrs[idx == j]
            if j < 0 or int(sub.max()) + size > self.regions[j].end:
                raise CountingError(
                    f"{key[1]} at an address outside every tensor passed to the launches; not counted")
            self._set(self.regions[j], key, sub, size)

    @staticmethod
    def _set(region: _Region, key, addrs: np.ndarray, size: int) -> None:
        off = (addrs - np.uint64(region.start)).astype(np.intp)
        bm = region.bitmap(key)
        bm[off] = True
        for b in range(1, size):
            bm[off + b] = True

    def unique(self, key: Tuple[str, str]) -> int:
        return sum(int(np.count_nonzero(r.maps[key])) for r in self.regions if key in r.maps)


class TritonCounter:
    """Counts of one session; obtain it from :func:`count_triton`."""

    def __init__(self):
        self._kernels: Dict[str, KernelCounts] = {}
        self._space: Optional[_AddressSpace] = _AddressSpace()
        self._current: Optional[KernelCounts] = None

    # -- results -------------------------------------------------------------------
    def per_kernel(self) -> Dict[str, KernelCounts]:
        """Counts per kernel name, in order of first launch (copies)."""
        self._refresh_unique()
        return {name: dataclasses.replace(k) for name, k in self._kernels.items()}

    def total(self) -> KernelCounts:
        """Sum over kernels; unique bytes are summed per kernel (no cache across kernels)."""
        total = KernelCounts("total")
        for k in self.per_kernel().values():
            for f in dataclasses.fields(KernelCounts):
                if f.name != "name":
                    setattr(total, f.name, getattr(total, f.name) + getattr(k, f.name))
        return total

    def predicted_h100(self, **kwargs):
        """Predicted H100 time: each kernel from its unique bytes, dot FLOPs and launches, summed."""
        from .floors import predict_h100_serial

        return predict_h100_serial(((k.unique_bytes, k.dot_flops, k.launches) for k in self.per_kernel().values()),
                                   **kwargs)

    def table(self) -> str:
        """A printable table, one row per kernel plus the total."""
        head = ("kernel", "launches", "programs", "load", "store", "uniq load", "uniq store", "dot FLOP", "dots")
        rows = [head]
        kernels = list(self.per_kernel().values())
        for k in kernels + ([self.total()] if len(kernels) > 1 else []):
            rows.append((k.name, str(k.launches), str(k.programs), _si(k.load_bytes, "B"),
                         _si(k.store_bytes, "B"), _si(k.unique_load_bytes, "B"), _si(k.unique_store_bytes, "B"),
                         _si(k.dot_flops, "FLOP"), str(k.dots)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]

        def fmt(row):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])

    __str__ = table

    # -- called by the wrapped interpreter --------------------------------------------
    def _refresh_unique(self) -> None:
        if self._space is None:
            return  # finalized: unique counts already stored
        for name, k in self._kernels.items():
            k.unique_load_bytes = self._space.unique((name, "load"))
            k.unique_store_bytes = self._space.unique((name, "store"))

    def _finalize(self) -> None:
        self._refresh_unique()
        self._space = None  # free the bitmaps

    def _launch(self, name: str, args, kwargs) -> None:
        for t in _tensors(list(args) + list(kwargs.values())):
            if t.device.type != "cpu":
                raise CountingError(f"kernel {name}: tensor on {t.device}; counting needs CPU tensors")
            st = t.untyped_storage()
            self._space.add(st.data_ptr(), st.data_ptr() + st.nbytes())
        k = self._kernels.get(name)
        if k is None:
            k = self._kernels[name] = KernelCounts(name)
        k.launches += 1
        self._current = k

    def _kernel(self, what: str) -> KernelCounts:
        if self._current is None:
            raise CountingError(f"{what} outside a kernel launch")
        return self._current

    def _access(self, kind: str, ptrs, mask) -> None:
        k = self._kernel(kind)
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        p = np.asarray(ptrs.data)
        m = np.ones(p.shape, dtype=bool) if mask is None else np.broadcast_to(np.asarray(mask.data, dtype=bool),
                                                                             p.shape)
        addrs = p[m].astype(np.uint64, copy=False)
        if kind == "load":
            k.load_bytes += addrs.size * size
        else:
            k.store_bytes += addrs.size * size
        if addrs.size:
            self._space.mark((k.name, kind), addrs, size)

    def _dot(self, a, b) -> None:
        k = self._kernel("tl.dot")
        *batch, m, kk = a.data.shape
        n = b.data.shape[-1]
        k.dot_flops += 2 * int(np.prod(batch, dtype=np.int64)) * m * n * kk
        k.dots += 1


def _tensors(args) -> Iterator:
    """Torch tensors among launch arguments (inside tuples, descriptors, dtype wrappers)."""
    import torch
    from triton.runtime.jit import TensorWrapper
    from triton.tools.tensor_descriptor import TensorDescriptor

    for a in args:
        if isinstance(a, TensorWrapper):
            a = a.base
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, TensorDescriptor):
            yield from _tensors([a.base])
        elif isinstance(a, (tuple, list)):
            yield from _tensors(a)


def _si(n: int, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3f} {prefix}{unit}"
    return f"{n} {unit}"


_active: Optional[TritonCounter] = None


@contextlib.contextmanager
def count_triton() -> Iterator[TritonCounter]:
    """Count loads, stores, dots and launches of interpreted Triton kernels in this block.

    Needs ``TRITON_INTERPRET=1`` set before ``triton`` was imported and CPU tensors.
    Results are bit-identical to an uncounted run: the wrappers only read the
    interpreter's arguments. Sessions do not nest.
    """
    global _active
    import triton
    from triton.runtime import interpreter as interp
    from triton.runtime.jit import JITFunction

    if not triton.knobs.runtime.interpret:
        raise CountingError("count_triton needs TRITON_INTERPRET=1 set before triton is imported")
    if _active is not None:
        raise CountingError("count_triton sessions do not nest")
    counter = TritonCounter()
    B = interp.InterpreterBuilder
    orig = {
        "load": B.create_masked_load, "store": B.create_masked_store, "dot": B.create_dot,
        "grid": B.set_grid_dim, "rmw": B.create_atomic_rmw, "cas": B.create_atomic_cas,
        "call": interp.GridExecutor.__call__,
    }

    # create_load / create_store / descriptor and atomic loads and stores all call these two;
    # their cache arguments differ between Triton versions, so they pass through unnamed.
    def create_masked_load(self, ptrs, mask, *cache_args, **kw):
        counter._access("load", ptrs, mask)
        return orig["load"](self, ptrs, mask, *cache_args, **kw)

    def create_masked_store(self, ptrs, value, mask, *cache_args, **kw):
        counter._access("store", ptrs, mask)
        return orig["store"](self, ptrs, value, mask, *cache_args, **kw)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        counter._dot(a, b)
        return orig["dot"](self, a, b, d, input_precision, max_num_imprecise_acc)

    def create_dot_scaled(self, *args, **kwargs):
        raise CountingError("tl.dot_scaled is not counted")

    def create_atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
        counter._access("load", ptr, mask)
        counter._access("store", ptr, mask)
        counter._kernel("atomic").atomics += 1
        return orig["rmw"](self, rmw_op, ptr, val, mask, sem, scope)

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        counter._access("load", ptr, None)
        counter._access("store", ptr, None)
        counter._kernel("atomic").atomics += 1
        return orig["cas"](self, ptr, cmp, val, sem, scope)

    def set_grid_dim(self, nx, ny, nz):
        counter._kernel("grid").programs += nx * ny * nz
        return orig["grid"](self, nx, ny, nz)

    def call(self, *args, **kwargs):
        counter._launch(self.fn.__name__, args, kwargs)
        try:
            return orig["call"](self, *args, **kwargs)
        finally:
            counter._current = None

    def compiled_run(self, *args, **kwargs):
        raise CountingError(f"kernel {self.fn.__name__} is compiled, not interpreted; "
                            "set TRITON_INTERPRET=1 before triton is imported")

    patches = [(B, "create_masked_load", create_masked_load), (B, "create_masked_store", create_masked_store),
               (B, "create_dot", create_dot), (B, "create_dot_scaled", create_dot_scaled),
               (B, "create_atomic_rmw", create_atomic_rmw), (B, "create_atomic_cas", create_atomic_cas),
               (B, "set_grid_dim", set_grid_dim), (interp.GridExecutor, "__call__", call),
               (JITFunction, "run", compiled_run)]
    # an interpreter without an entry point (triton 3.6 has no create_dot_scaled) cannot run
    # what it would count: nothing to patch there
    patches = [(obj, name, fn) for obj, name, fn in patches if name in obj.__dict__]
    saved = [(obj, name, obj.__dict__[name]) for obj, name, _ in patches]
    _active = counter
    try:
        for obj, name, fn in patches:
            setattr(obj, name, fn)
        yield counter
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        _active = None
        counter._finalize()
