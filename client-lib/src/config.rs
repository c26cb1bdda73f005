//! Client configuration: where the server is, which CA to trust, and the
//! knobs an app may tune (reconnect backoff, outbox size, timeouts).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::error::ClientError;

/// See the module docs.
#[derive(Clone)]
pub struct ClientConfig {
    /// Server UDP address.
    pub server_addr: SocketAddr,
    /// Name the server certificate must be valid for.
    pub server_name: String,
    /// Device label stored with the session.
    pub device_name: String,
    /// Certificates to trust as roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// Messages that may wait in the outbox.
    pub outbox_limit: usize,
    /// Events buffered for the app before the client stops reading.
    pub event_capacity: usize,
    /// How long a request waits for its answer.
    pub request_timeout: Duration,
    /// First reconnect delay; doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// QUIC keep-alive: below typical NAT binding lifetimes (~30 s).
    pub keep_alive: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Longest a delivery ack waits for company. Acks are not urgent (they
    /// move the server's watermark and the sender's "delivered" tick), so
    /// they wait to leave with the next message this device sends, in the
    /// same packet, and acks that pile up meanwhile go as one per
    /// conversation. It counts from when the app has the message (see
    /// `delivery_acks`: an app that drains its events promptly takes it as
    /// it arrives). Keep it under QUIC's ack delay (25 ms) so the
    /// transport's own acknowledgement of the delivery rides along too.
    pub delivery_ack_linger: Duration,
    /// When a delivered message is acknowledged to the server.
    pub delivery_acks: DeliveryAcks,
    /// Heartbeat this often instead of at the interval the server
    /// announces at login, even if it asks for none (never more often
    /// than once a second). For load generators and tests: a client that
    /// heartbeats less often than the server asks shows offline between
    /// its heartbeats.
    pub heartbeat_interval: Option<Duration>,
    /// Start as if [`Client::set_heartbeats`](crate::Client::set_heartbeats)
    /// had been turned off: an app woken in the background (a push, a
    /// background fetch) resumes its session and syncs without showing its
    /// user online. A login or registration counts as activity itself (a
    /// password is typed in the foreground); the client then tells the
    /// server it is in the background, as after `set_heartbeats(false)`.
    pub start_in_background: bool,
    /// Open a calls stream on every connection, so that calls ring this
    /// device in the app ([`Event::Call`](crate::Event::Call)) and it can
    /// start and join them. Off by default: an app that takes calls turns
    /// it on (a device without it is notified of rings instead, when it
    /// registered for notifications).
    pub calls: bool,
    /// Share one UDP socket among many clients (load generators).
    pub endpoint: Option<quinn::Endpoint>,
}

/// When a delivered message is acknowledged to the server, which then
/// stops redelivering it and tells its sender "delivered". Never before
/// the app has it: messages still queued for the app when its process
/// dies are delivered again on the next connection. Nor when it has no
/// reader (the app dropped its [`Events`](crate::Events) but kept the
/// client): such messages stay unacknowledged and come again on the next
/// connection, to the user's next client or another device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeliveryAcks {
    /// When the app takes the message from [`Events`](crate::Events).
    /// Only the message in the app's hands can be lost if the process
    /// dies.
    #[default]
    OnTake,
    /// When the app calls [`Client::ack_delivery`](crate::Client::ack_delivery),
    /// e.g. once it has stored the message: nothing is lost, and an app
    /// that dies before acking gets the message again.
    Manual,
}

impl ClientConfig {
    /// Defaults for a server at `server_addr` presenting a certificate for
    /// `server_name`. Add a root with [`with_ca_file`](Self::with_ca_file).
    pub fn new(server_addr: SocketAddr, server_name: impl Into<String>) -> Self {
        ClientConfig {
            server_addr,
            server_name: server_name.into(),
            device_name: "chat-client".into(),
            roots: Vec::new(),
            outbox_limit: 1_000,
            event_capacity: 4_096,
            request_timeout: Duration::from_secs(15),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            keep_alive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            delivery_ack_linger: Duration::from_millis(20),
            delivery_acks: DeliveryAcks::OnTake,
            heartbeat_interval: None,
            start_in_background: false,
            calls: false,
            endpoint: None,
        }
    }

    /// Trusts the CA certificate(s) in a PEM file (e.g. the server's dev CA).
    pub fn with_ca_file(mut self, path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ClientError::Config(format!("read CA from {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(ClientError::Config(format!(
                "no certificate in {}",
                path.display()
            )));
        }
        self.roots.extend(certs);
        Ok(self)
    }

    /// The quinn client configuration (TLS 1.3, ALPN `chat/1`, the trusted
    /// roots), for tools that speak the protocol directly.
    pub fn quinn_client_config(&self) -> Result<quinn::ClientConfig, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in &self.roots {
            roots
                .add(cert.clone())
                .map_err(|e| ClientError::Config(format!("bad CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ClientError::Config(
                "no CA to trust: use with_ca_file".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![chat_protocol::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(
                quinn::IdleTimeout::try_from(self.idle_timeout)
                    .map_err(|e| ClientError::Config(e.to_string()))?,
            ))
            // The server opens no streams toward the client.
            .max_concurrent_bidi_streams(0u32.into())
            .max_concurrent_uni_streams(0u32.into());
        config.transport_config(Arc::new(transport));
        Ok(config)
    }

    /// A UDP endpoint for this client, unless one is shared.
    pub(crate) fn endpoint(&self) -> Result<quinn::Endpoint, ClientError> {
        if let Some(endpoint) = &self.endpoint {
            return Ok(endpoint.clone());
        }
        let bind: SocketAddr = match (
            self.server_addr.ip().is_loopback(),
            self.server_addr.is_ipv4(),
        ) {
            (true, true) => "127.0.0.1:0",
            (true, false) => "[::1]:0",
            (false, true) => "0.0.0.0:0",
            (false, false) => "[::]:0",
        }
        .parse()
        .expect("literal socket address");
        quinn::Endpoint::client(bind)
            .map_err(|e| ClientError::Connect(format!("bind UDP socket: {e}")))
    }
}
