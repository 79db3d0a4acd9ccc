-- The system of record (course Concepts 7-10, Decisions 3, 5, 6 and 10).
--
-- Concept 7's five tables keep the course's names, columns and CHECK constraints, so the
-- course's queries (Decision 8's replay, Decision 5's read-back) run unchanged:
--   conversations, documents, embeddings, audit_log, capability_invocations.
-- The business tables the customer-data MCP server reads and writes:
--   customers, orders, tickets, refunds.
-- And run_states, one row per paused tool approval (Decision 10; 0003 adds the decision
-- bookkeeping).
--
-- The width of the vector column follows the configured embedding model
-- ({{EMBEDDING_MODEL}}, {{EMBEDDING_DIM}} dimensions); `fleet reembed` changes it later when the
-- model changes. Every embeddings row records the model that produced it, which is how mixing
-- two models is detected and refused.

CREATE EXTENSION IF NOT EXISTS vector;

-- 1. CONVERSATIONS: the cover sheet of a session; the worker upserts it at message_received,
-- before any audit row points at it. session_id == fleet.messages.session_id.
CREATE TABLE conversations (
    session_id  text PRIMARY KEY,
    user_id     text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    summary     text
);
CREATE INDEX idx_conversations_user ON conversations (user_id, started_at DESC);

