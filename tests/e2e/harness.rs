//! Test servers, clients and waiting helpers.
//!
//! Every server gets its own temporary data directory and an ephemeral
//! port. Every wait has a generous deadline and says what it waited for.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chat_client::{Client, ClientConfig, ClientError, Event, Events, proto};
use chat_server::{Config, Server};
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long any single expectation may take on a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(30);

/// A password that satisfies the rules.
pub const PASSWORD: &str = "correct horse battery";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The longest a test may keep a server up. The slowest test takes about
/// a minute on a loaded machine; a test stuck past this (a deadlock that
/// no `WAIT` can end, since it holds its thread) would otherwise keep the
/// whole run going until CI's own limit, naming nothing.
const TEST_LIMIT: Duration = Duration::from_secs(600);

/// The longest the whole run may take, from its first server: it takes 5
/// minutes on this machine, alone.
const RUN_LIMIT: Duration = Duration::from_secs(1800);

/// A test with a server up, for the watchdog: registered by each server
/// (in process or a child process) it starts, gone with the last of them.
pub struct Watched {
    test: String,
    child: Option<u32>,
}

/// What the watchdog watches: tests (by thread name, which libtest sets to
/// the test's) with servers up, how many and since when; and the child
/// processes to end with the run.
struct Watch {
    tests: BTreeMap<String, (usize, Instant)>,
    children: BTreeSet<u32>,
}

static WATCH: std::sync::Mutex<Watch> = std::sync::Mutex::new(Watch {
    tests: BTreeMap::new(),
    children: BTreeSet::new(),
});

fn watch() -> std::sync::MutexGuard<'static, Watch> {
    WATCH.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watched {
    /// A server in this process, filed under the current thread's name:
    /// start servers on the test's own thread (a tokio worker's or an
    /// unnamed thread's name would file several tests under one entry).
    pub fn start() -> Watched {
        static WATCHDOG: std::sync::Once = std::sync::Once::new();
        WATCHDOG.call_once(|| {
            std::thread::Builder::new()
                .name("e2e-watchdog".into())
                .spawn(watchdog)
                .expect("spawn the watchdog");
        });
        let test = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        watch()
            .tests
            .entry(test.clone())
            .or_insert((0, Instant::now()))
            .0 += 1;
        Watched { test, child: None }
    }

    /// A server in a child process, killed if the watchdog ends the run
    /// (exiting runs no destructor, so `kill_on_drop` would not).
    pub fn child(pid: Option<u32>) -> Watched {
        let mut watched = Watched::start();
        if let Some(pid) = pid {
            watch().children.insert(pid);
            watched.child = Some(pid);
        }
        watched
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let mut watch = watch();
        if let Some(pid) = self.child {
            watch.children.remove(&pid);
        }
        if let Some((servers, _)) = watch.tests.get_mut(&self.test) {
            *servers -= 1;
            if *servers == 0 {
                watch.tests.remove(&self.test);
            }
        }
    }
}

