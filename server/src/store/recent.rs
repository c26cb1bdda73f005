//! The in-process [`RecentCache`]: the last [`PER_CONVERSATION`] messages of
//! recently active conversations.
//!
//! Only the single writer that appends messages (the delivery pipeline)
//! pushes here, in seq order, so an entry is always a contiguous run of the
//! newest messages of its conversation. A page is answered only when the
//! run holds enough messages (or the whole conversation), so a hit is
//! exactly what history would return. [`page_from_run`] is that rule, shared
//! with the Redis cache.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use chat_protocol::proto;
use dashmap::DashMap;

use super::{ConversationId, Page, RecentCache};

/// Messages kept per conversation: one screen of chat, and the page size
/// clients ask for when opening a conversation.
pub const PER_CONVERSATION: usize = 50;

/// Default bound on cached conversations.
pub const DEFAULT_MAX_CONVERSATIONS: usize = 10_000;

/// Default bound on the bytes the cached messages hold. A count alone does
/// not bound memory: texts run up to `max-text-len` (16 KiB), so 10,000
/// conversations of 50 such messages would be 8 GiB.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

/// What a cached message is taken to cost besides its text and key: the
/// struct, the `Arc` and the queue slot, rounded up.
const MESSAGE_OVERHEAD: usize = 128;

fn cost(message: &proto::Message) -> usize {
    let photo = message.photo.as_ref().map_or(0, |p| {
        size_of::<proto::Photo>() + p.media_id.len() + p.sha256.len() + p.preview.len()
    });
    let call = message.call.as_ref().map_or(0, |c| {
        size_of::<proto::CallLog>() + 8 * (c.joined.len() + c.missed.len())
    });
    message.text.len() + message.client_msg_id.len() + photo + call + MESSAGE_OVERHEAD
}

/// See the module docs.
pub struct MemoryRecentCache {
    entries: DashMap<ConversationId, VecDeque<Arc<proto::Message>>>,
    max_conversations: usize,
    max_bytes: usize,
    /// What the cached messages cost, by [`cost`].
    bytes: AtomicUsize,
}

impl MemoryRecentCache {
    /// A cache holding at most `max_conversations` conversations and
    /// messages costing at most `max_bytes` in all.
    pub fn new(max_conversations: usize, max_bytes: usize) -> Self {
        MemoryRecentCache {
            entries: DashMap::new(),
            max_conversations: max_conversations.max(1),
            max_bytes,
            bytes: AtomicUsize::new(0),
        }
    }

    /// What the cached messages cost now (text, key and overhead).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Drops some conversation other than `keep`. Which one matters little:
    /// a miss costs one history query, and the evicted conversation refills
    /// on its next message.
    fn evict_other_than(&self, keep: ConversationId) -> bool {
        let victim = self.entries.iter().map(|e| *e.key()).find(|&c| c != keep);
        let Some(victim) = victim else {
            return false;
        };
        if let Some((_, run)) = self.entries.remove(&victim) {
            self.release(&run);
        }
        true
    }

    fn release<'a>(&self, messages: impl IntoIterator<Item = &'a Arc<proto::Message>>) {
        let freed: usize = messages.into_iter().map(|m| cost(m)).sum();
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
    }

    /// Number of cached conversations.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn push_one(&self, message: &Arc<proto::Message>) {
        let conversation_id = message.conversation_id;
        if !self.entries.contains_key(&conversation_id)
            && self.entries.len() >= self.max_conversations
        {
            self.evict_other_than(conversation_id);
        }
        {
            let mut entry = self.entries.entry(conversation_id).or_default();
            match entry.back() {
                // An unsend erased a message the run may hold (and its
                // edits): start over from the UNSEND.
                Some(_) if message.r#type == proto::MessageType::Unsend as i32 => {
                    self.release(entry.iter());
                    entry.clear();
                }
                Some(last) if last.seq + 1 == message.seq => {}
                Some(last) if last.seq >= message.seq => return,
                // A gap (an eviction or a restart in between): start over
                // from this message.
                _ => {
                    self.release(entry.iter());
                    entry.clear();
                }
            }
            if entry.len() == PER_CONVERSATION
                && let Some(oldest) = entry.pop_front()
            {
                self.release([&oldest]);
            }
            self.bytes.fetch_add(cost(message), Ordering::Relaxed);
            entry.push_back(Arc::clone(message));
        }
        // Over the byte budget: other conversations go first; a single
        // conversation over it on its own (a tiny budget) keeps its newest
        // message only.
        while self.bytes() > self.max_bytes && self.evict_other_than(conversation_id) {}
        if self.bytes() > self.max_bytes
            && let Some(mut entry) = self.entries.get_mut(&conversation_id)
        {
            while entry.len() > 1 {
                if let Some(oldest) = entry.pop_front() {
                    self.release([&oldest]);
                }
            }
        }
    }
}

