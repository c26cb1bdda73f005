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

use crate::certs::{self, ServerIdentity};
use crate::config::Config;
use crate::delivery::{Delivery, DeliveryTasks};
use crate::hub::Hub;
use crate::presence::Presence;
use crate::session;
use crate::store::postgres::PostgresStore;
use crate::store::presence::{MemoryPresenceStore, PresenceStore};
use crate::store::recent::{DEFAULT_MAX_CONVERSATIONS, MemoryRecentCache};
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
    /// Wrong-password limits per account.
    pub login_throttle: crate::auth::LoginThrottle,
    /// Argon2 hashes allowed to run at once (one per core).
    pub hashing: tokio::sync::Semaphore,
}

/// A running chat server.
pub struct Server {
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    dev_ca: Option<PathBuf>,
    shared: Option<Arc<Shared>>,
    accept: tokio::task::JoinHandle<()>,
    delivery_tasks: DeliveryTasks,
}

impl Server {
    /// Validates the configuration, opens the store, loads (or creates)
    /// certificates and starts listening.
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        config.validate()?;
        let identity = certs::load_or_create(&config)?;
        let dev_ca = identity.dev_ca.clone();
        let server_config = quic_config(&config, identity)?;
        let Stores {
            history: store,
            cache,
            inbox,
            presence: presence_store,
        } = Stores::open(&config).await?;
        let hub = Arc::new(Hub::default());
        let (delivery, delivery_tasks) =
            Delivery::start(store.clone(), cache.clone(), inbox.clone(), hub.clone());
        let endpoint = quinn::Endpoint::server(server_config, config.listen).map_err(|source| {
            ServerError::Bind {
                addr: config.listen,
                source,
            }
        })?;
        let local_addr = endpoint.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        let node = config
            .node_id
            .clone()
            .unwrap_or_else(|| local_addr.to_string());
        let presence = Presence::start(
            node,
            config.limits.heartbeat_interval,
            config.limits.presence_ttl_multiple,
            presence_store,
            store.clone(),
        );
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shared = Arc::new(Shared {
            hashing: tokio::sync::Semaphore::new(cores),
            login_throttle: crate::auth::LoginThrottle::new(
                config.limits.max_login_failures,
                config.limits.login_failure_window,
            ),
            presence,
            codec: Codec::new(config.limits.max_frame_len),
            config,
            store,
            cache,
            inbox,
            hub,
            delivery,
        });
        let accept = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        tracing::info!(%local_addr, "chat-server listening (ALPN chat/1)");
        Ok(Server {
            endpoint,
            local_addr,
            dev_ca,
            shared: Some(shared),
            accept,
            delivery_tasks,
        })
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
    /// lets in-flight group commits finish, and closes the store.
    pub async fn shutdown(mut self) {
        tracing::info!("shutting down");
        self.accept.abort();
        let _ = (&mut self.accept).await;
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
        // Session tasks hold clones of `shared`; they end once their
        // connections are closed. Wait (bounded) for them, so the UDP socket
        // and the store are released when this returns.
        let shared = self.shared.take().expect("shutdown runs once");
        while Arc::strong_count(&shared) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(shared);
        // With every `Delivery` handle gone the committers drain their
        // queues (finishing in-flight group commits) and stop.
        let _ = tokio::time::timeout_at(deadline, self.delivery_tasks.join()).await;
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
    /// cannot be reached fails start-up with an error naming it.
    async fn open(config: &Config) -> Result<Stores, ServerError> {
        let history: Arc<dyn HistoryStore> = match &config.postgres_url {
            Some(url) => {
                let size = config.postgres_pool_size;
                let store = match &config.postgres_schema {
                    Some(schema) => PostgresStore::connect_with_schema(url, schema, size).await,
                    None => PostgresStore::connect(url, size).await,
                }
                .map_err(|e| ServerError::Backend(format!("postgres: {e}")))?;
                tracing::info!(target = store.target(), "postgres connected");
                Arc::new(store)
            }
            None => Arc::new(SqliteStore::open(&config.data_dir)?),
        };
        tracing::info!(backend = history.backend(), "history store open");
        let Some(url) = &config.redis_url else {
            return Ok(Stores {
                history,
                cache: Arc::new(MemoryRecentCache::new(DEFAULT_MAX_CONVERSATIONS)),
                inbox: None,
                presence: Arc::new(MemoryPresenceStore::default()),
            });
        };
        let redis = RedisStore::connect(url, &config.redis_prefix)
            .await
            .map_err(|e| ServerError::Backend(format!("redis at {}: {e}", redact(url))))?;
        tracing::info!(url = %redact(url), prefix = %config.redis_prefix, "redis connected");
        Ok(Stores {
            history,
            cache: Arc::new(redis.clone()),
            inbox: Some(Arc::new(redis.clone())),
            presence: Arc::new(redis),
        })
    }
}

/// A URL without its password, for logs and errors.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let active = Arc::new(AtomicUsize::new(0));
    let max = shared.config.transport.max_connections;
    while let Some(incoming) = endpoint.accept().await {
        if active.load(Ordering::Relaxed) >= max {
            tracing::warn!(max, "connection limit reached; refusing");
            incoming.refuse();
            continue;
        }
        active.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let active = active.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => session::run(shared, conn).await,
                Err(e) => tracing::debug!(error = %e, "handshake failed"),
            }
            active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn quic_config(
    config: &Config,
    identity: ServerIdentity,
) -> Result<quinn::ServerConfig, ServerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![chat_protocol::ALPN.to_vec()];
    // 0-RTT stays off: replayable early data would need per-frame
    // idempotency rules.
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let t = &config.transport;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            IdleTimeout::try_from(t.idle_timeout)
                .map_err(|e| ServerError::Tls(format!("idle-timeout: {e}")))?,
        ))
        .keep_alive_interval((!t.keep_alive_interval.is_zero()).then_some(t.keep_alive_interval))
        .max_concurrent_bidi_streams(VarInt::from_u32(t.max_concurrent_bidi_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(t.stream_receive_window))
        .receive_window(VarInt::from_u32(t.receive_window))
        .send_window(t.send_window);
    server.transport_config(Arc::new(transport));
    Ok(server)
}
