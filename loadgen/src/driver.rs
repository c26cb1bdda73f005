//! The measured run: the open-loop send schedule (to 1-1 conversations and
//! groups alike: one send path, a recipient count per send), one receiver
//! per virtual user (delivery, receipts, "seen" after a reading delay),
//! churn, the progress line, the CPU window, the drain, and teardown.
//!
//! Open loop means the schedule is fixed before the run (a seeded Poisson
//! process at the offered rate) and each send is spawned at its intended
//! time without waiting for earlier ones. In-flight sends are bounded only
//! by each client's outbox, whose refusals are counted as `outbox_full`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_client::{Client, ClientError, Event, Events, PhotoUpload, proto};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::args::{Args, Backend, MAX_TEXT_BYTES};
use crate::cpu;
use crate::payload::Header;
use crate::plan::Plan;
use crate::population::{Connector, Population, VUser};
use crate::sampling::{PoissonSchedule, TextLen, Zipf, least_active, sender_order};
use crate::stats::{Clock, Final, Progress, Tracker};
use crate::udp;

/// Where a run is; tests watch it to act at the right moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting users, friends and conversations (not measured).
    SettingUp,
    /// Load is running but not counted yet.
    Warmup,
    /// The measured window.
    Measuring,
    /// The schedule has ended; waiting for answers.
    Draining,
    /// The report is ready.
    Done,
}

/// Gap between the end of set-up and the first scheduled send, so the
/// first sends are not late by construction.
const START_LEAD: Duration = Duration::from_millis(50);
/// How often the drain checks whether everything has arrived.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// How long the drain goes on listening once everything has arrived (at
/// most `--drain`): a copy delivered again (a redelivery after a
/// reconnect, say) arrives after the first, and ending at the first would
/// count no duplicate however wrong the server.
const SETTLE: Duration = Duration::from_secs(1);
/// Pause between attempts to bring a churned user back.
const RESUME_RETRY: Duration = Duration::from_secs(1);
/// Longest a client whose connection dropped may take to be back: a
/// connection attempt made while the node was down gets through at its
/// next Initial retransmission, which backs off up to the client's idle
/// timeout (30 s).
const RECONNECT_ALLOWANCE: Duration = Duration::from_secs(30);
/// The drain looks for clients that are reconnecting every this many
/// polls (a look takes every user's client).
const RECONNECT_POLLS: u32 = 10;
/// Most a churned user's client takes to leave (its sends answered, its
/// delivery acks confirmed) before it closes anyway: client-lib's default
/// request timeout.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(15);
/// Seed offsets, so the schedule, sender choice and churn draw from
/// independent streams of one `--seed`.
const SENDER_SEED: u64 = 0x5e4d_0001;
const CHURN_SEED: u64 = 0xc4a1_0002;
const CHURN_PICK_SEED: u64 = 0xc4a1_0003;

