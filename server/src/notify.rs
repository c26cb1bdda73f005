//! Notifications. A message stored for a user with no connection in the
//! foreground on this node (none at all, or only apps in the background),
//! a call's log for a user who missed the call, and a call ringing a user
//! with no calls stream open (then the end of that ring) become
//! notifications: the push gateway is asked to notify the devices
//! the user's sessions registered (`RegisterPush`), and the gateway, which
//! holds the APNs and FCM credentials, tells the platforms.
//!
//! * The request has the shape of the Matrix push gateway API (`POST
//!   /_matrix/push/v1/notify`, as Sygnal serves it): the conversation, the
//!   message (`event_id` = `conversation/seq`), its sender, the badge
//!   (conversations with unread messages) and the devices. Never the text:
//!   the app, or its notification extension, reads the message over its
//!   own connection, so a notification service sees no content.
//! * Coalesced per (user, conversation): the first message notifies at
//!   once, the ones that follow within `push-coalesce` make one
//!   notification (of the latest) at the window's end.
//! * Bounded everywhere: the queue from the committers (full: dropped and
//!   counted, never waited on), the open windows, the notifications being
//!   prepared or sent (past it: dropped), their store reads at once, the
//!   requests in flight (`push-concurrency`), each request
//!   (`push-timeout`) and the gateway's answer (64 KiB).
//! * A gateway that fails (no answer, 429, 5xx) is asked again twice, 1 s
//!   and 2 s later; other refusals are logged. The tokens the gateway
//!   rejects (an uninstalled app) are forgotten.
//! * A message pushed to a connection in the foreground is watched until
//!   a device of its user acknowledges it; one still unacknowledged after
//!   `push-unacked-after` is notified as if the user were away. A phone
//!   that lost its network, or an app killed in the foreground, sends no
//!   close: its connection counts as in the foreground until the idle
//!   timeout, and without the watch the messages of that time would
//!   notify nobody.
//!
//! Delivery is single-node (ARCHITECTURE.md), and so is "in the
//! foreground": a user connected to another node sharing the stores would
//! be notified too.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chat_protocol::proto::CallEndReason;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::config::PushConfig;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::{ConversationId, HistoryStore, PushDevice, UserId};
use crate::streams::now_ms;

/// Notices queued from the committers to the coalescer.
const QUEUE_DEPTH: usize = 65_536;
/// Notifications being prepared or sent at once (store reads, retries,
/// the wait for a request slot); past it new ones are dropped.
const MAX_PENDING: usize = 16_384;
/// Open coalescing windows at most (a (user, conversation) each).
const MAX_WINDOWS: usize = 262_144;
/// Messages watched for an acknowledgement at most (a (user,
/// conversation) each); past it a message is not watched.
const MAX_WATCHES: usize = 262_144;
/// Notifications reading the store at once.
const STORE_READS: usize = 4;
/// Tries of one request, the first included.
const ATTEMPTS: u32 = 3;
/// Wait before the second try; doubled before each later one.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Largest answer read from the gateway.
const MAX_ANSWER: usize = 64 * 1024;
/// Failures are logged as warnings at most this often.
const WARN_EVERY_MS: i64 = 60_000;
/// The badge counts unread conversations up to this.
pub const MAX_BADGE: u32 = 999;

/// A message, or a call ringing, for a user who may need a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    /// Who is notified.
    pub user: UserId,
    /// Where the message or call is.
    pub conversation: ConversationId,
    /// The message's seq there, or the call's id.
    pub seq: u64,
    /// Who sent it, or who calls.
    pub sender: UserId,
    /// What it is.
    pub kind: NoticeKind,
    /// Sent because a connection in the foreground did not acknowledge
    /// the message in time (`push-unacked-after`), so the foreground
    /// does not hold it back.
    pub unacked: bool,
}

/// What a notice is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    /// A text message.
    Text,
    /// A photo.
    Photo,
    /// A reaction to a message of the user's.
    Reaction,
    /// A call's log (a CALL message) for a user it rang who never answered.
    MissedCall {
        /// With video.
        video: bool,
    },
    /// A call that rings the user (`seq` is its id); never coalesced.
    Call {
        /// With video.
        video: bool,
    },
    /// A call that rang the user by notification rings them no more
    /// (`seq` is its id), so the phone stops ringing; never coalesced.
    CallEnded {
        /// Why: answered or declined on another device, the caller hung
        /// up, nobody answered.
        reason: CallEndReason,
    },
}

impl NoticeKind {
    /// A stored message (coalesced per conversation, with the badge), not
    /// a call's ring or its end.
    fn is_message(self) -> bool {
        matches!(
            self,
            NoticeKind::Text
                | NoticeKind::Photo
                | NoticeKind::Reaction
                | NoticeKind::MissedCall { .. }
        )
    }
}

/// The committers' handle: queues notices for the coalescer, and watches
/// messages pushed to connections in the foreground.
pub struct Notifier {
    tx: mpsc::Sender<Notice>,
    metrics: Arc<Metrics>,
    /// `None` when `push-unacked-after` is 0.
    unacked: Option<Arc<Unacked>>,
}

