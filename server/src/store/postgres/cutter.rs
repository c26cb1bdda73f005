//! A TCP proxy in front of the test Postgres that loses a COMMIT or its
//! answer, the way a network failure or a crash would, and can cut every
//! connection for a while (a database failover): the store's tests and
//! the end-to-end tests drive the unknown-outcome paths through it.
//! Test support only (the `test-support` feature); nothing in the server
//! uses it.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;
use tokio_postgres::Config;
use tokio_postgres::config::Host;

/// What [`CommitCutter`] does to the next COMMIT it is armed for.
pub const CUT_NONE: u8 = 0;
/// Closes the connection instead of forwarding the COMMIT: Postgres
/// never sees it and rolls the transaction back.
pub const CUT_BEFORE_COMMIT: u8 = 1;
/// Forwards the COMMIT and closes the connection when its answer comes:
/// the transaction committed, and the store never hears so.
pub const CUT_ANSWER: u8 = 2;

/// A simple-query COMMIT as tokio-postgres sends it: 'Q', the length
/// (itself included), the statement and its NUL.
const COMMIT_QUERY: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";
/// Postgres's answer that it committed: CommandComplete with tag COMMIT.
const COMMIT_DONE: &[u8] = b"C\0\0\0\x0bCOMMIT\0";
/// A simple-query ROLLBACK: the transaction under way ends without one.
const ROLLBACK_QUERY: &[u8] = b"Q\0\0\0\x0dROLLBACK\0";
/// Postgres's answer to a COMMIT of a transaction that had failed: it
/// rolled back, and an armed cut of the answer is not used up.
const ROLLBACK_DONE: &[u8] = b"C\0\0\0\x0dROLLBACK\0";

/// The proxy; see the module docs. Dropping it stops accepting (the
/// connections relayed so far end with their peers).
pub struct CommitCutter {
    port: u16,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

struct Shared {
    /// What the next COMMIT it applies to gets; one lock, so that a COMMIT
    /// passing while it is armed sees all of it or none.
    armed: std::sync::Mutex<Armed>,
    cuts: AtomicU64,
    /// While true, relayed connections are closed and new ones refused.
    blackout: watch::Sender<bool>,
}

/// The armed cut.
#[derive(Default, Clone)]
struct Armed {
    /// `CUT_*`.
    cut: u8,
    /// With a pattern, only a COMMIT on a connection whose bytes since its
    /// previous COMMIT (or ROLLBACK) contained it is cut.
    pattern: Option<Vec<u8>>,
    /// Cut the answer, then black out (see [`CommitCutter::arm_after`]).
    black_out_after: bool,
}

impl CommitCutter {
    /// Listens on an ephemeral port of 127.0.0.1, relaying to the test
    /// Postgres ([`super::testing::url`]).
    pub async fn start() -> Self {
        let config = Config::from_str(&super::testing::url()).expect("test URL");
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let upstream = format!(
            "{host}:{}",
            config.get_ports().first().copied().unwrap_or(5432)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            armed: std::sync::Mutex::new(Armed::default()),
            cuts: AtomicU64::new(0),
            blackout: watch::Sender::new(false),
        });
        let accept = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *shared.blackout.borrow() {
                        continue;
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    tokio::spawn(relay(client, server, shared.clone()));
                }
            })
        };
        CommitCutter {
            port,
            shared,
            accept,
        }
    }

    /// The test URL, pointed at the proxy (a `key=value` string, which
    /// tokio-postgres and the server's `postgres-url` take).
    pub fn url(&self) -> String {
        let config = Config::from_str(&super::testing::url()).expect("test URL");
        let mut url = format!("host=127.0.0.1 port={}", self.port);
        if let Some(user) = config.get_user() {
            url.push_str(&format!(" user='{user}'"));
        }
        if let Some(dbname) = config.get_dbname() {
            url.push_str(&format!(" dbname='{dbname}'"));
        }
        if let Some(password) = config.get_password() {
            url.push_str(&format!(
                " password='{}'",
                String::from_utf8_lossy(password)
            ));
        }
        url
    }

    /// Cuts the next COMMIT that passes, whichever connection carries it.
    pub fn arm(&self, cut: u8) {
        *self.shared.armed.lock().unwrap() = Armed {
            cut,
            ..Armed::default()
        };
    }

    /// Cuts the answer to the next COMMIT of a transaction that sent
    /// `pattern` (a message's text, say), so that other writes of a busy
    /// server pass untouched; then blacks out (closes every connection
    /// and refuses new ones) until [`end_blackout`](Self::end_blackout),
    /// so that nobody can learn how that transaction ended meanwhile.
    pub fn arm_after(&self, pattern: &[u8]) {
        assert!(!pattern.is_empty(), "a pattern to look for");
        *self.shared.armed.lock().unwrap() = Armed {
            cut: CUT_ANSWER,
            pattern: Some(pattern.to_vec()),
            black_out_after: true,
        };
    }

    /// Closes the connection instead of forwarding the next COMMIT of a
    /// transaction that sent `pattern`: Postgres rolls that transaction
    /// back, and the store, asking how it ended, learns that it failed.
    pub fn arm_before(&self, pattern: &[u8]) {
        assert!(!pattern.is_empty(), "a pattern to look for");
        *self.shared.armed.lock().unwrap() = Armed {
            cut: CUT_BEFORE_COMMIT,
            pattern: Some(pattern.to_vec()),
            black_out_after: false,
        };
    }

    /// Relays connections again.
    pub fn end_blackout(&self) {
        self.shared.blackout.send_replace(false);
    }

    /// Whether a query through the proxy is answered (after a blackout,
    /// once it relays again).
    pub async fn relays(&self) -> bool {
        let url = self.url();
        let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
        match tokio::time::timeout(super::CONNECT_TIMEOUT, connect).await {
            Ok(Ok((client, connection))) => {
                tokio::spawn(connection);
                client.simple_query("SELECT 1").await.is_ok()
            }
            _ => false,
        }
    }

    /// How many cuts happened so far.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for CommitCutter {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies bytes both ways until either side closes, a cut happens or a
