"""The interpreter counter on toy kernels with exactly known counts, and the floor models."""
import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter as interp
from triton.runtime.errors import InterpreterError
from triton.tools.tensor_descriptor import TensorDescriptor

from speclora_kernels.tools.counter import CountingError, _AddressSpace, count_triton
from speclora_kernels.tools.floors import (
    Op,
    backward_floor,
    compare,
    format_ops,
    forward_floor,
    nf4_weight_bytes,
    peft_lora_forward_ops,
    predict_h100,
    predict_ops,
    total_cost,
)


@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _scale_rows_kernel(x_ptr, s_ptr, out_ptr, cols, BLOCK: tl.constexpr):
    # Every program re-reads all of s: requested s bytes grow with the grid, unique don't.
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    s = tl.load(s_ptr + offs, mask=mask)
    x = tl.load(x_ptr + row * cols + offs, mask=mask)
    tl.store(out_ptr + row * cols + offs, x * s, mask=mask)


@triton.jit
def _sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(out_ptr, tl.sum(tl.load(x_ptr + offs, mask=offs < n, other=0.0)))


@triton.jit
def _matmul_kernel(a_ptr, w_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    # c = a @ w.T with w stored out x in, like a linear weight.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        acc += tl.dot(a, tl.trans(w))
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _copy_desc_kernel(src_desc, dst_desc, BLOCK: tl.constexpr):
    r, c = tl.program_id(0) * BLOCK, tl.program_id(1) * BLOCK
    dst_desc.store([r, c], src_desc.load([r, c]))


@triton.jit
def _fused_toy_kernel(x_ptr, w_ptr, b_ptr, d_ptr, s_ptr, u_ptr, y_ptr, M: tl.constexpr, IN: tl.constexpr,
                      OUT: tl.constexpr, R: tl.constexpr):
    # The whole adapter op in one program, every input read once: hits the floor exactly.
    m, i, o, r = tl.arange(0, M), tl.arange(0, IN), tl.arange(0, OUT), tl.arange(0, R)
    x = tl.load(x_ptr + m[:, None] * IN + i[None, :])
    w = tl.load(w_ptr + o[:, None] * IN + i[None, :])
    d = tl.load(d_ptr + r[:, None] * IN + i[None, :])
    u = tl.load(u_ptr + o[:, None] * R + r[None, :])
    t = tl.dot(x, tl.trans(d)) * tl.load(s_ptr + r)[None, :]
    y = tl.dot(x, tl.trans(w)) + tl.dot(t, tl.trans(u)) + tl.load(b_ptr + o)[None, :]
    tl.store(y_ptr + m[:, None] * OUT + o[None, :], y)


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


def _counted_and_plain(launch, make_out):
    """Run ``launch(out)`` uncounted and counted on fresh NaN-poisoned outputs."""
    plain, counted = make_out(), make_out()
    launch(plain)
    with count_triton() as c:
        launch(counted)
    return plain, counted, c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_add_bytes_exact(dtype):
    n, block = 1001, 128
    x, y = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    plain, out, c = _counted_and_plain(lambda o: _add_kernel[(triton.cdiv(n, block),)](x, y, o, n, BLOCK=block),
                                       lambda: _nan(n, dtype=dtype))
    assert torch.equal(out, x + y) and torch.equal(out, plain)
    k = c.per_kernel()["_add_kernel"]
    size = dtype.itemsize
    assert (k.launches, k.programs, k.dots, k.dot_flops) == (1, 8, 0, 0)
    assert k.load_bytes == k.unique_load_bytes == 2 * n * size
    assert k.store_bytes == k.unique_store_bytes == n * size


def test_reread_requested_exceeds_unique():
    rows, cols = 7, 37
    x, s = torch.randn(rows, cols), torch.randn(cols)
    plain, out, c = _counted_and_plain(lambda o: _scale_rows_kernel[(rows,)](x, s, o, cols, BLOCK=64),
                                       lambda: _nan(rows, cols))
    assert torch.equal(out, x * s) and torch.equal(out, plain)
    k = c.per_kernel()["_scale_rows_kernel"]
    assert (k.launches, k.programs) == (1, rows)
    assert k.load_bytes == 2 * rows * cols * 4  # x once, s once per program
    assert k.unique_load_bytes == rows * cols * 4 + cols * 4  # s counted once
    assert k.store_bytes == k.unique_store_bytes == rows * cols * 4


def test_atomic_counts_as_load_and_store():
    n, block = 300, 64
    x = torch.randn(n)
    out = torch.zeros(1)
    with count_triton() as c:
        _sum_kernel[(triton.cdiv(n, block),)](x, out, n, BLOCK=block)
    torch.testing.assert_close(out.double(), x.double().sum().reshape(1), rtol=1e-5, atol=1e-5)
    k = c.total()
    programs = triton.cdiv(n, block)
    assert (k.programs, k.atomics) == (programs, programs)
    assert k.load_bytes == n * 4 + programs * 4 and k.unique_load_bytes == n * 4 + 4
    assert k.store_bytes == programs * 4 and k.unique_store_bytes == 4


def test_tiled_matmul_odd_sizes_exact():
    m, n, k = 37, 45, 70
    bm, bn, bk = 16, 32, 32
    a, w = torch.randn(m, k), torch.randn(n, k)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))

    def launch(out):
        for _ in range(2):  # a second launch on the same tensors adds requested bytes, not unique ones
            _matmul_kernel[grid](a, w, out, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)

    plain, out, c = _counted_and_plain(launch, lambda: _nan(m, n))
    torch.testing.assert_close(out.double(), a.double() @ w.double().T, rtol=1e-5, atol=1e-4)
    assert torch.equal(out, plain)
    kc = c.per_kernel()["_matmul_kernel"]
    tiles = grid[0] * grid[1]
    k_steps = triton.cdiv(k, bk)
    assert (kc.launches, kc.programs) == (2, 2 * tiles)
    assert kc.dots == 2 * tiles * k_steps
    assert kc.dot_flops == kc.dots * 2 * bm * bn * bk  # padded tiles as issued
    # each of the grid[1] column tiles reads all of a, each of the grid[0] row tiles all of w
    assert kc.load_bytes == 2 * 4 * (grid[1] * m * k + grid[0] * n * k)
    assert kc.unique_load_bytes == 4 * (m * k + n * k)
    assert kc.store_bytes == 2 * 4 * m * n and kc.unique_store_bytes == 4 * m * n
    assert c.total() == type(kc)(**{**kc.as_dict(), "name": "total"})
    assert "_matmul_kernel" in c.table()
    assert c.predicted_h100(launch_overhead=1e-6).seconds == predict_h100(kc.unique_bytes, kc.dot_flops, 2,
                                                                          launch_overhead=1e-6).seconds


