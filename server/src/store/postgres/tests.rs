//! Tests of the Postgres store against a real server: the conformance
//! suite, a comparison with SQLite, concurrency, migrations and outages.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use rand::seq::SliceRandom as _;
use tokio::sync::OnceCell;

use super::cutter::{CUT_ANSWER, CUT_BEFORE_COMMIT, CommitCutter};
use super::*;
use crate::store::sqlite::SqliteStore;

/// Small, so that many parallel tests stay far below `max_connections`.
const TEST_POOL_SIZE: usize = 4;
/// Generous: the machine may be busy with other builds.
const PROGRESS_DEADLINE: Duration = Duration::from_secs(60);

crate::history_store_conformance!(|_dir: PathBuf| new_store(), drop_store);

fn test_url() -> String {
    testing::url()
}

/// Whether the test server answers; asked once per test binary.
async fn reachable() -> Result<(), String> {
    static PROBE: OnceCell<Result<(), String>> = OnceCell::const_new();
    PROBE
        .get_or_init(|| async {
            let url = test_url();
            let config = Config::from_str(&url)
                .map_err(|e| format!("invalid CHAT_TEST_POSTGRES_URL: {}", error_chain(&e)))?;
            let target = describe_target(&config);
            match tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!(
                    "postgres unreachable at {target}: {}",
                    error_chain(&e)
                )),
                Err(_) => Err(format!("postgres unreachable at {target}: no answer")),
            }
        })
        .await
        .clone()
}

/// True if Postgres is there. Otherwise fails the test when
/// `CHAT_REQUIRE_BACKENDS=1`, or says it skipped and returns false.
async fn backend_or_skip() -> bool {
    let Err(why) = reachable().await else {
        return true;
    };
    if std::env::var("CHAT_REQUIRE_BACKENDS").as_deref() == Ok("1") {
        panic!("CHAT_REQUIRE_BACKENDS=1 but {why}");
    }
    // Straight to the process's stderr rather than through `eprintln!`,
    // which the test harness captures and hides for passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: {why} (set CHAT_TEST_POSTGRES_URL)"
    );
    false
}

fn fresh_schema() -> String {
    testing::fresh_schema()
}

/// A store in a fresh schema, or `None` when the test is skipped.
async fn new_store() -> Option<PostgresStore> {
    new_store_at(&test_url()).await
}

/// A store reached through `url` (the test server, or a proxy to it) in a
/// fresh schema, or `None` when the test is skipped.
async fn new_store_at(url: &str) -> Option<PostgresStore> {
    new_store_sized(url, TEST_POOL_SIZE).await
}

/// [`new_store_at`] with a pool of `pool_size` connections.
async fn new_store_sized(url: &str, pool_size: usize) -> Option<PostgresStore> {
    if !backend_or_skip().await {
        return None;
    }
    let schema = fresh_schema();
    match PostgresStore::connect_with_schema(url, &schema, pool_size).await {
        Ok(store) => Some(store),
        Err(e) => {
            drop_schema(&schema).await;
            panic!("connect a test store: {e}");
        }
    }
}

/// Closes the store and drops its schema with everything in it.
async fn drop_store(store: PostgresStore) {
    let schema = store.schema().map(str::to_owned);
    store.close();
    drop(store);
    if let Some(schema) = schema {
        drop_schema(&schema).await;
    }
}

async fn drop_schema(schema: &str) {
    testing::drop_schema(schema)
        .await
        .expect("drop the test schema");
}

/// A plain connection outside any store, for setup and inspection.
async fn admin() -> tokio_postgres::Client {
    testing::admin().await.expect("admin connection")
}

/// Runs `check` on a fresh store in its own task, then drops the
/// schema whether or not the check passed.
async fn with_store<F, Fut>(check: F)
where
    F: FnOnce(Arc<PostgresStore>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    with_store_at(&test_url(), check).await;
}

/// [`with_store`] for a store reached through `url`.
async fn with_store_at<F, Fut>(url: &str, check: F)
where
    F: FnOnce(Arc<PostgresStore>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    with_store_sized(url, TEST_POOL_SIZE, check).await;
}

/// [`with_store_at`] with a pool of `pool_size` connections.
async fn with_store_sized<F, Fut>(url: &str, pool_size: usize, check: F)
where
    F: FnOnce(Arc<PostgresStore>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(store) = new_store_sized(url, pool_size).await else {
        return;
    };
    let store = Arc::new(store);
    let schema = store.schema().map(str::to_owned);
    let outcome = tokio::spawn(check(store.clone())).await;
    // The schema goes whatever happened: a failed check may leave tasks of
    // its own holding the store (their connections end with the schema).
    let leftover = match Arc::into_inner(store) {
        Some(store) => {
            drop_store(store).await;
            false
        }
        None => {
            if let Some(schema) = &schema {
                drop_schema(schema).await;
            }
            true
        }
    };
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    assert!(!leftover, "a task of the check still holds the store");
}

async fn user(store: &impl HistoryStore, name: &str) -> UserId {
    store
        .create_user(name.into(), format!("hash-{name}"), 1)
        .await
        .unwrap()
}

async fn befriend(store: &impl HistoryStore, a: UserId, b: UserId) -> ConversationId {
    store.friend_request(a, b, 1).await.unwrap();
    store.friend_accept(b, a, 2).await.unwrap();
    store.open_direct(a, b, 3).await.unwrap()
}

fn text(conversation_id: ConversationId, sender_id: UserId, key: &str, body: &str) -> NewMessage {
    NewMessage {
        conversation_id,
        sender_id,
        client_msg_id: key.into(),
        message_type: proto::MessageType::Text,
        text: body.into(),
        photo: None,
        call: None,
        reply_to_seq: 0,
        notify_only: None,
        now_ms: 1_000,
    }
}

