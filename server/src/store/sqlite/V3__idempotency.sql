-- Idempotency keys move from a unique index on messages to a table that the
-- store thread writes behind, about once a second, in key order (see
-- sqlite.rs): a send no longer dirties a random index page in every
-- commit. Like the index, it is derived from messages, and the store
-- rebuilds what is missing (messages after `written_through`) at open.
CREATE TABLE idempotency (
    sender_id       INTEGER NOT NULL,
    client_msg_id   TEXT    NOT NULL,
    conversation_id INTEGER NOT NULL,
    seq             INTEGER NOT NULL,
    PRIMARY KEY (sender_id, client_msg_id)
) WITHOUT ROWID;
INSERT INTO idempotency (sender_id, client_msg_id, conversation_id, seq)
    SELECT sender_id, client_msg_id, conversation_id, seq FROM messages;
DROP INDEX messages_idempotency;
-- What the store thread has written behind: every message up to
-- keys_message_id has its key in `idempotency`, and every message up to
-- heads_message_id is counted in its conversation's last_seq and
-- last_activity_ms. The rest is rebuilt from messages at open.
CREATE TABLE written_through (
    id               INTEGER PRIMARY KEY CHECK (id = 1),
    keys_message_id  INTEGER NOT NULL,
    heads_message_id INTEGER NOT NULL
);
INSERT INTO written_through (id, keys_message_id, heads_message_id)
    SELECT 1, COALESCE(MAX(message_id), 0), COALESCE(MAX(message_id), 0) FROM messages;
