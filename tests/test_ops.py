"""The fused op against the float64 reference, in the Triton interpreter on CPU.

Every kernel output buffer is poisoned with NaN before the kernels run (autouse fixture),
so a single element a kernel fails to write shows up as a NaN or a mismatch.
bf16 is covered by compilation (tests/test_compile_report.py): the interpreter's bf16 dot
is broken (triton#11584), fp16 and fp32 run the same code.
"""
import contextlib
import itertools
import os
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from speclora_kernels import reference  # noqa: E402
from speclora_kernels.ops import dropout_keep_mask, dropout_seed, fused_adapter_linear  # noqa: E402,E501
from speclora_kernels.ops import autograd as op_autograd  # noqa: E402
from speclora_kernels.ops import dropout as op_dropout  # noqa: E402
from speclora_kernels.ops import fused_linear as fl  # noqa: E402

pytestmark = pytest.mark.skipif(not fl.INTERPRET and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set by conftest) or a GPU")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer a kernel writes starts as NaN."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(fl, "_empty", nan_empty)


@contextlib.contextmanager
def kernel_launches():
    """Names of the Triton kernels actually executed (interpreter launches)."""
    names, run = [], InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        names.append(self.__name__)
        return run(self, *args, **kwargs)

    InterpretedFunction.run = counting_run
    try:
        yield names
    finally:
        InterpretedFunction.run = run


SEGMENTS = 2  # forced segmented path: 2 segments of the 64-wide output column tiles


def narrow_configs(configs, out="BLOCK_K"):
    """Configs with 64-wide output tiles (``out``: BLOCK_N forward, BLOCK_K dx), at 8 warps
    as the segmented kernels require (warps mean nothing to the interpreter)."""
    return [triton.Config(c.kwargs, num_warps=8, num_stages=c.num_stages) for c in configs
            if c.kwargs[out] == 64]


@contextlib.contextmanager
def forced_path(path):
    """Force the fused, split or segmented path (None: the launcher's own choice).

    "segmented": the one-launch large-M forward and dx at a small shape, ``SEGMENTS``
    segments of 64-wide output column tiles (the interpreter would otherwise take one tile
    as wide as the output), so that outputs wider than 64 give segments of several tiles."""
    chooser, configs = fl.use_fused_path, (fl.FWD.configs, fl.DX.configs)
    if path is not None:
        fl.use_fused_path = lambda *shape, dropout=False: path == "fused"
    if path == "segmented":
        fl.FWD.configs = narrow_configs(configs[0], "BLOCK_N")
        fl.DX.configs = narrow_configs(configs[1])
    try:
        with fl.pinned_segments(SEGMENTS if path == "segmented" else None):
            yield
    finally:
        fl.use_fused_path, (fl.FWD.configs, fl.DX.configs) = chooser, configs


def rel_err(got, want):
    assert torch.isfinite(got).all(), "non-finite values (an unwritten poisoned element?)"
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def make_inputs(shape_x, out_f, rank, dtype, bias=True, grads=("x", "down", "scale", "up"),
                scale_dtype=torch.float32):
    in_f = shape_x[-1]
    t = {
        "x": torch.randn(*shape_x, dtype=dtype),
        "weight": (torch.randn(out_f, in_f) / in_f ** 0.5).to(dtype),
        "bias": torch.randn(out_f).to(dtype) if bias else None,
        "down": (torch.randn(rank, in_f) / in_f ** 0.5).to(dtype),
        "scale": (torch.rand(rank) + 0.5).to(scale_dtype),
        "up": torch.randn(out_f, rank).to(dtype),
    }
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
    mask = dropout_keep_mask(dropout_seed(), t["x"].shape, dropout_p) if dropout_p else None
    return y, dy, dict(zip(names, grads)), mask


