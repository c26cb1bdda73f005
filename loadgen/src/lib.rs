//! `chat-loadgen`: drives a chat-server with real clients (`chat-client`
//! over real QUIC) so capacity planners can answer "how many nodes, at what
//! latency".
//!
//! A run, in order:
//!
//! * [`args`] and [`plan`]: flags become a [`plan::Plan`]: the profile's
//!   full-scale rates, this shard's users, and the rate to offer (printed at
//!   start).
//! * [`population`]: set-up, not measured: shared UDP sockets, users
//!   registered (or resumed from a `--reuse` file), a friend graph and its
//!   1-1 conversations, and the groups of [`groups`].
//! * [`driver`]: warm-up, the measured window and the drain: an open-loop
//!   Poisson schedule ([`sampling`]), Zipf-skewed senders, message texts
//!   carrying a [`payload::Header`], receivers that mark messages seen, and
//!   optional churn.
//! * [`calls`] (`--calls`): group-call media in place of messages.
//! * [`stats`] and [`cpu`]: HdrHistograms of latency from the *intended*
//!   send time, correctness counters, server CPU from `/proc`, and the
//!   [`Report`].
//!
//! The binary is a thin `main`; tests call [`run`] directly.

pub mod args;
pub mod calls;
pub mod cpu;
pub mod driver;
pub mod groups;
pub mod payload;
pub mod plan;
pub mod population;
pub mod push;
pub mod sampling;
pub mod stats;
pub mod udp;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use tokio::sync::watch;

pub use args::Args;
pub use driver::Phase;
/// The JSON library reports are written with, so tools and tests parse them
/// with the same version.
pub use serde_json;
pub use stats::Report;

use crate::driver::Outcome;
use crate::plan::Plan;
use crate::population::{Connector, Target};

/// Runs the load described by `args` and returns its report (also written
/// to `--json` when set).
pub async fn run(args: Args) -> anyhow::Result<Report> {
    run_with_phases(args, watch::channel(Phase::SettingUp).0).await
}

/// [`run`], announcing each [`Phase`] on `phase` as it begins (a test can
/// wait for [`Phase::Measuring`] and then disturb the server).
pub async fn run_with_phases(args: Args, phase: watch::Sender<Phase>) -> anyhow::Result<Report> {
    let plan = args.plan()?;
    let quiet = args.quiet;
    let log = move |line: &str| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    if args.calls == 0 {
        log(plan.describe().trim_end());
        log(&args.describe_groups(plan.users as usize));
        if let Some(line) = describe_fanout(&args, plan.users as usize) {
            log(&line);
        }
    }
    if args.calls == 0 {
        let heartbeat = args.heartbeat_interval.map_or_else(
            || "at the interval the server announces at login".to_string(),
            |i| format!("every {}", humantime::format_duration(i)),
        );
        log(&format!(
            "plan: {} of {} users have the app in the background (no heartbeats, and \
             offline in presence); the rest heartbeat {heartbeat}; nobody subscribes to \
             presence",
            args.background_count(plan.users as usize),
            plan.users
        ));
    }
    phase.send_replace(Phase::SettingUp);
    let sink = match args.push {
        true => {
            let sink = push::Sink::start(
                args.push_sink
                    .unwrap_or_else(|| (std::net::Ipv4Addr::LOCALHOST, 0).into()),
            )
            .await?;
            log(&format!(
                "plan: every user registers a push token; notifications go to the stand-in push gateway at {}",
                sink.url()
            ));
            Some(sink)
        }
        false => None,
    };
    let mut spawned = None;
    let target = if args.spawn_server {
        let server = SpawnedServer::start(&args, sink.as_ref().map(push::Sink::url)).await?;
        let target = Target {
            addr: server.server().local_addr(),
            ca: server
                .server()
                .dev_ca()
                .context("the spawned server has no development CA")?
                .to_path_buf(),
            server_name: "localhost".into(),
        };
        log(&format!(
            "spawned an in-process chat-server on {} (data dir {}; {} runtime threads of its own)",
            target.addr,
            server.data_dir.display(),
            server.threads,
        ));
        spawned = Some(server);
        target
    } else {
        Target {
            addr: args
                .server
                .context("--server or --spawn-server is required")?,
            ca: args.ca.clone().context("--ca is required with --server")?,
            server_name: args.server_name.clone(),
        }
    };
    // A given pid wins; an in-process server is otherwise measured by its
    // threads.
    let server_cpu = args
        .server_pid
        .map(cpu::ServerCpu::Process)
        .or(spawned.is_some().then_some(cpu::ServerCpu::InProcess));
    let result = match args.calls {
        0 => measure(&args, &plan, &target, server_cpu, &phase, &log).await,
        _ => calls::run(&args, &target, server_cpu, &phase, &log).await,
    };
    let result = result.map(|mut report| {
        if let Some(sink) = &sink {
            report.notifications = sink.counts.notifications.load(Ordering::Relaxed);
            report.notified_devices = sink.counts.devices.load(Ordering::Relaxed);
            // Requests that were not a notification are the server's errors.
            let malformed = sink.counts.malformed.load(Ordering::Relaxed);
            if malformed > 0 {
                report.errors.insert("push_malformed".into(), malformed);
            }
        }
        report
    });
    if let Some(server) = spawned {
        server.stop().await;
    }
    let report = result?;
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_json())
            .with_context(|| format!("write the JSON report to {}", path.display()))?;
    }
    phase.send_replace(Phase::Done);
    Ok(report)
}

