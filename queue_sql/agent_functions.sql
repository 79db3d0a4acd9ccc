-- Agents' server-side function (repeatable: re-applied by `fleet migrate` when it changes).

-- The agents a worker can serve: those whose tools and skills, and those of every agent they
-- can delegate to (sub-agents run inline in the same worker), are within what the worker has.
-- The claim calls it once per statement (an InitPlan); the agents table is small.
CREATE OR REPLACE FUNCTION fleet.servable_agents(have_tools text[], have_skills text[])
RETURNS text[]
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE reach(root, name) AS (
        SELECT a.name, a.name FROM fleet.agents a
        UNION
        SELECT r.root, s.sub
        FROM reach r
        JOIN fleet.agents a ON a.name = r.name
        CROSS JOIN LATERAL unnest(a.sub_agents) AS s(sub)
    )
    SELECT coalesce(array_agg(ok.root), '{}'::text[])
    FROM (SELECT r.root
          FROM reach r LEFT JOIN fleet.agents a ON a.name = r.name
          GROUP BY r.root
          HAVING bool_and(a.name IS NOT NULL
                          AND a.tools <@ have_tools AND a.skills <@ have_skills)) ok
$$;

COMMENT ON FUNCTION fleet.servable_agents(text[], text[]) IS
    'Agents (with their whole sub-agent graph) whose tools and skills are within the given sets.';
