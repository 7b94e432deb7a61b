"""Runtime checks: a training step captured in a CUDA graph, the same step under
``torch.compile(mode="reduce-overhead")``, two devices, and the op test files under pytest.

The graph, compile and device checks run in pool workers (a check that breaks the CUDA
context takes only its worker down); pytest runs in a subprocess with its own time limit.

How the graph check knows each replay's mask: the op draws its dropout seed on the device
(``dropout_seed``: a 0-d int64 CUDA tensor) and saves it for backward. Capturing under
``torch.autograd.graph.saved_tensors_hooks`` hands us every tensor saved during the
capture; the 0-d int64 one is the seed, a static buffer of the graph that each replay
rewrites with the seed that replay drew. Reading it after a replay gives the seed, and
``dropout_keep_mask(seed, x.shape, p)`` the mask, for an eager float64 recomputation of that
replay's step from the parameters it started with.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ...modules import AdapterLinear
from ...ops import dropout_keep_mask, fused_adapter_linear, reference_adapter_linear, tuning
from ...ops.tuning import MODE_ENV as TUNING_ENV
from ...quant import NF4Weight, dequantize_nf4
from .correctness import LAYER_TOL, TOL, compare, make_op_inputs, reference, rel_err, run_op

LR = 0.05
P = 0.3


def speclora_layer(device, seed: int, dtype=torch.float32, in_f=256, out_f=192, r=8, k=8,
                   dropout=P) -> AdapterLinear:
    """A SpecLoRA ``AdapterLinear`` with random (non-zero) adapter parameters, training."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f).to(device=device, dtype=dtype)
    layer = AdapterLinear.from_linear(lin, "speclora", r=r, k=k, dropout=dropout).train()
    with torch.no_grad():
        for p in layer.adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return layer


