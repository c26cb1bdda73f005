//! Set-up before the measured run: the UDP sockets clients share, the
//! virtual users (registered, or resumed from a `--reuse` file), their
//! friendships, the 1-1 conversations and the groups messages go to.
//!
//! Set-up is deliberately not measured. Registration is expensive on the
//! server (Argon2id, tens of milliseconds of CPU per user), so it runs with
//! bounded concurrency; `--reuse` skips it on later runs against the same
//! server data.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chat_client::{Client, ClientConfig, ClientError, Events};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::args::Args;
use crate::groups::{GroupSpec, extra_friendships, group_layout};
use crate::plan::{Plan, friend_graph};

/// Every virtual user's password (they are throw-away accounts).
pub(crate) const PASSWORD: &str = "loadgen-password";
/// Attempts for a set-up request refused with a retryable code.
const SETUP_ATTEMPTS: u32 = 10;
/// Version of the `--reuse` file format (2: groups).
const REUSE_VERSION: u32 = 2;
/// Seed of the group layout: fixed, not `--seed`, so one `--reuse` file
/// serves runs with different schedules.
const LAYOUT_SEED: u64 = 0;
/// How long closing waits for the sockets to send their close frames.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The server to drive.
#[derive(Debug, Clone)]
pub struct Target {
    /// UDP address.
    pub addr: SocketAddr,
    /// CA certificate (PEM) to trust.
    pub ca: PathBuf,
    /// Name the server certificate is valid for.
    pub server_name: String,
}

/// Builds client configurations that spread connections over a few shared
/// UDP sockets, as a real load generator must (one socket per connection
/// would hit file-descriptor limits long before the server's limits).
pub struct Connector {
    base: ClientConfig,
    endpoints: Vec<quinn::Endpoint>,
}

impl Connector {
    /// Binds `endpoints` client sockets on 127.0.0.1 (or the unspecified
    /// address for a non-loopback target), each asking the kernel for a
    /// `receive_buffer`-byte receive buffer (0: its default).
    pub fn new(
        target: &Target,
        endpoints: usize,
        receive_buffer: usize,
        outbox: usize,
        delivery_ack_linger: Option<Duration>,
        heartbeat_interval: Option<Duration>,
        log: &impl Fn(&str),
    ) -> anyhow::Result<Connector> {
        let mut base = ClientConfig::new(target.addr, target.server_name.clone())
            .with_ca_file(&target.ca)
            .with_context(|| format!("CA file {}", target.ca.display()))?;
        base.device_name = "chat-loadgen".into();
        base.outbox_limit = outbox;
        if let Some(linger) = delivery_ack_linger {
            base.delivery_ack_linger = linger;
        }
        base.heartbeat_interval = heartbeat_interval;
        // Set-up requests queue behind Argon2 on a busy server.
        base.request_timeout = Duration::from_secs(60);
        let bind: SocketAddr = match (target.addr.ip().is_loopback(), target.addr.is_ipv4()) {
            (true, true) => ([127, 0, 0, 1], 0).into(),
            (true, false) => (std::net::Ipv6Addr::LOCALHOST, 0).into(),
            (false, true) => ([0, 0, 0, 0], 0).into(),
            (false, false) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let runtime = quinn::default_runtime().context("no async runtime for quinn")?;
        let count = endpoints.max(1);
        let mut endpoints = Vec::with_capacity(count);
        for _ in 0..count {
            let (socket, granted) = chat_server::endpoint::bind_udp(bind, receive_buffer, 0)
                .context("bind a client UDP socket")?;
            let granted = granted.receive;
            if endpoints.is_empty() && granted < receive_buffer {
                log(&format!(
                    "warning: the kernel granted {granted} of the {receive_buffer} bytes asked \
                     for as UDP receive buffer; raise net.core.rmem_max or expect drops"
                ));
            }
            let endpoint = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                runtime.clone(),
            )
            .context("start a client endpoint")?;
            endpoints.push(endpoint);
        }
        Ok(Connector { base, endpoints })
    }

    /// [`new`](Self::new) with the run's flags.
    pub fn for_run(target: &Target, args: &Args, log: &impl Fn(&str)) -> anyhow::Result<Connector> {
        Connector::new(
            target,
            args.endpoints,
            args.socket_receive_buffer,
            args.outbox,
            args.delivery_ack_linger,
            args.heartbeat_interval,
            log,
        )
    }