def test_tensor_descriptor_counts_in_bounds_elements():
    rows, cols, block = 20, 24, 16
    src = torch.randn(rows, cols)

    def launch(dst):
        _copy_desc_kernel[(2, 2)](TensorDescriptor.from_tensor(src, [block, block]),
                                  TensorDescriptor.from_tensor(dst, [block, block]), BLOCK=block)

    plain, out, c = _counted_and_plain(launch, lambda: _nan(rows, cols))
    assert torch.equal(out, src) and torch.equal(plain, src)
    k = c.per_kernel()["_copy_desc_kernel"]
    assert k.load_bytes == k.unique_load_bytes == k.store_bytes == k.unique_store_bytes == rows * cols * 4


def test_fused_toy_kernel_meets_forward_floor():
    m, in_f, out_f, r = 4, 16, 8, 2
    x, w, b = torch.randn(m, in_f), torch.randn(out_f, in_f), torch.randn(out_f)
    d, s, u = torch.randn(r, in_f), torch.randn(r), torch.randn(out_f, r)
    plain, y, c = _counted_and_plain(
        lambda o: _fused_toy_kernel[(1,)](x, w, b, d, s, u, o, M=m, IN=in_f, OUT=out_f, R=r), lambda: _nan(m, out_f))
    x64 = x.double()
    ref = x64 @ w.double().T + b.double() + ((x64 @ d.double().T) * s.double()) @ u.double().T
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(y, plain)
    floor = forward_floor(m, in_f, out_f, r, dtype=torch.float32)
    k = c.total()
    assert (k.unique_bytes, k.bytes, k.dot_flops) == (floor.bytes, floor.bytes, floor.flops)


def test_counting_errors_and_restore():
    originals = (interp.InterpreterBuilder.create_masked_load, interp.GridExecutor.__call__)
    x = torch.randn(8)
    with pytest.raises(InterpreterError, match="outside every tensor"):
        with count_triton():  # reads past the end: refused before the interpreter touches memory
            _add_kernel[(1,)](x, x[:4], torch.empty(8), 4096, BLOCK=4096)
    with count_triton():
        with pytest.raises(CountingError, match="nest"):
            with count_triton():
                pass
    assert (interp.InterpreterBuilder.create_masked_load, interp.GridExecutor.__call__) == originals


