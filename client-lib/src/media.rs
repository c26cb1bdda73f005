//! Photo transfers: each on a media stream of its own on the live
//! connection, so a large photo never holds up messages or receipts.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chat_protocol::media::{MAX_PHOTO_BYTES, SIGNATURE_LEN};
use chat_protocol::{Body, ErrorCode, Frame, StreamKind, proto};
use sha2::{Digest, Sha256};

use crate::connection::{FrameReader, ReadError};
use crate::error::ClientError;

/// Largest chunk of photo bytes a client puts in one frame. Servers take
/// frames of their text limit plus 512 bytes at least
/// ([`chunk_len`]), so chunks are kept under both.
const MAX_CHUNK: usize = 32 * 1024;

/// The chunk size for a server whose longest text is `max_text_len`: its
/// frames hold that plus 512 bytes, of which a chunk's envelope takes
/// less than 32.
pub(crate) fn chunk_len(max_text_len: usize) -> usize {
    (max_text_len + 480).min(MAX_CHUNK)
}

/// A photo to upload.
#[derive(Debug, Clone)]
pub struct PhotoUpload {
    /// The file's bytes.
    pub bytes: Bytes,
    /// Its format; its first bytes must be this format's.
    pub media_type: proto::MediaType,
    /// Pixels, for receivers to lay out a placeholder.
    pub width: u32,
    /// Pixels.
    pub height: u32,
    /// A small preview the app made (empty for none), which recipients
    /// show until they download the photo: a JPEG of 32-64 pixels on its
    /// longer side is 1-3 KB. At most
    /// [`MAX_PREVIEW_BYTES`](chat_protocol::media::MAX_PREVIEW_BYTES) (and
    /// the server's text limit), in one of the photo formats; it counts
    /// towards the caption's length when the photo is sent.
    pub preview: Bytes,
}

/// A refusal made here, worded as the server's would be.
pub(crate) fn rejected(message: String) -> ClientError {
    ClientError::Server {
        code: ErrorCode::MediaRejected,
        message,
        retry_after: None,
    }
}

/// Checks what the server would check before any byte is sent: the size
/// against the server's limit (0: a server without photos), the first
/// bytes against the format, and the preview.
pub(crate) fn check(
    photo: &PhotoUpload,
    max_photo_bytes: u64,
    max_text_len: usize,
) -> Result<(), ClientError> {
    if max_photo_bytes == 0 {
        return Err(ClientError::Protocol(
            "this server does not take photos".into(),
        ));
    }
    let size = photo.bytes.len() as u64;
    if size == 0 || size > max_photo_bytes {
        return Err(rejected(format!(
            "the photo is {size} bytes; the limit is {max_photo_bytes}"
        )));
    }
    let start = &photo.bytes[..photo.bytes.len().min(SIGNATURE_LEN)];
    if !photo.media_type.matches(start) {
        return Err(rejected(format!(
            "the bytes are not {}",
            photo.media_type.mime()
        )));
    }
    chat_protocol::media::check_preview(&photo.preview, max_text_len).map_err(rejected)
}

/// Initial room for a download's bytes: a photo larger than this grows
/// the buffer as its bytes come, rather than reserving what its header
/// claims before any arrived.
const DOWNLOAD_RESERVE: usize = 1 << 20;

