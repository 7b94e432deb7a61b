"""Correctness jobs, run in the pool's workers: op cases, layer checks, forced autotune
configs and the dropout mask.

Every job draws fresh random inputs (from its seed), poisons every kernel output with NaN
(``recipe.filled_outputs``), and compares the output and every gradient with the float64
reference by max-norm relative error (``rel_err``; a non-finite value fails). Op cases and
layer checks use the timing-free config choice (``tuning.tuning("heuristic")``): each
compiles one config per kernel. Tolerances per dtype, ``TOL``:

- fp32 (IEEE dots): 1e-5, as the interpreter tests;
- tf32 (``torch.backends.cuda.matmul.fp32_precision = "tf32"``): 1e-3: operands keep 10
  mantissa bits (rounded, ~2.4e-4 relative on average, or truncated by the tensor cores:
  up to twice that), and the max-norm error of a sum of such products lands near 3e-4;
- fp16 1e-2; bf16 2e-2: bf16 keeps 8 bits (2e-3 relative half-ulp), and the second dot of
  the low-rank path rounds its fp32 operand (t * s) to bf16 once more.

Each job takes a ``device`` (default "cuda"); on CPU tensors under ``TRITON_INTERPRET=1``
the same code runs in the interpreter (fp32 / fp16 only), which is how its own tests
exercise it without a GPU.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F

from ...methods import SpectralAdditive
from ...modules import AdapterLinear
from ...ops import (
    dropout_keep_mask,
    dropout_seed,
    fused_adapter_linear,
    launch,
    recipe,
    reference_adapter_linear,
    tuning,
)
from ...ops import plan as op_plan
from ...quant import NF4Weight, dequantize_nf4
from . import cases

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
          "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "tf32": 1e-3, "fp16": 1e-2, "bf16": 2e-2}
# layer checks chain the op's gradients through each method's factors (cat, Cayley solve)
LAYER_TOL = {"fp32": 1e-4, "tf32": 1e-3, "fp16": 1e-2, "bf16": 2e-2}
LAYER_DTYPES = ("bf16", "fp32")
LAYER_METHODS = tuple(cases.PATTERNS)
# forced autotune configs: one shape where every kernel runs, in the GPU-only dtype
FORCED_SHAPE = dict(M=130, in_f=200, out_f=300, R=48, dropout_p=0.3, dropout_rows=32,
                    grad_rows=40, dtype="bf16")


# ------------------------------------------------------------------ helpers
def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|; inf when ``got`` has a non-finite element (an
    unwritten, NaN-poisoned one)."""
    got, want = got.detach(), want.detach()
    if not bool(torch.isfinite(got).all()):
        return math.inf
    got, want = got.double(), want.double().to(got.device)
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


@contextlib.contextmanager
def fp32_precision(tf32: bool):
    """fp32 dots in TF32 or IEEE, the way the kernels read it (``ops.launch.dot_precision``)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
    else:  # torch < 2.9: the legacy flag only
        previous = matmul.allow_tf32
        matmul.allow_tf32 = tf32
    try:
        yield
    finally:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = previous
        else:
            matmul.allow_tf32 = previous


@contextlib.contextmanager
def forced_path(path: str, segments: int = 2):
    """Every launch in the block takes ``path`` (where the rank allows it)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(op_plan.forced_plan(path, segments))
        if path == "segmented":
            stack.enter_context(tuning.restricted_configs({
                tuning.FWD: tuning.narrow_configs(tuning.FWD.configs, "BLOCK_N"),
                tuning.DX: tuning.narrow_configs(tuning.DX.configs, "BLOCK_K")}))
        yield


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def path_taken(launches) -> dict:
    """The path each GEMM launch took, from the recorded launch arguments."""
    taken = {}
    for kernel, args in launches:
        if kernel is tuning.SPLITK:
            taken["fwd"] = "splitk"
        elif kernel is tuning.FWD:
            taken["fwd"] = ("segmented" if args["SEGMENTED"] else
                            "fused" if args["FUSE_DOWN"] else "split")
        elif kernel is tuning.DX:
            taken["dx"] = ("segmented" if args["SEGMENTED"] else
                           "fused" if args["FUSE_UP"] else "split")
    return taken


