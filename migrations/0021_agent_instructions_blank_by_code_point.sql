-- An agent's instructions are blank by the same code points as a message body (migration 0020),
-- not by the server locale's [:space:], which under C.UTF-8 (glibc) leaves out the no-break
-- spaces: instructions of nothing but U+00A0 were refused by `fleet agents create` (Python's
-- str.strip) and accepted by a direct INSERT. NOT VALID, as in 0020: new values are checked.
ALTER TABLE fleet.agents DROP CONSTRAINT agents_instructions_size;
ALTER TABLE fleet.agents ADD CONSTRAINT agents_instructions_size
    CHECK (instructions ~ '[^\x09-\x0d\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]'
           AND octet_length(instructions) <= 65536)
    NOT VALID;
