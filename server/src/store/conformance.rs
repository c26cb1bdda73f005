//! One behavioural suite that every [`HistoryStore`] backend must pass.
//!
//! Each check is a plain `async fn` taking the store; the
//! [`history_store_conformance!`](crate::history_store_conformance) macro
//! expands them into `#[tokio::test]`s around a constructor that the backend
//! provides (given a fresh temporary directory, it returns a fresh, empty
//! store). Checks only use what the trait promises.

use std::collections::HashSet;
use std::sync::Arc;

use chat_protocol::proto;

use super::*;

/// Expands every conformance check into a `#[tokio::test]`.
///
/// With one argument, it is an expression callable as `f(PathBuf) -> impl
/// Future<Output = impl HistoryStore>`; the directory is a fresh temporary
/// one per test.
///
/// With a second argument, for backends outside the process: the
/// constructor returns `impl Future<Output = Option<impl HistoryStore>>`
/// (`None` skips the test; the constructor says why), and the teardown,
/// callable as `g(store) -> impl Future<Output = ()>`, runs after the check
/// even when the check failed, so that a test leaves nothing behind.
#[macro_export]
macro_rules! history_store_conformance {
    ($new_store:expr) => {
        $crate::history_store_conformance!(@list (@plain $new_store));
    };
    ($new_store:expr, $teardown:expr) => {
        $crate::history_store_conformance!(@list (@teardown $new_store, $teardown));
    };
    (@list $mode:tt) => {
        $crate::history_store_conformance!(@tests $mode;
            users,
            sessions,
            live_sessions_and_password_changes,
            friend_requests,
            ended_sessions_are_purged,
            friend_limits,
            concurrent_friend_requests_stay_within_the_limits,
            direct_conversations,
            append_assigns_seq_and_is_idempotent,
            append_refuses_non_members_without_failing_the_batch,
            direct_sends_need_friendship,
            blocks,
            history_paging_edges,
            undelivered_and_watermarks,
            undelivered_pages_across_conversations,
            conversation_list,
            concurrent_appends_get_distinct_contiguous_seqs,
            stored_presence,
            history_has_a_name_of_its_own,
            pending_ranges_and_membership,
            groups,
            group_creation_keys,
            group_edit_keys,
            duplicates_name_the_members_still_owed,
            removed_members_catch_up_to_their_removal,
            former_members_were_sent_up_to_their_departure,
            left_groups_stay_listed_as_they_were,
            the_audience_is_the_members_who_may_hear,
            replies_and_reactions_refer_to_readable_messages,
            unsending_erases_the_message_and_its_edits,
            unsends_check_their_author_and_reach_those_removed,
            mutes,
            deleting_conversations,
            moves_share_their_conversations_member_list,
            closed_direct_conversations_keep_their_watermarks_to_themselves,
            photos,
            call_logs,
            push_registrations,
            unread_conversations_count_others_messages,
        );
    };
    (@tests $mode:tt; $($name:ident),* $(,)?) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::history_store_conformance!(@run $name $mode);
                }
            )*
        }
    };
    (@run $name:ident (@plain $new_store:expr)) => {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = ($new_store)(dir.path().to_path_buf()).await;
        $crate::store::conformance::$name(&store).await;
    };
    (@run $name:ident (@teardown $new_store:expr, $teardown:expr)) => {
        let dir = tempfile::tempdir().expect("temp dir");
        let Some(store) = ($new_store)(dir.path().to_path_buf()).await else {
            return;
        };
        let store = ::std::sync::Arc::new(store);
        let checked = ::std::sync::Arc::clone(&store);
        // The check runs in its own task so that a failed assertion still
        // reaches the teardown.
        let outcome =
            tokio::spawn(async move { $crate::store::conformance::$name(&*checked).await })
                .await;
        match ::std::sync::Arc::into_inner(store) {
            Some(store) => ($teardown)(store).await,
            None => panic!("the store outlived its check"),
        }
        match outcome {
            Ok(()) => {}
            Err(e) if e.is_panic() => ::std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the check did not finish: {e}"),
        }
    };
}

async fn user(store: &impl HistoryStore, name: &str) -> UserId {
    store
        .create_user(name.into(), format!("hash-{name}"), 1)
        .await
        .expect("create user")
}

/// `user`'s friends' names, in the order the store lists them.
async fn friend_names(store: &impl HistoryStore, user: UserId) -> Vec<String> {
    let lists = store.friends(user).await.unwrap();
    lists.friends.into_iter().map(|(_, name)| name).collect()
}

/// Makes `a` and `b` friends, if they are not yet.
async fn befriend(store: &impl HistoryStore, a: UserId, b: UserId) {
    if !store.are_friends(a, b).await.unwrap() {
        store.friend_request(a, b, 1).await.unwrap();
        store.friend_accept(b, a, 2).await.unwrap();
    }
}

/// Two new users `a` and `b`, friends, and their direct conversation.
pub async fn friends_with_direct(
    store: &impl HistoryStore,
    a: &str,
    b: &str,
) -> (UserId, UserId, ConversationId) {
    let a = user(store, a).await;
    let b = user(store, b).await;
    store.friend_request(a, b, 1).await.unwrap();
    store.friend_accept(b, a, 2).await.unwrap();
    let c = store.open_direct(a, b, 3).await.unwrap();
    (a, b, c)
}

/// A text message to append.
pub fn text(
    conversation_id: ConversationId,
    sender_id: UserId,
    key: &str,
    body: &str,
    now_ms: i64,
) -> NewMessage {
    NewMessage {
        conversation_id,
        sender_id,
        client_msg_id: key.into(),
        message_type: proto::MessageType::Text,
        text: body.into(),
        photo: None,
        call: None,
        reply_to_seq: 0,
        notify_only: None,
        now_ms,
    }
}

/// An upload record of `owner`, as the media stream makes one.
pub fn upload(media_id: &str, owner: UserId, created_ms: i64) -> MediaRecord {
    MediaRecord {
        media_id: media_id.into(),
        owner,
        media_type: proto::MediaType::Png,
        size: 123_456,
        width: 640,
        height: 480,
        sha256: [7; 32],
        preview: bytes::Bytes::from_static(b"\x89PNG\r\n\x1a\n a tiny preview"),
        created_ms,
        conversation_id: None,
        seq: None,
    }
}

/// A group "trip" of `creator` and `members` (limit 5).
async fn trip(store: &impl HistoryStore, creator: UserId, members: Vec<UserId>) -> ConversationId {
    for &member in &members {
        befriend(store, creator, member).await;
    }
    created(
        store
            .create_group(new_group(creator, "trip", members, None), 5, 10)
            .await,
    )
    .message
    .conversation_id
}

async fn append_one(store: &impl HistoryStore, m: NewMessage) -> Appended {
    store.append(vec![m]).await.unwrap().pop().unwrap().unwrap()
}

