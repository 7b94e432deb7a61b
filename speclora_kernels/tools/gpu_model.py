"""A performance model that sees the GPU: what decides time on an H100 besides bytes.

It is the only predictor: the plan's split-K choice (``ops.plan._decode_plan``),
``tools.plan_report`` and ``benchmarks.counted`` all predict launches with it. A decode
forward is described once, from its shape, by ``ops.plan.decode_launch`` (the plan calls it
directly; the tools reach it from a recorded launch through ``recorded.recorded_launch``,
with the config an H100 runs, ``recorded.h100_config``). Launches without a shape formula are priced from
their interpreter counts (``counted_launch``) under the same rules. Per launch of ``p``
programs, ``busy`` being the SMs it keeps busy on average (``busy_fraction``):

- **DRAM**: distinct bytes at ``min(device bandwidth, busy x per-SM bandwidth)``. An SM's
  bandwidth is Little's law: the bytes it keeps in flight over the loaded DRAM latency
  (``Launch.in_flight``, from the launch's tile and stages where the caller knows them, else
  ``Model.in_flight``), at most what its port to L2 moves per cycle.
- **L2**: bytes requested beyond the distinct ones (tiles of x and D re-read by many
  programs) and split reductions' fp32 partials (written, then read once by the reducing
  program: they live in L2, not DRAM), at ``l2_bandwidth`` scaled by the busy SMs.
  cuBLAS's tile re-reads are priced the same way (``cublas``).
- **compute**: FLOPs at the bf16 peak, scaled by the busy SMs.
- **NF4 decode**: SASS instructions per element decoded in registers, 128 issued per SM-cycle.
- **L1 gathers**: the NF4 level-table gather (one 8-byte load per code byte from a 2 KB
  table, ``quant.triton_nf4.nf4_level_pair``) is bound by the L1's data path, not DRAM or L2.
- **tail**, added after the ``max`` of the above: a split reduction's last-arriving program
  waits ``Launch.serial`` dependent L2 round trips after the stream (``decode_launch``).
- **launch** at ``hardware.H100.launch_seconds``, and no launch below ``Model.min_launch``.

A launch takes ``max(DRAM, L2, compute, decode, gathers) + tail + launch`` (DRAM and compute
divided by ``Launch.efficiency``: what a contender reaches of those ceilings); the launches
of a call add up. Every figure it gives is a prediction, and ``Prediction`` says so.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional

from ..hardware import GPU, H100

LANES = 32                   # threads of a warp
LEVEL_ENTRY = 8              # bytes: one int64 pair of fp32 levels per code byte
LEVEL_TABLE = 256 * LEVEL_ENTRY


@dataclasses.dataclass(frozen=True)
class Model:
    """The figures the model adds to ``hardware.GPU``."""

    gpu: GPU
    dram_latency: float         # s, loaded: Little's law's latency
    in_flight: float            # bytes an SM keeps in flight where the launch's tile is unknown
    sm_port: float              # bytes one SM moves from L2 per cycle, at most
    l2_bandwidth: float         # bytes/s of L2 hits, all SMs busy
    l2_latency: float           # cycles of one dependent L2 round trip
    l1_per_cycle: float         # bytes the L1 returns per SM-cycle
    clock: float                # Hz
    issue_per_sm: int           # thread instructions issued per SM per cycle
    decode_instructions: float  # SASS instructions per NF4 element decoded in registers
    min_launch: float           # s: the least a launch takes, launch included

    def sm_bandwidth(self, in_flight: Optional[float] = None) -> float:
        """Bytes/s one SM pulls with ``in_flight`` bytes in flight (default ``in_flight``)."""
        flight = self.in_flight if in_flight is None else in_flight
        return min(flight / self.dram_latency, self.sm_port * self.clock)

    @property
    def gather_cycles(self) -> float:
        """L1 cycles of one warp's gather from the level table on uniform codes: 32 lanes
        pick among its 64 32-byte sectors, touching 64 (1 - (63/64)^32) = 25.3 of them
        (14 of its 16 lines), returned at ``l1_per_cycle``: 6.3 cycles."""
        sectors = LEVEL_TABLE // 32
        touched = sectors * (1 - (1 - 1 / sectors) ** LANES)
        return touched * 32 / self.l1_per_cycle

    @property
    def name(self) -> str:
        return (f"gpu_model({self.gpu.name}: {self.gpu.sms} SMs, "
                f"{self.gpu.bandwidth / 1e12:.1f} TB/s, {self.in_flight / 1024:.0f} KB in "
                f"flight per SM over {self.dram_latency * 1e9:.0f} ns, "
                f"L2 {self.l2_bandwidth / 1e12:.1f} TB/s and {self.l2_latency:.0f} cycles, "
                f"{self.gpu.peak_flops / 1e12:.0f} TFLOP/s, "
                f"{self.gpu.launch_seconds * 1e6:.0f} us/launch, "
                f"NF4 decode {self.decode_instructions:.1f} instr/element, "
                f"{self.gather_cycles:.1f} L1 cycles per warp gather)")


# Figures and sources. gpu: hardware.H100 (measured bandwidth and bf16 peak, 132 SMs).
# dram_latency 700 ns: assumption, loaded latency of a streaming kernel (queueing adds to
#   the ~400-500 ns of an idle pointer chase; the review's range is 600-800 ns).
# in_flight 64 KB: assumption, the low end of the review's 64-128 KB per SM: one program's
#   multi-stage tiles (a split-K program at 32 x 128 tiles, 3 stages, keeps 2 x 28 KB).
# sm_port 64 B/cycle: assumption, the SM's L1 fill path from L2 (A100 whitepaper: 5120 B/clk
#   of L2 bandwidth for 108 SMs, 47 B/clk each when all pull; one SM alone gets more).
# l2_bandwidth 7.5 TB/s: assumption, 2.5x device memory (Chips and Cheese, "Nvidia's H100:
#   Funny L2, and Tons of Bandwidth", measured ~5.5 TB/s on the 114-SM PCIe part).
# l2_latency 300 cycles: an L2 hit is 222-339 cycles depending on the SM, ~279 on average,
#   on an L40 (arXiv 2606.22588); Hopper's L2 is split in two partitions like it (Chips and
#   Cheese, above); the review's range is 250-350.
# l1_per_cycle 128 B: the L1's data path per SM-cycle (33 TB/s over 132 SMs, the Hopper
#   figure NVIDIA quotes); gather_cycles 6.3 lies in the review's 4-8 cycles of L1 tag stage.
# clock 1.755 GHz: assumption, a sustained clock under load (the SXM boosts to 1.98 GHz,
#   datasheet; Chips and Cheese saw its PCIe sibling at 1.755 GHz, dipping to 1.4).
# decode_instructions 4.9: ``compile_report --decode-cost`` on sm_90: the split-K decode
#   K-loop (16 x 256 x 128 tiles, 8 warps), NF4 loop body minus the dense one over the 128
#   elements a thread decodes per step: 4.86 (the fused forward at 32 x 128 x 64: 5.67).
# min_launch 2.5 us: assumption, the GPU time of a small eager PyTorch kernel back to back
#   (pytorch#41383: ~2 us of dispatch per elementwise op; meta-pytorch/autoparallel#146 fits
#   >= 7 us per op on H100, the pessimistic end).
H100_MODEL = Model(gpu=H100, dram_latency=700e-9, in_flight=64 * 1024, sm_port=64,
                   l2_bandwidth=7.5e12, l2_latency=300, l1_per_cycle=128, clock=1.755e9,
                   issue_per_sm=128, decode_instructions=4.9, min_launch=2.5e-6)


@dataclasses.dataclass(frozen=True)
class Launch:
    """What one kernel launch does: its programs and the work they share."""

    name: str
    programs: int
    dram_bytes: float            # distinct bytes read and written
    l2_bytes: float = 0.0        # bytes served by L2: re-reads, split partials (write + read)
    flops: float = 0.0
    decoded: float = 0.0         # NF4 elements decoded in registers (re-decodes included)
    gathers: float = 0.0         # warp gathers from the NF4 level table
    serial: int = 0              # dependent L2 round trips after the stream (reduction tail)
    in_flight: Optional[float] = None  # bytes one SM keeps in flight; None: Model.in_flight
    efficiency: float = 1.0      # of the DRAM and compute ceilings (contenders)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A predicted time of some launches, with what bound each."""

    seconds: float
    parts: tuple                 # per launch: (name, seconds, bound, programs, waves)
    model: str
    label: str = "predicted"

    @property
    def us(self) -> float:
        return self.seconds * 1e6

    @property
    def bound(self) -> str:
        return "+".join(part[2] for part in self.parts)

    def __str__(self) -> str:
        bounds = ", ".join(f"{n} {s * 1e6:.2f} us {b} ({p} programs, {w:.2f} waves)"
                           for n, s, b, p, w in self.parts)
        return f"{self.us:.2f} us {self.label} by {self.model}: {bounds}"


