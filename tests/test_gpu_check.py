"""``python -m speclora_kernels.tools.gpu_check``, proven without a GPU: the command refuses
to run without CUDA; the planner keeps correctness first and the estimate within the
budget; the covering design covers every pair; the report and exit status follow the
results; the worker pool survives a crashing job; the whole command, with the GPU work
faked, writes both reports; and the correctness jobs themselves pass in the interpreter."""
import itertools
import json
import subprocess
import sys
import time
import types

import pytest
import torch

from speclora_kernels.tools.gpu_check import budget, cases, collect, report

PLAN_ARGS = dict(cover_cases=len(cases.covering_design()), max_cases=cases.product_size(),
                 layer_jobs=12, forced_configs=39)
# (name, points, s per point, prewarm jobs, skip reason, key points, their prewarm jobs)
TIMING = [("dense", 65, 3.0, 9, None, 5, 3), ("nf4", 32, 3.0, 4, None, 4, 2)]
CORRECTNESS = ("cases", "dropout_mask", "layers", "forced_configs")
TIMINGS = ("ceilings", "stream_scan", "dense", "nf4")


def plan(seconds, cores=16, gpus=1, timing=TIMING, **kw):
    return budget.make_plan(seconds, cores, gpus, timing_items=timing, **{**PLAN_ARGS, **kw})


# ------------------------------------------------------------------ the command
def test_cli_without_cuda_exits_2_with_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "speclora_kernels.tools.gpu_check", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ covering design
def test_covering_design_covers_every_pair():
    design = cases.covering_design()
    for a, b in itertools.combinations(cases.AXES, 2):
        seen = {(row[a], row[b]) for row in design}
        assert seen == set(itertools.product(cases.AXES[a], cases.AXES[b])), (a, b)
    lower = max(len(x) * len(y) for x, y in itertools.combinations(cases.AXES.values(), 2))
    assert lower <= len(design) < 2 * lower < cases.product_size() / 100
    assert design == cases.covering_design()  # deterministic
    # built greedily: every prefix covers at least as much as any shorter one
    coverage = [cases.pair_coverage(design[:n])[0] for n in range(1, len(design) + 1)]
    assert coverage == sorted(coverage) and coverage[-1] == cases.pair_coverage(design)[1]


def test_correctness_cases_trim_then_extend():
    cover = cases.covering_design()
    short, exact, long = (cases.correctness_cases(n) for n in (10, len(cover), 150))
    strip = [{k: v for k, v in c.items() if k != "id"} for c in long]
    assert len(short) == 10 and len(exact) == len(cover) and len(long) == 150
    assert strip[:len(cover)] == cover
    assert len({cases.case_label(c) for c in long}) == 150  # extras repeat nothing
    assert [c["id"] for c in long[:3]] == ["c000", "c001", "c002"]
    assert long == cases.correctness_cases(150)


# ------------------------------------------------------------------ planner
@pytest.mark.parametrize("seconds", [60, 120, 300, 600, 900, 1800])
@pytest.mark.parametrize("cores,gpus", [(16, 1), (2, 1), (16, 2), (64, 8)])
def test_plan_fits_the_budget_key_timings_then_correctness(seconds, cores, gpus):
    p = plan(seconds, cores, gpus)
    assert p.estimate <= seconds
    assert p.workers == min(cores, 8)
    order = p.order()
    assert p.units("cases") >= budget.MIN_CASES
    # the key timings, then correctness, then runtime behaviour, then the other timings
    ranks = [0 if i.name in ("ceilings", "dense", "nf4") else 1 if i.name in CORRECTNESS
             else 3 if i.stage == "timing" else 2 for i in p.items]
    assert ranks == sorted(ranks)
    assert all(i.stage in ("pool", "serial", "pytest", "timing") for i in p.items)
    # every skipped item says why; planned and skipped cover every item once
    assert all(reason for _, _, reason in p.skipped)
    names = set(order) | {n for n, _, _ in p.skipped}
    assert {"cases", "graph_step", "pytest", "devices", *CORRECTNESS, *TIMINGS} <= names


