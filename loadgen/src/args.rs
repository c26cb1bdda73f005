//! The command line: every knob of a run with its documented default, and
//! the checks that turn flags into a [`Plan`] or a clear refusal.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::groups::MIN_GROUP_SIZE;
use crate::plan::{Plan, Profile, Shard};
use crate::sampling::TextDist;

/// The server's default text limit; longer texts are refused with
/// MESSAGE_TOO_LARGE, so sampled lengths are clamped to it.
pub const MAX_TEXT_BYTES: usize = 16 * 1024;

/// Longest `--duration`, `--warmup` or `--drain` taken: a year.
const MAX_PHASE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Drive a chat-server with real clients (real QUIC) on an open-loop
/// schedule and report throughput, latency percentiles and correctness.
///
/// Example, a one-command demo on an in-process server:
/// `chat-loadgen --spawn-server --users 200 --rate 2000 --duration 10s`
#[derive(Debug, Clone, Parser)]
#[command(name = "chat-loadgen", version)]
pub struct Args {
    /// Workload profile.
    #[arg(long, value_enum, default_value_t = ProfileName::Messenger)]
    pub profile: ProfileName,
    /// Virtual users in this process, each with its own QUIC connection.
    /// They are the first users of this process's shard.
    #[arg(long, default_value_t = 100)]
    pub users: u64,
    /// This process's slice of the profile's population, `i/n`: n processes
    /// with shards 0/n .. n-1/n use disjoint users.
    #[arg(long, default_value = "0/1")]
    pub shard: Shard,
    /// Sends per second this process offers. Default: the profile's
    /// per-user peak rate times --users (tiny; for stress use --rate).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Peak rate over the daily average.
    #[arg(long, default_value_t = 2.0)]
    pub peak_factor: f64,
    /// Friends per user (ring-lattice friend graph); each friendship is one
    /// 1-1 conversation that messages go to.
    #[arg(long, default_value_t = 5)]
    pub friends: usize,
    /// Fraction of sends that go to one of the sender's groups (the rest
    /// go to a 1-1 conversation). 0 creates no groups.
    #[arg(long, default_value_t = 0.2)]
    pub group_fraction: f64,
    /// Groups per virtual user. Group starts are spread evenly over the
    /// users and each group reaches at least to the next start, so every
    /// user is in a group while this is at least 1 / --group-max-size.
    #[arg(long, default_value_t = 0.35)]
    pub groups_per_user: f64,
    /// Largest group (the server's default limit is 250 members).
    #[arg(long, default_value_t = 250)]
    pub group_max_size: usize,
    /// Skew of group sizes: `size - 3` follows Zipf with this exponent, so
    /// most groups have 3-5 members and a few approach --group-max-size
    /// (2.5: 74% have 3 members, mean 3.9; with 1,000 users a group send
    /// reached 4.5 others on average).
    #[arg(long, default_value_t = 2.5)]
    pub group_size_exponent: f64,
    /// Message text length in bytes (the mean for --text-dist lognormal).
    #[arg(long, default_value_t = 128)]
    pub text_bytes: usize,
    /// Text length distribution.
    #[arg(long, value_enum, default_value_t = TextDist::Fixed)]
    pub text_dist: TextDist,
    /// Fraction of sends that are photos: the sender uploads one of
    /// --photo-bytes on a media stream, then sends it with the header as
    /// its caption, and every recipient downloads it. Latency counts from
    /// the intended send time, so it includes the upload.
    #[arg(long, default_value_t = 0.0)]
    pub photo_fraction: f64,
    /// Fraction of text sends the sender types first, as a person does: a
    /// `Client::typing` start just before the send, which the send then
    /// stops, so two Typing frames, each passed on to the recipients'
    /// connected devices (counted as `typing_received`).
    #[arg(long, default_value_t = 0.0)]
    pub typing_fraction: f64,
    /// Fraction of text sends that reply to the newest text or photo of
    /// the conversation the sender knows of (sent or received), as
    /// Messenger's swipe-to-reply does; a sender that knows none sends a
    /// plain text. Tracked like any text (`reply_sends`).
    #[arg(long, default_value_t = 0.0)]
    pub reply_fraction: f64,
    /// Fraction of the run's texts and photos each recipient reacts to (a
    /// 👍, on delivery; in a group each member draws on its own, and each
    /// reaction goes to every member): sends on top of the offered rate,
    /// counted apart (`reactions_acked`, `reactions_received`; a refusal
    /// is an error `reaction_<code>`), and not in the per-send figures'
    /// divisor, which counts the offered sends.
    #[arg(long, default_value_t = 0.0)]
    pub reaction_fraction: f64,
    /// Size of each photo (a phone's photo as messengers send it is
    /// ~100-300 KB once recompressed).
    #[arg(long, default_value_t = 150_000)]
    pub photo_bytes: usize,
    /// Notifications: every user registers a push token at set-up, and
    /// the server's notifications (for users whose app is in the
    /// background or who churned away) go to a stand-in push gateway in
    /// this process that counts them (`notifications` in the report).
    /// With --spawn-server the server is pointed at it; a running server
    /// must have been started with `--push-gateway-url
    /// http://ADDR/_matrix/push/v1/notify`, ADDR being --push-sink.
    #[arg(long)]
    pub push: bool,
    /// Where the stand-in push gateway listens (with --push; default
    /// 127.0.0.1 on any free port, which only --spawn-server can use).
    #[arg(long)]
    pub push_sink: Option<SocketAddr>,
    /// Activity skew: senders are chosen by Zipf with this exponent (0 =
    /// uniform) over the users in a seeded random order, so the busiest
    /// are not neighbours in the friend graph or the groups.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Fraction of users whose app is in the background (the least active
    /// senders): connected and receiving, but their apps go to the
    /// background as the run starts (they reconnect there after churn):
    /// no heartbeats, and the server counts none of their other traffic
    /// (delivery acks, marks, reconnects) as activity, so they show offline
    /// in presence once its window passes. The rest heartbeat at the
    /// interval the server announces at login.
    #[arg(long, default_value_t = 0.0)]
    pub background_fraction: f64,
    /// How often users whose app is in the foreground heartbeat. Default:
    /// the interval the server announces at login (its
    /// `heartbeat-interval`, 15 s by default); longer than the server's
    /// presence window shows them offline between heartbeats. At least 1s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// How long after a message arrives its recipient marks it seen.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub read_delay: Duration,
    /// Fraction of users per minute that go offline (their client leaves
    /// gracefully, as an app going away does) and come back after
    /// --offline-time by resuming with their token. The default, 1 % a
    /// minute, takes each user offline about 14 times a day; 0 keeps every
    /// user connected (the capacity targets are measured so).
    #[arg(long, default_value_t = 0.01)]
    pub churn: f64,
    /// How long a churned user stays offline.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub offline_time: Duration,
    /// Measured window, e.g. 15s or 2m.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Load before the measured window that is not counted.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Longest wait after the window (or after the last user churn took
    /// away came back, if later) for acks, deliveries and receipts; the
    /// run ends sooner when everything has arrived, after listening a
    /// second more (or the drain, if shorter) for copies that come late.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// Seed of the send schedule, sender choice and text lengths.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// UDP sockets (quinn endpoints) the connections are spread over.
    #[arg(long, default_value_t = 4)]
    pub endpoints: usize,
    /// Kernel receive buffer asked for on each client UDP socket, in bytes
    /// (0: the kernel default, ~208 KiB on Linux, which overflows under
    /// bursts of a few hundred connections per socket: dropped datagrams
    /// become QUIC losses and latency the server did not cause). Capped by
    /// net.core.rmem_max, with a warning.
    #[arg(long, default_value_t = 4 << 20)]
    pub socket_receive_buffer: usize,
    /// Tokio worker threads (1 suits a run pinned to one core).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Registrations / logins / friend requests in flight during set-up.
    #[arg(long, default_value_t = 32)]
    pub setup_concurrency: usize,
    /// Sends one client may have waiting for their ack; beyond it sends
    /// fail with outbox_full.
    #[arg(long, default_value_t = 1_000)]
    pub outbox: usize,
    /// Longest a client holds a delivery ack for the next send to carry
    /// (the client library's `delivery_ack_linger`; its default is 20ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub delivery_ack_linger: Option<Duration>,
    /// Server UDP address (IP:port; no name lookup).
    #[arg(long, conflicts_with = "spawn_server", requires = "ca")]
    pub server: Option<SocketAddr>,
    /// PEM file of the CA the server's certificate chains to.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Name the server certificate must be valid for.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Start an in-process chat-server on 127.0.0.1 (embedded store, fresh
    /// temporary data directory unless --data-dir, a runtime of its own
    /// whose threads the report counts as the server's CPU) and drive it.
    #[arg(long, required_unless_present = "server")]
    pub spawn_server: bool,
    /// Data directory for --spawn-server (kept, so --reuse works across
    /// runs).
    #[arg(long, requires = "spawn_server")]
    pub data_dir: Option<PathBuf>,
    /// Server process id, for server CPU from /proc/PID/stat.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// A backing service whose CPU to report beside the server's, as
    /// `NAME=COMMAND`: every process whose command name (`/proc/PID/comm`)
    /// is COMMAND is summed, so `postgres=postgres` counts every Postgres
    /// backend and worker and `redis=redis-server` Redis. Repeatable. Only
    /// meaningful on a machine where those processes serve this run alone.
    #[arg(long = "backend", value_name = "NAME=COMMAND", value_parser = parse_backend)]
    pub backends: Vec<Backend>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Users, tokens and conversations: saved here after set-up, and
    /// resumed from here (no registration) when the file exists.
    #[arg(long)]
    pub reuse: Option<PathBuf>,
    /// User name prefix (default: "lg" and 6 random hex digits, so runs on
    /// one server do not collide).
    #[arg(long)]
    pub name_prefix: Option<String>,
    /// No plan, set-up or progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Group-call media instead of messages: this many calls, each of
    /// --call-size users registered for it, sending media datagrams for
    /// the window (0: the message workload).
    #[arg(long, default_value_t = 0)]
    pub calls: usize,
    /// Participants per call: 2 calls a friend in a direct conversation,
    /// more make a group.
    #[arg(long, default_value_t = 4)]
    pub call_size: usize,
    /// Media datagrams each participant sends per second (50: one per
    /// 20 ms audio frame).
    #[arg(long, default_value_t = 50)]
    pub call_packets: u32,
    /// Bytes of each media datagram (12-1100; 1000 is a video packet,
    /// 100-200 an audio one).
    #[arg(long, default_value_t = 1000)]
    pub call_packet_bytes: usize,
}