/// Ends the run when a test has had a server up for [`TEST_LIMIT`], or
/// the run has gone on for [`RUN_LIMIT`] since its first server (a test
/// stuck with no server of ours up, against a fake server say, registers
/// nothing; its frames in the stacks name it): prints every thread's stack
/// (if gdb can attach), then what is stuck, last, where a truncated log
/// keeps it; kills the child processes. Exiting runs no destructor: the
/// running tests' temp dirs, Redis keys and Postgres schemas stay. Written
/// to the process's stderr itself: libtest captures `eprintln!` of threads
/// spawned by a test, as this one is.
fn watchdog() {
    use std::io::Write;
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(5));
        let stuck: Vec<(String, Duration)> = watch()
            .tests
            .iter()
            .map(|(test, (_, since))| (test.clone(), since.elapsed()))
            .filter(|(_, up)| *up >= TEST_LIMIT)
            .collect();
        let run = started.elapsed();
        if stuck.is_empty() && run < RUN_LIMIT {
            continue;
        }
        // Bounded: gdb itself must not become the hang.
        let stacks = std::process::Command::new("timeout")
            .args(["120", "gdb", "-p", &std::process::id().to_string()])
            .args(["-batch", "-nx", "-ex", "set debuginfod enabled off"])
            .args(["-ex", "thread apply all bt"])
            .stdin(Stdio::null())
            .output();
        let children = std::mem::take(&mut watch().children);
        for pid in children {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let mut stderr = std::io::stderr().lock();
        match stacks {
            Ok(out) if out.stdout.windows(6).any(|w| w == b"Thread") => {
                let _ = stderr.write_all(&out.stdout);
            }
            Ok(out) => {
                let _ = writeln!(stderr, "e2e watchdog: gdb gave no stacks:");
                let _ = stderr.write_all(&out.stderr);
            }
            Err(e) => {
                let _ = writeln!(stderr, "e2e watchdog: no stacks, gdb did not run: {e}");
            }
        }
        for (test, up) in stuck {
            let _ = writeln!(
                stderr,
                "e2e watchdog: {test} has had a server up for {up:?}, past {TEST_LIMIT:?}"
            );
        }
        if run >= RUN_LIMIT {
            let up: Vec<String> = watch().tests.keys().cloned().collect();
            let _ = writeln!(
                stderr,
                "e2e watchdog: the run has gone on for {run:?} since its first server, past \
                 the whole-run limit of {RUN_LIMIT:?}; tests with a server up: {up:?}"
            );
        }
        let _ = writeln!(stderr, "e2e watchdog: ending the run rather than hanging");
        #[expect(
            clippy::disallowed_methods,
            reason = "the stuck test holds its thread: nothing can return from it"
        )]
        std::process::exit(101);
    }
}

/// Which stores a test server runs on.
#[derive(Debug, Clone)]
pub enum Backend {
    /// SQLite file and in-process presence / cache: the quick-start default.
    Embedded,
    /// Redis and (usually) Postgres, each test in its own key prefix and
    /// schema.
    Production(Production),
}

/// Where a production-backend test server keeps its data.
#[derive(Debug, Clone)]
pub struct Production {
    pub redis_url: String,
    pub redis_prefix: String,
    /// `None`: history stays in SQLite (used by tests that run their own
    /// Redis).
    pub postgres: Option<(String, String)>,
}

impl Backend {
    /// Redis + Postgres, if reachable. Prints a SKIPPED line and returns
    /// `None` when they are not, unless `CHAT_REQUIRE_BACKENDS=1` (CI), in
    /// which case it panics.
    pub async fn production() -> Option<Backend> {
        use chat_server::store::{postgres, redis};
        let store = redis::testing::connect("e2e").await?;
        let url = postgres::testing::url();
        if let Err(e) = postgres::testing::admin().await {
            assert!(
                !redis::testing::required(),
                "postgres required (CHAT_REQUIRE_BACKENDS=1) but {e}"
            );
            println!("SKIPPED: {e} at {url} (set CHAT_TEST_POSTGRES_URL)");
            return None;
        }
        Some(Backend::Production(Production {
            redis_url: redis::testing::url(),
            redis_prefix: store.prefix().to_string(),
            postgres: Some((url, postgres::testing::fresh_schema())),
        }))
    }

    fn apply(&self, config: &mut Config) {
        if let Backend::Production(p) = self {
            config.redis_url = Some(p.redis_url.clone());
            config.redis_prefix = p.redis_prefix.clone();
            if let Some((url, schema)) = &p.postgres {
                config.postgres_url = Some(url.clone());
                config.postgres_schema = Some(schema.clone());
                config.postgres_pool_size = 4;
            }
        }
    }

    fn args(&self) -> Vec<String> {
        let Backend::Production(p) = self else {
            return Vec::new();
        };
        let mut args = vec![
            "--redis-url".to_string(),
            p.redis_url.clone(),
            "--redis-prefix".into(),
            p.redis_prefix.clone(),
        ];
        if let Some((url, schema)) = &p.postgres {
            args.extend([
                "--postgres-url".into(),
                url.clone(),
                "--postgres-schema".into(),
                schema.clone(),
            ]);
            args.extend(["--postgres-pool-size".into(), "4".into()]);
        }
        args
    }

    /// The Postgres schema, if this backend has one.
    pub fn postgres_schema(&self) -> Option<&str> {
        match self {
            Backend::Production(Production {
                postgres: Some((_, schema)),
                ..
            }) => Some(schema),
            _ => None,
        }
    }

