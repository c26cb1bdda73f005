//! The delivery pipeline: the one code path every message takes, whatever
//! the conversation's size.
//!
//! ```text
//! messages stream --Send--> [send committer] --append(batch)--> HistoryStore
//!                                  |  (durable)
//!                                  +--> SendAck to the sender's session
//!                                  +--> Deliver to every other member online
//!                                  +--> [cache updater]: RecentCache, unread queues
//!
//! messages / receipts streams --DeliveryAck / MarkSeen--> [watermark committer]
//!        --advance_watermarks(batch)--> HistoryStore --> Receipt to other members
//!                                  |             (all of a small group, the
//!                                  |             covered messages' senders
//!                                  |             in a large one: receipts.rs)
//!                                  +--> [cache updater]: acked entries leave the queues
//! ```
//!
//! Each committer is one task that takes every request waiting in its
//! queue, hands the whole batch to the store as one transaction (group
//! commit), and only then answers. There are `committers` pairs of them
//! (the `committers` setting), and a conversation always goes to the same
//! pair ([`shard_of`]): because one task commits a conversation's batches
//! in order and fans out in seq order, every session's queue receives a
//! conversation's messages in increasing seq order. Several pairs let a
//! store that runs transactions concurrently (Postgres) have several
//! commits in flight, at the price of smaller batches; the default is one
//! (TUNING.md has the measurements). SQLite has one writer and folds
//! concurrent jobs into one transaction anyway.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chat_protocol::{Body, ErrorCode, Frame, StreamKind, proto};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::calls::Calls;
use crate::config::Config;
use crate::error::Refusal;
use crate::hub::{Hub, SessionHandle};
use crate::metrics::Metrics;
use crate::notify::{Notice, NoticeKind, Notifier};
use crate::receipts::ReceiptRoutes;
use crate::store::{
    Appended, ConversationView, Direction, GroupCreated, GroupEdit, HistoryStore, InboxStore,
    NewGroup, NewMessage, RecentCache, StoreError, UserId, WatermarkKind, WatermarkUpdate,
};
use crate::wire::{DeliverKey, Outbound};

/// Queue depth in front of each committer; a full queue makes stream
/// readers wait, which pushes back on clients through QUIC flow control.
const QUEUE_DEPTH: usize = 4096;
/// Most sends in one group commit: all that are queued. A committer has
/// one transaction in flight, so a smaller cap would also cap its
/// throughput at cap / commit time, and once the store is slower than
/// that the queue fills instead. (256, with Postgres on the 2-core
/// benchmark host, held 10,000 sends/s to ~9,800 and the queue to its
/// depth: p50 ack 510-580 ms against 120-200 ms taking everything;
/// BENCHMARKS.md, session 22.) At lower rates batches are whatever
/// arrived during the previous commit, far below it.
const MAX_SEND_BATCH: usize = QUEUE_DEPTH;
/// Most watermark moves in one transaction: all that are queued, for the
/// same reason.
const MAX_MARK_BATCH: usize = QUEUE_DEPTH;

/// How long delivery acks of a failed watermark batch wait before they are
/// tried again, when no other mark comes first.
const MARK_RETRY: Duration = Duration::from_millis(200);

/// The retry-after for a send held behind an earlier failed one: short,
/// since the client resends the failed one first anyway.
const HELD_RETRY: Duration = Duration::from_millis(100);

/// What the send committer stores.
pub enum Work {
    /// A validated message.
    Message(NewMessage),
    /// A group change (answered on control).
    Group {
        /// The group, who changes it, what and under which key (boxed, as
        /// a new group is).
        edit: Box<GroupEdit>,
        /// The configured group size limit.
        max_members: usize,
    },
    /// A new group (answered on control with the conversation).
    CreateGroup {
        /// The group, with its creator's idempotency key (boxed: rare, and
        /// larger than a message, it would size every job).
        group: Box<NewGroup>,
        /// The configured group size limit.
        max_members: usize,
    },
}

/// What a send committer takes, in its conversations' order.
enum Job {
    /// A client's send or group change, answered when stored.
    Client(SendJob),
    /// A message the server writes (a call's log), answered to nobody
    /// (boxed: rare, and larger than a job's other fields).
    Server(Box<ServerWrite>),
}

/// A message the server writes, and who may write it.
pub struct ServerWrite {
    /// What to store; its `sender_id` is the first of `senders` still a
    /// member.
    pub message: NewMessage,
    /// Who the message may come from, in order: a call's log comes from
    /// its caller, or, if they left the group since, from the first who
    /// took part and is still in it.
    pub senders: Vec<UserId>,
    /// Tries so far: the store unavailable, or the conversation paused
    /// behind a write of unknown outcome, make it wait and try again, up
    /// to [`SERVER_WRITE_TRIES`].
    pub tries: u32,
}

/// How often a server write is tried before it is given up (spaced by
/// [`PAUSED_RETRY`]: a minute in all, twice [`HOLD_GRACE`], so a pause
/// that a client's last retry kept up ends first).
const SERVER_WRITE_TRIES: u32 = 120;

/// A validated send (or group change) waiting for its commit.
pub struct SendJob {
    /// What to store.
    pub work: Work,
    /// The client's request id, echoed in the ack.
    pub request_id: u64,
    /// Where the ack goes.
    pub session: Arc<SessionHandle>,
    /// When the request was decoded (for the latency metrics).
    pub received: Instant,
}

/// A watermark move, with an optional reply for MarkSeen.
pub struct MarkJob {
    /// What to move.
    pub update: WatermarkUpdate,
    /// For MarkSeen: who to answer (boxed: a delivery ack, the common
    /// case, has none, and a job sits in every reader's state).
    pub reply: Option<Box<MarkReply>>,
}

/// What a watermark committer takes.
enum MarkWork {
    Move(MarkJob),
    /// Answered once every move queued before it on this committer is
    /// stored (see [`Delivery::flush_marks`]).
    Flush(oneshot::Sender<()>),
}

/// Where a MarkSeen's answer goes.
pub struct MarkReply {
    /// The client's request id.
    pub request_id: u64,
    /// The session to answer.
    pub session: Arc<SessionHandle>,
    /// The connection's slot for an unanswered mark, given back once the
    /// answer is queued.
    pub slot: OwnedSemaphorePermit,
}

impl MarkReply {
    /// Queues `frame` as the answer, freeing the slot.
    fn answer(self, frame: &Frame) {
        self.session
            .push(StreamKind::Receipts, Outbound::frame(frame));
    }
}

/// Handle to the committers: one send and one watermark committer per
/// shard of the conversations.
pub struct Delivery {
    sends: Vec<mpsc::Sender<Job>>,
    marks: Vec<mpsc::Sender<MarkWork>>,
    /// Delivery acks dropped by any mark committer since the node started
    /// (see [`Delivery::acks_lost`]).
    acks_lost: Arc<AtomicU64>,
}

/// The committers' tasks, to await at shutdown so in-flight commits finish.
pub struct DeliveryTasks {
    tasks: Vec<JoinHandle<()>>,
}

