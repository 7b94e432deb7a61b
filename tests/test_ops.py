"""The fused op against the float64 reference: on the GPU when there is one, else in the
Triton interpreter on CPU (the ``device`` fixture).

Every kernel output buffer is poisoned with NaN before the kernels run (``poison_outputs``),
so a single element a kernel fails to write shows up as a NaN or a mismatch. bf16 runs on a
GPU only; here it is covered by compilation (tests/test_compile_report.py): the
interpreter's bf16 dot is broken (triton#11584), fp16 and fp32 run the same code.
"""
import itertools
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from speclora_kernels import dropout as op_dropout  # noqa: E402
from speclora_kernels.ops import (  # noqa: E402  # noqa: E402
    autograd,
    dropout_keep_mask,
    dropout_seed,
    fused_adapter_linear,
    launch,
    plan,
    recipe,
    reference_adapter_linear,
    tuning,
)
from speclora_kernels.ops.kernels.common import keep_mask  # noqa: E402

from conftest import OP_DTYPES, TOL, forced_path, kernel_launches, rel_err  # noqa: E402

pytestmark = [pytest.mark.skipif(not tuning.INTERPRET and not torch.cuda.is_available(),
                                 reason="needs TRITON_INTERPRET=1 (set by conftest) or a GPU"),
              pytest.mark.usefixtures("poison_outputs")]


def make_inputs(shape_x, out_f, rank, dtype, device, bias=True,
                grads=("x", "down", "scale", "up"), scale_dtype=torch.float32):
    in_f = shape_x[-1]
    t = {
        "x": torch.randn(*shape_x, dtype=dtype),
        "weight": (torch.randn(out_f, in_f) / in_f ** 0.5).to(dtype),
        "bias": torch.randn(out_f).to(dtype) if bias else None,
        "down": (torch.randn(rank, in_f) / in_f ** 0.5).to(dtype),
        "scale": (torch.rand(rank) + 0.5).to(scale_dtype),
        "up": torch.randn(out_f, rank).to(dtype),
    }
    t = {n: v.to(device) if v is not None else None for n, v in t.items()}
    for name in grads:
        if t[name] is not None:
            t[name].requires_grad_()
    return t


def run_op(t, dropout_p, dropout_rows, grad_rows, seed=1234):
    """The op's output and its gradients wrt every input that requires grad, plus the
    keep-mask the kernels drew (regenerated from the same seed)."""
    torch.manual_seed(seed)
    y = fused_adapter_linear(t["x"], t["weight"], t["bias"], t["down"], t["scale"], t["up"],
                             dropout_p, dropout_rows, grad_rows)
    torch.manual_seed(seed + 1)
    dy = torch.randn_like(y)
    names = [n for n, v in t.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(y, [t[n] for n in names], dy) if names else []
    torch.manual_seed(seed)
    mask = (dropout_keep_mask(dropout_seed(t["x"].device), t["x"].shape, dropout_p)
            if dropout_p else None)
    return y, dy, dict(zip(names, grads)), mask


def check_against_reference(t, dropout_p, dropout_rows, grad_rows, y, dy, grads, mask):
    """Compare output and gradients with the float64 reference fed the kernels' mask."""
    tol = TOL[t["x"].dtype]
    ref = {n: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
           for n, v in t.items()}
    y_ref = reference_adapter_linear(ref["x"], ref["weight"], ref["bias"], ref["down"],
                                     ref["scale"], ref["up"], dropout_p, dropout_rows,
                                     grad_rows, mask=mask)
    assert y.dtype == t["x"].dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < tol
    names = list(grads)
    ref_grads = torch.autograd.grad(y_ref, [ref[n] for n in names], dy.double()) if names else []
    for name, want in zip(names, ref_grads):
        got = grads[name]
        assert got.dtype == t[name].dtype and got.shape == t[name].shape, name
        assert rel_err(got, want) < tol, name


# ----------------------------------------------------------------------------- dropout
def test_philox_known_answer():
    """Random123's Philox-4x32-10 known-answer vector (counter 0, key 0)."""
    words = op_dropout.philox4x32(0, torch.tensor([0]))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@triton.jit
def _randint4x_kernel(out_ptr, counter_ptr, seed, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    counters = tl.load(counter_ptr + i, mask=i < n, other=0)
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    tl.store(out_ptr + i, w0.to(tl.int64), mask=i < n)
    tl.store(out_ptr + n + i, w1.to(tl.int64), mask=i < n)
    tl.store(out_ptr + 2 * n + i, w2.to(tl.int64), mask=i < n)
    tl.store(out_ptr + 3 * n + i, w3.to(tl.int64), mask=i < n)


def test_philox_matches_triton_for_64bit_counters(device):
    counters = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, 3 * 2**40 + 77],
                            dtype=torch.int64)
    out = torch.empty(4, len(counters), dtype=torch.int64, device=device)
    for seed in (0, 987654321):
        _randint4x_kernel[(1,)](out, counters.to(device), seed, len(counters), BLOCK=8)
        assert torch.equal(out.cpu(), torch.stack(op_dropout.philox4x32(seed, counters)))


