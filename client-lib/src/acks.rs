//! Delivery acks: what the app has of each conversation, and the acks
//! still to be written.
//!
//! A delivery ack moves the user's delivered watermark on the server,
//! which then stops redelivering what it covers; so a message is acked
//! only once the app has it (it took it from [`Events`](crate::Events),
//! or acknowledged it itself with [`DeliveryAcks::Manual`]), never when
//! it is merely queued: a process killed with messages still queued gets
//! them again on its next connection. Nor when nobody reads the events (the
//! app dropped them, or the client is leaving): the watermark is the
//! user's, not the device's, so such an ack would keep the message from the
//! user's other devices and next client. It stays unacknowledged and comes
//! again on the next connection.
//!
//! Acks are per client, not per connection. The app takes a message
//! whenever it likes, perhaps after the connection that brought it is
//! gone; its ack waits here for whichever connection's messages writer
//! runs next. An ack can still be lost with a connection (written to one
//! that failed); the next connection then redelivers what the server's
//! watermark does not cover, and a redelivery of something the app has is
//! acked again at once ([`Acks::redelivered`]). That is the invariant:
//! *what the app has is recorded before its ack is queued*.
//!
//! A redelivery comes too late once a leaving client has sealed its last
//! acks ([`Acks::seal`]): nothing more is written after them. So the acks
//! a connection's writer wrote are also remembered until that connection
//! is lost, and then queued again ([`Acks::lost`]) before the next
//! connection's writer runs: the last acks include them, whenever the
//! shutdown starts. Only those written within twice the idle timeout of
//! the loss (a dead path is noticed within one; an ack written before,
//! on a connection that stayed up, reached the server), and at most
//! 4,096 of them, the latest (an older one relies on the redelivery).
//!
//! An ack covers every earlier message of its conversation, so it never
//! reaches a message still queued for the app ([`Acks::on_its_way`]): the
//! server delivers a conversation in seq order, but a message whose commit
//! outcome was unknown can come after later ones (see [`crate::dedup`]),
//! and the app taking the later one first acked over it; had the process
//! died before the app took it, the user's next client would never have
//! got it. The ack stops below it, and moves up to all the app has once
//! the app takes it.
//!
//! [`DeliveryAcks::Manual`]: crate::DeliveryAcks::Manual

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::dedup::Delivered;

/// Conversations with an ack waiting to be written, beyond which the
/// messages reader waits ([`Acks::room`]). Acks pile up only while the
/// messages stream cannot be written (the server does not read it) or
/// the client is disconnected; then the reader stops, and flow control
/// holds the server back instead of the client growing. The app may still
/// take what is queued for it, so with [`DeliveryAcks::OnTake`] at most
/// this plus `event_capacity` wait, and those of the last moments of a
/// lost connection queued again by [`Acks::lost`] (beyond what its
/// deliveries earn, the server accepts a slack of 8,192 per user,
/// refilled over a minute); with [`DeliveryAcks::Manual`] the app's own
/// acks add to them.
///
/// [`DeliveryAcks::OnTake`]: crate::DeliveryAcks::OnTake
/// [`DeliveryAcks::Manual`]: crate::DeliveryAcks::Manual
pub(crate) const MAX_UNSENT: usize = 1_024;

#[derive(Default)]
pub(crate) struct Acks {
    state: Mutex<State>,
    /// Woken when an ack is queued.
    queued: Notify,
    /// Woken when a writer takes the waiting acks.
    taken: Notify,
}

/// Acks a connection's writer wrote at most, for [`Acks::lost`] (24 bytes
/// each).
const MAX_WRITTEN: usize = 4 * MAX_UNSENT;

/// The acks one connection's writer wrote within its window (what a loss
/// detected now may have taken with it), oldest first: an ack written
/// longer ago, on a connection that stayed up, reached the server. Putting
/// back all a long-lived connection ever wrote cost every reconnect up to
/// 1,024 acks of the user's slack on the server.
struct Written {
    window: Duration,
    acks: VecDeque<(Instant, u64, u64)>,
}