impl DeliveryTasks {
    /// Waits until every committer has drained its queue and stopped
    /// (which happens once every `Delivery` handle is dropped).
    pub async fn join(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The committer pair that owns `conversation_id`, of `shards`.
/// Conversation ids are handed out in sequence, so the remainder spreads
/// them evenly.
pub fn shard_of(conversation_id: u64, shards: usize) -> usize {
    (conversation_id % shards.max(1) as u64) as usize
}

impl Delivery {
    /// Starts `config.committers` pairs of committers (at least one).
    pub fn start(
        config: &Config,
        store: Arc<dyn HistoryStore>,
        cache: Arc<dyn RecentCache>,
        inbox: Option<Arc<dyn InboxStore>>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        (notifier, calls): (Option<Arc<Notifier>>, Arc<Calls>),
    ) -> (Arc<Delivery>, DeliveryTasks) {
        let shards = config.committers;
        let acks_lost = Arc::new(AtomicU64::new(0));
        let committer = Committer {
            store,
            hub,
            metrics,
            notifier,
            calls,
            routes: Arc::new(ReceiptRoutes::new(
                config.limits.receipt_broadcast_max_members,
            )),
            acks_lost: acks_lost.clone(),
        };
        let mut delivery = Delivery {
            sends: Vec::new(),
            marks: Vec::new(),
            acks_lost,
        };
        let mut tasks = Vec::new();
        for _ in 0..shards.max(1) {
            let (sends, sends_rx) = mpsc::channel(QUEUE_DEPTH);
            let (marks, marks_rx) = mpsc::channel(QUEUE_DEPTH);
            let (updates, updates_rx) = mpsc::channel(UPDATE_DEPTH);
            tasks.push(tokio::spawn(send_committer(
                (sends_rx, sends.downgrade()),
                committer.clone(),
                updates.clone(),
            )));
            // Only unread queues hear of watermark moves: without them
            // (the embedded store) there is nothing to send.
            tasks.push(tokio::spawn(mark_committer(
                marks_rx,
                committer.clone(),
                inbox.is_some().then_some(updates),
            )));
            tasks.push(tokio::spawn(update_caches(
                updates_rx,
                cache.clone(),
                inbox.clone(),
            )));
            delivery.sends.push(sends);
            delivery.marks.push(marks);
        }
        (Arc::new(delivery), DeliveryTasks { tasks })
    }

    /// Queues a send; waits only if its committer is saturated.
    pub async fn submit(&self, job: SendJob) -> Result<(), Refusal> {
        let key = match &job.work {
            Work::Message(message) => message.conversation_id,
            Work::Group { edit, .. } => edit.conversation_id,
            // A new conversation has nothing in flight to stay behind:
            // any committer will do.
            Work::CreateGroup { group, .. } => group.creator,
        };
        enqueue(
            &self.sends[shard_of(key, self.sends.len())],
            Job::Client(job),
        )
        .await
    }

    /// Queues a message the server writes (a call's log: see
    /// [`commit_server`]) behind the sends of its conversation queued
    /// before it. Never waits: while the committer's queue is full, a task
    /// waits for room.
    pub fn write(&self, write: ServerWrite) {
        let queue = &self.sends[shard_of(write.message.conversation_id, self.sends.len())];
        requeue(queue.clone(), Box::new(write), Duration::ZERO);
    }

    /// Queues a watermark move.
    pub async fn mark(&self, job: MarkJob) -> Result<(), Refusal> {
        let shard = shard_of(job.update.conversation_id, self.marks.len());
        enqueue(&self.marks[shard], MarkWork::Move(job)).await
    }

    /// Resolves once every watermark move queued before this call is
    /// stored: a batch the store could not reach is retried, and this
    /// waits for it. An error if moves queued before it were lost (a batch
    /// the store refused, or carried retries beyond `MAX_MARK_BATCH`
    /// moves), or the node is stopping. A client leaving gracefully learns
    /// this way that its delivery acks count before it closes.
    ///
    /// A flush sees only the losses of the batches it waits for: a batch
    /// that took a connection's acks and failed before that connection's
    /// flush was queued is behind it. So a leaving client is confirmed
    /// only if, besides, no ack was lost anywhere since it connected (see
    /// [`Delivery::acks_lost`]).
    pub async fn flush_marks(&self) -> Result<(), Refusal> {
        let mut flushed = Vec::with_capacity(self.marks.len());
        for marks in &self.marks {
            let (done, wait) = oneshot::channel();
            enqueue(marks, MarkWork::Flush(done)).await?;
            flushed.push(wait);
        }
        for wait in flushed {
            wait.await.map_err(|_| {
                Refusal::new(ErrorCode::ServerShuttingDown, "server is shutting down")
            })?;
        }
        Ok(())
    }
}

impl Delivery {
    /// How many delivery acks the mark committers have dropped since the
    /// node started (refused by the store, or cut from retries carried
    /// beyond `MAX_MARK_BATCH`). Such a loss costs a redelivery, never a
    /// message; a connection that saw the count move since it connected
    /// gets no confirmation when it leaves.
    pub fn acks_lost(&self) -> u64 {
        self.acks_lost.load(Ordering::Acquire)
    }
}

/// Queues a server write on `queue` after `wait` (at once if zero and
/// there is room; else from a task). A node that stops drops it.
fn requeue(queue: mpsc::Sender<Job>, write: Box<ServerWrite>, wait: Duration) {
    let write = if wait.is_zero() {
        match queue.try_send(Job::Server(write)) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(job)) => job,
        }
    } else {
        Job::Server(write)
    };
    // Weak: a write waiting its turn does not keep the committer running
    // once the node lets it go.
    let queue = queue.downgrade();
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        if let Some(queue) = queue.upgrade() {
            let _ = queue.send(write).await;
        }
    });
}

/// `try_send`, and only when the queue is full the (boxed) waiting send:
/// the stream readers that call this live as long as their connections,
/// and an inline `send` future would make each of them larger for good.
async fn enqueue<T: Send>(queue: &mpsc::Sender<T>, item: T) -> Result<(), Refusal> {
    let shutting_down = || Refusal::new(ErrorCode::ServerShuttingDown, "server is shutting down");
    match queue.try_send(item) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(item)) => Box::pin(queue.send(item))
            .await
            .map_err(|_| shutting_down()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(shutting_down()),
    }
}

/// What both committers work with.
#[derive(Clone)]
struct Committer {
    store: Arc<dyn HistoryStore>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    /// Notifications for members with no connection in the foreground
    /// (when a push gateway is configured).
    notifier: Option<Arc<Notifier>>,
    /// A member who leaves a group, or is removed, leaves its call.
    calls: Arc<Calls>,
    /// Who hears watermark moves (fed with every stored message).
    routes: Arc<ReceiptRoutes>,
    /// See [`Delivery::acks_lost`].
    acks_lost: Arc<AtomicU64>,
}

