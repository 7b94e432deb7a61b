"""Compile every autotune config of every fused-adapter kernel for GPU targets, no GPU needed.

    python -m speclora_kernels.tools.compile_report [--archs 80,90]
                                                   [--dtypes bf16,fp16,fp32,fp32-tf32]
                                                   [--quick] [--scenarios a,b]
                                                   [--kernels fwd_kernel,...] [--jobs N]
                                                   [--json PATH]

The launchers run in "dry run" on meta tensors for representative shapes (decode, short
prompts, training, wide rank), on a dense base and on an NF4 base (bitsandbytes layout,
blocks of 64, double quant or not; in_features a multiple of 64 for the row decoder, or
not for the span decoder), for every activation dtype (bf16, fp16, fp32 with TF32 off, as
torch's default, and on), so each kernel is compiled with exactly the arguments, constexprs
and JIT specialization (16-byte alignment, unit strides, integer arguments equal to 1 as
constants: one output column, one row) a real launch would use. For each launch every
autotune config that its pruning keeps for the target's shared memory is compiled with
``triton.compile(ASTSource, GPUTarget)``; configs pruned for shared memory are listed, not
compiled. ``cuobjdump`` (bundled with Triton) gives registers, spills (local memory) and
static shared memory; the SASS shows whether the tensor cores run as HGMMA (Hopper wgmma)
or HMMA (mma.sync).

A row passes when it has no spills, its shared memory fits the target, and on sm_90 the
GEMM kernels (forward, dx) with BLOCK_M >= 64 use HGMMA. Exit status 1 if any row fails.
"""
from __future__ import annotations

import os

# Compile for real targets: the interpreter must be off before triton is imported.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from speclora_kernels.ops import launch, tuning  # noqa: E402
from speclora_kernels.ops.plan import SEGMENTED_ENV  # noqa: E402
from speclora_kernels.tools.recorded import meta_nf4  # noqa: E402

# Max shared memory per block (opt-in), bytes: A100 163 KB, H100 227 KB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# activation dtype, and for fp32 torch's matmul precision during the launch ("ieee" is
# torch's default: the kernels' fp32 dots then run as three TF32 products, fp32-accurate)
DTYPES = {"bf16": (torch.bfloat16, None), "fp16": (torch.float16, None),
          "fp32": (torch.float32, "ieee"), "fp32-tf32": (torch.float32, "tf32")}
GEMM_KERNELS = ("fwd_kernel", "dx_kernel")
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

