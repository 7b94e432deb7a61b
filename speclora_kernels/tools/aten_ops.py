"""Count the aten compute ops an ``AdapterLinear`` call runs around the fused op.

    python -m speclora_kernels.tools.aten_ops [--dtype bfloat16] [--device cpu]
        [--base dense|nf4|linear4bit] [--detail]

Every aten op is a kernel launch on a GPU, a few µs each at decode against ~13 µs for the
whole fused 4096² layer. A ``TorchDispatchMode`` sees every op that reaches a backend
kernel; view and metadata ops (``t``, ``slice``, ``detach``, ``as_strided``, empty
allocations) launch nothing and are not counted. The op's own work (aten ops its CPU
backend runs, Triton launches) runs inside ``ops.fused_adapter_linear`` (and, in backward,
``ops.autograd.run_backward``) and is counted apart from the ops around it.

For every method the command prints, per layer call: inference (``torch.no_grad``) first
call and the calls after it (factors cached), and training (grad enabled, parameters
requiring grad) forward and backward.
"""
from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import ops
from ..methods import METHODS
from ..modules import AdapterLinear
from ..ops import autograd as op_autograd
from ..quant import NF4Weight

# Bases: dense; "nf4": quantize="nf4" from a dense layer (spectral methods quantize W_res);
# "linear4bit": an NF4 W0 as a bitsandbytes Linear4bit holds it (spectral methods subtract
# their term through frozen correction rows: R = 2r).
BASES = ("dense", "nf4", "linear4bit")

# Ops that allocate or re-describe memory without running a kernel on its contents.
NON_COMPUTE = frozenset({
    "aten::detach", "aten::alias", "aten::lift_fresh", "aten::empty", "aten::empty_strided",
    "aten::empty_like", "aten::new_empty", "aten::new_empty_strided", "aten::set_",
    "aten::resize_", "aten::_reshape_alias", "aten::view", "aten::_unsafe_view",
    "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset",
    "aten::is_contiguous", "aten::is_same_size",
})


def is_compute(func) -> bool:
    """Whether ``func`` (an aten OpOverload) runs a kernel: it returns a tensor, none of its
    outputs is a view (aliases an input without writing it) and it is no metadata or
    allocation op."""
    schema = func._schema
    if schema.name in NON_COMPUTE or not any("Tensor" in str(r.type) for r in schema.returns):
        return False
    return not any(r.alias_info is not None and not r.alias_info.is_write
                   for r in schema.returns)


@dataclass
class OpCounts:
    """aten compute ops by name, around the op and inside it, and the op's Triton launches."""

    around: Counter = field(default_factory=Counter)
    inside: Counter = field(default_factory=Counter)
    launches: int = 0
    op_calls: int = 0

    @property
    def n_around(self) -> int:
        return sum(self.around.values())

    @property
    def n_inside(self) -> int:
        return sum(self.inside.values())

    def describe(self) -> str:
        return ", ".join(f"{name.removeprefix('aten.')} {n}" if n > 1 else
                         name.removeprefix("aten.") for name, n in sorted(self.around.items()))