def check_against_reference(t, dropout_p, dropout_rows, grad_rows, y, dy, grads, mask):
    """Compare output and gradients with the float64 reference fed the kernels' mask."""
    tol = TOL[t["x"].dtype]
    ref = {n: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
           for n, v in t.items()}
    y_ref = reference.fused_adapter_linear(ref["x"], ref["weight"], ref["bias"], ref["down"],
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


def test_philox_matches_triton_for_64bit_counters():
    counters = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, 3 * 2**40 + 77],
                            dtype=torch.int64)
    out = torch.empty(4, len(counters), dtype=torch.int64)
    for seed in (0, 987654321):
        _randint4x_kernel[(1,)](out, counters, seed, len(counters), BLOCK=8)
        assert torch.equal(out, torch.stack(op_dropout.philox4x32(seed, counters)))


@triton.jit
def _keep_kernel(out_ptr, M, K, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    keep = fl._keep(seed, offs_m, k0, K, dropout_p, BLOCK_M, BLOCK_K)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@pytest.mark.parametrize("shape,p", [((5, 40), 0.3), ((2, 3, 7), 0.1), ((33, 200), 0.5)])
def test_keep_mask_is_the_kernels_mask(shape, p):
    M, K = shape[0] * (shape[1] if len(shape) == 3 else 1), shape[-1]
    out = torch.zeros(M, K, dtype=torch.int8)
    _keep_kernel[(triton.cdiv(M, 16), triton.cdiv(K, 32))](out, M, K, 777, p, BLOCK_M=16,
                                                            BLOCK_K=32)
    assert torch.equal(out.bool().reshape(shape), dropout_keep_mask(777, shape, p))


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
def test_forward_and_gradients_match_reference(case):
    R = case["R"]
    rd, rg = ((R + 1) // 2, max(1, R - 2)) if case["rows"] == "partial" else (None, None)
    shape = (case["M"], case["in_f"])
    if case["M"] == 3:  # leading batch dims
        shape = (1, 3, case["in_f"])
    torch.manual_seed(case["M"] * 1000 + R)
    t = make_inputs(shape, case["out_f"], R, case["dtype"], bias=case["bias"],
                    grads=("x", "bias", "down", "scale", "up"))
    with forced_path(case["path"]):
        y, dy, grads, mask = run_op(t, case["dropout"], rd, rg)
    check_against_reference(t, case["dropout"], rd, rg, y, dy, grads, mask)
    if rg is not None and rg < R:  # frozen rows: exact zeros, written by the kernel
        assert not grads["down"][rg:].any() and not grads["up"][:, rg:].any()


def test_noncontiguous_inputs_and_fp16_scale():
    torch.manual_seed(0)
    big = torch.randn(7, 2 * 80, dtype=torch.float16)
    t = make_inputs((7, 80), 48, 8, torch.float16, scale_dtype=torch.float16)
    t["x"] = big[:, ::2].detach().requires_grad_()                  # strided rows
    t["weight"] = t["weight"].T.contiguous().T                     # column-major W
    t["up"] = t["up"].detach().T.contiguous().T.requires_grad_()   # column-major U
    for path in ("fused", "split"):
        with forced_path(path):
            y, dy, grads, mask = run_op(t, 0.2, 5, None)
        check_against_reference(t, 0.2, 5, None, y, dy, grads, mask)


# ----------------------------------------------------------------------------- methods
def method_inputs(method, dtype, M=5, in_f=72, out_f=40, r=6, k=2):
    """(inputs, dropout_p, dropout_rows, grad_rows) mirroring each method's gradient needs."""
    if method == "speclora":  # [A; Q_k.T], scale [alpha/r; sigma * m], grads via A, B, m
        t = make_inputs((M, in_f), out_f, r + k, dtype, grads=("x", "down", "scale", "up"))
        return t, 0.1, r, r
    if method == "lora":
        t = make_inputs((M, in_f), out_f, r, dtype, grads=("x", "down", "up"))
        return t, 0.1, None, None
    if method == "spectral_additive":
        t = make_inputs((M, in_f), out_f, r, dtype, grads=("x", "down", "up"))
        return t, 0.0, None, None
    if method == "spectral_rotational":
        t = make_inputs((M, in_f), out_f, r, dtype, grads=("x", "down", "scale", "up"))
        return t, 0.0, None, None
    if method == "pica":  # frozen Q_r.T, trainable M
        t = make_inputs((M, in_f), out_f, r, dtype, grads=("x", "up"))
        return t, 0.0, None, None
    raise ValueError(method)


METHODS = ["lora", "speclora", "spectral_additive", "spectral_rotational", "pica"]


@pytest.mark.parametrize("path", ["fused", "split", "segmented"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_method_patterns(method, dtype, path):
    torch.manual_seed(METHODS.index(method))
    # segmented: 3 column tiles, segments of 2 and 1
    t, p, rd, rg = method_inputs(method, dtype, out_f=136 if path == "segmented" else 40)
    with forced_path(path), fl.record_launches() as launches:
        y, dy, grads, mask = run_op(t, p, rd, rg)
    check_against_reference(t, p, rd, rg, y, dy, grads, mask)
    # no gradient work for frozen factors: the factor kernel only gets the roles it needs
    factor = [args for kernel, args in launches if kernel is fl.FACTOR]
    assert len(factor) == 1
    assert factor[0]["NEED_DD"] == t["down"].requires_grad
    assert factor[0]["NEED_DS"] == t["scale"].requires_grad
    assert factor[0]["NEED_DU"] == t["up"].requires_grad
    assert factor[0]["grad_rows"] == (rg if rg is not None else t["down"].shape[0])
    if method == "speclora":
        assert not grads["down"][rg:].any() and not grads["up"][:, rg:].any()


# ----------------------------------------------------------------------------- launches
@pytest.mark.parametrize("path,fwd,bwd", [
    ("fused", ["_fwd_kernel"], ["_dx_kernel", "_factor_grad_kernel"]),
    ("split", ["_proj_kernel", "_fwd_kernel"],
     ["_proj_kernel", "_dx_kernel", "_factor_grad_kernel"]),
    ("segmented", ["_fwd_kernel"], ["_dx_kernel", "_factor_grad_kernel"]),
])
def test_launches_per_forward_and_backward(path, fwd, bwd):
    """Forward: 1 launch fused or segmented, 2 split. Backward with every gradient: 2 fused
    or segmented, 3 split."""
    torch.manual_seed(0)
    t = make_inputs((4, 64), 96, 8, torch.float32)
    with forced_path(path):
        with kernel_launches() as names:
            y = fused_adapter_linear(t["x"], t["weight"], t["bias"], t["down"], t["scale"],
                                     t["up"], 0.1)
        assert names == fwd
        with kernel_launches() as names:
            y.sum().backward()
        assert names == bwd


def test_launches_for_frozen_adapter_and_inference():
    torch.manual_seed(0)
    t = make_inputs((4, 64), 96, 8, torch.float32, grads=("x",))
    with kernel_launches() as names:
        y = fused_adapter_linear(t["x"], t["weight"], None, t["down"], t["scale"], t["up"])
        y.sum().backward()
    assert names == ["_fwd_kernel", "_dx_kernel"]  # no factor gradients at all
    with kernel_launches() as names, torch.no_grad():
        fused_adapter_linear(t["x"], t["weight"], None, t["down"], t["scale"], t["up"], 0.5,
                             training=False)
    assert names == ["_fwd_kernel"]


def test_path_choice():
    assert fl.use_fused_path(16, 4096, 4096, 16)        # decode: one launch
    assert fl.use_fused_path(1, 4096, 4096, 64)
    assert fl.use_fused_path(500, 4096, 4096, 16)
    assert not fl.use_fused_path(256, 4096, 4096, 64)   # recompute costs more than a launch
    assert not fl.use_fused_path(512, 256, 256, 8)      # compute-bound: FLOPs at the floor
    assert not fl.use_fused_path(16, 4096, 4096, 128)   # rank too wide for registers
    assert not fl.use_fused_path(16, 64, 64, 24)        # D re-reads > W/4 at any tile
    # dropout: every column tile regenerates the mask of its x tiles
    assert fl.use_fused_path(16, 4096, 4096, 16, dropout=True)
    assert not fl.use_fused_path(128, 1024, 1024, 16, dropout=True)


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
def test_segmented_forward_matches_reference(case, monkeypatch):
    """The large-M forward and dx kernels (a program per row block and column segment, t or
    g computed once per segment; no projection kernel) at small shapes, forward and every
    gradient vs float64."""
    M, in_f, out_f, R, dtype, bias, p, rows, segments = case
    rd, rg = ((R + 1) // 2, max(1, R - 2)) if rows == "partial" else (None, None)
    monkeypatch.setattr(sys.modules[__name__], "SEGMENTS", segments)
    torch.manual_seed(M + R)
    t = make_inputs((M, in_f), out_f, R, dtype, bias=bias,
                    grads=("x", "bias", "down", "scale", "up"))
    with forced_path("segmented"), fl.record_launches() as launches:
        y, dy, grads, mask = run_op(t, p, rd, rg)
    check_against_reference(t, p, rd, rg, y, dy, grads, mask)
    assert [kernel for kernel, _ in launches] == [fl.FWD, fl.DX, fl.FACTOR]
    for kernel, args in launches[:2]:
        assert args["SEGMENTED"] and args["n_segments"] == segments
        assert any(kernel.fits(c, args) for c in kernel.configs)  # not the fallback config


def test_segment_choice(monkeypatch):
    """Opt-in (SPECLORA_SEGMENTED=1); then segments only where they fill an H100 twice over
    at <= 5% extra FLOPs; forward and dx take the same rule (dx's output width is in_f)."""
    monkeypatch.delenv(fl.SEGMENTED_ENV, raising=False)
    assert fl.segment_count(8192, 4096, 48) == 0
    monkeypatch.setenv(fl.SEGMENTED_ENV, "1")
    assert fl.segment_count(8192, 4096, 48) == 3     # 128 row blocks x 3 = 384 programs
    assert fl.segment_count(8192, 14336, 48) == 3
    assert fl.segment_count(16384, 4096, 48) == 2
    assert fl.segment_count(8192, 4096, 48, sms=108) == 2
    assert fl.segment_count(4096, 4096, 48) == 0     # needs 5 segments > 4096 / (20 * 64)
    assert fl.segment_count(512, 4096, 48) == 0      # needs 33: would starve the GPU
    assert fl.segment_count(8192, 1024, 48) == 0     # segment narrower than 20 rank blocks
    assert fl.segment_count(8192, 4096, 128) == 0    # t does not fit in registers
    with fl.pinned_segments(5):
        assert fl.segment_count(16, 64, 8) == 5
    assert fl.segment_count(16, 64, 8) == 0
    # the launcher: one launch, row tiles of 64, 384 programs, x read by no other kernel
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, w = torch.empty(8192, 4096, **meta), torch.empty(4096, 4096, **meta)
    d, u = torch.empty(48, 4096, **meta), torch.empty(4096, 48, **meta)
    with fl.record_launches(dry_run=True) as launches:
        fl.adapter_forward(x, w, None, d, torch.empty(48, device="meta"), u, 0, 0.1, 16, True)
    assert [kernel for kernel, _ in launches] == [fl.FWD]
    args = launches[0][1]
    assert args["SEGMENTED"] and args["FUSE_DOWN"] and args["STORE_T"] and args["HAS_DROPOUT"]
    configs = fl.FWD.candidates(args, limit=1 << 40)
    assert configs and all(c.kwargs["BLOCK_M"] == 64 for c in configs)
    assert {fl.FWD.grid({**args, **c.kwargs})[0] for c in configs} == {384}
    with fl.record_launches(dry_run=True) as launches:
        fl.adapter_backward(torch.empty(8192, 4096, **meta), x, w, d,
                            torch.empty(48, device="meta"), u,
                            torch.empty(8192, 48, device="meta"), 0, 0.1, 16, 16, True, True,
                            True, True)
    assert [kernel for kernel, _ in launches] == [fl.DX, fl.FACTOR]   # g from the dx kernel
    args = launches[0][1]
    assert args["SEGMENTED"] and args["FUSE_UP"] and args["STORE_G"] and args["n_segments"] == 3
    configs = fl.DX.candidates(args, limit=1 << 40)
    assert configs and all(c.kwargs["BLOCK_M"] == 64 for c in configs)
    assert {fl.DX.grid({**args, **c.kwargs})[0] for c in configs} == {384}


def test_config_pruning():
    x = torch.empty(16, 4096, dtype=torch.bfloat16, device="meta")
    args = dict(x_ptr=x, M=16, N=4096, K=4096, R=64, FUSE_DOWN=True, SEGMENTED=False,
                n_segments=1, HAS_DROPOUT=True, BLOCK_R=64)
    fused = fl.FWD.candidates(args, limit=1 << 40)
    assert fused and all(c.kwargs["BLOCK_M"] == 16 and c.kwargs["BLOCK_N"] >= 256 for c in fused)
    train = fl.FWD.candidates({**args, "M": 8192, "R": 16, "FUSE_DOWN": False, "BLOCK_R": 16},
                              limit=100 * 1024)
    assert train and all(c.kwargs["BLOCK_M"] >= 64 for c in train)
    assert all(fl._fwd_smem(c, {**args, "FUSE_DOWN": False, "BLOCK_R": 16}) <= 100 * 1024
               for c in train)
    # nothing fits 1 KB: fall back to the smallest footprint rather than fail
    assert len(fl.FWD.candidates(args, limit=1024)) == 1


# ----------------------------------------------------------------------------- dispatch
def test_interpreter_runs_triton_on_cpu_tensors():
    t = make_inputs((2, 64), 64, 8, torch.float32)
    with kernel_launches() as names:
        fused_adapter_linear(t["x"], t["weight"], None, t["down"], t["scale"], t["up"])
    assert names  # CPU tensors went through the Triton kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pytorch_path_matches_kernels_and_reference(monkeypatch, dtype):
    """Without Triton (CPU, no interpreter) the PyTorch path runs; same mask, same math."""
    torch.manual_seed(0)
    t = make_inputs((6, 48), 40, 8, dtype)
    if dtype != torch.bfloat16:
        y_k, dy_k, g_k, _ = run_op(t, 0.25, 5, 7)
    monkeypatch.setattr(op_autograd, "_use_triton", lambda x, rank: False)
    with kernel_launches() as names:
        y, dy, grads, mask = run_op(t, 0.25, 5, 7)
    assert names == []
    tol = {torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    ref = {n: (v.detach().double().requires_grad_(v.requires_grad) if v is not None else None)
           for n, v in t.items()}
    y_ref = reference.fused_adapter_linear(ref["x"], ref["weight"], ref["bias"], ref["down"],
                                           ref["scale"], ref["up"], 0.25, 5, 7, mask=mask)
    assert rel_err(y, y_ref) < tol
    want = torch.autograd.grad(y_ref, [ref[n] for n in grads], dy.double())
    for (name, got), w in zip(grads.items(), want):
        assert rel_err(got, w) < tol, name
    if dtype != torch.bfloat16:  # the kernels drew the same mask from the same seed
        assert rel_err(y_k, y.to(y_k.dtype)) < tol


def test_float64_runs_pytorch_path():
    torch.manual_seed(0)
    t = make_inputs((3, 32), 24, 4, torch.float64, scale_dtype=torch.float64)
    with kernel_launches() as names:
        y, dy, grads, mask = run_op(t, 0.0, None, None)
    assert names == []
    check_against_reference(t, 0.0, None, None, y, dy, grads, mask)


def test_rejects_bad_arguments():
    t = make_inputs((2, 32), 24, 4, torch.float32, grads=())
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

