"""The op's ``(D, s, U)`` for an ``AdapterLinear``: assembled from its method's declaration
(:mod:`speclora_kernels.methods.assembly`), stored so that nothing is concatenated, cached.

- **Inference** (grad disabled, or nothing the factors read requires grad): the factors are
  built once, in the compute dtype, and reused until one of their sources (a parameter or
  buffer of the method, a frozen correction buffer of the layer) changes its version
  counter (every in-place write: optimizer steps, ``copy_``, ``load_state_dict``, edits
  under ``no_grad``), identity, data pointer, dtype or device. Checking reads a few
  attributes per source and runs no op.
- **Training**: frozen elements come from a cache keyed the same way. A ``D`` or ``s`` made
  of parameters and frozen rows is one contiguous buffer whose row ranges the parameters
  are views of (:meth:`FactorAssembly.pack`); an autograd Function hands the buffer to the
  op and routes the gradient rows back to the parameters (no copy forward, views
  backward). Stacked parameters likewise. Only the method's computed elements run ops.

Packing re-points ``param.data`` at a range of the buffer (the parameter object, its
``state_dict`` key and its values stay). It happens when the layer is built, after
``Module._apply`` (``.to()``, ``.half()``...), after ``load_state_dict`` and after
deepcopy / unpickling (where every parameter gets a storage of its own): never in a
forward. A parameter that is not a view of its buffer any more (replaced by
``load_state_dict(assign=True)`` or ``functional_call``, sharded by FSDP...) is
concatenated instead: one op more, the same values.

Not seen: writes through ``tensor.data`` (a separate version counter, invisible to autograd
too) to a buffer, or to a parameter before an inference call: ``layer.clear_factor_cache()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import is_

import torch
from torch import nn

from ..methods.assembly import Computed, Frozen, Param

_D, _S, _U = range(3)


def op_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``s`` as the op takes it: float32 or the input's dtype (else float32 or better)."""
    if scale.dtype in (torch.float32, dtype):
        return scale
    return scale.to(torch.promote_types(dtype, torch.float32))


def plain_factors(layer, dtype: torch.dtype) -> tuple:
    """``layer.factors()`` as the op takes them: plain autograd ops, nothing cached."""
    down, scale, up = layer.factors()
    return down, op_scale(scale, dtype), up


def _unusable(inference_tensors: bool) -> bool:
    """Tensors made under inference_mode cannot be saved for backward outside it."""
    return (inference_tensors and torch.is_grad_enabled()
            and not torch.is_inference_mode_enabled())


def _inference_only(t: torch.Tensor) -> bool:
    """A cached tensor made under inference_mode, now outside it (maybe to be saved)."""
    return t.is_inference() and not torch.is_inference_mode_enabled()


class _Key:
    """Identity, version counter and data pointer of some tensors. It holds the tensors and
    their storages: no other tensor can then be at the same place, so a new ``.data`` (a
    ``.to()``, a load) moves the data pointer. ``pack()`` drops every key when the
    module's tensors move, so no old storage is kept for long."""

    __slots__ = ("tensors", "storages", "versions", "pointers")

    def __init__(self, tensors):
        self.tensors = tuple(tensors)
        try:
            self.storages = [t.untyped_storage() for t in tensors]
            self.versions = [t._version for t in tensors]
            self.pointers = [t.data_ptr() for t in tensors]
        except (RuntimeError, TypeError, NotImplementedError):
            self.versions = None  # inference tensors, storage-less subclasses: no cache

    def matches(self, tensors) -> bool:
        if self.versions is None or len(tensors) != len(self.tensors):
            return False
        try:
            return (all(map(is_, tensors, self.tensors))
                    and [t._version for t in tensors] == self.versions
                    and [t.data_ptr() for t in tensors] == self.pointers)
        except (RuntimeError, TypeError, NotImplementedError):
            return False


def _slot(layer, path: str) -> tuple[dict, str]:
    """The ``_parameters`` or ``_buffers`` dict holding the tensor at ``path`` (dotted, from
    ``layer``), and its key: read with one dict lookup per call."""
    *modules, name = path.split(".")
    owner = layer
    for m in modules:
        owner = owner._modules[m]
    for d in (owner._parameters, owner._buffers):
        if name in d:
            return d, name
    raise AttributeError(f"{path} must name a parameter or a buffer (op_spec)")


