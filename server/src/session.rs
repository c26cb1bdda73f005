//! One task per QUIC connection: accepts the client's streams, routes each
//! by the kind it announces, enforces "authenticate first", and cleans up
//! when the connection ends.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use chat_protocol::{Body, ErrorCode, Frame, StreamKind};
use quinn::{RecvStream, SendStream};
use tokio::sync::watch;

use tracing::Instrument;

use crate::endpoint::Shared;
use crate::error::Refusal;
use crate::hub::SessionHandle;
use crate::store::UserId;
use crate::streams;
use crate::wire::{self, FrameReader, Outbound, ReadError};

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Who a connection authenticated as.
pub struct Authed {
    /// The user.
    pub user_id: UserId,
    /// Their name.
    pub username: String,
    /// Hash of the token this connection used or was issued (for logout).
    pub token_hash: [u8; 32],
    /// When that token expires (Unix ms): the connection closes then.
    pub expires_at_ms: i64,
    /// The node-wide handle other sessions push to.
    pub handle: Arc<SessionHandle>,
}

/// Per-connection state shared by its stream tasks.
pub struct Session {
    /// Node-unique id, for logs.
    pub conn_id: u64,
    /// The connection.
    pub conn: quinn::Connection,
    /// Node-wide state.
    pub shared: Arc<Shared>,
    /// Set once, by the control stream, when authentication succeeds.
    pub authed: OnceLock<Authed>,
    /// Which singleton stream kinds the client has opened.
    opened: Mutex<[bool; 6]>,
    /// Users this connection watches the presence of.
    pub watching: Mutex<Vec<UserId>>,
    /// Set when the connection task is cleaning up.
    closed: AtomicBool,
    /// `Delivery::acks_lost` when the connection came: a leave is
    /// confirmed only if no ack was lost since (its own may have been).
    pub acks_lost_before: u64,
    /// The messages stream's `OpenStream` asked for `AcksStored` when the
    /// client leaves. Here rather than in the messages reader, which
    /// would be sized for it for the connection's life (8 bytes,
    /// measured), where this struct has the room.
    pub confirm_leave: AtomicBool,
    /// For a 0-RTT connection: turns true when the handshake completes.
    handshake: Option<watch::Receiver<bool>>,
    /// The address this connection is counted under in
    /// `Shared::unauthenticated` until it authenticates or ends.
    waiting_from: Mutex<Option<std::net::IpAddr>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // The connection task gives the place back when the connection
        // ends; this covers a task that panicked first.
        self.stop_waiting();
    }
}

/// The retry-after of a connection refused for its user's
/// `max-sessions-per-user` (or its token's `max-sessions-per-token`): long
/// enough for a device's dead connection to time out meanwhile.
const SESSIONS_FULL_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a protocol violation's error frame may wait in its stream's
/// queue before the connection is closed without it: longer than the
/// writer lingers for the frame to arrive once it took it (2 s).
const CLOSING_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// How long the refusal of a stream kind this node does not serve may
/// take to write before the stream is reset instead.
const REFUSAL_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The refusal of a connection over its user's `max-sessions-per-user`
/// or its token's `max-sessions-per-token`.
fn sessions_full() -> Refusal {
    Refusal::new(
        ErrorCode::LimitReached,
        "this account has too many connections to this node; retry later",
    )
    .with_retry_after(SESSIONS_FULL_RETRY)
}

/// The refusal of a second authentication on one connection.
fn already_authenticated() -> Refusal {
    Refusal::new(
        ErrorCode::UnexpectedFrame,
        "this connection is already authenticated",
    )
}

impl Session {
    /// Refuses a login (after its password check, before its session row)
    /// of a user who has `max-sessions-per-user` connections here already;
    /// [`Session::authenticate`] still decides.
    pub fn check_session_room(&self, user_id: UserId) -> Result<(), Refusal> {
        let max = self.shared.config.limits.max_sessions_per_user;
        if self.shared.hub.sessions_of(user_id) >= max {
            return Err(sessions_full());
        }
        Ok(())
    }

    /// The authenticated identity, if any.
    pub fn authed(&self) -> Option<&Authed> {
        self.authed.get()
    }

