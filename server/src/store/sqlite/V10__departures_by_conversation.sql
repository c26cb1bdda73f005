-- A repeated send or group change (a retry with its key) goes again to
-- the members removed since who were not told yet: their departures are
-- found by conversation, which the primary key (user, conversation) does
-- not serve.
CREATE INDEX IF NOT EXISTS departures_by_conversation ON departures (conversation_id, seq);
