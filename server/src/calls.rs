//! Group calls: who is in which call, ringing, and the forwarding of call
//! media (see the calls section of `chat.proto`).
//!
//! A call lives in this node's memory only: it is made of connections, and
//! they end with the node. One registry lock covers every call's
//! membership; calls change a few times a minute, not per message. Events
//! are queued under that lock, so every connection sees a call's changes
//! in the order they happened (a JOINED before the LEFT of the same
//! participant, a CallJoined answer before the signals sent to it).
//!
//! Media does not take the lock: each participant's connection has a
//! forwarder task that reads its datagrams and hands each, prefixed with
//! the sender's participant id, to the other participants' connections.
//! The forwarders read the call's list of connections ([`Media`]) and
//! look again only when its version moves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use chat_protocol::{Body, ErrorCode, Frame, StreamKind, proto};
use proto::{CallEndReason, CallEventKind};
use tokio::sync::Notify;

use crate::config::CallsConfig;
use crate::error::Refusal;
use crate::hub::{Hub, SessionHandle};
use crate::metrics::{MediaOutcome, Metrics};
use crate::notify::{Notice, NoticeKind, Notifier};
use crate::store::{ConversationId, HistoryStore, UserId};
use crate::wire::Outbound;

/// A call's id: random, so that ids are not guessed or met again after a
/// restart.
pub type CallId = u64;

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
    registry: Mutex<Registry>,
    /// This registry, for its timers (weak: a node that stops does not
    /// wait for them).
    me: Weak<Calls>,
}

#[derive(Default)]
struct Registry {
    calls: HashMap<CallId, Live>,
    by_conversation: HashMap<ConversationId, CallId>,
    /// Connection id -> the call it is in.
    by_conn: HashMap<u64, CallId>,
}

/// One call under way.
struct Live {
    conversation_id: ConversationId,
    direct: bool,
    video: bool,
    started_ms: i64,
    participants: Vec<Participant>,
    /// Users rung who have neither answered nor declined, while it rings.
    ringing: Vec<UserId>,
    next_participant: u32,
    /// Two participants were in the call at once at some point: a group
    /// call left with one may wait for others; one never answered ends.
    answered: bool,
    /// Moves with every change of participants: a timer set when one was
    /// left alone acts only if nothing changed since.
    epoch: u64,
    media: Arc<Media>,
}

struct Participant {
    id: u32,
    user_id: UserId,
    handle: Arc<SessionHandle>,
    joined_ms: i64,
    /// Ends the connection's media forwarder.
    stop: Arc<Notify>,
}

/// What a call's media forwarders read: its participants' connections.
#[derive(Default)]
struct Media {
    version: AtomicU64,
    peers: Mutex<Arc<[Peer]>>,
}

