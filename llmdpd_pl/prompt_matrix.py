"""The prompt-sensitivity matrix: every evaluated task's environment under every task's prompts.

Row t is task t's environment; column u is the prompt source. With ``swap = "text"`` the policy reads u's
text prompt and t's own trajectory prompt, with ``"trajectory"`` the reverse, with ``"both"`` both of u's.
Only the prompts change: the env, its layouts and the action noise are row t's in every column (each task
draws its actions from a generator of its own, seeded by the evaluation seed and the task), so the diagonal
is a plain ``llmdpd test`` of each task, and a column's departure from it is the prompts' effect alone.

**Reading it**: if the off-diagonal cells match the diagonal, the policy ignores its prompts; if a row's
success follows the column of its own task, the prompts steer it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from matplotlib.figure import Figure  # no pyplot: no backend is chosen for the user

from llmdpd_pl.media import MediaSink
from llmdpd_pl.rollouts import TaskResult
from llmdpd_pl.utils import atomic_write

Swap = Literal["text", "trajectory", "both"]


def prompt_sources(tasks: Sequence[str], source: str, swap: Swap) -> dict[str, tuple[str, str]]:
    """Each env task's (text task, trajectory task) when the ``swap``ped prompts come from ``source``."""
    return {t: (t if swap == "trajectory" else source, t if swap == "text" else source) for t in tasks}


def success_matrix(rows: Sequence[TaskResult], tasks: Sequence[str]) -> list[list[float]]:
    """Success rates [env task][prompt source] from the agent's rows, by their ``prompt_source``."""
    rate = {(r.task, r.prompt_source or r.task): r.success_rate for r in rows if r.policy == "agent"}
    if none := sorted({t for (t, _), v in rate.items() if v is None}):
        raise ValueError(f"prompt_swap: the matrix compares success rates, which {none} do not have")
    return [[float(rate[(t, u)] or 0.0) for u in tasks] for t in tasks]


def heatmap(matrix: Sequence[Sequence[float]], tasks: Sequence[str], swap: Swap, title: str) -> Figure:
    """The matrix as a heatmap, each cell annotated with its success %."""
    n = len(tasks)
    fig = Figure(figsize=(1.2 * n + 3, 1.0 * n + 2))
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), tasks, rotation=45, ha="right")
    ax.set_yticks(range(n), tasks)
    ax.set_xlabel(f"prompt source ({swap} prompt{'s' if swap == 'both' else ''} swapped)")
    ax.set_ylabel("environment task")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{100 * matrix[i][j]:.0f}", ha="center", va="center",
                    color="black" if matrix[i][j] > 0.6 else "white")  # fmt: skip
    fig.colorbar(image, ax=ax, label="success rate")
    fig.tight_layout()
    return fig


def write_matrix(
    rows: Sequence[TaskResult], tasks: Sequence[str], swap: Swap, directory: Path, meta: dict[str, Any]
) -> tuple[Path, Path, Figure]:
    """``prompt_matrix.json`` and ``prompt_matrix.png`` in ``directory``; returns their paths and the figure.

    The JSON holds the matrix (``success[env][source]``), the task order, the swap, every cell's full row
    (episodes, Wilson interval, return) and ``meta``.
    """
    matrix = success_matrix(rows, tasks)
    data = {"meta": meta, "swap": swap, "tasks": list(tasks), "success": matrix,
            "cells": [asdict(r) for r in rows]}  # fmt: skip
    json_path = atomic_write(directory / "prompt_matrix.json", json.dumps(data, indent=2).encode())
    fig = heatmap(matrix, tasks, swap, f"success by prompt source, {meta.get('episodes_per_cell')} episodes")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    return json_path, atomic_write(directory / "prompt_matrix.png", png.getvalue()), fig


def report_matrix(
    rows: Sequence[TaskResult], tasks: Sequence[str], swap: Swap, directory: Path, meta: dict[str, Any],
    sinks: Sequence[MediaSink] = (), step: int = 0,
) -> list[list[float]]:
    """Write the matrix (:func:`write_matrix`), add its figure to the loggers' ``sinks``, print it."""
    json_path, png_path, fig = write_matrix(rows, tasks, swap, directory, meta)
    for sink in sinks:
        sink.figure(f"test/prompt_matrix/{swap}", fig, step)
    matrix = success_matrix(rows, tasks)
    print(f"prompt-sensitivity matrix ({swap} swapped), success %:")
    print(format_matrix(matrix, tasks))
    print(f"prompt matrix: {json_path} {png_path}")
    return matrix


def format_matrix(matrix: Sequence[Sequence[float]], tasks: Sequence[str]) -> str:
    """The matrix as text: rows = environment task, columns = prompt source, success %."""
    width = max(len(t) for t in tasks) + 2
    lines = ["env \\ prompts".ljust(width) + "".join(t[:12].rjust(13) for t in tasks)]
    for task, row in zip(tasks, matrix, strict=True):
        lines.append(task.ljust(width) + "".join(f"{100 * v:12.1f}%" for v in row))
    return "\n".join(lines)
