//! `--push`: every virtual user registers a push token, and the server's
//! notifications come here, to a stand-in for the push gateway that
//! counts them (the platforms' part, APNs and FCM, is not ours to
//! measure). It answers as a gateway that takes every notification.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The app id the virtual users register under.
pub const APP_ID: &str = "chat-loadgen";

/// The push token of the virtual user named `username`: a user name is
/// the server's, so processes of one run (`--shard`) never register the
/// same token (a token moves to the session that registered it last).
pub fn token(username: &str) -> String {
    format!("loadgen-{username}")
}

/// Largest request body read.
const MAX_BODY: usize = 1024 * 1024;

/// What the sink counted.
#[derive(Debug, Default)]
pub struct Counts {
    /// Notification requests.
    pub notifications: AtomicU64,
    /// Devices they named.
    pub devices: AtomicU64,
    /// Requests that were not a notification (not JSON of that shape).
    pub malformed: AtomicU64,
}

/// The running sink; stops when dropped.
pub struct Sink {
    /// Where it listens (the server's `push-gateway-url` host and port).
    pub addr: SocketAddr,
    /// Its counters.
    pub counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl Sink {
    /// Listens on `addr` (port 0: any free one).
    pub async fn start(addr: SocketAddr) -> anyhow::Result<Sink> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind the push gateway sink on {addr}"))?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
        let shared = counts.clone();
        let task = tokio::spawn(async move {
            loop {
                // Out of descriptors, say: the server's client tries again,
                // and so does this.
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let counts = shared.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |request| answer(request, counts.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Sink { addr, counts, task })
    }

    /// The URL to give the server as `push-gateway-url`.
    pub fn url(&self) -> String {
        format!("http://{}/_matrix/push/v1/notify", self.addr)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    counts: Arc<Counts>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let body = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let devices = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["notification"]["devices"].as_array().map(Vec::len));
    let status = match devices {
        Some(n) => {
            counts.notifications.fetch_add(1, Ordering::Relaxed);
            counts.devices.fetch_add(n as u64, Ordering::Relaxed);
            StatusCode::OK
        }
        None => {
            counts.malformed.fetch_add(1, Ordering::Relaxed);
            StatusCode::BAD_REQUEST
        }
    };
    Ok(Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(br#"{"rejected":[]}"#)))
        .expect("a valid response"))
}
