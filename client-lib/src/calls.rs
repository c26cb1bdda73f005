//! Group calls: the media datagrams a call's other participants send,
//! as the server forwards them (see [`Client::start_call`]).
//!
//! [`Client::start_call`]: crate::Client::start_call

use bytes::Bytes;
use tokio::sync::mpsc;

/// Media datagrams queued for the app before newer ones are dropped
/// (media is real time: a late packet is worth less than none).
pub(crate) const MEDIA_QUEUE: usize = 512;

/// One media datagram from another participant of this connection's call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPacket {
    /// The sender's participant id (see `CallJoined.participants` and
    /// `CallEvent` JOINED).
    pub from: u32,
    /// What the sender passed to [`Client::send_call_media`](crate::Client::send_call_media).
    pub payload: Bytes,
}

/// The app's stream of call media (see [`Client::call_media`](crate::Client::call_media)).
/// Unreliable, like the datagrams it is made of: packets may be lost or
/// come out of order, and while the app does not take them, those beyond
/// 512 queued are dropped.
pub struct CallMedia {
    pub(crate) rx: mpsc::Receiver<MediaPacket>,
}

impl CallMedia {
    /// The next packet; `None` once the client is closed.
    pub async fn next(&mut self) -> Option<MediaPacket> {
        self.rx.recv().await
    }

    /// The next packet if one is queued.
    pub fn try_next(&mut self) -> Option<MediaPacket> {
        self.rx.try_recv().ok()
    }
}

/// Reads the datagrams of one connection into the app's media queue
/// until the connection ends. Datagrams that are not a forwarded packet
/// are dropped.
pub(crate) async fn read_media(conn: quinn::Connection, tx: mpsc::Sender<MediaPacket>) {
    while let Ok(datagram) = conn.read_datagram().await {
        match chat_protocol::calls::decode_forwarded(datagram) {
            Some((from, payload)) => {
                // Full: the app is behind, and this packet is late already.
                let _ = tx.try_send(MediaPacket { from, payload });
            }
            None => tracing::debug!("dropping a datagram that is not call media"),
        }
    }
}