@triton.jit
def _keep_kernel(out_ptr, M, K, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    keep = keep_mask(seed, offs_m, k0, K, dropout_p, BLOCK_M, BLOCK_K)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@pytest.mark.parametrize("shape,p", [((5, 40), 0.3), ((2, 3, 7), 0.1), ((33, 200), 0.5)])
def test_keep_mask_is_the_kernels_mask(shape, p, device):
    M, K = shape[0] * (shape[1] if len(shape) == 3 else 1), shape[-1]
    out = torch.zeros(M, K, dtype=torch.int8, device=device)
    _keep_kernel[(triton.cdiv(M, 16), triton.cdiv(K, 32))](out, M, K, 777, p, BLOCK_M=16,
                                                            BLOCK_K=32)
    assert torch.equal(out.cpu().bool().reshape(shape), dropout_keep_mask(777, shape, p))


def test_keep_mask_statistics_and_seeding():
    p = 0.3
    mask = dropout_keep_mask(5, (400, 250), p)
    n = mask.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs((1 - mask.float().mean().item()) - p) < 5 * sigma
    assert not torch.equal(mask, dropout_keep_mask(6, (400, 250), p))
    torch.manual_seed(3)
    first = dropout_seed()
    torch.manual_seed(3)
    assert int(dropout_seed()) == int(first)


# ----------------------------------------------------------------------------- kernel grid
def covering_rows(axes: dict) -> list[dict]:
    """Deterministic greedy all-pairs design: every pair of values of any two axes appears
    in some row (far fewer rows than the cartesian product)."""
    names = list(axes)
    todo = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
            for va in axes[a] for vb in axes[b]}
    rows = []
    while todo:
        a, va, b, vb = min(todo, key=lambda q: (names.index(q[0]), names.index(q[2]), str(q)))
        row = {a: va, b: vb}
        for name in names:
            if name in row:
                continue
            row[name] = max(axes[name], key=lambda v: sum(
                (x, row[x], name, v) in todo or (name, v, x, row[x]) in todo for x in row))
        rows.append(row)
        todo -= {(x, row[x], y, row[y]) for x, y in itertools.combinations(names, 2)}
    return rows


GRID_AXES = {
    "M": [1, 3, 64, 130],
    "in_f": [64, 96, 200],
    "out_f": [64, 96, 200],
    "R": [1, 8, 24],
    "dtype": [torch.float32, torch.float16],
    "bias": [True, False],
    "path": ["fused", "split"],
    "rows": ["all", "partial"],  # partial: dropout_rows < grad_rows < R (SpecLoRA-like)
    "dropout": [0.0, 0.3],
}
GRID = covering_rows(GRID_AXES)


def test_grid_covers_every_pair():
    for a, b in itertools.combinations(GRID_AXES, 2):
        seen = {(row[a], row[b]) for row in GRID}
        assert seen == set(itertools.product(GRID_AXES[a], GRID_AXES[b])), (a, b)
    assert len(GRID) < 30


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(
    str(v).replace("torch.", "") for v in c.values()))
