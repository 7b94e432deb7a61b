"""The README's commands are the ones CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_cmd = [line for line in (ROOT / ".ci/run").read_text().splitlines()
              if line.startswith("python3 -m venv")]
    assert len(ci_cmd) == 1, "expected one install-and-test line in .ci/run"
    assert ci_cmd[0] in (ROOT / "README.md").read_text().splitlines()
