"""Every kernel builds for real GPUs: compiled for sm_80 and sm_90 without a GPU.

Runs the CLI (``python -m speclora_kernels.tools.compile_report --quick``) in a fresh
process, where the interpreter is off, on a representative subset (decode and training
shapes, dense and NF4 bases, the smallest and the largest tile of every launch); the full
CLI compiles every config. Checks: no register spills, shared memory within the target's
limit, HGMMA in the sm_90 SASS of the GEMM kernels' tiles with BLOCK_M >= 64; the
segmented large-M forward and dx and the NF4 forward and dx kernels (row decoder and, for
in_features not a multiple of the blocksize, span decoder) are among the compiled rows on
both targets.
"""
import json
import os
import subprocess
import sys

import pytest

from speclora_kernels.ops.plan import NF4_REGISTER_ROWS

KERNELS = {"fwd_kernel", "fwd_splitk_kernel", "proj_kernel", "dx_kernel", "factor_grad_kernel",
           "dequant_kernel"}


@pytest.mark.slow
def test_compile_report_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, no cache hits
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "speclora_kernels.tools.compile_report", "--quick",
         "--jobs", "2", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    compiled = [r for r in rows if r["status"] == "ok"]
    assert {r["kernel"] for r in compiled} == KERNELS
    assert {r["arch"] for r in compiled} == {80, 90}
    assert all(r["status"] == "ok" or r["status"].startswith("pruned") for r in rows)
    for r in compiled:
        assert r["spills"] == 0 and 0 < r["regs"] <= 255, r
        assert r["smem"] <= r["smem_limit"] and (r["smem"] > 0 or r["kernel"] == "dequant_kernel"), r
        assert r["mma"] in ("HMMA", "HGMMA") or r["kernel"] == "dequant_kernel", r  # no dot there
    big_tiles = [r for r in compiled if r["arch"] == 90 and r["kernel"] in ("fwd_kernel",
                 "dx_kernel") and int(r["config"].split("x")[0]) >= 64]
    assert big_tiles and all(r["mma"] == "HGMMA" for r in big_tiles)
    assert " 0 failed" in proc.stdout
    # the segmented forward and dx (large M, one launch each) are among them, HGMMA above
    segmented = {(r["kernel"], r["arch"]) for r in compiled if "segmented" in r["variant"]}
    assert segmented == {(k, a) for k in ("fwd_kernel", "dx_kernel") for a in (80, 90)}
    # the forward decodes NF4 rows in registers at the quick subset's 64-row prompt only
    # where 64-row register tiles build (plan.NF4_REGISTER_ROWS: not on triton 3.6)
    nf4 = {(r["kernel"], r["arch"], "nf4_rows" in r["variant"]) for r in compiled
           if "nf4" in r["variant"] and r["kernel"] in ("fwd_kernel", "dx_kernel")}
    expected = {(k, a, rows) for k in ("fwd_kernel", "dx_kernel") for a in (80, 90)
                for rows in (True, False)}
    if NF4_REGISTER_ROWS < 64:
        expected -= {("fwd_kernel", a, True) for a in (80, 90)}
    assert nf4 == expected
    # and the split-K decode and the training-M dequantize on an NF4 base
    others = {(r["kernel"], r["arch"]) for r in compiled
              if "nf4" in r["variant"] and r["kernel"] in ("fwd_splitk_kernel", "dequant_kernel")}
    assert others == {(k, a) for k in ("fwd_splitk_kernel", "dequant_kernel") for a in (80, 90)}


def test_every_launch_has_a_config_the_rules_admit():
    """Planned on "meta" tensors in a process without the interpreter (nothing compiled):
    every launch of every scenario and dtype keeps at least one config, so none falls back
    to a config the report never built (one output column, dense and NF4, did)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from speclora_kernels.tools import compile_report as c; "
            "jobs, pruned, _ = c.plan([80, 90], list(c.DTYPES), c.SCENARIOS); "
            "print(len(jobs), sorted({j.scenario for j in jobs} & {'decode-n1', 'decode-nf4-n1'}), "
            "[(r.kernel, r.scenario, r.dtype) for r in pruned if r.status == 'FAIL: no config fits'])")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs, rest = proc.stdout.split(" ", 1)
    assert int(jobs) > 1000 and rest.strip() == "['decode-n1', 'decode-nf4-n1'] []", proc.stdout