class _FrozenRef:
    __slots__ = ("sources", "build")

    def __init__(self, layer, frozen: Frozen, prefix: str):
        self.sources = tuple(_slot(layer, prefix + name) for name in frozen.sources)
        self.build = frozen.build

    def tensors(self) -> list:
        return [d[k] for d, k in self.sources]

    def value(self, tensors) -> torch.Tensor:
        with torch.no_grad():
            return self.build(*tensors) if self.build is not None else tensors[0]


@dataclass
class _Elem:
    kind: str  # "param", "frozen" or "computed"
    source: tuple | None = None  # param: (dict, key)
    ref: _FrozenRef | None = None
    name: str = ""

    def get(self) -> torch.Tensor:
        d, k = self.source
        return d[k]


def _elem(layer, e, prefix: str) -> _Elem:
    if isinstance(e, Param):
        return _Elem("param", source=_slot(layer, prefix + e.name), name=e.name)
    if isinstance(e, Frozen):
        return _Elem("frozen", ref=_FrozenRef(layer, e, prefix))
    if isinstance(e, Computed):
        return _Elem("computed", name=e.name)
    raise TypeError(f"op_spec elements must be Param, Frozen or Computed, got {e!r}")


@dataclass
class _Factor:
    """One of D, s, U (``index``), or a stack of parameters (index None), as planned."""

    index: int | None
    elems: list
    kind: str  # "one", "frozen", "pack", "stack" or "cat"
    name: str = ""

    @property
    def axis(self) -> int:
        return 1 if self.index == _U else 0


def _kind(index: int, elems: list) -> str:
    kinds = {e.kind for e in elems}
    if len(elems) == 1:
        return "one"
    if kinds == {"frozen"}:
        return "frozen"
    if index != _U and "computed" not in kinds:  # a U column block is never a dense view
        return "pack"
    return "cat"


class _Plan:
    def __init__(self, layer):
        adapter = self.adapter = layer._modules["adapter"]
        self.residual_base, self.base_term = layer.residual_base, "base_P" in layer._buffers
        spec = adapter.op_spec()
        rows = [tuple(_elem(layer, e, "adapter.") for e in group) for group in spec.rows]
        rows += [tuple(_elem(layer, e, "") for e in group) for group in layer._correction_rows()]
        self.factors = [_Factor(i, [group[i] for group in rows], "") for i in range(3)]
        for f in self.factors:
            f.kind = _kind(f.index, f.elems)
        self.stacks = [_Factor(None, [_Elem("param", source=_slot(layer, "adapter." + n),
                                            name=n) for n in names], "stack", name)
                       for name, names in spec.stacks.items()]
        self.frozen = {name: _FrozenRef(layer, f, "adapter.") for name, f in spec.frozen.items()}
        self.computes = any(e.kind == "computed" for f in self.factors for e in f.elems)
        self.packable = [f for f in self.factors if f.kind == "pack"] + self.stacks
        names = [f"adapter.{n}" for n, _ in adapter.named_parameters(remove_duplicate=False)]
        names += [f"adapter.{n}" for n, _ in adapter.named_buffers(remove_duplicate=False)]
        refs = [e.ref for f in self.factors for e in f.elems if e.ref is not None]
        refs += list(self.frozen.values())
        # every tensor a frozen element reads, once: one key for all frozen values
        self.frozen_sources = list({(id(d), k): (d, k) for r in refs
                                    for d, k in r.sources}.values())
        self.sources = [_slot(layer, n) for n in names] + self.frozen_sources

    def current(self, layer) -> bool:
        """Built for this layer's adapter, base and correction rows."""
        return (layer._modules.get("adapter") is self.adapter
                and layer.residual_base == self.residual_base
                and ("base_P" in layer._buffers) == self.base_term)


@dataclass
class _Slot:
    index: object  # buffer[index] is the element's range
    elem: _Elem | None = None  # params
    ptr: int = 0
    shape: tuple = ()
    stride: tuple = ()
    ref: _FrozenRef | None = None  # frozen rows