/// Waits until `counter` reaches `target`, failing after a deadline.
async fn wait_for(counter: &AtomicU64, target: u64, what: &str) {
    let deadline = Instant::now() + PROGRESS_DEADLINE;
    while counter.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "no progress: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A test that failed while its own connection held a lock in its schema
/// (the connection never rolls back: its runtime is stuck in the clean-up)
/// still has the schema dropped, in bounded time, instead of hanging the
/// run in `DROP SCHEMA`.
#[tokio::test]
async fn a_schema_locked_by_a_forgotten_transaction_is_still_dropped() {
    let Some(store) = new_store().await else {
        return;
    };
    let schema = store.schema().expect("a schema store").to_owned();
    store.close();
    drop(store);
    // One holds a table of the schema; the other the schema itself (its
    // table, not committed, is in no catalog the others read).
    let mut forgotten = Vec::new();
    for statement in [
        format!(r#"LOCK TABLE "{schema}".users IN ACCESS SHARE MODE"#),
        format!(r#"CREATE TABLE "{schema}".scratch (x int)"#),
    ] {
        let session = admin().await;
        session
            .batch_execute(&format!("BEGIN; {statement}"))
            .await
            .unwrap();
        forgotten.push(session);
    }
    tokio::time::timeout(Duration::from_secs(120), drop_schema(&schema))
        .await
        .expect("dropped in bounded time");
    let left: i64 = admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the schema is gone");
    for session in forgotten {
        assert!(
            session.batch_execute("SELECT 1").await.is_err(),
            "the forgotten session was ended"
        );
    }
}

#[tokio::test]
async fn an_unreachable_server_fails_fast_naming_the_host_but_not_the_password() {
    // Nothing listens on port 1 of loopback: the connection is refused.
    let started = Instant::now();
    let Err(e) = PostgresStore::connect("postgres://chat:s3cret-pw@127.0.0.1:1/chat", 2).await
    else {
        panic!("connected to port 1");
    };
    let StoreError::Unavailable(message) = &e else {
        panic!("want Unavailable, got {e:?}");
    };
    assert!(message.contains("127.0.0.1:1/chat"), "{message}");
    assert!(!message.contains("s3cret"), "{message}");
    assert!(
        started.elapsed() < CONNECT_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_silent_server_is_given_up_on_after_the_connect_timeout() {
    // Accepts TCP connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let started = Instant::now();
    let url = format!("postgres://chat:s3cret-pw@127.0.0.1:{port}/chat");
    let Err(e) = PostgresStore::connect(&url, 2).await else {
        panic!("connected to a silent server");
    };
    silent.abort();
    let StoreError::Unavailable(message) = &e else {
        panic!("want Unavailable, got {e:?}");
    };
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(!message.contains("s3cret"), "{message}");
    let took = started.elapsed();
    assert!(took >= CONNECT_TIMEOUT, "{took:?}");
    assert!(took < CONNECT_TIMEOUT * 4, "{took:?}");
}

#[tokio::test]
async fn durable_commits_and_read_committed_hold_whatever_the_url_says() {
    // An operator's URL (or the role's or database's defaults) turning
    // synchronous_commit off would let COMMIT answer before its WAL is
    // flushed, and a SendAck go out for a send a crash then loses.
    let url = format!(
        "{}?options=-c%20synchronous_commit%3Doff%20-c%20default_transaction_isolation%3Dserializable",
        test_url()
    );
    with_store_at(&url, |store| async move {
        let client = store.pool.get().await.expect("a pooled connection");
        for (setting, wanted) in [
            ("synchronous_commit", "on"),
            ("default_transaction_isolation", "read committed"),
        ] {
            let value: String = client
                .query_one(&format!("SHOW {setting}"), &[])
                .await
                .expect("show")
                .get(0);
            assert_eq!(value, wanted, "{setting}");
        }
    })
    .await;
}

#[tokio::test]
async fn schema_names_that_would_need_quoting_are_refused() {
    for bad in [
        "",
        "Chat",
        "1chat",
        "chat-test",
        "chat test",
        "chat;drop",
        &"x".repeat(64),
    ] {
        let result = PostgresStore::connect_with_schema(testing::DEFAULT_URL, bad, 1).await;
        assert!(matches!(result, Err(StoreError::Internal(_))), "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_stay_in_their_schema_and_run_once_under_concurrent_starts() {
    if !backend_or_skip().await {
        return;
    }
    let url = test_url();
    let schema = fresh_schema();
    // Three nodes starting at once against a new schema take turns.
    let (a, b, c) = tokio::join!(
        PostgresStore::connect_with_schema(&url, &schema, 1),
        PostgresStore::connect_with_schema(&url, &schema, 1),
        PostgresStore::connect_with_schema(&url, &schema, 1),
    );
    let admin = admin().await;
    let tables = admin
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = $1 ORDER BY 1",
            &[&schema],
        )
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        });
    let history = admin
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".refinery_schema_history"),
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0));
    for store in [&a, &b, &c].into_iter().flatten() {
        store.close();
    }
    drop((
        a.as_ref().err().map(ToString::to_string),
        b.is_ok(),
        c.is_ok(),
    ));
    let outcomes = [a.err(), b.err(), c.err()];
    drop_schema(&schema).await;

    assert!(outcomes.iter().all(Option::is_none), "{outcomes:?}");
    assert_eq!(
        tables.unwrap(),
        [
            "blocks",
            "cleared_histories",
            "conversations",
            "departures",
            "former_members",
            "friend_requests",
            "friends",
            "history_identity",
            "media",
            "members",
            "messages",
            "mutes",
            "refinery_schema_history",
            "sessions",
            "users"
        ]
    );
    assert_eq!(history.unwrap(), 18, "V1 to V18, once each");
}

/// A connection to a new `schema` as migration `version` left it, for a
/// migration test to fill as an older release would have.
async fn schema_at(schema: &str, version: u32) -> tokio_postgres::Client {
    let mut setup = admin().await;
    setup
        .batch_execute(&format!(
            "CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\""
        ))
        .await
        .unwrap();
    embedded::migrations::runner()
        .set_target(refinery::Target::Version(version))
        .set_grouped(true)
        .run_async(&mut setup)
        .await
        .unwrap();
    setup
}

/// V7 closes the direct conversations of pairs who had stopped being
/// friends before it (until then their sends were taken), and no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_closes_conversations_of_ended_friendships() {
    if !backend_or_skip().await {
        return;
    }
    let schema = fresh_schema();
    let outcome = tokio::spawn({
        let schema = schema.clone();
        async move {
            let setup = schema_at(&schema, 6).await;
            // As V6 left them: alice and bob were friends once (no longer),
            // alice and carol are, and alice and dave share a group only.
            setup
                .batch_execute(
                    "INSERT INTO users (username, password_hash, created_at_ms)
                         VALUES ('alice', 'h', 1), ('bob', 'h', 1), ('carol', 'h', 1), ('dave', 'h', 1);
                     INSERT INTO friends (user_id, friend_id, since_ms)
                         SELECT a.id, c.id, 1 FROM users a, users c
                         WHERE (a.username, c.username) IN (('alice', 'carol'), ('carol', 'alice'));
                     INSERT INTO conversations (kind, name, direct_key, created_at_ms, last_activity_ms)
                         SELECT 1, '', LEAST(a.id, o.id) || ':' || GREATEST(a.id, o.id), 1, 1
                         FROM users a, users o
                         WHERE a.username = 'alice' AND o.username IN ('bob', 'carol')
                         ORDER BY o.username;
                     INSERT INTO conversations (kind, name, created_at_ms, last_activity_ms)
                         VALUES (2, 'trip', 1, 1);
                     INSERT INTO members (conversation_id, user_id, role, joined_seq, delivered_seq, seen_seq)
                         SELECT c.id, u.id, 0, 0, 0, 0 FROM conversations c JOIN users u
                           ON u.username = 'alice'
                           OR (c.direct_key IS NOT NULL AND c.direct_key LIKE '%:' || u.id AND u.username <> 'alice')
                           OR (c.kind = 2 AND u.username = 'dave');",
                )
                .await
                .unwrap();
            drop(setup);
            let store = PostgresStore::connect_with_schema(&test_url(), &schema, 1)
                .await
                .expect("the store applies V7");
            let id_of = |name: &str| store.user_by_name(name.into());
            let alice = id_of("alice").await.unwrap().unwrap().id;
            let bob = id_of("bob").await.unwrap().unwrap().id;
            let carol = id_of("carol").await.unwrap().unwrap().id;
            let with_bob = store.open_direct(alice, bob, 2).await.unwrap();
            let with_carol = store.open_direct(alice, carol, 2).await.unwrap();
            let group = with_carol + 1;
            let results = store
                .append(vec![
                    text(with_bob, alice, "k1", "to bob"),
                    text(with_carol, alice, "k2", "to carol"),
                    text(group, alice, "k3", "to the trip"),
                ])
                .await
                .unwrap();
            store.close();
            assert!(
                matches!(results[0], Err(StoreError::NotFriends(x)) if x == bob),
                "{:?}",
                results[0]
            );
            assert_eq!(results[1].as_ref().unwrap().message.seq, 1);
            assert_eq!(results[2].as_ref().unwrap().message.seq, 1);
        }
    })
    .await;
    drop_schema(&schema).await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// V14 dates the ranges recorded before it by the message that ended
/// them, and names them by the group's name at the migration.
#[tokio::test]
async fn the_migration_lists_the_groups_left_before_it() {
    if !backend_or_skip().await {
        return;
    }
    let schema = fresh_schema();
    let outcome = tokio::spawn({
        let schema = schema.clone();
        async move {
            let setup = schema_at(&schema, 13).await;
            // As V13 left it: alice removed bob from her group "trip" with
            // its second message, at 40 ms; renamed since.
            setup
                .batch_execute(
                    "INSERT INTO users (username, password_hash, created_at_ms)
                         VALUES ('alice', 'h', 1), ('bob', 'h', 1);
                     INSERT INTO conversations (kind, name, created_at_ms, last_seq, last_activity_ms)
                         VALUES (2, 'trip 2', 1, 2, 40);
                     INSERT INTO members (conversation_id, user_id, role, joined_seq, delivered_seq, seen_seq)
                         SELECT c.id, u.id, 1, 0, 0, 0 FROM conversations c, users u
                         WHERE u.username = 'alice';
                     INSERT INTO messages (conversation_id, seq, sender_id, client_msg_id, type, sent_at_ms, body)
                         SELECT c.id, s, u.id, 'k' || s, 1, 10 * s + 20, 'x'
                         FROM conversations c, users u, generate_series(1, 2) s
                         WHERE u.username = 'alice';
                     INSERT INTO former_members (user_id, conversation_id, joined_seq, left_seq)
                         SELECT u.id, c.id, 0, 2 FROM conversations c, users u
                         WHERE u.username = 'bob';",
                )
                .await
                .unwrap();
            drop(setup);
            let store = PostgresStore::connect_with_schema(&test_url(), &schema, 1)
                .await
                .expect("the store applies V14 on");
            let bob = store.user_by_name("bob".into()).await.unwrap().unwrap().id;
            let removal = 2;
            let list = store.conversations(bob, (0, 0), 10).await.unwrap();
            let g = list.first().expect("listed").id;
            let list = store.conversations(bob, (0, 0), 10).await.unwrap();
            let entry = list.iter().find(|v| v.id == g).expect("listed");
            assert!(entry.former);
            assert_eq!(
                (entry.name.as_str(), entry.last_seq, entry.last_activity_ms),
                ("trip 2", removal, 40)
            );
            // As a node of the version before writes it, during a rolling
            // upgrade: no time, no name. Listed all the same, at the time of
            // the message that ended the stay, under the group's name.
            admin()
                .await
                .batch_execute(&format!(
                    "UPDATE \"{schema}\".former_members SET left_ms = DEFAULT, name = DEFAULT;
                     UPDATE \"{schema}\".conversations SET name = 'trip 3';"
                ))
                .await
                .unwrap();
            let list = store.conversations(bob, (0, 0), 10).await.unwrap();
            store.close();
            let entry = list.iter().find(|v| v.id == g).expect("listed");
            assert!(entry.former);
            assert_eq!(
                (entry.name.as_str(), entry.last_seq, entry.last_activity_ms),
                ("trip 3", removal, 40)
            );
        }
    })
    .await;
    drop_schema(&schema).await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A group commit that mixes everything: new messages in two
/// conversations, a retry, a duplicate inside the batch, refusals,
/// runs of one sender, a batch with nothing new. Returns what a client
/// could observe, so that two backends can be compared.
async fn mixed_batches(store: &impl HistoryStore) -> Vec<String> {
    let a = user(store, "alice").await;
    let b = user(store, "bob").await;
    let eve = user(store, "eve").await;
    let c = befriend(store, a, b).await;
    let c2 = befriend(store, a, eve).await;
    let name = |u: UserId| {
        [(a, "alice"), (b, "bob"), (eve, "eve")]
            .iter()
            .find(|(id, _)| *id == u)
            .map_or("?", |(_, n)| n)
    };
    let mut seen = Vec::new();
    let mut record = |label: &str, results: Vec<Result<Appended, StoreError>>| {
        for (i, r) in results.into_iter().enumerate() {
            seen.push(match r {
                Ok(x) => format!(
                    "{label}[{i}] c{} seq {} {} {:?} dup={} members={}",
                    if x.message.conversation_id == c { 1 } else { 2 },
                    x.message.seq,
                    name(x.message.sender_id),
                    x.message.text,
                    x.duplicate,
                    x.members.len()
                ),
                Err(e) => format!("{label}[{i}] {e}"),
            });
        }
    };
    let umlauts = "ü".repeat(150);
    let first = store
        .append(vec![
            text(c, a, "k1", "one"),
            text(c, b, "k1", "two"),
            text(c, a, "k1", "one again, same batch"),
            text(c, eve, "e1", "intrusion"),
            text(c, a, "k2", "three"),
            text(c2, a, "x1", "hi eve"),
            text(c2, eve, "e1", "hi alice"),
            text(c2, eve, "e1", "hi alice, twice"),
            text(424_242, a, "k9", "nowhere"),
            text(c2, a, "x2", &umlauts),
        ])
        .await
        .unwrap();
    let first_ids: Vec<u64> = first
        .iter()
        .map(|r| r.as_ref().map_or(0, |x| x.message.message_id))
        .collect();
    assert_eq!(
        first_ids[0], first_ids[2],
        "in-batch duplicate is the original"
    );
    assert_eq!(first_ids[6], first_ids[7]);
    record("first", first);
    // Bob catches up, then a batch with a run of his.
    store
        .advance_watermarks(vec![WatermarkUpdate {
            conversation_id: c,
            user_id: b,
            kind: WatermarkKind::Seen,
            seq: 3,
        }])
        .await
        .unwrap();
    let second = store
        .append(vec![
            text(c, b, "k5", "four"),
            text(c, b, "k6", "five"),
            text(c, a, "k7", "six"),
            text(c, b, "k8", "seven"),
            text(c, a, "k1", "one, a later retry"),
        ])
        .await
        .unwrap();
    record("second", second);
    let nothing_new = store
        .append(vec![text(c, a, "k2", "retry"), text(c, eve, "e2", "no")])
        .await
        .unwrap();
    record("nothing new", nothing_new);

    for (label, conversation) in [("c1", c), ("c2", c2)] {
        for viewer in [a, b, eve] {
            match store.conversation(conversation, viewer).await {
                Ok(v) => {
                    let marks: Vec<String> = v
                        .members
                        .iter()
                        .map(|m| format!("{}:{}/{}", m.username, m.delivered_seq, m.seen_seq))
                        .collect();
                    seen.push(format!(
                        "{label} as {}: last {} unread {} preview {:?} marks {marks:?}",
                        name(viewer),
                        v.last_seq,
                        v.unread_count,
                        v.last_message.map(|m| m.text)
                    ));
                }
                Err(e) => seen.push(format!("{label} as {}: {e}", name(viewer))),
            }
        }
    }
    for viewer in [a, b, eve] {
        let pending: Vec<String> = store
            .undelivered(viewer, (0, 0), 100)
            .await
            .unwrap()
            .iter()
            .map(|m| format!("{}#{}", m.text, m.seq))
            .collect();
        seen.push(format!("{} pending {pending:?}", name(viewer)));
    }
    let page = store.history(c, Direction::Backward, 0, 100).await.unwrap();
    seen.push(format!(
        "history {:?}",
        page.messages.iter().map(|m| &m.text).collect::<Vec<_>>()
    ));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_matches_the_embedded_store_message_for_message() {
    with_store(|store| async move {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = SqliteStore::open(dir.path()).unwrap();
        let expected = mixed_batches(&sqlite).await;
        let got = mixed_batches(&*store).await;
        assert_eq!(got, expected);
        // The scenario means what it says.
        assert!(
            got.iter()
                .any(|l| l.contains("first[2] c1 seq 1") && l.contains("dup=true"))
        );
        assert!(
            got.iter()
                .any(|l| l == "first[3] not a member of the conversation")
        );
        assert!(got.iter().any(|l| l.contains("bob:5/5")), "{got:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crossing_batches_and_watermarks_do_not_deadlock() {
    with_store(|store| async move {
        let mut users = Vec::new();
        for name in ["u0", "u1", "u2", "u3"] {
            users.push(user(&*store, name).await);
        }
        let mut conversations = Vec::new();
        for (i, &x) in users.iter().enumerate() {
            for &y in &users[i + 1..] {
                conversations.push((befriend(&*store, x, y).await, x, y));
            }
        }
        const WRITERS: u64 = 4;
        const ROUNDS: u64 = 15;
        const PER_CONVERSATION: u64 = 4;
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let (store, conversations) = (store.clone(), conversations.clone());
            tasks.push(tokio::spawn(async move {
                for round in 0..ROUNDS {
                    let mut order = conversations.clone();
                    order.shuffle(&mut rand::rng());
                    let batch: Vec<NewMessage> = order
                        .iter()
                        .flat_map(|&(c, x, y)| {
                            (0..PER_CONVERSATION).map(move |i| {
                                let sender = if i % 2 == 0 { x } else { y };
                                text(c, sender, &format!("w{w}-r{round}-c{c}-{i}"), "x")
                            })
                        })
                        .collect();
                    for r in store.append(batch).await.expect("append") {
                        r.expect("every message is stored");
                    }
                }
            }));
        }
        for _ in 0..2 {
            let (store, conversations) = (store.clone(), conversations.clone());
            tasks.push(tokio::spawn(async move {
                for round in 0..ROUNDS * 2 {
                    let mut updates: Vec<WatermarkUpdate> = conversations
                        .iter()
                        .flat_map(|&(c, x, y)| {
                            [x, y].map(|user_id| WatermarkUpdate {
                                conversation_id: c,
                                user_id,
                                kind: if round % 2 == 0 {
                                    WatermarkKind::Delivered
                                } else {
                                    WatermarkKind::Seen
                                },
                                seq: round * 8,
                            })
                        })
                        .collect();
                    updates.shuffle(&mut rand::rng());
                    store.advance_watermarks(updates).await.expect("advance");
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let per_conversation = WRITERS * ROUNDS * PER_CONVERSATION;
        for &(c, x, _) in &conversations {
            let page = store
                .history(c, Direction::Forward, 0, 10_000)
                .await
                .unwrap();
            let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=per_conversation).collect::<Vec<_>>());
            let view = store.conversation(c, x).await.unwrap();
            assert_eq!(view.last_seq, per_conversation);
            assert!(view.members.iter().all(|m| m.seen_seq <= m.delivered_seq));
        }
    })
    .await;
}

/// Accepting and removing a friendship take the pair's lock, as requests
/// do. A removal whose snapshot predated a crossing accept's commit found
/// nothing to remove, answered "nothing removed" and left the two friends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_and_removing_a_friendship_are_serialised() {
    with_store(|store| async move {
        let a = user(&*store, "a").await;
        let b = user(&*store, "b").await;
        store.friend_request(a, b, 1).await.unwrap();
        // Someone holds the pair's lock (the session-level twin of it), in
        // the store's schema: the key names it.
        let holder = admin().await;
        let schema = schema_of(&store);
        holder
            .batch_execute(&format!("SET search_path TO \"{schema}\""))
            .await
            .unwrap();
        let pair = [sql(a), sql(b)];
        let hold = LOCK_PAIR.replace("pg_advisory_xact_lock", "pg_advisory_lock");
        holder.execute(&hold, &[&pair[0], &pair[1]]).await.unwrap();
        let holder_pid = backend_pid(&holder).await;
        let watcher = admin().await;
        let accept = tokio::spawn({
            let store = store.clone();
            async move { store.friend_accept(b, a, 2).await }
        });
        blocked_by(
            &watcher,
            holder_pid,
            1,
            "the accept waits for the pair's lock",
        )
        .await;
        let remove = tokio::spawn({
            let store = store.clone();
            async move { store.friend_remove(a, b).await }
        });
        blocked_by(
            &watcher,
            holder_pid,
            2,
            "the removal waits for the pair's lock",
        )
        .await;
        let unhold = hold.replace("pg_advisory_lock", "pg_advisory_unlock");
        holder
            .execute(&unhold, &[&pair[0], &pair[1]])
            .await
            .unwrap();
        accept.await.unwrap().expect("accepted");
        assert!(
            remove.await.unwrap().unwrap(),
            "the removal found the friendship"
        );
        assert!(!store.are_friends(a, b).await.unwrap());
    })
    .await;
}

/// The schema a test store works in.
fn schema_of(store: &PostgresStore) -> String {
    store
        .schema()
        .expect("a test store has a schema")
        .to_owned()
}

/// The backend process id of `client`'s connection (to see who waits for
/// its locks).
async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// A new group "g" of `owner` (admin) and `members`, who must be the
/// owner's friends.
async fn new_group(store: &PostgresStore, owner: UserId, members: Vec<UserId>) -> ConversationId {
    let group = NewGroup {
        creator: owner,
        name: "g".into(),
        members,
        client_key: None,
    };
    let GroupCreated::New(created) = store.create_group(group, 10, 10).await.unwrap() else {
        panic!("a new group");
    };
    created.message.conversation_id
}

/// Waits until `n` backends wait for a lock `holder_pid` holds.
async fn blocked_by(watcher: &tokio_postgres::Client, holder_pid: i32, n: i64, what: &str) {
    let deadline = Instant::now() + PROGRESS_DEADLINE;
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                &[&holder_pid],
            )
            .await
            .unwrap()
            .get(0);
        if waiting >= n {
            return;
        }
        assert!(Instant::now() < deadline, "never blocked: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A send and the end of a friendship are ordered by the direct
/// conversation's row. A removal waits for a group commit holding that
/// row (else a send read as open could be stored after the removal was
/// answered); a group commit waiting for it behind a removal reads the
/// row as closed once it has it, and is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_and_the_end_of_a_friendship_are_ordered() {
    with_store(|store| async move {
        let schema = schema_of(&store);
        let a = user(&*store, "alice").await;
        let b = user(&*store, "bob").await;
        let c = befriend(&*store, a, b).await;
        let watcher = admin().await;
        let lock_row =
            format!(r#"SELECT id FROM "{schema}".conversations WHERE id = $1 FOR NO KEY UPDATE"#);

        // A group commit in flight holds the row: the removal waits for it.
        let mut holder = admin().await;
        let holder_pid = backend_pid(&holder).await;
        let tx = holder.transaction().await.unwrap();
        tx.execute(&lock_row, &[&sql(c)]).await.unwrap();
        let remove = tokio::spawn({
            let store = store.clone();
            async move { store.friend_remove(a, b).await }
        });
        blocked_by(&watcher, holder_pid, 1, "the removal behind a group commit").await;
        assert!(!remove.is_finished());
        tx.commit().await.unwrap();
        assert!(remove.await.unwrap().unwrap());

        // Friends again; now a removal holds the row, as `friend_remove`
        // does (the conversation closed, the friendship rows deleted, not
        // yet committed), while a send waits for the row.
        store.friend_request(a, b, 10).await.unwrap();
        store.friend_accept(b, a, 11).await.unwrap();
        let tx = holder.transaction().await.unwrap();
        tx.execute(
            &format!(r#"UPDATE "{schema}".conversations SET closed = true WHERE id = $1"#),
            &[&sql(c)],
        )
        .await
        .unwrap();
        tx.execute(
            &format!(
                r#"DELETE FROM "{schema}".friends WHERE (user_id = $1 AND friend_id = $2)
                                                    OR (user_id = $2 AND friend_id = $1)"#
            ),
            &[&sql(a), &sql(b)],
        )
        .await
        .unwrap();
        let send = tokio::spawn({
            let store = store.clone();
            async move { store.append(vec![text(c, a, "k1", "crossing")]).await }
        });
        blocked_by(&watcher, holder_pid, 1, "the send behind the removal").await;
        tx.commit().await.unwrap();
        let results = send.await.unwrap().unwrap();
        assert!(
            matches!(results[0], Err(StoreError::NotFriends(x)) if x == b),
            "{:?}",
            results[0]
        );
        let page = store.history(c, Direction::Backward, 0, 10).await.unwrap();
        assert!(page.messages.is_empty());
    })
    .await;
}

/// A retry that waited for its conversation's row behind its original's
/// commit and then a friendship's end is answered as a retry (the
/// original's seq, a duplicate), not refused: what is stored already is
/// read after the lock, as the conversation's state is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_behind_its_original_and_a_removal_keeps_its_answer() {
    with_store(|store| async move {
        let schema = schema_of(&store);
        let a = user(&*store, "alice").await;
        let b = user(&*store, "bob").await;
        let c = befriend(&*store, a, b).await;
        // The original's commit and the removal after it, as one
        // transaction holding the row: the message stored, the
        // conversation closed.
        let mut holder = admin().await;
        let holder_pid = backend_pid(&holder).await;
        let tx = holder.transaction().await.unwrap();
        tx.execute(
            &format!(
                r#"UPDATE "{schema}".conversations SET last_seq = 1, closed = true WHERE id = $1"#
            ),
            &[&sql(c)],
        )
        .await
        .unwrap();
        tx.execute(
            &format!(
                r#"INSERT INTO "{schema}".messages
                       (conversation_id, seq, sender_id, client_msg_id, type, sent_at_ms, body)
                   VALUES ($1, 1, $2, 'k1', $3, 1000, 'first')"#
            ),
            &[&sql(c), &sql(a), &(proto::MessageType::Text as i32)],
        )
        .await
        .unwrap();
        let retry = tokio::spawn({
            let store = store.clone();
            async move { store.append(vec![text(c, a, "k1", "first")]).await }
        });
        let watcher = admin().await;
        blocked_by(&watcher, holder_pid, 1, "the retry behind its original").await;
        tx.commit().await.unwrap();
        let results = retry.await.unwrap().unwrap();
        let answer = results[0].as_ref().expect("a retry keeps its answer");
        assert!(answer.duplicate);
        assert_eq!(answer.message.seq, 1);
    })
    .await;
}

/// Two group commits that share no conversation can deadlock over one
/// sender's keys, each holding one the other inserts next (a client
/// reusing keys across conversations, with several committers). Postgres
/// fails one; that one starts over, rather than answering UNAVAILABLE to
/// every sender in it, and finds the other's keys stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_commit_that_loses_a_deadlock_starts_over() {
    // Our store's connections look for a deadlock after waiting 10 s, the
    // other batch's after two minutes: Postgres fails ours, as long as the
    // cycle closes within 10 s of our wait (it closes as soon as the wait
    // is seen; past 10 s the other would be failed, and the test with it,
    // rather than hang).
    let url = test_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{separator}options=-c%20deadlock_timeout%3D10s");
    with_store_at(&url, |store| async move {
        let schema = schema_of(&store);
        let a = user(&*store, "alice").await;
        let b = user(&*store, "bob").await;
        let c = user(&*store, "carol").await;
        let ours = befriend(&*store, a, b).await;
        let theirs = befriend(&*store, a, c).await;
        let mut other = admin().await;
        let other_pid = backend_pid(&other).await;
        let tx = other.transaction().await.unwrap();
        tx.batch_execute("SET LOCAL deadlock_timeout = '2min'")
            .await
            .unwrap();
        let insert = format!(
            r#"INSERT INTO "{schema}".messages
                   (conversation_id, seq, sender_id, client_msg_id, type, sent_at_ms, body)
               VALUES ($1, $2, $3, $4, $5, 1000, 'other')"#
        );
        let kind = proto::MessageType::Text as i32;
        // The other batch holds k2, while ours inserts k1 and waits for k2.
        tx.execute(&insert, &[&sql(theirs), &1_i64, &sql(a), &"k2", &kind])
            .await
            .unwrap();
        let batch = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .append(vec![text(ours, a, "k1", "one"), text(ours, a, "k2", "two")])
                    .await
            }
        });
        let watcher = admin().await;
        blocked_by(&watcher, other_pid, 1, "our batch behind the other's key").await;
        // The other wants k1 now: the cycle closes, and Postgres fails ours.
        tx.execute(&insert, &[&sql(theirs), &2_i64, &sql(a), &"k1", &kind])
            .await
            .expect("the other batch goes on");
        tx.commit().await.unwrap();
        let results = batch
            .await
            .unwrap()
            .expect("the batch starts over instead of failing");
        for result in &results {
            assert!(
                matches!(result, Err(StoreError::Invalid(_))),
                "keys stored for another conversation: {result:?}"
            );
        }
    })
    .await;
}

/// A group change that relies on a friendship and the end of that
/// friendship are ordered: an add that reads the friendship while a
/// removal has deleted it (not yet committed) waits, then finds it gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_add_and_the_end_of_the_friendship_are_ordered() {
    with_store(|store| async move {
        let schema = schema_of(&store);
        let owner = user(&*store, "owner").await;
        let member = user(&*store, "member").await;
        let late = user(&*store, "late").await;
        befriend(&*store, owner, member).await;
        befriend(&*store, owner, late).await;
        let group = new_group(&store, owner, vec![member]).await;
        // A removal of owner and late, deleted and not yet committed.
        let mut holder = admin().await;
        let holder_pid = backend_pid(&holder).await;
        let tx = holder.transaction().await.unwrap();
        tx.execute(
            &format!(
                r#"DELETE FROM "{schema}".friends WHERE (user_id = $1 AND friend_id = $2)
                                                    OR (user_id = $2 AND friend_id = $1)"#
            ),
            &[&sql(owner), &sql(late)],
        )
        .await
        .unwrap();
        let add = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .change_group(
                        GroupEdit::new(group, owner, GroupChange::Add(vec![late])),
                        10,
                        20,
                    )
                    .await
            }
        });
        let watcher = admin().await;
        blocked_by(&watcher, holder_pid, 1, "the add behind the removal").await;
        tx.commit().await.unwrap();
        let outcome = add.await.unwrap();
        assert!(
            matches!(outcome, Err(StoreError::NotFriends(x)) if x == late),
            "{outcome:?}"
        );
    })
    .await;
}

