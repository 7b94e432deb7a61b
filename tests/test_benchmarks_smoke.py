"""CI smoke subset of the benchmark suite (seconds): every contender is built, checked
against float64 (forward and gradients) on the smoke shape, and timed once end to end
through ``benchmarks.run``; plus the parts of GPU mode that need no GPU."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package of the repo, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import report, run  # noqa: E402
from benchmarks.contenders import CONTENDERS, check_gradients, check_output, make_problem  # noqa: E402
from benchmarks.shapes import MODEL_SHAPES, PROFILES, RANKS, Case, Rank, select  # noqa: E402
from benchmarks.timing import Rotation, cpu_peak_bytes, mode_callable, peak_memory, rotation_count, time_interleaved  # noqa: E402

SMOKE = PROFILES["smoke"].cases


@pytest.mark.parametrize("case, adapter", [(SMOKE[0], "lora"), (SMOKE[1], "speclora")],
                         ids=["M1-lora", "M37-speclora"])
def test_every_contender_matches_float64(case, adapter, single_thread):
    p = make_problem(case, adapter=adapter, dropout_p=0.1, seed=case.tokens)
    for name, build in CONTENDERS.items():
        assert check_output(name, p, build(p)) <= 1e-2
        assert check_gradients(name, p, build) <= 1e-5


def test_check_catches_a_wrong_contender():
    p = make_problem(SMOKE[1])
    bound = CONTENDERS["fused"](p)
    good = bound.run
    bound.run = lambda x: good(x) * (1 + 1e-3)
    with pytest.raises(AssertionError, match="wrong: relative error"):
        check_output("wrong", p, bound)


@pytest.mark.slow
def test_run_smoke_writes_every_contender(tmp_path, single_thread):
    # One input set, M = 1: the fused kernels run in the Triton interpreter here.
    rc = run.main(["--profile", "smoke", "--tokens", "1", "--modes", "train_step",
                   "--threads", "1", "--budget", "0", "--max-sets", "1", "--no-counted",
                   "--compile", "none", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    rows = {r["contender"]: r for r in doc["rows"]}
    assert len(doc["rows"]) == len(CONTENDERS) and set(rows) == set(CONTENDERS)
    for r in rows.values():
        assert r["status"] == "ok" and r["mode"] == "train_step", r
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0 and r["samples"] == 3
        assert r["peak_mem_bytes"] > 0 and r["threads"] == "1" and r["commit"]
        assert r["max_rel_err"] <= 1e-2 and r["tflops"] > 0
    assert rows["fused"]["speedup"] == pytest.approx(rows["peft"]["median_s"]
                                                     / rows["fused"]["median_s"])
    assert rows["fused_nf4"]["speedup"] == pytest.approx(rows["bnb_peft"]["median_s"]
                                                         / rows["fused_nf4"]["median_s"])
    assert len(report.read_csv(tmp_path / "results.csv")) == len(rows)
    assert (tmp_path / "speedup_train_step.png").stat().st_size > 0
    assert (tmp_path / "memory_train_step.png").stat().st_size > 0
    assert "| fused/peft |" in (tmp_path / "table.md").read_text()
    assert [t["scope"] for t in doc["targets"]] == ["measured here"] * 4
    assert rows["peft_patched"]["speedup"] == pytest.approx(rows["peft"]["median_s"]
                                                            / rows["peft_patched"]["median_s"])


def test_mode_callables_step_the_optimizer(single_thread):
    p = make_problem(SMOKE[0])
    bound = CONTENDERS["peft"](p)
    before = {k: v.detach().clone() for k, v in bound.params.items()}
    mode_callable(bound, p, "train_step")()
    assert all(not torch.equal(before[k], v) for k, v in bound.params.items())
    assert all(v.grad is None for v in bound.params.values())


# ---------------------------------------------------------------- GPU-free parts
def test_rotation_cycles_through_distinct_sets():
    seen = []
    rot = Rotation([lambda i=i: seen.append(i) for i in range(3)])
    for _ in range(7):
        rot()
    assert seen == [0, 1, 2, 0, 1, 2, 0] and len(rot) == 3
    assert rotation_count(34 << 20, 50 << 20) == 3       # Llama q_o bf16 vs an H100's L2
    assert rotation_count(300 << 10, 50 << 20, 128) == 128
    assert rotation_count(1 << 30, 50 << 20) == 1
    with pytest.raises(ValueError, match="set_bytes"):
        rotation_count(0, 1)


def test_cuda_timer_picks_graphs_for_decode_and_falls_back(monkeypatch):
    from benchmarks import timing

    calls = []

    def graph(fn):
        calls.append("graph")
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    def bench(fn, rep_ms=100):
        calls.append("do_bench")
        return timing.Timing([1e-6], "do_bench x1 sets")

    monkeypatch.setattr(timing, "time_cuda_graph", graph)
    monkeypatch.setattr(timing, "time_do_bench", bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    rot = Rotation([lambda: None])
    assert "graph capture failed: operation not permitted" in timing.time_cuda(rot, 16).timer
    assert calls == ["graph", "do_bench"]
    assert timing.time_cuda(rot, 17).timer == "do_bench x1 sets" and calls[-1] == "do_bench"


def test_problem_clone_is_fresh_memory():
    p = make_problem(SMOKE[0])
    q = p.clone()
    assert torch.equal(p.weight, q.weight)
    assert p.weight.data_ptr() != q.weight.data_ptr() and p.x.data_ptr() != q.x.data_ptr()


def test_cpu_peak_counts_every_allocation_in_time_order():
    a = torch.ones(1000)

    def work():
        b = a * 2                    # 4000 bytes live
        v = b[10:].view(-1)          # a view: no allocation
        c = torch.empty(500)         # 2000 more: peak 6000
        del b, v, c
        torch.empty(250)             # 1000, after the peak
        torch.mm(torch.ones(8, 8), torch.ones(8, 8))  # 3 x 256 inside one op, freed

    assert cpu_peak_bytes(work) == 6000
    assert peak_memory(lambda: torch.zeros(64), "cpu") == (256, "cpu allocator (profiler)")


def test_time_interleaved_rotates_order_and_reports_quantiles():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    ticks = iter(range(10_000))
    out = time_interleaved(fns, min_rounds=3, max_rounds=3, budget_s=0, sample_s=0,
                           clock=lambda: next(ticks))
    timed = calls[6:]  # after warm-up and calibration (two calls each)
    assert timed == list("abc" "bca" "cab")
    assert all(len(t.samples) == 3 and t.median == 1 and t.iqr == 0 for t in out.values())


def test_tables_csv_and_targets(tmp_path):
    rows = [{"case": "c1", "mode": "forward", "contender": n, "median_s": s, "tokens": 1,
             "target_tokens": 1} for n, s in (("linear", 1.0), ("peft", 2.0), ("fused", 1.05),
                                              ("bnb_peft", 5.0), ("fused_nf4", 1.9))]
    from benchmarks.contenders import BASELINE

    report.add_ratios(rows, BASELINE)
    by = {r["contender"]: r for r in rows}
    assert by["fused"]["speedup"] == pytest.approx(2 / 1.05)
    assert by["fused"]["vs_linear"] == pytest.approx(1.05)
    assert by["fused_nf4"]["speedup"] == pytest.approx(5 / 1.9)
    assert by["peft"]["speedup"] is None
    table = report.markdown_table(rows, ("contender", "median_s", "speedup"))
    assert table.splitlines()[0].startswith("| contender") and "| -" in table
    back = report.read_csv(report.write_csv(rows, tmp_path / "r.csv"))
    assert [r["contender"] for r in back] == [r["contender"] for r in rows]
    goals = {g["target"]: g for g in report.targets(rows, "cuda")}
    assert goals["fused forward / nn.Linear <= 1.10 at M <= 16"]["status"] == "met"
    assert goals["PEFT LoRA / fused forward >= 1.3 at every shape"]["status"] == "met"
    assert goals["bnb Linear4bit+PEFT / fused NF4 forward >= 2.5 at M = 1"]["status"] == "met"
    by["fused_nf4"]["median_s"] = 2.1
    goals = {g["target"]: g for g in report.targets(rows, "cuda")}
    assert goals["bnb Linear4bit+PEFT / fused NF4 forward >= 2.5 at M = 1"]["status"] == "MISSED"
    assert goals["fused fwd+bwd / nn.Linear fwd+dx <= 1.15 at M = 8192"]["status"] == "not run"
    cpu = report.targets(rows, "cpu")
    assert cpu[0]["status"] == "met" and cpu[0]["worst"] == pytest.approx(1.05 / 2)


def test_shape_grid_covers_the_issue():
    full = PROFILES["gpu"].cases
    llama = {(s.in_features, s.out_features) for s in MODEL_SHAPES if "Llama-3-8B" in s.models}
    assert llama == {(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)}
    assert {c.tokens for c in full} == {1, 16, 512, 8192}
    assert {c.rank.total for c in full} == {24, 32, 40, 48} and len(RANKS) == 4
    assert len(full) == len(MODEL_SHAPES) * 4 * 4
    cpu = PROFILES["cpu"].cases
    assert all(c.tokens <= 512 for c in cpu) and any(c.target_tokens == 8192 for c in cpu)
    assert select(PROFILES["cpu"], tokens=[8192]).cases[0].tokens == 512
    with pytest.raises(ValueError, match="no case left"):
        select(PROFILES["smoke"], ranks=[7])
    label = Case(MODEL_SHAPES[0], 512, Rank(8, 16), 8192).label
    assert label.endswith("M=512 (for 8192) R=24 (r=8,k=16)")


# ---------------------------------------------------------------- counted figures
def test_multilinear_extrapolation_is_exact():
    from fractions import Fraction

    from benchmarks.counted import _multilinear

    f = lambda k, m: 7 + 3 * k + 5 * m + 2 * k * m  # noqa: E731
    axes = [(256, 512), (512, 1024)]
    vals = {(k, m): f(k, m) for k in axes[0] for m in axes[1]}
    assert _multilinear(vals, axes, (4096, 8192)) == f(4096, 8192)
    assert _multilinear({(1,): 1, (3,): 2}, [(1, 3)], (2,)) == Fraction(3, 2)


@pytest.mark.slow  # 7-35 s: the not-slow loop stays short
def test_counted_rows_match_floors_and_extrapolate_exactly():
    from benchmarks.counted import count_extrapolated, count_once, rows_for
    from benchmarks.shapes import Shape

    shape = Shape("t", 1024, 256, True, ("synthetic",))
    rows = {r["contender"]: r for r in rows_for(shape, 16, 24, "forward", False)}
    fused, floor, peft = rows["fused"], rows["op floor"], rows["peft"]
    assert fused["counted_k"] == "1024" and fused["launches"] >= 1
    # every operand read once at least; issued FLOPs never below the op's
    assert fused["unique_bytes"] >= floor["unique_bytes"] and fused["flops"] >= floor["flops"]
    assert fused["bytes_requested"] >= fused["unique_bytes"]
    assert peft["launches"] == 5 and peft["method"] == "op sequence"
    assert fused["pred_speedup_vs_peft"] == pytest.approx(peft["pred_us"] / fused["pred_us"])
    # the GPU model never predicts the op faster than its floor (it only adds ceilings)
    assert fused["pred_us"] >= floor["pred_us"] > 0
    got = count_extrapolated(shape, 16, 24, "forward", False, (256, 512, 768), (512, 1024, 1536))
    real = count_once(shape, 16, 1024, 24, "forward", False)
    assert "not extrapolated" not in got["counted_k"], got["counted_k"]
    assert got["per_kernel"] == real and got["k_in"] == 1024


def test_model_launches_charge_nf4_decode_to_the_decoding_kernel():
    from benchmarks.counted import model_launches, recorded
    from speclora_kernels.ops import plan
    from speclora_kernels.tools.floors import nf4_weight_bytes

    def k(programs, launches=1):
        return dict(launches=launches, programs=programs * launches, load_bytes=3000,
                    store_bytes=100, unique_load_bytes=200, unique_store_bytes=100,
                    dot_flops=10)

    # a call with a dequantize launch: it decodes W (and gathers its levels: 4 bytes an
    # element requested from L1, not L2), the GEMM after it reads dense tiles
    got = model_launches({"dequant_kernel": k(64), "fwd_kernel": k(128)}, [], True, 32, 16)
    assert [(t.name, t.programs, t.decoded, t.gathers) for t in got] == [
        ("dequant_kernel", 64, 512, 8), ("fwd_kernel", 128, 0.0, 0.0)]
    assert got[0].dram_bytes == 300 and got[0].l2_bytes == 2800 - 4 * 512
    twice = model_launches({"proj_kernel": k(4, 2)}, [], False, 32, 16)  # per launch: half
    assert [(t.programs, t.dram_bytes, t.l2_bytes, t.decoded) for t in twice] == \
        [(4, 150, 1400, 0.0)] * 2
    # a recorded split-K decode forward is the plan's own description of it, not its counts
    launches = recorded(16, 1024, 4096, 48, "forward", False, True)
    (kernel, args), = launches
    shaped, = model_launches({"fwd_splitk_kernel": k(400)}, launches, True, 1024, 4096)
    assert shaped.name == "fwd_splitk" and shaped.decoded == 1024 * 4096
    assert shaped.dram_bytes == plan.decode_launch(
        16, 1024, 4096, 48, nf4_weight_bytes(1024, 4096), 2, True, args["BLOCK_N"],
        args["n_splits"]).dram_bytes
