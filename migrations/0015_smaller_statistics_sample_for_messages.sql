-- fleet.messages is analyzed from a sample of 3,000 rows instead of 30,000.
--
-- ANALYZE samples 300 rows per unit of the largest statistics target among a table's columns
-- (100 by default). A queue's table changes fast, so autovacuum analyzes it often, mid-load:
-- on 50,000 messages an ANALYZE took 93-106 ms of one core, a burst a 2-core machine under
-- load feels in its latencies (BENCHMARKS.md, the sustained tail). With every column at 10 it
-- took 13-14 ms (`python bench/queue_probes.py analyze-cost`, five runs each).
--
-- The queue's own statements do not lean on these statistics: fleet.finish_and_claim's are
-- generic plans over index paths by construction, the others read a partial index their
-- predicates name. A sample of 3,000 still sees every state and is_head value, and the
-- number of distinct sessions is estimated from it as before. An earlier try lowered only the
-- columns no query filters on; the sample stayed 30,000 rows, because the other columns kept
-- their target, and it saved little (67-91 ms, the same probe).
ALTER TABLE fleet.messages
    ALTER COLUMN id SET STATISTICS 10,
    ALTER COLUMN session_id SET STATISTICS 10,
    ALTER COLUMN agent SET STATISTICS 10,
    ALTER COLUMN body SET STATISTICS 10,
    ALTER COLUMN customer_id SET STATISTICS 10,
    ALTER COLUMN variables SET STATISTICS 10,
    ALTER COLUMN metadata SET STATISTICS 10,
    ALTER COLUMN dedupe_key SET STATISTICS 10,
    ALTER COLUMN state SET STATISTICS 10,
    ALTER COLUMN is_head SET STATISTICS 10,
    ALTER COLUMN attempts SET STATISTICS 10,
    ALTER COLUMN max_attempts SET STATISTICS 10,
    ALTER COLUMN takeovers SET STATISTICS 10,
    ALTER COLUMN run_after SET STATISTICS 10,
    ALTER COLUMN enqueued_at SET STATISTICS 10,
    ALTER COLUMN claimed_at SET STATISTICS 10,
    ALTER COLUMN finished_at SET STATISTICS 10,
    ALTER COLUMN lease_owner SET STATISTICS 10,
    ALTER COLUMN lease_token SET STATISTICS 10,
    ALTER COLUMN lease_expires_at SET STATISTICS 10,
    ALTER COLUMN reply SET STATISTICS 10,
    ALTER COLUMN error SET STATISTICS 10,
    ALTER COLUMN cancel_requested_at SET STATISTICS 10,
    ALTER COLUMN cancel_reason SET STATISTICS 10;