#[async_trait]
impl RecentCache for MemoryRecentCache {
    async fn push(&self, messages: &[Arc<proto::Message>]) {
        for message in messages {
            self.push_one(message);
        }
    }

    async fn page_before(
        &self,
        conversation_id: ConversationId,
        before: u64,
        limit: u32,
        newest: u64,
    ) -> Option<Page> {
        let entry = self.entries.get(&conversation_id)?;
        let (front, back) = entry.as_slices();
        if back.is_empty() {
            page_from_run(front, before, limit, newest)
        } else {
            let run: Vec<_> = entry.iter().cloned().collect();
            page_from_run(&run, before, limit, newest)
        }
    }
}

/// Answers "up to `limit` messages below `before` (0: the newest)" from
/// `run`, ascending, contiguous newest messages of one conversation, or
/// `None` if the run cannot answer exactly as history would (too short,
/// not contiguous, or not ending at `head`, the conversation's last seq as
/// the reader found it).
pub fn page_from_run(
    run: &[Arc<proto::Message>],
    before: u64,
    limit: u32,
    head: u64,
) -> Option<Page> {
    let first_seq = run.first()?.seq;
    let newest = run.last()?.seq;
    if newest != head {
        return None;
    }
    // Checked: a run out of order (a cache written by an older node, say)
    // is a miss, not an overflow.
    if newest.checked_add(1).and_then(|n| n.checked_sub(first_seq)) != Some(run.len() as u64) {
        return None;
    }
    let limit = limit as usize;
    let end = if before == 0 {
        run.len()
    } else {
        if before > newest + 1 || before <= first_seq {
            return None;
        }
        // Positions are seq - first_seq because the run is contiguous.
        (before - first_seq) as usize
    };
    let start = end.saturating_sub(limit);
    if end - start < limit && first_seq != 1 {
        // The run does not reach back far enough to fill the page.
        return None;
    }
    let messages: Vec<_> = run[start..end].to_vec();
    let has_more = messages.first().is_some_and(|m| m.seq > 1);
    Some(Page { messages, has_more })
}

