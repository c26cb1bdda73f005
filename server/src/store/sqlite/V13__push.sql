-- Push registrations (RegisterPush). A device's push token belongs to the
-- session it registered with, so logging out or the session's expiry
-- ends its notifications, and the session purge deletes it. A token is
-- held by one session at most (a new registration takes it from the
-- others): the index finds them, and the token the gateway rejects.
ALTER TABLE sessions ADD COLUMN push_app_id TEXT;
ALTER TABLE sessions ADD COLUMN push_token TEXT;
ALTER TABLE sessions ADD COLUMN push_registered_ms INTEGER;
CREATE INDEX sessions_by_push_token ON sessions(push_token) WHERE push_token IS NOT NULL;
