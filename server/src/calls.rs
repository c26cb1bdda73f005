//! Group calls: who is in which call, ringing, and the forwarding of call
//! media (see the calls section of `chat.proto`).
//!
//! A call lives in this node's memory only: it is made of connections, and
//! they end with the node. What stays of it is its log, a CALL message the
//! registry writes into the conversation when it ends (through the send
//! committers, like any message). One registry lock covers every call's
//! membership; calls change a few times a minute, not per message. Events
//! are queued under that lock, so every connection sees a call's changes
//! in the order they happened (a JOINED before the LEFT of the same
//! participant, a CallJoined answer before the signals sent to it).
//!
//! Media does not take the registry lock. Each connection's datagrams are
//! read by its session task ([`Calls::forward`]), which finds the
//! connection's place in a call in its [`MediaSlot`] (with the list of the
//! other participants' connections, which the registry hands every
//! participant whenever it changes) and sends the datagram, prefixed with
//! the sender's participant id, to each of them. A connection in no call
//! has its datagrams dropped as they come, so they neither pile up in
//! quinn's buffers (each pins the packet it came in) nor reach the
//! connection's next call.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chat_protocol::{Body, ErrorCode, Frame, StreamKind, proto};
use proto::{CallEndReason, CallEventKind};
use tokio::task::AbortHandle;

use crate::config::CallsConfig;
use crate::delivery::{Delivery, ServerWrite};
use crate::error::Refusal;
use crate::hub::{Hub, SessionHandle};
use crate::metrics::{MediaOutcome, Metrics};
use crate::notify::{Notice, NoticeKind, Notifier};
use crate::ratelimit::RateLimiter;
use crate::store::{ConversationId, HistoryStore, NewMessage, UserId};
use crate::wire::Outbound;

/// A call's id: random, so that ids are not guessed or met again after a
/// restart.
pub type CallId = u64;

/// New calls that ring someone, and moves of a user's place to another
/// device, per user: ten at once, then one every ten seconds. A start that
/// joins a running call is not counted. Without it a member looping start
/// and leave rang (and had the gateway notify) every other member twenty
/// times a second, and one moving between two devices sent every
/// participant a LEFT and a JOINED as fast.
const RINGS_PER_SECOND: f64 = 0.1;
const RING_BURST: u32 = 10;

/// A signal is refused (RATE_LIMITED) while its recipient's calls queue
/// holds this many frames or bytes: a reader on a slow link must not be
/// closed as a slow consumer because others signal faster than it reads.
const SIGNAL_QUEUE_FRAMES: usize = 128;
const SIGNAL_QUEUE_BYTES: usize = 256 * 1024;

/// When a signal refused for a slow recipient may be tried again.
const SIGNAL_RETRY: Duration = Duration::from_millis(500);

/// The node's calls (see the module docs).
pub struct Calls {
    config: CallsConfig,
    hub: Arc<Hub>,
    store: Arc<dyn HistoryStore>,
    metrics: Arc<Metrics>,
    /// Rings users with no calls stream open, when a gateway is set.
    notifier: Option<Arc<Notifier>>,
    /// Whether connections take datagrams at all (`datagram-receive-buffer`).
    media_on: bool,
    /// New ringing calls per user.
    rings: RateLimiter,
    /// What the node may still forward (`call-media-node-rate`): every
    /// copy of every call's media is charged here after its sender's own
    /// budget.
    node_media: Mutex<Budget>,
    registry: Mutex<Registry>,
    /// This registry, for its timers (weak: a node that stops does not
    /// wait for them).
    me: Weak<Calls>,
    /// Where a call's log goes when it ends (weak: the committers, which
    /// hold this registry, stop when the node lets them go).
    delivery: OnceLock<Weak<Delivery>>,
}

#[derive(Default)]
struct Registry {
    calls: HashMap<CallId, Live>,
    by_conversation: HashMap<ConversationId, CallId>,
    /// Connection id -> the call it is in.
    by_conn: HashMap<u64, CallId>,
    /// User -> the calls ringing them, so that a calls stream opened while
    /// a call rings is rung too.
    rung: HashMap<UserId, Vec<CallId>>,
    /// A direct call's two users (smaller id first) -> the call.
    by_pair: HashMap<(UserId, UserId), CallId>,
}

/// One call under way.
struct Live {
    conversation_id: ConversationId,
    /// The two members of a direct call (their friendship's end ends it);
    /// `None` for a group.
    pair: Option<(UserId, UserId)>,
    video: bool,
    started_ms: i64,
    caller: UserId,
    ring_until_ms: i64,
    participants: Vec<Participant>,
    /// Users rung who have neither answered nor declined, while it rings.
    ringing: Vec<UserId>,
    /// Users rung, less those who declined or left the conversation: the
    /// ones of them who never join missed it (the log says so).
    rang: Vec<UserId>,
    /// Users rung by notification whose ring has not ended: when it does,
    /// they are notified so (their phone stops ringing).
    pushed: HashSet<UserId>,
    /// The users who took part, in the order they first joined.
    joined: Vec<UserId>,
    next_participant: u32,
    /// When two participants were first in the call at once (Unix ms): a
    /// call left with one may wait for the other to come back; one never
    /// answered ends.
    answered_ms: Option<i64>,
    /// Since when one participant or none has been left in an answered
    /// call (Unix ms): the call's length ends there.
    alone_since_ms: Option<i64>,
    /// Moves with every change of participants: a timer set when one was
    /// left alone acts only if nothing changed since.
    epoch: u64,
    /// The ring's or the wait alone's timer, aborted when replaced or when
    /// the call ends.
    timer: Option<AbortHandle>,
}

