//! The presence store: who is online, on which node, as of when.
//!
//! One record per user, refreshed by heartbeats and expiring after a TTL,
//! so a node that dies without cleaning up stops claiming its users within
//! one TTL. The value carries the node id, which is what cross-node routing
//! will read. Embedded: [`MemoryPresenceStore`]. Production: a Redis key per
//! user with the same TTL (backends issue).

use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use tokio::time::Instant;

use super::{StoreError, UserId};

/// A live presence record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineRecord {
    /// The node holding the user's connection(s).
    pub node: String,
    /// Unix ms of the latest activity the node saw.
    pub last_active_ms: i64,
}

/// See the module docs.
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Short backend name for logs and metrics labels.
    fn backend(&self) -> &'static str;
    /// A cheap round trip proving the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Marks `user` online with `record`, expiring `ttl` from now unless
    /// refreshed.
    async fn refresh(
        &self,
        user: UserId,
        record: OnlineRecord,
        ttl: Duration,
    ) -> Result<(), StoreError>;
    /// Removes the record if it belongs to `node` (another node may have
    /// taken the user over meanwhile).
    async fn remove(&self, user: UserId, node: String) -> Result<(), StoreError>;
    /// Live records for `users`, in order; `None` for offline or expired.
    async fn online(&self, users: Vec<UserId>) -> Result<Vec<Option<OnlineRecord>>, StoreError>;
}

/// In-process presence store (single node).
#[derive(Default)]
pub struct MemoryPresenceStore {
    records: DashMap<UserId, (OnlineRecord, Instant)>,
}

#[async_trait]
impl PresenceStore for MemoryPresenceStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn refresh(
        &self,
        user: UserId,
        record: OnlineRecord,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.records.insert(user, (record, Instant::now() + ttl));
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn remove(&self, user: UserId, node: String) -> Result<(), StoreError> {
        self.records
            .remove_if(&user, |_, (record, _)| record.node == node);
        Ok(())
    }

    async fn online(&self, users: Vec<UserId>) -> Result<Vec<Option<OnlineRecord>>, StoreError> {
        let now = Instant::now();
        Ok(users
            .into_iter()
            .map(|user| {
                let entry = self.records.get(&user)?;
                let (record, expires) = entry.value();
                (*expires > now).then(|| record.clone())
            })
            .collect())
    }
}

/// Conformance checks every [`PresenceStore`] passes (in process and
/// Redis). Expiry runs on real time with short TTLs and is polled for.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    fn rec(node: &str, last_active_ms: i64) -> OnlineRecord {
        OnlineRecord {
            node: node.into(),
            last_active_ms,
        }
    }

    /// Refresh, lookup, expiry and node-scoped removal.
    pub(crate) async fn refresh_expire_remove(store: &impl PresenceStore) {
        let long = Duration::from_secs(60);
        let short = Duration::from_millis(300);
        store.ping().await.expect("a working store answers a ping");
        assert_eq!(store.online(vec![1, 2]).await.unwrap(), vec![None, None]);
        assert!(store.online(vec![]).await.unwrap().is_empty());
        store.refresh(1, rec("node-a", 100), long).await.unwrap();
        store.refresh(2, rec("node-b", 200), long).await.unwrap();
        assert_eq!(
            store.online(vec![2, 3, 1]).await.unwrap(),
            vec![Some(rec("node-b", 200)), None, Some(rec("node-a", 100))]
        );
        // A refresh moves the activity time (and the expiry).
        store.refresh(1, rec("node-a", 300), long).await.unwrap();
        assert_eq!(
            store.online(vec![1]).await.unwrap(),
            vec![Some(rec("node-a", 300))]
        );
        // A record that is not refreshed expires; the others stay.
        store.refresh(3, rec("node-a", 400), short).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        while store.online(vec![3]).await.unwrap()[0].is_some() {
            assert!(Instant::now() < deadline, "the record never expired");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(store.online(vec![1]).await.unwrap()[0].is_some());
        // Removal only by the owning node.
        store.remove(1, "node-b".into()).await.unwrap();
        assert!(store.online(vec![1]).await.unwrap()[0].is_some());
        store.remove(1, "node-a".into()).await.unwrap();
        assert_eq!(store.online(vec![1]).await.unwrap(), vec![None]);
        // Another node taking the user over replaces the record.
        store.refresh(2, rec("node-c", 500), long).await.unwrap();
        store.remove(2, "node-b".into()).await.unwrap();
        assert_eq!(
            store.online(vec![2]).await.unwrap(),
            vec![Some(rec("node-c", 500))]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_conformance() {
        conformance::refresh_expire_remove(&MemoryPresenceStore::default()).await;
    }
}
