//! The control stream: authentication first, then friends, conversations
//! and history.
//!
//! Before authentication only Register, Login and Authenticate are
//! accepted; anything else closes the connection with UNAUTHENTICATED.
//! Failed attempts are answered with their own codes and the client may try
//! again, up to `max-auth-attempts` per connection.

use std::sync::Arc;

use chat_protocol::limits::{MAX_CLIENT_MSG_ID_LEN, MAX_PAGE_SIZE, PASSWORD_LEN};
use chat_protocol::{Body, ErrorCode, Frame, StreamKind, proto};
use prost::Message as _;
use quinn::SendStream;

use super::{now_ms, ok};
use crate::auth;
use crate::delivery::{SendJob, Work};
use crate::error::{Refusal, retry_after_ms};
use crate::session::Session;
use crate::store::{
    BlockOutcome, ConversationView, Direction, FriendRequestOutcome, GroupChange, GroupEdit,
    HistoryStore, MemberState, Membership, NewGroup, Page, PushDevice, StoreError, UserId,
};
use crate::wire::{self, FrameReader, Outbound};

/// Default page size for conversation lists when the client sends 0.
const DEFAULT_CONVERSATION_PAGE: u32 = 30;
/// Conversations read from the store at a time for one page (see
/// ListConversations): a default page is one read.
const CONVERSATION_CHUNK: usize = 30;
/// Default page size for history when the client sends 0.
const DEFAULT_HISTORY_PAGE: u32 = 50;

/// Serves the control stream until it or the connection ends.
pub async fn serve(session: Arc<Session>, mut send: SendStream, mut reader: FrameReader) {
    // The login exchange and the request handlers are boxed: inline, their
    // largest states (Argon2, group creation) would size this task, which
    // lives as long as the connection.
    if !Box::pin(authenticate(&session, &mut send, &mut reader)).await {
        return;
    }
    let authed = session.authed().expect("authenticated above");
    let Some(queue) = session.outbound(StreamKind::Control) else {
        return;
    };
    let writer = {
        let session = session.clone();
        tokio::spawn(async move {
            let counters = (&*session.shared.metrics, StreamKind::Control);
            let waits = (&session.shared.config.transport, false);
            wire::write_loop(&session.conn, &mut send, &queue, counters, waits, |_| true).await;
        })
    };
    let handle = authed.handle.clone();
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                crate::session::on_read_error(&session, StreamKind::Control, e);
                break;
            }
        };
        // The frame that says the app went to the background is its last
        // activity; one that says it came back counts.
        handle.touch(now_ms());
        if let Some(Body::Heartbeat(beat)) = &frame.body {
            if beat.background {
                if !handle.is_background() {
                    session.shared.metrics.backgrounded.increment(1);
                }
                handle.set_background(true);
                continue;
            }
            if handle.is_background() {
                handle.set_background(false);
                handle.touch(now_ms());
            }
            // Fire-and-forget: no reply, only a refreshed presence TTL. Each
            // is a presence write, so a flood is ignored beyond the user's
            // heartbeat bucket, which every honest device's beats fit in.
            let user = handle.user_id;
            let limiter = &session.shared.heartbeat_limiter;
            if limiter.check(user, std::time::Instant::now()).is_ok() {
                Box::pin(session.shared.presence.heartbeat(&handle)).await;
            } else {
                session.shared.metrics.heartbeats_ignored.increment(1);
            }
            continue;
        }
        // Every other request takes a token from the user's control bucket
        // first: a client pipelining requests (each a store read or write)
        // could otherwise take the node's store for itself. Not a leave
        // (it has a bucket of its own) nor a logout or the revocation of
        // another session (revoking a stolen token must always be
        // possible: a revocation has a bucket per connection).
        let charged = match frame.body {
            Some(Body::LeaveGroup(_) | Body::Logout(_)) => Ok(()),
            Some(Body::RevokeSession(_)) => charge_revoke_rate(&session),
            _ => charge_control_rate(&session),
        };
        let request_id = frame.request_id;
        let request = frame.body_name();
        let answer = match charged {
            Ok(()) => Box::pin(handle_request(&session, frame)).await,
            Err(refusal) => Err(refusal),
        };
        let reply = match answer {
            Ok(Reply::Frame(frame)) => Outbound::frame(&frame),
            Ok(Reply::Close(frame, code)) => Outbound::closing(&frame, code),
            Ok(Reply::Deferred) => continue,
            Err(refusal) => {
                if matches!(refusal.code, ErrorCode::Internal | ErrorCode::Unavailable) {
                    // The store's own log line has the detail but not
                    // whose request it failed.
                    tracing::warn!(
                        conn_id = session.conn_id,
                        user_id = handle.user_id,
                        request,
                        code = %refusal.code,
                        "request failed"
                    );
                }
                Outbound::frame(&refusal.to_frame(request_id))
            }
        };
        let closing = reply.close_after.is_some();
        handle.push(StreamKind::Control, reply);
        if closing {
            break;
        }
    }
    drop(writer);
}

/// What a request produces.
enum Reply {
    /// Send this frame.
    Frame(Frame),
    /// Send this frame, then close the connection with the code.
    Close(Frame, ErrorCode),
    /// Another task answers (group changes: the send committer).
    Deferred,
}

/// Runs the pre-authentication exchange. True once authenticated.
async fn authenticate(
    session: &Arc<Session>,
    send: &mut SendStream,
    reader: &mut FrameReader,
) -> bool {
    let limits = &session.shared.config.limits;
    let mut failures = 0;
    loop {
        let frame = match reader.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return false,
            Err(wire::ReadError::Frame(e)) => {
                session
                    .close_with(Some(send), e.code(), &e.to_string())
                    .await;
                return false;
            }
            Err(_) => return false,
        };
        let request_id = frame.request_id;
        let result = match frame.body {
            Some(Body::Register(r)) => register(session, r).await,
            Some(Body::Login(l)) => login(session, l).await,
            Some(Body::Authenticate(a)) => resume(session, a).await,
            other => {
                // Not kept while the close is written (see `serve_stream`).
                drop(other);
                session
                    .close_with(
                        Some(send),
                        ErrorCode::Unauthenticated,
                        "authenticate before anything else",
                    )
                    .await;
                return false;
            }
        };
        if result.is_err() && session.authed().is_some() {
            // Refused after it was registered (a resume whose token was
            // revoked meanwhile; the refusal closed the connection). The
            // connection task may have looked before the registration and
            // found nothing to undo: without this the handle stayed in the
            // hub for good, counting against the user's and the token's
            // session limits.
            session.forget().await;
        }
        if let (Ok(_), Some(authed)) = (&result, session.authed()) {
            // Before AuthOk leaves: a client that sees AuthOk may rely on
            // being online (and a second device on not being offline).
            session.shared.presence.connect(authed.handle.clone()).await;
            if session.is_closed() {
                // The connection died during the login: undo what the
                // connection task could not see.
                session.forget().await;
                return false;
            }
        }
        let reply = match &result {
            Ok(auth_ok) => Frame::new(request_id, Body::AuthOk(Box::new(auth_ok.clone()))),
            Err(refusal) => {
                session.shared.metrics.error(refusal.code);
                refusal.to_frame(request_id)
            }
        };
        session
            .shared
            .metrics
            .frames_out(StreamKind::Control)
            .increment(1);
        let mut buf = bytes::BytesMut::new();
        chat_protocol::encode(&reply, &mut buf);
        // Bounded as every other write is: a client that grants no credit
        // on its control stream would otherwise hold this task, and a
        // connection that counts as logged in, until its token expires.
        let stall = session.shared.config.transport.write_stall;
        let mut chunks = [buf.freeze()];
        if !wire::write_all_or_stall(
            &session.conn,
            send,
            &mut chunks,
            stall,
            &session.shared.metrics,
        )
        .await
        {
            return false;
        }
        match result {
            Ok(_) => return true,
            Err(refusal) => {
                failures += 1;
                tracing::info!(
                    conn_id = session.conn_id,
                    remote = %session.conn.remote_address(),
                    code = %refusal.code,
                    failures,
                    "authentication refused"
                );
                if failures >= limits.max_auth_attempts {
                    session
                        .close_with(
                            Some(send),
                            refusal.code,
                            "too many failed authentication attempts",
                        )
                        .await;
                    return false;
                }
            }
        }
    }
}