/// Uploads a checked photo; its media id. `timeout` bounds each step that
/// waits for the server: the stream's opening, each chunk's write (a
/// stalled transfer, not a slow one), and the answer.
pub(crate) async fn upload(
    conn: &quinn::Connection,
    request_id: u64,
    photo: &PhotoUpload,
    chunk_len: usize,
    timeout: Duration,
) -> Result<String, ClientError> {
    // Hashing a large photo takes a phone's core for a while: not on the
    // app's async workers.
    let sha256 = {
        let bytes = photo.bytes.clone();
        tokio::task::spawn_blocking(move || Bytes::copy_from_slice(&Sha256::digest(&bytes)))
            .await
            .map_err(|_| ClientError::Closed)?
    };
    let declared = Body::MediaUpload(proto::MediaUpload {
        media_type: photo.media_type as i32,
        size: photo.bytes.len() as u64,
        sha256,
        width: photo.width,
        height: photo.height,
        preview: photo.preview.clone(),
    });
    let (mut send, mut reader) = open(conn, request_id, declared, timeout).await?;
    // Written while the answer is watched for: a refusal (too large, a
    // limit) comes before the bytes are all sent, and ends the upload.
    let write = async {
        let chunk_len = chunk_len.clamp(1, MAX_CHUNK);
        for data in photo.bytes.chunks(chunk_len) {
            let mut frame = BytesMut::new();
            chat_protocol::encode(
                &Frame::new(
                    request_id,
                    Body::MediaChunk(proto::MediaChunk {
                        data: photo.bytes.slice_ref(data),
                    }),
                ),
                &mut frame,
            );
            match tokio::time::timeout(timeout, send.write_all(&frame)).await {
                Ok(written) => written.map_err(|_| Stalled::Refused)?,
                Err(_) => return Err(Stalled::TimedOut),
            }
        }
        send.finish().map_err(|_| Stalled::Refused)?;
        Ok::<(), Stalled>(())
    };
    let answer = tokio::select! {
        biased;
        answer = reader.next() => Some(answer),
        written = write => match written {
            Err(Stalled::TimedOut) => None,
            // Written, or the server stopped reading: its answer says why.
            Ok(()) | Err(Stalled::Refused) => {
                match tokio::time::timeout(timeout, reader.next()).await {
                    Ok(answer) => Some(answer),
                    Err(_) => return Err(ClientError::Timeout),
                }
            }
        },
    };
    let Some(answer) = answer else {
        // A frame may be cut off mid-write: reset, not finish (which a
        // dropped stream does), or the server reads a truncated frame and
        // closes the connection.
        let _ = send.reset(0u32.into());
        return Err(ClientError::Timeout);
    };
    match answer.map_err(|e| e.into_error(conn))? {
        Some(Frame {
            body: Some(Body::MediaUploaded(uploaded)),
            ..
        }) if chat_protocol::media::is_media_id(&uploaded.media_id) => Ok(uploaded.media_id),
        Some(Frame {
            body: Some(Body::Error(e)),
            ..
        }) => Err(ClientError::server(&e)),
        Some(other) => Err(ClientError::Protocol(format!(
            "{} in answer to an upload",
            other.body_name()
        ))),
        None => Err(closed(conn)),
    }
}

/// Why an upload's bytes stopped going out.
enum Stalled {
    /// A chunk waited longer than the timeout for room.
    TimedOut,
    /// The server stopped reading the stream (its answer says why).
    Refused,
}

/// Downloads a photo whole and checks it against its SHA-256 (hashed as
/// its chunks come). `answer_timeout` bounds each wait for the server.
pub(crate) async fn download(
    conn: &quinn::Connection,
    request_id: u64,
    media_id: &str,
    answer_timeout: Duration,
) -> Result<(proto::Photo, Bytes), ClientError> {
    let fetch = Body::MediaFetch(proto::MediaFetch {
        media_id: media_id.to_owned(),
        offset: 0,
    });
    let (mut send, mut reader) = open(conn, request_id, fetch, answer_timeout).await?;
    let _ = send.finish();
    let first = tokio::time::timeout(answer_timeout, reader.next())
        .await
        .map_err(|_| ClientError::Timeout)?
        .map_err(|e| e.into_error(conn))?;
    let photo = match first {
        Some(Frame {
            body: Some(Body::MediaHeader(header)),
            ..
        }) => match header.photo {
            Some(photo) if header.offset == 0 && photo.media_id == media_id => *photo,
            _ => return Err(ClientError::Protocol("a header for another photo".into())),
        },
        Some(Frame {
            body: Some(Body::Error(e)),
            ..
        }) => return Err(ClientError::server(&e)),
        Some(other) => {
            return Err(ClientError::Protocol(format!(
                "{} in answer to a download",
                other.body_name()
            )));
        }
        None => return Err(closed(conn)),
    };
    if photo.size > MAX_PHOTO_BYTES {
        return Err(ClientError::Protocol(format!(
            "a photo of {} bytes is over the protocol's limit",
            photo.size
        )));
    }
    let mut bytes = BytesMut::with_capacity((photo.size as usize).min(DOWNLOAD_RESERVE));
    let mut hash = Sha256::new();
    loop {
        let frame = tokio::time::timeout(answer_timeout, reader.next())
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|e| e.into_error(conn))?;
        match frame {
            Some(Frame {
                body: Some(Body::MediaChunk(chunk)),
                ..
            }) if (bytes.len() + chunk.data.len()) as u64 <= photo.size => {
                hash.update(&chunk.data);
                bytes.extend_from_slice(&chunk.data);
            }
            Some(other) => {
                return Err(ClientError::Protocol(format!(
                    "{} where photo bytes were expected",
                    other.body_name()
                )));
            }
            None => break,
        }
    }
    if bytes.len() as u64 != photo.size {
        return Err(ClientError::Protocol(format!(
            "the download ended at {} of {} bytes",
            bytes.len(),
            photo.size
        )));
    }
    if hash.finalize()[..] != photo.sha256[..] {
        return Err(ClientError::Protocol(
            "the photo's bytes do not match its sha256".into(),
        ));
    }
    Ok((photo, bytes.freeze()))
}

