-- Users a user blocked (`block`): no friendship or request between the
-- two while a row is here. Listing and both checks are key lookups.
CREATE TABLE blocks (
    user_id         INTEGER NOT NULL REFERENCES users(id),
    blocked_id      INTEGER NOT NULL REFERENCES users(id),
    since_ms        INTEGER NOT NULL,
    PRIMARY KEY (user_id, blocked_id)
) WITHOUT ROWID;
