//! `chat-server`: the QUIC chat server, as a library (the binary is a thin
//! `main`), so tests and the load generator can run it in process.
//!
//! A tour, in the order a message travels:
//!
//! * [`endpoint`]: binds the QUIC endpoint (TLS 1.3, ALPN `chat/1`), accepts
//!   connections under a cap, shuts down gracefully.
//! * [`session`]: one per connection; routes each client stream by the kind
//!   it announces and enforces "authenticate first".
//! * [`streams`]: one module per stream kind (`control`, `messages`,
//!   `receipts`, `calls`, `media`).
//! * [`delivery`]: the group-commit pipeline every send and receipt goes
//!   through: durable first, then ack, then fan-out.
//! * [`hub`]: the node's connected sessions and their outbound queues.
//! * [`calls`]: group calls: ringing, participants, signal relay and
//!   the forwarding of call media datagrams.
//! * [`presence`]: online status, last-active times, coalesced updates to
//!   subscribed friends.
//! * [`store`]: storage traits and backends (embedded SQLite now).
//! * [`auth`], [`certs`], [`config`], [`error`], [`wire`]: the supporting
//!   cast.
//!
//! Architecture invariant: stream handlers talk to `dyn HistoryStore` and
//! `dyn RecentCache` only; they never know which backend is configured.

pub mod auth;
pub mod calls;
pub mod certs;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod endpoint;
pub mod error;
pub mod http;
pub mod hub;
pub mod media;
pub mod metrics;
pub mod notify;
pub mod presence;
pub mod queue;
pub mod ratelimit;
pub mod receipts;
pub mod session;
pub mod store;
pub mod streams;
pub mod wire;

pub use config::Config;
pub use endpoint::{Server, ServerError};
