-- The statements the worker, the CLI and the client run against the queue. fleet/queue.py loads
-- them by name (`-- name: <name>`); each can be pasted into psql and EXPLAINed as it is.

-- name: enqueue
-- Enqueue one message (validation and head election happen in the database). metadata and
-- variables come as JSON text: the caller's own connection (fleet.Client.enqueue(conn=...))
-- has no jsonb codec of ours.
SELECT fleet.enqueue(session_id => $1, body => $2, customer_id => $3, dedupe_key => $4,
                     metadata => $5::text::jsonb, agent => $6, variables => $7::text::jsonb,
                     max_attempts => $8) AS id;

-- name: enqueue_many
-- Enqueue a batch in one statement, all or nothing (fleet.enqueue_many): $1 a JSON array of
-- objects with fleet.enqueue's argument names as keys, as text. Returns the ids in order.
SELECT fleet.enqueue_many($1::text::jsonb) AS ids;

-- name: claim
-- Claim up to $2 claimable heads for worker $1 with a lease of $3 seconds. Reads only the
-- messages_claimable partial index, so its cost follows the batch size, not the backlog.
-- $4/$5: the MCP tools and skills this worker has; only messages for agents it can serve
-- (fleet.servable_agents, evaluated once per statement) are claimed. NULL: any agent (noop).
-- The rows are updated through the primary key (= ANY of the locked ids), never joined: with
-- `FROM candidates WHERE m.id = c.id` the generic plan PostgreSQL may cache (LIMIT $2 unknown,
-- so 10% of the table guessed) hash-joined a sequential scan of every message, 11.7 ms instead
-- of 0.4 ms at 50,000 messages. The casts give the domain-typed columns (migration 0011) back
-- as their base types, which fleet.finish_and_claim's RETURNS TABLE needs.
WITH candidates AS (
    SELECT id FROM fleet.messages
    WHERE state = 'queued' AND is_head AND run_after <= now()
      AND ($4::text[] IS NULL
           OR agent = ANY ((SELECT fleet.servable_agents($4::text[], $5::text[]))::text[]))
    ORDER BY run_after, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE fleet.messages m
SET state = 'running', attempts = m.attempts + 1, claimed_at = clock_timestamp(),
    lease_owner = $1, lease_token = nextval('fleet.lease_tokens'),
    lease_expires_at = clock_timestamp() + make_interval(secs => $3)
WHERE m.id = ANY (ARRAY(SELECT id FROM candidates))
RETURNING m.id, m.session_id::text, m.agent, m.body::text, m.customer_id,
          m.variables::jsonb, m.metadata::jsonb, m.attempts, m.max_attempts,
          m.takeovers, m.lease_token, m.enqueued_at, m.claimed_at;

-- name: claim_message
-- Claim one given message for worker $1 if it is a claimable head (a delegation's child turn,
-- run inline by the worker that enqueued it). Same lease rules as claim.
UPDATE fleet.messages m
SET state = 'running', attempts = m.attempts + 1, claimed_at = clock_timestamp(),
    lease_owner = $1, lease_token = nextval('fleet.lease_tokens'),
    lease_expires_at = clock_timestamp() + make_interval(secs => $3)
WHERE m.id = (SELECT id FROM fleet.messages
              WHERE id = $2 AND state = 'queued' AND is_head AND run_after <= now()
              FOR UPDATE SKIP LOCKED)
RETURNING m.id, m.session_id, m.agent, m.body, m.customer_id, m.variables, m.metadata,
          m.attempts, m.max_attempts, m.takeovers, m.lease_token, m.enqueued_at, m.claimed_at;

-- name: heartbeat
-- Extend the leases this worker still holds; returns the ids still held (the rest were lost)
-- and, for each that someone asked to cancel, the reason given ('' when none).
--
-- Never waits for a row lock: a message that another transaction has locked (most often this
-- worker's own write of its outcome, or a handler's Lease.transaction) is skipped, reported
-- still held with no reason, and extended by the next heartbeat if still running. A heartbeat
-- that waited could deadlock: it locks a worker's leases all at once, and the finish writing
-- some of them locks them in its own plan's order (here the running index's, by session);
-- PostgreSQL's deadlock detector broke such pairs in 4 of 6 runs of a chaos script
-- (tests/test_chaos_handlers.py; BENCHMARKS.md, 2026-12-07). `mine`: the leases the snapshot
-- shows held; `locked`: those of them locked now, the rest skipped.
WITH mine AS (
    SELECT l.id FROM fleet.messages l
    WHERE l.id = ANY ($1::bigint[]) AND l.state = 'running'
      AND l.lease_token = ($2::bigint[])[array_position($1::bigint[], l.id)]
), locked AS (
    SELECT l.id FROM fleet.messages l
    WHERE l.id = ANY (ARRAY(SELECT id FROM mine)) AND l.state = 'running'
      AND l.lease_token = ($2::bigint[])[array_position($1::bigint[], l.id)]
    FOR NO KEY UPDATE SKIP LOCKED
), extended AS (
    UPDATE fleet.messages m
    SET lease_expires_at = clock_timestamp() + make_interval(secs => $3)
    WHERE m.id = ANY (ARRAY(SELECT id FROM locked))
    RETURNING m.id,
              CASE WHEN m.cancel_requested_at IS NOT NULL
                   THEN coalesce(m.cancel_reason, '') END AS cancel_reason
)
SELECT id, cancel_reason FROM extended
UNION ALL
SELECT id, NULL FROM mine WHERE id <> ALL (ARRAY(SELECT id FROM locked));

