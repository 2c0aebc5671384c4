"""The package is a one-way stack: every fxdp module imports only from its own package or from the
layers below it (lazy imports inside functions included), and no module import cycle exists."""
import ast
import pathlib

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fxdp"

# bottom to top; packages on one level may not import each other
LAYERS = [
    {"core"}, {"rules"}, {"analysis"}, {"engine"}, {"compile"}, {"training"}, {"distributed"},
    {"compat", "auditing", "report"}, {"integrations"}, {"<top>"},
]
LEVEL = {pkg: i for i, level in enumerate(LAYERS) for pkg in level}


def module_name(path: pathlib.Path) -> str:
    parts = ("fxdp",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and (ROOT / parts[1]).is_dir():
        return parts[1]
    return "<top>"


def imports_of(path: pathlib.Path, module: str):
    """Every fxdp module named by an import statement anywhere in the file (absolute or relative)."""
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "fxdp")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fxdp":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield sub if _exists(sub) else target


def _exists(module: str) -> bool:
    rel = pathlib.Path(*module.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
EDGES = [(m, t) for m, p in MODULES.items() for t in imports_of(p, m) if t != m]


def test_every_package_has_a_layer():
    assert {package_of(m) for m in MODULES} <= set(LEVEL), {package_of(m) for m in MODULES} - set(LEVEL)


@pytest.mark.parametrize("package", sorted({package_of(m) for m in MODULES}))
def test_imports_point_down_the_stack(package):
    upward = [(m, t) for m, t in EDGES if package_of(m) == package and package_of(t) != package
              and LEVEL[package_of(t)] >= LEVEL[package]]
    assert not upward, f"{package} imports from its own level or above: {upward}"


def test_no_import_cycle_between_modules():
    graph = nx.DiGraph((m, t) for m, t in EDGES if t in MODULES)
    assert list(nx.simple_cycles(graph)) == []
