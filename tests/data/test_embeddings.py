"""Tests for llmdpd_pl.data.embeddings: masked mean pooling, the encoder and decoder LLM paths, the cache.

Real models only: the bundled all-MiniLM-L6-v2 (``LLMSpec()``) and a tiny random-weight Llama saved
locally (``tiny_llama_dir``), whose tokenizer pads on the right like Llama's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import threading
from pathlib import Path

import pytest
import torch

from llmdpd_pl.data.embeddings import (
    EmbeddingCache,
    EmbedStats,
    LLMSpec,
    TextEncoder,
    embed_dim,
    embed_texts,
    mean_pool,
    resolve_model_path,
    weights_fingerprint,
)
from llmdpd_pl.data.prompts import load_prompts, render_prompt

PROMPTS = load_prompts()
TEXTS = {name: render_prompt(PROMPTS[name]) for name in ("reach", "push", "door-lock", "door-unlock")}
# Two prompts back to back: over twice the tokens of one, so the short text gets padded in a batch.
LONG_TEXT = "\n".join(render_prompt(PROMPTS[n]) for n in ("pick-place", "assembly"))
# Same input, same shapes, same CPU kernels; the margin covers thread-count-dependent reduction order.
RECOMPUTE_TOL = 1e-6
# Padding changes the shapes, hence the float32 summation order of the matmuls.
PADDING_TOL = 1e-5


@pytest.fixture
def llama(tiny_llama_dir: Path) -> LLMSpec:
    return LLMSpec(model=str(tiny_llama_dir))


def _only_entry(cache_dir: Path) -> Path:
    (entry,) = cache_dir.glob("*.pt")
    return entry


# ----------------------------------------------------------------------------------------------- pooling
def test_mean_pool_pinned() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = torch.tensor([[2.0, 3.0], [7.0, 8.0]])
    torch.testing.assert_close(mean_pool(hidden, mask), expected, rtol=0, atol=0)


def test_mean_pool_empty_mask_gives_zeros_not_nan() -> None:
    out = mean_pool(torch.ones(1, 3, 2), torch.zeros(1, 3, dtype=torch.long))
    torch.testing.assert_close(out, torch.zeros(1, 2), rtol=0, atol=0)


def test_mean_pool_returns_float32_from_half_states() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.bfloat16)
    out = mean_pool(hidden, torch.ones(1, 2))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.0]]), rtol=0, atol=0)


@pytest.mark.parametrize("model", ["minilm", "tiny-llama"])
def test_padding_does_not_change_the_embedding(model: str, request: pytest.FixtureRequest) -> None:
    spec = LLMSpec() if model == "minilm" else LLMSpec(model=str(request.getfixturevalue("tiny_llama_dir")))
    encoder = TextEncoder(spec)
    short = TEXTS["reach"]
    n_short, n_long = (len(encoder.tokenizer(t)["input_ids"]) for t in (short, LONG_TEXT))
    assert n_long > n_short + 50  # the short text really gets padded in the batch
    alone = encoder.encode([short])[0]
    first, _ = encoder.encode([short, LONG_TEXT])
    _, last = encoder.encode([LONG_TEXT, short])
    torch.testing.assert_close(first, alone, rtol=0, atol=PADDING_TOL)
    torch.testing.assert_close(last, alone, rtol=0, atol=PADDING_TOL)
    # The mask matters: a plain mean over the padded positions gives another vector.
    tokens = encoder.tokenizer([short, LONG_TEXT], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder.model(**tokens).last_hidden_state
    assert (hidden[0].mean(0) - alone).abs().max() > 100 * PADDING_TOL


# ----------------------------------------------------------------------------------------------- models
def test_minilm_is_the_offline_default() -> None:
    spec = LLMSpec()
    assert spec.model == "minilm"
    assert (resolve_model_path(spec.model) / "config.json").is_file()
    assert embed_dim(spec) == 384


def test_tiny_llama_decoder_path(llama: LLMSpec, tmp_path: Path) -> None:
    assert embed_dim(llama) == 64
    encoder = TextEncoder(llama)
    assert encoder.tokenizer.padding_side == "right"  # the case where pooling must use the mask
    assert type(encoder.model).__name__ == "LlamaModel"
    vecs, stats = embed_texts(TEXTS, llama, tmp_path)
    assert list(vecs) == list(TEXTS)
    assert stats == EmbedStats(hits=0, misses=4, forward_passes=1)  # batch_size 16: one batch
    stacked = torch.stack(list(vecs.values()))
    assert stacked.shape == (4, 64) and stacked.dtype == torch.float32
    assert torch.isfinite(stacked).all()
    assert torch.cdist(stacked, stacked).triu(1)[torch.ones(4, 4).triu(1).bool()].min() > 1e-3  # distinct


def test_encoder_batches_by_batch_size(llama: LLMSpec) -> None:
    encoder = TextEncoder(dataclasses.replace(llama, batch_size=3))
    before = TextEncoder.total_forward_passes
    out = encoder.encode(list(TEXTS.values()) * 2)  # 8 texts in batches of 3
    assert out.shape == (8, 64)
    assert encoder.forward_passes == 3
    assert TextEncoder.total_forward_passes - before == 3
    torch.testing.assert_close(out[:4], out[4:], rtol=0, atol=PADDING_TOL)  # other batch, other padding


def test_encoder_runs_at_full_float32_precision_and_restores_the_setting(llama: LLMSpec) -> None:
    """Cached vectors must not depend on ``--float32_matmul_precision`` (TF32 on GPUs)."""
    encoder = TextEncoder(llama)
    seen: list[str] = []
    encoder.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_float32_matmul_precision()))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        encoder.encode(list(TEXTS.values()))
        assert seen == ["highest"]
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


# ----------------------------------------------------------------------------------------------- cache
def test_cache_hit_runs_no_llm_and_returns_the_same_vector(tmp_path: Path) -> None:
    spec = LLMSpec()
    first, stats = embed_texts(TEXTS, spec, tmp_path)
    assert stats.misses == 4 and stats.hits == 0 and stats.forward_passes > 0
    assert {v.shape for v in first.values()} == {torch.Size([384])}
    before = TextEncoder.total_forward_passes
    second, stats = embed_texts(TEXTS, spec, tmp_path)
    assert stats == EmbedStats(hits=4, misses=0, forward_passes=0)
    assert TextEncoder.total_forward_passes == before  # no LLM forward pass
    for name in TEXTS:
        assert torch.equal(first[name], second[name])


def test_cache_hit_loads_no_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A warm cache needs the weights' fingerprint only: with the tokenizer deleted, so that any attempt to
    load the LLM fails, every hit is still served."""
    model_dir = tmp_path / "llm"
    shutil.copytree(tiny_llama_dir, model_dir)
    spec = LLMSpec(model=str(model_dir))
    first, _ = embed_texts(TEXTS, spec, tmp_path / "cache")
    tokenizer_files = [p for p in model_dir.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
    assert tokenizer_files
    for p in tokenizer_files:  # not part of the fingerprint: the cache keys stay the same
        p.unlink()
    with pytest.raises(ValueError):  # the control: this LLM cannot be loaded
        embed_texts(TEXTS, spec, tmp_path / "cold")
    second, stats = embed_texts(TEXTS, spec, tmp_path / "cache")
    assert stats == EmbedStats(hits=4, misses=0, forward_passes=0)
    for name in TEXTS:
        assert torch.equal(first[name], second[name])


def test_partial_hit_embeds_only_the_missing_texts(llama: LLMSpec, tmp_path: Path) -> None:
    embed_texts({"reach": TEXTS["reach"]}, llama, tmp_path)
    vecs, stats = embed_texts(TEXTS, llama, tmp_path)
    assert stats.hits == 1 and stats.misses == 3 and stats.forward_passes == 1
    assert list(vecs) == list(TEXTS)  # order of the request, not of hits then misses


def test_cache_key_covers_everything_that_changes_the_vector() -> None:
    cache, spec, fp, text = EmbeddingCache("unused"), LLMSpec(), "f" * 64, TEXTS["reach"]
    base = cache.key(spec, fp, text)
    assert len(base) == 64 and base == cache.key(LLMSpec(), fp, text)  # deterministic
    changed = [
        cache.key(dataclasses.replace(spec, instruction="Other."), fp, text),
        cache.key(dataclasses.replace(spec, max_length=256), fp, text),
        cache.key(dataclasses.replace(spec, dtype="bfloat16"), fp, text),
        cache.key(dataclasses.replace(spec, model="/some/other/model"), fp, text),
        cache.key(spec, "0" * 64, text),
        cache.key(spec, fp, text + " "),
    ]
    assert len({base, *changed}) == 1 + len(changed)
    # Neither batching nor the device changes the vector: they must not split the cache.
    assert cache.key(dataclasses.replace(spec, batch_size=1, device="cuda"), fp, text) == base


@pytest.mark.parametrize(
    "change",
    [{"instruction": "Describe the task."}, {"max_length": 64}, {"dtype": "bfloat16"}],
    ids=["instruction", "max_length", "dtype"],
)
def test_changed_spec_recomputes(llama: LLMSpec, tmp_path: Path, change: dict) -> None:
    embed_texts(TEXTS, llama, tmp_path)
    vecs, stats = embed_texts(TEXTS, dataclasses.replace(llama, **change), tmp_path)
    assert stats.misses == 4 and stats.hits == 0 and stats.forward_passes > 0
    assert len(list(tmp_path.glob("*.pt"))) == 8  # the old entries stay valid for the old spec
    assert all(torch.isfinite(v).all() for v in vecs.values())
    _, stats = embed_texts(TEXTS, llama, tmp_path)
    assert stats.hits == 4


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00not a torch file\xff" * 64)


def _edit(**updates):
    """Rewrite the entry as a valid pickle with some fields changed (sha256 recomputed if asked)."""

    def corrupt(path: Path) -> None:
        entry = torch.load(path, weights_only=True)
        for key, fn in updates.items():
            entry[key] = fn(entry)
        torch.save(entry, path)

    return corrupt


def _flip_value(entry: dict) -> torch.Tensor:
    vec = entry["embedding"].clone()
    vec[3] += 0.5
    return vec


def _nan_value(entry: dict) -> torch.Tensor:
    vec = entry["embedding"].clone()
    vec[0] = float("nan")
    return vec


def _sha(vec: torch.Tensor) -> str:
    return hashlib.sha256(vec.numpy().tobytes()).hexdigest()


CORRUPTIONS = {
    "truncated": _truncate,
    "garbage": _garbage,
    "flipped-value-stale-sha": _edit(embedding=_flip_value),
    "wrong-key": _edit(key=lambda e: "0" * 64),
    "nan-with-matching-sha": _edit(embedding=_nan_value, sha256=lambda e: _sha(_nan_value(e))),
    "float64-with-matching-sha": _edit(
        embedding=lambda e: e["embedding"].double(), sha256=lambda e: _sha(e["embedding"].double())
    ),
    "batched-shape-with-matching-sha": _edit(
        embedding=lambda e: e["embedding"][None], sha256=lambda e: _sha(e["embedding"][None])
    ),
    "not-a-dict": lambda p: torch.save(torch.zeros(64), p),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
# The not-a-dict case indexes a tensor with a string before failing, which torch warns about.
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")
def test_corrupt_entry_is_detected_and_recomputed(
    llama: LLMSpec, tmp_path: Path, corrupt, caplog: pytest.LogCaptureFixture
) -> None:
    texts = {"reach": TEXTS["reach"]}
    original, _ = embed_texts(texts, llama, tmp_path)
    entry = _only_entry(tmp_path)
    corrupt(entry)
    with caplog.at_level(logging.WARNING, logger="llmdpd_pl.data.embeddings"):
        recomputed, stats = embed_texts(texts, llama, tmp_path)
    assert stats == EmbedStats(hits=0, misses=1, forward_passes=1)
    assert "recomputing" in caplog.text and entry.name in caplog.text
    torch.testing.assert_close(recomputed["reach"], original["reach"], rtol=0, atol=RECOMPUTE_TOL)
    # The entry was rewritten and is a hit again.
    again, stats = embed_texts(texts, llama, tmp_path)
    assert stats.hits == 1 and torch.equal(again["reach"], recomputed["reach"])


def test_entry_holds_key_vector_and_checksum(llama: LLMSpec, tmp_path: Path) -> None:
    vecs, _ = embed_texts({"reach": TEXTS["reach"]}, llama, tmp_path)
    path = _only_entry(tmp_path)
    entry = torch.load(path, weights_only=True)
    assert path.name == f"{entry['key']}.pt"
    assert torch.equal(entry["embedding"], vecs["reach"])
    assert entry["sha256"] == _sha(vecs["reach"])
    assert entry["meta"] == {"name": "reach", "model": llama.model}


def test_saves_are_atomic_and_leave_no_temporary_files(llama: LLMSpec, tmp_path: Path) -> None:
    embed_texts(TEXTS, llama, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 4 and all(n.endswith(".pt") and len(n) == 64 + 3 for n in names)
    cache = EmbeddingCache(tmp_path)
    key = "a" * 64
    with pytest.raises(TypeError, match="pickle"):  # a lock cannot be pickled: torch.save fails half-way
        cache.save(key, torch.ones(64), {"name": threading.Lock()})  # type: ignore[dict-item]
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no .tmp, no half-written entry
    cache.save(key, torch.ones(64), {"name": "x"})
    cache.save(key, torch.full((64,), 2.0), {"name": "x"})  # replaces in place
    assert torch.equal(cache.load(key), torch.full((64,), 2.0))
    assert not list(tmp_path.glob("*.tmp"))


def test_fingerprint_differs_between_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(1)
    LlamaModel(LlamaConfig.from_pretrained(tiny_llama_dir)).save_pretrained(tmp_path)
    assert weights_fingerprint(tmp_path) != weights_fingerprint(tiny_llama_dir)


def test_weights_replaced_in_place_invalidate_the_cache(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The key hashes a fingerprint of the weights, so re-saving other weights to the same folder
    (e.g. after fine-tuning) must not serve the old vectors, also within one process."""
    import shutil

    from transformers import LlamaConfig, LlamaModel

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    spec = LLMSpec(model=str(model_dir))
    texts = {"reach": TEXTS["reach"]}
    before, _ = embed_texts(texts, spec, tmp_path / "cache")
    torch.manual_seed(2)
    LlamaModel(LlamaConfig.from_pretrained(model_dir)).save_pretrained(model_dir)
    after, stats = embed_texts(texts, spec, tmp_path / "cache")
    assert stats.misses == 1 and stats.forward_passes == 1
    assert not torch.allclose(before["reach"], after["reach"])


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dtype": "float64"}, "data.llm.dtype"),
        ({"pooling": "max"}, "data.llm.pooling"),
        ({"max_length": 4}, "data.llm.max_length"),
        ({"batch_size": 0}, "data.llm.batch_size"),
    ],
)
def test_bad_llm_spec_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        LLMSpec(**kwargs)


@pytest.mark.parametrize("model", ["/nonexistent/llmdpd-test/model", "llmdpd-test-org/no-such-model"])
def test_unknown_model_names_the_field(model: str, tmp_path: Path) -> None:
    spec = LLMSpec(model=model)
    with pytest.raises(ValueError, match=r"data\.llm\.model.*neither a local folder"):
        resolve_model_path(model)
    with pytest.raises(ValueError, match=r"data\.llm\.model"):
        embed_texts({"reach": TEXTS["reach"]}, spec, tmp_path)
    with pytest.raises(ValueError, match=r"data\.llm\.model"):
        embed_dim(spec)
    assert not list(tmp_path.iterdir())


def test_folder_without_weights_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"data\.llm\.model: no weight files"):
        embed_texts({"reach": TEXTS["reach"]}, LLMSpec(model=str(tmp_path)), tmp_path / "cache")


def test_the_same_weights_under_another_path_are_the_same_llm() -> None:
    from llmdpd_pl.data.embeddings import check_same_llm

    trained = {"model": "minilm", "weights": "ab" * 32, "instruction": "x", "dtype": "float32"}
    check_same_llm(trained, {**trained, "model": "/models/all-MiniLM-L6-v2"})  # no error
    with pytest.raises(ValueError, match=r"data\.llm\.model: its weights differ"):
        check_same_llm(trained, {**trained, "weights": "cd" * 32})  # the same name, other weights
    with pytest.raises(ValueError, match=r"data\.llm\.model: .*'minilm';.*\(got '/models/other'\)"):
        check_same_llm(trained, {**trained, "model": "/models/other", "weights": "cd" * 32})
    with pytest.raises(ValueError, match=r"data\.llm\.dtype: the checkpoint's text head was trained with"):
        check_same_llm(trained, {**trained, "dtype": "bfloat16"})
