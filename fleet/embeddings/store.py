"""Writing embeddings: chunk, embed in batches, store with the model's name (Concept 9).

* :func:`embed_pending` embeds every document that has no chunks yet (``fleet seed``).
* :func:`reembed` moves the whole library to the configured model (``fleet reembed``):
  documents whose chunks came from another model are rechunked and re-embedded a batch at a
  time, each batch in its own transaction, so an interrupted run resumes where it stopped and
  a document never holds chunks from two models. When the new model has another width, the
  column is first made unconstrained (and its HNSW index dropped), then narrowed to the new
  width and re-indexed once every row is converted; every step checks the catalog first, so a
  second run after a crash picks up at whichever step was interrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import asyncpg
import numpy as np
from pydantic import BaseModel

from fleet.embeddings import ModelSpec, aembed, chunk_document, model_spec
from fleet.settings import Settings
from fleet.sql import load

log = logging.getLogger(__name__)

SQL = load(Path(__file__).with_name("library.sql"))

#: Sources whose documents are embedded whole, never chunked: a resolved ticket is one case.
UNCHUNKED_SOURCES = frozenset({"past_case"})


class ReembedReport(BaseModel):
    model: str
    dimensions: int
    documents: int = 0
    chunks: int = 0
    conversation_chunks: int = 0
    column_changed: bool = False


def chunks_for(source: str, body: str, settings: Settings) -> list[str]:
    """How a document is split before embedding: past cases whole, the rest by chunk policy."""
    if source in UNCHUNKED_SOURCES:
        return [body.strip()]
    return chunk_document(body, settings)


async def column_dimensions(conn: asyncpg.Connection) -> int | None:
    return await conn.fetchval(SQL["embedding_column_dimensions"])


async def _embed_documents(
    conn: asyncpg.Connection, settings: Settings, spec: ModelSpec, rows: list[asyncpg.Record]
) -> int:
    """Replace the chunks of ``rows`` with fresh ones from ``spec``; one transaction."""
    pieces: list[tuple[UUID, int, str]] = []
    for row in rows:
        for index, text in enumerate(chunks_for(row["source"], row["body"], settings)):
            pieces.append((row["id"], index, text))
    vectors = await aembed([text for _, _, text in pieces], settings) if pieces else np.zeros(0)
    async with conn.transaction():
        await conn.execute(SQL["delete_document_embeddings"], [row["id"] for row in rows])
        await conn.executemany(
            SQL["insert_document_embedding"],
            [
                (doc_id, index, text, vectors[i], spec.name)
                for i, (doc_id, index, text) in enumerate(pieces)
            ],
        )
    return len(pieces)


async def embed_pending(
    conn: asyncpg.Connection, settings: Settings, *, batch: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Embed every document that has no chunks (or stale ones); returns (documents, chunks).

    ``conn`` must have pgvector registered (``connect(..., vector=True)``).
    """
    spec = model_spec(settings)
    documents = chunks = 0
    while rows := await conn.fetch(SQL["documents_to_embed"], spec.name, batch):
        chunks += await _embed_documents(conn, settings, spec, rows)
        documents += len(rows)
        if progress:
            progress(documents, chunks)
    return documents, chunks


async def reembed(
    conn: asyncpg.Connection, settings: Settings, *, batch: int = 32,
    progress: Callable[[str], None] | None = None,
) -> ReembedReport:
    """Bring every stored embedding to the configured model (resumable; see the module doc)."""
    spec = model_spec(settings)
    report = ReembedReport(model=spec.name, dimensions=spec.dimensions)
    say = progress or (lambda _message: None)

    width = await column_dimensions(conn)
    if width is not None and width != spec.dimensions:
        say(f"embeddings.embedding is vector({width}); widening to unconstrained for the switch")
        async with conn.transaction():
            await conn.execute("DROP INDEX IF EXISTS idx_embeddings_hnsw")
            await conn.execute("ALTER TABLE embeddings ALTER COLUMN embedding TYPE vector")
        report.column_changed = True

    def on_progress(documents: int, chunks: int) -> None:
        say(f"re-embedded {documents} documents ({chunks} chunks)")

    report.documents, report.chunks = await embed_pending(
        conn, settings, batch=batch, progress=on_progress
    )
    while rows := await conn.fetch(SQL["stale_conversation_embeddings"], spec.name, batch):
        vectors = await aembed([row["chunk_text"] for row in rows], settings)
        async with conn.transaction():
            await conn.executemany(
                SQL["update_embedding"],
                [(row["id"], vectors[i], spec.name) for i, row in enumerate(rows)],
            )
        report.conversation_chunks += len(rows)

    if await column_dimensions(conn) != spec.dimensions:
        say(f"narrowing embeddings.embedding to vector({spec.dimensions}) and rebuilding HNSW")
        async with conn.transaction():
            await conn.execute(
                f"ALTER TABLE embeddings ALTER COLUMN embedding TYPE vector({spec.dimensions:d})"
            )
        report.column_changed = True
    await conn.execute(
        "CREATE INDEX IF NOT EXISTS idx_embeddings_hnsw "
        "ON embeddings USING hnsw (embedding vector_cosine_ops)"
    )
    return report