/// The deliveries per send this mix implies, so a planner can turn sends
/// per second into deliveries per second before the run.
fn describe_fanout(args: &Args, users: usize) -> Option<String> {
    let specs = population::layout(args, users);
    if specs.is_empty() {
        return None;
    }
    let zipf = sampling::Zipf::new(users, args.zipf);
    let mut weight = vec![0.0; users];
    for (rank, user) in sampling::sender_order(users, args.seed)
        .into_iter()
        .enumerate()
    {
        weight[user] = zipf.probability(rank);
    }
    let (others, outside) = groups::mean_recipients(&specs, &weight);
    let f = args.group_fraction;
    let per_send = (1.0 - f) + f * ((1.0 - outside) * others + outside);
    Some(format!(
        "plan: {per_send:.2} deliveries per send expected: a group send reaches {others:.1} others \
         on average, weighted by sender activity"
    ))
}

async fn measure(
    args: &Args,
    plan: &Plan,
    target: &Target,
    server_cpu: Option<cpu::ServerCpu>,
    phase: &watch::Sender<Phase>,
    log: &impl Fn(&str),
) -> anyhow::Result<Report> {
    let connector = Arc::new(Connector::for_run(target, args, log)?);
    let population = population::set_up(args, plan, &connector, log).await?;
    let outcome = driver::drive(args, plan, population, connector.clone(), server_cpu, phase).await;
    Ok(report(args, plan, connector.endpoint_count(), &outcome))
}

/// An in-process server (`--spawn-server`) on a runtime of its own, as
/// it would run in a process of its own: on the load generator's runtime
/// (one worker by default) the server's work would queue behind the
/// clients' and the other way round, so the run would measure the sharing.
struct SpawnedServer {
    server: Option<chat_server::Server>,
    runtime: Option<tokio::runtime::Runtime>,
    threads: usize,
    data_dir: std::path::PathBuf,
    /// A fresh directory when `--data-dir` is not given, removed last.
    _temp: Option<tempfile::TempDir>,
}

impl SpawnedServer {
    /// Starts it on 127.0.0.1:0 with the embedded store, in `--data-dir` or
    /// a fresh temporary directory, notifying through `push_gateway_url`.
    async fn start(args: &Args, push_gateway_url: Option<String>) -> anyhow::Result<Self> {
        let (data_dir, temp) = match &args.data_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("chat-loadgen-")
                    .tempdir()
                    .context("create a temporary data directory")?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        let mut config = chat_server::Config {
            listen: ([127, 0, 0, 1], 0).into(),
            metrics_listen: ([127, 0, 0, 1], 0).into(),
            data_dir: data_dir.clone(),
            ..chat_server::Config::default()
        };
        // A capacity run offers Zipf-skewed load: its busiest virtual users
        // send far above any human rate, which the per-user limit would
        // (rightly) refuse, and set-up makes a large group's creator ask
        // every member to be friends at once. Measure the server, not the
        // limits.
        config.limits.send_rate = 0;
        config.limits.send_burst = 0;
        config.limits.control_rate = 0;
        config.limits.control_burst = 0;
        config.limits.mark_rate = 0;
        config.limits.mark_burst = 0;
        config.limits.typing_rate = 0;
        config.limits.typing_burst = 0;
        config.limits.uploads_per_hour = 0;
        config.push.push_gateway_url = push_gateway_url;
        // Room for every call the flags ask for: participants and media
        // beyond the defaults are the run's to set.
        config.calls.max_call_participants = config.calls.max_call_participants.max(args.call_size);
        config.calls.call_media_rate = 64 << 20;
        config.calls.call_media_node_rate = 1 << 40;
        // Set-up registers every user from this one address.
        config.limits.password_checks_per_address = 0;
        config.limits.registrations_per_address = 0;
        // As many workers as chat-server's own runtime would have.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(cpu::IN_PROCESS_SERVER_THREADS[0])
            .enable_all()
            .build()
            .context("start the in-process server's runtime")?;
        let start = runtime.spawn(chat_server::Server::start(config));
        // Owned before the wait, so a caller that gives up during the start
        // drops the runtime through `Drop` (in the background), not here.
        let mut spawned = Self {
            server: None,
            runtime: Some(runtime),
            threads,
            data_dir,
            _temp: temp,
        };
        match start.await {
            Ok(Ok(server)) => {
                spawned.server = Some(server);
                Ok(spawned)
            }
            Ok(Err(e)) => {
                spawned.stop().await;
                Err(anyhow::Error::new(e).context("start the in-process chat-server"))
            }
            Err(e) => {
                spawned.stop().await;
                Err(anyhow::Error::new(e).context("the in-process chat-server's start panicked"))
            }
        }
    }

