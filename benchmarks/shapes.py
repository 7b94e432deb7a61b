"""Layer shapes of real models, token counts, adapter ranks, and the profiles that pick
from them.

Shapes are written ``in x out`` (``K x N``): ``x`` is ``M x K``, ``W`` is ``N x K``.
Sources: each model's ``config.json`` on the Hugging Face hub (hidden_size,
intermediate_size, attention heads / key-value heads; head_dim = 128 for the LLMs).
Mistral-7B (v0.1/v0.3) has exactly Llama-3-8B's projection shapes, so those shapes are
listed once under both names.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Shape:
    """One linear layer: ``in_features x out_features``, shared by ``models``."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    models: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.name} {self.in_features}x{self.out_features}"


_LLAMA = ("Llama-3-8B", "Mistral-7B")
_QWEN = ("Qwen2.5-7B",)
_MINILM = ("all-MiniLM-L6-v2",)

MODEL_SHAPES: tuple[Shape, ...] = (
    # Llama-3-8B / Mistral-7B: hidden 4096, intermediate 14336, 32 heads, 8 KV heads.
    Shape("llama.q_o", 4096, 4096, False, _LLAMA),
    Shape("llama.k_v", 4096, 1024, False, _LLAMA),
    Shape("llama.gate_up", 4096, 14336, False, _LLAMA),
    Shape("llama.down", 14336, 4096, False, _LLAMA),
    # Qwen2.5-7B: hidden 3584, intermediate 18944, 28 heads, 4 KV heads; q/k/v carry bias.
    Shape("qwen.q", 3584, 3584, True, _QWEN),
    Shape("qwen.o", 3584, 3584, False, _QWEN),
    Shape("qwen.k_v", 3584, 512, True, _QWEN),
    Shape("qwen.gate_up", 3584, 18944, False, _QWEN),
    Shape("qwen.down", 18944, 3584, False, _QWEN),
    # all-MiniLM-L6-v2 (BERT): hidden 384, intermediate 1536, every linear has bias.
    Shape("minilm.qkvo", 384, 384, True, _MINILM),
    Shape("minilm.inter", 384, 1536, True, _MINILM),
    Shape("minilm.out", 1536, 384, True, _MINILM),
)

TOKENS = (1, 16, 512, 8192)
"""M: decode (1, 16), a prefill chunk (512), a training micro-batch (8192 tokens)."""


@dataclass(frozen=True)
class Rank:
    """Adapter rank ``R = r + k``: ``r`` trainable LoRA rows plus ``k`` spectral rows."""

    r: int
    k: int

    @property
    def total(self) -> int:
        return self.r + self.k

    @property
    def label(self) -> str:
        return f"R={self.total} (r={self.r},k={self.k})"


RANKS = tuple(Rank(r, k) for r in (8, 16) for k in (16, 32))

MODES = ("forward", "backward", "fwd_bwd", "train_step")
"""forward: inference (no grad, eval); backward: ``y.backward(dy)`` alone; fwd_bwd: a
training forward plus its backward; train_step: fwd_bwd plus an AdamW step."""


@dataclass(frozen=True)
class Case:
    """One timed configuration. ``tokens`` is the M actually run; ``target_tokens`` the M
    of the full-size grid it stands in for (they differ only in scaled CPU profiles)."""

    shape: Shape
    tokens: int
    rank: Rank
    target_tokens: int

    @property
    def label(self) -> str:
        m = f"M={self.tokens}"
        if self.tokens != self.target_tokens:
            m += f" (for {self.target_tokens})"
        return f"{self.shape.label} {m} {self.rank.label}"


@dataclass(frozen=True)
class Profile:
    """A named grid: cases, modes, timing budget per (case, mode)."""

    name: str
    description: str
    cases: tuple[Case, ...]
    modes: tuple[str, ...]
    min_rounds: int
    max_rounds: int
    budget_s: float
    sample_s: float


def _grid(shapes, tokens, ranks, token_map=None):
    token_map = token_map or {}
    return tuple(Case(s, token_map.get(m, m), r, m) for s in shapes for m in tokens
                 for r in ranks)


def _by_name(*names):
    table = {s.name: s for s in MODEL_SHAPES}
    return [table[n] for n in names]


SMOKE_SHAPE = Shape("smoke", 192, 96, True, ("synthetic",))
"""Not multiples of 128 (nor ``out`` of 64), so tiles are ragged, while meeting what
bitsandbytes' CPU inference kernel requires (in % 64 == 0, out % 32 == 0)."""

# CPU: two cores cannot afford the 8192-token GEMMs of the full grid within minutes,
# so M = 512 and 8192 run at 128 and 512 tokens (the row labels say so), the LLM
# projections run full size in decode (M = 1, 16, memory-bound like on the GPU), and
# the compute-bound MiniLM shapes run at every scaled M.
CPU_TOKEN_MAP = {512: 128, 8192: 512}

PROFILES: dict[str, Profile] = {
    "gpu": Profile(
        "gpu", "the issue's full grid: every model shape, M in {1,16,512,8192}, every R",
        _grid(MODEL_SHAPES, TOKENS, RANKS), MODES, 10, 200, 2.0, 0.0),
    "cpu": Profile(
        "cpu", "CPU grid (minutes on 2 cores): MiniLM at every scaled M with R = 48 (and "
        "R = 24 on one shape), Llama-3-8B/Qwen2.5-7B attention and MLP shapes at M in "
        f"{{1, 16}}, R = 48; M mapping {CPU_TOKEN_MAP}",
        _grid(_by_name("minilm.qkvo", "minilm.inter", "minilm.out"), TOKENS, (RANKS[3],),
              CPU_TOKEN_MAP)
        + _grid(_by_name("minilm.qkvo"), TOKENS, (RANKS[0],), CPU_TOKEN_MAP)
        + _grid(_by_name("llama.q_o", "llama.k_v", "qwen.q", "llama.down"), (1, 16),
                (RANKS[3],)),
        ("forward", "backward", "train_step"), 5, 41, 1.0, 0.02),
    "smoke": Profile(
        "smoke", "CI smoke: one odd synthetic shape, M in {1, 37}, R = 24, seconds",
        (Case(SMOKE_SHAPE, 1, RANKS[0], 1), Case(SMOKE_SHAPE, 37, RANKS[0], 37)),
        MODES, 3, 5, 0.05, 0.0),
}


def select(profile: Profile, shapes=None, tokens=None, ranks=None, modes=None) -> Profile:
    """Narrow a profile by shape names, target M values, R totals and modes."""
    cases = [c for c in profile.cases
             if (not shapes or c.shape.name in shapes)
             and (not tokens or c.target_tokens in tokens or c.tokens in tokens)
             and (not ranks or c.rank.total in ranks)]
    if not cases:
        raise ValueError("no case left after filtering; check --shapes/--tokens/--ranks")
    bad = [m for m in (modes or ()) if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; expected some of {MODES}")
    return replace(profile, cases=tuple(cases), modes=tuple(modes or profile.modes))
