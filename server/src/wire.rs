//! Moving frames over quinn streams: a reader that decodes with a bounded
//! buffer, and a writer task per stream that coalesces queued frames into
//! one write (so several frames share a QUIC packet under load).

use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chat_protocol::{Body, Codec, ErrorCode, Frame, FrameError, StreamKind};
use metrics::Counter;
use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::watch;

use crate::config::Transport;
use crate::hub::SessionHandle;
use crate::metrics::Metrics;

/// Most queued frames written in one go.
const MAX_COALESCE: usize = 128;
/// Most bytes taken from the queue in one go (unless one frame is larger):
/// the frames a writer holds while its peer does not read count against
/// no queue, so they are bounded here.
const MAX_COALESCE_BYTES: usize = 256 * 1024;

/// How long a writer waits for the peer to read a final error frame
/// before closing the connection anyway.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Which message a queued `Deliver` frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliverKey {
    pub conversation: u64,
    pub seq: u64,
    /// The recipient's own message, echoed to their other devices:
    /// catch-up never sends it, so a queue must not let it go counting on
    /// catch-up, nor a writer drop it behind what catch-up sent (see
    /// [`crate::queue`]).
    pub own: bool,
}

/// One encoded frame queued for a stream.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The frame, already length-prefixed.
    pub bytes: Bytes,
    /// For a `Deliver`: its message, so the messages writer can drop what
    /// catch-up already sent.
    pub deliver: Option<DeliverKey>,
    /// Close the connection with this code once the frame is written.
    pub close_after: Option<ErrorCode>,
    /// For an `Error` frame: its code (counted when written).
    pub error: Option<ErrorCode>,
}

// Every queue slot is one: a queue keeps 16 after a burst, and idle
// memory per connection is a target (ARCHITECTURE.md).
#[cfg(target_pointer_width = "64")]
const _: () = assert!(size_of::<Outbound>() == 64);

impl Outbound {
    /// Encodes a frame.
    pub fn frame(frame: &Frame) -> Self {
        let mut buf = BytesMut::with_capacity(chat_protocol::encoded_len(frame));
        chat_protocol::encode(frame, &mut buf);
        let error = match &frame.body {
            Some(Body::Error(e)) => Some(ErrorCode::from_wire(e.code)),
            _ => None,
        };
        Outbound {
            bytes: buf.freeze(),
            deliver: None,
            close_after: None,
            error,
        }
    }

    /// Encodes a frame after which the connection closes with `code`.
    pub fn closing(frame: &Frame, code: ErrorCode) -> Self {
        Outbound {
            close_after: Some(code),
            ..Outbound::frame(frame)
        }
    }
}

/// Why reading a frame stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes were not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream or connection failed.
    #[error("stream: {0}")]
    Stream(#[from] quinn::ReadError),
}

/// Reads frames from a receive stream.
pub struct FrameReader {
    recv: RecvStream,
    buf: BytesMut,
    codec: Codec,
    frames: Option<Counter>,
    handshake: Option<watch::Receiver<bool>>,
}

impl FrameReader {
    /// Wraps a stream; no buffer is allocated until data arrives.
    pub fn new(recv: RecvStream, codec: Codec) -> Self {
        FrameReader {
            recv,
            buf: BytesMut::new(),
            codec,
            frames: None,
            handshake: None,
        }
    }

    /// Counts every frame read into `counter`.
    pub fn count_into(&mut self, counter: Counter) {
        self.frames = Some(counter);
    }

    /// For a connection accepted with 0-RTT: until `handshake` turns true,
    /// a frame that is not replay safe is held back (not refused) until
    /// the handshake completes.
    pub fn guard_early_data(&mut self, handshake: Option<watch::Receiver<bool>>) {
        self.handshake = handshake;
    }

    /// Whether `frame` must wait for the handshake (see
    /// [`guard_early_data`](Self::guard_early_data)).
    fn must_wait(&mut self, frame: &Frame) -> bool {
        let Some(handshake) = &self.handshake else {
            return false;
        };
        if *handshake.borrow() {
            self.handshake = None;
            return false;
        }
        !frame.body.as_ref().is_some_and(Body::is_replay_safe)
    }

