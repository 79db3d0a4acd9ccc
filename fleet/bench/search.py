"""``fleet bench search``: top-5 semantic search latency and recall at 10k and 100k vectors.

Method (results and discussion in BENCHMARKS.md):

* A scratch database (created, migrated, dropped), so the benchmark never touches real data.
* Synthetic vectors, because embedding 100k texts with MiniLM would take an hour on two cores
  and measure the model, not the index: unit vectors of the configured width drawn as a mixture
  of ``clusters`` Gaussian blobs around random centres (real text embeddings cluster by topic;
  ``--distribution uniform`` gives structureless vectors, the hard case for any ANN index).
  Each vector is a ``documents`` row (90% ``past_case``, 10% ``policy_library``) with one
  ``embeddings`` row, so the statement measured is the one ``fleet search`` runs (join,
  source filter, iterative HNSW scan, exact re-sort), not a bare ``ORDER BY ... LIMIT``.
* Rows are COPY-loaded with the index dropped, then the HNSW index (cosine) is built, timed.
* Queries are fresh points from the same distribution. Latency is client-side wall time of the
  whole search call (transaction, per-transaction settings, query) over TCP, after a warm-up;
  p50 and p99 over ``queries`` calls. Recall@5 is the overlap of the returned top 5 with the
  exact top 5 (computed in numpy over the same rows and filter), averaged.
* The exact search in SQL (index scans disabled) is timed too, for scale.
"""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import numpy as np
from pydantic import BaseModel

from fleet.bench.queue import scratch_database
from fleet.database import connect
from fleet.embeddings import model_spec
from fleet.embeddings.store import SQL
from fleet.search import search_vector
from fleet.settings import Settings

FILTERS: dict[str, str | None] = {"none": None, "past_case": "past_case",
                                  "policy_library": "policy_library"}


@dataclass
class SearchBenchConfig:
    sizes: list[int] = field(default_factory=lambda: [10_000, 100_000])
    queries: int = 500
    ef_search: list[int] = field(default_factory=lambda: [40, 64, 100])
    filters: list[str] = field(default_factory=lambda: ["none", "past_case", "policy_library"])
    distribution: str = "clustered"
    clusters: int = 500
    exact_queries: int = 20
    seed: int = 42


class SearchResult(BaseModel):
    vectors: int
    filter: str
    ef_search: int
    p50_ms: float
    p99_ms: float
    recall_at_5: float
    uses_hnsw: bool


class SizeResult(BaseModel):
    vectors: int
    load_seconds: float
    index_build_seconds: float
    index_mb: float
    exact_p50_ms: float
    exact_p99_ms: float


class SearchBenchReport(BaseModel):
    model: str
    dimensions: int
    distribution: str
    queries: int
    environment: dict[str, object]
    sizes: list[SizeResult]
    results: list[SearchResult]


