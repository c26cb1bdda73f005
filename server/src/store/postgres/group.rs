//! Statements of group changes, run inside the caller's transaction.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chat_protocol::proto;
use deadpool_postgres::Transaction;

use super::{ConversationId, StoreError, UserId, col, id_col, pg, sql};
use crate::store::Appended;

/// Member roles in the `members.role` column.
pub(super) const ROLE_MEMBER: i32 = 0;
pub(super) const ROLE_ADMIN: i32 = 1;

pub(super) async fn username(
    tx: &Transaction<'_>,
    user: UserId,
) -> Result<Option<String>, StoreError> {
    tx.query_opt("SELECT username FROM users WHERE id = $1", &[&sql(user)])
        .await
        .map_err(pg)?
        .map(|r| col(&r, 0))
        .transpose()
}

/// The names of `users`, in their order; `NotFound` if one has no account.
/// One round trip, however many (a group's founders or additions).
pub(super) async fn usernames(
    tx: &Transaction<'_>,
    users: &[UserId],
) -> Result<Vec<String>, StoreError> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = users.iter().map(|&u| sql(u)).collect();
    let rows = tx
        .query("SELECT id, username FROM users WHERE id = ANY($1)", &[&ids])
        .await
        .map_err(pg)?;
    let mut names = HashMap::with_capacity(rows.len());
    for row in &rows {
        names.insert(id_col(row, 0)?, col::<String>(row, 1)?);
    }
    users
        .iter()
        .map(|user| names.get(user).cloned().ok_or(StoreError::NotFound))
        .collect()
}

/// Which of `users` are members of the conversation now (one round trip).
pub(super) async fn members_among(
    tx: &Transaction<'_>,
    conversation_id: ConversationId,
    users: &[UserId],
) -> Result<HashSet<UserId>, StoreError> {
    let ids: Vec<i64> = users.iter().map(|&u| sql(u)).collect();
    let rows = tx
        .query(
            "SELECT user_id FROM members WHERE conversation_id = $1 AND user_id = ANY($2)",
            &[&sql(conversation_id), &ids],
        )
        .await
        .map_err(pg)?;
    rows.iter().map(|row| id_col(row, 0)).collect()
}

/// `NotFriends` naming the first of `users` (in their order) who is not a
/// friend of `user`. The friendships found stay locked (KEY SHARE) until
/// the transaction ends: ending one (a removal, a block) deletes its rows,
/// so it waits for a change that relied on it, and a change that comes
/// after it finds it gone. The two are ordered.
pub(super) async fn check_friends(
    tx: &Transaction<'_>,
    user: UserId,
    users: &[UserId],
) -> Result<(), StoreError> {
    let ids: Vec<i64> = users.iter().map(|&u| sql(u)).collect();
    let rows = tx
        .query(
            "SELECT friend_id FROM friends WHERE user_id = $1 AND friend_id = ANY($2)
             ORDER BY friend_id FOR KEY SHARE",
            &[&sql(user), &ids],
        )
        .await
        .map_err(pg)?;
    let friends = rows
        .iter()
        .map(|row| id_col(row, 0))
        .collect::<Result<HashSet<UserId>, _>>()?;
    match users.iter().find(|u| !friends.contains(u)) {
        Some(&stranger) => Err(StoreError::NotFriends(stranger)),
        None => Ok(()),
    }
}

/// The member a leave of `actor` promotes, so that a group keeps an admin
/// while it has members: if no other member is an admin, the earliest to
/// join (then the lowest id) of the others. Read under the conversation's
/// lock, which every change of roles and members holds, so it is still
/// the one when the leave writes.
pub(super) async fn promoted_on_leave(
    tx: &Transaction<'_>,
    conversation_id: ConversationId,
    actor: UserId,
) -> Result<Option<UserId>, StoreError> {
    tx.query_opt(
        "SELECT user_id FROM members
         WHERE conversation_id = $1 AND user_id <> $2
           AND NOT EXISTS (SELECT 1 FROM members
                           WHERE conversation_id = $1 AND user_id <> $2 AND role = $3)
         ORDER BY joined_seq, user_id LIMIT 1",
        &[&sql(conversation_id), &sql(actor), &ROLE_ADMIN],
    )
    .await
    .map_err(pg)?
    .map(|r| id_col(&r, 0))
    .transpose()
}

