"""Index arithmetic past 2**31 elements, without 8 GB of memory.

A tensor view whose stride fits int32 (``BIG = 2**30``) but whose elements lie more than
2**31 elements from its start (index 2 along that dimension) is built with ``as_strided``
over a ``torch.empty`` storage of ~4 GiB (fp16). Linux reserves that address space lazily:
only the few pages the view touches are committed (a few MB of resident memory), so this
runs on a small box. A kernel that multiplies an int32 index by that stride wraps around
and reads outside the storage: under ``tests/_bounds.checked_memory`` that is an
AssertionError naming the argument, instead of a SIGSEGV. An exact-size contiguous tensor
past 2**31 elements (e.g. a 2**16 x 2**15 weight) takes the same arithmetic (row index
times row stride), which these views reproduce cheaply.

Covered: every tensor argument of every Triton kernel (x, W, dy, D, U along each
dimension, fused, split and segmented paths), the NF4 tile decoders at flat element and byte offsets
past 2**32 (the packed bytes of a 2**25 x 128 weight), and the C++ backend with the same
views.
"""
import pytest
import torch
import triton
import triton.language as tl

from speclora_kernels import cpu
from speclora_kernels.ops import fused_adapter_linear, reference_adapter_linear
from speclora_kernels.quant.nf4 import NF4_VALUES, nf4_level_pairs
from speclora_kernels.quant.triton_nf4 import nf4_dequant_rows, nf4_dequant_span

from _bounds import checked_memory
from conftest import forced_path

BIG = 2 ** 30   # fits int32; index 2 along a dimension with this stride is 2**31
DTYPE = torch.float16
M, N, K, R = 3, 5, 6, 3

pytestmark = pytest.mark.skipif(not triton.knobs.runtime.interpret,
                                reason="the bounds guard checks the interpreter's accesses")


