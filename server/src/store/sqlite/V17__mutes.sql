-- Conversations a member muted, and until when (Unix ms): their messages
-- notify nobody's devices of that member meanwhile. A table of its own
-- rather than a column of `members`, whose rows every receipt rewrites:
-- few members mute, and an unmuted conversation has no row.
CREATE TABLE mutes (
    user_id         INTEGER NOT NULL,
    conversation_id INTEGER NOT NULL,
    until_ms        INTEGER NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
) WITHOUT ROWID;
