"""One fused call for a PEFT layer: its wrapped base (``nn.Linear`` or a bitsandbytes NF4
``Linear4bit``) plus the low-rank blocks of its active adapters, through
``speclora_kernels.ops.fused_adapter_linear``. Shared by our PEFT method layers and by
PEFT's own LoRA layers under :func:`~speclora_kernels.patch_peft`.

Several adapters become one ``(D, s, U)``: concatenating their factors along R is exact.
The op drops out the input of the leading ``dropout_rows`` rows of D and gives gradient to
the leading ``grad_rows``, so the blocks' rows are regrouped (dropped-out rows of every
block, then rows with gradient only, then frozen rows): the sum over R does not depend on
the order. Blocks whose dropout probability differs from the first one's are added in
plain PyTorch (``torch.nn.functional.dropout``): the op takes one probability.

A mixed-adapter batch (PEFT's ``adapter_names``) stacks the named adapters' blocks along R
once more, and the op scales each row by its adapter's row of a scale table
(:func:`mixed_forward`): one launch for every adapter in the batch.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..quant import NF4Weight

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Block:
    """One adapter's ``(D, s, U)`` (R x in, R, out x R), with LoRA dropout ``dropout_p`` on
    its first ``dropout_rows`` rows (0 when inactive) and gradient on its first
    ``grad_rows``."""

    down: torch.Tensor
    scale: torch.Tensor
    up: torch.Tensor
    dropout_p: float
    dropout_rows: int
    grad_rows: int


def linear4bit_class():
    """``bitsandbytes.nn.Linear4bit`` if bitsandbytes was imported, else None (a model
    cannot hold one then, and bitsandbytes is never imported just to check)."""
    bnb = sys.modules.get("bitsandbytes")
    return None if bnb is None else bnb.nn.Linear4bit


def base_kind(base: nn.Module) -> str | None:
    """``"dense"`` for an ``nn.Linear`` (or a subclass keeping its forward) with a plain
    floating weight, ``"nf4"`` for a quantized NF4 ``Linear4bit``, else None."""
    l4 = linear4bit_class()
    if l4 is not None and isinstance(base, l4):
        state = getattr(base.weight, "quant_state", None)
        return "nf4" if state is not None and state.quant_type == "nf4" else None
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return None
    w = base._parameters.get("weight")
    return "dense" if type(w) is nn.Parameter and w.dtype in _FLOATS else None


def nf4_weight(owner: nn.Module, base: nn.Module) -> NF4Weight:
    """The NF4 weight of ``base`` (bitsandbytes' codes and scales as they are), cached on
    ``owner`` until the base's weight, its quant state or its storage changes (merging,
    ``.to()``)."""
    w = base.weight
    key = (id(w), id(w.quant_state), w.data_ptr(), w.device)
    cached = owner.__dict__.get("_speclora_nf4")
    if cached is None or cached[0] != key:
        cached = (key, NF4Weight.from_bnb(w, w.quant_state))
        owner.__dict__["_speclora_nf4"] = cached
    return cached[1]


def _bnb_compute_input(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes' ``Linear4bit.forward`` does before its matmul: fix the quant
    state, settle ``compute_dtype`` on the first call, cast x to it and the bias to x's."""
    fix = getattr(sys.modules.get("bitsandbytes.nn.modules"),
                  "fix_4bit_weight_quant_state_from_module", None)
    if fix is not None:
        fix(base)
    if not getattr(base, "compute_type_is_set", True):
        base.set_compute_type(x)
        base.compute_type_is_set = True
    if base.compute_dtype is not None:
        x = x.to(base.compute_dtype)
    if base.bias is not None and base.bias.dtype != x.dtype:
        base.bias.data = base.bias.data.to(x.dtype)
    return x


def _dropped(b: Block) -> int:
    return b.dropout_rows if b.dropout_p > 0 else 0


def combine(blocks: list[Block]):
    """``(D, s, U, dropout_p, dropout_rows, grad_rows, rest)``: the blocks the op can take in
    one call (every block whose dropout is inactive or has the first active probability),
    rows regrouped as the module docstring says; ``rest``: the other blocks."""
    p = next((b.dropout_p for b in blocks if _dropped(b)), 0.0)
    fused = [b for b in blocks if not _dropped(b) or b.dropout_p == p]
    rest = [b for b in blocks if _dropped(b) and b.dropout_p != p]
    if len(fused) == 1:
        b = fused[0]
        return b.down, b.scale, b.up, p, _dropped(b), b.grad_rows, rest
    spans = [[(b, 0, _dropped(b)) for b in fused],
             [(b, _dropped(b), b.grad_rows) for b in fused],
             [(b, b.grad_rows, b.down.shape[0]) for b in fused]]
    order = [(b, lo, hi) for span in spans for b, lo, hi in span if hi > lo]
    dtype, sdtype = fused[0].down.dtype, torch.float32
    for b in fused:
        dtype = torch.promote_types(dtype, torch.promote_types(b.down.dtype, b.up.dtype))
        sdtype = torch.promote_types(sdtype, b.scale.dtype)
    down = torch.cat([b.down[lo:hi].to(dtype) for b, lo, hi in order])
    up = torch.cat([b.up[:, lo:hi].to(dtype) for b, lo, hi in order], dim=1)
    scale = torch.cat([b.scale[lo:hi].to(sdtype) for b, lo, hi in order])
    return (down, scale, up, p, sum(_dropped(b) for b in fused),
            sum(b.grad_rows for b in fused), rest)


