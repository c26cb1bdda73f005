//! The node's Prometheus metrics.
//!
//! Every server owns its recorder (not the process-global one), so several
//! servers in one process (the tests) keep separate counts. Hot-path
//! metrics are registered once and kept as handles; labelled ones whose
//! label set is open (store operations) are looked up by key when used.
//!
//! The names, types and units are listed in [`DESCRIPTIONS`], which is also
//! what `/metrics` prints as `# HELP`; TUNING.md explains them.

use std::sync::Arc;
use std::time::Duration;

use chat_protocol::{ErrorCode, StreamKind};
use metrics::{Counter, Gauge, Histogram, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::store::sqlite::CheckpointMetrics;

/// The outcomes of `chat_push_notifications_total`.
pub const PUSH_OUTCOMES: [&str; 9] = [
    "sent",
    "coalesced",
    "online",
    "acked",
    "ended",
    "muted",
    "no_device",
    "failed",
    "dropped",
];

/// The outcomes of `chat_push_watches_total`.
pub const PUSH_WATCH_OUTCOMES: [&str; 3] = ["acked", "unacked", "dropped"];

/// The outcomes of `chat_call_media_datagrams_total`, by [`MediaOutcome`].
const MEDIA_OUTCOMES: [&str; 6] = [
    "forwarded",
    "rate_limited",
    "too_large",
    "unsent",
    "no_call",
    "node_limited",
];

/// What became of a call media datagram for one receiver (or, rate
/// limited, for all of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaOutcome {
    /// Handed to the receiver's connection.
    Forwarded = 0,
    /// The sender was over `call-media-rate`.
    RateLimited = 1,
    /// Larger than the receiver's connection takes.
    TooLarge = 2,
    /// The receiver's connection refused it (closed, or datagrams off).
    Unsent = 3,
    /// The sender is in no call: dropped as it came.
    NoCall = 4,
    /// The node was over `call-media-node-rate`: dropped for every
    /// receiver.
    NodeLimited = 5,
}

/// The reasons of `chat_calls_ended_total`.
pub const CALL_END_REASONS: [&str; 6] = [
    "hung_up",
    "disconnected",
    "no_answer",
    "declined",
    "alone",
    "removed",
];

/// Stream kinds, by `StreamKind as usize`, as metric labels.
const STREAM_LABELS: [&str; 6] = [
    "unspecified",
    "control",
    "messages",
    "receipts",
    "calls",
    "media",
];

