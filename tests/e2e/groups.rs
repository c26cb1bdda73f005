//! Groups end to end: fan-out, per-member receipts, membership changes in
//! seq order, removal, limits.

use std::collections::HashSet;
use std::time::Duration;

use chat_client::{Client, ErrorCode, Event, Events, HistoryDirection, proto};
use chat_protocol::Body;

use crate::harness::*;

fn ids(members: &[Member]) -> Vec<u64> {
    members.iter().map(|(c, _)| c.identity().user_id).collect()
}

/// Receipt events for `conversation` from anyone, until none arrive for
/// `quiet`.
async fn receipts_until_quiet(
    events: &mut Events,
    conversation: u64,
    quiet: Duration,
) -> Vec<proto::Receipt> {
    let mut out = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(quiet, events.next()).await {
        if let Event::Receipt(r) = event
            && r.conversation_id == conversation
        {
            out.push(r);
        }
    }
    out
}

each_backend! {
    async fn a_repeated_creation_key_makes_one_group(backend: Backend) {
        // A CreateGroup whose answer was lost is asked again with the same
        // key. Without keys, every retry made another group.
        let server = TestServer::start_on(backend.clone()).await;
        let mut members = circle(&server, 3).await;
        let all = ids(&members);
        let owner = &members[0].0;
        let first = owner
            .create_group_with_key("trip", &all[1..], "key-1")
            .await
            .unwrap();
        let again = owner
            .create_group_with_key("trip", &all[1..], "key-1")
            .await
            .unwrap();
        assert_eq!(again.conversation_id, first.conversation_id);
        assert_eq!(again.last_seq, 1, "the repeat stored no message");
        let other = owner
            .create_group_with_key("trip", &all[1..], "key-2")
            .await
            .unwrap();
        assert_ne!(other.conversation_id, first.conversation_id);
        let got = messages(&mut members[1].1, 2).await;
        let from: HashSet<u64> = got.iter().map(|m| m.conversation_id).collect();
        assert_eq!(
            from,
            HashSet::from([first.conversation_id, other.conversation_id])
        );
        let groups: Vec<u64> = members[1]
            .0
            .conversations(50, None)
            .await
            .unwrap()
            .iter()
            .filter(|c| c.kind == proto::ConversationKind::Group as i32)
            .map(|c| c.conversation_id)
            .collect();
        assert_eq!(groups.len(), 2, "{groups:?}");

        let owner = &members[0].0;
        for bad in ["k".repeat(65), "nul\0key".to_string()] {
            assert_eq!(
                code(owner.create_group_with_key("x", &all[1..], &bad).await),
                ErrorCode::InvalidArgument
            );
        }
    }

    async fn a_repeated_change_key_changes_once(backend: Backend) {
        // A group change whose answer was lost is asked again with the same
        // key (client-lib does so by itself). The repeat must be answered
        // Ok and change nothing, even though by then the change could not
        // be made again (bob is gone): without the key it is NOT_FOUND.
        // Likewise an add repeated after the friendship ended.
        let server = TestServer::start_on(backend.clone()).await;
        let mut members = circle(&server, 4).await;
        let all = ids(&members);
        let g = members[0]
            .0
            .create_group("trip", &all[1..3])
            .await
            .unwrap()
            .conversation_id;
        let mut device = RawControl::resume(&server, &members[0].0.identity().token).await;
        let remove = |key: &str| {
            Body::RemoveMember(proto::RemoveMember {
                conversation_id: g,
                user_id: all[1],
                client_key: key.into(),
            })
        };
        for attempt in 0..2 {
            let answer = device.request(remove("remove-bob")).await;
            assert!(matches!(answer, Body::Ok(_)), "attempt {attempt}: {answer:?}");
        }
        match device.request(remove("")).await {
            Body::Error(e) => assert_eq!(ErrorCode::from_wire(e.code), ErrorCode::NotFound),
            other => panic!("a new removal of a non-member is NOT_FOUND: {other:?}"),
        }
        let rename = |name: &str| {
            Body::RenameGroup(proto::RenameGroup {
                conversation_id: g,
                name: name.into(),
                client_key: "rename-1".into(),
            })
        };
        for name in ["trip 2", "trip 3"] {
            let answer = device.request(rename(name)).await;
            assert!(matches!(answer, Body::Ok(_)), "{answer:?}");
        }
        let add = Body::AddMembers(proto::AddMembers {
            conversation_id: g,
            user_ids: vec![all[3]],
            client_key: "add-dave".into(),
        });
        let answer = device.request(add.clone()).await;
        assert!(matches!(answer, Body::Ok(_)), "{answer:?}");
        members[0].0.remove_friend(all[3]).await.unwrap();
        let answer = device.request(add).await;
        assert!(matches!(answer, Body::Ok(_)), "the repeat of an add: {answer:?}");
        // The creation, one removal, one rename, one add, then carol's own
        // send: nothing else was stored or delivered in between.
        members[2].0.send_text(g, "still here").await.unwrap();
        let info = members[0].0.conversation(g).await.unwrap();
        assert_eq!((info.name.as_str(), info.last_seq), ("trip 2", 5));
        let got = messages(&mut members[2].1, 4).await;
        let keys: Vec<&str> = got.iter().map(|m| m.client_msg_id.as_str()).collect();
        assert_eq!(keys[1..], ["remove-bob", "rename-1", "add-dave"], "{got:?}");
        assert_eq!(got[0].seq, 1);
        let history = members[0]
            .0
            .history(g, HistoryDirection::Backward, 0, 10)
            .await
            .unwrap();
        assert_eq!(history.messages.len(), 5, "{:?}", history.messages);
    }

    async fn a_group_send_reaches_everyone_once_with_aggregated_receipts(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let mut members = circle(&server, 5).await;
        let all = ids(&members);
        let (owner, owner_events) = members.remove(0);
        let mut owner_events = owner_events;
        let group = owner.create_group("five", &all[1..]).await.unwrap();
        assert_eq!(group.members.len(), 5);
        let g = group.conversation_id;
        // Everyone gets the creation message first.
        for (_, events) in members.iter_mut() {
            let got = messages(events, 1).await;
            assert_eq!(got[0].r#type, proto::MessageType::System as i32);
        }

        let ack = owner.send_text(g, "hello group").await.unwrap();
        for (_, events) in members.iter_mut() {
            let got = messages(events, 1).await;
            assert_eq!((got[0].seq, got[0].text.as_str()), (ack.seq, "hello group"));
            assert_no_message(events, Duration::from_millis(200)).await;
        }
        // Delivered to 4 of 4, from the receipts the sender received.
        wait_for(&mut owner_events, "delivered 4/4", |e| match e {
            Event::Receipt(_) => {
                let status = owner.receipt_status(g, ack.seq).unwrap();
                (status.delivered == 4).then_some(())
            }
            _ => None,
        })
        .await;
        assert_eq!(owner.receipt_status(g, ack.seq).unwrap().members, 4);
        assert_eq!(owner.receipt_status(g, ack.seq).unwrap().seen, 0);

        // Seen counts grow as members read.
        for (i, (member, _)) in members.iter().enumerate() {
            member.mark_seen(g, ack.seq).await.unwrap();
            wait_for(&mut owner_events, "seen count", |e| match e {
                Event::Receipt(_) => {
                    let status = owner.receipt_status(g, ack.seq).unwrap();
                    (status.seen == i + 1).then_some(())
                }
                _ => None,
            })
            .await;
            let detail = owner.message_receipts(g, ack.seq).await.unwrap();
            assert_eq!((detail.delivered_count, detail.seen_count), (4, i as u32 + 1));
        }
        let detail = owner.message_receipts(g, ack.seq).await.unwrap();
        assert!(detail.members.iter().all(|m| m.delivered && m.seen));
        assert!(!detail.members.iter().any(|m| m.user_id == owner.identity().user_id));
    }

    async fn a_removed_member_gets_nothing_more_and_reads_only_up_to_the_removal(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let mut members = circle(&server, 3).await;
        let all = ids(&members);
        let g = members[0].0.create_group("three", &all[1..]).await.unwrap().conversation_id;
        for (_, events) in members.iter_mut().skip(1) {
            messages(events, 1).await;
        }
        members[0].0.send_text(g, "before").await.unwrap();
        members[0].0.remove_member(g, all[2]).await.unwrap();
        // The removed member hears of the removal, then nothing.
        let (_, carol_events) = &mut members[2];
        let got = messages(carol_events, 2).await;
        assert_eq!(got[0].text, "before");
        assert_eq!(got[1].r#type, proto::MessageType::System as i32);
        assert!(got[1].text.contains("removed"), "{}", got[1].text);
        members[0].0.send_text(g, "after").await.unwrap();
        let (_, bob_events) = &mut members[1];
        let got = messages(bob_events, 3).await;
        assert_eq!(got[2].text, "after");
        let (carol, carol_events) = &mut members[2];
        assert_no_message(carol_events, Duration::from_millis(500)).await;
        // History: what she was sent, up to her removal, and not after.
        let page = carol.history(g, HistoryDirection::Backward, 0, 50).await.unwrap();
        let seen: Vec<(u64, &str)> = page.messages.iter().map(|m| (m.seq, m.text.as_str())).collect();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[1], (2, "before"));
        assert!(seen[2].1.contains("removed"), "{seen:?}");
        assert!(!page.has_more);
        let forward = carol.history(g, HistoryDirection::Forward, 0, 2).await.unwrap();
        let seqs: Vec<u64> = forward.messages.iter().map(|m| m.seq).collect();
        assert_eq!((seqs, forward.has_more), (vec![1, 2], true));
        let forward = carol.history(g, HistoryDirection::Forward, 2, 2).await.unwrap();
        let seqs: Vec<u64> = forward.messages.iter().map(|m| m.seq).collect();
        assert_eq!((seqs, forward.has_more), (vec![3], false), "her stay ends at 3");
        let forward = carol.history(g, HistoryDirection::Forward, 3, 50).await.unwrap();
        assert!(forward.messages.is_empty() && !forward.has_more, "{forward:?}");
        assert_eq!(code(carol.send_text(g, "let me back").await), ErrorCode::NotAMember);
        assert_eq!(code(carol.conversation(g).await), ErrorCode::NotAMember);
        assert_eq!(code(carol.message_receipts(g, 1).await), ErrorCode::NotAMember);
        // Her conversation list keeps the group as it was when she was
        // removed: its name then, the removal as its last message, nobody
        // listed, nothing unread.
        members[0].0.rename_group(g, "two").await.unwrap();
        let (carol, _) = &members[2];
        let list = carol.conversations(10, None).await.unwrap();
        let entry = list.iter().find(|c| c.conversation_id == g).expect("still listed");
        assert!(entry.former_member, "{entry:?}");
        assert_eq!((entry.name.as_str(), entry.last_seq, entry.unread_count), ("three", 3, 0));
        assert!(entry.members.is_empty(), "{entry:?}");
        let last = entry.last_message.as_ref().expect("the removal");
        assert!(last.text.contains("removed"), "{last:?}");
        let (bob, _) = &members[1];
        let theirs = bob.conversations(10, None).await.unwrap();
        let entry = theirs.iter().find(|c| c.conversation_id == g).unwrap();
        assert!(!entry.former_member && entry.name == "two", "{entry:?}");
        // Only admins remove; non-members cannot change anything.
        let (bob, _) = &members[1];
        assert_eq!(code(bob.remove_member(g, all[0]).await), ErrorCode::NotAdmin);
        assert_eq!(code(members[2].0.leave_group(g).await), ErrorCode::NotAMember);
    }

    async fn a_member_removed_while_offline_is_told_on_return(backend: Backend) {
        // Bob is offline while he is removed. His members row is gone, and
        // catch-up, which read only memberships, sent him nothing: his app
        // went on showing the group. Now he gets what he missed up to and
        // including his removal, and nothing after it.
        let server = TestServer::start_on(backend.clone()).await;
        let mut members = circle(&server, 3).await;
        let all = ids(&members);
        let owner = members[0].0.clone();
        let g = owner.create_group("trip", &all[1..]).await.unwrap().conversation_id;
        let direct = owner.open_direct(all[1]).await.unwrap().conversation_id;
        // Bob's app takes the creation message, which acks it.
        messages(&mut members[1].1, 1).await;
        wait_delivered(&owner, g, all[1], 1).await;
        let (bob, _) = members.remove(1);
        let bob_token = bob.identity().token;
        bob.close();

        owner.send_text(g, "while you were out").await.unwrap();
        owner.remove_member(g, all[1]).await.unwrap();
        owner.send_text(g, "after").await.unwrap();

        let (_bob, mut bob_events) = Client::resume(server.client_config(), &bob_token).await.unwrap();
        let got = messages(&mut bob_events, 2).await;
        let seqs: Vec<(u64, u64)> = got.iter().map(|m| (m.conversation_id, m.seq)).collect();
        assert_eq!(seqs, [(g, 2), (g, 3)], "{got:?}");
        assert_eq!(got[0].text, "while you were out");
        assert_eq!(got[1].r#type, proto::MessageType::System as i32);
        assert!(got[1].text.contains("removed"), "{}", got[1].text);
        // Catch-up came first; the next message is live, and not "after".
        owner.send_text(direct, "are you there?").await.unwrap();
        let next = messages(&mut bob_events, 1).await;
        assert_eq!((next[0].conversation_id, next[0].text.as_str()), (direct, "are you there?"));
    }

    async fn an_offline_member_catches_up_in_order_across_a_membership_change(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let mut members = circle(&server, 4).await;
        let all = ids(&members);
        let owner = members[0].0.clone();
        let g = owner.create_group("four", &all[1..3]).await.unwrap().conversation_id;
        let (dave, _) = members.remove(2);
        let dave_token = dave.identity().token;
        dave.close();

        for i in 0..25 {
            owner.send_text(g, &format!("m{i}")).await.unwrap();
        }
        owner.add_members(g, &[all[3]]).await.unwrap();
        for i in 25..50 {
            owner.send_text(g, &format!("m{i}")).await.unwrap();
        }

        let (_dave, mut dave_events) = Client::resume(server.client_config(), &dave_token).await.unwrap();
        let got = messages(&mut dave_events, 52).await;
        let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=52).collect::<Vec<_>>(), "every message once, in seq order");
        let texts: Vec<&str> = got.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts[1], "m0");
        assert!(texts[26].contains("added"), "the change sits between m24 and m25: {:?}", &texts[25..28]);
        assert_eq!((texts[25], texts[27]), ("m24", "m25"));
        assert_no_message(&mut dave_events, Duration::from_millis(300)).await;

        // The member added meanwhile reads from their join on.
        let (erin, _) = &members[2];
        let page = erin.history(g, HistoryDirection::Backward, 0, 200).await.unwrap();
        assert_eq!(page.messages.first().map(|m| m.seq), Some(27));
        assert_eq!(page.messages.len(), 26);
        assert!(!page.has_more);
        let forward = erin.history(g, HistoryDirection::Forward, 0, 5).await.unwrap();
        assert_eq!(forward.messages.first().map(|m| m.seq), Some(27));
        // Nor do receipts tell her of what came before: not even that it
        // exists, nor who has seen it.
        assert_eq!(code(erin.message_receipts(g, 26).await), ErrorCode::NotFound);
        assert_eq!(code(erin.message_receipts(g, 2).await), ErrorCode::NotFound);
        let from_her_join = erin.message_receipts(g, 27).await.unwrap();
        assert_eq!(from_her_join.seq, 27);
    }

    async fn receipts_to_the_sender_are_per_member_not_per_message(backend: Backend) {
        let server = TestServer::start_on(backend.clone()).await;
        let mut members = circle(&server, 5).await;
        let all = ids(&members);
        let (owner, mut owner_events) = members.remove(0);
        let g = owner.create_group("burst", &all[1..]).await.unwrap().conversation_id;
        const BURST: u64 = 100;
        // A burst: all sent at once, so each member's deliveries arrive
        // together (sent one ack at a time, each delivery could arrive
        // alone and be acked alone, and the count below would measure the
        // machine's speed).
        let sends: Vec<_> = (0..BURST)
            .map(|i| {
                let owner = owner.clone();
                tokio::spawn(async move { owner.send_text(g, &format!("b{i}")).await })
            })
            .collect();
        let mut last = 0;
        for send in sends {
            last = last.max(send.await.unwrap().unwrap().seq);
        }
        assert_eq!(last, BURST + 1, "after the group's first message");
        // Each member receives the burst and reads it, as a person does:
        // one mark for everything on screen.
        for (member, events) in members.iter_mut() {
            messages(events, BURST as usize + 1).await;
            member.mark_seen(g, last).await.unwrap();
        }
        let receipts = receipts_until_quiet(&mut owner_events, g, Duration::from_secs(2)).await;
        // Per member, every receipt moves something (no repeats), and the
        // seen watermark jumps once, straight to the end of the burst.
        for &member in &all[1..] {
            let mine: Vec<_> = receipts.iter().filter(|r| r.user_id == member).collect();
            let seen: Vec<_> = mine.iter().filter(|r| r.seen_seq > 0).collect();
            assert_eq!(seen.len(), 1, "one seen event per member: {mine:?}");
            assert_eq!(seen[0].seen_seq, last);
            for pair in mine.windows(2) {
                assert!(
                    pair[1].delivered_seq > pair[0].delivered_seq || pair[1].seen_seq > pair[0].seen_seq,
                    "a receipt that moves nothing: {pair:?}"
                );
            }
        }
        // 4 members x 101 messages would be 404 per-message events.
        assert!(receipts.len() < 4 * BURST as usize, "{} receipt events", receipts.len());
        assert_eq!(owner.receipt_status(g, last).unwrap().seen, 4);
    }
}

