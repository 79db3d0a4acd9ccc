-- Cancelling messages (fleet/cancellation.py). The state changes themselves are the queue's
-- (queries.sql: cancel, request_cancel); these are what goes with them in the same transaction.

-- name: notify_cancel
-- Tell the workers at commit that message $1 should stop; the one running it heartbeats at
-- once and reads the request from the row (the payload alone cancels nothing).
SELECT pg_notify('fleet_cancel', $1::bigint::text);

-- name: conversation_ensure
-- A cancelled message may never have reached a worker: its session's conversations row is
-- created (as a worker would) so the audit row below belongs to the session's trail.
INSERT INTO conversations (session_id, user_id)
VALUES ($1, coalesce($2, 'anonymous'))
ON CONFLICT (session_id) DO NOTHING;

-- name: audit
-- One audit row of a cancellation ($1 session, $2 actor, $3 action, $4 target, $5 payload,
-- $6 result), committed with the state change it describes.
INSERT INTO audit_log (conversation_id, actor, action, target, payload, result)
VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb);
