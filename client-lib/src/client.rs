//! The [`Client`] handle apps hold, its event stream, and the supervisor
//! task that reconnects and resumes.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_protocol::limits::MAX_CLIENT_MSG_ID_LEN;
use chat_protocol::{Body, ErrorCode, Frame, StreamKind, proto};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::acks::Acks;
use crate::config::{ClientConfig, DeliveryAcks};
use crate::connection::{self, Credential, Live};
use crate::dedup::Delivered;
use crate::error::{ClientError, ends_session};
use crate::media::{self, PhotoUpload};
use crate::outbox::{self, Outbox};
use crate::receipts::ReceiptsTold;

/// Something the server told the app, in arrival order.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A new message (each one once per client: see [`Events`] on when it
    /// is acknowledged).
    Message(proto::Message),
    /// Another member's delivered / seen watermarks moved: the higher of
    /// each of what the server said and what the app was told of that
    /// member before. A receipt that raises neither is not told (a server
    /// may send an older one after a newer: see [`Events`]), so the app
    /// never sees a member's watermark go back, across reconnects too, but
    /// for the one gap [`Events`] describes.
    Receipt(proto::Receipt),
    /// A friend request, acceptance, decline or removal by another user,
    /// or a change this user made from another device (`KIND_REQUEST_SENT`,
    /// `KIND_YOU_ACCEPTED`, `KIND_YOU_DECLINED`, `KIND_YOU_REMOVED`,
    /// `KIND_BLOCKED`, `KIND_UNBLOCKED`), so that every device's friend
    /// list stays current. A removal (either side's) or a block also ends
    /// this client's presence subscription to that user.
    Friend(proto::FriendEvent),
    /// A watched friend came online, went offline, or changed their
    /// last-active time (see [`Client::subscribe_presence`]).
    Presence(proto::PresenceState),
    /// The connection is (re-)established and authenticated. Like
    /// [`Event::Disconnected`], dropped when the event queue is full (see
    /// [`Events`]).
    Connected,
    /// The connection was lost; the client is reconnecting unless
    /// [`Event::SessionEnded`] follows. Dropped when the event queue is
    /// full (see [`Events`]).
    Disconnected {
        /// The server's close code, if it closed the connection.
        code: Option<ErrorCode>,
    },
    /// The session cannot continue (logged out, token expired or revoked):
    /// log in again.
    SessionEnded {
        /// Why.
        code: ErrorCode,
    },
    /// A call rings this user (`KIND_RING`: show it until `ring_until_ms`),
    /// stopped ringing here (`KIND_RING_STOPPED`: answered or declined on
    /// another device, or not in time), or changed (a participant joined
    /// or left, a member declined) or ended (`KIND_ENDED`, with its
    /// reason). Only with [`ClientConfig::calls`] on.
    Call(proto::CallEvent),
    /// Signaling from another participant of this device's call (an SDP
    /// offer or answer, ICE candidates): `participant_id` names the
    /// sender. Opaque to the server.
    CallSignal(proto::CallSignal),
    /// Another device of this user muted a conversation or deleted it
    /// ([`Client::mute`], [`Client::delete_conversation`]): show it the same
    /// here (for a deletion, drop the messages up to its `up_to_seq`).
    ConversationChanged(proto::ConversationChanged),
    /// Another member started or stopped typing in a conversation (see
    /// [`Client::typing`]). Show it until one saying they stopped, a
    /// message (not a reaction nor an edit) from them there, or `limits::TYPING_LAPSE_MS` without
    /// another. Like [`Event::Connected`], dropped when the event queue is
    /// full.
    Typing(proto::TypingUpdate),
}

/// The app's stream of [`Event`]s, up to `event_capacity` of them queued.
///
/// Messages, receipts, friend and presence events are not dropped for
/// want of room: while the queue is full the client stops reading the
/// server (which holds back in turn), so an app that stops draining the
/// queue stops receiving. (A reader whose connection closes while it waits
/// stops waiting: the message it held comes again on the next connection,
/// presence with the next snapshot, and a friend event waits for room on
/// its own. A receipt it held is dropped, and may not come again: the
/// server's snapshot on the next connection has the latest watermarks of
/// the user's 200 most recently active conversations only, leaving out
/// groups larger than its `receipt-broadcast-max-members`. What
/// [`Client::receipt_status`] tells stays right, as the client notes a
/// receipt before it waits; only the event is missed.) Connection-state
/// events ([`Event::Connected`], [`Event::Disconnected`]) are dropped
/// instead when the queue is full, so that reconnecting never waits for
/// the app: [`Client::is_connected`] and [`Client::wait_connected`] always
/// tell the current state. So is [`Event::Typing`], a moment's news that
/// lapses by itself.
///
/// Receipt events only move forward: each carries the higher of what the
/// server said of a member and what the app was told of them before, and
/// one that raises neither their delivered nor their seen watermark is not
/// told. (A server sends them out of order at times: the snapshot it
/// writes when the receipts stream opens goes before receipts queued
/// earlier, and the readers of a connection being replaced and of its
/// successor overlap.) The client remembers what it told of 32,768
/// (conversation, member) pairs, across reconnects; beyond that the half
/// raised least recently is forgotten, and a pair forgotten so is told its
/// next receipt as it comes, which may be lower than what the app was told
/// of it before, once.
///
/// Answers travel behind the events of their stream: a `SendAck` after
/// the messages queued before it. So do not await a send or request on
/// the task that drains the events while the queue may be full (after a
/// long time offline, say): spawn it, or keep draining while it runs;
/// otherwise both wait for each other.
///
/// A message is acknowledged to the server when the app takes it from
/// here (or when it calls [`Client::ack_delivery`], with
/// [`DeliveryAcks::Manual`]), not while it waits in the queue. With no
/// reader (the app dropped this stream but kept the [`Client`]), what
/// arrives is not acknowledged at all: the server's delivered watermark is
/// the user's, not the device's, so an ack would keep it from the user's
/// other devices and next client, and tell its sender "delivered". It
/// stays unacknowledged and comes again on the next connection (this
/// client, having seen it, drops it; the user's next client gets it).
/// So an app that only sends (a bot, a share extension) still drains this
/// stream, or acks with [`DeliveryAcks::Manual`]: otherwise its backlog
/// grows for as long as the client lives and comes again on every
/// reconnect.
///
/// Once a [`Client::shutdown`] begins, the stream yields nothing more:
/// what is still queued (or arrives) is dropped without an ack, and comes
/// again on the user's next client.
pub struct Events {
    rx: mpsc::Receiver<Event>,
    inner: Arc<Inner>,
}

impl Events {
    /// The next event; `None` once the client is closed (by
    /// [`Client::close`], [`Client::logout`], the end of the session, or
    /// dropping every [`Client`] handle) and the queued events are read,
    /// and at once from the start of a [`Client::shutdown`].
    pub async fn next(&mut self) -> Option<Event> {
        if self.inner.departure.leaving() {
            return None;
        }
        let event = match self.rx.try_recv() {
            Ok(event) => Some(event),
            Err(mpsc::error::TryRecvError::Disconnected) => None,
            Err(mpsc::error::TryRecvError::Empty) => {
                // Waiting: a shutdown that begins meanwhile ends the wait.
                let leave = self.inner.departure.leave.notified();
                tokio::pin!(leave);
                leave.as_mut().enable();
                if self.inner.departure.leaving() {
                    return None;
                }
                tokio::select! {
                    biased;
                    event = self.rx.recv() => event,
                    () = leave => None,
                }
            }
        };
        self.taken(event)
    }

    /// How many events are queued, ready to be taken.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether no event is queued.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// An event if one is ready now.
    pub fn try_next(&mut self) -> Option<Event> {
        if self.inner.departure.leaving() {
            return None;
        }
        let event = self.rx.try_recv().ok();
        self.taken(event)
    }

    /// The app has a message now: ack it, unless the app acks itself. A
    /// message the client can no longer ack (its last acks are written) is
    /// not given to the app: it comes again on the next client. One whose
    /// ack was queued is given, even if a shutdown began meanwhile: its
    /// ack leaves with the last ones.
    fn taken(&self, event: Option<Event>) -> Option<Event> {
        match event {
            Some(Event::Message(m)) => {
                let on_take = self.inner.config.delivery_acks == DeliveryAcks::OnTake;
                let given = self.inner.acks.taken(m.conversation_id, m.seq, on_take)
                    && (on_take || !self.inner.departure.leaving());
                given.then_some(Event::Message(m))
            }
            event => event.filter(|_| !self.inner.departure.leaving()),
        }
    }
}

/// Who the client is logged in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub user_id: u64,
    /// User name.
    pub username: String,
    /// Session token: store it in the platform keychain to resume later
    /// with [`Client::resume`].
    pub token: String,
}

/// Aggregated status of one message: how many of the other members have
/// received and seen it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptStatus {
    /// Other members known who could read the message (members when it
    /// was sent, and still members).
    pub members: usize,
    /// How many of them received it.
    pub delivered: usize,
    /// How many of them saw it.
    pub seen: usize,
}

/// Which way to page through history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryDirection {
    /// Older messages: seq below the cursor (0 = newest).
    Backward,
    /// Newer messages: seq above the cursor.
    Forward,
}

/// A connected chat client. Cheap to clone; all clones share one
/// connection. Dropping the last clone closes the client as
/// [`close`](Self::close) does.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    _handle: Arc<Handle>,
}

/// Shared by the app's [`Client`] clones only, never by the client's own
/// tasks (they hold [`Inner`]): when the last clone goes, nobody can see
/// what the connection brings any more, so it must not live on,
/// reconnecting for ever and acknowledging deliveries (which moves the
/// user's delivered watermark) that no app shows.
struct Handle(Arc<Inner>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.close();
    }
}

type Pending = oneshot::Sender<Result<Body, ClientError>>;

/// Member -> what is known of them in one conversation.
type Watermarks = HashMap<u64, MemberMarks>;

/// A member's place in a conversation, for aggregated statuses.
#[derive(Debug, Clone, Copy, Default)]
struct MemberMarks {
    /// The seq from which they read the conversation (0: from its start).
    joined: u64,
    delivered: u64,
    seen: u64,
}

pub(crate) struct Inner {
    pub(crate) config: ClientConfig,
    pub(crate) quic: quinn::ClientConfig,
    pub(crate) endpoint: quinn::Endpoint,
    /// The app's event queue; taken when the client closes or the session
    /// ends, so that [`Events::next`] then ends too, whoever still holds a
    /// [`Client`].
    events: Mutex<Option<mpsc::Sender<Event>>>,
    /// Where each connection's call media goes (with calls on; taken at
    /// close, so the app's [`CallMedia`](crate::CallMedia) ends).
    call_media: Mutex<Option<mpsc::Sender<crate::calls::MediaPacket>>>,
    /// The app's end of it, until it asks for it.
    call_media_rx: Mutex<Option<mpsc::Receiver<crate::calls::MediaPacket>>>,
    identity: Mutex<Option<Identity>>,
    live: Mutex<Option<Live>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_request_id: AtomicU64,
    /// Conversations this user was last said to be typing in, and when
    /// that was sent ([`Client::typing`]).
    typing: Mutex<HashMap<u64, std::time::Instant>>,
    outbox: Mutex<Outbox>,
    /// Which seqs were handed to the app per conversation (deduplication:
    /// the highest, and which of the 256 below it, see [`Delivered`]).
    /// An async lock, held while the message is handed over: see
    /// [`Inner::hand_over`].
    delivered: tokio::sync::Mutex<Delivered>,
    /// What the app has, and the delivery acks not yet written.
    pub(crate) acks: Acks,
    /// A graceful close under way (see [`Client::shutdown`]).
    pub(crate) departure: Departure,
    /// Woken when a send is answered or failed, for a shutdown waiting for
    /// the outbox to empty.
    answered: Notify,
    closed: AtomicBool,
    /// Longest text the server accepts, from the latest connection's
    /// AuthOk: longer sends are refused before they reach the outbox.
    max_text_len: AtomicUsize,
    reconnect: Notify,
    /// How many times the app called `reconnect_now`: a request made while
    /// a connection was being made is answered by that connection, not by
    /// closing it once it is up (the notification's stored permit would).
    reconnects_asked: AtomicU64,
    connected: watch::Sender<bool>,
    /// Send heartbeats (the app may stop them, e.g. in the background);
    /// each connection's heartbeat task watches it.
    pub(crate) heartbeats: watch::Sender<bool>,
    /// Users whose presence the app watches; re-subscribed on reconnect.
    watching: Mutex<Vec<u64>>,
    /// Held across a presence subscription's request and its reply, so
    /// subscriptions reach the server in the order their lists were set:
    /// a re-subscription after a reconnect, sent with the list as it was,
    /// could otherwise land after the app's newer one and leave the
    /// server watching the old list.
    subscribing: tokio::sync::Mutex<()>,
    /// Latest known presence per watched user (only theirs).
    presence: Mutex<HashMap<u64, proto::PresenceState>>,
    /// Conversation -> member -> joined seq and watermarks, from
    /// conversation replies and Receipt events, for aggregated statuses:
    /// only the conversations the app asked about, at most [`MAX_MEMBERS`]
    /// members each.
    receipts: Mutex<HashMap<u64, Watermarks>>,
    /// Conversations whose member list is being fetched again after a
    /// SYSTEM message, and whether another came meanwhile.
    refreshing: Mutex<HashMap<u64, bool>>,
    /// The watermarks of each (conversation, member) last told to the app
    /// in a receipt event, so that those events never go back: at most
    /// 32,768 pairs, the least recently raised half forgotten beyond (a
    /// pair forgotten so may go back once; see [`ReceiptsTold`]). Its
    /// lock is held while a receipt is queued for the app: see
    /// [`Inner::tell_receipt`].
    told: Mutex<ReceiptsTold>,
}

