-- Issue 8: limits per turn, cancellation that leaves a trail, and run variables seen by the
-- customer-data server. Four new audit verbs:
--
--   turn_limit_exceeded  a turn went past FLEET_MAX_MODEL_CALLS, FLEET_MAX_TOOL_CALLS or
--                        FLEET_TOKEN_BUDGET; the message is dead at once (retrying repeats it);
--   cancel_requested     someone asked to cancel a running message (the worker stops it at its
--                        next step);
--   message_cancelled    a message was cancelled: queued or parked (at once, in the cancelling
--                        transaction) or running (by the worker, when the turn stopped);
--   customer_data_read   the customer-data server read a customer's record (lookup_customer,
--                        find_customer_by_email, lookup_order), with the run variables the
--                        worker sent in the request `_meta` (tenant and user ids).
--
-- The CHECK is rebuilt from the current definition plus these, read in both shapes
-- (0007 explains), so no verb another migration added is lost.
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
          SELECT unnest(ARRAY['turn_limit_exceeded', 'cancel_requested', 'message_cancelled',
                              'customer_data_read'])) AS all_verbs
    WHERE v IS NOT NULL AND v <> '';
    IF NOT verbs @> ARRAY['message_received', 'message_sent', 'capability_invoked',
                          'turn_failed'] THEN
        RAISE EXCEPTION 'could not read the audit vocabulary from %', def;
    END IF;
    ALTER TABLE audit_log DROP CONSTRAINT IF EXISTS audit_log_action_check;
    EXECUTE format('ALTER TABLE audit_log ADD CONSTRAINT audit_log_action_check '
                   'CHECK (action = ANY (%L::text[]))', verbs);
END
$$;
