"""The house rules of the source tree, read from the code itself (no import runs):

* the module import graph has no cycle;
* no file imports another file's ``_private`` name;
* each layer imports only from the layers below it (or its own), as the layering table says:
  commands > adapters on disk and in a pool > methods > targeting > modules > ops > faces > base.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The compiled extension: a module with no .py file.
EXTENSION = "fastpeft._C"

# Lowest first. A module may import from its own layer and every layer before it in this list.
LAYERS = [
    ("base", ("fastpeft.backends", "fastpeft.quant", "fastpeft.config", "fastpeft.testing", "fastpeft.activations",
              EXTENSION)),
    ("faces", ("fastpeft.kernels",)),
    ("ops", ("fastpeft.ops",)),
    ("modules", ("fastpeft.nn",)),
    ("targeting", ("fastpeft.targeting",)),
    ("methods", ("fastpeft.methods", "fastpeft.quantize", "fastpeft.distributed")),
    ("adapters", ("fastpeft.checkpoint", "fastpeft.pool")),
    ("commands", ("fastpeft.cli", "fastpeft.bench", "fastpeft.compare", "fastpeft.finetune", "fastpeft.icl",
                  "fastpeft.models",
                  "fastpeft.__main__", "fastpeft")),
]


def package_dirs() -> dict[str, pathlib.Path]:
    """Where each package's files live in the repository: the Triton kernels' folder installs as
    fastpeft.kernels wherever it sits."""
    kernels = ROOT / "kernels"
    return {"fastpeft": ROOT / "fastpeft", "fastpeft.kernels": kernels if kernels.is_dir() else ROOT / "fastpeft" / "kernels"}


def source_modules() -> dict[str, pathlib.Path]:
    """module name -> file (a package's __init__.py, or its folder when it has none), for everything we ship."""
    modules = {}
    for package, folder in package_dirs().items():
        for path in [folder, *folder.rglob("*")]:
            if "__pycache__" in path.parts or not (path.is_dir() or path.suffix == ".py"):
                continue
            rel = path.relative_to(folder).with_suffix("") if path.is_file() else path.relative_to(folder)
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "fastpeft" and name.startswith("fastpeft.kernels"):
                continue  # listed under its own package
            if path.is_dir():
                modules.setdefault(name, path)
            else:
                modules[name] = path
    return modules


MODULES = source_modules()


def is_package(name: str) -> bool:
    return MODULES[name].is_dir() or MODULES[name].name == "__init__.py"


def is_module(name: str) -> bool:
    return name in MODULES or name == EXTENSION


def imports_of(name: str) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every import statement of a module,
    those inside functions included (a lazy import is a dependency too)."""
    if MODULES[name].is_dir():
        return []  # a namespace package: no code
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    package = name if is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if is_module(submodule):
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((source, alias.name, node.lineno))
    return [(m, n, line) for m, n, line in found if m == "fastpeft" or m.startswith("fastpeft.")]


GRAPH = {name: imports_of(name) for name in MODULES}


def is_private(name: str) -> bool:
    """`_name`, not a dunder such as ``__version__`` or ``__path__``."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def layer_of(name: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{name} belongs to no layer: add it to LAYERS")
    return best[0]


def test_every_import_names_a_module_we_ship():
    unknown = [f"{m} line {line}: {target}" for m, edges in GRAPH.items() for target, _, line in edges
               if not is_module(target)]
    assert not unknown, unknown


def test_the_module_graph_has_no_cycle():
    edges = {m: sorted({t for t, _, _ in GRAPH[m] if t in MODULES and t != m}) for m in MODULES}
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str):
        state[m] = 1
        path.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_no_file_imports_another_files_private_name():
    private = [f"{m} line {line}: {name} from {target}" for m, edges in GRAPH.items()
               for target, name, line in edges if name is not None and is_private(name)]
    assert not private, private


def test_each_layer_imports_only_from_below():
    upward = []
    for m, edges in GRAPH.items():
        for target, name, line in edges:
            if layer_of(target) > layer_of(m):
                upward.append(f"{m} ({LAYERS[layer_of(m)][0]}) line {line} imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, upward


@pytest.mark.parametrize("checker", [test_the_module_graph_has_no_cycle, test_each_layer_imports_only_from_below,
                                     test_no_file_imports_another_files_private_name])
def test_the_checks_catch_a_violation(checker, monkeypatch):
    """Each rule fails on a graph that breaks it (an upward import that closes a loop, from a private name)."""
    broken = {m: list(e) for m, e in GRAPH.items()}
    broken["fastpeft.backends"].append(("fastpeft.nn.lora", "_check_adapter_args", 1))
    monkeypatch.setitem(globals(), "GRAPH", broken)
    with pytest.raises(AssertionError):
        checker()


def test_tests_and_benchmarks_use_public_names_only():
    private = []
    for path in [*ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastpeft"):
                private += [f"{path.name} line {node.lineno}: {a.name} from {node.module}" for a in node.names
                            if is_private(a.name) and not is_module(f"{node.module}.{a.name}")]
    assert not private, private
