//! The node's table of connected, authenticated sessions: user id to the
//! outbound queues of each of that user's connections.
//!
//! Pushing never waits: a queue that is full means the client does not read
//! fast enough, and that connection is closed with SLOW_CONSUMER. Nothing
//! is lost by that, because every pushed message is durable first and the
//! client resumes from its watermark when it reconnects.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use chat_protocol::{ErrorCode, StreamKind};
use dashmap::DashMap;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::queue::{OutQueue, PushError};
use crate::store::UserId;
use crate::wire::{self, Outbound};

/// Frames queued on a control or messages stream before a client counts
/// as too slow (receipts: [`RECEIPTS_QUEUE_CAPACITY`]). Sized for
/// a burst: a reconnecting user's backlog is streamed by catch-up, not
/// queued here.
pub const QUEUE_CAPACITY: usize = 1024;

/// Frames queued on a receipts stream before a client counts as too
/// slow. Receipts are small and come in bursts that wait out the receipts
/// writer's linger: one watermark batch (up to 4,096 moves) can make a
/// receipt per move for one sender (a returning member acking a thousand
/// conversations with them, or a large group's members acking their
/// message). At [`QUEUE_CAPACITY`] such a burst closed a client that read
/// fine. Room for a few batches; [`QUEUE_BYTES`] still bounds the memory.
pub const RECEIPTS_QUEUE_CAPACITY: usize = 16 * 1024;

/// Frames a stream's queue may hold for an offered frame to join them
/// ([`SessionHandle::offer`]): typing is news for seconds, and a reader
/// this far behind shows it late or not at all.
pub const OFFER_FRAMES: usize = 64;

/// Bytes a stream's queue may hold, with it, for an offered frame to join
/// them.
pub const OFFER_BYTES: usize = 64 * 1024;

/// Bytes queued per stream before a client counts as too slow: frames
/// can be up to the protocol's 1 MiB, and without a byte bound a client
/// that asks for page after page of long texts and never reads made the
/// node hold 1,024 of them for it.
pub const QUEUE_BYTES: usize = 4 << 20;

/// What a connection with a calls stream holds for calls.
#[derive(Default)]
struct CallsState {
    queue: OutQueue,
    media: crate::calls::MediaSlot,
}

/// One authenticated connection, as seen by the rest of the node.
pub struct SessionHandle {
    /// Node-unique connection id (for logs and unregistering).
    pub conn_id: u64,
    /// The authenticated user.
    pub user_id: UserId,
    /// Hash of the token the connection authenticated with: a logout
    /// closes the other connections that used it.
    pub token_hash: [u8; 32],
    conn: quinn::Connection,
    /// Outbound queues of the control, messages and receipts streams.
    queues: [OutQueue; 3],
    /// The calls stream's queue and the connection's place in a call
    /// (for its datagrams), made when the client opens its calls stream
    /// (boxed: most connections never do, and an idle one pays 16 bytes).
    calls: OnceLock<Box<CallsState>>,
    /// Signalled (to current waiters only) each time a writer of this
    /// connection hands frames to quinn: a writer lingering to coalesce
    /// (receipts) writes right away instead, so its frames leave in the
    /// same packet as the ones just written.
    wrote: Notify,
    closed: AtomicBool,
    /// The app is in the background (`Authenticate.background`, or a
    /// `Heartbeat` saying so): its frames are not activity.
    background: AtomicBool,
    /// Unix ms of the latest frame from the client (presence activity).
    last_activity_ms: AtomicI64,
    metrics: Arc<Metrics>,
    /// Path counters already added to the metrics: lost packets, sent and
    /// received datagrams.
    sampled: [AtomicU64; 3],
}

