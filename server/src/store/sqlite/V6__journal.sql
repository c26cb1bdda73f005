-- Sends and watermark moves are made durable in chat.journal between
-- SQLite commits (store/sqlite/journal.rs). Each commit starts a new
-- journal generation and records it here in the same transaction, so the
-- journal's records of this generation are exactly the acknowledged writes
-- SQLite does not hold yet; older ones are already here.
ALTER TABLE written_through ADD COLUMN journal_gen INTEGER NOT NULL DEFAULT 0;
