"""Fixes to older Triton interpreters that the tests need, applied once by conftest.

Triton 3.6's interpreter turns a loop bound held in a one-element tensor into an int with
``int(handle.data)``, which numpy >= 2.4 refuses for a 1-d array ("only 0-dimensional arrays
can be converted to Python scalars"); 3.7 and later squeeze first. The kernels are right
either way: this is the interpreter's bug, so the fix lives in the tests' harness.
"""
import numpy as np
import triton


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def apply() -> None:
    if _version(triton.__version__) >= (3, 7) or _version(np.__version__) < (2, 4):
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "squeezes_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # the scope restores attributes last-set-first, so this one is undone too
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor



def child_env() -> dict:
    """The environment for a process the tests start that runs kernels in the interpreter
    (and may start more): ``_site/sitecustomize.py`` applies these fixes at its start-up,
    as conftest does here."""
    import os

    site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_site")
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([site, *paths])}