/// A group change locks the member rows it writes before it writes any,
/// in the order watermark batches lock them. A batch holding the actor's
/// row (their ack) that then wants the removed member's row used to
/// deadlock with a removal that had deleted that row and waited for the
/// actor's: Postgres broke it after a second by failing the change, and
/// both committers stalled meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_change_and_a_crossing_watermark_batch_do_not_deadlock() {
    with_store(|store| async move {
        let schema = schema_of(&store);
        // The owner's id is below the member's: the batch locks it first.
        let owner = user(&*store, "owner").await;
        let member = user(&*store, "member").await;
        let other = user(&*store, "other").await;
        befriend(&*store, owner, member).await;
        befriend(&*store, owner, other).await;
        let group = new_group(&store, owner, vec![member, other]).await;
        let (group_sql, owner_sql, member_sql) = (sql(group), sql(owner), sql(member));

        // The "watermark batch": the owner's row locked, as LOCK_MEMBERS does.
        let batch = admin().await;
        batch.batch_execute("BEGIN").await.unwrap();
        batch
            .execute(
                &format!(
                    r#"SELECT 1 FROM "{schema}".members
                       WHERE conversation_id = $1 AND user_id = $2 FOR NO KEY UPDATE"#
                ),
                &[&group_sql, &owner_sql],
            )
            .await
            .unwrap();
        let batch_pid = backend_pid(&batch).await;

        let change = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .change_group(
                        GroupEdit::new(group, owner, GroupChange::Remove(member)),
                        10,
                        20,
                    )
                    .await
            }
        });
        // Until the change waits for the batch.
        let watcher = admin().await;
        let deadline = Instant::now() + PROGRESS_DEADLINE;
        loop {
            let waiting: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    &[&batch_pid],
                )
                .await
                .unwrap()
                .get(0);
            if waiting > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the change never waited for the batch"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The batch moves the member's watermark, as ADVANCE does.
        batch
            .execute(
                &format!(
                    r#"UPDATE "{schema}".members SET delivered_seq = delivered_seq
                       WHERE conversation_id = $1 AND user_id = $2"#
                ),
                &[&group_sql, &member_sql],
            )
            .await
            .expect("the batch is not the deadlock's victim");
        batch.batch_execute("COMMIT").await.unwrap();
        let removed = tokio::time::timeout(PROGRESS_DEADLINE, change)
            .await
            .expect("the change finishes")
            .unwrap()
            .expect("the change is not the deadlock's victim");
        assert_eq!(removed.message.seq, 2);
        assert!(!store.is_member(group, member).await.unwrap());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_by_itself_after_its_connections_are_killed() {
    with_store(|store| async move {
        let a = user(&*store, "alice").await;
        let b = user(&*store, "bob").await;
        let c = befriend(&*store, a, b).await;
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));

        // Two writers and a reader keep calls in flight throughout.
        let mut writers = Vec::new();
        for (w, sender) in [a, b].into_iter().enumerate() {
            let (store, stop, acked) = (store.clone(), stop.clone(), acked.clone());
            writers.push(tokio::spawn(async move {
                let mut failed = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let key = format!("w{w}-{i}");
                    match store.append(vec![text(c, sender, &key, "x")]).await {
                        Ok(results) => match results.as_slice() {
                            [Ok(_)] => {
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            other => panic!("per-message result: {other:?}"),
                        },
                        Err(StoreError::Unavailable(_) | StoreError::Unsettled(_)) => {
                            failed.push((sender, key))
                        }
                        Err(e) => panic!("append while connections die: {e:?}"),
                    }
                }
                failed
            }));
        }
        let reader = {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut unavailable = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match store.conversation(c, a).await {
                        Ok(_) => {}
                        Err(StoreError::Unavailable(_)) => unavailable += 1,
                        Err(e) => panic!("read while connections die: {e:?}"),
                    }
                }
                unavailable
            })
        };

        let admin = admin().await;
        for round in 0..3 {
            // Progress since the previous kill shows the pool recovered.
            let target = acked.load(Ordering::Relaxed) + 20;
            wait_for(&acked, target, &format!("appends before kill {round}")).await;
            let killed: i64 = admin
                .query_one(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
                     FROM pg_stat_activity
                     WHERE application_name = $1 AND pid <> pg_backend_pid()",
                    &[&store.application_name()],
                )
                .await
                .unwrap()
                .get(0);
            assert!(killed >= 1, "the store had no connection to kill");
        }
        let target = acked.load(Ordering::Relaxed) + 20;
        wait_for(&acked, target, "appends after the last kill").await;
        stop.store(true, Ordering::Relaxed);
        let mut failed = Vec::new();
        for writer in writers {
            failed.extend(writer.await.unwrap());
        }
        let reads_failed = reader.await.unwrap();
        let _ = writeln!(
            std::io::stderr(),
            "kill test: {} appends acked, {} appends and {reads_failed} reads got Unavailable",
            acked.load(Ordering::Relaxed),
            failed.len()
        );

        // The same store works again. A pooled connection killed while
        // idle is discarded at checkout once its task has seen the
        // close, which it does within moments; allow one failure per
        // pooled connection for a task that has not run yet.
        let mut ok = 0;
        let mut unavailable = 0;
        for i in 0..40 {
            match store
                .append(vec![text(c, a, &format!("after-{i}"), "x")])
                .await
            {
                Ok(_) => ok += 1,
                Err(StoreError::Unavailable(_)) => unavailable += 1,
                Err(e) => panic!("append after the kill: {e:?}"),
            }
        }
        assert!(
            unavailable <= TEST_POOL_SIZE,
            "{unavailable} failures after recovery"
        );
        assert!(ok >= 40 - TEST_POOL_SIZE);

        // A failed call stored nothing (one killed at COMMIT was asked
        // after, and reported failed only if it rolled back), so its retry
        // stores the message now, once.
        for (sender, key) in failed {
            let results = store
                .append(vec![text(c, sender, &key, "x")])
                .await
                .expect("retry after recovery");
            let appended = results[0].as_ref().expect("stored");
            assert!(!appended.duplicate, "{key} failed but had been stored");
        }
        let page = store
            .history(c, Direction::Forward, 0, 100_000)
            .await
            .unwrap();
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        let keys: HashSet<(u64, &str)> = page
            .messages
            .iter()
            .map(|m| (m.sender_id, m.client_msg_id.as_str()))
            .collect();
        assert_eq!(keys.len(), page.messages.len(), "no message stored twice");
        assert_eq!(
            store.conversation(c, a).await.unwrap().last_seq,
            seqs.len() as u64
        );
    })
    .await;
}

