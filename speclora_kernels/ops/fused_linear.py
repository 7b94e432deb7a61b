"""Triton kernels and launchers for ``y = x @ W.T + bias + ((x' @ D.T) * s) @ U.T``.

Shapes: x (M, K), W (N, K), D (R, K), s (R,), U (N, R), y (M, N); ``x'`` is ``x`` with
LoRA dropout on the first ``drop_rows`` rows of D (keep-mask from ``dropout.py``,
regenerated wherever needed, never stored). All products accumulate in fp32.

Forward, two paths (``use_fused_path`` picks one per shape):

- fused (1 launch): ``_fwd_kernel[FUSE_DOWN]``. Each program owns a (BLOCK_M, BLOCK_N) tile
  of y; its K-loop feeds the same x tile to ``x @ W.T`` and to ``t = x' @ D.T``
  (BLOCK_M x R, in registers); the epilogue adds ``(t * s) @ U.T`` and bias and stores y
  once. Every N-tile recomputes t: R/BLOCK_N extra FLOPs and D re-reads.
- split (2 launches): ``_proj_kernel`` computes t once, then ``_fwd_kernel`` is a plain
  GEMM whose epilogue loads t and adds ``(t * s) @ U.T``. FLOPs stay at the floor.

Backward, with g = dy @ U (M x R), gs = g * s:

- ``dx = dy @ W + [keep/(1-p)] * (gs[:, :rd] @ D[:rd]) + gs[:, rd:] @ D[rd:]``: one
  ``_dx_kernel`` pass; it computes g in its N-loop (fused) or loads it from
  ``_proj_kernel`` (split), same rule as the forward.
- ``dU[:, :rg] = dy.T @ (t * s)[:, :rg]``, ``dD[:rg] = gs[:, :rg].T @ x'``,
  ``ds = sum_m g * t``: one ``_factor_grad_kernel`` launch whose programs split into
  the three reductions, only for the factors that need a gradient; frozen rows
  (``>= rg``) are written as zeros without a K-loop.

Launches: forward 1 (fused) / 2 (split); backward with every gradient 2 / 3.
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
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP_M row tiles at a time, so that the
    programs resident together reuse the same column tiles of the weight from L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


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
def _up_step(acc, t, offs_r, offs_n, s_ptr, u_ptr, R, N, stride_un, stride_ur,
             DOT_PRECISION: tl.constexpr):
    """Epilogue ``acc += (t * s) @ U.T`` for one rank chunk (t: BLOCK_M x BLOCK_R, fp32)."""
    s = tl.load(s_ptr + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
                mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
    return tl.dot((t * s[None, :]).to(u.dtype), u, acc, input_precision=DOT_PRECISION)


@triton.jit
def _down_back_step(acc, acc_drop, g, offs_r, offs_k, r0, s_ptr, d_ptr, R, K, stride_dr,
                    stride_dk, drop_rows, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Epilogue of dx for one rank chunk: ``(g * s) @ D``. Rows below ``drop_rows`` go to
    ``acc_drop`` (masked by keep / (1 - p) once, after all chunks), the rest to ``acc``."""
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
def _fwd_kernel(
    x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    bias_ptr, d_ptr, s_ptr, u_ptr, t_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_dr, stride_dk,
    stride_un, stride_ur, stride_tm, stride_tr, stride_ym, stride_yn,
    seed, dropout_p, drop_rows,
    HAS_BIAS: tl.constexpr, FUSE_DOWN: tl.constexpr, STORE_T: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NF4: tl.constexpr, NF4_ROWS: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr,
    NF4_DOUBLE_QUANT: tl.constexpr, NF4_NESTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x @ W.T + bias + ((x' @ D.T) * s) @ U.T for one (BLOCK_M, BLOCK_N) tile.

    FUSE_DOWN: t = x' @ D.T accumulates in registers from the x tiles of the base K-loop
    (BLOCK_R >= R); STORE_T keeps it for backward. Otherwise t (fp32, from _proj_kernel)
    is read in rank chunks of BLOCK_R in the epilogue.
    """
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m[:, None] < M

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FUSE_DOWN:
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=row_ok & (offs_k[None, :] < K), other=0.0)
        w = _load_weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                              offs_k, k0, N, K, stride_wn, stride_wk, True, NF4, NF4_ROWS,
                              NF4_BLOCKSIZE, NF4_DOUBLE_QUANT, NF4_NESTED, BLOCK_N, BLOCK_K,
                              x_ptr.dtype.element_ty)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if FUSE_DOWN:
            d = tl.load(d_ptr + offs_r[None, :] * stride_dr + offs_k[:, None] * stride_dk,
                        mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)
            t = _down_step(t, x, d, offs_m, k0, offs_r, 0, K, R, seed, dropout_p, drop_rows,
                           HAS_DROPOUT, BLOCK_R, DOT_PRECISION, BLOCK_M, BLOCK_K)

    if FUSE_DOWN:
        if HAS_DROPOUT:
            t = _dropout_rescale(t, offs_r, dropout_p, drop_rows)
        if STORE_T:
            if pid_n == 0:  # every column tile holds the same t; the first one saves it
                tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr, t,
                         mask=row_ok & (offs_r[None, :] < R))
        acc = _up_step(acc, t, offs_r, offs_n, s_ptr, u_ptr, R, N, stride_un, stride_ur,
                       DOT_PRECISION)
    else:
        for r0 in range(0, R, BLOCK_R):
            offs_rc = r0 + offs_r
            t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_rc[None, :] * stride_tr,
                        mask=row_ok & (offs_rc[None, :] < R), other=0.0)
            acc = _up_step(acc, t, offs_rc, offs_n, s_ptr, u_ptr, R, N, stride_un, stride_ur,
                           DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok & (offs_n[None, :] < N))


@triton.jit
def _proj_kernel(
    a_ptr, b_ptr, out_ptr,
    M, K, R,
    stride_am, stride_ak, stride_br, stride_bk, stride_om, stride_or,
    seed, dropout_p, drop_rows,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    offs_r = r0 + tl.arange(0, BLOCK_R)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
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
def _dx_kernel(
    dy_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
    d_ptr, s_ptr, u_ptr, g_ptr, dx_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dr, stride_dk,
    stride_un, stride_ur, stride_gm, stride_gr, stride_dxm, stride_dxk,
    seed, dropout_p, drop_rows,
    FUSE_UP: tl.constexpr, STORE_G: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NF4: tl.constexpr, NF4_ROWS: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr,
    NF4_DOUBLE_QUANT: tl.constexpr, NF4_NESTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx = dy @ W + keep/(1-p) * (gs_drop @ D) + gs_clean @ D for one (BLOCK_M, BLOCK_K)
    tile of dx; the reduction runs over N (out features).

    FUSE_UP: g = dy @ U accumulates from the dy tiles of the base N-loop (BLOCK_R >= R);
    STORE_G keeps it for the factor gradients. Otherwise g (fp32) is read in rank chunks.
    """
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m[:, None] < M

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    acc_drop = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if FUSE_UP:
        g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=row_ok & (offs_n[None, :] < N), other=0.0)
        w = _load_weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                              offs_k, pid_k * BLOCK_K, N, K, stride_wn, stride_wk, False, NF4,
                              NF4_ROWS, NF4_BLOCKSIZE, NF4_DOUBLE_QUANT, NF4_NESTED, BLOCK_N,
                              BLOCK_K, dy_ptr.dtype.element_ty)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        if FUSE_UP:
            u = tl.load(u_ptr + offs_n[:, None] * stride_un + offs_r[None, :] * stride_ur,
                        mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
            g = _down_step(g, dy, u, offs_m, n0, offs_r, 0, N, R, seed, dropout_p, 0, False,
                           BLOCK_R, DOT_PRECISION, BLOCK_M, BLOCK_N)

    if FUSE_UP:
        if STORE_G:
            if pid_k == 0:  # every K tile holds the same g; the first one saves it
                tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr, g,
                         mask=row_ok & (offs_r[None, :] < R))
        acc, acc_drop = _down_back_step(acc, acc_drop, g, offs_r, offs_k, 0, s_ptr, d_ptr, R,
                                        K, stride_dr, stride_dk, drop_rows, HAS_DROPOUT,
                                        BLOCK_R, DOT_PRECISION)
    else:
        for r0 in range(0, R, BLOCK_R):
            offs_rc = r0 + offs_r
            g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_rc[None, :] * stride_gr,
                        mask=row_ok & (offs_rc[None, :] < R), other=0.0)
            acc, acc_drop = _down_back_step(acc, acc_drop, g, offs_rc, offs_k, r0, s_ptr,
                                            d_ptr, R, K, stride_dr, stride_dk, drop_rows,
                                            HAS_DROPOUT, BLOCK_R, DOT_PRECISION)
    if HAS_DROPOUT:
        keep = _keep(seed, offs_m, pid_k * BLOCK_K, K, dropout_p, BLOCK_M, BLOCK_K)
        acc += tl.where(keep, acc_drop * (1.0 / (1.0 - dropout_p)), 0.0)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok & (offs_k[None, :] < K))


