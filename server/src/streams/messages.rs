//! The messages stream: Send and DeliveryAck from the client; SendAck and
//! Deliver to it.
//!
//! When the stream opens, the writer first streams everything above the
//! user's delivered watermarks (catch-up, in pages, in seq order per
//! conversation), then the live queue. The queue took pushes before
//! catch-up began, so a message committed in between is in both; the
//! writer drops the live copy by remembering the last seq sent per
//! conversation. (A queue that overflowed before its stream opened keeps
//! nothing from then until the opening: see [`crate::queue`].) Result:
//! each connection sees each conversation in increasing seq order, but
//! for the echo of the user's own send from another device: catch-up
//! writes those the queue holds in their place when it reads their range
//! from history (and the writer drops the queued copy); one it did not is
//! written after what catch-up sent, and client-lib, which keeps a window
//! of 256 seqs below the highest, takes it.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use chat_protocol::limits::{MAX_CLIENT_MSG_ID_LEN, MAX_REACTION_LEN, is_reaction};
use chat_protocol::media::is_media_id;
use chat_protocol::{Body, ErrorCode, Frame, StreamKind, proto};
use quinn::SendStream;

use super::now_ms;
use crate::delivery::{MarkJob, SendJob, Work};
use crate::error::{Refusal, retry_after_ms};
use crate::hub::SessionHandle;
use crate::queue::Missed;
use crate::session::{Session, on_read_error};
use crate::store::{
    Direction, INBOX_CATCH_UP_LIMIT, NewMessage, Referable, Reference, StoreError, UserId,
    WatermarkKind, WatermarkUpdate, may_rewrite,
};
use crate::wire::{self, DeliverKey, FrameReader, Outbound};

/// Messages fetched per catch-up page.
const CATCH_UP_PAGE: u32 = 256;
/// DeliveryAcks a user's connections may send beyond the Deliver frames
/// written to them, refilled over a minute (`Shared::ack_limiter`). An ack
/// costs the store work even when it moves nothing (a conversation the
/// user is not in is looked up, a departure touched), and a flood of them
/// would fill the watermark committer's queue that every session's acks
/// wait on; so acks are bounded by what was delivered. The slack covers
/// acks of messages delivered on a device's previous connection:
/// client-lib carries the acks of up to 1,024 conversations plus what its
/// app takes meanwhile (its event queue holds 4,096 by default) to the
/// next connection, and what a lost connection wrote in its last moments.
/// Per user, not per connection: each new connection had
/// a slack of its own, so a client resuming in a loop sent 8,192 acks of
/// made-up conversations on every one.
pub const ACK_SLACK: u64 = 8_192;

/// Unearned acks a user gets back per second: the slack over a minute.
pub const ACK_SLACK_REFILL: u32 = (ACK_SLACK / 60) as u32;

/// Most acks a connection may have earned and not spent. Deliveries earn
/// acks only up to it, since client-lib acks a conversation's newest
/// message at most every `delivery-ack-linger`, so an honest connection
/// spends far fewer than it is delivered; uncapped, one that read a busy
/// group for an hour without acking would bank tens of thousands to spend
/// at once on conversations it is not in. Twice the slack: a device back
/// to a catch-up of thousands of conversations acks one each, after the
/// carried acks have taken the user's slack.
const MAX_ACK_CREDITS: u64 = 2 * ACK_SLACK;

/// Earns `n` acks, up to [`MAX_ACK_CREDITS`].
fn earn_acks(credits: &AtomicU64, n: u64) {
    let _ = credits.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
        Some(c.saturating_add(n).min(MAX_ACK_CREDITS))
    });
}

/// Whether one more DeliveryAck may go to the store: one the connection
/// earned, else one of the user's slack.
fn take_ack(
    credits: &AtomicU64,
    slack: &crate::ratelimit::RateLimiter,
    user: u64,
    now: Instant,
) -> bool {
    credits
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1))
        .is_ok()
        || slack.check(user, now).is_ok()
}

/// Serves the messages stream until it or the connection ends.
pub async fn serve(session: Arc<Session>, send: SendStream, mut reader: FrameReader) {
    let authed = session.authed().expect("authenticated before data streams");
    let Some(queue) = session.outbound(StreamKind::Messages) else {
        return;
    };
    // Acks this connection earned: one per Deliver the writer writes,
    // never more than `MAX_ACK_CREDITS` in hand; beyond them, the user's
    // slack.
    let credits = Arc::new(AtomicU64::new(0));
    queue.open_for_catch_up(StreamKind::Messages);
    tokio::spawn(writer(session.clone(), send, queue, credits.clone()));
    let handle = authed.handle.clone();
    let delivery = session.shared.delivery.clone();
    let metrics = session.shared.metrics.clone();
    // Once a send is rate limited, every later send on this connection is
    // refused until that send comes back, so none can overtake it.
    let mut limited: Option<Limited> = None;
    // Whether an ack was dropped for want of credit (then a leaving client
    // gets no confirmation: see `leave`).
    let mut ignored = false;
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            // Out of the loop before awaiting anything: this match's
            // awaited read stays alive to its end, so an await in an arm
            // would size every reader for both (200 bytes a connection,
            // measured).
            Ok(None) => break,
            Err(e) => return on_read_error(&session, StreamKind::Messages, e),
        };
        handle.touch(now_ms());
        let request_id = frame.request_id;
        let result = match frame.body {
            // Photos, replies, reactions, edits and unsends take a path of
            // their own, boxed (see `send_looked_up`).
            Some(Body::Send(send))
                if send.r#type == proto::MessageType::Photo as i32 || send.reply_to_seq != 0 =>
            {
                metrics.sends.increment(1);
                send_looked_up(&session, &mut limited, send, request_id, &handle).await
            }
            Some(Body::Send(send)) => {
                let received = Instant::now();
                metrics.sends.increment(1);
                match rate_limit(&session, &mut limited, &send.client_msg_id, received)
                    .and_then(|()| validate(&session, send))
                    .map(|(message, _)| message)
                {
                    Ok(message) => {
                        delivery
                            .submit(SendJob {
                                work: Work::Message(message),
                                request_id,
                                session: handle.clone(),
                                received,
                            })
                            .await
                    }
                    Err(refusal) => Err(refusal),
                }
            }
            Some(Body::DeliveryAck(_))
                if !take_ack(
                    &credits,
                    &session.shared.ack_limiter,
                    authed.user_id,
                    Instant::now(),
                ) =>
            {
                metrics.acks_ignored.increment(1);
                ignored = true;
                Ok(())
            }
            Some(Body::DeliveryAck(ack)) => {
                acked_in_foreground(&session, &handle, (ack.conversation_id, ack.seq), false);
                let update = WatermarkUpdate {
                    conversation_id: ack.conversation_id,
                    user_id: authed.user_id,
                    kind: WatermarkKind::Delivered,
                    seq: ack.seq,
                };
                delivery
                    .mark(MarkJob {
                        update,
                        reply: None,
                    })
                    .await
            }
            Some(other) => Err(Refusal::new(
                ErrorCode::UnexpectedFrame,
                format!("{} does not belong on the messages stream", other.name()),
            )),
            None => Err(Refusal::new(ErrorCode::MalformedFrame, "empty frame")),
        };
        if let Err(refusal) = result {
            handle.push(
                StreamKind::Messages,
                Outbound::frame(&refusal.to_frame(request_id)),
            );
        }
    }
    leave(&session, &handle, ignored).await;
}