    /// Marks the connection authenticated as `user_id` and registers it in
    /// the hub. Refused if it was authenticated already, or if the user has
    /// `max-sessions-per-user` connections on this node; one beyond its
    /// token's `max-sessions-per-token` replaces the token's oldest
    /// (see [`Hub::register`](crate::hub::Hub::register)). A connection
    /// made in the `background` is no presence activity until it says so.
    pub fn authenticate(
        &self,
        user_id: UserId,
        username: String,
        token_hash: [u8; 32],
        expires_at_ms: i64,
        background: bool,
    ) -> Result<(), Refusal> {
        // The control stream authenticates one request at a time, so
        // nothing can set `authed` between this look and the set below.
        if self.authed.get().is_some() {
            return Err(already_authenticated());
        }
        let handle = SessionHandle::new(
            self.conn_id,
            user_id,
            token_hash,
            self.conn.clone(),
            self.shared.metrics.clone(),
            background,
        );
        let authed = Authed {
            user_id,
            username,
            token_hash,
            expires_at_ms,
            handle: handle.clone(),
        };
        let limits = &self.shared.config.limits;
        let (per_user, per_token) = (limits.max_sessions_per_user, limits.max_sessions_per_token);
        if !self.shared.hub.register(handle, per_user, per_token) {
            return Err(sessions_full());
        }
        if self.authed.set(authed).is_err() {
            self.shared.hub.unregister(user_id, self.conn_id);
            return Err(already_authenticated());
        }
        self.stop_waiting();
        tracing::Span::current().record("user_id", user_id);
        Ok(())
    }

    /// For a 0-RTT connection: once its handshake is done, counts it as
    /// waiting to authenticate from its (now proven) address, unless it
    /// has authenticated already, or closes it with SERVER_BUSY if that
    /// address has its share waiting.
    async fn wait_as_established(&self) {
        if !self.was_established().await {
            return;
        }
        let mut waiting = self.waiting_from.lock().expect("waiting lock");
        // Under the lock `authenticate` and the connection's end give the
        // place back under, after setting `authed` or `closed`: either they
        // see the place, or this sees that none is wanted.
        if self.authed().is_none() && !self.is_closed() {
            *waiting = take_waiting_place(&self.shared, &self.conn);
        }
    }

    /// No longer counted as waiting to authenticate from its address.
    fn stop_waiting(&self) {
        let waiting = self
            .waiting_from
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(address) = waiting {
            self.shared.unauthenticated.give_back(address);
        }
    }

    /// Whether the connection's handshake completed and it was given a
    /// connection place: always for a 1-RTT connection (served only then);
    /// for a 0-RTT one, waits (at most the handshake timeout) until the
    /// endpoint knows. A connection that never got that far is counted by
    /// the endpoint (`handshake_failed`, or as refused at the cap), as a
    /// 1-RTT one is.
    async fn was_established(&self) -> bool {
        match &self.handshake {
            None => true,
            Some(handshake) => handshake.clone().wait_for(|done| *done).await.is_ok(),
        }
    }

    /// Whether the connection is gone. A task that registered the session
    /// somewhere checks this afterwards and calls [`forget`](Self::forget)
    /// if so, because the connection task may have cleaned up already.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Removes the session from the hub, presence and watch lists. Safe to
    /// call more than once.
    pub async fn forget(&self) {
        let Some(authed) = self.authed() else {
            return;
        };
        authed.handle.sample_path(false);
        self.shared.hub.unregister(authed.user_id, self.conn_id);
        self.shared.calls.disconnected(self.conn_id);
        {
            // Taken and unwatched under one lock, as SubscribePresence
            // replaces and watches under it.
            let mut watching = self.watching.lock().expect("watching lock");
            let old = std::mem::take(&mut *watching);
            self.shared.presence.watch(&authed.handle, &old, &[]);
        }
        let timed_out = matches!(
            self.conn.close_reason(),
            Some(quinn::ConnectionError::TimedOut)
        );
        self.shared
            .presence
            .disconnect(authed.user_id, self.conn_id, timed_out)
            .await;
    }

    /// The handle whose queue a stream kind's writer drains (the stream
    /// kind check in `serve_stream` makes each writer the only reader).
    pub fn outbound(&self, kind: StreamKind) -> Option<Arc<SessionHandle>> {
        let handle = &self.authed()?.handle;
        handle.queue(kind)?;
        Some(handle.clone())
    }

