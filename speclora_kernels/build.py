"""Build the C++ CPU backend ahead of time: ``python -m speclora_kernels.build``.

Compiles ``csrc/`` into the cache that :func:`speclora_kernels.cpu.load` uses (so the first
real call does not pay for the build), then loads it and reports where, how long, and which
instruction set the kernels picked. Exit status 0 on success, 1 when the build failed or is
disabled (the library then runs its PyTorch path).

The cache holds one folder per set of sources and build settings; folders of other sources
or versions are left alone: delete the printed folder's siblings (or the whole cache) to
clear them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from . import cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speclora_kernels.build",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="delete the cached build of these sources first")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    where = cpu.build_directory()
    if args.force and where.exists():
        gone = where.with_name(f"{where.name}.old-{os.getpid()}")
        os.rename(where, gone)  # at once: a process loading it sees a whole build or none
        shutil.rmtree(gone)
    start = time.perf_counter()
    ok = cpu.load(verbose=args.verbose)
    took = time.perf_counter() - start
    if not ok:
        why = "disabled by SPECLORA_DISABLE_CPP" if cpu._disabled() else "see the warning above"
        print(f"speclora_kernels: C++ CPU backend not built ({why})", file=sys.stderr)
        return 1
    print(f"speclora_kernels: C++ CPU backend ready in {took:.1f} s at {where} (kernels: {cpu.isa()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
