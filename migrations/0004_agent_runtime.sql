-- The agent turn's own storage (issue 4): the SDK Session's items, in the same database as the
-- system of record, keyed by the same session id as `conversations` and `fleet.messages`.
--
-- One row per conversation item (a user message, a tool call, a tool output, a reply), in
-- order. A turn's items are written in ONE statement at the end of the turn (or when it parks
-- for an approval), fenced by the message's lease token, so a failed or taken-over attempt
-- leaves no half turn in the history. `message_id` and `resume_of` say which attempt wrote a
-- row: a retried turn first deletes what an earlier attempt of the same message (or of the
-- same resume) managed to write, so history never holds a turn twice.
CREATE TABLE agent_session_items (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id  text NOT NULL REFERENCES conversations(session_id) ON DELETE CASCADE,
    message_id  bigint,
    resume_of   uuid,
    item        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT agent_session_items_item_object CHECK (jsonb_typeof(item) = 'object')
);
-- History in order (get_items), the newest item (pop_item), a retried attempt's rows.
CREATE INDEX agent_session_items_session ON agent_session_items (session_id, id);