    /// Closes the connection with a code, after trying to deliver `frame`
    /// on `send`.
    pub async fn close_with(&self, send: Option<&mut SendStream>, code: ErrorCode, message: &str) {
        tracing::debug!(conn_id = self.conn_id, code = %code, message, "closing connection");
        self.shared.metrics.error(code);
        if let Some(send) = send {
            let frame = Frame::error(0, code, message);
            let mut buf = bytes::BytesMut::new();
            chat_protocol::encode(&frame, &mut buf);
            // A second at most: a peer that gives no flow-control credit
            // must not keep the connection (and what the caller holds)
            // open.
            let delivered = async {
                send.write_all(&buf).await?;
                let _ = send.finish();
                let _ = send.stopped().await;
                Ok::<_, quinn::WriteError>(())
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), delivered).await;
        }
        wire::close(&self.conn, code, message);
    }
}

/// Counts `conn` as waiting to authenticate from its source (an IPv4
/// address, or an IPv6 /64, the block one host is usually given), or
/// closes it with SERVER_BUSY when that source has its share waiting.
fn take_waiting_place(shared: &Shared, conn: &quinn::Connection) -> Option<std::net::IpAddr> {
    let source = crate::auth::login_source(conn.remote_address().ip());
    if shared.unauthenticated.try_take(source) {
        return Some(source);
    }
    tracing::info!(
        %source,
        max = shared.config.transport.max_unauthenticated_per_address,
        "too many connections from one address waiting to authenticate; closing with SERVER_BUSY"
    );
    shared.metrics.connections_refused.increment(1);
    wire::close_counted(
        conn,
        &shared.metrics,
        ErrorCode::ServerBusy,
        "too many connections from this address waiting to log in; try again later",
    );
    None
}

/// Serves one connection until it closes. `handshake` is set when the
/// connection was accepted with 0-RTT: it turns true once the handshake
/// is confirmed, and until then only replay-safe frames are processed
/// (none at all if it is dropped first).
pub async fn run(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    handshake: Option<watch::Receiver<bool>>,
) {
    let conn_id = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    // A 0-RTT connection is counted once its handshake is done (see
    // `Session::wait_as_established`): before, its address is not proven,
    // and Initials forged from someone's address would take its places.
    let counted = match handshake {
        Some(_) => None,
        None => match take_waiting_place(&shared, &conn) {
            Some(address) => Some(address),
            None => {
                // Ended here, before the loop that counts how connections
                // end (a 0-RTT one refused later ends through it).
                shared.metrics.closed("address_busy");
                return;
            }
        },
    };
    // At debug level only: an enabled span keeps a record (its formatted
    // fields in the subscriber's registry) for the connection's life, a
    // few hundred bytes per idle connection, and is entered at every poll
    // of the stream tasks. Events at info and above name the connection
    // (and user) in fields of their own.
    let span = tracing::debug_span!("conn", conn_id, remote = %conn.remote_address(), user_id = tracing::field::Empty);
    let session = Arc::new(Session {
        conn_id,
        conn: conn.clone(),
        shared: shared.clone(),
        authed: OnceLock::new(),
        opened: Mutex::new([false; 6]),
        watching: Mutex::new(Vec::new()),
        closed: AtomicBool::new(false),
        confirm_leave: AtomicBool::new(false),
        acks_lost_before: shared.delivery.acks_lost(),
        handshake,
        waiting_from: Mutex::new(counted),
    });
    if session.handshake.is_some() {
        // A task of its own for the handshake's few round trips: in the
        // connection's task, the wait would size it for its whole life
        // (~200 bytes per idle connection, measured).
        let session = session.clone();
        tokio::spawn(async move {
            session.wait_as_established().await;
        });
    }
    async move {
        tracing::debug!("connection established");
        let auth_timeout = shared.config.limits.auth_timeout;
        let watchdog = {
            let session = session.clone();
            async move {
                tokio::time::sleep(auth_timeout).await;
                let Some(authed) = session.authed() else {
                    wire::close_counted(
                        &session.conn,
                        &session.shared.metrics,
                        ErrorCode::Timeout,
                        "not authenticated in time",
                    );
                    return;
                };
                // The token's checks ran once, at authentication: an open
                // connection must not outlive its token (watched from the
                // end of the authentication window on, so a token that
                // expires within it ends there).
                let left = authed.expires_at_ms.saturating_sub(streams::now_ms());
                tokio::time::sleep(std::time::Duration::from_millis(left.max(0) as u64)).await;
                wire::close_counted(
                    &session.conn,
                    &session.shared.metrics,
                    ErrorCode::TokenExpired,
                    "token expired; log in again",
                );
            }
        };
        // Streams are accepted and datagrams (call media) read in one loop:
        // a datagram is forwarded when the connection is in a call and
        // dropped otherwise (left in quinn's buffer, each would pin the
        // packet it came in), and neither waits for the other.
        let accept = {
            let session = session.clone();
            async move {
                let mut datagrams: u32 = 0;
                loop {
                    let accepted = tokio::select! {
                        accepted = session.conn.accept_bi() => accepted,
                        datagram = session.conn.read_datagram() => {
                            if let Ok(datagram) = datagram {
                                forward_datagram(&session, datagram);
                                // A read of a buffered datagram never
                                // waits: a client sending without pause
                                // would keep this task from its worker.
                                datagrams = datagrams.wrapping_add(1);
                                if datagrams.is_multiple_of(32) {
                                    tokio::task::yield_now().await;
                                }
                            }
                            // A failed read: the connection is gone, and
                            // the accept says so next.
                            continue;
                        }
                    };
                    match accepted {
                        Ok((send, recv)) => {
                            let session = session.clone();
                            tokio::spawn(
                                serve_stream(session, send, recv)
                                    .instrument(tracing::Span::current()),
                            );
                        }
                        Err(e) => {
                            tracing::debug!(reason = %e, "connection closed");
                            // Boxed: rare, and only 0-RTT connections wait.
                            if Box::pin(session.was_established()).await {
                                session
                                    .shared
                                    .metrics
                                    .closed(crate::metrics::close_reason(&e));
                            }
                            return;
                        }
                    }
                }
            }
        };
        tokio::select! {
            () = accept => {}
            () = async { watchdog.await; std::future::pending::<()>().await } => {}
        }
        // From here on, stream tasks that register something undo it
        // themselves (see `Session::is_closed`), so nothing outlives the
        // connection even if it closed in the middle of a login.
        session.closed.store(true, Ordering::SeqCst);
        session.stop_waiting();
        // Boxed: this task lives as long as the connection, and the clean-up
        // (presence, store) would otherwise size it for good.
        Box::pin(session.forget()).await;
    }
    .instrument(span)
    .await;
}

