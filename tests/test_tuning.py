"""Autotuning rules, proven on CPU with the benchmarker replaced by a counting fake: one
tuning per (shape, bucket of M), never a re-tune, one tuning when threads race on a cold
cache, no timing while a CUDA graph is captured, and a timing-free choice that every
process makes alike under ``torch.use_deterministic_algorithms(True)``."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from speclora_kernels.ops import fused_adapter_linear, launch, plan, tuning


class CountingBench:
    """Fake benchmarker: records which config each timing was for (never runs the launch)
    and makes the config with the most programs the fastest, so the winner is known."""

    def __init__(self, delay: float = 0.0):
        self.calls, self.delay = [], delay
        self.lock = threading.Lock()

    def __call__(self, launch) -> float:
        args, cfg = launch.args
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            self.calls.append(cfg)
        return 1.0 / tuning.FWD.programs(args, cfg) if "BLOCK_N" in cfg.kwargs else 1.0


def fwd_args(M, N=256, K=128, R=8, device="meta", dtype=torch.float16):
    """Arguments of the fused forward GEMM launch at this shape (from a dry run of the op;
    the fused plan forced: at decode the op would take split-K)."""
    meta = dict(device=device, dtype=dtype)
    x, w = torch.empty(M, K, **meta), torch.empty(N, K, **meta)
    d, u = torch.empty(R, K, **meta), torch.empty(N, R, **meta)
    with tuning.record_launches(dry_run=True) as launches, plan.forced_plan("fused"):
        from speclora_kernels.ops import launch
        launch.adapter_forward(x, w, None, d, torch.empty(R, device=device), u, None, 0.0, 0,
                               False)
    return next(args for kernel, args in launches if kernel is tuning.FWD)


def test_m_buckets():
    assert [tuning.m_bucket(m) for m in (1, 16, 17, 32, 33, 500, 512, 513)] == \
        [16, 16, 32, 32, 64, 512, 512, 1024]
    assert tuning.m_bucket(10**6) == tuning.M_BUCKET_CAP
    # every M of a bucket prunes to the same configs
    for lo, hi in ((17, 32), (65, 128), (129, 256), (4097, 8192)):
        sets = {tuple(sorted(map(str, tuning.FWD.candidates(fwd_args(m), 1 << 40))))
                for m in (lo, hi)}
        assert len(sets) == 1, (lo, hi)


def test_one_tuning_per_bucket_and_no_retune(device):
    """Ten new sequence lengths in one bucket: one tuning (each candidate timed once), then
    none; a length in another bucket tunes once more. The winner is what runs."""
    bench = CountingBench()
    x = torch.randn(40, 64, device=device)
    w, d, s, u = (torch.randn(128, 64, device=device) / 8, torch.randn(8, 64, device=device) / 8,
                  torch.ones(8, device=device), torch.randn(128, 8, device=device))
    with tuning.tuning("autotune", bench, fresh=True):
        with tuning.record_launches() as launches:
            for m in range(17, 27):
                y = fused_adapter_linear(x[:m], w, None, d, s, u)
                assert torch.allclose(y, x[:m] @ w.T + (x[:m] @ d.T * s) @ u.T, atol=1e-4)
        first = len(bench.calls)
        n_candidates = len(tuning.FWD.candidates(launches[0][1], 1 << 40))
        assert first == n_candidates > 1
        for m in range(17, 33):
            fused_adapter_linear(x[:m], w, None, d, s, u)
        assert len(bench.calls) == first  # same bucket: no re-tune
        fused_adapter_linear(x[:40], w, None, d, s, u)
        assert len(bench.calls) > first  # bucket 64: tuned once more
        cached = tuning.cached_configs()
        assert len(cached) == 2
        key = tuning.FWD.tuning_key(launches[0][1], x.device)
        winner = max(tuning.FWD.candidates(launches[0][1], 1 << 40),
                     key=lambda c: tuning.FWD.programs(launches[0][1], c))
        assert cached[key] is winner
    assert tuning.cached_configs() == {}  # fresh cache restored afterwards


def test_threads_on_a_cold_cache_tune_once():
    bench = CountingBench(delay=0.01)
    args = fwd_args(20)
    n = len(tuning.FWD.candidates(args, 1 << 40))
    chosen = []
    with tuning.tuning("autotune", bench, fresh=True):
        threads = [threading.Thread(target=lambda: chosen.append(
            tuning.FWD.choose(args, torch.device("cpu")))) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert len(bench.calls) == n  # one tuning, the other threads waited for it
    assert len({id(c) for c in chosen}) == 1


def test_no_timing_while_capturing(monkeypatch):
    """Inside a CUDA-graph capture nothing is timed: a cold key gets the heuristic's config
    (not cached, so a later eager call still tunes), a warm key its cached config."""
    bench = CountingBench()
    args = fwd_args(20)
    device = torch.device("cpu")
    with tuning.tuning("autotune", bench, fresh=True):
        monkeypatch.setattr(tuning, "stream_capturing", lambda: True)
        cfg = tuning.FWD.choose(args, device)
        candidates = tuning.FWD.candidates(args, 1 << 40)
        assert cfg is tuning.FWD.heuristic(args, candidates, 132)
        assert bench.calls == [] and tuning.cached_configs() == {}
        monkeypatch.setattr(tuning, "stream_capturing", lambda: False)
        tuned = tuning.FWD.choose(args, device)
        assert len(bench.calls) == len(candidates)
        monkeypatch.setattr(tuning, "stream_capturing", lambda: True)
        assert tuning.FWD.choose(args, device) is tuned


def test_deterministic_algorithms_never_time():
    bench = CountingBench()
    args = fwd_args(20)
    with tuning.tuning("auto", bench, fresh=True):
        torch.use_deterministic_algorithms(True)
        try:
            assert tuning.effective_mode() == "heuristic"
            tuning.FWD.choose(args, torch.device("cpu"))
        finally:
            torch.use_deterministic_algorithms(False)
    assert bench.calls == []
    with pytest.raises(ValueError, match="mode"):
        with tuning.tuning("fastest"):
            pass


def test_heuristic_fills_the_gpu():
    """The timing-free choice gives every SM a program where some config can: at decode the
    widest tile that still covers 132 SMs, else the config with the most programs."""
    for M, N in ((16, 4096), (16, 14336), (4096, 4096)):
        args = fwd_args(M, N=N, K=4096, R=48, dtype=torch.bfloat16)
        candidates = tuning.FWD.candidates(args, 1 << 40)
        cfg = tuning.FWD.heuristic(args, candidates, 132)
        programs = tuning.FWD.programs(args, cfg)
        best = max(tuning.FWD.programs(args, c) for c in candidates)
        assert programs >= 132 or programs == best, (M, N, cfg)


HEURISTIC_SCRIPT = """
import json, torch
from speclora_kernels.ops import launch, tuning
out = []
for M, N, K, R in [(1, 4096, 4096, 48), (16, 1024, 4096, 16), (512, 4096, 4096, 64),
                   (8192, 14336, 4096, 48)]:
    meta = dict(device="meta", dtype=torch.bfloat16)
    x, w = torch.empty(M, K, **meta), torch.empty(N, K, **meta)
    d, u = torch.empty(R, K, **meta), torch.empty(N, R, **meta)
    with tuning.record_launches(dry_run=True) as launches:
        launch.adapter_forward(x, w, None, d, torch.empty(R, device="meta"), u, None, 0.0, 0,
                               True)
    torch.use_deterministic_algorithms(True)
    for kernel, args in launches:
        cfg = kernel.choose(args, torch.device("meta"))
        out.append([kernel.name, str(cfg)])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_deterministic_choice_is_the_same_in_every_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [subprocess.run([sys.executable, "-c", HEURISTIC_SCRIPT], capture_output=True,
                           text=True, env=env, timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first == second and len(first) >= 4


@pytest.mark.parametrize("setting,want", [("ieee", "tf32x3"), ("tf32", "tf32")])
def test_fp32_dots_follow_torch_precision(setting, want):
    """fp32 dots take TF32 only where torch's matmuls would; else fp32 accuracy (three TF32
    products). 16-bit operands always run their own tensor-core dot."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = setting
    try:
        assert launch.dot_precision(torch.float32) == want
        assert launch.dot_precision(torch.bfloat16) == "tf32"
    finally:
        matmul.fp32_precision = before
