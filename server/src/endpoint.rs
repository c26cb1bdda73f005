//! The QUIC endpoint: TLS and transport set-up, the accept loop with its
//! connection cap, and shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chat_protocol::{Codec, ErrorCode};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{IdleTimeout, VarInt};
use tokio::sync::watch;

use crate::certs;
use crate::config::{Config, CongestionController, Transport, redact_url};
use crate::delivery::{Delivery, DeliveryTasks};
use crate::http::{self, OpsState};
use crate::hub::Hub;
use crate::metrics::{self, Metrics};
use crate::notify::Notifier;
use crate::presence::Presence;
use crate::ratelimit::{self, RateLimiter};
use crate::session;
use crate::store::instrumented::Instrumented;
use crate::store::postgres::PostgresStore;
use crate::store::presence::{MemoryPresenceStore, PresenceStore};
use crate::store::recent::{DEFAULT_MAX_BYTES, DEFAULT_MAX_CONVERSATIONS, MemoryRecentCache};
use crate::store::redis::RedisStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{HistoryStore, InboxStore, RecentCache};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Invalid configuration.
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// Certificates could not be loaded or created.
    #[error("certificates: {0}")]
    Certs(#[from] certs::CertError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// TLS set-up failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// A configured backend (Redis, Postgres) cannot be used.
    #[error("{0}")]
    Backend(String),
    /// The metrics port could not be bound.
    #[error("cannot serve metrics on {addr}: {source}")]
    MetricsBind {
        /// Address asked for.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Node-wide state shared by every session.
pub struct Shared {
    /// Effective configuration.
    pub config: Config,
    /// Frame decoder with the configured limit.
    pub codec: Codec,
    /// The source of truth.
    pub store: Arc<dyn HistoryStore>,
    /// Recent messages per conversation.
    pub cache: Arc<dyn RecentCache>,
    /// Unread queues, when a production backend provides them.
    pub inbox: Option<Arc<dyn InboxStore>>,
    /// Connected sessions.
    pub hub: Arc<Hub>,
    /// The delivery pipeline.
    pub delivery: Arc<Delivery>,
    /// Online status tracking.
    pub presence: Arc<Presence>,
    /// Wrong-password limits per account and source, and per account.
    pub login_throttle: crate::auth::LoginThrottle,
    /// Argon2 hashes allowed to run at once (one per core), and the
    /// bounded queue in front of them.
    pub hashing: crate::auth::Hashers,
    /// Per-user send rate.
    pub send_limiter: RateLimiter,
    /// Per-user rate of group leaves, which the send rate does not limit
    /// (a user out of send tokens can still leave) but which each take a
    /// turn on the send committer.
    pub leave_limiter: RateLimiter,
    /// Per-connection rate of RevokeSession, which the control rate does
    /// not limit: a thief's connection draining the user's control bucket
    /// must not keep the owner's from logging it out.
    pub revoke_limiter: RateLimiter<u64>,
    /// Per-user DeliveryAcks beyond what the user's connections were
    /// delivered (`streams::messages::ACK_SLACK`).
    pub ack_limiter: RateLimiter,
    /// Per-user rate of control requests (not leaves, logouts or
    /// heartbeats).
    pub control_limiter: RateLimiter,
    /// Per-user rate of MarkSeen frames.
    pub mark_limiter: RateLimiter,
    /// Per-user rate of Typing frames, each a store read and a push to
    /// every connected member.
    pub typing_limiter: RateLimiter,
    /// Connections per address not yet authenticated.
    pub unauthenticated: ratelimit::Unauthenticated,
    /// Per-address rate of registrations.
    pub registration_limiter: RateLimiter<std::net::IpAddr>,
    /// Per-user rate of heartbeats: room for every device the user may
    /// connect beating at the interval the node announces, twice over.
    pub heartbeat_limiter: RateLimiter,
    /// Per-user rate of photo uploads.
    pub upload_limiter: RateLimiter,
    /// Per-user rate of call requests.
    pub call_limiter: RateLimiter,
    /// Group calls.
    pub calls: Arc<crate::calls::Calls>,
    /// Notifications, when a push gateway is set.
    pub notifier: Option<Arc<Notifier>>,
    /// Where photo bytes are kept.
    pub media: Arc<crate::media::MediaFiles>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
}

/// A running chat server.
pub struct Server {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    metrics_addr: SocketAddr,
    dev_ca: Option<PathBuf>,
    /// What new handshakes are answered with (reloadable).
    certificate: Arc<certs::CertificateSlot>,
    shared: Option<Arc<Shared>>,
    ops: Arc<OpsState>,
    /// Accept loop, metrics listener, path sampler, limiter sweeper.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The session purge, which holds the store during its calls: ended
    /// (and waited for) before the store is let go.
    purge: Option<tokio::task::JoinHandle<()>>,
    delivery_tasks: Option<DeliveryTasks>,
}

impl Server {
    /// Validates the configuration, opens the store, loads (or creates)
    /// certificates and starts listening.
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        config.validate()?;
        let identity = certs::load_or_create(&config)?;
        let dev_ca = identity.dev_ca.clone();
        let expires_at = identity.expires_at();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certificate = Arc::new(certs::CertificateSlot::new(identity, provider.clone())?);
        let server_config = quic_config(&config, provider, certificate.clone())?;
        let metrics = Arc::new(Metrics::new());
        note_expiry(&metrics, expires_at);
        // Bound before the store opens: a node that cannot have its port
        // (another node's, or a restart's whose old socket is not let go
        // yet) stops without touching the data directory.
        let bind_error = |source| ServerError::Bind {
            addr: config.listen,
            source,
        };
        let socket = udp_socket(config.listen, &config.transport).map_err(bind_error)?;
        let media_dir = config.media_dir();
        let media = crate::media::MediaFiles::open(&media_dir).map_err(|e| {
            ServerError::Backend(format!(
                "cannot use the media directory {}: {e}",
                media_dir.display()
            ))
        })?;
        let Stores {
            history: store,
            cache,
            inbox,
            presence: presence_store,
        } = Stores::open(&config, &metrics).await?;
        // The directory's photos must be this history's: the sweep deletes
        // the files the history has no row for.
        let history_id = store
            .history_id()
            .await
            .map_err(|e| ServerError::Backend(format!("history: {e}")))?;
        let claim = media.claim(&history_id).await.map_err(|e| {
            ServerError::Backend(format!(
                "cannot use the media directory {}: {e}",
                media_dir.display()
            ))
        })?;
        if let Some(other) = claim {
            return Err(ServerError::Backend(format!(
                "the media directory {} holds the photos of another history ({other}; this \
                 node's is {history_id}): give this history a media-dir of its own, or, if the \
                 history was replaced by a copy of the same data (a restored dump), write \
                 {history_id} into {}",
                media_dir.display(),
                media_dir.join(crate::media::HISTORY_FILE).display()
            )));
        }
        let ops = Arc::new(OpsState {
            metrics: metrics.clone(),
            history: store.clone(),
            presence: presence_store.clone(),
            accepting: true.into(),
        });
        let hub = Arc::new(Hub::default());
        let (notifier, notifier_task) =
            Notifier::start(&config.push, store.clone(), hub.clone(), metrics.clone())
                .map_err(|e| ServerError::Config(crate::config::ConfigError(e)))?
                .unzip();
        if let Some(url) = &config.push.push_gateway_url {
            tracing::info!(gateway = %redact_url(url), "notifications on");
        }
        let calls = crate::calls::Calls::new(
            config.calls.clone(),
            hub.clone(),
            store.clone(),
            metrics.clone(),
            notifier.clone(),
            config.transport.datagram_receive_buffer > 0,
        );
        let (delivery, delivery_tasks) = Delivery::start(
            &config,
            store.clone(),
            cache.clone(),
            inbox.clone(),
            hub.clone(),
            metrics.clone(),
            (notifier.clone(), calls.clone()),
        );
        calls.write_logs_through(&delivery);
        let runtime = quinn::default_runtime()
            .ok_or_else(|| ServerError::Tls("no async runtime for quinn".into()))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            runtime,
        )
        .map_err(bind_error)?;
        let local_addr = endpoint.local_addr().map_err(bind_error)?;
        // The last fallible step, because its task would outlive a failed
        // start (the committers above stop once their handle is dropped).
        let (metrics_addr, http_task) = http::start(config.metrics_listen, ops.clone())
            .await
            .map_err(|source| ServerError::MetricsBind {
                addr: config.metrics_listen,
                source,
            })?;
        let node = config
            .node_id
            .clone()
            .unwrap_or_else(|| default_node_id(local_addr));
        let presence = Presence::start(
            node,
            config.limits.heartbeat_interval,
            config.limits.presence_ttl_multiple,
            presence_store,
            store.clone(),
        );
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shared = Arc::new(Shared {
            send_limiter: RateLimiter::new(config.limits.send_rate, config.limits.send_burst),
            leave_limiter: RateLimiter::new(ratelimit::LEAVE_RATE, ratelimit::LEAVE_BURST),
            revoke_limiter: RateLimiter::new(ratelimit::REVOKE_RATE, ratelimit::REVOKE_BURST),
            ack_limiter: RateLimiter::new(
                crate::streams::messages::ACK_SLACK_REFILL,
                crate::streams::messages::ACK_SLACK as u32,
            ),
            mark_limiter: RateLimiter::new(config.limits.mark_rate, config.limits.mark_burst),
            typing_limiter: RateLimiter::new(config.limits.typing_rate, config.limits.typing_burst),
            unauthenticated: ratelimit::Unauthenticated::new(
                config.transport.max_unauthenticated_per_address,
            ),
            registration_limiter: RateLimiter::per_hour(config.limits.registrations_per_address),
            upload_limiter: RateLimiter::per_hour(config.limits.uploads_per_hour),
            call_limiter: RateLimiter::new(
                crate::streams::calls::CALL_REQUEST_RATE,
                crate::streams::calls::CALL_REQUEST_BURST,
            ),
            calls,
            notifier,
            media: Arc::new(media),
            control_limiter: RateLimiter::new(
                config.limits.control_rate,
                config.limits.control_burst,
            ),
            heartbeat_limiter: ratelimit::heartbeat_limiter(
                config.limits.max_sessions_per_user,
                config.limits.heartbeat_interval,
            ),
            metrics,
            hashing: crate::auth::Hashers::new(
                cores,
                config.limits.max_queued_password_checks,
                config.limits.password_checks_per_address,
            ),
            login_throttle: crate::auth::LoginThrottle::new(
                config.limits.max_login_failures,
                config.limits.max_account_login_failures,
                config.limits.login_failure_window,
            ),
            presence,
            codec: Codec::new(config.limits.max_frame_len).for_server(),
            config,
            store,
            cache,
            inbox,
            hub,
            delivery,
        });
        let mut tasks = vec![
            tokio::spawn(accept_loop(endpoint.clone(), shared.clone())),
            http_task,
            tokio::spawn(sample_paths(shared.hub.clone())),
            tokio::spawn(metrics_upkeep(shared.metrics.clone())),
            tokio::spawn(sweep_limiter(Arc::downgrade(&shared))),
        ];
        // Stopped (with its requests under way) after the committers: it
        // holds the store.
        tasks.extend(notifier_task);
        let purge = Some(tokio::spawn(purge_sessions(Arc::downgrade(&shared))));
        tracing::info!(%local_addr, %metrics_addr, "chat-server listening (ALPN chat/1)");
        Ok(Server {
            endpoint,
            local_addr,
            metrics_addr,
            dev_ca,
            certificate,
            shared: Some(shared),
            ops,
            tasks,
            purge,
            delivery_tasks: Some(delivery_tasks),
        })
    }

    /// Reads the certificate and key again (`tls-cert` and `tls-key`, or
    /// the dev set under the data directory) and answers new handshakes
    /// with them: a renewed certificate without a restart. On an error
    /// (a file missing, a key that does not match) the current one stays.
    pub fn reload_certificate(&self) -> Result<(), ServerError> {
        let config = &self.shared.as_ref().expect("running").config;
        let identity = certs::load(config)?;
        let expires_at = identity.expires_at();
        self.certificate.replace(identity)?;
        tracing::info!("certificate reloaded");
        note_expiry(&self.ops.metrics, expires_at);
        Ok(())
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The bound UDP address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The development CA clients must trust, when the server uses one.
    pub fn dev_ca(&self) -> Option<&std::path::Path> {
        self.dev_ca.as_deref()
    }

    /// Stops accepting, tells clients to reconnect (SERVER_SHUTTING_DOWN),
    /// lets in-flight group commits finish, and closes the store. False
    /// when `shutdown-timeout` ran out first (sessions or committers were
    /// still at work; nothing acknowledged is lost by that, since a
    /// SendAck follows its commit, but the operator should know).
    pub async fn shutdown(mut self) -> bool {
        tracing::info!("shutting down");
        self.ops.accepting.store(false, Ordering::SeqCst);
        let accept = self.tasks.remove(0);
        accept.abort();
        let _ = accept.await;
        self.endpoint.close(
            VarInt::from_u32(ErrorCode::ServerShuttingDown as u32),
            b"server shutting down; reconnect",
        );
        let grace = self
            .shared
            .as_ref()
            .map_or(Duration::from_secs(10), |s| s.config.shutdown_timeout);
        let deadline = tokio::time::Instant::now() + grace;
        let _ = tokio::time::timeout_at(deadline, self.endpoint.wait_idle()).await;
        // The purge holds the store during its calls: it ends first.
        if let Some(purge) = self.purge.take() {
            purge.abort();
            let _ = purge.await;
        }
        // Session tasks hold clones of `shared`; they end once their
        // connections are closed. Wait (bounded) for them, so the UDP socket
        // and the store are released when this returns.
        let shared = self.shared.take().expect("shutdown runs once");
        while Arc::strong_count(&shared) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let sessions_left = Arc::strong_count(&shared) - 1;
        drop(shared);
        // With every `Delivery` handle gone the committers drain their
        // queues (finishing in-flight group commits) and stop.
        let mut committers_done = true;
        if let Some(delivery) = self.delivery_tasks.take() {
            committers_done = tokio::time::timeout_at(deadline, delivery.join())
                .await
                .is_ok();
        }
        // Awaited, not only aborted: the metrics listener holds the store
        // (through `ops`), which must be closed, and the data directory let
        // go, when this returns (a node restarted in the process reopens
        // it).
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
        // Tasks that borrow the store for one call (the presence sweeper's
        // last-active write, a mark's membership check) and the metrics
        // port's requests in flight (holding `ops`) may still hold it: wait
        // for them, so that when `self` (and with it `ops`, the other
        // reference) drops at the end, the store closes here.
        let store = self.ops.history.clone();
        let held = |store: &Arc<dyn HistoryStore>| {
            Arc::strong_count(store) > 2 || Arc::strong_count(&self.ops) > 1
        };
        while held(&store) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let store_released = !held(&store);
        drop(store);
        let complete = sessions_left == 0 && committers_done && store_released;
        if complete {
            tracing::info!("shut down");
        } else {
            tracing::warn!(
                sessions_left,
                committers_done,
                store_released,
                timeout = %humantime::format_duration(grace),
                "shutdown-timeout ran out before the node was drained"
            );
        }
        complete
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A server dropped without `shutdown` (tests, a failed start) still
        // stops its listeners.
        for task in self.tasks.iter().chain(&self.purge) {
            task.abort();
        }
    }
}

/// Samples every live session's QUIC path statistics into the metrics.
async fn sample_paths(hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(metrics::PATH_SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        hub.for_each_session(|session| session.sample_path(true));
    }
}

/// Keeps the metrics' buffered histogram samples bounded.
async fn metrics_upkeep(metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(metrics::UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        metrics.run_upkeep();
    }
}

/// Drops idle rate-limit buckets; ends with the server.
async fn sweep_limiter(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(ratelimit::SWEEP_INTERVAL);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = std::time::Instant::now();
        shared.send_limiter.sweep(now);
        shared.leave_limiter.sweep(now);
        shared.revoke_limiter.sweep(now);
        shared.ack_limiter.sweep(now);
        shared.control_limiter.sweep(now);
        shared.mark_limiter.sweep(now);
        shared.typing_limiter.sweep(now);
        shared.heartbeat_limiter.sweep(now);
        shared.registration_limiter.sweep(now);
        shared.upload_limiter.sweep(now);
        shared.call_limiter.sweep(now);
        shared.calls.sweep(now);
    }
}