def expected_paths(path: str, M: int, R: int, weight) -> dict:
    """The path each GEMM launch must take when ``path`` is forced: the split beyond the
    fused rank cap; a forced split-K only for the decode forward it serves (M <= 16, a base
    it takes), the fused kernels elsewhere."""
    if R > launch.fused_rank_cap(weight):
        return {"fwd": "split", "dx": "split"}
    if path != "splitk":
        return {"fwd": path, "dx": path}
    nf4 = isinstance(weight, NF4Weight)
    splitk = (M <= op_plan.SPLITK_MAX_ROWS and R <= op_plan.FUSED_MAX_RANK
              and (not nf4 or weight.shape[1] % weight.blocksize == 0))
    return {"fwd": "splitk" if splitk else "fused", "dx": "fused"}


def _verdict(errors: dict, tol: float, problems: list) -> dict:
    worst = max(errors.values()) if errors else 0.0
    ok = not problems and all(e < tol for e in errors.values())
    return {"status": "pass" if ok else "fail", "errors": errors, "tol": tol,
            "worst": worst, "worst_over_tol": worst / tol, "problems": problems}


# ------------------------------------------------------------------ op cases
def make_op_inputs(M, in_f, out_f, R, dtype, base, blocksize, grads, bias, generator,
                   device):
    """Fresh random inputs (CPU generator: the same values on any device). Returns the
    tensors (``weight`` dense or ``NF4Weight``) and the float64 weight the reference uses."""
    g = generator
    w = torch.randn(out_f, in_f, generator=g) * in_f ** -0.5
    w[0] *= 30  # one row of a very different range: the NF4 block scales matter
    t = {
        "x": torch.randn(M, in_f, generator=g).to(dtype),
        "bias": torch.randn(out_f, generator=g).to(dtype) if bias else None,
        "down": (torch.randn(R, in_f, generator=g) * in_f ** -0.5).to(dtype),
        "scale": torch.rand(R, generator=g) + 0.5,
        "up": torch.randn(out_f, R, generator=g).to(dtype),
    }
    if base == "dense":
        t["weight"] = w.to(dtype)
        w64 = t["weight"].double()
    else:
        nf4 = NF4Weight.quantize(w, blocksize, base == "nf4_dq", backend="torch", dtype=dtype)
        t["weight"] = nf4
        w64 = dequantize_nf4(nf4, dtype).double()  # the kernels round their tiles to x's dtype
    t = {n: (v.to(device) if v is not None else None) for n, v in t.items()}
    for name in grads:
        if t.get(name) is not None:
            t[name].requires_grad_()
    return t, w64.to(device)


