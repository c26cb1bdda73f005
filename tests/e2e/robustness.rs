//! Hostile and broken clients, spoken to with raw QUIC: each violation gets
//! its own close code, and everyone else keeps being served.

use std::time::Duration;

use bytes::BytesMut;
use chat_client::{Client, ErrorCode, Event, proto};
use chat_protocol::{Body, Frame, StreamKind};

use crate::harness::*;

/// A raw QUIC connection that speaks frames by hand.
struct Raw {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl Raw {
    async fn connect(server: &TestServer) -> Raw {
        let (endpoint, conn) = quic_connect(server).await.expect("handshake");
        Raw {
            _endpoint: endpoint,
            conn,
        }
    }

    /// Connects with a stream receive window of `window` bytes (the credit
    /// the server gets on each stream).
    async fn connect_with_stream_window(server: &TestServer, window: u32) -> Raw {
        let mut transport = quinn::TransportConfig::default();
        transport.stream_receive_window(window.into());
        Self::connect_from(server, "127.0.0.1", transport).await
    }

    /// Connects from `local` (a loopback address: the server sees another
    /// source) with `transport`.
    async fn connect_from(
        server: &TestServer,
        local: &str,
        transport: quinn::TransportConfig,
    ) -> Raw {
        let mut config = server.client_config().quinn_client_config().unwrap();
        config.transport_config(std::sync::Arc::new(transport));
        let local = std::net::SocketAddr::new(local.parse().unwrap(), 0);
        let endpoint = quinn::Endpoint::client(local).unwrap();
        let conn = endpoint
            .connect_with(config, server.addr, "localhost")
            .unwrap()
            .await
            .expect("handshake");
        Raw {
            _endpoint: endpoint,
            conn,
        }
    }

    /// Opens a stream and writes raw bytes on it.
    async fn stream(&self, bytes: &[u8]) -> (quinn::SendStream, quinn::RecvStream) {
        let (mut send, recv) = self.conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        (send, recv)
    }

    /// Registers a fresh user on a new control stream.
    async fn authenticated(server: &TestServer) -> (Raw, quinn::SendStream, quinn::RecvStream) {
        let raw = Raw::connect(server).await;
        let (send, recv) = raw
            .log_in(Body::Register(proto::Register {
                username: name("raw"),
                password: PASSWORD.into(),
                device_name: String::new(),
            }))
            .await;
        (raw, send, recv)
    }

    /// Opens the control stream with `auth` (a Register, Login or
    /// Authenticate) and waits for its AuthOk.
    async fn log_in(&self, auth: Body) -> (quinn::SendStream, quinn::RecvStream) {
        let (send, mut recv) = self
            .stream(&frames(&[
                Frame::open_stream(StreamKind::Control),
                Frame::new(1, auth),
            ]))
            .await;
        let reply = next_frame(&mut recv, &mut BytesMut::new()).await;
        assert!(matches!(reply.body, Some(Body::AuthOk(_))), "{reply:?}");
        (send, recv)
    }

    async fn close_code(&self) -> ErrorCode {
        close_code_of(&self.conn).await
    }
}

/// The next frame on `recv`, which must be a Deliver: its message.
async fn next_delivered(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> proto::Message {
    match next_frame(recv, buf).await.body {
        Some(Body::Deliver(d)) => *d.message.expect("a message"),
        other => panic!("a Deliver, got {other:?}"),
    }
}

/// The seqs a raw device was delivered, by conversation, in arrival order.
type SeqsSeen = std::collections::HashMap<u64, Vec<u64>>;

/// Reads deliveries into `seen` until each (conversation, count) of
/// `wanted` has that many.
async fn read_until(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
    seen: &mut SeqsSeen,
    wanted: &[(u64, usize)],
) {
    while wanted
        .iter()
        .any(|&(conversation, n)| seen.get(&conversation).map_or(0, Vec::len) < n)
    {
        let m = next_delivered(recv, buf).await;
        seen.entry(m.conversation_id).or_default().push(m.seq);
    }
}

/// A varint length prefix claiming `len` bytes, plus a little of the body.
fn oversize_prefix(len: u64) -> Vec<u8> {
    let mut buf = BytesMut::new();
    prost::encode_length_delimiter(len as usize, &mut buf).unwrap();
    buf.extend_from_slice(&[0u8; 100]);
    buf.to_vec()
}

fn garbage() -> Vec<u8> {
    // Length 40, then bytes that are not a protobuf Frame (wire type 7 is
    // invalid).
    let mut bytes = vec![40u8];
    bytes.extend(std::iter::repeat_n(0xffu8, 40));
    bytes
}

#[tokio::test]
async fn violations_get_their_codes_and_others_keep_working() {
    let server = TestServer::start().await;
    // A healthy pair chatting through it all.
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;

    let list_friends = Frame::new(5, Body::ListFriends(proto::ListFriends {}));
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "a request before authentication",
            frames(&[
                Frame::open_stream(StreamKind::Control),
                list_friends.clone(),
            ]),
            ErrorCode::Unauthenticated,
        ),
        (
            "no OpenStream before a request",
            frames(std::slice::from_ref(&list_friends)),
            ErrorCode::Unauthenticated,
        ),
        (
            "a data stream before authentication",
            frames(&[Frame::open_stream(StreamKind::Messages)]),
            ErrorCode::Unauthenticated,
        ),
        (
            "an unknown stream kind",
            frames(&[Frame::new(
                0,
                Body::OpenStream(proto::OpenStream {
                    kind: 99,
                    ..Default::default()
                }),
            )]),
            ErrorCode::BadStream,
        ),
        (
            "a 10 MB frame before authentication",
            oversize_prefix(10 << 20),
            ErrorCode::FrameTooLarge,
        ),
        (
            "random bytes before authentication",
            garbage(),
            ErrorCode::MalformedFrame,
        ),
    ];
    for (what, bytes, expected) in cases {
        let raw = Raw::connect(&server).await;
        let _stream = raw.stream(&bytes).await;
        assert_eq!(raw.close_code().await, expected, "{what}");
    }

    // The same abuse after authentication, on each kind of stream.
    {
        let (raw, mut control_send, _recv) = Raw::authenticated(&server).await;
        control_send
            .write_all(&oversize_prefix(200_000))
            .await
            .unwrap();
        assert_eq!(
            raw.close_code().await,
            ErrorCode::FrameTooLarge,
            "oversize on control"
        );
    }
    for kind in [StreamKind::Messages, StreamKind::Receipts] {
        let (raw, _control_send, _control_recv) = Raw::authenticated(&server).await;
        let mut bytes = frames(&[Frame::open_stream(kind)]);
        bytes.extend(oversize_prefix(200_000));
        let _stream = raw.stream(&bytes).await;
        assert_eq!(
            raw.close_code().await,
            ErrorCode::FrameTooLarge,
            "oversize on {}",
            kind.name()
        );
    }
    for kind in [StreamKind::Messages, StreamKind::Receipts] {
        let (raw, _s, _r) = Raw::authenticated(&server).await;
        let mut bytes = frames(&[Frame::open_stream(kind)]);
        bytes.extend(garbage());
        let _stream = raw.stream(&bytes).await;
        assert_eq!(
            raw.close_code().await,
            ErrorCode::MalformedFrame,
            "garbage on {}",
            kind.name()
        );
    }
    {
        // A second control stream is a protocol violation too.
        let (raw, _s, _r) = Raw::authenticated(&server).await;
        let _stream = raw
            .stream(&frames(&[Frame::open_stream(StreamKind::Control)]))
            .await;
        assert_eq!(raw.close_code().await, ErrorCode::BadStream);
    }
    {
        // A body only servers send, from a client: answered
        // UNEXPECTED_FRAME by its request id (its 20,000 entries never
        // decoded: see the protocol's server codec), and the connection
        // goes on.
        let (raw, mut send, mut recv) = Raw::authenticated(&server).await;
        let list = Frame::new(
            8,
            Body::ConversationList(proto::ConversationList {
                conversations: vec![proto::ConversationInfo::default(); 20_000],
            }),
        );
        send.write_all(&frames(&[list, list_friends.clone()]))
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let reply = next_frame(&mut recv, &mut buf).await;
        assert_eq!(reply.request_id, 8);
        match reply.body {
            Some(Body::Error(e)) => {
                assert_eq!(ErrorCode::from_wire(e.code), ErrorCode::UnexpectedFrame);
                assert!(e.message.contains("conversation_list"), "{}", e.message);
            }
            other => panic!("expected an error, got {other:?}"),
        }
        let reply = next_frame(&mut recv, &mut buf).await;
        assert!(matches!(reply.body, Some(Body::FriendList(_))), "{reply:?}");
        assert!(raw.conn.close_reason().is_none());
    }

    // Through all of that, the healthy clients were served.
    let ack = alice
        .send_text(conversation, "still here?")
        .await
        .expect("send works");
    let got = messages(&mut bob_events, 1).await;
    assert_eq!(got[0].seq, ack.seq);
    assert_eq!(got[0].text, "still here?");
    assert_eq!(bob.friends().await.unwrap().friends.len(), 1);
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_auth_timeout() {
    // A user registered first, under the default timeout: an Argon2 hash on
    // a busy machine must not race the 2 s one below.
    let mut server = TestServer::start().await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let token = alice.identity().token;
    alice.close();
    server.config.limits.auth_timeout = Duration::from_secs(2);
    server.restart().await;
    let raw = Raw::connect(&server).await;
    assert_eq!(raw.close_code().await, ErrorCode::Timeout);
    // Authenticated connections are not affected by the auth timeout (a
    // resume hashes nothing). A raw connection: client-lib would reconnect
    // and hide a close.
    let mut resumed = RawControl::resume(&server, &token).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let reply = resumed
        .request(Body::ListFriends(proto::ListFriends {}))
        .await;
    assert!(matches!(reply, Body::FriendList(_)), "{reply:?}");
    assert!(
        resumed.conn().close_reason().is_none(),
        "still the same connection"
    );
}

#[tokio::test]
async fn a_send_key_the_server_would_refuse_is_refused_by_the_client() {
    // A text at the server's limit leaves 512 bytes of the frame for the
    // rest: with a long idempotency key the frame is over the server's
    // limit, which closes the connection, and the outbox sent it again on
    // every reconnect. client-lib refuses such a key as the server would.
    let server = TestServer::start_with(|c| {
        c.limits.max_frame_len = 4096;
        c.limits.max_text_len = 3584;
    })
    .await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, _eb) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let text = "x".repeat(3584);
    for key in ["".to_string(), "k".repeat(1000)] {
        let answer = tokio::time::timeout(WAIT, alice.send_with_id(conversation, &key, &text))
            .await
            .expect("answered at once");
        assert_eq!(code(answer), ErrorCode::InvalidArgument, "key {key:.8}");
    }
    let sent = alice
        .send_with_id(conversation, &"k".repeat(64), &text)
        .await
        .expect("a key of 64 bytes is taken");
    assert_eq!(sent.seq, 1);
}

#[tokio::test]
async fn a_request_whose_frame_breaks_the_protocol_fails_with_that_code_at_once() {
    // A group change over the server's frame limit closes the connection
    // FRAME_TOO_LARGE. That code answers the request: asked again, it
    // would close every next connection too, for as long as the keyed
    // request tries (three request timeouts). The client used to end the
    // connection itself when the server finished the stream, before the
    // server's close (and its code) came.
    let server = TestServer::start_with(|c| {
        c.limits.max_frame_len = 4096;
        c.limits.max_text_len = 3584;
    })
    .await;
    let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
    let members: Vec<u64> = (1_000_000..1_003_000).collect();
    let answer = tokio::time::timeout(WAIT / 2, alice.create_group("too many", &members))
        .await
        .expect("answered, not asked again and again");
    assert_eq!(code(answer), ErrorCode::FrameTooLarge);
    let told = wait_for(&mut alice_events, "the disconnect", |e| match e {
        Event::Disconnected { code } => Some(code),
        _ => None,
    })
    .await;
    assert_eq!(told, Some(ErrorCode::FrameTooLarge));
    // The client goes on, on a new connection.
    let (bob, _eb) = register(server.client_config(), &name("bob")).await;
    wait_until("alice to reconnect", || async { alice.is_connected() }).await;
    befriend(&alice, &bob).await;
}

#[tokio::test]
async fn bad_sends_are_refused_with_codes() {
    let server = TestServer::start_with(|c| c.limits.max_text_len = 1000).await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, _eb) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    assert_eq!(
        code(alice.send_text(conversation, "").await),
        ErrorCode::EmptyMessage
    );
    assert_eq!(
        code(alice.send_text(conversation, "   \n").await),
        ErrorCode::EmptyMessage
    );
    // Refused by the client (its server's AuthOk says 1,000 bytes) ...
    assert_eq!(
        code(alice.send_text(conversation, &"x".repeat(1001)).await),
        ErrorCode::MessageTooLarge
    );
    // ... and by the server, for a client that does not check.
    let (raw, _control, _control_recv) = Raw::authenticated(&server).await;
    let long = Frame::new(
        1,
        Body::Send(proto::Send {
            conversation_id: conversation,
            client_msg_id: "long".into(),
            r#type: proto::MessageType::Text as i32,
            text: "x".repeat(1001),
            media_id: String::new(),
            reply_to_seq: 0,
        }),
    );
    let (_tx, mut rx) = raw
        .stream(&frames(&[Frame::open_stream(StreamKind::Messages), long]))
        .await;
    let mut buf = BytesMut::new();
    let answer = loop {
        let frame = next_frame(&mut rx, &mut buf).await;
        if let Some(Body::Error(e)) = frame.body {
            break ErrorCode::from_wire(e.code);
        }
    };
    assert_eq!(answer, ErrorCode::MessageTooLarge);
    assert_eq!(
        code(
            alice
                .send_with_id(conversation, &"k".repeat(65), "hi")
                .await
        ),
        ErrorCode::InvalidArgument
    );
    assert!(
        alice
            .send_text(conversation, &"x".repeat(1000))
            .await
            .is_ok()
    );
    assert_eq!(alice.outbox_len(), 0, "refused sends leave the outbox");
}

/// A text too long for a frame fails at once: sent, the server would
/// close the connection for a frame too large, and the outbox would resend
/// it on every reconnect, holding every later send back for good.
#[tokio::test]
async fn a_text_too_long_for_a_frame_fails_at_once_and_later_sends_go_through() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let huge = "x".repeat(chat_protocol::limits::DEFAULT_MAX_FRAME_LEN + 1);
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        alice.send_text(conversation, &huge),
    )
    .await
    .expect("refused at once, not left waiting in the outbox");
    assert_eq!(code(refused), ErrorCode::MessageTooLarge);
    assert_eq!(alice.outbox_len(), 0);
    alice.send_text(conversation, "after").await.unwrap();
    wait_for(&mut bob_events, "the next send delivered", |e| match e {
        Event::Message(m) if m.text == "after" => Some(()),
        _ => None,
    })
    .await;
    // The refusal came before the send left: the connection never closed.
    while let Some(event) = alice_events.try_next() {
        assert!(
            !matches!(event, Event::Disconnected { .. }),
            "alice's connection closed: {event:?}"
        );
    }
}

/// A client that grants no flow-control credit on its control stream
/// cannot keep its connection up, counted as logged in, by never taking
/// its AuthOk: that write is bounded by `write-stall` as every other is.
#[tokio::test]
async fn a_client_that_never_takes_its_auth_ok_is_closed_as_a_slow_consumer() {
    let server = TestServer::start_with(|c| c.transport.write_stall = Duration::from_secs(1)).await;
    let raw = Raw::connect_with_stream_window(&server, 0).await;
    let register = Frame::new(
        1,
        Body::Register(proto::Register {
            username: name("stingy"),
            password: PASSWORD.into(),
            ..Default::default()
        }),
    );
    let _streams = raw
        .stream(&frames(&[
            Frame::open_stream(StreamKind::Control),
            register,
        ]))
        .await;
    assert_eq!(raw.close_code().await, ErrorCode::SlowConsumer);
}

