-- The queue's server-side functions. `fleet migrate` re-applies this file (CREATE OR REPLACE)
-- whenever its content changes, after the numbered migrations, under the migration lock.
--
-- Locking rule: whoever changes which message is a session's head holds the session's row lock
-- in fleet.sessions (SELECT ... FOR NO KEY UPDATE) while doing it. Enqueue takes it at COMMIT
-- time only (a deferred trigger), so a caller's long transaction never blocks the workers. Row
-- locks rather than advisory locks: they live in the tuple, so a bulk enqueue of 100k sessions
-- in one transaction cannot exhaust the shared lock table, and they behave the same behind
-- PgBouncer. NO KEY UPDATE, never FOR UPDATE: the INSERT of a message holds a KEY SHARE lock on
-- its session (the foreign key) until its transaction ends, which FOR UPDATE waits for and NO
-- KEY UPDATE does not. With FOR UPDATE, two open transactions that had each enqueued into the
-- same session deadlocked at their commits, each election waiting for the other's KEY SHARE.

-- enqueue --------------------------------------------------------------------------------------

-- The rules a message must meet to be enqueued, in one place for fleet.enqueue and
-- fleet.enqueue_many: what is wrong with a message, first rule first, or NULL. The answer is
-- the SQLSTATE to raise, a space, and the words (`22023 body must not be empty`).
-- `agent_known` is the caller's lookup of `agent` in fleet.agents: with that subquery in its
-- body the function would not be inlined. One CASE in a SQL function: the planner inlines it
-- into the calling statement, so fleet.enqueue_many checks a whole batch in one statement with
-- no function call per message (with a PL/pgSQL call per message, a new-session message cost
-- 50-52 against 42 us in batches of 500; bench/queue_probes.py enqueue-cost). STABLE, not
-- IMMUTABLE: `text || integer` is STABLE, and a function declared less volatile than its body
-- is not inlined.
CREATE OR REPLACE FUNCTION fleet.message_problem(
    session_id   text,
    body         text,
    dedupe_key   text,
    metadata     jsonb,
    agent        text,
    agent_known  boolean,
    variables    jsonb,
    max_attempts integer
) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN session_id IS NULL THEN '22004 session_id must not be NULL'
        -- Spaces and control characters by code point, by the same functions as the domains
        -- (0022): the locale's [:space:] and [:cntrl:] differ between servers. A length test and
        -- a one-character class rather than a counted regex: ~18 times faster (0013).
        WHEN length(session_id) NOT BETWEEN 1 AND 128 OR fleet.has_space_or_control(session_id)
            THEN '22023 session_id must be 1 to 128 characters with no spaces or control characters'
        WHEN body IS NULL OR fleet.is_blank(body)
            THEN '22023 body must not be empty'
        WHEN octet_length(body) > 16384
            THEN '22001 body is ' || octet_length(body) || ' bytes; the limit is 16384'
        WHEN metadata IS NOT NULL AND (jsonb_typeof(metadata) <> 'object'
                                       OR octet_length(metadata::text) > 16384)
            THEN '22023 metadata must be a JSON object of at most 16384 bytes'
        WHEN variables IS NOT NULL AND (jsonb_typeof(variables) <> 'object'
                                        OR octet_length(variables::text) > 16384)
            THEN '22023 variables must be a JSON object of at most 16384 bytes'
        WHEN dedupe_key IS NOT NULL AND octet_length(dedupe_key) NOT BETWEEN 1 AND 256
            THEN '22023 dedupe_key must be 1 to 256 bytes'
        WHEN max_attempts IS NOT NULL AND max_attempts < 1
            THEN '22023 max_attempts must be at least 1'
        -- A message for an agent nobody defined would wait forever (no worker can serve it).
        WHEN agent IS NOT NULL AND NOT agent_known
            THEN '22023 unknown agent ' || quote_literal(agent)
                 || '; define it with fleet agents create'
    END
$$;

-- fleet.message_problem raised, after `context` (which call, and for a batch which message);
-- the caller's statement then writes nothing.
CREATE OR REPLACE FUNCTION fleet.check_message(
    context      text,
    session_id   text,
    body         text,
    dedupe_key   text,
    metadata     jsonb,
    agent        text,
    variables    jsonb,
    max_attempts integer
) RETURNS void
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_variable
DECLARE
    known   boolean := true;
    problem text;