def trainable(layer) -> list:
    return [(n, p) for n, p in layer.adapter.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def saved_seeds():
    """The dropout seeds the op saves for backward in the block (0-d int64 tensors: on a
    CUDA device, inside a graph capture, the graph's own buffers)."""
    seeds = []

    def keep(t):
        if isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.dim() == 0:
            seeds.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        yield seeds


def eager_step(layer, start: dict, x: torch.Tensor, seed: int):
    """float64 loss and gradients of one step of ``layer`` from parameters ``start``, with
    the mask ``seed`` gives (plain PyTorch reference, not the kernels)."""
    ref = copy.deepcopy(layer).double()
    params = dict(ref.adapter.named_parameters())
    with torch.no_grad():
        for name, value in start.items():
            params[name].copy_(value.double())
    mask = dropout_keep_mask(seed, x.shape, layer.dropout, device=x.device)
    down, scale, up = ref.factors()
    bias = ref.bias.double() if ref.bias is not None else None
    y = reference_adapter_linear(x.double(), ref.weight, bias, down, scale, up, layer.dropout,
                                 ref.adapter.dropout_rows, ref.adapter.grad_rows, mask=mask)
    loss = y.square().mean()
    grads = torch.autograd.grad(loss, [params[n] for n in start])
    return y, loss, dict(zip(start, grads)), mask


def run_graph_step(payload: dict) -> dict:
    """Forward + backward + SGD step of a SpecLoRA layer (dropout 0.3, fp32) captured with
    ``torch.cuda.graph``, replayed twice on the same input: each replay must draw a new
    seed (hence mask), and its output, loss and gradients must equal an eager float64
    recomputation with that replay's mask; with the other replay's mask they must not."""
    seed = int(payload["seed"])
    device = torch.device(payload.get("device", "cuda"))
    layer = speclora_layer(device, seed)
    named = trainable(layer)
    opt = torch.optim.SGD([p for _, p in named], lr=LR)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, layer.in_features, generator=g).to(device)

    def step():
        y = layer(x)
        loss = y.square().mean()
        loss.backward()
        opt.step()
        return y, loss

    with tuning.tuning("heuristic"):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture stream (compiles, allocator)
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # backward allocates .grad in the graph's pool
        with torch.cuda.graph(graph), saved_seeds() as seeds:
            static_y, static_loss = step()
        if len(seeds) != 1:
            return {"status": "error", "error": f"expected one saved 0-d int64 seed tensor "
                    f"in the capture, found {len(seeds)}"}
        replays = []
        for _ in range(2):
            start = {n: p.detach().clone() for n, p in named}
            graph.replay()
            torch.cuda.synchronize(device)
            replays.append(dict(seed=int(seeds[0]), y=static_y.detach().clone(),
                                loss=static_loss.detach().item(), start=start,
                                grads={n: p.grad.detach().clone() for n, p in named},
                                end={n: p.detach().clone() for n, p in named}))
    errors, problems, rows = {}, [], []
    masks = []
    for i, r in enumerate(replays):
        y64, loss64, grads64, mask = eager_step(layer, r["start"], x, r["seed"])
        masks.append(mask)
        errors[f"replay{i}.y"] = rel_err(r["y"], y64)
        errors[f"replay{i}.loss"] = abs(r["loss"] - float(loss64)) / abs(float(loss64))
        for n, v in r["grads"].items():
            errors[f"replay{i}.d{n}"] = rel_err(v, grads64[n])
        stepped = max(rel_err(r["end"][n], r["start"][n] - LR * r["grads"][n])
                      for n in r["grads"])
        other = replays[1 - i]["seed"]
        _, _, wrong, _ = eager_step(layer, r["start"], x, other)
        control = max(rel_err(v, wrong[n]) for n, v in r["grads"].items())
        rows.append({"replay": i, "seed": r["seed"], "loss": r["loss"],
                     "kept": float(mask.float().mean()), "sgd_step_err": stepped,
                     "grad_err_with_other_mask": control})
        if stepped > 1e-6:
            problems.append(f"replay {i}: the optimizer step did not apply the gradients")
        if control < 10 * LAYER_TOL["fp32"]:
            problems.append(f"replay {i}: gradients also match the other replay's mask")
    if replays[0]["seed"] == replays[1]["seed"] or torch.equal(masks[0], masks[1]):
        problems.append("both replays drew the same seed / mask")
    if torch.equal(replays[0]["y"], replays[1]["y"]):
        problems.append("both replays gave the same output")
    worst = max(errors.values())
    ok = not problems and worst < LAYER_TOL["fp32"]
    return {"status": "pass" if ok else "fail", "errors": errors, "worst": worst,
            "tol": LAYER_TOL["fp32"], "problems": problems, "rows": rows,
            "seed_source": "saved_tensors_hooks: the 0-d int64 seed saved for backward"}


def run_compile_step(payload: dict) -> dict:
    """The same step with the layer under ``torch.compile(mode="reduce-overhead")`` (CUDA
    graphs through Inductor), SGD at lr 0 so the parameters stay put: every step must run,
    give finite losses and gradients, and a different output than the step before (a new
    mask: nothing else changes)."""
    seed, steps = int(payload["seed"]), int(payload.get("steps", 5))
    device = torch.device(payload.get("device", "cuda"))
    layer = speclora_layer(device, seed)
    named = trainable(layer)
    opt = torch.optim.SGD([p for _, p in named], lr=0.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, layer.in_features, generator=g).to(device)
    compiled = torch.compile(layer, mode="reduce-overhead")
    ys, losses, finite_grads, seconds = [], [], [], []
    with tuning.tuning("heuristic"):
        for _ in range(steps):
            t0 = time.perf_counter()
            torch.compiler.cudagraph_mark_step_begin()
            y = compiled(x)
            loss = y.square().mean()
            loss.backward()
            finite_grads.append(all(bool(torch.isfinite(p.grad).all()) for _, p in named))
            opt.step()
            opt.zero_grad(set_to_none=True)
            ys.append(y.detach().clone())
            losses.append(loss.detach().item())
            torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - t0)
    same = [i for i in range(1, steps) if torch.equal(ys[i], ys[i - 1])]
    try:  # did Inductor use CUDA graphs, and did Dynamo break the graph? (private counters)
        from torch._dynamo.utils import counters

        skips = dict(counters.get("inductor", {})).get("cudagraph_skips", 0)
        breaks = sum(counters.get("graph_break", {}).values())
    except Exception:  # noqa: BLE001 - informative only
        skips = breaks = None
    problems = []
    if not all(math.isfinite(v) for v in losses) or not all(finite_grads):
        problems.append("non-finite loss or gradient")
    if same:
        problems.append(f"steps {same} gave the same output as the step before (same mask)")
    return {"status": "pass" if not problems else "fail", "problems": problems,
            "losses": losses, "step_seconds": seconds, "same_as_previous": same,
            "cudagraph_skips": skips, "graph_breaks": breaks}


