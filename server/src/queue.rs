//! The outbound queue of one stream of one session: many producers (the
//! committers, presence, other sessions), one consumer (the stream's
//! writer).
//!
//! Frames pushed before the client opens the stream are kept as well,
//! within the same bounds: client-lib opens its streams a round trip after
//! authenticating, and not all that a device is pushed in between would
//! come with catch-up (the echo of its user's send from another device,
//! which catch-up leaves out, or a message another device of the user
//! acknowledges meanwhile: watermarks are per user; catch-up reads a
//! conversation with messages held from below them,
//! [`OutQueue::held_deliveries`]); a pass writes the echoes the queue
//! holds ([`OutQueue::held_own`]) in their place among what it reads from
//! history, and the writer drops their queued copies. But a stream that is
//! not open is not a slow reader: once the bounds are reached, the queue
//! lets go of what it kept and keeps nothing until the stream opens
//! ([`PushError::Unopened`]), and the device gets what an offline one gets
//! when it opens the stream: catch-up (messages) or the snapshot
//! (receipts). So a device that talks on control alone is not closed for
//! messages it never asked for, and holds at most [`UNOPENED_FRAMES`] /
//! [`UNOPENED_BYTES`] per stream (a round trip's worth).
//!
//! While the messages stream's catch-up runs, its writer does not take
//! from the queue either: a long backlog on a slow link can take minutes,
//! and a busy user's live messages meanwhile used to fill the queue and
//! close a client that read as fast as its link allowed. At the bounds
//! the queue then lets go of its `Deliver` frames of other users'
//! messages (catch-up brings them: the writer runs another pass, see
//! [`OutQueue::finish_catch_up`], which names the seqs let go of each
//! conversation, read from history then: the user's watermark may have
//! passed them meanwhile, acked by another device, and the next pass, from
//! the watermark, would not bring them) and keeps the rest: send acks, errors,
//! and the user's own messages echoed from their other devices, which
//! catch-up reads from history only in the conversations and ranges it
//! writes (see [`OutQueue::held_own`]). Only a client that does not read
//! fills those. An echo kept that no pass wrote is written even after
//! later messages of its conversation (client-lib takes a message below
//! ones it has, within 256 seqs); until session 40 the writer dropped it,
//! and the device saw it only in history.
//!
//! Not a `tokio::sync::mpsc` channel because of idle memory: a bounded
//! channel allocates its first block (32 slots) when it is created, about
//! 2.3 KB per queue and 7 KB per connection for three streams, for
//! connections that mostly sit idle. This queue holds nothing while empty
//! and gives back large buffers once drained.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

use crate::wire::Outbound;

/// Capacity kept after a drain; a queue that grew beyond it (a burst)
/// returns its buffer.
const KEEP_CAPACITY: usize = 16;

/// Most frames kept for a stream the client has not opened.
pub const UNOPENED_FRAMES: usize = 256;

/// Most bytes kept for a stream the client has not opened.
pub const UNOPENED_BYTES: usize = 256 << 10;

/// Why a push failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue holds its limit: the reader is too slow.
    Full,
    /// The queue was closed.
    Closed,
    /// The frame was not kept and the device gets it through catch-up
    /// or the receipts snapshot: the stream is not open and the queue gave
    /// up keeping frames for it, or (a message) the stream's catch-up is
    /// still being written and the queue is at its bounds (see the module
    /// docs).
    Unopened,
}

#[derive(Default)]
struct State {
    items: VecDeque<Outbound>,
    /// Encoded bytes of `items`.
    bytes: usize,
    phase: Phase,
    closed: bool,
    /// Conversation -> the lowest and highest seq of the `Deliver` frames
    /// let go during a catch-up since it was last taken (boxed: most
    /// queues never have any).
    missed: Option<Box<Missed>>,
}

/// Conversation -> the lowest and highest seq let go (see
/// [`OutQueue::finish_catch_up`]).
pub type Missed = HashMap<u64, (u64, u64)>;