#[tokio::test]
async fn over_the_send_rate_the_answer_is_rate_limited_with_a_retry_after() {
    // One send per second, bursts of two. The sends go to a conversation
    // that does not exist: the limit applies before anything else, so the
    // first two are answered NOT_A_MEMBER and the third RATE_LIMITED.
    let server = TestServer::start_with(|c| {
        c.limits.send_rate = 1;
        c.limits.send_burst = 2;
    })
    .await;
    let (raw, _control, _control_recv) = Raw::authenticated(&server).await;
    // Registered before the burst: an Argon2 hash between the refusal and
    // the retry below could outlast the refused send's hold on a busy
    // machine.
    let (other, _c, _r) = Raw::authenticated(&server).await;
    let send = |id: u64| {
        Frame::new(
            id,
            Body::Send(proto::Send {
                conversation_id: 999_999,
                client_msg_id: format!("k{id}"),
                r#type: proto::MessageType::Text as i32,
                text: "hi".into(),
                media_id: String::new(),
                reply_to_seq: 0,
            }),
        )
    };
    let (mut tx, mut rx) = raw
        .stream(&frames(&[
            Frame::open_stream(StreamKind::Messages),
            send(1),
            send(2),
            send(3),
            send(4),
        ]))
        .await;
    let mut buf = BytesMut::new();
    let mut answers = Vec::new();
    while answers.len() < 4 {
        let frame = next_frame(&mut rx, &mut buf).await;
        if let Some(Body::Error(e)) = frame.body {
            answers.push((
                frame.request_id,
                ErrorCode::from_wire(e.code),
                e.retry_after_ms,
            ));
        }
    }
    answers.sort_by_key(|a| a.0);
    assert_eq!(answers[0].1, ErrorCode::NotAMember);
    assert_eq!(answers[1].1, ErrorCode::NotAMember);
    for &(id, code, retry_after_ms) in &answers[2..] {
        assert_eq!(code, ErrorCode::RateLimited, "send {id}");
        assert!(
            (1..=1_000).contains(&retry_after_ms),
            "send {id}: retry after {retry_after_ms} ms"
        );
    }
    // Another user is not limited meanwhile.
    let (_tx2, mut rx2) = other
        .stream(&frames(&[
            Frame::open_stream(StreamKind::Messages),
            send(1),
        ]))
        .await;
    let frame = next_frame(&mut rx2, &mut BytesMut::new()).await;
    match frame.body {
        Some(Body::Error(e)) => assert_eq!(ErrorCode::from_wire(e.code), ErrorCode::NotAMember),
        other => panic!("unexpected {other:?}"),
    }
    // After the wait, a later send still may not overtake the refused
    // one (a client's sends made before it saw the refusal arrive now);
    // the refused send itself goes through, and its answer comes first.
    tokio::time::sleep(Duration::from_millis(u64::from(answers[3].2) + 50)).await;
    tx.write_all(&frames(&[send(5), send(3)])).await.unwrap();
    let mut after = Vec::new();
    while after.len() < 2 {
        let frame = next_frame(&mut rx, &mut buf).await;
        if let Some(Body::Error(e)) = frame.body {
            after.push((frame.request_id, ErrorCode::from_wire(e.code)));
        }
    }
    assert_eq!(
        after,
        vec![(5, ErrorCode::RateLimited), (3, ErrorCode::NotAMember)],
        "send 5 is held for the refused send 3, which passes the limit"
    );
}

#[tokio::test]
async fn a_registration_flood_is_refused_at_once_beyond_the_hashing_queue() {
    // No queue: a registration that finds every hasher (one per core) busy
    // is answered SERVER_BUSY with a retry-after instead of waiting.
    let server = TestServer::start_with(|c| {
        c.limits.max_queued_password_checks = 0;
        // Every registration from this one address at once, as a flood
        // from many would be: no share per address.
        c.limits.password_checks_per_address = 0;
    })
    .await;
    let mut raws = Vec::new();
    for _ in 0..32 {
        raws.push(Raw::connect(&server).await);
    }
    // Every connection is up; now all the registrations go out at once.
    let mut replies = tokio::task::JoinSet::new();
    for raw in raws {
        let register = Frame::new(
            1,
            Body::Register(proto::Register {
                username: name("flood"),
                password: PASSWORD.into(),
                device_name: String::new(),
            }),
        );
        let bytes = frames(&[Frame::open_stream(StreamKind::Control), register]);
        replies.spawn(async move {
            let (_send, mut recv) = raw.stream(&bytes).await;
            let frame = next_frame(&mut recv, &mut BytesMut::new()).await;
            (raw, frame)
        });
    }
    let (mut ok, mut busy) = (0, 0);
    while let Some(joined) = replies.join_next().await {
        let (_raw, frame) = joined.unwrap();
        match frame.body {
            Some(Body::AuthOk(_)) => ok += 1,
            Some(Body::Error(e)) => {
                assert_eq!(ErrorCode::from_wire(e.code), ErrorCode::ServerBusy, "{e:?}");
                assert_eq!(e.retry_after_ms, 1_000);
                busy += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(ok >= 1, "the hashers kept working");
    assert!(busy >= 1, "32 at once cannot all find a free hasher");
    // Once the flood is over, registering works as usual.
    let (carol, _c) = register(server.client_config(), &name("carol")).await;
    assert!(carol.identity().user_id > 0);
}

#[tokio::test]
async fn one_address_flooding_the_hashers_does_not_keep_another_out() {
    // A queue of 4, two places per address: 16 registrations at once from
    // one address used to fill the queue (and be refused beyond it), so a
    // login from anywhere else was answered SERVER_BUSY while they lasted.
    let server = TestServer::start_with(|c| {
        c.limits.max_queued_password_checks = 4;
        c.limits.password_checks_per_address = 2;
        // Sixteen hashes in turn must not outlast their connections' wait
        // to log in on a busy machine.
        c.limits.auth_timeout = Duration::from_secs(300);
    })
    .await;
    let register_bytes = |who: &str| {
        let register = Frame::new(
            1,
            Body::Register(proto::Register {
                username: name(who),
                password: PASSWORD.into(),
                device_name: String::new(),
            }),
        );
        frames(&[Frame::open_stream(StreamKind::Control), register])
    };
    let mut raws = Vec::new();
    for _ in 0..16 {
        raws.push(Raw::connect(&server).await);
    }
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel(16);
    let mut flood = tokio::task::JoinSet::new();
    for raw in raws {
        let bytes = register_bytes("flood");
        let first_tx = first_tx.clone();
        flood.spawn(async move {
            let (_send, mut recv) = raw.stream(&bytes).await;
            let frame = next_frame(&mut recv, &mut BytesMut::new()).await;
            let _ = first_tx.try_send(());
            (raw, frame)
        });
    }
    // Once the flood has an answer (an AuthOk after a hash, or at once a
    // refusal for a full queue), another address registers.
    tokio::time::timeout(WAIT, first_rx.recv())
        .await
        .expect("the flood is answered")
        .expect("a flood task reports");
    let elsewhere =
        Raw::connect_from(&server, "127.0.0.2", quinn::TransportConfig::default()).await;
    let (_send, mut recv) = elsewhere.stream(&register_bytes("carol")).await;
    let reply = next_frame(&mut recv, &mut BytesMut::new()).await;
    assert!(
        matches!(reply.body, Some(Body::AuthOk(_))),
        "another address gets its hash: {reply:?}"
    );
    // And the flood itself is served in turn, none refused.
    while let Some(joined) = flood.join_next().await {
        let (_raw, frame) = joined.unwrap();
        assert!(matches!(frame.body, Some(Body::AuthOk(_))), "{frame:?}");
    }
}

#[tokio::test]
async fn registrations_of_a_taken_name_cost_no_hashing() {
    // No queue, as above: 32 registrations at once of a name that exists.
    // Each used to hash the password before the insert found the name
    // taken, so most were answered SERVER_BUSY (and honest logins with
    // them); now every one is USERNAME_TAKEN, with no hashing.
    let server = TestServer::start_with(|c| {
        c.limits.max_queued_password_checks = 0;
        // Every registration from this one address at once, as a flood
        // from many would be: no share per address.
        c.limits.password_checks_per_address = 0;
    })
    .await;
    let taken = name("taken");
    let (_owner, _owner_events) = register(server.client_config(), &taken).await;
    let mut raws = Vec::new();
    for _ in 0..32 {
        raws.push(Raw::connect(&server).await);
    }
    let mut replies = tokio::task::JoinSet::new();
    for raw in raws {
        let register = Frame::new(
            1,
            Body::Register(proto::Register {
                username: taken.clone(),
                password: PASSWORD.into(),
                device_name: String::new(),
            }),
        );
        let bytes = frames(&[Frame::open_stream(StreamKind::Control), register]);
        replies.spawn(async move {
            let (_send, mut recv) = raw.stream(&bytes).await;
            let frame = next_frame(&mut recv, &mut BytesMut::new()).await;
            (raw, frame)
        });
    }
    while let Some(joined) = replies.join_next().await {
        let (_raw, frame) = joined.unwrap();
        match frame.body {
            Some(Body::Error(e)) => {
                assert_eq!(
                    ErrorCode::from_wire(e.code),
                    ErrorCode::UsernameTaken,
                    "{e:?}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn registrations_from_one_address_are_limited_per_hour() {
    // Every per-user limit is per account, and each account may hold 16
    // connections: one host registering in a loop could take every
    // connection place. Three an hour here; the fourth waits, a taken
    // name is still answered as taken, and logins are not counted.
    let server = TestServer::start_with(|c| c.limits.registrations_per_address = 3).await;
    let register_raw = |username: String| {
        let server = &server;
        async move {
            let raw = Raw::connect(server).await;
            let register = Frame::new(
                1,
                Body::Register(proto::Register {
                    username,
                    password: PASSWORD.into(),
                    device_name: String::new(),
                }),
            );
            let bytes = frames(&[Frame::open_stream(StreamKind::Control), register]);
            let (_send, mut recv) = raw.stream(&bytes).await;
            next_frame(&mut recv, &mut BytesMut::new()).await.body
        }
    };
    let names: Vec<String> = (0..4).map(|i| name(&format!("reg{i}u"))).collect();
    for name in &names[..3] {
        let answer = register_raw(name.clone()).await;
        assert!(matches!(answer, Some(Body::AuthOk(_))), "{answer:?}");
    }
    match register_raw(names[3].clone()).await {
        Some(Body::Error(e)) => {
            assert_eq!(
                ErrorCode::from_wire(e.code),
                ErrorCode::RateLimited,
                "{e:?}"
            );
            // A token back every 20 minutes (less the moments the three
            // registrations took).
            assert!((1_100_000..=1_200_000).contains(&e.retry_after_ms), "{e:?}");
        }
        other => panic!("the fourth registration: {other:?}"),
    }
    match register_raw(names[0].clone()).await {
        Some(Body::Error(e)) => {
            assert_eq!(
                ErrorCode::from_wire(e.code),
                ErrorCode::UsernameTaken,
                "{e:?}"
            );
        }
        other => panic!("a taken name: {other:?}"),
    }
    let (first, _events) = Client::login(server.client_config(), &names[0], PASSWORD)
        .await
        .expect("a login is not a registration");
    first.close();
}

#[tokio::test]
async fn a_calls_stream_is_served_once_per_connection_beside_many_media_streams() {
    // A frame that does not belong on the calls stream is refused there
    // and the connection kept; media streams, many per connection, are
    // served before and after. A second calls stream closes the
    // connection, as a second of any singleton stream does.
    let server = TestServer::start().await;
    let (bob, _bob_events) = register(server.client_config(), &name("bob")).await;
    let token = bob.identity().token;
    bob.close();
    let mut device = RawControl::resume(&server, &token).await;
    let fetch = Frame::new(
        1,
        Body::MediaFetch(proto::MediaFetch {
            media_id: "0".repeat(32),
            offset: 0,
        }),
    );
    for (kind, expected) in [
        (StreamKind::Media, ErrorCode::NotFound),
        (StreamKind::Calls, ErrorCode::UnexpectedFrame),
        (StreamKind::Media, ErrorCode::NotFound),
    ] {
        let (mut send, mut recv) = device.conn().open_bi().await.unwrap();
        send.write_all(&frames(&[Frame::open_stream(kind), fetch.clone()]))
            .await
            .unwrap();
        let refusal = next_frame(&mut recv, &mut BytesMut::new()).await;
        match refusal.body {
            Some(Body::Error(e)) => {
                assert_eq!(ErrorCode::from_wire(e.code), expected, "{kind:?}: {e:?}");
            }
            other => panic!("{kind:?}: a refusal, not {other:?}"),
        }
    }
    device.assert_served().await;
    let (mut send, _recv) = device.conn().open_bi().await.unwrap();
    send.write_all(&frames(&[Frame::open_stream(StreamKind::Calls)]))
        .await
        .unwrap();
    assert_eq!(close_code_of(device.conn()).await, ErrorCode::BadStream);
}

#[tokio::test]
async fn a_login_with_a_password_longer_than_any_is_wrong_without_hashing() {
    // No queue for the hashers, as above: 32 logins at once whose
    // passwords are longer than a registration accepts. Each was hashed
    // (a frame's length of it), so most were answered SERVER_BUSY; now
    // each is a wrong password at once (counted as one: past the
    // account's allowance, RATE_LIMITED).
    let server = TestServer::start_with(|c| {
        c.limits.max_queued_password_checks = 0;
        c.limits.password_checks_per_address = 0;
    })
    .await;
    let owner = name("owner");
    let (_owner, _owner_events) = register(server.client_config(), &owner).await;
    let long = "p".repeat(*chat_protocol::limits::PASSWORD_LEN.end() + 1);
    let mut raws = Vec::new();
    for _ in 0..32 {
        raws.push(Raw::connect(&server).await);
    }
    let mut replies = tokio::task::JoinSet::new();
    for raw in raws {
        let login = Frame::new(
            1,
            Body::Login(proto::Login {
                username: owner.clone(),
                password: long.clone(),
                device_name: String::new(),
            }),
        );
        let bytes = frames(&[Frame::open_stream(StreamKind::Control), login]);
        replies.spawn(async move {
            let (_send, mut recv) = raw.stream(&bytes).await;
            let frame = next_frame(&mut recv, &mut BytesMut::new()).await;
            (raw, frame)
        });
    }
    let mut wrong = 0;
    while let Some(joined) = replies.join_next().await {
        let (_raw, frame) = joined.unwrap();
        match frame.body {
            Some(Body::Error(e)) => match ErrorCode::from_wire(e.code) {
                ErrorCode::WrongPassword => wrong += 1,
                ErrorCode::RateLimited => {}
                other => panic!("a wrong password, not {other:?}: {e:?}"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(wrong > 0, "answered as wrong passwords");
}

/// A QUIC server that speaks the protocol by hand, with a dev certificate
/// the harness's client configuration trusts, granting each client
/// `streams` bidirectional streams.
async fn fake_server(dir: &std::path::Path, streams: u32) -> (quinn::Endpoint, std::path::PathBuf) {
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(streams.into());
    fake_server_with(dir, transport).await
}

/// A fake node on the usual 8 streams: its data directory (keep it for
/// the test's length), its endpoint, and a client config that trusts it.
async fn fake_node() -> (
    tempfile::TempDir,
    quinn::Endpoint,
    chat_client::ClientConfig,
) {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, ca) = fake_server(dir.path(), 8).await;
    let config = client_config(endpoint.local_addr().unwrap(), &ca);
    (dir, endpoint, config)
}

/// Registers with a fake node (which answers any login).
async fn register_fake(config: chat_client::ClientConfig) -> (Client, chat_client::Events) {
    Client::register(config, "fake", PASSWORD)
        .await
        .expect("registered with the fake server")
}

/// [`fake_server`] with a transport of the test's own.
async fn fake_server_with(
    dir: &std::path::Path,
    transport: quinn::TransportConfig,
) -> (quinn::Endpoint, std::path::PathBuf) {
    let config = chat_server::Config {
        data_dir: dir.to_path_buf(),
        ..chat_server::Config::default()
    };
    let identity = chat_server::certs::load_or_create(&config).expect("dev certificate");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .unwrap();
    tls.alpn_protocols = vec![chat_protocol::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let mut server = quinn::ServerConfig::with_crypto(std::sync::Arc::new(crypto));
    server.transport_config(std::sync::Arc::new(transport));
    let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    (endpoint, identity.dev_ca.expect("a dev CA"))
}

/// Answers a client's first stream as a node would: reads its OpenStream
/// and its Register, Login or Authenticate, and replies AuthOk. `None` once
/// the client has gone.
async fn fake_login(conn: &quinn::Connection) -> Option<(quinn::SendStream, quinn::RecvStream)> {
    let (mut send, recv, _buf, auth) = held_login(conn).await?;
    send.write_all(&frames(&[auth_ok(auth.request_id, 0)]))
        .await
        .ok()?;
    Some((send, recv))
}

/// A client's first stream up to its Register, Login or Authenticate, not
/// yet answered: the stream, what was read past the request, the request.
async fn held_login(
    conn: &quinn::Connection,
) -> Option<(quinn::SendStream, quinn::RecvStream, BytesMut, Frame)> {
    let (send, mut recv) = conn.accept_bi().await.ok()?;
    let mut buf = BytesMut::new();
    let open = next_frame(&mut recv, &mut buf).await;
    assert!(matches!(open.body, Some(Body::OpenStream(_))), "{open:?}");
    let auth = next_frame(&mut recv, &mut buf).await;
    assert!(
        matches!(
            auth.body,
            Some(Body::Register(_) | Body::Login(_) | Body::Authenticate(_))
        ),
        "{auth:?}"
    );
    Some((send, recv, buf, auth))
}

/// A fake node's SendAck storing `request` as seq 1.
fn first_ack(request_id: u64, request: proto::Send) -> Frame {
    Frame::new(
        request_id,
        Body::SendAck(proto::SendAck {
            conversation_id: request.conversation_id,
            seq: 1,
            message_id: 1,
            client_msg_id: request.client_msg_id,
            ..Default::default()
        }),
    )
}

/// A fake node's answer to a presence subscription: one user's state.
fn presence_snapshot(request_id: u64, state: proto::PresenceState) -> Frame {
    Frame::new(
        request_id,
        Body::PresenceSnapshot(proto::PresenceSnapshot {
            states: vec![state],
        }),
    )
}

/// A fake node's AuthOk for user 1 (`heartbeat_interval_ms` 0: none).
fn auth_ok(request_id: u64, heartbeat_interval_ms: u32) -> Frame {
    Frame::new(
        request_id,
        Body::AuthOk(Box::new(proto::AuthOk {
            user_id: 1,
            username: "fake".into(),
            token: "t".into(),
            heartbeat_interval_ms,
            ..Default::default()
        })),
    )
}

/// The client's streams, accepted until the one of `kind` opens.
type Streams = Vec<(quinn::SendStream, quinn::RecvStream)>;

/// Accepts the client's streams until the one of `kind` opens; returns it,
/// what was read past its OpenStream, and the others (to keep open).
async fn accept_stream(
    conn: &quinn::Connection,
    kind: StreamKind,
) -> (quinn::SendStream, quinn::RecvStream, BytesMut, Streams) {
    let (send, recv, buf, others, _) = accept_opened(conn, kind).await;
    (send, recv, buf, others)
}

/// [`accept_stream`], with the stream's `OpenStream`.
async fn accept_opened(
    conn: &quinn::Connection,
    kind: StreamKind,
) -> (
    quinn::SendStream,
    quinn::RecvStream,
    BytesMut,
    Streams,
    proto::OpenStream,
) {
    let mut others = Vec::new();
    loop {
        let (send, mut recv) = conn.accept_bi().await.expect("the client's streams");
        let mut buf = BytesMut::new();
        let open = next_frame(&mut recv, &mut buf).await;
        match open.body {
            Some(Body::OpenStream(open)) if open.kind == kind as i32 => {
                return (send, recv, buf, others, open);
            }
            _ => others.push((send, recv)),
        }
    }
}

#[tokio::test]
async fn a_stream_the_server_stops_makes_the_client_reconnect_and_resend() {
    // A failed write used to end only that stream's writer: the send
    // then counted as sent and waited for an answer for ever, while the
    // connection stayed up. Now the write's failure closes the
    // connection and the next one resends the outbox. The fake node
    // stops reading the first connection's messages stream.
    let (_dir, endpoint, config) = fake_node().await;
    let node = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut control, _control) = fake_login(&conn).await.expect("a login");
        let (_send, mut messages, _, _others) = accept_stream(&conn, StreamKind::Messages).await;
        messages.stop(0u32.into()).unwrap();
        // Sent after the STOP_SENDING: once the app has this push, the
        // client knows its messages stream is stopped.
        let push = Frame::push(Body::FriendEvent(proto::FriendEvent::default()));
        control.write_all(&frames(&[push])).await.unwrap();

        let again = tokio::time::timeout(WAIT, endpoint.accept())
            .await
            .expect("the client connects again")
            .unwrap();
        let conn = again.await.unwrap();
        let _control = fake_login(&conn).await.expect("a login again");
        let (mut send, mut recv, mut buf, _others) =
            accept_stream(&conn, StreamKind::Messages).await;
        let resent = next_frame(&mut recv, &mut buf).await;
        let Some(Body::Send(request)) = resent.body else {
            panic!("the send resent, not {resent:?}");
        };
        let ack = first_ack(resent.request_id, request);
        send.write_all(&frames(&[ack])).await.unwrap();
        // Until the client has gone.
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
    });
    let (client, mut events) = register_fake(config).await;
    wait_for(&mut events, "the node's push", |e| {
        matches!(e, Event::Friend(_)).then_some(())
    })
    .await;
    let ack = tokio::time::timeout(WAIT, client.send_text(7, "hello"))
        .await
        .expect("the send is answered on the next connection")
        .expect("sent");
    assert_eq!(ack.seq, 1);
    client.close();
    node.await.unwrap();
}

#[tokio::test]
async fn a_client_that_gets_a_bad_frame_from_the_server_reconnects() {
    // Without this, the stream's reader just stopped: the connection stayed
    // up on heartbeats and every later request timed out.
    let (_dir, endpoint, config) = fake_node().await;
    let serve = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, _recv) = fake_login(&conn).await.expect("a login");
        // Then a frame over the protocol's 1 MiB.
        send.write_all(&oversize_prefix(2 << 20)).await.unwrap();
        let closed = tokio::time::timeout(WAIT, conn.closed())
            .await
            .expect("the client closes the connection");
        let again = tokio::time::timeout(WAIT, endpoint.accept())
            .await
            .expect("the client connects again");
        (closed, again.is_some())
    });
    let (_client, _events) = register_fake(config).await;
    let (closed, reconnected) = serve.await.unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, (ErrorCode::FrameTooLarge as u32).into());
        }
        other => panic!("closed by the client with FRAME_TOO_LARGE, not {other:?}"),
    }
    assert!(reconnected);
}

#[tokio::test]
async fn a_node_that_drops_every_connection_after_login_sees_the_client_back_off() {
    // The fake node accepts every login, then closes with UNAVAILABLE (as a
    // node whose catch-up fails does). Reconnecting every reconnect_min
    // (50 ms here) would make ~40 connections in 3 s; backing off to
    // reconnect_max (500 ms) makes fewer than 10.
    let (_dir, endpoint, config) = fake_node().await;
    let count = tokio::spawn(async move {
        let mut accepted = 0;
        let mut window_end = None;
        loop {
            let deadline = window_end.unwrap_or_else(|| tokio::time::Instant::now() + WAIT);
            let Ok(Some(incoming)) = tokio::time::timeout_at(deadline, endpoint.accept()).await
            else {
                break;
            };
            accepted += 1;
            window_end.get_or_insert(tokio::time::Instant::now() + Duration::from_secs(3));
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let _streams = fake_login(&conn).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                conn.close((ErrorCode::Unavailable as u32).into(), b"catch-up failed");
            });
        }
        accepted
    });
    let (client, _events) = register_fake(config).await;
    let accepted = count.await.unwrap();
    client.close();
    // At least one reconnect however busy the machine (without backoff
    // there would be dozens).
    assert!(
        accepted >= 2,
        "the client reconnects: {accepted} connections"
    );
    assert!(accepted < 10, "{accepted} connections in 3 s: no backoff");
}

