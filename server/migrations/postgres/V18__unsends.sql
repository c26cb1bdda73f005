-- Unsent ("remove for everyone"): the message's body and attachment are
-- erased in the UNSEND's transaction and the row is marked, as are the
-- EDITs of it. A constant default: since Postgres 11 adding it rewrites
-- no row.
ALTER TABLE messages ADD COLUMN unsent boolean NOT NULL DEFAULT false;
-- The EDITs of a message, which its unsending erases. Partial: only edits
-- are in it, so the text path's inserts never touch it. (Built in the
-- migration's transaction, holding writes to messages for as long as the
-- scan takes: on a large history, create it CONCURRENTLY by hand before
-- upgrading; IF NOT EXISTS then skips it here.)
CREATE INDEX IF NOT EXISTS messages_edits ON messages (conversation_id, reply_to) WHERE type = 6;
