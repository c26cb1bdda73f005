//! Storage behind traits, so that stream handlers never know which backend
//! is configured.
//!
//! * [`HistoryStore`]: the source of truth. Users, sessions, friends,
//!   conversations, members with their delivered / seen watermarks, and
//!   messages. Embedded: [`sqlite::SqliteStore`]. Production:
//!   [`postgres::PostgresStore`].
//! * [`RecentCache`]: the last messages of each conversation, so opening a
//!   chat does not touch history. Embedded: [`recent::MemoryRecentCache`].
//!   Production: a capped Redis list ([`self::redis::RedisStore`]).
//! * [`InboxStore`]: each user's unread queue. Production only
//!   ([`self::redis::RedisStore`]); in the embedded backend the queue is the
//!   history itself (every message above the member's delivered watermark),
//!   which is also how a Redis queue is checked and, after a flush,
//!   recomputed.
//! * [`presence::PresenceStore`]: online records with a TTL.
//!
//! Every backend passes the same suite in [`conformance`].

pub mod conformance;
pub mod instrumented;
pub mod postgres;
pub mod presence;
pub mod recent;
pub mod redis;
pub mod sqlite;

#[cfg(test)]
mod migrations_pinned;

use std::sync::Arc;

use async_trait::async_trait;
use chat_protocol::proto;

/// A user's numeric id.
pub type UserId = u64;
/// A conversation's numeric id.
pub type ConversationId = u64;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A unique value (user name, ...) is already taken.
    #[error("already exists")]
    Conflict,
    /// The row the call refers to does not exist.
    #[error("not found")]
    NotFound,
    /// The user is not a member of the conversation.
    #[error("not a member of the conversation")]
    NotAMember,
    /// The change needs the admin role in the group.
    #[error("not an admin of the group")]
    NotAdmin,
    /// A size limit (group members) would be exceeded.
    #[error("limit reached")]
    LimitReached,
    /// Only friends of the actor may be put into a group, and only friends
    /// may send in their direct conversation; this user is not one.
    #[error("user {0} is not a friend")]
    NotFriends(UserId),
    /// The request makes no sense for this data (e.g. a group change on a
    /// direct conversation); the text says why.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The backend cannot be reached right now; retrying may work.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The answer to a commit was lost and its outcome could not be
    /// learned: what it wrote may be stored or not. Retryable like
    /// [`Unavailable`](Self::Unavailable) (a retry with the same keys
    /// finds out), but a caller that orders writes must not let later ones
    /// pass it until then (`crate::delivery`).
    #[error("store outcome unknown: {0}")]
    Unsettled(String),
    /// Anything else: corrupt data, a bug, a failed migration.
    #[error("store failure: {0}")]
    Internal(String),
}

/// A user's login record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Id.
    pub id: UserId,
    /// Lower-case user name.
    pub username: String,
    /// PHC string of the Argon2id hash.
    pub password_hash: String,
}

/// A session token's record. The token itself is never stored, only its
/// SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Owner.
    pub user_id: UserId,
    /// Unix ms after which the token is refused.
    pub expires_at_ms: i64,
    /// Set when the token was revoked.
    pub revoked_at_ms: Option<i64>,
}

/// A session to store, or a live one as it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    /// SHA-256 of the token.
    pub token_hash: [u8; 32],
    /// Owner.
    pub user_id: UserId,
    /// Device label given at login.
    pub device_name: String,
    /// Creation time, Unix ms.
    pub created_at_ms: i64,
    /// Expiry time, Unix ms.
    pub expires_at_ms: i64,
}

/// What a friend request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FriendRequestOutcome {
    /// A new pending request.
    Requested,
    /// Already pending; nothing changed.
    AlreadyRequested,
    /// The other user had asked us: now we are friends.
    Accepted,
    /// We were friends already.
    AlreadyFriends,
    /// Nothing changed: it would have taken the asker's friends and
    /// requests sent past the limit.
    AskerFull,
    /// Nothing changed: the other user has as many requests waiting for
    /// their answer as the limit.
    TargetFull,
    /// Nothing changed: the asker blocked the other user.
    Blocked,
    /// Nothing changed: the other user blocked the asker.
    BlockedBy,
}

/// What a block did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOutcome {
    /// Now blocked; `ended` when a friendship or a pending request between
    /// the two ended with it.
    Blocked {
        /// Whether a friendship or request ended.
        ended: bool,
    },
    /// Blocked already; nothing changed.
    AlreadyBlocked,
    /// Nothing changed: the user has blocked as many as the limit.
    Full,
}

/// A user's friends and pending requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FriendLists {
    /// Friends, by user name.
    pub friends: Vec<(UserId, String)>,
    /// Requests to us.
    pub incoming: Vec<(UserId, String)>,
    /// Requests from us.
    pub outgoing: Vec<(UserId, String)>,
    /// Users we blocked, by user name.
    pub blocked: Vec<(UserId, String)>,
}

/// How long a user's friend lists are (what the limits count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FriendCounts {
    /// Friends.
    pub friends: u64,
    /// Requests to the user not answered yet.
    pub incoming: u64,
    /// Requests from the user not answered yet.
    pub outgoing: u64,
}

/// A group to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGroup {
    /// Its first admin.
    pub creator: UserId,
    /// Its name.
    pub name: String,
    /// The other founding members (the creator and repeats are ignored).
    pub members: Vec<UserId>,
    /// The creator's idempotency key for this creation, if they gave one.
    pub client_key: Option<String>,
}

