"""Embeddings: one configured model to store and to search (course Concepts 8 and 9).

``FLEET_EMBEDDINGS`` picks the model; the same one embeds what is stored and what is searched,
because two models are two maps drawn to different scales and their distances are noise.
Every stored row records its model name, and :mod:`fleet.search` refuses to compare across
models (``fleet reembed`` is the fix).

* :func:`embed_texts` (the contract): texts in, unit vectors out, in batches.
* :func:`aembed` for async callers: the model runs in a worker thread, off the event loop.
* :func:`aembed_query` for one text (a search's query): concurrent queries share forward passes.
* :func:`chunk_document`: long documents split at headings and paragraphs, with overlap.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field

import numpy as np

from fleet.embeddings.backends import (
    OFFLINE_ENV,
    Embedder,
    EmbeddingError,
    local_embedder,
    openai_embedder,
)
from fleet.embeddings.chunking import ChunkPolicy, chunk_text
from fleet.errors import ConfigurationError, InvalidInput
from fleet.settings import Settings, get_settings

__all__ = [
    "LOCAL",
    "OFFLINE_ENV",
    "OPENAI",
    "ChunkPolicy",
    "EmbeddingError",
    "ModelSpec",
    "aembed",
    "aembed_query",
    "chunk_document",
    "chunk_text",
    "embed_array",
    "embed_texts",
    "embedder",
    "model_spec",
    "prepare_for_queries",
]


@dataclass(frozen=True)
class ModelSpec:
    """An embedding model as the database records it, and how long its chunks may be."""

    name: str
    dimensions: int
    chunking: ChunkPolicy = field(default_factory=ChunkPolicy)


#: all-MiniLM-L6-v2 reads at most 256 word pieces (about 180 English words); longer text is
#: silently truncated, so its chunks stay well under that.
LOCAL = ModelSpec("all-MiniLM-L6-v2", 384, ChunkPolicy(max_words=160, overlap_words=30))
#: text-embedding-3-small reads 8k tokens, but a chunk that large "matches everything weakly".
OPENAI = ModelSpec("text-embedding-3-small", 1536, ChunkPolicy(max_words=300, overlap_words=50))


def model_spec(settings: Settings) -> ModelSpec:
    """The model ``FLEET_EMBEDDINGS`` selects."""
    return OPENAI if settings.fleet_embeddings == "openai" else LOCAL


def embedder(settings: Settings | None = None) -> Embedder:
    """The configured backend, loaded once per process."""
    settings = settings or get_settings()
    if settings.fleet_embeddings == "openai":
        if settings.openai_api_key is None:
            raise ConfigurationError(
                "FLEET_EMBEDDINGS=openai needs OPENAI_API_KEY; set it, or use "
                "FLEET_EMBEDDINGS=local (all-MiniLM-L6-v2, offline)"
            )
        return openai_embedder(settings.openai_api_key.get_secret_value(), settings.openai_base_url)
    return local_embedder()


def _check(texts: list[str]) -> None:
    if isinstance(texts, str):
        raise TypeError("embed_texts takes a list of strings, not one string")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInput(
                f"text #{index} to embed is of type {type(text).__name__}, not a string"
            )
        if not text.strip():
            raise InvalidInput(f"text #{index} to embed is empty")


def embed_array(texts: list[str], settings: Settings | None = None) -> np.ndarray:
    """Embed ``texts`` with the configured model: a ``(len(texts), dimensions)`` float32 array."""
    _check(texts)
    settings = settings or get_settings()
    if not texts:
        return np.zeros((0, model_spec(settings).dimensions), dtype=np.float32)
    return embedder(settings).embed(list(texts), settings.fleet_embedding_batch_size)


def embed_texts(texts: list[str], settings: Settings | None = None) -> list[list[float]]:
    """Embed ``texts`` with the configured backend (the same one used to store and to search).

    Returns one unit-length vector per text, in order. Batched by ``FLEET_EMBEDDING_BATCH_SIZE``.
    """
    return embed_array(texts, settings).tolist()


async def aembed(texts: list[str], settings: Settings | None = None) -> np.ndarray:
    """:func:`embed_array` in a worker thread, for code running on an event loop."""
    return await asyncio.to_thread(embed_array, texts, settings)


def prepare_for_queries(settings: Settings | None = None) -> None:
    """For a process that embeds search queries all day (the customer-data server): the local
    model's forward pass traced for a few texts at a time (``LocalEmbedder.trace_for_queries``).
    Nothing to do for the API backend."""
    if (settings or get_settings()).fleet_embeddings == "local":
        local_embedder().trace_for_queries()


async def aembed_query(text: str, settings: Settings | None = None) -> np.ndarray:
    """One text's vector, for a search. Queries that arrive while the model is busy with
    earlier ones wait and then go through it together, as one batch: on a CPU, through the
    traced model, a batch of 8 short texts costs ~6 ms a text against ~10 ms one at a time
    (BENCHMARKS.md), and alone a query goes straight through (no added wait). The vectors
    are the model's either way (a padded batch gives a text the same vector to ~1e-7;
    ``tests/test_embeddings.py``)."""
    _check([text])
    settings = settings or get_settings()
    loop = asyncio.get_running_loop()
    batcher = _QUERY_BATCHERS.get(loop)
    if batcher is None or batcher.settings is not settings:
        batcher = _QUERY_BATCHERS[loop] = _QueryBatcher(settings)
    return await batcher.embed(text)


class _QueryBatcher:
    """Opportunistic batching of one event loop's concurrent query embeddings."""

    #: Texts per forward pass at most (the gain levels off beyond; a batch's latency does not).
    max_batch = 16

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._waiting: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._runner: asyncio.Task[None] | None = None  # a reference keeps it alive

    async def embed(self, text: str) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiting.append((text, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="embed-queries")
        return await future

    async def _run(self) -> None:
        while self._waiting:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            texts = [text for text, _ in batch]
            try:
                vectors = await aembed(texts, self.settings)
            except asyncio.CancelledError:  # the loop is going away: nobody is left hanging
                for _, future in batch + self._waiting:
                    future.cancel()
                raise
            except Exception as exc:  # every waiter of this batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), vector in zip(batch, vectors, strict=True):
                if not future.done():  # a caller that gave up (timeout) is skipped
                    future.set_result(vector)


_QUERY_BATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _QueryBatcher] = (
    weakref.WeakKeyDictionary()
)


def chunk_document(text: str, settings: Settings | None = None) -> list[str]:
    """Chunks of a long document sized for the configured model; short text stays whole."""
    return chunk_text(text, model_spec(settings or get_settings()).chunking)
