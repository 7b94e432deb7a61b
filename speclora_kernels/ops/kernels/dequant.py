"""Decode a whole NF4 weight into a dense tensor with the kernels' tile decoders.

The large-M path runs this once per call (forward, and again for dx in backward) into a
transient dense copy instead of decoding W in every row tile; nothing keeps the copy.
"""
import triton
import triton.language as tl

from ...quant.triton_nf4 import nf4_dequant_rows, nf4_dequant_span


@triton.jit
def dequant_kernel(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr, out_ptr,
                   N, K, stride_on,
                   NF4_ROWS: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr,
                   NF4_DOUBLE_QUANT: tl.constexpr, NF4_NESTED: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (BLOCK_N, BLOCK_K) tile of the dense (N, K) weight, rounded to ``out_ptr``'s
    dtype; consecutive programs take consecutive column tiles of a row block."""
    pid = tl.program_id(0)
    tiles_k = tl.cdiv(K, BLOCK_K)
    pid_n, pid_k = pid // tiles_k, pid % tiles_k
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if NF4_ROWS:
        w = nf4_dequant_rows(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
                             offs_n, k0, N, K, BLOCK_N, BLOCK_K, NF4_BLOCKSIZE,
                             NF4_DOUBLE_QUANT, NF4_NESTED, out_ptr.dtype.element_ty)
    else:
        w = nf4_dequant_span(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
                             offs_n, k0, N, K, BLOCK_N, BLOCK_K, NF4_BLOCKSIZE,
                             NF4_DOUBLE_QUANT, NF4_NESTED, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], w,
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))
