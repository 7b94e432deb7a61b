"""Triton device functions shared by the adapter kernels (``forward.py``, ``backward.py``).

Shapes: x (M, K), W (N, K), D (R, K), s (R,), U (N, R), y (M, N); the first
``dropout_rows`` rows of D see the dropped-out input ``x'`` (keep-mask from
``speclora_kernels.dropout``, regenerated wherever needed, never stored). All products
accumulate in fp32.
"""
import triton
import triton.language as tl

from ...quant.triton_nf4 import nf4_dequant_rows, nf4_dequant_span


@triton.jit
def load_weight_tile(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr, offs_n,
                     offs_k, k0, N, K, stride_wn, stride_wk, TRANSPOSED: tl.constexpr,
                     NF4: tl.constexpr, NF4_ROWS: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr,
                     NF4_DOUBLE_QUANT: tl.constexpr, NF4_NESTED: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Base-weight tile W[offs_n][:, offs_k] (1-D indices; ``offs_k`` starts at ``k0``) as
    (BLOCK_N, BLOCK_K), or its transpose (BLOCK_K, BLOCK_N) for ``x @ W.T``; zeros outside
    (N, K). The only place a kernel touches the base weight.

    Dense: a strided load. NF4 (``w_ptr`` the packed codes, the scale pointers and the level
    table as in ``quant.triton_nf4``): decoded in registers to ``OUT_DTYPE`` (the activations'
    dtype), bit-identical to bitsandbytes' dequantize rounded to that dtype.
    """
    if NF4:
        if NF4_ROWS:
            w = nf4_dequant_rows(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
                                 offs_n, k0, N, K, BLOCK_N, BLOCK_K, NF4_BLOCKSIZE,
                                 NF4_DOUBLE_QUANT, NF4_NESTED, OUT_DTYPE)
        else:
            w = nf4_dequant_span(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
                                 offs_n, k0, N, K, BLOCK_N, BLOCK_K, NF4_BLOCKSIZE,
                                 NF4_DOUBLE_QUANT, NF4_NESTED, OUT_DTYPE)
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
def grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile) of a (tiles_m, tiles_n) grid, GROUP_M row
    tiles at a time, so that the programs resident together reuse the same column tiles
    of the weight from L2."""
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def widen_index(offs, IDX64: tl.constexpr):
    """An index vector, widened to int64 when the launcher found a tensor whose offsets
    pass int32 (``launch.needs_int64``): index times stride would wrap. Only then, since 64-bit
    address arithmetic costs registers that the common shapes' tiles need."""
    if IDX64:
        return offs.to(tl.int64)
    return offs


@triton.jit
def keep_mask(seed, offs_m, k0, K, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
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
def down_step(acc, a, b, offs_m, k0, offs_r, r0, K, R, seed, dropout_p, dropout_rows,
               HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K-step of ``acc += a' @ b``: a (BLOCK_M, BLOCK_K) from column k0, b (BLOCK_K,
    BLOCK_R) holding rank columns r0 + [0, BLOCK_R). Columns below ``dropout_rows`` see the
    kept input ``a * keep``; 1 / (1 - p) is applied once by ``dropout_rescale``. A dot is
    issued only for the column groups present in this chunk.

    Every dot here sits under a runtime branch on purpose: Triton gives all dots connected
    through a shared operand in one region (here ``a``, also the base product's operand)
    the chained-dot layout (all warps along M); at BLOCK_M = 16 that replicates the base
    accumulator in every warp and spills registers. The branch keeps the regions apart."""
    if HAS_DROPOUT:
        if r0 < dropout_rows:
            kept = tl.where(keep_mask(seed, offs_m, k0, K, dropout_p, BLOCK_M, BLOCK_K), a, 0.0)
            acc = tl.dot(kept, tl.where(offs_r[None, :] < dropout_rows, b, 0.0), acc,
                         input_precision=DOT_PRECISION)
        if dropout_rows < tl.minimum(r0 + BLOCK_R, R):
            acc = tl.dot(a, tl.where(offs_r[None, :] >= dropout_rows, b, 0.0), acc,
                         input_precision=DOT_PRECISION)
    elif r0 < R:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def dropout_rescale(acc, offs_r, dropout_p, dropout_rows):
    """Scale the dropped-input rank columns by 1 / (1 - p)."""
    return tl.where(offs_r[None, :] < dropout_rows, acc * (1.0 / (1.0 - dropout_p)), acc)


@triton.jit
def pad_ranks(t, offs_r, R):
    """Zero the padded rank columns (r >= R) of a register-resident t or g: the dot that
    made them met zero padding, and an Inf input turns Inf * 0 into NaN, which the
    epilogue would carry into every output column."""
    return tl.where(offs_r[None, :] < R, t, 0.0)


@triton.jit
def up_step(acc, t, offs_r, offs_n, s_ptr, u_ptr, R, N, stride_un, stride_ur,
            DOT_PRECISION: tl.constexpr, OP_DTYPE: tl.constexpr):
    """Epilogue ``acc += t @ (s * U.T)`` for one rank chunk (t: BLOCK_M x BLOCK_R, fp32).
    U may be stored in any float dtype: it is rounded to ``OP_DTYPE`` (x's) when loaded.

    s scales U, not t: with 16-bit inputs the dot's operands are rounded to x's dtype, and
    ``s * U`` is the effective up-projection, in range when s and U compensate (a huge s
    against a tiny U, or the reverse), where ``t * s`` need not be; t is what PEFT also
    rounds (x @ A.T). Padded rank columns of t must be zeros (see ``pad_ranks``)."""
    s = tl.load(s_ptr + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
                mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0).to(OP_DTYPE)
    su = (u.to(tl.float32) * s[:, None]).to(OP_DTYPE)
    return tl.dot(t.to(OP_DTYPE), su, acc, input_precision=DOT_PRECISION)


@triton.jit
def scale_rows(t, idx_ptr, s_ptr, offs_m, offs_r, M, R, stride_sa):
    """A mixed-adapter batch's ``t * S[idx]``: row i of t (fp32, BLOCK_M x BLOCK_R) times
    row ``idx[i]`` of the scale table ``s_ptr`` (row stride ``stride_sa``; int32 offsets,
    ``validate`` keeps the table below 2^31 elements). Rows past M read table row 0.
    The scale cannot fold into U, which every row shares: t takes it, in fp32."""
    table = tl.load(idx_ptr + offs_m, mask=offs_m < M, other=0).to(tl.int32) * stride_sa
    s = tl.load(s_ptr + table[:, None] + offs_r[None, :], mask=offs_r[None, :] < R, other=0.0)
    return t * s.to(tl.float32)


@triton.jit
def scaled_up_step(acc, ts, offs_r, offs_n, u_ptr, R, N, stride_un, stride_ur,
                   DOT_PRECISION: tl.constexpr, OP_DTYPE: tl.constexpr):
    """``up_step`` for a t already scaled per row (``scale_rows``): ``acc += ts @ U.T``, ts
    rounded to ``OP_DTYPE`` once for the dot. Padded rank columns of ts must be zeros."""
    u = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
                mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0).to(OP_DTYPE)
    return tl.dot(ts.to(OP_DTYPE), u, acc, input_precision=DOT_PRECISION)


@triton.jit
def down_back_step(acc, acc_drop, g, offs_r, offs_k, r0, s_ptr, d_ptr, R, K, stride_dr,
                   stride_dk, dropout_rows, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, OP_DTYPE: tl.constexpr):
    """Epilogue of dx for one rank chunk: ``(g * s) @ D`` (D rounded to ``OP_DTYPE`` as it
    is loaded). Rows below ``dropout_rows`` go to
    ``acc_drop`` (masked by keep / (1 - p) once, after all chunks), the rest to ``acc``.
    ``g * s`` (not ``s * D``): g = dy @ U carries U's magnitude, which s compensates.
    Padded rank columns of g must be zeros (see ``pad_ranks``)."""
    s = tl.load(s_ptr + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
    gs = g * s[None, :]
    d = tl.load(d_ptr + offs_r[:, None] * stride_dr + offs_k[None, :] * stride_dk,
                mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0).to(OP_DTYPE)
    if HAS_DROPOUT:
        if r0 < dropout_rows:
            acc_drop = tl.dot(tl.where(offs_r[None, :] < dropout_rows, gs, 0.0).to(d.dtype), d,
                              acc_drop, input_precision=DOT_PRECISION)
        if dropout_rows < tl.minimum(r0 + BLOCK_R, R):
            acc = tl.dot(tl.where(offs_r[None, :] >= dropout_rows, gs, 0.0).to(d.dtype), d, acc,
                         input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(gs.to(d.dtype), d, acc, input_precision=DOT_PRECISION)
    return acc, acc_drop



@triton.jit
def split_total(acc, offs, part_ptr, count_ptr, out_index, split, n_splits):
    """Reduce ``acc`` over the ``n_splits`` programs (adjacent ids) that computed the
    partial sums of output ``out_index``: each stores its partial (fp32, at element offsets
    ``offs`` of a part the size of ``acc``) and counts itself in ``count_ptr[out_index]``;
    the last to arrive gets ``(True, sum)`` with the parts summed in split order (the same
    sum whoever arrives last: deterministic) and resets the counter for the next launch;
    the others get ``(False, zeros)``. The counter decides only who sums, never the order."""
    PART: tl.constexpr = acc.numel
    tl.store(part_ptr + (out_index * n_splits + split).to(tl.int64) * PART + offs, acc)
    tl.debug_barrier()  # every thread's partial is written before the count says so
    last = tl.atomic_add(count_ptr + out_index, 1, sem="acq_rel") == n_splits - 1
    total = tl.zeros_like(acc)
    if last:
        tl.atomic_xchg(count_ptr + out_index, 0)
        first = part_ptr + (out_index * n_splits).to(tl.int64) * PART
        for i in range(0, n_splits):  # split order, whoever arrived last
            total += tl.load(first + i * PART + offs, cache_modifier=".cg")
    return last, total