async fn send_committer(
    (mut rx, me): (mpsc::Receiver<Job>, mpsc::WeakSender<Job>),
    c: Committer,
    updates: mpsc::Sender<CacheUpdate>,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_SEND_BATCH);
    let mut out = Fanout::default();
    let mut holds = Holds::new();
    let mut paused = Paused::default();
    while rx.recv_many(&mut jobs, MAX_SEND_BATCH).await > 0 {
        // Consecutive sends are one group commit; a group change runs alone
        // between them, so its SYSTEM message keeps its place in seq order.
        let mut run: Vec<SendJob> = Vec::new();
        for job in jobs.drain(..) {
            let job = match job {
                Job::Client(job) if matches!(job.work, Work::Message(_)) => {
                    run.push(job);
                    continue;
                }
                job => job,
            };
            let run = std::mem::take(&mut run);
            commit_run(&c, run, &mut out, &mut holds, &mut paused).await;
            match job {
                Job::Client(job) if matches!(job.work, Work::Group { .. }) => {
                    commit_group(&c, job, &mut out, &mut paused).await;
                }
                Job::Client(job) => commit_create(&c, job, &mut out).await,
                Job::Server(write) => {
                    commit_server(&c, write, &mut out, &mut paused, &me).await;
                }
            }
        }
        commit_run(&c, run, &mut out, &mut holds, &mut paused).await;
        // Caches and queues after the acks and pushes, so they never delay
        // "sent", and by another task, so their round trips do not delay
        // the next batch either.
        if !out.stored.is_empty() {
            let update = CacheUpdate::Stored {
                stored: std::mem::take(&mut out.stored),
                queued: std::mem::take(&mut out.queued),
            };
            if !hand_to_updater(&updates, update, &c.metrics) {
                return;
            }
        }
    }
}

/// Queue depth in front of a cache updater, in batches. A full queue (a
/// slow or unreachable Redis, each call waiting out its timeout) drops
/// the update rather than make the committers wait: the caches are never
/// the truth (see [`update_caches`]), and waiting made every SendAck and
/// receipt of the node wait on Redis.
const UPDATE_DEPTH: usize = 64;

/// Queues a cache update without waiting; a full queue drops it (counted
/// and logged). False once the updater is gone.
fn hand_to_updater(
    updates: &mpsc::Sender<CacheUpdate>,
    update: CacheUpdate,
    metrics: &Metrics,
) -> bool {
    match updates.try_send(update) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            metrics.cache_updates_dropped.increment(1);
            // Once a minute at most: while Redis is silent, every batch
            // drops one (the counter has the volume).
            static LAST_WARNED: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
            let mut last = LAST_WARNED.lock().expect("warn lock");
            if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                *last = Some(Instant::now());
                tracing::warn!(
                    "cache updater behind (slow Redis?): dropping updates (chat_cache_updates_dropped_total)"
                );
            }
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// What a committer pair's batches change in the recent cache and the
/// unread queues.
enum CacheUpdate {
    /// Messages stored (for the cache) and queued for their recipients.
    Stored {
        stored: Vec<Arc<proto::Message>>,
        queued: Vec<(UserId, Arc<proto::Message>)>,
    },
    /// Delivered watermarks moved: (member, conversation, seq).
    Delivered(Vec<(UserId, u64, u64)>),
}

/// Applies a committer pair's cache and queue updates in the order its
/// batches committed. Each is one pipelined round trip (Redis) per batch;
/// none is the source of truth: catch-up checks queues against history
/// and history reads check the cache against the conversation's last seq,
/// so a failed update costs a history read, never a message.
async fn update_caches(
    mut rx: mpsc::Receiver<CacheUpdate>,
    cache: Arc<dyn RecentCache>,
    inbox: Option<Arc<dyn InboxStore>>,
) {
    while let Some(update) = rx.recv().await {
        match update {
            CacheUpdate::Stored { stored, queued } => {
                cache.push(&stored).await;
                if let Some(inbox) = &inbox
                    && let Err(e) = inbox.push(queued).await
                {
                    tracing::warn!(error = %e, "inbox push failed");
                }
            }
            CacheUpdate::Delivered(acks) => {
                if let Some(inbox) = &inbox
                    && let Err(e) = inbox.ack(acks).await
                {
                    tracing::warn!(error = %e, "inbox ack failed");
                }
            }
        }
    }
}

/// What a committer batch stored, for the cache and the inbox.
#[derive(Default)]
struct Fanout {
    stored: Vec<Arc<proto::Message>>,
    queued: Vec<(UserId, Arc<proto::Message>)>,
}

/// Connections whose sends failed with a retryable store error, by
/// `conn_id`: the `client_msg_id` of the first failed send and when it
/// failed. Sends the client made before it heard of the failure are still
/// on their way; storing one of them before the failed send comes back
/// would put it ahead in the conversation, so until then they are refused
/// too (UNAVAILABLE, retryable), and client-lib resends from its earliest
/// refused send, in order. Each committer keeps its own: order matters
/// within a conversation, and a conversation has one committer.
type Holds = HashMap<u64, (String, Instant)>;

/// How long a connection's failed send is waited for before its hold is
/// dropped (a client may give up on a message, or disconnect: a new
/// connection resends its whole outbox in order anyway).
const HOLD_GRACE: Duration = Duration::from_secs(30);

/// The retry-after for a send to a conversation paused behind a write
/// whose outcome is unknown ([`Paused`]): the pause lasts until the
/// writer's client sends again, a round trip or a reconnect away.
const PAUSED_RETRY: Duration = Duration::from_millis(500);

/// Conversations a batch whose outcome is unknown wrote to
/// ([`StoreError::Unsettled`]: its COMMIT's answer was lost and the store
/// could not learn whether it committed). Its messages may be stored, at
/// seqs no member was sent. Were a later message of the conversation
/// stored and delivered first, its recipients would ack it, and the retry
/// that finds the earlier one stored would send it only to members still
/// below it (see [`redeliver`]): to nobody. The same holds between the
/// batch's own messages, whose retries may come in any order. So such a
/// conversation takes only the retry of the first of its unsettled writes
/// (same sender, same key; kept in batch order, which is seq order), then
/// of the next, until each has a definite answer (found stored, or
/// refused for good; one stored anew shows that its batch never
/// committed, which settles the rest of that batch too); a write not
/// tried again for `HOLD_GRACE` (a refused or failed retry counts) is
/// given up, its client having stopped sending it. Every other send and
/// group change to the conversation is refused UNAVAILABLE, retryable.
#[derive(Default)]
struct Paused {
    conversations: HashMap<u64, Vec<Unsettled>>,
    /// Numbers the batches that failed so.
    batches: u64,
}

/// A write of unknown outcome that its conversation waits for.
struct Unsettled {
    sender: UserId,
    key: String,
    batch: u64,
    /// When it failed, or a retry of it was last refused or failed again
    /// without an answer: its client is still at it.
    tried: Instant,
}

impl Unsettled {
    fn is(&self, sender: UserId, key: &str) -> bool {
        self.sender == sender && self.key == key
    }
}

impl Paused {
    fn is_empty(&self) -> bool {
        self.conversations.is_empty()
    }

    /// Numbers a batch whose outcome is unknown, for [`add`](Self::add).
    fn next_batch(&mut self) -> u64 {
        self.batches += 1;
        self.batches
    }

    /// Pauses `conversation` until (`sender`, `key`) of `batch` is
    /// settled. A write added again (its retry's outcome unknown too)
    /// keeps its place and batch.
    fn add(&mut self, conversation: u64, sender: UserId, key: String, batch: u64, now: Instant) {
        let writes = self.conversations.entry(conversation).or_default();
        match writes.iter_mut().find(|w| w.is(sender, &key)) {
            Some(write) => write.tried = now,
            None => writes.push(Unsettled {
                sender,
                key,
                batch,
                tried: now,
            }),
        }
    }

