"""FSDP2 (``fully_shard``), 2 CPU processes on gloo, a tiny Llama with PiCa on attention
(one ``M`` per projection name, shared by both blocks) and SpecLoRA (dropout 0.1) on the MLP,
on a dense and on an NF4 base. One spawn checks, per base:

- 4 AdamW steps give the losses of one process over the same global batch (fp32 rounding);
- each rank holds half of the NF4 codes and block scales (the whole ones are freed) and
  gathers one block's at a time during forward and backward;
- ``save_adapter`` under FSDP2 writes the bytes one process writes for the same values;
  ``load_adapter`` into a sharded model gives the trained model's outputs, bitwise;
- a run resumed with ``load_checkpoint`` from a sharded checkpoint is bitwise the
  uninterrupted one (losses and parameters);
- the full state dict (``get_model_state_dict``) has the unsharded model's keys, its NF4
  base bitwise, and loads back into a sharded model (``set_model_state_dict``);
- sharding blocks first (as ``accelerate`` does) fails on the shared ``M`` at the first
  forward (PyTorch 2.13), while ``accelerate``'s ``fsdp2_prepare_model`` shards SpecLoRA on
  an NF4 base like ``fully_shard_model``;
- PyTorch's own ``fully_shard``, applied per block and at the root with no call of ours
  (SpecLoRA on every projection), holds half the NF4 codes per rank and gives one process's
  losses and adapter;
- DDP broadcasts the NF4 bases (parameters) at start-up: a rank's differing codes are
  rank 0's afterwards, and training gives FSDP2's losses.

Single-process tests of ``NF4Tensor`` and the NF4 holding: tests/test_nf4_tensor.py.
"""
import datetime
import gc
import hashlib
import os
import socket
import time
import types
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _tiny_models import VOCAB, perturb, tiny_llama

from speclora_kernels import load_adapter, save_adapter
from speclora_kernels.integrations import adapter_layers, inject
from speclora_kernels.integrations.fsdp import fully_shard_model, nf4_bytes, prepare_zero3
from speclora_kernels.persistence import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
WORLD, STEPS, RESUME_AT = 2, 4, 2
TIMEOUT_S = 240
BASES = ("dense", "nf4")
ATTENTION, MLP = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]
# what each run adapts: PiCa + SpecLoRA per base, and SpecLoRA everywhere on NF4 for the plain
# fully_shard run (PiCa's shared M needs the root sharded first, see fully_shard_model)
BUILDS = {"dense": dict(base="dense"), "nf4": dict(base="nf4"),
          "plain": dict(base="nf4", methods=("speclora",), speclora_on=ATTENTION + MLP)}


def adapted(base: str, seed: int = 2, methods=("pica", "speclora"), speclora_on=MLP):
    """The tiny Llama (same base weights every call), NF4 (bitsandbytes Linear4bit) or not,
    adapted; ``seed`` moves the adapter away from its init (B = 0, M = 0)."""
    model = tiny_llama()
    if base == "nf4":
        from speclora_kernels.integrations.bnb import quantize_nf4

        quantize_nf4(model)
    if "pica" in methods:
        inject(model, "pica", ATTENTION, r=4)
    inject(model, "speclora", speclora_on, r=4, k=4, dropout=0.1)
    perturb(model, seed=seed)
    return model.train()


def batch(step: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s half of step ``step``'s global batch."""
    return torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(
        100 * step + rank))


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train_step(model, opt, step, rank):
    ids = batch(step, rank)
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return (loss / WORLD).item()


def checksum(model) -> str:
    """sha256 of the trainable parameters, whole (gathered: every rank calls it)."""
    from speclora_kernels.integrations.fsdp import to_cpu_whole

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode() + to_cpu_whole(p).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def eval_loss(model) -> str:
    model.eval()
    with torch.no_grad():
        ids = batch(99, dist.get_rank())
        loss = model(input_ids=ids, labels=ids).loss.item().hex()
    model.train()
    return loss


def _peak_gathered(model) -> dict:
    """Hooks recording the NF4 bytes resident while each NF4 layer runs forward/backward."""
    peak = {"forward": 0, "backward": 0}

    def record(phase):
        def hook(*_):
            b = nf4_bytes(model)
            peak[phase] = max(peak[phase], b["codes_and_scales"] + b["double_quant"]
                              + b["gathered"])
        return hook

    handles = []
    for layer in adapter_layers(model).values():
        if layer.quant_type is not None:
            handles.append(layer.register_forward_pre_hook(record("forward")))
            handles.append(layer.register_full_backward_pre_hook(record("backward")))
    return peak, handles