/// State every task of a run shares.
struct Shared {
    clock: Clock,
    tracker: Tracker,
    users: Vec<Arc<VUser>>,
    run_id: u32,
    read_delay: Duration,
    /// `--reply-fraction` is not 0: users keep the newest message of
    /// each conversation, for their replies.
    replies: bool,
    /// `--reaction-fraction`.
    reaction_fraction: f64,
    /// The bytes of every photo sent (`--photo-bytes`).
    photo: bytes::Bytes,
    /// Every photo's preview ([`PREVIEW_BYTES`]).
    preview: bytes::Bytes,
    /// Photo downloads under way: the drain waits for them.
    downloading: AtomicUsize,
    /// Users whose app is in the background (no heartbeats), by index.
    background: Vec<bool>,
    stopping: AtomicBool,
    receivers: Mutex<Vec<JoinHandle<()>>>,
    /// Users churn has taken offline and not brought back yet.
    away: AtomicUsize,
    /// When the latest of them came back (ns on the run's clock).
    last_back_ns: AtomicU64,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// CPU use over the measured window, and the connections at its ends.
#[derive(Debug, Clone, Default)]
pub struct CpuUse {
    /// Server CPU time (with `--server-pid` or `--spawn-server`).
    pub server: Option<Duration>,
    /// The same by server thread name (empty without either).
    pub server_threads: BTreeMap<String, Duration>,
    /// This process's CPU time.
    pub own: Option<Duration>,
    /// Wall time between the two samples.
    pub wall: Duration,
    /// The whole machine's UDP counters over the window (see
    /// [`crate::udp`]).
    pub udp: Option<udp::UdpCounters>,
    /// CPU of each `--backend`, by its name.
    pub backends: BTreeMap<String, Duration>,
    /// Users whose connection was up when the window opened and when it
    /// closed (churn and reconnects show here).
    pub connected: [u64; 2],
}

/// What the run measured.
pub struct Outcome {
    /// Counters and histograms.
    pub fin: Final,
    /// CPU over the window.
    pub cpu: CpuUse,
}

/// Runs warm-up, the measured window and the drain, then closes every
/// client.
pub async fn drive(
    args: &Args,
    plan: &Plan,
    population: Population,
    connector: Arc<Connector>,
    server_cpu: Option<cpu::ServerCpu>,
    phase: &watch::Sender<Phase>,
) -> Outcome {
    let Population {
        users,
        conversations,
        groups,
        events,
    } = population;
    let by_rank = sender_order(users.len(), args.seed);
    // Each user's conversations, for the tracker to tell a copy at a
    // non-member from a delivery.
    let memberships = conversations
        .iter()
        .zip(&groups)
        .map(|(direct, groups)| {
            direct
                .iter()
                .map(|&(id, _)| id)
                .chain(groups.iter().map(|&(id, _)| id))
                .collect()
        })
        .collect();
    let shared = Arc::new(Shared {
        clock: Clock::new(),
        tracker: Tracker::new(memberships),
        background: least_active(&by_rank, args.background_count(by_rank.len())),
        users,
        run_id: rand::random(),
        read_delay: args.read_delay,
        replies: args.reply_fraction > 0.0,
        reaction_fraction: args.reaction_fraction,
        photo: photo_bytes(args.photo_bytes),
        preview: photo_bytes(PREVIEW_BYTES),
        downloading: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
        receivers: Mutex::new(Vec::new()),
        away: AtomicUsize::new(0),
        last_back_ns: AtomicU64::new(0),
    });
    // Room for every send and arrival the plan expects, taken before the
    // schedule starts (a tenth more for the Poisson count's spread).
    let planned = plan.offered_rate * (args.warmup + args.duration).as_secs_f64();
    let sends = (planned * 1.1 + 1_000.0).min(1e9) as usize;
    let (members, memberships) = groups
        .iter()
        .flatten()
        .fold((0u64, 0u64), |(sum, n), &(_, others)| {
            (sum + u64::from(others), n + 1)
        });
    let per_group_send = if memberships == 0 {
        1.0
    } else {
        (members as f64 / memberships as f64).max(1.0)
    };
    let per_send = (1.0 - args.group_fraction) + args.group_fraction * per_group_send;
    shared
        .tracker
        .reserve(sends, (sends as f64 * per_send).min(1e9) as usize);
    for (user, events) in shared.users.iter().zip(events) {
        if let Some(client) = user.client() {
            client.set_heartbeats(!shared.background[user.idx]);
            spawn_receiver(&shared, user.clone(), (0, 0), client, events);
        }
    }
    let ticks = cpu::clock_ticks_per_second();
    let start_ns = shared.clock.now_ns() + START_LEAD.as_nanos() as u64;
    let warmup_ns = args.warmup.as_nanos() as u64;
    let total_ns = warmup_ns + args.duration.as_nanos() as u64;
    shared
        .tracker
        .set_window(start_ns + warmup_ns, start_ns + total_ns);
    phase.send_replace(if warmup_ns > 0 {
        Phase::Warmup
    } else {
        Phase::Measuring
    });
    let window = tokio::spawn(measure_window(
        shared.clone(),
        start_ns + warmup_ns,
        start_ns + total_ns,
        server_cpu,
        args.backends.clone(),
        ticks,
        phase.clone(),
    ));
    let progress = (!args.quiet).then(|| {
        tokio::spawn(progress_lines(
            shared.clone(),
            start_ns,
            start_ns + warmup_ns,
            start_ns + total_ns,
        ))
    });
    let churn = (args.churn > 0.0).then(|| {
        tokio::spawn(churn(
            shared.clone(),
            connector.clone(),
            args.churn,
            args.offline_time,
            plan.schedule_seed(args.seed),
            start_ns,
            start_ns + total_ns,
        ))
    });

    schedule(
        &shared,
        &Targets {
            direct: &conversations,
            groups: &groups,
            by_rank: &by_rank,
        },
        args,
        plan,
        start_ns,
        warmup_ns,
        total_ns,
    )
    .await;
    let cpu = window.await.unwrap_or_default();
    // The drain gives every user the same time to catch up, those churn
    // took away and those whose connection dropped too: it lasts until
    // `--drain` after the window or after the last of them came back (or
    // was last seen reconnecting), whichever is later. Otherwise a user
    // offline late in the window was still away when the drain ended, and
    // what was sent to it counted as lost on a correct server.
    let end = shared.clock.instant(start_ns + total_ns);
    let cap =
        end + args.drain + args.offline_time + LEAVE_TIMEOUT + RECONNECT_ALLOWANCE + args.drain;
    let mut reconnecting_at = end;
    let mut polls = 0u32;
    while !shared.tracker.complete() || shared.downloading.load(Ordering::SeqCst) > 0 {
        let now = tokio::time::Instant::now();
        if polls.is_multiple_of(RECONNECT_POLLS) && shared.users.iter().any(|u| u.reconnecting()) {
            reconnecting_at = now;
        }
        polls = polls.wrapping_add(1);
        let back = shared
            .clock
            .instant(shared.last_back_ns.load(Ordering::SeqCst))
            .max(reconnecting_at);
        let away = shared.away.load(Ordering::SeqCst) > 0;
        if now >= cap || (!away && now >= back + args.drain) {
            break;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    if shared.tracker.complete() {
        let settled = tokio::time::Instant::now() + SETTLE.min(args.drain);
        tokio::time::sleep_until(settled.min(cap)).await;
    }

    // Teardown: nothing counts from here on.
    shared.stopping.store(true, Ordering::SeqCst);
    let fin = shared.tracker.freeze(shared.clock.now_ns());
    if let Some(task) = churn {
        task.abort();
    }
    if let Some(task) = progress {
        task.abort();
    }
    for user in &shared.users {
        if let Some(client) = user.take_client() {
            client.close();
        }
    }
    connector.wait_idle().await;
    let receivers =
        std::mem::take(&mut *shared.receivers.lock().unwrap_or_else(|e| e.into_inner()));
    for task in receivers {
        task.abort();
    }
    Outcome { fin, cpu }
}

/// Where each user's sends can go.
struct Targets<'a> {
    /// Per user: 1-1 conversations as (conversation id, peer).
    direct: &'a [Vec<(u64, usize)>],
    /// Per user: groups as (conversation id, other members).
    groups: &'a [Vec<(u64, u32)>],
    /// Zipf rank -> user.
    by_rank: &'a [usize],
}

impl Targets<'_> {
    /// The conversation and recipient count of a send by `sender`: one of
    /// its groups when `to_group` and it has any, else one of its 1-1
    /// conversations; `pick` chooses which.
    fn pick(&self, sender: usize, to_group: bool, pick: usize) -> Option<(u64, u32, bool)> {
        let groups = &self.groups[sender];
        if to_group && !groups.is_empty() {
            let (id, others) = groups[pick % groups.len()];
            return Some((id, others, true));
        }
        let direct = &self.direct[sender];
        (!direct.is_empty()).then(|| (direct[pick % direct.len()].0, 1, false))
    }
}

/// Spawns every send of the schedule at its intended time.
async fn schedule(
    shared: &Arc<Shared>,
    targets: &Targets<'_>,
    args: &Args,
    plan: &Plan,
    start_ns: u64,
    warmup_ns: u64,
    total_ns: u64,
) {
    let seed = plan.schedule_seed(args.seed);
    let mut poisson = PoissonSchedule::new(plan.offered_rate, seed);
    let mut rng = StdRng::seed_from_u64(seed ^ SENDER_SEED);
    let zipf = Zipf::new(shared.users.len(), args.zipf);
    let text_len = TextLen::new(args.text_dist, args.text_bytes, 1, MAX_TEXT_BYTES);
    while let Some(offset) = poisson.next_offset() {
        let offset_ns = u64::try_from(offset.as_nanos()).unwrap_or(u64::MAX);
        if offset_ns >= total_ns {
            break;
        }
        let intended_ns = start_ns + offset_ns;
        if intended_ns > shared.clock.now_ns() {
            tokio::time::sleep_until(shared.clock.instant(intended_ns)).await;
        }
        // Draw everything before looking at who is online, so churn does
        // not shift the rest of the schedule.
        let sender = targets.by_rank[zipf.sample(&mut rng)];
        let to_group = rng.random_bool(args.group_fraction);
        let pick = rng.random::<u32>() as usize;
        let len = text_len.sample(&mut rng);
        // Drawn only when photos are asked for, so that runs without them
        // keep the schedule they always had.
        let photo = args.photo_fraction > 0.0 && rng.random_bool(args.photo_fraction);
        let typed = args.typing_fraction > 0.0 && rng.random_bool(args.typing_fraction);
        let reply = args.reply_fraction > 0.0 && rng.random_bool(args.reply_fraction);
        // A photo's caption and its preview share the text limit.
        let len = if photo {
            len.min(MAX_TEXT_BYTES - PREVIEW_BYTES)
        } else {
            len
        };
        let measured = offset_ns >= warmup_ns;
        let Some((conversation_id, recipients, group)) = targets.pick(sender, to_group, pick)
        else {
            continue;
        };
        let queued = shared.users[sender].with_client(|client| {
            let send_no = shared.tracker.dispatch(
                measured,
                recipients,
                group,
                conversation_id,
                sender,
                (intended_ns, shared.clock.now_ns()),
            );
            let text = Header {
                run: shared.run_id,
                sender,
                send_no,
                intended_ns,
            }
            .encode(len);
            if photo {
                shared.tracker.photo(measured);
                send_photo(
                    shared,
                    client,
                    (send_no, conversation_id, sender),
                    text,
                    intended_ns,
                );
                return (send_no, None);
            }
            if typed {
                client.typing(conversation_id, true);
            }
            let replied_to = reply
                .then(|| shared.users[sender].newest(conversation_id))
                .flatten();
            let send = match replied_to {
                Some(seq) => {
                    shared.tracker.reply(measured);
                    Sending::Reply(client.send_reply(conversation_id, seq, &text))
                }
                None => Sending::Text(client.send_text(conversation_id, &text)),
            };
            (send_no, Some(send))
        });
        let Some((send_no, send)) = queued else {
            shared.tracker.skipped_offline(measured);
            continue;
        };
        let Some(send) = send else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let result = match send {
                Sending::Text(send) => send.await,
                Sending::Reply(send) => send.await,
            };
            answered(
                &shared,
                (send_no, conversation_id, sender),
                intended_ns,
                result,
            );
        });
    }
}