    /// Whether a write to `conversation` by `sender` under `key` must wait:
    /// the conversation is paused and this is not the retry of its first
    /// unsettled write. A refused retry of a later one counts as tried.
    fn refuses(
        &mut self,
        conversation: u64,
        sender: UserId,
        key: Option<&str>,
        now: Instant,
    ) -> bool {
        let Some(writes) = self.conversations.get_mut(&conversation) else {
            return false;
        };
        let Some(key) = key else {
            return true;
        };
        match writes.iter().position(|w| w.is(sender, key)) {
            Some(0) => false,
            Some(i) => {
                writes[i].tried = now;
                true
            }
            None => true,
        }
    }

    /// (`sender`, `key`) got a definite answer from the store: `fresh` if
    /// it was stored now (so its batch, being one transaction, stored
    /// nothing), else found stored or refused. The conversation goes on
    /// once all of its writes are settled.
    fn settle(&mut self, conversation: u64, sender: UserId, key: &str, fresh: bool) {
        let Some(writes) = self.conversations.get_mut(&conversation) else {
            return;
        };
        match writes.iter().find(|w| w.is(sender, key)).map(|w| w.batch) {
            Some(batch) if fresh => writes.retain(|w| w.batch != batch),
            Some(_) => writes.retain(|w| !w.is(sender, key)),
            None => {}
        }
        if writes.is_empty() {
            self.conversations.remove(&conversation);
        }
    }

    /// What a lone keyed write (a group change, a server's message) to
    /// `conversation` means for the pause: of unknown outcome, it pauses
    /// the conversation until its retry; failing with the store
    /// unavailable, it is still being tried; any other answer settles it.
    fn record(
        &mut self,
        conversation: u64,
        sender: UserId,
        key: String,
        result: &Result<Appended, StoreError>,
    ) {
        match result {
            Err(StoreError::Unsettled(_)) => {
                let batch = self.next_batch();
                self.add(conversation, sender, key, batch, Instant::now());
            }
            Err(StoreError::Unavailable(_)) => {
                self.still_trying(conversation, sender, &key, Instant::now());
            }
            Ok(appended) => self.settle(conversation, sender, &key, !appended.duplicate),
            Err(_) => self.settle(conversation, sender, &key, false),
        }
    }

    /// A retry of a write `conversation` waits for failed again, without
    /// an answer either way (the store still unavailable): its client is
    /// still at it, so an outage longer than `HOLD_GRACE` does not end the
    /// wait for it.
    fn still_trying(&mut self, conversation: u64, sender: UserId, key: &str, now: Instant) {
        if let Some(write) = self
            .conversations
            .get_mut(&conversation)
            .and_then(|writes| writes.iter_mut().find(|w| w.is(sender, key)))
        {
            write.tried = now;
        }
    }

    /// Gives up on the writes not tried for `HOLD_GRACE` (their clients
    /// stopped sending them); a conversation goes on once none is left.
    fn expire(&mut self, now: Instant) {
        self.conversations.retain(|conversation, writes| {
            writes.retain(|w| {
                let keep = now.duration_since(w.tried) < HOLD_GRACE;
                if !keep {
                    tracing::warn!(
                        conversation,
                        sender = w.sender,
                        "a write of unknown outcome was not sent again in time; its conversation goes on without it"
                    );
                }
                keep
            });
            !writes.is_empty()
        });
    }
}

/// The refusal of a write to a [`Paused`] conversation.
fn paused_refusal() -> Refusal {
    Refusal::new(
        ErrorCode::Unavailable,
        "an earlier message of this conversation is being settled; send again",
    )
    .with_retry_after(PAUSED_RETRY)
}

/// Stores consecutive sends in one transaction, then acks and fans out.
async fn commit_run(
    c: &Committer,
    run: Vec<SendJob>,
    out: &mut Fanout,
    holds: &mut Holds,
    paused: &mut Paused,
) {
    if run.is_empty() {
        return;
    }
    c.metrics.commit_batch.record(run.len() as f64);
    let now = Instant::now();
    if !holds.is_empty() {
        holds.retain(|_, (_, since)| now.duration_since(*since) < HOLD_GRACE);
    }
    if !paused.is_empty() {
        paused.expire(now);
    }
    // Move the messages out (no copy of their text on the hot path); keep
    // who to answer and, should the batch fail, each idempotency key.
    let mut batch: Vec<NewMessage> = Vec::with_capacity(run.len());
    // (request id, session, when received, whom alone it notifies) of each
    // message.
    type Reply = (u64, Arc<SessionHandle>, Instant, Option<UserId>);
    let mut replies: Vec<Reply> = Vec::with_capacity(run.len());
    // (conversation, sender, key) of each message.
    let mut keys: Vec<(u64, UserId, String)> = Vec::with_capacity(run.len());
    for job in run {
        if let Work::Message(message) = job.work {
            if let Some((head, _)) = holds.get(&job.session.conn_id) {
                if *head != message.client_msg_id {
                    let frame = Refusal::new(
                        ErrorCode::Unavailable,
                        "an earlier send failed; send it again first",
                    )
                    .with_retry_after(HELD_RETRY)
                    .to_frame(job.request_id);
                    job.session
                        .push(StreamKind::Messages, Outbound::frame(&frame));
                    continue;
                }
                holds.remove(&job.session.conn_id);
            }
            if !paused.is_empty()
                && paused.refuses(
                    message.conversation_id,
                    message.sender_id,
                    Some(&message.client_msg_id),
                    now,
                )
            {
                let frame = paused_refusal().to_frame(job.request_id);
                job.session
                    .push(StreamKind::Messages, Outbound::frame(&frame));
                // As for a failed send: what this connection sent after it
                // must not be stored first once the pause ends.
                holds
                    .entry(job.session.conn_id)
                    .or_insert((message.client_msg_id, now));
                continue;
            }
            keys.push((
                message.conversation_id,
                message.sender_id,
                message.client_msg_id.clone(),
            ));
            replies.push((
                job.request_id,
                job.session,
                job.received,
                message.notify_only,
            ));
            batch.push(message);
        }
    }
    if batch.is_empty() {
        return;
    }
    let results = match c.store.append(batch).await {
        Ok(results) => results,
        Err(e) => {
            // Nothing of the batch is known to be durable: every sender
            // hears the error. A retryable one (the store unavailable) is
            // retried with the same client_msg_id, and its connection is
            // held until the first of them returns; a final one is not
            // retried, so nothing is held for it. One whose outcome is
            // unknown also pauses its conversations (see `Paused`).
            let unsettled = matches!(e, StoreError::Unsettled(_)).then(|| paused.next_batch());
            let refusal = Refusal::from(e);
            let hold = refusal.code.is_retryable();
            let failed_at = Instant::now();
            let mut held = std::collections::HashSet::new();
            for ((request_id, session, _, _), (conversation, sender, key)) in
                replies.into_iter().zip(keys)
            {
                let frame = refusal.to_frame(request_id);
                session.push(StreamKind::Messages, Outbound::frame(&frame));
                if let Some(batch) = unsettled {
                    paused.add(conversation, sender, key.clone(), batch, failed_at);
                } else if hold {
                    paused.still_trying(conversation, sender, &key, failed_at);
                } else {
                    // Refused for good: nothing of it is stored.
                    paused.settle(conversation, sender, &key, false);
                }
                // The connection's first failed send is the one to wait
                // for: a hold it has now was set in this run, by a send
                // it made later (refused for a pause), and kept instead it
                // would refuse this one for good.
                if hold && held.insert(session.conn_id) {
                    holds.insert(session.conn_id, (key, failed_at));
                }
            }
            return;
        }
    };
    for (((request_id, session, received, notify_only), result), (conversation, sender, key)) in
        replies.into_iter().zip(results).zip(keys)
    {
        if !paused.is_empty() {
            // Each answer is definite, whatever it is.
            let fresh = matches!(&result, Ok(appended) if !appended.duplicate);
            paused.settle(conversation, sender, &key, fresh);
        }
        let appended = match result {
            Ok(appended) => appended,
            Err(e) => {
                let frame = Refusal::from(e).to_frame(request_id);
                session.push(StreamKind::Messages, Outbound::frame(&frame));
                continue;
            }
        };
        let message = &appended.message;
        let ack = Frame::new(
            request_id,
            Body::SendAck(proto::SendAck {
                conversation_id: message.conversation_id,
                seq: message.seq,
                message_id: message.message_id,
                sent_at_ms: message.sent_at_ms,
                client_msg_id: message.client_msg_id.clone(),
                duplicate: appended.duplicate,
            }),
        );
        session.push(StreamKind::Messages, Outbound::frame(&ack));
        c.metrics.acks.increment(1);
        c.metrics
            .send_to_ack
            .record(received.elapsed().as_secs_f64());
        if appended.duplicate {
            redeliver(c, &appended, out);
            continue;
        }
        fan_out(
            c,
            appended,
            (session.conn_id, Some(received)),
            notify_only,
            out,
        );
    }
}

