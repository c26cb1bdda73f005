//! The server's configuration: one typed [`Config`] with documented
//! defaults, read from a TOML file, then environment variables, then
//! command-line flags (later wins), and validated before anything starts.
//!
//! Keys are kebab-case in the file and the same words as flags, so
//! `idle-timeout = "30s"` in `[transport]` is `--idle-timeout 30s` on the
//! command line and `CHAT_IDLE_TIMEOUT=30s` in the environment. Durations
//! are written like `30s`, `500ms`, `30days`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chat_protocol::limits;
use serde::{Deserialize, Serialize};

/// Everything a node needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Config {
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// Directory for the embedded database, dev certificates and media.
    pub data_dir: PathBuf,
    /// Directory for uploaded photos (default: `media` in `data-dir`).
    /// Nodes that share a Postgres must share it too (a network file
    /// system), or a photo uploaded to one is not found on the others.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_dir: Option<PathBuf>,
    /// This node's name in presence records (default: its listen address,
    /// or the host's name and port when listening on every address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Redis for presence, unread queues and the recent cache, e.g.
    /// `redis://127.0.0.1:6379/0`. Unset: in process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (several deployments can share a Redis).
    pub redis_prefix: String,
    /// Postgres for history, e.g. `postgres://chat@db/chat`. Unset: the
    /// embedded SQLite file under `data-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres_url: Option<String>,
    /// Postgres connections in the pool.
    pub postgres_pool_size: usize,
    /// How long the outcome of a COMMIT whose answer was lost is asked
    /// after before it is taken as unknown (sends then fail retryably and
    /// their conversations pause until the retries settle). It should
    /// outlast a database failover.
    #[serde(with = "humantime_serde")]
    pub postgres_commit_settle_timeout: Duration,
    /// Embedded store: shortest time between the starts of two SQLite
    /// transactions (group commit). Longer means fewer `fdatasync`s and
    /// less CPU per send for more latency (TUNING.md).
    #[serde(with = "humantime_serde")]
    pub sqlite_commit_gap: Duration,
    /// Pairs of committers (send and watermark), each owning a share of
    /// the conversations, so this many group commits can be in flight at
    /// once. Unset: 1 (TUNING.md: more only pays where Postgres has cores
    /// and a disk of its own and round trips dominate; on a shared host it
    /// splits batches and costs Postgres CPU).
    pub committers: usize,
    /// How long a graceful stop (SIGTERM / SIGINT) may take: connections
    /// are told to reconnect and in-flight group commits finish within it.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// HTTP address serving Prometheus `/metrics`, `/healthz` and
    /// `/readyz` (keep it on a private interface).
    pub metrics_listen: SocketAddr,
    /// Postgres schema to keep the tables in (created if missing). Unset:
    /// the URL's default `search_path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres_schema: Option<String>,
    /// TLS certificate and key.
    pub tls: TlsConfig,
    /// Per-user and per-frame limits.
    pub limits: Limits,
    /// QUIC transport settings.
    pub transport: Transport,
    /// Notifications for users with no connection in the foreground.
    pub push: PushConfig,
    /// Group calls.
    pub calls: CallsConfig,
}

/// Group calls (`[calls]`): ringing and the bounds on a call's
/// participants and media.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct CallsConfig {
    /// How long a call rings the members who have not answered.
    #[serde(with = "humantime_serde")]
    pub ring_timeout: Duration,
    /// How long an answered call's last participant may stay alone (the
    /// others gone from a group call, or the other side's connection lost
    /// in a direct one) before the call ends: time to come back.
    #[serde(with = "humantime_serde")]
    pub call_alone_timeout: Duration,
    /// Most participants in one call. Each media datagram is forwarded to
    /// every other participant, so a call costs the node its participants
    /// squared in media.
    pub max_call_participants: usize,
    /// Groups of up to this many members ring every member when a call
    /// starts; larger groups ring nobody (members join by starting the
    /// call themselves, which joins the running one).
    pub call_ring_max_members: usize,
    /// Media bytes per second one participant may send (forwarded to each
    /// of the others); beyond it datagrams are dropped. The default, 512
    /// KiB/s, is 4 Mbit/s: 720p video with room.
    pub call_media_rate: u32,
    /// Media bytes per second the node forwards, all calls together (each
    /// copy counted: a datagram to three others is three); beyond it
    /// datagrams are dropped. The default, 125,000,000, is 1 Gbit/s: a
    /// node's share of its uplink, so calls cannot starve its messages.
    pub call_media_node_rate: u64,
}

impl Default for CallsConfig {
    fn default() -> Self {
        CallsConfig {
            ring_timeout: Duration::from_secs(45),
            call_alone_timeout: Duration::from_secs(60),
            max_call_participants: 16,
            call_ring_max_members: 50,
            call_media_rate: 512 * 1024,
            call_media_node_rate: 125_000_000,
        }
    }
}

impl CallsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |msg: String| Err(ConfigError(msg));
        if self.ring_timeout < Duration::from_secs(1)
            || self.ring_timeout > Duration::from_secs(600)
        {
            return err("ring-timeout must be between 1s and 10m".into());
        }
        if self.call_alone_timeout < Duration::from_secs(1)
            || self.call_alone_timeout > Duration::from_secs(3600)
        {
            return err("call-alone-timeout must be between 1s and 1h".into());
        }
        if !(2..=64).contains(&self.max_call_participants) {
            return err("max-call-participants must be between 2 and 64".into());
        }
        if self.call_ring_max_members > 10_000 {
            return err("call-ring-max-members must be at most 10000".into());
        }
        if !(1024..=64 << 20).contains(&self.call_media_rate) {
            return err(
                "call-media-rate must be between 1024 and 67108864 bytes per second".into(),
            );
        }
        if !(1024..=1 << 40).contains(&self.call_media_node_rate) {
            return err(
                "call-media-node-rate must be between 1024 and 1099511627776 bytes per second"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Where and how notifications go (`[push]`). Without a gateway URL no
/// notification is sent (devices may still register their tokens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct PushConfig {
    /// The push gateway's notify endpoint, `http://` or `https://` (a
    /// Matrix-style push gateway, such as Sygnal, at
    /// `/_matrix/push/v1/notify`), which holds the APNs and FCM
    /// credentials. Unset: no notifications.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_gateway_url: Option<String>,
    /// PEM file of the CA that signs an `https://` gateway's certificate
    /// (a private CA). Unset: the public web PKI's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_gateway_ca: Option<PathBuf>,
    /// A conversation notifies a user at most once in this window; the
    /// messages it gets meanwhile make one notification at its end.
    #[serde(with = "humantime_serde")]
    pub push_coalesce: Duration,
    /// A message pushed to a connection in the foreground that no device
    /// of the user acknowledges within this long is notified as if the
    /// user were away: a phone that lost its network, or an app killed in
    /// the foreground, keeps its connection open on the server until the
    /// idle timeout. 0: never.
    #[serde(with = "humantime_serde")]
    pub push_unacked_after: Duration,
    /// How long one request to the gateway may take.
    #[serde(with = "humantime_serde")]
    pub push_timeout: Duration,
    /// Requests to the gateway in flight at once.
    pub push_concurrency: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            push_gateway_url: None,
            push_gateway_ca: None,
            push_coalesce: Duration::from_secs(3),
            push_unacked_after: Duration::from_secs(5),
            push_timeout: Duration::from_secs(10),
            push_concurrency: 64,
        }
    }
}

