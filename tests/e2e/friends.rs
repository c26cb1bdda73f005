//! Friend requests and the "only friends chat" rule.

use chat_client::{ErrorCode, Event, proto};

use crate::harness::*;

fn kind(e: &proto::FriendEvent) -> proto::friend_event::Kind {
    proto::friend_event::Kind::try_from(e.kind).unwrap()
}

#[tokio::test]
async fn request_accept_and_both_see_each_other() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    let (a, b) = (alice.identity(), bob.identity());

    alice.send_friend_request(&b.username).await.unwrap();
    let event = wait_for(&mut bob_events, "friend request", |e| match e {
        Event::Friend(f) => Some(f),
        _ => None,
    })
    .await;
    assert_eq!(kind(&event), proto::friend_event::Kind::RequestReceived);
    assert_eq!(event.user.as_ref().unwrap().user_id, a.user_id);
    let pending = bob.friends().await.unwrap();
    assert_eq!(
        pending
            .incoming
            .iter()
            .map(|u| u.user_id)
            .collect::<Vec<_>>(),
        vec![a.user_id]
    );
    assert_eq!(
        alice
            .friends()
            .await
            .unwrap()
            .outgoing
            .iter()
            .map(|u| u.user_id)
            .collect::<Vec<_>>(),
        vec![b.user_id]
    );

    bob.accept_friend(a.user_id).await.unwrap();
    let event = wait_for(&mut alice_events, "acceptance", |e| match e {
        Event::Friend(f) => Some(f),
        _ => None,
    })
    .await;
    assert_eq!(kind(&event), proto::friend_event::Kind::Accepted);

    let alice_list = alice.friends().await.unwrap();
    let bob_list = bob.friends().await.unwrap();
    assert_eq!(
        alice_list.friends,
        vec![proto::UserRef {
            user_id: b.user_id,
            username: b.username.clone()
        }]
    );
    assert_eq!(
        bob_list.friends,
        vec![proto::UserRef {
            user_id: a.user_id,
            username: a.username.clone()
        }]
    );
    assert!(alice_list.outgoing.is_empty() && bob_list.incoming.is_empty());
    assert_eq!(
        code(alice.send_friend_request(&b.username).await),
        ErrorCode::AlreadyFriends
    );
}

#[tokio::test]
async fn decline_remove_and_unknown_users() {
    let server = TestServer::start().await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, _eb) = register(server.client_config(), &name("bob")).await;
    let (a, b) = (alice.identity(), bob.identity());

    assert_eq!(
        code(alice.send_friend_request(&name("ghost")).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(alice.send_friend_request(&a.username).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(bob.accept_friend(a.user_id).await),
        ErrorCode::NotFound,
        "no request yet"
    );

    alice.send_friend_request(&b.username).await.unwrap();
    bob.decline_friend(a.user_id).await.unwrap();
    assert!(bob.friends().await.unwrap().incoming.is_empty());
    assert_eq!(
        code(bob.decline_friend(a.user_id).await),
        ErrorCode::NotFound
    );

    // Mutual requests become a friendship.
    alice.send_friend_request(&b.username).await.unwrap();
    bob.send_friend_request(&a.username).await.unwrap();
    assert_eq!(alice.friends().await.unwrap().friends.len(), 1);

    alice.remove_friend(b.user_id).await.unwrap();
    assert!(bob.friends().await.unwrap().friends.is_empty());
    assert_eq!(
        code(alice.open_direct(b.user_id).await),
        ErrorCode::NotFriends
    );
}

#[tokio::test]
async fn only_friends_can_open_a_conversation() {
    let server = TestServer::start().await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, _eb) = register(server.client_config(), &name("bob")).await;
    let (eve, _ee) = register(server.client_config(), &name("eve")).await;
    assert_eq!(
        code(eve.open_direct(alice.identity().user_id).await),
        ErrorCode::NotFriends
    );
    assert_eq!(
        code(alice.open_direct(alice.identity().user_id).await),
        ErrorCode::InvalidArgument
    );
    let conversation = befriend(&alice, &bob).await;
    let info = bob.open_direct(alice.identity().user_id).await.unwrap();
    assert_eq!(
        info.conversation_id, conversation,
        "one conversation per pair"
    );
    assert_eq!(info.members.len(), 2);
    assert_eq!(
        code(eve.open_direct(bob.identity().user_id).await),
        ErrorCode::NotFriends
    );
}

