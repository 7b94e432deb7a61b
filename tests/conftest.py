"""Test setup and the helpers the test files share.

Without a GPU, Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET must
be set before triton is first imported, hence here, at the top. With a GPU the op tests run
the compiled kernels on it (``device``), bf16 included.
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns on every compile until this is set; 1 is its current default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
from _interpreter_compat import apply as _fix_old_interpreter  # noqa: E402

_fix_old_interpreter()

OP_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Activation dtypes of the op tests: the interpreter's bf16 tl.dot multiplies raw bits
# (triton#11584), so bf16 runs on a GPU only (the compile report covers it here).
OP_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if OP_DEVICE == "cuda" else [])
# Relative error against float64, per activation dtype.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.fixture
def device():
    """Where the op tests run the kernels: the GPU when there is one, else the CPU (the
    Triton interpreter)."""
    return OP_DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison_outputs():
    """Every buffer the kernels' launchers allocate starts as NaN, so an element a kernel
    fails to write cannot pass."""
    from speclora_kernels.ops import recipe

    with recipe.filled_outputs(float("nan")):
        yield


@pytest.fixture
def torch_cpu_path():
    """Run the op's CPU backend for CPU tensors even under the interpreter.

    Model-level tests (whole transformers models, training loops) would take minutes in
    the interpreter; the kernels themselves are proven in tests/test_ops*.py.
    """
    from speclora_kernels.ops import autograd

    with autograd.cpu_path():
        yield


@pytest.fixture
def single_thread():
    """One torch thread: tiny models and timing loops stall on thread barriers when the
    two cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(got, want) -> float:
    """Max-norm relative error of ``got`` against ``want``; fails on a non-finite ``got``
    (an unwritten, NaN-poisoned element)."""
    assert torch.isfinite(got).all(), "non-finite values (an unwritten poisoned element?)"
    got, want = got.double(), want.double().to(got.device)
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@contextlib.contextmanager
def kernel_launches():
    """Names of the kernels launched in the block, compiled or interpreted (filled in when
    the block ends)."""
    from speclora_kernels.ops import tuning

    names = []
    with tuning.record_launches() as launches:
        yield names
    names.extend(kernel.name for kernel, _ in launches)


@contextlib.contextmanager
def forced_path(path, segments=2):
    """Every launch takes the fused, split, segmented or (decode forward) split-K path (None:
    the launcher's choice; split-K: 2 slices of K, 32-wide column tiles).

    "segmented": the one-launch large-M forward and dx at a small shape, ``segments``
    segments of 64-wide output column tiles (the interpreter would otherwise take one tile
    as wide as the output), so that outputs wider than 64 give segments of several tiles."""
    from speclora_kernels.tools.gpu_check.correctness import forced_path as force

    with force(path, segments) if path is not None else contextlib.nullcontext():
        yield
