-- The two character rules of 0020 and 0021, each written once, as a function: the session id
-- domain, the body domain, fleet.agents' instructions check and fleet.message_problem
-- (queue_sql/functions.sql) all call these instead of repeating the code points, so they cannot
-- drift apart.
--
--   * a space is any character Python's str.isspace() calls one (Unicode's White_Space, with
--     U+001C-U+001F): U+0009-U+000D, U+001C-U+0020, U+0085, U+00A0, U+1680, U+2000-U+200A,
--     U+2028, U+2029, U+202F, U+205F, U+3000;
--   * a control character is a C0 or C1 control or DEL: U+0001-U+001F, U+007F-U+009F.
--
-- Plain SQL functions of one expression, IMMUTABLE like the regex they hold: the planner inlines
-- them into the calling expression (the constraint, or the enqueue statement through
-- message_problem), so there is no function call per row. The code points are the same as
-- 0020's and 0021's, so the constraints are re-stated NOT VALID (stored values already met them)
-- under their old names, and the error a caller sees is unchanged.

-- Whether `t` holds a space or a control character (the session id rule).
CREATE FUNCTION fleet.has_space_or_control(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT t ~ '[\x01-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]'
$$;

-- Whether `t` is nothing but spaces, or empty (the body and instructions rule).
CREATE FUNCTION fleet.is_blank(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT t !~ '[^\x09-\x0d\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]'
$$;

ALTER DOMAIN fleet.session_id DROP CONSTRAINT messages_session_id_valid;
ALTER DOMAIN fleet.session_id ADD CONSTRAINT messages_session_id_valid
    CHECK (length(VALUE) BETWEEN 1 AND 128 AND NOT fleet.has_space_or_control(VALUE))
    NOT VALID;

ALTER DOMAIN fleet.message_body DROP CONSTRAINT messages_body_not_empty;
ALTER DOMAIN fleet.message_body ADD CONSTRAINT messages_body_not_empty
    CHECK (NOT fleet.is_blank(VALUE))
    NOT VALID;

ALTER TABLE fleet.agents DROP CONSTRAINT agents_instructions_size;
ALTER TABLE fleet.agents ADD CONSTRAINT agents_instructions_size
    CHECK (NOT fleet.is_blank(instructions) AND octet_length(instructions) <= 65536)
    NOT VALID;