#[tokio::test]
async fn group_size_and_friendship_rules() {
    let server = TestServer::start_with(|c| c.limits.max_group_size = 4).await;
    let members = circle(&server, 5).await;
    let all = ids(&members);
    let owner = &members[0].0;
    let err = owner.create_group("too big", &all[1..]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LimitReached));
    assert!(err.to_string().contains("at most 4"), "{err}");
    let g = owner
        .create_group("just right", &all[1..4])
        .await
        .unwrap()
        .conversation_id;
    assert_eq!(
        code(owner.add_members(g, &[all[4]]).await),
        ErrorCode::LimitReached
    );
    // Only friends of the one adding.
    let (stranger, _) = register(server.client_config(), &name("stranger")).await;
    let small = owner
        .create_group("small", &all[1..2])
        .await
        .unwrap()
        .conversation_id;
    assert_eq!(
        code(
            owner
                .add_members(small, &[stranger.identity().user_id])
                .await
        ),
        ErrorCode::NotFriends
    );
    assert_eq!(
        code(
            owner
                .create_group("x", &[stranger.identity().user_id])
                .await
        ),
        ErrorCode::NotFriends
    );
    assert_eq!(
        code(owner.create_group("   ", &all[1..2]).await),
        ErrorCode::InvalidArgument
    );
    // Renames by members, admin changes by admins.
    let member = &members[1].0;
    member.rename_group(small, "renamed").await.unwrap();
    assert_eq!(member.conversation(small).await.unwrap().name, "renamed");
    assert_eq!(
        code(member.set_admin(small, all[1], true).await),
        ErrorCode::NotAdmin
    );
    owner.set_admin(small, all[1], true).await.unwrap();
    let info = owner.conversation(small).await.unwrap();
    assert!(info.members.iter().all(|m| m.admin));
    // The direct conversation has no members to change.
    let direct = owner.open_direct(all[1]).await.unwrap().conversation_id;
    assert_eq!(
        code(owner.rename_group(direct, "nope").await),
        ErrorCode::InvalidArgument
    );
}