BEGIN
    -- Apart, so that the call below is a simple expression (no subquery), evaluated without
    -- the executor. In it, the lookup would make PostgreSQL plan it afresh at every call: a
    -- plan for the call's own values folds `agent IS NULL OR EXISTS (...)` away, and one for
    -- any values keeps the subquery, so it never settles on the latter (enqueue-cost, batches
    -- of 9: 270-330 against 132 us an enqueue).
    IF agent IS NOT NULL THEN
        known := EXISTS (SELECT 1 FROM fleet.agents a WHERE a.name = agent);
    END IF;
    problem := fleet.message_problem(session_id, body, dedupe_key, metadata, agent, known,
                                     variables, max_attempts);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%: %', context, substr(problem, 7) USING ERRCODE = left(problem, 5);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION fleet.enqueue(
    session_id   text,
    body         text,
    customer_id  text DEFAULT NULL,
    dedupe_key   text DEFAULT NULL,
    metadata     jsonb DEFAULT '{}'::jsonb,
    agent        text DEFAULT NULL,
    variables    jsonb DEFAULT '{}'::jsonb,
    max_attempts integer DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id      bigint;
    new_session boolean;
BEGIN
    PERFORM fleet.check_message('fleet.enqueue', enqueue.session_id, enqueue.body,
                                enqueue.dedupe_key, enqueue.metadata, enqueue.agent,
                                enqueue.variables, enqueue.max_attempts);

    IF enqueue.dedupe_key IS NOT NULL THEN
        -- A repeated key returns the first message's id and writes nothing (it used to insert
        -- the session row and delete it again, leaving a dead tuple). A key taken by another
        -- transaction after this look is caught by the INSERT's ON CONFLICT below.
        SELECT m.id INTO new_id FROM fleet.messages m WHERE m.dedupe_key = enqueue.dedupe_key;
        IF FOUND THEN
            RETURN new_id;
        END IF;
    END IF;

    -- Session metadata is set by the first enqueue of a session and kept afterwards.
    INSERT INTO fleet.sessions AS s (session_id, metadata)
    VALUES (enqueue.session_id, coalesce(enqueue.metadata, '{}'::jsonb))
    ON CONFLICT DO NOTHING
    RETURNING true INTO new_session;

    -- The first message of a new conversation is its head at once: nobody else can have a
    -- message in a session whose row this transaction has just inserted (a concurrent first
    -- enqueue of the same session waits on that row's key until we commit, then takes the
    -- usual path). It skips the election at commit (the trigger's WHEN), which costs a lock,
    -- two reads and a second write of the row: about half of an enqueue's PostgreSQL CPU.
    INSERT INTO fleet.messages AS m
        (session_id, body, customer_id, dedupe_key, metadata, agent, variables, max_attempts,
         is_head)
    VALUES (enqueue.session_id, enqueue.body, enqueue.customer_id, enqueue.dedupe_key,
            coalesce(enqueue.metadata, '{}'::jsonb), coalesce(enqueue.agent, 'support'),
            coalesce(enqueue.variables, '{}'::jsonb),
            coalesce(enqueue.max_attempts,
                     nullif(current_setting('fleet.max_attempts', true), '')::integer, 5),
            coalesce(new_session, false))
    ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
    RETURNING m.id INTO new_id;

    IF new_id IS NULL THEN
        SELECT m.id INTO new_id FROM fleet.messages m WHERE m.dedupe_key = enqueue.dedupe_key;
        IF new_session THEN
            -- A repeated dedupe key enqueues nothing, so it does not start a conversation
            -- either: the session row this call created goes (no other transaction can have
            -- used it yet), and the session's real first message sets its metadata.
            DELETE FROM fleet.sessions s WHERE s.session_id = enqueue.session_id;
        END IF;
    ELSIF new_session THEN
        PERFORM pg_notify('fleet_wakeup', '');  -- delivered at commit, like the election's
    END IF;
    RETURN new_id;
END
$$;

COMMENT ON FUNCTION fleet.enqueue(text, text, text, text, jsonb, text, jsonb, integer) IS
    'Enqueue a message inside the caller''s transaction; returns its id (the existing id when dedupe_key repeats). Workers are woken at commit.';

-- What is wrong with one field of a fleet.enqueue_many element, if anything its JSON type can
-- tell: unknown names, and values of the wrong JSON type. Values are judged by message_problem.
CREATE OR REPLACE FUNCTION fleet.enqueue_field_problem(field text, value jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN field NOT IN ('session_id', 'body', 'customer_id', 'dedupe_key', 'metadata', 'agent',
                           'variables', 'max_attempts')
            THEN 'unknown field ' || quote_literal(field)
        WHEN jsonb_typeof(value) = 'null' OR field IN ('metadata', 'variables') THEN NULL
        WHEN field = 'max_attempts' THEN
            CASE WHEN jsonb_typeof(value) <> 'number'
                      OR value::text::numeric <> trunc(value::text::numeric)
                      OR abs(value::text::numeric) > 2147483647
                 THEN 'max_attempts must be a whole number up to 2147483647' END
        WHEN jsonb_typeof(value) <> 'string' THEN field || ' must be a string'
    END
$$;

-- Enqueue a batch in one statement: the same as calling fleet.enqueue for each element in
-- order (the same rules, dedupe keys, session metadata, heads and wake-ups), and all or nothing.
-- `messages` is a JSON array of objects whose keys are fleet.enqueue's argument names. Returns
-- the ids in the array's order (the existing id where a dedupe key repeats, earlier in the
-- table or in the batch).
--
-- Why a batch function: much of an enqueue's PostgreSQL time is per statement, not per row (the
-- executor's start-up, and the table's CHECK constraints parsed from the catalog for each
-- INSERT). Backend CPU per new-session message, commit included (bench/queue_probes.py
-- enqueue-cost, 2026-12-02): ~80 us through fleet.enqueue and 42 us through this in batches of
-- 500 (50-52 us while the rules were a PL/pgSQL call per message); ~132 and 106-111 us in
-- batches of 9 (114-132 us before), where this function's own statements weigh.
CREATE OR REPLACE FUNCTION fleet.enqueue_many(messages jsonb) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    total     integer;
    sids      text[];
    bodies    text[];
    customers text[];
    keys      text[];
    metas     jsonb[];
    agent_of  text[];
    vars      jsonb[];
    tries     integer[];
    known     bigint[];   -- the id its dedupe key already had in the table
    repeated  boolean[];  -- its dedupe key was seen before: in the table or earlier in the batch
    fresh     text[];     -- sessions this call created
    keyless   bigint[];   -- ids inserted for messages without a dedupe key, ascending
    keyed     boolean;    -- any dedupe key at all
    expected  integer;    -- messages to insert: those whose key was not seen before
    written   integer;
    heads     integer;
    bad       record;
