"""Byte and FLOP floors of the adapter op, the PEFT LoRA op sequence, and predicted H100 times.

The op: ``y = x @ W.T + bias + ((x @ D.T) * s) @ U.T`` with ``x`` (M x in), ``W`` (out x in),
``D`` (R x in), ``s`` (R), ``U`` (out x R). A floor reads every input once and writes every
output once; FLOPs count matmuls only (``2*m*n*k``), like the interpreter counter's
``dot_flops``. Element sizes come from torch dtypes or plain byte counts; ``weight_bytes``
overrides the size of ``W`` (NF4: see :func:`nf4_weight_bytes`).

Every time here is a *prediction* from the measured H100 ceilings of
``speclora_kernels.hardware``, never a measurement; :class:`Prediction` says so when printed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ..hardware import H100

Dtype = Union[torch.dtype, int, float]

BANDWIDTH = H100.bandwidth
"""Bytes/s: measured H100 device-memory copy (``hardware.H100``)."""
PEAK_FLOPS = H100.peak_flops
"""FLOP/s: measured H100 bf16 dense matmul (``hardware.H100``); fp32 operands run slower."""
LAUNCH_OVERHEAD = H100.launch_seconds
"""Seconds per kernel launch: an assumption (back-to-back launches on one stream, no CUDA
graph), not a measurement here; pass ``launch_overhead`` to change it."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A predicted H100 time: ``max(bytes/BW, flops/peak) + launches * overhead``."""

    seconds: float
    bound: str  # "memory" or "compute"
    launch_seconds: float
    label: str = "predicted"

    @property
    def us(self) -> float:
        return self.seconds * 1e6

    def __str__(self) -> str:
        return (f"{self.us:.2f} us {self.label} H100 ({self.bound}-bound, "
                f"{self.launch_seconds * 1e6:.1f} us of it launches)")


def predict_h100(bytes_moved: int, flops: int, launches: int = 1, *, bandwidth: float = BANDWIDTH,
                 peak_flops: float = PEAK_FLOPS, launch_overhead: float = LAUNCH_OVERHEAD) -> Prediction:
    """Predicted H100 time of work moving ``bytes_moved`` and issuing ``flops`` in ``launches`` kernels."""
    for name, v in (("bytes_moved", bytes_moved), ("flops", flops), ("launches", launches)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    mem, comp = bytes_moved / bandwidth, flops / peak_flops
    launch = launches * launch_overhead
    return Prediction(max(mem, comp) + launch, "memory" if mem >= comp else "compute", launch)


def predict_h100_serial(parts: Iterable[Tuple[int, int, int]], **kwargs) -> Prediction:
    """Predicted H100 time of kernels that run one after another, from ``(bytes, flops, launches)``.

    Each kernel is bound by its own bytes or FLOPs; a memory-bound kernel does not hide
    behind a compute-bound one, so the sum of per-kernel times, not the max of sums.
    """
    preds = [predict_h100(b, f, n, **kwargs) for b, f, n in parts]
    bounds = {p.bound for p in preds}
    return Prediction(sum(p.seconds for p in preds), bounds.pop() if len(bounds) == 1 else "mixed",
                      sum(p.launch_seconds for p in preds))


@dataclasses.dataclass(frozen=True)
class Cost:
    """Bytes read and written, matmul FLOPs and kernel launches of some work."""

    bytes_read: int
    bytes_written: int
    flops: int
    launches: int = 1

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.bytes_read + other.bytes_read, self.bytes_written + other.bytes_written,
                    self.flops + other.flops, self.launches + other.launches)

    def predicted_h100(self, **kwargs) -> Prediction:
        """As one kernel: bytes and FLOPs overlap. For an op sequence use :func:`predict_ops`."""
        return predict_h100(self.bytes, self.flops, self.launches, **kwargs)


@dataclasses.dataclass(frozen=True)
class Op:
    """One kernel of an op sequence, e.g. a step of PEFT's unfused LoRA forward."""

    name: str
    bytes_read: int
    bytes_written: int
    flops: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def total_cost(ops: Iterable[Op]) -> Cost:
    """Sum of an op sequence, one launch per op (predict its time with :func:`predict_ops`)."""
    ops = list(ops)
    return Cost(sum(o.bytes_read for o in ops), sum(o.bytes_written for o in ops), sum(o.flops for o in ops),
                len(ops))


