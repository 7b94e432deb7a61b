"""Autotune configs of the four kernels, the rules that prune them, and ``TunedKernel``.

Every launch goes through a ``TunedKernel`` (``FWD``, ``PROJ``, ``DX``, ``FACTOR``): its
configs are pruned by shape fit (row tiles no taller than the problem, register budgets
measured with ``tools.compile_report``) and by a shared-memory estimate against the device
limit. ``record_launches`` sees every launch (and with ``dry_run`` runs none: plans on
"meta" tensors); ``restricted_configs`` narrows a kernel's configs (tests).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading

import torch
import triton
import triton.testing

from .kernels.backward import dx_kernel, factor_grad_kernel
from .kernels.dequant import dequant_kernel
from .kernels.forward import fwd_kernel, fwd_splitk_kernel, proj_kernel
from .plan import SEGMENT_BLOCK_M, cdiv, fused_rank_limit, pow2, sm_count

# True when kernels run in the Triton interpreter (TRITON_INTERPRET=1 at import).
INTERPRET = bool(triton.knobs.runtime.interpret)


def _gemm_configs(out: str, red: str) -> list[triton.Config]:
    """Tiles for the two GEMM-shaped kernels (output tile BLOCK_M x ``out``, reduction ``red``)."""
    tiles = [
        # (BLOCK_M, out, red, GROUP_M, warps, stages)
        # small M (decode, short prompts): one row tile, wide column tiles so that the
        # per-tile re-reads of x and D stay a small fraction of W
        (16, 64, 128, 1, 4, 4),
        (16, 128, 128, 1, 8, 3),
        (16, 256, 64, 1, 8, 3),
        (32, 64, 64, 1, 8, 4),  # at 4 warps the NF4 span decoder spills 16-176 bytes
        (32, 128, 64, 1, 4, 4),
        (64, 64, 64, 8, 4, 4),
        (64, 128, 32, 8, 4, 4),
        (64, 128, 64, 8, 8, 3),  # segmented forward with dropout: t beside the accumulator
        # large M (training, prefill): tensor-core tiles (wgmma on sm_90)
        (64, 256, 64, 8, 8, 3),
        (128, 64, 64, 8, 4, 4),
        (128, 128, 32, 8, 8, 4),
        (128, 128, 64, 8, 8, 3),
        (128, 256, 64, 8, 8, 3),
    ]
    # 4-byte activations: a 32-deep K step, as fp32 operands take twice the registers and
    # shared memory of 16-bit ones (the 16-bit tiles spill in fp32: tools/compile_report)
    # (32 x 32 x 32: the NF4 span decoder's, 8 warps as it spills at 4; no 128 x 128)
    fp32 = [(16, 64, 32, 1, 4, 3), (16, 128, 32, 1, 8, 3), (16, 256, 32, 1, 8, 3),
            (32, 32, 32, 1, 8, 3), (32, 64, 32, 1, 4, 3), (32, 128, 32, 1, 8, 3),
            (64, 64, 32, 8, 4, 3), (64, 128, 32, 8, 8, 3), (128, 64, 32, 8, 8, 3)]
    return ([triton.Config({"BLOCK_M": bm, out: bo, red: bk, "GROUP_M": gm}, num_warps=w,
                           num_stages=s) for bm, bo, bk, gm, w, s in tiles]
            + _fp32([triton.Config({"BLOCK_M": bm, out: bo, red: bk, "GROUP_M": gm},
                                   num_warps=w, num_stages=s)
                     for bm, bo, bk, gm, w, s in fp32]))


def _fp32(configs: list[triton.Config]) -> list[triton.Config]:
    for c in configs:
        c.serves_fp32 = True  # a mark on the config itself: copies carry it (narrow_configs)
    return configs


def serves_fp32(cfg: triton.Config) -> bool:
    """True for the configs of 4-byte activations (the others serve 16-bit ones)."""
    return getattr(cfg, "serves_fp32", False)


def narrow_configs(configs: list[triton.Config], out: str) -> list[triton.Config]:
    """The configs with 64-wide ``out`` tiles, at 8 warps: what makes the segmented kernels
    take several tiles per segment at small shapes (tests and ``gpu_check`` force them)."""
    narrow = [(triton.Config(c.kwargs, num_warps=8, num_stages=c.num_stages), c)
              for c in configs if c.kwargs[out] == 64]
    return [_fp32([copy])[0] if serves_fp32(c) else copy for copy, c in narrow]


def _dtype_fits(cfg, a, operand: str) -> bool:  # a config serves 16-bit or fp32 activations
    return serves_fp32(cfg) == (a[operand].element_size() == 4)


def _spans(tile: int, dim: int) -> bool:
    """Tiles no wider than the problem, or 64 where it is narrower (one output column)."""
    return tile <= max(pow2(dim), 64)


def _row_block_fits(block_m: int, M: int) -> bool:
    """Row tiles no taller than the problem; above 64 rows no tiny row tiles. A function of
    ``pow2(M)`` only, so every M of a tuning bucket (``m_bucket``) keeps the same configs."""
    rows = pow2(M)
    return block_m <= rows and (rows <= 64 or block_m >= 64)


# Registers per thread an NF4 tile may take (sm_80/90, tools/compile_report): the span
# decoder's decoded weight elements; the row decoder's accumulator plus decoded elements.
NF4_SPAN_ELEMENTS = 32
NF4_ROWS_ELEMENTS = 160


def _nf4_fits(cfg, a, block_out: int, block_n: int, block_k: int, dx: bool) -> bool:
    """NF4 tiles that compile without register spills (tools/compile_report, sm_80 and sm_90).

    ``block_out``: the output tile width (BLOCK_N forward, BLOCK_K dx); the decoded weight
    tile is (block_n, block_k). Span decoder (K not a multiple of the blocksize): at most
    ``NF4_SPAN_ELEMENTS`` decoded weight elements per thread (at decode sizes the 32-row
    tile, see ``_rows_for``); forward at 4 warps, at most 32 accumulator elements per thread
    beside it (64 x 128 x 32 spilled 16 bytes on sm_80 once the epilogue scaled U in fp32).
    Row decoder: fp32 accumulator plus decoded weight elements at
    most ``NF4_ROWS_ELEMENTS`` per thread (drops the 128 x 256 x 64 tile), in dx no
    128 x 128 weight tile whose row segments span two scale blocks (8 bytes of spill on
    sm_80 at 8 warps), in the unfused forward no 16 x 256 tile.
    """
    if not a.get("NF4"):
        return True
    threads = 32 * cfg.num_warps
    # registers per decoded element: 16-bit two to a register, fp32 one, fp32 split into
    # TF32 high and low parts (tf32x3) one and a half
    width = a["y_ptr" if not dx else "dx_ptr"].element_size()
    decoded = block_n * block_k * (1 if width == 2 else 2)
    if not a["NF4_ROWS"]:
        if not dx and cfg.num_warps == 4 and cfg.kwargs["BLOCK_M"] * block_out > 32 * threads:
            return False
        if a["DOT_PRECISION"] == "tf32x3":
            decoded = decoded * 3 // 2
        return decoded <= NF4_SPAN_ELEMENTS * threads
    if dx and block_n >= 128 and block_k >= 128 and block_k > a["NF4_BLOCKSIZE"]:
        return False
    if not dx and not a["FUSE_DOWN"] and cfg.kwargs["BLOCK_M"] == 16 and block_out == 256:
        return False  # spills 8 bytes at 128 registers (sm_80 on triton 3.9, sm_90 on 3.6)
    return cfg.kwargs["BLOCK_M"] * block_out + decoded <= NF4_ROWS_ELEMENTS * threads


def _one_row_tile(cfg, a) -> bool:
    """An NF4 tile is decoded once per row tile: at the M the kernels decode NF4 in
    registers (<= ``plan.NF4_REGISTER_ROWS``), one row tile covers M, so W is decoded once."""
    return not a.get("NF4") or cfg.kwargs["BLOCK_M"] >= min(pow2(_rows_for(a)), 64)


def _rows_for(a) -> int:
    """The M the row-tile rule sees: the NF4 span decoder's only spill-free small tile is 32
    rows tall, so it may run at M <= 16 too."""
    return max(a["M"], 17) if a.get("NF4") and not a["NF4_ROWS"] else a["M"]


def _fwd_fits(cfg, a) -> bool:
    b = cfg.kwargs
    bm, bn, bk = b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_K"]
    ok = (_dtype_fits(cfg, a, "x_ptr") and _row_block_fits(bm, _rows_for(a))
          and _one_row_tile(cfg, a) and _spans(bn, a["N"]) and _spans(bk, a["K"])
          and _nf4_fits(cfg, a, bn, bn, bk, dx=False))
    if a["FUSE_DOWN"] and a["HAS_DROPOUT"]:  # x tile + its keep-mask beside the accumulator
        ok = ok and b["BLOCK_M"] * b["BLOCK_N"] <= 64 * 128
    if a["SEGMENTED"]:  # 8 warps, as dx: at 4, 64 x 64 x 64 spills 16 bytes on sm_80 at R = 16
        return ok and cfg.num_warps == 8 and _segment_tile_fits(cfg, a, b["BLOCK_N"])
    return ok and (not a["FUSE_DOWN"] or a["R"] <= _rank_limit(a, b["BLOCK_N"]))


def _rank_limit(a, block_out: int) -> int:
    """Widest R a fused tile ``block_out`` wide takes; the NF4 span decoder's fp32 tiles are
    32 wide (registers), and the plan caps its fused rank at the 64-wide tile's anyway."""
    return fused_rank_limit(max(block_out, 64) if a.get("NF4") and not a["NF4_ROWS"] else block_out)


