"""DistributedDataParallel, 2 CPU processes on gloo: after backward every adapter gradient,
the shared PiCa ``M`` included, is identical on both ranks and equals the full-batch
gradient of one process."""
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _tiny_models import VOCAB, perturb, tiny_llama  # noqa: F401

from speclora_kernels.integrations import adapter_layers, inject

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")
WORLD = 2
TIMEOUT_S = 120


def adapted_model():
    """PiCa (one M per projection name, shared by both blocks) on attention, SpecLoRA on MLP."""
    model = inject(tiny_llama(), "pica", ["q_proj", "k_proj", "v_proj", "o_proj"], r=4,
                   verbose=False)
    inject(model, "speclora", ["gate_proj", "up_proj", "down_proj"], r=4, k=4, verbose=False)
    perturb(model)
    return model.train()


def batch(rank: int):
    """Rank ``rank``'s half of the global batch (same token count on every rank)."""
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, VOCAB, (3, 10), generator=gen)


def trainable_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        model = adapted_model()
        layers = adapter_layers(model)
        shared = layers["model.layers.0.self_attn.q_proj"].adapter.M
        assert shared is layers["model.layers.1.self_attn.q_proj"].adapter.M
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids = batch(rank)
        ddp(input_ids=ids, labels=ids).loss.backward()
        torch.save(trainable_grads(model), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_gradients_agree_across_ranks(tmp_path, monkeypatch):
    # Children inherit the environment: PyTorch CPU path, loopback only.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    grads = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # Reference: one process, the mean of the per-rank losses over the whole batch.
    model = adapted_model()
    loss = sum(model(input_ids=batch(r), labels=batch(r)).loss for r in range(WORLD)) / WORLD
    loss.backward()
    want = trainable_grads(model)

    shared = "model.layers.0.self_attn.q_proj.adapter.M"
    assert shared in want and "model.layers.1.self_attn.q_proj.adapter.M" not in want
    assert set(grads[0]) == set(grads[1]) == set(want)
    assert len(want) == 4 + 3 * 2 * 3  # 4 shared M + A, B, m of 6 SpecLoRA layers
    for name, grad in want.items():
        assert torch.equal(grads[0][name], grads[1][name]), name
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-5, atol=1e-7)