def _run(rank: int, base: str, out: str) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    res = {}
    model = adapted(base)
    whole = [weakref.ref(layer.nf4_weight().packed) for layer in adapter_layers(model).values()
             if layer.quant_type is not None]
    res["bytes_whole"] = nf4_bytes(model)
    fully_shard_model(model)
    gc.collect()
    res["whole_freed"] = all(ref() is None for ref in whole)
    res["bytes_rest"] = nf4_bytes(model)
    layers = adapter_layers(model)
    m0, m1 = (layers[f"model.layers.{i}.self_attn.q_proj"].adapter.M for i in (0, 1))
    names = [n for n, _ in model.named_parameters() if n.endswith("q_proj.adapter.M")]
    res["shared_M"] = (m0 is m1, type(m0).__name__, names)  # one sharded parameter
    save_adapter(model, os.path.join(out, f"{base}-init"))
    opt = optimizer(model)
    peak, handles = _peak_gathered(model)
    res["losses"], res["sums"] = [], []
    for step in range(STEPS):
        if step == RESUME_AT:
            save_checkpoint(os.path.join(out, f"{base}-ckpt"), model, opt, step=step)
        res["losses"].append(train_step(model, opt, step, rank))
        res["sums"].append(checksum(model))
        for h in handles if step == 0 else ():
            h.remove()
    res["peak"], res["bytes_after"] = dict(peak), nf4_bytes(model)
    save_adapter(model, os.path.join(out, f"{base}-trained"))
    res["eval"] = eval_loss(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if rank == 0:
        res["full_state_dict"] = {k: v.clone() for k, v in full.items()}

    # a fresh sharded model: the full state dict loads into it (NF4 shards included)
    other = adapted(base, seed=9)
    fully_shard_model(other)
    set_model_state_dict(other, full, options=StateDictOptions(full_state_dict=True))
    res["set_state_dict"] = eval_loss(other) == res["eval"]

    # resume: a fresh sharded model and optimizer, the global RNG scrambled per rank
    fresh = adapted(base, seed=7)
    fully_shard_model(fresh)
    opt2 = optimizer(fresh)
    torch.manual_seed(1234 + rank)
    info = load_checkpoint(os.path.join(out, f"{base}-ckpt"), fresh, opt2)
    res["resumed_losses"], res["resumed_sums"] = [], []
    for step in range(info["step"], STEPS):
        res["resumed_losses"].append(train_step(fresh, opt2, step, rank))
        res["resumed_sums"].append(checksum(fresh))

    # load_adapter into a sharded model
    loaded = adapted(base, seed=11)
    fully_shard_model(loaded)
    load_adapter(loaded, os.path.join(out, f"{base}-trained"))
    res["loaded_eval"] = eval_loss(loaded)
    return res


def _accelerator(rank: int):
    """What accelerate's fsdp2_prepare_model reads of an Accelerator, for FSDP2 with
    transformer-block wrapping (accelerate itself runs FSDP only on GPUs)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True)
    return types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
        mixed_precision="no", is_main_process=rank == 0, device=torch.device("cpu"),
        parallelism_config=None)


def _first_forward_error(model, rank) -> str:
    ids = batch(0, rank)
    try:
        model(input_ids=ids, labels=ids)
    except ValueError as e:
        return str(e)
    return "no error"


def _other_wrappings(rank: int) -> dict:
    """Blocks first (the usual order) with a shared PiCa M, and accelerate's FSDP2 path."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import fully_shard

    res = {}
    model = adapted("dense")
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    res["blocks_first"] = _first_forward_error(model, rank)
    model = fsdp2_prepare_model(_accelerator(rank), adapted("dense"))
    res["accelerate_pica"] = _first_forward_error(model, rank)

    losses = {}
    for how in ("ours", "accelerate"):  # attention: bitsandbytes Linear4bit, not adapted
        model = adapted("nf4", methods=("speclora",))
        res["bytes_whole"] = nf4_bytes(model)
        if how == "ours":
            fully_shard_model(model)
        else:
            model = fsdp2_prepare_model(_accelerator(rank), model)  # nothing of ours first
        res[f"{how}_bytes"] = nf4_bytes(model)
        torch.manual_seed(5)
        opt = optimizer(model)
        losses[how] = [train_step(model, opt, step, rank) for step in range(2)]
    res["accelerate_losses"] = losses
    res["ddp"] = _ddp(rank)
    return res


def _plain_fully_shard(rank: int, out: str) -> dict:
    """PyTorch's fully_shard as its docs apply it (each block, then the root) and nothing
    of ours before it: the NF4 bases are parameters from construction."""
    from torch.distributed.fsdp import fully_shard

    model = adapted(**BUILDS["plain"])
    whole = [weakref.ref(layer.nf4_weight().packed) for layer in adapter_layers(model).values()]
    res = {"bytes_whole": nf4_bytes(model)}
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    gc.collect()
    res["whole_freed"] = all(ref() is None for ref in whole)
    res["bytes_rest"] = nf4_bytes(model)
    save_adapter(model, os.path.join(out, "plain-init"))
    opt = optimizer(model)
    res["losses"] = [train_step(model, opt, step, rank) for step in range(STEPS)]
    res["bytes_after"] = nf4_bytes(model)
    save_adapter(model, os.path.join(out, "plain-trained"))
    return res


def _ddp(rank: int) -> dict:
    """DDP over NF4 bases held as parameters (SpecLoRA on the MLP; attention stays
    bitsandbytes Linear4bit, whose plain uint8 weights share DDP's broadcast buckets)."""
    from speclora_kernels.integrations.fsdp import ranks_agree

    model = adapted("nf4", methods=("speclora",))
    held = adapter_layers(model)["model.layers.1.mlp.down_proj"].weight
    tensors = [*held.inner_tensors().values(), model.model.layers[0].self_attn.q_proj.weight]
    if rank == 1:  # differs from rank 0 until DDP's start-up broadcast
        with torch.no_grad():
            for t in tensors:
                t.add_(1)
    res = {"differed": not ranks_agree(tensors, [])}
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    res["synced"] = ranks_agree(tensors, [])
    torch.manual_seed(5)
    opt = optimizer(model)
    res["losses"] = [train_step(ddp, opt, step, rank) for step in range(2)]
    return res


def _worker(rank: int, port: int, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        results = {base: _run(rank, base, out) for base in BASES}
        results["plain"] = _plain_fully_shard(rank, out)
        results["other"] = _other_wrappings(rank)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(name: str, out: str) -> dict:
    """One process, the same global batch: each step the two halves run from the same RNG
    state, as on the two ranks (the dropout seeds come from it), their mean loss backward."""
    model = adapted(**BUILDS[name])
    save_adapter(model, os.path.join(out, f"{name}-init-single"))
    opt, losses = optimizer(model), []
    for step in range(STEPS):
        state = torch.get_rng_state()
        halves = []
        for rank in range(WORLD):
            torch.set_rng_state(state)
            ids = batch(step, rank)
            halves.append(model(input_ids=ids, labels=ids).loss)
        loss = sum(halves) / WORLD
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"losses": losses, "model": model}


def _files(directory) -> dict:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The 2-process run (one spawn for every test below) and its single-process reference."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {"TRITON_INTERPRET": "0", "GLOO_SOCKET_IFNAME": "lo"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the children inherit it: PyTorch CPU path, loopback only
    try:
        ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    from speclora_kernels.ops import autograd

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with autograd.cpu_path():  # the reference runs while the workers do
            torch.manual_seed(0)
            reference = {name: _reference(name, str(out)) for name in BUILDS}
        deadline = time.monotonic() + TIMEOUT_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"FSDP workers did not finish within {TIMEOUT_S} s")
    finally:
        torch.set_num_threads(before)
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return types.SimpleNamespace(out=out, ranks=ranks, reference=reference)