BEGIN
    IF messages IS NULL OR jsonb_typeof(messages) <> 'array' THEN
        RAISE EXCEPTION 'fleet.enqueue_many: messages must be a JSON array of objects'
            USING ERRCODE = '22023';
    END IF;
    SELECT p.n, p.problem INTO bad
    FROM (SELECT e.n,
                 CASE WHEN jsonb_typeof(e.m) <> 'object'
                      THEN 'must be a JSON object, not ' || jsonb_typeof(e.m)
                      ELSE (SELECT min(fleet.enqueue_field_problem(f.key, f.value))
                            FROM jsonb_each(e.m) AS f) END AS problem
          FROM jsonb_array_elements(messages) WITH ORDINALITY AS e(m, n)) AS p
    WHERE p.problem IS NOT NULL
    ORDER BY p.n LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'fleet.enqueue_many: message %: %', bad.n, bad.problem
            USING ERRCODE = '22023';
    END IF;

    SELECT array_agg(e.m ->> 'session_id' ORDER BY e.n), array_agg(e.m ->> 'body' ORDER BY e.n),
           array_agg(e.m ->> 'customer_id' ORDER BY e.n),
           array_agg(e.m ->> 'dedupe_key' ORDER BY e.n),
           array_agg(nullif(e.m -> 'metadata', 'null') ORDER BY e.n),
           array_agg(e.m ->> 'agent' ORDER BY e.n),
           array_agg(nullif(e.m -> 'variables', 'null') ORDER BY e.n),
           array_agg((e.m ->> 'max_attempts')::numeric::integer ORDER BY e.n)
    INTO sids, bodies, customers, keys, metas, agent_of, vars, tries
    FROM jsonb_array_elements(messages) WITH ORDINALITY AS e(m, n);
    total := coalesce(cardinality(sids), 0);
    IF total = 0 THEN
        RETURN '{}';
    END IF;
    -- One statement for all of them, the rules inlined (fleet.message_problem); the first
    -- message in order that breaks one raises.
    SELECT u.n, u.problem INTO bad
    FROM (SELECT u.n,
                 fleet.message_problem(
                     u.sid, u.body, u.k, u.meta, u.agent,
                     u.agent IS NULL
                         OR EXISTS (SELECT 1 FROM fleet.agents a WHERE a.name = u.agent),
                     u.vars, u.tries) AS problem
          FROM unnest(sids, bodies, keys, metas, agent_of, vars, tries)
               WITH ORDINALITY AS u(sid, body, k, meta, agent, vars, tries, n)) AS u
    WHERE u.problem IS NOT NULL
    ORDER BY u.n LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'fleet.enqueue_many: message %: %', bad.n, substr(bad.problem, 7)
            USING ERRCODE = left(bad.problem, 5);
    END IF;

    keyed := keys <> array_fill(NULL::text, ARRAY[total]);
    IF keyed THEN
        known := ARRAY(SELECT (SELECT m.id FROM fleet.messages m WHERE m.dedupe_key = u.k)
                       FROM unnest(keys) WITH ORDINALITY AS u(k, n) ORDER BY u.n);
        repeated := ARRAY(
            SELECT known[u.n] IS NOT NULL
                   OR coalesce(u.k = ANY (keys[1 : u.n - 1]), false)  -- NULL: no match
            FROM unnest(keys) WITH ORDINALITY AS u(k, n) ORDER BY u.n);
        expected := cardinality(array_positions(repeated, false));
    ELSE
        repeated := array_fill(false, ARRAY[total]);  -- no dedupe keys, the common case
        expected := total;
    END IF;

    -- In session order, so that two batches creating the same sessions cannot deadlock. A
    -- session's metadata comes from its first message that is enqueued (not a repeat).
    WITH created AS (
        INSERT INTO fleet.sessions AS s (session_id, metadata)
        SELECT DISTINCT ON (u.sid) u.sid, coalesce(u.meta, '{}')
        FROM unnest(sids, metas, repeated) WITH ORDINALITY AS u(sid, meta, rep, n)
        WHERE NOT u.rep
        ORDER BY u.sid, u.n
        ON CONFLICT DO NOTHING
        RETURNING s.session_id)
    SELECT coalesce(array_agg(session_id), '{}') INTO fresh FROM created;

    -- The first message of each created session is its head at once (see fleet.enqueue); the
    -- others are elected at commit by the trigger. Rows are inserted in session order, each
    -- session's in the array's order, and identity values are drawn as rows are inserted, so
    -- ids ascend in that order: a session's messages keep their order, and the elections at
    -- commit, one per row in insertion order, take their sessions' locks in session order, as
    -- a finish and every other enqueue_many do (in the array's order, two batches naming the
    -- same live sessions in different orders deadlocked at their commits).
    WITH inserted AS (
        INSERT INTO fleet.messages AS m
            (session_id, body, customer_id, dedupe_key, metadata, agent, variables, max_attempts,
             is_head)
        SELECT u.sid, u.body, u.customer, u.k, coalesce(u.meta, '{}'),
               coalesce(u.agent, 'support'), coalesce(u.vars, '{}'),
               coalesce(u.tries, nullif(current_setting('fleet.max_attempts', true), '')::integer,
                        5),
               u.sid = ANY (fresh) AND row_number() OVER (PARTITION BY u.sid ORDER BY u.n) = 1
        FROM unnest(sids, bodies, customers, keys, metas, agent_of, vars, tries, repeated)
             WITH ORDINALITY AS u(sid, body, customer, k, meta, agent, vars, tries, rep, n)
        WHERE NOT u.rep
        ORDER BY u.sid, u.n
        ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
        RETURNING m.id, m.dedupe_key, m.is_head)
    SELECT array_agg(id ORDER BY id) FILTER (WHERE dedupe_key IS NULL), count(*),
           count(*) FILTER (WHERE is_head)
    INTO keyless, written, heads
    FROM inserted;

    -- A key enqueued by a concurrent transaction since the check above was skipped by the
    -- INSERT; a session created for it alone goes, as in fleet.enqueue. (A session this call
    -- created can only hold this call's messages, all queued: the waiting index answers.)
    IF written < expected THEN
        DELETE FROM fleet.sessions s
        WHERE s.session_id = ANY (fresh)
          AND (SELECT true FROM fleet.messages m
               WHERE m.session_id = s.session_id AND m.state = 'queued' LIMIT 1) IS NULL;
    END IF;
    IF heads > 0 THEN
        PERFORM pg_notify('fleet_wakeup', '');  -- delivered at commit, once
    END IF;

    -- Ids in the array's order. A message without a key takes its turn among the keyless ids,
    -- which were drawn in session order; one with a key, the key's id as found before the
    -- insert, else by its key now (inserted by this call or a concurrent one).
    RETURN ARRAY(
        SELECT CASE WHEN u.k IS NULL THEN keyless[u.turn]
                    ELSE coalesce(known[u.n], (SELECT m.id FROM fleet.messages m
                                               WHERE m.dedupe_key = u.k)) END
        FROM (SELECT e.k, e.n,
                     row_number() OVER (PARTITION BY e.k IS NULL ORDER BY e.sid, e.n) AS turn
              FROM unnest(sids, keys) WITH ORDINALITY AS e(sid, k, n)) AS u
        ORDER BY u.n);
END
$$;

COMMENT ON FUNCTION fleet.enqueue_many(jsonb) IS
    'Enqueue a JSON array of messages (fleet.enqueue''s arguments as keys) in one statement, all or nothing; returns their ids in order.';

-- a session's history ------------------------------------------------------------------------

-- A session's messages, in every state. They are indexed in three parts by state (migrations
-- 0014 and 0016): waiting ones in messages_session_waiting, the running one in
-- messages_running, finished ones in messages_session_finished. Naming the three lets the
-- planner OR their indexes; a bare `session_id = $1` has no index to use and reads the whole
-- table. A one-SELECT SQL function: the planner inlines it into the calling query, so `WHERE`,
-- `ORDER BY` and `LIMIT` around it plan as if written out.
CREATE OR REPLACE FUNCTION fleet.session_messages(session_id text) RETURNS SETOF fleet.messages
LANGUAGE sql STABLE AS $$
    SELECT * FROM fleet.messages m
    WHERE m.session_id = session_messages.session_id
      AND (m.state IN ('queued', 'awaiting_approval') OR m.state = 'running'
           OR m.state IN ('done', 'dead', 'cancelled'))
