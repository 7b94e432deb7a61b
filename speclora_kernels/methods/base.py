"""What every adapter method provides to the layer.

A method is an ``nn.Module`` built from the pre-trained weight ``W0`` (out x in). It holds
its trainable parameters and frozen spectral factors (persistent buffers) and turns them
into the op's ``(D, s, U)``:

    W' = base + U diag(s) D,    D: R x in,  s: R,  U: out x R

with ``base`` = ``W0`` or, for methods that move the top singular directions into the
adapter, ``W_res = W0 - P_r diag(sigma_r) Q_r.T``.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from .assembly import Computed, OpSpec
from .options import Option, OptionContext
from .svd import top_singular

ADAPTER_DTYPES = (torch.float32, torch.float64)
_DEFER_SVD = contextvars.ContextVar("speclora_kernels_defer_svd", default=False)


@contextlib.contextmanager
def deferred_svd():
    """Methods built in this block register their frozen spectral factors as NaN
    placeholders and compute no SVD; ``compute_svd(weight)`` fills them later. For callers
    that may load saved factors over them (the PEFT layers), so that an SVD is never
    computed only to be thrown away, and never replaces the factors an adapter was
    trained with."""
    token = _DEFER_SVD.set(True)
    try:
        yield
    finally:
        _DEFER_SVD.reset(token)


def resolve_adapter_dtype(weight: torch.Tensor, adapter_dtype) -> torch.dtype:
    """Parameter dtype: float32 by default (float64 for a float64 base), like PEFT's
    ``autocast_adapter_dtype``; the layer casts ``D`` and ``U`` to the input's dtype."""
    if adapter_dtype is None:
        return torch.float64 if weight.dtype == torch.float64 else torch.float32
    if adapter_dtype not in ADAPTER_DTYPES:
        raise TypeError(f"adapter_dtype must be torch.float32 or torch.float64, "
                        f"got {adapter_dtype}")
    return adapter_dtype