/// The client finished its side of the stream: it is leaving
/// (client-lib's `Client::shutdown`) and will send nothing more here. Once
/// every delivery ack it sent is stored, `AcksStored` is queued after the
/// frames already queued (however many) and this side ends: the client
/// learns from that frame that the server has its acks, and closes the
/// connection. (The frame, not the end, confirms: a writer that gives up
/// drops its stream, which quinn ends cleanly. A client that did not ask
/// for the frame, `confirm_leave`, gets the end alone, as before the frame
/// existed: `Session::confirm_leave`.) Frames queued after it are not
/// written:
/// deliveries stay above the watermark and come on the next connection,
/// and the SendAck of a send still being committed is lost, so its client
/// resends it and gets a duplicate's ack (client-lib leaves only once its
/// sends are answered). No confirmation (the client's shutdown times out)
/// if any of its acks was dropped: for want of credit (`ignored`) or by
/// the store (`flush_marks` fails, or any ack was lost on the node since
/// the connection came: see `Delivery::acks_lost`).
///
/// Boxed: the reader lives as long as its connection, and is sized for its
/// largest state (see ARCHITECTURE.md, idle memory).
fn leave<'a>(
    session: &'a Session,
    queue: &'a SessionHandle,
    ignored: bool,
) -> Pin<Box<impl Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        if ignored {
            return;
        }
        let flushed = tokio::select! {
            flushed = session.shared.delivery.flush_marks() => flushed,
            _ = session.conn.closed() => return,
        };
        let Some(queue) = queue.queue(StreamKind::Messages) else {
            return;
        };
        let delivery = &session.shared.delivery;
        if flushed.is_ok() && delivery.acks_lost() == session.acks_lost_before {
            if session.confirm_leave.load(Ordering::Relaxed) {
                let stored = Frame::push(Body::AcksStored(proto::AcksStored {}));
                queue.close_with(Outbound::frame(&stored));
            } else {
                queue.close();
            }
        }
    })
}

/// A connection whose sends are held back after a refusal it will retry:
/// over the send rate, or the store could not bind a photo send's upload
/// or look up what a reply, a reaction or an edit names for now.
struct Limited {
    /// The retry time given with the first refusal (for a store's, the
    /// refusal's time: the hold only waits for it to come back).
    until: Instant,
    /// The `client_msg_id` of that first refused send.
    head: String,
}

/// How long past its retry time a connection waits for the refused send
/// to come back before giving up on it (a client may drop a message).
const HEAD_GRACE: Duration = Duration::from_secs(10);

/// Applies the per-user send rate, and the hold of an earlier refusal.
///
/// A refusal must not let a later send overtake the refused one. A client
/// only learns of the refusal a round trip later, and sends made in that
/// window may arrive after the retry time; so after a refusal every send
/// is refused until the refused one (`head`) is sent again, and the
/// client resends from its earliest refused send, in order. Only if the
/// head does not come back within [`HEAD_GRACE`] of the retry time is the
/// hold dropped.
fn rate_limit(
    session: &Session,
    limited: &mut Option<Limited>,
    client_msg_id: &str,
    now: Instant,
) -> Result<(), Refusal> {
    let over_rate = |wait: Duration| {
        Refusal::new(
            ErrorCode::RateLimited,
            format!(
                "over {} sends per second; retry in {} ms",
                session.shared.config.limits.send_rate,
                retry_after_ms(wait)
            ),
        )
        .with_retry_after(wait)
    };
    match limited {
        Some(hold) if hold.until > now => Err(over_rate(hold.until - now)),
        Some(hold) if hold.head != client_msg_id && now < hold.until + HEAD_GRACE => {
            Err(Refusal::new(
                ErrorCode::RateLimited,
                "an earlier send was refused; send it again first",
            )
            .with_retry_after(Duration::from_millis(1)))
        }
        _ => {
            *limited = None;
            let user = session.authed().expect("authenticated").user_id;
            session
                .shared
                .send_limiter
                .check(user, now)
                .map_err(|wait| {
                    *limited = Some(Limited {
                        until: now + wait,
                        head: client_msg_id.to_owned(),
                    });
                    over_rate(wait)
                })
        }
    }
}

