-- The reference library: documents and their embeddings (course Concepts 7-9).
-- Named statements, loaded by fleet.sql; used by fleet.search, fleet.seed and fleet reembed.

-- name: embedding_models
-- The distinct models of the stored embeddings, read from the index on `model` with one probe
-- per distinct value (a loose index scan), so the check before every search costs
-- microseconds at any table size.
WITH RECURSIVE models AS (
    (SELECT model FROM embeddings ORDER BY model LIMIT 1)
    UNION ALL
    SELECT (SELECT e.model FROM embeddings e WHERE e.model > m.model ORDER BY e.model LIMIT 1)
    FROM models m
    WHERE m.model IS NOT NULL
)
SELECT model FROM models WHERE model IS NOT NULL;

-- name: embedding_column_dimensions
-- The declared width of embeddings.embedding (NULL while `fleet reembed` has it unconstrained).
SELECT CASE WHEN atttypmod > 0 THEN atttypmod END AS dimensions
FROM pg_attribute
WHERE attrelid = 'embeddings'::regclass AND attname = 'embedding';

-- name: search_settings
-- Per transaction: let the HNSW scan keep going until the filtered query has its rows
-- (pgvector >= 0.8 iterative scans), and how many candidates one scan step visits.
SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true),
       set_config('hnsw.ef_search', $1::text, true);

-- name: search_chunks
-- Nearest chunks to a query vector, optionally from one source only ('past_case' vs
-- 'policy_library'), nearest first, with cosine distances. The inner query is the HNSW index
-- scan and takes $4 candidates (a few times the $3 wanted): a relaxed-order iterative scan
-- returns rows only roughly in order, so the first $3 it finds are not always the best $3; the
-- outer ORDER BY ... LIMIT picks them exactly from the candidates.
WITH nearest AS MATERIALIZED (
    SELECT e.document_id, e.chunk_index, e.chunk_text, e.embedding <=> $1 AS distance
    FROM embeddings e
    JOIN documents d ON d.id = e.document_id
    WHERE ($2::text IS NULL OR d.source = $2::text)
    ORDER BY e.embedding <=> $1
    LIMIT $4
)
SELECT n.document_id, d.source, d.title, d.metadata, n.chunk_index, n.chunk_text,
       n.distance::float8 AS distance
FROM nearest n
JOIN documents d ON d.id = n.document_id
ORDER BY n.distance, n.document_id, n.chunk_index
LIMIT $3;

-- name: documents_to_embed
-- Documents with no embeddings yet, or with chunks from a model other than $1 (stale after a
-- model switch): what `fleet seed` and `fleet reembed` still have to do. LIMIT makes batches.
SELECT d.id, d.source, d.title, d.body
FROM documents d
WHERE NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.document_id = d.id)
   OR EXISTS (SELECT 1 FROM embeddings e
              WHERE e.document_id = d.id AND (e.model < $1 OR e.model > $1))
ORDER BY d.id
LIMIT $2;

-- name: delete_document_embeddings
-- A document's chunks are replaced as a whole (rechunked and re-embedded together).
DELETE FROM embeddings WHERE document_id = ANY($1::uuid[]);

-- name: insert_document_embedding
INSERT INTO embeddings (document_id, chunk_index, chunk_text, embedding, model)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (document_id, chunk_index) WHERE document_id IS NOT NULL DO NOTHING;

-- name: stale_conversation_embeddings
-- Conversation chunks embedded with another model; re-embedded in place, in batches.
SELECT id, chunk_text
FROM embeddings
WHERE conversation_id IS NOT NULL AND (model < $1 OR model > $1)
ORDER BY id
LIMIT $2;

-- name: update_embedding
UPDATE embeddings SET embedding = $2, model = $3 WHERE id = $1;

-- name: embedding_counts
-- Read-back of Decision 5: past cases, their embeddings, the models present.
SELECT
    (SELECT count(*) FROM documents WHERE source = 'past_case') AS past_cases,
    (SELECT count(*) FROM documents) AS documents,
    (SELECT count(*) FROM embeddings) AS embeddings,
    (SELECT count(*) FROM embeddings e JOIN documents d ON d.id = e.document_id
      WHERE d.source = 'past_case') AS past_case_embeddings;
