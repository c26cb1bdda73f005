-- Photos. An upload is a file in the media directory and a row here; a
-- send binds it to one conversation, whose members may then fetch it.
-- Uploads no send named are deleted after the upload retention
-- (media_unsent).
CREATE TABLE media (
    media_id        TEXT    PRIMARY KEY,
    owner_id        INTEGER NOT NULL REFERENCES users(id),
    media_type      INTEGER NOT NULL,
    size            INTEGER NOT NULL,
    width           INTEGER NOT NULL,
    height          INTEGER NOT NULL,
    sha256          BLOB    NOT NULL,
    created_ms      INTEGER NOT NULL,
    conversation_id INTEGER REFERENCES conversations(id)
) WITHOUT ROWID;
CREATE INDEX media_unsent ON media(created_ms) WHERE conversation_id IS NULL;
-- A PHOTO message's photo (an encoded chat.v1.Photo); NULL otherwise.
ALTER TABLE messages ADD COLUMN attachment BLOB;