/// A send that needs the store before its commit: checked as a text is,
/// then the message a reply, a reaction or an edit names looked up
/// (`check_reference`), then a photo's upload bound to its conversation
/// and put in the message (`HistoryStore::attach_media`), then committed
/// as a text is. The reader waits for all of it, so a connection's sends
/// keep their order.
///
/// Boxed, and kept apart from the text path: these sends are rarer, and
/// the reader lives as long as its connection, sized for its largest
/// state (see ARCHITECTURE.md, idle memory): inline, the photo's part
/// alone made every messages reader 312 bytes larger (measured).
fn send_looked_up<'a>(
    session: &'a Session,
    limited: &'a mut Option<Limited>,
    send: proto::Send,
    request_id: u64,
    handle: &'a Arc<SessionHandle>,
) -> Pin<Box<impl Future<Output = Result<(), Refusal>> + Send + 'a>> {
    Box::pin(async move {
        let received = Instant::now();
        rate_limit(session, limited, &send.client_msg_id, received)?;
        let (mut message, media_id) = validate(session, send)?;
        message.notify_only = check_reference(session, limited, &message).await?;
        if let Some(media_id) = media_id {
            attach_photo(session, limited, &mut message, &media_id).await?;
        }
        session
            .shared
            .delivery
            .submit(SendJob {
                work: Work::Message(message),
                request_id,
                session: handle.clone(),
                received,
            })
            .await
    })
}

/// Binds a photo send's upload to its conversation and puts it in the
/// message.
async fn attach_photo(
    session: &Session,
    limited: &mut Option<Limited>,
    message: &mut NewMessage,
    media_id: &str,
) -> Result<(), Refusal> {
    let media = session
        .shared
        .store
        .attach_media(
            media_id,
            message.sender_id,
            message.conversation_id,
            message.now_ms,
        )
        .await
        .map_err(|e| {
            let refusal = match e {
                StoreError::NotFound => {
                    Refusal::new(ErrorCode::NotFound, "no photo of yours has this media_id")
                }
                e => Refusal::from(e),
            };
            // The client sends it again, first: until then later sends
            // are held, as after a rate-limit refusal, so none
            // overtakes it.
            if refusal.code.is_retryable() {
                *limited = Some(Limited {
                    // From the refusal, not the send's arrival: a slow
                    // store may take longer than the grace to fail.
                    until: Instant::now(),
                    head: message.client_msg_id.clone(),
                });
            }
            refusal
        })?;
    // The caption and the preview share the text limit, so the
    // message fits in a frame.
    let max = session.shared.config.limits.max_text_len;
    if message.text.len() + media.preview.len() > max {
        return Err(Refusal::new(
            ErrorCode::MessageTooLarge,
            format!(
                "the caption ({} bytes) and the photo's preview ({} bytes) exceed {max} bytes together",
                message.text.len(),
                media.preview.len()
            ),
        ));
    }
    message.photo = Some(Box::new(media.photo()));
    Ok(())
}

/// Checks the message a reply, a reaction, an edit or an unsend names
/// (`HistoryStore::reference`): NOT_FOUND for a seq the sender may not
/// read or a message unsent, INVALID_ARGUMENT for a message that takes
/// none of them (or, for an edit or an unsend, `check_rewrite`'s
/// refusals). Returns whom a
/// reaction notifies: the author of the message reacted to, unless it is
/// the sender's own or a take-back (empty text).
///
/// A retry (its key stored) passes, whatever it names now: the append
/// answers it as the first time. A sender who is not a member is refused
/// here (a retry of theirs was recognised first): passed on, they could be
/// added back before the append and edit or unsend what they may not. A
/// lookup the store could not make now holds later sends back until this
/// one comes again, as a photo's does.
async fn check_reference(
    session: &Session,
    limited: &mut Option<Limited>,
    message: &NewMessage,
) -> Result<Option<UserId>, Refusal> {
    let seq = message.reply_to_seq;
    if seq == 0 {
        return Ok(None);
    }
    let found = session
        .shared
        .store
        .reference(
            message.conversation_id,
            message.sender_id,
            seq,
            message.client_msg_id.clone(),
        )
        .await;
    let target = match found {
        Ok(Reference::Readable(target)) => target,
        Ok(Reference::Unreadable) => {
            return Err(Refusal::new(
                ErrorCode::NotFound,
                format!("no message {seq} you may read in this conversation"),
            ));
        }
        Ok(Reference::Retry) => return Ok(None),
        Err(e) => {
            let refusal = Refusal::from(e);
            if refusal.code.is_retryable() {
                *limited = Some(Limited {
                    until: Instant::now(),
                    head: message.client_msg_id.clone(),
                });
            }
            return Err(refusal);
        }
    };
    // Its content is gone: nothing more may name it (the append checks
    // again for an edit or an unsend, which an unsend racing them must
    // not leave behind).
    if target.unsent {
        return Err(Refusal::new(
            ErrorCode::NotFound,
            format!("message {seq} was unsent"),
        ));
    }
    if matches!(
        message.message_type,
        proto::MessageType::Edit | proto::MessageType::Unsend
    ) {
        check_rewrite(session, message, &target)?;
        return Ok(None);
    }
    if !matches!(
        target.message_type,
        proto::MessageType::Text | proto::MessageType::Photo
    ) {
        return Err(Refusal::new(
            ErrorCode::InvalidArgument,
            format!("message {seq} takes no replies or reactions: only texts and photos do"),
        ));
    }
    let reaction = message.message_type == proto::MessageType::Reaction && !message.text.is_empty();
    Ok((reaction && target.sender_id != message.sender_id).then_some(target.sender_id))
}

/// An edit's or an unsend's own rules, past the reference's: the
/// sender's own message of a type they may rewrite (`store::may_rewrite`,
/// which the append checks again: a text for an edit, a text or photo for
/// an unsend), within `edit-window` or `unsend-window` of its sending (by
/// the server's clock, which stamped both).
fn check_rewrite(session: &Session, send: &NewMessage, target: &Referable) -> Result<(), Refusal> {
    let limits = &session.shared.config.limits;
    let (what, done, mine, window) = match send.message_type {
        proto::MessageType::Edit => ("edit", "edited", "a text", limits.edit_window),
        _ => ("unsend", "unsent", "a text or photo", limits.unsend_window),
    };
    let seq = send.reply_to_seq;
    if !may_rewrite(send, target.sender_id, target.message_type as i32) {
        return Err(Refusal::new(
            ErrorCode::InvalidArgument,
            format!("message {seq} is not {mine} of yours: only those may be {done}"),
        ));
    }
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    if send.now_ms > target.sent_at_ms.saturating_add(window_ms) {
        return Err(Refusal::new(
            ErrorCode::InvalidArgument,
            format!(
                "message {seq} was sent more than {} ago: too late to {what}",
                humantime::format_duration(window)
            ),
        ));
    }
    Ok(())
}