def run_op(t, dropout_p, dropout_rows, grad_rows, dy, seed, device):
    """The op's output, its gradients (NaN-poisoned outputs), the keep-mask the kernels drew
    (rebuilt from the seed the op drew) and the launches."""
    names = [n for n, v in t.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    with recipe.filled_outputs(float("nan")), tuning.record_launches() as launches:
        torch.manual_seed(seed)
        y = fused_adapter_linear(t["x"], t["weight"], t["bias"], t["down"], t["scale"], t["up"],
                                 dropout_p, dropout_rows, grad_rows)
        grads = dict(zip(names, torch.autograd.grad(y, [t[n] for n in names], dy)))
        _sync(device)
    mask = None
    if dropout_p > 0 and dropout_rows != 0:
        torch.manual_seed(seed)
        mask = dropout_keep_mask(dropout_seed(device), t["x"].shape, dropout_p, device=device)
    return y, grads, mask, list(launches)


def reference(t, w64, dropout_p, dropout_rows, grad_rows, mask, dy, names):
    """float64 output and gradients of ``names``."""
    ref = {n: v.detach().double().requires_grad_(n in names) for n, v in t.items()
           if isinstance(v, torch.Tensor)}
    y = reference_adapter_linear(ref["x"], w64, ref.get("bias"), ref["down"], ref["scale"],
                                 ref["up"], dropout_p, dropout_rows, grad_rows, mask=mask)
    grads = torch.autograd.grad(y, [ref[n] for n in names], dy.double())
    return y, dict(zip(names, grads))


def compare(t, y, grads, y_ref, ref_grads, tol, grad_rows) -> dict:
    errors, problems = {"y": rel_err(y, y_ref)}, []
    if y.dtype != t["x"].dtype or y.shape != y_ref.shape:
        problems.append(f"y is {y.dtype} {tuple(y.shape)}")
    for name, got in grads.items():
        errors[name] = rel_err(got, ref_grads[name])
        if got.dtype != t[name].dtype or got.shape != t[name].shape:
            problems.append(f"grad {name} is {got.dtype} {tuple(got.shape)}")
    R = t["down"].shape[0]
    if grad_rows is not None and grad_rows < R:  # frozen rows: exact zeros, written
        if "down" in grads and grads["down"][grad_rows:].any():
            problems.append("frozen rows of D got gradient")
        if "up" in grads and grads["up"][:, grad_rows:].any():
            problems.append("frozen columns of U got gradient")
    return _verdict(errors, tol, problems)


def run_case(payload: dict) -> dict:
    """One op case (``cases.correctness_cases``): forward and every gradient vs float64."""
    case, seed = payload["case"], int(payload["seed"])
    device = payload.get("device", "cuda")
    R, rd, rg, grads = cases.PATTERNS[case["method"]]
    in_f, out_f, blocksize = cases.SHAPES[case["shape"]]
    dtype = DTYPES[case["dtype"]]
    bias = int(case.get("id", "c0")[1:] or 0) % 2 == 0
    g = torch.Generator().manual_seed(seed)
    t, w64 = make_op_inputs(case["M"], in_f, out_f, R, dtype, case["base"], blocksize,
                            grads + (("bias",) if bias else ()), bias, g, device)
    dy = torch.randn(case["M"], out_f, generator=g).to(dtype).to(device)
    p = float(case["dropout"])
    with fp32_precision(case["dtype"] == "tf32"), forced_path(case["path"]), \
            tuning.tuning("heuristic"):
        y, got, mask, launches = run_op(t, p, rd, rg, dy, seed, device)
    y_ref, ref_grads = reference(t, w64, p, rd, rg, mask, dy, list(got))
    out = compare(t, y, got, y_ref, ref_grads, TOL[case["dtype"]], rg)
    taken = path_taken(launches)
    want = expected_paths(case["path"], case["M"], R, t["weight"])
    if any(v != want[k] for k, v in taken.items()):
        out["problems"].append(f"took {taken}, forced {case['path']}")
        out["status"] = "fail"
    out.update(path=taken, kernels=[k.name for k, _ in launches],
               dropout_active=mask is not None)
    return out


# ------------------------------------------------------------------ forced configs
def forced_config_jobs() -> list[dict]:
    """One job per autotune config of every kernel."""
    return [{"kernel": k.name, "index": i, "config": config_name(c)}
            for k in tuning.KERNELS for i, c in enumerate(k.configs)]


def config_name(cfg) -> str:
    tiles = "x".join(str(v) for k, v in cfg.kwargs.items() if k.startswith("BLOCK"))
    group = f" g{cfg.kwargs['GROUP_M']}" if "GROUP_M" in cfg.kwargs else ""
    return f"{tiles}{group} w{cfg.num_warps} s{cfg.num_stages}"


def run_forced_config(payload: dict) -> dict:
    """Forward + backward at ``FORCED_SHAPE`` with one kernel restricted to one config, on
    the path that launches it (the projection kernel on the split path, split-K at 16 rows,
    the dequantizer on an NF4 base, the others on the fused path), in the activation dtype
    the config serves (fp32 or ``FORCED_SHAPE``'s), vs float64. A config whose
    shared-memory estimate exceeds the device's limit is skipped (the launcher never runs
    it there)."""
    kernel = next(k for k in tuning.KERNELS if k.name == payload["kernel"])
    cfg = kernel.configs[int(payload["index"])]
    seed, device = int(payload["seed"]), payload.get("device", "cuda")
    s = dict(FORCED_SHAPE, M=16) if kernel is tuning.SPLITK else FORCED_SHAPE
    if tuning.serves_fp32(cfg):
        s = dict(s, dtype="fp32")
    dtype = (DTYPES[s["dtype"]] if torch.device(device).type == "cuda" or s["dtype"] == "fp32"
             else torch.float16)  # the interpreter's bf16 dot is broken
    path = {tuning.PROJ: "split", tuning.SPLITK: "splitk"}.get(kernel, "fused")
    base = "nf4_dq" if kernel is tuning.DEQUANT else "dense"
    g = torch.Generator().manual_seed(seed)
    t, w64 = make_op_inputs(s["M"], s["in_f"], s["out_f"], s["R"], dtype, base, 64,
                            ("x", "bias", "down", "scale", "up"), True, g, device)
    dy = torch.randn(s["M"], s["out_f"], generator=g).to(dtype).to(device)
    args = dict(dropout_p=s["dropout_p"], dropout_rows=s["dropout_rows"],
                grad_rows=s["grad_rows"])
    with forced_path(path), tuning.tuning("heuristic"), \
            tuning.restricted_configs({kernel: [cfg]}):
        with tuning.record_launches(dry_run=True) as planned:
            y = fused_adapter_linear(t["x"], t["weight"], t["bias"], t["down"], t["scale"],
                                     t["up"], **args)
            torch.autograd.grad(y, [t["x"], t["down"]], dy)
        mine = [a for k, a in planned if k is kernel]
        over = [kernel.smem_bytes(cfg, a) for a in mine
                if kernel.smem_bytes(cfg, a) > tuning.smem_limit(a)]
        if over:
            return {"status": "skipped", "reason": f"shared memory estimate {max(over)} B "
                    f"over the device limit", "config": config_name(cfg)}
        y, got, mask, launches = run_op(t, args["dropout_p"], args["dropout_rows"],
                                        args["grad_rows"], dy, seed, device)
    y_ref, ref_grads = reference(t, w64, args["dropout_p"], args["dropout_rows"],
                                 args["grad_rows"], mask, dy, list(got))
    out = compare(t, y, got, y_ref, ref_grads, TOL[s["dtype"]], args["grad_rows"])
    ran = sum(k is kernel for k, _ in launches)
    if not ran:
        out["problems"].append(f"{kernel.name} never launched")
        out["status"] = "fail"
    out.update(config=config_name(cfg), launches_of_kernel=ran,
               fits_shape=all(kernel.fits(cfg, a) for a in mine))
    return out


# ------------------------------------------------------------------ layers
def run_layer(payload: dict) -> dict:
    """``AdapterLinear`` for one method pattern, randomized adapter parameters, forward and
    backward in ``dtype`` vs a float64 recomputation through the method's own factors
    (plain PyTorch, not the op). "spectral_on_linear4bit": an NF4 ``W0`` base with the
    frozen ``-P diag(sigma) Q.T`` rows (``residual_base=False``), as from a ``Linear4bit``."""
    method, dt = payload["method"], payload["dtype"]
    seed, device = int(payload["seed"]), payload.get("device", "cuda")
    dtype = DTYPES[dt]
    in_f, out_f, r = payload.get("shape", (256, 192, 8))
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f).to(device=device, dtype=dtype)
    if method == "spectral_on_linear4bit":
        nf4 = NF4Weight.quantize(lin.weight.detach().float().cpu(), 64, True, backend="torch",
                                 dtype=dtype).to(device)
        adapter = SpectralAdditive(nf4.dequantize(torch.float32), r=r)
        layer = AdapterLinear(nf4, lin.bias.detach(), adapter, compute_dtype=dtype,
                              residual_base=False)
    else:
        layer = AdapterLinear.from_linear(lin, method, r=r)
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    layer.train()
    x = torch.randn(2, 9, in_f, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 9, out_f, device=device, dtype=dtype)
    names = [n for n, p in layer.adapter.named_parameters() if p.requires_grad]
    params = dict(layer.adapter.named_parameters())
    with recipe.filled_outputs(float("nan")), tuning.tuning("heuristic"):
        y = layer(x)
        got = torch.autograd.grad(y, [x] + [params[n] for n in names], dy)
        _sync(device)
    ref = copy.deepcopy(layer).double()
    base = (dequantize_nf4(layer.nf4_weight(), dtype).double() if layer.quant_type
            else ref.weight)
    x64 = x.detach().double().requires_grad_()
    down, scale, up = ref.factors()
    bias = ref.bias.double() if ref.bias is not None else None
    y64 = F.linear(x64, base, bias) + ((x64 @ down.T) * scale) @ up.T
    ref_params = dict(ref.adapter.named_parameters())
    want = torch.autograd.grad(y64, [x64] + [ref_params[n] for n in names], dy.double())
    errors = {"y": rel_err(y, y64), "x": rel_err(got[0], want[0])}
    errors.update({n: rel_err(a, b) for n, a, b in zip(names, got[1:], want[1:])})
    problems = [] if y.dtype == dtype else [f"y is {y.dtype}"]
    out = _verdict(errors, LAYER_TOL[dt], problems)
    out.update(rank=layer.rank, base="nf4" if layer.quant_type else "dense")
    return out