$$;

-- "Has the session a live head?" is answered in one place, fleet.missing_heads below, for the
-- election at an enqueue's commit, promote_heads and the repairs: three index probes in ONE
-- statement: whether a message is running (messages_running); whether the session's earliest
-- waiting message (messages_session_waiting) is the head; and whether a later waiting message
-- is the head. A session has at most one head: heads are made only under the session's row
-- lock, by a statement that sees every commit (READ COMMITTED), and only when these probes
-- find none. A running message is the head (only heads are claimed, and a head keeps the mark
-- until it finishes). A finish skips them (finish_messages): the message it finishes was the
-- head, so it promotes the earliest waiting message.
--
-- One statement, so one snapshot: the head moves between waiting and running without the
-- session's lock (a claim, a retry, a release, a lease rescue, a park and its decision), so
-- probes made by separate statements could each miss it, the running one before a claim
-- committed and the waiting one after, and make a second head. The election at commit did
-- that until 2026-12-07 (the ninth session), found by a stress run that sampled heads; it
-- now asks fleet.missing_heads like everyone else.
--
-- The head is most often the session's earliest live message, but not always: ids are drawn
-- when a message is inserted and heads are made when it commits, so a message whose
-- transaction commits after a later message of its session has become the head waits behind
-- that head (and is the next one after it: the finish promotes the earliest waiting message).
-- Concurrent transactions' messages go in the order their commits made them visible. The third
-- probe is for that case: without it, the election at the late commit took the session's
-- earliest waiting message, not the head, for a session without one and made it a second head.
-- It reads the session's waiting messages after the earliest one by one, but runs only when
-- the earliest is not the head (written to depend on it, so the planner cannot run it first):
-- for an idle session (its waiting messages are the ones just enqueued) or a headless one.
--
-- In a WHERE clause each probe is a subquery with LIMIT 1 (scalar or LATERAL), never NOT
-- EXISTS. The planner turns NOT EXISTS there into an anti join planned on the table's
-- statistics, and a queue's statistics are whatever ANALYZE saw last, often an empty queue: on
-- 30,000 waiting messages with those, repair_heads' anti join read the whole waiting index once
-- per message (444 million buffers, 151 s, holding back every vacuum meanwhile;
-- bench/queue_probes.py stale-stats). A LIMIT 1 subquery is never made a join: it is planned as
-- one lookup with the session id as its parameter, an index condition whatever the statistics
-- say. fleet.missing_heads takes the whole array of sessions and is called once per statement,
-- in FROM, where PostgreSQL inlines a one-SELECT SQL function: never per row, where a SQL
-- function whose body has a subquery is not inlined, and cost 436 ms on a 20,000-message
-- backlog against 9 ms as joins (repair-heads).