struct Participant {
    id: u32,
    user_id: UserId,
    handle: Arc<SessionHandle>,
    joined_ms: i64,
}

#[derive(Clone)]
struct Peer {
    id: u32,
    conn: quinn::Connection,
}

/// A connection's media state, in its [`SessionHandle`]: empty until its
/// first call, then kept (the sender's budget with it, so leaving and
/// joining again does not refill it).
#[derive(Default)]
pub struct MediaSlot(Mutex<Option<Box<Seat>>>);

struct Seat {
    budget: Budget,
    /// The call the connection is in, if any.
    call: Option<InCall>,
}

struct InCall {
    me: u32,
    /// Every participant's connection, this one's included.
    peers: Arc<[Peer]>,
}

impl MediaSlot {
    fn lock(&self) -> MutexGuard<'_, Option<Box<Seat>>> {
        self.0.lock().expect("media slot lock")
    }
}

/// Users a call's log names, at most, in each of its lists (who took
/// part, who missed it): the users beyond are neither named nor notified
/// of a missed call.
const MAX_LOGGED: usize = 64;

fn not_in_call() -> Refusal {
    Refusal::new(ErrorCode::NotFound, "no such call, or it is over")
}

fn in_another_call() -> Refusal {
    Refusal::new(
        ErrorCode::UnexpectedFrame,
        "this connection is in another call; leave it first",
    )
}

fn not_friends() -> Refusal {
    Refusal::new(
        ErrorCode::NotFriends,
        "a direct call needs the two users to be friends",
    )
}

/// The metric label of a reason a call ended.
fn reason_label(reason: CallEndReason) -> &'static str {
    match reason {
        CallEndReason::Disconnected => "disconnected",
        CallEndReason::NoAnswer => "no_answer",
        CallEndReason::Declined => "declined",
        CallEndReason::Alone => "alone",
        CallEndReason::Removed => "removed",
        _ => "hung_up",
    }
}

/// A call log's words, for apps that do not render the log themselves:
/// "Missed call", "Video call, 12 min", or, for a call that rang nobody
/// (a group too large to ring) and that nobody joined, "Call, nobody
/// joined".
fn log_text(log: &proto::CallLog) -> String {
    let what = if log.video { "video call" } else { "call" };
    let title = if log.video { "Video call" } else { "Call" };
    if log.duration_ms == 0 && log.reason == CallEndReason::Declined as i32 {
        return format!("Declined {what}");
    }
    if log.duration_ms == 0 && log.missed.is_empty() {
        return format!("{title}, nobody joined");
    }
    if log.duration_ms == 0 {
        return format!("Missed {what}");
    }
    let seconds = log.duration_ms.div_ceil(1000);
    let length = match seconds {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s => format!("{} h {} min", s / 3600, s % 3600 / 60),
    };
    format!("{title}, {length}")
}

/// The connection is in no call any more: its datagrams are dropped.
fn unseat(handle: &SessionHandle) {
    if let Some(slot) = handle.call_media()
        && let Some(seat) = slot.lock().as_mut()
    {
        seat.call = None;
    }
}

/// Takes `call_id` from the calls that ring `user`.
fn unring(rung: &mut HashMap<UserId, Vec<CallId>>, user: UserId, call_id: CallId) {
    if let Some(calls) = rung.get_mut(&user) {
        calls.retain(|&c| c != call_id);
        if calls.is_empty() {
            rung.remove(&user);
        }
    }
}

/// The timers a call may have.
#[derive(Clone, Copy)]
enum Timer {
    /// The ring ends.
    Ring,
    /// One participant has been alone since `epoch`.
    Alone(u64),
}

impl Calls {
    /// An empty registry. `notifier` rings users who have no calls stream
    /// open; `media_on`: the endpoint takes datagrams.
    pub fn new(
        config: CallsConfig,
        hub: Arc<Hub>,
        store: Arc<dyn HistoryStore>,
        metrics: Arc<Metrics>,
        notifier: Option<Arc<Notifier>>,
        media_on: bool,
    ) -> Arc<Calls> {
        let node_media = Budget::new(config.call_media_node_rate, Instant::now());
        Arc::new_cyclic(|me| Calls {
            config,
            hub,
            store,
            metrics,
            notifier,
            media_on,
            rings: RateLimiter::with_rate(RINGS_PER_SECOND, RING_BURST),
            node_media: Mutex::new(node_media),
            registry: Mutex::new(Registry::default()),
            me: me.clone(),
            delivery: OnceLock::new(),
        })
    }

    /// From now on a call that ends writes its log (a CALL message) into
    /// its conversation through `delivery`.
    pub fn write_logs_through(&self, delivery: &Arc<Delivery>) {
        let _ = self.delivery.set(Arc::downgrade(delivery));
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().expect("calls lock")
    }

