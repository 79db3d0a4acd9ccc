-- Least privilege in the database (issue 7), and an audit_log that cannot be rewritten.
--
-- Four NOLOGIN group roles. A deployment creates one LOGIN role per process kind that is a
-- member of the matching group role, e.g.
--     CREATE ROLE support_worker LOGIN PASSWORD '...' IN ROLE fleet_worker;
-- and gives that role's URL to the process as DATABASE_URL. `fleet migrate`, `fleet seed` and
-- `fleet audit prune` run as the owner of the schema (the role that applied this migration).
-- Roles are cluster-wide: when they already exist (another database of the same server, or a
-- DBA created them) they are reused; only the grants below are per database.
--
--  role                 | may                                                 | may not
--  ---------------------+-----------------------------------------------------+-----------------------------
--  fleet_audit_writer   | INSERT audit_log, capability_invocations            | read, UPDATE or DELETE them
--  fleet_worker         | the queue: SELECT/UPDATE fleet.messages,            | touch customers, orders,
--   (+ audit_writer)    |   SELECT/UPDATE fleet.sessions (row locks),         |   refunds, tickets, documents,
--                       |   fleet.workers (all), nextval(fleet.lease_tokens); |   embeddings (that is the
--                       | conversations SELECT/INSERT/UPDATE;                 |   MCP server's job: the agent
--                       | agent_session_items SELECT/INSERT/DELETE;           |   has no SQL); enqueue;
--                       | run_states SELECT/INSERT/UPDATE (park, resume,      |   DELETE messages; DDL
--                       |   expiry sweep)                                     |
--  fleet_mcp            | SELECT customers, orders, tickets, refunds,         | UPDATE anything but an
--   (+ audit_writer)    |   documents, embeddings; INSERT refunds;            |   order's status; DELETE;
--                       |   UPDATE orders(status, updated_at)                 |   the queue, run_states
--  fleet_approver       | SELECT run_states, UPDATE run_states(status,        | INSERT run_states; refund;
--   (+ audit_writer)    |   decision, decided_by, decided_at, decision_note); |   touch a message's lease,
--                       | SELECT fleet.messages, UPDATE fleet.messages(state, |   reply or body
--                       |   run_after) (unpark); SELECT orders, customers,    |
--                       |   refunds (what `fleet approvals show` prints)      |
--
-- A migration that adds a table grants it to the roles that need it, in the same file.
--
-- audit_log is append-only for everyone, the owner included: a trigger raises on UPDATE,
-- DELETE and TRUNCATE. Retention goes through fleet.prune_audit_log(older_than) only (the
-- `fleet audit prune --older-than DAYS` command), which lifts the guard for its own DELETE with
-- a transaction-local setting. The application roles cannot use that setting themselves: they
-- have no DELETE privilege on audit_log and no EXECUTE on the function. One consequence: a
-- conversation that has audit rows cannot be deleted (its FK would rewrite them) until they
-- are pruned.

DO $$
DECLARE
    wanted text[] := ARRAY['fleet_worker', 'fleet_mcp', 'fleet_audit_writer', 'fleet_approver'];
    missing text[];
    can_create boolean;
    r text;
BEGIN
    SELECT array_agg(w) INTO missing
    FROM unnest(wanted) AS w WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = w);
    IF missing IS NULL THEN
        RETURN;
    END IF;
    SELECT rolsuper OR rolcreaterole INTO can_create FROM pg_roles WHERE rolname = current_user;
    IF NOT can_create THEN
        RAISE EXCEPTION 'migration 0005 needs the roles % and % cannot create them',
            array_to_string(missing, ', '), current_user
            USING HINT = 'run fleet migrate as a role with CREATEROLE once, or have a DBA run '
                         'CREATE ROLE <name> NOLOGIN for each of them';
    END IF;
    FOREACH r IN ARRAY missing LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- another database's migration created it at the same moment
        END;
    END LOOP;
END
$$;

GRANT fleet_audit_writer TO fleet_worker, fleet_mcp, fleet_approver;

-- fleet_audit_writer ----------------------------------------------------------------------
GRANT INSERT ON audit_log, capability_invocations TO fleet_audit_writer;
GRANT USAGE ON SEQUENCE audit_log_id_seq TO fleet_audit_writer;

-- fleet_worker ----------------------------------------------------------------------------
GRANT USAGE ON SCHEMA fleet TO fleet_worker;
GRANT SELECT, UPDATE ON fleet.messages, fleet.sessions TO fleet_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON fleet.workers TO fleet_worker;
GRANT USAGE ON SEQUENCE fleet.lease_tokens TO fleet_worker;
GRANT SELECT, INSERT, UPDATE ON conversations TO fleet_worker;
GRANT SELECT, INSERT, UPDATE ON run_states TO fleet_worker;
DO $$
BEGIN
    -- 0004 (the agent turn's session items) may not exist in every checkout yet.
    IF to_regclass('agent_session_items') IS NOT NULL THEN
        GRANT SELECT, INSERT, DELETE ON agent_session_items TO fleet_worker;
    END IF;
END
$$;

-- fleet_mcp -------------------------------------------------------------------------------
GRANT SELECT ON customers, orders, tickets, refunds, documents, embeddings TO fleet_mcp;
GRANT INSERT ON refunds TO fleet_mcp;
GRANT UPDATE (status, updated_at) ON orders TO fleet_mcp;

-- fleet_approver --------------------------------------------------------------------------
GRANT USAGE ON SCHEMA fleet TO fleet_approver;
GRANT SELECT ON run_states TO fleet_approver;
GRANT UPDATE (status, decision, decided_by, decided_at, decision_note) ON run_states
    TO fleet_approver;
GRANT SELECT ON fleet.messages TO fleet_approver;
GRANT UPDATE (state, run_after) ON fleet.messages TO fleet_approver;
GRANT SELECT ON orders, customers, refunds TO fleet_approver;

-- audit_log is append-only ----------------------------------------------------------------
CREATE FUNCTION fleet.audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('fleet.audit_maintenance', true) = 'prune' THEN
        RETURN OLD;  -- inside fleet.prune_audit_log only
    END IF;
    RAISE EXCEPTION 'audit_log is append-only: % is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'retention is `fleet audit prune --older-than DAYS` '
                     '(fleet.prune_audit_log(interval))';
END
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION fleet.audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION fleet.audit_log_append_only();

-- Retention: delete audit rows older than `older_than` (at least one day), return how many.
-- SECURITY DEFINER so an operator role may be granted EXECUTE without DELETE on the table; the
-- guard is lifted for this transaction only and put back before returning.
CREATE FUNCTION fleet.prune_audit_log(older_than interval) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    pruned bigint;
BEGIN
    IF older_than IS NULL OR older_than < interval '1 day' THEN
        RAISE EXCEPTION 'prune_audit_log keeps at least one day of audit rows (got %)', older_than
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('fleet.audit_maintenance', 'prune', true);
    DELETE FROM audit_log WHERE created_at < now() - older_than;
    GET DIAGNOSTICS pruned = ROW_COUNT;
    PERFORM set_config('fleet.audit_maintenance', '', true);
    RETURN pruned;
END
$$;
REVOKE ALL ON FUNCTION fleet.prune_audit_log(interval) FROM PUBLIC;
