//! Framing: each frame on a stream is a protobuf varint length followed by
//! one [`Frame`] message of exactly that many bytes.
//!
//! [`Codec::decode`] works on a growing `BytesMut` that the caller fills from
//! the stream. It returns `Ok(None)` while the frame is incomplete, checks
//! the declared length against the maximum *before* the caller buffers the
//! body, and never panics on any input (see the tests and the fuzz target).

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

use crate::limits::MAX_FRAME_LEN;
use crate::proto::Frame;

/// A varint never needs more than this many bytes for a `u64`.
const MAX_VARINT_LEN: usize = 10;

/// Why bytes could not be turned into a frame. Every variant means the
/// stream is unusable: the peer gets [`crate::ErrorCode`] and the stream (or
/// connection) is closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix is not a valid varint (more than 10 bytes, or a
    /// value beyond `u64`).
    #[error("invalid frame length prefix")]
    BadLength,
    /// The declared length exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared length.
        len: u64,
        /// The receiving side's limit.
        max: usize,
    },
    /// The body is not a valid protobuf `Frame`.
    #[error("malformed frame body: {0}")]
    Malformed(String),
    /// The frame decoded but has no body.
    #[error("frame has no body")]
    EmptyBody,
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({0} bytes left over)")]
    Truncated(usize),
}

impl FrameError {
    /// The wire error code a receiver answers this error with.
    pub fn code(&self) -> crate::ErrorCode {
        match self {
            FrameError::TooLarge { .. } => crate::ErrorCode::FrameTooLarge,
            FrameError::BadLength
            | FrameError::Malformed(_)
            | FrameError::EmptyBody
            | FrameError::Truncated(_) => crate::ErrorCode::MalformedFrame,
        }
    }
}

/// Field numbers in `Frame` of the bodies only a server sends
/// ([`crate::proto::frame::Body::is_from_server`]; a test keeps the two in
/// step).
const SERVER_BODY_FIELDS: [u32; 22] = [
    3, 4, 13, 16, 25, 26, 31, 33, 35, 38, 41, 42, 44, 51, 53, 62, 63, 78, 94, 95, 112, 114,
];

/// Decodes frames with a maximum size. Cheap to copy; holds no buffer.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    max_frame_len: usize,
    /// A server's codec: bodies only servers send are not decoded.
    for_server: bool,
}

impl Codec {
    /// A codec that refuses frames longer than `max_frame_len` bytes
    /// (clamped to the protocol's [`MAX_FRAME_LEN`]).
    pub fn new(max_frame_len: usize) -> Self {
        Codec {
            max_frame_len: max_frame_len.min(MAX_FRAME_LEN),
            for_server: false,
        }
    }

    /// This codec for a server reading what clients send. A body only a
    /// server sends (a reply or a push) comes out empty, as the empty
    /// message of its kind, without its fields decoded: the server answers
    /// it as a frame that does not belong, as before, but a client cannot
    /// make it build a large reply's structures from a few bytes (an empty
    /// entry of a `ConversationList` is 2 bytes on the wire and ~180 in
    /// memory: one 64 KiB frame made ~6 MB).
    pub fn for_server(self) -> Self {
        Codec {
            for_server: true,
            ..self
        }
    }

    /// The largest frame body this codec accepts.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Takes one frame off the front of `buf`.
    ///
    /// * `Ok(Some(frame))`: a frame was consumed from `buf`.
    /// * `Ok(None)`: `buf` holds only part of a frame; read more and call
    ///   again. Nothing was consumed. The caller never needs more than
    ///   `10 + max_frame_len` bytes buffered.
    /// * `Err(_)`: the bytes can never form a valid frame.
    ///
    /// A frame with no body a client's codec returns as such (`body` is
    /// `None`): it is a body this build does not know, from a newer server,
    /// and a client skips it. A server's codec refuses it
    /// ([`FrameError::EmptyBody`]).
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some((len, prefix_len)) = peek_varint(buf)? else {
            return Ok(None);
        };
        if len > self.max_frame_len as u64 {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        // Bounded by max_frame_len above, so the cast cannot truncate.
        let len = len as usize;
        if buf.len() < prefix_len + len {
            return Ok(None);
        }
        buf.advance(prefix_len);
        let body = buf.split_to(len).freeze();
        let scanned = if self.for_server {
            scan(&body)
        } else {
            Scan::Decode
        };
        let frame = match scanned {
            Scan::Decode => Frame::decode(body),
            Scan::ServerBody(request_id, field) => emptied(request_id, field),
            Scan::Refuse => {
                return Err(FrameError::Malformed("a field no client frame has".into()));
            }
        }
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
        if frame.body.is_none() && self.for_server {
            return Err(FrameError::EmptyBody);
        }
        Ok(Some(frame))
    }

