//! What the app was told of other members' watermarks, so that its receipt
//! events only move forward.
//!
//! Watermarks only move forward, and the protocol asks a client to ignore
//! lower ones; but the server may send them out of order: it writes the
//! snapshot of watermarks taken when the receipts stream opens before the
//! receipts queued meanwhile, and the readers of a connection being
//! replaced and of its successor can interleave. Handed over as they came,
//! an app saw a member's watermark go 7, 5, 7. So the client keeps, per
//! (conversation, member), the delivered and seen watermarks last told to
//! the app: a receipt is told only if it raises either, and told merged
//! (the higher of each), so one that raises delivered with an older seen
//! does not pull seen back. The table lives as long as the client, across
//! its connections.
//!
//! Bounded: the server names the conversations and members, and a client
//! must not grow without limit on what a server sends it. Beyond
//! [`MAX_TOLD`] pairs the half updated least recently is forgotten (as the
//! deduplication marks are, see [`crate::dedup`]). That is the one gap:
//! the next receipt of a pair forgotten so is told as it comes, and may be
//! lower than what the app was told of it before, once. A lower receipt
//! follows a higher one within moments (a reconnect's snapshot), while a
//! pair is forgotten only after 16,384 others were updated since.

use std::collections::HashMap;

use chat_protocol::proto;

use crate::dedup::forget_least_recent_half;

/// (conversation, member) pairs remembered at most. Each takes 40 bytes
/// (the pair, two watermarks and a recency tick), plus the hash table's
/// slack: at most ~2.7 MB.
pub(crate) const MAX_TOLD: usize = 32_768;

#[derive(Debug, Default)]
pub(crate) struct ReceiptsTold {
    /// (conversation, member) -> what the app was told of them.
    marks: HashMap<(u64, u64), Told>,
    /// Counts updates: recency without a clock.
    tick: u64,
}

/// A member's watermarks as last told to the app.
#[derive(Debug, Default, Clone, Copy)]
struct Told {
    delivered: u64,
    seen: u64,
    /// The tick of the last update.
    touched: u64,
}

impl ReceiptsTold {
    /// Whether `receipt` raises the delivered or seen watermark the app
    /// was told of its member, without recording it.
    pub(crate) fn raises(&self, receipt: &proto::Receipt) -> bool {
        let told = self
            .marks
            .get(&(receipt.conversation_id, receipt.user_id))
            .copied()
            .unwrap_or_default();
        receipt.delivered_seq > told.delivered || receipt.seen_seq > told.seen
    }

    /// If `receipt` raises what the app was told of its member (see
    /// [`raises`](Self::raises)), records it and returns what to tell:
    /// the higher of the told and the received watermark, each. `None`
    /// (and nothing recorded) otherwise.
    pub(crate) fn raise(&mut self, receipt: &proto::Receipt) -> Option<proto::Receipt> {
        if !self.raises(receipt) {
            return None;
        }
        self.tick += 1;
        let told = self
            .marks
            .entry((receipt.conversation_id, receipt.user_id))
            .or_default();
        told.delivered = told.delivered.max(receipt.delivered_seq);
        told.seen = told.seen.max(receipt.seen_seq);
        told.touched = self.tick;
        let merged = proto::Receipt {
            delivered_seq: told.delivered,
            seen_seq: told.seen,
            ..*receipt
        };
        if self.marks.len() > MAX_TOLD {
            forget_least_recent_half(&mut self.marks, |told| told.touched);
        }
        Some(merged)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.marks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(conversation_id: u64, user_id: u64, delivered: u64, seen: u64) -> proto::Receipt {
        proto::Receipt {
            conversation_id,
            user_id,
            delivered_seq: delivered,
            seen_seq: seen,
        }
    }

    /// `(delivered, seen)` told for `receipt`, if any.
    fn tell(told: &mut ReceiptsTold, receipt: proto::Receipt) -> Option<(u64, u64)> {
        let raises = told.raises(&receipt);
        let merged = told.raise(&receipt);
        assert_eq!(raises, merged.is_some(), "a look agrees with the record");
        merged.map(|r| {
            assert_eq!(
                (r.conversation_id, r.user_id),
                (receipt.conversation_id, receipt.user_id)
            );
            (r.delivered_seq, r.seen_seq)
        })
    }

    #[test]
    fn only_a_raise_is_told_and_told_merged() {
        let mut told = ReceiptsTold::default();
        assert_eq!(tell(&mut told, receipt(1, 2, 7, 7)), Some((7, 7)));
        assert_eq!(tell(&mut told, receipt(1, 2, 5, 5)), None, "lower");
        assert_eq!(tell(&mut told, receipt(1, 2, 7, 7)), None, "the same");
        assert_eq!(tell(&mut told, receipt(1, 2, 7, 3)), None, "nothing higher");
        assert_eq!(
            tell(&mut told, receipt(1, 2, 9, 4)),
            Some((9, 7)),
            "delivered rises; seen is not pulled back"
        );
        assert_eq!(
            tell(&mut told, receipt(1, 2, 8, 8)),
            Some((9, 8)),
            "seen rises; delivered is not pulled back"
        );
        assert_eq!(
            tell(&mut told, receipt(1, 3, 1, 0)),
            Some((1, 0)),
            "another member"
        );
        assert_eq!(
            tell(&mut told, receipt(4, 2, 1, 1)),
            Some((1, 1)),
            "another conversation"
        );
        assert_eq!(
            tell(&mut told, receipt(9, 9, 0, 0)),
            None,
            "nothing to tell"
        );
    }

    #[test]
    fn stays_bounded_and_keeps_the_recent_pairs() {
        let mut told = ReceiptsTold::default();
        // A member whose watermarks keep moving among a flood of new pairs
        // (what a hostile or broken server could send).
        let n = 4 * MAX_TOLD as u64;
        for i in 0..n {
            assert_eq!(
                tell(&mut told, receipt(1_000_000 + i, 5, 1, 0)),
                Some((1, 0))
            );
            assert_eq!(tell(&mut told, receipt(7, 5, i + 1, 0)), Some((i + 1, 0)));
            assert!(told.len() <= MAX_TOLD);
        }
        assert_eq!(
            tell(&mut told, receipt(7, 5, 1, 0)),
            None,
            "still remembered"
        );
        // The latest of the flood are remembered too.
        assert_eq!(tell(&mut told, receipt(1_000_000 + n - 1, 5, 1, 0)), None);
        assert!(told.len() > MAX_TOLD / 2 - 2, "{}", told.len());
        // The known gap: a pair forgotten long ago is told what comes.
        assert_eq!(tell(&mut told, receipt(1_000_000, 5, 1, 0)), Some((1, 0)));
    }
}