async fn register(session: &Session, r: proto::Register) -> Result<proto::AuthOk, Refusal> {
    let username = auth::new_username(&r.username)
        .map_err(|e| Refusal::new(ErrorCode::InvalidArgument, e.to_string()))?;
    auth::check_password(&r.password)
        .map_err(|e| Refusal::new(ErrorCode::InvalidArgument, e.to_string()))?;
    let password = r.password;
    let store = &session.shared.store;
    // A taken name is answered before any hashing: a flood of
    // registrations of existing names would otherwise keep the hashers
    // (and every honest login waiting for them) busy. The insert below
    // still settles a race for a free name.
    if store.user_by_name(username.clone()).await?.is_some() {
        return Err(taken());
    }
    let source = auth::login_source(session.conn.remote_address().ip());
    let limiter = &session.shared.registration_limiter;
    limiter
        .check(source, std::time::Instant::now())
        .map_err(|wait| {
            Refusal::new(
                ErrorCode::RateLimited,
                "too many registrations from this address; try again later",
            )
            .with_retry_after(wait)
        })?;
    let created = async {
        let permit = hashing_permit(session).await?;
        let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
            .await
            .map_err(|e| internal("the hashing task failed", &e))?
            .map_err(|e| internal("hashing failed", &e))?;
        drop(permit);
        match store.create_user(username.clone(), hash, now_ms()).await {
            Ok(id) => Ok(id),
            Err(StoreError::Conflict) => Err(taken()),
            Err(e) => Err(Refusal::from(e)),
        }
    };
    let user_id = match created.await {
        Ok(id) => id,
        Err(refusal) => {
            // No account made (hashers busy, the store down, the name
            // taken meanwhile): the address keeps its registration.
            limiter.give_back(source);
            return Err(refusal);
        }
    };
    tracing::info!(
        conn_id = session.conn_id,
        remote = %session.conn.remote_address(),
        user_id,
        "registered"
    );
    issue_token(session, user_id, username, r.device_name, None).await
}

fn taken() -> Refusal {
    Refusal::new(ErrorCode::UsernameTaken, "that username is taken")
}

async fn login(session: &Session, l: proto::Login) -> Result<proto::AuthOk, Refusal> {
    let username = auth::canonical_username(&l.username)
        .map_err(|_| Refusal::new(ErrorCode::UnknownUser, "no such user"))?;
    let Some(user) = session.shared.store.user_by_name(username).await? else {
        return Err(Refusal::new(ErrorCode::UnknownUser, "no such user"));
    };
    let attempt = password_check(session, user.id, &l.password)?;
    let password = l.password;
    let phc = user.password_hash.clone();
    let permit = hashing_permit(session).await?;
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&password, &phc))
        .await
        .map_err(|e| internal("the hashing task failed", &e))?;
    drop(permit);
    if !ok {
        attempt.failed();
        return Err(Refusal::new(ErrorCode::WrongPassword, "wrong password"));
    }
    attempt.succeeded();
    // Only after the password: answered before it, LIMIT_REACHED told
    // anyone who knew the name that the user had this many connections.
    session.check_session_room(user.id)?;
    tracing::info!(
        conn_id = session.conn_id,
        remote = %session.conn.remote_address(),
        user_id = user.id,
        "logged in"
    );
    let verified = Some(user.password_hash);
    issue_token(session, user.id, user.username, l.device_name, verified).await
}

/// Starts a check of `password` for `user` under the login throttle
/// (RATE_LIMITED after too many wrong ones); one longer than any a
/// registration accepts is wrong without hashing it (up to a frame's
/// length of it).
fn password_check<'a>(
    session: &'a Session,
    user: u64,
    password: &str,
) -> Result<auth::Attempt<'a>, Refusal> {
    let attempt = session
        .shared
        .login_throttle
        .begin(user, session.conn.remote_address().ip())
        .map_err(|wait| {
            Refusal::new(
                ErrorCode::RateLimited,
                "too many wrong passwords for this account; wait before trying again",
            )
            .with_retry_after(wait)
        })?;
    if password.len() > *PASSWORD_LEN.end() {
        attempt.failed();
        return Err(Refusal::new(ErrorCode::WrongPassword, "wrong password"));
    }
    Ok(attempt)
}

/// Waits for a slot to run Argon2. Each hash takes 19 MiB and tens of
/// milliseconds of a core; without a bound, a burst of logins (or an
/// attacker) makes the blocking pool run hundreds at once and exhausts
/// memory. At most `max-queued-password-checks` requests wait; beyond that
/// the answer is SERVER_BUSY with a retry-after. A request whose
/// connection closes while it waits gives up its place, so a client that
/// asks and hangs up costs no hash.
async fn hashing_permit(session: &Session) -> Result<auth::HashPermit<'_>, Refusal> {
    let address = session.conn.remote_address().ip();
    let acquired = tokio::select! {
        acquired = session.shared.hashing.acquire(address) => acquired,
        _ = session.conn.closed() => {
            return Err(Refusal::new(ErrorCode::Unavailable, "the connection closed"));
        }
    };
    acquired.map_err(|e| match e {
        auth::HashersError::Busy => Refusal::new(
            ErrorCode::ServerBusy,
            "too many password checks in progress; retry in a second",
        )
        .with_retry_after(HASHERS_BUSY_RETRY),
        auth::HashersError::Closed => {
            Refusal::new(ErrorCode::ServerShuttingDown, "server is shutting down")
        }
    })
}

/// Most sessions ListSessions lists (newest first): all a user may have
/// (`max-logged-in-devices` is at most this).
const LISTED_SESSIONS: u32 = crate::config::MAX_LOGGED_IN_DEVICES;

/// Checks the old password as a login does (its throttle counts a wrong
/// one), then stores the new one's hash and logs every other session out.
async fn change_password(
    session: &Session,
    authed: &crate::session::Authed,
    c: proto::ChangePassword,
) -> Result<(), Refusal> {
    auth::check_password(&c.new_password)
        .map_err(|e| Refusal::new(ErrorCode::InvalidArgument, e.to_string()))?;
    let shared = &session.shared;
    let me = authed.user_id;
    let attempt = password_check(session, me, &c.old_password)?;
    let Some(user) = shared.store.user_by_name(authed.username.clone()).await? else {
        return Err(Refusal::new(ErrorCode::NotFound, "no such user"));
    };
    let (old, new) = (c.old_password, c.new_password);
    let verified = user.password_hash.clone();
    let permit = hashing_permit(session).await?;
    let hashed = tokio::task::spawn_blocking(move || {
        auth::verify_password(&old, &user.password_hash)
            .then(|| auth::hash_password(&new))
            .transpose()
    })
    .await
    .map_err(|e| internal("the hashing task failed", &e))?
    .map_err(|e| internal("hashing failed", &e))?;
    drop(permit);
    let Some(hash) = hashed else {
        attempt.failed();
        return Err(Refusal::new(ErrorCode::WrongPassword, "wrong password"));
    };
    attempt.succeeded();
    let revoked = match shared
        .store
        .change_password(me, verified, hash, authed.token_hash, now_ms())
        .await
    {
        Ok(revoked) => revoked,
        // Another device changed it since the check.
        Err(StoreError::Conflict) => return Err(changed_meanwhile()),
        Err(e) => return Err(e.into()),
    };
    let mut closed = 0;
    for token_hash in &revoked {
        closed += shared.hub.close_token(
            me,
            token_hash,
            session.conn_id,
            ErrorCode::TokenRevoked,
            "the password was changed; log in again",
        );
    }
    tracing::info!(
        conn_id = session.conn_id,
        user_id = me,
        revoked = revoked.len(),
        closed,
        "changed the password"
    );
    Ok(())
}