    /// Called when the stream has ended: leftover bytes mean a truncated
    /// frame.
    pub fn decode_eof(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(FrameError::Truncated(buf.len())),
        }
    }

    /// How many bytes the frame at the front of `buf` needs in total
    /// (prefix included), if the prefix is complete and within limits. Lets
    /// a reader reserve exactly once.
    pub fn frame_len_hint(&self, buf: &[u8]) -> Option<usize> {
        match peek_varint(buf) {
            Ok(Some((len, prefix))) if len <= self.max_frame_len as u64 => {
                Some(prefix + len as usize)
            }
            _ => None,
        }
    }
}

impl Default for Codec {
    fn default() -> Self {
        Codec::new(crate::limits::DEFAULT_MAX_FRAME_LEN)
    }
}

/// Appends `frame`, length-prefixed, to `dst`.
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    let len = frame.encoded_len();
    dst.reserve(prost::length_delimiter_len(len) + len);
    // Cannot fail: the space was reserved above and BytesMut grows anyway.
    frame
        .encode_length_delimited(dst)
        .expect("BytesMut has room for the frame");
}

/// Size of `frame` on the wire, prefix included.
pub fn encoded_len(frame: &Frame) -> usize {
    let len = frame.encoded_len();
    prost::length_delimiter_len(len) + len
}

/// Appends `frame` to any buffer (used where a `BytesMut` is not at hand).
pub fn encode_to(frame: &Frame, dst: &mut impl BufMut) {
    // Encoding into a growable buffer cannot run out of space.
    frame
        .encode_length_delimited(dst)
        .expect("buffer has room for the frame");
}

/// What a server's codec makes of a frame's top-level fields before
/// decoding it.
enum Scan {
    /// No body only servers send: decode it whole.
    Decode,
    /// A body only servers send (the request id, the body's field number):
    /// decode it empty.
    ServerBody(u64, u32),
    /// Fields no client sends (groups, a request id that is not a
    /// varint): refuse it, since a full decode skips them and could hide a
    /// server body behind them.
    Refuse,
}

/// Walks the top-level fields of the encoded `Frame` in `bytes` without
/// decoding any. A server body anywhere among them counts, whatever comes
/// after it: a full decode builds every body field it meets (and keeps the
/// last), so one followed by a client's body or an unknown field would
/// still be built. Bytes that are not a valid encoding are refused here
/// (a full decode refuses them too, but only once it has built what
/// comes before them).
fn scan(mut bytes: &[u8]) -> Scan {
    let mut request_id = 0;
    let mut server_body = None;
    while !bytes.is_empty() {
        let Ok(Some((key, n))) = peek_varint(bytes) else {
            return Scan::Refuse;
        };
        bytes = &bytes[n..];
        let Ok(field) = u32::try_from(key >> 3) else {
            return Scan::Refuse;
        };
        let wire_type = key & 7;
        if field == 0 || (field == 1 && wire_type != 0) {
            return Scan::Refuse;
        }
        let rest = match wire_type {
            // Varint.
            0 => match peek_varint(bytes) {
                Ok(Some((value, n))) => {
                    if field == 1 {
                        request_id = value;
                    }
                    bytes.get(n..)
                }
                _ => None,
            },
            // 64-bit and 32-bit.
            1 => bytes.get(8..),
            5 => bytes.get(4..),
            // Length-delimited: bodies (and unknown fields).
            2 => match peek_varint(bytes) {
                Ok(Some((len, n))) => {
                    if SERVER_BODY_FIELDS.contains(&field) {
                        server_body = Some(field);
                    }
                    usize::try_from(len)
                        .ok()
                        .and_then(|len| n.checked_add(len))
                        .and_then(|end| bytes.get(end..))
                }
                _ => None,
            },
            // Groups (3, 4) and invalid wire types.
            _ => return Scan::Refuse,
        };
        let Some(rest) = rest else {
            return Scan::Refuse;
        };
        bytes = rest;
    }
    match server_body {
        Some(field) => Scan::ServerBody(request_id, field),
        None => Scan::Decode,
    }
}

/// A frame with `request_id` and the empty body of field `field`.
fn emptied(request_id: u64, field: u32) -> Result<Frame, prost::DecodeError> {
    let mut bytes = Vec::with_capacity(3 * MAX_VARINT_LEN + 1);
    for varint in [1 << 3, request_id, (u64::from(field) << 3) | 2, 0] {
        put_varint(varint, &mut bytes);
    }
    Frame::decode(bytes.as_slice())
}

