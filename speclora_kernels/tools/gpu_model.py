"""A performance model that sees the GPU: what decides time on an H100 besides bytes.

``max(bytes / bandwidth, FLOPs / peak)`` (the bandwidth-only model of ``floors``) assumes
every launch keeps all 132 SMs busy. This model predicts each launch from:

- **programs against SMs.** A launch of ``p`` programs keeps ``min(p, SMs)`` SMs busy in its
  first wave and ``p mod SMs`` in its last (tail); each busy SM pulls at most
  ``per_sm_bandwidth`` from device memory, so a decode launch of 16 programs gets 16 of
  them, not 3 TB/s. Compute and decode work scale with the busy SMs the same way.
- **L2 re-reads.** Bytes requested beyond the distinct bytes (tiles of x, D, t re-read by
  many programs, split-K partials) are served by L2 at ``l2_bandwidth``.
- **NF4 decode.** Decoding W in registers costs ``decode_instructions`` SASS instructions
  per element (read from the compiled sm_90 fused forward: ``python -m
  speclora_kernels.tools.compile_report --decode-cost``), issued at 128 per SM-cycle.
- **launches** at ``hardware.H100.launch_seconds`` each, serial within a layer call.

A launch takes ``max(DRAM, L2, compute, decode) + launch``; the launches of a call add
up. Every figure it gives is a prediction: ``Prediction`` says so, and which model made it.

Figures and where they come from: device bandwidth 3.0 TB/s and bf16 peak 800 TFLOP/s
(``hardware.H100``, measured ceilings of one H100). ``per_sm_bandwidth`` is an assumption:
streaming saturates device memory once 3/4 of the SMs stream (3.0 TB/s / 99 = 30 GB/s per
SM); ``tools.gpu_check`` measures the real curve (achieved bandwidth against the number of
programs of a streaming kernel) and reports it. ``l2_bandwidth`` 7.5 TB/s (2.5x device
memory) is an assumption of the same kind. The clock (1.755 GHz) is the H100 SXM's boost
clock.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional

from ..hardware import GPU, H100


@dataclasses.dataclass(frozen=True)
class Model:
    """The figures the model adds to ``hardware.GPU``."""

    gpu: GPU
    per_sm_bandwidth: float     # bytes/s one busy SM pulls from device memory, at most
    l2_bandwidth: float         # bytes/s of L2 hits, all SMs busy
    clock: float                # Hz
    issue_per_sm: int           # thread instructions issued per SM per cycle
    decode_instructions: float  # SASS instructions per NF4 element decoded in registers

    @property
    def name(self) -> str:
        return (f"gpu_model({self.gpu.name}: {self.gpu.sms} SMs, "
                f"{self.gpu.bandwidth / 1e12:.1f} TB/s, "
                f"{self.per_sm_bandwidth / 1e9:.0f} GB/s per SM, "
                f"L2 {self.l2_bandwidth / 1e12:.1f} TB/s, "
                f"{self.gpu.peak_flops / 1e12:.0f} TFLOP/s, "
                f"{self.gpu.launch_seconds * 1e6:.0f} us/launch, "
                f"NF4 decode {self.decode_instructions:.1f} instr/element)")


# decode_instructions: ``compile_report --decode-cost`` on sm_90: the split-K decode K-loop
# (16 x 256 x 128 tiles, 8 warps), NF4 loop body minus the dense one over the 128 elements a
# thread decodes per step: 4.86 (the fused forward at 32 x 128 x 64: 5.67)
H100_MODEL = Model(gpu=H100, per_sm_bandwidth=H100.bandwidth / 99, l2_bandwidth=7.5e12,
                   clock=1.755e9, issue_per_sm=128, decode_instructions=4.9)


@dataclasses.dataclass(frozen=True)
class Launch:
    """What one kernel launch does: its programs and the work they share."""

    name: str
    programs: int
    dram_bytes: float            # distinct bytes read and written
    l2_bytes: float = 0.0        # bytes requested beyond those (re-reads, workspace)
    flops: float = 0.0
    decoded: float = 0.0         # NF4 elements decoded in registers (re-decodes included)


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

    def __str__(self) -> str:
        bounds = ", ".join(f"{n} {s * 1e6:.2f} us {b} ({p} programs, {w:.2f} waves)"
                           for n, s, b, p, w in self.parts)
        return f"{self.us:.2f} us {self.label} by {self.model}: {bounds}"


def busy_fraction(programs: int, sms: int) -> float:
    """Average fraction of the SMs a launch keeps busy: ``p / (ceil(p / SMs) * SMs)``."""
    if programs <= 0:
        return 0.0
    return programs / (math.ceil(programs / sms) * sms)


def launch_seconds(launch: Launch, model: Model = H100_MODEL) -> tuple[float, str]:
    """(seconds, what bound it) of one launch, launch cost included."""
    gpu = model.gpu
    busy = busy_fraction(launch.programs, gpu.sms) * gpu.sms
    dram = launch.dram_bytes / min(gpu.bandwidth, busy * model.per_sm_bandwidth)
    l2 = launch.l2_bytes / (model.l2_bandwidth * busy / gpu.sms)
    compute = launch.flops / (gpu.peak_flops * busy / gpu.sms)
    decode = (launch.decoded * model.decode_instructions
              / (busy * model.issue_per_sm * model.clock))
    terms = {"memory": dram, "L2": l2, "compute": compute, "decode": decode}
    bound = max(terms, key=terms.get)
    return terms[bound] + gpu.launch_seconds, bound


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
    """The decode floor: W read once at device bandwidth, plus one launch."""
    size = weight_bytes if weight_bytes is not None else out_features * in_features * element_size
    seconds = size / model.gpu.bandwidth + model.gpu.launch_seconds
    return Prediction(seconds, (("W once", seconds, "memory", model.gpu.sms, 1.0),),
                      f"floor (W once at {model.gpu.bandwidth / 1e12:.1f} TB/s + 1 launch)")