#[tokio::test]
async fn delivery_acks_beyond_what_a_user_was_delivered_are_dropped() {
    // A DeliveryAck has no reply, and each costs the store work even when
    // it moves nothing (a conversation the user is not in is looked up, a
    // departure touched): a client looping them used to fill the watermark
    // committer's queue, which every session's acks wait on. Now a user's
    // connections may ack what they were delivered plus one slack, refilled
    // over a minute; this user was delivered nothing, so of 500 acks beyond
    // the slack all but the refill are dropped. Each connection used to
    // have a slack of its own: a second one got 8,192 more.
    use chat_server::streams::messages::{ACK_SLACK, ACK_SLACK_REFILL};
    let server = TestServer::start().await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let username = name("raw");
    let first = Raw::connect(&server).await;
    let (_control, _control_recv) = first
        .log_in(Body::Register(proto::Register {
            username: username.clone(),
            password: PASSWORD.into(),
            device_name: String::new(),
        }))
        .await;
    // The acks, then a send to no conversation: its refusal comes back
    // once every ack before it was taken or dropped.
    let burst = || {
        let mut list = vec![Frame::open_stream(StreamKind::Messages)];
        list.extend((1..=ACK_SLACK + 500).map(|conversation_id| {
            Frame::push(Body::DeliveryAck(proto::DeliveryAck {
                conversation_id,
                seq: 1,
            }))
        }));
        list.push(Frame::new(
            7,
            Body::Send(proto::Send {
                conversation_id: u64::MAX,
                client_msg_id: "probe".into(),
                r#type: proto::MessageType::Text as i32,
                text: "probe".into(),
                media_id: String::new(),
                reply_to_seq: 0,
            }),
        ));
        frames(&list)
    };
    let answered = |mut recv: quinn::RecvStream| async move {
        let mut buf = BytesMut::new();
        loop {
            let frame = next_frame(&mut recv, &mut buf).await;
            if frame.request_id == 7 {
                assert!(matches!(frame.body, Some(Body::Error(_))), "{frame:?}");
                return recv;
            }
        }
    };
    let ignored = || async { value(&scrape(metrics).await, "chat_delivery_acks_ignored_total") };
    let started = std::time::Instant::now();
    let refilled = || (started.elapsed().as_secs_f64() * f64::from(ACK_SLACK_REFILL)).ceil();

    let (_messages, recv) = first.stream(&burst()).await;
    let _recv = answered(recv).await;
    let dropped = ignored().await;
    let most = refilled();
    assert!(
        dropped <= 500.0 && dropped >= 500.0 - most,
        "{dropped} of the first connection's acks dropped ({most} refilled)"
    );

    let second = Raw::connect(&server).await;
    let (_control2, _control2_recv) = second
        .log_in(Body::Login(proto::Login {
            username,
            password: PASSWORD.into(),
            device_name: String::new(),
        }))
        .await;
    let (_messages2, recv2) = second.stream(&burst()).await;
    let _recv2 = answered(recv2).await;
    let dropped_again = ignored().await - dropped;
    let most = refilled();
    assert!(
        dropped_again >= (ACK_SLACK + 500) as f64 - most,
        "{dropped_again} of the second connection's acks dropped ({most} refilled)"
    );

    // An honest client's acks go through (that deliveries earn acks beyond
    // the slack is the unit test `acks_are_earned_first_then_taken_from_
    // the_users_slack`): bob acks what alice sends.
    let before = ignored().await;
    let (alice, _ea) = register(server.client_config(), &name("alice")).await;
    let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let ack = alice.send_text(conversation, "hello").await.unwrap();
    assert_eq!(messages(&mut bob_events, 1).await[0].seq, ack.seq);
    wait_delivered(&alice, conversation, bob.identity().user_id, ack.seq).await;
    assert_eq!(ignored().await, before);
}

type SlowDevice = (
    Raw,
    (quinn::SendStream, quinn::RecvStream),
    quinn::SendStream,
    quinn::RecvStream,
);

/// Bob away while Alice sent him `backlog` texts; Carol is his friend
/// too. The start of the catch-up tests.
struct AwayBob {
    server: TestServer,
    /// Alice, still connected.
    _alice: Client,
    carol: Client,
    /// Alice's and Carol's streams, read by nobody but kept open.
    _events: (chat_client::Events, chat_client::Events),
    bob_name: String,
    bob_id: u64,
    token: String,
    from_alice: u64,
    from_carol: u64,
}

async fn away_bob(backlog: usize) -> AwayBob {
    let server = TestServer::start_with(unlimited_sends).await;
    let (alice, alice_events) = register(server.client_config(), &name("alice")).await;
    let (carol, carol_events) = register(server.client_config(), &name("carol")).await;
    let bob_name = name("bob");
    let (bob, bob_events) = register(server.client_config(), &bob_name).await;
    let bob_id = bob.identity().user_id;
    let from_alice = befriend(&alice, &bob).await;
    let from_carol = befriend(&carol, &bob).await;
    let token = bob.identity().token;
    bob.close();
    drop((bob, bob_events));
    send_texts(&alice, from_alice, backlog).await;
    AwayBob {
        server,
        _alice: alice,
        carol,
        _events: (alice_events, carol_events),
        bob_name,
        bob_id,
        token,
        from_alice,
        from_carol,
    }
}

impl AwayBob {
    /// Bob's device back over a 4 KiB window, which catch-up's first page
    /// does not fit: once the first message is read (returned in `seen`,
    /// read through `buf`), the writer is catching up and stalls until
    /// more is read. The device, its control stream (kept open) and its
    /// messages stream.
    async fn slow_device(&self, seen: &mut SeqsSeen, buf: &mut BytesMut) -> SlowDevice {
        let device = Raw::connect_with_stream_window(&self.server, 4096).await;
        let control = device
            .log_in(Body::Authenticate(proto::Authenticate {
                token: self.token.clone(),
                background: false,
            }))
            .await;
        let (send, mut recv) = device.stream(&frames(&[Frame::open_messages(false)])).await;
        read_until(&mut recv, buf, seen, &[(self.from_alice, 1)]).await;
        (device, control, send, recv)
    }
}

#[tokio::test]
async fn a_bad_frame_during_a_long_catch_up_closes_the_connection_at_once() {
    // Bob's device comes back to a backlog it reads nothing of (a small
    // window), then sends garbage on its messages stream. The error frame
    // waited behind the catch-up in the stream's queue, and the connection
    // (its control stream too) stayed usable until the write stall ended
    // the catch-up a minute later, with SLOW_CONSUMER.
    let away = away_bob(300).await;
    // The catch-up is under way, and stalls on the window from here.
    let (bob, _control, mut messages, _recv) = away
        .slow_device(&mut SeqsSeen::default(), &mut BytesMut::new())
        .await;
    messages.write_all(&garbage()).await.unwrap();
    assert_eq!(bob.close_code().await, ErrorCode::MalformedFrame);
}

#[tokio::test]
async fn live_messages_during_a_long_catch_up_do_not_close_a_reading_client() {
    // Bob comes back to a backlog over a link that takes it slowly (a small
    // stream window, left unread for now), while Carol sends him more than
    // a queue's worth live. Those queued while catch-up ran and filled the
    // queue: Bob was closed as too slow, and his next catch-up started
    // over. Now the queue lets go of them, catch-up runs again for what it
    // let go, and Bob gets every message once, in order.
    const BACKLOG: usize = 300;
    const LIVE: usize = 1_100;
    let away = away_bob(BACKLOG).await;
    let metrics = away.server.server.as_ref().unwrap().metrics_addr();
    let (from_alice, from_carol) = (away.from_alice, away.from_carol);
    // Bob reads nothing more until Carol's messages are all stored and
    // pushed.
    let mut seen = SeqsSeen::default();
    let mut buf = BytesMut::new();
    let (bob, _control, _messages, mut messages_recv) = away.slow_device(&mut seen, &mut buf).await;
    send_texts(&away.carol, from_carol, LIVE).await;

    let wanted = [(from_alice, BACKLOG), (from_carol, LIVE)];
    read_until(&mut messages_recv, &mut buf, &mut seen, &wanted).await;
    for (conversation, n) in [(from_alice, BACKLOG), (from_carol, LIVE)] {
        let seqs = &seen[&conversation];
        let first = seqs[0];
        let expected: Vec<u64> = (first..first + n as u64).collect();
        assert_eq!(seqs, &expected, "every message once, in order");
    }
    assert!(bob.conn.close_reason().is_none(), "Bob stays connected");
    assert!(
        value(&scrape(metrics).await, "chat_catch_up_repeats_total") >= 1.0,
        "the live messages overflowed during catch-up"
    );
}

