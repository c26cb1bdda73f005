//! The production backends' failure modes: Redis flushed or down, and
//! unreachable backends at start.

use std::process::Stdio;
use std::time::Duration;

use chat_client::{Client, HistoryDirection};
use chat_server::{Config, Server, ServerError};

use crate::harness::*;
use chat_server::store::postgres;

#[tokio::test]
async fn a_flushed_redis_loses_nothing() {
    let Some(backend) = Backend::production().await else {
        return;
    };
    let server = TestServer::start_on(backend.clone()).await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, _eb) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let bob_identity = bob.identity();
    bob.close();
    let ack = alice
        .send_text(conversation, "survives the flush")
        .await
        .unwrap();
    // Queued for him first, so the flush takes it away.
    backend.wait_queued(bob_identity.user_id, 1).await;

    // Redis keeps nothing on disk: a restart is a flush. Empty this
    // server's keys (FLUSHALL would also wipe parallel tests' keys).
    backend.flush_redis().await;
    let bob_token = bob_identity.token;

    let (bob, mut bob_events) = Client::resume(server.client_config(), &bob_token)
        .await
        .unwrap();
    let got = messages(&mut bob_events, 1).await;
    assert_eq!((got[0].seq, got[0].message_id), (ack.seq, ack.message_id));
    assert_no_message(&mut bob_events, Duration::from_millis(500)).await;
    // The recent cache refills from history too.
    let page = bob
        .history(conversation, HistoryDirection::Backward, 0, 10)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 1);
}

/// A queue holding a different message at a seq history has (a Redis
/// shared by two deployments, or kept across a restore of history) is not
/// believed: the user gets history's message, not the one whose bytes
/// happened to sort first.
#[tokio::test]
async fn a_queued_message_history_does_not_have_is_not_delivered() {
    use chat_server::store::InboxStore;
    use chat_server::store::redis::RedisStore;
    let Some(backend) = Backend::production().await else {
        return;
    };
    let Backend::Production(production) = &backend else {
        unreachable!("a production backend");
    };
    let server = TestServer::start_on(backend.clone()).await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, _eb) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    alice.send_text(conversation, "first").await.unwrap();
    let bob_identity = bob.identity();
    bob.close();
    let ack = alice.send_text(conversation, "the real one").await.unwrap();
    backend
        .wait_queued_through(bob_identity.user_id, conversation, ack.seq)
        .await;
    // Another deployment's message at the same seq, with a lower id, so
    // its bytes sort first in the queue.
    assert!(ack.message_id > 1, "{ack:?}");
    let impostor = chat_client::proto::Message {
        conversation_id: conversation,
        seq: ack.seq,
        message_id: ack.message_id - 1,
        sender_id: alice.identity().user_id,
        client_msg_id: "elsewhere".into(),
        r#type: chat_client::proto::MessageType::Text as i32,
        sent_at_ms: ack.sent_at_ms,
        text: "from another deployment".into(),
        photo: None,
        call: None,
        reply_to_seq: 0,
        unsent: false,
    };
    let redis = RedisStore::connect(&production.redis_url, &production.redis_prefix)
        .await
        .unwrap();
    redis
        .push(vec![(bob_identity.user_id, std::sync::Arc::new(impostor))])
        .await
        .unwrap();

    let (_bob, mut bob_events) = Client::resume(server.client_config(), &bob_identity.token)
        .await
        .unwrap();
    // "first" too: bob closed before taking it.
    let got = messages(&mut bob_events, 2).await;
    assert_eq!(got[0].text, "first");
    assert_eq!(
        (got[1].seq, got[1].message_id, got[1].text.as_str()),
        (ack.seq, ack.message_id, "the real one")
    );
    assert_no_message(&mut bob_events, Duration::from_millis(500)).await;
}

/// A private redis-server on a free port, so a test can stop it without
/// disturbing anyone else.
struct OwnRedis {
    child: tokio::process::Child,
    port: u16,
    _watched: Watched,
}