fn seqs(messages: &[Arc<proto::Message>]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

/// Users are unique by name and can be found by name and id; the store
/// answers a ping (what `/readyz` asks).
pub async fn users(store: &impl HistoryStore) {
    store.ping().await.expect("a working store answers a ping");
    let id = store
        .create_user("alice".into(), "h1".into(), 10)
        .await
        .unwrap();
    assert!(matches!(
        store.create_user("alice".into(), "h2".into(), 11).await,
        Err(StoreError::Conflict)
    ));
    let bob = store
        .create_user("bob".into(), "h3".into(), 12)
        .await
        .unwrap();
    assert_ne!(id, bob);
    let rec = store.user_by_name("alice".into()).await.unwrap().unwrap();
    assert_eq!(
        rec,
        UserRecord {
            id,
            username: "alice".into(),
            password_hash: "h1".into()
        }
    );
    assert_eq!(store.user_by_name("carol".into()).await.unwrap(), None);
    assert_eq!(store.username(bob).await.unwrap().as_deref(), Some("bob"));
    assert_eq!(store.username(9_999_999).await.unwrap(), None);
}

/// Sessions are found by token hash and revoked once.
pub async fn sessions(store: &impl HistoryStore) {
    let alice = user(store, "alice").await;
    let hash = [7u8; 32];
    store
        .create_session(NewSession {
            token_hash: hash,
            user_id: alice,
            device_name: "phone".into(),
            created_at_ms: 100,
            expires_at_ms: 200,
        })
        .await
        .unwrap();
    let rec = store.session(hash).await.unwrap().unwrap();
    assert_eq!(
        rec,
        SessionRecord {
            user_id: alice,
            expires_at_ms: 200,
            revoked_at_ms: None
        }
    );
    assert_eq!(store.session([8u8; 32]).await.unwrap(), None);
    assert!(store.revoke_session(hash, 150).await.unwrap());
    assert!(
        !store.revoke_session(hash, 160).await.unwrap(),
        "second revoke is a no-op"
    );
    assert_eq!(
        store.session(hash).await.unwrap().unwrap().revoked_at_ms,
        Some(150)
    );
}

/// A user's live sessions are listed newest first, without the expired,
/// the revoked and other users', and revoked by id; a password change
/// checked against the current hash stores the new one and revokes every
/// live session but the one it keeps, and says which; a login checked
/// against a hash changed since stores no session.
pub async fn live_sessions_and_password_changes(store: &impl HistoryStore) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let open = |n: u8, user_id: UserId, created_at_ms: i64, expires_at_ms: i64| NewSession {
        token_hash: [n; 32],
        user_id,
        device_name: format!("device {n}"),
        created_at_ms,
        expires_at_ms,
    };
    for session in [
        open(1, alice, 100, 10_000),
        open(2, alice, 200, 10_000),
        open(3, alice, 300, 500),
        open(4, alice, 400, 10_000),
        open(5, bob, 500, 10_000),
    ] {
        store.create_session(session).await.unwrap();
    }
    store.revoke_session([4; 32], 450).await.unwrap();
    let hashes = |sessions: Vec<NewSession>| -> Vec<u8> {
        sessions.iter().map(|s| s.token_hash[0]).collect()
    };
    let live = store.live_sessions(alice, 1_000, 10).await.unwrap();
    assert_eq!(live[0], open(2, alice, 200, 10_000), "as created");
    assert_eq!(
        hashes(live),
        vec![2, 1],
        "newest first; not expired or revoked"
    );
    assert_eq!(
        hashes(store.live_sessions(alice, 1_000, 1).await.unwrap()),
        vec![2]
    );
    assert_eq!(
        hashes(store.live_sessions(alice, 150, 10).await.unwrap()),
        vec![3, 2, 1],
        "not expired yet"
    );

    // A session is revoked by its id (the start of its token's hash),
    // only the user's own and only a live one.
    assert_eq!(
        store
            .revoke_session_by_id(bob, vec![2; 16], 1_000)
            .await
            .unwrap(),
        None,
        "not bob's"
    );
    assert_eq!(
        store
            .revoke_session_by_id(alice, vec![3; 16], 1_000)
            .await
            .unwrap(),
        None,
        "expired"
    );
    store
        .create_session(open(6, alice, 600, 10_000))
        .await
        .unwrap();
    assert_eq!(
        store
            .revoke_session_by_id(alice, vec![6; 16], 1_000)
            .await
            .unwrap(),
        Some([6; 32])
    );
    assert_eq!(
        store
            .revoke_session_by_id(alice, vec![6; 16], 1_000)
            .await
            .unwrap(),
        None,
        "revoked already"
    );

    // A password change checked against a hash that is no longer the
    // user's changes nothing.
    assert!(matches!(
        store
            .change_password(alice, "hash-stale".into(), "hash-x".into(), [1; 32], 1_000)
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        hashes(store.live_sessions(alice, 1_000, 10).await.unwrap()),
        vec![2, 1]
    );
    let revoked = store
        .change_password(
            alice,
            "hash-alice".into(),
            "hash-new".into(),
            [1; 32],
            1_000,
        )
        .await
        .unwrap();
    assert_eq!(revoked, vec![[2; 32]], "only the live ones not kept");
    let stored = store.user_by_name("alice".into()).await.unwrap().unwrap();
    assert_eq!(stored.password_hash, "hash-new");
    assert_eq!(
        store.session([2; 32]).await.unwrap().unwrap().revoked_at_ms,
        Some(1_000)
    );
    assert_eq!(
        store.session([4; 32]).await.unwrap().unwrap().revoked_at_ms,
        Some(450)
    );
    assert_eq!(
        hashes(store.live_sessions(alice, 1_000, 10).await.unwrap()),
        vec![1]
    );
    assert_eq!(
        hashes(store.live_sessions(bob, 1_000, 10).await.unwrap()),
        vec![5]
    );
    let bobs = store.user_by_name("bob".into()).await.unwrap().unwrap();
    assert_eq!(bobs.password_hash, "hash-bob");

    // A login checked against the old hash stores no session; one checked
    // against the current hash does.
    assert!(matches!(
        store
            .create_login_session(open(7, alice, 1_100, 10_000), "hash-alice".into())
            .await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(store.session([7; 32]).await.unwrap(), None);
    store
        .create_login_session(open(8, alice, 1_200, 10_000), "hash-new".into())
        .await
        .unwrap();
    assert_eq!(
        hashes(store.live_sessions(alice, 1_300, 10).await.unwrap()),
        vec![8, 1]
    );
}

/// Sessions that ended (expired or revoked) before a time are deleted, a
/// bounded number at a time; live ones, and those that ended later, stay.
pub async fn ended_sessions_are_purged(store: &impl HistoryStore) {
    let alice = user(store, "alice").await;
    let session = |n: u8, expires_at_ms: i64| NewSession {
        token_hash: [n; 32],
        user_id: alice,
        device_name: format!("device {n}"),
        created_at_ms: 0,
        expires_at_ms,
    };
    // 1-3 expired at 100, 200, 300; 4 and 5 live until 10,000, 5 revoked
    // at 150; 6 revoked at 900.
    for (n, expires) in [
        (1, 100),
        (2, 200),
        (3, 300),
        (4, 10_000),
        (5, 10_000),
        (6, 10_000),
    ] {
        store.create_session(session(n, expires)).await.unwrap();
    }
    assert!(store.revoke_session([5; 32], 150).await.unwrap());
    assert!(store.revoke_session([6; 32], 900).await.unwrap());
    // Ended before 250: 1, 2 and 5, at most two a call.
    assert_eq!(store.purge_sessions(250, 2).await.unwrap(), 2);
    assert_eq!(store.purge_sessions(250, 2).await.unwrap(), 1);
    assert_eq!(store.purge_sessions(250, 2).await.unwrap(), 0);
    let left = |n: u8| async move { store.session([n; 32]).await.unwrap().is_some() };
    for n in [1, 2, 5] {
        assert!(!left(n).await, "session {n} ended before 250");
    }
    for n in [3, 4, 6] {
        assert!(left(n).await, "session {n} ended after 250 or lives");
    }
    // The rest that ended: 3 (expired) and 6 (revoked), not 4.
    assert_eq!(store.purge_sessions(1_000, 100).await.unwrap(), 2);
    assert!(left(4).await);
    assert!(!left(3).await && !left(6).await);
}

/// Requests, mutual requests, accept, decline, remove, and the lists.
pub async fn friend_requests(store: &impl HistoryStore) {
    let a = user(store, "alice").await;
    let b = user(store, "bob").await;
    let c = user(store, "carol").await;
    use FriendRequestOutcome::*;
    assert_eq!(store.friend_request(a, b, 1).await.unwrap(), Requested);
    assert_eq!(
        store.friend_request(a, b, 2).await.unwrap(),
        AlreadyRequested
    );
    let lists = store.friends(b).await.unwrap();
    assert_eq!(lists.incoming, vec![(a, "alice".to_string())]);
    assert!(lists.friends.is_empty());
    assert_eq!(
        store.friends(a).await.unwrap().outgoing,
        vec![(b, "bob".to_string())]
    );
    assert!(!store.are_friends(a, b).await.unwrap());
    // Asking someone who asked us accepts.
    assert_eq!(store.friend_request(b, a, 3).await.unwrap(), Accepted);
    assert!(store.are_friends(a, b).await.unwrap());
    assert!(store.are_friends(b, a).await.unwrap());
    assert_eq!(store.friend_request(a, b, 4).await.unwrap(), AlreadyFriends);
    let lists = store.friends(a).await.unwrap();
    assert_eq!(lists.friends, vec![(b, "bob".to_string())]);
    assert!(lists.incoming.is_empty() && lists.outgoing.is_empty());
    assert_eq!(
        store.friend_counts(a).await.unwrap(),
        FriendCounts {
            friends: 1,
            incoming: 0,
            outgoing: 0
        }
    );

    // Accept without a request, decline, accept.
    assert!(matches!(
        store.friend_accept(a, c, 5).await,
        Err(StoreError::NotFound)
    ));
    store.friend_request(c, a, 6).await.unwrap();
    assert!(store.friend_decline(a, c).await.unwrap());
    assert!(!store.friend_decline(a, c).await.unwrap());
    assert!(!store.are_friends(a, c).await.unwrap());
    store.friend_request(c, a, 7).await.unwrap();
    store.friend_accept(a, c, 8).await.unwrap();
    let names = friend_names(store, a).await;
    assert_eq!(names, vec!["bob", "carol"], "ordered by name");
    // By bytes, whatever the database's locale (in `en_US` "b-z" would
    // come after "ba": punctuation is ignored at first).
    for name in ["ba", "b-z"] {
        let id = user(store, name).await;
        store.friend_request(id, a, 8).await.unwrap();
        store.friend_accept(a, id, 8).await.unwrap();
    }
    let names = friend_names(store, a).await;
    assert_eq!(names, vec!["b-z", "ba", "bob", "carol"], "ordered by bytes");

    // Remove ends the friendship on both sides; removing again is a no-op.
    assert!(store.friend_remove(b, a).await.unwrap());
    assert!(!store.are_friends(a, b).await.unwrap());
    assert!(!store.friend_remove(b, a).await.unwrap());
    // Remove also cancels a pending request.
    store.friend_request(a, b, 9).await.unwrap();
    assert!(store.friend_remove(a, b).await.unwrap());
    assert!(store.friends(b).await.unwrap().incoming.is_empty());
}

/// `friend_request_within`: friends plus requests sent, and requests
/// waiting for an answer, stay within the limit; what would not change
/// anything answers as without one.
pub async fn friend_limits(store: &impl HistoryStore) {
    use FriendRequestOutcome::*;
    let [a, b, c, d, e, f] = [
        user(store, "alice").await,
        user(store, "bob").await,
        user(store, "carol").await,
        user(store, "dave").await,
        user(store, "erin").await,
        user(store, "frank").await,
    ];
    let max = 2;
    let ask = |from, to| store.friend_request_within(from, to, 1, max);
    // Alice: one friend and one request sent make two.
    assert_eq!(ask(a, b).await.unwrap(), Requested);
    assert_eq!(ask(b, a).await.unwrap(), Accepted);
    assert_eq!(ask(a, c).await.unwrap(), Requested);
    assert_eq!(ask(a, d).await.unwrap(), AskerFull);
    // At the limit, a repeat and a request to a friend answer as usual.
    assert_eq!(ask(a, c).await.unwrap(), AlreadyRequested);
    assert_eq!(ask(a, b).await.unwrap(), AlreadyFriends);
    // Accepting by asking back adds a friend: refused at the limit.
    assert_eq!(ask(d, a).await.unwrap(), Requested);
    assert_eq!(ask(a, d).await.unwrap(), AskerFull);
    // Requests waiting for Alice: dave's and erin's, then no more; but
    // Alice's own request to carol is carol's to accept whatever waits.
    assert_eq!(ask(e, a).await.unwrap(), Requested);
    assert_eq!(ask(f, a).await.unwrap(), TargetFull);
    assert_eq!(ask(c, a).await.unwrap(), Accepted);
    // Refusals changed nothing.
    assert_eq!(
        store.friend_counts(a).await.unwrap(),
        FriendCounts {
            friends: 2,
            incoming: 2,
            outgoing: 0
        }
    );
    assert_eq!(
        store.friend_counts(f).await.unwrap(),
        FriendCounts::default()
    );
}

/// Requests and accepts racing on different pairs count each other: of
/// many asking one user at once, exactly the limit's worth wait for an
/// answer; of one user asking many at once, exactly the limit's worth go
/// out; of one user accepting many at once (from several devices),
/// exactly the limit's worth become friends.
pub async fn concurrent_friend_requests_stay_within_the_limits(store: &impl HistoryStore) {
    use FriendRequestOutcome::*;
    const MAX: u64 = 3;
    const MANY: usize = 16;
    let target = user(store, "popular").await;
    let asker = user(store, "eager").await;
    let accepter = user(store, "welcoming").await;
    let mut others = Vec::with_capacity(MANY);
    for i in 0..MANY {
        let other = user(store, &format!("other{i}")).await;
        store.friend_request(other, accepter, 1).await.unwrap();
        others.push(other);
    }
    let accepted = futures_join_all(
        others
            .iter()
            .map(|&from| store.friend_accept_within(accepter, from, 1, MAX)),
    )
    .await;
    assert_split(&accepted, true, false, MAX);
    let counts = store.friend_counts(accepter).await.unwrap();
    assert_eq!(
        (counts.friends, counts.incoming),
        (MAX, (MANY as u64) - MAX)
    );
    assert!(matches!(
        store.friend_accept_within(accepter, target, 1, MAX).await,
        Err(StoreError::NotFound)
    ));

    let outcomes = futures_join_all(
        others
            .iter()
            .map(|&from| store.friend_request_within(from, target, 1, MAX)),
    )
    .await;
    assert_split(&outcomes, Requested, TargetFull, MAX);
    assert_eq!(store.friend_counts(target).await.unwrap().incoming, MAX);

    let outcomes = futures_join_all(
        others
            .iter()
            .map(|&to| store.friend_request_within(asker, to, 1, MAX)),
    )
    .await;
    assert_split(&outcomes, Requested, AskerFull, MAX);
    assert_eq!(store.friend_counts(asker).await.unwrap().outgoing, MAX);
}

/// Asserts that exactly `max` of racing `results` are `yes` and the rest
/// `no`.
fn assert_split<T: PartialEq + std::fmt::Debug>(
    results: &[Result<T, StoreError>],
    yes: T,
    no: T,
    max: u64,
) {
    let count = |want: &T| {
        results
            .iter()
            .filter(|r| r.as_ref().ok() == Some(want))
            .count()
    };
    assert_eq!(
        (count(&yes), count(&no)),
        (max as usize, results.len() - max as usize),
        "{results:?}"
    );
}

/// One direct conversation per pair, visible to its members only.
pub async fn direct_conversations(store: &impl HistoryStore) {
    let (a, b, c) = friends_with_direct(store, "alice", "bob").await;
    assert_eq!(
        store.open_direct(b, a, 10).await.unwrap(),
        c,
        "same pair, same conversation"
    );
    let outsider = user(store, "eve").await;
    let view = store.conversation(c, a).await.unwrap();
    assert_eq!(view.kind, proto::ConversationKind::Direct);
    assert_eq!(view.last_seq, 0);
    assert_eq!(view.last_message, None);
    let ids: Vec<_> = view.members.iter().map(|m| m.user_id).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&a) && ids.contains(&b));
    assert!(store.is_member(c, a).await.unwrap());
    assert!(!store.is_member(c, outsider).await.unwrap());
    assert!(matches!(
        store.conversation(c, outsider).await,
        Err(StoreError::NotAMember)
    ));
    assert!(matches!(
        store.conversation(987_654, a).await,
        Err(StoreError::NotAMember)
    ));
    let other = store.open_direct(a, outsider, 11).await.unwrap();
    assert_ne!(other, c);
}

/// Seq is 1, 2, 3...; a retried client_msg_id returns the original.
pub async fn append_assigns_seq_and_is_idempotent(store: &impl HistoryStore) {
    let (a, b, c) = friends_with_direct(store, "alice", "bob").await;
    let results = store
        .append(vec![
            text(c, a, "k1", "one", 100),
            text(c, b, "k1", "two", 101), // same key, other sender: distinct
            text(c, a, "k2", "three", 102),
        ])
        .await
        .unwrap();
    let appended: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        appended.iter().map(|x| x.message.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(appended.iter().all(|x| !x.duplicate));
    let ids: HashSet<_> = appended.iter().map(|x| x.message.message_id).collect();
    assert_eq!(ids.len(), 3, "message ids are unique");
    let mut members = appended[0].members.clone();
    members.sort();
    let mut expected = vec![a, b];
    expected.sort();
    assert_eq!(members, expected);

    let retry = append_one(store, text(c, a, "k1", "one (retry)", 200)).await;
    assert!(retry.duplicate);
    assert_eq!(retry.message.seq, 1);
    assert_eq!(retry.message.text, "one");
    assert_eq!(retry.message.message_id, appended[0].message.message_id);
    assert_eq!(retry.message.sent_at_ms, 100);
    let next = append_one(store, text(c, a, "k3", "four", 300)).await;
    assert_eq!(next.message.seq, 4, "a retry does not consume a seq");
    let view = store.conversation(c, b).await.unwrap();
    assert_eq!(view.last_seq, 4);
    assert_eq!(view.last_activity_ms, 300);
    // A message stamped earlier (the clock stepped back) does not move the
    // conversation's activity back.
    append_one(store, text(c, a, "k4", "five", 250)).await;
    let view = store.conversation(c, b).await.unwrap();
    assert_eq!((view.last_seq, view.last_activity_ms), (5, 300));

    // A key reused for another conversation is no retry: refused, nothing
    // stored there, and alone (in a batch, or after the first commit).
    let carol = user(store, "carol").await;
    store.friend_request(a, carol, 1).await.unwrap();
    store.friend_accept(carol, a, 1).await.unwrap();
    let c2 = store.open_direct(a, carol, 2).await.unwrap();
    let results = store
        .append(vec![
            text(c2, a, "k1", "to carol, old key", 400),
            text(c2, a, "k5", "to carol", 401),
            text(c, a, "k5", "to bob, same key in the batch", 402),
        ])
        .await
        .unwrap();
    assert!(
        matches!(results[0], Err(StoreError::Invalid(_))),
        "{results:?}"
    );
    assert_eq!(results[1].as_ref().unwrap().message.seq, 1);
    assert!(
        matches!(results[2], Err(StoreError::Invalid(_))),
        "{results:?}"
    );
    let page = store.history(c2, Direction::Backward, 0, 10).await.unwrap();
    assert_eq!(seqs(&page.messages), vec![1]);
    assert_eq!(store.conversation(c, b).await.unwrap().last_seq, 5);
    // And the first of them still answers its own retry.
    let retry = append_one(store, text(c2, a, "k5", "to carol", 500)).await;
    assert!(retry.duplicate);
    assert_eq!(retry.message.seq, 1);
}

/// A non-member's message fails alone; the rest of the batch commits.
pub async fn append_refuses_non_members_without_failing_the_batch(store: &impl HistoryStore) {
    let (a, _b, c) = friends_with_direct(store, "alice", "bob").await;
    let eve = user(store, "eve").await;
    let results = store
        .append(vec![
            text(c, a, "k1", "one", 100),
            text(c, eve, "e1", "intrusion", 101),
            text(c, a, "k2", "two", 102),
            text(424_242, a, "k3", "nowhere", 103),
        ])
        .await
        .unwrap();
    assert_eq!(results[0].as_ref().unwrap().message.seq, 1);
    assert!(matches!(results[1], Err(StoreError::NotAMember)));
    assert_eq!(results[2].as_ref().unwrap().message.seq, 2);
    assert!(matches!(results[3], Err(StoreError::NotAMember)));
    let page = store.history(c, Direction::Backward, 0, 10).await.unwrap();
    assert_eq!(seqs(&page.messages), vec![1, 2]);
    // The refused key was not consumed either.
    assert!(matches!(
        store
            .append(vec![text(c, eve, "e1", "again", 104)])
            .await
            .unwrap()[0],
        Err(StoreError::NotAMember)
    ));
}

/// A direct conversation takes sends only while its members are friends:
/// after a removal both are refused (naming the other), without failing
/// the batch or using a seq; a retry of an earlier message keeps its answer,
/// history and watermarks stay; a new friendship opens it again. Groups
/// are not affected.
pub async fn direct_sends_need_friendship(store: &impl HistoryStore) {
    let (a, b, c) = friends_with_direct(store, "alice", "bob").await;
    let carol = user(store, "carol").await;
    befriend(store, a, carol).await;
    let other = store.open_direct(a, carol, 4).await.unwrap();
    let group = trip(store, a, vec![b]).await;
    let first = append_one(store, text(c, a, "k1", "before", 100)).await;
    assert_eq!(first.message.seq, 1);

    assert!(store.friend_remove(b, a).await.unwrap());
    let results = store
        .append(vec![
            text(c, a, "k2", "after", 101),
            text(other, a, "k3", "to carol", 102),
            text(c, b, "k4", "back", 103),
            text(group, a, "k5", "to the group", 104),
            text(c, a, "k1", "before", 100),
        ])
        .await
        .unwrap();
    assert!(
        matches!(results[0], Err(StoreError::NotFriends(x)) if x == b),
        "{:?}",
        results[0]
    );
    assert_eq!(results[1].as_ref().unwrap().message.seq, 1);
    assert!(
        matches!(results[2], Err(StoreError::NotFriends(x)) if x == a),
        "{:?}",
        results[2]
    );
    assert!(!results[3].as_ref().unwrap().duplicate, "groups stay open");
    let retry = results[4].as_ref().expect("a retry of a stored message");
    assert!(retry.duplicate);
    assert_eq!(retry.message.seq, 1);

    let page = store.history(c, Direction::Backward, 0, 10).await.unwrap();
    assert_eq!(seqs(&page.messages), vec![1], "no seq used by a refusal");
    let moved = store
        .advance_watermarks(vec![WatermarkUpdate {
            conversation_id: c,
            user_id: b,
            kind: WatermarkKind::Seen,
            seq: 1,
        }])
        .await
        .unwrap();
    assert_eq!(moved.len(), 1, "reading still moves watermarks");

    // Friends again (a request both ways, then an accept): open again.
    store.friend_request(b, a, 200).await.unwrap();
    assert!(
        matches!(
            store.append(vec![text(c, b, "k6", "asked", 201)]).await.unwrap()[0],
            Err(StoreError::NotFriends(x)) if x == a
        ),
        "a request alone does not open it"
    );
    store.friend_accept(a, b, 202).await.unwrap();
    let again = append_one(store, text(c, b, "k6", "friends again", 203)).await;
    assert_eq!(again.message.seq, 2);
    assert_eq!(
        store.open_direct(b, a, 204).await.unwrap(),
        c,
        "the same one"
    );

    // Removal then a crossing request both ways (which befriends), with
    // the refusal between them remembered by a store that caches.
    store.friend_remove(a, b).await.unwrap();
    assert!(matches!(
        store.append(vec![text(c, a, "k8", "gone", 299)]).await.unwrap()[0],
        Err(StoreError::NotFriends(x)) if x == b
    ));
    store.friend_request(a, b, 300).await.unwrap();
    assert_eq!(
        store.friend_request(b, a, 301).await.unwrap(),
        FriendRequestOutcome::Accepted
    );
    assert_eq!(
        append_one(store, text(c, a, "k7", "and again", 302))
            .await
            .message
            .seq,
        3
    );
}

/// A block ends the friendship and any request between the two (and with
/// it sends in their direct conversation), refuses requests both ways while
/// it lasts, is listed, stays within its limit, and ends with `unblock`
/// without making the two friends again.
pub async fn blocks(store: &impl HistoryStore) {
    let (a, b, c) = friends_with_direct(store, "alice", "bob").await;
    let carol = user(store, "carol").await;
    let dave = user(store, "dave").await;
    store.friend_request(carol, a, 5).await.unwrap();
    append_one(store, text(c, a, "k0", "before", 6)).await;

    assert!(matches!(
        store.block(a, 987_654, 9, 2).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store.block(a, b, 10, 2).await.unwrap(),
        BlockOutcome::Blocked { ended: true }
    );
    assert!(!store.are_friends(a, b).await.unwrap());
    assert!(matches!(
        store.append(vec![text(c, b, "k1", "hi", 11)]).await.unwrap()[0],
        Err(StoreError::NotFriends(x)) if x == a
    ));
    assert_eq!(
        store.block(a, b, 12, 2).await.unwrap(),
        BlockOutcome::AlreadyBlocked
    );
    // Requests either way change nothing.
    assert_eq!(
        store.friend_request(b, a, 13).await.unwrap(),
        FriendRequestOutcome::BlockedBy
    );
    assert_eq!(
        store.friend_request(a, b, 14).await.unwrap(),
        FriendRequestOutcome::Blocked
    );
    assert_eq!(store.friends(b).await.unwrap(), FriendLists::default());
    // A request waiting for an answer ends with a block too.
    assert_eq!(
        store.block(a, carol, 15, 2).await.unwrap(),
        BlockOutcome::Blocked { ended: true }
    );
    assert!(store.friends(a).await.unwrap().incoming.is_empty());
    assert!(store.friends(carol).await.unwrap().outgoing.is_empty());
    // The limit: two blocked, so not a third.
    assert_eq!(
        store.block(a, dave, 16, 2).await.unwrap(),
        BlockOutcome::Full
    );
    let blocked = store.friends(a).await.unwrap().blocked;
    assert_eq!(
        blocked,
        vec![(b, "bob".to_owned()), (carol, "carol".to_owned())]
    );
    assert_eq!(
        store.friend_request(a, dave, 17).await.unwrap(),
        FriendRequestOutcome::Requested,
        "the refused block changed nothing"
    );
    // Each side may block the other; either block refuses requests.
    assert_eq!(
        store.block(b, a, 18, 2).await.unwrap(),
        BlockOutcome::Blocked { ended: false }
    );
    assert!(store.unblock(a, b).await.unwrap());
    assert!(!store.unblock(a, b).await.unwrap(), "unblocked already");
    assert_eq!(
        store.friend_request(a, b, 19).await.unwrap(),
        FriendRequestOutcome::BlockedBy
    );
    assert!(store.unblock(b, a).await.unwrap());
    // Unblocked is not friends; a request and an accept are, and the same
    // conversation takes messages again.
    assert!(!store.are_friends(a, b).await.unwrap());
    assert_eq!(
        store.friend_request(a, b, 20).await.unwrap(),
        FriendRequestOutcome::Requested
    );
    store.friend_accept(b, a, 21).await.unwrap();
    let again = append_one(store, text(c, b, "k2", "back", 22)).await;
    assert_eq!(again.message.seq, 2);
    assert_eq!(
        store.friends(a).await.unwrap().blocked,
        vec![(carol, "carol".to_owned())]
    );
}

/// Backward and forward pages, cursors and has_more at the edges.
pub async fn history_paging_edges(store: &impl HistoryStore) {
    let (a, b, c) = friends_with_direct(store, "alice", "bob").await;
    let empty = store.history(c, Direction::Backward, 0, 10).await.unwrap();
    assert!(empty.messages.is_empty() && !empty.has_more);
    let batch = (1..=25)
        .map(|i| {
            text(
                c,
                if i % 2 == 0 { a } else { b },
                &format!("k{i}"),
                &format!("m{i}"),
                i,
            )
        })
        .collect();
    store
        .append(batch)
        .await
        .unwrap()
        .into_iter()
        .for_each(|r| drop(r.unwrap()));

    let page = store.history(c, Direction::Backward, 0, 10).await.unwrap();
    assert_eq!(seqs(&page.messages), (16..=25).collect::<Vec<_>>());
    assert!(page.has_more);
    let page = store.history(c, Direction::Backward, 16, 10).await.unwrap();
    assert_eq!(seqs(&page.messages), (6..=15).collect::<Vec<_>>());
    assert!(page.has_more);
    let page = store.history(c, Direction::Backward, 6, 10).await.unwrap();
    assert_eq!(seqs(&page.messages), (1..=5).collect::<Vec<_>>());
    assert!(!page.has_more);
    // Cursors past 2^63 (from the network) are past everything, not
    // wrapped to before it.
    for cursor in [1 << 63, u64::MAX] {
        let page = store
            .history(c, Direction::Backward, cursor, 10)
            .await
            .unwrap();
        assert_eq!(seqs(&page.messages), (16..=25).collect::<Vec<_>>());
        let page = store
            .history(c, Direction::Forward, cursor, 10)
            .await
            .unwrap();
        assert!(page.messages.is_empty() && !page.has_more);
        assert!(
            store
                .undelivered(b, (c, cursor), 10)
                .await
                .unwrap()
                .is_empty()
        );
    }
    let page = store.history(c, Direction::Backward, 11, 10).await.unwrap();
    assert_eq!(seqs(&page.messages), (1..=10).collect::<Vec<_>>());
    assert!(!page.has_more, "exactly the rest: no more");

    let page = store.history(c, Direction::Forward, 0, 10).await.unwrap();
    assert_eq!(seqs(&page.messages), (1..=10).collect::<Vec<_>>());
    assert!(page.has_more);
    let page = store.history(c, Direction::Forward, 15, 10).await.unwrap();
    assert_eq!(seqs(&page.messages), (16..=25).collect::<Vec<_>>());
    assert!(!page.has_more);
    let page = store.history(c, Direction::Forward, 25, 10).await.unwrap();
    assert!(page.messages.is_empty() && !page.has_more);
    assert_eq!(page.messages.len(), 0);
    let page = store.history(c, Direction::Backward, 0, 1).await.unwrap();
    assert_eq!(page.messages[0].text, "m25");
}

/// Catch-up pages walk every conversation with something pending in
/// (conversation, seq) order, each message once, whatever the page size
/// and wherever the cursor stops (in a conversation, or at its end).
pub async fn undelivered_pages_across_conversations(store: &impl HistoryStore) {
    let (a, b, c1) = friends_with_direct(store, "alice", "bob").await;
    let carol = user(store, "carol").await;
    let dave = user(store, "dave").await;
    let mut expected = Vec::new();
    let mut conversations = vec![c1];
    for other in [carol, dave] {
        store.friend_request(other, b, 1).await.unwrap();
        store.friend_accept(b, other, 1).await.unwrap();
        conversations.push(store.open_direct(other, b, 2).await.unwrap());
    }
    let senders = [a, carol, dave];
    for i in 0..4 {
        for (k, (&c, &from)) in conversations.iter().zip(&senders).enumerate() {
            // Bob's own replies are in the conversations but not his to
            // catch up on; Dave's conversation gets fewer messages.
            if k == 2 && i >= 2 {
                continue;
            }
            let m = append_one(store, text(c, from, &format!("m{k}-{i}"), "hi", 10 + i)).await;
            expected.push((c, m.message.seq));
            append_one(store, text(c, b, &format!("r{k}-{i}"), "re", 10 + i)).await;
        }
    }
    expected.sort();
    let all: Vec<_> = store
        .undelivered(b, (0, 0), 100)
        .await
        .unwrap()
        .iter()
        .map(|m| (m.conversation_id, m.seq))
        .collect();
    assert_eq!(all, expected);
    for page_size in 1..=4 {
        let mut walked = Vec::new();
        let mut cursor = (0, 0);
        loop {
            let page = store.undelivered(b, cursor, page_size).await.unwrap();
            assert!(page.len() <= page_size as usize);
            let Some(last) = page.last() else {
                break;
            };
            cursor = (last.conversation_id, last.seq);
            walked.extend(page.iter().map(|m| (m.conversation_id, m.seq)));
        }
        assert_eq!(walked, expected, "pages of {page_size}");
    }
    // A cursor at the last seq of a conversation goes on with the next.
    let c1_last = expected
        .iter()
        .filter(|(c, _)| *c == c1)
        .map(|&(_, s)| s)
        .max()
        .unwrap();
    let next = store.undelivered(b, (c1, c1_last), 1).await.unwrap();
    assert_eq!(
        (next[0].conversation_id, next[0].seq),
        *expected.iter().find(|(c, _)| *c != c1).unwrap()
    );
}

/// Undelivered messages, forward-only watermarks, clamping, seen implies
/// delivered, receipts snapshot.
pub async fn undelivered_and_watermarks(store: &impl HistoryStore) {
    let (a, b, c) = friends_with_direct(store, "alice", "bob").await;
    let carol = user(store, "carol").await;
    store.friend_request(a, carol, 1).await.unwrap();
    store.friend_accept(carol, a, 1).await.unwrap();
    let c2 = store.open_direct(a, carol, 4).await.unwrap();
    for i in 1..=5 {
        append_one(store, text(c, a, &format!("a{i}"), "hi", i)).await;
    }
    append_one(store, text(c, b, "b1", "own", 6)).await;
    append_one(store, text(c2, a, "c1", "hey carol", 7)).await;

    // Bob has a's five messages pending, not his own.
    let pending = store.undelivered(b, (0, 0), 100).await.unwrap();
    assert_eq!(seqs(&pending), vec![1, 2, 3, 4, 5]);
    assert!(pending.iter().all(|m| m.sender_id == a));
    // Paging by (conversation, seq) cursor.
    let tail = store.undelivered(b, (c, 3), 100).await.unwrap();
    assert_eq!(seqs(&tail), vec![4, 5]);
    assert_eq!(store.undelivered(b, (0, 0), 2).await.unwrap().len(), 2);
    // Alice has only Bob's message pending, never her own.
    let alice_pending = store.undelivered(a, (0, 0), 100).await.unwrap();
    assert_eq!(seqs(&alice_pending), vec![6]);
    assert_eq!(alice_pending[0].sender_id, b);

    let up = |user_id, kind, seq| WatermarkUpdate {
        conversation_id: c,
        user_id,
        kind,
        seq,
    };
    let moved = store
        .advance_watermarks(vec![up(b, WatermarkKind::Delivered, 3)])
        .await
        .unwrap();
    assert_eq!(moved.len(), 1);
    assert_eq!((moved[0].delivered_seq, moved[0].seen_seq), (3, 0));
    let mut members = moved[0].members.to_vec();
    members.sort();
    let mut expected = vec![a, b];
    expected.sort();
    assert_eq!(members, expected);
    assert_eq!(
        seqs(&store.undelivered(b, (0, 0), 100).await.unwrap()),
        vec![4, 5]
    );
    // Lower or equal: ignored.
    assert!(
        store
            .advance_watermarks(vec![up(b, WatermarkKind::Delivered, 2)])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .advance_watermarks(vec![up(b, WatermarkKind::Delivered, 3)])
            .await
            .unwrap()
            .is_empty()
    );
    // Beyond last_seq: clamped.
    let moved = store
        .advance_watermarks(vec![up(b, WatermarkKind::Delivered, 1_000)])
        .await
        .unwrap();
    assert_eq!(moved[0].delivered_seq, 6);
    assert!(store.undelivered(b, (0, 0), 100).await.unwrap().is_empty());
    // Seen implies delivered; several updates coalesce to one entry.
    let moved = store
        .advance_watermarks(vec![
            up(a, WatermarkKind::Seen, 2),
            up(a, WatermarkKind::Seen, 6),
            up(a, WatermarkKind::Seen, 4),
        ])
        .await
        .unwrap();
    assert_eq!(moved.len(), 1);
    assert_eq!((moved[0].delivered_seq, moved[0].seen_seq), (6, 6));
    // Non-members move nothing.
    assert!(
        store
            .advance_watermarks(vec![up(carol, WatermarkKind::Seen, 6)])
            .await
            .unwrap()
            .is_empty()
    );

    let view = store.conversation(c, b).await.unwrap();
    let bob = view.members.iter().find(|m| m.user_id == b).unwrap();
    assert_eq!((bob.delivered_seq, bob.seen_seq), (6, 0));

    // Alice's snapshot: bob's watermarks in c, carol's in c2.
    let snapshot = store.receipt_snapshot(a, 10, 32).await.unwrap();
    assert!(snapshot.contains(&proto::Receipt {
        conversation_id: c,
        user_id: b,
        delivered_seq: 6,
        seen_seq: 0
    }));
    assert!(snapshot.contains(&proto::Receipt {
        conversation_id: c2,
        user_id: carol,
        delivered_seq: 0,
        seen_seq: 0
    }));
    assert!(snapshot.iter().all(|r| r.user_id != a));
    assert_eq!(
        store.receipt_snapshot(a, 1, 32).await.unwrap().len(),
        1,
        "limit counts conversations"
    );
    // A group above the broadcast limit is left out; at it, it is in.
    let group = trip(store, a, vec![b, carol]).await;
    let in_group = |snapshot: &[proto::Receipt]| {
        let mut members: Vec<_> = snapshot
            .iter()
            .filter(|r| r.conversation_id == group)
            .map(|r| r.user_id)
            .collect();
        members.sort();
        members
    };
    let mut others = vec![b, carol];
    others.sort();
    let small = store.receipt_snapshot(a, 10, 3).await.unwrap();
    assert_eq!(in_group(&small), others);
    let large = store.receipt_snapshot(a, 10, 2).await.unwrap();
    assert_eq!(in_group(&large), Vec::<UserId>::new());
    assert!(
        large.iter().any(|r| r.conversation_id == c)
            && large.iter().any(|r| r.conversation_id == c2),
        "the direct conversations stay: {large:?}"
    );
}

/// Most recently active first, with preview, unread count and paging.
pub async fn conversation_list(store: &impl HistoryStore) {
    let (a, b, c1) = friends_with_direct(store, "alice", "bob").await;
    let carol = user(store, "carol").await;
    befriend(store, a, carol).await;
    let c2 = store.open_direct(a, carol, 5).await.unwrap();
    let long = "x".repeat(500);
    append_one(store, text(c1, b, "b1", &long, 100)).await;
    append_one(store, text(c1, b, "b2", "second", 110)).await;
    append_one(store, text(c2, carol, "c1", "from carol", 120)).await;

    let list = store.conversations(a, (0, 0), 10).await.unwrap();
    assert_eq!(list.iter().map(|v| v.id).collect::<Vec<_>>(), vec![c2, c1]);
    assert_eq!(list[1].unread_count, 2);
    assert_eq!(list[1].last_message.as_ref().unwrap().text, "second");
    assert_eq!(list[0].last_activity_ms, 120);
    // Paging by (activity time, id) of the previous page's last entry.
    let next = store.conversations(a, (120, c2), 10).await.unwrap();
    assert_eq!(next.iter().map(|v| v.id).collect::<Vec<_>>(), vec![c1]);
    assert_eq!(store.conversations(a, (0, 0), 1).await.unwrap().len(), 1);
    // Only (0, 0) is the first page: (0, id) follows an entry of time 0,
    // and nothing here is older.
    assert!(
        store
            .conversations(a, (0, c2), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Conversations active in the same millisecond: one page each, none
    // skipped (a time-only cursor lost the second one).
    let dave = user(store, "dave").await;
    befriend(store, a, dave).await;
    let c3 = store.open_direct(a, dave, 6).await.unwrap();
    append_one(store, text(c3, dave, "d1", "same time", 120)).await;
    let mut seen = Vec::new();
    let mut before = (0, 0);
    loop {
        let page = store.conversations(a, before, 1).await.unwrap();
        let Some(last) = page.last() else { break };
        seen.push(last.id);
        before = (last.last_activity_ms, last.id);
    }
    let mut tied = [c2, c3];
    tied.sort_unstable_by(|x, y| y.cmp(x));
    assert_eq!(seen, [tied[0], tied[1], c1]);
    // Previews are truncated.
    append_one(store, text(c1, b, "b3", &long, 130)).await;
    let view = store.conversation(c1, a).await.unwrap();
    let preview = view.last_message.unwrap().text;
    assert!(preview.len() < long.len() && preview.chars().all(|ch| ch == 'x'));
    // Reading moves the unread count; own messages never count.
    store
        .advance_watermarks(vec![WatermarkUpdate {
            conversation_id: c1,
            user_id: a,
            kind: WatermarkKind::Seen,
            seq: 2,
        }])
        .await
        .unwrap();
    append_one(store, text(c1, a, "a1", "mine", 140)).await;
    assert_eq!(store.conversation(c1, a).await.unwrap().unread_count, 1);
    assert_eq!(store.conversation(c1, b).await.unwrap().unread_count, 1);
    // Counted up to the cap, in the view and in the list.
    let cap = chat_protocol::limits::MAX_UNREAD_COUNT;
    let burst = (0..cap + 5)
        .map(|i| text(c1, b, &format!("burst{i}"), "x", 150))
        .collect();
    for r in store.append(burst).await.unwrap() {
        r.unwrap();
    }
    assert_eq!(store.conversation(c1, a).await.unwrap().unread_count, cap);
    let list = store.conversations(a, (0, 0), 10).await.unwrap();
    let listed = list.iter().find(|v| v.id == c1).unwrap();
    assert_eq!(listed.unread_count, cap);
}

/// Many writers at once: every message gets a distinct seq, no gaps.
pub async fn concurrent_appends_get_distinct_contiguous_seqs(store: &impl HistoryStore) {
    let (a, b, c) = friends_with_direct(store, "alice", "bob").await;
    let writers = 8u64;
    let per_writer = 25u64;
    let futures = (0..writers).map(|w| async move {
        let mut seqs = Vec::new();
        for i in 0..per_writer {
            let sender = if w % 2 == 0 { a } else { b };
            let m = append_one(store, text(c, sender, &format!("w{w}-{i}"), "x", 1)).await;
            seqs.push(m.message.seq);
        }
        seqs
    });
    let all: Vec<u64> = futures_join_all(futures)
        .await
        .into_iter()
        .flatten()
        .collect();
    let unique: HashSet<_> = all.iter().copied().collect();
    assert_eq!(unique.len() as u64, writers * per_writer);
    assert_eq!(*all.iter().max().unwrap(), writers * per_writer);
    assert_eq!(
        store.conversation(c, a).await.unwrap().last_seq,
        writers * per_writer
    );
}

/// Polls futures concurrently on the current task (no spawning needed, so
/// borrowed stores work).
async fn futures_join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, fut) in set.iter_mut().enumerate() {
            if outputs[i].is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => outputs[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future completed"))
        .collect()
}

/// Last-active only moves forward; hiding freezes a time; unknown users
/// read as defaults.
pub async fn stored_presence(store: &impl HistoryStore) {
    let a = user(store, "alice").await;
    let b = user(store, "bob").await;
    assert_eq!(
        store.stored_presence(vec![a, b, 999_999]).await.unwrap(),
        vec![StoredPresence::default(); 3]
    );
    store.record_last_active(a, 500).await.unwrap();
    store.record_last_active(a, 400).await.unwrap();
    store.set_presence_hidden(b, Some(450)).await.unwrap();
    let got = store.stored_presence(vec![a, b]).await.unwrap();
    assert_eq!(
        got[0],
        StoredPresence {
            last_active_ms: 500,
            hidden_at_ms: None
        }
    );
    assert_eq!(
        got[1],
        StoredPresence {
            last_active_ms: 0,
            hidden_at_ms: Some(450)
        }
    );
    store.set_presence_hidden(b, None).await.unwrap();
    assert_eq!(
        store.stored_presence(vec![b]).await.unwrap()[0].hidden_at_ms,
        None
    );
}

/// Membership with freshness, and the cheap "what may be pending" index.
pub async fn pending_ranges_and_membership(store: &impl HistoryStore) {
    let (a, b, c) = friends_with_direct(store, "alice", "bob").await;
    let eve = user(store, "eve").await;
    assert_eq!(
        store.membership(c, a).await.unwrap().map(|m| m.last_seq),
        Some(0)
    );
    assert_eq!(
        store.membership(c, eve).await.unwrap().map(|m| m.last_seq),
        None
    );
    assert_eq!(
        store
            .membership(31_337, a)
            .await
            .unwrap()
            .map(|m| m.last_seq),
        None
    );
    for i in 1..=3 {
        append_one(store, text(c, a, &format!("k{i}"), "hi", i)).await;
    }
    assert_eq!(
        store.membership(c, b).await.unwrap().map(|m| m.last_seq),
        Some(3)
    );
    {
        // Both stores track them (the trait's default is for stores
        // without).
        let ranges = store
            .pending_ranges(b)
            .await
            .unwrap()
            .expect("pending ranges");
        assert_eq!(
            ranges,
            vec![PendingRange {
                conversation_id: c,
                delivered_seq: 0,
                last_seq: 3,
                departed: false,
            }]
        );
        // The sender was caught up, so nothing is pending for her.
        assert_eq!(store.pending_ranges(a).await.unwrap(), Some(vec![]));
        store
            .advance_watermarks(vec![WatermarkUpdate {
                conversation_id: c,
                user_id: b,
                kind: WatermarkKind::Delivered,
                seq: 3,
            }])
            .await
            .unwrap();
        assert_eq!(store.pending_ranges(b).await.unwrap(), Some(vec![]));
    }
}

fn new_group(creator: UserId, name: &str, members: Vec<UserId>, key: Option<&str>) -> NewGroup {
    NewGroup {
        creator,
        name: name.into(),
        members,
        client_key: key.map(str::to_owned),
    }
}

/// The first message of a group that `create_group` must have created.
fn created(result: Result<GroupCreated, StoreError>) -> Appended {
    match result {
        Ok(GroupCreated::New(appended)) => appended,
        other => panic!("want a new group, got {other:?}"),
    }
}

/// A creation key names one group of its creator: repeating it creates
/// nothing and names that group (even with other arguments), while
/// another key, no key, or another creator's same key make new groups.
pub async fn group_creation_keys(store: &impl HistoryStore) {
    let (a, b, _) = friends_with_direct(store, "alice", "bob").await;
    let c = user(store, "carol").await;
    let first = created(
        store
            .create_group(new_group(a, "trip", vec![b], Some("k-1")), 5, 10)
            .await,
    );
    let g = first.message.conversation_id;
    for again in [
        new_group(a, "trip", vec![b], Some("k-1")),
        new_group(a, "other name", vec![b, c], Some("k-1")),
    ] {
        match store.create_group(again, 5, 20).await {
            Ok(GroupCreated::Existing(id)) => assert_eq!(id, g),
            other => panic!("a repeated key must name the first group: {other:?}"),
        }
    }
    let view = store.conversation(g, a).await.unwrap();
    assert_eq!((view.name.as_str(), view.last_seq), ("trip", 1));
    assert_eq!(view.members.len(), 2, "the repeat added nobody");

    let mut ids = vec![g];
    for (creator, key) in [(a, Some("k-2")), (a, None), (a, None), (b, Some("k-1"))] {
        let other = created(
            store
                .create_group(new_group(creator, "trip", vec![], key), 5, 30)
                .await,
        );
        ids.push(other.message.conversation_id);
    }
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        ids.len(),
        "each made its own group: {ids:?}"
    );
    let groups_of_a = store
        .conversations(a, (0, 0), 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.kind == proto::ConversationKind::Group)
        .count();
    assert_eq!(groups_of_a, 4, "k-1, k-2 and the two without a key");
}

/// Keyed group changes: a repeat (a retry after a lost reply) changes
/// nothing and returns the first one's SYSTEM message, even where the
/// change itself would now be refused; a key spent on anything else is
/// refused and changes nothing.
pub async fn group_edit_keys(store: &impl HistoryStore) {
    let (a, b, direct) = friends_with_direct(store, "alice", "bob").await;
    let c = user(store, "carol").await;
    let d = user(store, "dave").await;
    befriend(store, a, d).await;
    let g = trip(store, a, vec![b, c]).await;
    let edit = |actor, change, key: &str| GroupEdit::new(g, actor, change).keyed(key);
    let rename = |name: &str| GroupChange::Rename(name.into());

    // Each change, then its repeat: the first change's message, not new.
    let mut now = 10;
    for (actor, change, key) in [
        (b, rename("trip 2"), "rename-1"),
        (a, GroupChange::Add(vec![d]), "add-1"),
        (a, GroupChange::SetAdmin(b, true), "admin-1"),
        (a, GroupChange::Remove(d), "remove-1"),
        (c, GroupChange::Leave, "leave-1"),
    ] {
        now += 1;
        let first = store
            .change_group(edit(actor, change.clone(), key), 5, now)
            .await
            .unwrap();
        assert!(!first.duplicate, "{key}");
        assert_eq!(first.message.client_msg_id, key);
        assert_eq!(first.message.r#type, proto::MessageType::System as i32);
        // The same change again: refused without a key, where the target
        // is gone or in place already.
        let again = store
            .change_group(edit(actor, change, key), 5, now + 1)
            .await
            .unwrap_or_else(|e| panic!("a repeat of {key} must answer as the first did: {e:?}"));
        assert!(again.duplicate, "{key}");
        assert_eq!(again.message.seq, first.message.seq, "{key}");
        assert_eq!(again.message.text, first.message.text, "{key}");
        if key == "remove-1" {
            // Dave, removed and not told yet, is owed it: the repeat
            // brings it to his connected device if the first did not.
            assert!(again.members.contains(&d), "{:?}", again.members);
        }
    }
    // A repeat answers as the first did even where the change would now
    // be refused: dave is no longer alice's friend.
    store.friend_remove(a, d).await.unwrap();
    let again = store
        .change_group(edit(a, GroupChange::Add(vec![d]), "add-1"), 5, 29)
        .await
        .expect("a repeated add after the friendship ended");
    assert!(again.duplicate);
    // The key decides, not what the repeat asks for.
    let other = store
        .change_group(edit(b, rename("trip 3"), "rename-1"), 5, 30)
        .await
        .unwrap();
    assert!(other.duplicate);
    let view = store.conversation(g, a).await.unwrap();
    assert_eq!(view.name, "trip 2");
    assert_eq!(view.last_seq, 6, "one message per keyed change");
    let mut members: Vec<_> = view.members.iter().map(|m| m.user_id).collect();
    members.sort_unstable();
    let mut expected = vec![a, b];
    expected.sort_unstable();
    assert_eq!(members, expected, "dave added and removed once, carol left");

    // Keys are each actor's own: bob's "add-1" is a change of its own.
    let bobs = store
        .change_group(edit(b, rename("bob's"), "add-1"), 5, 31)
        .await
        .unwrap();
    assert!(!bobs.duplicate);

    // A key spent on a send, on another group or on a direct conversation's
    // message is refused, and nothing changes.
    append_one(store, text(g, a, "sent-1", "hello", 32)).await;
    append_one(store, text(direct, a, "sent-2", "hi bob", 32)).await;
    let g2 = created(
        store
            .create_group(new_group(a, "other", vec![b], None), 5, 33)
            .await,
    )
    .message
    .conversation_id;
    store
        .change_group(
            GroupEdit::new(g2, a, rename("other 2")).keyed("elsewhere"),
            5,
            34,
        )
        .await
        .unwrap();
    let last_seq = store.conversation(g, a).await.unwrap().last_seq;
    for key in ["sent-1", "sent-2", "elsewhere"] {
        assert!(
            matches!(
                store.change_group(edit(a, rename("no"), key), 5, 35).await,
                Err(StoreError::Invalid(_))
            ),
            "{key}"
        );
    }
    let view = store.conversation(g, a).await.unwrap();
    assert_eq!((view.name.as_str(), view.last_seq), ("bob's", last_seq));
    let page = store.history(g, Direction::Forward, 0, 100).await.unwrap();
    assert_eq!(
        seqs(&page.messages),
        (1..=last_seq).collect::<Vec<_>>(),
        "one seq order for everything"
    );
}

/// A retry's result names the members whose delivered watermark is still
/// below the message: those who may never have been sent it, to whom the
/// retry delivers it again. Retries of sends and of group changes alike.
pub async fn duplicates_name_the_members_still_owed(store: &impl HistoryStore) {
    let (a, b, direct) = friends_with_direct(store, "alice", "bob").await;
    let c = user(store, "carol").await;
    let others = |x: &Appended| {
        let mut owed: Vec<UserId> = x.members.iter().copied().filter(|&u| u != a).collect();
        owed.sort_unstable();
        owed
    };
    let delivered = |conversation_id, user_id, seq| WatermarkUpdate {
        conversation_id,
        user_id,
        kind: WatermarkKind::Delivered,
        seq,
    };

    let first = append_one(store, text(direct, a, "m-1", "hi", 10)).await;
    assert!(!first.duplicate);
    assert_eq!(others(&first), vec![b], "a new message goes to everyone");
    let retry = append_one(store, text(direct, a, "m-1", "hi", 11)).await;
    assert!(retry.duplicate);
    assert_eq!(retry.message.seq, first.message.seq);
    assert_eq!(others(&retry), vec![b], "bob has not acknowledged it");
    store
        .advance_watermarks(vec![delivered(direct, b, first.message.seq)])
        .await
        .unwrap();
    let retry = append_one(store, text(direct, a, "m-1", "hi", 12)).await;
    assert!(retry.duplicate);
    assert_eq!(others(&retry), Vec::<UserId>::new(), "bob has it");
    // A later message does not settle an earlier one's retry.
    let second = append_one(store, text(direct, a, "m-2", "there?", 13)).await;
    let retry = append_one(store, text(direct, a, "m-2", "there?", 14)).await;
    assert_eq!(
        (retry.message.seq, others(&retry)),
        (second.message.seq, vec![b])
    );

    let g = trip(store, a, vec![b, c]).await;
    let edit = || GroupEdit::new(g, a, GroupChange::Rename("trip 2".into())).keyed("e-1");
    let renamed = store.change_group(edit(), 5, 21).await.unwrap();
    store
        .advance_watermarks(vec![delivered(g, b, renamed.message.seq)])
        .await
        .unwrap();
    let repeat = store.change_group(edit(), 5, 22).await.unwrap();
    assert!(repeat.duplicate);
    let mut expected = vec![c];
    expected.sort_unstable();
    assert_eq!(others(&repeat), expected, "carol has not acknowledged it");
}

/// A history is named once, at random (a node claims its Redis prefix
/// for that name): the same on every read, and 128 bits in hex.
pub async fn history_has_a_name_of_its_own(store: &impl HistoryStore) {
    let id = store.history_id().await.unwrap();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    user(store, "alice").await;
    assert_eq!(store.history_id().await.unwrap(), id, "it never changes");
}

/// A member removed while offline still catches up on what they had not
/// received, up to and including the message that removed them, and no
/// further; their device's acknowledgement ends it, and rejoining starts
/// afresh.
pub async fn removed_members_catch_up_to_their_removal(store: &impl HistoryStore) {
    let (a, b, _) = friends_with_direct(store, "alice", "bob").await;
    let c = user(store, "carol").await;
    let g = trip(store, a, vec![b, c]).await;
    let delivered = |seq| WatermarkUpdate {
        conversation_id: g,
        user_id: b,
        kind: WatermarkKind::Delivered,
        seq,
    };
    let pending = |ranges: Option<Vec<PendingRange>>| {
        ranges.map(|r| {
            r.iter()
                .filter(|r| r.conversation_id == g)
                .map(|r| (r.delivered_seq, r.last_seq))
                .collect::<Vec<_>>()
        })
    };
    store.advance_watermarks(vec![delivered(1)]).await.unwrap();
    append_one(store, text(g, a, "m2", "before", 11)).await;
    let removed = store
        .change_group(GroupEdit::new(g, a, GroupChange::Remove(b)), 5, 12)
        .await
        .unwrap();
    assert_eq!(removed.message.seq, 3);
    append_one(store, text(g, c, "m4", "after", 13)).await;

    assert_eq!(store.membership(g, b).await.unwrap(), None);
    let missed = store.undelivered(b, (0, 0), 100).await.unwrap();
    assert_eq!(seqs(&missed), vec![2, 3], "up to the removal, not after");
    assert_eq!(missed[1].text, "alice removed bob");
    assert_eq!(
        seqs(&store.undelivered(b, (g, 2), 100).await.unwrap()),
        vec![3]
    );
    let ranges = store.pending_ranges(b).await.unwrap();
    if ranges.is_some() {
        assert_eq!(pending(ranges), Some(vec![(1, 3)]));
    }

    // The device acknowledges part, then all of it.
    assert!(
        store
            .advance_watermarks(vec![delivered(2)])
            .await
            .unwrap()
            .is_empty(),
        "no member's watermark moved"
    );
    assert_eq!(
        seqs(&store.undelivered(b, (0, 0), 100).await.unwrap()),
        vec![3]
    );
    store.advance_watermarks(vec![delivered(3)]).await.unwrap();
    assert!(store.undelivered(b, (0, 0), 100).await.unwrap().is_empty());
    let ranges = store.pending_ranges(b).await.unwrap();
    if ranges.is_some() {
        assert_eq!(pending(ranges), Some(vec![]));
    }

    // Back in (from seq 5), out again (6): the second stay, and only it.
    store
        .change_group(GroupEdit::new(g, a, GroupChange::Add(vec![b])), 5, 14)
        .await
        .unwrap();
    store
        .change_group(GroupEdit::new(g, a, GroupChange::Remove(b)), 5, 15)
        .await
        .unwrap();
    assert_eq!(
        seqs(&store.undelivered(b, (0, 0), 100).await.unwrap()),
        vec![5, 6]
    );
    // Rejoining while the removal is unacknowledged drops it.
    store
        .change_group(GroupEdit::new(g, a, GroupChange::Add(vec![b])), 5, 16)
        .await
        .unwrap();
    assert_eq!(
        seqs(&store.undelivered(b, (0, 0), 100).await.unwrap()),
        vec![7]
    );
}

/// A member who leaves or is removed was sent everything up to the
/// message that ended their membership: `was_member_at` holds for those
/// seqs (photo fetches ask it) and for none after, nor for any before a
/// later member joined; each stay adds a range and keeps the others, and
/// `former_membership` is the last one (what history reads).
pub async fn former_members_were_sent_up_to_their_departure(store: &impl HistoryStore) {
    let (a, b, direct) = friends_with_direct(store, "alice", "bob").await;
    let c = user(store, "carol").await;
    let stranger = user(store, "dave").await;
    befriend(store, a, c).await;
    let g = trip(store, a, vec![b]).await;
    let edit = |actor, change, now| store.change_group(GroupEdit::new(g, actor, change), 5, now);
    append_one(store, text(g, a, "m2", "two", 11)).await;
    assert_eq!(
        edit(a, GroupChange::Add(vec![c]), 12)
            .await
            .unwrap()
            .message
            .seq,
        3
    );
    append_one(store, text(g, a, "m4", "four", 13)).await;
    assert_eq!(
        edit(a, GroupChange::Remove(b), 14)
            .await
            .unwrap()
            .message
            .seq,
        5
    );
    assert_eq!(
        edit(c, GroupChange::Leave, 15).await.unwrap().message.seq,
        6
    );
    append_one(store, text(g, a, "m7", "seven", 16)).await;
    assert_eq!(
        edit(a, GroupChange::Add(vec![b]), 17)
            .await
            .unwrap()
            .message
            .seq,
        8
    );
    append_one(store, text(g, a, "m9", "nine", 18)).await;
    let removed_again = edit(a, GroupChange::Remove(b), 19).await.unwrap();
    assert_eq!(removed_again.message.seq, 10);
    append_one(store, text(g, a, "m11", "eleven", 20)).await;

    let sent = |user| async move {
        let mut seqs = Vec::new();
        for seq in 1..=11 {
            if store.was_member_at(g, user, seq).await.unwrap() {
                seqs.push(seq);
            }
        }
        seqs
    };
    assert_eq!(
        sent(a).await,
        (1..=11).collect::<Vec<_>>(),
        "a member all along"
    );
    assert_eq!(
        sent(b).await,
        vec![1, 2, 3, 4, 5, 8, 9, 10],
        "up to their removal, and from their return to their second removal"
    );
    assert_eq!(sent(c).await, vec![3, 4, 5, 6], "from joining to leaving");
    assert!(sent(stranger).await.is_empty());
    assert!(store.was_member_at(direct, b, 1).await.unwrap());
    assert!(!store.was_member_at(direct, c, 1).await.unwrap());
    assert!(!store.was_member_at(g + 1000, a, 1).await.unwrap());
    // History lets a former member read their last stay, to the message
    // that ended it.
    assert_eq!(store.membership(g, c).await.unwrap(), None);
    assert_eq!(
        store.former_membership(g, c).await.unwrap(),
        Some(Membership {
            joined_seq: 3,
            last_seq: 6
        })
    );
    assert_eq!(
        store.former_membership(g, b).await.unwrap(),
        Some(Membership {
            joined_seq: 8,
            last_seq: 10
        }),
        "the later of two stays"
    );
    assert_eq!(store.former_membership(g, a).await.unwrap(), None);
    assert_eq!(store.former_membership(g, stranger).await.unwrap(), None);
}

/// A group one left or was removed from stays in their conversation list
/// as it was when their stay ended (name, newest message and time), once,
/// among their other conversations by that time, with no members and
/// nothing unread; being added back lists it as a member's again, and only
/// the last stay counts.
pub async fn left_groups_stay_listed_as_they_were(store: &impl HistoryStore) {
    let (a, b, direct) = friends_with_direct(store, "alice", "bob").await;
    let stranger = user(store, "dave").await;
    let g = trip(store, a, vec![b]).await;
    let h = created(
        store
            .create_group(new_group(a, "plans", vec![b], None), 5, 10)
            .await,
    )
    .message
    .conversation_id;
    let edit = |actor, change, now| store.change_group(GroupEdit::new(g, actor, change), 5, now);
    append_one(store, text(direct, a, "d1", "hi", 20)).await;
    append_one(store, text(g, a, "g1", "before", 30)).await;
    let removal = edit(a, GroupChange::Remove(b), 40).await.unwrap().message;
    append_one(store, text(h, a, "h1", "plans", 45)).await;
    edit(a, GroupChange::Rename("trip 2".into()), 50)
        .await
        .unwrap();
    append_one(store, text(g, a, "g2", "after", 60)).await;

    let ids = |list: &[ConversationView]| list.iter().map(|v| v.id).collect::<Vec<_>>();
    let list = store.conversations(b, (0, 0), 10).await.unwrap();
    assert_eq!(ids(&list), vec![h, g, direct], "ordered by when they left");
    let entry = &list[1];
    assert!(entry.former && !list[0].former && !list[2].former);
    assert_eq!(
        entry.name, "trip",
        "the name when they left, not the rename"
    );
    assert_eq!(entry.kind, proto::ConversationKind::Group);
    assert!(
        entry.members.is_empty(),
        "the members are not theirs to see"
    );
    assert_eq!(
        (entry.last_seq, entry.last_activity_ms, entry.unread_count),
        (removal.seq, 40, 0)
    );
    let last = entry.last_message.as_ref().expect("the removal");
    assert_eq!(
        (last.seq, last.r#type()),
        (removal.seq, proto::MessageType::System)
    );
    assert!(matches!(
        store.conversation(g, b).await,
        Err(StoreError::NotAMember)
    ));
    // The members' list is unchanged by it.
    let theirs = store.conversations(a, (0, 0), 10).await.unwrap();
    assert_eq!(ids(&theirs), vec![g, h, direct]);
    assert!(theirs.iter().all(|v| !v.former));
    assert_eq!(theirs[0].name, "trip 2");
    assert!(
        store
            .conversations(stranger, (0, 0), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Pages go through it like any other entry.
    let mut paged = Vec::new();
    let mut before = (0, 0);
    loop {
        let page = store.conversations(b, before, 1).await.unwrap();
        let Some(last) = page.last() else { break };
        paged.push(last.id);
        before = (last.last_activity_ms, last.id);
    }
    assert_eq!(paged, vec![h, g, direct]);
    assert_eq!(
        ids(&store.conversations(b, (40, g), 10).await.unwrap()),
        vec![direct]
    );

    // Added back: a member's entry, once.
    edit(a, GroupChange::Add(vec![b]), 70).await.unwrap();
    let list = store.conversations(b, (0, 0), 10).await.unwrap();
    assert_eq!(ids(&list), vec![g, h, direct]);
    assert!(!list[0].former && list[0].members.iter().any(|m| m.user_id == b));
    // Leaving again: the second stay's end, once.
    let leave = edit(b, GroupChange::Leave, 80).await.unwrap().message;
    let list = store.conversations(b, (0, 0), 10).await.unwrap();
    assert_eq!(ids(&list), vec![g, h, direct]);
    assert!(list[0].former);
    assert_eq!(
        (
            list[0].name.as_str(),
            list[0].last_seq,
            list[0].last_activity_ms
        ),
        ("trip 2", leave.seq, 80)
    );
}

/// `audience`: the members of a conversation its member may send in,
/// ascending; refused to anyone else, and in a direct conversation of two
/// who are no longer friends; current after membership changes.
pub async fn the_audience_is_the_members_who_may_hear(store: &impl HistoryStore) {
    let (a, b, direct) = friends_with_direct(store, "alice", "bob").await;
    let c = user(store, "carol").await;
    let stranger = user(store, "dave").await;
    befriend(store, a, c).await;
    let g = trip(store, a, vec![c, b]).await;
    let mut all = vec![a, b, c];
    all.sort_unstable();
    assert_eq!(*store.audience(g, c).await.unwrap(), all);
    let mut pair = vec![a, b];
    pair.sort_unstable();
    assert_eq!(*store.audience(direct, b).await.unwrap(), pair);
    for (conversation, who) in [(g, stranger), (direct, c), (g + 1000, a)] {
        assert!(
            matches!(
                store.audience(conversation, who).await,
                Err(StoreError::NotAMember)
            ),
            "{conversation} {who}"
        );
    }
    // Removed: no longer theirs; the others hear without them.
    store
        .change_group(GroupEdit::new(g, a, GroupChange::Remove(c)), 5, 20)
        .await
        .unwrap();
    assert!(matches!(
        store.audience(g, c).await,
        Err(StoreError::NotAMember)
    ));
    assert_eq!(*store.audience(g, a).await.unwrap(), pair);
    // No longer friends: the direct conversation is closed to both.
    store.friend_remove(a, b).await.unwrap();
    assert!(matches!(
        store.audience(direct, a).await,
        Err(StoreError::NotFriends(other)) if other == b
    ));
    assert!(matches!(
        store.audience(direct, b).await,
        Err(StoreError::NotFriends(other)) if other == a
    ));
}

/// A reply or a reaction names a message its sender may read
/// (`reference`): found with its type and author from the seq that added
/// the member on and after what they cleared, nothing at seq 0 or past the
/// last seq, `NotAMember` for anyone else, and a retry (its key stored) is
/// one whatever it names now; the reference is stored with the message and
/// read back wherever messages are (history, catch-up, the list's last
/// message, a retry's answer); reactions and edits are not unread.
pub async fn replies_and_reactions_refer_to_readable_messages(store: &impl HistoryStore) {
    let (a, b, direct) = friends_with_direct(store, "alice", "bob").await;
    let c = user(store, "carol").await;
    // Under a key never used: not a retry.
    let refer = |conversation, who, seq| store.reference(conversation, who, seq, "new".into());
    let hello = append_one(store, text(direct, a, "hello", "hello", 10))
        .await
        .message
        .seq;
    let by_alice = |message_type, sent_at_ms| {
        Reference::Readable(Referable {
            message_type,
            sender_id: a,
            sent_at_ms,
            unsent: false,
        })
    };
    // Read right after its append (the embedded store's index of it may
    // still be in memory).
    assert_eq!(
        refer(direct, b, hello).await.unwrap(),
        by_alice(proto::MessageType::Text, 10)
    );
    for seq in [0, hello + 1, u64::MAX] {
        assert_eq!(
            refer(direct, b, seq).await.unwrap(),
            Reference::Unreadable,
            "{seq}"
        );
    }
    for (conversation, who) in [(direct, c), (direct + 1000, a)] {
        assert!(matches!(
            refer(conversation, who, hello).await,
            Err(StoreError::NotAMember)
        ));
    }

    let mut sent = text(direct, b, "re", "hi!", 11);
    sent.reply_to_seq = hello;
    let reply = append_one(store, sent.clone()).await.message;
    assert_eq!(reply.reply_to_seq, hello);
    let mut reaction = text(direct, a, "like", "👍", 12);
    reaction.message_type = proto::MessageType::Reaction;
    reaction.reply_to_seq = reply.seq;
    let reaction = append_one(store, reaction).await.message;
    assert_eq!(
        refer(direct, b, reaction.seq).await.unwrap(),
        by_alice(proto::MessageType::Reaction, 12)
    );
    let expected = vec![(hello, 0), (reply.seq, hello), (reaction.seq, reply.seq)];
    let references = |messages: Vec<Arc<proto::Message>>| -> Vec<(u64, u64)> {
        messages.iter().map(|m| (m.seq, m.reply_to_seq)).collect()
    };
    for direction in [Direction::Forward, Direction::Backward] {
        let page = store.history(direct, direction, 0, 10).await.unwrap();
        assert_eq!(references(page.messages), expected);
    }
    let owed = store.undelivered(b, (0, 0), 10).await.unwrap();
    assert_eq!(
        references(owed),
        vec![(hello, 0), (reaction.seq, reply.seq)]
    );
    // Bob has the reaction to his reply unread: not counted.
    let view = store.conversation(direct, b).await.unwrap();
    let last = view.last_message.expect("a last message");
    assert_eq!(
        (last.seq, last.r#type, last.reply_to_seq),
        (reaction.seq, proto::MessageType::Reaction as i32, reply.seq)
    );
    assert_eq!(view.unread_count, 1, "hello, not the reaction");
    assert_eq!(store.unread_conversations(b, 10).await.unwrap(), 1);
    store
        .advance_watermarks(vec![WatermarkUpdate {
            conversation_id: direct,
            user_id: b,
            kind: WatermarkKind::Seen,
            seq: hello,
        }])
        .await
        .unwrap();
    let view = store.conversation(direct, b).await.unwrap();
    assert_eq!(view.unread_count, 0);
    assert_eq!(store.unread_conversations(b, 10).await.unwrap(), 0);
    let retried = append_one(store, sent.clone()).await;
    assert!(retried.duplicate);
    assert_eq!(retried.message.reply_to_seq, hello);

    // Bob deletes the chat: what he cleared is no longer his to refer
    // to, but the retry of his reply still is one.
    store
        .delete_conversation(direct, b, reaction.seq)
        .await
        .unwrap();
    assert_eq!(
        refer(direct, b, hello).await.unwrap(),
        Reference::Unreadable
    );
    assert_eq!(
        store
            .reference(direct, b, hello, sent.client_msg_id.clone())
            .await
            .unwrap(),
        Reference::Retry
    );
    assert_eq!(
        refer(direct, a, hello).await.unwrap(),
        by_alice(proto::MessageType::Text, 10)
    );
    // An edit after the clear is not unread either.
    let mut edited = text(direct, a, "edit", "hello!", 13);
    edited.message_type = proto::MessageType::Edit;
    edited.reply_to_seq = hello;
    append_one(store, edited).await;
    assert_eq!(store.conversation(direct, b).await.unwrap().unread_count, 0);
    assert_eq!(store.unread_conversations(b, 10).await.unwrap(), 0);

    // A member added later may refer to what they may read: from the
    // message that added them on.
    let g = trip(store, a, vec![b]).await;
    let before = append_one(store, text(g, a, "g1", "before carol", 20))
        .await
        .message
        .seq;
    befriend(store, a, c).await;
    let added = store
        .change_group(GroupEdit::new(g, a, GroupChange::Add(vec![c])), 5, 21)
        .await
        .unwrap()
        .message
        .seq;
    assert_eq!(refer(g, c, before).await.unwrap(), Reference::Unreadable);
    assert_eq!(
        refer(g, c, added).await.unwrap(),
        by_alice(proto::MessageType::System, 21)
    );
    assert_eq!(
        refer(g, b, before).await.unwrap(),
        by_alice(proto::MessageType::Text, 20)
    );
    // Removed, no longer theirs to refer to.
    store
        .change_group(GroupEdit::new(g, a, GroupChange::Remove(c)), 5, 22)
        .await
        .unwrap();
    assert!(matches!(
        refer(g, c, added).await,
        Err(StoreError::NotAMember)
    ));
}

/// A message of `sender` naming message `seq` (a reaction, an edit or an
/// unsend), as the caller checked it.
fn naming(
    conversation_id: ConversationId,
    sender_id: UserId,
    key: &str,
    kind: proto::MessageType,
    seq: u64,
    body: &str,
    now_ms: i64,
) -> NewMessage {
    NewMessage {
        message_type: kind,
        reply_to_seq: seq,
        ..text(conversation_id, sender_id, key, body, now_ms)
    }
}

/// An UNSEND erases, in its write, the text or photo it names and the
/// edits of it, marks them unsent wherever messages are read (history,
/// catch-up, `reference`), takes the photo's upload off its message (only
/// the uploader may fetch it, and the purge takes it), and leaves every
/// other message as it was; later edits and unsends of it are refused,
/// even in the same batch, while a retry of the unsend is answered as the
/// first; unsent messages and unsends are not unread.
pub async fn unsending_erases_the_message_and_its_edits(store: &impl HistoryStore) {
    use proto::MessageType::{Edit, Photo, Reaction, Text, Unsend};
    let (a, b, direct) = friends_with_direct(store, "alice", "bob").await;
    let secret = append_one(store, text(direct, a, "s", "the secret", 10))
        .await
        .message
        .seq;
    let edit = append_one(
        store,
        naming(direct, a, "e", Edit, secret, "the secret!", 11),
    )
    .await
    .message
    .seq;
    let mut reply = text(direct, b, "r", "tell me more", 12);
    reply.reply_to_seq = secret;
    let reply = append_one(store, reply).await.message.seq;
    let like = append_one(store, naming(direct, b, "l", Reaction, secret, "😮", 13))
        .await
        .message
        .seq;
    let media_id = format!("{:032x}", 5);
    store.create_media(upload(&media_id, a, 14)).await.unwrap();
    let bound = store.attach_media(&media_id, a, direct, 15).await.unwrap();
    let mut photo = text(direct, a, "p", "caption", 16);
    photo.message_type = Photo;
    photo.photo = Some(Box::new(bound.photo()));
    let photo = append_one(store, photo).await.message.seq;
    assert_eq!(
        store.media(&media_id).await.unwrap().unwrap().seq,
        Some(photo)
    );
    let kept = append_one(store, text(direct, a, "k", "kept", 17))
        .await
        .message
        .seq;

    let unsend = naming(direct, a, "u", Unsend, secret, "", 20);
    let appended = append_one(store, unsend.clone()).await;
    assert!(!appended.duplicate);
    assert_eq!(appended.members, vec![a, b]);
    let unsent_at = appended.message.seq;
    let unsend_photo = append_one(store, naming(direct, a, "u2", Unsend, photo, "", 21))
        .await
        .message
        .seq;

    // What history and catch-up serve from now on.
    let shown = |m: &proto::Message| {
        (
            m.seq,
            m.r#type,
            m.text.clone(),
            m.photo.is_some(),
            m.unsent,
            m.reply_to_seq,
        )
    };
    let expected = vec![
        (secret, Text as i32, String::new(), false, true, 0),
        (edit, Edit as i32, String::new(), false, true, secret),
        (
            reply,
            Text as i32,
            "tell me more".to_string(),
            false,
            false,
            secret,
        ),
        (
            like,
            Reaction as i32,
            "😮".to_string(),
            false,
            false,
            secret,
        ),
        (photo, Photo as i32, String::new(), false, true, 0),
        (kept, Text as i32, "kept".to_string(), false, false, 0),
        (
            unsent_at,
            Unsend as i32,
            String::new(),
            false,
            false,
            secret,
        ),
        (
            unsend_photo,
            Unsend as i32,
            String::new(),
            false,
            false,
            photo,
        ),
    ];
    for direction in [Direction::Forward, Direction::Backward] {
        let page = store.history(direct, direction, 0, 20).await.unwrap();
        let page: Vec<_> = page.messages.iter().map(|m| shown(m)).collect();
        assert_eq!(page, expected, "{direction:?}");
    }
    let owed = store.undelivered(b, (0, 0), 20).await.unwrap();
    let owed: Vec<_> = owed.iter().map(|m| shown(m)).collect();
    let from_alice: Vec<_> = expected
        .iter()
        .filter(|m| ![reply, like].contains(&m.0))
        .cloned()
        .collect();
    assert_eq!(owed, from_alice);
    // The photo is off its message (a fetch lets only its uploader have an
    // upload no message carries), for the purge.
    assert_eq!(store.media(&media_id).await.unwrap().unwrap().seq, None);
    assert_eq!(
        store.purge_media(i64::MAX, i64::MAX, 10).await.unwrap(),
        vec![media_id.clone()]
    );

    // Nothing names it any more: the check finds it unsent, and an edit or
    // unsend that passed the check before the unsend is refused.
    assert_eq!(
        store
            .reference(direct, a, secret, "new".into())
            .await
            .unwrap(),
        Reference::Readable(Referable {
            message_type: Text,
            sender_id: a,
            sent_at_ms: 10,
            unsent: true,
        })
    );
    for (key, kind, body) in [("e2", Edit, "again"), ("u3", Unsend, "")] {
        assert!(matches!(
            store
                .append(vec![naming(direct, a, key, kind, secret, body, 30)])
                .await
                .unwrap()[0],
            Err(StoreError::NotFound)
        ));
    }
    // The retry of the unsend is answered as the first.
    let retried = append_one(store, unsend).await;
    assert!(retried.duplicate);
    assert_eq!(retried.message.seq, unsent_at);

    // In one batch: an edit before the unsend is erased with it, one after
    // it refused, and a second unsend too.
    let again = append_one(store, text(direct, a, "s2", "another", 40))
        .await
        .message
        .seq;
    let results = store
        .append(vec![
            naming(direct, a, "e3", Edit, again, "another!", 41),
            naming(direct, a, "u4", Unsend, again, "", 41),
            naming(direct, a, "e4", Edit, again, "late", 41),
            naming(direct, a, "u5", Unsend, again, "", 41),
            text(direct, b, "after", "ok", 41),
        ])
        .await
        .unwrap();
    assert!(
        matches!(results[2], Err(StoreError::NotFound)),
        "{results:?}"
    );
    assert!(
        matches!(results[3], Err(StoreError::NotFound)),
        "{results:?}"
    );
    let stored: Vec<u64> = [&results[0], &results[1], &results[4]]
        .iter()
        .map(|r| r.as_ref().unwrap().message.seq)
        .collect();
    assert_eq!(stored, vec![again + 1, again + 2, again + 3]);
    let page = store
        .history(direct, Direction::Forward, again - 1, 10)
        .await
        .unwrap();
    let page: Vec<_> = page.messages.iter().map(|m| shown(m)).collect();
    assert_eq!(
        page,
        vec![
            (again, Text as i32, String::new(), false, true, 0),
            (again + 1, Edit as i32, String::new(), false, true, again),
            (again + 2, Unsend as i32, String::new(), false, false, again),
            (again + 3, Text as i32, "ok".to_string(), false, false, 0),
        ]
    );

    // Unread for Alice: Bob's reply, his reaction not, and "ok". Bob:
    // nothing of Alice's but "kept" (the rest unsent, or unsends).
    assert_eq!(store.conversation(direct, a).await.unwrap().unread_count, 2);
    assert_eq!(store.conversation(direct, b).await.unwrap().unread_count, 1);
    store
        .advance_watermarks(vec![WatermarkUpdate {
            conversation_id: direct,
            user_id: b,
            kind: WatermarkKind::Seen,
            seq: kept,
        }])
        .await
        .unwrap();
    assert_eq!(store.conversation(direct, b).await.unwrap().unread_count, 0);
    assert_eq!(store.unread_conversations(b, 10).await.unwrap(), 0);
}

/// The append checks an unsend's or an edit's author and target type
/// itself (the caller's check is not its write); a closed direct
/// conversation takes neither; a retry in the unsend's own
/// batch is answered erased; an upload sent twice loses only the unsent
/// message's binding; what a removed member is owed is marked as theirs
/// by removal (catch-up reads it from history, which unsends reach).
pub async fn unsends_check_their_author_and_reach_those_removed(store: &impl HistoryStore) {
    use proto::MessageType::{Edit, Photo, Reaction, Unsend};
    let (a, b, direct) = friends_with_direct(store, "alice", "bob").await;
    let hers = append_one(store, text(direct, a, "h", "hers", 10))
        .await
        .message
        .seq;
    let like = append_one(store, naming(direct, a, "l", Reaction, hers, "👍", 11))
        .await
        .message
        .seq;
    for (m, why) in [
        (naming(direct, b, "u1", Unsend, hers, "", 12), "another's"),
        (naming(direct, b, "e1", Edit, hers, "x", 12), "another's"),
        (naming(direct, a, "u2", Unsend, like, "", 12), "a reaction"),
        (naming(direct, a, "e2", Edit, like, "x", 12), "a reaction"),
    ] {
        let results = store.append(vec![m]).await.unwrap();
        assert!(
            matches!(results[0], Err(StoreError::NotFound)),
            "{why}: {results:?}"
        );
    }
    let page = store
        .history(direct, Direction::Forward, 0, 10)
        .await
        .unwrap();
    assert_eq!(seqs(&page.messages), vec![hers, like]);
    assert!(!page.messages[0].unsent);

    // A retry of the message in the unsend's batch is answered erased.
    let results = store
        .append(vec![
            naming(direct, a, "u3", Unsend, hers, "", 13),
            text(direct, a, "h", "hers", 10),
        ])
        .await
        .unwrap();
    let retried = results[1].as_ref().unwrap();
    assert!(retried.duplicate);
    assert_eq!(
        (
            retried.message.seq,
            retried.message.text.as_str(),
            retried.message.unsent
        ),
        (hers, "", true)
    );

    // One upload sent twice: unsending the first leaves the second's.
    let media_id = format!("{:032x}", 6);
    store.create_media(upload(&media_id, a, 20)).await.unwrap();
    let bound = store.attach_media(&media_id, a, direct, 21).await.unwrap();
    let photo = |key: &str| NewMessage {
        message_type: Photo,
        photo: Some(Box::new(bound.photo())),
        ..text(direct, a, key, "", 22)
    };
    let first = append_one(store, photo("p1")).await.message.seq;
    let second = append_one(store, photo("p2")).await.message.seq;
    append_one(store, naming(direct, a, "u4", Unsend, first, "", 23)).await;
    assert_eq!(
        store.media(&media_id).await.unwrap().unwrap().seq,
        Some(second)
    );
    append_one(store, naming(direct, a, "u5", Unsend, second, "", 24)).await;
    assert_eq!(store.media(&media_id).await.unwrap().unwrap().seq, None);

    // Unfriended, the direct conversation is closed: it takes neither (a
    // blocked user's unsends would bring back, in the blocker's list, a
    // chat they deleted).
    let last = append_one(store, text(direct, a, "x", "before", 25))
        .await
        .message
        .seq;
    store.friend_remove(a, b).await.unwrap();
    let results = store
        .append(vec![
            naming(direct, a, "e3", Edit, last, "after", 26),
            naming(direct, a, "u7", Unsend, last, "", 26),
        ])
        .await
        .unwrap();
    for result in &results {
        assert!(
            matches!(result, Err(StoreError::NotFriends(_))),
            "{results:?}"
        );
    }

    // In a group: Carol is removed after a message she was not delivered;
    // what she is owed up to her removal is a range marked departed.
    let c = user(store, "carol").await;
    let g = trip(store, a, vec![b, c]).await;
    let said = append_one(store, text(g, a, "g", "in the group", 31))
        .await
        .message
        .seq;
    let removed = store
        .change_group(GroupEdit::new(g, a, GroupChange::Remove(c)), 5, 32)
        .await
        .unwrap()
        .message
        .seq;
    let unsent = append_one(store, naming(g, a, "u6", Unsend, said, "", 33)).await;
    assert_eq!(unsent.members, vec![a, b]);
    let ranges = store.pending_ranges(c).await.unwrap().unwrap();
    let range = ranges.iter().find(|r| r.conversation_id == g).unwrap();
    assert_eq!((range.last_seq, range.departed), (removed, true));
    assert!(
        ranges
            .iter()
            .filter(|r| r.conversation_id != g)
            .all(|r| !r.departed)
    );
}

/// "Delete chat": a direct conversation is cleared for the one who deletes
/// it, up to the seq they give at most (their start moves past it,
/// catch-up owes them nothing to it, nothing before it is unread, it leaves
/// their list until a later message), the other keeps it; a group one left
/// or was removed from is forgotten, with what catch-up still owed them of
/// it; a group one is in is refused, and anything else.
pub async fn deleting_conversations(store: &impl HistoryStore) {
    let (a, b, direct) = friends_with_direct(store, "alice", "bob").await;
    let c = user(store, "carol").await;
    let stranger = user(store, "dave").await;
    befriend(store, a, c).await;
    for (i, from) in [b, b, a].into_iter().enumerate() {
        append_one(
            store,
            text(direct, from, &format!("d{i}"), "hi", 10 + i as i64),
        )
        .await;
    }
    let g = trip(store, a, vec![b, c]).await;
    let listed = |user| async move {
        let list = store.conversations(user, (0, 0), 10).await.unwrap();
        list.iter().map(|v| v.id).collect::<Vec<_>>()
    };
    let owed = |user| async move {
        let ranges = store
            .pending_ranges(user)
            .await
            .unwrap()
            .unwrap_or_default();
        let page = store.undelivered(user, (0, 0), 10).await.unwrap();
        (
            ranges.iter().map(|r| r.conversation_id).collect::<Vec<_>>(),
            page.iter()
                .map(|m| (m.conversation_id, m.seq))
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(store.unread_conversations(a, 10).await.unwrap(), 1);
    // (The group's first message is hers, and so delivered to her.)
    assert_eq!(
        owed(a).await,
        (vec![direct], vec![(direct, 1), (direct, 2)])
    );

    // Up to what the app showed: a later message stays.
    assert_eq!(store.delete_conversation(direct, a, 1).await.unwrap(), 1);
    let start = |user| async move { store.membership(direct, user).await.unwrap().unwrap() };
    assert_eq!(start(a).await.joined_seq, 2);
    assert_eq!(owed(a).await, (vec![direct], vec![(direct, 2)]));
    assert_eq!(
        listed(a).await,
        vec![direct, g],
        "still listed: 2 and 3 come after the clear"
    );
    // Then all of it (at most its last seq).
    assert_eq!(
        store.delete_conversation(direct, a, 99).await.unwrap(),
        3,
        "at most its last seq"
    );
    assert_eq!(listed(a).await, vec![g], "gone from her list");
    assert_eq!(listed(b).await, vec![direct, g], "not from his");
    assert_eq!(start(a).await.joined_seq, 4, "she reads from after it");
    assert_eq!(start(b).await.joined_seq, 0);
    assert_eq!(
        owed(a).await,
        (vec![], vec![]),
        "catch-up owes her none of it"
    );
    let view = store.conversation(direct, a).await.unwrap();
    assert_eq!((view.last_message, view.unread_count), (None, 0));
    assert_eq!(store.unread_conversations(a, 10).await.unwrap(), 0);
    assert_eq!(store.conversation(direct, b).await.unwrap().last_seq, 3);
    // A later message brings it back, with only what came after.
    append_one(store, text(direct, b, "d3", "again", 20)).await;
    assert_eq!(listed(a).await, vec![direct, g]);
    let view = store.conversation(direct, a).await.unwrap();
    assert_eq!(
        (view.last_message.map(|m| m.seq), view.unread_count),
        (Some(4), 1)
    );
    assert_eq!(start(a).await.joined_seq, 4);
    assert_eq!(owed(a).await.1, vec![(direct, 4)]);

    // A group: left (here, removed) first, then forgotten, with what it
    // still owed them.
    assert!(matches!(
        store.delete_conversation(g, c, 99).await,
        Err(StoreError::Invalid(_))
    ));
    store
        .change_group(GroupEdit::new(g, a, GroupChange::Remove(c)), 5, 30)
        .await
        .unwrap();
    assert_eq!(listed(c).await, vec![g], "a former member's entry");
    assert_eq!(
        owed(c).await,
        (vec![g], vec![(g, 1), (g, 2)]),
        "owed up to the removal"
    );
    assert_eq!(store.delete_conversation(g, c, 0).await.unwrap(), 0);
    assert!(listed(c).await.is_empty());
    assert_eq!(owed(c).await, (vec![], vec![]));
    assert_eq!(store.former_membership(g, c).await.unwrap(), None);
    assert!(
        !store.was_member_at(g, c, 1).await.unwrap(),
        "nor its photos"
    );
    for (conversation, who) in [(g, c), (g, stranger), (direct, c), (g + 1000, a)] {
        assert!(
            matches!(
                store.delete_conversation(conversation, who, 99).await,
                Err(StoreError::NotAMember)
            ),
            "{conversation} {who}"
        );
    }
}

/// A member mutes a conversation of theirs until a time, or unmutes it;
/// their views show it, nobody else's; a non-member cannot.
pub async fn mutes(store: &impl HistoryStore) {
    let (a, b, direct) = friends_with_direct(store, "alice", "bob").await;
    let stranger = user(store, "dave").await;
    let g = trip(store, a, vec![b]).await;
    assert_eq!(store.muted_until(direct, a).await.unwrap(), 0);
    store.set_muted(direct, a, 5_000).await.unwrap();
    assert_eq!(store.muted_until(direct, a).await.unwrap(), 5_000);
    assert_eq!(store.muted_until(direct, b).await.unwrap(), 0, "hers only");
    assert_eq!(store.muted_until(g, a).await.unwrap(), 0, "that one only");
    assert_eq!(
        store.conversation(direct, a).await.unwrap().muted_until_ms,
        5_000
    );
    assert_eq!(
        store.conversation(direct, b).await.unwrap().muted_until_ms,
        0
    );
    let listed = store.conversations(a, (0, 0), 10).await.unwrap();
    let mutes: Vec<(ConversationId, i64)> =
        listed.iter().map(|v| (v.id, v.muted_until_ms)).collect();
    assert!(
        mutes.contains(&(direct, 5_000)) && mutes.contains(&(g, 0)),
        "{mutes:?}"
    );
    store.set_muted(direct, a, i64::MAX).await.unwrap();
    assert_eq!(store.muted_until(direct, a).await.unwrap(), i64::MAX);
    store.set_muted(direct, a, 0).await.unwrap();
    assert_eq!(store.muted_until(direct, a).await.unwrap(), 0, "unmuted");
    assert_eq!(
        store.conversation(direct, a).await.unwrap().muted_until_ms,
        0
    );
    for (conversation, who) in [(g, stranger), (direct + 1000, a)] {
        assert!(matches!(
            store.set_muted(conversation, who, 5_000).await,
            Err(StoreError::NotAMember)
        ));
        assert_eq!(store.muted_until(conversation, who).await.unwrap(), 0);
    }
    // A mute ends with the membership: added back, unmuted.
    store.set_muted(g, b, i64::MAX).await.unwrap();
    let edit = |change, now| store.change_group(GroupEdit::new(g, a, change), 5, now);
    edit(GroupChange::Remove(b), 20).await.unwrap();
    assert_eq!(store.muted_until(g, b).await.unwrap(), 0);
    edit(GroupChange::Add(vec![b]), 21).await.unwrap();
    assert_eq!(store.muted_until(g, b).await.unwrap(), 0, "added back");
    store.set_muted(g, b, i64::MAX).await.unwrap();
    store
        .change_group(GroupEdit::new(g, b, GroupChange::Leave), 5, 22)
        .await
        .unwrap();
    assert_eq!(store.muted_until(g, b).await.unwrap(), 0, "left");
}

/// Groups: creation, changes with their SYSTEM messages in seq order,
/// roles, limits, and what joining and leaving do to reading.
pub async fn groups(store: &impl HistoryStore) {
    let (a, b, direct) = friends_with_direct(store, "alice", "bob").await;
    let c = user(store, "carol").await;
    let d = user(store, "dave").await;
    let e = user(store, "erin").await;
    befriend(store, a, c).await;
    befriend(store, a, d).await;
    let names = |m: &Appended| m.message.text.clone();

    // Only friends of the creator, named by the first stranger.
    assert!(matches!(
        store
            .create_group(new_group(a, "strangers", vec![b, e], None), 5, 10)
            .await,
        Err(StoreError::NotFriends(x)) if x == e
    ));

    assert!(matches!(
        store
            .create_group(new_group(a, "big", vec![b, c, d], None), 3, 10)
            .await,
        Err(StoreError::LimitReached)
    ));
    let created = created(
        store
            .create_group(new_group(a, "trip", vec![b, c, b, a], None), 5, 10)
            .await,
    );
    let g = created.message.conversation_id;
    assert_eq!(created.message.seq, 1);
    assert_eq!(created.message.r#type, proto::MessageType::System as i32);
    assert_eq!(
        names(&created),
        "alice created the group \"trip\" with bob, carol"
    );
    let mut members = created.members.clone();
    members.sort();
    let mut expected = vec![a, b, c];
    expected.sort();
    assert_eq!(members, expected);
    let view = store.conversation(g, b).await.unwrap();
    assert_eq!(view.kind, proto::ConversationKind::Group);
    assert_eq!(view.name, "trip");
    let admins: Vec<_> = view
        .members
        .iter()
        .filter(|m| m.admin)
        .map(|m| m.user_id)
        .collect();
    assert_eq!(admins, vec![a]);

    // Members send; non-admins cannot add; admins can, within the limit.
    append_one(store, text(g, b, "b1", "hi all", 11)).await;
    assert!(matches!(
        store
            .change_group(GroupEdit::new(g, b, GroupChange::Add(vec![d])), 5, 12)
            .await,
        Err(StoreError::NotAdmin)
    ));
    assert!(matches!(
        store
            .change_group(GroupEdit::new(g, a, GroupChange::Add(vec![b])), 5, 12)
            .await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store
            .change_group(GroupEdit::new(g, a, GroupChange::Add(vec![d])), 3, 12)
            .await,
        Err(StoreError::LimitReached)
    ));
    assert!(matches!(
        store
            .change_group(GroupEdit::new(g, a, GroupChange::Add(vec![d, e])), 5, 12)
            .await,
        Err(StoreError::NotFriends(x)) if x == e
    ));
    // A list naming someone twice, and a member already in: each new one
    // is added once.
    let added = store
        .change_group(GroupEdit::new(g, a, GroupChange::Add(vec![d, b, d])), 5, 12)
        .await
        .unwrap();
    assert_eq!(
        (added.message.seq, names(&added)),
        (3, "alice added dave".to_string())
    );
    assert_eq!(store.conversation(g, a).await.unwrap().members.len(), 4);
    assert!(added.members.contains(&d));
    // Dave reads from the message that added him: not before.
    assert_eq!(
        store.membership(g, d).await.unwrap().map(|m| m.joined_seq),
        Some(3)
    );
    assert_eq!(
        seqs(&store.undelivered(d, (0, 0), 100).await.unwrap()),
        vec![3]
    );
    assert_eq!(
        store.membership(g, b).await.unwrap().map(|m| m.joined_seq),
        Some(0)
    );

    // Rename by any member; promote; remove; the removed member gets the
    // removal message and is a stranger afterwards.
    let renamed = store
        .change_group(
            GroupEdit::new(g, c, GroupChange::Rename("trip 2".into())),
            5,
            13,
        )
        .await
        .unwrap();
    assert_eq!(names(&renamed), "carol named the group \"trip 2\"");
    assert!(matches!(
        store
            .change_group(GroupEdit::new(g, b, GroupChange::Remove(c)), 5, 14)
            .await,
        Err(StoreError::NotAdmin)
    ));
    store
        .change_group(GroupEdit::new(g, a, GroupChange::SetAdmin(b, true)), 5, 14)
        .await
        .unwrap();
    assert!(matches!(
        store
            .change_group(GroupEdit::new(g, a, GroupChange::Remove(a)), 5, 15)
            .await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store
            .change_group(GroupEdit::new(g, a, GroupChange::Remove(424_242)), 5, 15)
            .await,
        Err(StoreError::NotFound)
    ));
    let mine = append_one(store, text(g, c, "c0", "mine", 14)).await;
    let removed = store
        .change_group(GroupEdit::new(g, b, GroupChange::Remove(c)), 5, 15)
        .await
        .unwrap();
    assert_eq!(names(&removed), "bob removed carol");
    assert!(
        removed.members.contains(&c),
        "the removed member hears of it"
    );
    assert_eq!(store.membership(g, c).await.unwrap(), None);
    // A retry of what the removed member sent before still gets its ack.
    let retry = store
        .append(vec![text(g, c, "c0", "mine", 16)])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.message.seq, mine.message.seq);
    assert!(matches!(
        store
            .append(vec![text(g, c, "c1", "still here?", 16)])
            .await
            .unwrap()[0],
        Err(StoreError::NotAMember)
    ));
    assert!(matches!(
        store
            .change_group(GroupEdit::new(g, c, GroupChange::Leave), 5, 16)
            .await,
        Err(StoreError::NotAMember)
    ));

    // The last admin leaving hands the role on; the group keeps going.
    store
        .change_group(GroupEdit::new(g, b, GroupChange::SetAdmin(b, false)), 5, 17)
        .await
        .unwrap();
    // But the only admin cannot step down: nobody could change the group
    // after that. Refused, nothing written.
    let before = store.conversation(g, a).await.unwrap().last_seq;
    assert!(matches!(
        store
            .change_group(GroupEdit::new(g, a, GroupChange::SetAdmin(a, false)), 5, 17)
            .await,
        Err(StoreError::Invalid(_))
    ));
    let view = store.conversation(g, a).await.unwrap();
    assert_eq!(view.last_seq, before);
    assert_eq!(view.members.iter().filter(|m| m.admin).count(), 1);
    let left = store
        .change_group(GroupEdit::new(g, a, GroupChange::Leave), 5, 18)
        .await
        .unwrap();
    assert_eq!(names(&left), "alice left the group");
    assert!(left.members.contains(&a));
    let view = store.conversation(g, b).await.unwrap();
    assert_eq!(view.members.len(), 2);
    assert_eq!(view.members.iter().filter(|m| m.admin).count(), 1);
    let page = store.history(g, Direction::Forward, 0, 100).await.unwrap();
    assert_eq!(
        seqs(&page.messages),
        (1..=view.last_seq).collect::<Vec<_>>(),
        "one seq order for everything"
    );

    // Direct conversations have no members to change.
    assert!(matches!(
        store
            .change_group(
                GroupEdit::new(direct, a, GroupChange::Rename("x".into())),
                5,
                19
            )
            .await,
        Err(StoreError::Invalid(_))
    ));
}

/// The moves of one conversation in a batch share one member list (large
/// groups: a list per move was a group's worth of ids per member's ack).
pub async fn moves_share_their_conversations_member_list(store: &impl HistoryStore) {
    let (a, b, _) = friends_with_direct(store, "alice", "bob").await;
    let c = user(store, "carol").await;
    let g = trip(store, a, vec![b, c]).await;
    append_one(store, text(g, a, "m1", "hello", 11)).await;
    let moved = store
        .advance_watermarks(
            [b, c]
                .map(|user_id| WatermarkUpdate {
                    conversation_id: g,
                    user_id,
                    kind: WatermarkKind::Delivered,
                    seq: 2,
                })
                .to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(moved.len(), 2, "{moved:?}");
    let mut expected = vec![a, b, c];
    expected.sort_unstable();
    assert_eq!(*moved[0].members, expected);
    assert!(
        Arc::ptr_eq(&moved[0].members, &moved[1].members),
        "one list for the conversation's moves"
    );
}

/// After a friendship ends (a removal, a block), a direct conversation is
/// closed: the views say so, nobody is told of either member's watermark
/// moves, and the snapshot of receipts leaves it out; a group of the same
/// two is not affected. Friends again, it opens again.
pub async fn closed_direct_conversations_keep_their_watermarks_to_themselves(
    store: &impl HistoryStore,
) {
    let (a, b, c) = friends_with_direct(store, "alice", "bob").await;
    let group = trip(store, a, vec![b]).await;
    append_one(store, text(c, a, "k1", "one", 10)).await;
    append_one(store, text(group, a, "k3", "hi all", 11)).await;
    // The direct conversation is the most recent.
    append_one(store, text(c, a, "k2", "two", 12)).await;
    let seen = |conversation_id, seq| WatermarkUpdate {
        conversation_id,
        user_id: b,
        kind: WatermarkKind::Seen,
        seq,
    };
    let moved = store.advance_watermarks(vec![seen(c, 1)]).await.unwrap();
    assert_eq!(moved.len(), 1);
    assert_eq!(
        *moved[0].members,
        vec![a.min(b), a.max(b)],
        "friends hear of it"
    );
    assert!(!store.conversation(c, a).await.unwrap().closed);
    let in_snapshot = |snapshot: &[proto::Receipt], conversation| {
        snapshot.iter().any(|r| r.conversation_id == conversation)
    };
    assert!(in_snapshot(
        &store.receipt_snapshot(a, 10, 32).await.unwrap(),
        c
    ));

    assert!(matches!(
        store.block(b, a, 20, 10).await.unwrap(),
        BlockOutcome::Blocked { .. }
    ));
    for viewer in [a, b] {
        assert!(store.conversation(c, viewer).await.unwrap().closed);
        assert!(!store.conversation(group, viewer).await.unwrap().closed);
        let listed = store.conversations(viewer, (0, 0), 10).await.unwrap();
        let closed: Vec<bool> = [c, group]
            .iter()
            .map(|&id| listed.iter().find(|v| v.id == id).unwrap().closed)
            .collect();
        assert_eq!(closed, [true, false], "as listed");
    }
    // Bob reads on, and the store still moves his watermark (his devices
    // and catch-up rely on it), but nobody is to be told.
    let moved = store
        .advance_watermarks(vec![seen(c, 2), seen(group, 1)])
        .await
        .unwrap();
    let audience = |conversation| {
        let m = moved
            .iter()
            .find(|m| m.conversation_id == conversation)
            .unwrap();
        let read = if conversation == c { 2 } else { 1 };
        assert_eq!((m.delivered_seq, m.seen_seq), (read, read));
        m.members.len()
    };
    assert_eq!(audience(c), 0, "nobody hears of a move in a closed one");
    assert_eq!(audience(group), 2, "the group is not closed");
    let snapshot = store.receipt_snapshot(a, 10, 32).await.unwrap();
    assert!(!in_snapshot(&snapshot, c), "{snapshot:?}");
    assert!(in_snapshot(&snapshot, group), "{snapshot:?}");
    // Left out before the limit: the one most recent open conversation
    // is the group.
    let one = store.receipt_snapshot(a, 1, 32).await.unwrap();
    assert!(in_snapshot(&one, group), "{one:?}");

    // Friends again: open again.
    store.unblock(b, a).await.unwrap();
    befriend(store, a, b).await;
    assert!(!store.conversation(c, a).await.unwrap().closed);
    assert!(in_snapshot(
        &store.receipt_snapshot(a, 10, 32).await.unwrap(),
        c
    ));
}

/// A call's log (a CALL message the server writes): its call travels with
/// it in every read, a retry under its key finds it, and a message with
/// neither photo nor call carries none.
/// The last message of conversation `c` as `user`'s conversation list
/// shows it.
async fn last_message_listed(
    store: &impl HistoryStore,
    user: UserId,
    c: ConversationId,
) -> proto::Message {
    let views = store
        .conversations(user, (i64::MAX, u64::MAX), 10)
        .await
        .unwrap();
    let view = views.into_iter().find(|v| v.id == c).unwrap();
    view.last_message.expect("a last message")
}

pub async fn call_logs(store: &impl HistoryStore) {
    let (a, b, c) = friends_with_direct(store, "alice", "bob").await;
    let log = proto::CallLog {
        call_id: 0xfeed,
        video: true,
        started_ms: 100,
        duration_ms: 61_000,
        joined: vec![a, b],
        missed: vec![],
        reason: proto::CallEndReason::HungUp as i32,
    };
    let log_message = |now_ms: i64| {
        let mut m = text(c, a, "call:000000000000feed", "Video call, 1 min", now_ms);
        m.message_type = proto::MessageType::Call;
        m.call = Some(Box::new(log.clone()));
        m
    };
    let appended = append_one(store, log_message(200)).await;
    let seq = appended.message.seq;
    assert_eq!(appended.message.r#type, proto::MessageType::Call as i32);
    assert_eq!(appended.message.call.as_deref(), Some(&log));
    assert_eq!(appended.message.photo, None);
    let page = store.history(c, Direction::Backward, 0, 10).await.unwrap();
    let read = page.messages.last().unwrap();
    assert_eq!((read.seq, read.call.as_deref()), (seq, Some(&log)));
    assert_eq!(read.text, "Video call, 1 min");
    assert_eq!(read.photo, None, "a call's attachment is not a photo");
    let pending = store.undelivered(b, (0, 0), 10).await.unwrap();
    assert_eq!(
        pending
            .iter()
            .find(|m| m.seq == seq)
            .unwrap()
            .call
            .as_deref(),
        Some(&log)
    );
    assert_eq!(
        last_message_listed(store, b, c).await.call.as_deref(),
        Some(&log)
    );
    // Written again under its key: the first, and nothing new.
    let repeated = append_one(store, log_message(300)).await;
    assert!(repeated.duplicate);
    assert_eq!(repeated.message.seq, seq);
    assert_eq!(repeated.message.call.as_deref(), Some(&log));
    let plain = append_one(store, text(c, b, "t-1", "that was fun", 400)).await;
    assert_eq!(plain.message.call, None);
    let page = store.history(c, Direction::Backward, 0, 10).await.unwrap();
    assert_eq!(page.messages.last().unwrap().call, None);
    assert_eq!(page.messages.len(), 2);
}

/// Uploads: recorded, bound to one conversation by a send, marked with the
/// seq of the stored message that carries them, carried by that message
/// wherever it is read, and purged only while no stored message carries
/// them (including after a send refused once it had bound one).
pub async fn photos(store: &impl HistoryStore) {
    let (a, b, c) = friends_with_direct(store, "alice", "bob").await;
    let carol = store
        .create_user("carol".into(), "h".into(), 1)
        .await
        .unwrap();
    store.friend_request(a, carol, 1).await.unwrap();
    store.friend_accept(carol, a, 2).await.unwrap();
    let other = store.open_direct(a, carol, 3).await.unwrap();
    let id = |n: u8| format!("{n:032x}");
    let photo_message = |key: &str, media: &MediaRecord, now_ms: i64| {
        let mut m = text(c, a, key, "our trip", now_ms);
        m.message_type = proto::MessageType::Photo;
        m.photo = Some(Box::new(media.photo()));
        m
    };

    let first = upload(&id(1), a, 100);
    store.create_media(first.clone()).await.unwrap();
    assert_eq!(store.media(&id(1)).await.unwrap(), Some(first.clone()));
    assert_eq!(store.media(&id(9)).await.unwrap(), None);
    assert!(matches!(
        store.create_media(upload(&id(1), b, 101)).await,
        Err(StoreError::Conflict)
    ));
    // Which ids have rows (the file sweep asks).
    assert_eq!(
        store
            .media_present(vec![id(9), id(1), id(8)])
            .await
            .unwrap(),
        vec![id(1)]
    );
    assert!(store.media_present(Vec::new()).await.unwrap().is_empty());

    // Only its uploader binds it, only where they are a member, and once.
    assert!(matches!(
        store.attach_media(&id(1), b, c, 150).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.attach_media(&id(9), a, c, 150).await,
        Err(StoreError::NotFound)
    ));
    let group_of_others = match store
        .create_group(
            NewGroup {
                creator: b,
                name: "bobs".into(),
                members: vec![],
                client_key: None,
            },
            10,
            4,
        )
        .await
        .unwrap()
    {
        GroupCreated::New(created) => created.message.conversation_id,
        GroupCreated::Existing(id) => id,
    };
    assert!(matches!(
        store.attach_media(&id(1), a, group_of_others, 150).await,
        Err(StoreError::NotAMember)
    ));
    let bound = store.attach_media(&id(1), a, c, 150).await.unwrap();
    assert_eq!((bound.conversation_id, bound.seq), (Some(c), None));
    assert_eq!(
        store.attach_media(&id(1), a, c, 160).await.unwrap(),
        bound,
        "binding it again to the same conversation (a retry) is fine"
    );
    assert!(matches!(
        store.attach_media(&id(1), a, other, 170).await,
        Err(StoreError::Invalid(_))
    ));

    // Storing the message marks the upload with its seq; the message
    // carries the photo in every read.
    let appended = store
        .append(vec![photo_message("photo-1", &bound, 200)])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    let seq = appended.message.seq;
    assert_eq!(store.media(&id(1)).await.unwrap().unwrap().seq, Some(seq));
    let photo = appended
        .message
        .photo
        .clone()
        .expect("the appended message has its photo");
    assert_eq!(photo.media_id, id(1));
    assert_eq!((photo.size, photo.width, photo.height), (123_456, 640, 480));
    assert_eq!(&photo.sha256[..], &[7; 32]);
    assert_eq!(&photo.preview[..], b"\x89PNG\r\n\x1a\n a tiny preview");
    assert_eq!(photo.media_type, proto::MediaType::Png as i32);
    let page = store.history(c, Direction::Backward, 0, 10).await.unwrap();
    assert_eq!(page.messages.last().unwrap().photo, Some(photo.clone()));
    assert_eq!(page.messages.last().unwrap().text, "our trip");
    let pending = store.undelivered(b, (0, 0), 10).await.unwrap();
    assert_eq!(
        pending.iter().find(|m| m.seq == seq).unwrap().photo,
        Some(photo.clone())
    );
    assert_eq!(
        last_message_listed(store, b, c).await.photo,
        Some(photo.clone())
    );
    // A retry gets the original, photo and all, and moves nothing.
    let repeated = store
        .append(vec![photo_message("photo-1", &bound, 201)])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert!(repeated.duplicate);
    assert_eq!(repeated.message.photo, Some(photo));
    assert_eq!(store.media(&id(1)).await.unwrap().unwrap().seq, Some(seq));
    // Texts carry none.
    let plain = store
        .append(vec![text(c, b, "t-1", "nice", 300)])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(plain.message.photo, None);
    let page = store.history(c, Direction::Backward, 0, 10).await.unwrap();
    assert_eq!(page.messages.last().unwrap().photo, None);

    // A send refused after its binding (its key was spent on a text)
    // leaves the upload bound and unsent.
    let refused_upload = upload(&id(6), a, 400);
    store.create_media(refused_upload.clone()).await.unwrap();
    let refused_bound = store.attach_media(&id(6), a, c, 410).await.unwrap();
    let mut spent = photo_message("t-1", &refused_bound, 420);
    spent.sender_id = b;
    assert!(store.append(vec![spent]).await.unwrap().remove(0).is_err());
    assert_eq!(store.media(&id(6)).await.unwrap().unwrap().seq, None);

    // A retry answers as the first did even after its sender left: binding
    // again to the same conversation needs no membership.
    let trip = match store
        .create_group(
            NewGroup {
                creator: a,
                name: "trip".into(),
                members: vec![b],
                client_key: None,
            },
            10,
            700,
        )
        .await
        .unwrap()
    {
        GroupCreated::New(created) => created.message.conversation_id,
        GroupCreated::Existing(id) => id,
    };
    store.create_media(upload(&id(7), b, 700)).await.unwrap();
    let by_b = store.attach_media(&id(7), b, trip, 710).await.unwrap();
    let mut from_b = text(trip, b, "b-photo", "", 710);
    from_b.message_type = proto::MessageType::Photo;
    from_b.photo = Some(Box::new(by_b.photo()));
    let first_b = store
        .append(vec![from_b.clone()])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    store
        .change_group(
            GroupEdit {
                conversation_id: trip,
                actor: b,
                change: GroupChange::Leave,
                client_key: None,
            },
            10,
            720,
        )
        .await
        .unwrap();
    assert_eq!(
        store.attach_media(&id(7), b, trip, 730).await.unwrap().seq,
        Some(first_b.message.seq)
    );
    let again = store.append(vec![from_b]).await.unwrap().remove(0).unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message.seq, first_b.message.seq);

    // The purge takes unsent uploads made before its time, a batch at a
    // time; bound ones only once bound before its second time; never a
    // sent one.
    for n in 2..=4 {
        store
            .create_media(upload(&id(n), a, 100 + i64::from(n)))
            .await
            .unwrap();
    }
    // (One without a preview reads back without one.)
    let bare = MediaRecord {
        preview: bytes::Bytes::new(),
        ..upload(&id(5), carol, 1_000)
    };
    store.create_media(bare.clone()).await.unwrap();
    assert_eq!(store.media(&id(5)).await.unwrap(), Some(bare));
    let mut purged = store.purge_media(500, 405, 2).await.unwrap();
    assert_eq!(purged.len(), 2);
    purged.extend(store.purge_media(500, 405, 2).await.unwrap());
    purged.sort();
    assert_eq!(purged, vec![id(2), id(3), id(4)]);
    assert!(store.purge_media(500, 405, 2).await.unwrap().is_empty());
    assert!(
        store.media(&id(6)).await.unwrap().is_some(),
        "bound since: kept"
    );
    assert_eq!(store.purge_media(500, 500, 10).await.unwrap(), vec![id(6)]);
    assert!(store.media(&id(1)).await.unwrap().is_some(), "sent: kept");
    assert!(store.purge_media(i64::MAX, i64::MAX, 10).await.unwrap() == vec![id(5)]);
    assert!(
        store.media(&id(1)).await.unwrap().is_some(),
        "sent: kept for good"
    );
    assert!(matches!(
        store.attach_media(&id(3), a, c, 600).await,
        Err(StoreError::NotFound)
    ));
}

/// A device's push registration lives with its session: set, replaced,
/// cleared, taken by another session that registers the same token, gone
/// with a revoked or expired session, and dropped when the gateway
/// rejects it.
pub async fn push_registrations(store: &impl HistoryStore) {
    let alice = user(store, "alice").await;
    let bob = user(store, "bob").await;
    let session = |n: u8, user_id: UserId, expires_at_ms: i64| NewSession {
        token_hash: [n; 32],
        user_id,
        device_name: format!("device {n}"),
        created_at_ms: 100,
        expires_at_ms,
    };
    store
        .create_session(session(1, alice, 10_000))
        .await
        .unwrap();
    store
        .create_session(session(2, alice, 10_000))
        .await
        .unwrap();
    store.create_session(session(3, bob, 10_000)).await.unwrap();
    store.create_session(session(4, alice, 500)).await.unwrap();
    let device = |token: &str, registered_ms: i64| PushDevice {
        app_id: "com.example.ios".into(),
        token: token.into(),
        registered_ms,
    };
    let sorted = |mut devices: Vec<PushDevice>| {
        devices.sort_by(|a, b| (&a.token, &a.app_id).cmp(&(&b.token, &b.app_id)));
        devices
    };
    assert!(store.push_devices(alice, 200).await.unwrap().is_empty());

    assert!(
        store
            .set_push([1; 32], Some(device("phone", 200)))
            .await
            .unwrap()
    );
    assert!(
        store
            .set_push([2; 32], Some(device("tablet", 210)))
            .await
            .unwrap()
    );
    assert!(
        store
            .set_push([4; 32], Some(device("old", 220)))
            .await
            .unwrap()
    );
    assert_eq!(
        sorted(store.push_devices(alice, 300).await.unwrap()),
        vec![
            device("old", 220),
            device("phone", 200),
            device("tablet", 210)
        ]
    );
    // Session 4 expires at 500: its device gets nothing after.
    assert_eq!(
        sorted(store.push_devices(alice, 500).await.unwrap()),
        vec![device("phone", 200), device("tablet", 210)]
    );
    // A new token replaces the session's old one.
    assert!(
        store
            .set_push([1; 32], Some(device("phone2", 230)))
            .await
            .unwrap()
    );
    assert_eq!(
        sorted(store.push_devices(alice, 300).await.unwrap())
            .into_iter()
            .map(|d| d.token)
            .collect::<Vec<_>>(),
        ["old", "phone2", "tablet"]
    );
    // Bob logs in on Alice's tablet: the token is his session's now, and
    // Alice's session keeps none.
    assert!(
        store
            .set_push([3; 32], Some(device("tablet", 240)))
            .await
            .unwrap()
    );
    assert_eq!(
        store.push_devices(bob, 300).await.unwrap(),
        vec![device("tablet", 240)]
    );
    assert_eq!(
        sorted(store.push_devices(alice, 300).await.unwrap())
            .into_iter()
            .map(|d| d.token)
            .collect::<Vec<_>>(),
        ["old", "phone2"]
    );
    // The same token for another app is another registration.
    let other_app = PushDevice {
        app_id: "com.example.android".into(),
        ..device("phone2", 250)
    };
    assert!(
        store
            .set_push([2; 32], Some(other_app.clone()))
            .await
            .unwrap()
    );
    assert_eq!(
        sorted(store.push_devices(alice, 600).await.unwrap()),
        vec![other_app.clone(), device("phone2", 230)]
    );
    // The gateway rejects a token: only that app's copy goes, and only
    // as registered when the rejected request was made (one registered
    // after it is kept).
    let drop_ios = |registered_by_ms| {
        store.drop_push_token("com.example.ios".into(), "phone2".into(), registered_by_ms)
    };
    assert_eq!(drop_ios(229).await.unwrap(), 0);
    assert_eq!(store.push_devices(alice, 600).await.unwrap().len(), 2);
    assert_eq!(drop_ios(230).await.unwrap(), 1);
    assert_eq!(
        store.push_devices(alice, 600).await.unwrap(),
        vec![other_app]
    );
    assert_eq!(drop_ios(230).await.unwrap(), 0);
    // Cleared.
    assert!(store.set_push([2; 32], None).await.unwrap());
    assert!(store.push_devices(alice, 600).await.unwrap().is_empty());
    // A revoked session has no registration to set and sends nothing; an
    // unknown one neither.
    assert!(
        store
            .set_push([3; 32], Some(device("tablet", 260)))
            .await
            .unwrap()
    );
    assert!(store.revoke_session([3; 32], 270).await.unwrap());
    assert!(store.push_devices(bob, 300).await.unwrap().is_empty());
    assert!(
        !store
            .set_push([3; 32], Some(device("tablet", 280)))
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_push([9; 32], Some(device("x", 280)))
            .await
            .unwrap()
    );
    // A refused registration takes the token from nobody.
    assert!(
        store
            .set_push([1; 32], Some(device("shared", 290)))
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_push([3; 32], Some(device("shared", 300)))
            .await
            .unwrap()
    );
    assert_eq!(
        store.push_devices(alice, 600).await.unwrap(),
        vec![device("shared", 290)]
    );
}

/// The badge: conversations with a message from someone else above the
/// user's seen watermark, up to the cap; the user's own messages and
/// conversations read to the end do not count.
pub async fn unread_conversations_count_others_messages(store: &impl HistoryStore) {
    let (alice, bob, direct) = friends_with_direct(store, "alice", "bob").await;
    let carol = user(store, "carol").await;
    befriend(store, alice, carol).await;
    let with_carol = store.open_direct(alice, carol, 4).await.unwrap();
    let group = trip(store, bob, vec![alice, carol]).await;
    let seen = |conversation_id, user_id, seq| WatermarkUpdate {
        conversation_id,
        user_id,
        kind: WatermarkKind::Seen,
        seq,
    };
    // The group's SYSTEM message is Bob's: unread for Alice.
    assert_eq!(store.unread_conversations(alice, 10).await.unwrap(), 1);
    let head = store
        .membership(group, alice)
        .await
        .unwrap()
        .unwrap()
        .last_seq;
    store
        .advance_watermarks(vec![seen(group, alice, head)])
        .await
        .unwrap();
    assert_eq!(store.unread_conversations(alice, 10).await.unwrap(), 0);
    // Her own messages are not unread for her.
    append_one(store, text(direct, alice, "a1", "hi bob", 10)).await;
    append_one(store, text(with_carol, alice, "a2", "hi carol", 11)).await;
    assert_eq!(store.unread_conversations(alice, 10).await.unwrap(), 0);
    // Bob answers, twice; Carol once; the group gets one from Carol.
    append_one(store, text(direct, bob, "b1", "hi", 12)).await;
    append_one(store, text(direct, bob, "b2", "there", 13)).await;
    let from_carol = append_one(store, text(with_carol, carol, "c1", "yo", 14)).await;
    append_one(store, text(group, carol, "c2", "trip?", 15)).await;
    assert_eq!(store.unread_conversations(alice, 10).await.unwrap(), 3);
    assert_eq!(
        store.unread_conversations(alice, 2).await.unwrap(),
        2,
        "capped"
    );
    assert_eq!(
        store.unread_conversations(bob, 10).await.unwrap(),
        2,
        "alice's and carol's"
    );
    // Alice reads Carol's message: two left.
    store
        .advance_watermarks(vec![seen(with_carol, alice, from_carol.message.seq)])
        .await
        .unwrap();
    assert_eq!(store.unread_conversations(alice, 10).await.unwrap(), 2);
    // Reading part of a conversation leaves it unread.
    store
        .advance_watermarks(vec![seen(direct, alice, 2)])
        .await
        .unwrap();
    assert_eq!(store.unread_conversations(alice, 10).await.unwrap(), 2);
    // Alice answers in the group before reading it (her watermark stays
    // behind), then reads up to Carol's message: only her own is above
    // it, so the group is read.
    let carols = store
        .membership(group, alice)
        .await
        .unwrap()
        .unwrap()
        .last_seq;
    append_one(store, text(group, alice, "a3", "yes!", 16)).await;
    store
        .advance_watermarks(vec![seen(group, alice, carols)])
        .await
        .unwrap();
    assert_eq!(store.unread_conversations(alice, 10).await.unwrap(), 1);
}