/// A text's send or a reply's, awaited alike.
enum Sending<T, R> {
    Text(T),
    Reply(R),
}

/// Counts the answer to send `send_no`.
fn answered(
    shared: &Shared,
    (send_no, conversation_id, sender): (u64, u64, usize),
    intended_ns: u64,
    result: Result<proto::SendAck, ClientError>,
) {
    let now = shared.clock.now_ns();
    match result {
        Ok(ack) => {
            if shared.replies {
                shared.users[sender].note_message(conversation_id, ack.seq);
            }
            shared
                .tracker
                .acked(send_no, conversation_id, sender, ack.seq, intended_ns, now)
        }
        Err(e) => shared.tracker.failed(send_no, &error_name(&e)),
    }
}

/// A recipient reacts to a text it was delivered, as people do to a
/// share of them; counted apart from the offered sends.
fn react(shared: &Arc<Shared>, client: &Client, conversation_id: u64, seq: u64) {
    let reaction = client.react(conversation_id, seq, "👍");
    let shared = shared.clone();
    tokio::spawn(async move {
        match reaction.await {
            Ok(_) => shared.tracker.reaction_acked(),
            Err(e) => side_failed(&shared, "reaction", &e),
        }
    });
}

/// Counts a side request that failed (a reaction, a photo download) as
/// the error `{what}_{code}`, unless its user went offline (churn) or the
/// run is ending.
fn side_failed(shared: &Shared, what: &str, e: &ClientError) {
    if !matches!(e, ClientError::Closed) && !shared.stopping() {
        shared.tracker.error(&format!("{what}_{}", error_name(e)));
    }
}

