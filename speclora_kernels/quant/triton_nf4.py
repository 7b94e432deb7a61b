"""Triton device functions that dequantize NF4 (bitsandbytes layout) tiles in registers.

For the fused kernels' K-loop: each K-step loads the packed bytes and block scales of its
weight tile and decodes them here; the dense weight never exists in memory. Results are
bit-identical to :func:`speclora_kernels.quant.dequantize_nf4` (and so to bitsandbytes):

- the NF4 level comes from a select tree over the code's 4 bits (16 fp32 constants);
- double-quant scales are ``code2[q] * absmax2[b // 256]`` rounded, then ``+ offset``
  rounded, and the final ``level * scale`` is rounded once. On the GPU both products are
  ``mul.rn.f32`` (inline PTX) because Triton fuses a plain ``a * b + c`` into an FMA by
  default, which would change the last bit; the interpreter runs them as plain products.

Element ``(n, k)`` of the row-major (N x K) weight has flat index ``i = n*K + k`` (int64):
byte ``i >> 1``, high nibble when ``i`` is even, scale ``i // BLOCKSIZE``. Rows start
mid-byte when K is odd and blocks span rows when K % BLOCKSIZE != 0; both are handled.
Masked-out elements come back as 0.

The fused kernels decode tiles with two cheaper functions: when every row starts a block
(``K % BLOCKSIZE == 0``, the case of real layers), :func:`nf4_dequant_rows` reads contiguous
byte runs (one load per byte, both nibbles used) and one scale per row and block; for any
other K, :func:`nf4_dequant_span` reads two contiguous byte runs per row (rows may start
in a low nibble) and selects each element's scale among the few blocks its row segment
spans. Neither gathers per element.

Host side: ``nf4_kernel_args(w)`` gives the pointer arguments and constexprs for an
:class:`~speclora_kernels.quant.NF4Weight`; ``dequantize_nf4_triton(w)`` is a standalone
tile-by-tile dequantize kernel (tests, merging adapters into a dense weight).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .nf4 import NF4_VALUES, NF4Weight

__all__ = [
    "nf4_lookup",
    "nf4_block_scale",
    "nf4_dequant_at",
    "nf4_dequant_tile",
    "nf4_dequant_tile_t",
    "nf4_dequant_rows",
    "nf4_dequant_span",
    "nf4_kernel_args",
    "dequantize_nf4_triton",
]

# Read once, like Triton itself: inline PTX cannot run in the interpreter.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

# The 16 NF4 levels as compile-time fp32 constants (Triton globals must be constexpr).
(_V0, _V1, _V2, _V3, _V4, _V5, _V6, _V7,
 _V8, _V9, _V10, _V11, _V12, _V13, _V14, _V15) = (tl.constexpr(v) for v in NF4_VALUES)


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
def nf4_lookup(nib):
    """fp32 NF4 level of 4-bit codes ``nib`` (int32, 0..15): a select tree, no memory access."""
    b0 = (nib & 1) != 0
    b1 = (nib & 2) != 0
    lo = tl.where(b1, tl.where(b0, _V3, _V2), tl.where(b0, _V1, _V0))
    hi = tl.where(b1, tl.where(b0, _V7, _V6), tl.where(b0, _V5, _V4))
    neg = tl.where((nib & 4) != 0, hi, lo)
    lo = tl.where(b1, tl.where(b0, _V11, _V10), tl.where(b0, _V9, _V8))
    hi = tl.where(b1, tl.where(b0, _V15, _V14), tl.where(b0, _V13, _V12))
    pos = tl.where((nib & 4) != 0, hi, lo)
    return tl.where((nib & 8) != 0, pos, neg)


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
def nf4_dequant_at(idx, mask, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                   BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 weight at flat element indices ``idx`` (int64, any shape); 0 where ``mask`` is False."""
    byte = tl.load(packed_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
    shift = 4 - (idx & 1).to(tl.int32) * 4  # even element: high nibble
    level = nf4_lookup((byte >> shift) & 0xF)
    scale = nf4_block_scale(idx // BLOCKSIZE, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                            DOUBLE_QUANT, NESTED_BLOCKSIZE)
    return tl.where(mask, _mul_rn(level, scale), 0.0)


@triton.jit
def nf4_dequant_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, offs_k, N, K,
                     BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr = 256,
                     OUT_DTYPE: tl.constexpr = tl.float32):
    """Weight tile ``W[offs_n, :][:, offs_k]`` as a (BLOCK_N x BLOCK_K) tensor of ``OUT_DTYPE``.

    Args:
        packed_ptr: uint8, ceil(N*K/2) bytes (``NF4Weight.packed``).
        absmax_ptr: fp32 absmax (N*K/BLOCKSIZE rounded up), or its uint8 codes with double quant.
        absmax2_ptr, code2_ptr, offset_ptr: fp32 double-quant pieces (absmax2, the 256-entry
            map, the 0-d offset); any valid pointer (e.g. ``absmax_ptr``) when DOUBLE_QUANT is off.
        offs_n: (BLOCK_N,) row indices; offs_k: (BLOCK_K,) column indices (any int dtype).
        N, K: weight shape (out_features, in_features); rows >= N or columns >= K give 0.
        BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE: from the weight (see ``nf4_kernel_args``).
        OUT_DTYPE: result dtype; the fp32 value is rounded to nearest-even.

    This is the right operand of the backward ``dx = dy @ W`` step, ``tl.dot(dy_tile, w_tile)``
    (K-loop over the output features). The forward ``x @ W.T`` needs its transpose: use
    :func:`nf4_dequant_tile_t` (or ``tl.trans`` of this tile).
    """
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    idx = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    w = nf4_dequant_at(idx, mask, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                       BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE)
    return _cast(w, OUT_DTYPE)


@triton.jit
def nf4_dequant_tile_t(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, offs_k, N, K,
                       BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr = 256,
                       OUT_DTYPE: tl.constexpr = tl.float32):
    """Transposed tile ``W[offs_n, :][:, offs_k].T`` as (BLOCK_K x BLOCK_N), built directly.

    Same arguments as :func:`nf4_dequant_tile`. This is the right operand of the forward
    ``y = x @ W.T`` step, ``tl.dot(x_tile, w_t)`` with ``offs_k`` the K-loop columns and
    ``offs_n`` the program's output columns; no register transpose is needed.
    """
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    idx = offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
    w = nf4_dequant_at(idx, mask, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                       BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE)
    return _cast(w, OUT_DTYPE)


@triton.jit
def nf4_dequant_rows(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, k0, N, K,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
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
    even = _cast(tl.where(ok, _mul_rn(nf4_lookup(byte >> 4), scale), 0.0), OUT_DTYPE)
    odd = _cast(tl.where(ok, _mul_rn(nf4_lookup(byte & 0xF), scale), 0.0), OUT_DTYPE)
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
def nf4_dequant_span(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, k0, N, K,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
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
    n_blocks = (N.to(tl.int64) * K + BLOCKSIZE - 1) // BLOCKSIZE
    scale = _span_scale(first, rel, row_ok, n_blocks, absmax_ptr, absmax2_ptr, code2_ptr,
                        offset_ptr, SPAN, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE)
    even = _cast(tl.where(ok_even, _mul_rn(nf4_lookup(nib_even), scale), 0.0), OUT_DTYPE)
    scale = _span_scale(first, rel + 1, row_ok, n_blocks, absmax_ptr, absmax2_ptr, code2_ptr,
                        offset_ptr, SPAN, BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE)
    odd_cols = _cast(tl.where(ok_odd, _mul_rn(nf4_lookup(nib_odd), scale), 0.0), OUT_DTYPE)
    return tl.reshape(tl.join(even, odd_cols), (BLOCK_N, BLOCK_K))


def nf4_kernel_args(w: NF4Weight):
    """``(packed, absmax, absmax2, code2, offset)`` and ``dict(BLOCKSIZE=..., DOUBLE_QUANT=...,
    NESTED_BLOCKSIZE=...)`` to pass to a kernel that calls the functions above."""
    if not isinstance(w, NF4Weight):
        raise TypeError(f"w must be an NF4Weight, got {type(w).__name__}")
    if w.double_quant:
        ptrs = (w.packed, w.absmax, w.absmax2, w.code2, w.offset)
    else:
        ptrs = (w.packed, w.absmax, w.absmax, w.absmax, w.absmax)
    consts = dict(BLOCKSIZE=w.blocksize, DOUBLE_QUANT=w.double_quant, NESTED_BLOCKSIZE=w.nested_blocksize)
    return ptrs, consts


@triton.jit
def _dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, N, K,
                    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TRANSPOSED: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if TRANSPOSED:
        w = nf4_dequant_tile_t(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, offs_k, N, K,
                               BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, out_ptr.dtype.element_ty)
        ptrs = out_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
        tl.store(ptrs, w, mask=(offs_k[:, None] < K) & (offs_n[None, :] < N))
    else:
        w = nf4_dequant_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, offs_k, N, K,
                             BLOCKSIZE, DOUBLE_QUANT, NESTED_BLOCKSIZE, out_ptr.dtype.element_ty)
        ptrs = out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        tl.store(ptrs, w, mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


@triton.jit
def _dequant_rows_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, N, K,
                         BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ALIGNED: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if ALIGNED:
        w = nf4_dequant_rows(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                             tl.program_id(1) * BLOCK_K, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT,
                             NESTED_BLOCKSIZE, out_ptr.dtype.element_ty)
    else:
        w = nf4_dequant_span(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                             tl.program_id(1) * BLOCK_K, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT,
                             NESTED_BLOCKSIZE, out_ptr.dtype.element_ty)
    ptrs = out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(ptrs, w, mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def dequantize_nf4_triton(w: NF4Weight, dtype=None, out=None, block_n: int = 32, block_k: int = 64,
                          transposed: bool = False, rows: bool = False) -> torch.Tensor:
    """Dense weight from NF4 by the Triton tile decoder (same bits as ``dequantize_nf4``).

    ``transposed`` decodes (BLOCK_K x BLOCK_N) tiles with :func:`nf4_dequant_tile_t`; ``rows``
    uses the fused kernels' decoders, :func:`nf4_dequant_rows` when ``in_features`` is a
    multiple of the blocksize, else :func:`nf4_dequant_span`; the stored result is the same
    (out x in) weight either way.
    """
    ptrs, consts = nf4_kernel_args(w)
    dtype = w.dtype if dtype is None else dtype
    if out is None:
        out = torch.empty(w.shape, dtype=dtype, device=w.device)
    elif out.shape != w.shape or out.dtype != dtype or not out.is_contiguous() or out.device != w.device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(w.shape)} on {w.device}")
    n, k = w.shape
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    if rows:
        _dequant_rows_kernel[grid](*ptrs, out, n, k, **consts, BLOCK_N=block_n, BLOCK_K=block_k,
                                   ALIGNED=k % w.blocksize == 0)
    else:
        _dequant_kernel[grid](*ptrs, out, n, k, **consts, BLOCK_N=block_n, BLOCK_K=block_k,
                              TRANSPOSED=transposed)
    return out
