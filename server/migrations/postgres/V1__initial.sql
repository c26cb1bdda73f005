-- The production history schema: the same tables and columns as the
-- embedded one (server/src/store/sqlite/V1__initial.sql), in Postgres types.
-- Ids are BIGINT identities; seq is per conversation and allocated by the
-- store under a row lock on the conversation.
--
-- Ready to partition by conversation (for example Citus, distributed by
-- conversation id): the hot tables, messages and members, have the
-- conversation id first in their primary keys, so a send touches one shard.
-- users, sessions, friends and friend_requests are small per user and
-- would be distributed by user id or kept as reference tables.
--
-- Every query the store makes is served by a primary key or by an index
-- below; the comment on each index names the query.

CREATE TABLE users (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Login lookup (user_by_name) and the uniqueness of names.
    username        TEXT   NOT NULL UNIQUE,
    password_hash   TEXT   NOT NULL,
    created_at_ms   BIGINT NOT NULL
);

CREATE TABLE sessions (
    token_hash      BYTEA  PRIMARY KEY,
    user_id         BIGINT NOT NULL REFERENCES users(id),
    device_name     TEXT   NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    revoked_at_ms   BIGINT
);
-- A user's sessions (revoking every device, and the foreign key from users).
CREATE INDEX sessions_by_user ON sessions(user_id);

CREATE TABLE friend_requests (
    from_id         BIGINT NOT NULL REFERENCES users(id),
    to_id           BIGINT NOT NULL REFERENCES users(id),
    created_at_ms   BIGINT NOT NULL,
    PRIMARY KEY (from_id, to_id)
);
-- Incoming requests of a user, oldest first (friends).
CREATE INDEX friend_requests_by_to ON friend_requests(to_id, created_at_ms);

-- Both directions are stored so that listing is one index range.
CREATE TABLE friends (
    user_id         BIGINT NOT NULL REFERENCES users(id),
    friend_id       BIGINT NOT NULL REFERENCES users(id),
    since_ms        BIGINT NOT NULL,
    PRIMARY KEY (user_id, friend_id)
);

CREATE TABLE conversations (
    id               BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind             INTEGER NOT NULL,
    name             TEXT    NOT NULL,
    -- "min:max" of the two user ids for direct conversations, else NULL.
    -- Unique, so that two concurrent open_direct calls meet on one row.
    direct_key       TEXT    UNIQUE,
    created_at_ms    BIGINT  NOT NULL,
    last_seq         BIGINT  NOT NULL DEFAULT 0,
    last_activity_ms BIGINT  NOT NULL
);

CREATE TABLE members (
    conversation_id BIGINT  NOT NULL REFERENCES conversations(id),
    user_id         BIGINT  NOT NULL REFERENCES users(id),
    role            INTEGER NOT NULL,
    joined_seq      BIGINT  NOT NULL,
    delivered_seq   BIGINT  NOT NULL,
    seen_seq        BIGINT  NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
-- A user's conversations: the conversation list, catch-up (undelivered)
-- and the receipt snapshot. Under partitioning this is the one query that
-- fans out to every shard holding one of the user's conversations.
CREATE INDEX members_by_user ON members(user_id, conversation_id);

-- No foreign keys on messages, unlike the SQLite schema: the store inserts
-- a message only after checking, in the same transaction, that its sender
-- is a member of its conversation (members references both users and
-- conversations), and it never deletes users, conversations or members.
-- The two FK triggers cost more than half of the insert itself (measured:
-- 3.3 of 5.8 ms for a 100-row insert), on the hottest statement there is.
CREATE TABLE messages (
    conversation_id BIGINT  NOT NULL,
    seq             BIGINT  NOT NULL,
    -- Unique because the identity hands out every value once. There is no
    -- index on it: no query reads by message id, and under partitioning a
    -- unique index would have to include the conversation id anyway.
    -- (Before Postgres 17 a partitioned table cannot have an identity
    -- column: it becomes BIGINT DEFAULT nextval() of a plain sequence.)
    message_id      BIGINT  GENERATED ALWAYS AS IDENTITY,
    sender_id       BIGINT  NOT NULL,
    client_msg_id   TEXT    NOT NULL,
    type            INTEGER NOT NULL,
    sent_at_ms      BIGINT  NOT NULL,
    body            TEXT    NOT NULL,
    -- History pages, the newest message, unread counts and catch-up are
    -- all ranges of this key.
    PRIMARY KEY (conversation_id, seq)
);
-- Idempotency: a retried send finds its original (append).
--
-- Under partitioning by conversation a unique index must contain the
-- partition key, so this one cannot stay as it is. The choice, when we
-- partition: make it UNIQUE (conversation_id, sender_id, client_msg_id).
-- A retry always targets the conversation of the original (the client
-- resends the same queued message), so the narrower scope changes nothing
-- for a correct client, and every send stays a single-shard transaction.
-- The alternative, a separate idempotency table keyed by sender, keeps the
-- global scope but turns every send into a two-shard transaction (two-phase
-- commit), which the send path cannot afford. The HistoryStore doc
-- ("unique per sender") must then say "per sender and conversation".
CREATE UNIQUE INDEX messages_idempotency ON messages(sender_id, client_msg_id);
