//! The command line of the `chat-server` binary: flags and environment
//! variables layered over the config file, `--print-config`, and the
//! `gen-certs` subcommand. Lives in the library so the test harness runs the
//! very same entry point as a child process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::certs::{DEFAULT_NAMES, DevCerts};
use crate::config::{Config, CongestionController};
use crate::endpoint::Server;

/// A chat service over QUIC. With no arguments: listens on 127.0.0.1:4433,
/// keeps data in ./data, and uses the embedded store.
#[derive(Debug, Parser)]
#[command(name = "chat-server", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    overrides: Overrides,
    /// TOML configuration file (flags and environment override it).
    #[arg(long, env = "CHAT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Log format.
    #[arg(long, env = "CHAT_LOG_FORMAT", default_value = "human", value_parser = ["human", "json"])]
    log_format: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a development CA and a server certificate signed by it.
    GenCerts {
        /// Directory to write ca.pem, ca-key.pem, server.pem, server-key.pem.
        #[arg(long, default_value = "certs/dev")]
        out: PathBuf,
        /// DNS names and IP addresses the server certificate is valid for.
        #[arg(long = "name", default_values = DEFAULT_NAMES)]
        names: Vec<String>,
    },
}

/// Flags that override config keys (same names, kebab case).
#[derive(Debug, Args)]
struct Overrides {
    /// UDP address to listen on [default: 127.0.0.1:4433].
    #[arg(long, env = "CHAT_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Data directory [default: ./data].
    #[arg(long, env = "CHAT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// This node's name in presence records [default: host name and port
    /// when listening on every address, else the listen address].
    #[arg(long, env = "CHAT_NODE_ID")]
    node_id: Option<String>,
    /// Redis URL for presence, unread queues and the recent cache.
    #[arg(long, env = "CHAT_REDIS_URL")]
    redis_url: Option<String>,
    /// Prefix of every Redis key.
    #[arg(long, env = "CHAT_REDIS_PREFIX")]
    redis_prefix: Option<String>,
    /// Postgres URL for history (default: embedded SQLite).
    #[arg(long, env = "CHAT_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// Postgres connections in the pool.
    #[arg(long, env = "CHAT_POSTGRES_POOL_SIZE")]
    postgres_pool_size: Option<usize>,
    /// How long to ask after a COMMIT whose answer was lost before taking
    /// its outcome as unknown, e.g. 30s (should outlast a failover).
    #[arg(long, env = "CHAT_POSTGRES_COMMIT_SETTLE_TIMEOUT", value_parser = humantime::parse_duration)]
    postgres_commit_settle_timeout: Option<Duration>,
    /// Embedded store: shortest time between two SQLite commits, e.g. 3ms
    /// (fewer fsyncs and less CPU per send, more latency).
    #[arg(long, env = "CHAT_SQLITE_COMMIT_GAP", value_parser = humantime::parse_duration)]
    sqlite_commit_gap: Option<Duration>,
    /// Committer pairs, each owning a share of the conversations (default
    /// 1; see TUNING.md before raising it).
    #[arg(long, env = "CHAT_COMMITTERS")]
    committers: Option<usize>,
    /// How long a graceful stop may take, e.g. 10s.
    #[arg(long, env = "CHAT_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration)]
    shutdown_timeout: Option<Duration>,
    /// Postgres schema for the tables (created if missing).
    #[arg(long, env = "CHAT_POSTGRES_SCHEMA")]
    postgres_schema: Option<String>,
    /// PEM certificate chain (production).
    #[arg(long, env = "CHAT_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key (production).
    #[arg(long, env = "CHAT_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Largest frame accepted, in bytes.
    #[arg(long, env = "CHAT_MAX_FRAME_LEN")]
    max_frame_len: Option<usize>,
    /// Largest message text, in bytes.
    #[arg(long, env = "CHAT_MAX_TEXT_LEN")]
    max_text_len: Option<usize>,
    /// Session token lifetime, e.g. 30days.
    #[arg(long, env = "CHAT_SESSION_TTL", value_parser = humantime::parse_duration)]
    session_ttl: Option<Duration>,
    /// How long an expired or revoked session is kept, e.g. 30days.
    #[arg(long, env = "CHAT_SESSION_RETENTION", value_parser = humantime::parse_duration)]
    session_retention: Option<Duration>,
    /// How often sessions past session-retention are deleted, e.g. 1h.
    #[arg(long, env = "CHAT_SESSION_PURGE_INTERVAL", value_parser = humantime::parse_duration)]
    session_purge_interval: Option<Duration>,
    /// Largest photo accepted, in bytes.
    #[arg(long, env = "CHAT_MAX_PHOTO_BYTES")]
    max_photo_bytes: Option<u64>,
    /// How long after sending a text its author may edit it, e.g. 15m
    /// (0s: no edits).
    #[arg(long, env = "CHAT_EDIT_WINDOW", value_parser = humantime::parse_duration)]
    edit_window: Option<Duration>,
    /// How long after sending a text or photo its author may unsend it
    /// for everyone, e.g. 60h (0s: no unsends).
    #[arg(long, env = "CHAT_UNSEND_WINDOW", value_parser = humantime::parse_duration)]
    unsend_window: Option<Duration>,
    /// How long an upload no send names is kept, e.g. 1day.
    #[arg(long, env = "CHAT_UPLOAD_RETENTION", value_parser = humantime::parse_duration)]
    upload_retention: Option<Duration>,
    /// Photo uploads per user per hour (0: no limit).
    #[arg(long, env = "CHAT_UPLOADS_PER_HOUR")]
    uploads_per_hour: Option<u32>,
    /// Directory for uploaded photos (default: media in data-dir).
    #[arg(long, env = "CHAT_MEDIA_DIR")]
    media_dir: Option<PathBuf>,
    /// Push gateway notify URL (http:// or https://); unset: no
    /// notifications.
    #[arg(long, env = "CHAT_PUSH_GATEWAY_URL")]
    push_gateway_url: Option<String>,
    /// PEM file of the CA of an https:// push gateway.
    #[arg(long, env = "CHAT_PUSH_GATEWAY_CA")]
    push_gateway_ca: Option<PathBuf>,
    /// One notification per conversation and user in this window, e.g. 3s.
    #[arg(long, env = "CHAT_PUSH_COALESCE", value_parser = humantime::parse_duration)]
    push_coalesce: Option<Duration>,
    /// Notify a message a foreground connection has not acknowledged
    /// after this long, e.g. 5s; 0s: never.
    #[arg(long, env = "CHAT_PUSH_UNACKED_AFTER", value_parser = humantime::parse_duration)]
    push_unacked_after: Option<Duration>,
    /// Longest request to the push gateway, e.g. 10s.
    #[arg(long, env = "CHAT_PUSH_TIMEOUT", value_parser = humantime::parse_duration)]
    push_timeout: Option<Duration>,
    /// Requests to the push gateway in flight at once.
    #[arg(long, env = "CHAT_PUSH_CONCURRENCY")]
    push_concurrency: Option<usize>,
    /// How long a call rings, e.g. 45s.
    #[arg(long, env = "CHAT_RING_TIMEOUT", value_parser = humantime::parse_duration)]
    ring_timeout: Option<Duration>,
    /// How long an answered call's last participant may wait alone, e.g. 60s.
    #[arg(long, env = "CHAT_CALL_ALONE_TIMEOUT", value_parser = humantime::parse_duration)]
    call_alone_timeout: Option<Duration>,
    /// Most participants in one call.
    #[arg(long, env = "CHAT_MAX_CALL_PARTICIPANTS")]
    max_call_participants: Option<usize>,
    /// Groups of up to this many members ring everyone when a call starts.
    #[arg(long, env = "CHAT_CALL_RING_MAX_MEMBERS")]
    call_ring_max_members: Option<usize>,
    /// Media bytes per second one call participant may send.
    #[arg(long, env = "CHAT_CALL_MEDIA_RATE")]
    call_media_rate: Option<u32>,
    /// Media bytes per second the node forwards, all calls together.
    #[arg(long, env = "CHAT_CALL_MEDIA_NODE_RATE")]
    call_media_node_rate: Option<u64>,
    /// Time allowed to authenticate, e.g. 10s.
    #[arg(long, env = "CHAT_AUTH_TIMEOUT", value_parser = humantime::parse_duration)]
    auth_timeout: Option<Duration>,
    /// Failed logins per connection before it is closed.
    #[arg(long, env = "CHAT_MAX_AUTH_ATTEMPTS")]
    max_auth_attempts: Option<u32>,
    /// The window for max-login-failures, e.g. 15m.
    #[arg(long, env = "CHAT_LOGIN_FAILURE_WINDOW", value_parser = humantime::parse_duration)]
    login_failure_window: Option<Duration>,
    /// Friends per user (and requests waiting, each way).
    #[arg(long, env = "CHAT_MAX_FRIENDS")]
    max_friends: Option<u64>,
    /// Members per group.
    #[arg(long, env = "CHAT_MAX_GROUP_SIZE")]
    max_group_size: Option<usize>,
    /// Largest conversation whose receipts go to every member (larger
    /// groups: to the covered messages' senders only).
    #[arg(long, env = "CHAT_RECEIPT_BROADCAST_MAX_MEMBERS")]
    receipt_broadcast_max_members: Option<usize>,
    /// Client heartbeat interval, e.g. 15s.
    #[arg(long, env = "CHAT_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// Online window = heartbeat-interval x this.
    #[arg(long, env = "CHAT_PRESENCE_TTL_MULTIPLE")]
    presence_ttl_multiple: Option<u32>,
    /// Users one connection may watch the presence of.
    #[arg(long, env = "CHAT_MAX_PRESENCE_SUBSCRIPTIONS")]
    max_presence_subscriptions: Option<usize>,
    /// Connections one user may have authenticated on this node at once.
    #[arg(long, env = "CHAT_MAX_SESSIONS_PER_USER")]
    max_sessions_per_user: Option<usize>,
    /// Of those, connections one session token may have (one more replaces
    /// the oldest).
    #[arg(long, env = "CHAT_MAX_SESSIONS_PER_TOKEN")]
    max_sessions_per_token: Option<usize>,
    /// Devices one user may be logged in on; a login beyond it logs the
    /// oldest out.
    #[arg(long, env = "CHAT_MAX_LOGGED_IN_DEVICES")]
    max_logged_in_devices: Option<u32>,
    /// Idle timeout, e.g. 30s.
    #[arg(long, env = "CHAT_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Keep-alive interval, e.g. 10s (0s: off).
    #[arg(long, env = "CHAT_KEEP_ALIVE_INTERVAL", value_parser = humantime::parse_duration)]
    keep_alive_interval: Option<Duration>,
    /// Concurrent bidirectional streams per connection.
    #[arg(long, env = "CHAT_MAX_CONCURRENT_BIDI_STREAMS")]
    max_concurrent_bidi_streams: Option<u32>,
    /// Per-stream receive window, bytes.
    #[arg(long, env = "CHAT_STREAM_RECEIVE_WINDOW")]
    stream_receive_window: Option<u32>,
    /// Per-connection receive window, bytes.
    #[arg(long, env = "CHAT_RECEIVE_WINDOW")]
    receive_window: Option<u32>,
    /// Per-connection send window, bytes.
    #[arg(long, env = "CHAT_SEND_WINDOW")]
    send_window: Option<u64>,
    /// Concurrent connections.
    #[arg(long, env = "CHAT_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Connections from one address waiting to authenticate at once (0: no
    /// limit).
    #[arg(long, env = "CHAT_MAX_UNAUTHENTICATED_PER_ADDRESS")]
    max_unauthenticated_per_address: Option<usize>,
    /// Concurrent unidirectional streams per connection.
    #[arg(long, env = "CHAT_MAX_CONCURRENT_UNI_STREAMS")]
    max_concurrent_uni_streams: Option<u32>,
    /// Congestion controller.
    #[arg(long, env = "CHAT_CONGESTION_CONTROLLER", value_enum)]
    congestion_controller: Option<CongestionController>,
    /// RTT assumed before the first sample, e.g. 333ms.
    #[arg(long, env = "CHAT_INITIAL_RTT", value_parser = humantime::parse_duration)]
    initial_rtt: Option<Duration>,
    /// Initial UDP payload size, bytes.
    #[arg(long, env = "CHAT_INITIAL_MTU")]
    initial_mtu: Option<u16>,
    /// Minimum UDP payload size, bytes.
    #[arg(long, env = "CHAT_MIN_MTU")]
    min_mtu: Option<u16>,
    /// MTU discovery (true / false).
    #[arg(long, env = "CHAT_MTU_DISCOVERY")]
    mtu_discovery: Option<bool>,
    /// QUIC DATAGRAM receive buffer per connection, bytes (0: off).
    #[arg(long, env = "CHAT_DATAGRAM_RECEIVE_BUFFER")]
    datagram_receive_buffer: Option<usize>,
    /// QUIC DATAGRAM send buffer per connection, bytes.
    #[arg(long, env = "CHAT_DATAGRAM_SEND_BUFFER")]
    datagram_send_buffer: Option<usize>,
    /// UDP socket SO_RCVBUF, bytes (0: OS default).
    #[arg(long, env = "CHAT_SOCKET_RECEIVE_BUFFER")]
    socket_receive_buffer: Option<usize>,
    /// UDP socket SO_SNDBUF, bytes (0: OS default).
    #[arg(long, env = "CHAT_SOCKET_SEND_BUFFER")]
    socket_send_buffer: Option<usize>,
    /// Segmentation offload (true / false).
    #[arg(long, env = "CHAT_GSO")]
    gso: Option<bool>,
    /// Stateless retry for address validation (true / false).
    #[arg(long, env = "CHAT_STATELESS_RETRY")]
    stateless_retry: Option<bool>,
    /// Connection migration (true / false).
    #[arg(long, env = "CHAT_MIGRATION")]
    migration: Option<bool>,
    /// 0-RTT early data on resumed sessions (true / false).
    #[arg(long, env = "CHAT_ZERO_RTT")]
    zero_rtt: Option<bool>,
    /// ACK every N ack-eliciting packets (asked of clients; 0: off).
    #[arg(long, env = "CHAT_ACK_ELICITING_THRESHOLD")]
    ack_eliciting_threshold: Option<u32>,
    /// Longest ACK delay asked of clients, e.g. 25ms.
    #[arg(long, env = "CHAT_MAX_ACK_DELAY", value_parser = humantime::parse_duration)]
    max_ack_delay: Option<Duration>,
    /// Longest wait of a receipt to share a packet, e.g. 20ms (0s: none).
    #[arg(long, env = "CHAT_RECEIPT_LINGER", value_parser = humantime::parse_duration)]
    receipt_linger: Option<Duration>,
    /// Close a connection that takes less than 16 KiB of pending data in
    /// this long, e.g. 60s.
    #[arg(long, env = "CHAT_WRITE_STALL", value_parser = humantime::parse_duration)]
    write_stall: Option<Duration>,
    /// Sustained sends per second per user (0: no limit).
    #[arg(long, env = "CHAT_SEND_RATE")]
    send_rate: Option<u32>,
    /// Burst of sends above send-rate.
    #[arg(long, env = "CHAT_SEND_BURST")]
    send_burst: Option<u32>,
    /// Sustained control requests per second per user (0: no limit).
    #[arg(long, env = "CHAT_CONTROL_RATE")]
    control_rate: Option<u32>,
    /// Burst of control requests above control-rate.
    #[arg(long, env = "CHAT_CONTROL_BURST")]
    control_burst: Option<u32>,
    /// Sustained MarkSeen frames per second per user (0: no limit).
    #[arg(long, env = "CHAT_MARK_RATE")]
    mark_rate: Option<u32>,
    /// Burst of MarkSeen frames above mark-rate.
    #[arg(long, env = "CHAT_MARK_BURST")]
    mark_burst: Option<u32>,
    /// Sustained Typing frames per second per user (0: no limit).
    #[arg(long, env = "CHAT_TYPING_RATE")]
    typing_rate: Option<u32>,
    /// Burst of Typing frames above typing-rate.
    #[arg(long, env = "CHAT_TYPING_BURST")]
    typing_burst: Option<u32>,
    /// Wrong passwords per account and source address per
    /// login-failure-window.
    #[arg(long, env = "CHAT_MAX_LOGIN_FAILURES")]
    max_login_failures: Option<u32>,
    /// Wrong passwords per account from all sources per
    /// login-failure-window.
    #[arg(long, env = "CHAT_MAX_ACCOUNT_LOGIN_FAILURES")]
    max_account_login_failures: Option<u32>,
    /// Logins and registrations that may wait for a password hasher.
    #[arg(long, env = "CHAT_MAX_QUEUED_PASSWORD_CHECKS")]
    max_queued_password_checks: Option<usize>,
    /// Of those, most from one source address (IPv4, IPv6 /64) at once; 0:
    /// no share.
    #[arg(long, env = "CHAT_PASSWORD_CHECKS_PER_ADDRESS")]
    password_checks_per_address: Option<usize>,
    /// Registrations per hour from one source address (IPv4, IPv6 /64); 0:
    /// no limit.
    #[arg(long, env = "CHAT_REGISTRATIONS_PER_ADDRESS")]
    registrations_per_address: Option<u32>,
    /// Prometheus metrics, /healthz and /readyz (HTTP), e.g. 127.0.0.1:9464.
    #[arg(long, env = "CHAT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
}