    /// StartCall: checks that the user may call in the conversation, then
    /// starts a call there and rings its other members, or joins the one
    /// it has. The answer (`CallJoined`) is queued on the calls stream.
    pub async fn start(
        &self,
        handle: &Arc<SessionHandle>,
        request_id: u64,
        conversation_id: ConversationId,
        video: bool,
    ) -> Result<(), Refusal> {
        let view = self
            .store
            .conversation(conversation_id, handle.user_id)
            .await?;
        if view.closed {
            return Err(not_friends());
        }
        let direct = view.kind == proto::ConversationKind::Direct;
        let mut registry = self.lock();
        if let Some(&current) = registry.by_conn.get(&handle.conn_id) {
            // A retried start finds the call it made.
            if registry.calls[&current].conversation_id != conversation_id {
                return Err(in_another_call());
            }
            return self.answer_joined(&registry, current, handle, request_id);
        }
        if let Some(&call_id) = registry.by_conversation.get(&conversation_id) {
            return self.join_locked(&mut registry, call_id, handle, request_id);
        }
        let ring = direct || view.members.len() <= self.config.call_ring_max_members;
        let ringing: Vec<UserId> = match ring {
            true => view
                .members
                .iter()
                .map(|m| m.user_id)
                .filter(|&user| user != handle.user_id)
                .collect(),
            false => Vec::new(),
        };
        if !ringing.is_empty() {
            self.rings
                .check(handle.user_id, Instant::now())
                .map_err(|wait| {
                    Refusal::new(
                        ErrorCode::RateLimited,
                        "too many calls started; try again later",
                    )
                    .with_retry_after(wait)
                })?;
        }
        let call_id = loop {
            let id = rand::random::<u64>();
            if id != 0 && !registry.calls.contains_key(&id) {
                break id;
            }
        };
        let now = crate::streams::now_ms();
        let pair = match view.members.as_slice() {
            [a, b] if direct => Some((a.user_id.min(b.user_id), a.user_id.max(b.user_id))),
            _ => None,
        };
        let live = Live {
            conversation_id,
            pair,
            video,
            started_ms: now,
            caller: handle.user_id,
            ring_until_ms: now.saturating_add(
                i64::try_from(self.config.ring_timeout.as_millis()).unwrap_or(i64::MAX),
            ),
            participants: Vec::new(),
            rang: ringing.clone(),
            pushed: HashSet::new(),
            joined: Vec::new(),
            ringing,
            next_participant: 1,
            answered_ms: None,
            alone_since_ms: None,
            epoch: 0,
            timer: None,
        };
        registry.by_conversation.insert(conversation_id, call_id);
        if let Some(pair) = pair {
            registry.by_pair.insert(pair, call_id);
        }
        registry.calls.insert(call_id, live);
        self.metrics.calls_started.increment(1);
        self.metrics.calls_active.increment(1.0);
        self.add_participant(&mut registry, call_id, handle);
        self.answer_joined(&registry, call_id, handle, request_id)?;
        let Registry { calls, rung, .. } = &mut *registry;
        let live = calls.get_mut(&call_id).expect("just made");
        let ring_frame = push_event(live.ring(call_id));
        for &user in &live.ringing {
            rung.entry(user).or_default().push(call_id);
            if self.hub.push(user, StreamKind::Calls, &ring_frame, None) == 0
                && let Some(notifier) = &self.notifier
            {
                live.pushed.insert(user);
                notifier.notify(Notice {
                    user,
                    conversation: conversation_id,
                    seq: call_id,
                    sender: handle.user_id,
                    kind: NoticeKind::Call { video },
                    unacked: false,
                });
            }
        }
        if live.ringing.is_empty() {
            let epoch = live.epoch;
            self.set_timer(live, call_id, Timer::Alone(epoch));
        } else {
            self.set_timer(live, call_id, Timer::Ring);
        }
        Ok(())
    }

    /// JoinCall: checks that the user is (still) a member of the call's
    /// conversation, then joins. The answer is queued on the calls stream.
    pub async fn join(
        &self,
        handle: &Arc<SessionHandle>,
        request_id: u64,
        call_id: CallId,
    ) -> Result<(), Refusal> {
        let conversation_id = self
            .lock()
            .calls
            .get(&call_id)
            .map(|live| live.conversation_id)
            .ok_or_else(not_in_call)?;
        let view = self
            .store
            .conversation(conversation_id, handle.user_id)
            .await
            .map_err(|e| match e {
                // Whether a call runs is the members' business only.
                crate::store::StoreError::NotAMember => not_in_call(),
                e => e.into(),
            })?;
        if view.closed {
            return Err(not_friends());
        }
        let mut registry = self.lock();
        self.join_locked(&mut registry, call_id, handle, request_id)
    }

    fn join_locked(
        &self,
        registry: &mut Registry,
        call_id: CallId,
        handle: &Arc<SessionHandle>,
        request_id: u64,
    ) -> Result<(), Refusal> {
        if let Some(&current) = registry.by_conn.get(&handle.conn_id) {
            if current != call_id {
                return Err(in_another_call());
            }
            return self.answer_joined(registry, call_id, handle, request_id);
        }
        let Registry {
            calls,
            by_conn,
            rung,
            ..
        } = registry;
        let live = calls.get_mut(&call_id).ok_or_else(not_in_call)?;
        let user = handle.user_id;
        if let Some(at) = live.participants.iter().position(|p| p.user_id == user) {
            // One place per user: it moves to this device.
            self.rings.check(user, Instant::now()).map_err(|wait| {
                Refusal::new(
                    ErrorCode::RateLimited,
                    "too many moves between devices; try again later",
                )
                .with_retry_after(wait)
            })?;
            let moved = live.participants.remove(at);
            by_conn.remove(&moved.handle.conn_id);
            unseat(&moved.handle);
            self.metrics.call_participants.decrement(1.0);
            let reason = CallEndReason::JoinedElsewhere as i32;
            let ended = proto::CallEvent {
                reason,
                ..live.event(call_id, CallEventKind::Ended, user, moved.id)
            };
            moved.handle.push(StreamKind::Calls, push_event(ended));
            let left = proto::CallEvent {
                reason,
                ..live.event(call_id, CallEventKind::Left, user, moved.id)
            };
            live.tell_participants(&push_event(left));
        } else if live.participants.len() >= self.config.max_call_participants {
            return Err(Refusal::new(
                ErrorCode::LimitReached,
                format!(
                    "the call has its {} participants",
                    self.config.max_call_participants
                ),
            ));
        }
        self.stop_ringing(
            (live, rung),
            call_id,
            user,
            (CallEndReason::AnsweredElsewhere, handle.conn_id),
        );
        self.add_participant(registry, call_id, handle);
        let live = registry.calls.get_mut(&call_id).expect("joined");
        if live.participants.len() == 1 && live.ringing.is_empty() {
            // A lone participant moved to another device: the wait alone
            // starts again for its new place.
            let epoch = live.epoch;
            self.set_timer(live, call_id, Timer::Alone(epoch));
        }
        self.answer_joined(registry, call_id, handle, request_id)
    }

