-- The agent turn's statements (fleet/memory.py, fleet/audit.py, fleet trace). Session items are
-- written once per turn and fenced by the lease; audit rows are written in batches.

-- name: turn_open
-- Start of a turn, one round trip: upsert the conversation (before any audit row points at it),
-- drop what an earlier attempt of this same turn wrote, and read the history.
-- $1 session, $2 user id, $3 conversation metadata, $4 message id, $5 resume-of approval id.
WITH conversation AS (
    INSERT INTO conversations AS c (session_id, user_id, metadata)
    VALUES ($1, $2, $3::jsonb)
    ON CONFLICT (session_id) DO UPDATE
        SET user_id = CASE WHEN c.user_id = 'anonymous' THEN EXCLUDED.user_id ELSE c.user_id END,
            metadata = c.metadata || EXCLUDED.metadata,
            ended_at = NULL
    RETURNING c.session_id
), stale AS (
    DELETE FROM agent_session_items
    WHERE session_id = $1 AND message_id = $4 AND resume_of IS NOT DISTINCT FROM $5::uuid
    RETURNING id
)
SELECT s.item
FROM agent_session_items s
WHERE s.session_id = $1
  AND NOT (s.message_id IS NOT DISTINCT FROM $4 AND s.resume_of IS NOT DISTINCT FROM $5::uuid)
ORDER BY s.id;

-- name: session_flush
-- End of a turn (or a park): append the turn's items in order and set the conversation's
-- summary, only while this worker still holds the message's lease. Returns false when the
-- lease was lost (nothing is written).
-- $1 session, $2 message id, $3 lease token, $4 resume-of approval id, $5 items, $6 summary.
WITH lease AS (
    SELECT m.id FROM fleet.messages m
    WHERE m.id = $2 AND m.lease_token = $3 AND m.state = 'running'
    FOR SHARE
), appended AS (
    INSERT INTO agent_session_items (session_id, message_id, resume_of, item)
    SELECT $1, $2, $4::uuid, u.item
    FROM lease, unnest($5::jsonb[]) WITH ORDINALITY AS u(item, n)
    ORDER BY u.n
    RETURNING id
), summary AS (
    UPDATE conversations SET summary = coalesce($6, summary)
    WHERE session_id = $1 AND EXISTS (SELECT 1 FROM lease)
    RETURNING session_id
)
SELECT EXISTS (SELECT 1 FROM lease);

-- name: session_items
-- The history of a session, oldest first (the newest $2 when $2 is not null).
SELECT item FROM (
    SELECT id, item FROM agent_session_items
    WHERE session_id = $1
    ORDER BY id DESC
    LIMIT $2
) newest
ORDER BY id;

-- name: session_pop
-- Remove and return the newest item of a session.
DELETE FROM agent_session_items
WHERE id = (SELECT max(id) FROM agent_session_items WHERE session_id = $1)
RETURNING item;

-- name: session_clear
DELETE FROM agent_session_items WHERE session_id = $1;

-- name: audit_write
-- A batch of audit rows and capability invocations, one statement (group commit).
WITH audit AS (
    INSERT INTO audit_log (conversation_id, actor, action, target, payload, result, created_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[],
                         $6::jsonb[], $7::timestamptz[])
    RETURNING 1
), invocations AS (
    INSERT INTO capability_invocations
        (conversation_id, capability, arguments, result, status, latency_ms, created_at)
    SELECT * FROM unnest($8::text[], $9::text[], $10::jsonb[], $11::jsonb[], $12::text[],
                         $13::int[], $14::timestamptz[])
    RETURNING 1
)
SELECT (SELECT count(*) FROM audit) AS audit_rows,
       (SELECT count(*) FROM invocations) AS invocation_rows;

-- name: trace_audit
-- `fleet trace`: a session's audit trail in order.
SELECT id, created_at, actor, action, target, payload, result
FROM audit_log
WHERE conversation_id = $1
ORDER BY created_at, id;

-- name: trace_run_states
-- `fleet trace`: the session's parked runs (never the serialized state itself).
SELECT id::text, message_id, tool, arguments, call_id, status, requested_at, expires_at,
       decided_by, decided_at, decision, decision_note, resumed_at
FROM run_states
WHERE conversation_id = $1
ORDER BY requested_at;

-- name: trace_messages
-- `fleet trace`: the session's messages with their replies.
SELECT id, state, attempts, body, reply, error, enqueued_at, finished_at
FROM fleet.session_messages($1)
ORDER BY id;

-- name: trace_conversation
SELECT session_id, user_id, started_at, ended_at, metadata, summary
FROM conversations
WHERE session_id = $1;