impl Written {
    fn note(&mut self, now: Instant, acks: &HashMap<u64, u64>) {
        self.forget_before(now);
        self.acks.extend(
            acks.iter()
                .map(|(&conversation, &seq)| (now, conversation, seq)),
        );
        while self.acks.len() > MAX_WRITTEN {
            self.acks.pop_front();
        }
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .acks
            .front()
            .is_some_and(|&(at, _, _)| now.saturating_duration_since(at) > self.window)
        {
            self.acks.pop_front();
        }
    }
}

#[derive(Default)]
struct State {
    /// Highest seq per conversation the app has (bounded as the
    /// deduplication marks are).
    had: Delivered,
    /// Conversation -> highest seq to ack, not yet written.
    unsent: HashMap<u64, u64>,
    /// The last acks, once taken (see [`Acks::seal`]): no more are queued.
    sealed: Option<HashMap<u64, u64>>,
    /// Connection (see [`Acks::connection`]) -> the acks its writer wrote
    /// lately; until it is lost.
    written: HashMap<u64, Written>,
    /// The id of the next connection.
    next_connection: u64,
    /// Conversation -> the seqs queued for the app and not taken yet, in
    /// the queue's order (bounded by its capacity: an entry leaves when
    /// the app takes its message).
    on_its_way: HashMap<u64, VecDeque<u64>>,
}

impl Acks {
    /// The app has `seq` of the conversation and everything before it:
    /// records it and queues its ack. False, and nothing recorded, once
    /// the acks are sealed (the client is leaving): an ack queued now
    /// would never be written.
    ///
    /// The ack covers the highest seq the app has, unless a lower one is
    /// still queued for it ([`on_its_way`](Self::on_its_way)): then it
    /// stops below that one.
    pub(crate) fn have(&self, conversation_id: u64, seq: u64) -> bool {
        let mut state = self.state.lock().expect("acks lock");
        if state.sealed.is_some() {
            return false;
        }
        state.had.first(conversation_id, seq);
        let highest = state.had.last(conversation_id).unwrap_or(seq).max(seq);
        state.queue(conversation_id, highest);
        drop(state);
        self.queued.notify_waiters();
        true
    }

    /// `seq` of the conversation is queued for the app: until the app
    /// takes it ([`taken`](Self::taken)), no ack reaches it.
    pub(crate) fn on_its_way(&self, conversation_id: u64, seq: u64) {
        let mut state = self.state.lock().expect("acks lock");
        state
            .on_its_way
            .entry(conversation_id)
            .or_default()
            .push_back(seq);
    }

    /// The app took `seq` of the conversation from its queue: acks may
    /// reach it. Then, if `ack`, as [`have`](Self::have).
    pub(crate) fn taken(&self, conversation_id: u64, seq: u64, ack: bool) -> bool {
        {
            let mut state = self.state.lock().expect("acks lock");
            if let Some(queued) = state.on_its_way.get_mut(&conversation_id) {
                // The queue is first in, first out: the front, unless the
                // app's taking raced a reconnect's hand-over.
                if let Some(at) = queued.iter().position(|&s| s == seq) {
                    queued.remove(at);
                }
                if queued.is_empty() {
                    state.on_its_way.remove(&conversation_id);
                }
            }
        }
        !ack || self.have(conversation_id, seq)
    }

    /// A new connection, whose messages writer takes acks with the id
    /// returned, until [`lost`](Self::lost); what it wrote within `window`
    /// of its loss (at least the idle timeout: how long a dead path takes
    /// to be noticed) is written again on the next one.
    pub(crate) fn connection(&self, window: Duration) -> u64 {
        let mut state = self.state.lock().expect("acks lock");
        let id = state.next_connection;
        state.next_connection += 1;
        state.written.insert(
            id,
            Written {
                window,
                acks: VecDeque::new(),
            },
        );
        id
    }

    /// The connection is gone, and the acks its writer wrote may have gone
    /// with it, unread by the server: they are queued again, merged with
    /// those waiting (or, once sealed, with the last acks), for the next
    /// connection, whose writer the caller starts only after this. Its
    /// own writer takes nothing more.
    pub(crate) fn lost(&self, connection: u64) {
        let mut state = self.state.lock().expect("acks lock");
        let state = &mut *state;
        let Some(mut written) = state.written.remove(&connection) else {
            return;
        };
        written.forget_before(Instant::now());
        let waiting = state.sealed.as_mut().unwrap_or(&mut state.unsent);
        for (_, conversation_id, seq) in written.acks {
            let highest = waiting.entry(conversation_id).or_insert(seq);
            *highest = (*highest).max(seq);
        }
        self.queued.notify_waiters();
    }