#[tokio::test]
async fn a_catch_up_pass_for_messages_let_go_leaves_out_the_devices_own() {
    // As above, and Bob sends to Carol from the catching-up device, then
    // from his laptop, while her flood is let go around both. The pass
    // that brings what was let go read the range from history with his
    // own messages in it: the device got its own send back as a new
    // message, after its SendAck, which client-lib showed to the user as
    // one more (the rest of catch-up leaves the user's own out). The
    // laptop's message, whose echo the device's queue holds, is written
    // by the pass in its place: after the pass's later messages, client-lib
    // drops one more than 256 seqs behind.
    const BACKLOG: usize = 300;
    const LIVE: usize = 1_100;
    let away = away_bob(BACKLOG).await;
    let (server, carol) = (&away.server, &away.carol);
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let (from_alice, from_carol, bob_id) = (away.from_alice, away.from_carol, away.bob_id);
    let mut seen = SeqsSeen::default();
    let mut buf = BytesMut::new();
    let (_bob, _control, mut messages, mut messages_recv) =
        away.slow_device(&mut seen, &mut buf).await;
    send_texts(carol, from_carol, LIVE / 2).await;
    let own = Frame::new(
        1,
        Body::Send(proto::Send {
            conversation_id: from_carol,
            client_msg_id: "bob-1".into(),
            r#type: proto::MessageType::Text as i32,
            text: "in the middle".into(),
            media_id: String::new(),
            reply_to_seq: 0,
        }),
    );
    messages.write_all(&frames(&[own])).await.unwrap();
    // Stored before Carol sends on (its SendAck waits behind catch-up).
    let stored = (BACKLOG + LIVE / 2 + 1) as f64;
    scrape_until(metrics, "bob's send stored", |m| {
        value(m, "chat_send_acks_total") >= stored
    })
    .await;
    let (laptop, _laptop_events) = Client::login(server.client_config(), &away.bob_name, PASSWORD)
        .await
        .unwrap();
    let from_laptop = laptop
        .send_text(from_carol, "from the laptop")
        .await
        .unwrap();
    send_texts(carol, from_carol, LIVE - LIVE / 2).await;

    // Everything of Alice's and Carol's, Bob's SendAck and his laptop's
    // message.
    let mut own_seq = None;
    let mut own_delivered = Vec::new();
    let mut in_carols = Vec::new();
    let done = |seen: &SeqsSeen, own_seq: Option<u64>, own_delivered: &[u64]| {
        own_seq.is_some()
            && own_delivered.contains(&from_laptop.seq)
            && seen.get(&from_alice).map_or(0, Vec::len) >= BACKLOG
            && seen.get(&from_carol).map_or(0, Vec::len) >= LIVE
    };
    while !done(&seen, own_seq, &own_delivered) {
        match next_frame(&mut messages_recv, &mut buf).await.body {
            Some(Body::Deliver(d)) => {
                let m = d.message.expect("a message");
                if m.conversation_id == from_carol {
                    in_carols.push(m.seq);
                }
                if m.sender_id == bob_id {
                    own_delivered.push(m.seq);
                } else {
                    seen.entry(m.conversation_id).or_default().push(m.seq);
                }
            }
            Some(Body::SendAck(ack)) => own_seq = Some(ack.seq),
            other => panic!("a Deliver or SendAck, not {other:?}"),
        }
    }
    let own_seq = own_seq.unwrap();
    let carols = &seen[&from_carol];
    assert!(
        carols.first() < Some(&own_seq) && carols.last() > Some(&from_laptop.seq),
        "Bob's messages in the middle of Carol's"
    );
    assert!(
        value(&scrape(metrics).await, "chat_catch_up_repeats_total") >= 1.0,
        "the live messages overflowed during catch-up"
    );
    assert_eq!(
        own_delivered,
        [from_laptop.seq],
        "the laptop's message once, never the device's own"
    );
    assert!(
        in_carols.is_sorted(),
        "the conversation in seq order, the laptop's message in its place"
    );
    laptop.close();
}

#[tokio::test]
async fn a_slow_catch_up_brings_everything_though_another_device_acked_it() {
    // As above, but Bob's phone is online meanwhile and acks what it gets.
    // Catch-up read each page of the backlog from Bob's delivered
    // watermark as it was then, and its next pass too: the phone had moved
    // it past the backlog's later pages and past Carol's live messages the
    // queue let go, and the slow device never got them. Now catch-up reads
    // past its first page from where each conversation stood when it
    // began, and the queue names what it let go for the next pass to read
    // from history.
    const BACKLOG: usize = 400;
    const LIVE: usize = 1_100;
    let away = away_bob(BACKLOG).await;
    let (server, carol, token) = (&away.server, &away.carol, &away.token);
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let (from_alice, from_carol, bob_id) = (away.from_alice, away.from_carol, away.bob_id);
    // The slow device is catching up (its first page does not fit the
    // window) while the phone reads everything and acks it.
    let mut seen = SeqsSeen::default();
    let mut buf = BytesMut::new();
    let (slow, _control, _messages, mut messages_recv) =
        away.slow_device(&mut seen, &mut buf).await;
    let (phone, mut phone_events) = Client::resume(server.client_config(), token).await.unwrap();
    messages(&mut phone_events, BACKLOG).await;
    let sent = send_texts(carol, from_carol, LIVE).await;
    messages(&mut phone_events, LIVE).await;
    wait_delivered(carol, from_carol, bob_id, *sent.last().unwrap()).await;
    assert!(phone.is_connected());

    let wanted = [(from_alice, BACKLOG), (from_carol, LIVE)];
    read_until(&mut messages_recv, &mut buf, &mut seen, &wanted).await;
    assert_eq!(seen[&from_carol], sent, "every live message once, in order");
    assert_eq!(
        seen[&from_alice],
        (1..=BACKLOG as u64).collect::<Vec<_>>(),
        "the backlog once, in order"
    );
    assert!(
        slow.conn.close_reason().is_none(),
        "the slow device stays connected"
    );
    assert!(
        value(&scrape(metrics).await, "chat_catch_up_repeats_total") >= 1.0,
        "the live messages overflowed during catch-up"
    );
}

#[tokio::test]
async fn messages_held_for_a_device_come_though_another_device_acked_some() {
    // Carol's twelve reach Bob's second device before it opens its
    // messages stream, so its queue holds them; his phone acks ten of
    // them meanwhile. Its catch-up wrote the last two from history and
    // the writer then dropped all twelve queued copies (it keeps each
    // conversation in seq order): the device never got the first ten.
    let server = TestServer::start().await;
    let (carol, _ec) = register(server.client_config(), &name("carol")).await;
    let mut config = server.client_config();
    config.delivery_acks = chat_client::DeliveryAcks::Manual;
    let (phone, mut phone_events) = register(config, &name("bob")).await;
    let bob_id = phone.identity().user_id;
    let conversation = befriend(&carol, &phone).await;
    let device = Raw::connect(&server).await;
    let _control = device
        .log_in(Body::Authenticate(proto::Authenticate {
            token: phone.identity().token,
            background: false,
        }))
        .await;
    let sent = send_texts(&carol, conversation, 12).await;
    assert_eq!(messages(&mut phone_events, 12).await.len(), 12);
    phone.ack_delivery(conversation, sent[9]);
    wait_delivered(&carol, conversation, bob_id, sent[9]).await;

    let (_messages, mut recv) = device.stream(&frames(&[Frame::open_messages(false)])).await;
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    while got.len() < sent.len() {
        got.push(next_delivered(&mut recv, &mut buf).await.seq);
    }
    assert_eq!(got, sent, "every message once, in order");
}

#[tokio::test]
async fn a_member_removed_and_added_again_is_not_caught_up_on_what_came_between() {
    // Bob's second device holds the group's messages from before his
    // removal (it has not opened its messages stream); his phone acks up
    // to the message that added him again. Catch-up reads a conversation
    // with messages held from below them: from history, which does not
    // know memberships, it sent the two messages posted while Bob was out.
    let server = TestServer::start().await;
    let (carol, _ec) = register(server.client_config(), &name("carol")).await;
    let mut config = server.client_config();
    config.delivery_acks = chat_client::DeliveryAcks::Manual;
    let (phone, mut phone_events) = register(config, &name("bob")).await;
    let bob_id = phone.identity().user_id;
    befriend(&carol, &phone).await;
    let device = Raw::connect(&server).await;
    let _control = device
        .log_in(Body::Authenticate(proto::Authenticate {
            token: phone.identity().token,
            background: false,
        }))
        .await;
    let group = carol
        .create_group("g", &[bob_id])
        .await
        .unwrap()
        .conversation_id;
    carol.send_text(group, "before").await.unwrap();
    carol.remove_member(group, bob_id).await.unwrap();
    let between = send_texts(&carol, group, 2).await;
    carol.add_members(group, &[bob_id]).await.unwrap();
    let after = carol.send_text(group, "after").await.unwrap().seq;
    // The phone has: created, "before", removed, added, "after".
    let got = messages(&mut phone_events, 5).await;
    let added = got[3].seq;
    phone.ack_delivery(group, added);
    wait_delivered(&carol, group, bob_id, added).await;

    let (_messages, mut recv) = device.stream(&frames(&[Frame::open_messages(false)])).await;
    let mut buf = BytesMut::new();
    let mut seen = Vec::new();
    while !seen.contains(&after) {
        let m = next_delivered(&mut recv, &mut buf).await;
        if m.conversation_id == group {
            seen.push(m.seq);
        }
    }
    assert!(
        !seen.iter().any(|s| between.contains(s)),
        "sent {seen:?}, which has {between:?} from while Bob was out"
    );
}

#[tokio::test]
async fn a_finished_messages_stream_is_answered_with_acks_stored_and_the_end() {
    // A client leaving gracefully (a third-party one, on the wire) finishes
    // its messages stream after its last DeliveryAck; once that ack is
    // stored the server writes AcksStored, the one frame that confirms
    // (an end alone does not: a writer that gives up ends its stream too),
    // and ends its side. By the confirmation the watermark has moved.
    leave_on_the_wire(true).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_its_messages_stream_is_disconnected() {
    // Bob (on the wire) stops the server's side of his messages stream.
    // The server's writer used to end quietly and leave the connection
    // up: Bob looked online, his sends would be stored, and his SendAcks
    // and Delivers queued for nobody. Now the connection closes with
    // BAD_STREAM (a reconnecting client gets new streams).
    let server = TestServer::start().await;
    let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, bob_events) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let token = bob.identity().token;
    drop((bob, bob_events));
    let device = RawControl::resume(&server, &token).await;
    let (_send, mut recv) = device.open_messages(false).await;
    recv.stop(0u32.into()).unwrap();
    // Messages for Bob until a write meets the stop (the first may be
    // written before the server hears of it).
    let closed = async {
        loop {
            tokio::select! {
                reason = device.conn().closed() => return reason,
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    alice.send_text(conversation, "are you there?").await.unwrap();
                }
            }
        }
    };
    let reason = tokio::time::timeout(WAIT, closed)
        .await
        .expect("the connection is closed");
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(ErrorCode::BadStream as u32)),
        "{reason:?}"
    );
}

#[tokio::test]
async fn a_client_that_does_not_ask_for_acks_stored_gets_the_end_alone() {
    // A client from before AcksStored does not know the frame (it would
    // close the connection on it) and takes the end as the answer: it gets
    // the end alone, once its ack is stored.
    leave_on_the_wire(false).await;
}

/// Bob acks Alice's message on the wire, finishes his messages stream
/// (opened with `confirm_leave` as given), and reads the server's side to
/// its end: AcksStored then the end if he asked for it, else the end
/// alone, and by then Alice sees the watermark moved, with no waiting.
async fn leave_on_the_wire(confirm_leave: bool) {
    let server = TestServer::start().await;
    let OfflineBob {
        alice,
        alice_events: _alice_events,
        conversation,
        bob_id,
        token,
        ack,
    } = hello_for_offline_bob(&server).await;

    let raw = Raw::connect(&server).await;
    let (_control, mut control_recv) = raw
        .stream(&frames(&[
            Frame::open_stream(StreamKind::Control),
            Frame::new(
                1,
                Body::Authenticate(proto::Authenticate {
                    token,
                    background: false,
                }),
            ),
        ]))
        .await;
    let mut buf = BytesMut::new();
    let reply = next_frame(&mut control_recv, &mut buf).await;
    assert!(
        matches!(&reply.body, Some(Body::AuthOk(ok)) if ok.confirms_leave),
        "{reply:?}"
    );
    let (mut send, mut recv) = raw
        .stream(&frames(&[Frame::open_messages(confirm_leave)]))
        .await;
    let mut buf = BytesMut::new();
    let delivered = next_frame(&mut recv, &mut buf).await;
    assert!(
        matches!(&delivered.body, Some(Body::Deliver(d)) if d.message.as_ref().unwrap().seq == ack.seq),
        "{delivered:?}"
    );
    send.write_all(&frames(&[Frame::push(Body::DeliveryAck(
        proto::DeliveryAck {
            conversation_id: conversation,
            seq: ack.seq,
        },
    ))]))
    .await
    .unwrap();
    send.finish().unwrap();
    if confirm_leave {
        let confirmed = next_frame(&mut recv, &mut buf).await;
        assert!(
            matches!(confirmed.body, Some(Body::AcksStored(_))) && confirmed.request_id == 0,
            "{confirmed:?}"
        );
    }
    let rest = tokio::time::timeout(WAIT, recv.read_to_end(1 << 20))
        .await
        .expect("the server ends its side")
        .expect("cleanly");
    assert!(buf.is_empty() && rest.is_empty(), "nothing else was owed");
    let view = alice.conversation(conversation).await.unwrap();
    let bob_view = view.members.iter().find(|m| m.user_id == bob_id).unwrap();
    assert_eq!(bob_view.delivered_seq, ack.seq, "stored before the end");
}

