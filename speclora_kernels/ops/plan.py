"""Which kernels a call runs, and why: the fused, segmented or split path per shape.

Shapes as in the kernels: x (M, K), W (N, K), rank R. The forward streams W with output
width N; dx streams it with output width K (same rules, ``N`` and ``K`` swapped).

- fused (1 launch, small M): the GEMM's K-loop also accumulates the (M x R) projection in
  registers, recomputed by every column tile;
- segmented (1 launch, large M, opt-in): programs own a row block and a segment of column
  tiles and compute the projection once per segment;
- split (2 launches): a projection kernel, then the GEMM reads it in its epilogue.

``forced_plan`` makes every launch take one path (tests at small shapes, the counted
benchmarks' extrapolation at reduced M). The figures are those of ``hardware.H100``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Optional

import torch
import triton

from ..hardware import H100

FUSED_MAX_RANK = 64          # the fused t / g accumulator lives in registers (BLOCK_M x R)
COMPUTE_BOUND_ROWS = 512     # from here on the GEMM is compute-bound: always split
FUSED_DROPOUT_ROWS = 128     # fused forward with dropout only below this many rows
SEGMENT_BLOCK_M = 64         # row tile of the segmented kernels (128-row tiles spill beside t)
SEGMENT_RANK_WIDTHS = 20     # a segment spans >= 20 rank blocks: recomputing t costs <= 5%
WAVES = 2                    # programs per SM the segmented kernels need to keep a GPU busy
SEGMENTED_ENV = "SPECLORA_SEGMENTED"  # "1": large M may take the segmented kernels
TRITON_VERSION = tuple(int(v) for v in triton.__version__.split(".")[:2])
# Up to here NF4 is decoded in registers (one row tile covers M, so each element once);
# above, once per call into a copy. Triton before 3.9 cannot build the 64-row tiles of the
# 16-bit NF4 forward and dx on sm_90 ("Illegal shared layout; expected collapsed
# shapePerCTA to be at least [8, 64]" in TritonGPUOptimizeDotOperands: compile_report on
# 3.6); 32-row tiles build on every supported version.
NF4_REGISTER_ROWS = 64 if TRITON_VERSION >= (3, 9) else 32
NF4_REGISTER_ROWS_FP32 = 32  # fp32 activations: the 64-row NF4 dx tiles do not compile with
                             # TF32 on sm_90 (Triton's dot-operand pass fails; compile_report)
SPLITK_MAX_ROWS = 16         # split-K decode: one 16-row tile of x
SPLITK_BLOCK_M = 16
SPLITK_WIDTHS = (256, 128, 64, 32)   # column tiles it may take
SPLITK_MIN_SLICE = 64        # columns of K per split, at least (one BLOCK_K step)
PATHS = ("fused", "segmented", "split", "splitk")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The path of one GEMM launch (forward or dx): segments of a segmented launch; splits
    of K and the column tile of a split-K decode launch."""

    path: str
    segments: int = 0
    splits: int = 0
    block_n: int = 0

    @property
    def rank_in_kernel(self) -> bool:
        """The projection (t or g) is computed inside the GEMM kernel (no projection launch)."""
        return self.path != "split"


_forced: Optional[Plan] = None