def test_forward_floor_by_hand():
    c = forward_floor(2, 3, 5, 1, dtype=torch.float32)
    # x 24 + W 60 + bias 20 + D 12 + s 4 + U 20 ; y 40 ; 2*2*(15 + 3 + 5)
    assert (c.bytes_read, c.bytes_written, c.flops, c.launches) == (140, 40, 92, 1)
    nf4 = forward_floor(1, 4096, 4096, 16, weight_bytes=nf4_weight_bytes(4096, 4096), bias=False)
    assert nf4.bytes_read - (4096 * 2 + 16 * 4096 * 2 + 16 * 2 + 4096 * 16 * 2) == 8_655_876
    half = forward_floor(2, 3, 5, 1, dtype=torch.float16, factor_dtype=torch.float32, weight_dtype=0.5, bias=False)
    assert (half.bytes_read, half.bytes_written) == (12 + 8 + 36, 20)


def test_backward_floor_by_hand():
    c = backward_floor(2, 3, 5, 4, grad_down_rows=2, grad_scale=1, grad_up_cols=2, dtype=torch.float32)
    # dy 40, W 60, D 48, s 16, U 80, x 24, t (3 of 4 ranks) 24 ; dx 24, dD 24, ds 4, dU 40
    assert (c.bytes_read, c.bytes_written) == (292, 92)
    assert c.flops == 2 * 2 * (15 + 20 + 12) + 2 * 2 * 2 * 3 + 2 * 2 * 5 * 2 + 2 * 2 * 1
    frozen = backward_floor(2, 3, 5, 4, dtype=torch.float32)  # no factor grads: no x, no t
    assert (frozen.bytes_read, frozen.bytes_written, frozen.flops) == (244, 24, 188)
    with pytest.raises(ValueError, match="grad_up_cols"):
        backward_floor(2, 3, 5, 4, grad_up_cols=5)


def test_nf4_weight_bytes_matches_design():
    # NF4 4096x4096 ~ 8.7 MB: packed codes + uint8 absmax + absmax2 + code map + offset
    assert nf4_weight_bytes(4096, 4096) == 8_388_608 + 262_144 + 4 * 1024 + 1024 + 4
    assert nf4_weight_bytes(4096, 4096, double_quant=False) == 8_388_608 + 4 * 262_144


def test_peft_ops_by_hand():
    m, i, o, r = 3, 16, 8, 2
    ops = peft_lora_forward_ops(m, i, o, r, dtype=torch.float32, dropout=0.1)
    assert [(op.bytes_read, op.bytes_written, op.flops) for op in ops] == [
        (4 * (m * i + o * i + o), 4 * m * o, 2 * m * i * o),  # base linear
        (4 * m * i, 4 * m * i + m * i, 0),  # dropout: output + bool mask
        (4 * (m * i + r * i), 4 * m * r, 2 * m * i * r),  # lora_A
        (4 * (m * r + o * r), 4 * m * o, 2 * m * r * o),  # lora_B
        (4 * m * o, 4 * m * o, 0),  # * scaling
        (8 * m * o, 4 * m * o, 0),  # result + lora
    ]
    assert len(peft_lora_forward_ops(m, i, o, r, dropout=0.1, training=False)) == 5
    dq = peft_lora_forward_ops(8192, 4096, 4096, 16, weight="nf4")
    assert [op.name for op in dq[:5]] == ["bnb dequantize absmax", "absmax + offset", "bnb dequantize_4bit (full W)",
                                         "base linear x@W.T+b", "result.clone()"]
    assert dq[2].bytes_written == dq[3].bytes_read - (8192 * 4096 + 4096) * 2 == 4096 * 4096 * 2
    fused = peft_lora_forward_ops(1, 4096, 4096, 16, weight="nf4")
    assert fused[0].bytes_read == 4096 * 2 + nf4_weight_bytes(4096, 4096) + 4096 * 2
    with pytest.raises(ValueError, match="bnb_path"):
        peft_lora_forward_ops(16, 4096, 4096, 16, weight="nf4")
    assert "total" in format_ops(ops) and f"{predict_ops(ops).us:.2f}" in format_ops(ops)