/// TLS material. With neither path set, the server uses (and on first
/// start creates) a development CA and certificate under
/// `<data-dir>/certs/`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
}

/// A backend URL without its password, for logs, errors and
/// `--print-config`: `scheme://user:***@host` when it has one, a
/// `password=` query parameter, and the `password` of a key=value
/// Postgres string (spaces around `=` and quoted values included).
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme) = url.find("://") else {
        return redact_key_values(url);
    };
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], Some(&url[q + 1..])),
        None => (url, None),
    };
    let mut out = match base.rfind('@') {
        Some(at) if at > scheme => match base[scheme + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &base[..scheme + 3], &base[at..]),
            None => base.to_string(),
        },
        _ => base.to_string(),
    };
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => param.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// `key=value` pairs (libpq's form) with the password's value hidden.
fn redact_key_values(text: &str) -> String {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let key_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let key = &rest[..key_end];
        let after_key = rest[key_end..].trim_start();
        let Some(after_eq) = after_key.strip_prefix('=') else {
            // Not a pair: keep the word as it is.
            out.push(key.to_string());
            rest = after_key;
            continue;
        };
        let value_start = after_eq.trim_start();
        let value_len = if let Some(quoted) = value_start.strip_prefix('\'') {
            // Up to the closing quote; a backslash escapes the next char.
            let mut escaped = false;
            let close = quoted.char_indices().find(|&(_, c)| {
                let end = c == '\'' && !escaped;
                escaped = c == '\\' && !escaped;
                end
            });
            close.map_or(value_start.len(), |(i, _)| i + 2)
        } else {
            value_start
                .find(char::is_whitespace)
                .unwrap_or(value_start.len())
        };
        let value = &value_start[..value_len];
        if key.eq_ignore_ascii_case("password") {
            out.push(format!("{key}=***"));
        } else {
            out.push(format!("{key}={value}"));
        }
        rest = value_start[value_len..].trim_start();
    }
    out.join(" ")
}

/// Application limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted on any stream, in bytes.
    pub max_frame_len: usize,
    /// Largest message text, in bytes of UTF-8 (a photo's caption and its
    /// preview together).
    pub max_text_len: usize,
    /// How long a session token stays valid after login.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// How long a session is kept after it expired or was revoked, so a
    /// device coming back is told which (TOKEN_EXPIRED, TOKEN_REVOKED)
    /// rather than TOKEN_INVALID; then its row is deleted.
    #[serde(with = "humantime_serde")]
    pub session_retention: Duration,
    /// How often the node deletes sessions past `session-retention`.
    #[serde(with = "humantime_serde")]
    pub session_purge_interval: Duration,
    /// How long a new connection may take to authenticate.
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Friends per user.
    pub max_friends: u64,
    /// Failed Register / Login / Authenticate attempts allowed on one
    /// connection before the server closes it.
    pub max_auth_attempts: u32,
    /// How often clients send a heartbeat (announced at login).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A user counts as online while activity arrived within
    /// `heartbeat-interval x presence-ttl-multiple`.
    pub presence_ttl_multiple: u32,
    /// Users one connection may watch the presence of.
    pub max_presence_subscriptions: usize,
    /// Connections one user may have authenticated on this node at once
    /// (their devices); one more is refused LIMIT_REACHED with a
    /// retry-after, so a stolen or looping token cannot take the node's
    /// connection places (each also multiplies the user's fan-out).
    pub max_sessions_per_user: usize,
    /// Of those, connections that may use one session token (one device's
    /// login; above `max-sessions-per-user` it changes nothing): someone
    /// holding a copy of a token cannot take all of the user's places, so
    /// the owner's other devices, and a new login, still get in. One more
    /// replaces the token's oldest connection, so whoever holds the token
    /// (its owner) can always resume it and log it out.
    pub max_sessions_per_token: usize,
    /// Devices one user may be logged in on (live sessions, in the store,
    /// across nodes): a login beyond it logs the oldest out, so the
    /// sessions kept per user stay bounded however often a client logs in.
    pub max_logged_in_devices: u32,
    /// Members per group.
    pub max_group_size: usize,
    /// Conversations of up to this many members push every member's
    /// delivered / seen receipts to every other member; larger groups push
    /// them only to the senders of the messages they cover (receipts grow
    /// with the square of the size otherwise).
    pub receipt_broadcast_max_members: usize,
    /// Wrong passwords allowed per account from one source address (an
    /// IPv4 address or an IPv6 /64) per `login-failure-window`, across all
    /// connections; then logins from there answer RATE_LIMITED.
    pub max_login_failures: u32,
    /// Wrong passwords allowed per account from all sources together per
    /// `login-failure-window`; then every login of the account answers
    /// RATE_LIMITED. Bounds guessing spread over many addresses.
    pub max_account_login_failures: u32,
    /// The window for `max-login-failures`.
    #[serde(with = "humantime_serde")]
    pub login_failure_window: Duration,
    /// Registrations and logins that may wait for a password hasher (one
    /// per core); beyond it they are answered SERVER_BUSY with a
    /// retry-after at once (0: never wait).
    pub max_queued_password_checks: usize,
    /// Of those, at most this many from one source address (an IPv4
    /// address, an IPv6 /64) at once; its others wait for one of its own
    /// to end, so one host cannot fill the queue (0: no share).
    pub password_checks_per_address: usize,
    /// Registrations one source address (an IPv4 address, an IPv6 /64)
    /// may make per hour (a token bucket of this size, refilled over the
    /// hour; 0: no limit). Over it a registration is answered
    /// RATE_LIMITED with a retry-after. Accounts multiply every per-user
    /// limit (16 connections each): without it one host could register
    /// its way to every connection place.
    pub registrations_per_address: u32,
    /// Sustained sends per second per user, across their devices (a token
    /// bucket refilled at this rate; 0: no limit). Over it a send is
    /// answered RATE_LIMITED with a retry-after.
    pub send_rate: u32,
    /// Sends a user may make at once above `send-rate` (the bucket size).
    pub send_burst: u32,
    /// Sustained control requests per second per user, across their
    /// devices (friends, conversations, history, presence, receipts
    /// queries, group changes; not leaves, logouts or heartbeats, which
    /// have buckets of their own or none; 0: no limit). Over it a request
    /// is answered RATE_LIMITED with a retry-after.
    pub control_rate: u32,
    /// Control requests a user may make at once above `control-rate`: an
    /// app's start-up sync (conversation list, a page of history for each
    /// of the first screen's conversations, presence) stays under it.
    pub control_burst: u32,
    /// Sustained MarkSeen frames per second per user, across their
    /// devices (0: no limit). A mark that moves nothing costs the store a
    /// membership lookup, whatever conversation it names; over it a mark
    /// is answered RATE_LIMITED with a retry-after.
    pub mark_rate: u32,
    /// MarkSeen frames a user may send at once above `mark-rate`: an app
    /// marking a thousand conversations read at once stays under it.
    pub mark_burst: u32,
    /// Sustained Typing frames per second per user, across their devices
    /// (0: no limit). Each is a store read and a frame to every connected
    /// device of the conversation's other members; a client sends one
    /// every 3 s per conversation it types in, and one when it stops.
    pub typing_rate: u32,
    /// Typing frames a user may send at once above `typing-rate`.
    pub typing_burst: u32,
    /// How long after sending a text its author may edit it (0s: no
    /// edits); announced at login (`AuthOk.edit_window_ms`).
    #[serde(with = "humantime_serde")]
    pub edit_window: Duration,
    /// How long after sending a text or photo its author may unsend it
    /// for everyone (0s: no unsends); announced at login
    /// (`AuthOk.unsend_window_ms`).
    #[serde(with = "humantime_serde")]
    pub unsend_window: Duration,
    /// Largest photo accepted, in bytes (announced at login). An upload
    /// declaring more is refused before any of its bytes are read.
    pub max_photo_bytes: u64,
    /// How long an upload is kept when no send names it; then it is
    /// deleted (by the purge that runs every `session-purge-interval`).
    #[serde(with = "humantime_serde")]
    pub upload_retention: Duration,
    /// Photo uploads one user may make per hour, across their devices (a
    /// token bucket of this size, refilled over the hour; 0: no limit).
    /// Over it an upload is answered RATE_LIMITED with a retry-after.
    pub uploads_per_hour: u32,
}