/// A datagram from the client: call media for the call it is in, or
/// nothing (dropped, counted).
fn forward_datagram(session: &Session, datagram: bytes::Bytes) {
    match session.authed() {
        Some(authed) => session.shared.calls.forward(&authed.handle, datagram),
        None => session
            .shared
            .metrics
            .call_media(crate::metrics::MediaOutcome::NoCall, 1),
    }
}

async fn serve_stream(session: Arc<Session>, mut send: SendStream, recv: RecvStream) {
    let shared = &session.shared;
    let mut reader = FrameReader::new(recv, shared.codec);
    reader.guard_early_data(session.handshake.clone());
    let first = tokio::time::timeout(shared.config.limits.auth_timeout, reader.next()).await;
    let (kind, confirm_leave) = match first {
        Ok(Ok(Some(Frame {
            body: Some(Body::OpenStream(open)),
            ..
        }))) => (StreamKind::from_wire(open.kind), open.confirm_leave),
        Ok(Ok(Some(frame))) => {
            // Not kept while the close is written (up to a second): a
            // decoded frame can be several times its wire size.
            drop(frame);
            let code = if session.authed().is_none() {
                ErrorCode::Unauthenticated
            } else {
                ErrorCode::BadStream
            };
            return session
                .close_with(
                    Some(&mut send),
                    code,
                    "the first frame of a stream must be OpenStream",
                )
                .await;
        }
        Ok(Err(ReadError::Frame(e))) => {
            return session
                .close_with(Some(&mut send), e.code(), &e.to_string())
                .await;
        }
        Ok(Ok(None) | Err(ReadError::Stream(_))) => return,
        Err(_) => {
            return session
                .close_with(Some(&mut send), ErrorCode::Timeout, "no OpenStream in time")
                .await;
        }
    };
    let Some(kind) = kind else {
        return session
            .close_with(Some(&mut send), ErrorCode::BadStream, "unknown stream kind")
            .await;
    };
    let duplicate = {
        let mut opened = session.opened.lock().expect("opened lock");
        let slot = &mut opened[kind as usize];
        let was = *slot;
        // Control, messages, receipts and calls are singletons; media
        // streams are many and short-lived (bounded by the connection's
        // stream limit).
        let singleton = matches!(
            kind,
            StreamKind::Control | StreamKind::Messages | StreamKind::Receipts | StreamKind::Calls
        );
        if singleton {
            *slot = true;
        }
        was && singleton
    };
    if duplicate {
        return session
            .close_with(
                Some(&mut send),
                ErrorCode::BadStream,
                "stream kind already open",
            )
            .await;
    }
    reader.count_into(shared.metrics.frames_in(kind).clone());
    let is_control = kind == StreamKind::Control;
    if !is_control && session.authed().is_none() {
        return session
            .close_with(
                Some(&mut send),
                ErrorCode::Unauthenticated,
                "authenticate on the control stream first",
            )
            .await;
    }
    // Each stream's handler runs as a task of its own, sized for that
    // handler alone; this task (sized for the opening exchange) ends here
    // instead of staying allocated for the stream's life.
    let span = tracing::Span::current();
    match kind {
        StreamKind::Control => {
            tokio::spawn(streams::control::serve(session.clone(), send, reader).instrument(span));
        }
        StreamKind::Messages => {
            session
                .confirm_leave
                .store(confirm_leave, Ordering::Relaxed);
            tokio::spawn(streams::messages::serve(session.clone(), send, reader).instrument(span));
        }
        StreamKind::Receipts => {
            tokio::spawn(streams::receipts::serve(session.clone(), send, reader).instrument(span));
        }
        StreamKind::Media => {
            tokio::spawn(streams::media::serve(session.clone(), send, reader).instrument(span));
        }
        StreamKind::Calls => {
            tokio::spawn(streams::calls::serve(session.clone(), send, reader).instrument(span));
        }
        StreamKind::Unspecified => {
            // Not served by this version: refuse the stream, keep the
            // connection.
            let frame = Frame::error(
                0,
                ErrorCode::BadStream,
                format!("{} streams are not supported yet", kind.name()),
            );
            let mut buf = bytes::BytesMut::new();
            chat_protocol::encode(&frame, &mut buf);
            shared.metrics.error(ErrorCode::BadStream);
            // Bounded: a peer that gives the stream no credit does not
            // keep this task.
            let refused = async { send.write_all(&buf).await.is_ok() && send.finish().is_ok() };
            if !matches!(
                tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, refused).await,
                Ok(true)
            ) {
                let _ = send.reset(quinn::VarInt::from_u32(ErrorCode::BadStream as u32));
            }
        }
    }
}

