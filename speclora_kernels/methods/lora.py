"""LoRA (Hu et al. 2021): ``W' = W0 + (alpha / r) B A``."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdapterMethod, check_alpha


def lora_init(a: nn.Parameter, b: nn.Parameter, generator=None) -> None:
    """PEFT's default: ``A`` Kaiming-uniform (``a = sqrt(5)``, bound ``1/sqrt(in)``), ``B = 0``,
    so the adapted layer equals the base at init."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        b.zero_()


class LoRA(AdapterMethod):
    """``D = A`` (r x in), ``s = (alpha / r) 1_r``, ``U = B`` (out x r); base ``W0``.

    ``alpha`` defaults to ``r`` (scale 1).
    """

    name = "lora"
    options = ("r", "alpha")

    def __init__(self, weight: torch.Tensor, *, r: int, alpha: float | None = None,
                 adapter_dtype=None, generator=None):
        super().__init__(weight, r, adapter_dtype)
        self.alpha = check_alpha(r if alpha is None else alpha)
        self.A = self._new(r, self.in_features, like=weight)
        self.B = self._new(self.out_features, r, like=weight)
        self.register_buffer("lora_scale", torch.full((r,), self.alpha / r, dtype=self._dtype,
                                                      device=weight.device), persistent=False)
        self.rank = self.dropout_rows = self.grad_rows = r
        self.reset_parameters(generator)

    def reset_parameters(self, generator=None) -> None:
        lora_init(self.A, self.B, generator)

    def factors(self):
        return self.A, self.lora_scale, self.B

    def config(self) -> dict:
        return {**super().config(), "alpha": self.alpha}