def _segment_tile_fits(cfg, a, block_out: int) -> bool:
    """Tiles of a segmented launch: the row tile ``segment_count`` counted programs with,
    and registers per thread for the fp32 output tile, the projection (t or g) and its
    factor operand (counted as R twice) <= 64 beside a keep-mask, <= 80 without; the next
    tiles up spill on sm_80 (e.g. 64 x 64 x 64 at 4 warps, R = 64; tools/compile_report)."""
    b = cfg.kwargs
    per_thread = b["BLOCK_M"] * (block_out + 2 * a["BLOCK_R"]) // (32 * cfg.num_warps)
    return (b["BLOCK_M"] <= SEGMENT_BLOCK_M
            and per_thread <= (64 if a["HAS_DROPOUT"] else 80))


def _fwd_smem(cfg, a) -> int:
    b, br = cfg.kwargs, a["BLOCK_R"]
    stage = b["BLOCK_K"] * (b["BLOCK_M"] + b["BLOCK_N"] + (br if a["FUSE_DOWN"] else 0))
    epilogue = br * (b["BLOCK_M"] + b["BLOCK_N"])
    return (cfg.num_stages * stage + epilogue) * a["x_ptr"].element_size()


def _dx_fits(cfg, a) -> bool:
    b = cfg.kwargs
    bm, bn, bk = b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_K"]
    ok = (_dtype_fits(cfg, a, "dy_ptr") and _row_block_fits(bm, _rows_for(a))
          and _one_row_tile(cfg, a) and _spans(bk, a["K"]) and _spans(bn, a["N"])
          and _nf4_fits(cfg, a, bk, bn, bk, dx=True))
    if a["HAS_DROPOUT"]:  # two fp32 output accumulators (clean, dropped): <= 128 regs/thread
        ok = ok and 2 * b["BLOCK_M"] * b["BLOCK_K"] <= 128 * 32 * cfg.num_warps
        if a["dy_ptr"].element_size() == 4:  # fp32: 64 rows at 8 warps; N = 1: 256 spills 8 B
            ok = ok and (bm < 64 or (bm == 64 and cfg.num_warps == 8)) and (a["N"] > 1 or bk < 256)
    if a["SEGMENTED"]:  # 8 warps: at 4, 64 x 64 x 64 spills 8 bytes on sm_80 even at R = 16
        return ok and cfg.num_warps == 8 and _segment_tile_fits(cfg, a, b["BLOCK_K"])
    return ok and (not a["FUSE_UP"] or a["R"] <= _rank_limit(a, b["BLOCK_K"]))