#[tokio::test]
async fn friends_and_waiting_requests_are_bounded() {
    // max-friends 2: what a user sent counts with their friends, and what
    // waits for a user's answer is bounded apart, so no account can grow
    // another's friend list reply by asking from many accounts.
    let server = TestServer::start_with(|c| c.limits.max_friends = 2).await;
    let mut users = Vec::new();
    for who in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        users.push(register(server.client_config(), &name(who)).await);
    }
    let [alice, bob, carol, dave, erin, frank] = [0, 1, 2, 3, 4, 5].map(|i| &users[i].0);
    let username = |c: &chat_client::Client| c.identity().username;

    // Alice: one friend and one request waiting make two.
    befriend(alice, bob).await;
    alice.send_friend_request(&username(carol)).await.unwrap();
    assert_eq!(
        code(alice.send_friend_request(&username(dave)).await),
        ErrorCode::LimitReached
    );
    // Nor can she accept one more.
    dave.send_friend_request(&username(alice)).await.unwrap();
    assert_eq!(
        code(alice.accept_friend(dave.identity().user_id).await),
        ErrorCode::LimitReached
    );
    // Requests waiting for her answer: dave's and erin's, then no more.
    erin.send_friend_request(&username(alice)).await.unwrap();
    let refused = frank.send_friend_request(&username(alice)).await;
    assert_eq!(code(refused), ErrorCode::LimitReached);
    let lists = alice.friends().await.unwrap();
    assert_eq!(
        (
            lists.friends.len(),
            lists.outgoing.len(),
            lists.incoming.len()
        ),
        (1, 1, 2)
    );

    // Room comes back when an answer or a removal takes an entry away.
    alice.decline_friend(erin.identity().user_id).await.unwrap();
    frank.send_friend_request(&username(alice)).await.unwrap();
    alice.remove_friend(carol.identity().user_id).await.unwrap();
    alice.accept_friend(dave.identity().user_id).await.unwrap();
    let lists = alice.friends().await.unwrap();
    let ids = |refs: &[proto::UserRef]| refs.iter().map(|u| u.user_id).collect::<Vec<_>>();
    assert_eq!(lists.outgoing.len(), 0);
    assert_eq!(ids(&lists.incoming), vec![frank.identity().user_id]);
    assert_eq!(lists.friends.len(), 2);
}

/// Ending a friendship closes the pair's conversation to new messages, both
/// ways (NOT_FRIENDS), while what was said stays readable; a refused send
/// holds up nothing behind it, and friends again, the same conversation
/// takes messages again.
#[tokio::test]
async fn an_ended_friendship_takes_no_more_messages() {
    let server = TestServer::start().await;
    let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    let (carol, mut carol_events) = register(server.client_config(), &name("carol")).await;
    let (a, b) = (alice.identity(), bob.identity());
    let conversation = befriend(&alice, &bob).await;
    let with_carol = befriend(&alice, &carol).await;
    alice.send_text(conversation, "hi bob").await.unwrap();
    let got = wait_for(&mut bob_events, "alice's first message", |e| match e {
        Event::Message(m) => Some(m.text),
        _ => None,
    })
    .await;
    assert_eq!(got, "hi bob");

    bob.remove_friend(a.user_id).await.unwrap();
    let late = alice.send_text(conversation, "still there?");
    let other = alice.send_text(with_carol, "hi carol");
    assert_eq!(code(late.await), ErrorCode::NotFriends);
    assert_eq!(other.await.unwrap().seq, 1, "the send behind goes through");
    assert_eq!(
        code(bob.send_text(conversation, "bye").await),
        ErrorCode::NotFriends
    );
    let got = wait_for(&mut carol_events, "alice's message to carol", |e| match e {
        Event::Message(m) => Some(m.text),
        _ => None,
    })
    .await;
    assert_eq!(got, "hi carol");
    let page = alice
        .history(conversation, chat_client::HistoryDirection::Backward, 0, 10)
        .await
        .unwrap();
    let texts: Vec<_> = page.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        ["hi bob"],
        "history stays; nothing refused was stored"
    );

    alice.send_friend_request(&b.username).await.unwrap();
    bob.accept_friend(a.user_id).await.unwrap();
    let ack = alice
        .send_text(conversation, "friends again")
        .await
        .unwrap();
    assert_eq!(ack.seq, 2);
    let got = wait_for(
        &mut bob_events,
        "alice's message after the new friendship",
        |e| match e {
            Event::Message(m) => Some(m.text),
            _ => None,
        },
    )
    .await;
    assert_eq!(got, "friends again");
}