    /// Stops `call_id` ringing `user`, who answered or declined on the
    /// connection `except`: their other devices hear RING_STOPPED with
    /// `reason`. False if it did not ring them.
    fn stop_ringing(
        &self,
        (live, rung): (&mut Live, &mut HashMap<UserId, Vec<CallId>>),
        call_id: CallId,
        user: UserId,
        (reason, except): (CallEndReason, u64),
    ) -> bool {
        let Some(at) = live.ringing.iter().position(|&u| u == user) else {
            return false;
        };
        live.ringing.swap_remove(at);
        unring(rung, user, call_id);
        self.ring_ended(live, call_id, user, reason);
        let stopped = proto::CallEvent {
            reason: reason as i32,
            ..live.event(call_id, CallEventKind::RingStopped, user, 0)
        };
        self.hub
            .push(user, StreamKind::Calls, &push_event(stopped), Some(except));
        true
    }

    /// Adds `handle` to the call as a new participant, tells the others
    /// and gives its connection's media a seat.
    fn add_participant(
        &self,
        registry: &mut Registry,
        call_id: CallId,
        handle: &Arc<SessionHandle>,
    ) {
        let live = registry.calls.get_mut(&call_id).expect("a live call");
        let id = live.next_participant;
        live.next_participant += 1;
        let joined = live.event(call_id, CallEventKind::Joined, handle.user_id, id);
        live.tell_participants(&push_event(joined));
        live.participants.push(Participant {
            id,
            user_id: handle.user_id,
            handle: handle.clone(),
            joined_ms: crate::streams::now_ms(),
        });
        if live.participants.len() > 1 {
            live.answered_ms.get_or_insert_with(crate::streams::now_ms);
            live.alone_since_ms = None;
        }
        if !live.joined.contains(&handle.user_id) {
            live.joined.push(handle.user_id);
        }
        live.epoch += 1;
        registry.by_conn.insert(handle.conn_id, call_id);
        self.metrics.call_participants.increment(1.0);
        let rate = self.config.call_media_rate;
        // Requests come on the calls stream, so its state is there.
        if let Some(slot) = handle.call_media() {
            slot.lock()
                .get_or_insert_with(|| {
                    Box::new(Seat {
                        budget: Budget::new(rate.into(), Instant::now()),
                        call: None,
                    })
                })
                .call = Some(InCall {
                me: id,
                peers: Arc::new([]),
            });
        }
        live.publish_peers();
    }

    /// Queues `CallJoined` for `handle`, which is in the call.
    fn answer_joined(
        &self,
        registry: &Registry,
        call_id: CallId,
        handle: &SessionHandle,
        request_id: u64,
    ) -> Result<(), Refusal> {
        let live = registry.calls.get(&call_id).ok_or_else(not_in_call)?;
        let me = live
            .participants
            .iter()
            .find(|p| p.handle.conn_id == handle.conn_id)
            .ok_or_else(not_in_call)?;
        let max_media_bytes = match handle.connection().max_datagram_size() {
            Some(max) if self.media_on => {
                max.saturating_sub(chat_protocol::calls::MAX_MEDIA_PREFIX)
            }
            _ => 0,
        };
        let joined = proto::CallJoined {
            call_id,
            conversation_id: live.conversation_id,
            participant_id: me.id,
            participants: live
                .participants
                .iter()
                .map(|p| proto::CallParticipant {
                    participant_id: p.id,
                    user_id: p.user_id,
                    joined_ms: p.joined_ms,
                })
                .collect(),
            video: live.video,
            started_ms: live.started_ms,
            max_media_bytes: u32::try_from(max_media_bytes).unwrap_or(u32::MAX),
        };
        handle.push(
            StreamKind::Calls,
            Outbound::frame(&Frame::new(request_id, Body::CallJoined(joined))),
        );
        Ok(())
    }

    /// A calls stream opened on `handle`: its queue takes pushes from now
    /// on, and it is rung for the calls that ring its user now. Both under
    /// the registry's lock, which a new call's ring is pushed under: the
    /// ring reaches the stream through the hub or through this replay,
    /// never both.
    pub fn opened(&self, handle: &SessionHandle) {
        let registry = self.lock();
        handle.open_calls();
        for call_id in registry.rung.get(&handle.user_id).into_iter().flatten() {
            if let Some(live) = registry.calls.get(call_id) {
                handle.push(StreamKind::Calls, push_event(live.ring(*call_id)));
            }
        }
    }