def _dx_smem(cfg, a) -> int:
    b, br = cfg.kwargs, a["BLOCK_R"]
    stage = b["BLOCK_N"] * (b["BLOCK_M"] + b["BLOCK_K"] + (br if a["FUSE_UP"] else 0))
    epilogue = br * (b["BLOCK_M"] + b["BLOCK_K"])
    return (cfg.num_stages * stage + epilogue) * a["dy_ptr"].element_size()


_PROJ_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                 for bm, bk, w, s in [(16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 3),
                                      (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3),
                                      (128, 128, 8, 3)]] + _fp32(
    [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
     for bm, bk, w, s in [(16, 32, 4, 3), (16, 64, 4, 3), (32, 32, 4, 3), (32, 64, 4, 3),
                          (64, 32, 4, 3), (128, 32, 8, 3)]])


def _proj_fits(cfg, a) -> bool:
    b = cfg.kwargs
    # the (BLOCK_K, BLOCK_R) dot operand stays within 128 registers' worth per thread; fp32
    # R 128: 32-deep K; fp32 64 x 32 at R 64 with the keep-mask spills 48 bytes (sm_80, 3.6)
    fp32 = a["a_ptr"].element_size() == 4
    wide = a["BLOCK_R"] >= 128 and fp32
    if fp32 and a["HAS_DROPOUT"] and a["BLOCK_R"] >= 64 and b["BLOCK_M"] >= 64 and cfg.num_warps == 4:
        return False
    return (_dtype_fits(cfg, a, "a_ptr") and _row_block_fits(b["BLOCK_M"], a["M"])
            and b["BLOCK_K"] <= pow2(a["K"]) and (not wide or b["BLOCK_K"] <= 32)
            and b["BLOCK_K"] * a["BLOCK_R"] <= 128 * 32 * cfg.num_warps)