-- name: finish
-- Finish messages (done/dead) under their lease tokens; returns the ids actually finished.
SELECT fleet.finish_messages($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[]) AS id;

-- name: finish_and_claim
-- The worker's cycle in one transaction: finish outcomes ($6..$10, as `finish`), then claim up
-- to $2 heads ($1..$5, as `claim`). Rows with a NULL lease_token are the finished ids.
SELECT * FROM fleet.finish_and_claim($1, $2, $3, $4::text[], $5::text[], $6::bigint[],
                                     $7::bigint[], $8::text[], $9::text[], $10::text[]);

-- name: retry
-- Put a failed message back in line after a backoff; it stays its session's head, so the
-- session's later messages keep waiting behind it. Fenced by the lease token.
UPDATE fleet.messages
SET state = 'queued', error = $3, run_after = clock_timestamp() + make_interval(secs => $4),
    lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
WHERE id = $1 AND lease_token = $2 AND state = 'running'
RETURNING id;

-- name: release
-- Give messages back untouched (graceful shutdown): the attempt does not count.
UPDATE fleet.messages m
SET state = 'queued', attempts = greatest(m.attempts - 1, 0), run_after = clock_timestamp(),
    lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
FROM unnest($1::bigint[], $2::bigint[]) AS u(id, token)
WHERE m.id = u.id AND m.lease_token = u.token AND m.state = 'running'
RETURNING m.id;

-- name: rescue_expired
-- Messages whose worker stopped heartbeating go back in line at once. Losing a worker is not the
-- message's fault: the attempt is given back and the takeover counted. Reads the running
-- messages (messages_running), a set as small as the fleet's concurrency.
UPDATE fleet.messages m
SET state = 'queued', attempts = greatest(m.attempts - 1, 0), takeovers = m.takeovers + 1,
    run_after = clock_timestamp(),
    lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
WHERE m.id IN (SELECT id FROM fleet.messages
               WHERE state = 'running' AND lease_expires_at < clock_timestamp()
               ORDER BY lease_expires_at
               LIMIT 1000
               FOR UPDATE SKIP LOCKED)
RETURNING m.id;

-- name: park
-- A turn paused for a human: the message waits, still its session's head, holding no lease.
-- Its reply waiters, if any, are told (they report the approval it waits on).
WITH parked AS (
    UPDATE fleet.messages
    SET state = 'awaiting_approval', lease_owner = NULL, lease_token = NULL,
        lease_expires_at = NULL
    WHERE id = $1 AND lease_token = $2 AND state = 'running'
    RETURNING id, reply_awaited
)
SELECT id, fleet.notify_outcome(CASE WHEN reply_awaited THEN ARRAY[id] END) FROM parked;

