//! Online status and last-active time, per node.
//!
//! * A user is online while at least one of their connections on this node
//!   showed activity (any frame; clients heartbeat on control) within the
//!   window `heartbeat-interval x presence-ttl-multiple`. A connection whose
//!   app is in the background (it said so) shows none: its frames do not
//!   count until a heartbeat says the app is back.
//! * Going offline is prompt when the last connection closes (or the last
//!   in the foreground, the others in the background and silent for the
//!   window), and happens at the latest one sweep after the window when a
//!   connection goes silent without closing or goes to the background.
//! * Changes reach only the sessions that subscribed to that user (friends
//!   on screen), never every friend, and are coalesced: the notifier sends
//!   each watcher at most one update per user per [`COALESCE`] window, and
//!   only if the state differs from what it last sent.
//! * The last-active time is stored in history when a user goes offline, so
//!   it survives restarts. A user who hides their status appears offline
//!   with the last-active time frozen at the moment they hid.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// The stored setting could not be read when the user connected: taken
    /// as hidden until a sweep reads it.
    unsure: bool,
    /// When the store's online record was last refreshed (Unix ms): a
    /// sweep refreshes it for a user active by frames other than
    /// heartbeats, or friends' snapshots would say offline while pushes
    /// said online.
    refreshed_ms: i64,
    /// The latest activity of the user's connections that ended while
    /// others carried on (now, for one closed in the foreground while
    /// online), so the user's last-active time counts them (0: none).
    left_active_ms: i64,
}

impl Local {
    /// The latest activity of the user's connections here.
    fn last_activity_ms(&self) -> Option<i64> {
        self.conns.iter().map(|s| s.last_activity_ms()).max()
    }

    /// The user's last-active time on this node: their connections' and
    /// those that ended (0: never active here).
    fn last_active_ms(&self) -> i64 {
        self.last_activity_ms()
            .unwrap_or(0)
            .max(self.left_active_ms)
    }
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
    /// Changes published so far: each carries its number, and a snapshot
    /// the number as it was before its read (`PresenceState::version`).
    /// The snapshot's reply can be queued behind an update made after the
    /// read; the client keeps the higher number, where it used to let the
    /// snapshot overwrite the update, and the notifier, having sent it,
    /// never corrected that.
    published: AtomicU64,
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
            published: AtomicU64::new(0),
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

    /// A session authenticated: the user may come online. Not by a
    /// connection made in the background (an app syncing while the user is
    /// elsewhere): it neither shows them online nor refreshes their record.
    pub async fn connect(&self, session: Arc<SessionHandle>) {
        let user = session.user_id;
        let foreground = !session.is_background();
        session.touch(now_ms());
        // Unreadable, the setting counts as hidden until a sweep reads it:
        // showing a user who chose to appear offline is the worse mistake.
        // A connection already here keeps what was read for it.
        let stored = match self.history.stored_presence(vec![user]).await {
            Ok(stored) => Some(stored.first().and_then(|s| s.hidden_at_ms)),
            Err(e) => {
                tracing::warn!(error = %e, user, "cannot read stored presence; taken as hidden");
                None
            }
        };
        let (shown, online) = {
            let mut local = self.users.entry(user).or_insert_with(|| Local {
                conns: Vec::new(),
                online: false,
                hidden_at_ms: Some(now_ms()),
                unsure: true,
                refreshed_ms: 0,
                left_active_ms: 0,
            });
            local.refreshed_ms = now_ms();
            // Online already but taken as hidden for want of the setting:
            // now that it is read, the user shows (as a sweep would).
            let was_unsure = local.unsure && local.online;
            // Only where nothing surer is known: an entry with the setting
            // read is kept current by `set_hidden` under this lock, and a
            // hide made while this connection read it must not be undone
            // by what it read before.
            if let Some(hidden_at_ms) = stored
                && local.unsure
            {
                local.hidden_at_ms = hidden_at_ms;
                local.unsure = false;
            }
            local.conns.push(session);
            let came_online = foreground && !std::mem::replace(&mut local.online, true);
            (came_online || (was_unsure && !local.unsure), local.online)
        };
        if online && foreground {
            self.refresh(user, now_ms()).await;
            // Gone meanwhile (the others closed, the sweep timed them out):
            // the refresh may have put back the record their removal took.
            if !self.is_online(user) {
                self.remove_unless_online(user).await;
            }
        }
        if shown {
            self.publish_if_shown(user, now_ms());
        }
    }