# ------------------------------------------------------------------ dropout mask
def run_dropout_mask(payload: dict) -> dict:
    """The kernels' dropout mask equals ``dropout_keep_mask(seed, shape, p)`` bit for bit,
    on every path: with ``D = I``, ``s = 1`` and ``U = I`` (R = in = out), ``y - x W.T`` is
    the dropped input ``keep * x / (1 - p)`` and ``dx - dy W`` is ``keep * dy / (1 - p)``,
    so the forward's mask (fused kernel, projection kernel, segmented kernel) and the dx
    kernel's mask are read back elementwise (|x|, |dy| >= 0.5, fp32 IEEE); dD, ds, dU (the
    factor kernel regenerates the mask too) are compared with the reference fed the
    rebuilt mask, and with one element of it flipped (the control must fail)."""
    seed, device = int(payload["seed"]), payload.get("device", "cuda")
    M, K, p = payload.get("M", 130), payload.get("K", 60), payload.get("p", 0.3)
    g = torch.Generator().manual_seed(seed)

    def away_from_zero(*shape):
        return torch.sign(torch.randn(*shape, generator=g)) * (0.5 + torch.rand(*shape,
                                                                                  generator=g))

    x, dy = away_from_zero(M, K).to(device), away_from_zero(M, K).to(device)
    w = (0.05 * torch.randn(K, K, generator=g)).to(device)
    eye = torch.eye(K, device=device)
    rows, errors, problems = [], {}, []
    for path in payload.get("paths", cases.PATHS):
        t = {"x": x.clone().requires_grad_(), "weight": w, "bias": None,
             "down": eye.clone().requires_grad_(), "scale": torch.ones(K, device=device,
                                                                        requires_grad=True),
             "up": eye.clone().requires_grad_()}
        with fp32_precision(False), forced_path(path), tuning.tuning("heuristic"):
            y, got, mask, launches = run_op(t, p, None, None, dy, seed, device)
        kept_fwd = (y.detach().double() - x.double() @ w.double().T) / x.double()
        kept_dx = (got["x"].double() - dy.double() @ w.double()) / dy.double()
        row = {"path": path, "taken": path_taken(launches)}
        for name, ratio in (("fwd", kept_fwd), ("dx", kept_dx)):
            keep = ratio > 0.5 / (1 - p)
            # every ratio is 0 or 1/(1-p) up to fp32 rounding
            spread = float(torch.minimum(ratio.abs(), (ratio - 1 / (1 - p)).abs()).max())
            mismatches = int((keep != mask).sum())
            row[f"{name}_mismatches"] = mismatches
            row[f"{name}_spread"] = spread
            if mismatches or spread > 1e-3:
                problems.append(f"{path} {name}: {mismatches} mask elements differ "
                                f"(spread {spread:.2g})")
        row["kept"] = float(mask.float().mean())
        _, ref_grads = reference(t, w.double(), p, None, None, mask, dy, list(got))
        flipped = mask.clone()
        flipped[M // 2, K // 2] = ~flipped[M // 2, K // 2]
        _, wrong = reference(t, w.double(), p, None, None, flipped, dy, ["down"])
        for name in ("down", "scale", "up"):
            errors[f"{path}.{name}"] = rel_err(got[name], ref_grads[name])
        row["dD_err"] = errors[f"{path}.down"]
        row["dD_err_flipped_mask"] = rel_err(got["down"], wrong["down"])
        if row["dD_err_flipped_mask"] < 10 * TOL["fp32"]:
            problems.append(f"{path}: the control (one mask element flipped) still matched")
        rows.append(row)
    out = _verdict(errors, TOL["fp32"], problems)
    out.update(rows=rows, M=M, K=K, p=p)
    return out
