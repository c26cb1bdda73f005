//! `chat-client`: the library iOS and Android apps embed to talk to
//! `chat-server`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), chat_client::ClientError> {
//! use chat_client::{Client, ClientConfig, Event};
//! let config = ClientConfig::new("127.0.0.1:4433".parse().unwrap(), "localhost")
//!     .with_ca_file("data/certs/ca.pem")?;
//! let (client, mut events) = Client::login(config, "alice", "correct horse").await?;
//! let friends = client.friends().await?;
//! if let Some(bob) = friends.friends.first() {
//!     let chat = client.open_direct(bob.user_id).await?;
//!     let ack = client.send_text(chat.conversation_id, "hi Bob").await?;
//!     println!("sent as seq {}", ack.seq);
//! }
//! while let Some(event) = events.next().await {
//!     if let Event::Message(m) = event {
//!         println!("{}: {}", m.sender_id, m.text);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! What the library does for the app:
//! * one QUIC connection with separate control, messages and receipts
//!   streams;
//! * automatic reconnect with exponential backoff, resuming with the session
//!   token;
//! * photos on media streams of their own (`upload_photo`, then
//!   `send_photo`; `download_photo` checks what it gets against the
//!   photo's SHA-256), so a large one never holds up a text;
//! * group calls (with [`ClientConfig::calls`] on): rings and call
//!   changes come as [`Event::Call`], the participants' SDP and ICE as
//!   [`Event::CallSignal`], and media travels as QUIC datagrams
//!   ([`Client::send_call_media`], [`Client::call_media`]), which the
//!   server forwards to the call's other participants; a call is held by
//!   one connection, so after a reconnect the app joins again;
//! * notifications while the app is not in the foreground: the app hands
//!   its APNs or FCM token to `register_push` after each login (and when
//!   the platform gives it a new one); a notification names the
//!   conversation and message (`event_id` = `conversation/seq`) and the
//!   badge, and the app (or its notification extension, with a small
//!   client started in the background) reads the message itself;
//! * a bounded outbox: `send_text` survives reconnects, is retried with the
//!   same `client_msg_id` (so the server stores it once), and resolves when
//!   the server says "sent" (`send_message_with_id` and [`Outgoing`] let
//!   the app keep the key of any kind of message across a restart);
//! * group creation and changes happen once however often they have to
//!   ask: each request carries an idempotency key and is asked again when
//!   an answer is lost (`create_group_with_key` lets the app keep the key
//!   of a creation);
//! * every message reaches the app, once per client: messages are
//!   deduplicated by (conversation, seq) (one that comes after later
//!   messages of its conversation, as a retried send found stored can,
//!   still reaches the app within 256 seqs of the highest it has), and
//!   acknowledged to the server only once the app has them (when it takes
//!   them from [`Events`], or when it says so with [`Client::ack_delivery`],
//!   [`DeliveryAcks::Manual`]), so that messages still queued when the
//!   app's process dies are delivered again; with no reader of
//!   [`Events`] (dropped while the client is kept), nothing is
//!   acknowledged, and those messages come again on the next connection
//!   (to the user's next client). An app that goes away
//!   gracefully calls [`Client::shutdown`]: its sends are answered and the
//!   acks of what it took (with [`DeliveryAcks::Manual`]: what it acked)
//!   are confirmed by the server before it closes, so the next client gets
//!   again what it never took and none of what it took (within the
//!   shutdown's timeout). A client
//!   that only closes, or dies, may leave acks unwritten: across such
//!   clients delivery is at least once, and an app that stores messages
//!   drops a (conversation, seq) it has;
//! * a client lives while the app holds it: dropping the last clone of a
//!   [`Client`] closes it as [`Client::close`] does, and the [`Events`]
//!   stream ends when the client closes;
//! * reconnecting never waits for the app: connection-state events are
//!   dropped when the event queue is full (messages never are);
//! * receipt events never go back: a receipt reaches the app only if it
//!   raises a member's delivered or seen watermark, merged with what the
//!   app was told of them (see [`Events`] for the one gap);
//! * bounded state whatever a server sends: presence is kept for the
//!   watched users only, receipt watermarks for the conversations the app
//!   asked about (at most 10,000 members each), the watermarks told to the
//!   app of the 32,768 (conversation, member) pairs raised last, and the
//!   deduplication marks of the 16,384 conversations with the latest
//!   deliveries.
//!
//! API boundary: everything public here is what app developers program
//! against; errors are flat ([`ClientError`] with a wire [`ErrorCode`]) so a
//! UniFFI layer can wrap them.

mod acks;
mod calls;
mod client;
mod config;
mod connection;
mod dedup;
mod error;
mod media;
mod outbox;
mod reactions;
mod receipts;

pub use calls::{CallMedia, MediaPacket};
pub use chat_protocol::proto;
pub use chat_protocol::{ErrorCode, StreamKind};
pub use client::{
    Client, Event, Events, GROUP_REQUEST_ATTEMPTS, HistoryDirection, Identity, Outgoing,
    ReceiptStatus,
};
pub use config::{ClientConfig, DeliveryAcks};
pub use error::ClientError;
pub use media::PhotoUpload;
pub use reactions::{Edits, Reactions, Unsends};