impl OwnRedis {
    async fn start(port: u16) -> Option<OwnRedis> {
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                assert!(
                    !std::env::var("CHAT_REQUIRE_BACKENDS").is_ok_and(|v| v == "1"),
                    "redis-server required but cannot start: {e}"
                );
                println!("SKIPPED: cannot start redis-server ({e})");
                return None;
            }
        };
        let redis = OwnRedis {
            _watched: Watched::child(child.id()),
            child,
            port,
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn kill(mut self) {
        self.child.kill().await.expect("kill redis-server");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn a_redis_outage_keeps_sends_durable_and_recovers() {
    let port = free_port();
    let Some(redis) = OwnRedis::start(port).await else {
        return;
    };
    let backend = Backend::Production(Production {
        redis_url: redis.url(),
        redis_prefix: "outage:".into(),
        postgres: None,
    });
    let server = TestServer::start_on_with(backend, |c| {
        c.limits.heartbeat_interval = chat_protocol::limits::MIN_HEARTBEAT_INTERVAL;
    })
    .await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    let (carol, _ec) = register(server.client_config(), &name("carol")).await;
    let with_bob = befriend(&alice, &bob).await;
    let with_carol = befriend(&alice, &carol).await;
    let carol_token = carol.identity().token;
    carol.close();

    redis.kill().await;
    // Sends are still acked (durable in history) and online recipients on
    // this node still get them.
    let ack = alice
        .send_text(with_bob, "during the outage")
        .await
        .expect("send while redis is down");
    assert_eq!(messages(&mut bob_events, 1).await[0].seq, ack.seq);
    let for_carol = alice
        .send_text(with_carol, "queued while redis is down")
        .await
        .unwrap();
    // History reads do not need Redis.
    let page = alice
        .history(with_bob, HistoryDirection::Backward, 0, 10)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 1);

    // Redis comes back empty; the offline recipient still gets her message
    // (from history) and presence returns with the next heartbeats.
    let redis = OwnRedis::start(port).await.expect("restart redis-server");
    let (carol, mut carol_events) = Client::resume(server.client_config(), &carol_token)
        .await
        .unwrap();
    let got = messages(&mut carol_events, 1).await;
    assert_eq!(got[0].message_id, for_carol.message_id);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match carol.subscribe_presence(&[alice.identity().user_id]).await {
            Ok(states) if states[0].online => break,
            _ => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(server);
    redis.kill().await;
}

/// A Redis prefix serves one history: a node of another (here an
/// embedded store of its own) on the same Redis and prefix is refused at
/// start, before it could serve the first one's cached messages and
/// unread queues as its own (conversation and user ids mean something
/// only in their own history); the first history's nodes still start.
#[tokio::test]
async fn a_redis_prefix_serves_one_history() {
    let Some(backend) = Backend::production().await else {
        return;
    };
    let mut server = TestServer::start_on(backend.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let other = Config {
        data_dir: dir.path().to_path_buf(),
        postgres_url: None,
        postgres_schema: None,
        ..server.config.clone()
    };
    let err = Server::start(other)
        .await
        .err()
        .expect("another history is refused");
    assert!(matches!(err, ServerError::Backend(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("another history"), "{text}");
    assert!(
        text.contains(&server.config.redis_prefix),
        "names the prefix: {text}"
    );
    // The same history again (a restart; another node) is served.
    server.restart().await;
    let (alice, _events) = register(server.client_config(), &name("alice")).await;
    assert!(alice.is_connected());
    let ready = server.server.as_ref().unwrap().metrics_addr();
    assert_eq!(http_get(ready, "/readyz").await.0, 200);

    // Redis loses its data (a restart without persistence) and another
    // history's node claims the prefix first: the running node says it is
    // not ready, and why, at its next readiness check.
    use chat_server::store::redis::{RedisStore, testing};
    let (url, prefix) = (
        server.config.redis_url.clone().unwrap(),
        server.config.redis_prefix.clone(),
    );
    let intruder = RedisStore::connect(&url, &prefix).await.unwrap();
    let other_history = "f".repeat(32);
    // A lost claim alone is taken back at the next check.
    testing::delete_prefix(&intruder, &prefix).await;
    assert_eq!(http_get(ready, "/readyz").await.0, 200);
    assert!(
        intruder.claim(&other_history).await.unwrap().is_some(),
        "the node claimed it again"
    );
    testing::delete_prefix(&intruder, &prefix).await;
    assert_eq!(intruder.claim(&other_history).await.unwrap(), None);
    let (status, body) = http_get(ready, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("another history"), "{body}");
}

#[tokio::test]
async fn an_unreachable_backend_fails_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        redis_url: Some(format!("redis://user:secret@127.0.0.1:{}/", free_port())),
        ..Config::default()
    };
    let started = tokio::time::Instant::now();
    let err = Server::start(config).await.err().expect("start must fail");
    assert!(matches!(err, ServerError::Backend(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("redis at redis://user:***@127.0.0.1"),
        "{text}"
    );
    assert!(!text.contains("secret"), "no password in errors: {text}");
    assert!(started.elapsed() < WAIT, "bounded connect timeout");
}

/// Installs a trigger in `schema` that fails the first UPDATE of `table`
/// (of the rows `when`, a condition on OLD and NEW) with a serialization
/// failure, which the store answers as retryable, and lets the rest
/// through.
async fn fail_first_update(
    admin: &postgres::testing::Admin,
    schema: &str,
    table: &str,
    when: &str,
) {
    admin
        .batch_execute(&format!(
            r#"
            CREATE SEQUENCE "{schema}".injected_failures;
            CREATE FUNCTION "{schema}".fail_first() RETURNS trigger AS $$
            BEGIN
                IF nextval('"{schema}".injected_failures') = 1 THEN
                    RAISE EXCEPTION 'injected failure' USING ERRCODE = '40001';
                END IF;
                RETURN NEW;
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER fail_first BEFORE UPDATE ON "{schema}".{table}
                FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION "{schema}".fail_first();
            "#
        ))
        .await
        .expect("install the trigger");
}

/// How many updates the trigger of [`fail_first_update`] saw.
async fn updates_tried(admin: &postgres::testing::Admin, schema: &str) -> i64 {
    admin
        .query_one(
            &format!(r#"SELECT last_value FROM "{schema}".injected_failures"#),
            &[],
        )
        .await
        .expect("read the sequence")
        .get(0)
}

/// The production backend and its Postgres schema, or `None` when the
/// test is skipped.
async fn production_with_schema() -> Option<(Backend, String)> {
    let backend = Backend::production().await?;
    let schema = backend
        .postgres_schema()
        .expect("postgres backend")
        .to_string();
    Some((backend, schema))
}

#[tokio::test]
async fn a_postgres_outage_loses_nothing_and_heals_without_a_restart() {
    let Some((backend, schema)) = production_with_schema().await else {
        return;
    };
    let server = TestServer::start_on(backend.clone()).await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;

    // Send a burst while repeatedly killing the server's Postgres
    // connections. Sends caught by a kill get UNAVAILABLE; client-lib
    // retries them with the same client_msg_id.
    const N: usize = 60;
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..N {
                acks.push(
                    alice
                        .send_text(conversation, &format!("m{i}"))
                        .await
                        .expect("acked in the end"),
                );
            }
            acks
        })
    };
    let admin = postgres::testing::admin().await.expect("admin connection");
    let mut killed = 0;
    for _ in 0..10 {
        let rows = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                &[&format!("chat-server {schema}")],
            )
            .await
            .expect("terminate backends");
        killed += rows.len();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(killed > 0, "the test must actually kill connections");
    let acks = tokio::time::timeout(WAIT * 2, sender)
        .await
        .expect("sends finish")
        .unwrap();
    let mut seqs: Vec<u64> = acks.iter().map(|a| a.seq).collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=N as u64).collect::<Vec<_>>(),
        "each message stored once"
    );

    let got = messages(&mut bob_events, N).await;
    assert_eq!(
        got.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=N as u64).collect::<Vec<_>>()
    );
    assert_no_message(&mut bob_events, Duration::from_millis(300)).await;
    // Healed without a restart: new work goes through.
    let after = alice
        .send_text(conversation, "after the outage")
        .await
        .unwrap();
    assert_eq!(after.seq, N as u64 + 1);
    let page = bob
        .history(conversation, HistoryDirection::Forward, 0, 200)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), N + 1);
}

