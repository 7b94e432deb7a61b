"""Launchers: shape checks done, outputs allocated, kernels launched per ``plan``.

``adapter_forward`` / ``adapter_backward`` take 2-D ``x`` (M, K) and a base weight that is
a dense (N, K) tensor or an ``NF4Weight`` (bitsandbytes' packed codes and block scales,
decoded tile by tile inside the kernels). Arguments were validated by the public op.
Launches: forward 1 (fused, segmented) / 2 (split); backward with every gradient 2 / 3.
Saved for backward by the caller: x and the small fp32 t, never a copy of W.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from ..quant import NF4Weight
from . import recipe
from .plan import (
    FACTOR_MAX_TILE,
    FACTOR_SPLIT_ROWS,
    FUSED_MAX_RANK,
    NF4_REGISTER_ROWS,
    NF4_REGISTER_ROWS_FP32,
    SPLITK_BLOCK_M,
    Plan,
    cdiv,
    factor_outputs,
    factor_splits,
    forward_plan,
    fused_rank_limit,
    gemm_plan,
    rank_block,
    sm_count,
    split_slice,
)
from .recipe import Call
from .tuning import DEQUANT, DX, FACTOR, FWD, PROJ, SPLITK, restricted_configs


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 ``tl.dot`` follows torch's matmul setting: TF32 tensor cores only where torch
    would use them (``torch.backends.cuda.matmul.fp32_precision == "tf32"``, which also
    reflects the legacy ``allow_tf32``), else fp32 accuracy (torch's default) as three TF32
    products per multiply (``"tf32x3"``: the low-order parts of both operands recovered,
    ~1e-6 relative). Not IEEE FMA dots: those hold both operand tiles in registers and
    spill at every tile that keeps the GPU busy (tools/compile_report, sm_80 and sm_90).
    16-bit operands ignore it."""
    if dtype != torch.float32:
        return "tf32"
    matmul = torch.backends.cuda.matmul
    tf32 = getattr(matmul, "fp32_precision", None)
    if tf32 is None:  # torch < 2.9: only the legacy flag
        return "tf32" if matmul.allow_tf32 else "tf32x3"
    return "tf32" if tf32 == "tf32" else "tf32x3"


def needs_int64(*operands) -> bool:
    """True if an index times a stride, in some kernel, can pass int32 for one of these
    operands (tensors, or shapes of contiguous outputs not allocated yet): its farthest
    element, plus the widest tile's padding (masked lanes still form their address), lies
    2^31 elements or more from its start."""
    for op in operands:
        if op is None or isinstance(op, NF4Weight):  # NF4 decoders index in int64
            continue
        if isinstance(op, torch.Tensor):
            shape, strides = op.shape, [abs(st) for st in op.stride()]
        else:
            shape, strides = op, [math.prod(op[i + 1:]) for i in range(len(op))]
        if math.prod(shape):
            far = sum((n - 1) * st for n, st in zip(shape, strides))
            if far + 256 * max(strides) >= 2**31:
                return True
    return False


def weight_args(weight) -> dict:
    """Kernel arguments for the base weight: a dense (N, K) tensor or an ``NF4Weight``."""
    if isinstance(weight, NF4Weight):
        dq = weight.double_quant
        scales = (weight.absmax2, weight.code2, weight.offset) if dq else (weight.absmax,) * 3
        return dict(w_ptr=weight.packed, absmax_ptr=weight.absmax, absmax2_ptr=scales[0],
                    code2_ptr=scales[1], offset_ptr=scales[2], levels_ptr=weight.level_pairs,
                    stride_wn=0, stride_wk=0,
                    NF4=True, NF4_ROWS=weight.shape[1] % weight.blocksize == 0,
                    NF4_BLOCKSIZE=weight.blocksize, NF4_DOUBLE_QUANT=dq,
                    NF4_NESTED=weight.nested_blocksize)
    return dict(w_ptr=weight, absmax_ptr=weight, absmax2_ptr=weight, code2_ptr=weight,
                offset_ptr=weight, levels_ptr=weight, stride_wn=weight.stride(0),
                stride_wk=weight.stride(1),
                NF4=False, NF4_ROWS=False, NF4_BLOCKSIZE=64, NF4_DOUBLE_QUANT=False,
                NF4_NESTED=256)


