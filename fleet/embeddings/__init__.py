"""Embeddings: one configured model to store and to search.

(Skeleton: the backends and ``embed_texts`` arrive with the system-of-record work.)
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.settings import Settings


@dataclass(frozen=True)
class ModelSpec:
    """An embedding model as the database records it."""

    name: str
    dimensions: int


LOCAL = ModelSpec("all-MiniLM-L6-v2", 384)
OPENAI = ModelSpec("text-embedding-3-small", 1536)


def model_spec(settings: Settings) -> ModelSpec:
    """The model ``FLEET_EMBEDDINGS`` selects."""
    return OPENAI if settings.fleet_embeddings == "openai" else LOCAL
