"""``AdapterLinear``: a drop-in ``nn.Linear`` whose forward is the one fused adapter op."""
from __future__ import annotations

import sys
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..methods import AdapterMethod, get_method
from ..methods.assembly import Frozen, transpose
from ..quant import NF4Tensor, NF4Weight, local_nf4, quantize_residual
from ..quant.nf4_tensor import load_nf4_state_dict_hook, nf4_state_dict_hook, nf4_weight_of
from .factors import FactorAssembly, plain_factors

QUANTIZE = ("nf4",)
# Buffers holding an NF4 base (bitsandbytes' layout, see NF4Weight), by NF4Weight field.
_NF4_BUFFERS = {"packed": "weight", "absmax": "weight_absmax", "absmax2": "weight_absmax2",
                "code2": "weight_code2", "offset": "weight_offset"}
# The spectral term quantized out of an NF4 ``W_res`` base, kept once the adapter's own
# factors are replaced by others (see ``load_adapter_tensors``).
_BASE_TERM = ("base_P", "base_sigma", "base_Q")


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


def _linear4bit_weight(linear: nn.Linear) -> NF4Weight | None:
    """The NF4 weight of a ``bitsandbytes.nn.Linear4bit`` as bitsandbytes stores it (no copy,
    no re-quantization); None for any other layer. bitsandbytes is not imported here: if it
    was never imported, no module can be a Linear4bit."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or not isinstance(linear, bnb.nn.Linear4bit):
        return None
    state = getattr(linear.weight, "quant_state", None)
    quant_type = state.quant_type if state is not None else getattr(linear.weight, "quant_type", None)
    if quant_type != "nf4":
        raise ValueError(f"linear is a Linear4bit with quant_type={quant_type!r}; only 'nf4' bases "
                         f"are supported (FP4 has another code book and layout)")
    if state is None:
        raise ValueError("linear is a Linear4bit whose weight is not quantized yet (bitsandbytes "
                         "quantizes it when the module is moved to a device: call .to(device) "
                         "first)")
    return NF4Weight.from_bnb(linear)


def _traced() -> bool:
    """torch.compile tracing, a functorch transform or a CUDA-graph capture: the factors are
    built with plain ops there (fused by the compiler, replayed by the graph)."""
    return (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()))


def _pack_after_load(layer: "AdapterLinear", incompatible_keys) -> None:
    layer._pack_factors()  # load_state_dict(assign=True) replaces parameters


class AdapterLinear(nn.Module):
    """``y = x @ W'.T + b`` with ``W' = base + U diag(s) D`` built by an adapter method.

    The base ``weight`` and ``bias`` are frozen (``requires_grad=False``) and named as in
    ``nn.Linear``; only the method's parameters (``self.adapter``) train. Build it with
    :meth:`from_linear`.

    Dense base: ``weight`` is a frozen ``nn.Parameter``. The input must have its dtype (as
    for ``nn.Linear``); under ``torch.autocast`` input and base are cast to the autocast
    dtype. The output has the input's dtype and shape ``(..., out_features)``.

    NF4 base (``quant_type == "nf4"``): bitsandbytes' packed codes and block scales, held
    as one frozen parameter ``weight``, an :class:`~speclora_kernels.quant.NF4Tensor` (so
    that FSDP2's ``fully_shard`` shards it as any parameter); the state dict has them as
    bitsandbytes' tensors (``weight``: uint8 codes, ``weight_absmax``, and with double quant
    ``weight_absmax2``, ``weight_code2``, ``weight_offset``). The op decodes them tile by
    tile, the dense weight is never formed. As bitsandbytes' ``Linear4bit``, the input is
    cast to ``compute_dtype`` (its own dtype if None) and the output back to the input's
    dtype. ``module.to(dtype)`` moves but never converts the quantized state.
    :meth:`hold_nf4_as_buffers` holds them as buffers instead (DeepSpeed ZeRO-3).

    Spectral methods (``replaces_base``) want ``W_res = W0 - P diag(sigma) Q.T`` as base. With
    ``residual_base=False`` the given base is ``W0`` itself (an NF4 ``Linear4bit`` cannot be
    re-quantized) and the layer appends the frozen rows ``D = Q.T``, ``s = -sigma``,
    ``U = P`` to the method's factors (rank ``R = 2r``; they get no gradient and no dropout).
    """

    def __init__(self, weight: torch.Tensor | NF4Weight, bias: torch.Tensor | None,
                 adapter: AdapterMethod, dropout: float = 0.0, *,
                 compute_dtype: torch.dtype | None = None, residual_base: bool = True):
        super().__init__()
        if not isinstance(adapter, AdapterMethod):
            raise TypeError(f"adapter must be an AdapterMethod, got {type(adapter).__name__}")
        quantized = isinstance(weight, NF4Weight)
        if not quantized and not (isinstance(weight, torch.Tensor) and weight.is_floating_point()
                                  and weight.dim() == 2):
            raise TypeError("weight must be a 2-D floating tensor (out_features x in_features) "
                            "or an NF4Weight")
        shape = (adapter.out_features, adapter.in_features)
        if tuple(weight.shape) != shape:
            raise ValueError(f"weight must have the adapter's shape {shape}, "
                             f"got {tuple(weight.shape)}")
        if compute_dtype is not None and not quantized:
            raise ValueError("compute_dtype is for an NF4 base only; a dense base computes in "
                             "its own dtype")
        if compute_dtype not in (None, torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"compute_dtype must be None, float16, bfloat16 or float32, "
                            f"got {compute_dtype}")
        if not isinstance(residual_base, bool):
            raise TypeError(f"residual_base must be a bool, got {type(residual_base).__name__}")
        self.out_features, self.in_features = shape
        self.quant_type = "nf4" if quantized else None
        self.compute_dtype = compute_dtype
        self.residual_base = residual_base
        self._nf4_cache = None
        if quantized:
            self._nf4_meta = dict(shape=weight.shape, dtype=weight.dtype,
                                  blocksize=weight.blocksize,
                                  nested_blocksize=weight.nested_blocksize,
                                  quant_storage=weight.quant_storage)
            self._hold_nf4(NF4Tensor.from_weight(weight))
            # the state dict has the buffers' keys whichever way the base is held
            self.register_state_dict_post_hook(partial(nf4_state_dict_hook, names=_NF4_BUFFERS))
            self.register_load_state_dict_pre_hook(partial(load_nf4_state_dict_hook,
                                                           names=_NF4_BUFFERS))
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        self.adapter = adapter
        self.dropout = _check_dropout(dropout, adapter)
        self.merged = False
        self._init_factor_assembly()

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, *, dropout: float = 0.0,
                    adapter_dtype: torch.dtype | None = None,
                    generator: torch.Generator | None = None, quantize: str | None = None,
                    blocksize: int | None = None, double_quant: bool | None = None,
                    **options) -> "AdapterLinear":
        """Wrap a pre-trained ``linear`` (``nn.Linear`` or bitsandbytes NF4 ``Linear4bit``).

        Args:
            method: a key of :data:`speclora_kernels.METHODS`.
            options: the method's options, as its class declares them (``METHODS[method]
                .options``; the README's "Methods" table): ``r`` (rank: LoRA rank, or the
                number of top singular directions; default 8) for every method, ``k``
                (SpecLoRA's masked singular values, default 16), ``alpha`` (``lora`` /
                ``speclora`` scaling numerator, default ``r``), ``svd`` (``"auto"``,
                ``"full"`` or ``"randomized"``; see
                :func:`speclora_kernels.methods.top_singular`), PiCa's ``shared`` (the
                ``adapter.M`` of another PiCa layer). ``None`` means the default; options
                the method does not declare raise ``ValueError`` rather than being ignored.
            dropout: LoRA dropout on the trainable down path (methods with
                ``takes_dropout``: ``lora``, ``speclora``).
            adapter_dtype: parameter dtype, float32 (default) or float64 (default for a
                float64 base).
            generator: RNG for the initial ``A`` and the randomized SVD sketch.
            quantize: ``"nf4"`` stores a dense ``linear``'s base as NF4 (QLoRA), with
                ``blocksize`` (default 64) and ``double_quant`` (default True), computing in
                the weight's dtype like ``Linear4bit(compute_dtype=weight.dtype)``.

        For ``lora``, ``speclora`` and ``pica`` the layer takes over ``linear.weight``'s
        storage (no copy; ``merge()`` writes into it, as PEFT does); the ``spectral_*``
        methods store a new residual base ``W_res``.

        NF4: a ``Linear4bit`` (``quant_type="nf4"``; FP4 is refused) is used as bitsandbytes
        stored it, never re-quantized; its ``compute_dtype`` is kept. The SVD is that of the
        dequantized weight, so at init the layer computes what the quantized layer does.
        The spectral methods cannot put an NF4 ``W0`` into ``W_res`` form, so they keep
        ``W0`` and subtract ``P diag(sigma) Q.T`` through extra frozen rows (see the class
        docstring). From a dense ``linear`` with ``quantize="nf4"`` they SVD the dense
        ``W0`` and quantize ``W_res`` instead: the top-r directions stay exact and the
        residual has a smaller range, so the base loses less to quantization.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        method_cls = get_method(method)
        method_cls.check_option_names(options)  # values are checked when the method is built
        build = dict(adapter_dtype=adapter_dtype, generator=generator, **options)
        bias = None if linear.bias is None else linear.bias.detach()

        nf4 = _linear4bit_weight(linear)
        if nf4 is not None:
            if quantize is not None:
                raise ValueError(f"quantize={quantize!r} is for a dense nn.Linear; linear is a "
                                 f"Linear4bit, already NF4 (it is used as it is)")
            cls._check_no_quant_options(blocksize, double_quant, "linear is a Linear4bit")
            adapter = method_cls(nf4.dequantize(torch.float32), **build)
            return cls(nf4, bias, adapter, dropout, compute_dtype=linear.compute_dtype,
                       residual_base=not adapter.replaces_base)

        weight = linear.weight.detach()
        if not weight.is_floating_point():
            raise TypeError(f"linear.weight must be a floating tensor, got {weight.dtype}")
        if quantize is None:
            cls._check_no_quant_options(blocksize, double_quant, "quantize is None")
            adapter = method_cls(weight, **build)
            return cls(adapter.base_weight(weight), bias, adapter, dropout)
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be None or one of {QUANTIZE}, got {quantize!r}")
        if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"quantize='nf4' needs a float16, bfloat16 or float32 linear.weight, "
                            f"got {weight.dtype}")
        if double_quant is not None and not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
        qopts = dict(blocksize=64 if blocksize is None else blocksize,
                     double_quant=True if double_quant is None else double_quant)
        if method_cls.replaces_base:
            adapter = method_cls(weight, **build)
            nf4 = quantize_residual(weight, adapter.P, adapter.sigma, adapter.Q.T, **qopts)
        else:
            nf4 = NF4Weight.quantize(weight, **qopts)
            adapter = method_cls(nf4.dequantize(torch.float32), **build)
        return cls(nf4, bias, adapter, dropout, compute_dtype=weight.dtype)

    @staticmethod
    def _check_no_quant_options(blocksize, double_quant, why: str) -> None:
        for name, value in (("blocksize", blocksize), ("double_quant", double_quant)):
            if value is not None:
                raise ValueError(f"{name} is only used with quantize='nf4' ({why}), "
                                 f"got {name}={value!r}")

    # -- base weight: every read and write of the frozen base goes through these.
    def nf4_weight(self) -> NF4Weight:
        """The NF4 base as an :class:`NF4Weight` over this layer's tensors (no copy)."""
        if self.quant_type is None:
            raise RuntimeError("this AdapterLinear has a dense base (weight); it has no NF4 "
                               "weight")
        held = self._parameters.get("weight")
        if held is not None:
            if not isinstance(held, NF4Tensor):
                raise RuntimeError("this layer's NF4 base is sharded (FSDP2): it is whole only "
                                   "inside its FSDP unit's forward and backward (or unshard())")
            return nf4_weight_of(held)
        tensors = {field: getattr(self, name, None) for field, name in _NF4_BUFFERS.items()}
        cached = self._nf4_cache
        if cached is None or any(cached[0][f] is not t for f, t in tensors.items()):
            meta = self._nf4_meta
            w = NF4Weight(tensors.pop("packed"), tensors.pop("absmax"), meta["shape"],
                          meta["dtype"], meta["blocksize"],
                          nested_blocksize=meta["nested_blocksize"],
                          quant_storage=meta["quant_storage"], **tensors)
            self._nf4_cache = cached = (
                {field: getattr(self, name, None) for field, name in _NF4_BUFFERS.items()}, w)
        return cached[1]

    def _hold_nf4(self, base: NF4Tensor) -> None:
        for name in _NF4_BUFFERS.values():
            self._buffers.pop(name, None)
            if name != "weight":  # the state dict's keys, found by torch.distributed.checkpoint
                object.__setattr__(self, name, None)  # in layer.weight now
        self._nf4_cache = None
        self.weight = nn.Parameter(base, requires_grad=False)

    def hold_nf4_as_parameter(self) -> None:
        """Hold the NF4 base as one frozen parameter ``weight``, an
        :class:`~speclora_kernels.quant.NF4Tensor` over the same tensors (no copy), as it is
        held from construction: undoes :meth:`hold_nf4_as_buffers`; no-op if already."""
        if self.quant_type is None:
            raise RuntimeError("this AdapterLinear has a dense base, already a parameter")
        if "weight" not in self._parameters:
            self._hold_nf4(NF4Tensor.from_weight(self.nf4_weight()))

    def hold_nf4_as_buffers(self) -> None:
        """Hold the NF4 base as buffers (``weight``, ``weight_absmax``, ...: the state
        dict's tensors, no copy) instead of one parameter, for engines that partition every
        parameter as a plain tensor (DeepSpeed ZeRO-3, which then leaves the base whole on
        every rank). FSDP2 replicates buffers: keep the parameter there. Same state dict,
        same forward; no-op if already."""
        if self.quant_type is None:
            raise RuntimeError("this AdapterLinear has a dense base; it has no NF4 buffers")
        if "weight" not in self._parameters:
            return
        tensors = self.nf4_weight()  # refuses a sharded base
        del self._parameters["weight"]
        for field, name in _NF4_BUFFERS.items():
            self.__dict__.pop(name, None)
            t = getattr(tensors, field)
            if t is not None:
                self.register_buffer(name, t)

    @property
    def base_dtype(self) -> torch.dtype:
        """dtype of the dense base, or the dtype an NF4 base dequantizes to."""
        return self._nf4_meta["dtype"] if self.quant_type else self.weight.dtype

    def _base(self, dtype: torch.dtype):
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.quant_type is not None:
            return self.nf4_weight(), bias
        return self.weight.to(dtype), bias

    def _dense_base(self, dtype: torch.dtype) -> torch.Tensor:
        """The base as a dense tensor (a new one for NF4: merging and export only)."""
        if self.quant_type is not None:
            return self.nf4_weight().dequantize(dtype)
        return self.weight.to(dtype)

    def _add_to_base(self, delta: torch.Tensor) -> None:
        if self.quant_type is not None:
            raise RuntimeError("an NF4 base is never written (that would re-quantize it)")
        acc = torch.promote_types(self.weight.dtype, delta.dtype)
        self.weight.copy_((self.weight.to(acc) + delta).to(self.weight.dtype))

    def _apply(self, fn, recurse=True):
        # Held as buffers, Module.to(dtype) / .half() would convert the NF4 scales (float32 by
        # format): let them follow the device only (an NF4Tensor never converts).
        keep = {name: self._buffers[name] for name in _NF4_BUFFERS.values()
                if self._buffers.get(name) is not None and self._buffers[name].is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._nf4_cache = None
        self._pack_factors()
        return self

    # -- factors: the method's, plus the frozen rows that remove the spectral term from a W0 base
    def _base_correction(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Frozen ``(D, s, U)`` blocks that turn the stored base into the method's base."""
        a = self.adapter
        if not a.replaces_base:
            return []
        blocks = []
        if not self.residual_base:
            blocks.append((a.Q.T, -a.sigma, a.P))
        elif "base_P" in self._buffers:
            blocks += [(self.base_Q.T, self.base_sigma, self.base_P), (a.Q.T, -a.sigma, a.P)]
        return blocks

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The op's ``(D, s, U)``: the method's factors, then any frozen correction rows.
        The first ``adapter.grad_rows`` / ``adapter.dropout_rows`` rows are the method's."""
        down, scale, up = self.adapter.factors()
        extra = self._base_correction()
        if not extra:
            return down, scale, up
        downs, scales, ups = zip(*extra)
        return (torch.cat([down, *downs]), torch.cat([scale, *scales]),
                torch.cat([up, *ups], dim=1))

    # -- the op's factors: assembled, stored and cached by FactorAssembly (modules/factors.py)
    def _init_factor_assembly(self) -> None:
        self._factor_assembly = FactorAssembly()
        self.register_load_state_dict_post_hook(_pack_after_load)
        self._pack_factors()

    def _pack_factors(self) -> None:
        """Store the parameters that share a factor as views of one buffer (idempotent)."""
        self._factor_assembly.pack(self)

    def clear_factor_cache(self) -> None:
        """Forget the cached factors. Never needed after in-place writes (their version
        counters invalidate the cache), only after writes through ``tensor.data``."""
        self._factor_assembly.clear()

    def _correction_rows(self) -> tuple:
        """The frozen rows of :meth:`_base_correction`, declared for the factor assembly
        (sources named relative to the layer)."""
        a = self.adapter
        if not a.replaces_base:
            return ()
        own = (Frozen("adapter.Q", build=transpose), Frozen("adapter.sigma", build=torch.neg),
               Frozen("adapter.P"))
        if not self.residual_base:
            return (own,)
        if "base_P" in self._buffers:
            return ((Frozen("base_Q", build=transpose), Frozen("base_sigma"), Frozen("base_P")),
                    own)
        return ()

    def _op_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The op's ``(D, s, U)`` for inputs of ``dtype``: the same ``U diag(s) D`` and
        leading rows as :meth:`factors`, built as the method declares them (``op_spec``),
        cached, and with no concatenation where parameters share a factor."""
        if _traced():  # plain ops, which the graph replays from the live tensors
            return plain_factors(self, dtype)
        return self._factor_assembly(self, dtype)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)  # deepcopy, unpickling: each parameter has its own storage
        if "_factor_assembly" not in self.__dict__:
            self._init_factor_assembly()
        self._pack_factors()

    @property
    def rank(self) -> int:
        """R, the number of rows of ``D`` the op sees (correction rows included)."""
        return self.adapter.rank + sum(d.shape[0] for d, _, _ in self._base_correction())

    @torch.no_grad()
    def _delta_weight(self) -> torch.Tensor:
        """``U diag(s) D`` of :meth:`factors` (out x in) in float32 or better."""
        down, scale, up = self.factors()
        acc = torch.promote_types(down.dtype, torch.float32)
        return (up.to(acc) * scale.to(acc)) @ down.to(acc)

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
        if self.quant_type is not None:
            # bitsandbytes' Linear4bit: compute in compute_dtype, return x's dtype.
            return self._forward(x.to(self.compute_dtype or x.dtype)).to(x.dtype)
        if x.dtype != self.weight.dtype:
            raise TypeError(f"x must have the base weight's dtype {self.weight.dtype}, "
                            f"got {x.dtype}")
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._base(x.dtype)
        if self.merged:
            return F.linear(x, weight, bias)
        down, scale, up = self._op_factors(x.dtype)
        y = ops.fused_adapter_linear(
            x.reshape(-1, self.in_features), weight, bias, down, scale, up,
            self.dropout, self.adapter.dropout_rows, self.adapter.grad_rows,
            training=self.training)
        return y.reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base: ``W <- W + U diag(s) D``, computed in float32 or
        better and rounded once to the base dtype. Forward then uses the base only.

        An NF4 base is refused: folding would re-quantize it, silently changing the
        pre-trained weight's rounding. Use :meth:`merged_weight` for the dense merged weight
        (``merge_and_unload`` builds dense ``nn.Linear`` layers from it), and quantize that
        explicitly (``NF4Weight.quantize``) if a 4-bit merged model is wanted.
        """
        if self.quant_type is not None:
            raise RuntimeError("merge() on an NF4 base would re-quantize it; use "
                               "merged_weight() for the dense merged weight, or keep the "
                               "adapter unmerged")
        if self.merged:
            raise RuntimeError("AdapterLinear is already merged; call unmerge() first")
        self._add_to_base(self._delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W <- W - U diag(s) D``. Restores the base up to the two
        roundings to the base dtype (error <= 1 ulp of ``max(|W|, |W + delta|)``: exact up
        to rounding in fp32/fp64, within the dtype's tolerance in fp16/bf16). The adapter
        must not change while merged."""
        if not self.merged:
            raise RuntimeError("AdapterLinear is not merged; call merge() first")
        self._add_to_base(-self._delta_weight())
        self.merged = False

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``base + U diag(s) D`` in the base dtype, as a new dense tensor (the layer is
        unchanged). For an NF4 base: the dequantized base plus the delta in float32, rounded
        once to the dtype the NF4 weight dequantizes to."""
        if self.merged:
            return self.weight.detach().clone()
        delta = self._delta_weight()
        acc = torch.promote_types(self.base_dtype, delta.dtype)
        return (self._dense_base(acc) + delta).to(self.base_dtype)

    def adapter_config(self) -> dict:
        """Method, ranks, shapes and dtypes: what a saved adapter must match to load."""
        config = {**self.adapter.config(), "in_features": self.in_features,
                  "out_features": self.out_features, "bias": self.bias is not None,
                  "dropout": self.dropout,
                  "adapter_dtype": _dtype_name(next(self.adapter.parameters()).dtype),
                  "base_dtype": _dtype_name(self.base_dtype)}
        if self.quant_type is not None:
            config["base_quant"] = self.quant_type
        return config

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's parameters and frozen factors by name (detached, shared storage)."""
        return {name: t.detach() for name, t in self.adapter.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (as from :meth:`adapter_tensors`) into the adapter, bit-exact.

        Names, shapes and dtypes must match exactly. When the frozen factors of a
        ``spectral_*`` method differ from the layer's own (e.g. an SVD computed on another
        device), the base is re-derived so that it plus ``P diag(sigma) Q.T`` still equals
        the pre-trained weight: a dense ``W_res`` is updated in place; an NF4 ``W_res``
        cannot be, so the layer keeps the term it was quantized with (``base_P``,
        ``base_sigma``, ``base_Q``) and adds it back through frozen rows; an NF4 ``W0`` base
        (``residual_base=False``) needs nothing.
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
        rebase = self.adapter.replaces_base and self.residual_base and any(
            not torch.equal(own[n], tensors[n].to(own[n].device)) for n in frozen)
        old_term = None
        if rebase and self.quant_type is None:
            old_term = self.adapter.frozen_term()
        elif rebase and "base_P" not in self._buffers:
            for name in _BASE_TERM:
                self.register_buffer(name, own[name.removeprefix("base_")].clone())
        for name, t in tensors.items():
            own[name].copy_(t)
        if old_term is not None:
            self._add_to_base(old_term - self.adapter.frozen_term())
        self._pack_factors()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state dict that holds an NF4 W_res base also says which term it was quantized
        # with (base_P, ... or none): take that over so that base and term stay a pair.
        if (self.quant_type is not None and self.adapter.replaces_base and self.residual_base
                and f"{prefix}weight" in state_dict):
            present = f"{prefix}base_P" in state_dict
            if present and "base_P" not in self._buffers:
                for name in _BASE_TERM:
                    self.register_buffer(name, torch.empty_like(
                        getattr(self.adapter, name.removeprefix("base_"))))
            elif not present:
                for name in _BASE_TERM:
                    self._buffers.pop(name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        a = self.adapter
        ranks = ", ".join(f"{o.name}={getattr(a, o.name)}" for o in a.saved_options()
                          if o.must_match)
        base = ""
        if self.quant_type is not None:
            meta = self._nf4_meta
            held = local_nf4(self._parameters.get("weight"))  # None: held as buffers
            dq = held.double_quant if held is not None else "weight_absmax2" in self._buffers
            dq = ", double_quant" if dq else ""
            base = f", base=nf4 (blocksize={meta['blocksize']}{dq})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, method={self.adapter.name}, {ranks}, "
                f"R={self.rank}, dropout={self.dropout}{base}, "
                f"trainable={self.adapter.num_trainable()}" + (", merged" if self.merged else ""))
