-- Presence that must outlive connections and restarts: the last activity
-- time, and when the user chose to appear offline (NULL: visible).
ALTER TABLE users ADD COLUMN last_active_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN presence_hidden_at_ms BIGINT;