def fused_rank_cap(weight) -> int:
    """Widest rank a fused launch takes on this base: the NF4 span decoder's tiles (see
    ``tuning._nf4_fits``) are at most 64 wide at small M, so its fused rank limit is that
    tile's."""
    if isinstance(weight, NF4Weight) and weight.shape[1] % weight.blocksize:
        return fused_rank_limit(64)
    return FUSED_MAX_RANK


def dequantize_nf4_triton(weight: NF4Weight, dtype: Optional[torch.dtype] = None, out=None,
                          block_n: Optional[int] = None,
                          block_k: Optional[int] = None) -> torch.Tensor:
    """The dense (out, in) weight of an NF4 base decoded by the kernels' tile decoders, in
    ``dtype`` (default the weight's): bit-identical to ``quant.dequantize_nf4``. ``out``: a
    contiguous tensor to write into; ``block_n``/``block_k``: force that tile (tests)."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    dtype = weight.dtype if dtype is None else dtype
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    elif (out.shape != weight.shape or out.dtype != dtype or not out.is_contiguous()
          or out.device != weight.device):
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape "
                         f"{tuple(weight.shape)} on {weight.device}")
    args = {**weight_args(weight), "out_ptr": out, "N": weight.shape[0], "K": weight.shape[1],
            "stride_on": out.stride(0)}
    for name in ("stride_wn", "stride_wk"):
        args.pop(name)
    if block_n is None and block_k is None:
        DEQUANT(**args)
        return out
    config = triton.Config({"BLOCK_N": block_n or 32, "BLOCK_K": block_k or 64}, num_warps=4,
                           num_stages=1)
    with restricted_configs({DEQUANT: [config]}):
        DEQUANT(**args)
    return out


def _decoded_once(weight, M: int, dtype: torch.dtype):
    """The base the GEMM kernels take: an NF4 weight as it is while one row tile covers M
    (the kernels decode each tile once), else decoded once, here, into a transient dense
    copy in x's dtype (freed when the caller returns; never saved for backward)."""
    rows = NF4_REGISTER_ROWS_FP32 if dtype == torch.float32 else NF4_REGISTER_ROWS
    if isinstance(weight, NF4Weight) and M > rows:
        return dequantize_nf4_triton(weight, dtype)
    return weight


def adapter_forward(x, weight, bias, down, scale, up, seed: Optional[torch.Tensor],
                    dropout_p: float, dropout_rows: int, save_t: bool,
                    scale_index: Optional[torch.Tensor] = None):
    """Triton forward on 2-D ``x`` (M, K), ``weight`` a dense (N, K) tensor or an ``NF4Weight``.
    Dropout is active iff ``dropout_p > 0`` and ``dropout_rows > 0``; ``seed`` is then the
    0-d int64 tensor the kernels read the Philox seed from (on x's device, so a CUDA graph
    replays a fresh draw). Returns ``(y, t)``: y (M, N) in x's dtype; t = x' @ D.T (M, R)
    fp32 if ``save_t`` else an empty (0, R) tensor. ``scale_index`` (M,): a mixed-adapter
    batch, ``scale`` a contiguous (tables, R) table and row i scaled by its row
    ``scale_index[i]`` (the same launches, their epilogue compiled with ROW_SCALE). The
    launches of a call shape are built once (``recipe``)."""
    weight = _decoded_once(weight, x.shape[0], x.dtype)
    has_dropout = dropout_p > 0 and dropout_rows > 0
    # without dropout the kernels' seed load reads x and is never used
    call = Call(x.device, x=x, down=down, scale=scale, up=up, seed=seed if has_dropout else x,
                bias=bias, dropout_p=float(dropout_p) if has_dropout else 0.0,
                dropout_rows=int(dropout_rows) if has_dropout else 0,
                idx=scale if scale_index is None else scale_index, **_base_values(weight))
    recipe_key = recipe.key(x.shape[0], "fwd", x.shape, x.stride(), x.dtype, x.device, _base_key(weight),
                            None if bias is None else bias.dtype, down.shape, down.stride(),
                            down.dtype, up.stride(), up.dtype, scale.dtype, scale.stride(),
                            None if scale_index is None else scale_index.dtype, has_dropout,
                            save_t, dot_precision(x.dtype))
    y, t = recipe.cached(recipe_key, lambda c: _build_forward(c, weight, has_dropout, save_t,
                                                              scale_index is not None), call)
    return y, (t if save_t else x.new_empty((0, down.shape[0]), dtype=torch.float32))


