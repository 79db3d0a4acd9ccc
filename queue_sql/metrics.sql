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
-- within each bound after the request, for fleet_approval_decision_seconds. Reads every
-- decided approval (170 ms at 100,000, by hand), so the collector runs it on a budget.
WITH decided AS (
    SELECT CASE decided_by WHEN 'fleet:expiry' THEN 'expired'
                           WHEN 'fleet:cancel' THEN 'cancelled'
                           ELSE decision END AS kind,
           extract(epoch FROM decided_at - requested_at)::float8 AS seconds
    FROM run_states WHERE decided_at IS NOT NULL
), totals AS (
    SELECT kind, count(*)::bigint AS n, sum(seconds)::float8 AS seconds_sum
    FROM decided GROUP BY kind
), cumulative AS (
    SELECT d.kind, u.i, (count(*) FILTER (WHERE d.seconds <= u.b))::bigint AS c
    FROM decided d CROSS JOIN unnest($1::float8[]) WITH ORDINALITY AS u(b, i)
    GROUP BY d.kind, u.i
)
SELECT t.kind, t.n, t.seconds_sum, array_agg(c.c ORDER BY c.i) AS buckets
FROM totals t JOIN cumulative c USING (kind)
GROUP BY t.kind, t.n, t.seconds_sum;
