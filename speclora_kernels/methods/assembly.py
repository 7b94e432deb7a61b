"""How a method declares the op's ``(D, s, U)`` so the layer can build them with no op, or few.

``AdapterMethod.factors()`` is the reference: plain autograd ops that build ``(D, s, U)`` as
the README's "Methods" table defines them. Every call of an adapted layer needs them, so a
method may also declare them (:meth:`AdapterMethod.op_spec`) as row groups of elements,
each group a ``(D rows, s entries, U columns)`` triple, concatenated in order:

- :class:`Param`: a trainable parameter used as it is (no op). In a ``D`` or ``s`` of
  several rows the layer stores it inside one contiguous buffer with the other rows (the
  parameter is a view of that buffer), so no concatenation runs either.
- :class:`Frozen`: a tensor computed from the method's buffers only, cached by the layer
  until a source changes (its version counter, identity, dtype or device).
- :class:`Computed`: a tensor the method computes from its parameters on each call, in
  :meth:`AdapterMethod.op_computed` (autograd ops; few, ideally one).

The declared factors may differ from ``factors()`` but must give the same ``U diag(s) D``
and keep its first ``grad_rows`` / ``dropout_rows`` rows (those the op differentiates and
drops out): e.g. a frozen scale may move from ``s`` into a frozen ``U`` column.
``OpSpec.stacks`` names parameters of one shape that ``op_computed`` wants as one stacked
tensor (stored as one buffer: no stack op); ``OpSpec.frozen`` names the frozen tensors it
reads. Both arrive in ``op_computed``'s mapping by name.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Union

import torch


@dataclass(frozen=True)
class Param:
    """The trainable parameter ``name`` of the method, as it is."""

    name: str


@dataclass(frozen=True)
class Frozen:
    """``build(*sources)`` of the method's buffers named ``sources`` (the buffer itself
    without ``build``); it must read nothing else, so the layer can cache it by its
    sources."""

    sources: tuple[str, ...]
    build: Callable[..., torch.Tensor] | None = None

    def __init__(self, *sources: str, build=None):
        object.__setattr__(self, "sources", tuple(sources))
        object.__setattr__(self, "build", build)
        if not sources or (build is None and len(sources) != 1):
            raise ValueError("Frozen takes one source, or several with a build function")


@dataclass(frozen=True)
class Computed:
    """The tensor ``op_computed(...)[name]``."""

    name: str


Element = Union[Param, Frozen, Computed]


@dataclass(frozen=True)
class OpSpec:
    """Row groups ``(D, s, U)`` of the op's factors, plus what ``op_computed`` reads."""

    rows: tuple[tuple[Element, Element, Element], ...]
    stacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    frozen: Mapping[str, Frozen] = field(default_factory=dict)


def transpose(t: torch.Tensor) -> torch.Tensor:
    """``t.T`` contiguous (e.g. ``Q.T``, the frozen rows of ``D``)."""
    return t.T.contiguous()


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 or better: what the small frozen solves and products of the methods run in."""
    return torch.promote_types(t.dtype, torch.float32)


__all__ = ["Param", "Frozen", "Computed", "Element", "OpSpec", "transpose", "acc_dtype"]