/// A photo send: the upload on a media stream of its own, then the send
/// with `caption` (the header), as an app does it.
fn send_photo(
    shared: &Arc<Shared>,
    client: &Client,
    send: (u64, u64, usize),
    caption: String,
    intended_ns: u64,
) {
    let (shared, client) = (shared.clone(), client.clone());
    let user = shared.users[send.2].clone();
    user.photo_started();
    tokio::spawn(async move {
        let upload = PhotoUpload {
            bytes: shared.photo.clone(),
            media_type: proto::MediaType::Jpeg,
            width: 1280,
            height: 960,
            preview: shared.preview.clone(),
        };
        let result = match client.upload_photo(upload).await {
            Ok(media_id) => client.send_photo(send.1, &media_id, &caption).await,
            Err(e) => Err(e),
        };
        answered(&shared, send, intended_ns, result);
        user.photo_done();
    });
}

/// The size of a photo's preview, as a messenger's app makes one inline:
/// a JPEG of 32-64 pixels on its longer side is 1-3 KB.
const PREVIEW_BYTES: usize = 2_000;

/// A JPEG-looking photo of `len` bytes (the format's first bytes, then
/// filler: the server checks the signature and the hash, not the image).
fn photo_bytes(len: usize) -> bytes::Bytes {
    let mut bytes = vec![0xff, 0xd8, 0xff, 0xe0];
    bytes.extend((4..len).map(|i| (i % 251) as u8));
    bytes.truncate(len);
    bytes::Bytes::from(bytes)
}