class _Pack:
    """One contiguous buffer holding a factor's (or a stack's) elements; the parameters
    among them are views of it."""

    def __init__(self, factor: _Factor, params: list):
        values = []
        for e in factor.elems:
            if e.kind == "param":
                values.append(e.get().detach())
            else:
                values.append(e.ref.value(e.ref.tensors()))
        dtype, device = params[0].dtype, params[0].device
        if factor.kind == "stack":
            self.buffer = torch.empty((len(values), *values[0].shape), dtype=dtype,
                                      device=device)
            indices = list(range(len(values)))
        else:
            rows = [v.shape[0] for v in values]
            self.buffer = torch.empty((sum(rows), *values[0].shape[1:]), dtype=dtype,
                                      device=device)
            starts = [sum(rows[:i]) for i in range(len(rows))]
            indices = [slice(a, a + n) for a, n in zip(starts, rows)]
        self.params, self.frozen = [], []
        with torch.no_grad():
            for e, v, index in zip(factor.elems, values, indices):
                slot = self.buffer[index]
                slot.copy_(v)
                if e.kind == "param":
                    e.get().data = slot
                    self.params.append(_Slot(index, elem=e, ptr=slot.data_ptr(),
                                             shape=slot.shape, stride=slot.stride()))
                else:
                    self.frozen.append(_Slot(index, ref=e.ref))

    def intact(self) -> bool:
        """Whether every parameter still is its view of the buffer (same memory, shape,
        strides and dtype: then it is one, the buffer being alive)."""
        dtype = self.buffer.dtype
        try:
            for s in self.params:
                p = s.elem.get()
                if (p.data_ptr() != s.ptr or p.shape != s.shape or p.stride() != s.stride
                        or p.dtype != dtype):
                    return False
        except (RuntimeError, TypeError, NotImplementedError):
            return False
        return True

    def rewrite_frozen(self) -> None:
        """Write the frozen rows again (their sources changed)."""
        with torch.no_grad():
            for s in self.frozen:
                self.buffer[s.index].copy_(s.ref.value(s.ref.tensors()))


def _packable_params(factor: _Factor) -> list | None:
    params = [e.get() for e in factor.elems if e.kind == "param"]
    first = params[0]
    if (any(type(p) is not nn.Parameter for p in params)
            or any(type(p.data) is not torch.Tensor for p in params)
            or len({id(p) for p in params}) != len(params)
            or any(p.dtype != first.dtype or p.device != first.device for p in params)
            or first.device.type == "meta" or not first.dtype.is_floating_point):
        return None
    return params


class _PackedFactors(torch.autograd.Function):
    """The packs' buffers (as fresh aliases) for the op; backward hands each parameter the
    gradient of its range (a view)."""

    @staticmethod
    def forward(ctx, packs, *params):
        ctx.packs = packs
        return tuple(pack.buffer.detach() for pack in packs)

    @staticmethod
    def backward(ctx, *grads):
        out = []
        for pack, grad in zip(ctx.packs, grads):
            out += [None if grad is None else grad[s.index] for s in pack.params]
        return (None, *(g if need else None
                        for g, need in zip(out, ctx.needs_input_grad[1:])))


@dataclass
class _Inference:
    key: _Key
    dtype: torch.dtype
    factors: tuple
    inference_tensors: bool


