-- Direct conversations a member deleted ("Delete chat"), up to the seq
-- they had then: for them the conversation starts after it (history,
-- catch-up, the unread count, the list's last message), and it leaves
-- their list until a later message comes. The other member keeps it all.
CREATE TABLE cleared_histories (
    user_id         BIGINT NOT NULL,
    conversation_id BIGINT NOT NULL,
    cleared_seq     BIGINT NOT NULL,
    PRIMARY KEY (user_id, conversation_id)
);
