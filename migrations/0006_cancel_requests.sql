-- Cancelling a running message: the request is recorded on the row and the worker holding the
-- lease sees it with its next heartbeat, stops the turn and finishes the message as cancelled.
ALTER TABLE fleet.messages ADD COLUMN cancel_requested_at timestamptz;