/// Largest `max-logged-in-devices` accepted: what ListSessions lists, so
/// every live session can be seen and logged out one by one.
pub const MAX_LOGGED_IN_DEVICES: u32 = 100;

/// Longest `session-ttl` accepted (ten years).
const MAX_SESSION_TTL: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Longest `auth-timeout` accepted.
const MAX_AUTH_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest online window (`heartbeat-interval x presence-ttl-multiple`)
/// accepted.
const MAX_PRESENCE_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Shortest `write-stall` accepted: below it, a phone on a poor network
/// that reads a page a little late would be thrown off.
const MIN_WRITE_STALL: Duration = Duration::from_secs(1);

/// Longest `receipt-linger` accepted.
pub const MAX_RECEIPT_LINGER: Duration = Duration::from_secs(60);

/// QUIC transport settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Transport {
    /// Close a connection after this long without any packet.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Send a keep-alive after this long without sending (0s: off). Mobile
    /// NATs forget bindings after ~30 s, so clients keep-alive; the server
    /// need not.
    #[serde(with = "humantime_serde")]
    pub keep_alive_interval: Duration,
    /// Bidirectional streams a client may have open at once: control,
    /// messages, receipts, calls, plus a few media streams.
    pub max_concurrent_bidi_streams: u32,
    /// Per-stream receive window in bytes: the most a client can make the
    /// server buffer on one stream.
    pub stream_receive_window: u32,
    /// Per-connection receive window in bytes.
    pub receive_window: u32,
    /// Per-connection send buffer in bytes.
    pub send_window: u64,
    /// Connections this node accepts at once; more are closed with
    /// SERVER_BUSY right after the handshake.
    pub max_connections: usize,
    /// Connections from one address that may wait to authenticate at once
    /// (0: no limit); more are closed with SERVER_BUSY, so one host cannot
    /// fill `max-connections` with connections that never log in.
    pub max_unauthenticated_per_address: usize,
    /// Unidirectional streams a client may open at once (the protocol uses
    /// none yet; 0 refuses them).
    pub max_concurrent_uni_streams: u32,
    /// Congestion controller: `cubic`, `newreno` or `bbr`.
    pub congestion_controller: CongestionController,
    /// RTT assumed before the first measurement; sets the first
    /// retransmission timeout.
    #[serde(with = "humantime_serde")]
    pub initial_rtt: Duration,
    /// UDP payload size used from the start, in bytes (at least 1200, the
    /// QUIC minimum).
    pub initial_mtu: u16,
    /// UDP payload size the path is assumed to always carry; MTU discovery
    /// never goes below it.
    pub min_mtu: u16,
    /// Probe for a larger MTU than `initial-mtu` (DPLPMTUD).
    pub mtu_discovery: bool,
    /// Bytes of QUIC DATAGRAM frames (call media) buffered per connection
    /// before the oldest is dropped; 0 turns the extension off (calls then
    /// carry signaling only). Like the stream windows, a bound on what a
    /// client can make the node hold, allocated only while datagrams wait.
    pub datagram_receive_buffer: usize,
    /// Bytes of outgoing QUIC DATAGRAM frames buffered per connection.
    pub datagram_send_buffer: usize,
    /// The UDP socket's kernel receive buffer (SO_RCVBUF) in bytes; 0
    /// keeps the OS default. Raise it when the kernel drops datagrams under
    /// bursts (`netstat -su` receive buffer errors).
    pub socket_receive_buffer: usize,
    /// The UDP socket's kernel send buffer (SO_SNDBUF) in bytes; 0 keeps
    /// the OS default.
    pub socket_send_buffer: usize,
    /// Segmentation offload (GSO): hand the kernel several datagrams in
    /// one call where the platform supports it.
    pub gso: bool,
    /// Stateless retry: make every new client prove its address with a
    /// Retry round trip before the server keeps any state (costs one RTT;
    /// turn on under a spoofed-source flood).
    pub stateless_retry: bool,
    /// Let clients keep a connection across address changes (Wi-Fi to
    /// cellular, NAT rebinding).
    pub migration: bool,
    /// Accept 0-RTT early data on resumed TLS sessions; only replay-safe
    /// requests run before the handshake completes.
    pub zero_rtt: bool,
    /// Ask clients (QUIC ACK frequency extension) to acknowledge only every
    /// this many ack-eliciting packets (0: the extension is not used and
    /// clients acknowledge every other packet, as RFC 9000 says).
    pub ack_eliciting_threshold: u32,
    /// With `ack-eliciting-threshold`: the longest clients may delay an
    /// ACK (quinn clamps it to at most max(RTT, 25ms)).
    #[serde(with = "humantime_serde")]
    pub max_ack_delay: Duration,
    /// Longest time a receipt waits for more receipts, or for a frame on
    /// another stream of the same connection, to share its packet (0s:
    /// written at once). Status marks only: messages never wait.
    #[serde(with = "humantime_serde")]
    pub receipt_linger: Duration,
    /// How long a stream's writer waits with data pending while the client
    /// takes less than 16 KiB of it (its flow-control window shut, or
    /// opening a trickle at a time) before closing the connection with
    /// SLOW_CONSUMER.
    #[serde(with = "humantime_serde")]
    pub write_stall: Duration,
}