#[tokio::test]
async fn a_flood_of_marks_that_move_nothing_costs_one_lookup_per_batch() {
    // Each MarkSeen that moves no watermark asks the store whether its
    // sender is a member; 1,000 of them in one burst used to make 1,000
    // lookups, queued in front of everyone else's store work. (Below the
    // session queue's 1,024 frames: this client reads its replies only
    // after writing every mark. No mark rate: this many at once would
    // reach its burst.)
    let server = TestServer::start_with(unlimited_marks).await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let (raw, _control, _control_recv) = Raw::authenticated(&server).await;
    const N: u64 = 1_000;
    let mut list = vec![Frame::open_stream(StreamKind::Receipts)];
    list.extend((1..=N).map(|request_id| {
        Frame::new(
            request_id,
            Body::MarkSeen(proto::MarkSeen {
                conversation_id: 999_999,
                seq: 1,
            }),
        )
    }));
    let (_send, mut recv) = raw.stream(&frames(&list)).await;
    let mut buf = BytesMut::new();
    for _ in 0..N {
        let reply = next_frame(&mut recv, &mut buf).await;
        match reply.body {
            Some(Body::Error(e)) => assert_eq!(ErrorCode::from_wire(e.code), ErrorCode::NotAMember),
            other => panic!("NOT_A_MEMBER for every mark, got {other:?}"),
        }
    }
    let lookups: f64 = scrape(metrics)
        .await
        .iter()
        .filter(|(key, _)| {
            key.starts_with("chat_store_operation_duration_seconds_count")
                && key.contains("operation=\"is_member\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert!(lookups >= 1.0, "the store was asked");
    assert!(
        lookups <= (N / 10) as f64,
        "{lookups} lookups for {N} marks"
    );
}

/// Typing is passed on only within one's conversations, and past the
/// user's typing burst it is refused RATE_LIMITED before the store is
/// asked; each refusal carries its request id (those the store refused
/// may come after later ones: a task of their own passes them on), and
/// the connection goes on.
#[tokio::test]
async fn typing_outside_ones_conversations_and_past_the_burst_is_refused() {
    let server = TestServer::start().await;
    let (raw, mut control, mut control_recv) = Raw::authenticated(&server).await;
    // 40 at once: with a burst of 10 refilling at 2 a second, none would
    // be refused only if answering them took 15 s.
    const N: u64 = 40;
    let mut list = vec![Frame::open_stream(StreamKind::Receipts)];
    list.extend((1..=N).map(|request_id| {
        Frame::new(
            request_id,
            Body::Typing(proto::Typing {
                conversation_id: 999_999,
                typing: true,
            }),
        )
    }));
    let (_send, mut recv) = raw.stream(&frames(&list)).await;
    let mut buf = BytesMut::new();
    let (mut limited, mut refused) = (0, 0);
    let mut answered = std::collections::BTreeSet::new();
    for _ in 1..=N {
        let reply = next_frame(&mut recv, &mut buf).await;
        assert!(answered.insert(reply.request_id), "once each: {reply:?}");
        let Some(Body::Error(e)) = reply.body else {
            panic!("an error for every Typing, got {reply:?}");
        };
        match ErrorCode::from_wire(e.code) {
            ErrorCode::RateLimited => limited += 1,
            ErrorCode::NotAMember => refused += 1,
            other => panic!("NOT_A_MEMBER or RATE_LIMITED, got {other}"),
        }
    }
    assert_eq!(answered, (1..=N).collect(), "every one answered");
    assert!(refused >= 10, "the burst reached the store: {refused}");
    assert!(limited > 0, "{refused} of {N} reached the store");
    // Still served.
    let mut out = BytesMut::new();
    chat_protocol::encode(
        &Frame::new(1, Body::ListFriends(proto::ListFriends {})),
        &mut out,
    );
    control.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let reply = loop {
        let frame = next_frame(&mut control_recv, &mut buf).await;
        if frame.request_id == 1 {
            break frame;
        }
    };
    assert!(matches!(reply.body, Some(Body::FriendList(_))), "{reply:?}");
}

/// Marks for a different conversation each cannot share a membership
/// lookup, so past the user's mark burst they are refused RATE_LIMITED
/// before they reach the store.
#[tokio::test]
async fn a_flood_of_marks_past_the_burst_is_rate_limited() {
    let server = TestServer::start().await;
    let (raw, _control, _control_recv) = Raw::authenticated(&server).await;
    // Refilling at mark-rate (100) while they are answered, so three times
    // the burst: 20 s at the rate before none would be refused.
    let burst = u64::from(chat_server::Config::default().limits.mark_burst);
    let n = 3 * burst;
    let mut list = vec![Frame::open_stream(StreamKind::Receipts)];
    list.extend((1..=n).map(|request_id| {
        Frame::new(
            request_id,
            Body::MarkSeen(proto::MarkSeen {
                conversation_id: 1_000_000 + request_id,
                seq: 1,
            }),
        )
    }));
    let (mut send, mut recv) = raw.conn.open_bi().await.unwrap();
    // Written beside the reads: the answers must be read as they come.
    let bytes = frames(&list);
    let writer = tokio::spawn(async move {
        send.write_all(&bytes).await.unwrap();
        send
    });
    let mut buf = BytesMut::new();
    let (mut limited, mut looked_up) = (0, 0);
    for _ in 0..n {
        let reply = next_frame(&mut recv, &mut buf).await;
        let Some(Body::Error(e)) = reply.body else {
            panic!("an error for every mark, got {reply:?}");
        };
        match ErrorCode::from_wire(e.code) {
            ErrorCode::RateLimited => {
                assert!(e.retry_after_ms > 0, "with a retry-after");
                limited += 1;
            }
            ErrorCode::NotAMember => looked_up += 1,
            other => panic!("NOT_A_MEMBER or RATE_LIMITED, got {other}"),
        }
    }
    let _send = writer.await.unwrap();
    assert!(limited > 0, "none refused of {n}");
    assert!(looked_up >= burst, "the burst went through: {looked_up}");
}

#[tokio::test]
async fn a_login_to_a_server_that_grants_no_data_streams_times_out() {
    // The fake node answers the login on the control stream but lets the
    // client open no other stream: opening the messages stream used to wait
    // forever, with keep-alives holding the connection up.
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, ca) = fake_server(dir.path(), 1).await;
    let addr = endpoint.local_addr().unwrap();
    let serve = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let _streams = fake_login(&conn).await.expect("a login");
        conn.closed().await
    });
    let mut config = client_config(addr, &ca);
    config.request_timeout = Duration::from_secs(2);
    let result = tokio::time::timeout(WAIT, Client::register(config, "fake", PASSWORD))
        .await
        .expect("the login ends within its request timeout");
    assert!(
        matches!(result, Err(chat_client::ClientError::Timeout)),
        "{:?}",
        result.map(|_| ())
    );
    let closed = tokio::time::timeout(WAIT, serve)
        .await
        .expect("the client closed")
        .unwrap();
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "{closed:?}"
    );
}

#[tokio::test]
async fn a_group_creation_whose_answer_is_lost_is_asked_again_with_its_key() {
    // The fake node drops the connection on the first CreateGroup, as a
    // node would whose answer is lost, and answers the second. client-lib
    // must ask again by itself, with the same key, so that a node that had
    // created the group answers it instead of making a second one.
    let (_dir, endpoint, config) = fake_node().await;
    let serve = tokio::spawn(async move {
        let mut keys = Vec::new();
        while keys.len() < 2 {
            let conn = endpoint.accept().await.unwrap().await.unwrap();
            let Some((mut send, mut recv)) = fake_login(&conn).await else {
                continue;
            };
            let mut buf = BytesMut::new();
            let (request_id, create) = loop {
                let frame = next_frame(&mut recv, &mut buf).await;
                if let Some(Body::CreateGroup(create)) = frame.body {
                    break (frame.request_id, create);
                }
            };
            keys.push(create.client_key.clone());
            if keys.len() == 1 {
                conn.close((ErrorCode::Unavailable as u32).into(), b"lost");
                continue;
            }
            let info = proto::ConversationInfo {
                conversation_id: 77,
                kind: proto::ConversationKind::Group as i32,
                name: create.name,
                last_seq: 1,
                ..Default::default()
            };
            let reply = Frame::new(request_id, Body::Conversation(info));
            send.write_all(&frames(&[reply])).await.unwrap();
            // Held open until the client has read the answer.
            let _ = tokio::time::timeout(WAIT, conn.closed()).await;
        }
        keys
    });
    let (client, _events) = register_fake(config).await;
    let info = client
        .create_group("trip", &[2, 3])
        .await
        .expect("answered on the second connection");
    assert_eq!(info.conversation_id, 77);
    client.close();
    let keys = serve.await.unwrap();
    assert!(!keys[0].is_empty(), "the request carries a key");
    assert_eq!(keys[0], keys[1], "asked again with the same key");
}

/// A group change's kind and idempotency key.
fn change_key(body: &Body) -> Option<(&'static str, String)> {
    match body {
        Body::RenameGroup(r) => Some(("rename", r.client_key.clone())),
        Body::AddMembers(a) => Some(("add", a.client_key.clone())),
        Body::RemoveMember(r) => Some(("remove", r.client_key.clone())),
        Body::SetAdmin(a) => Some(("admin", a.client_key.clone())),
        Body::LeaveGroup(l) => Some(("leave", l.client_key.clone())),
        _ => None,
    }
}

#[tokio::test]
async fn group_changes_whose_answers_are_lost_are_asked_again_with_their_keys() {
    // As for creation: the fake node drops the connection on the first
    // request of each change, as a node would whose answer is lost, and
    // answers its repeat. Without keys a repeated removal was refused
    // (the member was gone) and a repeated rename renamed twice.
    const CHANGES: usize = 5;
    let (_dir, endpoint, config) = fake_node().await;
    let serve = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < 2 * CHANGES {
            let conn = endpoint.accept().await.unwrap().await.unwrap();
            let Some((mut send, mut recv)) = fake_login(&conn).await else {
                continue;
            };
            let mut buf = BytesMut::new();
            while seen.len() < 2 * CHANGES {
                let frame = next_frame(&mut recv, &mut buf).await;
                let Some(change) = frame.body.as_ref().and_then(change_key) else {
                    continue;
                };
                seen.push(change);
                if seen.len() % 2 == 1 {
                    conn.close((ErrorCode::Unavailable as u32).into(), b"lost");
                    break;
                }
                let ok = Frame::new(frame.request_id, Body::Ok(proto::Ok {}));
                send.write_all(&frames(&[ok])).await.unwrap();
            }
            if seen.len() == 2 * CHANGES {
                // Held open until the client has read the last answer.
                let _ = tokio::time::timeout(WAIT, conn.closed()).await;
            }
        }
        seen
    });
    let (client, _events) = register_fake(config).await;
    client.rename_group(77, "trip 2").await.expect("rename");
    client.add_members(77, &[2]).await.expect("add");
    client.remove_member(77, 2).await.expect("remove");
    client.set_admin(77, 3, true).await.expect("admin");
    client.leave_group(77).await.expect("leave");
    client.close();
    let seen = serve.await.unwrap();
    let kinds: Vec<&str> = seen.iter().map(|(kind, _)| *kind).collect();
    assert_eq!(
        kinds,
        [
            "rename", "rename", "add", "add", "remove", "remove", "admin", "admin", "leave",
            "leave"
        ]
    );
    for pair in seen.chunks(2) {
        assert!(!pair[0].1.is_empty(), "{pair:?} carries a key");
        assert_eq!(
            pair[0].1, pair[1].1,
            "{pair:?}: asked again with the same key"
        );
    }
    let mut keys: Vec<&String> = seen.iter().map(|(_, key)| key).collect();
    keys.dedup();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), CHANGES, "each change has a key of its own");
}

#[tokio::test]
async fn client_state_holds_only_what_the_app_asked_about() {
    // client-lib keeps presence and receipt watermarks for its queries; a
    // server that names anyone else (a stale subscription, a bug, a
    // hostile node) must not grow them. Events still reach the app.
    let (_dir, endpoint, config) = fake_node().await;
    let serve = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = fake_login(&conn).await.expect("a login");
        let mut buf = BytesMut::new();
        let state = |user_id, online| proto::PresenceState {
            user_id,
            online,
            last_active_ms: 1,
            ..Default::default()
        };
        let receipt = |conversation_id, user_id, seq| {
            Frame::push(Body::Receipt(proto::Receipt {
                conversation_id,
                user_id,
                delivered_seq: seq,
                seen_seq: seq,
            }))
        };
        let mut answered = 0;
        while answered < 2 {
            let frame = next_frame(&mut recv, &mut buf).await;
            let reply = match frame.body {
                Some(Body::SubscribePresence(_)) => {
                    Body::PresenceSnapshot(proto::PresenceSnapshot {
                        states: vec![state(5, false), state(8, true)],
                    })
                }
                Some(Body::GetConversation(g)) => Body::Conversation(proto::ConversationInfo {
                    conversation_id: g.conversation_id,
                    kind: proto::ConversationKind::Group as i32,
                    members: [1, 5]
                        .map(|user_id| proto::Member {
                            user_id,
                            ..Default::default()
                        })
                        .to_vec(),
                    last_seq: 4,
                    ..Default::default()
                }),
                _ => continue,
            };
            answered += 1;
            send.write_all(&frames(&[Frame::new(frame.request_id, reply)]))
                .await
                .unwrap();
        }
        let pushes = [
            Frame::push(Body::PresenceUpdate(proto::PresenceUpdate {
                states: vec![state(6, true), state(5, true), state(7, true)],
            })),
            receipt(900, 5, 3),
            receipt(77, 9, 2),
            receipt(77, 5, 4),
        ];
        send.write_all(&frames(&pushes)).await.unwrap();
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
    });
    let (client, mut events) = register_fake(config).await;
    let snapshot = client.subscribe_presence(&[5]).await.unwrap();
    assert_eq!(
        snapshot.iter().map(|s| s.user_id).collect::<Vec<_>>(),
        [5],
        "a snapshot names only the users asked for"
    );
    client.conversation(77).await.unwrap();
    let mut presence = Vec::new();
    let mut receipts = Vec::new();
    while receipts.len() < 3 {
        match tokio::time::timeout(WAIT, events.next()).await {
            Ok(Some(Event::Presence(state))) => presence.push(state.user_id),
            Ok(Some(Event::Receipt(r))) => receipts.push((r.conversation_id, r.user_id)),
            Ok(Some(_)) => {}
            other => panic!("the pushes arrive: {other:?}"),
        }
    }
    assert_eq!(
        presence,
        [5],
        "only the watched user's state reaches the app"
    );
    assert_eq!(receipts, [(900, 5), (77, 9), (77, 5)], "every receipt does");
    assert!(client.presence(5).unwrap().online);
    assert_eq!(client.presence(6), None);
    assert_eq!(client.presence(7), None);
    assert_eq!(client.presence(8), None);
    assert_eq!(
        client.receipt_status(900, 3),
        None,
        "a conversation the app never asked about is not kept"
    );
    // Bob (5) from the conversation reply, 9 who joined since.
    let status = client.receipt_status(77, 4).unwrap();
    assert_eq!((status.members, status.delivered, status.seen), (2, 1, 1));
    client.close();
    serve.await.unwrap();
}

#[tokio::test]
async fn thousands_of_pipelined_marks_are_all_answered() {
    // A client that pipelines many MarkSeen (an app marking every
    // conversation seen after a long time offline) and reads the replies
    // as they come is not a slow consumer. The watermark committer used to
    // answer a whole batch (up to 4,096 marks) at once, overflowing the
    // stream's 1,024-frame queue, and the node closed the connection with
    // SLOW_CONSUMER. (No mark rate: past it the answers would be
    // RATE_LIMITED, as a_flood_of_marks_past_the_burst_is_rate_limited
    // checks.)
    let server = TestServer::start_with(unlimited_marks).await;
    let (raw, _control, _control_recv) = Raw::authenticated(&server).await;
    const N: u64 = 6_000;
    let (mut send, mut recv) = raw
        .stream(&frames(&[Frame::open_stream(StreamKind::Receipts)]))
        .await;
    let marks: Vec<Frame> = (1..=N)
        .map(|request_id| {
            Frame::new(
                request_id,
                Body::MarkSeen(proto::MarkSeen {
                    conversation_id: 999_999,
                    seq: 1,
                }),
            )
        })
        .collect();
    let writer = tokio::spawn(async move {
        send.write_all(&frames(&marks)).await.unwrap();
        send
    });
    let mut buf = BytesMut::new();
    let mut answered = std::collections::HashSet::new();
    while (answered.len() as u64) < N {
        let reply = next_frame(&mut recv, &mut buf).await;
        match reply.body {
            Some(Body::Error(e)) => {
                assert_eq!(ErrorCode::from_wire(e.code), ErrorCode::NotAMember, "{e:?}")
            }
            other => panic!("NOT_A_MEMBER for every mark, got {other:?}"),
        }
        assert!(answered.insert(reply.request_id), "answered twice");
    }
    let _send = writer.await.unwrap();
    assert!(
        raw.conn.close_reason().is_none(),
        "{:?}",
        raw.conn.close_reason()
    );
}

/// A server with `write_stall`, where Alice (returned with her events)
/// sent Bob, away, `n` texts of 15,000 bytes; and Bob's name.
async fn long_texts_for_bob(write_stall: Duration, n: usize) -> (TestServer, Member, String) {
    let server = TestServer::start_with(|c| {
        c.transport.write_stall = write_stall;
        unlimited_sends(c);
    })
    .await;
    let alice = register(server.client_config(), &name("alice")).await;
    let bob_name = name("bob");
    let (bob, _bob_events) = register(server.client_config(), &bob_name).await;
    let conversation = befriend(&alice.0, &bob).await;
    bob.close();
    for i in 0..n {
        let text = format!("{i}{}", "x".repeat(14_999));
        alice.0.send_text(conversation, &text).await.unwrap();
    }
    (server, alice, bob_name)
}

