-- Sessions that ended (expired or revoked) are deleted some time later
-- (`purge_sessions`); these find them without scanning every session.
-- IF NOT EXISTS: on a large table an operator may build them CONCURRENTLY
-- by hand first (TUNING.md), which a migration's transaction cannot.
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at_ms);
CREATE INDEX IF NOT EXISTS sessions_by_revocation ON sessions (revoked_at_ms)
    WHERE revoked_at_ms IS NOT NULL;