/// Stores a message the server writes (a call's log) and fans it out like
/// any other, to every device of its sender too. Nobody waits for it. Its
/// first sender still a member writes it (a removed caller is refused,
/// which stores nothing, so the next may). A conversation paused behind a
/// write of unknown outcome, or a store unavailable, make it wait and try
/// again ([`SERVER_WRITE_TRIES`]); then, or refused for good, it is logged
/// and not written: it records what happened, it carries nothing a user
/// sent. Under its key (one per call) a second write stores nothing and
/// goes to the members still owed it and to its sender's devices.
async fn commit_server(
    c: &Committer,
    mut write: Box<ServerWrite>,
    out: &mut Fanout,
    paused: &mut Paused,
    me: &mpsc::WeakSender<Job>,
) {
    let conversation = write.message.conversation_id;
    let again = |mut write: Box<ServerWrite>, why: &dyn std::fmt::Display| {
        write.tries += 1;
        match me.upgrade() {
            Some(queue) if write.tries < SERVER_WRITE_TRIES => {
                requeue(queue, write, PAUSED_RETRY);
            }
            _ => {
                tracing::warn!(conversation, key = write.message.client_msg_id, reason = %why, "gave up writing a message of the server")
            }
        }
    };
    if !paused.is_empty() {
        paused.expire(Instant::now());
        let (sender, key) = (
            write.message.sender_id,
            write.message.client_msg_id.as_str(),
        );
        if paused.refuses(conversation, sender, Some(key), Instant::now()) {
            return again(
                write,
                &"its conversation waits for a write of unknown outcome",
            );
        }
    }
    let mut candidates = std::mem::take(&mut write.senders).into_iter();
    let result = loop {
        let Some(sender) = candidates.next() else {
            break Err(StoreError::NotAMember);
        };
        write.message.sender_id = sender;
        let result = match c.store.append(vec![write.message.clone()]).await {
            Ok(mut results) => results.pop().unwrap_or_else(|| {
                Err(StoreError::Internal("the store answered no result".into()))
            }),
            Err(e) => Err(e),
        };
        match result {
            Err(StoreError::NotAMember) => continue,
            result => break result,
        }
    };
    // As for a client's write: one whose outcome is unknown pauses the
    // conversation until its retry settles it, so nothing later is
    // delivered and acked ahead of it.
    let (sender, key) = (write.message.sender_id, write.message.client_msg_id.clone());
    paused.record(conversation, sender, key, &result);
    match result {
        Ok(appended) if appended.duplicate => {
            redeliver(c, &appended, out);
            // Its sender did not write it, so their devices are owed it as
            // much as the others (the first write's fan-out may never have
            // happened); an app drops a copy it has.
            let message = &appended.message;
            let deliver = Frame::push(Body::Deliver(proto::Deliver {
                message: Some(Box::new((**message).clone())),
            }));
            let (_, own) = deliver_frames(&deliver, message);
            let pushed = c
                .hub
                .push(message.sender_id, StreamKind::Messages, &own, None);
            c.metrics.redeliveries.increment(pushed as u64);
        }
        // Connection ids start at 1: none is left out.
        Ok(appended) => fan_out(c, appended, (0, None), None, out),
        Err(e @ (StoreError::Unavailable(_) | StoreError::Unsettled(_))) => {
            // The same sender first: under its key a write that did
            // commit is found.
            write.senders = std::iter::once(write.message.sender_id)
                .chain(candidates)
                .collect();
            again(write, &e);
        }
        Err(e) => {
            tracing::warn!(conversation, key = write.message.client_msg_id, error = %e, "could not write a message of the server");
        }
    }
}

/// A retry of a stored message (or group change) goes again to the members
/// still owed it, in case its first fan-out never happened: a commit whose
/// outcome was settled too late, a node that stopped between its commit and
/// its pushes. Only live connections: the queues and catch-up read
/// history's watermarks, so an offline member gets it on their return
/// anyway. A member who had it drops the copy (client-lib deduplicates by
/// seq), and one fanned out in this very batch is not pushed twice.
fn redeliver(c: &Committer, appended: &Appended, out: &Fanout) {
    let message = &appended.message;
    // The store names only the others still owed it.
    if appended.members.is_empty()
        || out
            .stored
            .iter()
            .any(|m| (m.conversation_id, m.seq) == (message.conversation_id, message.seq))
    {
        return;
    }
    // The members still owed it, never its sender (see `Appended`). Not
    // noted in the receipt routes, which take messages in seq order: a
    // large group's sender may miss the receipts of a message that was never
    // fanned out, and GetMessageReceipts still has them.
    push_again(
        &c.hub,
        &c.metrics,
        message,
        appended.members.iter().copied(),
    );
}

/// Pushes a stored message again to the connected sessions of `owed`
/// (counted in `chat_redeliveries_total`).
fn push_again(
    hub: &Hub,
    metrics: &Metrics,
    message: &proto::Message,
    owed: impl IntoIterator<Item = UserId>,
) {
    let deliver = Frame::push(Body::Deliver(proto::Deliver {
        message: Some(Box::new(message.clone())),
    }));
    let (frame, _) = deliver_frames(&deliver, message);
    let mut pushed = 0;
    for member in owed {
        pushed += hub.push(member, StreamKind::Messages, &frame, None);
    }
    metrics.redeliveries.increment(pushed as u64);
}

/// The queued `Deliver` of `message` for its members, and for its
/// sender's other devices (the same bytes, marked as their own).
fn deliver_frames(deliver: &Frame, message: &proto::Message) -> (Outbound, Outbound) {
    let key = DeliverKey {
        conversation: message.conversation_id,
        seq: message.seq,
        own: false,
    };
    let frame = Outbound {
        deliver: Some(key),
        ..Outbound::frame(deliver)
    };
    let own = Outbound {
        deliver: Some(DeliverKey { own: true, ..key }),
        ..frame.clone()
    };
    (frame, own)
}