/// Checks a Send against the protocol and the configured limits; for a
/// photo, also returns the media id it names.
fn validate(session: &Session, send: proto::Send) -> Result<(NewMessage, Option<String>), Refusal> {
    let authed = session.authed().expect("authenticated");
    let limits = &session.shared.config.limits;
    if send.client_msg_id.is_empty() || send.client_msg_id.len() > MAX_CLIENT_MSG_ID_LEN {
        return Err(Refusal::new(
            ErrorCode::InvalidArgument,
            format!("client_msg_id must be 1-{MAX_CLIENT_MSG_ID_LEN} bytes"),
        ));
    }
    if send.conversation_id == 0 {
        return Err(Refusal::new(
            ErrorCode::InvalidArgument,
            "conversation_id is required",
        ));
    }
    // Valid UTF-8, but Postgres cannot store U+0000 in TEXT: it would fail
    // the whole group commit, refusing everyone else's sends in the batch.
    // Refused on every backend, so they all accept the same messages.
    if send.text.contains('\0') || send.client_msg_id.contains('\0') {
        return Err(Refusal::new(
            ErrorCode::InvalidArgument,
            "text and client_msg_id must not contain U+0000",
        ));
    }
    let (message_type, media_id) = match proto::MessageType::try_from(send.r#type) {
        Ok(proto::MessageType::Text) if send.media_id.is_empty() => {
            (proto::MessageType::Text, None)
        }
        Ok(proto::MessageType::Text) => {
            return Err(Refusal::new(
                ErrorCode::InvalidArgument,
                "a TEXT message carries no media_id",
            ));
        }
        Ok(proto::MessageType::Photo) if is_media_id(&send.media_id) => {
            (proto::MessageType::Photo, Some(send.media_id))
        }
        Ok(proto::MessageType::Photo) => {
            return Err(Refusal::new(
                ErrorCode::InvalidArgument,
                "a PHOTO message needs the media_id of an upload (32 lowercase hex digits)",
            ));
        }
        Ok(proto::MessageType::Reaction) if send.reply_to_seq == 0 => {
            return Err(Refusal::new(
                ErrorCode::InvalidArgument,
                "a REACTION names the message reacted to (reply_to_seq)",
            ));
        }
        Ok(proto::MessageType::Reaction) if !send.media_id.is_empty() => {
            return Err(Refusal::new(
                ErrorCode::InvalidArgument,
                "a REACTION carries no media_id",
            ));
        }
        Ok(proto::MessageType::Edit) if send.reply_to_seq == 0 || !send.media_id.is_empty() => {
            return Err(Refusal::new(
                ErrorCode::InvalidArgument,
                "an EDIT names the text it edits (reply_to_seq) and carries no media_id",
            ));
        }
        // Before the store is asked anything.
        Ok(proto::MessageType::Edit) if limits.edit_window.is_zero() => {
            return Err(Refusal::new(
                ErrorCode::InvalidArgument,
                "this server takes no edits (edit-window 0s)",
            ));
        }
        Ok(proto::MessageType::Edit) => (proto::MessageType::Edit, None),
        Ok(proto::MessageType::Unsend)
            if send.reply_to_seq == 0 || !send.media_id.is_empty() || !send.text.is_empty() =>
        {
            return Err(Refusal::new(
                ErrorCode::InvalidArgument,
                "an UNSEND names the message it withdraws (reply_to_seq) and carries no text or media_id",
            ));
        }
        Ok(proto::MessageType::Unsend) if limits.unsend_window.is_zero() => {
            return Err(Refusal::new(
                ErrorCode::InvalidArgument,
                "this server takes no unsends (unsend-window 0s)",
            ));
        }
        Ok(proto::MessageType::Unsend) => (proto::MessageType::Unsend, None),
        Ok(proto::MessageType::Reaction) => {
            if !is_reaction(&send.text) {
                return Err(Refusal::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "a reaction is an emoji of at most {MAX_REACTION_LEN} bytes, without spaces, control or bidirectional formatting characters (empty to take it back)"
                    ),
                ));
            }
            (proto::MessageType::Reaction, None)
        }
        _ => {
            return Err(Refusal::new(
                ErrorCode::InvalidArgument,
                "clients may send TEXT, PHOTO, REACTION, EDIT and UNSEND messages only",
            ));
        }
    };
    // A photo's caption may be empty; an edit's new text may not.
    let texts = matches!(
        message_type,
        proto::MessageType::Text | proto::MessageType::Edit
    );
    if texts && send.text.trim().is_empty() {
        return Err(Refusal::new(
            ErrorCode::EmptyMessage,
            "message text is empty",
        ));
    }
    if send.text.len() > limits.max_text_len {
        return Err(Refusal::new(
            ErrorCode::MessageTooLarge,
            format!(
                "text is {} bytes; the limit is {}",
                send.text.len(),
                limits.max_text_len
            ),
        ));
    }
    let message = NewMessage {
        conversation_id: send.conversation_id,
        sender_id: authed.user_id,
        client_msg_id: send.client_msg_id,
        message_type,
        text: send.text,
        photo: None,
        call: None,
        reply_to_seq: send.reply_to_seq,
        notify_only: None,
        now_ms: now_ms(),
    };
    Ok((message, media_id))
}

