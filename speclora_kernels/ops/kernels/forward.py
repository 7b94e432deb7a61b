"""Forward kernels: ``y = x @ W.T + bias + ((x' @ D.T) * s) @ U.T`` and the projection.

- ``fwd_kernel``: one (BLOCK_M, BLOCK_N) tile of y per program (or, SEGMENTED, a row block
  and a segment of consecutive column tiles). With FUSE_DOWN its K-loop feeds the same x
  tile to ``x @ W.T`` and to ``t = x' @ D.T`` (register-resident, BLOCK_R >= R); otherwise
  t comes from ``proj_kernel``. The epilogue adds ``t @ (s * U).T`` and bias and stores y
  once; with ROW_SCALE (a mixed-adapter batch) s is a table and each row takes its own
  row of it: ``(t * S[idx]) @ U.T``.
- ``proj_kernel``: ``t = x' @ D.T`` (forward) or ``g = dy @ U`` (backward), fp32.

The base weight is dense or NF4 (decoded tile by tile in registers, ``load_weight_tile``).
"""
import triton
import triton.language as tl

from .common import (
    down_step,
    dropout_rescale,
    grouped_tile,
    load_weight_tile,
    pad_ranks,
    scale_rows,
    scaled_up_step,
    up_step,
    widen_index,
)


@triton.jit
def _fwd_mainloop(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr, d_ptr,
                  t, offs_m, offs_n, offs_r, M, N, K, R, k_lo, k_hi, stride_xm, stride_xk,
                  stride_wn, stride_wk, stride_dr, stride_dk, seed, dropout_p, dropout_rows,
                  DOWN: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, NF4: tl.constexpr, NF4_ROWS: tl.constexpr,
                  NF4_BLOCKSIZE: tl.constexpr, NF4_DOUBLE_QUANT: tl.constexpr,
                  NF4_NESTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, IDX64: tl.constexpr):
    """K-loop of one output tile over columns ``[k_lo, k_hi)`` (all of K, or a split-K
    slice; ``k_lo`` a multiple of BLOCK_K): returns ``(x @ W[offs_n].T, t)``; with DOWN the
    same x tiles also accumulate ``t += x' @ D.T`` (BLOCK_R >= R), else t passes through."""
    row_ok = offs_m[:, None] < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + widen_index(tl.arange(0, BLOCK_K), IDX64)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=row_ok & (offs_k[None, :] < K), other=0.0)
        w = load_weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
                             offs_n, offs_k, k0, N, K, stride_wn, stride_wk, True, NF4,
                             NF4_ROWS, NF4_BLOCKSIZE, NF4_DOUBLE_QUANT, NF4_NESTED, BLOCK_N,
                             BLOCK_K, x_ptr.dtype.element_ty)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if DOWN:
            d = tl.load(d_ptr + offs_r[None, :] * stride_dr + offs_k[:, None] * stride_dk,
                        mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0).to(x.dtype)
            t = down_step(t, x, d, offs_m, k0, offs_r, 0, K, R, seed, dropout_p, dropout_rows,
                          HAS_DROPOUT, BLOCK_R, DOT_PRECISION, BLOCK_M, BLOCK_K)
    return acc, t


