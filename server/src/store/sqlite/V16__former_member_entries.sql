-- A group its member left, or was removed from, stays in their
-- conversation list as it was when they left: the time of the message
-- that ended their stay orders it, and the group's name then names it (a
-- rename after they left is not theirs to see). Ranges recorded before
-- this migration take that message's time and the group's current name.
-- The message is found through message_index, or, for the few written
-- since the index last was (above heads_message_id), in their rowid range.
ALTER TABLE former_members ADD COLUMN left_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE former_members ADD COLUMN name TEXT NOT NULL DEFAULT '';
UPDATE former_members SET
    left_ms = COALESCE(
        (SELECT m.sent_at_ms FROM message_index i JOIN messages m ON m.message_id = i.message_id
         WHERE i.conversation_id = former_members.conversation_id
           AND i.seq = former_members.left_seq),
        (SELECT m.sent_at_ms FROM messages m
         WHERE m.message_id > (SELECT heads_message_id FROM written_through WHERE id = 1)
           AND m.conversation_id = former_members.conversation_id
           AND m.seq = former_members.left_seq),
        0),
    name = COALESCE((SELECT c.name FROM conversations c
                     WHERE c.id = former_members.conversation_id), '');