impl State {
    fn note_missed(&mut self, conversation: u64, seq: u64) {
        let range = self
            .missed
            .get_or_insert_with(Default::default)
            .entry(conversation)
            .or_insert((seq, seq));
        *range = (range.0.min(seq), range.1.max(seq));
    }
}

/// Whether a writer takes from the queue (see the module docs).
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The stream is not open; pushes are kept within the bounds.
    #[default]
    Unopened,
    /// The stream is not open and the bounds were reached: nothing is kept.
    GaveUp,
    /// The stream is open and its catch-up runs; the writer takes from the
    /// queue after it.
    CatchingUp,
    /// The same, and the queue let go of `Deliver` frames at its bounds:
    /// catch-up must run again.
    CatchingUpMissed,
    /// The stream's writer takes from the queue.
    Open,
}

/// See the module docs.
#[derive(Default)]
pub struct OutQueue {
    state: Mutex<State>,
    ready: Notify,
}

impl OutQueue {
    /// The stream's writer takes from the queue from now on: pushes are
    /// kept for it, and a full queue means a slow reader (see the module
    /// docs).
    pub fn open(&self) {
        self.state.lock().expect("queue lock").phase = Phase::Open;
    }

    /// The stream is open, but its writer takes from the queue only after
    /// a catch-up (see the module docs); [`finish_catch_up`](Self::finish_catch_up)
    /// says when.
    pub fn open_for_catch_up(&self) {
        self.state.lock().expect("queue lock").phase = Phase::CatchingUp;
    }

    /// A catch-up pass ended: `Ok`, and the queue is open, unless it let
    /// go of `Deliver` frames meanwhile; then `Err` with the seqs it let
    /// go of, and the caller runs another pass that brings them (whatever
    /// is pushed from here on is kept for after it).
    pub fn finish_catch_up(&self) -> Result<(), Missed> {
        let mut state = self.state.lock().expect("queue lock");
        match state.phase {
            Phase::CatchingUpMissed => {
                state.phase = Phase::CatchingUp;
                Err(state.missed.take().map(|m| *m).unwrap_or_default())
            }
            _ => {
                state.phase = Phase::Open;
                state.missed = None;
                Ok(())
            }
        }
    }

    /// Conversation -> the lowest seq of the other users' messages the
    /// queue holds: a catch-up writing a later one of the conversation
    /// from history starts below it, or the writer would drop what is held
    /// (it keeps each conversation in seq order) though another device of
    /// the user may have acked it, so no pass brings it either.
    pub fn held_deliveries(&self) -> HashMap<u64, u64> {
        let state = self.state.lock().expect("queue lock");
        let mut held = HashMap::new();
        for d in state
            .items
            .iter()
            .filter_map(|o| o.deliver.filter(|d| !d.own))
        {
            let lowest = held.entry(d.conversation).or_insert(d.seq);
            *lowest = (*lowest).min(d.seq);
        }
        held
    }

    /// (conversation, seq) of the user's own messages echoed from their
    /// other devices that the queue holds: a catch-up pass writes them in
    /// their place among what it reads from history (it leaves the user's
    /// own out otherwise).
    pub fn held_own(&self) -> std::collections::HashSet<(u64, u64)> {
        let state = self.state.lock().expect("queue lock");
        state
            .items
            .iter()
            .filter_map(|o| o.deliver.filter(|d| d.own))
            .map(|d| (d.conversation, d.seq))
            .collect()
    }

    /// Frames and bytes queued now.
    pub fn queued(&self) -> (usize, usize) {
        let state = self.state.lock().expect("queue lock");
        (state.items.len(), state.bytes)
    }

