//! Online status and last-active time, per node.
//!
//! * A user is online while at least one of their connections on this node
//!   showed activity (any frame; clients heartbeat on control) within the
//!   window `heartbeat-interval x presence-ttl-multiple`.
//! * Going offline is prompt when the last connection closes, and happens
//!   at the latest one sweep after the window when a connection goes
//!   silent without closing.
//! * Changes reach only the sessions that subscribed to that user (friends
//!   on screen), never every friend, and are coalesced: the notifier sends
//!   each watcher at most one update per user per [`COALESCE`] window, and
//!   only if the state differs from what it last sent.
//! * The last-active time is stored in history when a user goes offline, so
//!   it survives restarts. A user who hides their status appears offline
//!   with the last-active time frozen at the moment they hid.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chat_protocol::{Body, Frame, StreamKind, proto};
use dashmap::DashMap;
use tokio::sync::mpsc;

use crate::hub::SessionHandle;
use crate::store::presence::{OnlineRecord, PresenceStore};
use crate::store::{HistoryStore, StoreError, UserId};
use crate::streams::now_ms;
use crate::wire::Outbound;

/// Longest a watcher waits for a presence change; also the most often it
/// hears about one user.
pub const COALESCE: Duration = Duration::from_millis(500);

/// One user's connections on this node and what friends were last told.
struct Local {
    conns: Vec<Arc<SessionHandle>>,
    online: bool,
    hidden_at_ms: Option<i64>,
}

/// The node's presence tracker. See the module docs.
pub struct Presence {
    node: String,
    window: Duration,
    store: Arc<dyn PresenceStore>,
    history: Arc<dyn HistoryStore>,
    users: DashMap<UserId, Local>,
    /// Watched user -> sessions watching them.
    watchers: Arc<DashMap<UserId, Vec<Arc<SessionHandle>>>>,
    changes: mpsc::UnboundedSender<Notice>,
}

/// What the notifier hears.
enum Notice {
    /// A user's state changed.
    Change(proto::PresenceState),
    /// A session's watch list changed: forget what it was last sent, so a
    /// re-subscription hears every later change.
    Forget(u64),
}

impl Presence {
    /// Starts the tracker with its sweeper and notifier tasks (they stop
    /// when the returned `Arc` is the last one dropped).
    pub fn start(
        node: String,
        heartbeat_interval: Duration,
        ttl_multiple: u32,
        store: Arc<dyn PresenceStore>,
        history: Arc<dyn HistoryStore>,
    ) -> Arc<Presence> {
        let (changes, rx) = mpsc::unbounded_channel();
        let presence = Arc::new(Presence {
            node,
            window: heartbeat_interval * ttl_multiple,
            store,
            history,
            users: DashMap::new(),
            watchers: Arc::new(DashMap::new()),
            changes,
        });
        tokio::spawn(notifier(rx, presence.watchers.clone()));
        let sweep_every = (heartbeat_interval / 2).max(Duration::from_millis(50));
        tokio::spawn(sweeper(Arc::downgrade(&presence), sweep_every));
        presence
    }

