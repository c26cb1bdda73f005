//! Notifications end to end: a real server posts to a push gateway (a
//! small HTTP server here, in place of Sygnal, APNs and FCM) for users
//! with no connection in the foreground, coalesced per conversation, with
//! the badge and without the text; retries, rejected tokens and refused
//! registrations.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chat_client::{Client, ErrorCode, Events, proto};
use chat_protocol::Body;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use serde_json::Value;

use crate::harness::*;

const APP: &str = "com.example.chat.ios";

/// A push gateway that records what it is sent and answers from a script
/// (then 200 with nothing rejected).
struct Gateway {
    addr: SocketAddr,
    tls: bool,
    received: Arc<Mutex<Vec<Value>>>,
    script: Arc<Mutex<VecDeque<(u16, String)>>>,
    hold: Hold,
    task: tokio::task::JoinHandle<()>,
}

/// The answer to the next request waits for this, when set.
type Hold = Arc<Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>;

impl Gateway {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::new()));
        let hold: Hold = Arc::default();
        let tls_on = tls.is_some();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let (r, s, h) = (received.clone(), script.clone(), hold.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (r, s, h, acceptor) = (r.clone(), s.clone(), h.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        answer(request, r.clone(), s.clone(), h.clone())
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match acceptor {
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            http.serve_connection(TokioIo::new(stream), service).await
                        }
                        None => http.serve_connection(TokioIo::new(stream), service).await,
                    };
                });
            }
        });
        Gateway {
            addr,
            tls: tls_on,
            received,
            script,
            hold,
            task,
        }
    }

    fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/_matrix/push/v1/notify", self.addr)
    }

    /// The next request is answered `status` with `body`.
    fn answer_next(&self, status: u16, body: &str) {
        self.script
            .lock()
            .unwrap()
            .push_back((status, body.to_string()));
    }

    /// The answer to the next request waits until the returned sender
    /// sends (or is dropped).
    fn hold_next(&self) -> tokio::sync::oneshot::Sender<()> {
        let (release, held) = tokio::sync::oneshot::channel();
        *self.hold.lock().unwrap() = Some(held);
        release
    }

    fn received(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `n` requests came; returns them all.
    async fn wait_for(&self, n: usize) -> Vec<Value> {
        wait_until(&format!("{n} requests at the push gateway"), || async {
            self.received.lock().unwrap().len() >= n
        })
        .await;
        self.received()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    received: Arc<Mutex<Vec<Value>>>,
    script: Arc<Mutex<VecDeque<(u16, String)>>>,
    hold: Hold,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_string();
    let json = request
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/json");
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let mut value: Value = serde_json::from_slice(&body).expect("a JSON body");
    value["path"] = path.into();
    value["json"] = json.into();
    received.lock().unwrap().push(value);
    // What answers it is chosen as it comes, in the order requests come.
    let (status, reply) = script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or((200, r#"{"rejected":[]}"#.into()));
    let held = hold.lock().unwrap().take();
    if let Some(held) = held {
        let _ = held.await;
    }
    Ok(Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(reply)))
        .unwrap())
}

/// A server that notifies through `gateway`, coalescing over `coalesce`.
async fn server_for(backend: Backend, gateway: &Gateway, coalesce: Duration) -> TestServer {
    server_with(backend, gateway, move |c| c.push.push_coalesce = coalesce).await
}

/// A server that notifies through `gateway`, its settings changed by
/// `tweak`.
async fn server_with(
    backend: Backend,
    gateway: &Gateway,
    tweak: impl FnOnce(&mut chat_server::Config),
) -> TestServer {
    let url = gateway.url();
    TestServer::start_on_with(backend, move |c| {
        c.push.push_gateway_url = Some(url);
        tweak(c);
    })
    .await
}

/// Alice, and Bob with a registered device, friends; Bob is gone (no
/// connection) once this returns. Bob's push token and their
/// conversation.
async fn alice_and_absent_bob(server: &TestServer) -> (Client, Events, String, u64) {
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let (alice, alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, bob_events) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let bob_id = bob.identity().user_id;
    let token = format!("bob-phone-{bob_id}");
    bob.register_push(APP, &token).await.unwrap();
    drop(bob_events);
    gone(metrics, &bob).await;
    (alice, alice_events, token, conversation)
}

/// Closes `client` and waits until the server has let its connection go.
async fn gone(metrics: SocketAddr, client: &Client) {
    let before = value(&scrape(metrics).await, "chat_sessions_active");
    client.close();
    scrape_until(metrics, "the connection gone", |m| {
        value(m, "chat_sessions_active") == before - 1.0
    })
    .await;
}

fn outcome(m: &HashMap<String, f64>, outcome: &str) -> f64 {
    value(
        m,
        &format!("chat_push_notifications_total{{outcome=\"{outcome}\"}}"),
    )
}

fn watches(m: &HashMap<String, f64>, outcome: &str) -> f64 {
    value(
        m,
        &format!("chat_push_watches_total{{outcome=\"{outcome}\"}}"),
    )
}

each_backend! {
    async fn an_absent_user_is_notified_once_per_window_without_the_text(backend: Backend) {
        let gateway = Gateway::start(None).await;
        let server = server_for(backend, &gateway, Duration::from_secs(5)).await;
        let metrics = server.server.as_ref().unwrap().metrics_addr();
        let (alice, _events, token, conversation) = alice_and_absent_bob(&server).await;

        let first = alice.send_text(conversation, "secret words").await.unwrap();
        let got = gateway.wait_for(1).await;
        let n = &got[0]["notification"];
        assert_eq!(got[0]["path"], "/_matrix/push/v1/notify");
        assert_eq!(got[0]["json"], true);
        assert_eq!(n["event_id"], format!("{conversation}/{}", first.seq));
        assert_eq!(n["room_id"], conversation.to_string());
        assert_eq!(n["type"], "chat.text");
        assert_eq!(n["sender"], alice.identity().user_id.to_string());
        assert_eq!(n["sender_display_name"], alice.identity().username);
        assert_eq!(n["prio"], "high");
        assert_eq!(n["counts"]["unread"], 1);
        assert_eq!(n["devices"].as_array().unwrap().len(), 1);
        assert_eq!(n["devices"][0]["app_id"], APP);
        assert_eq!(n["devices"][0]["pushkey"], token);
        assert!(n["devices"][0]["pushkey_ts"].as_i64().unwrap() > 1_700_000_000);
        assert!(
            !got[0].to_string().contains("secret"),
            "the text stays out of the notification: {}",
            got[0]
        );

        // Three more within the window make one notification, of the last,
        // at its end.
        let mut last = 0;
        for i in 0..3 {
            last = alice.send_text(conversation, &format!("more {i}")).await.unwrap().seq;
        }
        let got = gateway.wait_for(2).await;
        assert_eq!(got[1]["notification"]["event_id"], format!("{conversation}/{last}"));
        assert_eq!(got[1]["notification"]["counts"]["unread"], 1, "one conversation");
        let m = scrape_until(metrics, "two sent, two coalesced", |m| {
            outcome(m, "sent") == 2.0 && outcome(m, "coalesced") == 2.0
        })
        .await;
        assert_eq!(outcome(&m, "no_device"), 0.0);
        assert_eq!(gateway.received().len(), 2);

        assert!(
            gateway
                .received()
                .iter()
                .all(|r| r["notification"]["devices"][0]["pushkey"] == token.as_str()),
            "only Bob's device was notified"
        );
    }

    async fn a_foreground_connection_holds_notifications_and_the_background_gets_them(backend: Backend) {
        let gateway = Gateway::start(None).await;
        let server = server_for(backend, &gateway, Duration::from_secs(5)).await;
        let metrics = server.server.as_ref().unwrap().metrics_addr();
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, mut bob_events) = register(server.client_config(), &name("bob")).await;
        let conversation = befriend(&alice, &bob).await;
        bob.register_push(APP, "bob-phone").await.unwrap();

        // In the foreground Bob reads it in the app: no notification, and
        // his ack ends the watch on it (the default five seconds).
        alice.send_text(conversation, "while you look").await.unwrap();
        messages(&mut bob_events, 1).await;
        scrape_until(metrics, "bob's ack ended the watch", |m| watches(m, "acked") == 1.0).await;

        // The app goes to the background with its connection open.
        bob.set_heartbeats(false);
        scrape_until(metrics, "bob's app in the background", |m| {
            value(m, "chat_backgrounded_total") >= 1.0
        })
        .await;
        let later = alice.send_text(conversation, "while you are away").await.unwrap();
        let got = gateway.wait_for(1).await;
        // Had the first message notified, it would have opened the window
        // and this one would wait for its end, coalesced.
        assert_eq!(got[0]["notification"]["event_id"], format!("{conversation}/{}", later.seq));
        let m = scrape_until(metrics, "one sent", |m| outcome(m, "sent") == 1.0).await;
        assert_eq!(outcome(&m, "coalesced"), 0.0);
        // The first never reached the notifier (which would have found
        // Bob online and sent nothing, but held the window open).
        assert_eq!(outcome(&m, "online"), 0.0);
        assert_eq!(gateway.received().len(), 1);
        // The message reached the open connection as well.
        messages(&mut bob_events, 1).await;
    }

    async fn rejected_tokens_are_forgotten_and_cleared_ones_get_nothing(backend: Backend) {
        let gateway = Gateway::start(None).await;
        let server = server_for(backend, &gateway, Duration::from_millis(100)).await;
        let metrics = server.server.as_ref().unwrap().metrics_addr();
        // Carol has a device too; Dave registers one and then clears it.
        let mut away = Vec::new();
        for (who, token) in [("carol", "carol-phone"), ("dave", "")] {
            let (client, events) = register(server.client_config(), &name(who)).await;
            client.register_push(APP, "a-phone").await.unwrap();
            client.register_push(APP, token).await.unwrap();
            away.push((client, events));
        }
        let (alice, _events, token, conversation) = alice_and_absent_bob(&server).await;
        let mut with = Vec::new();
        for (client, events) in away {
            with.push(befriend(&alice, &client).await);
            client.close();
            drop(events);
        }
        scrape_until(metrics, "only alice connected", |m| {
            value(m, "chat_sessions_active") == 1.0
        })
        .await;

        // The gateway rejects Bob's token, and names Carol's, which this
        // request did not carry: only Bob's is forgotten.
        gateway.answer_next(200, &format!(r#"{{"rejected":["{token}","carol-phone"]}}"#));
        alice.send_text(conversation, "one").await.unwrap();
        gateway.wait_for(1).await;
        scrape_until(metrics, "the token forgotten", |m| {
            value(m, "chat_push_tokens_rejected_total") == 1.0
        })
        .await;
        // The next message to Bob finds no device; Carol's still notifies.
        alice.send_text(conversation, "two").await.unwrap();
        scrape_until(metrics, "no device", |m| outcome(m, "no_device") == 1.0).await;
        alice.send_text(with[0], "hi carol").await.unwrap();
        let got = gateway.wait_for(2).await;
        assert_eq!(got[1]["notification"]["devices"][0]["pushkey"], "carol-phone");
        // Dave cleared his: nothing.
        alice.send_text(with[1], "hi dave").await.unwrap();
        scrape_until(metrics, "no device again", |m| outcome(m, "no_device") == 2.0).await;
        assert_eq!(gateway.received().len(), 2);
    }

    async fn a_muted_conversation_notifies_nobody_and_an_unmuted_one_does(backend: Backend) {
        let gateway = Gateway::start(None).await;
        // No watch of what Bob's foreground connection leaves unacknowledged
        // (the group's first message, which his app never takes): only the
        // messages sent once he is gone may notify.
        let server = server_with(backend, &gateway, |c| {
            c.push.push_coalesce = Duration::from_secs(5);
            c.push.push_unacked_after = Duration::ZERO;
        })
        .await;
        let metrics = server.server.as_ref().unwrap().metrics_addr();
        let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
        let (bob, bob_events) = register(server.client_config(), &name("bob")).await;
        let direct = befriend(&alice, &bob).await;
        let group = alice
            .create_group("loud", &[bob.identity().user_id])
            .await
            .unwrap()
            .conversation_id;
        let token = format!("bob-phone-{}", bob.identity().user_id);
        bob.register_push(APP, &token).await.unwrap();
        // The direct conversation muted for an hour; the group muted for
        // good, then until a time already past.
        let hour = now_ms() + 3_600_000;
        bob.mute(direct, hour).await.unwrap();
        bob.mute(group, i64::MAX).await.unwrap();
        bob.mute(group, 1).await.unwrap();
        let listed = bob.conversations(10, None).await.unwrap();
        let mute_of = |id| listed.iter().find(|c| c.conversation_id == id).unwrap().muted_until_ms;
        assert_eq!((mute_of(direct), mute_of(group)), (hour, 1));
        assert_eq!(code(bob.mute(direct, -1).await), ErrorCode::InvalidArgument);
        assert_eq!(code(alice.mute(group + 1000, hour).await), ErrorCode::NotAMember);
        drop(bob_events);
        gone(metrics, &bob).await;

        alice.send_text(direct, "shh").await.unwrap();
        scrape_until(metrics, "the muted one", |m| outcome(m, "muted") == 1.0).await;
        let loud = alice.send_text(group, "hello").await.unwrap();
        let got = gateway.wait_for(1).await;
        assert_eq!(got[0]["notification"]["event_id"], format!("{group}/{}", loud.seq));
        let m = scrape_until(metrics, "the unmuted one sent", |m| outcome(m, "sent") == 1.0).await;
        assert_eq!(outcome(&m, "muted"), 1.0);
        assert_eq!(gateway.received().len(), 1, "nothing for the muted conversation");
    }

    async fn a_failing_gateway_is_asked_again_and_a_refusal_is_final(backend: Backend) {
        let gateway = Gateway::start(None).await;
        let server = server_for(backend, &gateway, Duration::from_millis(100)).await;
        let metrics = server.server.as_ref().unwrap().metrics_addr();
        let (alice, _events, _token, conversation) = alice_and_absent_bob(&server).await;

        gateway.answer_next(500, "{}");
        gateway.answer_next(429, "{}");
        alice.send_text(conversation, "one").await.unwrap();
        let got = gateway.wait_for(3).await;
        assert_eq!(got[0], got[2], "the same notification, asked again");
        scrape_until(metrics, "sent after two failures", |m| outcome(m, "sent") == 1.0).await;

        // A 4xx is not asked again.
        gateway.answer_next(400, "{}");
        alice.send_text(conversation, "two").await.unwrap();
        let m = scrape_until(metrics, "refused", |m| outcome(m, "failed") == 1.0).await;
        assert_eq!(outcome(&m, "sent"), 1.0);
        assert_eq!(gateway.received().len(), 4);
    }

    async fn a_reaction_notifies_the_author_of_the_message_alone(backend: Backend) {
        let gateway = Gateway::start(None).await;
        // No watch of what the foreground connections leave unacknowledged:
        // only what is sent once Bob and Carol are gone may notify.
        let server = server_with(backend, &gateway, |c| {
            c.push.push_coalesce = Duration::from_millis(100);
            c.push.push_unacked_after = Duration::ZERO;
        })
        .await;
        let metrics = server.server.as_ref().unwrap().metrics_addr();
        let mut members = circle(&server, 3).await;
        let ids: Vec<u64> = members.iter().map(|(c, _)| c.identity().user_id).collect();
        let alice = &members[0].0;
        let g = alice
            .create_group("pets", &ids[1..])
            .await
            .unwrap()
            .conversation_id;
        let cat = members[1].0.send_text(g, "my cat").await.unwrap().seq;
        let dog = alice.send_text(g, "my dog").await.unwrap().seq;
        for (i, who) in [(1, "bob"), (2, "carol")] {
            let token = format!("{who}-phone-{}", ids[i]);
            members[i].0.register_push(APP, &token).await.unwrap();
        }
        for (client, events) in members.drain(1..) {
            drop(events);
            gone(metrics, &client).await;
        }
        let alice = &members[0].0;

        // Her own message: nobody. Bob's: Bob alone. Taken back: nobody.
        alice.react(g, dog, "😀").await.unwrap();
        let heart = alice.react(g, cat, "❤️").await.unwrap().seq;
        let got = gateway.wait_for(1).await;
        let n = &got[0]["notification"];
        assert_eq!(n["type"], "chat.reaction");
        assert_eq!(n["event_id"], format!("{g}/{heart}"));
        assert_eq!(n["devices"][0]["pushkey"], format!("bob-phone-{}", ids[1]));
        alice.react(g, cat, "").await.unwrap();
        // A text notifies both: each has a device that works.
        let text = alice.send_text(g, "dinner?").await.unwrap().seq;
        let got = gateway.wait_for(3).await;
        let mut keys: Vec<String> = got[1..]
            .iter()
            .map(|r| {
                let n = &r["notification"];
                assert_eq!(n["event_id"], format!("{g}/{text}"));
                n["devices"][0]["pushkey"].as_str().unwrap().to_owned()
            })
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [format!("bob-phone-{}", ids[1]), format!("carol-phone-{}", ids[2])]
        );
        // Had the first reaction or the take-back notified anyone, it would
        // have been sent, or folded into the text's notification.
        let m = scrape_until(metrics, "three sent", |m| outcome(m, "sent") == 3.0).await;
        assert_eq!(outcome(&m, "coalesced"), 0.0);
        assert_eq!(gateway.received().len(), 3);
    }
}

#[tokio::test]
async fn a_message_a_foreground_connection_leaves_unacknowledged_is_notified() {
    let gateway = Gateway::start(None).await;
    let server = server_with(Backend::Embedded, &gateway, |c| {
        c.push.push_unacked_after = Duration::from_secs(4);
    })
    .await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
    // Bob's app acks what it has stored, and stores nothing: to the
    // server, a phone that lost its network or an app killed in the
    // foreground, whose connection stays until the idle timeout.
    let mut config = server.client_config();
    config.delivery_acks = chat_client::DeliveryAcks::Manual;
    let (bob, mut bob_events) = register(config, &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    bob.register_push(APP, "bob-phone").await.unwrap();
    // His tablet's app is in the background: it acks what it gets, which
    // tells nothing of whether Bob saw it.
    let (tablet, mut tablet_events) =
        Client::login(server.client_config(), &bob.identity().username, PASSWORD)
            .await
            .unwrap();
    tablet.set_heartbeats(false);
    scrape_until(metrics, "the tablet in the background", |m| {
        value(m, "chat_backgrounded_total") >= 1.0
    })
    .await;

    let first = alice
        .send_text(conversation, "are you there")
        .await
        .unwrap();
    messages(&mut bob_events, 1).await;
    messages(&mut tablet_events, 1).await;
    let got = gateway.wait_for(1).await;
    let n = &got[0]["notification"];
    assert_eq!(n["event_id"], format!("{conversation}/{}", first.seq));
    assert_eq!(n["type"], "chat.text");
    assert_eq!(n["devices"][0]["pushkey"], "bob-phone");
    let m = scrape_until(metrics, "one sent", |m| outcome(m, "sent") == 1.0).await;
    assert_eq!(watches(&m, "unacked"), 1.0);
    assert_eq!(watches(&m, "acked"), 0.0);
    assert_eq!(
        value(&m, "chat_sessions_active"),
        3.0,
        "bob's connections are still open, his phone's in the foreground"
    );

    // Once the app acks what it gets, nothing more is notified.
    bob.ack_delivery(conversation, first.seq);
    let second = alice
        .send_text(conversation, "there you are")
        .await
        .unwrap();
    messages(&mut bob_events, 1).await;
    bob.ack_delivery(conversation, second.seq);
    let m = scrape_until(metrics, "the ack ended the watch", |m| {
        watches(m, "acked") == 1.0
    })
    .await;
    assert_eq!(watches(&m, "unacked"), 1.0);
    assert_eq!(outcome(&m, "sent"), 1.0);
    assert_eq!(gateway.received().len(), 1);
}

#[tokio::test]
async fn registrations_are_checked_and_the_connection_stays() {
    let gateway = Gateway::start(None).await;
    let server = server_for(Backend::Embedded, &gateway, Duration::from_millis(100)).await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let (alice, _alice_events) = register(server.client_config(), &name("alice")).await;
    let (bob, bob_events) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    // client-lib refuses what the server would, before sending.
    assert_eq!(
        code(bob.register_push("", "token").await),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        code(bob.register_push(APP, "two words").await),
        ErrorCode::InvalidArgument
    );
    let mut raw = RawControl::resume(&server, &bob.identity().token).await;
    bob.close();
    drop(bob_events);
    let reply = raw
        .request(Body::RegisterPush(proto::RegisterPush {
            app_id: APP.into(),
            token: "fine".into(),
        }))
        .await;
    assert!(matches!(reply, Body::Ok(_)), "{reply:?}");
    // Refused ones replace nothing.
    let too_long = "x".repeat(chat_protocol::push::MAX_PUSH_TOKEN_LEN + 1);
    for (app_id, token) in [
        ("", "token"),
        (APP, "two words"),
        (APP, too_long.as_str()),
        ("bad\napp", "token"),
    ] {
        let reply = raw
            .request(Body::RegisterPush(proto::RegisterPush {
                app_id: app_id.into(),
                token: token.into(),
            }))
            .await;
        match reply {
            Body::Error(e) => assert_eq!(
                ErrorCode::from_wire(e.code),
                ErrorCode::InvalidArgument,
                "{app_id:?} {token:?}"
            ),
            other => panic!("refused, got {other:?}"),
        }
    }
    raw.assert_served().await;
    // The raw connection goes to the background: the good registration
    // is the one notified.
    raw.write_unanswered(vec![Body::Heartbeat(proto::Heartbeat { background: true })])
        .await;
    scrape_until(metrics, "bob in the background", |m| {
        value(m, "chat_backgrounded_total") >= 1.0
    })
    .await;
    alice.send_text(conversation, "hi").await.unwrap();
    let got = gateway.wait_for(1).await;
    assert_eq!(got[0]["notification"]["devices"][0]["pushkey"], "fine");
    assert_eq!(
        got[0]["notification"]["devices"].as_array().unwrap().len(),
        1
    );
}

#[tokio::test]
async fn an_https_gateway_is_trusted_through_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = chat_server::certs::DevCerts::generate(&["127.0.0.1".to_string()]).unwrap();
    certs.write(dir.path()).unwrap();
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(certs.server_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(certs.server_key_pem.as_bytes()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let gateway = Gateway::start(Some(Arc::new(tls))).await;
    let url = gateway.url();
    let ca = dir.path().join(chat_server::certs::CA_FILE);
    let server = TestServer::start_with(move |c| {
        c.push.push_gateway_url = Some(url);
        c.push.push_gateway_ca = Some(ca);
    })
    .await;
    let (alice, _events, token, conversation) = alice_and_absent_bob(&server).await;
    alice.send_text(conversation, "over TLS").await.unwrap();
    let got = gateway.wait_for(1).await;
    assert_eq!(got[0]["notification"]["devices"][0]["pushkey"], token);
}

#[tokio::test]
async fn a_gateway_that_never_answers_does_not_hold_up_shutdown() {
    // It takes connections and reads nothing: every request waits for its
    // timeout, three times.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/_matrix/push/v1/notify",
        listener.local_addr().unwrap()
    );
    let held = Arc::new(Mutex::new(Vec::new()));
    let accepted = held.clone();
    let silent = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            accepted.lock().unwrap().push(stream);
        }
    });
    let mut server = TestServer::start_with(move |c| {
        c.push.push_gateway_url = Some(url);
        c.push.push_timeout = Duration::from_secs(60);
        c.shutdown_timeout = Duration::from_secs(10);
    })
    .await;
    let (alice, _events, _token, conversation) = alice_and_absent_bob(&server).await;
    alice
        .send_text(conversation, "into the void")
        .await
        .unwrap();
    wait_until("the request under way", || async {
        !held.lock().unwrap().is_empty()
    })
    .await;
    alice.close();
    // The store is let go (the data directory with it) although the
    // notification's request is still waiting.
    let drained = server.server.take().unwrap().shutdown().await;
    assert!(drained, "the node drained within its shutdown timeout");
    silent.abort();
}