/// A backing service measured by command name (`--backend`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Its name in the report.
    pub name: String,
    /// The command name its processes run under.
    pub command: String,
}

/// Parses `NAME=COMMAND` for `--backend`.
fn parse_backend(s: &str) -> Result<Backend, String> {
    let (name, command) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=COMMAND, got {s:?}"))?;
    if name.is_empty() || command.is_empty() {
        return Err(format!("expected NAME=COMMAND, got {s:?}"));
    }
    // The kernel keeps 15 bytes of a command name.
    if command.len() > 15 {
        return Err(format!(
            "{command:?}: the kernel keeps only the first 15 bytes of a command name"
        ));
    }
    Ok(Backend {
        name: name.to_string(),
        command: command.to_string(),
    })
}

/// Workload profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileName {
    /// 300 million users, 10 billion sends a day.
    Messenger,
}

impl ProfileName {
    /// The profile's numbers.
    pub fn profile(self) -> Profile {
        match self {
            ProfileName::Messenger => Profile::MESSENGER,
        }
    }
}

impl Args {
    /// Parses a command line (first item: the program name), for tests and
    /// tools that drive the load generator as a library.
    pub fn try_parse_from_iter<I, T>(args: I) -> anyhow::Result<Args>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Ok(Args::try_parse_from(args)?)
    }

    /// Checks what clap cannot and derives the plan.
    pub fn plan(&self) -> anyhow::Result<Plan> {
        if !(self.group_fraction.is_finite() && (0.0..=1.0).contains(&self.group_fraction)) {
            anyhow::bail!(
                "--group-fraction {} must be a fraction of sends in 0..=1",
                self.group_fraction
            );
        }
        if !(self.groups_per_user.is_finite() && (0.0..=1.0).contains(&self.groups_per_user)) {
            anyhow::bail!(
                "--groups-per-user {} must be in 0..=1 (each group needs its own creator)",
                self.groups_per_user
            );
        }
        if self.group_fraction > 0.0 && self.groups_per_user == 0.0 {
            anyhow::bail!(
                "--group-fraction {} needs --groups-per-user above 0",
                self.group_fraction
            );
        }
        let mut names = HashSet::new();
        if let Some(twice) = self.backends.iter().find(|b| !names.insert(&b.name)) {
            anyhow::bail!("--backend {}: the name is given twice", twice.name);
        }
        if self.group_max_size < MIN_GROUP_SIZE {
            anyhow::bail!(
                "--group-max-size {} must be at least {MIN_GROUP_SIZE} (two members are a 1-1 conversation)",
                self.group_max_size
            );
        }
        if !(self.group_size_exponent.is_finite() && self.group_size_exponent >= 0.0) {
            anyhow::bail!(
                "--group-size-exponent {} must be a non-negative number",
                self.group_size_exponent
            );
        }
        if !(self.background_fraction.is_finite()
            && (0.0..=1.0).contains(&self.background_fraction))
        {
            anyhow::bail!(
                "--background-fraction {} must be a fraction of users in 0..=1",
                self.background_fraction
            );
        }
        if self.push_sink.is_some() && !self.push {
            anyhow::bail!("--push-sink is the address of --push's gateway: add --push");
        }
        if self.push && !self.spawn_server && self.push_sink.is_none_or(|a| a.port() == 0) {
            anyhow::bail!(
                "--push against a running server needs --push-sink with a port (the server \
                 must have been started with --push-gateway-url http://that-address/_matrix/push/v1/notify)"
            );
        }
        if !(self.photo_fraction.is_finite() && (0.0..=1.0).contains(&self.photo_fraction)) {
            anyhow::bail!(
                "--photo-fraction {} must be a fraction of sends in 0..=1",
                self.photo_fraction
            );
        }
        for (flag, fraction) in [
            ("--typing-fraction", self.typing_fraction),
            ("--reply-fraction", self.reply_fraction),
            ("--reaction-fraction", self.reaction_fraction),
        ] {
            if !(fraction.is_finite() && (0.0..=1.0).contains(&fraction)) {
                anyhow::bail!("{flag} {fraction} must be a fraction in 0..=1");
            }
        }
        let most = chat_protocol::media::DEFAULT_MAX_PHOTO_BYTES;
        if !(16..=most as usize).contains(&self.photo_bytes) {
            anyhow::bail!(
                "--photo-bytes {} must be 16-{most} (the server's default max-photo-bytes)",
                self.photo_bytes
            );
        }
        if self.users < 2 {
            anyhow::bail!("--users must be at least 2: every message needs a friend to go to");
        }
        if self.friends == 0 {
            anyhow::bail!("--friends must be at least 1: every message needs a friend to go to");
        }
        if self.friends == 1 && self.users % 2 == 1 {
            // One friend each pairs the users up; with an odd count nobody
            // has one, and every 1-1 send would be dropped unscheduled.
            anyhow::bail!(
                "--friends 1 pairs users up: --users {} must be even",
                self.users
            );
        }
        if !(self.zipf.is_finite() && self.zipf >= 0.0) {
            anyhow::bail!("--zipf {} must be a non-negative number", self.zipf);
        }
        let min_heartbeat = chat_protocol::limits::MIN_HEARTBEAT_INTERVAL;
        if let Some(interval) = self.heartbeat_interval.filter(|&i| i < min_heartbeat) {
            anyhow::bail!(
                "--heartbeat-interval {} must be at least {} (client-lib heartbeats no more often)",
                humantime::format_duration(interval),
                humantime::format_duration(min_heartbeat)
            );
        }
        if !(self.churn.is_finite() && (0.0..=1.0).contains(&self.churn)) {
            anyhow::bail!(
                "--churn {} must be a fraction of users per minute in 0..=1",
                self.churn
            );
        }
        if self.text_bytes == 0 || self.text_bytes > MAX_TEXT_BYTES {
            anyhow::bail!(
                "--text-bytes {} must be in 1..={MAX_TEXT_BYTES} (the server's default text limit)",
                self.text_bytes
            );
        }
        if self.duration.is_zero() {
            anyhow::bail!("--duration must be more than 0s");
        }
        // The schedule counts nanoseconds in a u64 (584 years).
        for (flag, value) in [
            ("--duration", self.duration),
            ("--warmup", self.warmup),
            ("--drain", self.drain),
        ] {
            if value > MAX_PHASE {
                anyhow::bail!(
                    "{flag} {} is longer than {}",
                    humantime::format_duration(value),
                    humantime::format_duration(MAX_PHASE)
                );
            }
        }
        if self.spawn_server && self.reuse.is_some() && self.data_dir.is_none() {
            // Its tokens would name sessions of a server whose data is gone
            // when the run ends.
            anyhow::bail!("--reuse with --spawn-server needs --data-dir, kept for the next run");
        }
        if self.endpoints == 0 || self.threads == 0 || self.setup_concurrency == 0 {
            anyhow::bail!("--endpoints, --threads and --setup-concurrency must be at least 1");
        }
        if self.outbox == 0 {
            anyhow::bail!("--outbox must be at least 1");
        }
        if self.calls > 0 {
            if !(2..=64).contains(&self.call_size) {
                anyhow::bail!("--call-size must be 2 to 64");
            }
            if !(1..=1000).contains(&self.call_packets) {
                anyhow::bail!("--call-packets must be 1 to 1000 a second");
            }
            if !(12..=1100).contains(&self.call_packet_bytes) {
                anyhow::bail!("--call-packet-bytes must be 12 to 1100 (one datagram)");
            }
            if self.reuse.is_some() {
                anyhow::bail!("--calls registers its own users: no --reuse");
            }
        }
        if let Some(prefix) = &self.name_prefix {
            check_prefix(prefix)?;
        }
        Plan::new(
            self.profile.profile(),
            self.peak_factor,
            self.shard,
            self.users,
            self.rate,
        )
        .map_err(anyhow::Error::msg)
    }

    /// Users whose app is in the background (`--background-fraction` of
    /// `users`, rounded).
    pub fn background_count(&self, users: usize) -> usize {
        (users as f64 * self.background_fraction).round() as usize
    }

    /// Groups `users` virtual users form: none without group sends, else
    /// `--groups-per-user` of them (at least one).
    pub fn group_count(&self, users: usize) -> usize {
        if self.group_fraction == 0.0 {
            return 0;
        }
        ((users as f64 * self.groups_per_user).ceil() as usize).clamp(1, users)
    }

    /// The group part of the plan printed at start.
    pub fn describe_groups(&self, users: usize) -> String {
        let count = self.group_count(users);
        if count == 0 {
            return "plan: 1-1 sends only (--group-fraction 0)".into();
        }
        let max = self.group_max_size.min(users);
        if max < MIN_GROUP_SIZE {
            return format!("plan: 1-1 sends only: groups need at least {MIN_GROUP_SIZE} users");
        }
        format!(
            "plan: {:.0}% of sends to groups: {count} groups of 3..={max} members \
             (size - 3 ~ Zipf {}, mean {:.1} before the spread rule), every member a friend of the creator",
            100.0 * self.group_fraction,
            self.group_size_exponent,
            crate::groups::mean_size(max, self.group_size_exponent),
        )
    }
}

