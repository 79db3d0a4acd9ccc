-- The queue's tables, in schema fleet. Its functions live in queue_sql/functions.sql (re-applied
-- by `fleet migrate` whenever they change); the statements the worker runs live in
-- queue_sql/queries.sql.
--
-- Per-session order rests on one column: exactly one live message per session is the session's
-- "head" (is_head), and only heads are claimable. A head stays head while it is queued for a
-- retry, running or awaiting approval, so later messages of its session wait behind it; when it
-- finishes (done/dead/cancelled) the next live message of the session is promoted. The claim
-- therefore reads a partial index of claimable heads and costs O(batch), whatever the backlog.

CREATE SCHEMA IF NOT EXISTS fleet;

CREATE SEQUENCE fleet.lease_tokens;

-- One row per conversation the queue has seen: its metadata (set at first enqueue) and the row
-- that enqueue and completion lock to serialise head promotion for that session.
CREATE TABLE fleet.sessions (
    session_id  text PRIMARY KEY,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT sessions_metadata_object CHECK (jsonb_typeof(metadata) = 'object')
);
CREATE INDEX sessions_metadata ON fleet.sessions USING gin (metadata jsonb_path_ops);

CREATE TABLE fleet.messages (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id        text NOT NULL REFERENCES fleet.sessions (session_id),
    agent             text NOT NULL DEFAULT 'support',
    body              text NOT NULL,
    customer_id       text,
    variables         jsonb NOT NULL DEFAULT '{}'::jsonb,
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    dedupe_key        text,
    state             text NOT NULL DEFAULT 'queued',
    is_head           boolean NOT NULL DEFAULT false,
    attempts          integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL DEFAULT 5,
    takeovers         integer NOT NULL DEFAULT 0,
    run_after         timestamptz NOT NULL DEFAULT now(),
    enqueued_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    claimed_at        timestamptz,
    finished_at       timestamptz,
    lease_owner       text,
    lease_token       bigint,
    lease_expires_at  timestamptz,
    reply             text,
    error             text,
    CONSTRAINT messages_state_valid
        CHECK (state IN ('queued', 'running', 'awaiting_approval', 'done', 'dead', 'cancelled')),
    CONSTRAINT messages_session_id_valid
        CHECK (session_id ~ '^[^[:cntrl:][:space:]]{1,128}$'),
    CONSTRAINT messages_body_not_empty CHECK (body ~ '[^[:space:]]'),
    CONSTRAINT messages_body_size CHECK (octet_length(body) <= 16384),
    CONSTRAINT messages_metadata_size
        CHECK (jsonb_typeof(metadata) = 'object' AND octet_length(metadata::text) <= 16384),
    CONSTRAINT messages_variables_size
        CHECK (jsonb_typeof(variables) = 'object' AND octet_length(variables::text) <= 16384),
    CONSTRAINT messages_dedupe_key_size CHECK (octet_length(dedupe_key) BETWEEN 1 AND 256),
    CONSTRAINT messages_done_has_reply CHECK (state <> 'done' OR reply IS NOT NULL),
    CONSTRAINT messages_running_has_lease
        CHECK (state <> 'running' OR (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT messages_attempts_valid CHECK (attempts >= 0 AND max_attempts >= 1)
);

-- The claim reads only this: claimable heads in due order. Finished rows are not in it.
CREATE INDEX messages_claimable ON fleet.messages (run_after, id)
    WHERE state = 'queued' AND is_head;
-- Lease expiry rescue reads only running rows.
CREATE INDEX messages_leases ON fleet.messages (lease_expires_at) WHERE state = 'running';
-- Head promotion: the earliest live message of a session.
CREATE INDEX messages_session_live ON fleet.messages (session_id, id)
    WHERE state IN ('queued', 'running', 'awaiting_approval');
-- `fleet messages --session`, the client's history.
CREATE INDEX messages_session ON fleet.messages (session_id, id);
CREATE UNIQUE INDEX messages_dedupe_key ON fleet.messages (dedupe_key)
    WHERE dedupe_key IS NOT NULL;

-- Live worker processes, for `fleet status` and the workers-alive metric.
CREATE TABLE fleet.workers (
    worker_id     text PRIMARY KEY,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    concurrency   integer NOT NULL,
    handler       text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);