def busy_fraction(programs: int, sms: int) -> float:
    """Average fraction of the SMs a launch keeps busy: ``p / (ceil(p / SMs) * SMs)``."""
    if programs <= 0:
        return 0.0
    return programs / (math.ceil(programs / sms) * sms)


def terms(launch: Launch, model: Model = H100_MODEL) -> dict:
    """Seconds of each bound of one launch, the tail and the launch cost."""
    gpu = model.gpu
    busy = busy_fraction(launch.programs, gpu.sms) * gpu.sms
    per_sm = model.sm_bandwidth(launch.in_flight)
    cycles = busy * model.clock  # SM-cycles per second
    return {"memory": launch.dram_bytes / (launch.efficiency * min(gpu.bandwidth, busy * per_sm)),
            "L2": launch.l2_bytes / (model.l2_bandwidth * busy / gpu.sms),
            "compute": launch.flops / (launch.efficiency * gpu.peak_flops * busy / gpu.sms),
            "decode": launch.decoded * model.decode_instructions / (model.issue_per_sm * cycles),
            "L1 gather": launch.gathers * model.gather_cycles / cycles,
            "tail": launch.serial * model.l2_latency / model.clock,
            "launch": gpu.launch_seconds}


def launch_seconds(launch: Launch, model: Model = H100_MODEL) -> tuple[float, str]:
    """(seconds, what bound it) of one launch, its tail and launch cost included."""
    t = terms(launch, model)
    bound = max(("memory", "L2", "compute", "decode", "L1 gather"), key=t.get)
    seconds = t[bound] + t["tail"] + t["launch"]
    return (seconds, bound) if seconds >= model.min_launch else (model.min_launch, "min launch")


