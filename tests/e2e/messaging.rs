//! 1-1 messaging end to end: statuses, offline delivery, idempotency,
//! crashes, dropped connections, history and authorization.

use std::time::Duration;

use chat_client::{
    Client, Edits, ErrorCode, Event, Events, HistoryDirection, Outgoing, Reactions, Unsends, proto,
};

use crate::harness::*;

/// Waits for a receipt from `from` in `conversation` satisfying `f`.
async fn receipt(
    events: &mut Events,
    conversation: u64,
    from: u64,
    what: &str,
    f: impl Fn(&proto::Receipt) -> bool,
) -> proto::Receipt {
    wait_for(events, what, |e| match e {
        Event::Receipt(r) if r.conversation_id == conversation && r.user_id == from && f(&r) => {
            Some(r)
        }
        _ => None,
    })
    .await
}

/// Watches `events` for a second and fails with `why` if one is `forbidden`.
async fn quiet_for_a_second(events: &mut Events, why: &str, forbidden: impl Fn(&Event) -> bool) {
    let quiet = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(Some(event)) = tokio::time::timeout_at(quiet, events.next()).await {
        assert!(!forbidden(&event), "{why}: {event:?}");
    }
}

/// Alice and Bob, friends; Bob goes offline and Alice sends `n` texts
/// (`"{prefix} {i}"`), each acked. Returns Alice, her events, the
/// conversation, Bob's token and the acks.
async fn alice_sends_to_offline_bob(
    config: &chat_client::ClientConfig,
    n: usize,
    prefix: &str,
) -> (Client, Events, u64, String, Vec<proto::SendAck>) {
    let (alice, alice_events) = register(config.clone(), &name("alice")).await;
    let (bob, _bob_events) = register(config.clone(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let bob_token = bob.identity().token;
    bob.close();
    let mut acked = Vec::with_capacity(n);
    for i in 0..n {
        acked.push(
            alice
                .send_text(conversation, &format!("{prefix} {i}"))
                .await
                .unwrap(),
        );
    }
    (alice, alice_events, conversation, bob_token, acked)
}

each_backend! {
    async fn a_long_backlog_arrives_in_order_and_once(backend: Backend) {
        // More than a catch-up page (256) many times over, and, with Redis,
        // more than a catch-up takes from the unread queues (2,000): the
        // node pages through history instead.
        const N: usize = 2_100;
        let server = TestServer::start_on_with(backend.clone(), unlimited_sends)
        .await;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        let (bob, _eb) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let bob_identity = bob.identity();
        bob.close();
        let acked = send_texts(&alice, conversation, N).await;
        backend
            .wait_queued_through(bob_identity.user_id, conversation, *acked.last().unwrap())
            .await;

        let (_bob, mut bob_events) = Client::resume(server.client_config(), &bob_identity.token)
            .await
            .unwrap();
        let got: Vec<u64> = messages(&mut bob_events, N).await.iter().map(|m| m.seq).collect();
        assert_eq!(got, acked, "every message, in order");
        assert_no_message(&mut bob_events, Duration::from_millis(500)).await;
    }

    async fn a_send_shows_on_the_senders_other_devices(backend: Backend) {
        // Alice on a phone and a laptop: what she sends from the phone
        // appears on the laptop as it is sent (not on the phone, which has
        // its SendAck), and bob's reply reaches both.
        let server = TestServer::start_on(backend.clone()).await;
        let alice_name = name("alice");
        let (phone, mut phone_events) = register(server.client_config(), &alice_name).await;
        let (laptop, mut laptop_events) = Client::login(server.client_config(), &alice_name, PASSWORD)
            .await
            .expect("a second device");
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&phone, &bob).await;
        let alice_id = phone.identity().user_id;
        assert_eq!(laptop.identity().user_id, alice_id);

        let sent = phone.send_text(conversation, "from my phone").await.unwrap();
        let echoed = messages(&mut laptop_events, 1).await;
        assert_eq!(
            (echoed[0].seq, echoed[0].sender_id, echoed[0].text.as_str()),
            (sent.seq, alice_id, "from my phone")
        );
        assert_eq!(messages(&mut bob_events, 1).await[0].seq, sent.seq);
        bob.send_text(conversation, "got it").await.unwrap();
        for events in [&mut phone_events, &mut laptop_events] {
            let next = messages(events, 1).await;
            assert_eq!(next[0].text, "got it", "the phone did not get its own send back");
        }
    }

    async fn several_committers_keep_every_conversation_in_order(backend: Backend) {
        // Three committer pairs: the friends' conversations are spread over
        // them, and all of them commit at once.
        let server = TestServer::start_on_with(backend.clone(), |c| c.committers = 3).await;
        let (hub, mut hub_events) = register(server.client_config(), &name("hub")).await;
        const FRIENDS: usize = 6;
        const EACH: usize = 25;
        let mut friends = Vec::new();
        for i in 0..FRIENDS {
            let (friend, events) = register(server.client_config(), &name(&format!("f{i}"))).await;
            let conversation = befriend(&friend, &hub).await;
            friends.push((friend, events, conversation));
        }
        let shards: std::collections::HashSet<usize> = friends
            .iter()
            .map(|(_, _, c)| chat_server::delivery::shard_of(*c, 3))
            .collect();
        assert!(shards.len() > 1, "conversations on one committer only: {shards:?}");

        // Every friend sends its texts at once, without waiting for acks.
        let mut sends = Vec::new();
        for (friend, _, conversation) in &friends {
            for n in 0..EACH {
                let (friend, conversation) = (friend.clone(), *conversation);
                let text = format!("{conversation}/{n}");
                sends.push(tokio::spawn(async move {
                    let ack = friend.send_text(conversation, &text).await;
                    (text, ack)
                }));
            }
        }
        let mut acked = std::collections::HashMap::new();
        for send in sends {
            let (text, ack) = send.await.unwrap();
            let ack = ack.unwrap();
            acked.insert((ack.conversation_id, ack.seq), text);
        }
        assert_eq!(acked.len(), FRIENDS * EACH, "every send has its own seq");

        // Each conversation arrives complete and in seq order, each seq
        // carrying the text its ack named.
        let got = messages(&mut hub_events, FRIENDS * EACH).await;
        for (_, _, conversation) in &friends {
            let arrived: Vec<&proto::Message> = got
                .iter()
                .filter(|m| m.conversation_id == *conversation)
                .collect();
            let seqs: Vec<u64> = arrived.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, (1..=EACH as u64).collect::<Vec<_>>(), "conversation {conversation}");
            for m in arrived {
                assert_eq!(Some(&m.text), acked.get(&(m.conversation_id, m.seq)));
            }
        }
        assert_no_message(&mut hub_events, Duration::from_millis(300)).await;

        // Watermark moves go through the sharded committers too: every
        // friend hears "seen" for its last message.
        let hub_id = hub.identity().user_id;
        for (_, _, conversation) in &friends {
            hub.mark_seen(*conversation, EACH as u64).await.unwrap();
        }
        for (_, events, conversation) in &mut friends {
            receipt(events, *conversation, hub_id, "seen receipt", |r| {
                r.seen_seq == EACH as u64 && r.delivered_seq == EACH as u64
            })
            .await;
        }
    }

    async fn a_nul_character_is_refused_and_sinks_no_one_elses_send(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, _bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        // Bob's sends are in flight while Alice's bad ones arrive, so they
        // can share group commits.
        let good: Vec<_> = (0..20)
            .map(|i| {
                let bob = bob.clone();
                tokio::spawn(async move { bob.send_text(conversation, &format!("fine {i}")).await })
            })
            .collect();
        for _ in 0..5 {
            assert_eq!(
                code(alice.send_text(conversation, "nul \0 inside").await),
                ErrorCode::InvalidArgument
            );
            assert_eq!(
                code(alice.send_with_id(conversation, "key\0", "hi").await),
                ErrorCode::InvalidArgument
            );
        }
        for send in good {
            send.await.unwrap().expect("a send beside a refused one is stored");
        }
        assert_eq!(
            code(alice.create_group("bad\0name", &[bob.identity().user_id]).await),
            ErrorCode::InvalidArgument
        );
        let ack = alice.send_text(conversation, "after").await.unwrap();
        assert_eq!(ack.seq, 21, "nothing refused took a seq");
        // A device name is a label: U+0000 is dropped from it, not refused.
        let mut config = server.client_config();
        config.device_name = "phone\0".into();
        let (carol, _) = register(config, &name("carol")).await;
        assert!(carol.identity().user_id > 0);
        let page = bob.history(conversation, HistoryDirection::Backward, 0, 50).await.unwrap();
        assert_eq!(page.messages.len(), 21);
        assert!(page.messages.iter().all(|m| !m.text.contains('\0')));
    }

    async fn sent_then_delivered_then_seen(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let bob_id = bob.identity().user_id;

        // 1. Sent: the ack carries seq, id and a server timestamp.
        let ack = alice.send_text(conversation, "hello bob").await.unwrap();
        assert_eq!((ack.conversation_id, ack.seq), (conversation, 1));
        assert!(ack.message_id > 0 && ack.sent_at_ms > 0 && !ack.duplicate);

        let got = messages(&mut bob_events, 1).await;
        assert_eq!(got[0].text, "hello bob");
        assert_eq!(got[0].sender_id, alice.identity().user_id);
        assert_eq!((got[0].seq, got[0].message_id), (ack.seq, ack.message_id));

        // 2. Delivered: Bob's client acked it; Alice hears it before any seen.
        let delivered = receipt(
            &mut alice_events,
            conversation,
            bob_id,
            "delivered receipt",
            |r| r.delivered_seq >= 1,
        )
        .await;
        assert_eq!(delivered.seen_seq, 0, "delivered arrives before seen");

        // 3. Seen.
        bob.mark_seen(conversation, ack.seq).await.unwrap();
        let seen = receipt(
            &mut alice_events,
            conversation,
            bob_id,
            "seen receipt",
            |r| r.seen_seq >= 1,
        )
        .await;
        assert_eq!((seen.delivered_seq, seen.seen_seq), (1, 1));

        // Watermarks only move forward: a lower mark is ignored (no receipt,
        // state unchanged).
        bob.mark_seen(conversation, 0).await.unwrap();
        let info = alice.open_direct(bob_id).await.unwrap();
        let bob_member = info.members.iter().find(|m| m.user_id == bob_id).unwrap();
        assert_eq!((bob_member.delivered_seq, bob_member.seen_seq), (1, 1));
    }

    async fn a_waiting_receipt_leaves_with_the_next_frame_to_its_connection(backend: Backend) {
        // Receipts may wait a minute for company here, so within the
        // deadlines below only a frame to the same connection can take one.
        let server = TestServer::start_on_with(backend.clone(), |c| {
            c.transport.receipt_linger = Duration::from_secs(60);
        })
        .await;
        let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let bob_id = bob.identity().user_id;

        alice.send_text(conversation, "first").await.unwrap();
        messages(&mut bob_events, 1).await;
        // Bob's client acks the delivery; nothing else goes to Alice, so her
        // delivered receipt waits.
        quiet_for_a_second(
            &mut alice_events,
            "a receipt left before its linger or a frame to take it",
            |e| matches!(e, Event::Receipt(_)),
        )
        .await;

        // Bob writes back: the Deliver to Alice carries the receipt along. A
        // receipt queued after one Deliver went out rides with the next, so
        // Bob keeps writing (once a second) until it arrives.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut sent = 0;
        let delivered = loop {
            bob.send_text(conversation, &format!("reply {sent}")).await.unwrap();
            sent += 1;
            let next = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
            let mut found = None;
            while let Ok(Some(event)) = tokio::time::timeout_at(next, alice_events.next()).await {
                if let Event::Receipt(r) = event
                    && r.conversation_id == conversation
                    && r.user_id == bob_id
                    && r.delivered_seq >= 1
                {
                    found = Some(r);
                    break;
                }
            }
            if let Some(r) = found {
                break r;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the delivered receipt did not ride along with {sent} messages to Alice"
            );
        };
        assert_eq!(delivered.seen_seq, 0);
    }

    async fn a_delivery_ack_leaves_with_the_recipients_next_send(backend: Backend) {
        // Bob's client may hold a delivery ack for a minute, so within the
        // deadlines below only his next send can carry it to the server.
        let server = TestServer::start_on(backend.clone()).await;
        let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
        let mut patient = server.client_config();
        patient.delivery_ack_linger = Duration::from_secs(60);
        let (bob, mut bob_events) = register(patient, &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let bob_id = bob.identity().user_id;

        alice.send_text(conversation, "first").await.unwrap();
        messages(&mut bob_events, 1).await;
        quiet_for_a_second(
            &mut alice_events,
            "Bob's ack left before its linger or a send to take it",
            |e| matches!(e, Event::Receipt(r) if r.user_id == bob_id),
        )
        .await;

        bob.send_text(conversation, "reply").await.unwrap();
        let delivered = receipt(
            &mut alice_events,
            conversation,
            bob_id,
            "Bob's delivered receipt, carried by his reply",
            |r| r.delivered_seq >= 1,
        )
        .await;
        assert_eq!(delivered.seen_seq, 0);
    }

    async fn offline_recipient_gets_everything_in_order_once(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, _bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let bob_token = bob.identity().token;
        let bob_id = bob.identity().user_id;
        bob.close();

        let mut acks = Vec::new();
        for i in 0..100 {
            acks.push(
                alice
                    .send_text(conversation, &format!("message {i}"))
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(
            acks.iter().map(|a| a.seq).collect::<Vec<_>>(),
            (1..=100).collect::<Vec<_>>()
        );

        // Alice drops her connection before Bob comes back: the delivered
        // receipt must still reach her (live after her reconnect, or in the
        // snapshot sent when her receipts stream opens).
        alice.reconnect_now();
        assert!(alice.wait_connected(WAIT).await);

        let (_bob, mut bob_events) = Client::resume(server.client_config(), &bob_token)
            .await
            .unwrap();
        let got = messages(&mut bob_events, 100).await;
        assert_eq!(
            got.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (1..=100).collect::<Vec<_>>()
        );
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, m)| m.text == format!("message {i}"))
        );
        assert_no_message(&mut bob_events, Duration::from_millis(300)).await;

        receipt(
            &mut alice_events,
            conversation,
            bob_id,
            "delivered 100",
            |r| r.delivered_seq == 100,
        )
        .await;
    }

    async fn receipts_missed_while_offline_arrive_on_reconnect(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let alice_token = alice.identity().token;
        let ack = alice
            .send_text(conversation, "read me later")
            .await
            .unwrap();
        alice.close();

        messages(&mut bob_events, 1).await;
        bob.mark_seen(conversation, ack.seq).await.unwrap();

        let (_alice, mut alice_events) = Client::resume(server.client_config(), &alice_token)
            .await
            .unwrap();
        let r = receipt(
            &mut alice_events,
            conversation,
            bob.identity().user_id,
            "seen snapshot",
            |r| r.seen_seq == 1,
        )
        .await;
        assert_eq!(r.delivered_seq, 1);
    }

    async fn retried_sends_are_stored_once(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;

        let first = alice
            .send_with_id(conversation, "draft-1", "once")
            .await
            .unwrap();
        let again = alice
            .send_with_id(conversation, "draft-1", "once")
            .await
            .unwrap();
        assert!(!first.duplicate && again.duplicate);
        assert_eq!(
            (again.seq, again.message_id, again.sent_at_ms),
            (first.seq, first.message_id, first.sent_at_ms)
        );

        // Across a reconnect too.
        alice.reconnect_now();
        assert!(alice.wait_connected(WAIT).await);
        let third = alice
            .send_with_id(conversation, "draft-1", "once")
            .await
            .unwrap();
        assert_eq!(third.message_id, first.message_id);

        let next = alice.send_text(conversation, "twice").await.unwrap();
        assert_eq!(next.seq, 2, "retries consumed no seq");
        let page = alice
            .history(conversation, HistoryDirection::Backward, 0, 50)
            .await
            .unwrap();
        assert_eq!(
            page.messages
                .iter()
                .map(|m| m.text.as_str())
                .collect::<Vec<_>>(),
            vec!["once", "twice"]
        );
        let got = messages(&mut bob_events, 2).await;
        assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_no_message(&mut bob_events, Duration::from_millis(300)).await;
    }

    async fn sends_queued_while_disconnected_go_out_on_reconnect(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        alice.reconnect_now();
        // Whether these leave before or after the reconnect, each is stored once
        // and in order.
        let sends: Vec<_> = (0..20)
            .map(|i| {
                let alice = alice.clone();
                tokio::spawn(async move {
                    alice
                        .send_with_id(conversation, &format!("k{i:02}"), &format!("m{i}"))
                        .await
                })
            })
            .collect();
        let mut seqs = Vec::new();
        for send in sends {
            seqs.push(send.await.unwrap().unwrap().seq);
        }
        seqs.sort();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        assert_eq!(messages(&mut bob_events, 20).await.len(), 20);
    }

    async fn acked_messages_survive_a_killed_server(backend: Backend) {
        let _clean_up = backend.cleaned_up_on_drop();
        let dir = tempfile::tempdir().unwrap();
        let server = ChildServer::start_on(&backend, dir.path(), 0).await;
        let (alice, _ea, conversation, bob_token, acked) =
            alice_sends_to_offline_bob(&server.client_config(), 50, "durable").await;
        // SIGKILL right after the last ack: no graceful anything.
        server.kill().await;
        alice.close();

        // Any port: the clients below are new (the old one may be taken).
        let server = ChildServer::start_on(&backend, dir.path(), 0).await;
        let (bob, mut bob_events) = Client::resume(server.client_config(), &bob_token)
            .await
            .expect("token survives");
        let got = messages(&mut bob_events, 50).await;
        assert_eq!(
            got.iter().map(|m| m.message_id).collect::<Vec<_>>(),
            acked.iter().map(|a| a.message_id).collect::<Vec<_>>()
        );
        let page = bob
            .history(conversation, HistoryDirection::Forward, 0, 100)
            .await
            .unwrap();
        assert_eq!(page.messages.len(), 50);
        server.kill().await;
    }

    async fn a_dropped_connection_mid_burst_loses_and_duplicates_nothing(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        const N: usize = 1000;
        let sender = {
            let alice = alice.clone();
            tokio::spawn(async move {
                let mut pending = Vec::with_capacity(N);
                for i in 0..N {
                    let alice = alice.clone();
                    pending.push(tokio::spawn(async move {
                        alice.send_text(conversation, &format!("burst {i}")).await
                    }));
                    if i % 100 == 99 {
                        // Keep the outbox below its bound.
                        for p in pending.drain(..) {
                            p.await.unwrap().unwrap();
                        }
                    }
                }
                for p in pending {
                    p.await.unwrap().unwrap();
                }
            })
        };
        let mut got = messages(&mut bob_events, 300).await;
        bob.reconnect_now();
        got.extend(messages(&mut bob_events, N - 300).await);
        sender.await.unwrap();
        assert_eq!(
            got.iter().map(|m| m.seq).collect::<Vec<_>>(),
            (1..=N as u64).collect::<Vec<_>>()
        );
        assert_no_message(&mut bob_events, Duration::from_millis(500)).await;
    }

    async fn history_pages_and_the_conversation_list(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        let (bob, _eb) = register(server.client_config(), &name("bob")).await;
        let (carol, _ec) = register(server.client_config(), &name("carol")).await;
        let with_bob = befriend(&alice, &bob).await;
        let with_carol = befriend(&alice, &carol).await;
        for i in 1..=30 {
            bob.send_text(with_bob, &format!("b{i}")).await.unwrap();
        }
        carol.send_text(with_carol, "hi from carol").await.unwrap();

        let texts = |page: &proto::HistoryPage| {
            page.messages
                .iter()
                .map(|m| m.text.clone())
                .collect::<Vec<_>>()
        };
        let newest = alice
            .history(with_bob, HistoryDirection::Backward, 0, 10)
            .await
            .unwrap();
        assert_eq!(
            texts(&newest),
            (21..=30).map(|i| format!("b{i}")).collect::<Vec<_>>()
        );
        assert!(newest.has_more);
        let older = alice
            .history(with_bob, HistoryDirection::Backward, 21, 25)
            .await
            .unwrap();
        assert_eq!(
            texts(&older),
            (1..=20).map(|i| format!("b{i}")).collect::<Vec<_>>()
        );
        assert!(!older.has_more);
        let forward = alice
            .history(with_bob, HistoryDirection::Forward, 25, 10)
            .await
            .unwrap();
        assert_eq!(
            texts(&forward),
            (26..=30).map(|i| format!("b{i}")).collect::<Vec<_>>()
        );
        assert!(!forward.has_more);
        // A page size beyond the server's cap is not an error (the cap
        // itself: history_pages_are_capped_at_the_protocol_page_size).
        let capped = alice
            .history(with_bob, HistoryDirection::Forward, 0, 1_000_000)
            .await
            .unwrap();
        assert_eq!(capped.messages.len(), 30);

        let list = alice.conversations(10, None).await.unwrap();
        assert_eq!(
            list.iter().map(|c| c.conversation_id).collect::<Vec<_>>(),
            vec![with_carol, with_bob]
        );
        assert_eq!(list[0].last_message.as_ref().unwrap().text, "hi from carol");
        assert_eq!((list[0].unread_count, list[1].unread_count), (1, 30));
        alice.mark_seen(with_bob, 25).await.unwrap();
        let list = alice.conversations(10, None).await.unwrap();
        assert_eq!(list[1].unread_count, 5);
        let second_page = alice
            .conversations(1, Some(&list[0]))
            .await
            .unwrap();
        assert_eq!(
            second_page
                .iter()
                .map(|c| c.conversation_id)
                .collect::<Vec<_>>(),
            vec![with_bob]
        );
    }

    async fn non_members_cannot_send_read_or_mark(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let (eve, _ee) = register(server.client_config(), &name("eve")).await;
        let conversation = befriend(&alice, &bob).await;
        alice.send_text(conversation, "private").await.unwrap();

        assert_eq!(
            code(eve.send_text(conversation, "let me in").await),
            ErrorCode::NotAMember
        );
        assert_eq!(
            code(
                eve.history(conversation, HistoryDirection::Backward, 0, 10)
                    .await
            ),
            ErrorCode::NotAMember
        );
        assert_eq!(
            code(eve.mark_seen(conversation, 1).await),
            ErrorCode::NotAMember
        );
        assert_eq!(
            code(
                eve.history(9_999_999, HistoryDirection::Backward, 0, 10)
                    .await
            ),
            ErrorCode::NotAMember
        );
        assert!(eve.conversations(10, None).await.unwrap().is_empty());
        // Bob got only Alice's message.
        let got = messages(&mut bob_events, 1).await;
        assert_eq!(got[0].text, "private");
        assert_no_message(&mut bob_events, Duration::from_millis(300)).await;
    }

    // Replies, reactions, edits and unsends sent under a key the app kept
    // (`send_message_with_id`) and sent again by the same users' next clients (an
    // app restarted before the answers came) are stored once: the second
    // try gets the first's seq as a duplicate, an edit and an unsend
    // too after the unsend erased what they name.
    async fn keyed_replies_reactions_edits_and_unsends_are_stored_once(backend: Backend) {
        let server = TestServer::start_on(backend).await;
        let (alice_name, bob_name) = (name("alice"), name("bob"));
        let (alice, _alice_events) = register(server.client_config(), &alice_name).await;
        let (bob, _bob_events) = register(server.client_config(), &bob_name).await;
        let direct = befriend(&alice, &bob).await;
        let seq = alice.send_text(direct, "dinner at 8?").await.unwrap().seq;
        let sends = [
            (&bob, "bob-reply", Outgoing::reply(seq, "yes!")),
            (&bob, "bob-like", Outgoing::reaction(seq, "👍")),
            (&alice, "alice-edit", Outgoing::edit(seq, "dinner at 9?")),
            (&alice, "alice-unsend", Outgoing::unsend(seq)),
        ];
        let mut first = Vec::new();
        for (client, key, outgoing) in sends {
            let ack = client.send_message_with_id(direct, key, outgoing).await.unwrap();
            assert!(!ack.duplicate, "{key}: the first try is new");
            first.push(ack.seq);
        }
        assert_eq!(first, (seq + 1..=seq + 4).collect::<Vec<_>>());
        let (alice_again, _) = Client::login(server.client_config(), &alice_name, PASSWORD)
            .await
            .unwrap();
        let (bob_again, _) = Client::login(server.client_config(), &bob_name, PASSWORD)
            .await
            .unwrap();
        let again = [&bob_again, &bob_again, &alice_again, &alice_again];
        for ((client, (_, key, outgoing)), seq) in again.into_iter().zip(sends).zip(&first) {
            let ack = client.send_message_with_id(direct, key, outgoing).await.unwrap();
            assert!(ack.duplicate, "{key}: the second try is the first's");
            assert_eq!(ack.seq, *seq, "{key}");
        }
        // A key names one message: another of its kind under it is
        // answered as the stored one, and not sent; another kind refused.
        let same_kind = alice_again
            .send_message_with_id(direct, "alice-edit", Outgoing::edit(seq, "dinner at 10?"))
            .await
            .unwrap();
        assert!(same_kind.duplicate);
        assert_eq!(same_kind.seq, first[2]);
        let reused = alice_again
            .send_message_with_id(direct, "alice-edit", Outgoing::text("something else"))
            .await;
        assert_eq!(code(reused), ErrorCode::InvalidArgument);
        let page = alice_again
            .history(direct, HistoryDirection::Backward, 0, 20)
            .await
            .unwrap();
        let stored: Vec<_> = page
            .messages
            .iter()
            .filter(|m| m.seq >= seq)
            .map(|m| (m.seq, m.r#type(), m.reply_to_seq))
            .collect();
        use proto::MessageType::{Edit, Reaction, Text, Unsend};
        assert_eq!(
            stored,
            [
                (seq, Text, 0),
                (seq + 1, Text, seq),
                (seq + 2, Reaction, seq),
                (seq + 3, Edit, seq),
                (seq + 4, Unsend, seq),
            ]
        );
    }

    async fn an_unsent_text_is_erased_live_in_history_and_on_catch_up(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let members = circle(&server, 3).await;
        let ids: Vec<u64> = members.iter().map(|(c, _)| c.identity().user_id).collect();
        let (clients, mut events): (Vec<Client>, Vec<Events>) = members.into_iter().unzip();
        let g = clients[0]
            .create_group("plans", &ids[1..])
            .await
            .unwrap()
            .conversation_id;
        let (alice, bob, carol) = (&clients[0], &clients[1], &clients[2]);
        assert_eq!(alice.unsend_window(), Duration::from_secs(60 * 3600));
        // Carol is offline through all of it (with Redis, her unread queue
        // holds what she is owed).
        let carol_token = carol.identity().token;
        carol.close();
        let secret = alice.send_text(g, "the surprise is at 8").await.unwrap().seq;
        let edit = alice.edit(g, secret, "the surprise is at 9").await.unwrap().seq;
        let reply = bob.send_reply(g, secret, "shh!").await.unwrap().seq;
        let kept = alice.send_text(g, "see you there").await.unwrap().seq;
        backend.wait_queued_through(ids[2], g, kept).await;
        let unsent = alice.unsend(g, secret).await.unwrap().seq;
        backend.wait_queued_through(ids[2], g, unsent).await;

        // Bob had it live; the UNSEND tells his app to drop it.
        let mut got = Vec::new();
        while got.last().is_none_or(|m: &proto::Message| m.seq < unsent) {
            got.extend(messages(&mut events[1], 1).await);
        }
        got.retain(|m| m.r#type() != proto::MessageType::System);
        assert_eq!(
            got.iter()
                .map(|m| (m.seq, m.r#type(), m.reply_to_seq))
                .collect::<Vec<_>>(),
            [
                (secret, proto::MessageType::Text, 0),
                (edit, proto::MessageType::Edit, secret),
                (kept, proto::MessageType::Text, 0),
                (unsent, proto::MessageType::Unsend, secret),
            ]
        );
        let mut unsends = Unsends::new();
        for m in &got {
            unsends.apply(m);
        }
        assert!(unsends.is_unsent(g, secret));
        assert!(!unsends.is_unsent(g, kept));

        // History (the recent cache's pages included) serves it erased,
        // and its edit; the reply and the rest stand.
        let shown = |m: &proto::Message| (m.seq, m.text.clone(), m.unsent);
        let expected = [
            (secret, String::new(), true),
            (edit, String::new(), true),
            (reply, "shh!".to_string(), false),
            (kept, "see you there".to_string(), false),
            (unsent, String::new(), false),
        ];
        for reader in [alice, bob] {
            let page = reader
                .history(g, HistoryDirection::Backward, 0, 10)
                .await
                .unwrap();
            let page: Vec<_> = page.messages.iter().map(shown).collect();
            assert_eq!(page[1..], expected[..], "after the group's creation");
        }
        assert_eq!(
            bob.message(g, secret).await.unwrap().map(|m| (m.text, m.unsent)),
            Some((String::new(), true))
        );

        // Carol catches up with it erased: not a word of it reaches her.
        let (_carol, mut carol_events) = Client::resume(server.client_config(), &carol_token)
            .await
            .unwrap();
        let caught_up = messages(&mut carol_events, 6).await;
        let caught_up: Vec<_> = caught_up.iter().map(shown).collect();
        assert_eq!(caught_up[1..], expected[..]);
        assert!(caught_up.iter().all(|(_, text, _)| !text.contains("surprise")));
        // Neither unsent messages nor unsends are unread.
        let listed = bob.conversations(10, None).await.unwrap();
        let entry = listed.iter().find(|c| c.conversation_id == g).unwrap();
        assert_eq!(
            entry.unread_count, 2,
            "the group's creation and \"see you there\""
        );

        // Nothing may name it any more, and only one's own texts and
        // photos within the window may be unsent.
        let like = bob.react(g, kept, "👍").await.unwrap().seq;
        for (result, want) in [
            (alice.unsend(g, secret).await, ErrorCode::NotFound),
            (alice.edit(g, secret, "x").await, ErrorCode::NotFound),
            (bob.react(g, secret, "👍").await, ErrorCode::NotFound),
            (bob.send_reply(g, secret, "?").await, ErrorCode::NotFound),
            (alice.unsend(g, reply).await, ErrorCode::InvalidArgument),
            (bob.unsend(g, like).await, ErrorCode::InvalidArgument),
            // Erased with its message.
            (alice.unsend(g, edit).await, ErrorCode::NotFound),
            (alice.unsend(g, 1).await, ErrorCode::InvalidArgument),
            (alice.unsend(g, 999).await, ErrorCode::NotFound),
            (alice.unsend(g, 0).await, ErrorCode::InvalidArgument),
        ] {
            assert_eq!(code(result), want);
        }
    }

    async fn a_member_removed_after_an_unsent_text_catches_up_without_it(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let members = circle(&server, 3).await;
        let ids: Vec<u64> = members.iter().map(|(c, _)| c.identity().user_id).collect();
        let (clients, _events): (Vec<Client>, Vec<Events>) = members.into_iter().unzip();
        let g = clients[0]
            .create_group("plans", &ids[1..])
            .await
            .unwrap()
            .conversation_id;
        let (alice, carol) = (&clients[0], &clients[2]);
        let carol_token = carol.identity().token;
        carol.close();
        let secret = alice.send_text(g, "the surprise is at 8").await.unwrap().seq;
        alice.remove_member(g, ids[2]).await.unwrap();
        // Her queue holds all she is owed, the removal included: it agrees
        // with history as to which seqs.
        backend.wait_queued_through(ids[2], g, secret + 1).await;
        // Not a member, Carol is not sent the UNSEND, nor is it queued for
        // her; her catch-up reads history, which has the text erased.
        alice.unsend(g, secret).await.unwrap();
        let (_carol, mut carol_events) = Client::resume(server.client_config(), &carol_token)
            .await
            .unwrap();
        // The group's creation, the text (erased), her removal.
        let caught_up = messages(&mut carol_events, 3).await;
        assert_eq!(
            caught_up
                .iter()
                .map(|m| (m.seq, m.text.contains("surprise"), m.unsent))
                .collect::<Vec<_>>()[1],
            (secret, false, true)
        );
        assert_no_message(&mut carol_events, Duration::from_millis(300)).await;
    }

    async fn a_text_is_edited_by_its_author_within_the_window(backend: Backend) {
        let server = TestServer::start_on(backend).await;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let direct = befriend(&alice, &bob).await;
        assert_eq!(alice.edit_window(), Duration::from_secs(15 * 60));
        let typo = alice.send_text(direct, "helo").await.unwrap().seq;
        let fixed = alice.edit(direct, typo, "hello").await.unwrap().seq;
        let again = alice.edit(direct, typo, "hello!").await.unwrap().seq;
        // Bob gets the text and its edits, which fold to the latest.
        let got = messages(&mut bob_events, 3).await;
        assert_eq!(
            got.iter()
                .map(|m| (m.seq, m.r#type(), m.reply_to_seq))
                .collect::<Vec<_>>(),
            [
                (typo, proto::MessageType::Text, 0),
                (fixed, proto::MessageType::Edit, typo),
                (again, proto::MessageType::Edit, typo)
            ]
        );
        let mut edits = Edits::new();
        for m in got.iter().rev() {
            edits.apply(m);
        }
        assert_eq!(edits.of(direct, typo), Some("hello!"));
        // Not unread: Bob's list counts the text alone.
        let listed = bob.conversations(10, None).await.unwrap();
        let entry = listed.iter().find(|c| c.conversation_id == direct).unwrap();
        assert_eq!(entry.unread_count, 1);
        // Only one's own texts, with words, that exist.
        let bobs = bob.send_text(direct, "hi").await.unwrap().seq;
        for (result, want) in [
            (alice.edit(direct, bobs, "x").await, ErrorCode::InvalidArgument),
            (alice.edit(direct, fixed, "x").await, ErrorCode::InvalidArgument),
            (alice.edit(direct, typo, " ").await, ErrorCode::EmptyMessage),
            (alice.edit(direct, 999, "x").await, ErrorCode::NotFound),
            (alice.edit(direct, 0, "x").await, ErrorCode::InvalidArgument),
        ] {
            assert_eq!(code(result), want);
        }
    }

    async fn replies_and_reactions_reach_every_member_and_fold_from_history(backend: Backend) {
        let server = TestServer::start_on(backend).await;
        let members = circle(&server, 4).await;
        let ids: Vec<u64> = members.iter().map(|(c, _)| c.identity().user_id).collect();
        let (clients, mut events): (Vec<Client>, Vec<Events>) = members.into_iter().unzip();
        let g = clients[0]
            .create_group("lunch", &ids[1..3])
            .await
            .unwrap()
            .conversation_id;
        let (alice, bob, carol, dave) = (&clients[0], &clients[1], &clients[2], &clients[3]);
        let question = alice.send_text(g, "lunch?").await.unwrap().seq;
        let reply = bob.send_reply(g, question, "yes!").await.unwrap().seq;
        // Carol likes the question, Bob too, then laughs instead; Carol
        // takes hers back; Alice reacts to Bob's reply.
        let mut reactions = Vec::new();
        for (who, to, emoji) in [
            (carol, question, "👍"),
            (bob, question, "❤️"),
            (bob, question, "😂"),
            (carol, question, ""),
            (alice, reply, "👨🏻‍👩🏻‍👧🏻‍👦🏻"),
        ] {
            reactions.push(who.react(g, to, emoji).await.unwrap().seq);
        }
        let expected_question = vec![(ids[1], "😂")];
        let expected_reply = vec![(ids[0], "👨🏻‍👩🏻‍👧🏻‍👦🏻")];

        // Live, every other member gets the reply and each reaction as a
        // message naming what it refers to; folded, they show the latest
        // (Alice's device has all but her own, Carol's all but hers).
        let last = *reactions.last().unwrap();
        let mut seen = Vec::new();
        for i in [0, 2] {
            let mut got = Vec::new();
            while got.last().is_none_or(|m: &proto::Message| m.seq < last - 1) {
                got.extend(messages(&mut events[i], 1).await);
            }
            seen.push(got);
        }
        let reply_message = seen[0].iter().find(|m| m.seq == reply).unwrap();
        assert_eq!(
            (reply_message.r#type(), reply_message.reply_to_seq, reply_message.text.as_str()),
            (proto::MessageType::Text, question, "yes!")
        );
        let mut live = Reactions::new();
        for m in &seen[0] {
            live.apply(m);
        }
        assert_eq!(live.of(g, question), expected_question);
        while seen[1].last().unwrap().seq < last {
            seen[1].extend(messages(&mut events[2], 1).await);
        }
        let mut live = Reactions::new();
        for m in &seen[1] {
            live.apply(m);
        }
        assert_eq!(live.of(g, reply), expected_reply);

        // From history read backwards a page at a time (each reaction comes
        // before the message it names), the same.
        let mut folded = Reactions::new();
        let mut cursor = 0;
        loop {
            let page = alice
                .history(g, HistoryDirection::Backward, cursor, 2)
                .await
                .unwrap();
            for m in &page.messages {
                folded.apply(m);
            }
            cursor = page.messages.first().map_or(0, |m| m.seq);
            if !page.has_more {
                break;
            }
        }
        assert_eq!(folded.of(g, question), expected_question);
        assert_eq!(folded.of(g, reply), expected_reply);
        let listed = carol.conversations(10, None).await.unwrap();
        let entry = listed.iter().find(|c| c.conversation_id == g).unwrap();
        let last = entry.last_message.as_ref().unwrap();
        assert_eq!(
            (last.r#type(), last.reply_to_seq),
            (proto::MessageType::Reaction, reply)
        );

        // What they may not refer to: the group's SYSTEM message, a
        // reaction, a seq that does not exist, nothing; a reaction that is
        // not an emoji-sized token.
        let created = 1;
        for (result, want) in [
            (alice.react(g, created, "👍").await, ErrorCode::InvalidArgument),
            (alice.send_reply(g, created, "hm").await, ErrorCode::InvalidArgument),
            (alice.react(g, reactions[0], "👍").await, ErrorCode::InvalidArgument),
            (alice.send_reply(g, 10_000, "hm").await, ErrorCode::NotFound),
            (alice.react(g, 0, "👍").await, ErrorCode::InvalidArgument),
            (alice.react(g, question, "a b").await, ErrorCode::InvalidArgument),
            (alice.react(g, question, &"👍".repeat(17)).await, ErrorCode::InvalidArgument),
        ] {
            assert_eq!(code(result), want);
        }
        // Dave, added now, reads from the message that added him: what came
        // before is not his to answer, what comes after is.
        alice.add_members(g, &[ids[3]]).await.unwrap();
        assert_eq!(code(dave.send_reply(g, question, "me too").await), ErrorCode::NotFound);
        // Nor his to read by its seq (a page from before it starts at the
        // message that added him), while Alice reads it.
        assert_eq!(dave.message(g, question).await.unwrap(), None);
        let quoted = alice.message(g, question).await.unwrap();
        assert_eq!(quoted.map(|m| m.text), Some("lunch?".to_owned()));
        let later = alice.send_text(g, "1 pm").await.unwrap().seq;
        let answer = dave.send_reply(g, later, "me too").await.unwrap();
        assert_eq!(answer.seq, later + 1);
        // A seq of another conversation names nothing here.
        let direct = befriend(bob, dave).await;
        assert_eq!(code(bob.send_reply(direct, question, "?").await), ErrorCode::NotFound);
    }
}

#[tokio::test]
async fn sigterm_finishes_commits_and_tells_clients_to_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start_on(&Backend::Embedded, dir.path(), 0).await;
    let (alice, mut alice_events, conversation, bob_token, acked) =
        alice_sends_to_offline_bob(&server.client_config(), 20, "before stop").await;
    let (status, body) = http_get(server.metrics, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert!(server.terminate().await, "a clean exit after SIGTERM");
    // Connected clients are told to reconnect (possibly elsewhere).
    let code = wait_for(&mut alice_events, "disconnect", |e| match e {
        Event::Disconnected { code } => Some(code),
        _ => None,
    })
    .await;
    assert_eq!(code, Some(ErrorCode::ServerShuttingDown));

    // Everything acked before the stop is in history.
    let server = ChildServer::start_on(&Backend::Embedded, dir.path(), 0).await;
    let (bob, mut bob_events) = Client::resume(server.client_config(), &bob_token)
        .await
        .unwrap();
    let got = messages(&mut bob_events, 20).await;
    assert_eq!(
        got.iter().map(|m| m.message_id).collect::<Vec<_>>(),
        acked.iter().map(|a| a.message_id).collect::<Vec<_>>()
    );
    let page = bob
        .history(conversation, HistoryDirection::Forward, 0, 100)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 20);
    alice.close();
    server.kill().await;
}

/// A server without a send rate limit, alice and bob as friends (each
/// with their events), and `n` texts of 15,000 bytes from alice in their
/// conversation, each starting with its two-digit index.
async fn long_texts(n: u64) -> (TestServer, (Client, Events), (Client, Events), u64) {
    let server = TestServer::start_with(unlimited_sends_and_requests).await;
    let alice = register(server.client_config(), &name("alice")).await;
    let bob = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice.0, &bob.0).await;
    for i in 0..n {
        let text = format!("{i:02}{}", "x".repeat(14_998));
        alice.0.send_text(conversation, &text).await.unwrap();
    }
    (server, alice, bob, conversation)
}

#[tokio::test]
async fn history_pages_are_capped_at_the_protocol_page_size() {
    let max = chat_protocol::limits::MAX_PAGE_SIZE as usize;
    let server = TestServer::start_with(unlimited_sends).await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, _eb) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    send_texts(&alice, conversation, max + 5).await;
    let page = bob
        .history(conversation, HistoryDirection::Forward, 0, 1_000)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), max);
    assert!(page.has_more);
    let rest = bob
        .history(
            conversation,
            HistoryDirection::Forward,
            page.messages[max - 1].seq,
            1_000,
        )
        .await
        .unwrap();
    assert_eq!(rest.messages.len(), 5);
    assert!(!rest.has_more);
}

#[tokio::test]
async fn history_pages_of_long_texts_fit_in_a_frame_and_page_on() {
    // 40 texts of 15,000 bytes: one page of them would be ~600 KB, ten
    // times the 64 KiB frame limit; the server hands them out in pages
    // that fit, and paging either way reads all of them once, in order.
    const N: u64 = 40;
    let (server, _alice, (bob, _eb), conversation) = long_texts(N).await;
    let max = server.config.limits.max_frame_len;
    let seqs_of =
        |page: &proto::HistoryPage| page.messages.iter().map(|m| m.seq).collect::<Vec<_>>();

    let mut seqs = Vec::new();
    let mut cursor = 0;
    let mut backward_pages = 0;
    loop {
        let page = bob
            .history(conversation, HistoryDirection::Backward, cursor, 200)
            .await
            .unwrap();
        backward_pages += 1;
        assert!(!page.messages.is_empty(), "a page always moves on");
        let encoded = prost::Message::encoded_len(&page);
        assert!(encoded <= max, "page of {encoded} bytes over {max}");
        seqs.splice(0..0, seqs_of(&page));
        cursor = page.messages[0].seq;
        if !page.has_more {
            break;
        }
        assert!(seqs.len() < N as usize, "has_more past the first message");
    }
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
    assert!(
        backward_pages > 4,
        "{backward_pages} pages: they must fit a frame"
    );

    let mut seqs = Vec::new();
    let mut cursor = 0;
    let mut pages = 0;
    loop {
        let page = bob
            .history(conversation, HistoryDirection::Forward, cursor, 200)
            .await
            .unwrap();
        pages += 1;
        assert!(prost::Message::encoded_len(&page) <= max);
        seqs.extend(seqs_of(&page));
        let Some(last) = page.messages.last() else {
            break;
        };
        cursor = last.seq;
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
    assert!(pages > 1, "the texts took more than one page");
}

#[tokio::test]
async fn hundreds_of_pipelined_page_requests_are_all_answered() {
    // An app that asks for many history pages at once and reads the
    // answers as they come is not a slow consumer. The control stream
    // answers requests one at a time without waiting for its queue (4 MiB)
    // to drain; this guards that the writer keeps up, so the node does not
    // close such a connection with SLOW_CONSUMER. (Measured in session 25:
    // even 3,000 such requests never filled the queue.)
    let (_server, _alice, (bob, _eb), conversation) = long_texts(8).await;
    // Each answer is a page of about 60 KB: 400 of them are 24 MB.
    const REQUESTS: usize = 400;
    let mut pages = tokio::task::JoinSet::new();
    for _ in 0..REQUESTS {
        let bob = bob.clone();
        pages.spawn(async move {
            bob.history(conversation, HistoryDirection::Backward, 0, 200)
                .await
        });
    }
    let mut answered = 0;
    while let Some(page) = pages.join_next().await {
        let page = page.unwrap().expect("every page is answered");
        assert!(page.messages.len() >= 2, "{} messages", page.messages.len());
        answered += 1;
    }
    assert_eq!(answered, REQUESTS);
}

/// The client library's own faults, each seen against a node: a stream
/// the server stops, reconnects refused by a full node, heartbeats turned
/// back on, clients dropped without `close`, an app that does not drain
/// its events, and one that dies before it takes them.
mod client_faults {
    use std::collections::HashMap;
    use std::time::Duration;

    use chat_client::{Client, DeliveryAcks, Event, Events};

    use crate::harness::*;

    #[tokio::test]
    async fn reconnects_refused_by_a_full_node_wait_the_busy_delay() {
        // A reconnect refused with SERVER_BUSY used to wait only the
        // doubled delay (250 ms, 500 ms, 1 s here), so a fleet hammered a
        // full node; now it waits at least the busy delay (reconnect_max /
        // 2 = 30 s here) after the first refusal. The node has one
        // connection place; Alice takes it while Bob is away.
        let server = TestServer::start_with(|c| c.transport.max_connections = 1).await;
        let metrics = server.server.as_ref().unwrap().metrics_addr();
        let count = |m: &HashMap<String, f64>, key| value(m, key) as u64;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        let token = alice.identity().token;
        alice.close();
        scrape_until(metrics, "alice's place given back", |m| {
            count(m, "chat_connections_active") == 0
        })
        .await;
        let mut config = server.client_config();
        config.reconnect_min = Duration::from_millis(250);
        config.reconnect_max = Duration::from_secs(60);
        let (bob, _eb) = register(config, &name("bob")).await;

        let deadline = tokio::time::Instant::now() + WAIT;
        let in_time = || {
            assert!(
                tokio::time::Instant::now() < deadline,
                "alice never got the place while bob was away"
            );
        };
        let (alice, _alice_events) = 'race: loop {
            in_time();
            let opened = count(&scrape(metrics).await, "chat_connections_opened_total");
            bob.reconnect_now();
            loop {
                if let Ok(alice) = Client::resume(server.client_config(), &token).await {
                    break 'race alice;
                }
                // Bob was quicker: once he is back, let him go again.
                let now = count(&scrape(metrics).await, "chat_connections_opened_total");
                if now > opened {
                    assert!(bob.wait_connected(WAIT).await, "bob is back");
                    break;
                }
                in_time();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let refused = count(&scrape(metrics).await, "chat_connections_refused_total");
        // Bob's next attempt is refused; without the busy delay two more
        // would follow within this window.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let samples = scrape(metrics).await;
        let more = count(&samples, "chat_connections_refused_total") - refused;
        assert!(
            more <= 1,
            "{more} reconnects refused in 8 s: bob did not back off"
        );
        assert!(!bob.is_connected());
        // Asked to, he comes back at once once there is room.
        alice.close();
        scrape_until(metrics, "alice's place given back", |m| {
            count(m, "chat_connections_active") == 0
        })
        .await;
        bob.reconnect_now();
        assert!(bob.wait_connected(WAIT).await, "bob reconnects when asked");
    }

    #[tokio::test]
    async fn heartbeats_turned_back_on_show_the_user_online_at_once() {
        // Turning heartbeats back on used to wait for the next tick, up to
        // a whole interval, before the user showed online again. Alice
        // goes offline with her heartbeats off; they are turned back on
        // just after one of her ticks, so the next tick is most of an
        // interval away, and she must show online well before it.
        const HEARTBEAT: Duration = Duration::from_secs(6);
        let server = TestServer::start_with(|c| {
            c.limits.heartbeat_interval = HEARTBEAT;
            c.limits.presence_ttl_multiple = 2;
        })
        .await;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        // Her heartbeats are due every HEARTBEAT from about now.
        let ticks_from = tokio::time::Instant::now();
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        befriend(&alice, &bob).await;
        let a = alice.identity().user_id;
        assert!(bob.subscribe_presence(&[a]).await.unwrap()[0].online);
        alice.set_heartbeats(false);
        presence_of(&mut bob_events, a, false, "alice offline").await;

        let ticks = ticks_from.elapsed().as_secs_f64() / HEARTBEAT.as_secs_f64();
        let next = HEARTBEAT.mul_f64(ticks.floor() + 1.0);
        tokio::time::sleep_until(ticks_from + next + HEARTBEAT / 10).await;
        let on_ms = now_ms();
        alice.set_heartbeats(true);
        let online = presence_of(&mut bob_events, a, true, "alice back online").await;
        // Her last activity is the heartbeat that brought her back.
        let after = online.last_active_ms - on_ms;
        let next_tick = HEARTBEAT.mul_f64(0.9).as_millis() as i64;
        assert!(
            after < next_tick - 900,
            "the first heartbeat came {after} ms after turning them on (the next tick was {next_tick} ms away)"
        );
    }

    #[tokio::test]
    async fn a_client_heartbeats_at_its_own_interval_when_told() {
        // The node asks for a heartbeat a minute; Alice's client is told
        // every second (what chat-loadgen's --heartbeat-interval sets).
        // Each heartbeat refreshes her stored activity time, so Bob's
        // snapshots see it move within seconds.
        let server = TestServer::start_with(|c| {
            c.limits.heartbeat_interval = Duration::from_secs(60);
            c.transport.idle_timeout = Duration::from_secs(120);
        })
        .await;
        let mut config = server.client_config();
        config.heartbeat_interval = Some(Duration::from_secs(1));
        let (alice, _ea) = register(config, &name("alice")).await;
        let (bob, _eb) = register(server.client_config(), &name("bob")).await;
        befriend(&alice, &bob).await;
        let a = alice.identity().user_id;
        let first = bob.subscribe_presence(&[a]).await.unwrap()[0];
        assert!(first.online);
        wait_until("alice's activity time moved by her heartbeats", || async {
            let now = bob.subscribe_presence(&[a]).await.unwrap()[0];
            now.online && now.last_active_ms >= first.last_active_ms + 2_000
        })
        .await;
    }

    #[tokio::test]
    async fn a_client_dropped_without_close_disconnects() {
        // The connection used to live on, reconnecting for ever and
        // acknowledging deliveries nobody saw, once the app had dropped
        // every handle.
        let server = TestServer::start().await;
        let metrics = server.server.as_ref().unwrap().metrics_addr();
        let (alice, mut events) = register(server.client_config(), &name("alice")).await;
        let copy = alice.clone();
        assert_eq!(
            value(&scrape(metrics).await, "chat_connections_active"),
            1.0
        );
        drop(alice);
        assert!(copy.is_connected(), "a clone keeps the client");
        drop(copy);
        scrape_until(metrics, "the dropped client's connection closed", |m| {
            value(m, "chat_connections_active") == 0.0
        })
        .await;
        assert_events_end(&mut events).await;
    }

    #[tokio::test]
    async fn events_end_on_logout_while_a_clone_is_held() {
        let server = TestServer::start().await;
        let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
        let held = alice.clone();
        alice.logout().await.unwrap();
        assert_events_end(&mut alice_events).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let _held = bob.clone();
        bob.close();
        assert_events_end(&mut bob_events).await;
        assert!(!held.is_connected());
    }

    #[tokio::test]
    async fn an_app_that_does_not_drain_its_events_still_reconnects() {
        // The supervisor used to wait for room for Disconnected: with the
        // queue full it never reconnected. Connection-state events are now
        // dropped when there is no room; messages still wait for it.
        let server = TestServer::start().await;
        let metrics = server.server.as_ref().unwrap().metrics_addr();
        let mut config = server.client_config();
        config.event_capacity = 1;
        let (alice, mut alice_events) = register(config, &name("alice")).await;
        let (bob, _be) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        while alice_events.try_next().is_some() {}
        // A message fills Alice's queue (the ack of her reply comes
        // behind it on her messages stream).
        let sent = bob
            .send_text(conversation, "fills the queue")
            .await
            .unwrap();
        alice.send_text(conversation, "reply").await.unwrap();

        let opened = value(&scrape(metrics).await, "chat_connections_opened_total");
        alice.reconnect_now();
        scrape_until(metrics, "alice connected again", |m| {
            value(m, "chat_connections_opened_total") > opened
                && value(m, "chat_connections_active") == 2.0
        })
        .await;
        assert!(alice.wait_connected(WAIT).await);
        alice.friends().await.expect("requests answered");
        match alice_events.next().await {
            Some(Event::Message(m)) => assert_eq!(m.seq, sent.seq),
            other => panic!("the message first, not {other:?}"),
        }
        // And messages still arrive on the new connection.
        let later = bob.send_text(conversation, "later").await.unwrap();
        let m = messages(&mut alice_events, 1).await;
        assert_eq!(m[0].seq, later.seq);
    }

    /// Alice sends five; Bob's app takes the first `took` and keeps the
    /// rest queued (the ack of his reply comes behind them on his messages
    /// stream, so they are all in his client). Returns the conversation,
    /// the five seqs, Bob's token, and Bob (still running) with his events.
    async fn five_for_bob_who_takes(
        server: &TestServer,
        bob_config: chat_client::ClientConfig,
        took: usize,
    ) -> (u64, Vec<u64>, String, Client, Events, Client) {
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(bob_config, &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let sent = send_texts(&alice, conversation, 5).await;
        let taken = messages(&mut bob_events, took).await;
        assert_eq!(
            taken.iter().map(|m| m.seq).collect::<Vec<_>>(),
            sent[..took]
        );
        bob.send_text(conversation, "reply").await.unwrap();
        let token = bob.identity().token;
        (conversation, sent, token, bob, bob_events, alice)
    }

    #[tokio::test]
    async fn messages_the_app_never_took_are_delivered_again() {
        // Deliveries used to be acked as soon as they were queued for the
        // app, so an app killed while draining lost the rest of its queue
        // (up to event_capacity): the server had them as delivered. Now
        // taking a message from Events acks it.
        let server = TestServer::start().await;
        let (conversation, sent, token, bob, bob_events, alice) =
            five_for_bob_who_takes(&server, server.client_config(), 2).await;
        let bob_id = bob.identity().user_id;
        wait_delivered(&alice, conversation, bob_id, sent[1]).await;
        // The app dies with three messages in its queue.
        drop((bob, bob_events));

        let (_bob, mut bob_events) = Client::resume(server.client_config(), &token)
            .await
            .unwrap();
        let again = messages(&mut bob_events, 3).await;
        assert_eq!(again.iter().map(|m| m.seq).collect::<Vec<_>>(), sent[2..]);
        // Taking them acks them.
        wait_delivered(&alice, conversation, bob_id, sent[4]).await;
    }

    #[tokio::test]
    async fn with_manual_acks_only_what_the_app_acked_is_delivered() {
        let server = TestServer::start().await;
        let mut config = server.client_config();
        config.delivery_acks = DeliveryAcks::Manual;
        // The app takes all five but acks (stores) only the first three.
        let (conversation, sent, token, bob, bob_events, alice) =
            five_for_bob_who_takes(&server, config.clone(), 5).await;
        let bob_id = bob.identity().user_id;
        bob.ack_delivery(conversation, sent[2]);
        wait_delivered(&alice, conversation, bob_id, sent[2]).await;
        drop((bob, bob_events));

        let (bob, mut bob_events) = Client::resume(config, &token).await.unwrap();
        let again = messages(&mut bob_events, 2).await;
        assert_eq!(again.iter().map(|m| m.seq).collect::<Vec<_>>(), sent[3..]);
        // Taken, not yet acked: still the app's to ack. A reply would carry
        // an ack, and a seen mark is committed behind it.
        bob.send_text(conversation, "carrier").await.unwrap();
        bob.mark_seen(conversation, sent[0]).await.unwrap();
        let view = alice.conversation(conversation).await.unwrap();
        let bob_delivered = view.members.iter().find(|m| m.user_id == bob_id).unwrap();
        assert_eq!(bob_delivered.delivered_seq, sent[2]);
        bob.ack_delivery(conversation, sent[4]);
        wait_delivered(&alice, conversation, bob_id, sent[4]).await;
    }

    #[tokio::test]
    async fn messages_taken_after_their_connection_is_gone_are_acked_once_shown() {
        // Acks belong to the client, not to the connection that brought
        // the message: Bob's app takes his queue only once a new
        // connection has replaced that one, which redelivers the five
        // (not acked yet) behind the queued copies.
        let server = TestServer::start().await;
        let metrics = server.server.as_ref().unwrap().metrics_addr();
        let (conversation, sent, _token, bob, mut bob_events, alice) =
            five_for_bob_who_takes(&server, server.client_config(), 0).await;
        let bob_id = bob.identity().user_id;
        let opened = value(&scrape(metrics).await, "chat_connections_opened_total");
        bob.reconnect_now();
        scrape_until(metrics, "bob connected again", |m| {
            value(m, "chat_connections_opened_total") > opened
                && value(m, "chat_connections_active") == 2.0
        })
        .await;
        let taken = messages(&mut bob_events, 5).await;
        assert_eq!(taken.iter().map(|m| m.seq).collect::<Vec<_>>(), sent);
        wait_delivered(&alice, conversation, bob_id, sent[4]).await;
        assert_no_message(&mut bob_events, Duration::from_millis(300)).await;
    }

    /// Bob's delivered watermark as Alice's view of the conversation
    /// has it.
    async fn delivered_to(alice: &Client, conversation: u64, bob: u64) -> u64 {
        let view = alice.conversation(conversation).await.unwrap();
        view.members
            .iter()
            .find(|m| m.user_id == bob)
            .expect("bob is a member")
            .delivered_seq
    }

    #[tokio::test]
    async fn messages_nobody_reads_are_not_acked_and_come_to_the_next_client() {
        // Bob's app dropped its Events but kept the client. Every message
        // that came after was acked as though the app had it: the
        // delivered watermark (the user's, not the device's) moved past
        // it, so Bob's next client never got it, and Alice was told
        // "delivered". Now nothing the app did not take is acked.
        let server = TestServer::start().await;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let bob_id = bob.identity().user_id;
        drop(bob_events);
        let unread = alice
            .send_text(conversation, "nobody reads this")
            .await
            .unwrap();
        // Bob's client has read the message once his reply's SendAck (which
        // comes behind it) answers; an ack it queued then is in the node's
        // watermark committer once two more sends are answered (the second
        // is written after it), and Alice's mark is committed behind it.
        let mut last = 0;
        for text in ["reply", "carrier", "behind the carrier's acks"] {
            last = bob.send_text(conversation, text).await.unwrap().seq;
        }
        alice.mark_seen(conversation, last).await.unwrap();
        assert_eq!(
            delivered_to(&alice, conversation, bob_id).await,
            0,
            "acked though the app never took it"
        );
        let token = bob.identity().token;
        bob.close();

        let (_bob, mut bob_events) = Client::resume(server.client_config(), &token)
            .await
            .unwrap();
        let again = messages(&mut bob_events, 1).await;
        assert_eq!(
            (again[0].seq, again[0].text.as_str()),
            (unread.seq, "nobody reads this")
        );
    }

    #[tokio::test]
    async fn a_shutdown_acks_what_the_app_took_and_nothing_else() {
        // Bob's acks would linger for an hour: only the shutdown writes
        // them. close() leaves them unsent, and the next client gets again
        // messages its app already showed.
        let server = TestServer::start().await;
        let mut config = server.client_config();
        config.delivery_ack_linger = Duration::from_secs(3600);
        let (conversation, sent, token, bob, mut bob_events, alice) =
            five_for_bob_who_takes(&server, config.clone(), 0).await;
        let bob_id = bob.identity().user_id;
        let taken = messages(&mut bob_events, 3).await;
        assert_eq!(taken.iter().map(|m| m.seq).collect::<Vec<_>>(), sent[..3]);
        assert!(delivered_to(&alice, conversation, bob_id).await < sent[0]);

        // A shutdown that had to wait out its own deadline would fail here:
        // the server's AcksStored is what ends it.
        tokio::time::timeout(WAIT, bob.shutdown(Duration::from_secs(3600)))
            .await
            .expect("the server confirms the last acks");
        // Confirmed stored: no waiting.
        assert_eq!(delivered_to(&alice, conversation, bob_id).await, sent[2]);
        assert!(
            bob_events.next().await.is_none(),
            "the two still queued are not given to the app"
        );
        assert!(matches!(
            bob.send_text(conversation, "too late").await,
            Err(chat_client::ClientError::Closed)
        ));

        let (_bob, mut bob_events) = Client::resume(config, &token).await.unwrap();
        let again = messages(&mut bob_events, 2).await;
        assert_eq!(again.iter().map(|m| m.seq).collect::<Vec<_>>(), sent[3..]);
        assert_no_message(&mut bob_events, Duration::from_millis(300)).await;
    }

    #[tokio::test]
    async fn a_shutdown_waits_for_the_answers_to_sends_already_made() {
        let server = TestServer::start().await;
        let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, _bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        // Queued by the call, before the shutdown starts.
        let send = bob.send_text(conversation, "last words");
        assert_eq!(bob.outbox_len(), 1);
        let (ack, ()) = tokio::join!(send, async {
            // Ended by the server's AcksStored, not by its deadline.
            tokio::time::timeout(WAIT, bob.shutdown(Duration::from_secs(3600)))
                .await
                .expect("shutdown ends");
        });
        let ack = ack.expect("acked, not failed as Closed");
        let m = messages(&mut alice_events, 1).await;
        assert_eq!((m[0].seq, m[0].text.as_str()), (ack.seq, "last words"));
    }

    #[tokio::test]
    async fn a_shutdown_during_a_reconnect_backoff_connects_at_once() {
        // Bob's client waits a minute between reconnects (reconnect_min):
        // a shutdown made while it waits must not leave its last send to
        // that minute (beyond the app's deadline here, 30 s) but connect,
        // get the send answered, and leave.
        let server = TestServer::start().await;
        let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
        let mut config = server.client_config();
        config.reconnect_min = Duration::from_secs(60);
        config.reconnect_max = Duration::from_secs(120);
        let (bob, _bob_events) = register(config, &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        bob.reconnect_now();
        let deadline = tokio::time::Instant::now() + WAIT;
        while bob.is_connected() {
            assert!(tokio::time::Instant::now() < deadline, "never disconnected");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let send = bob.send_text(conversation, "last words");
        let (ack, ()) = tokio::join!(send, bob.shutdown(WAIT));
        let ack = ack.expect("acked before the deadline, not failed as Closed");
        let m = messages(&mut alice_events, 1).await;
        assert_eq!((m[0].seq, m[0].text.as_str()), (ack.seq, "last words"));
    }

    #[tokio::test]
    async fn a_shutdown_is_not_held_up_by_a_full_event_queue() {
        // Bob's queue holds two; the third of Alice's five holds his
        // messages reader, and the SendAck of his reply waits behind it.
        // The app takes nothing more once it is leaving, so the reader
        // must stop waiting for room: else the reply is never answered
        // and the server's AcksStored never read.
        let server = TestServer::start().await;
        let mut config = server.client_config();
        config.event_capacity = 2;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, bob_events) = register(config.clone(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        let sent = send_texts(&alice, conversation, 5).await;
        let reply = bob.send_text(conversation, "reply");
        tokio::time::timeout(WAIT, bob.shutdown(Duration::from_secs(3600)))
            .await
            .expect("the reader stops waiting for room");
        reply.await.expect("the reply is answered");
        drop(bob_events);

        // Bob's app took none of the five: all come again.
        let (_bob, mut bob_events) = Client::resume(config, &bob.identity().token).await.unwrap();
        let again = messages(&mut bob_events, 5).await;
        assert_eq!(again.iter().map(|m| m.seq).collect::<Vec<_>>(), sent);
    }

    /// Polls `future` once: whether it is still pending.
    async fn pending_after_one_poll<F: Future>(future: std::pin::Pin<&mut F>) -> bool {
        let mut future = future;
        std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx).is_pending()))
            .await
    }

    #[tokio::test]
    async fn a_shutdown_ends_the_events_at_once_and_close_ends_the_shutdown() {
        let mut server = TestServer::start().await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let conversation = befriend(&alice, &bob).await;
        // With the node gone, Bob's send cannot be answered, and no event
        // comes after the disconnection.
        assert!(server.server.take().unwrap().shutdown().await);
        wait_for(&mut bob_events, "bob disconnected", |e| {
            matches!(e, Event::Disconnected { .. }).then_some(())
        })
        .await;
        let _unanswered = bob.send_text(conversation, "into the void");
        // The app waits for its next event.
        let mut next = std::pin::pin!(bob_events.next());
        assert!(pending_after_one_poll(next.as_mut()).await);
        let mut shutdown = std::pin::pin!(bob.shutdown(Duration::from_secs(3600)));
        assert!(
            pending_after_one_poll(shutdown.as_mut()).await,
            "the shutdown waits for the send's answer"
        );
        let event = tokio::time::timeout(WAIT, next)
            .await
            .expect("a waiting next() ends when a shutdown begins");
        assert_eq!(event, None);
        bob.close();
        tokio::time::timeout(WAIT, shutdown)
            .await
            .expect("close ends the shutdown, whatever its timeout");
    }

    /// Reads the queued events until the stream ends, failing after
    /// [`WAIT`].
    async fn assert_events_end(events: &mut Events) {
        tokio::time::timeout(WAIT, async { while events.next().await.is_some() {} })
            .await
            .expect("the event stream ends");
    }
}

#[tokio::test]
async fn a_device_on_control_alone_is_not_closed_for_the_messages_it_has_not_opened() {
    // A device may talk on control alone for a while (an app asking for
    // its friend list before it opens anything else). Deliveries for it
    // used to be queued for a messages writer that did not exist yet, up
    // to 4 MiB, until the 1,025th closed the connection with
    // SLOW_CONSUMER. Now a queue whose stream is not open lets go of what
    // it kept at its bounds instead, the device stays connected, and
    // catch-up brings every message when it opens the stream.
    use chat_protocol::Body;
    const N: usize = chat_server::hub::QUEUE_CAPACITY + 76;
    let server = TestServer::start_with(unlimited_sends).await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, _eb) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let token = bob.identity().token;
    bob.close();
    let mut device = RawControl::resume(&server, &token).await;

    let seqs = send_texts(&alice, conversation, N).await;
    assert_eq!(seqs, (1..=N as u64).collect::<Vec<_>>());
    device.assert_served().await;

    let (_send, mut recv) = device.open_messages(false).await;
    let mut buf = bytes::BytesMut::new();
    let mut delivered = Vec::with_capacity(N);
    while delivered.len() < N {
        let frame = next_frame(&mut recv, &mut buf).await;
        match frame.body {
            Some(Body::Deliver(d)) => {
                let message = d.message.expect("a message");
                assert_eq!(message.conversation_id, conversation);
                delivered.push(message.seq);
            }
            other => panic!("only Deliver frames, got {other:?}"),
        }
    }
    assert_eq!(delivered, seqs, "each message once, in order");
    assert!(device.conn().close_reason().is_none());
}

#[tokio::test]
async fn a_device_gets_its_users_sends_from_before_it_opened_its_messages_stream() {
    // A device is pushed messages from the moment it authenticates, a
    // round trip before client-lib has its messages stream open. What it
    // is pushed in between must wait for the stream: not all of it comes
    // with catch-up, which leaves out the user's own sends (made here on
    // the user's other device).
    use chat_protocol::Body;
    let server = TestServer::start().await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, _eb) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let device = RawControl::resume(&server, &alice.identity().token).await;
    let own = alice
        .send_text(conversation, "from the laptop")
        .await
        .unwrap();

    let (_send, mut recv) = device.open_messages(false).await;
    let frame = next_frame(&mut recv, &mut bytes::BytesMut::new()).await;
    match frame.body {
        Some(Body::Deliver(d)) => {
            let message = d.message.expect("a message");
            assert_eq!(
                (message.conversation_id, message.seq),
                (conversation, own.seq)
            );
            assert_eq!(message.text, "from the laptop");
        }
        other => panic!("the laptop's message, got {other:?}"),
    }
}

/// The next typing event `events` has (others skipped).
async fn next_typing(events: &mut Events) -> proto::TypingUpdate {
    wait_for(events, "a typing event", |e| match e {
        Event::Typing(update) => Some(update),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn typing_reaches_the_other_members_once_per_repeat_and_stops() {
    let server = TestServer::start().await;
    let mut members = circle(&server, 3).await;
    let all: Vec<u64> = members.iter().map(|(c, _)| c.identity().user_id).collect();
    let g = members[0]
        .0
        .create_group("typing", &all[1..])
        .await
        .unwrap()
        .conversation_id;
    let typist = &members[1].0;
    typist.typing(g, true);
    // Within the repeat time, the client holds the second one back: the
    // others' next typing event is the stop, not a repeat.
    typist.typing(g, true);
    typist.typing(g, false);
    // A stop with nothing started sends nothing either.
    typist.typing(g, false);
    for i in [0, 2] {
        let events = &mut members[i].1;
        let start = next_typing(events).await;
        assert_eq!(
            (start.conversation_id, start.user_id, start.typing),
            (g, all[1], true)
        );
        let stop = next_typing(events).await;
        assert_eq!(
            (stop.conversation_id, stop.user_id, stop.typing),
            (g, all[1], false)
        );
    }
    // A message ends it, with a stop behind the start (the message, on
    // another stream, may come before the start), and the next keystroke
    // says so again at once.
    let typist = &members[1].0;
    typist.typing(g, true);
    typist.send_text(g, "done").await.unwrap();
    typist.typing(g, true);
    typist.typing(g, false);
    let events = &mut members[0].1;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(next_typing(events).await.typing);
    }
    assert_eq!(seen, [true, false, true, false]);
}

#[tokio::test]
async fn a_deleted_chat_is_gone_for_one_until_a_new_message_and_kept_by_the_other() {
    let server = TestServer::start().await;
    let (alice, alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, _bob_events) = register(server.client_config(), &name("bob")).await;
    let direct = befriend(&alice, &bob).await;
    let username = alice.identity().username;
    drop(alice_events);
    alice.close();
    // Her phone acknowledges nothing here: whatever it shows stays owed to
    // her other devices.
    let mut manual = server.client_config();
    manual.delivery_acks = chat_client::DeliveryAcks::Manual;
    let (phone, mut phone_events) = Client::login(manual, &username, PASSWORD).await.unwrap();
    let sent = send_texts(&bob, direct, 3).await;
    let last = sent.iter().copied().max().unwrap();
    // The phone shows all three and deletes up to the second; the third,
    // say, had not reached its screen.
    messages(&mut phone_events, 3).await;
    phone.delete_conversation(direct, last - 1).await.unwrap();
    let listed = |list: Vec<proto::ConversationInfo>| {
        list.iter().map(|c| c.conversation_id).collect::<Vec<_>>()
    };
    assert_eq!(
        listed(phone.conversations(10, None).await.unwrap()),
        [direct],
        "the third is left"
    );
    phone.delete_conversation(direct, last).await.unwrap();
    assert!(listed(phone.conversations(10, None).await.unwrap()).is_empty());
    // Deleting is neither receiving nor reading: his ticks stay (the phone
    // acknowledged nothing).
    let bob_id = bob.identity().user_id;
    let view = bob.conversation(direct).await.unwrap();
    let hers = view.members.iter().find(|m| m.user_id != bob_id).unwrap();
    assert_eq!((hers.delivered_seq, hers.seen_seq), (0, 0), "{view:?}");
    assert_eq!(listed(bob.conversations(10, None).await.unwrap()), [direct]);
    let page = phone
        .history(direct, HistoryDirection::Backward, 0, 50)
        .await
        .unwrap();
    assert!(page.messages.is_empty() && !page.has_more, "{page:?}");
    let page = bob
        .history(direct, HistoryDirection::Backward, 0, 50)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), 3, "his stay");
    assert_eq!(
        code(phone.message_receipts(direct, last).await),
        ErrorCode::NotFound
    );
    // Her other device comes back: catch-up brings nothing of it (nothing
    // was acknowledged, so without the clear it would bring all three).
    let (laptop, mut laptop_events) = Client::login(server.client_config(), &username, PASSWORD)
        .await
        .unwrap();
    bob.send_text(direct, "still there?").await.unwrap();
    let got = messages(&mut laptop_events, 1).await;
    assert_eq!(
        got[0].text, "still there?",
        "the first it gets is the new one"
    );
    // The new message brings it back, with only itself.
    assert_eq!(
        listed(laptop.conversations(10, None).await.unwrap()),
        [direct]
    );
    let page = laptop
        .history(direct, HistoryDirection::Backward, 0, 50)
        .await
        .unwrap();
    let texts: Vec<&str> = page.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["still there?"]);
    // A group one is in is left first.
    let g = laptop
        .create_group("g", &[bob_id])
        .await
        .unwrap()
        .conversation_id;
    assert_eq!(
        code(bob.delete_conversation(g, 1).await),
        ErrorCode::InvalidArgument
    );
    bob.leave_group(g).await.unwrap();
    bob.delete_conversation(g, 0).await.unwrap();
    let theirs = listed(bob.conversations(10, None).await.unwrap());
    assert_eq!(theirs, [direct], "the group left and deleted");
    assert_eq!(
        code(bob.delete_conversation(g, 0).await),
        ErrorCode::NotAMember
    );
}

/// The next conversation change `events` has (others skipped).
async fn next_change(events: &mut Events) -> proto::ConversationChanged {
    wait_for(events, "a conversation change", |e| match e {
        Event::ConversationChanged(change) => Some(change),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn a_mute_or_a_delete_on_one_device_reaches_the_others() {
    let server = TestServer::start().await;
    let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, _bob_events) = register(server.client_config(), &name("bob")).await;
    let direct = befriend(&alice, &bob).await;
    let (_laptop, mut laptop_events) =
        Client::login(server.client_config(), &alice.identity().username, PASSWORD)
            .await
            .unwrap();
    alice.mute(direct, i64::MAX).await.unwrap();
    let change = next_change(&mut laptop_events).await;
    assert_eq!(
        (change.conversation_id, change.kind(), change.muted_until_ms),
        (direct, proto::conversation_changed::Kind::Muted, i64::MAX)
    );
    let seq = bob.send_text(direct, "hi").await.unwrap().seq;
    // Asked past the newest message: what was cleared, no more, so the
    // laptop keeps what comes later.
    alice.delete_conversation(direct, u64::MAX).await.unwrap();
    let change = next_change(&mut laptop_events).await;
    assert_eq!(
        (change.conversation_id, change.kind(), change.up_to_seq),
        (direct, proto::conversation_changed::Kind::Deleted, seq)
    );
}

#[tokio::test]
async fn edits_and_unsends_past_their_window_or_with_none_are_refused() {
    for unsend in [false, true] {
        let what = if unsend { "unsends" } else { "edits" };
        for (window, wait, why) in [
            (
                Duration::from_millis(1),
                Duration::from_millis(20),
                "too late".to_string(),
            ),
            (Duration::ZERO, Duration::ZERO, format!("takes no {what}")),
        ] {
            let server = TestServer::start_with(|c| match unsend {
                true => c.limits.unsend_window = window,
                false => c.limits.edit_window = window,
            })
            .await;
            let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
            let (bob, _bob_events) = register(server.client_config(), &name("bob")).await;
            let direct = befriend(&alice, &bob).await;
            let announced = match unsend {
                true => alice.unsend_window(),
                false => alice.edit_window(),
            };
            assert_eq!(announced, window, "{what}");
            let seq = alice.send_text(direct, "helo").await.unwrap().seq;
            // Time passes whatever the machine's load: the window is over.
            tokio::time::sleep(wait).await;
            let refused = match unsend {
                true => alice.unsend(direct, seq).await,
                false => alice.edit(direct, seq, "hello").await,
            }
            .unwrap_err();
            assert_eq!(
                refused.code(),
                Some(ErrorCode::InvalidArgument),
                "{what} {window:?}"
            );
            assert!(
                refused.to_string().contains(&why),
                "{what} {window:?}: {refused}"
            );
            let page = bob
                .history(direct, HistoryDirection::Backward, 0, 10)
                .await
                .unwrap();
            assert_eq!(
                page.messages.last().unwrap().text,
                "helo",
                "{what} {window:?}"
            );
        }
    }
}