    fn server(&self) -> &chat_server::Server {
        self.server.as_ref().expect("started")
    }

    /// Shuts the server down on its runtime, then the runtime (off the
    /// caller's: dropping a runtime blocks until its threads end).
    async fn stop(mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        if let Some(server) = self.server.take() {
            let _ = runtime.spawn(server.shutdown()).await;
        }
        let _ = tokio::task::spawn_blocking(move || drop(runtime)).await;
    }
}

impl Drop for SpawnedServer {
    /// A run dropped before [`SpawnedServer::stop`] (its caller timed out)
    /// must not block its runtime's thread on this one's.
    fn drop(&mut self) {
        drop(self.server.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn report(args: &Args, plan: &Plan, endpoints: usize, outcome: &Outcome) -> Report {
    let fin = &outcome.fin;
    let c = &fin.counts;
    let duration_s = args.duration.as_secs_f64();
    let cpu = &outcome.cpu;
    let server_cpu_pct = cpu.server.map(|d| cpu::percent_of_core(d, cpu.wall));
    let server_cpu_us_per_send = cpu
        .server
        .and_then(|d| cpu::micros_per_send(d, c.acked_in_window));
    Report {
        profile: plan.profile.name.to_string(),
        shard: plan.shard.to_string(),
        users: plan.users,
        connections: cpu.connected[0],
        connections_at_end: cpu.connected[1],
        endpoints,
        offered_rate: plan.offered_rate,
        seed: args.seed,
        duration_s,
        warmup_s: args.warmup.as_secs_f64(),
        sent: c.sent,
        group_sends: c.group_sends,
        photo_sends: c.photo_sends,
        photos_downloaded: c.photos_downloaded,
        typing_received: c.typing_received,
        reply_sends: c.reply_sends,
        reactions_acked: c.reactions_acked,
        reactions_received: c.reactions_received,
        notifications: 0,
        notified_devices: 0,
        acked: c.acked,
        delivered: c.delivered,
        deliveries: c.deliveries,
        lost: fin.lost,
        lost_deliveries: fin.lost_deliveries,
        duplicates: c.duplicates,
        duplicates_across_resume: c.duplicates_across_resume,
        misrouted: c.misrouted,
        receipts: c.receipts,
        errors: c.errors.clone(),
        acked_in_window: c.acked_in_window,
        acked_per_s: c.acked_in_window as f64 / duration_s,
        delivered_per_s: c.delivered_in_window as f64 / duration_s,
        deliveries_per_s: c.deliveries_in_window as f64 / duration_s,
        latency_ms: stats::Latencies {
            ack: stats::Percentiles::of(&fin.ack),
            deliver: stats::Percentiles::of(&fin.deliver),
            deliver_offline: stats::Percentiles::of(&fin.deliver_offline),
            receipt: stats::Percentiles::of(&fin.receipt),
            dispatch: stats::Percentiles::of(&fin.dispatch),
        },
        reconnects: c.reconnects,
        churn_offline: c.churn_offline,
        background_users: args.background_count(plan.users as usize) as u64,
        skipped_offline: c.skipped_offline,
        stale_messages: c.stale,
        server_cpu_pct,
        server_cpu_us_per_send,
        server_cpu_by_thread: cpu
            .server_threads
            .iter()
            .map(|(name, &d)| (name.clone(), cpu::percent_of_core(d, cpu.wall)))
            .collect(),
        loadgen_cpu_pct: cpu.own.map(|d| cpu::percent_of_core(d, cpu.wall)),
        udp_rcvbuf_drops: cpu.udp.map(|u| u.rcvbuf_errors),
        udp_datagrams_per_send: cpu
            .udp
            .filter(|_| c.acked_in_window > 0)
            .map(|u| u.out_datagrams as f64 / c.acked_in_window as f64),
        loadgen_threads: args.threads,
        backend_cpu: cpu
            .backends
            .iter()
            .map(|(name, &d)| {
                let b = stats::BackendCpu {
                    cpu_pct: cpu::percent_of_core(d, cpu.wall),
                    cpu_us_per_send: cpu::micros_per_send(d, c.acked_in_window),
                };
                (name.clone(), b)
            })
            .collect(),
        calls: None,
    }
}
