-- Delivered and seen watermarks (members.delivered_seq / seen_seq) are
-- written behind: a move is made durable in its commit as one row appended
-- here (the table's last page), and the store thread writes the members
-- rows at most a second later, in key order, then empties this table. At
-- open, and after a rolled-back transaction, the rows left here are
-- replayed into members (watermarks only move up, so replaying is MAX).
CREATE TABLE watermark_log (
    id              INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL,
    user_id         INTEGER NOT NULL,
    delivered_seq   INTEGER NOT NULL,
    seen_seq        INTEGER NOT NULL
);
