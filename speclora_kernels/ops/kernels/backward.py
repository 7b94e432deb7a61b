"""Backward kernels, with g = dy @ U (M x R) and gs = g * s:

- ``dx_kernel``: ``dx = dy @ W + keep/(1-p) * (gs_drop @ D) + gs_clean @ D`` in one pass;
  g accumulates in its N-loop (FUSE_UP) or comes from ``proj_kernel``.
- ``factor_grad_kernel``: ``dU = dy.T @ (t * s)``, ``dD = gs.T @ x'``, ``ds = sum_m g * t`` in
  one launch, only for the factors that need a gradient and only for rank columns below
  ``grad_rows`` (frozen rows get zeros with no work); at large M each output tile's
  reduction is split over slices of rows (summed in a fixed order).
"""
import triton
import triton.language as tl

from .common import (
    down_back_step,
    down_step,
    dropout_rescale,
    grouped_tile,
    keep_mask,
    load_weight_tile,
    pad_ranks,
    split_total,
    widen_index,
)


@triton.jit
def _dx_mainloop(dy_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr, u_ptr,
                 g, offs_m, offs_k, k0, offs_r, M, N, K, R, stride_dym, stride_dyn, stride_wn,
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
        offs_n = n0 + widen_index(tl.arange(0, BLOCK_N), IDX64)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=row_ok & (offs_n[None, :] < N), other=0.0)
        w = load_weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
                             offs_n, offs_k, k0, N, K, stride_wn, stride_wk, False, NF4, NF4_ROWS,
                              NF4_BLOCKSIZE, NF4_DOUBLE_QUANT, NF4_NESTED, BLOCK_N, BLOCK_K,
                              dy_ptr.dtype.element_ty)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        if UP:
            u = tl.load(u_ptr + offs_n[:, None] * stride_un + offs_r[None, :] * stride_ur,
                        mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0).to(dy.dtype)
            g = down_step(g, dy, u, offs_m, n0, offs_r, 0, N, R, 0, 0.0, 0, False,
                           BLOCK_R, DOT_PRECISION, BLOCK_M, BLOCK_N)
    return acc, g


@triton.jit
def _dx_epilogue(acc, g, g_ptr, s_ptr, d_ptr, dx_ptr, offs_m, offs_k, k0, offs_r, M, K, R,
                 stride_gm, stride_gr, stride_dr, stride_dk, stride_dxm, stride_dxk,
                 seed, dropout_p, dropout_rows, FUSE_UP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """dx tile = acc + keep/(1-p) * (gs_drop @ D) + gs_clean @ D, stored once. g: the
    register-resident ``dy @ U`` (FUSE_UP), else read from ``g_ptr`` in rank chunks."""
    row_ok = offs_m[:, None] < M
    acc_drop = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if FUSE_UP:
        acc, acc_drop = down_back_step(acc, acc_drop, pad_ranks(g, offs_r, R), offs_r,
                                       offs_k, 0, s_ptr, d_ptr, R, K, stride_dr, stride_dk,
                                       dropout_rows, HAS_DROPOUT, BLOCK_R, DOT_PRECISION,
                                       dx_ptr.dtype.element_ty)
    else:
        for r0 in range(0, R, BLOCK_R):
            offs_rc = r0 + offs_r
            gc = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_rc[None, :] * stride_gr,
                         mask=row_ok & (offs_rc[None, :] < R), other=0.0)
            acc, acc_drop = down_back_step(acc, acc_drop, gc, offs_rc, offs_k, r0, s_ptr,
                                            d_ptr, R, K, stride_dr, stride_dk, dropout_rows,
                                            HAS_DROPOUT, BLOCK_R, DOT_PRECISION,
                                            dx_ptr.dtype.element_ty)
    if HAS_DROPOUT:
        keep = keep_mask(seed, offs_m, k0, K, dropout_p, BLOCK_M, BLOCK_K)
        acc += tl.where(keep, acc_drop * (1.0 / (1.0 - dropout_p)), 0.0)
    tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok & (offs_k[None, :] < K))