/// Handles a read error on an established stream of an authenticated
/// session: a protocol violation is answered on that stream and closes the
/// connection with its code; a closed stream just ends.
pub fn on_read_error(session: &Session, kind: StreamKind, e: ReadError) {
    match e {
        ReadError::Frame(e) => {
            tracing::info!(
                conn_id = session.conn_id,
                user_id = session.authed().map(|a| a.user_id),
                error = %e,
                stream = kind.name(),
                "bad frame; closing connection"
            );
            let frame = Frame::error(0, e.code(), e.to_string());
            // Counted here, once: the writer (which counts the errors it
            // writes) and the closer below may both close the connection.
            session.shared.metrics.error(e.code());
            let mut closing = Outbound::closing(&frame, e.code());
            closing.error = None;
            let queued = session
                .authed()
                .is_some_and(|a| a.handle.push(kind, closing));
            if !queued {
                wire::close(&session.conn, e.code(), &e.to_string());
                return;
            }
            // The writer may not take the error soon (a catch-up under way
            // writes from history first, for as long as the client takes
            // it), and the connection, its other streams included, stayed
            // usable until then: it closes within a moment regardless.
            let conn = session.conn.clone();
            let (code, reason) = (e.code(), e.to_string());
            tokio::spawn(async move {
                tokio::select! {
                    _ = conn.closed() => {}
                    () = tokio::time::sleep(CLOSING_GRACE) => wire::close(&conn, code, &reason),
                }
            });
        }
        ReadError::Stream(e) => tracing::debug!(error = %e, stream = kind.name(), "stream ended"),
    }
}
