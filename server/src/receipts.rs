//! Who hears that a member's delivered / seen watermarks moved.
//!
//! In a conversation of up to `receipt-broadcast-max-members` members every
//! move goes to every other member, so small groups show live "seen by 2 of
//! 4". Broadcasting costs up to 2(s - 1)^2 receipts per message in a group
//! of s, though (each member's delivered and seen moves, to everyone else),
//! which saturates a core at a hundred sends a second in groups of ~90
//! (BENCHMARKS.md, session 15). Above the limit a move goes only to the
//! senders of the messages it newly covers: they are the ones whose
//! "delivered" / "seen by N" is on screen. Everyone else asks
//! `GetMessageReceipts` when they open a message's details.
//!
//! To know what a move newly covers, the routes remember, per large
//! conversation, the senders of its latest messages (fed by the send
//! committer, which stores messages in seq order; from half the limit up,
//! so a group that grows past it has its latest senders) and each
//! member's last routed watermarks. Both are in memory and bounded: a move that covers
//! messages older than the log, or that follows a restart, reaches the
//! senders the log still holds, and the store stays the truth.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::store::{ConversationId, UserId, WatermarkMoved};

/// Latest messages remembered per large conversation.
const SENDER_LOG: usize = 64;
/// Large conversations remembered; beyond it an arbitrary one is forgotten.
const MAX_CONVERSATIONS: usize = 16_384;
/// Member watermarks remembered; beyond it all are forgotten (the next move
/// of each then counts as covering the whole sender log).
const MAX_MARKS: usize = 1 << 18;

/// The routing table; see the module docs.
pub struct ReceiptRoutes {
    broadcast_max: usize,
    state: Mutex<Routes>,
}

#[derive(Default)]
struct Routes {
    /// Per large conversation: (seq, sender) of its latest messages, in
    /// seq order.
    senders: HashMap<ConversationId, VecDeque<(u64, UserId)>>,
    /// Per (large conversation, member): the (delivered, seen) watermarks
    /// last routed.
    marks: HashMap<(ConversationId, UserId), (u64, u64)>,
}

impl ReceiptRoutes {
    /// Routes that broadcast in conversations of up to `broadcast_max`
    /// members.
    pub fn new(broadcast_max: usize) -> Self {
        ReceiptRoutes {
            broadcast_max,
            state: Mutex::new(Routes::default()),
        }
    }

    fn broadcasts(&self, members: usize) -> bool {
        members <= self.broadcast_max
    }