/// A recipient downloads a photo it was delivered, as an app shows it.
fn download_photo(shared: &Arc<Shared>, client: &Client, media_id: String) {
    let (shared, client) = (shared.clone(), client.clone());
    shared.downloading.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        let downloaded = client.download_photo(&media_id).await;
        shared.downloading.fetch_sub(1, Ordering::SeqCst);
        match downloaded {
            Ok(_) => shared.tracker.photo_downloaded(),
            Err(e) => side_failed(&shared, "photo_download", &e),
        }
    });
}

/// `back_ns`: when this client resumed after churn took its user offline
/// (0 for the first): what was meant to go before, it had on return.
fn spawn_receiver(
    shared: &Arc<Shared>,
    user: Arc<VUser>,
    (incarnation, back_ns): (u32, u64),
    client: Client,
    events: Events,
) {
    let task = tokio::spawn(receive(
        shared.clone(),
        user,
        (incarnation, back_ns),
        client,
        events,
    ));
    shared
        .receivers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(task);
}

/// Per conversation: the highest seq received and whether a "seen" timer
/// is pending.
type SeenState = Arc<Mutex<HashMap<u64, (u64, bool)>>>;

/// Consumes one client's events until it is closed.
async fn receive(
    shared: Arc<Shared>,
    user: Arc<VUser>,
    (incarnation, back_ns): (u32, u64),
    client: Client,
    mut events: Events,
) {
    let seen: SeenState = Arc::default();
    while let Some(event) = events.next().await {
        let now = shared.clock.now_ns();
        match event {
            Event::Message(m) => {
                // Written by the server: a group's changes, a call's log.
                let system = m.r#type == proto::MessageType::System as i32
                    || m.r#type == proto::MessageType::Call as i32;
                match Header::parse(&m.text) {
                    Some(h) if h.run == shared.run_id => {
                        // Counted as under way before the delivery is, so
                        // the drain never sees it complete in between.
                        if let Some(photo) = &m.photo {
                            if photo.preview != shared.preview {
                                shared.tracker.error("photo_preview_lost");
                            }
                            download_photo(&shared, &client, photo.media_id.clone());
                        }
                        let arrived = if h.intended_ns < back_ns {
                            Tracker::delivered_offline
                        } else {
                            Tracker::delivered
                        };
                        arrived(
                            &shared.tracker,
                            h.send_no,
                            user.idx,
                            m.conversation_id,
                            incarnation,
                            h.intended_ns,
                            now,
                        );
                        if shared.replies {
                            user.note_message(m.conversation_id, m.seq);
                        }
                        if shared.reaction_fraction > 0.0
                            && rand::random_bool(shared.reaction_fraction)
                        {
                            react(&shared, &client, m.conversation_id, m.seq);
                        }
                    }
                    _ if m.r#type == proto::MessageType::Reaction as i32 => {
                        shared.tracker.reaction_received();
                    }
                    // "Group created" and the like, from set-up; a call's
                    // log.
                    _ if system => {}
                    // Not sent by the load generator, but not a stale
                    // message of its own either should a run's users get one.
                    _ if m.r#type == proto::MessageType::Edit as i32
                        || m.r#type == proto::MessageType::Unsend as i32 => {}
                    _ => shared.tracker.stale(),
                }
                mark_seen_later(&shared, &client, &seen, m.conversation_id, m.seq);
            }
            Event::Receipt(r) if r.user_id != user.user_id => {
                shared.tracker.receipt(
                    r.conversation_id,
                    user.idx,
                    r.user_id,
                    r.delivered_seq,
                    now,
                );
            }
            Event::Typing(_) => shared.tracker.typing_received(),
            Event::Disconnected { .. } => shared.tracker.reconnect(),
            Event::SessionEnded { code } => {
                // For good: the drain does not wait for it to come back.
                user.end_session();
                shared.tracker.error(&format!(
                    "session_ended_{}",
                    error_name(&ClientError::Server {
                        code,
                        message: String::new(),
                        retry_after: None,
                    })
                ));
            }
            _ => {}
        }
    }
}

