"""LoRA (Hu et al. 2021): ``W' = W0 + (alpha / r) B A``."""
from __future__ import annotations

import math

import torch
from torch import nn

from .assembly import Frozen, OpSpec, Param
from .base import AdapterMethod
from .options import ALPHA, RANK


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
    options = (RANK, ALPHA)
    takes_dropout = True

    def __init__(self, weight: torch.Tensor, *, generator=None, **options):
        super().__init__(weight, **options)
        r = self.r
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

    def op_spec(self):
        return OpSpec(rows=((Param("A"), Frozen("lora_scale"), Param("B")),))
