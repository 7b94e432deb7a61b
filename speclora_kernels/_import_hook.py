"""Run a function once a top-level module has been imported, without importing it.

:func:`when_imported` calls the function at once when the module is already imported;
otherwise a finder at the front of ``sys.meta_path`` returns the module's own spec with a
loader that removes the finder, runs the module's code, then the function. Looking the
module up without importing it (``importlib.util.find_spec``, as transformers probes its
optional packages) leaves the hook in place; the imported module keeps its own loader.
"""
from __future__ import annotations

import sys


class _AfterImport:
    """The ``sys.meta_path`` finder for one module name."""

    def __init__(self, name: str, callback):
        self.name, self.callback, self._searching = name, callback, False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._searching:
            return None
        self._searching = True  # the other finders may ask importlib again
        try:
            spec = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if finder is not self and find is not None:
                    spec = find(fullname, path, target)
                    if spec is not None:
                        break
        finally:
            self._searching = False
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RunAfter(spec.loader, self)
        return spec

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


class _RunAfter:
    """Wraps the module's loader: its code, then the callback, once."""

    def __init__(self, loader, hook: _AfterImport):
        self.loader, self.hook = loader, hook

    def __getattr__(self, attr):  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self.loader, attr)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.hook.remove()
        self.loader.exec_module(module)
        self.hook.callback()


def when_imported(name: str, callback) -> None:
    """Call ``callback()`` now if ``name`` is imported, else right after it is (once)."""
    if name in sys.modules:
        if sys.modules[name] is not None:  # None: its import is blocked on purpose
            callback()
        return
    sys.meta_path.insert(0, _AfterImport(name, callback))