@triton.jit
def _fwd_epilogue(acc, t, t_ptr, bias_ptr, s_ptr, u_ptr, y_ptr, offs_m, offs_n, offs_r,
                  M, N, R, stride_un, stride_ur, stride_tm, stride_tr, stride_ym, stride_yn,
                  HAS_BIAS: tl.constexpr, FUSE_DOWN: tl.constexpr, ROW_SCALE: tl.constexpr,
                  BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """y tile = acc + t @ (s * U[offs_n]).T + bias, stored once. t: the register-resident
    projection (FUSE_DOWN), else read from ``t_ptr`` in rank chunks of BLOCK_R. ROW_SCALE (a
    mixed-adapter batch): t arrives scaled per row (``scale_rows``, in registers or by
    ``proj_kernel``), so only U's tile is loaded here: ``acc + t @ U.T``."""
    row_ok = offs_m[:, None] < M
    OP = y_ptr.dtype.element_ty
    if FUSE_DOWN:
        if ROW_SCALE:
            acc = scaled_up_step(acc, pad_ranks(t, offs_r, R), offs_r, offs_n, u_ptr, R, N,
                                 stride_un, stride_ur, DOT_PRECISION, OP)
        else:
            acc = up_step(acc, pad_ranks(t, offs_r, R), offs_r, offs_n, s_ptr, u_ptr, R, N,
                          stride_un, stride_ur, DOT_PRECISION, OP)
    else:
        for r0 in range(0, R, BLOCK_R):
            offs_rc = r0 + offs_r
            tc = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_rc[None, :] * stride_tr,
                         mask=row_ok & (offs_rc[None, :] < R), other=0.0)
            if ROW_SCALE:
                acc = scaled_up_step(acc, tc, offs_rc, offs_n, u_ptr, R, N, stride_un, stride_ur,
                                     DOT_PRECISION, OP)
            else:
                acc = up_step(acc, tc, offs_rc, offs_n, s_ptr, u_ptr, R, N, stride_un, stride_ur,
                              DOT_PRECISION, OP)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(OP), mask=row_ok & (offs_n[None, :] < N))


