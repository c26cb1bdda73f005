//! The receipts stream: MarkSeen and Typing from the client; Receipt and
//! TypingUpdate pushes to it.
//!
//! When the stream opens, the writer first sends the current watermarks of
//! the other members in the user's recent conversations, so receipts that
//! happened while the user was offline arrive on reconnect; groups larger
//! than `receipt-broadcast-max-members` are left out, as their moves are
//! not broadcast live either. The queue
//! takes pushes before that snapshot is read, so a receipt made meanwhile
//! comes in one or both; receipts carry absolute watermarks, so replaying
//! one is harmless.

use std::sync::Arc;

use chat_protocol::{Body, ErrorCode, Frame, StreamKind, proto};
use quinn::SendStream;
use tokio::sync::{Semaphore, mpsc};

use crate::delivery::{MarkJob, MarkReply};
use crate::error::Refusal;
use crate::hub::SessionHandle;
use crate::session::{Session, on_read_error};
use crate::store::{WatermarkKind, WatermarkUpdate};
use crate::wire::{self, FrameReader, Outbound};

/// Conversations covered by the snapshot sent when the stream opens.
const SNAPSHOT_CONVERSATIONS: u32 = 200;

/// MarkSeen frames of one connection that may wait for their answers. The
/// reader stops beyond it (and QUIC flow control holds the client back).
/// A slot is given back once the answer is queued, and queued answers may
/// wait out the receipts linger, so the receipts queue is sized for bursts
/// ([`crate::hub::RECEIPTS_QUEUE_CAPACITY`]): pipelining a thousand marks
/// is not being a slow consumer.
const MAX_UNANSWERED_MARKS: usize = 256;

/// Serves the receipts stream until it or the connection ends.
pub async fn serve(session: Arc<Session>, send: SendStream, mut reader: FrameReader) {
    let authed = session.authed().expect("authenticated before data streams");
    let Some(queue) = session.outbound(StreamKind::Receipts) else {
        return;
    };
    queue.open(StreamKind::Receipts);
    tokio::spawn(writer(session.clone(), send, queue));
    let handle = authed.handle.clone();
    // Made at the first mark: most connections never send one.
    let mut unanswered: Option<Arc<Semaphore>> = None;
    // Made at the first Typing, which its own task passes on, so that a
    // mark behind it does not wait for its store read.
    let mut typist: Option<mpsc::Sender<(u64, proto::Typing)>> = None;
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => return on_read_error(&session, StreamKind::Receipts, e),
        };
        handle.touch(super::now_ms());
        let request_id = frame.request_id;
        let result = match frame.body {
            Some(Body::MarkSeen(mark)) => {
                let update = WatermarkUpdate {
                    conversation_id: mark.conversation_id,
                    user_id: authed.user_id,
                    kind: WatermarkKind::Seen,
                    seq: mark.seq,
                };
                // Boxed: inline, the wait for a slot and for the committer's
                // queue would size this task, which lives as long as the
                // connection; a mark allocates it instead.
                Box::pin(mark_seen(
                    &session,
                    &handle,
                    &mut unanswered,
                    request_id,
                    update,
                ))
                .await
            }
            Some(Body::Typing(typing)) => charge_typing(&session).map(|()| {
                let typist = typist.get_or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(TYPING_QUEUE);
                    tokio::spawn(typist_task(session.clone(), handle.clone(), rx));
                    tx
                });
                // A store too slow for a dozen: this one is not worth the
                // wait (the next repeat comes in 3 s).
                if typist.try_send((request_id, typing)).is_err() {
                    tracing::debug!(
                        conn_id = handle.conn_id,
                        "typing dropped: its queue is full"
                    );
                }
            }),
            Some(other) => Err(Refusal::new(
                ErrorCode::UnexpectedFrame,
                format!("{} does not belong on the receipts stream", other.name()),
            )),
            None => Err(Refusal::new(ErrorCode::MalformedFrame, "empty frame")),
        };
        if let Err(refusal) = result {
            handle.push(
                StreamKind::Receipts,
                Outbound::frame(&refusal.to_frame(request_id)),
            );
        }
    }
}