    /// Deletes what this backend stored outside the process (Redis keys,
    /// the Postgres schema). Blocking, so it can run from `Drop`.
    pub fn clean_up(&self) {
        let Backend::Production(p) = self else { return };
        let p = p.clone();
        let cleaner = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                use chat_server::store::{postgres, redis};
                if let Ok(store) = redis::RedisStore::connect(&p.redis_url, &p.redis_prefix).await {
                    redis::testing::delete_prefix(&store, &p.redis_prefix).await;
                }
                if let Some((_, schema)) = &p.postgres {
                    let _ = postgres::testing::drop_schema(schema).await;
                }
            });
        });
        let _ = cleaner.join();
    }

    /// A guard that calls [`clean_up`](Self::clean_up) when dropped, for
    /// tests that run servers of their own on this backend: it runs even
    /// when the test fails.
    pub fn cleaned_up_on_drop(&self) -> impl Drop + '_ {
        struct Guard<'a>(&'a Backend);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                self.0.clean_up();
            }
        }
        Guard(self)
    }

    /// Waits until `user`'s Redis unread queue holds `n` messages (the
    /// committer's cache updater pushes them a moment after the ack).
    pub async fn wait_queued(&self, user: u64, n: usize) {
        self.wait_queue(user, &format!("{n} messages"), |queued| {
            queued.is_some_and(|q| q.len() == n)
        })
        .await;
    }

    /// Waits until `user`'s unread queue of `conversation` holds its
    /// message `seq` (the queue keeps only the newest, so a long backlog
    /// is never all there).
    pub async fn wait_queued_through(&self, user: u64, conversation: u64, seq: u64) {
        self.wait_queue(user, &format!("{conversation}:{seq}"), |queued| {
            queued.is_some_and(|q| {
                q.iter()
                    .any(|m| m.conversation_id == conversation && m.seq == seq)
            })
        })
        .await;
    }

    /// Polls `user`'s unread queues (all of them, `None` if there are
    /// more than the store returns) until `done`; returns at once on the
    /// embedded store, which has none.
    async fn wait_queue(
        &self,
        user: u64,
        what: &str,
        done: impl Fn(Option<&[std::sync::Arc<proto::Message>]>) -> bool,
    ) {
        let Backend::Production(p) = self else { return };
        use chat_server::store::InboxStore;
        use chat_server::store::redis::RedisStore;
        let store = RedisStore::connect(&p.redis_url, &p.redis_prefix)
            .await
            .expect("redis");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let queued = store.pending(user, 100_000).await.expect("read the queue");
            if done(queued.as_deref()) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "user {user}'s queue never held {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Empties this backend's Redis keys, as a Redis restart (it keeps
    /// nothing on disk) or FLUSHALL would, without touching other tests.
    pub async fn flush_redis(&self) {
        let Backend::Production(p) = self else { return };
        use chat_server::store::redis::{RedisStore, testing};
        let store = RedisStore::connect(&p.redis_url, &p.redis_prefix)
            .await
            .expect("redis");
        testing::delete_prefix(&store, &p.redis_prefix).await;
    }
}

/// Defines each test once and runs it on every backend: `embedded::NAME`
/// always, `production::NAME` when Redis answers (or always, failing if it
/// does not, under `CHAT_REQUIRE_BACKENDS=1`).
macro_rules! each_backend {
    ($(async fn $name:ident($backend:ident: Backend) $body:block)*) => {
        $(
            async fn $name($backend: $crate::harness::Backend) $body
        )*
        mod embedded {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::harness::Backend::Embedded).await
                }
            )*
        }
        mod production {
            $(
                #[tokio::test]
                async fn $name() {
                    if let Some(backend) = $crate::harness::Backend::production().await {
                        super::$name(backend).await
                    }
                }
            )*
        }
    };
}

