"""The PEFT tuner layer of our methods: PEFT's conventions (a wrapped ``base_layer``, one
adapter per name, active / disabled / merged states) around our method modules, run by the
fused op.

Each adapter is the method's own module (``speclora_kernels.methods``: the ``AdapterMethod``
that ``AdapterLinear`` uses), kept in ``<prefix>adapter[<name>]``; its ``factors()`` give the
op's ``(D, s, U)``. The base is never changed by an adapter (PEFT keeps one base for many
adapters and for ``disable_adapter()``): the spectral methods, whose base is ``W0 - P diag
(sigma) Q.T``, add frozen rows ``(Q.T, -sigma, P)`` instead, as ``AdapterLinear`` does on an
NF4 base.

Frozen spectral factors are computed on first use (forward, merge, ``state_dict``), not
when the adapter is created, so that loading a saved adapter (``PeftModel.from_pretrained``)
takes the saved ``P``, ``sigma``, ``Q`` and never runs an SVD that could return other
vectors.

Mixed-adapter batches (PEFT's ``adapter_names=`` in ``forward`` and ``generate``, eval mode):
:func:`mixed_batch_hooks` is our tuners' ``_enable_peft_forward_hooks`` (PEFT's checks, then
``adapter_names`` handed to every layer), and a layer runs all the named adapters in one
fused call (``_fused.mixed_forward``), the frozen spectral rows its adapters share stacked
once.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from typing import ClassVar

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..methods import get_method
from ..methods.base import deferred_svd
from ..quant import NF4Weight
from ._fused import Block, base_kind, fused_forward, mixed_forward, nf4_weight, plain_adapter

_LOADING = contextvars.ContextVar("speclora_kernels_peft_loading", default=False)


@contextlib.contextmanager
def loading():
    """``state_dict()`` calls in this block list the keys a load will fill and compute no
    deferred SVD (PEFT enumerates the model's state dict to map a checkpoint onto it)."""
    token = _LOADING.set(True)
    try:
        yield
    finally:
        _LOADING.reset(token)


class MethodLayer(nn.Module, BaseTunerLayer):
    """Base class of the layers of our PEFT methods; subclasses set ``attr`` (the adapter
    container's name, ``<prefix>adapter``) and ``adapter_layer_names = (attr,)``."""

    attr: ClassVar[str]
    other_param_names = ("adapter_dropout",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, method: str, options: dict,
                 dropout: float = 0.0, *, inference_mode: bool = False, shared=None) -> None:
        super().__init__()
        kind = base_kind(base_layer)
        if kind is None:
            raise TypeError(f"the target is a {type(base_layer).__name__}; only torch.nn.Linear "
                            f"(with a plain floating weight) and bitsandbytes Linear4bit with "
                            f"quant_type='nf4' can be adapted")
        self.base_layer = base_layer
        setattr(self, self.attr, nn.ModuleDict())
        self.adapter_dropout: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self._svd_pending: set[str] = set()
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.update_layer(adapter_name, method, options, dropout,
                          inference_mode=inference_mode, shared=shared)

    @property
    def adapters(self) -> nn.ModuleDict:
        """The method module of each adapter name."""
        return getattr(self, self.attr)

    # -- adapters
    def update_layer(self, adapter_name: str, method: str, options: dict, dropout: float = 0.0,
                     *, inference_mode: bool = False, shared=None) -> None:
        """Add adapter ``adapter_name``: ``method`` with ``options`` (as
        ``AdapterLinear.from_linear`` takes them), LoRA ``dropout``, PiCa's ``shared`` M."""
        cls = get_method(method)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0 <= dropout < 1:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {dropout!r}")
        if dropout > 0 and not cls.takes_dropout:
            raise ValueError(f"lora_dropout must be 0.0 for method={method!r}: it has no "
                             f"separate trainable down path for dropout to act on, got {dropout}")
        base = self.get_base_layer()
        dense = base_kind(base) == "dense"
        dtype = base.weight.dtype if dense and base.weight.dtype == torch.float64 else torch.float32
        # The method reads only the weight's shape, dtype and device here: its SVD is deferred.
        like = torch.empty((), dtype=dtype, device=base.weight.device).expand(
            self.out_features, self.in_features)
        extra = {} if shared is None else {"shared": shared}
        with deferred_svd():
            adapter = cls(like, **options, **extra)
        self.adapters[adapter_name] = adapter
        self.adapter_dropout[adapter_name] = float(dropout)
        if getattr(adapter, "svd_pending", None) is not None:
            self._svd_pending.add(adapter_name)
            if self.merged:  # the base holds merged adapters now: take them out for the SVD
                self.materialize([adapter_name])
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._svd_pending.discard(adapter_name)

    # -- frozen factors on first use
    @torch.no_grad()
    def pretrained_weight(self) -> torch.Tensor:
        """The base weight without merged adapters, dense, in float32 (float64 for a
        float64 base)."""
        base = self.get_base_layer()
        if base_kind(base) == "nf4":
            weight = nf4_weight(self, base).dequantize(torch.float32)
        else:
            weight = base.weight.detach()
            weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
        for name in self.merged_adapters:
            weight = weight - self.get_delta_weight(name).to(weight.dtype)
        return weight

    def materialize(self, adapter_names=None) -> None:
        """Compute the deferred SVDs of ``adapter_names`` (default: every adapter)."""
        names = [n for n in (self._svd_pending if adapter_names is None else adapter_names)
                 if n in self._svd_pending]
        if not names:
            return
        weight = self.pretrained_weight()
        for name in names:
            self.adapters[name].compute_svd(weight)
            self._svd_pending.discard(name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Saved factors replace the deferred SVD: it never runs for them.
        for name in list(self._svd_pending):
            adapter = self.adapters[name]
            keys = [f"{prefix}{self.attr}.{name}.{b}" for b in adapter.svd_pending[2]]
            if all(k in state_dict for k in keys):
                adapter.svd_pending = None
                self._svd_pending.discard(name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not _LOADING.get():
            self.materialize()  # before the children (the adapters) write their buffers
        super()._save_to_state_dict(destination, prefix, keep_vars)

    # -- the op's factors
    def block(self, adapter_name: str) -> Block:
        """Adapter ``adapter_name`` as the op's ``(D, s, U)``, with the frozen rows that take
        the spectral term out of the pre-trained base for the spectral methods."""
        adapter = self.adapters[adapter_name]
        down, scale, up = adapter.factors()
        if adapter.replaces_base:
            down = torch.cat([down, adapter.Q.T])
            scale = torch.cat([scale, -adapter.sigma])
            up = torch.cat([up, adapter.P], dim=1)
        p = self.adapter_dropout.get(adapter_name, 0.0) if self.training else 0.0
        return Block(down, scale, up, p, adapter.dropout_rows, adapter.grad_rows)

    @torch.no_grad()
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``U diag(s) D`` of adapter ``adapter_name`` (out x in), float32 or better."""
        self.materialize([adapter_name])
        b = self.block(adapter_name)
        acc = torch.promote_types(b.down.dtype, torch.float32)
        return (b.up.to(acc) * b.scale.to(acc)) @ b.down.to(acc)

    # -- forward
    def forward(self, x: torch.Tensor, *args, adapter_names=None, **kwargs) -> torch.Tensor:
        if args or any(v is not None for v in kwargs.values()):
            names = sorted(k for k, v in kwargs.items() if v is not None)
            raise TypeError(f"{type(self).__name__} takes only the input tensor and "
                            f"adapter_names; got {len(args)} more positional arguments and "
                            f"keywords {names}")
        if adapter_names is not None:
            self._check_mixed(x, adapter_names)
        base = self.base_layer
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x)
        if self.merged:
            return base(x)
        if adapter_names is not None:
            return self._mixed_forward(x, adapter_names)
        active = [a for a in self.active_adapters if a in self.adapters]
        if not active:
            return base(x)
        self.materialize(active)
        blocks = [self.block(a) for a in active]
        if base._forward_hooks or base._forward_pre_hooks:  # e.g. accelerate's offloading
            y = base(x)
            return y + sum(plain_adapter(x.to(y.dtype), b) for b in blocks).to(y.dtype)
        return fused_forward(self, base, x, blocks)

    # -- mixed-adapter batches
    def _check_mixed(self, x: torch.Tensor, adapter_names) -> None:
        """PEFT's checks of ``adapter_names`` (its messages, so callers see PEFT's errors)."""
        if len(x) != len(adapter_names):
            raise ValueError(f"Length of `adapter_names` should be the same as the number of "
                             f"inputs, but got {len(adapter_names)} and {len(x)} respectively.")
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, "
                             "please call `unmerge_adapter` first.")

    def _mixed_forward(self, x: torch.Tensor, adapter_names) -> torch.Tensor:
        """Sample i through adapter ``adapter_names[i]`` (``"__base__"``, or a name this layer
        does not hold: the base alone), every adapter in one fused call."""
        names = [n for n in dict.fromkeys(adapter_names) if n in self.adapters]
        base = self.base_layer
        if not names:
            return base(x)
        if self.training and any(self.adapter_dropout.get(n, 0.0) for n in names):
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        self.materialize(names)
        blocks = {n: self.block(n) for n in names}
        if base._forward_hooks or base._forward_pre_hooks:  # e.g. accelerate's offloading
            y = base(x)
            for name, b in blocks.items():
                rows = [i for i, n in enumerate(adapter_names) if n == name]
                y[rows] += plain_adapter(x[rows].to(y.dtype), b).to(y.dtype)
            return y
        return mixed_forward(self, base, x, adapter_names, blocks, self._same_frozen)

    def _same_frozen(self, a: str, b: str) -> bool:
        """Whether adapters ``a`` and ``b`` have the same frozen rows (``block``'s rows from
        ``grad_rows`` on: ``Q.T`` / ``P`` of the pre-trained weight's SVD), so that a mixed
        batch projects them once. Compared once per pair of tensors, then cached."""
        qa, pa = getattr(self.adapters[a], "Q", None), getattr(self.adapters[a], "P", None)
        qb, pb = getattr(self.adapters[b], "Q", None), getattr(self.adapters[b], "P", None)
        if any(t is None for t in (qa, pa, qb, pb)):
            return False
        ba, bb = self.block(a), self.block(b)  # the frozen rows must be exactly (Q.T, P)
        if any(blk.down.shape[0] - blk.grad_rows != q.shape[1]
               for blk, q in ((ba, qa), (bb, qb))):
            return False
        key = tuple((t.data_ptr(), t._version, t.shape) for t in (qa, pa, qb, pb))
        cache = self.__dict__.setdefault("_speclora_same_frozen", {})
        if key not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[key] = (qa.shape == qb.shape and pa.shape == pb.shape
                          and torch.equal(qa, qb) and torch.equal(pa, pb))
        return cache[key]

    # -- merging
    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """Fold the active (or the named) adapters into the base weight, as PEFT's LoRA
        does: a dense weight in place (float32 sum, one rounding); an NF4 weight is
        dequantized, summed and quantized again (lossy, with a warning)."""
        names = check_adapters_to_merge(self, adapter_names)
        if not names:
            return
        self.materialize(names)
        for name in names:
            if name not in self.adapters:
                continue
            self._add_to_base(self.get_delta_weight(name), safe_merge, name)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take the merged adapters out of the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.adapters:
                self._add_to_base(-self.get_delta_weight(name), False, name)

    @torch.no_grad()
    def _add_to_base(self, delta: torch.Tensor, check: bool, name: str) -> None:
        base = self.get_base_layer()
        if base_kind(base) == "nf4":
            warnings.warn("Merging into (or unmerging from) a 4-bit base quantizes it again: "
                          "outputs change by the rounding (as with PEFT's LoRA)")
            nf4 = nf4_weight(self, base)
            dense = nf4.dequantize(torch.float32) + delta.to(torch.float32)
            self._check_finite(dense, check, name)
            base.weight = NF4Weight.quantize(
                dense.to(nf4.dtype), blocksize=nf4.blocksize, double_quant=nf4.double_quant,
                quant_storage=nf4.quant_storage).to_bnb()
            return
        w = base.weight
        acc = torch.promote_types(w.dtype, delta.dtype)
        merged = w.to(acc) + delta.to(w.device, acc)
        self._check_finite(merged, check, name)
        w.data.copy_(merged.to(w.dtype))

    @staticmethod
    def _check_finite(weight, check: bool, name: str) -> None:
        if check and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems "
                             f"to be broken")

    def __repr__(self) -> str:
        return "speclora_kernels." + super().__repr__()


def layer_class(attr: str, name: str) -> type[MethodLayer]:
    """A :class:`MethodLayer` subclass holding its adapters in ``attr``."""
    return type(name, (MethodLayer,), {"attr": attr, "adapter_layer_names": (attr,),
                                       "__module__": __name__,
                                       "__qualname__": name})


def _adapter_names_hook(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


@contextlib.contextmanager
def mixed_batch_hooks(tuner, *args, **kwargs):
    """Our tuners' ``_enable_peft_forward_hooks``: with ``adapter_names`` (one adapter name or
    ``"__base__"`` per sample), PEFT's checks (eval mode, names that exist), the names
    repeated per beam for beam search (the original names for an encoder), then handed to
    every one of our layers and ``modules_to_save`` wrapper for the call."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is None:
        yield
        return
    if tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    known = set()
    for module in tuner.modules():
        if isinstance(module, MethodLayer):
            known |= module.adapters.keys()
    unknown = {n for n in adapter_names if n != "__base__"} - known
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): "
                         f"{', '.join(sorted(unknown))}")
    beams = kwargs.get("num_beams")
    names = list(adapter_names)
    if isinstance(beams, int) and beams > 1:
        names = [n for n in adapter_names for _ in range(beams)]
    kinds = (MethodLayer, AuxiliaryTrainingWrapper)
    handles = [m.register_forward_pre_hook(functools.partial(_adapter_names_hook,
                                                             adapter_names=names),
                                           with_kwargs=True)
               for m in tuner.modules() if isinstance(m, kinds)]
    encoder = getattr(tuner.model, "get_encoder", None)
    encoder = encoder() if encoder is not None and names != list(adapter_names) else None
    if encoder is not None and encoder is not tuner.model:
        original = list(adapter_names)
        handles += [m.register_forward_pre_hook(functools.partial(_adapter_names_hook,
                                                                  adapter_names=original),
                                                with_kwargs=True)
                    for m in encoder.modules() if isinstance(m, kinds)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
