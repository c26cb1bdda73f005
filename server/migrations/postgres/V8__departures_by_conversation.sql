-- A repeated send or group change (a retry with its key) goes again to
-- the members removed since who were not told yet: their departures are
-- found by conversation, which the primary key (user, conversation) does
-- not serve; without it each such retry read the whole table.
-- IF NOT EXISTS: on a large table an operator may build it CONCURRENTLY
-- by hand first (same name).
CREATE INDEX IF NOT EXISTS departures_by_conversation ON departures (conversation_id, seq);