/// A block ends the friendship (the other hears a removal, as for
/// FriendRemove); the blocked user's friend requests then fail exactly as
/// for a name with no account, the blocker's with INVALID_ARGUMENT, and
/// neither can message the other. It is listed; unblocking lets a new
/// request through, not the old friendship.
#[tokio::test]
async fn after_a_block_the_blocked_is_told_nothing_of_what_the_blocker_reads() {
    // Bob blocks Alice: she is told nothing more of what he reads in their
    // direct conversation, no live receipt, and its views and message
    // receipts show none of his watermarks. A group they share is not
    // affected, and Bob's own view keeps his.
    let server = TestServer::start().await;
    let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    let bob_id = bob.identity().user_id;
    let direct = befriend(&alice, &bob).await;
    let group = alice
        .create_group("both", &[bob_id])
        .await
        .unwrap()
        .conversation_id;
    let d1 = alice.send_text(direct, "before").await.unwrap().seq;
    let d2 = alice.send_text(direct, "after").await.unwrap().seq;
    let g1 = alice.send_text(group, "to both").await.unwrap().seq;
    for (conversation, seq) in [(direct, d1), (direct, d2), (group, g1)] {
        wait_for(&mut bob_events, "alice's messages", |e| match e {
            Event::Message(m) if (m.conversation_id, m.seq) == (conversation, seq) => Some(()),
            _ => None,
        })
        .await;
    }
    bob.mark_seen(direct, d1).await.unwrap();
    wait_for(&mut alice_events, "bob read the first", |e| match e {
        Event::Receipt(r) if r.conversation_id == direct && r.seen_seq >= d1 => Some(()),
        _ => None,
    })
    .await;

    bob.block(alice.identity().user_id).await.unwrap();
    // Answered once its receipts were queued: one of the direct
    // conversation would reach Alice before the group's.
    bob.mark_seen(direct, d2).await.unwrap();
    bob.mark_seen(group, g1).await.unwrap();
    wait_for(&mut alice_events, "bob read the group", |e| match e {
        Event::Receipt(r) if r.conversation_id == direct && r.seen_seq >= d2 => {
            panic!("told of a read after the block: {r:?}")
        }
        Event::Receipt(r) if r.conversation_id == group && r.seen_seq >= g1 => Some(()),
        _ => None,
    })
    .await;

    let bobs = |info: &proto::ConversationInfo| {
        let m = info.members.iter().find(|m| m.user_id == bob_id).unwrap();
        (m.delivered_seq, m.seen_seq)
    };
    assert_eq!(bobs(&alice.conversation(direct).await.unwrap()), (0, 0));
    let listed = alice.conversations(10, None).await.unwrap();
    let listed = |id| listed.iter().find(|c| c.conversation_id == id).unwrap();
    assert_eq!(bobs(listed(direct)), (0, 0), "as listed");
    assert_eq!(bobs(listed(group)), (g1, g1), "the group still shows it");
    let receipts = alice.message_receipts(direct, d1).await.unwrap();
    assert_eq!((receipts.delivered_count, receipts.seen_count), (0, 0));
    assert!(receipts.members.iter().all(|m| !m.delivered && !m.seen));
    assert_eq!(
        bobs(&bob.conversation(direct).await.unwrap()),
        (d2, d2),
        "bob's own view keeps his"
    );
}

