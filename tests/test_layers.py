"""The import rules between our packages (docs/contributing.md, "Layers").

Every module is parsed with ``ast``, nothing is imported. An import counts wherever it
is written (module level, inside a function, under ``TYPE_CHECKING``), in both the
``import x.y`` and the ``from x import y`` forms; relative imports are resolved.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SERVICES = {"edge_agent", "coordinator", "aggregator"}

# package -> the packages of ours it may import (bottom to top; itself is always allowed)
ALLOWED: dict[str, set[str]] = {
    "schemas": set(),
    "stack": {"schemas"},
    "edge_agent": {"schemas"},
    "coordinator": {"schemas"},
    "aggregator": {"schemas"},
    "sim": {"schemas", "stack", *SERVICES},
    "loadtest": {"schemas", "stack", *SERVICES, "sim"},
    "bench": {"schemas", "stack", *SERVICES, "sim", "loadtest"},  # loadtest's environment
    "fedfleet": {"schemas", "stack", *SERVICES, "sim", "loadtest"},
    "tests": {"schemas", "stack", *SERVICES, "sim", "loadtest", "fedfleet"},
    "scripts": set(),  # build helpers (k8s_schemas.py): standard library only
}
OURS = set(ALLOWED)


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. "loadtest.cli"
    target: str  # the imported module, e.g. "sim.fleet"
    names: tuple[str, ...]  # for ``from target import a, b``; empty for ``import target``
    line: int

    @property
    def source_package(self) -> str:
        return self.module.split(".")[0]

    @property
    def target_package(self) -> str:
        return self.target.split(".")[0]

    def where(self) -> str:
        return f"{self.module}:{self.line} imports {self.target}"


def module_name(path: Path) -> tuple[str, bool]:
    """(dotted module name, is a package ``__init__``) of a file below ROOT."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def imports_of(source: str, module: str, *, is_package: bool = False) -> Iterator[Import]:
    """Every import written in ``source`` (the text of ``module``), relative ones resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = tuple(alias.name for alias in node.names)
            yield Import(module, target, names, node.lineno)


def our_modules() -> Iterator[Path]:
    for package in sorted(OURS):
        yield from sorted((ROOT / package).rglob("*.py"))


@functools.cache
def our_imports() -> tuple[Import, ...]:
    """Every import of one of our packages, in every module of ours (parsed once)."""
    out: list[Import] = []
    for path in our_modules():
        module, is_package = module_name(path)
        text = path.read_text(encoding="utf-8")
        out.extend(
            imp
            for imp in imports_of(text, module, is_package=is_package)
            if imp.target_package in OURS
        )
    return tuple(out)


def package_graph(imports: tuple[Import, ...]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {p: set() for p in OURS}
    for imp in imports:
        if imp.source_package != imp.target_package:
            graph[imp.source_package].add(imp.target_package)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as a path (first node repeated at the end), or []."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str]:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return []
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return []

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return []


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# ------------------------------------------------------------------ the checker itself


def test_imports_of_resolves_relative_and_nested_imports() -> None:
    source = (
        "import sim.fleet\n"
        "from . import hetero\n"
        "from ..stack.procs import free_port\n"
        "def f():\n"
        "    from schemas import messages\n"
    )

    got = [(i.target, i.names) for i in imports_of(source, "sim.pool.x")]

    assert got == [
        ("sim.fleet", ()),
        ("sim.pool", ("hetero",)),
        ("sim.stack.procs", ("free_port",)),
        ("schemas", ("messages",)),
    ]
    init = [i.target for i in imports_of("from .launcher import X", "stack", is_package=True)]
    assert init == ["stack.launcher"]


def test_find_cycle_reports_the_cycle_and_nothing_on_a_dag() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


# ------------------------------------------------------------------ the rules


def test_every_top_level_folder_with_python_code_is_in_the_table() -> None:
    folders = {
        d.name
        for d in ROOT.iterdir()
        if d.is_dir()
        and not d.name.startswith((".", "build"))
        and not d.name.endswith(".egg-info")
        and any(d.rglob("*.py"))
    }

    assert folders - OURS == set(), "add the new package to ALLOWED (and docs/contributing.md)"


def test_the_table_itself_is_layered() -> None:
    assert find_cycle(ALLOWED) == []
    assert all(not (ALLOWED[s] & SERVICES) for s in SERVICES)
    assert all("fedfleet" not in allowed for p, allowed in ALLOWED.items() if p != "tests")


def test_no_cycles_between_packages() -> None:
    assert find_cycle(package_graph(our_imports())) == []


def test_every_import_between_packages_is_allowed() -> None:
    bad = [
        imp.where()
        for imp in our_imports()
        if imp.source_package != imp.target_package
        and imp.target_package not in ALLOWED[imp.source_package]
    ]

    assert bad == []


def test_schemas_imports_nothing_of_ours() -> None:
    assert package_graph(our_imports())["schemas"] == set()


def test_services_import_neither_each_other_nor_anything_above() -> None:
    graph = package_graph(our_imports())

    assert {s: graph[s] - {"schemas"} for s in SERVICES} == {s: set() for s in SERVICES}


def test_only_tests_import_the_cli_package() -> None:
    graph = package_graph(our_imports())

    assert {p for p, deps in graph.items() if "fedfleet" in deps} <= {"tests"}


def test_no_private_names_taken_across_packages() -> None:
    bad = [
        f"{imp.where()} ({', '.join(imp.names)})"
        for imp in our_imports()
        if imp.source_package != imp.target_package
        and (
            any(is_private(part) for part in imp.target.split("."))
            or any(is_private(name) for name in imp.names)
        )
    ]

    assert bad == []


def private_attribute_uses(source: str) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of every ``x._name`` whose ``x`` is not ``self``/``cls`` (``super()``
    included: overriding a private of a base class counts)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            yield node.lineno, ast.unparse(node)


def test_private_attribute_scan_sees_through_chains_and_super() -> None:
    source = (
        "self._ok = 1\n"
        "agent._mqtt.client._client\n"
        "super()._publish()\n"
        "obj.public.__dict__\n"
    )

    got = sorted(text for _, text in private_attribute_uses(source))

    assert got == ["agent._mqtt", "agent._mqtt.client._client", "super()._publish"]


def test_harnesses_use_no_private_attributes() -> None:
    """The simulator and the load tests drive the services through public interfaces
    (``EdgeAgent.link``, ``SimLink``, ``SimModels``, probe hooks), never their internals."""
    bad = [
        f"{module_name(path)[0]}:{line} {text}"
        for package in ("sim", "loadtest")
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, text in private_attribute_uses(path.read_text(encoding="utf-8"))
    ]

    assert bad == []
