-- The session id and body rules name their space and control characters by code point instead
-- of through the server locale's [:space:] and [:cntrl:] classes.
--
-- Why: what those classes hold depends on the database's LC_CTYPE. Under the embedded server's
-- C.UTF-8 (glibc) a no-break space (U+00A0), a figure space (U+2007) and a narrow no-break
-- space (U+202F) are not spaces, so a session id of one U+00A0, or a body of nothing but
-- U+00A0, was accepted; under a C locale no character past ASCII is a space or a control. A
-- property-based test (tests/test_enqueue_properties.py) found the first. The rules now read
-- the same on every server:
--   * a space is any character Python's str.isspace() calls one (Unicode's White_Space, with
--     U+001C-U+001F): U+0009-U+000D, U+001C-U+0020, U+0085, U+00A0, U+1680, U+2000-U+200A,
--     U+2028, U+2029, U+202F, U+205F, U+3000;
--   * a control character is a C0 or C1 control or DEL: U+0001-U+001F, U+007F-U+009F.
-- A session id is 1 to 128 characters, none of them a space or a control character; a body
-- holds at least one character that is not a space. fleet.message_problem
-- (queue_sql/functions.sql) says the same in words.
--
-- NOT VALID: values already stored were checked by the old rules and stay; validating would
-- read the whole table under a lock that stops enqueues. New values are checked from now on.
-- Names and error (23514, check_violation, the constraint named) are unchanged.
ALTER DOMAIN fleet.session_id DROP CONSTRAINT messages_session_id_valid;
ALTER DOMAIN fleet.session_id ADD CONSTRAINT messages_session_id_valid
    CHECK (length(VALUE) BETWEEN 1 AND 128
           AND VALUE !~ '[\x01-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]')
    NOT VALID;

ALTER DOMAIN fleet.message_body DROP CONSTRAINT messages_body_not_empty;
ALTER DOMAIN fleet.message_body ADD CONSTRAINT messages_body_not_empty
    CHECK (VALUE ~ '[^\x09-\x0d\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]')
    NOT VALID;
