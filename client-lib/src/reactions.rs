//! Folding REACTION, EDIT and UNSEND messages into what an app shows of
//! the messages they name.

use std::collections::{BTreeMap, HashMap, HashSet};

use chat_protocol::proto;

/// Who reacted how to which message, from the REACTION messages an app
/// has seen (delivered live, caught up, or read from history), in any
/// order: each member's reaction to a message is their REACTION to it with
/// the highest seq, and an empty one takes theirs back. So a history read
/// backwards (reactions before the messages they name) and live
/// deliveries fold to the same state.
///
/// Kept by the app beside the messages it holds, for the conversations it
/// shows; it grows with the reactions given to it.
#[derive(Debug, Default, Clone)]
pub struct Reactions {
    /// (conversation, message) -> member -> (seq of their latest
    /// REACTION to it, its text: empty once taken back).
    by_message: HashMap<(u64, u64), BTreeMap<u64, (u64, String)>>,
}

impl Reactions {
    /// An empty fold.
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds `message` in if it is a REACTION (returns whether it was):
    /// it replaces its sender's reaction to the same message only if it is
    /// newer (a higher seq).
    pub fn apply(&mut self, message: &proto::Message) -> bool {
        if message.r#type != proto::MessageType::Reaction as i32 || message.reply_to_seq == 0 {
            return false;
        }
        let members = self
            .by_message
            .entry((message.conversation_id, message.reply_to_seq))
            .or_default();
        match members.get(&message.sender_id) {
            Some((seq, _)) if *seq >= message.seq => {}
            _ => {
                members.insert(message.sender_id, (message.seq, message.text.clone()));
            }
        }
        true
    }

    /// The reactions to message `seq` of a conversation: (member, emoji),
    /// oldest first (by the seq of each member's reaction).
    pub fn of(&self, conversation_id: u64, seq: u64) -> Vec<(u64, &str)> {
        let Some(members) = self.by_message.get(&(conversation_id, seq)) else {
            return Vec::new();
        };
        let mut reactions: Vec<(u64, u64, &str)> = members
            .iter()
            .filter(|(_, (_, emoji))| !emoji.is_empty())
            .map(|(&user, (at, emoji))| (*at, user, emoji.as_str()))
            .collect();
        reactions.sort_unstable();
        reactions
            .into_iter()
            .map(|(_, user, emoji)| (user, emoji))
            .collect()
    }

    /// Forgets a conversation's reactions (the app dropped its messages,
    /// or deleted the chat).
    pub fn forget(&mut self, conversation_id: u64) {
        self.by_message.retain(|&(c, _), _| c != conversation_id);
    }
}

/// The edited texts of messages, from the EDIT messages an app has seen,
/// in any order: a message's latest EDIT (by seq) stands. The server takes
/// edits only from a text's author, within its edit window.
#[derive(Debug, Default, Clone)]
pub struct Edits {
    /// (conversation, message) -> (seq of its latest EDIT, the new text).
    by_message: HashMap<(u64, u64), (u64, String)>,
}

impl Edits {
    /// An empty fold.
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds `message` in if it is an EDIT (returns whether it was): it
    /// replaces an earlier edit of the same message. An edit the server
    /// erased (`unsent`: its message was unsent) changes nothing.
    pub fn apply(&mut self, message: &proto::Message) -> bool {
        if message.r#type != proto::MessageType::Edit as i32 || message.reply_to_seq == 0 {
            return false;
        }
        if message.unsent {
            return true;
        }
        let key = (message.conversation_id, message.reply_to_seq);
        match self.by_message.get(&key) {
            Some((seq, _)) if *seq >= message.seq => {}
            _ => {
                self.by_message
                    .insert(key, (message.seq, message.text.clone()));
            }
        }
        true
    }

    /// The text message `seq` of a conversation shows now, if it was
    /// edited (the app marks it so).
    pub fn of(&self, conversation_id: u64, seq: u64) -> Option<&str> {
        self.by_message
            .get(&(conversation_id, seq))
            .map(|(_, text)| text.as_str())
    }

    /// Forgets a conversation's edits.
    pub fn forget(&mut self, conversation_id: u64) {
        self.by_message.retain(|&(c, _), _| c != conversation_id);
    }
}

/// The messages their senders unsent ("remove for everyone"), from what
/// an app has seen in any order: an UNSEND message names one, and a
/// message read after its unsending comes marked `unsent`, its content
/// erased by the server. An app shows "unsent a message" in place of one
/// (its edits and any copy it kept included) and offers no reply,
/// reaction or edit to it.
#[derive(Debug, Default, Clone)]
pub struct Unsends {
    /// (conversation, seq) of each message unsent.
    unsent: HashSet<(u64, u64)>,
}

impl Unsends {
    /// An empty fold.
    pub fn new() -> Self {
        Self::default()
    }