impl SessionHandle {
    /// A handle with empty queues; `background`: the app is in the
    /// background, so the connection is no activity until it says
    /// otherwise (see [`set_background`](Self::set_background)).
    pub fn new(
        conn_id: u64,
        user_id: UserId,
        token_hash: [u8; 32],
        conn: quinn::Connection,
        metrics: Arc<Metrics>,
        background: bool,
    ) -> Arc<Self> {
        // The control stream is open already: the session authenticated on
        // it. The others open when the client opens them (`open`).
        let queues: [OutQueue; 3] = Default::default();
        queues[0].open();
        Arc::new(SessionHandle {
            conn_id,
            user_id,
            token_hash,
            conn,
            queues,
            calls: OnceLock::new(),
            wrote: Notify::new(),
            closed: AtomicBool::new(false),
            background: AtomicBool::new(background),
            last_activity_ms: AtomicI64::new(0),
            metrics,
            sampled: Default::default(),
        })
    }

    /// Records client activity: any frame counts, unless the app is in
    /// the background.
    pub fn touch(&self, now_ms: i64) {
        if !self.is_background() {
            self.last_activity_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    /// The app went to the background (`true`: its frames stop counting
    /// as activity, so the user shows offline once the presence window
    /// passes) or came back (`false`: counted from now on).
    pub fn set_background(&self, background: bool) {
        self.background.store(background, Ordering::Relaxed);
    }

    /// Whether the app is in the background (see
    /// [`set_background`](Self::set_background)).
    pub fn is_background(&self) -> bool {
        self.background.load(Ordering::Relaxed)
    }

    /// Unix ms of the latest client activity.
    pub fn last_activity_ms(&self) -> i64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    /// Adds the connection's path statistics to the metrics: RTT and
    /// congestion window as samples (with `gauges`), packet counters as
    /// the increase since the last call.
    pub fn sample_path(&self, gauges: bool) {
        let stats = self.conn.stats();
        if gauges {
            self.metrics.rtt.record(stats.path.rtt.as_secs_f64());
            self.metrics.cwnd.record(stats.path.cwnd as f64);
        }
        let now = [
            stats.path.lost_packets,
            stats.udp_tx.datagrams,
            stats.udp_rx.datagrams,
        ];
        let counters = [
            &self.metrics.lost_packets,
            &self.metrics.sent_datagrams,
            &self.metrics.received_datagrams,
        ];
        for ((seen, value), counter) in self.sampled.iter().zip(now).zip(counters) {
            let before = seen.swap(value, Ordering::Relaxed);
            counter.increment(value.saturating_sub(before));
        }
    }

    /// See the `wrote` field.
    pub fn wrote(&self) -> &Notify {
        &self.wrote
    }

    /// The outbound queue of a stream kind (its writer is the only reader).
    pub fn queue(&self, kind: StreamKind) -> Option<&OutQueue> {
        match kind {
            StreamKind::Control => Some(&self.queues[0]),
            StreamKind::Messages => Some(&self.queues[1]),
            StreamKind::Receipts => Some(&self.queues[2]),
            StreamKind::Calls => self.calls.get().map(|calls| &calls.queue),
            _ => None,
        }
    }

    /// The client opened its calls stream: pushes to it are taken from
    /// now on (rings, call events, signals).
    pub fn open_calls(&self) {
        self.calls.get_or_init(Box::default).queue.open();
    }

    /// Whether the client opened a calls stream (and can be rung in the
    /// app).
    pub fn takes_calls(&self) -> bool {
        self.calls.get().is_some() && !self.closed.load(Ordering::Relaxed)
    }

    /// Its place in a call, for its datagrams: `None` until the client
    /// opens a calls stream (without one it is in no call).
    pub fn call_media(&self) -> Option<&crate::calls::MediaSlot> {
        self.calls.get().map(|calls| &calls.media)
    }

    /// The connection (for call media datagrams).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The client opened the `kind` stream: its writer takes the queue from
    /// now on. Called before the stream's catch-up or snapshot reads the
    /// store (see [`crate::queue`]).
    pub fn open(&self, kind: StreamKind) {
        if let Some(queue) = self.queue(kind) {
            queue.open();
        }
    }

    /// [`open`](Self::open) for a stream whose writer first runs a
    /// catch-up (see [`crate::queue`]).
    pub fn open_for_catch_up(&self, kind: StreamKind) {
        if let Some(queue) = self.queue(kind) {
            queue.open_for_catch_up();
        }
    }

    /// See [`OutQueue::held_deliveries`](crate::queue::OutQueue::held_deliveries).
    pub fn held_deliveries(&self, kind: StreamKind) -> std::collections::HashMap<u64, u64> {
        self.queue(kind)
            .map(|queue| queue.held_deliveries())
            .unwrap_or_default()
    }

    /// See [`OutQueue::held_own`].
    pub fn held_own(&self, kind: StreamKind) -> std::collections::HashSet<(u64, u64)> {
        self.queue(kind)
            .map(|queue| queue.held_own())
            .unwrap_or_default()
    }

    /// A catch-up pass of the `kind` stream ended: `Ok` if the queue is now
    /// open, else the live messages it let go meanwhile (run another pass,
    /// which brings them).
    pub fn finish_catch_up(&self, kind: StreamKind) -> Result<(), crate::queue::Missed> {
        self.queue(kind)
            .map_or(Ok(()), |queue| queue.finish_catch_up())
    }

    /// Queues a frame that may be dropped (typing) on one of this
    /// session's streams, only while that stream is open and its queue
    /// holds under [`OFFER_FRAMES`] frames: it never makes a client count
    /// as too slow, and a device that stopped reading gathers no pile of
    /// stale ones. Returns whether it was queued.
    pub fn offer(&self, kind: StreamKind, out: Outbound) -> bool {
        let Some(queue) = self.queue(kind) else {
            return false;
        };
        queue.offer(out, OFFER_FRAMES, OFFER_BYTES)
    }

    /// Queues a frame for one of this session's streams without waiting.
    /// Returns false if the session is gone, was too slow (and is now
    /// being closed), has not opened that stream and its queue gave up, or
    /// is catching up on it and its queue let the message go for catch-up
    /// to bring (see [`crate::queue`]).
    pub fn push(&self, kind: StreamKind, out: Outbound) -> bool {
        let Some(queue) = self.queue(kind) else {
            return false;
        };
        let frames = match kind {
            StreamKind::Receipts => RECEIPTS_QUEUE_CAPACITY,
            _ => QUEUE_CAPACITY,
        };
        match queue.push(out, frames, QUEUE_BYTES) {
            Ok(()) => true,
            Err(PushError::Full) => {
                if !self.closed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        conn_id = self.conn_id,
                        user_id = self.user_id,
                        stream = kind.name(),
                        "client too slow; closing"
                    );
                    wire::close_counted(
                        &self.conn,
                        &self.metrics,
                        ErrorCode::SlowConsumer,
                        "client reads too slowly; reconnect",
                    );
                }
                false
            }
            Err(PushError::Closed | PushError::Unopened) => false,
        }
    }
}