/// The call log in `events` (a CALL message), taken, so the app acks it.
async fn call_log(events: &mut Events) -> proto::Message {
    wait_for(events, "a call's log", |e| match e {
        chat_client::Event::Message(m) if m.r#type == proto::MessageType::Call as i32 => Some(m),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn a_call_rings_by_notification_where_no_calls_stream_is_open_and_stops_ringing_there() {
    let gateway = Gateway::start(None).await;
    let server = server_for(Backend::Embedded, &gateway, Duration::from_secs(5)).await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let mut calls = server.client_config();
    calls.calls = true;
    let (alice, _alice_events) = register(calls.clone(), &name("alice")).await;
    let (bob, mut bob_events) = register(calls.clone(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    let bob_name = bob.identity().username;
    let token = bob.identity().token;
    bob.register_push(APP, "bob-phone").await.unwrap();
    let of_type = |kind: &str| -> Vec<Value> {
        gateway
            .received()
            .into_iter()
            .filter(|r| r["notification"]["type"] == kind)
            .collect()
    };

    // Bob's app takes calls: it rings there, and nothing is pushed. The
    // call's log, which his app takes, notifies nothing either.
    let in_app = alice.start_call(conversation, false).await.unwrap();
    wait_for(&mut bob_events, "the ring in the app", |e| match e {
        chat_client::Event::Call(ring) if ring.call_id == in_app.call_id => Some(()),
        _ => None,
    })
    .await;
    alice.leave_call(in_app.call_id).await.unwrap();
    let log = call_log(&mut bob_events).await;
    assert_eq!(log.call.unwrap().call_id, in_app.call_id);
    scrape_until(metrics, "the log acked", |m| watches(m, "acked") == 1.0).await;
    drop(bob_events);
    gone(metrics, &bob).await;

    // Bob's app is open without calls: the ring is pushed all the same,
    // and when the caller hangs up, that it ended.
    let (plain, mut plain_events) = Client::resume(server.client_config(), &token)
        .await
        .unwrap();
    let pushed = alice.start_call(conversation, true).await.unwrap();
    let got = gateway.wait_for(1).await;
    let n = &got[0]["notification"];
    assert_eq!(
        n["event_id"],
        format!("call/{}", pushed.call_id),
        "the first ring, which the app took, pushed nothing"
    );
    assert_eq!(n["type"], "chat.video_call");
    assert_eq!(n["room_id"], conversation.to_string());
    assert_eq!(n["sender"], alice.identity().user_id.to_string());
    assert_eq!(n["sender_display_name"], alice.identity().username);
    assert_eq!(n["devices"][0]["pushkey"], "bob-phone");
    assert!(n.get("counts").is_none(), "a ring changes no badge: {n}");
    alice.leave_call(pushed.call_id).await.unwrap();
    let got = gateway.wait_for(2).await;
    let n = &got[1]["notification"];
    assert_eq!(n["type"], "chat.call_ended");
    assert_eq!(n["event_id"], format!("call/{}", pushed.call_id));
    assert_eq!(n["content"]["reason"], "hung_up");
    assert_eq!(n["devices"][0]["pushkey"], "bob-phone");
    assert!(n.get("counts").is_none(), "{n}");
    call_log(&mut plain_events).await;
    scrape_until(metrics, "the log acked", |m| watches(m, "acked") == 2.0).await;
    drop(plain_events);

    // With no connection at all: the ring, its end, and the missed call,
    // which is a message (its badge counts it).
    gone(metrics, &plain).await;
    let absent = alice.start_call(conversation, false).await.unwrap();
    let got = gateway.wait_for(3).await;
    assert_eq!(
        got[2]["notification"]["event_id"],
        format!("call/{}", absent.call_id)
    );
    assert_eq!(got[2]["notification"]["type"], "chat.call");
    alice.leave_call(absent.call_id).await.unwrap();
    gateway.wait_for(5).await;
    let ended = of_type("chat.call_ended");
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert_eq!(
        ended[1]["notification"]["event_id"],
        format!("call/{}", absent.call_id)
    );
    let missed = of_type("chat.missed_call");
    assert_eq!(missed.len(), 1, "{:?}", gateway.received());
    let n = &missed[0]["notification"];
    assert_eq!(n["sender"], alice.identity().user_id.to_string());
    assert_eq!(n["counts"]["unread"], 1);
    let seq: u64 = n["event_id"]
        .as_str()
        .unwrap()
        .split('/')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(n["event_id"], format!("{conversation}/{seq}"));

    // A phone rung by notification stops when the call is answered on
    // another device (which is rung when its calls stream opens).
    let ringing = alice.start_call(conversation, false).await.unwrap();
    gateway.wait_for(6).await;
    let (laptop, mut laptop_events) = Client::login(calls.clone(), &bob_name, PASSWORD)
        .await
        .unwrap();
    wait_for(&mut laptop_events, "the ring on the laptop", |e| match e {
        chat_client::Event::Call(ring) if ring.call_id == ringing.call_id => Some(()),
        _ => None,
    })
    .await;
    laptop.join_call(ringing.call_id).await.unwrap();
    gateway.wait_for(7).await;
    let ended = of_type("chat.call_ended");
    assert_eq!(ended.len(), 3, "{ended:?}");
    let n = &ended[2]["notification"];
    assert_eq!(n["event_id"], format!("call/{}", ringing.call_id));
    assert_eq!(n["content"]["reason"], "answered_elsewhere");
    let m = scrape_until(metrics, "seven sent", |m| outcome(m, "sent") == 7.0).await;
    assert_eq!(outcome(&m, "online"), 0.0);
    assert_eq!(gateway.received().len(), 7);
}

#[tokio::test]
async fn a_ring_that_ends_while_its_notification_is_under_way_is_not_tried_again_and_its_end_waits()
{
    let gateway = Gateway::start(None).await;
    // The held request must not time out first, however slow the machine.
    let server = server_with(Backend::Embedded, &gateway, |c| {
        c.push.push_timeout = Duration::from_secs(120);
    })
    .await;
    let metrics = server.server.as_ref().unwrap().metrics_addr();
    let mut calls = server.client_config();
    calls.calls = true;
    let (alice, _alice_events) = register(calls, &name("alice")).await;
    let (bob, bob_events) = register(server.client_config(), &name("bob")).await;
    let conversation = befriend(&alice, &bob).await;
    bob.register_push(APP, "bob-phone").await.unwrap();
    drop(bob_events);
    gone(metrics, &bob).await;
    let types = || -> Vec<String> {
        gateway
            .received()
            .iter()
            .map(|r| r["notification"]["type"].as_str().unwrap().to_owned())
            .collect()
    };

    // The gateway holds the ring's request, then fails it; the caller
    // hangs up meanwhile.
    let release = gateway.hold_next();
    gateway.answer_next(503, "{}");
    let call = alice.start_call(conversation, false).await.unwrap();
    gateway.wait_for(1).await;
    alice.leave_call(call.call_id).await.unwrap();
    // The missed call goes at once; the ring's end waits for the ring.
    wait_until("the missed call notified", || async {
        types().contains(&"chat.missed_call".to_string())
    })
    .await;
    assert!(
        !types().contains(&"chat.call_ended".to_string()),
        "{:?}",
        types()
    );
    let _ = release.send(());
    // The ring is not tried again (it is over); then its end goes.
    let m = scrape_until(metrics, "the ring over, its end sent", |m| {
        outcome(m, "ended") == 1.0 && outcome(m, "sent") == 2.0
    })
    .await;
    assert_eq!(outcome(&m, "failed"), 0.0);
    let types = types();
    assert_eq!(types.len(), 3, "{types:?}");
    assert_eq!(types[0], "chat.call");
    assert_eq!(
        types.iter().filter(|t| *t == "chat.call").count(),
        1,
        "{types:?}"
    );
    assert_eq!(types[2], "chat.call_ended", "{types:?}");
}
