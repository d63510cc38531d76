"""The house's layers (docs/architecture.md), read from the code: every ``import`` of every module, at the top of a
file or inside a function, walked with ``ast``.

This test covers:
- no import runs upward: each module imports only modules of its own layer or below (the layers below, bottom first);
- no circle: no module reaches itself through the imports;
- Ray only where it may live: runtime/, tune.py, cluster.py;
- every module of the package has a layer (a new module is placed here, where its reader will look for it).
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raydistill"

# bottom first; a module is in the layer of the longest prefix that names it
LAYERS = [
    ["errors", "names", "files", "seeding"],
    ["data", "distill", "models"],
    ["methods", "policies"],
    ["transports"],
    ["engine"],
    ["config"],
    ["export", "evaluate", "plots"],
    ["runtime", "cluster"],
    ["tune", "bench", "results", "report", "export_formats", "__init__"],
    ["run_commands"],
    ["cli"],
]
RAY_MAY_LIVE = ("runtime", "tune", "cluster")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer_of(module: str) -> int:
    best, found = -1, None
    for rank, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), rank
    assert found is not None, f"raydistill.{module} has no layer in tests/test_architecture.py (docs/architecture.md)"
    return found


def imports_of(path: Path, module: str) -> set[str]:
    """The raydistill modules (relative names) and the third-party roots a module imports, anywhere in its file."""
    found = set()
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                name = ".".join(["raydistill", *base, *([node.module] if node.module else [])])
            else:
                name = node.module
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)     # from raydistill.x import module
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for module, path in modules.items():
        targets = set()
        for name in imports_of(path, module):
            if name == "raydistill" or not name.startswith("raydistill."):
                continue
            name = name[len("raydistill."):]
            while name and name not in modules:           # raydistill.x.y.Name -> the module raydistill.x.y
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        edges[module] = targets
    return edges


def test_no_import_runs_upward():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in sorted(graph().items()) for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_no_module_reaches_itself_through_its_imports():
    edges = graph()
    circles = []
    for start in sorted(edges):
        path, seen = [start], set()

        def walk(node):
            for nxt in sorted(edges[node]):
                if nxt == start:
                    circles.append(" -> ".join(path + [start]))
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    path.append(nxt)
                    if walk(nxt):
                        return True
                    path.pop()
            return False

        walk(start)
    assert not circles, "\n".join(circles)


def test_ray_is_imported_only_where_it_may_live():
    places = []
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        if any(module == root or module.startswith(root + ".") for root in RAY_MAY_LIVE):
            continue
        if any(name == "ray" or name.startswith("ray.") for name in imports_of(path, module)):
            places.append(module)
    assert not places, f"Ray imported outside {', '.join(RAY_MAY_LIVE)}: {sorted(places)}"


def test_the_layers_name_real_modules_and_an_unplaced_module_is_said():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for names in LAYERS:
        for name in names:
            assert any(m == name or m.startswith(name + ".") for m in modules), name
    try:
        layer_of("nosuch_module")
    except AssertionError as err:
        assert "has no layer" in str(err)
    else:
        raise AssertionError("a module without a layer passed")