impl NewGroup {
    /// The founding members besides the creator, sorted and without
    /// repeats; `LimitReached` when they and the creator exceed
    /// `max_members`.
    pub fn others(&self, max_members: usize) -> Result<Vec<UserId>, StoreError> {
        let mut others: Vec<UserId> = self
            .members
            .iter()
            .copied()
            .filter(|&m| m != self.creator)
            .collect();
        others.sort_unstable();
        others.dedup();
        if others.len() + 1 > max_members {
            return Err(StoreError::LimitReached);
        }
        Ok(others)
    }
}

/// What [`HistoryStore::create_group`] did.
#[derive(Debug, Clone)]
pub enum GroupCreated {
    /// Created the group; its first SYSTEM message, for delivery.
    New(Appended),
    /// The creator's earlier request with the same key created this
    /// group; nothing was written.
    Existing(ConversationId),
}

/// A change to a group as its actor asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEdit {
    /// The group.
    pub conversation_id: ConversationId,
    /// Who changes it (for `Leave`, who leaves).
    pub actor: UserId,
    /// What changes.
    pub change: GroupChange,
    /// The actor's idempotency key, if they gave one: stored as the
    /// `client_msg_id` of the SYSTEM message recording the change.
    pub client_key: Option<String>,
}

impl GroupEdit {
    /// A change without a key.
    pub fn new(conversation_id: ConversationId, actor: UserId, change: GroupChange) -> Self {
        Self {
            conversation_id,
            actor,
            change,
            client_key: None,
        }
    }

    /// The same change under the actor's idempotency key.
    pub fn keyed(self, key: &str) -> Self {
        Self {
            client_key: Some(key.to_owned()),
            ..self
        }
    }
}

/// A change to a group, made by one of its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupChange {
    /// New name (any member).
    Rename(String),
    /// Add these users (admins only; friends of the actor only).
    Add(Vec<UserId>),
    /// Remove this member (admins only).
    Remove(UserId),
    /// The actor leaves.
    Leave,
    /// Promote (`true`) or demote a member (admins only).
    SetAdmin(UserId, bool),
}

/// The `client_msg_id` of a SYSTEM message its actor gave no key for.
pub(crate) fn random_system_key() -> String {
    format!("system:{:032x}", rand::random::<u128>())
}

/// Accepts `first` (what an actor's earlier request stored under the key of
/// a group edit) as the same edit repeated: only a SYSTEM message of that
/// group can be one. A key spent on a send or on another group is refused
/// rather than answered with something the edit did not do.
pub(crate) fn check_repeated_edit(
    first: &Appended,
    conversation_id: ConversationId,
) -> Result<(), StoreError> {
    if is_retry_of(&first.message, conversation_id, proto::MessageType::System) {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "client_key was already used for another request".into(),
        ))
    }
}

/// Largest backlog a catch-up reads from an [`InboxStore`] in one go;
/// longer ones (a month offline) are paged from history, so a backend
/// need keep no more than one entry past this per queue.
pub const INBOX_CATCH_UP_LIMIT: usize = 2_000;

/// Largest backlog, in encoded bytes, a catch-up holds from an
/// [`InboxStore`]: 2,000 maximum-size texts are ~32 MiB, which a device
/// reading its catch-up slowly held for as long as it kept reading (and
/// each of a user's 16 connections could). Longer ones are paged from
/// history, a page at a time.
pub const INBOX_CATCH_UP_BYTES: usize = 4 * 1024 * 1024;

/// Why a photo is refused in a second conversation.
pub(crate) const PHOTO_SENT_ELSEWHERE: &str =
    "this photo was sent to another conversation: upload it again to send it here";

/// Why demoting a group's only admin is refused: a group keeps an admin
/// while it has members (leaving promotes one; nothing else would).
pub(crate) const LAST_ADMIN: &str =
    "a group keeps at least one admin: make another member admin first";

/// The unique key of the direct conversation of `a` and `b`, in whichever
/// order they come.
pub(crate) fn direct_key(a: UserId, b: UserId) -> String {
    format!("{}:{}", a.min(b), a.max(b))
}

/// `original`, stored under the key `m` carries, answers `m` only if `m` is
/// its retry: same conversation, same type. A key reused for a message to
/// another conversation, or a group change's key on a send, is refused:
/// acknowledging it would tell the app a message was stored that was not.
pub(crate) fn check_retry(original: Appended, m: &NewMessage) -> Result<Appended, StoreError> {
    if is_retry_of(&original.message, m.conversation_id, m.message_type) {
        Ok(original)
    } else {
        Err(StoreError::Invalid(
            "client_msg_id was already used for another message".into(),
        ))
    }
}

/// Whether `stored`, found under a request's key, is what that request
/// (to `conversation_id`, of `kind`) stores: the request is its retry.
fn is_retry_of(
    stored: &proto::Message,
    conversation_id: ConversationId,
    kind: proto::MessageType,
) -> bool {
    stored.conversation_id == conversation_id && stored.r#type == kind as i32
}

/// The words of SYSTEM messages, shared by every backend so a group reads
/// the same whatever stores it.
pub mod system_text {
    /// A group was created.
    pub fn created(creator: &str, name: &str, members: &[String]) -> String {
        if members.is_empty() {
            format!("{creator} created the group \"{name}\"")
        } else {
            format!(
                "{creator} created the group \"{name}\" with {}",
                members.join(", ")
            )
        }
    }

    /// A member renamed the group.
    pub fn renamed(actor: &str, name: &str) -> String {
        format!("{actor} named the group \"{name}\"")
    }

    /// An admin added members.
    pub fn added(actor: &str, names: &[String]) -> String {
        format!("{actor} added {}", names.join(", "))
    }

    /// An admin removed a member.
    pub fn removed(actor: &str, name: &str) -> String {
        format!("{actor} removed {name}")
    }

    /// A member left.
    pub fn left(actor: &str) -> String {
        format!("{actor} left the group")
    }

