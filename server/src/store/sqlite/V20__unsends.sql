-- Unsent ("remove for everyone"): the message's text and attachment are
-- erased in the UNSEND's transaction and the row is marked, as are the
-- EDITs of it. A constant default: adding it rewrites no row.
ALTER TABLE messages ADD COLUMN unsent INTEGER NOT NULL DEFAULT 0;
-- The EDITs of a message, which its unsending erases. Partial: only edits
-- are in it, so the text path's inserts never touch it.
CREATE INDEX messages_edits ON messages (conversation_id, reply_to) WHERE type = 6;