#[tokio::test]
async fn a_leaving_client_is_confirmed_only_once_its_acks_are_stored() {
    // Bob's last ack is written by his shutdown; the server must confirm
    // it (AcksStored, which ends the shutdown) only once that ack is
    // stored. The test holds Bob's member row locked, so the move waits
    // in Postgres: meanwhile the shutdown must not end.
    let Some((backend, schema)) = production_with_schema().await else {
        return;
    };
    let server = TestServer::start_on(backend.clone()).await;
    let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
    let mut config = server.client_config();
    config.delivery_ack_linger = Duration::from_secs(3600);
    let (bob, mut bob_events) = register(config, &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let bob_id = bob.identity().user_id;
    let ack = alice.send_text(conversation, "hello").await.unwrap();
    assert_eq!(messages(&mut bob_events, 1).await[0].seq, ack.seq);

    let mut admin = postgres::testing::admin().await.expect("admin connection");
    let lock = admin.transaction().await.unwrap();
    lock.execute(
        &format!(
            r#"SELECT 1 FROM "{schema}".members
               WHERE conversation_id = $1 AND user_id = $2 FOR UPDATE"#
        ),
        &[&(conversation as i64), &(bob_id as i64)],
    )
    .await
    .unwrap();
    let mut shutdown = tokio::spawn({
        let bob = bob.clone();
        async move { bob.shutdown(Duration::from_secs(3600)).await }
    });
    let early = tokio::time::timeout(Duration::from_millis(500), &mut shutdown)
        .await
        .is_ok();
    // Released before any assertion: a failing test must not leave the
    // node's committer waiting on the lock (its teardown would wait too).
    lock.rollback().await.unwrap();
    assert!(!early, "no confirmation while the ack waits on the lock");
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("confirmed once stored")
        .unwrap();
    let view = alice.conversation(conversation).await.unwrap();
    let bob_view = view.members.iter().find(|m| m.user_id == bob_id).unwrap();
    assert_eq!(bob_view.delivered_seq, ack.seq);
}

#[tokio::test]
async fn a_leaving_client_is_not_confirmed_once_its_acks_are_lost() {
    // The store refuses Bob's ack for good, and the batch that carries it
    // is already under way when his leave's flush is queued: the flush,
    // in a later batch, sees nothing lost and used to be answered, so the
    // server wrote AcksStored for an ack it never stored. A trigger in the
    // test's schema marks when the move reaches Postgres, holds it two
    // seconds, then refuses it (P0001, not retryable).
    let Some((backend, schema)) = production_with_schema().await else {
        return;
    };
    let server = TestServer::start_on(backend.clone()).await;
    let OfflineBob {
        alice,
        alice_events: _alice_events,
        conversation,
        bob_id,
        token,
        ack,
    } = hello_for_offline_bob(&server).await;

    let admin = postgres::testing::admin().await.expect("admin connection");
    admin
        .batch_execute(&format!(
            r#"
            CREATE SEQUENCE "{schema}".refused_moves;
            CREATE FUNCTION "{schema}".refuse_move() RETURNS trigger AS $$
            BEGIN
                PERFORM nextval('"{schema}".refused_moves');
                PERFORM pg_sleep(2);
                RAISE EXCEPTION 'injected refusal' USING ERRCODE = 'P0001';
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER refuse_move BEFORE UPDATE ON "{schema}".members
                FOR EACH ROW WHEN (NEW.user_id = {bob_id} AND NEW.delivered_seq > OLD.delivered_seq)
                EXECUTE FUNCTION "{schema}".refuse_move();
            "#
        ))
        .await
        .expect("install the trigger");

    // Bob on the wire: authenticate, open messages asking for the
    // confirmation, take the message and ack it.
    use chat_protocol::{Body, Frame, proto};
    let bob_device = RawControl::resume(&server, &token).await;
    let (mut send, mut recv) = bob_device.open_messages(true).await;
    let mut buf = bytes::BytesMut::new();
    let delivered = next_frame(&mut recv, &mut buf).await;
    assert!(
        matches!(delivered.body, Some(Body::Deliver(_))),
        "{delivered:?}"
    );
    let mut ack_frame = bytes::BytesMut::new();
    chat_protocol::encode(
        &Frame::push(Body::DeliveryAck(proto::DeliveryAck {
            conversation_id: conversation,
            seq: ack.seq,
        })),
        &mut ack_frame,
    );
    send.write_all(&ack_frame).await.unwrap();
    // The move is in Postgres, held by the trigger: only now the leave.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let reached: bool = admin
            .query_one(
                &format!(r#"SELECT is_called FROM "{schema}".refused_moves"#),
                &[],
            )
            .await
            .expect("read the sequence")
            .get(0);
        if reached {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the move never reached Postgres"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send.finish().unwrap();
    // The refusal comes two seconds in; a confirmation would follow at once.
    let answer = tokio::time::timeout(Duration::from_secs(6), recv.read_chunk(1 << 16, true)).await;
    assert!(answer.is_err(), "no answer to the leave: {answer:?}");
    let view = alice.conversation(conversation).await.unwrap();
    let bob_view = view.members.iter().find(|m| m.user_id == bob_id).unwrap();
    assert!(bob_view.delivered_seq < ack.seq, "the ack was refused");
}

#[tokio::test]
async fn a_delivery_ack_the_store_fails_is_tried_again() {
    // A DeliveryAck has no reply, so nothing makes the client send it
    // again: when its batch fails in the store, the node must retry it, or
    // the sender never learns the message was delivered. A trigger in the
    // test's schema fails the first move of bob's delivered watermark with
    // a serialization failure (retryable) and lets the rest through.
    let Some((backend, schema)) = production_with_schema().await else {
        return;
    };
    let server = TestServer::start_on(backend.clone()).await;
    let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let bob_id = bob.identity().user_id;

    let admin = postgres::testing::admin().await.expect("admin connection");
    let when = format!("NEW.user_id = {bob_id} AND NEW.delivered_seq > OLD.delivered_seq");
    fail_first_update(&admin, &schema, "members", &when).await;

    let ack = alice.send_text(conversation, "hello").await.expect("sent");
    let got = messages(&mut bob_events, 1).await;
    assert_eq!(got[0].seq, ack.seq);
    let receipt = wait_for(&mut alice_events, "bob's delivered receipt", |e| match e {
        chat_client::Event::Receipt(r) if r.user_id == bob_id && r.delivered_seq >= ack.seq => {
            Some(r)
        }
        _ => None,
    })
    .await;
    assert_eq!(receipt.conversation_id, conversation);
    let tries = updates_tried(&admin, &schema).await;
    assert!(
        tries >= 2,
        "the first move failed and a later one went through: {tries}"
    );
}

#[tokio::test]
async fn a_photo_whose_binding_fails_for_now_is_not_overtaken_by_later_sends() {
    // A photo send binds its photo in the store before it goes to the
    // committer. When that binding fails with a retryable error, the
    // client sends the photo again, after the texts it sent behind it:
    // the node must hold those back until the photo comes again, or they
    // take seqs before it. A trigger in the test's schema fails the first
    // binding with a serialization failure.
    let Some((backend, schema)) = production_with_schema().await else {
        return;
    };
    let server = TestServer::start_on(backend.clone()).await;
    let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let mut jpeg = vec![0xff, 0xd8, 0xff, 0xe0];
    jpeg.resize(2_000, 7);
    let media_id = alice
        .upload_photo(chat_client::PhotoUpload {
            bytes: jpeg.into(),
            media_type: chat_client::proto::MediaType::Jpeg,
            width: 40,
            height: 30,
            preview: Default::default(),
        })
        .await
        .expect("uploaded");

    let admin = postgres::testing::admin().await.expect("admin connection");
    fail_first_update(&admin, &schema, "media", "true").await;

    // Queued together: the outbox writes all three at once.
    let photo = alice.send_photo(conversation, &media_id, "first");
    let second = alice.send_text(conversation, "second");
    let third = alice.send_text(conversation, "third");
    let (photo, second, third) = tokio::join!(photo, second, third);
    let seqs = [photo.unwrap().seq, second.unwrap().seq, third.unwrap().seq];
    assert!(
        seqs[0] < seqs[1] && seqs[1] < seqs[2],
        "stored in the order sent: {seqs:?}"
    );
    let got = messages(&mut bob_events, 3).await;
    let texts: Vec<&str> = got.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["first", "second", "third"]);
    assert!(got[0].photo.is_some(), "the photo came with its media");
    let tries = updates_tried(&admin, &schema).await;
    assert!(tries >= 2, "the first binding failed: {tries}");
}

#[tokio::test]
async fn a_group_change_in_flight_when_its_connection_is_replaced_is_asked_again() {
    // The server closes a connection with a code (here LIMIT_REACHED: the
    // token's one place was taken by another connection) that says why the
    // connection ended, not how the requests on it went. A keyed group
    // change waiting on it used to fail with that code although it may
    // have been stored; it must be asked again on the next connection.
    // A row lock from the test holds the rename in the store meanwhile
    // (Postgres ends it after a minute idle, should the test fail while
    // holding it: the schema's clean-up waits for it).
    let Some((backend, schema)) = production_with_schema().await else {
        return;
    };
    let server =
        TestServer::start_on_with(backend.clone(), |c| c.limits.max_sessions_per_token = 1).await;
    let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, _bob_events) = register(server.client_config(), &name("bob")).await;
    befriend(&alice, &bob).await;
    let group = alice
        .create_group("before", &[bob.identity().user_id])
        .await
        .expect("group")
        .conversation_id;

    let admin = postgres::testing::admin().await.expect("admin connection");
    admin
        .batch_execute(&format!(
            r#"BEGIN;
               SET LOCAL idle_in_transaction_session_timeout = '60s';
               SELECT 1 FROM "{schema}".conversations WHERE id = {group} FOR UPDATE"#
        ))
        .await
        .expect("lock the group's row");
    let rename = tokio::spawn({
        let alice = alice.clone();
        async move { alice.rename_group(group, "after").await }
    });
    let waiting = "SELECT count(*) FROM pg_stat_activity
                   WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))";
    wait_until("the rename to wait for the lock", || async {
        let n: i64 = admin.query_one(waiting, &[]).await.unwrap().get(0);
        n > 0
    })
    .await;
    // Another connection takes the token's place: alice's is closed
    // LIMIT_REACHED (her client reconnects and takes it back).
    let _raw = RawControl::resume(&server, &alice.identity().token).await;
    let code = wait_for(
        &mut alice_events,
        "alice's connection replaced",
        |e| match e {
            chat_client::Event::Disconnected { code } => Some(code),
            _ => None,
        },
    )
    .await;
    assert_eq!(code, Some(chat_client::ErrorCode::LimitReached));
    admin.batch_execute("COMMIT").await.expect("unlock");

    rename
        .await
        .unwrap()
        .expect("asked again on the next connection, and stored");
    let view = alice.conversation(group).await.expect("the group");
    assert_eq!(view.name, "after");
}