/// (name, kind, unit, help) of every metric the node exports.
pub const DESCRIPTIONS: &[(&str, &str, Unit, &str)] = &[
    (
        "chat_connections_active",
        "gauge",
        Unit::Count,
        "QUIC connections open now (authenticated or not).",
    ),
    (
        "chat_sessions_active",
        "gauge",
        Unit::Count,
        "Authenticated connections now (a user's devices each count).",
    ),
    (
        "chat_tls_certificate_expiry_timestamp_seconds",
        "gauge",
        Unit::Seconds,
        "When the certificate chain new handshakes are answered with expires (the earliest notAfter in it), in seconds since the Unix epoch; set at start and at each reload. Alert on it minus time() falling under a few weeks.",
    ),
    (
        "chat_connections_opened_total",
        "counter",
        Unit::Count,
        "QUIC connections whose handshake completed.",
    ),
    (
        "chat_connections_closed_total",
        "counter",
        Unit::Count,
        "Connections that ended, by reason: client_closed, idle_timeout, server_closed, reset, transport_error, handshake_failed (or timed out), handshakes_full (refused: max-connections handshakes in progress), address_busy (refused: max-unauthenticated-per-address from its address).",
    ),
    (
        "chat_connections_refused_total",
        "counter",
        Unit::Count,
        "Connections closed with SERVER_BUSY because max-connections were open, or max-unauthenticated-per-address from their source were waiting to log in.",
    ),
    (
        "chat_frames_received_total",
        "counter",
        Unit::Count,
        "Frames decoded from clients, by stream kind.",
    ),
    (
        "chat_frames_sent_total",
        "counter",
        Unit::Count,
        "Frames written to clients, by stream kind.",
    ),
    (
        "chat_sends_total",
        "counter",
        Unit::Count,
        "Send requests received.",
    ),
    (
        "chat_send_acks_total",
        "counter",
        Unit::Count,
        "SendAcks queued (the message is durable); retries of a stored message included.",
    ),
    (
        "chat_deliveries_total",
        "counter",
        Unit::Count,
        "Deliver frames queued to recipients' connections (live and catch-up).",
    ),
    (
        "chat_redeliveries_total",
        "counter",
        Unit::Count,
        "Deliver frames a retried send or group change queued again to members still owed it.",
    ),
    (
        "chat_delivery_acks_ignored_total",
        "counter",
        Unit::Count,
        "DeliveryAcks dropped: the connection had acked more messages than it was delivered.",
    ),
    (
        "chat_catch_up_repeats_total",
        "counter",
        Unit::Count,
        "Catch-up passes run again because live messages overflowed the queue during the one before.",
    ),
    (
        "chat_receipts_total",
        "counter",
        Unit::Count,
        "Receipt frames queued to members' connections.",
    ),
    (
        "chat_cache_updates_dropped_total",
        "counter",
        Unit::Count,
        "Batches of recent-cache and unread-queue updates dropped because the updater was behind (a slow Redis): each costs history reads later, never a message.",
    ),
    (
        "chat_heartbeats_ignored_total",
        "counter",
        Unit::Count,
        "Heartbeats ignored because the user's devices beat far more often than the node asks (a flood; honest devices fit twice over).",
    ),
    (
        "chat_backgrounded_total",
        "counter",
        Unit::Count,
        "Times a device said its app went to the background (a Heartbeat with background): its connection's frames stop counting as presence activity until its next heartbeat.",
    ),
    (
        "chat_photos_uploaded_total",
        "counter",
        Unit::Count,
        "Photo uploads stored (refused ones are counted in chat_errors_total by code).",
    ),
    (
        "chat_photo_bytes_uploaded_total",
        "counter",
        Unit::Bytes,
        "Bytes of the photo uploads stored.",
    ),
    (
        "chat_photos_fetched_total",
        "counter",
        Unit::Count,
        "Photo downloads begun (a MediaHeader written).",
    ),
    (
        "chat_photos_purged_total",
        "counter",
        Unit::Count,
        "Uploads deleted because no stored message carries them: unsent within upload-retention, or named by a send that was refused.",
    ),
    (
        "chat_photo_files_swept_total",
        "counter",
        Unit::Count,
        "Photo files removed because no row names them (left by a stop between a file and its row); one media subdirectory is swept per session-purge-interval.",
    ),
    (
        "chat_push_notifications_total",
        "counter",
        Unit::Count,
        "Notifications by outcome: sent (the gateway took it), coalesced (folded into the conversation's next one), online (the user came to the foreground first), acked (a message a foreground connection left unacknowledged past push-unacked-after was acknowledged before its notification went), ended (a ring that stopped before its notification went), no_device (no registered device), failed (the gateway refused it or did not answer after retries, or the store could not be read), dropped (the notifier's queue, or its notifications under way, were full).",
    ),
    (
        "chat_push_watches_total",
        "counter",
        Unit::Count,
        "Messages pushed to connections in the foreground, watched for an acknowledgement, by how the watch ended: acked (a device acknowledged it, or a later message of the conversation), unacked (not within push-unacked-after: handed to the notifier), dropped (not watched: the table was full).",
    ),
    (
        "chat_push_tokens_rejected_total",
        "counter",
        Unit::Count,
        "Push tokens the gateway rejected (the app was uninstalled); they are forgotten.",
    ),
    (
        "chat_calls_active",
        "gauge",
        Unit::Count,
        "Calls under way on this node (ringing or connected).",
    ),
    (
        "chat_call_participants",
        "gauge",
        Unit::Count,
        "Connections taking part in a call on this node.",
    ),
    (
        "chat_calls_started_total",
        "counter",
        Unit::Count,
        "Calls started.",
    ),
    (
        "chat_calls_ended_total",
        "counter",
        Unit::Count,
        "Calls ended, by reason: hung_up, disconnected (the last participant's connection closed), no_answer, declined, alone (one participant left alone for call-alone-timeout), removed (the last participant left or was removed from the group, or a direct call's two users stopped being friends).",
    ),
    (
        "chat_typing_updates_total",
        "counter",
        Unit::Count,
        "TypingUpdate frames queued for members' devices (one that had no room was not).",
    ),
    (
        "chat_call_signals_total",
        "counter",
        Unit::Count,
        "Call signals (SDP, ICE) relayed between participants.",
    ),
    (
        "chat_call_media_datagrams_total",
        "counter",
        Unit::Count,
        "Call media datagrams by outcome, per receiver: forwarded, too_large (beyond the receiver's datagram size), unsent (its connection refused it); rate_limited counts a sender's datagram over call-media-rate once, no_call one from a connection in no call; node_limited, per receiver, copies dropped for the node's call-media-node-rate.",
    ),
    (
        "chat_call_media_bytes_total",
        "counter",
        Unit::Bytes,
        "Call media payload bytes forwarded (counted per receiver).",
    ),
    (
        "chat_sessions_purged_total",
        "counter",
        Unit::Count,
        "Sessions deleted after they expired or were revoked more than session-retention ago.",
    ),
    (
        "chat_errors_total",
        "counter",
        Unit::Count,
        "Error frames and error closes sent to clients, by code.",
    ),
    (
        "chat_send_ack_duration_seconds",
        "histogram",
        Unit::Seconds,
        "From a Send frame decoded to its SendAck queued (validation, group commit).",
    ),
    (
        "chat_send_deliver_duration_seconds",
        "histogram",
        Unit::Seconds,
        "From a Send frame decoded to its Deliver queued to an online recipient.",
    ),
    (
        "chat_store_operation_duration_seconds",
        "histogram",
        Unit::Seconds,
        "Store calls by backend (sqlite, postgres, redis, memory) and operation; failures are labelled result=\"error\".",
    ),
    (
        "chat_commit_batch_messages",
        "histogram",
        Unit::Count,
        "Messages per group commit of the send committer.",
    ),
    (
        "chat_watermark_batch_updates",
        "histogram",
        Unit::Count,
        "Watermark moves per transaction of the receipt committer.",
    ),
    (
        "chat_unread_messages",
        "histogram",
        Unit::Count,
        "Messages waiting for a user when their messages stream opened (catch-up backlog).",
    ),
    (
        "chat_quic_rtt_seconds",
        "histogram",
        Unit::Seconds,
        "Smoothed RTT of live authenticated connections, sampled every 10 s.",
    ),
    (
        "chat_quic_congestion_window_bytes",
        "histogram",
        Unit::Bytes,
        "Congestion window of live authenticated connections, sampled every 10 s.",
    ),
    (
        "chat_quic_lost_packets_total",
        "counter",
        Unit::Count,
        "Packets declared lost on authenticated connections.",
    ),
    (
        "chat_quic_sent_datagrams_total",
        "counter",
        Unit::Count,
        "UDP datagrams sent on authenticated connections.",
    ),
    (
        "chat_quic_received_datagrams_total",
        "counter",
        Unit::Count,
        "UDP datagrams received on authenticated connections.",
    ),
    (
        "chat_sqlite_wal_frames",
        "gauge",
        Unit::Count,
        "Frames in the embedded store's write-ahead log at its latest checkpoint; the log starts over past 2,000, so a steady climb means checkpoints are not keeping up.",
    ),
    (
        "chat_sqlite_checkpoint_failures_total",
        "counter",
        Unit::Count,
        "Failed checkpoints of the embedded store's write-ahead log (every 100 ms while they fail): the log grows without bound meanwhile and chat_sqlite_wal_frames stands still.",
    ),
    (
        "chat_sqlite_checkpoint_duration_seconds",
        "histogram",
        Unit::Seconds,
        "Checkpoints of the embedded store's write-ahead log into its database file, by thread: checkpointer (every 100 ms, beside the commits) or writer (the one that lets the log start over, after a commit's acks).",
    ),
];