def _base_values(weight) -> dict:
    """The base's tensors by name, for a ``Call`` (the launch arguments that take them are
    found by identity when the recipe is built)."""
    if isinstance(weight, NF4Weight):
        return dict(packed=weight.packed, absmax=weight.absmax, absmax2=weight.absmax2,
                    code2=weight.code2, offset=weight.offset, levels=weight.level_pairs)
    return {"weight": weight}


def _base_key(weight) -> tuple:
    if isinstance(weight, NF4Weight):
        return ("nf4", weight.shape, weight.blocksize, weight.double_quant,
                weight.nested_blocksize)
    return ("dense", weight.shape, weight.stride(), weight.dtype)


def _row_scale(v: dict, mixed: bool) -> dict:
    """The kernels' mixed-batch arguments: the row index and the scale table's row stride
    (``validate`` keeps the table's offsets in int32)."""
    return dict(idx_ptr=v["idx"], stride_sa=v["scale"].stride(0) if mixed else 0,
                ROW_SCALE=mixed)


def _build_forward(call: Call, weight, has_dropout: bool, save_t: bool, mixed: bool):
    v = call.values
    x, down, scale, up, bias = v["x"], v["down"], v["scale"], v["up"], v["bias"]
    M, K = x.shape
    N, R = weight.shape[0], down.shape[0]
    nf4 = isinstance(weight, NF4Weight)
    plan = forward_plan(M, N, K, R, rank_cap=fused_rank_cap(weight), dropout=has_dropout,
                        sms=sm_count(x.device), nf4=nf4, element_size=x.element_size(),
                        weight_bytes=weight.nbytes if nf4 else N * K * weight.element_size(),
                        # fp32 NF4 mixed batches: the split-K tile spills 8 bytes on sm_90
                        splitk=(not nf4 or K % weight.blocksize == 0)
                        and not (mixed and nf4 and x.element_size() == 4))
    if plan.path == "splitk":
        return _build_splitk(call, weight, has_dropout, save_t, plan, mixed)
    down_in_kernel, segments = plan.rank_in_kernel, plan.segments
    y = call.output("y", (M, N), x.dtype)
    t = call.output("t", (M, R), torch.float32) if (save_t or not down_in_kernel) else y
    drop = dict(seed_ptr=v["seed"], dropout_p=v["dropout_p"], dropout_rows=v["dropout_rows"],
                DOT_PRECISION=dot_precision(x.dtype),
                IDX64=needs_int64(x, weight, down, up, y, t))
    launches = []
    if not down_in_kernel:
        launches.append((PROJ, dict(
            a_ptr=x, b_ptr=down, out_ptr=t, M=M, K=K, R=R,
            stride_am=x.stride(0), stride_ak=x.stride(1),
            stride_br=down.stride(0), stride_bk=down.stride(1),
            stride_om=t.stride(0), stride_or=t.stride(1), s_ptr=scale,
            HAS_DROPOUT=has_dropout, BLOCK_R=rank_block(R, 128), **_row_scale(v, mixed),
            **drop)))
    launches.append((FWD, dict(
        x_ptr=x, **weight_args(weight), bias_ptr=bias if bias is not None else y,
        d_ptr=down, s_ptr=scale, u_ptr=up, t_ptr=t, y_ptr=y, M=M, N=N, K=K, R=R,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_dr=down.stride(0), stride_dk=down.stride(1),
        stride_un=up.stride(0), stride_ur=up.stride(1),
        stride_tm=t.stride(0), stride_tr=t.stride(-1),
        stride_ym=y.stride(0), stride_yn=y.stride(1), n_segments=max(segments, 1),
        HAS_BIAS=bias is not None, FUSE_DOWN=down_in_kernel, SEGMENTED=segments > 0,
        STORE_T=down_in_kernel and save_t,
        HAS_DROPOUT=down_in_kernel and has_dropout,  # split: t arrives with dropout applied
        BLOCK_R=rank_block(R, FUSED_MAX_RANK if down_in_kernel else 32), **_row_scale(v, mixed),
        **drop)))
    return launches, ("y", "t" if save_t else "y")