/// An in-process server on its own data directory.
pub struct TestServer {
    pub server: Option<Server>,
    pub addr: SocketAddr,
    pub ca: PathBuf,
    pub config: Config,
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
    _watched: Watched,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_on_with(Backend::Embedded, |_| {}).await
    }

    /// Starts a server after `tweak` adjusted the test configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_on_with(Backend::Embedded, tweak).await
    }

    pub async fn start_on(backend: Backend) -> TestServer {
        Self::start_on_with(backend, |_| {}).await
    }

    /// Starts a server on `backend` after `tweak` adjusted the configuration.
    pub async fn start_on_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestServer {
        init_tracing();
        let watched = Watched::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        // Every test registers its users from this one address.
        config.limits.registrations_per_address = 0;
        backend.apply(&mut config);
        tweak(&mut config);
        let server = Server::start(config.clone()).await.expect("server starts");
        TestServer {
            addr: server.local_addr(),
            ca: server.dev_ca().expect("dev CA").to_path_buf(),
            server: Some(server),
            config,
            backend,
            _dir: Some(dir),
            _watched: watched,
        }
    }

    /// Stops the server gracefully and starts it again on the same data
    /// directory and port.
    pub async fn restart(&mut self) {
        let drained = self.server.take().expect("running").shutdown().await;
        assert!(drained, "the node drained within its shutdown timeout");
        let mut config = self.config.clone();
        config.listen = self.addr;
        // quinn releases the UDP socket when its endpoint driver task next
        // runs; retry the bind until then (a start that fails at the bind
        // has not opened the store).
        let deadline = tokio::time::Instant::now() + WAIT;
        let server = loop {
            match Server::start(config.clone()).await {
                Ok(server) => break server,
                Err(chat_server::ServerError::Bind { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("server restarts: {e}"),
            }
        };
        self.addr = server.local_addr();
        self.server = Some(server);
    }

    pub fn client_config(&self) -> ClientConfig {
        client_config(self.addr, &self.ca)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Leaving the runtime tears the server down; make sure the endpoint
        // stops accepting right away.
        if let Some(server) = self.server.take() {
            drop(server);
        }
        self.backend.clean_up();
    }
}

pub fn client_config(addr: SocketAddr, ca: &Path) -> ClientConfig {
    let mut config = ClientConfig::new(addr, "localhost")
        .with_ca_file(ca)
        .expect("read CA");
    config.reconnect_min = Duration::from_millis(50);
    config.reconnect_max = Duration::from_millis(500);
    config.request_timeout = WAIT;
    config
}

/// The `chat-server` binary as a command, without the developer's `CHAT_`
/// settings (the server reads its flags from them too, so a shell that
/// set, say, `CHAT_REDIS_PREFIX` would make child servers share keys).
/// The test settings `CHAT_TEST_*` and `CHAT_REQUIRE_BACKENDS` are not the
/// server's and stay.
pub fn server_command() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-e2e-server"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CHAT_")
            && !key.starts_with("CHAT_TEST_")
            && key != "CHAT_REQUIRE_BACKENDS"
        {
            command.env_remove(&*key);
        }
    }
    command
}

/// A `chat-server` child process (the real binary), for tests that kill it.
pub struct ChildServer {
    child: tokio::process::Child,
    pub addr: SocketAddr,
    pub ca: PathBuf,
    /// The metrics / health port.
    pub metrics: SocketAddr,
    _watched: Watched,
}

impl ChildServer {
    /// Starts the binary on `backend`, `data_dir` and `port` (0: any).
    pub async fn start_on(backend: &Backend, data_dir: &Path, port: u16) -> ChildServer {
        let mut child = server_command()
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .args(["--registrations-per-address", "0"])
            .args(backend.args())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn chat-server");
        let watched = Watched::child(child.id());
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("server prints its address in time")
            .expect("read stdout")
            .expect("a line");
        // "chat-server listening on ADDR (dev CA: PATH)"
        let rest = line
            .strip_prefix("chat-server listening on ")
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        let (addr, ca) = rest.split_once(" (dev CA: ").expect("dev CA in the line");
        // "chat-server metrics on http://ADDR/metrics (also ...)"
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("server prints its metrics address in time")
            .expect("read stdout")
            .expect("a second line");
        let metrics = line
            .strip_prefix("chat-server metrics on http://")
            .and_then(|rest| rest.split_once('/'))
            .unwrap_or_else(|| panic!("unexpected line {line:?}"))
            .0;
        ChildServer {
            child,
            addr: addr.parse().expect("address"),
            ca: PathBuf::from(ca.trim_end_matches(')')),
            metrics: metrics.parse().expect("metrics address"),
            _watched: watched,
        }
    }