class FactorAssembly:
    """The op's ``(D, s, U)`` of one layer: plan, packs and caches (see the module doc).
    Deep copies and pickles start empty (the copy packs its own parameters)."""

    def __init__(self):
        self._plan = None
        self._packs: dict[int, _Pack] = {}
        self._frozen: dict = {}  # frozen values, valid while _frozen_key matches
        self._frozen_key: _Key | None = None
        self._inference: _Inference | None = None

    def __deepcopy__(self, memo):
        return FactorAssembly()

    def __reduce__(self):
        return FactorAssembly, ()

    def clear(self) -> None:
        """Forget every cached factor (the packs' frozen rows are rewritten on next use)."""
        self._frozen, self._frozen_key, self._inference = {}, None, None

    def plan(self, layer) -> _Plan:
        plan = self._plan
        if plan is None or not plan.current(layer):
            plan = self._plan = _Plan(layer)
            self._packs = {}
            self.clear()
        return plan

    def pack(self, layer) -> None:
        """Store each packable factor's parameters as views of one buffer (idempotent)."""
        try:
            plan = self.plan(layer)
        except (AttributeError, KeyError):  # not plannable: plain ops on every call
            self._plan = None
            return
        for i, factor in enumerate(plan.packable):
            pack = self._packs.get(i)
            if pack is not None and pack.intact():
                continue
            params = _packable_params(factor)
            if params is None:
                self._packs.pop(i, None)
            else:
                self._packs[i] = _Pack(factor, params)
        self.clear()

    def __call__(self, layer, dtype: torch.dtype) -> tuple:
        try:
            plan = self.plan(layer)
            sources = [d[k] for d, k in plan.sources]
        except (AttributeError, KeyError):  # e.g. parametrized tensors: plain ops
            self._plan = None
            return plain_factors(layer, dtype)
        if torch.is_grad_enabled() and any([t.requires_grad for t in sources]):
            down, scale, up = self._assemble(layer, plan, dtype)
            return down, op_scale(scale, dtype), up
        hit = self._inference
        if (hit is not None and hit.dtype == dtype and hit.key.matches(sources)
                and not _unusable(hit.inference_tensors)):
            return hit.factors
        with torch.no_grad():
            down, scale, up = self._assemble(layer, plan, dtype)
            factors = (down.to(dtype), op_scale(scale, dtype), up.to(dtype))
        self._inference = _Inference(_Key(sources), dtype, factors,
                                     any(t.is_inference() for t in factors))
        return factors

    # -- assembly
    def _assemble(self, layer, plan: _Plan, dtype: torch.dtype) -> list:
        frozen = [d[k] for d, k in plan.frozen_sources]
        if self._frozen_key is None or not self._frozen_key.matches(frozen):
            self._frozen = {}
            for pack in self._packs.values():
                pack.rewrite_frozen()
            self._frozen_key = _Key(frozen)
        packed = {}
        packs = self._packs
        live = [(i, pack) for i, pack in packs.items() if pack.intact()] if packs else ()
        if live:
            params = [s.elem.get() for _, pack in live for s in pack.params]
            outs = _PackedFactors.apply(tuple(pack for _, pack in live), *params)
            packed = {id(plan.packable[i]): out for (i, _), out in zip(live, outs)}
        tensors = {}
        for stack in plan.stacks:
            tensors[stack.name] = packed.get(id(stack))
            if tensors[stack.name] is None:
                tensors[stack.name] = torch.stack([e.get() for e in stack.elems])
        for name, ref in plan.frozen.items():
            tensors[name] = self._frozen_value(ref)
        computed = layer.adapter.op_computed(tensors) if plan.computes else {}
        return [packed[id(f)] if id(f) in packed else self._factor(f, computed, dtype)
                for f in plan.factors]

    def _factor(self, f: _Factor, computed: dict, dtype) -> torch.Tensor:
        if f.kind in ("one", "frozen") and all(e.kind == "frozen" for e in f.elems):
            return self._frozen_factor(f, dtype)
        parts = [e.get() if e.kind == "param" else computed[e.name]
                 if e.kind == "computed" else self._frozen_value(e.ref)
                 for e in f.elems]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=f.axis)

    def _frozen_value(self, ref: _FrozenRef) -> torch.Tensor:
        value = self._frozen.get(id(ref))
        if value is None or _inference_only(value):
            value = self._frozen[id(ref)] = ref.value(ref.tensors())
        return value

    def _frozen_factor(self, f: _Factor, dtype) -> torch.Tensor:
        """A factor of frozen elements only: concatenated once, in the op's dtype (x's for
        D and U: the kernels round them to it anyway)."""
        value = self._frozen.get((id(f), dtype))
        if value is None or _inference_only(value):
            with torch.no_grad():
                parts = [self._frozen_value(e.ref) for e in f.elems]
                value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=f.axis)
                value = op_scale(value, dtype) if f.index == _S else value.to(dtype)
                value = self._frozen[(id(f), dtype)] = value.contiguous()
        return value
