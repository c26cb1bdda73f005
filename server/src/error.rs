//! Errors a request can end with, and the one place where internal errors
//! become wire codes.

use std::time::Duration;

use chat_protocol::{ErrorCode, Frame, proto};

use crate::store::StoreError;

/// Why a request was refused: the code and detail the client receives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    /// Stable wire code.
    pub code: ErrorCode,
    /// Human-readable detail (never parsed by clients, never secret).
    pub message: String,
    /// For retryable codes: when to try again.
    pub retry_after_ms: u32,
}

/// How long a client should wait before retrying after UNAVAILABLE.
const UNAVAILABLE_RETRY_MS: u32 = 1_000;

impl Refusal {
    /// A refusal with a code and detail.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            retry_after_ms: 0,
        }
    }

    /// The same refusal, asking the client to retry after `wait`.
    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        self.retry_after_ms = retry_after_ms(wait);
        self
    }

    /// The `Error` frame answering `request_id`.
    pub fn to_frame(&self, request_id: u64) -> Frame {
        Frame::new(
            request_id,
            proto::frame::Body::Error(proto::Error {
                code: self.code as i32,
                message: self.message.clone(),
                retry_after_ms: self.retry_after_ms,
            }),
        )
    }
}

/// `wait` as a `retry_after_ms`: whole milliseconds, at least 1 (0 means
/// "no retry-after" on the wire).
pub fn retry_after_ms(wait: Duration) -> u32 {
    u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1)
}

impl From<StoreError> for Refusal {
    /// The single mapping from store failures to wire codes. Internal detail
    /// is logged, not sent.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Refusal::new(ErrorCode::InvalidArgument, "already exists"),
            StoreError::NotFound => Refusal::new(ErrorCode::NotFound, "not found"),
            StoreError::NotAMember => {
                Refusal::new(ErrorCode::NotAMember, "not a member of this conversation")
            }
            StoreError::NotAdmin => {
                Refusal::new(ErrorCode::NotAdmin, "only group admins may do this")
            }
            StoreError::LimitReached => {
                Refusal::new(ErrorCode::LimitReached, "group size limit reached")
            }
            StoreError::NotFriends(user) => Refusal::new(
                ErrorCode::NotFriends,
                format!("user {user} is not your friend"),
            ),
            StoreError::Invalid(why) => Refusal::new(ErrorCode::InvalidArgument, why),
            StoreError::Unavailable(detail) | StoreError::Unsettled(detail) => {
                tracing::warn!(%detail, "store unavailable");
                Refusal {
                    code: ErrorCode::Unavailable,
                    message: "storage temporarily unavailable; retry".into(),
                    retry_after_ms: UNAVAILABLE_RETRY_MS,
                }
            }
            StoreError::Internal(detail) => {
                tracing::error!(%detail, "store failure");
                Refusal::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_store_error_has_a_code() {
        let cases = [
            (StoreError::Conflict, ErrorCode::InvalidArgument),
            (StoreError::NotFound, ErrorCode::NotFound),
            (StoreError::NotAMember, ErrorCode::NotAMember),
            (StoreError::NotAdmin, ErrorCode::NotAdmin),
            (StoreError::LimitReached, ErrorCode::LimitReached),
            (StoreError::NotFriends(7), ErrorCode::NotFriends),
            (
                StoreError::Invalid("why".into()),
                ErrorCode::InvalidArgument,
            ),
            (
                StoreError::Unavailable("down".into()),
                ErrorCode::Unavailable,
            ),
            (
                StoreError::Unsettled("unknown".into()),
                ErrorCode::Unavailable,
            ),
            (StoreError::Internal("bug".into()), ErrorCode::Internal),
        ];
        for (error, code) in cases {
            let refusal = Refusal::from(error);
            assert_eq!(refusal.code, code);
            assert!(
                !refusal.message.contains("bug"),
                "internal detail stays in logs"
            );
        }
        assert!(Refusal::from(StoreError::Unavailable(String::new())).retry_after_ms > 0);
    }
}
