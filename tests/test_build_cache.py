"""The C++ backend's build cache (speclora_kernels.cpu.builder): one folder per set of sources
and build settings, wherever the install lives; a build under a lock, renamed into place
when complete; a finished build reused without compiler or ninja; the first-use build
announced at default logging; ninja's absence named with its fix.

Two "checkouts" are copies of the package and csrc/ in temporary folders, one with a comment
added to a source. Most tests replace the compiler (the cache logic is what they check: in this process with
threads, or in fresh processes with a copy of the library this process built); one slow test
compiles.
"""
import fcntl
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from speclora_kernels import cpu
from speclora_kernels.cpu import builder
from speclora_kernels.ops import reference_adapter_linear

ROOT = Path(__file__).resolve().parents[1]
BUILDING = "speclora_kernels: building the C++ CPU backend"
BUILT = "speclora_kernels: C++ CPU backend built in"
WAITING = "speclora_kernels: waiting for another process building"
# A fresh process: load the backend (optionally with the compiler replaced by a copy of a
# built library, or with the build tools hidden), run one op, say where it came from.
PROBE = textwrap.dedent("""
    import shutil, sys, torch
    from torch.utils import cpp_extension
    fake, hide_tools = sys.argv[1], sys.argv[2] == "hide"
    if fake:
        def compile_by_copy(name, build_directory, **kwargs):
            lib = shutil.copy(fake, f"{build_directory}/{name}.so")
            print("COMPILED", flush=True)
            torch.ops.load_library(lib)
        cpp_extension.load = compile_by_copy
    from speclora_kernels import cpu
    from speclora_kernels.cpu import builder
    if hide_tools:
        builder._tools = lambda: ("build tools hidden by the test", None)
    assert cpu.load(), "no backend"
    x, w = torch.randn(3, 16), torch.randn(5, 16)
    d, s, u = torch.randn(2, 16), torch.randn(2), torch.randn(5, 2)
    y, _ = torch.ops.speclora_cpu.dense_fwd(x, w, None, d, s, u, None, 0.0, 0, False)
    torch.testing.assert_close(y, x @ w.T + ((x @ d.T) * s) @ u.T)
    print("SRC", cpu.source_directory())
    print("DIR", cpu.build_directory())
""")


@pytest.fixture(scope="module")
def built_library() -> Path:
    assert cpu.load(), "the C++ backend failed to build/load (see the warning)"
    return builder._library(cpu.build_directory())


def checkout(where: Path, comment: str = "") -> Path:
    """A copy of the package and its C++ sources; ``comment`` is appended to ops.cpp."""
    for name in ("speclora_kernels", "csrc"):
        shutil.copytree(ROOT / name, where / name, ignore=shutil.ignore_patterns("__pycache__"))
    if comment:
        with open(where / "csrc" / "ops.cpp", "a") as f:
            f.write(f"// {comment}\n")
    return where.resolve()


def start(tree: Path, cache: Path, log: Path, fake: Path | None = None, hide_tools=False):
    env = {**os.environ, "PYTHONPATH": str(tree), "TORCH_EXTENSIONS_DIR": str(cache)}
    env.pop("SPECLORA_DISABLE_CPP", None)
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-c", PROBE, str(fake or ""), "hide" if hide_tools else ""],
                                cwd=log.parent, env=env, stdout=subprocess.PIPE, stderr=err, text=True)


def finish(proc, log: Path, tree: Path, timeout=600) -> tuple[str, str]:
    out, _ = proc.communicate(timeout=timeout)
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert f"SRC {tree / 'csrc'}" in out, out  # this checkout's sources, not the repository's
    return out, err


def wait_for(text: str, logs, timeout=120) -> None:
    deadline = time.monotonic() + timeout
    while not all(text in log.read_text() for log in logs):
        assert time.monotonic() < deadline, f"{text!r} not in every log: {[log.read_text() for log in logs]}"
        time.sleep(0.2)


def library_stat(folder: Path) -> tuple[int, int]:
    st = builder._library(folder).stat()
    return st.st_ino, st.st_mtime_ns


def test_key_follows_sources_and_settings_not_location(tmp_path, monkeypatch):
    a, b = checkout(tmp_path / "a"), checkout(tmp_path / "b", "a trivial difference")
    key = builder.build_key(a / "csrc")
    assert key == builder.build_key(ROOT / "csrc") and len(key) == 16
    assert builder.build_key(b / "csrc") != key
    (a / "csrc" / "kernels.h").write_text((a / "csrc" / "kernels.h").read_text() + "\n")
    assert builder.build_key(a / "csrc") not in (key, builder.build_key(b / "csrc"))
    monkeypatch.setattr(builder, "CFLAGS", (*builder.CFLAGS, "-DSOMETHING"))
    assert builder.build_key(ROOT / "csrc") != key
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "clang++")
    assert builder.build_key(ROOT / "csrc") != key
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    assert builder.build_directory(b / "csrc").parent.parent == tmp_path / "cache"


