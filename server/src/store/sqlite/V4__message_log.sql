-- Messages become an append-only log keyed by message_id, so a commit
-- appends to the table's last page or two instead of dirtying one leaf per
-- conversation it touches (with thousands of active conversations, about
-- one 4 KiB page per message, written to the WAL and again at checkpoint).
-- Finding a conversation's messages goes through message_index, which the
-- store thread writes behind with the conversation heads, in key order:
-- every message up to written_through.heads_message_id has its index row,
-- the rest are held in memory and rebuilt from the log at open.
CREATE TABLE message_log (
    message_id      INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id),
    seq             INTEGER NOT NULL,
    sender_id       INTEGER NOT NULL REFERENCES users(id),
    client_msg_id   TEXT    NOT NULL,
    type            INTEGER NOT NULL,
    sent_at_ms      INTEGER NOT NULL,
    body            TEXT    NOT NULL
);
INSERT INTO message_log (message_id, conversation_id, seq, sender_id, client_msg_id, type, sent_at_ms, body)
    SELECT message_id, conversation_id, seq, sender_id, client_msg_id, type, sent_at_ms, body
    FROM messages ORDER BY message_id;
CREATE TABLE message_index (
    conversation_id INTEGER NOT NULL,
    seq             INTEGER NOT NULL,
    message_id      INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;
INSERT INTO message_index (conversation_id, seq, message_id)
    SELECT conversation_id, seq, message_id FROM messages;
DROP TABLE messages;
ALTER TABLE message_log RENAME TO messages;