#[tokio::test]
async fn large_groups_send_receipts_only_to_the_senders_they_concern() {
    // Above the broadcast size (3 here, 32 by default) a member's receipts
    // reach the senders of the messages they cover, not the whole group.
    let server = TestServer::start_with(|c| c.limits.receipt_broadcast_max_members = 3).await;
    let mut members = circle(&server, 4).await;
    let all = ids(&members);
    let g = members[0]
        .0
        .create_group("four", &all[1..])
        .await
        .unwrap()
        .conversation_id;
    for (_, events) in members.iter_mut().skip(1) {
        messages(events, 1).await;
    }

    // Alice sends: every other member's delivered receipt reaches her
    // (their apps take the message, which acks it).
    let first = members[0].0.send_text(g, "from alice").await.unwrap().seq;
    for (_, events) in members.iter_mut().skip(1) {
        messages(events, 1).await;
    }
    let mut heard = HashSet::new();
    wait_for(
        &mut members[0].1,
        "3 receipts for alice's message",
        |e| match e {
            Event::Receipt(r) if r.conversation_id == g && r.delivered_seq >= first => {
                heard.insert(r.user_id);
                (heard.len() == 3).then_some(())
            }
            _ => None,
        },
    )
    .await;

    // Carol sends next. Broadcasting would have queued Bob's and Dave's
    // receipts for Alice's message on Carol's stream before any for hers;
    // she must hear only of her own.
    let second = members[2].0.send_text(g, "from carol").await.unwrap().seq;
    for i in [0, 1, 3] {
        messages(&mut members[i].1, 1).await;
    }
    let (mut heard, mut earlier) = (HashSet::new(), Vec::new());
    wait_for(
        &mut members[2].1,
        "3 receipts for carol's message",
        |e| match e {
            Event::Receipt(r) if r.conversation_id == g => {
                if r.delivered_seq >= second {
                    heard.insert(r.user_id);
                } else {
                    earlier.push(r);
                }
                (heard.len() == 3).then_some(())
            }
            _ => None,
        },
    )
    .await;
    assert!(
        earlier.is_empty(),
        "carol heard receipts that cover only alice's message: {earlier:?}"
    );
    // A member who sent nothing still gets the whole picture on request.
    let detail = members[3].0.message_receipts(g, first).await.unwrap();
    assert_eq!(detail.delivered_count, 3, "{detail:?}");
}