#[tokio::test]
async fn a_transaction_that_fails_midway_never_goes_back_to_the_pool_open() {
    // Appends send BEGIN with their first statements and have no
    // rollback-on-drop; a batch that fails inside its transaction (here:
    // U+0000, which TEXT cannot hold and which only the server's
    // validation keeps out) must not leave a connection in the pool in
    // an aborted transaction, or later calls on it would fail or, worse,
    // commit with it.
    with_store(|store| async move {
        let a = user(&*store, "alice").await;
        let b = user(&*store, "bob").await;
        let c = befriend(&*store, a, b).await;
        let mut next_seq = 1;
        for round in 0..3 {
            let bad = vec![
                text(c, a, &format!("ok-{round}"), "fine"),
                text(c, b, &format!("bad-{round}"), "nul \0 inside"),
            ];
            assert!(
                store.append(bad).await.is_err(),
                "the batch fails as a whole"
            );
            // More calls than the pool has connections: each one would
            // meet a connection left open by the failure.
            for i in 0..2 * TEST_POOL_SIZE {
                let results = store
                    .append(vec![text(c, a, &format!("good-{round}-{i}"), "fine")])
                    .await
                    .expect("a later append works");
                let appended = results.into_iter().next().unwrap().expect("stored");
                assert_eq!(
                    appended.message.seq, next_seq,
                    "the failed batch took no seq"
                );
                next_seq += 1;
            }
            store.conversation(c, a).await.expect("reads work too");
        }
        let page = store.history(c, Direction::Backward, 0, 200).await.unwrap();
        assert_eq!(page.messages.len() as u64, next_seq - 1);
        assert!(
            page.messages
                .iter()
                .all(|m| m.text == "fine" && !m.client_msg_id.starts_with("ok-"))
        );
    })
    .await;
}