# (name, M, in, out, R, dropout, base): forward + backward launches at these shapes cover
# every config of every kernel, on both paths. base: "dense", "nf4" (double quant),
# "nf4-nodq"; in_features 4000 (not a multiple of 64) takes the NF4 span decoder.
SCENARIOS = [
    ("decode", 16, 4096, 4096, 16, True, "dense"),        # fused, BLOCK_M 16
    ("decode-r64", 16, 4096, 4096, 64, True, "dense"),    # fused, widest register-resident rank
    ("prompt-32", 32, 4096, 4096, 16, True, "dense"),     # fused, BLOCK_M <= 32
    ("prompt-64", 64, 4096, 4096, 16, False, "dense"),    # fused, BLOCK_M <= 64
    ("prompt-64-drop", 64, 4096, 4096, 16, True, "dense"),
    ("decode-r256", 16, 4096, 4096, 256, True, "dense"),  # split at small M (rank too wide to fuse)
    ("decode-narrow", 16, 4096, 128, 64, True, "dense"),  # split at small M (R > out tile / 4)
    ("prompt-32-r128", 32, 4096, 4096, 128, False, "dense"),
    ("train", 4096, 4096, 4096, 64, True, "dense"),       # split, tensor-core tiles
    ("train-nodrop", 4096, 4096, 4096, 16, False, "dense"),  # segmented (R 16: 5 segments)
    ("train-seg", 8192, 4096, 4096, 64, True, "dense"),    # segmented forward and dx
    ("train-seg-nodrop", 8192, 4096, 4096, 16, False, "dense"),
    ("train-seg-r64", 8192, 4096, 4096, 64, False, "dense"),
    ("train-seg-r16-drop", 8192, 4096, 4096, 16, True, "dense"),
    ("decode-nf4", 16, 4096, 4096, 16, True, "nf4"),      # fused, row decoder
    ("prompt-64-nf4", 64, 4096, 4096, 16, False, "nf4"),
    ("decode-r256-nf4", 16, 4096, 4096, 256, True, "nf4"),  # split
    ("train-nf4", 4096, 4096, 4096, 64, True, "nf4"),     # split, tensor-core tiles
    ("train-seg-nf4", 8192, 4096, 4096, 64, True, "nf4"),  # segmented, row decoder
    ("decode-nf4-nodq", 16, 4096, 4096, 16, False, "nf4-nodq"),
    ("decode-nf4-oddk", 16, 4000, 4096, 16, True, "nf4"),  # span decoder
    # JIT specialisations of real launches: one row (M = 1), one output column (N = 1),
    # odd in_features (rows of NF4 codes start mid-byte)
    ("decode-m1", 1, 4096, 4096, 16, True, "dense"),
    ("decode-n1", 16, 4096, 1, 4, True, "dense"),
    ("decode-oddk", 1, 4095, 4096, 16, True, "dense"),
    ("decode-nf4-n1", 1, 4000, 1, 4, False, "nf4"),
    ("decode-nf4-oddk-odd", 1, 4095, 4096, 16, False, "nf4-nodq"),
    ("train-nf4-oddk", 4096, 4000, 4096, 64, False, "nf4"),
    # mixed-adapter batches (forward only, no dropout): the epilogue gathers each row's
    # scales (ROW_SCALE); R: three adapters of rank 16 stacked
    ("decode-mixed", 16, 4096, 4096, 48, False, "dense"),       # split-K
    ("prompt-64-mixed", 64, 4096, 4096, 48, False, "dense"),    # fused
    ("train-mixed", 4096, 4096, 4096, 64, False, "dense"),      # split
    ("train-seg-mixed", 8192, 4096, 4096, 48, False, "dense"),  # segmented
    ("decode-nf4-mixed", 16, 4096, 4096, 48, False, "nf4"),
    ("prompt-64-nf4-mixed", 64, 4096, 4096, 48, False, "nf4"),
]
MIXED = frozenset(s[0] for s in SCENARIOS if s[0].endswith("-mixed"))
QUICK = ("decode", "train", "train-seg", "decode-nf4", "prompt-64-nf4", "train-nf4", "decode-nf4-oddk")


@dataclass
class Job:
    kernel: str
    scenario: str
    variant: str
    config: str
    arch: int
    dtype: str
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int
    block_m: int
    smem_estimate: int


@dataclass
class Row:
    kernel: str
    scenario: str
    variant: str
    config: str
    arch: int
    dtype: str = ""
    regs: int = 0
    spills: int = 0
    smem: int = 0
    smem_limit: int = 0
    mma: str = "-"
    seconds: float = 0.0
    status: str = "ok"


@contextlib.contextmanager
def _fp32_precision(value):
    """torch's fp32 matmul precision set to ``value`` ("ieee" / "tf32"; None: unchanged)."""
    if value is None:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before, matmul.fp32_precision = matmul.fp32_precision, value
    try:
        yield
    finally:
        matmul.fp32_precision = before


