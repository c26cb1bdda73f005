//! Store wrappers that time every call into
//! `chat_store_operation_duration_seconds{backend, operation, result}`.
//!
//! The backends stay free of metrics; the endpoint wraps whatever it
//! opened. `result` is `error` only for backend failures (unavailable,
//! internal); refusals such as "not a member" are answers, not failures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chat_protocol::proto;

use super::presence::{OnlineRecord, PresenceStore};
use super::{
    Appended, BlockOutcome, ConversationId, ConversationView, Direction, FriendCounts, FriendLists,
    FriendRequestOutcome, GroupCreated, GroupEdit, HistoryStore, InboxStore, MediaRecord,
    Membership, NewGroup, NewMessage, NewSession, Page, PendingRange, PushDevice, RecentCache,
    Reference, SessionRecord, StoreError, StoredPresence, UserId, UserRecord, WatermarkMoved,
    WatermarkUpdate,
};
use crate::metrics::Metrics;

/// A store of type `S` whose calls are timed.
pub struct Instrumented<S: ?Sized> {
    inner: Arc<S>,
    backend: &'static str,
    metrics: Arc<Metrics>,
}

impl<S: ?Sized> Instrumented<S> {
    /// Wraps `inner`, labelling its calls with `backend`.
    pub fn new(inner: Arc<S>, backend: &'static str, metrics: Arc<Metrics>) -> Self {
        Instrumented {
            inner,
            backend,
            metrics,
        }
    }

    fn record<T>(&self, operation: &'static str, result: &Result<T, StoreError>, took: Duration) {
        let failed = matches!(
            result,
            Err(StoreError::Unavailable(_) | StoreError::Unsettled(_) | StoreError::Internal(_))
        );
        self.metrics
            .store_op(self.backend, operation, !failed, took);
    }
}

/// Awaits a store call and records its duration under `$op`.
macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let start = Instant::now();
        let result = $call.await;
        $self.record($op, &result, start.elapsed());
        result
    }};
}