    /// The configuration for virtual user `k` (round-robin over sockets).
    pub fn config(&self, k: usize) -> ClientConfig {
        let mut config = self.base.clone();
        config.endpoint = Some(self.endpoints[k % self.endpoints.len()].clone());
        config
    }

    /// UDP sockets in use.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Waits (briefly) until closed connections have told the server.
    pub async fn wait_idle(&self) {
        for endpoint in &self.endpoints {
            let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
        }
    }
}

/// One simulated user. Its client is swapped out while churn has it
/// offline.
pub struct VUser {
    /// Index among this process's users.
    pub idx: usize,
    /// User name on the server.
    pub username: String,
    /// User id on the server.
    pub user_id: u64,
    /// Session token, for resuming.
    pub token: String,
    client: Mutex<Option<Client>>,
    incarnation: AtomicU32,
    /// The server ended the session for good (logged out, token revoked
    /// or expired): the client will not reconnect.
    ended: AtomicBool,
    /// Photo sends under way (upload, then send): outside the outbox, so
    /// a churned client's shutdown would cut them.
    photos: AtomicUsize,
    /// Per conversation, the newest seq of a text or photo of the run this
    /// user sent or received: what a reply answers (`--reply-fraction`).
    newest: Mutex<HashMap<u64, u64>>,
}

impl VUser {
    fn new(idx: usize, client: Client) -> VUser {
        let identity = client.identity();
        VUser {
            idx,
            username: identity.username,
            user_id: identity.user_id,
            token: identity.token,
            client: Mutex::new(Some(client)),
            incarnation: AtomicU32::new(0),
            ended: AtomicBool::new(false),
            photos: AtomicUsize::new(0),
            newest: Mutex::default(),
        }
    }

    /// Notes a text or photo of the run this user sent or received.
    pub fn note_message(&self, conversation_id: u64, seq: u64) {
        let mut newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        let at = newest.entry(conversation_id).or_default();
        *at = (*at).max(seq);
    }

    /// The newest text or photo of a conversation this user knows of.
    pub fn newest(&self, conversation_id: u64) -> Option<u64> {
        let newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        newest.get(&conversation_id).copied()
    }

    /// A photo send of this user's starts.
    pub fn photo_started(&self) {
        self.photos.fetch_add(1, Ordering::SeqCst);
    }

    /// A photo send of this user's was answered.
    pub fn photo_done(&self) {
        self.photos.fetch_sub(1, Ordering::SeqCst);
    }