#[tokio::test]
async fn a_client_that_stops_reading_its_messages_is_closed_after_the_write_stall() {
    // Bob's device opens its messages stream, then reads nothing: his
    // flow-control window (8 KiB here) shuts with a message still waiting.
    // Nothing else fills his queue, so only the stall timeout (1 s here)
    // ends the writer that waits on him; before it, the writer and the
    // frames it held stayed for the life of the connection.
    let (server, _alice, bob_name) = long_texts_for_bob(Duration::from_secs(1), 4).await;

    let raw = Raw::connect_with_stream_window(&server, 8_192).await;
    let login = Frame::new(
        1,
        Body::Login(proto::Login {
            username: bob_name,
            password: PASSWORD.into(),
            device_name: String::new(),
        }),
    );
    let (_control, mut control_recv) = raw
        .stream(&frames(&[Frame::open_stream(StreamKind::Control), login]))
        .await;
    let reply = next_frame(&mut control_recv, &mut BytesMut::new()).await;
    assert!(matches!(reply.body, Some(Body::AuthOk(_))), "{reply:?}");
    let (_messages, _never_read) = raw
        .stream(&frames(&[Frame::open_stream(StreamKind::Messages)]))
        .await;
    assert_eq!(raw.close_code().await, ErrorCode::SlowConsumer);
}

#[tokio::test]
async fn a_client_trickling_through_its_catch_up_is_closed_before_its_end() {
    // Bob comes back to 20 long texts (~300 KB: a first write of ~270
    // KB) and reads 16 KiB a second (his window is 16 KiB): enough to
    // keep restarting the stall timer (16 KiB per stall, 2 s here), so he
    // held the page, read from history for him alone, for as long as the
    // trickle lasted (hours for a page of maximum-size texts at a few
    // hundred bytes a second). A catch-up write must now be taken within
    // a stall per 64 KiB of it: 10 s for the first here, where the
    // trickle takes ~17 s.
    const TEXTS: usize = 20;
    let (server, _alice, bob_name) = long_texts_for_bob(Duration::from_secs(2), TEXTS).await;

    let raw = Raw::connect_with_stream_window(&server, 16_384).await;
    raw.log_in(Body::Login(proto::Login {
        username: bob_name,
        password: PASSWORD.into(),
        device_name: String::new(),
    }))
    .await;
    let (_messages, mut recv) = raw
        .stream(&frames(&[Frame::open_stream(StreamKind::Messages)]))
        .await;
    let mut buf = BytesMut::new();
    let mut chunk = vec![0u8; 16_384];
    let mut delivered = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "neither closed nor done"
        );
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(None) | Err(_) => break,
        }
        while let Some(frame) = chat_protocol::Codec::default().decode(&mut buf).unwrap() {
            delivered += usize::from(matches!(frame.body, Some(Body::Deliver(_))));
        }
        assert!(
            delivered < TEXTS,
            "the trickle read the whole catch-up: the page was held throughout"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(raw.close_code().await, ErrorCode::SlowConsumer);
}

#[tokio::test]
async fn a_server_that_does_not_read_delivery_acks_is_held_back() {
    // The fake node pushes Deliver frames, each of a conversation of its
    // own so that no two acks coalesce, and never reads the messages
    // stream, whose window it keeps at 4 KiB: the client's acks cannot
    // leave. client-lib used to keep reading and queue every ack in an
    // unbounded channel; now its reader waits once acks of 1,024
    // conversations are waiting, and the node's writes stop at the
    // client's flow-control window.
    const N: u64 = 150_000;
    let dir = tempfile::tempdir().unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(4_096u32.into());
    let (endpoint, ca) = fake_server_with(dir.path(), transport).await;
    let config = client_config(endpoint.local_addr().unwrap(), &ca);
    let serve = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let _control = fake_login(&conn).await.expect("a login");
        let (mut send, _acks_never_read) = conn.accept_bi().await.expect("the messages stream");
        let mut written = 0;
        for chunk in (1..=N).collect::<Vec<_>>().chunks(1_000) {
            let delivers: Vec<Frame> = chunk
                .iter()
                .map(|&conversation_id| {
                    Frame::push(Body::Deliver(proto::Deliver {
                        message: Some(Box::new(proto::Message {
                            conversation_id,
                            seq: 1,
                            message_id: conversation_id,
                            sender_id: 2,
                            text: "x".into(),
                            ..Default::default()
                        })),
                    }))
                })
                .collect();
            let bytes = frames(&delivers);
            let write = send.write_all(&bytes);
            if tokio::time::timeout(Duration::from_secs(3), write)
                .await
                .is_err()
            {
                break;
            }
            written += chunk.len() as u64;
        }
        conn.close(0u32.into(), b"done");
        written
    });
    let (client, mut events) = register_fake(config).await;
    // The app reads every message it gets, so only the acks can hold the
    // reader back.
    let app = tokio::spawn(async move {
        let mut got = 0u64;
        while let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_secs(5), events.next()).await
        {
            if matches!(event, Event::Message(_)) {
                got += 1;
            }
        }
        got
    });
    let written = tokio::time::timeout(WAIT * 2, serve)
        .await
        .expect("the fake node stops writing")
        .unwrap();
    client.close();
    let got = tokio::time::timeout(WAIT, app)
        .await
        .expect("the app's reads end")
        .unwrap();
    assert!(
        got > 1_000,
        "the client read until the acks backed up: {got}"
    );
    assert!(
        written < N,
        "all {N} frames went out: the client kept reading without sending its acks"
    );
}

#[tokio::test]
async fn a_device_is_not_shown_its_own_send_as_a_new_message() {
    // A send whose first connection died after it reached the node: the
    // node stores it and echoes it to the user's other connections, one of
    // which is now this very device, reconnected, its send still in the
    // outbox and about to be answered as a retry. The echo used to reach
    // the app as an incoming message from the user, on top of the send it
    // was already showing. The fake node plays that: it answers the send
    // only after pushing its echo, then a friend's message as a marker.
    let (_dir, endpoint, config) = fake_node().await;
    let serve = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let _control = fake_login(&conn).await.expect("a login");
        let (mut send, mut recv, mut buf, others) =
            accept_stream(&conn, StreamKind::Messages).await;
        let request = next_frame(&mut recv, &mut buf).await;
        let Some(Body::Send(sent)) = request.body else {
            panic!("a Send, not {request:?}");
        };
        let message = |seq: u64, sender_id: u64, client_msg_id: &str, text: &str| {
            Frame::push(Body::Deliver(proto::Deliver {
                message: Some(Box::new(proto::Message {
                    conversation_id: sent.conversation_id,
                    seq,
                    message_id: seq,
                    sender_id,
                    client_msg_id: client_msg_id.into(),
                    text: text.into(),
                    ..Default::default()
                })),
            }))
        };
        let ack = Frame::new(
            request.request_id,
            Body::SendAck(proto::SendAck {
                seq: 1,
                message_id: 1,
                duplicate: true,
                ..Default::default()
            }),
        );
        let echo = message(1, 1, &sent.client_msg_id, &sent.text);
        let marker = message(2, 2, "friend-1", "from a friend");
        send.write_all(&frames(&[echo, ack, marker])).await.unwrap();
        // Until the client has read them all.
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
        drop(others);
    });
    let (client, mut events) = register_fake(config).await;
    let ack = client
        .send_text(5, "hello")
        .await
        .expect("the send is answered");
    assert_eq!(ack.seq, 1);
    let mut shown = Vec::new();
    loop {
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("the friend's message in time")
            .expect("events open");
        if let Event::Message(m) = event {
            shown.push((m.sender_id, m.text.clone()));
            if m.sender_id == 2 {
                break;
            }
        }
    }
    assert_eq!(shown, [(2, "from a friend".to_owned())]);
    client.close();
    serve.await.unwrap();
}

/// One connection of a client leaving through a fake node: logs it in
/// (AuthOk announcing `confirms_leave` or not), pushes `deliver` if given,
/// reads the messages stream to the client's end, answers with
/// `AcksStored` if `confirm`, ends its side, and waits for the client to
/// close. Returns the acks read and whether the client asked for the
/// confirmation.
async fn leave_through_fake_node(
    endpoint: &quinn::Endpoint,
    announce: bool,
    deliver: &[Frame],
    confirm: bool,
) -> (Vec<(u64, u64)>, bool) {
    let conn = tokio::time::timeout(WAIT, endpoint.accept())
        .await
        .expect("a connection in time")
        .unwrap()
        .await
        .unwrap();
    let (mut control, _control_recv, _, auth) = held_login(&conn).await.expect("a login");
    let mut ok = auth_ok(auth.request_id, 0);
    if let Some(Body::AuthOk(ok)) = &mut ok.body {
        ok.confirms_leave = announce;
    }
    control.write_all(&frames(&[ok])).await.unwrap();
    let (mut send, mut recv, mut buf, _others, open) =
        accept_opened(&conn, StreamKind::Messages).await;
    if !deliver.is_empty() {
        send.write_all(&frames(deliver)).await.unwrap();
    }
    let rest = tokio::time::timeout(WAIT, recv.read_to_end(1 << 20))
        .await
        .expect("the client ends its side")
        .unwrap();
    buf.extend_from_slice(&rest);
    let mut acks = Vec::new();
    while let Some(frame) = chat_protocol::Codec::default().decode(&mut buf).unwrap() {
        if let Some(Body::DeliveryAck(ack)) = frame.body {
            acks.push((ack.conversation_id, ack.seq));
        }
    }
    if confirm {
        let stored = Frame::push(Body::AcksStored(proto::AcksStored {}));
        send.write_all(&frames(&[stored])).await.unwrap();
    }
    send.finish().unwrap();
    let _ = tokio::time::timeout(WAIT, conn.closed()).await;
    (acks, open.confirm_leave)
}

/// A message for a client of a fake node, and a client that acks it only
/// when it leaves, having taken it.
async fn took_one_from_fake_node(mut config: chat_client::ClientConfig) -> Client {
    // The ack leaves only with the shutdown's last acks.
    config.delivery_ack_linger = Duration::from_secs(3600);
    let (client, mut events) = register_fake(config).await;
    let event = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("the message in time")
        .expect("events open");
    assert!(
        matches!(event, Event::Message(m) if m.seq == 1),
        "the app took it"
    );
    client
}

fn one_deliver() -> Frame {
    Frame::push(Body::Deliver(proto::Deliver {
        message: Some(Box::new(proto::Message {
            conversation_id: 7,
            seq: 1,
            message_id: 1,
            sender_id: 2,
            text: "hi".into(),
            ..Default::default()
        })),
    }))
}

#[tokio::test]
async fn only_acks_stored_confirms_a_shutdown_not_a_bare_end_of_the_stream() {
    // A server writer that gives up drops its messages stream, and quinn
    // ends a dropped stream cleanly. client-lib used to take any end of
    // that stream while leaving as the confirmation that its last acks
    // were stored, and closed. The fake node, announcing AcksStored, ends
    // its side bare on the first connection: the client must not believe
    // it, but reconnect and write its last ack again; the second
    // connection's AcksStored ends the shutdown.
    let (_dir, endpoint, config) = fake_node().await;
    let node = tokio::spawn(async move {
        let deliver = one_deliver();
        let first = leave_through_fake_node(&endpoint, true, &[deliver], false).await;
        let second = leave_through_fake_node(&endpoint, true, &[], true).await;
        (first, second)
    });
    let client = took_one_from_fake_node(config).await;
    tokio::time::timeout(WAIT, client.shutdown(Duration::from_secs(3600)))
        .await
        .expect("the second connection's AcksStored ends the shutdown");
    let (first, second) = node
        .await
        .expect("a second connection: the bare end confirmed nothing");
    assert_eq!(first, (vec![(7, 1)], true), "asked for the confirmation");
    assert_eq!(
        second,
        (vec![(7, 1)], true),
        "the last ack, written again on the connection made during the shutdown"
    );
}

#[tokio::test]
async fn an_ack_lost_with_its_connection_is_written_again_by_a_shutdown() {
    // The app took (7, 1) and its ack was written to the first connection,
    // which the node then lost without storing it. The client forgot acks
    // once written, so the shutdown that followed sealed an empty set on
    // the second connection, and (had the node redelivered the message) a
    // redelivery after the seal queued nothing: the next client showed the
    // message again. Now a lost connection's acks are queued again for
    // the next connection, and its last acks include them.
    let (_dir, endpoint, mut config) = fake_node().await;
    config.delivery_ack_linger = Duration::from_millis(1);
    let node = tokio::spawn(async move {
        let first = endpoint.accept().await.unwrap().await.unwrap();
        let _control = fake_login(&first).await.expect("a login");
        let (mut send, mut recv, mut buf, _others) =
            accept_stream(&first, StreamKind::Messages).await;
        send.write_all(&frames(&[one_deliver()])).await.unwrap();
        let ack = next_frame(&mut recv, &mut buf).await;
        assert_eq!(
            ack.body,
            Some(Body::DeliveryAck(proto::DeliveryAck {
                conversation_id: 7,
                seq: 1
            })),
            "the app took it"
        );
        // Read, never stored: the connection is lost.
        first.close(0u32.into(), b"gone");
        leave_through_fake_node(&endpoint, true, &[], true).await
    });
    let (client, mut events) = register_fake(config).await;
    let event = tokio::time::timeout(WAIT, events.next())
        .await
        .expect("the message in time")
        .expect("events open");
    assert!(matches!(event, Event::Message(m) if m.seq == 1));
    // Emitted once the lost connection's acks are queued again; the
    // client may be connected again by the time it is read.
    wait_for(&mut events, "the first connection lost", |e| {
        matches!(e, Event::Disconnected { .. }).then_some(())
    })
    .await;
    tokio::time::timeout(WAIT, client.shutdown(Duration::from_secs(3600)))
        .await
        .expect("the second connection's AcksStored ends the shutdown");
    let (acks, _) = node.await.unwrap();
    assert_eq!(
        acks,
        [(7, 1)],
        "the ack lost with the first connection, written again"
    );
}

#[tokio::test]
async fn a_receipt_at_the_top_of_the_seq_range_keeps_the_receipts_reader() {
    // A receipt from a member the client did not know, with both
    // watermarks at u64::MAX: the seq they were taken to have joined at
    // (one past what it covers) overflowed, which in a debug build
    // panicked the receipts reader while it held the receipts lock. No
    // receipt reached the app any more, every mark_seen waited out its
    // timeout, and receipt_status panicked on the poisoned lock.
    let (_dir, endpoint, mut config) = fake_node().await;
    config.request_timeout = Duration::from_secs(3600);
    let (app_has_reply, reply_taken) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut control, mut control_recv) = fake_login(&conn).await.expect("a login");
        let (mut receipts, mut receipts_recv, mut buf, others) =
            accept_stream(&conn, StreamKind::Receipts).await;
        let request = next_frame(&mut control_recv, &mut BytesMut::new()).await;
        assert!(
            matches!(request.body, Some(Body::GetConversation(_))),
            "{request:?}"
        );
        let reply = Frame::new(
            request.request_id,
            Body::Conversation(proto::ConversationInfo {
                conversation_id: 5,
                ..Default::default()
            }),
        );
        control.write_all(&frames(&[reply])).await.unwrap();
        reply_taken.await.expect("the app has the reply");
        let receipt = Frame::push(Body::Receipt(proto::Receipt {
            conversation_id: 5,
            user_id: 2,
            delivered_seq: u64::MAX,
            seen_seq: u64::MAX,
        }));
        receipts.write_all(&frames(&[receipt])).await.unwrap();
        let mark = next_frame(&mut receipts_recv, &mut buf).await;
        assert!(matches!(mark.body, Some(Body::MarkSeen(_))), "{mark:?}");
        let ok = Frame::new(mark.request_id, Body::Ok(proto::Ok {}));
        receipts.write_all(&frames(&[ok])).await.unwrap();
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
        drop(others);
    });
    let (client, mut events) = register_fake(config).await;
    client.conversation(5).await.expect("the reply");
    app_has_reply.send(()).unwrap();
    tokio::time::timeout(WAIT, client.mark_seen(5, 1))
        .await
        .expect("the mark answered: the receipts reader lives")
        .expect("Ok");
    let receipt = loop {
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("the receipt in time")
            .expect("events open");
        if let Event::Receipt(receipt) = event {
            break receipt;
        }
    };
    assert_eq!(receipt.delivered_seq, u64::MAX);
    let status = client.receipt_status(5, 1).expect("asked about");
    assert_eq!(
        status.members, 0,
        "counted from past the receipt, not before"
    );
    client.close();
    serve.await.unwrap();
}

