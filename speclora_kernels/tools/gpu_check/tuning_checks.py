"""Autotuning on the GPU: the first-call cost of new sequence lengths, two threads on a cold
cache, and the deterministic choice in two fresh processes.

These run alone in the main process (after the pool), since they measure wall-clock time.
The benchmarker is wrapped to count what it times (``Counting``); ``tuning.cached_configs()``
says how many tuning keys exist.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import triton.testing

from ...ops import fused_adapter_linear, tuning
from ...quant import NF4Weight
from .correctness import TOL, config_name, rel_err

SHAPE = (4096, 4096)   # (in, out): Llama-3-8B's q_proj / o_proj
RANK = 48
FIRST_CALL_ROWS = tuple(range(17, 27))   # ten new M values, all in the bucket of 32
THREAD_ROWS = 40                          # another bucket (64)
# (M, in, out, R, dropout p, base): the shapes whose chosen configs two processes compare
PROBE_SHAPES = [(1, 4096, 4096, 48, 0.0, "dense"), (16, 4096, 1024, 48, 0.1, "dense"),
                (17, 4096, 4096, 48, 0.0, "dense"), (512, 4096, 4096, 48, 0.1, "dense"),
                (8192, 4096, 14336, 48, 0.0, "dense"), (8192, 14336, 4096, 48, 0.1, "dense"),
                (16, 4096, 4096, 48, 0.0, "nf4"), (16, 4000, 4096, 16, 0.1, "nf4")]


class Counting:
    """A benchmarker for ``tuning.tuning``: times like the library's default (median of
    ``do_bench``) and counts the launches it timed."""

    def __init__(self):
        self.calls, self.lock = 0, threading.Lock()

    def __call__(self, fn) -> float:
        with self.lock:
            self.calls += 1
        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def _inputs(M, seed, device):
    g = torch.Generator().manual_seed(seed)
    K, N = SHAPE
    bf = torch.bfloat16
    x = torch.randn(M, K, generator=g).to(bf).to(device)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(bf).to(device)
    d = (torch.randn(RANK, K, generator=g) * K ** -0.5).to(bf).to(device)
    s = (torch.rand(RANK, generator=g) + 0.5).to(device)
    u = torch.randn(N, RANK, generator=g).to(bf).to(device)
    ref = (x.double() @ w.double().T + ((x.double() @ d.double().T) * s.double())
           @ u.double().T)
    return (x, w, d, s, u), ref


def _expected_tunings(args5, M) -> tuple[int, int]:
    """(configs timed, tuning keys) a cold call at ``M`` should cost: every launch with more
    than one candidate is timed once per candidate (a dry run gives the launches)."""
    x, w, d, s, u = args5
    with tuning.record_launches(dry_run=True) as launches:
        fused_adapter_linear(x[:M], w, None, d, s, u)
    timed = keys = 0
    seen = set()
    for kernel, args in launches:
        n = len(kernel.candidates(args, tuning.smem_limit(args)))
        key = kernel.tuning_key(args, x.device)
        if n > 1 and key not in seen:
            seen.add(key)
            timed, keys = timed + n, keys + 1
    return timed, keys


def first_call_cost(seed: int, device="cuda") -> dict:
    """M = 17..26 at 4096 x 4096 bf16, R = 48, inference, autotune mode on a cold tuning
    cache: exactly one tuning (the first call times every candidate of each launch, the nine
    others time nothing and add no key), each output right."""
    (x, w, d, s, u), ref = _inputs(max(FIRST_CALL_ROWS), seed, device)
    want_timed, want_keys = _expected_tunings((x, w, d, s, u), FIRST_CALL_ROWS[0])
    bench, rows, problems = Counting(), [], []
    with tuning.tuning("autotune", bench, fresh=True), torch.no_grad():
        for M in FIRST_CALL_ROWS:
            calls, keys = bench.calls, len(tuning.cached_configs())
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = fused_adapter_linear(x[:M], w, None, d, s, u)
            torch.cuda.synchronize()
            rows.append({"M": M, "seconds": time.perf_counter() - t0,
                         "configs_timed": bench.calls - calls,
                         "new_keys": len(tuning.cached_configs()) - keys,
                         "err": rel_err(y, ref[:M])})
        chosen = {str(k[0]): config_name(v) for k, v in tuning.cached_configs().items()}
    first, rest = rows[0], rows[1:]
    if first["configs_timed"] != want_timed or first["new_keys"] != want_keys:
        problems.append(f"first call timed {first['configs_timed']} configs in "
                        f"{first['new_keys']} keys, expected {want_timed} in {want_keys}")
    if any(r["configs_timed"] or r["new_keys"] for r in rest):
        problems.append("a later M of the same bucket tuned again")
    if any(r["err"] >= TOL["bf16"] for r in rows):
        problems.append("an output is wrong")
    others = sorted(r["seconds"] for r in rest)
    return {"status": "pass" if not problems else "fail", "problems": problems, "rows": rows,
            "first_call_s": first["seconds"], "others_median_s": others[len(others) // 2],
            "others_max_s": others[-1], "configs_timed": first["configs_timed"],
            "chosen": chosen}


def threads_on_cold_cache(seed: int, device="cuda") -> dict:
    """Two threads make the same new call at once on a cold tuning cache: one tuning (the
    candidates timed once in all), both outputs right and bitwise equal."""
    (x, w, d, s, u), ref = _inputs(THREAD_ROWS, seed, device)
    want_timed, want_keys = _expected_tunings((x, w, d, s, u), THREAD_ROWS)
    bench, outs, errors = Counting(), [None, None], []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            with torch.no_grad():
                outs[i] = fused_adapter_linear(x, w, None, d, s, u)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    t0 = time.perf_counter()
    with tuning.tuning("autotune", bench, fresh=True):
        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        keys = len(tuning.cached_configs())
    seconds = time.perf_counter() - t0
    problems = list(errors)
    if not errors:
        if bench.calls != want_timed or keys != want_keys:
            problems.append(f"timed {bench.calls} configs in {keys} keys, expected "
                            f"{want_timed} in {want_keys} (one tuning)")
        errs = [rel_err(o, ref) for o in outs]
        if max(errs) >= TOL["bf16"]:
            problems.append(f"wrong output: errors {errs}")
        if not torch.equal(outs[0], outs[1]):
            problems.append("the two threads' outputs differ")
    return {"status": "pass" if not problems else "fail", "problems": problems,
            "configs_timed": bench.calls, "expected": want_timed, "seconds": seconds}


def _probe_weight(N, K, base, device):
    bf = torch.bfloat16
    if base == "dense":
        return torch.empty(N, K, dtype=bf, device=device)
    blocks = -(-N * K // 64)
    u8, f32 = dict(device=device, dtype=torch.uint8), dict(device=device, dtype=torch.float32)
    return NF4Weight(torch.empty(-(-N * K // 2), **u8), torch.empty(blocks, **u8), (N, K), bf, 64,
                     absmax2=torch.empty(-(-blocks // 256), **f32),
                     code2=torch.empty(256, **f32), offset=torch.empty((), **f32))


def deterministic_choices(device="cuda") -> list:
    """Under ``torch.use_deterministic_algorithms(True)``: the config each launch of a
    forward + backward would take at ``PROBE_SHAPES`` (a dry run: nothing is launched)."""
    torch.use_deterministic_algorithms(True)
    out = []
    for M, K, N, R, p, base in PROBE_SHAPES:
        bf = dict(dtype=torch.bfloat16, device=device)
        x = torch.empty(M, K, **bf).requires_grad_()
        d, u = torch.empty(R, K, **bf).requires_grad_(), torch.empty(N, R, **bf).requires_grad_()
        s = torch.ones(R, device=device, requires_grad=True)
        w = _probe_weight(N, K, base, device)
        with tuning.record_launches(dry_run=True) as launches:
            y = fused_adapter_linear(x, w, None, d, s, u, p)
            torch.autograd.grad(y, [x, d, s, u], torch.empty(M, N, **bf))
        for kernel, args in launches:
            out.append([f"{base} M{M} {K}->{N} R{R} p{p:g}", kernel.name,
                        config_name(kernel.choose(args, x.device))])
    return out


def _probe_main() -> None:  # python -c entry of the fresh processes
    print(json.dumps(deterministic_choices()))


def choices_in_two_processes(timeout: float = 120.0) -> dict:
    """``deterministic_choices`` in two fresh processes at once: identical lists."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[3])   # the folder holding the package
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "")
                                                  .split(os.pathsep) if p])
    code = f"from {__name__} import _probe_main; _probe_main()"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results, problems = [], []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            problems.append("a probe process timed out")
        except BaseException:
            for p in procs:
                p.kill()
            raise
        if proc.returncode != 0:
            problems.append(f"probe failed: {err[-500:]}")
            results.append(None)
            continue
        results.append(json.loads(out.strip().splitlines()[-1]))
    if None not in results and results[0] != results[1]:
        diff = [(a, b) for a, b in zip(*results) if a != b][:5]
        problems.append(f"choices differ between processes: {diff}")
    rows = [{"launch": r[0], "kernel": r[1], "config": r[2]} for r in (results[0] or [])]
    return {"status": "pass" if not problems else "fail", "problems": problems, "rows": rows}
