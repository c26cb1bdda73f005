-- Users a user blocked (`block`): no friendship or request between the
-- two while a row is here. Listing and both checks are key lookups.
CREATE TABLE blocks (
    user_id         BIGINT  NOT NULL REFERENCES users(id),
    blocked_id      BIGINT  NOT NULL REFERENCES users(id),
    since_ms        BIGINT  NOT NULL,
    PRIMARY KEY (user_id, blocked_id)
);