-- name: unpark
-- A decision arrived: the parked message is claimable again (its run is resumed by whichever
-- worker claims it), and the fleet is woken at commit.
WITH unparked AS (
    UPDATE fleet.messages
    SET state = 'queued', run_after = clock_timestamp()
    WHERE id = $1 AND state = 'awaiting_approval'
    RETURNING id
)
SELECT id, pg_notify('fleet_wakeup', '') FROM unparked;

-- name: lease_held
-- Lock a message row if this worker still holds its lease (fencing for writes that go with it).
SELECT id FROM fleet.messages
WHERE id = $1 AND lease_token = $2 AND state = 'running'
FOR UPDATE;

-- name: cancel
-- Cancel a message that no worker holds (queued, or parked for approval).
SELECT fleet.finish_unleased($1, 'cancelled', NULL, $2, ARRAY['queued', 'awaiting_approval']) AS ok;

-- name: await_reply
-- Someone is about to wait for message $1's outcome: finishing or parking it will NOTIFY
-- fleet_outcome with its id (migration 0017). Run before the waiter's first read. The row lock
-- orders this write and the finish's: either the finish sees the mark and notifies, or this
-- statement finds the message no longer queued or running and the read that follows sees why.
UPDATE fleet.messages SET reply_awaited = true
WHERE id = $1 AND state IN ('queued', 'running') AND NOT reply_awaited;

-- name: request_cancel
-- Ask the worker running a message to stop (it sees the request, and the reason $2, with its
-- next heartbeat).
UPDATE fleet.messages SET cancel_requested_at = clock_timestamp(), cancel_reason = $2
WHERE id = $1 AND state = 'running'
RETURNING id;

-- name: parked_ahead
-- A message of the same session, ahead of $2, parked for a human: $2 cannot run before that
-- approval is decided (per-session order).
SELECT id FROM fleet.messages
WHERE session_id = $1 AND id < $2 AND state = 'awaiting_approval'
ORDER BY id LIMIT 1;

-- name: get_message
SELECT id, session_id, agent, body, customer_id, variables, metadata, dedupe_key, state,
       attempts, max_attempts, takeovers, enqueued_at, claimed_at, finished_at, run_after,
       lease_owner, reply, error
FROM fleet.messages WHERE id = $1;

-- name: list_messages
-- Newest first; $1 state (or NULL), $2 limit. One session's: list_session_messages.
SELECT id, session_id, agent, body, customer_id, variables, metadata, dedupe_key, state,
       attempts, max_attempts, takeovers, enqueued_at, claimed_at, finished_at, run_after,
       lease_owner, reply, error
FROM fleet.messages
WHERE ($1::text IS NULL OR state = $1)
ORDER BY id DESC
LIMIT $2;

-- name: list_session_messages
-- A session's messages, newest first; $1 session, $2 state (or NULL), $3 limit. Through
-- fleet.session_messages, which reads the session's three indexes (migrations 0014, 0016).
SELECT id, session_id, agent, body, customer_id, variables, metadata, dedupe_key, state,
       attempts, max_attempts, takeovers, enqueued_at, claimed_at, finished_at, run_after,
       lease_owner, reply, error
FROM fleet.session_messages($1)
WHERE ($2::text IS NULL OR state = $2)
ORDER BY id DESC
LIMIT $3;

-- name: live_state_counts
-- Messages per waiting or running state, with the age of each state's oldest: the two halves of
-- the condition are the predicates of the waiting and the running partial indexes, so the
-- planner ORs those and never reads the finished history (as fleet.session_messages does).
SELECT state, count(*)::bigint AS n,
       extract(epoch FROM clock_timestamp() - min(enqueued_at))::float8 AS oldest_age_seconds
FROM fleet.messages WHERE state IN ('queued', 'awaiting_approval') OR state = 'running'
GROUP BY state;

-- name: finished_state_counts
-- Messages per finished state, with the age of each state's oldest: every finished message is
-- read, so this costs as much as the history is long (377 ms of two cores at 3 million
-- messages: bench/queue_probes.py history-reads). The metrics collector runs it on a budget
-- (fleet/metrics_server.py).
SELECT state, count(*)::bigint AS n,
       extract(epoch FROM clock_timestamp() - min(enqueued_at))::float8 AS oldest_age_seconds
FROM fleet.messages WHERE state IN ('done', 'dead', 'cancelled') GROUP BY state;

