"""Shared fixtures.

Data pipeline: one tiny Meta-World collection per session (seen ``reach`` and ``push``, unseen
``box-close``; 2 expert + 1 random training episodes and 2 prompt episodes of 60 steps per task), and a
tiny random-weight Llama with a locally trained tokenizer for the decoder-LLM path. Tests that damage a
dataset work on a copy (``dataset_copy``), never on the shared collection.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from llmdpd_pl.data.collect import collect
from llmdpd_pl.data.spec import DatasetSpec, QualityLevel, SACRecipe

SEEN_TASKS: tuple[str, ...] = ("reach", "push")
UNSEEN_TASKS: tuple[str, ...] = ("box-close",)
EPISODE_STEPS = 60  # short episodes: every one ends in a time-limit truncation


def tiny_levels() -> dict[str, QualityLevel]:
    """Two quality levels, 3 training episodes per task (expert first, then random)."""
    return {"expert": QualityLevel(2, noise_std=0.1), "random": QualityLevel(1, random_prob=1.0)}


@dataclass(frozen=True)
class Collected:
    """The session's collected datasets and the summary rows ``collect`` returned."""

    spec: DatasetSpec
    rows: list[dict[str, Any]]


@pytest.fixture(scope="session")
def collected(tmp_path_factory: pytest.TempPathFactory) -> Collected:
    """Collect once per session, with 2 worker processes (the parallel path of ``collect``)."""
    spec = DatasetSpec(
        root=str(tmp_path_factory.mktemp("minari")),
        levels=tiny_levels(),
        prompt_episodes=2,
        max_episode_steps=EPISODE_STEPS,
        workers=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Minari's author_email / eval_env advice
        rows = collect(spec, SEEN_TASKS, SEEN_TASKS + UNSEEN_TASKS, progress=False)
    return Collected(spec, rows)


#: The tiny locomotion collection: Hopper-v5, 300 SAC steps in 40-step episodes, 2 prompt episodes.
LOCOMOTION_TASK = "Hopper-v5"


@pytest.fixture(scope="session")
def sac_collected(tmp_path_factory: pytest.TempPathFactory) -> Collected:
    """One tiny medium-replay collection per session, through ``collect`` (the SAC path)."""
    spec = DatasetSpec(
        root=str(tmp_path_factory.mktemp("sac")),
        prompt_episodes=2,
        sac=SACRecipe(max_steps=300, learning_starts=100, eval_every=150, eval_episodes=1,
                      max_episode_steps=40),
    )
    return Collected(spec, collect(spec, [LOCOMOTION_TASK], [LOCOMOTION_TASK], progress=False))


@pytest.fixture
def dataset_copy(collected: Collected, tmp_path: Path) -> DatasetSpec:
    """The session's spec pointing at a private copy of its datasets, free to damage."""
    root = tmp_path / "minari"
    shutil.copytree(collected.spec.root, root)
    return dataclasses.replace(collected.spec, root=str(root))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random Llama and a WordLevel tokenizer trained on the 50 prompts, saved locally.

    The tokenizer pads on the right, like Llama's, so pooling must use the attention mask.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    from llmdpd_pl.data.prompts import load_prompts, render_prompt

    texts = [render_prompt(p) for p in load_prompts().values()]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Tiny matmuls on 2 shared cores run ~8x slower with 2 intra-op threads; tests use one."""
    torch.set_num_threads(1)
