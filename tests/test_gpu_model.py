"""One performance model: the plan's split-K choice, ``tools.plan_report`` and
``benchmarks.counted`` predict a decode launch alike (``plan.decode_launch``), and each term
of ``tools.gpu_model`` does what its docstring says."""
import dataclasses

import pytest

from speclora_kernels.ops import plan
from speclora_kernels.tools import gpu_model as gm
from speclora_kernels.tools import recorded as rec
from speclora_kernels.tools.floors import nf4_weight_bytes

R = 48
LLAMA = {"q_o": (4096, 4096), "k_v": (1024, 4096)}
ZERO_COUNTS = dict(launches=1, programs=0, load_bytes=0, store_bytes=0, unique_load_bytes=0,
                   unique_store_bytes=0, dot_flops=0)


def _own(M, N, K, nf4):
    """The plan's choice and its own prediction of it (the config unknown)."""
    weight = nf4_weight_bytes(N, K) if nf4 else 2 * N * K
    p = plan.forward_plan(M, N, K, R, rank_cap=64, weight_bytes=weight, element_size=2,
                          nf4=nf4)
    return p, gm.predict([plan.decode_launch(M, N, K, R, weight, 2, nf4, p.block_n, p.splits)])


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("shape", LLAMA)
def test_plan_report_and_counted_predict_the_plans_launch(shape, M, nf4):
    """The llama q_o and k_v decode rows: the launch the op records (fp16 as counted, bf16
    as plan_report) is the plan's choice, and the three tools agree within 2%."""
    from benchmarks.counted import model_launches, recorded
    from speclora_kernels.tools.plan_report import decode_row

    N, K = LLAMA[shape]
    p, own = _own(M, N, K, nf4)
    row = decode_row(M, N, K, R, nf4)
    launches = recorded(M, N, K, R, "forward", False, nf4)
    (kernel, args), = launches
    counted = gm.predict(model_launches({kernel.name: ZERO_COUNTS}, launches, nf4, N, K))
    assert (row["block_n"], row["splits"]) == (args["BLOCK_N"], args["n_splits"])
    assert (args["BLOCK_N"], args["n_splits"]) == (p.block_n, plan.cdiv(K, plan.split_slice(K, p.splits)))
    assert row["predicted_us"] == pytest.approx(own.us, rel=0.02)
    assert row["plan_us"] == pytest.approx(own.us, rel=1e-9)
    assert counted.us == pytest.approx(own.us, rel=0.02)


@pytest.mark.slow  # 15-60 s of interpreter
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_counted_bytes_match_the_shape_formula(nf4):
    """The interpreter's counts of the k_v decode forward at M = 1 are the bytes and FLOPs
    ``plan.decode_launch`` charges: requested = DRAM + L2 + gathered bytes, FLOPs exact; and
    the counted row's time is the plan's."""
    from benchmarks.counted import recorded, rows_for
    from benchmarks.shapes import MODEL_SHAPES

    N, K = LLAMA["k_v"]
    shape = next(s for s in MODEL_SHAPES if s.name == "llama.k_v")
    fused = rows_for(shape, 1, R, "forward", nf4)[0]
    (kernel, args), = recorded(1, N, K, R, "forward", False, nf4)
    launch = rec.recorded_launch(kernel, args)
    gathered = launch.gathers * gm.LANES * gm.LEVEL_ENTRY
    # each (row, block) scale's code2 and absmax2 loads: L1 hits that nf4_gathers leaves out
    scales = 8 * N * K // 64 if nf4 else 0
    assert fused["bytes_requested"] == pytest.approx(
        launch.dram_bytes + launch.l2_bytes + gathered + scales, rel=0.005)
    assert launch.dram_bytes <= fused["unique_bytes"] <= launch.dram_bytes + launch.l2_bytes
    assert fused["flops"] == launch.flops
    assert fused["pred_us"] == pytest.approx(_own(1, N, K, nf4)[1].us, rel=0.02)


def test_reduction_tail_is_added_after_the_stream():
    """The split-K tail (``splits`` + 1 dependent L2 round trips of 300 cycles) adds to the
    bound; the partials go to L2 and never to DRAM."""
    N, K = LLAMA["k_v"]
    one, many = (plan.decode_launch(16, N, K, R, 2 * N * K, 2, False, 32, s) for s in (4, 16))
    assert (one.serial, many.serial) == (5, 17)
    assert one.dram_bytes == many.dram_bytes and many.l2_bytes > one.l2_bytes
    t = gm.terms(many)
    seconds, bound = gm.launch_seconds(many)
    assert t["tail"] == pytest.approx(17 * 300 / 1.755e9)
    assert seconds == pytest.approx(t[bound] + t["tail"] + t["launch"])
    quiet = gm.launch_seconds(dataclasses.replace(many, serial=0))[0]
    assert seconds - quiet == pytest.approx(t["tail"])