def run_devices(payload: dict) -> dict:
    """With cuda:0 current, the op (dense bf16 and NF4 fp16, dropout, forward and every
    gradient) and the NF4 dequantizer on cuda:1 tensors; then inputs on two devices must
    raise an error naming both."""
    if torch.cuda.device_count() < 2:
        return {"status": "skipped", "reason": "skipped: one GPU"}
    from ...ops.launch import dequantize_nf4_triton

    seed = int(payload["seed"])
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    errors, problems = {}, []
    for base, dtype, name in (("dense", torch.bfloat16, "bf16"), ("nf4_dq", torch.float16,
                                                                  "fp16")):
        g = torch.Generator().manual_seed(seed)
        t, w64 = make_op_inputs(17, 256, 200, 9, dtype, base, 64,
                                ("x", "bias", "down", "scale", "up"), True, g, dev)
        dy = torch.randn(17, 200, generator=g).to(dtype).to(dev)
        with tuning.tuning("heuristic"):
            y, got, mask, _ = run_op(t, P, 6, 6, dy, seed, dev)
        y_ref, ref_grads = reference(t, w64, P, 6, 6, mask, dy, list(got))
        verdict = compare(t, y, got, y_ref, ref_grads, TOL[name], 6)
        errors.update({f"{base}.{k}": v for k, v in verdict["errors"].items()})
        problems += [f"{base}: {p}" for p in verdict["problems"]]
        if verdict["status"] != "pass":
            problems.append(f"{base} on cuda:1: worst error {verdict['worst']:.3g} "
                            f"(tol {TOL[name]})")
        if y.device != dev or torch.cuda.current_device() != 0:
            problems.append(f"{base}: output on {y.device}, current device "
                            f"{torch.cuda.current_device()}")
    w = NF4Weight.quantize(torch.randn(300, 200) * 3, 64, True, backend="torch")
    dense = dequantize_nf4_triton(w.to(dev), torch.bfloat16)
    torch.cuda.synchronize(dev)
    if not torch.equal(dense.cpu(), dequantize_nf4(w, torch.bfloat16)):
        problems.append("dequantize_nf4_triton on cuda:1 differs from dequantize_nf4")
    x0 = torch.randn(4, 32, device="cuda:0")
    w1 = torch.randn(16, 32, device="cuda:1")
    message = ""
    try:
        fused_adapter_linear(x0, w1, None, torch.randn(4, 32, device="cuda:0"),
                             torch.ones(4, device="cuda:0"), torch.randn(16, 4, device="cuda:0"))
        problems.append("inputs on cuda:0 and cuda:1 raised nothing")
    except (ValueError, RuntimeError) as e:
        message = str(e)
        if "cuda:0" not in message or "cuda:1" not in message:
            problems.append(f"the two-device error does not name both devices: {message!r}")
    ok = not problems
    return {"status": "pass" if ok else "fail", "errors": errors, "problems": problems,
            "error_message": message, "gpus": torch.cuda.device_count()}


# ------------------------------------------------------------------ pytest
TEST_FILES = ("tests/test_ops.py", "tests/test_ops_nf4.py", "tests/test_tuning.py")
# CPU-only tests of these files (CI runs them; here they would build the C++ backend or
# run Inductor / the interpreter on the CPU and spend the GPU's time)
CPU_ONLY = ("test_cpu_backend", "test_kernels_and_cpu_backend_agree",
            "test_torch_compile_fullgraph", "test_nf4_report_command",
            "test_interpreter_runs_triton_on_cpu_tensors")