/// Sessions deleted per store call while purging. On SQLite the call runs
/// in a group commit's transaction, beside that batch's sends, so it is
/// kept to a couple of milliseconds.
const PURGE_BATCH: u32 = 500;
/// The pause between two purge batches, so a backlog (a first purge on a
/// large table) takes short turns with the store's other work.
const PURGE_PAUSE: Duration = Duration::from_millis(100);

/// Deletes sessions that ended (expired or were revoked) more than
/// `session-retention` ago, at start and then every
/// `session-purge-interval`, a batch at a time; ends with the server.
/// Nodes sharing a Postgres each purge: a row is deleted once, whoever
/// comes first.
async fn purge_sessions(weak: std::sync::Weak<Shared>) {
    let every = match weak.upgrade() {
        Some(shared) => shared.config.limits.session_purge_interval,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The photo subdirectory swept this round; a random start, so nodes
    // restarted often still reach them all.
    let mut prefix: u8 = rand::random();
    loop {
        tick.tick().await;
        in_batches("ended sessions", || {
            // Not `Shared` across the store call (a graceful stop waits
            // for every holder of it, after ending this task).
            let held = weak.upgrade().map(|shared| {
                (
                    shared.store.clone(),
                    shared.metrics.clone(),
                    shared.config.limits.session_retention,
                )
            });
            async move {
                let (store, metrics, retention) = held?;
                let purged = store.purge_sessions(ms_ago(retention), PURGE_BATCH).await;
                if let Ok(n) = purged {
                    metrics.sessions_purged.increment(n);
                }
                Some(purged)
            }
        })
        .await;
        purge_unsent_photos(&weak).await;
        sweep_photo_files(&weak, prefix).await;
        prefix = prefix.wrapping_add(1);
        if weak.strong_count() == 0 {
            return;
        }
    }
}

/// How long an upload a send bound is kept at least, stored or not: far
/// longer than an append takes (the committers give up on a store within
/// seconds), so the purge never takes one whose message is being stored.
const BOUND_UPLOAD_GRACE: Duration = Duration::from_secs(600);

/// Deletes uploads that no stored message carries, a batch at a time: those
/// no send named within `upload-retention`, and those a refused send named
/// (after the retention, or [`BOUND_UPLOAD_GRACE`] if longer, from its
/// binding). Their rows first (a send naming one then is refused NOT_FOUND,
/// never left pointing at a missing file), then their files.
async fn purge_unsent_photos(weak: &std::sync::Weak<Shared>) {
    in_batches("unsent photos", || {
        let held = weak.upgrade().map(|shared| {
            (
                shared.store.clone(),
                shared.media.clone(),
                shared.metrics.clone(),
                shared.config.limits.upload_retention,
            )
        });
        async move {
            let (store, media, metrics, retention) = held?;
            let (before, bound_before) = (
                ms_ago(retention),
                ms_ago(retention.max(BOUND_UPLOAD_GRACE)),
            );
            let purged = store.purge_media(before, bound_before, PURGE_BATCH).await;
            Some(match purged {
                Ok(ids) => {
                    for id in &ids {
                        if let Err(e) = media.remove(id).await {
                            tracing::warn!(media_id = id, error = %e, "cannot remove an unsent photo's file");
                        }
                    }
                    metrics.photos_purged.increment(ids.len() as u64);
                    Ok(ids.len() as u64)
                }
                Err(e) => Err(e),
            })
        }
    })
    .await;
}

/// How long a photo file without a row must have gone unwritten before
/// the sweep removes it: far longer than an upload lasts, and than the
/// moment between a stored file's rename and its row.
const ORPHAN_FILE_GRACE: Duration = Duration::from_secs(3600);

/// Removes the photo files of subdirectory `prefix` (of 256) that have no
/// row: left by a stop between a file's rename and its row, or between a
/// purge's rows and its files. Never served (a download needs the row),
/// they would only fill the disk. One subdirectory per purge round, so
/// the directory is walked whole every 256 `session-purge-interval`s
/// (about 11 days at the default), a small slice at a time. The directory
/// is paired with its history at start (`MediaFiles::claim`), so a node on
/// another history's store never takes its photos for leftovers.
async fn sweep_photo_files(weak: &std::sync::Weak<Shared>, prefix: u8) {
    let Some((store, media, metrics)) = weak
        .upgrade()
        .map(|s| (s.store.clone(), s.media.clone(), s.metrics.clone()))
    else {
        return;
    };
    let mut listing = match media.list(prefix).await {
        Ok(listing) => listing,
        Err(e) => {
            tracing::warn!(prefix, error = %e, "cannot list photo files to sweep");
            return;
        }
    };
    let before = std::time::SystemTime::now() - ORPHAN_FILE_GRACE;
    let mut removed = 0u64;
    // A batch of names at a time: a subdirectory of millions is never held
    // whole, and only the files without a row are looked at.
    loop {
        let ids = match listing.next(PURGE_BATCH as usize).await {
            Ok(ids) if ids.is_empty() => break,
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(prefix, error = %e, "cannot list photo files to sweep");
                break;
            }
        };
        let present: std::collections::HashSet<String> = match store
            .media_present(ids.clone())
            .await
        {
            Ok(present) => present.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot sweep photo files; trying again at the next interval");
                break;
            }
        };
        for id in ids.iter().filter(|id| !present.contains(*id)) {
            let swept = match media.written_before(id, before).await {
                Ok(false) => continue,
                Ok(true) => media.remove(id).await,
                Err(e) => Err(e),
            };
            match swept {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(media_id = id, error = %e, "cannot remove a photo file without a row")
                }
            }
        }
        tokio::time::sleep(PURGE_PAUSE).await;
    }
    if removed > 0 {
        metrics.photo_files_swept.increment(removed);
        tracing::info!(removed, prefix, "removed photo files that had no row");
    }
}

