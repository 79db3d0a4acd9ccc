-- fleet_worker may change where a message stands, not what it says.
--
-- Migration 0005 granted the worker UPDATE on every column of fleet.messages. Everything the
-- worker writes is the message's state: claims, heartbeats, outcomes, retries, releases,
-- rescues, parking, head promotion, cancellation requests and the reply_awaited mark
-- (queue_sql/queries.sql and functions.sql). What the customer sent (body, session, agent,
-- customer, variables, metadata), its identity, its dedupe key and its attempt budget never
-- change after the enqueue. A worker (or an agent turn gone wrong in it) must not be able to
-- rewrite them, just as it cannot rewrite audit rows.
--
-- A column added to fleet.messages later is granted here or not, in its own migration;
-- tests/test_security.py lists every column as one or the other and fails on a new one.
REVOKE UPDATE ON fleet.messages FROM fleet_worker;
GRANT UPDATE (state, is_head, attempts, takeovers, run_after, claimed_at, finished_at,
              lease_owner, lease_token, lease_expires_at, reply, error,
              cancel_requested_at, cancel_reason, reply_awaited)
    ON fleet.messages TO fleet_worker;
