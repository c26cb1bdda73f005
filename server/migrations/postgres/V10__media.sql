-- Photos. An upload is a file in the media directory and a row here. A
-- send binds it to one conversation (conversation_id, bound_ms) before it
-- is appended, and the append that stores the message records its seq:
-- from then on the members who may read that seq may fetch it. Uploads
-- that no stored message carries are deleted once neither their upload
-- nor their last binding is within the upload retention (media_unsent).
CREATE TABLE media (
    media_id        TEXT    PRIMARY KEY,
    owner_id        BIGINT  NOT NULL REFERENCES users(id),
    media_type      INTEGER NOT NULL,
    size            BIGINT  NOT NULL,
    width           INTEGER NOT NULL,
    height          INTEGER NOT NULL,
    sha256          BYTEA   NOT NULL,
    created_ms      BIGINT  NOT NULL,
    conversation_id BIGINT,
    bound_ms        BIGINT,
    seq             BIGINT
);
CREATE INDEX media_unsent ON media (created_ms) WHERE seq IS NULL;
-- A PHOTO message's photo (an encoded chat.v1.Photo); NULL otherwise.
-- Adding a column with no default rewrites nothing.
ALTER TABLE messages ADD COLUMN attachment BYTEA;