/// The generic plan of `statement` (as the server's cached statements get
/// after a few executions) with `args`, in `schema`.
async fn generic_plan(schema: &str, statement: &str, types: &str, args: &str) -> String {
    let admin = admin().await;
    admin
        .batch_execute(&format!(
            "SET search_path = {schema}; SET plan_cache_mode = force_generic_plan;
             PREPARE probe({types}) AS {statement};"
        ))
        .await
        .expect("prepare");
    let rows = admin
        .query(&format!("EXPLAIN EXECUTE probe({args})"), &[])
        .await
        .expect("explain");
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The updates every batch makes find their conversations by key: joined
/// only to `unnest`, the generic plan scanned the whole table while it was
/// small (and its dead row versions with it), ~400 scans a second at
/// 10,000 sends/s in the benchmark.
#[tokio::test]
async fn batch_updates_find_their_rows_by_key() {
    with_store(|store| async move {
        let (a, b) = (user(&*store, "alice").await, user(&*store, "bob").await);
        befriend(&*store, a, b).await;
        let schema = store
            .schema()
            .expect("test stores have a schema")
            .to_owned();
        let arrays = "ARRAY[1]::bigint[], ARRAY[1]::bigint[], ARRAY[1]::bigint[]";
        let four_args = format!("{arrays}, ARRAY[1]::bigint[]");
        let four = "bigint[], bigint[], bigint[], bigint[]";
        // Each statement and, for each table whose rows it finds, the keys
        // it may find them by (members by either of its two).
        let conversations = ("conversations", &["conversations_pkey"][..]);
        let members = ("members", &["members_pkey", "members_by_user"][..]);
        let statements = [
            (
                "BUMP_SEQS",
                BUMP_SEQS,
                "bigint[], bigint[], bigint[]",
                arrays.to_owned(),
                vec![conversations],
            ),
            (
                "ADVANCE",
                ADVANCE,
                four,
                four_args.clone(),
                vec![conversations, members],
            ),
            (
                "LOCK_MEMBERS",
                LOCK_MEMBERS,
                "bigint[], bigint[]",
                "ARRAY[1]::bigint[], ARRAY[1]::bigint[]".to_owned(),
                vec![members],
            ),
            (
                "OWN_WATERMARKS",
                OWN_WATERMARKS,
                four,
                four_args.clone(),
                vec![members],
            ),
        ];
        for (name, statement, types, args, tables) in statements {
            let plan = generic_plan(&schema, statement, types, &args).await;
            for (table, keys) in tables {
                assert!(
                    keys.iter().any(|key| plan.contains(key))
                        && !plan.contains(&format!("Seq Scan on {table}")),
                    "{name} on {table}:\n{plan}"
                );
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_group_change_settles_its_commit_with_a_pool_of_one() {
    // Settling asks Postgres on a connection of its own. A group change
    // held its broken one meanwhile, so with `postgres-pool-size = 1` the
    // settle never got a connection and a change that had committed was
    // reported failed.
    let cutter = Arc::new(CommitCutter::start().await);
    let url = cutter.url();
    with_store_sized(&url, 1, {
        let cutter = cutter.clone();
        move |store| async move {
            let a = user(&*store, "alice").await;
            let b = user(&*store, "bob").await;
            befriend(&*store, a, b).await;
            let group = NewGroup {
                creator: a,
                name: "trip".into(),
                members: vec![b],
                client_key: None,
            };
            let GroupCreated::New(created) = store.create_group(group, 10, 5).await.unwrap() else {
                panic!("a new group");
            };
            let group = created.message.conversation_id;
            cutter.arm(CUT_ANSWER);
            let renamed = tokio::time::timeout(
                PROGRESS_DEADLINE,
                store.change_group(
                    GroupEdit::new(group, a, GroupChange::Rename("trip 2".into())),
                    10,
                    6,
                ),
            )
            .await
            .expect("settled in time")
            .expect("settled as committed");
            assert_eq!(cutter.cuts(), 1);
            assert_eq!(renamed.message.seq, 2);
        }
    })
    .await;
}

#[tokio::test]
async fn a_commit_whose_answer_is_lost_is_settled_not_guessed() {
    // A COMMIT can succeed and its answer never arrive. Reporting the
    // batch failed would make the client's retry a duplicate, which is
    // acked but never fanned out: its recipients would miss the message.
    // The store must find out what happened instead.
    let cutter = CommitCutter::start().await;
    let cutter = Arc::new(cutter);
    let url = cutter.url();
    with_store_at(&url, {
        let cutter = cutter.clone();
        move |store| async move {
            let a = user(&*store, "alice").await;
            let b = user(&*store, "bob").await;
            let c = befriend(&*store, a, b).await;
            let batch = || vec![text(c, a, "k1", "one"), text(c, b, "k2", "two")];

            // Committed, answer lost: the messages are reported stored.
            cutter.arm(CUT_ANSWER);
            let results = store.append(batch()).await.expect("settled as committed");
            assert_eq!(cutter.cuts(), 1, "the COMMIT's answer was cut");
            let stored: Vec<(u64, u64)> = results
                .iter()
                .map(|r| {
                    let appended = r.as_ref().expect("stored");
                    assert!(!appended.duplicate);
                    (appended.message.seq, appended.message.message_id)
                })
                .collect();
            assert_eq!(stored.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2]);
            // The client's retry is a duplicate of exactly those.
            let retried = store.append(batch()).await.expect("retry");
            for (r, (seq, message_id)) in retried.iter().zip(&stored) {
                let appended = r.as_ref().expect("stored");
                assert!(appended.duplicate);
                assert_eq!(
                    (appended.message.seq, appended.message.message_id),
                    (*seq, *message_id)
                );
            }

            // Never reached Postgres: reported failed, and nothing stored.
            cutter.arm(CUT_BEFORE_COMMIT);
            let more = || vec![text(c, a, "k3", "three")];
            match store.append(more()).await {
                Err(StoreError::Unavailable(_)) => {}
                other => panic!("a rolled-back COMMIT must fail retryably: {other:?}"),
            }
            assert_eq!(cutter.cuts(), 2, "the COMMIT was cut");
            let results = store.append(more()).await.expect("retry");
            let appended = results[0].as_ref().expect("stored");
            assert!(!appended.duplicate, "the failed attempt stored nothing");
            assert_eq!(appended.message.seq, 3);

            // Watermark moves too: a move reported failed would be acked
            // again, move nothing, and its receipt never go out.
            cutter.arm(CUT_ANSWER);
            let moved = store
                .advance_watermarks(vec![WatermarkUpdate {
                    conversation_id: c,
                    user_id: b,
                    kind: WatermarkKind::Seen,
                    seq: 3,
                }])
                .await
                .expect("settled as committed");
            assert_eq!(cutter.cuts(), 3, "the COMMIT's answer was cut");
            assert_eq!(
                moved
                    .iter()
                    .map(|m| (m.user_id, m.delivered_seq, m.seen_seq))
                    .collect::<Vec<_>>(),
                [(b, 3, 3)]
            );

            // Group changes commit the same way.
            let friend = user(&*store, "carol").await;
            befriend(&*store, a, friend).await;
            cutter.arm(CUT_ANSWER);
            let group = NewGroup {
                creator: a,
                name: "trip".into(),
                members: vec![b, friend],
                client_key: None,
            };
            let created = store
                .create_group(group, 10, 5)
                .await
                .expect("settled as committed");
            assert_eq!(cutter.cuts(), 4);
            let GroupCreated::New(created) = created else {
                panic!("created nothing: {created:?}");
            };
            let group = created.message.conversation_id;
            cutter.arm(CUT_ANSWER);
            let renamed = store
                .change_group(
                    GroupEdit::new(group, a, GroupChange::Rename("trip 2".into())),
                    10,
                    6,
                )
                .await
                .expect("settled as committed");
            assert_eq!(cutter.cuts(), 5);
            assert_eq!(renamed.message.seq, 2);
            let view = store.conversation(group, b).await.unwrap();
            assert_eq!((view.name.as_str(), view.last_seq), ("trip 2", 2));
            let page = store.history(c, Direction::Forward, 0, 100).await.unwrap();
            let keys: Vec<&str> = page
                .messages
                .iter()
                .map(|m| m.client_msg_id.as_str())
                .collect();
            assert_eq!(keys, ["k1", "k2", "k3"]);
        }
    })
    .await;
}

/// Alice's first conversation-list page of two, its views held behind a
/// lock on `mutes` (which only the views read, prepared or not) until
/// [`release`](Self::release), so that a test can change what the page
/// already chose. Alice has three direct conversations, with bob, carol
/// and dave, last active at 100, 200 and 300 ms.
struct HeldPage {
    schema: String,
    alice: UserId,
    /// With bob, carol and dave.
    direct: [ConversationId; 3],
    /// A connection of the test's own, to change things while it waits.
    watcher: tokio_postgres::Client,
    holder: tokio_postgres::Client,
    page: tokio::task::JoinHandle<Result<Vec<ConversationView>, StoreError>>,
}

impl HeldPage {
    async fn start(store: &Arc<PostgresStore>) -> HeldPage {
        let schema = schema_of(store);
        let alice = user(&**store, "alice").await;
        let watcher = admin().await;
        let mut direct = [0; 3];
        for (i, (name, at)) in [("bob", 100i64), ("carol", 200), ("dave", 300)]
            .into_iter()
            .enumerate()
        {
            let other = user(&**store, name).await;
            direct[i] = befriend(&**store, alice, other).await;
            watcher
                .execute(
                    &format!(
                        r#"UPDATE "{schema}".conversations SET last_activity_ms = $2 WHERE id = $1"#
                    ),
                    &[&sql(direct[i]), &at],
                )
                .await
                .unwrap();
        }
        let holder = admin().await;
        let holder_pid = backend_pid(&holder).await;
        holder
            .batch_execute(&format!(
                r#"BEGIN; LOCK TABLE "{schema}".mutes IN ACCESS EXCLUSIVE MODE"#
            ))
            .await
            .unwrap();
        let page = tokio::spawn({
            let store = store.clone();
            async move { store.conversations(alice, (0, 0), 2).await }
        });
        blocked_by(&watcher, holder_pid, 1, "the views behind the lock").await;
        HeldPage {
            schema,
            alice,
            direct,
            watcher,
            holder,
            page,
        }
    }

    /// Lets the page's views read on, and returns the page.
    async fn release(self) -> Vec<ConversationView> {
        self.holder.batch_execute("COMMIT").await.unwrap();
        self.page.await.unwrap().unwrap()
    }
}

fn ids(page: &[ConversationView]) -> Vec<ConversationId> {
    page.iter().map(|v| v.id).collect()
}

/// A page of the conversation list carries the activity times it was
/// ordered by. The views are read by a later statement, which used to
/// carry a newer time for a conversation that got a message in between:
/// the client's next cursor then started above the page, and the next
/// page repeated it. Here carol's conversation gets newer while the page's
/// views wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_list_page_keeps_the_times_it_was_ordered_by() {
    with_store(|store| async move {
        let held = HeldPage::start(&store).await;
        let (a, [bob, carol, dave]) = (held.alice, held.direct);
        held.watcher
            .execute(
                &format!(
                    r#"UPDATE "{}".conversations SET last_activity_ms = 400 WHERE id = $1"#,
                    held.schema
                ),
                &[&sql(carol)],
            )
            .await
            .unwrap();
        let first = held.release().await;
        assert_eq!(ids(&first), [dave, carol]);
        assert_eq!(first[1].last_activity_ms, 200, "the time it was ordered by");

        let last = &first[1];
        let second = store
            .conversations(a, (last.last_activity_ms, last.id), 2)
            .await
            .unwrap();
        assert_eq!(ids(&second), [bob], "nothing of the first page again");
    })
    .await;
}

/// An entry whose membership ends between the page's read and its views'
/// is left out, and the page reads on past it: a page shorter than asked
/// is still only the last (it came back short, and a client that got an
/// empty one stopped paging). Here alice's membership of carol's
/// conversation ends while the page's views wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_list_page_reads_on_past_an_entry_that_left_it() {
    with_store(|store| async move {
        let held = HeldPage::start(&store).await;
        let [bob, carol, dave] = held.direct;
        held.watcher
            .execute(
                &format!(
                    r#"DELETE FROM "{}".members WHERE conversation_id = $1 AND user_id = $2"#,
                    held.schema
                ),
                &[&sql(carol), &sql(held.alice)],
            )
            .await
            .unwrap();
        let first = held.release().await;
        assert_eq!(
            ids(&first),
            [dave, bob],
            "a full page, past the one she left"
        );
    })
    .await;
}

/// The friend lists come from one snapshot. Read in four statements, an
/// accept committed between the friends list and the requests left the
/// new friend in neither. Here the requests' read waits behind a lock on
/// `friend_requests` while bob's request to alice is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_friend_lists_do_not_miss_a_friendship_accepted_while_read() {
    // One connection, whose statements are already prepared: a statement
    // being prepared would wait for the lock before any of them ran.
    with_store_sized(&test_url(), 1, |store| async move {
        let schema = schema_of(&store);
        let a = user(&*store, "alice").await;
        let b = user(&*store, "bob").await;
        store.friend_request(b, a, 1).await.unwrap();
        let before = store.friends(a).await.unwrap();
        assert_eq!(before.incoming, [(b, "bob".to_owned())]);
        assert!(before.friends.is_empty());

        let watcher = admin().await;
        let mut holder = admin().await;
        let holder_pid = backend_pid(&holder).await;
        let tx = holder.transaction().await.unwrap();
        tx.batch_execute(&format!(
            r#"LOCK TABLE "{schema}".friend_requests IN ACCESS EXCLUSIVE MODE"#
        ))
        .await
        .unwrap();
        let lists = tokio::spawn({
            let store = store.clone();
            async move { store.friends(a).await }
        });
        blocked_by(&watcher, holder_pid, 1, "the requests behind the lock").await;
        // Alice accepts bob, as friend_accept writes it, inside the holder.
        tx.batch_execute(&format!(
            r#"DELETE FROM "{schema}".friend_requests WHERE from_id = {b} AND to_id = {a};
               INSERT INTO "{schema}".friends (user_id, friend_id, since_ms)
                   VALUES ({a}, {b}, 2), ({b}, {a}, 2);"#,
            a = sql(a),
            b = sql(b),
        ))
        .await
        .unwrap();
        tx.commit().await.unwrap();
        let lists = lists.await.unwrap().unwrap();
        assert_eq!(
            (lists.friends, lists.incoming),
            (vec![(b, "bob".to_owned())], vec![]),
            "bob is either a friend or a request, never neither"
        );
    })
    .await;
}

/// Friendship changes settle a COMMIT whose answer was lost, as appends
/// do. Reported failed, the change was there all the same, and the retry
/// answered wrongly: an accept found no request (NOT_FOUND), a removal or
/// a block found nothing to end, so the ex-friend never heard.
#[tokio::test]
async fn a_friendship_change_whose_commit_answer_is_lost_is_settled() {
    let cutter = Arc::new(CommitCutter::start().await);
    let url = cutter.url();
    with_store_at(&url, {
        let cutter = cutter.clone();
        move |store| async move {
            let a = user(&*store, "alice").await;
            let b = user(&*store, "bob").await;
            let lost = |n: u64| {
                assert_eq!(cutter.cuts(), n, "the COMMIT's answer was cut");
            };

            cutter.arm(CUT_ANSWER);
            let asked = store.friend_request_within(a, b, 1, 10).await;
            lost(1);
            assert!(
                matches!(asked, Ok(FriendRequestOutcome::Requested)),
                "{asked:?}"
            );

            cutter.arm(CUT_ANSWER);
            let accepted = store.friend_accept_within(b, a, 2, 10).await;
            lost(2);
            assert!(matches!(accepted, Ok(true)), "{accepted:?}");
            assert!(store.are_friends(a, b).await.unwrap());

            cutter.arm(CUT_ANSWER);
            let removed = store.friend_remove(a, b).await;
            lost(3);
            assert!(matches!(removed, Ok(true)), "{removed:?}");
            assert!(!store.are_friends(a, b).await.unwrap());

            befriend(&*store, a, b).await;
            cutter.arm(CUT_ANSWER);
            let blocked = store.block(a, b, 3, 10).await;
            lost(4);
            assert!(
                matches!(blocked, Ok(BlockOutcome::Blocked { ended: true })),
                "{blocked:?}"
            );
            assert!(!store.are_friends(a, b).await.unwrap());
        }
    })
    .await;
}

/// A group change's key taken meanwhile by a message of the actor's in
/// another conversation, not yet committed when the change looked: the
/// change is refused as a repeated key is (INVALID_ARGUMENT), not failed
/// as a store error (INTERNAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_change_whose_key_is_taken_meanwhile_is_refused() {
    with_store(|store| async move {
        let schema = schema_of(&store);
        let a = user(&*store, "alice").await;
        let b = user(&*store, "bob").await;
        let direct = befriend(&*store, a, b).await;
        let group = new_group(&store, a, vec![b]).await;

        let mut holder = admin().await;
        let holder_pid = backend_pid(&holder).await;
        let tx = holder.transaction().await.unwrap();
        tx.execute(
            &format!(
                r#"INSERT INTO "{schema}".messages
                       (conversation_id, seq, sender_id, client_msg_id, type, sent_at_ms, body)
                   VALUES ($1, 1000, $2, 'k', 1, 1, 'elsewhere')"#
            ),
            &[&sql(direct), &sql(a)],
        )
        .await
        .unwrap();
        let rename = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .change_group(
                        GroupEdit::new(group, a, GroupChange::Rename("trip".into())).keyed("k"),
                        10,
                        20,
                    )
                    .await
            }
        });
        let watcher = admin().await;
        blocked_by(
            &watcher,
            holder_pid,
            1,
            "the change's insert behind the key",
        )
        .await;
        tx.commit().await.unwrap();
        let outcome = rename.await.unwrap();
        assert!(
            matches!(outcome, Err(StoreError::Invalid(_))),
            "{outcome:?}"
        );
    })
    .await;
}