def _proj_smem(cfg, a) -> int:
    b = cfg.kwargs
    stage = b["BLOCK_K"] * (b["BLOCK_M"] + a["BLOCK_R"])
    return cfg.num_stages * stage * a["a_ptr"].element_size()


# 16 x 128 at 3 stages, 64 x 64 at 4, fp32 64 x 32 at 8 warps: otherwise each spills 8 bytes
# on sm_80 at R = 16 (compile_report, triton 3.9; the fp32 one on 3.6)
_FACTOR_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w, num_stages=s)
                   for bm, bc, w, s in [(16, 128, 4, 3), (32, 128, 4, 4), (64, 64, 4, 4),
                                        (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3)]
                   ] + _fp32([triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w,
                                            num_stages=s)
                              for bm, bc, w, s in [(16, 64, 4, 3), (32, 64, 4, 3),
                                                   (64, 32, 8, 3)]])


def _factor_fits(cfg, a) -> bool:
    b = cfg.kwargs
    width = max(a["N"] if a["NEED_DU"] else 0, a["K"] if a["NEED_DD"] else 0)
    return (_dtype_fits(cfg, a, "x_ptr") and b["BLOCK_M"] <= pow2(min(a["M"], a["m_split"]))
            and (width == 0 or b["BLOCK_C"] <= pow2(width)))


def _factor_smem(cfg, a) -> int:
    b = cfg.kwargs
    stage = b["BLOCK_M"] * (b["BLOCK_C"] + a["BLOCK_R"])
    return cfg.num_stages * stage * a["x_ptr"].element_size()