    /// DeclineCall: stops the ring on every device of the user and tells
    /// the participants; NOT_FOUND unless the call rings the user.
    pub fn decline(&self, handle: &SessionHandle, call_id: CallId) -> Result<(), Refusal> {
        let mut registry = self.lock();
        let Registry { calls, rung, .. } = &mut *registry;
        let live = calls.get_mut(&call_id).ok_or_else(not_in_call)?;
        let user = handle.user_id;
        let reason = (CallEndReason::Declined, handle.conn_id);
        if !self.stop_ringing((live, rung), call_id, user, reason) {
            return Err(Refusal::new(
                ErrorCode::NotFound,
                "this call does not ring you",
            ));
        }
        live.rang.retain(|&u| u != user);
        let declined = live.event(call_id, CallEventKind::Declined, user, 0);
        live.tell_participants(&push_event(declined));
        self.settle(&mut registry, call_id, CallEndReason::Declined);
        Ok(())
    }

    /// LeaveCall: NOT_FOUND unless this connection is in that call.
    pub fn leave(&self, handle: &SessionHandle, call_id: CallId) -> Result<(), Refusal> {
        let mut registry = self.lock();
        if registry.by_conn.get(&handle.conn_id) != Some(&call_id) {
            return Err(not_in_call());
        }
        self.remove(
            &mut registry,
            call_id,
            handle.conn_id,
            CallEndReason::HungUp,
        );
        Ok(())
    }

    /// The connection ended: it leaves its call, if any.
    pub fn disconnected(&self, conn_id: u64) {
        let mut registry = self.lock();
        if let Some(&call_id) = registry.by_conn.get(&conn_id) {
            self.remove(&mut registry, call_id, conn_id, CallEndReason::Disconnected);
        }
    }

    /// `user` is no longer a member of the conversation (removed from the
    /// group, or left it): they leave its call, and it stops ringing them.
    pub fn membership_ended(&self, conversation_id: ConversationId, user: UserId) {
        let mut registry = self.lock();
        let Some(&call_id) = registry.by_conversation.get(&conversation_id) else {
            return;
        };
        self.take_out(&mut registry, call_id, user);
    }

    /// `a` and `b` are no longer friends: a direct call of theirs ends.
    pub fn friendship_ended(&self, a: UserId, b: UserId) {
        let mut registry = self.lock();
        if let Some(&call_id) = registry.by_pair.get(&(a.min(b), a.max(b))) {
            self.end(&mut registry, call_id, CallEndReason::Removed);
        }
    }

    /// After a start or join that read the store before it took the lock:
    /// whether the user may still be in the call of the conversation they
    /// joined, read again now that they are seated. A removal or an
    /// unfriending that committed in between (its clean-up may have looked
    /// before they were seated) takes them out here; one after is taken
    /// care of by its own clean-up.
    pub async fn confirm(&self, handle: &SessionHandle) {
        let seated = {
            let registry = self.lock();
            registry
                .by_conn
                .get(&handle.conn_id)
                .map(|&call_id| (call_id, registry.calls[&call_id].conversation_id))
        };
        let Some((call_id, conversation_id)) = seated else {
            return;
        };
        let allowed = match self
            .store
            .conversation(conversation_id, handle.user_id)
            .await
        {
            Ok(view) => !view.closed,
            Err(crate::store::StoreError::NotAMember) => false,
            // Cannot tell now; the removal's own clean-up still acts.
            Err(_) => return,
        };
        if allowed {
            return;
        }
        let mut registry = self.lock();
        match registry.calls.get(&call_id).map(|live| live.pair.is_some()) {
            Some(true) => self.end(&mut registry, call_id, CallEndReason::Removed),
            Some(false) => self.take_out(&mut registry, call_id, handle.user_id),
            None => {}
        }
    }

    /// Takes `user` out of a call: out of its ringing and its participants.
    fn take_out(&self, registry: &mut Registry, call_id: CallId, user: UserId) {
        let Registry { calls, rung, .. } = &mut *registry;
        let Some(live) = calls.get_mut(&call_id) else {
            return;
        };
        let ended = push_event(proto::CallEvent {
            reason: CallEndReason::Removed as i32,
            ..live.event(call_id, CallEventKind::Ended, user, 0)
        });
        let mut involved = false;
        live.rang.retain(|&u| u != user);
        if let Some(at) = live.ringing.iter().position(|&u| u == user) {
            live.ringing.swap_remove(at);
            unring(rung, user, call_id);
            self.ring_ended(live, call_id, user, CallEndReason::Removed);
            self.hub.push(user, StreamKind::Calls, &ended, None);
            involved = true;
        }
        let places: Vec<Arc<SessionHandle>> = live
            .participants
            .iter()
            .filter(|p| p.user_id == user)
            .map(|p| p.handle.clone())
            .collect();
        for handle in places {
            handle.push(StreamKind::Calls, ended.clone());
            self.remove(registry, call_id, handle.conn_id, CallEndReason::Removed);
            involved = true;
        }
        // A member the call had nothing to do with changes nothing.
        if involved {
            self.settle(registry, call_id, CallEndReason::Removed);
        }
    }