-- 2. DOCUMENTS: the reference library. `source` says what kind of text it is, so a search can
-- keep an old chat from posing as policy ('policy_library', 'kb_article', 'past_case', ...).
CREATE TABLE documents (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    source      text NOT NULL CHECK (source ~ '^[a-z][a-z0-9_]*$'),
    title       text NOT NULL,
    body        text NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_documents_source ON documents (source);
-- The documents -> tickets link of find_similar_resolved_tickets is metadata->>'ticket_id'
-- (there is no ticket_id column, as in the course); one past case per ticket, which also makes
-- `fleet seed` idempotent. Policies are keyed by their slug the same way.
CREATE UNIQUE INDEX documents_past_case_ticket ON documents ((metadata->>'ticket_id'))
    WHERE source = 'past_case';
CREATE UNIQUE INDEX documents_policy_slug ON documents ((metadata->>'slug'))
    WHERE source = 'policy_library';

-- 3. EMBEDDINGS: chunks of documents (or of past conversations), each with its vector and
-- the model that made it.
CREATE TABLE embeddings (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    document_id      uuid REFERENCES documents(id) ON DELETE CASCADE,
    conversation_id  text REFERENCES conversations(session_id) ON DELETE CASCADE,
    chunk_text       text NOT NULL,
    chunk_index      int NOT NULL CHECK (chunk_index >= 0),
    embedding        vector({{EMBEDDING_DIM}}) NOT NULL,
    model            text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((document_id IS NOT NULL)::int + (conversation_id IS NOT NULL)::int = 1)
);
-- The key index for semantic search: HNSW, cosine distance (<=>).
CREATE INDEX idx_embeddings_hnsw ON embeddings USING hnsw (embedding vector_cosine_ops);
-- One row per chunk; re-seeding or re-embedding a document replaces its chunks.
CREATE UNIQUE INDEX embeddings_document_chunk ON embeddings (document_id, chunk_index)
    WHERE document_id IS NOT NULL;
CREATE INDEX embeddings_conversation ON embeddings (conversation_id) WHERE conversation_id IS NOT NULL;
-- The mixed-model check before every search ("any row whose model is not mine?") and
-- `fleet reembed`'s batches read this index, not the table.
CREATE INDEX embeddings_model ON embeddings (model);

-- 4. AUDIT_LOG: the replayable trace. Closed vocabulary; widening it is a migration that
-- drops and re-adds the constraint named audit_log_action_check (0003 shows how).
CREATE TABLE audit_log (
    id               bigserial PRIMARY KEY,
    conversation_id  text REFERENCES conversations(session_id) ON DELETE SET NULL,
    actor            text NOT NULL,
    action           text NOT NULL CONSTRAINT audit_log_action_check CHECK (action IN (
                         'message_received', 'message_sent', 'skill_activated',
                         'capability_invoked', 'refund_issued', 'refund_blocked',
                         'guardrail_tripped', 'corpus_seeded')),
    target           text,
    payload          jsonb NOT NULL,
    result           jsonb,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_audit_conv ON audit_log (conversation_id, created_at);
CREATE INDEX idx_audit_action ON audit_log (action, created_at);

-- 5. CAPABILITY_INVOCATIONS: every skill or tool call, for replay and metrics.
CREATE TABLE capability_invocations (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    conversation_id  text NOT NULL REFERENCES conversations(session_id) ON DELETE CASCADE,
    capability       text NOT NULL,
    arguments        jsonb NOT NULL,
    result           jsonb,
    status           text NOT NULL CHECK (status IN ('ok', 'error', 'blocked', 'timeout')),
    latency_ms       int,
    cost_cents       int,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_cap_conv ON capability_invocations (conversation_id, created_at);

-- Business tables -------------------------------------------------------------------------

-- Emails are stored trimmed and lower-cased so find_customer_by_email is one index lookup.
-- The tier lives in metadata->>'tier' (the course's shape); absent means 'standard'.
CREATE TABLE customers (
    id          text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,64}$'),
    email       text NOT NULL UNIQUE CHECK (email = lower(btrim(email)) AND email LIKE '%_@_%'),
    name        text NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb
                CHECK (metadata->>'tier' IS NULL
                       OR metadata->>'tier' IN ('standard', 'pro', 'enterprise')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Money is integer cents, never a float. Refunds so far are summed from `refunds`, never
-- stored twice; `status` says where the order stands.
CREATE TABLE orders (
    id            text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,64}$'),
    customer_id   text NOT NULL REFERENCES customers(id),
    amount_cents  int NOT NULL CHECK (amount_cents > 0),
    currency      text NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
    status        text NOT NULL CHECK (status IN ('pending', 'paid', 'shipped', 'delivered',
                      'cancelled', 'partially_refunded', 'refunded')),
    description   text NOT NULL DEFAULT '',
    placed_at     timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_customer ON orders (customer_id, placed_at DESC);

CREATE TABLE tickets (
    id           text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,64}$'),
    customer_id  text NOT NULL REFERENCES customers(id),
    order_id     text REFERENCES orders(id),
    subject      text NOT NULL,
    body         text NOT NULL,
    category     text NOT NULL DEFAULT 'general',
    status       text NOT NULL DEFAULT 'open'
                 CHECK (status IN ('open', 'pending', 'resolved', 'closed')),
    resolution   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    -- A resolved case says how it was resolved: that is what the library is for.
    CHECK (status NOT IN ('resolved', 'closed') OR (resolution IS NOT NULL AND resolved_at IS NOT NULL))
);
CREATE INDEX tickets_customer_status ON tickets (customer_id, status);

-- issue_refund writes one row here, the order's new status and the refund_issued audit row in
-- one transaction. idempotency_key is the client's key (derived from the tool call id): a
-- repeat finds the first refund instead of writing a second one.
CREATE TABLE refunds (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    order_id         text NOT NULL REFERENCES orders(id),
    amount_cents     int NOT NULL CHECK (amount_cents > 0),
    reason           text NOT NULL CHECK (btrim(reason) <> ''),
    idempotency_key  text UNIQUE CHECK (idempotency_key <> ''),
    conversation_id  text REFERENCES conversations(session_id) ON DELETE SET NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX refunds_order ON refunds (order_id);

-- Paused runs awaiting a human decision (Decision 10). `state` is the SDK's serialized
-- RunState; it never leaves the database towards a client.
CREATE TABLE run_states (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    conversation_id  text NOT NULL REFERENCES conversations(session_id),
    message_id       bigint REFERENCES fleet.messages(id),
    tool             text NOT NULL,
    arguments        jsonb NOT NULL,
    call_id          text NOT NULL,
    interruptions    jsonb NOT NULL DEFAULT '[]'::jsonb,
    state            text NOT NULL,
    status           text NOT NULL DEFAULT 'awaiting'
                     CHECK (status IN ('awaiting', 'approved', 'rejected', 'resumed')),
    requested_at     timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    decided_by       text,
    decided_at       timestamptz,
    decision_note    text,
    resumed_at       timestamptz,
    resume_token     bigint
);
CREATE INDEX run_states_conversation ON run_states (conversation_id, requested_at);