def test_peft_ops_match_peft_forward():
    # The op list mirrors the top-level torch ops PEFT's LoRA Linear.forward runs.
    peft = pytest.importorskip("peft")  # optional: absent from the oldest-versions job
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model
    from torch.profiler import ProfilerActivity, profile

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 8)),
                           LoraConfig(target_modules=["0"], r=2, lora_alpha=4, lora_dropout=0.1))
    layer = model.base_model.model[0]
    layer.train()
    x = torch.randn(3, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x)
    # the trailing `result.to(dtype)` at an equal dtype launches nothing
    ran = [e.name for e in prof.events() if e.cpu_parent is None and e.name != "aten::to"]
    kind = {"base linear x@W.T+b": "aten::linear", "dropout(x)": "aten::dropout", "lora_A x@A.T": "aten::linear",
            "lora_B h@B.T": "aten::linear", "* scaling": "aten::mul", "result + lora": "aten::add"}
    assert ran == [kind[op.name] for op in peft_lora_forward_ops(3, 16, 8, 2, dropout=0.1)]


def test_predict_h100():
    p = predict_h100(33_554_432, 0, 1, launch_overhead=0.0)  # bf16 4096x4096 read once: ~11 us
    assert p.bound == "memory" and math.isclose(p.seconds, 33_554_432 / 3.0e12)
    q = predict_h100(0, 8e12, 3, launch_overhead=1e-6)
    assert q.bound == "compute" and math.isclose(q.seconds, 0.01 + 3e-6) and "predicted" in str(q)
    # a sequence is predicted op by op: a memory-bound op doesn't hide behind a compute-bound one
    seq = [Op("copy", 1_500_000, 1_500_000), Op("gemm", 0, 0, 800_000_000)]
    s = predict_ops(seq, launch_overhead=1e-6)
    assert s.bound == "mixed" and math.isclose(s.seconds, 1e-6 + 1e-6 + 2e-6)
    assert math.isclose(total_cost(seq).predicted_h100(launch_overhead=1e-6).seconds, 1e-6 + 2e-6)
    floor = forward_floor(1, 4096, 4096, 16)
    ops = peft_lora_forward_ops(1, 4096, 4096, 16)
    assert predict_ops(ops).seconds > floor.predicted_h100().seconds
    table = compare([("floor", floor), ("peft", ops)])
    assert "predicted H100" in table and f"{predict_ops(ops).us:.2f}" in table


def test_address_space_merges_reused_ranges():
    space, key = _AddressSpace(), ("k", "load")
    space.add(100, 200)
    space.add(300, 400)
    space.mark(key, np.array([196, 300], dtype=np.uint64), 4)  # one access spanning two regions
    assert space.unique(key) == 8
    with pytest.raises(CountingError, match="outside"):
        space.mark(key, np.array([250], dtype=np.uint64), 4)  # in the gap
    space.add(150, 350)  # a later storage overlapping both: one region, earlier bits kept
    assert [(r.start, r.end) for r in space.regions] == [(100, 400)]
    space.mark(key, np.array([198, 250], dtype=np.uint64), 4)  # 198..201 overlaps 196..199 by 2 bytes
    assert space.unique(key) == 8 + 2 + 4


def test_segmented_forward_counts_exact():
    """The op's one-launch large-M forward, forced at a small shape (2 segments of 64-wide
    column tiles, 64-row blocks): unique bytes exactly at the floor (x, W, D, s, U read once,
    y written once, no t round trip), FLOPs the floor's products plus the down-projection
    once per segment (R padded to the 16-wide dot)."""
    from speclora_kernels.ops import launch

    from conftest import forced_path

    m, in_f, out_f, r, segments = 128, 64, 320, 12, 2
    x, w = torch.randn(m, in_f), torch.randn(out_f, in_f) / 8
    d, s, u = torch.randn(r, in_f) / 8, torch.rand(r) + 0.5, torch.randn(out_f, r)
    with forced_path("segmented", segments), count_triton() as c:
        y, _ = launch.adapter_forward(x, w, None, d, s, u, 0, 0.0, 0, False)
    ref = x.double() @ w.double().T + ((x.double() @ d.double().T) * s.double()) @ u.double().T
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    k = c.total()
    floor = forward_floor(m, in_f, out_f, r, dtype=torch.float32, bias=False)
    assert list(c.per_kernel()) == ["fwd_kernel"] and k.launches == 1
    assert k.programs == (m // 64) * segments
    assert k.unique_bytes == floor.bytes
    block_r = 16
    assert k.dot_flops == 2 * m * (in_f * out_f + in_f * block_r * segments + block_r * out_f)