/// How often live connections' path statistics are sampled.
pub const PATH_SAMPLE_INTERVAL: Duration = Duration::from_secs(10);

/// How often buffered histogram samples are folded into buckets, so their
/// memory stays bounded on a node nobody scrapes.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const UNREAD_BUCKETS: &[f64] = &[0.0, 1.0, 10.0, 100.0, 1_000.0, 10_000.0];
const WINDOW_BUCKETS: &[f64] = &[
    4_096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
];

/// Handles to the node's metrics.
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    /// Connections open now.
    pub connections_active: Gauge,
    /// Authenticated connections now (registered in the hub).
    pub sessions_active: Gauge,
    /// Handshakes completed.
    pub connections_opened: Counter,
    /// Connections refused.
    pub connections_refused: Counter,
    frames_in: [Counter; 6],
    frames_out: [Counter; 6],
    /// Send requests received.
    pub sends: Counter,
    /// SendAcks queued.
    pub acks: Counter,
    /// Deliver frames queued.
    pub deliveries: Counter,
    /// Deliver frames queued again for a retry.
    pub redeliveries: Counter,
    /// DeliveryAcks beyond a connection's deliveries, dropped.
    pub acks_ignored: Counter,
    /// Catch-up passes run again after live messages overflowed the queue.
    pub catch_up_repeats: Counter,
    /// Receipt frames queued.
    pub receipts: Counter,
    /// TypingUpdate frames queued.
    pub typing_updates: Counter,
    /// Cache and queue updates dropped for a full updater queue.
    pub cache_updates_dropped: Counter,
    /// Ended sessions deleted.
    pub sessions_purged: Counter,
    /// Photo uploads stored.
    pub photos_uploaded: Counter,
    /// Their bytes.
    pub photo_bytes_uploaded: Counter,
    /// Photo downloads begun.
    pub photos_fetched: Counter,
    /// Uploads deleted unsent.
    pub photos_purged: Counter,
    /// Photo files without a row, removed.
    pub photo_files_swept: Counter,
    /// Heartbeats over the user's heartbeat bucket.
    pub heartbeats_ignored: Counter,
    /// Heartbeats saying the app went to the background.
    pub backgrounded: Counter,
    /// Send decoded to SendAck queued.
    pub send_to_ack: Histogram,
    /// Send decoded to Deliver queued.
    pub send_to_deliver: Histogram,
    /// Messages per group commit.
    pub commit_batch: Histogram,
    /// Watermark moves per transaction.
    pub watermark_batch: Histogram,
    /// Catch-up backlog per messages stream.
    pub unread: Histogram,
    /// Sampled smoothed RTT.
    pub rtt: Histogram,
    /// Sampled congestion window.
    pub cwnd: Histogram,
    /// Lost packets.
    pub lost_packets: Counter,
    /// UDP datagrams sent.
    pub sent_datagrams: Counter,
    /// UDP datagrams received.
    pub received_datagrams: Counter,
    /// Calls under way.
    pub calls_active: Gauge,
    /// Connections in a call.
    pub call_participants: Gauge,
    /// Calls started.
    pub calls_started: Counter,
    /// Call signals relayed.
    pub call_signals: Counter,
    /// Call media datagrams by [`MediaOutcome`].
    call_media: [Counter; 6],
    /// Call media bytes forwarded.
    pub call_media_bytes: Counter,
    /// The embedded store's WAL checkpoints.
    pub sqlite_checkpoints: CheckpointMetrics,
    /// When the served certificate chain expires (Unix seconds).
    pub certificate_expiry: Gauge,
}

