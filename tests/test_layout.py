"""The architecture as a test: data flows one way, and no project module imports itself in a circle.

Every import of every project module is read from its source (module level and inside
functions alike: a lazy import is still a dependency), resolved to a project module, and checked
against the rooms' order:

    data_manifests <- caption_prompts <- pipeline (ingest, caption) <- train <- eval <- demo

A room may import the rooms left of it, never one to its right. The two pipeline stages do not
import each other (caption reads what ingest publishes, not its code), and eval imports the model
library of train (the model, its tokenizer, its image transform, the export format), never the
training program (main loop, data stream, DeepSpeed checkpoints, config).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_manifests", "caption_prompts", "pipeline", "train", "eval", "demo")
# What each room may import (besides itself).
ALLOWED = {
    "data_manifests": (),
    "caption_prompts": ("data_manifests",),
    "pipeline": ("data_manifests", "caption_prompts", "pipeline"),
    "train": ("data_manifests", "caption_prompts"),
    "eval": ("data_manifests", "caption_prompts", "train.model", "train.tokenizer", "train.transform", "train.export"),
    "demo": PACKAGES,
}
STAGES = ("pipeline.ingest", "pipeline.caption")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import mod` imports a module; `from mod import name` the module itself.
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` where only a.b is ours, etc.
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


MODULES = project_modules()
GRAPH = {name: imports_of(name, path, MODULES) for name, path in MODULES.items()}


def room(module: str) -> str:
    return module.split(".")[0]


def test_the_rooms_are_found():
    assert {"pipeline.ingest.cli", "pipeline.caption.distributor", "demo.main", "train.main", "eval.cli",
            "data_manifests.shard"} <= set(MODULES)


@pytest.mark.parametrize("package", PACKAGES)
def test_data_flows_one_way(package):
    wrong = []
    for module, targets in GRAPH.items():
        if room(module) != package:
            continue
        for target in sorted(targets):
            if room(target) == package:
                continue
            if not any(target == a or target.startswith(a + ".") for a in ALLOWED[package]):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the flow of data:\n" + "\n".join(wrong)


def test_the_pipeline_stages_do_not_import_each_other():
    wrong = [f"{m} imports {t}" for m, ts in GRAPH.items() for t in sorted(ts)
             for a, b in (STAGES, STAGES[::-1]) if m.startswith(a) and t.startswith(b)]
    assert not wrong, "\n".join(wrong)


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            # A package's __init__ importing its own submodules is how packages are built; a
            # submodule importing its package back is not counted either (it names the same code).
            if v.startswith(w + ".") or w.startswith(v + "."):
                continue
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    cycles = import_cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_check_can_fail(tmp_path):
    """The resolver sees lazy and relative imports (the kinds the old cycle was made of)."""
    source = tmp_path / "downloader.py"
    source.write_text("def f():\n    from .importer import x\n    from eval.cli import main\n")
    found = imports_of("pipeline.ingest.downloader", source, MODULES)
    assert found == {"pipeline.ingest.importer", "eval.cli"}
    # The layout before this test existed: ingest and importers imported each other.
    graph = {**GRAPH, "pipeline.ingest.importer": GRAPH["pipeline.ingest.importer"] | {"pipeline.ingest.downloader"},
             "pipeline.ingest.downloader": found}
    assert ["pipeline.ingest.downloader", "pipeline.ingest.importer"] in import_cycles(graph)