/// What [`Inner::event_room`] found.
pub(crate) enum Room {
    /// A place in the app's event queue.
    Reserved(mpsc::OwnedPermit<Event>),
    /// Nobody will read the event (see [`Inner::event_room`]).
    NobodyReads,
    /// The reader's connection closed while it waited.
    Closed,
}

/// The steps of a graceful close (see [`Client::shutdown`]).
#[derive(Default)]
pub(crate) struct Departure {
    /// No new sends; the app gets no more events.
    leaving: AtomicBool,
    /// Wakes a reader waiting for room in a full event queue once
    /// `leaving` is set: nobody takes events any more.
    leave: Notify,
    /// The messages writer is to write the last acks and end the stream.
    finishing: AtomicBool,
    /// Wakes the messages writer once `finishing` is set.
    finish: Notify,
    /// Woken when the server answers the end of the messages stream with
    /// `AcksStored` (it has stored every ack written before the end), and
    /// when the client closes.
    finished: Notify,
}

impl Departure {
    pub(crate) fn leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    pub(crate) fn finishing(&self) -> bool {
        self.finishing.load(Ordering::Acquire)
    }

    /// Resolves after `finishing` is set, once enabled (see
    /// [`tokio::sync::futures::Notified::enable`]).
    pub(crate) fn finish(&self) -> tokio::sync::futures::Notified<'_> {
        self.finish.notified()
    }

    /// The server confirmed, after the client ended its messages stream,
    /// that it has stored every ack written before that end.
    pub(crate) fn server_finished(&self) {
        self.finished.notify_waiters();
    }
}