-- For each of these sessions that has waiting messages and no head: the session, and its
-- earliest waiting message, the head it lacks. Takes no lock, and answers as of the calling
-- statement's snapshot; callers that make a head hold the session's row lock first (the
-- election, promote_heads), so nobody else makes one meanwhile, and the repairs look first
-- without it (repair_sessions).
DROP FUNCTION IF EXISTS fleet.headless_sessions(text[]);  -- its name until 2026-12-07
CREATE OR REPLACE FUNCTION fleet.missing_heads(sessions text[])
RETURNS TABLE (session_id text, next_head bigint)
LANGUAGE sql STABLE AS $$
    SELECT w.session_id, e.id
    FROM unnest(sessions) AS w(session_id)
    CROSS JOIN LATERAL (SELECT m.id, m.is_head FROM fleet.messages m
                        WHERE m.session_id = w.session_id
                          AND m.state IN ('queued', 'awaiting_approval')
                        ORDER BY m.id LIMIT 1) AS e
    WHERE NOT e.is_head
      AND (SELECT true FROM fleet.messages r
           WHERE r.session_id = w.session_id AND r.state = 'running' LIMIT 1) IS NULL
      AND (SELECT true FROM fleet.messages h
           WHERE h.session_id = w.session_id AND h.id > e.id
             AND h.state IN ('queued', 'awaiting_approval') AND h.is_head
           ORDER BY h.id LIMIT 1) IS NULL
$$;

-- head election at commit ----------------------------------------------------------------------