/// Queues a MarkSeen for the watermark committer, once it is charged to
/// the user's mark bucket (`mark-rate`) and the connection has a free
/// slot for its answer.
async fn mark_seen(
    session: &Session,
    handle: &Arc<SessionHandle>,
    unanswered: &mut Option<Arc<Semaphore>>,
    request_id: u64,
    update: WatermarkUpdate,
) -> Result<(), Refusal> {
    let rate = session.shared.config.limits.mark_rate;
    super::control::charge(session, &session.shared.mark_limiter, |wait| {
        format!("over {rate} MarkSeen per second; retry in {wait} ms")
    })?;
    super::messages::acked_in_foreground(
        session,
        handle,
        (update.conversation_id, update.seq),
        true,
    );
    let slot = unanswered
        .get_or_insert_with(|| Arc::new(Semaphore::new(MAX_UNANSWERED_MARKS)))
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    // Membership is checked by the watermark committer, and only when the
    // mark moved nothing (a legitimate client's marks usually move): no
    // extra store call per mark.
    session
        .shared
        .delivery
        .mark(MarkJob {
            update,
            reply: Some(Box::new(MarkReply {
                request_id,
                session: handle.clone(),
                slot,
            })),
        })
        .await
}

/// Typing frames of one connection waiting for their store read; beyond
/// them one is dropped.
const TYPING_QUEUE: usize = 16;

/// Takes a token from the user's typing bucket.
fn charge_typing(session: &Session) -> Result<(), Refusal> {
    let rate = session.shared.config.limits.typing_rate;
    super::control::charge(session, &session.shared.typing_limiter, |wait| {
        format!("over {rate} Typing per second; retry in {wait} ms")
    })
}

/// Passes a connection's Typing frames on in order (a stop never overtakes
/// its start), answering refusals with their request ids.
async fn typist_task(
    session: Arc<Session>,
    handle: Arc<SessionHandle>,
    mut typing: mpsc::Receiver<(u64, proto::Typing)>,
) {
    while let Some((request_id, typing)) = typing.recv().await {
        if let Err(refusal) = pass_on_typing(&session, typing).await {
            handle.push(
                StreamKind::Receipts,
                Outbound::frame(&refusal.to_frame(request_id)),
            );
        }
    }
}

/// Passes a Typing on to the other members' connected devices if the user
/// may send in its conversation. Offered, not pushed: a device short of
/// room misses it, and is not closed for it.
async fn pass_on_typing(session: &Session, typing: proto::Typing) -> Result<(), Refusal> {
    let me = session.authed().expect("authenticated").user_id;
    let members = session
        .shared
        .store
        .audience(typing.conversation_id, me)
        .await?;
    let update = Outbound::frame(&Frame::push(Body::TypingUpdate(proto::TypingUpdate {
        conversation_id: typing.conversation_id,
        user_id: me,
        typing: typing.typing,
    })));
    let hub = &session.shared.hub;
    let told: usize = members
        .iter()
        .filter(|&&member| member != me)
        .map(|&member| hub.offer(member, StreamKind::Receipts, &update))
        .sum();
    session.shared.metrics.typing_updates.increment(told as u64);
    Ok(())
}

async fn writer(session: Arc<Session>, mut send: SendStream, queue: Arc<SessionHandle>) {
    let authed = session.authed().expect("authenticated");
    match session
        .shared
        .store
        .receipt_snapshot(
            authed.user_id,
            SNAPSHOT_CONVERSATIONS,
            u32::try_from(session.shared.config.limits.receipt_broadcast_max_members)
                .unwrap_or(u32::MAX),
        )
        .await
    {
        Ok(receipts) => {
            let mut buf = bytes::BytesMut::new();
            for receipt in receipts
                .into_iter()
                .filter(|r| r.delivered_seq > 0 || r.seen_seq > 0)
            {
                chat_protocol::encode(&Frame::push(Body::Receipt(receipt)), &mut buf);
            }
            let stall = session.shared.config.transport.write_stall;
            let metrics = &session.shared.metrics;
            let mut chunks = [buf.freeze()];
            if !chunks[0].is_empty()
                && !wire::write_all_or_stall(&session.conn, &mut send, &mut chunks, stall, metrics)
                    .await
            {
                return;
            }
        }
        Err(e) => tracing::warn!(
            conn_id = session.conn_id,
            user_id = authed.user_id,
            error = %e,
            "receipt snapshot failed"
        ),
    }
    wire::write_loop(
        &session.conn,
        &mut send,
        &queue,
        (&*session.shared.metrics, StreamKind::Receipts),
        // Receipts are status marks, not messages: a short wait (20 ms by
        // default) is invisible to a person and cuts packets when many
        // arrive together or a message frame is about to leave anyway.
        (&session.shared.config.transport, true),
        |_| true,
    )
    .await;
}
