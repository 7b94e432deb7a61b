"""Triton device functions that dequantize NF4 (bitsandbytes layout) tiles in registers.

For the fused kernels' K-loop: each K-step loads the packed bytes and block scales of its
weight tile and decodes them here; the dense weight never exists in memory. Results are
bit-identical to :func:`speclora_kernels.quant.dequantize_nf4` (and so to bitsandbytes):

- the NF4 levels come from a 256-entry table of level pairs, one 64-bit load per byte;
- double-quant scales are ``code2[q] * absmax2[b // 256]`` rounded, then ``+ offset``
  rounded, and the final ``level * scale`` is rounded once. On the GPU both products are
  ``mul.rn.f32`` (inline PTX) because Triton fuses a plain ``a * b + c`` into an FMA by
  default, which would change the last bit; the interpreter runs them as plain products.

Element ``(n, k)`` of the row-major (N x K) weight has flat index ``i = n*K + k`` (int64):
byte ``i >> 1``, high nibble when ``i`` is even, scale ``i // BLOCKSIZE``. Two decoders:
when every row starts a block (``K % BLOCKSIZE == 0``, the case of real layers),
:func:`nf4_dequant_rows` reads contiguous byte runs (one load per byte, both nibbles used)
and one scale per row and block; for any other K (rows start mid-byte, blocks span rows),
:func:`nf4_dequant_span` reads two contiguous byte runs per row and selects each element's
scale among the few blocks its row segment spans. Neither gathers per element; masked-out
elements come back as 0.

A whole weight is decoded with the same decoders by ``ops.dequantize_nf4_triton`` (the
large-M path decodes W once per call into a transient dense copy; the tests prove the
decoders against bitsandbytes through it).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = ["nf4_level_pair", "nf4_level", "nf4_block_scale", "nf4_dequant_rows",
           "nf4_dequant_span"]

# Read once, like Triton itself: inline PTX cannot run in the interpreter.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

@triton.jit
def _mul_rn(a, b):
    """fp32 ``a * b`` rounded once and never contracted into an FMA with a later add."""
    if _INTERPRET:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _cast(w, OUT_DTYPE: tl.constexpr):
    """fp32 -> OUT_DTYPE, round to nearest even."""
    if _INTERPRET and OUT_DTYPE == tl.bfloat16:
        # The interpreter truncates fp32 -> bf16 (the GPU rounds): round the bits ourselves.
        bits = w.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return w.to(OUT_DTYPE)


@triton.jit
def nf4_level_pair(levels_ptr, byte):
    """fp32 NF4 levels of both codes of ``byte`` (int32, 0..255): (high nibble, low nibble),
    from one 64-bit load of ``levels_ptr`` (``NF4Weight.level_pairs``, 256 int64 entries, the
    high nibble's level in the upper 32 bits): 2 KB that stay in L1, one gather for two
    elements. (A select tree over the code's bits cost ~22 SASS instructions an element in
    the fused forward on sm_90, ``tools/compile_report --decode-cost``.)"""
    pair = tl.load(levels_ptr + byte)
    high = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    low = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    return high, low


@triton.jit
def nf4_level(levels_ptr, nib):
    """fp32 NF4 level of 4-bit codes ``nib`` (int32, 0..15): entry ``17 * nib`` of the pair
    table holds that level in both halves."""
    return (tl.load(levels_ptr + nib * 17) >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def nf4_block_scale(blk, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                    DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 scale of block indices ``blk`` (int64, any shape); 0 where ``mask`` is False.

    Without double quant ``absmax_ptr`` is the fp32 absmax and the other pointers are unused.
    With it: ``code2[absmax[blk]] * absmax2[blk // NESTED_BLOCKSIZE] + offset[0]`` with
    bitsandbytes' two roundings.
    """
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        level = tl.load(code2_ptr + q, mask=mask, other=0.0)
        scale2 = tl.load(absmax2_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return _mul_rn(level, scale2) + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def nf4_dequant_rows(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
                     offs_n, k0, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                     DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr = 256,
                     OUT_DTYPE: tl.constexpr = tl.float32):
    """Tile ``W[offs_n, k0 : k0 + BLOCK_K]`` as (BLOCK_N x BLOCK_K) for ``K % BLOCKSIZE == 0``.

    Same values as :func:`nf4_dequant_tile` (bit for bit), cheaper: row ``n`` starts at byte
    ``n * K / 2`` and at block ``n * K / BLOCKSIZE``, so each row's bytes are one contiguous
    (vectorizable) run of BLOCK_K / 2 bytes whose high and low nibbles are the even and odd
    columns, and each (row, block) scale is decoded once and broadcast over its columns.
    ``k0`` must be a multiple of BLOCK_K (power of 2, >= 2); rows >= N or columns >= K give 0.
    """
    HALF: tl.constexpr = BLOCK_K // 2
    row = offs_n.to(tl.int64)
    row_ok = offs_n < N
    offs_b = k0 // 2 + tl.arange(0, HALF)
    ok = row_ok[:, None] & (offs_b[None, :] < K // 2)  # K is even: a byte is in or out whole
    byte = tl.load(packed_ptr + row[:, None] * (K // 2) + offs_b[None, :], mask=ok,
                   other=0).to(tl.int32)
    blocks_per_row = K // BLOCKSIZE
    # Scales on the (BLOCK_N, HALF) byte grid: both nibbles of a byte share a block.
    if BLOCK_K > BLOCKSIZE:
        PER_TILE: tl.constexpr = BLOCK_K // BLOCKSIZE
        col_blk = k0 // BLOCKSIZE + tl.arange(0, PER_TILE)
        scale = nf4_block_scale(row[:, None] * blocks_per_row + col_blk[None, :],
                                row_ok[:, None] & (col_blk[None, :] < blocks_per_row),
                                absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, DOUBLE_QUANT,
                                NESTED_BLOCKSIZE)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, PER_TILE, BLOCKSIZE // 2)),
                           (BLOCK_N, HALF))
    else:  # the tile lies inside one block of each row
        scale = nf4_block_scale(row * blocks_per_row + k0 // BLOCKSIZE, row_ok, absmax_ptr,
                                absmax2_ptr, code2_ptr, offset_ptr, DOUBLE_QUANT,
                                NESTED_BLOCKSIZE)[:, None]
    # outside (N, K) the byte is 0 and the scale 0: the product is a signed zero, which a
    # GEMM operand needs no more than (the other operand is masked to 0 there too)
    high, low = nf4_level_pair(levels_ptr, byte)
    even = _cast(_mul_rn(high, scale), OUT_DTYPE)
    odd = _cast(_mul_rn(low, scale), OUT_DTYPE)
    # join puts (even, odd) side by side on a new last axis: columns 2j, 2j + 1
    return tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))


@triton.jit
def _span_scale(first, rel, row_ok, n_blocks, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                SPAN: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                NESTED_BLOCKSIZE: tl.constexpr):
    """Scale of the elements at offset ``rel`` (int32, any shape ending in a column axis) from
    block ``first`` (int64 per row) of their row: one decode per row and block, selected."""
    scale = nf4_block_scale(first, row_ok, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                            DOUBLE_QUANT, NESTED_BLOCKSIZE)[:, None]
    for c in tl.static_range(1, SPAN):
        other = nf4_block_scale(first + c, row_ok & (first + c < n_blocks), absmax_ptr,
                                absmax2_ptr, code2_ptr, offset_ptr, DOUBLE_QUANT,
                                NESTED_BLOCKSIZE)
        scale = tl.where(rel >= c * BLOCKSIZE, other[:, None], scale)
    return scale


@triton.jit
def nf4_dequant_span(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
                     offs_n, k0, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                     DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr = 256,
                     OUT_DTYPE: tl.constexpr = tl.float32):
    """Tile ``W[offs_n, k0 : k0 + BLOCK_K]`` as (BLOCK_N x BLOCK_K) for any K.

    Same values as :func:`nf4_dequant_tile` (bit for bit). A row segment starts at flat
    element ``s = n * K + k0``: in byte ``s // 2``, in its high nibble if ``s`` is even, and
    inside block ``s // BLOCKSIZE``. Columns ``2j`` and ``2j + 1`` come from two contiguous
    byte runs, ``a = bytes[s // 2 + j]`` and ``b = bytes[s // 2 + j + 1]``: (hi a, lo a) for an
    even start, (lo a, hi b) for an odd one. The segment spans at most
    ``ceil(BLOCK_K / BLOCKSIZE) + 1`` blocks, decoded once per row and selected per element.
    ``k0`` must be a multiple of BLOCK_K (>= 2); outside (N, K) gives 0.
    """
    HALF: tl.constexpr = BLOCK_K // 2
    SPAN: tl.constexpr = (BLOCK_K + BLOCKSIZE - 1) // BLOCKSIZE + 1
    row_ok = offs_n < N
    start = offs_n.to(tl.int64) * K + k0
    odd = (start & 1) != 0
    j = tl.arange(0, HALF)
    ok_even = row_ok[:, None] & (k0 + 2 * j[None, :] < K)
    ok_odd = row_ok[:, None] & (k0 + 2 * j[None, :] + 1 < K)
    row_bytes = packed_ptr + (start >> 1)
    a = tl.load(row_bytes[:, None] + j[None, :], mask=ok_even, other=0)
    b = tl.load(row_bytes[:, None] + 1 + j[None, :], mask=ok_odd & odd[:, None], other=0)
    nib_even = tl.where(odd[:, None], a & 0xF, a >> 4)
    nib_odd = tl.where(odd[:, None], b >> 4, a & 0xF)
    first = start // BLOCKSIZE
    rel = (start % BLOCKSIZE).to(tl.int32)[:, None] + 2 * j[None, :]
    n_blocks = (tl.cast(N, tl.int64) * K + BLOCKSIZE - 1) // BLOCKSIZE  # N may be a constant 1
    scale = _span_scale(first, rel, row_ok, n_blocks, absmax_ptr, absmax2_ptr, code2_ptr,
                        offset_ptr, SPAN, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE)
    even = _cast(tl.where(ok_even, _mul_rn(nf4_level(levels_ptr, nib_even), scale), 0.0), OUT_DTYPE)
    scale = _span_scale(first, rel + 1, row_ok, n_blocks, absmax_ptr, absmax2_ptr, code2_ptr,
                        offset_ptr, SPAN, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE)
    odd_cols = _cast(tl.where(ok_odd, _mul_rn(nf4_level(levels_ptr, nib_odd), scale), 0.0), OUT_DTYPE)
    return tl.reshape(tl.join(even, odd_cols), (BLOCK_N, BLOCK_K))