/// A connection whose startup options were dropped (by a pooler) is
/// refused when it would run without durable commits, another isolation
/// or another schema; the settings the store asks for pass.
#[test]
fn connections_without_the_startup_options_are_refused() {
    let settings = |schema: &str, synchronous_commit: &str, isolation: &str| SessionSettings {
        schema: Some(schema.to_owned()),
        synchronous_commit: synchronous_commit.to_owned(),
        isolation: isolation.to_owned(),
    };
    let ours = settings("chat", "on", "read committed");
    assert_eq!(ours.check(Some("chat")), Ok(()));
    assert_eq!(ours.check(None), Ok(()));
    for durable in ["remote_apply", "remote_write", "local"] {
        assert_eq!(
            settings("chat", durable, "read committed").check(Some("chat")),
            Ok(())
        );
    }
    let off = settings("chat", "off", "read committed")
        .check(None)
        .unwrap_err();
    assert!(off.contains("synchronous_commit is off"), "{off}");
    let serializable = settings("chat", "on", "serializable")
        .check(None)
        .unwrap_err();
    assert!(serializable.contains("serializable"), "{serializable}");
    let public = settings("public", "on", "read committed")
        .check(Some("chat"))
        .unwrap_err();
    assert!(public.contains("search_path"), "{public}");
}

