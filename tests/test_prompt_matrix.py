"""Tests for llmdpd_pl.prompt_matrix: which prompts each cell reads, the matrix's layout, its files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from llmdpd_pl.prompt_matrix import format_matrix, heatmap, prompt_sources, success_matrix, write_matrix
from llmdpd_pl.rollouts import Counts, TaskResult

TASKS = ["reach", "push", "box-close"]


@pytest.mark.parametrize(("swap", "want"), [("text", ("push", "reach")), ("trajectory", ("reach", "push")),
                                            ("both", ("push", "push"))])  # fmt: skip
def test_prompt_sources_swap_only_the_named_prompt(swap: str, want: tuple[str, str]) -> None:
    sources = prompt_sources(TASKS, "push", swap)  # type: ignore[arg-type]
    assert sources["reach"] == want  # (text task, trajectory task) of reach's env
    assert sources["push"] == ("push", "push")  # the source's own row is unswapped


def _rows() -> list[TaskResult]:
    """Cell (t, u) succeeds in (3·i + j) of 10 episodes, i and j the tasks' indices."""
    return [
        replace(TaskResult.from_counts(t, "seen", "agent", Counts(10, successes=3 * i + j)), prompt_source=u)
        for i, t in enumerate(TASKS)
        for j, u in enumerate(TASKS)
    ]


def test_success_matrix_rows_are_envs_and_columns_prompt_sources() -> None:
    matrix = success_matrix(_rows()[::-1], TASKS)  # order of the rows does not matter
    assert matrix == [[0.0, 0.1, 0.2], [0.3, 0.4, 0.5], [0.6, 0.7, 0.8]]
    text = format_matrix(matrix, TASKS).splitlines()
    assert text[1].split() == ["reach", "0.0%", "10.0%", "20.0%"]


def test_write_matrix_writes_json_and_png(tmp_path: Path) -> None:
    json_path, png_path, fig = write_matrix(_rows(), TASKS, "text", tmp_path, {"episodes_per_cell": 10})
    data = json.loads(json_path.read_text())
    assert data["success"] == success_matrix(_rows(), TASKS) and data["tasks"] == TASKS
    assert data["swap"] == "text" and len(data["cells"]) == 9
    assert {c["prompt_source"] for c in data["cells"]} == set(TASKS)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["0", "10", "20", "30", "40", "50", "60", "70", "80"]
    xlabel = heatmap([[1.0]], ["reach"], "both", "t").axes[0].get_xlabel()
    assert xlabel == "prompt source (both prompts swapped)"
