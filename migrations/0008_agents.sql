-- Agents as database rows (issue 8): a message is enqueued for an agent by name
-- (fleet.messages.agent, default 'support') and the worker builds that agent from its row for
-- every turn, so instructions, tools, skills, model and sub-agents change without a deploy.
--
-- fleet.agents holds the current definition; fleet.agent_versions keeps every version ever
-- written (a snapshot per create/update, in the same transaction). A run parked for a human
-- records the versions of its agent graph (run_states.agent_graph) and is resumed against
-- exactly those, even when the row was updated while it waited.
--
-- The default `support` agent is created by `fleet migrate` and at worker start
-- (fleet.agents.ensure_default: get_or_create), from the instructions in the code and every
-- skill on disk, because its text lives in Python (fleet/agents.py), not here.

CREATE TABLE fleet.agents (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name          text NOT NULL UNIQUE,
    -- NULL: the fleet's FLEET_MODEL.
    model         text,
    instructions  text NOT NULL,
    -- The customer-data MCP tools this agent may call (a subset of the server's five).
    tools         text[] NOT NULL DEFAULT '{}',
    -- Skills (skills/<name>/SKILL.md) it may load.
    skills        text[] NOT NULL DEFAULT '{}',
    -- Other agents it may delegate to, each exposed to it as a tool `ask_<name>`.
    sub_agents    text[] NOT NULL DEFAULT '{}',
    metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Bumped by every update; workers cache built agents by (name, version).
    version       integer NOT NULL DEFAULT 1,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT agents_name_valid CHECK (name ~ '^[a-z][a-z0-9_-]{0,62}$'),
    CONSTRAINT agents_instructions_size
        CHECK (instructions ~ '[^[:space:]]' AND octet_length(instructions) <= 65536),
    CONSTRAINT agents_metadata_object
        CHECK (jsonb_typeof(metadata) = 'object' AND octet_length(metadata::text) <= 16384),
    CONSTRAINT agents_version_positive CHECK (version >= 1),
    CONSTRAINT agents_not_own_sub_agent CHECK (NOT (name = ANY (sub_agents)))
);

-- Every version of every agent, immutable.
CREATE TABLE fleet.agent_versions (
    name        text NOT NULL,
    version     integer NOT NULL,
    spec        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- The agent graph (name -> version) a parked run was built from; NULL for runs parked before
-- agents were rows (those resume against the current rows).
ALTER TABLE run_states ADD COLUMN agent_graph jsonb;

-- The audit verb of a delegation (a parent turn asking a sub-agent; the child turn is its own
-- message in the queue). Widened the way 0007 does: the current verbs plus ours.
DO $$
DECLARE
    def text;
    verbs text[];
BEGIN
    SELECT pg_get_constraintdef(c.oid) INTO def
    FROM pg_constraint c
    WHERE c.conrelid = 'audit_log'::regclass AND c.conname = 'audit_log_action_check';
    SELECT array_agg(DISTINCT v ORDER BY v) INTO verbs
    FROM (SELECT (regexp_matches(def, '''([a-z_]+)''', 'g'))[1] AS v
          UNION
          SELECT btrim(unnest(string_to_array(substring(def FROM '''\{([^}]*)\}'''), ',')), '" ')
          UNION
          SELECT 'delegated') AS all_verbs
    WHERE v IS NOT NULL AND v <> '';
    IF NOT verbs @> ARRAY['message_received', 'message_sent', 'capability_invoked', 'turn_failed'] THEN
        RAISE EXCEPTION 'could not read the audit vocabulary from %', def;
    END IF;
    ALTER TABLE audit_log DROP CONSTRAINT IF EXISTS audit_log_action_check;
    EXECUTE format('ALTER TABLE audit_log ADD CONSTRAINT audit_log_action_check '
                   'CHECK (action = ANY (%L::text[]))', verbs);
END
$$;
