"""``import speclora_kernels`` makes our adapter types known to PEFT, whichever of peft and
speclora_kernels is imported first, without ever importing peft itself
(``speclora_kernels._import_hook``)."""
import importlib
import importlib.resources
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from _tiny_models import logits, perturb, tiny_llama, token_ids
from safetensors.torch import load_file

from speclora_kernels import _import_hook
from speclora_kernels.peft import SpecLoraConfig

ROOT = Path(__file__).resolve().parents[1]


def test_hook_runs_once_after_the_import_then_leaves(tmp_path, monkeypatch):
    name = "speclora_hook_probe_pkg"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("VALUE = 7\n")
    (tmp_path / name / "data.txt").write_text("kept")
    monkeypatch.syspath_prepend(str(tmp_path))
    finders, calls = list(sys.meta_path), []
    try:
        _import_hook.when_imported(name, lambda: calls.append(sys.modules[name].VALUE))
        assert len(sys.meta_path) == len(finders) + 1
        assert importlib.util.find_spec(name) is not None  # a probe (as transformers does) ...
        assert calls == [] and len(sys.meta_path) == len(finders) + 1  # ... imports nothing
        module = importlib.import_module(name)
        assert calls == [7] and sys.meta_path == finders
        # the module keeps its own loader: resources and reloads work as without the hook
        assert type(module.__loader__).__name__ == "SourceFileLoader"
        assert module.__spec__.loader is module.__loader__
        assert importlib.resources.files(name).joinpath("data.txt").read_text() == "kept"
        assert importlib.reload(module).VALUE == 7 and calls == [7]
        _import_hook.when_imported(name, lambda: calls.append("now"))  # imported already
        assert calls == [7, "now"] and sys.meta_path == finders
        monkeypatch.setitem(sys.modules, "speclora_blocked_pkg", None)  # an import blocked on purpose
        _import_hook.when_imported("speclora_blocked_pkg", lambda: calls.append("blocked"))
        assert calls == [7, "now"] and sys.meta_path == finders
    finally:
        sys.modules.pop(name, None)
        sys.meta_path[:] = finders


def run_python(code: str, timeout=300) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU backend
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**env, "PYTHONPATH": str(ROOT)})


def test_importing_speclora_kernels_does_not_import_peft():
    proc = run_python("import sys, speclora_kernels\n"
                      "assert 'peft' not in sys.modules and 'speclora_kernels.peft' not in sys.modules\n"
                      "print(type(sys.meta_path[0]).__name__)")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.strip() == "_AfterImport"  # waiting for peft


@pytest.mark.slow  # two fresh interpreters importing torch, transformers and peft
@pytest.mark.usefixtures("torch_cpu_path", "single_thread")
def test_from_pretrained_after_import_speclora_kernels_either_order(tmp_path):
    """A saved SpecLoRA adapter loads with PeftModel.from_pretrained in a fresh process that
    imports peft and speclora_kernels (not speclora_kernels.peft), in either order, with
    this process's outputs bit for bit."""
    ids = token_ids()
    model = peft.get_peft_model(tiny_llama(), SpecLoraConfig(r=4, k=4, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    model.eval()
    want = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    procs = {}
    for order in (("peft", "speclora_kernels"), ("speclora_kernels", "peft")):
        out = tmp_path / f"{order[0]}_first.safetensors"
        procs[order] = run_python(f"""
import sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
import {order[0]}
import {order[1]}
import torch
torch.set_num_threads(1)  # as this process (single_thread): the same sums, bit for bit
from safetensors.torch import save_file
from _tiny_models import logits, tiny_llama, token_ids
model = peft.PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / 'adapter')!r})
assert type(model.base_model).__name__ == "SpecLoraModel", type(model.base_model)
save_file({{"logits": logits(model, token_ids())}}, {str(out)!r})
"""), out
    for order, (proc, out) in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{order}: {err[-3000:]}"
        assert torch.equal(load_file(out)["logits"], want), order