    /// CallSignal: relays `payload` to participant `to` of the call this
    /// connection is in. RATE_LIMITED while `to` has much unread in its
    /// calls queue.
    pub fn signal(
        &self,
        handle: &SessionHandle,
        call_id: CallId,
        to: u32,
        payload: Bytes,
    ) -> Result<(), Refusal> {
        let registry = self.lock();
        if registry.by_conn.get(&handle.conn_id) != Some(&call_id) {
            return Err(not_in_call());
        }
        let live = &registry.calls[&call_id];
        let from = live
            .participants
            .iter()
            .find(|p| p.handle.conn_id == handle.conn_id)
            .ok_or_else(not_in_call)?;
        let target = live
            .participants
            .iter()
            .find(|p| p.id == to)
            .ok_or_else(|| {
                Refusal::new(
                    ErrorCode::NotFound,
                    format!("no participant {to} in this call"),
                )
            })?;
        let (frames, bytes) = target
            .handle
            .queue(StreamKind::Calls)
            .map_or((0, 0), |queue| queue.queued());
        if frames >= SIGNAL_QUEUE_FRAMES || bytes >= SIGNAL_QUEUE_BYTES {
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                format!("participant {to} reads its signals slowly; retry"),
            )
            .with_retry_after(SIGNAL_RETRY));
        }
        let signal = proto::CallSignal {
            call_id,
            participant_id: from.id,
            payload,
        };
        target.handle.push(
            StreamKind::Calls,
            Outbound::frame(&Frame::push(Body::CallSignal(signal))),
        );
        self.metrics.call_signals.increment(1);
        Ok(())
    }

    /// Takes the participant on `conn_id` out of the call and tells the
    /// others.
    fn remove(
        &self,
        registry: &mut Registry,
        call_id: CallId,
        conn_id: u64,
        reason: CallEndReason,
    ) {
        let Registry { calls, by_conn, .. } = registry;
        by_conn.remove(&conn_id);
        let Some(live) = calls.get_mut(&call_id) else {
            return;
        };
        let Some(at) = live
            .participants
            .iter()
            .position(|p| p.handle.conn_id == conn_id)
        else {
            return;
        };
        let gone = live.participants.remove(at);
        if live.participants.len() < 2 && live.answered_ms.is_some() {
            live.alone_since_ms
                .get_or_insert_with(crate::streams::now_ms);
        }
        unseat(&gone.handle);
        self.metrics.call_participants.decrement(1.0);
        live.epoch += 1;
        live.publish_peers();
        let left = proto::CallEvent {
            reason: reason as i32,
            ..live.event(call_id, CallEventKind::Left, gone.user_id, gone.id)
        };
        live.tell_participants(&push_event(left));
        self.settle(registry, call_id, reason);
    }

    /// Ends the call, or starts the wait alone, if what just happened left
    /// it so:
    /// * no participant: it ends;
    /// * one, with nobody ringing, in a call nobody answered, or a direct
    ///   call the other side left on purpose: it ends;
    /// * one, with nobody ringing, in an answered group call, or a direct
    ///   call whose other side's connection dropped: it waits
    ///   `call-alone-timeout` for someone to (re)join.
    fn settle(&self, registry: &mut Registry, call_id: CallId, reason: CallEndReason) {
        let Some(live) = registry.calls.get_mut(&call_id) else {
            return;
        };
        match live.participants.len() {
            0 => self.end(registry, call_id, reason),
            1 if live.ringing.is_empty() => {
                let hung_up = live.pair.is_some() && reason != CallEndReason::Disconnected;
                if live.answered_ms.is_none() || hung_up {
                    self.end(registry, call_id, reason);
                } else {
                    let epoch = live.epoch;
                    self.set_timer(live, call_id, Timer::Alone(epoch));
                }
            }
            _ => {}
        }
    }

    /// Ends a call: everyone in it, and every device it still rings, hears
    /// ENDED.
    fn end(&self, registry: &mut Registry, call_id: CallId, reason: CallEndReason) {
        let Some(mut live) = registry.calls.remove(&call_id) else {
            return;
        };
        if let Some(timer) = &live.timer {
            timer.abort();
        }
        registry.by_conversation.remove(&live.conversation_id);
        if let Some(pair) = live.pair {
            registry.by_pair.remove(&pair);
        }
        let ended = push_event(proto::CallEvent {
            reason: reason as i32,
            ..live.event(call_id, CallEventKind::Ended, 0, 0)
        });
        for participant in &live.participants {
            registry.by_conn.remove(&participant.handle.conn_id);
            unseat(&participant.handle);
            participant.handle.push(StreamKind::Calls, ended.clone());
            self.metrics.call_participants.decrement(1.0);
        }
        for user in std::mem::take(&mut live.ringing) {
            unring(&mut registry.rung, user, call_id);
            self.ring_ended(&mut live, call_id, user, reason);
            self.hub.push(user, StreamKind::Calls, &ended, None);
        }
        self.write_log(&live, call_id, reason);
        self.metrics.calls_active.decrement(1.0);
        self.metrics.call_ended(reason_label(reason));
        tracing::debug!(call_id, reason = reason.as_str_name(), "call ended");
    }

    /// The call rings `user` no more: if a notification rang them, another
    /// says it ended, so the phone stops ringing.
    fn ring_ended(&self, live: &mut Live, call_id: CallId, user: UserId, reason: CallEndReason) {
        if !live.pushed.remove(&user) {
            return;
        }
        if let Some(notifier) = &self.notifier {
            notifier.notify(Notice {
                user,
                conversation: live.conversation_id,
                seq: call_id,
                sender: live.caller,
                kind: NoticeKind::CallEnded { reason },
                unacked: false,
            });
        }
    }

    /// Writes the log of a call that ended (a CALL message from its
    /// caller) into its conversation, through the send committers, so it
    /// takes its place in seq order and reaches the members like any
    /// message. Not for a direct call whose two stopped being friends:
    /// their conversation takes no message.
    fn write_log(&self, live: &Live, call_id: CallId, reason: CallEndReason) {
        if live.pair.is_some() && reason == CallEndReason::Removed {
            return;
        }
        let Some(delivery) = self.delivery.get().and_then(Weak::upgrade) else {
            return;
        };
        let now = crate::streams::now_ms();
        let joined: HashSet<UserId> = live.joined.iter().copied().collect();
        let log = proto::CallLog {
            call_id,
            video: live.video,
            started_ms: live.started_ms,
            // From the answer until the call was down to one; an answered
            // call lasted at least a millisecond, so 0 means "missed" only.
            duration_ms: live.answered_ms.map_or(0, |at| {
                let until = live.alone_since_ms.unwrap_or(now);
                u64::try_from(until - at).unwrap_or(0).max(1)
            }),
            joined: live.joined.iter().copied().take(MAX_LOGGED).collect(),
            missed: live
                .rang
                .iter()
                .filter(|user| !joined.contains(user))
                .copied()
                .take(MAX_LOGGED)
                .collect(),
            reason: reason as i32,
        };
        // The caller writes it; if they left the group since, the first
        // who took part and is still in it.
        let senders = live.joined.iter().copied().take(MAX_LOGGED).collect();
        let message = NewMessage {
            conversation_id: live.conversation_id,
            sender_id: live.caller,
            client_msg_id: format!("call:{call_id:016x}"),
            message_type: proto::MessageType::Call,
            text: log_text(&log),
            photo: None,
            call: Some(Box::new(log)),
            reply_to_seq: 0,
            notify_only: None,
            now_ms: now,
        };
        delivery.write(ServerWrite {
            message,
            senders,
            tries: 0,
        });
    }

    /// Arms the call's one timer (the previous one, if any, is dropped).
    fn set_timer(&self, live: &mut Live, call_id: CallId, timer: Timer) {
        let after = match timer {
            Timer::Ring => self.config.ring_timeout,
            Timer::Alone(_) => self.config.call_alone_timeout,
        };
        let calls = self.me.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(calls) = calls.upgrade() {
                calls.timer_fired(call_id, timer);
            }
        });
        if let Some(previous) = live.timer.replace(task.abort_handle()) {
            previous.abort();
        }
    }

    fn timer_fired(&self, call_id: CallId, timer: Timer) {
        let mut registry = self.lock();
        let Registry { calls, rung, .. } = &mut *registry;
        let Some(live) = calls.get_mut(&call_id) else {
            return;
        };
        match timer {
            Timer::Ring if !live.ringing.is_empty() => {
                let stopped = push_event(proto::CallEvent {
                    reason: CallEndReason::NoAnswer as i32,
                    ..live.event(call_id, CallEventKind::RingStopped, 0, 0)
                });
                for user in std::mem::take(&mut live.ringing) {
                    unring(rung, user, call_id);
                    self.ring_ended(live, call_id, user, CallEndReason::NoAnswer);
                    self.hub.push(user, StreamKind::Calls, &stopped, None);
                }
                live.tell_participants(&stopped);
                self.settle(&mut registry, call_id, CallEndReason::NoAnswer);
            }
            Timer::Alone(epoch) if live.epoch == epoch && live.participants.len() == 1 => {
                self.end(&mut registry, call_id, CallEndReason::Alone);
            }
            _ => {}
        }
    }

    /// Forwards a datagram that arrived on `handle`'s connection to the
    /// other participants of its call, or drops it (in no call, beyond the
    /// sender's `call-media-rate`, or beyond the node's
    /// `call-media-node-rate`).
    pub fn forward(&self, handle: &SessionHandle, datagram: Bytes) {
        // The slot's lock is held to charge the budget and read the peers,
        // not while sending: the registry takes it (under its own lock)
        // whenever a call changes.
        let Some(slot) = handle.call_media() else {
            self.metrics.call_media(MediaOutcome::NoCall, 1);
            return;
        };
        let (me, peers) = {
            let mut slot = slot.lock();
            let Some(seat) = slot.as_deref_mut() else {
                self.metrics.call_media(MediaOutcome::NoCall, 1);
                return;
            };
            let Some(call) = &seat.call else {
                self.metrics.call_media(MediaOutcome::NoCall, 1);
                return;
            };
            if !seat.budget.take(datagram.len(), Instant::now()) {
                self.metrics.call_media(MediaOutcome::RateLimited, 1);
                return;
            }
            (call.me, call.peers.clone())
        };
        let out = chat_protocol::calls::encode_forwarded(me, &datagram);
        // All the copies or none: a node over its rate drops whole
        // datagrams, which codecs conceal better than a call half heard.
        let copies = peers.iter().filter(|p| p.id != me).count();
        if copies == 0 {
            return;
        }
        if !self
            .node_media
            .lock()
            .expect("node media lock")
            .take(out.len() * copies, Instant::now())
        {
            self.metrics
                .call_media(MediaOutcome::NodeLimited, copies as u64);
            return;
        }
        for peer in peers.iter().filter(|p| p.id != me) {
            if peer
                .conn
                .max_datagram_size()
                .is_none_or(|max| out.len() > max)
            {
                self.metrics.call_media(MediaOutcome::TooLarge, 1);
                continue;
            }
            match peer.conn.send_datagram(out.clone()) {
                Ok(()) => {
                    self.metrics.call_media(MediaOutcome::Forwarded, 1);
                    self.metrics
                        .call_media_bytes
                        .increment(datagram.len() as u64);
                }
                Err(_) => self.metrics.call_media(MediaOutcome::Unsent, 1),
            }
        }
    }

    /// Drops idle ring-limit buckets.
    pub fn sweep(&self, now: Instant) {
        self.rings.sweep(now);
    }
}

