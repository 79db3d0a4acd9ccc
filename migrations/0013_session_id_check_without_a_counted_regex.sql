-- The session id rule, same strings accepted, checked ~18 times faster.
--
-- '^[^[:cntrl:][:space:]]{1,128}$' compiles to an automaton with 128 counted states, and
-- PostgreSQL builds the states it visits afresh on every match: ~6 us per value on this
-- machine, paid at each enqueue by the domain and again by fleet.enqueue's own check (a tenth
-- of an enqueue's backend CPU). "1 to 128 characters, none of them a space or a control
-- character" is the same set of strings as a length test and a one-character class:
-- ~0.3 us (200,000 values: 1.19 s against 0.07 s). The constraint keeps its name and its error (23514, messages_session_id_valid).
--
-- NOT VALID: every value already stored passed the old check, which accepts exactly the same
-- strings, and validating would read the whole table under a lock that stops enqueues. New
-- values are checked from now on, as with any domain constraint.
ALTER DOMAIN fleet.session_id DROP CONSTRAINT messages_session_id_valid;
ALTER DOMAIN fleet.session_id ADD CONSTRAINT messages_session_id_valid
    CHECK (length(VALUE) BETWEEN 1 AND 128 AND VALUE !~ '[[:cntrl:][:space:]]') NOT VALID;
