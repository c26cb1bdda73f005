//! Media streams: one photo upload or download each (see `MediaUpload` and
//! `MediaFetch` in chat.proto).
//!
//! An upload is checked as it arrives: its declared size against
//! `max-photo-bytes` and its preview (a few KB the app made, carried in
//! the message) before any byte is read, each chunk against what is
//! left of that size, its first bytes against the declared format, and
//! once complete its SHA-256 against the declared one. Its bytes go to a
//! temporary file (never all in memory), which is synced and renamed into
//! place before history records the upload; only then is it acknowledged.
//! A refusal ends the stream with an error and leaves nothing behind; the
//! connection and its other streams carry on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use chat_protocol::media::{
    MAX_PHOTO_DIMENSION, SHA256_LEN, SIGNATURE_LEN, check_preview, is_media_id,
};
use chat_protocol::{Body, ErrorCode, Frame, proto};
use quinn::SendStream;
use sha2::{Digest, Sha256};

use super::now_ms;
use crate::error::{Refusal, retry_after_ms};
use crate::media::{Upload, read_chunk};
use crate::session::Session;
use crate::store::MediaRecord;
use crate::wire::{FrameReader, ReadError};

/// Longest a media stream may wait for its client's next frame.
const MEDIA_FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest an upload may take from its declaration to its last byte
/// (16 MiB in this is ~28 KB/s): a client trickling bytes does not keep a
/// stream, a task and a temporary file for hours.
const UPLOAD_DEADLINE: Duration = Duration::from_secs(600);

/// Room a MediaChunk frame needs around its bytes (the frame, the field
/// and their lengths).
const CHUNK_OVERHEAD: usize = 32;

/// Upload bytes gathered before one write to the file: chunks as small as
/// a byte each cost a frame apiece but not a write (and a trip to the
/// blocking pool) apiece.
const WRITE_BUFFER: usize = 64 * 1024;

/// Serves one media stream.
pub async fn serve(session: Arc<Session>, mut send: SendStream, mut reader: FrameReader) {
    let first = match tokio::time::timeout(MEDIA_FRAME_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None) | Err(ReadError::Stream(_))) => return,
        Ok(Err(ReadError::Frame(e))) => {
            return session
                .close_with(Some(&mut send), e.code(), &e.to_string())
                .await;
        }
        Err(_) => {
            let refusal = Refusal::new(ErrorCode::Timeout, "no request on the media stream");
            return refuse(&session, send, 0, refusal).await;
        }
    };
    // A transfer is the user's activity, as any other request is (in the
    // background it is not: `touch` knows).
    if let Some(authed) = session.authed() {
        authed.handle.touch(now_ms());
    }
    let request_id = first.request_id;
    let outcome = match first.body {
        Some(Body::MediaUpload(upload)) => {
            self::upload(&session, &mut reader, upload)
                .await
                .map(|media_id| {
                    vec![Frame::new(
                        request_id,
                        Body::MediaUploaded(proto::MediaUploaded { media_id }),
                    )]
                })
        }
        Some(Body::MediaFetch(fetch)) => {
            return match self::fetch(&session, &mut send, request_id, fetch).await {
                Ok(()) => {
                    let _ = send.finish();
                }
                Err(Failure::Refused(refusal)) => refuse(&session, send, request_id, refusal).await,
                Err(Failure::Closed(e)) => session.close_with(Some(&mut send), e.0, &e.1).await,
                Err(Failure::Gone) => {}
            };
        }
        Some(other) => Err(Failure::Refused(Refusal::new(
            ErrorCode::UnexpectedFrame,
            format!("{} does not open a media stream", other.name()),
        ))),
        None => Err(Failure::Refused(Refusal::new(
            ErrorCode::MalformedFrame,
            "empty frame",
        ))),
    };
    match outcome {
        Ok(frames) => {
            let write_stall = session.shared.config.transport.write_stall;
            if write_frames(&mut send, &frames, write_stall).await.is_ok() {
                let _ = send.finish();
            }
        }
        Err(Failure::Refused(refusal)) => refuse(&session, send, request_id, refusal).await,
        Err(Failure::Closed(e)) => session.close_with(Some(&mut send), e.0, &e.1).await,
        Err(Failure::Gone) => {}
    }
}