/// Unix ms `d` ago.
fn ms_ago(d: Duration) -> i64 {
    crate::streams::now_ms().saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Runs `batch`, one store call deleting up to [`PURGE_BATCH`] rows and
/// saying how many, until it deletes fewer, with [`PURGE_PAUSE`] between
/// calls so a backlog takes short turns with the store's other work; a
/// failure waits for the next interval. `None` from `batch`: the server is
/// gone.
async fn in_batches<F, Fut>(what: &str, mut batch: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<Result<u64, crate::store::StoreError>>>,
{
    let mut purged = 0;
    loop {
        match batch().await {
            None => return,
            Some(Ok(n)) => {
                purged += n;
                if n < u64::from(PURGE_BATCH) {
                    break;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cannot purge {what}; trying again at the next interval");
                break;
            }
        }
        tokio::time::sleep(PURGE_PAUSE).await;
    }
    if purged > 0 {
        tracing::info!(purged, "deleted {what}");
    }
}

/// The UDP socket with the configured kernel buffers; warns when the
/// kernel granted less than asked.
fn udp_socket(addr: SocketAddr, t: &Transport) -> std::io::Result<std::net::UdpSocket> {
    let (socket, granted) = bind_udp(addr, t.socket_receive_buffer, t.socket_send_buffer)?;
    if t.socket_receive_buffer > 0 && granted.receive < t.socket_receive_buffer {
        tracing::warn!(
            asked = t.socket_receive_buffer,
            granted = granted.receive,
            "the kernel capped socket-receive-buffer; raise net.core.rmem_max"
        );
    }
    if t.socket_send_buffer > 0 && granted.send < t.socket_send_buffer {
        tracing::warn!(
            asked = t.socket_send_buffer,
            granted = granted.send,
            "the kernel capped socket-send-buffer; raise net.core.wmem_max"
        );
    }
    Ok(socket)
}

/// Usable kernel buffer sizes a socket was granted, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct SocketBuffers {
    /// SO_RCVBUF.
    pub receive: usize,
    /// SO_SNDBUF.
    pub send: usize,
}

/// A UDP socket bound to `addr` that asked the kernel for `receive` and
/// `send` bytes of buffer (0: the OS default), and the usable sizes it
/// got: Linux caps them at net.core.rmem_max / wmem_max without an error.
/// chat-loadgen binds its client sockets with it too.
pub fn bind_udp(
    addr: SocketAddr,
    receive: usize,
    send: usize,
) -> std::io::Result<(std::net::UdpSocket, SocketBuffers)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4 too on [::], as quinn's own bind does.
        let _ = socket.set_only_v6(false);
    }
    if receive > 0 {
        socket.set_recv_buffer_size(receive)?;
    }
    if send > 0 {
        socket.set_send_buffer_size(send)?;
    }
    let granted = SocketBuffers {
        receive: usable_buffer(socket.recv_buffer_size()?),
        send: usable_buffer(socket.send_buffer_size()?),
    };
    socket.bind(&addr.into())?;
    Ok((socket.into(), granted))
}