/// Opens a media stream and writes its request, within `timeout`: the
/// server's stream limit may leave no stream to open while others are in
/// use.
async fn open(
    conn: &quinn::Connection,
    request_id: u64,
    request: Body,
    timeout: Duration,
) -> Result<(quinn::SendStream, FrameReader), ClientError> {
    let (mut send, recv) = tokio::time::timeout(timeout, conn.open_bi())
        .await
        .map_err(|_| ClientError::Timeout)?
        .map_err(|e| ClientError::for_waiting(&e))?;
    let mut head = BytesMut::new();
    chat_protocol::encode(&Frame::open_stream(StreamKind::Media), &mut head);
    chat_protocol::encode(&Frame::new(request_id, request), &mut head);
    match tokio::time::timeout(timeout, send.write_all(&head)).await {
        Ok(Ok(())) => Ok((send, FrameReader::new(recv))),
        Ok(Err(_)) => Err(closed(conn)),
        Err(_) => {
            // Reset, not finished: see `upload`.
            let _ = send.reset(0u32.into());
            Err(ClientError::Timeout)
        }
    }
}

fn closed(conn: &quinn::Connection) -> ClientError {
    conn.close_reason()
        .map_or(ClientError::Disconnected, |e| ClientError::for_waiting(&e))
}

impl ReadError {
    fn into_error(self, conn: &quinn::Connection) -> ClientError {
        match self {
            ReadError::Frame(e) => ClientError::Protocol(e.to_string()),
            // A reset stream on a live connection (a server that failed
            // mid-download): retryable, as a lost connection is.
            ReadError::Stream => closed(conn),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo(bytes: &'static [u8]) -> PhotoUpload {
        PhotoUpload {
            bytes: Bytes::from_static(bytes),
            media_type: proto::MediaType::Jpeg,
            width: 1,
            height: 1,
            preview: Bytes::new(),
        }
    }

    #[test]
    fn what_the_server_would_refuse_is_refused_before_sending() {
        let text = chat_protocol::limits::DEFAULT_MAX_TEXT_LEN;
        let jpeg = photo(b"\xff\xd8\xff\xe0 a jpeg of sorts");
        assert!(check(&jpeg, 1 << 20, text).is_ok());
        let too_large = check(&jpeg, 4, text).unwrap_err();
        assert_eq!(too_large.code(), Some(ErrorCode::MediaRejected));
        let not_jpeg = check(&photo(b"\x89PNG\r\n\x1a\n a png"), 1 << 20, text).unwrap_err();
        assert_eq!(not_jpeg.code(), Some(ErrorCode::MediaRejected));
        assert_eq!(
            check(&photo(b""), 1 << 20, text).unwrap_err().code(),
            Some(ErrorCode::MediaRejected)
        );
        assert!(matches!(
            check(&jpeg, 0, text),
            Err(ClientError::Protocol(_))
        ));
        // The preview: a small image, or none.
        let with = |preview: &'static [u8]| PhotoUpload {
            preview: Bytes::from_static(preview),
            ..jpeg.clone()
        };
        assert!(check(&with(b"\xff\xd8\xff\xdb small"), 1 << 20, text).is_ok());
        let not_an_image = check(&with(b"plain text, not a preview"), 1 << 20, text);
        assert_eq!(
            not_an_image.unwrap_err().code(),
            Some(ErrorCode::MediaRejected)
        );
        let over_the_text_limit = check(&with(b"\xff\xd8\xff\xdb small"), 1 << 20, 8);
        assert_eq!(
            over_the_text_limit.unwrap_err().code(),
            Some(ErrorCode::MediaRejected)
        );
    }
}
