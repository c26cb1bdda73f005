//! The embedded history store: one SQLite file under the data directory.
//!
//! One dedicated thread owns the connection. Callers send it jobs; the
//! thread takes every job waiting in its queue (up to [`MAX_BATCH`]), runs
//! them inside one transaction, commits once, and only then answers each
//! caller. That is group commit for everything, not only sends: one fsync
//! covers the whole batch, and a caller never hears "done" before its write
//! is on disk (`synchronous = FULL`).
//!
//! Jobs do not get savepoints (they made SQLite copy pages into a
//! sub-journal for every job, the largest cost in profiles). Instead every
//! job keeps one rule: it refuses (Conflict, NotFound, NotAMember,
//! NotFriends) before writing anything. Any other error means the database
//! is in trouble, and then the whole batch is rolled back and every caller
//! in it hears "unavailable", so a half-done job can never be committed.
//!
//! A conversation's head (`conversations.last_seq`, `last_activity_ms`)
//! is derived data: the last row of that conversation in `messages`. Sends
//! do not write it; the thread keeps it in memory and writes it behind
//! (every [`FLUSH_INTERVAL`], before any job other than an append or
//! a watermark move, and at shutdown), which saves each message one more
//! page in the WAL and in checkpoints.
//!
//! Idempotency keys (sender, client_msg_id) are derived data too: they live
//! in their own table, written behind in key order, each sender's keys
//! about once a second (so its page once, not once per commit), a tenth of
//! the senders every 100 ms so that no commit carries them all; the keys
//! not yet written are held in memory and checked first.
//!
//! Messages themselves are an append-only log keyed by message id, so a
//! commit appends to the table's last pages instead of dirtying one leaf
//! page per conversation it touches (an unsend rewrites the row it erases,
//! and its edits, in place: rare, and one page each). Finding a conversation's messages by
//! seq goes through `message_index`, which is derived data as well: it is
//! written behind with the heads, in key order, and the entries not yet
//! written are held in memory and looked up first.
//!
//! Delivered and seen watermarks (`members`) are written behind too: a
//! move is durable in its commit as one row appended to `watermark_log`;
//! the members rows follow before any job that reads them, and otherwise
//! in the same slices as the keys (by conversation), after which the log
//! rows they cover are deleted. Whatever the log holds is replayed at
//! open and after a rollback.
//!
//! `written_through` records up to which message keys, and heads with
//! their index entries, have been written.
//! At open, and after a rolled-back transaction (which loses what was
//! pending), the heads, index entries and keys of the messages after it
//! are rebuilt from `messages` (a range of its primary key), and the
//! watermark log is replayed, before any job runs, so no read sees a head
//! or a watermark behind what was committed and no retry is taken for a
//! new message.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chat_protocol::proto;
use metrics::{Counter, Gauge, Histogram};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::{
    Appended, BlockOutcome, ConversationId, ConversationView, Direction, FriendCounts, FriendLists,
    FriendRequestOutcome, GroupChange, GroupCreated, GroupEdit, HistoryStore, MediaRecord,
    MemberState, Membership, NewGroup, NewMessage, NewSession, PHOTO_SENT_ELSEWHERE, Page,
    PendingRange, PushDevice, Referable, Reference, SessionRecord, StoreError, StoredPresence,
    UserId, UserRecord, WatermarkKind, WatermarkMoved, WatermarkUpdate, direct_key,
};

/// Most jobs folded into one transaction. Bounds commit latency for the
/// first job of a batch while still amortising the fsync.
const MAX_BATCH: usize = 512;

/// Shortest time from the start of one transaction to the start of the
/// next, by default (`sqlite-commit-gap`). Without it the thread commits back to back whenever anything is
/// waiting, so at moderate load it syncs thousands of tiny transactions a
/// second and its CPU hardly falls with the load (2,000 `fdatasync`s a
/// second at 3,000 sends/s). One millisecond halves that: at 3,000 and
/// 5,000 sends/s the server used 10–19 % less CPU and wrote 10–15 % fewer
/// bytes per send, for ~1 ms more median ack latency (BENCHMARKS.md).
/// Under heavy load commits take longer than this anyway, so it never
/// binds there.
pub const MIN_COMMIT_GAP: Duration = Duration::from_millis(1);

/// Longest `sqlite-commit-gap` accepted: beyond it the gap is most of a
/// send's latency.
pub const MAX_COMMIT_GAP: Duration = Duration::from_millis(50);

/// Longest a conversation head or an idempotency key stays unwritten while
/// only sends and watermark moves arrive.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// How often the checkpointer thread copies committed WAL frames into the
/// database file. The writer's connection has SQLite's automatic
/// checkpoints off: one ran inside the commit that crossed 1,000 frames,
/// so every send in that batch waited for ~300 pages to be copied and the
/// database file synced (about half of the appends over 10 ms at 10,000
/// sends/s; BENCHMARKS.md, session 22). A PASSIVE checkpoint on a
/// connection of its own never blocks the writer.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// WAL length (frames) past which the writer starts the WAL over. Passive
/// checkpoints alone rarely let it: the WAL restarts only when a write
/// transaction begins with every frame copied, and a writer that commits
/// every millisecond or two has always committed more by the time a
/// concurrent checkpoint (with its own sync) ends. So once the WAL is this
/// long, the writer runs one PASSIVE checkpoint itself right after a
/// commit: it copies only what the checkpointer has not (a few commits),
/// and nothing can commit meanwhile, so the next transaction restarts the
/// WAL from its first frame.
const WAL_RESTART_FRAMES: i64 = 2_000;

/// Senders' idempotency keys are written in this many slices (by sender id),
/// one slice every [`KEY_SLICE_INTERVAL`].
const KEY_SLICES: u64 = 10;

/// With [`KEY_SLICES`]: each sender's keys are written once a second.
const KEY_SLICE_INTERVAL: Duration = Duration::from_millis(100);

/// Length of the text kept in conversation-list previews.
const PREVIEW_CHARS: usize = 100;

/// A page of `?1`'s conversations below (`?2` ms, id `?4`), `?3` at most,
/// newest first, each with whether it is a group they left: the end of
/// their last stay there, unless they are a member again, is listed as of
/// their leaving. A conversation they deleted is not, until a message
/// after it comes.
const LIST_CONVERSATIONS: &str = "
    SELECT id, former FROM (
        SELECT c.id AS id, c.last_activity_ms AS at, 0 AS former
        FROM members m JOIN conversations c ON c.id = m.conversation_id
        WHERE m.user_id = ?1
          AND NOT EXISTS (SELECT 1 FROM cleared_histories k
                          WHERE k.user_id = ?1 AND k.conversation_id = c.id
                            AND k.cleared_seq >= c.last_seq)
        UNION ALL
        SELECT f.conversation_id, f.left_ms, 1
        FROM former_members f
        WHERE f.user_id = ?1
          AND NOT EXISTS (SELECT 1 FROM members m
                          WHERE m.conversation_id = f.conversation_id AND m.user_id = ?1)
          AND NOT EXISTS (SELECT 1 FROM former_members g
                          WHERE g.user_id = ?1 AND g.conversation_id = f.conversation_id
                            AND g.joined_seq > f.joined_seq))
    WHERE at < ?2 OR (at = ?2 AND id < ?4)
    ORDER BY at DESC, id DESC LIMIT ?3";

/// The file name under the data directory.
pub const FILE_NAME: &str = "chat.sqlite3";

/// The data directory's lock file (see [`lock_dir`]).
pub const LOCK_FILE_NAME: &str = "chat.sqlite3.lock";

/// Schema migrations, applied in order at open; `PRAGMA user_version`
/// records how many have run. Never edit one that has shipped: append.
const MIGRATIONS: &[&str] = &[
    include_str!("sqlite/V1__initial.sql"),
    include_str!("sqlite/V2__presence.sql"),
    include_str!("sqlite/V3__idempotency.sql"),
    include_str!("sqlite/V4__message_log.sql"),
    include_str!("sqlite/V5__watermark_log.sql"),
    include_str!("sqlite/V6__group_keys.sql"),
    include_str!("sqlite/V7__departures.sql"),
    include_str!("sqlite/V8__session_ends.sql"),
    include_str!("sqlite/V9__blocks.sql"),
    include_str!("sqlite/V10__departures_by_conversation.sql"),
    include_str!("sqlite/V11__history_identity.sql"),
    include_str!("sqlite/V12__media.sql"),
    include_str!("sqlite/V13__push.sql"),
    include_str!("sqlite/V14__former_members.sql"),
    include_str!("sqlite/V15__photo_previews.sql"),
    include_str!("sqlite/V16__former_member_entries.sql"),
    include_str!("sqlite/V17__mutes.sql"),
    include_str!("sqlite/V18__cleared_histories.sql"),
    include_str!("sqlite/V19__replies.sql"),
    include_str!("sqlite/V20__unsends.sql"),
];

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type Job = Box<dyn DbJob>;

/// One unit of work for the database thread.
trait DbJob: Send {
    /// Runs inside the batch transaction. Returns whether the job failed
    /// in a way that poisons the batch (anything but a refusal) and what to
    /// call once the transaction's fate is known.
    fn run(self: Box<Self>, conn: &Connection, state: &mut DbState) -> (bool, Completion);
    /// The job will not run (the transaction could not start).
    fn abort(self: Box<Self>, error: StoreError);
}

/// A closure and the channel its caller waits on.
struct CallJob<F, R> {
    f: F,
    reply: oneshot::Sender<Result<R, StoreError>>,
    /// Write pending watermarks, conversation heads and index entries
    /// first (every job but the hot ones, which read them through the
    /// pending state).
    flush_pending: bool,
}

impl<F, R> DbJob for CallJob<F, R>
where
    R: Send + 'static,
    F: FnOnce(&Connection, &mut DbState) -> Result<R, StoreError> + Send,
{
    fn run(self: Box<Self>, conn: &Connection, state: &mut DbState) -> (bool, Completion) {
        let CallJob {
            f,
            reply,
            flush_pending,
        } = *self;
        let result = match flush_pending {
            true => state.flush_for_read(conn).and_then(|()| f(conn, state)),
            false => f(conn, state),
        };
        let ok = !matches!(
            result,
            Err(StoreError::Unavailable(_) | StoreError::Internal(_))
        );
        let completion: Completion = Box::new(move |commit| {
            // The caller may have given up waiting; nothing to do then.
            let _ = reply.send(commit.and(result));
        });
        (ok, completion)
    }

    fn abort(self: Box<Self>, error: StoreError) {
        let _ = self.reply.send(Err(error));
    }
}

/// State the database thread keeps between jobs.
struct DbState {
    /// Next message id to hand out (the thread is the only writer).
    next_message_id: u64,
    /// Conversation -> (members, last seq), so the hot path (append, move a
    /// watermark) needs no lookup queries. Exact because this thread is the
    /// only writer; dropped whenever a job or commit fails.
    conversations: HashMap<ConversationId, Cached>,
    /// Conversation heads appended but not yet written to `conversations`.
    heads: HashMap<ConversationId, Head>,
    /// Index entries appended but not yet written to `message_index`:
    /// conversation -> (seq, message id), in seq order. Written with the
    /// heads.
    index: HashMap<ConversationId, Vec<(u64, u64)>>,
    /// Watermarks moved (and logged) but not yet written to `members`:
    /// (conversation, user) -> (delivered seq, seen seq). Written before
    /// any job that reads `members`, else in the key slices.
    watermarks: HashMap<(ConversationId, UserId), (u64, u64)>,
    /// The last `watermark_log` id when the current cycle of watermark
    /// slices began: after its last slice every row up to it is written.
    /// `None` when the log was emptied since (ids may start over then).
    watermark_cycle: Option<i64>,
    /// When heads and index entries were last written by the periodic
    /// flush.
    flushed_at: Instant,
    /// Idempotency keys of messages appended since their sender's keys
    /// were last written: sender -> client_msg_id -> where it went.
    keys: HashMap<UserId, HashMap<String, PendingKey>>,
    /// The next slice of senders whose keys to write, and when the last
    /// slice was written.
    key_slice: u64,
    keys_flushed_at: Instant,
    /// Pending heads and keys were lost with a rolled-back transaction:
    /// jobs wait until they are rebuilt from `messages`.
    needs_repair: bool,
    /// Repairs the tests make fail.
    #[cfg(test)]
    failing_repairs: u32,
}

/// Where a message with a pending idempotency key went.
#[derive(Clone, Copy)]
struct PendingKey {
    conversation_id: ConversationId,
    seq: u64,
    message_id: u64,
}

/// A conversation's last seq and when it was appended.
#[derive(Clone, Copy)]
struct Head {
    last_seq: u64,
    at_ms: i64,
}

/// What the database thread remembers of one conversation.
struct Cached {
    /// Ascending (`members_of`), so that a membership check in a group of
    /// 10,000 is a binary search on the store thread, not a scan.
    members: Arc<Vec<UserId>>,
    last_seq: u64,
    /// Whether members may send: false for a direct conversation whose two
    /// members are not friends. Friendship changes drop the entry
    /// ([`DbState::forget_direct`]).
    open: bool,
}

/// Conversations kept in [`DbState`]; beyond it the cache starts over.
const MAX_CACHED_CONVERSATIONS: usize = 200_000;

impl DbState {
    /// Members and last seq of a conversation, from the cache or the
    /// database. `None` if the conversation does not exist.
    fn conversation(
        &mut self,
        conn: &Connection,
        conversation_id: ConversationId,
    ) -> Result<Option<&mut Cached>, StoreError> {
        if !self.conversations.contains_key(&conversation_id) {
            // Without the pending heads and index entries the last seq
            // below could be behind a committed message.
            if self.needs_repair {
                return Err(StoreError::Unavailable(
                    "heads and the message index are being rebuilt".into(),
                ));
            }
            // The row's head is behind by what is pending: the last
            // written index entry and the pending head are not.
            let row: Option<(i64, i32)> = conn
                .prepare_cached(
                    "SELECT MAX(c.last_seq,
                                COALESCE((SELECT MAX(seq) FROM message_index WHERE conversation_id = c.id), 0)),
                            c.kind
                     FROM conversations c WHERE c.id = ?1",
                )
                .map_err(internal)?
                .query_row([sql(conversation_id)], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(internal)?;
            let Some((last_seq, kind)) = row else {
                return Ok(None);
            };
            let pending = self.heads.get(&conversation_id).map_or(0, |h| h.last_seq);
            let last_seq = (last_seq as u64).max(pending);
            let members = members_of(conn, conversation_id).map_err(internal)?;
            let open = match members[..] {
                [a, b] if kind == proto::ConversationKind::Direct as i32 => {
                    are_friends(conn, a, b)?
                }
                _ => true,
            };
            if self.conversations.len() >= MAX_CACHED_CONVERSATIONS {
                self.conversations.clear();
            }
            self.conversations.insert(
                conversation_id,
                Cached {
                    members: Arc::new(members),
                    last_seq,
                    open,
                },
            );
        }
        Ok(self.conversations.get_mut(&conversation_id))
    }

    /// Drops what is remembered of the direct conversation of `a` and `b`
    /// (if they have one), whose members may send only while the two are
    /// friends: called in the transaction that changes their friendship.
    fn forget_direct(&mut self, conn: &Connection, a: UserId, b: UserId) -> Result<(), StoreError> {
        let id: Option<i64> = conn
            .prepare_cached("SELECT id FROM conversations WHERE direct_key = ?1")
            .map_err(internal)?
            .query_row([direct_key(a, b)], |r| r.get(0))
            .optional()
            .map_err(internal)?;
        if let Some(id) = id {
            self.conversations.remove(&(id as u64));
        }
        Ok(())
    }

    /// Records a conversation's new head, to be written behind.
    fn note_head(&mut self, conversation_id: ConversationId, head: Head) {
        let entry = self.heads.entry(conversation_id).or_insert(head);
        if head.last_seq >= entry.last_seq {
            *entry = head;
        }
    }

    /// Writes everything pending inside the open transaction.
    fn flush(&mut self, conn: &Connection) -> Result<(), StoreError> {
        self.flushed_at = Instant::now();
        self.flush_for_read(conn)?;
        self.flush_keys(conn, None)
    }

    /// Writes what the tables' readers need: every pending watermark, head
    /// and index entry.
    fn flush_for_read(&mut self, conn: &Connection) -> Result<(), StoreError> {
        self.flush_watermarks(conn, None)?;
        self.flush_heads(conn)
    }

    /// Writes the next slice of senders' pending idempotency keys, and of
    /// conversations' pending watermarks, when [`KEY_SLICE_INTERVAL`] has
    /// passed.
    fn flush_key_slice(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if self.keys_flushed_at.elapsed() < KEY_SLICE_INTERVAL {
            return Ok(());
        }
        let slice = self.key_slice;
        self.key_slice = (slice + 1) % KEY_SLICES;
        self.flush_keys(conn, Some(slice))?;
        self.flush_watermarks(conn, Some(slice))
    }

    /// Writes the pending idempotency keys of every sender (`None`) or of
    /// one slice of senders, in key order, and moves `keys_message_id`
    /// up to the last message whose key, and every earlier one, is written.
    fn flush_keys(&mut self, conn: &Connection, slice: Option<u64>) -> Result<(), StoreError> {
        self.keys_flushed_at = Instant::now();
        if self.keys.is_empty() {
            return Ok(());
        }
        // Lost if the transaction rolls back: `rolled_back` rebuilds them.
        let mut senders: Vec<(UserId, HashMap<String, PendingKey>)> = match slice {
            None => self.keys.drain().collect(),
            Some(slice) => take_where(&mut self.keys, |id| id % KEY_SLICES == slice),
        };
        if senders.is_empty() {
            return Ok(());
        }
        senders.sort_unstable_by_key(|(sender, _)| *sender);
        let mut insert = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO idempotency (sender_id, client_msg_id, conversation_id, seq)
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .map_err(internal)?;
        for (sender, keys) in senders {
            let mut keys: Vec<_> = keys.into_iter().collect();
            keys.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (key, at) in keys {
                let written = insert
                    .execute(params![
                        sql(sender),
                        key,
                        sql(at.conversation_id),
                        sql(at.seq)
                    ])
                    .map_err(internal)?;
                // The table has no constraint of the log's own to say so
                // (V4): a key written twice means the in-memory checks let
                // one send be stored twice.
                if written == 0 {
                    write_behind_collision("idempotency key", sender, at.conversation_id, at.seq);
                }
            }
        }
        let oldest_pending = self
            .keys
            .values()
            .flat_map(|keys| keys.values().map(|at| at.message_id))
            .min();
        let through = oldest_pending.unwrap_or(self.next_message_id) - 1;
        conn.prepare_cached(
            "UPDATE written_through SET keys_message_id = MAX(keys_message_id, ?1) WHERE id = 1",
        )
        .map_err(internal)?
        .execute([sql(through)])
        .map_err(internal)?;
        Ok(())
    }

