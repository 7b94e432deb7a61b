"""Several adapters of one layer combined into one adapter of the same method.

The rules (``speclora_kernels.fuse_adapters`` and the PEFT tuners' ``add_weighted_adapter``
both use :func:`combine_adapters`; ``w_i`` are the weights):

- **Spectral slices** (``spectral_additive``, ``spectral_rotational``): adapters on
  disjoint slices ``offset_i .. offset_i + r_i - 1`` that together tile one range fuse
  exactly into one adapter of the same variant on that range (``r = sum r_i``, ``offset``
  the smallest): each keeps its own factors as a block of rows of the fused ``(D, s, U)``.
  Additive: ``A``, ``B``, ``P``, ``sigma``, ``Q`` concatenated (its ``U diag(s) D`` is a sum
  over columns). Rotational: ``X_U``, ``X_V`` block diagonal (the Cayley map of a block
  diagonal matrix is block diagonal), ``c`` concatenated. The layer's base becomes ``W0``
  minus every slice. Refused: overlapping slices, a gap (the fused ``offset`` / ``r`` would
  not name its triplets), the two variants mixed, weights other than 1 (a slice's change
  ``P' diag(s') Q'.T - P diag(sigma) Q.T`` is not linear in its parameters, so ``w`` times
  it is no slice of the same form).
- **LoRA family**, PEFT's ``add_weighted_adapter`` semantics. ``cat``: ``lora`` /
  ``speclora`` LoRA parts concatenated along the rank with ``w_i * alpha_i / r_i`` folded
  into each ``B_i`` (``alpha = r``, scale 1): exactly ``sum w_i delta_i``. ``linear`` (ranks
  equal): ``A = sum sqrt(w_i s_i) A_i``, ``B = sum sqrt(w_i s_i) B_i`` as PEFT, an
  approximation (cross terms ``B_i A_j``). SpecLoRA's mask and PiCa's ``M`` are linear in
  their delta over shared frozen factors, so both rules sum them, ``sum w_i m_i`` and
  ``sum w_i M_i``: exact, provided the adapters' frozen ``P``, ``sigma``, ``Q`` are identical
  (same base, same SVD), else refused.
- Anything else (two methods, an unknown method) is refused.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import AdapterMethod, deferred_svd

COMBINATIONS = ("cat", "linear")
SPECTRAL = ("spectral_additive", "spectral_rotational")
LORA_FAMILY = ("lora", "speclora", "pica")


class CombineError(ValueError):
    """Adapters that no declared rule combines (the message says which rule refused)."""


def check_weights(weights, count: int) -> list[float]:
    """``weights`` (None: all 1) as ``count`` finite floats."""
    if weights is None:
        return [1.0] * count
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be None or a list of {count} numbers, got {weights!r}")
    weights = list(weights)
    if len(weights) != count or any(isinstance(w, bool) or not isinstance(w, (int, float))
                                    or not math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be {count} finite numbers (one per adapter), got "
                         f"{weights!r}")
    return [float(w) for w in weights]


def combine_adapters(parts: Sequence[AdapterMethod], weights: Sequence[float],
                     combination: str = "cat", *, shared=None) -> AdapterMethod:
    """One adapter of the parts' method equal to ``sum w_i delta_i`` (see the module doc;
    ``linear`` approximates it). ``parts``: the adapters of one layer (their tensors are
    read, not changed). ``shared``: for PiCa, the ``M`` of the layer owning this layer's
    sharing group, already combined. Raises :class:`CombineError` naming the rule."""
    if combination not in COMBINATIONS:
        raise CombineError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
    if len(parts) < 2:
        raise CombineError(f"combine at least 2 adapters, got {len(parts)}")
    methods = sorted({p.name for p in parts})
    shapes = {(p.out_features, p.in_features) for p in parts}
    if len(shapes) > 1:
        raise CombineError(f"the adapters are for weights of different shapes {sorted(shapes)}")
    dtypes = {next(p.parameters()).dtype for p in parts}
    if len(dtypes) > 1:
        raise CombineError(f"the adapters have different dtypes {sorted(map(str, dtypes))}")
    if set(methods) <= set(SPECTRAL):
        return _slices(parts, weights, combination)
    if len(methods) > 1 or methods[0] not in LORA_FAMILY:
        raise CombineError(f"no rule combines methods {methods}: spectral slices fuse with "
                           f"spectral slices of one variant, lora / speclora / pica each with "
                           f"adapters of their own method")
    if methods[0] == "pica":
        return _pica(parts, weights, shared)
    return _lora(parts, weights, combination)


def _new(cls, like: AdapterMethod, **options) -> AdapterMethod:
    """A zero-state adapter of ``cls`` with ``like``'s shape, dtype and device, no SVD (its
    frozen factors are placeholders the caller fills)."""
    param = next(like.parameters())
    weight = torch.empty((), dtype=param.dtype, device=param.device).expand(
        like.out_features, like.in_features)
    with deferred_svd():  # a generator of its own: the global RNG is not drawn from
        adapter = cls(weight, adapter_dtype=param.dtype,
                      generator=torch.Generator(device=param.device), **options)
    adapter.svd_pending = None
    return adapter


@torch.no_grad()
def _fill(adapter: AdapterMethod, tensors: dict) -> AdapterMethod:
    own = dict(adapter.named_parameters()) | dict(adapter.named_buffers())
    for name, t in tensors.items():
        own[name].copy_(t)
    return adapter


def _slices(parts, weights, combination) -> AdapterMethod:
    if combination != "cat":
        raise CombineError(f"spectral slices fuse by concatenation only (combination='cat'), "
                           f"got {combination!r}")
    if any(w != 1 for w in weights):
        raise CombineError(f"spectral slices fuse with weights 1 only, got {list(weights)}: a "
                           f"slice's change is not linear in its parameters, so a weighted "
                           f"change is no slice of the same form")
    if len({p.name for p in parts}) > 1:
        raise CombineError("spectral_additive and spectral_rotational slices do not fuse into "
                           "one adapter; fuse adapters of one variant")
    parts = sorted(parts, key=lambda p: p.offset)
    spans = [(p.offset, p.offset + p.r) for p in parts]
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        if b0 < a1:
            raise CombineError(f"the slices overlap: singular indices [{a0}, {a1}) and "
                               f"[{b0}, {b1}) (offset, offset + r); adapters to fuse need "
                               f"disjoint offsets")
        if b0 > a1:
            raise CombineError(f"the slices leave a gap: [{a0}, {a1}) then [{b0}, {b1}); "
                               f"fuse slices that tile one range (offsets 0, r, 2r, ...)")
    first = parts[0]
    fused = _new(type(first), first, r=sum(p.r for p in parts), offset=first.offset,
                 svd=first.svd)
    cat = {name: torch.cat([getattr(p, name) for p in parts], dim=1 if name != "sigma" else 0)
           for name in ("P", "sigma", "Q")}
    if first.name == "spectral_additive":
        cat["A"] = torch.cat([p.A for p in parts])
        cat["B"] = torch.cat([p.B for p in parts], dim=1)
    else:
        cat["X_U"] = torch.block_diag(*[p.X_U for p in parts])
        cat["X_V"] = torch.block_diag(*[p.X_V for p in parts])
        cat["c"] = torch.cat([p.c for p in parts])
    return _fill(fused, cat)


def _same_frozen(parts, names) -> None:
    first = parts[0]
    for p in parts[1:]:
        for name in names:
            a, b = getattr(first, name), getattr(p, name)
            if a.shape != b.shape or not torch.equal(a, b):
                raise CombineError(f"the {first.name} adapters' frozen {name} differ (another "
                                   f"base, another k / r, or another SVD); their deltas share "
                                   f"no factors to combine")


def _lora(parts, weights, combination) -> AdapterMethod:
    first = parts[0]
    scales = [w * p.alpha / p.r for p, w in zip(parts, weights)]
    extra = {}
    if first.name == "speclora":
        _same_frozen(parts, ("P", "sigma", "Q"))
        extra = {"k": first.k, "svd": first.svd}
    if combination == "cat":
        r = sum(p.r for p in parts)
        a = torch.cat([p.A for p in parts])
        b = torch.cat([s * p.B for p, s in zip(parts, scales)], dim=1)
    else:
        ranks = sorted({p.r for p in parts})
        if len(ranks) > 1:
            raise CombineError(f"combination='linear' needs adapters of one rank, got ranks "
                               f"{ranks}; use 'cat'")
        if any(s < 0 for s in scales):
            raise CombineError(f"combination='linear' takes sqrt(weight * alpha / r) (as PEFT), "
                               f"so weights must be >= 0, got {list(weights)}; use 'cat'")
        r = ranks[0]
        roots = [math.sqrt(s) for s in scales]
        a = sum(q * p.A for p, q in zip(parts, roots))
        b = sum(q * p.B for p, q in zip(parts, roots))
    fused = _new(type(first), first, r=r, alpha=r, **extra)
    tensors = {"A": a, "B": b}
    if first.name == "speclora":
        tensors.update(m=sum(w * p.m for p, w in zip(parts, weights)),
                       P=first.P, sigma=first.sigma, Q=first.Q)
    return _fill(fused, tensors)


def _pica(parts, weights, shared) -> AdapterMethod:
    _same_frozen(parts, ("Q",))
    first = parts[0]
    if shared is None:
        fused = _new(type(first), first, r=first.r, svd=first.svd)
        return _fill(fused, {"M": sum(w * p.M for p, w in zip(parts, weights)), "Q": first.Q})
    fused = _new(type(first), first, r=first.r, svd=first.svd, shared=shared)
    return _fill(fused, {"Q": first.Q})


__all__ = ["combine_adapters", "check_weights", "CombineError", "COMBINATIONS", "SPECTRAL",
           "LORA_FAMILY"]