    /// The last acks, for the writer of `connection` when the client is
    /// leaving: those waiting the first time, and the same again on every
    /// later call, with any that a connection lost meanwhile had written
    /// (a connection made during the leaving writes them again, in case
    /// the one that wrote them was lost). From the first call on,
    /// [`have`](Self::have) refuses.
    pub(crate) fn seal(&self, connection: u64) -> HashMap<u64, u64> {
        let mut state = self.state.lock().expect("acks lock");
        let state = &mut *state;
        let sealed = state
            .sealed
            .get_or_insert_with(|| std::mem::take(&mut state.unsent))
            .clone();
        let sealed = state.below_queued(sealed);
        if let Some(written) = state.written.get_mut(&connection) {
            written.note(Instant::now(), &sealed);
        }
        self.taken.notify_waiters();
        sealed
    }

    /// The server delivered `seq` again (after a reconnect): true, and the
    /// ack of everything the app has of the conversation queued again, if
    /// the app has `seq` already (unless the acks are sealed: the last
    /// ones hold what lost connections wrote, see [`lost`](Self::lost));
    /// false if it is still on its way to the app, which acks it when it
    /// gets there.
    pub(crate) fn redelivered(&self, conversation_id: u64, seq: u64) -> bool {
        let mut state = self.state.lock().expect("acks lock");
        let Some(had) = state.had.last(conversation_id).filter(|&had| seq <= had) else {
            return false;
        };
        if state.sealed.is_some() {
            return true;
        }
        state.queue(conversation_id, had);
        drop(state);
        self.queued.notify_waiters();
        true
    }

    /// Whether an ack is waiting.
    pub(crate) fn any_unsent(&self) -> bool {
        !self.state.lock().expect("acks lock").unsent.is_empty()
    }

    /// Takes every waiting ack, for the writer of `connection` to write
    /// (remembered as written by it until it is lost). Nothing once it is
    /// lost: they wait for the next connection.
    pub(crate) fn take_unsent(&self, connection: u64) -> HashMap<u64, u64> {
        let mut state = self.state.lock().expect("acks lock");
        let state = &mut *state;
        if !state.written.contains_key(&connection) {
            return HashMap::new();
        }
        let unsent = std::mem::take(&mut state.unsent);
        let unsent = state.below_queued(unsent);
        if let Some(written) = state.written.get_mut(&connection) {
            written.note(Instant::now(), &unsent);
        }
        self.taken.notify_waiters();
        unsent
    }

    /// Resolves once fewer than [`MAX_UNSENT`] conversations have acks
    /// waiting.
    pub(crate) async fn room(&self) {
        loop {
            let taken = self.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            if self.state.lock().expect("acks lock").unsent.len() < MAX_UNSENT {
                return;
            }
            taken.await;
        }
    }

    /// Resolves after an ack is queued, once enabled (see
    /// [`tokio::sync::futures::Notified::enable`]).
    pub(crate) fn queued(&self) -> tokio::sync::futures::Notified<'_> {
        self.queued.notified()
    }
}

impl State {
    /// Queues the ack of `seq` and what comes before it, or of less: not
    /// of a message still queued for the app, nor past one.
    fn queue(&mut self, conversation_id: u64, seq: u64) {
        let seq = self.below_queued_one(conversation_id, seq);
        if seq == 0 {
            return;
        }
        let highest = self.unsent.entry(conversation_id).or_insert(seq);
        *highest = (*highest).max(seq);
    }

    /// `seq`, or less: below the lowest seq of the conversation still
    /// queued for the app (0: nothing to ack).
    fn below_queued_one(&self, conversation_id: u64, seq: u64) -> u64 {
        let lowest_queued = self
            .on_its_way
            .get(&conversation_id)
            .and_then(|queued| queued.iter().min().copied());
        match lowest_queued {
            Some(lowest) if lowest <= seq => lowest.saturating_sub(1),
            _ => seq,
        }
    }