def test_per_sm_bandwidth_is_littles_law():
    """A launch of few programs streams at their bytes in flight over the DRAM latency (at
    most an SM's L2 port); enough programs reach the device bandwidth."""
    m = gm.H100_MODEL
    few = gm.Launch("few", 16, 1e8, in_flight=32 * 1024)
    assert gm.terms(few)["memory"] == pytest.approx(1e8 / (16 * 32 * 1024 / m.dram_latency))
    deep = dataclasses.replace(few, in_flight=1 << 20)  # more than the port moves
    assert gm.terms(deep)["memory"] == pytest.approx(1e8 / (16 * m.sm_port * m.clock))
    full = dataclasses.replace(few, programs=132, in_flight=None)
    assert gm.terms(full)["memory"] == pytest.approx(1e8 / m.gpu.bandwidth)
    # the config's tile and stages give the bytes in flight, else the model's default
    N, K = LLAMA["q_o"]
    known = plan.decode_launch(1, N, K, R, 2 * N * K, 2, False, 32, 4, block_k=128, stages=3)
    assert known.in_flight == 2 * 128 * ((16 + 64) * 2 + 32 * 2)
    assert plan.decode_launch(1, N, K, R, 2 * N * K, 2, False, 32, 4).in_flight is None


def test_nf4_gathers_are_an_l1_bound():
    """Uniform codes touch ~25 of the level table's 64 sectors per warp gather: ~6.3 L1
    cycles each; an NF4 decode of many elements over few bytes is bound there."""
    assert gm.H100_MODEL.gather_cycles == pytest.approx(25.3 * 32 / 128, rel=0.01)
    N, K = LLAMA["q_o"]
    launch = plan.decode_launch(1, N, K, R, nf4_weight_bytes(N, K), 2, True, 64, 8)
    assert launch.gathers == N * K / 64 and gm.launch_seconds(launch)[1] == "L1 gather"


def test_counted_launch_moves_partials_to_l2_and_gathers_to_l1():
    got = gm.counted_launch("k", 8, unique=1000, requested=5000, flops=0, decoded=64,
                            gathers=1, scratch=100, serial=4)
    assert (got.dram_bytes, got.l2_bytes, got.gathers, got.serial) == (800, 4000 + 200 - 256,
                                                                        1, 5)


def test_contenders_are_priced_like_us():
    """cuBLAS's tile re-reads come from L2 and a decode GEMV reaches CUBLAS_GEMV of the
    bandwidth; no launch takes less than the model's least."""
    gemv = gm.cublas("gemv", 1, 4096, 4096, 2 * 4096 * 4096, 2 * 4096 * 4096, 2)
    assert gemv.l2_bytes == 31 * 4096 * 2 and gemv.efficiency == gm.CUBLAS_GEMV
    gemm = gm.cublas("gemm", 512, 4096, 4096, 0, 0, 2)
    assert gemm.l2_bytes == (31 * 512 + 3 * 4096) * 4096 * 2
    assert gm.predict([gm.contender("tiny", 64)]).us == pytest.approx(2.5)
    assert gm.predict([gm.contender("bnb", 3e6, efficiency=gm.BNB_GEMV_4BIT)]).us == \
        pytest.approx(2 + 3e6 / (0.5 * 3.0e12) * 1e6)


def test_factor_gradient_partials_are_scratch():
    """A factor-gradient launch that splits M writes one fp32 partial per program (its
    output tile) and reduces ``n_msplits`` of them: those bytes are priced in L2."""
    N, K = LLAMA["q_o"]
    launches = rec.meta_launches(512, N, K, R, False, backward=True)
    (kernel, args), = [(k, a) for k, a in launches if k.name == "factor_grad_kernel"]
    scratch, serial = rec.split_scratch(kernel, args)
    cfg = rec.h100_config(kernel, args)
    assert serial == args["n_msplits"] > 1
    assert scratch == pytest.approx(kernel.programs(args, cfg) * cfg.kwargs["BLOCK_C"]
                                    * args["BLOCK_R"] * 4, rel=0.02)  # ds tiles: BLOCK_R only
    assert rec.split_scratch(*launches[0]) == (0, 0)