    /// Waits until the handshake completes. Boxed by the caller: it is
    /// rare, and inline it would make every reader's future larger for
    /// the connection's whole life.
    async fn wait_for_handshake(&mut self) -> Result<(), ReadError> {
        if let Some(mut handshake) = self.handshake.take()
            && handshake.wait_for(|done| *done).await.is_err()
        {
            // The connection ended before the handshake did: the held
            // frame may be a replay and is dropped with the stream.
            return Err(ReadError::Stream(quinn::ReadError::ZeroRttRejected));
        }
        Ok(())
    }

    /// The next frame, or `None` when the peer finished the stream
    /// cleanly. The buffer never holds more than two maximal frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                if self.buf.is_empty() && self.buf.capacity() > 4 * 1024 {
                    // Do not keep a large buffer on an idle stream.
                    self.buf = BytesMut::new();
                }
                if let Some(frames) = &self.frames {
                    frames.increment(1);
                }
                if self.must_wait(&frame) {
                    Box::pin(self.wait_for_handshake()).await?;
                }
                return Ok(Some(frame));
            }
            match self
                .recv
                .read_chunk(self.codec.max_frame_len(), true)
                .await?
            {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None => return Ok(self.codec.decode_eof(&mut self.buf)?),
            }
        }
    }
}

/// Bytes a peer must take within `write-stall` while writes wait on it.
/// One byte used to be enough to start the timer over, so a client
/// granting a few bytes of credit a minute held a catch-up page (megabytes)
/// for as long as it liked.
const STALL_PROGRESS: usize = 16 * 1024;

/// Writes every chunk to `send`. False if the stream failed, or if the
/// peer took less than [`STALL_PROGRESS`] bytes in `stall` while data was
/// waiting: then the connection is closed with SLOW_CONSUMER (what a full
/// queue does), so a client that stops reading a stream, or reads it a
/// trickle at a time, cannot hold its writer, and the frames it holds, for
/// the life of the connection. The timer is set only when a write has to
/// wait, and a write that does not wait clears it.
///
/// Boxed: the writers are tasks that live as long as their connection,
/// and inline, this future's state (the write, its error, the timer)
/// would size each of them, idle or not. A write allocates it instead.
pub fn write_all_or_stall<'a>(
    conn: &'a quinn::Connection,
    send: &'a mut SendStream,
    chunks: &'a mut [Bytes],
    stall: Duration,
    metrics: &'a Metrics,
) -> Pin<Box<impl Future<Output = bool> + Send + 'a>> {
    Box::pin(async move {
        let mut chunks = chunks;
        // While writes wait: when the peer must have taken STALL_PROGRESS
        // bytes by, and how many it has taken since the timer started.
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut progress = 0;
        while !chunks.is_empty() {
            let written = {
                let mut write = std::pin::pin!(send.write_chunks(chunks));
                let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
                match first {
                    Poll::Ready(result) => {
                        deadline = None;
                        progress = 0;
                        result
                    }
                    Poll::Pending => {
                        let until =
                            *deadline.get_or_insert_with(|| tokio::time::Instant::now() + stall);
                        match tokio::time::timeout_at(until, write).await {
                            Ok(result) => result,
                            Err(_) => {
                                close_counted(
                                    conn,
                                    metrics,
                                    ErrorCode::SlowConsumer,
                                    "client reads too slowly; reconnect",
                                );
                                return false;
                            }
                        }
                    }
                }
            };
            match written {
                Ok(written) => {
                    chunks = &mut chunks[written.chunks..];
                    progress += written.bytes;
                    if progress >= STALL_PROGRESS {
                        deadline = None;
                        progress = 0;
                    }
                }
                Err(quinn::WriteError::Stopped(_)) => {
                    // The peer stopped reading a stream the protocol needs
                    // (every queued stream is a singleton): with the
                    // connection left up, it would look online and have
                    // its sends stored while SendAcks and Delivers went
                    // nowhere. Closed, it reconnects.
                    close_counted(
                        conn,
                        metrics,
                        ErrorCode::BadStream,
                        "a stream the server writes on was stopped; reconnect",
                    );
                    return false;
                }
                Err(_) => return false,
            }
        }
        true
    })
}