/// Why a transfer ended early.
enum Failure {
    /// Refused: the error goes on the stream, the connection carries on.
    Refused(Refusal),
    /// A protocol violation (a malformed frame): the connection closes.
    Closed((ErrorCode, String)),
    /// The client reset the stream or the connection ended.
    Gone,
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Self {
        Failure::Refused(refusal)
    }
}

fn rejected(why: impl Into<String>) -> Failure {
    Failure::Refused(Refusal::new(ErrorCode::MediaRejected, why))
}

fn invalid(why: impl Into<String>) -> Failure {
    Failure::Refused(Refusal::new(ErrorCode::InvalidArgument, why))
}

/// Writes the refusal and ends the stream; bounded, so a client that gives
/// the stream no credit does not keep this task.
async fn refuse(session: &Session, mut send: SendStream, request_id: u64, refusal: Refusal) {
    session.shared.metrics.error(refusal.code);
    let frame = refusal.to_frame(request_id);
    let write_stall = session.shared.config.transport.write_stall;
    if write_frames(&mut send, &[frame], write_stall).await.is_ok() {
        let _ = send.finish();
    }
}

/// Writes frames, giving up (and resetting the stream) when the client
/// takes none of them for `stall`.
async fn write_frames(send: &mut SendStream, frames: &[Frame], stall: Duration) -> Result<(), ()> {
    let mut buf = BytesMut::new();
    for frame in frames {
        chat_protocol::encode(frame, &mut buf);
    }
    match tokio::time::timeout(stall, send.write_all(&buf)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(()),
        Err(_) => {
            let _ = send.reset(quinn::VarInt::from_u32(ErrorCode::Timeout as u32));
            Err(())
        }
    }
}

/// The next frame of an upload, within [`MEDIA_FRAME_TIMEOUT`] and before
/// `deadline`.
async fn next_frame(
    reader: &mut FrameReader,
    deadline: tokio::time::Instant,
) -> Result<Option<Frame>, Failure> {
    let until = deadline.min(tokio::time::Instant::now() + MEDIA_FRAME_TIMEOUT);
    match tokio::time::timeout_at(until, reader.next()).await {
        Ok(Ok(frame)) => Ok(frame),
        Ok(Err(ReadError::Frame(e))) => Err(Failure::Closed((e.code(), e.to_string()))),
        Ok(Err(ReadError::Stream(_))) => Err(Failure::Gone),
        Err(_) => Err(Failure::Refused(Refusal::new(
            ErrorCode::Timeout,
            format!(
                "no upload bytes for {}s, or the upload took over {}s",
                MEDIA_FRAME_TIMEOUT.as_secs(),
                UPLOAD_DEADLINE.as_secs()
            ),
        ))),
    }
}

/// Checks what an upload declares, before reading any of its bytes.
fn check_declared(
    session: &Session,
    upload: &proto::MediaUpload,
) -> Result<proto::MediaType, Failure> {
    let Some(media_type) = proto::MediaType::from_wire(upload.media_type) else {
        return Err(invalid("media_type must be JPEG, PNG, WEBP or HEIC"));
    };
    let max = session.shared.config.limits.max_photo_bytes;
    if upload.size == 0 {
        return Err(invalid("size must be at least 1 byte"));
    }
    if upload.size > max {
        return Err(rejected(format!(
            "the photo is {} bytes; the limit is {max}",
            upload.size
        )));
    }
    if upload.sha256.len() != SHA256_LEN {
        return Err(invalid("sha256 must be 32 bytes"));
    }
    let dimension = 1..=MAX_PHOTO_DIMENSION;
    if !dimension.contains(&upload.width) || !dimension.contains(&upload.height) {
        return Err(invalid(format!(
            "width and height must be 1-{MAX_PHOTO_DIMENSION}"
        )));
    }
    check_preview(&upload.preview, session.shared.config.limits.max_text_len).map_err(rejected)?;
    Ok(media_type)
}