impl Live {
    /// An event of this call with no reason and no ring time.
    fn event(
        &self,
        call_id: CallId,
        kind: CallEventKind,
        user_id: UserId,
        participant_id: u32,
    ) -> proto::CallEvent {
        proto::CallEvent {
            call_id,
            conversation_id: self.conversation_id,
            kind: kind as i32,
            user_id,
            participant_id,
            video: self.video,
            ring_until_ms: 0,
            reason: CallEndReason::Unspecified as i32,
        }
    }

    /// This call's RING.
    fn ring(&self, call_id: CallId) -> proto::CallEvent {
        proto::CallEvent {
            ring_until_ms: self.ring_until_ms,
            ..self.event(call_id, CallEventKind::Ring, self.caller, 0)
        }
    }

    /// Queues `out` for every participant.
    fn tell_participants(&self, out: &Outbound) {
        for participant in &self.participants {
            participant.handle.push(StreamKind::Calls, out.clone());
        }
    }

    /// Hands every participant's media slot the current participants
    /// (so none keeps a departed one's connection).
    fn publish_peers(&self) {
        let peers: Arc<[Peer]> = self
            .participants
            .iter()
            .map(|p| Peer {
                id: p.id,
                conn: p.handle.connection().clone(),
            })
            .collect();
        for participant in &self.participants {
            if let Some(slot) = participant.handle.call_media()
                && let Some(call) = slot.lock().as_mut().and_then(|seat| seat.call.as_mut())
            {
                call.peers = peers.clone();
            }
        }
    }
}

