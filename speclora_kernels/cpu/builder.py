"""Build the C++ CPU backend once per set of sources, and load it.

The build folder, ``<cache>/py<X><Y>_torch<version>/speclora_cpu_<key>``, is named by a hash
of the sources (``csrc/*.cpp``, ``*.h``, contents), the compiler command and flags, Python,
torch and the platform: installs with the same sources share one build wherever they live,
and installs whose sources differ never rebuild each other's. A build runs under a file lock
in a temporary folder that is renamed into place once complete, so a process finds either a
finished library or none; of several processes starting together one builds and the others
wait for it. Loading a finished build needs neither a compiler nor ninja. Old folders (other
sources, the pre-hash ``speclora_cpu``) are never touched: delete them by hand.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no lock; the rename still keeps half-written builds unseen
    fcntl = None

NAME = "speclora_cpu"
SOURCES = ("ops.cpp", "kernels_avx512.cpp", "kernels_avx2.cpp", "kernels_portable.cpp")
# -ffp-contract=off: the NF4 double-quant scale is a product then a sum, two fp32 roundings
# as in bitsandbytes; a fused multiply-add would round once and change the weight's bits.
CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")
LDFLAGS = ("-fopenmp",)
PREBUILD = "python -m speclora_kernels.build"
_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"  # torch.utils.cpp_extension's LIB_EXT

_log = logging.getLogger(__name__)


def source_directory() -> Path:
    """``csrc`` shipped inside the package (wheels) or at the repository root (checkouts)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here.parents[1] / "csrc"):
        if (candidate / SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(f"C++ sources ({SOURCES[0]}, ...) not found next to {here.parent}")


def _cxx() -> str:
    return os.environ.get("CXX", "c++")


def build_key(src: Path) -> str:
    """16 hex digits naming what the build depends on (never the sources' location)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in src.iterdir() if p.suffix in (".cpp", ".h")):
        digest.update(b"%s\0%d\0" % (path.name.encode(), path.stat().st_size) + path.read_bytes())
    setup = (_cxx(), *CFLAGS, "|", *LDFLAGS, sys.version, torch.__version__, torch.version.git_version,
             str(torch.compiled_with_cxx11_abi()), sys.platform, platform.machine())
    digest.update("\0".join(setup).encode())
    return digest.hexdigest()[:16]


def build_directory(src: Path | None = None) -> Path:
    """Where the library for the sources in ``src`` (default: ours) is built and cached."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "speclora_kernels")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}".replace("+", "_")
    return Path(root) / tag / f"{NAME}_{build_key(src or source_directory())}"


def _library(out: Path) -> Path | None:
    """The finished library in ``out``; a folder exists only once its build completed."""
    found = sorted(out.glob(f"{NAME}*{_SUFFIX}")) if out.is_dir() else []
    return found[0] if found else None


def _tools() -> tuple[str | None, str | None]:
    """(why the backend cannot be built, or None; a folder to put on PATH for ninja, or None).

    pip puts ninja next to the interpreter, which is not on PATH in a venv used without
    activating it; torch.utils.cpp_extension only looks on PATH."""
    cxx = _cxx()
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found; set CXX)", None
    if shutil.which("ninja"):
        return None, None
    for folder in dict.fromkeys((sysconfig.get_path("scripts"), os.path.dirname(sys.executable))):
        if shutil.which("ninja", path=folder):
            return None, folder
    return "ninja not found; pip install ninja, or the speclora_kernels[cpu] extra, to build it once", None


@contextmanager
def _on_path(folder: str | None):
    before = os.environ.get("PATH", "")
    if folder is not None:
        os.environ["PATH"] = folder + os.pathsep + before
    try:
        yield
    finally:
        os.environ["PATH"] = before


@contextmanager
def _exclusive(out: Path):
    """Hold the build lock of ``out`` (released on exit, or by the OS if the process dies)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _log.warning("speclora_kernels: waiting for another process building the C++ CPU "
                             "backend in %s", out)
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _build(src: Path, out: Path, verbose: bool, ninja_folder: str | None) -> None:
    """Compile into a temporary folder (which also loads the library), then rename it to
    ``out``. The caller holds the lock, so leftovers of killed builds can go (with no lock,
    on Windows, they stay)."""
    from torch.utils import cpp_extension

    for stale in out.parent.glob(f"{out.name}.tmp-*") if fcntl is not None else ():
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    _log.warning("speclora_kernels: building the C++ CPU backend (once for these sources, about "
                 "30-60 s) in %s; to build it ahead of time: %s", out, PREBUILD)
    start = time.perf_counter()
    try:
        with _on_path(ninja_folder):
            cpp_extension.load(name=NAME, sources=[str(src / s) for s in SOURCES],
                               extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                               extra_include_paths=[str(src)], build_directory=str(tmp),
                               is_python_module=False, verbose=verbose)
        try:
            os.rename(tmp, out)
        except OSError:  # without a lock another process may have finished first: keep its
            if _library(out) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log.warning("speclora_kernels: C++ CPU backend built in %.0f s (%s)", time.perf_counter() - start, out)


def build_and_load(verbose: bool = False, src: Path | None = None) -> str | None:
    """Load the library built from ``src`` (default: ours) into ``torch.ops.speclora_cpu``,
    building it first if no process has.

    Returns None when loaded, else why it cannot be built (no compiler, no ninja); build
    errors raise."""
    src = src or source_directory()
    out = build_directory(src)
    lib = _library(out)
    if lib is None:
        missing, ninja_folder = _tools()
        if missing is not None:
            return missing
        with _exclusive(out):
            lib = _library(out)  # built by another process while this one waited
            if lib is None:
                _build(src, out, verbose, ninja_folder)
                return None
    torch.ops.load_library(str(lib))
    return None