# interpreter-only as written: they launch kernels on CPU tensors (a compiled launch refuses
# them) or expect CPU tensors to reach the kernels; with -x the first would stop the run
INTERPRETER_ONLY = ("test_philox_matches_triton_for_64bit_counters",
                    "test_keep_mask_is_the_kernels_mask", "test_fused_decoders_bit_identical",
                    "test_one_tuning_per_bucket_and_no_retune")
NEEDS_BNB = ("test_layer_from_linear4bit_through_kernels",)
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")
_PROGRESS = re.compile(r"^([.FEsxX]+)\s*(\[\s*\d+%\])?\s*$")


def repo_root() -> Path | None:
    """The checkout this package runs from, if its tests/ are beside it."""
    root = Path(__file__).resolve().parents[3]
    return root if all((root / f).is_file() for f in TEST_FILES) else None


def pytest_skip() -> str | None:
    """Why the op test files cannot run here (no checkout beside the package, no pytest: a
    GPU machine without network may have neither), or None."""
    if repo_root() is None:
        return "skipped: tests/ not found beside the package"
    if not _have("pytest"):
        return "skipped: pytest not importable (pip install pytest, or carry its wheel)"
    return None


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def pytest_command(workers: int) -> tuple[list, list]:
    """The pytest command line and the tests it deselects (with why)."""
    deselected = [(n, "CPU-only (runs in CI)") for n in CPU_ONLY]
    deselected += [(n, "interpreter-only as written: CPU tensors into Triton launches")
                   for n in INTERPRETER_ONLY]
    if not _have("bitsandbytes"):
        deselected += [(n, "needs bitsandbytes, not importable here") for n in NEEDS_BNB]
    # no -x: a failure is reported and the other tests still run (the report lists each)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES,
           "-k", " and ".join(f"not {n}" for n, _ in deselected)]
    if workers > 1 and _have("xdist"):
        cmd += ["-n", str(workers)]
    return cmd, deselected


def parse_pytest(output: str) -> dict:
    """Counts from pytest's summary line, or, cut short, from its progress lines."""
    counts = {}
    for line in reversed(output.splitlines()):
        found = _COUNT.findall(line)
        if found and (" in " in line or line.startswith("=")):
            for n, kind in found:
                counts["errors" if kind.startswith("error") else kind] = int(n)
            return counts
    marks = "".join(m.group(1) for line in output.splitlines()
                    if (m := _PROGRESS.match(line.strip())))
    names = {".": "passed", "F": "failed", "E": "errors", "s": "skipped", "x": "xfailed",
             "X": "xpassed"}
    for ch in marks:
        counts[names[ch]] = counts.get(names[ch], 0) + 1
    return counts


def _stop_session(proc, sig) -> None:
    """Signal the process session we started for pytest (pytest and its xdist workers)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_pytest(limit_s: float, workers: int) -> dict:
    """The op test files on CUDA, in a subprocess stopped after ``limit_s`` seconds."""
    reason = pytest_skip()
    if reason:
        return {"status": "skipped", "reason": reason}
    root = repo_root()
    cmd, deselected = pytest_command(workers)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # one config per kernel, as the correctness cases (autotuning every new key would
    # compile every candidate; the tuning checks and forced configs cover those)
    env[TUNING_ENV] = "heuristic"
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + paths)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop_session(proc, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            _stop_session(proc, signal.SIGKILL)
            output, _ = proc.communicate()
    except BaseException:   # the run's own deadline: leave nothing of ours running
        _stop_session(proc, signal.SIGKILL)
        proc.wait()
        raise
    counts = parse_pytest(output or "")
    bad = counts.get("failed", 0) + counts.get("errors", 0)
    if bad or (proc.returncode not in (0, None) and not timed_out):
        status = "fail"
    elif timed_out:
        status = "partial"
    else:
        status = "pass"
    failed = [line for line in (output or "").splitlines()
              if line.startswith(("FAILED", "ERROR"))][:20]
    return {"status": status, "counts": counts, "timed_out": timed_out,
            "returncode": proc.returncode, "seconds": time.perf_counter() - t0,
            "limit_s": limit_s, "command": f"{TUNING_ENV}=heuristic " + " ".join(cmd[1:]),
            "deselected": deselected,
            "failed": failed, "tail": (output or "")[-3000:]}