class _Vectors:
    """Deterministic synthetic unit vectors: a mixture of Gaussian blobs (or uniform)."""

    def __init__(self, dims: int, config: SearchBenchConfig) -> None:
        self.dims = dims
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        centres = self.rng.standard_normal((config.clusters, dims)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(self, n: int) -> np.ndarray:
        if self.config.distribution == "uniform":
            points = self.rng.standard_normal((n, self.dims)).astype(np.float32)
        else:
            # Spread chosen so neighbours within a topic sit at cosine distance ~0.3-0.5,
            # the range MiniLM gives related support tickets (see BENCHMARKS.md).
            which = self.rng.integers(0, len(self.centres), n)
            noise = self.rng.standard_normal((n, self.dims)).astype(np.float32)
            points = self.centres[which] + noise * (0.8 / np.sqrt(self.dims))
        return points / np.linalg.norm(points, axis=1, keepdims=True)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _load(conn: asyncpg.Connection, vectors: np.ndarray, model: str,
                start: int) -> tuple[list[uuid.UUID], list[str]]:
    ids = [uuid.uuid4() for _ in range(len(vectors))]
    sources = ["policy_library" if (start + i) % 10 == 0 else "past_case"
               for i in range(len(vectors))]
    await conn.copy_records_to_table(
        "documents", columns=["id", "source", "title", "body"],
        records=[(ids[i], sources[i], f"doc {start + i}", f"synthetic document {start + i}")
                 for i in range(len(vectors))],
    )
    await conn.copy_records_to_table(
        "embeddings", columns=["document_id", "chunk_index", "chunk_text", "embedding", "model"],
        records=[(ids[i], 0, f"synthetic chunk {start + i}", vectors[i], model)
                 for i in range(len(vectors))],
    )
    return ids, sources


async def run_search_bench(
    settings: Settings, config: SearchBenchConfig, progress: Callable[[str], None]
) -> SearchBenchReport:
    spec = model_spec(settings)
    gen = _Vectors(spec.dimensions, config)
    sizes: list[SizeResult] = []
    results: list[SearchResult] = []
    async with scratch_database(settings) as url:
        bench_settings = settings.model_copy(update={"database_url": url})
        conn = await connect(bench_settings, "fleet-bench-search", url=url, vector=True)
        try:
            env = {
                "server_version": await conn.fetchval("SHOW server_version"),
                "pgvector": await conn.fetchval(
                    "SELECT extversion FROM pg_extension WHERE extname = 'vector'"),
                "cpus": os.cpu_count(),
                "load_before": round(os.getloadavg()[0], 2),
            }
            stored = np.zeros((0, spec.dimensions), dtype=np.float32)
            sources: list[str] = []
            ids: list[uuid.UUID] = []
            for size in sorted(config.sizes):
                progress(f"loading {size - len(stored):,} vectors (to {size:,}) ...")
                await conn.execute("DROP INDEX IF EXISTS idx_embeddings_hnsw")
                began = time.perf_counter()
                fresh = gen.draw(size - len(stored))
                new_ids, new_sources = await _load(conn, fresh, spec.name, len(stored))
                load_seconds = time.perf_counter() - began
                stored = np.vstack([stored, fresh])
                ids += new_ids
                sources += new_sources
                progress(f"building the HNSW index over {size:,} vectors ...")
                began = time.perf_counter()
                await conn.execute("SET maintenance_work_mem = '1GB'")
                await conn.execute(
                    "CREATE INDEX idx_embeddings_hnsw ON embeddings "
                    "USING hnsw (embedding vector_cosine_ops)")
                build_seconds = time.perf_counter() - began
                await conn.execute("ANALYZE documents; ANALYZE embeddings")
                index_mb = await conn.fetchval(
                    "SELECT pg_relation_size('idx_embeddings_hnsw') / 1048576.0")
                queries = gen.draw(config.queries)
                exact = await _exact_latency(conn, queries[: config.exact_queries])
                sizes.append(SizeResult(
                    vectors=size, load_seconds=round(load_seconds, 2),
                    index_build_seconds=round(build_seconds, 2), index_mb=round(index_mb, 1),
                    exact_p50_ms=round(statistics.median(exact), 2),
                    exact_p99_ms=round(_percentile(exact, 0.99), 2),
                ))
                source_array = np.asarray(sources)
                id_index = {doc_id: i for i, doc_id in enumerate(ids)}
                for name in config.filters:
                    source = FILTERS[name]
                    mask = np.ones(len(stored), bool) if source is None else source_array == source
                    truth = _exact_top5(stored, mask, queries)
                    for ef in config.ef_search:
                        result = await _measure(conn, queries, truth, id_index, source, ef)
                        results.append(SearchResult(vectors=size, filter=name, ef_search=ef,
                                                    **result))
                        progress(f"  {size:>7,} filter={name:<14} ef_search={ef:<4} "
                                 f"p50={result['p50_ms']:.2f} ms p99={result['p99_ms']:.2f} ms "
                                 f"recall@5={result['recall_at_5']:.3f}")
            env["load_after"] = round(os.getloadavg()[0], 2)
        finally:
            await conn.close()
    return SearchBenchReport(model=spec.name, dimensions=spec.dimensions,
                             distribution=config.distribution, queries=config.queries,
                             environment=env, sizes=sizes, results=results)


def _exact_top5(stored: np.ndarray, mask: np.ndarray, queries: np.ndarray) -> list[set[int]]:
    positions = np.flatnonzero(mask)
    distances = 1.0 - queries @ stored[positions].T
    best = np.argpartition(distances, 5, axis=1)[:, :5]
    return [set(positions[row].tolist()) for row in best]


async def _exact_latency(conn: asyncpg.Connection, queries: np.ndarray) -> list[float]:
    """The same statement with index scans disabled: every row's distance, sorted."""
    timings = []
    for vector in queries:
        began = time.perf_counter()
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_indexscan = off")
            await conn.fetch(SQL["search_chunks"], vector, None, 5, 5)
        timings.append((time.perf_counter() - began) * 1000)
    return timings


async def _measure(conn: asyncpg.Connection, queries: np.ndarray, truth: list[set[int]],
                   id_index: dict[uuid.UUID, int], source: str | None,
                   ef: int) -> dict[str, float | bool]:
    async with conn.transaction():
        await conn.execute(SQL["search_settings"], str(ef))
        plan = "\n".join(r[0] for r in await conn.fetch(
            "EXPLAIN " + SQL["search_chunks"], queries[0], source, 5, 20))
    for vector in queries[:10]:  # warm-up: caches, the prepared statement
        await search_vector(conn, vector, source=source, limit=5, ef_search=ef)
    timings: list[float] = []
    recalls: list[float] = []
    for vector, exact in zip(queries, truth, strict=True):
        began = time.perf_counter()
        rows = await search_vector(conn, vector, source=source, limit=5, ef_search=ef)
        timings.append((time.perf_counter() - began) * 1000)
        found = {id_index[row["document_id"]] for row in rows}
        recalls.append(len(found & exact) / 5)
    return {
        "p50_ms": round(statistics.median(timings), 3),
        "p99_ms": round(_percentile(timings, 0.99), 3),
        "recall_at_5": round(float(np.mean(recalls)), 4),
        "uses_hnsw": "idx_embeddings_hnsw" in plan,
    }
