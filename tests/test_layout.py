"""The package reads bottom-up: no module imports one from a layer above its own."""

from __future__ import annotations

import ast
from pathlib import Path

import llmdpd_pl

LAYERS = [
    ["utils", "errors", "stats"],
    ["hidden_goal", "envs", "locomotion", "suites"],
    ["schedules", "diffusion", "losses", "averaging"],
    ["layers", "networks", "prompt_encoders"],
    ["policy", "task_bank"],
    ["data.prompts", "data.embeddings", "data.spec", "data.publish", "data.collect", "data.sac",
     "data.batches", "data.loading", "data.datamodule"],
    ["objectives", "module", "callbacks.ema", "callbacks.provenance", "callbacks.progress"],
    ["rollouts", "evaluation", "acting", "media", "video", "prompt_matrix", "callbacks.rollout_evaluation",
     "pretrained"],
    ["report", "export"],
    ["trainer", "cli", "preflight"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
PACKAGE = Path(llmdpd_pl.__file__).parent


def _modules() -> dict[str, Path]:
    paths = sorted(PACKAGE.rglob("*.py"))
    names = {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in paths}
    return {n: p for n, p in names.items() if not n.endswith("__init__")}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmdpd_pl."):
            found.add(node.module.removeprefix("llmdpd_pl."))
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
            found |= {n.removeprefix("llmdpd_pl.") for n in names if n.startswith("llmdpd_pl.")}
    return found


def test_every_module_has_a_layer() -> None:
    assert sorted(_modules()) == sorted(LAYER)


def test_no_module_imports_from_a_layer_above() -> None:
    upward = [
        f"{name} (layer {LAYER[name]}) imports {other} (layer {LAYER[other]})"
        for name, path in _modules().items()
        for other in _imports(path)
        if LAYER[other] > LAYER[name]
    ]
    assert upward == []


def test_no_package_file_is_over_300_lines() -> None:
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert {n: k for n, k in long.items() if k > 300} == {}


def test_no_import_cycle_even_inside_a_layer() -> None:
    graph = {name: {o for o in _imports(path) if o in LAYER} for name, path in _modules().items()}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for other in sorted(graph[node]):
            if other in path:
                cycles.append([*path[path.index(other) :], other])
            elif other not in done:
                visit(other, [*path, other])
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert cycles == []
