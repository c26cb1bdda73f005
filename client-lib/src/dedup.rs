//! Which messages the app has had: the highest seq handed over per
//! conversation, so a redelivery (the server resends what it did not see
//! acknowledged, e.g. after a reconnect) is not shown twice.
//!
//! Bounded: the server names the conversations, and a client must not grow
//! without limit on what a server sends it. Beyond [`MAX_CONVERSATIONS`]
//! the half of the conversations that had a delivery least recently is
//! forgotten. A redelivery only follows a delivery whose ack was lost, a
//! moment earlier, so what is forgotten (thousands of conversations ago)
//! is never asked about again in practice.

use std::collections::HashMap;

/// Conversations remembered at most (~40 bytes each).
pub(crate) const MAX_CONVERSATIONS: usize = 16_384;

#[derive(Debug, Default)]
pub(crate) struct Delivered {
    /// Conversation -> (highest seq handed over, tick of its last delivery).
    seqs: HashMap<u64, (u64, u64)>,
    /// Counts deliveries: recency without a clock.
    tick: u64,
}

impl Delivered {
    /// True the first time (conversation, seq) is seen; seqs arrive in
    /// increasing order per conversation, so anything not above the last
    /// one is a redelivery.
    pub(crate) fn first(&mut self, conversation_id: u64, seq: u64) -> bool {
        self.tick += 1;
        let (last, touched) = self.seqs.entry(conversation_id).or_insert((0, 0));
        *touched = self.tick;
        let first = seq > *last;
        if first {
            *last = seq;
        }
        if self.seqs.len() > MAX_CONVERSATIONS {
            self.forget_least_recent_half();
        }
        first
    }

    /// Whether (conversation, seq) would be [`first`](Self::first), without
    /// recording it.
    pub(crate) fn is_new(&self, conversation_id: u64, seq: u64) -> bool {
        self.seqs
            .get(&conversation_id)
            .is_none_or(|&(last, _)| seq > last)
    }

    /// The highest seq seen of the conversation, if it is remembered.
    pub(crate) fn last(&self, conversation_id: u64) -> Option<u64> {
        self.seqs.get(&conversation_id).map(|&(last, _)| last)
    }

    /// Drops the conversations whose last delivery is older than the
    /// median: one O(n) pass per MAX_CONVERSATIONS / 2 new conversations.
    fn forget_least_recent_half(&mut self) {
        let mut ticks: Vec<u64> = self.seqs.values().map(|&(_, tick)| tick).collect();
        let middle = ticks.len() / 2;
        let (_, &mut cut, _) = ticks.select_nth_unstable(middle);
        self.seqs.retain(|_, &mut (_, tick)| tick >= cut);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seqs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_higher_seq_is_new_per_conversation() {
        let mut d = Delivered::default();
        assert!(d.is_new(1, 1));
        assert!(d.first(1, 1));
        assert!(d.first(1, 2));
        assert!(!d.is_new(1, 2) && d.is_new(1, 3), "a look records nothing");
        assert!(!d.first(1, 2), "redelivery");
        assert!(!d.first(1, 1), "older");
        assert!(d.first(2, 1), "another conversation");
        assert!(d.first(1, 5), "gaps are fine");
        assert!(!d.first(1, 4));
        assert_eq!((d.last(1), d.last(2), d.last(3)), (Some(5), Some(1), None));
    }

    #[test]
    fn stays_bounded_and_keeps_the_recent_conversations() {
        let mut d = Delivered::default();
        // A conversation that keeps getting messages among a flood of new
        // ones (what a hostile or broken server could send).
        for i in 0..(4 * MAX_CONVERSATIONS as u64) {
            assert!(d.first(1_000_000 + i, 1));
            assert!(d.first(7, i + 1), "the busy conversation's seq {}", i + 1);
            assert!(d.len() <= MAX_CONVERSATIONS);
        }
        assert!(
            !d.first(7, 4 * MAX_CONVERSATIONS as u64),
            "still deduplicated"
        );
        // The latest of the flood are remembered too.
        let latest = 1_000_000 + 4 * MAX_CONVERSATIONS as u64 - 1;
        assert!(!d.first(latest, 1));
        assert!(d.len() > MAX_CONVERSATIONS / 2 - 2, "{}", d.len());
    }
}
