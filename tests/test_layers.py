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
PURE_MATHS = (
    "mltag.maths.metrics",
    "mltag.maths.thresholds",
    "mltag.tagger.losses",
    "mltag.maths.resampling",
    "mltag.search.index_selection",
)
FAISS_MODULES = (
    "mltag.search",
    "mltag.search.embedding_index",
    "mltag.search.index_training",
    "mltag.search.index_tuning",
    "mltag.stages.index_build",
    "mltag.stages.index_search",
    "mltag.stages.index_update",
    "mltag.search.neighbours",
    "mltag.stages.anomalies",
    "mltag.stages.duplicates",
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
    assert (
        "mltag.stages.anomalies" not in graph["mltag.stages.duplicates"]
        and "mltag.stages.duplicates" not in graph["mltag.stages.anomalies"]
    )
    assert (
        "mltag.stages.evaluate"
        not in graph["mltag.stages.calibrate"] | graph["mltag.maths.thresholds"] | graph["mltag.stages.curate"] | graph["mltag.stages.oof"]
    )


@pytest.mark.parametrize("module", FAISS_MODULES)
def test_faiss_modules_load_no_torch_or_timm(module):
    code = f"import sys, {module}\nprint(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_mltag_index_re_exports_each_stage_run_under_its_old_name():
    from mltag import search as index
    from mltag.stages import index_build, index_search, index_update

    assert index.build_index is index_build.run and index.update_index is index_update.run and index.run_search is index_search.run
    assert STAGES["index"].run == "mltag.stages.index_build:run" and STAGES["index-update"].run == "mltag.stages.index_update:run"


# The package's layers, in the order data flows (mltag/__init__.py and the README draw the same).
LAYERS = ("errors", "runtime", "data", "config", "maths", "table", "tagger", "tagging", "search", "stages", "cli")


def layer_of(module: str) -> str:
    return module.split(".")[1]


def test_each_layer_imports_only_the_layers_before_it():
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        if source != "mltag"
        for target in targets
        if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(source))
    )
    assert upward == []


def test_every_module_sits_in_a_layer():
    assert {layer_of(m) for m in import_graph() if m != "mltag"} == set(LAYERS)


def test_the_old_flat_module_names_still_import_as_the_same_modules():
    code = (
        "import mltag.tag, mltag.stages.tag, mltag.model, mltag.tagger.model\n"
        "from mltag.index import build_index\n"
        "from mltag.stages.index_build import run\n"
        "assert mltag.tag is mltag.stages.tag and mltag.model is mltag.tagger.model and build_index is run\n"
        "assert mltag.stages.tag.__spec__.name == 'mltag.stages.tag'\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr


def test_the_readme_layout_names_every_module_and_folder():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Architecture and layout") :]
    layout = layout[: layout.index("\n## ", 3)]
    files = {p.name for p in (ROOT / "mltag").rglob("*.py") if p.name != "__init__.py"}
    folders = {f"{p.name}/" for p in (ROOT / "mltag").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert {name for name in files | folders if name not in layout} == set()