pub(super) async fn role(
    tx: &Transaction<'_>,
    conversation_id: ConversationId,
    user: UserId,
) -> Result<Option<i32>, StoreError> {
    tx.query_opt(
        "SELECT role FROM members WHERE conversation_id = $1 AND user_id = $2",
        &[&sql(conversation_id), &sql(user)],
    )
    .await
    .map_err(pg)?
    .map(|r| col(&r, 0))
    .transpose()
}

/// Adds members who read from `joined_seq` on (0: everything): their
/// watermarks start just below it. One statement however many; none for
/// none. A group that existed before must also [`forget_departures`].
pub(super) async fn add_members(
    tx: &Transaction<'_>,
    conversation_id: ConversationId,
    users: &[UserId],
    role: i32,
    joined_seq: u64,
) -> Result<(), StoreError> {
    if users.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = users.iter().map(|&u| sql(u)).collect();
    let below = sql(joined_seq.saturating_sub(1));
    tx.execute(
        "INSERT INTO members (conversation_id, user_id, role, joined_seq, delivered_seq, seen_seq)
         SELECT $1, u, $3, $4, $5, $5 FROM unnest($2::bigint[]) AS u",
        &[&sql(conversation_id), &ids, &role, &sql(joined_seq), &below],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Members added back to a group they left or were removed from: what
/// they missed while away is not theirs to catch up on.
pub(super) async fn forget_departures(
    tx: &Transaction<'_>,
    conversation_id: ConversationId,
    users: &[UserId],
) -> Result<(), StoreError> {
    let ids: Vec<i64> = users.iter().map(|&u| sql(u)).collect();
    tx.execute(
        "DELETE FROM departures WHERE conversation_id = $1 AND user_id = ANY($2)",
        &[&sql(conversation_id), &ids],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// A member's row as [`remove_member`] deleted it.
pub(super) struct Removed {
    /// Their delivered watermark.
    pub(super) delivered: u64,
    /// The first seq they could read.
    pub(super) joined: u64,
}

/// Deletes a member's row; `None` if they were no member.
pub(super) async fn remove_member(
    tx: &Transaction<'_>,
    conversation_id: ConversationId,
    user: UserId,
) -> Result<Option<Removed>, StoreError> {
    let row = tx
        .query_opt(
            "WITH unmuted AS (DELETE FROM mutes WHERE user_id = $2 AND conversation_id = $1)
             DELETE FROM members WHERE conversation_id = $1 AND user_id = $2
             RETURNING delivered_seq, joined_seq",
            &[&sql(conversation_id), &sql(user)],
        )
        .await
        .map_err(pg)?;
    row.map(|r| {
        Ok(Removed {
            delivered: id_col(&r, 0)?,
            joined: id_col(&r, 1)?,
        })
    })
    .transpose()
}

/// Records the range of seqs a membership that message `left` (sent at
/// `left_ms`) ended could read, which keeps the photos of those messages
/// fetchable by it, and the group's name then, which its list entry shows,
/// at the conversation's activity then (never earlier than what its
/// member entry showed, whatever the clock did; the message that ended it
/// raised it in this transaction).
pub(super) async fn note_former_member(
    tx: &Transaction<'_>,
    conversation_id: ConversationId,
    user: UserId,
    joined: u64,
    (left, left_ms): (u64, i64),
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO former_members (user_id, conversation_id, joined_seq, left_seq, left_ms, name)
         SELECT $1::bigint, $2::bigint, $3::bigint, $4::bigint,
                GREATEST($5::bigint, last_activity_ms), name
         FROM conversations WHERE id = $2
         ON CONFLICT (user_id, conversation_id, joined_seq) DO UPDATE
             SET left_seq = EXCLUDED.left_seq, left_ms = EXCLUDED.left_ms, name = EXCLUDED.name
             WHERE EXCLUDED.left_seq > former_members.left_seq",
        &[
            &sql(user),
            &sql(conversation_id),
            &sql(joined),
            &sql(left),
            &left_ms,
        ],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Remembers that `user` was removed by message `seq` while their delivered
/// watermark stood at `delivered`, until their device acknowledges it.
pub(super) async fn note_departure(
    tx: &Transaction<'_>,
    conversation_id: ConversationId,
    user: UserId,
    delivered: u64,
    seq: u64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO departures (user_id, conversation_id, delivered_seq, seq)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (user_id, conversation_id)
         DO UPDATE SET delivered_seq = EXCLUDED.delivered_seq, seq = EXCLUDED.seq",
        &[
            &sql(user),
            &sql(conversation_id),
            &sql(delivered),
            &sql(seq),
        ],
    )
    .await
    .map_err(pg)?;
    Ok(())
}

/// Stores a SYSTEM message by `actor` (under the actor's key for the
/// change it records, if any) with the next seq (the conversation row is
/// locked by the caller or created in this transaction) and returns it
/// with the current members, and the transaction's id (for settling a
/// COMMIT that goes unanswered).
pub(super) async fn append_system(
    tx: &Transaction<'_>,
    conversation_id: ConversationId,
    actor: UserId,
    key: Option<String>,
    text: String,
    now_ms: i64,
) -> Result<(Appended, i64), StoreError> {
    let row = tx
        .query_one(
            "UPDATE conversations
             SET last_seq = last_seq + 1, last_activity_ms = GREATEST(last_activity_ms, $2)
             WHERE id = $1 RETURNING last_seq, txid_current()",
            &[&sql(conversation_id), &now_ms],
        )
        .await
        .map_err(pg)?;
    let seq = id_col(&row, 0)?;
    let xid: i64 = col(&row, 1)?;
    let client_msg_id = key.unwrap_or_else(crate::store::random_system_key);
    let kind = proto::MessageType::System as i32;
    let row = tx
        .query_one(
            "INSERT INTO messages (conversation_id, seq, sender_id, client_msg_id, type, sent_at_ms, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING message_id",
            &[&sql(conversation_id), &sql(seq), &sql(actor), &client_msg_id, &kind, &now_ms, &text],
        )
        .await
        .map_err(|e| {
            // The change's key was taken meanwhile by a message of the
            // actor's elsewhere, which the check under the conversation's
            // lock could not see yet: refused, as a key seen there is.
            let key_taken = e.as_db_error().is_some_and(|db| {
                db.code() == &tokio_postgres::error::SqlState::UNIQUE_VIOLATION
                    && db.constraint() == Some("messages_idempotency")
            });
            match key_taken {
                true => StoreError::Invalid("client_key was already used for another request".into()),
                false => pg(e),
            }
        })?;
    let message_id = id_col(&row, 0)?;
    tx.execute(
        "UPDATE members SET
           delivered_seq = CASE WHEN delivered_seq = $3::bigint - 1 THEN $3::bigint ELSE delivered_seq END,
           seen_seq = CASE WHEN seen_seq = $3::bigint - 1 THEN $3::bigint ELSE seen_seq END
         WHERE conversation_id = $1 AND user_id = $2",
        &[&sql(conversation_id), &sql(actor), &sql(seq)],
    )
    .await
    .map_err(pg)?;
    let rows = tx
        .query(
            "SELECT user_id FROM members WHERE conversation_id = $1 ORDER BY user_id",
            &[&sql(conversation_id)],
        )
        .await
        .map_err(pg)?;
    let members = rows
        .iter()
        .map(|r| id_col(r, 0))
        .collect::<Result<Vec<_>, _>>()?;
    let appended = Appended {
        message: Arc::new(proto::Message {
            conversation_id,
            seq,
            message_id,
            sender_id: actor,
            client_msg_id,
            r#type: kind,
            sent_at_ms: now_ms,
            text,
            photo: None,
            call: None,
            reply_to_seq: 0,
            unsent: false,
        }),
        duplicate: false,
        members,
    };
    Ok((appended, xid))
}