#[tokio::test]
async fn a_reader_whose_connection_closed_hands_nothing_more_to_a_full_queue() {
    // The app's event queue holds one and the app is not taking. The first
    // connection's reader queues A and waits for room to hand over B; the
    // node closes that connection. That reader used to wait on for ever
    // (holding the lock every later reader needs, and its connection),
    // one more such reader with every reconnect, and to hand B over once
    // the app took A, though B's connection was long gone. Now it ends
    // when its connection closes, records nothing (B would come again on
    // the next connection), and the app's next message is the live
    // connection's C.
    let (_dir, endpoint, mut config) = fake_node().await;
    config.event_capacity = 1;
    config.delivery_ack_linger = Duration::from_secs(3600);
    let deliver = |conversation_id: u64| {
        Frame::push(Body::Deliver(proto::Deliver {
            message: Some(Box::new(proto::Message {
                conversation_id,
                seq: 1,
                message_id: conversation_id,
                sender_id: 2,
                text: format!("in {conversation_id}"),
                ..Default::default()
            })),
        }))
    };
    let (c_written, c_was_written) = tokio::sync::oneshot::channel();
    let (a_queued, a_was_queued) = tokio::sync::oneshot::channel::<()>();
    let node = tokio::spawn(async move {
        let first = endpoint.accept().await.unwrap().await.unwrap();
        let _control = fake_login(&first).await.expect("a login");
        let (mut send, _recv, _buf, _others) = accept_stream(&first, StreamKind::Messages).await;
        send.write_all(&frames(&[deliver(1), deliver(2)]))
            .await
            .unwrap();
        send.finish().unwrap();
        // A is in the app's queue, and B with the client (it acknowledged
        // it), before the close.
        let _ = a_was_queued.await;
        let _ = tokio::time::timeout(WAIT, send.stopped()).await;
        first.close(0u32.into(), b"gone");
        let second = tokio::time::timeout(WAIT, endpoint.accept())
            .await
            .expect("a reconnect")
            .unwrap()
            .await
            .unwrap();
        let _control = fake_login(&second).await.expect("a login again");
        let (mut send, _recv, _buf, _others) = accept_stream(&second, StreamKind::Messages).await;
        send.write_all(&frames(&[deliver(3)])).await.unwrap();
        let _ = c_written.send(());
        let _ = tokio::time::timeout(WAIT, second.closed()).await;
    });
    let (client, mut events) = register_fake(config).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while events.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "A never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a_queued.send(()).unwrap();
    let mut next_message = async || loop {
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("a message in time")
            .expect("events open");
        if let Event::Message(m) = event {
            return m.conversation_id;
        }
    };
    // Nothing is taken until the client has seen the first connection
    // close (it made the second) and C is on its way.
    tokio::time::timeout(WAIT, c_was_written)
        .await
        .expect("a second connection in time")
        .expect("the node wrote C");
    assert_eq!(next_message().await, 1);
    assert_eq!(
        next_message().await,
        3,
        "the live connection's message, not one from the closed connection"
    );
    client.close();
    node.abort();
}

#[tokio::test]
async fn a_reconnect_asked_for_while_connecting_keeps_the_new_connection() {
    // Network-change callbacks come in bursts. A second reconnect_now made
    // while the first one's connection was being made left a stored
    // wake-up, which closed that connection as soon as it was up (and the
    // next attempt waited out a doubled backoff). The new connection is
    // what the app asked for: it must stay.
    let (_dir, endpoint, config) = fake_node().await;
    let (held_tx, held) = tokio::sync::oneshot::channel();
    let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
    let node = tokio::spawn(async move {
        let first = endpoint.accept().await.unwrap().await.unwrap();
        let _first_streams = fake_login(&first).await.expect("a login");
        let second = tokio::time::timeout(WAIT, endpoint.accept())
            .await
            .expect("a reconnect")
            .unwrap()
            .await
            .unwrap();
        let (mut control, _recv, _buf, auth) = held_login(&second).await.expect("a login again");
        let _ = held_tx.send(());
        let _ = go.await;
        control
            .write_all(&frames(&[auth_ok(auth.request_id, 0)]))
            .await
            .unwrap();
        // Closed at once if the client took the second request for a new
        // one; a second is plenty to see it.
        tokio::time::timeout(Duration::from_secs(1), second.closed())
            .await
            .is_ok()
    });
    let (client, _events) = register_fake(config).await;
    client.reconnect_now();
    tokio::time::timeout(WAIT, held)
        .await
        .expect("the second login in time")
        .unwrap();
    client.reconnect_now();
    go_tx.send(()).unwrap();
    assert!(
        !node.await.unwrap(),
        "the new connection was closed for a request it answered"
    );
    assert!(client.is_connected());
}

#[tokio::test]
async fn a_redelivery_does_not_wait_on_a_full_event_queue() {
    // The app's queue holds one and is full with X. The node sends X again
    // (a redelivery: the app has it), then the SendAck of the app's send.
    // A redelivery is settled at once, so the SendAck behind it is read
    // and the send answered, app or no app.
    let (_dir, endpoint, mut config) = fake_node().await;
    config.event_capacity = 1;
    let x = Frame::push(Body::Deliver(proto::Deliver {
        message: Some(Box::new(proto::Message {
            conversation_id: 7,
            seq: 1,
            message_id: 1,
            sender_id: 2,
            text: "x".into(),
            ..Default::default()
        })),
    }));
    let node = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let _control = fake_login(&conn).await.expect("a login");
        let (mut send, mut recv, mut buf, _others) =
            accept_stream(&conn, StreamKind::Messages).await;
        let request = next_frame(&mut recv, &mut buf).await;
        let Some(Body::Send(sent)) = request.body else {
            panic!("a Send, not {request:?}");
        };
        let mut ack = first_ack(request.request_id, sent);
        if let Some(Body::SendAck(a)) = &mut ack.body {
            a.conversation_id = 8;
        }
        send.write_all(&frames(&[x.clone(), x, ack])).await.unwrap();
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
    });
    let (client, _events_never_drained) = register_fake(config).await;
    let ack = tokio::time::timeout(WAIT, client.send_text(8, "hello"))
        .await
        .expect("answered behind the redelivery")
        .expect("sent");
    assert_eq!(ack.seq, 1);
    client.close();
    node.abort();
}

#[tokio::test]
async fn a_lower_seq_that_comes_after_higher_ones_reaches_the_app_once() {
    // A message whose batch was reported failed (its commit outcome
    // unknown) and that its sender's retry then found stored is delivered
    // again, after later messages of its conversation, to the members still
    // owed it. The client took anything below the highest seq it had for a
    // redelivery: it dropped it (and acked over it), and the user never saw
    // it. The fake node delivers 2 and 3, then 1 (never delivered), then 1
    // and 3 again (true duplicates), then 4 as a marker.
    let (_dir, endpoint, config) = fake_node().await;
    let node = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let _control = fake_login(&conn).await.expect("a login");
        let (mut send, _recv, _buf, _others) = accept_stream(&conn, StreamKind::Messages).await;
        let deliver = |seq: u64| {
            Frame::push(Body::Deliver(proto::Deliver {
                message: Some(Box::new(proto::Message {
                    conversation_id: 7,
                    seq,
                    message_id: seq,
                    sender_id: 2,
                    text: format!("message {seq}"),
                    ..Default::default()
                })),
            }))
        };
        let pushes: Vec<Frame> = [2, 3, 1, 1, 3, 4].into_iter().map(deliver).collect();
        send.write_all(&frames(&pushes)).await.unwrap();
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
    });
    let (client, mut events) = register_fake(config).await;
    let mut shown = Vec::new();
    while shown.last() != Some(&4) {
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("the marker in time")
            .expect("events open");
        if let Event::Message(m) = event {
            shown.push(m.seq);
        }
    }
    assert_eq!(shown, [2, 3, 1, 4], "1 once, late; no duplicate");
    client.close();
    node.await.unwrap();
}

#[tokio::test]
async fn no_ack_covers_a_message_still_queued_for_the_app() {
    // The late 1 of conversation 7 is queued behind 2 and 3. The app took
    // 3, whose ack (3 and everything before it) covered 1, still queued:
    // the client then left (or died) before the app took 1, and the
    // server, its watermark past 1, never gave it to the user's next
    // client. Now the last acks hold conversation 8's, not 7's.
    let (_dir, endpoint, mut config) = fake_node().await;
    // The acks leave only with the shutdown's last ones.
    config.delivery_ack_linger = Duration::from_secs(3600);
    let deliver = |conversation_id: u64, seq: u64| {
        Frame::push(Body::Deliver(proto::Deliver {
            message: Some(Box::new(proto::Message {
                conversation_id,
                seq,
                message_id: conversation_id * 100 + seq,
                sender_id: 2,
                text: format!("message {seq}"),
                ..Default::default()
            })),
        }))
    };
    let pushes = [deliver(8, 1), deliver(7, 2), deliver(7, 3), deliver(7, 1)];
    let node =
        tokio::spawn(async move { leave_through_fake_node(&endpoint, true, &pushes, true).await });
    let (client, mut events) = register_fake(config).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while events.len() < 4 {
        assert!(tokio::time::Instant::now() < deadline, "all four queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut taken = Vec::new();
    for _ in 0..3 {
        match events.try_next() {
            Some(Event::Message(m)) => taken.push((m.conversation_id, m.seq)),
            other => panic!("a message, not {other:?}"),
        }
    }
    assert_eq!(taken, [(8, 1), (7, 2), (7, 3)]);
    tokio::time::timeout(WAIT, client.shutdown(Duration::from_secs(3600)))
        .await
        .expect("the node's AcksStored ends the shutdown");
    let (acks, _) = node.await.unwrap();
    assert_eq!(acks, [(8, 1)], "nothing of 7: its 1 is still queued");
}

#[tokio::test]
async fn receipt_events_never_go_back_across_connections() {
    // The node writes the snapshot of watermarks taken when the receipts
    // stream opens before receipts queued earlier, and an old and a new
    // connection's readers can overlap: the app used to see a member's
    // watermark go 7, 5, 7. The fake node sends member 2's receipts out of
    // order, then member 3's as a marker; on the client's next connection,
    // lower and equal ones again, then a marker.
    let receipt = |user_id, delivered_seq, seen_seq| {
        Frame::push(Body::Receipt(proto::Receipt {
            conversation_id: 7,
            user_id,
            delivered_seq,
            seen_seq,
        }))
    };
    let connections = [
        vec![
            receipt(2, 7, 7),
            receipt(2, 5, 5),
            receipt(2, 7, 7),
            receipt(2, 9, 4),
            receipt(2, 8, 8),
            receipt(3, 1, 1),
        ],
        vec![receipt(2, 6, 6), receipt(2, 9, 8), receipt(3, 2, 2)],
    ];
    let (_dir, endpoint, config) = fake_node().await;
    let node = tokio::spawn(async move {
        for pushes in connections {
            let conn = tokio::time::timeout(WAIT, endpoint.accept())
                .await
                .expect("a connection in time")
                .unwrap()
                .await
                .unwrap();
            let _control = fake_login(&conn).await.expect("a login");
            let (mut send, _recv, _buf, _others) = accept_stream(&conn, StreamKind::Receipts).await;
            send.write_all(&frames(&pushes)).await.unwrap();
            let _ = tokio::time::timeout(WAIT, conn.closed()).await;
        }
    });
    let (client, mut events) = register_fake(config).await;
    let mut told = Vec::new();
    for marker in [1, 2] {
        loop {
            let event = tokio::time::timeout(WAIT, events.next())
                .await
                .expect("the marker in time")
                .expect("events open");
            if let Event::Receipt(r) = event {
                if r.user_id == 3 {
                    assert_eq!(r.delivered_seq, marker);
                    break;
                }
                told.push((r.delivered_seq, r.seen_seq));
            }
        }
        if marker == 1 {
            client.reconnect_now();
        }
    }
    assert_eq!(
        told,
        [(7, 7), (9, 7), (9, 8)],
        "only raises, merged (seen not pulled back by a higher delivered)"
    );
    client.close();
    node.await.unwrap();
}

#[tokio::test]
async fn a_reply_this_client_does_not_know_fails_its_request_at_once() {
    // A newer node answering with a body this build has no name for: the
    // request fails there and then, instead of waiting out its timeout
    // (and the connection stays up: the codec skips the body).
    let (_dir, endpoint, mut config) = fake_node().await;
    config.request_timeout = Duration::from_secs(3600);
    let node = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = fake_login(&conn).await.expect("a login");
        let mut buf = BytesMut::new();
        let request = next_frame(&mut recv, &mut buf).await;
        assert!(
            matches!(request.body, Some(Body::ListFriends(_))),
            "{request:?}"
        );
        // Frame { request_id, field 199: an empty message }.
        let mut body = Vec::new();
        body.push(0x08);
        body.push(request.request_id as u8);
        body.extend_from_slice(&[0xba, 0x0c, 0x00]);
        let mut framed = vec![body.len() as u8];
        framed.extend_from_slice(&body);
        send.write_all(&framed).await.unwrap();
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
    });
    let (client, _events) = register_fake(config).await;
    let answer = tokio::time::timeout(WAIT, client.friends())
        .await
        .expect("answered, not left to time out");
    assert!(
        matches!(answer, Err(chat_client::ClientError::Protocol(_))),
        "{answer:?}"
    );
    assert!(client.is_connected(), "the connection stays up");
    client.close();
    node.abort();
}

#[tokio::test]
async fn a_shutdown_cut_short_still_closes_the_client() {
    // An app that cancels its shutdown (a task cancelled, a timeout
    // around the call) used to leave a zombie: no events, every send
    // refused, yet connected and heartbeating, online to its friends. The
    // fake node never confirms the leave; the app gives up on the
    // shutdown; the node must see the connection closed.
    let (_dir, endpoint, config) = fake_node().await;
    let node = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let _control = fake_login(&conn).await.expect("a login");
        let (_send, mut recv, _buf, _others) = accept_stream(&conn, StreamKind::Messages).await;
        // The client's end of its messages stream (the shutdown is under
        // way, and waits for an answer that never comes), or the close.
        let _ = tokio::time::timeout(WAIT, recv.read_to_end(1 << 20)).await;
        tokio::time::timeout(WAIT, conn.closed()).await.is_ok()
    });
    let (client, _events) = register_fake(config).await;
    // Boxed, so that dropping it below drops the future itself.
    let mut shutdown = Box::pin(client.shutdown(Duration::from_secs(3600)));
    // Polled until the client has ended its messages stream, then dropped.
    tokio::select! {
        () = &mut shutdown => panic!("nothing confirmed the leave"),
        () = tokio::time::sleep(Duration::from_millis(500)) => {}
    }
    drop(shutdown);
    assert!(
        node.await.unwrap(),
        "the connection stayed up after the shutdown was dropped"
    );
}

#[tokio::test]
async fn a_node_that_predates_acks_stored_confirms_a_shutdown_by_its_end() {
    // A node without AcksStored (its AuthOk does not announce
    // confirms_leave) answers a leave with the end of its messages stream
    // alone: a client must take that end as the answer, or it would
    // reconnect until its shutdown timed out.
    let (_dir, endpoint, config) = fake_node().await;
    let node = tokio::spawn(async move {
        let deliver = one_deliver();
        leave_through_fake_node(&endpoint, false, &[deliver], false).await
    });
    let client = took_one_from_fake_node(config).await;
    tokio::time::timeout(WAIT, client.shutdown(Duration::from_secs(3600)))
        .await
        .expect("the end ends the shutdown");
    assert_eq!(node.await.unwrap(), (vec![(7, 1)], true));
}