def test_forward_and_gradients_match_reference(case, device):
    R = case["R"]
    rd, rg = ((R + 1) // 2, max(1, R - 2)) if case["rows"] == "partial" else (None, None)
    shape = (case["M"], case["in_f"])
    if case["M"] == 3:  # leading batch dims
        shape = (1, 3, case["in_f"])
    torch.manual_seed(case["M"] * 1000 + R)
    t = make_inputs(shape, case["out_f"], R, case["dtype"], device, bias=case["bias"],
                    grads=("x", "bias", "down", "scale", "up"))
    with forced_path(case["path"]):
        y, dy, grads, mask = run_op(t, case["dropout"], rd, rg)
    check_against_reference(t, case["dropout"], rd, rg, y, dy, grads, mask)
    if rg is not None and rg < R:  # frozen rows: exact zeros, written by the kernel
        assert not grads["down"][rg:].any() and not grads["up"][:, rg:].any()


def test_noncontiguous_inputs_and_fp16_scale(device):
    torch.manual_seed(0)
    big = torch.randn(7, 2 * 80, dtype=torch.float16, device=device)
    t = make_inputs((7, 80), 48, 8, torch.float16, device, scale_dtype=torch.float16)
    t["x"] = big[:, ::2].detach().requires_grad_()                  # strided rows
    t["weight"] = t["weight"].T.contiguous().T                     # column-major W
    t["up"] = t["up"].detach().T.contiguous().T.requires_grad_()   # column-major U
    for path in ("fused", "split"):
        with forced_path(path):
            y, dy, grads, mask = run_op(t, 0.2, 5, None)
        check_against_reference(t, 0.2, 5, None, y, dy, grads, mask)


# ----------------------------------------------------------------------------- methods
def method_inputs(method, dtype, device, M=5, in_f=72, out_f=40, r=6, k=2):
    """(inputs, dropout_p, dropout_rows, grad_rows) mirroring each method's gradient needs."""
    if method == "speclora":  # [A; Q_k.T], scale [alpha/r; sigma * m], grads via A, B, m
        t = make_inputs((M, in_f), out_f, r + k, dtype, device, grads=("x", "down", "scale", "up"))
        return t, 0.1, r, r
    if method == "lora":
        t = make_inputs((M, in_f), out_f, r, dtype, device, grads=("x", "down", "up"))
        return t, 0.1, None, None
    if method == "spectral_additive":
        t = make_inputs((M, in_f), out_f, r, dtype, device, grads=("x", "down", "up"))
        return t, 0.0, None, None
    if method == "spectral_rotational":
        t = make_inputs((M, in_f), out_f, r, dtype, device, grads=("x", "down", "scale", "up"))
        return t, 0.0, None, None
    if method == "pica":  # frozen Q_r.T, trainable M
        t = make_inputs((M, in_f), out_f, r, dtype, device, grads=("x", "up"))
        return t, 0.0, None, None
    raise ValueError(method)


METHODS = ["lora", "speclora", "spectral_additive", "spectral_rotational", "pica"]


@pytest.mark.parametrize("path", ["fused", "split", "segmented"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_method_patterns(method, dtype, path, device):
    torch.manual_seed(METHODS.index(method))
    # segmented: 3 column tiles, segments of 2 and 1
    t, p, rd, rg = method_inputs(method, dtype, device, out_f=136 if path == "segmented" else 40)
    with forced_path(path), tuning.record_launches() as launches:
        y, dy, grads, mask = run_op(t, p, rd, rg)
    check_against_reference(t, p, rd, rg, y, dy, grads, mask)
    # no gradient work for frozen factors: the factor kernel only gets the roles it needs
    factor = [args for kernel, args in launches if kernel is tuning.FACTOR]
    assert len(factor) == 1
    assert factor[0]["NEED_DD"] == t["down"].requires_grad
    assert factor[0]["NEED_DS"] == t["scale"].requires_grad
    assert factor[0]["NEED_DU"] == t["up"].requires_grad
    assert factor[0]["grad_rows"] == (rg if rg is not None else t["down"].shape[0])
    if method == "speclora":
        assert not grads["down"][rg:].any() and not grads["up"][:, rg:].any()


# ----------------------------------------------------------------------------- launches
@pytest.mark.parametrize("path,fwd,bwd", [
    ("fused", ["fwd_kernel"], ["dx_kernel", "factor_grad_kernel"]),
    ("split", ["proj_kernel", "fwd_kernel"],
     ["proj_kernel", "dx_kernel", "factor_grad_kernel"]),
    ("segmented", ["fwd_kernel"], ["dx_kernel", "factor_grad_kernel"]),
])
def test_launches_per_forward_and_backward(path, fwd, bwd, device):
    """Forward: 1 launch fused or segmented, 2 split. Backward with every gradient: 2 fused
    or segmented, 3 split."""
    torch.manual_seed(0)
    t = make_inputs((4, 64), 96, 8, torch.float32, device)
    with forced_path(path):
        with kernel_launches() as names:
            y = fused_adapter_linear(t["x"], t["weight"], t["bias"], t["down"], t["scale"],
                                     t["up"], 0.1)
        assert names == fwd
        with kernel_launches() as names:
            y.sum().backward()
        assert names == bwd


def test_launches_for_frozen_adapter_and_inference(device):
    torch.manual_seed(0)
    t = make_inputs((4, 64), 96, 8, torch.float32, device, grads=("x",))
    with kernel_launches() as names:
        y = fused_adapter_linear(t["x"], t["weight"], None, t["down"], t["scale"], t["up"])
        y.sum().backward()
    assert names == ["fwd_splitk_kernel", "dx_kernel"]  # decode; no factor gradients at all
    with kernel_launches() as names, torch.no_grad():
        fused_adapter_linear(t["x"], t["weight"], None, t["down"], t["scale"], t["up"], 0.5,
                             training=False)
    assert names == ["fwd_splitk_kernel"]


def test_path_choice():
    assert plan.use_fused_path(16, 4096, 4096, 16)        # decode: one launch
    assert plan.use_fused_path(1, 4096, 4096, 64)
    assert plan.use_fused_path(500, 4096, 4096, 16)
    assert not plan.use_fused_path(256, 4096, 4096, 64)   # recompute costs more than a launch
    assert not plan.use_fused_path(512, 256, 256, 8)      # compute-bound: FLOPs at the floor
    assert not plan.use_fused_path(16, 4096, 4096, 128)   # rank too wide for registers
    assert not plan.use_fused_path(16, 64, 64, 24)        # D re-reads > W/4 at any tile
    # dropout: every column tile regenerates the mask of its x tiles
    assert plan.use_fused_path(16, 4096, 4096, 16, dropout=True)
    assert not plan.use_fused_path(128, 1024, 1024, 16, dropout=True)


# ----------------------------------------------------------------------------- segmented
SEGMENT_CASES = [
    # (M, in_f, out_f, R, dtype, bias, dropout, rows, segments): 64-wide column tiles of y
    # (out_f) and dx (in_f), segments of ceil(tiles / segments) tiles
    (130, 200, 300, 24, torch.float32, True, 0.3, "partial", 2),  # y: 3 + 2, dx: 2 + 2
    (130, 136, 300, 24, torch.float16, False, 0.3, "all", 2),     # dx: 2 + 1
    (1, 200, 200, 8, torch.float16, True, 0.0, "all", 3),         # 2 + 2
    (64, 328, 328, 1, torch.float32, False, 0.0, "partial", 3),   # 2 + 2 + 2
    (3, 72, 136, 64, torch.float32, True, 0.2, "all", 1),         # R = 64, one segment
]


@pytest.mark.parametrize("case", SEGMENT_CASES, ids=lambda c: "-".join(
    str(v).replace("torch.", "") for v in c))
def test_segmented_forward_matches_reference(case, device):
    """The large-M forward and dx kernels (a program per row block and column segment, t or
    g computed once per segment; no projection kernel) at small shapes, forward and every
    gradient vs float64."""
    M, in_f, out_f, R, dtype, bias, p, rows, segments = case
    rd, rg = ((R + 1) // 2, max(1, R - 2)) if rows == "partial" else (None, None)
    torch.manual_seed(M + R)
    t = make_inputs((M, in_f), out_f, R, dtype, device, bias=bias,
                    grads=("x", "bias", "down", "scale", "up"))
    with forced_path("segmented", segments), tuning.record_launches() as launches:
        y, dy, grads, mask = run_op(t, p, rd, rg)
        for kernel, args in launches[:2]:
            assert args["SEGMENTED"] and args["n_segments"] == segments
            assert any(kernel.fits(c, args) for c in kernel.configs)  # not the fallback
    check_against_reference(t, p, rd, rg, y, dy, grads, mask)
    assert [kernel for kernel, _ in launches] == [tuning.FWD, tuning.DX, tuning.FACTOR]


def test_segment_choice(monkeypatch):
    """Opt-in (SPECLORA_SEGMENTED=1); then segments only where they fill an H100 twice over
    at <= 5% extra FLOPs; forward and dx take the same rule (dx's output width is in_f)."""
    monkeypatch.delenv(plan.SEGMENTED_ENV, raising=False)
    assert plan.segment_count(8192, 4096, 48) == 0
    monkeypatch.setenv(plan.SEGMENTED_ENV, "1")
    assert plan.segment_count(8192, 4096, 48) == 3     # 128 row blocks x 3 = 384 programs
    assert plan.segment_count(8192, 14336, 48) == 3
    assert plan.segment_count(16384, 4096, 48) == 2
    assert plan.segment_count(8192, 4096, 48, sms=108) == 2
    assert plan.segment_count(4096, 4096, 48) == 0     # needs 5 segments > 4096 / (20 * 64)
    assert plan.segment_count(512, 4096, 48) == 0      # needs 33: would starve the GPU
    assert plan.segment_count(8192, 1024, 48) == 0     # segment narrower than 20 rank blocks
    assert plan.segment_count(8192, 4096, 128) == 0    # t does not fit in registers
    with plan.forced_plan("segmented", 5):
        assert plan.gemm_plan(16, 64, 8, 8, rank_cap=64) == plan.Plan("segmented", 5)
    assert plan.gemm_plan(16, 64, 8, 8, rank_cap=64) == plan.Plan("fused")
    assert plan.gemm_plan(8192, 4096, 4096, 48, rank_cap=64) == plan.Plan("segmented", 3)
    with pytest.raises(ValueError, match="path"):
        plan.forced_plan("fast").__enter__()
    # the launcher: one launch, row tiles of 64, 384 programs, x read by no other kernel
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, w = torch.empty(8192, 4096, **meta), torch.empty(4096, 4096, **meta)
    d, u = torch.empty(48, 4096, **meta), torch.empty(4096, 48, **meta)
    with tuning.record_launches(dry_run=True) as launches:
        launch.adapter_forward(x, w, None, d, torch.empty(48, device="meta"), u, 0, 0.1, 16, True)
    assert [kernel for kernel, _ in launches] == [tuning.FWD]
    args = launches[0][1]
    assert args["SEGMENTED"] and args["FUSE_DOWN"] and args["STORE_T"] and args["HAS_DROPOUT"]
    configs = tuning.FWD.candidates(args, limit=1 << 40)
    assert configs and all(c.kwargs["BLOCK_M"] == 64 for c in configs)
    assert {tuning.FWD.grid({**args, **c.kwargs})[0] for c in configs} == {384}
    with tuning.record_launches(dry_run=True) as launches:
        launch.adapter_backward(torch.empty(8192, 4096, **meta), x, w, d,
                            torch.empty(48, device="meta"), u,
                            torch.empty(8192, 48, device="meta"), 0, 0.1, 16, 16, True, True,
                            True, True)
    assert [kernel for kernel, _ in launches] == [tuning.DX, tuning.FACTOR]   # g from the dx kernel
    args = launches[0][1]
    assert args["SEGMENTED"] and args["FUSE_UP"] and args["STORE_G"] and args["n_segments"] == 3
    configs = tuning.DX.candidates(args, limit=1 << 40)
    assert configs and all(c.kwargs["BLOCK_M"] == 64 for c in configs)
    assert {tuning.DX.grid({**args, **c.kwargs})[0] for c in configs} == {384}


def test_config_pruning():
    x = torch.empty(16, 4096, dtype=torch.bfloat16, device="meta")
    args = dict(x_ptr=x, M=16, N=4096, K=4096, R=64, FUSE_DOWN=True, SEGMENTED=False,
                n_segments=1, HAS_DROPOUT=True, BLOCK_R=64)
    fused = tuning.FWD.candidates(args, limit=1 << 40)
    assert fused and all(c.kwargs["BLOCK_M"] == 16 and c.kwargs["BLOCK_N"] >= 256 for c in fused)
    train = tuning.FWD.candidates({**args, "M": 8192, "R": 16, "FUSE_DOWN": False, "BLOCK_R": 16},
                              limit=100 * 1024)
    assert train and all(c.kwargs["BLOCK_M"] >= 64 for c in train)
    assert all(tuning.FWD.smem_bytes(c, {**args, "FUSE_DOWN": False, "BLOCK_R": 16}) <= 100 * 1024
               for c in train)
    # nothing fits 1 KB: fall back to the smallest footprint rather than fail
    assert len(tuning.FWD.candidates(args, limit=1024)) == 1


# ----------------------------------------------------------------------------- dispatch
@pytest.mark.skipif(not tuning.INTERPRET, reason="CPU tensors run Triton only in the interpreter")
def test_interpreter_runs_triton_on_cpu_tensors():
    t = make_inputs((2, 64), 64, 8, torch.float32, "cpu")
    with kernel_launches() as names:
        fused_adapter_linear(t["x"], t["weight"], None, t["down"], t["scale"], t["up"])
    assert names  # CPU tensors went through the Triton kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_backend_matches_kernels_and_reference(dtype):
    """The CPU backend (what CPU tensors run without the interpreter): same mask, same math
    as the kernels (in the interpreter) and the reference."""
    torch.manual_seed(0)
    t = make_inputs((6, 48), 40, 8, dtype, "cpu")
    compare = tuning.INTERPRET and dtype != torch.bfloat16
    if compare:
        y_k, dy_k, g_k, _ = run_op(t, 0.25, 5, 7)
    with autograd.cpu_path(), kernel_launches() as names:
        y, dy, grads, mask = run_op(t, 0.25, 5, 7)
    assert names == []
    tol = {torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    ref = {n: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
           for n, v in t.items()}
    y_ref = reference_adapter_linear(ref["x"], ref["weight"], ref["bias"], ref["down"],
                                     ref["scale"], ref["up"], 0.25, 5, 7, mask=mask)
    assert rel_err(y, y_ref) < tol
    want = torch.autograd.grad(y_ref, [ref[n] for n in grads], dy.double())
    for (name, got), w in zip(grads.items(), want):
        assert rel_err(got, w) < tol, name
    if compare:  # the kernels drew the same mask from the same seed
        assert rel_err(y_k, y.to(y_k.dtype)) < tol


def test_float64_runs_pytorch_path(device):
    torch.manual_seed(0)
    t = make_inputs((3, 32), 24, 4, torch.float64, device, scale_dtype=torch.float64)
    with kernel_launches() as names:
        y, dy, grads, mask = run_op(t, 0.0, None, None)
    assert names == []
    check_against_reference(t, 0.0, None, None, y, dy, grads, mask)


def test_rejects_bad_arguments(device):
    t = make_inputs((2, 32), 24, 4, torch.float32, device, grads=())
    args = [t["x"], t["weight"], t["bias"], t["down"], t["scale"], t["up"]]
    with pytest.raises(TypeError, match="weight"):
        fused_adapter_linear(args[0], args[1].half(), *args[2:])
    with pytest.raises(TypeError, match="scale"):
        fused_adapter_linear(*args[:4], args[4].to(torch.bfloat16), args[5])
    with pytest.raises(ValueError, match="up"):
        fused_adapter_linear(*args[:5], args[5][:, :3])
    with pytest.raises(ValueError, match="dropout_p"):
        fused_adapter_linear(*args, dropout_p=1.0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph():
    """A module using the op compiles with fullgraph=True (inductor, CPU) and matches eager,
    dropout included (fallback_random: the compiled seed draw equals eager's)."""
    import torch._inductor.config as inductor_config

    class SpecLoRALike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(48, 32) / 6, requires_grad=False)
            self.a = torch.nn.Parameter(torch.randn(4, 32) / 6)
            self.b = torch.nn.Parameter(torch.randn(48, 4))
            self.m = torch.nn.Parameter(torch.randn(2))
            self.register_buffer("q", torch.randn(2, 32) / 6)
            self.register_buffer("p", torch.randn(48, 2))

        def forward(self, x):
            down = torch.cat([self.a, self.q])
            scale = torch.cat([torch.full((4,), 2.0), 1.5 * self.m])
            up = torch.cat([self.b, self.p], dim=1)
            return fused_adapter_linear(torch.relu(x), self.weight, None, down, scale, up,
                                        0.25, 4, 4)

    torch.manual_seed(0)
    module = SpecLoRALike()
    x = torch.randn(2, 3, 32, requires_grad=True)
    params = [x, module.a, module.b, module.m]
    results = []
    # config.patch, not monkeypatch: undoing a setattr on the config module hides the
    # option from every later compile in the process.
    with inductor_config.patch(fallback_random=True):
        for fn in (module, torch.compile(module, fullgraph=True)):
            torch.manual_seed(1)
            y = fn(x)
            results.append((y, torch.autograd.grad((y * y).sum(), params)))
    (y0, g0), (y1, g1) = results
    assert rel_err(y1, y0) < 1e-5
    for a, b in zip(g1, g0):
        assert rel_err(a, b) < 1e-5
    # no grad: eager takes the op's inference path (no autograd.Function), compiled the
    # custom op; same seed, same mask, same y as with gradients
    with torch.no_grad(), inductor_config.patch(fallback_random=True):
        for fn in (module, torch.compile(module, fullgraph=True)):
            torch.manual_seed(1)
            assert rel_err(fn(x), y0) < 1e-5



@pytest.mark.parametrize("path", ["fused", "split"])
def test_float32_factors_with_16bit_input(path, device):
    """D and U as float32 parameters with fp16 activations: rounded to fp16 as the kernels
    load them (no cast op before the call), gradients come back in float32."""
    torch.manual_seed(7)
    t = make_inputs((9, 72), 40, 6, torch.float16, device, grads=("x", "down", "scale", "up"))
    for name in ("down", "up"):
        t[name] = t[name].detach().float().requires_grad_()
    with forced_path(path):
        y, dy, grads, mask = run_op(t, 0.2, 4, None)
    assert grads["down"].dtype == grads["up"].dtype == torch.float32
    rounded = {n: (v.detach().half().double() if n in ("down", "up") else v.detach().double())
               if v is not None else None for n, v in t.items()}
    ref = {n: v.requires_grad_(t[n].requires_grad) if v is not None else None
           for n, v in rounded.items()}
    y_ref = reference_adapter_linear(ref["x"], ref["weight"], ref["bias"], ref["down"],
                                     ref["scale"], ref["up"], 0.2, 4, None, mask=mask)
    assert rel_err(y, y_ref) < TOL[torch.float16]
    want = torch.autograd.grad(y_ref, [ref[n] for n in grads], dy.double())
    for (name, got), w in zip(grads.items(), want):
        assert rel_err(got, w) < TOL[torch.float16], name


# ----------------------------------------------------------------------------- split-K decode
SPLITK_CASES = [
    # (M, in_f, out_f, R, dtype, bias, dropout, rows, splits, block_n): slices of 64 columns,
    # the last one short where in_f is no multiple; column tiles not dividing out_f
    (1, 200, 150, 12, torch.float32, True, 0.0, "all", 4, 32),
    (16, 200, 150, 24, torch.float16, False, 0.3, "partial", 3, 64),
    (5, 64, 40, 1, torch.float32, True, 0.3, "all", 1, 32),
    (3, 328, 96, 64, torch.float16, True, 0.0, "partial", 6, 32),
]


@pytest.mark.parametrize("case", SPLITK_CASES, ids=lambda c: "-".join(
    str(v).replace("torch.", "") for v in c))
def test_splitk_forward_matches_reference(case, device):
    """The decode forward as one split-K launch: partial sums of y and t per slice of K, the
    last program of a tile reduces them in slice order; forward and every gradient vs
    float64 (the backward runs the usual kernels on the t the split-K launch saved)."""
    M, in_f, out_f, R, dtype, bias, p, rows, splits, block_n = case
    rd, rg = ((R + 1) // 2, max(1, R - 2)) if rows == "partial" else (None, None)
    torch.manual_seed(M * 7 + R)
    t = make_inputs((M, in_f), out_f, R, dtype, device, bias=bias,
                    grads=("x", "bias", "down", "scale", "up"))
    with plan.forced_plan("splitk", splits=splits, block_n=block_n), \
            tuning.record_launches() as launches:
        y, dy, grads, mask = run_op(t, p, rd, rg)
        args = launches[0][1]
        assert args["n_splits"] == triton.cdiv(in_f, plan.split_slice(in_f, splits))
        assert any(tuning.SPLITK.fits(c, args) for c in tuning.SPLITK.configs)
    assert [k.name for k, _ in launches][0] == "fwd_splitk_kernel"
    check_against_reference(t, p, rd, rg, y, dy, grads, mask)


def test_splitk_reuses_its_counters_and_is_bitwise_stable(device):
    """Each launch leaves its arrival counters at zero (the next one reduces again), and the
    reduction order is fixed: repeated calls give the same bits."""
    torch.manual_seed(3)
    t = make_inputs((2, 256), 96, 8, torch.float32, device, grads=())
    with plan.forced_plan("splitk", splits=4, block_n=32), torch.no_grad():
        ys = [fused_adapter_linear(t["x"], t["weight"], t["bias"], t["down"], t["scale"],
                                   t["up"]) for _ in range(3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert not any(c.any() for c in recipe._counters.values() if c.device.type == device)


@pytest.mark.parametrize("out_f", [1, 7, 40])
def test_decode_plan_takes_any_width(out_f, device):
    """The op's own decode plan (nothing forced) at layer widths below every split-K column
    tile: split-K with the narrowest tile, forward and gradients vs float64."""
    torch.manual_seed(out_f)
    t = make_inputs((3, 200), out_f, 4, torch.float32, device, grads=("x", "down", "up"))
    with tuning.record_launches() as launches:
        y, dy, grads, mask = run_op(t, 0.0, None, None)
    assert launches[0][0] is tuning.SPLITK and launches[0][1]["BLOCK_N"] == 32
    check_against_reference(t, 0.0, None, None, y, dy, grads, mask)


def test_decode_plans_fill_the_gpu():
    """At decode (M <= 16), for every Llama-3-8B / Mistral-7B / Qwen2.5-7B projection and
    R <= 64, dense and NF4: split-K with >= 2 waves of programs on 132 SMs."""
    from speclora_kernels.tools.floors import NF4_DECODE_TABLE_BYTES, nf4_weight_bytes

    shapes = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (3584, 3584),
              (512, 3584), (18944, 3584), (3584, 18944)]
    for (N, K), M, R, nf4 in itertools.product(shapes, (1, 16), (16, 48, 64), (False, True)):
        weight = nf4_weight_bytes(N, K) + NF4_DECODE_TABLE_BYTES if nf4 else 2 * N * K
        p = plan.forward_plan(M, N, K, R, rank_cap=64, weight_bytes=weight, element_size=2,
                              nf4=nf4)
        assert p.path == "splitk", (N, K, M, R, nf4)
        programs = triton.cdiv(N, p.block_n) * triton.cdiv(K, plan.split_slice(K, p.splits))
        assert programs >= 2 * 132, (N, K, M, R, nf4, p)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_factor_gradients_split_over_rows(dropout, device):
    """At M >= 512 each factor-gradient tile is reduced by several programs over slices of
    rows (summed in slice order by the last to arrive): every gradient vs float64, and the
    same bits run after run."""
    torch.manual_seed(11)
    t = make_inputs((600, 40), 36, 8, torch.float32, device, grads=("x", "down", "scale", "up"))
    results = []
    for _ in range(2):
        with tuning.record_launches() as launches:
            y, dy, grads, mask = run_op(t, dropout, 5, 6)
        factor = [args for kernel, args in launches if kernel is tuning.FACTOR]
        assert factor and factor[0]["n_msplits"] > 1 and factor[0]["SPLIT_M"]
        results.append(grads)
    check_against_reference(t, dropout, 5, 6, y, dy, grads, mask)
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    assert plan.factor_splits(511, 10) == 1 and plan.factor_splits(8192, 10) > 1
