"""The GPU figures every plan and prediction in this library uses, defined once.

``H100`` is the part the kernels are planned for (an H100 SXM: 132 SMs). Its bandwidth and
matmul rate are measured ceilings of one such card (a large device-to-device copy, and an
8192^3 bf16 ``torch.matmul``), not datasheet figures (3.35 TB/s and 989 TFLOP/s): real
kernels reach the measured ones, never the datasheet's. The launch cost is an assumption:
back-to-back launches on one stream, no CUDA graph, the GPU-side gap between dependent
kernels. Shared memory per block is the datasheet figure (CUDA C Programming Guide,
compute capability 9.0: 227 KB opt-in per block): the tools that plan an H100's configs
off-GPU prune them by it. Everything computed from these figures is a prediction and says so.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GPU:
    """What a time prediction needs to know about a GPU."""

    name: str
    sms: int
    bandwidth: float        # bytes/s, device-memory copy (bytes read + written)
    peak_flops: float       # FLOP/s, dense bf16 matmul
    launch_seconds: float   # per kernel launch
    smem_per_block: int = 227 * 1024  # bytes of shared memory one block may use


H100 = GPU(name="H100 SXM", sms=132, bandwidth=3.0e12, peak_flops=8.0e14, launch_seconds=2e-6)
