-- A session's running message is indexed apart from its waiting ones, and the lease index goes.
--
-- Claiming a message (queued -> running) wrote two index entries besides the primary key's:
-- messages_session_live (live = queued, running or parked), messages_leases (running, by
-- expiry) and nothing else. A running message is always its session's head, so no lookup of
-- "the session's next message" needs it; the ones that need it ask "is a message of this
-- session running?", and the lease rescue asks "which running messages have expired?". One
-- index of running messages by session answers both (the rescue reads the running set, which
-- is as small as the fleet's concurrency), and the session's waiting messages keep their own:
--
--   messages_session_waiting (session_id, id) WHERE state IN ('queued', 'awaiting_approval')
--   messages_running         (session_id)     WHERE state = 'running'
--
-- A claim now writes one entry besides the primary key's (messages_running) instead of two,
-- and a heartbeat, which changes only lease_expires_at, no longer changes an indexed column,
-- so it can be a HOT update. `python bench/queue_probes.py cycle-cost` (two rounds, the
-- index sets in turn): with 100 messages per session, WAL per message 1,349-1,358 -> 1,253
-- bytes and backend CPU 114 / 189 -> 102 / 114 us; with one per session, 1,101 -> 1,026-1,052
-- bytes and 89 / 102 -> 83 / 96 us.
--
-- The head rules in queue_sql/functions.sql read the two indexes separately ("has the session
-- a running message or a waiting head?", "its earliest waiting message"); a session's history
-- (fleet.session_messages) ORs three: waiting, running, finished.
--
-- CREATE INDEX (not CONCURRENTLY: a migration runs in a transaction) blocks writes to
-- fleet.messages while it reads the table, once per index.
CREATE INDEX messages_session_waiting ON fleet.messages (session_id, id)
    WHERE state IN ('queued', 'awaiting_approval');
CREATE INDEX messages_running ON fleet.messages (session_id) WHERE state = 'running';
DROP INDEX fleet.messages_session_live;
DROP INDEX fleet.messages_leases;
