//! One live connection: the handshake and authentication, the three
//! streams, and the tasks that read and write them.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chat_protocol::{Body, Codec, ErrorCode, Frame, FrameError, StreamKind, proto};
use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, watch};

use crate::client::{Event, Inner};
use crate::error::ClientError;

/// Most queued frames written at once.
const MAX_COALESCE: usize = 128;

/// How long a stream that ended after the server's connection-level error
/// waits for the server's close (it closes within a second of writing
/// the error) before closing the connection itself.
const SERVER_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How a connection authenticates.
#[derive(Clone)]
pub(crate) enum Credential {
    Register { username: String, password: String },
    Login { username: String, password: String },
    Token(String),
}

/// Writers of the live connection's streams. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Live {
    pub(crate) conn: quinn::Connection,
    pub(crate) control: mpsc::UnboundedSender<Bytes>,
    pub(crate) messages: mpsc::UnboundedSender<Bytes>,
    pub(crate) receipts: mpsc::UnboundedSender<Bytes>,
    /// The calls stream's, when [`ClientConfig::calls`](crate::ClientConfig::calls) is on.
    pub(crate) calls: Option<mpsc::UnboundedSender<Bytes>>,
    /// Longest text the server accepts (from its AuthOk).
    pub(crate) max_text_len: usize,
    /// Largest photo the server takes (from its AuthOk; 0: no photos).
    pub(crate) max_photo_bytes: u64,
    /// How long after sending a text it may be edited (from its AuthOk;
    /// zero: no edits).
    pub(crate) edit_window: Duration,
    /// How long after sending a text or photo it may be unsent (from its
    /// AuthOk; zero: no unsends).
    pub(crate) unsend_window: Duration,
    /// Its id in [`Acks`](crate::acks::Acks), which hears when it is lost.
    pub(crate) acks_id: u64,
}

impl Live {
    /// The writer of a stream kind; `None` for calls when they are off.
    pub(crate) fn writer(&self, kind: StreamKind) -> Option<&mpsc::UnboundedSender<Bytes>> {
        match kind {
            StreamKind::Messages => Some(&self.messages),
            StreamKind::Receipts => Some(&self.receipts),
            StreamKind::Calls => self.calls.as_ref(),
            _ => Some(&self.control),
        }
    }
}

pub(crate) fn encode(frame: &Frame) -> Bytes {
    let mut buf = BytesMut::with_capacity(chat_protocol::encoded_len(frame));
    chat_protocol::encode(frame, &mut buf);
    buf.freeze()
}

/// Connects, authenticates, opens the data streams and starts the stream
/// tasks.
pub(crate) async fn connect(
    inner: &Arc<Inner>,
    credential: &Credential,
) -> Result<(Live, proto::AuthOk), ClientError> {
    let config = &inner.config;
    let timeout = config.request_timeout;
    let connecting = inner
        .endpoint
        .connect_with(inner.quic.clone(), config.server_addr, &config.server_name)
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let conn = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| ClientError::Timeout)?
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    // The whole exchange after the handshake is bounded too: a server that
    // never grants a stream or never answers must not hold a login (or the
    // supervisor's reconnect) forever while keep-alives hold the connection.
    match tokio::time::timeout(timeout, establish(inner, credential, conn.clone())).await {
        Ok(result) => result,
        Err(_) => {
            conn.close(0u32.into(), b"timed out connecting");
            Err(ClientError::Timeout)
        }
    }
}