    /// An admin promoted or demoted a member.
    pub fn role(actor: &str, name: &str, admin: bool) -> String {
        if admin {
            format!("{actor} made {name} an admin")
        } else {
            format!("{actor} made {name} a member")
        }
    }
}

/// What `membership` returns for a member (and `former_membership` for
/// one whose membership ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    /// The conversation's newest seq (for an ended membership, the seq of
    /// the message that ended it): the last the member may read.
    pub last_seq: u64,
    /// The first seq the member may read (0: everything).
    pub joined_seq: u64,
}

/// One member of a conversation and their watermarks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberState {
    /// The member.
    pub user_id: UserId,
    /// Their user name.
    pub username: String,
    /// Highest seq they acknowledged as delivered.
    pub delivered_seq: u64,
    /// Highest seq they marked as seen.
    pub seen_seq: u64,
    /// Group admin.
    pub admin: bool,
    /// First seq they may read.
    pub joined_seq: u64,
}

/// A conversation as one member sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationView {
    /// Id.
    pub id: ConversationId,
    /// Direct or group.
    pub kind: proto::ConversationKind,
    /// Group name, empty for direct conversations.
    pub name: String,
    /// Members and watermarks.
    pub members: Vec<MemberState>,
    /// Newest seq.
    pub last_seq: u64,
    /// Unix ms of the newest message or of creation.
    pub last_activity_ms: i64,
    /// The newest message, if any.
    pub last_message: Option<proto::Message>,
    /// Messages from others above the viewer's seen watermark, reactions
    /// and edits aside.
    pub unread_count: u64,
    /// A direct conversation whose two members are not friends (any more):
    /// nobody sends in it, and neither is shown the other's watermarks.
    pub closed: bool,
    /// Until when (Unix ms) the viewer muted it; 0 if they did not (or
    /// left it).
    pub muted_until_ms: i64,
    /// A group the viewer left or was removed from, as it was then: its
    /// name then, no members, the message that ended their stay as the
    /// newest (its seq and time), nothing unread.
    pub former: bool,
}

/// What a group member who deletes it is told.
pub const LEAVE_FIRST: &str = "leave the group before deleting it";

/// A message to append, after validation.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Target conversation.
    pub conversation_id: ConversationId,
    /// Author; must be a member.
    pub sender_id: UserId,
    /// Idempotency key, unique per sender.
    pub client_msg_id: String,
    /// Text, photo, system.
    pub message_type: proto::MessageType,
    /// Content: the text, or a photo's caption.
    pub text: String,
    /// For a photo, what the message carries of it (from the upload's
    /// record, [`HistoryStore::attach_media`]). Storing the message
    /// records its seq on the upload.
    pub photo: Option<Box<proto::Photo>>,
    /// For a CALL message (written by the server), the call.
    pub call: Option<Box<proto::CallLog>>,
    /// For a reply or a reaction, the seq of the message it refers to
    /// (checked by the caller, [`HistoryStore::reference`]); 0 for none.
    pub reply_to_seq: u64,
    /// For a REACTION (not a take-back) to another member's message, that
    /// member: the only one it notifies. Not stored.
    pub notify_only: Option<UserId>,
    /// Server time at submission, Unix ms.
    pub now_ms: i64,
}

/// Reactions, edits and unsends are not unread: the stores' unread counts
/// leave out MESSAGE_TYPE_REACTION, MESSAGE_TYPE_EDIT and
/// MESSAGE_TYPE_UNSEND (and messages unsent), which their SQL spells as
/// these numbers.
const _: () = assert!(
    proto::MessageType::Reaction as i32 == 5
        && proto::MessageType::Edit as i32 == 6
        && proto::MessageType::Unsend as i32 == 7
);

/// Whether `m`, an EDIT or an UNSEND, may rewrite a message of
/// `author` and `message_type` (the caller checked it with
/// [`HistoryStore::reference`]; the append checks it again, with whether
/// the message is unsent, in its write): one's own TEXT for an edit, one's
/// own TEXT or PHOTO for an unsend.
pub(crate) fn may_rewrite(m: &NewMessage, author: UserId, message_type: i32) -> bool {
    let text = message_type == proto::MessageType::Text as i32;
    let photo = message_type == proto::MessageType::Photo as i32;
    author == m.sender_id
        && match m.message_type {
            proto::MessageType::Edit => text,
            proto::MessageType::Unsend => text || photo,
            _ => false,
        }
}

/// What [`HistoryStore::reference`] finds for a reply or a reaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// The message named, which the sender may read.
    Readable(Referable),
    /// Nothing the sender may read at that seq.
    Unreadable,
    /// The send's key is stored already: its retry.
    Retry,
}

/// A message a reply or a reaction may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Referable {
    /// Its type: only TEXT and PHOTO messages take replies and reactions.
    pub message_type: proto::MessageType,
    /// Its author (a reaction notifies them; only they may edit it).
    pub sender_id: UserId,
    /// When it was stored, Unix ms (an edit must come within the edit
    /// window of it, an unsend within the unsend window).
    pub sent_at_ms: i64,
    /// Its sender unsent it: nothing may name it any more.
    pub unsent: bool,
}

/// A device's push registration (`RegisterPush`), kept with its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushDevice {
    /// The app as the push gateway knows it.
    pub app_id: String,
    /// The platform's push token for the app on the device.
    pub token: String,
    /// When the device registered it.
    pub registered_ms: i64,
}

