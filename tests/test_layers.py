"""The import graph runs one way: no cycles, the pure maths imports no stage, stages share what they
share through a lower module (never through each other), and the FAISS modules load no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mltag.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]
PURE_MATHS = ("mltag.metrics", "mltag.thresholds", "mltag.losses", "mltag.resampling", "mltag.index_selection")
FAISS_MODULES = (
    "mltag.index",
    "mltag.embedding_index",
    "mltag.index_training",
    "mltag.index_tuning",
    "mltag.index_build",
    "mltag.index_search",
    "mltag.index_update",
    "mltag.neighbours",
    "mltag.anomalies",
    "mltag.duplicates",
)


def import_graph() -> dict[str, set[str]]:
    """Every mltag module -> the mltag modules it imports, at the top or inside a function."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in (ROOT / "mltag").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}

    def add(source: str, target: str) -> None:
        while target and target not in modules:  # `from mltag.x import name`: the module is mltag.x
            target = target.rpartition(".")[0]
        if target and target not in (source, "mltag"):
            graph[source].add(target)

    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(name, alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    add(name, f"{node.module}.{alias.name}")
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:  # on the current path: a cycle back to it
                stack = path + [node]
                return stack[stack.index(target) :] + [target]
            if not state.get(target) and (cycle := visit(target, path + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (cycle := visit(node, [])):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


@pytest.mark.parametrize("module", PURE_MATHS)
def test_the_pure_maths_reaches_no_stage(module):
    stages = {entry.run.split(":")[0] for entry in STAGES.values()}
    assert not reachable(import_graph(), module) & stages


def test_stages_share_helpers_through_lower_modules_not_through_each_other():
    graph = import_graph()
    assert "mltag.anomalies" not in graph["mltag.duplicates"] and "mltag.duplicates" not in graph["mltag.anomalies"]
    assert "mltag.evaluate" not in graph["mltag.calibrate"] | graph["mltag.thresholds"] | graph["mltag.curate"] | graph["mltag.oof"]


@pytest.mark.parametrize("module", FAISS_MODULES)
def test_faiss_modules_load_no_torch_or_timm(module):
    code = f"import sys, {module}\nprint(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_mltag_index_re_exports_each_stage_run_under_its_old_name():
    from mltag import index, index_build, index_search, index_update

    assert index.build_index is index_build.run and index.update_index is index_update.run and index.run_search is index_search.run
    assert STAGES["index"].run == "mltag.index_build:run" and STAGES["index-update"].run == "mltag.index_update:run"
