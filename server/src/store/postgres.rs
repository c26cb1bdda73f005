//! The production history store: Postgres, through a pool of connections.
//!
//! DESIGN.md puts history in Postgres once a deployment outgrows one SQLite
//! file. This backend keeps the embedded store's behaviour exactly (both
//! pass one conformance suite) while spending as few round trips as it can:
//! DESIGN.md measured one commit per message topping out near 14k rows/s on
//! 2 cores and a hundred rows per commit at several times that, so group
//! commit is the design (`examples/history_bench.rs` measures it here).
//!
//! * `append` is one transaction with a fixed number of round trips whatever
//!   the batch size: a pipelined read (the conversations locked in id
//!   order, then, as of the locks, stored keys and members), one pipelined
//!   write (seq bump, multi-row insert from `unnest` arrays, the senders'
//!   own watermarks), then COMMIT. The call returns after COMMIT, so
//!   "sent" means durable.
//! * `advance_watermarks` is one transaction too: coalesced updates in one
//!   statement.
//! * Rows are locked in key order (conversations by id, members by
//!   (conversation, user)) so concurrent group commits and watermark
//!   updates cannot deadlock.
//! * Errors: lost connections, timeouts and pool exhaustion are
//!   `Unavailable` (retryable); nothing here panics on what the database
//!   says. The pool replaces broken connections by itself.
//! * The schema lives in `server/migrations/postgres/` and is applied by
//!   refinery at connect, under an advisory lock so that several nodes can
//!   start at once. [`PostgresStore::connect_with_schema`] puts everything
//!   in one schema (tests and benchmarks use a fresh one each).

use std::collections::{BTreeMap, HashMap, HashSet, btree_map};
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chat_protocol::proto;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::config::Host;
use tokio_postgres::error::{Severity, SqlState};
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{Config, NoTls, Row};

use super::{
    Appended, BlockOutcome, ConversationId, ConversationView, Direction, FriendCounts, FriendLists,
    FriendRequestOutcome, GroupChange, GroupCreated, GroupEdit, HistoryStore, MediaRecord,
    MemberState, Membership, NewGroup, NewMessage, NewSession, PHOTO_SENT_ELSEWHERE, Page,
    PendingRange, PushDevice, Referable, Reference, SessionRecord, StoreError, StoredPresence,
    UserId, UserRecord, WatermarkKind, WatermarkMoved, WatermarkUpdate, direct_key,
};

/// How long connecting (TCP, startup, authentication) may take before the
/// server is called unreachable, at start and for each new pooled
/// connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long connecting and bringing the schema up to date may take at
/// start. Migrations of a large database, or waiting for another node's,
/// take longer than a connection.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a call waits for a free pooled connection before giving up
/// with `Unavailable`. Long enough to ride out a burst, short enough that a
/// stuck database shows up as errors rather than a silent pile-up.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Server-side limit on one statement (`statement_timeout`), so that a
/// hung query cannot hold locks forever. Migrations lift it.
const STATEMENT_TIMEOUT_MS: u32 = 30_000;
/// Server-side limit on a transaction left idle
/// (`idle_in_transaction_session_timeout`), for the same reason.
const IDLE_IN_TRANSACTION_TIMEOUT_MS: u32 = 60_000;

/// After this long without traffic the kernel probes the connection, every
/// [`KEEPALIVE_INTERVAL`], and gives up after [`KEEPALIVE_RETRIES`]
/// unanswered probes: a call waiting for an answer on a silently dead
/// network path (a failover that moved the address, a partition, a frozen
/// host) fails within ~25 s and settles, where the kernel's defaults
/// (2 h idle, or 9 probes 75 s apart after the 30 s this used to set)
/// kept it, and with it every send behind the committer, for 12 minutes
/// and more.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;
/// Data written and not acknowledged by the peer's kernel for this long
/// fails the connection (`TCP_USER_TIMEOUT`): a statement sent into a dead
/// path; Linux's own retransmissions last ~15 minutes.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(15);

/// How often `append` starts over when a concurrent call stored one of the
/// batch's idempotency keys between our read and our insert, or Postgres
/// broke a deadlock over such keys by failing it. The second attempt sees
/// the committed row, so one retry is enough in practice.
const APPEND_ATTEMPTS: usize = 3;

/// How long a transaction whose COMMIT went unanswered (a lost connection)
/// is inquired after, by default, before its outcome is reported unknown
/// ([`StoreError::Unsettled`]); [`PostgresStore::with_settle_timeout`]
/// changes it. The committer waits meanwhile, which keeps the
/// conversation's order; while Postgres cannot be reached, later sends
/// would fail anyway.
pub const COMMIT_SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Length of the text kept in conversation-list previews, in characters
/// (Postgres `left` counts characters, as the SQLite store does).
const PREVIEW_CHARS: i32 = 100;

/// The default `application_name`; schema stores append their schema.
const APPLICATION_NAME: &str = "chat-server";

mod embedded {
    //! The SQL files under `server/migrations/postgres/`, compiled in.
    #![allow(unreachable_pub, unused_qualifications, clippy::all)]
    refinery::embed_migrations!("migrations/postgres");
}

/// The Postgres-backed [`HistoryStore`].
pub struct PostgresStore {
    pool: Pool,
    /// `host:port/database`, for messages (never the password).
    target: String,
    /// The schema everything lives in, when one was asked for.
    schema: Option<String>,
    /// What `pg_stat_activity.application_name` shows for our connections.
    application_name: String,
    /// See [`COMMIT_SETTLE_TIMEOUT`].
    settle_timeout: Duration,
}

/// A transaction whose `BEGIN` is sent with its first statements instead
/// of taking a round trip of its own (tokio-postgres pipelines requests
/// polled together, and Postgres runs them in order). Unlike
/// tokio-postgres's `Transaction`, nothing rolls it back when it is
/// dropped unfinished (an error, a cancelled call), so then the
/// connection is taken out of the pool and closed, and Postgres rolls the
/// transaction back: a pooled connection must never be handed out inside
/// one.
struct PipelinedTx {
    client: Option<deadpool_postgres::Object>,
}

impl PipelinedTx {
    fn new(client: deadpool_postgres::Object) -> Self {
        PipelinedTx {
            client: Some(client),
        }
    }

    fn client(&self) -> &tokio_postgres::Client {
        self.client
            .as_ref()
            .expect("an open transaction has its client")
    }

    /// Starts the transaction; poll it first among the first statements.
    async fn begin(&self) -> Result<(), tokio_postgres::Error> {
        self.client().batch_execute("BEGIN").await
    }