impl Notifier {
    /// Starts the notifier when `config` names a gateway (`None`
    /// otherwise), with the task that runs it: the task ends once every
    /// handle is dropped (the committers stopped), or when aborted at
    /// shutdown; either way the notifications it holds for the end of
    /// their window are not sent and the requests under way stop.
    pub fn start(
        config: &PushConfig,
        store: Arc<dyn HistoryStore>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Started>, String> {
        let Some(url) = &config.push_gateway_url else {
            return Ok(None);
        };
        let gateway = Gateway::new(url, config)?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let unacked = (!config.push_unacked_after.is_zero()).then(|| {
            Arc::new(Unacked {
                after: config.push_unacked_after,
                watches: Mutex::new(Watches::default()),
            })
        });
        let dispatcher = Arc::new(Dispatcher {
            unacked: unacked.clone(),
            store,
            hub,
            metrics: metrics.clone(),
            gateway,
            store_reads: Semaphore::new(STORE_READS),
            requests: Semaphore::new(config.push_concurrency),
            warned_ms: AtomicI64::new(0),
        });
        let task = tokio::spawn(coalesce(rx, dispatcher, config.push_coalesce));
        let notifier = Notifier {
            tx,
            metrics,
            unacked,
        };
        Ok(Some((Arc::new(notifier), task)))
    }

    /// Queues a notice; never waits (a full queue drops it).
    pub fn notify(&self, notice: Notice) {
        if self.tx.try_send(notice).is_err() {
            self.metrics.push("dropped");
        }
    }

    /// Watches a message pushed to `notice.user`'s connection in the
    /// foreground: unless a device of the user acknowledges it (or a
    /// later message of the conversation) within `push-unacked-after`, it
    /// is notified. Call before the push, so the acknowledgement cannot
    /// come first.
    pub fn watch(&self, notice: Notice) {
        let Some(unacked) = &self.unacked else {
            return;
        };
        let mut watches = unacked.watches();
        let watched = watches.watch(notice, Instant::now() + unacked.after);
        drop(watches);
        if !watched {
            self.metrics.push_watch("dropped");
        }
    }

    /// `user` has the messages of `conversation` up to `seq`: a device
    /// with its app in the foreground acknowledged them, or the user
    /// marked them seen. (A delivery ack from an app in the background
    /// says the device has them, not that the user knows: the stream
    /// readers do not pass it on.)
    pub fn acked(&self, user: UserId, conversation: ConversationId, seq: u64) {
        let Some(unacked) = &self.unacked else {
            return;
        };
        let mut watches = unacked.watches();
        let due = Instant::now() + unacked.after;
        if watches.acked(user, conversation, seq, due) {
            drop(watches);
            self.metrics.push_watch("acked");
        }
    }
}

/// The watch on messages pushed to connections in the foreground.
struct Unacked {
    /// How long a message may stay unacknowledged.
    after: Duration,
    watches: Mutex<Watches>,
}

impl Unacked {
    fn watches(&self) -> std::sync::MutexGuard<'_, Watches> {
        self.watches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How often the watches are looked at: a notification comes at most
    /// a fifth of `after` late.
    fn tick(&self) -> Duration {
        (self.after / 5).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

/// Per (user, conversation), the latest message pushed to the user's
/// foreground connections, and the earliest one no foreground device has
/// acknowledged yet; due `after` the push of that earliest one, or of the
/// last acknowledgement that moved it. At most [`MAX_WATCHES`].
#[derive(Default)]
struct Watches {
    watched: HashMap<(UserId, ConversationId), Watch>,
    /// (due, user, conversation) in the order set, which is due order
    /// (each is now + `after`, taken under the lock). An entry whose watch
    /// was acked or set again since is skipped when it comes up, or
    /// compacted away first.
    due: VecDeque<(Instant, UserId, ConversationId)>,
}

struct Watch {
    /// What a notification would tell: the latest message pushed, though
    /// a reaction never stands in for a message ([`merge`]).
    notice: Notice,
    /// The latest message pushed (what an acknowledgement must reach to
    /// end the watch).
    latest: Notice,
    /// The seq of the earliest message not acknowledged.
    first: u64,
    due: Instant,
    /// Due and handed to the coalescer; a later message sets it again.
    fired: bool,
}

impl Watches {
    /// Watches `notice`, due at `due` unless its key is watched already
    /// (the earliest unacknowledged message sets the time). False when
    /// the table is full.
    fn watch(&mut self, notice: Notice, due: Instant) -> bool {
        let key = (notice.user, notice.conversation);
        let full = self.watched.len() >= MAX_WATCHES;
        let first = match self.watched.get_mut(&key) {
            Some(watch) if !watch.fired => {
                watch.notice = merge(Some(watch.notice), notice);
                if notice.seq > watch.latest.seq {
                    watch.latest = notice;
                }
                return true;
            }
            // Fired: its notification is on its way, and what it covers is
            // still unacknowledged (a settle reads `first`).
            Some(watch) => watch.first,
            None if full => return false,
            None => notice.seq,
        };
        self.compact();
        self.watched.insert(
            key,
            Watch {
                notice,
                latest: notice,
                first,
                due,
                fired: false,
            },
        );
        self.due.push_back((due, key.0, key.1));
        true
    }

    /// Acked and re-timed watches leave their entries in `due`; once those
    /// are most of it, they go (each compaction follows as many new
    /// entries as it keeps, so this costs O(1) a watch).
    fn compact(&mut self) {
        if self.due.len() > 2 * self.watched.len() + 1024 {
            let watched = &self.watched;
            self.due.retain(|&(at, user, conversation)| {
                watched
                    .get(&(user, conversation))
                    .is_some_and(|w| w.due == at && !w.fired)
            });
        }
    }

    /// A foreground device of `user` acknowledged `conversation` up to
    /// `seq`: a watch it covers ends (true if one did, unless it had
    /// already fired); one it covers in part waits again from `due`, as
    /// the device is alive and reading.
    fn acked(
        &mut self,
        user: UserId,
        conversation: ConversationId,
        seq: u64,
        due: Instant,
    ) -> bool {
        let key = (user, conversation);
        let Entry::Occupied(mut e) = self.watched.entry(key) else {
            return false;
        };
        if e.get().latest.seq <= seq {
            return !e.remove().fired;
        }
        let watch = e.get_mut();
        if seq < watch.first {
            return false;
        }
        watch.first = seq + 1;
        // The message it would tell of is read: the latest is what is
        // left to tell.
        if watch.notice.seq <= seq {
            watch.notice = watch.latest;
        }
        if !watch.fired {
            watch.due = due;
            self.compact();
            self.due.push_back((due, user, conversation));
        }
        false
    }

    /// The watches due by `now`, as notices for the coalescer (marked
    /// `unacked`); they stay in the table, fired, until settled.
    fn expire(&mut self, now: Instant) -> Vec<Notice> {
        let mut due = Vec::new();
        while let Some(&(at, user, conversation)) = self.due.front() {
            if at > now {
                break;
            }
            self.due.pop_front();
            if let Some(watch) = self.watched.get_mut(&(user, conversation))
                && watch.due == at
                && !watch.fired
            {
                watch.fired = true;
                due.push(Notice {
                    unacked: true,
                    ..watch.notice
                });
            }
        }
        if self.watched.capacity() > 4 * self.watched.len() + 1024 {
            self.watched.shrink_to(2 * self.watched.len());
        }
        if self.due.capacity() > 4 * self.due.len() + 1024 {
            self.due.shrink_to(2 * self.due.len());
        }
        due
    }

    /// A notification of `notice` (of a message) is being sent, or
    /// dropped: it covers the watch of its conversation's messages up to
    /// it, which ends. True if one of those was still unacknowledged.
    fn settle(&mut self, notice: &Notice) -> bool {
        let Entry::Occupied(e) = self.watched.entry((notice.user, notice.conversation)) else {
            return false;
        };
        let unacked = e.get().first <= notice.seq;
        if e.get().notice.seq <= notice.seq {
            e.remove();
        }
        unacked
    }
}

/// A started notifier: the committers' handle and the task to stop at
/// shutdown.
pub type Started = (Arc<Notifier>, JoinHandle<()>);

/// Runs the windows ([`Windows`]) and the notifications being sent.
async fn coalesce(mut rx: mpsc::Receiver<Notice>, dispatcher: Arc<Dispatcher>, window: Duration) {
    let mut windows = Windows::new(window);
    let mut sending = JoinSet::new();
    let mut rings = HashMap::new();
    let mut watch_tick = dispatcher.unacked.as_ref().map(|unacked| {
        let mut tick = tokio::time::interval(unacked.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    loop {
        let next_end = windows.next_end();
        tokio::select! {
            notice = rx.recv() => {
                let Some(notice) = notice else { break };
                dispatcher.route(&mut rings, &mut windows, &mut sending, notice);
            }
            _ = async { watch_tick.as_mut().expect("only when set").tick().await },
                if watch_tick.is_some() =>
            {
                let unacked = dispatcher.unacked.as_ref().expect("the tick runs with it");
                let due = unacked.watches().expire(Instant::now());
                for notice in due {
                    dispatcher.metrics.push_watch("unacked");
                    dispatcher.route(&mut rings, &mut windows, &mut sending, notice);
                }
            }
            () = tokio::time::sleep_until(next_end.unwrap_or_else(Instant::now)),
                if next_end.is_some() =>
            {
                for notice in windows.expire(Instant::now()) {
                    dispatcher.send_in(&mut sending, notice, None);
                }
            }
            Some(_) = sending.join_next(), if !sending.is_empty() => {}
        }
    }
}

/// What [`Windows::offer`] makes of a notice.
#[derive(Debug, PartialEq, Eq)]
enum Offer {
    /// Send it now.
    Now(Notice),
    /// Held for the end of its window; `replaced`: in place of an earlier
    /// one, which is folded into it.
    Held { replaced: bool },
}

/// What a window holds when `new` comes while it holds `held`: the later
/// message, though a reaction never stands in for a message (the text
/// would go unannounced), and sent past the foreground only if both may
/// be (a watch that fired late does not stand in for a user who went
/// away meanwhile).
fn merge(held: Option<Notice>, new: Notice) -> Notice {
    let Some(held) = held else {
        return new;
    };
    let reaction = |n: &Notice| n.kind == NoticeKind::Reaction;
    let later = match (reaction(&held), reaction(&new)) {
        (false, true) => held,
        (true, false) => new,
        _ if held.seq > new.seq => held,
        _ => new,
    };
    Notice {
        unacked: held.unacked && new.unacked,
        ..later
    }
}

/// The coalescing windows, per (user, conversation): the first notice is
/// sent at once and opens a window; the latest that arrives within it is
/// sent when it ends, and opens the next. A key is kept while its window
/// is open (with the notice held for its end), with one deadline in
/// `ends`; at most [`MAX_WINDOWS`] are open, and past that a new key's
/// notice is sent at once, uncoalesced.
struct Windows {
    length: Duration,
    waiting: HashMap<(UserId, ConversationId), Option<Notice>>,
    ends: BinaryHeap<Reverse<(Instant, UserId, ConversationId)>>,
}

impl Windows {
    fn new(length: Duration) -> Self {
        Windows {
            length,
            waiting: HashMap::new(),
            ends: BinaryHeap::new(),
        }
    }

    fn offer(&mut self, notice: Notice, now: Instant) -> Offer {
        let key = (notice.user, notice.conversation);
        if let Some(held) = self.waiting.get_mut(&key) {
            let replaced = held.replace(merge(*held, notice)).is_some();
            return Offer::Held { replaced };
        }
        if self.waiting.len() < MAX_WINDOWS {
            self.waiting.insert(key, None);
            self.ends.push(Reverse((now + self.length, key.0, key.1)));
        }
        Offer::Now(notice)
    }

    fn next_end(&self) -> Option<Instant> {
        self.ends.peek().map(|Reverse((at, ..))| *at)
    }

    /// The notices held in windows that ended by `now`; each opens the
    /// next window of its key. Keys whose window ended with nothing held
    /// are forgotten.
    fn expire(&mut self, now: Instant) -> Vec<Notice> {
        let mut due = Vec::new();
        while let Some(&Reverse((at, user, conversation))) = self.ends.peek() {
            if at > now {
                break;
            }
            self.ends.pop();
            let key = (user, conversation);
            match self.waiting.get_mut(&key).and_then(Option::take) {
                Some(notice) => {
                    self.ends
                        .push(Reverse((now + self.length, user, conversation)));
                    due.push(notice);
                }
                None => {
                    self.waiting.remove(&key);
                }
            }
        }
        // A burst's table is given back once it has passed.
        if self.waiting.capacity() > 4 * self.waiting.len() + 1024 {
            self.waiting.shrink_to(2 * self.waiting.len());
            self.ends.shrink_to(2 * self.ends.len());
        }
        due
    }
}

/// A ring's notification and its end's, in that order: the ring's task
/// holds `turn` while it sends, and stops trying once `over`; the end's
/// task waits for `turn` first.
#[derive(Default)]
struct RingTurn {
    over: AtomicBool,
    turn: Arc<tokio::sync::Mutex<()>>,
}

/// Makes room in `rings` (full) by forgetting the rings whose notification
/// is done (only the map holds them): their end, if it ever comes, has
/// nothing to wait for. True if that made room.
fn forget_rings_sent(rings: &mut HashMap<(UserId, u64), Arc<RingTurn>>) -> bool {
    rings.retain(|_, ring| Arc::strong_count(ring) > 1);
    rings.shrink_to_fit();
    rings.len() < MAX_PENDING
}

/// A notification task's place in its ring's order.
enum Turn {
    /// The ring's, holding the turn.
    Ring(Arc<RingTurn>, tokio::sync::OwnedMutexGuard<()>),
    /// The end's, which waits for it.
    End(Arc<RingTurn>),
}

struct Dispatcher {
    /// The watch on foreground connections' messages, if on.
    unacked: Option<Arc<Unacked>>,
    store: Arc<dyn HistoryStore>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    gateway: Gateway,
    /// Store reads of notifications at once: on SQLite each is a job on
    /// the store thread, queued with the sends.
    store_reads: Semaphore,
    /// Requests in flight.
    requests: Semaphore,
    /// When a failure was last logged as a warning (Unix ms): at most one
    /// a minute, the rest at debug level (a gateway that is down, or
    /// fails now and then under load, would fill the log).
    warned_ms: AtomicI64,
}

impl Dispatcher {
    /// Sends a notice on its way: a text or photo into its conversation's
    /// window; a missed call at once (not folded into a text); a ring at
    /// once (it is now or never), and its end once the ring's
    /// notification is done, so a phone never hears of a ring after its
    /// end (`rings`: the rings whose end has not come, at most
    /// [`MAX_PENDING`]).
    fn route(
        self: &Arc<Self>,
        rings: &mut HashMap<(UserId, u64), Arc<RingTurn>>,
        windows: &mut Windows,
        sending: &mut JoinSet<()>,
        notice: Notice,
    ) {
        let key = (notice.user, notice.seq);
        match notice.kind {
            NoticeKind::Text | NoticeKind::Photo | NoticeKind::Reaction => {
                match windows.offer(notice, Instant::now()) {
                    Offer::Now(notice) => self.send_in(sending, notice, None),
                    Offer::Held { replaced: true } => self.metrics.push("coalesced"),
                    Offer::Held { replaced: false } => {}
                }
            }
            NoticeKind::MissedCall { .. } => self.send_in(sending, notice, None),
            NoticeKind::Call { .. } if rings.len() < MAX_PENDING || forget_rings_sent(rings) => {
                let ring = Arc::new(RingTurn::default());
                let turn = ring
                    .turn
                    .clone()
                    .try_lock_owned()
                    .expect("a new lock is free");
                rings.insert(key, ring.clone());
                self.send_in(sending, notice, Some(Turn::Ring(ring, turn)));
            }
            NoticeKind::Call { .. } => self.send_in(sending, notice, None),
            NoticeKind::CallEnded { .. } => {
                let turn = rings.remove(&key).map(|ring| {
                    ring.over.store(true, Ordering::Relaxed);
                    Turn::End(ring)
                });
                self.send_in(sending, notice, turn);
            }
        }
    }

    /// Sends `notice` on a task of `sending`, unless [`MAX_PENDING`] are
    /// under way (then it is dropped).
    fn send_in(self: &Arc<Self>, sending: &mut JoinSet<()>, notice: Notice, turn: Option<Turn>) {
        if sending.len() >= MAX_PENDING {
            self.settle(&notice);
            self.metrics.push("dropped");
            return;
        }
        let this = self.clone();
        sending.spawn(async move {
            let (ring, _turn) = match turn {
                Some(Turn::Ring(ring, turn)) => (Some(ring), Some(turn)),
                // After the ring's notification, whatever became of it.
                Some(Turn::End(ring)) => (None, Some(ring.turn.clone().lock_owned().await)),
                None => (None, None),
            };
            let outcome = this.send(notice, ring.as_deref()).await;
            this.metrics.push(outcome);
        });
    }

    /// Forgets the watch a notification of `notice` covers; true if the
    /// message is still unacknowledged.
    fn settle(&self, notice: &Notice) -> bool {
        notice.kind.is_message()
            && self
                .unacked
                .as_ref()
                .is_some_and(|unacked| unacked.watches().settle(notice))
    }

    /// Sends one notification; returns its outcome label. `ring`: the
    /// turn of a ring, which stops trying once the ring is over.
    async fn send(&self, notice: Notice, ring: Option<&RingTurn>) -> &'static str {
        let over = || ring.is_some_and(|ring| ring.over.load(Ordering::Relaxed));
        // The user may have opened the app since the message was stored
        // (or, for a call, a calls stream since it rang); a message a
        // foreground connection left unacknowledged goes unless a device
        // has acknowledged it since.
        let unacked = self.settle(&notice);
        let online = match notice.kind {
            NoticeKind::Call { .. } => self.hub.takes_calls(notice.user),
            // The device the notification rang may not be the one with a
            // calls stream now (the user answered on their laptop).
            NoticeKind::CallEnded { .. } => false,
            _ if notice.unacked => !unacked,
            _ => self.hub.in_foreground(notice.user),
        };
        if online {
            return if notice.unacked { "acked" } else { "online" };
        }
        if over() {
            return "ended";
        }
        let (devices, unread, sender_name) = {
            let _read = self.store_reads.acquire().await.expect("never closed");
            // A muted conversation's messages notify nobody; its calls
            // ring. Unread (the mute unknown), it goes.
            if notice.kind.is_message() {
                match self
                    .store
                    .muted_until(notice.conversation, notice.user)
                    .await
                {
                    Ok(until) if until > now_ms() => return "muted",
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(user = notice.user, error = %e, "notification: could not read the mute");
                    }
                }
            }
            let devices = match self.store.push_devices(notice.user, now_ms()).await {
                Ok(devices) => devices,
                Err(e) => {
                    return self.failed(notice.user, &format!("reading the user's devices: {e}"));
                }
            };
            if devices.is_empty() {
                return "no_device";
            }
            // Without the badge or the name the notification still goes. A
            // ring has no badge: it changes no unread count.
            let unread = match notice.kind.is_message() {
                false => Ok(None),
                true => self
                    .store
                    .unread_conversations(notice.user, MAX_BADGE)
                    .await
                    .map(Some),
            };
            let unread = match unread {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(user = notice.user, error = %e, "notification: could not count unread conversations");
                    None
                }
            };
            let sender_name = self.store.username(notice.sender).await.ok().flatten();
            (devices, unread, sender_name)
        };
        let body = Bytes::from(payload(&notice, &devices, unread, sender_name));
        let mut wait = RETRY_AFTER;
        for attempt in 1..=ATTEMPTS {
            if over() {
                return "ended";
            }
            let answer = {
                let _request = self.requests.acquire().await.expect("never closed");
                self.gateway.post(body.clone()).await
            };
            match answer {
                Ok(rejected) => {
                    self.forget(&devices, rejected).await;
                    return "sent";
                }
                Err(Failure::Refused(why)) => {
                    return self
                        .failed(notice.user, &format!("the push gateway refused it: {why}"));
                }
                Err(Failure::Retry(why)) if attempt == ATTEMPTS => {
                    return self.failed(
                        notice.user,
                        &format!("the push gateway did not take it in {ATTEMPTS} tries: {why}"),
                    );
                }
                Err(Failure::Retry(why)) => {
                    tracing::debug!(user = notice.user, reason = %why, "the push gateway failed; trying again");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// A notification failed: logged as a warning at most once a minute,
    /// at debug level otherwise (`chat_push_notifications_total{outcome=
    /// "failed"}` counts them all).
    fn failed(&self, user: UserId, why: &str) -> &'static str {
        let now = now_ms();
        let last = self.warned_ms.load(Ordering::Relaxed);
        if now - last >= WARN_EVERY_MS
            && self
                .warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                user,
                reason = why,
                "a notification failed (more failures within a minute are counted in chat_push_notifications_total{{outcome=\"failed\"}} and logged at debug level)"
            );
        } else {
            tracing::debug!(user, reason = why, "a notification failed");
        }
        "failed"
    }

    /// Forgets the tokens the gateway rejected. Only the devices this
    /// request named are touched (a gateway cannot name others), and only
    /// as they were registered then: a token registered again since (a
    /// new session on the device) is kept.
    async fn forget(&self, devices: &[PushDevice], rejected: Vec<String>) {
        let mut forgotten = 0;
        for device in devices.iter().filter(|d| rejected.contains(&d.token)) {
            match self
                .store
                .drop_push_token(
                    device.app_id.clone(),
                    device.token.clone(),
                    device.registered_ms,
                )
                .await
            {
                Ok(n) => forgotten += n,
                Err(e) => {
                    tracing::warn!(error = %e, "could not forget a push token the gateway rejected");
                }
            }
        }
        if forgotten > 0 {
            self.metrics.push_tokens_rejected(forgotten);
        }
    }
}

/// The request body (the Matrix push gateway's `notification`).
#[derive(Serialize)]
struct Payload<'a> {
    notification: Notification<'a>,
}

#[derive(Serialize)]
struct Notification<'a> {
    /// `conversation/seq`: what the app reads when it opens.
    event_id: String,
    room_id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    sender: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    sender_display_name: Option<String>,
    prio: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    counts: Option<Counts>,
    /// For `chat.call_ended`: why the ring ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<Content>,
    devices: Vec<Device<'a>>,
}

#[derive(Serialize)]
struct Content {
    /// The `CallEndReason` name without its prefix, lowercase
    /// (`answered_elsewhere`, `no_answer`, `hung_up`, ...).
    reason: String,
}

#[derive(Serialize)]
struct Counts {
    unread: u32,
}

#[derive(Serialize)]
struct Device<'a> {
    app_id: &'a str,
    pushkey: &'a str,
    /// When the device registered the token, in seconds.
    pushkey_ts: i64,
}

fn payload(
    notice: &Notice,
    devices: &[PushDevice],
    unread: Option<u32>,
    sender_name: Option<String>,
) -> Vec<u8> {
    let payload = Payload {
        notification: Notification {
            event_id: match notice.kind.is_message() {
                false => format!("call/{}", notice.seq),
                true => format!("{}/{}", notice.conversation, notice.seq),
            },
            room_id: notice.conversation.to_string(),
            kind: match notice.kind {
                NoticeKind::Text => "chat.text",
                NoticeKind::Photo => "chat.photo",
                NoticeKind::Reaction => "chat.reaction",
                NoticeKind::MissedCall { video: false } => "chat.missed_call",
                NoticeKind::MissedCall { video: true } => "chat.missed_video_call",
                NoticeKind::Call { video: false } => "chat.call",
                NoticeKind::Call { video: true } => "chat.video_call",
                NoticeKind::CallEnded { .. } => "chat.call_ended",
            },
            sender: notice.sender.to_string(),
            sender_display_name: sender_name,
            prio: "high",
            counts: unread.map(|unread| Counts { unread }),
            content: match notice.kind {
                NoticeKind::CallEnded { reason } => Some(Content {
                    reason: reason
                        .as_str_name()
                        .trim_start_matches("CALL_END_REASON_")
                        .to_ascii_lowercase(),
                }),
                _ => None,
            },
            devices: devices
                .iter()
                .map(|d| Device {
                    app_id: &d.app_id,
                    pushkey: &d.token,
                    pushkey_ts: d.registered_ms / 1000,
                })
                .collect(),
        },
    };
    serde_json::to_vec(&payload).expect("the payload serialises")
}

/// What the gateway answers.
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    rejected: Vec<String>,
}