-- Deferred to COMMIT: the message becomes its session's head if the session has no live head.
-- Runs for direct INSERTs into fleet.messages too, so enqueueing by plain SQL keeps the rules;
-- not for a row inserted as head already (fleet.enqueue's first message of a new session).
-- The session row exists: the foreign key checked it at the INSERT, and kept it since. (A
-- message inserted and deleted in one transaction still fires this at commit, with NEW the
-- deleted row: its session, if gone too, is not recreated, and no head is elected for it.)
--
-- Under READ COMMITTED each statement below reads what was committed when it started, after
-- the session's row lock: the answer is current. Under REPEATABLE READ or SERIALIZABLE they
-- would read the transaction's first snapshot, blind to what committed since: a head made by
-- another transaction (whose election would then have made this message a second head), or a
-- head that finished (leaving this message to wait with no head). So such a transaction
-- elects nobody: at its commit it names the session on fleet_repair, and a listening worker
-- calls fleet.repair_sessions for it at once, with a fresh snapshot (the periodic
-- repair_heads catches what no worker heard).
CREATE OR REPLACE FUNCTION fleet.elect_head_at_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    next_head bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        -- Identical notifications of one transaction collapse: once per session.
        PERFORM pg_notify('fleet_repair', NEW.session_id);
        RETURN NULL;
    END IF;
    PERFORM 1 FROM fleet.sessions s WHERE s.session_id = NEW.session_id FOR NO KEY UPDATE;
    -- The running probe comes first in the plan (a filter on the session, before the earliest
    -- waiting message is looked up): a message enqueued behind a busy head, the most common
    -- case, costs that one probe.
    SELECT h.next_head INTO next_head FROM fleet.missing_heads(ARRAY[NEW.session_id]) AS h;
    IF FOUND THEN
        -- No head: the earliest waiting message becomes it (no other can appear meanwhile:
        -- making one takes the lock held here). Identical notifications in one transaction
        -- collapse into one: a bulk enqueue wakes the fleet once, and a message queued behind
        -- a busy head wakes nobody.
        UPDATE fleet.messages SET is_head = true WHERE id = next_head;
        PERFORM pg_notify('fleet_wakeup', '');
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS messages_elect_head ON fleet.messages;
CREATE CONSTRAINT TRIGGER messages_elect_head
    AFTER INSERT ON fleet.messages
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NOT NEW.is_head) EXECUTE FUNCTION fleet.elect_head_at_commit();

-- promotion after a head finishes ----------------------------------------------------------------

-- Make the earliest waiting message of each given session its head, for sessions that have
-- none (fleet.missing_heads). Callers hold the sessions' row locks.
CREATE OR REPLACE FUNCTION fleet.promote_heads(sessions text[]) RETURNS integer
LANGUAGE sql AS $$
    WITH promoted AS (
        UPDATE fleet.messages m SET is_head = true
        FROM fleet.missing_heads(sessions) AS h
        WHERE m.id = h.next_head
        RETURNING 1
    )
    SELECT count(*)::integer FROM promoted
$$;

-- Tell the waiters of these messages (reply_awaited, migration 0017) that they finished or
-- were parked: one fleet_outcome notification naming their ids, comma-separated, which each
-- waiter matches against its own. A payload must stay under 8,000 bytes; past that (a batch of
-- some 400 awaited messages) it is empty, which waiters take as "re-read yours". Nothing is
-- sent for an empty or NULL list.
CREATE OR REPLACE FUNCTION fleet.notify_outcome(ids bigint[]) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('fleet_outcome', CASE WHEN octet_length(listed.ids) < 8000
                                           THEN listed.ids ELSE '' END)
    FROM (SELECT array_to_string(notify_outcome.ids, ',') AS ids) AS listed
    WHERE cardinality(notify_outcome.ids) > 0
$$;

-- Finish messages (done/dead/cancelled) and promote their sessions' next messages. Every row is
-- guarded by its lease token (fencing): a worker that lost its lease changes nothing. Returns
-- the ids that were actually finished.
--
-- A message whose session another transaction holds locked is not finished now: the finish
-- skips that lock rather than wait for it, and the worker, seeing its lease still held, writes
-- the outcome again with its next call. The holder is a head change in progress, most often
-- an enqueue's election at commit, which takes its sessions' locks one message at a time in
-- the order they were enqueued; a finish takes its sessions' locks in session order, so a
-- finish that waited could wait for a transaction waiting for it (a deadlock, seen when a
-- producer enqueued into several live sessions at once while workers finished their heads).
--
-- Written so that the generic plan PL/pgSQL caches after a few calls is the right one for any
-- batch: every statement reaches fleet.messages through `id = ANY (...)` (the primary key),
-- and the outcome of each row is looked up by its position in the arrays. An earlier version
-- joined `unnest(ids, tokens, ...)` to the table; its cached generic plan guessed 10 rows for
-- the unnest and nested-looped the outcomes against every running row (0.9 s a call with
-- 100-message batches), so it had to be planned afresh on every call (plan_cache_mode =
-- force_custom_plan), which cost ~40 us of PostgreSQL CPU per message at batch 10.
-- array_position is O(batch) per row: 10,000 comparisons at batch 100, nothing next to a write.
CREATE OR REPLACE FUNCTION fleet.finish_messages(
    ids bigint[], tokens bigint[], states text[], replies text[], errors text[]
) RETURNS SETOF bigint
LANGUAGE plpgsql
AS $$
DECLARE
    locked     text[];    -- the sessions whose locks this call holds (the others are busy)
    finished   bigint[];
    touched    text[];
    awaited    bigint[];  -- finished messages someone waits on (reply_awaited)
    successors bigint[];
