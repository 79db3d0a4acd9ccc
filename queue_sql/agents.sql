-- Agents as rows (fleet/agents.py): definitions, their versions, and the agent graph a turn is
-- built from. Definitions are rare writes; every create/update takes agents_lock so two
-- concurrent updates cannot each add half of a cycle.

-- name: agents_lock
-- Serialise definitions (reads by workers are not blocked).
LOCK TABLE fleet.agents IN SHARE ROW EXCLUSIVE MODE;

-- name: agents_all
SELECT id::text, name, model, instructions, tools, skills, sub_agents, metadata, version,
       created_at, updated_at
FROM fleet.agents ORDER BY name;

-- name: agent_get
SELECT id::text, name, model, instructions, tools, skills, sub_agents, metadata, version,
       created_at, updated_at
FROM fleet.agents WHERE name = $1;

-- name: agent_insert
-- A new agent at version 1; nothing when the name exists (get_or_create reads it instead).
INSERT INTO fleet.agents (name, model, instructions, tools, skills, sub_agents, metadata)
VALUES ($1, $2, $3, $4::text[], $5::text[], $6::text[], $7::jsonb)
ON CONFLICT (name) DO NOTHING
RETURNING id::text, name, model, instructions, tools, skills, sub_agents, metadata, version,
          created_at, updated_at;

-- name: agent_update
-- Replace a definition and bump its version (the worker's cache key).
UPDATE fleet.agents
SET model = $2, instructions = $3, tools = $4::text[], skills = $5::text[],
    sub_agents = $6::text[], metadata = $7::jsonb, version = version + 1, updated_at = now()
WHERE name = $1
RETURNING id::text, name, model, instructions, tools, skills, sub_agents, metadata, version,
          created_at, updated_at;

-- name: agent_version_insert
-- The immutable snapshot of a version, written with the change.
INSERT INTO fleet.agent_versions (name, version, spec) VALUES ($1, $2, $3::jsonb);

-- name: agent_graph
-- An agent and every agent it can reach through sub_agents, current rows: what a worker
-- builds one turn from (one indexed read per turn; the version column is the cache key).
WITH RECURSIVE reach(name) AS (
    SELECT $1::text
    UNION
    SELECT s.sub
    FROM reach r
    JOIN fleet.agents a ON a.name = r.name
    CROSS JOIN LATERAL unnest(a.sub_agents) AS s(sub)
)
SELECT a.id::text, a.name, a.model, a.instructions, a.tools, a.skills, a.sub_agents, a.metadata,
       a.version, a.created_at, a.updated_at
FROM reach r JOIN fleet.agents a ON a.name = r.name;

-- name: agent_versions_get
-- Snapshots of the given (name, version) pairs: the graph a parked run was built from.
SELECT v.spec, v.version, v.created_at
FROM fleet.agent_versions v
JOIN unnest($1::text[], $2::int[]) AS u(name, version)
  ON v.name = u.name AND v.version = u.version;
