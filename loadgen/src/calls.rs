//! `--calls N`: group-call media instead of messages. N calls of
//! `--call-size` participants (friends of the first; a group above two),
//! each participant sending `--call-packets` datagrams a second of
//! `--call-packet-bytes` on an open-loop schedule (a stalled server or load
//! generator shows as latency, not as a lower rate). Every datagram carries
//! its intended send time; every receiver measures intended send to
//! arrival. Reports what was sent and received (media is unreliable: loss
//! is a figure, not an error), the latency, and the server's CPU per
//! forwarded datagram.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::{BufMut, Bytes, BytesMut};
use chat_client::{CallMedia, Client};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::cpu;
use crate::population::{Connector, PASSWORD, Target, bounded, retry};
use crate::stats::{Percentiles, Report};
use crate::{Args, Phase};

/// Bytes of a packet's header: intended send time (ns after the run's
/// base) and the sender's index.
const HEADER: usize = 12;

/// How long after the window datagrams still in flight are waited for.
const CALLS_DRAIN: Duration = Duration::from_millis(500);

/// What a calls run measured (`Report::calls`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallsReport {
    /// Calls.
    pub calls: usize,
    /// Participants in each.
    pub call_size: usize,
    /// Datagrams each participant sends per second.
    pub packets_per_s: u32,
    /// Bytes of each.
    pub packet_bytes: usize,
    /// Datagrams handed to the connection in the window.
    pub sent: u64,
    /// Datagrams `send_call_media` refused.
    pub send_errors: u64,
    /// Arrivals those should make: each one at every other participant.
    pub expected: u64,
    /// Arrivals of datagrams sent in the window.
    pub received: u64,
    /// `1 - received / expected`, percent.
    pub loss_pct: f64,
    /// Arrivals per second of the window: what the server forwarded.
    pub forwarded_per_s: f64,
    /// Intended send to arrival, ms.
    pub latency_ms: Percentiles,
    /// Server CPU microseconds per arrival (`--server-pid`, or the
    /// in-process server's threads).
    pub server_cpu_us_per_forward: Option<f64>,
}

impl CallsReport {
    /// The human-readable table.
    pub fn table(&self, report: &Report) -> String {
        let l = &self.latency_ms;
        let mut t = format!(
            "chat-loadgen: {} calls of {} participants over {} UDP sockets, {} datagrams/s of {} bytes each\n\
             window {:.1}s: sent {} (send errors {}), arrivals {} of {} expected ({:.3} % lost), {:.0} forwarded/s\n\
             intended send to arrival, ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n",
            self.calls,
            self.call_size,
            report.endpoints,
            self.packets_per_s,
            self.packet_bytes,
            report.duration_s,
            self.sent,
            self.send_errors,
            self.received,
            self.expected,
            self.loss_pct,
            self.forwarded_per_s,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
        );
        if let (Some(pct), Some(us)) = (report.server_cpu_pct, self.server_cpu_us_per_forward) {
            t.push_str(&format!(
                "server CPU {pct:.1} % of a core, {us:.2} µs per forwarded datagram\n"
            ));
        }
        if let Some(pct) = report.loadgen_cpu_pct {
            t.push_str(&format!("load generator CPU {pct:.1} % of a core\n"));
        }
        t
    }
}

/// One participant: its client and its media.
struct Seat {
    client: Client,
    media: CallMedia,
}