fn push_event(event: proto::CallEvent) -> Outbound {
    Outbound::frame(&Frame::push(Body::CallEvent(event)))
}

/// A media budget (a sender's, or the node's): `rate` bytes a second, a
/// second's worth at once. A full budget takes anything once, going into
/// debt, so a datagram (or its copies) larger than a second's worth is
/// not refused for ever under a low rate.
struct Budget {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Budget {
    fn new(rate: u64, now: Instant) -> Budget {
        // Exact up to 2^53 bytes a second, far past any configured rate.
        let rate = rate as f64;
        Budget {
            rate,
            tokens: rate,
            at: now,
        }
    }

    fn take(&mut self, bytes: usize, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens < bytes as f64 && self.tokens < self.rate {
            return false;
        }
        self.tokens -= bytes as f64;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_media_budget_refills_up_to_a_second() {
        let t0 = Instant::now();
        let mut budget = Budget::new(1000, t0);
        assert!(budget.take(600, t0));
        assert!(!budget.take(600, t0), "only 400 left");
        assert!(budget.take(400, t0));
        // Half a second brings 500, and a long pause no more than 1000.
        assert!(budget.take(500, t0 + Duration::from_millis(500)));
        assert!(!budget.take(1, t0 + Duration::from_millis(500)));
        assert!(budget.take(1000, t0 + Duration::from_secs(60)));
        // More than a second's worth: only from a full budget, which it
        // leaves in debt.
        let t1 = t0 + Duration::from_secs(120);
        assert!(budget.take(1, t1));
        assert!(!budget.take(1500, t1), "999 left, not full");
        let full = t1 + Duration::from_millis(1);
        assert!(budget.take(1500, full));
        assert!(
            !budget.take(1, full + Duration::from_millis(499)),
            "in debt"
        );
        assert!(budget.take(1, full + Duration::from_millis(502)));
    }

    #[test]
    fn a_node_sized_budget_counts_large_amounts_exactly() {
        let t0 = Instant::now();
        let rate = 100 << 30;
        let mut budget = Budget::new(rate, t0);
        assert!(budget.take(60 << 30, t0));
        assert!(!budget.take(41 << 30, t0), "40 GiB left");
        assert!(budget.take(40 << 30, t0));
        assert!(!budget.take(1, t0));
        assert!(budget.take(1 << 30, t0 + Duration::from_millis(10)));
    }

    #[test]
    fn a_log_reads_missed_declined_or_how_long_it_lasted() {
        let log = |video, duration_ms, reason: CallEndReason| proto::CallLog {
            video,
            duration_ms,
            reason: reason as i32,
            missed: vec![7],
            ..Default::default()
        };
        let rang_nobody = |video| proto::CallLog {
            missed: Vec::new(),
            ..log(video, 0, CallEndReason::HungUp)
        };
        let cases = [
            (log(false, 0, CallEndReason::NoAnswer), "Missed call"),
            (log(true, 0, CallEndReason::HungUp), "Missed video call"),
            (rang_nobody(false), "Call, nobody joined"),
            (rang_nobody(true), "Video call, nobody joined"),
            (log(false, 0, CallEndReason::Declined), "Declined call"),
            (log(false, 1, CallEndReason::HungUp), "Call, 1 s"),
            (log(true, 59_000, CallEndReason::HungUp), "Video call, 59 s"),
            (
                log(true, 59_001, CallEndReason::HungUp),
                "Video call, 1 min",
            ),
            (log(false, 60_000, CallEndReason::Alone), "Call, 1 min"),
            (log(false, 3_599_000, CallEndReason::HungUp), "Call, 59 min"),
            (
                log(false, 3_900_000, CallEndReason::HungUp),
                "Call, 1 h 5 min",
            ),
        ];
        for (log, text) in cases {
            assert_eq!(log_text(&log), text, "{log:?}");
        }
    }

    #[test]
    fn ring_index_entries_go_with_their_last_call() {
        let mut rung = HashMap::new();
        rung.insert(7, vec![1, 2]);
        unring(&mut rung, 7, 1);
        assert_eq!(rung.get(&7), Some(&vec![2]));
        unring(&mut rung, 7, 9);
        assert_eq!(rung.get(&7), Some(&vec![2]));
        unring(&mut rung, 7, 2);
        assert!(rung.is_empty());
        unring(&mut rung, 8, 2);
        assert!(rung.is_empty());
    }
}
