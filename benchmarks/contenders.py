"""The contenders, each built on one shared :class:`Problem` (same ``x``, ``W``, bias,
adapter factors and ``dy``), plus the float64 check every contender must pass.

One clearly marked builder per contender (``CONTENDERS``); ``peft_patched`` and
``bnb_peft_patched`` are PEFT's own LoRA layers after ``speclora_kernels.patch_peft``. A builder returns a
:class:`Bound`: the call, a training/inference switch and the trainable tensors.
A builder raises :class:`Unavailable` only when an optional dependency is missing
(package not installed, module not landed yet); any other error propagates, so a broken
contender fails the run instead of disappearing from it.

Adapters: ours gets ``D``, ``s``, ``U``; PEFT gets the same adapter as a rank-R LoRA
(``lora_A = D``, ``lora_B = U diag(s) / scaling``, the export every method has), so every
contender computes the same function and their outputs are checked against each other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from .shapes import Case

ADAPTERS = ("lora", "speclora")


class Unavailable(RuntimeError):
    """A contender cannot be built here (optional dependency missing)."""


@dataclass
class Problem:
    """Identical inputs for every contender of one case."""

    case: Case
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    down: torch.Tensor
    scale: torch.Tensor
    up: torch.Tensor
    dy: torch.Tensor
    dropout_p: float
    dropout_rows: int
    grad_rows: int
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def quantized(self):
        """A fresh bitsandbytes ``Params4bit`` (nf4, double quant, blocks of 64) of
        ``weight``. Fresh per contender: bnb's CPU inference repacks a module's weight in
        place on its first eval call. Quantization is deterministic, so every NF4
        contender reads the same codes and scales."""
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise Unavailable(f"bitsandbytes not installed ({err})") from None
        return bnb.nn.Params4bit(self.weight.detach().clone(), requires_grad=False,
                                 compress_statistics=True, quant_type="nf4",
                                 blocksize=64).to(self.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        """The exact dense weight the NF4 contenders compute with."""
        import bitsandbytes.functional as bnbf

        q = self.quantized()
        return bnbf.dequantize_4bit(q.data, q.quant_state).to(self.weight.dtype)

    def clone(self) -> "Problem":
        """Same values in fresh memory (for input rotation)."""
        def c(t):
            return None if t is None else t.detach().clone()

        return replace(self, x=c(self.x), weight=c(self.weight), bias=c(self.bias),
                       down=c(self.down), scale=c(self.scale), up=c(self.up), dy=c(self.dy))

    def nbytes(self) -> int:
        """Bytes of the dense operands (for sizing the rotation pool)."""
        every = (self.x, self.weight, self.bias, self.down, self.scale, self.up, self.dy)
        return sum(t.numel() * t.element_size() for t in every if t is not None)


def make_problem(case: Case, *, dtype=torch.float32, device="cpu", adapter="lora",
                 dropout_p=0.0, seed=0) -> Problem:
    """Random inputs for ``case``. ``adapter='lora'``: all R rows trainable with
    ``s = alpha / R`` (exactly PEFT's rank-R LoRA). ``adapter='speclora'``: ``D = [A; Q_k.T]``,
    ``s = [alpha/r; sigma_k * m]``, ``U = [B, P_k]`` with only the r LoRA rows trainable
    and dropped out (the README's "Methods" table)."""
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    g = torch.Generator().manual_seed(seed)
    k_in, n_out = case.shape.in_features, case.shape.out_features
    r, k = case.rank.r, case.rank.k
    rank = r + k

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = randn(case.tokens, k_in)
    weight = randn(n_out, k_in, std=k_in ** -0.5)
    bias = randn(n_out, std=0.1) if case.shape.bias else None
    # B nonzero (unlike a fresh LoRA) so the adapter path is visible in every check.
    down = randn(rank, k_in, std=k_in ** -0.5)
    up = randn(n_out, rank, std=rank ** -0.5)
    if adapter == "lora":
        alpha = 2.0 * rank
        scale = torch.full((rank,), alpha / rank, device=device, dtype=dtype)
        rows = rank
    else:
        # Frozen spectral rows: orthonormal singular vectors of a random matrix stand in
        # for W0's (their values do not change the timing); mask m nonzero.
        alpha = 2.0 * r
        q_in = torch.linalg.qr(torch.randn(k_in, k, generator=g, dtype=torch.float64))[0]
        p_out = torch.linalg.qr(torch.randn(n_out, k, generator=g, dtype=torch.float64))[0]
        down[r:] = q_in.T.to(down)
        up[:, r:] = p_out.to(up)
        sigma = torch.linspace(2.0, 1.0, k, dtype=torch.float64)
        mask = torch.randn(k, generator=g, dtype=torch.float64) * 0.1
        scale = torch.cat([torch.full((r,), alpha / r, dtype=torch.float64), sigma * mask])
        scale = scale.to(device=device, dtype=dtype)
        rows = r
    dy = randn(case.tokens, n_out)
    return Problem(case, x, weight, bias, down, scale, up, dy, float(dropout_p), rows, rows,
                   alpha)


@dataclass
class Bound:
    """One contender bound to one problem.

    ``run(x)``: the output in the current mode; ``set_training(flag)``: switch between
    inference (no dropout) and training, once per timed mode, not per call; ``params``:
    trainable tensors by role (``down``/``up`` when they map onto ``D``/``U``).
    """

    run: Callable[[torch.Tensor], torch.Tensor]
    set_training: Callable[[bool], None]
    params: dict[str, torch.Tensor]
    nf4: bool = False
    adapter: bool = True
    tolerance: float | None = None
    """Relative error allowed vs float64 when the contender computes in a narrower type
    than its inputs (None: the dtype's tolerance)."""

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        self.set_training(False)
        return self.run(x)


def _trainable(p: Problem):
    return (p.down.detach().clone().requires_grad_(True),
            p.up.detach().clone().requires_grad_(True))


class _Wrap(nn.Module):
    """The smallest model PEFT can wrap: one projection named ``proj``."""

    def __init__(self, proj: nn.Module, loaded_in_4bit: bool = False):
        super().__init__()
        self.proj = proj
        # What transformers sets on a bnb-4bit model; PEFT reads it to pick its
        # bitsandbytes LoRA layer (peft.tuners.lora.bnb.Linear4bit).
        self.is_loaded_in_4bit = loaded_in_4bit

    def forward(self, x):
        return self.proj(x)


def _frozen_linear(p: Problem) -> nn.Linear:
    lin = nn.Linear(p.weight.shape[1], p.weight.shape[0], bias=p.bias is not None,
                    device=p.weight.device, dtype=p.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(p.weight)
        if p.bias is not None:
            lin.bias.copy_(p.bias)
    lin.requires_grad_(False)
    return lin


def _peft_on(p: Problem, base: nn.Module, loaded_in_4bit: bool):
    """PEFT's own LoRA code path around ``base``, loaded with our adapter as rank-R LoRA."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise Unavailable(f"peft not installed ({err})") from None
    config = LoraConfig(r=p.rank, lora_alpha=p.alpha, target_modules=["proj"],
                        lora_dropout=p.dropout_p, bias="none")
    # autocast_adapter_dtype=False keeps the adapter in the problem's dtype (PEFT's
    # default would upcast bf16 adapters to fp32: slower, so not its best case).
    model = get_peft_model(_Wrap(base, loaded_in_4bit), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    scaling = layer.scaling["default"]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a.data, b.data = a.data.to(p.x.dtype), b.data.to(p.x.dtype)
    with torch.no_grad():
        a.copy_(p.down)
        b.copy_(p.up * (p.scale / scaling))

    # lora_A is D; lora_B is U only when s is PEFT's uniform scaling (adapter='lora').
    same = bool(torch.all(p.scale == scaling)) and p.grad_rows == p.rank
    params = {"down": a, "up": b} if same else {"lora_A": a, "lora_B": b}
    return layer, Bound(model, model.train, params)


def _expect(layer, cls) -> None:
    """PEFT picks its layer class by inspecting the base; time only the intended path."""
    if not isinstance(layer, cls):
        raise RuntimeError(f"PEFT built {type(layer).__name__}, expected {cls.__module__}."
                           f"{cls.__name__}")


# ---------------------------------------------------------------- contender: nn.Linear
def build_linear(p: Problem) -> Bound:
    """The base matmul alone (``nn.Linear``, frozen): the floor every adapter pays."""
    lin = _frozen_linear(p)
    return Bound(lin, lin.train, {}, adapter=False)


# ---------------------------------------------------------------- contender: HF PEFT LoRA
def build_peft(p: Problem) -> Bound:
    """HF PEFT LoRA, unfused: ``get_peft_model`` on an ``nn.Linear``."""
    layer, bound = _peft_on(p, _frozen_linear(p), loaded_in_4bit=False)
    from peft.tuners.lora.layer import Linear as LoraLinear
    _expect(layer, LoraLinear)
    return bound


# ------------------------------------------------ contender: bitsandbytes Linear4bit + PEFT
def build_bnb_peft(p: Problem) -> Bound:
    """QLoRA as users run it: bnb ``Linear4bit`` (nf4, double quant) + PEFT LoRA."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise Unavailable(f"bitsandbytes not installed ({err})") from None
    n_out, k_in = p.weight.shape
    q = bnb.nn.Linear4bit(k_in, n_out, bias=p.bias is not None, compute_dtype=p.x.dtype,
                          compress_statistics=True, quant_type="nf4", device=p.x.device)
    q.weight = p.quantized()
    if p.bias is not None:
        q.bias = nn.Parameter(p.bias.detach().clone(), requires_grad=False)
    layer, bound = _peft_on(p, q, loaded_in_4bit=True)
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    _expect(layer, LoraLinear4bit)
    bound.nf4 = True
    if p.x.device.type == "cpu" and q.support_avx512bf16_for_cpu:
        # bnb's CPU inference kernel (gemv_4bit, AVX512-BF16) computes in bf16 whatever
        # the compute dtype, so it is checked at bf16 tolerance.
        bound.tolerance = tolerance(torch.bfloat16)
    return bound


# ------------------------------------------ contenders: PEFT's LoRA under patch_peft (ours)
def _patched(bound: Bound) -> Bound:
    """The same PEFT model with its LoRA layers on the fused op (``patch_peft(model)``:
    this model only, so the unpatched contenders stay PEFT's own)."""
    try:
        from speclora_kernels.peft import patch_peft
    except ImportError as err:
        raise Unavailable(f"speclora_kernels.peft unavailable ({err})") from None
    if patch_peft(bound.run) != 1:
        raise RuntimeError("patch_peft found no PEFT LoRA layer to patch")
    return bound


def build_peft_patched(p: Problem) -> Bound:
    """HF PEFT LoRA after ``speclora_kernels.patch_peft()``: PEFT's layer, our fused op."""
    return _patched(build_peft(p))


def build_bnb_peft_patched(p: Problem) -> Bound:
    """bnb ``Linear4bit`` + PEFT LoRA after ``patch_peft()``: the NF4 fused op."""
    return _patched(build_bnb_peft(p))


def _op_bound(p: Problem, op, weight, nf4=False) -> Bound:
    down, up = _trainable(p)
    mode = {"training": False}

    def run(x):
        return op(x, weight, p.bias, down, p.scale, up, p.dropout_p, p.dropout_rows,
                  p.grad_rows, training=mode["training"])

    def set_training(flag):
        mode["training"] = flag

    return Bound(run, set_training, {"down": down, "up": up}, nf4=nf4)


# ---------------------------------------------------------------- contender: our reference op
def build_reference(p: Problem) -> Bound:
    """``speclora_kernels.ops.reference_adapter_linear``: plain PyTorch, fp32 accumulation."""
    from speclora_kernels.ops import reference_adapter_linear as fused_adapter_linear
    return _op_bound(p, fused_adapter_linear, p.weight)


# ---------------------------------------------------------------- contender: our fused op (dense)
def build_fused(p: Problem) -> Bound:
    """``speclora_kernels.ops.fused_adapter_linear`` on the dense weight."""
    from speclora_kernels.ops import fused_adapter_linear
    return _op_bound(p, fused_adapter_linear, p.weight)


# ---------------------------------------------------------------- contender: our fused op (NF4)
def build_fused_nf4(p: Problem) -> Bound:
    """``speclora_kernels.ops.fused_adapter_linear`` on the NF4 weight."""
    from speclora_kernels.ops import fused_adapter_linear
    from speclora_kernels.quant import NF4Weight

    # bnb's own codes and scales, as they are (no re-quantization)
    return _op_bound(p, fused_adapter_linear, NF4Weight.from_bnb(p.quantized()), nf4=True)


CONTENDERS: dict[str, Callable[[Problem], Bound]] = {
    "linear": build_linear,
    "peft": build_peft,
    "bnb_peft": build_bnb_peft,
    "reference": build_reference,
    "fused": build_fused,
    "fused_nf4": build_fused_nf4,
    "peft_patched": build_peft_patched,
    "bnb_peft_patched": build_bnb_peft_patched,
}
"""Name -> builder, in table order."""

BASELINE = {"linear": None, "peft": None, "bnb_peft": None, "reference": "peft",
            "fused": "peft", "fused_nf4": "bnb_peft", "peft_patched": "peft",
            "bnb_peft_patched": "bnb_peft"}
"""Who each contender's speed-up is measured against (same weight format)."""


# ------------------------------------------------------------ the contenders, predicted
def peft_launches(ops, tokens: int, k_in: int, n_out: int, rank: int, element_size: int) -> list:
    """``tools.gpu_model`` launches of PEFT's op sequence (``tools.floors.
    peft_lora_forward_ops``, bytes counted per op) for the counted table: its GEMMs as cuBLAS
    launches (``gpu_model.cublas``: GEMV efficiency at decode, tile re-reads from L2 as
    ours), bnb's fused 4-bit kernel at ``gpu_model.BNB_GEMV_4BIT``, every other op (bnb's
    dequantize, PyTorch's elementwise kernels) streaming at ``gpu_model.STREAM``; each
    launch at least ``Model.min_launch`` (the efficiencies' sources are stated there)."""
    from speclora_kernels.tools import gpu_model as gm

    gemms = {"base linear x@W.T+b": (n_out, k_in), "lora_A x@A.T": (rank, k_in),
             "lora_B h@B.T": (n_out, rank)}
    out = []
    for op in ops:
        if op.name in gemms:
            out.append(gm.cublas(op.name, tokens, *gemms[op.name], op.bytes, op.flops,
                                 element_size))
        else:
            fused = op.name.startswith("bnb gemm_4bit")
            out.append(gm.contender(op.name, op.bytes, op.flops,
                                    gm.BNB_GEMV_4BIT if fused else gm.STREAM))
    return out


# ------------------------------------------------------------------------- the check
def tolerance(dtype: torch.dtype) -> float:
    """Relative Frobenius error allowed against the float64 reference."""
    return 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2


def expected_output(p: Problem, bound: Bound) -> torch.Tensor:
    """The float64 ground truth for ``bound`` (inference, no dropout)."""
    from speclora_kernels.ops import reference_adapter_linear as fused_adapter_linear

    w = p.dequantized_weight() if bound.nf4 else p.weight
    d = torch.float64
    bias = None if p.bias is None else p.bias.to(d)
    if not bound.adapter:
        return torch.nn.functional.linear(p.x.to(d), w.to(d), bias)
    return fused_adapter_linear(p.x.to(d), w.to(d), bias, p.down.to(d), p.scale.to(d),
                                p.up.to(d), training=False)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.detach().to(torch.float64)
    return float(torch.linalg.vector_norm(got - want)
                 / torch.linalg.vector_norm(want).clamp_min(1e-30))


def check_output(name: str, p: Problem, bound: Bound) -> float:
    """Inference output of ``bound`` vs float64; raise AssertionError naming the contender."""
    with torch.no_grad():
        y = bound.infer(p.x)
    if y.shape != p.dy.shape or y.dtype != p.x.dtype:
        raise AssertionError(f"{name}: output {y.dtype} {tuple(y.shape)}, expected "
                             f"{p.x.dtype} {tuple(p.dy.shape)}")
    err = relative_error(y, expected_output(p, bound))
    tol = max(tolerance(p.x.dtype), bound.tolerance or 0.0)
    if not math.isfinite(err) or err > tol:
        raise AssertionError(f"{name}: relative error {err:.3g} vs float64 reference on "
                             f"{p.case.label} exceeds {tol:g}")
    return err


def check_gradients(name: str, p: Problem, build: Callable[[Problem], Bound]) -> float:
    """Training-mode backward of a fresh ``build`` (dropout off) vs float64 autograd of the
    reference: ``dx`` always, ``dD``/``dU`` for the tensors a contender names ``down``/``up``.
    Returns the worst relative error; raises AssertionError naming the contender."""
    from speclora_kernels.ops import reference_adapter_linear as fused_adapter_linear

    p = replace(p, dropout_p=0.0)
    bound = build(p)
    bound.set_training(True)
    x = p.x.detach().clone().requires_grad_(True)
    bound.run(x).backward(p.dy)
    d = torch.float64
    w = (p.dequantized_weight() if bound.nf4 else p.weight).to(d)
    x64 = p.x.detach().to(d).requires_grad_(True)
    down64 = p.down.detach().to(d).requires_grad_(True)
    up64 = p.up.detach().to(d).requires_grad_(True)
    bias = None if p.bias is None else p.bias.to(d)
    if bound.adapter:
        y64 = fused_adapter_linear(x64, w, bias, down64, p.scale.to(d), up64,
                                   grad_rows=p.grad_rows)
    else:
        y64 = torch.nn.functional.linear(x64, w, bias)
    y64.backward(p.dy.to(d))
    pairs = [("dx", x.grad, x64.grad)]
    pairs += [(f"d{role}", bound.params[role].grad, ref.grad)
              for role, ref in (("down", down64), ("up", up64)) if role in bound.params]
    worst = 0.0
    for what, got, want in pairs:
        if got is None:
            raise AssertionError(f"{name}: {what} is None after backward on {p.case.label}")
        err = relative_error(got, want)
        if not math.isfinite(err) or err > tolerance(p.x.dtype):
            raise AssertionError(f"{name}: {what} relative error {err:.3g} vs float64 on "
                                 f"{p.case.label} exceeds {tolerance(p.x.dtype):g}")
        worst = max(worst, err)
    return worst