/// Runs the calls workload against `target` (see the module docs).
pub async fn run(
    args: &Args,
    target: &Target,
    server_cpu: Option<cpu::ServerCpu>,
    phase: &tokio::sync::watch::Sender<Phase>,
    log: &impl Fn(&str),
) -> anyhow::Result<Report> {
    let (calls, size) = (args.calls, args.call_size);
    let users = calls * size;
    log(&format!(
        "plan: {calls} calls of {size} participants ({users} users), each sending {} datagrams/s of {} bytes: {:.0} datagrams/s in, {:.0} forwarded/s",
        args.call_packets,
        args.call_packet_bytes,
        (users as f64) * f64::from(args.call_packets),
        (users * (size - 1)) as f64 * f64::from(args.call_packets),
    ));
    let connector = Arc::new(Connector::for_run(target, args, log)?);
    let prefix = match &args.name_prefix {
        Some(prefix) => prefix.clone(),
        None => format!("lc{:06x}", rand::random::<u32>() & 0xff_ffff),
    };
    let started = std::time::Instant::now();
    let seats = bounded(users, args.setup_concurrency, |k| {
        let mut config = connector.config(k);
        config.calls = true;
        let username = format!("{prefix}-{k}");
        async move {
            let (client, mut events) =
                retry(|| Client::register(config.clone(), &username, PASSWORD))
                    .await
                    .with_context(|| format!("register {username}"))?;
            // Rings and call events are not measured: drained.
            tokio::spawn(async move { while events.next().await.is_some() {} });
            let media = client.call_media().context("calls are on")?;
            Ok(Seat { client, media })
        }
    })
    .await?;
    let seats = Arc::new(seats);
    let call_ids = bounded(calls, args.setup_concurrency, |c| {
        let seats = seats.clone();
        async move { start_call(&seats[c * size..(c + 1) * size]).await }
    })
    .await?;
    log(&format!(
        "set-up: {users} users in {calls} calls in {:.1}s",
        started.elapsed().as_secs_f64()
    ));

    // The schedule: every participant sends from `begin`, its first
    // datagram at a random phase of its period; the window is measured.
    let period = Duration::from_secs(1) / args.call_packets.max(1);
    let base = Instant::now();
    let begin = base + Duration::from_millis(200);
    let window_start = begin + args.warmup;
    let window_end = window_start + args.duration;
    let ns = |at: Instant| at.saturating_duration_since(base).as_nanos() as u64;
    let window = (ns(window_start), ns(window_end));
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let seats = Arc::into_inner(seats).context("set-up tasks still hold the seats")?;
    for (k, seat) in seats.into_iter().enumerate() {
        let Seat { client, media } = seat;
        let offset = period.mul_f64(rand::random::<f64>());
        senders.push(tokio::spawn(send_media(
            client.clone(),
            (k as u32, args.call_packet_bytes),
            (base, begin + offset, period, window),
            counts.clone(),
        )));
        receivers.push(tokio::spawn(receive_media(
            media,
            base,
            window,
            stop.clone(),
            counts.clone(),
        )));
        drop(client);
    }

    let ticks = cpu::clock_ticks_per_second();
    let own_pid = std::process::id();
    // The in-process server's CPU is summed per thread, from each thread's
    // own difference: one that ends in the window (a set-up hasher) must
    // not take its whole life's CPU out of the sum.
    let sample = || {
        let (server, threads) = match server_cpu {
            Some(cpu::ServerCpu::Process(pid)) => (cpu::process_cpu(pid, ticks), None),
            Some(cpu::ServerCpu::InProcess) => (
                None,
                cpu::threads_cpu(own_pid, ticks).map(cpu::in_process_server),
            ),
            None => (None, None),
        };
        (
            Instant::now(),
            server,
            threads,
            cpu::process_cpu(own_pid, ticks),
        )
    };
    tokio::time::sleep_until(window_start).await;
    let (t0, server0, threads0, own0) = sample();
    phase.send_replace(Phase::Measuring);
    tokio::time::sleep_until(window_end).await;
    let (t1, server1, threads1, own1) = sample();
    phase.send_replace(Phase::Draining);
    // The senders end with the window (each has sent what it counted),
    // then what is in flight gets the drain to arrive, then the receivers
    // stop.
    let mut clients = Vec::new();
    for sender in senders {
        clients.push(sender.await.context("a sender panicked")?);
    }
    tokio::time::sleep(CALLS_DRAIN).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency = crate::stats::histogram();
    for receiver in receivers {
        // Each looks at `stop` at least every 100 ms.
        let h = receiver.await.context("a receiver panicked")?;
        latency.add(&h).context("merge latency histograms")?;
    }
    for (c, call_id) in call_ids.iter().enumerate() {
        for client in &clients[c * size..(c + 1) * size] {
            let _ = client.leave_call(*call_id).await;
        }
    }
    for client in &clients {
        client.close();
    }
    connector.wait_idle().await;

    let wall = t1 - t0;
    let diff = |a: Option<Duration>, b: Option<Duration>| Some(b?.saturating_sub(a?));
    let server = match (threads0, threads1) {
        (Some(a), Some(b)) => Some(cpu::threads_diff(&a, &b).values().sum()),
        _ => diff(server0, server1),
    };
    let own = diff(own0, own1);
    let own = match (server_cpu, own, server) {
        // The in-process server's threads are this process's too.
        (Some(cpu::ServerCpu::InProcess), Some(own), Some(server)) => {
            Some(own.saturating_sub(server))
        }
        (_, own, _) => own,
    };
    let sent = counts.sent.load(Ordering::Relaxed);
    let received = counts.received.load(Ordering::Relaxed);
    let expected = sent * (size as u64 - 1);
    let calls_report = CallsReport {
        calls,
        call_size: size,
        packets_per_s: args.call_packets,
        packet_bytes: args.call_packet_bytes,
        sent,
        send_errors: counts.send_errors.load(Ordering::Relaxed),
        expected,
        received,
        loss_pct: if expected == 0 {
            0.0
        } else {
            100.0 * (1.0 - received as f64 / expected as f64)
        },
        forwarded_per_s: received as f64 / args.duration.as_secs_f64(),
        latency_ms: Percentiles::of(&latency),
        server_cpu_us_per_forward: server
            .filter(|_| received > 0)
            .map(|cpu| cpu.as_secs_f64() * 1e6 / received as f64),
    };
    let mut errors = BTreeMap::new();
    if calls_report.send_errors > 0 {
        errors.insert("call_media_refused".into(), calls_report.send_errors);
    }
    Ok(Report {
        profile: "calls".into(),
        shard: "1/1".into(),
        users: users as u64,
        connections: users as u64,
        connections_at_end: users as u64,
        endpoints: connector.endpoint_count(),
        offered_rate: (users as f64) * f64::from(args.call_packets),
        seed: args.seed,
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        errors,
        server_cpu_pct: server.map(|cpu| cpu::percent_of_core(cpu, wall)),
        loadgen_cpu_pct: own.map(|cpu| cpu::percent_of_core(cpu, wall)),
        loadgen_threads: args.threads,
        calls: Some(calls_report),
        ..Report::default()
    })
}