/// The buffer size asked for that a reported socket buffer size stands
/// for: Linux doubles what it grants (for its bookkeeping) when it
/// reports it.
fn usable_buffer(reported: usize) -> usize {
    if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    }
}

/// The configured backends.
struct Stores {
    history: Arc<dyn HistoryStore>,
    cache: Arc<dyn RecentCache>,
    inbox: Option<Arc<dyn InboxStore>>,
    presence: Arc<dyn PresenceStore>,
}

impl Stores {
    /// Embedded unless URLs are configured; a configured backend that
    /// cannot be reached fails start-up with an error naming it. Every
    /// store is wrapped to time its calls.
    async fn open(config: &Config, metrics: &Arc<Metrics>) -> Result<Stores, ServerError> {
        let raw = Self::open_raw(config, metrics).await?;
        let history: Arc<dyn HistoryStore> = Arc::new(Instrumented::new(
            raw.history.clone(),
            raw.history.backend(),
            metrics.clone(),
        ));
        let presence: Arc<dyn PresenceStore> = Arc::new(Instrumented::new(
            raw.presence.clone(),
            raw.presence.backend(),
            metrics.clone(),
        ));
        let inbox = raw.inbox.map(|inbox| {
            let backend = inbox.backend();
            Arc::new(Instrumented::new(inbox, backend, metrics.clone())) as Arc<dyn InboxStore>
        });
        let cache_backend = if config.redis_url.is_some() {
            "redis"
        } else {
            "memory"
        };
        let cache: Arc<dyn RecentCache> =
            Arc::new(Instrumented::new(raw.cache, cache_backend, metrics.clone()));
        Ok(Stores {
            history,
            cache,
            inbox,
            presence,
        })
    }