/// QUIC congestion control algorithms quinn provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CongestionController {
    /// CUBIC (RFC 9438): the default of most TCP stacks.
    Cubic,
    /// NewReno (RFC 9002's reference controller).
    #[value(name = "newreno")]
    NewReno,
    /// BBR (experimental in quinn): model-based, less hurt by random loss.
    Bbr,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            data_dir: PathBuf::from("./data"),
            media_dir: None,
            node_id: None,
            redis_url: None,
            redis_prefix: "chat:".into(),
            postgres_url: None,
            postgres_pool_size: 16,
            postgres_commit_settle_timeout: crate::store::postgres::COMMIT_SETTLE_TIMEOUT,
            sqlite_commit_gap: crate::store::sqlite::MIN_COMMIT_GAP,
            committers: 1,
            shutdown_timeout: Duration::from_secs(10),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            postgres_schema: None,
            tls: TlsConfig::default(),
            limits: Limits::default(),
            transport: Transport::default(),
            push: PushConfig::default(),
            calls: CallsConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_len: limits::DEFAULT_MAX_FRAME_LEN,
            max_text_len: limits::DEFAULT_MAX_TEXT_LEN,
            session_ttl: Duration::from_secs(30 * 24 * 3600),
            session_retention: Duration::from_secs(30 * 24 * 3600),
            session_purge_interval: Duration::from_secs(3600),
            auth_timeout: Duration::from_secs(10),
            max_friends: 5_000,
            max_auth_attempts: 5,
            heartbeat_interval: Duration::from_secs(15),
            presence_ttl_multiple: 3,
            max_presence_subscriptions: 500,
            max_sessions_per_user: 16,
            max_sessions_per_token: 4,
            max_logged_in_devices: 100,
            max_group_size: 250,
            receipt_broadcast_max_members: 32,
            max_login_failures: 10,
            max_account_login_failures: 100,
            login_failure_window: Duration::from_secs(15 * 60),
            max_queued_password_checks: 64,
            password_checks_per_address: 4,
            registrations_per_address: 60,
            send_rate: 20,
            send_burst: 100,
            control_rate: 20,
            control_burst: 200,
            mark_rate: 100,
            mark_burst: 1_000,
            typing_rate: 2,
            typing_burst: 10,
            edit_window: Duration::from_secs(15 * 60),
            unsend_window: Duration::from_secs(60 * 3600),
            max_photo_bytes: chat_protocol::media::DEFAULT_MAX_PHOTO_BYTES,
            upload_retention: Duration::from_secs(24 * 3600),
            uploads_per_hour: 600,
        }
    }
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Duration::ZERO,
            max_concurrent_bidi_streams: 8,
            stream_receive_window: 64 * 1024,
            receive_window: 256 * 1024,
            send_window: 256 * 1024,
            max_connections: 100_000,
            max_unauthenticated_per_address: 128,
            max_concurrent_uni_streams: 0,
            congestion_controller: CongestionController::Cubic,
            initial_rtt: Duration::from_millis(333),
            initial_mtu: 1200,
            min_mtu: 1200,
            mtu_discovery: true,
            datagram_receive_buffer: 64 * 1024,
            datagram_send_buffer: 64 * 1024,
            socket_receive_buffer: 0,
            socket_send_buffer: 0,
            gso: true,
            stateless_retry: false,
            migration: true,
            zero_rtt: false,
            ack_eliciting_threshold: 0,
            max_ack_delay: Duration::from_millis(25),
            receipt_linger: Duration::from_millis(20),
            write_stall: Duration::from_secs(60),
        }
    }
}

/// Room a frame needs around a maximal text (ids, keys, envelope).
const FRAME_OVERHEAD: usize = 512;

/// Most committer pairs accepted.
pub const MAX_COMMITTERS: usize = 64;
/// The smallest UDP payload every QUIC path must carry (RFC 9000 §14).
const QUIC_MIN_MTU: u16 = 1200;
/// The largest UDP payload over IPv4 (65535 - 8 - 20 header bytes).
const MAX_UDP_PAYLOAD: u16 = 65_527;

/// A configuration problem, in words an operator can act on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl PushConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let err = |msg: String| Err(ConfigError(msg));
        if let Some(url) = &self.push_gateway_url {
            let uri: hyper::Uri = url
                .parse()
                .map_err(|e| ConfigError(format!("push-gateway-url {url:?}: {e}")))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return err(format!(
                    "push-gateway-url {url:?} must be an http:// or https:// URL with a host"
                ));
            }
        } else if self.push_gateway_ca.is_some() {
            return err("push-gateway-ca is set but push-gateway-url is not".into());
        }
        if self.push_coalesce > Duration::from_secs(3600) {
            return err("push-coalesce must be at most 1h".into());
        }
        if !self.push_unacked_after.is_zero()
            && (self.push_unacked_after < Duration::from_millis(100)
                || self.push_unacked_after > Duration::from_secs(600))
        {
            return err("push-unacked-after must be 0 (off) or between 100ms and 10m".into());
        }
        if self.push_timeout < Duration::from_millis(100)
            || self.push_timeout > Duration::from_secs(300)
        {
            return err("push-timeout must be between 100ms and 5m".into());
        }
        if !(1..=4096).contains(&self.push_concurrency) {
            return err("push-concurrency must be between 1 and 4096".into());
        }
        Ok(())
    }
}

