"""What every result row records about the machine and the code that produced it."""
from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _run(*cmd: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def commit() -> str:
    """HEAD of the repository, with ``+dirty`` when the work tree has changes."""
    head = _run("git", "rev-parse", "--short=12", "HEAD")
    if not head:
        return "unknown"
    return head + ("+dirty" if _run("git", "status", "--porcelain", "--untracked-files=no")
                   else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_driver() -> str:
    """NVIDIA driver version via nvidia-smi ('' when there is none)."""
    return _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").split("\n")[0]


def environment(device) -> dict:
    """Flat dict of strings, copied into every row."""
    device = torch.device(device)
    env = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit(),
        "device": device.type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "cpu": cpu_name(),
        "threads": str(torch.get_num_threads()),
        "loadavg_1m": f"{os.getloadavg()[0]:.2f}",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_cc=f"{props.major}.{props.minor}",
                   driver=gpu_driver() or "unknown", cuda=str(torch.version.cuda))
    else:
        env.update(gpu="none", gpu_cc="", driver="", cuda="")
    return env