@pytest.mark.parametrize("name", BUILDS)
def test_losses_equal_one_process(fsdp_run, name):
    got = [r[name]["losses"] for r in fsdp_run.ranks]
    assert got[0] == got[1]
    want = fsdp_run.reference[name]["losses"]
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(want), rtol=2e-6, atol=0)
    assert got[0][-1] < got[0][0]


def _codes_halved(res) -> tuple[dict, dict]:
    """A rank's NF4 bytes (whole, at rest) after checking it keeps 1/WORLD of the codes and
    scales, every double-quant constant, nothing gathered, and freed the whole tensors."""
    whole, rest = res["bytes_whole"], res["bytes_rest"]
    assert res["whole_freed"]
    assert rest["codes_and_scales"] * WORLD == whole["codes_and_scales"]
    assert rest["double_quant"] == whole["double_quant"] and rest["gathered"] == 0
    assert res["bytes_after"] == rest
    return whole, rest


def test_nf4_codes_sharded_in_half(fsdp_run):
    for r in fsdp_run.ranks:
        res = r["nf4"]
        whole, rest = _codes_halved(res)
        # during forward/backward one block's codes are gathered beside the shards (the tiny
        # Llama has two blocks of equal size), and freed again after
        block = whole["codes_and_scales"] // 2
        for phase in ("forward", "backward"):
            assert res["peak"][phase] == rest["codes_and_scales"] + rest["double_quant"] + block
        print(f"\nNF4 bytes per rank: whole {whole}, at rest {rest}, peak {res['peak']}")


