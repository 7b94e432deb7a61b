"""Triton kernels and launchers for ``y = x @ W.T + bias + ((x' @ D.T) * s) @ U.T``.

Shapes: x (M, K), W (N, K), D (R, K), s (R,), U (N, R), y (M, N); ``x'`` is ``x`` with
LoRA dropout on the first ``drop_rows`` rows of D (keep-mask from ``dropout.py``,
regenerated wherever needed, never stored). All products accumulate in fp32.

Forward, three paths (``use_fused_path`` and ``segment_count`` pick one per shape):

- fused (1 launch, small M): ``_fwd_kernel[FUSE_DOWN]``. Each program owns a (BLOCK_M,
  BLOCK_N) tile of y; its K-loop feeds the same x tile to ``x @ W.T`` and to
  ``t = x' @ D.T`` (BLOCK_M x R, in registers); the epilogue adds ``(t * s) @ U.T`` and
  bias and stores y once. Every N-tile recomputes t: R/BLOCK_N extra FLOPs and D re-reads.
- segmented (1 launch, large M): ``_fwd_kernel[FUSE_DOWN, SEGMENTED]``. Each program owns a
  row block and a segment of consecutive column tiles; t is computed in the first tile's
  K-loop as above and kept in registers for the others: x is read by one kernel, t costs
  ``segments * BLOCK_R / N`` extra FLOPs (a few %).
- split (2 launches, whenever neither fits: R > 64, or too few programs to fill the GPU
  with segments): ``_proj_kernel`` computes t once, then ``_fwd_kernel`` is a plain GEMM
  whose epilogue loads t and adds ``(t * s) @ U.T``. FLOPs stay at the floor; x is read
  twice.

Backward, with g = dy @ U (M x R), gs = g * s:

- ``dx = dy @ W + [keep/(1-p)] * (gs[:, :rd] @ D[:rd]) + gs[:, rd:] @ D[rd:]``: one
  ``_dx_kernel`` pass; it computes g in its N-loop (fused: every tile; segmented: once per
  segment of dx column tiles) or loads it from ``_proj_kernel`` (split), same rules as the
  forward with dx's width K.
- ``dU[:, :rg] = dy.T @ (t * s)[:, :rg]``, ``dD[:rg] = gs[:, :rg].T @ x'``,
  ``ds = sum_m g * t``: one ``_factor_grad_kernel`` launch whose programs split into
  the three reductions, only for the factors that need a gradient; frozen rows
  (``>= rg``) are written as zeros without a K-loop.

Launches: forward 1 (fused, segmented) / 2 (split); backward with every gradient
2 (fused, segmented) / 3 (split).
Saved for backward: x and the small fp32 t; never a copy of W.

NF4 base (``NF4Base``: bitsandbytes' packed codes and block scales): the forward and dx
kernels take it in place of W (constexpr ``NF4``); ``_load_weight_tile`` decodes each tile
in registers (``quant.triton_nf4``), so the dense weight never exists in memory. With
``K % blocksize == 0`` (``NF4_ROWS``, every real layer) the row decoder reads contiguous
bytes and one scale per row and block; otherwise the span decoder (rows starting mid-byte
or mid-block).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..quant.triton_nf4 import nf4_dequant_rows, nf4_dequant_span

# True when kernels run in the Triton interpreter (TRITON_INTERPRET=1 at import).
INTERPRET = bool(triton.knobs.runtime.interpret)


# --------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _load_weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, offs_k, k0,
                      N, K, stride_wn, stride_wk, TRANSPOSED: tl.constexpr, NF4: tl.constexpr,
                      NF4_ROWS: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr,
                      NF4_DOUBLE_QUANT: tl.constexpr, NF4_NESTED: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Base-weight tile W[offs_n][:, offs_k] (1-D indices; ``offs_k`` starts at ``k0``) as
    (BLOCK_N, BLOCK_K), or its transpose (BLOCK_K, BLOCK_N) for ``x @ W.T``; zeros outside
    (N, K). The only place a kernel touches the base weight.

    Dense: a strided load. NF4 (``w_ptr`` the packed codes, the scale pointers as in
    ``quant.triton_nf4``): decoded in registers to ``OUT_DTYPE`` (the activations' dtype),
    bit-identical to bitsandbytes' dequantize rounded to that dtype.
    """
    if NF4:
        if NF4_ROWS:
            w = nf4_dequant_rows(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                                 k0, N, K, BLOCK_N, BLOCK_K, NF4_BLOCKSIZE, NF4_DOUBLE_QUANT,
                                 NF4_NESTED, OUT_DTYPE)
        else:
            w = nf4_dequant_span(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                                 k0, N, K, BLOCK_N, BLOCK_K, NF4_BLOCKSIZE, NF4_DOUBLE_QUANT,
                                 NF4_NESTED, OUT_DTYPE)
        if TRANSPOSED:
            w = tl.trans(w)
    else:
        if TRANSPOSED:
            n, k = offs_n[None, :], offs_k[:, None]
        else:
            n, k = offs_n[:, None], offs_k[None, :]
        w = tl.load(w_ptr + n * stride_wn + k * stride_wk, mask=(n < N) & (k < K), other=0.0)
    return w


@triton.jit
def _grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile) of a (tiles_m, tiles_n) grid, GROUP_M row
    tiles at a time, so that the programs resident together reuse the same column tiles
    of the weight from L2."""
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def _index(offs, IDX64: tl.constexpr):
    """An index vector, widened to int64 when the launcher found a tensor whose offsets
    pass int32 (``_needs_int64``): index times stride would wrap. Only then, since 64-bit
    address arithmetic costs registers that the common shapes' tiles need."""
    if IDX64:
        return offs.to(tl.int64)
    return offs