async fn writer(
    session: Arc<Session>,
    mut send: SendStream,
    queue: Arc<SessionHandle>,
    credits: Arc<AtomicU64>,
) {
    // Passes until one ends without the queue letting go of live messages
    // (see `crate::queue`); each sends only what the ones before did not.
    let mut sent = HashMap::new();
    // The user's own messages from other devices, held in the queue, that
    // a pass wrote in their place: the queued copy is a repeat.
    let mut echoes_sent = HashSet::new();
    // Scoped to the passes: the writer lives as long as the connection.
    {
        let mut missed = Missed::new();
        loop {
            // Boxed: this task lives as long as the connection, and the
            // catch-up's state would otherwise size it for good.
            let pass = catch_up(
                &session,
                &queue,
                &mut send,
                &credits,
                (&mut sent, &mut echoes_sent),
                &missed,
            );
            if !Box::pin(pass).await {
                return;
            }
            match queue.finish_catch_up(StreamKind::Messages) {
                Ok(()) => break,
                Err(let_go) => missed = let_go,
            }
            session.shared.metrics.catch_up_repeats.increment(1);
        }
    }
    wire::write_loop(
        &session.conn,
        &mut send,
        &queue,
        (&*session.shared.metrics, StreamKind::Messages),
        (&session.shared.config.transport, false),
        |out| {
            let write = match out.deliver {
                Some(DeliverKey {
                    conversation,
                    seq,
                    own,
                    ..
                }) if !sent.is_empty() => match sent.get(&conversation) {
                    // The user's own message from another device is no
                    // repeat unless a pass wrote it in its place, and
                    // client-lib takes it below what it has (within 256):
                    // written, or the device would see it only in history.
                    Some(&last) if seq <= last => own && !echoes_sent.remove(&(conversation, seq)),
                    _ => {
                        sent.remove(&conversation);
                        true
                    }
                },
                _ => true,
            };
            if write && out.deliver.is_some() {
                earn_acks(&credits, 1);
            }
            write
        },
    )
    .await;
}

/// Streams the live messages the queue let go (`missed`, from history:
/// another device of the user may have acked them meanwhile, moving the
/// watermark past them), then undelivered messages, but those `sent` has
/// (the last seq sent per conversation, which it updates); false if the
/// stream failed.
async fn catch_up(
    session: &Session,
    queue: &SessionHandle,
    send: &mut SendStream,
    credits: &AtomicU64,
    (sent, echoes_sent): (&mut HashMap<u64, u64>, &mut HashSet<(u64, u64)>),
    missed: &Missed,
) -> bool {
    let authed = session.authed().expect("authenticated");
    let store = &session.shared.store;
    let user = authed.user_id;
    // The user's own messages from other devices the queue holds: read
    // from history in their place, rather than left to come after later
    // ones of their conversation (client-lib drops one that far behind).
    let held_own = queue.held_own(StreamKind::Messages);
    let mut own = Own {
        user,
        held: &held_own,
        written: echoes_sent,
    };
    for (&conversation, &(lowest, highest)) in missed {
        // Not what was sent already, nor, for a member removed and added
        // again meanwhile, what came between.
        let joined = match store.membership(conversation, user).await {
            Ok(Some(membership)) => membership.joined_seq,
            // Removed since: what they were owed up to the removal comes
            // with their departure's pending range.
            Ok(None) => continue,
            Err(e) => return catch_up_failed(session, &e),
        };
        let after_sent = sent.get(&conversation).map_or(0, |&s| s + 1);
        let range = (lowest.max(after_sent).max(joined), highest);
        // Without the user's own, as the rest of catch-up (one sent from
        // this device came back to it as a new message after its SendAck),
        // but those from other devices the queue holds.
        if !write_range(
            session,
            send,
            credits,
            sent,
            conversation,
            range,
            Some(&mut own),
        )
        .await
        {
            return false;
        }
    }
    // Messages the queue holds (pushed before the stream opened, or kept
    // during an earlier pass), which catch-up must not pass in their
    // conversations: another device of the user may have acked them.
    let held = queue.held_deliveries(StreamKind::Messages);
    let metrics = &session.shared.metrics;
    // The backlog a device comes back to, recorded by the first pass only.
    let first = sent.is_empty();
    let record_backlog = |n: usize| {
        if first {
            metrics.unread.record(n as f64);
        }
    };
    // (The inbox starts at the watermark: not with messages held.)
    if held.is_empty()
        && let Some(queued) = from_inbox(session, authed.user_id).await
    {
        record_backlog(queued.len());
        for page in queued.chunks(CATCH_UP_PAGE as usize) {
            if !write_page(session, send, page, sent, credits).await {
                return false;
            }
        }
        return true;
    }
    // What was pending when the pass began. Read page by page from the
    // watermark as it is at each read, a backlog lost what another device
    // of the user acked meanwhile and this one was not sent yet; so past
    // the first page (one read: nothing to lose) each conversation is read
    // from where it stood here.
    let pending = match store.pending_ranges(user).await {
        Ok(pending) => pending,
        Err(e) => return catch_up_failed(session, &e),
    };
    let mut cursor = (0, 0);
    let mut backlog = 0usize;
    // With messages held, each conversation is read from the snapshot,
    // from below what is held.
    while held.is_empty() || pending.is_none() {
        let page = match store.undelivered(user, cursor, CATCH_UP_PAGE).await {
            Ok(page) => page,
            Err(e) => return catch_up_failed(session, &e),
        };
        backlog += page.len();
        let full = page.len() == CATCH_UP_PAGE as usize;
        if let Some(last) = page.last() {
            cursor = (last.conversation_id, last.seq);
            if !write_page(session, send, &page, sent, credits).await {
                return false;
            }
        }
        if !full {
            record_backlog(backlog);
            return true;
        }
        if pending.is_some() {
            break;
        }
    }
    let below_held = |conversation: u64, delivered: u64| {
        held.get(&conversation)
            .map_or(delivered, |&h| delivered.min(h.saturating_sub(1)))
    };
    // Ordered by conversation, as pages are: those the first page
    // finished are behind the cursor.
    for range in pending.into_iter().flatten() {
        if range.conversation_id < cursor.0 {
            continue;
        }
        let mut start = below_held(range.conversation_id, range.delivered_seq);
        if start < range.delivered_seq {
            // Below the watermark, not below where the membership began (a
            // member removed and added again is not sent what came
            // between).
            match store.membership(range.conversation_id, user).await {
                Ok(Some(m)) => start = start.max(m.joined_seq.saturating_sub(1)),
                Ok(None) => start = range.delivered_seq,
                Err(e) => return catch_up_failed(session, &e),
            }
        }
        let from = sent
            .get(&range.conversation_id)
            .map_or(start, |&s| s.max(start));
        if from >= range.last_seq {
            continue;
        }
        backlog += (range.last_seq - from) as usize;
        let seqs = (from + 1, range.last_seq);
        if !write_range(
            session,
            send,
            credits,
            sent,
            range.conversation_id,
            seqs,
            Some(&mut own),
        )
        .await
        {
            return false;
        }
    }
    record_backlog(backlog);
    true
}