impl Inner {
    pub(crate) fn next_request_id(&self) -> u64 {
        self.next_request_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Writes a Typing on the live connection's receipts stream; whether
    /// one took it.
    fn send_typing(&self, conversation_id: u64, typing: bool) -> bool {
        let Some(writer) = self
            .live()
            .and_then(|live| live.writer(StreamKind::Receipts).cloned())
        else {
            return false;
        };
        let frame = Frame::new(
            self.next_request_id(),
            Body::Typing(proto::Typing {
                conversation_id,
                typing,
            }),
        );
        writer.send(connection::encode(&frame)).is_ok()
    }

    /// Queues an event the server pushes once and never again (friend
    /// events, conversation changes) as [`emit`](Self::emit) does, but if
    /// `conn` closes while it waits for room, it waits on its own, without
    /// the connection. False then: the caller, that connection's reader,
    /// stops.
    pub(crate) async fn emit_once(
        self: &Arc<Self>,
        event: Event,
        conn: &quinn::Connection,
    ) -> bool {
        match self.event_room(Some(conn)).await {
            Room::Reserved(permit) => {
                permit.send(event);
                true
            }
            Room::NobodyReads => true,
            Room::Closed => {
                let inner = self.clone();
                tokio::spawn(async move {
                    if let Room::Reserved(permit) = inner.event_room(None).await {
                        permit.send(event);
                    }
                });
                false
            }
        }
    }

    /// Queues an event for the app, waiting while the queue is full (the
    /// caller, a stream's reader of `conn`, then stops reading: see
    /// [`Events`]). False if it was not queued (see [`Inner::event_room`]).
    pub(crate) async fn emit(&self, event: Event, conn: &quinn::Connection) -> bool {
        match self.event_room(Some(conn)).await {
            Room::Reserved(permit) => {
                permit.send(event);
                true
            }
            Room::NobodyReads | Room::Closed => false,
        }
    }

    /// A place in the app's event queue, waiting while it is full. Not
    /// once nobody will read it: the client is closed, the app dropped its
    /// [`Events`], or the client is leaving (see [`Client::shutdown`]), even
    /// for a reader already waiting: the app takes nothing more, and the
    /// reader must go on to the answers behind. Nor once `conn`, whose
    /// reader asks, is closed: the reader must end (else every reconnect
    /// of an app that stopped draining would leave its readers, and their
    /// connection, waiting), and what it was to hand over comes again on
    /// the next connection. With no `conn`, it waits for room or leave only.
    pub(crate) async fn event_room(&self, conn: Option<&quinn::Connection>) -> Room {
        if self.departure.leaving() {
            return Room::NobodyReads;
        }
        let Some(events) = self.events.lock().expect("events lock").clone() else {
            return Room::NobodyReads;
        };
        let events = match events.try_reserve_owned() {
            Ok(permit) => return Room::Reserved(permit),
            Err(mpsc::error::TrySendError::Closed(_)) => return Room::NobodyReads,
            Err(mpsc::error::TrySendError::Full(events)) => events,
        };
        let leave = self.departure.leave.notified();
        tokio::pin!(leave);
        leave.as_mut().enable();
        if self.departure.leaving() {
            return Room::NobodyReads;
        }
        // The close first: a place that frees as the connection closes
        // must not go to its reader.
        let closed = async {
            match conn {
                Some(conn) => drop(conn.closed().await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = closed => Room::Closed,
            () = leave => Room::NobodyReads,
            permit = events.reserve_owned() => permit.map_or(Room::NobodyReads, Room::Reserved),
        }
    }

    /// Queues an event that may be dropped (connection state, typing) if
    /// there is room, else drops it: the supervisor and the readers must
    /// never wait for the app for these (see [`Events`]).
    pub(crate) fn emit_or_drop(&self, event: Event) {
        let events = self.events.lock().expect("events lock").clone();
        if let Some(events) = events
            && let Err(mpsc::error::TrySendError::Full(event)) = events.try_send(event)
        {
            tracing::debug!(?event, "event queue full; dropping an event that may be");
        }
    }

    /// A sender into the app's call media queue (calls on, client open).
    pub(crate) fn call_media_sender(&self) -> Option<mpsc::Sender<crate::calls::MediaPacket>> {
        self.call_media.lock().expect("media lock").clone()
    }

    /// The logged-in user's id, once known.
    fn user_id(&self) -> Option<u64> {
        self.identity
            .lock()
            .expect("identity lock")
            .as_ref()
            .map(|i| i.user_id)
    }

    /// Whether `message` is a send of this user's still in the outbox.
    pub(crate) fn own_unanswered(&self, message: &proto::Message) -> bool {
        self.user_id() == Some(message.sender_id)
            && self
                .outbox
                .lock()
                .expect("outbox lock")
                .holds(message.conversation_id, &message.client_msg_id)
    }

    /// Hands a delivered message to the app unless it already has it (a
    /// redelivery) or it is the echo of this device's own send still in
    /// the outbox. [`Delivered`] tells which seqs the app has: one below
    /// the highest it has is still handed over if it is within the 256
    /// below and was not before (the server delivers a message found
    /// stored by its sender's retry after later ones). The check and the
    /// hand-over happen under one lock: two readers (a connection being
    /// replaced and its successor) could otherwise each pass the check and
    /// then reach the app in the other order, seq n+1 before n. Waiting on a slow app here (for a place in
    /// its queue, taken outside the lock once the message is known to be
    /// new, so that a reader whose connection closes meanwhile ends without
    /// recording anything) is the backpressure that keeps the client from
    /// buffering without bound; redeliveries and own echoes never wait.
    ///
    /// The app acks what it takes (see [`Acks`]); the reader acks only a
    /// redelivery of what the app has. Never what the app did not take,
    /// even once nobody reads the events (the app dropped them, the client
    /// is closed or leaving): the server's watermark is the user's, so
    /// that ack would keep the message from the user's other devices and
    /// next client; unacknowledged, it comes again on the next connection.
    /// Nor the echo of an own send: an ack covers every earlier message of
    /// the conversation, some perhaps still queued for the app, and the
    /// server moves a sender's own watermark past their message itself
    /// when it can.
    ///
    /// A client that is leaving gives the app nothing more (`event_room`
    /// refuses), but still re-acks a redelivery of what the app has.
    pub(crate) async fn hand_over(&self, message: proto::Message, conn: &quinn::Connection) {
        let (conversation_id, seq) = (message.conversation_id, message.seq);
        // The place first, then the record that the app has the message:
        // a wait that ends with the connection records nothing, and the
        // message comes again on the next one. So does a message read after
        // its connection closed (from quinn's buffer): a reader of a closed
        // connection hands the app nothing more.
        if conn.close_reason().is_some() {
            return;
        }
        // What is not handed over (a redelivery, the echo of an own send)
        // is settled at once, as the rest of the stream (SendAcks, say)
        // must not wait on the app for it.
        {
            let mut delivered = self.delivered.lock().await;
            if !delivered.is_new(conversation_id, seq) {
                drop(delivered);
                self.settle_repeat(conversation_id, seq);
                return;
            }
            if self.own_unanswered(&message) {
                delivered.first(conversation_id, seq);
                return;
            }
        }
        let room = self.event_room(Some(conn)).await;
        if matches!(room, Room::Closed) {
            return;
        }
        // Another reader may have handed it over meanwhile: `first` decides.
        let mut delivered = self.delivered.lock().await;
        if !delivered.first(conversation_id, seq) {
            drop(delivered);
            self.settle_repeat(conversation_id, seq);
            return;
        }
        // With nobody to read it (`Room::NobodyReads`) it is only recorded,
        // and never acked (see `settle_repeat`).
        if !self.own_unanswered(&message)
            && let Room::Reserved(permit) = room
        {
            self.acks.on_its_way(conversation_id, seq);
            permit.send(Event::Message(message));
        }
    }

    /// A message the app has came again: acks again what the app has of
    /// the conversation (see [`Acks::redelivered`]).
    fn settle_repeat(&self, conversation_id: u64, seq: u64) {
        self.acks.redelivered(conversation_id, seq);
    }

    /// Routes the answer to a request waiting in `pending`. A conversation's
    /// members are noted here, in the stream's reader, so that receipts read
    /// after the reply find them; so is a presence snapshot, so that an
    /// update read right after it is not overwritten by it.
    pub(crate) fn answer(
        &self,
        request_id: u64,
        result: Result<Body, ClientError>,
        conn: &quinn::Connection,
    ) {
        let waiter = self
            .pending
            .lock()
            .expect("pending lock")
            .remove(&request_id);
        if let Some(waiter) = waiter {
            match &result {
                Ok(Body::Conversation(info)) => self.note_members(info),
                Ok(Body::PresenceSnapshot(snapshot)) => {
                    self.note_presence(snapshot.states.clone(), conn);
                }
                _ => {}
            }
            let _ = waiter.send(result);
        }
    }

    /// Routes the answer to a send in the outbox. Retryable refusals keep
    /// the entry and resend it after the server's delay.
    pub(crate) fn send_answered(
        self: &Arc<Self>,
        request_id: u64,
        result: Result<proto::SendAck, ClientError>,
    ) {
        if let Err(ClientError::Server {
            code, retry_after, ..
        }) = &result
            && code.is_retryable()
        {
            // Hold every send back until the server's time, then resend
            // from the earliest refused send on, in order (the server
            // refuses everything after a refusal until the refused send
            // returns): a retried send is never overtaken. A send window
            // paces the resend (see `outbox`).
            let delay = server_pause(*retry_after, &self.config);
            let until = tokio::time::Instant::now() + delay;
            if self
                .outbox
                .lock()
                .expect("outbox lock")
                .pause(until, request_id)
            {
                let inner = self.clone();
                tokio::spawn(async move { inner.resume_after_pause(until).await });
            }
            return;
        }
        {
            let mut outbox = self.outbox.lock().expect("outbox lock");
            outbox.complete(request_id, result);
            // An answer widens a send window after a pause: what it makes
            // room for goes now, under the lock, so no new send overtakes
            // it.
            let frames = outbox.transmit();
            if !frames.is_empty()
                && let Some(live) = self.live()
            {
                for frame in frames {
                    let _ = live.messages.send(frame);
                }
            }
        }
        self.answered.notify_waiters();
    }

    /// Waits out a send pause, then resends the outbox in order from its
    /// earliest refused entry.
    async fn resume_after_pause(&self, mut until: tokio::time::Instant) {
        loop {
            tokio::time::sleep_until(until).await;
            let mut outbox = self.outbox.lock().expect("outbox lock");
            match outbox.try_resume(tokio::time::Instant::now()) {
                Ok(()) => {
                    // Without a connection the entries stay unsent and the
                    // next connection gets them.
                    if let Some(live) = self.live() {
                        for frame in outbox.transmit() {
                            let _ = live.messages.send(frame);
                        }
                    }
                    return;
                }
                Err(later) => until = later,
            }
        }
    }

    /// Remembers a member's watermarks (they only move forward) in a
    /// conversation the app asked about; a member who joined since is
    /// added, up to [`MAX_MEMBERS`]. Receipts of other conversations still
    /// reach the app as events, but are not kept: the server names the
    /// conversations, and what it sends must not grow the client without
    /// bound.
    pub(crate) fn note_receipt(&self, receipt: &proto::Receipt) {
        let mut all = self.receipts.lock().expect("receipts lock");
        let Some(members) = all.get_mut(&receipt.conversation_id) else {
            return;
        };
        let full = members.len() >= MAX_MEMBERS;
        let entry = match members.entry(receipt.user_id) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(_) if full => return,
            // Joined since the list was fetched (its SYSTEM message fetches
            // it again): a new member's watermarks start just below the
            // message that added them, so until the list says, they count
            // from above what their first receipt covers, never for a
            // message from before they joined. Saturating: the seqs are the
            // server's, and an overflow would panic the receipts reader
            // with the lock held.
            Entry::Vacant(new) => new.insert(MemberMarks {
                joined: receipt
                    .delivered_seq
                    .min(receipt.seen_seq)
                    .saturating_add(1),
                ..MemberMarks::default()
            }),
        };
        entry.delivered = entry.delivered.max(receipt.delivered_seq);
        entry.seen = entry.seen.max(receipt.seen_seq);
    }

    /// Tells the app a receipt read on `conn` if it raises the delivered or
    /// seen watermark the app was told of that member, merged with it (see
    /// [`ReceiptsTold`]); one that raises neither returns at once, without
    /// waiting for room. The record and the queueing happen under one lock,
    /// after the place is reserved: two readers (a connection being
    /// replaced and its successor) could otherwise each pass the check and
    /// then reach the app in the other order, the higher watermark first.
    /// A reader that gets no place (its connection closed, nobody reads)
    /// records nothing.
    pub(crate) async fn tell_receipt(&self, receipt: proto::Receipt, conn: &quinn::Connection) {
        if !self.told.lock().expect("told lock").raises(&receipt) {
            return;
        }
        let Room::Reserved(permit) = self.event_room(Some(conn)).await else {
            return;
        };
        // Another reader may have told as much meanwhile: `raise` decides.
        let mut told = self.told.lock().expect("told lock");
        if let Some(merged) = told.raise(&receipt) {
            permit.send(Event::Receipt(merged));
        }
    }

    /// A SYSTEM message (a member added, removed, leaving...) came in a
    /// conversation whose members the client keeps: asks for the list
    /// again (the reader notes the reply), so statuses count the members
    /// of the moment, each from the message that added them. One request
    /// at a time per conversation; another SYSTEM message meanwhile asks
    /// once more after it.
    pub(crate) fn refresh_members(self: &Arc<Self>, conversation_id: u64) {
        if !self
            .receipts
            .lock()
            .expect("receipts lock")
            .contains_key(&conversation_id)
        {
            return;
        }
        match self
            .refreshing
            .lock()
            .expect("refreshing lock")
            .entry(conversation_id)
        {
            Entry::Occupied(mut running) => {
                *running.get_mut() = true;
                return;
            }
            Entry::Vacant(idle) => {
                idle.insert(false);
            }
        }
        /// Refusals for the moment (RATE_LIMITED: a catch-up can bring
        /// SYSTEM messages of many groups at once) waited out per refresh.
        const ATTEMPTS: u32 = 10;
        let inner = self.clone();
        tokio::spawn(async move {
            let mut refused = 0;
            loop {
                let body = Body::GetConversation(proto::GetConversation { conversation_id });
                let reply = request(&inner, StreamKind::Control, body).await;
                match &reply {
                    Err(ClientError::Server {
                        code: ErrorCode::NotAMember,
                        ..
                    }) => {
                        // Removed, or left from another device: nothing to
                        // count.
                        inner
                            .receipts
                            .lock()
                            .expect("receipts lock")
                            .remove(&conversation_id);
                    }
                    Err(ClientError::Server {
                        code, retry_after, ..
                    }) if code.is_retryable() && refused < ATTEMPTS => {
                        refused += 1;
                        tokio::time::sleep(server_pause(*retry_after, &inner.config)).await;
                        continue;
                    }
                    _ => {}
                }
                let mut refreshing = inner.refreshing.lock().expect("refreshing lock");
                if reply.is_ok() && refreshing.get(&conversation_id) == Some(&true) {
                    refreshing.insert(conversation_id, false);
                    continue;
                }
                refreshing.remove(&conversation_id);
                return;
            }
        });
    }

    /// Replaces what is known of a conversation's members, keeping the
    /// higher of the known and the replied watermarks of each (a receipt on
    /// the receipts stream may overtake a reply on control).
    fn note_members(&self, info: &proto::ConversationInfo) {
        let me = self.user_id();
        let mut all = self.receipts.lock().expect("receipts lock");
        let known = all.get(&info.conversation_id);
        let members: Watermarks = info
            .members
            .iter()
            .filter(|m| Some(m.user_id) != me)
            .take(MAX_MEMBERS)
            .map(|m| {
                let known = known
                    .and_then(|k| k.get(&m.user_id))
                    .copied()
                    .unwrap_or_default();
                let marks = MemberMarks {
                    joined: m.joined_seq,
                    delivered: m.delivered_seq.max(known.delivered),
                    seen: m.seen_seq.max(known.seen),
                };
                (m.user_id, marks)
            })
            .collect();
        all.insert(info.conversation_id, members);
    }

    /// Applies presence states of watched users from the server and tells
    /// the app. States of anyone else (a subscription the app has since
    /// replaced, or a confused server) are dropped: the map holds only the
    /// watched users.
    pub(crate) async fn presence_changed(
        &self,
        states: Vec<proto::PresenceState>,
        conn: &quinn::Connection,
    ) {
        for state in self.note_presence(states, conn) {
            if !self.emit(Event::Presence(state), conn).await {
                return;
            }
        }
    }

    /// The latest known states of these users, in their order.
    fn known_presence(&self, user_ids: &[u64]) -> Vec<proto::PresenceState> {
        let known = self.presence.lock().expect("presence lock");
        user_ids
            .iter()
            .filter_map(|id| known.get(id).copied())
            .collect()
    }

    /// Records presence states of watched users (dropping the rest) and
    /// returns them, for the app to hear. Under the presence lock, as
    /// [`Inner::watch`] changes the list: a state is never recorded for a
    /// user who was just dropped from it.
    ///
    /// A state numbered below the one known (`version`: an update that
    /// overtook the snapshot now being read, both from this connection) is
    /// older: dropped. A node that predates the numbers sends 0: states
    /// are taken in the order they come. Nothing is taken from a closed
    /// connection (`conn`, the one they came on): its reader may still be
    /// reading what quinn had buffered after the next connection reset
    /// the numbers, and one of the old node's would outrank the new
    /// node's for good.
    fn note_presence(
        &self,
        mut states: Vec<proto::PresenceState>,
        conn: &quinn::Connection,
    ) -> Vec<proto::PresenceState> {
        let mut known = self.presence.lock().expect("presence lock");
        // Under the lock `renumber_presence` takes, and it runs only once
        // this connection is closed: either it comes after, or this sees
        // the close.
        if conn.close_reason().is_some() {
            return Vec::new();
        }
        {
            let watching = self.watching.lock().expect("watching lock");
            states.retain(|state| {
                watching.contains(&state.user_id)
                    && known
                        .get(&state.user_id)
                        .is_none_or(|had| had.version <= state.version)
            });
        }
        for state in &states {
            known.insert(state.user_id, *state);
        }
        states
    }

    /// A new connection: its node numbers presence changes afresh (see
    /// [`note_presence`](Self::note_presence)), so what is known is kept
    /// but its numbers go back to 0.
    fn renumber_presence(&self) {
        for state in self.presence.lock().expect("presence lock").values_mut() {
            state.version = 0;
        }
    }

    /// Makes `user_ids` the watched list and forgets the presence of
    /// everyone else, before asking the server: a subscription that then
    /// fails or is abandoned leaves no state of the old list behind.
    fn watch(&self, user_ids: &[u64]) {
        let mut known = self.presence.lock().expect("presence lock");
        *self.watching.lock().expect("watching lock") = user_ids.to_vec();
        known.retain(|id, _| user_ids.contains(id));
    }

    /// Drops from the watched list (and forgets the presence of) those
    /// `keep` rejects.
    pub(crate) fn unwatch_unless(&self, keep: impl Fn(u64) -> bool) {
        let mut known = self.presence.lock().expect("presence lock");
        self.watching
            .lock()
            .expect("watching lock")
            .retain(|&id| keep(id));
        known.retain(|&id, _| keep(id));
    }

    fn live(&self) -> Option<Live> {
        self.live.lock().expect("live lock").clone()
    }

    /// Makes `live` the current connection and resends the outbox on it, in
    /// order, before any new send can slip in between. False (and the
    /// connection closed) if the client was closed meanwhile.
    fn install(&self, live: Live) -> bool {
        let mut outbox = self.outbox.lock().expect("outbox lock");
        if self.closed.load(Ordering::Relaxed) {
            live.conn.close(0u32.into(), b"client closed");
            return false;
        }
        self.max_text_len
            .store(live.max_text_len, Ordering::Relaxed);
        // Before the re-subscription this connection's node answers.
        self.renumber_presence();
        if outbox.fail_longer_than(live.max_text_len) {
            // A shutdown may be waiting for the outbox to empty.
            self.answered.notify_waiters();
        }
        // Nothing is on this connection's wire; during a pause the resend
        // waits for its end (see send_answered).
        outbox.mark_all_unsent();
        for frame in outbox.transmit() {
            let _ = live.messages.send(frame);
        }
        *self.live.lock().expect("live lock") = Some(live);
        drop(outbox);
        let _ = self.connected.send_replace(true);
        true
    }

    /// The session cannot continue: nothing will be sent any more, so
    /// every waiting send and request fails with `SessionEnded(code)`, new
    /// ones fail with `Closed`, the call media stream ends, and the app
    /// hears `SessionEnded`, after which its event stream ends. That event
    /// is not dropped however full the queue is, and the caller (the
    /// supervisor) does not wait for room: a task of its own delivers it.
    fn end_session(&self, code: ErrorCode) {
        let error = ClientError::SessionEnded(code);
        {
            let mut outbox = self.outbox.lock().expect("outbox lock");
            self.closed.store(true, Ordering::Relaxed);
            outbox.fail_all(&error);
        }
        self.answered.notify_waiters();
        self.departure.finished.notify_waiters();
        let _ = self.connected.send_replace(false);
        self.fail_pending(&error);
        if let Some(events) = self.events.lock().expect("events lock").take() {
            tokio::spawn(async move {
                let _ = events.send(Event::SessionEnded { code }).await;
            });
        }
        // Calls end with the session: the app's media stream ends too.
        self.call_media.lock().expect("media lock").take();
    }

    /// Disconnects for good (see [`Client::close`]).
    fn close(&self) {
        // Under the outbox lock, which `install` and sends take too: a
        // connection being made now is closed as it is installed, and no
        // send joins the outbox after it is failed.
        let live = {
            let mut outbox = self.outbox.lock().expect("outbox lock");
            if self.closed.swap(true, Ordering::Relaxed) {
                return;
            }
            outbox.fail_all(&ClientError::Closed);
            self.live.lock().expect("live lock").take()
        };
        self.answered.notify_waiters();
        self.departure.finished.notify_waiters();
        if let Some(live) = live {
            live.conn.close(0u32.into(), b"client closed");
        }
        self.fail_pending(&ClientError::Closed);
        let _ = self.connected.send_replace(false);
        // The app's event stream ends once it has read what is queued.
        self.events.lock().expect("events lock").take();
        self.call_media.lock().expect("media lock").take();
        self.reconnect.notify_one();
    }

    /// Whether a new send is refused: the client is closed or leaving.
    fn refuses_sends(&self) -> bool {
        self.closed.load(Ordering::Relaxed) || self.departure.leaving()
    }

    /// See [`Client::shutdown`].
    async fn shutdown(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        {
            let _outbox = self.outbox.lock().expect("outbox lock");
            if self.closed.load(Ordering::Relaxed) || self.departure.leaving() {
                return;
            }
            self.departure.leaving.store(true, Ordering::Release);
        }
        // A shutdown dropped before its end (a cancelled task, a timeout
        // around it) still closes: the client would otherwise stay
        // connected, online to friends, with no events and no sends.
        struct CloseOnDrop<'a>(&'a Inner);
        impl Drop for CloseOnDrop<'_> {
            fn drop(&mut self) {
                self.0.close();
            }
        }
        let _close = CloseOnDrop(self);
        self.departure.leave.notify_waiters();
        // A client waiting out a reconnect backoff connects now: what is
        // left to send and ack needs a connection within the timeout, not
        // after the backoff (up to 1.5 x `reconnect_max` with jitter, or
        // a server's retry-after). A connected client's supervisor takes
        // the wake-up and carries on.
        self.reconnect.notify_one();
        // The sends already made get their answers (they are resent on a
        // new connection meanwhile, as ever).
        loop {
            let answered = self.answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            if self.outbox.lock().expect("outbox lock").len() == 0
                || self.closed.load(Ordering::Relaxed)
            {
                break;
            }
            if tokio::time::timeout_at(deadline, answered).await.is_err() {
                break;
            }
        }
        // Closed meanwhile (by the app, or the session ended).
        let finished = self.departure.finished.notified();
        tokio::pin!(finished);
        finished.as_mut().enable();
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        // Then the messages writer writes the last acks and ends the
        // stream, and the server confirms (`AcksStored`) once it has stored
        // them. A
        // writer of a connection made after this finishes at once.
        self.departure.finishing.store(true, Ordering::Release);
        self.departure.finish.notify_waiters();
        if tokio::time::timeout_at(deadline, finished).await.is_err() {
            tracing::debug!("the server did not confirm the last delivery acks in time");
        }
        self.close();
    }