#[derive(Clone)]
struct Peer {
    id: u32,
    conn: quinn::Connection,
}

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
        _ => "hung_up",
    }
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
        Arc::new_cyclic(|me| Calls {
            config,
            hub,
            store,
            metrics,
            notifier,
            media_on,
            registry: Mutex::new(Registry::default()),
            me: me.clone(),
        })
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
        let call_id = loop {
            let id = rand::random::<u64>();
            if id != 0 && !registry.calls.contains_key(&id) {
                break id;
            }
        };
        let ring = direct || view.members.len() <= self.config.call_ring_max_members;
        let ringing: Vec<UserId> = view
            .members
            .iter()
            .map(|m| m.user_id)
            .filter(|&user| ring && user != handle.user_id)
            .collect();
        let now = crate::streams::now_ms();
        let ring_until_ms = now.saturating_add(
            i64::try_from(self.config.ring_timeout.as_millis()).unwrap_or(i64::MAX),
        );
        let live = Live {
            conversation_id,
            direct,
            video,
            started_ms: now,
            participants: Vec::new(),
            ringing,
            next_participant: 1,
            answered: false,
            epoch: 0,
            media: Arc::default(),
        };
        registry.by_conversation.insert(conversation_id, call_id);
        registry.calls.insert(call_id, live);
        self.metrics.calls_started.increment(1);
        self.metrics.calls_active.increment(1.0);
        self.add_participant(&mut registry, call_id, handle);
        self.answer_joined(&registry, call_id, handle, request_id)?;
        let live = &registry.calls[&call_id];
        let event = proto::CallEvent {
            ring_until_ms,
            ..live.event(call_id, CallEventKind::Ring, handle.user_id, 0)
        };
        let ring_frame = Outbound::frame(&Frame::push(Body::CallEvent(event)));
        for &user in &live.ringing {
            if self.hub.push(user, StreamKind::Calls, &ring_frame, None) == 0
                && let Some(notifier) = &self.notifier
            {
                notifier.notify(Notice {
                    user,
                    conversation: conversation_id,
                    seq: call_id,
                    sender: handle.user_id,
                    kind: NoticeKind::Call { video },
                });
            }
        }
        if live.ringing.is_empty() {
            self.wait_alone(call_id, live.epoch);
        } else {
            self.ring_timer(call_id);
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
        let Registry { calls, by_conn, .. } = registry;
        let live = calls.get_mut(&call_id).ok_or_else(not_in_call)?;
        let user = handle.user_id;
        if let Some(at) = live.participants.iter().position(|p| p.user_id == user) {
            // One place per user: it moves to this device.
            let moved = live.participants.remove(at);
            by_conn.remove(&moved.handle.conn_id);
            moved.stop.notify_one();
            self.metrics.call_participants.decrement(1.0);
            let ended = live.event(call_id, CallEventKind::Ended, user, moved.id);
            moved.handle.push(
                StreamKind::Calls,
                push_event(proto::CallEvent {
                    reason: CallEndReason::JoinedElsewhere as i32,
                    ..ended
                }),
            );
            let left = proto::CallEvent {
                reason: CallEndReason::JoinedElsewhere as i32,
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
        if let Some(at) = live.ringing.iter().position(|&u| u == user) {
            live.ringing.swap_remove(at);
            let stopped = proto::CallEvent {
                reason: CallEndReason::AnsweredElsewhere as i32,
                ..live.event(call_id, CallEventKind::RingStopped, user, 0)
            };
            self.hub.push(
                user,
                StreamKind::Calls,
                &push_event(stopped),
                Some(handle.conn_id),
            );
        }
        self.add_participant(registry, call_id, handle);
        self.answer_joined(registry, call_id, handle, request_id)
    }

    /// Adds `handle` to the call as a new participant, tells the others
    /// and starts its media forwarder.
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
        let stop = Arc::new(Notify::new());
        live.participants.push(Participant {
            id,
            user_id: handle.user_id,
            handle: handle.clone(),
            joined_ms: crate::streams::now_ms(),
            stop: stop.clone(),
        });
        live.answered |= live.participants.len() > 1;
        live.epoch += 1;
        live.publish_peers();
        registry.by_conn.insert(handle.conn_id, call_id);
        self.metrics.call_participants.increment(1.0);
        if self.media_on {
            tokio::spawn(forward_media(
                live.media.clone(),
                self.metrics.clone(),
                (id, handle.connection().clone()),
                stop,
                self.config.call_media_rate,
            ));
        }
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

    /// DeclineCall: stops the ring on every device of the user and tells
    /// the participants; NOT_FOUND unless the call rings the user.
    pub fn decline(&self, handle: &SessionHandle, call_id: CallId) -> Result<(), Refusal> {
        let mut registry = self.lock();
        let live = registry.calls.get_mut(&call_id).ok_or_else(not_in_call)?;
        let user = handle.user_id;
        let at = live
            .ringing
            .iter()
            .position(|&u| u == user)
            .ok_or_else(|| Refusal::new(ErrorCode::NotFound, "this call does not ring you"))?;
        live.ringing.swap_remove(at);
        let stopped = proto::CallEvent {
            reason: CallEndReason::Declined as i32,
            ..live.event(call_id, CallEventKind::RingStopped, user, 0)
        };
        self.hub.push(
            user,
            StreamKind::Calls,
            &push_event(stopped),
            Some(handle.conn_id),
        );
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

    /// CallSignal: relays `payload` to participant `to` of the call this
    /// connection is in.
    pub fn signal(
        &self,
        handle: &SessionHandle,
        call_id: CallId,
        to: u32,
        payload: bytes::Bytes,
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
        gone.stop.notify_one();
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

    /// Ends the call if what just happened leaves it without purpose: no
    /// participant; or one, with nobody ringing, in a direct call or in a
    /// group call nobody answered. A group call that was answered and is
    /// down to one participant ends if it stays so for the ring timeout.
    fn settle(&self, registry: &mut Registry, call_id: CallId, reason: CallEndReason) {
        let Some(live) = registry.calls.get(&call_id) else {
            return;
        };
        match live.participants.len() {
            0 => self.end(registry, call_id, reason),
            1 if live.ringing.is_empty() => {
                if live.direct || !live.answered {
                    self.end(registry, call_id, reason);
                } else {
                    self.wait_alone(call_id, live.epoch);
                }
            }
            _ => {}
        }
    }

    /// Ends a call: everyone in it, and every device it still rings, hears
    /// ENDED.
    fn end(&self, registry: &mut Registry, call_id: CallId, reason: CallEndReason) {
        let Some(live) = registry.calls.remove(&call_id) else {
            return;
        };
        registry.by_conversation.remove(&live.conversation_id);
        let ended = push_event(proto::CallEvent {
            reason: reason as i32,
            ..live.event(call_id, CallEventKind::Ended, 0, 0)
        });
        for participant in &live.participants {
            registry.by_conn.remove(&participant.handle.conn_id);
            participant.stop.notify_one();
            participant.handle.push(StreamKind::Calls, ended.clone());
            self.metrics.call_participants.decrement(1.0);
        }
        for &user in &live.ringing {
            self.hub.push(user, StreamKind::Calls, &ended, None);
        }
        self.metrics.calls_active.decrement(1.0);
        self.metrics.call_ended(reason_label(reason));
        tracing::debug!(call_id, reason = reason.as_str_name(), "call ended");
    }

    /// Stops the ring of `call_id` once the ring timeout passes.
    fn ring_timer(&self, call_id: CallId) {
        let calls = self.me.clone();
        let timeout = self.config.ring_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(calls) = calls.upgrade() {
                calls.ring_expired(call_id);
            }
        });
    }

    fn ring_expired(&self, call_id: CallId) {
        let mut registry = self.lock();
        let Some(live) = registry.calls.get_mut(&call_id) else {
            return;
        };
        if live.ringing.is_empty() {
            return;
        }
        let stopped = push_event(proto::CallEvent {
            reason: CallEndReason::NoAnswer as i32,
            ..live.event(call_id, CallEventKind::RingStopped, 0, 0)
        });
        for user in std::mem::take(&mut live.ringing) {
            self.hub.push(user, StreamKind::Calls, &stopped, None);
        }
        live.tell_participants(&stopped);
        self.settle(&mut registry, call_id, CallEndReason::NoAnswer);
    }

    /// Ends `call_id` if it still has one participant and no change since
    /// `epoch` once the ring timeout passes.
    fn wait_alone(&self, call_id: CallId, epoch: u64) {
        let calls = self.me.clone();
        let timeout = self.config.ring_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let Some(calls) = calls.upgrade() else {
                return;
            };
            let mut registry = calls.lock();
            let alone = registry.calls.get(&call_id).is_some_and(|live| {
                live.epoch == epoch && live.participants.len() == 1 && live.ringing.is_empty()
            });
            if alone {
                calls.end(&mut registry, call_id, CallEndReason::Alone);
            }
        });
    }

    /// Calls under way (for tests and the metrics' upkeep).
    pub fn active(&self) -> usize {
        self.lock().calls.len()
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

    /// Queues `out` for every participant.
    fn tell_participants(&self, out: &Outbound) {
        for participant in &self.participants {
            participant.handle.push(StreamKind::Calls, out.clone());
        }
    }

    /// Hands the forwarders the current participants.
    fn publish_peers(&self) {
        let peers: Arc<[Peer]> = self
            .participants
            .iter()
            .map(|p| Peer {
                id: p.id,
                conn: p.handle.connection().clone(),
            })
            .collect();
        *self.media.peers.lock().expect("peers lock") = peers;
        self.media.version.fetch_add(1, Ordering::Release);
    }
}