/// The password a login or a change was checked against was changed
/// meanwhile (on another device).
fn changed_meanwhile() -> Refusal {
    Refusal::new(
        ErrorCode::WrongPassword,
        "the password was changed meanwhile",
    )
}

/// The retry-after given when the password hashers' queue is full.
const HASHERS_BUSY_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Issues a session token for a registration or a login. `verified`: the
/// password hash a login checked against; the session is stored only if
/// it is still the user's (a password change since refuses the login).
async fn issue_token(
    session: &Session,
    user_id: u64,
    username: String,
    device_name: String,
    verified: Option<String>,
) -> Result<proto::AuthOk, Refusal> {
    let (token, token_hash) = auth::new_token();
    let now = now_ms();
    let expires = now + session.shared.config.limits.session_ttl.as_millis() as i64;
    // A label only: cut to length, and without U+0000, which Postgres
    // cannot store (the login would fail after its password check).
    let device_name: String = device_name
        .chars()
        .filter(|&c| c != '\0')
        .take(64)
        .collect();
    let new = crate::store::NewSession {
        token_hash,
        user_id,
        device_name,
        created_at_ms: now,
        expires_at_ms: expires,
    };
    let store = &session.shared.store;
    match verified {
        None => store.create_session(new).await?,
        Some(hash) => match store.create_login_session(new, hash).await {
            Ok(()) => {}
            Err(StoreError::Conflict) => return Err(changed_meanwhile()),
            Err(e) => return Err(e.into()),
        },
    }
    // A password typed in: the app is in the foreground.
    if let Err(refusal) =
        session.authenticate(user_id, username.clone(), token_hash, expires, false)
    {
        // Nobody will ever hold this token: revoke its row rather than
        // leave a live session no device can resume or log out.
        if let Err(e) = session
            .shared
            .store
            .revoke_session(token_hash, now_ms())
            .await
        {
            tracing::warn!(error = %e, "could not revoke a session refused as it was issued");
        }
        return Err(refusal);
    }
    log_out_the_oldest(session, user_id, token_hash, now).await;
    Ok(auth_ok(session, user_id, username, token, expires))
}

/// Sessions beyond `max-logged-in-devices` one login logs out at most: a
/// store that had more (the limit lowered) sheds them over later logins.
const SHED_PER_LOGIN: u32 = 16;

/// A login beyond `max-logged-in-devices` logs the user's oldest sessions
/// out (never `new`, the one just issued), so the sessions kept per user
/// stay bounded however often a client logs in. A failure is only logged:
/// the login stands.
async fn log_out_the_oldest(session: &Session, user_id: u64, new: [u8; 32], now: i64) {
    let shared = &session.shared;
    let max = shared.config.limits.max_logged_in_devices;
    let live = match shared
        .store
        .live_sessions(user_id, now, max + SHED_PER_LOGIN)
        .await
    {
        Ok(live) => live,
        Err(e) => {
            tracing::warn!(user_id, error = %e, "could not count the user's sessions after a login");
            return;
        }
    };
    let excess = live.len().saturating_sub(max as usize);
    // Newest first: the oldest are at the end.
    let oldest = live
        .iter()
        .rev()
        .filter(|s| s.token_hash != new)
        .take(excess);
    for old in oldest {
        match shared.store.revoke_session(old.token_hash, now).await {
            Ok(_) => {
                shared.hub.close_token(
                    user_id,
                    &old.token_hash,
                    session.conn_id,
                    ErrorCode::TokenRevoked,
                    "logged out: the account logged in on a newer device",
                );
            }
            Err(e) => {
                tracing::warn!(user_id, error = %e, "could not log out a session beyond the limit");
                return;
            }
        }
    }
}

/// INTERNAL for the client; the detail (a panic's message, say) goes to
/// the log only.
fn internal(what: &str, detail: &dyn std::fmt::Display) -> Refusal {
    tracing::error!(error = %detail, "{what}");
    Refusal::new(ErrorCode::Internal, "internal error")
}

async fn resume(session: &Session, a: proto::Authenticate) -> Result<proto::AuthOk, Refusal> {
    if a.token.len() > 256 {
        return Err(Refusal::new(ErrorCode::TokenInvalid, "unknown token"));
    }
    let token_hash = auth::token_hash(&a.token);
    let store = &session.shared.store;
    let Some(record) = store.session(token_hash).await? else {
        return Err(Refusal::new(ErrorCode::TokenInvalid, "unknown token"));
    };
    if record.revoked_at_ms.is_some() {
        return Err(Refusal::new(
            ErrorCode::TokenRevoked,
            "token was revoked; log in again",
        ));
    }
    if record.expires_at_ms <= now_ms() {
        return Err(Refusal::new(
            ErrorCode::TokenExpired,
            "token expired; log in again",
        ));
    }
    let username = store
        .username(record.user_id)
        .await?
        .ok_or_else(|| Refusal::new(ErrorCode::TokenInvalid, "unknown token"))?;
    session.authenticate(
        record.user_id,
        username.clone(),
        token_hash,
        record.expires_at_ms,
        a.background,
    )?;
    // A logout of this token that committed after the read above may have
    // closed the token's connections before this one was in the hub: look
    // again now that it is. The connection is authenticated by now, so a
    // refusal closes it (the client would otherwise hold a connection
    // logged in as this user after an error, and could log in as another
    // on it).
    let refusal = match store.session(token_hash).await {
        Ok(Some(r)) if r.revoked_at_ms.is_none() => None,
        Ok(_) => Some(Refusal::new(
            ErrorCode::TokenRevoked,
            "token was revoked; log in again",
        )),
        Err(e) => Some(Refusal::from(e)),
    };
    if let Some(refusal) = refusal {
        wire::close(&session.conn, refusal.code, &refusal.message);
        return Err(refusal);
    }
    Ok(auth_ok(
        session,
        record.user_id,
        username,
        String::new(),
        record.expires_at_ms,
    ))
}

fn auth_ok(
    session: &Session,
    user_id: u64,
    username: String,
    token: String,
    expires: i64,
) -> proto::AuthOk {
    let interval = session.shared.config.limits.heartbeat_interval;
    proto::AuthOk {
        user_id,
        username,
        token,
        token_expires_at_ms: expires,
        server_time_ms: now_ms(),
        heartbeat_interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
        confirms_leave: true,
        max_text_len: u32::try_from(session.shared.config.limits.max_text_len).unwrap_or(u32::MAX),
        max_photo_bytes: session.shared.config.limits.max_photo_bytes,
        calls: true,
        // At most 7 days (the setting's bound): fits.
        edit_window_ms: u32::try_from(session.shared.config.limits.edit_window.as_millis())
            .unwrap_or(u32::MAX),
        // At most 30 days (the setting's bound): fits.
        unsend_window_ms: u32::try_from(session.shared.config.limits.unsend_window.as_millis())
            .unwrap_or(u32::MAX),
    }
}