@triton.jit
def dx_kernel(
    dy_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
    d_ptr, s_ptr, u_ptr, g_ptr, dx_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dr, stride_dk,
    stride_un, stride_ur, stride_gm, stride_gr, stride_dxm, stride_dxk,
    seed_ptr, dropout_p, dropout_rows, n_segments,
    FUSE_UP: tl.constexpr, SEGMENTED: tl.constexpr, STORE_G: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    IDX64: tl.constexpr,
    NF4: tl.constexpr, NF4_ROWS: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr,
    NF4_DOUBLE_QUANT: tl.constexpr, NF4_NESTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx = dy @ W + keep/(1-p) * (gs_drop @ D) + gs_clean @ D for one (BLOCK_M, BLOCK_K)
    tile of dx, or (SEGMENTED) a row block and a segment of consecutive column tiles, as in
    ``fwd_kernel``; the reduction runs over N (out features).

    FUSE_UP: g = dy @ U accumulates from the dy tiles of the first tile's N-loop (BLOCK_R >=
    R); STORE_G keeps it for the factor gradients. Otherwise g (fp32) is read in rank chunks.
    """
    seed = tl.load(seed_ptr)  # a device tensor: CUDA-graph replays draw new masks
    tiles_k = tl.cdiv(K, BLOCK_K)
    if SEGMENTED:
        seg_tiles = tl.cdiv(tiles_k, n_segments)
    else:
        seg_tiles = 1
    pid_m, pid_s = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M),
                                 tl.cdiv(tiles_k, seg_tiles), GROUP_M)
    first = pid_s * seg_tiles
    k0 = first * BLOCK_K
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = first.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = widen_index(tl.arange(0, BLOCK_R), IDX64)

    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc, g = _dx_mainloop(dy_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
                          u_ptr, g, offs_m, offs_k, k0, offs_r, M, N, K, R, stride_dym, stride_dyn,
                          stride_wn, stride_wk, stride_un, stride_ur, FUSE_UP, BLOCK_R,
                          DOT_PRECISION, NF4, NF4_ROWS, NF4_BLOCKSIZE, NF4_DOUBLE_QUANT, NF4_NESTED,
                          BLOCK_M, BLOCK_K, BLOCK_N, IDX64)
    if STORE_G:
        if pid_s == 0:  # every K tile holds the same g; the first one saves it
            tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr, g,
                     mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
    _dx_epilogue(acc, g, g_ptr, s_ptr, d_ptr, dx_ptr, offs_m, offs_k, k0, offs_r, M, K, R,
                 stride_gm, stride_gr, stride_dr, stride_dk, stride_dxm, stride_dxk, seed,
                 dropout_p, dropout_rows, FUSE_UP, HAS_DROPOUT, BLOCK_R, DOT_PRECISION, BLOCK_M,
                 BLOCK_K)
    if SEGMENTED:  # the rest of the segment: plain GEMM tiles, g from registers
        for _ in range(first + 1, tl.minimum(first + seg_tiles, tiles_k)):
            k0 += BLOCK_K
            offs_k += BLOCK_K
            acc, g = _dx_mainloop(dy_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                  levels_ptr, u_ptr, g, offs_m, offs_k, k0, offs_r, M, N, K, R,
                                  stride_dym, stride_dyn, stride_wn, stride_wk, stride_un,
                                  stride_ur, False, BLOCK_R, DOT_PRECISION, NF4, NF4_ROWS,
                                  NF4_BLOCKSIZE, NF4_DOUBLE_QUANT, NF4_NESTED, BLOCK_M, BLOCK_K,
                                  BLOCK_N, IDX64)
            _dx_epilogue(acc, g, g_ptr, s_ptr, d_ptr, dx_ptr, offs_m, offs_k, k0, offs_r, M, K,
                         R, stride_gm, stride_gr, stride_dr, stride_dk, stride_dxm,
                         stride_dxk, seed, dropout_p, dropout_rows, FUSE_UP, HAS_DROPOUT, BLOCK_R,
                         DOT_PRECISION, BLOCK_M, BLOCK_K)


@triton.jit
def _rank_grad_tile(a_ptr, b_ptr, s_ptr, out_ptr, M, C, R, grad_rows, c_tile, r_tile, m_lo, m_hi,
                    stride_am, stride_ac, stride_bm, stride_br, stride_oc, stride_or,
                    seed, dropout_p, dropout_rows, part_ptr, count_ptr, out_index, m_part,
                    n_msplits, SPLIT_M: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    SCALE_AFTER: tl.constexpr, BLOCK_R: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                    IDX64: tl.constexpr):
    """out[c, r] = sum_m a'[m, c] * b[m, r] * s[r] for one (BLOCK_C, BLOCK_R) tile, rank
    columns r < grad_rows only (the rest are stored as zeros, with no M-loop); rows
    ``[m_lo, m_hi)``: all of M, or with SPLIT_M one of ``n_msplits`` slices, whose partial
    sums the last program to arrive adds up in slice order (``split_total``).

    dU: a = dy, b = t (C = N). dD.T: a = x with dropout on the columns r < dropout_rows,
    b = g (C = K, out strides transposed).

    ``b * s`` meets ``a`` in a's dtype. For dU (SCALE_AFTER) t is in range but t * s need
    not be (a tiny s against a huge U), so a finite s scales the fp32 result after the
    M-loop instead (s[r] scales a whole column: exact); a non-finite s stays inside so
    Inf/NaN land where the reference puts them. For dD, g * s is what stays in range.
    """
    offs_c = c_tile.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    r0 = r_tile * BLOCK_R
    offs_r = r0 + widen_index(tl.arange(0, BLOCK_R), IDX64)
    live = offs_r < grad_rows
    s = tl.load(s_ptr + offs_r, mask=live, other=0.0).to(tl.float32)
    s_inner = s
    if SCALE_AFTER:
        finite = (s == s) & (tl.abs(s) < float("inf"))
        s_inner = tl.where(finite, 1.0, s)
        s_outer = tl.where(finite, s, 1.0)

    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    if r0 < grad_rows:
        for m0 in range(m_lo, m_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            rows = offs_m < m_hi
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_c[None, :] * stride_ac,
                        mask=rows[:, None] & (offs_c[None, :] < C), other=0.0)
            b = tl.load(b_ptr + offs_m[:, None] * stride_bm + offs_r[None, :] * stride_br,
                        mask=rows[:, None] & live[None, :], other=0.0)
            bs = (b * s_inner[None, :]).to(a.dtype)
            if HAS_DROPOUT:
                if r0 < dropout_rows:
                    keep = keep_mask(seed, offs_m, c_tile * BLOCK_C, C, dropout_p, BLOCK_M,
                                     BLOCK_C)
                    kept = tl.where(keep, a, 0.0)
                    acc = tl.dot(tl.trans(kept),
                                 tl.where(offs_r[None, :] < dropout_rows, bs, 0.0), acc,
                                 input_precision=DOT_PRECISION)
                if dropout_rows < tl.minimum(r0 + BLOCK_R, R):
                    acc = tl.dot(tl.trans(a), tl.where(offs_r[None, :] >= dropout_rows, bs, 0.0),
                                 acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(tl.trans(a), bs, acc, input_precision=DOT_PRECISION)
    last = True
    if SPLIT_M:
        offs = tl.arange(0, BLOCK_C)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
        last, acc = split_total(acc, offs, part_ptr, count_ptr, out_index, m_part, n_msplits)
    if last:
        if SCALE_AFTER:
            acc = acc * s_outer[None, :]
        if HAS_DROPOUT:
            acc = dropout_rescale(acc, offs_r, dropout_p, dropout_rows)
        tl.store(out_ptr + offs_c[:, None] * stride_oc + offs_r[None, :] * stride_or,
                 acc.to(out_ptr.dtype.element_ty),
                 mask=(offs_c[:, None] < C) & (offs_r[None, :] < R))


@triton.jit
def factor_grad_kernel(
    dy_ptr, x_ptr, t_ptr, g_ptr, s_ptr, du_ptr, dd_ptr, ds_ptr, part_ptr, count_ptr,
    M, N, K, R, grad_rows, m_split, n_msplits,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_tm, stride_tr, stride_gm, stride_gr,
    stride_dun, stride_dur, stride_ddr, stride_ddk,
    seed_ptr, dropout_p, dropout_rows,
    NEED_DU: tl.constexpr, NEED_DD: tl.constexpr, NEED_DS: tl.constexpr,
    SPLIT_M: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dU = dy.T @ (t * s), dD = (g * s).T @ x', ds = sum_m g * t in one launch.

    Outputs are laid out as [dU tiles | dD tiles | ds tiles], each part present only if that
    gradient is needed; dU and dD tiles are (BLOCK_C, BLOCK_R) and reduce over M. With
    SPLIT_M each output tile is reduced by ``n_msplits`` programs (adjacent ids), each over
    ``m_split`` rows, so that large M keeps every SM busy; their fp32 partials are summed in
    slice order by the last to arrive (deterministic).
    """
    seed = tl.load(seed_ptr)  # a device tensor: CUDA-graph replays draw new masks
    pid = tl.program_id(0)
    out_index, m_part = pid // n_msplits, pid % n_msplits
    m_lo = m_part * m_split
    m_hi = tl.minimum(m_lo + m_split, M)
    tiles_r = tl.cdiv(R, BLOCK_R)
    tiles_u = 0
    tiles_d = 0
    if NEED_DU:
        tiles_u = tl.cdiv(N, BLOCK_C) * tiles_r
    if NEED_DD:
        tiles_d = tl.cdiv(K, BLOCK_C) * tiles_r
    if out_index < tiles_u:
        _rank_grad_tile(dy_ptr, t_ptr, s_ptr, du_ptr, M, N, R, grad_rows,
                        out_index // tiles_r, out_index % tiles_r, m_lo, m_hi,
                        stride_dym, stride_dyn, stride_tm, stride_tr, stride_dun, stride_dur,
                        seed, dropout_p, 0, part_ptr, count_ptr, out_index, m_part, n_msplits,
                        SPLIT_M, False, True, BLOCK_R, DOT_PRECISION, BLOCK_M, BLOCK_C, IDX64)
    elif out_index < tiles_u + tiles_d:
        pid_d = out_index - tiles_u
        _rank_grad_tile(x_ptr, g_ptr, s_ptr, dd_ptr, M, K, R, grad_rows,
                        pid_d // tiles_r, pid_d % tiles_r, m_lo, m_hi,
                        stride_xm, stride_xk, stride_gm, stride_gr, stride_ddk, stride_ddr,
                        seed, dropout_p, dropout_rows, part_ptr, count_ptr, out_index, m_part,
                        n_msplits, SPLIT_M, HAS_DROPOUT, False, BLOCK_R, DOT_PRECISION, BLOCK_M,
                        BLOCK_C, IDX64)
    elif NEED_DS:
        offs_r = (out_index - tiles_u - tiles_d) * BLOCK_R + widen_index(tl.arange(0, BLOCK_R),
                                                                        IDX64)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for m0 in range(m_lo, m_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            mask = (offs_m[:, None] < m_hi) & (offs_r[None, :] < R)
            g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                        mask=mask, other=0.0)
            t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                        mask=mask, other=0.0)
            acc += tl.sum(g * t, axis=0)
        last = True
        if SPLIT_M:
            last, acc = split_total(acc, tl.arange(0, BLOCK_R), part_ptr, count_ptr,
                                    out_index, m_part, n_msplits)
        if last:
            tl.store(ds_ptr + offs_r, acc.to(ds_ptr.dtype.element_ty), mask=offs_r < R)