    /// The process id (for signals such as SIGSTOP).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("a running child has a pid")
    }

    /// SIGTERM, then waits for the process to exit; returns whether it
    /// exited successfully.
    pub async fn terminate(mut self) -> bool {
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM");
        let exited = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the server exits after SIGTERM in time")
            .expect("wait for the server");
        exited.success()
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill server");
    }

    pub fn client_config(&self) -> ClientConfig {
        client_config(self.addr, &self.ca)
    }
}

/// No per-user send rate: for tests that send (or change groups) in bulk.
pub fn unlimited_sends(c: &mut Config) {
    c.limits.send_rate = 0;
    c.limits.send_burst = 0;
}

/// No per-user send or control-request rate: for tests that also make
/// requests in bulk.
pub fn unlimited_sends_and_requests(c: &mut Config) {
    unlimited_sends(c);
    c.limits.control_rate = 0;
    c.limits.control_burst = 0;
    unlimited_marks(c);
}

/// No per-user MarkSeen rate: for tests that mark in bulk.
pub fn unlimited_marks(c: &mut Config) {
    c.limits.mark_rate = 0;
    c.limits.mark_burst = 0;
}

/// Alice and Bob are friends; Bob's client is gone (his session stays,
/// as `token`), and Alice has sent him "hello" (`ack`): the start of the
/// tests that play Bob's device on the wire.
pub struct OfflineBob {
    pub alice: Client,
    pub alice_events: Events,
    pub conversation: u64,
    pub bob_id: u64,
    pub token: String,
    pub ack: proto::SendAck,
}

pub async fn hello_for_offline_bob(server: &TestServer) -> OfflineBob {
    let (alice, alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, bob_events) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let bob_id = bob.identity().user_id;
    let token = bob.identity().token;
    drop((bob, bob_events));
    let ack = alice.send_text(conversation, "hello").await.unwrap();
    OfflineBob {
        alice,
        alice_events,
        conversation,
        bob_id,
        token,
        ack,
    }
}

/// Sends `n` texts ("0", "1", ...) to `conversation` at once, in rounds
/// below client-lib's outbox limit; their seqs, ascending.
pub async fn send_texts(client: &Client, conversation: u64, n: usize) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(n);
    for round in (0..n).collect::<Vec<_>>().chunks(500) {
        let sends: Vec<_> = round
            .iter()
            .map(|&i| {
                let client = client.clone();
                tokio::spawn(async move { client.send_text(conversation, &i.to_string()).await })
            })
            .collect();
        for send in sends {
            seqs.push(send.await.unwrap().expect("send").seq);
        }
    }
    seqs.sort_unstable();
    seqs
}

pub async fn register(config: ClientConfig, name: &str) -> (Client, Events) {
    let (client, events) = Client::register(config, name, PASSWORD)
        .await
        .expect("register");
    (client, events)
}

/// A user and their event stream.
pub type Member = (Client, Events);

/// `n` registered users; the first is friends with all the others.
pub async fn circle(server: &TestServer, n: usize) -> Vec<Member> {
    let mut members = Vec::with_capacity(n);
    for i in 0..n {
        members.push(register(server.client_config(), &name(&format!("g{i}u"))).await);
    }
    for other in &members[1..] {
        befriend(&members[0].0, &other.0).await;
    }
    members
}

/// Makes `a` and `b` friends through the protocol and returns their 1-1
/// conversation id.
pub async fn befriend(a: &Client, b: &Client) -> u64 {
    let b_name = b.identity().username;
    a.send_friend_request(&b_name)
        .await
        .expect("friend request");
    b.accept_friend(a.identity().user_id).await.expect("accept");
    a.open_direct(b.identity().user_id)
        .await
        .expect("open direct")
        .conversation_id
}

/// Waits for the first event `f` maps to `Some`, skipping others.
pub async fn wait_for<T>(
    events: &mut Events,
    what: &str,
    mut f: impl FnMut(Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(event)) => {
                if let Some(found) = f(event) {
                    return found;
                }
            }
            Ok(None) => panic!("event stream ended while waiting for {what}"),
            Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
        }
    }
}

