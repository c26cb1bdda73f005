//! The load generator end to end: a short run against an in-process server
//! must account for every message, produce every report field, and resume
//! its users from a `--reuse` file; and a run against a server process that
//! is frozen for a second must show the freeze as latency, which proves
//! latency is counted from the intended send time (open loop).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use chat_loadgen::{Args, Phase, Report, serde_json};

use crate::harness::{Backend, ChildServer, TestServer, WAIT, init_tracing, scrape, value};

/// Every key the JSON report promises, by path.
const REPORT_KEYS: &[&str] = &[
    "profile",
    "users",
    "connections",
    "connections_at_end",
    "offered_rate",
    "duration_s",
    "sent",
    "group_sends",
    "photo_sends",
    "photos_downloaded",
    "typing_received",
    "reply_sends",
    "reactions_acked",
    "reactions_received",
    "notifications",
    "notified_devices",
    "acked",
    "delivered",
    "deliveries",
    "lost",
    "lost_deliveries",
    "duplicates",
    "errors",
    "acked_per_s",
    "delivered_per_s",
    "latency_ms",
    "reconnects",
    "server_cpu_pct",
    "server_cpu_us_per_send",
    "server_cpu_by_thread",
    "udp_rcvbuf_drops",
    "udp_datagrams_per_send",
    "backend_cpu",
];

/// No churn unless a test asks for it: a user taken offline would skip
/// sends and change what a test counts.
fn args(extra: &[&str]) -> Args {
    let mut argv = vec!["chat-loadgen", "--quiet"];
    if !extra.contains(&"--churn") {
        argv.extend_from_slice(&["--churn", "0"]);
    }
    argv.extend_from_slice(extra);
    Args::try_parse_from_iter(argv).expect("valid loadgen flags")
}

/// Flags for a short run against an in-process server: a long drain
/// bound (the run ends as soon as everything arrived) and a short reading
/// delay, so receipts come back quickly.
fn spawned(extra: &[&str]) -> Args {
    let mut argv = vec!["--spawn-server", "--drain", "30s", "--read-delay", "100ms"];
    argv.extend_from_slice(extra);
    args(&argv)
}

/// Twelve users with two friends each.
const TWELVE_USERS: &[&str] = &["--users", "12", "--friends", "2"];

/// Two measured seconds at 30 sends/s after a short warm-up.
const TWO_SECONDS_AT_30: &[&str] = &["--rate", "30", "--duration", "2s", "--warmup", "300ms"];

/// One group of all 40 users (each with 2 friends besides), half the
/// sends to it.
const ONE_GROUP_OF_40: &[&str] = &[
    "--users",
    "40",
    "--friends",
    "2",
    "--group-fraction",
    "0.5",
    "--groups-per-user",
    "0.025",
    "--group-max-size",
    "40",
];

/// A whole run, bounded so a hang fails the test instead of the suite.
async fn run(args: Args) -> Report {
    tokio::time::timeout(Duration::from_secs(120), chat_loadgen::run(args))
        .await
        .expect("the load generator stops by itself")
        .expect("the run succeeds")
}

/// A run in a task of its own, for tests that act while it goes: its
/// phases are watched.
struct Phased {
    run: tokio::task::JoinHandle<anyhow::Result<Report>>,
    phases: tokio::sync::watch::Receiver<Phase>,
}

impl Phased {
    fn start(args: Args) -> Phased {
        let (phase_tx, phases) = tokio::sync::watch::channel(Phase::SettingUp);
        let run = tokio::spawn(chat_loadgen::run_with_phases(args, phase_tx));
        Phased { run, phases }
    }

    /// Waits (boundedly) until the run reaches `phase`.
    async fn until(&mut self, phase: Phase, what: &str) {
        tokio::time::timeout(WAIT * 2, self.phases.wait_for(|p| *p == phase))
            .await
            .unwrap_or_else(|_| panic!("{what} in time"))
            .expect("the run is alive");
    }