@triton.jit
def fwd_kernel(
    x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
    bias_ptr, d_ptr, s_ptr, idx_ptr, u_ptr, t_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_dr, stride_dk,
    stride_un, stride_ur, stride_tm, stride_tr, stride_ym, stride_yn, stride_sa,
    seed_ptr, dropout_p, dropout_rows, n_segments,
    HAS_BIAS: tl.constexpr, FUSE_DOWN: tl.constexpr, SEGMENTED: tl.constexpr,
    STORE_T: tl.constexpr, HAS_DROPOUT: tl.constexpr, ROW_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr,
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
    (fp32, from proj_kernel) is read in rank chunks of BLOCK_R in the epilogue. ROW_SCALE:
    a mixed-adapter batch, s a table (stride ``stride_sa``) and row i of t scaled by row
    ``idx[i]`` of it (``scale_rows``: here for a register-resident t, after STORE_T; by
    ``proj_kernel`` on the split path).
    """
    seed = tl.load(seed_ptr)  # a device tensor: CUDA-graph replays draw new masks
    tiles_n = tl.cdiv(N, BLOCK_N)
    if SEGMENTED:
        seg_tiles = tl.cdiv(tiles_n, n_segments)
    else:
        seg_tiles = 1
    pid_m, pid_s = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M),
                                 tl.cdiv(tiles_n, seg_tiles), GROUP_M)
    first = pid_s * seg_tiles
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = first.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = widen_index(tl.arange(0, BLOCK_R), IDX64)

    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc, t = _fwd_mainloop(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
                           d_ptr, t, offs_m, offs_n, offs_r, M, N, K, R, 0, K, stride_xm, stride_xk,
                           stride_wn, stride_wk, stride_dr, stride_dk, seed, dropout_p,
                           dropout_rows, FUSE_DOWN, HAS_DROPOUT, BLOCK_R, DOT_PRECISION, NF4,
                           NF4_ROWS, NF4_BLOCKSIZE, NF4_DOUBLE_QUANT, NF4_NESTED, BLOCK_M, BLOCK_N,
                           BLOCK_K, IDX64)
    if FUSE_DOWN:
        if HAS_DROPOUT:
            t = dropout_rescale(t, offs_r, dropout_p, dropout_rows)
        if STORE_T:
            if pid_s == 0:  # every column tile holds the same t; the first one saves it
                tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr, t,
                         mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
        if ROW_SCALE:  # once for the whole segment
            t = scale_rows(t, idx_ptr, s_ptr, offs_m, offs_r, M, R, stride_sa)
    _fwd_epilogue(acc, t, t_ptr, bias_ptr, s_ptr, u_ptr, y_ptr, offs_m, offs_n, offs_r, M, N,
                  R, stride_un, stride_ur, stride_tm, stride_tr, stride_ym, stride_yn,
                  HAS_BIAS, FUSE_DOWN, ROW_SCALE, BLOCK_R, DOT_PRECISION)
    if SEGMENTED:  # the rest of the segment: plain GEMM tiles, t from registers
        for _ in range(first + 1, tl.minimum(first + seg_tiles, tiles_n)):
            offs_n += BLOCK_N
            acc, t = _fwd_mainloop(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                   levels_ptr, d_ptr, t, offs_m, offs_n, offs_r, M, N, K, R, 0, K,
                                   stride_xm, stride_xk, stride_wn, stride_wk, stride_dr, stride_dk,
                                   seed, dropout_p, dropout_rows, False, False, BLOCK_R,
                                   DOT_PRECISION, NF4, NF4_ROWS, NF4_BLOCKSIZE, NF4_DOUBLE_QUANT,
                                   NF4_NESTED, BLOCK_M, BLOCK_N, BLOCK_K, IDX64)
            _fwd_epilogue(acc, t, t_ptr, bias_ptr, s_ptr, u_ptr, y_ptr, offs_m, offs_n, offs_r,
                          M, N, R, stride_un, stride_ur, stride_tm, stride_tr, stride_ym,
                          stride_yn, HAS_BIAS, FUSE_DOWN, ROW_SCALE, BLOCK_R, DOT_PRECISION)


@triton.jit
def fwd_splitk_kernel(
    x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
    bias_ptr, d_ptr, s_ptr, idx_ptr, u_ptr, t_ptr, y_ptr, part_ptr, count_ptr,
    M, N, K, R, k_split, n_splits, part_rows,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_dr, stride_dk,
    stride_un, stride_ur, stride_tm, stride_tr, stride_ym, stride_yn, stride_sa,
    seed_ptr, dropout_p, dropout_rows,
    HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ROW_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, IDX64: tl.constexpr,
    NF4: tl.constexpr, NF4_ROWS: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr,
    NF4_DOUBLE_QUANT: tl.constexpr, NF4_NESTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The fused forward with K split into ``n_splits`` slices of ``k_split`` columns, for
    decode: a (BLOCK_M, BLOCK_N) tile of y is computed by ``n_splits`` programs (adjacent
    ids), so a narrow layer still streams W with every SM.

    Each program accumulates its slice's ``x @ W.T`` and ``t = x' @ D.T`` (the same x tiles)
    and stores both partials (fp32, ``part_rows`` = min(M, BLOCK_M) rows: a decode call's
    scratch is as small as its output) in ``part_ptr``; then it counts
    itself in ``count_ptr[tile]``. The program that arrives last sums the tile's partials in
    slice order 0, 1, ... (a fixed order, whoever arrives last: deterministic), applies the
    dropout rescale, ``t @ (s * U).T`` and bias, stores y, and resets the counter for the
    next launch. The counter decides only who reduces, never the order of a sum.
    ROW_SCALE: a mixed-adapter batch, as in ``fwd_kernel``.
    """
    seed = tl.load(seed_ptr)  # a device tensor: CUDA-graph replays draw new masks
    pid = tl.program_id(0)
    tile, split = pid // n_splits, pid % n_splits
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = tile // tiles_n, tile % tiles_n
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = widen_index(tl.arange(0, BLOCK_R), IDX64)
    k_lo = split * k_split
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc, t = _fwd_mainloop(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                           levels_ptr, d_ptr, t, offs_m, offs_n, offs_r, M, N, K, R, k_lo,
                           tl.minimum(k_lo + k_split, K), stride_xm, stride_xk, stride_wn,
                           stride_wk, stride_dr, stride_dk, seed, dropout_p, dropout_rows, True,
                           HAS_DROPOUT, BLOCK_R, DOT_PRECISION, NF4, NF4_ROWS, NF4_BLOCKSIZE,
                           NF4_DOUBLE_QUANT, NF4_NESTED, BLOCK_M, BLOCK_N, BLOCK_K, IDX64)
    # partials of tile ``tile``, slice ``s``: (part_rows, BLOCK_N) of y, then (part_rows,
    # BLOCK_R) of t; rows at or past M (all past part_rows) are never stored or loaded
    PART = part_rows * (BLOCK_N + BLOCK_R)
    rows = tl.arange(0, BLOCK_M)[:, None]
    row_ok = offs_m[:, None] < M
    y_at = rows * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    t_at = part_rows * BLOCK_N + rows * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
    mine = part_ptr + pid.to(tl.int64) * PART
    tl.store(mine + y_at, acc, mask=row_ok)
    tl.store(mine + t_at, t, mask=row_ok)
    tl.debug_barrier()  # every thread's partials are written before the count says so
    if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == n_splits - 1:
        tl.atomic_xchg(count_ptr + tile, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        first = part_ptr + (tile * n_splits).to(tl.int64) * PART
        for s_i in range(0, n_splits):  # slice order: the same sum whoever arrived last
            acc += tl.load(first + s_i * PART + y_at, mask=row_ok, other=0.0,
                           cache_modifier=".cg")
            t += tl.load(first + s_i * PART + t_at, mask=row_ok, other=0.0,
                         cache_modifier=".cg")
        if HAS_DROPOUT:
            t = dropout_rescale(t, offs_r, dropout_p, dropout_rows)
        if STORE_T:
            if pid_n == 0:
                tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr, t,
                         mask=row_ok & (offs_r[None, :] < R))
        if ROW_SCALE:
            t = scale_rows(t, idx_ptr, s_ptr, offs_m, offs_r, M, R, stride_sa)
        _fwd_epilogue(acc, t, t_ptr, bias_ptr, s_ptr, u_ptr, y_ptr, offs_m, offs_n, offs_r, M,
                      N, R, stride_un, stride_ur, stride_tm, stride_tr, stride_ym, stride_yn,
                      HAS_BIAS, True, ROW_SCALE, BLOCK_R, DOT_PRECISION)


@triton.jit
def proj_kernel(
    a_ptr, b_ptr, out_ptr, s_ptr, idx_ptr,
    M, K, R,
    stride_am, stride_ak, stride_br, stride_bk, stride_om, stride_or, stride_sa,
    seed_ptr, dropout_p, dropout_rows,
    HAS_DROPOUT: tl.constexpr, ROW_SCALE: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = a' @ b.T, (M, R) in fp32: t = x' @ D.T (forward) or g = dy @ U (backward,
    b = U.T). The rank tiles of one row block are adjacent program ids, so a re-read of
    the a rows (R > BLOCK_R) hits L2. ROW_SCALE (a mixed-adapter batch): row i of t scaled
    by row ``idx[i]`` of the table ``s_ptr`` (for ``fwd_kernel``'s split path)."""
    seed = tl.load(seed_ptr)  # a device tensor: CUDA-graph replays draw new masks
    pid = tl.program_id(0)
    tiles_r = tl.cdiv(R, BLOCK_R)
    pid_m, pid_r = pid // tiles_r, pid % tiles_r
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    r0 = pid_r * BLOCK_R
    offs_r = r0 + widen_index(tl.arange(0, BLOCK_R), IDX64)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + widen_index(tl.arange(0, BLOCK_K), IDX64)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_r[None, :] * stride_br + offs_k[:, None] * stride_bk,
                    mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0).to(a.dtype)
        acc = down_step(acc, a, b, offs_m, k0, offs_r, r0, K, R, seed, dropout_p, dropout_rows,
                         HAS_DROPOUT, BLOCK_R, DOT_PRECISION, BLOCK_M, BLOCK_K)
    if HAS_DROPOUT:
        acc = dropout_rescale(acc, offs_r, dropout_p, dropout_rows)
    if ROW_SCALE:
        acc = scale_rows(acc, idx_ptr, s_ptr, offs_m, offs_r, M, R, stride_sa)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or, acc,
             mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))

