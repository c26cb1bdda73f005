//! Group calls end to end: ringing, answering, declining and timing out,
//! the relay of signals, media datagrams forwarded between participants,
//! devices that move a call, and what is refused.

use std::time::Duration;

use bytes::Bytes;
use chat_client::proto::{CallEndReason, CallEventKind};
use chat_client::{CallMedia, Client, ClientConfig, ErrorCode, Event, Events, MediaPacket, proto};

use crate::harness::*;

fn calls_on(mut config: ClientConfig) -> ClientConfig {
    config.calls = true;
    config
}

/// A user with calls on, their events and their media.
struct Caller {
    client: Client,
    events: Events,
    media: CallMedia,
    /// Call logs that came while another event was awaited (a log comes
    /// on the messages stream, which may overtake the calls stream).
    logs: Vec<proto::Message>,
}

/// A call log, if `event` is one.
fn call_log(event: &Event) -> Option<&proto::Message> {
    match event {
        Event::Message(m) if m.r#type == proto::MessageType::Call as i32 => Some(m),
        _ => None,
    }
}

/// A new user with calls on.
async fn caller(server: &TestServer, prefix: &str) -> Caller {
    let (client, events) = register(calls_on(server.client_config()), &name(prefix)).await;
    Caller::of(client, events)
}

/// A second device of `username`, with calls on.
async fn another_device(server: &TestServer, username: &str) -> Caller {
    let (client, events) = Client::login(calls_on(server.client_config()), username, PASSWORD)
        .await
        .expect("log in");
    Caller::of(client, events)
}

impl Caller {
    fn of(client: Client, events: Events) -> Caller {
        let media = client.call_media().expect("calls are on");
        Caller {
            client,
            events,
            media,
            logs: Vec::new(),
        }
    }

    fn id(&self) -> u64 {
        self.client.identity().user_id
    }

    /// The next call event of `kind` (other events are skipped).
    async fn event(&mut self, kind: CallEventKind) -> proto::CallEvent {
        let what = format!("{kind:?} at {}", self.client.identity().username);
        let logs = &mut self.logs;
        wait_for(&mut self.events, &what, |e| match e {
            Event::Call(event) if event.kind() == kind => Some(event),
            e => {
                logs.extend(call_log(&e).cloned());
                None
            }
        })
        .await
    }

    /// The next signal.
    async fn signal(&mut self) -> proto::CallSignal {
        let logs = &mut self.logs;
        wait_for(&mut self.events, "a call signal", |e| match e {
            Event::CallSignal(signal) => Some(signal),
            e => {
                logs.extend(call_log(&e).cloned());
                None
            }
        })
        .await
    }

    /// The next call log (a CALL message; other events are skipped).
    async fn log(&mut self) -> (proto::Message, proto::CallLog) {
        let m = match self.logs.is_empty() {
            false => self.logs.remove(0),
            true => {
                let what = format!("a call's log at {}", self.client.identity().username);
                wait_for(&mut self.events, &what, |e| call_log(&e).cloned()).await
            }
        };
        let log = *m.call.clone().expect("a CALL message has its call");
        (m, log)
    }

    /// Asserts that no call event or signal arrives within `quiet`.
    async fn assert_quiet(&mut self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.next()).await {
            assert!(
                !matches!(event, Event::Call(_) | Event::CallSignal(_)),
                "unexpected {event:?}"
            );
        }
    }
}

/// Sends `payload` from `from` every 50 ms until `to` gets a packet;
/// returns it. (Datagrams may be lost, even on loopback.)
async fn media_reaches(from: &Client, to: &mut CallMedia, payload: &'static [u8]) -> MediaPacket {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        from.send_call_media(Bytes::from_static(payload)).unwrap();
        if let Ok(Some(packet)) = tokio::time::timeout(Duration::from_millis(50), to.next()).await {
            return packet;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "media never arrived"
        );
    }
}