    /// A session ended: if it was the user's last one here, or the last in
    /// the foreground with none of the others active within the window,
    /// they go offline now, not after the TTL. Their last-active time is
    /// now if they were online and the connection closed (rather than went
    /// silent until it timed out) in the foreground; otherwise the latest
    /// activity of their connections, so a device the sweep already took
    /// offline or that went to the background, or one whose network
    /// vanished, is not shown active at its close. A connection that ends
    /// while others carry on leaves its activity to the user's entry, for
    /// their last-active time when those end.
    pub async fn disconnect(&self, user: UserId, conn_id: u64, timed_out: bool) {
        let now = now_ms();
        let window = self.window.as_millis() as i64;
        let (went_offline, last_active) = {
            let Some(mut local) = self.users.get_mut(&user) else {
                return;
            };
            let Some((in_foreground, activity)) = local
                .conns
                .iter()
                .find(|s| s.conn_id == conn_id)
                .map(|s| (!s.is_background(), s.last_activity_ms()))
            else {
                return;
            };
            local.conns.retain(|s| s.conn_id != conn_id);
            let was_online = local.online;
            let closed_in_foreground = was_online && !timed_out && in_foreground;
            let active = if closed_in_foreground {
                now
            } else {
                activity.min(now)
            };
            local.left_active_ms = local.left_active_ms.max(active);
            // The others: one in the foreground, or active within the
            // window (a device that went to the background just now),
            // keeps the user as they are; the sweep decides as for any.
            let others_keep = local.conns.iter().any(|s| !s.is_background())
                || local
                    .last_activity_ms()
                    .is_some_and(|last| now - last <= window);
            if !local.conns.is_empty() && (others_keep || !closed_in_foreground) {
                return;
            }
            let hidden = local.hidden_at_ms.is_some();
            local.online = false;
            let last_active = local.last_active_ms();
            drop(local);
            self.users.remove_if(&user, |_, l| l.conns.is_empty());
            (was_online.then_some(hidden), last_active)
        };
        // 0: connected only in the background here, never active; the
        // stored time stands.
        if last_active > 0
            && let Err(e) = self.history.record_last_active(user, last_active).await
        {
            tracing::warn!(error = %e, "cannot record last active");
        }
        if let Err(e) = self.store.remove(user, self.node.clone()).await {
            tracing::warn!(error = %e, "cannot clear presence record");
        }
        // The user came online again during those awaits (a new connection
        // or a heartbeat): the removal may have deleted their record, and
        // news of going offline would come after the news of coming
        // online. Put the record back and say nothing. A connection made
        // in the background meanwhile is no such news: the removal stands
        // and friends hear of it, under the entry, so that a heartbeat
        // bringing the user back publishes after it.
        let entry = self.users.get(&user);
        if entry.as_ref().is_some_and(|local| local.online) {
            drop(entry);
            self.refresh(user, now_ms()).await;
            return;
        }
        if went_offline == Some(false) {
            self.publish(user, false, last_active);
        }
    }

    /// A heartbeat: refresh the store's TTL and the activity time, and
    /// show a user who was offline (back from the background, or silent
    /// for a window) online at once rather than at the next sweep. One
    /// read after its connection ended (a frame already buffered) does
    /// nothing: its refresh would put back the record the disconnect
    /// removed, with no entry here for a sweep to take away.
    pub async fn heartbeat(&self, session: &SessionHandle) {
        let now = now_ms();
        session.touch(now);
        let user = session.user_id;
        let Some(came_online) = self.note_refresh(user, session.conn_id, now) else {
            return;
        };
        self.refresh(user, now).await;
        // Gone during the refresh: its disconnect's removal may have come
        // first.
        if !self.has_conn(user, session.conn_id) {
            self.remove_unless_online(user).await;
        } else if came_online {
            self.publish_if_shown(user, now);
        }
    }

    /// Records a refresh of `user`'s record for connection `conn_id`,
    /// which is online from now: whether that made the user online; `None`
    /// if that connection is no longer registered here.
    fn note_refresh(&self, user: UserId, conn_id: u64, now: i64) -> Option<bool> {
        match self.users.get_mut(&user) {
            Some(mut local) if local.conns.iter().any(|s| s.conn_id == conn_id) => {
                local.refreshed_ms = now;
                Some(!std::mem::replace(&mut local.online, true))
            }
            _ => None,
        }
    }

