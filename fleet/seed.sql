-- `fleet seed`: the business rows of the seed corpus (fleet/seed_corpus.py). Every statement
-- inserts what is missing and leaves what exists alone, so seeding twice changes nothing;
-- each returns the rows it inserted, which is how the run reports what it added.

-- name: insert_customers
INSERT INTO customers (id, email, name, metadata)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[])
ON CONFLICT DO NOTHING
RETURNING id;

-- name: insert_orders
INSERT INTO orders (id, customer_id, amount_cents, status, description, placed_at, updated_at)
SELECT id, customer_id, amount_cents, status, description, placed_at, placed_at
FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::text[], $6::timestamptz[])
     AS o(id, customer_id, amount_cents, status, description, placed_at)
ON CONFLICT DO NOTHING
RETURNING id;

-- name: insert_refunds
INSERT INTO refunds (order_id, amount_cents, reason, idempotency_key, created_at)
SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::timestamptz[])
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id;

-- name: insert_tickets
INSERT INTO tickets (id, customer_id, order_id, category, subject, body, status, resolution,
                     created_at, resolved_at)
SELECT id, customer_id, order_id, category, subject, body, 'resolved', resolution, created_at,
       resolved_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
            $8::timestamptz[], $9::timestamptz[])
     AS t(id, customer_id, order_id, category, subject, body, resolution, created_at, resolved_at)
ON CONFLICT DO NOTHING
RETURNING id;

-- name: upsert_past_cases
-- One past_case document per resolved ticket, keyed by metadata->>'ticket_id'. A case whose
-- text changed is updated (and re-embedded by the caller: its chunks are dropped here).
WITH incoming AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[]) AS i(title, body, metadata)
), upserted AS (
    INSERT INTO documents (source, title, body, metadata)
    SELECT 'past_case', title, body, metadata FROM incoming
    ON CONFLICT ((metadata->>'ticket_id')) WHERE source = 'past_case'
    DO UPDATE SET title = EXCLUDED.title, body = EXCLUDED.body, metadata = EXCLUDED.metadata,
                  updated_at = now()
    WHERE (documents.title, documents.body, documents.metadata)
          IS DISTINCT FROM (EXCLUDED.title, EXCLUDED.body, EXCLUDED.metadata)
    RETURNING id, (xmax = 0) AS inserted
)
SELECT id, inserted FROM upserted;

-- name: upsert_policies
WITH incoming AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[]) AS i(title, body, metadata)
), upserted AS (
    INSERT INTO documents (source, title, body, metadata)
    SELECT 'policy_library', title, body, metadata FROM incoming
    ON CONFLICT ((metadata->>'slug')) WHERE source = 'policy_library'
    DO UPDATE SET title = EXCLUDED.title, body = EXCLUDED.body, metadata = EXCLUDED.metadata,
                  updated_at = now()
    WHERE (documents.title, documents.body, documents.metadata)
          IS DISTINCT FROM (EXCLUDED.title, EXCLUDED.body, EXCLUDED.metadata)
    RETURNING id, (xmax = 0) AS inserted
)
SELECT id, inserted FROM upserted;

-- name: insert_audit_seeded
-- One corpus_seeded row per run (Decision 5): what this run added, and the totals after it.
INSERT INTO audit_log (actor, action, target, payload, result)
VALUES ('system:fleet-seed', 'corpus_seeded', 'documents', $1, $2)
RETURNING id;

-- name: totals
SELECT
    (SELECT count(*) FROM customers) AS customers,
    (SELECT count(*) FROM orders) AS orders,
    (SELECT count(*) FROM refunds) AS refunds,
    (SELECT count(*) FROM tickets) AS tickets,
    (SELECT count(*) FROM documents WHERE source = 'past_case') AS past_cases,
    (SELECT count(*) FROM documents WHERE source = 'policy_library') AS policies,
    (SELECT count(*) FROM embeddings) AS embeddings;