def predict(launches: Iterable[Launch], model: Model = H100_MODEL) -> Prediction:
    """Predicted time of launches that run one after another."""
    parts, total = [], 0.0
    for launch in launches:
        seconds, bound = launch_seconds(launch, model)
        parts.append((launch.name, seconds, bound, launch.programs,
                      launch.programs / model.gpu.sms))
        total += seconds
    return Prediction(total, tuple(parts), model.name)


def weight_floor(out_features: int, in_features: int, weight_bytes: Optional[int] = None,
                 element_size: int = 2, model: Model = H100_MODEL) -> Prediction:
    """The decode floor: W read once at device bandwidth, in one launch."""
    size = weight_bytes if weight_bytes is not None else out_features * in_features * element_size
    return dataclasses.replace(predict([Launch("W once", model.gpu.sms, size)], model),
                               model=f"floor (W once at {model.gpu.bandwidth / 1e12:.1f} TB/s "
                                     "+ 1 launch)")


def nf4_gathers(elements: float, rows: bool = True) -> float:
    """Warp gathers of the level table to decode ``elements`` NF4 elements: one 8-byte load
    per code byte (two elements) in the row decoder, one per element in the span decoder
    (K not a multiple of the block size). The block scales' code2 gathers, one per 64
    elements, are left out (1/32 of these)."""
    return elements / (2 if rows else 1) / LANES