@triton.jit
def _rank_grad_tile(a_ptr, b_ptr, s_ptr, out_ptr, M, C, R, grad_rows, c_tile, r_tile,
                    stride_am, stride_ac, stride_bm, stride_br, stride_oc, stride_or,
                    seed, dropout_p, drop_rows, HAS_DROPOUT: tl.constexpr,
                    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c, r] = sum_m a'[m, c] * b[m, r] * s[r] for one (BLOCK_C, BLOCK_R) tile, rank
    columns r < grad_rows only (the rest are stored as zeros, with no M-loop).

    dU: a = dy, b = t (C = N). dD.T: a = x with dropout on the columns r < drop_rows,
    b = g (C = K, out strides transposed).
    """
    offs_c = c_tile.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    r0 = r_tile * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    live = offs_r < grad_rows
    s = tl.load(s_ptr + offs_r, mask=live, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    if r0 < grad_rows:
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_c[None, :] * stride_ac,
                        mask=(offs_m[:, None] < M) & (offs_c[None, :] < C), other=0.0)
            b = tl.load(b_ptr + offs_m[:, None] * stride_bm + offs_r[None, :] * stride_br,
                        mask=(offs_m[:, None] < M) & live[None, :], other=0.0)
            bs = (b * s[None, :]).to(a.dtype)
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
                        seed, dropout_p, 0, False, BLOCK_R, DOT_PRECISION, BLOCK_M, BLOCK_C)
    elif pid < tiles_u + tiles_d:
        pid_d = pid - tiles_u
        _rank_grad_tile(x_ptr, g_ptr, s_ptr, dd_ptr, M, K, R, grad_rows,
                        pid_d // tiles_r, pid_d % tiles_r,
                        stride_xm, stride_xk, stride_gm, stride_gr, stride_ddk, stride_ddr,
                        seed, dropout_p, drop_rows, HAS_DROPOUT, BLOCK_R, DOT_PRECISION,
                        BLOCK_M, BLOCK_C)
    elif NEED_DS:
        offs_r = (pid - tiles_u - tiles_d) * BLOCK_R + tl.arange(0, BLOCK_R)
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
    tile, see ``_rows_for``). Row decoder: fp32 accumulator plus decoded weight elements at
    most ``NF4_ROWS_ELEMENTS`` per thread (drops the 128 x 256 x 64 tile), and in dx no
    128 x 128 weight tile whose row segments span two scale blocks (8 bytes of spill on
    sm_80 at 8 warps).
    """
    if not a.get("NF4"):
        return True
    threads = 32 * cfg.num_warps
    if not a["NF4_ROWS"]:
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
    return ok and (not a["FUSE_DOWN"] or a["R"] <= fused_rank_limit(b["BLOCK_N"]))


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
                   for bm, bc, w, s in [(16, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3),
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
    (timing means nothing there) the pruned config with the fewest programs runs: the
    widest tiles, hence the fewest re-reads.
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
        programs first (never empty: falls back to the smallest-footprint config)."""
        configs = self.configs if configs is None else configs
        fit = [c for c in configs
               if self.fits(c, args) and self.smem_bytes(c, args) <= limit]
        if not fit:
            fit = [min(configs, key=lambda c: self.smem_bytes(c, args))]
        return sorted(fit, key=lambda c: math.prod(self.grid({**args, **c.kwargs})))

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


FWD = TunedKernel(
    _fwd_kernel, _gemm_configs("BLOCK_N", "BLOCK_K"),
    key=["M", "N", "K", "R", "HAS_BIAS", "FUSE_DOWN", "STORE_T", "HAS_DROPOUT", "BLOCK_R",
         "NF4", "NF4_ROWS"],
    fits=_fwd_fits, smem_bytes=_fwd_smem,
    grid=lambda a: (triton.cdiv(a["M"], a["BLOCK_M"]) * triton.cdiv(a["N"], a["BLOCK_N"]),))
PROJ = TunedKernel(
    _proj_kernel, _PROJ_CONFIGS, key=["M", "K", "R", "HAS_DROPOUT", "BLOCK_R"],
    fits=_proj_fits, smem_bytes=_proj_smem,
    grid=lambda a: (triton.cdiv(a["M"], a["BLOCK_M"]) * triton.cdiv(a["R"], a["BLOCK_R"]),))
DX = TunedKernel(
    _dx_kernel, _gemm_configs("BLOCK_K", "BLOCK_N"),
    key=["M", "N", "K", "R", "FUSE_UP", "STORE_G", "HAS_DROPOUT", "BLOCK_R", "NF4", "NF4_ROWS"],
    fits=_dx_fits, smem_bytes=_dx_smem,
    grid=lambda a: (triton.cdiv(a["M"], a["BLOCK_M"]) * triton.cdiv(a["K"], a["BLOCK_K"]),))


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


def _rank_block(R: int, cap: int) -> int:
    return min(cap, _pow2(R))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch: TF32 tensor cores only if ``allow_tf32`` (default: IEEE fp32)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


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
    Dropout is active iff ``dropout_p > 0`` and ``drop_rows > 0``. Returns ``(y, t)``: y (M, N) in x's dtype; t = x' @ D.T (M, R) fp32
    if ``save_t`` else an empty (0, R) tensor."""
    M, K = x.shape
    N, R = weight.shape[0], down.shape[0]
    has_dropout = dropout_p > 0 and drop_rows > 0
    fused = use_fused_path(M, N, K, R, has_dropout) and R <= _fused_rank_cap(weight)
    y = _empty((M, N), x.dtype, x.device)
    t = _empty((M, R), torch.float32, x.device) if (save_t or not fused) else y
    drop = dict(seed=int(seed), dropout_p=float(dropout_p),
                drop_rows=int(drop_rows) if has_dropout else 0,
                DOT_PRECISION=_dot_precision(x.dtype))
    if not fused:
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
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        HAS_BIAS=bias is not None, FUSE_DOWN=fused, STORE_T=fused and save_t,
        HAS_DROPOUT=fused and has_dropout,  # split: t arrives with dropout applied
        BLOCK_R=_rank_block(R, 64 if fused else 32), **drop)
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
                DOT_PRECISION=_dot_precision(x.dtype))
    # dx draws each mask element once
    fused = need_dx and use_fused_path(M, K, N, R) and R <= _fused_rank_cap(weight)
    need_g_buffer = need_g or (need_dx and not fused)
    g = _empty((M, R), torch.float32, x.device) if need_g_buffer else x.new_empty(0)

    if g.numel() and not fused:  # g = dy @ U, once
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
           stride_dxm=dx.stride(0), stride_dxk=dx.stride(1),
           FUSE_UP=fused, STORE_G=fused and need_g, HAS_DROPOUT=has_dropout,
           BLOCK_R=_rank_block(R, 64 if fused else 32), **drop)

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
