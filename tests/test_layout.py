"""The package layout shows the pipeline: each folder a stage, and no module imports a later stage.

Imports are read from the source (function-level ones too), so the test needs nothing installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dnc"

# The stages in the order a spec passes through them; a module may import its own stage and earlier ones.
STAGES = [
    ("base", ["dnc.errors", "dnc.text", "dnc.files", "dnc.jinja"]),
    ("front end", ["dnc.frontend"]),
    ("IR", ["dnc.ir"]),
    ("weights and pipeline", ["dnc.weights", "dnc.pipeline"]),
    ("targets", ["dnc.targets"]),
    ("reports", ["dnc.reports"]),
    ("checks", ["dnc.check"]),
    ("command line", ["dnc.cli", "dnc.__main__", "dnc"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> int:
    """The index of the stage `module` belongs to: the longest matching prefix wins."""
    best, length = None, -1
    for i, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = i, len(prefix)
    assert best is not None, f"{module} belongs to no stage: add it to STAGES"
    return best


def imports(path: Path) -> set[str]:
    """The dnc modules `path` imports, anywhere in it (`from dnc import x` counts as dnc.x where x is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dnc")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("dnc"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
    return found


def _is_module(name: str) -> bool:
    base = ROOT / Path(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_every_module_belongs_to_a_stage_and_imports_no_later_one():
    upward = []
    for name, path in sorted(all_modules().items()):
        for target in sorted(imports(path)):
            if target == "dnc":  # dnc/__init__.py: the version, imported by emitters for their headers
                continue
            if stage(target) > stage(name):
                upward.append(f"{name} ({STAGES[stage(name)][0]}) imports {target} ({STAGES[stage(target)][0]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = nx.DiGraph()
    modules = all_modules()
    for name, path in modules.items():
        graph.add_node(name)
        for target in imports(path):
            if target in modules and target != "dnc" and target != name:
                graph.add_edge(name, target)
    assert list(nx.simple_cycles(graph)) == []


def test_folders_are_the_stages():
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert folders == ["check", "frontend", "ir", "reports", "targets"]
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    # the top level holds only what every stage shares and the command line
    assert top == ["__init__", "__main__", "cli", "errors", "files", "jinja", "pipeline", "text", "weights"]
