//! One module per stream kind. Each `serve` function owns its stream for
//! the life of the connection: it reads requests in order and queues
//! replies and pushes through the session's outbound queue for that kind.

pub mod calls;
pub mod control;
pub mod media;
pub mod messages;
pub mod receipts;

use chat_protocol::{Body, Frame, proto};

/// The `Ok` reply to `request_id`.
pub(crate) fn ok(request_id: u64) -> Frame {
    Frame::new(request_id, Body::Ok(proto::Ok {}))
}

/// Current time in Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