async fn handle_request(session: &Session, frame: Frame) -> Result<Reply, Refusal> {
    let authed = session
        .authed()
        .expect("control requests run after authentication");
    let me = authed.user_id;
    let shared = &session.shared;
    let store = &shared.store;
    let rid = frame.request_id;
    let reply = |body| Ok(Reply::Frame(Frame::new(rid, body)));
    match frame.body {
        Some(Body::Register(_) | Body::Login(_) | Body::Authenticate(_)) => Err(Refusal::new(
            ErrorCode::UnexpectedFrame,
            "this connection is already authenticated",
        )),
        Some(Body::Logout(_)) => {
            store.revoke_session(authed.token_hash, now_ms()).await?;
            // Other connections of this node resumed with the token (a
            // stolen copy, say) end with it: checks ran only when they
            // authenticated. Other nodes' learn at their token's expiry.
            let others = shared.hub.close_token(
                me,
                &authed.token_hash,
                session.conn_id,
                ErrorCode::TokenRevoked,
                "token was revoked; log in again",
            );
            tracing::info!(
                conn_id = session.conn_id,
                user_id = me,
                others,
                "logged out"
            );
            Ok(Reply::Close(ok(rid), ErrorCode::LoggedOut))
        }
        Some(Body::ListSessions(_)) => {
            let live = store.live_sessions(me, now_ms(), LISTED_SESSIONS).await?;
            let sessions = live
                .into_iter()
                .map(|s| proto::SessionInfo {
                    session_id: bytes::Bytes::copy_from_slice(auth::session_id(&s.token_hash)),
                    current: s.token_hash == authed.token_hash,
                    device_name: s.device_name,
                    created_at_ms: s.created_at_ms,
                    expires_at_ms: s.expires_at_ms,
                })
                .collect();
            reply(Body::SessionList(proto::SessionList { sessions }))
        }
        Some(Body::RevokeSession(r)) => {
            if r.session_id.len() != auth::SESSION_ID_LEN {
                return Err(Refusal::new(
                    ErrorCode::InvalidArgument,
                    format!("session_id must be {} bytes", auth::SESSION_ID_LEN),
                ));
            }
            if r.session_id[..] == *auth::session_id(&authed.token_hash) {
                return Err(Refusal::new(
                    ErrorCode::InvalidArgument,
                    "that is this connection's session: use Logout",
                ));
            }
            let Some(revoked) = store
                .revoke_session_by_id(me, r.session_id.to_vec(), now_ms())
                .await?
            else {
                return Err(Refusal::new(ErrorCode::NotFound, "no such session"));
            };
            let closed = shared.hub.close_token(
                me,
                &revoked,
                session.conn_id,
                ErrorCode::TokenRevoked,
                "this session was logged out from another device; log in again",
            );
            tracing::info!(
                conn_id = session.conn_id,
                user_id = me,
                closed,
                "revoked a session"
            );
            reply(Body::Ok(proto::Ok {}))
        }
        Some(Body::ChangePassword(c)) => change_password(session, authed, c)
            .await
            .map(|()| Reply::Frame(Frame::new(rid, Body::Ok(proto::Ok {})))),
        Some(Body::FriendRequest(r)) => {
            let name = auth::canonical_username(&r.username)
                .map_err(|_| Refusal::new(ErrorCode::NotFound, "no such user"))?;
            let Some(target) = store.user_by_name(name).await? else {
                return Err(Refusal::new(ErrorCode::NotFound, "no such user"));
            };
            if target.id == me {
                return Err(Refusal::new(
                    ErrorCode::InvalidArgument,
                    "cannot befriend yourself",
                ));
            }
            let max = shared.config.limits.max_friends;
            match store
                .friend_request_within(me, target.id, now_ms(), max)
                .await?
            {
                FriendRequestOutcome::Requested => {
                    notify_friend(
                        session,
                        target.id,
                        proto::friend_event::Kind::RequestReceived,
                    );
                    notify_own_devices(
                        session,
                        target.id,
                        Some(target.username),
                        proto::friend_event::Kind::RequestSent,
                    )
                    .await;
                }
                FriendRequestOutcome::Accepted => {
                    notify_friend(session, target.id, proto::friend_event::Kind::Accepted);
                    notify_own_devices(
                        session,
                        target.id,
                        Some(target.username),
                        proto::friend_event::Kind::YouAccepted,
                    )
                    .await;
                }
                FriendRequestOutcome::AlreadyRequested => {}
                FriendRequestOutcome::AlreadyFriends => {
                    return Err(Refusal::new(ErrorCode::AlreadyFriends, "already friends"));
                }
                FriendRequestOutcome::AskerFull => return Err(friends_full(max)),
                // As for a name with no account: the block is not
                // announced (though the account can be seen to exist, in
                // a shared group for one).
                FriendRequestOutcome::BlockedBy => {
                    return Err(Refusal::new(ErrorCode::NotFound, "no such user"));
                }
                FriendRequestOutcome::Blocked => {
                    return Err(Refusal::new(
                        ErrorCode::InvalidArgument,
                        format!("you blocked {}; unblock them first", target.username),
                    ));
                }
                FriendRequestOutcome::TargetFull => {
                    return Err(Refusal::new(
                        ErrorCode::LimitReached,
                        format!(
                            "{} has too many friend requests waiting for an answer",
                            target.username
                        ),
                    ));
                }
            }
            reply(Body::Ok(proto::Ok {}))
        }
        Some(Body::FriendAccept(a)) => {
            let max = session.shared.config.limits.max_friends;
            let accepted = store
                .friend_accept_within(me, a.user_id, now_ms(), max)
                .await
                .map_err(|e| match e {
                    StoreError::NotFound => {
                        Refusal::new(ErrorCode::NotFound, "no pending request from that user")
                    }
                    e => e.into(),
                })?;
            if !accepted {
                return Err(friends_full(max));
            }
            notify_friend(session, a.user_id, proto::friend_event::Kind::Accepted);
            notify_own_devices(
                session,
                a.user_id,
                None,
                proto::friend_event::Kind::YouAccepted,
            )
            .await;
            reply(Body::Ok(proto::Ok {}))
        }
        Some(Body::FriendDecline(d)) => {
            if !store.friend_decline(me, d.user_id).await? {
                return Err(Refusal::new(
                    ErrorCode::NotFound,
                    "no pending request from that user",
                ));
            }
            notify_friend(session, d.user_id, proto::friend_event::Kind::Declined);
            notify_own_devices(
                session,
                d.user_id,
                None,
                proto::friend_event::Kind::YouDeclined,
            )
            .await;
            reply(Body::Ok(proto::Ok {}))
        }
        Some(Body::FriendRemove(r)) => {
            let removed = store.friend_remove(me, r.user_id).await?;
            // Not friends either way now (a retry finds nothing to remove,
            // and its first attempt may have been cut short before this).
            shared.calls.friendship_ended(me, r.user_id);
            if !removed {
                return Err(Refusal::new(
                    ErrorCode::NotFound,
                    "not a friend or pending request",
                ));
            }
            shared.presence.unfriend(me, r.user_id);
            notify_friend(session, r.user_id, proto::friend_event::Kind::Removed);
            notify_own_devices(
                session,
                r.user_id,
                None,
                proto::friend_event::Kind::YouRemoved,
            )
            .await;
            reply(Body::Ok(proto::Ok {}))
        }
        Some(Body::BlockUser(b)) => {
            if b.user_id == me {
                return Err(Refusal::new(
                    ErrorCode::InvalidArgument,
                    "cannot block yourself",
                ));
            }
            let max = chat_protocol::limits::MAX_BLOCKED;
            let outcome = store
                .block(me, b.user_id, now_ms(), max)
                .await
                .map_err(|e| match e {
                    StoreError::NotFound => Refusal::new(ErrorCode::NotFound, "no such user"),
                    e => e.into(),
                })?;
            match outcome {
                BlockOutcome::Blocked { ended } => {
                    shared.calls.friendship_ended(me, b.user_id);
                    if ended {
                        shared.presence.unfriend(me, b.user_id);
                        notify_friend(session, b.user_id, proto::friend_event::Kind::Removed);
                    }
                    // Blocked says it all to the other devices: the
                    // friendship or request is gone too.
                    notify_own_devices(
                        session,
                        b.user_id,
                        None,
                        proto::friend_event::Kind::Blocked,
                    )
                    .await;
                }
                BlockOutcome::AlreadyBlocked => {}
                BlockOutcome::Full => {
                    return Err(Refusal::new(
                        ErrorCode::LimitReached,
                        format!("at most {max} blocked users; unblock some first"),
                    ));
                }
            }
            reply(Body::Ok(proto::Ok {}))
        }
        Some(Body::UnblockUser(u)) => {
            if !store.unblock(me, u.user_id).await? {
                return Err(Refusal::new(
                    ErrorCode::NotFound,
                    "that user is not blocked",
                ));
            }
            notify_own_devices(
                session,
                u.user_id,
                None,
                proto::friend_event::Kind::Unblocked,
            )
            .await;
            reply(Body::Ok(proto::Ok {}))
        }
        Some(Body::ListFriends(_)) => {
            let lists = store.friends(me).await?;
            let refs = |v: Vec<(u64, String)>| {
                v.into_iter()
                    .map(|(user_id, username)| proto::UserRef { user_id, username })
                    .collect()
            };
            reply(Body::FriendList(proto::FriendList {
                friends: refs(lists.friends),
                incoming: refs(lists.incoming),
                outgoing: refs(lists.outgoing),
                blocked: refs(lists.blocked),
            }))
        }
        Some(Body::OpenDirect(o)) => {
            if o.user_id == me {
                return Err(Refusal::new(
                    ErrorCode::InvalidArgument,
                    "a direct conversation needs another user",
                ));
            }
            if !store.are_friends(me, o.user_id).await? {
                return Err(Refusal::new(ErrorCode::NotFriends, "only friends can chat"));
            }
            let id = store.open_direct(me, o.user_id, now_ms()).await?;
            let view = store.conversation(id, me).await?;
            reply(Body::Conversation(conversation_info(view, me)))
        }
        Some(Body::DeleteConversation(d)) => {
            // Nothing more: catch-up and the unread counts start after what
            // was cleared, and the watermarks stay as they were (deleting
            // is neither receiving nor reading).
            let cleared = store
                .delete_conversation(d.conversation_id, me, d.up_to_seq)
                .await?;
            tell_own_devices(
                session,
                proto::ConversationChanged {
                    conversation_id: d.conversation_id,
                    kind: proto::conversation_changed::Kind::Deleted as i32,
                    muted_until_ms: 0,
                    up_to_seq: cleared,
                },
            );
            reply(Body::Ok(proto::Ok {}))
        }
        Some(Body::MuteConversation(m)) => {
            if m.muted_until_ms < 0 {
                return Err(Refusal::new(
                    ErrorCode::InvalidArgument,
                    "muted_until_ms is a time (Unix ms), or 0 to unmute",
                ));
            }
            store
                .set_muted(m.conversation_id, me, m.muted_until_ms)
                .await?;
            tell_own_devices(
                session,
                proto::ConversationChanged {
                    conversation_id: m.conversation_id,
                    kind: proto::conversation_changed::Kind::Muted as i32,
                    muted_until_ms: m.muted_until_ms,
                    up_to_seq: 0,
                },
            );
            reply(Body::Ok(proto::Ok {}))
        }
        Some(Body::ListConversations(l)) => {
            let limit = page_limit(l.limit, DEFAULT_CONVERSATION_PAGE) as usize;
            let mut before = (l.before_activity_ms, l.before_conversation_id);
            // Read a chunk at a time until the reply is full: a view
            // carries every member, so in large groups a frame holds a
            // dozen, and building the 200 a client may ask for, to send
            // a dozen, kept the store busy for nothing. Fewer than asked is
            // an ordinary page (the limit is capped too): the client pages
            // on from the last one until a page comes back empty.
            let budget = reply_budget(session);
            let mut used = REPLY_ENVELOPE;
            let mut conversations = Vec::new();
            'chunks: while conversations.len() < limit {
                let chunk = (limit - conversations.len()).min(CONVERSATION_CHUNK);
                let views = store.conversations(me, before, chunk as u32).await?;
                let read = views.len();
                for view in views {
                    let info = conversation_info(view, me);
                    used += repeated_len(info.encoded_len());
                    if used > budget && !conversations.is_empty() {
                        break 'chunks;
                    }
                    before = (info.last_activity_ms, info.conversation_id);
                    conversations.push(info);
                }
                if read < chunk {
                    break;
                }
            }
            reply(Body::ConversationList(proto::ConversationList {
                conversations,
            }))
        }
        Some(Body::HistoryQuery(q)) => {
            // A member reads from where they joined to the newest message;
            // one who left or was removed, their last stay, up to the
            // message that ended it.
            let (membership, former) = match store.membership(q.conversation_id, me).await? {
                Some(membership) => (membership, false),
                None => {
                    let former = store
                        .former_membership(q.conversation_id, me)
                        .await?
                        .ok_or_else(|| {
                            Refusal::new(ErrorCode::NotAMember, "not a member of this conversation")
                        })?;
                    (former, true)
                }
            };
            let last_seq = membership.last_seq;
            let limit = page_limit(q.limit, DEFAULT_HISTORY_PAGE);
            let direction = match proto::history_query::Direction::try_from(q.direction) {
                Ok(proto::history_query::Direction::Forward) => Direction::Forward,
                _ => Direction::Backward,
            };
            let cursor = readable_cursor(direction, q.cursor, &membership);
            // A stay that ended has nothing past its end: read no more than
            // what is left of it (nothing, at or past its end).
            let limit = match direction {
                Direction::Forward if former => {
                    let left = last_seq.saturating_sub(cursor);
                    if left == 0 {
                        return reply(Body::HistoryPage(proto::HistoryPage {
                            messages: Vec::new(),
                            has_more: false,
                        }));
                    }
                    limit.min(u32::try_from(left).unwrap_or(u32::MAX))
                }
                _ => limit,
            };
            // Only from a run that ends at the conversation's last seq: one
            // that missed a push must neither pass off an old page as the
            // newest one nor serve what a later unsend erased. A former
            // member's last seq is their stay's end, not the head: history.
            let cached = match direction {
                Direction::Backward if !former => {
                    shared
                        .cache
                        .page_before(q.conversation_id, cursor, limit, last_seq)
                        .await
                }
                _ => None,
            };
            let mut page = match cached {
                Some(page) => page,
                None => {
                    read_history(
                        store.as_ref(),
                        q.conversation_id,
                        direction,
                        cursor,
                        limit,
                        reply_budget(session),
                    )
                    .await?
                }
            };
            let read_more = page.has_more;
            bound_page(&mut page, last_seq);
            if former && direction == Direction::Forward {
                // A stay that ended: nothing is theirs past its end.
                page.has_more = read_more && page.messages.last().is_some_and(|m| m.seq < last_seq);
            }
            // Members added later read from the message that added them on.
            let joined = membership.joined_seq;
            if joined > 0 {
                page.messages.retain(|m| m.seq >= joined);
                if direction == Direction::Backward {
                    page.has_more &= page.messages.first().is_some_and(|m| m.seq > joined);
                }
            }
            // A page of long texts can outgrow a frame: keep the messages
            // nearest the cursor that fit, and say there are more.
            let mut messages = page.messages;
            let lens = messages.iter().map(|m| m.encoded_len());
            let fit = match direction {
                Direction::Forward => fitting(lens, reply_budget(session)),
                Direction::Backward => fitting(lens.rev(), reply_budget(session)),
            };
            page.has_more |= fit < messages.len();
            match direction {
                Direction::Forward => messages.truncate(fit),
                Direction::Backward => drop(messages.drain(..messages.len() - fit)),
            }
            reply(Body::HistoryPage(proto::HistoryPage {
                messages: messages.iter().map(|m| (**m).clone()).collect(),
                has_more: page.has_more,
            }))
        }
        Some(Body::CreateGroup(g)) => {
            charge_send_rate(session)?;
            let name = group_name(&g.name)?;
            let limits = &shared.config.limits;
            if g.member_ids.len() + 1 > limits.max_group_size {
                return Err(Refusal::new(
                    ErrorCode::LimitReached,
                    format!("groups have at most {} members", limits.max_group_size),
                ));
            }
            let client_key = client_key(&g.client_key)?;
            // Through the send committer, so the group's first message is
            // fanned out before anyone can reply to it.
            shared
                .delivery
                .submit(SendJob {
                    work: Work::CreateGroup {
                        group: Box::new(NewGroup {
                            creator: me,
                            name,
                            members: g.member_ids,
                            client_key,
                        }),
                        max_members: limits.max_group_size,
                    },
                    request_id: rid,
                    session: authed.handle.clone(),
                    received: std::time::Instant::now(),
                })
                .await?;
            Ok(Reply::Deferred)
        }
        Some(Body::RenameGroup(r)) => {
            let change = GroupChange::Rename(group_name(&r.name)?);
            let key = client_key(&r.client_key)?;
            group_change(session, rid, r.conversation_id, change, key).await
        }
        Some(Body::AddMembers(a)) => {
            if a.user_ids.is_empty() || a.user_ids.len() > shared.config.limits.max_group_size {
                return Err(Refusal::new(
                    ErrorCode::InvalidArgument,
                    "user_ids: 1 to the group size limit",
                ));
            }
            let key = client_key(&a.client_key)?;
            let change = GroupChange::Add(a.user_ids);
            group_change(session, rid, a.conversation_id, change, key).await
        }
        Some(Body::RemoveMember(r)) => {
            let change = GroupChange::Remove(r.user_id);
            let key = client_key(&r.client_key)?;
            group_change(session, rid, r.conversation_id, change, key).await
        }
        Some(Body::LeaveGroup(l)) => {
            let key = client_key(&l.client_key)?;
            group_change(session, rid, l.conversation_id, GroupChange::Leave, key).await
        }
        Some(Body::SetAdmin(a)) => {
            let change = GroupChange::SetAdmin(a.user_id, a.admin);
            let key = client_key(&a.client_key)?;
            group_change(session, rid, a.conversation_id, change, key).await
        }
        Some(Body::GetConversation(g)) => {
            let view = store.conversation(g.conversation_id, me).await?;
            reply(Body::Conversation(conversation_info(view, me)))
        }
        Some(Body::GetMessageReceipts(q)) => {
            let view = store.conversation(q.conversation_id, me).await?;
            // A member added later reads from the message that added them
            // on (one who deleted the chat, from after what they deleted),
            // here as in history: of an earlier message they learn
            // nothing, not even that it exists.
            let joined = store
                .membership(q.conversation_id, me)
                .await?
                .map_or(0, |m| m.joined_seq);
            if q.seq == 0 || q.seq > view.last_seq || q.seq < joined {
                return Err(Refusal::new(
                    ErrorCode::NotFound,
                    "no message with that seq",
                ));
            }
            let page = store
                .history(q.conversation_id, Direction::Forward, q.seq - 1, 1)
                .await?;
            let Some(message) = page.messages.first() else {
                return Err(Refusal::new(
                    ErrorCode::NotFound,
                    "no message with that seq",
                ));
            };
            // As in `conversation_info`: nothing of the other in a closed
            // direct conversation.
            let shown = |m: &MemberState| !view.closed || m.user_id == me;
            let members: Vec<proto::MemberReceipt> = view
                .members
                .iter()
                .filter(|m| m.user_id != message.sender_id && m.joined_seq <= q.seq)
                .map(|m| proto::MemberReceipt {
                    user_id: m.user_id,
                    delivered: shown(m) && m.delivered_seq >= q.seq,
                    seen: shown(m) && m.seen_seq >= q.seq,
                })
                .collect();
            reply(Body::MessageReceipts(proto::MessageReceipts {
                conversation_id: q.conversation_id,
                seq: q.seq,
                delivered_count: members.iter().filter(|m| m.delivered).count() as u32,
                seen_count: members.iter().filter(|m| m.seen).count() as u32,
                members,
            }))
        }
        Some(Body::SubscribePresence(sub)) => {
            let max = shared.config.limits.max_presence_subscriptions;
            let mut wanted = sub.user_ids;
            wanted.sort_unstable();
            wanted.dedup();
            if wanted.len() > max {
                return Err(Refusal::new(
                    ErrorCode::InvalidArgument,
                    format!("at most {max} users per subscription"),
                ));
            }
            if let Some(stranger) = first_stranger(store.as_ref(), me, &wanted).await? {
                return Err(not_friends_presence(stranger));
            }
            // Watch first, then read: a change in between is sent again by
            // the notifier rather than lost.
            // Under the lock `forget` takes the list under, so the two
            // cannot interleave and leave this session watching for good.
            {
                let mut watching = session.watching.lock().expect("watching lock");
                let old = std::mem::replace(&mut *watching, wanted.clone());
                shared.presence.watch(&authed.handle, &old, &wanted);
            }
            if session.is_closed() {
                session.forget().await;
            }
            // A friendship that ended after the check above may have had
            // its watchers dropped (`Presence::unfriend`, after the end is
            // stored) before this session watched: look again now that it
            // does, so one of the two sees the end. (Watching first and
            // checking once would show a stranger's changes to anyone who
            // asks, until the check.) Refused now, the session watches
            // nobody.
            let refusal = match first_stranger(store.as_ref(), me, &wanted).await {
                Ok(None) => None,
                Ok(Some(stranger)) => Some(not_friends_presence(stranger)),
                Err(refusal) => Some(refusal),
            };
            if let Some(refusal) = refusal {
                {
                    let mut watching = session.watching.lock().expect("watching lock");
                    let old = std::mem::take(&mut *watching);
                    shared.presence.watch(&authed.handle, &old, &[]);
                }
                return Err(refusal);
            }
            let states = shared.presence.states(&wanted).await?;
            reply(Body::PresenceSnapshot(proto::PresenceSnapshot { states }))
        }
        Some(Body::SetPresenceVisibility(v)) => {
            shared.presence.set_hidden(me, v.hidden).await?;
            reply(Body::Ok(proto::Ok {}))
        }
        Some(Body::RegisterPush(r)) => {
            if let Some(why) = chat_protocol::push::check_registration(&r.app_id, &r.token) {
                return Err(Refusal::new(ErrorCode::InvalidArgument, why));
            }
            let device = (!r.token.is_empty()).then(|| PushDevice {
                app_id: r.app_id,
                token: r.token,
                registered_ms: now_ms(),
            });
            if !store.set_push(authed.token_hash, device).await? {
                // Revoked since this connection authenticated (a logout
                // from another device closes it too, a moment later).
                return Err(Refusal::new(
                    ErrorCode::TokenRevoked,
                    "this session has ended",
                ));
            }
            reply(Body::Ok(proto::Ok {}))
        }
        Some(other) => Err(Refusal::new(
            ErrorCode::UnexpectedFrame,
            format!("{} is not a control request", other.name()),
        )),
        None => Err(Refusal::new(ErrorCode::MalformedFrame, "empty frame")),
    }
}