#[tokio::test]
async fn a_receipt_that_overtakes_the_first_reply_for_a_conversation_is_kept() {
    // Receipts and control replies come on different streams, read apart.
    // A receipt read before the first reply for a conversation used to be
    // dropped (the conversation was not yet one the app asked about), and
    // the reply's older watermark then stood until the member moved again.
    // The fake node sends the receipt, waits until the app has it, and
    // only then replies with the watermark from before it.
    let (_dir, endpoint, config) = fake_node().await;
    let (app_has_receipt, receipt_seen) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut control, mut control_recv) = fake_login(&conn).await.expect("a login");
        let (mut receipts, _receipts_recv, _, others) =
            accept_stream(&conn, StreamKind::Receipts).await;
        let request = next_frame(&mut control_recv, &mut BytesMut::new()).await;
        assert_eq!(
            request.body,
            Some(Body::GetConversation(proto::GetConversation {
                conversation_id: 5
            }))
        );
        let receipt = Frame::push(Body::Receipt(proto::Receipt {
            conversation_id: 5,
            user_id: 2,
            delivered_seq: 6,
            seen_seq: 6,
        }));
        receipts.write_all(&frames(&[receipt])).await.unwrap();
        receipt_seen.await.expect("the app saw the receipt");
        let member = |user_id: u64, seq: u64| proto::Member {
            user_id,
            delivered_seq: seq,
            seen_seq: seq,
            ..Default::default()
        };
        let reply = Frame::new(
            request.request_id,
            Body::Conversation(proto::ConversationInfo {
                conversation_id: 5,
                members: vec![member(1, 6), member(2, 5)],
                last_seq: 6,
                ..Default::default()
            }),
        );
        control.write_all(&frames(&[reply])).await.unwrap();
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
        drop(others);
    });
    let (client, mut events) = register_fake(config).await;
    let asking = tokio::spawn({
        let client = client.clone();
        async move { client.conversation(5).await }
    });
    loop {
        let event = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("the receipt in time")
            .expect("events open");
        if matches!(event, Event::Receipt(_)) {
            break;
        }
    }
    app_has_receipt.send(()).unwrap();
    let info = asking.await.unwrap().expect("the reply");
    assert_eq!(info.members.len(), 2);
    let status = client
        .receipt_status(5, 6)
        .expect("a conversation asked about");
    assert_eq!((status.members, status.delivered, status.seen), (1, 1, 1));
    client.close();
    serve.await.unwrap();
}

#[tokio::test]
async fn a_group_change_in_flight_when_the_app_reconnects_is_asked_again() {
    // `reconnect_now` (a network switch) closes the connection from the
    // client's side. Requests waiting on it used to fail with `Closed`
    // ("client closed or logged out"), which a keyed group change takes
    // as final: a removal the node may have made was reported as failed.
    // Now they fail as a lost connection, and the change is asked again.
    let (_dir, endpoint, config) = fake_node().await;
    let (arrived, first_request) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(async move {
        let mut arrived = Some(arrived);
        let mut keys = Vec::new();
        while keys.len() < 2 {
            let conn = endpoint.accept().await.unwrap().await.unwrap();
            let Some((mut send, mut recv)) = fake_login(&conn).await else {
                continue;
            };
            let mut buf = BytesMut::new();
            let frame = loop {
                let frame = next_frame(&mut recv, &mut buf).await;
                if matches!(frame.body, Some(Body::RemoveMember(_))) {
                    break frame;
                }
            };
            let Some(Body::RemoveMember(remove)) = &frame.body else {
                unreachable!()
            };
            keys.push(remove.client_key.clone());
            if let Some(arrived) = arrived.take() {
                // No answer: the client drops this connection itself.
                arrived.send(()).unwrap();
                let _ = tokio::time::timeout(WAIT, conn.closed()).await;
                continue;
            }
            let ok = Frame::new(frame.request_id, Body::Ok(proto::Ok {}));
            send.write_all(&frames(&[ok])).await.unwrap();
            let _ = tokio::time::timeout(WAIT, conn.closed()).await;
        }
        keys
    });
    let (client, _events) = register_fake(config).await;
    let removing = tokio::spawn({
        let client = client.clone();
        async move { client.remove_member(77, 2).await }
    });
    tokio::time::timeout(WAIT, first_request)
        .await
        .expect("the removal reached the node")
        .unwrap();
    client.reconnect_now();
    removing
        .await
        .unwrap()
        .expect("answered on the next connection");
    client.close();
    let keys = serve.await.unwrap();
    assert_eq!(keys[0], keys[1], "asked again with the same key");
}

#[tokio::test]
async fn a_client_closed_while_reconnecting_does_not_come_back() {
    // `close()` while the client was logging in again found no connection
    // to close; the login then completed and the connection was installed
    // (up, heartbeating, the user online) until something else ended it.
    // Now the connection is closed as it is installed. The fake node
    // drops the first connection and holds the second login's answer
    // until the app has closed the client.
    let (_dir, endpoint, config) = fake_node().await;
    let (login_held, holding) = tokio::sync::oneshot::channel::<()>();
    let (app_closed, closed) = tokio::sync::oneshot::channel::<()>();
    let (app_registered, registered) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let _control = fake_login(&conn).await.expect("a login");
        registered.await.unwrap();
        conn.close((ErrorCode::Unavailable as u32).into(), b"lost");
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, _recv, _, auth) = held_login(&conn).await.expect("a login");
        login_held.send(()).unwrap();
        closed.await.unwrap();
        let ok = auth_ok(auth.request_id, 0);
        send.write_all(&frames(&[ok])).await.unwrap();
        let mut others = Vec::new();
        let reason = loop {
            tokio::select! {
                stream = conn.accept_bi() => match stream {
                    Ok(stream) => others.push(stream),
                    Err(reason) => break reason,
                },
                reason = conn.closed() => break reason,
            }
        };
        drop(others);
        reason
    });
    let (client, _events) = register_fake(config).await;
    app_registered.send(()).unwrap();
    tokio::time::timeout(WAIT, holding)
        .await
        .expect("the client logs in again")
        .unwrap();
    client.close();
    app_closed.send(()).unwrap();
    let reason = tokio::time::timeout(WAIT, serve)
        .await
        .expect("the client ends the new connection")
        .unwrap();
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(&close.reason[..], b"client closed", "{close:?}");
        }
        other => panic!("closed by the client, not {other:?}"),
    }
    assert!(!client.is_connected());
}

#[tokio::test]
async fn a_server_cannot_ask_for_heartbeats_more_than_once_a_second() {
    // The heartbeat interval comes from the server. At 1 ms, with a server
    // that stopped reading the control stream, the client queued a
    // thousand unsendable frames a second; it now keeps to at least 1 s.
    let (_dir, endpoint, config) = fake_node().await;
    let serve = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv, mut buf, auth) = held_login(&conn).await.expect("a login");
        let ok = auth_ok(auth.request_id, 1);
        send.write_all(&frames(&[ok])).await.unwrap();
        let mut heartbeats = 0;
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(frame) = tokio::time::timeout_at(until, next_frame(&mut recv, &mut buf)).await
        {
            if matches!(frame.body, Some(Body::Heartbeat(_))) {
                heartbeats += 1;
            }
        }
        heartbeats
    });
    let (client, _events) = register_fake(config).await;
    let heartbeats = serve.await.unwrap();
    assert!(
        (1..=4).contains(&heartbeats),
        "{heartbeats} heartbeats in 3 s"
    );
    client.close();
}

#[tokio::test]
async fn a_group_change_stops_asking_when_the_session_ends() {
    // A keyed group change waits for the next connection to ask again. If
    // the session ends instead (the reconnect finds the token revoked), it
    // used to wait out its whole budget (three request timeouts, 45 s) and
    // then report a lost connection; now it ends with the session.
    let (_dir, endpoint, config) = fake_node().await;
    let (arrived, first_request) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (_control, mut recv) = fake_login(&conn).await.expect("a login");
        let mut buf = BytesMut::new();
        loop {
            let frame = next_frame(&mut recv, &mut buf).await;
            if matches!(frame.body, Some(Body::RemoveMember(_))) {
                break;
            }
        }
        arrived.send(()).unwrap();
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
        // The reconnect: its token was revoked meanwhile.
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, _recv, _, auth) = held_login(&conn).await.expect("a login");
        let refused = Frame::new(
            auth.request_id,
            Body::Error(proto::Error {
                code: ErrorCode::TokenRevoked as i32,
                message: "revoked".into(),
                retry_after_ms: 0,
            }),
        );
        send.write_all(&frames(&[refused])).await.unwrap();
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
    });
    let (client, _events) = register_fake(config).await;
    let removing = tokio::spawn({
        let client = client.clone();
        async move { client.remove_member(77, 2).await }
    });
    tokio::time::timeout(WAIT, first_request)
        .await
        .expect("the removal reached the node")
        .unwrap();
    client.reconnect_now();
    let result = tokio::time::timeout(Duration::from_secs(20), removing)
        .await
        .expect("the change ends with the session, not after its whole budget")
        .unwrap();
    assert!(
        matches!(result, Err(chat_client::ClientError::Closed)),
        "{result:?}"
    );
    client.close();
    serve.abort();
}

#[tokio::test]
async fn a_presence_update_that_overtook_its_snapshot_is_the_one_kept() {
    // The server read user 7 online for the snapshot; 7 went offline
    // before the reply was queued, and the notifier's update came first.
    // The client let the snapshot overwrite it, and the server, having
    // sent "offline", never corrected it: 7 showed online for good. The
    // numbers (the update's 8 against the snapshot's 5) say which is newer;
    // after a reconnect they start over.
    let (_dir, endpoint, config) = fake_node().await;
    let serve = tokio::spawn(async move {
        for round in 0..2 {
            let conn = endpoint.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = fake_login(&conn).await.expect("a login");
            let mut buf = BytesMut::new();
            let request_id = loop {
                let frame = next_frame(&mut recv, &mut buf).await;
                if let Some(Body::SubscribePresence(s)) = frame.body {
                    assert_eq!(s.user_ids, [7]);
                    break frame.request_id;
                }
            };
            let state = |online, version| proto::PresenceState {
                user_id: 7,
                online,
                last_active_ms: 1_000,
                version,
            };
            let (update, snapshot) = if round == 0 {
                (state(false, 8), state(true, 5))
            } else {
                // A node numbering afresh: its first snapshot counts.
                (state(false, 1), state(true, 2))
            };
            let update = Frame::push(Body::PresenceUpdate(proto::PresenceUpdate {
                states: vec![update],
            }));
            let snapshot = presence_snapshot(request_id, snapshot);
            send.write_all(&frames(&[update, snapshot])).await.unwrap();
            let _ = tokio::time::timeout(WAIT, conn.closed()).await;
        }
    });
    let (client, _events) = register_fake(config).await;
    let states = client.subscribe_presence(&[7]).await.unwrap();
    assert_eq!(states.len(), 1, "{states:?}");
    assert!(!states[0].online, "the older snapshot won: {states:?}");
    assert!(!client.presence(7).expect("watched").online);

    client.reconnect_now();
    wait_until("the new node's snapshot", || {
        let online = client.presence(7).is_some_and(|p| p.online);
        async move { online }
    })
    .await;
    client.close();
    serve.await.unwrap();
}

#[tokio::test]
async fn a_presence_update_right_after_its_snapshot_is_the_one_kept() {
    // The fake node answers a subscription with a snapshot (user 7 online)
    // and, in the same write, an update (7 went offline), on two
    // connections: the app's subscription, then the client's own after a
    // reconnect. The reader used to record the update while the
    // subscribing task, woken by the reply, had not yet run; that task then
    // recorded the older snapshot over it, and after a reconnect handed it
    // to the app after the update. On this single-threaded runtime the
    // order is certain.
    let (_dir, endpoint, config) = fake_node().await;
    let serve = tokio::spawn(async move {
        for round in 0..2 {
            let conn = endpoint.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = fake_login(&conn).await.expect("a login");
            let mut buf = BytesMut::new();
            let request_id = loop {
                let frame = next_frame(&mut recv, &mut buf).await;
                if let Some(Body::SubscribePresence(s)) = frame.body {
                    assert_eq!(s.user_ids, [7]);
                    break frame.request_id;
                }
            };
            let state = |online| proto::PresenceState {
                user_id: 7,
                online,
                last_active_ms: 1_000 * (round + 1),
                ..Default::default()
            };
            let snapshot = presence_snapshot(request_id, state(true));
            let update = Frame::push(Body::PresenceUpdate(proto::PresenceUpdate {
                states: vec![state(false)],
            }));
            send.write_all(&frames(&[snapshot, update])).await.unwrap();
            // Held open until the client drops it.
            let _ = tokio::time::timeout(WAIT, conn.closed()).await;
        }
    });
    let (client, mut events) = register_fake(config).await;
    // The snapshot, or already the update behind it.
    let states = client.subscribe_presence(&[7]).await.unwrap();
    assert_eq!(states.len(), 1, "{states:?}");
    wait_for(&mut events, "the offline update", |e| match e {
        Event::Presence(p) if p.user_id == 7 && !p.online => Some(()),
        _ => None,
    })
    .await;
    assert!(
        !client.presence(7).expect("watched").online,
        "the snapshot overwrote the newer update"
    );

    // After a reconnect the app hears the update and the client's
    // re-subscription; whatever their order, the last word is the latest.
    client.reconnect_now();
    let mut heard = Vec::new();
    while heard.len() < 2 {
        let state = wait_for(&mut events, "presence after the reconnect", |e| match e {
            Event::Presence(p) if p.user_id == 7 && p.last_active_ms == 2_000 => Some(p),
            _ => None,
        })
        .await;
        heard.push(state);
    }
    assert!(
        !heard[1].online,
        "the app heard the older snapshot last: {heard:?}"
    );
    assert!(!client.presence(7).expect("watched").online);
    client.close();
    serve.await.unwrap();
}

#[tokio::test]
async fn a_subscription_that_times_out_leaves_no_state_of_the_old_list() {
    // The fake node answers the first subscription (user 5) and never the
    // second (user 7). The old list's state used to be dropped only once
    // a subscription was answered, so presence(5) kept answering for a
    // user no longer watched.
    let (_dir, endpoint, mut config) = fake_node().await;
    config.request_timeout = Duration::from_secs(1);
    let serve = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = fake_login(&conn).await.expect("a login");
        let mut buf = BytesMut::new();
        loop {
            let frame = next_frame(&mut recv, &mut buf).await;
            if let Some(Body::SubscribePresence(s)) = frame.body {
                if s.user_ids == [5] {
                    let state = proto::PresenceState {
                        user_id: 5,
                        online: true,
                        last_active_ms: 1_000,
                        ..Default::default()
                    };
                    let snapshot = presence_snapshot(frame.request_id, state);
                    send.write_all(&frames(&[snapshot])).await.unwrap();
                } else {
                    break;
                }
            }
        }
        // Held open, unanswered, until the client is done.
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
    });
    let (client, _events) = register_fake(config).await;
    assert_eq!(client.subscribe_presence(&[5]).await.unwrap().len(), 1);
    assert!(client.presence(5).is_some());
    let refused = client.subscribe_presence(&[7]).await;
    assert!(
        matches!(refused, Err(chat_client::ClientError::Timeout)),
        "{refused:?}"
    );
    assert_eq!(client.presence(5), None, "the old list's state stayed");
    client.close();
    serve.await.unwrap();
}

#[tokio::test]
async fn a_node_that_asks_for_a_retry_in_a_millisecond_gets_a_paced_client() {
    // The fake node refuses every send for a second with RATE_LIMITED and
    // a retry-after of 1 ms. The client used to resend after exactly that,
    // hundreds of times a second (each time its whole tail of sends); its
    // pauses now last at least 20 ms. Slowness can only lower the count.
    let (_dir, endpoint, config) = fake_node().await;
    let node = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let _control = fake_login(&conn).await.expect("a login");
        let (mut send, mut recv, mut buf, _others) =
            accept_stream(&conn, StreamKind::Messages).await;
        let mut refused = 0u32;
        let mut until = None;
        loop {
            let frame = next_frame(&mut recv, &mut buf).await;
            let Some(Body::Send(request)) = frame.body else {
                continue;
            };
            let until =
                *until.get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_secs(1));
            let reply = if tokio::time::Instant::now() < until {
                refused += 1;
                Frame::new(
                    frame.request_id,
                    Body::Error(proto::Error {
                        code: ErrorCode::RateLimited as i32,
                        message: "slow down".into(),
                        retry_after_ms: 1,
                    }),
                )
            } else {
                first_ack(frame.request_id, request)
            };
            send.write_all(&frames(&[reply])).await.unwrap();
            if tokio::time::Instant::now() >= until {
                break;
            }
        }
        // Until the client has gone.
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
        refused
    });
    let (client, _events) = register_fake(config).await;
    let ack = tokio::time::timeout(WAIT, client.send_text(7, "hello"))
        .await
        .expect("answered once the node lets it through")
        .expect("sent");
    assert_eq!(ack.seq, 1);
    client.close();
    let refused = node.await.unwrap();
    assert!(
        (2..=60).contains(&refused),
        "refused {refused} times in a second (pauses of 20 ms allow ~50)"
    );
}