fn push_event(event: proto::CallEvent) -> Outbound {
    Outbound::frame(&Frame::push(Body::CallEvent(event)))
}

/// A sender's media budget: `rate` bytes a second, a second's worth at
/// once.
struct Budget {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Budget {
    fn new(rate: u32, now: Instant) -> Budget {
        Budget {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: now,
        }
    }

    fn take(&mut self, bytes: usize, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens < bytes as f64 {
            return false;
        }
        self.tokens -= bytes as f64;
        true
    }
}

/// Reads the datagrams of participant `me` (on `conn`) and forwards each
/// to the call's other participants, until `stop` or the connection ends.
async fn forward_media(
    media: Arc<Media>,
    metrics: Arc<Metrics>,
    (me, conn): (u32, quinn::Connection),
    stop: Arc<Notify>,
    rate: u32,
) {
    let mut budget = Budget::new(rate, Instant::now());
    let mut peers: Arc<[Peer]> = Arc::new([]);
    let mut seen = None;
    loop {
        let datagram = tokio::select! {
            biased;
            () = stop.notified() => return,
            datagram = conn.read_datagram() => match datagram {
                Ok(datagram) => datagram,
                Err(_) => return,
            },
        };
        if !budget.take(datagram.len(), Instant::now()) {
            metrics.call_media(MediaOutcome::RateLimited, 1);
            continue;
        }
        let version = media.version.load(Ordering::Acquire);
        if seen != Some(version) {
            peers = media.peers.lock().expect("peers lock").clone();
            seen = Some(version);
        }
        let out = chat_protocol::calls::encode_forwarded(me, &datagram);
        for peer in peers.iter().filter(|p| p.id != me) {
            if peer
                .conn
                .max_datagram_size()
                .is_none_or(|max| out.len() > max)
            {
                metrics.call_media(MediaOutcome::TooLarge, 1);
                continue;
            }
            match peer.conn.send_datagram(out.clone()) {
                Ok(()) => {
                    metrics.call_media(MediaOutcome::Forwarded, 1);
                    metrics.call_media_bytes.increment(datagram.len() as u64);
                }
                Err(_) => metrics.call_media(MediaOutcome::Unsent, 1),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        assert!(!budget.take(1001, t0 + Duration::from_secs(60)));
        assert!(budget.take(1000, t0 + Duration::from_secs(60)));
    }
}