# split-K decode: the column tile (BLOCK_N) and row tile (BLOCK_M) come from the plan
# 8 warps: at 4 the 16-bit split-K tiles spill 16-40 bytes (tools/compile_report); 128 at
# 2 stages fits sm_80's shared memory (NF4 without double quant needs it there); fp32 32
# deep at 2 stages: at 3, 128 columns at R = 64 spill 8 bytes on sm_90 (triton 3.6)
_SPLITK_CONFIGS = [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
                   for bk, w, s in [(32, 8, 4), (64, 8, 4), (128, 8, 3), (128, 8, 2)]
                   ] + _fp32([triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
                              for bk, w, s in [(32, 8, 2), (64, 8, 3)]])


def _splitk_fits(cfg, a) -> bool:
    """A K step that divides the slice; registers per thread for the fp32 output and t
    tiles, plus the decoded NF4 tile, within the fused kernels' NF4 row-decoder budget."""
    bk, threads = cfg.kwargs["BLOCK_K"], 32 * cfg.num_warps
    bm, bn, br = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_R"]
    if not _dtype_fits(cfg, a, "x_ptr") or a["k_split"] % bk or bk > pow2(a["K"]):
        return False
    # 16-bit, spill-free only (compile_report): rows of x not 16-byte aligned take 32-deep
    # steps; NF4 at least 64 deep (128 without double quant, at 2 stages on sm_80's shared
    # memory); the 2-stage tile only there (dense, it spills 8 bytes on sm_80)
    nodq = a["NF4"] and not a["NF4_DOUBLE_QUANT"]
    if a["x_ptr"].element_size() == 2 and (
            (a["K"] % 8 and bk != 32) or (cfg.num_stages == 2) != nodq
            or (a["NF4"] and bk < (128 if nodq else 64))):
        return False
    elements = bm * (bn + br)
    if a["NF4"]:
        elements += bn * bk * (2 if a["x_ptr"].element_size() == 4 else 1)
    return elements <= NF4_ROWS_ELEMENTS * threads


def _splitk_smem(cfg, a) -> int:
    bk = cfg.kwargs["BLOCK_K"]
    stage = bk * (a["BLOCK_M"] + a["BLOCK_N"] + a["BLOCK_R"])
    epilogue = a["BLOCK_R"] * (a["BLOCK_M"] + a["BLOCK_N"])
    return (cfg.num_stages * stage + epilogue) * a["x_ptr"].element_size()


_DEQUANT_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=1)
                    for bn, bk, w in [(16, 32, 4), (16, 256, 4), (32, 64, 4), (32, 128, 4),
                                      (64, 128, 4), (64, 256, 8)]]


def _dequant_fits(cfg, a) -> bool:
    """Tiles no wider than the weight; the span decoder's register budget (see ``_nf4_fits``)."""
    b = cfg.kwargs
    return b["BLOCK_N"] <= pow2(a["N"]) and b["BLOCK_K"] <= pow2(a["K"]) and (
        a["NF4_ROWS"] or b["BLOCK_N"] * b["BLOCK_K"] <= NF4_SPAN_ELEMENTS * 32 * cfg.num_warps)


