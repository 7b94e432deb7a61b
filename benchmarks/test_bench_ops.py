"""Every contender x case x mode of the selected profile under pytest-benchmark.

Each benchmark group is one (case, mode), so pytest-benchmark's table compares the
contenders side by side; ``extra_info`` carries the floor FLOPs/bytes, achieved
TFLOP/s and GB/s (from the median) and the error against float64. Timing uses
pedantic mode: warm-up rounds, then rounds of enough iterations to last ``sample_s``.
"""
import functools
import math
import os
import time

import pytest
import torch

from .conftest import DEVICE
from .contenders import CONTENDERS, Unavailable, check_output, make_problem
from .run import DTYPES, model_work
from .shapes import PROFILES
from .timing import mode_callable

PROFILE = PROFILES[os.environ.get("SPECLORA_BENCH_PROFILE", "gpu" if DEVICE == "cuda" else "cpu")]
DTYPE = DTYPES[os.environ.get("SPECLORA_BENCH_DTYPE", "bf16" if DEVICE == "cuda" else "fp32")]
ADAPTER = os.environ.get("SPECLORA_BENCH_ADAPTER", "lora")
DROPOUT = float(os.environ.get("SPECLORA_BENCH_DROPOUT", "0.05"))


@functools.lru_cache(maxsize=1)
def _problem(case):
    return make_problem(case, dtype=DTYPE, device=DEVICE, adapter=ADAPTER, dropout_p=DROPOUT)


def _synced(fn):
    if DEVICE != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("name", list(CONTENDERS))
@pytest.mark.parametrize("mode", PROFILE.modes)
@pytest.mark.parametrize("case", PROFILE.cases, ids=lambda c: (
    f"{c.shape.name}-{c.shape.in_features}x{c.shape.out_features}-M{c.tokens}-R{c.rank.total}"))
def test_contender(benchmark, case, mode, name):
    problem = _problem(case)
    try:
        err = check_output(name, problem, CONTENDERS[name](problem))
    except Unavailable as why:
        pytest.skip(str(why))
    bound = CONTENDERS[name](problem)
    fn = _synced(mode_callable(bound, problem, mode))
    fn()
    t0 = time.perf_counter()
    fn()
    iterations = max(1, math.ceil(PROFILE.sample_s / max(time.perf_counter() - t0, 1e-9)))
    benchmark.group = f"{case.label} | {mode}"
    benchmark.pedantic(fn, rounds=PROFILE.min_rounds, iterations=iterations, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a plain test
        return
    flops, nbytes = model_work(case, problem, mode, bound.adapter, bound.nf4)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        contender=name, mode=mode, tokens=case.tokens, target_tokens=case.target_tokens,
        rank=case.rank.total, dtype=str(DTYPE), floor_flops=flops, floor_bytes=nbytes,
        tflops=flops / median / 1e12, gbps=nbytes / median / 1e9, max_rel_err=err)
