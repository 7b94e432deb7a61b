"""Test setup: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, hence here, at the top.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns on every compile until this is set; 1 is its current default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def torch_cpu_path(monkeypatch):
    """Run the op's PyTorch path for CPU tensors even under the interpreter.

    Model-level tests (whole transformers models, training loops) would take minutes in
    the interpreter; the kernels themselves are proven in tests/test_ops*.py.
    """
    from speclora_kernels.ops import autograd

    use_triton = autograd._use_triton
    monkeypatch.setattr(autograd, "_use_triton",
                        lambda x, *a, **k: x.is_cuda and use_triton(x, *a, **k))


@pytest.fixture
def single_thread():
    """One torch thread: tiny models and timing loops stall on thread barriers when the
    two cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