/// Receives, checks and stores one upload; its media id.
async fn upload(
    session: &Session,
    reader: &mut FrameReader,
    declared: proto::MediaUpload,
) -> Result<String, Failure> {
    let authed = session.authed().expect("authenticated before data streams");
    let shared = &session.shared;
    let media_type = check_declared(session, &declared)?;
    if let Err(wait) = shared.upload_limiter.check(authed.user_id, Instant::now()) {
        return Err(Refusal::new(
            ErrorCode::RateLimited,
            format!(
                "over {} photo uploads an hour; retry in {} ms",
                shared.config.limits.uploads_per_hour,
                retry_after_ms(wait)
            ),
        )
        .with_retry_after(wait)
        .into());
    }
    let mut file = shared.media.start().await.map_err(storage_failure)?;
    let mut received: u64 = 0;
    let mut hasher = Sha256::new();
    // The first bytes, until there are enough to tell the format.
    let mut start: Vec<u8> = Vec::with_capacity(SIGNATURE_LEN);
    let mut checked = false;
    let mut pending = BytesMut::new();
    let deadline = tokio::time::Instant::now() + UPLOAD_DEADLINE;
    loop {
        let frame = next_frame(reader, deadline).await?;
        let Some(frame) = frame else {
            break;
        };
        let data: Bytes = match frame.body {
            Some(Body::MediaChunk(chunk)) if !chunk.data.is_empty() => chunk.data,
            Some(Body::MediaChunk(_)) => return Err(invalid("a media chunk must not be empty")),
            Some(other) => {
                return Err(Refusal::new(
                    ErrorCode::UnexpectedFrame,
                    format!("{} does not belong in an upload", other.name()),
                )
                .into());
            }
            None => return Err(Refusal::new(ErrorCode::MalformedFrame, "empty frame").into()),
        };
        received += data.len() as u64;
        if received > declared.size {
            return Err(rejected(format!(
                "more bytes than the {} declared",
                declared.size
            )));
        }
        if !checked {
            let want = SIGNATURE_LEN - start.len();
            start.extend_from_slice(&data[..want.min(data.len())]);
            if start.len() == SIGNATURE_LEN || received == declared.size {
                if !media_type.matches(&start) {
                    return Err(rejected(format!("the bytes are not {}", media_type.mime())));
                }
                checked = true;
            }
        }
        hasher.update(&data);
        pending.extend_from_slice(&data);
        if pending.len() >= WRITE_BUFFER {
            file = file
                .write(pending.split().freeze())
                .await
                .map_err(storage_failure)?;
        }
    }
    if !pending.is_empty() {
        file = file
            .write(pending.freeze())
            .await
            .map_err(storage_failure)?;
    }
    if received != declared.size {
        return Err(rejected(format!(
            "the upload ended at {received} of {} bytes",
            declared.size
        )));
    }
    if hasher.finalize()[..] != declared.sha256[..] {
        return Err(rejected("the bytes do not match sha256"));
    }
    let media_id = format!("{:032x}", rand::random::<u128>());
    store_upload(session, file, &media_id, media_type, &declared).await?;
    shared.metrics.photos_uploaded.increment(1);
    shared.metrics.photo_bytes_uploaded.increment(declared.size);
    Ok(media_id)
}

/// Puts a checked upload in place and records it; the file goes again if
/// the record cannot be written.
async fn store_upload(
    session: &Session,
    file: Upload,
    media_id: &str,
    media_type: proto::MediaType,
    declared: &proto::MediaUpload,
) -> Result<(), Failure> {
    let shared = &session.shared;
    let authed = session.authed().expect("authenticated before data streams");
    shared
        .media
        .store(file, media_id)
        .await
        .map_err(storage_failure)?;
    let record = MediaRecord {
        media_id: media_id.to_owned(),
        owner: authed.user_id,
        media_type,
        size: declared.size,
        width: declared.width,
        height: declared.height,
        sha256: declared.sha256[..].try_into().expect("checked: 32 bytes"),
        preview: declared.preview.clone(),
        created_ms: now_ms(),
        conversation_id: None,
        seq: None,
    };
    if let Err(e) = shared.store.create_media(record).await {
        // Unrecorded, nobody can fetch or send it: the file goes. (If the
        // record was written after all, a commit whose answer was lost, the
        // purge deletes it as unsent.)
        if let Err(e) = shared.media.remove(media_id).await {
            tracing::warn!(media_id, error = %e, "cannot remove an unrecorded upload");
        }
        return Err(Refusal::from(e).into());
    }
    Ok(())
}