enum Failure {
    /// No answer in time, a lost connection, 429 or 5xx: worth another try.
    Retry(String),
    /// Any other refusal (a 4xx: the request is wrong, and will stay so).
    Refused(String),
}

/// The push gateway's client: pooled keep-alive connections, HTTP/1.1,
/// TLS for `https://`.
struct Gateway {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    uri: Uri,
    timeout: Duration,
}

impl Gateway {
    fn new(url: &str, config: &PushConfig) -> Result<Gateway, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("push-gateway-url {url:?}: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match &config.push_gateway_ca {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in crate::certs::load_chain(path).map_err(|e| e.to_string())? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("push-gateway-ca {}: {e}", path.display()))?;
                }
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                builder.with_tls_config(tls)
            }
            None => builder
                .with_provider_and_webpki_roots(provider)
                .map_err(|e| e.to_string())?,
        };
        let connector = builder.https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(config.push_concurrency)
            .build(connector);
        Ok(Gateway {
            client,
            uri,
            timeout: config.push_timeout,
        })
    }

    /// Posts one notification; on success, the tokens the gateway
    /// rejected.
    async fn post(&self, body: Bytes) -> Result<Vec<String>, Failure> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("a valid request");
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| Failure::Retry(format!("request failed: {e}")))?;
            let status = response.status();
            let answer = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| Failure::Retry(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((status, answer))
        };
        let (status, answer) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| Failure::Retry(format!("no answer within {:?}", self.timeout)))??;
        if status.is_success() {
            // An answer without a readable list rejects nothing.
            return Ok(serde_json::from_slice::<Answer>(&answer)
                .map(|a| a.rejected)
                .unwrap_or_default());
        }
        let why = format!("HTTP {status}");
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            Err(Failure::Retry(why))
        } else {
            Err(Failure::Refused(why))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(user: UserId, conversation: ConversationId, seq: u64) -> Notice {
        Notice {
            user,
            conversation,
            seq,
            sender: 9,
            kind: NoticeKind::Text,
            unacked: false,
        }
    }

    #[test]
    fn a_window_sends_the_first_at_once_and_the_latest_at_its_end() {
        let second = Duration::from_secs(1);
        let mut windows = Windows::new(3 * second);
        let t0 = Instant::now();
        assert_eq!(
            windows.offer(notice(1, 5, 1), t0),
            Offer::Now(notice(1, 5, 1))
        );
        assert_eq!(
            windows.offer(notice(1, 5, 2), t0),
            Offer::Held { replaced: false }
        );
        assert_eq!(
            windows.offer(notice(1, 5, 3), t0 + second),
            Offer::Held { replaced: true }
        );
        // Another user, another conversation: windows of their own.
        assert_eq!(
            windows.offer(notice(2, 5, 3), t0),
            Offer::Now(notice(2, 5, 3))
        );
        assert_eq!(
            windows.offer(notice(1, 6, 1), t0),
            Offer::Now(notice(1, 6, 1))
        );
        assert_eq!(windows.next_end(), Some(t0 + 3 * second));
        assert!(windows.expire(t0 + 2 * second).is_empty());
        // The end: the latest goes and opens the next window; the keys
        // with nothing held are forgotten.
        let t3 = t0 + 3 * second;
        assert_eq!(windows.expire(t3), vec![notice(1, 5, 3)]);
        assert_eq!(windows.waiting.len(), 1);
        assert_eq!(
            windows.offer(notice(1, 5, 4), t3 + second),
            Offer::Held { replaced: false }
        );
        assert_eq!(windows.expire(t3 + 3 * second), vec![notice(1, 5, 4)]);
        assert!(windows.expire(t3 + 6 * second).is_empty());
        assert!(windows.waiting.is_empty() && windows.ends.is_empty());
        assert_eq!(windows.next_end(), None);
        assert_eq!(
            windows.offer(notice(1, 5, 5), t3 + 7 * second),
            Offer::Now(notice(1, 5, 5))
        );
    }

    #[test]
    fn a_zero_window_still_folds_what_comes_before_it_is_looked_at() {
        let mut windows = Windows::new(Duration::ZERO);
        let t0 = Instant::now();
        assert_eq!(
            windows.offer(notice(1, 5, 1), t0),
            Offer::Now(notice(1, 5, 1))
        );
        assert_eq!(
            windows.offer(notice(1, 5, 2), t0),
            Offer::Held { replaced: false }
        );
        assert_eq!(windows.next_end(), Some(t0));
        assert_eq!(windows.expire(t0), vec![notice(1, 5, 2)]);
        assert!(windows.expire(t0).is_empty());
        assert!(windows.waiting.is_empty());
    }

    #[test]
    fn windows_are_bounded() {
        let mut windows = Windows::new(Duration::from_secs(3));
        let t0 = Instant::now();
        for user in 0..MAX_WINDOWS as u64 {
            assert_eq!(
                windows.offer(notice(user, 1, 1), t0),
                Offer::Now(notice(user, 1, 1))
            );
        }
        // Past the bound a new key is sent at once and opens nothing, so
        // its next notice is sent at once too.
        let extra = MAX_WINDOWS as u64;
        assert_eq!(
            windows.offer(notice(extra, 1, 1), t0),
            Offer::Now(notice(extra, 1, 1))
        );
        assert_eq!(
            windows.offer(notice(extra, 1, 2), t0),
            Offer::Now(notice(extra, 1, 2))
        );
        assert_eq!(windows.waiting.len(), MAX_WINDOWS);
        // Once they end, the table is given back.
        assert!(windows.expire(t0 + Duration::from_secs(3)).is_empty());
        assert!(windows.waiting.is_empty());
        assert!(
            windows.waiting.capacity() < 1024,
            "{}",
            windows.waiting.capacity()
        );
    }

    #[test]
    fn a_watch_ends_with_an_ack_that_covers_it_or_fires_once_when_due() {
        let second = Duration::from_secs(1);
        let mut watches = Watches::default();
        let t0 = Instant::now();
        let fired = |seq| Notice {
            unacked: true,
            ..notice(1, 5, seq)
        };
        assert!(watches.watch(notice(1, 5, 3), t0 + 5 * second));
        // A later message keeps the first one's time.
        assert!(watches.watch(notice(1, 5, 4), t0 + 6 * second));
        assert!(watches.watch(notice(2, 5, 3), t0 + 6 * second));
        // An ack that covers the latest message, or a seen mark past it,
        // ends the watch; one of another conversation does nothing.
        assert!(!watches.acked(1, 6, 9, t0), "another conversation");
        assert!(watches.acked(2, 5, 7, t0));
        assert!(watches.expire(t0 + 4 * second).is_empty());
        assert_eq!(watches.expire(t0 + 5 * second), vec![fired(4)]);
        // Fired, it waits for its notification and is not due again.
        assert!(watches.expire(t0 + 60 * second).is_empty());
        assert!(watches.settle(&fired(4)), "still unacknowledged");
        assert!(watches.watched.is_empty());
        assert!(!watches.settle(&fired(4)), "settled once");

        // Acked while its notification waited: the notification stays
        // home, and the ack is not counted as a watch that ended in time.
        assert!(watches.watch(notice(1, 5, 8), t0));
        assert_eq!(watches.expire(t0), vec![fired(8)]);
        assert!(!watches.acked(1, 5, 8, t0));
        assert!(!watches.settle(&fired(8)));

        // A message after one that fired is watched anew; the first one's
        // notification still goes (what it covers is unacknowledged) and
        // leaves the new watch in place.
        assert!(watches.watch(notice(1, 5, 9), t0));
        assert_eq!(watches.expire(t0), vec![fired(9)]);
        assert!(watches.watch(notice(1, 5, 10), t0 + second));
        assert!(watches.settle(&fired(9)));
        assert_eq!(watches.expire(t0 + second), vec![fired(10)]);
        assert!(watches.settle(&fired(10)));
        assert!(watches.watched.is_empty());
    }

    #[test]
    fn a_watched_message_is_told_rather_than_a_later_reaction() {
        let second = Duration::from_secs(1);
        let mut watches = Watches::default();
        let t0 = Instant::now();
        let reaction = |seq| Notice {
            kind: NoticeKind::Reaction,
            ..notice(1, 5, seq)
        };
        let fired = |notice: Notice| Notice {
            unacked: true,
            ..notice
        };
        // Neither read when due: the text is told, and its notification
        // covers the reaction.
        assert!(watches.watch(notice(1, 5, 10), t0 + second));
        assert!(watches.watch(reaction(11), t0 + 2 * second));
        assert_eq!(watches.expire(t0 + second), vec![fired(notice(1, 5, 10))]);
        assert!(watches.settle(&fired(notice(1, 5, 10))));
        assert!(watches.watched.is_empty());
        // The text read, the reaction is what is left to tell.
        assert!(watches.watch(notice(1, 5, 20), t0));
        assert!(watches.watch(reaction(21), t0));
        assert!(!watches.acked(1, 5, 20, t0 + second));
        assert!(watches.expire(t0).is_empty(), "waits again from the ack");
        assert_eq!(watches.expire(t0 + second), vec![fired(reaction(21))]);
        assert!(watches.settle(&fired(reaction(21))));
        // Both read: nothing.
        assert!(watches.watch(notice(1, 5, 30), t0));
        assert!(watches.watch(reaction(31), t0));
        assert!(watches.acked(1, 5, 31, t0));
        assert!(watches.expire(t0 + second).is_empty());
        assert!(watches.watched.is_empty());
    }

    #[test]
    fn a_device_that_acks_behind_a_busy_conversation_is_not_notified() {
        let second = Duration::from_secs(1);
        let mut watches = Watches::default();
        let t0 = Instant::now();
        // Messages come faster than the acks: each ack covers an earlier
        // one than the latest, and moves the watch on.
        assert!(watches.watch(notice(1, 5, 1), t0 + 5 * second));
        for seq in 2..=20 {
            let now = t0 + second * (seq as u32 - 1) / 2;
            assert!(watches.watch(notice(1, 5, seq), now + 5 * second));
            assert!(!watches.acked(1, 5, seq - 1, now + 5 * second));
            assert!(watches.expire(now).is_empty(), "at {seq}");
        }
        // Acks stop at 19: five seconds after the last one, the watch of
        // 20 fires, and its notification goes.
        let last_ack = t0 + second * 19 / 2;
        assert!(watches.expire(last_ack + 4 * second).is_empty());
        let due = watches.expire(last_ack + 5 * second);
        assert_eq!((due.len(), due[0].seq), (1, 20));
        assert!(watches.settle(&due[0]));
        // A notification of an earlier message, acked since, does not go.
        assert!(watches.watch(notice(1, 5, 30), t0));
        assert!(!watches.acked(1, 5, 29, t0 + second));
        assert!(!watches.settle(&Notice {
            unacked: true,
            ..notice(1, 5, 29)
        }));
        // A notification sent the ordinary way (the user went away) covers
        // the watch of what came before it, and ends it.
        assert!(watches.settle(&notice(1, 5, 31)));
        assert!(watches.watched.is_empty());
    }

    #[test]
    fn watches_are_bounded_and_stale_due_entries_are_skipped() {
        let mut watches = Watches::default();
        let t0 = Instant::now();
        for user in 0..MAX_WATCHES as u64 {
            assert!(watches.watch(notice(user, 1, 1), t0));
        }
        assert!(!watches.watch(notice(u64::MAX, 1, 1), t0), "full");
        // A key already watched still takes its latest message.
        assert!(watches.watch(notice(0, 1, 2), t0));
        for user in 1..MAX_WATCHES as u64 {
            assert!(watches.acked(user, 1, 1, t0));
        }
        // A new key fits again, and the acked ones' entries are compacted
        // away.
        assert!(watches.watch(notice(1, 1, 2), t0 + Duration::from_secs(1)));
        assert_eq!(watches.due.len(), 2);
        // Acked and watched again: the first due entry is stale.
        assert!(watches.acked(1, 1, 2, t0));
        assert!(watches.watch(notice(1, 1, 3), t0 + Duration::from_secs(2)));
        let due = watches.expire(t0 + Duration::from_secs(1));
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].user, due[0].seq), (0, 2));
        assert!(watches.watched.capacity() < 1024 + 8);
        let due = watches.expire(t0 + Duration::from_secs(2));
        assert_eq!((due[0].user, due[0].seq), (1, 3));
    }

    #[test]
    fn a_window_keeps_the_later_message_and_sends_past_the_foreground_only_if_both_may() {
        let fired = |seq| Notice {
            unacked: true,
            ..notice(1, 5, seq)
        };
        assert_eq!(merge(None, fired(3)), fired(3));
        assert_eq!(merge(Some(notice(1, 5, 10)), fired(8)), notice(1, 5, 10));
        assert_eq!(merge(Some(fired(8)), notice(1, 5, 10)), notice(1, 5, 10));
        assert_eq!(merge(Some(fired(8)), fired(9)), fired(9));
    }

    #[test]
    fn a_reaction_in_a_window_never_stands_in_for_a_message() {
        let reaction = |seq| Notice {
            kind: NoticeKind::Reaction,
            ..notice(1, 5, seq)
        };
        // A text, then a reaction to another message: the text is told.
        assert_eq!(
            merge(Some(notice(1, 5, 10)), reaction(11)),
            notice(1, 5, 10)
        );
        // A reaction, then a text: the text.
        assert_eq!(
            merge(Some(reaction(10)), notice(1, 5, 11)),
            notice(1, 5, 11)
        );
        // Among reactions, the later.
        assert_eq!(merge(Some(reaction(10)), reaction(12)), reaction(12));
    }

    #[test]
    fn the_payload_has_the_gateway_shape_and_no_text() {
        let notice = Notice {
            user: 2,
            conversation: 42,
            seq: 17,
            sender: 7,
            kind: NoticeKind::Text,
            unacked: false,
        };
        let devices = [PushDevice {
            app_id: "com.example.ios".into(),
            token: "abc".into(),
            registered_ms: 1_700_000_000_123,
        }];
        let json: serde_json::Value =
            serde_json::from_slice(&payload(&notice, &devices, Some(3), Some("alice".into())))
                .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"notification": {
                "event_id": "42/17",
                "room_id": "42",
                "type": "chat.text",
                "sender": "7",
                "sender_display_name": "alice",
                "prio": "high",
                "counts": {"unread": 3},
                "devices": [{"app_id": "com.example.ios", "pushkey": "abc", "pushkey_ts": 1_700_000_000}],
            }})
        );
        let photo = Notice {
            kind: NoticeKind::Photo,
            ..notice
        };
        let json: serde_json::Value =
            serde_json::from_slice(&payload(&photo, &devices, None, None)).unwrap();
        assert_eq!(json["notification"]["type"], "chat.photo");
        assert!(json["notification"].get("counts").is_none());
        assert!(json["notification"].get("sender_display_name").is_none());
        // A ring names the call, not a message.
        let ring = Notice {
            seq: 9,
            kind: NoticeKind::Call { video: true },
            ..notice
        };
        let json: serde_json::Value =
            serde_json::from_slice(&payload(&ring, &devices, None, None)).unwrap();
        assert_eq!(json["notification"]["type"], "chat.video_call");
        assert_eq!(json["notification"]["event_id"], "call/9");
        assert_eq!(json["notification"]["room_id"], "42");
    }
}