/// Applies one group change (its SYSTEM message is stored in the same
/// transaction), answers on control, and fans the message out like any other.
/// A repeated key answers Ok, and the change's message goes only to the
/// members still owed it. A group paused behind a write of unknown outcome
/// takes only that write's retry ([`Paused`]); a change whose own outcome
/// is unknown pauses it until its retry (client-lib keys every change; a
/// change without a key cannot be told from a new one, so it pauses
/// nothing).
async fn commit_group(c: &Committer, job: SendJob, out: &mut Fanout, paused: &mut Paused) {
    let Work::Group { edit, max_members } = job.work else {
        return;
    };
    let (conversation, actor, key) = (edit.conversation_id, edit.actor, edit.client_key.clone());
    let gone = match edit.change {
        crate::store::GroupChange::Remove(user) => Some(user),
        crate::store::GroupChange::Leave => Some(actor),
        _ => None,
    };
    if !paused.is_empty() {
        let now = Instant::now();
        paused.expire(now);
        if paused.refuses(conversation, actor, key.as_deref(), now) {
            let frame = paused_refusal().to_frame(job.request_id);
            job.session
                .push(StreamKind::Control, Outbound::frame(&frame));
            return;
        }
    }
    let now = crate::streams::now_ms();
    let result = c.store.change_group(*edit, max_members, now).await;
    if let Some(key) = key {
        paused.record(conversation, actor, key, &result);
    }
    let reply = match result {
        Ok(appended) => {
            if appended.duplicate {
                redeliver(c, &appended, out);
            } else {
                fan_out(c, appended, (job.session.conn_id, None), None, out);
            }
            // A retry of a change stored before (whose first answer was
            // lost) is taken out too: the first may not have got here.
            if let Some(user) = gone {
                c.calls.membership_ended(conversation, user);
            }
            Frame::new(job.request_id, Body::Ok(proto::Ok {}))
        }
        Err(e) => Refusal::from(e).to_frame(job.request_id),
    };
    job.session
        .push(StreamKind::Control, Outbound::frame(&reply));
}

/// Creates a group (its first SYSTEM message in the same transaction),
/// answers on control with the conversation, and fans the message out. A
/// repeated key answers the group its first request made and sends its
/// first message again to the members still owed it
/// ([`redeliver_creation`]). A new group whose creation's outcome is
/// unknown is not paused like a send ([`Paused`]): it belongs to the
/// creator's committer, not the group's (ARCHITECTURE.md has the cost).
async fn commit_create(c: &Committer, job: SendJob, out: &mut Fanout) {
    let Work::CreateGroup { group, max_members } = job.work else {
        return;
    };
    let creator = group.creator;
    let now = crate::streams::now_ms();
    let created = c.store.create_group(*group, max_members, now).await;
    let (id, repeated) = match created {
        Ok(GroupCreated::New(appended)) => {
            let id = appended.message.conversation_id;
            fan_out(c, appended, (job.session.conn_id, None), None, out);
            (id, false)
        }
        Ok(GroupCreated::Existing(id)) => (id, true),
        Err(e) => {
            let reply = Refusal::from(e).to_frame(job.request_id);
            job.session
                .push(StreamKind::Control, Outbound::frame(&reply));
            return;
        }
    };
    // The reply's read in a task of its own: the committer goes on with
    // everyone's sends meanwhile (a round trip on Postgres). Should it
    // fail, the group exists all the same: the client's retry with its key
    // gets it without making another.
    let (store, hub, metrics) = (c.store.clone(), c.hub.clone(), c.metrics.clone());
    tokio::spawn(async move {
        let reply = match store.conversation(id, creator).await {
            Ok(view) => {
                if repeated {
                    redeliver_creation(&*store, &hub, &metrics, &view, creator).await;
                }
                Frame::new(
                    job.request_id,
                    Body::Conversation(crate::streams::control::conversation_info(view, creator)),
                )
            }
            Err(e) => Refusal::from(e).to_frame(job.request_id),
        };
        job.session
            .push(StreamKind::Control, Outbound::frame(&reply));
    });
}

/// A repeated creation (the creator's retry with the same key) sends the
/// group's first message again to the connected members still owed it,
/// as [`redeliver`] does for a send: its first fan-out may never have
/// happened (a creation whose outcome was unknown, reported failed
/// although it committed), and without it the members knew nothing of the
/// group until its next message. A member who had it drops the copy.
async fn redeliver_creation(
    store: &dyn HistoryStore,
    hub: &Hub,
    metrics: &Metrics,
    view: &ConversationView,
    creator: UserId,
) {
    let owed: Vec<UserId> = view
        .members
        .iter()
        .filter(|m| m.user_id != creator && m.delivered_seq == 0 && m.joined_seq == 0)
        .map(|m| m.user_id)
        .collect();
    if owed.is_empty() {
        return;
    }
    let first = match store.history(view.id, Direction::Forward, 0, 1).await {
        Ok(page) => page.messages.into_iter().next(),
        Err(e) => {
            tracing::warn!(conversation = view.id, error = %e, "could not read a repeated group's first message");
            None
        }
    };
    if let Some(message) = first {
        push_again(hub, metrics, &message, owed);
    }
}

/// Pushes a stored message to every member but its sender, and to the
/// sender's other connected devices (not `from_conn`, the one it came
/// from), and notes it for the recent cache and the unread queues.
/// `received` (when the send was decoded) feeds the send-to-deliver
/// latency. A reaction notifies `notify_only` (the author of the message
/// reacted to) or nobody.
fn fan_out(
    c: &Committer,
    appended: Appended,
    (from_conn, received): (u64, Option<Instant>),
    notify_only: Option<UserId>,
    out: &mut Fanout,
) {
    let message = &appended.message;
    let deliver = Frame::push(Body::Deliver(proto::Deliver {
        message: Some(Box::new((**message).clone())),
    }));
    let (frame, own) = deliver_frames(&deliver, message);
    // Before the pushes: a member's ack of this message must find its
    // sender in the routes.
    c.routes.note_message(
        message.conversation_id,
        appended.members.len(),
        message.seq,
        message.sender_id,
    );
    let mut pushed = 0;
    // People write texts and photos, which notify every member; a
    // reaction notifies the author of the message reacted to; a call's
    // log notifies those it rang who never answered; a group's changes
    // (SYSTEM) and edits notify nobody.
    let notice_kind = match proto::MessageType::try_from(message.r#type) {
        _ if c.notifier.is_none() => None,
        Ok(proto::MessageType::Text) => Some(NoticeKind::Text),
        Ok(proto::MessageType::Photo) => Some(NoticeKind::Photo),
        Ok(proto::MessageType::Reaction) => notify_only.map(|_| NoticeKind::Reaction),
        Ok(proto::MessageType::Call) => message
            .call
            .as_ref()
            .map(|call| NoticeKind::MissedCall { video: call.video }),
        _ => None,
    };
    let notified = |member: &UserId| match notice_kind {
        Some(NoticeKind::MissedCall { .. }) => message
            .call
            .as_ref()
            .is_some_and(|call| call.missed.contains(member)),
        Some(NoticeKind::Reaction) => notify_only == Some(*member),
        kind => kind.is_some(),
    };
    for &member in &appended.members {
        if member != message.sender_id {
            // Before the push: the member's ack must find the watch.
            if let (Some(notifier), Some(kind), true) =
                (&c.notifier, notice_kind, notified(&member))
            {
                let notice = Notice {
                    user: member,
                    conversation: message.conversation_id,
                    seq: message.seq,
                    sender: message.sender_id,
                    kind,
                    unacked: false,
                };
                if c.hub.in_foreground(member) {
                    notifier.watch(notice);
                } else {
                    notifier.notify(notice);
                }
            }
            pushed += c.hub.push(member, StreamKind::Messages, &frame, None);
            out.queued.push((member, message.clone()));
        }
    }
    // Live only: an offline device of the sender reads its own messages
    // through history (watermarks are per member, not per device).
    let echoed = c.hub.push(
        message.sender_id,
        StreamKind::Messages,
        &own,
        Some(from_conn),
    );
    c.metrics.deliveries.increment((pushed + echoed) as u64);
    if let (Some(received), true) = (received, pushed > 0) {
        c.metrics
            .send_to_deliver
            .record(received.elapsed().as_secs_f64());
    }
    out.stored.push(appended.message);
}