    /// The online window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// A session authenticated: the user may come online.
    pub async fn connect(&self, session: Arc<SessionHandle>) {
        let user = session.user_id;
        session.touch(now_ms());
        let hidden_at_ms = match self.history.stored_presence(vec![user]).await {
            Ok(stored) => stored.first().and_then(|s| s.hidden_at_ms),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read stored presence");
                None
            }
        };
        let came_online = {
            let mut local = self.users.entry(user).or_insert_with(|| Local {
                conns: Vec::new(),
                online: false,
                hidden_at_ms,
            });
            local.hidden_at_ms = hidden_at_ms;
            local.conns.push(session);
            !std::mem::replace(&mut local.online, true)
        };
        self.refresh(user, now_ms()).await;
        if came_online && hidden_at_ms.is_none() {
            self.publish(user, true, now_ms());
        }
    }

    /// A session ended: if it was the user's last one here, they go offline
    /// now, not after the TTL.
    pub async fn disconnect(&self, user: UserId, conn_id: u64) {
        let now = now_ms();
        let went_offline = {
            let Some(mut local) = self.users.get_mut(&user) else {
                return;
            };
            local.conns.retain(|s| s.conn_id != conn_id);
            if !local.conns.is_empty() {
                return;
            }
            let was_online = local.online;
            let hidden = local.hidden_at_ms.is_some();
            drop(local);
            self.users.remove_if(&user, |_, l| l.conns.is_empty());
            was_online.then_some(hidden)
        };
        if let Err(e) = self.history.record_last_active(user, now).await {
            tracing::warn!(error = %e, "cannot record last active");
        }
        if let Err(e) = self.store.remove(user, self.node.clone()).await {
            tracing::warn!(error = %e, "cannot clear presence record");
        }
        // The user connected again during those awaits: the removal may
        // have deleted the new connection's record, and news of going
        // offline would come after its news of coming online. Put the
        // record back and say nothing.
        if self.users.contains_key(&user) {
            self.refresh(user, now_ms()).await;
            return;
        }
        if went_offline == Some(false) {
            self.publish(user, false, now);
        }
    }

    /// A heartbeat: refresh the store's TTL and the activity time.
    pub async fn heartbeat(&self, session: &SessionHandle) {
        let now = now_ms();
        session.touch(now);
        self.refresh(session.user_id, now).await;
    }

    async fn refresh(&self, user: UserId, now: i64) {
        let record = OnlineRecord {
            node: self.node.clone(),
            last_active_ms: now,
        };
        if let Err(e) = self.store.refresh(user, record, self.window).await {
            tracing::warn!(error = %e, "cannot refresh presence");
        }
    }

    /// Hides or shows the user's status; friends see the change.
    pub async fn set_hidden(&self, user: UserId, hidden: bool) -> Result<(), StoreError> {
        let now = now_ms();
        let hidden_at = hidden.then_some(now);
        self.history.set_presence_hidden(user, hidden_at).await?;
        let online = match self.users.get_mut(&user) {
            Some(mut local) => {
                local.hidden_at_ms = hidden_at;
                local.online
            }
            None => false,
        };
        // Hiding looks like going offline now; showing again reveals the
        // real state.
        self.publish(user, online && !hidden, now);
        Ok(())
    }

    /// Current state of `users` as friends see them.
    pub async fn states(&self, users: &[UserId]) -> Result<Vec<proto::PresenceState>, StoreError> {
        let online = self.store.online(users.to_vec()).await?;
        let stored = self.history.stored_presence(users.to_vec()).await?;
        Ok(users
            .iter()
            .zip(online)
            .zip(stored)
            .map(
                |((&user_id, online), stored)| match (stored.hidden_at_ms, online) {
                    (Some(hidden_at), _) => proto::PresenceState {
                        user_id,
                        online: false,
                        last_active_ms: hidden_at,
                    },
                    (None, Some(record)) => proto::PresenceState {
                        user_id,
                        online: true,
                        last_active_ms: record.last_active_ms,
                    },
                    (None, None) => proto::PresenceState {
                        user_id,
                        online: false,
                        last_active_ms: stored.last_active_ms,
                    },
                },
            )
            .collect())
    }

    /// Replaces `session`'s watch list.
    pub fn watch(&self, session: &Arc<SessionHandle>, old: &[UserId], new: &[UserId]) {
        for user in old {
            self.watchers.remove_if_mut(user, |_, list| {
                list.retain(|s| s.conn_id != session.conn_id);
                list.is_empty()
            });
        }
        for user in new {
            self.watchers
                .entry(*user)
                .or_default()
                .push(session.clone());
        }
        let _ = self.changes.send(Notice::Forget(session.conn_id));
    }

    /// Two users stopped being friends: neither watches the other any more
    /// (watching needs friendship, checked only when subscribing).
    pub fn unfriend(&self, a: UserId, b: UserId) {
        for (watched, watcher) in [(a, b), (b, a)] {
            self.watchers.remove_if_mut(&watched, |_, list| {
                list.retain(|s| s.user_id != watcher);
                list.is_empty()
            });
        }
    }

    fn publish(&self, user_id: UserId, online: bool, last_active_ms: i64) {
        let _ = self.changes.send(Notice::Change(proto::PresenceState {
            user_id,
            online,
            last_active_ms,
        }));
    }

    /// One sweep: users whose connections all went silent go offline (at
    /// their last activity); users active again come back online.
    async fn sweep(&self) {
        let now = now_ms();
        let window = self.window.as_millis() as i64;
        let mut offline = Vec::new();
        let mut online = Vec::new();
        for mut entry in self.users.iter_mut() {
            let last = entry
                .conns
                .iter()
                .map(|s| s.last_activity_ms())
                .max()
                .unwrap_or(0);
            let live = now - last <= window;
            if entry.online && !live {
                entry.online = false;
                offline.push((*entry.key(), last, entry.hidden_at_ms.is_some()));
            } else if !entry.online && live {
                entry.online = true;
                online.push((*entry.key(), last, entry.hidden_at_ms.is_some()));
            }
        }
        for (user, last, hidden) in offline {
            tracing::debug!(user, "presence timed out");
            if let Err(e) = self.history.record_last_active(user, last).await {
                tracing::warn!(error = %e, "cannot record last active");
            }
            if let Err(e) = self.store.remove(user, self.node.clone()).await {
                tracing::warn!(error = %e, "cannot clear presence record");
            }
            if !hidden {
                self.publish(user, false, last);
            }
        }
        for (user, last, hidden) in online {
            self.refresh(user, last).await;
            if !hidden {
                self.publish(user, true, last);
            }
        }
    }
}

