"""C++ CPU backend of the fused adapter linear (``csrc/``), built on first use.

    y = x @ W.T + bias + ((x' @ D.T) * s) @ U.T

with a dense base or an NF4 base in bitsandbytes' layout (decoded block by block inside the
product, never as a whole weight), forward and backward, semantics identical to the PyTorch
path of ``speclora_kernels.ops`` (which calls :func:`forward` / :func:`backward` for CPU
tensors).

:func:`load` compiles ``csrc/*.cpp`` with ``torch.utils.cpp_extension`` (ninja) the first
time these sources are used on a machine, saying so at WARNING level, into a cache folder
named by a hash of the sources and build settings (:mod:`.builder`), then loads the library
as ``torch.ops.speclora_cpu``; later processes, and other installs with the same sources,
load that build. ``python -m speclora_kernels.build`` builds it ahead of time. Without a C++
compiler or ninja :func:`load` warns once, in one line, and returns False; with
``SPECLORA_DISABLE_CPP=1`` it returns False silently. Either way every function below still
works, on the pure-PyTorch path (:mod:`.fallback`).

Environment:
    SPECLORA_DISABLE_CPP=1   never build or load the C++ backend.
    SPECLORA_CPU_ISA         cap the kernels' instruction set: ``avx2`` or ``portable``
                             (default: the best this CPU runs, AVX-512 > AVX2 > portable).
    TORCH_EXTENSIONS_DIR     cache root (default ``$XDG_CACHE_HOME/speclora_kernels`` or
                             ``~/.cache/speclora_kernels``).
    CXX                      the compiler (default ``c++``); part of the build's key.
    MAX_JOBS                 parallel compile jobs (ninja), as for any torch extension.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

from ..quant.nf4 import NF4Weight, decode_dtype
from . import builder, fallback
from .builder import build_directory, source_directory

__all__ = ["load", "is_available", "build_directory", "source_directory", "isa", "adapter_forward",
           "adapter_backward", "keep_mask", "forward", "backward"]

_lock = threading.Lock()
_state: dict = {"loaded": None}


def _disabled() -> bool:
    return os.environ.get("SPECLORA_DISABLE_CPP", "").strip().lower() not in ("", "0", "false", "no")


def load(verbose: bool = False) -> bool:
    """Build (first time for these sources) and load the C++ ops; True when
    ``torch.ops.speclora_cpu`` is ready.

    Thread-safe; the outcome is remembered for the process. Failure is not an error: it warns
    once (one line) and the callers below use the PyTorch path.
    """
    if _state["loaded"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        if _disabled():
            _state["loaded"] = False
            return False
        try:
            reason = builder.build_and_load(verbose)
        except Exception as exc:  # compiler/linker failure: fall back, say why
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            reason = f"build failed: {lines[-1][:200]}"
        if reason is not None:
            warnings.warn(f"speclora_kernels: C++ CPU backend unavailable ({reason}); "
                          "using the PyTorch path", RuntimeWarning, stacklevel=2)
        _state["loaded"] = reason is None
        return _state["loaded"]


def is_available() -> bool:
    """True when the C++ ops are built and loaded (builds them on first call)."""
    return load()


def isa(name: str | None = None) -> str | None:
    """Instruction set the C++ kernels use (``avx512``, ``avx2``, ``portable``); with ``name``,
    switch to it first (ValueError if this CPU/build lacks it). None without the backend."""
    if not load():
        return None
    return torch.ops.speclora_cpu.isa(name)


def _native(x: torch.Tensor, weight) -> bool:
    if x.device.type != "cpu" or not load():
        return False
    if isinstance(weight, NF4Weight):
        return x.dtype != torch.float64 and weight.device.type == "cpu"
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return weight.device.type == "cpu" and (
        weight.dtype == acc or (weight.dtype in (torch.float16, torch.bfloat16) and acc == torch.float32))


def _nf4_args(w: NF4Weight, nf4_dtype) -> tuple:
    return (w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.blocksize, w.nested_blocksize,
            w.out_features, w.dtype if nf4_dtype is None else nf4_dtype)


def adapter_forward(x, weight, bias, down, scale, up, keep=None, dropout_p: float = 0.0,
                    dropout_rows: int = 0, save_t: bool = True, nf4_dtype=None):
    """``(y, t)`` for 2-D ``x`` (M, in); ``weight`` is a dense (out, in) tensor or an ``NF4Weight``,
    whose decoded values are rounded to ``nf4_dtype`` (default: the weight's own dtype).

    ``keep``: bool keep-mask shaped like ``x`` (from :func:`keep_mask` or ``dropout_keep_mask``)
    applied with ``1 / (1 - dropout_p)`` to the input of the first ``dropout_rows`` rows of
    ``down``; None means no dropout. ``t = x' @ down.T`` (fp32, fp64 for fp64 x) is returned
    when ``save_t`` (else an empty (0, R) tensor). Not differentiable by itself: the autograd
    Function calls :func:`adapter_backward`.
    """
    if not _native(x, weight):
        return fallback.forward(x, weight, bias, down, scale, up, keep, dropout_p, dropout_rows, save_t,
                                nf4_dtype)
    if isinstance(weight, NF4Weight):
        return torch.ops.speclora_cpu.nf4_fwd(x, *_nf4_args(weight, nf4_dtype), bias, down, scale, up, keep,
                                              float(dropout_p), int(dropout_rows), bool(save_t))
    return torch.ops.speclora_cpu.dense_fwd(x, weight, bias, down, scale, up, keep,
                                            float(dropout_p), int(dropout_rows), bool(save_t))


def adapter_backward(dy, x, weight, down, scale, up, t, keep=None, dropout_p: float = 0.0,
                     dropout_rows: int = 0, grad_rows: int | None = None, need_dx: bool = True,
                     need_ddown: bool = True, need_dscale: bool = True, need_dup: bool = True,
                     nf4_dtype=None):
    """``(dx, d_down, d_scale, d_up)``; a gradient not asked for is an empty tensor.

    Only the first ``grad_rows`` rows of ``down`` / columns of ``up`` get gradient (the rest
    zeros); ``t`` is the forward's (needed for ``d_scale`` and ``d_up``).
    """
    grad_rows = down.shape[0] if grad_rows is None else int(grad_rows)
    args = (t, keep, float(dropout_p), int(dropout_rows), grad_rows, bool(need_dx),
            bool(need_ddown), bool(need_dscale), bool(need_dup))
    if not _native(x, weight):
        return fallback.backward(dy, x, weight, down, scale, up, *args, nf4_dtype)
    if isinstance(weight, NF4Weight):
        return torch.ops.speclora_cpu.nf4_bwd(dy, x, *_nf4_args(weight, nf4_dtype), down, scale, up,
                                              *args)
    return torch.ops.speclora_cpu.dense_bwd(dy, x, weight, down, scale, up, *args)


def keep_mask(seed, shape, p: float, device=None) -> torch.Tensor:
    """Dropout keep-mask for an input of 2-D ``shape``, bit-identical to
    ``dropout.dropout_keep_mask(seed, shape, p)`` (Philox, as the Triton kernels draw it)."""
    rows, cols = (int(s) for s in shape)
    if torch.device(device or "cpu").type == "cpu" and load():
        return torch.ops.speclora_cpu.keep_mask(int(seed), rows, cols, float(p))
    from ..dropout import dropout_keep_mask

    return dropout_keep_mask(seed, (rows, cols), p, device=device)


# ---- the op's CPU path (ops/autograd.py): a seed instead of a mask
def _seeded_keep(seed, x, dropout_p, dropout_rows):
    return keep_mask(seed, x.shape, dropout_p, x.device) if seed is not None and dropout_rows > 0 else None


def forward(x, weight, bias, down, scale, up, seed, dropout_p, dropout_rows, save_t):
    """``(y, t)`` as the op's custom forward returns them; dropout iff ``seed`` is
    given and ``dropout_rows > 0``. An NF4 base is decoded to x's dtype, as the kernels
    round their tiles."""
    keep = _seeded_keep(seed, x, dropout_p, dropout_rows)
    return adapter_forward(x, weight, bias, down, scale, up, keep, dropout_p,
                           dropout_rows if keep is not None else 0, save_t,
                           decode_dtype(x.dtype))


def backward(dy, x, weight, down, scale, up, t, seed, dropout_p, dropout_rows, grad_rows, need_dx,
             need_ddown, need_dscale, need_dup):
    """``(dx, d_down, d_scale, d_up)`` as the op's custom backward returns them."""
    keep = _seeded_keep(seed, x, dropout_p, dropout_rows)
    return adapter_backward(dy, x, weight, down, scale, up, t, keep, dropout_p,
                            dropout_rows if keep is not None else 0, grad_rows, need_dx,
                            need_ddown, need_dscale, need_dup, decode_dtype(x.dtype))