@triton.jit
def _keep(seed, offs_m, k0, K, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dropout keep-mask of x[offs_m, k0 : k0 + BLOCK_K] (k0 a multiple of 8).

    One Philox call per 8 columns of a row (counter m * ceil(K/8) + k // 8, int64): its four
    32-bit words give eight 16-bit uniforms, kept iff >= round(p * 65536). Bit-exact with
    ``dropout.dropout_keep_mask``.
    """
    groups = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    w0, w1, w2, w3 = tl.randint4x(seed, offs_m[:, None] * tl.cdiv(K, 8) + groups[None, :])
    # slot q = 2 * word + half; tl.join appends the fastest dim, so join the slowest first
    lo = tl.join(tl.join(w0 & 0xFFFF, w2 & 0xFFFF), tl.join(w1 & 0xFFFF, w3 & 0xFFFF))
    hi = tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16))
    bits = tl.join(lo, hi)
    threshold = tl.cast(dropout_p * 65536.0 + 0.5, tl.int32)
    return tl.reshape(bits, (BLOCK_M, BLOCK_K)).to(tl.int32) >= threshold


@triton.jit
def _down_step(acc, a, b, offs_m, k0, offs_r, r0, K, R, seed, dropout_p, drop_rows,
               HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K-step of ``acc += a' @ b``: a (BLOCK_M, BLOCK_K) from column k0, b (BLOCK_K,
    BLOCK_R) holding rank columns r0 + [0, BLOCK_R). Columns below ``drop_rows`` see the
    kept input ``a * keep``; 1 / (1 - p) is applied once by ``_dropout_rescale``. A dot is
    issued only for the column groups present in this chunk.

    Every dot here sits under a runtime branch on purpose: Triton gives all dots connected
    through a shared operand in one region (here ``a``, also the base product's operand)
    the chained-dot layout (all warps along M); at BLOCK_M = 16 that replicates the base
    accumulator in every warp and spills registers. The branch keeps the regions apart."""
    if HAS_DROPOUT:
        if r0 < drop_rows:
            kept = tl.where(_keep(seed, offs_m, k0, K, dropout_p, BLOCK_M, BLOCK_K), a, 0.0)
            acc = tl.dot(kept, tl.where(offs_r[None, :] < drop_rows, b, 0.0), acc,
                         input_precision=DOT_PRECISION)
        if drop_rows < tl.minimum(r0 + BLOCK_R, R):
            acc = tl.dot(a, tl.where(offs_r[None, :] >= drop_rows, b, 0.0), acc,
                         input_precision=DOT_PRECISION)
    elif r0 < R:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _dropout_rescale(acc, offs_r, dropout_p, drop_rows):
    """Scale the dropped-input rank columns by 1 / (1 - p)."""
    return tl.where(offs_r[None, :] < drop_rows, acc * (1.0 / (1.0 - dropout_p)), acc)


@triton.jit
def _pad_ranks(t, offs_r, R):
    """Zero the padded rank columns (r >= R) of a register-resident t or g: the dot that
    made them met zero padding, and an Inf input turns Inf * 0 into NaN, which the
    epilogue would carry into every output column."""
    return tl.where(offs_r[None, :] < R, t, 0.0)


@triton.jit
def _up_step(acc, t, offs_r, offs_n, s_ptr, u_ptr, R, N, stride_un, stride_ur,
             DOT_PRECISION: tl.constexpr):
    """Epilogue ``acc += t @ (s * U.T)`` for one rank chunk (t: BLOCK_M x BLOCK_R, fp32).

    s scales U, not t: with 16-bit inputs the dot's operands are rounded to x's dtype, and
    ``s * U`` is the effective up-projection, in range when s and U compensate (a huge s
    against a tiny U, or the reverse), where ``t * s`` need not be; t is what PEFT also
    rounds (x @ A.T). Padded rank columns of t must be zeros (see ``_pad_ranks``)."""
    s = tl.load(s_ptr + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
                mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
    su = (u.to(tl.float32) * s[:, None]).to(u.dtype)
    return tl.dot(t.to(u.dtype), su, acc, input_precision=DOT_PRECISION)


@triton.jit
def _down_back_step(acc, acc_drop, g, offs_r, offs_k, r0, s_ptr, d_ptr, R, K, stride_dr,
                    stride_dk, drop_rows, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Epilogue of dx for one rank chunk: ``(g * s) @ D``. Rows below ``drop_rows`` go to
    ``acc_drop`` (masked by keep / (1 - p) once, after all chunks), the rest to ``acc``.
    ``g * s`` (not ``s * D``): g = dy @ U carries U's magnitude, which s compensates.
    Padded rank columns of g must be zeros (see ``_pad_ranks``)."""
    s = tl.load(s_ptr + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    gs = g * s[None, :]
    d = tl.load(d_ptr + offs_r[:, None] * stride_dr + offs_k[None, :] * stride_dk,
                mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
    if HAS_DROPOUT:
        if r0 < drop_rows:
            acc_drop = tl.dot(tl.where(offs_r[None, :] < drop_rows, gs, 0.0).to(d.dtype), d,
                              acc_drop, input_precision=DOT_PRECISION)
        if drop_rows < tl.minimum(r0 + BLOCK_R, R):
            acc = tl.dot(tl.where(offs_r[None, :] >= drop_rows, gs, 0.0).to(d.dtype), d, acc,
                         input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(gs.to(d.dtype), d, acc, input_precision=DOT_PRECISION)
    return acc, acc_drop


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _fwd_mainloop(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, d_ptr, t,
                  offs_m, offs_n, offs_r, M, N, K, R, stride_xm, stride_xk, stride_wn,
                  stride_wk, stride_dr, stride_dk, seed, dropout_p, drop_rows,
                  DOWN: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, NF4: tl.constexpr, NF4_ROWS: tl.constexpr,
                  NF4_BLOCKSIZE: tl.constexpr, NF4_DOUBLE_QUANT: tl.constexpr,
                  NF4_NESTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, IDX64: tl.constexpr):
    """K-loop of one output tile: returns ``(x @ W[offs_n].T, t)``; with DOWN the same x
    tiles also accumulate ``t += x' @ D.T`` (BLOCK_R >= R), else t passes through."""
    row_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + _index(tl.arange(0, BLOCK_K), IDX64)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=row_ok & (offs_k[None, :] < K), other=0.0)
        w = _load_weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                              offs_k, k0, N, K, stride_wn, stride_wk, True, NF4, NF4_ROWS,
                              NF4_BLOCKSIZE, NF4_DOUBLE_QUANT, NF4_NESTED, BLOCK_N, BLOCK_K,
                              x_ptr.dtype.element_ty)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if DOWN:
            d = tl.load(d_ptr + offs_r[None, :] * stride_dr + offs_k[:, None] * stride_dk,
                        mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)
            t = _down_step(t, x, d, offs_m, k0, offs_r, 0, K, R, seed, dropout_p, drop_rows,
                           HAS_DROPOUT, BLOCK_R, DOT_PRECISION, BLOCK_M, BLOCK_K)
    return acc, t


@triton.jit
def _fwd_epilogue(acc, t, t_ptr, bias_ptr, s_ptr, u_ptr, y_ptr, offs_m, offs_n, offs_r,
                  M, N, R, stride_un, stride_ur, stride_tm, stride_tr, stride_ym, stride_yn,
                  HAS_BIAS: tl.constexpr, FUSE_DOWN: tl.constexpr, BLOCK_R: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """y tile = acc + t @ (s * U[offs_n]).T + bias, stored once. t: the register-resident
    projection (FUSE_DOWN), else read from ``t_ptr`` in rank chunks of BLOCK_R."""
    row_ok = offs_m[:, None] < M
    if FUSE_DOWN:
        acc = _up_step(acc, _pad_ranks(t, offs_r, R), offs_r, offs_n, s_ptr, u_ptr, R, N,
                       stride_un, stride_ur, DOT_PRECISION)
    else:
        for r0 in range(0, R, BLOCK_R):
            offs_rc = r0 + offs_r
            tc = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_rc[None, :] * stride_tr,
                         mask=row_ok & (offs_rc[None, :] < R), other=0.0)
            acc = _up_step(acc, tc, offs_rc, offs_n, s_ptr, u_ptr, R, N, stride_un, stride_ur,
                           DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok & (offs_n[None, :] < N))


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    bias_ptr, d_ptr, s_ptr, u_ptr, t_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_dr, stride_dk,
    stride_un, stride_ur, stride_tm, stride_tr, stride_ym, stride_yn,
    seed, dropout_p, drop_rows, n_segments,
    HAS_BIAS: tl.constexpr, FUSE_DOWN: tl.constexpr, SEGMENTED: tl.constexpr,
    STORE_T: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, IDX64: tl.constexpr,
    NF4: tl.constexpr, NF4_ROWS: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr,
    NF4_DOUBLE_QUANT: tl.constexpr, NF4_NESTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x @ W.T + bias + ((x' @ D.T) * s) @ U.T for one (BLOCK_M, BLOCK_N) tile, or
    (SEGMENTED) for a row block and a segment of consecutive column tiles.

    FUSE_DOWN: t = x' @ D.T accumulates in registers from the x tiles of the first tile's
    K-loop (BLOCK_R >= R); STORE_T keeps it for backward. SEGMENTED: the column tiles are
    split into at most ``n_segments`` segments of ceil(tiles / n_segments) tiles; a program
    computes t in its segment's first tile and reuses it for the rest, so t costs
    ``segments * BLOCK_R / N`` extra FLOPs instead of ``BLOCK_R / BLOCK_N``. Otherwise t
    (fp32, from _proj_kernel) is read in rank chunks of BLOCK_R in the epilogue.
    """
    tiles_n = tl.cdiv(N, BLOCK_N)
    if SEGMENTED:
        seg_tiles = tl.cdiv(tiles_n, n_segments)
    else:
        seg_tiles = 1
    pid_m, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M),
                                 tl.cdiv(tiles_n, seg_tiles), GROUP_M)
    first = pid_s * seg_tiles
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = first.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = _index(tl.arange(0, BLOCK_R), IDX64)

    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc, t = _fwd_mainloop(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, d_ptr,
                           t, offs_m, offs_n, offs_r, M, N, K, R, stride_xm, stride_xk,
                           stride_wn, stride_wk, stride_dr, stride_dk, seed, dropout_p,
                           drop_rows, FUSE_DOWN, HAS_DROPOUT, BLOCK_R, DOT_PRECISION, NF4,
                           NF4_ROWS, NF4_BLOCKSIZE, NF4_DOUBLE_QUANT, NF4_NESTED, BLOCK_M,
                           BLOCK_N, BLOCK_K, IDX64)
    if FUSE_DOWN:
        if HAS_DROPOUT:
            t = _dropout_rescale(t, offs_r, dropout_p, drop_rows)
        if STORE_T:
            if pid_s == 0:  # every column tile holds the same t; the first one saves it
                tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr, t,
                         mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
    _fwd_epilogue(acc, t, t_ptr, bias_ptr, s_ptr, u_ptr, y_ptr, offs_m, offs_n, offs_r, M, N,
                  R, stride_un, stride_ur, stride_tm, stride_tr, stride_ym, stride_yn,
                  HAS_BIAS, FUSE_DOWN, BLOCK_R, DOT_PRECISION)
    if SEGMENTED:  # the rest of the segment: plain GEMM tiles, t from registers
        for _ in range(first + 1, tl.minimum(first + seg_tiles, tiles_n)):
            offs_n += BLOCK_N
            acc, t = _fwd_mainloop(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                                   offset_ptr, d_ptr, t, offs_m, offs_n, offs_r, M, N, K, R,
                                   stride_xm, stride_xk, stride_wn, stride_wk, stride_dr,
                                   stride_dk, seed, dropout_p, drop_rows, False, False,
                                   BLOCK_R, DOT_PRECISION, NF4, NF4_ROWS, NF4_BLOCKSIZE,
                                   NF4_DOUBLE_QUANT, NF4_NESTED, BLOCK_M, BLOCK_N, BLOCK_K,
                                   IDX64)
            _fwd_epilogue(acc, t, t_ptr, bias_ptr, s_ptr, u_ptr, y_ptr, offs_m, offs_n, offs_r,
                          M, N, R, stride_un, stride_ur, stride_tm, stride_tr, stride_ym,
                          stride_yn, HAS_BIAS, FUSE_DOWN, BLOCK_R, DOT_PRECISION)


@triton.jit
def _proj_kernel(
    a_ptr, b_ptr, out_ptr,
    M, K, R,
    stride_am, stride_ak, stride_br, stride_bk, stride_om, stride_or,
    seed, dropout_p, drop_rows,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = a' @ b.T, (M, R) in fp32: t = x' @ D.T (forward) or g = dy @ U (backward,
    b = U.T). The rank tiles of one row block are adjacent program ids, so a re-read of
    the a rows (R > BLOCK_R) hits L2."""
    pid = tl.program_id(0)
    tiles_r = tl.cdiv(R, BLOCK_R)
    pid_m, pid_r = pid // tiles_r, pid % tiles_r
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r0 = pid_r * BLOCK_R
    offs_r = r0 + _index(tl.arange(0, BLOCK_R), IDX64)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + _index(tl.arange(0, BLOCK_K), IDX64)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_r[None, :] * stride_br + offs_k[:, None] * stride_bk,
                    mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)
        acc = _down_step(acc, a, b, offs_m, k0, offs_r, r0, K, R, seed, dropout_p, drop_rows,
                         HAS_DROPOUT, BLOCK_R, DOT_PRECISION, BLOCK_M, BLOCK_K)
    if HAS_DROPOUT:
        acc = _dropout_rescale(acc, offs_r, dropout_p, drop_rows)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or, acc,
             mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def _dx_mainloop(dy_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, u_ptr, g,
                 offs_m, offs_k, k0, offs_r, M, N, K, R, stride_dym, stride_dyn, stride_wn,
                 stride_wk, stride_un, stride_ur, UP: tl.constexpr, BLOCK_R: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, NF4: tl.constexpr, NF4_ROWS: tl.constexpr,
                 NF4_BLOCKSIZE: tl.constexpr, NF4_DOUBLE_QUANT: tl.constexpr,
                 NF4_NESTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr, IDX64: tl.constexpr):
    """N-loop of one dx tile (columns ``offs_k`` from ``k0``): returns ``(dy @ W[:, offs_k],
    g)``; with UP the same dy tiles also accumulate ``g += dy @ U`` (BLOCK_R >= R)."""
    row_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + _index(tl.arange(0, BLOCK_N), IDX64)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=row_ok & (offs_n[None, :] < N), other=0.0)
        w = _load_weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                              offs_k, k0, N, K, stride_wn, stride_wk, False, NF4, NF4_ROWS,
                              NF4_BLOCKSIZE, NF4_DOUBLE_QUANT, NF4_NESTED, BLOCK_N, BLOCK_K,
                              dy_ptr.dtype.element_ty)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        if UP:
            u = tl.load(u_ptr + offs_n[:, None] * stride_un + offs_r[None, :] * stride_ur,
                        mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
            g = _down_step(g, dy, u, offs_m, n0, offs_r, 0, N, R, 0, 0.0, 0, False,
                           BLOCK_R, DOT_PRECISION, BLOCK_M, BLOCK_N)
    return acc, g


@triton.jit
def _dx_epilogue(acc, g, g_ptr, s_ptr, d_ptr, dx_ptr, offs_m, offs_k, k0, offs_r, M, K, R,
                 stride_gm, stride_gr, stride_dr, stride_dk, stride_dxm, stride_dxk,
                 seed, dropout_p, drop_rows, FUSE_UP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """dx tile = acc + keep/(1-p) * (gs_drop @ D) + gs_clean @ D, stored once. g: the
    register-resident ``dy @ U`` (FUSE_UP), else read from ``g_ptr`` in rank chunks."""
    row_ok = offs_m[:, None] < M
    acc_drop = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if FUSE_UP:
        acc, acc_drop = _down_back_step(acc, acc_drop, _pad_ranks(g, offs_r, R), offs_r,
                                        offs_k, 0, s_ptr, d_ptr, R, K, stride_dr, stride_dk,
                                        drop_rows, HAS_DROPOUT, BLOCK_R, DOT_PRECISION)
    else:
        for r0 in range(0, R, BLOCK_R):
            offs_rc = r0 + offs_r
            gc = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_rc[None, :] * stride_gr,
                         mask=row_ok & (offs_rc[None, :] < R), other=0.0)
            acc, acc_drop = _down_back_step(acc, acc_drop, gc, offs_rc, offs_k, r0, s_ptr,
                                            d_ptr, R, K, stride_dr, stride_dk, drop_rows,
                                            HAS_DROPOUT, BLOCK_R, DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _keep(seed, offs_m, k0, K, dropout_p, BLOCK_M, BLOCK_K)
        acc += tl.where(keep, acc_drop * (1.0 / (1.0 - dropout_p)), 0.0)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok & (offs_k[None, :] < K))


@triton.jit
def _dx_kernel(
    dy_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    d_ptr, s_ptr, u_ptr, g_ptr, dx_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dr, stride_dk,
    stride_un, stride_ur, stride_gm, stride_gr, stride_dxm, stride_dxk,
    seed, dropout_p, drop_rows, n_segments,
    FUSE_UP: tl.constexpr, SEGMENTED: tl.constexpr, STORE_G: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    NF4: tl.constexpr, NF4_ROWS: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr,
    NF4_DOUBLE_QUANT: tl.constexpr, NF4_NESTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx = dy @ W + keep/(1-p) * (gs_drop @ D) + gs_clean @ D for one (BLOCK_M, BLOCK_K)
    tile of dx, or (SEGMENTED) a row block and a segment of consecutive column tiles, as in
    ``_fwd_kernel``; the reduction runs over N (out features).

    FUSE_UP: g = dy @ U accumulates from the dy tiles of the first tile's N-loop (BLOCK_R >=
    R); STORE_G keeps it for the factor gradients. Otherwise g (fp32) is read in rank chunks.
    """
    tiles_k = tl.cdiv(K, BLOCK_K)
    if SEGMENTED:
        seg_tiles = tl.cdiv(tiles_k, n_segments)
    else:
        seg_tiles = 1
    pid_m, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M),
                                 tl.cdiv(tiles_k, seg_tiles), GROUP_M)
    first = pid_s * seg_tiles
    k0 = first * BLOCK_K
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = first.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = _index(tl.arange(0, BLOCK_R), IDX64)

    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc, g = _dx_mainloop(dy_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, u_ptr,
                          g, offs_m, offs_k, k0, offs_r, M, N, K, R, stride_dym, stride_dyn,
                          stride_wn, stride_wk, stride_un, stride_ur, FUSE_UP, BLOCK_R,
                          DOT_PRECISION, NF4, NF4_ROWS, NF4_BLOCKSIZE, NF4_DOUBLE_QUANT,
                          NF4_NESTED, BLOCK_M, BLOCK_K, BLOCK_N, IDX64)
    if STORE_G:
        if pid_s == 0:  # every K tile holds the same g; the first one saves it
            tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr, g,
                     mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
    _dx_epilogue(acc, g, g_ptr, s_ptr, d_ptr, dx_ptr, offs_m, offs_k, k0, offs_r, M, K, R,
                 stride_gm, stride_gr, stride_dr, stride_dk, stride_dxm, stride_dxk, seed,
                 dropout_p, drop_rows, FUSE_UP, HAS_DROPOUT, BLOCK_R, DOT_PRECISION, BLOCK_M,
                 BLOCK_K)
    if SEGMENTED:  # the rest of the segment: plain GEMM tiles, g from registers
        for _ in range(first + 1, tl.minimum(first + seg_tiles, tiles_k)):
            k0 += BLOCK_K
            offs_k += BLOCK_K
            acc, g = _dx_mainloop(dy_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                                  offset_ptr, u_ptr, g, offs_m, offs_k, k0, offs_r, M, N, K, R,
                                  stride_dym, stride_dyn, stride_wn, stride_wk, stride_un,
                                  stride_ur, False, BLOCK_R, DOT_PRECISION, NF4, NF4_ROWS,
                                  NF4_BLOCKSIZE, NF4_DOUBLE_QUANT, NF4_NESTED, BLOCK_M,
                                  BLOCK_K, BLOCK_N, IDX64)
            _dx_epilogue(acc, g, g_ptr, s_ptr, d_ptr, dx_ptr, offs_m, offs_k, k0, offs_r, M, K,
                         R, stride_gm, stride_gr, stride_dr, stride_dk, stride_dxm,
                         stride_dxk, seed, dropout_p, drop_rows, FUSE_UP, HAS_DROPOUT, BLOCK_R,
                         DOT_PRECISION, BLOCK_M, BLOCK_K)


@triton.jit
def _rank_grad_tile(a_ptr, b_ptr, s_ptr, out_ptr, M, C, R, grad_rows, c_tile, r_tile,
                    stride_am, stride_ac, stride_bm, stride_br, stride_oc, stride_or,
                    seed, dropout_p, drop_rows, HAS_DROPOUT: tl.constexpr,
                    SCALE_AFTER: tl.constexpr, BLOCK_R: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                    IDX64: tl.constexpr):
    """out[c, r] = sum_m a'[m, c] * b[m, r] * s[r] for one (BLOCK_C, BLOCK_R) tile, rank
    columns r < grad_rows only (the rest are stored as zeros, with no M-loop).

    dU: a = dy, b = t (C = N). dD.T: a = x with dropout on the columns r < drop_rows,
    b = g (C = K, out strides transposed).

    ``b * s`` meets ``a`` in a's dtype. For dU (SCALE_AFTER) t is in range but t * s need
    not be (a tiny s against a huge U), so a finite s scales the fp32 result after the
    M-loop instead (s[r] scales a whole column: exact); a non-finite s stays inside so
    Inf/NaN land where the reference puts them. For dD, g * s is what stays in range.
    """
    offs_c = c_tile.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    r0 = r_tile * BLOCK_R
    offs_r = r0 + _index(tl.arange(0, BLOCK_R), IDX64)
    live = offs_r < grad_rows
    s = tl.load(s_ptr + offs_r, mask=live, other=0.0).to(tl.float32)
    s_inner = s
    if SCALE_AFTER:
        finite = (s == s) & (tl.abs(s) < float("inf"))
        s_inner = tl.where(finite, 1.0, s)
        s_outer = tl.where(finite, s, 1.0)

    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    if r0 < grad_rows:
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_c[None, :] * stride_ac,
                        mask=(offs_m[:, None] < M) & (offs_c[None, :] < C), other=0.0)
            b = tl.load(b_ptr + offs_m[:, None] * stride_bm + offs_r[None, :] * stride_br,
                        mask=(offs_m[:, None] < M) & live[None, :], other=0.0)
            bs = (b * s_inner[None, :]).to(a.dtype)
            if HAS_DROPOUT:
                if r0 < drop_rows:
                    keep = _keep(seed, offs_m, c_tile * BLOCK_C, C, dropout_p, BLOCK_M,
                                 BLOCK_C)
                    kept = tl.where(keep, a, 0.0)
                    acc = tl.dot(tl.trans(kept),
                                 tl.where(offs_r[None, :] < drop_rows, bs, 0.0), acc,
                                 input_precision=DOT_PRECISION)
                if drop_rows < tl.minimum(r0 + BLOCK_R, R):
                    acc = tl.dot(tl.trans(a), tl.where(offs_r[None, :] >= drop_rows, bs, 0.0),
                                 acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(tl.trans(a), bs, acc, input_precision=DOT_PRECISION)
    if SCALE_AFTER:
        acc = acc * s_outer[None, :]
    if HAS_DROPOUT:
        acc = _dropout_rescale(acc, offs_r, dropout_p, drop_rows)
    tl.store(out_ptr + offs_c[:, None] * stride_oc + offs_r[None, :] * stride_or,
             acc.to(out_ptr.dtype.element_ty),
             mask=(offs_c[:, None] < C) & (offs_r[None, :] < R))


@triton.jit
def _factor_grad_kernel(
    dy_ptr, x_ptr, t_ptr, g_ptr, s_ptr, du_ptr, dd_ptr, ds_ptr,
    M, N, K, R, grad_rows,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_tm, stride_tr, stride_gm, stride_gr,
    stride_dun, stride_dur, stride_ddr, stride_ddk,
    seed, dropout_p, drop_rows,
    NEED_DU: tl.constexpr, NEED_DD: tl.constexpr, NEED_DS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dU = dy.T @ (t * s), dD = (g * s).T @ x', ds = sum_m g * t in one launch.

    Program ids are laid out as [dU tiles | dD tiles | ds tiles], each part present only if
    that gradient is needed; dU and dD tiles are (BLOCK_C, BLOCK_R) and reduce over M.
    """
    pid = tl.program_id(0)
    tiles_r = tl.cdiv(R, BLOCK_R)
    tiles_u = 0
    tiles_d = 0
    if NEED_DU:
        tiles_u = tl.cdiv(N, BLOCK_C) * tiles_r
    if NEED_DD:
        tiles_d = tl.cdiv(K, BLOCK_C) * tiles_r
    if pid < tiles_u:
        _rank_grad_tile(dy_ptr, t_ptr, s_ptr, du_ptr, M, N, R, grad_rows,
                        pid // tiles_r, pid % tiles_r,
                        stride_dym, stride_dyn, stride_tm, stride_tr, stride_dun, stride_dur,
                        seed, dropout_p, 0, False, True, BLOCK_R, DOT_PRECISION, BLOCK_M,
                        BLOCK_C, IDX64)
    elif pid < tiles_u + tiles_d:
        pid_d = pid - tiles_u
        _rank_grad_tile(x_ptr, g_ptr, s_ptr, dd_ptr, M, K, R, grad_rows,
                        pid_d // tiles_r, pid_d % tiles_r,
                        stride_xm, stride_xk, stride_gm, stride_gr, stride_ddk, stride_ddr,
                        seed, dropout_p, drop_rows, HAS_DROPOUT, False, BLOCK_R,
                        DOT_PRECISION, BLOCK_M, BLOCK_C, IDX64)
    elif NEED_DS:
        offs_r = (pid - tiles_u - tiles_d) * BLOCK_R + _index(tl.arange(0, BLOCK_R), IDX64)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            mask = (offs_m[:, None] < M) & (offs_r[None, :] < R)
            g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                        mask=mask, other=0.0)
            t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                        mask=mask, other=0.0)
            acc += tl.sum(g * t, axis=0)
        tl.store(ds_ptr + offs_r, acc.to(ds_ptr.dtype.element_ty), mask=offs_r < R)