    async fn open_raw(config: &Config, metrics: &Metrics) -> Result<Stores, ServerError> {
        let history: Arc<dyn HistoryStore> = match &config.postgres_url {
            Some(url) => {
                let size = config.postgres_pool_size;
                let store = match &config.postgres_schema {
                    Some(schema) => PostgresStore::connect_with_schema(url, schema, size).await,
                    None => PostgresStore::connect(url, size).await,
                }
                .map_err(|e| ServerError::Backend(format!("postgres: {e}")))?
                .with_settle_timeout(config.postgres_commit_settle_timeout);
                tracing::info!(target = store.target(), "postgres connected");
                Arc::new(store)
            }
            None => Arc::new(SqliteStore::open_observed(
                &config.data_dir,
                config.sqlite_commit_gap,
                metrics.sqlite_checkpoints.clone(),
            )?),
        };
        tracing::info!(backend = history.backend(), "history store open");
        let Some(url) = &config.redis_url else {
            return Ok(Stores {
                history,
                cache: Arc::new(MemoryRecentCache::new(
                    DEFAULT_MAX_CONVERSATIONS,
                    DEFAULT_MAX_BYTES,
                )),
                inbox: None,
                presence: Arc::new(MemoryPresenceStore::default()),
            });
        };
        let redis = RedisStore::connect(url, &config.redis_prefix)
            .await
            .map_err(|e| ServerError::Backend(format!("redis at {}: {e}", redact_url(url))))?;
        tracing::info!(url = %redact_url(url), prefix = %config.redis_prefix, "redis connected");
        // The prefix's caches and queues must be this history's.
        let id = history
            .history_id()
            .await
            .map_err(|e| ServerError::Backend(format!("history: {e}")))?;
        // A Redis that answers but refuses the write (full, a replica) does
        // not stop the node: readiness checks claim the prefix again.
        let claimed = match redis.claim(&id).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(error = %e, "could not claim the redis prefix; readiness checks will try again");
                None
            }
        };
        if let Some(other) = claimed {
            return Err(ServerError::Backend(format!(
                "redis prefix {:?} at {} holds the caches of another history ({other}; this \
                 node's is {id}): give this deployment a redis-prefix of its own, or, if its \
                 history was replaced (a new database, a dump from before the name), delete \
                 that prefix's keys",
                config.redis_prefix,
                redact_url(url)
            )));
        }
        Ok(Stores {
            history,
            cache: Arc::new(redis.clone()),
            inbox: Some(Arc::new(redis.clone())),
            presence: Arc::new(redis),
        })
    }
}