    /// Whether connection `conn_id` of `user` is registered here.
    fn has_conn(&self, user: UserId, conn_id: u64) -> bool {
        self.users
            .get(&user)
            .is_some_and(|local| local.conns.iter().any(|s| s.conn_id == conn_id))
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
        // Hiding looks like going offline now; showing again reveals the
        // real state. Published under the user's entry, as every "online"
        // is (`publish_if_shown`), so the notifier hears the two in the
        // order the state changed: a connect or sweep that read "not
        // hidden" before this cannot publish "online" after it.
        match self.users.get_mut(&user) {
            Some(mut local) => {
                local.hidden_at_ms = hidden_at;
                local.unsure = false;
                self.publish(user, local.online && !hidden, now);
            }
            None => self.publish(user, false, now),
        }
        Ok(())
    }

    /// Current state of `users` as friends see them.
    /// Each carries the number of the last change published before the
    /// read (see `published`).
    pub async fn states(&self, users: &[UserId]) -> Result<Vec<proto::PresenceState>, StoreError> {
        // Before the reads: a change published after this was stored
        // after it too (every change is stored, then published), so the
        // read may or may not see it, and its update wins either way.
        let version = self.published.load(Ordering::SeqCst);
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
                        version,
                    },
                    (None, Some(record)) => proto::PresenceState {
                        user_id,
                        online: true,
                        last_active_ms: record.last_active_ms,
                        version,
                    },
                    (None, None) => proto::PresenceState {
                        user_id,
                        online: false,
                        last_active_ms: stored.last_active_ms,
                        version,
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

    /// Publishes `user` online if, now, they are online here and shown
    /// (not hiding, setting known), under their entry: what was read
    /// before a store round trip may no longer hold.
    fn publish_if_shown(&self, user: UserId, last_active_ms: i64) {
        if let Some(local) = self.users.get(&user)
            && local.online
            && local.hidden_at_ms.is_none()
            && !local.unsure
        {
            self.publish(user, true, last_active_ms);
        }
    }

    fn publish(&self, user_id: UserId, online: bool, last_active_ms: i64) {
        let version = self.published.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.changes.send(Notice::Change(proto::PresenceState {
            user_id,
            online,
            last_active_ms,
            version,
        }));
    }

    /// One sweep: users whose connections all went silent go offline (at
    /// their last activity); users active again come back online.
    async fn sweep(&self) {
        let now = now_ms();
        let window = self.window.as_millis() as i64;
        let mut offline = Vec::new();
        // (user, last activity, whether they just came online)
        let mut refresh = Vec::new();
        let mut unsure = Vec::new();
        for mut entry in self.users.iter_mut() {
            if entry.unsure {
                unsure.push(*entry.key());
            }
            let last = entry.last_activity_ms().unwrap_or(0);
            let live = now - last <= window;
            if entry.online && !live {
                entry.online = false;
                // Counting connections that ended meanwhile.
                let last_active = entry.last_active_ms();
                offline.push((*entry.key(), last_active, entry.hidden_at_ms.is_some()));
            } else if !entry.online && live {
                entry.online = true;
                entry.refreshed_ms = now;
                refresh.push((*entry.key(), last, true));
            } else if entry.online && now - entry.refreshed_ms >= window / 2 {
                // Online by frames other than heartbeats: keep the record.
                entry.refreshed_ms = now;
                refresh.push((*entry.key(), last, false));
            }
        }
        // Each change is checked again after its store round trips, as
        // `disconnect` does: the user may have connected or left meanwhile,
        // and then that path's news is the right one.
        for (user, last, hidden) in offline {
            tracing::debug!(user, "presence timed out");
            if let Err(e) = self.history.record_last_active(user, last).await {
                tracing::warn!(error = %e, "cannot record last active");
            }
            if let Err(e) = self.store.remove(user, self.node.clone()).await {
                tracing::warn!(error = %e, "cannot clear presence record");
            }
            // Under the entry, as `disconnect` publishes: a heartbeat
            // bringing the user back publishes after it.
            let entry = self.users.get(&user);
            if entry.as_ref().is_some_and(|local| local.online) {
                drop(entry);
                // Back (a new connection published "online"): the removal
                // may have deleted its record.
                self.refresh(user, now_ms()).await;
            } else if !hidden {
                self.publish(user, false, last);
            }
        }
        for (user, last, came_online) in refresh {
            self.refresh(user, last).await;
            if !self.is_online(user) {
                // Gone meanwhile (its disconnect published "offline"): the
                // refresh may have put back the record it removed.
                self.remove_unless_online(user).await;
            } else if came_online {
                self.publish_if_shown(user, last);
            }
        }
        if !unsure.is_empty() {
            self.read_unsure(unsure).await;
        }
    }

    /// Reads the stored setting of users connected while it could not be
    /// read; those who do not hide are shown online now.
    async fn read_unsure(&self, users: Vec<UserId>) {
        let stored = match self.history.stored_presence(users.clone()).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read stored presence");
                return;
            }
        };
        for (user, stored) in users.into_iter().zip(stored) {
            let Some(mut local) = self.users.get_mut(&user) else {
                continue;
            };
            if !local.unsure {
                continue;
            }
            local.unsure = false;
            local.hidden_at_ms = stored.hidden_at_ms;
            if local.online && stored.hidden_at_ms.is_none() {
                // Under the entry, as `set_hidden` publishes.
                self.publish(user, true, now_ms());
            }
        }
    }

    /// Whether `user` has connections here and counts as online.
    fn is_online(&self, user: UserId) -> bool {
        self.users.get(&user).is_some_and(|local| local.online)
    }

    /// Removes `user`'s record, then puts it back if the user connected
    /// during the removal.
    async fn remove_unless_online(&self, user: UserId) {
        if let Err(e) = self.store.remove(user, self.node.clone()).await {
            tracing::warn!(error = %e, "cannot clear presence record");
        }
        if self.is_online(user) {
            self.refresh(user, now_ms()).await;
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
    use std::sync::Mutex;

    use async_trait::async_trait;
    use tokio::sync::{Notify, Semaphore};

    use super::*;
    use crate::metrics::Metrics;
    use crate::store::presence::MemoryPresenceStore;
    use crate::store::sqlite::SqliteStore;

    /// Which store call [`Held`] holds.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Op {
        Refresh,
        Remove,
        /// Held after the read, with what it read.
        Online,
    }

    /// The in-process presence store, whose next call of the armed kind
    /// waits until the test lets it go.
    struct Held {
        inner: MemoryPresenceStore,
        armed: Mutex<Option<Op>>,
        entered: Notify,
        release: Semaphore,
    }

    impl Held {
        fn new(armed: Option<Op>) -> Arc<Held> {
            Arc::new(Held {
                inner: MemoryPresenceStore::default(),
                armed: Mutex::new(armed),
                entered: Notify::new(),
                release: Semaphore::new(0),
            })
        }

        fn arm(&self, op: Op) {
            *self.armed.lock().unwrap() = Some(op);
        }

        async fn hold(&self, op: Op) {
            let mine = {
                let mut armed = self.armed.lock().unwrap();
                let mine = *armed == Some(op);
                if mine {
                    *armed = None;
                }
                mine
            };
            if mine {
                self.entered.notify_one();
                let _permit = self.release.acquire().await.expect("open");
            }
        }

        /// Runs `task` until it reaches the held call, then `meanwhile`,
        /// then lets the call go and waits for `task` to finish.
        async fn around(
            &self,
            task: impl Future<Output = ()> + Send + 'static,
            meanwhile: impl Future<Output = ()>,
        ) {
            let task = tokio::spawn(task);
            tokio::time::timeout(Duration::from_secs(60), self.entered.notified())
                .await
                .expect("the held call is reached");
            meanwhile.await;
            self.release.add_permits(1);
            task.await.unwrap();
        }
    }

    #[async_trait]
    impl PresenceStore for Held {
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
            self.hold(Op::Refresh).await;
            self.inner.refresh(user, record, ttl).await
        }
        async fn remove(&self, user: UserId, node: String) -> Result<(), StoreError> {
            self.hold(Op::Remove).await;
            self.inner.remove(user, node).await
        }
        async fn online(
            &self,
            users: Vec<UserId>,
        ) -> Result<Vec<Option<OnlineRecord>>, StoreError> {
            let read = self.inner.online(users).await;
            self.hold(Op::Online).await;
            read
        }
    }

    /// A tracker whose sweeper does not run by itself during a test (the
    /// tests call `sweep`), on `store` and a fresh SQLite history with one
    /// user, and two session handles of that user.
    async fn tracker(
        store: Arc<Held>,
    ) -> (
        tempfile::TempDir,
        Arc<SqliteStore>,
        Arc<Presence>,
        [Arc<SessionHandle>; 2],
        (quinn::Endpoint, quinn::Endpoint),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let history = Arc::new(SqliteStore::open(dir.path()).unwrap());
        let user = history
            .create_user("alice".into(), "hash".into(), 1)
            .await
            .unwrap();
        // An online window of an hour and a half; the first sweep runs at
        // once, on no users, the next a quarter of an hour later.
        let presence = Presence::start(
            "node".into(),
            Duration::from_secs(1800),
            3,
            store,
            history.clone(),
        );
        let (server, client, conn) = connection().await;
        let metrics = Arc::new(Metrics::new());
        let first = SessionHandle::new(1, user, [1; 32], conn.clone(), metrics.clone(), false);
        let second = SessionHandle::new(2, user, [2; 32], conn, metrics, false);
        (dir, history, presence, [first, second], (server, client))
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
    async fn a_connection_in_the_background_is_no_activity() {
        // An app woken in the background (a push, a sync) connects and
        // acks what it is delivered: none of it may show the user online.
        let store = Held::new(None);
        let (_dir, history, presence, [first, _second], _endpoints) = tracker(store.clone()).await;
        let (user, conn_id) = (first.user_id, first.conn_id);
        let online = || async { presence.states(&[user]).await.unwrap()[0].online };
        first.set_background(true);
        presence.connect(first.clone()).await;
        assert!(!online().await, "connected in the background");
        first.touch(now_ms());
        presence.sweep().await;
        assert!(!online().await, "its frames are no activity");

        // In the foreground: its heartbeat shows the user at once, before
        // any sweep.
        first.set_background(false);
        presence.heartbeat(&first).await;
        assert!(online().await, "back in the foreground");

        // To the background a minute ago, closed now: last active is when
        // the app left the foreground, not the close.
        first.touch(now_ms() - 60_000);
        let left_at = first.last_activity_ms();
        first.set_background(true);
        first.touch(now_ms());
        presence.disconnect(user, conn_id, false).await;
        assert!(!online().await);
        let stored = history.stored_presence(vec![user]).await.unwrap();
        assert_eq!(stored[0].last_active_ms, left_at);
    }

    #[tokio::test]
    async fn a_change_made_after_a_snapshots_read_is_numbered_above_it() {
        // The snapshot read the user online; they went offline before its
        // reply was queued, so the notifier's update can reach the watcher
        // first. The client keeps the higher number: the update's.
        let store = Held::new(None);
        let (_dir, _history, presence, [first, _second], _endpoints) = tracker(store.clone()).await;
        let (user, conn_id) = (first.user_id, first.conn_id);
        presence.connect(first).await;
        store.arm(Op::Online);
        let snapshot = Arc::new(Mutex::new(Vec::new()));
        let read = {
            let (presence, snapshot) = (presence.clone(), snapshot.clone());
            async move {
                *snapshot.lock().unwrap() = presence.states(&[user]).await.unwrap();
            }
        };
        store
            .around(read, presence.disconnect(user, conn_id, false))
            .await;
        let snapshot = snapshot.lock().unwrap()[0];
        assert!(snapshot.online, "read before the disconnect");
        let offline = presence.published.load(Ordering::SeqCst);
        assert!(
            snapshot.version < offline,
            "{} against the offline change's {offline}",
            snapshot.version
        );
        // A snapshot read now is numbered with it.
        let now = presence.states(&[user]).await.unwrap()[0];
        assert_eq!((now.online, now.version), (false, offline));
    }

    #[tokio::test]
    async fn a_hide_made_while_a_device_connects_stays() {
        // A second device's connect read the stored setting ("shown")
        // before the user hid on the first device, then wrote what it had
        // read over the hide: later sweeps published the hidden user
        // online, and snapshots and pushes disagreed.
        let store = Held::new(None);
        let (_dir, history, presence, [first, second], _endpoints) = tracker(store).await;
        let user = first.user_id;
        presence.connect(first).await;
        // The store thread is held: one poll queues the connect's read of
        // the setting, which cannot be answered yet.
        let occupied = history.occupy_thread().await;
        let mut connecting = Box::pin(presence.connect(second));
        let pending = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(connecting.as_mut().poll(cx).is_pending())
        })
        .await;
        assert!(pending, "the connect waits for its read");
        // The hide's write is queued behind the read: the read sees the
        // setting as it was, and the hide is done before the connect goes
        // on.
        drop(occupied);
        presence.set_hidden(user, true).await.unwrap();
        connecting.await;
        assert!(
            presence.users.get(&user).unwrap().hidden_at_ms.is_some(),
            "the hide was undone"
        );
    }

    #[tokio::test]
    async fn a_reconnect_during_the_last_disconnect_stays_online() {
        // The last connection's disconnect removes the user's record after
        // two store round trips; a new connection of the user's can come
        // online in between. The removal used to delete the new record
        // (friends' snapshots then said offline until its next heartbeat)
        // and publish "offline" after the new connection's "online".
        let store = Held::new(Some(Op::Remove));
        let (_dir, _history, presence, [first, second], _endpoints) = tracker(store.clone()).await;
        let user = first.user_id;
        presence.connect(first).await;

        let leaving = {
            let presence = presence.clone();
            async move { presence.disconnect(user, 1, false).await }
        };
        store.around(leaving, presence.connect(second)).await;

        let states = presence.states(&[user]).await.unwrap();
        assert!(states[0].online, "{states:?}");
    }

    #[tokio::test]
    async fn a_connection_in_the_background_during_the_last_disconnect_lets_the_user_go() {
        // A device woken in the background connects while the user's last
        // connection in the foreground is leaving: it is no "online" news,
        // so the removal must stand (it used to put the record back and
        // publish nothing: shown online to snapshots, for good to pushes).
        let store = Held::new(Some(Op::Remove));
        let (_dir, _history, presence, [first, second], _endpoints) = tracker(store.clone()).await;
        let user = first.user_id;
        presence.connect(first).await;
        second.set_background(true);

        let leaving = {
            let presence = presence.clone();
            async move { presence.disconnect(user, 1, false).await }
        };
        store.around(leaving, presence.connect(second)).await;

        let states = presence.states(&[user]).await.unwrap();
        assert!(!states[0].online, "{states:?}");
    }

    #[tokio::test]
    async fn the_last_device_in_the_foreground_closing_takes_the_user_offline() {
        // The phone closes; the tablet stays connected in the background,
        // silent for longer than the window: the user goes offline now, at
        // the phone's close, as if the tablet were not there.
        let store = Held::new(None);
        let (_dir, history, presence, [first, second], _endpoints) = tracker(store.clone()).await;
        let user = first.user_id;
        presence.connect(first.clone()).await;
        presence.connect(second.clone()).await;
        second.touch(now_ms() - 4 * 3_600_000);
        second.set_background(true);
        let closed_at = now_ms();
        presence.disconnect(user, first.conn_id, false).await;
        let states = presence.states(&[user]).await.unwrap();
        assert!(!states[0].online, "{states:?}");
        let stored = history.stored_presence(vec![user]).await.unwrap();
        assert!(stored[0].last_active_ms >= closed_at, "{stored:?}");

        // The tablet closes later: the phone's close stays the last active.
        presence.disconnect(user, second.conn_id, false).await;
        let stored = history.stored_presence(vec![user]).await.unwrap();
        assert!(stored[0].last_active_ms >= closed_at, "{stored:?}");
    }

    #[tokio::test]
    async fn a_reconnect_during_a_timeout_stays_online() {
        // A sweep times out a silent user and removes their record after
        // two store round trips, during which the user connects again. It
        // used to delete the new connection's record and publish "offline"
        // after its "online": friends saw the user offline.
        let store = Held::new(Some(Op::Remove));
        let (_dir, _history, presence, [first, second], _endpoints) = tracker(store.clone()).await;
        let user = first.user_id;
        presence.connect(first.clone()).await;
        first.touch(now_ms() - 4 * 3_600_000);

        let sweep = {
            let presence = presence.clone();
            async move { presence.sweep().await }
        };
        store.around(sweep, presence.connect(second)).await;

        let states = presence.states(&[user]).await.unwrap();
        assert!(states[0].online, "{states:?}");
    }

    #[tokio::test]
    async fn a_disconnect_while_a_sweep_brings_the_user_back_leaves_them_offline() {
        // A sweep finds a timed-out user active again and refreshes their
        // record; their last connection closes meanwhile, and its
        // disconnect removes the record. The sweep's refresh used to put
        // the record back and publish "online" with nobody connected:
        // friends saw the user online until they next came and went.
        let store = Held::new(None);
        let (_dir, _history, presence, [first, _], _endpoints) = tracker(store.clone()).await;
        let user = first.user_id;
        presence.connect(first.clone()).await;
        first.touch(now_ms() - 4 * 3_600_000);
        presence.sweep().await;
        assert!(!presence.states(&[user]).await.unwrap()[0].online);

        first.touch(now_ms());
        store.arm(Op::Refresh);
        let sweep = {
            let presence = presence.clone();
            async move { presence.sweep().await }
        };
        store
            .around(sweep, presence.disconnect(user, 1, false))
            .await;

        let states = presence.states(&[user]).await.unwrap();
        assert!(!states[0].online, "{states:?}");
    }

    #[tokio::test]
    async fn a_user_whose_setting_cannot_be_read_is_shown_only_once_it_is() {
        // A user who hides their status connects while the setting cannot
        // be read. They used to be taken as not hiding, and friends saw
        // them online; now they count as hidden until a sweep reads the
        // setting, and one who does not hide is then shown online.
        let store = Held::new(None);
        let (_dir, history, presence, [first, watcher], _endpoints) = tracker(store.clone()).await;
        let user = first.user_id;
        // Published after the connect: its update comes in the same flush
        // as any news of the user, or a later one.
        let marker = user + 1_000;
        presence.watch(&watcher, &[], &[user, marker]);
        connect_unreadable(&history, &presence, first).await;
        presence.publish(marker, true, now_ms());
        let control = watcher.queue(StreamKind::Control).unwrap();
        let mut told = Vec::new();
        while !told
            .iter()
            .any(|s: &proto::PresenceState| s.user_id == marker)
        {
            told.extend(next_update(control).await);
        }
        assert!(
            told.iter().all(|s| s.user_id != user),
            "shown while unsure: {told:?}"
        );

        presence.sweep().await;
        let told = next_update(control).await;
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!((told[0].user_id, told[0].online), (user, true));
    }

    #[tokio::test]
    async fn a_user_taken_as_hidden_shows_when_another_device_reads_the_setting() {
        // The first connection could not read the setting (taken as
        // hidden); a second one reads it, not hidden. The user was online
        // already, so that connect used to publish nothing, and the sweep
        // no longer looked (the setting was known): friends saw the user
        // offline until their next change.
        let store = Held::new(None);
        let (_dir, history, presence, [first, second], _endpoints) = tracker(store.clone()).await;
        let user = first.user_id;
        let (_server, _client, conn) = connection().await;
        let watcher =
            SessionHandle::new(3, user + 1, [3; 32], conn, Arc::new(Metrics::new()), false);
        presence.watch(&watcher, &[], &[user]);
        connect_unreadable(&history, &presence, first).await;
        presence.connect(second).await;
        let control = watcher.queue(StreamKind::Control).unwrap();
        let told = next_update(control).await;
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!((told[0].user_id, told[0].online), (user, true));
    }

    #[tokio::test]
    async fn hiding_during_a_connect_is_not_followed_by_online() {
        // A connect reads "not hidden", then refreshes the record; the user
        // hides meanwhile (another device), which publishes "offline". The
        // connect then published "online" from what it had read, and
        // friends saw the user online after they hid.
        let store = Held::new(Some(Op::Refresh));
        let (_dir, _history, presence, [first, watcher], _endpoints) = tracker(store.clone()).await;
        let user = first.user_id;
        let marker = user + 1_000;
        presence.watch(&watcher, &[], &[user, marker]);
        let connecting = {
            let presence = presence.clone();
            async move { presence.connect(first).await }
        };
        store
            .around(connecting, async {
                presence.set_hidden(user, true).await.unwrap();
            })
            .await;
        presence.publish(marker, true, now_ms());
        let control = watcher.queue(StreamKind::Control).unwrap();
        let mut told = Vec::new();
        while !told
            .iter()
            .any(|s: &proto::PresenceState| s.user_id == marker)
        {
            told.extend(next_update(control).await);
        }
        assert!(
            told.iter().all(|s| s.user_id != user || !s.online),
            "shown online after hiding: {told:?}"
        );
    }

    #[tokio::test]
    async fn a_device_taken_offline_by_the_sweep_keeps_its_last_activity_when_it_closes() {
        // An app in the background keeps its connection without frames:
        // the sweep takes the user offline at their last activity. When the
        // connection closed hours later, the close time was stored (and
        // the store keeps the later time), so friends read "active" then.
        let active = now_ms() - 4 * 3_600_000;
        let state = state_after_close(active, true, false).await;
        assert_eq!((state.online, state.last_active_ms), (false, active));
    }

    #[tokio::test]
    async fn a_connection_that_timed_out_leaves_its_last_activity() {
        // Online, then the network vanished: the connection ends when it
        // times out, a while after the user's last frame, which is when
        // they were last active (not the timeout).
        let active = now_ms() - 30_000;
        let state = state_after_close(active, false, true).await;
        assert_eq!((state.online, state.last_active_ms), (false, active));
    }

    /// A user's state once their one connection, last active at `active`,
    /// has closed (`timed_out` or not), after a sweep first if `swept`.
    async fn state_after_close(active: i64, swept: bool, timed_out: bool) -> proto::PresenceState {
        let store = Held::new(None);
        let (_dir, _history, presence, [first, _], _endpoints) = tracker(store.clone()).await;
        let user = first.user_id;
        presence.connect(first.clone()).await;
        first.touch(active);
        if swept {
            presence.sweep().await;
        }
        presence.disconnect(user, 1, timed_out).await;
        presence.states(&[user]).await.unwrap().remove(0)
    }

    #[tokio::test]
    async fn a_heartbeat_read_after_the_disconnect_puts_no_record_back() {
        // A heartbeat already buffered is read after its connection ended
        // and the disconnect removed the user's record; its refresh put the
        // record back, with no entry here for a sweep to remove, so
        // friends' snapshots said online for a TTL.
        let store = Held::new(None);
        let (_dir, _history, presence, [first, _], _endpoints) = tracker(store.clone()).await;
        let user = first.user_id;
        presence.connect(first.clone()).await;
        presence.disconnect(user, 1, false).await;
        presence.heartbeat(&first).await;
        assert!(!presence.states(&[user]).await.unwrap()[0].online);
    }

    #[tokio::test]
    async fn a_user_active_without_heartbeats_keeps_their_record() {
        // Any frame keeps a connection active, heartbeats or not (an app
        // in the background sends none but may still send messages); only
        // heartbeats refreshed the store's record, so it expired while
        // pushes said online and snapshots said offline. The sweep now
        // refreshes it.
        let store = Held::new(None);
        let (_dir, _history, presence, [first, _], _endpoints) = tracker(store.clone()).await;
        let user = first.user_id;
        presence.connect(first.clone()).await;
        // Its record expired; the user was active since by other frames.
        store.inner.remove(user, "node".into()).await.unwrap();
        presence.users.get_mut(&user).unwrap().refreshed_ms = 0;
        first.touch(now_ms());
        assert!(!presence.states(&[user]).await.unwrap()[0].online);
        presence.sweep().await;
        assert!(presence.states(&[user]).await.unwrap()[0].online);
    }

    /// Connects `session` while its user's stored presence cannot be read
    /// (its column renamed away for the call).
    async fn connect_unreadable(
        history: &SqliteStore,
        presence: &Presence,
        session: Arc<SessionHandle>,
    ) {
        history
            .execute_for_test(
                "ALTER TABLE users RENAME COLUMN presence_hidden_at_ms TO hidden_elsewhere",
            )
            .await;
        presence.connect(session).await;
        history
            .execute_for_test(
                "ALTER TABLE users RENAME COLUMN hidden_elsewhere TO presence_hidden_at_ms",
            )
            .await;
    }

    /// The states of the next presence update queued on a control queue.
    async fn next_update(control: &crate::queue::OutQueue) -> Vec<proto::PresenceState> {
        let out = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Some(out) = control.try_recv() {
                    return out;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("a presence update in time");
        let frame = chat_protocol::Codec::default()
            .decode(&mut bytes::BytesMut::from(&out.bytes[..]))
            .unwrap()
            .unwrap();
        match frame.body {
            Some(Body::PresenceUpdate(update)) => update.states,
            other => panic!("a presence update, got {other:?}"),
        }
    }
}