/// Room in a reply for what is not one of its items: the frame's request
/// id and body tag, a page's `has_more`.
const REPLY_ENVELOPE: usize = 32;

/// Messages read for a history page at first (a default page in one
/// read); each further read takes twice the last.
const HISTORY_FIRST_READ: u32 = 50;

/// Up to `limit` messages of history from `cursor`, in reads that grow
/// until they hold more than a reply of `budget` bytes takes: a page of
/// 200 maximum-size texts (3.2 MiB) was read whole, on SQLite's store
/// thread, for the 3 that fit in a reply.
async fn read_history(
    store: &dyn HistoryStore,
    conversation_id: u64,
    direction: Direction,
    mut cursor: u64,
    limit: u32,
    budget: usize,
) -> Result<Page, StoreError> {
    let mut read = limit.min(HISTORY_FIRST_READ);
    let mut messages: Vec<Arc<proto::Message>> = Vec::new();
    let mut used = REPLY_ENVELOPE;
    loop {
        let page = store
            .history(conversation_id, direction, cursor, read)
            .await?;
        used += page
            .messages
            .iter()
            .map(|m| repeated_len(m.encoded_len()))
            .sum::<usize>();
        let got = page.messages.len();
        match direction {
            Direction::Forward => {
                cursor = page.messages.last().map_or(cursor, |m| m.seq);
                messages.extend(page.messages);
            }
            Direction::Backward => {
                cursor = page.messages.first().map_or(cursor, |m| m.seq);
                let newer = std::mem::replace(&mut messages, page.messages);
                messages.extend(newer);
            }
        }
        let left = (limit as usize).saturating_sub(messages.len());
        if !page.has_more || got == 0 || left == 0 || used > budget {
            return Ok(Page {
                messages,
                has_more: page.has_more,
            });
        }
        read = read.saturating_mul(2).min(left as u32);
    }
}

