-- A reply's or a reaction's reference: the seq, in the same conversation,
-- of the message it answers or reacts to (NULL for none). Nullable, so
-- adding it rewrites no row.
ALTER TABLE messages ADD COLUMN reply_to INTEGER;