def huge_view(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``values`` copied into a view whose stride along ``dim`` is BIG (the other dims
    packed after it), so its last element lies past 2**31 elements from its first."""
    stride = [0] * values.dim()
    inner = 1
    for d in reversed(range(values.dim())):
        if d != dim:
            stride[d] = inner
            inner *= values.shape[d]
    stride[dim] = max(BIG, inner)
    span = sum((s - 1) * st for s, st in zip(values.shape, stride)) + 1
    assert span > 2 ** 31
    try:
        storage = torch.empty(span, dtype=values.dtype)
    except RuntimeError as err:  # no lazy overcommit: say so rather than skip
        raise AssertionError(f"cannot reserve {span * values.element_size() / 2**30:.1f} GiB "
                             f"of address space (vm.overcommit_memory=2?): {err}") from err
    view = storage.as_strided(values.shape, stride)
    view.copy_(values)
    return view


def _inputs():
    torch.manual_seed(0)
    return {
        "x": torch.randn(M, K, dtype=DTYPE),
        "weight": (torch.randn(N, K) / K ** 0.5).to(DTYPE),
        "bias": torch.randn(N).to(DTYPE),
        "down": (torch.randn(R, K) / K ** 0.5).to(DTYPE),
        "scale": torch.rand(R) + 0.5,
        "up": torch.randn(N, R).to(DTYPE),
        "dy": torch.randn(M, N, dtype=DTYPE),
    }


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_op(t, run):
    """``run(tensors)`` gives ``(y, grads)``; compare with the float64 reference."""
    ref = {k: v.detach().double() for k, v in t.items()}
    for k in ("x", "down", "scale", "up"):
        ref[k].requires_grad_()
    y_ref = reference_adapter_linear(ref["x"], ref["weight"], ref["bias"], ref["down"],
                                     ref["scale"], ref["up"])
    g_ref = torch.autograd.grad(y_ref, [ref[k] for k in ("x", "down", "scale", "up")],
                                ref["dy"])
    y, grads = run(t)
    assert _rel(y, y_ref) < 1e-2
    for name, got, want in zip(("x", "down", "scale", "up"), grads, g_ref):
        assert _rel(got, want) < 1e-2, name


def _triton_run(t):
    leaves = {k: (v.requires_grad_() if k in ("x", "down", "scale", "up") else v)
              for k, v in t.items()}
    y = fused_adapter_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["down"],
                             leaves["scale"], leaves["up"])
    grads = torch.autograd.grad(y, [leaves[k] for k in ("x", "down", "scale", "up")],
                                leaves["dy"])
    return y, grads


CASES = [("x", 0), ("x", 1), ("weight", 0), ("weight", 1), ("dy", 0), ("dy", 1),
         ("down", 0), ("down", 1), ("up", 0), ("up", 1)]


@pytest.mark.parametrize("path", ["fused", "split", "segmented"])
@pytest.mark.parametrize("name,dim", CASES, ids=[f"{n}-dim{d}" for n, d in CASES])
def test_triton_offsets_past_2_31(name, dim, path):
    """Forward and every gradient with one argument's elements spread past 2**31, on each
    of the launcher's paths (segmented: the large-M one-launch kernels, forced)."""
    t = _inputs()
    t[name] = huge_view(t[name], dim)
    with checked_memory(), forced_path(path, 2):
        _check_op(t, _triton_run)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,dim", [("x", 0), ("x", 1), ("weight", 0), ("weight", 1)])
def test_cpp_offsets_past_2_31(name, dim, weight_dtype):
    """The C++ backend (ATen GEMM for an fp32 base, its own kernels for bf16) with the same
    views: it indexes in int64 throughout (csrc/kernels_impl.h)."""
    assert cpu.load()
    t = {k: v.float() for k, v in _inputs().items()}
    t["weight"] = t["weight"].to(weight_dtype)
    t[name] = huge_view(t[name], dim)

    def run(t):
        y, saved = cpu.adapter_forward(t["x"], t["weight"], t["bias"], t["down"], t["scale"],
                                       t["up"])
        dx, dd, ds, du = cpu.adapter_backward(t["dy"], t["x"], t["weight"], t["down"],
                                              t["scale"], t["up"], saved)
        return y, (dx, dd, ds, du)

    _check_op(t, run)


# ----------------------------------------------------------------------------- NF4 decoders
@triton.jit
def _decode_last_rows(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, levels_ptr,
                      out_ptr, N, K, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """The fused kernels' NF4 decoders on the last BLOCK_N rows of W (int32 row indices, as
    the dx kernel passes them), first BLOCK_K columns."""
    offs_n = N - BLOCK_N + tl.arange(0, BLOCK_N)
    if ROWS:
        w = nf4_dequant_rows(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                             levels_ptr, offs_n, 0, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT,
                             256, tl.float32)
    else:
        w = nf4_dequant_span(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                             levels_ptr, offs_n, 0, N, K, BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT,
                             256, tl.float32)
    i = tl.arange(0, BLOCK_N)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    tl.store(out_ptr + i, w)


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("k", [128, 127], ids=["rows-decoder", "span-decoder"])
def test_nf4_decoders_past_2_32_elements(k, double_quant):
    """An NF4 weight whose last rows start past flat element 2**32 and byte 2**31 (and
    block 2**26): 2**25 + 24 rows of 128 (row decoder) or 2**32 // 127 + 24 of 127 (span
    decoder). Random codes and scales are written there only (the rest of the ~2 GiB
    packed buffer is never touched) and the decoded tile must equal the NF4 formula
    computed in float64 from the same bytes."""
    blocksize, block_n, block_k = 64, 16, 64
    n = 2 ** 32 // k + 24
    numel = n * k
    assert numel > 2 ** 32
    packed = torch.empty((numel + 1) // 2, dtype=torch.uint8)
    n_blocks = (numel + blocksize - 1) // blocksize
    gen = torch.Generator().manual_seed(0)
    first = (n - block_n) * k                # flat index of the first decoded element
    lo_byte, lo_blk = first // 2, first // blocksize
    packed[lo_byte:] = torch.randint(0, 256, (packed.numel() - lo_byte,), dtype=torch.uint8,
                                     generator=gen)
    code2 = torch.linspace(-1, 1, 256)
    if double_quant:
        absmax = torch.empty(n_blocks, dtype=torch.uint8)
        absmax[lo_blk:] = torch.randint(0, 256, (n_blocks - lo_blk,), dtype=torch.uint8,
                                        generator=gen)
        absmax2 = torch.empty((n_blocks + 255) // 256)
        absmax2[lo_blk // 256:] = torch.rand(absmax2.numel() - lo_blk // 256, generator=gen)
        offset = torch.tensor(0.25)
        scales = code2[absmax[lo_blk:].long()] * absmax2[torch.arange(lo_blk, n_blocks) // 256]
        scales = scales + offset
    else:
        absmax = torch.empty(n_blocks)
        absmax[lo_blk:] = torch.rand(n_blocks - lo_blk, generator=gen) + 0.5
        absmax2 = code2 = offset = absmax
        scales = absmax[lo_blk:]
    out = torch.full((block_n, block_k), float("nan"))
    with checked_memory():
        _decode_last_rows[(1,)](packed, absmax, absmax2, code2, offset, nf4_level_pairs(), out, n, k,
                                ROWS=k % blocksize == 0, BLOCK_N=block_n, BLOCK_K=block_k,
                                BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant)
    rows = torch.arange(n - block_n, n, dtype=torch.int64)[:, None]
    idx = rows * k + torch.arange(block_k)[None, :]          # int64 flat indices
    byte = packed[(idx // 2).clamp_max(packed.numel() - 1)].long()
    code = torch.where(idx % 2 == 0, byte >> 4, byte & 15)
    want = torch.tensor(NF4_VALUES, dtype=torch.float64)[code] * \
        scales.double()[(idx // blocksize - lo_blk)]
    want = torch.where(torch.arange(block_k)[None, :] < k, want, 0.0)
    assert torch.allclose(out.double(), want, rtol=1e-6, atol=0)