/// The name a node goes by in presence records when `node-id` is unset:
/// its listen address, or on every address (`0.0.0.0`, as in containers,
/// where every node would have the same) the host's name and the port.
fn default_node_id(local_addr: SocketAddr) -> String {
    if !local_addr.ip().is_unspecified() {
        return local_addr.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if host.is_empty() {
        local_addr.to_string()
    } else {
        format!("{host}:{}", local_addr.port())
    }
}

/// A handshake not done by then is dropped. Honest handshakes take a few
/// round trips; a half-open one (a spoofed source address, a client that
/// stopped) would otherwise last the idle timeout.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// [`HANDSHAKE_TIMEOUT`], or longer where a large `initial-rtt` makes the
/// first retransmission of a lost flight come later (about 3 x
/// `initial-rtt` before any RTT sample).
fn handshake_timeout(transport: &Transport) -> Duration {
    HANDSHAKE_TIMEOUT.max(transport.initial_rtt * 4)
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    // Established connections and handshakes in progress are counted apart,
    // each up to `max-connections`: half-open handshakes (a flood of
    // Initials from spoofed addresses) used to hold connection places for
    // the idle timeout and turn every honest client away with SERVER_BUSY.
    // Under many handshakes, address validation keeps them from piling up.
    let active = Arc::new(AtomicUsize::new(0));
    let handshakes = Arc::new(AtomicUsize::new(0));
    let transport = &shared.config.transport;
    let max = transport.max_connections;
    // From this many handshakes in progress on, a client must prove its
    // address first (a Retry: one more round trip), so Initials from
    // spoofed sources, which never finish, keep no state.
    let retry_from = (max / 4).clamp(1, 1_024);
    while let Some(incoming) = endpoint.accept().await {
        let busy = handshakes.load(Ordering::Relaxed) >= retry_from;
        if (transport.stateless_retry || busy) && !incoming.remote_address_validated() {
            // The client must echo the Retry token before we keep any
            // state for it; `retry` fails only if it already did once.
            if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
            }
            continue;
        }
        let Some(handshake) = Slot::try_take(&handshakes, max) else {
            // As many handshakes from proven addresses as connections
            // allowed: the client backs off and tries again.
            shared.metrics.closed("handshakes_full");
            incoming.refuse();
            continue;
        };
        tokio::spawn(serve_incoming(
            shared.clone(),
            incoming,
            active.clone(),
            transport.zero_rtt,
            handshake,
        ));
    }
}

