"""pytest-benchmark setup: ``pytest benchmarks/ --benchmark-only``.

Environment knobs (pytest-benchmark owns the command line):
``SPECLORA_BENCH_PROFILE`` (smoke | cpu | gpu; default gpu on CUDA, cpu otherwise),
``SPECLORA_BENCH_DTYPE`` (fp32 | fp16 | bf16), ``SPECLORA_BENCH_THREADS`` (default 2),
``SPECLORA_BENCH_ADAPTER`` (lora | speclora), ``SPECLORA_BENCH_DROPOUT`` (default 0.05).
"""
import os

import pytest
import torch

from .env import environment

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
THREADS = int(os.environ.get("SPECLORA_BENCH_THREADS", "2"))


def pytest_configure(config):
    torch.set_num_threads(THREADS)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["speclora_env"] = environment(DEVICE)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