    /// Waits (up to `limit`) until this user's photo sends are answered,
    /// as a client's shutdown waits for its outbox.
    pub async fn photos_answered(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.photos.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Notes that the server ended the session for good.
    pub fn end_session(&self) {
        self.ended.store(true, Ordering::SeqCst);
    }

    /// Whether the client is reconnecting: connected before, down now, and
    /// not ended for good (nor taken offline by churn).
    pub fn reconnecting(&self) -> bool {
        !self.ended.load(Ordering::SeqCst) && self.client().is_some_and(|c| !c.is_connected())
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Client>> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client, unless the user is offline.
    pub fn client(&self) -> Option<Client> {
        self.slot().clone()
    }

    /// `f` with the client, unless the user is offline, under the slot's
    /// lock: churn cannot take the client (and start its shutdown) in
    /// between, so a send `f` makes is queued before the client leaves,
    /// and answered.
    pub fn with_client<T>(&self, f: impl FnOnce(&Client) -> T) -> Option<T> {
        self.slot().as_ref().map(f)
    }

    /// Whether the user has a client with its connection up (no clone).
    pub fn is_connected(&self) -> bool {
        self.slot().as_ref().is_some_and(Client::is_connected)
    }

    /// Takes the client away (the user goes offline).
    pub fn take_client(&self) -> Option<Client> {
        self.slot().take()
    }

    /// Installs a resumed client and returns its incarnation number, unless
    /// the run is `stopping` (then the caller closes the client). Checked
    /// under the slot's lock, so teardown, which sets `stopping` before
    /// taking every client, never misses one.
    pub fn install(&self, client: Client, stopping: &AtomicBool) -> Option<u32> {
        let mut slot = self.slot();
        if stopping.load(Ordering::SeqCst) {
            return None;
        }
        *slot = Some(client);
        Some(self.incarnation.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// The users and conversations of a run.
pub struct Population {
    /// Virtual users, by index.
    pub users: Vec<Arc<VUser>>,
    /// Per user: its 1-1 conversations as (conversation id, peer index).
    pub conversations: Vec<Vec<(u64, usize)>>,
    /// Per user: its groups as (conversation id, other members).
    pub groups: Vec<Vec<(u64, u32)>>,
    /// Each user's first event stream, by index.
    pub events: Vec<Events>,
}

/// The groups of this run's users, as [`group_layout`] draws them.
pub fn layout(args: &Args, users: usize) -> Vec<GroupSpec> {
    group_layout(
        users,
        args.group_count(users),
        args.group_max_size,
        args.group_size_exponent,
        LAYOUT_SEED,
    )
}

/// Registers or resumes every user and builds the friend graph.
pub async fn set_up(
    args: &Args,
    plan: &Plan,
    connector: &Arc<Connector>,
    log: impl Fn(&str),
) -> anyhow::Result<Population> {
    let n = plan.users as usize;
    let limit = args.setup_concurrency;
    let edges = friend_graph(n, args.friends);
    let specs = layout(args, n);
    let saved = match &args.reuse {
        Some(path) => ReuseFile::load(path)?,
        None => None,
    };
    if let Some(saved) = saved {
        saved.check(plan, &edges, &specs)?;
        let started = Instant::now();
        let saved = Arc::new(saved);
        let sessions = bounded(n, limit, |k| {
            let config = connector.config(k);
            let saved = saved.clone();
            async move {
                let user = &saved.users[k];
                retry(|| Client::resume(config.clone(), &user.token))
                    .await
                    .with_context(|| {
                        format!(
                            "resume {} with the token in the --reuse file (was it made against another server data dir? delete it to register anew)",
                            user.username
                        )
                    })
            }
        })
        .await?;
        log(&format!(
            "set-up: resumed {n} users from the --reuse file in {:.1}s",
            started.elapsed().as_secs_f64()
        ));
        let conversations = saved
            .conversations
            .iter()
            .map(|c| (c.a, c.b, c.conversation_id))
            .collect::<Vec<_>>();
        let group_ids: Vec<u64> = saved
            .groups
            .iter()
            .take(specs.len())
            .map(|g| g.conversation_id)
            .collect();
        if args.push {
            register_push(&sessions, limit, &log).await?;
        }
        return Ok(assemble(sessions, &conversations, &specs, &group_ids));
    }

    let prefix = match &args.name_prefix {
        Some(prefix) => prefix.clone(),
        None => format!("lg{:06x}", rand::random::<u32>() & 0xff_ffff),
    };
    let started = Instant::now();
    let sessions = bounded(n, limit, |k| {
        let config = connector.config(k);
        let username = format!("{prefix}-{}", plan.population_index(k));
        async move {
            match retry(|| Client::register(config.clone(), &username, PASSWORD)).await {
                Err(e) if e.code() == Some(chat_client::ErrorCode::RateLimited) => {
                    Err(anyhow::Error::new(e).context(format!(
                        "register {username}: the server limits registrations per address \
                         (set-up registers every user from this one): start it with \
                         --registrations-per-address 0"
                    )))
                }
                other => other.with_context(|| format!("register {username}")),
            }
        }
    })
    .await?;
    log(&format!(
        "set-up: registered {n} users in {:.1}s",
        started.elapsed().as_secs_f64()
    ));

    let started = Instant::now();
    let clients: Arc<Vec<Client>> = Arc::new(sessions.iter().map(|(c, _)| c.clone()).collect());
    let edge_list = Arc::new(edges.clone());
    let conv_ids = bounded(edges.len(), limit, |e| {
        let clients = clients.clone();
        let edges = edge_list.clone();
        async move {
            let (a, b) = edges[e];
            befriend(&clients, a, b).await?;
            let b_id = clients[b].identity().user_id;
            let info = retry(|| clients[a].open_direct(b_id))
                .await
                .with_context(|| format!("open conversation {a} - {b}"))?;
            Ok(info.conversation_id)
        }
    })
    .await?;
    log(&format!(
        "set-up: {} friendships and conversations in {:.1}s",
        edges.len(),
        started.elapsed().as_secs_f64()
    ));
    let conversations: Vec<(usize, usize, u64)> = edges
        .iter()
        .zip(&conv_ids)
        .map(|(&(a, b), &id)| (a, b, id))
        .collect();
    let group_ids = set_up_groups(&clients, &edges, &specs, limit, &log).await?;
    if args.push {
        register_push(&sessions, limit, &log).await?;
    }
    let population = assemble(sessions, &conversations, &specs, &group_ids);
    if let Some(path) = &args.reuse {
        let saved = Saved {
            conversations: &conversations,
            groups: &specs,
            group_ids: &group_ids,
        };
        ReuseFile::from_population(&prefix, plan, args.friends, &population, saved).save(path)?;
        log(&format!(
            "set-up: saved users, tokens and conversations to {} (--reuse)",
            path.display()
        ));
    }
    Ok(population)
}

/// Registers every user's push token (`--push`): it lives with the
/// session, so the users' reconnects keep it.
async fn register_push(
    sessions: &[(Client, Events)],
    limit: usize,
    log: &impl Fn(&str),
) -> anyhow::Result<()> {
    let started = Instant::now();
    let clients: Arc<Vec<Client>> = Arc::new(sessions.iter().map(|(c, _)| c.clone()).collect());
    bounded(clients.len(), limit, |k| {
        let clients = clients.clone();
        async move {
            let token = crate::push::token(&clients[k].identity().username);
            retry(|| clients[k].register_push(crate::push::APP_ID, &token))
                .await
                .with_context(|| format!("register the push token of user {k}"))
        }
    })
    .await?;
    log(&format!(
        "set-up: {} push tokens registered in {:.1}s",
        clients.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// User `a` asks `b` for friendship and `b` accepts.
async fn befriend(clients: &[Client], a: usize, b: usize) -> anyhow::Result<()> {
    let (ca, cb) = (&clients[a], &clients[b]);
    let b_name = cb.identity().username;
    retry(|| ca.send_friend_request(&b_name))
        .await
        .with_context(|| format!("friend request {a} -> {b}"))?;
    retry(|| cb.accept_friend(ca.identity().user_id))
        .await
        .with_context(|| format!("accept friend {a} -> {b}"))?;
    Ok(())
}

/// Makes every group member a friend of its creator where the 1-1 graph
/// has not, then has each creator create its group. Returns the groups'
/// conversation ids in `specs` order.
async fn set_up_groups(
    clients: &Arc<Vec<Client>>,
    edges: &[(usize, usize)],
    specs: &[GroupSpec],
    limit: usize,
    log: &impl Fn(&str),
) -> anyhow::Result<Vec<u64>> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let started = Instant::now();
    let extra = Arc::new(extra_friendships(edges, specs));
    bounded(extra.len(), limit, |e| {
        let clients = clients.clone();
        let extra = extra.clone();
        async move {
            let (a, b) = extra[e];
            befriend(&clients, a, b).await
        }
    })
    .await?;
    let specs = Arc::new(specs.to_vec());
    let ids = bounded(specs.len(), limit, |g| {
        let clients = clients.clone();
        let specs = specs.clone();
        async move {
            let spec = &specs[g];
            let member_ids: Vec<u64> = spec
                .members
                .iter()
                .map(|&m| clients[m].identity().user_id)
                .collect();
            let name = format!("loadgen group {g}");
            let info = retry(|| clients[spec.creator].create_group(&name, &member_ids))
                .await
                .with_context(|| format!("create group {g} of {} members", spec.size()))?;
            Ok(info.conversation_id)
        }
    })
    .await?;
    let members: usize = specs.iter().map(GroupSpec::size).sum();
    log(&format!(
        "set-up: {} groups ({} memberships, {} more friendships for them) in {:.1}s",
        specs.len(),
        members,
        extra.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(ids)
}

fn assemble(
    sessions: Vec<(Client, Events)>,
    conversations: &[(usize, usize, u64)],
    specs: &[GroupSpec],
    group_ids: &[u64],
) -> Population {
    let n = sessions.len();
    let mut per_user = vec![Vec::new(); n];
    for &(a, b, id) in conversations {
        per_user[a].push((id, b));
        per_user[b].push((id, a));
    }
    let mut groups = vec![Vec::new(); n];
    for (spec, &id) in specs.iter().zip(group_ids) {
        let others = spec.members.len() as u32;
        for member in spec.everyone() {
            groups[member].push((id, others));
        }
    }
    let mut users = Vec::with_capacity(n);
    let mut events = Vec::with_capacity(n);
    for (k, (client, ev)) in sessions.into_iter().enumerate() {
        users.push(Arc::new(VUser::new(k, client)));
        events.push(ev);
    }
    Population {
        users,
        conversations: per_user,
        groups,
        events,
    }
}

/// Runs `f(0..count)` with at most `limit` in flight; results in index
/// order. The first error stops the rest.
pub(crate) async fn bounded<T, F, Fut>(count: usize, limit: usize, f: F) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let mut set = JoinSet::new();
    let mut out: Vec<Option<T>> = (0..count).map(|_| None).collect();
    let mut next = 0;
    while next < count || !set.is_empty() {
        while next < count && set.len() < limit.max(1) {
            let fut = f(next);
            let i = next;
            set.spawn(async move { (i, fut.await) });
            next += 1;
        }
        if let Some(joined) = set.join_next().await {
            let (i, result) = joined.context("a set-up task panicked")?;
            out[i] = Some(result?);
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// Retries a set-up request the server refused with a retryable code
/// (busy, rate limited, unavailable), with a growing pause.
/// The longest pause a set-up step takes before trying again; a server
/// asking for longer (a registration limit refilled over an hour) fails
/// the set-up at once instead.
const MAX_SETUP_PAUSE: Duration = Duration::from_secs(10);

pub(crate) async fn retry<T, F, Fut>(mut f: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e)
                if (e.code().is_some_and(|c| c.is_retryable())
                    || matches!(e, ClientError::Disconnected | ClientError::Timeout))
                    && attempt < SETUP_ATTEMPTS
                    && e.retry_after().is_none_or(|wait| wait <= MAX_SETUP_PAUSE) =>
            {
                // Never less than the growing pause, plus up to half of it
                // at random: tasks refused together by a rate limit would
                // otherwise come back together.
                let floor = Duration::from_millis(200) * attempt;
                let jitter = floor.mul_f64(rand::random::<f64>() / 2.0);
                let pause = e.retry_after().unwrap_or_default().max(floor) + jitter;
                tokio::time::sleep(pause).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Retry pause a server error asks for.
trait RetryAfter {
    fn retry_after(&self) -> Option<Duration>;
}

impl RetryAfter for ClientError {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The `--reuse` file: enough to resume every user and skip set-up.
/// It holds session tokens, so it is written readable by its owner only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReuseFile {
    /// Format version.
    pub version: u32,
    /// User name prefix of the run that made it.
    pub prefix: String,
    /// Shard, `i/n`.
    pub shard: String,
    /// Friends per user.
    pub friends: usize,
    /// Users by index.
    pub users: Vec<SavedUser>,
    /// Conversations between users (by index).
    pub conversations: Vec<SavedConversation>,
    /// Groups, in layout order.
    pub groups: Vec<SavedGroup>,
}

/// One saved group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedGroup {
    /// Its creator (by index).
    pub creator: usize,
    /// The other members (by index).
    pub members: Vec<usize>,
    /// Conversation id.
    pub conversation_id: u64,
}

/// What set-up made, for the `--reuse` file.
struct Saved<'a> {
    conversations: &'a [(usize, usize, u64)],
    groups: &'a [GroupSpec],
    group_ids: &'a [u64],
}

/// One saved user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedUser {
    /// Population index.
    pub index: u64,
    /// User name.
    pub username: String,
    /// User id.
    pub user_id: u64,
    /// Session token.
    pub token: String,
}

/// One saved conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedConversation {
    /// The user who asked for the friendship.
    pub a: usize,
    /// The user who accepted.
    pub b: usize,
    /// Conversation id.
    pub conversation_id: u64,
}

impl ReuseFile {
    fn from_population(
        prefix: &str,
        plan: &Plan,
        friends: usize,
        population: &Population,
        saved: Saved<'_>,
    ) -> ReuseFile {
        ReuseFile {
            version: REUSE_VERSION,
            prefix: prefix.to_string(),
            shard: plan.shard.to_string(),
            friends,
            users: population
                .users
                .iter()
                .map(|u| SavedUser {
                    index: plan.population_index(u.idx),
                    username: u.username.clone(),
                    user_id: u.user_id,
                    token: u.token.clone(),
                })
                .collect(),
            conversations: saved
                .conversations
                .iter()
                .map(|&(a, b, conversation_id)| SavedConversation {
                    a,
                    b,
                    conversation_id,
                })
                .collect(),
            groups: saved
                .groups
                .iter()
                .zip(saved.group_ids)
                .map(|(spec, &conversation_id)| SavedGroup {
                    creator: spec.creator,
                    members: spec.members.clone(),
                    conversation_id,
                })
                .collect(),
        }
    }

    /// Reads the file; `Ok(None)` if it does not exist yet.
    pub fn load(path: &Path) -> anyhow::Result<Option<ReuseFile>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let file: ReuseFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a chat-loadgen --reuse file", path.display()))?;
        if file.version != REUSE_VERSION {
            anyhow::bail!(
                "{} has format version {}; this chat-loadgen writes version {REUSE_VERSION}: delete it",
                path.display(),
                file.version
            );
        }
        Ok(Some(file))
    }

    /// Checks that the file was made for the same users, friend graph and
    /// groups (when this run has any).
    pub fn check(
        &self,
        plan: &Plan,
        edges: &[(usize, usize)],
        groups: &[GroupSpec],
    ) -> anyhow::Result<()> {
        let same_users = self.users.len() as u64 == plan.users
            && self
                .users
                .iter()
                .enumerate()
                .all(|(k, u)| u.index == plan.population_index(k));
        let saved_edges: Vec<(usize, usize)> =
            self.conversations.iter().map(|c| (c.a, c.b)).collect();
        if !same_users || self.shard != plan.shard.to_string() || saved_edges != edges {
            anyhow::bail!(
                "the --reuse file was made for {} users of shard {} with another friend graph; \
                 run with the same --users, --shard and --friends, or delete the file",
                self.users.len(),
                self.shard
            );
        }
        // A run without group sends leaves the file's groups alone.
        let same_groups = groups.is_empty()
            || self.groups.len() == groups.len()
                && self.groups.iter().zip(groups).all(|(saved, spec)| {
                    saved.creator == spec.creator && saved.members == spec.members
                });
        if !same_groups {
            anyhow::bail!(
                "the --reuse file holds {} groups that differ from this run's {}; run with the same \
                 --group-fraction, --groups-per-user, --group-max-size and --group-size-exponent, \
                 or delete the file",
                self.groups.len(),
                groups.len()
            );
        }
        Ok(())
    }

    /// Writes the file (owner-only permissions on Unix: it holds tokens).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write as _;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options
            .open(path)
            .with_context(|| format!("create {}", path.display()))?;
        let text = serde_json::to_string_pretty(self).context("serialise the --reuse file")?;
        file.write_all(text.as_bytes())
            .with_context(|| format!("write {}", path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Profile, Shard};

    #[test]
    fn reuse_file_round_trips_and_checks_the_plan() {
        let plan = Plan::new(Profile::MESSENGER, 2.0, Shard::ALL, 3, Some(1.0)).unwrap();
        let edges = friend_graph(3, 2);
        let file = ReuseFile {
            version: REUSE_VERSION,
            prefix: "lgtest".into(),
            shard: "0/1".into(),
            friends: 2,
            users: (0..3)
                .map(|k| SavedUser {
                    index: k,
                    username: format!("lgtest-{k}"),
                    user_id: 10 + k,
                    token: format!("t{k}"),
                })
                .collect(),
            conversations: edges
                .iter()
                .enumerate()
                .map(|(i, &(a, b))| SavedConversation {
                    a,
                    b,
                    conversation_id: 100 + i as u64,
                })
                .collect(),
            groups: vec![SavedGroup {
                creator: 0,
                members: vec![1, 2],
                conversation_id: 200,
            }],
        };
        let groups = [GroupSpec {
            creator: 0,
            members: vec![1, 2],
        }];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reuse.json");
        assert_eq!(ReuseFile::load(&path).unwrap(), None);
        file.save(&path).unwrap();
        let back = ReuseFile::load(&path).unwrap().unwrap();
        assert_eq!(back, file);
        back.check(&plan, &edges, &groups).unwrap();
        assert!(
            back.check(&plan, &edges, &groups[..0]).is_ok(),
            "a run without groups ignores the file's"
        );
        let other_groups = [GroupSpec {
            creator: 1,
            members: vec![2, 0],
        }];
        assert!(back.check(&plan, &edges, &other_groups).is_err());
        let other = Plan::new(Profile::MESSENGER, 2.0, Shard::ALL, 4, Some(1.0)).unwrap();
        assert!(back.check(&other, &friend_graph(4, 2), &groups).is_err());
        assert!(back.check(&plan, &friend_graph(3, 1), &groups).is_err());
        std::fs::write(&path, "{}").unwrap();
        assert!(ReuseFile::load(&path).is_err());
    }
}