    /// Where the message stored under (`sender`, `client_msg_id`) went.
    fn stored_key(
        &self,
        conn: &Connection,
        sender: UserId,
        client_msg_id: &str,
    ) -> Result<Option<(ConversationId, u64)>, StoreError> {
        if let Some(at) = self.keys.get(&sender).and_then(|k| k.get(client_msg_id)) {
            return Ok(Some((at.conversation_id, at.seq)));
        }
        conn.prepare_cached(
            "SELECT conversation_id, seq FROM idempotency WHERE sender_id = ?1 AND client_msg_id = ?2",
        )
        .map_err(internal)?
        .query_row(params![sql(sender), client_msg_id], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })
        .optional()
        .map_err(internal)
    }

    /// Writes every pending head and index entry inside the open
    /// transaction and moves `heads_message_id` up to the last message
    /// appended.
    fn flush_heads(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if self.heads.is_empty() && self.index.is_empty() {
            return Ok(());
        }
        // In key order, so consecutive inserts share leaf pages.
        let mut index: Vec<(ConversationId, Vec<(u64, u64)>)> = self.index.drain().collect();
        index.sort_unstable_by_key(|(conversation_id, _)| *conversation_id);
        let mut insert = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO message_index (conversation_id, seq, message_id)
                 VALUES (?1, ?2, ?3)",
            )
            .map_err(internal)?;
        for (conversation_id, entries) in index {
            for (seq, message_id) in entries {
                let written = insert
                    .execute(params![sql(conversation_id), sql(seq), sql(message_id)])
                    .map_err(internal)?;
                if written == 0 {
                    write_behind_collision("index entry", message_id, conversation_id, seq);
                }
            }
        }
        // Lost if the transaction rolls back: `rolled_back` rebuilds them.
        let heads: Vec<(ConversationId, Head)> = self.heads.drain().collect();
        let mut update = conn
            .prepare_cached(
                "UPDATE conversations SET last_seq = MAX(last_seq, ?2),
                        last_activity_ms = MAX(last_activity_ms, ?3)
                 WHERE id = ?1",
            )
            .map_err(internal)?;
        for (id, head) in heads {
            update
                .execute(params![sql(id), sql(head.last_seq), head.at_ms])
                .map_err(internal)?;
        }
        conn.prepare_cached(
            "UPDATE written_through SET heads_message_id = MAX(heads_message_id, ?1) WHERE id = 1",
        )
        .map_err(internal)?
        .execute([sql(self.next_message_id - 1)])
        .map_err(internal)?;
        Ok(())
    }

    /// A member's (delivered, seen) watermarks: the pending move, else the
    /// row. `None` for a non-member.
    fn watermark(
        &self,
        conn: &Connection,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        if let Some(&pending) = self.watermarks.get(&(conversation_id, user)) {
            return Ok(Some(pending));
        }
        conn.prepare_cached(
            "SELECT delivered_seq, seen_seq FROM members WHERE conversation_id = ?1 AND user_id = ?2",
        )
        .map_err(internal)?
        .query_row(params![sql(conversation_id), sql(user)], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })
        .optional()
        .map_err(internal)
    }

    /// Moves a member's watermarks to `to` (never lower than they are):
    /// durable in this transaction as a log row, the members row written
    /// behind.
    fn move_watermark(
        &mut self,
        conn: &Connection,
        conversation_id: ConversationId,
        user: UserId,
        to: (u64, u64),
    ) -> Result<(), StoreError> {
        conn.prepare_cached(
            "INSERT INTO watermark_log (conversation_id, user_id, delivered_seq, seen_seq)
             VALUES (?1, ?2, ?3, ?4)",
        )
        .map_err(internal)?
        .execute(params![
            sql(conversation_id),
            sql(user),
            sql(to.0),
            sql(to.1)
        ])
        .map_err(internal)?;
        self.watermarks.insert((conversation_id, user), to);
        Ok(())
    }

    /// Writes the pending watermarks of every conversation (`None`) or of
    /// one slice of conversations to `members`, in key order, and deletes
    /// the log rows that are then all written: every row after writing
    /// them all, the rows logged before a cycle of slices began after its
    /// last slice. (All at once, at 10,000 sends/s, put a commit with
    /// ~5,000 updates in every second, visible in p99.)
    fn flush_watermarks(
        &mut self,
        conn: &Connection,
        slice: Option<u64>,
    ) -> Result<(), StoreError> {
        if slice.is_none() && self.watermarks.is_empty() {
            // What the log still holds is written; a cycle trims it.
            return Ok(());
        }
        if slice == Some(0) {
            let last: i64 = conn
                .prepare_cached("SELECT COALESCE(MAX(id), 0) FROM watermark_log")
                .map_err(internal)?
                .query_row([], |r| r.get(0))
                .map_err(internal)?;
            self.watermark_cycle = Some(last);
        }
        // Lost if the transaction rolls back: the log rows are not, and
        // `repair` replays them.
        let mut moved: Vec<((ConversationId, UserId), (u64, u64))> = match slice {
            None => self.watermarks.drain().collect(),
            Some(slice) => take_where(&mut self.watermarks, |(conversation_id, _)| {
                conversation_id % KEY_SLICES == slice
            }),
        };
        moved.sort_unstable_by_key(|(key, _)| *key);
        let mut update = conn
            .prepare_cached(
                "UPDATE members SET delivered_seq = MAX(delivered_seq, ?3),
                        seen_seq = MAX(seen_seq, ?4)
                 WHERE conversation_id = ?1 AND user_id = ?2",
            )
            .map_err(internal)?;
        for ((conversation_id, user), (delivered, seen)) in moved {
            update
                .execute(params![
                    sql(conversation_id),
                    sql(user),
                    sql(delivered),
                    sql(seen)
                ])
                .map_err(internal)?;
        }
        // This thread is the only writer and logs a move only together with
        // its pending entry, so a row is in `members` once its entry has
        // been written (or replaced by a later move that has).
        match slice {
            None => {
                self.watermark_cycle = None;
                exec(conn, "DELETE FROM watermark_log")
            }
            Some(slice) if slice + 1 == KEY_SLICES => match self.watermark_cycle.take() {
                Some(last) => conn
                    .prepare_cached("DELETE FROM watermark_log WHERE id <= ?1")
                    .and_then(|mut s| s.execute([last]))
                    .map(drop)
                    .map_err(internal),
                None => Ok(()),
            },
            Some(_) => Ok(()),
        }
    }

    /// The open transaction rolled back: nothing of it is stored, so its
    /// ids may be reused and nothing cached from it can be trusted. Pending
    /// heads and keys mix committed messages with rolled-back ones; those of
    /// the committed ones are rebuilt from `messages`.
    fn rolled_back(&mut self, next_message_id: u64) {
        self.next_message_id = next_message_id;
        self.conversations.clear();
        self.heads.clear();
        self.index.clear();
        self.watermarks.clear();
        self.watermark_cycle = None;
        self.keys.clear();
        self.needs_repair = true;
    }

    /// Rebuilds heads, index entries and keys after `written_through` from
    /// `messages`, in a transaction of its own; on failure, jobs that need
    /// them keep waiting and the next batch tries again.
    fn repair(&mut self, conn: &Connection) {
        if !self.needs_repair {
            return;
        }
        #[cfg(test)]
        if self.failing_repairs > 0 {
            self.failing_repairs -= 1;
            return;
        }
        match conn.execute_batch(&format!("BEGIN IMMEDIATE; {REPAIR}; COMMIT;")) {
            Ok(()) => {
                self.needs_repair = false;
                // The log was emptied, so its ids may start over: a cycle
                // begun meanwhile (after a failed repair) must not trim
                // rows logged from now on.
                self.watermark_cycle = None;
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                tracing::error!(error = %e, "cannot rebuild heads, index and idempotency keys; retrying with the next batch");
            }
        }
    }
}

/// A write-behind row that was already there: since V4 the messages log
/// has no unique key on (sender, key) or (conversation, seq), so only the
/// store thread's memory keeps a send from being stored twice, and an
/// ignored insert here is the one sign that it did not. Never expected:
/// logged loudly, and a panic in debug builds (the tests).
fn write_behind_collision(what: &str, owner: u64, conversation_id: u64, seq: u64) {
    tracing::error!(
        what,
        owner,
        conversation_id,
        seq,
        "a write-behind row was already written: a message may be stored twice"
    );
    if cfg!(debug_assertions) {
        panic!("{what} written twice: {owner} {conversation_id}/{seq}");
    }
}

/// Replays the watermark moves left in the log into `members`, indexes
/// the messages after `heads_message_id`, brings the heads of
/// their conversations up to their last message, writes the idempotency
/// keys of the messages after `keys_message_id`, and moves both marks to
/// the last message. The messages after a mark are a range of the log's
/// primary key, a scan of its last pages.
const REPAIR: &str = "
    UPDATE members SET delivered_seq = MAX(members.delivered_seq, w.delivered_seq),
                       seen_seq = MAX(members.seen_seq, w.seen_seq)
        FROM (SELECT conversation_id, user_id,
                     MAX(delivered_seq) AS delivered_seq, MAX(seen_seq) AS seen_seq
              FROM watermark_log GROUP BY conversation_id, user_id) AS w
        WHERE members.conversation_id = w.conversation_id AND members.user_id = w.user_id;
    DELETE FROM watermark_log;
    INSERT OR IGNORE INTO message_index (conversation_id, seq, message_id)
        SELECT conversation_id, seq, message_id FROM messages
        WHERE message_id > (SELECT heads_message_id FROM written_through);
    UPDATE conversations SET
        last_seq = (SELECT MAX(seq) FROM message_index i WHERE i.conversation_id = conversations.id),
        last_activity_ms = MAX(last_activity_ms,
            (SELECT m.sent_at_ms FROM message_index i JOIN messages m ON m.message_id = i.message_id AND m.conversation_id = i.conversation_id
             WHERE i.conversation_id = conversations.id ORDER BY i.seq DESC LIMIT 1))
    WHERE id IN (SELECT conversation_id FROM messages
                 WHERE message_id > (SELECT heads_message_id FROM written_through));
    INSERT OR IGNORE INTO idempotency (sender_id, client_msg_id, conversation_id, seq)
        SELECT sender_id, client_msg_id, conversation_id, seq FROM messages
        WHERE message_id > (SELECT keys_message_id FROM written_through);
    UPDATE written_through SET
        keys_message_id = (SELECT COALESCE(MAX(message_id), 0) FROM messages),
        heads_message_id = (SELECT COALESCE(MAX(message_id), 0) FROM messages)
    WHERE id = 1";

/// Where the store reports its WAL checkpoints (nowhere by default).
#[derive(Clone)]
pub struct CheckpointMetrics {
    /// Frames in the WAL at the latest checkpoint.
    pub wal_frames: Gauge,
    /// The checkpointer thread's checkpoints that copied frames.
    pub checkpointer: Histogram,
    /// The writer's own checkpoints (the ones that restart the WAL).
    pub writer: Histogram,
    /// The checkpointer thread's checkpoints that failed: while they do,
    /// the WAL grows without bound and the frames gauge stands still.
    pub failures: Counter,
    /// Tests: how many of the checkpointer's next checkpoints fail.
    #[cfg(test)]
    pub(crate) fail_next: Arc<std::sync::atomic::AtomicU32>,
}

impl Default for CheckpointMetrics {
    fn default() -> Self {
        CheckpointMetrics {
            wal_frames: Gauge::noop(),
            checkpointer: Histogram::noop(),
            writer: Histogram::noop(),
            failures: Counter::noop(),
            #[cfg(test)]
            fail_next: Arc::default(),
        }
    }
}