/// Authenticates on a new connection, opens the data streams and starts
/// the stream tasks.
async fn establish(
    inner: &Arc<Inner>,
    credential: &Credential,
    conn: quinn::Connection,
) -> Result<(Live, proto::AuthOk), ClientError> {
    let config = &inner.config;
    let timeout = config.request_timeout;
    let closed = |conn: &quinn::Connection| {
        conn.close_reason().map_or(ClientError::Disconnected, |e| {
            ClientError::from_connection(&e)
        })
    };
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| ClientError::from_connection(&e))?;
    let request_id = inner.next_request_id();
    // A password is typed in the foreground; a resume follows the app
    // (`Client::set_heartbeats`), so a sync in the background does not
    // show the user online.
    let background = matches!(credential, Credential::Token(_)) && !*inner.heartbeats.borrow();
    let body = match credential.clone() {
        Credential::Register { username, password } => Body::Register(proto::Register {
            username,
            password,
            device_name: config.device_name.clone(),
        }),
        Credential::Login { username, password } => Body::Login(proto::Login {
            username,
            password,
            device_name: config.device_name.clone(),
        }),
        Credential::Token(token) => Body::Authenticate(proto::Authenticate { token, background }),
    };
    let mut hello = BytesMut::new();
    chat_protocol::encode(&Frame::open_stream(StreamKind::Control), &mut hello);
    chat_protocol::encode(&Frame::new(request_id, body), &mut hello);
    send.write_all(&hello).await.map_err(|_| closed(&conn))?;
    let mut reader = FrameReader::new(recv);
    let reply = match tokio::time::timeout(timeout, reader.next()).await {
        Err(_) => return Err(ClientError::Timeout),
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None) | Err(ReadError::Stream)) => return Err(closed(&conn)),
        Ok(Err(ReadError::Frame(e))) => return Err(ClientError::Protocol(e.to_string())),
    };
    let auth_ok = match reply.body {
        Some(Body::AuthOk(ok)) => ok,
        Some(Body::Error(e)) => {
            conn.close(0u32.into(), b"authentication refused");
            return Err(ClientError::server(&e));
        }
        _ => {
            return Err(ClientError::Protocol(format!(
                "expected AuthOk, got {}",
                reply.body_name()
            )));
        }
    };

    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (messages_tx, messages_rx) = mpsc::unbounded_channel();
    let (receipts_tx, receipts_rx) = mpsc::unbounded_channel();
    // A leave is confirmed by AcksStored (see `read_loop`).
    let (ms, mr) = open(&conn, Frame::open_messages(true)).await?;
    let (rs, rr) = open(&conn, Frame::open_stream(StreamKind::Receipts)).await?;
    let calls = match config.calls && auth_ok.calls {
        true => Some(open(&conn, Frame::open_stream(StreamKind::Calls)).await?),
        false => None,
    };
    // After the last await: a connection given an id is one the caller
    // gets, and reports lost.
    let acks_id = inner.acks.connection(2 * inner.config.idle_timeout);
    tokio::spawn(write_loop(
        conn.clone(),
        send,
        control_rx,
        StreamKind::Control,
    ));
    tokio::spawn(messages_write_loop(
        inner.clone(),
        (conn.clone(), acks_id),
        ms,
        messages_rx,
    ));
    tokio::spawn(write_loop(
        conn.clone(),
        rs,
        receipts_rx,
        StreamKind::Receipts,
    ));
    let calls_tx = calls.map(|(cs, cr)| {
        let (calls_tx, calls_rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(conn.clone(), cs, calls_rx, StreamKind::Calls));
        tokio::spawn(read_loop(
            inner.clone(),
            conn.clone(),
            FrameReader::new(cr),
            (StreamKind::Calls, false),
        ));
        if let Some(media) = inner.call_media_sender() {
            tokio::spawn(crate::calls::read_media(conn.clone(), media));
        }
        calls_tx
    });
    let live = Live {
        conn,
        control: control_tx,
        messages: messages_tx,
        receipts: receipts_tx,
        calls: calls_tx,
        // A server that does not say: as long as fits in a frame of the
        // default size with its envelope (the 512 bytes servers keep
        // beside their text limit), so a send never makes a server with
        // default frames close the connection (and the outbox send it
        // again after every reconnect), while a longer text limit up to
        // there is not undercut.
        max_text_len: match auth_ok.max_text_len {
            0 => chat_protocol::limits::DEFAULT_MAX_FRAME_LEN - 512,
            n => n as usize,
        },
        max_photo_bytes: auth_ok.max_photo_bytes,
        edit_window: Duration::from_millis(auth_ok.edit_window_ms.into()),
        unsend_window: Duration::from_millis(auth_ok.unsend_window_ms.into()),
        acks_id,
    };
    tokio::spawn(read_loop(
        inner.clone(),
        live.conn.clone(),
        reader,
        (StreamKind::Control, false),
    ));
    let announced = (auth_ok.heartbeat_interval_ms > 0)
        .then(|| Duration::from_millis(auth_ok.heartbeat_interval_ms.into()));
    // Not more often than the protocol's minimum whatever the server
    // asks: a server asking every millisecond that then stopped reading
    // the control stream would grow the unsent queue by a thousand frames
    // a second.
    let interval = config
        .heartbeat_interval
        .or(announced)
        .map(|interval| interval.max(chat_protocol::limits::MIN_HEARTBEAT_INTERVAL));
    tokio::spawn(heartbeat_loop(
        inner.heartbeats.subscribe(),
        live.conn.clone(),
        live.control.clone(),
        interval,
        background,
    ));
    // A server that does not confirm leaves (it predates AcksStored) ends
    // the stream as its only answer.
    let end_confirms = !auth_ok.confirms_leave;
    tokio::spawn(read_loop(
        inner.clone(),
        live.conn.clone(),
        FrameReader::new(mr),
        (StreamKind::Messages, end_confirms),
    ));
    tokio::spawn(read_loop(
        inner.clone(),
        live.conn.clone(),
        FrameReader::new(rr),
        (StreamKind::Receipts, false),
    ));
    Ok((live, *auth_ok))
}