/// Asks `check` until it says true, failing after [`WAIT`].
pub async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reconnects `client` (`reconnect_now`) and waits until the new
/// connection is up.
pub async fn reconnected(client: &Client) {
    client.reconnect_now();
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.is_connected() {
        assert!(tokio::time::Instant::now() < deadline, "never disconnected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(client.wait_connected(WAIT).await, "never reconnected");
}

/// Waits until `observer`'s view of `conversation` has `member`'s
/// delivered watermark at `seq` or beyond.
pub async fn wait_delivered(observer: &Client, conversation: u64, member: u64, seq: u64) {
    let what = format!("member {member}'s delivered watermark at {seq} in {conversation}");
    wait_until(&what, || async {
        observer
            .conversation(conversation)
            .await
            .unwrap()
            .members
            .iter()
            .any(|m| m.user_id == member && m.delivered_seq >= seq)
    })
    .await;
}

/// Collects `n` messages (ignoring other events).
pub async fn messages(events: &mut Events, n: usize) -> Vec<proto::Message> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let m = wait_for(
            events,
            &format!("message {} of {n}", out.len() + 1),
            |e| match e {
                Event::Message(m) => Some(m),
                _ => None,
            },
        )
        .await;
        out.push(m);
    }
    out
}

/// Asserts that no message arrives within `quiet`.
pub async fn assert_no_message(events: &mut Events, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.next()).await {
        if let Event::Message(m) = event {
            panic!("unexpected message {m:?}");
        }
    }
}

/// The server's code in an error.
pub fn code(result: Result<impl std::fmt::Debug, ClientError>) -> chat_client::ErrorCode {
    match result {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("expected a server code, got {e:?}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

/// A unique user name per call, so tests never collide.
pub fn name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}{}", N.fetch_add(1, Ordering::Relaxed))
}

/// GET `path` on the metrics port: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to metrics port");
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("read response");
        response
    };
    let response = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("metrics port answers in time");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A bare QUIC connection to the server, trusting its CA; the endpoint must
/// outlive the connection.
/// The code the server closed `conn` with, waiting up to [`WAIT`].
pub async fn close_code_of(conn: &quinn::Connection) -> chat_client::ErrorCode {
    match tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("server closes the connection")
    {
        quinn::ConnectionError::ApplicationClosed(close) => {
            chat_client::ErrorCode::from_wire(close.error_code.into_inner() as i32)
        }
        other => panic!("expected an application close, got {other:?}"),
    }
}

pub async fn quic_connect(
    server: &TestServer,
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let config = server.client_config().quinn_client_config().unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(config, server.addr, "localhost")
        .unwrap()
        .await?;
    Ok((endpoint, conn))
}

/// Another device of a user that writes control requests by hand: for
/// requests client-lib would not send as they are (a repeat with the same
/// key, say).
pub struct RawControl {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: bytes::BytesMut,
    next_request_id: u64,
}

impl RawControl {
    /// Connects and resumes the session of `token` on a control stream.
    pub async fn resume(server: &TestServer, token: &str) -> RawControl {
        match Self::try_resume(server, token).await {
            Ok(raw) => raw,
            Err(reply) => panic!("AuthOk, got {reply:?}"),
        }
    }

    /// [`resume`](Self::resume), returning the server's answer if it is
    /// not AuthOk.
    pub async fn try_resume(
        server: &TestServer,
        token: &str,
    ) -> Result<RawControl, chat_protocol::Body> {
        let (endpoint, conn) = quic_connect(server).await.expect("handshake");
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let mut open = bytes::BytesMut::new();
        chat_protocol::encode(
            &chat_protocol::Frame::open_stream(chat_protocol::StreamKind::Control),
            &mut open,
        );
        send.write_all(&open).await.unwrap();
        let mut raw = RawControl {
            _endpoint: endpoint,
            conn,
            send,
            recv,
            buf: bytes::BytesMut::new(),
            next_request_id: 1,
        };
        let reply = raw
            .request(chat_protocol::Body::Authenticate(proto::Authenticate {
                token: token.into(),
                background: false,
            }))
            .await;
        match reply {
            chat_protocol::Body::AuthOk(_) => Ok(raw),
            other => Err(other),
        }
    }

