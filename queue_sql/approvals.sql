-- The statements of the approval flow (fleet/approvals.py). A run_states row's status moves by
-- compare-and-set only: every transition names the status it expects in its WHERE clause, so
-- two deciders, or two resumers, cannot both win.

-- name: park_insert
-- A turn paused on tool approvals: store the serialized run, waiting for a human.
-- $1 session, $2 message, $3 tool, $4 arguments, $5 call id, $6 all interruptions,
-- $7 serialized RunState, $8 TTL seconds, $9 the agent graph ({name: version}) it runs.
INSERT INTO run_states (conversation_id, message_id, tool, arguments, call_id, interruptions,
                        state, status, expires_at, agent_graph)
VALUES ($1, $2, $3, $4::jsonb, $5, $6::jsonb, $7, 'awaiting',
        now() + make_interval(secs => $8), $9::jsonb)
RETURNING id::text, requested_at, expires_at;

-- name: latest_for_message
-- The newest parked run of a message, locked: a decided run to resume, or a resumed one whose
-- resume never finished (its worker died, or the attempt failed and is being retried).
SELECT id::text, status, decision, decision_note, decided_by, state, interruptions, resume_token,
       agent_graph
FROM run_states
WHERE message_id = $1
ORDER BY requested_at DESC
LIMIT 1
FOR UPDATE;

-- name: mark_resumed
-- Compare-and-set approved|rejected -> resumed, tagged with the resuming claim's lease token.
UPDATE run_states
SET status = 'resumed', resumed_at = clock_timestamp(), resume_token = $2
WHERE id = $1::uuid AND status IN ('approved', 'rejected')
RETURNING id::text;

-- name: retag_resumed
-- A resumed run taken over by a new claim (its previous worker died mid-resume).
UPDATE run_states SET resume_token = $2
WHERE id = $1::uuid AND status = 'resumed'
RETURNING id::text;

-- name: decide
-- Compare-and-set awaiting -> approved|rejected, only before the approval expires.
-- $1 id, $2 'approved' | 'rejected', $3 decided by, $4 note or reason.
UPDATE run_states
SET status = $2, decision = $2, decided_by = $3, decided_at = clock_timestamp(),
    decision_note = $4
WHERE id = $1::uuid AND status = 'awaiting' AND expires_at > clock_timestamp()
RETURNING id::text, conversation_id, message_id, tool, arguments, call_id, interruptions,
          status, requested_at, expires_at, decided_by, decided_at, decision, decision_note,
          resumed_at;

-- name: expire_overdue
-- Reject undecided approvals past their expiry (at most $1 per call). With nothing overdue this
-- is one scan of run_states_status_expires that finds no row.
UPDATE run_states r
SET status = 'rejected', decision = 'rejected', decided_by = 'fleet:expiry',
    decided_at = clock_timestamp(),
    decision_note = 'expired: no one decided within '
        || (extract(epoch FROM r.expires_at - r.requested_at))::bigint || ' seconds'
WHERE r.id IN (SELECT id FROM run_states
               WHERE status = 'awaiting' AND expires_at <= clock_timestamp()
               ORDER BY expires_at
               LIMIT $1
               FOR UPDATE SKIP LOCKED)
RETURNING id::text, conversation_id, message_id, tool, arguments, call_id, interruptions,
          status, requested_at, expires_at, decided_by, decided_at, decision, decision_note,
          resumed_at;

-- name: reject_for_cancel
-- The parked message is being cancelled: its run must never resume.
UPDATE run_states
SET status = 'rejected', decision = 'rejected', decided_by = 'fleet:cancel',
    decided_at = clock_timestamp(), decision_note = $2
WHERE message_id = $1 AND status = 'awaiting'
RETURNING id::text, conversation_id, message_id, tool, arguments, call_id, interruptions,
          status, requested_at, expires_at, decided_by, decided_at, decision, decision_note,
          resumed_at;

-- name: get
SELECT id::text, conversation_id, message_id, tool, arguments, call_id, interruptions,
       status, requested_at, expires_at, decided_by, decided_at, decision, decision_note, resumed_at
FROM run_states WHERE id = $1::uuid;

-- name: list
-- Newest first; $1 status (NULL: any), $2 limit.
SELECT id::text, conversation_id, message_id, tool, arguments, call_id, interruptions,
       status, requested_at, expires_at, decided_by, decided_at, decision, decision_note, resumed_at
FROM run_states
WHERE ($1::text IS NULL OR status = $1)
ORDER BY requested_at DESC
LIMIT $2;

-- name: order_facts
-- What an approver needs to judge a refund: the order and its customer (tier from metadata).
SELECT o.id AS order_id, o.status AS order_status, o.amount_cents AS order_amount_cents,
       c.id AS customer_id, c.name AS customer_name, c.email AS customer_email,
       c.metadata ->> 'tier' AS customer_tier,
       (SELECT coalesce(sum(r.amount_cents), 0) FROM refunds r WHERE r.order_id = o.id)::bigint
           AS already_refunded_cents
FROM orders o LEFT JOIN customers c ON c.id = o.customer_id
WHERE o.id = $1;

-- name: audit
-- Append audit rows in one statement (audit_log is append-only).
INSERT INTO audit_log (conversation_id, actor, action, target, payload, result)
-- Payloads and results arrive as JSON text (arrays of jsonb have no client codec).
SELECT u.conversation_id, u.actor, u.action, u.target, u.payload::jsonb, u.result::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
    AS u(conversation_id, actor, action, target, payload, result);
