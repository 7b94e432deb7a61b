"""LoRA dropout as the kernels draw it: a keep-mask that is a pure function of (seed, index).

The kernels never store the mask. Every program that needs it (each forward N-tile, the
backward ``dx`` epilogue, the ``dD`` reduction) regenerates it from Philox-4x32-10 with
``tl.randint4x(seed, counter)``. This module reproduces the same stream in plain PyTorch,
bit for bit, so that

- the CPU path (no Triton) draws exactly the mask the GPU kernels draw, and
- a test can hand the kernel's mask to the reference (``reference_adapter_linear(mask=)``).

Layout, for x viewed as (M, K): element (m, k) belongs to Philox counter
``m * ceil(K / 8) + k // 8``; one call yields four 32-bit words, i.e. eight 16-bit
uniforms, and slot ``q = k % 8`` takes bits ``16 * (q % 2)`` of word ``q // 2``. The element
is kept when that 16-bit value is ``>= round(p * 65536)``, so p resolves to 2**-16; kept
inputs are scaled by ``1 / (1 - p)``. Eight decisions per Philox call (``tl.rand`` spends a
full call per element) is what keeps dropout from spilling registers at tensor-core tile
sizes (see ``tools/compile_report``).
"""
from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
# Philox-4x32 constants (Salmon et al. 2011), as in triton.language.random.
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
GROUP = 8  # keep decisions per Philox call: 4 words x 2 halves
SEED_BOUND = 2**31 - 1  # seeds are drawn in [0, SEED_BOUND) so they pass as a kernel i32


def dropout_seed(device=None) -> torch.Tensor:
    """Draw a dropout seed from the default generator of ``device`` (the CPU's by default):
    a 0-d int64 tensor on that device, which the kernels read in-kernel. ``torch.manual_seed``
    makes it reproducible; drawing never syncs a GPU and ``torch.compile`` traces it.

    On a CUDA device this is the graph-safe way PyTorch's own RNG ops and Inductor's
    generated kernels take (seeds drawn into device memory, the generator's Philox offset
    advanced per draw): inside ``torch.cuda.graph`` capture or ``torch.compile(mode=
    "reduce-overhead")`` every replay draws a new seed, hence a new mask, instead of baking
    one host integer into the graph."""
    return torch.randint(0, SEED_BOUND, (), dtype=torch.int64, device=device)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``a * b`` for a < 2**32 and uint32 values held in int64.

    Splitting ``a`` in 16-bit halves keeps every partial product below 2**63.
    """
    a_hi, a_lo = a >> 16, a & 0xFFFF
    low = a_lo * b                       # < 2**48
    mid = a_hi * b + (low >> 16)         # < 2**49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32(seed: int, counters: torch.Tensor) -> list[torch.Tensor]:
    """The four uint32 words (in int64) of ``tl.randint4x(seed, counters)``, int64 counters."""
    counters = counters.to(torch.int64)
    c0, c1 = counters & _MASK32, (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = int(seed) & _MASK32, (int(seed) >> 32) & _MASK32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def keep_threshold(p: float) -> int:
    """16-bit threshold: keep iff uniform16 >= round(p * 65536) (the kernels compute the same
    in float32, where ``p * 65536 + 0.5`` is exact)."""
    return math.floor(float(torch.tensor(p, dtype=torch.float32)) * 65536.0 + 0.5)


def dropout_keep_mask(seed, shape, p: float, device=None) -> torch.Tensor:
    """The kernels' boolean keep-mask (True = kept) for an input of ``shape`` (``x.shape``).

    ``seed`` is an int or the 0-d tensor from :func:`dropout_seed` (reading a CUDA one syncs);
    the mask depends only on (seed, row, column) of x viewed as (-1, in_features), see the
    module docstring.
    """
    shape = tuple(shape)
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    m = torch.arange(rows, dtype=torch.int64, device=device)[:, None]
    k = torch.arange(cols, dtype=torch.int64, device=device)[None, :]
    words = philox4x32(int(seed), m * (-(-cols // GROUP)) + k // GROUP)
    slot = (k % GROUP).expand(rows, cols)
    word = torch.stack(words).gather(0, (slot // 2)[None].expand(1, rows, cols))[0]
    bits = (word >> (16 * (slot % 2))) & 0xFFFF
    return (bits >= keep_threshold(p)).reshape(shape)