/// Largest reply page, in encoded bytes: the node's `max-frame-len`, the
/// size it accepts from clients, and far below what a client accepts
/// (the protocol's 1 MiB). Without it, 200 messages of 16 KiB made a
/// 3.3 MB HistoryPage that clients refuse as too large.
fn reply_budget(session: &Session) -> usize {
    session.shared.config.limits.max_frame_len
}

/// How many items, of these encoded lengths in page order, fit in a reply
/// of `budget` bytes: at least one, so paging always moves on (one message
/// always fits, as config validation keeps `max-text-len` plus its
/// envelope under `max-frame-len`).
fn fitting(lens: impl Iterator<Item = usize>, budget: usize) -> usize {
    let mut used = REPLY_ENVELOPE;
    let mut n = 0;
    for len in lens {
        used += repeated_len(len);
        if used > budget && n > 0 {
            break;
        }
        n += 1;
    }
    n
}

/// What an item of encoded length `len` adds to a reply's repeated field:
/// its tag byte, its length prefix and itself.
fn repeated_len(len: usize) -> usize {
    1 + prost::length_delimiter_len(len) + len
}

fn page_limit(asked: u32, default: u32) -> u32 {
    if asked == 0 {
        default
    } else {
        asked.min(MAX_PAGE_SIZE)
    }
}