# --------------------------------------------------------------------------------------
# Autotuning: configs, pruning by shape and shared memory
# --------------------------------------------------------------------------------------
def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _gemm_configs(out: str, red: str) -> list[triton.Config]:
    """Tiles for the two GEMM-shaped kernels (output tile BLOCK_M x ``out``, reduction ``red``)."""
    tiles = [
        # (BLOCK_M, out, red, GROUP_M, warps, stages)
        # small M (decode, short prompts): one row tile, wide column tiles so that the
        # per-tile re-reads of x and D stay a small fraction of W
        (16, 64, 128, 1, 4, 4),
        (16, 128, 128, 1, 8, 3),
        (16, 256, 64, 1, 8, 3),
        (32, 64, 64, 1, 4, 4),
        (32, 128, 64, 1, 4, 4),
        (64, 64, 64, 8, 4, 4),
        (64, 128, 32, 8, 4, 4),
        (64, 128, 64, 8, 8, 3),  # segmented forward with dropout: t beside the accumulator
        # large M (training, prefill): tensor-core tiles (wgmma on sm_90)
        (64, 256, 64, 8, 8, 3),
        (128, 64, 64, 8, 4, 4),
        (128, 128, 32, 8, 8, 4),
        (128, 128, 64, 8, 8, 3),
        (128, 256, 64, 8, 8, 3),
    ]
    return [triton.Config({"BLOCK_M": bm, out: bo, red: bk, "GROUP_M": gm}, num_warps=w,
                          num_stages=s) for bm, bo, bk, gm, w, s in tiles]


