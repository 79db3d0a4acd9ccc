-- The agent turn's one extra audit verb: `turn_failed`, written when an attempt of a turn fails
-- (the customer-data server down or slow, the model failing) and the queue will retry it. Without
-- it a trace shows a `message_received` per attempt and no reason for the retries; with it the
-- trail says what failed, on which attempt, and whether the message was retried or given up.
--
-- The new CHECK is the current verbs plus ours. The current definition comes in one of two
-- shapes: 0002's `action IN ('a', 'b', ...)` (each verb quoted) or, after 0003 rewrote it,
-- `action = ANY ('{a,b,...}'::text[])` (one array literal); both are read, so no verb an
-- earlier migration added is lost. A later migration can widen it the same way.
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
          SELECT 'turn_failed') AS all_verbs
    WHERE v IS NOT NULL AND v <> '';
    IF NOT verbs @> ARRAY['message_received', 'message_sent', 'capability_invoked'] THEN
        RAISE EXCEPTION 'could not read the audit vocabulary from %', def;
    END IF;
    ALTER TABLE audit_log DROP CONSTRAINT IF EXISTS audit_log_action_check;
    EXECUTE format('ALTER TABLE audit_log ADD CONSTRAINT audit_log_action_check '
                   'CHECK (action = ANY (%L::text[]))', verbs);
END
$$;