/// Where a history read starts, within what `membership` (looked up just
/// before) lets the member read: forward pages from the member's first
/// seq, backward ones (0: the newest) from no later than the
/// conversation's last seq then. A member removed after that lookup, with
/// messages sent since, reads nothing past it: the removal may commit
/// between the lookup and the read.
fn readable_cursor(direction: Direction, cursor: u64, membership: &Membership) -> u64 {
    match direction {
        Direction::Forward => cursor.max(membership.joined_seq.saturating_sub(1)),
        Direction::Backward => {
            let newest = membership.last_seq.saturating_add(1);
            if cursor == 0 {
                newest
            } else {
                cursor.min(newest)
            }
        }
    }
}

/// Drops what a page read past `last_seq` (a forward page read after the
/// membership lookup, see [`readable_cursor`]); the client pages on for it.
fn bound_page(page: &mut Page, last_seq: u64) {
    let read = page.messages.len();
    page.messages.retain(|m| m.seq <= last_seq);
    page.has_more |= page.messages.len() < read;
}

/// The first of `users` who is not a friend of `me`, if any.
async fn first_stranger(
    store: &dyn HistoryStore,
    me: u64,
    users: &[u64],
) -> Result<Option<u64>, Refusal> {
    if users.is_empty() {
        return Ok(None);
    }
    let friends: std::collections::HashSet<u64> = store
        .friends(me)
        .await?
        .friends
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    Ok(users.iter().copied().find(|id| !friends.contains(id)))
}

fn not_friends_presence(stranger: u64) -> Refusal {
    Refusal::new(
        ErrorCode::NotFriends,
        format!("user {stranger} is not a friend; only friends' presence is visible"),
    )
}

/// Accepting a request adds a friend: a user's friends and the requests
/// they sent count together toward `max-friends` (a request is a
/// friendship waiting), so neither list grows past it. (Requests are
/// checked by the store, in the change's transaction.)
fn friends_full(max: u64) -> Refusal {
    Refusal::new(
        ErrorCode::LimitReached,
        format!("at most {max} friends and friend requests waiting for an answer"),
    )
}

fn notify_friend(session: &Session, user: u64, kind: proto::friend_event::Kind) {
    let authed = session.authed().expect("authenticated");
    let event = Frame::push(Body::FriendEvent(proto::FriendEvent {
        kind: kind as i32,
        user: Some(proto::UserRef {
            user_id: authed.user_id,
            username: authed.username.clone(),
        }),
    }));
    session
        .shared
        .hub
        .push(user, StreamKind::Control, &Outbound::frame(&event), None);
}

/// Tells the user's other devices on this node that this one changed a
/// conversation's settings (mute, delete).
fn tell_own_devices(session: &Session, change: proto::ConversationChanged) {
    let authed = session.authed().expect("authenticated");
    let hub = &session.shared.hub;
    if hub.sessions_of(authed.user_id) < 2 {
        return;
    }
    let frame = Outbound::frame(&Frame::push(Body::ConversationChanged(change)));
    hub.push(
        authed.user_id,
        StreamKind::Control,
        &frame,
        Some(session.conn_id),
    );
}

/// Tells the user's other devices on this node what this one changed in
/// their friend list (`other` is the user it concerns), so that their
/// lists and presence subscriptions stay current: a friend removed from
/// the phone stayed on the laptop, shown online, until it reconnected.
async fn notify_own_devices(
    session: &Session,
    other: u64,
    other_name: Option<String>,
    kind: proto::friend_event::Kind,
) {
    let authed = session.authed().expect("authenticated");
    let hub = &session.shared.hub;
    if hub.sessions_of(authed.user_id) < 2 {
        return;
    }
    let username = match other_name {
        Some(name) => name,
        // Only a lookup: the change is made, and a device that misses the
        // name still has the id.
        None => match session.shared.store.username(other).await {
            Ok(name) => name.unwrap_or_default(),
            Err(e) => {
                tracing::debug!(error = %e, "the friend's name for the other devices");
                String::new()
            }
        },
    };
    let event = Frame::push(Body::FriendEvent(proto::FriendEvent {
        kind: kind as i32,
        user: Some(proto::UserRef {
            user_id: other,
            username,
        }),
    }));
    hub.push(
        authed.user_id,
        StreamKind::Control,
        &Outbound::frame(&event),
        Some(session.conn_id),
    );
}

/// The wire form of a conversation.
pub fn conversation_info(view: ConversationView, viewer: UserId) -> proto::ConversationInfo {
    // In a closed direct conversation (the two are not friends any more)
    // the other's watermarks are not shown: after a block, the blocked
    // user must not see when the blocker reads.
    let hidden = |user| view.closed && user != viewer;
    proto::ConversationInfo {
        conversation_id: view.id,
        kind: view.kind as i32,
        name: view.name,
        members: view
            .members
            .into_iter()
            .map(|m| proto::Member {
                user_id: m.user_id,
                username: m.username,
                delivered_seq: if hidden(m.user_id) {
                    0
                } else {
                    m.delivered_seq
                },
                seen_seq: if hidden(m.user_id) { 0 } else { m.seen_seq },
                admin: m.admin,
                joined_seq: m.joined_seq,
            })
            .collect(),
        last_seq: view.last_seq,
        last_activity_ms: view.last_activity_ms,
        // A list entry shows a line of the last message: its text is cut
        // (by the store) and a photo's preview left to history, or a page
        // of photo conversations would carry 4 KiB an entry.
        last_message: view.last_message.map(|mut message| {
            if let Some(photo) = message.photo.as_mut() {
                photo.preview = bytes::Bytes::new();
            }
            Box::new(message)
        }),
        unread_count: view.unread_count,
        former_member: view.former,
        muted_until_ms: view.muted_until_ms,
    }
}

/// Longest group name, in characters.
const MAX_GROUP_NAME_CHARS: usize = 100;

fn group_name(name: &str) -> Result<String, Refusal> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_GROUP_NAME_CHARS || name.contains('\0') {
        return Err(Refusal::new(
            ErrorCode::InvalidArgument,
            format!("group names have 1-{MAX_GROUP_NAME_CHARS} characters, none of them U+0000"),
        ));
    }
    Ok(name.to_string())
}

/// An idempotency key of a group request: 1-64 bytes without U+0000, or
/// empty for none.
fn client_key(key: &str) -> Result<Option<String>, Refusal> {
    match key {
        "" => Ok(None),
        key if key.len() > MAX_CLIENT_MSG_ID_LEN || key.contains('\0') => Err(Refusal::new(
            ErrorCode::InvalidArgument,
            format!("client_key must be 1-{MAX_CLIENT_MSG_ID_LEN} bytes without U+0000, or empty"),
        )),
        key => Ok(Some(key.to_owned())),
    }
}

