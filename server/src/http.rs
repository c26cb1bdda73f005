//! The operations port (HTTP/1.1): Prometheus `/metrics`, `/healthz`
//! (the process answers) and `/readyz` (the stores answer and the QUIC
//! endpoint accepts connections).
//!
//! It shares nothing with the chat sessions but the metrics and the store
//! handles, so it keeps answering while the server drains at shutdown
//! (then `/readyz` says so).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::metrics::Metrics;
use crate::store::HistoryStore;
use crate::store::presence::PresenceStore;

/// How long `/readyz` waits for each store before calling it unreachable.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Operations clients (scrapers, probes) served at once; more are closed
/// on accept.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// No operations connection lives longer; at this age it finishes the
/// response in progress (up to `GRACE`) and closes.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// How long a connection past its lifetime may take to finish a response.
const GRACE: Duration = Duration::from_secs(10);

/// What the endpoints look at.
pub struct OpsState {
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// History, pinged by `/readyz`.
    pub history: Arc<dyn HistoryStore>,
    /// Presence (Redis when configured), pinged by `/readyz`.
    pub presence: Arc<dyn PresenceStore>,
    /// False once shutdown began.
    pub accepting: AtomicBool,
}

impl OpsState {
    /// Why the node is not ready, if it is not.
    pub async fn not_ready(&self) -> Option<String> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Some("not accepting connections (shutting down)".into());
        }
        let history = self.history.backend();
        match tokio::time::timeout(PING_TIMEOUT, self.history.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Some(format!("history store ({history}): {e}")),
            Err(_) => {
                return Some(format!(
                    "history store ({history}): no answer in {PING_TIMEOUT:?}"
                ));
            }
        }
        let presence = self.presence.backend();
        match tokio::time::timeout(PING_TIMEOUT, self.presence.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("presence store ({presence}): {e}")),
            Err(_) => Some(format!(
                "presence store ({presence}): no answer in {PING_TIMEOUT:?}"
            )),
        }
    }
}

/// Binds `addr` and serves the operations endpoints until the task is
/// aborted (which ends its connections too). Returns the bound address
/// (useful with port 0) and the task.
pub async fn start(
    addr: SocketAddr,
    state: Arc<OpsState>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        // Connections live in this set, so aborting the task ends them.
        let mut connections = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                Some(_) = connections.join_next() => continue,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: try again soon.
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Connections that ended but were not reaped yet hold no place.
            while connections.try_join_next().is_some() {}
            if connections.len() >= MAX_CONNECTIONS {
                tracing::debug!("too many operations connections; closing a new one");
                continue;
            }
            let state = state.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(respond(&state, &req).await) }
                });
                // One request per connection: probes and scrapes are a
                // request every few seconds, and a connection kept alive
                // between them held one of the MAX_CONNECTIONS places (a
                // client repeating a cheap request could keep it for the
                // whole lifetime, and 64 of them locked out the probes).
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                let mut served = std::pin::pin!(served);
                let ended = match tokio::time::timeout(CONNECTION_LIFETIME, served.as_mut()).await {
                    Ok(ended) => ended,
                    Err(_) => {
                        // Finish the response in progress, then close
                        // (dropping it would cut the response off).
                        served.as_mut().graceful_shutdown();
                        match tokio::time::timeout(GRACE, served).await {
                            Ok(ended) => ended,
                            Err(_) => Ok(()),
                        }
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
            });
        }
    });
    Ok((local, task))
}

async fn respond(state: &OpsState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    route(state, req.uri().path()).await
}

/// The answer to a GET of `path`.
async fn route(state: &OpsState, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => {
            let mut response = text(StatusCode::OK, state.metrics.render());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => match state.history.broken() {
            None => text(StatusCode::OK, "ok\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not live: {why}\n"),
            ),
        },
        "/readyz" => match state.not_ready().await {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::presence::MemoryPresenceStore;
    use crate::store::sqlite::SqliteStore;

    #[tokio::test]
    async fn not_ready_once_shutdown_begins() {
        let dir = tempfile::tempdir().unwrap();
        let state = OpsState {
            metrics: Arc::new(Metrics::new()),
            history: Arc::new(SqliteStore::open(dir.path()).unwrap()),
            presence: Arc::new(MemoryPresenceStore::default()),
            accepting: AtomicBool::new(true),
        };
        assert_eq!(state.not_ready().await, None);
        state.accepting.store(false, Ordering::SeqCst);
        assert_eq!(
            state.not_ready().await.as_deref(),
            Some("not accepting connections (shutting down)")
        );
    }

    #[tokio::test]
    async fn not_live_once_the_store_thread_died() {
        // A panic in a job ends the embedded store's writer thread, and
        // every request fails from then on. /readyz said so, but /healthz
        // stayed "ok", so an orchestrator never restarted the node.
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let state = OpsState {
            metrics: Arc::new(Metrics::new()),
            history: store.clone(),
            presence: Arc::new(MemoryPresenceStore::default()),
            accepting: AtomicBool::new(true),
        };
        assert_eq!(route(&state, "/healthz").await.status(), StatusCode::OK);
        store.crash_thread().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while route(&state, "/healthz").await.status() == StatusCode::OK {
            assert!(std::time::Instant::now() < deadline, "still live");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            route(&state, "/healthz").await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