fn storage_failure(e: std::io::Error) -> Failure {
    tracing::error!(error = %e, "media directory failure");
    Failure::Refused(
        Refusal::new(ErrorCode::Unavailable, "photo storage unavailable; retry")
            .with_retry_after(Duration::from_secs(1)),
    )
}

/// Sends a photo to its uploader, or to whoever was sent the message that
/// carries it as a member of its conversation.
async fn fetch(
    session: &Session,
    send: &mut SendStream,
    request_id: u64,
    fetch: proto::MediaFetch,
) -> Result<(), Failure> {
    let authed = session.authed().expect("authenticated before data streams");
    let shared = &session.shared;
    if !is_media_id(&fetch.media_id) {
        return Err(invalid("media_id must be 32 lowercase hex digits"));
    }
    if let Err(wait) = shared.control_limiter.check(authed.user_id, Instant::now()) {
        return Err(Refusal::new(
            ErrorCode::RateLimited,
            format!("too many requests; retry in {} ms", retry_after_ms(wait)),
        )
        .with_retry_after(wait)
        .into());
    }
    let not_found = || Failure::Refused(Refusal::new(ErrorCode::NotFound, "no such photo"));
    let media = shared
        .store
        .media(&fetch.media_id)
        .await
        .map_err(|e| Failure::Refused(e.into()))?
        .ok_or_else(not_found)?;
    // Its uploader, or whoever was sent the message that carries it as a
    // member (one added later reads from the message that added them on;
    // one who left or was removed since keeps what they were sent).
    let allowed = media.owner == authed.user_id
        || match (media.conversation_id, media.seq) {
            (Some(conversation), Some(seq)) => shared
                .store
                .was_member_at(conversation, authed.user_id, seq)
                .await
                .map_err(|e| Failure::Refused(e.into()))?,
            _ => false,
        };
    if !allowed {
        return Err(not_found());
    }
    if fetch.offset > media.size {
        return Err(invalid(format!(
            "offset {} is past the photo's {} bytes",
            fetch.offset, media.size
        )));
    }
    let mut file = match shared.media.open_at(&media.media_id, fetch.offset).await {
        Ok(file) => file,
        Err(e) => {
            tracing::error!(media_id = media.media_id, error = %e, "a recorded photo cannot be read");
            return Err(Refusal::new(ErrorCode::Internal, "the photo cannot be read").into());
        }
    };
    let write_stall = shared.config.transport.write_stall;
    // Without the preview: the downloader has it from the message.
    let header = Frame::new(
        request_id,
        Body::MediaHeader(proto::MediaHeader {
            photo: Some(Box::new(proto::Photo {
                preview: Bytes::new(),
                ..media.photo()
            })),
            offset: fetch.offset,
        }),
    );
    write_frames(send, &[header], write_stall)
        .await
        .map_err(|()| Failure::Gone)?;
    shared.metrics.photos_fetched.increment(1);
    let chunk_len = shared
        .codec
        .max_frame_len()
        .saturating_sub(CHUNK_OVERHEAD)
        .max(1);
    let mut left = media.size - fetch.offset;
    while left > 0 {
        let (rest, data) = read_chunk(file, chunk_len.min(left as usize))
            .await
            .map_err(|e| {
                tracing::error!(media_id = media.media_id, error = %e, "a photo read failed");
                // The header is out: the client sees the stream end short
                // of the size, and retries from where it got to.
                let _ = send.reset(quinn::VarInt::from_u32(ErrorCode::Internal as u32));
                Failure::Gone
            })?;
        file = rest;
        if data.is_empty() {
            tracing::error!(
                media_id = media.media_id,
                "a photo file is shorter than its record"
            );
            let _ = send.reset(quinn::VarInt::from_u32(ErrorCode::Internal as u32));
            return Err(Failure::Gone);
        }
        left -= data.len() as u64;
        let chunk = Frame::new(request_id, Body::MediaChunk(proto::MediaChunk { data }));
        write_frames(send, &[chunk], write_stall)
            .await
            .map_err(|()| Failure::Gone)?;
    }
    Ok(())
}