/// Whose messages a catch-up read from history leaves out: the user's
/// own, but those from other devices the queue holds (`held`), which it
/// writes in their place and notes in `written`.
struct Own<'a> {
    user: u64,
    held: &'a HashSet<(u64, u64)>,
    written: &'a mut HashSet<(u64, u64)>,
}

/// Writes the messages of `conversation` from `lowest` to `highest` (a
/// range that was pending for this user, or that was pushed to them, so
/// theirs to read) from history, but what `sent` has and, with `own`,
/// the user's own other than the echoes the queue holds (see [`Own`]).
async fn write_range(
    session: &Session,
    send: &mut SendStream,
    credits: &AtomicU64,
    sent: &mut HashMap<u64, u64>,
    conversation: u64,
    (lowest, highest): (u64, u64),
    mut own: Option<&mut Own<'_>>,
) -> bool {
    let mut cursor = lowest.saturating_sub(1);
    while cursor < highest {
        let limit = u32::try_from(highest - cursor).map_or(CATCH_UP_PAGE, |n| n.min(CATCH_UP_PAGE));
        let page = match session
            .shared
            .store
            .history(conversation, Direction::Forward, cursor, limit)
            .await
        {
            Ok(page) => page,
            Err(e) => return catch_up_failed(session, &e),
        };
        let messages: Vec<Arc<proto::Message>> = page
            .messages
            .into_iter()
            .filter(|m| m.seq <= highest)
            .collect();
        let Some(last) = messages.last().map(|m| m.seq) else {
            return true;
        };
        cursor = last;
        let mut echoes = Vec::new();
        let messages: Vec<Arc<proto::Message>> = messages
            .into_iter()
            .filter(|m| match own.as_deref() {
                Some(own) if m.sender_id == own.user => {
                    let key = (m.conversation_id, m.seq);
                    let held = own.held.contains(&key)
                        && sent
                            .get(&m.conversation_id)
                            .is_none_or(|&last| m.seq > last);
                    if held {
                        echoes.push(key);
                    }
                    held
                }
                _ => true,
            })
            .collect();
        if !write_page(session, send, &messages, sent, credits).await {
            return false;
        }
        if let Some(own) = own.as_deref_mut() {
            own.written.extend(echoes);
        }
    }
    true
}

/// Closes the connection after a catch-up read failed (false): live
/// pushes must not overtake what catch-up could not send (the client
/// would ack past it), and the client resumes from its watermark on
/// reconnect.
fn catch_up_failed(session: &Session, e: &StoreError) -> bool {
    tracing::warn!(
        conn_id = session.conn_id,
        user_id = session.authed().map(|a| a.user_id),
        error = %e,
        "catch-up failed; closing the connection"
    );
    wire::close_counted(
        &session.conn,
        &session.shared.metrics,
        ErrorCode::Unavailable,
        "catch-up failed; reconnect",
    );
    false
}

/// Writes one page of Deliver frames in a single write.
async fn write_page(
    session: &Session,
    send: &mut SendStream,
    page: &[Arc<proto::Message>],
    sent: &mut HashMap<u64, u64>,
    credits: &AtomicU64,
) -> bool {
    // Only what an earlier pass did not send.
    let page: Vec<&Arc<proto::Message>> = page
        .iter()
        .filter(|m| {
            sent.get(&m.conversation_id)
                .is_none_or(|&last| m.seq > last)
        })
        .collect();
    if page.is_empty() {
        return true;
    }
    // Credited before the write: the client may ack a message as soon as
    // it reads it, before this task runs again.
    earn_acks(credits, page.len() as u64);
    let metrics = &session.shared.metrics;
    let stall = session.shared.config.transport.write_stall;
    let mut next = 0;
    while next < page.len() {
        let from = next;
        let mut chunks: [Bytes; 1] = [encode_deliveries(&page, &mut next)];
        for message in &page[from..next] {
            sent.insert(message.conversation_id, message.seq);
        }
        // The whole write within a stall per 64 KiB of it too (~1 KiB a
        // second at the default stall, 8 kbit/s: slower than any link a
        // phone keeps a session on): a reader taking just enough to keep
        // restarting the stall timer (16 KiB a stall, ~270 bytes a
        // second) held its page, megabytes of long texts read from
        // history for it alone, for hours.
        let deadline = catch_up_write_deadline(chunks[0].len(), stall);
        let write = wire::write_all_or_stall(&session.conn, send, &mut chunks, stall, metrics);
        match tokio::time::timeout(deadline, write).await {
            Ok(true) => {}
            Ok(false) => return false,
            Err(_) => {
                wire::close_counted(
                    &session.conn,
                    metrics,
                    ErrorCode::SlowConsumer,
                    "client reads its catch-up too slowly; reconnect",
                );
                return false;
            }
        }
        metrics.deliveries.increment((next - from) as u64);
        metrics
            .frames_out(StreamKind::Messages)
            .increment((next - from) as u64);
    }
    true
}

/// Encoded bytes a catch-up writes at a time: a page of 256 maximum-size
/// texts encoded whole was 4 MiB more held while a slow reader took it.
const CATCH_UP_WRITE: usize = 256 * 1024;