/// Longest prefix that leaves room for "-" and a nine-digit population
/// index within the server's 32-character user names.
const MAX_PREFIX_LEN: usize = 22;

/// User names are `{prefix}-{population index}`; the server allows 3-32
/// characters of a-z, 0-9, '_', '.', '-'.
pub fn check_prefix(prefix: &str) -> anyhow::Result<()> {
    let ok_chars = prefix
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'));
    if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN || !ok_chars {
        anyhow::bail!(
            "--name-prefix {prefix:?} must be 1-{MAX_PREFIX_LEN} characters of a-z, 0-9, '_', '.', '-'"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> anyhow::Result<Args> {
        let mut argv = vec!["chat-loadgen"];
        argv.extend_from_slice(extra);
        Args::try_parse_from_iter(argv)
    }

    #[test]
    fn defaults() {
        let args = parse(&["--spawn-server"]).unwrap();
        assert_eq!(args.users, 100);
        assert_eq!(args.shard, Shard::ALL);
        assert_eq!(args.friends, 5);
        assert_eq!(args.text_bytes, 128);
        assert_eq!(args.read_delay, Duration::from_secs(2));
        assert_eq!(args.churn, 0.01);
        assert_eq!(args.offline_time, Duration::from_secs(5));
        assert_eq!(args.warmup, Duration::from_secs(2));
        assert_eq!(args.drain, Duration::from_secs(5));
        assert_eq!(args.endpoints, 4);
        assert_eq!(args.socket_receive_buffer, 4 << 20);
        assert_eq!(args.threads, 1);
        assert_eq!(args.group_fraction, 0.2);
        assert_eq!(args.group_max_size, 250);
        assert_eq!(args.group_count(1_000), 350);
        assert!(
            args.describe_groups(1_000)
                .contains("350 groups of 3..=250")
        );
        assert!(args.describe_groups(2).contains("1-1 sends only"));
        let none = parse(&["--spawn-server", "--group-fraction", "0"]).unwrap();
        assert_eq!(none.group_count(1_000), 0);
        let plan = args.plan().unwrap();
        assert!(!plan.rate_overridden);
    }

    #[test]
    fn backends_are_named_commands() {
        let args = parse(&[
            "--spawn-server",
            "--backend",
            "postgres=postgres",
            "--backend",
            "redis=redis-server",
        ])
        .unwrap();
        assert_eq!(
            args.backends,
            [
                Backend {
                    name: "postgres".into(),
                    command: "postgres".into()
                },
                Backend {
                    name: "redis".into(),
                    command: "redis-server".into()
                }
            ]
        );
        assert!(parse(&["--spawn-server"]).unwrap().backends.is_empty());
        for bad in [
            "postgres",
            "=postgres",
            "pg=",
            "pg=a-very-long-command-name",
        ] {
            let err = parse(&["--spawn-server", "--backend", bad])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("COMMAND") || err.contains("15 bytes"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn target_is_required_and_exclusive() {
        assert!(parse(&[]).is_err());
        assert!(
            parse(&["--server", "127.0.0.1:4433"]).is_err(),
            "needs --ca"
        );
        assert!(parse(&["--server", "127.0.0.1:4433", "--ca", "ca.pem"]).is_ok());
        assert!(parse(&["--server", "127.0.0.1:4433", "--ca", "c", "--spawn-server"]).is_err());
        assert!(parse(&["--server", "example.com:4433", "--ca", "c"]).is_err());
    }

    #[test]
    fn unimplemented_and_bad_settings_are_refused_clearly() {
        let err = parse(&["--spawn-server", "--photo-fraction", "1.2"])
            .unwrap()
            .plan()
            .unwrap_err()
            .to_string();
        assert!(err.contains("photo"), "{err}");
        let err = parse(&["--spawn-server", "--photo-bytes", "4"])
            .unwrap()
            .plan()
            .unwrap_err()
            .to_string();
        assert!(err.contains("photo-bytes"), "{err}");
        assert!(
            parse(&["--spawn-server", "--photo-fraction", "0.2"])
                .unwrap()
                .plan()
                .is_ok()
        );
        for bad in [
            &["--users", "1"][..],
            &["--friends", "0"],
            &["--friends", "1", "--users", "101"],
            &["--zipf=-1"],
            &["--churn", "2"],
            &["--heartbeat-interval", "500ms"],
            &["--text-bytes", "100000"],
            &["--duration", "0s"],
            &["--duration", "600years"],
            &["--drain", "2years"],
            &["--reuse", "users.json"],
            &["--name-prefix", "Bad Name"],
            &["--group-fraction", "1.5"],
            &["--groups-per-user", "0"],
            &["--groups-per-user", "2"],
            &["--group-max-size", "2"],
            &["--group-size-exponent=-1"],
            &["--background-fraction", "1.1"],
            &["--typing-fraction", "2"],
            &["--reply-fraction=-0.1"],
            &["--reaction-fraction", "NaN"],
            &["--backend", "db=postgres", "--backend", "db=redis-server"],
        ] {
            let mut argv = vec!["--spawn-server"];
            argv.extend_from_slice(bad);
            assert!(parse(&argv).unwrap().plan().is_err(), "{bad:?}");
        }
    }
}