/// blackout starts.
async fn relay(client: tokio::net::TcpStream, server: tokio::net::TcpStream, shared: Arc<Shared>) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    // Set when this connection's COMMIT is cut after its answer: whether
    // to black out then.
    let cut_answer = std::sync::Mutex::new(None::<bool>);
    let mut blackout = shared.blackout.subscribe();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut window = Vec::new();
        let mut rollback_window = Vec::new();
        // Whether the transaction under way sent the armed pattern.
        let mut marked = false;
        let mut pattern_window = Vec::new();
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            // The armed cut this chunk's COMMIT takes, if any (the lock
            // is not held across the writes below).
            let taken = {
                let mut armed = shared.armed.lock().unwrap();
                if let Some(pattern) = &armed.pattern {
                    marked |= seen(&mut pattern_window, chunk, pattern);
                }
                if seen(&mut rollback_window, chunk, ROLLBACK_QUERY) {
                    marked = false;
                    pattern_window.clear();
                }
                let mut taken = None;
                if seen(&mut window, chunk, COMMIT_QUERY) {
                    let ours = armed.pattern.is_none() || marked;
                    marked = false;
                    pattern_window.clear();
                    if ours && armed.cut != CUT_NONE {
                        taken = Some(std::mem::take(&mut *armed));
                    }
                }
                taken
            };
            if let Some(taken) = taken {
                if taken.cut == CUT_BEFORE_COMMIT {
                    shared.cuts.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                // Set before the COMMIT leaves, so that its answer cannot
                // slip through.
                *cut_answer.lock().unwrap() = Some(taken.black_out_after);
            }
            if to_server.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut window = Vec::new();
        let mut rolled_back = Vec::new();
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if seen(&mut rolled_back, &buf[..n], ROLLBACK_DONE) {
                // The COMMIT it was armed for answered ROLLBACK: a later
                // COMMIT of this connection is not the one.
                *cut_answer.lock().unwrap() = None;
            }
            // Other answers may come first (tokio-postgres closes a
            // statement without waiting); only once Postgres says it
            // committed is the transaction durable.
            let cut = *cut_answer.lock().unwrap();
            if seen(&mut window, &buf[..n], COMMIT_DONE)
                && let Some(black_out) = cut
            {
                shared.cuts.fetch_add(1, Ordering::SeqCst);
                if black_out {
                    shared.blackout.send_replace(true);
                }
                return;
            }
            if to_client.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let blacked_out = async {
        let _ = blackout.wait_for(|on| *on).await;
    };
    // Whichever ends first, both connections close with this task.
    tokio::select! {
        () = up => {}
        () = down => {}
        () = blacked_out => {}
    }
}

/// Whether `pattern` ends in `chunk`, given `window`, the end of the
/// bytes before it (kept so that a pattern split across reads is seen).
fn seen(window: &mut Vec<u8>, chunk: &[u8], pattern: &[u8]) -> bool {
    window.extend_from_slice(chunk);
    let found = window.windows(pattern.len()).any(|w| w == pattern);
    let keep_from = window.len().saturating_sub(pattern.len() - 1);
    window.drain(..keep_from);
    found
}