fn put_varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Reads a varint at the front of `buf` without consuming it. Returns the
/// value and the number of bytes it occupies, or `None` if more bytes are
/// needed.
fn peek_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, FrameError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        let bits = u64::from(byte & 0x7f);
        // The tenth byte may only contribute the top bit of a u64.
        if i == MAX_VARINT_LEN - 1 && byte > 1 {
            return Err(FrameError::BadLength);
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= MAX_VARINT_LEN {
        Err(FrameError::BadLength)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_frame_stays_the_size_idle_memory_was_measured_with() {
        // Every stream task of every connection holds a `Frame`, which is
        // the size of its largest body (a `ConversationInfo`, since
        // `Deliver` boxes its message and `Frame` its `AuthOk`): a field
        // that grows it costs each
        // connection once per stream. Box large or rare fields
        // (`build.rs`) rather than raise these. A `Message` is held in
        // caches and queues, one per message.
        assert!(
            size_of::<proto::Message>() <= 120,
            "{}",
            size_of::<proto::Message>()
        );
        assert!(size_of::<Frame>() <= 112, "{}", size_of::<Frame>());
    }

    use super::*;
    use crate::proto::{self, frame::Body};

    fn sample_frames() -> Vec<Frame> {
        vec![
            Frame::open_stream(crate::StreamKind::Messages),
            Frame::new(
                7,
                Body::Login(proto::Login {
                    username: "alice".into(),
                    password: "correct horse".into(),
                    device_name: "phone".into(),
                }),
            ),
            Frame::new(
                u64::MAX,
                Body::Send(proto::Send {
                    conversation_id: 42,
                    client_msg_id: "m-1".into(),
                    r#type: proto::MessageType::Text as i32,
                    text: "héllo ✓✓".repeat(100),
                    media_id: String::new(),
                    reply_to_seq: 7,
                }),
            ),
            Frame::new(
                3,
                Body::MediaUpload(proto::MediaUpload {
                    media_type: proto::MediaType::Jpeg as i32,
                    size: 1 << 20,
                    sha256: vec![7; 32].into(),
                    width: 640,
                    height: 480,
                    preview: vec![0xff, 0xd8, 0xff, 0xdb, 1, 2, 3].into(),
                }),
            ),
            Frame::new(
                3,
                Body::MediaChunk(proto::MediaChunk {
                    data: vec![0xff; 4096].into(),
                }),
            ),
            Frame::new(
                3,
                Body::MediaUploaded(proto::MediaUploaded {
                    media_id: "0f".repeat(16),
                }),
            ),
            Frame::new(
                4,
                Body::MediaHeader(proto::MediaHeader {
                    photo: Some(Box::new(proto::Photo {
                        media_id: "0f".repeat(16),
                        size: 10,
                        ..Default::default()
                    })),
                    offset: 2,
                }),
            ),
            Frame::push(Body::Receipt(proto::Receipt {
                conversation_id: 1,
                user_id: 2,
                delivered_seq: 3,
                seen_seq: 2,
            })),
            Frame::error(9, crate::ErrorCode::NotFriends, "not friends"),
            Frame::new(1, Body::Ok(proto::Ok {})),
        ]
    }

    #[test]
    fn a_server_codec_leaves_server_bodies_undecoded() {
        // A reply only servers send, as a client could send it: many empty
        // entries, 2 bytes each on the wire.
        let list = Frame::new(
            77,
            Body::ConversationList(proto::ConversationList {
                conversations: vec![proto::ConversationInfo::default(); 30_000],
            }),
        );
        let mut wire = BytesMut::new();
        encode(&list, &mut wire);
        assert!(wire.len() < 64 * 1024);
        let server = Codec::new(MAX_FRAME_LEN).for_server();
        let frame = server.decode(&mut wire.clone()).unwrap().unwrap();
        assert_eq!(frame.request_id, 77, "still answered by its request id");
        assert_eq!(
            frame.body,
            Some(Body::ConversationList(proto::ConversationList::default()))
        );
        // A client's codec decodes it whole, and the server's codec leaves
        // what clients send as it is.
        let client = Codec::new(MAX_FRAME_LEN);
        assert_eq!(client.decode(&mut wire).unwrap().unwrap(), list);
        for frame in sample_frames() {
            let mut wire = BytesMut::new();
            encode(&frame, &mut wire);
            let decoded = server.decode(&mut wire).unwrap().unwrap();
            match frame.body.as_ref().unwrap().is_from_server() {
                false => assert_eq!(decoded, frame),
                true => assert_eq!(decoded.request_id, frame.request_id),
            }
        }
        // Followed by anything (a client's body, an unknown field), a
        // server body is still not built; groups, which a full decode would
        // skip, are refused.
        let framed = |body: &[u8]| {
            let mut wire = Vec::new();
            put_varint(body.len() as u64, &mut wire);
            wire.extend_from_slice(body);
            BytesMut::from(&wire[..])
        };
        // ListFriends (24), and an unknown field 1000, both empty.
        let trailers: [&[u8]; 2] = [&[0xc2, 0x01, 0x00], &[0xc2, 0x3e, 0x00]];
        for trailer in trailers {
            let mut body = Vec::new();
            list.encode(&mut body).unwrap();
            body.extend_from_slice(trailer);
            let frame = server.decode(&mut framed(&body)).unwrap().unwrap();
            assert_eq!(frame.request_id, 77);
            assert!(
                frame.body.as_ref().is_some_and(|b| b.is_from_server()),
                "{:?}",
                frame.body.as_ref().map(|b| b.name())
            );
            assert!(
                !matches!(&frame.body, Some(Body::ConversationList(l)) if !l.conversations.is_empty())
            );
        }
        // A server body followed by bytes that end the encoding: refused
        // before it is built (a full decode builds it, then fails).
        let mut cut_short = Vec::new();
        list.encode(&mut cut_short).unwrap();
        cut_short.extend_from_slice(&[0x12, 0x05]);
        assert!(matches!(
            server.decode(&mut framed(&cut_short)),
            Err(FrameError::Malformed(_))
        ));
        for refused in [
            // A group (field 1000) after the request id.
            &[0x08, 0x05, 0xc3, 0x3e, 0xc4, 0x3e][..],
            // A request id that is not a varint.
            &[0x0a, 0x00][..],
            // An unfinished key.
            &[0x08, 0x05, 0x80][..],
        ] {
            assert!(matches!(
                server.decode(&mut framed(refused)),
                Err(FrameError::Malformed(_))
            ));
        }
        // Broken encodings still fail as malformed.
        let mut bad = BytesMut::from(&[3u8, 0x9a, 0x02, 0x05][..]);
        assert!(matches!(
            server.decode(&mut bad),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn server_body_fields_match_the_bodies_only_servers_send() {
        // Every field number that decodes to a body: listed exactly when
        // the body says it is a server's.
        let mut bodies = 0;
        for field in 2..200u32 {
            let mut bytes = Vec::new();
            put_varint((u64::from(field) << 3) | 2, &mut bytes);
            bytes.push(0);
            if let Some(body) = Frame::decode(bytes.as_slice()).unwrap().body {
                bodies += 1;
                assert_eq!(
                    SERVER_BODY_FIELDS.contains(&field),
                    body.is_from_server(),
                    "field {field} ({})",
                    body.name()
                );
            }
        }
        assert_eq!(bodies, 66);
    }

    #[test]
    fn golden_bytes_of_open_stream() {
        // Contract check: an OpenStream(MESSAGES) preamble is exactly these
        // bytes. Length 4; field 2 (open_stream), length 2; field 1 = 2.
        let mut buf = BytesMut::new();
        encode(&Frame::open_stream(crate::StreamKind::Messages), &mut buf);
        assert_eq!(&buf[..], &[0x04, 0x12, 0x02, 0x08, 0x02]);
        let frame = Codec::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame, Frame::open_stream(crate::StreamKind::Messages));
        assert!(buf.is_empty());
    }

    #[test]
    fn round_trip_every_sample() {
        let codec = Codec::default();
        let mut buf = BytesMut::new();
        for frame in sample_frames() {
            encode(&frame, &mut buf);
        }
        for frame in sample_frames() {
            assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame));
        }
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let codec = Codec::default();
        let mut wire = BytesMut::new();
        for frame in sample_frames() {
            encode(&frame, &mut wire);
        }
        for split in 0..=wire.len() {
            let mut buf = BytesMut::from(&wire[..split]);
            let mut out = Vec::new();
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                out.push(frame);
            }
            buf.extend_from_slice(&wire[split..]);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                out.push(frame);
            }
            assert_eq!(out, sample_frames(), "split at {split}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn truncated_input_needs_more_then_errors_at_eof() {
        let codec = Codec::default();
        let mut wire = BytesMut::new();
        encode(&sample_frames()[1], &mut wire);
        for cut in 1..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(codec.decode(&mut buf).unwrap(), None, "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed");
            assert_eq!(codec.decode_eof(&mut buf), Err(FrameError::Truncated(cut)));
        }
        assert_eq!(codec.decode_eof(&mut BytesMut::new()), Ok(None));
    }

    #[test]
    fn oversize_length_is_refused_before_the_body_arrives() {
        let codec = Codec::new(1024);
        // Only the prefix (1025) is present: the error must come now, not
        // after buffering 1025 bytes.
        let mut buf = BytesMut::new();
        prost::encode_length_delimiter(1025, &mut buf).unwrap();
        assert_eq!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge {
                len: 1025,
                max: 1024
            })
        );
        assert_eq!(
            FrameError::TooLarge { len: 0, max: 0 }.code(),
            crate::ErrorCode::FrameTooLarge
        );
        // A prefix claiming u64::MAX bytes.
        let mut buf =
            BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        // The configured limit can never exceed the protocol cap.
        assert_eq!(Codec::new(usize::MAX).max_frame_len(), MAX_FRAME_LEN);
    }

    #[test]
    fn bad_varints_are_typed_errors() {
        let codec = Codec::default();
        // Eleven continuation bytes: never a valid varint.
        let mut buf = BytesMut::from(&[0x80u8; 11][..]);
        assert_eq!(codec.decode(&mut buf), Err(FrameError::BadLength));
        // Ten bytes whose last one overflows u64.
        let mut buf =
            BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02][..]);
        assert_eq!(codec.decode(&mut buf), Err(FrameError::BadLength));
        // Nine continuation bytes: still possibly incomplete.
        let mut buf = BytesMut::from(&[0x80u8; 9][..]);
        assert_eq!(codec.decode(&mut buf), Ok(None));
    }

    #[test]
    fn garbage_bodies_are_typed_errors() {
        for codec in [Codec::default(), Codec::default().for_server()] {
            // A length of 3 followed by an invalid wire type.
            let mut buf = BytesMut::from(&[0x03, 0xff, 0xff, 0xff][..]);
            let err = codec.decode(&mut buf).unwrap_err();
            assert!(matches!(err, FrameError::Malformed(_)), "{err:?}");
            assert_eq!(err.code(), crate::ErrorCode::MalformedFrame);
        }
        let server = Codec::default().for_server();
        // A well-formed protobuf with no body set.
        let mut buf = BytesMut::from(&[0x02, 0x08, 0x05][..]);
        assert_eq!(server.decode(&mut buf), Err(FrameError::EmptyBody));
        // Zero-length frame: empty message, no body.
        let mut buf = BytesMut::from(&[0x00][..]);
        assert_eq!(server.decode(&mut buf), Err(FrameError::EmptyBody));
    }

    #[test]
    fn a_client_skips_a_body_it_does_not_know() {
        // A push from a newer server (field 199, an empty message) comes
        // out of a client's codec with no body, and the frame after it
        // intact; a server's codec refuses such a frame.
        let mut bytes = Vec::new();
        put_varint((199 << 3) | 2, &mut bytes);
        bytes.push(0);
        let mut unknown = Vec::new();
        put_varint(bytes.len() as u64, &mut unknown);
        unknown.extend_from_slice(&bytes);
        let mut buf = BytesMut::from(&unknown[..]);
        let next = Frame::push(Body::Heartbeat(proto::Heartbeat::default()));
        encode(&next, &mut buf);
        let client = Codec::default();
        let skipped = client.decode(&mut buf).unwrap().expect("a whole frame");
        assert_eq!((skipped.request_id, skipped.body), (0, None));
        assert_eq!(client.decode(&mut buf).unwrap(), Some(next));
        let mut buf = BytesMut::from(&unknown[..]);
        assert!(Codec::default().for_server().decode(&mut buf).is_err());
    }

    #[test]
    fn pseudo_random_bytes_never_panic() {
        // A deterministic xorshift stream stands in for a fuzzer in unit
        // tests: whatever the bytes, decode returns, consumes at most what
        // it was given, and never panics.
        let codec = Codec::new(4096);
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..2000 {
            let len = (round % 300) + 1;
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state as u8);
            }
            let mut buf = BytesMut::from(&bytes[..]);
            loop {
                let before = buf.len();
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => assert!(buf.len() < before),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn frame_len_hint_matches_encoding() {
        let codec = Codec::default();
        for frame in sample_frames() {
            let mut buf = BytesMut::new();
            encode(&frame, &mut buf);
            // One byte is a complete prefix unless it has the continuation bit.
            assert!(codec.frame_len_hint(&buf[..1]).is_some() || buf[0] & 0x80 != 0);
            assert_eq!(codec.frame_len_hint(&buf), Some(buf.len()));
            assert_eq!(encoded_len(&frame), buf.len());
        }
    }
}