impl Overrides {
    fn apply(self, c: &mut Config) {
        fn set<T>(slot: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *slot = v;
            }
        }
        set(&mut c.listen, self.listen);
        set(&mut c.data_dir, self.data_dir);
        if self.redis_url.is_some() {
            c.redis_url = self.redis_url;
        }
        set(&mut c.redis_prefix, self.redis_prefix);
        if self.node_id.is_some() {
            c.node_id = self.node_id;
        }
        if self.postgres_url.is_some() {
            c.postgres_url = self.postgres_url;
        }
        set(&mut c.postgres_pool_size, self.postgres_pool_size);
        set(
            &mut c.postgres_commit_settle_timeout,
            self.postgres_commit_settle_timeout,
        );
        set(&mut c.shutdown_timeout, self.shutdown_timeout);
        set(&mut c.sqlite_commit_gap, self.sqlite_commit_gap);
        set(&mut c.committers, self.committers);
        if self.postgres_schema.is_some() {
            c.postgres_schema = self.postgres_schema;
        }
        if self.tls_cert.is_some() {
            c.tls.tls_cert = self.tls_cert;
        }
        if self.tls_key.is_some() {
            c.tls.tls_key = self.tls_key;
        }
        set(&mut c.limits.max_frame_len, self.max_frame_len);
        set(&mut c.limits.max_text_len, self.max_text_len);
        set(&mut c.limits.session_ttl, self.session_ttl);
        set(&mut c.limits.session_retention, self.session_retention);
        set(
            &mut c.limits.session_purge_interval,
            self.session_purge_interval,
        );
        set(&mut c.limits.auth_timeout, self.auth_timeout);
        set(&mut c.limits.max_photo_bytes, self.max_photo_bytes);
        set(&mut c.limits.upload_retention, self.upload_retention);
        set(&mut c.limits.edit_window, self.edit_window);
        set(&mut c.limits.unsend_window, self.unsend_window);
        set(&mut c.limits.uploads_per_hour, self.uploads_per_hour);
        if self.media_dir.is_some() {
            c.media_dir = self.media_dir;
        }
        if self.push_gateway_url.is_some() {
            c.push.push_gateway_url = self.push_gateway_url;
        }
        if self.push_gateway_ca.is_some() {
            c.push.push_gateway_ca = self.push_gateway_ca;
        }
        set(&mut c.push.push_coalesce, self.push_coalesce);
        set(&mut c.push.push_unacked_after, self.push_unacked_after);
        set(&mut c.push.push_timeout, self.push_timeout);
        set(&mut c.push.push_concurrency, self.push_concurrency);
        set(&mut c.calls.ring_timeout, self.ring_timeout);
        set(&mut c.calls.call_alone_timeout, self.call_alone_timeout);
        set(
            &mut c.calls.max_call_participants,
            self.max_call_participants,
        );
        set(
            &mut c.calls.call_ring_max_members,
            self.call_ring_max_members,
        );
        set(&mut c.calls.call_media_rate, self.call_media_rate);
        set(&mut c.calls.call_media_node_rate, self.call_media_node_rate);
        set(&mut c.limits.max_friends, self.max_friends);
        set(&mut c.limits.max_auth_attempts, self.max_auth_attempts);
        set(
            &mut c.limits.login_failure_window,
            self.login_failure_window,
        );
        set(&mut c.limits.max_group_size, self.max_group_size);
        set(
            &mut c.limits.receipt_broadcast_max_members,
            self.receipt_broadcast_max_members,
        );
        set(&mut c.limits.heartbeat_interval, self.heartbeat_interval);
        set(
            &mut c.limits.presence_ttl_multiple,
            self.presence_ttl_multiple,
        );
        set(
            &mut c.limits.max_presence_subscriptions,
            self.max_presence_subscriptions,
        );
        set(
            &mut c.limits.max_sessions_per_user,
            self.max_sessions_per_user,
        );
        set(
            &mut c.limits.max_sessions_per_token,
            self.max_sessions_per_token,
        );
        set(
            &mut c.limits.max_logged_in_devices,
            self.max_logged_in_devices,
        );
        set(&mut c.transport.idle_timeout, self.idle_timeout);
        set(
            &mut c.transport.keep_alive_interval,
            self.keep_alive_interval,
        );
        set(
            &mut c.transport.max_concurrent_bidi_streams,
            self.max_concurrent_bidi_streams,
        );
        set(
            &mut c.transport.stream_receive_window,
            self.stream_receive_window,
        );
        set(&mut c.transport.receive_window, self.receive_window);
        set(&mut c.transport.send_window, self.send_window);
        set(&mut c.transport.max_connections, self.max_connections);
        set(
            &mut c.transport.max_unauthenticated_per_address,
            self.max_unauthenticated_per_address,
        );
        let t = &mut c.transport;
        set(
            &mut t.max_concurrent_uni_streams,
            self.max_concurrent_uni_streams,
        );
        set(&mut t.congestion_controller, self.congestion_controller);
        set(&mut t.initial_rtt, self.initial_rtt);
        set(&mut t.initial_mtu, self.initial_mtu);
        set(&mut t.min_mtu, self.min_mtu);
        set(&mut t.mtu_discovery, self.mtu_discovery);
        set(&mut t.datagram_receive_buffer, self.datagram_receive_buffer);
        set(&mut t.datagram_send_buffer, self.datagram_send_buffer);
        set(&mut t.socket_receive_buffer, self.socket_receive_buffer);
        set(&mut t.socket_send_buffer, self.socket_send_buffer);
        set(&mut t.gso, self.gso);
        set(&mut t.stateless_retry, self.stateless_retry);
        set(&mut t.migration, self.migration);
        set(&mut t.zero_rtt, self.zero_rtt);
        set(&mut t.ack_eliciting_threshold, self.ack_eliciting_threshold);
        set(&mut t.max_ack_delay, self.max_ack_delay);
        set(&mut t.receipt_linger, self.receipt_linger);
        set(&mut t.write_stall, self.write_stall);
        set(&mut c.limits.send_rate, self.send_rate);
        set(&mut c.limits.send_burst, self.send_burst);
        set(&mut c.limits.control_rate, self.control_rate);
        set(&mut c.limits.control_burst, self.control_burst);
        set(&mut c.limits.mark_rate, self.mark_rate);
        set(&mut c.limits.mark_burst, self.mark_burst);
        set(&mut c.limits.typing_rate, self.typing_rate);
        set(&mut c.limits.typing_burst, self.typing_burst);
        set(&mut c.limits.max_login_failures, self.max_login_failures);
        set(
            &mut c.limits.max_account_login_failures,
            self.max_account_login_failures,
        );
        set(
            &mut c.limits.max_queued_password_checks,
            self.max_queued_password_checks,
        );
        set(
            &mut c.limits.password_checks_per_address,
            self.password_checks_per_address,
        );
        set(
            &mut c.limits.registrations_per_address,
            self.registrations_per_address,
        );
        set(&mut c.metrics_listen, self.metrics_listen);
    }
}