/// A watermark batch that moves only a removed member's departure writes
/// after the transaction id is first read: an answer lost on its COMMIT
/// was reported as a failure although the move was stored.
#[tokio::test]
async fn a_departure_only_batch_whose_answer_is_lost_is_settled() {
    let cutter = Arc::new(CommitCutter::start().await);
    let url = cutter.url();
    with_store_at(&url, {
        let cutter = cutter.clone();
        move |store| async move {
            let a = user(&*store, "alice").await;
            let b = user(&*store, "bob").await;
            let c = user(&*store, "carol").await;
            befriend(&*store, a, b).await;
            befriend(&*store, a, c).await;
            let group = new_group(&store, a, vec![b, c]).await;
            store
                .append(vec![text(group, a, "k1", "one")])
                .await
                .unwrap()[0]
                .as_ref()
                .unwrap();
            store
                .change_group(GroupEdit::new(group, a, GroupChange::Remove(b)), 10, 6)
                .await
                .unwrap();
            // Bob's device, removed at seq 3, acknowledges seq 2.
            cutter.arm(CUT_ANSWER);
            let cuts = cutter.cuts();
            store
                .advance_watermarks(vec![WatermarkUpdate {
                    conversation_id: group,
                    user_id: b,
                    kind: WatermarkKind::Delivered,
                    seq: 2,
                }])
                .await
                .expect("settled as committed");
            assert_eq!(cutter.cuts(), cuts + 1, "the COMMIT's answer was cut");
        }
    })
    .await;
}