/// Charges a group request (it posts a SYSTEM message to every member) to
/// the user's send rate, so group churn cannot flood members where sends
/// could not.
fn charge_send_rate(session: &Session) -> Result<(), Refusal> {
    let rate = session.shared.config.limits.send_rate;
    charge(session, &session.shared.send_limiter, |wait| {
        format!("group changes count as sends: over {rate} per second; retry in {wait} ms")
    })
}

/// Charges a control request to the user's control bucket (see
/// `Shared::control_limiter`).
fn charge_control_rate(session: &Session) -> Result<(), Refusal> {
    let rate = session.shared.config.limits.control_rate;
    charge(session, &session.shared.control_limiter, |wait| {
        format!("over {rate} control requests per second; retry in {wait} ms")
    })
}

/// Charges a RevokeSession to the connection's bucket (see
/// `Shared::revoke_limiter`).
fn charge_revoke_rate(session: &Session) -> Result<(), Refusal> {
    charge_to(&session.shared.revoke_limiter, session.conn_id, |wait| {
        format!(
            "over {} session revocations per second; retry in {wait} ms",
            crate::ratelimit::REVOKE_RATE
        )
    })
}

/// Charges a leave to the user's leave bucket (see `Shared::leave_limiter`).
fn charge_leave_rate(session: &Session) -> Result<(), Refusal> {
    charge(session, &session.shared.leave_limiter, |wait| {
        format!(
            "over {} group leaves per second; retry in {wait} ms",
            crate::ratelimit::LEAVE_RATE
        )
    })
}

/// Takes a token from the user's bucket in `limiter`, or refuses with
/// RATE_LIMITED, the retry-after and `why` (given it in milliseconds).
pub(super) fn charge(
    session: &Session,
    limiter: &crate::ratelimit::RateLimiter,
    why: impl FnOnce(u32) -> String,
) -> Result<(), Refusal> {
    let user = session.authed().expect("authenticated").user_id;
    charge_to(limiter, user, why)
}

/// Takes a token from `key`'s bucket in `limiter` (a user's, a
/// connection's), or refuses as [`charge`] does.
fn charge_to<K: Eq + std::hash::Hash>(
    limiter: &crate::ratelimit::RateLimiter<K>,
    key: K,
    why: impl FnOnce(u32) -> String,
) -> Result<(), Refusal> {
    limiter
        .check(key, std::time::Instant::now())
        .map_err(|wait| {
            Refusal::new(ErrorCode::RateLimited, why(retry_after_ms(wait))).with_retry_after(wait)
        })
}

/// Queues a group change on the send committer, so its SYSTEM message takes
/// its place in seq order with concurrent sends; the committer answers.
async fn group_change(
    session: &Session,
    request_id: u64,
    conversation_id: u64,
    change: GroupChange,
    client_key: Option<String>,
) -> Result<Reply, Refusal> {
    // Leaving works whatever the send rate (it has a bucket of its own,
    // against floods); every other change posts a message to the group
    // and counts against the sender's rate like one.
    if matches!(change, GroupChange::Leave) {
        charge_leave_rate(session)?;
    } else {
        charge_send_rate(session)?;
    }
    let authed = session.authed().expect("authenticated");
    session
        .shared
        .delivery
        .submit(SendJob {
            work: Work::Group {
                edit: Box::new(GroupEdit {
                    conversation_id,
                    actor: authed.user_id,
                    change,
                    client_key,
                }),
                max_members: session.shared.config.limits.max_group_size,
            },
            request_id,
            session: authed.handle.clone(),
            received: std::time::Instant::now(),
        })
        .await?;
    Ok(Reply::Deferred)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long texts end the reads once a reply is full; short ones are read
    /// up to the limit, in order, in either direction.
    #[tokio::test]
    async fn history_is_read_in_steps_until_a_reply_is_full() {
        use crate::store::conformance::{friends_with_direct, text};
        use crate::store::sqlite::SqliteStore;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let (a, _, long) = friends_with_direct(&store, "alice", "bob").await;
        let (c, _, short) = friends_with_direct(&store, "carol", "dave").await;
        let texts = "x".repeat(16 * 1024);
        let batch = |conversation, sender, body: &str| {
            (0..200)
                .map(|i| text(conversation, sender, &format!("k{i}"), body, 100))
                .collect::<Vec<_>>()
        };
        for result in store.append(batch(long, a, &texts)).await.unwrap() {
            result.unwrap();
        }
        for result in store.append(batch(short, c, "hi")).await.unwrap() {
            result.unwrap();
        }
        let budget = 64 * 1024;
        let seqs = |page: &Page| page.messages.iter().map(|m| m.seq).collect::<Vec<_>>();

        let page = read_history(&store, long, Direction::Backward, 0, 200, budget)
            .await
            .unwrap();
        assert_eq!(seqs(&page), (151..=200).collect::<Vec<_>>(), "one read");
        assert!(page.has_more);
        let page = read_history(&store, long, Direction::Forward, 0, 200, budget)
            .await
            .unwrap();
        assert_eq!(seqs(&page), (1..=50).collect::<Vec<_>>(), "one read");

        let page = read_history(&store, short, Direction::Backward, 0, 200, budget)
            .await
            .unwrap();
        assert_eq!(seqs(&page), (1..=200).collect::<Vec<_>>());
        assert!(!page.has_more);
        let page = read_history(&store, short, Direction::Backward, 181, 120, budget)
            .await
            .unwrap();
        assert_eq!(seqs(&page), (61..=180).collect::<Vec<_>>());
        assert!(page.has_more);
        let page = read_history(&store, short, Direction::Forward, 20, 170, budget)
            .await
            .unwrap();
        assert_eq!(seqs(&page), (21..=190).collect::<Vec<_>>());
        assert!(page.has_more);
        let page = read_history(&store, short, Direction::Forward, 20, 200, budget)
            .await
            .unwrap();
        assert_eq!(seqs(&page), (21..=200).collect::<Vec<_>>());
        assert!(!page.has_more);
    }

    #[test]
    fn history_reads_stay_within_the_membership_looked_up() {
        let member = Membership {
            last_seq: 10,
            joined_seq: 4,
        };
        let backward = |cursor| readable_cursor(Direction::Backward, cursor, &member);
        assert_eq!(backward(0), 11, "the newest: from the last seq then");
        assert_eq!(backward(50), 11, "a cursor past it");
        assert_eq!(backward(7), 7);
        let forward = |cursor| readable_cursor(Direction::Forward, cursor, &member);
        assert_eq!(forward(0), 3, "from the first readable seq");
        assert_eq!(forward(8), 8);

        let message = |seq| {
            Arc::new(proto::Message {
                seq,
                ..Default::default()
            })
        };
        let mut page = Page {
            messages: (9..=12).map(message).collect(),
            has_more: false,
        };
        bound_page(&mut page, 10);
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [9, 10]);
        assert!(page.has_more, "the rest on the next page");
        let mut page = Page {
            messages: (9..=10).map(message).collect(),
            has_more: false,
        };
        bound_page(&mut page, 10);
        assert!(!page.has_more);
    }

    #[test]
    fn pages_stop_at_the_byte_budget_but_always_hold_one_item() {
        // Each item of 1,000 bytes costs 1,003 with its tag and length.
        let items = [1000; 10];
        assert_eq!(fitting(items.into_iter(), REPLY_ENVELOPE + 3 * 1003), 3);
        assert_eq!(fitting(items.into_iter(), REPLY_ENVELOPE + 3 * 1003 - 1), 2);
        assert_eq!(fitting(items.into_iter(), 1 << 20), 10);
        assert_eq!(fitting([5000].into_iter(), 100), 1, "one always fits");
        assert_eq!(fitting(std::iter::empty(), 100), 0);
    }
}