# ---------------------------------------------------------------- contenders
# cuBLAS and bitsandbytes choose their own grids: modelled as filling the GPU (split-K and
# stream-K grids), each at a stated fraction of the DRAM and compute ceilings.
CUBLAS_GEMV = 0.85   # M <= 16: TileOPs#243 measured torch's cuBLAS fp16 GEMV on an H200 at
                     # 3.3-3.9 TB/s of its 4.8 TB/s datasheet (70-82%) on LLM shapes; a copy
                     # gets ~90% of a datasheet, and hardware.H100.bandwidth is a copy
CUBLAS_GEMM = 1.0    # hardware.H100.peak_flops is cuBLAS's own measured 8192^3 bf16 rate
CUBLAS_TILE = 128    # assumption: 128 x 128 output tiles, for the re-reads they cause
BNB_GEMV_4BIT = 0.5  # assumption: bitsandbytes#1842 measured its 4-bit GEMV at 49% of the
                     # copy bandwidth (AMD gfx1151; the vendor bf16 GEMV 91%); bnb#611, #181:
                     # users see 4-bit decode no faster than fp16 though it reads 4x fewer
                     # bytes; no H100 figure found. Its decode cost is folded into this
STREAM = 1.0         # elementwise kernels (bnb's dequantize, PyTorch's): the copy ceiling
                     # (hardware.H100.bandwidth is a copy), floored at Model.min_launch


def cublas(name: str, M: int, N: int, K: int, distinct: float, flops: float,
           element_size: int, model: Model = H100_MODEL) -> Launch:
    """A cuBLAS GEMM y (M x N) = x (M x K) @ W.T: distinct bytes once; the x rows re-read
    by every column tile and W by every row tile come from L2, as ours do."""
    tiles_n, tiles_m = math.ceil(N / CUBLAS_TILE), math.ceil(M / CUBLAS_TILE)
    reread = ((tiles_n - 1) * M * K + (tiles_m - 1) * N * K) * element_size
    return Launch(name, model.gpu.sms, distinct, reread, flops,
                  efficiency=CUBLAS_GEMV if M <= 16 else CUBLAS_GEMM)


def contender(name: str, distinct: float, flops: float = 0.0, efficiency: float = STREAM,
              model: Model = H100_MODEL) -> Launch:
    """A kernel that is not a GEMM of ours or cuBLAS's (bnb's 4-bit GEMV at
    ``BNB_GEMV_4BIT``, elementwise kernels at ``STREAM``), filling the GPU."""
    return Launch(name, model.gpu.sms, distinct, flops=flops, efficiency=efficiency)


def counted_launch(name: str, programs: int, unique: float, requested: float, flops: float,
                   decoded: float = 0.0, gathers: float = 0.0, scratch: float = 0.0,
                   serial: int = 0) -> Launch:
    """A launch from its interpreter counts: distinct bytes from DRAM, but for the split
    partials (``scratch`` bytes written, then read: both counted distinct) which live in L2;
    requested bytes beyond the distinct from L2, but for the level-table gathers
    (``LANES * LEVEL_ENTRY`` bytes each), which are the L1's. A reduction loop of ``serial``
    partials waits as many L2 round trips after its arrival count's, as in
    ``plan.decode_launch``."""
    return Launch(name, programs, unique - 2 * scratch,
                  requested - unique + 2 * scratch - gathers * LANES * LEVEL_ENTRY, flops,
                  decoded, gathers, serial + 1 if serial else 0)