    /// The run's report, bounded so a hang fails the test.
    async fn report(self) -> Report {
        tokio::time::timeout(Duration::from_secs(120), self.run)
            .await
            .expect("the load generator stops by itself")
            .expect("the run task completes")
            .expect("the run succeeds")
    }
}

fn assert_all_accounted(report: &Report) {
    assert!(report.sent > 0, "{report:?}");
    assert_eq!(report.acked, report.sent, "{report:?}");
    assert_eq!(report.delivered, report.sent, "{report:?}");
    assert_eq!(report.lost, 0, "{report:?}");
    assert_eq!(report.lost_deliveries, 0, "{report:?}");
    assert_eq!(report.duplicates, 0, "{report:?}");
    assert_eq!(report.misrouted, 0, "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_run_accounts_for_every_message_and_reports_every_field() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let json_arg = json.to_str().unwrap();
    // This process as a "backend", measured by its command name: it runs
    // the load generator and the server, so it is busy through the window.
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
    let backend = format!("self={}", comm.trim());
    let report = run(spawned(&[
        "--users",
        "20",
        "--rate",
        "50",
        "--duration",
        "3s",
        "--warmup",
        "500ms",
        "--json",
        json_arg,
        "--backend",
        &backend,
        "--backend",
        "nothing=no-such-comm",
    ]))
    .await;
    assert_all_accounted(&report);
    assert_eq!(report.receipts, report.acked, "{report:?}");
    // The default mix sends a fifth to groups, each reaching two or more.
    assert!(
        report.group_sends > 0 && report.group_sends < report.sent,
        "{report:?}"
    );
    assert!(
        report.deliveries >= report.sent + report.group_sends,
        "{report:?}"
    );
    assert_eq!(report.users, 20);
    // Measured, not the plan's count: every user was online throughout.
    assert_eq!((report.connections, report.connections_at_end), (20, 20));
    assert_eq!(report.latency_ms.ack.count, report.acked);

    let text = std::fs::read_to_string(&json).expect("the JSON report was written");
    let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    for key in REPORT_KEYS {
        assert!(value.get(key).is_some(), "report lacks {key}: {text}");
    }
    for kind in ["ack", "deliver", "receipt"] {
        for q in ["p50", "p90", "p99", "p999", "max"] {
            assert!(
                value["latency_ms"][kind][q].is_number(),
                "latency_ms.{kind}.{q} missing: {text}"
            );
        }
    }
    // Read from /proc over the window, on Linux: this process's command
    // name counted at least what the process used as the load generator
    // (the same counters, read moments apart; more when other test
    // processes of this binary, which share the name, run in parallel),
    // and a command nothing runs used nothing.
    if cfg!(target_os = "linux") {
        let own = report.loadgen_cpu_pct.expect("own CPU on Linux");
        let measured = report.backend_cpu["self"];
        assert!(measured.cpu_pct > 0.0, "{report:?}");
        assert!(measured.cpu_pct >= own * 0.75 - 1.0, "{report:?}");
        assert!(
            measured.cpu_us_per_send.is_some_and(|us| us > 0.0),
            "{report:?}"
        );
        assert_eq!(report.backend_cpu["nothing"].cpu_pct, 0.0, "{report:?}");
        assert!(
            value["backend_cpu"]["self"]["cpu_us_per_send"].is_number(),
            "{text}"
        );
    }
    // The in-process server runs on threads of its own (its runtime's and
    // its store's), and those are what the report counts as the server's.
    if cfg!(target_os = "linux") {
        let server = report
            .server_cpu_pct
            .expect("an in-process server is measured");
        assert!(server > 0.0, "{report:?}");
        assert!(report.server_cpu_us_per_send.is_some(), "{report:?}");
        let threads = &report.server_cpu_by_thread;
        assert!(
            threads.contains_key("chat-server") && threads.contains_key("sqlite-store"),
            "{report:?}"
        );
        // And only those: the load generator's own runtime is not counted.
        assert!(
            threads
                .keys()
                .all(|name| name.starts_with("chat-server") || name.starts_with("sqlite-")),
            "{report:?}"
        );
    }
    // Read from /proc/net/snmp over the window: a count on Linux.
    if cfg!(target_os = "linux") {
        assert!(value["udp_rcvbuf_drops"].is_u64(), "{text}");
        // Every acked send crossed the loopback at least twice (the Send
        // and its SendAck).
        let per_send = value["udp_datagrams_per_send"].as_f64();
        assert!(per_send.is_some_and(|d| d >= 2.0), "{text}");
    }
    assert_eq!(value["profile"], "messenger");
    assert_eq!(value["sent"], report.sent);
    // Floats may differ in the last bit after a JSON round trip (serde_json
    // parses fast, not exactly), so compare the counters.
    let back: Report = serde_json::from_str(&text).expect("the report parses back");
    assert_eq!(
        (
            back.sent,
            back.acked,
            back.delivered,
            back.lost,
            back.errors
        ),
        (
            report.sent,
            report.acked,
            report.delivered,
            report.lost,
            report.errors.clone()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_sends_reach_every_member_and_bring_back_every_receipt() {
    init_tracing();
    // Groups of up to 12 among 24 users whose 1-1 friends are only their
    // ring neighbours: set-up must add the friendships the server requires
    // before a creator may add someone.
    let report = run(spawned(&[
        "--users",
        "24",
        "--friends",
        "2",
        "--group-fraction",
        "1",
        "--groups-per-user",
        "0.25",
        "--group-max-size",
        "12",
        "--group-size-exponent",
        "0.5",
        "--rate",
        "40",
        "--duration",
        "2s",
        "--warmup",
        "300ms",
    ]))
    .await;
    assert_all_accounted(&report);
    assert_eq!(report.group_sends, report.sent, "{report:?}");
    assert_eq!(report.receipts, report.acked, "{report:?}");
    // Six groups starting four users apart: every one has at least four
    // members, so each send reaches three or more others.
    assert!(report.deliveries >= 3 * report.sent, "{report:?}");
    assert_eq!(
        report.latency_ms.deliver.count, report.deliveries,
        "one latency sample per recipient"
    );
    assert_eq!(report.stale_messages, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photo_sends_are_uploaded_delivered_and_downloaded_by_every_recipient() {
    init_tracing();
    // Texts at the text limit: a photo's caption is cut to leave room
    // for its preview, or every photo send would be MESSAGE_TOO_LARGE.
    let photos: &[&str] = &[
        "--photo-fraction",
        "0.5",
        "--photo-bytes",
        "40000",
        "--text-bytes",
        "16384",
    ];
    let report = run(spawned(&[TWELVE_USERS, photos, TWO_SECONDS_AT_30].concat())).await;
    assert_all_accounted(&report);
    assert!(
        report.photo_sends > 0 && report.photo_sends < report.sent,
        "{report:?}"
    );
    // Every photo delivered, warm-up ones too, is downloaded and checked
    // against its hash, and came with its preview (a mismatch or a lost
    // preview is an error, and there are none).
    assert!(report.photos_downloaded >= report.photo_sends, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_that_type_first_tell_their_recipients() {
    init_tracing();
    let typing: &[&str] = &["--typing-fraction", "1"];
    let report = run(spawned(&[TWELVE_USERS, typing, TWO_SECONDS_AT_30].concat())).await;
    assert_all_accounted(&report);
    // A start and a stop per send, to every recipient with room for them
    // (best effort: offered, never queued past a busy device's bound);
    // the messages are all accounted for beside them.
    assert!(report.typing_received > 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_reactions_ride_with_the_texts() {
    init_tracing();
    let mix: &[&str] = &["--reply-fraction", "0.5", "--reaction-fraction", "0.5"];
    let report = run(spawned(&[TWELVE_USERS, mix, TWO_SECONDS_AT_30].concat())).await;
    // Replies are texts like the others, all accounted for; reactions to
    // them are acknowledged and delivered with no error (a refused
    // reference would be one).
    assert_all_accounted(&report);
    assert!(report.reply_sends > 0, "{report:?}");
    assert!(report.reply_sends < report.sent, "{report:?}");
    assert!(report.reactions_acked > 0, "{report:?}");
    assert!(report.reactions_received > 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_in_the_background_are_notified_through_the_push_gateway() {
    init_tracing();
    // Half the users have the app in the background: their messages reach
    // their open connections and notify their devices too.
    let push: &[&str] = &["--background-fraction", "0.5", "--push"];
    let report = run(spawned(&[TWELVE_USERS, push, TWO_SECONDS_AT_30].concat())).await;
    assert_all_accounted(&report);
    assert!(report.notifications > 0, "{report:?}");
    assert_eq!(
        report.notified_devices, report.notifications,
        "one device each"
    );
    // Coalesced per conversation and foreground users never notified: far
    // fewer than the deliveries.
    assert!(report.notifications < report.deliveries, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_media_reaches_every_other_participant_with_its_latency() {
    init_tracing();
    // Two direct calls and two of four: datagrams each way, timed from the
    // moment they were meant to leave.
    for size in ["2", "4"] {
        let report = run(spawned(&[
            "--calls",
            "2",
            "--call-size",
            size,
            "--call-packets",
            "40",
            "--call-packet-bytes",
            "600",
            "--duration",
            "2s",
            "--warmup",
            "300ms",
        ]))
        .await;
        let calls = report.calls.clone().expect("a calls report");
        let size: u64 = size.parse().unwrap();
        assert_eq!(report.profile, "calls");
        assert_eq!(report.users, 2 * size);
        // 2 s at 40 a second per participant, give or take the window's
        // edges.
        let per_participant = calls.sent / report.users;
        assert!((70..=90).contains(&per_participant), "{calls:?}");
        assert_eq!(calls.expected, calls.sent * (size - 1));
        // Datagrams may be lost even on loopback, but not many.
        assert!(
            calls.received <= calls.expected && calls.received * 10 >= calls.expected * 9,
            "{calls:?}"
        );
        assert_eq!(calls.latency_ms.count, calls.received);
        assert!(calls.latency_ms.p50 > 0.0 && calls.latency_ms.p50 <= calls.latency_ms.max);
        assert_eq!(calls.send_errors, 0, "{report:?}");
        // A few hundred arrivals may cost less than a clock tick.
        assert!(calls.server_cpu_us_per_forward.is_some(), "{calls:?}");
        if size == 4 {
            assert!(calls.server_cpu_us_per_forward.is_some_and(|us| us > 0.0));
        }
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        for key in [
            "sent",
            "expected",
            "received",
            "loss_pct",
            "latency_ms",
            "server_cpu_us_per_forward",
        ] {
            assert!(
                json["calls"].get(key).is_some(),
                "calls.{key} missing: {json}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_group_above_the_receipt_broadcast_size_senders_still_get_every_receipt() {
    init_tracing();
    // One group of all 40 users, above the server's default broadcast size
    // of 32: members' receipts go only to the senders of what they cover,
    // and that must still bring every receipt back.
    let report = run(spawned(&[ONE_GROUP_OF_40, TWO_SECONDS_AT_30].concat())).await;
    assert_all_accounted(&report);
    assert!(report.group_sends > 0, "{report:?}");
    assert_eq!(
        report.deliveries,
        report.sent - report.group_sends + 39 * report.group_sends,
        "{report:?}"
    );
    assert_eq!(report.receipts, report.acked, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_up_waits_out_a_nodes_request_limit() {
    init_tracing();
    // A node with production limits and a tight control-request budget
    // (10 at once, then 20 a second): the creator of a 40-member group asks
    // 39 users to be friends, 32 at a time, and most are refused at first.
    // Set-up used to give up after five tries spaced by the retry-after (50
    // ms); it now waits at least a growing pause, with jitter.
    let server = TestServer::start_with(|c| {
        c.limits.control_rate = 20;
        c.limits.control_burst = 10;
    })
    .await;
    let (addr, ca) = (server.addr.to_string(), server.ca.display().to_string());
    let server_flags: &[&str] = &["--server", &addr, "--ca", &ca];
    let report = run(args(
        &[
            server_flags,
            ONE_GROUP_OF_40,
            &[
                "--rate",
                "20",
                "--duration",
                "1s",
                "--warmup",
                "300ms",
                "--drain",
                "30s",
                "--read-delay",
                "100ms",
            ],
        ]
        .concat(),
    ))
    .await;
    assert_all_accounted(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_up_against_a_node_that_limits_registrations_says_which_flag() {
    init_tracing();
    // Set-up registers every user from one address; a node with the
    // production registration limit refuses past it for most of an hour.
    // Set-up stops at once and names the flag, rather than retrying into
    // the hour.
    let server = TestServer::start_with(|c| c.limits.registrations_per_address = 5).await;
    let (addr, ca) = (server.addr.to_string(), server.ca.display().to_string());
    let run = chat_loadgen::run(args(&[
        "--server",
        &addr,
        "--ca",
        &ca,
        "--users",
        "10",
        "--rate",
        "10",
        "--duration",
        "1s",
    ]));
    let error = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("set-up fails at once")
        .expect_err("set-up cannot register every user");
    let message = format!("{error:#}");
    assert!(
        message.contains("--registrations-per-address 0"),
        "{message}"
    );
}

/// 40 users who all churn once a minute on average (with the default
/// seed a few go offline during the run), 60 sends/s for 5 s.
const EVERYONE_CHURNS: &[&str] = &[
    "--users",
    "40",
    "--churn",
    "1",
    "--rate",
    "60",
    "--duration",
    "5s",
    "--warmup",
    "500ms",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churned_users_catch_up_on_everything_sent_while_they_were_away() {
    init_tracing();
    // All users churn once a minute on average: with this seed a few go
    // offline for a second during the run, and what was sent to them
    // (1-1 and in groups) must arrive when they resume.
    let report = run(spawned(
        &[EVERYONE_CHURNS, &["--offline-time", "1s"]].concat(),
    ))
    .await;
    assert!(report.churn_offline >= 1, "{report:?}");
    // A sender that is offline skips its turn. A churned client leaves
    // gracefully (`Client::shutdown`): its sends still waiting are
    // answered first, so every send is acked.
    assert!(report.sent > 0, "{report:?}");
    assert_eq!(report.acked, report.sent, "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.delivered, report.acked, "{report:?}");
    assert_eq!((report.lost, report.lost_deliveries), (0, 0), "{report:?}");
    // And it writes the acks of what its app took before it goes, so the
    // resumed client gets again only what the old one never showed: no
    // duplicates, across a resume or otherwise.
    assert_eq!(
        (report.duplicates, report.duplicates_across_resume),
        (0, 0),
        "{report:?}"
    );
    // What they had on their return is timed apart from what reached users
    // online, one sample per delivery between the two.
    let latency = &report.latency_ms;
    assert!(latency.deliver_offline.count > 0, "{report:?}");
    assert_eq!(
        latency.deliver.count + latency.deliver_offline.count,
        report.deliveries,
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photos_sent_while_users_churn_are_all_delivered_and_downloaded() {
    init_tracing();
    // Half the sends photos, users churning as above: photos sent to a
    // user while away arrive on its return and are downloaded then, and
    // every photo send is answered (a churned client waits for its photo
    // sends before it leaves, as its outbox's texts are waited for; at
    // this scale one is rarely under way at that moment, so this run
    // passes without that wait too).
    let report = run(spawned(
        &[
            EVERYONE_CHURNS,
            &[
                "--offline-time",
                "1s",
                "--photo-fraction",
                "0.5",
                "--photo-bytes",
                "100000",
            ],
        ]
        .concat(),
    ))
    .await;
    assert!(report.churn_offline >= 1, "{report:?}");
    assert!(report.photo_sends > 0, "{report:?}");
    assert_all_accounted(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_waits_for_users_churned_late_in_the_window() {
    init_tracing();
    // Users stay away 8 s, longer than the 5 s drain, so those taken
    // offline in the window's last seconds came back after it: what was
    // sent to them counted as lost, on a correct server (the defaults of
    // 5 s each did the same to a user churned at the very end). The drain
    // now lasts until its length after the last of them is back.
    let flags = [
        &["--spawn-server", "--read-delay", "100ms", "--drain", "5s"],
        EVERYONE_CHURNS,
        &["--offline-time", "8s"],
    ]
    .concat();
    let report = run(args(&flags)).await;
    assert!(report.churn_offline >= 1, "{report:?}");
    assert!(report.sent > 0, "{report:?}");
    assert_eq!(report.acked, report.sent, "{report:?}");
    assert_eq!(report.delivered, report.acked, "{report:?}");
    assert_eq!((report.lost, report.lost_deliveries), (0, 0), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_waits_for_users_whose_connection_dropped() {
    init_tracing();
    // The node restarts in the window and stays down 6 s: clients come
    // back after the window and its 3 s drain (their connection attempts
    // get through at a retransmission, seconds after the node is back).
    // What was sent to those not back yet counted as lost, or never
    // answered, on a correct server; the drain now waits for clients that
    // are reconnecting as for users churn took away.
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start_on(&Backend::Embedded, dir.path(), 0).await;
    let (addr, ca) = (server.addr.to_string(), server.ca.display().to_string());
    let args = args(&[
        "--server",
        &addr,
        "--ca",
        &ca,
        "--users",
        "8",
        "--friends",
        "2",
        "--rate",
        "40",
        "--warmup",
        "0s",
        "--duration",
        "3s",
        "--drain",
        "3s",
        "--read-delay",
        "100ms",
    ]);
    let mut run = Phased::start(args);
    run.until(Phase::Measuring, "the measured window starts")
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(server.terminate().await, "a clean shutdown");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let server = ChildServer::start_on(
        &Backend::Embedded,
        dir.path(),
        addr.parse::<std::net::SocketAddr>().unwrap().port(),
    )
    .await;
    let report = run.report().await;
    assert!(report.reconnects >= 8, "{report:?}");
    assert!(report.sent > 0, "{report:?}");
    assert_eq!(report.acked, report.sent, "{report:?}");
    assert_eq!(report.delivered, report.acked, "{report:?}");
    assert_eq!((report.lost, report.lost_deliveries), (0, 0), "{report:?}");
    server.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_file_skips_registration_on_the_next_run() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let reuse = dir.path().join("users.json");
    let flags = |data: &Path, reuse: &Path| {
        args(&[
            "--spawn-server",
            "--data-dir",
            data.to_str().unwrap(),
            "--reuse",
            reuse.to_str().unwrap(),
            "--users",
            "6",
            "--friends",
            "2",
            "--rate",
            "20",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--drain",
            "20s",
            "--read-delay",
            "0s",
        ])
    };
    let first = run(flags(&data, &reuse)).await;
    assert_all_accounted(&first);
    let saved = std::fs::read_to_string(&reuse).expect("the reuse file was written");
    let second = run(flags(&data, &reuse)).await;
    assert_all_accounted(&second);
    assert_eq!(
        std::fs::read_to_string(&reuse).unwrap(),
        saved,
        "the second run resumed from the file instead of registering anew"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_with_the_app_in_the_background_send_no_heartbeats() {
    init_tracing();
    // Heartbeats every second (the shortest there is), and no sends (--rate
    // 0): during the measured window the control stream carries nothing but
    // heartbeats.
    let server = TestServer::start_with(|c| {
        c.limits.heartbeat_interval = chat_protocol::limits::MIN_HEARTBEAT_INTERVAL;
    })
    .await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let (addr, ca) = (server.addr.to_string(), server.ca.display().to_string());
    let key = "chat_frames_received_total{stream=\"control\"}";
    for (fraction, foreground) in [("0", true), ("1", false)] {
        let args = args(&[
            "--server",
            &addr,
            "--ca",
            &ca,
            "--users",
            "6",
            "--friends",
            "2",
            "--rate",
            "0",
            "--warmup",
            "0s",
            "--duration",
            "2s",
            "--background-fraction",
            fraction,
        ]);
        let mut run = Phased::start(args);
        run.until(Phase::Measuring, "the measured window starts")
            .await;
        // Heartbeats: control frames but those saying the app went to
        // the background (sent as the run starts, around this scrape).
        let beats = |m: &HashMap<String, f64>| value(m, key) - value(m, "chat_backgrounded_total");
        let before = beats(&scrape(metrics).await);
        run.until(Phase::Draining, "the measured window ends").await;
        let after = beats(&scrape(metrics).await);
        let report = run.report().await;
        if foreground {
            assert_eq!(report.background_users, 0);
            // 6 users x 2 s / 1 s = 12; at least one each on a slow machine.
            assert!(after - before >= 6.0, "{before} -> {after} heartbeats");
        } else {
            assert_eq!(report.background_users, 6);
            assert_eq!(after, before, "no heartbeats from background apps");
        }
    }
}

/// Sends a signal with kill(1).
fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// Resumes a stopped process when dropped, so a failing test never leaves
/// a frozen server behind.
struct ContGuard(u32);

impl Drop for ContGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-CONT")
            .arg(self.0.to_string())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_shows_up_as_latency_from_the_intended_time() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start_on(&Backend::Embedded, dir.path(), 0).await;
    let pid = server.pid().to_string();
    let (addr, ca) = (server.addr.to_string(), server.ca.display().to_string());
    let args = args(&[
        "--server",
        &addr,
        "--ca",
        &ca,
        "--server-pid",
        &pid,
        "--users",
        "10",
        "--friends",
        "2",
        "--rate",
        "50",
        "--warmup",
        "500ms",
        "--duration",
        "4s",
        "--drain",
        "30s",
        "--read-delay",
        "100ms",
    ]);
    let mut run = Phased::start(args);
    run.until(Phase::Measuring, "the measured window starts")
        .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    {
        let _cont = ContGuard(server.pid());
        signal(server.pid(), "STOP");
        tokio::time::sleep(Duration::from_secs(1)).await;
        signal(server.pid(), "CONT");
    }
    let report = run.report().await;
    assert_eq!(report.lost, 0, "{report:?}");
    assert_eq!(report.acked, report.sent, "{report:?}");
    // Sends scheduled at the start of the freeze waited about a second for
    // their ack. Measured from the actual send, or with a schedule that
    // waited for the server, they would look fast.
    let ack = &report.latency_ms.ack;
    assert!(
        ack.max >= 800.0 && ack.p99 >= 800.0,
        "the 1 s freeze must show in the ack latency: {ack:?}"
    );
    // Open loop: the ~50 sends scheduled during the freeze (a quarter of
    // the window's ~200) all left on time and waited, from 0 to 1 s, so
    // the slowest tenth waited more than half a second. A load generator
    // whose users waited for their acks would have had only one send per
    // user (10) stuck, and would have sent fewer in all.
    assert!(ack.p90 >= 300.0, "p90 {ack:?}");
    assert!(report.sent >= 160, "the schedule kept its rate: {report:?}");
    assert!(report.latency_ms.deliver.max >= 800.0, "{report:?}");
    assert!(report.server_cpu_pct.is_some(), "{report:?}");
    // The split by thread names the embedded store's writer thread.
    assert!(
        report.server_cpu_by_thread.contains_key("sqlite-store"),
        "{report:?}"
    );
    server.kill().await;
}
