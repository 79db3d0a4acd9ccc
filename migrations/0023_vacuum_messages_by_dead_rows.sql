-- Autovacuum fleet.messages once 10,000 of its rows are dead, however long its history.
--
-- Every claim moves its messages out of messages_claimable, and their entries stay in that
-- index, dead, until VACUUM removes them; a claim reads the index in queue order, so they pile
-- up at its front and every later claim steps over them (a claim on an emptied queue read 116
-- buffers after 30,000 messages, 805 after 210,000: `python bench/queue_probes.py soak`,
-- BENCHMARKS.md 2026-12-07). The server's default waits for a fifth of the table's rows to be
-- dead, so the more finished messages the table keeps, the rarer the vacuums and the dearer
-- every claim in between: finished rows slowing the queue after all. A fixed threshold keeps
-- the interval the same whatever the history; the server's autovacuum_naptime (one minute by
-- default) still bounds how often (README, "Vacuum").
ALTER TABLE fleet.messages SET (autovacuum_vacuum_scale_factor = 0,
                                autovacuum_vacuum_threshold = 10000);