#[async_trait]
impl HistoryStore for Instrumented<dyn HistoryStore> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed!(self, "ping", self.inner.ping())
    }

    async fn history_id(&self) -> Result<String, StoreError> {
        timed!(self, "history_id", self.inner.history_id())
    }

    fn broken(&self) -> Option<String> {
        self.inner.broken()
    }

    async fn create_user(
        &self,
        username: String,
        password_hash: String,
        now_ms: i64,
    ) -> Result<UserId, StoreError> {
        timed!(
            self,
            "create_user",
            self.inner.create_user(username, password_hash, now_ms)
        )
    }

    async fn user_by_name(&self, username: String) -> Result<Option<UserRecord>, StoreError> {
        timed!(self, "user_by_name", self.inner.user_by_name(username))
    }

    async fn username(&self, user_id: UserId) -> Result<Option<String>, StoreError> {
        timed!(self, "username", self.inner.username(user_id))
    }

    async fn create_session(&self, session: NewSession) -> Result<(), StoreError> {
        timed!(self, "create_session", self.inner.create_session(session))
    }

    async fn session(&self, token_hash: [u8; 32]) -> Result<Option<SessionRecord>, StoreError> {
        timed!(self, "session", self.inner.session(token_hash))
    }

    async fn revoke_session(&self, token_hash: [u8; 32], now_ms: i64) -> Result<bool, StoreError> {
        timed!(
            self,
            "revoke_session",
            self.inner.revoke_session(token_hash, now_ms)
        )
    }

    async fn live_sessions(
        &self,
        user: UserId,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<NewSession>, StoreError> {
        timed!(
            self,
            "live_sessions",
            self.inner.live_sessions(user, now_ms, limit)
        )
    }

    async fn create_login_session(
        &self,
        session: NewSession,
        verified: String,
    ) -> Result<(), StoreError> {
        timed!(
            self,
            "create_login_session",
            self.inner.create_login_session(session, verified)
        )
    }

    async fn revoke_session_by_id(
        &self,
        user: UserId,
        id: Vec<u8>,
        now_ms: i64,
    ) -> Result<Option<[u8; 32]>, StoreError> {
        timed!(
            self,
            "revoke_session_by_id",
            self.inner.revoke_session_by_id(user, id, now_ms)
        )
    }

    async fn change_password(
        &self,
        user: UserId,
        old: String,
        new: String,
        keep: [u8; 32],
        now_ms: i64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        timed!(
            self,
            "change_password",
            self.inner.change_password(user, old, new, keep, now_ms)
        )
    }

    async fn purge_sessions(&self, ended_before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        timed!(
            self,
            "purge_sessions",
            self.inner.purge_sessions(ended_before_ms, limit)
        )
    }

    async fn friend_request_within(
        &self,
        from: UserId,
        to: UserId,
        now_ms: i64,
        max_friends: u64,
    ) -> Result<FriendRequestOutcome, StoreError> {
        timed!(
            self,
            "friend_request",
            self.inner
                .friend_request_within(from, to, now_ms, max_friends)
        )
    }

    async fn friend_accept_within(
        &self,
        user: UserId,
        from: UserId,
        now_ms: i64,
        max_friends: u64,
    ) -> Result<bool, StoreError> {
        timed!(
            self,
            "friend_accept",
            self.inner
                .friend_accept_within(user, from, now_ms, max_friends)
        )
    }

    async fn friend_decline(&self, user: UserId, from: UserId) -> Result<bool, StoreError> {
        timed!(
            self,
            "friend_decline",
            self.inner.friend_decline(user, from)
        )
    }

    async fn friend_remove(&self, user: UserId, other: UserId) -> Result<bool, StoreError> {
        timed!(self, "friend_remove", self.inner.friend_remove(user, other))
    }

    async fn block(
        &self,
        user: UserId,
        other: UserId,
        now_ms: i64,
        max_blocked: u64,
    ) -> Result<BlockOutcome, StoreError> {
        timed!(
            self,
            "block",
            self.inner.block(user, other, now_ms, max_blocked)
        )
    }

    async fn unblock(&self, user: UserId, other: UserId) -> Result<bool, StoreError> {
        timed!(self, "unblock", self.inner.unblock(user, other))
    }

    async fn friends(&self, user: UserId) -> Result<FriendLists, StoreError> {
        timed!(self, "friends", self.inner.friends(user))
    }

    async fn are_friends(&self, a: UserId, b: UserId) -> Result<bool, StoreError> {
        timed!(self, "are_friends", self.inner.are_friends(a, b))
    }

    async fn friend_counts(&self, user: UserId) -> Result<FriendCounts, StoreError> {
        timed!(self, "friend_counts", self.inner.friend_counts(user))
    }

    async fn open_direct(
        &self,
        a: UserId,
        b: UserId,
        now_ms: i64,
    ) -> Result<ConversationId, StoreError> {
        timed!(self, "open_direct", self.inner.open_direct(a, b, now_ms))
    }

    async fn conversation(
        &self,
        conversation_id: ConversationId,
        viewer: UserId,
    ) -> Result<ConversationView, StoreError> {
        timed!(
            self,
            "conversation",
            self.inner.conversation(conversation_id, viewer)
        )
    }

    async fn conversations(
        &self,
        user: UserId,
        before: (i64, ConversationId),
        limit: u32,
    ) -> Result<Vec<ConversationView>, StoreError> {
        timed!(
            self,
            "conversations",
            self.inner.conversations(user, before, limit)
        )
    }

    async fn membership(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<Option<Membership>, StoreError> {
        timed!(
            self,
            "membership",
            self.inner.membership(conversation_id, user)
        )
    }

    async fn create_group(
        &self,
        group: NewGroup,
        max_members: usize,
        now_ms: i64,
    ) -> Result<GroupCreated, StoreError> {
        timed!(
            self,
            "create_group",
            self.inner.create_group(group, max_members, now_ms)
        )
    }

    async fn change_group(
        &self,
        edit: GroupEdit,
        max_members: usize,
        now_ms: i64,
    ) -> Result<Appended, StoreError> {
        timed!(
            self,
            "change_group",
            self.inner.change_group(edit, max_members, now_ms)
        )
    }

    async fn is_member(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<bool, StoreError> {
        timed!(
            self,
            "is_member",
            self.inner.is_member(conversation_id, user)
        )
    }

    async fn delete_conversation(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        up_to_seq: u64,
    ) -> Result<u64, StoreError> {
        timed!(
            self,
            "delete_conversation",
            self.inner
                .delete_conversation(conversation_id, user, up_to_seq)
        )
    }

    async fn set_muted(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        until_ms: i64,
    ) -> Result<(), StoreError> {
        timed!(
            self,
            "set_muted",
            self.inner.set_muted(conversation_id, user, until_ms)
        )
    }

    async fn muted_until(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<i64, StoreError> {
        timed!(
            self,
            "muted_until",
            self.inner.muted_until(conversation_id, user)
        )
    }

    async fn audience(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<Arc<Vec<UserId>>, StoreError> {
        timed!(self, "audience", self.inner.audience(conversation_id, user))
    }

    async fn reference(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        seq: u64,
        client_msg_id: String,
    ) -> Result<Reference, StoreError> {
        timed!(
            self,
            "reference",
            self.inner
                .reference(conversation_id, user, seq, client_msg_id)
        )
    }

    async fn former_membership(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<Option<Membership>, StoreError> {
        timed!(
            self,
            "former_membership",
            self.inner.former_membership(conversation_id, user)
        )
    }

    async fn was_member_at(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        seq: u64,
    ) -> Result<bool, StoreError> {
        timed!(
            self,
            "was_member_at",
            self.inner.was_member_at(conversation_id, user, seq)
        )
    }

    async fn append(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
        timed!(self, "append", self.inner.append(batch))
    }

    async fn history(
        &self,
        conversation_id: ConversationId,
        direction: Direction,
        cursor: u64,
        limit: u32,
    ) -> Result<Page, StoreError> {
        timed!(
            self,
            "history",
            self.inner
                .history(conversation_id, direction, cursor, limit)
        )
    }

    async fn undelivered(
        &self,
        user: UserId,
        after: (ConversationId, u64),
        limit: u32,
    ) -> Result<Vec<Arc<proto::Message>>, StoreError> {
        timed!(
            self,
            "undelivered",
            self.inner.undelivered(user, after, limit)
        )
    }

    async fn pending_ranges(&self, user: UserId) -> Result<Option<Vec<PendingRange>>, StoreError> {
        timed!(self, "pending_ranges", self.inner.pending_ranges(user))
    }

    async fn advance_watermarks(
        &self,
        updates: Vec<WatermarkUpdate>,
    ) -> Result<Vec<WatermarkMoved>, StoreError> {
        timed!(
            self,
            "advance_watermarks",
            self.inner.advance_watermarks(updates)
        )
    }

    async fn record_last_active(
        &self,
        user: UserId,
        last_active_ms: i64,
    ) -> Result<(), StoreError> {
        timed!(
            self,
            "record_last_active",
            self.inner.record_last_active(user, last_active_ms)
        )
    }

    async fn set_presence_hidden(
        &self,
        user: UserId,
        hidden_at_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        timed!(
            self,
            "set_presence_hidden",
            self.inner.set_presence_hidden(user, hidden_at_ms)
        )
    }

    async fn stored_presence(&self, users: Vec<UserId>) -> Result<Vec<StoredPresence>, StoreError> {
        timed!(self, "stored_presence", self.inner.stored_presence(users))
    }

    async fn receipt_snapshot(
        &self,
        user: UserId,
        limit: u32,
        max_members: u32,
    ) -> Result<Vec<proto::Receipt>, StoreError> {
        timed!(
            self,
            "receipt_snapshot",
            self.inner.receipt_snapshot(user, limit, max_members)
        )
    }

    async fn create_media(&self, media: MediaRecord) -> Result<(), StoreError> {
        timed!(self, "create_media", self.inner.create_media(media))
    }

    async fn media(&self, media_id: &str) -> Result<Option<MediaRecord>, StoreError> {
        timed!(self, "media", self.inner.media(media_id))
    }

    async fn attach_media(
        &self,
        media_id: &str,
        owner: UserId,
        conversation_id: ConversationId,
        now_ms: i64,
    ) -> Result<MediaRecord, StoreError> {
        timed!(
            self,
            "attach_media",
            self.inner
                .attach_media(media_id, owner, conversation_id, now_ms)
        )
    }

    async fn purge_media(
        &self,
        before_ms: i64,
        bound_before_ms: i64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        timed!(
            self,
            "purge_media",
            self.inner.purge_media(before_ms, bound_before_ms, limit)
        )
    }

    async fn media_present(&self, media_ids: Vec<String>) -> Result<Vec<String>, StoreError> {
        timed!(self, "media_present", self.inner.media_present(media_ids))
    }

    async fn set_push(
        &self,
        token_hash: [u8; 32],
        device: Option<PushDevice>,
    ) -> Result<bool, StoreError> {
        timed!(self, "set_push", self.inner.set_push(token_hash, device))
    }

    async fn push_devices(&self, user: UserId, now_ms: i64) -> Result<Vec<PushDevice>, StoreError> {
        timed!(self, "push_devices", self.inner.push_devices(user, now_ms))
    }

    async fn drop_push_token(
        &self,
        app_id: String,
        token: String,
        registered_by_ms: i64,
    ) -> Result<u64, StoreError> {
        timed!(
            self,
            "drop_push_token",
            self.inner.drop_push_token(app_id, token, registered_by_ms)
        )
    }

    async fn unread_conversations(&self, user: UserId, cap: u32) -> Result<u32, StoreError> {
        timed!(
            self,
            "unread_conversations",
            self.inner.unread_conversations(user, cap)
        )
    }
}

#[async_trait]
impl InboxStore for Instrumented<dyn InboxStore> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn push(&self, entries: Vec<(UserId, Arc<proto::Message>)>) -> Result<(), StoreError> {
        timed!(self, "inbox_push", self.inner.push(entries))
    }

    async fn pending(
        &self,
        user: UserId,
        limit: usize,
    ) -> Result<Option<Vec<Arc<proto::Message>>>, StoreError> {
        timed!(self, "inbox_pending", self.inner.pending(user, limit))
    }

    async fn ack(&self, acks: Vec<(UserId, ConversationId, u64)>) -> Result<(), StoreError> {
        timed!(self, "inbox_ack", self.inner.ack(acks))
    }

    async fn trim(
        &self,
        user: UserId,
        pending: Vec<(ConversationId, u64)>,
    ) -> Result<(), StoreError> {
        timed!(self, "inbox_trim", self.inner.trim(user, pending))
    }
}

#[async_trait]
impl PresenceStore for Instrumented<dyn PresenceStore> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed!(self, "ping", self.inner.ping())
    }

    async fn refresh(
        &self,
        user: UserId,
        record: OnlineRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        timed!(
            self,
            "presence_refresh",
            self.inner.refresh(user, record, ttl)
        )
    }

    async fn remove(&self, user: UserId, node: String) -> Result<(), StoreError> {
        timed!(self, "presence_remove", self.inner.remove(user, node))
    }

    async fn online(&self, users: Vec<UserId>) -> Result<Vec<Option<OnlineRecord>>, StoreError> {
        timed!(self, "presence_online", self.inner.online(users))
    }
}

/// The recent cache swallows its own errors, so only durations are kept
/// (`result` is always `ok`).
#[async_trait]
impl RecentCache for Instrumented<dyn RecentCache> {
    async fn push(&self, messages: &[Arc<proto::Message>]) {
        let start = Instant::now();
        self.inner.push(messages).await;
        self.record::<()>("recent_push", &Ok(()), start.elapsed());
    }

    async fn page_before(
        &self,
        conversation_id: ConversationId,
        before: u64,
        limit: u32,
        newest: u64,
    ) -> Option<Page> {
        let start = Instant::now();
        let page = self
            .inner
            .page_before(conversation_id, before, limit, newest)
            .await;
        self.record::<()>("recent_page", &Ok(()), start.elapsed());
        page
    }
}
