"""The README's demo, with few steps: NF4 base, SpecLoRA, loss falls, bit-exact reload,
trainable-parameter counts of every method."""
import os
import re
import subprocess
import sys

import pytest

from speclora_kernels import METHODS

pytestmark = pytest.mark.usefixtures("torch_cpu_path", "single_thread")


def expected_counts(linear: list[tuple[int, int, str]], r: int, k: int) -> dict[str, int]:
    """Trainable parameters per method from the README's "Methods" table (its trainable
    column), for (in, out, name) layers."""
    pica_groups = {(name, out) for _, out, name in linear}
    return {
        "lora": sum(r * (i + o) for i, o, _ in linear),
        "speclora": sum(r * (i + o) + k for i, o, _ in linear),
        "spectral_additive": sum(r * (i + o) for i, o, _ in linear),
        "spectral_rotational": len(linear) * (2 * r * r + r),
        "pica": sum(r * out for _, out in pica_groups),
    }


def llama_layers(hidden=128, inter=256, kv=64, blocks=2):
    shapes = [(hidden, hidden, "q"), (hidden, kv, "k"), (hidden, kv, "v"), (hidden, hidden, "o"),
              (hidden, inter, "gate"), (hidden, inter, "up"), (inter, hidden, "down")]
    return shapes * blocks


@pytest.mark.slow
def test_demo_cli_llama(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "speclora_kernels.demo", "--steps", "40", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "llama, speclora, NF4 (bitsandbytes Linear4bit) base" in out
    assert "fine-tune" in proc.stderr and "40/40" in proc.stderr  # the progress bar
    first, last = map(float, re.search(r"train loss ([\d.]+) \(first \d+ steps\) -> ([\d.]+)",
                                       out).groups())
    before, after = map(float, re.search(r"held-out loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first - 0.2 and after < before - 0.2, out
    assert "outputs bit-identical (max |diff| 0.0e+00)" in out
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    counts = expected_counts(llama_layers(), r=8, k=16)
    assert set(counts) == set(METHODS)
    for method, n in counts.items():
        assert re.search(rf"^  {method} +{n:,} ", out, re.M), (method, n, out)


@pytest.mark.slow
def test_demo_minilm(tmp_path):
    from speclora_kernels.demo import run

    result = run("minilm", "speclora", steps=20, out=str(tmp_path))
    assert result["reload_exact"]
    assert result["held_out_after"] < result["held_out_before"]
    blocks = [(384, 384, "query"), (384, 384, "key"), (384, 384, "value"),
              (384, 384, "attention.output.dense"), (384, 1536, "intermediate.dense"),
              (1536, 384, "output.dense")]
    linear = blocks * 6 + [(384, 384, "pooler.dense")]
    assert result["counts"] == expected_counts(linear, r=8, k=16)