impl Cli {
    /// The effective configuration: defaults, then the file, then
    /// environment and flags; validated.
    pub fn effective_config(self) -> Result<(Config, bool), String> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        self.overrides.apply(&mut config);
        config
            .validate()
            .map_err(|e| format!("invalid configuration: {e}"))?;
        Ok((config, self.print_config))
    }
}

/// Entry point of the `chat-server` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_format);
    if let Some(Command::GenCerts { out, names }) = &cli.command {
        return match DevCerts::generate(names).and_then(|c| c.write(out)) {
            Ok(()) => {
                println!(
                    "wrote a development CA and server certificate to {} (valid for {}); \
                     clients trust {}/ca.pem. For development only.",
                    out.display(),
                    names.join(", "),
                    out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chat-server: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (config, print) = match cli.effective_config() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("chat-server: {e}");
            return ExitCode::from(2);
        }
    };
    if print {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Before the start (migrations, backends: it can take a while): a
        // SIGHUP's default action would end the process.
        let hangup = hangup_signal();
        let server = match Server::start(config).await {
            Ok(server) => server,
            Err(e) => {
                eprintln!("chat-server: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(ca) = server.dev_ca() {
            println!(
                "chat-server listening on {} (dev CA: {})",
                server.local_addr(),
                ca.display()
            );
        } else {
            println!("chat-server listening on {}", server.local_addr());
        }
        println!(
            "chat-server metrics on http://{}/metrics (also /healthz, /readyz)",
            server.metrics_addr()
        );
        // SIGHUP reloads the certificate (a renewal) until a stop signal.
        tokio::select! {
            () = wait_for_signal() => {}
            () = reload_on_hangup(&server, hangup) => {}
        }
        // A second signal stops at once instead of waiting out the drain.
        let complete = tokio::select! {
            complete = server.shutdown() => complete,
            () = wait_for_signal() => {
                eprintln!("chat-server: second signal; stopping without waiting for the drain");
                false
            }
        };
        if complete {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

/// SIGHUP's handler (nothing elsewhere).
#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = ();

fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::hangup()).expect("install SIGHUP handler")
    }
}

/// Reloads the certificate at every SIGHUP; never returns.
async fn reload_on_hangup(server: &Server, hangup: Hangup) {
    #[cfg(unix)]
    {
        let mut hangup = hangup;
        while hangup.recv().await.is_some() {
            if let Err(e) = server.reload_certificate() {
                tracing::error!(error = %e, "certificate reload failed; keeping the current one");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (server, hangup);
    std::future::pending::<()>().await;
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn init_tracing(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `args` as the command line would, but reading no `CHAT_`
    /// variable: a developer's shell must not change what the tests see.
    fn parse(args: &[&str]) -> Result<Config, String> {
        use clap::{CommandFactory, FromArgMatches};
        let command = Cli::command().mut_args(|arg| arg.env(None::<&'static str>));
        let matches = command
            .try_get_matches_from(std::iter::once("chat-server").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let cli = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        cli.effective_config().map(|(c, _)| c)
    }

    #[test]
    fn every_config_key_has_a_flag() {
        use clap::CommandFactory;
        // Every key, the optional ones set so that they are written out.
        let config = Config {
            node_id: Some("n".into()),
            redis_url: Some("redis://r".into()),
            postgres_url: Some("postgres://p".into()),
            media_dir: Some("m".into()),
            push: crate::config::PushConfig {
                push_gateway_url: Some("https://push.example".into()),
                push_gateway_ca: Some("ca.pem".into()),
                ..Default::default()
            },
            tls: crate::config::TlsConfig {
                tls_cert: Some("c.pem".into()),
                tls_key: Some("k.pem".into()),
            },
            ..Config::default()
        };
        let table: toml::Table = toml::from_str(&config.to_toml()).unwrap();
        let mut keys = Vec::new();
        for (key, value) in &table {
            match value.as_table() {
                Some(section) => keys.extend(section.keys().cloned()),
                None => keys.push(key.clone()),
            }
        }
        let command = Cli::command();
        let flags: Vec<&str> = command
            .get_arguments()
            .filter_map(|a| a.get_long())
            .collect();
        let missing: Vec<&String> = keys
            .iter()
            .filter(|k| !flags.contains(&k.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "config keys without a flag: {missing:?}"
        );
        assert!(keys.len() > 40, "{keys:?}");
    }

    #[test]
    fn flags_override_defaults() {
        let c = parse(&[
            "--listen",
            "127.0.0.1:0",
            "--idle-timeout",
            "45s",
            "--max-text-len",
            "100",
        ])
        .unwrap();
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.transport.idle_timeout, Duration::from_secs(45));
        assert_eq!(c.limits.max_text_len, 100);
        let c = parse(&[
            "--node-id",
            "pod-a",
            "--max-auth-attempts",
            "3",
            "--login-failure-window",
            "1h",
            "--max-presence-subscriptions",
            "50",
            "--max-sessions-per-user",
            "4",
            "--max-sessions-per-token",
            "2",
            "--max-logged-in-devices",
            "7",
        ])
        .unwrap();
        assert_eq!(c.node_id.as_deref(), Some("pod-a"));
        assert_eq!(c.limits.max_auth_attempts, 3);
        assert_eq!(c.limits.login_failure_window, Duration::from_secs(3600));
        assert_eq!(c.limits.max_presence_subscriptions, 50);
        assert_eq!(c.limits.max_sessions_per_user, 4);
        assert_eq!(c.limits.max_sessions_per_token, 2);
        assert_eq!(c.limits.max_logged_in_devices, 7);
    }

    #[test]
    fn transport_flags_reach_the_config() {
        let c = parse(&[
            "--congestion-controller",
            "bbr",
            "--initial-rtt",
            "100ms",
            "--gso",
            "false",
            "--zero-rtt",
            "true",
            "--min-mtu",
            "1280",
            "--initial-mtu",
            "1400",
            "--send-rate",
            "5",
            "--send-burst",
            "10",
            "--control-rate",
            "7",
            "--control-burst",
            "70",
            "--mark-rate",
            "8",
            "--mark-burst",
            "80",
            "--typing-rate",
            "6",
            "--typing-burst",
            "60",
            "--edit-window",
            "5m",
            "--unsend-window",
            "2h",
            "--max-unauthenticated-per-address",
            "9",
            "--metrics-listen",
            "127.0.0.1:0",
            "--sqlite-commit-gap",
            "3ms",
            "--committers",
            "2",
        ])
        .unwrap();
        assert_eq!(c.transport.congestion_controller, CongestionController::Bbr);
        assert_eq!(c.transport.initial_rtt, Duration::from_millis(100));
        assert!(!c.transport.gso);
        assert!(c.transport.zero_rtt);
        assert_eq!((c.transport.min_mtu, c.transport.initial_mtu), (1280, 1400));
        assert_eq!((c.limits.send_rate, c.limits.send_burst), (5, 10));
        assert_eq!((c.limits.control_rate, c.limits.control_burst), (7, 70));
        assert_eq!((c.limits.mark_rate, c.limits.mark_burst), (8, 80));
        assert_eq!((c.limits.typing_rate, c.limits.typing_burst), (6, 60));
        assert_eq!(c.limits.edit_window, Duration::from_secs(300));
        assert_eq!(c.limits.unsend_window, Duration::from_secs(7200));
        assert_eq!(c.transport.max_unauthenticated_per_address, 9);
        assert_eq!(c.metrics_listen.port(), 0);
        assert_eq!(c.sqlite_commit_gap, Duration::from_millis(3));
        assert_eq!(c.committers, 2);
        let err = parse(&["--congestion-controller", "vegas"]).unwrap_err();
        assert!(err.contains("vegas"), "{err}");
    }

    #[test]
    fn contradictions_name_both_settings() {
        let err = parse(&["--keep-alive-interval", "60s", "--idle-timeout", "30s"]).unwrap_err();
        assert!(
            err.contains("keep-alive-interval") && err.contains("idle-timeout"),
            "{err}"
        );
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:7000\"\n[limits]\nmax-text-len = 200\n",
        )
        .unwrap();
        let c = parse(&["--config", path.to_str().unwrap(), "--max-text-len", "300"]).unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.limits.max_text_len, 300);
        let err = parse(&["--config", "/nonexistent.toml"]).unwrap_err();
        assert!(err.contains("/nonexistent.toml"), "{err}");
    }
}
