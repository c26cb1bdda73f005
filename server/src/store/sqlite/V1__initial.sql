-- The embedded history schema. Ids are SQLite rowids; seq is per
-- conversation. Mirrors the Postgres schema so both pass one conformance
-- suite.

CREATE TABLE users (
    id              INTEGER PRIMARY KEY,
    username        TEXT    NOT NULL UNIQUE,
    password_hash   TEXT    NOT NULL,
    created_at_ms   INTEGER NOT NULL
);

CREATE TABLE sessions (
    token_hash      BLOB    PRIMARY KEY,
    user_id         INTEGER NOT NULL REFERENCES users(id),
    device_name     TEXT    NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    revoked_at_ms   INTEGER
) WITHOUT ROWID;
CREATE INDEX sessions_by_user ON sessions(user_id);

CREATE TABLE friend_requests (
    from_id         INTEGER NOT NULL REFERENCES users(id),
    to_id           INTEGER NOT NULL REFERENCES users(id),
    created_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (from_id, to_id)
) WITHOUT ROWID;
CREATE INDEX friend_requests_by_to ON friend_requests(to_id);

-- Both directions are stored so that listing is one index range.
CREATE TABLE friends (
    user_id         INTEGER NOT NULL REFERENCES users(id),
    friend_id       INTEGER NOT NULL REFERENCES users(id),
    since_ms        INTEGER NOT NULL,
    PRIMARY KEY (user_id, friend_id)
) WITHOUT ROWID;

CREATE TABLE conversations (
    id               INTEGER PRIMARY KEY,
    kind             INTEGER NOT NULL,
    name             TEXT    NOT NULL,
    -- "min:max" of the two user ids for direct conversations, else NULL.
    direct_key       TEXT    UNIQUE,
    created_at_ms    INTEGER NOT NULL,
    last_seq         INTEGER NOT NULL DEFAULT 0,
    last_activity_ms INTEGER NOT NULL
);

CREATE TABLE members (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id),
    user_id         INTEGER NOT NULL REFERENCES users(id),
    role            INTEGER NOT NULL,
    joined_seq      INTEGER NOT NULL,
    delivered_seq   INTEGER NOT NULL,
    seen_seq        INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITHOUT ROWID;
CREATE INDEX members_by_user ON members(user_id, conversation_id);

CREATE TABLE messages (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id),
    seq             INTEGER NOT NULL,
    message_id      INTEGER NOT NULL UNIQUE,
    sender_id       INTEGER NOT NULL REFERENCES users(id),
    client_msg_id   TEXT    NOT NULL,
    type            INTEGER NOT NULL,
    sent_at_ms      INTEGER NOT NULL,
    body            TEXT    NOT NULL,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_idempotency ON messages(sender_id, client_msg_id);