/// Sends 500-byte media from each of `senders`, `burst` at a time every
/// 20 ms, until the node has counted `n` of `metric`.
async fn flood_until(
    metrics: std::net::SocketAddr,
    senders: &[&Client],
    burst: usize,
    metric: &str,
    n: f64,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for _ in 0..burst {
            for from in senders {
                from.send_call_media(Bytes::from(vec![7; 500])).unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if value(&scrape(metrics).await, metric) >= n {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no {metric}");
    }
}

/// Anna, Bert and Cleo, friends of Anna, in a group Anna made, `name`.
async fn group_of_three(server: &TestServer, name: &str) -> (Caller, Caller, Caller, u64) {
    let a = caller(server, "anna").await;
    let b = caller(server, "bert").await;
    let c = caller(server, "cleo").await;
    befriend(&a.client, &b.client).await;
    befriend(&a.client, &c.client).await;
    let group = a
        .client
        .create_group(name, &[b.id(), c.id()])
        .await
        .unwrap()
        .conversation_id;
    (a, b, c, group)
}

/// Waits until the node has no call under way; its metrics then.
async fn calls_over(metrics: std::net::SocketAddr) -> std::collections::HashMap<String, f64> {
    scrape_until(metrics, "the call over", |m| {
        value(m, "chat_calls_active") == 0.0
    })
    .await
}

fn ended(m: &std::collections::HashMap<String, f64>, reason: &str) -> f64 {
    value(m, &format!("chat_calls_ended_total{{reason=\"{reason}\"}}"))
}

each_backend! {
    async fn a_direct_call_rings_connects_relays_and_ends_when_one_hangs_up(backend: Backend) {
        let server = TestServer::start_on(backend).await;
        let metrics = server.server.as_ref().unwrap().metrics_addr();
        let mut alice = caller(&server, "alice").await;
        let mut bob = caller(&server, "bob").await;
        let conversation = befriend(&alice.client, &bob.client).await;

        let started = alice.client.start_call(conversation, true).await.unwrap();
        assert_eq!(started.conversation_id, conversation);
        assert!(started.video);
        assert_eq!(started.participants.len(), 1);
        assert_eq!(started.participants[0].user_id, alice.id());
        assert_eq!(started.participants[0].participant_id, started.participant_id);
        assert!(
            (1000..65_536).contains(&started.max_media_bytes),
            "a path's datagram less the prefix: {}",
            started.max_media_bytes
        );
        // Asking again on the same connection is the same call.
        let again = alice.client.start_call(conversation, true).await.unwrap();
        assert_eq!((again.call_id, again.participant_id), (started.call_id, started.participant_id));

        let ring = bob.event(CallEventKind::Ring).await;
        assert_eq!(ring.call_id, started.call_id);
        assert_eq!(ring.conversation_id, conversation);
        assert_eq!(ring.user_id, alice.id());
        assert!(ring.video);
        assert!(ring.ring_until_ms > started.started_ms, "{ring:?}");

        let answered = bob.client.join_call(ring.call_id).await.unwrap();
        assert_eq!(answered.participants.len(), 2);
        let bob_pid = answered.participant_id;
        assert_ne!(bob_pid, started.participant_id);
        let joined = alice.event(CallEventKind::Joined).await;
        assert_eq!((joined.user_id, joined.participant_id), (bob.id(), bob_pid));

        // Signals go to the participant named, from the one who sent them.
        alice.client.send_call_signal(started.call_id, bob_pid, &b"v=0 offer"[..]).await.unwrap();
        let offer = bob.signal().await;
        assert_eq!(
            (offer.call_id, offer.participant_id, &offer.payload[..]),
            (started.call_id, started.participant_id, &b"v=0 offer"[..])
        );
        bob.client.send_call_signal(started.call_id, started.participant_id, &b"v=0 answer"[..]).await.unwrap();
        assert_eq!(&alice.signal().await.payload[..], b"v=0 answer");

        // Media both ways, named by its sender.
        let packet = media_reaches(&alice.client, &mut bob.media, b"rtp from alice").await;
        assert_eq!(packet.from, started.participant_id);
        assert_eq!(&packet.payload[..], b"rtp from alice");
        let packet = media_reaches(&bob.client, &mut alice.media, b"rtp from bob").await;
        assert_eq!(packet.from, bob_pid);

        let m = scrape(metrics).await;
        assert_eq!(value(&m, "chat_calls_active"), 1.0);
        assert_eq!(value(&m, "chat_call_participants"), 2.0);
        assert!(value(&m, "chat_call_media_datagrams_total{outcome=\"forwarded\"}") >= 2.0);
        assert_eq!(value(&m, "chat_call_signals_total"), 2.0);

        // Bob hangs up: a direct call ends for Alice too.
        bob.client.leave_call(started.call_id).await.unwrap();
        let left = alice.event(CallEventKind::Left).await;
        assert_eq!((left.user_id, left.reason()), (bob.id(), CallEndReason::HungUp));
        let end = alice.event(CallEventKind::Ended).await;
        assert_eq!(end.reason(), CallEndReason::HungUp);
        let m = calls_over(metrics).await;
        assert_eq!(value(&m, "chat_call_participants"), 0.0);
        assert_eq!(ended(&m, "hung_up"), 1.0);
        assert_eq!(code(bob.client.join_call(started.call_id).await), ErrorCode::NotFound);
        assert_eq!(code(alice.client.leave_call(started.call_id).await), ErrorCode::NotFound);

        // The conversation keeps the call: a CALL message from the caller,
        // to both, in history too.
        let (message, log) = bob.log().await;
        assert_eq!(message.sender_id, alice.id());
        assert_eq!(message.conversation_id, conversation);
        assert!(message.text.starts_with("Video call, "), "{}", message.text);
        assert_eq!((log.call_id, log.video), (started.call_id, true));
        assert_eq!(log.started_ms, started.started_ms);
        assert!(log.duration_ms >= 1 && message.sent_at_ms >= log.started_ms, "{log:?}");
        assert_eq!(log.joined, vec![alice.id(), bob.id()]);
        assert!(log.missed.is_empty());
        assert_eq!(log.reason(), CallEndReason::HungUp);
        assert_eq!(alice.log().await.0, message, "the caller's devices get it too");
        let page = bob
            .client
            .history(conversation, chat_client::HistoryDirection::Backward, 0, 10)
            .await
            .unwrap();
        assert_eq!(page.messages.last(), Some(&message));

        // A new call in the same conversation is a new call.
        let second = bob.client.start_call(conversation, false).await.unwrap();
        assert_ne!(second.call_id, started.call_id);
        assert_eq!(alice.event(CallEventKind::Ring).await.call_id, second.call_id);
    }
}

#[tokio::test]
async fn a_declined_call_ends_and_an_unanswered_one_stops_ringing() {
    let server = TestServer::start().await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let mut alice = caller(&server, "alice").await;
    let mut bob = caller(&server, "bob").await;
    let conversation = befriend(&alice.client, &bob.client).await;

    let call = alice.client.start_call(conversation, false).await.unwrap();
    bob.event(CallEventKind::Ring).await;
    bob.client.decline_call(call.call_id).await.unwrap();
    let declined = alice.event(CallEventKind::Declined).await;
    assert_eq!(declined.user_id, bob.id());
    assert_eq!(
        alice.event(CallEventKind::Ended).await.reason(),
        CallEndReason::Declined
    );
    // Declining again: the call no longer rings anyone.
    assert_eq!(
        code(bob.client.decline_call(call.call_id).await),
        ErrorCode::NotFound
    );
    let m = calls_over(metrics).await;
    assert_eq!(ended(&m, "declined"), 1.0);
    // Declined, it was missed by nobody.
    let (message, log) = bob.log().await;
    assert_eq!(message.text, "Declined call");
    assert_eq!(
        (log.duration_ms, log.reason()),
        (0, CallEndReason::Declined)
    );
    assert_eq!(log.joined, vec![alice.id()]);
    assert!(log.missed.is_empty(), "{log:?}");

    // Nobody answers within the ring timeout (1 s here). Only events are
    // awaited, so a slow machine makes it late, never wrong.
    let server = TestServer::start_with(|c| c.calls.ring_timeout = Duration::from_secs(1)).await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let mut alice = caller(&server, "alice").await;
    let mut bob = caller(&server, "bob").await;
    let conversation = befriend(&alice.client, &bob.client).await;
    let call = alice.client.start_call(conversation, false).await.unwrap();
    let ring = bob.event(CallEventKind::Ring).await;
    assert_eq!(ring.call_id, call.call_id);
    let stopped = bob.event(CallEventKind::RingStopped).await;
    assert_eq!(stopped.reason(), CallEndReason::NoAnswer);
    let stopped = alice.event(CallEventKind::RingStopped).await;
    assert_eq!(stopped.reason(), CallEndReason::NoAnswer);
    assert_eq!(
        alice.event(CallEventKind::Ended).await.reason(),
        CallEndReason::NoAnswer
    );
    let m = calls_over(metrics).await;
    assert_eq!(ended(&m, "no_answer"), 1.0);
    assert_eq!(
        code(bob.client.join_call(call.call_id).await),
        ErrorCode::NotFound
    );
    // Unanswered, Bob missed it.
    let (message, log) = alice.log().await;
    assert_eq!(message.text, "Missed call");
    assert_eq!((log.call_id, log.duration_ms), (call.call_id, 0));
    assert_eq!(log.reason(), CallEndReason::NoAnswer);
    assert_eq!(log.missed, vec![bob.id()]);
    assert_eq!(bob.log().await.0, message);
}

#[tokio::test]
async fn a_call_answered_on_one_device_stops_the_others_and_can_move() {
    let server = TestServer::start().await;
    let mut alice = caller(&server, "alice").await;
    let mut phone = caller(&server, "bob").await;
    let bob_name = phone.client.identity().username;
    let mut laptop = another_device(&server, &bob_name).await;
    let conversation = befriend(&alice.client, &phone.client).await;

    let call = alice.client.start_call(conversation, true).await.unwrap();
    phone.event(CallEventKind::Ring).await;
    laptop.event(CallEventKind::Ring).await;
    let on_phone = phone.client.join_call(call.call_id).await.unwrap();
    let stopped = laptop.event(CallEventKind::RingStopped).await;
    assert_eq!(stopped.reason(), CallEndReason::AnsweredElsewhere);
    alice.event(CallEventKind::Joined).await;

    // Bob takes the call over to the laptop: the phone's part ends, and
    // Alice sees his place change hands.
    let on_laptop = laptop.client.join_call(call.call_id).await.unwrap();
    assert_ne!(on_laptop.participant_id, on_phone.participant_id);
    assert_eq!(on_laptop.participants.len(), 2, "{on_laptop:?}");
    let phone_end = phone.event(CallEventKind::Ended).await;
    assert_eq!(phone_end.reason(), CallEndReason::JoinedElsewhere);
    let left = alice.event(CallEventKind::Left).await;
    assert_eq!(
        (left.participant_id, left.reason()),
        (on_phone.participant_id, CallEndReason::JoinedElsewhere)
    );
    let joined = alice.event(CallEventKind::Joined).await;
    assert_eq!(joined.participant_id, on_laptop.participant_id);
    let packet = media_reaches(&alice.client, &mut laptop.media, b"to the laptop").await;
    assert_eq!(packet.from, call.participant_id);
    // The phone is out of the call: it cannot leave it or signal in it.
    assert_eq!(
        code(phone.client.leave_call(call.call_id).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(
            phone
                .client
                .send_call_signal(call.call_id, call.participant_id, &b"ice"[..])
                .await
        ),
        ErrorCode::NotFound
    );
    alice.assert_quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_group_call_rings_every_member_forwards_to_all_and_ends_when_left_alone() {
    // Rings last the default 45 s; a lone participant waits 1 s.
    let server = TestServer::start_with(|c| {
        c.calls.call_alone_timeout = Duration::from_secs(1);
        c.calls.max_call_participants = 3;
    })
    .await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let mut members = Vec::new();
    for i in 0..4 {
        members.push(caller(&server, &format!("g{i}")).await);
    }
    for i in 1..4 {
        befriend(&members[0].client, &members[i].client).await;
    }
    let ids: Vec<u64> = members[1..].iter().map(Caller::id).collect();
    let group = members[0]
        .client
        .create_group("call us", &ids)
        .await
        .unwrap()
        .conversation_id;
    let [a, b, c, d] = &mut members[..] else {
        unreachable!()
    };

    let call = a.client.start_call(group, false).await.unwrap();
    for member in [&mut *b, &mut *c, &mut *d] {
        let ring = member.event(CallEventKind::Ring).await;
        assert_eq!((ring.call_id, ring.user_id), (call.call_id, a.id()));
    }
    let b_in = b.client.join_call(call.call_id).await.unwrap();
    // A member who starts the group's call joins the running one.
    let c_in = c.client.start_call(group, false).await.unwrap();
    assert_eq!(c_in.call_id, call.call_id);
    assert_eq!(c_in.participants.len(), 3);
    // The call holds three here.
    assert_eq!(
        code(d.client.join_call(call.call_id).await),
        ErrorCode::LimitReached
    );
    d.client.decline_call(call.call_id).await.unwrap();
    let declined = a.event(CallEventKind::Declined).await;
    assert_eq!(declined.user_id, d.id());

    // One sender, every other participant.
    let from_b = media_reaches(&b.client, &mut a.media, b"b speaks").await;
    assert_eq!(from_b.from, b_in.participant_id);
    // C got what reached A (or, if those were lost on the way to C, the
    // ones sent until one arrived).
    let at_c = media_reaches(&b.client, &mut c.media, b"b speaks").await;
    assert_eq!(
        (at_c.from, &at_c.payload[..]),
        (b_in.participant_id, &b"b speaks"[..])
    );

    // The caller leaves; the others go on.
    a.client.leave_call(call.call_id).await.unwrap();
    let left = b.event(CallEventKind::Left).await;
    assert_eq!(
        (left.user_id, left.reason()),
        (a.id(), CallEndReason::HungUp)
    );
    b.client
        .send_call_signal(call.call_id, c_in.participant_id, &b"still here"[..])
        .await
        .unwrap();
    assert_eq!(&c.signal().await.payload[..], b"still here");

    // C's connection goes: B is alone, and after the alone timeout the
    // call ends.
    c.client.close();
    let left = b.event(CallEventKind::Left).await;
    assert_eq!(
        (left.user_id, left.reason()),
        (c.id(), CallEndReason::Disconnected)
    );
    assert_eq!(
        b.event(CallEventKind::Ended).await.reason(),
        CallEndReason::Alone
    );
    let m = calls_over(metrics).await;
    assert_eq!(ended(&m, "alone"), 1.0);
    assert_eq!(value(&m, "chat_call_participants"), 0.0);
    // The group's log: from the caller, who left first; D declined, so
    // nobody missed it.
    let (message, log) = d.log().await;
    assert_eq!(message.sender_id, a.id());
    assert!(message.text.starts_with("Call, "), "{}", message.text);
    assert_eq!(log.joined, vec![a.id(), b.id(), c.id()]);
    assert!(log.missed.is_empty(), "{log:?}");
    assert_eq!(log.reason(), CallEndReason::Alone);
}

#[tokio::test]
async fn calls_refuse_outsiders_strangers_floods_and_clients_without_them() {
    let server = TestServer::start_with(|c| c.calls.call_media_rate = 1024).await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let alice = caller(&server, "alice").await;
    let mut bob = caller(&server, "bob").await;
    let mut eve = caller(&server, "eve").await;
    let conversation = befriend(&alice.client, &bob.client).await;
    let other = befriend(&alice.client, &eve.client).await;

    // Eve is not in Alice and Bob's conversation, nor may she see or
    // join its call.
    assert_eq!(
        code(eve.client.start_call(conversation, false).await),
        ErrorCode::NotAMember
    );
    let call = alice.client.start_call(conversation, false).await.unwrap();
    assert_eq!(
        code(eve.client.join_call(call.call_id).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(eve.client.decline_call(call.call_id).await),
        ErrorCode::NotFound
    );
    // One call per connection.
    assert_eq!(
        code(alice.client.start_call(other, false).await),
        ErrorCode::UnexpectedFrame
    );
    eve.assert_quiet(Duration::from_millis(100)).await;

    bob.event(CallEventKind::Ring).await;
    let joined = bob.client.join_call(call.call_id).await.unwrap();
    // A signal to nobody, and ones out of bounds (checked in the client
    // first, and by the server for clients that do not).
    assert_eq!(
        code(
            alice
                .client
                .send_call_signal(call.call_id, 999, &b"ice"[..])
                .await
        ),
        ErrorCode::NotFound
    );
    let too_long = vec![b'x'; chat_protocol::calls::MAX_SIGNAL_BYTES + 1];
    assert_eq!(
        code(
            alice
                .client
                .send_call_signal(call.call_id, joined.participant_id, too_long)
                .await
        ),
        ErrorCode::InvalidArgument
    );
    // A client that does not check: the server refuses it before it looks
    // at the call.
    let token = eve.client.identity().token;
    let mut raw = RawControl::resume(&server, &token).await;
    let (mut send, mut recv) = raw.conn().open_bi().await.unwrap();
    let oversized = chat_protocol::Frame::new(
        5,
        chat_protocol::Body::CallSignal(proto::CallSignal {
            call_id: call.call_id,
            participant_id: joined.participant_id,
            payload: vec![0; chat_protocol::calls::MAX_SIGNAL_BYTES + 1].into(),
        }),
    );
    send.write_all(&frames(&[
        chat_protocol::Frame::open_stream(chat_client::StreamKind::Calls),
        oversized,
    ]))
    .await
    .unwrap();
    match next_frame(&mut recv, &mut bytes::BytesMut::new())
        .await
        .body
    {
        Some(chat_protocol::Body::Error(e)) => {
            assert_eq!(
                ErrorCode::from_wire(e.code),
                ErrorCode::InvalidArgument,
                "{e:?}"
            );
        }
        other => panic!("a refusal, not {other:?}"),
    }
    raw.assert_served().await;
    bob.assert_quiet(Duration::from_millis(100)).await;

    // Media beyond the sender's rate (1 KiB/s here) is dropped: 500-byte
    // packets sent five at a time until ten were refused; what passed is
    // at most the first second's budget and what the time taken refilled.
    let began = std::time::Instant::now();
    let limited = "chat_call_media_datagrams_total{outcome=\"rate_limited\"}";
    let forwarded = "chat_call_media_datagrams_total{outcome=\"forwarded\"}";
    flood_until(metrics, &[&alice.client], 5, limited, 10.0).await;
    let passed = value(&scrape(metrics).await, forwarded);
    let allowed = (1024.0 * (1.0 + began.elapsed().as_secs_f64()) / 500.0).floor();
    assert!(
        (1.0..=allowed).contains(&passed),
        "{passed} forwarded, {allowed} allowed"
    );
    let packet = tokio::time::timeout(WAIT, bob.media.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(packet.from, call.participant_id);

    // A client without calls neither opens the stream nor asks.
    let (plain, _plain_events) = register(server.client_config(), &name("plain")).await;
    assert!(plain.call_media().is_none());
    assert!(matches!(
        plain.start_call(conversation, false).await,
        Err(chat_client::ClientError::Config(_))
    ));
}

#[tokio::test]
async fn the_node_forwards_at_most_its_media_rate_across_all_calls() {
    // Each sender may send 64 KiB/s, but the node forwards 2 KiB/s in
    // all: two calls whose senders are each well within their own rate
    // share that.
    let server = TestServer::start_with(|c| {
        c.calls.call_media_rate = 64 << 10;
        c.calls.call_media_node_rate = 2048;
    })
    .await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let alice = caller(&server, "alice").await;
    let mut bob = caller(&server, "bob").await;
    let carol = caller(&server, "carol").await;
    let mut dave = caller(&server, "dave").await;
    let first = befriend(&alice.client, &bob.client).await;
    let second = befriend(&carol.client, &dave.client).await;
    for (from, to, conversation) in [(&alice, &mut bob, first), (&carol, &mut dave, second)] {
        from.client.start_call(conversation, false).await.unwrap();
        let ring = to.event(CallEventKind::Ring).await;
        to.client.join_call(ring.call_id).await.unwrap();
    }

    // 500-byte packets from both callers (501 bytes forwarded, with the
    // sender's id) until ten copies were dropped for the node's rate.
    let began = std::time::Instant::now();
    let node_limited = "chat_call_media_datagrams_total{outcome=\"node_limited\"}";
    flood_until(
        metrics,
        &[&alice.client, &carol.client],
        3,
        node_limited,
        10.0,
    )
    .await;
    let m = scrape(metrics).await;
    let forwarded = value(&m, "chat_call_media_datagrams_total{outcome=\"forwarded\"}");
    let allowed = (2048.0 * (1.0 + began.elapsed().as_secs_f64()) / 501.0).floor();
    assert!(
        (1.0..=allowed).contains(&forwarded),
        "{forwarded} forwarded in both calls, {allowed} allowed"
    );
    assert_eq!(
        value(
            &m,
            "chat_call_media_datagrams_total{outcome=\"rate_limited\"}"
        ),
        0.0,
        "no sender was over its own rate"
    );
    // The rate refills: both calls still carry media (past what the
    // flood left queued).
    for (from, to, payload) in [
        (&alice, &mut bob, &b"still here"[..]),
        (&carol, &mut dave, &b"and here"[..]),
    ] {
        while media_reaches(&from.client, &mut to.media, payload)
            .await
            .payload
            != payload
        {}
    }
}

#[tokio::test]
async fn call_media_ends_with_the_session() {
    // Another device logs the shared token out: the session ends, and so
    // does the app's media stream (it used to wait for ever).
    let server = TestServer::start().await;
    let mut alice = caller(&server, "alice").await;
    let (copy, _copy_events) = Client::resume(
        calls_on(server.client_config()),
        &alice.client.identity().token,
    )
    .await
    .unwrap();
    copy.logout().await.unwrap();
    let ended = wait_for(&mut alice.events, "session end", |e| match e {
        Event::SessionEnded { code } => Some(code),
        _ => None,
    })
    .await;
    assert_eq!(ended, ErrorCode::TokenRevoked);
    let next = tokio::time::timeout(WAIT, alice.media.next())
        .await
        .expect("the media stream ends");
    assert!(next.is_none(), "{next:?}");
}

#[tokio::test]
async fn datagrams_outside_a_call_are_dropped_as_they_come() {
    let server = TestServer::start().await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let alice = caller(&server, "alice").await;
    let mut bob = caller(&server, "bob").await;
    let conversation = befriend(&alice.client, &bob.client).await;

    // Sent while in no call: read and dropped, not kept for the next call.
    let no_call = "chat_call_media_datagrams_total{outcome=\"no_call\"}";
    let deadline = tokio::time::Instant::now() + WAIT;
    while value(&scrape(metrics).await, no_call) < 3.0 {
        alice
            .client
            .send_call_media(Bytes::from_static(b"stale"))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(tokio::time::Instant::now() < deadline, "never dropped");
    }
    let call = alice.client.start_call(conversation, false).await.unwrap();
    let ring = bob.event(CallEventKind::Ring).await;
    bob.client.join_call(ring.call_id).await.unwrap();
    let first = media_reaches(&alice.client, &mut bob.media, b"fresh").await;
    assert_eq!(
        (first.from, &first.payload[..]),
        (call.participant_id, &b"fresh"[..])
    );
}

#[tokio::test]
async fn a_device_that_opens_calls_while_a_call_rings_is_rung() {
    let server = TestServer::start().await;
    let alice = caller(&server, "alice").await;
    // Bob's app runs without calls when the call starts.
    let (bob, _bob_events) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice.client, &bob).await;
    let call = alice.client.start_call(conversation, true).await.unwrap();
    let token = bob.identity().token;
    let (later, events) = Client::resume(calls_on(server.client_config()), &token)
        .await
        .unwrap();
    let mut later = Caller::of(later, events);
    let ring = later.event(CallEventKind::Ring).await;
    assert_eq!(
        (ring.call_id, ring.user_id, ring.video),
        (call.call_id, alice.id(), true)
    );
    assert!(ring.ring_until_ms > call.started_ms);
    later.client.join_call(call.call_id).await.unwrap();
}

#[tokio::test]
async fn ringing_calls_are_limited_per_caller() {
    let server = TestServer::start().await;
    let alice = caller(&server, "alice").await;
    let bob = caller(&server, "bob").await;
    let conversation = befriend(&alice.client, &bob.client).await;
    // Ten ring at once; the eleventh must wait.
    for _ in 0..10 {
        let call = alice.client.start_call(conversation, false).await.unwrap();
        alice.client.leave_call(call.call_id).await.unwrap();
    }
    match alice.client.start_call(conversation, false).await {
        Err(chat_client::ClientError::Server {
            code: ErrorCode::RateLimited,
            retry_after: Some(wait),
            ..
        }) => assert!(wait > Duration::from_secs(5), "{wait:?}"),
        other => panic!("the eleventh call: {other:?}"),
    }
}

#[tokio::test]
async fn signals_to_a_participant_that_does_not_read_are_refused_not_piled_up() {
    let server = TestServer::start().await;
    let mut alice = caller(&server, "alice").await;
    let bob = caller(&server, "bob").await;
    let conversation = befriend(&alice.client, &bob.client).await;
    let call = alice.client.start_call(conversation, false).await.unwrap();

    // Bob answers on a device that never reads its calls stream.
    let mut device = RawControl::resume(&server, &bob.client.identity().token).await;
    let (mut send, _unread) = device.conn().open_bi().await.unwrap();
    send.write_all(&frames(&[
        chat_protocol::Frame::open_stream(chat_client::StreamKind::Calls),
        chat_protocol::Frame::new(
            1,
            chat_protocol::Body::JoinCall(proto::JoinCall {
                call_id: call.call_id,
            }),
        ),
    ]))
    .await
    .unwrap();
    let joined = alice.event(CallEventKind::Joined).await;

    // 32 KiB signals: its stream's window fills, then its queue; before
    // the queue could close it as a slow consumer, the sender is refused.
    let payload = Bytes::from(vec![b's'; chat_protocol::calls::MAX_SIGNAL_BYTES]);
    let mut sent = 0;
    let refusal = loop {
        match alice
            .client
            .send_call_signal(call.call_id, joined.participant_id, payload.clone())
            .await
        {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 100, "never refused after {sent} signals");
    };
    assert_eq!(refusal.code(), Some(ErrorCode::RateLimited), "{refusal:?}");
    assert!(sent > 8, "refused after {sent}");
    assert!(device.conn().close_reason().is_none());
    device.assert_served().await;
}

#[tokio::test]
async fn leaving_a_group_or_a_friendship_takes_the_user_out_of_its_call() {
    let server =
        TestServer::start_with(|c| c.calls.call_alone_timeout = Duration::from_secs(1)).await;
    let mut a = caller(&server, "anna").await;
    let mut b = caller(&server, "bert").await;
    let mut c = caller(&server, "cleo").await;
    let direct = befriend(&a.client, &b.client).await;
    befriend(&a.client, &c.client).await;
    let group = a
        .client
        .create_group("leavers", &[b.id(), c.id()])
        .await
        .unwrap()
        .conversation_id;
    let call = a.client.start_call(group, false).await.unwrap();
    b.client.join_call(call.call_id).await.unwrap();
    let c_in = c.client.join_call(call.call_id).await.unwrap();
    c.client.leave_group(group).await.unwrap();
    assert_eq!(
        c.event(CallEventKind::Ended).await.reason(),
        CallEndReason::Removed
    );
    for member in [&mut a, &mut b] {
        let left = wait_for(&mut member.events, "c's leave", |e| match e {
            Event::Call(left)
                if left.kind() == CallEventKind::Left
                    && left.participant_id == c_in.participant_id =>
            {
                Some(left)
            }
            _ => None,
        })
        .await;
        assert_eq!(left.reason(), CallEndReason::Removed);
    }
    // A and B go on; C is out for good.
    assert_eq!(
        code(c.client.join_call(call.call_id).await),
        ErrorCode::NotFound
    );
    // The caller leaves the group too.
    a.client.leave_group(group).await.unwrap();
    assert_eq!(
        a.event(CallEventKind::Ended).await.reason(),
        CallEndReason::Removed
    );
    assert_eq!(
        b.event(CallEventKind::Ended).await.reason(),
        CallEndReason::Alone,
        "one left in an answered group call waits, then ends"
    );
    // Its log comes from the first who took part and is still a member.
    let (message, log) = b.log().await;
    assert_eq!(message.conversation_id, group);
    assert_eq!(
        message.sender_id,
        b.id(),
        "the caller is no longer a member"
    );
    assert_eq!(log.joined, vec![a.id(), b.id(), c.id()]);
    assert!(log.duration_ms >= 1, "{log:?}");

    // A direct call ends when its two stop being friends.
    let call = a.client.start_call(direct, false).await.unwrap();
    b.client.join_call(call.call_id).await.unwrap();
    a.client.remove_friend(b.id()).await.unwrap();
    for member in [&mut a, &mut b] {
        assert_eq!(
            member.event(CallEventKind::Ended).await.reason(),
            CallEndReason::Removed
        );
    }
}

#[tokio::test]
async fn a_direct_call_waits_for_a_side_whose_connection_dropped() {
    let server = TestServer::start().await;
    let mut alice = caller(&server, "alice").await;
    let mut bob = caller(&server, "bob").await;
    let conversation = befriend(&alice.client, &bob.client).await;
    let call = alice.client.start_call(conversation, false).await.unwrap();
    bob.event(CallEventKind::Ring).await;
    let first = bob.client.join_call(call.call_id).await.unwrap();
    alice.event(CallEventKind::Joined).await;

    // Bob's network drops; Alice hears it, and the call stays.
    reconnected(&bob.client).await;
    let left = alice.event(CallEventKind::Left).await;
    assert_eq!(
        (left.participant_id, left.reason()),
        (first.participant_id, CallEndReason::Disconnected)
    );
    let again = bob.client.join_call(call.call_id).await.unwrap();
    assert_eq!(again.participants.len(), 2);
    let joined = alice.event(CallEventKind::Joined).await;
    assert_eq!(joined.participant_id, again.participant_id);
    let packet = media_reaches(&alice.client, &mut bob.media, b"welcome back").await;
    assert_eq!(packet.from, call.participant_id);
}

#[tokio::test]
async fn a_call_that_rang_nobody_and_nobody_joined_is_logged_as_such() {
    // Groups of three do not ring here: nobody missed the call, nobody
    // joined it, and its log says that rather than "Missed call".
    let server = TestServer::start_with(|c| c.calls.call_ring_max_members = 2).await;
    let (mut a, _b, _c, group) = group_of_three(&server, "big enough").await;
    let call = a.client.start_call(group, true).await.unwrap();
    a.client.leave_call(call.call_id).await.unwrap();
    let (message, log) = a.log().await;
    assert_eq!(message.text, "Video call, nobody joined");
    assert_eq!(
        (log.call_id, log.duration_ms, log.joined, log.missed),
        (call.call_id, 0, vec![a.id()], vec![])
    );
}

#[tokio::test]
async fn a_member_the_call_does_not_involve_changes_nothing_and_a_rung_one_is_unrung() {
    // Groups of three do not ring here, so the caller waits alone.
    let server = TestServer::start_with(|c| c.calls.call_ring_max_members = 2).await;
    let (a, b, c, group) = group_of_three(&server, "quiet").await;
    let call = a.client.start_call(group, false).await.unwrap();
    // Cleo, neither rung nor in the call, leaves the group: the call goes
    // on (it used to end, REMOVED, as if the lone caller had been).
    // (The leave is answered once the registry has heard of it.)
    c.client.leave_group(group).await.unwrap();
    let joined = b.client.join_call(call.call_id).await.unwrap();
    assert_eq!(joined.participants.len(), 2);

    // A member who is being rung and is removed stops ringing.
    let server = TestServer::start().await;
    let (a, mut b, mut c, group) = group_of_three(&server, "ringing").await;
    let call = a.client.start_call(group, false).await.unwrap();
    c.event(CallEventKind::Ring).await;
    b.event(CallEventKind::Ring).await;
    a.client.remove_member(group, c.id()).await.unwrap();
    let ended = c.event(CallEventKind::Ended).await;
    assert_eq!(
        (ended.call_id, ended.reason()),
        (call.call_id, CallEndReason::Removed)
    );
    assert_eq!(
        code(c.client.join_call(call.call_id).await),
        ErrorCode::NotFound
    );
    // Bert is still rung, and answers.
    b.client.join_call(call.call_id).await.unwrap();
}

#[tokio::test]
async fn a_call_whose_other_side_never_comes_back_ends_even_after_a_move() {
    let server =
        TestServer::start_with(|c| c.calls.call_alone_timeout = Duration::from_secs(1)).await;
    let mut alice = caller(&server, "alice").await;
    let mut bob = caller(&server, "bob").await;
    let mut laptop = another_device(&server, &alice.client.identity().username).await;
    let conversation = befriend(&alice.client, &bob.client).await;
    let call = alice.client.start_call(conversation, false).await.unwrap();
    bob.event(CallEventKind::Ring).await;
    bob.client.join_call(call.call_id).await.unwrap();
    alice.event(CallEventKind::Joined).await;

    // Bob's connection goes for good; Alice, waiting for him, takes the
    // call to her laptop, where the wait goes on and ends.
    bob.client.close();
    let left = alice.event(CallEventKind::Left).await;
    assert_eq!(left.reason(), CallEndReason::Disconnected);
    let moved = laptop.client.join_call(call.call_id).await.unwrap();
    assert_eq!(moved.participants.len(), 1);
    assert_eq!(
        laptop.event(CallEventKind::Ended).await.reason(),
        CallEndReason::Alone
    );
}