    /// Acks about to leave, each lowered below what is queued for the app
    /// now: one queued earlier (or put back after a lost connection) may
    /// cover a message that came late since. What is left out is queued
    /// again as the app takes that message ([`Acks::have`] acks all the
    /// app has).
    fn below_queued(&self, mut acks: HashMap<u64, u64>) -> HashMap<u64, u64> {
        if self.on_its_way.is_empty() {
            return acks;
        }
        acks.retain(|&conversation_id, seq| {
            *seq = self.below_queued_one(conversation_id, *seq);
            *seq > 0
        });
        acks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn acks_what_the_app_has_and_redeliveries_of_it() {
        let acks = Acks::default();
        let conn = acks.connection(HOUR);
        acks.have(1, 3);
        acks.have(1, 2);
        acks.have(2, 7);
        assert_eq!(acks.take_unsent(conn), HashMap::from([(1, 3), (2, 7)]));
        assert!(!acks.any_unsent());

        assert!(acks.redelivered(1, 3), "the app has it: acked again");
        assert!(!acks.redelivered(1, 4), "still on its way to the app");
        assert!(!acks.redelivered(9, 1), "a conversation never seen");
        assert_eq!(acks.take_unsent(conn), HashMap::from([(1, 3)]));
        // An older one re-acks all the app has.
        assert!(acks.redelivered(2, 1));
        assert_eq!(acks.take_unsent(conn), HashMap::from([(2, 7)]));
    }

    #[test]
    fn no_ack_passes_a_message_still_queued_for_the_app() {
        let acks = Acks::default();
        let conn = acks.connection(HOUR);
        // 2 and 3 queued, then 1 (late), then 4.
        for seq in [2, 3, 1, 4] {
            acks.on_its_way(7, seq);
        }
        acks.on_its_way(8, 1);
        assert!(acks.taken(7, 2, true));
        assert!(acks.taken(7, 3, true));
        assert!(acks.taken(8, 1, true));
        assert_eq!(
            acks.take_unsent(conn),
            HashMap::from([(8, 1)]),
            "nothing of 7 while its 1 waits"
        );
        assert!(acks.redelivered(7, 3), "the app has it");
        assert!(!acks.any_unsent(), "its ack would pass 1 too");
        assert!(acks.taken(7, 1, true));
        assert_eq!(
            acks.take_unsent(conn),
            HashMap::from([(7, 3)]),
            "all the app has, up to 4, still queued"
        );
        assert!(acks.taken(7, 4, true));
        assert_eq!(acks.take_unsent(conn), HashMap::from([(7, 4)]));

        // The app's own acks (manual): taking records nothing, and its ack
        // of 9 stops below 6, still queued.
        for seq in [9, 6] {
            acks.on_its_way(7, seq);
        }
        assert!(acks.taken(7, 9, false));
        assert!(!acks.any_unsent(), "taken, not acked");
        acks.have(7, 9);
        assert_eq!(acks.take_unsent(conn), HashMap::from([(7, 5)]));
        assert!(acks.taken(7, 6, false));
        acks.have(7, 6);
        assert_eq!(
            acks.take_unsent(conn),
            HashMap::from([(7, 9)]),
            "up to what the app acked"
        );
        assert!(
            acks.state.lock().unwrap().on_its_way.is_empty(),
            "nothing left once all is taken"
        );
    }

    #[test]
    fn an_ack_waiting_when_a_late_message_comes_stops_below_it() {
        let acks = Acks::default();
        let first = acks.connection(HOUR);
        // 2 and 3 taken, their ack waiting; then the late 1 is queued.
        for seq in [2, 3] {
            acks.on_its_way(7, seq);
            assert!(acks.taken(7, seq, true));
        }
        acks.on_its_way(7, 1);
        assert!(acks.take_unsent(first).is_empty(), "it would cover 1");
        assert!(acks.taken(7, 1, true));
        assert_eq!(acks.take_unsent(first), HashMap::from([(7, 3)]));

        // Written before a late 4 of conversation 9 came, then lost with
        // its connection: put back, it stops below 4.
        acks.on_its_way(9, 6);
        assert!(acks.taken(9, 6, true));
        assert_eq!(acks.take_unsent(first), HashMap::from([(9, 6)]));
        acks.on_its_way(9, 4);
        acks.lost(first);
        let second = acks.connection(HOUR);
        assert_eq!(
            acks.take_unsent(second),
            HashMap::from([(7, 3), (9, 3)]),
            "9 below the late 4"
        );
        // Nor do the last acks pass it.
        acks.have(8, 5);
        acks.lost(second);
        assert_eq!(
            acks.seal(acks.connection(HOUR)),
            HashMap::from([(7, 3), (8, 5), (9, 3)])
        );
    }

    #[test]
    fn sealed_acks_take_no_more() {
        let acks = Acks::default();
        let conn = acks.connection(HOUR);
        assert!(acks.have(1, 3));
        assert!(acks.have(2, 1));
        assert_eq!(acks.seal(conn), HashMap::from([(1, 3), (2, 1)]));
        assert!(!acks.have(1, 4), "refused: it would never be written");
        assert!(acks.redelivered(1, 3), "the app still has it");
        assert!(!acks.any_unsent());
        assert_eq!(
            acks.seal(acks.connection(HOUR)),
            HashMap::from([(1, 3), (2, 1)]),
            "the same again, for a connection made meanwhile"
        );
    }

    #[test]
    fn what_a_lost_connection_wrote_waits_for_the_next() {
        let acks = Acks::default();
        let first = acks.connection(HOUR);
        acks.have(1, 3);
        acks.have(2, 1);
        assert_eq!(acks.take_unsent(first), HashMap::from([(1, 3), (2, 1)]));
        acks.have(1, 5);
        acks.lost(first);
        assert!(
            acks.take_unsent(first).is_empty(),
            "a lost connection's writer takes nothing more"
        );
        let second = acks.connection(HOUR);
        assert_eq!(
            acks.take_unsent(second),
            HashMap::from([(1, 5), (2, 1)]),
            "merged with those waiting, by the highest seq"
        );
        acks.lost(first);
        assert!(!acks.any_unsent(), "lost once only");

        // Written before the seal, lost after it: the last acks include
        // them, for the connection made next.
        acks.have(3, 2);
        assert_eq!(acks.seal(second), HashMap::from([(3, 2)]));
        acks.lost(second);
        assert_eq!(
            acks.seal(acks.connection(HOUR)),
            HashMap::from([(1, 5), (2, 1), (3, 2)])
        );
        assert!(!acks.any_unsent());
    }

    #[test]
    fn a_connection_remembers_the_acks_it_wrote_last() {
        let acks = Acks::default();
        let conn = acks.connection(HOUR);
        let n = 2 * MAX_WRITTEN as u64;
        for conversation in 0..n {
            acks.have(conversation, 1);
            acks.take_unsent(conn);
        }
        acks.lost(conn);
        let again = acks.take_unsent(acks.connection(HOUR));
        let mut kept: Vec<u64> = again.into_keys().collect();
        kept.sort_unstable();
        assert_eq!(
            kept,
            (n - MAX_WRITTEN as u64..n).collect::<Vec<_>>(),
            "the latest"
        );
    }

    #[test]
    fn acks_written_before_the_window_are_not_written_again() {
        let acks = Acks::default();
        let conn = acks.connection(Duration::from_millis(1));
        acks.have(1, 3);
        acks.take_unsent(conn);
        // Longer ago than the window when the loss is noticed.
        std::thread::sleep(Duration::from_millis(20));
        acks.have(2, 5);
        acks.take_unsent(conn);
        acks.lost(conn);
        assert_eq!(
            acks.take_unsent(acks.connection(HOUR)),
            HashMap::from([(2, 5)]),
            "only what the window holds"
        );
    }

    #[test]
    fn the_reader_waits_while_acks_cannot_leave() {
        let acks = Acks::default();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for conversation in 0..(MAX_UNSENT as u64 - 1) {
            acks.have(conversation, 1);
        }
        let room = std::pin::pin!(acks.room());
        assert!(room.poll(&mut cx).is_ready(), "one conversation short");

        acks.have(u64::MAX, 1);
        let mut room = std::pin::pin!(acks.room());
        assert!(room.as_mut().poll(&mut cx).is_pending(), "full");
        // More acks of a waiting conversation take no room.
        acks.have(0, 9);
        assert!(room.as_mut().poll(&mut cx).is_pending());
        let unsent = acks.take_unsent(acks.connection(HOUR));
        assert_eq!((unsent.len(), unsent[&0]), (MAX_UNSENT, 9));
        assert!(room.as_mut().poll(&mut cx).is_ready(), "a writer took them");
    }
}
