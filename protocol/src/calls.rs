//! Group calls: the bound on signals and the framing of media datagrams
//! (see the calls section of `chat.proto`). Shared so that a client
//! refuses what a server would, and both read datagrams the same way.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest `CallSignal.payload`. An SDP offer for audio and video with a
/// few codecs and simulcast layers is a few KiB; ICE candidates are a few
/// hundred bytes each.
pub const MAX_SIGNAL_BYTES: usize = 32 * 1024;

/// Longest prefix the server puts before a forwarded payload (a varint
/// of a `u32`).
pub const MAX_MEDIA_PREFIX: usize = 5;

/// A forwarded media datagram as a receiver gets it: `from`'s varint
/// participant id, then `payload`.
pub fn encode_forwarded(from: u32, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(MAX_MEDIA_PREFIX + payload.len());
    prost::encoding::encode_varint(u64::from(from), &mut out);
    out.put_slice(payload);
    out.freeze()
}

/// Splits a forwarded datagram into the sender's participant id and the
/// payload, or `None` if it does not start with a varint that fits a
/// `u32`.
pub fn decode_forwarded(mut datagram: Bytes) -> Option<(u32, Bytes)> {
    let from = prost::encoding::decode_varint(&mut datagram).ok()?;
    let from = u32::try_from(from).ok()?;
    let payload = datagram.copy_to_bytes(datagram.remaining());
    Some((from, payload))
}

/// Why a signal is refused, or `None` if it may be sent.
pub fn check_signal(payload: &[u8]) -> Option<&'static str> {
    if payload.is_empty() {
        return Some("a call signal needs a payload");
    }
    if payload.len() > MAX_SIGNAL_BYTES {
        return Some("call signal payload longer than 32 KiB");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_datagrams_round_trip() {
        for from in [0, 1, 127, 128, 16_383, 16_384, u32::MAX] {
            let datagram = encode_forwarded(from, b"rtp");
            let prefix = prost::encoding::encoded_len_varint(u64::from(from));
            assert_eq!(datagram.len(), prefix + 3);
            assert!(prefix <= MAX_MEDIA_PREFIX);
            let (got, payload) = decode_forwarded(datagram).expect("decodes");
            assert_eq!((got, &payload[..]), (from, &b"rtp"[..]));
        }
        // An empty payload is still a datagram of its sender.
        assert_eq!(
            decode_forwarded(encode_forwarded(7, b"")),
            Some((7, Bytes::new()))
        );
    }

    #[test]
    fn broken_prefixes_are_refused() {
        // A varint that never ends, and one beyond u32.
        assert_eq!(decode_forwarded(Bytes::from_static(&[0x80, 0x80])), None);
        assert_eq!(decode_forwarded(Bytes::new()), None);
        let mut big = BytesMut::new();
        prost::encoding::encode_varint(u64::from(u32::MAX) + 1, &mut big);
        assert_eq!(decode_forwarded(big.freeze()), None);
    }

    #[test]
    fn signals_are_bounded() {
        assert_eq!(check_signal(b"v=0"), None);
        assert_eq!(check_signal(&vec![1; MAX_SIGNAL_BYTES]), None);
        assert!(check_signal(&vec![1; MAX_SIGNAL_BYTES + 1]).is_some());
        assert!(check_signal(b"").is_some());
    }
}