/// Bytes of a catch-up write the client must take per `write-stall`, on
/// average over the write (four times what restarts the stall timer).
const CATCH_UP_PROGRESS: usize = 64 * 1024;

/// How long a catch-up write of `bytes` may take: a `stall` per
/// [`CATCH_UP_PROGRESS`] bytes, and at least one.
fn catch_up_write_deadline(bytes: usize, stall: Duration) -> Duration {
    let stalls = bytes.div_ceil(CATCH_UP_PROGRESS).max(1);
    stall.saturating_mul(u32::try_from(stalls).unwrap_or(u32::MAX))
}

/// The Deliver frames of `page` from `*next` on, up to about
/// [`CATCH_UP_WRITE`] bytes (at least one frame); moves `*next` past them.
fn encode_deliveries(page: &[&Arc<proto::Message>], next: &mut usize) -> Bytes {
    let mut buf = BytesMut::new();
    while let Some(message) = page.get(*next) {
        if !buf.is_empty() && buf.len() >= CATCH_UP_WRITE {
            break;
        }
        let frame = Frame::push(Body::Deliver(proto::Deliver {
            message: Some(Box::new((***message).clone())),
        }));
        chat_protocol::encode(&frame, &mut buf);
        *next += 1;
    }
    buf.freeze()
}

/// The user's queue from the inbox store, if there is one and it agrees
/// with history: for every conversation history says may have pending
/// messages, the queue must hold exactly the seqs after the delivered
/// watermark up to the last seq. Anything else (a flushed Redis, a lost
/// push, an outage, the user's own messages in the range, a group they
/// were removed from, a message an unsend erased still whole) returns
/// `None` and catch-up reads history instead. Queue entries at or below
/// the watermark (acks that raced a push) are dropped.
async fn from_inbox(session: &Session, user: u64) -> Option<Vec<Arc<proto::Message>>> {
    let inbox = session.shared.inbox.as_ref()?;
    let ranges = match session.shared.store.pending_ranges(user).await {
        Ok(Some(ranges)) => ranges,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(conn_id = session.conn_id, user_id = user, error = %e, "pending ranges failed");
            return None;
        }
    };
    // What a removed member is still owed may have been unsent since: the
    // UNSEND erased it in history, but is not queued for a non-member, so
    // their queue would agree with history and serve the text. Removals
    // are rare: history.
    if ranges.iter().any(|r| r.departed) {
        return None;
    }
    let queued = match inbox.pending(user, INBOX_CATCH_UP_LIMIT).await {
        Ok(Some(queued)) => queued,
        // More than a catch-up takes from the queue: history pages through
        // it instead. What no catch-up will send goes (in the background),
        // so that stale entries do not keep the queue past the limit.
        Ok(None) => {
            let inbox = inbox.clone();
            let pending = ranges
                .iter()
                .map(|r| (r.conversation_id, r.delivered_seq))
                .collect();
            tokio::spawn(async move {
                if let Err(e) = inbox.trim(user, pending).await {
                    tracing::debug!(error = %e, "trimming the inbox failed");
                }
            });
            return None;
        }
        Err(e) => {
            tracing::warn!(
                conn_id = session.conn_id,
                user_id = user,
                error = %e,
                "inbox read failed; catching up from history"
            );
            return None;
        }
    };
    let expected: HashMap<u64, (u64, u64)> = ranges
        .iter()
        .map(|r| (r.conversation_id, (r.delivered_seq, r.last_seq)))
        .collect();
    // Entries that no catch-up will ever send (`stale`): at or below the
    // delivered watermark (an ack that raced a push), or of a conversation
    // with nothing pending (one the user was removed from, whose acks no
    // longer reach the queue). Dropped in the background, or they would
    // stay in Redis for good and count against the catch-up limit.
    // Dropping a live one is safe: the session has it queued too, and a
    // queue that then disagrees with history costs a history read, not a
    // message.
    let mut stale: HashMap<u64, u64> = HashMap::new();
    let mut out: Vec<Arc<proto::Message>> = Vec::with_capacity(queued.len());
    let mut counts: HashMap<u64, u64> = HashMap::new();
    for message in queued {
        let conversation = message.conversation_id;
        let Some(&(delivered, last)) = expected.get(&conversation) else {
            let upto = stale.entry(conversation).or_default();
            *upto = (*upto).max(message.seq);
            continue;
        };
        if message.seq <= delivered {
            stale.insert(conversation, delivered);
            continue;
        }
        if message.seq > last {
            continue;
        }
        if let Some(prev) = out
            .last()
            .filter(|prev| prev.conversation_id == conversation && prev.seq >= message.seq)
        {
            if prev.seq == message.seq && prev.message_id != message.message_id {
                // Two messages at one seq: the queue is not this history's
                // (a Redis shared by two deployments with one prefix, or
                // kept across a restore of history). Which one came first
                // is down to their bytes; history decides instead.
                tracing::warn!(
                    user_id = user,
                    conversation_id = conversation,
                    seq = message.seq,
                    "two queued messages at one seq; catching up from history"
                );
                return None;
            }
            continue;
        }
        *counts.entry(conversation).or_default() += 1;
        out.push(message);
    }
    if !stale.is_empty() {
        let inbox = inbox.clone();
        let trims: Vec<(u64, u64, u64)> =
            stale.into_iter().map(|(c, seq)| (user, c, seq)).collect();
        tokio::spawn(async move {
            if let Err(e) = inbox.ack(trims).await {
                tracing::debug!(error = %e, "dropping stale inbox entries failed");
            }
        });
    }
    let complete = ranges.iter().all(|r| {
        counts.get(&r.conversation_id).copied().unwrap_or(0) == r.last_seq - r.delivered_seq
    });
    (complete && !holds_unsent(&out)).then_some(out)
}