    /// Appends `out` unless the queue is closed, already holds
    /// `max_frames` frames, or would hold more than `max_bytes` with it (an
    /// empty queue takes any one frame): then `Full`, or, if the stream is
    /// not open, `Unopened`, and the queue lets go of what it held. Never
    /// waits.
    pub fn push(
        &self,
        out: Outbound,
        max_frames: usize,
        max_bytes: usize,
    ) -> Result<(), PushError> {
        {
            let mut state = self.state.lock().expect("queue lock");
            if state.closed {
                return Err(PushError::Closed);
            }
            if state.phase == Phase::GaveUp {
                return Err(PushError::Unopened);
            }
            let (max_frames, max_bytes) = if state.phase == Phase::Unopened {
                (
                    max_frames.min(UNOPENED_FRAMES),
                    max_bytes.min(UNOPENED_BYTES),
                )
            } else {
                (max_frames, max_bytes)
            };
            let over = |state: &State| {
                let bytes = state.bytes + out.bytes.len();
                state.items.len() >= max_frames || (bytes > max_bytes && !state.items.is_empty())
            };
            if over(&state) {
                match state.phase {
                    Phase::Open => return Err(PushError::Full),
                    Phase::CatchingUp | Phase::CatchingUpMissed => {
                        // Catch-up brings other users' messages; the rest
                        // stays.
                        let catch_up_has = |o: &Outbound| o.deliver.filter(|d| !d.own);
                        let mut kept = VecDeque::with_capacity(state.items.len());
                        for o in std::mem::take(&mut state.items) {
                            match catch_up_has(&o) {
                                Some(d) => state.note_missed(d.conversation, d.seq),
                                None => kept.push_back(o),
                            }
                        }
                        state.items = kept;
                        state.bytes = state.items.iter().map(|o| o.bytes.len()).sum();
                        state.phase = Phase::CatchingUpMissed;
                        if let Some(d) = catch_up_has(&out) {
                            state.note_missed(d.conversation, d.seq);
                            return Err(PushError::Unopened);
                        }
                        if over(&state) {
                            return Err(PushError::Full);
                        }
                    }
                    Phase::Unopened | Phase::GaveUp => {
                        state.items = VecDeque::new();
                        state.bytes = 0;
                        state.phase = Phase::GaveUp;
                        return Err(PushError::Unopened);
                    }
                }
            }
            state.bytes += out.bytes.len();
            state.items.push_back(out);
        }
        // One consumer: a stored permit wakes it even if it is not waiting
        // yet.
        self.ready.notify_one();
        Ok(())
    }

    /// Appends `out`, a frame that may be dropped (typing), only if the
    /// stream is open and the queue holds fewer than `max_frames` frames
    /// and `max_bytes` bytes with it: never a reason to close a slow
    /// reader, nor to let go of what an unopened stream holds. Returns
    /// whether it was queued.
    pub fn offer(&self, out: Outbound, max_frames: usize, max_bytes: usize) -> bool {
        {
            let mut state = self.state.lock().expect("queue lock");
            if state.closed
                || state.phase != Phase::Open
                || state.items.len() >= max_frames
                || state.bytes + out.bytes.len() > max_bytes
            {
                return false;
            }
            state.bytes += out.bytes.len();
            state.items.push_back(out);
        }
        self.ready.notify_one();
        true
    }