class _Recorder(TorchDispatchMode):
    def __init__(self, counts: OpCounts):
        super().__init__()
        self.counts, self.depth = counts, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_compute(func):
            name = str(func.overloadpacket)
            (self.counts.inside if self.depth else self.counts.around)[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_ops():
    """Count the aten compute ops run in the block (yields an :class:`OpCounts`, filled in as
    the block runs): those inside the op (``ops.fused_adapter_linear``, the op's backward)
    apart from those around it."""
    counts = OpCounts()
    recorder = _Recorder(counts)
    real_op, real_bwd = ops.fused_adapter_linear, op_autograd.run_backward

    def inside(fn, is_call):
        def wrapped(*args, **kwargs):
            recorder.depth += 1
            counts.op_calls += is_call
            try:
                return fn(*args, **kwargs)
            finally:
                recorder.depth -= 1
        return wrapped

    try:
        from ..ops import tuning
        launches_cm = tuning.record_launches()
    except ImportError:  # no triton: the op runs its CPU backend
        launches_cm = contextlib.nullcontext([])
    ops.fused_adapter_linear = inside(real_op, True)
    op_autograd.run_backward = inside(real_bwd, False)
    try:
        with launches_cm as launches, recorder:
            yield counts
    finally:
        ops.fused_adapter_linear, op_autograd.run_backward = real_op, real_bwd
    counts.launches = len(launches)


def layer_call_counts(layer: AdapterLinear, x: torch.Tensor, *, calls: int = 2) -> dict:
    """Op counts of ``layer(x)``: ``inference`` (under no_grad; a list, one per call: the
    first builds the cached factors), then ``training_forward`` / ``training_backward`` (grad
    enabled; backward of ``y`` against a random ``dy``). The layer is put in train mode for
    the training call and left so."""
    result = {"inference": []}
    layer.eval()
    for _ in range(calls):
        with torch.no_grad(), count_ops() as counts:
            layer(x)
        result["inference"].append(counts)
    layer.train()
    with count_ops() as fwd:
        y = layer(x)
    dy = torch.randn_like(y)
    with count_ops() as bwd:
        y.backward(dy)
    result["training_forward"], result["training_backward"] = fwd, bwd
    return result


OPTIONS = {"speclora": {"k": 16}}


def build_layer(method: str, *, size: int = 256, r: int = 8, dtype=torch.bfloat16,
                device="cpu", base: str = "dense") -> AdapterLinear:
    """A ``size`` x ``size`` layer of ``method`` with parameters away from init, computing
    in ``dtype``, on a base of kind ``base`` (one of :data:`BASES`)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(size, size, dtype=dtype, device=device)
    options = dict(r=r, **OPTIONS.get(method, {}))
    if base == "linear4bit":
        nf4 = NF4Weight.quantize(linear.weight.detach(), backend="torch")
        adapter = METHODS[method](nf4.dequantize(torch.float32), **options)
        layer = AdapterLinear(nf4, linear.bias.detach(), adapter, compute_dtype=dtype,
                              residual_base=not adapter.replaces_base)
    else:
        kw = dict(quantize="nf4") if base == "nf4" else {}
        layer = AdapterLinear.from_linear(linear, method, **options, **kw)
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


def method_table(methods=None, *, dtype=torch.bfloat16, device="cpu", base="dense",
                 tokens: int = 4) -> list[tuple[str, dict]]:
    """``(method, layer_call_counts(...))`` for every method (or ``methods``)."""
    rows = []
    for method in methods or sorted(METHODS):
        layer = build_layer(method, dtype=dtype, device=device, base=base)
        x = torch.randn(tokens, layer.in_features, dtype=dtype, device=device)
        rows.append((method, layer_call_counts(layer, x)))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--base", default="dense", choices=BASES,
                    help="nf4: quantize='nf4'; linear4bit: an NF4 W0 base, as from bitsandbytes")
    ap.add_argument("--detail", action="store_true", help="name the ops around the op")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"aten compute ops around the op per AdapterLinear call ({args.dtype} activations, "
          f"float32 adapter, {args.base} base, {args.device})")
    print("| method | inference, first call | inference, cached | training forward "
          "| training backward |")
    print("|---|---|---|---|---|")
    for method, c in method_table(dtype=dtype, device=args.device, base=args.base):
        first, cached = c["inference"][0], c["inference"][-1]
        cells = [first, cached, c["training_forward"], c["training_backward"]]
        text = [f"{k.n_around}" + (f" ({k.describe()})" if args.detail and k.n_around else "")
                for k in cells]
        print(f"| {method} | " + " | ".join(text) + " |")
    print("(the op itself, not counted above: one call per layer call; its CPU backend's "
          "aten ops or its Triton launches)")


if __name__ == "__main__":
    main()