/// Conformance checks every [`RecentCache`] passes (in process and Redis).
/// A cache may always miss (`None`); when it answers, the page must be what
/// history would return.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    fn msg(conversation_id: u64, seq: u64) -> Arc<proto::Message> {
        Arc::new(proto::Message {
            conversation_id,
            seq,
            message_id: conversation_id * 1_000 + seq,
            text: format!("m{seq}"),
            ..Default::default()
        })
    }

    fn seqs(page: &Page) -> Vec<u64> {
        page.messages.iter().map(|m| m.seq).collect()
    }

    /// Capped runs, exact pages, misses rather than short pages, gaps.
    pub(crate) async fn pages_like_history(cache: &impl RecentCache) {
        let run: Vec<_> = (1..=60).map(|seq| msg(3, seq)).collect();
        cache.push(&run[..30]).await;
        cache.push(&run[30..]).await;
        let page = cache
            .page_before(3, 0, 10, 60)
            .await
            .expect("the newest page is cached");
        assert_eq!(seqs(&page), (51..=60).collect::<Vec<_>>());
        assert!(page.has_more);
        assert_eq!(page.messages[9].text, "m60");
        let page = cache
            .page_before(3, 31, 10, 60)
            .await
            .expect("within the cap");
        assert_eq!(seqs(&page), (21..=30).collect::<Vec<_>>());
        // At most PER_CONVERSATION are kept: older pages miss, never shrink.
        assert!(cache.page_before(3, 5, 10, 60).await.is_none());
        assert!(cache.page_before(3, 0, 51, 60).await.is_none());
        // Unknown conversations miss.
        assert!(cache.page_before(4, 0, 10, 10).await.is_none());
        // A young conversation is answered whole.
        cache.push(&[msg(5, 1), msg(5, 2)]).await;
        let page = cache
            .page_before(5, 0, 50, 2)
            .await
            .expect("whole conversation");
        assert_eq!(seqs(&page), vec![1, 2]);
        assert!(!page.has_more);
        // After a gap (a lost push), nothing older than the gap is served.
        cache.push(&[msg(5, 4)]).await;
        if let Some(page) = cache.page_before(5, 0, 2, 4).await {
            panic!("a page across a gap: {:?}", seqs(&page));
        }
        if let Some(page) = cache.page_before(5, 0, 1, 4).await {
            assert_eq!(seqs(&page), vec![4]);
        }
        // An unsend erased a message the run may hold: nothing before it
        // is served from here.
        let unsend = Arc::new(proto::Message {
            r#type: proto::MessageType::Unsend as i32,
            reply_to_seq: 58,
            ..(*msg(3, 61)).clone()
        });
        cache.push(&[unsend]).await;
        if let Some(page) = cache.page_before(3, 0, 2, 61).await {
            panic!("a page from before an unsend: {:?}", seqs(&page));
        }
        if let Some(page) = cache.page_before(3, 0, 1, 61).await {
            assert_eq!(seqs(&page), vec![61]);
        }
        cache.push(&[msg(3, 62)]).await;
        let page = cache
            .page_before(3, 0, 2, 62)
            .await
            .expect("after the unsend");
        assert_eq!(seqs(&page), vec![61, 62]);
        // A run behind the conversation's last seq (the push of a later
        // message not made yet, or lost) misses, whatever page is asked.
        assert!(cache.page_before(3, 62, 1, 63).await.is_none());
        assert!(cache.page_before(3, 0, 2, 63).await.is_none());
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

    async fn push(
        cache: &MemoryRecentCache,
        conversation: u64,
        seqs: impl IntoIterator<Item = u64>,
    ) {
        let messages: Vec<_> = seqs.into_iter().map(|s| msg(conversation, s)).collect();
        cache.push(&messages).await;
    }

    #[tokio::test]
    async fn memory_cache_conformance() {
        conformance::pages_like_history(&MemoryRecentCache::new(10, DEFAULT_MAX_BYTES)).await;
    }

    #[tokio::test]
    async fn answers_only_what_it_holds() {
        let cache = MemoryRecentCache::new(10, DEFAULT_MAX_BYTES);
        push(&cache, 1, 1..=60).await;
        // Holds 11..=60.
        let page = cache.page_before(1, 0, 20, 60).await.unwrap();
        assert_eq!(seqs(&page), (41..=60).collect::<Vec<_>>());
        assert!(page.has_more);
        let page = cache.page_before(1, 41, 20, 60).await.unwrap();
        assert_eq!(seqs(&page), (21..=40).collect::<Vec<_>>());
        // Needs 1..=20 too: a miss, not a short page.
        assert!(cache.page_before(1, 21, 20, 60).await.is_none());
        assert!(cache.page_before(1, 0, 51, 60).await.is_none());
        assert!(cache.page_before(2, 0, 10, 10).await.is_none());
    }

    #[tokio::test]
    async fn a_young_conversation_is_answered_whole() {
        let cache = MemoryRecentCache::new(10, DEFAULT_MAX_BYTES);
        push(&cache, 1, 1..=3).await;
        let page = cache.page_before(1, 0, 50, 3).await.unwrap();
        assert_eq!(seqs(&page), vec![1, 2, 3]);
        assert!(!page.has_more);
    }

    #[tokio::test]
    async fn a_gap_restarts_the_entry() {
        let cache = MemoryRecentCache::new(10, DEFAULT_MAX_BYTES);
        push(&cache, 1, [5, 6, 9]).await;
        assert!(cache.page_before(1, 0, 2, 9).await.is_none());
        assert_eq!(seqs(&cache.page_before(1, 0, 1, 9).await.unwrap()), vec![9]);
        // Replays are ignored.
        push(&cache, 1, [9]).await;
        assert_eq!(seqs(&cache.page_before(1, 0, 1, 9).await.unwrap()), vec![9]);
    }

    #[tokio::test]
    async fn conversation_count_is_bounded() {
        let cache = MemoryRecentCache::new(3, DEFAULT_MAX_BYTES);
        for conversation in 1..=10 {
            push(&cache, conversation, [1]).await;
        }
        assert!(cache.len() <= 3);
    }

    #[tokio::test]
    async fn memory_is_bounded_by_bytes_not_only_by_conversations() {
        // 16 KiB texts: 50 of them in each of 20 conversations would be
        // 16 MiB; the budget is 1 MiB.
        let budget = 1 << 20;
        let cache = MemoryRecentCache::new(10_000, budget);
        let big = |conversation_id: u64, seq: u64| {
            Arc::new(proto::Message {
                conversation_id,
                seq,
                text: "x".repeat(16 * 1024),
                ..Default::default()
            })
        };
        for conversation in 1..=20 {
            let run: Vec<_> = (1..=50).map(|seq| big(conversation, seq)).collect();
            cache.push(&run).await;
            assert!(cache.bytes() <= budget, "{} bytes", cache.bytes());
        }
        // The newest conversation is the one kept, whole where it fits.
        let page = cache
            .page_before(20, 0, 50, 50)
            .await
            .expect("the newest is kept");
        assert_eq!(seqs(&page).last(), Some(&50));
        // What is left is accounted exactly: emptying it frees everything.
        while cache.evict_other_than(0) {}
        assert_eq!(cache.bytes(), 0);
        // Small messages still fill many conversations.
        for conversation in 1..=100 {
            push(&cache, conversation, [1, 2, 3]).await;
        }
        assert_eq!(cache.len(), 100);
    }

    #[test]
    fn a_run_with_a_hole_answers_nothing() {
        let run = vec![msg(1, 1), msg(1, 2), msg(1, 4)];
        assert!(page_from_run(&run, 0, 2, 4).is_none());
    }
}
