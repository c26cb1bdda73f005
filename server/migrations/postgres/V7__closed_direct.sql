-- A direct conversation takes sends only while its two users are friends.
-- The flag lives on the conversation's row, which a group commit locks
-- and reads anyway: ending a friendship sets it (taking that row's lock,
-- so a send is either stored first or refused), making one clears it.
ALTER TABLE conversations ADD COLUMN closed BOOLEAN NOT NULL DEFAULT false;

-- Pairs who stopped being friends before this migration.
UPDATE conversations c SET closed = true
WHERE c.kind = 1
  AND NOT EXISTS (
    SELECT 1 FROM members a
    JOIN members b ON b.conversation_id = a.conversation_id AND b.user_id > a.user_id
    JOIN friends f ON f.user_id = a.user_id AND f.friend_id = b.user_id
    WHERE a.conversation_id = c.id);
