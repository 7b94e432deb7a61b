"""``AdapterLinear``: a drop-in ``nn.Linear`` whose forward is the one fused adapter op."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..methods import AdapterMethod, get_method


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_dropout(dropout, adapter: AdapterMethod) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a float in [0, 1), got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout > 0 and adapter.dropout_rows == 0:
        raise ValueError(f"dropout must be 0.0 for method={adapter.name!r}: it has no separate "
                         f"trainable down path for LoRA-style dropout to act on, got {dropout}")
    return float(dropout)


class AdapterLinear(nn.Module):
    """``y = x @ W'.T + b`` with ``W' = base + U diag(s) D`` built by an adapter method.

    The base ``weight`` and ``bias`` are frozen ``nn.Parameter``s (``requires_grad=False``)
    named as in ``nn.Linear``; only the method's parameters (``self.adapter``) train.
    Build it with :meth:`from_linear`. The input must have the base weight's dtype (as
    for ``nn.Linear``); under ``torch.autocast`` input and base are cast to the autocast
    dtype. The output has the input's dtype and shape ``(..., out_features)``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, adapter: AdapterMethod,
                 dropout: float = 0.0):
        super().__init__()
        if not isinstance(adapter, AdapterMethod):
            raise TypeError(f"adapter must be an AdapterMethod, got {type(adapter).__name__}")
        if not (isinstance(weight, torch.Tensor) and weight.is_floating_point()
                and weight.dim() == 2):
            raise TypeError("weight must be a 2-D floating tensor (out_features x in_features)")
        shape = (adapter.out_features, adapter.in_features)
        if tuple(weight.shape) != shape:
            raise ValueError(f"weight must have the adapter's shape {shape}, "
                             f"got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        self.adapter = adapter
        self.dropout = _check_dropout(dropout, adapter)
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str = "speclora", r: int = 8,
                    k: int | None = None, alpha: float | None = None, dropout: float = 0.0, *,
                    svd: str | None = None, shared: nn.Parameter | None = None,
                    adapter_dtype: torch.dtype | None = None,
                    generator: torch.Generator | None = None) -> "AdapterLinear":
        """Wrap a pre-trained ``linear``.

        Args:
            method: a key of :data:`speclora_kernels.METHODS`.
            r: rank (LoRA rank, or number of top singular directions for the spectral
                methods and PiCa).
            k: SpecLoRA's number of masked singular values (default 16).
            alpha: LoRA scaling numerator for ``lora``/``speclora`` (default ``r``).
            dropout: LoRA dropout on the trainable down path (``lora``, ``speclora`` only).
            svd: ``"auto"`` (default), ``"full"`` or ``"randomized"``; see
                :func:`speclora_kernels.methods.top_singular`.
            shared: PiCa only: the ``adapter.M`` of another PiCa layer to share.
            adapter_dtype: parameter dtype, float32 (default) or float64 (default for a
                float64 base).
            generator: RNG for the initial ``A`` and the randomized SVD sketch.

        Options a method does not use raise ``ValueError`` rather than being ignored. For
        ``lora``, ``speclora`` and ``pica`` the layer takes over ``linear.weight``'s storage
        (no copy; ``merge()`` writes into it, as PEFT does); the ``spectral_*`` methods
        store a new residual base ``W_res``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if not weight.is_floating_point():
            raise TypeError(f"linear.weight must be a floating tensor, got {weight.dtype}")
        method_cls = get_method(method)
        opts = {}
        for name, value in (("r", r), ("k", k), ("alpha", alpha), ("svd", svd),
                            ("shared", shared)):
            if value is None:
                continue
            if name not in method_cls.options:
                raise ValueError(f"{name} is not used by method={method!r} "
                                 f"(it takes {', '.join(method_cls.options)})")
            opts[name] = value
        adapter = method_cls(weight, adapter_dtype=adapter_dtype, generator=generator, **opts)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(adapter.base_weight(weight), bias, adapter, dropout)

    # -- base weight: every read and write of the frozen base goes through these two, so a
    # quantized base can replace the dense one here only.
    def _base(self, dtype: torch.dtype):
        bias = None if self.bias is None else self.bias.to(dtype)
        return self.weight.to(dtype), bias

    def _add_to_base(self, delta: torch.Tensor) -> None:
        acc = torch.promote_types(self.weight.dtype, delta.dtype)
        self.weight.copy_((self.weight.to(acc) + delta).to(self.weight.dtype))

    def _check_input(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        if x.device != self.weight.device:
            raise ValueError(f"x is on {x.device} but the layer is on {self.weight.device}; "
                             f"move one of them")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        kind = x.device.type
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
            with torch.autocast(kind, enabled=False):
                return self._forward(x.to(dtype))
        if x.dtype != self.weight.dtype:
            raise TypeError(f"x must have the base weight's dtype {self.weight.dtype}, "
                            f"got {x.dtype}")
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._base(x.dtype)
        if self.merged:
            return F.linear(x, weight, bias)
        down, scale, up = self.adapter.factors()
        # D, U in x's dtype; s keeps float32 precision (float64 for float64 inputs).
        y = ops.fused_adapter_linear(
            x.reshape(-1, self.in_features), weight, bias, down.to(x.dtype),
            scale.to(torch.promote_types(x.dtype, torch.float32)), up.to(x.dtype),
            self.dropout, self.adapter.dropout_rows, self.adapter.grad_rows,
            training=self.training)
        return y.reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base: ``W <- W + U diag(s) D``, computed in float32 or
        better and rounded once to the base dtype. Forward then uses the base only."""
        if self.merged:
            raise RuntimeError("AdapterLinear is already merged; call unmerge() first")
        self._add_to_base(self.adapter.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W <- W - U diag(s) D``. Restores the base up to the two
        roundings to the base dtype (error <= 1 ulp of ``max(|W|, |W + delta|)``: exact up
        to rounding in fp32/fp64, within the dtype's tolerance in fp16/bf16). The adapter
        must not change while merged."""
        if not self.merged:
            raise RuntimeError("AdapterLinear is not merged; call merge() first")
        self._add_to_base(-self.adapter.delta_weight())
        self.merged = False

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``base + U diag(s) D`` in the base dtype, as a new tensor (the layer is unchanged)."""
        if self.merged:
            return self.weight.detach().clone()
        delta = self.adapter.delta_weight()
        acc = torch.promote_types(self.weight.dtype, delta.dtype)
        return (self.weight.to(acc) + delta).to(self.weight.dtype)

    def adapter_config(self) -> dict:
        """Method, ranks, shapes and dtypes: what a saved adapter must match to load."""
        return {**self.adapter.config(), "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None,
                "dropout": self.dropout,
                "adapter_dtype": _dtype_name(next(self.adapter.parameters()).dtype),
                "base_dtype": _dtype_name(self.weight.dtype)}

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters and frozen factors by name (detached, shared storage)."""
        return {name: t.detach() for name, t in self.adapter.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (as from :meth:`adapter_tensors`) into the adapter, bit-exact.

        Names, shapes and dtypes must match exactly. When the frozen factors of a
        ``spectral_*`` method differ from the layer's own (e.g. an SVD computed on another
        device), the residual base is re-derived so that ``W_res + P diag(sigma) Q.T`` still
        equals the pre-trained weight.
        """
        if self.merged:
            raise RuntimeError("cannot load into a merged AdapterLinear; call unmerge() first")
        own = self.adapter_tensors()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(f"adapter tensors for method={self.adapter.name!r} must be "
                             f"{sorted(own)}; missing {missing}, unexpected {unexpected}")
        for name, t in tensors.items():
            if t.shape != own[name].shape or t.dtype != own[name].dtype:
                raise ValueError(f"adapter tensor {name!r} must be {own[name].dtype} "
                                 f"{tuple(own[name].shape)}, got {t.dtype} {tuple(t.shape)}")
        frozen = {n for n, _ in self.adapter.named_buffers() if n in own}
        rebase = self.adapter.replaces_base and any(
            not torch.equal(own[n], tensors[n].to(own[n].device)) for n in frozen)
        old_term = self.adapter.frozen_term() if rebase else None
        for name, t in tensors.items():
            own[name].copy_(t)
        if rebase:
            self._add_to_base(old_term - self.adapter.frozen_term())

    def extra_repr(self) -> str:
        cfg = self.adapter.config()
        ranks = ", ".join(f"{key}={cfg[key]}" for key in ("r", "k", "alpha") if key in cfg)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, method={self.adapter.name}, {ranks}, "
                f"R={self.adapter.rank}, dropout={self.dropout}, "
                f"trainable={self.adapter.num_trainable()}" + (", merged" if self.merged else ""))
