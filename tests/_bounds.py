"""Out-of-bounds guard for Triton-interpreter kernels.

The interpreter dereferences whatever address a kernel computes: an offset that wrapped
around int32 reads or writes memory outside its tensor and usually kills the process with
SIGSEGV. Under :func:`checked_memory` every unmasked ``tl.load`` / ``tl.store`` address is
first checked against the storages of the tensors the kernel was launched with, so such a
kernel fails with a clear ``AssertionError`` instead (and a read that stays inside the
process's memory but outside the tensor is caught too, which a crash test would miss).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from triton.runtime import interpreter as _interp

_ranges: list[tuple[int, int, str]] = []


def _storages(args, kwargs):
    named = list(zip(range(len(args)), args)) + list(kwargs.items())
    for name, value in named:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            yield storage.data_ptr(), storage.data_ptr() + storage.nbytes(), str(name)


def _check(ptrs, mask, what):
    addr = np.asarray(ptrs.data, dtype=np.uint64)
    live = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
    size = np.uint64(np.dtype(_interp._get_np_dtype(ptrs.get_element_ty())).itemsize)
    inside = np.zeros(addr.shape, dtype=bool)
    for lo, hi, _ in _ranges:
        inside |= (addr >= np.uint64(lo)) & (addr + size <= np.uint64(hi))
    bad = live & ~inside
    if bad.any():
        first = int(addr[bad].flat[0])
        near = min(_ranges, key=lambda r: abs(first - r[0]))
        raise AssertionError(
            f"{what} outside every argument's storage: address {first:#x} is "
            f"{first - near[0]:+d} bytes from the start of argument {near[2]!r} "
            f"({near[1] - near[0]} bytes); {int(bad.sum())} element(s) out of bounds "
            "(int32 offset overflow?)")


@contextlib.contextmanager
def checked_memory():
    """Within the block, interpreted kernels may only touch their tensor arguments' storage."""
    builder = _interp.InterpreterBuilder
    run, load, store = (_interp.GridExecutor.__call__, builder.create_masked_load,
                        builder.create_masked_store)

    def guarded_run(self, *args, **kwargs):
        saved = list(_ranges)
        _ranges[:] = list(_storages(args, kwargs))
        try:
            return run(self, *args, **kwargs)
        finally:
            _ranges[:] = saved

    def guarded_load(self, ptrs, mask, *rest, **kw):
        _check(ptrs, mask, "tl.load")
        return load(self, ptrs, mask, *rest, **kw)

    def guarded_store(self, ptrs, value, mask, *rest, **kw):
        _check(ptrs, mask, "tl.store")
        return store(self, ptrs, value, mask, *rest, **kw)

    _interp.GridExecutor.__call__ = guarded_run
    builder.create_masked_load = guarded_load
    builder.create_masked_store = guarded_store
    try:
        yield
    finally:
        _interp.GridExecutor.__call__ = run
        builder.create_masked_load = load
        builder.create_masked_store = store
