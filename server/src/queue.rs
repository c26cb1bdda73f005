//! The outbound queue of one stream of one session: many producers (the
//! committers, presence, other sessions), one consumer (the stream's
//! writer).
//!
//! Not a `tokio::sync::mpsc` channel because of idle memory: a bounded
//! channel allocates its first block (32 slots) when it is created, about
//! 2.3 KB per queue and 7 KB per connection for three streams, for
//! connections that mostly sit idle. This queue holds nothing while empty
//! and gives back large buffers once drained.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::wire::Outbound;

/// Capacity kept after a drain; a queue that grew beyond it (a burst)
/// returns its buffer.
const KEEP_CAPACITY: usize = 16;

/// Why a push failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue holds its limit: the reader is too slow.
    Full,
    /// The queue was closed.
    Closed,
}

#[derive(Default)]
struct State {
    items: VecDeque<Outbound>,
    closed: bool,
}

/// See the module docs.
#[derive(Default)]
pub struct OutQueue {
    state: Mutex<State>,
    ready: Notify,
}

impl OutQueue {
    /// Appends `out` unless the queue already holds `limit` frames or is
    /// closed. Never waits.
    pub fn push(&self, out: Outbound, limit: usize) -> Result<(), PushError> {
        {
            let mut state = self.state.lock().expect("queue lock");
            if state.closed {
                return Err(PushError::Closed);
            }
            if state.items.len() >= limit {
                return Err(PushError::Full);
            }
            state.items.push_back(out);
        }
        // One consumer: a stored permit wakes it even if it is not waiting
        // yet.
        self.ready.notify_one();
        Ok(())
    }

    /// Waits until frames are queued and moves up to `limit` of them into
    /// `buf`. Returns 0 once the queue is closed and empty.
    pub async fn recv_many(&self, buf: &mut Vec<Outbound>, limit: usize) -> usize {
        loop {
            {
                let mut state = self.state.lock().expect("queue lock");
                if !state.items.is_empty() {
                    let n = state.items.len().min(limit);
                    buf.extend(state.items.drain(..n));
                    if state.items.is_empty() && state.items.capacity() > KEEP_CAPACITY {
                        state.items = VecDeque::new();
                    }
                    return n;
                }
                if state.closed {
                    return 0;
                }
            }
            self.ready.notified().await;
        }
    }

    /// The next frame, if one is queued.
    pub fn try_recv(&self) -> Option<Outbound> {
        self.state.lock().expect("queue lock").items.pop_front()
    }

    /// Refuses further pushes; the consumer drains what is queued, then
    /// sees the end.
    pub fn close(&self) {
        self.state.lock().expect("queue lock").closed = true;
        self.ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;

    fn out(n: u8) -> Outbound {
        Outbound {
            bytes: Bytes::from(vec![n]),
            deliver: None,
            close_after: None,
            error: None,
        }
    }

    #[tokio::test]
    async fn bounded_ordered_and_ends_after_close() {
        let queue = OutQueue::default();
        queue.push(out(1), 2).unwrap();
        queue.push(out(2), 2).unwrap();
        assert_eq!(queue.push(out(3), 2), Err(PushError::Full));
        let mut buf = Vec::new();
        assert_eq!(queue.recv_many(&mut buf, 10).await, 2);
        assert_eq!(buf.iter().map(|o| o.bytes[0]).collect::<Vec<_>>(), [1, 2]);
        queue.push(out(4), 2).unwrap();
        queue.close();
        assert_eq!(queue.push(out(5), 2), Err(PushError::Closed));
        buf.clear();
        assert_eq!(queue.recv_many(&mut buf, 10).await, 1, "drains first");
        assert_eq!(queue.recv_many(&mut buf, 10).await, 0, "then ends");
    }

    #[tokio::test]
    async fn a_waiting_consumer_wakes_on_push_and_big_buffers_are_freed() {
        let queue = Arc::new(OutQueue::default());
        let consumer = {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut total = 0;
                while total < 100 {
                    total += queue.recv_many(&mut buf, 7).await;
                }
                buf
            })
        };
        for n in 0..100 {
            queue.push(out(n), 1000).unwrap();
            if n % 10 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let got = tokio::time::timeout(Duration::from_secs(30), consumer)
            .await
            .expect("consumer finishes")
            .unwrap();
        assert_eq!(
            got.iter().map(|o| o.bytes[0]).collect::<Vec<_>>(),
            (0..100).collect::<Vec<u8>>()
        );
        assert!(queue.state.lock().unwrap().items.capacity() <= KEEP_CAPACITY);
    }
}
