//! The Redis backend for what is fast and rebuildable: presence records
//! with a TTL, each user's unread queue, and each conversation's recent
//! messages.
//!
//! Keys carry Redis Cluster hash tags, so everything of one user (`{u:ID}`)
//! or one conversation (`{c:ID}`) lives in one slot and can be pipelined:
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `<prefix>{u:ID}:presence` | string, PX ttl | `node` and `last_active_ms` (the seed's User Status record) |
//! | `<prefix>{u:ID}:inbox:<conversation>` | sorted set, score = seq, the newest 2,001, PX 30 days from the last push | encoded messages not yet delivered (sender, recipient = ID, timestamp, text, type: the seed's Unread Messages record) |
//! | `<prefix>{u:ID}:inbox` | set, PX 30 days from the last push | conversations with a queue |
//! | `<prefix>{c:ID}:recent` | list, ascending, capped, PX 7 days from the last push | the newest messages of the conversation |
//! | `<prefix>history` | string, no expiry | the name of the history the prefix serves ([`RedisStore::claim`]; each readiness ping claims it again) |
//!
//! Nothing here is the source of truth. Every failure is survivable: the
//! callers fall back to history, and a flushed Redis refills as users
//! heartbeat, send and reconnect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, Client, RedisError};
use async_trait::async_trait;
use chat_protocol::proto;
use prost::Message as _;

use super::presence::{OnlineRecord, PresenceStore};
use super::recent::{PER_CONVERSATION, page_from_run};
use super::{
    ConversationId, INBOX_CATCH_UP_BYTES, INBOX_CATCH_UP_LIMIT, InboxStore, Page, RecentCache,
    StoreError, UserId,
};

/// How long connecting may take before start-up fails with a clear error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one command may take; past it the caller falls back.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A user's unread queues and their index expire this long after their
/// last push: an account that never comes back stops holding a quiet
/// conversation's messages (catch-up checks a queue against history, so an
/// expired one costs a history read, not a message). A conversation that
/// stays busy keeps its dormant members' queues, each at most
/// [`INBOX_QUEUE_CAP`] entries (~32 MiB of maximum-size texts, ~300 KiB of
/// 128-byte ones): Redis memory grows with dormant members of busy groups,
/// which capacity planning has to count (ARCHITECTURE.md).
const INBOX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Entries kept per unread queue, the newest: a catch-up reads at most
/// [`INBOX_CATCH_UP_LIMIT`] from the queues and pages a longer backlog from
/// history, so older ones would never be read; the one more tells that a
/// queue went past it (a trimmed queue disagrees with history and is not
/// used either). Kept to that, a group member's maximum-size texts hold
/// ~32 MiB per offline member's queue, not twice that.
const INBOX_QUEUE_CAP: isize = INBOX_CATCH_UP_LIMIT as isize + 1;
/// Queued messages read per round trip in [`InboxStore::pending`] (more
/// when one queue holds more).
const PENDING_READ: usize = 256;
/// A conversation's recent messages expire this long after its last one:
/// a cache miss costs a history read.
const RECENT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A connection (multiplexed, reconnecting) and the key prefix.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: Arc<str>,
    /// The history this prefix was claimed for ([`RedisStore::claim`]):
    /// each readiness ping claims it again.
    history: Arc<std::sync::OnceLock<String>>,
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

impl RedisStore {
    /// Connects (bounded by [`CONNECT_TIMEOUT`]); `prefix` starts every key,
    /// so several deployments or tests can share one Redis.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        let client =
            Client::open(url).map_err(|e| StoreError::Internal(format!("bad redis URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2);
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| StoreError::Unavailable("redis: connect timed out".into()))?
        .map_err(unavailable)?;
        Ok(RedisStore {
            conn,
            prefix: prefix.into(),
            history: Arc::default(),
        })
    }

    /// Checks the server answers and, once the prefix was claimed, that it
    /// is still this history's, claiming it again if it was lost (a Redis
    /// restarted without its data, an evicted key): readiness. Refused
    /// once another history holds it.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        ::redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(unavailable)?;
        let Some(history) = self.history.get() else {
            return Ok(());
        };
        // Read first: only a lost claim is written again, so a Redis that
        // refuses writes (full, or a replica) is no less ready than it was.
        let key = self.history_key();
        let claimed: Option<String> = ::redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let other = match claimed {
            Some(claimed) if claimed == *history => return Ok(()),
            Some(other) => other,
            None => match self.claim(history).await {
                Ok(None) => return Ok(()),
                Ok(Some(other)) => other,
                Err(e) => {
                    tracing::warn!(error = %e, "could not claim the redis prefix again");
                    return Ok(());
                }
            },
        };
        Err(StoreError::Unavailable(format!(
            "redis prefix {:?} was claimed for another history ({other}) while this node ran \
             on {history}: two deployments share it",
            &*self.prefix
        )))
    }

    /// Claims this prefix for the history named `history`
    /// ([`HistoryStore::history_id`](super::HistoryStore::history_id)):
    /// `None` when the prefix is that history's (claimed now or before),
    /// else the history it was claimed for. Caches and unread queues are
    /// keyed by ids that only mean something in their own history: a
    /// second deployment on the same prefix, or a history replaced under a
    /// kept Redis, would serve one history's messages as another's. The
    /// claim never expires; a Redis that lost its data is claimed again by
    /// the next node to start.
    pub async fn claim(&self, history: &str) -> Result<Option<String>, StoreError> {
        // What the readiness checks claim again, whatever this one finds.
        let _ = self.history.set(history.to_owned());
        let mut conn = self.conn.clone();
        let key = self.history_key();
        // SET NX then GET (not SET NX GET, which needs Redis 7); a claim
        // deleted between the two is made again.
        for _ in 0..3 {
            let set: Option<String> = ::redis::cmd("SET")
                .arg(&key)
                .arg(history)
                .arg("NX")
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if set.is_some() {
                return Ok(None);
            }
            let claimed: Option<String> = ::redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            match claimed {
                Some(other) if other != history => return Ok(Some(other)),
                Some(_) => return Ok(None),
                None => continue,
            }
        }
        Err(StoreError::Unavailable(format!(
            "redis: the claim on {key} keeps disappearing"
        )))
    }

    fn history_key(&self) -> String {
        format!("{}history", self.prefix)
    }

    fn presence_key(&self, user: UserId) -> String {
        format!("{}{{u:{user}}}:presence", self.prefix)
    }

    fn inbox_key(&self, user: UserId, conversation: ConversationId) -> String {
        format!("{}{{u:{user}}}:inbox:{conversation}", self.prefix)
    }

    fn inbox_index_key(&self, user: UserId) -> String {
        format!("{}{{u:{user}}}:inbox", self.prefix)
    }

    fn recent_key(&self, conversation: ConversationId) -> String {
        format!("{}{{c:{conversation}}}:recent", self.prefix)
    }
}

/// The newest stretch of `run` whose seqs go up one at a time.
fn contiguous_tail(run: &[Arc<proto::Message>]) -> &[Arc<proto::Message>] {
    let mut start = run.len().saturating_sub(1);
    while start > 0 && run[start - 1].seq.checked_add(1) == Some(run[start].seq) {
        start -= 1;
    }
    &run[start..]
}

fn decode(bytes: &[u8]) -> Option<Arc<proto::Message>> {
    proto::Message::decode(bytes).ok().map(Arc::new)
}

#[async_trait]
impl PresenceStore for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn refresh(
        &self,
        user: UserId,
        record: OnlineRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let value = format!("{}|{}", record.last_active_ms, record.node);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        conn.pset_ex::<_, _, ()>(self.presence_key(user), value, ttl_ms)
            .await
            .map_err(unavailable)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        RedisStore::ping(self).await
    }

    async fn remove(&self, user: UserId, node: String) -> Result<(), StoreError> {
        // Delete only if the record is still ours: another node may own the
        // user by now. A script makes check-and-delete atomic.
        let script = ::redis::Script::new(
            r"local v = redis.call('GET', KEYS[1])
              if v and string.sub(v, string.find(v, '|', 1, true) + 1) == ARGV[1] then
                return redis.call('DEL', KEYS[1])
              end
              return 0",
        );
        let mut conn = self.conn.clone();
        script
            .key(self.presence_key(user))
            .arg(node)
            .invoke_async::<i64>(&mut conn)
            .await
            .map(drop)
            .map_err(unavailable)
    }

    async fn online(&self, users: Vec<UserId>) -> Result<Vec<Option<OnlineRecord>>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = ::redis::pipe();
        for user in &users {
            pipe.get(self.presence_key(*user));
        }
        let mut conn = self.conn.clone();
        let values: Vec<Option<String>> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(values
            .into_iter()
            .map(|v| {
                let v = v?;
                let (ms, node) = v.split_once('|')?;
                Some(OnlineRecord {
                    node: node.to_string(),
                    last_active_ms: ms.parse().ok()?,
                })
            })
            .collect())
    }
}

