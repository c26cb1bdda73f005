-- Photos. An upload is a file in the media directory and a row here; a
-- send binds it to one conversation, whose members may then fetch it.
-- Uploads no send named are deleted after the upload retention
-- (media_unsent).
CREATE TABLE media (
    media_id        TEXT    PRIMARY KEY,
    owner_id        BIGINT  NOT NULL REFERENCES users(id),
    media_type      INTEGER NOT NULL,
    size            BIGINT  NOT NULL,
    width           INTEGER NOT NULL,
    height          INTEGER NOT NULL,
    sha256          BYTEA   NOT NULL,
    created_ms      BIGINT  NOT NULL,
    conversation_id BIGINT
);
CREATE INDEX media_unsent ON media (created_ms) WHERE conversation_id IS NULL;
-- A PHOTO message's photo (an encoded chat.v1.Photo); NULL otherwise.
-- Adding a column with no default rewrites nothing.
ALTER TABLE messages ADD COLUMN attachment BYTEA;