#[tokio::test]
async fn a_burst_of_receipts_for_one_sender_does_not_close_it() {
    // Bob reads 1,100 conversations with Sam at once. The receipts writers
    // linger a minute here, so Sam's receipts (and Bob's MarkSeen answers)
    // all wait in their queues until something else is written on the
    // connection: more than the 1,024 frames a control or messages stream
    // may queue. Both read fine, so neither may be closed as too slow.
    const GROUPS: usize = 1_100;
    let server = TestServer::start_with(|c| {
        unlimited_sends(c);
        unlimited_marks(c);
        c.transport.receipt_linger = Duration::from_secs(60);
    })
    .await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let (sam, mut sam_events) = register(server.client_config(), &name("sam")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    befriend(&sam, &bob).await;
    let bob_id = bob.identity().user_id;

    // In rounds below the client's outbox limit.
    let mut groups = Vec::new();
    for round in (0..GROUPS).collect::<Vec<_>>().chunks(250) {
        let mut tasks = Vec::new();
        for &i in round {
            let sam = sam.clone();
            tasks.push(tokio::spawn(async move {
                let g = sam
                    .create_group(&format!("g{i}"), &[bob_id])
                    .await
                    .unwrap()
                    .conversation_id;
                sam.send_text(g, "news").await.unwrap();
                g
            }));
        }
        for task in tasks {
            groups.push(task.await.unwrap());
        }
    }
    // Each group holds its creation and the text.
    assert_eq!(
        messages(&mut bob_events, 2 * GROUPS).await.len(),
        2 * GROUPS
    );

    // One mark first: its receipt (and its answer) start each writer's
    // linger; then all the others at once, and every seen receipt is
    // pushed before anything else is written to either connection. (Marks
    // all at once could find a writer idle with a full batch queued, which
    // it writes without lingering.)
    // Bob's delivery acks go out a moment after the messages, and their
    // receipts count too: start from a count that has stopped moving.
    let mut before = value(&scrape(metrics).await, "chat_receipts_total");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "receipts never settled"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = value(&scrape(metrics).await, "chat_receipts_total");
        if now == before {
            break;
        }
        before = now;
    }
    let mark = |g: u64| {
        let bob = bob.clone();
        tokio::spawn(async move { bob.mark_seen(g, 2).await })
    };
    let mut marks = vec![mark(groups[0])];
    scrape_until(metrics, "the first seen receipt pushed", |m| {
        value(m, "chat_receipts_total") > before
    })
    .await;
    marks.extend(groups[1..].iter().map(|&g| mark(g)));
    scrape_until(metrics, "a seen receipt for every group pushed", |m| {
        value(m, "chat_receipts_total") >= before + GROUPS as f64
    })
    .await;
    // A write on another stream of a connection ends its linger (for one
    // batch: the writer lingers again on a partial one), so both write a
    // message every 300 ms from now on.
    let nudges = tokio::spawn({
        let (sam, bob, g) = (sam.clone(), bob.clone(), groups[0]);
        async move {
            loop {
                let _ = bob.send_text(g, "nudge").await;
                let _ = sam.send_text(g, "nudge").await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    for mark in marks {
        mark.await.unwrap().unwrap();
    }
    let seen = receipts_from(&mut sam_events, bob_id, true, GROUPS).await;
    assert_eq!(seen, groups.iter().copied().collect::<HashSet<_>>());
    let m = scrape(metrics).await;
    assert_eq!(value(&m, "chat_errors_total{code=\"SLOW_CONSUMER\"}"), 0.0);
    nudges.abort();
}

/// Waits for `user`'s delivered (or seen) receipts covering seq 2 in `n`
/// conversations; their ids. Fails if the connection drops meanwhile.
async fn receipts_from(events: &mut Events, user: u64, seen: bool, n: usize) -> HashSet<u64> {
    let mut covered = HashSet::new();
    let what = format!(
        "{} receipts in {n} conversations",
        if seen { "seen" } else { "delivered" }
    );
    wait_for(events, &what, |e| {
        match e {
            Event::Receipt(r)
                if r.user_id == user && (if seen { r.seen_seq } else { r.delivered_seq }) >= 2 =>
            {
                covered.insert(r.conversation_id);
            }
            Event::Disconnected { code } => panic!("disconnected: {code:?}"),
            _ => {}
        }
        (covered.len() == n).then_some(())
    })
    .await;
    covered
}

#[tokio::test]
async fn the_senders_status_counts_who_could_read_the_message() {
    // "Seen by N of M" on the sender's device counts the members who could
    // read the message, as the server's answer does. A member added after
    // it used to count, as having seen it too (a new member's watermarks
    // start just below the message that added them, and their first
    // receipt added them to the client's list), and a member removed since
    // counted until the app asked for the group again. The client now
    // fetches the list again after its own changes and on each SYSTEM
    // message of the group (a change's message goes to everyone but the
    // device that made it). (The
    // waits poll the server's answer: no request limit.)
    let server = TestServer::start_with(unlimited_sends_and_requests).await;
    let mut members = circle(&server, 4).await;
    let all = ids(&members);
    let (owner, mut owner_events) = members.remove(0);
    let g = owner
        .create_group("team", &all[1..3])
        .await
        .unwrap()
        .conversation_id;
    let sent = owner.send_text(g, "before dave").await.unwrap();
    owner.add_members(g, &[all[3]]).await.unwrap();
    // The apps take what they are delivered (client-lib acks on take):
    // bob and carol the creation, the text and dave's addition; dave his
    // addition, whose receipt reaches the owner (a small group's receipts
    // go to every member).
    for (i, n) in [(0, 3), (1, 3), (2, 1)] {
        messages(&mut members[i].1, n).await;
    }
    let dave = all[3];
    wait_for(&mut owner_events, "dave's first receipt", |e| match e {
        Event::Receipt(r) if r.conversation_id == g && r.user_id == dave => Some(()),
        _ => None,
    })
    .await;
    // Bob and carol received it and nobody read it; dave does not count.
    wait_until("bob and carol of 2, nobody seen", || {
        agrees(&owner, g, sent.seq, (2, 2, 0))
    })
    .await;

    owner.remove_member(g, all[2]).await.unwrap();
    wait_until("bob alone counts", || {
        agrees(&owner, g, sent.seq, (1, 1, 0))
    })
    .await;

    // A change someone else makes reaches a device only as its SYSTEM
    // message: bob's status of his own message follows dave's removal.
    let bob = members[0].0.clone();
    bob.conversation(g).await.unwrap();
    let from_bob = bob.send_text(g, "from bob").await.unwrap();
    // The owner takes it; dave carol's removal, then it.
    messages(&mut owner_events, 1).await;
    messages(&mut members[2].1, 2).await;
    wait_until("the owner and dave of 2", || {
        agrees(&bob, g, from_bob.seq, (2, 2, 0))
    })
    .await;
    owner.remove_member(g, dave).await.unwrap();
    wait_until("the owner alone counts", || {
        agrees(&bob, g, from_bob.seq, (1, 1, 0))
    })
    .await;
}

/// Whether `client`'s status of message `seq` and the server's answer
/// both read (members, delivered, seen) = `expected`.
async fn agrees(client: &Client, g: u64, seq: u64, expected: (usize, usize, usize)) -> bool {
    let server = client.message_receipts(g, seq).await.unwrap();
    let from_server = (
        server.members.len(),
        server.delivered_count as usize,
        server.seen_count as usize,
    );
    let status = client.receipt_status(g, seq).unwrap();
    from_server == expected && (status.members, status.delivered, status.seen) == expected
}

/// A page of the conversation list is read from the store a chunk at a
/// time until the reply is full: paging through more conversations than a
/// chunk (30) and than a frame holds gives each one once, newest first.
#[tokio::test]
async fn the_conversation_list_pages_through_every_conversation_once() {
    const GROUPS: usize = 70;
    let server = TestServer::start_with(|c| {
        unlimited_sends_and_requests(c);
        c.limits.max_frame_len = 8 * 1024;
        c.limits.max_text_len = 1024;
    })
    .await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, _eb) = register(server.client_config(), &name("bob")).await;
    befriend(&alice, &bob).await;
    let bob_id = bob.identity().user_id;
    for i in 0..GROUPS {
        alice
            .create_group(&format!("group {i}"), &[bob_id])
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut last: Option<proto::ConversationInfo> = None;
    loop {
        let page = alice.conversations(200, last.as_ref()).await.unwrap();
        let Some(end) = page.last().cloned() else {
            break;
        };
        pages += 1;
        assert!(pages <= GROUPS, "paging never ends");
        seen.extend(page.iter().map(|c| (c.last_activity_ms, c.conversation_id)));
        last = Some(end);
    }
    assert_eq!(
        seen.len(),
        GROUPS + 1,
        "the groups and the direct conversation"
    );
    let unique: HashSet<_> = seen.iter().map(|s| s.1).collect();
    assert_eq!(unique.len(), seen.len(), "each once");
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seen:?}"
    );
    // 50 and 21 here: the first page spans two chunks and ends at the
    // frame.
    assert!(pages >= 2, "a page is cut at the frame: {pages} pages");
}