@functools.lru_cache(maxsize=None)
def _device_smem(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def smem_limit(args: dict) -> int:
    """Shared memory per block on the device of the kernel's tensors (unbounded off-GPU)."""
    for value in args.values():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            return _device_smem(value.device.index or 0)
    return 1 << 40


MODES = ("auto", "autotune", "heuristic")
MODE_ENV = "SPECLORA_TUNING"      # "autotune" | "heuristic" | "auto" (default)
M_BUCKET_CAP = 8192               # row counts above this share one tuning
_mode = os.environ.get(MODE_ENV, "auto").strip() or "auto"
_cache: dict = {}                 # process-wide: key -> chosen config
_lock = threading.Lock()          # triton's own autotuner state is not thread-safe


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


_benchmarker = _bench


def m_bucket(M: int) -> int:
    """The row count a tuning key holds: the next power of two (at least 16), capped. Every
    M of a bucket prunes to the same configs (row-tile rules go by powers of two), so a new
    sequence length costs no new tuning."""
    return min(pow2(M), M_BUCKET_CAP)


def effective_mode() -> str:
    """How the next launch picks its config. ``"heuristic"``: a pure function of the
    launch's shape (no timing), under ``torch.use_deterministic_algorithms(True)``, with
    ``SPECLORA_TUNING=heuristic`` and in the interpreter; else ``"autotune"``: the pruned
    configs are timed once per key and process."""
    if _mode == "auto":
        heuristic = INTERPRET or torch.are_deterministic_algorithms_enabled()
        return "heuristic" if heuristic else "autotune"
    return _mode


@contextlib.contextmanager
def tuning(mode: str | None = None, benchmarker=None, fresh: bool = False):
    """Within the block: tuning ``mode`` (one of ``MODES``), ``benchmarker`` (a callable
    taking a zero-argument launch and returning its time; tests pass a counting fake) and,
    with ``fresh``, an empty config cache (restored after)."""
    global _mode, _benchmarker, _cache
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    saved = _mode, _benchmarker, _cache
    _mode = mode or _mode
    _benchmarker = benchmarker or _benchmarker
    if fresh:
        _cache = {}
    try:
        yield
    finally:
        _mode, _benchmarker, _cache = saved


_configs_version = 0  # bumped whenever a kernel's config list changes (restricted_configs)


def state() -> tuple:
    """What, besides a call's shape, decides the configs its launches get (recipe keys)."""
    return effective_mode(), id(_cache), _configs_version


def cached_configs() -> dict:
    """The configs tuned so far in this process, by tuning key (a copy)."""
    with _lock:
        return dict(_cache)


def stream_capturing() -> bool:
    """True while the current CUDA stream records a graph (no timing, no sync allowed)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _device(args: dict) -> torch.device:
    return next(v.device for v in args.values() if isinstance(v, torch.Tensor))


class TunedKernel:
    """A ``@triton.jit`` kernel with its autotune configs, the rules that prune them
    (shape fit + shared-memory estimate), its launch grid and its tuning key.

    Each launch picks one pruned config (``choose``): in ``"autotune"`` mode the configs are
    timed the first time a key is seen, with the row count bucketed (``m_bucket``), and the
    winner is kept in a process-wide cache behind a lock; while a CUDA graph is being
    captured nothing is timed (the cached config, else the heuristic's, not cached). In
    ``"heuristic"`` mode (deterministic algorithms, the interpreter) the choice is a pure
    function of the shape. Every launch runs under the device of its tensors.
    """

    def __init__(self, fn, configs, key, fits, smem_bytes, grid, rows="M"):
        self.fn, self.configs, self.fits, self.smem_bytes, self.grid = (
            fn, configs, fits, smem_bytes, grid)
        self.key, self.rows, self.name = tuple(key), rows, fn.__name__

    def candidates(self, args: dict, limit: int, configs=None) -> list[triton.Config]:
        """Configs that fit this launch's shape and ``limit`` bytes of shared memory, fewest
        programs first, then the largest tiles (never empty: falls back to the
        smallest-footprint config)."""
        configs = self.configs if configs is None else configs
        fit = [c for c in configs
               if self.fits(c, args) and self.smem_bytes(c, args) <= limit]
        if not fit:
            fit = [min(configs, key=lambda c: self.smem_bytes(c, args))]
        return sorted(fit, key=lambda c: (self.programs(args, c),
                                          -math.prod(v for k, v in c.kwargs.items()
                                                     if k.startswith("BLOCK"))))

    def programs(self, args: dict, cfg: triton.Config) -> int:
        return math.prod(self.grid({**args, **cfg.kwargs}))

    def tuning_key(self, args: dict, device: torch.device) -> tuple:
        """What a tuned config is valid for: the bucketed row count, the other key
        arguments, the activations' dtype and the device."""
        dtype = next(v.dtype for v in args.values() if isinstance(v, torch.Tensor))
        return (self.name, m_bucket(args[self.rows]),
                *(args[k] for k in self.key if k != self.rows), dtype, str(device))

    def heuristic(self, args: dict, candidates: list, sms: int) -> triton.Config:
        """Timing-free choice: the largest tiles that still give every SM a program (a full
        wave), else the config with the most programs."""
        full = [c for c in candidates if self.programs(args, c) >= sms]
        return full[0] if full else max(candidates, key=lambda c: self.programs(args, c))

    def choose(self, args: dict, device: torch.device) -> triton.Config:
        """The config this launch runs (see the class docstring). The interpreter's
        heuristic is the fewest programs (fastest to interpret; tests force the others)."""
        candidates = self.candidates(args, smem_limit(args))
        if len(candidates) == 1:
            return candidates[0]
        if effective_mode() == "heuristic":
            return candidates[0] if INTERPRET else self.heuristic(args, candidates,
                                                                  sm_count(device))
        key = self.tuning_key(args, device)
        cfg = _cache.get(key)
        if cfg is not None:
            return cfg
        if stream_capturing():  # timing would break the capture: warm up before capturing
            return self.heuristic(args, candidates, sm_count(device))
        with _lock:
            cfg = _cache.get(key)
            if cfg is None:
                times = [_benchmarker(functools.partial(self._launch, args, c))
                         for c in candidates]
                cfg = _cache[key] = candidates[min(range(len(times)), key=times.__getitem__)]
        return cfg

    def _launch(self, args: dict, cfg: triton.Config, grid=None) -> None:
        grid = grid or self.grid({**args, **cfg.kwargs})
        self.fn[grid](**args, **cfg.all_kwargs())

    def __call__(self, **args):
        self.run(args)

    def run(self, args: dict, memo=None) -> None:
        """Launch with ``args`` under the device of its tensors. ``memo`` (a ``recipe.Step``
        of the same call shape) keeps the chosen config and grid: later launches skip the
        choice (not kept while a CUDA graph is captured, when choices go untimed)."""
        if _recorder is not None:
            _recorder.launches.append((self, args))
            if _recorder.dry_run:
                return
        device = _device(args)
        if memo is not None and memo.config is not None:
            cfg, grid = memo.config, memo.grid
        else:
            cfg = self.choose(args, device)
            grid = self.grid({**args, **cfg.kwargs})
            if memo is not None and not stream_capturing():
                memo.config, memo.grid = cfg, grid
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):  # Triton launches on the current device
                self._launch(args, cfg, grid)
        else:
            self._launch(args, cfg, grid)


class _Recorder:
    def __init__(self, dry_run: bool):
        self.dry_run, self.launches = dry_run, []


_recorder: _Recorder | None = None


def dry_running() -> bool:
    """True inside ``record_launches(dry_run=True)``: launches are recorded, none runs (any
    device: plans on CPU or "meta" tensors)."""
    return _recorder is not None and _recorder.dry_run


@contextlib.contextmanager
def record_launches(dry_run: bool = False):
    """Record every kernel launch as ``(TunedKernel, args)``; with ``dry_run`` nothing runs
    (works on "meta" tensors). Used by the compile report to build exact signatures."""
    global _recorder
    previous, _recorder = _recorder, _Recorder(dry_run)
    try:
        yield _recorder.launches
    finally:
        _recorder = previous


def _fwd_grid(a):
    tiles_n = cdiv(a["N"], a["BLOCK_N"])
    seg_tiles = cdiv(tiles_n, a["n_segments"]) if a["SEGMENTED"] else 1
    return (cdiv(a["M"], a["BLOCK_M"]) * cdiv(tiles_n, seg_tiles),)


FWD = TunedKernel(
    fwd_kernel, _gemm_configs("BLOCK_N", "BLOCK_K"),
    key=["M", "N", "K", "R", "n_segments", "HAS_BIAS", "FUSE_DOWN", "SEGMENTED", "STORE_T",
         "HAS_DROPOUT", "ROW_SCALE", "BLOCK_R", "DOT_PRECISION", "IDX64", "NF4", "NF4_ROWS",
         "NF4_BLOCKSIZE", "NF4_DOUBLE_QUANT"],
    fits=_fwd_fits, smem_bytes=_fwd_smem, grid=_fwd_grid)
PROJ = TunedKernel(
    proj_kernel, _PROJ_CONFIGS, key=["M", "K", "R", "HAS_DROPOUT", "ROW_SCALE", "BLOCK_R", "DOT_PRECISION", "IDX64"],
    fits=_proj_fits, smem_bytes=_proj_smem,
    grid=lambda a: (cdiv(a["M"], a["BLOCK_M"]) * cdiv(a["R"], a["BLOCK_R"]),))


def _dx_grid(a):
    tiles_k = cdiv(a["K"], a["BLOCK_K"])
    seg_tiles = cdiv(tiles_k, a["n_segments"]) if a["SEGMENTED"] else 1
    return (cdiv(a["M"], a["BLOCK_M"]) * cdiv(tiles_k, seg_tiles),)


DX = TunedKernel(
    dx_kernel, _gemm_configs("BLOCK_K", "BLOCK_N"),
    key=["M", "N", "K", "R", "n_segments", "FUSE_UP", "SEGMENTED", "STORE_G", "HAS_DROPOUT",
         "BLOCK_R", "DOT_PRECISION", "IDX64", "NF4", "NF4_ROWS", "NF4_BLOCKSIZE",
         "NF4_DOUBLE_QUANT"],
    fits=_dx_fits, smem_bytes=_dx_smem, grid=_dx_grid)


def _factor_grid(a):
    tiles_r = cdiv(a["R"], a["BLOCK_R"])
    tiles_c = (cdiv(a["N"], a["BLOCK_C"]) if a["NEED_DU"] else 0) + (
        cdiv(a["K"], a["BLOCK_C"]) if a["NEED_DD"] else 0)
    return ((tiles_c + (1 if a["NEED_DS"] else 0)) * tiles_r * a["n_msplits"],)


FACTOR = TunedKernel(
    factor_grad_kernel, _FACTOR_CONFIGS,
    key=["M", "N", "K", "R", "n_msplits", "NEED_DU", "NEED_DD", "NEED_DS", "HAS_DROPOUT",
         "BLOCK_R", "DOT_PRECISION", "IDX64"],
    fits=_factor_fits, smem_bytes=_factor_smem, grid=_factor_grid)

SPLITK = TunedKernel(
    fwd_splitk_kernel, _SPLITK_CONFIGS,
    key=["M", "N", "K", "R", "n_splits", "HAS_BIAS", "STORE_T", "HAS_DROPOUT", "ROW_SCALE", "BLOCK_R",
         "BLOCK_N", "DOT_PRECISION", "IDX64", "NF4", "NF4_ROWS", "NF4_BLOCKSIZE",
         "NF4_DOUBLE_QUANT"],
    fits=_splitk_fits, smem_bytes=_splitk_smem,
    grid=lambda a: (cdiv(a["M"], a["BLOCK_M"]) * cdiv(a["N"], a["BLOCK_N"]) * a["n_splits"],))

DEQUANT = TunedKernel(
    dequant_kernel, _DEQUANT_CONFIGS,
    key=["N", "K", "NF4_ROWS", "NF4_BLOCKSIZE", "NF4_DOUBLE_QUANT"], rows="N",
    fits=_dequant_fits, smem_bytes=lambda cfg, a: 0,
    grid=lambda a: (cdiv(a["N"], a["BLOCK_N"]) * cdiv(a["K"], a["BLOCK_K"]),))

KERNELS = (FWD, PROJ, DX, FACTOR, SPLITK, DEQUANT)


@contextlib.contextmanager
def restricted_configs(configs: dict):
    """Within the block each ``TunedKernel`` key of ``configs`` only has those configs (the
    launcher still prunes them by shape)."""
    global _configs_version
    previous = {kernel: kernel.configs for kernel in configs}
    for kernel, cfgs in configs.items():
        kernel.configs = list(cfgs)
    _configs_version += 1
    try:
        yield
    finally:
        for kernel, cfgs in previous.items():
            kernel.configs = cfgs
        _configs_version += 1
