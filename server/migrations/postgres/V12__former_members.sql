-- Memberships that ended (the member left or was removed), as the range
-- of seqs they could read: from where they joined to the message that
-- ended it. A removed member's device keeps what it was sent, and a photo
-- fetch checks these ranges as well as the current membership, so the
-- photos of those messages stay theirs to download. Being added again
-- starts a new range and keeps the old ones. Memberships that ended
-- before this migration left no range.
CREATE TABLE former_members (
    user_id         BIGINT NOT NULL,
    conversation_id BIGINT NOT NULL,
    joined_seq      BIGINT NOT NULL,
    left_seq        BIGINT NOT NULL,
    PRIMARY KEY (user_id, conversation_id, joined_seq)
);