def _launches(M, K, N, R, dropout, label, base="dense", mixed=False):
    """The (TunedKernel, args) launches of one forward + backward at this shape, with the
    activation dtype (and fp32 precision) of ``label``; ``mixed``: the forward of a
    mixed-adapter batch only (its backward runs in PyTorch)."""
    dtype, precision = DTYPES[label]
    meta = dict(device="meta", dtype=dtype)
    x, b = torch.empty(M, K, **meta), torch.empty(N, **meta)
    w = (torch.empty(N, K, **meta) if base == "dense"
         else meta_nf4(N, K, dtype, double_quant=base == "nf4"))
    d, s, u = torch.empty(R, K, **meta), torch.empty(R, device="meta"), torch.empty(N, R, **meta)
    t = torch.empty(M, R, device="meta")
    # representative dropout: the trainable rows of a SpecLoRA-like layout
    drop = dict(seed=torch.empty((), device="meta", dtype=torch.int64),
                dropout_p=0.1 if dropout else 0.0, dropout_rows=R // 2 or 1)
    # every plan a launch can take, the opt-in segmented kernels included
    with tuning.record_launches(dry_run=True) as launches, _fp32_precision(precision), \
            mock.patch.dict(os.environ, {SEGMENTED_ENV: "1"}):
        if mixed:
            table = torch.empty(4, R, device="meta")
            index = torch.empty(M, device="meta", dtype=torch.int32)
            launch.adapter_forward(x, w, b, d, table, u, None, 0.0, 0, False, index)
            return launches
        launch.adapter_forward(x, w, b, d, s, u, save_t=True, **drop)
        launch.adapter_backward(torch.empty(M, N, **meta), x, w, d, s, u, t, grad_rows=R // 2 or 1,
                                need_dx=True, need_ddown=True, need_dscale=True, need_dup=True,
                                **drop)
    return launches


def _specialize(fn, args: dict):
    """Signature, constexprs and attributes exactly as the JIT would specialize ``args``."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        if param.is_constexpr:  # tuned ones (BLOCK_*) come with the config
            signature[param.name] = "constexpr"
            if param.name in args:
                constexprs[param.name] = args[param.name]
            continue
        value = args[param.name]
        ty, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[param.name] = ty
        if ty == "constexpr":  # integer 1 (unit strides): folded like a real launch
            constexprs[param.name] = value
        elif isinstance(attr, str) and attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs


def _variant(kernel, args) -> str:
    flags = [k for k in ("FUSE_DOWN", "SEGMENTED", "FUSE_UP", "STORE_T", "STORE_G",
                         "HAS_DROPOUT", "ROW_SCALE", "NEED_DU", "NEED_DD", "NEED_DS", "NF4", "NF4_ROWS",
                         "NF4_DOUBLE_QUANT") if args.get(k)]
    rank = f"R{args['BLOCK_R']} " if "BLOCK_R" in args else ""  # the dequantize has none
    return rank + ",".join(f.lower() for f in flags)


def _config_name(cfg) -> str:
    tiles = "x".join(str(v) for k, v in cfg.kwargs.items() if k.startswith("BLOCK"))
    group = f" g{cfg.kwargs['GROUP_M']}" if "GROUP_M" in cfg.kwargs else ""
    return f"{tiles}{group} w{cfg.num_warps} s{cfg.num_stages}"


def _tile_area(cfg) -> int:
    return math.prod(v for k, v in cfg.kwargs.items() if k.startswith("BLOCK"))


def plan(archs, dtypes, scenarios, extremes_only=False, kernels=None):
    """Unique compile jobs over the scenarios and dtype labels, plus rows for configs pruned
    by shared memory. ``extremes_only``: per launch only the smallest and the largest
    fitting tile; ``kernels``: only these kernel names (default all)."""
    jobs, pruned, seen, covered = [], [], set(), {k.name: set() for k in tuning.KERNELS}
    for label, (scenario, M, K, N, R, dropout, base) in itertools.product(dtypes, scenarios):
        for kernel, args in _launches(M, K, N, R, dropout, label, base, scenario in MIXED):
            if kernels is not None and kernel.name not in kernels:
                continue
            fitting = [c for c in kernel.configs if kernel.fits(c, args)]
            if not fitting:  # the launcher would fall back to a config no rule admits
                for arch in archs:
                    pruned.append(Row(kernel.name, scenario, _variant(kernel, args), "-", arch,
                                      label, status="FAIL: no config fits"))
                continue
            if extremes_only:
                fitting = list({id(c): c for c in (min(fitting, key=_tile_area),
                                                   max(fitting, key=_tile_area))}.values())
            signature, constexprs, attrs = _specialize(kernel.fn, args)
            for arch in archs:
                for cfg in fitting:
                    key = (kernel.name, arch, _config_name(cfg), str(sorted(signature.items())),
                           str(sorted(constexprs.items())), str(sorted(attrs.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    estimate = kernel.smem_bytes(cfg, args)
                    if estimate > SMEM_LIMIT[arch]:
                        pruned.append(Row(kernel.name, scenario, _variant(kernel, args),
                                          _config_name(cfg), arch, label, smem=estimate,
                                          smem_limit=SMEM_LIMIT[arch],
                                          status="pruned (smem estimate)"))
                        continue
                    covered[kernel.name].add(_config_name(cfg))
                    jobs.append(Job(kernel.name, scenario, _variant(kernel, args),
                                    _config_name(cfg), arch, label, signature,
                                    {**constexprs, **cfg.kwargs}, attrs,
                                    cfg.num_warps, cfg.num_stages,
                                    {**args, **cfg.kwargs}.get("BLOCK_M", 0),
                                    estimate))
    return jobs, pruned, covered


def _resources(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    field = lambda name: int(re.search(rf"\b{name}:(\d+)", usage).group(1))  # noqa: E731
    mma = next((op for op in ("HGMMA", "HMMA") if re.search(rf"\b{op}\b", sass)), "-")
    return field("REG"), field("LOCAL") + field("STACK"), field("SHARED"), mma


def _sass(kernel, args: dict, cfg, arch: int = 90) -> str:
    """SASS of ``kernel`` compiled for ``arch`` with this launch's specialisation and config."""
    signature, constexprs, attrs = _specialize(kernel.fn, args)
    compiled = triton.compile(
        ASTSource(fn=kernel.fn, signature=signature, constexprs={**constexprs, **cfg.kwargs},
                  attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout


def loop_instructions(sass: str) -> int:
    """Instructions in the body of the longest loop of a SASS listing (from a backward
    branch's target to the branch): the K-loop of a GEMM kernel, run once per K step."""
    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    where = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", line).group(1), 16) for line in lines]
    longest = 0
    for at, line in zip(where, lines):
        branch = re.search(r"\bBRA\b[^;]*?(0x[0-9a-f]+)", line)
        if branch and int(branch.group(1), 16) < at:
            start = int(branch.group(1), 16)
            longest = max(longest, sum(start <= a <= at for a in where))
    return longest


# (kernel, scenario M, config): the K-loops whose NF4 decode the performance model prices
DECODE_LOOPS = ((tuning.SPLITK, 16, {"BLOCK_K": 128}, 8), (tuning.FWD, 32,
                {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 1}, 4))


def decode_cost(arch: int = 90) -> list[dict]:
    """SASS instructions an NF4 element costs in the kernels' K-loops: the NF4 loop body
    minus the dense one (same tile and config, bf16) over the weight elements a thread
    decodes per K step (``tools.gpu_model`` takes the split-K figure)."""
    rows = []
    for kernel, M, tile, warps in DECODE_LOOPS:
        counts = {}
        for base in ("dense", "nf4"):
            args = next(a for k, a in _launches(M, 4096, 4096, 16, False, "bf16", base)
                        if k is kernel)
            cfg = next(c for c in kernel.configs
                       if all(c.kwargs.get(k, args.get(k)) == v for k, v in tile.items())
                       and c.num_warps == warps)
            counts[base] = loop_instructions(_sass(kernel, args, cfg, arch))
            full = {**args, **cfg.kwargs}
        elements = full["BLOCK_N"] * full["BLOCK_K"] / (32 * warps)
        rows.append({"kernel": kernel.name, "config": _config_name(cfg), "sm": arch,
                     "dense_loop": counts["dense"], "nf4_loop": counts["nf4"],
                     "elements_per_thread": elements,
                     "per_element": (counts["nf4"] - counts["dense"]) / elements})
    return rows


def compile_job(job: Job) -> Row:
    kernel = next(k for k in tuning.KERNELS if k.name == job.kernel)
    start = time.perf_counter()
    row = Row(job.kernel, job.scenario, job.variant, job.config, job.arch, job.dtype,
              smem_limit=SMEM_LIMIT[job.arch])
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel.fn, signature=job.signature, constexprs=job.constexprs,
                      attrs=job.attrs),
            target=GPUTarget("cuda", job.arch, 32),
            options={"num_warps": job.num_warps, "num_stages": job.num_stages})
        row.regs, row.spills, static_smem, row.mma = _resources(compiled.asm["cubin"])
        row.smem = compiled.metadata.shared + static_smem
    except Exception as e:  # a config that does not build is a failing row, not a crash
        row.status = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        return row
    finally:
        row.seconds = time.perf_counter() - start
    problems = []
    if row.spills:
        problems.append("spills")
    if row.smem > row.smem_limit:
        problems.append("smem")
    if (job.arch >= 90 and job.kernel in GEMM_KERNELS and job.block_m >= 64
            and row.mma != "HGMMA"):
        problems.append("no HGMMA")
    row.status = "ok" if not problems else "FAIL: " + ", ".join(problems)
    return row


def format_table(rows) -> str:
    head = ("kernel", "scenario", "dtype", "variant", "config", "sm", "regs", "spills",
            "smem KB", "limit KB", "mma", "s", "status")
    body = [(r.kernel, r.scenario, r.dtype, r.variant, r.config, str(r.arch), str(r.regs),
             str(r.spills),
             f"{r.smem / 1024:.1f}", f"{r.smem_limit / 1024:.0f}", r.mma, f"{r.seconds:.1f}",
             r.status) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="80,90", help="compute capabilities, e.g. 80,90")
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help=f"comma-separated activation dtypes, from {list(DTYPES)}")
    parser.add_argument("--quick", action="store_true",
                        help=f"representative subset: scenarios {', '.join(QUICK)}, smallest and "
                             "largest tile per launch")
    parser.add_argument("--scenarios", help="comma-separated scenario names (default: all, or "
                                               "the --quick ones)")
    parser.add_argument("--kernels", help="comma-separated kernel names (default: all), e.g. "
                                             "fwd_kernel,fwd_splitk_kernel")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compiler processes")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    parser.add_argument("--decode-cost", action="store_true",
                        help="only count the SASS instructions an NF4 element costs in the "
                             "split-K and fused forward K-loops (sm_90)")
    opts = parser.parse_args(argv)
    if opts.decode_cost:
        for row in decode_cost():
            print(f"{row['kernel']} {row['config']} sm_{row['sm']}: K-loop {row['dense_loop']} "
                  f"instructions dense, {row['nf4_loop']} NF4, "
                  f"{row['elements_per_thread']:.0f} elements a thread a step: "
                  f"{row['per_element']:.2f} instructions per NF4 element")
        return 0

    archs = [int(a) for a in opts.archs.split(",")]
    unknown = [a for a in archs if a not in SMEM_LIMIT]
    if unknown:
        parser.error(f"--archs: no shared-memory limit known for {unknown}; "
                     f"use {sorted(SMEM_LIMIT)}")
    names = opts.scenarios.split(",") if opts.scenarios else [
        s[0] for s in SCENARIOS if not opts.quick or s[0] in QUICK]
    unknown = sorted(set(names) - {s[0] for s in SCENARIOS})
    if unknown:
        parser.error(f"--scenarios: unknown {unknown}; choose from {[s[0] for s in SCENARIOS]}")
    scenarios = [s for s in SCENARIOS if s[0] in names]
    dtypes = opts.dtypes.split(",")
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
    kernels = opts.kernels.split(",") if opts.kernels else None
    unknown = sorted(set(kernels or ()) - {k.name for k in tuning.KERNELS})
    if unknown:
        parser.error(f"--kernels: unknown {unknown}; choose from "
                     f"{[k.name for k in tuning.KERNELS]}")
    start = time.perf_counter()
    jobs, pruned, covered = plan(archs, dtypes, scenarios, extremes_only=opts.quick,
                                 kernels=kernels)
    if opts.jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(opts.jobs) as pool:
            rows = list(pool.map(compile_job, jobs))
    else:
        rows = [compile_job(j) for j in jobs]
    rows += pruned
    rows.sort(key=lambda r: (r.kernel, list(DTYPES).index(r.dtype),
                             SCENARIOS.index(next(s for s in SCENARIOS if s[0] == r.scenario)),
                             r.variant, r.config, r.arch))
    elapsed = time.perf_counter() - start

    print(format_table(rows))
    failed = [r for r in rows if r.status.startswith("FAIL")]
    print(f"\n{len(jobs)} compiles ({', '.join(dtypes)}; sm_{', sm_'.join(map(str, archs))}) "
          f"in {elapsed:.0f} s; {len(pruned)} pruned for shared memory; {len(failed)} failed")
    for label in dtypes:
        mine = [r for r in rows if r.dtype == label and not r.status.startswith("pruned")]
        print(f"{label}: {len(mine)} compiles, {sum(r.status.startswith('FAIL') for r in mine)} "
              f"failed, {sum(r.spills > 0 for r in mine)} with spills, max "
              f"{max((r.regs for r in mine), default=0)} registers")
    for kernel in tuning.KERNELS:
        if kernels is not None and kernel.name not in kernels:
            continue
        missing = {_config_name(c) for c in kernel.configs} - covered[kernel.name]
        print(f"{kernel.name}: {len(covered[kernel.name])}/{len(kernel.configs)} configs compiled"
              + (f"; not covered: {sorted(missing)}" if missing else ""))
    nf4 = [r for r in rows if "nf4" in r.variant and not r.status.startswith("pruned")]
    if nf4:
        print(f"NF4 base (forward, dx): {len(nf4)} compiles, "
              f"{sum(r.status.startswith('FAIL') for r in nf4)} failed, "
              f"max {max(r.regs for r in nf4)} registers, "
              f"{sum(r.spills for r in nf4)} bytes spilled")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
