"""Structured text prompts (paper Figure 1: Task / Objective / Constraints) for the 50 Meta-World tasks
and the three MuJoCo locomotion envs of D4RL (``HalfCheetah-v5``, ``Hopper-v5``, ``Walker2d-v5``: the
robot, its state and action, the reward, the initial state and the termination, as the paper's §4.2).

The texts live in ``prompts.json`` next to this file, written for this project; the hidden-goal regions'
texts come from one template (:func:`llmdpd_pl.hidden_goal.text_prompt`). A config can override
a task's prompt or add prompts for new tasks through ``PromptedOfflineDataModule(prompts=...)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

from llmdpd_pl import hidden_goal
from llmdpd_pl.errors import ConfigError

DEFAULT_INSTRUCTION = "Convert the following task description into a structured policy representation."


@dataclass(frozen=True)
class TextPrompt:
    """One task's structured description."""

    task: str
    objective: str
    constraints: str

    def render(self) -> str:
        """The text the LLM reads (after the instruction)."""
        return f"Task: {self.task}\nObjective: {self.objective}\nConstraints: {self.constraints}"


def _parse(name: str, entry: object, field: str) -> TextPrompt:
    key = f"{field}.{name}"
    if not isinstance(entry, Mapping):
        raise ConfigError(key, "expected a mapping with task/objective/constraints", entry)
    missing = [k for k in ("task", "objective", "constraints") if not str(entry.get(k, "")).strip()]
    if missing:
        raise ConfigError(key, f"missing or empty keys {missing}", dict(entry))
    extra = sorted(set(entry) - {"task", "objective", "constraints"})
    if extra:
        raise ConfigError(key, f"unknown keys {extra}; allowed: task, objective, constraints", dict(entry))
    return TextPrompt(str(entry["task"]), str(entry["objective"]), str(entry["constraints"]))


def load_prompts(overrides: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, TextPrompt]:
    """The packaged prompts, with ``overrides`` (task name → fields) replacing or adding entries."""
    raw = json.loads(resources.files(__package__).joinpath("prompts.json").read_text())
    raw |= {task: hidden_goal.text_prompt(task) for task in hidden_goal.TASKS}
    prompts = {name: _parse(name, entry, "prompts.json") for name, entry in raw.items()}
    for name, entry in (overrides or {}).items():
        prompts[name] = _parse(name, entry, "data.prompts")
    return prompts


def render_prompt(prompt: TextPrompt, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """Instruction + structured prompt: the exact LLM input (paper §3.1.1)."""
    return f"{instruction}\n\n{prompt.render()}" if instruction else prompt.render()