#[tokio::test]
async fn a_retry_delivers_a_message_whose_first_fan_out_never_happened() {
    // A message can be durable without having been pushed to anyone: a
    // COMMIT whose outcome was settled only after the store gave up, a node
    // that stopped between its commit and its pushes. Its sender's retry
    // finds it stored, and used to be acked and nothing more: a recipient
    // who stayed online did not get it until they reconnected. Here the
    // first attempt's row is written straight into the schema, bob online.
    let Some((backend, schema)) = production_with_schema().await else {
        return;
    };
    let server = TestServer::start_on(backend.clone()).await;
    let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let alice_id = alice.identity().user_id;
    let admin = postgres::testing::admin().await.expect("admin connection");
    admin
        .batch_execute(&format!(
            r#"
            WITH head AS (
                UPDATE "{schema}".conversations SET last_seq = last_seq + 1
                WHERE id = {conversation} RETURNING last_seq
            )
            INSERT INTO "{schema}".messages
                (conversation_id, seq, sender_id, client_msg_id, type, sent_at_ms, body)
            SELECT {conversation}, last_seq, {alice_id}, 'limbo-1', 1, 1, 'made it' FROM head;
            "#
        ))
        .await
        .expect("store the first attempt");

    let ack = alice
        .send_with_id(conversation, "limbo-1", "made it")
        .await
        .expect("the retry is acked");
    assert!(ack.duplicate, "{ack:?}");
    let got = messages(&mut bob_events, 1).await;
    assert_eq!(
        (
            got[0].seq,
            got[0].client_msg_id.as_str(),
            got[0].text.as_str()
        ),
        (ack.seq, "limbo-1", "made it")
    );
    let addr = server.server.as_ref().unwrap().metrics_addr();
    scrape_until(addr, "one redelivery", |m| {
        value(m, "chat_redeliveries_total") == 1.0
    })
    .await;
    // Once bob has acknowledged it, a further retry tells nobody.
    wait_delivered(&alice, conversation, bob.identity().user_id, ack.seq).await;
    let again = alice
        .send_with_id(conversation, "limbo-1", "made it")
        .await
        .expect("acked again");
    assert!(again.duplicate);
    alice.send_text(conversation, "next").await.expect("sent");
    let next = messages(&mut bob_events, 1).await;
    assert_eq!(next[0].text, "next", "no second copy came first");
    assert_eq!(
        value(&scrape(addr).await, "chat_redeliveries_total"),
        1.0,
        "the retry after bob's ack redelivered nothing"
    );
}