def predict_ops(ops: Iterable[Op], **kwargs) -> Prediction:
    """Predicted H100 time of an op sequence: each op alone, one launch each, summed."""
    return predict_h100_serial(((o.bytes, o.flops, 1) for o in ops), **kwargs)


def _size(dtype: Dtype, name: str) -> float:
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if isinstance(dtype, (int, float)) and not isinstance(dtype, bool) and dtype > 0:
        return dtype
    raise TypeError(f"{name} must be a torch.dtype or a positive byte count, got {dtype!r}")


def _dims(**dims: int) -> None:
    for name, v in dims.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")


def _weight_bytes(out_features, in_features, dtype, weight_dtype, weight_bytes) -> int:
    if weight_bytes is not None:
        _dims(weight_bytes=weight_bytes)
        return weight_bytes
    return math.ceil(out_features * in_features * _size(weight_dtype or dtype, "weight_dtype"))


NF4_DECODE_TABLE_BYTES = 256 * 8
"""The kernels' NF4 decode table (``quant.nf4_level_pairs``: two fp32 levels per byte value),
read by every NF4 launch besides the weight's own bytes."""


def nf4_weight_bytes(out_features: int, in_features: int, *, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of a bitsandbytes NF4 weight: packed codes plus scales (bitsandbytes layout:
    one absmax per block, doubly quantized).

    Without double quant: one fp32 absmax per block. With it: one uint8 absmax per block,
    one fp32 ``absmax2`` per 256 blocks, the 256-entry fp32 code map and the fp32 offset.
    """
    _dims(out_features=out_features, in_features=in_features, blocksize=blocksize)
    n = out_features * in_features
    blocks = math.ceil(n / blocksize)
    scales = blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 if double_quant else 4 * blocks
    return math.ceil(n / 2) + scales


def forward_floor(m: int, in_features: int, out_features: int, rank: int, *, dtype: Dtype = torch.bfloat16,
                  weight_dtype: Optional[Dtype] = None, weight_bytes: Optional[int] = None,
                  factor_dtype: Optional[Dtype] = None, bias: bool = True) -> Cost:
    """Floor of the forward op: read x, W, bias, D, s, U once, write y once; one launch.

    ``dtype`` is the activation (x, y, bias) dtype; ``factor_dtype`` (D, s, U) and
    ``weight_dtype`` default to it; ``weight_bytes`` replaces W's size (NF4 + scales).
    FLOPs: ``2*M*(in*out + in*R + R*out)``.
    """
    _dims(m=m, in_features=in_features, out_features=out_features, rank=rank)
    a, f = _size(dtype, "dtype"), _size(factor_dtype or dtype, "factor_dtype")
    w = _weight_bytes(out_features, in_features, dtype, weight_dtype, weight_bytes)
    read = m * in_features * a + w + (out_features * a if bias else 0) + (rank * in_features + rank
                                                                           + out_features * rank) * f
    written = m * out_features * a
    flops = 2 * m * (in_features * out_features + in_features * rank + rank * out_features)
    return Cost(math.ceil(read), math.ceil(written), flops)


def backward_floor(m: int, in_features: int, out_features: int, rank: int, *, grad_down_rows: int = 0,
                   grad_scale: int = 0, grad_up_cols: int = 0, dtype: Dtype = torch.bfloat16,
                   weight_dtype: Optional[Dtype] = None, weight_bytes: Optional[int] = None,
                   factor_dtype: Optional[Dtype] = None, saved_dtype: Optional[Dtype] = None) -> Cost:
    """Floor of the backward op: ``dx`` plus the factor gradients that are needed; one launch.

    ``grad_down_rows`` rows of D, ``grad_scale`` entries of s and ``grad_up_cols`` columns
    of U receive gradient (0 = frozen). Reads dy, W, D, s, U always (``dx = dy @ W +
    ((dy @ U) * s) @ D``); x only if dD is needed; the saved ``t = x @ D.T`` (``saved_dtype``,
    default ``dtype``) only for the ranks dU or ds need, taken as the leading U columns plus
    the trailing s entries (SpecLoRA's layout), at most R. Writes dx, dD, ds, dU.
    FLOPs: ``2*M*(out*in + out*R + R*in)`` for dx, ``2*M*rows*in`` for dD, ``2*M*out*cols``
    for dU, ``2*M*entries`` for ds.
    """
    _dims(m=m, in_features=in_features, out_features=out_features, rank=rank, grad_down_rows=grad_down_rows,
          grad_scale=grad_scale, grad_up_cols=grad_up_cols)
    for name, v in (("grad_down_rows", grad_down_rows), ("grad_scale", grad_scale), ("grad_up_cols", grad_up_cols)):
        if v > rank:
            raise ValueError(f"{name} must be <= rank ({rank}), got {v}")
    a, f = _size(dtype, "dtype"), _size(factor_dtype or dtype, "factor_dtype")
    t_size = _size(saved_dtype or dtype, "saved_dtype")
    w = _weight_bytes(out_features, in_features, dtype, weight_dtype, weight_bytes)
    t_cols = min(rank, grad_up_cols + grad_scale)
    read = (m * out_features * a + w + (rank * in_features + rank + out_features * rank) * f
            + (m * in_features * a if grad_down_rows else 0) + m * t_cols * t_size)
    written = m * in_features * a + (grad_down_rows * in_features + grad_scale + out_features * grad_up_cols) * f
    flops = (2 * m * (out_features * in_features + out_features * rank + rank * in_features)
             + 2 * m * grad_down_rows * in_features + 2 * m * out_features * grad_up_cols + 2 * m * grad_scale)
    return Cost(math.ceil(read), math.ceil(written), flops)


# PEFT 0.21.2's unfused LoRA forward, read from the installed sources:
# - peft/tuners/lora/layer.py, Linear.forward (lines 1074-1115): line 1088
#   `result = self.base_layer(x, ...)` (one GEMM with bias); line 1100 `_cast_input_dtype`
#   (no-op when x already has lora_A's dtype, tuners_utils.py 2233-2234); line 1102
#   `result = result + lora_B(lora_A(dropout(x))) * scaling`: dropout, two bias-free
#   nn.Linear (lines 263-264), a multiply by the float `scaling`, an add; line 1113
#   `result.to(torch_result_dtype)` is a no-op at equal dtypes. Dropout is nn.Identity
#   when lora_dropout == 0 (lines 255-258) and returns x unchanged in eval mode.
# - peft/tuners/lora/bnb.py, Linear4bit.forward (lines 513-567): line 527 base layer,
#   line 533 `result = result.clone()`, line 549 `output = lora_B(lora_A(dropout(x))) *
#   scaling`, line 552 `result = result + output`.
# - bitsandbytes 0.50.2: nn/modules.py line 637 `bnb.matmul_4bit(...)`, which calls
#   `torch.ops.bitsandbytes.gemm_4bit` for inference and training (autograd/_functions.py
#   323-346, 457-490). On CUDA (backends/cuda/ops.py 934-981) M <= 4 always takes the fused
#   4-bit kernel (line 600), M > 512 always the fallback (lines 677, 954), which
#   (lines 904-916) dequantizes the nested absmax (8-bit blockwise -> fp32), adds the offset,
#   dequantizes the whole weight to x's dtype, then runs F.linear. In between, the choice
#   depends on GPU and shape (`_gemm_4bit_use_custom_cuda`, lines 584-770).
# - torch's dropout in training writes its output and a 1-byte bool keep-mask.
def peft_lora_forward_ops(m: int, in_features: int, out_features: int, rank: int, *,
                          dtype: Dtype = torch.bfloat16, bias: bool = True, dropout: float = 0.0,
                          training: bool = True, weight: str = "dense", weight_dtype: Optional[Dtype] = None,
                          bnb_path: str = "auto", blocksize: int = 64, double_quant: bool = True) -> List[Op]:
    """The kernels PEFT's unfused LoRA forward runs, each with its bytes and matmul FLOPs.

    LoRA weights are assumed to have x's dtype (PEFT then casts nothing). ``weight`` is
    ``"dense"`` (``weight_dtype``, default ``dtype``) or ``"nf4"`` (bitsandbytes Linear4bit;
    ``bnb_path`` ``"fused"``: bnb's 4-bit GEMM kernel, ``"dequant"``: dequantize then GEMM,
    ``"auto"``: what bnb 0.50 picks where that doesn't depend on the GPU: fused for M <= 4,
    dequant for M > 512, else ValueError). Dropout runs only if ``dropout > 0`` and training.
    """
    _dims(m=m, in_features=in_features, out_features=out_features, rank=rank)
    a = _size(dtype, "dtype")
    x, y = m * in_features * a, m * out_features * a
    b = out_features * a if bias else 0
    base_flops = 2 * m * in_features * out_features
    ops: List[Op] = []
    if weight == "dense":
        w = out_features * in_features * _size(weight_dtype or dtype, "weight_dtype")
        ops.append(Op("base linear x@W.T+b", x + w + b, y, base_flops))
    elif weight == "nf4":
        if bnb_path == "auto":
            if m <= 4 and in_features % blocksize == 0:
                bnb_path = "fused"
            elif m > 512 or in_features % blocksize:
                bnb_path = "dequant"
            else:
                raise ValueError(f"bnb_path='auto' is GPU- and shape-dependent for m={m} (5..512): "
                                 "pass bnb_path='fused' or 'dequant'")
        if bnb_path == "fused":
            ops.append(Op("bnb gemm_4bit (fused NF4)",
                          x + nf4_weight_bytes(out_features, in_features, blocksize=blocksize,
                                               double_quant=double_quant) + b, y, base_flops))
        elif bnb_path == "dequant":
            n = out_features * in_features
            blocks = math.ceil(n / blocksize)
            if double_quant:
                ops.append(Op("bnb dequantize absmax", blocks + 4 * math.ceil(blocks / 256) + 4 * 256, 4 * blocks))
                ops.append(Op("absmax + offset", 4 * blocks + 4, 4 * blocks))
            ops.append(Op("bnb dequantize_4bit (full W)", math.ceil(n / 2) + 4 * blocks, n * a))
            ops.append(Op("base linear x@W.T+b", x + n * a + b, y, base_flops))
        else:
            raise ValueError(f"bnb_path must be 'auto', 'fused' or 'dequant', got {bnb_path!r}")
        ops.append(Op("result.clone()", y, y))
    else:
        raise ValueError(f"weight must be 'dense' or 'nf4', got {weight!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout > 0 and training:
        ops.append(Op("dropout(x)", x, x + m * in_features))
    ops += [
        Op("lora_A x@A.T", x + rank * in_features * a, m * rank * a, 2 * m * in_features * rank),
        Op("lora_B h@B.T", m * rank * a + out_features * rank * a, y, 2 * m * rank * out_features),
        Op("* scaling", y, y),
        Op("result + lora", 2 * y, y),
    ]
    return [dataclasses.replace(o, bytes_read=math.ceil(o.bytes_read), bytes_written=math.ceil(o.bytes_written))
            for o in ops]


def format_ops(ops: Sequence[Op]) -> str:
    """A printable table of an op sequence: bytes, FLOPs and predicted H100 time per op, and the total."""
    total = total_cost(ops)
    rows = [(o.name, o.bytes_read, o.bytes_written, o.flops, predict_h100(o.bytes, o.flops).us) for o in ops]
    rows.append(("total", total.bytes_read, total.bytes_written, total.flops, predict_ops(ops).us))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'op':<{width}}  {'read MB':>10}  {'write MB':>10}  {'GFLOP':>10}  {'predicted H100 us':>17}"]
    lines += [f"{n:<{width}}  {r / 1e6:>10.3f}  {w / 1e6:>10.3f}  {f / 1e9:>10.3f}  {us:>17.2f}"
              for n, r, w, f, us in rows]
    return "\n".join(lines)


def compare(rows: Sequence[Tuple[str, Union[Cost, Sequence[Op]]]]) -> str:
    """A printable table of named costs (a fused kernel's :class:`Cost`, a floor, or an op
    sequence such as PEFT's) with predicted H100 times; op sequences are predicted per op."""
    width = max(len(n) for n, _ in rows)
    lines = [f"{'':<{width}}  {'MB':>10}  {'GFLOP':>10}  {'launches':>8}  {'predicted H100 us':>17}"]
    for name, c in rows:
        pred = c.predicted_h100() if isinstance(c, Cost) else predict_ops(c)
        c = c if isinstance(c, Cost) else total_cost(c)
        lines.append(f"{name:<{width}}  {c.bytes / 1e6:>10.3f}  {c.flops / 1e9:>10.3f}  {c.launches:>8}  "
                     f"{pred.us:>17.2f}")
    return "\n".join(lines)
