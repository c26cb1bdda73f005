//! The in-process [`RecentCache`]: the last [`PER_CONVERSATION`] messages of
//! recently active conversations.
//!
//! Only the single writer that appends messages (the delivery pipeline)
//! pushes here, in seq order, so an entry is always a contiguous run of the
//! newest messages of its conversation. An entry remembers whether it
//! starts at seq 1; a page is answered only when the entry holds enough
//! messages (or the whole conversation), so a hit is exactly what history
//! would return.

use std::collections::VecDeque;
use std::sync::Arc;

use chat_protocol::proto;
use dashmap::DashMap;

use super::{ConversationId, Page, RecentCache};

/// Messages kept per conversation: one screen of chat, and the page size
/// clients ask for when opening a conversation.
pub const PER_CONVERSATION: usize = 50;

/// Default bound on cached conversations (at ~50 x 200 B per entry about
/// 100 MB at the limit).
pub const DEFAULT_MAX_CONVERSATIONS: usize = 10_000;

/// See the module docs.
pub struct MemoryRecentCache {
    entries: DashMap<ConversationId, VecDeque<Arc<proto::Message>>>,
    max_conversations: usize,
}

impl MemoryRecentCache {
    /// A cache holding at most `max_conversations` conversations.
    pub fn new(max_conversations: usize) -> Self {
        MemoryRecentCache {
            entries: DashMap::new(),
            max_conversations: max_conversations.max(1),
        }
    }

    /// Number of cached conversations.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl RecentCache for MemoryRecentCache {
    fn push(&self, message: &Arc<proto::Message>) {
        let conversation_id = message.conversation_id;
        if !self.entries.contains_key(&conversation_id)
            && self.entries.len() >= self.max_conversations
        {
            // Evict some entry. Which one matters little: a miss costs one
            // history query, and the evicted conversation refills on its
            // next message.
            let victim = self.entries.iter().next().map(|e| *e.key());
            if let Some(victim) = victim {
                self.entries.remove(&victim);
            }
        }
        let mut entry = self.entries.entry(conversation_id).or_default();
        match entry.back() {
            Some(last) if last.seq + 1 == message.seq => {}
            Some(last) if last.seq >= message.seq => return,
            // A gap (an eviction or a restart in between): start over from
            // this message.
            _ => entry.clear(),
        }
        if entry.len() == PER_CONVERSATION {
            entry.pop_front();
        }
        entry.push_back(Arc::clone(message));
    }

    fn page_before(
        &self,
        conversation_id: ConversationId,
        before: u64,
        limit: u32,
    ) -> Option<Page> {
        let entry = self.entries.get(&conversation_id)?;
        let limit = limit as usize;
        let first_seq = entry.front()?.seq;
        let end = if before == 0 {
            entry.len()
        } else {
            // Positions are seq - first_seq because the run is contiguous.
            let newest = entry.back()?.seq;
            if before > newest + 1 || before <= first_seq {
                return None;
            }
            (before - first_seq) as usize
        };
        let start = end.saturating_sub(limit);
        let starts_at_one = first_seq == 1;
        if end - start < limit && !starts_at_one {
            // The cache does not reach back far enough to fill the page.
            return None;
        }
        let messages: Vec<_> = entry.range(start..end).cloned().collect();
        let has_more = messages.first().is_some_and(|m| m.seq > 1);
        Some(Page { messages, has_more })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(conversation_id: u64, seq: u64) -> Arc<proto::Message> {
        Arc::new(proto::Message {
            conversation_id,
            seq,
            ..Default::default()
        })
    }

    fn seqs(page: &Page) -> Vec<u64> {
        page.messages.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn answers_only_what_it_holds() {
        let cache = MemoryRecentCache::new(10);
        for seq in 1..=60 {
            cache.push(&msg(1, seq));
        }
        // Holds 11..=60.
        let page = cache.page_before(1, 0, 20).unwrap();
        assert_eq!(seqs(&page), (41..=60).collect::<Vec<_>>());
        assert!(page.has_more);
        let page = cache.page_before(1, 41, 20).unwrap();
        assert_eq!(seqs(&page), (21..=40).collect::<Vec<_>>());
        // Needs 1..=20 too: a miss, not a short page.
        assert!(cache.page_before(1, 21, 20).is_none());
        assert!(cache.page_before(1, 0, 51).is_none());
        assert!(cache.page_before(2, 0, 10).is_none());
    }

    #[test]
    fn a_young_conversation_is_answered_whole() {
        let cache = MemoryRecentCache::new(10);
        for seq in 1..=3 {
            cache.push(&msg(1, seq));
        }
        let page = cache.page_before(1, 0, 50).unwrap();
        assert_eq!(seqs(&page), vec![1, 2, 3]);
        assert!(!page.has_more);
    }

    #[test]
    fn a_gap_restarts_the_entry() {
        let cache = MemoryRecentCache::new(10);
        cache.push(&msg(1, 5));
        cache.push(&msg(1, 6));
        cache.push(&msg(1, 9));
        assert!(cache.page_before(1, 0, 2).is_none());
        assert_eq!(seqs(&cache.page_before(1, 0, 1).unwrap()), vec![9]);
        // Replays are ignored.
        cache.push(&msg(1, 9));
        assert_eq!(seqs(&cache.page_before(1, 0, 1).unwrap()), vec![9]);
    }

    #[test]
    fn conversation_count_is_bounded() {
        let cache = MemoryRecentCache::new(3);
        for conversation in 1..=10 {
            cache.push(&msg(conversation, 1));
        }
        assert!(cache.len() <= 3);
    }
}