/// See the module docs.
#[derive(Default)]
pub struct Hub {
    users: DashMap<UserId, Vec<Arc<SessionHandle>>>,
}

impl Hub {
    /// Closes `user`'s connections on this node that authenticated with
    /// `token_hash`, but `except_conn`, with `code`. Returns how many.
    pub fn close_token(
        &self,
        user: UserId,
        token_hash: &[u8; 32],
        except_conn: u64,
        code: ErrorCode,
        reason: &str,
    ) -> usize {
        let Some(sessions) = self.users.get(&user) else {
            return 0;
        };
        let mut closed = 0;
        for session in sessions.iter() {
            if session.conn_id != except_conn && &session.token_hash == token_hash {
                wire::close(&session.conn, code, reason);
                closed += 1;
            }
        }
        closed
    }

    /// Whether `user` has a connection on this node whose app is in the
    /// foreground and that is not being closed (a slow consumer's): a
    /// user without one gets notifications.
    pub fn in_foreground(&self, user: UserId) -> bool {
        self.users.get(&user).is_some_and(|sessions| {
            sessions
                .iter()
                .any(|s| !s.is_background() && !s.closed.load(Ordering::Relaxed))
        })
    }

    /// Whether `user` has a connection on this node with a calls stream
    /// open (a user without one is notified of a ring).
    pub fn takes_calls(&self, user: UserId) -> bool {
        self.users
            .get(&user)
            .is_some_and(|sessions| sessions.iter().any(|s| s.takes_calls()))
    }

