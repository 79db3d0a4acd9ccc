-- A message someone waits on: finishing or parking it NOTIFYs fleet_outcome, and only then.
--
-- Until now every batch of finished messages sent one fleet_outcome notification, whether or
-- not anybody listened, and every waiter re-read its message at each of them. A NOTIFY is not
-- free: at commit PostgreSQL takes one lock for the whole cluster's notifying transactions
-- and holds it through the commit's WAL flush, so a worker's commits queued behind the
-- producers' (whose wake-ups must notify) for a notification nobody wanted. And a client
-- waiting on one reply in a busy fleet woke at every batch.
--
-- A waiter (fleet.Client.wait_for_reply, `fleet enqueue --wait`, a delegation) sets
-- reply_awaited (queries.sql `await_reply`) before it reads the message; the statements
-- that finish or park a message notify only for rows with it set, and name their ids in the
-- payload, so each waiter wakes for its own message only. The row lock orders the two
-- writes: either the finish sees the mark, or the waiter's read sees the finish.
--
-- Not indexed, so setting it is a HOT update; adding it with a constant default rewrites
-- nothing. At statistics target 10 like every other column of the table (migration 0015).
ALTER TABLE fleet.messages ADD COLUMN reply_awaited boolean NOT NULL DEFAULT false;
ALTER TABLE fleet.messages ALTER COLUMN reply_awaited SET STATISTICS 10;
