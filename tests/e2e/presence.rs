//! Presence: online / offline / last active, for friends who subscribe.

use std::time::Duration;

use chat_client::{Client, ErrorCode, Event, Events, proto};

use crate::harness::*;

/// The shortest heartbeats a server may ask for (clients send them at most
/// once a second), so the silent-connection path runs in a few seconds:
/// online window = 1 s x 3, two heartbeats of slack for a busy machine.
const HEARTBEAT: Duration = chat_protocol::limits::MIN_HEARTBEAT_INTERVAL;
const MULTIPLE: u32 = 3;

async fn server(backend: Backend) -> TestServer {
    server_with_window(backend, MULTIPLE).await
}

/// A presence window of `multiple` heartbeats: tests that assert a user
/// stays online use a longer one than [`MULTIPLE`], so a process stalled
/// for a couple of seconds on a busy machine does not time them out.
async fn server_with_window(backend: Backend, multiple: u32) -> TestServer {
    TestServer::start_on_with(backend, |c| {
        c.limits.heartbeat_interval = HEARTBEAT;
        c.limits.presence_ttl_multiple = multiple;
    })
    .await
}

/// The window of tests that assert a user stays online.
const STAYS_ONLINE: u32 = 6;

/// Waits (polling with a fresh subscription) until `watcher` sees `user`
/// offline; the subscription stays in place.
async fn until_offline(watcher: &Client, user: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while watcher.subscribe_presence(&[user]).await.unwrap()[0].online {
        assert!(
            tokio::time::Instant::now() < deadline,
            "user {user} never went offline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts presence events for `user` arriving within `quiet`.
async fn count_presence(
    events: &mut Events,
    user: u64,
    quiet: Duration,
) -> Vec<proto::PresenceState> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + quiet;
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.next()).await {
        if let Event::Presence(p) = event
            && p.user_id == user
        {
            seen.push(p);
        }
    }
    seen
}

each_backend! {
    async fn online_then_offline_on_a_clean_disconnect(backend: Backend) {
        let server = server(backend.clone()).await;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        befriend(&alice, &bob).await;
        let a = alice.identity();
        alice.close();
        // Wait until the server has her offline, then watch her.
        until_offline(&bob, a.user_id).await;

        let (alice, _ea) = Client::resume(server.client_config(), &a.token)
            .await
            .unwrap();
        let online = presence_of(&mut bob_events, a.user_id, true, "alice online").await;
        assert!(online.online);
        assert!(bob.presence(a.user_id).unwrap().online, "the client caches the state");

        let closed_at = now_ms();
        alice.close();
        let offline = presence_of(&mut bob_events, a.user_id, false, "alice offline").await;
        let seen_at = now_ms();
        assert!(!offline.online);
        // The close, as the server saw it: after she closed (or, had the
        // close been lost, her last heartbeat, within an interval before)
        // and before Bob heard of it, however slow the machine.
        let heartbeat = HEARTBEAT.as_millis() as i64;
        assert!(
            (closed_at - heartbeat..=seen_at).contains(&offline.last_active_ms),
            "last active {} should be the disconnect at {closed_at} (heard at {seen_at})",
            offline.last_active_ms
        );
    }

    async fn a_silent_connection_goes_offline_after_the_window_not_before(backend: Backend) {
        let server = server(backend.clone()).await;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        befriend(&alice, &bob).await;
        let a = alice.identity().user_id;
        let snapshot = bob.subscribe_presence(&[a]).await.unwrap();
        assert!(snapshot[0].online);

        // The connection stays open (QUIC keep-alives continue) but the app
        // stops heartbeating.
        let silent_since = tokio::time::Instant::now();
        let silent_at_ms = now_ms();
        alice.set_heartbeats(false);
        let offline = presence_of(&mut bob_events, a, false, "alice timed out").await;
        let waited = silent_since.elapsed();
        assert!(!offline.online);
        // Her last heartbeat was at most one interval before she went silent,
        // so the window cannot have run out sooner than this.
        let earliest = HEARTBEAT * MULTIPLE - HEARTBEAT;
        assert!(
            waited >= earliest,
            "offline after {waited:?}, before the window ({earliest:?})"
        );
        // A heartbeat already on its way when she went silent may be read
        // a little later (a busy machine); the timeout itself comes a
        // window later still.
        assert!(
            offline.last_active_ms <= silent_at_ms + HEARTBEAT.as_millis() as i64,
            "last active is the last heartbeat"
        );
        assert!(alice.is_connected(), "the connection itself is still open");

        // Heartbeats again: back online.
        alice.set_heartbeats(true);
        assert!(
            presence_of(&mut bob_events, a, true, "alice back")
                .await
                .online
        );
    }

    async fn a_device_in_the_background_does_not_show_its_user_online(backend: Backend) {
        let server = server(backend.clone()).await;
        let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let direct = befriend(&alice, &bob).await;
        let a = alice.identity();
        assert!(bob.subscribe_presence(&[a.user_id]).await.unwrap()[0].online);

        // The app goes to the background: offline once the window passes.
        alice.set_heartbeats(false);
        presence_of(&mut bob_events, a.user_id, false, "alice in the background").await;
        // What her devices do meanwhile is no activity: the phone takes a
        // message (and acks it) and watches presence, and her tablet,
        // woken by a push, connects in the background and syncs.
        let sent = bob.send_text(direct, "ping").await.unwrap();
        assert_eq!(messages(&mut alice_events, 1).await[0].seq, sent.seq);
        wait_delivered(&bob, direct, a.user_id, sent.seq).await;
        alice
            .subscribe_presence(&[bob.identity().user_id])
            .await
            .unwrap();
        let mut background = server.client_config();
        background.start_in_background = true;
        let (_tablet, _tablet_events) = Client::resume(background, &a.token).await.unwrap();
        // For a whole window after all that (the sweep, twice a heartbeat
        // interval, would have found it activity), she stays offline.
        let until = tokio::time::Instant::now() + HEARTBEAT * MULTIPLE;
        while tokio::time::Instant::now() < until {
            let state = bob.subscribe_presence(&[a.user_id]).await.unwrap();
            assert!(!state[0].online, "shown online by a device in the background");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Back in the foreground: online again.
        alice.set_heartbeats(true);
        assert!(
            presence_of(&mut bob_events, a.user_id, true, "alice back")
                .await
                .online
        );
    }

    async fn two_devices_stay_online_until_both_are_gone(backend: Backend) {
        let server = server_with_window(backend.clone(), STAYS_ONLINE).await;
        let (phone, _ep) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        befriend(&phone, &bob).await;
        let a = phone.identity();
        let (laptop, _el) = Client::resume(server.client_config(), &a.token)
            .await
            .unwrap();
        assert!(bob.subscribe_presence(&[a.user_id]).await.unwrap()[0].online);

        phone.close();
        // Several coalescing windows and presence windows pass: still online.
        let changes =
            count_presence(&mut bob_events, a.user_id, HEARTBEAT * STAYS_ONLINE * 2).await;
        assert!(
            changes.iter().all(|p| p.online),
            "went offline with a device left: {changes:?}"
        );
        assert!(bob.subscribe_presence(&[a.user_id]).await.unwrap()[0].online);

        laptop.close();
        assert!(
            !presence_of(&mut bob_events, a.user_id, false, "alice offline")
                .await
                .online
        );
    }

    async fn only_friends_presence_is_visible(backend: Backend) {
        let server = server(backend.clone()).await;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        let (bob, _eb) = register(server.client_config(), &name("bob")).await;
        let (eve, _ee) = register(server.client_config(), &name("eve")).await;
        befriend(&alice, &bob).await;
        let (a, b) = (alice.identity().user_id, bob.identity().user_id);
        assert_eq!(
            code(eve.subscribe_presence(&[a]).await),
            ErrorCode::NotFriends
        );
        assert_eq!(
            code(bob.subscribe_presence(&[a, eve.identity().user_id]).await),
            ErrorCode::NotFriends
        );
        assert_eq!(bob.subscribe_presence(&[a]).await.unwrap().len(), 1);
        assert!(alice.subscribe_presence(&[b]).await.unwrap()[0].online);
        assert!(
            bob.subscribe_presence(&[]).await.unwrap().is_empty(),
            "an empty list unsubscribes"
        );
    }

    async fn a_flapping_connection_produces_a_bounded_number_of_events(backend: Backend) {
        let server = server(backend.clone()).await;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        befriend(&alice, &bob).await;
        let a = alice.identity();
        alice.close();
        until_offline(&bob, a.user_id).await;

        const FLAPS: usize = 50;
        let started = tokio::time::Instant::now();
        for _ in 0..FLAPS {
            let (device, _events) = Client::resume(server.client_config(), &a.token)
                .await
                .unwrap();
            device.close();
        }
        let flapping = started.elapsed();
        // Let the last coalescing window flush.
        let events = count_presence(
            &mut bob_events,
            a.user_id,
            chat_server::presence::COALESCE * 4,
        )
        .await;
        // At most one update per coalescing window while flapping, plus the
        // windows at either end.
        let bound = (flapping.as_millis() / chat_server::presence::COALESCE.as_millis()) as usize + 3;
        assert!(
            events.len() <= bound && events.len() < FLAPS,
            "{} events for {FLAPS} flaps in {flapping:?} (bound {bound})",
            events.len()
        );
        assert!(
            !bob.subscribe_presence(&[a.user_id]).await.unwrap()[0].online,
            "ends offline"
        );
    }

    async fn hidden_users_appear_offline_with_a_frozen_time(backend: Backend) {
        let server = server(backend.clone()).await;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        befriend(&alice, &bob).await;
        let a = alice.identity().user_id;
        assert!(bob.subscribe_presence(&[a]).await.unwrap()[0].online);

        let before = now_ms();
        alice.set_presence_hidden(true).await.unwrap();
        let hidden = presence_of(&mut bob_events, a, false, "alice hidden").await;
        assert!(!hidden.online);
        assert!(hidden.last_active_ms >= before && hidden.last_active_ms <= now_ms());
        // She keeps chatting and heartbeating; friends still see the frozen
        // time. (Only what they see: the version may move meanwhile, as on
        // a busy machine a heartbeat that comes late takes her offline and
        // back behind the mask.)
        tokio::time::sleep(HEARTBEAT * 2).await;
        let snapshot = &bob.subscribe_presence(&[a]).await.unwrap()[0];
        assert_eq!(
            (snapshot.user_id, snapshot.online, snapshot.last_active_ms),
            (a, false, hidden.last_active_ms),
            "{snapshot:?} against {hidden:?}"
        );
        assert!(snapshot.version >= hidden.version, "{snapshot:?}");

        alice.set_presence_hidden(false).await.unwrap();
        assert!(
            presence_of(&mut bob_events, a, true, "alice visible")
                .await
                .online
        );
    }

    async fn last_active_survives_a_restart(backend: Backend) {
        let mut server = server(backend.clone()).await;
        let (alice, _ea) = register(server.client_config(), &name("alice")).await;
        let (bob, _eb) = register(server.client_config(), &name("bob")).await;
        befriend(&alice, &bob).await;
        let a = alice.identity().user_id;
        let b_token = bob.identity().token;
        let closed_at = now_ms();
        alice.close();
        until_offline(&bob, a).await;
        let seen_at = now_ms();
        bob.close();
        server.restart().await;
        let (bob, _eb) = Client::resume(server.client_config(), &b_token)
            .await
            .unwrap();
        let state = &bob.subscribe_presence(&[a]).await.unwrap()[0];
        assert!(!state.online);
        // The disconnect as the server saw it (see above), kept across
        // the restart.
        let heartbeat = HEARTBEAT.as_millis() as i64;
        assert!(
            (closed_at - heartbeat..=seen_at).contains(&state.last_active_ms),
            "{state:?} vs {closed_at}..{seen_at}"
        );
    }
}

#[tokio::test]
async fn ex_friends_stop_seeing_presence() {
    let server = server(Backend::Embedded).await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    befriend(&alice, &bob).await;
    let a = alice.identity().user_id;
    assert!(bob.subscribe_presence(&[a]).await.unwrap()[0].online);
    // Drain the coalesced updates from before the subscription.
    count_presence(&mut bob_events, a, chat_server::presence::COALESCE * 2).await;
    alice.remove_friend(bob.identity().user_id).await.unwrap();
    alice.close();
    let seen = count_presence(&mut bob_events, a, chat_server::presence::COALESCE * 4).await;
    assert!(
        seen.is_empty(),
        "an ex-friend still sees presence: {seen:?}"
    );
}

#[tokio::test]
async fn a_resubscription_hears_every_later_change() {
    let server = server(Backend::Embedded).await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    befriend(&alice, &bob).await;
    let a = alice.identity();
    alice.close();
    // Watching her while she is offline; her coming online is sent to bob.
    until_offline(&bob, a.user_id).await;
    let (alice, _ea) = Client::resume(server.client_config(), &a.token)
        .await
        .unwrap();
    presence_of(&mut bob_events, a.user_id, true, "alice online").await;

    // Unsubscribe; she goes offline unseen (let the coalescing window
    // pass so that change is flushed while bob is not watching).
    bob.subscribe_presence(&[]).await.unwrap();
    alice.close();
    tokio::time::sleep(chat_server::presence::COALESCE * 3).await;
    until_offline(&bob, a.user_id).await;

    // Her coming back must reach bob, although the last update he was
    // sent, before unsubscribing, also said "online".
    let (_alice, _ea) = Client::resume(server.client_config(), &a.token)
        .await
        .unwrap();
    assert!(
        presence_of(&mut bob_events, a.user_id, true, "alice back")
            .await
            .online
    );
}

#[tokio::test]
async fn a_resubscription_refused_for_the_request_rate_is_tried_again() {
    // After a reconnect the client re-sends the list it watches. A user
    // whose devices spent their control requests (here: 500 at once, room
    // for the set-up's polling however slow the machine, then 1 a second)
    // gets RATE_LIMITED for it; the client used to give up, and the app
    // heard no more presence on that connection.
    let server = TestServer::start_with(|c| {
        c.limits.heartbeat_interval = HEARTBEAT;
        c.limits.presence_ttl_multiple = MULTIPLE;
        c.limits.control_rate = 1;
        c.limits.control_burst = 500;
    })
    .await;
    let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, _eb) = register(server.client_config(), &name("bob")).await;
    befriend(&alice, &bob).await;
    let b = bob.identity();
    bob.close();
    until_offline(&alice, b.user_id).await;
    // Alice's other device spends the bucket, then her client reconnects
    // (refilled within a second: on a slow machine the re-subscription
    // may find a token, and this checks nothing more than the plain path).
    let mut other = RawControl::resume(&server, &alice.identity().token).await;
    let answers = other
        .pipeline(
            // Past the burst however slowly the server answers (it
            // refills 1 a second).
            (0..700)
                .map(|_| chat_protocol::Body::ListFriends(proto::ListFriends {}))
                .collect(),
        )
        .await;
    assert!(
        answers
            .iter()
            .any(|a| matches!(a, chat_protocol::Body::Error(_))),
        "the bucket is spent"
    );
    reconnected(&alice).await;
    let (_bob, _eb) = Client::resume(server.client_config(), &b.token)
        .await
        .unwrap();
    assert!(
        presence_of(&mut alice_events, b.user_id, true, "bob online")
            .await
            .online
    );
}

#[tokio::test]
async fn a_list_changed_while_reconnecting_is_the_one_watched() {
    // After a reconnect the client re-sends the list it watches; an app
    // that switches lists while the client is reconnecting must end up
    // watching the new list, whichever of the two requests the new
    // connection carries first. (The race this once lost, a
    // re-subscription made with the old list landing after the app's,
    // is too narrow to force here.)
    let server = server(Backend::Embedded).await;
    let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, _eb) = register(server.client_config(), &name("bob")).await;
    let (carol, _ec) = register(server.client_config(), &name("carol")).await;
    befriend(&alice, &bob).await;
    befriend(&alice, &carol).await;
    let c = carol.identity();
    carol.close();
    until_offline(&alice, c.user_id).await;
    alice
        .subscribe_presence(&[bob.identity().user_id])
        .await
        .unwrap();

    alice.reconnect_now();
    let deadline = tokio::time::Instant::now() + WAIT;
    while alice.is_connected() {
        assert!(tokio::time::Instant::now() < deadline, "never disconnected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The app switches to carol while the client reconnects (a request
    // made before the new connection is up fails: ask again).
    while alice.subscribe_presence(&[c.user_id]).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(alice.wait_connected(WAIT).await);
    let (_carol, _ec) = Client::resume(server.client_config(), &c.token)
        .await
        .unwrap();
    assert!(
        presence_of(&mut alice_events, c.user_id, true, "carol online")
            .await
            .online
    );
}

#[tokio::test]
async fn an_ex_friend_is_dropped_from_the_watched_list() {
    // Bob watches alice and carol (and she him), and alice unfriends him.
    // Both clients drop the other from their lists: what each knew of the
    // other (online) used to stay as it was for good, the server sending
    // no more. His next
    // connection's re-subscription, without her, goes through, and
    // carol's changes still reach him.
    let server = server(Backend::Embedded).await;
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
    let states = bob.subscribe_presence(&[a, c]).await.unwrap();
    assert!(states.iter().all(|s| s.online), "{states:?}");
    assert!(bob.presence(a).is_some());
    alice.subscribe_presence(&[b]).await.unwrap();
    assert!(alice.presence(b).is_some());

    alice.remove_friend(b).await.unwrap();
    assert_eq!(alice.presence(b), None, "nor does the remover watch him");
    wait_for(&mut bob_events, "alice's removal", |e| match e {
        Event::Friend(f) if f.kind() == proto::friend_event::Kind::Removed => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(bob.presence(a), None, "alice is no longer watched");

    reconnected(&bob).await;
    carol.close();
    presence_of(&mut bob_events, c, false, "carol offline").await;
}