    /// How many sessions `user` has on this node.
    pub fn sessions_of(&self, user: UserId) -> usize {
        self.users.get(&user).map_or(0, |sessions| sessions.len())
    }

    /// Adds a session (a user may have several devices), unless the user
    /// has `max_per_user` already (false). One with the session's token
    /// beyond `max_per_token` replaces the oldest with it, which is closed
    /// LIMIT_REACHED: whoever holds a token can get in, so an owner whose
    /// token was copied can always resume it to log it out. Refusing the
    /// newcomer instead let a copy that held the token's places keep its
    /// owner from revoking it (only a connection authenticated with a
    /// token can log it out) until it expired, a month later.
    pub fn register(
        &self,
        session: Arc<SessionHandle>,
        max_per_user: usize,
        max_per_token: usize,
    ) -> bool {
        let mut sessions = self.users.entry(session.user_id).or_default();
        let same_token = sessions
            .iter()
            .filter(|s| s.token_hash == session.token_hash)
            .count();
        if same_token >= max_per_token.max(1) {
            let oldest = sessions
                .iter()
                .position(|s| s.token_hash == session.token_hash)
                .expect("counted above");
            let replaced = sessions.remove(oldest);
            replaced.metrics.sessions_active.decrement(1.0);
            wire::close_counted(
                &replaced.conn,
                &replaced.metrics,
                ErrorCode::LimitReached,
                "replaced by a newer connection with this session's token",
            );
        } else if sessions.len() >= max_per_user.max(1) {
            return false;
        }
        session.metrics.sessions_active.increment(1.0);
        sessions.push(session);
        true
    }

    /// Removes a session; the user's entry goes with its last session.
    pub fn unregister(&self, user_id: UserId, conn_id: u64) {
        self.users.remove_if_mut(&user_id, |_, sessions| {
            sessions.retain(|s| {
                let stays = s.conn_id != conn_id;
                if !stays {
                    s.metrics.sessions_active.decrement(1.0);
                }
                stays
            });
            sessions.is_empty()
        });
    }

    /// Queues a frame for every session of `user` except `except_conn`.
    /// Returns how many sessions took it.
    pub fn push(
        &self,
        user: UserId,
        kind: StreamKind,
        out: &Outbound,
        except_conn: Option<u64>,
    ) -> usize {
        let Some(sessions) = self.users.get(&user) else {
            return 0;
        };
        sessions
            .iter()
            .filter(|s| Some(s.conn_id) != except_conn)
            .filter(|s| s.push(kind, out.clone()))
            .count()
    }

    /// Offers a frame that may be dropped to every session of `user`
    /// ([`SessionHandle::offer`]). Returns how many took it.
    pub fn offer(&self, user: UserId, kind: StreamKind, out: &Outbound) -> usize {
        let Some(sessions) = self.users.get(&user) else {
            return 0;
        };
        sessions
            .iter()
            .filter(|s| s.offer(kind, out.clone()))
            .count()
    }

    /// Calls `f` with every connected session.
    pub fn for_each_session(&self, mut f: impl FnMut(&SessionHandle)) {
        for entry in &self.users {
            for session in entry.value() {
                f(session);
            }
        }
    }

    /// Number of connected sessions.
    pub fn session_count(&self) -> usize {
        self.users.iter().map(|e| e.value().len()).sum()
    }
}
