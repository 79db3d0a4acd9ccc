-- Least privilege, kept up with the agent handler (issue 7). 0005 granted each role what it
-- needed then; 0008 added agents as rows and delegation after it, and an agent worker running
-- as a `fleet_worker` LOGIN role stopped at start with "permission denied for table agents"
-- (found by tests/test_agent_security.py, which runs the real worker as such a role).
--
--  role          | gains                                              | because
--  --------------+----------------------------------------------------+----------------------------
--  fleet_worker  | SELECT fleet.agents, fleet.agent_versions          | every turn builds its agent
--                |                                                    |   from the rows (and a parked
--                |                                                    |   run from its versions)
--                | INSERT fleet.messages, fleet.sessions              | delegation: a parent turn
--                |                                                    |   enqueues its sub-agent's
--                |                                                    |   message (fleet.enqueue is
--                |                                                    |   SECURITY INVOKER)
--
-- Still refused to the worker: defining agents (INSERT/UPDATE/DELETE fleet.agents: that is
-- `fleet agents create|update`, run by an operator as the schema owner), DELETE on messages,
-- the business tables, reading audit_log.
GRANT SELECT ON fleet.agents, fleet.agent_versions TO fleet_worker;
GRANT INSERT ON fleet.messages, fleet.sessions TO fleet_worker;