/// Opens a data stream with its `OpenStream` frame.
async fn open(
    conn: &quinn::Connection,
    open_stream: Frame,
) -> Result<(SendStream, RecvStream), ClientError> {
    let (mut send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| ClientError::from_connection(&e))?;
    send.write_all(&encode(&open_stream)).await.map_err(|_| {
        conn.close_reason().map_or(ClientError::Disconnected, |e| {
            ClientError::from_connection(&e)
        })
    })?;
    Ok((send, recv))
}

/// Writes one stream until its queue closes. A write that fails while
/// the connection lives (the server stopped or reset the stream) closes
/// the connection, as a failed read does (see [`read_loop`]): the frames
/// queued here count as sent, so sends would wait for answers that never
/// come while heartbeats kept the connection up; a closed connection makes
/// the supervisor connect again and resend the outbox.
async fn write_loop(
    conn: quinn::Connection,
    mut send: SendStream,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    kind: StreamKind,
) {
    let mut batch = Vec::with_capacity(16);
    while rx.recv_many(&mut batch, MAX_COALESCE).await > 0 {
        if send.write_all_chunks(&mut batch).await.is_err() {
            write_failed(&conn, kind);
            return;
        }
        batch.clear();
    }
    let _ = send.finish();
}

/// Closes the connection after a failed write on `kind`, unless it is
/// already closed (which is what made the write fail).
fn write_failed(conn: &quinn::Connection, kind: StreamKind) {
    if conn.close_reason().is_none() {
        tracing::warn!(
            stream = kind.name(),
            "cannot write to a stream; reconnecting"
        );
        conn.close(0u32.into(), b"stream write failed");
    }
}