def _row_block_fits(block_m: int, M: int) -> bool:
    """Row tiles no taller than the problem; at M >= 128 no tiny row tiles."""
    return block_m <= _pow2(M) and (M < 128 or block_m >= 64)


# Registers per thread an NF4 tile may take (sm_80/90, tools/compile_report): the span
# decoder's decoded weight elements; the row decoder's accumulator plus decoded elements.
NF4_SPAN_ELEMENTS = 32
NF4_ROWS_ELEMENTS = 160


def _nf4_fits(cfg, a, block_out: int, block_n: int, block_k: int, dx: bool) -> bool:
    """NF4 tiles that compile without register spills (tools/compile_report, sm_80 and sm_90).

    ``block_out``: the output tile width (BLOCK_N forward, BLOCK_K dx); the decoded weight
    tile is (block_n, block_k). Span decoder (K not a multiple of the blocksize): at most
    ``NF4_SPAN_ELEMENTS`` decoded weight elements per thread (at decode sizes the 32-row
    tile, see ``_rows_for``); forward at 4 warps, at most 32 accumulator elements per thread
    beside it (64 x 128 x 32 spilled 16 bytes on sm_80 once the epilogue scaled U in fp32).
    Row decoder: fp32 accumulator plus decoded weight elements at
    most ``NF4_ROWS_ELEMENTS`` per thread (drops the 128 x 256 x 64 tile), and in dx no
    128 x 128 weight tile whose row segments span two scale blocks (8 bytes of spill on
    sm_80 at 8 warps).
    """
    if not a.get("NF4"):
        return True
    threads = 32 * cfg.num_warps
    if not a["NF4_ROWS"]:
        if not dx and cfg.num_warps == 4 and cfg.kwargs["BLOCK_M"] * block_out > 32 * threads:
            return False
        return block_n * block_k <= NF4_SPAN_ELEMENTS * threads
    if dx and block_n >= 128 and block_k >= 128 and block_k > a["NF4_BLOCKSIZE"]:
        return False
    return cfg.kwargs["BLOCK_M"] * block_out + block_n * block_k <= NF4_ROWS_ELEMENTS * threads


