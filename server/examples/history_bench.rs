//! How many history writes per second each backend sustains, with group
//! commit and with one commit per message.
//!
//! DESIGN.md rests the send path on group commit: one durable commit per
//! message caps a 2-core Postgres near 14k rows/s, batches do several times
//! better. This benchmark measures that claim on the machine at hand, for
//! the embedded SQLite store (in a temporary directory) and, when given a
//! URL, for Postgres (in a schema of its own, dropped at the end). It is a
//! tool to run by hand, not a test:
//!
//! ```text
//! cargo run --release -p chat-server --example history_bench -- \
//!     [--postgres postgres://postgres@127.0.0.1:5432/test] [--messages 20000]
//! ```
//!
//! Each case stops at `--messages` (at most 20,000) or `--max-time`,
//! whichever comes first, and reports what it did.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chat_protocol::proto;
use chat_server::store::postgres::PostgresStore;
use chat_server::store::sqlite::SqliteStore;
use chat_server::store::{ConversationId, HistoryStore, NewMessage, UserId};
use clap::Parser;
use tokio_postgres::NoTls;

/// Most messages one case may write, so that a run stays short.
const MAX_MESSAGES: u64 = 20_000;
/// Conversations the messages are spread over.
const CONVERSATIONS: usize = 64;
/// Size of each message body, about a short chat line.
const BODY_BYTES: usize = 80;

#[derive(Parser)]
#[command(about = "History writes per second: group commit vs one commit per message")]
struct Args {
    /// Postgres URL; without it only SQLite is measured.
    #[arg(long)]
    postgres: Option<String>,
    /// Messages per case (at most 20,000).
    #[arg(long, default_value_t = MAX_MESSAGES)]
    messages: u64,
    /// Messages per `append` call in the group-commit case.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// `append` calls in flight at once in the group-commit case, each on
    /// its own conversations (as committers sharded by conversation are).
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// Longest one case may run.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    max_time: Duration,
}

/// What one case measured.
struct Outcome {
    backend: &'static str,
    mode: String,
    messages: u64,
    elapsed: Duration,
    /// Latency of each `append` call, sorted.
    calls: Vec<Duration>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.messages > MAX_MESSAGES {
        eprintln!("--messages capped at {MAX_MESSAGES}");
        args.messages = MAX_MESSAGES;
    }
    if args.batch == 0 || !(1..=CONVERSATIONS).contains(&args.in_flight) {
        bail!("--batch must be at least 1 and --in-flight between 1 and {CONVERSATIONS}");
    }
    let mut outcomes = Vec::new();

    let dir = tempfile::tempdir().context("temporary directory")?;
    let sqlite: Arc<dyn HistoryStore> = Arc::new(SqliteStore::open(dir.path())?);
    outcomes.extend(run_cases(sqlite, &args).await?);