/// Makes the first of `members` friends with the others, starts a call in
/// their conversation (direct for two, a group above) and has the others
/// join it. Returns the call's id.
async fn start_call(members: &[Seat]) -> anyhow::Result<u64> {
    let host = &members[0].client;
    let host_id = host.identity().user_id;
    for other in &members[1..] {
        let name = other.client.identity().username;
        retry(|| host.send_friend_request(&name))
            .await
            .context("friend request")?;
        retry(|| other.client.accept_friend(host_id))
            .await
            .context("accept")?;
    }
    let conversation = match members {
        [_, other] => {
            retry(|| host.open_direct(other.client.identity().user_id))
                .await
                .context("open a direct conversation")?
                .conversation_id
        }
        _ => {
            let ids: Vec<u64> = members[1..]
                .iter()
                .map(|m| m.client.identity().user_id)
                .collect();
            retry(|| host.create_group("call", &ids))
                .await
                .context("create a group")?
                .conversation_id
        }
    };
    let call = retry(|| host.start_call(conversation, true))
        .await
        .context("start a call")?;
    for other in &members[1..] {
        retry(|| other.client.join_call(call.call_id))
            .await
            .context("join the call")?;
    }
    Ok(call.call_id)
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    send_errors: AtomicU64,
    received: AtomicU64,
}

/// Sends one participant's media on its schedule until the window ends;
/// returns its client.
async fn send_media(
    client: Client,
    (index, bytes): (u32, usize),
    (base, first, period, window): (Instant, Instant, Duration, (u64, u64)),
    counts: Arc<Counts>,
) -> Client {
    let mut tick = tokio::time::interval_at(first, period);
    // Open loop: a late tick is sent at once, still stamped with the time
    // it was meant for.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut k: u32 = 0;
    loop {
        tick.tick().await;
        let intended = first + period * k;
        k = k.wrapping_add(1);
        let at = intended.saturating_duration_since(base).as_nanos() as u64;
        if at >= window.1 {
            // Past the window: nothing more is counted.
            break;
        }
        let mut packet = BytesMut::with_capacity(bytes);
        packet.put_u64(at);
        packet.put_u32(index);
        packet.resize(bytes.max(HEADER), 0);
        let counted = at >= window.0;
        match client.send_call_media(packet.freeze()) {
            Ok(()) if counted => {
                counts.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) if counted => {
                counts.send_errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    client
}

/// Receives one participant's media until `stop`; returns the latencies
/// of the window's datagrams, µs.
async fn receive_media(
    mut media: CallMedia,
    base: Instant,
    window: (u64, u64),
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) -> Histogram<u64> {
    let mut latency = crate::stats::histogram();
    while !stop.load(Ordering::Relaxed) {
        let Ok(Some(packet)) = tokio::time::timeout(Duration::from_millis(100), media.next()).await
        else {
            continue;
        };
        let Some(at) = intended_ns(&packet.payload) else {
            continue;
        };
        if at < window.0 || at >= window.1 {
            continue;
        }
        counts.received.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now().saturating_duration_since(base).as_nanos() as u64;
        let _ = latency.record(now.saturating_sub(at).div_ceil(1000).max(1));
    }
    latency
}

/// The intended send time a packet carries.
fn intended_ns(payload: &Bytes) -> Option<u64> {
    let header: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(header))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_carry_their_intended_time() {
        let mut packet = BytesMut::new();
        packet.put_u64(123_456_789);
        packet.put_u32(7);
        packet.resize(100, 0);
        assert_eq!(intended_ns(&packet.freeze()), Some(123_456_789));
        assert_eq!(intended_ns(&Bytes::from_static(b"short")), None);
    }
}