impl Metrics {
    /// A fresh recorder with every metric registered (at zero).
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("chat_commit_batch_messages".into()),
                    BATCH_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("chat_watermark_batch_updates".into()),
                    BATCH_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("chat_unread_messages".into()),
                    UNREAD_BUCKETS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("chat_quic_congestion_window_bytes".into()),
                    WINDOW_BUCKETS,
                )
            })
            .expect("bucket lists are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        let recorder = Arc::new(recorder);
        metrics::with_local_recorder(&*recorder, || {
            for &(name, kind, unit, help) in DESCRIPTIONS {
                match kind {
                    "counter" => metrics::describe_counter!(name, unit, help),
                    "gauge" => metrics::describe_gauge!(name, unit, help),
                    _ => metrics::describe_histogram!(name, unit, help),
                }
            }
            let by_stream = |name: &'static str| {
                STREAM_LABELS.map(|stream| metrics::counter!(name, "stream" => stream))
            };
            // Error codes are few and fixed: register them all so a scrape
            // shows zeros rather than missing series.
            for code in all_error_codes() {
                metrics::counter!("chat_errors_total", "code" => code_label(code)).increment(0);
            }
            for reason in CALL_END_REASONS {
                metrics::counter!("chat_calls_ended_total", "reason" => reason).increment(0);
            }
            for outcome in PUSH_OUTCOMES {
                metrics::counter!("chat_push_notifications_total", "outcome" => outcome)
                    .increment(0);
            }
            for outcome in PUSH_WATCH_OUTCOMES {
                metrics::counter!("chat_push_watches_total", "outcome" => outcome).increment(0);
            }
            Metrics {
                connections_active: metrics::gauge!("chat_connections_active"),
                sessions_active: metrics::gauge!("chat_sessions_active"),
                connections_opened: metrics::counter!("chat_connections_opened_total"),
                connections_refused: metrics::counter!("chat_connections_refused_total"),
                frames_in: by_stream("chat_frames_received_total"),
                frames_out: by_stream("chat_frames_sent_total"),
                sends: metrics::counter!("chat_sends_total"),
                acks: metrics::counter!("chat_send_acks_total"),
                deliveries: metrics::counter!("chat_deliveries_total"),
                redeliveries: metrics::counter!("chat_redeliveries_total"),
                acks_ignored: metrics::counter!("chat_delivery_acks_ignored_total"),
                catch_up_repeats: metrics::counter!("chat_catch_up_repeats_total"),
                receipts: metrics::counter!("chat_receipts_total"),
                typing_updates: metrics::counter!("chat_typing_updates_total"),
                cache_updates_dropped: metrics::counter!("chat_cache_updates_dropped_total"),
                sessions_purged: metrics::counter!("chat_sessions_purged_total"),
                photos_uploaded: metrics::counter!("chat_photos_uploaded_total"),
                photo_bytes_uploaded: metrics::counter!("chat_photo_bytes_uploaded_total"),
                photos_fetched: metrics::counter!("chat_photos_fetched_total"),
                photos_purged: metrics::counter!("chat_photos_purged_total"),
                photo_files_swept: metrics::counter!("chat_photo_files_swept_total"),
                heartbeats_ignored: metrics::counter!("chat_heartbeats_ignored_total"),
                backgrounded: metrics::counter!("chat_backgrounded_total"),
                send_to_ack: metrics::histogram!("chat_send_ack_duration_seconds"),
                send_to_deliver: metrics::histogram!("chat_send_deliver_duration_seconds"),
                commit_batch: metrics::histogram!("chat_commit_batch_messages"),
                watermark_batch: metrics::histogram!("chat_watermark_batch_updates"),
                unread: metrics::histogram!("chat_unread_messages"),
                rtt: metrics::histogram!("chat_quic_rtt_seconds"),
                cwnd: metrics::histogram!("chat_quic_congestion_window_bytes"),
                lost_packets: metrics::counter!("chat_quic_lost_packets_total"),
                sent_datagrams: metrics::counter!("chat_quic_sent_datagrams_total"),
                received_datagrams: metrics::counter!("chat_quic_received_datagrams_total"),
                calls_active: metrics::gauge!("chat_calls_active"),
                call_participants: metrics::gauge!("chat_call_participants"),
                calls_started: metrics::counter!("chat_calls_started_total"),
                call_signals: metrics::counter!("chat_call_signals_total"),
                call_media: MEDIA_OUTCOMES.map(|outcome| {
                    metrics::counter!("chat_call_media_datagrams_total", "outcome" => outcome)
                }),
                call_media_bytes: metrics::counter!("chat_call_media_bytes_total"),
                sqlite_checkpoints: CheckpointMetrics {
                    wal_frames: metrics::gauge!("chat_sqlite_wal_frames"),
                    checkpointer: metrics::histogram!(
                        "chat_sqlite_checkpoint_duration_seconds",
                        "thread" => "checkpointer"
                    ),
                    writer: metrics::histogram!(
                        "chat_sqlite_checkpoint_duration_seconds",
                        "thread" => "writer"
                    ),
                    failures: metrics::counter!("chat_sqlite_checkpoint_failures_total"),
                    #[cfg(test)]
                    fail_next: Default::default(),
                },
                certificate_expiry: metrics::gauge!(
                    "chat_tls_certificate_expiry_timestamp_seconds"
                ),
                recorder: recorder.clone(),
                handle,
            }
        })
    }

    /// Frames received on a stream kind.
    pub fn frames_in(&self, kind: StreamKind) -> &Counter {
        &self.frames_in[kind as usize]
    }

    /// Frames sent on a stream kind.
    pub fn frames_out(&self, kind: StreamKind) -> &Counter {
        &self.frames_out[kind as usize]
    }

    /// Counts an error sent to a client.
    pub fn error(&self, code: ErrorCode) {
        metrics::with_local_recorder(&*self.recorder, || {
            metrics::counter!("chat_errors_total", "code" => code_label(code)).increment(1);
        });
    }

    /// Counts a notification's outcome, one of [`PUSH_OUTCOMES`].
    pub fn push(&self, outcome: &'static str) {
        debug_assert!(PUSH_OUTCOMES.contains(&outcome), "{outcome}");
        metrics::with_local_recorder(&*self.recorder, || {
            metrics::counter!("chat_push_notifications_total", "outcome" => outcome).increment(1);
        });
    }

    /// Counts call media datagrams.
    pub fn call_media(&self, outcome: MediaOutcome, n: u64) {
        self.call_media[outcome as usize].increment(n);
    }

    /// Counts a call that ended, for one of [`CALL_END_REASONS`].
    pub fn call_ended(&self, reason: &'static str) {
        debug_assert!(CALL_END_REASONS.contains(&reason), "{reason}");
        metrics::with_local_recorder(&*self.recorder, || {
            metrics::counter!("chat_calls_ended_total", "reason" => reason).increment(1);
        });
    }

    /// Counts a watch on a foreground connection's message that ended, for
    /// one of [`PUSH_WATCH_OUTCOMES`].
    pub fn push_watch(&self, outcome: &'static str) {
        debug_assert!(PUSH_WATCH_OUTCOMES.contains(&outcome), "{outcome}");
        metrics::with_local_recorder(&*self.recorder, || {
            metrics::counter!("chat_push_watches_total", "outcome" => outcome).increment(1);
        });
    }

    /// Counts push tokens the gateway rejected.
    pub fn push_tokens_rejected(&self, n: u64) {
        metrics::with_local_recorder(&*self.recorder, || {
            metrics::counter!("chat_push_tokens_rejected_total").increment(n);
        });
    }

    /// Counts a connection that ended.
    pub fn closed(&self, reason: &'static str) {
        metrics::with_local_recorder(&*self.recorder, || {
            metrics::counter!("chat_connections_closed_total", "reason" => reason).increment(1);
        });
    }

    /// Records how long a store call took.
    pub fn store_op(
        &self,
        backend: &'static str,
        operation: &'static str,
        ok: bool,
        took: Duration,
    ) {
        let result = if ok { "ok" } else { "error" };
        metrics::with_local_recorder(&*self.recorder, || {
            metrics::histogram!(
                "chat_store_operation_duration_seconds",
                "backend" => backend,
                "operation" => operation,
                "result" => result
            )
            .record(took.as_secs_f64());
        });
    }

    /// Folds recorded histogram samples into their buckets. Samples are
    /// buffered until then, so this must run periodically even when
    /// nothing scrapes the node (see [`UPKEEP_INTERVAL`]).
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Every defined error code (wire values 1..=63 that exist).
fn all_error_codes() -> impl Iterator<Item = ErrorCode> {
    (1..64).filter_map(|v| ErrorCode::try_from(v).ok())
}

/// An error code as a label: `RATE_LIMITED`, not `ERROR_CODE_RATE_LIMITED`.
fn code_label(code: ErrorCode) -> &'static str {
    code.as_str_name().trim_start_matches("ERROR_CODE_")
}

/// The label for why a connection ended.
pub fn close_reason(e: &quinn::ConnectionError) -> &'static str {
    use quinn::ConnectionError as E;
    match e {
        E::ApplicationClosed(_) => "client_closed",
        E::LocallyClosed => "server_closed",
        E::TimedOut => "idle_timeout",
        E::Reset => "reset",
        E::ConnectionClosed(_) | E::TransportError(_) | E::VersionMismatch | E::CidsExhausted => {
            "transport_error"
        }
    }
}