/// An uploaded photo as history keeps it; its bytes are a file in the
/// node's media directory (`crate::media`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRecord {
    /// 32 lowercase hex digits ([`chat_protocol::media::is_media_id`]).
    pub media_id: String,
    /// The user who uploaded it.
    pub owner: UserId,
    /// Its format.
    pub media_type: proto::MediaType,
    /// Bytes.
    pub size: u64,
    /// Pixels, as declared.
    pub width: u32,
    /// Pixels, as declared.
    pub height: u32,
    /// SHA-256 of the bytes.
    pub sha256: [u8; 32],
    /// The uploader's preview (`MediaUpload.preview`; empty for none).
    pub preview: bytes::Bytes,
    /// When the upload was stored, Unix ms.
    pub created_ms: i64,
    /// The conversation a send named it for ([`HistoryStore::attach_media`]).
    pub conversation_id: Option<ConversationId>,
    /// The seq of the stored message that carries it, once one does: those
    /// it was sent to as members may fetch it
    /// ([`HistoryStore::was_member_at`]).
    pub seq: Option<u64>,
}

impl MediaRecord {
    /// What a PHOTO message carries of it.
    pub fn photo(&self) -> proto::Photo {
        proto::Photo {
            media_id: self.media_id.clone(),
            media_type: self.media_type as i32,
            size: self.size,
            width: self.width,
            height: self.height,
            sha256: bytes::Bytes::copy_from_slice(&self.sha256),
            preview: self.preview.clone(),
        }
    }
}

/// Encodes what a message carries besides its text for its row
/// (`attachment`, NULL for none): a PHOTO's photo, a CALL's call.
pub(crate) fn encode_attachment(m: &NewMessage) -> Option<Vec<u8>> {
    match (&m.photo, &m.call) {
        (Some(photo), _) => Some(prost::Message::encode_to_vec(&**photo)),
        (None, Some(call)) => Some(prost::Message::encode_to_vec(&**call)),
        (None, None) => None,
    }
}

/// Sets what a stored message's `attachment` holds, by the message's
/// type: a CALL's call, a PHOTO's photo. An attachment that does not
/// decode (which only a damaged row holds) reads as none rather than
/// failing the page.
pub(crate) fn decode_attachment(message: &mut proto::Message, attachment: Option<&[u8]>) {
    let Some(bytes) = attachment else {
        return;
    };
    let decoded = if message.r#type == proto::MessageType::Call as i32 {
        <proto::CallLog as prost::Message>::decode(bytes)
            .map(|call| message.call = Some(Box::new(call)))
    } else {
        <proto::Photo as prost::Message>::decode(bytes)
            .map(|photo| message.photo = Some(Box::new(photo)))
    };
    if let Err(e) = decoded {
        tracing::error!(
            error = %e,
            conversation_id = message.conversation_id,
            seq = message.seq,
            "a stored message's attachment does not decode"
        );
    }
}

/// The result of appending one message.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The stored message (the original one for a duplicate).
    pub message: Arc<proto::Message>,
    /// True when `client_msg_id` was already stored: nothing was written.
    pub duplicate: bool,
    /// Every member of the conversation, sender included. For a duplicate,
    /// only the other members whose delivered watermark is still below it:
    /// those who may never have been sent it (its first answer was lost
    /// before its fan-out, say), to whom the retry delivers it again.
    pub members: Vec<UserId>,
}

/// Which watermark to move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WatermarkKind {
    /// Delivered to the member's device.
    Delivered,
    /// Seen by the member (implies delivered).
    Seen,
}

/// A request to move a member's watermark forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatermarkUpdate {
    /// Conversation.
    pub conversation_id: ConversationId,
    /// Member whose watermark moves.
    pub user_id: UserId,
    /// Which one.
    pub kind: WatermarkKind,
    /// New value; values at or below the current one are ignored, values
    /// above the conversation's last seq are clamped to it.
    pub seq: u64,
}

/// Watermarks after an update that moved them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatermarkMoved {
    /// Conversation.
    pub conversation_id: ConversationId,
    /// Member whose watermarks moved.
    pub user_id: UserId,
    /// New delivered watermark.
    pub delivered_seq: u64,
    /// New seen watermark.
    pub seen_seq: u64,
    /// Who to notify: every member of the conversation (shared with the
    /// store's cache, so a move does not copy the list), or nobody in a
    /// closed direct conversation, whose two members are not friends any
    /// more ([`ConversationView::closed`]).
    pub members: Arc<Vec<UserId>>,
}

/// What history keeps of a user's presence: it outlives connections and
/// restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoredPresence {
    /// Unix ms of the last activity recorded (0: never).
    pub last_active_ms: i64,
    /// When the user hid their status (appear offline), if they did.
    pub hidden_at_ms: Option<i64>,
}

/// Direction of a history page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Seq below the cursor (cursor 0: the newest).
    Backward,
    /// Seq above the cursor.
    Forward,
}

/// One page of history, ascending by seq.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    /// Messages in ascending seq order.
    pub messages: Vec<Arc<proto::Message>>,
    /// More exist beyond this page in the direction asked.
    pub has_more: bool,
}