/// Marks the conversation seen `read_delay` after a message arrived,
/// coalescing messages that arrive meanwhile into one MarkSeen.
fn mark_seen_later(shared: &Arc<Shared>, client: &Client, seen: &SeenState, conv: u64, seq: u64) {
    let start_timer = {
        let mut map = seen.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(conv).or_insert((0, false));
        entry.0 = entry.0.max(seq);
        !std::mem::replace(&mut entry.1, true)
    };
    if !start_timer {
        return;
    }
    let (shared, client, seen) = (shared.clone(), client.clone(), seen.clone());
    tokio::spawn(async move {
        tokio::time::sleep(shared.read_delay).await;
        let seq = {
            let mut map = seen.lock().unwrap_or_else(|e| e.into_inner());
            let entry = map.entry(conv).or_insert((seq, false));
            entry.1 = false;
            entry.0
        };
        match client.mark_seen(conv, seq).await {
            // Closed: the user went offline (churn) or the run ended.
            Ok(()) | Err(ClientError::Closed) => {}
            Err(e) => {
                if !shared.stopping() {
                    shared
                        .tracker
                        .error(&format!("mark_seen_{}", error_name(&e)));
                }
            }
        }
    });
}

/// Samples CPU at the start and end of the measured window and moves the
/// phase along.
async fn measure_window(
    shared: Arc<Shared>,
    measure_ns: u64,
    end_ns: u64,
    server_cpu: Option<cpu::ServerCpu>,
    backends: Vec<Backend>,
    ticks: u64,
    phase: watch::Sender<Phase>,
) -> CpuUse {
    let connected = || {
        shared
            .users
            .iter()
            .filter(|user| user.is_connected())
            .count() as u64
    };
    let own_pid = std::process::id();
    let sample = || {
        let (server, threads) = match server_cpu {
            Some(cpu::ServerCpu::Process(pid)) => {
                (cpu::process_cpu(pid, ticks), cpu::threads_cpu(pid, ticks))
            }
            // Summed from the threads' own differences below.
            Some(cpu::ServerCpu::InProcess) => (
                None,
                cpu::threads_cpu(own_pid, ticks).map(cpu::in_process_server),
            ),
            None => (None, None),
        };
        (
            tokio::time::Instant::now(),
            server,
            cpu::process_cpu(own_pid, ticks),
            threads,
            udp::UdpCounters::read(),
            backends
                .iter()
                .map(|b| cpu::command_cpu(&b.command, ticks))
                .collect::<Vec<_>>(),
        )
    };
    tokio::time::sleep_until(shared.clock.instant(measure_ns)).await;
    let (t0, server0, own0, threads0, udp0, backends0) = sample();
    let connected0 = connected();
    phase.send_replace(Phase::Measuring);
    tokio::time::sleep_until(shared.clock.instant(end_ns)).await;
    let (t1, server1, own1, threads1, udp1, backends1) = sample();
    let connected1 = connected();
    phase.send_replace(Phase::Draining);
    let diff = |a: Option<Duration>, b: Option<Duration>| Some(b?.saturating_sub(a?));
    let server_threads = match (threads0, threads1) {
        (Some(a), Some(b)) => cpu::threads_diff(&a, &b),
        _ => BTreeMap::new(),
    };
    let (server, own) = match server_cpu {
        // The server's threads are part of this process: the load
        // generator's own share is what they leave.
        Some(cpu::ServerCpu::InProcess) => {
            let server: Duration = server_threads.values().sum();
            let own = diff(own0, own1).map(|own| own.saturating_sub(server));
            (Some(server), own)
        }
        _ => (diff(server0, server1), diff(own0, own1)),
    };
    CpuUse {
        server,
        own,
        server_threads,
        wall: t1 - t0,
        udp: udp0.zip(udp1).map(|(a, b)| a.until(b)),
        backends: backends
            .iter()
            .zip(backends0.iter().zip(&backends1))
            .map(|(b, (before, after))| (b.name.clone(), cpu::command_diff(before, after)))
            .collect(),
        connected: [connected0, connected1],
    }
}

