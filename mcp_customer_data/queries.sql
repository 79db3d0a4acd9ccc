-- The customer-data MCP server's statements: the only SQL the agent can cause, each one
-- narrow and parameterised. There is no statement here that takes SQL text from a caller.

-- The three reads each run as ONE statement: the record, and its `customer_data_read` audit
-- row when the call is made on behalf of a conversation ($n+1: the audit payload, NULL for an
-- operator's own call; $n: the conversation, NULL when the caller named none that exists).
-- One round trip and one commit instead of a read, a second read and an insert; the reads of
-- one call see one snapshot; and a read whose audit row cannot be written returns nothing (no
-- unaudited read of a customer's data on behalf of a turn). The audit row is appended by a
-- data-modifying CTE, which runs to completion whether or not the outer query reads it; there
-- is no RETURNING: the fleet_mcp role may append to audit_log but not read it.

-- name: customer_by_id
WITH found AS (
    SELECT c.id, c.email, c.name, COALESCE(c.metadata->>'tier', 'standard') AS tier,
           (SELECT count(*) FROM tickets t
             WHERE t.customer_id = c.id AND t.status IN ('open', 'pending'))::int
               AS open_ticket_count
    FROM customers c
    WHERE c.id = $1
), audited AS (
    INSERT INTO audit_log (conversation_id, actor, action, target, payload, result)
    SELECT $2, 'mcp:customer-data', 'customer_data_read', 'mcp:lookup_customer', $3::jsonb,
           jsonb_build_object('customer_id', found.id)
    FROM found WHERE $3::jsonb IS NOT NULL
)
SELECT * FROM found;

-- name: customer_by_email
-- With the customer's latest orders ($2 of them, newest first: `recent_orders`, a list of
-- (order_id, amount_cents, currency, status, description, placed_at)), so "my order" can be
-- resolved to an order id.
WITH found AS (
    SELECT c.id, c.email, c.name, COALESCE(c.metadata->>'tier', 'standard') AS tier,
           (SELECT count(*) FROM tickets t
             WHERE t.customer_id = c.id AND t.status IN ('open', 'pending'))::int
               AS open_ticket_count,
           ARRAY(SELECT ROW(o.id, o.amount_cents, o.currency, o.status, o.description,
                            o.placed_at)
                 FROM orders o
                 WHERE o.customer_id = c.id
                 ORDER BY o.placed_at DESC, o.id DESC
                 LIMIT $2) AS recent_orders
    FROM customers c
    WHERE c.email = $1
), audited AS (
    INSERT INTO audit_log (conversation_id, actor, action, target, payload, result)
    SELECT $3, 'mcp:customer-data', 'customer_data_read', 'mcp:find_customer_by_email',
           $4::jsonb, jsonb_build_object('customer_id', found.id)
    FROM found WHERE $4::jsonb IS NOT NULL
)
SELECT * FROM found;

-- name: order_by_id
-- With its refunds (`refunds`, oldest first: a list of (refund_id, amount_cents, reason,
-- created_at)).
WITH found AS (
    SELECT o.id AS order_id, o.customer_id, c.email AS customer_email, c.name AS customer_name,
           COALESCE(c.metadata->>'tier', 'standard') AS customer_tier,
           o.amount_cents, o.currency, o.status, o.description, o.placed_at,
           COALESCE((SELECT sum(r.amount_cents) FROM refunds r WHERE r.order_id = o.id), 0)::int
               AS refunded_cents,
           ARRAY(SELECT ROW(r.id, r.amount_cents, r.reason, r.created_at)
                 FROM refunds r
                 WHERE r.order_id = o.id
                 ORDER BY r.created_at, r.id) AS refunds
    FROM orders o
    JOIN customers c ON c.id = o.customer_id
    WHERE o.id = $1
), audited AS (
    INSERT INTO audit_log (conversation_id, actor, action, target, payload, result)
    SELECT $2, 'mcp:customer-data', 'customer_data_read', 'mcp:lookup_order', $3::jsonb,
           jsonb_build_object('order_id', found.order_id, 'customer_id', found.customer_id)
    FROM found WHERE $3::jsonb IS NOT NULL
)
SELECT * FROM found;

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