    fn fail_pending(&self, error: &ClientError) {
        for (_, waiter) in self.pending.lock().expect("pending lock").drain() {
            let _ = waiter.send(Err(error.clone()));
        }
    }
}

impl Client {
    /// Creates an account, logs in, and connects.
    pub async fn register(
        config: ClientConfig,
        username: &str,
        password: &str,
    ) -> Result<(Client, Events), ClientError> {
        Self::start(
            config,
            Credential::Register {
                username: username.into(),
                password: password.into(),
            },
        )
        .await
    }

    /// Logs in with a password and connects.
    pub async fn login(
        config: ClientConfig,
        username: &str,
        password: &str,
    ) -> Result<(Client, Events), ClientError> {
        Self::start(
            config,
            Credential::Login {
                username: username.into(),
                password: password.into(),
            },
        )
        .await
    }

    /// Connects with a token from an earlier login.
    pub async fn resume(
        config: ClientConfig,
        token: &str,
    ) -> Result<(Client, Events), ClientError> {
        Self::start(config, Credential::Token(token.into())).await
    }

    async fn start(
        config: ClientConfig,
        credential: Credential,
    ) -> Result<(Client, Events), ClientError> {
        let quic = config.quinn_client_config()?;
        let endpoint = config.endpoint()?;
        let (events_tx, events_rx) = mpsc::channel(config.event_capacity.max(1));
        let (media_tx, media_rx) = match config.calls {
            true => {
                let (tx, rx) = mpsc::channel(crate::calls::MEDIA_QUEUE);
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let inner = Arc::new(Inner {
            quic,
            endpoint,
            events: Mutex::new(Some(events_tx)),
            call_media: Mutex::new(media_tx),
            call_media_rx: Mutex::new(media_rx),
            identity: Mutex::new(None),
            live: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            next_request_id: AtomicU64::new(1),
            typing: Mutex::new(HashMap::new()),
            outbox: Mutex::new(Outbox::new(config.outbox_limit)),
            delivered: tokio::sync::Mutex::new(Delivered::default()),
            acks: Acks::default(),
            departure: Departure::default(),
            answered: Notify::new(),
            closed: AtomicBool::new(false),
            reconnect: Notify::new(),
            reconnects_asked: AtomicU64::new(0),
            max_text_len: AtomicUsize::new(chat_protocol::limits::DEFAULT_MAX_TEXT_LEN),
            connected: watch::channel(false).0,
            heartbeats: watch::channel(!config.start_in_background).0,
            watching: Mutex::new(Vec::new()),
            subscribing: tokio::sync::Mutex::new(()),
            presence: Mutex::new(HashMap::new()),
            receipts: Mutex::new(HashMap::new()),
            refreshing: Mutex::new(HashMap::new()),
            told: Mutex::new(ReceiptsTold::default()),
            config,
        });
        let (live, auth) = connection::connect(&inner, &credential).await?;
        let token = match credential {
            Credential::Token(token) => token,
            _ => auth.token.clone(),
        };
        *inner.identity.lock().expect("identity lock") = Some(Identity {
            user_id: auth.user_id,
            username: auth.username.clone(),
            token,
        });
        let conn = (live.conn.clone(), live.acks_id);
        // Nobody can have closed a client not yet returned.
        inner.install(live);
        let answered = inner.reconnects_asked.load(Ordering::Acquire);
        tokio::spawn(supervise(inner.clone(), conn, answered));
        let client = Client {
            _handle: Arc::new(Handle(inner.clone())),
            inner,
        };
        let events = Events {
            rx: events_rx,
            inner: client.inner.clone(),
        };
        Ok((client, events))
    }

    /// Who this client is logged in as.
    pub fn identity(&self) -> Identity {
        self.inner
            .identity
            .lock()
            .expect("identity lock")
            .clone()
            .expect("set at start")
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        *self.inner.connected.borrow()
    }

    /// Waits until connected (or the timeout passes); true if connected.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let inner = &self.inner;
        let mut rx = inner.connected.subscribe();
        // A client closed for good (or whose session ended) answers false
        // at once: `close` and `end_session` wake the waiters.
        tokio::time::timeout(
            timeout,
            rx.wait_for(|up| *up || inner.closed.load(Ordering::Relaxed)),
        )
        .await
        .is_ok_and(|r| r.is_ok_and(|up| *up))
    }

    /// Drops the current connection and reconnects (e.g. when the phone
    /// switched networks) after `reconnect_min` and some jitter, longer if
    /// the connection was young (the backoff carries over). Nothing is
    /// lost: unacknowledged sends are resent and undelivered messages
    /// arrive again.
    pub fn reconnect_now(&self) {
        self.inner.reconnects_asked.fetch_add(1, Ordering::AcqRel);
        self.inner.reconnect.notify_one();
    }

    /// Sends a text message. Resolves with the server's "sent" ack once the
    /// message is durable. Survives reconnects: the same request is resent
    /// (same `client_msg_id`) until the server answers.
    ///
    /// The send is queued when this is called, not when the future is
    /// first polled: sends leave in the order of the calls, and a
    /// [`shutdown`](Self::shutdown) that starts later waits (within its
    /// timeout) for its answer.
    ///
    /// A text longer than the server accepts (its AuthOk's
    /// `max_text_len`) fails at once with MESSAGE_TOO_LARGE, the server's
    /// own refusal, without reaching the outbox; one queued before a
    /// reconnect to a server with a lower limit fails then.
    ///
    /// An error other than a refusal by the server (`Closed` from a close,
    /// logout or shutdown, `SessionEnded`) leaves the outcome unknown: the
    /// message may have been stored before the answer was lost. Sending
    /// it again with a new key would then show it twice, so an app that
    /// resends after such an error (with a new client, after logging in
    /// again) uses [`send_with_id`](Self::send_with_id) with a key it
    /// kept ([`send_message_with_id`](Self::send_message_with_id) for the
    /// other kinds), and gets the stored message's ack (`duplicate`) if it
    /// was.
    pub fn send_text(
        &self,
        conversation_id: u64,
        text: &str,
    ) -> impl Future<Output = Result<proto::SendAck, ClientError>> + Send + use<> {
        let client_msg_id = new_client_msg_id();
        self.send_with_id(conversation_id, &client_msg_id, text)
    }

    /// [`send_text`](Self::send_text) with an idempotency key chosen by the
    /// app (e.g. persisted with a draft, so a send after an app restart is
    /// still recognised as the same message).
    pub fn send_with_id(
        &self,
        conversation_id: u64,
        client_msg_id: &str,
        text: &str,
    ) -> impl Future<Output = Result<proto::SendAck, ClientError>> + Send + use<> {
        self.send_message_with_id(conversation_id, client_msg_id, Outgoing::text(text))
    }

    /// Sends any kind of message ([`Outgoing`]) under an idempotency key
    /// chosen by the app, as [`send_with_id`](Self::send_with_id) sends a
    /// text: an app that keeps its unanswered replies, photos, reactions,
    /// edits and unsends across a restart (or a logout and login) sends
    /// each again under the key it kept, and gets the stored message's
    /// ack (`duplicate`) if the first try was stored, instead of a second
    /// message. Through the outbox, with the checks and refusals of the
    /// method that sends `outgoing` under a new key (a photo must name an
    /// upload's media id).
    ///
    /// A key is 1-64 bytes (INVALID_ARGUMENT otherwise, at once) and names
    /// one message of its sender: sent again with another message of the
    /// same kind to the same conversation, it is answered as the stored
    /// one (`duplicate`) and the new content is not sent; with another
    /// kind or conversation, it is refused with INVALID_ARGUMENT.
    pub fn send_message_with_id(
        &self,
        conversation_id: u64,
        client_msg_id: &str,
        outgoing: Outgoing<'_>,
    ) -> impl Future<Output = Result<proto::SendAck, ClientError>> + Send + use<> {
        let queued = match outgoing.kind {
            proto::MessageType::Photo if !chat_protocol::media::is_media_id(outgoing.media_id) => {
                Err(ClientError::Server {
                    code: ErrorCode::InvalidArgument,
                    message: "not a media id from upload_photo".into(),
                    retry_after: None,
                })
            }
            _ => self.queue_send(conversation_id, client_msg_id, outgoing),
        };
        async move { queued?.await.map_err(|_| ClientError::Closed)? }
    }

    /// Sends a text that answers message `reply_to_seq` of the
    /// conversation (a TEXT or PHOTO message this user may read: NOT_FOUND
    /// or INVALID_ARGUMENT otherwise), as [`send_text`](Self::send_text)
    /// sends a text. The delivered message carries `reply_to_seq`; an app
    /// shows the message it answers from what it holds, or reads it with
    /// [`message`](Self::message) (which a member added later may not
    /// read: "message unavailable"). A `reply_to_seq` of 0 sends a plain
    /// text.
    pub fn send_reply(
        &self,
        conversation_id: u64,
        reply_to_seq: u64,
        text: &str,
    ) -> impl Future<Output = Result<proto::SendAck, ClientError>> + Send + use<> {
        self.send_new(conversation_id, Outgoing::reply(reply_to_seq, text))
    }

    /// [`send_photo`](Self::send_photo) as a reply to message
    /// `reply_to_seq`, as [`send_reply`](Self::send_reply) sends a text
    /// (0: a plain photo).
    pub fn send_photo_reply(
        &self,
        conversation_id: u64,
        reply_to_seq: u64,
        media_id: &str,
        caption: &str,
    ) -> impl Future<Output = Result<proto::SendAck, ClientError>> + Send + use<> {
        let photo = Outgoing::photo_reply(reply_to_seq, media_id, caption);
        self.send_new(conversation_id, photo)
    }

    /// Reacts to message `seq` of the conversation with `emoji` (what
    /// [`is_reaction`](chat_protocol::limits::is_reaction) takes: at most
    /// 64 bytes, nothing blank or invisible; the server refuses anything
    /// else with INVALID_ARGUMENT), or takes this user's reaction back with `""`: a
    /// REACTION message, sent through the outbox as a text is. Each member
    /// has one reaction per message, their latest; [`Reactions`](crate::Reactions)
    /// folds them for display. Typing goes on (a reaction is not the
    /// draft).
    pub fn react(
        &self,
        conversation_id: u64,
        seq: u64,
        emoji: &str,
    ) -> impl Future<Output = Result<proto::SendAck, ClientError>> + Send + use<> {
        self.send_new(conversation_id, Outgoing::reaction(seq, emoji))
    }

    /// Edits a text this user sent (message `seq` of the conversation):
    /// an EDIT message with the whole new text, sent through the outbox
    /// as a text is. The server takes it within its edit window of the
    /// text's sending ([`edit_window`](Self::edit_window)) and refuses
    /// another's message, another type or a late edit with
    /// INVALID_ARGUMENT. The latest edit of a message stands;
    /// [`Edits`](crate::Edits) folds them for display. Typing goes on. The
    /// window is the server's to judge, by its clock, when the edit
    /// reaches it: one queued while offline may come back too late.
    pub fn edit(
        &self,
        conversation_id: u64,
        seq: u64,
        text: &str,
    ) -> impl Future<Output = Result<proto::SendAck, ClientError>> + Send + use<> {
        self.send_new(conversation_id, Outgoing::edit(seq, text))
    }

    /// How long after sending a text its author may edit it, as the
    /// server last announced (zero: it takes no edits, or the client has
    /// not connected yet): an app offers "Edit" within it.
    pub fn edit_window(&self) -> Duration {
        self.inner
            .live()
            .map_or(Duration::ZERO, |live| live.edit_window)
    }

    /// Unsends ("remove for everyone") a text or photo this user sent,
    /// message `seq` of the conversation: an UNSEND message, sent through
    /// the outbox as a text is. Once it is acknowledged the server has
    /// erased the message's text, photo and edits (history and catch-up
    /// serve it marked `unsent`, and no one else may fetch the photo);
    /// every member's app is delivered the UNSEND and drops what it holds
    /// ([`Unsends`](crate::Unsends)). The server takes it within its
    /// unsend window of the message's sending
    /// ([`unsend_window`](Self::unsend_window)) and refuses another's
    /// message, another type or a late unsend with INVALID_ARGUMENT, and
    /// a message unsent already with NOT_FOUND. Typing goes on.
    pub fn unsend(
        &self,
        conversation_id: u64,
        seq: u64,
    ) -> impl Future<Output = Result<proto::SendAck, ClientError>> + Send + use<> {
        self.send_new(conversation_id, Outgoing::unsend(seq))
    }

    /// How long after sending a text or photo its author may unsend it, as
    /// the server last announced (zero: it takes no unsends, or the client
    /// has not connected yet): an app offers "Unsend" within it.
    pub fn unsend_window(&self) -> Duration {
        self.inner
            .live()
            .map_or(Duration::ZERO, |live| live.unsend_window)
    }

    /// Uploads a photo on a media stream of its own and returns its media
    /// id, for [`send_photo`](Self::send_photo). Checked here first as
    /// the server would (size against its AuthOk's `max_photo_bytes`, the
    /// first bytes against the format, the preview against its limits:
    /// MEDIA_REJECTED). Not kept across
    /// reconnects: on `Disconnected` or `Timeout` upload it again (an
    /// upload that was stored meanwhile is deleted unsent by the server
    /// after its retention). Send it within that retention, a day by
    /// default.
    pub async fn upload_photo(&self, photo: PhotoUpload) -> Result<String, ClientError> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(ClientError::Closed);
        }
        let live = self.inner.live().ok_or(ClientError::Disconnected)?;
        media::check(&photo, live.max_photo_bytes, live.max_text_len)?;
        media::upload(
            &live.conn,
            self.inner.next_request_id(),
            &photo,
            media::chunk_len(live.max_text_len),
            self.inner.config.request_timeout,
        )
        .await
    }

    /// Sends an uploaded photo ([`upload_photo`](Self::upload_photo)) with
    /// an optional caption (may be empty), as
    /// [`send_text`](Self::send_text) sends a text: through the outbox,
    /// resolved once it is stored. A photo goes to one conversation; to
    /// send it to another, upload it again. The caption and the photo's
    /// preview share the text limit (MESSAGE_TOO_LARGE from the server
    /// when together they are longer).
    pub fn send_photo(
        &self,
        conversation_id: u64,
        media_id: &str,
        caption: &str,
    ) -> impl Future<Output = Result<proto::SendAck, ClientError>> + Send + use<> {
        let client_msg_id = new_client_msg_id();
        self.send_photo_with_id(conversation_id, &client_msg_id, media_id, caption)
    }

    /// [`send_photo`](Self::send_photo) with an idempotency key chosen by
    /// the app.
    pub fn send_photo_with_id(
        &self,
        conversation_id: u64,
        client_msg_id: &str,
        media_id: &str,
        caption: &str,
    ) -> impl Future<Output = Result<proto::SendAck, ClientError>> + Send + use<> {
        let photo = Outgoing::photo(media_id, caption);
        self.send_message_with_id(conversation_id, client_msg_id, photo)
    }

    /// Downloads a photo whole (a message's `photo.media_id`) and checks
    /// its bytes against its SHA-256; the header returned has no preview
    /// (the message has it). NOT_FOUND unless this user uploaded
    /// it or was sent its message as a member of the conversation (one who
    /// left or was removed since keeps what came before their leaving).
    pub async fn download_photo(
        &self,
        media_id: &str,
    ) -> Result<(proto::Photo, bytes::Bytes), ClientError> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(ClientError::Closed);
        }
        let live = self.inner.live().ok_or(ClientError::Disconnected)?;
        media::download(
            &live.conn,
            self.inner.next_request_id(),
            media_id,
            self.inner.config.request_timeout,
        )
        .await
    }

    /// Sends `outgoing` under a new key.
    fn send_new(
        &self,
        conversation_id: u64,
        outgoing: Outgoing<'_>,
    ) -> impl Future<Output = Result<proto::SendAck, ClientError>> + Send + use<> {
        self.send_message_with_id(conversation_id, &new_client_msg_id(), outgoing)
    }

    /// Puts a send in the outbox (and on the live connection): the
    /// receiver of its answer.
    fn queue_send(
        &self,
        conversation_id: u64,
        client_msg_id: &str,
        outgoing: Outgoing<'_>,
    ) -> Result<oneshot::Receiver<Result<proto::SendAck, ClientError>>, ClientError> {
        if self.inner.refuses_sends() {
            return Err(ClientError::Closed);
        }
        let Outgoing {
            kind,
            text,
            media_id,
            reply_to_seq,
        } = outgoing;
        // A message ends typing there: the next keystroke says so again at
        // once. The message ends it on the other members' side too, but
        // goes on another stream, which a start just before it may trail:
        // a stop after the start settles it.
        // Reactions, edits and unsends are not the draft being typed.
        let typed = matches!(kind, proto::MessageType::Text | proto::MessageType::Photo)
            && self
                .inner
                .typing
                .lock()
                .expect("typing lock")
                .remove(&conversation_id)
                .is_some();
        if typed {
            self.inner.send_typing(conversation_id, false);
        }
        // Refused here rather than by the server: a text far over the
        // limit would not fit in a frame, and the server closes the
        // connection of a client that sends one (on every reconnect, as
        // the outbox resends it).
        let max_text_len = self.inner.max_text_len.load(Ordering::Relaxed);
        if text.len() > max_text_len {
            return Err(outbox::too_long(text.len(), max_text_len));
        }
        // Likewise a key the server would refuse (or, beside a text at the
        // limit, not take in one frame).
        if client_msg_id.is_empty() || client_msg_id.len() > MAX_CLIENT_MSG_ID_LEN {
            return Err(ClientError::Server {
                code: ErrorCode::InvalidArgument,
                message: format!("client_msg_id must be 1-{MAX_CLIENT_MSG_ID_LEN} bytes"),
                retry_after: None,
            });
        }
        let request_id = self.inner.next_request_id();
        let frame = connection::encode(&Frame::new(
            request_id,
            Body::Send(proto::Send {
                conversation_id,
                client_msg_id: client_msg_id.to_string(),
                r#type: kind as i32,
                text: text.to_string(),
                media_id: media_id.to_string(),
                reply_to_seq,
            }),
        ));
        let (tx, rx) = oneshot::channel();
        {
            let mut outbox = self.inner.outbox.lock().expect("outbox lock");
            // Under the lock `close` and `end_session` fail the outbox
            // under (and `shutdown` starts under): an entry added after
            // that would wait forever, or keep a shutdown waiting.
            if self.inner.refuses_sends() {
                return Err(ClientError::Closed);
            }
            let live = self.inner.live();
            let now = outbox.push(
                request_id,
                (conversation_id, client_msg_id.to_owned()),
                (frame.clone(), text.len()),
                tx,
                live.is_some(),
            )?;
            if let Some(live) = live.filter(|_| now) {
                let _ = live.messages.send(frame);
            }
        }
        Ok(rx)
    }

    /// Acknowledges delivery of `seq` in the conversation and of every
    /// message before it, with [`DeliveryAcks::Manual`] once the app has
    /// stored it: the server stops redelivering them and tells their
    /// senders. (With [`DeliveryAcks::OnTake`] taking a message from
    /// [`Events`] does this.) Written with the next send or after
    /// `delivery_ack_linger`; while disconnected, on the next connection.
    /// Once a [`shutdown`](Self::shutdown) has written its last acks, not
    /// at all: the next client gets the message again. An ack stops below
    /// a message of the conversation still queued in [`Events`] (one that
    /// came late, after higher ones); once the app has taken and acked that
    /// one too, its ack covers `seq`. What the app has taken is its own to
    /// keep: an app that stores messages in the background acks `seq` only
    /// once every message below it that it took of the conversation is
    /// stored too (a late one may be taken after `seq`).
    pub fn ack_delivery(&self, conversation_id: u64, seq: u64) {
        self.inner.acks.have(conversation_id, seq);
    }

    /// Messages waiting in the outbox for the server's ack.
    pub fn outbox_len(&self) -> usize {
        self.inner.outbox.lock().expect("outbox lock").len()
    }

    /// Marks the conversation seen up to `seq`; the other members get a
    /// "seen" receipt. Seen counts as delivered too, for every message of
    /// the conversation up to `seq`, including one still waiting in
    /// [`Events`] (one that came late, below later ones): mark what the
    /// app has shown, from events or from history. Not retried: after
    /// `Disconnected`, mark again (a repeat is harmless).
    pub async fn mark_seen(&self, conversation_id: u64, seq: u64) -> Result<(), ClientError> {
        let body = Body::MarkSeen(proto::MarkSeen {
            conversation_id,
            seq,
        });
        match self.request(StreamKind::Receipts, body).await? {
            Body::Ok(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Tells the other members of a conversation whether this user is
    /// typing there. Call it with `true` as the user types (on every
    /// keystroke if that is simplest: at most one goes out per
    /// conversation every `limits::TYPING_REPEAT_MS`) and with `false` when
    /// they stop or clear the field (sent only after a `true`). Sending a
    /// message (not a reaction nor an edit) there ends it too, on the
    /// other members' side and here.
    /// Returns at once; nothing is retried or answered (one that is lost
    /// lapses on their side, and a refused one, not a member say, is
    /// dropped).
    pub fn typing(&self, conversation_id: u64, typing: bool) {
        let now = std::time::Instant::now();
        let repeat = Duration::from_millis(chat_protocol::limits::TYPING_REPEAT_MS);
        let lapse = Duration::from_millis(chat_protocol::limits::TYPING_LAPSE_MS);
        let mut sent = self.inner.typing.lock().expect("typing lock");
        if typing {
            if sent
                .get(&conversation_id)
                .is_some_and(|&at| now.duration_since(at) < repeat)
            {
                return;
            }
        } else if sent.remove(&conversation_id).is_none() {
            return;
        }
        // A start that did not go out is not recorded: the next keystroke
        // tries again.
        if self.inner.send_typing(conversation_id, typing) && typing {
            // What has lapsed on the other side needs no stop: the map
            // stays as small as the conversations typed in lately.
            sent.retain(|_, at| now.duration_since(*at) < lapse);
            sent.insert(conversation_id, now);
        }
    }

    /// Friends, pending requests and blocked users.
    pub async fn friends(&self) -> Result<proto::FriendList, ClientError> {
        match self
            .request(
                StreamKind::Control,
                Body::ListFriends(proto::ListFriends {}),
            )
            .await?
        {
            Body::FriendList(list) => Ok(list),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks `username` to be friends (accepts if they asked first).
    pub async fn send_friend_request(&self, username: &str) -> Result<(), ClientError> {
        self.expect_ok(Body::FriendRequest(proto::FriendRequest {
            username: username.into(),
        }))
        .await
    }

    /// Accepts a pending request from `user_id`.
    pub async fn accept_friend(&self, user_id: u64) -> Result<(), ClientError> {
        self.expect_ok(Body::FriendAccept(proto::FriendAccept { user_id }))
            .await
    }

    /// Declines a pending request from `user_id`.
    pub async fn decline_friend(&self, user_id: u64) -> Result<(), ClientError> {
        self.expect_ok(Body::FriendDecline(proto::FriendDecline { user_id }))
            .await
    }

    /// Ends a friendship (or cancels a pending request). The pair's 1-1
    /// conversation keeps its history but takes no new messages from
    /// either: a send there fails with [`ErrorCode::NotFriends`] (not
    /// retried) until they are friends again. The other user hears
    /// [`Event::Friend`] with `KIND_REMOVED`. Neither watches the other's
    /// presence any more.
    pub async fn remove_friend(&self, user_id: u64) -> Result<(), ClientError> {
        self.expect_ok(Body::FriendRemove(proto::FriendRemove { user_id }))
            .await?;
        self.inner.unwatch_unless(|id| id != user_id);
        Ok(())
    }

    /// Blocks `user_id`: ends a friendship or pending request with them
    /// (they hear `KIND_REMOVED` if there was one, and nothing of the
    /// block), and until [`unblock`](Self::unblock) their friend requests
    /// fail as if this account did not exist, and this user's to them with
    /// [`ErrorCode::InvalidArgument`]. Shared groups are not changed.
    /// Blocked users are listed in [`friends`](Self::friends)' `blocked`.
    /// Blocking again is not an error. Errors: `InvalidArgument` for this
    /// user, `NotFound` for an unknown one, `LimitReached` past
    /// [`chat_protocol::limits::MAX_BLOCKED`] blocked users.
    pub async fn block(&self, user_id: u64) -> Result<(), ClientError> {
        self.expect_ok(Body::BlockUser(proto::BlockUser { user_id }))
            .await?;
        self.inner.unwatch_unless(|id| id != user_id);
        Ok(())
    }

    /// Ends a block; a friendship it ended is not restored.
    /// [`ErrorCode::NotFound`] if `user_id` was not blocked.
    pub async fn unblock(&self, user_id: u64) -> Result<(), ClientError> {
        self.expect_ok(Body::UnblockUser(proto::UnblockUser { user_id }))
            .await
    }

    /// Opens (or creates) the 1-1 conversation with a friend.
    pub async fn open_direct(&self, user_id: u64) -> Result<proto::ConversationInfo, ClientError> {
        self.conversation_request(Body::OpenDirect(proto::OpenDirect { user_id }))
            .await
    }

    /// Conversations, most recently active first. `before`: `None` for the
    /// first page, else the last conversation of the previous page. Groups
    /// this user left or was removed from are listed as they were then,
    /// marked `former_member` (readable through [`history`](Self::history)
    /// up to their `last_seq`; sends and marks are refused).
    pub async fn conversations(
        &self,
        limit: u32,
        before: Option<&proto::ConversationInfo>,
    ) -> Result<Vec<proto::ConversationInfo>, ClientError> {
        let body = Body::ListConversations(proto::ListConversations {
            limit,
            before_activity_ms: before.map_or(0, |c| c.last_activity_ms),
            before_conversation_id: before.map_or(0, |c| c.conversation_id),
        });
        match self.request(StreamKind::Control, body).await? {
            Body::ConversationList(list) => Ok(list.conversations),
            other => Err(unexpected(&other)),
        }
    }

    /// "Delete chat": a direct conversation is cleared for this user up to
    /// `up_to_seq`, the newest message the app shows (one that came after
    /// it stays; its other member keeps everything), leaving their list
    /// until a new message and their history from that message on; a
    /// group they left leaves their list with its history and photos.
    /// `InvalidArgument` for a group they are in (leave it first). What
    /// this client already handed to the app is the app's to delete.
    pub async fn delete_conversation(
        &self,
        conversation_id: u64,
        up_to_seq: u64,
    ) -> Result<(), ClientError> {
        self.expect_ok(Body::DeleteConversation(proto::DeleteConversation {
            conversation_id,
            up_to_seq,
        }))
        .await
    }

    /// Mutes a conversation until `until_ms` (Unix ms; `i64::MAX`: until
    /// unmuted), or unmutes it (0): meanwhile its messages notify none of
    /// this user's devices (it is a setting of the user's, shown to every
    /// device as `ConversationInfo::muted_until_ms`). Messages still arrive
    /// and count as unread, and calls still ring.
    pub async fn mute(&self, conversation_id: u64, until_ms: i64) -> Result<(), ClientError> {
        self.expect_ok(Body::MuteConversation(proto::MuteConversation {
            conversation_id,
            muted_until_ms: until_ms,
        }))
        .await
    }

    /// A page of history, ascending by seq.
    pub async fn history(
        &self,
        conversation_id: u64,
        direction: HistoryDirection,
        cursor: u64,
        limit: u32,
    ) -> Result<proto::HistoryPage, ClientError> {
        let direction = match direction {
            HistoryDirection::Backward => proto::history_query::Direction::Backward,
            HistoryDirection::Forward => proto::history_query::Direction::Forward,
        };
        let body = Body::HistoryQuery(proto::HistoryQuery {
            conversation_id,
            direction: direction as i32,
            cursor,
            limit,
        });
        match self.request(StreamKind::Control, body).await? {
            Body::HistoryPage(page) => Ok(page),
            other => Err(unexpected(&other)),
        }
    }

    /// Message `seq` of a conversation, if this user may read it: what a
    /// reply quotes (its `reply_to_seq`) when the app does not hold it.
    /// `None` for one they may not read (before they were added, cleared
    /// by deleting the chat) or that does not exist: a history page from
    /// `seq - 1` then starts at a later message, which is not it.
    pub async fn message(
        &self,
        conversation_id: u64,
        seq: u64,
    ) -> Result<Option<proto::Message>, ClientError> {
        if seq == 0 {
            return Ok(None);
        }
        let page = self
            .history(conversation_id, HistoryDirection::Forward, seq - 1, 1)
            .await?;
        Ok(page.messages.into_iter().find(|m| m.seq == seq))
    }

    /// Watches the presence of these friends (e.g. the ones on screen),
    /// replacing the previous list; returns their current state (the
    /// server's snapshot, with any update that arrived right behind it).
    /// Changes then arrive as [`Event::Presence`]. The list is re-sent
    /// after every reconnect. A friend who removes the user (the app hears
    /// [`Event::Friend`] with `KIND_REMOVED`) leaves the list, and so does
    /// one whose friendship ended while the device was away, which the
    /// re-sent list finds out.
    pub async fn subscribe_presence(
        &self,
        user_ids: &[u64],
    ) -> Result<Vec<proto::PresenceState>, ClientError> {
        let _order = self.inner.subscribing.lock().await;
        self.inner.watch(user_ids);
        // The reader records the snapshot (see `Inner::answer`), and any
        // update read behind it since.
        subscribe(&self.inner, user_ids.to_vec()).await?;
        Ok(self.inner.known_presence(user_ids))
    }

    /// The latest known presence of a watched user.
    pub fn presence(&self, user_id: u64) -> Option<proto::PresenceState> {
        self.inner
            .presence
            .lock()
            .expect("presence lock")
            .get(&user_id)
            .cloned()
    }

    /// Hides (`true`) or shows this user's online status to everyone.
    pub async fn set_presence_hidden(&self, hidden: bool) -> Result<(), ClientError> {
        self.expect_ok(Body::SetPresenceVisibility(proto::SetPresenceVisibility {
            hidden,
        }))
        .await
    }

    /// Registers this device for notifications: the push token the app got
    /// from APNs or FCM, and the app id the operator's push gateway knows
    /// it by. The server notifies it (conversation, message, sender,
    /// badge; never the text) while this user has no connection in the
    /// foreground (see [`set_heartbeats`](Self::set_heartbeats)). It lasts
    /// as long as this session: call it again after each new login, and
    /// whenever the platform hands the app a new token. An empty `token`
    /// stops notifications to this device. A malformed registration is
    /// refused here, `InvalidArgument`, before anything is sent.
    pub async fn register_push(&self, app_id: &str, token: &str) -> Result<(), ClientError> {
        if let Some(why) = chat_protocol::push::check_registration(app_id, token) {
            return Err(ClientError::Server {
                code: ErrorCode::InvalidArgument,
                message: why.into(),
                retry_after: None,
            });
        }
        self.expect_ok(Body::RegisterPush(proto::RegisterPush {
            app_id: app_id.into(),
            token: token.into(),
        }))
        .await
    }

    /// Starts a call in a conversation (direct, with a friend, or a group)
    /// and joins it on this connection; the other members' devices ring.
    /// If the conversation has a call already, joins that one. Needs
    /// [`ClientConfig::calls`] (else `Config`). The answer names this
    /// device's participant id and who is in the call; media goes with
    /// [`send_call_media`](Self::send_call_media), and the SDP / ICE
    /// exchange with [`send_call_signal`](Self::send_call_signal). A call
    /// is held by the connection: after a reconnect
    /// ([`Event::Disconnected`]), join it again. Asking again on the
    /// same connection answers with the same call.
    pub async fn start_call(
        &self,
        conversation_id: u64,
        video: bool,
    ) -> Result<proto::CallJoined, ClientError> {
        self.call_joined(Body::StartCall(proto::StartCall {
            conversation_id,
            video,
        }))
        .await
    }

    /// Joins (answers) a call, on this connection. A user is in a call
    /// once: joining from a second device moves them there. `NotFound`
    /// once the call is over, `LimitReached` when it is full.
    pub async fn join_call(&self, call_id: u64) -> Result<proto::CallJoined, ClientError> {
        self.call_joined(Body::JoinCall(proto::JoinCall { call_id }))
            .await
    }

    /// Turns down a call that rings this user, on all their devices.
    /// `NotFound` if it no longer rings them.
    pub async fn decline_call(&self, call_id: u64) -> Result<(), ClientError> {
        self.expect_ok_on(
            StreamKind::Calls,
            Body::DeclineCall(proto::DeclineCall { call_id }),
        )
        .await
    }

    /// Leaves the call this connection is in. `NotFound` if it is not in
    /// that call (any more).
    pub async fn leave_call(&self, call_id: u64) -> Result<(), ClientError> {
        self.expect_ok_on(
            StreamKind::Calls,
            Body::LeaveCall(proto::LeaveCall { call_id }),
        )
        .await
    }

    /// Sends opaque signaling (an SDP offer or answer, ICE candidates) to
    /// participant `to` of this connection's call, who gets it as
    /// [`Event::CallSignal`]. At most 32 KiB: a longer or empty one is
    /// refused here, `InvalidArgument`.
    pub async fn send_call_signal(
        &self,
        call_id: u64,
        to: u32,
        payload: impl Into<bytes::Bytes>,
    ) -> Result<(), ClientError> {
        let payload = payload.into();
        if let Some(why) = chat_protocol::calls::check_signal(&payload) {
            return Err(ClientError::Server {
                code: ErrorCode::InvalidArgument,
                message: why.into(),
                retry_after: None,
            });
        }
        self.expect_ok_on(
            StreamKind::Calls,
            Body::CallSignal(proto::CallSignal {
                call_id,
                participant_id: to,
                payload,
            }),
        )
        .await
    }

    /// Sends one media datagram (an encrypted RTP packet, say) to the
    /// other participants of this connection's call, unreliably: it may
    /// be lost, and the server drops it beyond the sender's media rate or
    /// a receiver's datagram size. At most `CallJoined.max_media_bytes`.
    pub fn send_call_media(&self, payload: bytes::Bytes) -> Result<(), ClientError> {
        let live = self.inner.live().ok_or(ClientError::Disconnected)?;
        live.conn.send_datagram(payload).map_err(|e| match e {
            quinn::SendDatagramError::ConnectionLost(_) => ClientError::Disconnected,
            e => ClientError::Server {
                code: ErrorCode::InvalidArgument,
                message: e.to_string(),
                retry_after: None,
            },
        })
    }

    /// The media the other participants of this device's calls send, for
    /// as long as the client lives (across reconnects). Given once: `None`
    /// the second time, or with [`ClientConfig::calls`] off.
    pub fn call_media(&self) -> Option<crate::CallMedia> {
        let rx = self
            .inner
            .call_media_rx
            .lock()
            .expect("media lock")
            .take()?;
        Some(crate::CallMedia { rx })
    }

    /// Stops (`false`: the app went to the background) or resumes (`true`:
    /// it came back) heartbeats. Stopping tells the server, and from then
    /// on nothing this device does counts as activity (delivery acks,
    /// reconnects, automatic requests: they would show the user online), so
    /// it shows this user offline once its presence window passes, although
    /// the connection stays open; reconnects say they come from the
    /// background too. Resuming sends one at once, so the user is online
    /// again at once. To connect in the background to begin with (a sync
    /// woken by a push), set [`ClientConfig::start_in_background`].
    pub fn set_heartbeats(&self, enabled: bool) {
        self.inner.heartbeats.send_if_modified(|on| {
            let changed = *on != enabled;
            *on = enabled;
            changed
        });
    }

    /// Creates a group with friends; replies with the new conversation.
    /// Everyone gets its first SYSTEM message. Makes one group however
    /// often it has to ask: the request carries an idempotency key, and an
    /// answer lost to a dropped connection, a timeout or a briefly
    /// unavailable server is asked for again with the same key, for up to
    /// [`GROUP_REQUEST_ATTEMPTS`] request timeouts.
    pub async fn create_group(
        &self,
        name: &str,
        member_ids: &[u64],
    ) -> Result<proto::ConversationInfo, ClientError> {
        self.create_group_with_key(name, member_ids, &new_client_msg_id())
            .await
    }

    /// [`create_group`](Self::create_group) with an idempotency key chosen
    /// by the app (1-64 bytes), which may persist it to retry after a
    /// restart without making a second group.
    pub async fn create_group_with_key(
        &self,
        name: &str,
        member_ids: &[u64],
        key: &str,
    ) -> Result<proto::ConversationInfo, ClientError> {
        let body = Body::CreateGroup(proto::CreateGroup {
            name: name.into(),
            member_ids: member_ids.to_vec(),
            client_key: key.into(),
        });
        self.keyed(|| self.conversation_request(body.clone())).await
    }

    /// Renames a group (any member). Like every group change below, it is
    /// made once however often it has to ask (see
    /// [`create_group`](Self::create_group)): a repeat after a lost answer
    /// is answered Ok and changes nothing.
    pub async fn rename_group(&self, conversation_id: u64, name: &str) -> Result<(), ClientError> {
        let body = Body::RenameGroup(proto::RenameGroup {
            conversation_id,
            name: name.into(),
            client_key: new_client_msg_id(),
        });
        self.keyed(|| self.expect_ok(body.clone())).await
    }

    /// Adds friends to a group (admins).
    pub async fn add_members(
        &self,
        conversation_id: u64,
        user_ids: &[u64],
    ) -> Result<(), ClientError> {
        let body = Body::AddMembers(proto::AddMembers {
            conversation_id,
            user_ids: user_ids.to_vec(),
            client_key: new_client_msg_id(),
        });
        self.keyed(|| self.expect_ok(body.clone())).await?;
        // The change's SYSTEM message goes to everyone but this device.
        self.inner.refresh_members(conversation_id);
        Ok(())
    }

    /// Removes a member from a group (admins).
    pub async fn remove_member(
        &self,
        conversation_id: u64,
        user_id: u64,
    ) -> Result<(), ClientError> {
        let body = Body::RemoveMember(proto::RemoveMember {
            conversation_id,
            user_id,
            client_key: new_client_msg_id(),
        });
        self.keyed(|| self.expect_ok(body.clone())).await?;
        // The change's SYSTEM message goes to everyone but this device.
        self.inner.refresh_members(conversation_id);
        Ok(())
    }

    /// Leaves a group.
    pub async fn leave_group(&self, conversation_id: u64) -> Result<(), ClientError> {
        let body = Body::LeaveGroup(proto::LeaveGroup {
            conversation_id,
            client_key: new_client_msg_id(),
        });
        self.keyed(|| self.expect_ok(body.clone())).await?;
        self.inner
            .receipts
            .lock()
            .expect("receipts lock")
            .remove(&conversation_id);
        Ok(())
    }

    /// Promotes (`true`) or demotes a member (admins).
    pub async fn set_admin(
        &self,
        conversation_id: u64,
        user_id: u64,
        admin: bool,
    ) -> Result<(), ClientError> {
        let body = Body::SetAdmin(proto::SetAdmin {
            conversation_id,
            user_id,
            admin,
            client_key: new_client_msg_id(),
        });
        self.keyed(|| self.expect_ok(body.clone())).await
    }

    /// A conversation with its current members and their watermarks.
    pub async fn conversation(
        &self,
        conversation_id: u64,
    ) -> Result<proto::ConversationInfo, ClientError> {
        // Asked about from now on: a receipt that overtakes the reply (the
        // receipts stream is read apart from control) is kept and merged
        // with it, not dropped as one of a conversation nobody asked about.
        self.inner
            .receipts
            .lock()
            .expect("receipts lock")
            .entry(conversation_id)
            .or_default();
        let body = Body::GetConversation(proto::GetConversation { conversation_id });
        let reply = self.conversation_request(body).await;
        if reply.is_err() {
            let mut all = self.inner.receipts.lock().expect("receipts lock");
            if all.get(&conversation_id).is_some_and(HashMap::is_empty) {
                all.remove(&conversation_id);
            }
        }
        reply
    }

    /// Who received and who saw message `seq` ("seen by 2 of 4"), member by
    /// member.
    pub async fn message_receipts(
        &self,
        conversation_id: u64,
        seq: u64,
    ) -> Result<proto::MessageReceipts, ClientError> {
        let body = Body::GetMessageReceipts(proto::GetMessageReceipts {
            conversation_id,
            seq,
        });
        match self.request(StreamKind::Control, body).await? {
            Body::MessageReceipts(receipts) => Ok(receipts),
            other => Err(unexpected(&other)),
        }
    }

    /// "Delivered to 4 of 5, seen by 2 of 5" for message `seq` of a
    /// conversation, from the receipts this client has seen: the other
    /// members who could read it (members added later do not count), for
    /// a message this user sent (for someone else's, its sender counts
    /// among those who saw it). The member list comes from the last
    /// [`conversation`](Self::conversation),
    /// [`create_group`](Self::create_group) or
    /// [`open_direct`](Self::open_direct) reply for it, and is fetched
    /// again when a SYSTEM message (members added, removed, leaving) comes
    /// in it or this client adds or removes members; receipts keep the
    /// watermarks current. In groups above the server's `receipt-broadcast-max-members`
    /// (32 by default) the server sends a member's receipts only to the
    /// senders of the messages they cover, so there this is complete for
    /// this user's own messages; ask [`message_receipts`](Self::message_receipts)
    /// for others'. Returns `None` for a conversation the client knows
    /// nothing of (and no members while its first reply is on its way).
    pub fn receipt_status(&self, conversation_id: u64, seq: u64) -> Option<ReceiptStatus> {
        let all = self.inner.receipts.lock().expect("receipts lock");
        let readers: Vec<&MemberMarks> = all
            .get(&conversation_id)?
            .values()
            .filter(|m| m.joined <= seq)
            .collect();
        Some(ReceiptStatus {
            members: readers.len(),
            delivered: readers.iter().filter(|m| m.delivered >= seq).count(),
            seen: readers.iter().filter(|m| m.seen >= seq).count(),
        })
    }

    /// Where this account is logged in: its live sessions, newest first
    /// (at most 100), this one marked `current`.
    pub async fn sessions(&self) -> Result<Vec<proto::SessionInfo>, ClientError> {
        match self
            .request(
                StreamKind::Control,
                Body::ListSessions(proto::ListSessions {}),
            )
            .await?
        {
            Body::SessionList(list) => Ok(list.sessions),
            other => Err(unexpected(&other)),
        }
    }

    /// Logs another of the account's sessions out (a `session_id` from
    /// [`sessions`](Self::sessions)): its token stops working and its
    /// device's connection closes with TOKEN_REVOKED. NOT_FOUND when no
    /// live session has that id; this session's own is
    /// [`logout`](Self::logout).
    pub async fn revoke_session(&self, session_id: &[u8]) -> Result<(), ClientError> {
        self.expect_ok(Body::RevokeSession(proto::RevokeSession {
            session_id: bytes::Bytes::copy_from_slice(session_id),
        }))
        .await
    }

    /// Changes the password (WRONG_PASSWORD when `old_password` is not
    /// it; the new one follows registration's rules) and logs every other
    /// session of the account out; this one stays.
    pub async fn change_password(
        &self,
        old_password: &str,
        new_password: &str,
    ) -> Result<(), ClientError> {
        self.expect_ok(Body::ChangePassword(proto::ChangePassword {
            old_password: old_password.into(),
            new_password: new_password.into(),
        }))
        .await
    }

    /// Revokes this session's token and disconnects for good. Like
    /// [`close`](Self::close), it leaves unwritten the delivery acks still
    /// lingering (at most `delivery_ack_linger` old), so the user's next
    /// session gets those messages again; a logged-out device drops what
    /// it had anyway.
    pub async fn logout(&self) -> Result<(), ClientError> {
        match self.expect_ok(Body::Logout(proto::Logout {})).await {
            // The server may close the connection (LOGGED_OUT) before its
            // answer is read; a revocation from elsewhere did the same.
            Ok(())
            | Err(ClientError::SessionEnded(ErrorCode::LoggedOut | ErrorCode::TokenRevoked)) => {
                self.close();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Disconnects for good; pending sends fail with `Closed`, and the
    /// event stream ends once its queued events are read. Dropping the last
    /// clone of the client does this too. Delivery acks not yet written
    /// (those lingering, and those of messages taken after this) are not
    /// sent: the next client of this user gets those messages again. To
    /// leave without that, use [`shutdown`](Self::shutdown).
    pub fn close(&self) {
        self.inner.close();
    }

    /// Leaves gracefully, then closes as [`close`](Self::close) does. From
    /// the start, new sends fail with `Closed` and [`Events`] yields
    /// nothing more. Then, within `timeout`: the sends already made get
    /// their answers, and the delivery acks of every message the app took
    /// (or, with [`DeliveryAcks::Manual`], acked before this point) are
    /// written and confirmed stored by the server. So the next client of
    /// this user gets again the messages this one's app never took, and
    /// none it took, except those of a conversation above a message that
    /// came late and is still queued (an ack covers all before it). What
    /// does not finish in time (no connection, a slow
    /// server) is left as `close` leaves it. Acks written to a connection
    /// that is lost before the server read them, before or during the
    /// shutdown, are written again on the next connection (those written
    /// within twice `idle_timeout` of the loss; an older one only if the
    /// message comes again before the last acks are written). A second
    /// call while one runs, or a call
    /// on a closed client, returns at once. Dropping the future before it
    /// ends (a cancelled task) closes the client as `close` does. For an
    /// app going away: to the
    /// background for good, an account switch (a client cannot log out
    /// after this: see [`logout`](Self::logout)).
    pub async fn shutdown(&self, timeout: Duration) {
        self.inner.shutdown(timeout).await;
    }

    async fn expect_ok(&self, body: Body) -> Result<(), ClientError> {
        self.expect_ok_on(StreamKind::Control, body).await
    }

    async fn expect_ok_on(&self, kind: StreamKind, body: Body) -> Result<(), ClientError> {
        match self.request(kind, body).await? {
            Body::Ok(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn call_joined(&self, body: Body) -> Result<proto::CallJoined, ClientError> {
        match self.request(StreamKind::Calls, body).await? {
            Body::CallJoined(joined) => Ok(joined),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks a request that carries an idempotency key until it is
    /// answered: again at once after a dropped connection (once connected)
    /// or a timeout, after the server's delay on a retryable refusal, for
    /// up to [`GROUP_REQUEST_ATTEMPTS`] request timeouts. Any other answer
    /// is final.
    async fn keyed<T, F, Fut>(&self, ask: F) -> Result<T, ClientError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let give_up = tokio::time::Instant::now()
            + self.inner.config.request_timeout * GROUP_REQUEST_ATTEMPTS;
        loop {
            let error = match ask().await {
                Ok(answer) => return Ok(answer),
                Err(e) => e,
            };
            let wait = match &error {
                ClientError::Disconnected | ClientError::Timeout => Duration::ZERO,
                ClientError::Server {
                    code, retry_after, ..
                } if code.is_retryable() => retry_after.unwrap_or(self.inner.config.reconnect_min),
                _ => return Err(error),
            };
            let left = give_up.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(error);
            }
            tokio::time::sleep(wait.min(left)).await;
            if !self.wait_connected(left).await {
                // Closed, or the session ended: nothing will answer.
                if self.inner.closed.load(Ordering::Relaxed) {
                    return Err(ClientError::Closed);
                }
                return Err(error);
            }
        }
    }

    /// A control request answered with a conversation, whose members are
    /// remembered for [`receipt_status`](Self::receipt_status) (by the
    /// reader, see `Inner::answer`).
    async fn conversation_request(
        &self,
        body: Body,
    ) -> Result<proto::ConversationInfo, ClientError> {
        match self.request(StreamKind::Control, body).await? {
            Body::Conversation(info) => Ok(info),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a request on a stream and waits for its answer.
    async fn request(&self, kind: StreamKind, body: Body) -> Result<Body, ClientError> {
        request(&self.inner, kind, body).await
    }
}

/// Sends a request on a stream of the live connection and waits for its
/// answer.
async fn request(inner: &Inner, kind: StreamKind, body: Body) -> Result<Body, ClientError> {
    if inner.closed.load(Ordering::Relaxed) {
        return Err(ClientError::Closed);
    }
    let live = inner.live().ok_or(ClientError::Disconnected)?;
    let Some(writer) = live.writer(kind) else {
        return Err(ClientError::Config(
            "calls are off: set ClientConfig::calls (or the server does not serve calls)".into(),
        ));
    };
    let request_id = inner.next_request_id();
    let (tx, rx) = oneshot::channel();
    inner
        .pending
        .lock()
        .expect("pending lock")
        .insert(request_id, tx);
    // A connection lost since `live` was read may have failed the waiting
    // requests before this one was added: its writer may still take the
    // frame, but nothing will answer it.
    if live.conn.close_reason().is_some()
        || writer
            .send(connection::encode(&Frame::new(request_id, body)))
            .is_err()
    {
        inner
            .pending
            .lock()
            .expect("pending lock")
            .remove(&request_id);
        return Err(ClientError::Disconnected);
    }
    match tokio::time::timeout(inner.config.request_timeout, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(ClientError::Disconnected),
        Err(_) => {
            inner
                .pending
                .lock()
                .expect("pending lock")
                .remove(&request_id);
            Err(ClientError::Timeout)
        }
    }
}

async fn subscribe(
    inner: &Inner,
    user_ids: Vec<u64>,
) -> Result<Vec<proto::PresenceState>, ClientError> {
    let body = Body::SubscribePresence(proto::SubscribePresence { user_ids });
    match request(inner, StreamKind::Control, body).await? {
        Body::PresenceSnapshot(snapshot) => Ok(snapshot.states),
        other => Err(unexpected(&other)),
    }
}

/// Re-sends the list the app watches after a reconnect (on `conn`, the
/// new connection), and returns what the client knows of them then. The
/// list is read once it is this subscription's turn, so a newer one from
/// the app is never overtaken by an older. Refused for now (a user whose
/// devices spent their control requests gets RATE_LIMITED with a
/// retry-after), it tries again: given up, the app would silently hear no
/// more presence on this connection. The turn is given back while it
/// waits, so the app's own subscriptions go ahead (and the next try sends
/// whatever the list is then); it ends with the connection. Refused with
/// NOT_FRIENDS (a friendship ended while the device was away, so it never
/// heard), it drops whoever is no longer a friend from the list and tries
/// again: one ex-friend used to leave the whole list unwatched.
async fn resubscribe(inner: &Inner, conn: &quinn::Connection) -> Option<Vec<proto::PresenceState>> {
    /// Refusals taken before giving up (each waits its retry-after).
    const ATTEMPTS: u32 = 10;
    let mut refused = 0;
    loop {
        let order = inner.subscribing.lock().await;
        if conn.close_reason().is_some() {
            return None;
        }
        let watching = inner.watching.lock().expect("watching lock").clone();
        if watching.is_empty() {
            return None;
        }
        match subscribe(inner, watching.clone()).await {
            // The reader recorded the snapshot, and any update behind it:
            // the app hears the latest, not the snapshot's.
            Ok(_) => return Some(inner.known_presence(&watching)),
            Err(ClientError::Server {
                code, retry_after, ..
            }) if code.is_retryable() && refused < ATTEMPTS => {
                drop(order);
                refused += 1;
                tokio::select! {
                    () = tokio::time::sleep(server_pause(retry_after, &inner.config)) => {}
                    _ = conn.closed() => return None,
                }
            }
            Err(ClientError::Server {
                code: ErrorCode::NotFriends,
                ..
            }) if refused < ATTEMPTS => {
                refused += 1;
                let body = Body::ListFriends(proto::ListFriends {});
                let Ok(Body::FriendList(list)) = request(inner, StreamKind::Control, body).await
                else {
                    return None;
                };
                let friends: std::collections::HashSet<u64> =
                    list.friends.iter().map(|friend| friend.user_id).collect();
                inner.unwatch_unless(|id| friends.contains(&id));
            }
            Err(_) => return None,
        }
    }
}

fn unexpected(body: &Body) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {}", body.name()))
}

/// Members kept per conversation for [`Client::receipt_status`]: the
/// largest group a server may be configured for.
pub(crate) const MAX_MEMBERS: usize = 10_000;

/// How many request timeouts [`Client::create_group`] and the group
/// changes keep asking for.
pub const GROUP_REQUEST_ATTEMPTS: u32 = 3;

/// A message for [`Client::send_message_with_id`]: what a send carries
/// besides its conversation and key, built by what it is (a text, a reply,
/// a photo, a reaction, an edit, an unsend), with the rules of the method
/// that sends it with a fresh key ([`Client::send_text`],
/// [`Client::send_reply`], ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing<'a> {
    kind: proto::MessageType,
    /// A text, a photo's caption, a reaction or an edit's new text.
    text: &'a str,
    /// A photo's upload; empty otherwise.
    media_id: &'a str,
    /// The message a reply answers, a reaction reacts to, an edit or an
    /// unsend rewrites; 0 for none.
    reply_to_seq: u64,
}

impl<'a> Outgoing<'a> {
    /// A text ([`Client::send_text`]).
    pub fn text(text: &'a str) -> Self {
        Outgoing {
            kind: proto::MessageType::Text,
            text,
            media_id: "",
            reply_to_seq: 0,
        }
    }

    /// A text answering message `seq` ([`Client::send_reply`]; 0: a plain
    /// text).
    pub fn reply(seq: u64, text: &'a str) -> Self {
        Outgoing {
            reply_to_seq: seq,
            ..Outgoing::text(text)
        }
    }

    /// A photo: an upload's media id and a caption
    /// ([`Client::send_photo`]).
    pub fn photo(media_id: &'a str, caption: &'a str) -> Self {
        Outgoing {
            kind: proto::MessageType::Photo,
            media_id,
            ..Outgoing::text(caption)
        }
    }

    /// A photo answering message `seq` ([`Client::send_photo_reply`]).
    pub fn photo_reply(seq: u64, media_id: &'a str, caption: &'a str) -> Self {
        Outgoing {
            reply_to_seq: seq,
            ..Outgoing::photo(media_id, caption)
        }
    }

    /// A reaction to message `seq`, or its take-back with `""`
    /// ([`Client::react`]).
    pub fn reaction(seq: u64, emoji: &'a str) -> Self {
        Outgoing {
            kind: proto::MessageType::Reaction,
            ..Outgoing::reply(seq, emoji)
        }
    }

    /// A new text for this user's message `seq` ([`Client::edit`]).
    pub fn edit(seq: u64, text: &'a str) -> Self {
        Outgoing {
            kind: proto::MessageType::Edit,
            ..Outgoing::reply(seq, text)
        }
    }

    /// The unsend of this user's message `seq` ([`Client::unsend`]).
    pub fn unsend(seq: u64) -> Self {
        Outgoing {
            kind: proto::MessageType::Unsend,
            ..Outgoing::reply(seq, "")
        }
    }
}

/// 128 random bits, hex: unique per sender without coordination.
fn new_client_msg_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// How long to wait before the first reconnect after a close with `code`:
/// a node that is stopping wants its clients elsewhere at once (only the
/// jitter spreads them); a full node wants them to back off.
fn first_reconnect_delay(code: Option<ErrorCode>, config: &ClientConfig) -> Duration {
    match code {
        Some(ErrorCode::ServerShuttingDown) => Duration::ZERO,
        Some(ErrorCode::ServerBusy) => config.reconnect_max / 2,
        _ => config.reconnect_min,
    }
}

/// How long to wait before the next reconnect after an attempt that waited
/// `delay` failed with `error`: the doubled delay (within the configured
/// bounds), but at least the server's retry-after when it gave one, else
/// what the refusal's code calls for (a full node's SERVER_BUSY, as when a
/// live connection closes with it), so that a fleet of clients does not
/// hammer a full node every few hundred milliseconds.
fn retry_delay(delay: Duration, error: &ClientError, config: &ClientConfig) -> Duration {
    let doubled = (delay * 2)
        .max(config.reconnect_min)
        .min(config.reconnect_max);
    let ClientError::Server {
        code, retry_after, ..
    } = error
    else {
        return doubled;
    };
    // What the server asked for, when it said; else what the code calls for.
    let floor = match retry_after {
        Some(asked) => (*asked).min(MAX_SERVER_PAUSE),
        None => first_reconnect_delay(Some(*code), config),
    };
    doubled.max(floor)
}

/// Longest a server's retry-after may hold the outbox back at a time: the
/// pause outlives connections (the refused send must go first), so a
/// server that answered with a retry-after of days must not silence the
/// app for days; after this the client sends again and hears a new one.
const MAX_SERVER_PAUSE: Duration = Duration::from_secs(60);

/// The shortest send pause, whatever the server asks: each pause ends in
/// a resend of the outbox from the refused send on, so a server answering
/// "retry in 1 ms" again and again (as chat-server does for the sends
/// queued behind a refused one) would otherwise get the whole tail a
/// thousand times a second.
const MIN_SERVER_PAUSE: Duration = Duration::from_millis(20);

/// How long to hold sends back after a retryable refusal.
fn server_pause(retry_after: Option<Duration>, config: &ClientConfig) -> Duration {
    retry_after
        .unwrap_or(config.reconnect_min)
        .clamp(MIN_SERVER_PAUSE, MAX_SERVER_PAUSE)
}

/// Watches the live connection; when it ends, reconnects with backoff and
/// resumes with the token until the client is closed or the session ends.
///
/// `answered`: `reconnects_asked` when `conn` was installed (requests up to
/// there are answered by it); read before this task is spawned, so that a
/// request made before it first runs still counts.
async fn supervise(
    inner: Arc<Inner>,
    (mut conn, mut acks_id): (quinn::Connection, u64),
    mut answered: u64,
) {
    // The backoff carries over from one connection to the next unless the
    // connection lasted: a node that accepts the login and then drops the
    // connection (catch-up failing, a node stopping again and again) must
    // see its clients slow down, not come back every `reconnect_min`.
    let mut connected_at = tokio::time::Instant::now();
    let mut last_delay = Duration::ZERO;
    loop {
        let reason = loop {
            tokio::select! {
                reason = conn.closed() => break reason,
                () = inner.reconnect.notified() => {
                    if inner.reconnects_asked.load(Ordering::Acquire) != answered
                        || inner.closed.load(Ordering::Relaxed)
                    {
                        conn.close(0u32.into(), b"reconnecting");
                        break conn.closed().await;
                    }
                }
            }
        };
        // Before the next connection's writer: it writes again what this
        // one's wrote.
        inner.acks.lost(acks_id);
        *inner.live.lock().expect("live lock") = None;
        let _ = inner.connected.send_replace(false);
        let error = match ClientError::from_connection(&reason) {
            // Closed here to reconnect (`reconnect_now`, a stream the server
            // ended, a bad frame), not for good: requests waiting on it may
            // be asked again (keyed group changes are).
            ClientError::Closed if !inner.closed.load(Ordering::Relaxed) => {
                ClientError::Disconnected
            }
            error => error,
        };
        // The close's code is the connection's, not an answer to the
        // requests waiting on it (see `ClientError::for_waiting`); if the
        // session ended, `end_session` fails them, below.
        match ClientError::for_waiting(&reason) {
            ClientError::SessionEnded(_) => {}
            ClientError::Closed if !inner.closed.load(Ordering::Relaxed) => {
                inner.fail_pending(&ClientError::Disconnected);
            }
            waiting => inner.fail_pending(&waiting),
        }
        if inner.closed.load(Ordering::Relaxed) {
            return;
        }
        let code = error.code();
        tracing::debug!(?code, "connection lost");
        inner.emit_or_drop(Event::Disconnected { code });
        if let Some(code) = code.filter(|c| ends_session(*c)) {
            inner.end_session(code);
            return;
        }
        let token = inner
            .identity
            .lock()
            .expect("identity lock")
            .as_ref()
            .map(|i| i.token.clone());
        let Some(token) = token else { return };
        let credential = Credential::Token(token);
        let mut delay = first_reconnect_delay(code, &inner.config);
        if connected_at.elapsed() < inner.config.reconnect_max {
            delay = delay.max((last_delay * 2).min(inner.config.reconnect_max));
        }
        loop {
            // Jitter spreads a fleet of clients reconnecting to a restarted
            // node.
            let jitter = delay
                .max(inner.config.reconnect_min)
                .mul_f64(rand::random::<f64>() * 0.5);
            tokio::select! {
                () = tokio::time::sleep(delay + jitter) => {}
                () = inner.reconnect.notified() => {}
            }
            if inner.closed.load(Ordering::Relaxed) {
                return;
            }
            match connection::connect(&inner, &credential).await {
                Ok((live, _)) => {
                    conn = live.conn.clone();
                    acks_id = live.acks_id;
                    connected_at = tokio::time::Instant::now();
                    // At least the minimum: after a shutdown's immediate
                    // reconnect, a node that keeps closing must still see
                    // the backoff grow.
                    last_delay = delay.max(inner.config.reconnect_min);
                    if !inner.install(live) {
                        return;
                    }
                    answered = inner.reconnects_asked.load(Ordering::Acquire);
                    inner.emit_or_drop(Event::Connected);
                    // Presence may have changed while we were away. The list
                    // is read once it is this subscription's turn, so a
                    // newer one from the app is never overtaken by an older.
                    if !inner.watching.lock().expect("watching lock").is_empty() {
                        let inner = inner.clone();
                        let conn = conn.clone();
                        tokio::spawn(async move {
                            let Some(states) = resubscribe(&inner, &conn).await else {
                                return;
                            };
                            // Handed to the app (which may wait for room)
                            // after the turn is given back.
                            for state in states {
                                let Room::Reserved(permit) = inner.event_room(Some(&conn)).await
                                else {
                                    return;
                                };
                                // What is known once there is room, queued
                                // under the lock the control reader records
                                // updates under: an update it recorded (and
                                // queued) meanwhile is not followed by this
                                // older snapshot, and a user unwatched
                                // meanwhile is not shown.
                                let known = inner.presence.lock().expect("presence lock");
                                if let Some(current) = known.get(&state.user_id) {
                                    permit.send(Event::Presence(*current));
                                }
                            }
                        });
                    }
                    break;
                }
                Err(e) => {
                    if let Some(code) = e.code().filter(|c| ends_session(*c)) {
                        inner.end_session(code);
                        return;
                    }
                    tracing::debug!(error = %e, ?delay, "reconnect failed");
                    delay = retry_delay(delay, &e, &inner.config);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopping_node_means_reconnect_now_and_a_busy_one_back_off() {
        let config = ClientConfig::new("127.0.0.1:4433".parse().unwrap(), "localhost");
        assert_eq!(
            first_reconnect_delay(Some(ErrorCode::ServerShuttingDown), &config),
            Duration::ZERO
        );
        assert_eq!(
            first_reconnect_delay(Some(ErrorCode::ServerBusy), &config),
            config.reconnect_max / 2
        );
        assert!(config.reconnect_max / 2 > config.reconnect_min);
        assert_eq!(first_reconnect_delay(None, &config), config.reconnect_min);
    }

    #[test]
    fn a_refused_reconnect_waits_what_the_refusal_calls_for() {
        let config = ClientConfig::new("127.0.0.1:4433".parse().unwrap(), "localhost");
        let min = config.reconnect_min;
        let busy = |retry_after| ClientError::Server {
            code: ErrorCode::ServerBusy,
            message: "full".into(),
            retry_after,
        };
        // A network failure doubles from the minimum up to the maximum.
        assert_eq!(retry_delay(min, &ClientError::Timeout, &config), min * 2);
        assert_eq!(
            retry_delay(config.reconnect_max, &ClientError::Timeout, &config),
            config.reconnect_max
        );
        // A full node: at least the busy delay, from the first refusal on.
        assert_eq!(
            retry_delay(min, &busy(None), &config),
            config.reconnect_max / 2
        );
        assert_eq!(
            retry_delay(config.reconnect_max, &busy(None), &config),
            config.reconnect_max
        );
        // A shorter retry-after than the busy delay is what the server
        // asked for: it replaces it.
        let soon = Duration::from_secs(1);
        assert!(soon < config.reconnect_max / 2 && soon > min * 2);
        assert_eq!(retry_delay(min, &busy(Some(soon)), &config), soon);
        // A retry-after beyond both is waited out, up to a minute.
        let asked = config.reconnect_max * 3;
        assert_eq!(retry_delay(min, &busy(Some(asked)), &config), asked);
        let days = Duration::from_secs(3 * 24 * 3600);
        assert_eq!(
            retry_delay(min, &busy(Some(days)), &config),
            MAX_SERVER_PAUSE
        );
        // Any refusal with a retry-after (a login refused as busy).
        let unavailable = ClientError::Server {
            code: ErrorCode::Unavailable,
            message: "later".into(),
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(
            retry_delay(min, &unavailable, &config),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn a_server_pause_is_what_it_asks_up_to_a_minute() {
        let config = ClientConfig::new("127.0.0.1:4433".parse().unwrap(), "localhost");
        let asked = Duration::from_millis(1500);
        assert_eq!(server_pause(Some(asked), &config), asked);
        assert_eq!(server_pause(None, &config), config.reconnect_min);
        let days = Duration::from_millis(u32::MAX.into());
        assert_eq!(server_pause(Some(days), &config), MAX_SERVER_PAUSE);
    }
}
