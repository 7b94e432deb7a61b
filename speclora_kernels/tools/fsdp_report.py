"""NF4 bytes per rank under FSDP2, measured: ``python -m speclora_kernels.tools.fsdp_report``.

Spawns ``--world`` CPU processes on gloo, builds a Llama from a config (random weights) with
every linear layer NF4 (blocksize 64, double quant) and SpecLoRA on it, shards it with
:func:`~speclora_kernels.integrations.fully_shard_model` (``--plain``: PyTorch's own
``fully_shard`` on each block, then the root, nothing of ours first), runs one training step and
reports, per rank, the bytes of NF4 storage resident, read from the tensors themselves
(:func:`~speclora_kernels.integrations.fsdp.nf4_bytes`): the whole model before sharding, at
rest after it, and the most at any NF4 layer's forward and backward. Needs transformers.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import tempfile
import warnings

import torch

VOCAB = 1024


def _model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..integrations import inject

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 128), vocab_size=VOCAB,
                         max_position_embeddings=args.tokens, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    return inject(model, "speclora", "all-linear", r=8, k=8, quantize="nf4").train()


def _worker(rank: int, port: int, args, out: str):
    import torch.distributed as dist

    from ..integrations import adapter_layers, fully_shard_model
    from ..integrations.fsdp import nf4_bytes

    torch.set_num_threads(1)
    # the first block's input needs no gradient: its backward pre-hooks fire on outputs
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=300))
    try:
        model = _model(args)
        report = {"whole": nf4_bytes(model)}
        if args.plain:
            from torch.distributed.fsdp import fully_shard

            for block in model.model.layers:
                fully_shard(block)
            fully_shard(model)
        else:
            fully_shard_model(model)
        report["rest"] = nf4_bytes(model)
        peak = {"forward": 0, "backward": 0}

        def record(phase):
            def hook(*_):
                b = nf4_bytes(model)
                peak[phase] = max(peak[phase], sum(b.values()))
            return hook

        for layer in adapter_layers(model).values():
            layer.register_forward_pre_hook(record("forward"))
            layer.register_full_backward_pre_hook(record("backward"))
        ids = torch.randint(0, VOCAB, (2, args.tokens),
                            generator=torch.Generator().manual_seed(rank))
        model(input_ids=ids, labels=ids).loss.backward()
        report["peak"], report["after"] = peak, nf4_bytes(model)
        torch.save(report, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def measure(args) -> list[dict]:
    """Run the workers; one report per rank."""
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("TRITON_INTERPRET", "0")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(port, args, out), nprocs=args.world,
                           start_method="spawn")
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(args.world)]


def table(reports: list[dict], args) -> str:
    whole = reports[0]["whole"]
    total = sum(whole.values())

    def mib(n):
        return f"{n / 2**20:.2f} MiB"

    rows = [f"Llama {args.layers} blocks, hidden {args.hidden}, intermediate "
            f"{args.intermediate}, NF4 (blocksize 64, double quant) on every linear layer, "
            f"{args.world} ranks, sharded by "
            f"{'fully_shard per block and root' if args.plain else 'fully_shard_model'}; NF4 "
            f"storage per rank (codes + block scales; double-quant constants; gathered whole "
            f"weights):",
            "", "| | rank | codes + scales | double-quant | gathered | total | / unsharded |",
            "|---|---|---|---|---|---|---|",
            f"| unsharded (one process) | - | {mib(whole['codes_and_scales'])} | "
            f"{mib(whole['double_quant'])} | 0 | {mib(total)} | 1.000 |"]
    for rank, r in enumerate(reports):
        rest = r["rest"]
        for name, value in (("at rest", sum(rest.values())),
                            ("peak in forward", r["peak"]["forward"]),
                            ("peak in backward", r["peak"]["backward"])):
            gathered = value - rest["codes_and_scales"] - rest["double_quant"]
            rows.append(f"| {name} | {rank} | {mib(rest['codes_and_scales'])} | "
                        f"{mib(rest['double_quant'])} | {mib(gathered)} | {mib(value)} | "
                        f"{value / total:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--plain", action="store_true",
                        help="shard with torch's fully_shard per block and root instead")
    args = parser.parse_args(argv)
    print(table(measure(args), args))


if __name__ == "__main__":
    main()