class FakeCompiler:
    """Stands in for torch.utils.cpp_extension.load and torch.ops.load_library in this process:
    "compiles" a placeholder library, records what was compiled and loaded."""

    def __init__(self, monkeypatch, seconds=0.5):
        from torch.utils import cpp_extension

        self.compiled, self.loaded, self.seconds = [], [], seconds
        monkeypatch.setattr(cpp_extension, "load", self.compile)
        monkeypatch.setattr(torch.ops, "load_library", self.loaded.append)

    def compile(self, name, sources, build_directory, **kwargs):
        time.sleep(self.seconds)  # the other loads reach the lock meanwhile
        (Path(build_directory) / f"{name}.so").write_bytes(b"placeholder")
        self.compiled.append(Path(sources[0]).parent)
        self.loaded.append(f"{build_directory}/{name}.so")


def test_concurrent_loads_build_once_then_reuse(tmp_path, monkeypatch, caplog):
    """Threads stand in for processes (the lock belongs to an open file): two loads of
    checkout A while A's lock is held both wait, then one builds; B builds meanwhile, once,
    clearing a killed build's leftovers; then A, B, A load without building or build tools."""
    a, b = checkout(tmp_path / "a"), checkout(tmp_path / "b", "a trivial difference")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    dir_a, dir_b = builder.build_directory(a / "csrc"), builder.build_directory(b / "csrc")
    assert dir_a != dir_b and dir_a.parent == dir_b.parent
    killed = dir_b.with_name(f"{dir_b.name}.tmp-999999")  # a build killed half-way
    killed.mkdir(parents=True)
    (killed / "speclora_cpu.so").write_bytes(b"half-written")
    fake, outcomes = FakeCompiler(monkeypatch), []

    def load(tree):
        try:
            outcomes.append(builder.build_and_load(src=tree / "csrc"))
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=load, args=(tree,)) for tree in (a, a, b)]
    with open(dir_a.with_name(dir_a.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as another process building A would
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while caplog.text.count(WAITING) < 2:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
    for thread in threads:
        thread.join(60)
    assert outcomes == [None] * 3
    assert sorted(fake.compiled) == sorted([a / "csrc", b / "csrc"])
    assert caplog.text.count(BUILDING) == 2 and caplog.text.count(BUILT) == 2
    assert fake.loaded.count(f"{dir_a}.tmp-{os.getpid()}/speclora_cpu.so") == 1  # the builder's
    assert fake.loaded.count(str(dir_a / "speclora_cpu.so")) == 1  # the one that waited
    stats = {d: library_stat(d) for d in (dir_a, dir_b)}

    monkeypatch.setattr(builder, "_tools", lambda: ("build tools hidden by the test", None))
    del fake.loaded[:]
    for tree in (a, b, a):
        assert builder.build_and_load(src=tree / "csrc") is None
    assert fake.loaded == [str(d / "speclora_cpu.so") for d in (dir_a, dir_b, dir_a)]
    assert len(fake.compiled) == 2
    assert {d: library_stat(d) for d in (dir_a, dir_b)} == stats
    assert sorted(p.name for p in dir_a.parent.iterdir()) == sorted(
        [dir_a.name, dir_b.name, dir_a.name + ".lock", dir_b.name + ".lock"])


def test_first_use_build_is_announced_at_default_logging(tmp_path, monkeypatch, built_library):
    """A fresh process, logging not configured: the build says where, how long and how to
    prebuild, once, and when it is done (the compiler replaced by a copy of our library)."""
    tree = checkout(tmp_path / "a", "announce")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    folder = builder.build_directory(tree / "csrc")
    log = tmp_path / "first.err"
    out, err = finish(start(tree, tmp_path / "cache", log, built_library), log, tree)
    assert out.count("COMPILED") == 1 and f"DIR {folder}" in out
    assert err.count(BUILDING) == 1 and err.count(BUILT) == 1, err
    assert (f"{BUILDING} (once for these sources, about 30-60 s) in {folder}; to build it ahead of "
            f"time: python -m speclora_kernels.build") in err
    assert re.search(rf"{re.escape(BUILT)} \d+ s \({re.escape(str(folder))}\)\n", err), err


def test_prebuild_command_builds_reuses_and_forces(tmp_path, monkeypatch, capsys, built_library):
    """python -m speclora_kernels.build: builds once, then reports the cached build; --force
    rebuilds it (in this process, whose real library stays loaded; the compiler faked)."""
    from speclora_kernels import build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SPECLORA_DISABLE_CPP", raising=False)
    fake, folder = FakeCompiler(monkeypatch, seconds=0), cpu.build_directory()
    stats = []
    for argv in ([], [], ["--force"]):
        monkeypatch.setitem(cpu._state, "loaded", None)  # as a new process
        assert build.main(argv) == 0
        assert f"s at {folder} (kernels: " in capsys.readouterr().out
        stats.append(library_stat(folder))
    assert len(fake.compiled) == 2 and stats[0] == stats[1] != stats[2]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, folder.name + ".lock"]


@pytest.mark.slow  # six fresh interpreters
def test_processes_on_two_checkouts_build_once_each(tmp_path, monkeypatch, built_library):
    """As processes: two on checkout A while A's lock is held both wait, one builds (with a
    copy of our library for a compiler); B builds meanwhile; then A, B, A with the build
    tools hidden: no build, the libraries untouched."""
    a, b = checkout(tmp_path / "a"), checkout(tmp_path / "b", "a trivial difference")
    cache = tmp_path / "cache"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    dir_a, dir_b = builder.build_directory(a / "csrc"), builder.build_directory(b / "csrc")
    logs = [tmp_path / f"a{i}.err" for i in (1, 2)] + [tmp_path / "b1.err"]
    dir_a.parent.mkdir(parents=True)
    with open(dir_a.with_name(dir_a.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [start(a, cache, logs[0], built_library), start(a, cache, logs[1], built_library),
                 start(b, cache, logs[2], built_library)]
        wait_for(WAITING, logs[:2])
    runs = [finish(p, log, tree) for p, log, tree in zip(procs, logs, (a, a, b))]
    assert [out.count("COMPILED") for out, _ in runs] in ([1, 0, 1], [0, 1, 1])
    assert [err.count(BUILT) for _, err in runs] in ([1, 0, 1], [0, 1, 1])
    for (out, _), want in zip(runs, (dir_a, dir_a, dir_b)):
        assert f"DIR {want}" in out
    stats = {d: library_stat(d) for d in (dir_a, dir_b)}
    for tree, folder in ((a, dir_a), (b, dir_b), (a, dir_a)):
        log = tmp_path / "again.err"
        out, err = finish(start(tree, cache, log, built_library, hide_tools=True), log, tree)
        assert "COMPILED" not in out and BUILDING not in err and WAITING not in err, err
        assert f"DIR {folder}" in out
    assert {d: library_stat(d) for d in (dir_a, dir_b)} == stats


def test_missing_ninja_names_the_fix_and_falls_back(tmp_path, monkeypatch):
    which = shutil.which
    no_ninja = lambda cmd, mode=os.F_OK | os.X_OK, path=None: None if cmd == "ninja" else which(cmd, mode, path)
    monkeypatch.setattr(builder.shutil, "which", no_ninja)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SPECLORA_DISABLE_CPP", raising=False)
    monkeypatch.setitem(cpu._state, "loaded", None)
    with pytest.warns(RuntimeWarning, match=r"unavailable \(ninja not found; pip install ninja, or the "
                                            r"speclora_kernels\[cpu\] extra, to build it once\); using the "
                                            r"PyTorch path") as caught:
        assert cpu.load() is False
    assert len(caught) == 1 and cpu.load() is False
    assert not (tmp_path / "cache").exists()
    x, w = torch.randn(2, 16), torch.randn(3, 16)
    d, s, u = torch.randn(1, 16), torch.ones(1), torch.randn(3, 1)
    torch.testing.assert_close(cpu.adapter_forward(x, w, None, d, s, u)[0],
                               reference_adapter_linear(x, w, None, d, s, u))


def test_ninja_next_to_the_interpreter_is_used(tmp_path, monkeypatch):
    """pip installs ninja beside python; a venv used without activating it lacks it on PATH."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "ninja").write_text("#!/bin/sh\n")
    (scripts / "ninja").chmod(0o755)
    monkeypatch.setenv("CXX", shutil.which("c++") or "c++")  # found before PATH loses /usr/bin
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(p) / "ninja").exists()))
    monkeypatch.setattr(builder.sysconfig, "get_path", lambda name: str(scripts))
    assert builder._tools() == (None, str(scripts))
    before = os.environ["PATH"]
    with builder._on_path(str(scripts)):
        assert shutil.which("ninja") == str(scripts / "ninja")
    assert os.environ["PATH"] == before


@pytest.mark.slow  # two real builds (~30-60 s each on 2 cores)
def test_two_checkouts_compile_once_each(tmp_path, monkeypatch):
    """As the issue measured it: two checkouts with a trivially different source, loading
    alternately A, B, A, B with the real compiler: two builds, then none."""
    a, b = checkout(tmp_path / "a"), checkout(tmp_path / "b", "a trivial difference")
    cache = tmp_path / "cache"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    dirs = {a: builder.build_directory(a / "csrc"), b: builder.build_directory(b / "csrc")}
    builds, stats = [], {}
    for tree in (a, b, a, b):
        log = tmp_path / "run.err"
        out, err = finish(start(tree, cache, log), log, tree)
        assert f"DIR {dirs[tree]}" in out
        builds.append(err.count(BUILT))
        stats.setdefault(tree, library_stat(dirs[tree]))
        assert library_stat(dirs[tree]) == stats[tree]
    assert builds == [1, 1, 0, 0]