def test_shared_M_is_one_parameter(fsdp_run):
    for r in fsdp_run.ranks:
        for base in BASES:
            assert r[base]["shared_M"] == (True, "DTensor",
                                           ["model.layers.0.self_attn.q_proj.adapter.M"])


def test_plain_fully_shard_holds_half_the_nf4_codes(fsdp_run):
    for r in fsdp_run.ranks:
        whole, rest = _codes_halved(r["plain"])
        print(f"\nplain fully_shard, NF4 bytes per rank: whole {whole}, at rest {rest}")


@pytest.mark.parametrize("name", BUILDS)
def test_saved_adapter_equals_one_process(fsdp_run, name):
    out = fsdp_run.out
    assert _files(out / f"{name}-init") == _files(out / f"{name}-init-single")
    # the trained adapter: one process loading and saving it again writes the same bytes
    model = adapted(**BUILDS[name], seed=3)
    load_adapter(model, out / f"{name}-trained")
    save_adapter(model, out / f"{name}-resaved")
    assert _files(out / f"{name}-trained") == _files(out / f"{name}-resaved")
    want = dict(fsdp_run.reference[name]["model"].named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, want[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("base", BASES)
def test_resume_and_load_into_sharded_model(fsdp_run, base):
    for r in fsdp_run.ranks:
        res = r[base]
        assert res["resumed_losses"] == res["losses"][RESUME_AT:]
        assert res["resumed_sums"] == res["sums"][RESUME_AT:]
        assert res["loaded_eval"] == res["eval"]
        assert res["set_state_dict"]


@pytest.mark.parametrize("base", BASES)
def test_full_state_dict_is_the_unsharded_one(fsdp_run, base):
    full = fsdp_run.ranks[0][base]["full_state_dict"]
    want = adapted(base).state_dict()
    assert list(full) == list(want)
    trained = {n for n, p in fsdp_run.reference[base]["model"].named_parameters(
        remove_duplicate=False) if p.requires_grad}
    for key, t in want.items():
        if key not in trained:
            assert full[key].dtype == t.dtype and torch.equal(full[key], t), key


def test_other_wrappings(fsdp_run):
    for r in fsdp_run.ranks:
        other = r["other"]
        for how in ("blocks_first", "accelerate_pica"):
            assert "shared with a parameter already managed by another FSDP group" in other[how]
        ours, acc = other["accelerate_losses"]["ours"], other["accelerate_losses"]["accelerate"]
        assert ours == acc
        whole = other["bytes_whole"]["codes_and_scales"]
        assert other["ours_bytes"] == other["accelerate_bytes"]
        assert other["accelerate_bytes"]["codes_and_scales"] * WORLD == whole
        ddp = other["ddp"]
        assert ddp["differed"] and ddp["synced"]
        torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(ours),
                                   rtol=2e-6, atol=0)


# ---------------------------------------------------------------- DeepSpeed ZeRO-3 (optional)
def _zero3_worker(rank: int, port: int, out: str):
    import deepspeed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for base in BASES:
        model = prepare_zero3(adapted(base))
        whole = nf4_bytes(model)
        config = {"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 3},
                  "zero_allow_untested_optimizer": True}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer(model),
                                               config=config)
        losses = []
        for step in range(STEPS):
            ids = batch(step, rank)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            losses.append((loss / WORLD).item())
        parts = [(p.ds_tensor.numel(), p.ds_numel) for p in model.parameters() if p.requires_grad]
        results[base] = {"losses": losses, "whole": whole, "after": nf4_bytes(model),
                         "parts": parts}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
def test_deepspeed_zero3(tmp_path, monkeypatch):
    """ZeRO-3 runs the adapters unchanged (it gathers the adapter's parameters when
    AdapterLinear reads them); it partitions parameters only, so NF4 bases (buffers after
    ``prepare_zero3``) stay whole on every rank. deepspeed is not a dependency: skipped unless installed."""
    pytest.importorskip("deepspeed")
    for k, v in {"TRITON_INTERPRET": "0", "GLOO_SOCKET_IFNAME": "lo",
                 "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(k, v)  # the children inherit it
    mp.start_processes(_zero3_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for base in BASES:
        torch.manual_seed(0)
        want = _reference(base, str(tmp_path))["losses"]
        for r in ranks:
            torch.testing.assert_close(torch.tensor(r[base]["losses"]), torch.tensor(want),
                                       rtol=2e-6, atol=0)
            assert r[base]["after"] == r[base]["whole"]  # NF4 not partitioned
            assert all(local * WORLD >= n and local < n for local, n in r[base]["parts"])
