"""Tests for llmdpd_pl.data.prompts: the packaged texts for the 50 tasks, rendering, config overrides."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest

from llmdpd_pl import hidden_goal
from llmdpd_pl.data.datamodule import PromptedOfflineDataModule
from llmdpd_pl.data.prompts import DEFAULT_INSTRUCTION, TextPrompt, load_prompts, render_prompt
from llmdpd_pl.envs import METAWORLD_TASKS

NEW_REACH = {"task": "Reach far", "objective": "Touch the far wall.", "constraints": "Stay above the table."}


def test_packaged_prompts_cover_exactly_the_50_tasks_d4rls_three_envs_and_the_hidden_goal_regions() -> None:
    tasks = [*METAWORLD_TASKS, "HalfCheetah-v5", "Hopper-v5", "Walker2d-v5"]
    raw = json.loads(resources.files("llmdpd_pl.data").joinpath("prompts.json").read_text())
    assert sorted(raw) == sorted(tasks)  # the file itself, before any parsing; the regions are templated
    prompts = load_prompts()
    assert set(prompts) == set(tasks) | set(hidden_goal.TASKS)
    for name, prompt in prompts.items():
        for field in ("task", "objective", "constraints"):
            assert getattr(prompt, field).strip(), f"{name}.{field} is empty"


def test_rendered_prompts_are_all_distinct() -> None:
    prompts = load_prompts()
    rendered = [render_prompt(p) for p in prompts.values()]
    assert len(rendered) == 65 and len(set(rendered)) == 65  # 50 Meta-World tasks, 3 locomotion, 12 regions
    # Each objective alone distinguishes the tasks too, so no two tasks share a description; the regions
    # share one task name ("Reach a hidden goal"), so that only their region words differ.
    assert len({p.task for p in prompts.values()}) == 54
    assert len({p.objective for p in prompts.values()}) == 65


def test_hidden_goal_texts_differ_only_in_their_region_words() -> None:
    prompts = load_prompts()
    words = {w for ws in hidden_goal.WORDS.values() for w in ws}
    masked = set()
    for task in hidden_goal.TASKS:
        text = render_prompt(prompts[task])
        for w in hidden_goal.WORDS[task]:
            assert f" {w} " in text, (task, w)
        masked.add(" ".join("*" if t.strip(".,") in words else t for t in text.split()))
    assert len(masked) == 1  # one template


def test_door_lock_and_door_unlock_differ() -> None:
    prompts = load_prompts()
    lock, unlock = prompts["door-lock"], prompts["door-unlock"]
    assert lock.task != unlock.task
    assert lock.objective != unlock.objective
    assert lock.constraints != unlock.constraints


def test_render_format_is_pinned() -> None:
    prompt = TextPrompt("Reach", "Touch the goal.", "Move smoothly.")
    body = "Task: Reach\nObjective: Touch the goal.\nConstraints: Move smoothly."
    assert prompt.render() == body
    assert render_prompt(prompt) == f"{DEFAULT_INSTRUCTION}\n\n{body}"
    assert render_prompt(prompt, "Describe:") == f"Describe:\n\n{body}"
    assert render_prompt(prompt, "") == body


def test_overrides_replace_and_add() -> None:
    extra = {"task": "Wave", "objective": "Wave at the camera.", "constraints": "Do not hit anything."}
    prompts = load_prompts({"reach": NEW_REACH, "my-wave": extra})
    assert prompts["reach"] == TextPrompt(**NEW_REACH)
    assert prompts["my-wave"] == TextPrompt(**extra)
    assert len(prompts) == len(load_prompts()) + 1
    default = load_prompts()
    assert prompts["push"] == default["push"]  # untouched tasks keep the packaged text
    assert default["reach"] != TextPrompt(**NEW_REACH)  # overrides never leak into later loads


@pytest.mark.parametrize(
    ("entry", "detail"),
    [
        ({"task": "Reach", "objective": "Touch it."}, "missing or empty keys \\['constraints'\\]"),
        ({"task": "Reach", "objective": " ", "constraints": "None."}, "objective"),
        ({"task": "R", "objective": "O", "constraints": "C", "colour": "red"}, "unknown keys \\['colour'\\]"),
        ("Reach the goal.", "expected a mapping"),
    ],
    ids=["missing-key", "blank-value", "unknown-key", "not-a-mapping"],
)
def test_bad_override_names_the_config_field(entry: object, detail: str) -> None:
    with pytest.raises(ValueError, match=r"data\.prompts\.reach: ") as err:
        load_prompts({"reach": entry})  # type: ignore[dict-item]
    assert re.search(detail, str(err.value)), str(err.value)


def test_datamodule_feeds_overrides_to_the_llm_input() -> None:
    dm = PromptedOfflineDataModule(["reach"], ["box-close"], prompts={"reach": NEW_REACH})
    texts = dm.prompt_texts()
    assert list(texts) == ["reach", "box-close"]
    assert texts["reach"] == render_prompt(TextPrompt(**NEW_REACH), dm.llm.instruction)
    assert texts["box-close"] == render_prompt(load_prompts()["box-close"], dm.llm.instruction)


def test_datamodule_rejects_a_bad_override() -> None:
    with pytest.raises(ValueError, match=r"data\.prompts"):
        PromptedOfflineDataModule(["reach"], [], prompts={"reach": {"task": "Reach"}})


def test_the_shipped_paraphrases_reword_the_papers_six_tasks_and_ml45s_test_tasks() -> None:
    import yaml

    config = Path(__file__).resolve().parents[2] / "configs" / "prompts" / "paraphrases.yaml"
    overrides = yaml.safe_load(config.read_text())["data"]["prompts"]
    paper = ["sweep-into", "coffee-push", "disassemble", "box-close", "hand-insert", "bin-picking"]
    ml45_test = ["bin-picking", "box-close", "door-lock", "door-unlock", "hand-insert"]
    assert sorted(overrides) == sorted(set(paper) | set(ml45_test))
    reworded, packaged = load_prompts(overrides), load_prompts()
    for task in overrides:
        for part in ("task", "objective", "constraints"):
            assert getattr(reworded[task], part) != getattr(packaged[task], part), (task, part)
