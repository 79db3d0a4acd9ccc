-- Human approval for the one tool that moves money (course Decisions 9 and 10).
--
-- `run_states` (created in 0002) holds one paused run per row. Its status moves by
-- compare-and-set only:  awaiting -> approved | rejected -> resumed.  This migration adds what
-- the approval flow needs on top of 0002's table: the decision that was made (the status
-- becomes `resumed` afterwards, and a worker resuming after a crash must still know whether it
-- was approved), the indexes its statements read, and the audit verbs it writes.

-- The decision survives the move to `resumed`; `decided_by` says who (a person's name, or
-- `fleet:expiry` / `fleet:cancel` when the fleet rejected it).
ALTER TABLE run_states ADD COLUMN IF NOT EXISTS decision text;
ALTER TABLE run_states ADD CONSTRAINT run_states_decision_valid
    CHECK (decision IS NULL OR decision IN ('approved', 'rejected'));
-- A decided row always says what, who and when; an awaiting row says none of it.
ALTER TABLE run_states ADD CONSTRAINT run_states_decided_consistently
    CHECK ((status = 'awaiting' AND decision IS NULL AND decided_at IS NULL)
        OR (status IN ('approved', 'rejected') AND decision = status
            AND decided_by IS NOT NULL AND decided_at IS NOT NULL)
        OR (status = 'resumed' AND decision IS NOT NULL
            AND decided_by IS NOT NULL AND decided_at IS NOT NULL AND resumed_at IS NOT NULL));

-- `fleet approvals list` and the expiry sweep (awaiting rows past expires_at): one index scan
-- that finds nothing when nothing is overdue, so every worker may run the sweep every tick.
CREATE INDEX IF NOT EXISTS run_states_status_expires ON run_states (status, expires_at);
-- A claimed message's parked run (take_decided_run), a parked message's approval id
-- (`fleet enqueue --wait`), cancellation.
CREATE INDEX IF NOT EXISTS run_states_message ON run_states (message_id, requested_at);
-- A message has at most one run that is not yet resumed: parking twice without a resume in
-- between would leave two decisions for one turn.
CREATE UNIQUE INDEX IF NOT EXISTS run_states_one_open_per_message ON run_states (message_id)
    WHERE status IN ('awaiting', 'approved', 'rejected');

-- Widen the closed audit vocabulary with the approval verbs. The new CHECK is built from the
-- verbs the current one allows plus ours, so this migration does not need to know every verb
-- an earlier migration added (and a later one can widen the same way).
DO $$
DECLARE
    verbs text[];
BEGIN
    SELECT array_agg(DISTINCT v ORDER BY v) INTO verbs
    FROM (SELECT (regexp_matches(pg_get_constraintdef(c.oid), '''([a-z_]+)''', 'g'))[1] AS v
          FROM pg_constraint c
          WHERE c.conrelid = 'audit_log'::regclass AND c.conname = 'audit_log_action_check'
          UNION
          SELECT unnest(ARRAY['approval_requested', 'approval_decided', 'approval_expired',
                              'run_resumed', 'refund_blocked'])) AS all_verbs;
    ALTER TABLE audit_log DROP CONSTRAINT IF EXISTS audit_log_action_check;
    EXECUTE format('ALTER TABLE audit_log ADD CONSTRAINT audit_log_action_check '
                   'CHECK (action = ANY (%L::text[]))', verbs);
END
$$;