class AdapterMethod(nn.Module):
    """Base class of the methods in :data:`speclora_kernels.methods.METHODS`.

    Subclasses set ``name``, ``options`` (the :class:`Option` declarations of the keyword
    arguments they take), ``replaces_base`` and ``takes_dropout``, and in ``__init__``
    (after ``super().__init__(weight, **options)``) the ints ``rank`` (R),
    ``dropout_rows`` (leading rows of D that are trainable down rows and see LoRA dropout)
    and ``grad_rows`` (leading rows of D / columns of U that receive gradient).

    ``__init__`` resolves the given options against the declaration (unknown options and
    bad values raise, naming the option), sets each saved option as an attribute
    (``self.r``, ``self.alpha``, ...) and keeps the runtime-only ones in
    ``self.runtime_options`` for the subclass to take.
    """

    name: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    replaces_base: ClassVar[bool] = False
    # Whether the method has a trainable down path that LoRA dropout acts on
    # (dropout_rows > 0).
    takes_dropout: ClassVar[bool] = False

    def __init__(self, weight: torch.Tensor, *, adapter_dtype=None, generator=None,
                 **options):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._dtype = resolve_adapter_dtype(weight, adapter_dtype)
        values = self.resolve_options(tuple(weight.shape), options, dtype=self._dtype,
                                      device=weight.device)
        self.runtime_options = {}
        for option in self.options:
            if option.saved:
                setattr(self, option.name, values[option.name])
            else:
                self.runtime_options[option.name] = values[option.name]
        self.rank = self.dropout_rows = self.grad_rows = 0

    # -- options
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(option.name for option in cls.options)

    @classmethod
    def saved_options(cls) -> tuple[Option, ...]:
        return tuple(option for option in cls.options if option.saved)

    @classmethod
    def check_option_names(cls, given: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` for a given (not None) option the method does not declare."""
        names = cls.option_names()
        for name, value in given.items():
            if value is not None and name not in names:
                raise ValueError(f"{name} is not used by method={cls.name!r} "
                                 f"(it takes {', '.join(names)})")

    @classmethod
    def resolve_options(cls, shape: tuple[int, int], given: Mapping[str, Any], *,
                        dtype: torch.dtype = torch.float32, device="meta") -> dict[str, Any]:
        """Every declared option's value for a weight of ``shape`` (out, in): the given one
        checked, or the default where it is not given (or None)."""
        cls.check_option_names(given)
        values: dict[str, Any] = {}
        for option in cls.options:
            context = OptionContext(shape[0], shape[1], dtype, torch.device(device),
                                    dict(values))
            values[option.name] = option.resolve(given.get(option.name), context)
        return values

    def _new(self, *shape, like: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(torch.zeros(*shape, dtype=self._dtype, device=like.device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(D, s, U)`` in the adapter dtype, differentiable w.r.t. the parameters. They
        must depend on the method's parameters and buffers only: the layer caches what it
        builds from them by their version counters."""
        raise NotImplementedError

    def op_spec(self) -> OpSpec:
        """How the layer builds the op's factors (see :mod:`.assembly`): by default one
        group computed by :meth:`factors`."""
        return OpSpec(rows=((Computed("D"), Computed("s"), Computed("U")),))

    def op_computed(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The :class:`~.assembly.Computed` elements of :meth:`op_spec` by name, from the
        stacked parameters and frozen tensors it declares (``tensors``, by name)."""
        down, scale, up = self.factors()
        return {"D": down, "s": scale, "U": up}

    def base_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The layer's frozen base built from the pre-trained ``weight``: ``weight`` itself
        (no copy) unless the method moves a frozen term into its factors."""
        term = self.frozen_term()
        if term is None:
            return weight
        acc = torch.promote_types(weight.dtype, term.dtype)
        return (weight.to(acc) - term.to(acc)).to(weight.dtype)

    def frozen_term(self) -> torch.Tensor | None:
        """The term ``W0 - base`` this method took out of the base (None if the base is W0)."""
        return None

    def config(self) -> dict:
        """What fixes the shapes and meaning of the state (for save/load): the method, its
        rank R and every saved option."""
        return {"method": self.name, "rank": self.rank,
                **{option.name: getattr(self, option.name) for option in self.saved_options()}}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class SpectralBuffers:
    """Mixin: registers singular triplets ``offset .. offset+n-1`` of ``W0`` (the top ``n``
    for ``offset = 0``) as persistent buffers ``P`` (out x n), ``sigma`` (n), ``Q`` (in x n),
    in the adapter dtype: the top ``offset + n`` are computed, the first ``offset`` dropped.

    Built under :func:`deferred_svd`, the buffers are NaN placeholders and ``svd_pending``
    is set until :meth:`compute_svd` (or a caller that loads saved factors) clears it."""

    # (n, svd, keep, generator, offset) while the SVD is deferred
    svd_pending: tuple | None = None

    def _register_svd(self, weight: torch.Tensor, n: int, svd: str, generator,
                      keep=("P", "sigma", "Q"), offset: int = 0) -> None:
        if _DEFER_SVD.get():
            shapes = {"P": (weight.shape[0], n), "sigma": (n,), "Q": (weight.shape[1], n)}
            for name in keep:
                self.register_buffer(name, torch.full(shapes[name], float("nan"),
                                                      dtype=self._dtype, device=weight.device))
            self.svd_pending = (n, svd, tuple(keep), generator, offset)
            return
        for name, t in zip(("P", "sigma", "Q"), _slice_svd(weight, n, svd, self._dtype,
                                                            generator, offset)):
            if name in keep:
                self.register_buffer(name, t)

    @torch.no_grad()
    def compute_svd(self, weight: torch.Tensor) -> None:
        """Fill the factors deferred by :func:`deferred_svd` from the pre-trained ``weight``
        (in place, on the buffers' device); nothing to do if they are not pending."""
        if self.svd_pending is None:
            return
        n, svd, keep, generator, offset = self.svd_pending
        computed = _slice_svd(weight, n, svd, self._dtype, generator, offset)
        for name, t in zip(("P", "sigma", "Q"), computed):
            if name in keep:
                getattr(self, name).copy_(t)
        self.svd_pending = None


def _slice_svd(weight, n: int, svd: str, dtype, generator, offset: int):
    """Singular triplets ``offset .. offset+n-1`` of ``weight``, contiguous."""
    p, sigma, q = top_singular(weight, offset + n, svd=svd, dtype=dtype, generator=generator)
    if offset == 0:
        return p, sigma, q
    return (p[:, offset:].contiguous(), sigma[offset:].contiguous(),
            q[:, offset:].contiguous())
