-- fleet.sessions is analyzed from a sample of 3,000 rows instead of 30,000, as fleet.messages
-- is since migration 0015, which left this table out.
--
-- Every message of a new conversation inserts a session row, so under load autovacuum
-- analyzes fleet.sessions about as often as fleet.messages, mid-load. On 50,000 sessions an
-- ANALYZE took 65-78 ms of one core at the default target (100) and 9-10 ms at 10
-- (`python bench/queue_probes.py analyze-cost`, five runs each). In traced sustained runs the
-- bench's worst bursts of late messages came with the autovacuum and analyze of the queue
-- tables (BENCHMARKS.md, 2026-12-02 afternoon).
--
-- The queue finds sessions by primary key, where statistics play no part. The one other reader,
-- `fleet sessions list --where` (queries.sql list_sessions), filters by metadata containment
-- and sorts on created_at, which has no index: a smaller sample can move its estimate between
-- the GIN index and a scan, each followed by the same top-N sort of what matched.
ALTER TABLE fleet.sessions
    ALTER COLUMN session_id SET STATISTICS 10,
    ALTER COLUMN metadata SET STATISTICS 10,
    ALTER COLUMN created_at SET STATISTICS 10;