async fn mark_committer(
    mut rx: mpsc::Receiver<MarkWork>,
    c: Committer,
    queue_updates: Option<mpsc::Sender<CacheUpdate>>,
) {
    let Committer {
        store,
        hub,
        metrics,
        routes,
        acks_lost,
        notifier: _,
        calls: _,
    } = c;
    let mut received: Vec<MarkWork> = Vec::with_capacity(MAX_MARK_BATCH);
    let mut jobs: Vec<MarkJob> = Vec::with_capacity(MAX_MARK_BATCH);
    // Delivery acks of a batch the store failed with a retryable error:
    // they have no reply that would make the client send them again, so
    // they go into the next batch, which comes after a pause if no other
    // mark does.
    let mut carried: Vec<WatermarkUpdate> = Vec::new();
    // Flushes waiting for the moves queued before them: answered once a
    // batch leaves nothing carried.
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        if carried.is_empty() {
            if rx.recv_many(&mut received, MAX_MARK_BATCH).await == 0 {
                return;
            }
        } else {
            tokio::select! {
                n = rx.recv_many(&mut received, MAX_MARK_BATCH) => {
                    if n == 0 {
                        return;
                    }
                }
                () = tokio::time::sleep(MARK_RETRY) => {}
            }
        }
        for work in received.drain(..) {
            match work {
                MarkWork::Move(job) => jobs.push(job),
                MarkWork::Flush(done) => {
                    // Those whose waiter left (its connection closed while
                    // the store was out) go.
                    flushes.retain(|f| !f.is_closed());
                    flushes.push(done);
                }
            }
        }
        if jobs.is_empty() && carried.is_empty() {
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
            continue;
        }
        let previous = std::mem::take(&mut carried);
        let moves = coalesce(
            previous
                .iter()
                .copied()
                .chain(jobs.iter().map(|j| j.update)),
        );
        metrics.watermark_batch.record(moves.len() as f64);
        // Every mark also trims its member's unread queue up to its seq,
        // the moved ones (below) by the stored watermark, the rest by what
        // the device said: a removed member's device acknowledging the
        // messages and removal it caught up on (no watermark moves; the
        // queue would otherwise wait for their next catch-up), or a
        // repeated ack (a no-op). A device that claims more than it got
        // trims only its own queue.
        let mut claimed: HashMap<(u64, UserId), u64> = HashMap::new();
        if queue_updates.is_some() {
            // Delivery acks only: a repeated MarkSeen trims nothing new.
            for u in moves.iter().filter(|u| u.kind == WatermarkKind::Delivered) {
                let seq = claimed.entry((u.conversation_id, u.user_id)).or_default();
                *seq = (*seq).max(u.seq);
            }
        }
        let result = store.advance_watermarks(moves).await;
        match &result {
            Ok(_) => {}
            Err(e @ (StoreError::Unavailable(_) | StoreError::Unsettled(_))) => {
                carried = coalesce(
                    previous
                        .into_iter()
                        .chain(jobs.iter().filter(|j| j.reply.is_none()).map(|j| j.update)),
                );
                if carried.len() > MAX_MARK_BATCH {
                    let cut = carried.len() - MAX_MARK_BATCH;
                    carried.truncate(MAX_MARK_BATCH);
                    // Acks were dropped: no flush may say they are stored.
                    acks_lost.fetch_add(cut as u64, Ordering::Release);
                    flushes.clear();
                }
                tracing::warn!(
                    acks = carried.len(),
                    "a batch of watermark moves failed ({e}); its delivery acks go again"
                );
            }
            // Refused for good: those acks are not stored, and a flush
            // waiting for them must not say they are (its waiter gets an
            // error instead), nor one queued later (`acks_lost`).
            Err(_) => {
                let lost = previous.len() + jobs.iter().filter(|j| j.reply.is_none()).count();
                if lost > 0 {
                    acks_lost.fetch_add(lost as u64, Ordering::Release);
                }
                flushes.clear();
            }
        }
        let moved_keys: std::collections::HashSet<(u64, UserId)> = match &result {
            Ok(moved) => moved
                .iter()
                .map(|m| (m.conversation_id, m.user_id))
                .collect(),
            Err(_) => Default::default(),
        };
        let reply_body = match result {
            Ok(moved) => {
                let mut acks = Vec::with_capacity(if queue_updates.is_some() {
                    moved.len()
                } else {
                    0
                });
                for m in moved {
                    let receipt = Outbound::frame(&Frame::push(Body::Receipt(proto::Receipt {
                        conversation_id: m.conversation_id,
                        user_id: m.user_id,
                        delivered_seq: m.delivered_seq,
                        seen_seq: m.seen_seq,
                    })));
                    let mut pushed = 0;
                    routes.route(&m, |member| {
                        pushed += hub.push(member, StreamKind::Receipts, &receipt, None);
                    });
                    metrics.receipts.increment(pushed as u64);
                    if queue_updates.is_some() {
                        acks.push((m.user_id, m.conversation_id, m.delivered_seq));
                    }
                }
                acks.extend(
                    claimed
                        .into_iter()
                        .filter(|(key, _)| !moved_keys.contains(key))
                        .map(|((conversation, user), seq)| (user, conversation, seq)),
                );
                if let (Some(updates), false) = (&queue_updates, acks.is_empty())
                    && !hand_to_updater(updates, CacheUpdate::Delivered(acks), &metrics)
                {
                    return;
                }
                Ok(())
            }
            Err(e) => Err(Refusal::from(e)),
        };
        // Marks that moved nothing: an old mark from a member (fine), or a
        // non-member's (refused). Only these ask the store, once per
        // (conversation, member) of the batch and off the committer, so a
        // flood of repeated marks costs one lookup per batch, not one per
        // frame, and cannot stall the committer.
        let mut unmoved = Unmoved::new();
        for job in jobs.drain(..) {
            let Some(reply) = job.reply else {
                continue;
            };
            let u = job.update;
            let frame = match &reply_body {
                Err(refusal) => refusal.to_frame(reply.request_id),
                Ok(()) if moved_keys.contains(&(u.conversation_id, u.user_id)) => {
                    Frame::new(reply.request_id, Body::Ok(proto::Ok {}))
                }
                Ok(()) => {
                    unmoved
                        .entry((u.conversation_id, u.user_id))
                        .or_default()
                        .push(reply);
                    continue;
                }
            };
            reply.answer(&frame);
        }
        if !unmoved.is_empty() {
            tokio::spawn(answer_unmoved(store.clone(), unmoved));
        }
        if carried.is_empty() {
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }
}