    /// The connection this device authenticated.
    pub fn conn(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Opens this device's messages stream (asking for `AcksStored` when
    /// it leaves if `confirm_leave`).
    pub async fn open_messages(
        &self,
        confirm_leave: bool,
    ) -> (quinn::SendStream, quinn::RecvStream) {
        let (mut send, recv) = self.conn.open_bi().await.unwrap();
        let mut open = bytes::BytesMut::new();
        chat_protocol::encode(
            &chat_protocol::Frame::open_messages(confirm_leave),
            &mut open,
        );
        send.write_all(&open).await.unwrap();
        (send, recv)
    }

    /// Asserts that the connection is still up and answers a request.
    pub async fn assert_served(&mut self) {
        let reply = self
            .request(chat_protocol::Body::ListFriends(proto::ListFriends {}))
            .await;
        assert!(
            matches!(reply, chat_protocol::Body::FriendList(_)),
            "{reply:?}"
        );
        assert!(
            self.conn.close_reason().is_none(),
            "{:?}",
            self.conn.close_reason()
        );
    }

    /// Writes frames that have no answer (heartbeats) at once.
    pub async fn write_unanswered(&mut self, bodies: Vec<chat_protocol::Body>) {
        let mut out = bytes::BytesMut::new();
        for body in bodies {
            chat_protocol::encode(&chat_protocol::Frame::new(0, body), &mut out);
        }
        self.send.write_all(&out).await.unwrap();
    }

    /// Writes every request at once, then returns their answers in the
    /// same order (pushes are skipped).
    pub async fn pipeline(&mut self, bodies: Vec<chat_protocol::Body>) -> Vec<chat_protocol::Body> {
        let first = self.next_request_id;
        let mut out = bytes::BytesMut::new();
        for body in bodies {
            chat_protocol::encode(
                &chat_protocol::Frame::new(self.next_request_id, body),
                &mut out,
            );
            self.next_request_id += 1;
        }
        self.send.write_all(&out).await.unwrap();
        let mut answers = BTreeMap::new();
        while answers.len() < (self.next_request_id - first) as usize {
            let frame = next_frame(&mut self.recv, &mut self.buf).await;
            if (first..self.next_request_id).contains(&frame.request_id) {
                answers.insert(frame.request_id, frame.body.expect("an answer with a body"));
            }
        }
        answers.into_values().collect()
    }

    /// Sends a request and returns its answer (pushes in between are
    /// skipped).
    pub async fn request(&mut self, body: chat_protocol::Body) -> chat_protocol::Body {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let mut out = bytes::BytesMut::new();
        chat_protocol::encode(&chat_protocol::Frame::new(request_id, body), &mut out);
        self.send.write_all(&out).await.unwrap();
        loop {
            let frame = next_frame(&mut self.recv, &mut self.buf).await;
            if frame.request_id == request_id {
                return frame.body.expect("an answer with a body");
            }
        }
    }
}

/// `list` encoded back to back, as a raw client writes frames.
pub fn frames(list: &[chat_protocol::Frame]) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    for frame in list {
        chat_protocol::encode(frame, &mut buf);
    }
    buf.to_vec()
}

/// Reads the next frame from a raw QUIC stream; `buf` keeps what arrived
/// beyond it for the next call.
pub async fn next_frame(
    recv: &mut quinn::RecvStream,
    buf: &mut bytes::BytesMut,
) -> chat_protocol::Frame {
    loop {
        if let Some(frame) = chat_protocol::Codec::default().decode(buf).unwrap() {
            return frame;
        }
        let chunk = tokio::time::timeout(WAIT, recv.read_chunk(65_536, true))
            .await
            .expect("a frame in time")
            .unwrap()
            .expect("stream open");
        buf.extend_from_slice(&chunk.bytes);
    }
}

/// Scrapes until `done` holds (the counters move on server tasks, a little
/// after the client sees the effect).
pub async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    done: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let samples = scrape(addr).await;
        if done(&samples) {
            return samples;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The samples of a Prometheus text page: `name{labels}` to value.
pub async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

pub fn value(samples: &HashMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("{key} missing from /metrics"))
}

/// Wall-clock Unix milliseconds, as the server stamps presence.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The next presence change of `user` to `online` (earlier updates, e.g. a
/// coalesced "online" from before the subscription, are skipped).
pub async fn presence_of(
    events: &mut Events,
    user: u64,
    online: bool,
    what: &str,
) -> proto::PresenceState {
    wait_for(events, what, |e| match e {
        Event::Presence(p) if p.user_id == user && p.online == online => Some(p),
        _ => None,
    })
    .await
}