/// One of `max-connections` places (of connections, or of handshakes),
/// given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A place, if fewer than `max` are taken.
    fn try_take(taken: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        taken
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(taken.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Completes a handshake and serves the connection.
async fn serve_incoming(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    active: Arc<AtomicUsize>,
    zero_rtt: bool,
    handshake: Slot,
) {
    let metrics = shared.metrics.clone();
    let max = shared.config.transport.max_connections;
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            tracing::debug!(error = %e, "handshake failed");
            metrics.closed("handshake_failed");
            return;
        }
    };
    let full = || active.load(Ordering::Relaxed) >= max;
    let timeout = handshake_timeout(&shared.config.transport);
    let finished = |result: Result<Result<quinn::Connection, quinn::ConnectionError>, _>| {
        let outcome = match result {
            Ok(Ok(conn)) => return Some(conn),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        tracing::debug!(error = %outcome, "handshake failed");
        metrics.closed("handshake_failed");
        None
    };
    // With 0-RTT the connection is in use before its handshake is done.
    let connecting = if zero_rtt && !full() {
        match connecting.into_0rtt() {
            Ok((conn, accepted)) => {
                return serve_early(shared, conn, accepted, active, handshake).await;
            }
            Err(connecting) => connecting,
        }
    } else {
        connecting
    };
    let Some(conn) = finished(tokio::time::timeout(timeout, connecting).await) else {
        return;
    };
    drop(handshake);
    serve_established(shared, conn, &active);
}

/// Serves a connection whose handshake is done, in a task of its own (the
/// caller's state, sized for the handshake, is freed instead of staying
/// allocated for the connection's life), or closes it with SERVER_BUSY at
/// `max-connections`.
fn serve_established(shared: Arc<Shared>, conn: quinn::Connection, active: &Arc<AtomicUsize>) {
    let Some(slot) = take_connection_place(&shared, &conn, active) else {
        return;
    };
    tokio::spawn(async move {
        session::run(shared, conn, None).await;
        drop(slot);
    });
}

/// Serves a connection accepted with 0-RTT: its session starts now, on
/// replay-safe frames only, while the handshake finishes. Until then it
/// keeps its handshake place, not a connection place, so half-open 0-RTT
/// attempts count toward Retry and are dropped after the handshake
/// timeout like any other handshake; once done it needs a connection place like
/// any other connection (SERVER_BUSY without one).
async fn serve_early(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    accepted: quinn::ZeroRttAccepted,
    active: Arc<AtomicUsize>,
    handshake: Slot,
) {
    // `done` turns true once the handshake is confirmed; dropped without
    // that, the session's held frames are never processed. The session's
    // task gets the connection place once there is one, and gives it back
    // when it ends; this task ends with the handshake.
    let (done, confirmed) = watch::channel(false);
    let (place_tx, place_rx) = tokio::sync::oneshot::channel::<Place>();
    tokio::spawn({
        let (shared, conn) = (shared.clone(), conn.clone());
        async move {
            session::run(shared, conn, Some(confirmed)).await;
            // Given back when dropped, also if the session panicked.
            drop(place_rx.await);
        }
    });
    // Resolves when the handshake completes or the connection ends first
    // (its value means nothing on a server).
    let timeout = handshake_timeout(&shared.config.transport);
    let completed = tokio::time::timeout(timeout, accepted).await.is_ok();
    drop(handshake);
    if let Some(reason) = conn.close_reason() {
        // Ended before its handshake did, whoever closed it (the peer, or
        // the session over its early data or its login timer): a failed
        // handshake, counted here as a 1-RTT one's is (the session counts
        // only connections that were established).
        tracing::debug!(reason = %reason, "0-RTT connection ended during its handshake");
        shared.metrics.closed("handshake_failed");
        return;
    }
    if !completed {
        tracing::debug!("0-RTT handshake not completed in time");
        shared.metrics.closed("handshake_failed");
        crate::wire::close(&conn, ErrorCode::Timeout, "handshake not completed in time");
        return;
    }
    let Some(slot) = take_connection_place(&shared, &conn, &active) else {
        return;
    };
    let _ = done.send(true);
    let _ = place_tx.send(slot);
}

/// A connection place, counted in `connections_active` while held: both
/// are given back when it is dropped, however the connection's task ends.
struct Place {
    _slot: Slot,
    metrics: Arc<Metrics>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.metrics.connections_active.decrement(1.0);
    }
}

