-- Why a running message was cancelled (fleet cancel --reason, fleet.Client.cancel(reason=...)):
-- recorded with the request, read by the worker with its heartbeat, and kept in the message's
-- error when it stops ("cancelled while running: <reason>"), as a queued message's cancel keeps
-- its reason.
ALTER TABLE fleet.messages ADD COLUMN cancel_reason text;