    if let Some(url) = &args.postgres {
        let schema = format!(
            "chat_bench_{}_{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let store = PostgresStore::connect_with_schema(url, &schema, args.in_flight + 2).await?;
        let durability = synchronous_commit(url).await;
        let store = Arc::new(store);
        let result = run_cases(store.clone(), &args).await;
        store.close();
        drop(store);
        drop_schema(url, &schema).await?;
        outcomes.extend(result?);
        println!("postgres: synchronous_commit = {durability}");
    }
    println!("sqlite: journal_mode = WAL, synchronous = FULL");
    println!();
    print_table(&outcomes);
    Ok(())
}

/// The two cases on one store: group commit, then one commit per message.
async fn run_cases(store: Arc<dyn HistoryStore>, args: &Args) -> anyhow::Result<Vec<Outcome>> {
    let conversations = Arc::new(setup(&*store).await?);
    let grouped = group_commit(store.clone(), conversations.clone(), args).await?;
    let single = one_per_commit(store, &conversations, args).await?;
    Ok(vec![grouped, single])
}

/// Pairs of friends, each with their direct conversation.
async fn setup(store: &dyn HistoryStore) -> anyhow::Result<Vec<(ConversationId, UserId, UserId)>> {
    let mut conversations = Vec::with_capacity(CONVERSATIONS);
    for i in 0..CONVERSATIONS {
        let a = store.create_user(format!("a{i}"), "x".into(), 1).await?;
        let b = store.create_user(format!("b{i}"), "x".into(), 1).await?;
        store.friend_request(a, b, 1).await?;
        store.friend_accept(b, a, 1).await?;
        conversations.push((store.open_direct(a, b, 1).await?, a, b));
    }
    Ok(conversations)
}

fn message(conversation: (ConversationId, UserId, UserId), key: String, n: u64) -> NewMessage {
    let (conversation_id, a, b) = conversation;
    let mut text = format!("message {n} ");
    text.extend(std::iter::repeat_n(
        'x',
        BODY_BYTES.saturating_sub(text.len()),
    ));
    NewMessage {
        conversation_id,
        sender_id: if n.is_multiple_of(2) { a } else { b },
        client_msg_id: key,
        message_type: proto::MessageType::Text,
        text,
        photo: None,
        call: None,
        reply_to_seq: 0,
        notify_only: None,
        now_ms: 1,
    }
}

/// `in_flight` writers, each appending batches of `batch` messages to its
/// own share of the conversations.
async fn group_commit(
    store: Arc<dyn HistoryStore>,
    conversations: Arc<Vec<(ConversationId, UserId, UserId)>>,
    args: &Args,
) -> anyhow::Result<Outcome> {
    let claimed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + args.max_time;
    let mut writers = Vec::new();
    for w in 0..args.in_flight {
        let (store, conversations, claimed) =
            (store.clone(), conversations.clone(), claimed.clone());
        let (batch, total, in_flight) = (args.batch as u64, args.messages, args.in_flight);
        writers.push(tokio::spawn(async move {
            let mine: Vec<_> = conversations
                .iter()
                .copied()
                .skip(w)
                .step_by(in_flight)
                .collect();
            let mut calls = Vec::new();
            let mut written = 0u64;
            while Instant::now() < deadline {
                let first = claimed.fetch_add(batch, Ordering::Relaxed);
                if first >= total {
                    break;
                }
                let batch: Vec<NewMessage> = (first..(first + batch).min(total))
                    .map(|n| message(mine[n as usize % mine.len()], format!("g{n}"), n))
                    .collect();
                let len = batch.len() as u64;
                let call = Instant::now();
                for result in store.append(batch).await? {
                    result?;
                }
                calls.push(call.elapsed());
                written += len;
            }
            anyhow::Ok((written, calls))
        }));
    }
    let mut messages = 0;
    let mut calls = Vec::new();
    for writer in writers {
        let (written, latencies) = writer.await??;
        messages += written;
        calls.extend(latencies);
    }
    calls.sort();
    Ok(Outcome {
        backend: store.backend(),
        mode: format!(
            "group commit ({}/call, {} in flight)",
            args.batch, args.in_flight
        ),
        messages,
        elapsed: started.elapsed(),
        calls,
    })
}

/// One message per `append` call, one call at a time: a commit each.
async fn one_per_commit(
    store: Arc<dyn HistoryStore>,
    conversations: &[(ConversationId, UserId, UserId)],
    args: &Args,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let deadline = started + args.max_time;
    let mut calls = Vec::new();
    let mut messages = 0;
    while messages < args.messages && Instant::now() < deadline {
        let m = message(
            conversations[messages as usize % conversations.len()],
            format!("s{messages}"),
            messages,
        );
        let call = Instant::now();
        for result in store.append(vec![m]).await? {
            result?;
        }
        calls.push(call.elapsed());
        messages += 1;
    }
    calls.sort();
    Ok(Outcome {
        backend: store.backend(),
        mode: "one commit per message (sequential)".into(),
        messages,
        elapsed: started.elapsed(),
        calls,
    })
}

fn print_table(outcomes: &[Outcome]) {
    println!(
        "{:<9} {:<38} {:>8} {:>8} {:>10} {:>10} {:>10}",
        "backend", "mode", "messages", "seconds", "msgs/s", "call p50", "call p99"
    );
    for o in outcomes {
        let secs = o.elapsed.as_secs_f64();
        println!(
            "{:<9} {:<38} {:>8} {:>8.2} {:>10.0} {:>10} {:>10}",
            o.backend,
            o.mode,
            o.messages,
            secs,
            o.messages as f64 / secs.max(f64::EPSILON),
            millis(percentile(&o.calls, 0.50)),
            millis(percentile(&o.calls, 0.99)),
        );
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// A plain connection for the benchmark's own housekeeping.
async fn admin(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("admin connection to postgres")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Whether commits wait for the disk: the numbers mean little otherwise.
async fn synchronous_commit(url: &str) -> String {
    let answer = async {
        let row = admin(url)
            .await?
            .query_one("SHOW synchronous_commit", &[])
            .await?;
        anyhow::Ok(row.try_get::<_, String>(0)?)
    };
    answer.await.unwrap_or_else(|e| format!("unknown ({e})"))
}

async fn drop_schema(url: &str, schema: &str) -> anyhow::Result<()> {
    admin(url)
        .await?
        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .with_context(|| format!("drop the benchmark schema {schema}"))
}