def test_plan_fits_the_key_timings_at_300_s_on_one_gpu():
    """The timings that decide the claims run even at the default budget: every key point
    of the registered pairs, with correctness sampled beside them."""
    from speclora_kernels.tools.gpu_check import __main__ as cli
    from speclora_kernels.tools.gpu_check import timings

    args = cli.parse_args(["--out", "x", "--budget", "300", "--plan-only"])
    p = cli.make_plan(args, 16, 1)[0]
    assert p.estimate <= 300
    for name in ("dense", "nf4"):
        pair = timings.REGISTRY[name]
        assert p.units(name) >= pair.key > 0, name
    keys = [(pt.in_f, pt.out_f, pt.M, pt.mode) for pt in timings.REGISTRY["dense"].points[:5]]
    assert keys == [(4096, 4096, 1, "fwd"), (4096, 4096, 16, "fwd"), (4096, 1024, 1, "fwd"),
                    (4096, 1024, 16, "fwd"), (4096, 4096, 4096, "fwd+bwd")]
    assert p.units("cases") >= budget.MIN_CASES and p.get("correctness.layers") is None
    assert p.units("layers") == 12


def test_plan_only_prints_the_plan_without_a_gpu():
    proc = subprocess.run([sys.executable, "-m", "speclora_kernels.tools.gpu_check", "--out",
                           "unused", "--budget", "300", "--plan-only", "--cores", "16"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("plan for 300 s on 16 cores, 1 GPU(s), 8 workers")
    assert "run   timings.dense" in out and "llama3-8b 4096->4096 M4096 fwd+bwd" in out
    assert "run   timings.nf4" in out and "leave devices" in out and "one GPU" in out


def test_plan_scales_cases_with_the_budget():
    counts = [plan(s).units("cases") for s in (60, 300, 900)]
    assert counts[0] < counts[1] < counts[2]
    assert counts[0] >= budget.MIN_CASES                 # a minute: mostly the key timings
    assert counts[1] >= PLAN_ARGS["cover_cases"]         # the cover fits 300 s on 16 cores
    assert plan(30).units("cases") < PLAN_ARGS["cover_cases"]  # trimmed, not dropped
    assert plan(5).units("cases") == budget.MIN_CASES
    slow = plan(300, costs={"case": 12.0}).units("cases")
    assert slow < counts[1]


def test_plan_never_trades_correctness_for_the_other_timings():
    key_only = [(n, k, per, warm_k, r, k, warm_k) for n, _, per, _, r, k, warm_k in TIMING]
    for seconds in (60, 300, 900, 3000):
        with_timings, without = plan(seconds), plan(seconds, timing=key_only)
        for name in CORRECTNESS + ("graph_step", "pytest"):
            assert with_timings.units(name) == without.units(name), (seconds, name)
        if with_timings.units("dense") > 5:
            assert all(with_timings.units(n) == full for n, full in
                       (("layers", 12), ("forced_configs", 39), ("dropout_mask", 1)))


def test_plan_skips_with_reasons():
    short = plan(300, gpus=1)
    reasons = {n: r for n, _, r in short.skipped}
    assert reasons["devices"] == "skipped: one GPU"
    assert "devices" in plan(300, gpus=2).order()
    assert reasons["dense"].startswith("budget")  # not every dense point at 300 s
    assert 5 <= short.units("dense") < 65
    roomy = plan(3000, timing=[("dense", 64, 3.0, 8, None, 5, 3),
                               ("nf4", 32, 3.0, 4, "skipped: bitsandbytes not importable",
                                4, 2)])
    assert roomy.units("dense") == 64 and roomy.get("nf4") is None
    assert dict((n, r) for n, _, r in roomy.skipped)["nf4"] == \
        "skipped: bitsandbytes not importable"
    no_tests = plan(900, pytest_skip="skipped: tests/ not found beside the package")
    assert no_tests.get("pytest") is None
    assert "tests/ not found" in dict((n, r) for n, _, r in no_tests.skipped)["pytest"]
    d = plan(900).to_dict()
    assert [i["name"] for i in json.loads(json.dumps(d))["items"]][:4] == [
        "ceilings", "dense", "nf4", "cases"]


def test_pytest_stage_skipped_without_pytest(monkeypatch):
    from speclora_kernels.tools.gpu_check import runtime

    assert runtime.pytest_skip() is None  # a checkout with pytest: the stage can run
    monkeypatch.setattr(runtime, "_have", lambda module: module != "pytest")
    assert "pytest not importable" in runtime.pytest_skip()
    assert runtime.run_pytest(10, 1)["status"] == "skipped"  # nothing started


def test_timing_registry_feeds_the_planner(monkeypatch):
    from speclora_kernels.tools.gpu_check import timings

    monkeypatch.setattr(timings.REGISTRY["nf4"], "requires", lambda: None)  # no bnb import

    items = {name: rest for name, *rest in timings.planner_items()}
    assert items["dense"][0] == 65 and items["nf4"][0] == 32
    assert items["dense"][4:] == [5, 3] and items["nf4"][4:] == [4, 2]
    pair = timings.REGISTRY["dense"]
    assert len(set(pair.points)) == len(pair.points)
    warm = pair.prewarm_points()
    assert {(p.M, p.mode) for p in warm} == {(m, mode) for m in (1, 16, 512, 8192)
                                             for mode in timings.MODES} | {(4096, "fwd+bwd")}
    assert [(p.M, p.mode) for p in pair.prewarm_points(pair.key)] == [
        (1, "fwd"), (16, "fwd"), (4096, "fwd+bwd")]


# ------------------------------------------------------------------ report
def fake_results():
    return [
        report.CheckResult("correctness.cases", "pass", 12.5, 20.0, "40/40 cases passed",
                           {"cases": 40, "worst": 0.25, "nan": float("nan")},
                           {"by dtype": [{"dtype": "bf16", "cases": 10, "worst": 0.31}]},
                           data={"cases": [{"id": "c000"}]}),
        report.CheckResult("pytest", "partial", 60.0, 60.0, "120 passed; stopped at its limit",
                           {"passed": 120}),
        report.skipped("timings.dense", "budget: needs ~18 s, 3 s left"),
    ]


def test_report_writes_json_and_markdown(tmp_path):
    meta = {"gpu": "NVIDIA H200", "sms": 132, "seed": 7}
    results = fake_results()
    json_path, md_path = report.write(str(tmp_path), meta, plan(300).to_dict(), results)
    data = json.loads(open(json_path).read())
    assert data["result"] == "PASS" and data["exit_status"] == 0
    assert [c["name"] for c in data["checks"]] == [r.name for r in results]
    assert data["checks"][0]["numbers"]["nan"] == "nan"           # valid JSON
    assert data["checks"][0]["data"]["cases"] == [{"id": "c000"}]
    md = open(md_path).read()
    assert md.startswith("# gpu_check: PASS") and "NVIDIA H200" in md
    for r in results:
        assert f"| {r.name} | {r.status} |" in md
    assert "| bf16 | 10 | 0.31 |" in md and "c000" not in md      # data stays in the JSON
    assert "- timings.dense: budget: needs ~18 s, 3 s left" in md
    assert len(md.splitlines()) < 80


def test_exit_status_only_zero_if_every_check_that_ran_passed():
    ok = fake_results()
    assert report.exit_status(ok) == 0
    for bad in ("fail", "error"):
        assert report.exit_status(ok + [report.CheckResult("x", bad)]) == 1
    assert report.exit_status([report.skipped("x", "why")]) == 1  # nothing ran
    with pytest.raises(ValueError, match="status"):
        report.CheckResult("x", "ok")


def test_cases_check_counts_and_groups():
    cs = cases.correctness_cases(6)
    results = {c["id"]: {"status": "pass", "worst_over_tol": 0.1 * i, "errors": {"y": 1e-6}}
               for i, c in enumerate(cs[:4])}
    results[cs[4]["id"]] = {"status": "fail", "worst_over_tol": 3.0, "errors": {"y": 0.03},
                            "problems": ["y off"]}
    check = collect.cases_check(cs, results, 1.0, 2.0)
    assert check.status == "fail" and check.numbers["not_run"] == 1
    assert check.tables["failures"][0]["problems"] == "y off"
    assert sum(g["cases"] for g in check.tables["by dtype"]) == 5
    del results[cs[4]["id"]]
    assert collect.cases_check(cs, results, 1.0, 2.0).status == "partial"


def test_pytest_command_and_counts(monkeypatch):
    from speclora_kernels.tools.gpu_check import runtime

    assert runtime.repo_root() is not None
    cmd, deselected = runtime.pytest_command(1)
    assert cmd[cmd.index("-m") + 1:][:2] == ["pytest", "-q"] and "-x" not in cmd
    assert all(f in cmd for f in runtime.TEST_FILES) and "-n" not in cmd
    names = {n for n, _ in deselected}
    assert "test_keep_mask_is_the_kernels_mask" in names and "test_cpu_backend" in names
    monkeypatch.setattr(runtime, "_have", lambda m: m == "xdist")  # no bitsandbytes
    cmd, deselected = runtime.pytest_command(8)
    assert cmd[-2:] == ["-n", "8"]
    assert "test_layer_from_linear4bit_through_kernels" in {n for n, _ in deselected}
    assert runtime.parse_pytest("x\n== 1 failed, 97 passed, 2 skipped, 5 deselected in 9s ==") \
        == {"failed": 1, "passed": 97, "skipped": 2, "deselected": 5}
    # cut short by the time limit: counted from the progress lines
    assert runtime.parse_pytest("....F.s. [ 10%]\n..E\n") == \
        {"passed": 8, "failed": 1, "skipped": 1, "errors": 1}


# ------------------------------------------------------------------ pool
def test_pool_reports_crashes_and_runs_the_rest():
    from speclora_kernels.tools.gpu_check.pool import Pool

    jobs = [{"id": "e0", "kind": "echo", "payload": [1, "a"]},
            {"id": "boom", "kind": "exit", "payload": 3}]
    pool = Pool(1)  # one spawn: a worker costs seconds of imports here
    out = pool.run(jobs, time.monotonic() + 120)
    assert out["boom"]["status"] == "crashed" and "code 3" in out["boom"]["error"]
    assert out["e0"]["status"] == "pass" and out["e0"]["payload"] == [1, "a"]
    late = Pool(1).run([{"id": "a", "kind": "echo", "payload": 0}], time.monotonic() - 1)
    assert late["a"]["status"] == "not run"


# ------------------------------------------------------------------ the whole command
class FakePool:
    """Runs no process: every job passes, except those named in ``fail``."""

    fail = ()

    def __init__(self, workers):
        self.workers, self.start_seconds, self.kinds = workers, 0.0, []

    def run(self, jobs, deadline, on_result=None):
        out = {}
        for job in jobs:
            self.kinds.append(job["kind"])
            r = {"status": "pass", "seconds": 0.1, "worst_over_tol": 0.1, "errors": {"y": 1e-6},
                 "rows": [{"replay": 0, "seed": 1}], "losses": [1.0, 0.9]}
            if job["id"] in self.fail:
                r = {"status": "fail", "worst_over_tol": 5.0, "errors": {"y": 0.5},
                     "problems": ["wrong"]}
            out[job["id"]] = r
        return out


@pytest.mark.parametrize("fail", [(), ("c003",), ("pytest", "timings.dense")])
def test_command_with_the_gpu_faked(tmp_path, monkeypatch, capsys, fail):
    """The whole run with the GPU faked at its boundary (device facts, worker pool, the
    serial measurements, pytest, the timings): the plan printed first, every stage run and
    reported even after another failed, the failing ones named, the exit status."""
    from speclora_kernels.tools.gpu_check import __main__ as cli
    from speclora_kernels.tools.gpu_check import pool, runtime, timings, tuning_checks

    monkeypatch.setattr(pool, "Pool", type("P", (FakePool,), {"fail": fail}))
    monkeypatch.setattr(timings.REGISTRY["nf4"], "requires", lambda: "skipped: no bnb")
    props = types.SimpleNamespace(name="Fake GPU", major=9, minor=0, multi_processor_count=132,
                                  total_memory=141 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    ok = {"status": "pass", "rows": [], "counts": {"passed": 3}, "seconds": 1.0}
    bad_tests = {"status": "fail", "counts": {"passed": 2, "failed": 1}, "timed_out": False,
                 "failed": ["FAILED tests/test_ops.py::test_x - AssertionError"], "seconds": 1.0}
    for mod, name in ((tuning_checks, "first_call_cost"), (tuning_checks, "threads_on_cold_cache")):
        monkeypatch.setattr(mod, name, lambda seed: ok)
    monkeypatch.setattr(tuning_checks, "choices_in_two_processes", lambda timeout: ok)
    monkeypatch.setattr(runtime, "run_pytest",
                        lambda limit, workers: bad_tests if "pytest" in fail else ok)
    monkeypatch.setattr(timings, "ceilings", lambda: {"status": "pass", "copy_GBps": 4.3e3})
    monkeypatch.setattr(timings, "stream_scan", lambda sms: {"status": "pass", "rows": [
        {"programs": 1, "GBps": 60.0}, {"programs": 264, "GBps": 4e3}]})

    def run_pair(pair, *a):
        if f"timings.{pair.name}" in fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return {"status": "pass", "rows": [{"x": 1}]}

    monkeypatch.setattr(timings, "run_pair", run_pair)
    monkeypatch.setattr(cli, "_driver", lambda: "580.0")
    args = cli.parse_args(["--out", str(tmp_path), "--budget", "900", "--workers", "16",
                           "--seed", "3"])
    rc = cli.Runner(args, torch).run()
    printed = capsys.readouterr().out
    assert printed.index("plan for 900 s on 16 cores") < printed.index("pool: ")
    data = json.loads((tmp_path / "report.json").read_text())
    names = {c["name"]: c["status"] for c in data["checks"]}
    assert rc == (1 if fail else 0) == data["exit_status"]
    assert names["correctness.cases"] == ("fail" if "c003" in fail else "pass")
    assert names["pytest"] == ("fail" if "pytest" in fail else "pass")
    assert names["timings.dense"] == ("error" if "timings.dense" in fail else "pass")
    assert names["devices"] == "skipped" and names["timings.nf4"] == "skipped"
    for check in ("dropout_mask", "correctness.layers", "correctness.forced_configs",
                  "graph_step", "compile_step", "tuning.first_call", "tuning.processes",
                  "timings.ceilings", "timings.stream_scan"):
        assert names[check] == "pass", check
    assert data["meta"]["seed"] == 3 and data["meta"]["gpu"] == "Fake GPU"
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# gpu_check: ")
    if "pytest" in fail:
        assert "tests/test_ops.py::test_x" in md


def test_nf4_timing_pair_runs_without_bitsandbytes(monkeypatch, torch_cpu_path):
    """NF4 against dense needs no bitsandbytes (our quantizer writes its bytes); only its
    Linear4bit contenders do. Built here on CPU tensors, one small point (the CPU backend:
    bf16 dots are wrong in the interpreter)."""
    from speclora_kernels.tools.gpu_check import timings

    monkeypatch.setattr(timings, "n_sets", lambda nbytes, device: 1)
    monkeypatch.setattr(timings, "_bnb_reason", lambda: "bitsandbytes not importable (test)")
    point = timings.Point("tiny", 128, 72, 3, "fwd")
    contenders, errors = timings.build_nf4(point, "cpu", seed=5)
    sets = contenders.pop("sets")
    assert list(contenders) == ["fused_nf4", "fused_dense", "linear"]
    assert 0 < errors["fused_nf4"] < timings.TOL["bf16"]
    nf4, dense = (contenders[n](sets[0]).float() for n in ("fused_nf4", "fused_dense"))
    torch.testing.assert_close(nf4, dense, rtol=2e-2, atol=2e-2)
    assert timings.REGISTRY["nf4"].caveat is not None


# ------------------------------------------------------------------ the jobs, interpreted
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run covers these")
def test_correctness_jobs_pass_in_the_interpreter():
    """The job code itself (inputs, reference, NaN poison, mask rebuild, path checks) on CPU
    tensors in the Triton interpreter, at small sizes."""
    from speclora_kernels.tools.gpu_check import correctness

    picked = [c for c in cases.correctness_cases(40) if c["dtype"] == "fp32" and c["M"] <= 17
              and c["base"] != "dense"][:2]
    for case in picked:
        r = correctness.run_case({"case": case, "seed": 1, "device": "cpu"})
        assert r["status"] == "pass", (case, r)  # a pass includes the path each launch took
        if case["path"] != "splitk":  # split-K is the decode forward's only (dx: fused)
            assert set(r["path"].values()) == {case["path"]}
    r = correctness.run_dropout_mask({"seed": 2, "device": "cpu", "M": 9, "K": 20,
                                      "paths": ("fused", "split")})
    assert r["status"] == "pass", r
    assert all(row["fwd_mismatches"] == row["dx_mismatches"] == 0 for row in r["rows"])
    r = correctness.run_layer({"method": "spectral_on_linear4bit", "dtype": "fp32", "seed": 3,
                               "device": "cpu", "shape": (64, 40, 4)})
    assert r["status"] == "pass" and r["base"] == "nf4", r


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run covers this")
def test_graph_check_recovers_the_seed_and_recomputes_the_step():
    """The CUDA-graph check's two halves, eagerly: the seed the op saved for backward is
    found, and the float64 step recomputed with its mask gives the kernels' gradients (with
    another seed's mask it does not)."""
    from speclora_kernels.ops import tuning
    from speclora_kernels.tools.gpu_check import runtime
    from speclora_kernels.tools.gpu_check.correctness import rel_err

    layer = runtime.speclora_layer("cpu", 3, in_f=64, out_f=40, r=4, k=4)
    named = runtime.trainable(layer)
    x = torch.randn(6, 64)
    start = {n: p.detach().clone() for n, p in named}
    with tuning.tuning("heuristic"), runtime.saved_seeds() as seeds:
        layer(x).square().mean().backward()
    assert len(seeds) == 1
    _, _, grads, mask = runtime.eager_step(layer, start, x, int(seeds[0]))
    assert 0.5 < mask.float().mean() < 0.9
    assert max(rel_err(p.grad, grads[n]) for n, p in named) < 1e-5
    _, _, wrong, _ = runtime.eager_step(layer, start, x, int(seeds[0]) + 1)
    assert max(rel_err(p.grad, wrong[n]) for n, p in named) > 1e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run covers these")
@pytest.mark.slow  # 7-35 s: the not-slow loop stays short
def test_forced_configs_launch_their_kernel_in_the_interpreter():
    """Each kernel's forced-config job takes a path that launches it (split-K at 16 rows,
    the dequantizer on an NF4 base), in the dtype its config serves."""
    from speclora_kernels.ops import tuning
    from speclora_kernels.tools.gpu_check import correctness

    for kernel in (tuning.SPLITK, tuning.DEQUANT, tuning.FWD):
        fp32 = next(i for i, c in enumerate(kernel.configs) if tuning.serves_fp32(c)) \
            if kernel is not tuning.DEQUANT else 0
        for index in {0, fp32}:
            r = correctness.run_forced_config({"kernel": kernel.name, "index": index,
                                               "seed": 1, "device": "cpu"})
            assert r["status"] == "pass" and r["launches_of_kernel"] >= 1, (kernel.name, r)
