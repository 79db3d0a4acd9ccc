"""``fleet seed``: lay the seed corpus down in the shape the customer-data server reads.

The shape is the part that matters (course Decision 5): each resolved ticket is a ``tickets``
row, a ``documents`` row with ``source = 'past_case'`` and the ticket id at
``metadata->>'ticket_id'``, and one embedding made with the configured model; policies are
``policy_library`` documents, chunked. find_similar_resolved_tickets joins
embeddings -> documents(past_case) -> tickets, so a seed in any other shape searches nothing.

Idempotent: rows are inserted when missing and left alone when present (a case whose text
changed in code is updated and re-embedded), so a second run changes no counts; each run
writes one ``corpus_seeded`` audit row saying what it added. A direct connection, not MCP:
seeding is something an operator does, not something the agent does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
from pydantic import BaseModel

from fleet.database import connect
from fleet.embeddings import model_spec
from fleet.embeddings.store import SQL as LIBRARY_SQL
from fleet.embeddings.store import embed_pending
from fleet.search import ensure_model
from fleet.seed_corpus import Corpus, build_corpus
from fleet.settings import Settings
from fleet.sql import load

SQL = load(Path(__file__).with_name("seed.sql"))


class SeedReport(BaseModel):
    """What one ``fleet seed`` run added, and the totals afterwards."""

    model: str
    added: dict[str, int]
    totals: dict[str, int]
    audit_id: int


async def _write_business_rows(conn: asyncpg.Connection, corpus: Corpus) -> dict[str, int]:
    c, o, r, t = corpus.customers, corpus.orders, corpus.refunds, corpus.tickets
    added: dict[str, int] = {}
    added["customers"] = len(await conn.fetch(
        SQL["insert_customers"], [x.id for x in c], [x.email for x in c], [x.name for x in c],
        [{"tier": x.tier} if x.tier else {} for x in c],
    ))
    added["orders"] = len(await conn.fetch(
        SQL["insert_orders"], [x.id for x in o], [x.customer_id for x in o],
        [x.amount_cents for x in o], [x.status for x in o], [x.description for x in o],
        [x.placed_at for x in o],
    ))
    added["refunds"] = len(await conn.fetch(
        SQL["insert_refunds"], [x.order_id for x in r], [x.amount_cents for x in r],
        [x.reason for x in r], [x.idempotency_key for x in r], [x.created_at for x in r],
    ))
    added["tickets"] = len(await conn.fetch(
        SQL["insert_tickets"], [x.id for x in t], [x.customer_id for x in t],
        [x.order_id for x in t], [x.category for x in t], [x.subject for x in t],
        [x.body for x in t], [x.resolution for x in t], [x.created_at for x in t],
        [x.resolved_at for x in t],
    ))
    return added


async def _write_documents(conn: asyncpg.Connection, corpus: Corpus) -> dict[str, int]:
    cases = await conn.fetch(
        SQL["upsert_past_cases"],
        [x.subject for x in corpus.tickets],
        [x.case_text() for x in corpus.tickets],
        [
            {"ticket_id": x.id, "category": x.category, "customer_id": x.customer_id,
             "order_id": x.order_id}
            for x in corpus.tickets
        ],
    )
    policies = await conn.fetch(
        SQL["upsert_policies"],
        [x.title for x in corpus.policies],
        [x.body for x in corpus.policies],
        [{"slug": x.slug} for x in corpus.policies],
    )
    changed = [row["id"] for row in [*cases, *policies] if not row["inserted"]]
    if changed:  # text changed in code: its old chunks go, embed_pending makes new ones
        await conn.execute(LIBRARY_SQL["delete_document_embeddings"], changed)
    return {
        "past_cases": sum(row["inserted"] for row in cases),
        "policies": sum(row["inserted"] for row in policies),
        "documents_updated": len(changed),
    }


async def seed_database(
    conn: asyncpg.Connection, settings: Settings, corpus: Corpus | None = None
) -> SeedReport:
    """Seed through ``conn`` (pgvector registered). Refuses when stored embeddings are of
    another model: seeding would mix two models in one index."""
    corpus = corpus or build_corpus()
    spec = model_spec(settings)
    await ensure_model(conn, spec)
    async with conn.transaction():
        added = await _write_business_rows(conn, corpus)
        added |= await _write_documents(conn, corpus)
    # Embedding happens outside that transaction (it takes seconds); documents still without
    # chunks are picked up by the next run, or by `fleet reembed`.
    documents, chunks = await embed_pending(conn, settings)
    added["documents_embedded"] = documents
    added["chunks_embedded"] = chunks
    totals: dict[str, Any] = dict(await conn.fetchrow(SQL["totals"]))
    audit_id = await conn.fetchval(
        SQL["insert_audit_seeded"], {"model": spec.name, "added": added}, {"totals": totals}
    )
    return SeedReport(model=spec.name, added=added, totals=totals, audit_id=audit_id)


async def seed(settings: Settings, *, url: str | None = None) -> SeedReport:
    """``fleet seed``: open a connection and seed."""
    conn = await connect(settings, "fleet-seed", url=url, vector=True)
    try:
        return await seed_database(conn, settings)
    finally:
        await conn.close()
