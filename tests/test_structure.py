"""The package's module structure: no import cycle between its modules, no module over 600
lines. Static (``ast``), so function-level imports count as much as top-level ones."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "speclora_kernels"
MAX_LINES = 600
OVER_LIMIT: set[str] = set()
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that importing ``name`` executes imports of: each imported module,
    and its enclosing packages that do not also enclose ``name`` (those are already being
    imported when ``name`` runs). ``from pkg import x`` imports ``pkg.x`` if that is a
    module, else ``pkg`` itself."""
    is_package = path.name == "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                # ``import a.b.c`` imports the longest prefix that is one of our modules
                for n in range(len(parts), 0, -1):
                    if ".".join(parts[:n]) in modules:
                        targets.add(".".join(parts[:n]))
                        break
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source not in modules:
                continue  # not ours
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.add(sub if sub in modules else source)
    edges = set()
    for target in targets:
        parts = target.split(".")
        for n in range(1, len(parts) + 1):
            enclosing = ".".join(parts[:n])
            if n == len(parts) or not (name == enclosing or name.startswith(enclosing + ".")):
                edges.add(enclosing)
    edges.discard(name)
    return edges


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _edges(name, path, modules) for name, path in modules.items()}
    for importer, imported in KNOWN_CYCLE_EDGES:
        assert imported in graph[importer], f"{importer} no longer imports {imported}: delete " \
            f"the entry from KNOWN_CYCLE_EDGES"
        graph[importer].discard(imported)
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_module_imports_the_top_level_init():
    """Modules read what they need from where it is defined (e.g. ``_version``), never from
    ``speclora_kernels/__init__.py``, which imports them."""
    modules = _modules()
    importers = [name for name, path in modules.items()
                 if name != PACKAGE and PACKAGE in _edges(name, path, modules)]
    assert not importers, importers


def test_no_module_over_600_lines():
    long = {path.relative_to(ROOT).as_posix(): n for path in (ROOT / PACKAGE).rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= OVER_LIMIT, {k: v for k, v in long.items() if k not in OVER_LIMIT}
