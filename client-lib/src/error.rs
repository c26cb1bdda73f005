//! The one error type of the client library: flat, cloneable, and carrying
//! the server's stable code when there is one.

use std::time::Duration;

use chat_protocol::ErrorCode;

/// Why a client call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server refused the request, or closed the connection, with a
    /// stable code.
    #[error("server refused: {code}: {message}")]
    Server {
        /// Stable wire code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
        /// When the code is retryable: how long to wait first.
        retry_after: Option<Duration>,
    },
    /// No connection right now (the client is reconnecting). Retry later.
    #[error("not connected")]
    Disconnected,
    /// The server did not answer in time.
    #[error("request timed out")]
    Timeout,
    /// Could not establish a connection (address, TLS, handshake).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The local outbox is full; wait for earlier sends to complete.
    #[error("outbox full ({0} messages waiting)")]
    OutboxFull(usize),
    /// The server sent something the client did not expect.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Bad client configuration (e.g. unreadable CA file).
    #[error("configuration: {0}")]
    Config(String),
    /// The client was closed or logged out.
    #[error("client closed")]
    Closed,
    /// The session ended (logged out, its token expired, revoked or no
    /// longer valid): nothing more is sent with it; log in again. A send
    /// or request that was waiting when it ended has an unknown outcome.
    #[error("session ended: {0}")]
    SessionEnded(ErrorCode),
}

impl ClientError {
    /// The server's code, if the server produced this error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } | ClientError::SessionEnded(code) => Some(*code),
            _ => None,
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Server { code, .. } => code.is_retryable(),
            ClientError::Disconnected | ClientError::Timeout | ClientError::Connect(_) => true,
            _ => false,
        }
    }

    pub(crate) fn server(error: &chat_protocol::proto::Error) -> Self {
        ClientError::Server {
            code: ErrorCode::from_wire(error.code),
            message: error.message.clone(),
            retry_after: (error.retry_after_ms > 0)
                .then(|| Duration::from_millis(error.retry_after_ms.into())),
        }
    }

    /// The error a closed connection implies for requests still waiting.
    pub(crate) fn from_connection(e: &quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(close) => ClientError::Server {
                code: ErrorCode::from_wire(
                    close.error_code.into_inner().min(i32::MAX as u64) as i32
                ),
                message: String::from_utf8_lossy(&close.reason).into_owned(),
                retry_after: None,
            },
            quinn::ConnectionError::LocallyClosed => ClientError::Closed,
            _ => ClientError::Disconnected,
        }
    }

    /// The error a closed connection means for a request that was waiting
    /// on it: `Disconnected` (its outcome unknown: ask again) when the
    /// close's code says why the connection ended (LIMIT_REACHED,
    /// SERVER_SHUTTING_DOWN, INTERNAL, ...), not how the request went;
    /// `SessionEnded` when the session ended; the code itself, final, when
    /// it says the client's frames broke the protocol (asked again, the
    /// request would only close the next connection too).
    pub(crate) fn for_waiting(e: &quinn::ConnectionError) -> Self {
        match Self::from_connection(e) {
            ClientError::Server { code, .. } if ends_session(code) => {
                ClientError::SessionEnded(code)
            }
            ClientError::Server { code, .. } if !broke_protocol(code) => ClientError::Disconnected,
            other => other,
        }
    }
}

/// Whether a connection closed with `code` cannot be resumed: the session
/// is over.
pub(crate) fn ends_session(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::LoggedOut
            | ErrorCode::TokenExpired
            | ErrorCode::TokenRevoked
            | ErrorCode::TokenInvalid
    )
}

/// Whether the server closed the connection for something the client sent.
fn broke_protocol(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::MalformedFrame
            | ErrorCode::FrameTooLarge
            | ErrorCode::UnexpectedFrame
            | ErrorCode::BadStream
            | ErrorCode::Unauthenticated
    )
}