/// The SQLite-backed [`HistoryStore`].
pub struct SqliteStore {
    jobs: std_mpsc::Sender<Job>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// The checkpointer thread and the sender whose drop stops it.
    checkpointer: std::sync::Mutex<Option<(std_mpsc::Sender<()>, JoinHandle<()>)>>,
    path: PathBuf,
    /// A test made the thread panic on purpose (`crash_thread`): the drop
    /// does not raise it again.
    #[cfg(test)]
    crashed_on_purpose: AtomicBool,
    /// The data directory's lock (see [`lock_dir`]), let go once the
    /// threads above have closed the database: the last field, dropped
    /// after [`Drop::drop`] joined them.
    _lock: std::fs::File,
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/chat.sqlite3` and migrates it,
    /// with the default commit gap.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, MIN_COMMIT_GAP)
    }

    /// [`open`](Self::open) with `commit_gap` between the starts of
    /// consecutive transactions (see [`MIN_COMMIT_GAP`]; at most
    /// [`MAX_COMMIT_GAP`]).
    pub fn open_with(dir: &Path, commit_gap: Duration) -> Result<Self, StoreError> {
        Self::open_observed(dir, commit_gap, CheckpointMetrics::default())
    }

    /// [`open_with`](Self::open_with), reporting checkpoints to `metrics`.
    pub fn open_observed(
        dir: &Path,
        commit_gap: Duration,
        metrics: CheckpointMetrics,
    ) -> Result<Self, StoreError> {
        let commit_gap = commit_gap.min(MAX_COMMIT_GAP);
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Internal(format!("create {}: {e}", dir.display())))?;
        let lock = lock_dir(dir)?;
        let path = dir.join(FILE_NAME);
        let conn = Connection::open(&path).map_err(internal)?;
        // The page cache is 16 MiB, not larger: a commit that split a
        // B-tree page (SQLite parks pages at the 1 GiB page number while it
        // renumbers them) scans the cache's whole hash table at its end, so
        // that scan grows with the cache (3.1 % of the node's CPU at
        // 10,000 sends/s with 64 MiB, 1.5 % with 16 MiB); pages beyond it
        // come from the OS page cache. `secure_delete = FAST` zeroes what
        // a write frees within a page where that costs no I/O (an unsend
        // turns it ON for its own write: `erase`).
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA temp_store = MEMORY;
             PRAGMA cache_size = -16384;
             PRAGMA foreign_keys = ON;
             PRAGMA secure_delete = FAST;
             PRAGMA busy_timeout = 5000;",
        )
        .map_err(internal)?;
        migrate(&conn)?;
        // What a crash left unwritten.
        conn.execute_batch(&format!("BEGIN; {REPAIR}; COMMIT;"))
            .map_err(internal)?;
        // Checkpoints run on their own connection (see CHECKPOINT_INTERVAL).
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0;")
            .map_err(internal)?;
        let checkpoints = Connection::open(&path).map_err(internal)?;
        checkpoints
            .execute_batch("PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;")
            .map_err(internal)?;
        let next_message_id: i64 = conn
            .query_row(
                "SELECT COALESCE(MAX(message_id), 0) + 1 FROM messages",
                [],
                |r| r.get(0),
            )
            .map_err(internal)?;
        let state = DbState {
            next_message_id: next_message_id as u64,
            conversations: HashMap::new(),
            heads: HashMap::new(),
            index: HashMap::new(),
            watermarks: HashMap::new(),
            watermark_cycle: None,
            flushed_at: Instant::now(),
            keys: HashMap::new(),
            key_slice: 0,
            keys_flushed_at: Instant::now(),
            needs_repair: false,
            #[cfg(test)]
            failing_repairs: 0,
        };
        let restart_due = Arc::new(AtomicBool::new(false));
        let (stop_checkpoints, stop) = std_mpsc::channel::<()>();
        let due = restart_due.clone();
        let observed = metrics.clone();
        let checkpointer = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || run_checkpointer(checkpoints, stop, &due, &observed))
            .map_err(|e| StoreError::Internal(format!("spawn checkpoint thread: {e}")))?;
        let (jobs, rx) = std_mpsc::channel::<Job>();
        let restart = WalRestart {
            due: restart_due,
            took: metrics.writer,
        };
        let thread = std::thread::Builder::new()
            .name("sqlite-store".into())
            .spawn(move || run_thread(conn, state, rx, commit_gap, &restart))
            .map_err(|e| StoreError::Internal(format!("spawn store thread: {e}")))?;
        Ok(SqliteStore {
            jobs,
            thread: std::sync::Mutex::new(Some(thread)),
            checkpointer: std::sync::Mutex::new(Some((stop_checkpoints, checkpointer))),
            path,
            #[cfg(test)]
            crashed_on_purpose: AtomicBool::new(false),
            _lock: lock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `sql` on the store thread, in the current batch's transaction
    /// (tests change the schema under a running store with it).
    #[cfg(test)]
    pub(crate) async fn execute_for_test(&self, sql: &'static str) {
        self.call(move |conn, _| conn.execute_batch(sql).map_err(internal))
            .await
            .expect("the statement runs");
    }

    /// The process dies, as far as the files can tell: nothing pending
    /// is written and the threads are left as they are, but the data
    /// directory's lock goes, as the kernel lets it go when a process
    /// ends.
    #[cfg(test)]
    pub(crate) fn crash_for_test(self) {
        let _ = self._lock.unlock();
        std::mem::forget(self);
    }

    /// Occupies the store thread until the returned sender is dropped:
    /// jobs submitted meanwhile queue behind it, in order (for tests that
    /// need a read to wait). Returns once the thread is occupied.
    #[cfg(test)]
    pub(crate) async fn occupy_thread(self: &Arc<Self>) -> std_mpsc::Sender<()> {
        let (release, released) = std_mpsc::channel::<()>();
        let (started, occupied) = oneshot::channel();
        let store = self.clone();
        tokio::spawn(async move {
            store
                .call(move |_, _| {
                    let _ = started.send(());
                    let _ = released.recv();
                    Ok(())
                })
                .await
        });
        occupied.await.expect("the store thread runs the job");
        release
    }

    /// Makes the store thread panic, as a bug in a job would.
    #[cfg(test)]
    pub(crate) async fn crash_thread(&self) {
        self.crashed_on_purpose.store(true, Ordering::Relaxed);
        let _ = self
            .call(|_, _| -> Result<(), StoreError> { panic!("injected store thread panic") })
            .await;
    }

    /// Runs `f` on the database thread inside the current batch's
    /// transaction and returns its result once that transaction committed.
    async fn call<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection, &mut DbState) -> Result<R, StoreError> + Send + 'static,
    {
        self.submit(f, true).await
    }

    /// [`call`](Self::call) for the hot jobs (appends, watermark moves),
    /// which read heads, index entries and watermarks through the pending
    /// state and so do not write it first.
    async fn call_hot<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection, &mut DbState) -> Result<R, StoreError> + Send + 'static,
    {
        self.submit(f, false).await
    }

    async fn submit<R, F>(&self, f: F, flush_pending: bool) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection, &mut DbState) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(CallJob {
            f,
            reply,
            flush_pending,
        });
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Unavailable("store thread stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Internal("store thread dropped a job".into()))?
    }
}

/// Takes the data directory for this store, or says which is in use. Two
/// stores on one database (a second node started with the same
/// `--data-dir`, an old pod still draining beside its replacement) would
/// each hand out message ids and seqs from what they read at start, and
/// one's acknowledged messages would be refused or dropped as the
/// other's; the lock is taken before anything is read or repaired. An
/// advisory lock (`flock`) on a file of its own, which the kernel lets go
/// when the process ends however it ends; not on the database file, whose
/// POSIX locks SQLite loses when any descriptor of the file is closed.
fn lock_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    let path = dir.join(LOCK_FILE_NAME);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::Internal(format!("open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Internal(format!(
            "the data directory {} is in use by another chat-server (it holds {}); \
             give each node a directory of its own",
            dir.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Internal(format!(
            "lock {}: {e}",
            path.display()
        ))),
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel ends the thread after it drains the queue;
        // joining makes sure the file is closed when the store is gone (a
        // restarted server in the same process reopens it).
        let (dead, _) = std_mpsc::channel();
        drop(std::mem::replace(&mut self.jobs, dead));
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let joined = thread.join();
            // The store's own tests hear a panic of its thread (one in
            // the shutdown's last flush went unseen), unless one is under
            // way already.
            #[cfg(test)]
            if let Err(panic) = joined
                && !std::thread::panicking()
                && !self.crashed_on_purpose.load(Ordering::Relaxed)
            {
                std::panic::resume_unwind(panic);
            }
            #[cfg(not(test))]
            drop(joined);
        }
        if let Some((stop, thread)) = self.checkpointer.lock().ok().and_then(|mut c| c.take()) {
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// The checkpointer thread: every [`CHECKPOINT_INTERVAL`] a PASSIVE
/// checkpoint copies what is committed into the database file, without
/// waiting for or blocking the writer; past [`WAL_RESTART_FRAMES`] it asks
/// the writer to finish the job (`restart_due`). Ends when `stop` closes.
fn run_checkpointer(
    conn: Connection,
    stop: std_mpsc::Receiver<()>,
    restart_due: &AtomicBool,
    metrics: &CheckpointMetrics,
) {
    // (frames, copied) after the last pass, to time only passes with work.
    let mut last = (0, 0);
    // A failure is logged when it starts and when it ends, not ten times a
    // second while it lasts (a full disk, say).
    let mut failing = false;
    while let Err(std_mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_INTERVAL) {
        let started = Instant::now();
        #[cfg(test)]
        let injected = metrics
            .fail_next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        #[cfg(not(test))]
        let injected = false;
        let checkpointed = match injected {
            true => Err(rusqlite::Error::InvalidQuery),
            false => checkpoint(&conn),
        };
        let c = match checkpointed {
            Ok(c) => c,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "WAL checkpoints failing; retrying every 100 ms");
                }
                failing = true;
                metrics.failures.increment(1);
                continue;
            }
        };
        if failing {
            tracing::info!("WAL checkpoints work again");
            failing = false;
        }
        if c.busy {
            continue;
        }
        if (c.frames, c.copied) != last {
            metrics.checkpointer.record(started.elapsed().as_secs_f64());
            last = (c.frames, c.copied);
        }
        metrics.wal_frames.set(c.frames as f64);
        if c.frames >= WAL_RESTART_FRAMES {
            restart_due.store(true, Ordering::Relaxed);
        }
    }
}

/// The writer's side of restarting the WAL: the checkpointer's request,
/// and where the writer's own checkpoints are timed.
struct WalRestart {
    due: Arc<AtomicBool>,
    took: Histogram,
}

/// What a checkpoint found.
struct Checkpoint {
    /// Another checkpoint was running, so this one did nothing.
    busy: bool,
    /// Frames in the WAL.
    frames: i64,
    /// Of those, the frames now in the database file.
    copied: i64,
}

impl Checkpoint {
    /// Every frame is in the database file: the next write transaction
    /// starts the WAL over.
    fn complete(&self) -> bool {
        !self.busy && self.copied >= self.frames
    }
}

/// One PASSIVE checkpoint.
fn checkpoint(conn: &Connection) -> rusqlite::Result<Checkpoint> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok(Checkpoint {
            busy: r.get::<_, i64>(0)? != 0,
            frames: r.get(1)?,
            copied: r.get(2)?,
        })
    })
}

fn run_thread(
    conn: Connection,
    mut state: DbState,
    rx: std_mpsc::Receiver<Job>,
    commit_gap: Duration,
    restart: &WalRestart,
) {
    let mut completions: Vec<Completion> = Vec::with_capacity(MAX_BATCH);
    let mut last_start: Option<Instant> = None;
    while let Ok(first) = rx.recv() {
        // Back-to-back commits are paced (see MIN_COMMIT_GAP); the jobs
        // that arrive meanwhile join this batch.
        if let Some(wait) = last_start.and_then(|t| commit_gap.checked_sub(t.elapsed())) {
            std::thread::sleep(wait);
        }
        last_start = Some(Instant::now());
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        state.repair(&conn);
        if state.needs_repair {
            // The tables are behind what was committed (pending index
            // entries, heads, keys and watermark moves went with the
            // rollback): a read would show last seqs going backwards and
            // catch-up would skip messages, and a watermark slice could
            // trim log rows never replayed. Nothing runs until the rebuild
            // goes through; `/readyz` says so too.
            for job in batch {
                job.abort(StoreError::Unavailable(
                    "the store is rebuilding after a failed transaction; retry".into(),
                ));
            }
            continue;
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            tracing::error!(error = %e, "cannot begin a SQLite transaction");
            for job in batch {
                job.abort(StoreError::Unavailable(format!("begin failed: {e}")));
            }
            continue;
        }
        let before = state.next_message_id;
        let mut poisoned = false;
        let flushed = match state.flushed_at.elapsed() >= FLUSH_INTERVAL {
            true => state
                .flush_heads(&conn)
                .map(|()| state.flushed_at = Instant::now()),
            false => Ok(()),
        }
        .and_then(|()| state.flush_key_slice(&conn));
        if let Err(e) = flushed {
            tracing::error!(error = %e, "cannot write conversation heads or idempotency keys");
            poisoned = true;
        }
        // SQLite rolls the whole transaction back by itself on some errors
        // (an I/O error, a full disk or no memory while the page cache
        // spills), whoever caught the error: then nothing more may run,
        // as each statement would commit on its own, stored although its
        // caller hears UNAVAILABLE, with ids the rollback hands out again.
        // Jobs after a failed one are not run either: they would be
        // rolled back with it.
        poisoned |= conn.is_autocommit();
        for job in batch {
            if poisoned {
                job.abort(StoreError::Unavailable(
                    "an earlier job of the batch failed; batch rolled back".into(),
                ));
                continue;
            }
            let (ok, done) = job.run(&conn, &mut state);
            completions.push(done);
            if !ok || conn.is_autocommit() {
                poisoned = true;
            }
        }
        let commit = if poisoned {
            Err(StoreError::Unavailable(
                "a job failed; batch rolled back".into(),
            ))
        } else {
            exec(&conn, "COMMIT")
        };
        let commit = commit.map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            // Ids from `before` on may be reused, unless a statement that
            // ran outside the transaction stored one.
            let next = conn
                .query_row(
                    "SELECT COALESCE(MAX(message_id), 0) + 1 FROM messages",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map_or(before, |n| (n as u64).max(before));
            state.rolled_back(next);
            state.repair(&conn);
            StoreError::Unavailable(format!("commit failed: {e}"))
        });
        for done in completions.drain(..) {
            done(commit.as_ref().map(|_| ()).map_err(clone_err));
        }
        // After answering, so none of this batch's sends waits for it
        // (the next batch's do, ~3 ms once or twice a second at 10,000
        // sends/s): copy the few frames the checkpointer has not, and the
        // next transaction starts the WAL over (see WAL_RESTART_FRAMES).
        if restart.due.swap(false, Ordering::Relaxed) {
            let started = Instant::now();
            match checkpoint(&conn) {
                Ok(c) if c.complete() => restart.took.record(started.elapsed().as_secs_f64()),
                // The checkpointer was mid-way: after the next commit.
                Ok(_) => restart.due.store(true, Ordering::Relaxed),
                // The checkpointer's own pass fails too, and logs it.
                Err(e) => tracing::debug!(error = %e, "WAL checkpoint failed; asked again later"),
            }
        }
    }
    // Shutting down: heads and keys still pending go to disk now (or,
    // should this fail, are rebuilt at the next open).
    let flushed = conn
        .execute_batch("BEGIN IMMEDIATE")
        .map_err(internal)
        .and_then(|()| state.flush(&conn))
        .and_then(|()| exec(&conn, "COMMIT"));
    if let Err(e) = flushed {
        let _ = conn.execute_batch("ROLLBACK");
        tracing::warn!(error = %e, "heads and keys not written at shutdown; rebuilt at next open");
    }
}

/// Removes and returns the entries of `map` whose key is `wanted` (one
/// slice of what is pending).
fn take_where<K, V>(map: &mut HashMap<K, V>, wanted: impl Fn(&K) -> bool) -> Vec<(K, V)>
where
    K: Copy + Eq + std::hash::Hash,
{
    let keys: Vec<K> = map.keys().copied().filter(|k| wanted(k)).collect();
    keys.into_iter()
        .filter_map(|k| map.remove_entry(&k))
        .collect()
}

/// Runs a parameterless statement through the statement cache (savepoints
/// run for every job; parsing them each time shows in profiles).
fn exec(conn: &Connection, statement: &str) -> Result<(), StoreError> {
    conn.prepare_cached(statement)
        .and_then(|mut s| s.execute([]))
        .map(drop)
        .map_err(internal)
}

fn clone_err(e: &StoreError) -> StoreError {
    match e {
        StoreError::Conflict => StoreError::Conflict,
        StoreError::NotFound => StoreError::NotFound,
        StoreError::NotAMember => StoreError::NotAMember,
        StoreError::NotAdmin => StoreError::NotAdmin,
        StoreError::LimitReached => StoreError::LimitReached,
        StoreError::NotFriends(user) => StoreError::NotFriends(*user),
        StoreError::Invalid(s) => StoreError::Invalid(s.clone()),
        StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
        StoreError::Unsettled(s) => StoreError::Unsettled(s.clone()),
        StoreError::Internal(s) => StoreError::Internal(s.clone()),
    }
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let applied: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(internal)?;
    // A database a newer build migrated: this one would neither replay
    // what the newer schema keeps elsewhere (the watermark log, say) nor
    // keep its constraints, and could hand out seqs that exist. Refused,
    // as refinery refuses it on Postgres.
    if applied < 0 || applied as usize > MIGRATIONS.len() {
        return Err(StoreError::Internal(format!(
            "the database is at schema V{applied}, newer than this build's V{}: \
             run a build at least as new",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let version = i + 1;
        conn.execute_batch(&format!(
            "BEGIN; {sql}; PRAGMA user_version = {version}; COMMIT;"
        ))
        .map_err(|e| StoreError::Internal(format!("migration V{version} failed: {e}")))?;
        tracing::info!(version, "applied SQLite migration");
    }
    Ok(())
}

fn internal(e: rusqlite::Error) -> StoreError {
    StoreError::Internal(e.to_string())
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

/// SQLite integers are signed. Ids and seqs never reach 2^63, but a
/// cursor from the network may: it saturates (past everything) rather than
/// wrapping to a negative number that would read as before everything.
fn sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn message_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<proto::Message> {
    let mut message = proto::Message {
        conversation_id: row.get::<_, i64>(0)? as u64,
        seq: row.get::<_, i64>(1)? as u64,
        message_id: row.get::<_, i64>(2)? as u64,
        sender_id: row.get::<_, i64>(3)? as u64,
        client_msg_id: row.get(4)?,
        r#type: row.get(5)?,
        sent_at_ms: row.get(6)?,
        text: row.get(7)?,
        photo: None,
        call: None,
        reply_to_seq: row.get::<_, Option<i64>>(9)?.unwrap_or_default() as u64,
        unsent: row.get(10)?,
    };
    crate::store::decode_attachment(&mut message, row.get_ref(8)?.as_blob_or_null()?);
    Ok(message)
}

/// The columns [`message_from_row`] reads, from `messages m`.
/// What user `?1` has to catch up on, per conversation: above their
/// delivered watermark, up to the last seq of a group they are in, or up
/// to the message that removed them from one (`departures`).
const READING_RANGES: &str = "
    SELECT mb.conversation_id,
           MAX(mb.delivered_seq,
               COALESCE((SELECT cleared_seq FROM cleared_histories
                         WHERE user_id = ?1 AND conversation_id = mb.conversation_id), 0))
               AS delivered_seq,
           c.last_seq AS upto,
           0 AS departed
    FROM members mb JOIN conversations c ON c.id = mb.conversation_id
    WHERE mb.user_id = ?1
    UNION ALL
    SELECT conversation_id, delivered_seq, seq, 1 FROM departures WHERE user_id = ?1";

/// `user`'s reading ranges with something pending, from conversation
/// `from` on, in (conversation, seq) order.
fn pending_ranges_from(
    conn: &Connection,
    user: UserId,
    from: ConversationId,
) -> Result<Vec<PendingRange>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT conversation_id, delivered_seq, upto, departed FROM ({READING_RANGES})
         WHERE upto > delivered_seq AND conversation_id >= ?2
         ORDER BY conversation_id, delivered_seq"
    ))
    .map_err(internal)?
    .query_map(params![sql(user), sql(from)], |r| {
        Ok(PendingRange {
            conversation_id: r.get::<_, i64>(0)? as u64,
            delivered_seq: r.get::<_, i64>(1)? as u64,
            last_seq: r.get::<_, i64>(2)? as u64,
            departed: r.get(3)?,
        })
    })
    .map_err(internal)?
    .collect::<rusqlite::Result<_>>()
    .map_err(internal)
}

const MESSAGE_COLUMNS: &str = concat!(
    "m.conversation_id, m.seq, m.message_id, m.sender_id, ",
    "m.client_msg_id, m.type, m.sent_at_ms, m.body, m.attachment, m.reply_to, m.unsent"
);

/// The message at `seq` of a conversation: its index entry from the pending
/// ones or the table, then the message by id.
fn message_at(
    conn: &Connection,
    state: &DbState,
    conversation_id: ConversationId,
    seq: u64,
) -> Result<Option<proto::Message>, StoreError> {
    let pending = state.index.get(&conversation_id).and_then(|entries| {
        entries
            .binary_search_by_key(&seq, |&(s, _)| s)
            .ok()
            .map(|i| entries[i].1)
    });
    let message_id = match pending {
        Some(id) => Some(sql(id)),
        None => conn
            .prepare_cached(
                "SELECT message_id FROM message_index WHERE conversation_id = ?1 AND seq = ?2",
            )
            .map_err(internal)?
            .query_row(params![sql(conversation_id), sql(seq)], |r| r.get(0))
            .optional()
            .map_err(internal)?,
    };
    let Some(message_id) = message_id else {
        return Ok(None);
    };
    conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.message_id = ?1"
    ))
    .map_err(internal)?
    .query_row([message_id], message_from_row)
    .optional()
    .map_err(internal)
}

fn members_of(conn: &Connection, conversation_id: ConversationId) -> rusqlite::Result<Vec<UserId>> {
    let mut stmt = conn.prepare_cached(
        "SELECT user_id FROM members WHERE conversation_id = ?1 ORDER BY user_id",
    )?;
    let rows = stmt.query_map([sql(conversation_id)], |r| r.get::<_, i64>(0))?;
    rows.map(|r| r.map(|v| v as u64)).collect()
}

fn member_states(
    conn: &Connection,
    conversation_id: ConversationId,
) -> rusqlite::Result<Vec<MemberState>> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.user_id, u.username, m.delivered_seq, m.seen_seq, m.role, m.joined_seq
         FROM members m JOIN users u ON u.id = m.user_id
         WHERE m.conversation_id = ?1 ORDER BY m.user_id",
    )?;
    let rows = stmt.query_map([sql(conversation_id)], |r| {
        Ok(MemberState {
            user_id: r.get::<_, i64>(0)? as u64,
            username: r.get(1)?,
            delivered_seq: r.get::<_, i64>(2)? as u64,
            seen_seq: r.get::<_, i64>(3)? as u64,
            admin: r.get::<_, i64>(4)? == ROLE_ADMIN,
            joined_seq: r.get::<_, i64>(5)? as u64,
        })
    })?;
    rows.collect()
}

fn view(
    conn: &Connection,
    state: &DbState,
    conversation_id: ConversationId,
    viewer: UserId,
) -> Result<ConversationView, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT c.kind, c.name, c.last_seq, c.last_activity_ms, m.seen_seq,
                    (SELECT until_ms FROM mutes WHERE user_id = ?2 AND conversation_id = ?1),
                    COALESCE((SELECT cleared_seq FROM cleared_histories
                              WHERE user_id = ?2 AND conversation_id = ?1), 0)
             FROM conversations c JOIN members m ON m.conversation_id = c.id
             WHERE c.id = ?1 AND m.user_id = ?2",
        )
        .map_err(internal)?
        .query_row(params![sql(conversation_id), sql(viewer)], |r| {
            Ok((
                r.get::<_, i32>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)? as u64,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, i64>(6)? as u64,
            ))
        })
        .optional()
        .map_err(internal)?;
    let Some((kind, name, last_seq, last_activity_ms, seen_seq, muted_until_ms, cleared)) = row
    else {
        return Err(StoreError::NotAMember);
    };
    // What they deleted is neither their last message nor unread.
    let last_message = match last_seq > cleared {
        true => list_line(conn, state, conversation_id, last_seq)?,
        false => None,
    };
    let seen_seq = seen_seq.max(cleared);
    // Counted up to the cap: past it, each view would read the backlog.
    let unread_count: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM (
                 SELECT 1 FROM message_index i JOIN messages m ON m.message_id = i.message_id AND m.conversation_id = i.conversation_id
                 WHERE i.conversation_id = ?1 AND i.seq > ?2 AND m.sender_id != ?3
                   AND m.type NOT IN (5, 6, 7) -- MESSAGE_TYPE_REACTION, _EDIT, _UNSEND
                   AND NOT m.unsent
                 LIMIT ?4)",
        )
        .map_err(internal)?
        .query_row(
            params![
                sql(conversation_id),
                sql(seen_seq),
                sql(viewer),
                sql(chat_protocol::limits::MAX_UNREAD_COUNT)
            ],
            |r| r.get(0),
        )
        .map_err(internal)?;
    let kind = proto::ConversationKind::try_from(kind).unwrap_or_default();
    let members = member_states(conn, conversation_id).map_err(internal)?;
    let closed = match members.iter().find(|m| m.user_id != viewer) {
        Some(other) if kind == proto::ConversationKind::Direct => {
            !are_friends(conn, viewer, other.user_id)?
        }
        _ => false,
    };
    Ok(ConversationView {
        id: conversation_id,
        kind,
        name,
        members,
        last_seq,
        last_activity_ms,
        last_message,
        unread_count: unread_count as u64,
        closed,
        muted_until_ms: muted_until_ms.unwrap_or_default(),
        former: false,
    })
}

/// The message at `seq` as a list entry shows it, its text cut.
fn list_line(
    conn: &Connection,
    state: &DbState,
    conversation_id: ConversationId,
    seq: u64,
) -> Result<Option<proto::Message>, StoreError> {
    if seq == 0 {
        return Ok(None);
    }
    Ok(message_at(conn, state, conversation_id, seq)?.map(|mut m| {
        if let Some((cut, _)) = m.text.char_indices().nth(PREVIEW_CHARS) {
            m.text.truncate(cut);
        }
        m
    }))
}

/// The list entry of a group `viewer` left or was removed from, as of
/// their last stay's end ([`ConversationView::former`]).
fn former_view(
    conn: &Connection,
    state: &DbState,
    conversation_id: ConversationId,
    viewer: UserId,
) -> Result<ConversationView, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT c.kind, f.name, f.left_seq, f.left_ms
             FROM former_members f JOIN conversations c ON c.id = f.conversation_id
             WHERE f.user_id = ?2 AND f.conversation_id = ?1
             ORDER BY f.joined_seq DESC LIMIT 1",
        )
        .map_err(internal)?
        .query_row(params![sql(conversation_id), sql(viewer)], |r| {
            Ok((
                r.get::<_, i32>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, i64>(3)?,
            ))
        })
        .optional()
        .map_err(internal)?;
    let Some((kind, name, left_seq, left_ms)) = row else {
        return Err(StoreError::NotAMember);
    };
    Ok(ConversationView {
        id: conversation_id,
        kind: proto::ConversationKind::try_from(kind).unwrap_or_default(),
        name,
        members: Vec::new(),
        last_seq: left_seq,
        last_activity_ms: left_ms,
        last_message: list_line(conn, state, conversation_id, left_seq)?,
        unread_count: 0,
        closed: false,
        muted_until_ms: 0,
        former: true,
    })
}

/// Member roles in the `members.role` column.
const ROLE_MEMBER: i64 = 0;
const ROLE_ADMIN: i64 = 1;

fn username_of(conn: &Connection, user: UserId) -> Result<Option<String>, StoreError> {
    conn.prepare_cached("SELECT username FROM users WHERE id = ?1")
        .map_err(internal)?
        .query_row([sql(user)], |r| r.get(0))
        .optional()
        .map_err(internal)
}

fn role_of(
    conn: &Connection,
    conversation_id: ConversationId,
    user: UserId,
) -> Result<Option<i64>, StoreError> {
    conn.prepare_cached("SELECT role FROM members WHERE conversation_id = ?1 AND user_id = ?2")
        .map_err(internal)?
        .query_row(params![sql(conversation_id), sql(user)], |r| r.get(0))
        .optional()
        .map_err(internal)
}

/// Adds a member who reads from `joined_seq` on (0: everything): their
/// watermarks start just below it, so the message that added them is the
/// first one they receive.
fn add_member(
    conn: &Connection,
    conversation_id: ConversationId,
    user: UserId,
    role: i64,
    joined_seq: u64,
) -> Result<(), StoreError> {
    let below = joined_seq.saturating_sub(1);
    conn.prepare_cached(
        "INSERT INTO members (conversation_id, user_id, role, joined_seq, delivered_seq, seen_seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
    )
    .map_err(internal)?
    .execute(params![
        sql(conversation_id),
        sql(user),
        role,
        sql(joined_seq),
        sql(below)
    ])
    .map_err(internal)?;
    // Rejoining: what they missed while away is not theirs to catch up on.
    conn.prepare_cached("DELETE FROM departures WHERE user_id = ?1 AND conversation_id = ?2")
        .map_err(internal)?
        .execute(params![sql(user), sql(conversation_id)])
        .map_err(internal)?;
    Ok(())
}

/// Remembers that `user` was removed by message `seq` while their delivered
/// watermark stood at `delivered`, until their device acknowledges it.
fn note_departure(
    conn: &Connection,
    conversation_id: ConversationId,
    user: UserId,
    delivered: u64,
    seq: u64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO departures (user_id, conversation_id, delivered_seq, seq)
         VALUES (?1, ?2, ?3, ?4)",
    )
    .map_err(internal)?
    .execute(params![
        sql(user),
        sql(conversation_id),
        sql(delivered),
        sql(seq)
    ])
    .map_err(internal)?;
    Ok(())
}

/// A removed member's device acknowledged up to `seq`: the departure moves
/// forward, and is gone once the removal itself is acknowledged.
fn ack_departure(
    conn: &Connection,
    conversation_id: ConversationId,
    user: UserId,
    seq: u64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "DELETE FROM departures WHERE user_id = ?1 AND conversation_id = ?2 AND seq <= ?3",
    )
    .map_err(internal)?
    .execute(params![sql(user), sql(conversation_id), sql(seq)])
    .map_err(internal)?;
    conn.prepare_cached(
        "UPDATE departures SET delivered_seq = MAX(delivered_seq, ?3)
         WHERE user_id = ?1 AND conversation_id = ?2",
    )
    .map_err(internal)?
    .execute(params![sql(user), sql(conversation_id), sql(seq)])
    .map_err(internal)?;
    Ok(())
}

/// A removed member keeps no watermarks and gets no deliveries (history
/// reads their stay through [`note_former_member`]'s record); returns
/// where their membership began (`None` if they were no member).
fn remove_member(
    conn: &Connection,
    conversation_id: ConversationId,
    user: UserId,
) -> Result<Option<u64>, StoreError> {
    // A mute ends with the membership: one added back starts unmuted.
    conn.prepare_cached("DELETE FROM mutes WHERE user_id = ?1 AND conversation_id = ?2")
        .map_err(internal)?
        .execute(params![sql(user), sql(conversation_id)])
        .map_err(internal)?;
    conn.prepare_cached(
        "DELETE FROM members WHERE conversation_id = ?1 AND user_id = ?2 RETURNING joined_seq",
    )
    .map_err(internal)?
    .query_row(params![sql(conversation_id), sql(user)], |r| {
        r.get::<_, i64>(0)
    })
    .optional()
    .map(|joined| joined.map(|j| j as u64))
    .map_err(internal)
}

/// Records the range of seqs a membership that message `left` (sent at
/// `left_ms`) ended could read, which keeps the photos of those messages
/// fetchable by it, and the group's name then, which its list entry shows,
/// at the conversation's activity then (never earlier than what its
/// member entry showed, whatever the clock did).
fn note_former_member(
    conn: &Connection,
    conversation_id: ConversationId,
    user: UserId,
    joined: u64,
    (left, left_ms): (u64, i64),
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO former_members (user_id, conversation_id, joined_seq, left_seq, left_ms, name)
         SELECT ?1, ?2, ?3, ?4, MAX(?5, last_activity_ms), name FROM conversations WHERE id = ?2
         ON CONFLICT (user_id, conversation_id, joined_seq) DO UPDATE
             SET left_seq = excluded.left_seq, left_ms = excluded.left_ms, name = excluded.name
             WHERE excluded.left_seq > left_seq",
    )
    .map_err(internal)?
    .execute(params![
        sql(user),
        sql(conversation_id),
        sql(joined),
        sql(left),
        left_ms
    ])
    .map_err(internal)?;
    Ok(())
}

/// A SYSTEM message written by the server on behalf of `actor`, stored
/// under the actor's key for the change it records, or under a random one.
fn system_message(
    conversation_id: ConversationId,
    actor: UserId,
    key: Option<String>,
    text: String,
    now_ms: i64,
) -> NewMessage {
    NewMessage {
        conversation_id,
        sender_id: actor,
        client_msg_id: key.unwrap_or_else(super::random_system_key),
        message_type: proto::MessageType::System,
        text,
        photo: None,
        call: None,
        reply_to_seq: 0,
        notify_only: None,
        now_ms,
    }
}

/// The change `actor` made before under `key`, as a duplicate result: the
/// SYSTEM message recording it must belong to this group, or the key is
/// refused as used for something else.
fn repeated_edit(
    conn: &Connection,
    state: &mut DbState,
    conversation_id: ConversationId,
    actor: UserId,
    key: &str,
) -> Result<Option<Appended>, StoreError> {
    // Without every key, a repeat could not be told from a new change.
    if state.needs_repair {
        return Err(StoreError::Unavailable(
            "heads and idempotency keys are being rebuilt".into(),
        ));
    }
    let Some(first) = stored_original(conn, state, actor, key)? else {
        return Ok(None);
    };
    super::check_repeated_edit(&first, conversation_id)?;
    Ok(Some(first))
}

/// The message already stored under (`sender`, `client_msg_id`), as a
/// duplicate append result.
fn stored_original(
    conn: &Connection,
    state: &mut DbState,
    sender: UserId,
    client_msg_id: &str,
) -> Result<Option<Appended>, StoreError> {
    let Some((conversation_id, seq)) = state.stored_key(conn, sender, client_msg_id)? else {
        return Ok(None);
    };
    let original = message_at(conn, state, conversation_id, seq)?
        .ok_or_else(|| StoreError::Internal("idempotency key without its message".into()))?;
    let members = match state.conversation(conn, original.conversation_id)? {
        Some(c) => c.members.to_vec(),
        None => Vec::new(),
    };
    // Only the others still owed it.
    let mut owed = Vec::with_capacity(members.len());
    for member in members {
        if member != sender
            && state
                .watermark(conn, conversation_id, member)?
                .is_some_and(|(delivered, _)| delivered < seq)
        {
            owed.push(member);
        }
    }
    // And those removed since (or by it) who were not told yet: the
    // repeat of a removal whose first answer was lost before its fan-out
    // is how the removed member's connected device hears of it.
    let mut departed = conn
        .prepare_cached(
            "SELECT user_id FROM departures
             WHERE conversation_id = ?1 AND seq >= ?2 AND delivered_seq < ?2 AND user_id <> ?3",
        )
        .map_err(internal)?;
    let rows = departed
        .query_map(params![sql(conversation_id), sql(seq), sql(sender)], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(internal)?;
    for user in rows {
        owed.push(user.map_err(internal)? as u64);
    }
    Ok(Some(Appended {
        message: Arc::new(original),
        duplicate: true,
        members: owed,
    }))
}

/// Erases an unsent message, its edits and its photo's binding to it (see
/// [`HistoryStore::append`]), in the UNSEND's transaction, with
/// `secure_delete` on: what the rewrite frees (the old bytes in the row's
/// page, and the overflow pages of a long text or a photo's preview, on
/// the freelist) is zeroed, not left in the file. `FAST` otherwise
/// (zeroing only where it costs no I/O): zeroing every page the
/// write-behind frees would cost writes.
fn erase(conn: &Connection, target: &proto::Message) -> Result<(), StoreError> {
    // It answers with the new setting: not a statement `exec` takes.
    let set = |mode| conn.execute_batch(mode).map_err(internal);
    set("PRAGMA secure_delete = ON")?;
    let erased = erase_rows(conn, target);
    let restored = set("PRAGMA secure_delete = FAST");
    erased.and(restored)
}

fn erase_rows(conn: &Connection, target: &proto::Message) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE messages SET body = '', attachment = NULL, unsent = 1 WHERE message_id = ?1",
    )
    .map_err(internal)?
    .execute([sql(target.message_id)])
    .map_err(internal)?;
    // By the partial index of edits.
    conn.prepare_cached(
        "UPDATE messages SET body = '', unsent = 1
         WHERE conversation_id = ?1 AND reply_to = ?2 AND type = 6 -- MESSAGE_TYPE_EDIT",
    )
    .map_err(internal)?
    .execute(params![sql(target.conversation_id), sql(target.seq)])
    .map_err(internal)?;
    if let Some(photo) = &target.photo {
        conn.prepare_cached("UPDATE media SET seq = NULL WHERE media_id = ?1 AND seq = ?2")
            .map_err(internal)?
            .execute(params![photo.media_id, sql(target.seq)])
            .map_err(internal)?;
    }
    Ok(())
}

/// Appends one message. `system` skips the sender's membership check (a
/// member who just left still authors "left the group").
fn append_one(
    conn: &Connection,
    state: &mut DbState,
    m: NewMessage,
    system: bool,
) -> Result<Appended, StoreError> {
    // Without every key, a retry could not be told from a new message.
    if state.needs_repair {
        return Err(StoreError::Unavailable(
            "heads and idempotency keys are being rebuilt".into(),
        ));
    }
    let admitted = match state.conversation(conn, m.conversation_id)? {
        Some(c) if system || (c.open && c.members.binary_search(&m.sender_id).is_ok()) => {
            Ok((c.members.clone(), c.last_seq + 1))
        }
        Some(c) if c.members.binary_search(&m.sender_id).is_ok() => {
            let other = c.members.iter().copied().find(|&u| u != m.sender_id);
            Err(StoreError::NotFriends(other.unwrap_or(m.sender_id)))
        }
        _ => Err(StoreError::NotAMember),
    };
    let (members, seq) = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => {
            // A retry of a message stored before the sender left or was
            // removed, or before the friendship ended, still gets its
            // original ack.
            return match stored_original(conn, state, m.sender_id, &m.client_msg_id)? {
                Some(original) => crate::store::check_retry(original, &m),
                None => Err(refusal),
            };
        }
    };

    // A retry gets the original (the pending keys, then one read of the
    // idempotency table). The common path is that read, one insert and one
    // update by primary key.
    if let Some(original) = stored_original(conn, state, m.sender_id, &m.client_msg_id)? {
        return crate::store::check_retry(original, &m);
    }
    if matches!(
        m.message_type,
        proto::MessageType::Edit | proto::MessageType::Unsend
    ) {
        // Checked by the caller before, but an unsend may have come between
        // (and the author, again: the caller's check is not this write).
        let target = message_at(conn, state, m.conversation_id, m.reply_to_seq)?;
        if target
            .as_ref()
            .is_none_or(|t| t.unsent || !crate::store::may_rewrite(&m, t.sender_id, t.r#type))
        {
            return Err(StoreError::NotFound);
        }
        if let Some(target) = target.filter(|_| m.message_type == proto::MessageType::Unsend) {
            erase(conn, &target)?;
        }
    }
    let message_id = state.next_message_id;
    // The upload is the photo of a stored message from here on (in this
    // transaction: rolled back, it stays unsent, for the purge). First, so
    // that a failure leaves nothing of the message written.
    if let Some(photo) = &m.photo {
        conn.prepare_cached("UPDATE media SET seq = ?2 WHERE media_id = ?1")
            .map_err(internal)?
            .execute(params![photo.media_id, sql(seq)])
            .map_err(internal)?;
    }
    conn.prepare_cached(
        "INSERT INTO messages (conversation_id, seq, message_id, sender_id, client_msg_id, type, sent_at_ms, body, attachment, reply_to)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .map_err(internal)?
        .execute(params![
            sql(m.conversation_id),
            sql(seq),
            sql(message_id),
            sql(m.sender_id),
            m.client_msg_id,
            m.message_type as i32,
            m.now_ms,
            m.text,
            crate::store::encode_attachment(&m),
            (m.reply_to_seq != 0).then(|| sql(m.reply_to_seq)),
        ])
        .map_err(internal)?;
    state.keys.entry(m.sender_id).or_default().insert(
        m.client_msg_id.clone(),
        PendingKey {
            conversation_id: m.conversation_id,
            seq,
            message_id,
        },
    );
    state
        .index
        .entry(m.conversation_id)
        .or_default()
        .push((seq, message_id));
    state.note_head(
        m.conversation_id,
        Head {
            last_seq: seq,
            at_ms: m.now_ms,
        },
    );
    state.next_message_id += 1;
    if let Some(c) = state.conversations.get_mut(&m.conversation_id) {
        c.last_seq = seq;
    }
    // A sender who had received everything before their own message has,
    // trivially, received and seen their own message too. Moving the
    // watermarks only in that case never claims a delivery that did not
    // happen, and keeps catch-up queries from rescanning own messages.
    if let Some((delivered, seen)) = state.watermark(conn, m.conversation_id, m.sender_id)? {
        let caught_up = |at: u64| if at + 1 == seq { seq } else { at };
        let to = (caught_up(delivered), caught_up(seen));
        if to != (delivered, seen) {
            state.move_watermark(conn, m.conversation_id, m.sender_id, to)?;
        }
    }
    Ok(Appended {
        message: Arc::new(proto::Message {
            conversation_id: m.conversation_id,
            seq,
            message_id,
            sender_id: m.sender_id,
            client_msg_id: m.client_msg_id,
            r#type: m.message_type as i32,
            sent_at_ms: m.now_ms,
            text: m.text,
            photo: m.photo,
            call: m.call,
            reply_to_seq: m.reply_to_seq,
            unsent: false,
        }),
        duplicate: false,
        members: members.to_vec(),
    })
}

#[async_trait]
impl HistoryStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn create_user(
        &self,
        username: String,
        password_hash: String,
        now_ms: i64,
    ) -> Result<UserId, StoreError> {
        self.call(move |conn, _| {
            let result = conn
                .prepare_cached(
                    "INSERT INTO users (username, password_hash, created_at_ms) VALUES (?1, ?2, ?3)",
                )
                .map_err(internal)?
                .execute(params![username, password_hash, now_ms]);
            match result {
                Ok(_) => Ok(conn.last_insert_rowid() as u64),
                Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict),
                Err(e) => Err(internal(e)),
            }
        })
        .await
    }

    async fn user_by_name(&self, username: String) -> Result<Option<UserRecord>, StoreError> {
        self.call(move |conn, _| {
            conn.prepare_cached("SELECT id, username, password_hash FROM users WHERE username = ?1")
                .map_err(internal)?
                .query_row([username], |r| {
                    Ok(UserRecord {
                        id: r.get::<_, i64>(0)? as u64,
                        username: r.get(1)?,
                        password_hash: r.get(2)?,
                    })
                })
                .optional()
                .map_err(internal)
        })
        .await
    }

    fn broken(&self) -> Option<String> {
        let thread = self.thread.lock().expect("thread lock");
        thread
            .as_ref()
            .is_some_and(JoinHandle::is_finished)
            .then(|| "the store thread stopped".to_owned())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call(|conn, _| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(drop)
                .map_err(internal)
        })
        .await
    }

    async fn history_id(&self) -> Result<String, StoreError> {
        self.call(|conn, _| {
            conn.query_row("SELECT id FROM history_identity", [], |r| r.get(0))
                .map_err(internal)
        })
        .await
    }

    async fn username(&self, user_id: UserId) -> Result<Option<String>, StoreError> {
        // Users are not written behind: nothing pending to write first.
        self.call_hot(move |conn, _| {
            conn.prepare_cached("SELECT username FROM users WHERE id = ?1")
                .map_err(internal)?
                .query_row([sql(user_id)], |r| r.get(0))
                .optional()
                .map_err(internal)
        })
        .await
    }

    async fn create_session(&self, s: NewSession) -> Result<(), StoreError> {
        self.call(move |conn, _| insert_session(conn, &s)).await
    }

    async fn session(&self, token_hash: [u8; 32]) -> Result<Option<SessionRecord>, StoreError> {
        self.call(move |conn, _| {
            conn.prepare_cached(
                "SELECT user_id, expires_at_ms, revoked_at_ms FROM sessions WHERE token_hash = ?1",
            )
            .map_err(internal)?
            .query_row([&token_hash[..]], |r| {
                Ok(SessionRecord {
                    user_id: r.get::<_, i64>(0)? as u64,
                    expires_at_ms: r.get(1)?,
                    revoked_at_ms: r.get(2)?,
                })
            })
            .optional()
            .map_err(internal)
        })
        .await
    }

    async fn revoke_session(&self, token_hash: [u8; 32], now_ms: i64) -> Result<bool, StoreError> {
        self.call(move |conn, _| {
            let n = conn
                .prepare_cached(
                    "UPDATE sessions SET revoked_at_ms = ?2
                     WHERE token_hash = ?1 AND revoked_at_ms IS NULL",
                )
                .map_err(internal)?
                .execute(params![&token_hash[..], now_ms])
                .map_err(internal)?;
            Ok(n > 0)
        })
        .await
    }

    async fn live_sessions(
        &self,
        user: UserId,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<NewSession>, StoreError> {
        self.call(move |conn, _| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT token_hash, device_name, created_at_ms, expires_at_ms FROM sessions
                     WHERE user_id = ?1 AND revoked_at_ms IS NULL AND expires_at_ms > ?2
                     ORDER BY created_at_ms DESC, token_hash LIMIT ?3",
                )
                .map_err(internal)?;
            let rows = stmt
                .query_map(params![sql(user), now_ms, limit], |r| {
                    let hash: Vec<u8> = r.get(0)?;
                    Ok(NewSession {
                        token_hash: hash.try_into().unwrap_or([0; 32]),
                        user_id: user,
                        device_name: r.get(1)?,
                        created_at_ms: r.get(2)?,
                        expires_at_ms: r.get(3)?,
                    })
                })
                .map_err(internal)?;
            rows.collect::<rusqlite::Result<_>>().map_err(internal)
        })
        .await
    }

    async fn create_login_session(
        &self,
        s: NewSession,
        verified: String,
    ) -> Result<(), StoreError> {
        // One job on the store thread: no password change falls between
        // the check and the insert.
        self.call(move |conn, _| {
            let current: Option<String> = conn
                .prepare_cached("SELECT password_hash FROM users WHERE id = ?1")
                .map_err(internal)?
                .query_row([sql(s.user_id)], |r| r.get(0))
                .optional()
                .map_err(internal)?;
            if current.as_deref() != Some(verified.as_str()) {
                return Err(StoreError::Conflict);
            }
            insert_session(conn, &s)
        })
        .await
    }

    async fn revoke_session_by_id(
        &self,
        user: UserId,
        id: Vec<u8>,
        now_ms: i64,
    ) -> Result<Option<[u8; 32]>, StoreError> {
        self.call(move |conn, _| {
            conn.prepare_cached(
                "UPDATE sessions SET revoked_at_ms = ?3
                 WHERE user_id = ?1 AND substr(token_hash, 1, length(?2)) = ?2
                   AND revoked_at_ms IS NULL AND expires_at_ms > ?3
                 RETURNING token_hash",
            )
            .map_err(internal)?
            .query_row(params![sql(user), id, now_ms], |r| r.get::<_, Vec<u8>>(0))
            .optional()
            .map(|hash| hash.map(|h| h.try_into().unwrap_or([0; 32])))
            .map_err(internal)
        })
        .await
    }

    async fn change_password(
        &self,
        user: UserId,
        old: String,
        new: String,
        keep: [u8; 32],
        now_ms: i64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        self.call(move |conn, _| {
            let changed = conn
                .prepare_cached(
                    "UPDATE users SET password_hash = ?3 WHERE id = ?1 AND password_hash = ?2",
                )
                .map_err(internal)?
                .execute(params![sql(user), old, new])
                .map_err(internal)?;
            if changed == 0 {
                return Err(StoreError::Conflict);
            }
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE sessions SET revoked_at_ms = ?3
                     WHERE user_id = ?1 AND token_hash <> ?2
                       AND revoked_at_ms IS NULL AND expires_at_ms > ?3
                     RETURNING token_hash",
                )
                .map_err(internal)?;
            let rows = stmt
                .query_map(params![sql(user), &keep[..], now_ms], |r| {
                    let hash: Vec<u8> = r.get(0)?;
                    Ok(hash.try_into().unwrap_or([0; 32]))
                })
                .map_err(internal)?;
            rows.collect::<rusqlite::Result<_>>().map_err(internal)
        })
        .await
    }

    async fn purge_sessions(&self, ended_before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.call(move |conn, _| {
            let mut deleted = 0;
            // One statement per index, each bounded, so a backlog is
            // deleted in short turns on the store thread.
            for ended in ["expires_at_ms", "revoked_at_ms"] {
                let left = u64::from(limit) - deleted;
                if left == 0 {
                    break;
                }
                deleted += conn
                    .prepare_cached(&format!(
                        "DELETE FROM sessions WHERE token_hash IN
                         (SELECT token_hash FROM sessions WHERE {ended} < ?1 LIMIT ?2)"
                    ))
                    .map_err(internal)?
                    .execute(params![ended_before_ms, left as i64])
                    .map_err(internal)? as u64;
            }
            Ok(deleted)
        })
        .await
    }

    async fn friend_request_within(
        &self,
        from: UserId,
        to: UserId,
        now_ms: i64,
        max_friends: u64,
    ) -> Result<FriendRequestOutcome, StoreError> {
        self.call(move |conn, state| {
            if blocks(conn, from, to)? {
                return Ok(FriendRequestOutcome::Blocked);
            }
            if blocks(conn, to, from)? {
                return Ok(FriendRequestOutcome::BlockedBy);
            }
            if are_friends(conn, from, to)? {
                return Ok(FriendRequestOutcome::AlreadyFriends);
            }
            // One writer: what is counted here is what is written.
            if request_waiting(conn, from, to)? {
                return Ok(FriendRequestOutcome::AlreadyRequested);
            }
            let mine = friend_counts(conn, from)?;
            if mine.friends + mine.outgoing >= max_friends {
                return Ok(FriendRequestOutcome::AskerFull);
            }
            if take_request(conn, to, from)? {
                make_friends(conn, from, to, now_ms)?;
                state.forget_direct(conn, from, to)?;
                return Ok(FriendRequestOutcome::Accepted);
            }
            if friend_counts(conn, to)?.incoming >= max_friends {
                return Ok(FriendRequestOutcome::TargetFull);
            }
            conn.prepare_cached(
                "INSERT INTO friend_requests (from_id, to_id, created_at_ms) VALUES (?1, ?2, ?3)",
            )
            .map_err(internal)?
            .execute(params![sql(from), sql(to), now_ms])
            .map_err(internal)?;
            Ok(FriendRequestOutcome::Requested)
        })
        .await
    }

    async fn friend_accept_within(
        &self,
        user: UserId,
        from: UserId,
        now_ms: i64,
        max_friends: u64,
    ) -> Result<bool, StoreError> {
        self.call(move |conn, state| {
            if !request_waiting(conn, from, user)? {
                return Err(StoreError::NotFound);
            }
            // One writer: what is counted here is what is written.
            let mine = friend_counts(conn, user)?;
            if mine.friends + mine.outgoing >= max_friends {
                return Ok(false);
            }
            take_request(conn, from, user)?;
            make_friends(conn, user, from, now_ms)?;
            state.forget_direct(conn, user, from)?;
            Ok(true)
        })
        .await
    }

    async fn friend_decline(&self, user: UserId, from: UserId) -> Result<bool, StoreError> {
        self.call(move |conn, _| take_request(conn, from, user))
            .await
    }

    async fn friend_remove(&self, user: UserId, other: UserId) -> Result<bool, StoreError> {
        self.call(move |conn, state| end_friendship(conn, state, user, other))
            .await
    }

    async fn block(
        &self,
        user: UserId,
        other: UserId,
        now_ms: i64,
        max_blocked: u64,
    ) -> Result<BlockOutcome, StoreError> {
        self.call(move |conn, state| {
            // Refused before anything is written (see the module docs).
            let exists: bool = conn
                .prepare_cached("SELECT EXISTS(SELECT 1 FROM users WHERE id = ?1)")
                .map_err(internal)?
                .query_row([sql(other)], |r| r.get(0))
                .map_err(internal)?;
            if !exists {
                return Err(StoreError::NotFound);
            }
            // One writer: what is counted here is what is written.
            if blocks(conn, user, other)? {
                return Ok(BlockOutcome::AlreadyBlocked);
            }
            let count: i64 = conn
                .prepare_cached("SELECT count(*) FROM blocks WHERE user_id = ?1")
                .map_err(internal)?
                .query_row([sql(user)], |r| r.get(0))
                .map_err(internal)?;
            if count as u64 >= max_blocked {
                return Ok(BlockOutcome::Full);
            }
            let ended = end_friendship(conn, state, user, other)?;
            conn.prepare_cached(
                "INSERT INTO blocks (user_id, blocked_id, since_ms) VALUES (?1, ?2, ?3)",
            )
            .map_err(internal)?
            .execute(params![sql(user), sql(other), now_ms])
            .map_err(internal)?;
            Ok(BlockOutcome::Blocked { ended })
        })
        .await
    }

    async fn unblock(&self, user: UserId, other: UserId) -> Result<bool, StoreError> {
        self.call(move |conn, _| {
            let n = conn
                .prepare_cached("DELETE FROM blocks WHERE user_id = ?1 AND blocked_id = ?2")
                .map_err(internal)?
                .execute(params![sql(user), sql(other)])
                .map_err(internal)?;
            Ok(n > 0)
        })
        .await
    }

    async fn friends(&self, user: UserId) -> Result<FriendLists, StoreError> {
        self.call(move |conn, _| {
            let list = |query: &str| -> Result<Vec<(UserId, String)>, StoreError> {
                let mut stmt = conn.prepare_cached(query).map_err(internal)?;
                let rows = stmt
                    .query_map([sql(user)], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
                    .map_err(internal)?;
                rows.collect::<rusqlite::Result<_>>().map_err(internal)
            };
            Ok(FriendLists {
                friends: list(
                    "SELECT u.id, u.username FROM friends f JOIN users u ON u.id = f.friend_id
                     WHERE f.user_id = ?1 ORDER BY u.username",
                )?,
                incoming: list(
                    "SELECT u.id, u.username FROM friend_requests r JOIN users u ON u.id = r.from_id
                     WHERE r.to_id = ?1 ORDER BY r.created_at_ms, u.id",
                )?,
                outgoing: list(
                    "SELECT u.id, u.username FROM friend_requests r JOIN users u ON u.id = r.to_id
                     WHERE r.from_id = ?1 ORDER BY r.created_at_ms, u.id",
                )?,
                blocked: list(
                    "SELECT u.id, u.username FROM blocks b JOIN users u ON u.id = b.blocked_id
                     WHERE b.user_id = ?1 ORDER BY u.username",
                )?,
            })
        })
        .await
    }

    async fn are_friends(&self, a: UserId, b: UserId) -> Result<bool, StoreError> {
        self.call(move |conn, _| are_friends(conn, a, b)).await
    }

    async fn friend_counts(&self, user: UserId) -> Result<FriendCounts, StoreError> {
        self.call(move |conn, _| friend_counts(conn, user)).await
    }

    async fn open_direct(
        &self,
        a: UserId,
        b: UserId,
        now_ms: i64,
    ) -> Result<ConversationId, StoreError> {
        self.call(move |conn, _| {
            let key = direct_key(a, b);
            let existing: Option<i64> = conn
                .prepare_cached("SELECT id FROM conversations WHERE direct_key = ?1")
                .map_err(internal)?
                .query_row([&key], |r| r.get(0))
                .optional()
                .map_err(internal)?;
            if let Some(id) = existing {
                return Ok(id as u64);
            }
            conn.prepare_cached(
                "INSERT INTO conversations (kind, name, direct_key, created_at_ms, last_activity_ms)
                 VALUES (?1, '', ?2, ?3, ?3)",
            )
            .map_err(internal)?
            .execute(params![proto::ConversationKind::Direct as i32, key, now_ms])
            .map_err(internal)?;
            let id = conn.last_insert_rowid();
            let mut add = conn
                .prepare_cached(
                    "INSERT INTO members (conversation_id, user_id, role, joined_seq, delivered_seq, seen_seq)
                     VALUES (?1, ?2, 0, 0, 0, 0)",
                )
                .map_err(internal)?;
            for user in [a, b] {
                add.execute(params![id, sql(user)]).map_err(internal)?;
            }
            Ok(id as u64)
        })
        .await
    }

    async fn conversation(
        &self,
        conversation_id: ConversationId,
        viewer: UserId,
    ) -> Result<ConversationView, StoreError> {
        self.call(move |conn, state| view(conn, state, conversation_id, viewer))
            .await
    }

    async fn conversations(
        &self,
        user: UserId,
        (before_ms, before_id): (i64, ConversationId),
        limit: u32,
    ) -> Result<Vec<ConversationView>, StoreError> {
        self.call(move |conn, state| {
            // (0, 0) is the first page; (0, id) follows an entry of time 0 (a
            // stay ended before its time was recorded, with no message).
            let before = if before_ms <= 0 && before_id == 0 {
                i64::MAX
            } else {
                before_ms
            };
            let chosen: Vec<(i64, bool)> = {
                let mut stmt = conn.prepare_cached(LIST_CONVERSATIONS).map_err(internal)?;
                let rows = stmt
                    .query_map(params![sql(user), before, limit, sql(before_id)], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .map_err(internal)?;
                rows.collect::<rusqlite::Result<_>>().map_err(internal)?
            };
            chosen
                .into_iter()
                .map(|(id, former)| {
                    if former {
                        former_view(conn, state, id as u64, user)
                    } else {
                        view(conn, state, id as u64, user)
                    }
                })
                .collect()
        })
        .await
    }

    async fn is_member(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<bool, StoreError> {
        self.call(move |conn, _| {
            conn.prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM members WHERE conversation_id = ?1 AND user_id = ?2)",
            )
            .map_err(internal)?
            .query_row(params![sql(conversation_id), sql(user)], |r| r.get(0))
            .map_err(internal)
        })
        .await
    }

    async fn delete_conversation(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        up_to_seq: u64,
    ) -> Result<u64, StoreError> {
        // A plain call: the heads are written first, so last_seq is whole.
        self.call(move |conn, _| {
            let member: Option<(i32, i64)> = conn
                .prepare_cached(
                    "SELECT c.kind, c.last_seq FROM members m JOIN conversations c ON c.id = m.conversation_id
                     WHERE m.conversation_id = ?1 AND m.user_id = ?2",
                )
                .map_err(internal)?
                .query_row(params![sql(conversation_id), sql(user)], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .map_err(internal)?;
            match member {
                Some((kind, last_seq)) if kind == proto::ConversationKind::Direct as i32 => {
                    let cleared = sql(up_to_seq).min(last_seq);
                    conn.prepare_cached(
                        "INSERT INTO cleared_histories (user_id, conversation_id, cleared_seq)
                         VALUES (?1, ?2, ?3)
                         ON CONFLICT (user_id, conversation_id)
                         DO UPDATE SET cleared_seq = MAX(cleared_seq, excluded.cleared_seq)",
                    )
                    .map_err(internal)?
                    .execute(params![sql(user), sql(conversation_id), cleared])
                    .map_err(internal)?;
                    Ok(cleared as u64)
                }
                Some(_) => Err(StoreError::Invalid(super::LEAVE_FIRST.into())),
                None => {
                    // Its departure too: catch-up would bring what it still
                    // owed them, and the group back with it.
                    let mut forgotten = 0;
                    for table in ["former_members", "departures"] {
                        forgotten += conn
                            .prepare_cached(&format!(
                                "DELETE FROM {table} WHERE user_id = ?1 AND conversation_id = ?2"
                            ))
                            .map_err(internal)?
                            .execute(params![sql(user), sql(conversation_id)])
                            .map_err(internal)?;
                    }
                    match forgotten {
                        0 => Err(StoreError::NotAMember),
                        _ => Ok(0),
                    }
                }
            }
        })
        .await
    }

    async fn set_muted(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        until_ms: i64,
    ) -> Result<(), StoreError> {
        self.call(move |conn, _| {
            if role_of(conn, conversation_id, user)?.is_none() {
                return Err(StoreError::NotAMember);
            }
            if until_ms > 0 {
                conn.prepare_cached(
                    "INSERT INTO mutes (user_id, conversation_id, until_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (user_id, conversation_id) DO UPDATE SET until_ms = excluded.until_ms",
                )
                .map_err(internal)?
                .execute(params![sql(user), sql(conversation_id), until_ms])
                .map_err(internal)?;
            } else {
                conn.prepare_cached("DELETE FROM mutes WHERE user_id = ?1 AND conversation_id = ?2")
                    .map_err(internal)?
                    .execute(params![sql(user), sql(conversation_id)])
                    .map_err(internal)?;
            }
            Ok(())
        })
        .await
    }

    async fn muted_until(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<i64, StoreError> {
        // Nothing of it is written behind: no need to write what is (a
        // notification asks this for every message to a user away).
        self.call_hot(move |conn, _| {
            conn.prepare_cached(
                "SELECT until_ms FROM mutes WHERE user_id = ?1 AND conversation_id = ?2",
            )
            .map_err(internal)?
            .query_row(params![sql(user), sql(conversation_id)], |r| r.get(0))
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(internal)
        })
        .await
    }

    async fn audience(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<Arc<Vec<UserId>>, StoreError> {
        // The send path's cache, read as the send path reads it (through
        // the pending state, which a plain `call` would write first: a
        // commit per keystroke): no disk read for a conversation in use.
        self.call_hot(
            move |conn, state| match state.conversation(conn, conversation_id)? {
                Some(c) if c.members.binary_search(&user).is_ok() => {
                    if c.open {
                        Ok(c.members.clone())
                    } else {
                        let other = c.members.iter().copied().find(|&m| m != user);
                        Err(StoreError::NotFriends(other.unwrap_or(user)))
                    }
                }
                _ => Err(StoreError::NotAMember),
            },
        )
        .await
    }

    async fn reference(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        seq: u64,
        client_msg_id: String,
    ) -> Result<Reference, StoreError> {
        // Through the pending state, as a send reads it: the message, or
        // the retry's first, may still be in the batch being written.
        self.call_hot(move |conn, state| {
            if state.stored_key(conn, user, &client_msg_id)?.is_some() {
                return Ok(Reference::Retry);
            }
            match state.conversation(conn, conversation_id)? {
                Some(c) if c.members.binary_search(&user).is_ok() => {
                    if seq == 0 || seq > c.last_seq {
                        return Ok(Reference::Unreadable);
                    }
                }
                _ => return Err(StoreError::NotAMember),
            }
            // Where their history starts, as `membership` has it.
            let start: Option<i64> = conn
                .prepare_cached(
                    "SELECT MAX(m.joined_seq,
                                COALESCE((SELECT cleared_seq + 1 FROM cleared_histories
                                          WHERE user_id = ?2 AND conversation_id = ?1), 0))
                     FROM members m WHERE m.conversation_id = ?1 AND m.user_id = ?2",
                )
                .map_err(internal)?
                .query_row(params![sql(conversation_id), sql(user)], |r| r.get(0))
                .optional()
                .map_err(internal)?;
            let Some(start) = start else {
                return Err(StoreError::NotAMember);
            };
            if seq < start as u64 {
                return Ok(Reference::Unreadable);
            }
            Ok(match message_at(conn, state, conversation_id, seq)? {
                Some(m) => Reference::Readable(Referable {
                    message_type: proto::MessageType::try_from(m.r#type).unwrap_or_default(),
                    sender_id: m.sender_id,
                    sent_at_ms: m.sent_at_ms,
                    unsent: m.unsent,
                }),
                None => Reference::Unreadable,
            })
        })
        .await
    }

    async fn former_membership(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<Option<Membership>, StoreError> {
        self.call(move |conn, _| {
            membership_row(
                conn,
                "SELECT left_seq, joined_seq FROM former_members
                 WHERE conversation_id = ?1 AND user_id = ?2
                 ORDER BY joined_seq DESC LIMIT 1",
                conversation_id,
                user,
            )
        })
        .await
    }

    async fn was_member_at(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        seq: u64,
    ) -> Result<bool, StoreError> {
        self.call(move |conn, _| {
            conn.prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM members
                               WHERE conversation_id = ?1 AND user_id = ?2 AND joined_seq <= ?3)
                     OR EXISTS(SELECT 1 FROM former_members
                               WHERE user_id = ?2 AND conversation_id = ?1
                                 AND joined_seq <= ?3 AND left_seq >= ?3)",
            )
            .map_err(internal)?
            .query_row(params![sql(conversation_id), sql(user), sql(seq)], |r| {
                r.get(0)
            })
            .map_err(internal)
        })
        .await
    }

    async fn append(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
        // One job for the whole batch: one transaction, one fsync. A refused
        // message writes nothing (membership is checked first), so it does
        // not undo the rest.
        self.call_hot(move |conn, state| {
            let mut results = Vec::with_capacity(batch.len());
            for m in batch {
                let result = append_one(conn, state, m, false);
                match &result {
                    // A refused message (not a member, not friends in a
                    // direct conversation, a key reused for another
                    // message, an edit or unsend of a message unsent)
                    // wrote nothing; the batch goes on.
                    Ok(_)
                    | Err(
                        StoreError::NotAMember
                        | StoreError::NotFriends(_)
                        | StoreError::Invalid(_)
                        | StoreError::NotFound,
                    ) => {}
                    Err(e) => return Err(clone_err(e)),
                }
                results.push(result);
            }
            Ok(results)
        })
        .await
    }

    async fn history(
        &self,
        conversation_id: ConversationId,
        direction: Direction,
        cursor: u64,
        limit: u32,
    ) -> Result<Page, StoreError> {
        self.call(move |conn, _| {
            // Ask for one more than the page to learn whether more exist.
            let probe = i64::from(limit) + 1;
            let mut messages: Vec<proto::Message> = match direction {
                Direction::Backward => {
                    let before = if cursor == 0 { i64::MAX } else { sql(cursor) };
                    let mut stmt = conn
                        .prepare_cached(&format!(
                            "SELECT {MESSAGE_COLUMNS}
                             FROM message_index i JOIN messages m ON m.message_id = i.message_id AND m.conversation_id = i.conversation_id
                             WHERE i.conversation_id = ?1 AND i.seq < ?2 ORDER BY i.seq DESC LIMIT ?3"
                        ))
                        .map_err(internal)?;
                    let rows = stmt
                        .query_map(
                            params![sql(conversation_id), before, probe],
                            message_from_row,
                        )
                        .map_err(internal)?;
                    rows.collect::<rusqlite::Result<_>>().map_err(internal)?
                }
                Direction::Forward => {
                    let mut stmt = conn
                        .prepare_cached(&format!(
                            "SELECT {MESSAGE_COLUMNS}
                             FROM message_index i JOIN messages m ON m.message_id = i.message_id AND m.conversation_id = i.conversation_id
                             WHERE i.conversation_id = ?1 AND i.seq > ?2 ORDER BY i.seq ASC LIMIT ?3"
                        ))
                        .map_err(internal)?;
                    let rows = stmt
                        .query_map(
                            params![sql(conversation_id), sql(cursor), probe],
                            message_from_row,
                        )
                        .map_err(internal)?;
                    rows.collect::<rusqlite::Result<_>>().map_err(internal)?
                }
            };
            let has_more = messages.len() > limit as usize;
            messages.truncate(limit as usize);
            if direction == Direction::Backward {
                messages.reverse();
            }
            Ok(Page {
                messages: messages.into_iter().map(Arc::new).collect(),
                has_more,
            })
        })
        .await
    }

    async fn undelivered(
        &self,
        user: UserId,
        after: (ConversationId, u64),
        limit: u32,
    ) -> Result<Vec<Arc<proto::Message>>, StoreError> {
        // The ranges first, then each conversation's from where the page
        // starts: one query joining them could not start at the cursor
        // (SQLite does not push it into a UNION ALL), so every page read
        // and sorted the user's whole backlog, catch-up was quadratic in
        // it, and all of it ran on the store's one thread.
        self.call(move |conn, _| {
            let ranges = pending_ranges_from(conn, user, after.0)?;
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {MESSAGE_COLUMNS}
                     FROM message_index i JOIN messages m ON m.message_id = i.message_id AND m.conversation_id = i.conversation_id
                     WHERE i.conversation_id = ?1 AND i.seq > ?2 AND i.seq <= ?3
                       AND m.sender_id != ?4
                     ORDER BY i.seq LIMIT ?5"
                ))
                .map_err(internal)?;
            let mut page = Vec::new();
            for range in ranges {
                let (conversation, delivered, upto) =
                    (range.conversation_id, range.delivered_seq, range.last_seq);
                let left = limit as usize - page.len();
                if left == 0 {
                    break;
                }
                let from = if conversation == after.0 {
                    delivered.max(after.1)
                } else {
                    delivered
                };
                if from >= upto {
                    continue;
                }
                let rows = stmt
                    .query_map(
                        params![
                            sql(conversation),
                            sql(from),
                            sql(upto),
                            sql(user),
                            left as i64
                        ],
                        message_from_row,
                    )
                    .map_err(internal)?;
                for row in rows {
                    page.push(Arc::new(row.map_err(internal)?));
                }
            }
            Ok(page)
        })
        .await
    }

    async fn membership(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<Option<Membership>, StoreError> {
        self.call(move |conn, _| {
            membership_row(
                conn,
                "SELECT c.last_seq,
                        MAX(m.joined_seq,
                            COALESCE((SELECT cleared_seq + 1 FROM cleared_histories
                                      WHERE user_id = ?2 AND conversation_id = ?1), 0))
                 FROM members m JOIN conversations c ON c.id = m.conversation_id
                 WHERE m.conversation_id = ?1 AND m.user_id = ?2",
                conversation_id,
                user,
            )
        })
        .await
    }

    async fn create_group(
        &self,
        group: NewGroup,
        max_members: usize,
        now_ms: i64,
    ) -> Result<GroupCreated, StoreError> {
        self.call(move |conn, state| {
            if let Some(key) = &group.client_key {
                let existing: Option<i64> = conn
                    .prepare_cached(
                        "SELECT id FROM conversations WHERE creator_id = ?1 AND create_key = ?2",
                    )
                    .map_err(internal)?
                    .query_row(params![sql(group.creator), key], |r| r.get(0))
                    .optional()
                    .map_err(internal)?;
                if let Some(id) = existing {
                    return Ok(GroupCreated::Existing(id as u64));
                }
            }
            let members = group.others(max_members)?;
            check_friends(conn, group.creator, &members)?;
            let NewGroup {
                creator,
                name,
                client_key,
                ..
            } = group;
            let mut names = Vec::with_capacity(members.len());
            for &member in &members {
                names.push(username_of(conn, member)?.ok_or(StoreError::NotFound)?);
            }
            let creator_name = username_of(conn, creator)?.ok_or(StoreError::NotFound)?;
            conn.prepare_cached(
                "INSERT INTO conversations
                   (kind, name, direct_key, created_at_ms, last_activity_ms, creator_id, create_key)
                 VALUES (?1, ?2, NULL, ?3, ?3, ?4, ?5)",
            )
            .map_err(internal)?
            .execute(params![
                proto::ConversationKind::Group as i32,
                name,
                now_ms,
                sql(creator),
                client_key
            ])
            .map_err(internal)?;
            let id = conn.last_insert_rowid() as u64;
            add_member(conn, id, creator, ROLE_ADMIN, 0)?;
            for &member in &members {
                add_member(conn, id, member, ROLE_MEMBER, 0)?;
            }
            state.conversations.remove(&id);
            let text = super::system_text::created(&creator_name, &name, &names);
            append_one(
                conn,
                state,
                system_message(id, creator, None, text, now_ms),
                true,
            )
            .map(GroupCreated::New)
        })
        .await
    }

    async fn change_group(
        &self,
        edit: GroupEdit,
        max_members: usize,
        now_ms: i64,
    ) -> Result<Appended, StoreError> {
        self.call(move |conn, state| {
            let GroupEdit {
                conversation_id,
                actor,
                change,
                client_key,
            } = edit;
            // A repeat answers as the first did, whatever changed since.
            if let Some(key) = &client_key
                && let Some(first) = repeated_edit(conn, state, conversation_id, actor, key)? {
                    return Ok(first);
                }
            // Every refusal happens before the first write.
            let kind: Option<i32> = conn
                .prepare_cached("SELECT kind FROM conversations WHERE id = ?1")
                .map_err(internal)?
                .query_row([sql(conversation_id)], |r| r.get(0))
                .optional()
                .map_err(internal)?;
            let Some(actor_role) = role_of(conn, conversation_id, actor)? else {
                return Err(StoreError::NotAMember);
            };
            if kind != Some(proto::ConversationKind::Group as i32) {
                return Err(StoreError::Invalid(
                    "direct conversations have no members to change".into(),
                ));
            }
            let is_admin = actor_role == ROLE_ADMIN;
            let actor_name = username_of(conn, actor)?.unwrap_or_default();
            let next_seq = match state.conversation(conn, conversation_id)? {
                Some(c) => c.last_seq + 1,
                None => return Err(StoreError::NotAMember),
            };
            let mut also_tell: Vec<UserId> = Vec::new();
            // A removed member and their delivered watermark.
            let mut departed: Option<(UserId, u64)> = None;
            // A member who left or was removed, and where they joined.
            let mut ended: Option<(UserId, Option<u64>)> = None;
            let text = match change {
                GroupChange::Rename(name) => {
                    conn.prepare_cached("UPDATE conversations SET name = ?2 WHERE id = ?1")
                        .map_err(internal)?
                        .execute(params![sql(conversation_id), name])
                        .map_err(internal)?;
                    super::system_text::renamed(&actor_name, &name)
                }
                GroupChange::Add(users) => {
                    if !is_admin {
                        return Err(StoreError::NotAdmin);
                    }
                    // Each user once, in the order given.
                    let mut seen = HashSet::with_capacity(users.len());
                    let mut new = Vec::new();
                    for user in users {
                        if seen.insert(user) && role_of(conn, conversation_id, user)?.is_none() {
                            new.push(user);
                        }
                    }
                    if new.is_empty() {
                        return Err(StoreError::Invalid("they are members already".into()));
                    }
                    check_friends(conn, actor, &new)?;
                    let current: i64 = conn
                        .prepare_cached("SELECT COUNT(*) FROM members WHERE conversation_id = ?1")
                        .map_err(internal)?
                        .query_row([sql(conversation_id)], |r| r.get(0))
                        .map_err(internal)?;
                    if current as usize + new.len() > max_members {
                        return Err(StoreError::LimitReached);
                    }
                    let mut names = Vec::new();
                    for &user in &new {
                        names.push(username_of(conn, user)?.ok_or(StoreError::NotFound)?);
                    }
                    for &user in &new {
                        // New members read from the message that adds them.
                        add_member(conn, conversation_id, user, ROLE_MEMBER, next_seq)?;
                    }
                    super::system_text::added(&actor_name, &names)
                }
                GroupChange::Remove(user) => {
                    if !is_admin {
                        return Err(StoreError::NotAdmin);
                    }
                    if user == actor {
                        return Err(StoreError::Invalid("use leave to leave a group".into()));
                    }
                    if role_of(conn, conversation_id, user)?.is_none() {
                        return Err(StoreError::NotFound);
                    }
                    let name = username_of(conn, user)?.unwrap_or_default();
                    let delivered = state
                        .watermark(conn, conversation_id, user)?
                        .map_or(0, |(delivered, _)| delivered);
                    ended = Some((user, remove_member(conn, conversation_id, user)?));
                    also_tell.push(user);
                    departed = Some((user, delivered));
                    super::system_text::removed(&actor_name, &name)
                }
                GroupChange::Leave => {
                    ended = Some((actor, remove_member(conn, conversation_id, actor)?));
                    also_tell.push(actor);
                    // A group keeps an admin while it has members.
                    conn.prepare_cached(
                        "UPDATE members SET role = ?2
                         WHERE conversation_id = ?1
                           AND NOT EXISTS (SELECT 1 FROM members WHERE conversation_id = ?1 AND role = ?2)
                           AND user_id = (SELECT user_id FROM members WHERE conversation_id = ?1
                                          ORDER BY joined_seq, user_id LIMIT 1)",
                    )
                    .map_err(internal)?
                    .execute(params![sql(conversation_id), ROLE_ADMIN])
                    .map_err(internal)?;
                    super::system_text::left(&actor_name)
                }
                GroupChange::SetAdmin(user, admin) => {
                    if !is_admin {
                        return Err(StoreError::NotAdmin);
                    }
                    let Some(current) = role_of(conn, conversation_id, user)? else {
                        return Err(StoreError::NotFound);
                    };
                    if !admin && current == ROLE_ADMIN {
                        let admins: i64 = conn
                            .prepare_cached(
                                "SELECT COUNT(*) FROM members WHERE conversation_id = ?1 AND role = ?2",
                            )
                            .map_err(internal)?
                            .query_row(params![sql(conversation_id), ROLE_ADMIN], |r| r.get(0))
                            .map_err(internal)?;
                        if admins <= 1 {
                            return Err(StoreError::Invalid(crate::store::LAST_ADMIN.into()));
                        }
                    }
                    let name = username_of(conn, user)?.unwrap_or_default();
                    let role = if admin { ROLE_ADMIN } else { ROLE_MEMBER };
                    conn.prepare_cached(
                        "UPDATE members SET role = ?3 WHERE conversation_id = ?1 AND user_id = ?2",
                    )
                    .map_err(internal)?
                    .execute(params![sql(conversation_id), sql(user), role])
                    .map_err(internal)?;
                    super::system_text::role(&actor_name, &name, admin)
                }
            };
            // Membership may have changed: reload before appending.
            state.conversations.remove(&conversation_id);
            let message = system_message(conversation_id, actor, client_key, text, now_ms);
            let mut appended = append_one(conn, state, message, true)?;
            if let Some((user, delivered)) = departed {
                note_departure(conn, conversation_id, user, delivered, appended.message.seq)?;
            }
            if let Some((user, Some(joined))) = ended {
                let left = (appended.message.seq, appended.message.sent_at_ms);
                note_former_member(conn, conversation_id, user, joined, left)?;
            }
            for user in also_tell {
                if !appended.members.contains(&user) {
                    appended.members.push(user);
                }
            }
            Ok(appended)
        })
        .await
    }

    async fn pending_ranges(&self, user: UserId) -> Result<Option<Vec<PendingRange>>, StoreError> {
        self.call(move |conn, _| pending_ranges_from(conn, user, 0).map(Some))
            .await
    }

    async fn advance_watermarks(
        &self,
        updates: Vec<WatermarkUpdate>,
    ) -> Result<Vec<WatermarkMoved>, StoreError> {
        self.call_hot(move |conn, state| {
            let mut moved: Vec<WatermarkMoved> = Vec::new();
            for u in updates {
                // Clamp to the last seq (cached), and skip non-members
                // without a query.
                let (members, target) = match state.conversation(conn, u.conversation_id)? {
                    Some(c) if c.members.binary_search(&u.user_id).is_ok() => {
                        // In a closed direct conversation nobody hears of
                        // it (see `WatermarkMoved::members`).
                        let audience = if c.open {
                            c.members.clone()
                        } else {
                            Arc::new(Vec::new())
                        };
                        (audience, u.seq.min(c.last_seq))
                    }
                    // Perhaps a removed member's device, catching up.
                    _ => {
                        ack_departure(conn, u.conversation_id, u.user_id, u.seq)?;
                        continue;
                    }
                };
                let Some(current) = state.watermark(conn, u.conversation_id, u.user_id)? else {
                    continue;
                };
                let (delivered_seq, seen_seq) = match u.kind {
                    // Seen implies delivered.
                    WatermarkKind::Seen => (current.0.max(target), current.1.max(target)),
                    WatermarkKind::Delivered => (current.0.max(target), current.1),
                };
                if (delivered_seq, seen_seq) == current {
                    continue;
                }
                state.move_watermark(
                    conn,
                    u.conversation_id,
                    u.user_id,
                    (delivered_seq, seen_seq),
                )?;
                if let Some(prev) = moved
                    .iter_mut()
                    .find(|m| m.conversation_id == u.conversation_id && m.user_id == u.user_id)
                {
                    prev.delivered_seq = delivered_seq;
                    prev.seen_seq = seen_seq;
                } else {
                    moved.push(WatermarkMoved {
                        conversation_id: u.conversation_id,
                        user_id: u.user_id,
                        delivered_seq,
                        seen_seq,
                        members,
                    });
                }
            }
            Ok(moved)
        })
        .await
    }

    async fn record_last_active(
        &self,
        user: UserId,
        last_active_ms: i64,
    ) -> Result<(), StoreError> {
        self.call(move |conn, _| {
            conn.prepare_cached(
                "UPDATE users SET last_active_ms = MAX(last_active_ms, ?2) WHERE id = ?1",
            )
            .map_err(internal)?
            .execute(params![sql(user), last_active_ms])
            .map_err(internal)?;
            Ok(())
        })
        .await
    }

    async fn set_presence_hidden(
        &self,
        user: UserId,
        hidden_at_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        self.call(move |conn, _| {
            conn.prepare_cached("UPDATE users SET presence_hidden_at_ms = ?2 WHERE id = ?1")
                .map_err(internal)?
                .execute(params![sql(user), hidden_at_ms])
                .map_err(internal)?;
            Ok(())
        })
        .await
    }

    async fn stored_presence(&self, users: Vec<UserId>) -> Result<Vec<StoredPresence>, StoreError> {
        self.call(move |conn, _| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT last_active_ms, presence_hidden_at_ms FROM users WHERE id = ?1",
                )
                .map_err(internal)?;
            users
                .into_iter()
                .map(|user| {
                    stmt.query_row([sql(user)], |r| {
                        Ok(StoredPresence {
                            last_active_ms: r.get(0)?,
                            hidden_at_ms: r.get(1)?,
                        })
                    })
                    .optional()
                    .map(Option::unwrap_or_default)
                    .map_err(internal)
                })
                .collect()
        })
        .await
    }

    async fn receipt_snapshot(
        &self,
        user: UserId,
        limit: u32,
        max_members: u32,
    ) -> Result<Vec<proto::Receipt>, StoreError> {
        self.call(move |conn, _| {
            // A (max_members + 1)th member marks a large conversation: at
            // most that many index entries are read for each. Closed direct
            // conversations are left out before the limit, as on Postgres.
            let mut stmt = conn
                .prepare_cached(
                    "SELECT other.conversation_id, other.user_id, other.delivered_seq, other.seen_seq
                     FROM (SELECT c.id, c.last_activity_ms FROM members me
                           JOIN conversations c ON c.id = me.conversation_id
                           WHERE me.user_id = ?1
                             AND (c.kind != ?4
                                  OR EXISTS (SELECT 1 FROM members o
                                             JOIN friends f ON f.user_id = ?1 AND f.friend_id = o.user_id
                                             WHERE o.conversation_id = c.id AND o.user_id != ?1))
                           ORDER BY c.last_activity_ms DESC LIMIT ?2) recent
                     JOIN members other ON other.conversation_id = recent.id AND other.user_id != ?1
                     WHERE NOT EXISTS (SELECT 1 FROM members m WHERE m.conversation_id = recent.id
                                       LIMIT 1 OFFSET ?3)
                     ORDER BY recent.last_activity_ms DESC, other.user_id",
                )
                .map_err(internal)?;
            let direct = proto::ConversationKind::Direct as i32;
            let rows = stmt
                .query_map(params![sql(user), limit, max_members, direct], |r| {
                    Ok(proto::Receipt {
                        conversation_id: r.get::<_, i64>(0)? as u64,
                        user_id: r.get::<_, i64>(1)? as u64,
                        delivered_seq: r.get::<_, i64>(2)? as u64,
                        seen_seq: r.get::<_, i64>(3)? as u64,
                    })
                })
                .map_err(internal)?;
            rows.collect::<rusqlite::Result<_>>().map_err(internal)
        })
        .await
    }

    // The media table is never written behind: its calls need not write
    // the pending heads, keys and watermarks first (`call_hot`).
    async fn create_media(&self, media: MediaRecord) -> Result<(), StoreError> {
        self.call_hot(move |conn, _| {
            conn.prepare_cached(&format!(
                "INSERT INTO media ({MEDIA_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            ))
            .map_err(internal)?
            .execute(params![
                media.media_id,
                sql(media.owner),
                media.media_type as i32,
                sql(media.size),
                media.width,
                media.height,
                &media.sha256[..],
                media.created_ms,
                media.conversation_id.map(sql),
                media.seq.map(sql),
                &media.preview[..],
            ])
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict
                } else {
                    internal(e)
                }
            })?;
            Ok(())
        })
        .await
    }

    async fn media(&self, media_id: &str) -> Result<Option<MediaRecord>, StoreError> {
        let media_id = media_id.to_owned();
        self.call_hot(move |conn, _| media_row(conn, &media_id))
            .await
    }

    async fn attach_media(
        &self,
        media_id: &str,
        owner: UserId,
        conversation_id: ConversationId,
        now_ms: i64,
    ) -> Result<MediaRecord, StoreError> {
        let media_id = media_id.to_owned();
        self.call(move |conn, _| {
            let Some(mut media) = media_row(conn, &media_id)?.filter(|m| m.owner == owner) else {
                return Err(StoreError::NotFound);
            };
            let bind = |conn: &Connection| {
                conn.prepare_cached(
                    "UPDATE media SET conversation_id = ?2, bound_ms = ?3 WHERE media_id = ?1",
                )
                .map_err(internal)?
                .execute(params![media_id, sql(conversation_id), now_ms])
                .map_err(internal)
            };
            match media.conversation_id {
                Some(c) if c == conversation_id => {
                    bind(conn)?;
                    return Ok(media);
                }
                Some(_) => return Err(StoreError::Invalid(PHOTO_SENT_ELSEWHERE.into())),
                None => {}
            }
            let member: bool = conn
                .prepare_cached(
                    "SELECT EXISTS(SELECT 1 FROM members WHERE conversation_id = ?1 AND user_id = ?2)",
                )
                .map_err(internal)?
                .query_row(params![sql(conversation_id), sql(owner)], |r| r.get(0))
                .map_err(internal)?;
            if !member {
                return Err(StoreError::NotAMember);
            }
            bind(conn)?;
            media.conversation_id = Some(conversation_id);
            Ok(media)
        })
        .await
    }

    async fn purge_media(
        &self,
        before_ms: i64,
        bound_before_ms: i64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        // Bound at or after its upload, and `bound_before_ms` is at most
        // `before_ms` (the caller's rule), so `created_ms` bounds the index
        // range either way.
        let bound_before_ms = bound_before_ms.min(before_ms);
        self.call_hot(move |conn, _| {
            let mut stmt = conn
                .prepare_cached(
                    "DELETE FROM media WHERE media_id IN
                     (SELECT media_id FROM media
                      WHERE seq IS NULL AND created_ms < ?1
                        AND (conversation_id IS NULL OR bound_ms < ?2)
                      LIMIT ?3)
                     RETURNING media_id",
                )
                .map_err(internal)?;
            let ids = stmt
                .query_map(params![before_ms, bound_before_ms, limit], |r| r.get(0))
                .map_err(internal)?;
            ids.collect::<rusqlite::Result<_>>().map_err(internal)
        })
        .await
    }

    async fn media_present(&self, media_ids: Vec<String>) -> Result<Vec<String>, StoreError> {
        // Media rows are not written behind.
        self.call_hot(move |conn, _| {
            let mut stmt = conn
                .prepare_cached("SELECT EXISTS(SELECT 1 FROM media WHERE media_id = ?1)")
                .map_err(internal)?;
            let mut present = Vec::new();
            for id in media_ids {
                if stmt
                    .query_row([&id], |r| r.get::<_, bool>(0))
                    .map_err(internal)?
                {
                    present.push(id);
                }
            }
            Ok(present)
        })
        .await
    }

    async fn set_push(
        &self,
        token_hash: [u8; 32],
        device: Option<PushDevice>,
    ) -> Result<bool, StoreError> {
        // Sessions are not written behind: nothing pending to write first.
        self.call_hot(move |conn, _| {
            let live: bool = conn
                .prepare_cached(
                    "SELECT EXISTS(SELECT 1 FROM sessions
                                   WHERE token_hash = ?1 AND revoked_at_ms IS NULL)",
                )
                .map_err(internal)?
                .query_row([&token_hash[..]], |r| r.get(0))
                .map_err(internal)?;
            if !live {
                return Ok(false);
            }
            let (app_id, token, registered_ms) = match device {
                Some(d) => (Some(d.app_id), Some(d.token), Some(d.registered_ms)),
                None => (None, None, None),
            };
            if let (Some(app_id), Some(token)) = (&app_id, &token) {
                conn.prepare_cached(
                    "UPDATE sessions SET push_app_id = NULL, push_token = NULL,
                                         push_registered_ms = NULL
                     WHERE push_token = ?2 AND push_app_id = ?3 AND token_hash != ?1",
                )
                .map_err(internal)?
                .execute(params![&token_hash[..], token, app_id])
                .map_err(internal)?;
            }
            conn.prepare_cached(
                "UPDATE sessions SET push_app_id = ?2, push_token = ?3, push_registered_ms = ?4
                 WHERE token_hash = ?1",
            )
            .map_err(internal)?
            .execute(params![&token_hash[..], app_id, token, registered_ms])
            .map_err(internal)?;
            Ok(true)
        })
        .await
    }

    async fn push_devices(&self, user: UserId, now_ms: i64) -> Result<Vec<PushDevice>, StoreError> {
        self.call_hot(move |conn, _| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT push_app_id, push_token, push_registered_ms FROM sessions
                     WHERE user_id = ?1 AND push_token IS NOT NULL
                       AND revoked_at_ms IS NULL AND expires_at_ms > ?2",
                )
                .map_err(internal)?;
            let rows = stmt
                .query_map(params![sql(user), now_ms], |r| {
                    Ok(PushDevice {
                        app_id: r.get(0)?,
                        token: r.get(1)?,
                        registered_ms: r.get(2)?,
                    })
                })
                .map_err(internal)?;
            rows.collect::<rusqlite::Result<_>>().map_err(internal)
        })
        .await
    }

    async fn drop_push_token(
        &self,
        app_id: String,
        token: String,
        registered_by_ms: i64,
    ) -> Result<u64, StoreError> {
        self.call_hot(move |conn, _| {
            let n = conn
                .prepare_cached(
                    "UPDATE sessions SET push_app_id = NULL, push_token = NULL,
                                         push_registered_ms = NULL
                     WHERE push_token = ?1 AND push_app_id = ?2 AND push_registered_ms <= ?3",
                )
                .map_err(internal)?
                .execute(params![token, app_id, registered_by_ms])
                .map_err(internal)?;
            Ok(n as u64)
        })
        .await
    }

    async fn unread_conversations(&self, user: UserId, cap: u32) -> Result<u32, StoreError> {
        // Through the pending state rather than after writing it (`call`):
        // a notification asks this for every message to a user away, and
        // writing heads, index entries and watermarks out each time undid
        // their writing behind (BENCHMARKS.md, session 43).
        self.call_hot(move |conn, state| {
            // What they deleted counts as seen.
            let memberships: Vec<(i64, i64, i64)> = conn
                .prepare_cached(
                    "SELECT m.conversation_id, m.seen_seq, COALESCE(k.cleared_seq, 0)
                     FROM members m LEFT JOIN cleared_histories k
                       ON k.user_id = m.user_id AND k.conversation_id = m.conversation_id
                     WHERE m.user_id = ?1",
                )
                .map_err(internal)?
                .query_map([sql(user)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(internal)?
                .collect::<rusqlite::Result<_>>()
                .map_err(internal)?;
            let mut unread = 0;
            for (conversation_id, seen, cleared) in memberships {
                let conversation_id = conversation_id as u64;
                let seen = state
                    .watermarks
                    .get(&(conversation_id, user))
                    .map_or(seen as u64, |&(_, seen)| seen)
                    .max(cleared as u64);
                if others_above(conn, state, conversation_id, user, seen)? {
                    unread += 1;
                    if unread >= cap {
                        break;
                    }
                }
            }
            Ok(unread)
        })
        .await
    }
}

/// Whether `conversation_id` has a message from someone but `user` above
/// `seen`, reactions and edits aside: among the index entries still pending (the
/// newest), then in `message_index`.
fn others_above(
    conn: &Connection,
    state: &DbState,
    conversation_id: ConversationId,
    user: UserId,
    seen: u64,
) -> Result<bool, StoreError> {
    if let Some(entries) = state.index.get(&conversation_id) {
        let mut sender = conn
            .prepare_cached("SELECT sender_id, type, unsent FROM messages WHERE message_id = ?1")
            .map_err(internal)?;
        for &(_, message_id) in entries.iter().rev().take_while(|&&(seq, _)| seq > seen) {
            let (from, kind, unsent): (i64, i32, bool) = sender
                .query_row([sql(message_id)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(internal)?;
            let annotation = kind == proto::MessageType::Reaction as i32
                || kind == proto::MessageType::Edit as i32
                || kind == proto::MessageType::Unsend as i32;
            if from as u64 != user && !annotation && !unsent {
                return Ok(true);
            }
        }
    }
    conn.prepare_cached(
        "SELECT EXISTS(SELECT 1 FROM message_index i JOIN messages m ON m.message_id = i.message_id
                       WHERE i.conversation_id = ?1 AND i.seq > ?2 AND m.sender_id != ?3
                         AND m.type NOT IN (5, 6, 7) -- MESSAGE_TYPE_REACTION, _EDIT, _UNSEND
                         AND NOT m.unsent
                      )",
    )
    .map_err(internal)?
    .query_row(params![sql(conversation_id), sql(seen), sql(user)], |r| {
        r.get(0)
    })
    .map_err(internal)
}

/// The columns [`media_from_row`] reads.
const MEDIA_COLUMNS: &str = "media_id, owner_id, media_type, size, width, height, sha256, created_ms, conversation_id, seq, preview";

fn media_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<MediaRecord> {
    let sha256: Vec<u8> = row.get(6)?;
    let preview: Vec<u8> = row.get(10)?;
    Ok(MediaRecord {
        media_id: row.get(0)?,
        owner: row.get::<_, i64>(1)? as u64,
        media_type: proto::MediaType::try_from(row.get::<_, i32>(2)?)
            .unwrap_or(proto::MediaType::Unspecified),
        size: row.get::<_, i64>(3)? as u64,
        width: row.get(4)?,
        height: row.get(5)?,
        sha256: sha256.try_into().unwrap_or([0; 32]),
        preview: preview.into(),
        created_ms: row.get(7)?,
        conversation_id: row.get::<_, Option<i64>>(8)?.map(|c| c as u64),
        seq: row.get::<_, Option<i64>>(9)?.map(|s| s as u64),
    })
}

/// A [`Membership`] read by `statement`, which takes the conversation and
/// the user and returns the last readable seq and the joined seq.
fn membership_row(
    conn: &Connection,
    statement: &str,
    conversation_id: ConversationId,
    user: UserId,
) -> Result<Option<Membership>, StoreError> {
    conn.prepare_cached(statement)
        .map_err(internal)?
        .query_row(params![sql(conversation_id), sql(user)], |r| {
            Ok(Membership {
                last_seq: r.get::<_, i64>(0)? as u64,
                joined_seq: r.get::<_, i64>(1)? as u64,
            })
        })
        .optional()
        .map_err(internal)
}

fn insert_session(conn: &Connection, s: &NewSession) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO sessions (token_hash, user_id, device_name, created_at_ms, expires_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .map_err(internal)?
    .execute(params![
        &s.token_hash[..],
        sql(s.user_id),
        s.device_name,
        s.created_at_ms,
        s.expires_at_ms
    ])
    .map_err(internal)?;
    Ok(())
}

fn media_row(conn: &Connection, media_id: &str) -> Result<Option<MediaRecord>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {MEDIA_COLUMNS} FROM media WHERE media_id = ?1"
    ))
    .map_err(internal)?
    .query_row([media_id], media_from_row)
    .optional()
    .map_err(internal)
}

fn are_friends(conn: &Connection, a: UserId, b: UserId) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "SELECT EXISTS(SELECT 1 FROM friends WHERE user_id = ?1 AND friend_id = ?2)",
    )
    .map_err(internal)?
    .query_row(params![sql(a), sql(b)], |r| r.get(0))
    .map_err(internal)
}

/// Whether `user` blocked `other`.
fn blocks(conn: &Connection, user: UserId, other: UserId) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "SELECT EXISTS(SELECT 1 FROM blocks WHERE user_id = ?1 AND blocked_id = ?2)",
    )
    .map_err(internal)?
    .query_row(params![sql(user), sql(other)], |r| r.get(0))
    .map_err(internal)
}

/// Ends the friendship of `a` and `b` and their pending requests either
/// way; true if there was any. Their direct conversation, if any, takes no
/// more sends.
fn end_friendship(
    conn: &Connection,
    state: &mut DbState,
    a: UserId,
    b: UserId,
) -> Result<bool, StoreError> {
    let friends = conn
        .prepare_cached(
            "DELETE FROM friends WHERE (user_id = ?1 AND friend_id = ?2)
                                    OR (user_id = ?2 AND friend_id = ?1)",
        )
        .map_err(internal)?
        .execute(params![sql(a), sql(b)])
        .map_err(internal)?;
    let requests = conn
        .prepare_cached(
            "DELETE FROM friend_requests WHERE (from_id = ?1 AND to_id = ?2)
                                            OR (from_id = ?2 AND to_id = ?1)",
        )
        .map_err(internal)?
        .execute(params![sql(a), sql(b)])
        .map_err(internal)?;
    if friends > 0 {
        state.forget_direct(conn, a, b)?;
    }
    Ok(friends + requests > 0)
}

/// Whether `from`'s request to `to` waits for an answer.
fn request_waiting(conn: &Connection, from: UserId, to: UserId) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM friend_requests WHERE from_id = ?1 AND to_id = ?2)",
    )
    .map_err(internal)?
    .query_row(params![sql(from), sql(to)], |r| r.get(0))
    .map_err(internal)
}

/// Removes `from`'s request to `to`; false if there was none.
fn take_request(conn: &Connection, from: UserId, to: UserId) -> Result<bool, StoreError> {
    let n = conn
        .prepare_cached("DELETE FROM friend_requests WHERE from_id = ?1 AND to_id = ?2")
        .map_err(internal)?
        .execute(params![sql(from), sql(to)])
        .map_err(internal)?;
    Ok(n > 0)
}

/// `NotFriends` naming the first of `users` who is not a friend of `user`.
fn check_friends(conn: &Connection, user: UserId, users: &[UserId]) -> Result<(), StoreError> {
    for &other in users {
        if !are_friends(conn, user, other)? {
            return Err(StoreError::NotFriends(other));
        }
    }
    Ok(())
}

fn friend_counts(conn: &Connection, user: UserId) -> Result<FriendCounts, StoreError> {
    conn.prepare_cached(
        "SELECT (SELECT COUNT(*) FROM friends WHERE user_id = ?1),
                (SELECT COUNT(*) FROM friend_requests WHERE to_id = ?1),
                (SELECT COUNT(*) FROM friend_requests WHERE from_id = ?1)",
    )
    .map_err(internal)?
    .query_row([sql(user)], |r| {
        let count = |i| r.get::<_, i64>(i).map(|n| n as u64);
        Ok(FriendCounts {
            friends: count(0)?,
            incoming: count(1)?,
            outgoing: count(2)?,
        })
    })
    .map_err(internal)
}

fn make_friends(conn: &Connection, a: UserId, b: UserId, now_ms: i64) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO friends (user_id, friend_id, since_ms) VALUES (?1, ?2, ?3)",
        )
        .map_err(internal)?;
    stmt.execute(params![sql(a), sql(b), now_ms])
        .map_err(internal)?;
    stmt.execute(params![sql(b), sql(a), now_ms])
        .map_err(internal)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::history_store_conformance!(|dir: PathBuf| async move {
        SqliteStore::open(&dir).expect("open sqlite store")
    });

    /// `.cargo/config.toml` builds the bundled SQLite with fdatasync();
    /// SQLite cannot report it (it is not a compile option it lists), so
    /// this checks that the flag reached the build.
    #[test]
    fn bundled_sqlite_is_built_with_fdatasync() {
        let flags = option_env!("LIBSQLITE3_FLAGS").unwrap_or_default();
        assert!(
            flags.split_whitespace().any(|f| f == "-DHAVE_FDATASYNC=1"),
            "LIBSQLITE3_FLAGS = {flags:?}: build from the workspace (its .cargo/config.toml) \
             or add -DHAVE_FDATASYNC=1"
        );
    }

    use crate::store::conformance::{friends_with_direct, text};

    /// Appends one message that must be accepted.
    async fn send(store: &SqliteStore, m: NewMessage) -> Appended {
        let mut results = store.append(vec![m]).await.unwrap();
        results.remove(0).unwrap()
    }

    fn duplicate_of(appended: &Appended) -> (bool, u64) {
        (appended.duplicate, appended.message.seq)
    }

    fn keys_on_disk(dir: &Path) -> (i64, i64) {
        let conn = Connection::open(dir.join(FILE_NAME)).unwrap();
        let keys = conn
            .query_row("SELECT COUNT(*) FROM idempotency", [], |r| r.get(0))
            .unwrap();
        let through = conn
            .query_row("SELECT keys_message_id FROM written_through", [], |r| {
                r.get(0)
            })
            .unwrap();
        (keys, through)
    }

    /// Stops the periodic write-behind (heads, index, key slices) for an
    /// hour, so a test on a slow machine still sees what is pending; reads
    /// and shutdown still write it.
    async fn hold_write_behind(store: &SqliteStore) {
        store
            .call_hot(|_, state| {
                let later = Instant::now() + Duration::from_secs(3600);
                state.flushed_at = later;
                state.keys_flushed_at = later;
                Ok(())
            })
            .await
            .unwrap();
    }

    /// Index entries on disk: (conversation, seq, message id) in key order.
    fn index_on_disk(dir: &Path) -> Vec<(u64, u64, u64)> {
        let conn = Connection::open(dir.join(FILE_NAME)).unwrap();
        let mut stmt = conn
            .prepare("SELECT conversation_id, seq, message_id FROM message_index ORDER BY 1, 2")
            .unwrap();
        stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    /// The texts of a conversation's history, oldest first.
    async fn history_texts(store: &SqliteStore, c: ConversationId) -> Vec<String> {
        let page = store.history(c, Direction::Backward, 0, 100).await.unwrap();
        page.messages.iter().map(|m| m.text.clone()).collect()
    }

    fn head_on_disk(dir: &Path, conversation_id: ConversationId) -> (u64, i64) {
        let conn = Connection::open(dir.join(FILE_NAME)).unwrap();
        conn.query_row(
            "SELECT last_seq, last_activity_ms FROM conversations WHERE id = ?1",
            [sql(conversation_id)],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
        )
        .unwrap()
    }

    /// How long `sends` appends take when one caller sends one message at
    /// a time: every append is a transaction of its own that starts as
    /// soon as the previous one answered. A slow machine only makes this
    /// take longer.
    async fn back_to_back_sends(store: &SqliteStore, sends: u32) -> Duration {
        let (a, _, c) = friends_with_direct(store, "alice", "bob").await;
        let started = Instant::now();
        for i in 0..sends {
            send(store, text(c, a, &format!("k{i}"), "hi", 100)).await;
        }
        started.elapsed()
    }

    /// Pacing, shown with a gap far above a commit's own time (the default
    /// 1 ms is less than an `fdatasync` here, so a test with it could not
    /// tell pacing from syncing).
    #[tokio::test]
    async fn the_commit_gap_is_configurable() {
        let dir = tempfile::tempdir().unwrap();
        let gap = Duration::from_millis(20);
        let store = SqliteStore::open_with(dir.path(), gap).unwrap();
        const SENDS: u32 = 6;
        let elapsed = back_to_back_sends(&store, SENDS).await;
        assert!(
            elapsed >= gap * (SENDS - 1),
            "{SENDS} commits in {elapsed:?}"
        );
    }

    /// A history keeps its name across reopening; another directory's is
    /// another history, with another name.
    #[tokio::test]
    async fn each_history_has_its_own_name() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = SqliteStore::open(one.path()).unwrap();
        let id = first.history_id().await.unwrap();
        drop(first);
        let again = SqliteStore::open(one.path()).unwrap();
        assert_eq!(again.history_id().await.unwrap(), id);
        let other = SqliteStore::open(two.path()).unwrap();
        assert_ne!(other.history_id().await.unwrap(), id);
    }

    /// A second store on a directory in use is refused before it reads or
    /// repairs anything, and the directory is free again once the first
    /// store is gone.
    #[tokio::test]
    async fn a_data_directory_holds_one_store_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = SqliteStore::open(dir.path()).unwrap();
        let (a, _, c) = friends_with_direct(&first, "alice", "bob").await;
        first
            .append(vec![text(c, a, "k1", "one", 100)])
            .await
            .unwrap()[0]
            .as_ref()
            .unwrap();
        let Err(StoreError::Internal(why)) = SqliteStore::open(dir.path()) else {
            panic!("a second store opened on a directory in use");
        };
        assert!(why.contains("in use by another chat-server"), "{why}");
        drop(first);
        let again = SqliteStore::open(dir.path()).unwrap();
        let page = again.history(c, Direction::Backward, 0, 10).await.unwrap();
        assert_eq!(page.messages.len(), 1, "the first store's message is there");
    }

    /// A database a newer build migrated is refused, unchanged, rather than
    /// served by a build that does not know its schema.
    #[tokio::test]
    async fn a_database_from_a_newer_build_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path()).unwrap());
        let newer = MIGRATIONS.len() as i64 + 1;
        let set_version = |v: i64| {
            Connection::open(dir.path().join(FILE_NAME))
                .unwrap()
                .execute_batch(&format!("PRAGMA user_version = {v}"))
                .unwrap();
        };
        set_version(newer);
        let Err(StoreError::Internal(why)) = SqliteStore::open(dir.path()) else {
            panic!("a database at V{newer} was opened");
        };
        assert!(why.contains(&format!("V{newer}")), "{why}");
        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, newer, "left as it was");
        drop(conn);
        set_version(MIGRATIONS.len() as i64);
        SqliteStore::open(dir.path()).expect("its own version opens");
    }

    #[tokio::test]
    async fn appends_write_the_conversation_head_behind_and_reads_see_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (a, b, c) = friends_with_direct(&store, "alice", "bob").await;
        hold_write_behind(&store).await;
        let batch = vec![
            text(c, a, "k1", "one", 100),
            text(c, b, "k2", "two", 200),
            text(c, a, "k3", "three", 300),
        ];
        for result in store.append(batch).await.unwrap() {
            result.unwrap();
        }
        // Committed messages, head not yet written: the hot path saved
        // that page.
        assert_eq!(head_on_disk(dir.path(), c), (0, 3));
        // Any other job writes pending heads before it runs (catch-up
        // compares watermarks with the head).
        let undelivered = store.undelivered(b, (0, 0), 10).await.unwrap();
        let seqs: Vec<u64> = undelivered.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 3], "alice's messages, not bob's own");
        assert_eq!(head_on_disk(dir.path(), c), (3, 300));
        let view = store.conversation(c, b).await.unwrap();
        assert_eq!((view.last_seq, view.last_activity_ms), (3, 300));
    }

    #[tokio::test]
    async fn heads_are_written_at_shutdown_and_recomputed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (a, c) = {
            let store = SqliteStore::open(dir.path()).unwrap();
            let (a, _, c) = friends_with_direct(&store, "alice", "bob").await;
            send(&store, text(c, a, "k1", "one", 100)).await;
            (a, c)
        };
        assert_eq!(head_on_disk(dir.path(), c), (1, 100), "written at shutdown");
        {
            let store = SqliteStore::open(dir.path()).unwrap();
            send(&store, text(c, a, "k2", "two", 200)).await;
            send(&store, text(c, a, "k3", "three", 300)).await;
        }
        // As after a crash before the heads of messages 2 and 3 were written.
        Connection::open(dir.path().join(FILE_NAME))
            .unwrap()
            .execute_batch(
                "UPDATE conversations SET last_seq = 1, last_activity_ms = 100;
                 DELETE FROM message_index WHERE message_id > 1;
                 UPDATE written_through SET heads_message_id = 1;",
            )
            .unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(head_on_disk(dir.path(), c), (3, 300), "repaired at open");
        assert_eq!(
            index_on_disk(dir.path()),
            [(c, 1, 1), (c, 2, 2), (c, 3, 3)],
            "index rebuilt at open"
        );
        assert_eq!(history_texts(&store, c).await, ["one", "two", "three"]);
        let view = store.conversation(c, a).await.unwrap();
        assert_eq!(view.last_seq, 3);
        let appended = send(&store, text(c, a, "k4", "four", 400)).await;
        assert_eq!(appended.message.seq, 4);
    }

    #[tokio::test]
    async fn retries_are_recognised_from_pending_and_from_written_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (a, c) = {
            let store = SqliteStore::open(dir.path()).unwrap();
            let (a, _, c) = friends_with_direct(&store, "alice", "bob").await;
            hold_write_behind(&store).await;
            let first = send(&store, text(c, a, "k1", "one", 100)).await;
            assert_eq!(duplicate_of(&first), (false, 1));
            assert_eq!(keys_on_disk(dir.path()), (0, 0), "written behind");
            let retry = send(&store, text(c, a, "k1", "again", 101)).await;
            assert_eq!(duplicate_of(&retry), (true, 1), "found among pending keys");
            (a, c)
        };
        assert_eq!(keys_on_disk(dir.path()), (1, 1), "written at shutdown");
        let store = SqliteStore::open(dir.path()).unwrap();
        let retry = send(&store, text(c, a, "k1", "again", 102)).await;
        assert_eq!(duplicate_of(&retry), (true, 1), "found in the table");
        assert_eq!(retry.message.text, "one");
        let next = send(&store, text(c, a, "k2", "two", 103)).await;
        assert_eq!(duplicate_of(&next), (false, 2));
    }

    #[tokio::test]
    async fn messages_are_found_by_seq_before_their_index_entries_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (a, b, c) = friends_with_direct(&store, "alice", "bob").await;
        hold_write_behind(&store).await;
        send(&store, text(c, a, "k1", "one", 100)).await;
        send(&store, text(c, b, "k2", "two", 200)).await;
        assert_eq!(index_on_disk(dir.path()), [], "written behind");
        // The keys reach the table first (their slices are written every
        // 100 ms, the index once a second): a retry then finds its key on
        // disk and its message through the pending index entry.
        store
            .call_hot(|conn, state| state.flush_keys(conn, None))
            .await
            .unwrap();
        assert_eq!(keys_on_disk(dir.path()).0, 2);
        let retry = send(&store, text(c, b, "k2", "again", 300)).await;
        assert_eq!(duplicate_of(&retry), (true, 2));
        assert_eq!(retry.message.text, "two");
        assert_eq!(index_on_disk(dir.path()), [], "still pending");
        // Every other read writes the pending entries first.
        assert_eq!(history_texts(&store, c).await, ["one", "two"]);
        assert_eq!(index_on_disk(dir.path()), [(c, 1, 1), (c, 2, 2)]);
        let view = store.conversation(c, a).await.unwrap();
        assert_eq!(view.last_message.map(|m| m.text).as_deref(), Some("two"));
        assert_eq!(
            view.unread_count, 1,
            "bob's message; alice's own is not unread"
        );
    }

    /// A member's (delivered, seen) in `members` on disk, and the number of
    /// rows in `watermark_log`.
    fn watermarks_on_disk(
        dir: &Path,
        conversation_id: ConversationId,
        user: UserId,
    ) -> ((u64, u64), i64) {
        let conn = Connection::open(dir.join(FILE_NAME)).unwrap();
        let row = conn
            .query_row(
                "SELECT delivered_seq, seen_seq FROM members WHERE conversation_id = ?1 AND user_id = ?2",
                params![sql(conversation_id), sql(user)],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .unwrap();
        let logged = conn
            .query_row("SELECT COUNT(*) FROM watermark_log", [], |r| r.get(0))
            .unwrap();
        (row, logged)
    }

    async fn mark(
        store: &SqliteStore,
        c: ConversationId,
        user: UserId,
        kind: WatermarkKind,
        seq: u64,
    ) -> Option<(u64, u64)> {
        let moved = store
            .advance_watermarks(vec![WatermarkUpdate {
                conversation_id: c,
                user_id: user,
                kind,
                seq,
            }])
            .await
            .unwrap();
        moved.first().map(|m| (m.delivered_seq, m.seen_seq))
    }

    #[tokio::test]
    async fn watermark_moves_are_logged_and_written_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (a, b, c) = friends_with_direct(&store, "alice", "bob").await;
        hold_write_behind(&store).await;
        send(&store, text(c, a, "k1", "one", 100)).await;
        send(&store, text(c, a, "k2", "two", 200)).await;
        assert_eq!(
            mark(&store, c, b, WatermarkKind::Delivered, 2).await,
            Some((2, 0))
        );
        assert_eq!(
            mark(&store, c, b, WatermarkKind::Delivered, 1).await,
            None,
            "the pending move is the current value"
        );
        assert_eq!(
            mark(&store, c, b, WatermarkKind::Seen, 1).await,
            Some((2, 1))
        );
        // Durable as log rows (alice's own two, bob's two), members not
        // yet written.
        assert_eq!(watermarks_on_disk(dir.path(), c, b), ((0, 0), 4));
        assert_eq!(watermarks_on_disk(dir.path(), c, a), ((0, 0), 4));
        // Any other job writes them first and empties the log.
        let ranges = store.pending_ranges(b).await.unwrap().unwrap_or_default();
        assert!(ranges.is_empty(), "bob has everything: {ranges:?}");
        assert_eq!(watermarks_on_disk(dir.path(), c, b), ((2, 1), 0));
        assert_eq!(watermarks_on_disk(dir.path(), c, a), ((2, 2), 0));
        let view = store.conversation(c, b).await.unwrap();
        assert_eq!(view.unread_count, 1);
    }

    #[tokio::test]
    async fn watermark_slices_write_their_conversations_and_trim_the_log_after_a_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (a, b, c1) = friends_with_direct(&store, "alice", "bob").await;
        let (carol, dave, c2) = friends_with_direct(&store, "carol", "dave").await;
        let (s1, s2) = (c1 % KEY_SLICES, c2 % KEY_SLICES);
        assert!(0 < s1 && s1 < s2, "conversations {c1} and {c2}");
        hold_write_behind(&store).await;
        let slice =
            |n: u64| store.call_hot(move |conn, state| state.flush_watermarks(conn, Some(n)));
        send(&store, text(c1, a, "k1", "one", 100)).await;
        send(&store, text(c2, carol, "k2", "two", 100)).await;
        mark(&store, c1, b, WatermarkKind::Delivered, 1)
            .await
            .unwrap();
        slice(0).await.unwrap(); // the cycle starts: three rows logged
        mark(&store, c2, dave, WatermarkKind::Delivered, 1)
            .await
            .unwrap();
        for n in 1..=s1 {
            slice(n).await.unwrap();
        }
        assert_eq!(watermarks_on_disk(dir.path(), c1, b), ((1, 0), 4));
        assert_eq!(watermarks_on_disk(dir.path(), c2, dave), ((0, 0), 4));
        for n in s1 + 1..KEY_SLICES {
            slice(n).await.unwrap();
        }
        // Dave's move came after the cycle began: its row stays until the
        // next cycle, although its members row is written.
        assert_eq!(watermarks_on_disk(dir.path(), c2, dave), ((1, 0), 1));
        assert_eq!(watermarks_on_disk(dir.path(), c1, a), ((1, 1), 1));
    }

    #[tokio::test]
    async fn nothing_reads_the_tables_until_a_failed_repair_goes_through() {
        // A rolled-back batch takes the pending index entries and heads
        // with it; until the repair rebuilds them the tables are behind
        // what was committed. Reads used to go on meanwhile (only writes
        // waited): history without the last messages, a last seq going
        // backwards, a catch-up skipping them.
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (a, _b, c) = friends_with_direct(&store, "alice", "bob").await;
        hold_write_behind(&store).await;
        for (i, key) in ["k1", "k2"].into_iter().enumerate() {
            send(&store, text(c, a, key, &format!("m{i}"), 100 + i as i64)).await;
        }
        assert_eq!(index_on_disk(dir.path()).len(), 0, "both entries pending");
        // As after a rollback whose repair then fails once.
        store
            .call_hot(|_, state| {
                state.rolled_back(state.next_message_id);
                state.failing_repairs = 1;
                Ok(())
            })
            .await
            .unwrap();
        match store.history(c, Direction::Backward, 0, 100).await {
            Err(StoreError::Unavailable(_)) => {}
            other => panic!("a read while the repair fails: {other:?}"),
        }
        assert!(
            matches!(store.ping().await, Ok(())),
            "the repair went through"
        );
        assert_eq!(history_texts(&store, c).await, ["m0", "m1"]);
    }

    #[tokio::test]
    async fn a_repair_ends_the_cycle_of_watermark_slices() {
        // After a rollback, a repair may fail and a cycle of slices begin
        // before the next repair succeeds. That repair empties the log, so
        // its ids start over, and the cycle's end used to delete the new
        // rows up to the old id: moves whose members rows were not written
        // yet, lost in a crash before their slice.
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (a, b, c) = friends_with_direct(&store, "alice", "bob").await;
        let s = c % KEY_SLICES;
        assert!(s + 1 < KEY_SLICES, "conversation {c}");
        hold_write_behind(&store).await;
        let slice =
            |n: u64| store.call_hot(move |conn, state| state.flush_watermarks(conn, Some(n)));
        for (i, key) in ["k1", "k2", "k3"].into_iter().enumerate() {
            send(&store, text(c, a, key, "hi", 100 + i as i64)).await;
        }
        mark(&store, c, b, WatermarkKind::Delivered, 1)
            .await
            .unwrap();
        slice(0).await.unwrap(); // the cycle starts: the log holds ids up to 4
        // As if a failed repair were pending: the next batch runs it
        // before its transaction, and this time it succeeds. (The rollback
        // before it dropped what was held for writing behind, which the
        // repair rebuilds; the watermarks, this test's subject, stay.)
        store
            .call_hot(|_, state| {
                state.heads.clear();
                state.index.clear();
                state.keys.clear();
                state.needs_repair = true;
                Ok(())
            })
            .await
            .unwrap();
        let repaired = store
            .call_hot(|_, state| Ok(!state.needs_repair))
            .await
            .unwrap();
        assert!(repaired, "the repair went through");
        assert_eq!(watermarks_on_disk(dir.path(), c, b), ((1, 0), 0));
        // A new move, logged with id 1, pending in its slice.
        mark(&store, c, b, WatermarkKind::Delivered, 3)
            .await
            .unwrap();
        assert_eq!(watermarks_on_disk(dir.path(), c, b), ((1, 0), 1));
        slice(KEY_SLICES - 1).await.unwrap(); // the end of a cycle
        assert_eq!(
            watermarks_on_disk(dir.path(), c, b),
            ((1, 0), 1),
            "the move stays logged until its members row is written"
        );
        slice(s).await.unwrap();
        assert_eq!(watermarks_on_disk(dir.path(), c, b).0, (3, 0));
    }

    /// What the test below expects of one conversation: the texts sent
    /// (seq = index + 1) and the recipient's acknowledged watermarks.
    struct Expected {
        conversation: ConversationId,
        sender: UserId,
        recipient: UserId,
        texts: Vec<String>,
        delivered: u64,
        seen: u64,
    }

    async fn check(store: &SqliteStore, e: &Expected, when: &str) {
        assert_eq!(
            history_texts(store, e.conversation).await,
            e.texts,
            "{when}"
        );
        let view = store
            .conversation(e.conversation, e.recipient)
            .await
            .unwrap();
        let member = view
            .members
            .iter()
            .find(|m| m.user_id == e.recipient)
            .unwrap();
        assert_eq!(
            (member.delivered_seq, member.seen_seq),
            (e.delivered, e.seen),
            "{when}"
        );
        assert_eq!(view.last_seq, e.texts.len() as u64, "{when}");
    }

    /// Random sends, retries, marks, partial write-behind, reads, crashes
    /// (no shutdown) and clean restarts: after each, every acknowledged
    /// send and watermark move is there, exactly once, and retries are
    /// recognised.
    #[tokio::test]
    async fn write_behind_survives_crashes_at_any_point() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(18);
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let mut expected = Vec::new();
        for (a, b) in [("alice", "bob"), ("xavier", "yara")] {
            let (sender, recipient, conversation) = friends_with_direct(&store, a, b).await;
            expected.push(Expected {
                conversation,
                sender,
                recipient,
                texts: Vec::new(),
                delivered: 0,
                seen: 0,
            });
        }
        hold_write_behind(&store).await;
        let (mut crashes, mut restarts) = (0, 0);
        for step in 0..300 {
            let e = &mut expected[rng.random_range(0..2)];
            let when = format!("step {step}");
            match rng.random_range(0..100) {
                0..35 => {
                    let n = e.texts.len() + 1;
                    let body = format!("m{n}");
                    let key = format!("{}-{n}", e.conversation);
                    let sent = send(&store, text(e.conversation, e.sender, &key, &body, 100)).await;
                    assert_eq!(duplicate_of(&sent), (false, n as u64), "{when}");
                    e.texts.push(body);
                }
                35..45 if !e.texts.is_empty() => {
                    let n = rng.random_range(1..=e.texts.len());
                    let key = format!("{}-{n}", e.conversation);
                    let retry = send(&store, text(e.conversation, e.sender, &key, "x", 100)).await;
                    assert_eq!(duplicate_of(&retry), (true, n as u64), "{when}");
                    assert_eq!(retry.message.text, e.texts[n - 1], "{when}");
                }
                45..70 if !e.texts.is_empty() => {
                    let seq = rng.random_range(1..=e.texts.len() as u64);
                    let kind = if rng.random_bool(0.5) {
                        WatermarkKind::Seen
                    } else {
                        WatermarkKind::Delivered
                    };
                    let before = (e.delivered, e.seen);
                    e.delivered = e.delivered.max(seq);
                    if kind == WatermarkKind::Seen {
                        e.seen = e.seen.max(seq);
                    }
                    let moved = mark(&store, e.conversation, e.recipient, kind, seq).await;
                    let after = (e.delivered, e.seen);
                    assert_eq!(moved, (after != before).then_some(after), "{when}");
                }
                70..80 => {
                    // Part of the write-behind, as the slices and the
                    // periodic flush would do it.
                    let slice = rng.random_range(0..KEY_SLICES);
                    let heads = rng.random_bool(0.3);
                    store
                        .call_hot(move |conn, state| {
                            state.flush_keys(conn, Some(slice))?;
                            state.flush_watermarks(conn, Some(slice))?;
                            match heads {
                                true => state.flush_heads(conn),
                                false => Ok(()),
                            }
                        })
                        .await
                        .unwrap();
                }
                80..88 => check(&store, e, &when).await,
                88..95 => {
                    // The process dies: nothing pending is written.
                    store.crash_for_test();
                    store = SqliteStore::open(dir.path()).unwrap();
                    hold_write_behind(&store).await;
                    crashes += 1;
                    for e in &expected {
                        check(&store, e, &format!("{when}, after a crash")).await;
                    }
                }
                95..100 => {
                    drop(store);
                    store = SqliteStore::open(dir.path()).unwrap();
                    hold_write_behind(&store).await;
                    restarts += 1;
                    for e in &expected {
                        check(&store, e, &format!("{when}, after a restart")).await;
                    }
                }
                _ => {}
            }
        }
        assert!(
            crashes >= 5 && restarts >= 5,
            "{crashes} crashes, {restarts} restarts"
        );
        for e in &expected {
            assert!(e.texts.len() > 20 && e.seen > 0, "{} sends", e.texts.len());
            check(&store, e, "the end").await;
        }
    }

    #[tokio::test]
    async fn watermark_moves_lost_in_a_crash_are_replayed_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (a, b, c) = friends_with_direct(&store, "alice", "bob").await;
        hold_write_behind(&store).await;
        send(&store, text(c, a, "k1", "one", 100)).await;
        assert_eq!(
            mark(&store, c, b, WatermarkKind::Seen, 1).await,
            Some((1, 1))
        );
        // The process dies: no shutdown, nothing pending is written.
        store.crash_for_test();
        assert_eq!(watermarks_on_disk(dir.path(), c, b), ((0, 0), 2));
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(
            watermarks_on_disk(dir.path(), c, b),
            ((1, 1), 0),
            "replayed at open"
        );
        assert_eq!(watermarks_on_disk(dir.path(), c, a), ((1, 1), 0));
        assert_eq!(mark(&store, c, b, WatermarkKind::Seen, 1).await, None);
    }

    #[tokio::test]
    async fn a_rolled_back_batch_keeps_the_logged_watermark_moves_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (a, b, c) = friends_with_direct(&store, "alice", "bob").await;
        hold_write_behind(&store).await;
        send(&store, text(c, a, "k1", "one", 100)).await;
        assert_eq!(
            mark(&store, c, b, WatermarkKind::Delivered, 1).await,
            Some((1, 0))
        );
        // A job that writes the pending moves (as every non-hot job does
        // first), moves bob's seen watermark, then fails: all of it rolls
        // back, the committed delivered move must come back from the log.
        let failed = store
            .call(move |conn, state| {
                state.move_watermark(conn, c, b, (1, 1))?;
                Err::<(), _>(StoreError::Internal("injected".into()))
            })
            .await;
        assert!(
            matches!(failed, Err(StoreError::Unavailable(_))),
            "{failed:?}"
        );
        assert_eq!(watermarks_on_disk(dir.path(), c, b), ((1, 0), 0));
        assert_eq!(mark(&store, c, b, WatermarkKind::Delivered, 1).await, None);
        assert_eq!(
            mark(&store, c, b, WatermarkKind::Seen, 1).await,
            Some((1, 1))
        );
    }

    #[tokio::test]
    async fn a_slice_of_senders_written_keeps_through_below_the_unwritten_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (a, b, c) = friends_with_direct(&store, "alice", "bob").await;
        assert_ne!(a % KEY_SLICES, b % KEY_SLICES);
        for (sender, key) in [(a, "a1"), (b, "b1"), (a, "a2")] {
            send(&store, text(c, sender, key, "hi", 100)).await;
        }
        store
            .call_hot(move |conn, state| state.flush_keys(conn, Some(a % KEY_SLICES)))
            .await
            .unwrap();
        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        let written_for_a: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM idempotency WHERE sender_id = ?1",
                [sql(a)],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(written_for_a, 2);
        // Whatever else was written meanwhile, every message up to
        // `through` has its key on disk (here bob's b1, message 2, is
        // normally still pending, so `through` stays at 1).
        let uncovered: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM messages m
                 WHERE m.message_id <= (SELECT keys_message_id FROM written_through)
                   AND NOT EXISTS (SELECT 1 FROM idempotency i
                                   WHERE i.sender_id = m.sender_id
                                     AND i.client_msg_id = m.client_msg_id)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(uncovered, 0);
    }

    #[tokio::test]
    async fn keys_lost_in_a_crash_are_rebuilt_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (a, c) = {
            let store = SqliteStore::open(dir.path()).unwrap();
            let (a, _, c) = friends_with_direct(&store, "alice", "bob").await;
            send(&store, text(c, a, "k1", "one", 100)).await;
            send(&store, text(c, a, "k2", "two", 200)).await;
            (a, c)
        };
        // As if the process died before writing any key.
        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        conn.execute_batch(
            "DELETE FROM idempotency; UPDATE written_through SET keys_message_id = 0;",
        )
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(keys_on_disk(dir.path()), (2, 2), "rebuilt at open");
        let retry = send(&store, text(c, a, "k2", "again", 300)).await;
        assert_eq!(duplicate_of(&retry), (true, 2));
    }

    #[tokio::test]
    async fn a_rolled_back_batch_leaves_heads_and_keys_as_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (a, _, c) = friends_with_direct(&store, "alice", "bob").await;
        send(&store, text(c, a, "k1", "one", 100)).await;
        // A job that writes the pending head (seq 1), appends k2 as seq 2,
        // then fails: the whole batch rolls back, the head written in it
        // too, and k2's pending key must go with it.
        let failed = store
            .call(move |conn, state| {
                append_one(conn, state, text(c, a, "k2", "two", 200), false)?;
                Err::<(), _>(StoreError::Internal("injected".into()))
            })
            .await;
        assert!(
            matches!(failed, Err(StoreError::Unavailable(_))),
            "{failed:?}"
        );
        // Repaired right after the rollback, from what is stored: seq 1.
        assert_eq!(head_on_disk(dir.path(), c), (1, 100));
        assert_eq!(index_on_disk(dir.path()), [(c, 1, 1)]);
        let k2 = send(&store, text(c, a, "k2", "two", 300)).await;
        assert_eq!(duplicate_of(&k2), (false, 2), "k2 was never stored; no gap");
        let k1 = send(&store, text(c, a, "k1", "one", 400)).await;
        assert_eq!(
            duplicate_of(&k1),
            (true, 1),
            "k1's key survived the rollback"
        );
        assert_eq!(history_texts(&store, c).await, ["one", "two"]);
        let view = store.conversation(c, a).await.unwrap();
        assert_eq!((view.last_seq, view.last_activity_ms), (2, 300));
    }

    /// SQLite rolls a transaction back by itself on some errors (I/O, a
    /// full disk, no memory while its page cache spills), whoever catches
    /// the error. The rest of the batch used to run anyway, outside any
    /// transaction: each statement committed on its own, stored although
    /// its caller heard UNAVAILABLE, and the ids the rollback handed out
    /// again then collided with them, so sends failed until a restart.
    #[tokio::test]
    async fn a_batch_whose_transaction_sqlite_rolled_back_runs_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (a, _, c) = friends_with_direct(&store, "alice", "bob").await;
        let (carol, _, d) = friends_with_direct(&store, "carol", "dave").await;
        send(&store, text(c, a, "k1", "one", 100)).await;
        // The thread is held until the next batch has queued up: the four
        // jobs are queued when the join first polls them, before the fifth
        // future lets the thread go.
        let (started, held) = std::sync::mpsc::channel();
        let (release, released) = std_mpsc::channel::<()>();
        let hold = store.call(move |_, _| {
            started.send(()).unwrap();
            released.recv().unwrap();
            Ok(())
        });
        let queued = async {
            tokio::task::spawn_blocking(move || held.recv().unwrap())
                .await
                .unwrap();
            let (two, rollback, history, three, ()) = tokio::join!(
                store.append(vec![text(c, a, "k2", "two", 200)]),
                // The rollback SQLite makes on its own, with the error
                // swallowed by the job that met it.
                store.call(|conn, _| conn.execute_batch("ROLLBACK").map_err(internal)),
                store.history(d, Direction::Backward, 0, 10),
                store.append(vec![text(d, carol, "k3", "three", 300)]),
                async { release.send(()).unwrap() },
            );
            (two, rollback, history, three)
        };
        let (held, (two, rollback, history, three)) = tokio::join!(hold, queued);
        held.unwrap();
        for (what, failed) in [
            ("k2", two.map(drop)),
            ("the job", rollback),
            ("the read", history.map(drop)),
            ("k3", three.map(drop)),
        ] {
            assert!(
                matches!(failed, Err(StoreError::Unavailable(_))),
                "{what}: {failed:?}"
            );
        }
        let stored: i64 = Connection::open(dir.path().join(FILE_NAME))
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM messages WHERE client_msg_id IN ('k2', 'k3')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, 0, "nothing of the batch stored");
        // Sends go on, with ids of their own.
        for (key, at) in [("k3", 400), ("k4", 500)] {
            send(&store, text(d, carol, key, key, at)).await;
        }
        send(&store, text(c, a, "k2", "two", 600)).await;
        assert_eq!(history_texts(&store, c).await, ["one", "two"]);
        assert_eq!(history_texts(&store, d).await, ["k3", "k4"]);
    }

    /// Failing checkpoints are counted: meanwhile the WAL grows without
    /// bound and the frames gauge stands still, so the count is what an
    /// operator can see.
    #[tokio::test]
    async fn failing_checkpoints_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let metrics = CheckpointMetrics {
            failures: Counter::from_arc(failures.clone()),
            ..CheckpointMetrics::default()
        };
        metrics.fail_next.store(3, Ordering::Relaxed);
        let store = SqliteStore::open_observed(dir.path(), MIN_COMMIT_GAP, metrics).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while failures.load(Ordering::Relaxed) < 3 {
            assert!(Instant::now() < deadline, "never counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Then they work again, and nothing more is counted.
        let (a, _, c) = friends_with_direct(&store, "alice", "bob").await;
        send(&store, text(c, a, "k1", "one", 100)).await;
        tokio::time::sleep(CHECKPOINT_INTERVAL * 3).await;
        assert_eq!(failures.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn migration_moves_existing_keys_into_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        {
            // A file as version 2 left it, with one message.
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..2] {
                conn.execute_batch(sql).unwrap();
            }
            conn.execute_batch(
                "PRAGMA user_version = 2;
                 INSERT INTO users (id, username, password_hash, created_at_ms) VALUES (1, 'a', 'h', 0);
                 INSERT INTO conversations (id, kind, name, created_at_ms, last_seq, last_activity_ms)
                     VALUES (1, 2, 'g', 0, 1, 5);
                 INSERT INTO members (conversation_id, user_id, role, joined_seq, delivered_seq, seen_seq)
                     VALUES (1, 1, 1, 0, 1, 1);
                 INSERT INTO messages (conversation_id, seq, message_id, sender_id, client_msg_id, type, sent_at_ms, body)
                     VALUES (1, 1, 1, 1, 'old-key', 1, 5, 'hello');",
            )
            .unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(keys_on_disk(dir.path()), (1, 1));
        assert_eq!(index_on_disk(dir.path()), [(1, 1, 1)], "V4 indexed the log");
        let retry = send(&store, text(1, 1, "old-key", "again", 9)).await;
        assert_eq!(duplicate_of(&retry), (true, 1));
        assert_eq!(retry.message.text, "hello");
        send(&store, text(1, 1, "new-key", "later", 10)).await;
        assert_eq!(history_texts(&store, 1).await, ["hello", "later"]);
    }

    /// V16 dates the ranges recorded before it by the message that ended
    /// them, and names them by the group's name at the migration.
    #[tokio::test]
    async fn migration_lists_the_groups_left_before_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            // As V15 left it: alice removed carol from her group "trip"
            // with its first message, at 30 ms, and bob with its second,
            // at 40 ms, which is not indexed yet (it is above
            // heads_message_id); renamed since.
            let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
            for sql in &MIGRATIONS[..15] {
                conn.execute_batch(sql).unwrap();
            }
            conn.execute_batch(
                "PRAGMA user_version = 15;
                 INSERT INTO users (id, username, password_hash, created_at_ms)
                     VALUES (1, 'alice', 'h', 0), (2, 'bob', 'h', 0), (3, 'carol', 'h', 0);
                 INSERT INTO conversations (id, kind, name, created_at_ms, last_seq, last_activity_ms)
                     VALUES (7, 2, 'trip 2', 0, 2, 40);
                 INSERT INTO members (conversation_id, user_id, role, joined_seq, delivered_seq, seen_seq)
                     VALUES (7, 1, 1, 0, 2, 2);
                 INSERT INTO messages (message_id, conversation_id, seq, sender_id, client_msg_id, type, sent_at_ms, body)
                     VALUES (1, 7, 1, 1, 'k1', 1, 30, 'x'), (2, 7, 2, 1, 'k2', 1, 40, 'y');
                 INSERT INTO message_index (conversation_id, seq, message_id) VALUES (7, 1, 1);
                 UPDATE written_through SET keys_message_id = 2, heads_message_id = 1;
                 INSERT INTO former_members (user_id, conversation_id, joined_seq, left_seq)
                     VALUES (3, 7, 0, 1), (2, 7, 0, 2);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        for (user, seq, at) in [(3, 1, 30), (2, 2, 40)] {
            let list = store.conversations(user, (0, 0), 10).await.unwrap();
            assert_eq!(list.len(), 1, "{list:?}");
            let entry = &list[0];
            assert!(entry.former);
            assert_eq!(
                (
                    entry.id,
                    entry.name.as_str(),
                    entry.last_seq,
                    entry.last_activity_ms
                ),
                (7, "trip 2", seq, at),
                "user {user}"
            );
        }
    }

    #[tokio::test]
    async fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let store = SqliteStore::open(dir.path()).unwrap();
            store
                .create_user("alice".into(), "hash".into(), 1)
                .await
                .unwrap()
        };
        let store = SqliteStore::open(dir.path()).unwrap();
        let user = store.user_by_name("alice".into()).await.unwrap().unwrap();
        assert_eq!(user.id, id);
    }

    /// (frames in the WAL, frames copied to the database file), from the
    /// WAL index (SQLite's `-shm` file: the header's `mxFrame` at byte 16,
    /// the checkpoint's `nBackfill` at byte 96, in native byte order).
    fn wal_index(dir: &Path) -> (u32, u32) {
        let shm = std::fs::read(dir.join(format!("{FILE_NAME}-shm"))).unwrap();
        let word = |at: usize| u32::from_ne_bytes(shm[at..at + 4].try_into().unwrap());
        (word(16), word(96))
    }

    #[tokio::test]
    async fn committed_frames_reach_the_database_file_without_more_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        back_to_back_sends(&store, 50).await;
        // Far fewer frames than SQLite's own automatic checkpoint waits
        // for (1,000), and nothing commits after them: only the
        // checkpointer thread copies them.
        assert!(wal_index(dir.path()).0 < 1000, "frames from 50 sends");
        all_frames_copied(dir.path()).await;
    }

    /// Waits until the checkpointer copied every WAL frame into the file.
    async fn all_frames_copied(dir: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (frames, copied) = wal_index(dir);
            if frames > 0 && copied == frames {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{copied} of {frames} WAL frames copied after a minute"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// An unsent text's bytes leave the database file once its pages are
    /// checkpointed, a short one in its row's page and a long one's
    /// overflow pages too (freed, and zeroed as they are).
    #[tokio::test]
    async fn an_unsent_text_leaves_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (a, _, c) = friends_with_direct(&store, "alice", "bob").await;
        // Its head stays in the row, its tail (past ~4 KB) overflows.
        let long: String = (0..800).map(|i| format!("zebra-{i:04} ")).collect();
        let texts = [
            ("quagga-4417 meets at the old mill", "quagga-4417"),
            (long.as_str(), "zebra-0799"),
        ];
        let in_file = |marker: &str| {
            let bytes = std::fs::read(dir.path().join(FILE_NAME)).unwrap();
            bytes.windows(marker.len()).any(|w| w == marker.as_bytes())
        };
        let mut seqs = Vec::new();
        for (i, (secret, _)) in texts.iter().enumerate() {
            let key = format!("s{i}");
            seqs.push(
                send(&store, text(c, a, &key, secret, 100))
                    .await
                    .message
                    .seq,
            );
        }
        send(&store, text(c, a, "k", "kept", 101)).await;
        all_frames_copied(dir.path()).await;
        for (_, marker) in texts {
            assert!(in_file(marker), "{marker} is in the file before its unsend");
        }
        for (i, seq) in seqs.into_iter().enumerate() {
            let unsend = NewMessage {
                message_type: proto::MessageType::Unsend,
                reply_to_seq: seq,
                ..text(c, a, &format!("u{i}"), "", 102)
            };
            // Durable once answered: its frames are in the WAL's count.
            send(&store, unsend).await;
        }
        all_frames_copied(dir.path()).await;
        for (_, marker) in texts {
            assert!(!in_file(marker), "{marker} is still in the file");
        }
    }

    #[tokio::test]
    async fn the_wal_starts_over_while_sends_keep_coming() {
        let dir = tempfile::tempdir().unwrap();
        // No pause between commits and sixteen senders, so a commit is
        // nearly always in flight and a transaction seldom begins with
        // every frame copied by chance: the writer has to finish the job.
        let store = Arc::new(SqliteStore::open_with(dir.path(), Duration::ZERO).unwrap());
        let (a, _, c) = friends_with_direct(&*store, "alice", "bob").await;
        let stop = Arc::new(AtomicBool::new(false));
        let senders: Vec<_> = (0..16)
            .map(|n| {
                let (store, stop) = (store.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        send(&store, text(c, a, &format!("s{n}-{i}"), "hi", 100)).await;
                        i += 1;
                    }
                })
            })
            .collect();
        // Until the WAL has started over three times, each time from at
        // least half the restart threshold: with no checkpoints it only
        // grows.
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut restarts, mut last, mut longest) = (0, 0, 0);
        while restarts < 3 {
            let (frames, _) = wal_index(dir.path());
            if frames < last && last as i64 >= WAL_RESTART_FRAMES / 2 {
                restarts += 1;
            }
            last = frames;
            longest = longest.max(frames);
            assert!(
                Instant::now() < deadline,
                "the WAL started over {restarts} times in two minutes (longest {longest} frames)"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for sender in senders {
            sender.await.unwrap();
        }
    }
}