/// Whether `queued` holds a message an UNSEND in it erased, still whole:
/// its push, from a node whose updates were behind, landed after the
/// UNSEND's took the erased seqs out. History serves it erased.
fn holds_unsent(queued: &[Arc<proto::Message>]) -> bool {
    let unsent: HashSet<(u64, u64)> = queued
        .iter()
        .filter(|m| m.r#type == proto::MessageType::Unsend as i32)
        .map(|m| (m.conversation_id, m.reply_to_seq))
        .collect();
    !unsent.is_empty()
        && queued
            .iter()
            .any(|m| !m.unsent && unsent.contains(&(m.conversation_id, m.seq)))
}

/// A device has the messages of `conversation` up to `seq`: the notifier
/// stops watching them (`push-unacked-after`) if its app is in the
/// foreground, or if the user marked them seen. A delivery ack from an app
/// in the background says the device has them, not that the user knows.
pub(crate) fn acked_in_foreground(
    session: &Session,
    handle: &SessionHandle,
    (conversation, seq): (u64, u64),
    seen: bool,
) {
    if let Some(notifier) = &session.shared.notifier
        && (seen || !handle.is_background())
    {
        notifier.acked(handle.user_id, conversation, seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_holding_what_an_unsend_erased_is_not_served() {
        let message = |seq, kind: proto::MessageType, to, unsent| {
            Arc::new(proto::Message {
                conversation_id: 7,
                seq,
                r#type: kind as i32,
                reply_to_seq: to,
                unsent,
                ..Default::default()
            })
        };
        use proto::MessageType::{Text, Unsend};
        let whole = [message(1, Text, 0, false), message(2, Unsend, 1, false)];
        assert!(holds_unsent(&whole));
        let erased = [message(1, Text, 0, true), message(2, Unsend, 1, false)];
        assert!(!holds_unsent(&erased));
        // Another conversation's seq 1, or no unsend at all.
        let other = [
            message(1, Text, 0, false),
            Arc::new(proto::Message {
                conversation_id: 8,
                ..(*message(2, Unsend, 1, false)).clone()
            }),
        ];
        assert!(!holds_unsent(&other));
        assert!(!holds_unsent(&[message(1, Text, 0, false)]));
    }

    #[test]
    fn a_catch_up_write_gets_a_stall_per_64_kib() {
        let stall = Duration::from_secs(60);
        assert_eq!(
            catch_up_write_deadline(40_000, stall),
            stall,
            "a page of short texts"
        );
        assert_eq!(catch_up_write_deadline(0, stall), stall);
        assert_eq!(
            catch_up_write_deadline(CATCH_UP_WRITE, stall),
            4 * stall,
            "~1.1 KiB a second"
        );
        assert_eq!(
            catch_up_write_deadline(CATCH_UP_WRITE + 1, stall),
            5 * stall
        );
    }

    #[test]
    fn catch_up_writes_a_page_a_bounded_chunk_at_a_time() {
        let messages: Vec<Arc<proto::Message>> = (1..=256)
            .map(|seq| {
                Arc::new(proto::Message {
                    conversation_id: 1,
                    seq,
                    text: "x".repeat(if seq % 2 == 0 { 16 * 1024 } else { 10 }),
                    ..Default::default()
                })
            })
            .collect();
        let page: Vec<&Arc<proto::Message>> = messages.iter().collect();
        let (mut next, mut seqs, mut writes) = (0, Vec::new(), 0);
        while next < page.len() {
            let chunk = encode_deliveries(&page, &mut next);
            assert!(chunk.len() < CATCH_UP_WRITE + 17 * 1024, "{}", chunk.len());
            writes += 1;
            let mut buf = BytesMut::from(&chunk[..]);
            let codec = chat_protocol::Codec::new(1 << 20);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                let Some(Body::Deliver(d)) = frame.body else {
                    panic!("{frame:?}");
                };
                seqs.push(d.message.unwrap().seq);
            }
            assert!(buf.is_empty());
        }
        assert_eq!(
            seqs,
            (1..=256).collect::<Vec<_>>(),
            "every message once, in order"
        );
        assert!(writes >= 8, "{writes} writes for ~2 MiB");
        // A message larger than a write still goes, alone.
        let big = Arc::new(proto::Message {
            text: "x".repeat(CATCH_UP_WRITE + 1),
            ..Default::default()
        });
        let mut next = 0;
        assert!(encode_deliveries(&[&big, &big], &mut next).len() > CATCH_UP_WRITE);
        assert_eq!(next, 1);
    }

    #[test]
    fn acks_are_earned_first_then_taken_from_the_users_slack() {
        let slack = crate::ratelimit::RateLimiter::new(1, 2);
        let now = Instant::now();
        let (mine, other) = (AtomicU64::new(0), AtomicU64::new(0));
        assert!(take_ack(&mine, &slack, 7, now));
        assert!(take_ack(&other, &slack, 7, now), "another connection's");
        assert!(
            !take_ack(&mine, &slack, 7, now),
            "the user's slack is spent"
        );
        assert!(take_ack(&mine, &slack, 8, now), "another user's is not");
        earn_acks(&mine, 2);
        assert!(take_ack(&mine, &slack, 7, now));
        assert!(take_ack(&mine, &slack, 7, now));
        assert!(!take_ack(&mine, &slack, 7, now), "earned ones spent too");
        assert!(
            take_ack(&mine, &slack, 7, now + Duration::from_secs(1)),
            "refilled"
        );
    }

    #[test]
    fn deliveries_earn_acks_up_to_the_cap() {
        // A connection reading a busy group without acking used to bank an
        // ack per message, without a ceiling, to spend at once.
        let credits = AtomicU64::new(ACK_SLACK);
        earn_acks(&credits, 3);
        assert_eq!(credits.load(Ordering::Relaxed), ACK_SLACK + 3);
        for _ in 0..3 * ACK_SLACK {
            earn_acks(&credits, 1);
        }
        assert_eq!(credits.load(Ordering::Relaxed), MAX_ACK_CREDITS);
        earn_acks(&credits, u64::MAX);
        assert_eq!(credits.load(Ordering::Relaxed), MAX_ACK_CREDITS);
    }
}
