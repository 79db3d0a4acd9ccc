-- Statements behind the database-derived metrics (fleet/metrics_server.py) and `fleet status`.
-- They run once per scrape in one process, each reading an index or a small table, except
-- approvals_decided (below). The counts per message state are queries.sql live_state_counts
-- and finished_state_counts.

-- name: approvals_table_exists
-- run_states arrives with the system-of-record migration; before it, approvals read as zero.
SELECT to_regclass('public.run_states') IS NOT NULL AS present;

-- name: approvals_pending
-- Undecided approvals and the age of the oldest one.
SELECT count(*)::bigint AS n,
       coalesce(extract(epoch FROM clock_timestamp() - min(requested_at)), 0)::float8 AS oldest_age
FROM run_states WHERE status = 'awaiting';

-- name: approvals_decided
-- Decisions ever made, by kind: a person approved or rejected, or the fleet rejected the run
-- because it expired (decided_by 'fleet:expiry') or its message was cancelled ('fleet:cancel').
-- $1: histogram bucket bounds in seconds (ascending); cumulative counts of decisions made
-- within each bound after the request, for fleet_approval_decision_seconds. Each decision is
-- binned once, to the first bound it is within: width_bucket counts the bounds at or below a
-- value, so on the negated bounds it counts those at or above the time (Prometheus' `le`).
-- Still reads every decided approval (67 ms at 100,000, 196 ms at 300,000; 269 and 815 ms
-- when each was compared with every bound: bench/queue_probes.py history-reads), so the
-- collector runs it on a budget.
WITH decided AS (
    SELECT CASE decided_by WHEN 'fleet:expiry' THEN 'expired'
                           WHEN 'fleet:cancel' THEN 'cancelled'
                           ELSE decision END AS kind,
           extract(epoch FROM decided_at - requested_at)::float8 AS seconds
    FROM run_states WHERE decided_at IS NOT NULL
), binned AS (
    -- bucket: the index of the first bound >= seconds (cardinality + 1: above them all)
    SELECT kind, cardinality($1::float8[]) + 1
                 - width_bucket(-seconds, (SELECT array_agg(-b ORDER BY b DESC)
                                           FROM unnest($1::float8[]) AS b)) AS bucket,
           count(*) AS n, sum(seconds) AS seconds_sum
    FROM decided GROUP BY 1, 2
)
SELECT kind, sum(n)::bigint AS n, sum(seconds_sum)::float8 AS seconds_sum,
       ARRAY(SELECT coalesce(sum(w.n) FILTER (WHERE w.bucket <= u.i), 0)::bigint
             FROM generate_series(1, cardinality($1::float8[])) AS u(i)
             CROSS JOIN binned w WHERE w.kind = k.kind
             GROUP BY u.i ORDER BY u.i) AS buckets
FROM binned k GROUP BY kind;