/// One line a second on stderr.
async fn progress_lines(shared: Arc<Shared>, start_ns: u64, measure_ns: u64, end_ns: u64) {
    let period = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(shared.clock.instant(start_ns) + period, period);
    // After a stall, one line rather than a burst of lines a moment apart
    // (each with a rate over a millisecond).
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Progress::default();
    let mut last_ns = start_ns;
    loop {
        tick.tick().await;
        let now = shared.clock.now_ns();
        let p = shared.tracker.progress();
        let dt = (now.saturating_sub(last_ns) as f64 / 1e9).max(1e-3);
        let label = if now < measure_ns {
            "warmup"
        } else if now < end_ns {
            "measure"
        } else {
            "drain"
        };
        eprintln!(
            "[{:>6.1}s] {label:<7} offered {:>8.1}/s  acked {:>8.1}/s  in-flight {:>6}  p99 ack {:>8.2} ms  errors {}  reconnects {}",
            now.saturating_sub(start_ns) as f64 / 1e9,
            (p.dispatched - last.dispatched) as f64 / dt,
            (p.acked - last.acked) as f64 / dt,
            p.dispatched.saturating_sub(p.resolved),
            p.ack_p99_ms,
            p.errors,
            p.reconnects,
        );
        last = p;
        last_ns = now;
    }
}