def plain_adapter(x: torch.Tensor, b: Block) -> torch.Tensor:
    """``((x' @ D.T) * s) @ U.T`` of one block in plain PyTorch (x' with dropout on its first
    ``dropout_rows`` rows)."""
    down, up = b.down.to(x.dtype), b.up.to(x.dtype)
    rows = b.dropout_rows if b.dropout_p > 0 else 0
    parts = []
    if rows:
        parts.append(F.dropout(x, b.dropout_p, True) @ down[:rows].T)
    if rows < down.shape[0]:
        parts.append(x @ down[rows:].T)
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    acc = torch.promote_types(x.dtype, torch.float32)
    return ((t.to(acc) * b.scale.to(acc)).to(x.dtype)) @ up.T


def fused_forward(owner: nn.Module, base: nn.Module, x: torch.Tensor, blocks: list[Block],
                  extra_bias: torch.Tensor | None = None, kind: str | None = None) -> torch.Tensor:
    """``base(x) + extra_bias + sum of the blocks``, in one fused call where the op can.

    Dtypes as the unfused layers: a dense base computes in x's dtype (which must be the
    weight's) or, under ``torch.autocast``, in the autocast dtype and returns it; an NF4
    base computes in its ``compute_dtype`` (autocast dtype under autocast) and returns x's
    dtype, as bitsandbytes does. ``D`` and ``U`` keep their dtype (the op rounds them to
    the compute dtype as it loads them; gradients come back in theirs). ``kind``: the
    base's :func:`base_kind`, if the caller has it."""
    if len(blocks) == 1:  # the common case, without combine's bookkeeping
        b, rest = blocks[0], ()
        down, scale, up, p, grad_rows = b.down, b.scale, b.up, b.dropout_p, b.grad_rows
        rows = b.dropout_rows if p > 0 else 0
    else:
        down, scale, up, p, rows, grad_rows, rest = combine(blocks)
    return _call(owner, base, x, kind, extra_bias, down, scale, up, p, rows, grad_rows, rest)


def stack(blocks: dict[str, Block], same_frozen=None):
    """A mixed-adapter batch's factors: ``(D, U, table, grad_rows)``, every block's rows
    stacked along R and ``table`` (1 + blocks, R) its per-rank scales, row 0 zero (the base
    alone, PEFT's ``"__base__"``) and row ``1 + i`` block i's scales at its ranks, zero
    elsewhere. Frozen rows (from a block's ``grad_rows`` on) that ``same_frozen(a, b)`` says
    equal an earlier block's are stacked once and shared (SpecLoRA adapters of one base:
    ``Q_k.T`` / ``P_k`` projected once for every row; only the scales differ). Rows with
    gradient come first, so the op's ``grad_rows`` covers them."""
    trained = [(name, b, 0, b.grad_rows, "trained") for name, b in blocks.items() if b.grad_rows]
    frozen, spans, owners = [], {name: [] for name in blocks}, []
    for name, b in blocks.items():
        if b.grad_rows == b.down.shape[0]:
            continue
        owner = next((o for o in owners if same_frozen is not None and same_frozen(o, name)),
                     None)
        if owner is None:
            owners.append(name)
            frozen.append((name, b, b.grad_rows, b.down.shape[0], "frozen"))
        else:  # the owner's frozen rows, this block's scales for them
            spans[name].append((owner, "frozen", b.scale[b.grad_rows:]))
    parts, at, offset = trained + frozen, {}, 0
    for name, b, lo, hi, part in parts:
        at[name, part] = offset
        spans[name].append((name, part, b.scale[lo:hi]))
        offset += hi - lo
    dtype = parts[0][1].down.dtype
    for _, b, *_ in parts:
        dtype = torch.promote_types(dtype, torch.promote_types(b.down.dtype, b.up.dtype))
    down = torch.cat([b.down[lo:hi].to(dtype) for _, b, lo, hi, _ in parts])
    up = torch.cat([b.up[:, lo:hi].to(dtype) for _, b, lo, hi, _ in parts], dim=1)
    sdtype = torch.float64 if dtype == torch.float64 else torch.float32
    table = torch.zeros(len(blocks) + 1, offset, dtype=sdtype, device=down.device)
    for row, name in enumerate(blocks, 1):
        for owner, part, values in spans[name]:
            start = at[owner, part]
            table[row, start:start + values.shape[0]] = values
    return down, up, table, sum(b.grad_rows for _, b, *_ in trained)