    /// Waits until frames are queued and moves up to `max_frames` of them,
    /// and no more than `max_bytes` unless the first alone is larger, into
    /// `buf`. Returns 0 once the queue is closed and empty.
    pub async fn recv_many(
        &self,
        buf: &mut Vec<Outbound>,
        max_frames: usize,
        max_bytes: usize,
    ) -> usize {
        loop {
            {
                let mut state = self.state.lock().expect("queue lock");
                if !state.items.is_empty() {
                    let mut n = 0;
                    let mut taken = 0;
                    for out in state.items.iter().take(max_frames) {
                        if n > 0 && taken + out.bytes.len() > max_bytes {
                            break;
                        }
                        taken += out.bytes.len();
                        n += 1;
                    }
                    state.bytes -= taken;
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
        let mut state = self.state.lock().expect("queue lock");
        let out = state.items.pop_front()?;
        state.bytes -= out.bytes.len();
        Some(out)
    }

    /// Refuses further pushes; the consumer drains what is queued, then
    /// sees the end.
    pub fn close(&self) {
        self.state.lock().expect("queue lock").closed = true;
        self.ready.notify_one();
    }

    /// Appends `last`, over any limit, and closes the queue in the same
    /// step, so that nothing can follow it. False if the queue was closed
    /// already.
    pub fn close_with(&self, last: Outbound) -> bool {
        {
            let mut state = self.state.lock().expect("queue lock");
            if state.closed {
                return false;
            }
            state.bytes += last.bytes.len();
            state.items.push_back(last);
            state.closed = true;
        }
        self.ready.notify_one();
        true
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

    fn opened() -> OutQueue {
        let queue = OutQueue::default();
        queue.open();
        queue
    }

    fn deliver(n: u8) -> Outbound {
        Outbound {
            deliver: Some(crate::wire::DeliverKey {
                conversation: 7,
                seq: u64::from(n),
                own: false,
            }),
            ..out(n)
        }
    }

    /// The user's own message, echoed from another device.
    fn echo(n: u8) -> Outbound {
        Outbound {
            deliver: Some(crate::wire::DeliverKey {
                conversation: 7,
                seq: u64::from(n),
                own: true,
            }),
            ..out(n)
        }
    }

    #[test]
    fn during_catch_up_a_full_queue_lets_go_of_messages_and_keeps_the_rest() {
        // A long catch-up on a slow link while live messages come in: at
        // the bounds the queue used to refuse (the client was closed as
        // too slow, and its next catch-up started over). Now it lets go of
        // the Deliver frames catch-up brings, keeps what catch-up cannot (a
        // send's ack, the user's own message from another device), and
        // says another pass is needed.
        let queue = OutQueue::default();
        queue.open_for_catch_up();
        queue.push(deliver(1), 4, 1 << 20).unwrap();
        queue.push(out(2), 4, 1 << 20).unwrap();
        queue.push(echo(3), 4, 1 << 20).unwrap();
        queue.push(deliver(4), 4, 1 << 20).unwrap();
        assert_eq!(queue.push(deliver(5), 4, 1 << 20), Err(PushError::Unopened));
        queue.push(out(6), 4, 1 << 20).unwrap();
        queue.push(deliver(7), 4, 1 << 20).unwrap();
        let kept: Vec<u8> = std::iter::from_fn(|| queue.try_recv())
            .map(|o| o.bytes[0])
            .collect();
        assert_eq!(kept, vec![2, 3, 6, 7]);
        queue.push(echo(9), 4, 1 << 20).unwrap();
        queue.push(deliver(10), 4, 1 << 20).unwrap();
        queue.push(deliver(8), 4, 1 << 20).unwrap();
        assert_eq!(
            queue.held_deliveries(),
            HashMap::from([(7, 8)]),
            "the lowest held, not an echo's"
        );
        while queue.try_recv().is_some() {}
        assert_eq!(
            queue.finish_catch_up(),
            Err(HashMap::from([(7, (1, 5))])),
            "messages were let go: another pass, for 1 to 5"
        );
        // The next pass ends with nothing let go: the queue is open, and a
        // full queue then means a slow reader.
        queue.push(deliver(8), 1, 1 << 20).unwrap();
        assert_eq!(queue.finish_catch_up(), Ok(()));
        assert_eq!(queue.push(deliver(9), 1, 1 << 20), Err(PushError::Full));
    }

    #[test]
    fn during_catch_up_what_catch_up_cannot_bring_is_still_bounded() {
        let queue = OutQueue::default();
        queue.open_for_catch_up();
        queue.push(out(1), 2, 1 << 20).unwrap();
        queue.push(echo(2), 2, 1 << 20).unwrap();
        assert_eq!(queue.push(out(3), 2, 1 << 20), Err(PushError::Full));
        assert_eq!(queue.push(echo(4), 2, 1 << 20), Err(PushError::Full));
    }

    #[test]
    fn an_offer_is_taken_only_by_an_open_queue_with_room_and_never_fills_it() {
        // Typing is offered: a queue that has not opened (or is catching
        // up) does not take it, so it never makes one let go of what it
        // holds; an open one takes it below the bounds and refuses it at
        // them, still taking what is pushed after.
        let queue = OutQueue::default();
        queue.push(out(1), 4, 1 << 20).unwrap();
        assert!(!queue.offer(out(2), 4, 1 << 20), "not open");
        assert_eq!(queue.queued().0, 1, "what it held stays");
        queue.open_for_catch_up();
        assert!(!queue.offer(out(2), 4, 1 << 20), "catching up");
        let queue = OutQueue::default();
        queue.open();
        assert!(queue.offer(out(1), 2, 1 << 20));
        assert!(queue.offer(out(2), 2, 1 << 20));
        assert!(!queue.offer(out(3), 2, 1 << 20), "at its frames");
        assert!(!queue.offer(out(3), 4, 2), "at its bytes");
        assert_eq!(queue.push(out(4), 4, 1 << 20), Ok(()), "not closed by it");
        queue.close();
        assert!(!queue.offer(out(5), 8, 1 << 20), "closed");
    }

    #[test]
    fn a_stream_not_opened_keeps_a_round_trip_at_most() {
        // Before it opens, the queue keeps no more than its own small
        // bounds, whatever the caller's: a connection that never opens its
        // receipts stream used to hold up to 16,384 frames for it.
        let queue = OutQueue::default();
        for n in 0..UNOPENED_FRAMES {
            queue.push(out(n as u8), 16 * 1024, 4 << 20).unwrap();
        }
        assert_eq!(
            queue.push(out(0), 16 * 1024, 4 << 20),
            Err(PushError::Unopened)
        );
        let queue = OutQueue::default();
        let big = Outbound {
            bytes: Bytes::from(vec![0; UNOPENED_BYTES]),
            ..out(0)
        };
        queue.push(big, 16 * 1024, 4 << 20).unwrap();
        assert_eq!(
            queue.push(out(1), 16 * 1024, 4 << 20),
            Err(PushError::Unopened)
        );
    }

    #[tokio::test]
    async fn before_it_opens_a_full_queue_lets_go_instead_of_refusing() {
        let queue = OutQueue::default();
        queue.push(out(1), 2, 1 << 20).unwrap();
        queue.push(out(2), 2, 1 << 20).unwrap();
        assert_eq!(queue.push(out(3), 2, 1 << 20), Err(PushError::Unopened));
        assert_eq!(queue.state.lock().unwrap().items.len(), 0, "let go");
        assert_eq!(
            queue.push(out(4), 2, 1 << 20),
            Err(PushError::Unopened),
            "and keeps nothing more"
        );
        queue.open();
        queue.push(out(5), 2, 1 << 20).unwrap();
        queue.push(out(6), 2, 1 << 20).unwrap();
        assert_eq!(queue.push(out(7), 2, 1 << 20), Err(PushError::Full));
        let mut buf = Vec::new();
        assert_eq!(queue.recv_many(&mut buf, 10, 1 << 20).await, 2);
        assert_eq!(buf.iter().map(|o| o.bytes[0]).collect::<Vec<_>>(), [5, 6]);
    }

    #[tokio::test]
    async fn what_is_pushed_before_it_opens_is_kept_for_the_writer() {
        let queue = OutQueue::default();
        queue.push(out(1), 2, 1 << 20).unwrap();
        queue.open();
        queue.push(out(2), 2, 1 << 20).unwrap();
        let mut buf = Vec::new();
        assert_eq!(queue.recv_many(&mut buf, 10, 1 << 20).await, 2);
        assert_eq!(buf.iter().map(|o| o.bytes[0]).collect::<Vec<_>>(), [1, 2]);
    }

    #[tokio::test]
    async fn bounded_ordered_and_ends_after_close() {
        let queue = opened();
        queue.push(out(1), 2, 1 << 20).unwrap();
        queue.push(out(2), 2, 1 << 20).unwrap();
        assert_eq!(queue.push(out(3), 2, 1 << 20), Err(PushError::Full));
        let mut buf = Vec::new();
        assert_eq!(queue.recv_many(&mut buf, 10, 1 << 20).await, 2);
        assert_eq!(buf.iter().map(|o| o.bytes[0]).collect::<Vec<_>>(), [1, 2]);
        queue.push(out(4), 2, 1 << 20).unwrap();
        queue.close();
        assert_eq!(queue.push(out(5), 2, 1 << 20), Err(PushError::Closed));
        buf.clear();
        assert_eq!(
            queue.recv_many(&mut buf, 10, 1 << 20).await,
            1,
            "drains first"
        );
        assert_eq!(queue.recv_many(&mut buf, 10, 1 << 20).await, 0, "then ends");
    }

    #[tokio::test]
    async fn a_last_frame_goes_in_over_the_limit_and_nothing_after_it() {
        let queue = opened();
        queue.push(out(1), 1, 1 << 20).unwrap();
        assert_eq!(queue.push(out(2), 1, 1 << 20), Err(PushError::Full));
        assert!(queue.close_with(out(3)), "taken over a full queue");
        assert_eq!(queue.push(out(4), 10, 1 << 20), Err(PushError::Closed));
        assert!(!queue.close_with(out(5)), "closed already");
        let mut buf = Vec::new();
        assert_eq!(queue.recv_many(&mut buf, 10, 1 << 20).await, 2);
        assert_eq!(buf.iter().map(|o| o.bytes[0]).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(queue.recv_many(&mut buf, 10, 1 << 20).await, 0, "then ends");
    }

    #[tokio::test]
    async fn a_waiting_consumer_wakes_on_push_and_big_buffers_are_freed() {
        let queue = Arc::new(opened());
        let consumer = {
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut total = 0;
                while total < 100 {
                    total += queue.recv_many(&mut buf, 7, 1 << 20).await;
                }
                buf
            })
        };
        for n in 0..100 {
            queue.push(out(n), 1000, 1 << 20).unwrap();
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

    fn sized(len: usize) -> Outbound {
        Outbound {
            bytes: Bytes::from(vec![0; len]),
            deliver: None,
            close_after: None,
            error: None,
        }
    }

    #[tokio::test]
    async fn bytes_are_bounded_too_in_the_queue_and_in_each_take() {
        // Few frames but many bytes: the byte bound refuses the third.
        let queue = opened();
        queue.push(sized(600), 1024, 1000).unwrap();
        queue.push(sized(400), 1024, 1000).unwrap();
        assert_eq!(queue.push(sized(1), 1024, 1000), Err(PushError::Full));
        // Taking frames gives their bytes back.
        let mut buf = Vec::new();
        assert_eq!(
            queue.recv_many(&mut buf, 10, 700).await,
            1,
            "600 + 400 > 700"
        );
        assert_eq!(queue.recv_many(&mut buf, 10, 700).await, 1);
        queue.push(sized(900), 1024, 1000).unwrap();
        assert_eq!(queue.try_recv().map(|o| o.bytes.len()), Some(900));
        // An empty queue takes, and a take hands out, one frame of any size.
        queue.push(sized(5000), 1024, 1000).unwrap();
        buf.clear();
        assert_eq!(queue.recv_many(&mut buf, 10, 700).await, 1);
        assert_eq!(buf[0].bytes.len(), 5000);
        assert_eq!(queue.state.lock().unwrap().bytes, 0);
    }
}