/// Takes random users offline at `churn` of the users per minute (a
/// Poisson process) and brings each back after `offline_time`.
async fn churn(
    shared: Arc<Shared>,
    connector: Arc<Connector>,
    churn: f64,
    offline_time: Duration,
    seed: u64,
    start_ns: u64,
    end_ns: u64,
) {
    let n = shared.users.len();
    let mut schedule = PoissonSchedule::new(churn * n as f64 / 60.0, seed ^ CHURN_SEED);
    let mut rng = StdRng::seed_from_u64(seed ^ CHURN_PICK_SEED);
    while let Some(offset) = schedule.next_offset() {
        let at = start_ns.saturating_add(u64::try_from(offset.as_nanos()).unwrap_or(u64::MAX));
        if at >= end_ns {
            return;
        }
        tokio::time::sleep_until(shared.clock.instant(at)).await;
        let user = shared.users[rng.random_range(0..n)].clone();
        let Some(client) = user.take_client() else {
            continue;
        };
        shared.tracker.churn_offline();
        shared.away.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(come_back(
            shared.clone(),
            connector.clone(),
            user,
            client,
            offline_time,
        ));
    }
}

/// Takes a churned user's client offline as an app going away does (its
/// sends answered and the acks of what it took written first, so nothing
/// it had arrives again), then resumes with its token after
/// `offline_time` (the offline path: everything sent to it meanwhile must
/// arrive now).
async fn come_back(
    shared: Arc<Shared>,
    connector: Arc<Connector>,
    user: Arc<VUser>,
    client: Client,
    offline_time: Duration,
) {
    /// Counts the user back (or given up) however this ends.
    struct Back<'a>(&'a Shared);
    impl Drop for Back<'_> {
        fn drop(&mut self) {
            let shared = self.0;
            shared
                .last_back_ns
                .fetch_max(shared.clock.now_ns(), Ordering::SeqCst);
            shared.away.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _back = Back(&shared);
    // Photo sends are not in the outbox that the shutdown waits for.
    user.photos_answered(LEAVE_TIMEOUT).await;
    client.shutdown(LEAVE_TIMEOUT).await;
    drop(client);
    tokio::time::sleep(offline_time).await;
    while !shared.stopping() {
        // Back in the background if that is where the app is, as a phone
        // woken to sync: not online for a moment at each return.
        let mut config = connector.config(user.idx);
        config.start_in_background = shared.background[user.idx];
        match Client::resume(config, &user.token).await {
            Ok((client, events)) => {
                match user.install(client.clone(), &shared.stopping) {
                    Some(incarnation) => {
                        let back_ns = shared.clock.now_ns();
                        spawn_receiver(
                            &shared,
                            user.clone(),
                            (incarnation, back_ns),
                            client,
                            events,
                        );
                    }
                    None => client.close(),
                }
                return;
            }
            Err(e) => {
                shared.tracker.error(&format!("resume_{}", error_name(&e)));
                tokio::time::sleep(RESUME_RETRY).await;
            }
        }
    }
}

/// A short, stable name for an error: the wire code without its prefix
/// (`rate_limited`), or the client-side condition (`outbox_full`).
pub fn error_name(e: &ClientError) -> String {
    match e {
        ClientError::Server { code, .. } => code
            .as_str_name()
            .trim_start_matches("ERROR_CODE_")
            .to_ascii_lowercase(),
        ClientError::OutboxFull(_) => "outbox_full".into(),
        ClientError::Disconnected => "disconnected".into(),
        ClientError::Timeout => "timeout".into(),
        ClientError::Connect(_) => "connect".into(),
        ClientError::Protocol(_) => "protocol".into(),
        ClientError::Config(_) => "config".into(),
        ClientError::Closed => "closed".into(),
        ClientError::SessionEnded(code) => format!(
            "session_ended_{}",
            code.as_str_name()
                .trim_start_matches("ERROR_CODE_")
                .to_ascii_lowercase()
        ),
        _ => "other".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_client::ErrorCode;

    #[test]
    fn error_names_are_short() {
        let server = ClientError::Server {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            retry_after: None,
        };
        assert_eq!(error_name(&server), "rate_limited");
        assert_eq!(error_name(&ClientError::OutboxFull(3)), "outbox_full");
        assert_eq!(error_name(&ClientError::Closed), "closed");
        assert_eq!(
            error_name(&ClientError::SessionEnded(ErrorCode::TokenExpired)),
            "session_ended_token_expired"
        );
    }
}