BEGIN
    -- = ANY (ARRAY(...)) rather than IN (SELECT ...): the lock is taken through the primary
    -- key, never by hashing a sequential scan of every session.
    -- NO KEY UPDATE (the locking rule, above): it excludes other finishes and the head
    -- election at an enqueue's commit, but not the KEY SHARE lock an INSERT into fleet.messages
    -- takes on its session for the foreign key, so an enqueue into a session whose head is
    -- finishing does not wait for the worker's transaction (now a claim too).
    -- SKIP LOCKED: a busy session's message is left for the worker's next call (above).
    locked := ARRAY(
        SELECT s.session_id FROM fleet.sessions s
        WHERE s.session_id = ANY (ARRAY(SELECT m.session_id FROM fleet.messages m
                                        WHERE m.id = ANY (ids)))
        ORDER BY s.session_id
        FOR NO KEY UPDATE OF s SKIP LOCKED);

    WITH done AS (
        UPDATE fleet.messages m
        SET state = states[array_position(ids, m.id)],
            reply = replies[array_position(ids, m.id)],
            error = errors[array_position(ids, m.id)],
            finished_at = clock_timestamp(),
            is_head = false, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
        WHERE m.id = ANY (ids) AND m.state = 'running'
          AND m.lease_token = tokens[array_position(ids, m.id)]
          AND m.session_id = ANY (locked)
        RETURNING m.id, m.session_id, m.reply_awaited
    )
    SELECT array_agg(id), array_agg(DISTINCT session_id),
           array_agg(id) FILTER (WHERE reply_awaited)
    INTO finished, touched, awaited FROM done;

    IF finished IS NOT NULL THEN
        -- Promote each session's earliest waiting message, without promote_heads()' probe
        -- "has the session a live head?": only heads are ever claimed and a head keeps the
        -- mark until it finishes, so every message just finished was its session's one head
        -- (and its one running message), and we hold the sessions' locks.
        -- Found by a read first and updated only when there is one: a session with nothing
        -- behind it (the common case) costs no UPDATE's executor start-up (the table's CHECK
        -- constraints and indexes).
        successors := ARRAY(
            SELECT nx.id
            FROM unnest(touched) AS t(session_id)
            CROSS JOIN LATERAL (SELECT n.id, n.is_head FROM fleet.messages n
                                WHERE n.session_id = t.session_id
                                  AND n.state IN ('queued', 'awaiting_approval')
                                ORDER BY n.id LIMIT 1) AS nx
            WHERE NOT nx.is_head);
        IF cardinality(successors) > 0 THEN
            UPDATE fleet.messages m SET is_head = true WHERE m.id = ANY (successors);
        END IF;
        -- Only for messages someone waits on (migration 0017), on a channel workers do not
        -- listen to: most batches notify nobody, and (tested here rather than left to
        -- notify_outcome) make no call for it in the worker's cycle.
        IF awaited IS NOT NULL THEN
            PERFORM fleet.notify_outcome(awaited);
        END IF;
        RETURN QUERY SELECT unnest(finished);
    END IF;
END
$$;

