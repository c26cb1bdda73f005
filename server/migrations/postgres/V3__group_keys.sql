-- Idempotent group creation: a CreateGroup may carry a key of its creator's
-- choosing, and a retry with the same key (after a lost reply) finds the
-- group the first one made instead of making another. NULL for direct
-- conversations and for creations without a key, which the partial index
-- leaves out.
ALTER TABLE conversations ADD COLUMN creator_id BIGINT;
ALTER TABLE conversations ADD COLUMN create_key TEXT;
CREATE UNIQUE INDEX conversations_create_key ON conversations (creator_id, create_key)
    WHERE create_key IS NOT NULL;