_INDEX_CACHE: dict = {}


def row_index(table_rows: tuple, rows_per_sample: int, device) -> torch.Tensor:
    """The op's ``scale_index``: each sample's table row, repeated for its rows (a sequence's
    tokens), int32 on ``device``. Cached: a model's layers with the same adapters share one
    tensor, so it is copied to the device and checked once per batch, not once a layer."""
    key = (table_rows, rows_per_sample, device)
    index = _INDEX_CACHE.get(key)
    if index is None:
        if len(_INDEX_CACHE) > 64:
            _INDEX_CACHE.clear()
        index = torch.tensor(table_rows, dtype=torch.int32).repeat_interleave(rows_per_sample)
        index = _INDEX_CACHE[key] = index.to(device)
    return index


def mixed_forward(owner: nn.Module, base: nn.Module, x: torch.Tensor, adapter_names,
                  blocks: dict[str, Block], same_frozen=None,
                  kind: str | None = None) -> torch.Tensor:
    """PEFT's mixed-adapter batch, ``adapter_names[i]`` the adapter of sample ``x[i]``
    (``"__base__"`` or a name without a block: the base alone), as one fused call: the
    blocks stacked (:func:`stack`) and each row scaled by its sample's table row. Dtypes as
    :func:`fused_forward`; inference only (no dropout)."""
    down, up, table, grad_rows = _stacked(owner, blocks, same_frozen)
    where = {name: row for row, name in enumerate(blocks, 1)}
    rows = x.numel() // max(x.shape[0] * x.shape[-1], 1)
    index = row_index(tuple(where.get(n, 0) for n in adapter_names), rows, x.device)
    return _call(owner, base, x, kind, None, down, table, up, 0.0, 0, grad_rows, (), index)


def _stacked(owner: nn.Module, blocks: dict[str, Block], same_frozen):
    """:func:`stack`, kept on ``owner`` for inference while the blocks are the same tensors,
    unmodified (PEFT LoRA's parameters: a decode step then runs no op before the kernel).
    The entry holds the tensors it was built from, so their ids cannot be reused."""
    if torch.is_grad_enabled():
        return stack(blocks, same_frozen)
    tensors = [t for b in blocks.values() for t in (b.down, b.scale, b.up)]
    key = (tuple(blocks), tuple(b.grad_rows for b in blocks.values()),
           tuple(t._version for t in tensors))
    cached = owner.__dict__.get("_speclora_stacked")
    if (cached is None or cached[0] != key or len(cached[1]) != len(tensors)
            or any(a is not b for a, b in zip(cached[1], tensors))):
        cached = owner.__dict__["_speclora_stacked"] = (key, tensors, stack(blocks, same_frozen))
    return cached[2]


def _call(owner, base, x, kind, extra_bias, down, scale, up, p, rows, grad_rows, rest,
          scale_index=None):
    """The op on ``base``'s weight in the dtypes :func:`fused_forward` describes."""
    nf4 = (kind or base_kind(base)) == "nf4"
    kind = x.device.type
    autocast = torch.is_autocast_enabled(kind)
    out_dtype = x.dtype
    if nf4:
        weight = nf4_weight(owner, base)
        xc = x.to(torch.get_autocast_dtype(kind)) if autocast else _bnb_compute_input(base, x)
    else:
        weight = base._parameters["weight"]
        if autocast:
            out_dtype = torch.get_autocast_dtype(kind)
            xc, weight = x.to(out_dtype), weight.to(out_dtype)
        elif x.dtype != weight.dtype:
            raise TypeError(f"x must have the base weight's dtype {weight.dtype} (as "
                            f"nn.Linear), got {x.dtype}; or run under torch.autocast")
        else:
            xc = x
    bias = base._parameters["bias"]
    if extra_bias is not None:
        bias = extra_bias if bias is None else bias + extra_bias
    if bias is not None and bias.dtype != xc.dtype:
        bias = bias.to(xc.dtype)
    want = torch.float64 if xc.dtype == torch.float64 else torch.float32
    if scale.dtype != want:
        scale = scale.to(want)
    args = (xc, weight, bias, down, scale, up, p, rows, grad_rows, rest, scale_index)
    if autocast:
        with torch.autocast(kind, enabled=False):
            y = _run(*args)
    else:
        y = _run(*args)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _run(x, weight, bias, down, scale, up, p, rows, grad_rows, rest, scale_index):
    y = ops.fused_adapter_linear(x, weight, bias, down, scale, up, p, rows, grad_rows,
                                 training=p > 0, scale_index=scale_index)
    for b in rest:
        y = y + plain_adapter(x, b)
    return y