impl Config {
    /// Where uploaded photos are kept.
    pub fn media_dir(&self) -> PathBuf {
        self.media_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("media"))
    }

    /// Reads a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        toml::from_str(&text)
            .map_err(|e| ConfigError(format!("invalid config file {}: {e}", path.display())))
    }

    /// The effective configuration as TOML (what `--print-config` shows),
    /// with the passwords in backend URLs replaced by `***`: the output
    /// gets pasted into tickets and chats.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.redis_url = shown.redis_url.as_deref().map(redact_url);
        shown.postgres_url = shown.postgres_url.as_deref().map(redact_url);
        shown.push.push_gateway_url = shown.push.push_gateway_url.as_deref().map(redact_url);
        toml::to_string(&shown).expect("config serialises to TOML")
    }

    /// Checks ranges and contradictions. Errors name every setting
    /// involved.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let t = &self.transport;
        let err = |msg: String| Err(ConfigError(msg));
        self.push.validate()?;
        self.calls.validate()?;
        if !(1024..=limits::MAX_FRAME_LEN).contains(&l.max_frame_len) {
            return err(format!(
                "max-frame-len = {} is outside 1024..={}",
                l.max_frame_len,
                limits::MAX_FRAME_LEN
            ));
        }
        if l.max_text_len == 0 {
            return err("max-text-len must be at least 1".into());
        }
        if l.max_text_len.saturating_add(FRAME_OVERHEAD) > l.max_frame_len {
            return err(format!(
                "max-text-len ({}) plus {FRAME_OVERHEAD} bytes of envelope must fit in max-frame-len ({})",
                l.max_text_len, l.max_frame_len
            ));
        }
        if !(1..=limits::MAX_FRIENDS).contains(&l.max_friends) {
            return err(format!(
                "max-friends = {} is outside 1..={} (the friend list reply must fit in a frame)",
                l.max_friends,
                limits::MAX_FRIENDS
            ));
        }
        if l.session_ttl < Duration::from_secs(1) || l.session_ttl > MAX_SESSION_TTL {
            return err(format!(
                "session-ttl must be between 1s and {} (token expiry times are milliseconds since 1970)",
                humantime::format_duration(MAX_SESSION_TTL)
            ));
        }
        if l.session_retention > MAX_SESSION_TTL {
            return err(format!(
                "session-retention must be at most {}",
                humantime::format_duration(MAX_SESSION_TTL)
            ));
        }
        if l.max_photo_bytes == 0 || l.max_photo_bytes > chat_protocol::media::MAX_PHOTO_BYTES {
            return err(format!(
                "max-photo-bytes must be between 1 and {} (the protocol's limit)",
                chat_protocol::media::MAX_PHOTO_BYTES
            ));
        }
        // Announced in whole ms: a window under one would read as none.
        if l.edit_window > Duration::from_secs(7 * 24 * 3600)
            || (!l.edit_window.is_zero() && l.edit_window < Duration::from_millis(1))
        {
            return err("edit-window must be 0s (no edits) or between 1ms and 7days".into());
        }
        if l.unsend_window > Duration::from_secs(30 * 24 * 3600)
            || (!l.unsend_window.is_zero() && l.unsend_window < Duration::from_millis(1))
        {
            return err("unsend-window must be 0s (no unsends) or between 1ms and 30days".into());
        }
        if l.upload_retention < Duration::from_secs(1) || l.upload_retention > MAX_SESSION_TTL {
            return err(format!(
                "upload-retention must be between 1s and {} (an app sends a photo soon after uploading it)",
                humantime::format_duration(MAX_SESSION_TTL)
            ));
        }
        if l.session_purge_interval < Duration::from_millis(10)
            || l.session_purge_interval > Duration::from_secs(24 * 3600)
        {
            return err("session-purge-interval must be between 10ms and 1day".into());
        }
        if l.auth_timeout.is_zero() || l.auth_timeout > MAX_AUTH_TIMEOUT {
            return err(format!(
                "auth-timeout must be more than 0s and at most {} (a connection holds a place while it waits)",
                humantime::format_duration(MAX_AUTH_TIMEOUT)
            ));
        }
        if l.max_auth_attempts == 0 {
            return err("max-auth-attempts must be at least 1".into());
        }
        if l.heartbeat_interval < limits::MIN_HEARTBEAT_INTERVAL {
            // Clients heartbeat at most once a second whatever the server
            // asks: a shorter interval would make idle users flap offline.
            return err(format!(
                "heartbeat-interval must be at least {} (clients heartbeat at most that often)",
                humantime::format_duration(limits::MIN_HEARTBEAT_INTERVAL)
            ));
        }
        if l.presence_ttl_multiple < 2 {
            return err(format!(
                "presence-ttl-multiple = {} must be at least 2, or one late heartbeat shows a user offline",
                l.presence_ttl_multiple
            ));
        }
        if l.heartbeat_interval
            .checked_mul(l.presence_ttl_multiple)
            .is_none_or(|window| window > MAX_PRESENCE_WINDOW)
        {
            return err(format!(
                "heartbeat-interval x presence-ttl-multiple must be at most {} (how long a silent user still shows online)",
                humantime::format_duration(MAX_PRESENCE_WINDOW)
            ));
        }
        if !(2..=10_000).contains(&l.max_group_size) {
            return err(format!(
                "max-group-size = {} is outside 2..=10000",
                l.max_group_size
            ));
        }
        if !(2..=10_000).contains(&l.receipt_broadcast_max_members) {
            return err(format!(
                "receipt-broadcast-max-members = {} is outside 2..=10000 (1-1 receipts always go to the peer)",
                l.receipt_broadcast_max_members
            ));
        }
        if l.max_login_failures == 0
            || l.max_account_login_failures == 0
            || l.login_failure_window.is_zero()
        {
            return err(
                "max-login-failures, max-account-login-failures and login-failure-window must be more than 0"
                    .into(),
            );
        }
        if l.max_account_login_failures < l.max_login_failures {
            return err(format!(
                "max-account-login-failures ({}) must be at least max-login-failures ({}): the first counts every source of an account, the second one source",
                l.max_account_login_failures, l.max_login_failures
            ));
        }
        if l.max_queued_password_checks > 100_000 {
            return err(format!(
                "max-queued-password-checks = {} is outside 0..=100000",
                l.max_queued_password_checks
            ));
        }
        if l.password_checks_per_address > 100_000 {
            return err(format!(
                "password-checks-per-address = {} is outside 0..=100000",
                l.password_checks_per_address
            ));
        }
        if l.registrations_per_address > 1_000_000 {
            return err(format!(
                "registrations-per-address = {} is outside 0..=1000000",
                l.registrations_per_address
            ));
        }
        if l.max_sessions_per_user == 0 {
            return err("max-sessions-per-user must be at least 1".into());
        }
        if l.max_sessions_per_token == 0 {
            return err("max-sessions-per-token must be at least 1".into());
        }
        if !(1..=MAX_LOGGED_IN_DEVICES).contains(&l.max_logged_in_devices) {
            return err(format!(
                "max-logged-in-devices = {} is outside 1..={MAX_LOGGED_IN_DEVICES}",
                l.max_logged_in_devices
            ));
        }
        if l.max_presence_subscriptions == 0 {
            return err("max-presence-subscriptions must be at least 1".into());
        }
        if t.idle_timeout.is_zero() {
            return err("idle-timeout must be more than 0s".into());
        }
        if self.sqlite_commit_gap > crate::store::sqlite::MAX_COMMIT_GAP {
            return err(format!(
                "sqlite-commit-gap = {} is above {}",
                humantime::format_duration(self.sqlite_commit_gap),
                humantime::format_duration(crate::store::sqlite::MAX_COMMIT_GAP)
            ));
        }
        if l.heartbeat_interval >= t.idle_timeout {
            return err(format!(
                "heartbeat-interval ({}) must be shorter than idle-timeout ({}), or idle connections time out between heartbeats",
                humantime::format_duration(l.heartbeat_interval),
                humantime::format_duration(t.idle_timeout)
            ));
        }
        if t.idle_timeout.as_millis() >= (1u128 << 62) {
            return err("idle-timeout is too large".into());
        }
        if !t.keep_alive_interval.is_zero() && t.keep_alive_interval >= t.idle_timeout {
            return err(format!(
                "keep-alive-interval ({}) must be shorter than idle-timeout ({}), or the connection times out between keep-alives",
                humantime::format_duration(t.keep_alive_interval),
                humantime::format_duration(t.idle_timeout)
            ));
        }
        if !(4..=64).contains(&t.max_concurrent_bidi_streams) {
            return err(format!(
                "max-concurrent-bidi-streams = {} is outside 4..=64 (control, messages, receipts and calls need 4)",
                t.max_concurrent_bidi_streams
            ));
        }
        if (t.stream_receive_window as usize) < l.max_frame_len {
            return err(format!(
                "stream-receive-window ({}) must be at least max-frame-len ({}), or a maximal frame can never arrive",
                t.stream_receive_window, l.max_frame_len
            ));
        }
        if t.receive_window < t.stream_receive_window {
            return err(format!(
                "receive-window ({}) must be at least stream-receive-window ({})",
                t.receive_window, t.stream_receive_window
            ));
        }
        if t.send_window < l.max_frame_len as u64 {
            return err(format!(
                "send-window ({}) must be at least max-frame-len ({})",
                t.send_window, l.max_frame_len
            ));
        }
        if self.shutdown_timeout.is_zero() {
            return err("shutdown-timeout must be more than 0s".into());
        }
        if self.postgres_pool_size == 0 {
            return err("postgres-pool-size must be at least 1".into());
        }
        let settle = self.postgres_commit_settle_timeout;
        if settle < Duration::from_millis(100) || settle > Duration::from_secs(600) {
            return err(format!(
                "postgres-commit-settle-timeout ({}) is outside 100ms..=10m",
                humantime::format_duration(settle)
            ));
        }
        let n = self.committers;
        if !(1..=MAX_COMMITTERS).contains(&n) {
            return err(format!("committers = {n} is outside 1..={MAX_COMMITTERS}"));
        }
        if self.postgres_url.is_some() && n > self.postgres_pool_size {
            return err(format!(
                "committers = {n} is more than postgres-pool-size = {}: the extra committers would only wait for a connection",
                self.postgres_pool_size
            ));
        }
        if t.max_connections == 0 {
            return err("max-connections must be at least 1".into());
        }
        if t.max_concurrent_uni_streams > 64 {
            return err(format!(
                "max-concurrent-uni-streams = {} is outside 0..=64",
                t.max_concurrent_uni_streams
            ));
        }
        if t.initial_rtt < Duration::from_millis(1) || t.initial_rtt > Duration::from_secs(10) {
            return err(format!(
                "initial-rtt ({}) is outside 1ms..=10s",
                humantime::format_duration(t.initial_rtt)
            ));
        }
        if t.initial_rtt >= t.idle_timeout {
            return err(format!(
                "initial-rtt ({}) must be shorter than idle-timeout ({}), or no handshake can finish",
                humantime::format_duration(t.initial_rtt),
                humantime::format_duration(t.idle_timeout)
            ));
        }
        if t.min_mtu < QUIC_MIN_MTU {
            return err(format!(
                "min-mtu = {} is below {QUIC_MIN_MTU}, the smallest datagram QUIC allows",
                t.min_mtu
            ));
        }
        if t.initial_mtu < t.min_mtu {
            return err(format!(
                "initial-mtu ({}) must be at least min-mtu ({})",
                t.initial_mtu, t.min_mtu
            ));
        }
        if t.initial_mtu > MAX_UDP_PAYLOAD {
            return err(format!(
                "initial-mtu = {} is above {MAX_UDP_PAYLOAD}, the largest UDP payload",
                t.initial_mtu
            ));
        }
        if t.ack_eliciting_threshold > 1000 {
            return err(format!(
                "ack-eliciting-threshold = {} is outside 0..=1000",
                t.ack_eliciting_threshold
            ));
        }
        if t.ack_eliciting_threshold > 0 && t.max_ack_delay >= t.idle_timeout {
            return err(format!(
                "max-ack-delay ({}) must be shorter than idle-timeout ({})",
                humantime::format_duration(t.max_ack_delay),
                humantime::format_duration(t.idle_timeout)
            ));
        }
        if t.receipt_linger > MAX_RECEIPT_LINGER {
            return err(format!(
                "receipt-linger = {} is above {}",
                humantime::format_duration(t.receipt_linger),
                humantime::format_duration(MAX_RECEIPT_LINGER)
            ));
        }
        if t.write_stall < MIN_WRITE_STALL {
            return err(format!(
                "write-stall = {} is below {}",
                humantime::format_duration(t.write_stall),
                humantime::format_duration(MIN_WRITE_STALL)
            ));
        }
        if t.datagram_send_buffer == 0 {
            return err("datagram-send-buffer must be at least 1 byte".into());
        }
        if t.zero_rtt && t.stateless_retry {
            return err(
                "zero-rtt and stateless-retry cannot both be on: a Retry discards the client's early data, so 0-RTT would never save a round trip"
                    .into(),
            );
        }
        if (l.send_rate == 0) != (l.send_burst == 0) {
            return err(format!(
                "send-rate ({}) and send-burst ({}) must both be 0 (no limit) or both above 0",
                l.send_rate, l.send_burst
            ));
        }
        if (l.mark_rate == 0) != (l.mark_burst == 0) {
            return err(format!(
                "mark-rate ({}) and mark-burst ({}) must both be 0 (no limit) or both above 0",
                l.mark_rate, l.mark_burst
            ));
        }
        if (l.typing_rate == 0) != (l.typing_burst == 0) {
            return err(format!(
                "typing-rate ({}) and typing-burst ({}) must both be 0 (no limit) or both above 0",
                l.typing_rate, l.typing_burst
            ));
        }
        if (l.control_rate == 0) != (l.control_burst == 0) {
            return err(format!(
                "control-rate ({}) and control-burst ({}) must both be 0 (no limit) or both above 0",
                l.control_rate, l.control_burst
            ));
        }
        match (&self.tls.tls_cert, &self.tls.tls_key) {
            (Some(_), None) => {
                return err("tls-cert is set but tls-key is not; set both or neither".into());
            }
            (None, Some(_)) => {
                return err("tls-key is set but tls-cert is not; set both or neither".into());
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let config = Config::default();
        config.validate().unwrap();
        let text = config.to_toml();
        assert!(text.contains("listen = \"127.0.0.1:4433\""), "{text}");
        assert!(text.contains("idle-timeout = \"30s\""), "{text}");
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn printed_config_hides_backend_passwords() {
        let config = Config {
            redis_url: Some("redis://:hunter2@cache:6379/0".into()),
            postgres_url: Some("postgres://chat:s3cret@db:5432/chat".into()),
            push: PushConfig {
                push_gateway_url: Some("https://chat:pushpw@push:5000/notify".into()),
                ..PushConfig::default()
            },
            ..Config::default()
        };
        let text = config.to_toml();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret") && !text.contains("pushpw"),
            "{text}"
        );
        assert!(text.contains("redis://:***@cache:6379/0"), "{text}");
        assert!(text.contains("postgres://chat:***@db:5432/chat"), "{text}");
        let plain = Config {
            postgres_url: Some("postgres://db/chat".into()),
            redis_url: Some("redis://cache/0".into()),
            ..Config::default()
        };
        assert!(plain.to_toml().contains("postgres://db/chat"));
        assert_eq!(
            redact_url("postgres://chat@db/chat"),
            "postgres://chat@db/chat",
            "no password, nothing hidden"
        );
        assert_eq!(
            redact_url("host=db user=chat password=s3cret dbname=chat"),
            "host=db user=chat password=*** dbname=chat"
        );
        assert_eq!(
            redact_url("host=db password = s3cret user=chat"),
            "host=db password=*** user=chat"
        );
        assert_eq!(
            redact_url("host=db password='a b\\' c' user=chat"),
            "host=db password=*** user=chat"
        );
        assert_eq!(
            redact_url("postgres://chat@db/chat?sslmode=require&password=s3cret"),
            "postgres://chat@db/chat?sslmode=require&password=***"
        );
    }

    #[test]
    fn partial_files_keep_defaults() {
        let config: Config = toml::from_str(
            "listen = \"0.0.0.0:5000\"\n[limits]\nmax-text-len = 100\n[transport]\nidle-timeout = \"1m\"\n",
        )
        .unwrap();
        assert_eq!(config.listen.port(), 5000);
        assert_eq!(config.limits.max_text_len, 100);
        assert_eq!(config.limits.max_frame_len, limits::DEFAULT_MAX_FRAME_LEN);
        assert_eq!(config.transport.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.sqlite_commit_gap, Duration::from_millis(1));
        assert_eq!(config.transport.receipt_linger, Duration::from_millis(20));
        let config: Config = toml::from_str("sqlite-commit-gap = \"3ms\"\n").unwrap();
        assert_eq!(config.sqlite_commit_gap, Duration::from_millis(3));
        assert!(toml::from_str::<Config>("no-such-key = 1").is_err());
    }

    #[test]
    fn committers_default_to_one_and_are_read_from_the_file() {
        assert_eq!(Config::default().committers, 1);
        assert!(Config::default().to_toml().contains("committers = 1"));
        let config: Config = toml::from_str("committers = 3\n").unwrap();
        assert_eq!(config.committers, 3);
        config.validate().unwrap();
    }

    #[test]
    fn invalid_settings_name_what_is_wrong() {
        type Case = (fn(&mut Config), &'static str);
        let cases: Vec<Case> = vec![
            (|c| c.limits.max_frame_len = 10, "max-frame-len"),
            (
                |c| c.calls.call_media_node_rate = 1023,
                "call-media-node-rate",
            ),
            (
                |c| c.calls.call_media_node_rate = u64::MAX,
                "call-media-node-rate",
            ),
            (|c| c.limits.max_text_len = 0, "max-text-len"),
            (
                |c| c.limits.edit_window = Duration::from_secs(8 * 24 * 3600),
                "edit-window",
            ),
            (
                |c| c.limits.edit_window = Duration::from_micros(500),
                "edit-window",
            ),
            (
                |c| c.limits.unsend_window = Duration::from_secs(31 * 24 * 3600),
                "unsend-window",
            ),
            (
                |c| c.limits.unsend_window = Duration::from_micros(500),
                "unsend-window",
            ),
            (|c| c.limits.max_text_len = 70_000, "max-frame-len"),
            (|c| c.limits.max_text_len = usize::MAX, "max-frame-len"),
            (|c| c.limits.max_friends = 0, "max-friends = 0"),
            (|c| c.limits.max_friends = 5_001, "max-friends = 5001"),
            (
                |c| c.limits.heartbeat_interval = Duration::from_millis(500),
                "heartbeat-interval must be at least 1s",
            ),
            (|c| c.limits.session_ttl = Duration::ZERO, "session-ttl"),
            (|c| c.limits.session_ttl = Duration::MAX, "session-ttl"),
            (
                |c| c.limits.max_login_failures = 101,
                "max-account-login-failures (100) must be at least max-login-failures (101)",
            ),
            (
                |c| c.limits.session_retention = Duration::MAX,
                "session-retention",
            ),
            (
                |c| c.limits.session_purge_interval = Duration::ZERO,
                "session-purge-interval",
            ),
            (
                |c| c.limits.auth_timeout = Duration::from_secs(3600),
                "auth-timeout",
            ),
            (
                |c| c.limits.presence_ttl_multiple = u32::MAX,
                "presence-ttl-multiple must be at most",
            ),
            (
                |c| c.limits.heartbeat_interval = Duration::MAX,
                "presence-ttl-multiple must be at most",
            ),
            (
                |c| c.limits.max_sessions_per_user = 0,
                "max-sessions-per-user",
            ),
            (
                |c| c.limits.max_logged_in_devices = 0,
                "max-logged-in-devices",
            ),
            (
                |c| c.limits.max_logged_in_devices = 101,
                "max-logged-in-devices",
            ),
            (
                |c| c.limits.max_sessions_per_token = 0,
                "max-sessions-per-token",
            ),
            (
                |c| c.sqlite_commit_gap = Duration::from_millis(51),
                "sqlite-commit-gap",
            ),
            (|c| c.committers = 0, "committers = 0"),
            (|c| c.committers = 65, "committers = 65"),
            (
                |c| {
                    c.postgres_url = Some("postgres://db/chat".into());
                    c.postgres_pool_size = 2;
                    c.committers = 3;
                },
                "postgres-pool-size",
            ),
            (
                |c| c.transport.idle_timeout = Duration::ZERO,
                "idle-timeout",
            ),
            (
                |c| {
                    c.transport.keep_alive_interval = Duration::from_secs(60);
                    c.transport.idle_timeout = Duration::from_secs(30);
                },
                "keep-alive-interval (1m) must be shorter than idle-timeout (30s)",
            ),
            (
                |c| c.transport.max_concurrent_bidi_streams = 2,
                "max-concurrent-bidi-streams",
            ),
            (
                |c| c.transport.stream_receive_window = 1000,
                "stream-receive-window",
            ),
            (|c| c.transport.receive_window = 1000, "receive-window"),
            (|c| c.transport.send_window = 10, "send-window"),
            (|c| c.transport.max_connections = 0, "max-connections"),
            (|c| c.shutdown_timeout = Duration::ZERO, "shutdown-timeout"),
            (|c| c.limits.max_group_size = 1, "max-group-size"),
            (
                |c| c.limits.receipt_broadcast_max_members = 1,
                "receipt-broadcast-max-members",
            ),
            (|c| c.tls.tls_cert = Some("a.pem".into()), "tls-key is not"),
            (|c| c.tls.tls_key = Some("k.pem".into()), "tls-cert is not"),
            (
                |c| c.transport.max_concurrent_uni_streams = 1000,
                "max-concurrent-uni-streams",
            ),
            (|c| c.transport.initial_rtt = Duration::ZERO, "initial-rtt"),
            (
                |c| {
                    c.transport.initial_rtt = Duration::from_secs(5);
                    c.transport.idle_timeout = Duration::from_secs(4);
                    c.limits.heartbeat_interval = Duration::from_secs(1);
                },
                "initial-rtt (5s) must be shorter than idle-timeout (4s)",
            ),
            (|c| c.transport.min_mtu = 1000, "min-mtu = 1000"),
            (
                |c| {
                    c.transport.min_mtu = 1400;
                    c.transport.initial_mtu = 1300;
                },
                "initial-mtu (1300) must be at least min-mtu (1400)",
            ),
            (|c| c.transport.initial_mtu = 65_535, "initial-mtu = 65535"),
            (
                |c| c.transport.datagram_send_buffer = 0,
                "datagram-send-buffer",
            ),
            (
                |c| c.transport.ack_eliciting_threshold = 5000,
                "ack-eliciting-threshold",
            ),
            (
                |c| c.transport.receipt_linger = Duration::from_secs(61),
                "receipt-linger = 1m 1s is above 1m",
            ),
            (
                |c| c.transport.write_stall = Duration::from_millis(500),
                "write-stall = 500ms is below 1s",
            ),
            (
                |c| c.limits.max_queued_password_checks = 1_000_000,
                "max-queued-password-checks = 1000000",
            ),
            (
                |c| c.limits.password_checks_per_address = 1_000_000,
                "password-checks-per-address = 1000000",
            ),
            (
                |c| c.limits.registrations_per_address = 1_000_001,
                "registrations-per-address = 1000001",
            ),
            (
                |c| {
                    c.transport.ack_eliciting_threshold = 10;
                    c.transport.max_ack_delay = Duration::from_secs(60);
                },
                "max-ack-delay (1m) must be shorter than idle-timeout (30s)",
            ),
            (
                |c| {
                    c.transport.zero_rtt = true;
                    c.transport.stateless_retry = true;
                },
                "zero-rtt and stateless-retry",
            ),
            (
                |c| c.limits.send_burst = 0,
                "send-rate (20) and send-burst (0)",
            ),
            (
                |c| c.limits.control_rate = 0,
                "control-rate (0) and control-burst (200)",
            ),
            (
                |c| c.limits.mark_burst = 0,
                "mark-rate (100) and mark-burst (0)",
            ),
            (
                |c| c.limits.typing_rate = 0,
                "typing-rate (0) and typing-burst (10)",
            ),
            (
                |c| c.limits.heartbeat_interval = Duration::from_secs(40),
                "heartbeat-interval (40s) must be shorter than idle-timeout (30s)",
            ),
            (
                |c| c.limits.presence_ttl_multiple = 1,
                "presence-ttl-multiple",
            ),
            (|c| c.limits.auth_timeout = Duration::ZERO, "auth-timeout"),
            (|c| c.postgres_pool_size = 0, "postgres-pool-size"),
            (
                |c| c.postgres_commit_settle_timeout = Duration::from_secs(3600),
                "postgres-commit-settle-timeout (1h) is outside 100ms..=10m",
            ),
            (
                |c| c.push.push_gateway_url = Some("ftp://push.example/notify".into()),
                "must be an http:// or https:// URL with a host",
            ),
            (
                |c| c.push.push_gateway_url = Some("/_matrix/push/v1/notify".into()),
                "must be an http:// or https:// URL with a host",
            ),
            (
                |c| c.push.push_gateway_ca = Some("ca.pem".into()),
                "push-gateway-ca is set but push-gateway-url is not",
            ),
            (|c| c.push.push_concurrency = 0, "push-concurrency"),
            (|c| c.push.push_timeout = Duration::ZERO, "push-timeout"),
            (
                |c| c.push.push_coalesce = Duration::from_secs(7200),
                "push-coalesce",
            ),
            (
                |c| c.push.push_unacked_after = Duration::from_secs(3600),
                "push-unacked-after",
            ),
            (
                |c| c.push.push_unacked_after = Duration::from_millis(1),
                "push-unacked-after",
            ),
        ];
        for (break_it, expected) in cases {
            let mut config = Config::default();
            break_it(&mut config);
            let err = config.validate().unwrap_err().0;
            assert!(
                err.contains(expected),
                "{err:?} should mention {expected:?}"
            );
        }
    }
}
