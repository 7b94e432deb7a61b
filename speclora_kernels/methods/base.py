"""What every adapter method provides to the layer, and the argument checks they share.

A method is an ``nn.Module`` built from the pre-trained weight ``W0`` (out x in). It holds
its trainable parameters and frozen spectral factors (persistent buffers) and turns them
into the op's ``(D, s, U)``:

    W' = base + U diag(s) D,    D: R x in,  s: R,  U: out x R

with ``base`` = ``W0`` or, for methods that move the top singular directions into the
adapter, ``W_res = W0 - P_r diag(sigma_r) Q_r.T``.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .svd import top_singular

ADAPTER_DTYPES = (torch.float32, torch.float64)


def check_rank(name: str, value, limit: int) -> int:
    """``value`` as an int in ``[1, limit]``; ``limit`` is ``min(out, in)``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= value <= limit:
        raise ValueError(f"{name} must be in [1, min(out_features, in_features)={limit}], "
                         f"got {value}")
    return value


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return float(alpha)


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

    Subclasses set ``name``, ``options`` (the ``from_linear`` keyword arguments they take)
    and ``replaces_base``, and in ``__init__`` the ints ``rank`` (R), ``dropout_rows``
    (leading rows of D that are trainable down rows and see LoRA dropout) and
    ``grad_rows`` (leading rows of D / columns of U that receive gradient).
    """

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]]
    replaces_base: ClassVar[bool] = False

    def __init__(self, weight: torch.Tensor, r: int, adapter_dtype=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.r = check_rank("r", r, min(weight.shape))
        self._dtype = resolve_adapter_dtype(weight, adapter_dtype)
        self.rank = self.dropout_rows = self.grad_rows = 0

    def _new(self, *shape, like: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(torch.zeros(*shape, dtype=self._dtype, device=like.device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(D, s, U)`` in the adapter dtype, differentiable w.r.t. the parameters."""
        raise NotImplementedError

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

    def delta_weight(self) -> torch.Tensor:
        """``U diag(s) D`` (out x in) in float32 or better, without gradient."""
        with torch.no_grad():
            down, scale, up = self.factors()
            acc = torch.promote_types(down.dtype, torch.float32)
            return (up.to(acc) * scale.to(acc)) @ down.to(acc)

    def config(self) -> dict:
        """Hyper-parameters that fix the shapes and meaning of the state (for save/load)."""
        return {"method": self.name, "r": self.r, "rank": self.rank}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class SpectralBuffers:
    """Mixin: registers the top singular triplets of ``W0`` as persistent buffers
    ``P`` (out x n), ``sigma`` (n), ``Q`` (in x n), in the adapter dtype."""

    def _register_svd(self, weight: torch.Tensor, n: int, svd: str, generator,
                      keep=("P", "sigma", "Q")) -> None:
        p, sigma, q = top_singular(weight, n, svd=svd, dtype=self._dtype, generator=generator)
        for name, t in zip(("P", "sigma", "Q"), (p, sigma, q)):
            if name in keep:
                self.register_buffer(name, t)