/// A leave locks the rows it writes, not the whole group: another member's
/// row held by a watermark batch (their ack) does not hold it up, unless
/// that member is the one the leave promotes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_locks_only_the_leaver_and_whom_it_promotes() {
    with_store(|store| async move {
        let schema = schema_of(&store);
        let owner = user(&*store, "owner").await;
        let admin_b = user(&*store, "admin_b").await;
        let member = user(&*store, "member").await;
        befriend(&*store, owner, admin_b).await;
        befriend(&*store, owner, member).await;
        let group = new_group(&store, owner, vec![admin_b, member]).await;
        store
            .change_group(
                GroupEdit::new(group, owner, GroupChange::SetAdmin(admin_b, true)),
                10,
                20,
            )
            .await
            .unwrap();

        // The "watermark batch": the plain member's row locked.
        let batch = admin().await;
        batch.batch_execute("BEGIN").await.unwrap();
        batch
            .execute(
                &format!(
                    r#"SELECT 1 FROM "{schema}".members
                       WHERE conversation_id = $1 AND user_id = $2 FOR NO KEY UPDATE"#
                ),
                &[&sql(group), &sql(member)],
            )
            .await
            .unwrap();
        // The owner is not the only admin: nobody is promoted.
        let leave = store.change_group(GroupEdit::new(group, owner, GroupChange::Leave), 10, 21);
        let left = tokio::time::timeout(PROGRESS_DEADLINE, leave).await;
        // Released before any assertion: a failing test must not leave the
        // leave waiting on the lock.
        batch.batch_execute("COMMIT").await.unwrap();
        left.expect("the leave waited for another member's row")
            .expect("left");
        // (member, admin) as `viewer` sees them.
        let roles = |viewer| {
            let store = store.clone();
            async move {
                let view = store.conversation(group, viewer).await.unwrap();
                let mut members: Vec<(UserId, bool)> =
                    view.members.iter().map(|m| (m.user_id, m.admin)).collect();
                members.sort_unstable();
                members
            }
        };
        assert_eq!(roles(admin_b).await, [(admin_b, true), (member, false)]);

        // The only admin leaves: the member is promoted.
        store
            .change_group(GroupEdit::new(group, admin_b, GroupChange::Leave), 10, 22)
            .await
            .unwrap();
        assert_eq!(roles(member).await, [(member, true)]);
    })
    .await;
}

#[test]
fn connections_give_up_on_a_silently_dead_path_within_half_a_minute() {
    let mut config = Config::new();
    watch_dead_paths(&mut config);
    assert!(config.get_keepalives());
    let probes = config.get_keepalives_idle()
        + config.get_keepalives_interval().expect("an interval")
            * config.get_keepalives_retries().expect("a probe count");
    assert!(probes <= Duration::from_secs(30), "{probes:?}");
    let unacked = *config.get_tcp_user_timeout().expect("a user timeout");
    assert!(unacked <= Duration::from_secs(30), "{unacked:?}");
}

#[tokio::test]
async fn a_registration_whose_answer_is_lost_is_settled_as_made() {
    // The insert committed and its answer was lost: reported failed, the
    // client's retry found the account and was told the name is taken,
    // though it was its own. A registration that did not commit is
    // reported failed, and the name stays free.
    let cutter = Arc::new(CommitCutter::start().await);
    let url = cutter.url();
    with_store_at(&url, {
        let cutter = cutter.clone();
        move |store| async move {
            cutter.arm(CUT_ANSWER);
            let id = tokio::time::timeout(
                PROGRESS_DEADLINE,
                store.create_user("alice".into(), "alice's hash".into(), 1),
            )
            .await
            .expect("settled in time")
            .expect("settled as made");
            assert_eq!(cutter.cuts(), 1, "the COMMIT's answer was cut");
            let stored = store.user_by_name("alice".into()).await.unwrap().unwrap();
            assert_eq!(
                (stored.id, stored.password_hash.as_str()),
                (id, "alice's hash")
            );

            cutter.arm(CUT_BEFORE_COMMIT);
            match store
                .create_user("bob".into(), "bob's hash".into(), 1)
                .await
            {
                Err(StoreError::Unavailable(_)) => {}
                other => panic!("a COMMIT that never left must fail retryably: {other:?}"),
            }
            assert_eq!(cutter.cuts(), 2, "the COMMIT was cut");
            assert!(store.user_by_name("bob".into()).await.unwrap().is_none());
            store
                .create_user("bob".into(), "bob's hash".into(), 1)
                .await
                .expect("the name is free");
        }
    })
    .await;
}