/// Closes `conn` with a protocol error code and a short reason.
pub fn close(conn: &quinn::Connection, code: ErrorCode, reason: &str) {
    conn.close(VarInt::from_u32(code as u32), reason.as_bytes());
}

/// [`close`], counting `code` in `chat_errors_total`.
pub fn close_counted(conn: &quinn::Connection, metrics: &Metrics, code: ErrorCode, reason: &str) {
    metrics.error(code);
    close(conn, code, reason);
}

/// A writer's linger: until `linger` has passed or another writer of the
/// connection has written (true), or the connection closed (false).
async fn linger_for(conn: &quinn::Connection, handle: &SessionHandle, linger: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(linger) => true,
        () = handle.wrote().notified() => true,
        _ = conn.closed() => false,
    }
}

/// Drains the `kind` queue of `handle` into `send`, coalescing queued
/// frames, until the queue closes or the stream fails. `filter` may drop
/// frames (used by the messages writer after catch-up). With `linger`, the
/// writer waits up to `receipt-linger` after the first frame of a burst
/// for more to share its packets (receipts: nobody waits on them, and they
/// come in bursts), and stops waiting as soon as another writer of the
/// connection writes: frames handed to quinn together leave in one
/// datagram, so a receipt then rides in the packet of a SendAck or Deliver
/// instead of a packet of its own. A client that takes less than 16 KiB
/// in `write-stall` while writes wait is closed. Frames and errors written are counted in
/// `metrics` under `kind`. (The settings come by reference: each value
/// would be kept in every writer task, idle or not.)
pub async fn write_loop(
    conn: &quinn::Connection,
    send: &mut SendStream,
    handle: &SessionHandle,
    (metrics, kind): (&Metrics, StreamKind),
    (transport, linger): (&Transport, bool),
    mut filter: impl FnMut(&Outbound) -> bool,
) {
    let rx = handle.queue(kind).expect("a queued stream kind");
    loop {
        // Fresh (empty, unallocated) buffers per burst: an idle connection's
        // writers then hold no buffer at all between bursts.
        let mut batch: Vec<Outbound> = Vec::new();
        let mut chunks: Vec<Bytes> = Vec::new();
        // The queue's senders live as long as the session, so also watch the
        // connection: a closed connection must end this task (and release
        // the session), not leave it waiting for frames forever.
        let received = tokio::select! {
            n = rx.recv_many(&mut batch, MAX_COALESCE, MAX_COALESCE_BYTES) => n,
            _ = conn.closed() => return,
        };
        if received == 0 {
            let _ = send.finish();
            return;
        }
        let linger = Some(transport.receipt_linger).filter(|l| linger && !l.is_zero());
        if let Some(linger) = linger
            && batch.iter().all(|o| o.close_after.is_none())
            && batch.len() < MAX_COALESCE
        {
            // Boxed: inline, this wait's state (a timer and two
            // notifications) would size every writer task, idle or not,
            // for the connection's whole life.
            if !Box::pin(linger_for(conn, handle, linger)).await {
                return;
            }
            while batch.len() < MAX_COALESCE {
                match rx.try_recv() {
                    Some(out) => batch.push(out),
                    None => break,
                }
            }
        }
        let mut close_code = None;
        for out in batch.drain(..) {
            if !filter(&out) {
                continue;
            }
            if let Some(code) = out.error {
                metrics.error(code);
            }
            chunks.push(out.bytes);
            if out.close_after.is_some() {
                close_code = out.close_after;
                break;
            }
        }
        let written = chunks.len() as u64;
        if !write_all_or_stall(conn, send, &mut chunks, transport.write_stall, metrics).await {
            return;
        }
        metrics.frames_out(kind).increment(written);
        // Wakes a lingering writer of this connection only after quinn holds
        // these frames, so both sets are pending when its driver next builds
        // a packet.
        handle.wrote().notify_waiters();
        if let Some(code) = close_code {
            let _ = send.finish();
            let _ = tokio::time::timeout(CLOSE_LINGER, send.stopped()).await;
            close(conn, code, code.as_str_name());
            return;
        }
    }
}