    /// Whether messages of a conversation of `members` are logged: every
    /// one that does not broadcast, and those that may soon stop (a group
    /// at the limit that adds a member would otherwise start with an
    /// empty log, and acks of its earlier messages would reach no sender).
    fn logs(&self, members: usize) -> bool {
        members > self.broadcast_max / 2
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes message `seq` of `conversation` (with `members` members) from
    /// `sender`. Called in seq order per conversation.
    pub fn note_message(
        &self,
        conversation: ConversationId,
        members: usize,
        seq: u64,
        sender: UserId,
    ) {
        if !self.logs(members) {
            return;
        }
        let mut routes = self.routes();
        if routes.senders.len() >= MAX_CONVERSATIONS
            && !routes.senders.contains_key(&conversation)
            && let Some(&victim) = routes.senders.keys().next()
        {
            routes.senders.remove(&victim);
        }
        let log = routes.senders.entry(conversation).or_default();
        if log.len() == SENDER_LOG {
            log.pop_front();
        }
        log.push_back((seq, sender));
    }

    /// Calls `notify` for each member to tell about `moved`: every other
    /// member of a small conversation; in a large one, the senders of the
    /// messages the move newly covers (each once, never the mover).
    pub fn route(&self, moved: &WatermarkMoved, mut notify: impl FnMut(UserId)) {
        if self.broadcasts(moved.members.len()) {
            for &member in moved.members.iter() {
                if member != moved.user_id {
                    notify(member);
                }
            }
            return;
        }
        for sender in self.covered_senders(moved) {
            notify(sender);
        }
    }

    /// The senders `route` tells in a large conversation (collected under
    /// the lock, told after it).
    fn covered_senders(&self, moved: &WatermarkMoved) -> Vec<UserId> {
        let mut guard = self.routes();
        let routes = &mut *guard;
        if routes.marks.len() >= MAX_MARKS {
            routes.marks.clear();
        }
        let key = (moved.conversation_id, moved.user_id);
        let new = (moved.delivered_seq, moved.seen_seq);
        let (old_delivered, old_seen) = routes.marks.insert(key, new).unwrap_or((0, 0));
        let mut told: Vec<UserId> = Vec::new();
        let Some(log) = routes.senders.get(&moved.conversation_id) else {
            return told;
        };
        let covered = |seq: u64| {
            (old_delivered < seq && seq <= moved.delivered_seq)
                || (old_seen < seq && seq <= moved.seen_seq)
        };
        let from = log.partition_point(|&(seq, _)| seq <= old_delivered.min(old_seen));
        for &(seq, sender) in log.range(from..) {
            if seq > moved.delivered_seq.max(moved.seen_seq) {
                break;
            }
            if covered(seq)
                && sender != moved.user_id
                && !told.contains(&sender)
                && moved.members.contains(&sender)
            {
                told.push(sender);
            }
        }
        told
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn moved(user_id: UserId, delivered_seq: u64, seen_seq: u64, members: usize) -> WatermarkMoved {
        WatermarkMoved {
            conversation_id: 7,
            user_id,
            delivered_seq,
            seen_seq,
            members: Arc::new((1..=members as u64).collect()),
        }
    }

    fn routed(routes: &ReceiptRoutes, m: &WatermarkMoved) -> Vec<UserId> {
        let mut out = Vec::new();
        routes.route(m, |u| out.push(u));
        out
    }

    #[test]
    fn small_conversations_broadcast_to_everyone_but_the_mover() {
        let routes = ReceiptRoutes::new(4);
        routes.note_message(7, 4, 1, 1);
        assert_eq!(routed(&routes, &moved(2, 1, 0, 4)), vec![1, 3, 4]);
    }

    #[test]
    fn large_conversations_tell_only_the_senders_of_newly_covered_messages() {
        let routes = ReceiptRoutes::new(3);
        // Members 1..=6; 1 sends seq 1 and 2, 3 sends seq 3, 5 sends seq 4.
        for (seq, sender) in [(1, 1), (2, 1), (3, 3), (4, 5)] {
            routes.note_message(7, 6, seq, sender);
        }
        // Member 2 receives up to 3: the senders of 1..=3.
        assert_eq!(routed(&routes, &moved(2, 3, 0, 6)), vec![1, 3]);
        // Then 4 arrives: only its sender.
        assert_eq!(routed(&routes, &moved(2, 4, 0, 6)), vec![5]);
        // Member 2 reads up to 2 (seen moves, delivered stays): sender 1.
        assert_eq!(routed(&routes, &moved(2, 4, 2, 6)), vec![1]);
        // A sender's own move covering its message tells the others only.
        assert_eq!(routed(&routes, &moved(3, 4, 0, 6)), vec![1, 5]);
        // A sender who left is not told.
        let mut left = moved(4, 4, 0, 6);
        Arc::make_mut(&mut left.members).retain(|&m| m != 5);
        assert_eq!(routed(&routes, &left), vec![1, 3]);
        // Another conversation knows nothing of these.
        let mut other = moved(2, 4, 0, 6);
        other.conversation_id = 8;
        assert!(routed(&routes, &other).is_empty());
    }

    #[test]
    fn a_group_that_grows_past_the_limit_still_routes_its_earlier_messages() {
        // Messages sent while the group broadcast (4 members, limit 4);
        // a fifth member joins, then member 2 acks them: the senders hear
        // it. The log used to start only once the group was large, so
        // nobody did.
        let routes = ReceiptRoutes::new(4);
        routes.note_message(7, 4, 1, 1);
        routes.note_message(7, 4, 2, 3);
        assert_eq!(routed(&routes, &moved(2, 2, 0, 5)), vec![1, 3]);
        // Small conversations (1-1 among them) log nothing.
        routes.note_message(8, 2, 1, 1);
        assert!(!routes.routes().senders.contains_key(&8));
    }

    #[test]
    fn the_sender_log_is_bounded() {
        let routes = ReceiptRoutes::new(2);
        for seq in 1..=(SENDER_LOG as u64 + 10) {
            routes.note_message(7, 5, seq, 100 + seq);
        }
        let members_and_senders = |m: &mut WatermarkMoved| {
            Arc::make_mut(&mut m.members).extend(100..100 + SENDER_LOG as u64 + 11);
        };
        let mut m = moved(2, SENDER_LOG as u64 + 10, 0, 5);
        members_and_senders(&mut m);
        // Only the latest SENDER_LOG messages' senders are remembered.
        let told = routed(&routes, &m);
        assert_eq!(told.len(), SENDER_LOG);
        assert_eq!(told[0], 100 + 11);
        assert_eq!(routes.routes().senders[&7].len(), SENDER_LOG);
    }
}
