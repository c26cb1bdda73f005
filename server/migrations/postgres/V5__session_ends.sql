-- Sessions that ended (expired or revoked) are deleted some time later
-- (`purge_sessions`); these find them without scanning every session.
CREATE INDEX sessions_by_expiry ON sessions (expires_at_ms);
CREATE INDEX sessions_by_revocation ON sessions (revoked_at_ms) WHERE revoked_at_ms IS NOT NULL;