    /// Folds `message` in: an UNSEND (returns true, as it is not a message
    /// to show) marks what it names, and a message marked `unsent` marks
    /// itself (returns false: the app shows it, as unsent).
    pub fn apply(&mut self, message: &proto::Message) -> bool {
        if message.r#type == proto::MessageType::Unsend as i32 {
            if message.reply_to_seq != 0 {
                self.unsent
                    .insert((message.conversation_id, message.reply_to_seq));
            }
            return true;
        }
        if message.unsent {
            self.unsent.insert((message.conversation_id, message.seq));
        }
        false
    }

    /// Whether message `seq` of a conversation was unsent.
    pub fn is_unsent(&self, conversation_id: u64, seq: u64) -> bool {
        self.unsent.contains(&(conversation_id, seq))
    }

    /// Forgets a conversation's unsends.
    pub fn forget(&mut self, conversation_id: u64) {
        self.unsent.retain(|&(c, _)| c != conversation_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reaction(seq: u64, sender: u64, to: u64, emoji: &str) -> proto::Message {
        proto::Message {
            conversation_id: 7,
            seq,
            sender_id: sender,
            r#type: proto::MessageType::Reaction as i32,
            text: emoji.into(),
            reply_to_seq: to,
            ..Default::default()
        }
    }

    #[test]
    fn the_latest_reaction_of_each_member_stands_in_any_order() {
        let stream = [
            reaction(2, 10, 1, "👍"),
            reaction(3, 11, 1, "😂"),
            reaction(4, 10, 1, "❤️"),
            reaction(5, 11, 1, ""),
            reaction(6, 12, 1, "😮"),
        ];
        let mut forward = Reactions::new();
        for m in &stream {
            assert!(forward.apply(m));
        }
        let mut backward = Reactions::new();
        for m in stream.iter().rev() {
            assert!(backward.apply(m));
        }
        // 11 took theirs back; 10's latest is the heart, which came after
        // their thumbs-up but before 12's reaction.
        let expected = vec![(10, "❤️"), (12, "😮")];
        assert_eq!(forward.of(7, 1), expected);
        assert_eq!(backward.of(7, 1), expected);
        assert!(forward.of(7, 2).is_empty());
        assert!(forward.of(8, 1).is_empty());
    }

    #[test]
    fn other_messages_are_not_folded_and_forget_drops_a_conversation() {
        let mut reactions = Reactions::new();
        let text = proto::Message {
            conversation_id: 7,
            seq: 9,
            sender_id: 10,
            r#type: proto::MessageType::Text as i32,
            text: "👍".into(),
            reply_to_seq: 1,
            ..Default::default()
        };
        assert!(!reactions.apply(&text));
        assert!(reactions.of(7, 1).is_empty());
        assert!(reactions.apply(&reaction(2, 10, 1, "👍")));
        reactions.forget(8);
        assert_eq!(reactions.of(7, 1), vec![(10, "👍")]);
        reactions.forget(7);
        assert!(reactions.of(7, 1).is_empty());
    }

    #[test]
    fn the_latest_edit_stands_in_any_order() {
        let edit = |seq, to, text: &str| proto::Message {
            conversation_id: 7,
            seq,
            sender_id: 10,
            r#type: proto::MessageType::Edit as i32,
            text: text.into(),
            reply_to_seq: to,
            ..Default::default()
        };
        let stream = [edit(5, 1, "helo"), edit(6, 2, "other"), edit(8, 1, "hello")];
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0]] {
            let mut edits = Edits::new();
            for i in order {
                assert!(edits.apply(&stream[i]));
            }
            assert_eq!(edits.of(7, 1), Some("hello"));
            assert_eq!(edits.of(7, 2), Some("other"));
            assert_eq!(edits.of(7, 3), None);
        }
        let mut edits = Edits::new();
        assert!(!edits.apply(&reaction(9, 10, 1, "👍")));
        assert_eq!(edits.of(7, 1), None);
        edits.apply(&stream[0]);
        edits.forget(7);
        assert_eq!(edits.of(7, 1), None);
        // An edit the server erased when its message was unsent.
        let erased = proto::Message {
            unsent: true,
            ..edit(9, 1, "")
        };
        assert!(edits.apply(&erased));
        assert_eq!(edits.of(7, 1), None);
    }

    #[test]
    fn unsends_mark_what_they_name_and_what_comes_marked() {
        let message = |seq, kind: proto::MessageType, to, unsent| proto::Message {
            conversation_id: 7,
            seq,
            sender_id: 10,
            r#type: kind as i32,
            reply_to_seq: to,
            unsent,
            ..Default::default()
        };
        let mut unsends = Unsends::new();
        // Live: the text, then the UNSEND naming it.
        assert!(!unsends.apply(&message(1, proto::MessageType::Text, 0, false)));
        assert!(!unsends.is_unsent(7, 1));
        assert!(unsends.apply(&message(4, proto::MessageType::Unsend, 1, false)));
        assert!(unsends.is_unsent(7, 1));
        // From history after the unsend: the photo comes marked.
        assert!(!unsends.apply(&message(2, proto::MessageType::Photo, 0, true)));
        assert!(unsends.is_unsent(7, 2));
        // Neither a reply to a message nor another conversation's seq.
        assert!(!unsends.apply(&message(3, proto::MessageType::Text, 1, false)));
        assert!(!unsends.is_unsent(7, 3));
        assert!(!unsends.is_unsent(8, 1));
        unsends.forget(7);
        assert!(!unsends.is_unsent(7, 1) && !unsends.is_unsent(7, 2));
    }
}