async fn sweeper(presence: std::sync::Weak<Presence>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(presence) = presence.upgrade() else {
            return;
        };
        presence.sweep().await;
    }
}

/// Coalesces changes per user over [`COALESCE`] and sends each watcher one
/// `PresenceUpdate` per flush with only the states that differ from what it
/// was last sent.
async fn notifier(
    mut rx: mpsc::UnboundedReceiver<Notice>,
    watchers: Arc<DashMap<UserId, Vec<Arc<SessionHandle>>>>,
) {
    let mut pending: HashMap<UserId, proto::PresenceState> = HashMap::new();
    // What each connection was last sent, per user: a connection's entries
    // go at once when it closes or subscribes anew (`Forget`).
    let mut sent: HashMap<u64, HashMap<UserId, (bool, i64)>> = HashMap::new();
    let mut tick = tokio::time::interval(COALESCE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            notice = rx.recv() => match notice {
                Some(Notice::Change(state)) => { pending.insert(state.user_id, state); }
                Some(Notice::Forget(conn)) => { sent.remove(&conn); }
                None => return,
            },
            _ = tick.tick() => {
                if pending.is_empty() {
                    continue;
                }
                let mut per_session: HashMap<u64, (Arc<SessionHandle>, Vec<proto::PresenceState>)> = HashMap::new();
                for (user, state) in pending.drain() {
                    let Some(list) = watchers.get(&user) else { continue };
                    for session in list.iter() {
                        let value = (state.online, state.last_active_ms);
                        let told = sent.entry(session.conn_id).or_default();
                        // Online users' activity time moves constantly; only
                        // a flip, or a new offline time, is news.
                        let news = match told.get(&user) {
                            Some(&(was_online, was_ms)) => {
                                was_online != state.online || (!state.online && was_ms != state.last_active_ms)
                            }
                            None => true,
                        };
                        if news {
                            told.insert(user, value);
                            per_session.entry(session.conn_id).or_insert_with(|| (session.clone(), Vec::new())).1.push(state);
                        }
                    }
                }
                for (_, (session, states)) in per_session {
                    let frame = Frame::push(Body::PresenceUpdate(proto::PresenceUpdate { states }));
                    session.push(StreamKind::Control, Outbound::frame(&frame));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use tokio::sync::{Notify, Semaphore};

    use super::*;
    use crate::metrics::Metrics;
    use crate::store::presence::MemoryPresenceStore;
    use crate::store::sqlite::SqliteStore;

    /// The in-process presence store, whose first `remove` waits until the
    /// test lets it go.
    struct HeldRemove {
        inner: MemoryPresenceStore,
        held: AtomicBool,
        entered: Notify,
        release: Semaphore,
    }

    #[async_trait]
    impl PresenceStore for HeldRemove {
        fn backend(&self) -> &'static str {
            "held"
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.inner.ping().await
        }
        async fn refresh(
            &self,
            user: UserId,
            record: OnlineRecord,
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.inner.refresh(user, record, ttl).await
        }
        async fn remove(&self, user: UserId, node: String) -> Result<(), StoreError> {
            if !self.held.swap(true, Ordering::SeqCst) {
                self.entered.notify_one();
                let _permit = self.release.acquire().await.expect("open");
            }
            self.inner.remove(user, node).await
        }
        async fn online(
            &self,
            users: Vec<UserId>,
        ) -> Result<Vec<Option<OnlineRecord>>, StoreError> {
            self.inner.online(users).await
        }
    }

    /// A server-side QUIC connection on loopback, for session handles (the
    /// endpoints must outlive it).
    async fn connection() -> (quinn::Endpoint, quinn::Endpoint, quinn::Connection) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = certified.cert.der().clone();
        let key =
            rustls::pki_types::PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key.into())
            .unwrap();
        server_tls.alpn_protocols = vec![b"test".to_vec()];
        let server_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).unwrap();
        let server = quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(server_crypto)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_tls.alpn_protocols = vec![b"test".to_vec()];
        let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = client
            .connect_with(
                quinn::ClientConfig::new(Arc::new(client_crypto)),
                server.local_addr().unwrap(),
                "localhost",
            )
            .unwrap();
        let (accepted, _client_side) = tokio::join!(
            async { server.accept().await.unwrap().await.unwrap() },
            connecting
        );
        (server, client, accepted)
    }

    #[tokio::test]
    async fn a_reconnect_during_the_last_disconnect_stays_online() {
        // The last connection's disconnect removes the user's record after
        // two store round trips; a new connection of the user's can come
        // online in between. The removal used to delete the new record
        // (friends' snapshots then said offline until its next heartbeat)
        // and publish "offline" after the new connection's "online".
        let dir = tempfile::tempdir().unwrap();
        let history = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let user = history
            .create_user("alice".into(), "hash".into(), 1)
            .await
            .unwrap();
        let store = Arc::new(HeldRemove {
            inner: MemoryPresenceStore::default(),
            held: AtomicBool::new(false),
            entered: Notify::new(),
            release: Semaphore::new(0),
        });
        let presence = Presence::start(
            "node".into(),
            Duration::from_secs(30),
            3,
            store.clone(),
            history,
        );
        let (_server, _client, conn) = connection().await;
        let metrics = Arc::new(Metrics::new());
        let first = SessionHandle::new(1, user, [1; 32], conn.clone(), metrics.clone());
        let second = SessionHandle::new(2, user, [2; 32], conn, metrics);
        presence.connect(first).await;

        let leaving = tokio::spawn({
            let presence = presence.clone();
            async move { presence.disconnect(user, 1).await }
        });
        tokio::time::timeout(Duration::from_secs(60), store.entered.notified())
            .await
            .expect("the disconnect reaches its removal");
        presence.connect(second).await;
        store.release.add_permits(1);
        leaving.await.unwrap();

        let states = presence.states(&[user]).await.unwrap();
        assert!(states[0].online, "{states:?}");
    }
}
