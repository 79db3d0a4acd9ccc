-- A session's finished messages get their own partial index; the index of all its messages goes.
--
-- Every step of a message (claim, finish, and the promotion of a session's next message) is an
-- UPDATE that changes `state` or `is_head`, columns the queue's partial indexes filter on, so
-- none of them is a HOT update: each new row version gets an entry in every index whose
-- predicate it satisfies. messages_session (session_id, id) took one at every step, for
-- history lookups only. Split by state, live messages are already in messages_session_live and
-- finished ones are in the index below, so a message enters the finished index once, when it
-- finishes, and no longer at its enqueue, claim or promotion. Measured with
-- `python bench/queue_probes.py cycle-cost` (the worker's cycle, batch 10, one connection,
-- three rounds): with 100 messages per session, WAL per message 1,509 -> 1,330 bytes and
-- backend CPU 142-147 -> 118-130 us; with one per session, 1,185-1,211 -> 1,102 bytes and no
-- CPU difference the noise lets through (99-105 against 101-108 us).
--
-- A query for a session's whole history names both halves, so the planner can OR the two
-- indexes: `session_id = $1 AND (state IN (<live>) OR state IN (<finished>))`, written once in
-- fleet.session_messages(session_id) (queue_sql/functions.sql), which the planner inlines.
--
-- One reader cannot name them: the foreign key's own check when a session row is deleted,
-- which then reads fleet.messages sequentially. Sessions are deleted only in one race (a
-- dedupe key taken by a concurrent transaction while fleet.enqueue or fleet.enqueue_many
-- created the session for it), so that cost is paid there alone.
--
-- CREATE INDEX (not CONCURRENTLY: a migration runs in a transaction) blocks writes to
-- fleet.messages while it reads the table once.
CREATE INDEX messages_session_finished ON fleet.messages (session_id, id)
    WHERE state IN ('done', 'dead', 'cancelled');
DROP INDEX fleet.messages_session;