def _build_splitk(call: Call, weight, has_dropout: bool, save_t: bool, plan, mixed: bool):
    """The decode forward as one split-K launch (``kernels.forward.fwd_splitk_kernel``)."""
    v = call.values
    x, down, scale, up, bias = v["x"], v["down"], v["scale"], v["up"], v["bias"]
    M, K = x.shape
    N, R = weight.shape[0], down.shape[0]
    block_r = rank_block(R, FUSED_MAX_RANK)
    tiles = cdiv(M, SPLITK_BLOCK_M) * cdiv(N, plan.block_n)
    k_split = split_slice(K, plan.splits)
    splits = cdiv(K, k_split)
    y = call.output("y", (M, N), x.dtype)
    t = call.output("t", (M, R), torch.float32) if save_t else y
    # the fp32 partials of every (tile, split): y then t, rows below M only
    part_rows = min(M, SPLITK_BLOCK_M)
    part = call.workspace("part", tiles * splits * part_rows * (plan.block_n + block_r))
    return [(SPLITK, dict(
        x_ptr=x, **weight_args(weight), bias_ptr=bias if bias is not None else y,
        d_ptr=down, s_ptr=scale, u_ptr=up, t_ptr=t, y_ptr=y, part_ptr=part,
        count_ptr=call.counters("counters", tiles), M=M, N=N, K=K, R=R,
        k_split=k_split, n_splits=splits, part_rows=part_rows,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_dr=down.stride(0), stride_dk=down.stride(1),
        stride_un=up.stride(0), stride_ur=up.stride(1),
        stride_tm=t.stride(0), stride_tr=t.stride(-1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        seed_ptr=v["seed"], dropout_p=v["dropout_p"], dropout_rows=v["dropout_rows"],
        HAS_BIAS=bias is not None, STORE_T=save_t, HAS_DROPOUT=has_dropout, BLOCK_R=block_r,
        DOT_PRECISION=dot_precision(x.dtype), IDX64=needs_int64(x, weight, down, up, y, t),
        BLOCK_M=SPLITK_BLOCK_M, BLOCK_N=plan.block_n, **_row_scale(v, mixed)))], \
        ("y", "t" if save_t else "y")


def adapter_backward(dy, x, weight, down, scale, up, t, seed: Optional[torch.Tensor],
                     dropout_p: float, dropout_rows: int, grad_rows: int, need_dx: bool,
                     need_ddown: bool, need_dscale: bool, need_dup: bool):
    """Triton backward on 2-D ``dy`` (M, N), ``x`` (M, K), ``weight`` dense or ``NF4Weight``;
    ``t`` from the forward (needed for dU and ds). Returns ``(dx, d_down, d_scale, d_up)``;
    a gradient not asked for is an empty tensor, and nothing is computed for it."""
    if need_dx:
        weight = _decoded_once(weight, x.shape[0], x.dtype)
    has_dropout = dropout_p > 0 and dropout_rows > 0
    needs = (need_dx, need_ddown, need_dscale, need_dup)
    call = Call(x.device, dy=dy, x=x, down=down, scale=scale, up=up, t=t,
                seed=seed if has_dropout else x, dropout_p=float(dropout_p) if has_dropout else 0.0,
                dropout_rows=int(dropout_rows) if has_dropout else 0, grad_rows=int(grad_rows),
                **_base_values(weight))
    recipe_key = recipe.key(x.shape[0], "bwd", dy.stride(), x.shape, x.stride(), x.dtype, x.device,
                            _base_key(weight), down.shape, down.stride(), down.dtype,
                            up.stride(), up.dtype, scale.dtype, t.shape, t.stride(),
                            has_dropout, needs, dot_precision(x.dtype))
    grads = recipe.cached(recipe_key, lambda c: _build_backward(c, weight, has_dropout, needs),
                          call)
    empty = {name: x.new_empty(0) for name, needed in zip(("dx", "d_down", "d_scale", "d_up"),
                                                          needs) if not needed}
    return tuple(empty.get(name, grad) for name, grad in zip(("dx", "d_down", "d_scale", "d_up"),
                                                              grads))


def _build_backward(call: Call, weight, has_dropout: bool, needs: tuple):
    need_dx, need_ddown, need_dscale, need_dup = needs
    v = call.values
    dy, x, down, scale, up, t = v["dy"], v["x"], v["down"], v["scale"], v["up"], v["t"]
    M, K = x.shape
    N, R = weight.shape[0], down.shape[0]
    need_g = need_ddown or need_dscale
    drop = dict(seed_ptr=v["seed"], dropout_p=v["dropout_p"], dropout_rows=v["dropout_rows"],
                DOT_PRECISION=dot_precision(x.dtype),
                IDX64=needs_int64(dy, x, weight, down, up, t,  # and dx, g, dD, dU:
                                  (M, K), (M, R), tuple(down.shape), tuple(up.shape)))
    # dx's output width is K (dx draws each mask element once: no dropout rule)
    plan = (gemm_plan(M, K, N, R, rank_cap=fused_rank_cap(weight), sms=sm_count(x.device),
                      element_size=x.element_size())
            if need_dx else Plan("split"))
    up_in_kernel, segments = need_dx and plan.rank_in_kernel, plan.segments
    need_g_buffer = need_g or (need_dx and not up_in_kernel)
    g = call.output("g", (M, R), torch.float32) if need_g_buffer else None
    launches = []
    if g is not None and not up_in_kernel:  # g = dy @ U, once
        launches.append((PROJ, dict(
            a_ptr=dy, b_ptr=up, out_ptr=g, M=M, K=N, R=R,
            stride_am=dy.stride(0), stride_ak=dy.stride(1),
            stride_br=up.stride(1), stride_bk=up.stride(0),
            stride_om=g.stride(0), stride_or=g.stride(1), s_ptr=scale, idx_ptr=scale,
            stride_sa=0, ROW_SCALE=False, BLOCK_R=rank_block(R, 128), HAS_DROPOUT=False,
            **drop)))
    dx = call.output("dx", (M, K), x.dtype) if need_dx else x
    if need_dx:
        launches.append((DX, dict(
            dy_ptr=dy, **weight_args(weight), d_ptr=down, s_ptr=scale, u_ptr=up,
            g_ptr=g if g is not None else dx, dx_ptr=dx, M=M, N=N, K=K, R=R,
            stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
            stride_dr=down.stride(0), stride_dk=down.stride(1),
            stride_un=up.stride(0), stride_ur=up.stride(1),
            stride_gm=g.stride(0) if g is not None else 0, stride_gr=1,
            stride_dxm=dx.stride(0), stride_dxk=dx.stride(1), n_segments=max(segments, 1),
            FUSE_UP=up_in_kernel, SEGMENTED=segments > 0, STORE_G=up_in_kernel and need_g,
            HAS_DROPOUT=has_dropout,
            BLOCK_R=rank_block(R, FUSED_MAX_RANK if up_in_kernel else 32), **drop)))
    d_down = call.output("d_down", down.shape, down.dtype) if need_ddown else x
    d_scale = call.output("d_scale", scale.shape, scale.dtype) if need_dscale else scale
    d_up = call.output("d_up", up.shape, up.dtype) if need_dup else x
    if need_ddown or need_dscale or need_dup:
        block_r = rank_block(R, 32)
        outputs = factor_outputs(N if need_dup else 0, K if need_ddown else 0, R, block_r,
                                 need_dscale)
        splits = factor_splits(M, outputs, sm_count(x.device))
        m_split = cdiv(cdiv(M, splits), FACTOR_SPLIT_ROWS) * FACTOR_SPLIT_ROWS
        splits = cdiv(M, m_split)
        # per output tile (at most ``outputs`` of them) one fp32 part per slice of rows
        part = (call.workspace("part", outputs * splits * FACTOR_MAX_TILE * block_r)
                if splits > 1 else x)
        counters = call.counters("counters", outputs) if splits > 1 else x
        saved_t = t if t.numel() else x
        launches.append((FACTOR, dict(
            dy_ptr=dy, x_ptr=x, t_ptr=saved_t, g_ptr=g if g is not None else x, s_ptr=scale,
            du_ptr=d_up, dd_ptr=d_down, ds_ptr=d_scale, part_ptr=part, count_ptr=counters,
            M=M, N=N, K=K, R=R, grad_rows=v["grad_rows"], m_split=m_split, n_msplits=splits,
            stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
            stride_xm=x.stride(0), stride_xk=x.stride(1),
            stride_tm=t.stride(0) if t.numel() else 0, stride_tr=1,
            stride_gm=g.stride(0) if g is not None else 0, stride_gr=1,
            stride_dun=d_up.stride(0) if need_dup else 0, stride_dur=1,
            stride_ddr=d_down.stride(0) if need_ddown else 0, stride_ddk=1,
            NEED_DU=need_dup, NEED_DD=need_ddown, NEED_DS=need_dscale, SPLIT_M=splits > 1,
            HAS_DROPOUT=has_dropout, BLOCK_R=block_r, **drop)))
    names = tuple(name if needed else "x" for name, needed in
                  zip(("dx", "d_down", "d_scale", "d_up"), needs))
    return launches, names
