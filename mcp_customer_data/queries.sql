-- The customer-data MCP server's statements: the only SQL the agent can cause, each one
-- narrow and parameterised. There is no statement here that takes SQL text from a caller.

-- name: customer_by_id
SELECT c.id, c.email, c.name, COALESCE(c.metadata->>'tier', 'standard') AS tier,
       (SELECT count(*) FROM tickets t
         WHERE t.customer_id = c.id AND t.status IN ('open', 'pending'))::int AS open_ticket_count
FROM customers c
WHERE c.id = $1;

-- name: customer_by_email
SELECT c.id, c.email, c.name, COALESCE(c.metadata->>'tier', 'standard') AS tier,
       (SELECT count(*) FROM tickets t
         WHERE t.customer_id = c.id AND t.status IN ('open', 'pending'))::int AS open_ticket_count
FROM customers c
WHERE c.email = $1;

-- name: recent_orders
-- A customer's latest orders, so "my order" can be resolved to an order id.
SELECT o.id AS order_id, o.amount_cents, o.currency, o.status, o.description, o.placed_at
FROM orders o
WHERE o.customer_id = $1
ORDER BY o.placed_at DESC, o.id DESC
LIMIT $2;

-- name: order_by_id
SELECT o.id AS order_id, o.customer_id, c.email AS customer_email, c.name AS customer_name,
       COALESCE(c.metadata->>'tier', 'standard') AS customer_tier,
       o.amount_cents, o.currency, o.status, o.description, o.placed_at,
       COALESCE((SELECT sum(r.amount_cents) FROM refunds r WHERE r.order_id = o.id), 0)::int
           AS refunded_cents
FROM orders o
JOIN customers c ON c.id = o.customer_id
WHERE o.id = $1;

-- name: refunds_of_order
SELECT id AS refund_id, amount_cents, reason, created_at
FROM refunds
WHERE order_id = $1
ORDER BY created_at, id;

-- name: similar_resolved_tickets
-- embeddings -> documents (source = 'past_case') -> tickets (via metadata->>'ticket_id'),
-- nearest first. Run after search_settings in the same transaction (iterative HNSW scan).
-- $2 candidate chunks (a few per wanted ticket, in case a case was ever chunked), $3 tickets.
WITH nearest AS MATERIALIZED (
    SELECT d.metadata->>'ticket_id' AS ticket_id, e.embedding <=> $1 AS distance
    FROM embeddings e
    JOIN documents d ON d.id = e.document_id
    WHERE d.source = 'past_case'
    ORDER BY e.embedding <=> $1
    LIMIT $2
)
SELECT t.id AS ticket_id, t.subject, t.category, t.body AS customer_message, t.resolution,
       t.order_id, t.resolved_at, min(n.distance)::float8 AS distance
FROM nearest n
JOIN tickets t ON t.id = n.ticket_id
WHERE t.status IN ('resolved', 'closed')
GROUP BY t.id
ORDER BY distance, t.id
LIMIT $3;

-- name: lock_order
-- issue_refund, step 1: the order row, locked until the transaction ends, so concurrent
-- refunds of one order run one after the other and never exceed what was paid.
SELECT id, amount_cents, status FROM orders WHERE id = $1 FOR UPDATE;

-- name: refunded_so_far
-- issue_refund, step 2, a statement of its own AFTER the lock: under READ COMMITTED it takes a
-- new snapshot and so sees the refunds committed by whoever held the lock before us. (Summed
-- inside the locking statement, it would read the snapshot from before the wait, and five
-- concurrent refunds of a third each would all pass; the concurrency test catches that.)
SELECT COALESCE(sum(amount_cents), 0)::int FROM refunds WHERE order_id = $1;

-- name: refund_by_key
SELECT id AS refund_id, order_id, amount_cents, reason, created_at
FROM refunds
WHERE idempotency_key = $1;

-- name: insert_refund
INSERT INTO refunds (order_id, amount_cents, reason, idempotency_key, conversation_id)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING id AS refund_id, order_id, amount_cents, reason, created_at;

-- name: set_order_status
UPDATE orders SET status = $2, updated_at = now() WHERE id = $1;

-- name: insert_refund_audit
-- The receipt of the business event, in the refund's own transaction (Concept 10), linked to
-- the conversation the worker names in `_meta.session_id`. The worker writes that
-- conversations row at message_received, before any tool runs; were it missing, the foreign
-- key would fail and take the refund with it (both or neither, never a refund without its
-- receipt). The fleet_mcp role needs no access to conversations for this: the FK check runs
-- as the table owner.
INSERT INTO audit_log (conversation_id, actor, action, target, payload, result)
VALUES ($1, 'mcp:customer-data', 'refund_issued', $2, $3, $4);
-- (No RETURNING: the audit writer role may append to audit_log but not read it.)

-- name: insert_read_audit
-- `customer_data_read`: a customer's record read on behalf of conversation $1 (NULL when the
-- caller named none that exists), with the run variables in the payload. Append-only, like
-- every audit row; the fleet_mcp role may insert but not read audit_log.
INSERT INTO audit_log (conversation_id, actor, action, target, payload, result)
VALUES ($1, 'mcp:customer-data', 'customer_data_read', $2, $3, $4);