def _rows_for(a) -> int:
    """The M the row-tile rule sees: the NF4 span decoder's only spill-free small tile is 32
    rows tall, so it may run at M <= 16 too."""
    return max(a["M"], 17) if a.get("NF4") and not a["NF4_ROWS"] else a["M"]


def _fwd_fits(cfg, a) -> bool:
    b = cfg.kwargs
    ok = (_row_block_fits(b["BLOCK_M"], _rows_for(a)) and b["BLOCK_N"] <= _pow2(a["N"])
          and b["BLOCK_K"] <= _pow2(a["K"])
          and _nf4_fits(cfg, a, b["BLOCK_N"], b["BLOCK_N"], b["BLOCK_K"], dx=False))
    if a["FUSE_DOWN"] and a["HAS_DROPOUT"]:  # x tile + its keep-mask beside the accumulator
        ok = ok and b["BLOCK_M"] * b["BLOCK_N"] <= 64 * 128
    if a["SEGMENTED"]:  # 8 warps, as dx: at 4, 64 x 64 x 64 spills 16 bytes on sm_80 at R = 16
        return ok and cfg.num_warps == 8 and _segment_tile_fits(cfg, a, b["BLOCK_N"])
    return ok and (not a["FUSE_DOWN"] or a["R"] <= fused_rank_limit(b["BLOCK_N"]))


def _segment_tile_fits(cfg, a, block_out: int) -> bool:
    """Tiles of a segmented launch: the row tile ``segment_count`` counted programs with,
    and registers per thread for the fp32 output tile, the projection (t or g) and its
    factor operand (counted as R twice) <= 64 beside a keep-mask, <= 80 without; the next
    tiles up spill on sm_80 (e.g. 64 x 64 x 64 at 4 warps, R = 64; tools/compile_report)."""
    b = cfg.kwargs
    per_thread = b["BLOCK_M"] * (block_out + 2 * a["BLOCK_R"]) // (32 * cfg.num_warps)
    return (b["BLOCK_M"] <= SEGMENT_BLOCK_M
            and per_thread <= (64 if a["HAS_DROPOUT"] else 80))


def _fwd_smem(cfg, a) -> int:
    b, br = cfg.kwargs, a["BLOCK_R"]
    stage = b["BLOCK_K"] * (b["BLOCK_M"] + b["BLOCK_N"] + (br if a["FUSE_DOWN"] else 0))
    epilogue = br * (b["BLOCK_M"] + b["BLOCK_N"])
    return (cfg.num_stages * stage + epilogue) * a["x_ptr"].element_size()


def _dx_fits(cfg, a) -> bool:
    b = cfg.kwargs
    ok = (_row_block_fits(b["BLOCK_M"], _rows_for(a)) and b["BLOCK_K"] <= _pow2(a["K"])
          and b["BLOCK_N"] <= _pow2(a["N"])
          and _nf4_fits(cfg, a, b["BLOCK_K"], b["BLOCK_N"], b["BLOCK_K"], dx=True))
    if a["HAS_DROPOUT"]:  # two fp32 output accumulators (clean, dropped): <= 128 regs/thread
        ok = ok and 2 * b["BLOCK_M"] * b["BLOCK_K"] <= 128 * 32 * cfg.num_warps
    if a["SEGMENTED"]:  # 8 warps: at 4, 64 x 64 x 64 spills 8 bytes on sm_80 even at R = 16
        return ok and cfg.num_warps == 8 and _segment_tile_fits(cfg, a, b["BLOCK_K"])
    return ok and (not a["FUSE_UP"] or a["R"] <= fused_rank_limit(b["BLOCK_K"]))


