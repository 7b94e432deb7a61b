"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for adapted models.

PyTorch's own engine does the sharding. An NF4 base is one frozen parameter from
construction, an :class:`~speclora_kernels.quant.NF4Tensor` (FSDP2 shards parameters and
replicates buffers), so PyTorch's ``fully_shard`` (or accelerate's) shards it with nothing
of ours called first. This module adds:

- :func:`prepare_fsdp`: checks that every NF4 base splits into whole rows and blocks over
  the mesh (a clear error before sharding), holding any held as buffers as a parameter.
- :func:`prepare_zero3`: every NF4 base held as buffers, for DeepSpeed ZeRO-3 (which
  partitions every parameter as a plain tensor; it leaves buffers whole on every rank).
- :func:`fully_shard_model`: :func:`prepare_fsdp`, then ``fully_shard`` per transformer block
  and at the root. A PiCa ``M`` shared by layers of several blocks must live in one FSDP
  group that is unsharded while any of them runs: the root's. FSDP2 finds a parameter only
  in the modules it manages and never descends into a module already sharded, so the root
  is sharded first, managing the shared ``M`` (all blocks' other parameters ignored), then
  each block, ignoring the ``M``. Sharding blocks first (the usual bottom-up order, as
  ``accelerate`` does) makes each block's ``fully_shard`` take ``M`` as its own, and
  PyTorch 2.13 refuses that at the first forward ("shared with a parameter already managed
  by another FSDP group").
- :func:`gather_adapter_tensors`, :func:`to_cpu_whole`, :func:`place_like`,
  :func:`writer_rank_only`: what ``save_adapter`` / ``load_adapter`` / ``save_checkpoint`` /
  ``load_checkpoint`` use to write the same files as one process and to load them into a
  sharded model.

The frozen spectral factors (``P``, ``sigma``, ``Q``) are buffers: every rank holds them
whole, as the op reads them whole (``(out + in) x k`` values a layer).
"""
from __future__ import annotations

import hashlib
import sys

import torch
import torch.distributed as dist
from torch import nn

from ..modules import AdapterLinear
from ..quant import NF4Tensor, local_nf4
from .inject import adapter_layers, unwrap

__all__ = ["prepare_fsdp", "fully_shard_model", "shared_parameters", "transformer_blocks",
           "is_sharded", "gather_adapter_tensors", "to_cpu_whole", "place_like",
           "writer_rank_only", "ranks_agree", "nf4_bytes", "prepare_zero3"]


def _is_dtensor(t) -> bool:
    # not imported here: if torch.distributed.tensor was never imported, nothing is a DTensor
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


# ---------------------------------------------------------------- preparing and sharding
def prepare_fsdp(model: nn.Module, world_size: int | None = None) -> nn.Module:
    """Check that every NF4 base of ``model`` can be sharded by ``fully_shard``, and hold
    it as a parameter (:meth:`AdapterLinear.hold_nf4_as_parameter`: as from construction,
    so a no-op unless :func:`prepare_zero3` held it as buffers); returns ``model``.

    FSDP2 shards dim 0 (output rows): each layer needs ``out_features`` divisible by
    ``world_size`` (default: the default process group's) and ``in_features`` a multiple
    of the blocksize, so every shard holds whole rows of whole blocks; otherwise
    ``ValueError`` names the layer, before anything changes (a plain ``fully_shard`` fails
    on such a layer too, naming its shape only). :func:`fully_shard_model` calls it."""
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    layers = {n: m for n, m in adapter_layers(model).items() if m.quant_type is not None}
    for name, layer in layers.items():
        held = local_nf4(layer._parameters.get("weight"))
        blocksize = held.meta.blocksize if held is not None else layer.nf4_weight().blocksize
        if layer.out_features % world_size or layer.in_features % blocksize:
            raise ValueError(
                f"{name}: an NF4 base of {layer.out_features} x {layer.in_features} (blocksize "
                f"{blocksize}) cannot be sharded by rows over {world_size} ranks: FSDP2 needs "
                f"out_features divisible by the world size and in_features a multiple of the "
                f"blocksize (keep the layer unquantized, or exclude it from inject)")
    for layer in layers.values():
        layer.hold_nf4_as_parameter()
    return model


def prepare_zero3(model: nn.Module) -> nn.Module:
    """Hold every NF4 base of ``model`` as buffers (:meth:`AdapterLinear.
    hold_nf4_as_buffers`), for DeepSpeed ZeRO-3: it partitions every parameter as a plain
    tensor, which an ``NF4Tensor`` is not, and leaves buffers whole on every rank. Call it
    before ``deepspeed.initialize``; returns ``model``."""
    for layer in adapter_layers(model).values():
        if layer.quant_type is not None:
            layer.hold_nf4_as_buffers()
    return model


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters held by more than one adapter layer (PiCa's ``M``), each once."""
    seen, shared = {}, {}
    for layer in adapter_layers(model).values():
        for p in layer.adapter.parameters():
            if id(p) in seen and seen[id(p)] is not layer:
                shared[id(p)] = p
            seen.setdefault(id(p), layer)
    return list(shared.values())


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of the classes a transformers model lists in ``_no_split_modules`` (its
    decoder/encoder blocks), outermost first; [] for other models."""
    names = set(getattr(unwrap(model), "_no_split_modules", None) or ())
    blocks, inside = [], set()
    for module in unwrap(model).modules():
        if type(module).__name__ in names and id(module) not in inside:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def fully_shard_model(model: nn.Module, *, blocks: list[nn.Module] | None = None,
                      mesh=None, **fsdp_kwargs) -> nn.Module:
    """Shard ``model`` with FSDP2: :func:`prepare_fsdp`, then ``fully_shard(model)`` (the
    root: whatever is outside the blocks, and parameters shared across blocks such as
    PiCa's ``M``), then ``fully_shard(block)`` for each of ``blocks`` (default
    :func:`transformer_blocks`). ``mesh`` and ``fsdp_kwargs`` (``reshard_after_forward``,
    ``mp_policy``, ``offload_policy``, ...) go to every ``fully_shard`` call. bitsandbytes
    ``Linear4bit`` layers left unadapted keep their weights whole on every rank. Returns the
    model (its class becomes FSDP2's ``FSDP<Class>``)."""
    from torch.distributed.fsdp import fully_shard

    bare = unwrap(model)
    if any(_is_dtensor(p) for p in bare.parameters()):
        raise ValueError("model is already sharded (fully_shard was applied)")
    world = mesh.size(mesh.ndim - 1) if mesh is not None else None  # HSDP: the shard dim
    prepare_fsdp(bare, world)
    blocks = transformer_blocks(bare) if blocks is None else list(blocks)
    shared = {id(p) for p in shared_parameters(bare)}
    # bitsandbytes' own 4-bit parameters (layers not adapted) lose their quant_state in a
    # DTensor: they stay whole on every rank, as accelerate leaves them
    bnb = {p for p in bare.parameters() if type(p).__name__ == "Params4bit"}
    in_blocks = {p for b in blocks for p in b.parameters() if id(p) not in shared}
    fully_shard(bare, mesh=mesh, ignored_params=in_blocks | bnb, **fsdp_kwargs)
    # the root replaced each shared parameter by its sharded DTensor in every module
    shared_now = set(shared_parameters(bare))
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=shared_now | bnb, **fsdp_kwargs)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is an FSDP2 (DTensor) shard."""
    return any(_is_dtensor(p) for p in unwrap(model).parameters())


# ---------------------------------------------------------------- whole tensors in and out
def to_cpu_whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole, contiguous, on the CPU: a DTensor is gathered (a collective: every rank
    of its mesh calls this in the same order)."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def gather_adapter_tensors(layers: dict[str, AdapterLinear]
                           ) -> dict[str, dict[str, torch.Tensor]]:
    """Every layer's :meth:`~AdapterLinear.adapter_tensors`, whole and on the CPU, by layer
    name (a tensor shared by layers, PiCa's ``M``, gathered once and the same object in
    each). Under FSDP2 a collective: every rank calls it."""
    done, out = {}, {}
    for name, layer in layers.items():
        held = layer.adapter.state_dict(keep_vars=True)  # the tensors themselves, for their ids
        out[name] = {}
        for key, t in layer.adapter_tensors().items():
            source = id(held.get(key, t))
            if source not in done:
                done[source] = to_cpu_whole(t)
            out[name][key] = done[source]
    return out


def place_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` (a full tensor) on ``like``'s device, and sharded as ``like`` when it is a
    DTensor (this rank's part, sliced locally: no communication)."""
    if _is_dtensor(like):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements,
                                 src_data_rank=None)
    return whole.to(like.device)


def writer_rank_only(sharded: bool, write) -> bool:
    """Run ``write()`` on rank 0 only when ``sharded`` (every rank gathered the same whole
    tensors) and tell every rank whether it failed, so that all raise together; otherwise
    run it here. Returns whether this rank wrote."""
    if not sharded or not dist.is_initialized():
        write()
        return True
    rank, error = dist.get_rank(), None
    if rank == 0:
        try:
            write()
        except BaseException as e:  # noqa: BLE001 (re-raised below, after telling the others)
            error = e
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"rank 0 failed to write the files: {status[0]}")
    return rank == 0


def ranks_agree(tensors: list[torch.Tensor], objects: list) -> bool:
    """Whether every rank of the default process group holds the same ``tensors`` (bytes)
    and ``objects`` (their repr); True without one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    h = hashlib.sha256(repr(objects).encode())
    for t in tensors:
        h.update(t.detach().to("cpu").reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, h.hexdigest())
    return len(set(digests)) == 1


# ---------------------------------------------------------------- measuring
def nf4_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of NF4 storage this rank holds now over the NF4 bases of ``model``, from the
    tensors themselves: ``codes_and_scales`` (``packed`` + ``absmax``: this rank's shards,
    or the whole weights if unsharded), ``double_quant`` (``absmax2`` + ``code2`` +
    ``offset``, whole on every rank) and ``gathered`` (whole weights FSDP2 has all-gathered
    and not yet freed: 0 at rest, one FSDP unit's during its forward). Reads FSDP2's
    parameter records (private API, read only)."""
    out = {"codes_and_scales": 0, "double_quant": 0, "gathered": 0}
    records = _fsdp_records(model)
    for layer in adapter_layers(model).values():
        if layer.quant_type is None:
            continue
        record = records.get(id(layer))
        if record is None:
            held = local_nf4(layer._parameters.get("weight"))
            held = NF4Tensor.from_weight(layer.nf4_weight()) if held is None else held
            tensors, gathered = held.inner_tensors(), []
        else:
            tensors = local_nf4(record.sharded_param).inner_tensors()
            gathered = record.all_gather_outputs
        for name, t in tensors.items():
            kind = "codes_and_scales" if name in ("packed", "absmax") else "double_quant"
            out[kind] += t.untyped_storage().nbytes()
        out["gathered"] += sum(t.untyped_storage().nbytes() for t in gathered)
    return out


def _fsdp_records(model: nn.Module) -> dict[int, object]:
    """FSDP2's ``FSDPParam`` of each sharded NF4 base, by id of its layer."""
    from torch.distributed.fsdp import FSDPModule

    records = {}
    for module in unwrap(model).modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for record in group.fsdp_params:
                info = record._module_info
                if isinstance(info.module, AdapterLinear) and info.param_name == "weight":
                    records[id(info.module)] = record
    return records