/// Sends a heartbeat every `interval` (if the server asks for them) while
/// the connection lives and the app has heartbeats on (`enabled`), and
/// tells the server when the app goes to the background (one heartbeat
/// saying so: the connection's frames then stop counting as activity) and
/// when it comes back (a heartbeat at once, so the user is online at once;
/// the next a full interval later). `background`: what the connection
/// told the server when it authenticated. Ticks missed while the process
/// was frozen (an app in the background) are not made up in a burst: the
/// schedule just resumes.
async fn heartbeat_loop(
    mut enabled: watch::Receiver<bool>,
    conn: quinn::Connection,
    control: mpsc::UnboundedSender<Bytes>,
    interval: Option<Duration>,
    mut background: bool,
) {
    let beat = |background| {
        encode(&Frame::push(Body::Heartbeat(proto::Heartbeat {
            background,
        })))
    };
    let mut tick = interval.map(|interval| {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    });
    loop {
        // What the app wants against what the server was last told (the
        // app may have changed it while the connection authenticated).
        let foreground = *enabled.borrow_and_update();
        if foreground == background {
            background = !foreground;
            if control.send(beat(background)).is_err() {
                return;
            }
            if let Some(tick) = &mut tick {
                tick.reset();
            }
        }
        let next_tick = async {
            match &mut tick {
                Some(tick) => {
                    tick.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = next_tick => {
                if foreground && control.send(beat(false)).is_err() {
                    return;
                }
            }
            changed = enabled.changed() => {
                // The sender lives in `Inner`, which outlives the
                // connection; gone, nobody can turn heartbeats on again.
                if changed.is_err() {
                    return;
                }
            }
            _ = conn.closed() => return,
        }
    }
}

/// Writes the messages stream: the app's sends as soon as they come, and
/// delivery acks (see [`Acks`](crate::acks::Acks)), which wait up to
/// `delivery_ack_linger` to leave with the next send, in the same packet,
/// as one DeliveryAck per conversation. A failed write closes the
/// connection (see [`write_loop`]); acks are taken only while the
/// connection is open, so those queued after it closed wait for the next,
/// and those it wrote are queued again for the next once it is lost
/// ([`Acks::lost`](crate::acks::Acks::lost)). When the client is leaving ([`Client::shutdown`]) it writes what is
/// queued and the last acks, and ends the stream.
///
/// [`Client::shutdown`]: crate::Client::shutdown
async fn messages_write_loop(
    inner: Arc<Inner>,
    (conn, acks_id): (quinn::Connection, u64),
    mut send: SendStream,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) {
    let linger = inner.config.delivery_ack_linger;
    let mut batch = Vec::with_capacity(16);
    let deadline = tokio::time::sleep(linger);
    tokio::pin!(deadline);
    let mut lingering = false;
    loop {
        // Enabled before looking, so an ack queued in between still wakes.
        let queued = inner.acks.queued();
        tokio::pin!(queued);
        queued.as_mut().enable();
        let finish = inner.departure.finish();
        tokio::pin!(finish);
        finish.as_mut().enable();
        if inner.departure.finishing() {
            return finish_messages(&inner, (&conn, acks_id), send, rx, batch).await;
        }
        if !lingering && inner.acks.any_unsent() {
            lingering = true;
            deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + linger);
        }
        tokio::select! {
            n = rx.recv_many(&mut batch, MAX_COALESCE) => {
                if n == 0 {
                    break;
                }
            }
            () = &mut queued, if !lingering => continue,
            () = &mut deadline, if lingering => {}
            () = &mut finish => continue,
        }
        lingering = false;
        if conn.close_reason().is_some() {
            return;
        }
        push_acks(&mut batch, inner.acks.take_unsent(acks_id));
        if batch.is_empty() {
            continue;
        }
        if send.write_all_chunks(&mut batch).await.is_err() {
            write_failed(&conn, StreamKind::Messages);
            return;
        }
        batch.clear();
    }
    let _ = send.finish();
}

/// Appends one DeliveryAck frame per conversation to `batch`.
fn push_acks(batch: &mut Vec<Bytes>, acks: std::collections::HashMap<u64, u64>) {
    batch.extend(acks.into_iter().map(|(conversation_id, seq)| {
        encode(&Frame::push(Body::DeliveryAck(proto::DeliveryAck {
            conversation_id,
            seq,
        })))
    }));
}

/// The end of a leaving client's messages stream: the sends still queued,
/// the last delivery acks (none can be queued after these), and the end
/// of the stream, after which the server confirms with `AcksStored` once it
/// has stored the acks (see [`read_loop`]).
async fn finish_messages(
    inner: &Inner,
    (conn, acks_id): (&quinn::Connection, u64),
    mut send: SendStream,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    mut batch: Vec<Bytes>,
) {
    if conn.close_reason().is_some() {
        return;
    }
    while let Ok(frame) = rx.try_recv() {
        batch.push(frame);
    }
    push_acks(&mut batch, inner.acks.seal(acks_id));
    if send.write_all_chunks(&mut batch).await.is_err() {
        write_failed(conn, StreamKind::Messages);
        return;
    }
    let _ = send.finish();
}

/// Reads one stream until it ends. A stream that ends, fails or carries a
/// bad frame while its connection lives closes the connection: nothing
/// would read that stream's replies any more (requests would time out one
/// by one while heartbeats kept the connection up), whereas a closed
/// connection makes the supervisor connect again. That includes the end
/// of the messages stream while leaving, unless `end_confirms` (a server
/// that predates `AcksStored`): only that frame confirms a leave. A
/// stream that ends after the server's connection-level error waits (a
/// little) for the server's close instead, so that its code, not ours,
/// tells the requests waiting why (`ClientError::for_waiting`).
async fn read_loop(
    inner: Arc<Inner>,
    conn: quinn::Connection,
    mut reader: FrameReader,
    (kind, end_confirms): (StreamKind, bool),
) {
    // The server said it is closing the connection (an Error frame with
    // no request): it closes once that frame is read, or a second later.
    let mut closing = false;
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None)
                if end_confirms && kind == StreamKind::Messages && inner.departure.finishing() =>
            {
                // An older server's answer to the end of ours.
                inner.departure.server_finished();
                return;
            }
            Ok(None) | Err(ReadError::Stream) => {
                if closing {
                    let _ = tokio::time::timeout(SERVER_CLOSE_WAIT, conn.closed()).await;
                }
                if conn.close_reason().is_none() {
                    tracing::warn!(stream = kind.name(), "server ended a stream; reconnecting");
                    conn.close(0u32.into(), b"stream ended");
                }
                return;
            }
            Err(ReadError::Frame(e)) => {
                tracing::warn!(stream = kind.name(), error = %e, "bad frame from server; reconnecting");
                conn.close((e.code() as u32).into(), e.to_string().as_bytes());
                return;
            }
        };
        let request_id = frame.request_id;
        match frame.body {
            Some(Body::Deliver(proto::Deliver {
                message: Some(message),
            })) => {
                // While acks cannot leave (the server does not read them),
                // stop reading: flow control then holds the server back.
                tokio::select! {
                    () = inner.acks.room() => {}
                    _ = conn.closed() => return,
                }
                let system = message.r#type == proto::MessageType::System as i32;
                let conversation_id = message.conversation_id;
                inner.hand_over(*message, &conn).await;
                if system {
                    inner.refresh_members(conversation_id);
                }
            }
            Some(Body::SendAck(ack)) => inner.send_answered(request_id, Ok(ack)),
            Some(Body::AcksStored(_))
                if kind == StreamKind::Messages && inner.departure.finishing() =>
            {
                // The server's answer to the end of ours: it has the acks,
                // and ends its side next. Nothing after this is read.
                inner.departure.server_finished();
                return;
            }
            Some(Body::Receipt(receipt)) => {
                inner.note_receipt(&receipt);
                inner.tell_receipt(receipt, &conn).await;
            }
            Some(Body::FriendEvent(event)) => {
                if matches!(
                    event.kind(),
                    proto::friend_event::Kind::Removed
                        | proto::friend_event::Kind::YouRemoved
                        | proto::friend_event::Kind::Blocked
                ) {
                    // The server stopped sending their presence: what the
                    // client knows of it would stay as it is for good.
                    if let Some(user) = &event.user {
                        let gone = user.user_id;
                        inner.unwatch_unless(|id| id != gone);
                    }
                }
                if !inner.emit_once(Event::Friend(event), &conn).await {
                    return;
                }
            }
            // Never waits for room: a moment's news, not worth holding
            // the stream for.
            Some(Body::TypingUpdate(update)) if request_id == 0 => {
                inner.emit_or_drop(Event::Typing(update));
            }
            Some(Body::ConversationChanged(change)) if request_id == 0 => {
                let told = inner
                    .emit_once(Event::ConversationChanged(change), &conn)
                    .await;
                if !told {
                    return;
                }
            }
            Some(Body::PresenceUpdate(update)) => {
                inner.presence_changed(update.states, &conn).await;
            }
            // Call events and signals wait for room like messages: the
            // server holds back behind them.
            Some(Body::CallEvent(event)) if request_id == 0 => {
                inner.emit(Event::Call(event), &conn).await;
            }
            Some(Body::CallSignal(signal)) if request_id == 0 => {
                inner.emit(Event::CallSignal(signal), &conn).await;
            }
            Some(Body::Error(e)) if kind == StreamKind::Messages && request_id != 0 => {
                inner.send_answered(request_id, Err(ClientError::server(&e)));
            }
            Some(Body::Error(e)) if request_id == 0 => {
                closing = true;
                let code = ErrorCode::from_wire(e.code);
                tracing::debug!(stream = kind.name(), %code, message = e.message, "connection-level error from server");
            }
            Some(Body::Error(e)) => inner.answer(request_id, Err(ClientError::server(&e)), &conn),
            Some(body) if request_id != 0 => inner.answer(request_id, Ok(body), &conn),
            Some(body) => tracing::debug!(
                stream = kind.name(),
                frame = body.name(),
                "ignoring unexpected push"
            ),
            // A body this build does not know (a newer server's): a push
            // is skipped; a reply fails its request at once rather than
            // leave it to time out.
            None if request_id != 0 => {
                let error = ClientError::Protocol("a reply this client does not know".into());
                if kind == StreamKind::Messages {
                    inner.send_answered(request_id, Err(error));
                } else {
                    inner.answer(request_id, Err(error), &conn);
                }
            }
            None => {}
        }
    }
}

/// Why a stream could not be read.
pub(crate) enum ReadError {
    /// The bytes are not frames.
    Frame(FrameError),
    /// The stream was reset or the connection ended.
    Stream,
}

/// Decodes frames from a stream with a bounded buffer.
pub(crate) struct FrameReader {
    recv: RecvStream,
    buf: BytesMut,
    codec: Codec,
}

impl FrameReader {
    pub(crate) fn new(recv: RecvStream) -> Self {
        // The server's frames are bounded by the protocol's cap; the client
        // accepts anything up to it.
        FrameReader {
            recv,
            buf: BytesMut::new(),
            codec: Codec::new(chat_protocol::limits::MAX_FRAME_LEN),
        }
    }

    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf).map_err(ReadError::Frame)? {
                return Ok(Some(frame));
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    return self
                        .codec
                        .decode_eof(&mut self.buf)
                        .map_err(ReadError::Frame);
                }
                Err(_) => return Err(ReadError::Stream),
            }
        }
    }
}