def _dx_smem(cfg, a) -> int:
    b, br = cfg.kwargs, a["BLOCK_R"]
    stage = b["BLOCK_N"] * (b["BLOCK_M"] + b["BLOCK_K"] + (br if a["FUSE_UP"] else 0))
    epilogue = br * (b["BLOCK_M"] + b["BLOCK_K"])
    return (cfg.num_stages * stage + epilogue) * a["dy_ptr"].element_size()


_PROJ_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                 for bm, bk, w, s in [(16, 128, 4, 3), (16, 256, 4, 3), (32, 128, 4, 3),
                                      (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3),
                                      (128, 128, 8, 3)]]


def _proj_fits(cfg, a) -> bool:
    b = cfg.kwargs
    # the (BLOCK_K, BLOCK_R) dot operand stays within 128 registers' worth per thread
    return (_row_block_fits(b["BLOCK_M"], a["M"]) and b["BLOCK_K"] <= _pow2(a["K"])
            and b["BLOCK_K"] * a["BLOCK_R"] <= 128 * 32 * cfg.num_warps)


def _proj_smem(cfg, a) -> int:
    b = cfg.kwargs
    stage = b["BLOCK_K"] * (b["BLOCK_M"] + a["BLOCK_R"])
    return cfg.num_stages * stage * a["a_ptr"].element_size()


_FACTOR_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=w, num_stages=s)
                   for bm, bc, w, s in [(16, 128, 4, 4), (32, 128, 4, 4), (64, 64, 4, 3),
                                        (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3)]]


def _factor_fits(cfg, a) -> bool:
    b = cfg.kwargs
    width = max(a["N"] if a["NEED_DU"] else 0, a["K"] if a["NEED_DD"] else 0)
    return b["BLOCK_M"] <= _pow2(a["M"]) and (width == 0 or b["BLOCK_C"] <= _pow2(width))


def _factor_smem(cfg, a) -> int:
    b = cfg.kwargs
    stage = b["BLOCK_M"] * (b["BLOCK_C"] + a["BLOCK_R"])
    return cfg.num_stages * stage * a["x_ptr"].element_size()


