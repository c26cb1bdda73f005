-- Removed members who have not yet been told: a member removed from a
-- group loses their members row, so catch-up, which reads from members,
-- would never send them the SYSTEM message that removed them (nor what
-- came before it that they had not received). A departure keeps their
-- delivered watermark and the removal's seq until their device
-- acknowledges it, and catch-up reads it like a membership ending there.
-- Rejoining the group deletes it.
CREATE TABLE departures (
    user_id         INTEGER NOT NULL,
    conversation_id INTEGER NOT NULL,
    delivered_seq   INTEGER NOT NULL,
    seq             INTEGER NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
) WITHOUT ROWID;