/// The durable store: the only source of truth.
///
/// Calls take owned arguments so that implementations can move them to a
/// database thread or connection pool.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Short backend name for logs and metrics labels.
    fn backend(&self) -> &'static str;

    /// A cheap round trip proving the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// This history's random name, made once with its schema: a node
    /// claims its Redis prefix for it at start, so that two histories
    /// never share one prefix's caches and queues.
    async fn history_id(&self) -> Result<String, StoreError>;

    /// Why this store can never work again in this process (the embedded
    /// store's writer thread died, say), for `/healthz`: the node must be
    /// restarted. `None` while it can, including while its database is
    /// unreachable (that heals, and `ping` reports it).
    fn broken(&self) -> Option<String> {
        None
    }

    /// Creates a user. `Conflict` if the name is taken.
    async fn create_user(
        &self,
        username: String,
        password_hash: String,
        now_ms: i64,
    ) -> Result<UserId, StoreError>;
    /// Looks up a user by (lower-case) name.
    async fn user_by_name(&self, username: String) -> Result<Option<UserRecord>, StoreError>;
    /// A user's name, if the user exists.
    async fn username(&self, user_id: UserId) -> Result<Option<String>, StoreError>;

    /// Stores a new session token hash.
    async fn create_session(&self, session: NewSession) -> Result<(), StoreError>;
    /// Stores the session of a login whose password was checked against
    /// `verified` (the user's hash then): `Conflict`, and nothing stored,
    /// if the user's hash is no longer that one. A login racing a
    /// password change either sees the change or is revoked by it.
    async fn create_login_session(
        &self,
        session: NewSession,
        verified: String,
    ) -> Result<(), StoreError>;
    /// Looks up a session by token hash.
    async fn session(&self, token_hash: [u8; 32]) -> Result<Option<SessionRecord>, StoreError>;
    /// Revokes a session; true if it existed and was not revoked already.
    async fn revoke_session(&self, token_hash: [u8; 32], now_ms: i64) -> Result<bool, StoreError>;
    /// The user's live sessions (neither revoked nor expired at
    /// `now_ms`) as they were created, newest first, at most `limit`.
    async fn live_sessions(
        &self,
        user: UserId,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<NewSession>, StoreError>;
    /// Revokes the user's live session whose token hash begins with `id`
    /// (see `auth::session_id`); its token hash, `None` if there is none.
    async fn revoke_session_by_id(
        &self,
        user: UserId,
        id: Vec<u8>,
        now_ms: i64,
    ) -> Result<Option<[u8; 32]>, StoreError>;
    /// Replaces the user's password hash `old` (the one the change was
    /// checked against: `Conflict` if it is not the user's any more) with
    /// `new` and revokes every live session of theirs but `keep`, in one
    /// transaction; the token hashes it revoked.
    async fn change_password(
        &self,
        user: UserId,
        old: String,
        new: String,
        keep: [u8; 32],
        now_ms: i64,
    ) -> Result<Vec<[u8; 32]>, StoreError>;
    /// Deletes up to `limit` sessions that expired or were revoked before
    /// `ended_before_ms`; how many it deleted (fewer than `limit`: none
    /// are left).
    async fn purge_sessions(&self, ended_before_ms: i64, limit: u32) -> Result<u64, StoreError>;

    /// `from` asks `to` to be friends, with no limit (set-up and tests).
    async fn friend_request(
        &self,
        from: UserId,
        to: UserId,
        now_ms: i64,
    ) -> Result<FriendRequestOutcome, StoreError> {
        self.friend_request_within(from, to, now_ms, u64::MAX).await
    }
    /// `from` asks `to` to be friends. A new request must leave `from`'s
    /// friends plus requests sent, and `to`'s requests waiting, within
    /// `max_friends`; accepting `to`'s request to `from` must leave
    /// `from`'s friends plus requests sent within it (the other side's
    /// count does not change). Checked in the change's transaction, so
    /// exact however requests race: SQLite has one writer, and Postgres
    /// takes both users' count locks.
    /// Repeats and requests between friends answer as without a limit.
    /// Between two users one of whom blocked the other, nothing changes
    /// (`Blocked` or `BlockedBy`; see [`block`](Self::block)).
    async fn friend_request_within(
        &self,
        from: UserId,
        to: UserId,
        now_ms: i64,
        max_friends: u64,
    ) -> Result<FriendRequestOutcome, StoreError>;
    /// `user` accepts the pending request from `from`, with no limit
    /// (set-up and tests). `NotFound` if there is none.
    async fn friend_accept(
        &self,
        user: UserId,
        from: UserId,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.friend_accept_within(user, from, now_ms, u64::MAX)
            .await
            .map(|_| ())
    }
    /// `user` accepts the pending request from `from` if that leaves
    /// `user`'s friends plus requests sent within `max_friends`: true if
    /// accepted, false (nothing changed) if not. Checked in the change's
    /// transaction, so racing accepts and requests count each other.
    /// `NotFound` if there is no such request.
    async fn friend_accept_within(
        &self,
        user: UserId,
        from: UserId,
        now_ms: i64,
        max_friends: u64,
    ) -> Result<bool, StoreError>;
    /// `user` declines the pending request from `from`; false if none.
    async fn friend_decline(&self, user: UserId, from: UserId) -> Result<bool, StoreError>;
    /// Ends a friendship or cancels a pending request in either direction;
    /// false if there was nothing. The pair's direct conversation takes no
    /// more sends (see [`append`](Self::append)).
    async fn friend_remove(&self, user: UserId, other: UserId) -> Result<bool, StoreError>;
    /// `user` blocks `other`: in one step, ends their friendship and
    /// pending requests in either direction (as
    /// [`friend_remove`](Self::friend_remove) does) and records the block,
    /// unless `user` has blocked `max_blocked` others already. While it
    /// lasts, [`friend_request_within`](Self::friend_request_within)
    /// between the two answers `Blocked` / `BlockedBy`; a request and a
    /// block are ordered as two requests are. `NotFound` if `other` has no
    /// account.
    async fn block(
        &self,
        user: UserId,
        other: UserId,
        now_ms: i64,
        max_blocked: u64,
    ) -> Result<BlockOutcome, StoreError>;
    /// Ends `user`'s block of `other`; false if there was none.
    async fn unblock(&self, user: UserId, other: UserId) -> Result<bool, StoreError>;
    /// A user's friends, pending requests and blocked users.
    async fn friends(&self, user: UserId) -> Result<FriendLists, StoreError>;
    /// Whether the two users are friends.
    async fn are_friends(&self, a: UserId, b: UserId) -> Result<bool, StoreError>;
    /// How many friends and pending requests a user has.
    async fn friend_counts(&self, user: UserId) -> Result<FriendCounts, StoreError>;

    /// The direct conversation of two users, created if missing. The caller
    /// checks that they are friends.
    async fn open_direct(
        &self,
        a: UserId,
        b: UserId,
        now_ms: i64,
    ) -> Result<ConversationId, StoreError>;
    /// A conversation as `viewer` sees it. `NotAMember` if `viewer` is not
    /// a member (also when the conversation does not exist, so ids cannot be
    /// probed).
    async fn conversation(
        &self,
        conversation_id: ConversationId,
        viewer: UserId,
    ) -> Result<ConversationView, StoreError>;
    /// A user's conversations, most recently active first (ties: higher id
    /// first), after the cursor `before` = (last_activity_ms, id) of the
    /// previous page's last conversation: active strictly before that time,
    /// or at that time with a smaller id. `(0, 0)`: the first page. Groups
    /// they left or were removed from, and are not a member of again, are
    /// listed too, as of the end of their last stay
    /// ([`ConversationView::former`]; its time is when that stay ended).
    async fn conversations(
        &self,
        user: UserId,
        before: (i64, ConversationId),
        limit: u32,
    ) -> Result<Vec<ConversationView>, StoreError>;
    /// The conversation's last seq and the member's joined seq if `user` is
    /// a member, else `None`: membership, freshness (the history handler
    /// checks cached pages against it) and the readable range in one lookup.
    /// For a direct conversation `user` deleted, the joined seq is the one
    /// after what they cleared ([`delete_conversation`](Self::delete_conversation)).
    async fn membership(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<Option<Membership>, StoreError>;

    /// Creates a group of its creator (its first admin) and members and
    /// stores its first SYSTEM message, which is returned for delivery.
    /// `LimitReached` beyond `max_members`. A key the creator used before
    /// creates nothing and names the group it created.
    async fn create_group(
        &self,
        group: NewGroup,
        max_members: usize,
        now_ms: i64,
    ) -> Result<GroupCreated, StoreError>;

    /// Applies a change to a group and stores the SYSTEM message recording
    /// it, in the conversation's seq order, returned for delivery (its
    /// `members` include a removed or leaving member, who gets this last
    /// message). Refusals: `NotAMember` (actor), `NotAdmin`, `NotFound`
    /// (target not a member), `LimitReached`, `Invalid`.
    ///
    /// A keyed edit whose key the actor gave before to a change of this
    /// group changes nothing and returns that change's message as a
    /// duplicate, before any refusal is considered (a repeated leave or
    /// removal finds its target gone, yet answers as the first did). A key
    /// the actor used for anything else (a send, another group) is
    /// `Invalid`.
    async fn change_group(
        &self,
        edit: GroupEdit,
        max_members: usize,
        now_ms: i64,
    ) -> Result<Appended, StoreError>;
    /// Whether `user` is a member of the conversation.
    async fn is_member(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<bool, StoreError>;
    /// The last of `user`'s ended memberships of the conversation, as the
    /// range history lets them read: from where they joined to the message
    /// that ended it (`last_seq`). `None` if they were never a member, or
    /// their membership ended before such ranges were recorded.
    async fn former_membership(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<Option<Membership>, StoreError>;
    /// Whether message `seq` of the conversation was sent to `user` as a
    /// member: one who joined at or before it, now or in a membership
    /// that has since ended (they left, or were removed, by a later
    /// message or that one). Photo fetches ask it, so a member who leaves
    /// keeps the photos of what they were sent, and history reads their
    /// last stay ([`former_membership`](Self::former_membership)).
    async fn was_member_at(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        seq: u64,
    ) -> Result<bool, StoreError>;

    /// "Delete chat" for `user`. A direct conversation of theirs is
    /// cleared up to `up_to_seq` (at most its last seq), for them alone:
    /// it starts after it ([`membership`](Self::membership)'s
    /// `joined_seq`, so history), catch-up owes them nothing up to it
    /// ([`undelivered`](Self::undelivered),
    /// [`pending_ranges`](Self::pending_ranges)), nothing before it is
    /// unread, and it leaves their list until a later message. A group
    /// they left or were removed from is forgotten: its list entry,
    /// history, photos and what catch-up still owed them of it (its
    /// departure) are no longer theirs. `Invalid` for a group they are a
    /// member of (they leave it first), `NotAMember` otherwise. Returns
    /// the seq a direct conversation was cleared to, 0 for a group.
    async fn delete_conversation(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        up_to_seq: u64,
    ) -> Result<u64, StoreError>;

    /// Mutes a conversation of its member `user` until `until_ms` (Unix
    /// ms; 0, or any time past, unmutes it): its messages notify none of
    /// their devices meanwhile. `NotAMember` if they are not one.
    async fn set_muted(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        until_ms: i64,
    ) -> Result<(), StoreError>;

    /// Until when `user` muted a conversation ([`set_muted`](Self::set_muted)),
    /// or 0.
    async fn muted_until(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<i64, StoreError>;

    /// The members, ascending, of a conversation `user` may send in: what
    /// is passed on there without being stored (typing) goes to them.
    /// `NotAMember` if `user` is not one (or the conversation does not
    /// exist); `NotFriends` naming the other in a direct conversation
    /// whose two members are not friends (any more).
    async fn audience(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<Arc<Vec<UserId>>, StoreError>;

    /// What a reply or a reaction of `user`'s, sent under `client_msg_id`,
    /// names at `seq` of a conversation: a retry if that key is stored
    /// already (the append answers it as it did the first time, whatever
    /// changed since); else the message, if they may read it as a member
    /// now (from the seq that added them on, and after what they cleared
    /// by deleting the chat, as history reads). `NotAMember` if `user` is
    /// not one (or the conversation does not exist). A message is
    /// rewritten once at most, by its unsending (`Referable::unsent`), so
    /// what this finds stays true but for that: the append checks it
    /// again for an EDIT or an UNSEND.
    async fn reference(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        seq: u64,
        client_msg_id: String,
    ) -> Result<Reference, StoreError>;

    /// Appends a batch of messages in one transaction (group commit): each
    /// gets the next seq of its conversation, or is recognised as a retry.
    /// Results are in input order; one failing message (e.g. `NotAMember`)
    /// does not fail the others. Returns only after the batch is durable.
    ///
    /// A direct conversation takes sends only while its two members are
    /// friends: after [`friend_remove`](Self::friend_remove) either one's
    /// new message is refused with `NotFriends` naming the other (history
    /// stays readable, watermarks still move, and a retry of a message
    /// stored before still gets its original answer), until they are
    /// friends again. A send and a removal are ordered: a send either is
    /// stored before the removal or is refused.
    ///
    /// An UNSEND (checked by the caller with [`reference`](Self::reference))
    /// erases, in its transaction, the text and attachment of the message
    /// it names and the texts of that message's EDITs, marks them
    /// `unsent`, and takes a photo's upload off the message (its seq
    /// cleared: no one but its uploader may fetch it, and the purge
    /// deletes it after `upload-retention`). An EDIT or UNSEND of a message
    /// unsent by then (the caller's check raced the unsend) is refused
    /// `NotFound`.
    async fn append(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError>;
    /// A page of history. The caller has checked membership.
    async fn history(
        &self,
        conversation_id: ConversationId,
        direction: Direction,
        cursor: u64,
        limit: u32,
    ) -> Result<Page, StoreError>;
    /// Messages from others above `user`'s delivered watermark (and above
    /// what they cleared by deleting the chat), ordered by
    /// (conversation, seq), starting strictly after `after` (a
    /// (conversation, seq) cursor) for paging. A group `user` was removed
    /// from while their device had not had everything counts up to the
    /// message that removed them, until a watermark move of theirs there
    /// reaches it ([`advance_watermarks`](Self::advance_watermarks) takes
    /// non-members' moves for this) or they rejoin.
    async fn undelivered(
        &self,
        user: UserId,
        after: (ConversationId, u64),
        limit: u32,
    ) -> Result<Vec<Arc<proto::Message>>, StoreError>;
    /// Conversations where `user`'s delivered watermark (or, if higher, what
    /// they cleared by deleting the chat) is below the last seq (for a
    /// group they were removed from, the removal's seq; see
    /// [`undelivered`](Self::undelivered)): a cheap index lookup used to
    /// check an [`InboxStore`] queue before trusting it. `None` when the backend cannot answer cheaply
    /// (callers then read history).
    async fn pending_ranges(&self, user: UserId) -> Result<Option<Vec<PendingRange>>, StoreError> {
        let _ = user;
        Ok(None)
    }
    /// Moves watermarks forward, all in one transaction. Returns the
    /// updates that moved something (coalesced: one entry per member and
    /// conversation).
    async fn advance_watermarks(
        &self,
        updates: Vec<WatermarkUpdate>,
    ) -> Result<Vec<WatermarkMoved>, StoreError>;
    /// Records a user's last activity (kept if later than the stored one).
    async fn record_last_active(&self, user: UserId, last_active_ms: i64)
    -> Result<(), StoreError>;
    /// Hides (`Some(now)`) or shows (`None`) a user's online status.
    async fn set_presence_hidden(
        &self,
        user: UserId,
        hidden_at_ms: Option<i64>,
    ) -> Result<(), StoreError>;
    /// Stored presence of `users`, in order (default for unknown users).
    async fn stored_presence(&self, users: Vec<UserId>) -> Result<Vec<StoredPresence>, StoreError>;

    /// Other members' watermarks in `user`'s `limit` most recently active
    /// conversations, so a reconnecting sender learns the receipts it
    /// missed; those of more than `max_members` members are left out, as
    /// their moves are not broadcast either (see `crate::receipts`): a
    /// member of many large groups would otherwise be sent every member's
    /// watermarks on each connection. Nor is the other member's of a
    /// closed direct conversation ([`ConversationView::closed`]).
    async fn receipt_snapshot(
        &self,
        user: UserId,
        limit: u32,
        max_members: u32,
    ) -> Result<Vec<proto::Receipt>, StoreError>;

    /// Records an upload whose bytes are durable in the media directory.
    /// `Conflict` if its id is taken.
    async fn create_media(&self, media: MediaRecord) -> Result<(), StoreError>;

    /// The upload with this id, if there is one.
    async fn media(&self, media_id: &str) -> Result<Option<MediaRecord>, StoreError>;

    /// Binds `owner`'s upload to the conversation a send names, before the
    /// send is appended (whose transaction then records the message's seq
    /// on it), and returns it. A photo goes to one conversation: naming it
    /// again for the same one (a retry, or a resend) is fine and counts as
    /// binding it again at `now_ms`, for another one is `Invalid`.
    /// `NotFound` unless `owner` uploaded it; `NotAMember` unless `owner`
    /// is a member of the conversation.
    async fn attach_media(
        &self,
        media_id: &str,
        owner: UserId,
        conversation_id: ConversationId,
        now_ms: i64,
    ) -> Result<MediaRecord, StoreError>;

    /// Deletes up to `limit` uploads that no stored message carries:
    /// those no send bound ([`attach_media`]) uploaded before `before_ms`,
    /// and those last bound before `bound_before_ms` (a send refused after
    /// its binding leaves its upload to this; the caller keeps the bound
    /// ones long enough for any append in flight to have ended). Returns
    /// their ids (their files are the caller's to delete). Fewer than
    /// `limit`: none are left.
    ///
    /// [`attach_media`]: Self::attach_media
    async fn purge_media(
        &self,
        before_ms: i64,
        bound_before_ms: i64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError>;

    /// Which of `media_ids` have a row (the others' files, if any, are
    /// left over from a stop between a file's rename and its row, or
    /// between a purge's rows and its files).
    async fn media_present(&self, media_ids: Vec<String>) -> Result<Vec<String>, StoreError>;

    /// Sets (`Some`) or clears the push registration of the unrevoked
    /// session `token_hash`. A token set here is taken from every other
    /// session that held it for the same app, in the same transaction:
    /// a token names an app on a device, and only the session that gave it
    /// last may have that device's notifications. False if the session is
    /// unknown or revoked.
    async fn set_push(
        &self,
        token_hash: [u8; 32],
        device: Option<PushDevice>,
    ) -> Result<bool, StoreError>;
    /// The push registrations of `user`'s sessions that are neither
    /// revoked nor expired at `now_ms`.
    async fn push_devices(&self, user: UserId, now_ms: i64) -> Result<Vec<PushDevice>, StoreError>;
    /// Forgets a token the push gateway rejected (the app was uninstalled,
    /// or the platform retired the token) where it was registered at or
    /// before `registered_by_ms` (the registration the rejected request
    /// carried; one made since, by a new session, is kept). Returns how
    /// many sessions held it.
    async fn drop_push_token(
        &self,
        app_id: String,
        token: String,
        registered_by_ms: i64,
    ) -> Result<u64, StoreError>;
    /// How many of `user`'s conversations have a message (not a reaction
    /// nor an edit)
    /// from someone else above the user's seen watermark and what they
    /// cleared by deleting the chat (the app's badge), counted up to `cap`.
    async fn unread_conversations(&self, user: UserId, cap: u32) -> Result<u32, StoreError>;
}

/// The last messages of each conversation, kept where reads are cheap.
///
/// It is only a cache: a miss (`None`) sends the caller to
/// [`HistoryStore::history`], and so does any backend failure (logged, not
/// returned). Implementations must never return a page that history would
/// answer differently.
#[async_trait]
pub trait RecentCache: Send + Sync + 'static {
    /// Records newly appended messages. Called in seq order per
    /// conversation, by the single writer that appends them.
    async fn push(&self, messages: &[Arc<proto::Message>]);
    /// Up to `limit` messages with seq below `before` (0: the newest), in
    /// ascending order, if the cache can answer exactly as history would:
    /// only from a run that ends at `newest`, the conversation's last seq
    /// as the reader found it. A run behind it may hold what a later
    /// message changed (an unsend erases the message it names), so it
    /// misses, whatever page is asked.
    async fn page_before(
        &self,
        conversation_id: ConversationId,
        before: u64,
        limit: u32,
        newest: u64,
    ) -> Option<Page>;
}

/// Per recipient, the messages not yet delivered: a fast copy of what
/// history's watermarks already say, so reconnecting devices do not scan
/// history.
///
/// Never trusted blindly: before catch-up uses a queue, it is checked
/// against [`HistoryStore::pending_ranges`] and history is used instead
/// when they disagree (after a flush, a lost push, an outage).
#[async_trait]
pub trait InboxStore: Send + Sync + 'static {
    /// Short backend name for logs and metrics labels.
    fn backend(&self) -> &'static str;
    /// Queues stored messages for recipients (pipelined, one round trip).
    async fn push(&self, entries: Vec<(UserId, Arc<proto::Message>)>) -> Result<(), StoreError>;
    /// The user's queued messages, in (conversation, seq) order; `None`
    /// when more than `limit` are queued, without reading them (catch-up
    /// then reads history, so a user back to many long queues costs a
    /// count, not their contents), or, once read, when they are more than
    /// [`INBOX_CATCH_UP_BYTES`].
    async fn pending(
        &self,
        user: UserId,
        limit: usize,
    ) -> Result<Option<Vec<Arc<proto::Message>>>, StoreError>;
    /// Drops, per (user, conversation), everything up to the seq.
    async fn ack(&self, acks: Vec<(UserId, ConversationId, u64)>) -> Result<(), StoreError>;
    /// Drops what no catch-up of `user` will send: entries at or below the
    /// delivered seq of each conversation in `pending` (conversation,
    /// delivered), and the whole queue of every other conversation (one
    /// with nothing pending, such as one the user left). For queues past
    /// what a catch-up reads, where [`pending`](Self::pending) reads
    /// nothing to drop them by.
    async fn trim(
        &self,
        user: UserId,
        pending: Vec<(ConversationId, u64)>,
    ) -> Result<(), StoreError>;
}

/// A conversation where a member may have messages to receive: every seq in
/// `delivered_seq + 1 ..= last_seq` that someone else sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingRange {
    /// Conversation.
    pub conversation_id: ConversationId,
    /// The member's delivered watermark, or what they cleared by deleting
    /// the chat if that is higher (nothing up to it is owed to them).
    pub delivered_seq: u64,
    /// The conversation's newest seq; for one `departed`, the seq of the
    /// message that ended their membership.
    pub last_seq: u64,
    /// A group the user was removed from and was not yet delivered all of
    /// up to their removal (`departures`): catch-up reads history for it,
    /// never the unread queue, which a later unsend (not queued for them,
    /// no longer a member) does not reach.
    pub departed: bool,
}