/// Marks of a batch that moved nothing, by (conversation, member), to
/// answer.
type Unmoved = HashMap<(u64, UserId), Vec<Box<MarkReply>>>;

/// Answers marks that moved nothing: Ok to members, NOT_A_MEMBER to the
/// rest, one store lookup per (conversation, member).
async fn answer_unmoved(store: Arc<dyn HistoryStore>, unmoved: Unmoved) {
    for ((conversation_id, user), replies) in unmoved {
        let refusal = match store.is_member(conversation_id, user).await {
            Ok(true) => None,
            Ok(false) => Some(Refusal::new(
                ErrorCode::NotAMember,
                "not a member of this conversation",
            )),
            Err(e) => Some(Refusal::from(e)),
        };
        for reply in replies {
            let frame = match &refusal {
                None => Frame::new(reply.request_id, Body::Ok(proto::Ok {})),
                Some(refusal) => refusal.to_frame(reply.request_id),
            };
            reply.answer(&frame);
        }
    }
}

/// Keeps, per (conversation, member, kind), only the highest seq: a burst
/// of acks becomes one row update and one receipt.
fn coalesce(updates: impl Iterator<Item = WatermarkUpdate>) -> Vec<WatermarkUpdate> {
    let mut out: Vec<WatermarkUpdate> = Vec::new();
    let mut index = HashMap::new();
    for u in updates {
        let key = (u.conversation_id, u.user_id, u.kind);
        match index.get(&key) {
            Some(&i) => {
                let existing: &mut WatermarkUpdate = &mut out[i];
                existing.seq = existing.seq.max(u.seq);
            }
            None => {
                index.insert(key, out.len());
                out.push(u);
            }
        }
    }
    // Seen implies delivered: apply delivered first so a seen in the same
    // batch is not undercut.
    out.sort_by_key(|u| matches!(u.kind, WatermarkKind::Seen));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_always_has_the_same_committer_and_all_are_used() {
        for shards in [1, 3, 4] {
            let mut used = vec![0u32; shards];
            for conversation in 1..=1_000u64 {
                let shard = shard_of(conversation, shards);
                assert_eq!(shard, shard_of(conversation, shards));
                used[shard] += 1;
            }
            // Sequential ids spread evenly.
            assert!(
                used.iter().all(|&n| n.abs_diff(1_000 / shards as u32) <= 1),
                "{used:?}"
            );
        }
        assert_eq!(shard_of(42, 0), 0, "no shards means one");
    }

    #[test]
    fn a_paused_conversation_takes_its_unsettled_retries_in_order() {
        let start = Instant::now();
        let mut paused = Paused::default();
        let batch = paused.next_batch();
        paused.add(1, 10, "a".into(), batch, start);
        paused.add(1, 11, "b".into(), batch, start);
        paused.add(1, 10, "a".into(), batch, start);
        assert!(
            !paused.refuses(1, 10, Some("a"), start),
            "the first retry goes through"
        );
        assert!(
            paused.refuses(1, 11, Some("b"), start),
            "the second waits for the first (it may be stored after it)"
        );
        assert!(
            paused.refuses(1, 10, Some("c"), start),
            "a later send waits"
        );
        assert!(
            paused.refuses(1, 12, Some("a"), start),
            "another sender's key"
        );
        assert!(paused.refuses(1, 10, None, start), "a change without a key");
        assert!(
            !paused.refuses(2, 12, Some("z"), start),
            "other conversations"
        );
        // Found stored: the rest of its batch may be stored too.
        paused.settle(1, 10, "a", false);
        assert!(!paused.refuses(1, 11, Some("b"), start), "now the second");
        assert!(
            paused.refuses(1, 12, Some("x"), start),
            "one write still unsettled"
        );
        paused.settle(1, 11, "b", false);
        assert!(paused.is_empty(), "all settled: the conversation goes on");

        // Stored anew: its batch had not committed, and neither had the
        // rest of it; another batch's write still waits.
        let (first, second) = (paused.next_batch(), paused.next_batch());
        paused.add(5, 10, "a".into(), first, start);
        paused.add(5, 11, "b".into(), first, start);
        paused.add(5, 12, "c".into(), second, start);
        paused.settle(5, 10, "a", true);
        assert!(
            !paused.refuses(5, 12, Some("c"), start),
            "the other batch's write is first now"
        );
        assert!(paused.refuses(5, 11, Some("b"), start) && paused.refuses(5, 13, Some("x"), start));
        paused.settle(5, 12, "c", false);
        assert!(paused.is_empty());

        // A write whose client stopped sending it is given up after the
        // grace, and the next one waited for comes first: tried since (a
        // refused retry counts), it is not given up with it.
        paused.add(7, 10, "a".into(), batch, start);
        paused.add(7, 11, "b".into(), batch, start);
        assert!(paused.refuses(7, 11, Some("b"), start + HOLD_GRACE / 2));
        paused.expire(start + HOLD_GRACE);
        assert!(
            !paused.refuses(7, 11, Some("b"), start + HOLD_GRACE),
            "b is first now"
        );
        assert!(
            paused.refuses(7, 10, Some("a"), start + HOLD_GRACE),
            "a late a waits"
        );
        paused.settle(7, 11, "b", false);
        assert!(
            !paused.refuses(7, 12, Some("x"), start),
            "b settled: it goes on"
        );

        // Nobody sends again: the pause ends after the grace; a retry
        // that fails again (still no answer, or unknown again) starts the
        // grace over.
        paused.add(3, 10, "a".into(), batch, start);
        paused.add(4, 10, "b".into(), batch, start);
        paused.add(6, 10, "c".into(), batch, start);
        paused.still_trying(3, 10, "a", start + HOLD_GRACE / 2);
        paused.still_trying(4, 10, "not its key", start + HOLD_GRACE / 2);
        paused.add(6, 10, "c".into(), batch, start + HOLD_GRACE / 2);
        paused.expire(start + HOLD_GRACE);
        assert!(
            paused.refuses(3, 12, Some("x"), start),
            "still being retried"
        );
        assert!(!paused.refuses(4, 12, Some("x"), start), "given up on");
        assert!(paused.refuses(6, 12, Some("x"), start), "unknown again");
        paused.expire(start + HOLD_GRACE * 2);
        assert!(paused.is_empty());
    }

    #[test]
    fn coalesce_keeps_the_highest_per_member_and_kind() {
        let u = |conversation_id, user_id, kind, seq| WatermarkUpdate {
            conversation_id,
            user_id,
            kind,
            seq,
        };
        let out = coalesce(
            vec![
                u(1, 7, WatermarkKind::Seen, 3),
                u(1, 7, WatermarkKind::Delivered, 5),
                u(1, 7, WatermarkKind::Delivered, 9),
                u(1, 7, WatermarkKind::Delivered, 2),
                u(2, 7, WatermarkKind::Delivered, 1),
                u(1, 8, WatermarkKind::Delivered, 4),
            ]
            .into_iter(),
        );
        assert_eq!(
            out,
            vec![
                u(1, 7, WatermarkKind::Delivered, 9),
                u(2, 7, WatermarkKind::Delivered, 1),
                u(1, 8, WatermarkKind::Delivered, 4),
                u(1, 7, WatermarkKind::Seen, 3),
            ]
        );
    }
}
