"""A pool of spawned worker processes that runs check jobs against a deadline.

Each worker is a fresh ``spawn`` process that initialises CUDA itself and takes jobs from one
shared queue until it is empty, so the workers share the cases out among themselves and the
cost of a cold Triton cache (compiling kernels, seconds each, on the CPU) is spread over
the host's cores. A job is ``{"id", "kind", "payload"}``; ``kind`` names a function in
``JOB_KINDS`` (``"module:function"`` under this package) that takes the payload and returns
a dict. A job that raises returns ``{"status": "error", ...}``; one that leaves the CUDA
context broken (an illegal address is sticky) ends its worker after reporting, and one that
kills its worker is reported ``"crashed"``; either way a fresh worker takes its place. At
the deadline the workers still busy are terminated (by their own process ids) and what
they held is reported ``"timed out"``; jobs never started are ``"not run"``.
"""
from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import time
import traceback

JOB_KINDS = {
    "case": "correctness:run_case",
    "layer": "correctness:run_layer",
    "forced_config": "correctness:run_forced_config",
    "dropout_mask": "correctness:run_dropout_mask",
    "graph_step": "runtime:run_graph_step",
    "compile_step": "runtime:run_compile_step",
    "devices": "runtime:run_devices",
    "prewarm": "timings:run_prewarm",
    "echo": "pool:_echo",      # self-tests of the pool (tests/test_gpu_check.py)
    "exit": "pool:_exit",
    "sleep": "pool:_sleep",
}


def _echo(payload):
    return {"status": "pass", "payload": payload, "pid": os.getpid()}


def _exit(payload):
    os._exit(int(payload))


def _sleep(payload):
    time.sleep(float(payload))
    return {"status": "pass"}


def _resolve(kind: str):
    module, name = JOB_KINDS[kind].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def _cuda_broken() -> bool:
    """True if this process's CUDA context no longer works (sticky errors)."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return False
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return True


def execute(job: dict) -> dict:
    """Run one job in this process; never raises."""
    start = time.perf_counter()
    try:
        result = _resolve(job["kind"])(job["payload"])
    except Exception as e:  # noqa: BLE001 - a broken check is a result, not a crash
        result = {"status": "error", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()[-3000:]}
        if _cuda_broken():
            result["cuda_broken"] = True
    result.setdefault("seconds", time.perf_counter() - start)
    return result


def _worker(tasks, conn, wid: int) -> None:
    """A worker's life: init CUDA, then take jobs until the sentinel. Messages go through
    its own pipe, sent synchronously, so a crash never loses the "start" of its job."""
    os.environ.pop("TRITON_INTERPRET", None)   # compiled kernels, never the interpreter
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.init()
    except Exception:  # noqa: BLE001 - reported through the jobs that fail
        pass
    conn.send(("ready", None, None))
    while True:
        job = tasks.get()
        if job is None:
            conn.send(("exit", None, None))
            return
        conn.send(("start", job["id"], None))
        result = execute(job)
        conn.send(("done", job["id"], result))
        if result.get("cuda_broken"):
            return  # the next jobs need a fresh CUDA context: a new worker takes over


class Pool:
    """``Pool(workers).run(jobs, deadline)`` -> {job id: result}."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self.ctx = multiprocessing.get_context("spawn")
        self.started = []          # every worker process started, for the report
        self.start_seconds = None  # until the first worker was ready

    def _spawn(self, tasks, wid):
        reader, writer = self.ctx.Pipe(duplex=False)
        # not daemonic: torch.compile's Inductor may start compile workers of its own
        proc = self.ctx.Process(target=_worker, args=(tasks, writer, wid), daemon=False)
        proc.start()
        writer.close()
        self.started.append(proc.pid)
        return proc, reader

    def run(self, jobs: list[dict], deadline: float, on_result=None) -> dict:
        """Run ``jobs`` (in this order, shared among the workers) until done or until
        ``deadline`` (a ``time.monotonic()`` value). ``on_result(job, result)`` is called as
        results arrive."""
        out = {}
        if not jobs or time.monotonic() >= deadline:
            return {job["id"]: {"status": "not run", "seconds": 0.0,
                                "error": "out of time before it started"} for job in jobs}
        t0 = time.monotonic()
        by_id = {job["id"]: job for job in jobs}
        tasks = self.ctx.Queue()
        for job in jobs:
            tasks.put(job)
        n = min(self.workers, len(jobs))
        for _ in range(n):
            tasks.put(None)
        workers = {wid: self._spawn(tasks, wid) for wid in range(n)}   # wid -> (proc, pipe)
        held, exited, next_wid = {}, set(), n

        def finish(job_id, result):
            out[job_id] = result
            if on_result:
                on_result(by_id[job_id], result)

        try:
            while len(out) < len(jobs) and time.monotonic() < deadline:
                pipes = {conn: wid for wid, (_, conn) in workers.items() if wid not in exited}
                if not pipes:
                    break
                ready = multiprocessing.connection.wait(list(pipes), timeout=0.2)
                for conn in ready:
                    wid = pipes[conn]
                    try:
                        kind, job_id, result = conn.recv()
                    except (EOFError, OSError):  # the worker is gone: handled below
                        self._bury(workers, wid, held, exited, finish)
                        continue
                    if kind == "ready" and self.start_seconds is None:
                        self.start_seconds = time.monotonic() - t0
                    elif kind == "start":
                        held[wid] = job_id
                    elif kind == "done":
                        held.pop(wid, None)
                        finish(job_id, result)
                    elif kind == "exit":
                        exited.add(wid)
                # a worker gone while jobs remain is replaced
                for wid in [w for w in workers if w not in exited
                            and not workers[w][0].is_alive()]:
                    self._bury(workers, wid, held, exited, finish)
                live = [w for w in workers if w not in exited]
                if len(live) < n and len(out) + len(held) < len(jobs):
                    workers[next_wid] = self._spawn(tasks, next_wid)
                    next_wid += 1
        finally:
            for wid, job_id in held.items():
                if job_id not in out:
                    out[job_id] = {"status": "timed out", "seconds": time.monotonic() - t0,
                                   "error": "still running at the deadline"}
            for proc, conn in workers.values():
                if proc.is_alive():
                    proc.terminate()
            for proc, conn in workers.values():
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                conn.close()
            tasks.cancel_join_thread()
        for job in jobs:
            out.setdefault(job["id"], {"status": "not run", "seconds": 0.0,
                                       "error": "out of time before it started"})
        return out

    @staticmethod
    def _bury(workers, wid, held, exited, finish):
        """A worker that is gone: its job (if any) is reported crashed, and it is counted
        as exited (a replacement is started by the caller while jobs remain)."""
        proc, conn = workers[wid]
        proc.join(5)
        exited.add(wid)
        job_id = held.pop(wid, None)
        if job_id is not None:
            finish(job_id, {"status": "crashed", "seconds": 0.0,
                            "error": f"worker exited with code {proc.exitcode} during the job"})
