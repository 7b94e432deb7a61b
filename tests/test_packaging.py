"""The wheel ships every module and the C++ sources, and the backend finds them there."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_package_list_covers_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "speclora_kernels").rglob("__init__.py")}
    assert set(config["packages"]) == found | {"speclora_kernels.csrc"}
    assert config["package-dir"]["speclora_kernels.csrc"] == "csrc"


@pytest.mark.slow
def test_wheel_contains_sources_and_backend_finds_them(tmp_path):
    # build from a copy: setuptools writes build/ into the source tree it builds
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("speclora_kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("speclora_kernels-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    want = {f"speclora_kernels/csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.is_file()}
    want |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "speclora_kernels").rglob("*.py")}
    assert want <= names, sorted(want - names)
    # run from the unpacked wheel, away from the checkout: csrc must resolve inside the package
    probe = "from speclora_kernels.cpu import source_directory as s; print(s())"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, text=True,
                         capture_output=True, env={"PYTHONPATH": str(tmp_path / "site"),
                                                   "SPECLORA_DISABLE_CPP": "1"}).stdout
    assert Path(out.strip()) == tmp_path / "site" / "speclora_kernels" / "csrc"