#[tokio::test]
async fn a_block_ends_the_friendship_and_keeps_requests_out() {
    let server = TestServer::start().await;
    let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    let (a, b) = (alice.identity(), bob.identity());
    let conversation = befriend(&alice, &bob).await;

    alice.block(b.user_id).await.unwrap();
    let event = wait_for(&mut bob_events, "the friendship's end", |e| match e {
        Event::Friend(f) if kind(&f) == proto::friend_event::Kind::Removed => Some(f),
        _ => None,
    })
    .await;
    assert_eq!(event.user.unwrap().user_id, a.user_id);
    assert!(bob.friends().await.unwrap().friends.is_empty());
    assert_eq!(
        code(bob.send_text(conversation, "hello?").await),
        ErrorCode::NotFriends
    );
    assert_eq!(
        code(alice.send_text(conversation, "bye").await),
        ErrorCode::NotFriends
    );
    let blocked = bob.send_friend_request(&a.username).await.unwrap_err();
    let unknown = bob.send_friend_request(&name("nobody")).await.unwrap_err();
    assert_eq!(blocked.code(), Some(ErrorCode::NotFound));
    assert_eq!(
        blocked.to_string(),
        unknown.to_string(),
        "a block reads as no account"
    );
    assert_eq!(
        code(alice.send_friend_request(&b.username).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(alice.block(a.user_id).await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(code(alice.block(u64::MAX).await), ErrorCode::NotFound);
    alice
        .block(b.user_id)
        .await
        .expect("blocking again is fine");
    let lists = alice.friends().await.unwrap();
    let blocked: Vec<_> = lists.blocked.iter().map(|u| u.user_id).collect();
    assert_eq!(blocked, [b.user_id]);
    assert!(bob.friends().await.unwrap().blocked.is_empty());

    alice.unblock(b.user_id).await.unwrap();
    assert_eq!(code(alice.unblock(b.user_id).await), ErrorCode::NotFound);
    assert!(
        alice.friends().await.unwrap().friends.is_empty(),
        "unblocking restores no friendship"
    );
    bob.send_friend_request(&a.username).await.unwrap();
    alice.accept_friend(b.user_id).await.unwrap();
    let ack = bob.send_text(conversation, "hello again").await.unwrap();
    assert_eq!(ack.seq, 1);
}

/// Waits for a friend event of `want` naming `who`; its name for them.
async fn hears(
    events: &mut chat_client::Events,
    want: proto::friend_event::Kind,
    who: u64,
) -> String {
    wait_for(
        events,
        &format!("{want:?} about {who}"),
        |event| match event {
            Event::Friend(f)
                if kind(&f) == want && f.user.as_ref().is_some_and(|u| u.user_id == who) =>
            {
                f.user.map(|u| u.username)
            }
            _ => None,
        },
    )
    .await
}

#[tokio::test]
async fn what_one_device_changes_in_the_friend_list_reaches_the_users_others() {
    // Alice's phone makes every kind of change; her laptop hears each,
    // naming the other user. Before, only the other user heard, and the
    // laptop kept Bob as a friend (watching his presence) until it
    // reconnected. The phone itself hears only its replies.
    let server = TestServer::start().await;
    let alice_name = name("alice");
    let (phone, mut phone_events) = register(server.client_config(), &alice_name).await;
    let (laptop, mut laptop_events) =
        chat_client::Client::login(server.client_config(), &alice_name, PASSWORD)
            .await
            .unwrap();
    let (bob, _bob_events) = register(server.client_config(), &name("bob")).await;
    let (carol, mut carol_events) = register(server.client_config(), &name("carol")).await;
    let (dave, _dave_events) = register(server.client_config(), &name("dave")).await;
    let (erin, _erin_events) = register(server.client_config(), &name("erin")).await;
    let (b, c, d, e) = (
        bob.identity(),
        carol.identity(),
        dave.identity(),
        erin.identity(),
    );
    befriend(&phone, &bob).await;
    laptop.subscribe_presence(&[b.user_id]).await.unwrap();
    use proto::friend_event::Kind;

    phone.remove_friend(b.user_id).await.unwrap();
    let username = hears(&mut laptop_events, Kind::YouRemoved, b.user_id).await;
    assert_eq!(username, b.username, "named");
    assert_eq!(
        laptop.presence(b.user_id),
        None,
        "the laptop no longer watches Bob"
    );

    phone.send_friend_request(&c.username).await.unwrap();
    hears(&mut laptop_events, Kind::RequestSent, c.user_id).await;
    wait_for(&mut carol_events, "alice's request", |event| match event {
        Event::Friend(f) if kind(&f) == Kind::RequestReceived => Some(()),
        _ => None,
    })
    .await;
    carol.accept_friend(phone.identity().user_id).await.unwrap();
    // Carol's acceptance reaches both of Alice's devices, as before.
    hears(&mut laptop_events, Kind::Accepted, c.user_id).await;

    dave.send_friend_request(&alice_name).await.unwrap();
    hears(&mut laptop_events, Kind::RequestReceived, d.user_id).await;
    phone.decline_friend(d.user_id).await.unwrap();
    hears(&mut laptop_events, Kind::YouDeclined, d.user_id).await;

    erin.send_friend_request(&alice_name).await.unwrap();
    hears(&mut laptop_events, Kind::RequestReceived, e.user_id).await;
    phone.accept_friend(e.user_id).await.unwrap();
    hears(&mut laptop_events, Kind::YouAccepted, e.user_id).await;

    phone.block(d.user_id).await.unwrap();
    hears(&mut laptop_events, Kind::Blocked, d.user_id).await;
    phone.unblock(d.user_id).await.unwrap();
    hears(&mut laptop_events, Kind::Unblocked, d.user_id).await;

    // The phone heard none of its own changes.
    while let Some(event) = phone_events.try_next() {
        if let Event::Friend(f) = event {
            assert!(
                !matches!(
                    kind(&f),
                    Kind::RequestSent
                        | Kind::Blocked
                        | Kind::Unblocked
                        | Kind::YouAccepted
                        | Kind::YouDeclined
                        | Kind::YouRemoved
                ),
                "the phone was told of its own change: {f:?}"
            );
        }
    }
}