    async fn query(
        &self,
        statement: &tokio_postgres::Statement,
        params: &[Param<'_>],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        self.client().query(statement, params).await
    }

    async fn execute(
        &self,
        statement: &tokio_postgres::Statement,
        params: &[Param<'_>],
    ) -> Result<u64, tokio_postgres::Error> {
        self.client().execute(statement, params).await
    }

    async fn commit(self) -> Result<(), tokio_postgres::Error> {
        self.finish("COMMIT").await
    }

    async fn rollback(self) -> Result<(), tokio_postgres::Error> {
        self.finish("ROLLBACK").await
    }

    async fn finish(mut self, statement: &str) -> Result<(), tokio_postgres::Error> {
        self.client().batch_execute(statement).await?;
        // Finished: the connection goes back to the pool.
        self.client = None;
        Ok(())
    }
}

impl Drop for PipelinedTx {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

impl PostgresStore {
    /// Connects to `url` (a `postgres://` URL or a libpq key=value string),
    /// applies pending migrations, and keeps up to `pool_size` connections.
    ///
    /// Connecting is bounded by [`CONNECT_TIMEOUT`]: an unreachable server
    /// gives `Unavailable` naming its host, never a hang.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        Self::open(url, None, pool_size).await
    }

    /// Like [`connect`](Self::connect), but everything lives in `schema`
    /// (created if missing; lower-case letters, digits and `_` only): every
    /// pooled connection gets `search_path=<schema>`, and the migration
    /// history table is kept in that schema too. Connections are named
    /// `chat-server <schema>` in `pg_stat_activity`.
    pub async fn connect_with_schema(
        url: &str,
        schema: &str,
        pool_size: usize,
    ) -> Result<Self, StoreError> {
        if !valid_schema_name(schema) {
            return Err(StoreError::Internal(format!(
                "invalid postgres schema name {schema:?}: use 1 to 63 of [a-z0-9_], not starting with a digit"
            )));
        }
        Self::open(url, Some(schema), pool_size).await
    }

    /// `host:port/database` of the server, for logs.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The schema given to [`connect_with_schema`](Self::connect_with_schema).
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The `application_name` of this store's connections.
    pub fn application_name(&self) -> &str {
        &self.application_name
    }

    /// How long the outcome of an unanswered COMMIT is inquired after
    /// before it is reported unknown (default [`COMMIT_SETTLE_TIMEOUT`]):
    /// it should outlast a failover of the database, after which the
    /// answer can be had again.
    #[must_use]
    pub fn with_settle_timeout(mut self, timeout: Duration) -> Self {
        self.settle_timeout = timeout;
        self
    }

    /// Closes the pool: idle connections are dropped now, busy ones when
    /// their call ends, and later calls fail with `Unavailable`.
    pub fn close(&self) {
        self.pool.close();
    }

    async fn open(url: &str, schema: Option<&str>, pool_size: usize) -> Result<Self, StoreError> {
        let mut config = Config::from_str(url).map_err(|e| {
            StoreError::Internal(format!("invalid postgres URL: {}", error_chain(&e)))
        })?;
        let target = describe_target(&config);
        let application_name = match (config.get_application_name(), schema) {
            (Some(name), _) => name.to_owned(),
            (None, Some(schema)) => format!("{APPLICATION_NAME} {schema}"),
            (None, None) => APPLICATION_NAME.to_owned(),
        };
        // After the URL's own options, so these win over them and over the
        // role's and the database's defaults. `synchronous_commit` on: a
        // COMMIT answers only once its WAL is flushed, which is what lets a
        // SendAck follow it (with it off, a crash would lose acknowledged
        // sends and hand their seqs out again). Read committed: the locks
        // and seqs of `append` are written for it.
        let mut options = config.get_options().unwrap_or_default().to_owned();
        let _ = write!(
            options,
            " -c statement_timeout={STATEMENT_TIMEOUT_MS} \
             -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS} \
             -c synchronous_commit=on \
             -c default_transaction_isolation=read\\ committed"
        );
        if let Some(schema) = schema {
            // The name was checked to need no quoting or escaping.
            let _ = write!(options, " -c search_path={schema}");
        }
        config
            .options(options.trim())
            .application_name(&application_name)
            .connect_timeout(CONNECT_TIMEOUT);
        watch_dead_paths(&mut config);

        match tokio::time::timeout(MIGRATION_TIMEOUT, migrate(&config, schema)).await {
            Ok(Ok(())) => {}
            Ok(Err(MigrateError::Connect(why))) => {
                return Err(StoreError::Unavailable(format!(
                    "postgres at {target} unreachable: {why}"
                )));
            }
            Ok(Err(MigrateError::Failed(why))) => {
                return Err(StoreError::Internal(format!("postgres at {target}: {why}")));
            }
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "postgres at {target}: migrations did not finish within {} s \
                     (is another node holding the migration lock?)",
                    MIGRATION_TIMEOUT.as_secs()
                )));
            }
        }

        // `Fast` recycling only checks `is_closed()`: a connection killed
        // while idle is noticed by its connection task (the server says
        // FATAL and closes the socket) and discarded at the next checkout.
        // `Verified` would add a round trip to every call, a quarter of an
        // append's, to catch only silently dead network paths, which
        // keepalives and the error path already handle: a call that hits
        // one fails with `Unavailable` and the broken connection is
        // discarded.
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Internal(format!("postgres pool: {e}")))?;
        let store = PostgresStore {
            pool,
            target,
            schema: schema.map(str::to_owned),
            application_name,
            settle_timeout: COMMIT_SETTLE_TIMEOUT,
        };
        store.check_session_settings().await?;
        Ok(store)
    }

    /// Checks, on a pooled connection, that the startup options took
    /// effect: a connection pooler may drop the `options` parameter
    /// silently, and then a role or database default of
    /// `synchronous_commit = off` would let a SendAck go before its WAL is
    /// flushed.
    async fn check_session_settings(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT current_schema(), current_setting('synchronous_commit'),
                        current_setting('default_transaction_isolation')",
                &[],
            )
            .await
            .map_err(pg)?;
        let settings = SessionSettings {
            schema: col(&row, 0)?,
            synchronous_commit: col(&row, 1)?,
            isolation: col(&row, 2)?,
        };
        settings
            .check(self.schema.as_deref())
            .map_err(|why| StoreError::Internal(format!("postgres at {}: {why}", self.target)))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Timeout(kind) => StoreError::Unavailable(format!(
                "postgres at {}: no connection ({kind:?} timed out)",
                self.target
            )),
            PoolError::Backend(e) => pg(e),
            PoolError::Closed => StoreError::Unavailable("postgres store closed".into()),
            other => StoreError::Internal(format!("postgres pool: {other}")),
        })
    }

    /// Runs one statement (prepared once per pooled connection) and returns
    /// its rows.
    async fn rows(&self, statement: &str, params: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(statement).await.map_err(pg)?;
        client.query(&stmt, params).await.map_err(pg)
    }

    /// The first row of [`rows`](Self::rows), if any.
    async fn row(&self, statement: &str, params: &[Param<'_>]) -> Result<Option<Row>, StoreError> {
        Ok(self.rows(statement, params).await?.into_iter().next())
    }

    /// The row of a statement that always returns exactly one.
    async fn one(&self, statement: &str, params: &[Param<'_>]) -> Result<Row, StoreError> {
        self.row(statement, params)
            .await?
            .ok_or_else(|| StoreError::Internal("postgres: a query returned no row".into()))
    }

    /// Runs one statement and returns how many rows it changed.
    async fn execute(&self, statement: &str, params: &[Param<'_>]) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(statement).await.map_err(pg)?;
        client.execute(&stmt, params).await.map_err(pg)
    }

    /// The group `creator` created with idempotency key `key`, if any.
    async fn group_by_key(
        &self,
        creator: UserId,
        key: &str,
    ) -> Result<Option<ConversationId>, StoreError> {
        self.row(
            "SELECT id FROM conversations WHERE creator_id = $1 AND create_key = $2",
            &[&sql(creator), &key],
        )
        .await?
        .map(|row| id_col(&row, 0))
        .transpose()
    }

    /// Finds out what a COMMIT whose answer never came did, so that a
    /// durable message is neither reported lost (the client's retry would
    /// then be a duplicate that nobody fans out) nor a lost one reported
    /// durable. `Ok` means transaction `xid` committed; otherwise the
    /// error to return, for a transaction that rolled back or (after the
    /// settle timeout without an answer, [`StoreError::Unsettled`]) whose
    /// outcome is still unknown.
    ///
    /// An ERROR the server sent is its answer: the transaction rolled
    /// back. A lost connection, or a FATAL (a backend ended by an
    /// administrator may commit and then die before it answers), leaves
    /// it open: Postgres may have committed it, may still be about to (the
    /// COMMIT in its socket buffer), or will roll it back. `txid_status`
    /// on another connection says which once the transaction ended; while
    /// it is still in progress its backend is ended, so that the answer
    /// cannot change after it is given.
    async fn settle_commit(&self, xid: i64, e: tokio_postgres::Error) -> Result<(), StoreError> {
        if e.as_db_error()
            .is_some_and(|db| db.parsed_severity() == Some(Severity::Error))
        {
            return Err(pg(e));
        }
        tracing::warn!(
            xid,
            "postgres: lost the answer to a COMMIT ({}); asking how it ended",
            error_chain(&e)
        );
        let deadline = tokio::time::Instant::now() + self.settle_timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            match self.row(TRANSACTION_STATUS, &[&xid]).await {
                Ok(Some(row)) => match col::<Option<String>>(&row, 0)?.as_deref() {
                    Some("committed") => {
                        tracing::info!(xid, "postgres: the unanswered COMMIT had committed");
                        return Ok(());
                    }
                    Some("aborted") => return Err(pg(e)),
                    Some(_in_progress) => {
                        if let Err(end) = self.execute(END_TRANSACTION, &[&xid]).await {
                            tracing::debug!(xid, "postgres: ending the open transaction: {end}");
                        }
                    }
                    None => {
                        return Err(StoreError::Unsettled(format!(
                            "postgres: lost the answer to COMMIT of transaction {xid}, \
                             which is too old to look up; its messages may be stored"
                        )));
                    }
                },
                Ok(None) => {
                    return Err(StoreError::Internal(
                        "postgres: txid_status gave no row".into(),
                    ));
                }
                Err(status) => {
                    tracing::debug!(xid, "postgres: asking how a COMMIT ended: {status}");
                }
            }
            if tokio::time::Instant::now() + pause > deadline {
                tracing::error!(
                    xid,
                    "postgres: the outcome of a COMMIT is unknown; giving up"
                );
                return Err(StoreError::Unsettled(format!(
                    "postgres: lost the answer to COMMIT of transaction {xid} and could not \
                     learn its outcome: {}",
                    error_chain(&e)
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// One attempt at a group commit. `None`: a concurrent call stored one
    /// of the keys first (or Postgres failed this one to break a deadlock
    /// over them); nothing was written and the caller starts over.
    async fn append_once(&self, batch: &[NewMessage]) -> AppendAttempt {
        let client = self.client().await?;
        let existing_stmt = client.prepare_cached(EXISTING_KEYS).await.map_err(pg)?;
        let members_stmt = client.prepare_cached(MEMBERS_OF).await.map_err(pg)?;
        let lock_stmt = client
            .prepare_cached(LOCK_CONVERSATIONS)
            .await
            .map_err(pg)?;
        let lock_members_stmt = client.prepare_cached(LOCK_MEMBERS).await.map_err(pg)?;
        let bump_stmt = client.prepare_cached(BUMP_SEQS).await.map_err(pg)?;
        let insert_stmt = client.prepare_cached(INSERT_MESSAGES).await.map_err(pg)?;
        let own_stmt = client.prepare_cached(OWN_WATERMARKS).await.map_err(pg)?;
        let xid_stmt = client.prepare_cached(TRANSACTION_ID).await.map_err(pg)?;
        // Only batches with a photo have one more statement.
        let photos_stmt = match batch.iter().any(|m| m.photo.is_some()) {
            true => Some(client.prepare_cached(PHOTOS_SENT).await.map_err(pg)?),
            false => None,
        };
        // Only batches with an edit or an unsend read what they name, and
        // only those with an unsend erase.
        let targets_stmt = match batch.iter().any(rewrites_target) {
            true => Some(client.prepare_cached(TARGETS).await.map_err(pg)?),
            false => None,
        };
        let erase_stmts = match batch
            .iter()
            .any(|m| m.message_type == proto::MessageType::Unsend)
        {
            true => Some((
                client.prepare_cached(ERASE_MESSAGES).await.map_err(pg)?,
                client.prepare_cached(ERASE_EDITS).await.map_err(pg)?,
                client.prepare_cached(DETACH_PHOTOS).await.map_err(pg)?,
            )),
            false => None,
        };
        let (target_conversations, target_seqs): (Vec<i64>, Vec<i64>) = batch
            .iter()
            .filter(|m| rewrites_target(m))
            .map(|m| (sql(m.conversation_id), sql(m.reply_to_seq)))
            .unzip();

        let mut seen_keys = HashSet::new();
        let (key_senders, key_ids): (Vec<i64>, Vec<&str>) = batch
            .iter()
            .filter(|m| seen_keys.insert((m.sender_id, m.client_msg_id.as_str())))
            .map(|m| (sql(m.sender_id), m.client_msg_id.as_str()))
            .unzip();
        let mut conversation_ids: Vec<i64> = batch.iter().map(|m| sql(m.conversation_id)).collect();
        conversation_ids.sort_unstable();
        conversation_ids.dedup();

        let tx = PipelinedTx::new(client);
        // Round trip 1, pipelined: BEGIN, the conversations locked (in id
        // order) with their current last seq and whether they are closed
        // (a direct conversation of two users who are no longer friends:
        // the friendship's end sets it under the same lock), then, as of
        // the locks (each statement reads what was committed when it
        // began), what is stored already and who may write where. A retry
        // that waited for the lock behind its original's commit finds it
        // stored, even when a removal or a friendship's end came between.
        let existing_params: [Param<'_>; 2] = [&key_senders, &key_ids];
        let conversation_params: [Param<'_>; 1] = [&conversation_ids];
        let target_params: [Param<'_>; 2] = [&target_conversations, &target_seqs];
        let targets = async {
            match &targets_stmt {
                Some(stmt) => tx.query(stmt, &target_params).await,
                None => Ok(Vec::new()),
            }
        };
        let (_, locked_rows, existing_rows, member_rows, target_rows) = tokio::try_join!(
            biased;
            tx.begin(),
            tx.query(&lock_stmt, &conversation_params),
            tx.query(&existing_stmt, &existing_params),
            tx.query(&members_stmt, &conversation_params),
            targets,
        )
        .map_err(pg)?;
        // What the batch's edits and unsends name, as of the locks: whether
        // each is unsent, and a photo's upload.
        let mut named: HashMap<(ConversationId, u64), Named> =
            HashMap::with_capacity(target_rows.len());
        for row in &target_rows {
            let message_type: i32 = col(row, 4)?;
            let photo = match col::<Option<&[u8]>>(row, 3)? {
                Some(bytes) if message_type == proto::MessageType::Photo as i32 => {
                    <proto::Photo as prost::Message>::decode(bytes)
                        .ok()
                        .map(|photo| photo.media_id)
                }
                _ => None,
            };
            named.insert(
                (id_col(row, 0)?, id_col(row, 1)?),
                Named {
                    unsent: col(row, 2)?,
                    photo,
                    message_type,
                    author: id_col(row, 5)?,
                },
            );
        }

        let mut stored: HashMap<(UserId, String), (Arc<proto::Message>, Vec<UserId>)> =
            HashMap::with_capacity(existing_rows.len());
        for row in &existing_rows {
            let message = message_from_row(row, 0)?;
            let members: Vec<i64> = col(row, 11)?;
            stored.insert(
                (message.sender_id, message.client_msg_id.clone()),
                (Arc::new(message), members.into_iter().map(id).collect()),
            );
        }
        // Sorted by user id within each conversation (the query orders them).
        let mut members: HashMap<ConversationId, Vec<UserId>> = HashMap::new();
        for row in &member_rows {
            members
                .entry(id_col(row, 0)?)
                .or_default()
                .push(id_col(row, 1)?);
        }
        let mut last_seq: HashMap<ConversationId, u64> = HashMap::with_capacity(locked_rows.len());
        let mut closed: HashSet<ConversationId> = HashSet::new();
        for row in &locked_rows {
            let id = id_col(row, 0)?;
            last_seq.insert(id, id_col(row, 1)?);
            if col::<bool>(row, 2)? {
                closed.insert(id);
            }
        }

        // Decide each message's fate in input order, as the embedded store
        // does one message at a time: a stored key is a retry, a key seen
        // earlier in this batch is a duplicate of that message, a
        // non-member is refused (consuming no seq), the rest get the next
        // seqs of their conversation.
        let mut slots = Vec::with_capacity(batch.len());
        let mut accepted: HashMap<(UserId, &str), usize> = HashMap::new();
        let mut next_seq = last_seq.clone();
        // The messages this batch unsends, and their photos' uploads.
        let (mut erased_conversations, mut erased_seqs) = (Vec::new(), Vec::new());
        let (mut detached, mut detached_seqs): (Vec<String>, Vec<i64>) = (Vec::new(), Vec::new());
        for (i, m) in batch.iter().enumerate() {
            let key = (m.sender_id, m.client_msg_id.as_str());
            if let Some((message, members)) = stored.get(&(m.sender_id, m.client_msg_id.clone())) {
                slots.push(Slot::Stored(message.clone(), members.clone()));
            } else if let Some(&first) = accepted.get(&key) {
                slots.push(Slot::SameAs(first));
            } else if let (Some(seq), Some(ms)) = (
                next_seq.get_mut(&m.conversation_id),
                members
                    .get(&m.conversation_id)
                    .filter(|ms| ms.binary_search(&m.sender_id).is_ok()),
            ) {
                let target = (m.conversation_id, m.reply_to_seq);
                if closed.contains(&m.conversation_id) {
                    let other = ms.iter().copied().find(|&u| u != m.sender_id);
                    slots.push(Slot::NotFriends(other.unwrap_or(m.sender_id)));
                } else if rewrites_target(m)
                    && named.get(&target).is_none_or(|t| {
                        t.unsent || !crate::store::may_rewrite(m, t.author, t.message_type)
                    })
                {
                    slots.push(Slot::Gone);
                } else {
                    *seq += 1;
                    slots.push(Slot::New(*seq));
                    accepted.insert(key, i);
                    if m.message_type == proto::MessageType::Unsend
                        && let Some(named) = named.get_mut(&target)
                    {
                        // Later edits and unsends of it in this batch are
                        // refused as the next batch's would be.
                        named.unsent = true;
                        erased_conversations.push(sql(m.conversation_id));
                        erased_seqs.push(sql(m.reply_to_seq));
                        if let Some(photo) = named.photo.take() {
                            detached.push(photo);
                            detached_seqs.push(sql(m.reply_to_seq));
                        }
                    }
                }
            } else {
                slots.push(Slot::NotAMember);
            }
        }

        // A retry in this batch of a message this batch unsends (or of an
        // edit of one) was read before the erase: answered as it will be
        // stored.
        if !erased_seqs.is_empty() {
            let erased: HashSet<(ConversationId, u64)> = erased_conversations
                .iter()
                .zip(&erased_seqs)
                .map(|(&c, &s)| (id(c), id(s)))
                .collect();
            for slot in &mut slots {
                if let Slot::Stored(message, _) = slot
                    && (erased.contains(&(message.conversation_id, message.seq))
                        || (message.r#type == proto::MessageType::Edit as i32
                            && erased.contains(&(message.conversation_id, message.reply_to_seq))))
                {
                    let mut erased = (**message).clone();
                    erased.text.clear();
                    erased.photo = None;
                    erased.unsent = true;
                    *message = Arc::new(erased);
                }
            }
        }
        let writes = Writes::plan(batch, &slots, &last_seq);
        let mut message_ids: HashMap<(ConversationId, u64), u64> = HashMap::new();
        let mut xid = None;
        if writes.new_messages > 0 {
            // Round trip 2, pipelined: lock the senders' member rows in
            // order, move each conversation's last seq, insert every new
            // message, move the watermarks of senders who were caught up,
            // and learn the transaction's id (should COMMIT's answer be
            // lost).
            let lock_params: [Param<'_>; 2] = [&writes.own_conversations, &writes.own_users];
            let bump_params: [Param<'_>; 3] = [
                &writes.bump_ids,
                &writes.bump_last_seqs,
                &writes.bump_activity,
            ];
            let insert_params: [Param<'_>; 9] = [
                &writes.conversation_ids,
                &writes.seqs,
                &writes.sender_ids,
                &writes.client_msg_ids,
                &writes.types,
                &writes.sent_at_ms,
                &writes.bodies,
                &writes.attachments,
                &writes.reply_tos,
            ];
            let own_params: [Param<'_>; 4] = [
                &writes.own_conversations,
                &writes.own_users,
                &writes.own_caught_up_at,
                &writes.own_moved_to,
            ];
            let photos_params: [Param<'_>; 2] = [&writes.photo_ids, &writes.photo_seqs];
            let photos_sent = async {
                match &photos_stmt {
                    Some(stmt) if !writes.photo_ids.is_empty() => {
                        tx.execute(stmt, &photos_params).await
                    }
                    _ => Ok(0),
                }
            };
            // After the insert, so an edit earlier in the batch is erased
            // too.
            let erased_params: [Param<'_>; 2] = [&erased_conversations, &erased_seqs];
            let detach_params: [Param<'_>; 2] = [&detached, &detached_seqs];
            let erase = async {
                match &erase_stmts {
                    Some((messages, edits, photos)) if !erased_seqs.is_empty() => {
                        tokio::try_join!(
                            biased;
                            tx.execute(messages, &erased_params),
                            tx.execute(edits, &erased_params),
                            tx.execute(photos, &detach_params),
                        )?;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            };
            let written = tokio::try_join!(
                biased;
                tx.query(&lock_members_stmt, &lock_params),
                tx.execute(&bump_stmt, &bump_params),
                tx.query(&insert_stmt, &insert_params),
                photos_sent,
                erase,
                tx.execute(&own_stmt, &own_params),
                tx.query(&xid_stmt, &[]),
            );
            let (_, _, inserted, _, _, _, xid_rows) = match written {
                Ok(written) => written,
                // Rows are inserted in batch order, and a sender's keys
                // are unique across conversations: two batches of
                // committers that share no conversation can each hold a
                // key the other inserts next (a client reusing keys across
                // conversations). Postgres breaks the cycle by failing one;
                // that one starts over, rather than failing every sender in
                // it, and then finds the other's keys stored.
                Err(e) if is_deadlock(&e) => {
                    tracing::debug!(
                        "postgres: a group commit was a deadlock's victim; starting over"
                    );
                    tx.rollback().await.map_err(pg)?;
                    return Ok(None);
                }
                Err(e) => return Err(pg(e)),
            };
            if inserted.len() != writes.new_messages {
                // ON CONFLICT skipped a row: another transaction committed
                // one of our keys after our read (in a conversation of its
                // own: ours were locked). Undo everything (the seqs too)
                // and start over; the next read sees that row.
                tx.rollback().await.map_err(pg)?;
                return Ok(None);
            }
            for row in &inserted {
                message_ids.insert((id_col(row, 0)?, id_col(row, 1)?), id_col(row, 2)?);
            }

            xid = xid_rows.first().map(|row| col::<i64>(row, 0)).transpose()?;
        }
        if let Err(e) = tx.commit().await {
            match xid {
                Some(xid) => self.settle_commit(xid, e).await?,
                // Nothing was written: what was read stands.
                None => tracing::debug!("postgres: a read-only append's COMMIT failed: {e}"),
            }
        }

        let mut results: Vec<Result<Appended, StoreError>> = Vec::with_capacity(batch.len());
        for (m, slot) in batch.iter().zip(slots) {
            let result = match slot {
                Slot::Stored(message, members) => crate::store::check_retry(
                    Appended {
                        message,
                        duplicate: true,
                        members,
                    },
                    m,
                ),
                Slot::SameAs(first) => match results.get(first) {
                    // Nobody has acknowledged a message of this batch yet.
                    Some(Ok(original)) => crate::store::check_retry(
                        Appended {
                            message: original.message.clone(),
                            duplicate: true,
                            members: original
                                .members
                                .iter()
                                .copied()
                                .filter(|&member| member != m.sender_id)
                                .collect(),
                        },
                        m,
                    ),
                    _ => Err(StoreError::Internal(
                        "duplicate points at a message that was not stored".into(),
                    )),
                },
                Slot::NotAMember => Err(StoreError::NotAMember),
                Slot::NotFriends(other) => Err(StoreError::NotFriends(other)),
                Slot::Gone => Err(StoreError::NotFound),
                Slot::New(seq) => match message_ids.get(&(m.conversation_id, seq)) {
                    None => Err(StoreError::Internal(
                        "the insert returned no id for a message".into(),
                    )),
                    Some(&message_id) => Ok(Appended {
                        message: Arc::new(proto::Message {
                            conversation_id: m.conversation_id,
                            seq,
                            message_id,
                            sender_id: m.sender_id,
                            client_msg_id: m.client_msg_id.clone(),
                            r#type: m.message_type as i32,
                            sent_at_ms: m.now_ms,
                            text: m.text.clone(),
                            photo: m.photo.clone(),
                            call: m.call.clone(),
                            reply_to_seq: m.reply_to_seq,
                            unsent: false,
                        }),
                        duplicate: false,
                        members: members.get(&m.conversation_id).cloned().unwrap_or_default(),
                    }),
                },
            };
            results.push(result);
        }
        Ok(Some(results))
    }

    /// The views of conversations `viewer` is a member of, by id (of the
    /// ids, those they are a member of): two pipelined queries, whatever
    /// the count.
    async fn views(
        &self,
        ids: Vec<i64>,
        viewer: UserId,
    ) -> Result<HashMap<ConversationId, ConversationView>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let client = self.client().await?;
        let view_stmt = client.prepare_cached(VIEWS).await.map_err(pg)?;
        let members_stmt = client.prepare_cached(MEMBER_STATES).await.map_err(pg)?;
        let viewer = sql(viewer);
        let unread_cap = sql(chat_protocol::limits::MAX_UNREAD_COUNT);
        let view_params: [Param<'_>; 4] = [&ids, &viewer, &PREVIEW_CHARS, &unread_cap];
        let member_params: [Param<'_>; 1] = [&ids];
        let (view_rows, member_rows) = tokio::try_join!(
            biased;
            client.query(&view_stmt, &view_params),
            client.query(&members_stmt, &member_params),
        )
        .map_err(pg)?;
        let mut members: HashMap<ConversationId, Vec<MemberState>> = HashMap::new();
        for row in &member_rows {
            members
                .entry(id_col(row, 0)?)
                .or_default()
                .push(MemberState {
                    user_id: id_col(row, 1)?,
                    username: col(row, 2)?,
                    delivered_seq: id_col(row, 3)?,
                    seen_seq: id_col(row, 4)?,
                    admin: col::<i32>(row, 5)? == group::ROLE_ADMIN,
                    joined_seq: id_col(row, 6)?,
                });
        }
        let mut views: HashMap<ConversationId, ConversationView> = HashMap::new();
        for row in &view_rows {
            let id = id_col(row, 0)?;
            let last_message = joined_message(row, 6)?;
            let kind: i32 = col(row, 1)?;
            views.insert(
                id,
                ConversationView {
                    id,
                    kind: proto::ConversationKind::try_from(kind).unwrap_or_default(),
                    name: col(row, 2)?,
                    members: members.remove(&id).unwrap_or_default(),
                    last_seq: id_col(row, 3)?,
                    last_activity_ms: col(row, 4)?,
                    last_message,
                    unread_count: id_col(row, 5)?,
                    closed: col(row, 17)?,
                    muted_until_ms: col::<Option<i64>>(row, 18)?.unwrap_or_default(),
                    former: false,
                },
            );
        }
        Ok(views)
    }

    /// The list entries of groups `viewer` left or was removed from, by id
    /// (of the ids, those they are not a member of again), as of their last
    /// stay's end ([`ConversationView::former`]).
    async fn former_views(
        &self,
        ids: Vec<i64>,
        viewer: UserId,
    ) -> Result<HashMap<ConversationId, ConversationView>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = self
            .rows(FORMER_VIEWS, &[&ids, &sql(viewer), &PREVIEW_CHARS])
            .await?;
        let mut views = HashMap::with_capacity(rows.len());
        for row in &rows {
            let id = id_col(row, 0)?;
            let last_message = joined_message(row, 5)?;
            let kind: i32 = col(row, 1)?;
            views.insert(
                id,
                ConversationView {
                    id,
                    kind: proto::ConversationKind::try_from(kind).unwrap_or_default(),
                    name: col(row, 2)?,
                    members: Vec::new(),
                    last_seq: id_col(row, 3)?,
                    last_activity_ms: col(row, 4)?,
                    last_message,
                    unread_count: 0,
                    closed: false,
                    muted_until_ms: 0,
                    former: true,
                },
            );
        }
        Ok(views)
    }
}

/// A statement parameter.
type Param<'a> = &'a (dyn ToSql + Sync);

/// What one `append` attempt produced: `None` asks for another attempt.
type AppendAttempt = Result<Option<Vec<Result<Appended, StoreError>>>, StoreError>;

/// The fate of one message of a batch.
enum Slot {
    /// Its key was stored by an earlier call: a retry.
    Stored(Arc<proto::Message>, Vec<UserId>),
    /// Its key was accepted earlier in this batch, at this index.
    SameAs(usize),
    /// The sender is not a member (or the conversation does not exist).
    NotAMember,
    /// The conversation is direct and its members, the sender and this
    /// user, are no longer friends.
    NotFriends(UserId),
    /// A new message with this seq.
    New(u64),
    /// An EDIT or UNSEND of a message unsent (by an UNSEND that came
    /// between the caller's check and this append, or earlier in it).
    Gone,
}

/// What the append reads of a message an EDIT or UNSEND of the batch
/// names ([`TARGETS`]).
struct Named {
    unsent: bool,
    /// A photo's upload.
    photo: Option<String>,
    message_type: i32,
    author: UserId,
}

/// Whether `m` rewrites the message it names (an EDIT replaces its text
/// for the apps, an UNSEND erases it): the append checks that message is
/// not unsent.
fn rewrites_target(m: &NewMessage) -> bool {
    matches!(
        m.message_type,
        proto::MessageType::Edit | proto::MessageType::Unsend
    )
}

/// The arrays of a group commit's write round trip, one element per row.
#[derive(Default)]
struct Writes<'a> {
    new_messages: usize,
    // The messages to insert.
    conversation_ids: Vec<i64>,
    seqs: Vec<i64>,
    sender_ids: Vec<i64>,
    client_msg_ids: Vec<&'a str>,
    types: Vec<i32>,
    sent_at_ms: Vec<i64>,
    bodies: Vec<&'a str>,
    attachments: Vec<Option<Vec<u8>>>,
    reply_tos: Vec<Option<i64>>,
    /// The uploads of the new photo messages, and their seqs.
    photo_ids: Vec<&'a str>,
    photo_seqs: Vec<i64>,
    // Per conversation: the new last seq and activity time.
    bump_ids: Vec<i64>,
    bump_last_seqs: Vec<i64>,
    bump_activity: Vec<i64>,
    // Per conversation: the sender whose watermarks may move, from where
    // (the last seq before the batch) to where (the end of their run).
    own_conversations: Vec<i64>,
    own_users: Vec<i64>,
    own_caught_up_at: Vec<i64>,
    own_moved_to: Vec<i64>,
}

impl<'a> Writes<'a> {
    fn plan(batch: &'a [NewMessage], slots: &[Slot], last_seq: &HashMap<u64, u64>) -> Self {
        let mut w = Writes::default();
        // Per conversation, in id order (so the rows are locked and written
        // in a stable order): last new seq and the now of that message.
        let mut bumps: BTreeMap<ConversationId, (u64, i64)> = BTreeMap::new();
        // Per conversation: the author of the first new message and the
        // last seq of their unbroken run from there, while it lasts.
        //
        // A sender who had received everything before their own message
        // has, trivially, received and seen it too; the embedded store
        // moves their watermarks one message at a time when they equal
        // seq - 1. Within a batch only the author of the conversation's
        // first new message can qualify (everyone's watermarks are at most
        // the old last seq), and only through their unbroken run.
        let mut runs: BTreeMap<ConversationId, (UserId, u64, bool)> = BTreeMap::new();
        for (m, slot) in batch.iter().zip(slots) {
            let Slot::New(seq) = *slot else {
                continue;
            };
            w.new_messages += 1;
            w.conversation_ids.push(sql(m.conversation_id));
            w.seqs.push(sql(seq));
            w.sender_ids.push(sql(m.sender_id));
            w.client_msg_ids.push(&m.client_msg_id);
            w.types.push(m.message_type as i32);
            w.sent_at_ms.push(m.now_ms);
            w.bodies.push(&m.text);
            w.attachments.push(crate::store::encode_attachment(m));
            w.reply_tos
                .push((m.reply_to_seq != 0).then(|| sql(m.reply_to_seq)));
            if let Some(photo) = &m.photo {
                w.photo_ids.push(&photo.media_id);
                w.photo_seqs.push(sql(seq));
            }
            bumps.insert(m.conversation_id, (seq, m.now_ms));
            match runs.entry(m.conversation_id) {
                btree_map::Entry::Vacant(v) => {
                    v.insert((m.sender_id, seq, true));
                }
                btree_map::Entry::Occupied(mut o) => {
                    let (sender, end, open) = o.get_mut();
                    if *open && *sender == m.sender_id && *end + 1 == seq {
                        *end = seq;
                    } else {
                        *open = false;
                    }
                }
            }
        }
        for (conversation, (seq, now_ms)) in bumps {
            w.bump_ids.push(sql(conversation));
            w.bump_last_seqs.push(sql(seq));
            w.bump_activity.push(now_ms);
        }
        for (conversation, (sender, end, _)) in runs {
            w.own_conversations.push(sql(conversation));
            w.own_users.push(sql(sender));
            let before = last_seq.get(&conversation).copied().unwrap_or_default();
            w.own_caught_up_at.push(sql(before));
            w.own_moved_to.push(sql(end));
        }
        w
    }
}

#[async_trait]
impl HistoryStore for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn create_user(
        &self,
        username: String,
        password_hash: String,
        now_ms: i64,
    ) -> Result<UserId, StoreError> {
        // In a transaction whose outcome a lost answer settles, as other
        // writes do: reported failed though it had committed, the client's
        // retry found its own new account and was told the name is taken.
        let mut client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO users (username, password_hash, created_at_ms)
                 VALUES ($1, $2, $3) RETURNING id",
            )
            .await
            .map_err(pg)?;
        let xid_stmt = client.prepare_cached(TRANSACTION_ID).await.map_err(pg)?;
        let tx = client.transaction().await.map_err(pg)?;
        let row = match tx
            .query_one(&stmt, &[&username, &password_hash, &now_ms])
            .await
        {
            Ok(row) => row,
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                return Err(StoreError::Conflict);
            }
            Err(e) => return Err(pg(e)),
        };
        let id = id_col(&row, 0)?;
        let xid: i64 = col(&tx.query_one(&xid_stmt, &[]).await.map_err(pg)?, 0)?;
        if let Err(e) = tx.commit().await {
            drop(client);
            self.settle_commit(xid, e).await?;
        }
        Ok(id)
    }

    async fn user_by_name(&self, username: String) -> Result<Option<UserRecord>, StoreError> {
        self.row(
            "SELECT id, username, password_hash FROM users WHERE username = $1",
            &[&username],
        )
        .await?
        .map(|r| {
            Ok(UserRecord {
                id: id_col(&r, 0)?,
                username: col(&r, 1)?,
                password_hash: col(&r, 2)?,
            })
        })
        .transpose()
    }

    async fn username(&self, user_id: UserId) -> Result<Option<String>, StoreError> {
        self.row("SELECT username FROM users WHERE id = $1", &[&sql(user_id)])
            .await?
            .map(|r| col(&r, 0))
            .transpose()
    }

    async fn create_session(&self, s: NewSession) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO sessions (token_hash, user_id, device_name, created_at_ms, expires_at_ms)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &&s.token_hash[..],
                &sql(s.user_id),
                &s.device_name,
                &s.created_at_ms,
                &s.expires_at_ms,
            ],
        )
        .await
        .map(drop)
    }

    async fn create_login_session(
        &self,
        s: NewSession,
        verified: String,
    ) -> Result<(), StoreError> {
        // The user's row held (FOR SHARE) from the check to the commit: a
        // password change waits for this login and then revokes its
        // session, or this login waits for the change and sees it.
        let mut client = self.client().await?;
        let check = client
            .prepare_cached("SELECT password_hash FROM users WHERE id = $1 FOR SHARE")
            .await
            .map_err(pg)?;
        let insert = client
            .prepare_cached(
                "INSERT INTO sessions (token_hash, user_id, device_name, created_at_ms, expires_at_ms)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .await
            .map_err(pg)?;
        let xid_stmt = client.prepare_cached(TRANSACTION_ID).await.map_err(pg)?;
        let tx = client.transaction().await.map_err(pg)?;
        let current: Option<String> =
            match tx.query_opt(&check, &[&sql(s.user_id)]).await.map_err(pg)? {
                Some(row) => Some(col(&row, 0)?),
                None => None,
            };
        if current.as_deref() != Some(verified.as_str()) {
            return Err(StoreError::Conflict);
        }
        tx.execute(
            &insert,
            &[
                &&s.token_hash[..],
                &sql(s.user_id),
                &s.device_name,
                &s.created_at_ms,
                &s.expires_at_ms,
            ],
        )
        .await
        .map_err(pg)?;
        // A lost answer is settled, as for other writes: reported failed
        // though it had committed, the session would be one nobody holds,
        // live and counted among the user's devices until it expired.
        let xid: i64 = col(&tx.query_one(&xid_stmt, &[]).await.map_err(pg)?, 0)?;
        if let Err(e) = tx.commit().await {
            drop(client);
            self.settle_commit(xid, e).await?;
        }
        Ok(())
    }

    async fn revoke_session_by_id(
        &self,
        user: UserId,
        id: Vec<u8>,
        now_ms: i64,
    ) -> Result<Option<[u8; 32]>, StoreError> {
        self.row(
            "UPDATE sessions SET revoked_at_ms = $3
             WHERE user_id = $1 AND substring(token_hash FROM 1 FOR length($2::bytea)) = $2::bytea
               AND revoked_at_ms IS NULL AND expires_at_ms > $3
             RETURNING token_hash",
            &[&sql(user), &id, &now_ms],
        )
        .await?
        .map(|row| {
            let hash: &[u8] = col(&row, 0)?;
            Ok(hash.try_into().unwrap_or([0; 32]))
        })
        .transpose()
    }

    async fn session(&self, token_hash: [u8; 32]) -> Result<Option<SessionRecord>, StoreError> {
        self.row(
            "SELECT user_id, expires_at_ms, revoked_at_ms FROM sessions WHERE token_hash = $1",
            &[&&token_hash[..]],
        )
        .await?
        .map(|r| {
            Ok(SessionRecord {
                user_id: id_col(&r, 0)?,
                expires_at_ms: col(&r, 1)?,
                revoked_at_ms: col(&r, 2)?,
            })
        })
        .transpose()
    }

    async fn revoke_session(&self, token_hash: [u8; 32], now_ms: i64) -> Result<bool, StoreError> {
        let n = self
            .execute(
                "UPDATE sessions SET revoked_at_ms = $2
                 WHERE token_hash = $1 AND revoked_at_ms IS NULL",
                &[&&token_hash[..], &now_ms],
            )
            .await?;
        Ok(n > 0)
    }

    async fn live_sessions(
        &self,
        user: UserId,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<NewSession>, StoreError> {
        let rows = self
            .rows(
                "SELECT token_hash, device_name, created_at_ms, expires_at_ms FROM sessions
                 WHERE user_id = $1 AND revoked_at_ms IS NULL AND expires_at_ms > $2
                 ORDER BY created_at_ms DESC, token_hash LIMIT $3",
                &[&sql(user), &now_ms, &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let hash: &[u8] = col(row, 0)?;
                Ok(NewSession {
                    token_hash: hash.try_into().unwrap_or([0; 32]),
                    user_id: user,
                    device_name: col(row, 1)?,
                    created_at_ms: col(row, 2)?,
                    expires_at_ms: col(row, 3)?,
                })
            })
            .collect()
    }

    async fn change_password(
        &self,
        user: UserId,
        old: String,
        new: String,
        keep: [u8; 32],
        now_ms: i64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        // One transaction, whose outcome a lost answer settles: reported
        // failed though it had committed, the client would be told its old
        // password is wrong when it tries again.
        let mut client = self.client().await?;
        let set = client
            .prepare_cached(
                "UPDATE users SET password_hash = $3 WHERE id = $1 AND password_hash = $2",
            )
            .await
            .map_err(pg)?;
        let revoke = client
            .prepare_cached(
                "UPDATE sessions SET revoked_at_ms = $3
                 WHERE user_id = $1 AND token_hash <> $2
                   AND revoked_at_ms IS NULL AND expires_at_ms > $3
                 RETURNING token_hash",
            )
            .await
            .map_err(pg)?;
        let xid_stmt = client.prepare_cached(TRANSACTION_ID).await.map_err(pg)?;
        let tx = client.transaction().await.map_err(pg)?;
        if tx
            .execute(&set, &[&sql(user), &old, &new])
            .await
            .map_err(pg)?
            == 0
        {
            return Err(StoreError::Conflict);
        }
        let revoked = tx
            .query(&revoke, &[&sql(user), &&keep[..], &now_ms])
            .await
            .map_err(pg)?
            .iter()
            .map(|row| {
                let hash: &[u8] = col(row, 0)?;
                Ok(hash.try_into().unwrap_or([0; 32]))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let xid: i64 = col(&tx.query_one(&xid_stmt, &[]).await.map_err(pg)?, 0)?;
        if let Err(e) = tx.commit().await {
            drop(client);
            self.settle_commit(xid, e).await?;
        }
        Ok(revoked)
    }

    async fn purge_sessions(&self, ended_before_ms: i64, limit: u32) -> Result<u64, StoreError> {
        // One statement per index, each bounded, so a backlog is deleted
        // in short transactions; nodes purging at once delete each row
        // once (the loser's DELETE finds it gone).
        let mut deleted = 0;
        for ended in ["expires_at_ms", "revoked_at_ms"] {
            let left = u64::from(limit) - deleted;
            if left == 0 {
                break;
            }
            deleted += self
                .execute(
                    &format!(
                        "DELETE FROM sessions WHERE token_hash IN
                         (SELECT token_hash FROM sessions WHERE {ended} < $1 LIMIT $2)"
                    ),
                    &[&ended_before_ms, &(left as i64)],
                )
                .await?;
        }
        Ok(deleted)
    }

    async fn friend_request_within(
        &self,
        from: UserId,
        to: UserId,
        now_ms: i64,
        max_friends: u64,
    ) -> Result<FriendRequestOutcome, StoreError> {
        let mut client = self.client().await?;
        let counts = client.prepare_cached(FRIEND_COUNTS).await.map_err(pg)?;
        let lock = client.prepare_cached(LOCK_PAIR).await.map_err(pg)?;
        let lock_users = client
            .prepare_cached(LOCK_FRIEND_COUNTS)
            .await
            .map_err(pg)?;
        let are = client.prepare_cached(ARE_FRIENDS).await.map_err(pg)?;
        let blocks = client.prepare_cached(BLOCKS).await.map_err(pg)?;
        let take_reverse = client.prepare_cached(TAKE_REQUEST).await.map_err(pg)?;
        let befriend = client.prepare_cached(MAKE_FRIENDS).await.map_err(pg)?;
        let request = client
            .prepare_cached(
                "INSERT INTO friend_requests (from_id, to_id, created_at_ms) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(pg)?;
        let xid_stmt = client.prepare_cached(TRANSACTION_ID).await.map_err(pg)?;
        let (from, to) = (sql(from), sql(to));
        let tx = client.transaction().await.map_err(pg)?;
        // The pair lock makes two crossing requests meet: the second sees
        // the first and accepts it instead of leaving two requests behind.
        // Then both users' count locks (after the pair lock, in id order,
        // as every request takes them): requests of other pairs that
        // involve either user wait, so each counts what the ones before it
        // committed and the limits are exact. Without them two requests
        // to one user from different askers each counted without the
        // other's uncommitted row, and both passed.
        let pair: [Param<'_>; 2] = [&from, &to];
        let (_, _, friends, blocked, xid) = tokio::try_join!(
            biased;
            tx.execute(&lock, &pair),
            tx.execute(&lock_users, &pair),
            tx.query_one(&are, &pair),
            tx.query_one(&blocks, &pair),
            tx.query_one(&xid_stmt, &[]),
        )
        .map_err(pg)?;
        let xid: i64 = col(&xid, 0)?;
        // The limits are checked after the change, in its transaction,
        // which is dropped (rolled back) when one is exceeded.
        let count = |row: &Row| -> Result<FriendCounts, StoreError> {
            Ok(FriendCounts {
                friends: id_col(row, 0)?,
                incoming: id_col(row, 1)?,
                outgoing: id_col(row, 2)?,
            })
        };
        let outcome = if col::<bool>(&blocked, 0)? {
            FriendRequestOutcome::Blocked
        } else if col::<bool>(&blocked, 1)? {
            FriendRequestOutcome::BlockedBy
        } else if col::<bool>(&friends, 0)? {
            FriendRequestOutcome::AlreadyFriends
        } else if tx.execute(&take_reverse, &[&to, &from]).await.map_err(pg)? > 0 {
            let key = direct_key(id(from), id(to));
            tx.execute(&befriend, &[&from, &to, &now_ms, &key])
                .await
                .map_err(pg)?;
            let mine = count(&tx.query_one(&counts, &[&from]).await.map_err(pg)?)?;
            if mine.friends + mine.outgoing > max_friends {
                return Ok(FriendRequestOutcome::AskerFull);
            }
            FriendRequestOutcome::Accepted
        } else if tx
            .execute(&request, &[&from, &to, &now_ms])
            .await
            .map_err(pg)?
            > 0
        {
            let (asker, target): ([Param<'_>; 1], [Param<'_>; 1]) = ([&from], [&to]);
            let (mine, theirs) = tokio::try_join!(
                tx.query_one(&counts, &asker),
                tx.query_one(&counts, &target),
            )
            .map_err(pg)?;
            let (mine, theirs) = (count(&mine)?, count(&theirs)?);
            if mine.friends + mine.outgoing > max_friends {
                return Ok(FriendRequestOutcome::AskerFull);
            }
            if theirs.incoming > max_friends {
                return Ok(FriendRequestOutcome::TargetFull);
            }
            FriendRequestOutcome::Requested
        } else {
            FriendRequestOutcome::AlreadyRequested
        };
        if let Err(e) = tx.commit().await {
            // As for appends: a change reported failed that had committed
            // would be answered wrongly when retried.
            drop(client);
            self.settle_commit(xid, e).await?;
        }
        Ok(outcome)
    }

    async fn friend_accept_within(
        &self,
        user: UserId,
        from: UserId,
        now_ms: i64,
        max_friends: u64,
    ) -> Result<bool, StoreError> {
        let mut client = self.client().await?;
        let lock = client.prepare_cached(LOCK_PAIR).await.map_err(pg)?;
        let lock_users = client
            .prepare_cached(LOCK_FRIEND_COUNTS)
            .await
            .map_err(pg)?;
        let take = client.prepare_cached(TAKE_REQUEST).await.map_err(pg)?;
        let befriend = client.prepare_cached(MAKE_FRIENDS).await.map_err(pg)?;
        let counts = client.prepare_cached(FRIEND_COUNTS).await.map_err(pg)?;
        let xid_stmt = client.prepare_cached(TRANSACTION_ID).await.map_err(pg)?;
        let (user, from) = (sql(user), sql(from));
        let tx = client.transaction().await.map_err(pg)?;
        // The pair's lock, as requests and removals take it: a removal
        // crossing this accept either sees the friendship or waits for it.
        // Then both users' count locks, as requests take them, so the
        // limit below counts every accept and request before this one.
        let pair: [Param<'_>; 2] = [&user, &from];
        let (_, _, xid) = tokio::try_join!(
            biased;
            tx.execute(&lock, &pair),
            tx.execute(&lock_users, &pair),
            tx.query_one(&xid_stmt, &[]),
        )
        .map_err(pg)?;
        let xid: i64 = col(&xid, 0)?;
        if tx.execute(&take, &[&from, &user]).await.map_err(pg)? == 0 {
            return Err(StoreError::NotFound);
        }
        let key = direct_key(id(user), id(from));
        tx.execute(&befriend, &[&user, &from, &now_ms, &key])
            .await
            .map_err(pg)?;
        // Checked after the change, in its transaction, which is dropped
        // (rolled back) when the limit is exceeded.
        let mine = tx.query_one(&counts, &[&user]).await.map_err(pg)?;
        if id_col(&mine, 0)? + id_col(&mine, 2)? > max_friends {
            return Ok(false);
        }
        if let Err(e) = tx.commit().await {
            // Retried after a lost answer, an accept that had committed
            // would find no request and answer NOT_FOUND.
            drop(client);
            self.settle_commit(xid, e).await?;
        }
        Ok(true)
    }

    async fn friend_decline(&self, user: UserId, from: UserId) -> Result<bool, StoreError> {
        let n = self
            .execute(TAKE_REQUEST, &[&sql(from), &sql(user)])
            .await?;
        Ok(n > 0)
    }

    async fn friend_remove(&self, user: UserId, other: UserId) -> Result<bool, StoreError> {
        // Under the pair's lock: a removal whose snapshot predated a
        // crossing accept's commit found nothing to remove, answered
        // "nothing removed", and left the two friends.
        let mut client = self.client().await?;
        let lock = client.prepare_cached(LOCK_PAIR).await.map_err(pg)?;
        let end = EndFriendship::prepare(&client).await?;
        let xid_stmt = client.prepare_cached(TRANSACTION_ID).await.map_err(pg)?;
        let tx = client.transaction().await.map_err(pg)?;
        let (user_id, other_id) = (sql(user), sql(other));
        let pair: [Param<'_>; 2] = [&user_id, &other_id];
        let (_, xid) = tokio::try_join!(
            biased;
            tx.execute(&lock, &pair),
            tx.query_one(&xid_stmt, &[]),
        )
        .map_err(pg)?;
        let xid: i64 = col(&xid, 0)?;
        let ended = end.run(&tx, user, other).await?;
        if let Err(e) = tx.commit().await {
            // Retried after a lost answer, a removal that had committed
            // would find nothing to end, and its ex-friend would not hear.
            drop(client);
            self.settle_commit(xid, e).await?;
        }
        Ok(ended)
    }

    async fn block(
        &self,
        user: UserId,
        other: UserId,
        now_ms: i64,
        max_blocked: u64,
    ) -> Result<BlockOutcome, StoreError> {
        let mut client = self.client().await?;
        let lock = client.prepare_cached(LOCK_PAIR).await.map_err(pg)?;
        let lock_users = client
            .prepare_cached(LOCK_FRIEND_COUNTS)
            .await
            .map_err(pg)?;
        let end = EndFriendship::prepare(&client).await?;
        let insert = client
            .prepare_cached(
                "INSERT INTO blocks (user_id, blocked_id, since_ms) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(pg)?;
        let count = client
            .prepare_cached("SELECT count(*) FROM blocks WHERE user_id = $1")
            .await
            .map_err(pg)?;
        let xid_stmt = client.prepare_cached(TRANSACTION_ID).await.map_err(pg)?;
        let tx = client.transaction().await.map_err(pg)?;
        // The pair's lock, as requests take it: a request crossing this
        // block either comes first (and is ended here) or sees the block.
        // Then both users' count locks, as requests take them, which makes
        // the count below exact however blocks of the user race.
        let (user_id, other_id) = (sql(user), sql(other));
        let pair: [Param<'_>; 2] = [&user_id, &other_id];
        let (_, _, xid) = tokio::try_join!(
            biased;
            tx.execute(&lock, &pair),
            tx.execute(&lock_users, &pair),
            tx.query_one(&xid_stmt, &[]),
        )
        .map_err(pg)?;
        let xid: i64 = col(&xid, 0)?;
        // Rather than the insert's foreign key error (which would read as a
        // store failure).
        let exists = tx
            .query_opt("SELECT 1 FROM users WHERE id = $1", &[&other_id])
            .await
            .map_err(pg)?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        if tx
            .execute(&insert, &[&user_id, &other_id, &now_ms])
            .await
            .map_err(pg)?
            == 0
        {
            return Ok(BlockOutcome::AlreadyBlocked);
        }
        // Checked after the insert, in its transaction, which is dropped
        // (rolled back) when the limit is exceeded.
        let blocked = tx.query_one(&count, &[&user_id]).await.map_err(pg)?;
        if id_col(&blocked, 0)? > max_blocked {
            return Ok(BlockOutcome::Full);
        }
        let ended = end.run(&tx, user, other).await?;
        if let Err(e) = tx.commit().await {
            // Retried after a lost answer, a block that had committed would
            // answer "already blocked" and lose the friendship it ended.
            drop(client);
            self.settle_commit(xid, e).await?;
        }
        Ok(BlockOutcome::Blocked { ended })
    }

    async fn unblock(&self, user: UserId, other: UserId) -> Result<bool, StoreError> {
        let n = self
            .execute(
                "DELETE FROM blocks WHERE user_id = $1 AND blocked_id = $2",
                &[&sql(user), &sql(other)],
            )
            .await?;
        Ok(n > 0)
    }

    async fn friends(&self, user: UserId) -> Result<FriendLists, StoreError> {
        // One statement, so the four lists come from one snapshot: as four
        // statements, an accept committed between them left the user in
        // neither the friends list nor the requests.
        let rows = self.rows(FRIEND_LISTS, &[&sql(user)]).await?;
        let mut lists = FriendLists::default();
        for row in &rows {
            let kind: i32 = col(row, 0)?;
            let list = match kind {
                0 => &mut lists.friends,
                1 => &mut lists.incoming,
                2 => &mut lists.outgoing,
                _ => &mut lists.blocked,
            };
            list.push((id_col(row, 1)?, col(row, 2)?));
        }
        Ok(lists)
    }

    async fn are_friends(&self, a: UserId, b: UserId) -> Result<bool, StoreError> {
        col(&self.one(ARE_FRIENDS, &[&sql(a), &sql(b)]).await?, 0)
    }

    async fn friend_counts(&self, user: UserId) -> Result<FriendCounts, StoreError> {
        let row = self.one(FRIEND_COUNTS, &[&sql(user)]).await?;
        Ok(FriendCounts {
            friends: id_col(&row, 0)?,
            incoming: id_col(&row, 1)?,
            outgoing: id_col(&row, 2)?,
        })
    }

    async fn open_direct(
        &self,
        a: UserId,
        b: UserId,
        now_ms: i64,
    ) -> Result<ConversationId, StoreError> {
        let mut client = self.client().await?;
        let find = client
            .prepare_cached("SELECT id FROM conversations WHERE direct_key = $1")
            .await
            .map_err(pg)?;
        let lock = client.prepare_cached(LOCK_PAIR).await.map_err(pg)?;
        // Creating is one statement, so the conversation and its members
        // appear together; two concurrent creators meet on the unique
        // direct key and the loser reads the winner's row. It is closed
        // unless the two are friends (the caller checked, but a removal
        // may have come since: the pair's lock orders the two).
        let create = client
            .prepare_cached(
                "WITH c AS (
                    INSERT INTO conversations (kind, name, direct_key, created_at_ms, last_activity_ms, closed)
                    VALUES ($1, '', $2, $3, $3,
                            NOT EXISTS (SELECT 1 FROM friends WHERE user_id = $4 AND friend_id = $5))
                    ON CONFLICT (direct_key) DO NOTHING
                    RETURNING id
                 ), m AS (
                    INSERT INTO members (conversation_id, user_id, role, joined_seq, delivered_seq, seen_seq)
                    SELECT c.id, u.id, 0, 0, 0, 0 FROM c, unnest(ARRAY[$4::bigint, $5::bigint]) AS u(id)
                 )
                 SELECT id FROM c",
            )
            .await
            .map_err(pg)?;
        let key = direct_key(a, b);
        if let Some(row) = client.query_opt(&find, &[&key]).await.map_err(pg)? {
            return id_col(&row, 0);
        }
        let kind = proto::ConversationKind::Direct as i32;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute(&lock, &[&sql(a), &sql(b)]).await.map_err(pg)?;
        let created = tx
            .query_opt(&create, &[&kind, &key, &now_ms, &sql(a), &sql(b)])
            .await
            .map_err(pg)?;
        let row = match created {
            Some(row) => row,
            None => tx.query_one(&find, &[&key]).await.map_err(pg)?,
        };
        tx.commit().await.map_err(pg)?;
        id_col(&row, 0)
    }

    async fn conversation(
        &self,
        conversation_id: ConversationId,
        viewer: UserId,
    ) -> Result<ConversationView, StoreError> {
        self.views(vec![sql(conversation_id)], viewer)
            .await?
            .remove(&conversation_id)
            .ok_or(StoreError::NotAMember)
    }

    async fn conversations(
        &self,
        user: UserId,
        (before_ms, before_id): (i64, ConversationId),
        limit: u32,
    ) -> Result<Vec<ConversationView>, StoreError> {
        // (0, 0) is the first page; (0, id) follows an entry of time 0 (a
        // stay ended before its time was recorded, with no message).
        let mut before = match (before_ms, before_id) {
            (..=0, 0) => (i64::MAX, 0),
            cursor => cursor,
        };
        let mut page = Vec::new();
        // An entry whose membership changed between the page's read and
        // its views' is left out; the page then reads on past it, so that
        // a page shorter than asked still means the end (a client stops at
        // an empty one). Bounded: each round needs another change.
        for _ in 0..LIST_ROUNDS {
            let want = limit as usize - page.len();
            let chosen = self
                .rows(
                    LIST_CONVERSATIONS,
                    &[&sql(user), &before.0, &(want as i64), &sql(before.1)],
                )
                .await?
                .iter()
                .map(|r| Ok((col::<i64>(r, 0)?, col::<i64>(r, 1)?, col::<bool>(r, 2)?)))
                .collect::<Result<Vec<(i64, i64, bool)>, StoreError>>()?;
            let Some(&(last_id, last_at, _)) = chosen.last() else {
                return Ok(page);
            };
            let (former, current): (Vec<_>, Vec<_>) =
                chosen.iter().partition(|&&(_, _, former)| former);
            let ids = |chosen: Vec<&(i64, i64, bool)>| chosen.iter().map(|c| c.0).collect();
            let (mut current, mut former) = tokio::try_join!(
                self.views(ids(current), user),
                self.former_views(ids(former), user),
            )?;
            // The views are read by later statements, which may see newer
            // activity (or a membership that ended or began since): each
            // keeps the time it was ordered by, as the client pages on from
            // the last one's (a newer time there would start the next page
            // above this one, and repeat it), and one whose membership
            // changed is left out. SQLite reads all in one transaction.
            let read = chosen.len();
            page.extend(
                chosen
                    .into_iter()
                    .filter_map(|(id, ordered_by, was_former)| {
                        let views = if was_former {
                            &mut former
                        } else {
                            &mut current
                        };
                        let mut view = views.remove(&self::id(id))?;
                        view.last_activity_ms = ordered_by;
                        Some(view)
                    }),
            );
            if read < want || page.len() == limit as usize {
                return Ok(page);
            }
            before = (last_at, id(last_id));
        }
        // Every round read a full chunk and lost part of it: an empty page
        // here would read as the end.
        if page.is_empty() {
            return Err(StoreError::Unavailable(
                "the conversation list changed while it was read; ask again".into(),
            ));
        }
        Ok(page)
    }

    async fn membership(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<Option<Membership>, StoreError> {
        self.row(
            "SELECT c.last_seq,
                    GREATEST(m.joined_seq,
                             COALESCE((SELECT cleared_seq + 1 FROM cleared_histories
                                       WHERE user_id = $2 AND conversation_id = $1), 0))
             FROM members m JOIN conversations c ON c.id = m.conversation_id
             WHERE m.conversation_id = $1 AND m.user_id = $2",
            &[&sql(conversation_id), &sql(user)],
        )
        .await?
        .map(|row| membership_from(&row))
        .transpose()
    }

    async fn create_group(
        &self,
        group: NewGroup,
        max_members: usize,
        now_ms: i64,
    ) -> Result<GroupCreated, StoreError> {
        if let Some(key) = &group.client_key
            && let Some(id) = self.group_by_key(group.creator, key).await?
        {
            return Ok(GroupCreated::Existing(id));
        }
        let members = group.others(max_members)?;
        let NewGroup {
            creator,
            name,
            client_key,
            ..
        } = group;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        group::check_friends(&tx, creator, &members).await?;
        let creator_name = group::username(&tx, creator)
            .await?
            .ok_or(StoreError::NotFound)?;
        let names = group::usernames(&tx, &members).await?;
        // A concurrent request with the same key (a retry racing its
        // original on another node) waits for it here and then inserts
        // nothing.
        let row = tx
            .query_opt(
                "INSERT INTO conversations
                   (kind, name, direct_key, created_at_ms, last_activity_ms, creator_id, create_key)
                 VALUES ($1, $2, NULL, $3, $3, $4, $5)
                 ON CONFLICT (creator_id, create_key) WHERE create_key IS NOT NULL DO NOTHING
                 RETURNING id",
                &[
                    &(proto::ConversationKind::Group as i32),
                    &name,
                    &now_ms,
                    &sql(creator),
                    &client_key,
                ],
            )
            .await
            .map_err(pg)?;
        let Some(row) = row else {
            drop(tx);
            // The lookup needs a connection of its own (a pool of one).
            drop(client);
            let key = client_key.as_deref().unwrap_or_default();
            return match self.group_by_key(creator, key).await? {
                Some(id) => Ok(GroupCreated::Existing(id)),
                None => Err(StoreError::Unavailable(
                    "postgres: a concurrent group creation with the same key rolled back; retry"
                        .into(),
                )),
            };
        };
        let id = id_col(&row, 0)?;
        group::add_members(&tx, id, &[creator], group::ROLE_ADMIN, 0).await?;
        group::add_members(&tx, id, &members, group::ROLE_MEMBER, 0).await?;
        let text = crate::store::system_text::created(&creator_name, &name, &names);
        let (appended, xid) = group::append_system(&tx, id, creator, None, text, now_ms).await?;
        if let Err(e) = tx.commit().await {
            // Its connection back to the pool first: the settle needs one,
            // and with a pool of one this is it.
            drop(client);
            self.settle_commit(xid, e).await?;
        }
        Ok(GroupCreated::New(appended))
    }

    async fn change_group(
        &self,
        edit: GroupEdit,
        max_members: usize,
        now_ms: i64,
    ) -> Result<Appended, StoreError> {
        let GroupEdit {
            conversation_id,
            actor,
            change,
            client_key,
        } = edit;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        // The conversation row first, as appends lock it: same order, no
        // deadlock, and seq allocation is serialised with sends.
        let kind: Option<i32> = tx
            .query_opt(
                "SELECT kind FROM conversations WHERE id = $1 FOR UPDATE",
                &[&sql(conversation_id)],
            )
            .await
            .map_err(pg)?
            .map(|r| col(&r, 0))
            .transpose()?;
        // A repeat answers as the first did, whatever changed since. Under
        // the conversation's lock: a repeat racing its first waits for it.
        if let Some(key) = &client_key {
            let row = tx
                .query_opt(EXISTING_KEYS, &[&vec![sql(actor)], &vec![key.as_str()]])
                .await
                .map_err(pg)?;
            if let Some(row) = row {
                let members: Vec<i64> = col(&row, 11)?;
                let first = Appended {
                    message: Arc::new(message_from_row(&row, 0)?),
                    duplicate: true,
                    members: members.into_iter().map(id).collect(),
                };
                crate::store::check_repeated_edit(&first, conversation_id)?;
                return Ok(first);
            }
        }
        // Then, before any write, the member rows the change will write, in
        // user order: watermark batches lock member rows in (conversation,
        // user) order and only then touch departures, so a change that
        // wrote a target's row or a departure before the actor's row could
        // deadlock with a batch holding the actor's. A leave writes the
        // actor's row and, when the actor is the only admin, the member it
        // promotes: locking every member of a 10,000-member group held up
        // all of its sends and acks meanwhile.
        let promoted = match &change {
            GroupChange::Leave => group::promoted_on_leave(&tx, conversation_id, actor).await?,
            _ => None,
        };
        let touched: Vec<i64> = match &change {
            GroupChange::Leave => {
                let mut rows: Vec<i64> = std::iter::once(actor).chain(promoted).map(sql).collect();
                rows.sort_unstable();
                rows
            }
            GroupChange::Remove(user) | GroupChange::SetAdmin(user, _) => {
                vec![sql(actor), sql(*user)]
            }
            GroupChange::Rename(_) | GroupChange::Add(_) => vec![sql(actor)],
        };
        tx.query(
            "SELECT user_id FROM members
             WHERE conversation_id = $1 AND user_id = ANY($2)
             ORDER BY user_id FOR UPDATE",
            &[&sql(conversation_id), &touched],
        )
        .await
        .map_err(pg)?;
        let Some(actor_role) = group::role(&tx, conversation_id, actor).await? else {
            return Err(StoreError::NotAMember);
        };
        if kind != Some(proto::ConversationKind::Group as i32) {
            return Err(StoreError::Invalid(
                "direct conversations have no members to change".into(),
            ));
        }
        let is_admin = actor_role == group::ROLE_ADMIN;
        let actor_name = group::username(&tx, actor).await?.unwrap_or_default();
        let next_seq: u64 = {
            let row = tx
                .query_one(
                    "SELECT last_seq FROM conversations WHERE id = $1",
                    &[&sql(conversation_id)],
                )
                .await
                .map_err(pg)?;
            id_col(&row, 0)? + 1
        };
        let mut also_tell: Vec<UserId> = Vec::new();
        // A removed member and their delivered watermark.
        let mut departed: Option<(UserId, u64)> = None;
        // A member who left or was removed, and where they joined.
        let mut ended: Option<(UserId, u64)> = None;
        let text = match change {
            GroupChange::Rename(name) => {
                tx.execute(
                    "UPDATE conversations SET name = $2 WHERE id = $1",
                    &[&sql(conversation_id), &name],
                )
                .await
                .map_err(pg)?;
                crate::store::system_text::renamed(&actor_name, &name)
            }
            GroupChange::Add(users) => {
                if !is_admin {
                    return Err(StoreError::NotAdmin);
                }
                // The list is the client's: one lookup for all of it, and
                // each user once, in the order given.
                let members = group::members_among(&tx, conversation_id, &users).await?;
                let mut seen = HashSet::with_capacity(users.len());
                let new: Vec<UserId> = users
                    .into_iter()
                    .filter(|user| !members.contains(user) && seen.insert(*user))
                    .collect();
                if new.is_empty() {
                    return Err(StoreError::Invalid("they are members already".into()));
                }
                group::check_friends(&tx, actor, &new).await?;
                let row = tx
                    .query_one(
                        "SELECT COUNT(*) FROM members WHERE conversation_id = $1",
                        &[&sql(conversation_id)],
                    )
                    .await
                    .map_err(pg)?;
                let current: i64 = col(&row, 0)?;
                if current as usize + new.len() > max_members {
                    return Err(StoreError::LimitReached);
                }
                let names = group::usernames(&tx, &new).await?;
                group::add_members(&tx, conversation_id, &new, group::ROLE_MEMBER, next_seq)
                    .await?;
                group::forget_departures(&tx, conversation_id, &new).await?;
                crate::store::system_text::added(&actor_name, &names)
            }
            GroupChange::Remove(user) => {
                if !is_admin {
                    return Err(StoreError::NotAdmin);
                }
                if user == actor {
                    return Err(StoreError::Invalid("use leave to leave a group".into()));
                }
                if group::role(&tx, conversation_id, user).await?.is_none() {
                    return Err(StoreError::NotFound);
                }
                let name = group::username(&tx, user).await?.unwrap_or_default();
                let removed = group::remove_member(&tx, conversation_id, user).await?;
                also_tell.push(user);
                departed = Some((user, removed.as_ref().map_or(0, |r| r.delivered)));
                ended = removed.map(|r| (user, r.joined));
                crate::store::system_text::removed(&actor_name, &name)
            }
            GroupChange::Leave => {
                ended = group::remove_member(&tx, conversation_id, actor)
                    .await?
                    .map(|r| (actor, r.joined));
                also_tell.push(actor);
                // A group keeps an admin while it has members.
                if let Some(next) = promoted {
                    tx.execute(
                        "UPDATE members SET role = $3 WHERE conversation_id = $1 AND user_id = $2",
                        &[&sql(conversation_id), &sql(next), &group::ROLE_ADMIN],
                    )
                    .await
                    .map_err(pg)?;
                }
                crate::store::system_text::left(&actor_name)
            }
            GroupChange::SetAdmin(user, admin) => {
                if !is_admin {
                    return Err(StoreError::NotAdmin);
                }
                let Some(current) = group::role(&tx, conversation_id, user).await? else {
                    return Err(StoreError::NotFound);
                };
                if !admin && current == group::ROLE_ADMIN {
                    // Group changes hold the conversation's row: no other
                    // demotion runs meanwhile.
                    let admins: i64 = tx
                        .query_one(
                            "SELECT COUNT(*) FROM members WHERE conversation_id = $1 AND role = $2",
                            &[&sql(conversation_id), &group::ROLE_ADMIN],
                        )
                        .await
                        .map_err(pg)
                        .and_then(|row| col(&row, 0))?;
                    if admins <= 1 {
                        return Err(StoreError::Invalid(crate::store::LAST_ADMIN.into()));
                    }
                }
                let name = group::username(&tx, user).await?.unwrap_or_default();
                let role = if admin {
                    group::ROLE_ADMIN
                } else {
                    group::ROLE_MEMBER
                };
                tx.execute(
                    "UPDATE members SET role = $3 WHERE conversation_id = $1 AND user_id = $2",
                    &[&sql(conversation_id), &sql(user), &role],
                )
                .await
                .map_err(pg)?;
                crate::store::system_text::role(&actor_name, &name, admin)
            }
        };
        let (mut appended, xid) =
            group::append_system(&tx, conversation_id, actor, client_key, text, now_ms).await?;
        if let Some((user, delivered)) = departed {
            group::note_departure(&tx, conversation_id, user, delivered, appended.message.seq)
                .await?;
        }
        if let Some((user, joined)) = ended {
            let left = (appended.message.seq, appended.message.sent_at_ms);
            group::note_former_member(&tx, conversation_id, user, joined, left).await?;
        }
        if let Err(e) = tx.commit().await {
            // As in create_group: the connection back first.
            drop(client);
            self.settle_commit(xid, e).await?;
        }
        for user in also_tell {
            if !appended.members.contains(&user) {
                appended.members.push(user);
            }
        }
        Ok(appended)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await.map(drop).map_err(pg)
    }

    async fn history_id(&self) -> Result<String, StoreError> {
        let client = self.client().await?;
        client
            .query_one("SELECT id FROM history_identity", &[])
            .await
            .map_err(pg)
            .and_then(|row| col(&row, 0))
    }

    async fn is_member(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<bool, StoreError> {
        let row = self
            .one(
                "SELECT EXISTS(SELECT 1 FROM members WHERE conversation_id = $1 AND user_id = $2)",
                &[&sql(conversation_id), &sql(user)],
            )
            .await?;
        col(&row, 0)
    }

    async fn delete_conversation(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        up_to_seq: u64,
    ) -> Result<u64, StoreError> {
        // One statement: clear a direct conversation of theirs, or forget
        // a group they are no longer in (its departure too: catch-up would
        // bring what it still owed them, and the group back with it), and
        // say which.
        let row = self
            .one(
                "WITH target AS (
                     SELECT c.kind, LEAST(c.last_seq, $4::bigint) AS last_seq
                     FROM members m JOIN conversations c ON c.id = m.conversation_id
                     WHERE m.conversation_id = $2 AND m.user_id = $1),
                 cleared AS (
                     INSERT INTO cleared_histories (user_id, conversation_id, cleared_seq)
                     SELECT $1, $2, last_seq FROM target WHERE kind = $3
                     ON CONFLICT (user_id, conversation_id) DO UPDATE
                         SET cleared_seq = GREATEST(cleared_histories.cleared_seq, EXCLUDED.cleared_seq)),
                 forgotten AS (
                     DELETE FROM former_members
                     WHERE user_id = $1 AND conversation_id = $2 AND NOT EXISTS (SELECT 1 FROM target)
                     RETURNING 1),
                 departed AS (
                     DELETE FROM departures
                     WHERE user_id = $1 AND conversation_id = $2 AND NOT EXISTS (SELECT 1 FROM target)
                     RETURNING 1)
                 SELECT (SELECT kind FROM target), (SELECT last_seq FROM target),
                        (SELECT count(*) FROM forgotten) + (SELECT count(*) FROM departed)",
                &[
                    &sql(user),
                    &sql(conversation_id),
                    &(proto::ConversationKind::Direct as i32),
                    &sql(up_to_seq),
                ],
            )
            .await?;
        match col::<Option<i32>>(&row, 0)? {
            Some(kind) if kind == proto::ConversationKind::Direct as i32 => {
                Ok(id(col::<Option<i64>>(&row, 1)?.unwrap_or_default()))
            }
            Some(_) => Err(StoreError::Invalid(super::LEAVE_FIRST.into())),
            None if col::<i64>(&row, 2)? > 0 => Ok(0),
            None => Err(StoreError::NotAMember),
        }
    }

    async fn set_muted(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        until_ms: i64,
    ) -> Result<(), StoreError> {
        // One statement: the mute is written only where the member row is,
        // which it holds (FOR KEY SHARE) until it commits: a removal, which
        // deletes the member's mute, waits for it rather than missing it
        // (or it waits for the removal, and finds no member).
        let (user, conversation) = (sql(user), sql(conversation_id));
        let row = if until_ms > 0 {
            self.one(
                "WITH member AS (SELECT 1 FROM members WHERE conversation_id = $2 AND user_id = $1
                                 FOR KEY SHARE),
                      written AS (
                          INSERT INTO mutes (user_id, conversation_id, until_ms)
                          SELECT $1, $2, $3::bigint FROM member
                          ON CONFLICT (user_id, conversation_id)
                          DO UPDATE SET until_ms = EXCLUDED.until_ms)
                 SELECT EXISTS(SELECT 1 FROM member)",
                &[&user, &conversation, &until_ms],
            )
            .await?
        } else {
            self.one(
                "WITH member AS (SELECT 1 FROM members WHERE conversation_id = $2 AND user_id = $1),
                      removed AS (DELETE FROM mutes WHERE user_id = $1 AND conversation_id = $2)
                 SELECT EXISTS(SELECT 1 FROM member)",
                &[&user, &conversation],
            )
            .await?
        };
        if col::<bool>(&row, 0)? {
            Ok(())
        } else {
            Err(StoreError::NotAMember)
        }
    }

    async fn muted_until(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<i64, StoreError> {
        Ok(self
            .row(
                "SELECT until_ms FROM mutes WHERE user_id = $1 AND conversation_id = $2",
                &[&sql(user), &sql(conversation_id)],
            )
            .await?
            .map(|row| col::<i64>(&row, 0))
            .transpose()?
            .unwrap_or_default())
    }

    async fn audience(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<Arc<Vec<UserId>>, StoreError> {
        let row = self
            .row(
                "SELECT c.closed,
                        ARRAY(SELECT m.user_id FROM members m
                              WHERE m.conversation_id = c.id ORDER BY m.user_id)
                 FROM conversations c
                 WHERE c.id = $1
                   AND EXISTS(SELECT 1 FROM members WHERE conversation_id = $1 AND user_id = $2)",
                &[&sql(conversation_id), &sql(user)],
            )
            .await?
            .ok_or(StoreError::NotAMember)?;
        let members: Vec<UserId> = col::<Vec<i64>>(&row, 1)?.into_iter().map(id).collect();
        if col::<bool>(&row, 0)? {
            let other = members.iter().copied().find(|&m| m != user).unwrap_or(user);
            return Err(StoreError::NotFriends(other));
        }
        Ok(Arc::new(members))
    }

    async fn reference(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        seq: u64,
        client_msg_id: String,
    ) -> Result<Reference, StoreError> {
        // One row: whether the key is stored; where the member's history
        // starts (NULL: not a member), as `membership` has it; the
        // message, if it is at or after that start.
        let row = self
            .row(
                "SELECT EXISTS (SELECT 1 FROM messages
                                WHERE sender_id = $2 AND client_msg_id = $4),
                        me.start, t.type, t.sender_id, t.sent_at_ms, t.unsent
                 FROM (SELECT 1) one
                 LEFT JOIN (SELECT GREATEST(m.joined_seq, COALESCE(k.cleared_seq + 1, 0)) AS start
                            FROM members m
                            LEFT JOIN cleared_histories k
                              ON k.user_id = m.user_id AND k.conversation_id = m.conversation_id
                            WHERE m.conversation_id = $1 AND m.user_id = $2) me ON true
                 LEFT JOIN messages t ON t.conversation_id = $1 AND t.seq = $3
                                     AND t.seq >= me.start",
                &[&sql(conversation_id), &sql(user), &sql(seq), &client_msg_id],
            )
            .await?
            .ok_or_else(|| StoreError::Internal("a one-row select returned none".into()))?;
        if col::<bool>(&row, 0)? {
            return Ok(Reference::Retry);
        }
        if col::<Option<i64>>(&row, 1)?.is_none() {
            return Err(StoreError::NotAMember);
        }
        let Some(message_type) = col::<Option<i32>>(&row, 2)? else {
            return Ok(Reference::Unreadable);
        };
        Ok(Reference::Readable(Referable {
            message_type: proto::MessageType::try_from(message_type).unwrap_or_default(),
            sender_id: id_col(&row, 3)?,
            sent_at_ms: col(&row, 4)?,
            unsent: col(&row, 5)?,
        }))
    }

    async fn former_membership(
        &self,
        conversation_id: ConversationId,
        user: UserId,
    ) -> Result<Option<Membership>, StoreError> {
        self.row(
            "SELECT left_seq, joined_seq FROM former_members
             WHERE conversation_id = $1 AND user_id = $2
             ORDER BY joined_seq DESC LIMIT 1",
            &[&sql(conversation_id), &sql(user)],
        )
        .await?
        .map(|row| membership_from(&row))
        .transpose()
    }

    async fn was_member_at(
        &self,
        conversation_id: ConversationId,
        user: UserId,
        seq: u64,
    ) -> Result<bool, StoreError> {
        let row = self
            .one(
                "SELECT EXISTS(SELECT 1 FROM members
                               WHERE conversation_id = $1 AND user_id = $2 AND joined_seq <= $3)
                     OR EXISTS(SELECT 1 FROM former_members
                               WHERE user_id = $2 AND conversation_id = $1
                                 AND joined_seq <= $3 AND left_seq >= $3)",
                &[&sql(conversation_id), &sql(user), &sql(seq)],
            )
            .await?;
        col(&row, 0)
    }

    async fn append(
        &self,
        batch: Vec<NewMessage>,
    ) -> Result<Vec<Result<Appended, StoreError>>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for _ in 0..APPEND_ATTEMPTS {
            if let Some(results) = self.append_once(&batch).await? {
                return Ok(results);
            }
            tracing::debug!(
                "a concurrent append stored one of the batch's keys, or broke a deadlock with it; starting over"
            );
        }
        Err(StoreError::Unavailable(
            "postgres: the same messages keep being appended concurrently; retry".into(),
        ))
    }

    async fn history(
        &self,
        conversation_id: ConversationId,
        direction: Direction,
        cursor: u64,
        limit: u32,
    ) -> Result<Page, StoreError> {
        // Ask for one more than the page to learn whether more exist.
        let probe = i64::from(limit) + 1;
        let conversation_id = sql(conversation_id);
        let rows = match direction {
            Direction::Backward => {
                let before = if cursor == 0 { i64::MAX } else { sql(cursor) };
                self.rows(PAGE_BEFORE, &[&conversation_id, &before, &probe])
                    .await?
            }
            Direction::Forward => {
                self.rows(PAGE_AFTER, &[&conversation_id, &sql(cursor), &probe])
                    .await?
            }
        };
        let has_more = rows.len() > limit as usize;
        let mut messages = rows
            .iter()
            .take(limit as usize)
            .map(|r| message_from_row(r, 0).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        if direction == Direction::Backward {
            messages.reverse();
        }
        Ok(Page { messages, has_more })
    }

    async fn undelivered(
        &self,
        user: UserId,
        after: (ConversationId, u64),
        limit: u32,
    ) -> Result<Vec<Arc<proto::Message>>, StoreError> {
        // Per conversation, at most one page is read (the lateral LIMIT), in
        // seq order from the index: a month-long backlog costs one page per
        // call, not a sort of the whole backlog. The (conversation, seq)
        // cursor is spelled as a lower bound on seq, so that it and the
        // watermark bound the index range instead of filtering it.
        self.rows(
            "SELECT m.conversation_id, m.seq, m.message_id, m.sender_id, m.client_msg_id,
                    m.type, m.sent_at_ms, m.body, m.attachment, m.reply_to, m.unsent
             FROM (
                SELECT mb.conversation_id,
                       GREATEST(mb.delivered_seq, COALESCE(k.cleared_seq, 0)) AS delivered_seq,
                       c.last_seq AS upto
                FROM members mb JOIN conversations c ON c.id = mb.conversation_id
                LEFT JOIN cleared_histories k
                  ON k.user_id = mb.user_id AND k.conversation_id = mb.conversation_id
                WHERE mb.user_id = $1 AND mb.conversation_id >= $2::bigint
                UNION ALL
                SELECT conversation_id, delivered_seq, seq FROM departures
                WHERE user_id = $1 AND conversation_id >= $2::bigint
             ) r
             CROSS JOIN LATERAL (
                SELECT * FROM messages m
                WHERE m.conversation_id = r.conversation_id
                  AND m.seq > GREATEST(r.delivered_seq,
                        CASE WHEN r.conversation_id = $2::bigint THEN $3::bigint ELSE 0 END)
                  AND m.seq <= r.upto
                  AND m.sender_id <> $1
                ORDER BY m.seq LIMIT $4
             ) m
             WHERE r.upto > r.delivered_seq
             ORDER BY m.conversation_id, m.seq LIMIT $4",
            &[&sql(user), &sql(after.0), &sql(after.1), &i64::from(limit)],
        )
        .await?
        .iter()
        .map(|r| message_from_row(r, 0).map(Arc::new))
        .collect()
    }

    async fn pending_ranges(&self, user: UserId) -> Result<Option<Vec<PendingRange>>, StoreError> {
        self.rows(
            "SELECT m.conversation_id, GREATEST(m.delivered_seq, COALESCE(k.cleared_seq, 0)),
                    c.last_seq, false
             FROM members m JOIN conversations c ON c.id = m.conversation_id
             LEFT JOIN cleared_histories k
               ON k.user_id = m.user_id AND k.conversation_id = m.conversation_id
             WHERE m.user_id = $1 AND c.last_seq > GREATEST(m.delivered_seq, COALESCE(k.cleared_seq, 0))
             UNION ALL
             SELECT conversation_id, delivered_seq, seq, true FROM departures
             WHERE user_id = $1 AND seq > delivered_seq
             ORDER BY 1",
            &[&sql(user)],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(PendingRange {
                conversation_id: id_col(r, 0)?,
                delivered_seq: id_col(r, 1)?,
                last_seq: id_col(r, 2)?,
                departed: col(r, 3)?,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
    }

    async fn advance_watermarks(
        &self,
        updates: Vec<WatermarkUpdate>,
    ) -> Result<Vec<WatermarkMoved>, StoreError> {
        // Coalesce first: applying updates one by one with "only forward,
        // clamped" is the same as applying each member's highest targets
        // once (seen implies delivered).
        let mut order: Vec<(ConversationId, UserId)> = Vec::new();
        let mut targets: HashMap<(ConversationId, UserId), (u64, u64)> = HashMap::new();
        for u in &updates {
            let key = (u.conversation_id, u.user_id);
            let (delivered, seen) = targets.entry(key).or_insert_with(|| {
                order.push(key);
                (0, 0)
            });
            *delivered = (*delivered).max(u.seq);
            if u.kind == WatermarkKind::Seen {
                *seen = (*seen).max(u.seq);
            }
        }
        if order.is_empty() {
            return Ok(Vec::new());
        }
        let mut sorted = order.clone();
        sorted.sort_unstable();
        let (conversations, users): (Vec<i64>, Vec<i64>) =
            sorted.iter().map(|&(c, u)| (sql(c), sql(u))).unzip();
        let (delivered, seen): (Vec<i64>, Vec<i64>) = sorted
            .iter()
            .map(|k| {
                let (d, s) = targets.get(k).copied().unwrap_or_default();
                (sql(d), sql(s))
            })
            .unzip();

        let mut distinct = conversations.clone();
        distinct.dedup();

        let client = self.client().await?;
        let lock = client.prepare_cached(LOCK_MEMBERS).await.map_err(pg)?;
        let advance = client.prepare_cached(ADVANCE).await.map_err(pg)?;
        let members_of = client.prepare_cached(RECEIPT_AUDIENCE).await.map_err(pg)?;
        let xid_stmt = client
            .prepare_cached(ASSIGNED_TRANSACTION_ID)
            .await
            .map_err(pg)?;
        let lock_params: [Param<'_>; 2] = [&conversations, &users];
        let advance_params: [Param<'_>; 4] = [&conversations, &users, &delivered, &seen];
        let members_params: [Param<'_>; 1] = [&distinct];
        let tx = PipelinedTx::new(client);
        let (_, locked, rows, member_rows, xid_rows) = tokio::try_join!(
            biased;
            tx.begin(),
            tx.query(&lock, &lock_params),
            tx.query(&advance, &advance_params),
            tx.query(&members_of, &members_params),
            tx.query(&xid_stmt, &[]),
        )
        .map_err(pg)?;
        let mut xid: Option<i64> = match xid_rows.first() {
            Some(row) => col(row, 0)?,
            None => None,
        };
        if locked.len() < sorted.len() {
            // Some are no members: perhaps removed members' devices,
            // catching up (rare, so a round trip of its own).
            let members: HashSet<(ConversationId, UserId)> = locked
                .iter()
                .map(|r| Ok((id_col(r, 0)?, id_col(r, 1)?)))
                .collect::<Result<_, StoreError>>()?;
            let (conversations, users, delivered): (Vec<i64>, Vec<i64>, Vec<i64>) = sorted
                .iter()
                .filter(|k| !members.contains(k))
                .map(|k| {
                    let (d, _) = targets.get(k).copied().unwrap_or_default();
                    (sql(k.0), sql(k.1), sql(d))
                })
                .collect();
            tx.client()
                .execute(ACK_DEPARTURES, &[&conversations, &users, &delivered])
                .await
                .map_err(pg)?;
            if xid.is_none() {
                // Only departures moved: the id was read before they
                // wrote, so read it again (still `None` if they wrote
                // nothing either).
                let row = tx.client().query_one(&xid_stmt, &[]).await.map_err(pg)?;
                xid = col(&row, 0)?;
            }
        }
        if let Err(e) = tx.commit().await {
            // As for appends: a move that committed but was reported failed
            // would be acked again, move nothing, and its receipt would
            // never go out. Without an id, nothing was written.
            match xid {
                Some(xid) => self.settle_commit(xid, e).await?,
                None => return Err(pg(e)),
            }
        }

        // One list per conversation, shared by its moves (sorted by user id
        // within each conversation: the query orders them).
        let mut lists: HashMap<ConversationId, Vec<UserId>> = HashMap::new();
        for row in &member_rows {
            lists
                .entry(id_col(row, 0)?)
                .or_default()
                .push(id_col(row, 1)?);
        }
        let lists: HashMap<ConversationId, Arc<Vec<UserId>>> = lists
            .into_iter()
            .map(|(c, members)| (c, Arc::new(members)))
            .collect();
        let mut moved: HashMap<(ConversationId, UserId), WatermarkMoved> = HashMap::new();
        for row in &rows {
            let conversation_id = id_col(row, 0)?;
            let m = WatermarkMoved {
                conversation_id,
                user_id: id_col(row, 1)?,
                delivered_seq: id_col(row, 2)?,
                seen_seq: id_col(row, 3)?,
                members: lists.get(&conversation_id).cloned().unwrap_or_default(),
            };
            moved.insert((m.conversation_id, m.user_id), m);
        }
        Ok(order.iter().filter_map(|k| moved.remove(k)).collect())
    }

    async fn record_last_active(
        &self,
        user: UserId,
        last_active_ms: i64,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE users SET last_active_ms = $2 WHERE id = $1 AND last_active_ms < $2",
            &[&sql(user), &last_active_ms],
        )
        .await
        .map(drop)
    }

    async fn set_presence_hidden(
        &self,
        user: UserId,
        hidden_at_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE users SET presence_hidden_at_ms = $2 WHERE id = $1",
            &[&sql(user), &hidden_at_ms],
        )
        .await
        .map(drop)
    }

    async fn stored_presence(&self, users: Vec<UserId>) -> Result<Vec<StoredPresence>, StoreError> {
        let ids: Vec<i64> = users.iter().map(|&u| sql(u)).collect();
        let rows = self
            .rows(
                "SELECT id, last_active_ms, presence_hidden_at_ms FROM users WHERE id = ANY($1)",
                &[&ids],
            )
            .await?;
        let mut found: HashMap<UserId, StoredPresence> = HashMap::with_capacity(rows.len());
        for row in &rows {
            found.insert(
                id_col(row, 0)?,
                StoredPresence {
                    last_active_ms: col(row, 1)?,
                    hidden_at_ms: col(row, 2)?,
                },
            );
        }
        Ok(users
            .iter()
            .map(|u| found.get(u).copied().unwrap_or_default())
            .collect())
    }

    async fn receipt_snapshot(
        &self,
        user: UserId,
        limit: u32,
        max_members: u32,
    ) -> Result<Vec<proto::Receipt>, StoreError> {
        // A (max_members + 1)th member marks a large conversation: at most
        // that many index entries are read for each.
        self.rows(
            "SELECT other.conversation_id, other.user_id, other.delivered_seq, other.seen_seq
             FROM (SELECT c.id, c.last_activity_ms FROM members me
                   JOIN conversations c ON c.id = me.conversation_id
                   WHERE me.user_id = $1 AND NOT c.closed
                   ORDER BY c.last_activity_ms DESC LIMIT $2) recent
             JOIN members other ON other.conversation_id = recent.id AND other.user_id <> $1
             WHERE NOT EXISTS (SELECT 1 FROM members m WHERE m.conversation_id = recent.id
                               LIMIT 1 OFFSET $3)
             ORDER BY recent.last_activity_ms DESC, other.user_id",
            &[&sql(user), &i64::from(limit), &i64::from(max_members)],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(proto::Receipt {
                conversation_id: id_col(r, 0)?,
                user_id: id_col(r, 1)?,
                delivered_seq: id_col(r, 2)?,
                seen_seq: id_col(r, 3)?,
            })
        })
        .collect()
    }

    async fn create_media(&self, media: MediaRecord) -> Result<(), StoreError> {
        let inserted = self
            .execute(
                &format!(
                    "INSERT INTO media ({MEDIA_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                     ON CONFLICT (media_id) DO NOTHING"
                ),
                &[
                    &media.media_id,
                    &sql(media.owner),
                    &(media.media_type as i32),
                    &sql(media.size),
                    &i32::try_from(media.width).unwrap_or(i32::MAX),
                    &i32::try_from(media.height).unwrap_or(i32::MAX),
                    &&media.sha256[..],
                    &media.created_ms,
                    &media.conversation_id.map(sql),
                    &media.seq.map(sql),
                    &&media.preview[..],
                ],
            )
            .await?;
        if inserted == 0 {
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    async fn media(&self, media_id: &str) -> Result<Option<MediaRecord>, StoreError> {
        self.row(
            &format!("SELECT {MEDIA_COLUMNS} FROM media WHERE media_id = $1"),
            &[&media_id],
        )
        .await?
        .map(|row| media_from_row(&row))
        .transpose()
    }

    async fn attach_media(
        &self,
        media_id: &str,
        owner: UserId,
        conversation_id: ConversationId,
        now_ms: i64,
    ) -> Result<MediaRecord, StoreError> {
        // One statement binds it, if it is the owner's and unbound and the
        // owner is a member, or binds it again if it is bound to this
        // conversation already (a retry, which answers as the first did
        // even after the owner left); otherwise the row says why not.
        let bound = self
            .row(
                &format!(
                    "UPDATE media SET conversation_id = $3, bound_ms = $4
                     WHERE media_id = $1 AND owner_id = $2
                       AND (conversation_id = $3
                            OR (conversation_id IS NULL
                                AND EXISTS (SELECT 1 FROM members
                                            WHERE conversation_id = $3 AND user_id = $2)))
                     RETURNING {MEDIA_COLUMNS}"
                ),
                &[&media_id, &sql(owner), &sql(conversation_id), &now_ms],
            )
            .await?;
        if let Some(row) = bound {
            return media_from_row(&row);
        }
        match self.media(media_id).await? {
            Some(media) if media.owner == owner => match media.conversation_id {
                Some(c) if c != conversation_id => {
                    Err(StoreError::Invalid(PHOTO_SENT_ELSEWHERE.into()))
                }
                _ => Err(StoreError::NotAMember),
            },
            _ => Err(StoreError::NotFound),
        }
    }

    async fn purge_media(
        &self,
        before_ms: i64,
        bound_before_ms: i64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let bound_before_ms = bound_before_ms.min(before_ms);
        // Nodes purging at once delete each row once: the loser's DELETE
        // finds it gone (or waits for the winner's lock, then skips it).
        // The outer conditions are checked again on the row as it is once
        // locked: a send that bound it, or stored it, meanwhile keeps it.
        // Bound at or after its upload, and `bound_before_ms` is at most
        // `before_ms`, so `created_ms` bounds the index range either way.
        let rows = self
            .rows(
                "DELETE FROM media WHERE media_id IN
                 (SELECT media_id FROM media
                  WHERE seq IS NULL AND created_ms < $1
                    AND (conversation_id IS NULL OR bound_ms < $2)
                  LIMIT $3)
                   AND seq IS NULL AND (conversation_id IS NULL OR bound_ms < $2)
                 RETURNING media_id",
                &[&before_ms, &bound_before_ms, &i64::from(limit)],
            )
            .await?;
        rows.iter().map(|row| col(row, 0)).collect()
    }

    async fn media_present(&self, media_ids: Vec<String>) -> Result<Vec<String>, StoreError> {
        let rows = self
            .rows(
                "SELECT media_id FROM media WHERE media_id = ANY($1::text[])",
                &[&media_ids],
            )
            .await?;
        rows.iter().map(|row| col(row, 0)).collect()
    }

    async fn set_push(
        &self,
        token_hash: [u8; 32],
        device: Option<PushDevice>,
    ) -> Result<bool, StoreError> {
        let (app_id, token, registered_ms) = match device {
            Some(d) => (Some(d.app_id), Some(d.token), Some(d.registered_ms)),
            None => (None, None, None),
        };
        let mut client = self.client().await?;
        let lock = client.prepare_cached(LOCK_PUSH_TOKEN).await.map_err(pg)?;
        let live = client
            .prepare_cached(
                "SELECT 1 FROM sessions WHERE token_hash = $1 AND revoked_at_ms IS NULL
                 FOR UPDATE",
            )
            .await
            .map_err(pg)?;
        let clear = client
            .prepare_cached(
                "UPDATE sessions SET push_app_id = NULL, push_token = NULL,
                                     push_registered_ms = NULL
                 WHERE push_token = $3 AND push_app_id = $2 AND token_hash <> $1",
            )
            .await
            .map_err(pg)?;
        let set = client
            .prepare_cached(
                "UPDATE sessions SET push_app_id = $2, push_token = $3, push_registered_ms = $4
                 WHERE token_hash = $1",
            )
            .await
            .map_err(pg)?;
        let tx = client.transaction().await.map_err(pg)?;
        let token_hash = &token_hash[..];
        // Registrations of one token wait for each other, so two sessions
        // taking it at once end with one holding it (each would clear the
        // others as its snapshot shows them, missing the other's).
        if let (Some(app_id), Some(token)) = (&app_id, &token) {
            tx.execute(&lock, &[app_id, token]).await.map_err(pg)?;
        }
        // The session's row locked: a logout waits for this, or this sees
        // it and takes the token from nobody.
        if tx
            .query_opt(&live, &[&token_hash])
            .await
            .map_err(pg)?
            .is_none()
        {
            return Ok(false);
        }
        if token.is_some() {
            tx.execute(&clear, &[&token_hash, &app_id, &token])
                .await
                .map_err(pg)?;
        }
        tx.execute(&set, &[&token_hash, &app_id, &token, &registered_ms])
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(true)
    }

    async fn push_devices(&self, user: UserId, now_ms: i64) -> Result<Vec<PushDevice>, StoreError> {
        let rows = self
            .rows(
                "SELECT push_app_id, push_token, push_registered_ms FROM sessions
                 WHERE user_id = $1 AND push_token IS NOT NULL
                   AND revoked_at_ms IS NULL AND expires_at_ms > $2",
                &[&sql(user), &now_ms],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(PushDevice {
                    app_id: col(row, 0)?,
                    token: col(row, 1)?,
                    registered_ms: col(row, 2)?,
                })
            })
            .collect()
    }

    async fn drop_push_token(
        &self,
        app_id: String,
        token: String,
        registered_by_ms: i64,
    ) -> Result<u64, StoreError> {
        self.execute(
            "UPDATE sessions SET push_app_id = NULL, push_token = NULL, push_registered_ms = NULL
             WHERE push_token = $1 AND push_app_id = $2 AND push_registered_ms <= $3",
            &[&token, &app_id, &registered_by_ms],
        )
        .await
    }

    async fn unread_conversations(&self, user: UserId, cap: u32) -> Result<u32, StoreError> {
        let row = self
            .one(
                "SELECT count(*) FROM (
                     SELECT 1 FROM members me JOIN conversations c ON c.id = me.conversation_id
                     LEFT JOIN cleared_histories k
                       ON k.user_id = me.user_id AND k.conversation_id = me.conversation_id
                     WHERE me.user_id = $1
                       AND c.last_seq > GREATEST(me.seen_seq, COALESCE(k.cleared_seq, 0))
                       AND EXISTS (SELECT 1 FROM messages u
                                   WHERE u.conversation_id = c.id
                                     AND u.seq > GREATEST(me.seen_seq, COALESCE(k.cleared_seq, 0))
                                     AND u.sender_id <> $1
                                     AND u.type NOT IN (5, 6, 7) -- MESSAGE_TYPE_REACTION, _EDIT, _UNSEND
                                     AND NOT u.unsent
                                  )
                     LIMIT $2) unread",
                &[&sql(user), &i64::from(cap)],
            )
            .await?;
        let n: i64 = col(&row, 0)?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

/// The message a row's LEFT JOIN found from column `at` on, if it found one.
fn joined_message(row: &Row, at: usize) -> Result<Option<proto::Message>, StoreError> {
    match col::<Option<i64>>(row, at)? {
        Some(_) => message_from_row(row, at).map(Some),
        None => Ok(None),
    }
}

/// A [`Membership`] from a row of the last readable seq and the joined seq.
fn membership_from(row: &Row) -> Result<Membership, StoreError> {
    Ok(Membership {
        last_seq: id_col(row, 0)?,
        joined_seq: id_col(row, 1)?,
    })
}

/// The columns [`media_from_row`] reads.
const MEDIA_COLUMNS: &str = "media_id, owner_id, media_type, size, width, height, sha256, created_ms, conversation_id, seq, preview";

fn media_from_row(row: &Row) -> Result<MediaRecord, StoreError> {
    let sha256: &[u8] = col(row, 6)?;
    let preview: &[u8] = col(row, 10)?;
    Ok(MediaRecord {
        media_id: col(row, 0)?,
        owner: id_col(row, 1)?,
        media_type: proto::MediaType::try_from(col::<i32>(row, 2)?)
            .unwrap_or(proto::MediaType::Unspecified),
        size: id_col(row, 3)?,
        width: u32::try_from(col::<i32>(row, 4)?).unwrap_or(0),
        height: u32::try_from(col::<i32>(row, 5)?).unwrap_or(0),
        sha256: sha256.try_into().unwrap_or([0; 32]),
        preview: bytes::Bytes::copy_from_slice(preview),
        created_ms: col(row, 7)?,
        conversation_id: col::<Option<i64>>(row, 8)?.map(id),
        seq: col::<Option<i64>>(row, 9)?.map(id),
    })
}

/// Stored messages with the keys of a batch, and the other members of each
/// one's conversation still owed it (a retry answers with the original, and
/// delivers it again to them), those removed since (or by it) not told yet
/// included: the repeat of a removal whose first answer was lost before
/// its fan-out is how the removed member's connected device hears of it.
const EXISTING_KEYS: &str = "
    SELECT m.conversation_id, m.seq, m.message_id, m.sender_id, m.client_msg_id,
           m.type, m.sent_at_ms, m.body, m.attachment, m.reply_to, m.unsent,
           ARRAY(SELECT x.user_id FROM members x
                 WHERE x.conversation_id = m.conversation_id AND x.delivered_seq < m.seq
                   AND x.user_id <> m.sender_id
                 UNION
                 SELECT d.user_id FROM departures d
                 WHERE d.conversation_id = m.conversation_id AND d.seq >= m.seq
                   AND d.delivered_seq < m.seq AND d.user_id <> m.sender_id
                 ORDER BY user_id)
    FROM unnest($1::bigint[], $2::text[]) AS k(sender_id, client_msg_id)
    JOIN messages m ON m.sender_id = k.sender_id AND m.client_msg_id = k.client_msg_id";

/// The current transaction's id (assigning one), with its epoch.
const TRANSACTION_ID: &str = "SELECT txid_current()";

/// The current transaction's id if it has written (or locked) anything.
const ASSIGNED_TRANSACTION_ID: &str = "SELECT txid_current_if_assigned()";

/// `committed`, `aborted`, `in progress`, or NULL when too old to know.
const TRANSACTION_STATUS: &str = "SELECT txid_status($1)";

/// Ends the backend that still runs transaction `$1` (`backend_xid` is
/// the id without its epoch), so that its outcome is settled.
const END_TRANSACTION: &str = "
    SELECT pg_terminate_backend(pid) FROM pg_stat_activity
    WHERE backend_xid::text::bigint = $1::bigint % 4294967296 AND pid <> pg_backend_pid()";

/// Every member of the batch's conversations.
const MEMBERS_OF: &str = "
    SELECT conversation_id, user_id FROM members
    WHERE conversation_id = ANY($1::bigint[]) ORDER BY conversation_id, user_id";

/// Who hears of watermark moves in each conversation: its members, but
/// nobody in a closed direct conversation (the two are not friends any
/// more, and neither is told the other's receipts).
const RECEIPT_AUDIENCE: &str = "
    SELECT m.conversation_id, m.user_id FROM members m
    JOIN conversations c ON c.id = m.conversation_id AND NOT c.closed
    WHERE m.conversation_id = ANY($1::bigint[]) ORDER BY m.conversation_id, m.user_id";

/// Locks the batch's conversations in id order (so that concurrent
/// batches touching several conversations cannot deadlock) and reads the
/// last seq as of the lock. NO KEY UPDATE is the lock an UPDATE of
/// non-key columns takes: it does not block foreign-key checks.
const LOCK_CONVERSATIONS: &str = "
    SELECT id, last_seq, closed FROM conversations WHERE id = ANY($1::bigint[])
    ORDER BY id FOR NO KEY UPDATE";

/// Locks member rows in (conversation, user) order before they are
/// updated, in `append` and in `advance_watermarks` alike: a single UPDATE
/// locks rows in whatever order its plan visits them. `conversation_id =
/// ANY` lets the plan find them by key, as in [`BUMP_SEQS`].
const LOCK_MEMBERS: &str = "
    SELECT conversation_id, user_id FROM members
    WHERE (conversation_id, user_id) IN (SELECT * FROM unnest($1::bigint[], $2::bigint[]))
      AND conversation_id = ANY($1::bigint[])
    ORDER BY conversation_id, user_id FOR NO KEY UPDATE";

/// Removed members' devices acknowledged up to `$3`: each departure moves
/// forward, and is gone once the removal itself is acknowledged (the two
/// statements touch different rows).
const ACK_DEPARTURES: &str = "
    WITH u AS (
        SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[])
            AS u(conversation_id, user_id, delivered)
    ), gone AS (
        DELETE FROM departures d USING u
        WHERE d.conversation_id = u.conversation_id AND d.user_id = u.user_id
          AND d.seq <= u.delivered
    )
    UPDATE departures d SET delivered_seq = GREATEST(d.delivered_seq, u.delivered)
    FROM u
    WHERE d.conversation_id = u.conversation_id AND d.user_id = u.user_id
      AND d.seq > u.delivered";

/// Moves each conversation's last seq and activity time (never back: a
/// clock stepped back must not reorder the conversation list, and SQLite
/// keeps the later too). `c.id = ANY`
/// makes the plan find the rows by key: joined to `unnest` alone, the
/// cached generic plan scanned the whole table whenever it was small (a
/// benchmark's 2,500 conversations, ~400 scans a second at 10,000 sends/s,
/// reading dead row versions too until vacuum).
const BUMP_SEQS: &str = "
    UPDATE conversations c
    SET last_seq = u.last_seq, last_activity_ms = GREATEST(c.last_activity_ms, u.activity)
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS u(id, last_seq, activity)
    WHERE c.id = u.id AND c.id = ANY($1::bigint[])";

/// Inserts the batch's new messages in one statement. A key committed by
/// a concurrent call since our read is skipped, not an error; the caller
/// notices the missing row and starts over.
const INSERT_MESSAGES: &str = "
    INSERT INTO messages (conversation_id, seq, sender_id, client_msg_id, type, sent_at_ms, body,
                          attachment, reply_to)
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[],
                         $5::int4[], $6::bigint[], $7::text[], $8::bytea[], $9::bigint[])
    ON CONFLICT (sender_id, client_msg_id) DO NOTHING
    RETURNING conversation_id, seq, message_id";

/// Records on each upload the seq of the new message that carries it (in
/// the append's transaction: rolled back, the upload stays unsent, for the
/// purge).
const PHOTOS_SENT: &str = "
    UPDATE media SET seq = u.seq
    FROM unnest($1::text[], $2::bigint[]) AS u(id, seq)
    WHERE media.media_id = u.id";

/// The messages a batch's edits and unsends name (`$1`, `$2`: their
/// conversations and seqs): whether each is unsent, for a photo its
/// attachment (the upload to take off it), its type and author.
const TARGETS: &str = "
    SELECT t.conversation_id, t.seq, t.unsent, t.attachment, t.type, t.sender_id
    FROM unnest($1::bigint[], $2::bigint[]) AS u(conversation_id, seq)
    JOIN messages t ON t.conversation_id = u.conversation_id AND t.seq = u.seq";

/// Erases the messages a batch unsends (`$1`, `$2` as in [`TARGETS`]).
const ERASE_MESSAGES: &str = "
    UPDATE messages m SET body = '', attachment = NULL, unsent = true
    FROM unnest($1::bigint[], $2::bigint[]) AS u(conversation_id, seq)
    WHERE m.conversation_id = u.conversation_id AND m.seq = u.seq";

/// Erases the EDITs of the messages a batch unsends (by the partial index
/// `messages_edits`).
const ERASE_EDITS: &str = "
    UPDATE messages m SET body = '', unsent = true
    FROM unnest($1::bigint[], $2::bigint[]) AS u(conversation_id, seq)
    WHERE m.conversation_id = u.conversation_id AND m.reply_to = u.seq
      AND m.type = 6 -- MESSAGE_TYPE_EDIT";

/// Takes the uploads of unsent photos off their messages (`$1`, `$2`: the
/// uploads and the seqs of the messages unsent; an upload sent again
/// later in its conversation carries the later one): only their
/// uploaders may fetch them, and the purge deletes them.
const DETACH_PHOTOS: &str = "
    UPDATE media SET seq = NULL
    FROM unnest($1::text[], $2::bigint[]) AS u(id, seq)
    WHERE media.media_id = u.id AND media.seq = u.seq";

/// Moves a sender's watermarks over their own run of messages, each one
/// only if it was caught up (equal to the last seq before the batch).
/// `conversation_id = ANY` as in [`BUMP_SEQS`].
const OWN_WATERMARKS: &str = "
    UPDATE members m SET
        delivered_seq = CASE WHEN m.delivered_seq = u.caught_up_at THEN u.moved_to
                             ELSE m.delivered_seq END,
        seen_seq = CASE WHEN m.seen_seq = u.caught_up_at THEN u.moved_to
                        ELSE m.seen_seq END
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[])
         AS u(conversation_id, user_id, caught_up_at, moved_to)
    WHERE m.conversation_id = u.conversation_id AND m.user_id = u.user_id
      AND m.conversation_id = ANY($1::bigint[])
      AND (m.delivered_seq = u.caught_up_at OR m.seen_seq = u.caught_up_at)";

/// Moves watermarks forward only, clamped to the conversation's last seq;
/// returns the rows that moved (their conversations' members come from
/// [`MEMBERS_OF`], once per conversation: a subquery per row read and sent
/// a large group's whole list for every member's ack).
/// `c.id = ANY` for the same reason as in [`BUMP_SEQS`].
const ADVANCE: &str = "
    UPDATE members m SET
        delivered_seq = GREATEST(m.delivered_seq, LEAST(u.delivered, c.last_seq)),
        seen_seq = GREATEST(m.seen_seq, LEAST(u.seen, c.last_seq))
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[])
             AS u(conversation_id, user_id, delivered, seen)
         JOIN conversations c ON c.id = u.conversation_id
    WHERE c.id = ANY($1::bigint[])
      AND m.conversation_id = u.conversation_id AND m.user_id = u.user_id
      AND (m.delivered_seq < LEAST(u.delivered, c.last_seq)
           OR m.seen_seq < LEAST(u.seen, c.last_seq))
    RETURNING m.conversation_id, m.user_id, m.delivered_seq, m.seen_seq";

/// Conversations as one member sees them: the row, the unread count
/// (others' messages above the viewer's seen watermark, counted up to
/// `$4`, `MAX_UNREAD_COUNT`) and the newest message with its text cut to
/// the preview length.
const VIEWS: &str = "
    SELECT c.id, c.kind, c.name, c.last_seq, c.last_activity_ms,
           (SELECT count(*) FROM (SELECT 1 FROM messages u
                                  WHERE u.conversation_id = c.id
                                    AND u.seq > GREATEST(me.seen_seq, COALESCE(k.cleared_seq, 0))
                                    AND u.sender_id <> me.user_id
                                    AND u.type NOT IN (5, 6, 7) -- MESSAGE_TYPE_REACTION, _EDIT, _UNSEND
                                    AND NOT u.unsent
                                  LIMIT $4) unread),
           lm.conversation_id, lm.seq, lm.message_id, lm.sender_id, lm.client_msg_id,
           lm.type, lm.sent_at_ms, left(lm.body, $3), lm.attachment, lm.reply_to, lm.unsent,
           c.closed,
           (SELECT until_ms FROM mutes WHERE user_id = $2 AND conversation_id = c.id)
    FROM conversations c
    JOIN members me ON me.conversation_id = c.id AND me.user_id = $2
    LEFT JOIN cleared_histories k ON k.user_id = $2 AND k.conversation_id = c.id
    LEFT JOIN messages lm ON lm.conversation_id = c.id AND lm.seq = c.last_seq
                         AND c.last_seq > COALESCE(k.cleared_seq, 0)
    WHERE c.id = ANY($1::bigint[])";

/// The list entries of groups `$2` left or was removed from, of the ids
/// `$1`: the last stay's end, unless they are a member again, with the
/// message that ended it (its text cut to `$3`).
const FORMER_VIEWS: &str = "
    SELECT f.conversation_id, c.kind, COALESCE(NULLIF(f.name, ''), c.name), f.left_seq, f.left_ms,
           lm.conversation_id, lm.seq, lm.message_id, lm.sender_id, lm.client_msg_id,
           lm.type, lm.sent_at_ms, left(lm.body, $3), lm.attachment, lm.reply_to, lm.unsent
    FROM former_members f
    JOIN conversations c ON c.id = f.conversation_id
    LEFT JOIN messages lm ON lm.conversation_id = f.conversation_id AND lm.seq = f.left_seq
    WHERE f.user_id = $2 AND f.conversation_id = ANY($1::bigint[])
      AND NOT EXISTS (SELECT 1 FROM members m
                      WHERE m.conversation_id = f.conversation_id AND m.user_id = $2)
      AND NOT EXISTS (SELECT 1 FROM former_members g
                      WHERE g.user_id = $2 AND g.conversation_id = f.conversation_id
                        AND g.joined_seq > f.joined_seq)";

/// Reads of a conversation-list page at most, when entries change
/// membership while it is read ([`PostgresStore::conversations`]).
const LIST_ROUNDS: usize = 4;

/// A page of `$1`'s conversations below (`$2` ms, id `$4`), `$3` at most,
/// newest first, with the time each is ordered by and whether it is a
/// group they left: the end of their last stay there, unless they are a
/// member again, is listed as of their leaving; a conversation they deleted
/// is not, until a message after it comes. A stay an older node ended
/// during a rolling upgrade has no time (nor name: [`FORMER_VIEWS`] takes
/// the group's) and takes that of the message that ended it.
const LIST_CONVERSATIONS: &str = "
    SELECT id, at, former FROM (
        SELECT c.id AS id, c.last_activity_ms AS at, false AS former
        FROM members m JOIN conversations c ON c.id = m.conversation_id
        WHERE m.user_id = $1
          AND NOT EXISTS (SELECT 1 FROM cleared_histories k
                          WHERE k.user_id = $1 AND k.conversation_id = c.id
                            AND k.cleared_seq >= c.last_seq)
        UNION ALL
        SELECT f.conversation_id,
               CASE WHEN f.left_ms > 0 THEN f.left_ms
                    ELSE COALESCE((SELECT sent_at_ms FROM messages
                                   WHERE conversation_id = f.conversation_id
                                     AND seq = f.left_seq), 0) END,
               true
        FROM former_members f
        WHERE f.user_id = $1
          AND NOT EXISTS (SELECT 1 FROM members m
                          WHERE m.conversation_id = f.conversation_id AND m.user_id = $1)
          AND NOT EXISTS (SELECT 1 FROM former_members g
                          WHERE g.user_id = $1 AND g.conversation_id = f.conversation_id
                            AND g.joined_seq > f.joined_seq)) listed
    WHERE (at, id) < ($2, $4)
    ORDER BY at DESC, id DESC LIMIT $3";

/// Members of conversations with their names and watermarks.
const MEMBER_STATES: &str = "
    SELECT m.conversation_id, m.user_id, u.username, m.delivered_seq, m.seen_seq, m.role,
           m.joined_seq
    FROM members m JOIN users u ON u.id = m.user_id
    WHERE m.conversation_id = ANY($1::bigint[]) ORDER BY m.conversation_id, m.user_id";

/// Serialises friendship changes of one pair of users (transaction-scoped
/// advisory lock; the single-bigint key space is ours alone). Advisory
/// locks are per database, so the key names the schema: deployments (or
/// tests) in other schemas of the same database have their own users 1
/// and 2, and used to wait for each other's.
/// A push token's lock, per schema as [`LOCK_PAIR`]: `$1` the app id, `$2`
/// the token.
const LOCK_PUSH_TOKEN: &str = "
    SELECT pg_advisory_xact_lock(
        hashtextextended(current_schema() || ' push ' || $1 || ' ' || $2, 0))";

const LOCK_PAIR: &str = "
    SELECT pg_advisory_xact_lock(
        hashtextextended(current_schema() || ' friends ' || LEAST($1::bigint, $2::bigint)
                         || ' ' || GREATEST($1::bigint, $2::bigint), 0))";

/// Both users' friend-count locks, the lower id first (Postgres evaluates
/// a select list in order), so two requests never wait for each other's;
/// per schema, as [`LOCK_PAIR`].
const LOCK_FRIEND_COUNTS: &str = "
    SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || ' friend counts ' || LEAST($1::bigint, $2::bigint), 0)),
           pg_advisory_xact_lock(hashtextextended(current_schema() || ' friend counts ' || GREATEST($1::bigint, $2::bigint), 0))";

/// One history page, newest first below a seq, or oldest first above one.
const PAGE_BEFORE: &str = "
    SELECT conversation_id, seq, message_id, sender_id, client_msg_id, type, sent_at_ms, body,
           attachment, reply_to, unsent
    FROM messages WHERE conversation_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3";
const PAGE_AFTER: &str = "
    SELECT conversation_id, seq, message_id, sender_id, client_msg_id, type, sent_at_ms, body,
           attachment, reply_to, unsent
    FROM messages WHERE conversation_id = $1 AND seq > $2 ORDER BY seq ASC LIMIT $3";

const TAKE_REQUEST: &str = "DELETE FROM friend_requests WHERE from_id = $1 AND to_id = $2";

/// A user's friends, requests waiting for their answer, and requests they
/// sent.
const FRIEND_COUNTS: &str = "
    SELECT (SELECT count(*) FROM friends WHERE user_id = $1),
           (SELECT count(*) FROM friend_requests WHERE to_id = $1),
           (SELECT count(*) FROM friend_requests WHERE from_id = $1)";

/// Whether `$1` blocked `$2`, and whether `$2` blocked `$1`.
const BLOCKS: &str = "
    SELECT EXISTS(SELECT 1 FROM blocks WHERE user_id = $1 AND blocked_id = $2),
           EXISTS(SELECT 1 FROM blocks WHERE user_id = $2 AND blocked_id = $1)";

/// A user's friends (0), incoming (1) and outgoing (2) requests and
/// blocked users (3), each list in its order: friends and blocked users by
/// name, requests oldest first.
const FRIEND_LISTS: &str = "
    SELECT 0 AS kind, u.id, u.username, u.username COLLATE \"C\" AS by_name, 0::BIGINT AS at
      FROM friends f JOIN users u ON u.id = f.friend_id WHERE f.user_id = $1
    UNION ALL
    SELECT 1, u.id, u.username, '', r.created_at_ms
      FROM friend_requests r JOIN users u ON u.id = r.from_id WHERE r.to_id = $1
    UNION ALL
    SELECT 2, u.id, u.username, '', r.created_at_ms
      FROM friend_requests r JOIN users u ON u.id = r.to_id WHERE r.from_id = $1
    UNION ALL
    SELECT 3, u.id, u.username, u.username, 0
      FROM blocks b JOIN users u ON u.id = b.blocked_id WHERE b.user_id = $1
    ORDER BY kind, by_name, at, id";

const ARE_FRIENDS: &str =
    "SELECT EXISTS(SELECT 1 FROM friends WHERE user_id = $1 AND friend_id = $2)";

/// Both directions of a friendship, and their direct conversation (`$4`:
/// its key), if they have one, open again.
const MAKE_FRIENDS: &str = "
    WITH f AS (
        INSERT INTO friends (user_id, friend_id, since_ms) VALUES ($1, $2, $3), ($2, $1, $3)
        ON CONFLICT DO NOTHING
    )
    UPDATE conversations SET closed = false WHERE direct_key = $4";

/// Ends a friendship and the pending requests between two users, inside
/// a transaction that holds their pair's lock (`LOCK_PAIR`).
struct EndFriendship {
    close_direct: tokio_postgres::Statement,
    delete: tokio_postgres::Statement,
}

impl EndFriendship {
    async fn prepare(client: &deadpool_postgres::Object) -> Result<Self, StoreError> {
        let close_direct = client.prepare_cached(CLOSE_DIRECT).await.map_err(pg)?;
        let delete = client
            .prepare_cached(
                "WITH f AS (
                    DELETE FROM friends WHERE (user_id = $1 AND friend_id = $2)
                                           OR (user_id = $2 AND friend_id = $1)
                    RETURNING 1
                 ), r AS (
                    DELETE FROM friend_requests WHERE (from_id = $1 AND to_id = $2)
                                                   OR (from_id = $2 AND to_id = $1)
                    RETURNING 1
                 )
                 SELECT (SELECT count(*) FROM f) + (SELECT count(*) FROM r)",
            )
            .await
            .map_err(pg)?;
        Ok(Self {
            close_direct,
            delete,
        })
    }

    /// True if there was a friendship or a request. Closes the pair's
    /// direct conversation first, taking its row's lock as a group commit
    /// does: a send being stored there commits first, and a later one
    /// reads `closed` and is refused (see `append_once`). The order
    /// matters: a group change holding its group's row may wait for the
    /// friends rows deleted next (`group::check_friends` takes KEY SHARE),
    /// and a group commit holding this conversation's row may wait for the
    /// group's; deleting first and then waiting for this row would close
    /// that cycle. A removal waiting behind a group change holds the
    /// conversation's sends for that change's transaction.
    async fn run(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        a: UserId,
        b: UserId,
    ) -> Result<bool, StoreError> {
        let closed = true;
        tx.execute(&self.close_direct, &[&direct_key(a, b), &closed])
            .await
            .map_err(pg)?;
        let row = tx
            .query_one(&self.delete, &[&sql(a), &sql(b)])
            .await
            .map_err(pg)?;
        Ok(col::<i64>(&row, 0)? > 0)
    }
}

/// Sets whether the direct conversation with key `$1` is closed (`$2`):
/// true when its two users stop being friends, false when they become
/// friends again.
const CLOSE_DIRECT: &str = "UPDATE conversations SET closed = $2 WHERE direct_key = $1";

/// Why the first connection or the migrations failed.
enum MigrateError {
    /// The server could not be reached or refused us: retryable.
    Connect(String),
    /// Reached, but the schema could not be brought up to date.
    Failed(String),
}

/// Applies pending migrations on a dedicated connection, under an advisory
/// lock keyed by the schema so that nodes starting together take turns.
async fn migrate(config: &Config, schema: Option<&str>) -> Result<(), MigrateError> {
    // The connect timeout in the config covers the TCP connect only; this
    // one also covers startup and authentication.
    let (mut client, connection) =
        match tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls)).await {
            Ok(Ok(connected)) => connected,
            Ok(Err(e)) => return Err(MigrateError::Connect(error_chain(&e))),
            Err(_) => {
                return Err(MigrateError::Connect(format!(
                    "no answer within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )));
            }
        };
    let connection = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %error_chain(&e), "postgres migration connection ended");
        }
    });
    let result = async {
        let failed = |what: &str, e: tokio_postgres::Error| {
            MigrateError::Failed(format!("{what}: {}", error_chain(&e)))
        };
        // Migrations may take longer than any statement on the hot path.
        client
            .batch_execute("SET statement_timeout = 0")
            .await
            .map_err(|e| failed("session setup", e))?;
        let lock_key = format!("chat-server migrations {}", schema.unwrap_or("(default)"));
        client
            .execute(
                "SELECT pg_advisory_lock(hashtextextended($1, 0))",
                &[&lock_key],
            )
            .await
            .map_err(|e| failed("migration lock", e))?;
        if let Some(schema) = schema {
            // Checked by the caller: needs no quoting beyond this.
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; SET search_path TO \"{schema}\""
                ))
                .await
                .map_err(|e| failed("create schema", e))?;
        }
        let report = embedded::migrations::runner()
            .set_grouped(true)
            .run_async(&mut client)
            .await
            .map_err(|e| MigrateError::Failed(format!("migration failed: {e}")))?;
        for migration in report.applied_migrations() {
            tracing::info!(
                version = migration.version(),
                name = migration.name(),
                schema = schema.unwrap_or("(default)"),
                "applied Postgres migration"
            );
        }
        client
            .execute(
                "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
                &[&lock_key],
            )
            .await
            .map_err(|e| failed("migration unlock", e))?;
        Ok(())
    }
    .await;
    // Closing the connection also releases the lock if unlocking failed.
    drop(client);
    let _ = connection.await;
    result
}

/// Maps a database error: lost connections, timeouts, shutdowns, resource
/// limits, serialization failures and deadlocks are `Unavailable` (a retry
/// may work); anything else is `Internal`. Unique violations are mapped to
/// `Conflict` by the calls whose contract says so, before this.
/// Whether Postgres failed the statement to break a deadlock.
fn is_deadlock(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED)
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    let detail = format!("postgres: {}", error_chain(&e));
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        let transient = code.starts_with("08") // connection exception
            || code.starts_with("53") // insufficient resources
            || code.starts_with("57P") // admin / crash shutdown, cannot connect now
            || code == "57014" // query canceled (statement timeout)
            || code == "40001" // serialization failure
            || code == "40P01" // deadlock detected
            || code == "55P03" // lock not available
            || code == "25P03"; // idle-in-transaction timeout
        return if transient {
            StoreError::Unavailable(detail)
        } else {
            StoreError::Internal(detail)
        };
    }
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    let text = e.to_string();
    if e.is_closed()
        || io
        || text.starts_with("error connecting")
        || text.starts_with("timeout")
        || text.starts_with("error communicating")
    {
        StoreError::Unavailable(detail)
    } else {
        StoreError::Internal(detail)
    }
}

/// An error and its causes, joined by ": " (tokio-postgres puts the useful
/// part, such as the server's message, in the source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// `host:port/database` for every host of the config, without user or
/// password.
fn describe_target(config: &Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "(no host)".to_owned()
    } else {
        hosts.join(",")
    };
    format!("{hosts}/{}", config.get_dbname().unwrap_or("(default)"))
}

/// Lower-case identifiers only, so a schema name never needs escaping in
/// SQL or in the `options` startup parameter.
fn valid_schema_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn col<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx)
        .map_err(|e| StoreError::Internal(format!("postgres: column {idx}: {}", error_chain(&e))))
}

/// Ids and seqs are stored as BIGINT and never negative.
fn id_col(row: &Row, idx: usize) -> Result<u64, StoreError> {
    col::<i64>(row, idx).map(id)
}

fn id(v: i64) -> u64 {
    v as u64
}

/// Postgres integers are signed. Ids and seqs never reach 2^63, but a
/// cursor from the network may: it saturates (past everything) rather than
/// wrapping to a negative number that would read as before everything.
fn sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A message from ten columns starting at `at`: conversation_id, seq,
/// message_id, sender_id, client_msg_id, type, sent_at_ms, body,
/// attachment, reply_to, unsent.
fn message_from_row(row: &Row, at: usize) -> Result<proto::Message, StoreError> {
    let mut message = proto::Message {
        conversation_id: id_col(row, at)?,
        seq: id_col(row, at + 1)?,
        message_id: id_col(row, at + 2)?,
        sender_id: id_col(row, at + 3)?,
        client_msg_id: col(row, at + 4)?,
        r#type: col(row, at + 5)?,
        sent_at_ms: col(row, at + 6)?,
        text: col(row, at + 7)?,
        photo: None,
        call: None,
        reply_to_seq: col::<Option<i64>>(row, at + 9)?.unwrap_or_default() as u64,
        unsent: col(row, at + 10)?,
    };
    crate::store::decode_attachment(&mut message, col::<Option<&[u8]>>(row, at + 8)?);
    Ok(message)
}

/// Makes a connection fail, rather than wait for good, when its network
/// path dies silently (see [`KEEPALIVE_IDLE`] and [`TCP_USER_TIMEOUT`]);
/// the call then fails or settles as after any lost connection.
fn watch_dead_paths(config: &mut Config) {
    config
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES)
        .tcp_user_timeout(TCP_USER_TIMEOUT);
}

/// Test support (the store's tests and the end-to-end tests): not in a
/// server built without the `test-support` feature.
#[cfg(any(test, feature = "test-support"))]
pub mod cutter;
mod group;

/// What a pooled connection runs with, as read back after connecting.
struct SessionSettings {
    schema: Option<String>,
    synchronous_commit: String,
    isolation: String,
}

impl SessionSettings {
    /// Why the store cannot run on such a connection, if it cannot.
    fn check(&self, schema: Option<&str>) -> Result<(), String> {
        const DROPPED: &str = "is a pooler dropping the `options` startup parameter?";
        if let Some(schema) = schema
            && self.schema.as_deref() != Some(schema)
        {
            return Err(format!(
                "search_path is {:?}, not {schema:?}; {DROPPED}",
                self.schema
            ));
        }
        // `on`, `remote_write`, `remote_apply` and `local` all wait for
        // the local flush; `off` does not.
        if self.synchronous_commit == "off" {
            return Err(format!(
                "synchronous_commit is off, so a COMMIT could be answered before \
                 it is durable; {DROPPED}"
            ));
        }
        if self.isolation != "read committed" {
            return Err(format!(
                "default_transaction_isolation is {:?}, not \"read committed\"; {DROPPED}",
                self.isolation
            ));
        }
        Ok(())
    }
}

/// Helpers for tests that need a real Postgres: the URL, unique schemas
/// and clean-up. Public so the end-to-end harness follows the same rules.
pub mod testing {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio_postgres::NoTls;

    /// Where tests find Postgres unless `CHAT_TEST_POSTGRES_URL` says
    /// otherwise (trust authentication, no password).
    pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

    /// `CHAT_TEST_POSTGRES_URL` or [`DEFAULT_URL`].
    pub fn url() -> String {
        std::env::var("CHAT_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
    }

    /// A schema name no other test, run or process uses.
    pub fn fresh_schema() -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        format!(
            "chat_test_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        )
    }

    /// What [`admin`] returns, for tests that pass it around.
    pub type Admin = tokio_postgres::Client;

    /// A plain connection outside any store, for setup and inspection.
    pub async fn admin() -> Result<Admin, String> {
        let url = url();
        let connect = tokio_postgres::connect(&url, NoTls);
        let (client, connection) = tokio::time::timeout(super::CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| "postgres: connect timed out".to_string())?
            .map_err(|e| format!("postgres: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Drops a test schema with everything in it, in bounded time. The
    /// test's server may still hold a transaction open in it (a test
    /// runtime that stopped polling mid-commit), and so may a test's own
    /// connection (an [`admin`] transaction holding a lock when its test
    /// failed): their sessions, found by the server's application name or
    /// by the locks they hold on the schema or its tables, are ended (each
    /// waited for up to 5 s) rather than waited on, and a DROP that still
    /// finds a lock taken (a session that took it meanwhile) gives up
    /// after `lock_timeout` and is tried again, 10 times at most.
    pub async fn drop_schema(schema: &str) -> Result<(), String> {
        const TRIES: usize = 10;
        let admin = admin().await?;
        admin
            .batch_execute("SET lock_timeout = '3s'; SET statement_timeout = '30s'")
            .await
            .map_err(|e| format!("set timeouts: {e}"))?;
        let server = format!("{} {schema}", super::APPLICATION_NAME);
        let mut tried = 0;
        loop {
            tried += 1;
            admin
                .execute(
                    "SELECT pg_terminate_backend(a.pid, 5000) FROM pg_stat_activity a
                     WHERE a.pid <> pg_backend_pid()
                       AND (a.application_name = $1
                            OR a.pid IN (
                                SELECT l.pid FROM pg_locks l
                                JOIN pg_class c ON c.oid = l.relation
                                JOIN pg_namespace n ON n.oid = c.relnamespace
                                WHERE n.nspname = $2
                                  AND l.database = (SELECT oid FROM pg_database
                                                    WHERE datname = current_database())
                                UNION ALL
                                SELECT l.pid FROM pg_locks l
                                JOIN pg_namespace n ON n.oid = l.objid
                                WHERE l.locktype = 'object' AND n.nspname = $2
                                  AND l.classid = 'pg_namespace'::regclass))",
                    &[&server, &schema],
                )
                .await
                .map_err(|e| format!("end sessions of {schema}: {e}"))?;
            match admin
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e)
                    if tried < TRIES
                        && e.code()
                            == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {}
                Err(e) => return Err(format!("drop schema {schema}: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests;
