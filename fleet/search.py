"""Semantic search over the reference library (course Concepts 8 and 9).

Three rules from the course, enforced here rather than remembered by callers:

* Same model both ends. Before any search the stored rows' models are compared with the
  configured one; a mismatch is a :class:`MixedModelsError` that names both models and the fix
  (``fleet reembed``), never a ranked list of noise.
* Filter by source, so an old chat never poses as policy: ``past_case`` and
  ``policy_library`` are searched apart when the caller says so.
* Cosine distance (``<=>``) over the HNSW index, nearest first, with the distances shown, so a
  weak match is visible as weak (the find-similar-cases skill calls anything above about 0.3
  "no strong prior precedent").
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg
import numpy as np
from pydantic import BaseModel

from fleet.embeddings import ModelSpec, aembed_query, model_spec
from fleet.embeddings.store import SQL
from fleet.errors import FleetError, InvalidInput
from fleet.settings import Settings

#: Sources a caller may filter on (the CLI's --source choices).
SOURCES = ("past_case", "policy_library")
#: Largest result a single search returns (the MCP tool and the CLI cap at this).
MAX_LIMIT = 50
#: HNSW candidates per scan step; at least the limit (see BENCHMARKS.md for the recall it buys).
EF_SEARCH = 64
#: Index candidates taken per wanted result before the exact re-sort (relaxed-order scans).
CANDIDATES_PER_RESULT = 4


class MixedModelsError(FleetError):
    """Stored embeddings come from a model other than the configured one."""


class SearchHit(BaseModel):
    """One chunk of a document, and how far it is from the query (cosine distance, 0..2)."""

    document_id: UUID
    source: str
    title: str
    chunk_index: int
    chunk_text: str
    distance: float
    metadata: dict[str, Any]


async def stored_models(conn: asyncpg.Connection) -> list[str]:
    return [row["model"] for row in await conn.fetch(SQL["embedding_models"])]


async def ensure_model(conn: asyncpg.Connection, spec: ModelSpec) -> None:
    """Refuse to compare vectors across models: raise :class:`MixedModelsError` on a mismatch."""
    others = [model for model in await stored_models(conn) if model != spec.name]
    if not others:
        return
    stored = ", ".join(others)
    raise MixedModelsError(
        f"the stored embeddings were made with {stored} but FLEET_EMBEDDINGS selects "
        f"{spec.name}; distances between two models are meaningless, so search is refused. "
        f"Run `fleet reembed` to re-embed everything with {spec.name} (or switch "
        f"FLEET_EMBEDDINGS back)"
    )


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInput("limit must be a positive integer")
    return min(limit, MAX_LIMIT)


async def search_vector(
    conn: asyncpg.Connection,
    vector: np.ndarray | list[float],
    *,
    source: str | None = None,
    limit: int = 5,
    ef_search: int = EF_SEARCH,
) -> list[asyncpg.Record]:
    """The ranked rows for an already embedded query (the model check is the caller's)."""
    limit = check_limit(limit)
    candidates = max(CANDIDATES_PER_RESULT * limit, 20)
    async with conn.transaction():
        await conn.execute(SQL["search_settings"], str(max(ef_search, candidates)))
        return await conn.fetch(SQL["search_chunks"], vector, source, limit, candidates)


async def search(
    conn: asyncpg.Connection,
    text: str,
    settings: Settings,
    *,
    source: str | None = None,
    limit: int = 5,
) -> list[SearchHit]:
    """Embed ``text`` with the configured model and return the nearest chunks, nearest first.

    ``conn`` must have pgvector registered (``connect(..., vector=True)``). A ``limit`` over
    :data:`MAX_LIMIT` is refused (the MCP tool, asked by a model, caps it instead).
    """
    if not text or not text.strip():
        raise InvalidInput("the search text is empty")
    if source is not None and source not in SOURCES:
        raise InvalidInput(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
    if check_limit(limit) < limit:  # asked by a person (the CLI): say so, not return fewer
        raise InvalidInput(f"limit is {limit}, but one search returns at most {MAX_LIMIT}")
    await ensure_model(conn, model_spec(settings))
    vector = await aembed_query(text, settings)
    rows = await search_vector(conn, vector, source=source, limit=limit)
    return [SearchHit(**dict(row)) for row in rows]