@functools.lru_cache(maxsize=None)
def _device_smem(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def smem_limit(args: dict) -> int:
    """Shared memory per block on the device of the kernel's tensors (unbounded off-GPU)."""
    for value in args.values():
        if isinstance(value, torch.Tensor) and value.is_cuda:
            return _device_smem(value.device.index or 0)
    return 1 << 40


class TunedKernel:
    """A ``@triton.jit`` kernel with its autotune configs, the rules that prune them
    (shape fit + shared-memory estimate) and its launch grid.

    On a GPU, ``triton.autotune`` benchmarks the pruned configs. In the interpreter
    (timing means nothing there) the pruned config with the fewest programs runs, the
    largest tile among equals (a segmented forward has as many programs at any tile
    width): the widest tiles, hence the fewest re-reads.
    """

    def __init__(self, fn, configs, key, fits, smem_bytes, grid):
        self.fn, self.configs, self.fits, self.smem_bytes, self.grid = (
            fn, configs, fits, smem_bytes, grid)
        self.name = fn.__name__
        self.autotuner = triton.autotune(configs, key=key,
                                         prune_configs_by={"early_config_prune": self._prune}
                                         )(fn)

    def candidates(self, args: dict, limit: int, configs=None) -> list[triton.Config]:
        """Configs that fit this launch's shape and ``limit`` bytes of shared memory, fewest
        programs first, then the largest tiles (never empty: falls back to the
        smallest-footprint config)."""
        configs = self.configs if configs is None else configs
        fit = [c for c in configs
               if self.fits(c, args) and self.smem_bytes(c, args) <= limit]
        if not fit:
            fit = [min(configs, key=lambda c: self.smem_bytes(c, args))]
        return sorted(fit, key=lambda c: (math.prod(self.grid({**args, **c.kwargs})),
                                          -math.prod(v for k, v in c.kwargs.items()
                                                     if k.startswith("BLOCK"))))

    def _prune(self, configs, nargs, **kwargs):
        args = {**nargs, **kwargs}
        return self.candidates(args, smem_limit(args), configs)

    def __call__(self, **args):
        if _recorder is not None:
            _recorder.launches.append((self, args))
            if _recorder.dry_run:
                return
        if INTERPRET:
            cfg = self.candidates(args, smem_limit(args))[0]
            self.fn[self.grid({**args, **cfg.kwargs})](**args, **cfg.all_kwargs())
        else:
            self.autotuner[self.grid](**args)


class _Recorder:
    def __init__(self, dry_run: bool):
        self.dry_run, self.launches = dry_run, []


_recorder: _Recorder | None = None


@contextlib.contextmanager
def record_launches(dry_run: bool = False):
    """Record every kernel launch as ``(TunedKernel, args)``; with ``dry_run`` nothing runs
    (works on "meta" tensors). Used by the compile report to build exact signatures."""
    global _recorder
    previous, _recorder = _recorder, _Recorder(dry_run)
    try:
        yield _recorder.launches
    finally:
        _recorder = previous


def _fwd_grid(a):
    tiles_n = triton.cdiv(a["N"], a["BLOCK_N"])
    seg_tiles = triton.cdiv(tiles_n, a["n_segments"]) if a["SEGMENTED"] else 1
    return (triton.cdiv(a["M"], a["BLOCK_M"]) * triton.cdiv(tiles_n, seg_tiles),)


FWD = TunedKernel(
    _fwd_kernel, _gemm_configs("BLOCK_N", "BLOCK_K"),
    key=["M", "N", "K", "R", "n_segments", "HAS_BIAS", "FUSE_DOWN", "SEGMENTED", "STORE_T",
         "HAS_DROPOUT", "BLOCK_R", "NF4", "NF4_ROWS"],
    fits=_fwd_fits, smem_bytes=_fwd_smem, grid=_fwd_grid)
PROJ = TunedKernel(
    _proj_kernel, _PROJ_CONFIGS, key=["M", "K", "R", "HAS_DROPOUT", "BLOCK_R"],
    fits=_proj_fits, smem_bytes=_proj_smem,
    grid=lambda a: (triton.cdiv(a["M"], a["BLOCK_M"]) * triton.cdiv(a["R"], a["BLOCK_R"]),))
def _dx_grid(a):
    tiles_k = triton.cdiv(a["K"], a["BLOCK_K"])
    seg_tiles = triton.cdiv(tiles_k, a["n_segments"]) if a["SEGMENTED"] else 1
    return (triton.cdiv(a["M"], a["BLOCK_M"]) * triton.cdiv(tiles_k, seg_tiles),)


DX = TunedKernel(
    _dx_kernel, _gemm_configs("BLOCK_K", "BLOCK_N"),
    key=["M", "N", "K", "R", "n_segments", "FUSE_UP", "SEGMENTED", "STORE_G", "HAS_DROPOUT",
         "BLOCK_R", "NF4", "NF4_ROWS"],
    fits=_dx_fits, smem_bytes=_dx_smem, grid=_dx_grid)


def _factor_grid(a):
    tiles_r = triton.cdiv(a["R"], a["BLOCK_R"])
    tiles_c = (triton.cdiv(a["N"], a["BLOCK_C"]) if a["NEED_DU"] else 0) + (
        triton.cdiv(a["K"], a["BLOCK_C"]) if a["NEED_DD"] else 0)
    return ((tiles_c + (1 if a["NEED_DS"] else 0)) * tiles_r,)


FACTOR = TunedKernel(
    _factor_grad_kernel, _FACTOR_CONFIGS,
    key=["M", "N", "K", "R", "NEED_DU", "NEED_DD", "NEED_DS", "HAS_DROPOUT", "BLOCK_R"],
    fits=_factor_fits, smem_bytes=_factor_smem, grid=_factor_grid)

KERNELS = (FWD, PROJ, DX, FACTOR)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
FUSED_MAX_RANK = 64          # the fused t / g accumulator lives in registers (BLOCK_M x R)
COMPUTE_BOUND_ROWS = 512     # from here on the GEMM is compute-bound: always split
FUSED_DROPOUT_ROWS = 128     # fused forward with dropout only below this many rows
LAUNCH_SECONDS = 4e-6        # one more launch, H100
PEAK_FLOPS = 8e14            # bf16 dense, H100 (DESIGN.md section 3)
BANDWIDTH = 3.0e12           # device-memory copy, H100


def fused_rank_limit(block_n: int) -> int:
    """Largest R the fused path takes with column tiles ``block_n`` wide: every tile
    re-reads D, R/block_n of W's bytes; keep that under W/4."""
    return block_n // 4


def use_fused_path(M: int, N: int, K: int, R: int, dropout: bool = False) -> bool:
    """One fused launch, or the split (low-rank projection kernel, then a GEMM with the
    low-rank epilogue)?  ``N`` is the output width of the GEMM, ``K`` its reduction.

    Fused recomputes the (M x R) projection in every N-tile: BLOCK_R/BLOCK_N extra FLOPs
    (tl.dot pads R to BLOCK_R >= 16) and R/BLOCK_N of W in D re-reads. Split pays one more
    launch (~4 us) and a second read of x (plus the small fp32 t round trip); its FLOPs
    stay at the floor, its unique bytes exceed the floor by x's size. So:

    - never fused for R > 64 (register-resident accumulator) or R > BLOCK_N / 4 at the
      widest tile (D re-reads over W/4);
    - M >= 512 (compute-bound): split; fused would cost >= 16/256 = 6% more FLOPs;
    - M < 512 (decode, short prompts; bound by reading W: 11 us for a 4096^2 bf16 layer):
      fused while recomputing t costs less time at peak than the launch and x re-read
      the split adds (4096^2: every M < 512 for R <= 32, M <= 219 for R = 64);
    - ``dropout`` (forward only): the fused kernel regenerates the keep-mask of its x tiles
      in every column tile (~5 integer multiplies per element and tile) and the mask tile
      adds registers: fused only for M < 128 (4096^2, M = 16: ~0.8 us of Philox).
    """
    if R > FUSED_MAX_RANK or R > fused_rank_limit(min(256, _pow2(N))):
        return False
    if M >= COMPUTE_BOUND_ROWS or (dropout and M >= FUSED_DROPOUT_ROWS):
        return False
    recompute = 2 * M * K * R * triton.cdiv(N, 128) / PEAK_FLOPS
    return recompute <= LAUNCH_SECONDS + 2 * M * K / BANDWIDTH


SEGMENT_BLOCK_M = 64         # row tile of the segmented kernels (128-row tiles spill beside t)
SEGMENT_RANK_WIDTHS = 20     # a segment spans >= 20 rank blocks: recomputing t costs <= 5%
WAVES = 2                    # programs per SM the segmented kernels need to keep a GPU busy
H100_SMS = 132
SEGMENTED_ENV = "SPECLORA_SEGMENTED"  # "1": large M may take the segmented kernels

_pinned_segments: Optional[int] = None


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (an H100's 132 off-GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS


def segment_count(M: int, N: int, R: int, sms: int = H100_SMS) -> int:
    """Column segments per row block for the one-launch large-M forward (or dx, N being its
    output width K), or 0 for the split.

    The segmented kernels (``_fwd_kernel[SEGMENTED]``, ``_dx_kernel[SEGMENTED]``) give each
    program a row block of ``SEGMENT_BLOCK_M`` rows and a segment of consecutive column
    tiles; t = x' @ D.T (g = dy @ U) is computed once per segment, from the x (dy) tiles of
    its first tile's K-loop, and kept in registers for the rest. x (dy) is read by one
    kernel only (the split reads it twice) and t (g) never round-trips through memory; the
    price is ``segments * BLOCK_R / N`` extra FLOPs. So: the fewest segments that still give
    ``WAVES`` programs per SM (several segments per row block also keep the rows in flight
    few enough for L2), only if each segment spans >= ``SEGMENT_RANK_WIDTHS`` rank blocks
    (<= 5% extra FLOPs), only for compute-bound M (>= 512) and register-resident t (R <= 64).

    4096 x 4096, R = 48, 132 SMs: M = 8192 -> 3 segments (384 programs, +4.7% FLOPs over the
    base GEMM); M = 4096 would need 5 (> 4096 / 1280): split; M = 512 would need 33 (or
    leave 108 of 132 SMs idle): split (README, Benchmarks). Row tiles are 64 tall (128-row
    tiles spill registers beside t, tools/compile_report), which doubles the weight's L2
    re-reads against the split's 128 x 256 tiles (3.4 -> 6.7 GB at M = 8192, to save 64 MB
    of DRAM reads), which an H100's L2 may not serve faster than the split runs. So the rule
    applies only with ``SPECLORA_SEGMENTED=1`` until GPU timings (``benchmarks.run --profile
    gpu`` both ways) show it wins; otherwise 0.
    """
    if _pinned_segments is not None:
        return _pinned_segments
    if os.environ.get(SEGMENTED_ENV, "").strip() != "1":
        return 0
    if R > FUSED_MAX_RANK or M < COMPUTE_BOUND_ROWS:
        return 0
    most = N // (SEGMENT_RANK_WIDTHS * _rank_block(R, FUSED_MAX_RANK))
    need = triton.cdiv(WAVES * sms, triton.cdiv(M, SEGMENT_BLOCK_M))
    return need if need <= most else 0


@contextlib.contextmanager
def pinned_segments(n: Optional[int]):
    """Make ``segment_count`` return ``n`` (0: split) whatever the shape: tests take the
    segmented path at small shapes; ``benchmarks.counted`` runs a large-M shape's plan at
    reduced M to extrapolate from it. ``None`` restores the rule."""
    global _pinned_segments
    previous, _pinned_segments = _pinned_segments, n
    try:
        yield
    finally:
        _pinned_segments = previous


def _rank_block(R: int, cap: int) -> int:
    return min(cap, _pow2(R))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch: TF32 tensor cores only if ``allow_tf32`` (default: IEEE fp32)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _needs_int64(*operands) -> bool:
    """True if an index times a stride, in some kernel, can pass int32 for one of these
    operands (tensors, or shapes of contiguous outputs not allocated yet): its farthest
    element, plus the widest tile's padding (masked lanes still form their address), lies
    2^31 elements or more from its start."""
    for op in operands:
        if op is None or isinstance(op, NF4Base):  # NF4 decoders index in int64
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


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


class NF4Base(NamedTuple):
    """An NF4 base weight as the kernels take it: bitsandbytes' tensors and layout (see
    ``quant.NF4Weight``; ``absmax2``, ``code2``, ``offset`` are None without double quant)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax2: Optional[torch.Tensor]
    code2: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    shape: tuple
    blocksize: int
    nested_blocksize: int


def _weight_args(weight) -> dict:
    """Kernel arguments for the base weight: a dense (N, K) tensor or an ``NF4Base``."""
    if isinstance(weight, NF4Base):
        dq = weight.absmax2 is not None
        scales = (weight.absmax2, weight.code2, weight.offset) if dq else (weight.absmax,) * 3
        return dict(w_ptr=weight.packed, absmax_ptr=weight.absmax, absmax2_ptr=scales[0],
                    code2_ptr=scales[1], offset_ptr=scales[2], stride_wn=0, stride_wk=0,
                    NF4=True, NF4_ROWS=weight.shape[1] % weight.blocksize == 0,
                    NF4_BLOCKSIZE=weight.blocksize, NF4_DOUBLE_QUANT=dq,
                    NF4_NESTED=weight.nested_blocksize)
    return dict(w_ptr=weight, absmax_ptr=weight, absmax2_ptr=weight, code2_ptr=weight,
                offset_ptr=weight, stride_wn=weight.stride(0), stride_wk=weight.stride(1),
                NF4=False, NF4_ROWS=False, NF4_BLOCKSIZE=64, NF4_DOUBLE_QUANT=False,
                NF4_NESTED=256)


def _fused_rank_cap(weight) -> int:
    """Widest rank a fused launch takes on this base: the NF4 span decoder's tiles (see
    ``_nf4_fits``) are at most 64 wide at small M, so its fused rank limit is that tile's."""
    if isinstance(weight, NF4Base) and weight.shape[1] % weight.blocksize:
        return fused_rank_limit(64)
    return FUSED_MAX_RANK


def adapter_forward(x, weight, bias, down, scale, up, seed: int, dropout_p: float,
                    drop_rows: int, save_t: bool):
    """Triton forward on 2-D ``x`` (M, K), ``weight`` a dense (N, K) tensor or an ``NF4Base``.
    Dropout is active iff ``dropout_p > 0`` and ``drop_rows > 0``. Returns ``(y, t)``: y (M, N)
    in x's dtype; t = x' @ D.T (M, R) fp32 if ``save_t`` else an empty (0, R) tensor."""
    M, K = x.shape
    N, R = weight.shape[0], down.shape[0]
    has_dropout = dropout_p > 0 and drop_rows > 0
    fused = use_fused_path(M, N, K, R, has_dropout) and R <= _fused_rank_cap(weight)
    segments = 0
    if not fused and R <= _fused_rank_cap(weight):
        segments = segment_count(M, N, R, sm_count(x.device))
    down_in_kernel = fused or segments > 0
    y = _empty((M, N), x.dtype, x.device)
    t = _empty((M, R), torch.float32, x.device) if (save_t or not down_in_kernel) else y
    drop = dict(seed=int(seed), dropout_p=float(dropout_p),
                drop_rows=int(drop_rows) if has_dropout else 0,
                DOT_PRECISION=_dot_precision(x.dtype),
                IDX64=_needs_int64(x, weight, down, up, y, t))
    if not down_in_kernel:
        PROJ(a_ptr=x, b_ptr=down, out_ptr=t, M=M, K=K, R=R,
             stride_am=x.stride(0), stride_ak=x.stride(1),
             stride_br=down.stride(0), stride_bk=down.stride(1),
             stride_om=t.stride(0), stride_or=t.stride(1),
             HAS_DROPOUT=has_dropout, BLOCK_R=_rank_block(R, 128), **drop)
    FWD(x_ptr=x, **_weight_args(weight), bias_ptr=bias if bias is not None else y, d_ptr=down,
        s_ptr=scale, u_ptr=up, t_ptr=t, y_ptr=y, M=M, N=N, K=K, R=R,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_dr=down.stride(0), stride_dk=down.stride(1),
        stride_un=up.stride(0), stride_ur=up.stride(1),
        stride_tm=t.stride(0), stride_tr=t.stride(-1),
        stride_ym=y.stride(0), stride_yn=y.stride(1), n_segments=max(segments, 1),
        HAS_BIAS=bias is not None, FUSE_DOWN=down_in_kernel, SEGMENTED=segments > 0,
        STORE_T=down_in_kernel and save_t,
        HAS_DROPOUT=down_in_kernel and has_dropout,  # split: t arrives with dropout applied
        BLOCK_R=_rank_block(R, FUSED_MAX_RANK if down_in_kernel else 32), **drop)
    return y, (t if save_t else x.new_empty((0, R), dtype=torch.float32))


def adapter_backward(dy, x, weight, down, scale, up, t, seed: int, dropout_p: float,
                     drop_rows: int, grad_rows: int, need_dx: bool, need_ddown: bool,
                     need_dscale: bool, need_dup: bool):
    """Triton backward on 2-D ``dy`` (M, N), ``x`` (M, K), ``weight`` dense or ``NF4Base``;
    ``t`` from the forward (needed
    for dU and ds). Returns ``(dx, d_down, d_scale, d_up)``; a gradient not asked for is an
    empty tensor, and nothing is computed for it."""
    M, K = x.shape
    N, R = weight.shape[0], down.shape[0]
    has_dropout = dropout_p > 0 and drop_rows > 0
    need_g = need_ddown or need_dscale
    drop = dict(seed=int(seed), dropout_p=float(dropout_p),
                drop_rows=int(drop_rows) if has_dropout else 0,
                DOT_PRECISION=_dot_precision(x.dtype),
                IDX64=_needs_int64(dy, x, weight, down, up, t,  # and dx, g, dD, dU:
                                   (M, K), (M, R), tuple(down.shape), tuple(up.shape)))
    # dx draws each mask element once
    fused = need_dx and use_fused_path(M, K, N, R) and R <= _fused_rank_cap(weight)
    segments = 0
    if need_dx and not fused and R <= _fused_rank_cap(weight):
        segments = segment_count(M, K, R, sm_count(x.device))
    up_in_kernel = fused or segments > 0
    need_g_buffer = need_g or (need_dx and not up_in_kernel)
    g = _empty((M, R), torch.float32, x.device) if need_g_buffer else x.new_empty(0)

    if g.numel() and not up_in_kernel:  # g = dy @ U, once
        PROJ(a_ptr=dy, b_ptr=up, out_ptr=g, M=M, K=N, R=R,
             stride_am=dy.stride(0), stride_ak=dy.stride(1),
             stride_br=up.stride(1), stride_bk=up.stride(0),
             stride_om=g.stride(0), stride_or=g.stride(1),
             BLOCK_R=_rank_block(R, 128), HAS_DROPOUT=False, **drop)
    dx = x.new_empty(0)
    if need_dx:
        dx = _empty((M, K), x.dtype, x.device)
        DX(dy_ptr=dy, **_weight_args(weight), d_ptr=down, s_ptr=scale, u_ptr=up,
           g_ptr=g if g.numel() else dx, dx_ptr=dx, M=M, N=N, K=K, R=R,
           stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
           stride_dr=down.stride(0), stride_dk=down.stride(1),
           stride_un=up.stride(0), stride_ur=up.stride(1),
           stride_gm=g.stride(0) if g.numel() else 0, stride_gr=g.stride(-1),
           stride_dxm=dx.stride(0), stride_dxk=dx.stride(1), n_segments=max(segments, 1),
           FUSE_UP=up_in_kernel, SEGMENTED=segments > 0, STORE_G=up_in_kernel and need_g,
           HAS_DROPOUT=has_dropout,
           BLOCK_R=_rank_block(R, FUSED_MAX_RANK if up_in_kernel else 32), **drop)

    d_down = _empty(down.shape, down.dtype, x.device) if need_ddown else x.new_empty(0)
    d_scale = _empty(scale.shape, scale.dtype, x.device) if need_dscale else x.new_empty(0)
    d_up = _empty(up.shape, up.dtype, x.device) if need_dup else x.new_empty(0)
    if need_ddown or need_dscale or need_dup:
        FACTOR(dy_ptr=dy, x_ptr=x, t_ptr=t if t.numel() else x, g_ptr=g if g.numel() else x,
               s_ptr=scale, du_ptr=d_up if need_dup else x, dd_ptr=d_down if need_ddown else x,
               ds_ptr=d_scale if need_dscale else scale, M=M, N=N, K=K, R=R,
               grad_rows=int(grad_rows),
               stride_dym=dy.stride(0), stride_dyn=dy.stride(1),
               stride_xm=x.stride(0), stride_xk=x.stride(1),
               stride_tm=t.stride(0) if t.numel() else 0, stride_tr=t.stride(-1),
               stride_gm=g.stride(0) if g.numel() else 0, stride_gr=g.stride(-1),
               stride_dun=d_up.stride(0) if need_dup else 0, stride_dur=d_up.stride(-1),
               stride_ddr=d_down.stride(0) if need_ddown else 0,
               stride_ddk=d_down.stride(-1),
               NEED_DU=need_dup, NEED_DD=need_ddown, NEED_DS=need_dscale,
               HAS_DROPOUT=has_dropout, BLOCK_R=_rank_block(R, 32), **drop)
    return dx, d_down, d_scale, d_up
