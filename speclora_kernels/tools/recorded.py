"""The op's recorded launches as ``gpu_model`` sees them: the config an H100 runs for each,
its weight bytes, the shape description of a split-K decode (``ops.plan.decode_launch``),
the factor-gradient partials, and launches planned on "meta" tensors. Apart from
``gpu_model`` so that the model imports nothing of the op (the plan imports the model)."""
from __future__ import annotations

import math
from typing import Optional

from ..hardware import GPU, H100
from .gpu_model import Launch


def h100_config(kernel, args: dict, gpu: GPU = H100):
    """The config an H100 runs for a recorded launch under ``SPECLORA_TUNING=heuristic``:
    ``TunedKernel.heuristic`` over the candidates that fit its shared memory per block, on
    its SMs (the interpreter runs the fewest programs instead: not what a GPU runs)."""
    candidates = kernel.candidates(args, gpu.smem_per_block)
    return candidates[0] if len(candidates) == 1 else kernel.heuristic(args, candidates, gpu.sms)


def h100_configs(launches: list) -> dict:
    """{TunedKernel: [config]} an H100 runs for recorded launches (``h100_config``): what
    the interpreter is restricted to (``tuning.restricted_configs``) to count them."""
    configs: dict = {}
    for kernel, args in launches:
        cfg = h100_config(kernel, args)
        if cfg not in configs.setdefault(kernel, []):
            configs[kernel].append(cfg)
    return configs


def weight_bytes(args: dict) -> int:
    """Bytes of the base weight a recorded launch reads: the dense W, or the NF4 codes and
    scales (``NF4Weight.nbytes``)."""
    names = ("w_ptr", "absmax_ptr", "absmax2_ptr", "code2_ptr", "offset_ptr")
    tensors = {id(args[n]): args[n] for n in names}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def recorded_launch(kernel, args: dict) -> Optional[Launch]:
    """A recorded split-K decode forward (``tuning.record_launches``) as
    ``ops.plan.decode_launch`` describes it, with the config an H100 runs; None for the
    kernels that function does not describe."""
    if kernel.name != "fwd_splitk_kernel":
        return None
    from ..ops import plan

    cfg = h100_config(kernel, args)
    return plan.decode_launch(args["M"], args["N"], args["K"], args["R"], weight_bytes(args),
                              args["x_ptr"].element_size(), args["NF4"], args["BLOCK_N"],
                              args["n_splits"], bias=args["HAS_BIAS"],
                              block_k=cfg.kwargs["BLOCK_K"], stages=cfg.num_stages)


def split_scratch(kernel, args: dict) -> tuple[int, int]:
    """(fp32 partial bytes written, reduction loop length) of a factor-gradient launch that
    splits M (``kernels.common.split_total``); (0, 0) for any other launch."""
    if kernel.name != "factor_grad_kernel" or not args["SPLIT_M"]:
        return 0, 0
    cfg = h100_config(kernel, args)
    rank_tiles = math.ceil(args["R"] / args["BLOCK_R"])
    ds = rank_tiles * args["n_msplits"] if args["NEED_DS"] else 0
    tiles = kernel.programs(args, cfg) - ds
    return 4 * args["BLOCK_R"] * (tiles * cfg.kwargs["BLOCK_C"] + ds), args["n_msplits"]


def meta_nf4(N: int, K: int, dtype, double_quant: bool = True, blocksize: int = 64):
    """An NF4 weight of bitsandbytes' layout on the "meta" device (no memory, no device)."""
    import torch

    from ..quant import NF4Weight

    blocks = -(-N * K // blocksize)
    u8, f32 = dict(device="meta", dtype=torch.uint8), dict(device="meta", dtype=torch.float32)
    packed = torch.empty(-(-N * K // 2), **u8)
    if not double_quant:
        return NF4Weight(packed, torch.empty(blocks, **f32), (N, K), dtype, blocksize)
    return NF4Weight(packed, torch.empty(blocks, **u8), (N, K), dtype, blocksize,
                     absmax2=torch.empty(-(-blocks // 256), **f32),
                     code2=torch.empty(256, **f32), offset=torch.empty((), **f32))


def meta_inputs(M: int, N: int, K: int, R: int, nf4: bool, bias: bool = False,
                dtype=None) -> tuple:
    """(x, W, bias, D, s, U) of the op on "meta" tensors (no memory, no device): W dense or
    a bitsandbytes-layout NF4Weight (blocks of 64, double quant)."""
    import torch

    meta = dict(device="meta", dtype=dtype or torch.bfloat16)
    weight = meta_nf4(N, K, meta["dtype"]) if nf4 else torch.empty(N, K, **meta)
    return (torch.empty(M, K, **meta), weight, torch.empty(N, **meta) if bias else None,
            torch.empty(R, K, **meta), torch.empty(R, device="meta"), torch.empty(N, R, **meta))


def meta_launches(M: int, N: int, K: int, R: int, nf4: bool, backward: bool = False,
                  bias: bool = False, dtype=None, grads=(True, True, True, True)) -> list:
    """The (TunedKernel, args) launches of one inference forward, or of one backward needing
    ``grads`` (dx, dD, ds, dU), planned on meta tensors: nothing runs."""
    import torch

    from ..ops import launch, tuning

    x, w, b, d, s, u = meta_inputs(M, N, K, R, nf4, bias, dtype)
    with tuning.record_launches(dry_run=True) as launches:
        if backward:
            launch.adapter_backward(torch.empty(M, N, device="meta", dtype=x.dtype), x, w, d,
                                    s, u, torch.empty(M, R, device="meta"), None, 0.0, 0, R,
                                    *grads)
        else:
            launch.adapter_forward(x, w, b, d, s, u, None, 0.0, 0, False)
    return launches