-- The worker's cycle in one call, one transaction, one WAL flush: finish the outcomes it has
-- (exactly fleet.finish_messages), then claim up to max_claims heads (exactly the `claim`
-- statement of queue_sql/queries.sql, parameters $1..$5 in the same order; a test checks the
-- two texts match). Separately they were two round trips and two commits per batch.
--
-- The claim runs after the finish as a second statement of the same transaction, so it sees
-- what the finish did: a successor the finish just promoted is claimable at once, which is
-- right (its predecessor is finished in the same commit, and the session's row lock is held
-- until then). The claim takes no other lock and never waits (SKIP LOCKED); completions send
-- no wake-up (fleet_outcome only for messages someone waits on, from finish_messages).
--
-- Returns the claimed messages (the claim's columns) and, for each finished id, a row with only
-- `id` set: `lease_token IS NULL` marks those (a claimed message always has a token).
CREATE OR REPLACE FUNCTION fleet.finish_and_claim(
    worker_id text, max_claims integer, lease_seconds float8, tools text[], skills text[],
    ids bigint[], tokens bigint[], states text[], replies text[], errors text[]
) RETURNS TABLE (id bigint, session_id text, agent text, body text, customer_id text,
                 variables jsonb, metadata jsonb, attempts integer, max_attempts integer,
                 takeovers integer, lease_token bigint, enqueued_at timestamptz,
                 claimed_at timestamptz)
LANGUAGE plpgsql
-- Generic plans, made once per connection: planning the claim afresh on every call cost ~24 us
-- of PostgreSQL CPU per message at batch 10 (drain: 155/171 -> 132/147 us per message). A
-- generic plan is made with whatever the statistics say at that moment, on an empty queue too,
-- so sequential scans and sorts are ruled out for this function's statements: each of them
-- has an index path (the claimable-heads index, primary keys, the live-messages index), and the
-- claim must stay O(batch) whatever the table looked like when it was planned. Checked: planned
-- on a 3-message queue, then run on 60,000 queued, a call cost 0.9 ms of PostgreSQL CPU.
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_sort = off
AS $$
#variable_conflict use_column
BEGIN
    IF cardinality(ids) > 0 THEN
        RETURN QUERY
        SELECT f.id, NULL::text, NULL::text, NULL::text, NULL::text, NULL::jsonb, NULL::jsonb,
               NULL::integer, NULL::integer, NULL::integer, NULL::bigint, NULL::timestamptz,
               NULL::timestamptz
        FROM fleet.finish_messages(ids, tokens, states, replies, errors) AS f(id);
    END IF;
    IF max_claims > 0 THEN
        RETURN QUERY
        -- claim: begin (identical to queries.sql's `claim`)
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
        -- claim: end
    END IF;
END
$$;

DROP FUNCTION IF EXISTS fleet.lock_leases(bigint[], bigint[]);  -- 2026-12-07, replaced by the
-- heartbeat's SKIP LOCKED (queries.sql)

-- Finish messages that no worker holds (cancel a queued or parked message, expire an approval).
CREATE OR REPLACE FUNCTION fleet.finish_unleased(
    message_id bigint, new_state text, new_reply text, new_error text, from_states text[]
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    sid     text;
    awaited boolean;
BEGIN
    SELECT m.session_id INTO sid FROM fleet.messages m WHERE m.id = message_id;
    IF sid IS NULL THEN
        RETURN false;
    END IF;
    PERFORM 1 FROM fleet.sessions s WHERE s.session_id = sid FOR NO KEY UPDATE;
    UPDATE fleet.messages m
    SET state = new_state, reply = coalesce(new_reply, m.reply), error = new_error,
        finished_at = clock_timestamp(), is_head = false,
        lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL
    WHERE m.id = message_id AND m.state = ANY (from_states)
    RETURNING m.reply_awaited INTO awaited;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM fleet.promote_heads(ARRAY[sid]);
    IF awaited THEN
        PERFORM fleet.notify_outcome(ARRAY[message_id]);
    END IF;
    PERFORM pg_notify('fleet_wakeup', '');
    RETURN true;
END
$$;

-- Give these sessions a head if they have waiting messages and none (nothing running, no
-- waiting head): the election a REPEATABLE READ / SERIALIZABLE enqueue leaves to the workers
-- (fleet_repair, above). Run under READ COMMITTED, after the sessions' row locks, each
-- statement sees every commit. Returns the heads it made.
--
-- Every listening worker hears a fleet_repair and calls this as soon as it hears it, so
-- a first look without locks keeps all but the first from locking the session (a lock
-- that a worker finishing the session's head would wait for): only sessions that look
-- headless (missing_heads) are locked and promoted, promote_heads looking again under the
-- lock. A session that looks headed needs nothing: a waiting head stays one until claimed,
-- and a running head's finish promotes its successor under the session's lock with a
-- snapshot taken after that lock, so it sees every message committed before this look (the
-- notifying enqueue's included).
CREATE OR REPLACE FUNCTION fleet.repair_sessions(sessions text[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    headless text[] := ARRAY(SELECT h.session_id FROM fleet.missing_heads(sessions) AS h);
BEGIN
    IF cardinality(headless) = 0 THEN
        RETURN 0;
    END IF;
    PERFORM 1 FROM fleet.sessions s WHERE s.session_id = ANY (headless)
    ORDER BY s.session_id FOR NO KEY UPDATE OF s;
    RETURN fleet.promote_heads(headless);
END
$$;

-- The safety net behind fleet_repair, for notifications no worker heard (none listening at
-- that commit, or only --poll-only ones): sessions with waiting messages and no head, found by
-- reading every waiting message (O(backlog), so workers run it every few minutes, not often).
-- The sessions it finds are looked at again by repair_sessions, which locks them: twice the
-- probes, for orphans only (rare), not for the sessions that are fine.
CREATE OR REPLACE FUNCTION fleet.repair_heads(max_sessions integer DEFAULT 100) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    orphans text[];
BEGIN
    orphans := ARRAY(SELECT h.session_id
                     FROM fleet.missing_heads(ARRAY(
                         SELECT DISTINCT q.session_id FROM fleet.messages q
                         WHERE q.state = 'queued' AND NOT q.is_head)) AS h
                     LIMIT max_sessions);
    IF cardinality(orphans) = 0 THEN
        RETURN 0;
    END IF;
    RETURN fleet.repair_sessions(orphans);
END
$$;