#[tokio::test]
async fn a_member_removed_while_offline_is_told_once_and_their_queue_then_dropped() {
    // Bob is offline while messages queue up for him in a group, and is
    // removed from it. On his return he gets them and his removal (the
    // departure in Postgres); his device's ack ends the departure and
    // empties his queue of that group, though it moves no watermark (he is
    // no member): the queue used to stay until his next catch-up. Entries
    // a catch-up finds for a conversation with nothing pending are dropped
    // too (they would stay in Redis for good and count against his
    // catch-up limit).
    let Some((backend, schema)) = production_with_schema().await else {
        return;
    };
    let Backend::Production(production) = &backend else {
        unreachable!("production_with_schema() gives a production backend");
    };
    let server = TestServer::start_on(backend.clone()).await;
    let (owner, _eo) = register(server.client_config(), &name("owner")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    let (carol, _ec) = register(server.client_config(), &name("carol")).await;
    let direct = befriend(&owner, &bob).await;
    befriend(&owner, &carol).await;
    let bob_id = bob.identity().user_id;
    let bob_token = bob.identity().token;
    let group = owner
        .create_group("trip", &[bob_id, carol.identity().user_id])
        .await
        .unwrap()
        .conversation_id;
    // Bob's app takes the creation message, and it is acked before he goes.
    messages(&mut bob_events, 1).await;
    wait_delivered(&owner, group, bob_id, 1).await;
    bob.close();
    for i in 0..3 {
        owner.send_text(group, &format!("m{i}")).await.unwrap();
    }
    let inbox = chat_server::store::redis::RedisStore::connect(
        &production.redis_url,
        &production.redis_prefix,
    )
    .await
    .expect("redis");
    use chat_server::store::InboxStore as _;
    // Queued after the acks, by the node's cache updater.
    wait_until("three messages queued for bob", || async {
        inbox.pending(bob_id, 100).await.unwrap().unwrap().len() == 3
    })
    .await;
    owner.remove_member(group, bob_id).await.unwrap();

    let (bob, mut bob_events) = Client::resume(server.client_config(), &bob_token)
        .await
        .unwrap();
    let got = messages(&mut bob_events, 4).await;
    let texts: Vec<&str> = got.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts[..3], ["m0", "m1", "m2"], "{texts:?}");
    assert!(texts[3].contains("removed"), "{texts:?}");
    let admin = postgres::testing::admin().await.expect("admin connection");
    wait_until("bob's device acknowledged his removal", || async {
        let left: i64 = admin
            .query_one(
                &format!(r#"SELECT count(*) FROM "{schema}".departures WHERE user_id = $1"#),
                &[&(bob_id as i64)],
            )
            .await
            .expect("count departures")
            .get(0);
        left == 0
    })
    .await;
    let queue_empty = || async {
        let queued = inbox.pending(bob_id, 100).await.unwrap();
        queued.expect("within the limit").is_empty()
    };
    wait_until("the ack emptied bob's queue", queue_empty).await;
    bob.close();

    // A leftover the ack did not reach (say, Redis was briefly down then).
    let leftover = got[2].clone();
    inbox
        .push(vec![(bob_id, std::sync::Arc::new(leftover))])
        .await
        .unwrap();
    assert_eq!(inbox.pending(bob_id, 100).await.unwrap().unwrap().len(), 1);
    let (_bob, mut bob_events) = Client::resume(server.client_config(), &bob_token)
        .await
        .unwrap();
    wait_until("bob's stale queue dropped", queue_empty).await;
    owner.send_text(direct, "still friends").await.unwrap();
    let next = messages(&mut bob_events, 1).await;
    assert_eq!(next[0].text, "still friends", "told of the removal once");
}

#[tokio::test]
async fn a_friendship_ended_unheard_leaves_the_other_friends_watched() {
    // Bob watches alice and carol. His friendship with alice ends without
    // his device hearing of it (in life: ended while his phone was away;
    // here: deleted in Postgres behind the server's back). On his next
    // connection the client re-sends the list and the server refuses it
    // (NOT_FRIENDS, for alice): the client used to give up and watch
    // nobody, so carol's changes never reached him. Now it drops alice
    // and asks again.
    let Some((backend, schema)) = production_with_schema().await else {
        return;
    };
    let server = TestServer::start_on(backend.clone()).await;
    let [(bob, mut bob_events), (alice, _ea), (carol, _ec)]: [Member; 3] = circle(&server, 3)
        .await
        .try_into()
        .ok()
        .expect("three users");
    let (a, b, c) = (
        alice.identity().user_id,
        bob.identity().user_id,
        carol.identity().user_id,
    );
    bob.subscribe_presence(&[a, c]).await.unwrap();
    let admin = postgres::testing::admin().await.expect("admin connection");
    let removed = admin
        .execute(
            &format!(
                r#"DELETE FROM "{schema}".friends
                   WHERE (user_id = $1 AND friend_id = $2) OR (user_id = $2 AND friend_id = $1)"#
            ),
            &[&(a as i64), &(b as i64)],
        )
        .await
        .expect("delete the friendship");
    assert_eq!(removed, 2);

    reconnected(&bob).await;
    carol.close();
    presence_of(&mut bob_events, c, false, "carol offline").await;
    assert_eq!(bob.presence(a), None, "alice is no longer watched");
}

#[tokio::test]
async fn a_login_refused_after_its_session_row_leaves_the_row_revoked() {
    // The login's password is right and the account has room, but another
    // device takes the last place while the login writes its session row
    // (a lock on `sessions` holds the insert). The login is refused
    // LIMIT_REACHED, and nobody will ever hold its token: the row must not
    // stay a live session for the token's month.
    let Some((backend, schema)) = production_with_schema().await else {
        return;
    };
    let server = TestServer::start_on_with(backend, |c| c.limits.max_sessions_per_user = 1).await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let bob_name = name("bob");
    let (bob, bob_events) = register(server.client_config(), &bob_name).await;
    let token = bob.identity().token;
    let bob_id = bob.identity().user_id as i64;
    bob.close();
    drop(bob_events);
    scrape_until(metrics, "bob's connection gone", |m| {
        value(m, "chat_sessions_active") == 0.0
    })
    .await;

    let mut admin = postgres::testing::admin().await.expect("admin connection");
    let lock = admin.transaction().await.unwrap();
    // Reads of `sessions` (the resume's) pass; inserts wait.
    lock.batch_execute(&format!(
        r#"LOCK TABLE "{schema}".sessions IN EXCLUSIVE MODE"#
    ))
    .await
    .unwrap();
    let login = tokio::spawn({
        let config = server.client_config();
        async move { Client::login(config, &bob_name, PASSWORD).await.map(|_| ()) }
    });
    let waited = waits_on_a_lock(&schema, "%INSERT INTO sessions%").await;
    // Meanwhile the phone resumes and takes the one place.
    let resumed = tokio::time::timeout(WAIT, Client::resume(server.client_config(), &token)).await;
    // Committed before any assertion, so that a failing test does not
    // leave the node waiting on the lock.
    lock.commit().await.unwrap();
    assert!(waited, "the login never waited on the lock");
    let (_phone, _phone_events) = resumed
        .expect("the resume waited on the lock")
        .expect("the phone resumes");
    assert_eq!(
        code(login.await.unwrap()),
        chat_client::ErrorCode::LimitReached,
        "the login finds the place taken"
    );
    let watcher = postgres::testing::admin().await.expect("admin connection");
    let live: i64 = watcher
        .query_one(
            &format!(
                r#"SELECT count(*) FROM "{schema}".sessions
                   WHERE user_id = $1 AND revoked_at_ms IS NULL"#
            ),
            &[&bob_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(live, 1, "only the phone's session is live");
}

#[tokio::test]
async fn a_resume_refused_after_its_registration_leaves_no_session_behind() {
    // The device sends its token and goes away while the server reads the
    // user (a lock on `users` holds the read); the token is revoked before
    // the read returns. The connection's end came before the session was
    // registered, so it had nothing to undo; the refusal after the
    // registration must undo it, or the session counts against the user's
    // and the token's limits until a restart.
    let Some((backend, schema)) = production_with_schema().await else {
        return;
    };
    let server = TestServer::start_on(backend).await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let (bob, bob_events) = register(server.client_config(), &name("bob")).await;
    let token = bob.identity().token;
    let bob_id = bob.identity().user_id as i64;
    bob.close();
    drop(bob_events);
    scrape_until(metrics, "bob's connection gone", |m| {
        value(m, "chat_sessions_active") == 0.0 && value(m, "chat_connections_active") == 0.0
    })
    .await;

    let mut admin = postgres::testing::admin().await.expect("admin connection");
    let lock = admin.transaction().await.unwrap();
    lock.batch_execute(&format!(
        r#"LOCK TABLE "{schema}".users IN ACCESS EXCLUSIVE MODE"#
    ))
    .await
    .unwrap();
    let (_endpoint, conn) = quic_connect(&server).await.expect("handshake");
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let mut out = bytes::BytesMut::new();
    chat_protocol::encode(
        &chat_protocol::Frame::open_stream(chat_protocol::StreamKind::Control),
        &mut out,
    );
    chat_protocol::encode(
        &chat_protocol::Frame::new(
            1,
            chat_protocol::Body::Authenticate(chat_client::proto::Authenticate {
                token: token.clone(),
                background: false,
            }),
        ),
        &mut out,
    );
    send.write_all(&out).await.unwrap();
    // The resume waits on the lock (seen from another connection: a
    // transaction reads pg_stat_activity once)...
    let waited = waits_on_a_lock(&schema, "%FROM users%").await;
    // ...while its connection ends and the server forgets it.
    conn.close(0u32.into(), b"gone");
    let gone = tokio::time::timeout(WAIT, async {
        while value(&scrape(metrics).await, "chat_connections_active") != 0.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok();
    lock.execute(
        &format!(r#"UPDATE "{schema}".sessions SET revoked_at_ms = 1 WHERE user_id = $1"#),
        &[&bob_id],
    )
    .await
    .unwrap();
    // Committed before any assertion, so that a failing test does not
    // leave the node waiting on the lock.
    lock.commit().await.unwrap();
    assert!(waited, "the resume never waited on the lock");
    assert!(gone, "the connection's end was never seen");

    let m = scrape_until(metrics, "the resume refused", |m| {
        value(m, "chat_errors_total{code=\"TOKEN_REVOKED\"}") >= 1.0
    })
    .await;
    assert_eq!(
        value(&m, "chat_sessions_active"),
        0.0,
        "the refused resume's session stayed registered"
    );
}

/// Whether a statement of the server on `schema` matching `like` comes to
/// wait on a lock within [`WAIT`] (seen from a connection of its own: a
/// transaction reads `pg_stat_activity` once).
async fn waits_on_a_lock(schema: &str, like: &str) -> bool {
    let watcher = postgres::testing::admin().await.expect("admin connection");
    let waiting = async {
        loop {
            let rows = watcher
                .query(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = $1
                       AND wait_event_type = 'Lock' AND query LIKE $2",
                    &[&format!("chat-server {schema}"), &like],
                )
                .await
                .unwrap();
            if !rows.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, waiting).await.is_ok()
}

/// A server on the production backends whose Postgres is behind a
/// [`CommitCutter`](postgres::cutter::CommitCutter), asking how an
/// unanswered COMMIT ended for 300 ms only, and its schema. The cutter
/// comes first, so that a binding of the tuple drops the server before it.
/// `None` when the test is skipped.
async fn behind_a_commit_cutter() -> Option<(postgres::cutter::CommitCutter, TestServer, String)> {
    let (backend, schema) = production_with_schema().await?;
    let cutter = postgres::cutter::CommitCutter::start().await;
    let proxied = cutter.url();
    let server = TestServer::start_on_with(backend, |c| {
        c.postgres_url = Some(proxied);
        c.postgres_commit_settle_timeout = Duration::from_millis(300);
    })
    .await;
    Some((cutter, server, schema))
}

#[tokio::test]
async fn a_send_of_unknown_outcome_keeps_its_place_for_every_member() {
    // Alice's send commits, but the answer to its COMMIT is lost and
    // Postgres cannot be asked how it ended (the proxy in front of it drops
    // every connection meanwhile), so she hears UNAVAILABLE though her
    // message is stored. Had Carol's next message to the group been stored
    // and delivered before Alice's retry, Bob would have acked it, and the
    // retry, finding Alice's message stored, would have gone only to
    // members still below it: Bob would never have seen it. The group
    // waits for the retry instead.
    let Some((cutter, server, schema)) = behind_a_commit_cutter().await else {
        return;
    };
    let mut members = circle(&server, 3).await;
    let ids: Vec<u64> = members.iter().map(|(c, _)| c.identity().user_id).collect();
    let group = members[0]
        .0
        .create_group("unsettled", &ids[1..])
        .await
        .unwrap()
        .conversation_id;
    let (carol, carol_events) = members.pop().unwrap();
    let (bob, mut bob_events) = members.pop().unwrap();
    let (alice, alice_events) = members.pop().unwrap();
    // Alice and Carol send from raw devices, which retry only when told.
    let (alice_token, carol_token) = (alice.identity().token, carol.identity().token);
    alice.close();
    carol.close();
    drop((alice_events, carol_events));
    let alice = RawControl::resume(&server, &alice_token).await;
    let carol = RawControl::resume(&server, &carol_token).await;
    let mut alice_messages = RawSender::open(&alice).await;
    let mut carol_messages = RawSender::open(&carol).await;

    cutter.arm_after(b"stored, unanswered");
    let first = alice_messages.send(group, "a1", "stored, unanswered").await;
    let chat_protocol::Body::Error(e) = &first else {
        panic!("the send's outcome is unknown: {first:?}");
    };
    assert_eq!(
        chat_client::ErrorCode::from_wire(e.code),
        chat_client::ErrorCode::Unavailable
    );
    assert_eq!(cutter.cuts(), 1, "the COMMIT's answer was cut");
    cutter.end_blackout();
    // Postgres answers through the proxy again.
    wait_until("postgres behind the proxy", || cutter.relays()).await;

    // Carol sends for two seconds: her message must wait for Alice's
    // retry (refused with the pause's retry-after, 500 ms).
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut carol_first = None;
    let mut paused = 0;
    while tokio::time::Instant::now() < until {
        match carol_messages.send(group, "c1", "after it").await {
            chat_protocol::Body::SendAck(ack) => {
                carol_first = Some(ack);
                break;
            }
            chat_protocol::Body::Error(e) => {
                paused += usize::from(e.retry_after_ms == 500);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("a send's answer: {other:?}"),
        }
    }
    if let Some(ack) = &carol_first {
        // Stored first (the defect): Bob takes it, and his client acks
        // it before Alice's retry comes.
        wait_for(&mut bob_events, "carol's message", |event| match event {
            chat_client::Event::Message(m) if m.seq == ack.seq => Some(()),
            _ => None,
        })
        .await;
        let watcher = postgres::testing::admin().await.expect("admin connection");
        let query = format!(
            r#"SELECT delivered_seq FROM "{schema}".members
               WHERE conversation_id = $1 AND user_id = $2"#
        );
        let (watcher, query, bob_id, seq) = (&watcher, &query, ids[1] as i64, ack.seq);
        wait_until("bob's ack stored", || async move {
            let row = watcher
                .query_one(query.as_str(), &[&(group as i64), &bob_id])
                .await
                .unwrap();
            row.get::<_, i64>(0) as u64 >= seq
        })
        .await;
    }
    let retried = alice_messages
        .send_until_acked(group, "a1", "stored, unanswered")
        .await;
    assert!(retried.duplicate, "the first attempt had committed");
    if carol_first.is_none() {
        carol_messages
            .send_until_acked(group, "c1", "after it")
            .await;
    }
    let mut texts = Vec::new();
    while texts.len() < 2 {
        let text = wait_for(&mut bob_events, "both messages", |event| match event {
            chat_client::Event::Message(m)
                if m.r#type == chat_client::proto::MessageType::Text as i32 =>
            {
                Some(m.text)
            }
            _ => None,
        })
        .await;
        texts.push(text);
    }
    assert_eq!(texts, ["stored, unanswered", "after it"]);
    assert!(
        carol_first.is_none() && paused > 0,
        "carol's message was stored ahead of the retry ({paused} refusals)"
    );
    drop(bob);
}

/// A raw device's messages stream, for sends whose answers a test reads
/// itself (client-lib would retry them).
struct RawSender {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: bytes::BytesMut,
    next_request_id: u64,
    /// Answers read while waiting for another one.
    early: std::collections::HashMap<u64, chat_protocol::Body>,
}

impl RawSender {
    async fn open(device: &RawControl) -> RawSender {
        let (send, recv) = device.open_messages(false).await;
        RawSender {
            send,
            recv,
            buf: bytes::BytesMut::new(),
            next_request_id: 1,
            early: std::collections::HashMap::new(),
        }
    }

    /// Sends `text` under `key` again and again (a store coming back may
    /// still refuse the first tries) until it is acked.
    async fn send_until_acked(
        &mut self,
        conversation: u64,
        key: &str,
        text: &str,
    ) -> chat_client::proto::SendAck {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.send(conversation, key, text).await {
                chat_protocol::Body::SendAck(ack) => return ack,
                chat_protocol::Body::Error(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{key} never went through: {e:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => panic!("a send's answer: {other:?}"),
            }
        }
    }

    /// Sends `text` under `key` and returns the answer (pushes are
    /// skipped).
    async fn send(&mut self, conversation: u64, key: &str, text: &str) -> chat_protocol::Body {
        let request_id = self.write(conversation, key, text).await;
        self.answer(request_id).await
    }

    /// Writes a send of `text` under `key` without waiting for its
    /// answer; returns its request id.
    async fn write(&mut self, conversation: u64, key: &str, text: &str) -> u64 {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let frame = chat_protocol::Frame::new(
            request_id,
            chat_protocol::Body::Send(chat_client::proto::Send {
                conversation_id: conversation,
                client_msg_id: key.into(),
                r#type: chat_client::proto::MessageType::Text as i32,
                text: text.into(),
                media_id: String::new(),
                reply_to_seq: 0,
            }),
        );
        self.send.write_all(&frames(&[frame])).await.unwrap();
        request_id
    }

    /// The answer to `request_id`; pushes are skipped, other answers kept
    /// for their own call.
    async fn answer(&mut self, request_id: u64) -> chat_protocol::Body {
        if let Some(body) = self.early.remove(&request_id) {
            return body;
        }
        loop {
            let frame = next_frame(&mut self.recv, &mut self.buf).await;
            let body = frame.body.expect("a frame with a body");
            if frame.request_id == request_id {
                return body;
            }
            if frame.request_id != 0 {
                self.early.insert(frame.request_id, body);
            }
        }
    }
}

/// The code of an Error answer, or a panic naming what came instead.
fn error_code(answer: &chat_protocol::Body, what: &str) -> chat_client::ErrorCode {
    match answer {
        chat_protocol::Body::Error(e) => chat_client::ErrorCode::from_wire(e.code),
        other => panic!("{what}: an error, not {other:?}"),
    }
}

#[tokio::test]
async fn a_send_failed_behind_a_paused_one_is_the_one_its_connection_waits_for() {
    // Alice's sends A (to Bob) and B (to Carol, whose conversation is
    // paused behind Carol's write of unknown outcome) reach the committer
    // in one run: B is refused for the pause, which holds Alice's
    // connection on B, and then A's batch fails. Kept on B, the hold
    // refused A, which client-lib resends first (it resends from its
    // earliest refused send, in order), again and again for the hold's
    // 30 s grace. The connection is held on A now, the first that failed.
    let Some((cutter, server, schema)) = behind_a_commit_cutter().await else {
        return;
    };
    // Alice (0) is friends with Bob, Carol and Dave.
    let members = circle(&server, 4).await;
    let ids: Vec<u64> = members.iter().map(|(c, _)| c.identity().user_id).collect();
    let mut direct = Vec::new();
    for &id in &ids[1..] {
        direct.push(members[0].0.open_direct(id).await.unwrap().conversation_id);
    }
    let (to_bob, to_carol, to_dave) = (direct[0], direct[1], direct[2]);
    let tokens: Vec<String> = members.iter().map(|(c, _)| c.identity().token).collect();
    for (client, _) in &members {
        client.close();
    }
    drop(members);
    // Raw devices, which send again only when told.
    let alice = RawControl::resume(&server, &tokens[0]).await;
    let carol = RawControl::resume(&server, &tokens[2]).await;
    let dave = RawControl::resume(&server, &tokens[3]).await;
    let mut alice_messages = RawSender::open(&alice).await;
    let mut carol_messages = RawSender::open(&carol).await;
    let mut dave_messages = RawSender::open(&dave).await;

    // Carol's send commits unanswered: her conversation with Alice waits
    // for her retry.
    cutter.arm_after(b"carol, unsettled");
    let first = carol_messages
        .send(to_carol, "c1", "carol, unsettled")
        .await;
    assert_eq!(
        error_code(&first, "carol's send of unknown outcome"),
        chat_client::ErrorCode::Unavailable
    );
    cutter.end_blackout();
    wait_until("postgres behind the proxy", || cutter.relays()).await;

    // Dave's send waits on a lock on his conversation's row, so that
    // Alice's two sends queue up behind it and make one run.
    let locker = postgres::testing::admin().await.expect("admin connection");
    let watcher = postgres::testing::admin().await.expect("admin connection");
    locker.batch_execute("BEGIN").await.unwrap();
    locker
        .execute(
            &format!(r#"SELECT 1 FROM "{schema}".conversations WHERE id = $1 FOR UPDATE"#),
            &[&(to_dave as i64)],
        )
        .await
        .unwrap();
    let locker_pid: i32 = locker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let dave_send = dave_messages.write(to_dave, "d1", "dave, held up").await;
    let watcher = &watcher;
    wait_until("dave's write waiting on the lock", || async move {
        let row = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                &[&locker_pid],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) > 0
    })
    .await;

    cutter.arm_before(b"alice, first");
    let a = alice_messages.write(to_bob, "a1", "alice, first").await;
    let b = alice_messages.write(to_carol, "a2", "alice, second").await;
    // Refused by the reader (no conversation): once it is answered, the
    // reader has queued A and B.
    let probe = alice_messages.write(0, "a3", "probe").await;
    assert_eq!(
        error_code(&alice_messages.answer(probe).await, "the probe"),
        chat_client::ErrorCode::InvalidArgument
    );
    locker.batch_execute("ROLLBACK").await.unwrap();
    let answer = dave_messages.answer(dave_send).await;
    assert!(
        matches!(answer, chat_protocol::Body::SendAck(_)),
        "dave's send: {answer:?}"
    );
    let paused = alice_messages.answer(b).await;
    assert_eq!(
        error_code(&paused, "B, to a paused conversation"),
        chat_client::ErrorCode::Unavailable
    );
    let failed = alice_messages.answer(a).await;
    assert_eq!(
        error_code(&failed, "A, whose COMMIT was cut"),
        chat_client::ErrorCode::Unavailable
    );
    assert_eq!(cutter.cuts(), 2, "A's COMMIT was cut");

    // Resent from the earliest, as client-lib does: A goes through at once.
    let again = alice_messages.send(to_bob, "a1", "alice, first").await;
    let chat_protocol::Body::SendAck(ack) = again else {
        panic!("A, sent again, must be stored: {again:?}");
    };
    assert!(!ack.duplicate, "the cut COMMIT stored nothing");
    // B waits for Carol's retry, then follows her message.
    let carol_ack = carol_messages
        .send_until_acked(to_carol, "c1", "carol, unsettled")
        .await;
    assert!(carol_ack.duplicate, "her first attempt had committed");
    let alice_ack = alice_messages
        .send_until_acked(to_carol, "a2", "alice, second")
        .await;
    assert!(alice_ack.seq > carol_ack.seq, "B after Carol's message");
}

#[tokio::test]
async fn a_group_created_with_an_unknown_outcome_reaches_its_members_on_the_retry() {
    // The creation commits, but the answer to its COMMIT is lost and
    // Postgres cannot be asked how it ended: Alice hears UNAVAILABLE, and
    // her client's retry with the same key finds the group. Bob was told
    // nothing the first time; the retry must bring him the group's first
    // message, or he knows nothing of the group until its next one.
    let Some((cutter, server, _schema)) = behind_a_commit_cutter().await else {
        return;
    };
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let mut members = circle(&server, 2).await;
    let (bob, mut bob_events) = members.pop().unwrap();
    let (alice, _alice_events) = members.pop().unwrap();
    let bob_id = bob.identity().user_id;

    cutter.arm_after(b"unsettled group");
    let creating = tokio::spawn({
        let alice = alice.clone();
        async move {
            alice
                .create_group_with_key("unsettled group", &[bob_id], "unsettled-1")
                .await
        }
    });
    // The first attempt is answered UNAVAILABLE (its outcome unknown)...
    scrape_until(metrics, "the creation's unknown outcome", |m| {
        value(m, "chat_errors_total{code=\"UNAVAILABLE\"}") >= 1.0
    })
    .await;
    assert_eq!(cutter.cuts(), 1, "the COMMIT's answer was cut");
    // ... and the client's retry finds the group once Postgres answers.
    cutter.end_blackout();
    let group = tokio::time::timeout(WAIT, creating)
        .await
        .expect("the retry in time")
        .unwrap()
        .expect("the group, found by its key")
        .conversation_id;
    wait_for(&mut bob_events, "the group's first message", |e| match e {
        chat_client::Event::Message(m) if m.conversation_id == group => Some(m),
        _ => None,
    })
    .await;
    let m = scrape(metrics).await;
    assert!(
        value(&m, "chat_redeliveries_total") >= 1.0,
        "brought by the retry's redelivery"
    );
    drop(bob);
}

#[tokio::test]
async fn a_call_log_of_unknown_outcome_keeps_its_place_for_every_member() {
    // A call's log commits, but the answer to its COMMIT is lost and
    // Postgres cannot be asked how it ended. Had Alice's text, sent as the
    // call ended, been stored, delivered to Bob and acked before the log's
    // retry, the retry would have found the log stored and sent it only to
    // members still below it: Bob would never have seen it. The
    // conversation waits for the log's retry instead, as it does for a
    // client's send.
    let Some((cutter, server, _schema)) = behind_a_commit_cutter().await else {
        return;
    };
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let mut calls = server.client_config();
    calls.calls = true;
    let (alice, mut alice_events) = register(calls.clone(), &name("alice")).await;
    let (bob, mut bob_events) = register(calls, &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let call = alice.start_call(conversation, false).await.unwrap();
    wait_for(&mut bob_events, "the ring", |event| match event {
        chat_client::Event::Call(ring) if ring.call_id == call.call_id => Some(()),
        _ => None,
    })
    .await;

    cutter.arm_after(b"Declined call");
    let failed_appends = |m: &std::collections::HashMap<String, f64>| {
        // Absent until the first failure.
        let key = "chat_store_operation_duration_seconds_count{backend=\"postgres\",operation=\"append\",result=\"error\"}";
        m.get(key).copied().unwrap_or(0.0)
    };
    bob.decline_call(call.call_id).await.unwrap();
    // The log's outcome is unknown once the store has given up asking.
    scrape_until(metrics, "the log's write of unknown outcome", |m| {
        failed_appends(m) >= 1.0
    })
    .await;
    assert_eq!(cutter.cuts(), 1, "the log's COMMIT answer was cut");
    cutter.end_blackout();
    let text = alice.send_text(conversation, "call me?").await.unwrap();

    // Bob gets both, the log first.
    let mut log_seq = None;
    let mut text_seen = false;
    while log_seq.is_none() || !text_seen {
        let m = wait_for(
            &mut bob_events,
            "the log and the text",
            |event| match event {
                chat_client::Event::Message(m) => Some(m),
                _ => None,
            },
        )
        .await;
        if m.r#type == chat_client::proto::MessageType::Call as i32 {
            assert_eq!(m.call.as_ref().unwrap().call_id, call.call_id);
            assert_eq!(m.text, "Declined call");
            log_seq = Some(m.seq);
        } else if m.seq == text.seq {
            text_seen = true;
        }
    }
    assert!(
        log_seq.unwrap() < text.seq,
        "the log keeps its place: {log_seq:?} before {}",
        text.seq
    );
    // Alice's devices too: the log is from her, but she did not write it.
    let own = wait_for(
        &mut alice_events,
        "the log at its sender",
        |event| match event {
            chat_client::Event::Message(m)
                if m.r#type == chat_client::proto::MessageType::Call as i32 =>
            {
                Some(m)
            }
            _ => None,
        },
    )
    .await;
    assert_eq!(Some(own.seq), log_seq);
}