#[async_trait]
impl InboxStore for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn push(&self, entries: Vec<(UserId, Arc<proto::Message>)>) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let ttl = INBOX_TTL.as_millis() as i64;
        let mut pipe = ::redis::pipe();
        for (user, message) in &entries {
            let queue = self.inbox_key(*user, message.conversation_id);
            let index = self.inbox_index_key(*user);
            // An unsend erased the message it names and its edits, which
            // are queued at the seqs from it to the UNSEND: they go, and
            // the queue, disagreeing with history, has the next catch-up
            // read history, which serves them erased.
            if message.r#type == proto::MessageType::Unsend as i32 && message.reply_to_seq != 0 {
                pipe.zrembyscore(&queue, message.reply_to_seq, message.seq.saturating_sub(1))
                    .ignore();
            }
            pipe.zadd(&queue, message.encode_to_vec(), message.seq)
                .ignore();
            pipe.zremrangebyrank(&queue, 0, -(INBOX_QUEUE_CAP + 1))
                .ignore();
            pipe.pexpire(&queue, ttl).ignore();
            pipe.sadd(&index, message.conversation_id).ignore();
            pipe.pexpire(&index, ttl).ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn pending(
        &self,
        user: UserId,
        limit: usize,
    ) -> Result<Option<Vec<Arc<proto::Message>>>, StoreError> {
        let mut conn = self.conn.clone();
        let mut conversations: Vec<u64> = conn
            .smembers(self.inbox_index_key(user))
            .await
            .map_err(unavailable)?;
        conversations.sort_unstable();
        if conversations.is_empty() {
            return Ok(Some(Vec::new()));
        }
        // Sizes first: reading up to `limit` from every queue held up to
        // (conversations x limit) messages in memory for one reconnect.
        let mut pipe = ::redis::pipe();
        for conversation in &conversations {
            pipe.zcard(self.inbox_key(user, *conversation));
        }
        let sizes: Vec<usize> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let total: usize = sizes.iter().sum();
        if total > limit {
            return Ok(None);
        }
        if total == 0 {
            // Conversations in the index whose queues are empty or gone
            // (an empty pipeline is an error to Redis).
            return Ok(Some(Vec::new()));
        }
        // Read in round trips of about PENDING_READ messages: one reply of
        // up to 2,000 maximal texts (~32 MiB) held everyone else's calls on
        // the node's one multiplexed connection, and Redis's event loop,
        // until it was through.
        let mut out = Vec::with_capacity(total);
        let mut bytes = 0;
        let queued: Vec<(u64, usize)> = conversations
            .into_iter()
            .zip(sizes)
            .filter(|&(_, size)| size > 0)
            .collect();
        // The next queue to read, and how far into it (a long queue is
        // read in slices). A queue trimmed meanwhile shifts its ranks: the
        // catch-up's check against history then finds messages missing
        // and reads history instead.
        let (mut next, mut offset) = (0, 0);
        while next < queued.len() {
            let mut pipe = ::redis::pipe();
            let mut in_pipe = 0;
            while next < queued.len() && in_pipe < PENDING_READ {
                let (conversation, size) = queued[next];
                // As many as counted (pushes since then come live, or with
                // the next catch-up), so the total stays within `limit`.
                let take = (size - offset).min(PENDING_READ - in_pipe);
                pipe.zrange(
                    self.inbox_key(user, conversation),
                    offset as isize,
                    (offset + take) as isize - 1,
                );
                in_pipe += take;
                offset += take;
                if offset == size {
                    (next, offset) = (next + 1, 0);
                }
            }
            let queues: Vec<Vec<Vec<u8>>> =
                pipe.query_async(&mut conn).await.map_err(unavailable)?;
            for entry in queues.into_iter().flatten() {
                bytes += entry.len();
                if bytes > INBOX_CATCH_UP_BYTES {
                    return Ok(None);
                }
                let message = decode(&entry).ok_or_else(|| {
                    StoreError::Internal("undecodable message in a redis inbox".into())
                })?;
                out.push(message);
            }
        }
        Ok(Some(out))
    }

    async fn trim(
        &self,
        user: UserId,
        pending: Vec<(ConversationId, u64)>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let conversations: Vec<u64> = conn
            .smembers(self.inbox_index_key(user))
            .await
            .map_err(unavailable)?;
        let delivered: HashMap<u64, u64> = pending.into_iter().collect();
        let mut pipe = ::redis::pipe();
        for conversation in conversations {
            let key = self.inbox_key(user, conversation);
            match delivered.get(&conversation) {
                Some(&seq) => pipe.zrembyscore(key, "-inf", seq).ignore(),
                None => pipe
                    .del(key)
                    .ignore()
                    .srem(self.inbox_index_key(user), conversation)
                    .ignore(),
            };
        }
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn ack(&self, acks: Vec<(UserId, ConversationId, u64)>) -> Result<(), StoreError> {
        if acks.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        for (user, conversation, seq) in &acks {
            pipe.zrembyscore(self.inbox_key(*user, *conversation), "-inf", *seq)
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        // Drop emptied queues from the index (a second round trip only for
        // those; ZCARD of a missing key is 0).
        let mut pipe = ::redis::pipe();
        for (user, conversation, _) in &acks {
            pipe.zcard(self.inbox_key(*user, *conversation));
        }
        let sizes: Vec<u64> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let mut pipe = ::redis::pipe();
        let mut any = false;
        for ((user, conversation, _), size) in acks.iter().zip(sizes) {
            if size == 0 {
                pipe.srem(self.inbox_index_key(*user), *conversation)
                    .ignore();
                any = true;
            }
        }
        if any {
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

#[async_trait]
impl RecentCache for RedisStore {
    async fn push(&self, messages: &[Arc<proto::Message>]) {
        if messages.is_empty() {
            return;
        }
        let mut pipe = ::redis::pipe();
        // With an unsend, all or nothing: another node's push of older
        // messages landing between its DEL and RPUSH could rebuild a run
        // that reaches the head with the erased text in it.
        if messages
            .iter()
            .any(|m| m.r#type == proto::MessageType::Unsend as i32)
        {
            pipe.atomic();
        }
        for message in messages {
            let key = self.recent_key(message.conversation_id);
            // An unsend erased a message the run may hold (and its edits):
            // it starts over from the UNSEND. Were this push lost, the run
            // would end behind the conversation's last seq, which readers
            // require it to reach, and the pushes after it would not join
            // the older run (readers take the newest contiguous stretch):
            // the erased message is not served from here either way.
            if message.r#type == proto::MessageType::Unsend as i32 {
                pipe.del(&key).ignore();
            }
            pipe.rpush(&key, message.encode_to_vec()).ignore();
            pipe.ltrim(&key, -(PER_CONVERSATION as isize), -1).ignore();
            pipe.pexpire(&key, RECENT_TTL.as_millis() as i64).ignore();
        }
        let mut conn = self.conn.clone();
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            // Readers check the cached run against history's last seq, so a
            // lost push costs a cache miss, never a wrong page.
            tracing::warn!(error = %e, "recent cache push failed");
        }
    }

    async fn page_before(
        &self,
        conversation_id: ConversationId,
        before: u64,
        limit: u32,
        newest: u64,
    ) -> Option<Page> {
        let mut conn = self.conn.clone();
        let raw: Vec<Vec<u8>> = match conn.lrange(self.recent_key(conversation_id), 0, -1).await {
            Ok(raw) => raw,
            Err(e) => {
                tracing::warn!(error = %e, "recent cache read failed");
                return None;
            }
        };
        let run: Vec<_> = raw.iter().filter_map(|b| decode(b)).collect();
        if run.len() != raw.len() {
            return None;
        }
        // Pushes are appended blindly (three commands, no script), so a
        // lost push or two committers' pushes of a new group crossing
        // leave a gap or a step back in the list; the run is its newest
        // contiguous stretch, as the in-process cache starts over there.
        // Read whole, the list failed the contiguity check until 50 more
        // messages had pushed the gap out.
        page_from_run(contiguous_tail(&run), before, limit, newest)
    }
}

/// Helpers for tests that need a real Redis: the URL, a unique key prefix,
/// and clean-up. Public so the end-to-end harness uses the same rules.
pub mod testing {
    use super::*;

    /// `CHAT_TEST_REDIS_URL`, defaulting to the local Redis.
    pub fn url() -> String {
        std::env::var("CHAT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    /// Whether a missing backend must fail the test (CI sets
    /// `CHAT_REQUIRE_BACKENDS=1`) rather than skip it.
    pub fn required() -> bool {
        std::env::var("CHAT_REQUIRE_BACKENDS").is_ok_and(|v| v == "1")
    }

    /// A key prefix no other test uses.
    pub fn unique_prefix(tag: &str) -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!(
            "test:{tag}:{}:{}:{nanos}:",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Connects with a unique prefix, or explains why not: `None` means
    /// "skip" (after printing a SKIPPED line); a required backend that is
    /// missing panics.
    pub async fn connect(tag: &str) -> Option<RedisStore> {
        let url = url();
        match RedisStore::connect(&url, &unique_prefix(tag)).await {
            Ok(store) => Some(store),
            Err(e) if required() => {
                panic!("redis required (CHAT_REQUIRE_BACKENDS=1) but unreachable at {url}: {e}")
            }
            Err(e) => {
                println!("SKIPPED: redis unreachable at {url} ({e}); set CHAT_TEST_REDIS_URL");
                None
            }
        }
    }

    /// Deletes every key under `prefix` (a flush scoped to one test, so
    /// parallel tests keep their data).
    pub async fn delete_prefix(store: &RedisStore, prefix: &str) {
        let mut conn = store.conn.clone();
        let pattern = format!("{}*", prefix.replace('{', "\\{").replace('}', "\\}"));
        let keys: Vec<String> = match ::redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
        {
            Ok(keys) => keys,
            Err(e) => panic!("KEYS {pattern}: {e}"),
        };
        if !keys.is_empty() {
            let _: () = conn.del(keys).await.expect("DEL");
        }
    }

    impl RedisStore {
        /// The key prefix.
        pub fn prefix(&self) -> &str {
            &self.prefix
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn message(conversation_id: u64, seq: u64) -> Arc<proto::Message> {
        Arc::new(proto::Message {
            conversation_id,
            seq,
            message_id: conversation_id * 1000 + seq,
            sender_id: 7,
            text: format!("m{seq}"),
            ..Default::default()
        })
    }

    fn seqs(messages: &[Arc<proto::Message>]) -> Vec<(u64, u64)> {
        messages
            .iter()
            .map(|m| (m.conversation_id, m.seq))
            .collect()
    }

    #[tokio::test]
    async fn presence_store_conformance() {
        let Some(store) = connect("presence").await else {
            return;
        };
        crate::store::presence::conformance::refresh_expire_remove(&store).await;
        delete_prefix(&store, store.prefix()).await;
    }

    #[tokio::test]
    async fn an_unsend_takes_what_it_erased_out_of_the_queues() {
        let Some(store) = connect("inbox-unsend").await else {
            return;
        };
        let run: Vec<_> = (1..=4).map(|seq| (5, message(10, seq))).collect();
        InboxStore::push(&store, run).await.unwrap();
        InboxStore::push(&store, vec![(5, message(11, 1))])
            .await
            .unwrap();
        // Seq 5 unsends seq 2: 2 to 4 may hold it and its edits, and go.
        let unsend = Arc::new(proto::Message {
            r#type: proto::MessageType::Unsend as i32,
            reply_to_seq: 2,
            text: String::new(),
            ..(*message(10, 5)).clone()
        });
        InboxStore::push(&store, vec![(5, unsend)]).await.unwrap();
        assert_eq!(
            seqs(&store.pending(5, 100).await.unwrap().unwrap()),
            vec![(10, 1), (10, 5), (11, 1)]
        );
        delete_prefix(&store, store.prefix()).await;
    }

    #[tokio::test]
    async fn inbox_queues_in_order_and_acks_by_watermark() {
        let Some(store) = connect("inbox").await else {
            return;
        };
        // Pushed out of order and twice: read back ordered and once.
        InboxStore::push(
            &store,
            vec![
                (5, message(20, 2)),
                (5, message(10, 1)),
                (5, message(20, 1)),
                (6, message(10, 1)),
            ],
        )
        .await
        .unwrap();
        InboxStore::push(&store, vec![(5, message(20, 2))])
            .await
            .unwrap();
        assert_eq!(
            seqs(&store.pending(5, 100).await.unwrap().unwrap()),
            vec![(10, 1), (20, 1), (20, 2)]
        );
        assert_eq!(
            seqs(&store.pending(6, 100).await.unwrap().unwrap()),
            vec![(10, 1)]
        );
        assert_eq!(store.pending(5, 100).await.unwrap().unwrap()[0].text, "m1");
        // Past the limit nothing is read, and the caller is told.
        // (An index naming only emptied queues reads as nothing queued.)
        let mut conn = store.conn.clone();
        let _: () = conn.sadd(store.inbox_index_key(7), 99u64).await.unwrap();
        assert_eq!(store.pending(7, 10).await.unwrap(), Some(vec![]));
        assert!(store.pending(5, 2).await.unwrap().is_none());
        assert_eq!(store.pending(5, 3).await.unwrap().unwrap().len(), 3);
        // Trimming: conversation 20 delivered to 1, nothing pending in 10.
        store.trim(5, vec![(20, 1)]).await.unwrap();
        assert_eq!(
            seqs(&store.pending(5, 2).await.unwrap().unwrap()),
            vec![(20, 2)]
        );
        InboxStore::push(&store, vec![(5, message(10, 1)), (5, message(20, 1))])
            .await
            .unwrap();
        store.ack(vec![(5, 20, 1), (5, 10, 5)]).await.unwrap();
        assert_eq!(
            seqs(&store.pending(5, 100).await.unwrap().unwrap()),
            vec![(20, 2)]
        );
        store.ack(vec![(5, 20, 2)]).await.unwrap();
        assert!(store.pending(5, 100).await.unwrap().unwrap().is_empty());
        assert_eq!(
            seqs(&store.pending(6, 100).await.unwrap().unwrap()),
            vec![(10, 1)],
            "other users untouched"
        );
        delete_prefix(&store, store.prefix()).await;
        assert!(
            store.pending(6, 100).await.unwrap().unwrap().is_empty(),
            "a flush empties the queue"
        );
    }

    #[tokio::test]
    async fn queues_and_recent_runs_expire_and_stay_capped() {
        // Without a bound, an account that never came back kept every
        // message of its groups in Redis for good, and every conversation
        // ever written kept its recent run.
        let Some(store) = connect("bounds").await else {
            return;
        };
        let n = INBOX_QUEUE_CAP as u64 + 10;
        let entries: Vec<_> = (1..=n).map(|seq| (5, message(10, seq))).collect();
        InboxStore::push(&store, entries).await.unwrap();
        let queued = store.pending(5, 10_000).await.unwrap().unwrap();
        assert_eq!(queued.len(), INBOX_QUEUE_CAP as usize);
        assert_eq!(queued[0].seq, 11, "the newest are kept");
        // No more than a catch-up could use, and a capped queue still
        // reads as past the limit (history then).
        assert_eq!(queued.len(), INBOX_CATCH_UP_LIMIT + 1);
        assert!(
            store
                .pending(5, INBOX_CATCH_UP_LIMIT)
                .await
                .unwrap()
                .is_none()
        );
        RecentCache::push(&store, &[message(10, 1)]).await;
        let mut conn = store.conn.clone();
        for (key, ttl) in [
            (store.inbox_key(5, 10), INBOX_TTL),
            (store.inbox_index_key(5), INBOX_TTL),
            (store.recent_key(10), RECENT_TTL),
        ] {
            let left: i64 = conn.pttl(&key).await.unwrap();
            assert!(
                left > 0 && left <= ttl.as_millis() as i64,
                "{key}: {left} ms to live"
            );
        }
        delete_prefix(&store, store.prefix()).await;
    }

    #[tokio::test]
    async fn recent_cache_conformance() {
        let Some(store) = connect("recent").await else {
            return;
        };
        crate::store::recent::conformance::pages_like_history(&store).await;
        delete_prefix(&store, store.prefix()).await;
    }

    /// A gap, a replay or a late push leaves the list with a step that is
    /// not +1; the run read is its newest contiguous stretch, so the
    /// newest messages are served again at once rather than after 50 more
    /// pushes, and never across the step.
    #[tokio::test]
    async fn the_recent_run_is_the_newest_contiguous_stretch() {
        let Some(store) = connect("recent-gaps").await else {
            return;
        };
        let seqs =
            |page: Option<Page>| page.map(|p| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>());
        RecentCache::push(&store, &[message(5, 1), message(5, 2)]).await;
        RecentCache::push(&store, &[message(5, 4)]).await;
        assert_eq!(
            seqs(store.page_before(5, 0, 1, 4).await),
            Some(vec![4]),
            "after a gap"
        );
        assert_eq!(
            seqs(store.page_before(5, 0, 2, 4).await),
            None,
            "not across it"
        );
        RecentCache::push(&store, &[message(5, 5)]).await;
        assert_eq!(seqs(store.page_before(5, 0, 2, 5).await), Some(vec![4, 5]));
        // A replay: the run starts over after it.
        RecentCache::push(&store, &[message(5, 5), message(5, 6)]).await;
        assert_eq!(seqs(store.page_before(5, 0, 2, 6).await), Some(vec![5, 6]));
        // Two committers' pushes crossing: seq 2 before seq 1.
        RecentCache::push(&store, &[message(7, 2)]).await;
        RecentCache::push(&store, &[message(7, 1)]).await;
        RecentCache::push(&store, &[message(7, 3)]).await;
        assert_eq!(seqs(store.page_before(7, 0, 1, 3).await), Some(vec![3]));
        RecentCache::push(&store, &[message(7, 4)]).await;
        assert_eq!(seqs(store.page_before(7, 0, 2, 4).await), Some(vec![3, 4]));
        delete_prefix(&store, store.prefix()).await;
    }

    /// A catch-up's queues come in round trips of about 256 messages, a
    /// long queue in slices, short ones together, and still whole and in
    /// (conversation, seq) order.
    #[tokio::test]
    async fn pending_reads_every_queue_in_order_over_several_round_trips() {
        let Some(store) = connect("pending-chunks").await else {
            return;
        };
        let lengths = [(1, 600), (2, 10), (3, 100), (4, 1)];
        let mut entries = Vec::new();
        for (conversation, n) in lengths.into_iter().rev() {
            for seq in 1..=n {
                entries.push((5, message(conversation, seq)));
            }
        }
        InboxStore::push(&store, entries).await.unwrap();
        let queued = store
            .pending(5, 2_000)
            .await
            .unwrap()
            .expect("within the limit");
        let got: Vec<(u64, u64)> = queued.iter().map(|m| (m.conversation_id, m.seq)).collect();
        let wanted: Vec<(u64, u64)> = lengths
            .into_iter()
            .flat_map(|(c, n)| (1..=n).map(move |s| (c, s)))
            .collect();
        assert_eq!(got, wanted);
        delete_prefix(&store, store.prefix()).await;
    }

    /// Queues of long texts over the byte bound are left to history,
    /// however few they are.
    #[tokio::test]
    async fn pending_gives_up_past_the_byte_bound() {
        let Some(store) = connect("pending-bytes").await else {
            return;
        };
        let long = |conversation_id, seq| {
            Arc::new(proto::Message {
                text: "x".repeat(16 * 1024),
                ..(*message(conversation_id, seq)).clone()
            })
        };
        let within = INBOX_CATCH_UP_BYTES / (16 * 1024 + 64);
        let entries = (1..=within as u64).map(|seq| (5, long(1, seq))).collect();
        InboxStore::push(&store, entries).await.unwrap();
        let queued = store.pending(5, 2_000).await.unwrap();
        assert_eq!(queued.map(|q| q.len()), Some(within), "within the bound");
        let entries = (1..=64).map(|seq| (5, long(2, seq))).collect();
        InboxStore::push(&store, entries).await.unwrap();
        assert!(
            store.pending(5, 2_000).await.unwrap().is_none(),
            "{} long texts read",
            within + 64
        );
        delete_prefix(&store, store.prefix()).await;
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_a_clear_error_not_a_hang() {
        let started = tokio::time::Instant::now();
        let err = RedisStore::connect("redis://127.0.0.1:1/", "x:")
            .await
            .err()
            .expect("must fail");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(started.elapsed() < CONNECT_TIMEOUT * 3);
        let err = RedisStore::connect("not a url", "x:")
            .await
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("bad redis URL"), "{err}");
    }
}
