"""The package's layout (issue 15, item 5), read from the source with ``ast``:

- **No import circles.** The graph has an edge ``a -> b`` when module ``a`` imports module
  ``b`` (``import genflow.b``, ``from genflow.b import name``, ``from genflow import b``,
  relative forms alike). An import of ``genflow.x.y`` is an edge to ``genflow.x.y`` only, not to
  the packages above it: running ``genflow/__init__.py`` (which re-exports the public API) is
  Python's doing, not a dependency of the importer. Module-level imports must form no cycle,
  and neither may module-level and function-level imports together (a deferred import that
  closes a circle is still a circle).
- **No private names across modules.** ``from genflow.x import _name`` and ``x._name`` on an
  imported genflow module are refused unless ``_name`` is itself a module; dunders are not
  private. A private *module* (``genflow._cache``, ``genflow.ops._reference``) belongs to the
  package that holds it: any module inside that package may import it (``genflow.ops.hutchinson``
  may use ``genflow.ops._reference``; every genflow module may use ``genflow._cache``), modules
  outside it may not.
- **Layers.** The foundation modules (errors, validators, the cache helper, the registry)
  import no other genflow module; the engine (``genflow.engine``) never imports the diffusion
  front ends that are built on it.
"""
import ast
import itertools
import pathlib
from typing import Dict, List, NamedTuple, Set

import pytest

import genflow

ROOT = pathlib.Path(genflow.__file__).parent
PACKAGE = ROOT.name

FOUNDATION = ("genflow.errors", "genflow._cache", "genflow._checks", "genflow.registry")
ABOVE_THE_ENGINE = ("genflow.solvers", "genflow.sample", "genflow.compat", "genflow.train", "genflow.likelihood",
                    "genflow.cnf", "genflow.divergence", "genflow.sdflow", "genflow.kernel_flows", "genflow.bench", "genflow.cli")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> Dict[str, pathlib.Path]:
    found = {_module_name(p): p for p in ROOT.rglob("*.py")}
    # compiled extension modules (genflow._C) are modules too
    found.update({f"{PACKAGE}.{p.name.split('.')[0]}": p for p in ROOT.glob("*.so")})
    return found


MODULES = _modules()


class Import(NamedTuple):
    importer: str
    line: int
    target: str        # the genflow module imported, or the module a name is taken from
    name: str          # the name taken from ``target`` ("" for a plain module import)
    deferred: bool     # inside a function or class body


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _source_module(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(importer).split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _import_nodes(body, deferred=False):
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, deferred
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from _import_nodes(node.body, True)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _import_nodes(getattr(node, field, None) or [], deferred)


def _imports(module: str, tree: ast.Module) -> List[Import]:
    """Every import of a genflow module in ``module``, resolved to modules where it names one."""
    found = []
    for node, deferred in _import_nodes(tree.body):
        if isinstance(node, ast.Import):
            found += [Import(module, node.lineno, a.name, "", deferred) for a in node.names if a.name in MODULES]
            continue
        source = _source_module(module, node)
        if source not in MODULES:
            continue
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in MODULES:
                found.append(Import(module, node.lineno, submodule, "", deferred))
            else:
                found.append(Import(module, node.lineno, source, alias.name, deferred))
    return found


def _trees() -> Dict[str, ast.Module]:
    return {m: ast.parse(p.read_text(), filename=str(p)) for m, p in MODULES.items() if p.suffix == ".py"}


TREES = _trees()
IMPORTS = [imp for module, tree in TREES.items() for imp in _imports(module, tree)]


def _graph(include_deferred: bool) -> Dict[str, Set[str]]:
    graph = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if imp.target != imp.importer and (include_deferred or not imp.deferred):
            graph[imp.importer].add(imp.target)
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    counter = itertools.count()

    def visit(v):
        index[v] = low[v] = next(counter)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_module_allowed(importer: str, target: str) -> bool:
    """A private module may be imported from inside the package that holds it."""
    owner = target.rpartition(".")[0]
    return importer == owner or importer.startswith(owner + ".")


def _attribute_uses(module: str, tree: ast.Module):
    """``(line, module, attribute)`` of every ``alias.attr`` chain that starts at a name bound to an
    imported genflow module (``import genflow.x as y``, ``from genflow import x``)."""
    bound = {}
    for node, _ in _import_nodes(tree.body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else PACKAGE
        else:
            source = _source_module(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain, value = [], node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in bound:
            continue
        current = bound[value.id]
        for attr in reversed(chain):
            if f"{current}.{attr}" in MODULES:
                current = f"{current}.{attr}"
                continue
            yield node.lineno, current, attr
            break


def test_the_source_was_read():
    """The checks below see the package: its engine, solvers and the foundation modules."""
    assert {"genflow", "genflow.engine.loop", "genflow.solvers.base", "genflow.errors", "genflow._cache"} <= set(TREES)
    assert any(imp.importer == "genflow.engine.loop" and imp.target == "genflow.errors" for imp in IMPORTS)


@pytest.mark.parametrize("include_deferred", [False, True], ids=["module_level", "with_function_level"])
def test_no_import_cycles(include_deferred):
    assert _cycles(_graph(include_deferred)) == []


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_private_names_imported_across_modules():
    bad = []
    for imp in IMPORTS:
        if imp.name and _is_private(imp.name) and imp.target != imp.importer:
            bad.append(f"{imp.importer}:{imp.line} imports {imp.name} from {imp.target}")
        elif not imp.name and _is_private(imp.target.rpartition(".")[2]) \
                and not _private_module_allowed(imp.importer, imp.target):
            bad.append(f"{imp.importer}:{imp.line} imports the private module {imp.target} from outside its package")
    assert bad == [], "promote the name (drop the underscore) or move the code:\n" + "\n".join(bad)


def test_no_private_attributes_used_across_modules():
    bad = [f"{module}:{line} uses {owner}.{attr}" for module, tree in TREES.items()
           for line, owner, attr in _attribute_uses(module, tree) if _is_private(attr) and owner != module]
    assert sorted(set(bad)) == [], "promote the name (drop the underscore) or move the code"


def test_private_module_rule():
    assert _private_module_allowed("genflow.ops.hutchinson", "genflow.ops._reference")
    assert _private_module_allowed("genflow.engine.solve", "genflow._cache")
    assert not _private_module_allowed("genflow.likelihood", "genflow.ops._reference")


@pytest.mark.parametrize("module", FOUNDATION)
def test_foundation_modules_import_only_the_foundation(module):
    assert module in TREES
    above = sorted({imp.target for imp in IMPORTS if imp.importer == module and imp.target not in FOUNDATION})
    assert above == []


def test_the_engine_never_imports_what_is_built_on_it():
    bad = sorted(f"{imp.importer}:{imp.line} imports {imp.target}" for imp in IMPORTS
                 if imp.importer.startswith("genflow.engine")
                 and any(imp.target == top or imp.target.startswith(top + ".") for top in ABOVE_THE_ENGINE))
    assert bad == []