@contextlib.contextmanager
def forced_plan(path: str, segments: int = 2, splits: int = 2, block_n: int = 32):
    """Every launch in the block takes ``path`` ("fused", "segmented" with ``segments``
    column segments, "split", or for a forward at M <= 16 "splitk" with ``splits`` slices of
    K and ``block_n``-wide column tiles) where the rank fits that path at all (R <= the
    base's fused rank cap; otherwise split). Launches a path does not serve (dx on
    "splitk") take "fused"."""
    global _forced
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    for name, value in (("segments", segments), ("splits", splits), ("block_n", block_n)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    plan = {"segmented": Plan(path, segments=segments),
            "splitk": Plan(path, splits=splits, block_n=block_n)}.get(path, Plan(path))
    previous, _forced = _forced, plan
    try:
        yield
    finally:
        _forced = previous


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (host code: ``triton.cdiv`` is a JIT function, slow to call)."""
    return -(-a // b)


def forced_state() -> Optional[Plan]:
    """The plan ``forced_plan`` imposes now, if any (part of the launch recipes' keys)."""
    return _forced


def pow2(n: int, lo: int = 16) -> int:
    """The next power of two of ``n``, at least ``lo``."""
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


def rank_block(R: int, cap: int) -> int:
    """BLOCK_R for rank R: its power of two, at most ``cap``."""
    return min(cap, pow2(R))


def fused_rank_limit(block_n: int) -> int:
    """Largest R the fused path takes with column tiles ``block_n`` wide: every tile
    re-reads D, R/block_n of W's bytes; keep that under W/4."""
    return block_n // 4


def use_fused_path(M: int, N: int, K: int, R: int, dropout: bool = False) -> bool:
    """One fused launch, or the split (low-rank projection kernel, then a GEMM with the
    low-rank epilogue)?  ``N`` is the output width of the GEMM, ``K`` its reduction.

    Fused recomputes the (M x R) projection in every N-tile: BLOCK_R/BLOCK_N extra FLOPs
    (tl.dot pads R to BLOCK_R >= 16) and R/BLOCK_N of W in D re-reads. Split pays one more
    launch and a second read of x (plus the small fp32 t round trip); its FLOPs stay at the
    floor, its unique bytes exceed the floor by x's size. So:

    - never fused for R > 64 (register-resident accumulator) or R > BLOCK_N / 4 at the
      widest tile (D re-reads over W/4);
    - M >= 512 (compute-bound): split; fused would cost >= 16/256 = 6% more FLOPs;
    - M < 512 (decode, short prompts; bound by reading W: 11 us for a 4096^2 bf16 layer):
      fused while recomputing t costs less time at peak than the launch and x re-read
      the split adds (4096^2: every M < 512 for R = 16, M <= 257 for R = 32, M <= 109
      for R = 64);
    - ``dropout`` (forward only): the fused kernel regenerates the keep-mask of its x tiles
      in every column tile (~5 integer multiplies per element and tile) and the mask tile
      adds registers: fused only for M < 128 (4096^2, M = 16: ~0.8 us of Philox).
    """
    if R > FUSED_MAX_RANK or R > fused_rank_limit(min(256, pow2(N))):
        return False
    if M >= COMPUTE_BOUND_ROWS or (dropout and M >= FUSED_DROPOUT_ROWS):
        return False
    recompute = 2 * M * K * R * cdiv(N, 128) / H100.peak_flops
    return recompute <= H100.launch_seconds + 2 * M * K / H100.bandwidth


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (an H100's off-GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else
                         torch.cuda.current_device())
    return H100.sms


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def segment_count(M: int, N: int, R: int, sms: int = H100.sms) -> int:
    """Column segments per row block for the one-launch large-M forward (or dx, N being its
    output width K), or 0 for the split.

    The segmented kernels (``fwd_kernel[SEGMENTED]``, ``dx_kernel[SEGMENTED]``) give each
    program a row block of ``SEGMENT_BLOCK_M`` rows and a segment of consecutive column
    tiles; t = x' @ D.T (g = dy @ U) is computed once per segment, from the x (dy) tiles of
    its first tile's K-loop, and kept in registers for the rest. x (dy) is read by one
    kernel only (the split reads it twice) and t (g) never round-trips through memory; the
    price is ``segments * BLOCK_R / N`` extra FLOPs. So: the fewest segments that still give
    ``WAVES`` programs per SM (several segments per row block also keep the rows in flight
    few enough for L2), only if each segment spans >= ``SEGMENT_RANK_WIDTHS`` rank blocks
    (<= 5% extra FLOPs), only for compute-bound M (>= 512) and register-resident t (R <= 64).

    4096 x 4096, R = 48, 132 SMs: M = 8192 -> 3 segments (384 programs, +4.7% FLOPs over the
    base GEMM); M = 4096 would need 5 (> 4096 / 1280): split; M = 512 would need 33 (or
    leave 108 of 132 SMs idle): split (README, Benchmarks). Row tiles are 64 tall (128-row
    tiles spill registers beside t, tools/compile_report), which doubles the weight's L2
    re-reads against the split's 128 x 256 tiles (3.4 -> 6.7 GB at M = 8192, to save 64 MB
    of DRAM reads), which an H100's L2 may not serve faster than the split runs. So the rule
    applies only with ``SPECLORA_SEGMENTED=1`` until GPU timings (``benchmarks.run --profile
    gpu`` both ways) show it wins; otherwise 0.
    """
    if not segmented_opt_in(M):
        return 0
    if R > FUSED_MAX_RANK:
        return 0
    most = N // (SEGMENT_RANK_WIDTHS * rank_block(R, FUSED_MAX_RANK))
    need = cdiv(WAVES * sms, cdiv(M, SEGMENT_BLOCK_M))
    return need if need <= most else 0


def segmented_opt_in(M: int) -> bool:
    """True if ``SPECLORA_SEGMENTED=1`` lets a launch of ``M`` rows take the segmented
    kernels (only compute-bound M can; the environment is read only for those)."""
    return M >= COMPUTE_BOUND_ROWS and os.environ.get(SEGMENTED_ENV, "").strip() == "1"


def gemm_plan(M: int, N: int, K: int, R: int, *, rank_cap: int, dropout: bool = False,
              sms: int = H100.sms, element_size: int = 2) -> Plan:
    """The path of a GEMM launch with output width ``N`` and reduction ``K`` (the forward;
    dx passes its own width as ``N``). ``rank_cap``: the widest R the base's kernels keep in
    registers (see ``launch.fused_rank_cap``); ``dropout``: the forward regenerates a mask.
    The segmented kernels take 16-bit activations only: every fp32 segmented tile spills
    (t or g beside an fp32 output tile; tools/compile_report)."""
    if R > rank_cap:
        return Plan("split")
    if _forced is not None:
        return _forced if _forced.path != "splitk" else Plan("fused")
    if use_fused_path(M, N, K, R, dropout):
        return Plan("fused")
    segments = segment_count(M, N, R, sms) if element_size == 2 else 0
    return Plan("segmented", segments) if segments else Plan("split")


def forward_plan(M: int, N: int, K: int, R: int, *, rank_cap: int, dropout: bool = False,
                 sms: int = H100.sms, weight_bytes: float, element_size: int,
                 nf4: bool = False, splitk: bool = True) -> Plan:
    """The forward's path: ``gemm_plan``, except at decode (M <= 16), where one program per
    column tile would leave most SMs idle while W streams (a 4096 -> 1024 projection has 16
    column tiles of 64 for 132 SMs): there the split-K kernel runs, with the column tile and
    the number of splits that ``tools.gpu_model`` predicts fastest among those giving
    ``WAVES`` programs per SM. ``splitk``: the base can take it (not the NF4 span decoder,
    whose tiles must stay narrow)."""
    if R > rank_cap:
        return Plan("split")
    if _forced is not None:
        if _forced.path == "splitk" and (M > SPLITK_MAX_ROWS or R > FUSED_MAX_RANK
                                         or not splitk):
            return Plan("fused")
        return _forced
    if M > SPLITK_MAX_ROWS or R > FUSED_MAX_RANK or not splitk:
        return gemm_plan(M, N, K, R, rank_cap=rank_cap, dropout=dropout, sms=sms,
                         element_size=element_size)
    return _decode_plan(M, N, K, R, sms, weight_bytes, element_size, nf4)


@functools.lru_cache(maxsize=4096)
def _decode_plan(M: int, N: int, K: int, R: int, sms: int, weight_bytes: float,
                 element_size: int, nf4: bool) -> Plan:
    """The split-K plan the model predicts fastest (a pure function of the shape: cached)."""
    from ..tools.gpu_model import predict

    def seconds(choice):
        width, splits = choice
        return predict([decode_launch(M, N, K, R, weight_bytes, element_size, nf4, width,
                                      splits)]).seconds

    width, splits = min(splitk_choices(N, K, sms), key=seconds)
    return Plan("splitk", splits=splits, block_n=width)


def splitk_choices(N: int, K: int, sms: int) -> list[tuple[int, int]]:
    """(column tile, splits) pairs a split-K decode launch may take: power-of-two splits of
    at least ``SPLITK_MIN_SLICE`` columns, from the fewest that give ``WAVES`` programs per
    SM up to 4x as many; only if no pair reaches ``WAVES`` (K too short), the most splits K
    allows."""
    most = max(1, K // SPLITK_MIN_SLICE)
    full, short = [], []
    for width in SPLITK_WIDTHS:
        if width > max(pow2(N), SPLITK_WIDTHS[-1]):  # the narrowest takes any N
            continue
        tiles, splits = cdiv(N, width), 1
        while splits <= most and tiles * splits < 4 * WAVES * sms:
            if tiles * splits >= WAVES * sms:
                full.append((width, splits))
            splits *= 2
        short.append((width, min(splits, most)))
    return full or short


def split_slice(K: int, splits: int) -> int:
    """Columns of K each split-K program reduces: a multiple of ``SPLITK_MIN_SLICE``."""
    return cdiv(cdiv(K, splits), SPLITK_MIN_SLICE) * SPLITK_MIN_SLICE


def decode_launch(M: int, N: int, K: int, R: int, weight_bytes: float, element_size: int,
                  nf4: bool, block_n: int, splits: int = 0, *, bias: bool = False,
                  block_k: int = 0, stages: int = 0):
    """What a decode forward launch does, as ``tools.gpu_model.Launch``: the one description
    of it, which the plan's choice, ``tools.plan_report`` and ``benchmarks.counted`` all
    predict. The fused kernel (``splits == 0``: one program per ``block_n``-wide column tile)
    or the split-K kernel, K in ``splits`` slices (as the launcher rounds them).

    Distinct bytes: W as stored (``weight_bytes``; NF4 adds the 2 KB level table), x, D, s,
    U, bias, y. Every program reads the x rows and D columns of its slice: re-reads past the
    first come from L2. Each split-K program writes fp32 partials of y and t (``min(M, 16)``
    rows) that the tile's last program reads back: L2 traffic too, never DRAM; and that
    program's reduction loop (runtime-bounded, neither unrolled nor pipelined) waits one L2
    round trip per partial after the arrival count's: ``splits + 1`` after the W stream.
    With the config known (``block_k``, ``stages``), a program keeps ``stages - 1`` K steps
    of its x, W and D tiles in flight (Little's law's bytes); else the model's default."""
    from ..tools.floors import NF4_DECODE_TABLE_BYTES
    from ..tools.gpu_model import Launch, nf4_gathers

    tiles = cdiv(N, block_n)
    rank = rank_block(R, FUSED_MAX_RANK)
    splits = cdiv(K, split_slice(K, splits)) if splits else 0
    x, d = M * K * element_size, R * K * element_size
    distinct = (weight_bytes + (NF4_DECODE_TABLE_BYTES if nf4 else 0) + x + d + 4 * R
                + (N * R + M * N + (N if bias else 0)) * element_size)
    reread = (tiles - 1) * (x + d)
    if splits:
        reread += 2 * tiles * splits * min(M, SPLITK_BLOCK_M) * (block_n + rank) * 4
    flight = None
    if block_k:
        w_element = weight_bytes / (N * K)
        step = block_k * ((SPLITK_BLOCK_M + rank) * element_size + block_n * w_element)
        flight = max(stages - 1, 1) * step
    # as issued: tl.dot multiplies the whole 16-row tile whatever M (x @ W.T, x @ D.T per
    # tile, t @ (s U).T in the epilogue)
    flops = 2 * SPLITK_BLOCK_M * (K * N + K * rank * tiles + rank * N)
    decoded = N * K if nf4 else 0
    return Launch("fwd_splitk" if splits else "fwd", tiles * max(splits, 1), distinct, reread,
                  flops, decoded, nf4_gathers(decoded), splits + 1 if splits else 0, flight)


FACTOR_SPLIT_ROWS = 128      # rows of a factor-gradient slice: a multiple of every BLOCK_M
FACTOR_MIN_TILE = 64         # the factor kernel's narrowest and widest output tiles (BLOCK_C)
FACTOR_MAX_TILE = 128


def factor_outputs(N: int, K: int, R: int, block_r: int, ds: bool) -> int:
    """Output tiles of the factor-gradient launch at its narrowest tile, i.e. the most it
    can have: dU (N x R) and dD.T (K x R) tiles, and the ds tiles (``N``/``K`` 0 when that
    gradient is not needed)."""
    tiles_r = cdiv(R, block_r)
    columns = cdiv(N, FACTOR_MIN_TILE) + cdiv(K, FACTOR_MIN_TILE) + int(ds)
    return columns * tiles_r


def factor_splits(M: int, outputs: int, sms: int = H100.sms) -> int:
    """Slices of rows each factor-gradient output tile is reduced in: 1 below
    ``COMPUTE_BOUND_ROWS``; else the fewest powers of two (slices of at least
    ``FACTOR_SPLIT_ROWS`` rows) that give ``WAVES`` programs per SM at the widest tiles (which
    have about half the outputs of the narrowest)."""
    if M < COMPUTE_BOUND_ROWS:
        return 1
    splits, most = 1, max(1, M // FACTOR_SPLIT_ROWS)
    while splits < most and splits * outputs // 2 < WAVES * sms:
        splits *= 2
    return min(splits, most)
