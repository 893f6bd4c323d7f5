"""The layout's promises (DESIGN.md), checked on the source: Ray only under ``raymoe/runtime``, DeepSpeed only in
``raymoe/zero/deepspeed_zero*.py``, torch.distributed never in single-device math, and no two raymoe modules
importing each other in a circle (imports inside functions count: a lazy import hides a circle, it does not
remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raymoe"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = _modules()
IMPORTS = {name: _imports(path, name) for name, path in MODULES.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def test_ray_only_under_runtime():
    offenders = sorted(m for m, imps in IMPORTS.items()
                       if any(_top(i) == "ray" for i in imps) and not m.startswith("raymoe.runtime")
                       and m not in ("raymoe.cli",))
    assert not offenders, f"modules outside raymoe/runtime import ray: {offenders}"


def test_deepspeed_only_in_the_zero_modules():
    offenders = sorted(m for m, imps in IMPORTS.items() if any(_top(i) == "deepspeed" for i in imps)
                       and not m.startswith("raymoe.zero.deepspeed_zero"))
    assert not offenders, f"modules outside raymoe/zero/deepspeed_zero*.py import deepspeed: {offenders}"


@pytest.mark.parametrize("package", ["model", "routing", "fp8", "schedule"])
def test_single_device_math_never_reaches_for_ranks(package):
    offenders = sorted(m for m, imps in IMPORTS.items() if m.startswith(f"raymoe.{package}")
                       and any(i.startswith("torch.distributed") or _top(i) == "ray" for i in imps))
    assert not offenders, offenders


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, imps in IMPORTS.items():
        targets = set()
        for name in imps:
            # "from raymoe.a import b" names raymoe.a and maybe the submodule raymoe.a.b: keep what is a module
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):  # a package's own parents: skip
                targets.add(name)
        graph[module] = {t for t in targets if not t.startswith(module + ".")}
    return graph


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not circles, f"modules that import each other in a circle: {circles}"
