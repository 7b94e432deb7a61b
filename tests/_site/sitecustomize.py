"""Start-up of the processes the tests start (``_interpreter_compat.child_env``): the same
interpreter fixes conftest applies."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _interpreter_compat  # noqa: E402

_interpreter_compat.apply()