-- name: prune_finished
-- Retention (`fleet prune`), one batch, one transaction: of the $2 messages after id $1 (in id
-- order, through the primary key), delete the finished ones (done, dead, cancelled) that
-- finished more than $3 (an interval) before this transaction began. Kept: live messages, and
-- any message an approval refers to (run_states is the record of a decision about money).
-- Returns how many went, the batch's last id (the next batch starts after it; NULL: no
-- message after $1) and whether every message of the batch was enqueued after the cutoff
-- (then nothing further finished before it: ids follow enqueue order, but for transactions
-- that overlapped, which the next run catches).
-- Batches by id rather than one DELETE: a long transaction holds back every vacuum of the
-- queue tables (BENCHMARKS.md, the repair_heads collapse), and the finished index has no time
-- order to walk.
WITH batch AS (
    SELECT id, enqueued_at FROM fleet.messages WHERE id > $1 ORDER BY id LIMIT $2
), gone AS (
    DELETE FROM fleet.messages m
    WHERE m.id = ANY (ARRAY(SELECT id FROM batch))
      AND m.state IN ('done', 'dead', 'cancelled') AND m.finished_at < now() - $3::interval
      AND (SELECT true FROM run_states r WHERE r.message_id = m.id LIMIT 1) IS NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone)::bigint AS deleted,
       (SELECT max(id) FROM batch) AS last_id,
       coalesce((SELECT min(enqueued_at) >= now() - $3::interval FROM batch), true)
           AS past_cutoff;

-- name: has_unfinished_work
-- Whether any message is still queued or running (drain mode's exit test). Reads the partial
-- indexes of waiting and of running messages, never the finished history.
SELECT EXISTS (SELECT 1 FROM fleet.messages WHERE state = 'queued')
    OR EXISTS (SELECT 1 FROM fleet.messages WHERE state = 'running') AS busy;

-- name: oldest_queued_age
-- Age of the oldest message that is due and waiting for a worker.
SELECT coalesce(extract(epoch FROM clock_timestamp() - min(enqueued_at)), 0)::float8 AS age
FROM fleet.messages WHERE state = 'queued' AND is_head AND run_after <= clock_timestamp();

-- name: worker_register
INSERT INTO fleet.workers (worker_id, hostname, pid, concurrency, handler)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (worker_id) DO UPDATE SET last_seen_at = now();

-- name: worker_seen
UPDATE fleet.workers SET last_seen_at = now() WHERE worker_id = $1;

-- name: worker_unregister
DELETE FROM fleet.workers WHERE worker_id = $1;

-- name: workers_prune
-- Forget workers silent for $1 seconds (they died without unregistering).
DELETE FROM fleet.workers WHERE last_seen_at < now() - make_interval(secs => $1);

-- name: live_workers
SELECT worker_id, hostname, pid, concurrency, handler, started_at, last_seen_at
FROM fleet.workers WHERE last_seen_at > now() - make_interval(secs => $1)
ORDER BY started_at;

-- name: repair_heads
SELECT fleet.repair_heads(100) AS repaired;

-- name: repair_sessions
-- Sessions named by fleet_repair notifications ($1): a head for each that lost its own.
SELECT fleet.repair_sessions($1::text[]) AS repaired;

-- name: approval_for_message
-- The approval a parked message waits on.
SELECT id::text FROM run_states
WHERE message_id = $1 AND status = 'awaiting'
ORDER BY requested_at DESC LIMIT 1;

-- name: list_sessions
-- Sessions whose metadata contains $1 (a JSON object; '{}' matches all), newest first, with
-- their message counts. The containment test uses the sessions_metadata GIN index; only the
-- sessions listed are counted (the LATERAL comes after the LIMIT).
SELECT listed.session_id, listed.metadata, listed.created_at, counted.messages,
       counted.last_message_at
FROM (SELECT s.session_id, s.metadata, s.created_at
      FROM fleet.sessions s
      WHERE s.metadata @> $1::jsonb
      ORDER BY s.created_at DESC, s.session_id
      LIMIT $2) AS listed
CROSS JOIN LATERAL (SELECT count(*) AS messages, max(m.enqueued_at) AS last_message_at
                    FROM fleet.session_messages(listed.session_id) m) AS counted
ORDER BY listed.created_at DESC, listed.session_id;