/// A connection place for `conn`, counted as opened; or none, and `conn`
/// closed with SERVER_BUSY (a clear code the client backs off on, where a
/// bare refusal would look like a network failure).
fn take_connection_place(
    shared: &Shared,
    conn: &quinn::Connection,
    active: &Arc<AtomicUsize>,
) -> Option<Place> {
    let metrics = &shared.metrics;
    let max = shared.config.transport.max_connections;
    let Some(slot) = Slot::try_take(active, max) else {
        tracing::warn!(
            max,
            remote = %conn.remote_address(),
            "connection limit reached; closing with SERVER_BUSY"
        );
        metrics.connections_refused.increment(1);
        crate::wire::close_counted(
            conn,
            metrics,
            ErrorCode::ServerBusy,
            "server busy; try again later",
        );
        return None;
    };
    metrics.connections_opened.increment(1);
    metrics.connections_active.increment(1.0);
    Some(Place {
        _slot: slot,
        metrics: metrics.clone(),
    })
}

/// Within this of its expiry, loading a certificate logs a warning.
const CERTIFICATE_EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Exports when the certificate now served expires, and says so in the log
/// when that is soon or past. A chain this cannot read (rustls accepted it)
/// leaves the gauge as it was, with a warning: it is no reason to refuse
/// service.
fn note_expiry(metrics: &Metrics, expires_at: Result<i64, certs::CertError>) {
    let expires_at = match expires_at {
        Ok(at) => at,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the certificate's expiry date");
            return;
        }
    };
    metrics.certificate_expiry.set(expires_at as f64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let left = expires_at.saturating_sub(now);
    if left <= 0 {
        tracing::error!(
            expired_secs_ago = left.unsigned_abs(),
            "the certificate has EXPIRED: clients refuse every handshake; renew it and send SIGHUP"
        );
    } else if left < CERTIFICATE_EXPIRY_WARNING.as_secs() as i64 {
        tracing::warn!(
            expires_in = %humantime::format_duration(Duration::from_secs(left as u64)),
            "the certificate expires soon; renew it and send SIGHUP"
        );
    }
}

fn quic_config(
    config: &Config,
    provider: Arc<rustls::crypto::CryptoProvider>,
    certificate: Arc<certs::CertificateSlot>,
) -> Result<quinn::ServerConfig, ServerError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certificate);
    tls.alpn_protocols = vec![chat_protocol::ALPN.to_vec()];
    let t = &config.transport;
    if t.zero_rtt {
        // quinn requires "unlimited" early data; what early data may do is
        // limited per frame (see `Body::is_replay_safe`). Resumption needs
        // a session cache big enough for the node's clients.
        tls.max_early_data_size = u32::MAX;
        tls.session_storage =
            rustls::server::ServerSessionMemoryCache::new(t.max_connections.clamp(1024, 1 << 20));
    } else {
        tls.max_early_data_size = 0;
    }
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.migration(t.migration);
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            IdleTimeout::try_from(t.idle_timeout)
                .map_err(|e| ServerError::Tls(format!("idle-timeout: {e}")))?,
        ))
        .keep_alive_interval((!t.keep_alive_interval.is_zero()).then_some(t.keep_alive_interval))
        .max_concurrent_bidi_streams(VarInt::from_u32(t.max_concurrent_bidi_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(t.max_concurrent_uni_streams))
        .stream_receive_window(VarInt::from_u32(t.stream_receive_window))
        .receive_window(VarInt::from_u32(t.receive_window))
        .send_window(t.send_window)
        .initial_rtt(t.initial_rtt)
        .initial_mtu(t.initial_mtu)
        .min_mtu(t.min_mtu)
        .mtu_discovery_config(t.mtu_discovery.then(quinn::MtuDiscoveryConfig::default))
        .datagram_receive_buffer_size(
            (t.datagram_receive_buffer > 0).then_some(t.datagram_receive_buffer),
        )
        .datagram_send_buffer_size(t.datagram_send_buffer)
        .enable_segmentation_offload(t.gso);
    if t.ack_eliciting_threshold > 0 {
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(VarInt::from_u32(t.ack_eliciting_threshold))
            .max_ack_delay(Some(t.max_ack_delay));
        transport.ack_frequency_config(Some(ack));
    }
    match t.congestion_controller {
        CongestionController::Cubic => transport
            .congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
        CongestionController::NewReno => transport
            .congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default())),
        CongestionController::Bbr => transport
            .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
    };
    server.transport_config(Arc::new(transport));
    Ok(server)
}
